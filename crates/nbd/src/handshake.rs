//! The fixed newstyle handshake (option haggling) up to transmission.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::device::BlockSizes;
use crate::export::{ClientInfo, Export, Refusal};
use crate::forward::{self, Replay};
use crate::proto::{self, ReplyStyle};
use crate::shared::Shared;
use crate::transport::{Stream, Transport};

/// Why a handshake ended without transmission (logged at debug level only).
#[derive(Debug, thiserror::Error)]
pub(crate) enum HandshakeError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("protocol: {0}")]
    Proto(#[from] proto::ProtoError),
    #[error("{0}")]
    Refused(&'static str),
}

/// What the handshake agreed on.
pub(crate) struct Session {
    pub(crate) stream: Transport,
    pub(crate) export: Export,
    pub(crate) style: ReplyStyle,
    pub(crate) extended: bool,
    /// `base:allocation` was selected for the export in use.
    pub(crate) meta_context: bool,
    pub(crate) size: u64,
    pub(crate) sizes: BlockSizes,
}

/// How a handshake ended, other than without a connection.
pub(crate) enum Negotiated {
    /// Served here.
    Session(Session),
    /// Passed on to the export's upstream (the option naming it already sent there): the two
    /// streams are to be spliced.
    Forward {
        client: Transport,
        upstream: Box<dyn Stream>,
    },
}

/// Where an option naming an export is answered.
enum Route {
    /// Here.
    Here,
    /// By the upstream, which has been sent the option.
    There(Box<dyn Stream>),
    /// Nowhere: the export lives elsewhere and cannot be reached from here.
    Refused(Refusal),
}

/// Context id of `base:allocation` (the only context).
pub(crate) const BASE_ALLOCATION_ID: u32 = 1;

struct State {
    stream: Transport,
    tls_config: Option<Arc<rustls::ServerConfig>>,
    client: ClientInfo,
    structured: bool,
    extended: bool,
    /// Export name for which `base:allocation` was selected by the last SET_META_CONTEXT.
    meta_for: Option<String>,
    no_zeroes: bool,
    /// The client's flags as sent (replayed to an upstream).
    client_flags: u32,
    /// Another server passed this connection on here (`OPT_FORWARDED`): never again.
    forwarded: bool,
    /// The export that could not be passed on, and why: asked again, the same answer at once
    /// (a client's meta context option and its `GO` name the same export).
    failed_forward: Option<(String, Refusal)>,
}

/// Runs the handshake; `Ok(None)` when the client aborted or disconnected cleanly.
pub(crate) async fn negotiate(
    shared: &Shared,
    stream: Transport,
    peer: Option<SocketAddr>,
    tls_config: Option<Arc<rustls::ServerConfig>>,
) -> Result<Option<Negotiated>, HandshakeError> {
    let mut st = State {
        stream,
        tls_config,
        client: ClientInfo {
            tls: false,
            client_certificates: Vec::new(),
            peer,
        },
        structured: false,
        extended: false,
        meta_for: None,
        no_zeroes: false,
        client_flags: 0,
        forwarded: false,
        failed_forward: None,
    };
    st.stream.write_all(&proto::encode_greeting()).await?;
    st.stream.flush().await?;
    let mut flags = [0u8; 4];
    st.stream.read_exact(&mut flags).await?;
    st.client_flags = u32::from_be_bytes(flags);
    let flags = proto::parse_client_flags(&flags)?;
    st.no_zeroes = flags.no_zeroes;

    let config = &shared.config;
    let mut count = 0u32;
    loop {
        let mut header = [0u8; proto::OPTION_HEADER_LEN];
        match st.stream.read_exact(&mut header).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && count > 0 => {
                return Ok(None);
            }
            Err(e) => return Err(e.into()),
        }
        let header = proto::parse_option_header(&header)?;
        let option = header.option;
        count += 1;
        if count > config.max_options {
            st.error(option, proto::REP_ERR_TOO_BIG, "too many options")
                .await?;
            return Err(HandshakeError::Refused("too many options"));
        }
        if header.length > config.max_option_len {
            if option != proto::OPT_EXPORT_NAME {
                st.error(option, proto::REP_ERR_TOO_BIG, "option data too long")
                    .await?;
            }
            return Err(HandshakeError::Refused("option data too long"));
        }
        let mut data = vec![0u8; header.length as usize];
        st.stream.read_exact(&mut data).await?;
        if shared.shutdown.is_cancelled() {
            if option != proto::OPT_EXPORT_NAME {
                st.error(option, proto::REP_ERR_SHUTDOWN, "server shutting down")
                    .await?;
            }
            return Ok(None);
        }

        let tls_required = st.tls_config.is_some() && !st.client.tls;
        if tls_required && !matches!(option, proto::OPT_STARTTLS | proto::OPT_ABORT) {
            if option == proto::OPT_EXPORT_NAME {
                // EXPORT_NAME cannot be answered with an error: hang up, as the spec says.
                return Err(HandshakeError::Refused("EXPORT_NAME before STARTTLS"));
            }
            st.error(
                option,
                proto::REP_ERR_TLS_REQD,
                "TLS is required (NBD_OPT_STARTTLS)",
            )
            .await?;
            continue;
        }

        match option {
            proto::OPT_ABORT => {
                // The client may close without reading the ACK; either way we are done.
                let _ = st
                    .reply(&proto::encode_option_reply(option, proto::REP_ACK, &[]))
                    .await;
                return Ok(None);
            }
            proto::OPT_STARTTLS => st.starttls(&data).await?,
            proto::OPT_LIST => {
                if !data.is_empty() {
                    st.error(option, proto::REP_ERR_INVALID, "LIST takes no data")
                        .await?;
                    continue;
                }
                match shared.resolver.list(&st.client).await {
                    Ok(exports) => {
                        let mut out = Vec::new();
                        for e in &exports {
                            out.extend(proto::encode_rep_server(&e.name, &e.description));
                        }
                        out.extend(proto::encode_option_reply(option, proto::REP_ACK, &[]));
                        st.reply(&out).await?;
                    }
                    Err(refusal) => st.refuse(option, &refusal).await?,
                }
            }
            proto::OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    st.error(option, proto::REP_ERR_INVALID, "option takes no data")
                        .await?;
                } else if st.extended {
                    st.error(
                        option,
                        proto::REP_ERR_EXT_HEADER_REQD,
                        "extended headers in use",
                    )
                    .await?;
                } else {
                    st.structured = true;
                    st.ack(option).await?;
                }
            }
            proto::OPT_EXTENDED_HEADERS => {
                if !data.is_empty() {
                    st.error(option, proto::REP_ERR_INVALID, "option takes no data")
                        .await?;
                } else {
                    st.extended = true;
                    st.ack(option).await?;
                }
            }
            proto::OPT_FORWARDED => {
                if data.is_empty() {
                    st.forwarded = true;
                    st.ack(option).await?;
                } else {
                    st.error(option, proto::REP_ERR_INVALID, "option takes no data")
                        .await?;
                }
            }
            proto::OPT_LIST_META_CONTEXT | proto::OPT_SET_META_CONTEXT => {
                // The export named may live elsewhere: then the upstream answers from here
                // on. Otherwise (or when it cannot be reached: GO will say so) answered here.
                if (st.structured || st.extended)
                    && let Ok(request) =
                        proto::parse_meta_context_request(&data, config.max_meta_queries)
                    && let Route::There(upstream) =
                        st.route(shared, option, &request.name, &data).await
                {
                    return Ok(Some(st.forward(upstream)));
                }
                st.meta_context(option, &data, config.max_meta_queries)
                    .await?;
            }
            proto::OPT_INFO | proto::OPT_GO => {
                let request = match proto::parse_info_request(&data) {
                    Ok(r) => r,
                    Err(e) => {
                        st.error(option, proto::REP_ERR_INVALID, &e.to_string())
                            .await?;
                        continue;
                    }
                };
                match st.route(shared, option, &request.name, &data).await {
                    Route::Here => {}
                    Route::There(upstream) => return Ok(Some(st.forward(upstream))),
                    Route::Refused(refusal) => {
                        st.refuse(option, &refusal).await?;
                        continue;
                    }
                }
                let Some(export) = st.resolve(shared, option, &request.name).await? else {
                    continue;
                };
                let (size, flags, sizes) = transmission_flags(shared, &export, &st);
                let mut out = proto::encode_info_export(option, size, flags);
                out.extend(proto::encode_info_block_size(
                    option,
                    sizes.minimum,
                    sizes.preferred,
                    sizes.maximum,
                ));
                if request.requests.contains(&proto::INFO_NAME) {
                    out.extend(proto::encode_info_string(
                        option,
                        proto::INFO_NAME,
                        &request.name,
                    ));
                }
                if let Some(description) = &export.description
                    && request.requests.contains(&proto::INFO_DESCRIPTION)
                {
                    out.extend(proto::encode_info_string(
                        option,
                        proto::INFO_DESCRIPTION,
                        description,
                    ));
                }
                out.extend(proto::encode_option_reply(option, proto::REP_ACK, &[]));
                st.reply(&out).await?;
                if option == proto::OPT_GO {
                    return Ok(Some(Negotiated::Session(st.into_session(
                        export,
                        &request.name,
                        size,
                        sizes,
                    ))));
                }
            }
            proto::OPT_EXPORT_NAME => {
                if st.extended {
                    return Err(HandshakeError::Refused(
                        "EXPORT_NAME after EXTENDED_HEADERS",
                    ));
                }
                let name = proto::parse_export_name(&data)?;
                match st.route(shared, option, &name, &data).await {
                    Route::Here => {}
                    Route::There(upstream) => return Ok(Some(st.forward(upstream))),
                    // EXPORT_NAME has no error reply.
                    Route::Refused(_) => {
                        return Err(HandshakeError::Refused(
                            "EXPORT_NAME of an export that cannot be reached",
                        ));
                    }
                }
                let export = match shared.resolver.resolve(&name, &st.client).await {
                    Ok(e) if !e.disconnect.is_cancelled() => e,
                    _ => return Err(HandshakeError::Refused("EXPORT_NAME of a refused export")),
                };
                let (size, flags, sizes) = transmission_flags(shared, &export, &st);
                st.reply(&proto::encode_export_name_reply(size, flags, st.no_zeroes))
                    .await?;
                return Ok(Some(Negotiated::Session(
                    st.into_session(export, &name, size, sizes),
                )));
            }
            _ => {
                st.error(option, proto::REP_ERR_UNSUP, "unsupported option")
                    .await?
            }
        }
    }
}

