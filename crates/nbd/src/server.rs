//! Listeners, connections and shutdown.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::export::ExportResolver;
use crate::forward;
use crate::handshake::{self, Negotiated};
pub use crate::shared::Config;
use crate::shared::Shared;
use crate::transmission;
use crate::transport::Transport;

/// Errors of starting a listener.
#[derive(Debug, Error)]
pub enum ServerError {
    /// Binding or preparing the socket failed.
    #[error("cannot listen on {what}: {source}")]
    Listen {
        /// The address or path.
        what: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The configuration is unusable.
    #[error("invalid NBD server configuration: {0}")]
    Config(String),
    /// The server is shutting down.
    #[error("the NBD server is shut down")]
    Shutdown,
}

/// An NBD server: serves exports found by an [`ExportResolver`] on any number of Unix and TCP
/// listeners. Cloning gives another handle to the same server.
#[derive(Clone)]
pub struct NbdServer {
    shared: Arc<Shared>,
}

/// Counts a live connection while it exists.
struct ConnectionGuard(Arc<Shared>);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::SeqCst);
    }
}

impl NbdServer {
    /// A server resolving exports with `resolver`.
    pub fn new(resolver: Arc<dyn ExportResolver>, config: Config) -> Result<Self, ServerError> {
        if config.max_payload < 4096 || config.max_in_flight == 0 {
            return Err(ServerError::Config(
                "max_payload must be at least 4096 and max_in_flight at least 1".into(),
            ));
        }
        if config.max_in_flight_bytes < config.max_payload as usize {
            return Err(ServerError::Config(
                "max_in_flight_bytes must be at least max_payload".into(),
            ));
        }
        Ok(Self {
            shared: Arc::new(Shared {
                resolver,
                config,
                shutdown: CancellationToken::new(),
                tracker: TaskTracker::new(),
                connections: AtomicUsize::new(0),
            }),
        })
    }

    /// Listens on a Unix socket at `path` (no TLS; protect the directory). A stale socket file
    /// at `path` is replaced; the file is removed when the server shuts down.
    pub async fn listen_unix(&self, path: impl AsRef<Path>) -> Result<(), ServerError> {
        self.check_running()?;
        let path = path.as_ref().to_path_buf();
        let err = |source| ServerError::Listen {
            what: path.display().to_string(),
            source,
        };
        if let Ok(meta) = std::fs::symlink_metadata(&path) {
            use std::os::unix::fs::FileTypeExt;
            if meta.file_type().is_socket() {
                std::fs::remove_file(&path).map_err(err)?;
            }
        }
        let listener = UnixListener::bind(&path).map_err(err)?;
        let server = self.clone();
        self.shared.tracker.spawn(async move {
            server.accept_unix(listener, path).await;
        });
        Ok(())
    }

    async fn accept_unix(&self, listener: UnixListener, path: PathBuf) {
        loop {
            let accepted = tokio::select! {
                _ = self.shared.shutdown.cancelled() => break,
                accepted = listener.accept() => accepted,
            };
            match accepted {
                Ok((stream, _)) => self.spawn(Transport::Unix(stream), None, None),
                Err(e) => accept_failed(e).await,
            }
        }
        let _ = std::fs::remove_file(&path);
    }

    /// Listens on TCP at `addr` and returns the bound address (port 0 picks one). With `tls`,
    /// every client must negotiate TLS (`NBD_OPT_STARTTLS`) before anything else; the rustls
    /// config decides whether client certificates are asked for.
    pub async fn listen_tcp(
        &self,
        addr: SocketAddr,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> Result<SocketAddr, ServerError> {
        self.check_running()?;
        let err = |source| ServerError::Listen {
            what: addr.to_string(),
            source,
        };
        let listener = TcpListener::bind(addr).await.map_err(err)?;
        let local = listener.local_addr().map_err(err)?;
        let server = self.clone();
        self.shared.tracker.spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = server.shared.shutdown.cancelled() => break,
                    accepted = listener.accept() => accepted,
                };
                match accepted {
                    Ok((stream, peer)) => {
                        // Replies are written whole; Nagle would only delay them.
                        let _ = stream.set_nodelay(true);
                        server.spawn(Transport::Tcp(stream), Some(peer), tls.clone());
                    }
                    Err(e) => accept_failed(e).await,
                }
            }
        });
        Ok(local)
    }

    /// Serves one already accepted connection (for callers with their own listener). With
    /// `tls`, the client must negotiate TLS first.
    pub fn serve<S>(
        &self,
        stream: S,
        peer: Option<SocketAddr>,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        self.spawn(Transport::Other(Box::new(stream)), peer, tls);
    }

    fn spawn(
        &self,
        stream: Transport,
        peer: Option<SocketAddr>,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) {
        if self.shared.shutdown.is_cancelled() {
            return;
        }
        self.shared.connections.fetch_add(1, Ordering::SeqCst);
        let guard = ConnectionGuard(self.shared.clone());
        let shared = self.shared.clone();
        self.shared.tracker.spawn(async move {
            let _guard = guard;
            let negotiated = tokio::select! {
                _ = shared.shutdown.cancelled() => return,
                r = tokio::time::timeout(
                    shared.config.handshake_timeout,
                    handshake::negotiate(&shared, stream, peer, tls),
                ) => r,
            };
            match negotiated {
                Ok(Ok(Some(Negotiated::Session(session)))) => {
                    transmission::run(&shared, session).await
                }
                Ok(Ok(Some(Negotiated::Forward { client, upstream }))) => {
                    forward::splice(client, upstream, &shared.shutdown).await
                }
                Ok(Ok(None)) => {}
                Ok(Err(e)) => tracing::debug!(error = %e, "NBD handshake ended"),
                Err(_) => tracing::debug!("NBD handshake timed out"),
            }
        });
    }

    /// Connections currently open (in handshake or transmission).
    pub fn connection_count(&self) -> usize {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// Stops accepting, ends every connection (in-flight requests are answered first, within
    /// [`Config::drain_timeout`]) and waits until all are closed. Idempotent.
    pub async fn shutdown(&self) {
        self.shared.shutdown.cancel();
        self.shared.tracker.close();
        self.shared.tracker.wait().await;
    }

    fn check_running(&self) -> Result<(), ServerError> {
        if self.shared.shutdown.is_cancelled() {
            Err(ServerError::Shutdown)
        } else {
            Ok(())
        }
    }
}

/// Accept errors are usually transient (out of file descriptors): wait a little and go on.
async fn accept_failed(e: std::io::Error) {
    tracing::warn!(error = %e, "NBD accept failed");
    tokio::time::sleep(Duration::from_millis(100)).await;
}
