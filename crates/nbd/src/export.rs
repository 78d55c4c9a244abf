//! The seam that decides which export a client gets: [`ExportResolver`].

use std::net::SocketAddr;
use std::sync::Arc;

use async_trait::async_trait;
use rustls::pki_types::CertificateDer;
use tokio_util::sync::CancellationToken;

use crate::device::BlockDevice;

/// Who is asking for an export.
#[derive(Debug, Clone)]
pub struct ClientInfo {
    /// The connection runs TLS (negotiated with `NBD_OPT_STARTTLS`).
    pub tls: bool,
    /// The TLS client certificate chain, end-entity first (empty without TLS or without a
    /// client certificate; present only when the rustls config asked for one).
    pub client_certificates: Vec<CertificateDer<'static>>,
    /// The peer's TCP address (`None` on a Unix socket).
    pub peer: Option<SocketAddr>,
}

/// An export the resolver grants.
#[derive(Clone)]
pub struct Export {
    /// The device served.
    pub device: Arc<dyn BlockDevice>,
    /// A description for `NBD_INFO_DESCRIPTION` and `NBD_OPT_LIST`.
    pub description: Option<String>,
    /// Cancelling this token disconnects every connection using this export (in-flight requests
    /// are answered first, for a bounded time) and refuses new ones that got this token. Give
    /// each access grant its own token (or a child token) and keep a clone to revoke it.
    pub disconnect: CancellationToken,
    /// When given, counts the requests of the connections using this export from the moment
    /// one is read until its reply is sent (including those queued behind an overlapping
    /// request): whoever cancels `disconnect` can wait for it to reach zero before it flushes.
    pub requests: Option<Arc<tokio::sync::watch::Sender<usize>>>,
}

impl Export {
    /// An export of `device` with no description and a fresh token.
    pub fn new(device: Arc<dyn BlockDevice>) -> Self {
        Self {
            device,
            description: None,
            disconnect: CancellationToken::new(),
            requests: None,
        }
    }
}

impl std::fmt::Debug for Export {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Export")
            .field("size", &self.device.size())
            .field("description", &self.description)
            .finish_non_exhaustive()
    }
}

/// Why the resolver refuses an export. The message reaches the client (`NBD_OPT_GO` error
/// text), so it must not contain secrets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// No such export (`NBD_REP_ERR_UNKNOWN`).
    Unknown(String),
    /// The export exists but this client may not have it now (`NBD_REP_ERR_POLICY`).
    Policy(String),
}

/// One entry of `NBD_OPT_LIST`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportListing {
    /// The export name as a client would pass it.
    pub name: String,
    /// A description (may be empty).
    pub description: String,
}

/// Another NBD server that serves an export this one does not (see
/// [`ExportResolver::upstream`]): the connection is passed on to it.
#[derive(Clone)]
pub struct Upstream {
    /// Its TCP endpoint, `HOST:PORT` (resolved when a connection is forwarded).
    pub address: String,
    /// TLS to it (`NBD_OPT_STARTTLS`, the certificate verified by this client configuration
    /// for `server_name`); `None` speaks in the clear (export names are secrets: only where
    /// the network is private).
    pub tls: Option<UpstreamTls>,
    /// Who it is, for the messages clients get when it cannot be reached (`the node 'x'`).
    pub label: String,
}

/// The TLS side of an [`Upstream`].
#[derive(Clone)]
pub struct UpstreamTls {
    /// The client configuration (its roots decide which server certificates are trusted).
    pub config: Arc<rustls::ClientConfig>,
    /// The name the upstream's certificate must carry (sent as SNI).
    pub server_name: rustls::pki_types::ServerName<'static>,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("address", &self.address)
            .field("tls", &self.tls.as_ref().map(|t| &t.server_name))
            .field("label", &self.label)
            .finish()
    }
}

/// Maps the export name a client asks for to an export. Called for `NBD_OPT_INFO`,
/// `NBD_OPT_GO` and `NBD_OPT_EXPORT_NAME`; it may be called several times per connection.
#[async_trait]
pub trait ExportResolver: Send + Sync + 'static {
    /// The export named `name` for this client, or a refusal.
    async fn resolve(&self, name: &str, client: &ClientInfo) -> Result<Export, Refusal>;

    /// Whether the export `name` is served by another server, asked before anything else
    /// when a client names an export (`NBD_OPT_INFO`, `NBD_OPT_GO`, `NBD_OPT_EXPORT_NAME`,
    /// `NBD_OPT_LIST_META_CONTEXT`, `NBD_OPT_SET_META_CONTEXT`). `Ok(Some(upstream))`: the
    /// connection is passed on to `upstream` (the handshake so far replayed, that option sent
    /// and from then on every byte copied both ways; docs/NBD.md, "Forwarding"), never twice
    /// (a connection that arrived forwarded is refused instead). `Ok(None)` (the default):
    /// served here by [`resolve`](Self::resolve). A refusal answers the option that named the
    /// export (`NBD_OPT_INFO`/`GO`; the meta context options are then answered here, and
    /// `EXPORT_NAME` is a disconnect). Should be cheap: it may be asked several times per
    /// connection.
    async fn upstream(&self, name: &str, client: &ClientInfo) -> Result<Option<Upstream>, Refusal> {
        let _ = (name, client);
        Ok(None)
    }

    /// Exports to show for `NBD_OPT_LIST`. The default lists none (an empty list is a valid
    /// answer; a refusal answers `NBD_OPT_LIST` with that error).
    async fn list(&self, client: &ClientInfo) -> Result<Vec<ExportListing>, Refusal> {
        let _ = client;
        Ok(Vec::new())
    }
}