/// Size, transmission flags and block sizes of an export for this connection.
fn transmission_flags(shared: &Shared, export: &Export, st: &State) -> (u64, u16, BlockSizes) {
    let device = &export.device;
    let mut sizes = device.block_sizes();
    sizes.maximum = sizes.maximum.min(shared.config.max_payload);
    let mut flags = proto::FLAG_HAS_FLAGS
        | proto::FLAG_SEND_FLUSH
        | proto::FLAG_SEND_FUA
        | proto::FLAG_SEND_CACHE;
    if device.read_only() {
        flags |= proto::FLAG_READ_ONLY;
    } else {
        flags |= proto::FLAG_SEND_TRIM | proto::FLAG_SEND_WRITE_ZEROES | proto::FLAG_SEND_FAST_ZERO;
    }
    if device.can_multi_conn() {
        flags |= proto::FLAG_CAN_MULTI_CONN;
    }
    if st.structured || st.extended {
        // Reads are always answered in one content chunk, so DF costs nothing.
        flags |= proto::FLAG_SEND_DF;
    }
    (device.size(), flags, sizes)
}

impl State {
    async fn reply(&mut self, bytes: &[u8]) -> Result<(), HandshakeError> {
        self.stream.write_all(bytes).await?;
        self.stream.flush().await?;
        Ok(())
    }

