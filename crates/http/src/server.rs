//! Listeners, TLS handshakes and host routing.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, header};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use kagi_vault::Platform;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::Services;
use crate::context::RemoteAddr;
use crate::tls::SniResolver;

/// A failure to start serving.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Binding a listener failed.
    #[error("cannot listen on {0}: {1}")]
    Bind(SocketAddr, std::io::Error),
    /// TLS configuration failed.
    #[error("tls: {0}")]
    Tls(String),
}

/// Serves HTTPS on every address until the future is dropped, handing the requests of the
/// storage services to `services` (whose providers, as registered when serving starts, decide
/// which resource types vault firewalls trust). Every request but `GET /healthz` is recorded in `audit`
/// before it is answered (see `crate::audit`).
pub async fn serve(
    platform: Arc<Platform>,
    services: Services,
    audit: Arc<kagi_audit::AuditLog>,
    addrs: &[SocketAddr],
    resolver: SniResolver,
) -> Result<(), ServeError> {
    serve_until(
        platform,
        services,
        audit,
        addrs,
        resolver,
        std::future::pending(),
    )
    .await
}

/// How long a shutdown waits for the requests in flight.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// [`serve`] until `shutdown` resolves; then stops accepting, answers new requests on open
/// connections 503, and returns once every request in flight has finished — its change, its
/// in-memory update and its audit record — or after 30 s. A process that exits when this
/// returns leaves no committed change without its record.
pub async fn serve_until(
    platform: Arc<Platform>,
    services: Services,
    audit: Arc<kagi_audit::AuditLog>,
    addrs: &[SocketAddr],
    resolver: SniResolver,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), ServeError> {
    let listeners = bind(addrs).await?;
    serve_bound_until(platform, services, audit, listeners, resolver, shutdown).await
}

/// Binds the listeners of [`serve_bound_until`]. Once bound, connections wait in the
/// kernel's queue until serving starts: work started in between (the storage services'
/// keepers, which call the key vault over HTTPS at start) is not refused.
///
/// # Errors
/// [`ServeError::Bind`] naming the address that could not be bound.
pub async fn bind(addrs: &[SocketAddr]) -> Result<Vec<TcpListener>, ServeError> {
    let mut listeners = Vec::new();
    for addr in addrs {
        listeners.push(
            TcpListener::bind(addr)
                .await
                .map_err(|e| ServeError::Bind(*addr, e))?,
        );
    }
    Ok(listeners)
}

/// [`serve_until`] on listeners already bound ([`bind`]).
///
/// # Errors
/// [`ServeError::Tls`] if the TLS configuration cannot be built.
pub async fn serve_bound_until(
    platform: Arc<Platform>,
    services: Services,
    audit: Arc<kagi_audit::AuditLog>,
    listeners: Vec<TcpListener>,
    resolver: SniResolver,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), ServeError> {
    // Vault firewalls trust the identities of the registered services that say so.
    platform.set_trusted_service_types(&services.trusted_service_types());
    let in_flight = InFlight::default();
    let connections = Arc::new(hyper_util::server::graceful::GracefulShutdown::new());
    let config = crate::tls::server_config(resolver, vec![b"h2".to_vec(), b"http/1.1".to_vec()])
        .map_err(|e| ServeError::Tls(e.to_string()))?;
    let acceptor = TlsAcceptor::from(Arc::new(config));

    let mut tasks = tokio::task::JoinSet::new();
    for listener in listeners {
        let platform = platform.clone();
        let services = services.clone();
        let acceptor = acceptor.clone();
        let audit = audit.clone();
        let in_flight = in_flight.clone();
        let connections = connections.clone();
        tasks.spawn(async move {
            accept_loop(
                listener,
                acceptor,
                platform,
                services,
                audit,
                in_flight,
                connections,
            )
            .await
        });
    }
    tokio::select! {
        _ = async { while tasks.join_next().await.is_some() {} } => {}
        () = shutdown => {}
    }
    // Stop accepting, then let every connection finish the requests it has (answers written;
    // HTTP/1.1 closes after them, HTTP/2 sends GOAWAY), then wait for handlers whose clients
    // left before their answer.
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    in_flight.close();
    let drained = async {
        if let Ok(connections) = Arc::try_unwrap(connections) {
            connections.shutdown().await;
        }
        in_flight.idle().await;
    };
    if tokio::time::timeout(SHUTDOWN_GRACE, drained).await.is_err() {
        tracing::warn!("requests still in flight after {SHUTDOWN_GRACE:?}; stopping anyway");
    }
    Ok(())
}

/// The requests being handled, so that a shutdown can wait for them.
#[derive(Clone, Default)]
struct InFlight(Arc<InFlightState>);

#[derive(Default)]
struct InFlightState {
    count: std::sync::atomic::AtomicUsize,
    closing: std::sync::atomic::AtomicBool,
    idle: tokio::sync::Notify,
}

/// One request in flight; it ends when this is dropped.
struct InFlightGuard(InFlight);

impl InFlight {
    /// A new request, or `None` once the server is shutting down.
    fn enter(&self) -> Option<InFlightGuard> {
        use std::sync::atomic::Ordering;
        self.0.count.fetch_add(1, Ordering::AcqRel);
        if self.0.closing.load(Ordering::Acquire) {
            drop(InFlightGuard(self.clone()));
            return None;
        }
        Some(InFlightGuard(self.clone()))
    }

