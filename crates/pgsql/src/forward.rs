//! Connections for a server that another front end serves ([`Upstream`]): after TLS and the
//! StartupMessage, the listener opens a TLS connection of its own to that front end, sends it
//! the client's StartupMessage marked with [`FORWARDED_BY`], and from then on copies bytes both
//! ways. Authentication, the session and its errors are the upstream's, end to end; this side
//! only keeps the BackendKeyData it sees pass, so a CancelRequest for a forwarded session that
//! reaches this listener is sent on to the upstream.

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_util::sync::CancellationToken;

use crate::error::{PgError, sqlstate};
use crate::wire;

/// The startup parameter a forwarded StartupMessage carries: the name of the front end that
/// forwarded it. The receiving listener removes it before anything else reads the parameters;
/// it grants nothing (the connection authenticates as any other) and only stops a connection
/// from being forwarded a second time.
pub const FORWARDED_BY: &str = "kagi_forwarded_by";

/// How errors name an upstream to a client, which has not authenticated yet.
pub const UPSTREAM_PHRASE: &str = "the node serving this server";

/// Another front end serving a server's databases: where to reach it and how to trust it.
/// Returned by [`crate::Gateway::upstream`].
#[derive(Clone)]
pub struct Upstream {
    /// How the logs name it, a phrase such as `the node 'n2'`. The client is told only of
    /// [`UPSTREAM_PHRASE`]: it has not authenticated yet, and learns no node's name or
    /// address.
    pub name: String,
    /// Its PostgreSQL listener, `HOST:PORT`.
    pub address: String,
    /// The TLS server name to send (SNI) and to verify its certificate for: the host name
    /// that picks the server there (`{server}.{dns-suffix}`).
    pub tls_name: String,
    /// The client TLS configuration: what it trusts (see [`Upstream::trusting`]).
    pub tls: Arc<rustls::ClientConfig>,
    /// The value of [`FORWARDED_BY`] sent to it: this front end's name.
    pub forwarded_by: String,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("name", &self.name)
            .field("address", &self.address)
            .field("tls_name", &self.tls_name)
            .field("forwarded_by", &self.forwarded_by)
            .finish_non_exhaustive()
    }
}

impl Upstream {
    /// A client TLS configuration (TLS 1.2 and 1.3, aws-lc) trusting the certificates of the
    /// PEM bundle `ca_pem` only.
    pub fn trusting(ca_pem: &[u8]) -> Result<Arc<rustls::ClientConfig>, PgError> {
        let bad = |what: String| {
            PgError::fatal(
                sqlstate::INTERNAL_ERROR,
                format!("cannot trust the upstream's CA: {what}"),
            )
        };
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(ca_pem) {
            roots
                .add(cert.map_err(|e| bad(e.to_string()))?)
                .map_err(|e| bad(e.to_string()))?;
        }
        if roots.is_empty() {
            return Err(bad("no certificate".into()));
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
        Ok(Arc::new(config))
    }
}

/// Why a TLS connection to an upstream failed: for the client, and (`why`) for the log.
struct ConnectFailure {
    /// What the client is told after [`UPSTREAM_PHRASE`]; None when it cannot be reached
    /// (retry later), else a configuration fault (retrying does not help).
    misconfigured: Option<&'static str>,
    /// The reason, for the log only.
    why: String,
}

/// A TLS connection to `up`: TCP, SSLRequest, handshake, all within `timeout`. Errors are
/// FATAL 57P03 (retry later), or 08006 when it speaks no TLS or fails the handshake (a
/// configuration fault, retrying does not help); they name the upstream and say why in the
/// log only (see [`Upstream::name`]).
pub(crate) async fn connect(
    up: &Upstream,
    timeout: Duration,
) -> Result<TlsStream<TcpStream>, PgError> {
    open_tls(up, timeout).await.map_err(|f| match f.misconfigured {
        None => {
            tracing::warn!(upstream = %up.name, address = %up.address, reason = %f.why, "cannot reach the upstream");
            PgError::unavailable(format!("{UPSTREAM_PHRASE} cannot be reached now"))
                .with_hint("retry the connection")
        }
        Some(what) => {
            tracing::error!(upstream = %up.name, address = %up.address, reason = %f.why, "cannot connect to the upstream");
            PgError::fatal(
                sqlstate::CONNECTION_FAILURE,
                format!("{UPSTREAM_PHRASE} {what}"),
            )
        }
    })
}

/// [`connect`] without its logging.
async fn open_tls(
    up: &Upstream,
    timeout: Duration,
) -> Result<TlsStream<TcpStream>, ConnectFailure> {
    let unreachable = |why: String| ConnectFailure {
        misconfigured: None,
        why,
    };
    let misconfigured = |what: &'static str, why: String| ConnectFailure {
        misconfigured: Some(what),
        why,
    };
    let attempt = async {
        let mut tcp = TcpStream::connect(&up.address)
            .await
            .map_err(|e| unreachable(format!("{}: {e}", up.address)))?;
        let _ = tcp.set_nodelay(true);
        let mut req = 8u32.to_be_bytes().to_vec();
        req.extend_from_slice(&wire::SSL_REQUEST.to_be_bytes());
        tcp.write_all(&req)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let mut answer = [0u8; 1];
        tcp.read_exact(&mut answer)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        if answer[0] != b'S' {
            return Err(misconfigured(
                "does not accept TLS connections",
                "no TLS".into(),
            ));
        }
        let name = ServerName::try_from(up.tls_name.clone()).map_err(|_| {
            misconfigured(
                "has no valid TLS name",
                format!("invalid TLS name \"{}\"", up.tls_name),
            )
        })?;
        tokio_rustls::TlsConnector::from(Arc::clone(&up.tls))
            .connect(name, tcp)
            .await
            .map_err(|e| misconfigured("failed the TLS handshake", e.to_string()))
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(r) => r,
        Err(_) => Err(unreachable(format!(
            "{}: no answer within {} s",
            up.address,
            timeout.as_secs_f32()
        ))),
    }
}