    async fn ack(&mut self, option: u32) -> Result<(), HandshakeError> {
        self.reply(&proto::encode_option_reply(option, proto::REP_ACK, &[]))
            .await
    }

    async fn error(
        &mut self,
        option: u32,
        error: u32,
        message: &str,
    ) -> Result<(), HandshakeError> {
        self.reply(&proto::encode_option_error(option, error, message))
            .await
    }

    async fn refuse(&mut self, option: u32, refusal: &Refusal) -> Result<(), HandshakeError> {
        match refusal {
            Refusal::Unknown(m) => self.error(option, proto::REP_ERR_UNKNOWN, m).await,
            Refusal::Policy(m) => self.error(option, proto::REP_ERR_POLICY, m).await,
        }
    }

    /// Where the option `option` (with `data`) naming export `name` is answered: asks the
    /// resolver whether the export lives elsewhere and, if so, passes the connection on
    /// (within [`Config::forward_timeout`](crate::Config::forward_timeout)).
    async fn route(&mut self, shared: &Shared, option: u32, name: &str, data: &[u8]) -> Route {
        if let Some((failed, refusal)) = &self.failed_forward
            && failed == name
        {
            return Route::Refused(refusal.clone());
        }
        let refusal = match shared.resolver.upstream(name, &self.client).await {
            Ok(None) => return Route::Here,
            Err(refusal) => refusal,
            Ok(Some(up)) if self.forwarded => Refusal::Unknown(format!(
                "The export is served by {}; this connection was passed on here by another \
                 server, and is not passed on again.",
                up.label
            )),
            Ok(Some(up)) => {
                let replay = Replay {
                    client_flags: self.client_flags,
                    structured: self.structured,
                    extended: self.extended,
                };
                let limit = shared.config.forward_timeout;
                match tokio::time::timeout(limit, forward::connect(&up, replay, option, data)).await
                {
                    Ok(Ok(upstream)) => return Route::There(upstream),
                    Ok(Err(e)) => {
                        tracing::warn!(upstream = %up.address, label = %up.label, error = %e,
                            "cannot pass an NBD connection on");
                        Refusal::Unknown(format!(
                            "The export is served by {}, which cannot be reached now ({e}).",
                            up.label
                        ))
                    }
                    Err(_) => {
                        tracing::warn!(upstream = %up.address, label = %up.label,
                            "passing an NBD connection on timed out");
                        Refusal::Unknown(format!(
                            "The export is served by {}, which did not answer within {} s.",
                            up.label,
                            limit.as_secs_f32()
                        ))
                    }
                }
            }
        };
        self.failed_forward = Some((name.to_string(), refusal.clone()));
        Route::Refused(refusal)
    }