    fn close(&self) {
        self.0
            .closing
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// Resolves once no request is in flight.
    async fn idle(&self) {
        loop {
            let notified = self.0.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.0.count.load(std::sync::atomic::Ordering::Acquire) == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        if self
            .0
            .0
            .count
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel)
            == 1
        {
            self.0.0.idle.notify_waiters();
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    platform: Arc<Platform>,
    services: Services,
    audit: Arc<kagi_audit::AuditLog>,
    in_flight: InFlight,
    connections: Arc<hyper_util::server::graceful::GracefulShutdown>,
) {
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let platform = platform.clone();
        let services = services.clone();
        let audit = audit.clone();
        let in_flight = in_flight.clone();
        let watcher = connections.watcher();
        tokio::spawn(async move {
            // A client that never finishes its handshake does not hold a task forever.
            let tls =
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => return,
                };
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let platform = platform.clone();
                let services = services.clone();
                let audit = audit.clone();
                let guard = in_flight.enter();
                // The handler runs in a task of its own: a client that resets its stream or
                // drops the connection must not cancel a change half-way (committed but not
                // audited, or the store ahead of memory). Only the answer is abandoned.
                let handler = guard.map(|guard| {
                    tokio::spawn(async move {
                        let response = serve_one(platform, services, audit, req, peer).await;
                        drop(guard);
                        response
                    })
                });
                async move {
                    let Some(handler) = handler else {
                        return Ok(crate::respond::error(&kagi_core::KvError::new(
                            kagi_core::ErrorCode::ServiceUnavailable,
                            "kagi is shutting down; try again.",
                        )));
                    };
                    Ok::<_, std::convert::Infallible>(handler.await.unwrap_or_else(|e| {
                        tracing::error!(%peer, error = %e, "request handler panicked");
                        crate::respond::error(&kagi_core::KvError::internal())
                    }))
                }
            });
            let builder = auto::Builder::new(TokioExecutor::new());
            let connection = builder.serve_connection(TokioIo::new(tls), service);
            if let Err(e) = watcher.watch(connection).await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
}

/// Serves one request: the path is normalised once, for routing and audit alike; the body
/// is shared so that what the handler left unread can be drained after it answers.
async fn serve_one(
    platform: Arc<Platform>,
    services: Services,
    audit: Arc<kagi_audit::AuditLog>,
    req: Request<hyper::body::Incoming>,
    peer: SocketAddr,
) -> axum::http::Response<Body> {
    let (mut parts, incoming) = req.into_parts();
    parts.extensions.insert(RemoteAddr(peer));
    parts.extensions.insert(services);
    if let Some(uri) = normalized_uri(&parts.uri) {
        parts.uri = uri;
    }
    // A client that asked `Expect: 100-continue` sends its body only once the server reads it
    // (hyper then sends the 100): if the handler never did, there is nothing to drain, and
    // reading now would only invite the body the answer refuses.
    let expects_continue = parts
        .headers
        .get(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    let body = SharedBody::new(incoming);
    let response =
        crate::audit::serve_audited(platform, audit, Request::from_parts(parts, body.handle()))
            .await;
    if !expects_continue || body.was_read() {
        body.drain().await;
    }
    response
}

/// `uri` with every run of slashes in its path collapsed into one, or `None` when it is
/// already so. Empty path segments mean nothing in any API kagi serves, and leaving them
/// would let routing (which skips them) and audit redaction (which counts them) disagree.
fn normalized_uri(uri: &axum::http::Uri) -> Option<axum::http::Uri> {
    let path = uri.path();
    if !path.contains("//") {
        return None;
    }
    let mut clean = String::with_capacity(path.len());
    for c in path.chars() {
        if !(c == '/' && clean.ends_with('/')) {
            clean.push(c);
        }
    }
    let path_and_query = match uri.query() {
        Some(q) => format!("{clean}?{q}"),
        None => clean,
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = path_and_query.parse().ok();
    axum::http::Uri::from_parts(parts).ok()
}

/// Most of an unread body drained after the answer, and for how long: a client sends its whole
/// body before reading the answer, so an early answer (a refused token, an unsupported
/// api-version, an agent's pack over its quota) must not reset the connection under it; a
/// larger or slower body is cut off. The bound covers the largest body a route takes short of
/// a vault restore upload (a backup agent's object: 64 MiB).
const DRAIN_LIMIT: usize = 65 * 1024 * 1024;
const DRAIN_TIME: Duration = Duration::from_secs(30);

/// A request body that the handler reads through a handle while the server keeps its own, to
/// drain what the handler did not read.
#[derive(Clone)]
struct SharedBody(Arc<std::sync::Mutex<(hyper::body::Incoming, bool)>>);

impl SharedBody {
    fn new(incoming: hyper::body::Incoming) -> Self {
        Self(Arc::new(std::sync::Mutex::new((incoming, false))))
    }

    /// Whether the handler asked for any of the body.
    fn was_read(&self) -> bool {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).1
    }

    fn handle(&self) -> Body {
        Body::new(self.clone())
    }

    async fn drain(self) {
        use http_body_util::BodyExt;
        let mut body = self;
        let mut seen = 0usize;
        let _ = tokio::time::timeout(DRAIN_TIME, async {
            while seen <= DRAIN_LIMIT {
                match body.frame().await {
                    Some(Ok(frame)) => seen += frame.data_ref().map_or(0, |d| d.len()),
                    _ => break,
                }
            }
        })
        .await;
    }
}

impl hyper::body::Body for SharedBody {
    type Data = axum::body::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        let mut inner = self.0.lock().unwrap_or_else(|p| p.into_inner());
        inner.1 = true;
        std::pin::Pin::new(&mut inner.0).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .0
            .is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .0
            .size_hint()
    }
}