/// The StartupMessage to send upstream: the client's (`body`, after its length word, as
/// parsed) with [`FORWARDED_BY`] `by` appended.
pub(crate) fn marked_startup(body: &[u8], by: &str) -> Vec<u8> {
    // A parsed StartupMessage ends with the NUL closing its parameter list.
    let params = body.strip_suffix(&[0]).unwrap_or(body);
    let mut out = vec![0u8; 4];
    out.extend_from_slice(params);
    out.extend_from_slice(FORWARDED_BY.as_bytes());
    out.push(0);
    out.extend(by.bytes().filter(|&b| b != 0));
    out.extend_from_slice(&[0, 0]);
    let len = u32::try_from(out.len()).unwrap_or(u32::MAX);
    out[..4].copy_from_slice(&len.to_be_bytes());
    out
}

/// Sends a CancelRequest (`pid`, `key`) to `up`, over TLS as a session's own connection:
/// with [`wire::PASSED_CANCEL_REQUEST`]'s code when `passed_on` (`up` must not pass it on
/// again), else CancelRequest's. Why it could not, for the caller to log (never the key).
pub(crate) async fn cancel(
    up: &Upstream,
    pid: u32,
    key: u32,
    passed_on: bool,
    timeout: Duration,
) -> Result<(), String> {
    let mut tls = open_tls(up, timeout).await.map_err(|f| f.why)?;
    let code = if passed_on {
        wire::PASSED_CANCEL_REQUEST
    } else {
        wire::CANCEL_REQUEST
    };
    let mut req = 16u32.to_be_bytes().to_vec();
    req.extend_from_slice(&code.to_be_bytes());
    req.extend_from_slice(&pid.to_be_bytes());
    req.extend_from_slice(&key.to_be_bytes());
    let sent = async {
        tls.write_all(&req).await?;
        tls.flush().await
    };
    tokio::time::timeout(timeout, sent)
        .await
        .map_err(|_| format!("no answer within {} s", timeout.as_secs_f32()))?
        .map_err(|e| e.to_string())?;
    // The upstream closes when it has served it (and sends nothing: read a little at most).
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(timeout, (&mut tls).take(1024).read_to_end(&mut rest)).await;
    Ok(())
}

/// Spliced sessions by backend process id: (secret key, upstream) — several, should two
/// upstreams have handed out one process id.
type KeysByPid = HashMap<u32, Vec<(u32, Arc<Upstream>)>>;

/// The BackendKeyData of sessions spliced to an upstream, for their CancelRequests.
#[derive(Default)]
pub(crate) struct ForwardedKeys {
    by_pid: Mutex<KeysByPid>,
}

impl ForwardedKeys {
    fn lock(&self) -> std::sync::MutexGuard<'_, KeysByPid> {
        self.by_pid
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn register(&self, pid: u32, key: u32, up: Arc<Upstream>) {
        self.lock().entry(pid).or_default().push((key, up));
    }

    fn unregister(&self, pid: u32, key: u32) {
        let mut map = self.lock();
        if let Some(v) = map.get_mut(&pid) {
            v.retain(|(k, _)| *k != key);
            if v.is_empty() {
                map.remove(&pid);
            }
        }
    }

    /// The upstream of the spliced session with this BackendKeyData (the key compared in
    /// constant time, as the listener's own sessions').
    pub(crate) fn find(&self, pid: u32, key: u32) -> Option<Arc<Upstream>> {
        self.lock().get(&pid).and_then(|v| {
            v.iter()
                .find(|(k, _)| {
                    aws_lc_rs::constant_time::verify_slices_are_equal(
                        &k.to_be_bytes(),
                        &key.to_be_bytes(),
                    )
                    .is_ok()
                })
                .map(|(_, up)| Arc::clone(up))
        })
    }
}

/// Copies bytes between `client` and `upstream` until either side closes or `shutdown`.
pub(crate) async fn splice<C>(
    mut client: C,
    upstream: TlsStream<TcpStream>,
    up: Arc<Upstream>,
    keys: Arc<ForwardedKeys>,
    shutdown: CancellationToken,
) where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let mut upstream = Sniff {
        inner: upstream,
        scan: Scan::default(),
        seen: None,
        up,
        keys,
    };
    tokio::select! {
        r = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {
            if let Err(e) = r {
                tracing::debug!(upstream = %upstream.up.name, error = %e, "forwarded connection ended");
            }
        }
        _ = shutdown.cancelled() => {}
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), client.shutdown()).await;
}