    /// The end of the handshake here: the upstream has the connection from now on.
    fn forward(self, upstream: Box<dyn Stream>) -> Negotiated {
        Negotiated::Forward {
            client: self.stream,
            upstream,
        }
    }

    /// Resolves an export for INFO/GO, answering the refusal itself (`None` then).
    async fn resolve(
        &mut self,
        shared: &Shared,
        option: u32,
        name: &str,
    ) -> Result<Option<Export>, HandshakeError> {
        match shared.resolver.resolve(name, &self.client).await {
            Ok(export) if export.disconnect.is_cancelled() => {
                self.error(
                    option,
                    proto::REP_ERR_POLICY,
                    "access to this export has ended",
                )
                .await?;
                Ok(None)
            }
            Ok(export) => Ok(Some(export)),
            Err(refusal) => {
                self.refuse(option, &refusal).await?;
                Ok(None)
            }
        }
    }

    async fn starttls(&mut self, data: &[u8]) -> Result<(), HandshakeError> {
        let option = proto::OPT_STARTTLS;
        let Some(config) = self.tls_config.clone() else {
            return self
                .error(
                    option,
                    proto::REP_ERR_POLICY,
                    "TLS is not offered on this listener",
                )
                .await;
        };
        if self.client.tls {
            return self
                .error(option, proto::REP_ERR_INVALID, "TLS is already on")
                .await;
        }
        if !data.is_empty() {
            return self
                .error(option, proto::REP_ERR_INVALID, "STARTTLS takes no data")
                .await;
        }
        self.ack(option).await?;
        // Swap the plain stream out; a failed TLS handshake ends the connection.
        let plain = std::mem::replace(&mut self.stream, Transport::Closed);
        let tls = tokio_rustls::TlsAcceptor::from(config)
            .accept(plain)
            .await?;
        self.client.client_certificates = tls
            .get_ref()
            .1
            .peer_certificates()
            .map(|certs| certs.iter().map(|c| c.clone().into_owned()).collect())
            .unwrap_or_default();
        self.client.tls = true;
        self.stream = Transport::Other(Box::new(tls));
        // Nothing negotiated before STARTTLS survives it.
        self.structured = false;
        self.extended = false;
        self.meta_for = None;
        self.forwarded = false;
        self.failed_forward = None;
        Ok(())
    }

    async fn meta_context(
        &mut self,
        option: u32,
        data: &[u8],
        max_queries: u32,
    ) -> Result<(), HandshakeError> {
        let set = option == proto::OPT_SET_META_CONTEXT;
        if set {
            // A SET replaces the previous selection even when it fails.
            self.meta_for = None;
        }
        if !self.structured && !self.extended {
            return self
                .error(
                    option,
                    proto::REP_ERR_INVALID,
                    "negotiate structured replies first",
                )
                .await;
        }
        let request = match proto::parse_meta_context_request(data, max_queries) {
            Ok(r) => r,
            Err(proto::ProtoError::TooManyItems(_)) => {
                return self
                    .error(option, proto::REP_ERR_TOO_BIG, "too many queries")
                    .await;
            }
            Err(e) => {
                return self
                    .error(option, proto::REP_ERR_INVALID, &e.to_string())
                    .await;
            }
        };
        let matches = |q: &str| q == proto::BASE_ALLOCATION || (!set && q == "base:");
        let selected = if request.queries.is_empty() {
            // An empty LIST means "everything"; an empty SET selects nothing.
            !set
        } else {
            request.queries.iter().any(|q| matches(q))
        };
        let mut out = Vec::new();
        if selected {
            let id = if set { BASE_ALLOCATION_ID } else { 0 };
            out.extend(proto::encode_meta_context(
                option,
                id,
                proto::BASE_ALLOCATION,
            ));
            if set {
                self.meta_for = Some(request.name);
            }
        }
        out.extend(proto::encode_option_reply(option, proto::REP_ACK, &[]));
        self.reply(&out).await
    }

    fn into_session(self, export: Export, name: &str, size: u64, sizes: BlockSizes) -> Session {
        let style = if self.extended {
            ReplyStyle::Extended
        } else if self.structured {
            ReplyStyle::Structured
        } else {
            ReplyStyle::Simple
        };
        Session {
            stream: self.stream,
            meta_context: style != ReplyStyle::Simple && self.meta_for.as_deref() == Some(name),
            export,
            style,
            extended: self.extended,
            size,
            sizes,
        }
    }
}
