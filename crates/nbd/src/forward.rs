//! Passing a connection on to the server an export lives on
//! ([`ExportResolver::upstream`](crate::ExportResolver::upstream)).
//!
//! By the time a client names an export, this server has greeted it, read its flags, maybe run
//! TLS and answered export-independent options. The upstream must be in the same state before it
//! sees the option naming the export: [`connect`] plays the client side of the handshake (the
//! greeting, the client's own flags, `STARTTLS`, the [`proto::OPT_FORWARDED`] mark, structured
//! replies, extended headers), checking every answer, then sends that option as the client sent
//! it. From then on [`splice`] copies bytes both ways: the upstream answers the option, and the
//! rest of the handshake and the whole transmission are between the client and the upstream.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::export::Upstream;
use crate::proto;
use crate::transport::{Stream, Transport};

/// What the client negotiated before it named the export: replayed to the upstream.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Replay {
    /// The client's flags, as it sent them (`NO_ZEROES` shapes the `EXPORT_NAME` answer the
    /// upstream sends it).
    pub(crate) client_flags: u32,
    /// `NBD_OPT_STRUCTURED_REPLY` was acknowledged.
    pub(crate) structured: bool,
    /// `NBD_OPT_EXTENDED_HEADERS` was acknowledged.
    pub(crate) extended: bool,
}

/// Why a connection could not be passed on (the text reaches the client: no secrets).
#[derive(Debug, thiserror::Error)]
pub(crate) enum ForwardError {
    #[error("cannot connect: {0}")]
    Connect(std::io::Error),
    #[error("TLS failed: {0}")]
    Tls(std::io::Error),
    #[error("the connection failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("unexpected answer: {0}")]
    Protocol(String),
    #[error("it refused {option}: {message}")]
    Refused {
        option: &'static str,
        message: String,
    },
}

impl From<proto::ProtoError> for ForwardError {
    fn from(e: proto::ProtoError) -> Self {
        Self::Protocol(e.to_string())
    }
}

/// Longest option reply data read from an upstream while replaying (its error messages).
const MAX_REPLY_DATA: u32 = 64 * 1024;

/// Buffer of each direction of a spliced connection: large enough for big reads and writes to
/// go through in few system calls.
const SPLICE_BUFFER: usize = 256 * 1024;

/// Connects to `upstream`, brings it to the state `replay` describes (marked as forwarded) and
/// sends it `option` with `data`. The caller bounds the time.
pub(crate) async fn connect(
    upstream: &Upstream,
    replay: Replay,
    option: u32,
    data: &[u8],
) -> Result<Box<dyn Stream>, ForwardError> {
    let tcp = TcpStream::connect(&upstream.address)
        .await
        .map_err(ForwardError::Connect)?;
    // Requests and replies are written whole; Nagle would only delay them.
    let _ = tcp.set_nodelay(true);
    let mut s: Box<dyn Stream> = Box::new(tcp);
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).await?;
    let offered = proto::parse_greeting(&greeting)?;
    let mut needed = 0;
    if replay.client_flags & proto::FLAG_C_FIXED_NEWSTYLE != 0 {
        needed |= proto::FLAG_FIXED_NEWSTYLE;
    }
    if replay.client_flags & proto::FLAG_C_NO_ZEROES != 0 {
        needed |= proto::FLAG_NO_ZEROES;
    }
    if offered & needed != needed {
        return Err(ForwardError::Protocol(format!(
            "it offers handshake flags {offered:#x}, the client asked for {needed:#x}"
        )));
    }
    s.write_all(&replay.client_flags.to_be_bytes()).await?;
    if let Some(tls) = &upstream.tls {
        expect_ack(&mut s, proto::OPT_STARTTLS, "STARTTLS").await?;
        let connector = tokio_rustls::TlsConnector::from(tls.config.clone());
        let stream = connector
            .connect(tls.server_name.clone(), s)
            .await
            .map_err(ForwardError::Tls)?;
        s = Box::new(stream);
    }
    // The mark comes first (after TLS, which resets everything before it): the upstream
    // never passes this connection on again. A server that is not kagi-nbd does not know it
    // (ERR_UNSUP) and forwards nothing anyway.
    match exchange(&mut s, proto::OPT_FORWARDED).await? {
        (proto::REP_ACK, _) | (proto::REP_ERR_UNSUP, _) => {}
        (reply, message) => return Err(refused("the forwarding mark", reply, message)),
    }
    if replay.structured {
        expect_ack(&mut s, proto::OPT_STRUCTURED_REPLY, "structured replies").await?;
    }
    if replay.extended {
        expect_ack(&mut s, proto::OPT_EXTENDED_HEADERS, "extended headers").await?;
    }
    s.write_all(&proto::encode_option(option, data)).await?;
    s.flush().await?;
    Ok(s)
}

/// Sends `option` (no data) and reads its one reply: (reply type, its data as text).
async fn exchange(s: &mut Box<dyn Stream>, option: u32) -> Result<(u32, String), ForwardError> {
    s.write_all(&proto::encode_option(option, &[])).await?;
    s.flush().await?;
    let mut header = [0u8; proto::OPTION_REPLY_HEADER_LEN];
    s.read_exact(&mut header).await?;
    let header = proto::parse_option_reply_header(&header)?;
    if header.option != option {
        return Err(ForwardError::Protocol(format!(
            "a reply to option {} when {option} was sent",
            header.option
        )));
    }
    if header.length > MAX_REPLY_DATA {
        return Err(ForwardError::Protocol(format!(
            "a reply of {} bytes",
            header.length
        )));
    }
    let mut data = vec![0u8; header.length as usize];
    s.read_exact(&mut data).await?;
    Ok((
        header.reply_type,
        String::from_utf8_lossy(&data).into_owned(),
    ))
}

/// Sends `option` (no data) and requires a bare `ACK`.
async fn expect_ack(
    s: &mut Box<dyn Stream>,
    option: u32,
    what: &'static str,
) -> Result<(), ForwardError> {
    match exchange(s, option).await? {
        (proto::REP_ACK, _) => Ok(()),
        (reply, message) => Err(refused(what, reply, message)),
    }
}

fn refused(option: &'static str, reply: u32, message: String) -> ForwardError {
    if reply & proto::REP_FLAG_ERROR == 0 {
        return ForwardError::Protocol(format!("reply type {reply} to {option}"));
    }
    ForwardError::Refused { option, message }
}

/// Copies bytes both ways between the client and the upstream until both sides are done, one
/// fails, or `shutdown` is cancelled (the connection is then cut: what is in flight is the
/// upstream's to answer, and the client sees the end of its connection).
pub(crate) async fn splice(
    mut client: Transport,
    mut upstream: Box<dyn Stream>,
    shutdown: &CancellationToken,
) {
    tokio::select! {
        _ = shutdown.cancelled() => {}
        r = tokio::io::copy_bidirectional_with_sizes(
            &mut client,
            &mut upstream,
            SPLICE_BUFFER,
            SPLICE_BUFFER,
        ) => match r {
            Ok((up, down)) => tracing::debug!(up, down, "forwarded NBD connection ended"),
            Err(e) => tracing::debug!(error = %e, "forwarded NBD connection failed"),
        },
    }
}