/// Where the scan of the upstream's messages is: it reads their frames until the
/// BackendKeyData (or the first ReadyForQuery or ErrorResponse), then stops looking.
enum Scan {
    /// Reading a message's type and length word.
    Head { buf: [u8; 5], have: usize },
    /// Inside a message's body.
    Body { tag: u8, left: usize, data: Vec<u8> },
    /// Nothing more to look for.
    Done,
}

impl Default for Scan {
    fn default() -> Self {
        Scan::Head {
            buf: [0; 5],
            have: 0,
        }
    }
}

impl Scan {
    /// Advances over `bytes`; the BackendKeyData (pid, key) when it completes.
    fn feed(&mut self, mut bytes: &[u8]) -> Option<(u32, u32)> {
        while !bytes.is_empty() {
            match self {
                Scan::Done => return None,
                Scan::Head { buf, have } => {
                    let n = (5 - *have).min(bytes.len());
                    buf[*have..*have + n].copy_from_slice(&bytes[..n]);
                    *have += n;
                    bytes = &bytes[n..];
                    if *have < 5 {
                        continue;
                    }
                    let tag = buf[0];
                    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
                    if len < 4 || (tag == b'K' && len != 12) {
                        *self = Scan::Done;
                        return None;
                    }
                    *self = Scan::Body {
                        tag,
                        left: len - 4,
                        data: Vec::new(),
                    };
                }
                Scan::Body { tag, left, data } => {
                    let n = (*left).min(bytes.len());
                    if *tag == b'K' {
                        data.extend_from_slice(&bytes[..n]);
                    }
                    *left -= n;
                    bytes = &bytes[n..];
                }
            }
            if let Scan::Body { tag, left: 0, data } = self {
                match *tag {
                    b'K' => {
                        let pid = u32::from_be_bytes([data[0], data[1], data[2], data[3]]);
                        let key = u32::from_be_bytes([data[4], data[5], data[6], data[7]]);
                        *self = Scan::Done;
                        return Some((pid, key));
                    }
                    b'Z' | b'E' => *self = Scan::Done,
                    _ => *self = Scan::default(),
                }
            }
        }
        None
    }
}

/// The upstream stream, noting the BackendKeyData that passes (registered in `keys` while
/// the splice lasts).
struct Sniff<S> {
    inner: S,
    scan: Scan,
    seen: Option<(u32, u32)>,
    up: Arc<Upstream>,
    keys: Arc<ForwardedKeys>,
}

impl<S> Drop for Sniff<S> {
    fn drop(&mut self) {
        if let Some((pid, key)) = self.seen {
            self.keys.unregister(pid, key);
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Sniff<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r
            && let Some((pid, key)) = this.scan.feed(&buf.filled()[before..])
        {
            this.keys.register(pid, key, Arc::clone(&this.up));
            this.seen = Some((pid, key));
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Sniff<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![tag];
        m.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    #[test]
    fn the_backend_key_is_found_across_reads_of_any_size() {
        let mut stream = frame(b'R', &[0, 0, 0, 12, 1, 2, 3]);
        stream.extend(frame(b'S', b"client_encoding\0UTF8\0"));
        let mut k = 77u32.to_be_bytes().to_vec();
        k.extend_from_slice(&0xdead_beefu32.to_be_bytes());
        stream.extend(frame(b'K', &k));
        stream.extend(frame(b'Z', b"I"));
        for chunk in 1..stream.len() {
            let mut scan = Scan::default();
            let found: Vec<_> = stream.chunks(chunk).filter_map(|c| scan.feed(c)).collect();
            assert_eq!(found, vec![(77, 0xdead_beef)], "chunks of {chunk}");
        }
    }

    #[test]
    fn an_error_before_the_key_ends_the_scan() {
        let mut stream = frame(b'E', b"SFATAL\0C28P01\0\0");
        stream.extend(frame(b'K', &[0; 8]));
        let mut scan = Scan::default();
        assert_eq!(scan.feed(&stream), None);
        assert!(matches!(scan, Scan::Done));
    }

    #[test]
    fn the_marker_is_appended_to_the_parameters() {
        let mut body = 196_608u32.to_be_bytes().to_vec();
        body.extend_from_slice(b"user\0u\0database\0d\0\0");
        let marked = marked_startup(&body, "n\0ode");
        assert_eq!(
            u32::from_be_bytes(marked[..4].try_into().unwrap()) as usize,
            marked.len()
        );
        match wire::parse_startup(&marked[4..]).unwrap() {
            wire::Startup::Startup { params, .. } => assert_eq!(
                params,
                vec![
                    ("user".into(), "u".into()),
                    ("database".into(), "d".into()),
                    (FORWARDED_BY.into(), "node".into()),
                ]
            ),
            other => panic!("{other:?}"),
        }
    }
}
