//! The listener: accepts TCP (and Unix) connections, negotiates TLS (SSLRequest), reads the
//! startup packet, picks the logical server (SNI or `login@server`), authenticates
//! (SCRAM-SHA-256 or an access token), opens the database through the Gateway and hands the
//! session to its own thread — or, for a server the Gateway says another front end serves,
//! splices the connection to that one (crate::forward). CancelRequests interrupt the running
//! statement of a session (or are sent on to the upstream of a spliced one, or passed on to
//! the Gateway's peers when unknown here: crate::peers).

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::error::{PgError, ServeError, Severity, sqlstate};
use crate::forward::{self, FORWARDED_BY, ForwardedKeys, Upstream};
use crate::gateway::{Credential, Gateway, Termination};
use crate::peers::{self, PassOnBudget};
use crate::scram::{MECHANISM, ScramError, ScramServer};
use crate::session::{self, SessionParams};
use crate::settings::Settings;
use crate::sqlite::{self, Control, Identity};
use crate::wire::{self, Frontend, Startup, TxStatus, backend};

/// Listener settings.
#[derive(Clone)]
pub struct PgConfig {
    /// TLS (the service builds it from kagi's CA and picks certificates by SNI). Without it
    /// SSLRequest is answered 'N'.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Accept TCP connections without TLS. Off by default: like Azure Database for
    /// PostgreSQL, kagi refuses them ("SSL connection is required"). Unix-socket connections
    /// are always accepted (local, guarded by the socket's file permissions).
    pub allow_plaintext: bool,
    /// Sessions at once; more get FATAL 53300 "sorry, too many clients already".
    pub max_connections: usize,
    /// The largest message a client may send after authentication.
    pub max_message_bytes: usize,
    /// The most bytes of rows one session keeps for suspended portals and cursors.
    pub max_buffered_bytes: usize,
    /// Time allowed from connect to the end of authentication (PostgreSQL's
    /// authentication_timeout).
    pub auth_timeout: Duration,
    /// At shutdown, time given to sessions to end before they are dropped.
    pub shutdown_grace: Duration,
    /// Time allowed to reach an upstream ([`crate::Gateway::upstream`]): connect, TLS.
    pub upstream_timeout: Duration,
}

impl std::fmt::Debug for PgConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgConfig")
            .field("tls", &self.tls.is_some())
            .field("allow_plaintext", &self.allow_plaintext)
            .field("max_connections", &self.max_connections)
            .field("max_message_bytes", &self.max_message_bytes)
            .field("upstream_timeout", &self.upstream_timeout)
            .finish_non_exhaustive()
    }
}

impl Default for PgConfig {
    fn default() -> Self {
        Self {
            tls: None,
            allow_plaintext: false,
            max_connections: 256,
            max_message_bytes: 64 << 20,
            max_buffered_bytes: 64 << 20,
            auth_timeout: Duration::from_secs(60),
            shutdown_grace: Duration::from_secs(5),
            upstream_timeout: Duration::from_secs(5),
        }
    }
}

/// Messages during authentication are small (an access token fits easily).
const AUTH_MESSAGE_LIMIT: usize = 64 * 1024;

/// Sessions by backend process id, for CancelRequest.
#[derive(Default)]
struct Registry {
    sessions: Mutex<HashMap<u32, (u32, Arc<Control>)>>,
}

impl Registry {
    fn register(&self, control: Arc<Control>) -> (u32, u32) {
        let mut map = self
            .sessions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        loop {
            let pid = random_u32() & 0x7fff_ffff;
            if pid != 0 && !map.contains_key(&pid) {
                let key = random_u32();
                map.insert(pid, (key, control));
                return (pid, key);
            }
        }
    }

    fn unregister(&self, pid: u32) {
        self.sessions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&pid);
    }

    /// Cancels this listener's session `pid` if `key` is its key; whether it was one.
    fn cancel(&self, pid: u32, key: u32) -> bool {
        let map = self
            .sessions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((k, control)) = map.get(&pid)
            && aws_lc_rs::constant_time::verify_slices_are_equal(
                &k.to_be_bytes(),
                &key.to_be_bytes(),
            )
            .is_ok()
        {
            control.cancel();
            return true;
        }
        false
    }
}

fn random_u32() -> u32 {
    let mut b = [0u8; 4];
    // The system generator does not fail on Linux; a zero key would still be unguessable
    // only by luck, so retry rather than accept it.
    while aws_lc_rs::rand::fill(&mut b).is_err() {}
    u32::from_be_bytes(b)
}

struct Shared {
    gateway: Arc<dyn Gateway>,
    config: PgConfig,
    registry: Registry,
    /// Keys of the sessions spliced to an upstream.
    forwarded: Arc<ForwardedKeys>,
    /// Unknown CancelRequests this listener may still pass on to its peers.
    passed_cancels: PassOnBudget,
    sessions: Arc<Semaphore>,
    shutdown: CancellationToken,
    mock_key: [u8; 32],
}

/// Serves PostgreSQL clients on `tcp` (and `unix`, if given) until `shutdown` is cancelled;
/// then open sessions get FATAL 57P01 and are given `shutdown_grace` to end.
pub async fn serve(
    tcp: TcpListener,
    unix: Option<UnixListener>,
    gateway: Arc<dyn Gateway>,
    config: PgConfig,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    if config.tls.is_none() && !config.allow_plaintext && unix.is_none() {
        return Err(ServeError::Config(
            "no TLS configuration and plaintext connections refused: no client could connect"
                .into(),
        ));
    }
    let mut mock_key = [0u8; 32];
    aws_lc_rs::rand::fill(&mut mock_key)
        .map_err(|_| ServeError::Config("random generator failed".into()))?;
    let shared = Arc::new(Shared {
        gateway,
        sessions: Arc::new(Semaphore::new(config.max_connections.max(1))),
        config,
        registry: Registry::default(),
        forwarded: Arc::default(),
        passed_cancels: PassOnBudget::default(),
        shutdown: shutdown.clone(),
        mock_key,
    });
    // Connections in their startup phase and sessions, together.
    let open = Arc::new(Semaphore::new(
        shared.config.max_connections.max(1).saturating_mul(2),
    ));
    let tracker = TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = tcp.accept() => r.map(|(s, _)| {
                let _ = s.set_nodelay(true);
                Transport::Tcp(s)
            }),
            r = accept_unix(unix.as_ref()) => r.map(Transport::Unix),
        };
        let transport = match accepted {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(error = %e, "PostgreSQL listener: accept failed");
                // EMFILE and friends: give the system a moment.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&open).try_acquire_owned() else {
            continue;
        };
        let shared = Arc::clone(&shared);
        tracker.spawn(async move {
            connection(shared, transport).await;
            drop(permit);
        });
    }
    tracker.close();
    if tokio::time::timeout(shared.config.shutdown_grace, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("PostgreSQL listener: sessions still open after the shutdown grace period");
    }
    Ok(())
}

async fn accept_unix(unix: Option<&UnixListener>) -> io::Result<UnixStream> {
    match unix {
        Some(l) => l.accept().await.map(|(s, _)| s),
        None => std::future::pending().await,
    }
}

/// A client's byte stream.
enum Transport {
    Tcp(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    Unix(UnixStream),
    /// Only while the TCP stream is inside the TLS acceptor.
    Moved,
}

fn moved() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "stream moved")
}

/// Forwards a poll method to the stream inside.
macro_rules! delegate {
    ($self:ident, $method:ident($($arg:expr),*)) => {
        match $self.get_mut() {
            Transport::Tcp(s) => Pin::new(s).$method($($arg),*),
            Transport::Tls(s) => Pin::new(s.as_mut()).$method($($arg),*),
            Transport::Unix(s) => Pin::new(s).$method($($arg),*),
            Transport::Moved => Poll::Ready(Err(moved())),
        }
    };
}

impl AsyncRead for Transport {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        delegate!(self, poll_read(cx, buf))
    }
}

impl AsyncWrite for Transport {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, poll_shutdown(cx))
    }
}

/// Why a connection ends before its session starts.
enum Abort {
    /// Send this error (FATAL) and close.
    Error(PgError),
    /// Just close (EOF, I/O error, a CancelRequest served).
    Close,
}

impl From<io::Error> for Abort {
    fn from(_: io::Error) -> Self {
        Abort::Close
    }
}

impl From<wire::WireError> for Abort {
    fn from(e: wire::WireError) -> Self {
        Abort::Error(e.into())
    }
}

impl From<PgError> for Abort {
    fn from(e: PgError) -> Self {
        Abort::Error(e.with_severity(Severity::Fatal))
    }
}

/// Reads one startup packet (length word, then body).
async fn read_startup(io: &mut Transport) -> Result<Vec<u8>, Abort> {
    let mut len = [0u8; 4];
    io.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if !(8..=wire::MAX_STARTUP_LEN).contains(&len) {
        return Err(PgError::protocol("invalid length of startup packet").into());
    }
    let mut body = vec![0u8; len - 4];
    io.read_exact(&mut body).await?;
    Ok(body)
}

/// Reads one regular message, refusing one longer than `max` bytes (10 000 for the types
/// that are always small). None at a clean end of stream.
async fn read_message<R: AsyncRead + Unpin>(
    io: &mut R,
    max: usize,
) -> Result<Option<Frontend>, Abort> {
    let mut tag = [0u8; 1];
    match io.read_exact(&mut tag).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(_) => return Err(Abort::Close),
    }
    let mut len = [0u8; 4];
    io.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    let limit = if Frontend::is_small(tag[0]) {
        wire::SMALL_MESSAGE_LIMIT
    } else {
        max
    };
    if len < 4 || len - 4 > limit {
        return Err(PgError::protocol(format!(
            "invalid message length {len} for message type \"{}\"",
            tag[0].escape_ascii()
        ))
        .into());
    }
    // Grows as bytes arrive, so a length alone reserves nothing.
    let mut body = Vec::with_capacity((len - 4).min(64 * 1024));
    (&mut *io)
        .take((len - 4) as u64)
        .read_to_end(&mut body)
        .await?;
    if body.len() != len - 4 {
        return Err(Abort::Close);
    }
    Ok(Some(wire::parse_message(tag[0], &body)?))
}

async fn send(io: &mut Transport, buf: &[u8]) -> Result<(), Abort> {
    io.write_all(buf).await?;
    io.flush().await?;
    Ok(())
}

async fn connection(shared: Arc<Shared>, mut transport: Transport) {
    let auth_timeout = shared.config.auth_timeout;
    let setup = tokio::time::timeout(auth_timeout, startup(&shared, &mut transport)).await;
    let ready = match setup {
        Ok(Ok(Outcome::Session(r))) => *r,
        Ok(Ok(Outcome::Forward(f))) => {
            let Forward {
                stream,
                upstream,
                _permit,
            } = *f;
            forward::splice(
                transport,
                stream,
                upstream,
                Arc::clone(&shared.forwarded),
                shared.shutdown.clone(),
            )
            .await;
            return;
        }
        Ok(Err(Abort::Error(e))) => {
            let mut buf = Vec::new();
            backend::error(&mut buf, &e);
            let _ = send(&mut transport, &buf).await;
            let _ = transport.shutdown().await;
            return;
        }
        Ok(Err(Abort::Close)) => return,
        Err(_) => {
            let mut buf = Vec::new();
            backend::error(
                &mut buf,
                &PgError::fatal(
                    sqlstate::CONNECTION_REJECTED,
                    "canceling authentication due to timeout",
                ),
            );
            let _ = send(&mut transport, &buf).await;
            return;
        }
    };
    run_session(shared, transport, ready).await;
}

/// What a connection's startup leads to (boxed: both are large, the TLS state most).
enum Outcome {
    /// A session here.
    Session(Box<Ready>),
    /// A connection spliced to another front end.
    Forward(Box<Forward>),
}

/// A connection to an upstream, the client's StartupMessage sent.
struct Forward {
    stream: tokio_rustls::client::TlsStream<TcpStream>,
    upstream: Arc<Upstream>,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

/// A session ready to start.
struct Ready {
    open: crate::gateway::OpenDatabase,
    params: SessionParams,
    settings: Settings,
    /// ParameterStatus, BackendKeyData and ReadyForQuery, not sent yet.
    greeting: Vec<u8>,
    control: Arc<Control>,
    pid: u32,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

async fn startup(shared: &Arc<Shared>, transport: &mut Transport) -> Result<Outcome, Abort> {
    let is_unix = matches!(transport, Transport::Unix(_));
    let (minor, mut params, packet) = loop {
        let body = read_startup(transport).await?;
        match wire::parse_startup(&body)? {
            Startup::SslRequest => {
                let tls = match (&shared.config.tls, &*transport) {
                    (Some(cfg), Transport::Tcp(_)) => Arc::clone(cfg),
                    (_, Transport::Tls(_)) => {
                        return Err(PgError::protocol("SSLRequest after TLS was negotiated").into());
                    }
                    _ => {
                        send(transport, b"N").await?;
                        continue;
                    }
                };
                send(transport, b"S").await?;
                let Transport::Tcp(tcp) = std::mem::replace(transport, Transport::Moved) else {
                    return Err(Abort::Close);
                };
                let stream = tokio_rustls::TlsAcceptor::from(tls)
                    .accept(tcp)
                    .await
                    .map_err(|_| Abort::Close)?;
                *transport = Transport::Tls(Box::new(stream));
            }
            Startup::GssEncRequest => send(transport, b"N").await?,
            Startup::Cancel {
                pid,
                key,
                passed_on,
            } => {
                serve_cancel(shared, pid, key, passed_on).await;
                // Closed cleanly: libpq >= 17 sends cancels over TLS too and takes an end
                // without close_notify for a failure ("unexpected eof").
                let _ = tokio::time::timeout(Duration::from_secs(1), transport.shutdown()).await;
                return Err(Abort::Close);
            }
            Startup::Startup { minor, params } => break (minor, params, body),
        }
    };
    // Who forwarded this connection, if another front end did: taken out before anything
    // reads the parameters. It grants nothing (the connection authenticates as any other);
    // it only stops a second forward.
    let forwarded_by = params
        .iter()
        .find(|(k, _)| k == FORWARDED_BY)
        .map(|(_, v)| v.clone());
    params.retain(|(k, _)| k != FORWARDED_BY);
    let tls = matches!(transport, Transport::Tls(_));
    let sni = match &*transport {
        Transport::Tls(s) => s.get_ref().1.server_name().map(str::to_owned),
        _ => None,
    };
    let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let mut greeting = Vec::new();
    let unknown: Vec<String> = params
        .iter()
        .filter(|(k, _)| k.starts_with("_pq_."))
        .map(|(k, _)| k.clone())
        .collect();
    if minor > 0 || !unknown.is_empty() {
        backend::negotiate_protocol(&mut greeting, 0, &unknown);
    }
    if get("replication").is_some_and(|v| !matches!(v.as_str(), "false" | "off" | "0" | "no")) {
        return Err(PgError::fatal(
            sqlstate::FEATURE_NOT_SUPPORTED,
            "replication connections are not supported",
        )
        .into());
    }
    let user = get("user").filter(|u| !u.is_empty()).ok_or_else(|| {
        PgError::fatal(
            sqlstate::INVALID_AUTHORIZATION_SPECIFICATION,
            "no PostgreSQL user name specified in startup packet",
        )
    })?;
    if !tls && !is_unix && !shared.config.allow_plaintext {
        return Err(PgError::fatal(sqlstate::INVALID_AUTHORIZATION_SPECIFICATION, "SSL connection is required. Please specify SSL options and retry.")
            .with_hint("kagi, like Azure Database for PostgreSQL, accepts only TLS connections: use sslmode=require, or verify-full with kagi's CA")
            .into());
    }
    let (server, login) = resolve(shared.gateway.as_ref(), sni.as_deref(), &user)?;
    if let Some(up) = shared.gateway.upstream(&server).await? {
        return forward_to(shared, up, &server, forwarded_by.as_deref(), &packet)
            .await
            .map(|f| Outcome::Forward(Box::new(f)));
    }
    let database = get("database")
        .filter(|d| !d.is_empty())
        .unwrap_or_else(|| login.clone());

    let who = (server.as_str(), database.as_str(), login.as_str());
    authenticate(shared, transport, who, &user, tls || is_unix).await?;
    backend::auth(&mut greeting, 0, &[]);

    let Ok(permit) = Arc::clone(&shared.sessions).try_acquire_owned() else {
        send(transport, &greeting).await?;
        return Err(PgError::fatal(
            sqlstate::TOO_MANY_CONNECTIONS,
            "sorry, too many clients already",
        )
        .into());
    };
    let open = match shared.gateway.open(&server, &database, &login).await {
        Ok(o) => o,
        Err(e) => {
            send(transport, &greeting).await?;
            return Err(e.into());
        }
    };
    let mut settings = Settings::new(&login);
    let mut startup_settings: Vec<(String, String)> = params
        .iter()
        .filter(|(k, _)| {
            !matches!(k.as_str(), "user" | "database" | "options" | "replication")
                && !k.starts_with("_pq_.")
        })
        .cloned()
        .collect();
    if let Some(opts) = get("options") {
        startup_settings.extend(parse_options(&opts));
    }
    for (k, v) in startup_settings {
        // Unknown settings are kept (PostgreSQL would refuse them; clients send a few that
        // only matter to PostgreSQL). Invalid values of known ones are refused.
        if let Err(e) = settings.set(&k, Some(&v))
            && (k.eq_ignore_ascii_case("client_encoding") || !e.code().starts_with("55"))
        {
            send(transport, &greeting).await?;
            return Err(e.into());
        }
    }
    let control = Control::new(&open.connection);
    let (pid, key) = shared.registry.register(Arc::clone(&control));
    for (n, v) in settings.reported() {
        backend::parameter_status(&mut greeting, &n, &v);
    }
    backend::backend_key(&mut greeting, pid, key);
    backend::ready(&mut greeting, TxStatus::Idle);
    let params = SessionParams {
        server,
        database,
        login,
        gateway: Arc::clone(&shared.gateway),
        runtime: tokio::runtime::Handle::current(),
        max_buffered_bytes: shared.config.max_buffered_bytes,
    };
    Ok(Outcome::Session(Box::new(Ready {
        open,
        params,
        settings,
        greeting,
        control,
        pid,
        _permit: permit,
    })))
}

/// Serves a CancelRequest: this listener's own session, else a session it spliced (sent on to
/// its upstream, with the code it came with: one passed on stays passed on), else, when no
/// other front end passed it here, passed on to the Gateway's peers (crate::peers).
async fn serve_cancel(shared: &Shared, pid: u32, key: u32, passed_on: bool) {
    if shared.registry.cancel(pid, key) {
        return;
    }
    let timeout = shared.config.upstream_timeout;
    if let Some(up) = shared.forwarded.find(pid, key) {
        if let Err(e) = forward::cancel(&up, pid, key, passed_on, timeout).await {
            tracing::warn!(upstream = %up.name, address = %up.address, reason = %e, "cannot forward a cancel request");
        }
    } else if !passed_on {
        peers::pass_on(
            shared.gateway.as_ref(),
            &shared.passed_cancels,
            pid,
            key,
            timeout,
        )
        .await;
    }
}

/// Connects to `up`, the front end serving `server`, and sends it the client's StartupMessage
/// (`packet`, after its length word) marked as forwarded by this one.
async fn forward_to(
    shared: &Shared,
    up: Upstream,
    server: &str,
    forwarded_by: Option<&str>,
    packet: &[u8],
) -> Result<Forward, Abort> {
    if let Some(by) = forwarded_by {
        // The other front end thought this one serves the server (the Gateway's view changed
        // meanwhile): forwarding again could loop. Nodes are named in the log only: the
        // client has not authenticated.
        tracing::warn!(server, upstream = %up.name, forwarded_by = by, "a forwarded connection would be forwarded again");
        return Err(PgError::unavailable(format!(
            "server \"{server}\" is served by another node, and this connection was already forwarded once"
        ))
        .with_hint("retry the connection")
        .into());
    }
    let Ok(permit) = Arc::clone(&shared.sessions).try_acquire_owned() else {
        return Err(PgError::fatal(
            sqlstate::TOO_MANY_CONNECTIONS,
            "sorry, too many clients already",
        )
        .into());
    };
    let mut stream = forward::connect(&up, shared.config.upstream_timeout).await?;
    let sent = async {
        stream
            .write_all(&forward::marked_startup(packet, &up.forwarded_by))
            .await?;
        stream.flush().await
    };
    if let Err(e) = sent.await {
        return Err(PgError::unavailable(format!("{} closed the connection: {e}", up.name)).into());
    }
    Ok(Forward {
        stream,
        upstream: Arc::new(up),
        _permit: permit,
    })
}

/// `-c name=value` and `--name=value` from the startup `options`.
fn parse_options(opts: &str) -> Vec<(String, String)> {
    let words: Vec<&str> = opts.split_whitespace().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < words.len() {
        let w = words[i];
        let kv = if w == "-c" {
            i += 1;
            words.get(i).copied()
        } else {
            w.strip_prefix("--").or_else(|| w.strip_prefix("-c"))
        };
        if let Some((k, v)) = kv.and_then(|kv| kv.split_once('=')) {
            out.push((k.replace('-', "_"), v.to_owned()));
        }
        i += 1;
    }
    out
}

/// The logical server and login a connection addresses: the SNI host name when the Gateway
/// knows it (a `@server` suffix naming the same server is dropped from the user name), else
/// a user name `login@server` (split at the last `@`, as Entra user names contain one).
fn resolve(
    gateway: &dyn Gateway,
    sni: Option<&str>,
    user: &str,
) -> Result<(String, String), PgError> {
    if let Some(server) = sni.and_then(|h| gateway.server_for_host(h)) {
        let login = match user.rsplit_once('@') {
            Some((l, s)) if s.eq_ignore_ascii_case(&server) && !l.is_empty() => l.to_owned(),
            _ => user.to_owned(),
        };
        return Ok((server, login));
    }
    match user.rsplit_once('@') {
        Some((l, s)) if !l.is_empty() && !s.is_empty() => Ok((s.to_ascii_lowercase(), l.to_owned())),
        _ => Err(PgError::fatal(
            sqlstate::INVALID_AUTHORIZATION_SPECIFICATION,
            format!("no server is named by this connection (user \"{user}\")"),
        )
        .with_hint("connect to the host {server}.{dns-suffix} over TLS (the server is chosen by SNI), or log in as login@server")),
    }
}

async fn read_auth_message(transport: &mut Transport) -> Result<Vec<u8>, Abort> {
    match read_message(transport, AUTH_MESSAGE_LIMIT).await? {
        Some(Frontend::Password(b)) => Ok(b),
        // A client that gives up (psql asks for a password only after a first attempt).
        None | Some(Frontend::Terminate) => Err(Abort::Close),
        Some(_) => Err(PgError::protocol("expected a password message").into()),
    }
}

async fn authenticate(
    shared: &Shared,
    transport: &mut Transport,
    (server, database, login): (&str, &str, &str),
    user: &str,
    secure: bool,
) -> Result<(), Abort> {
    let credential = shared.gateway.credential(server, database, login).await?;
    let failed = || Abort::Error(PgError::password_failed(user));
    match credential {
        Some(Credential::AccessToken) => {
            if !secure {
                return Err(PgError::fatal(
                    sqlstate::INVALID_AUTHORIZATION_SPECIFICATION,
                    "access tokens are accepted only over TLS",
                )
                .into());
            }
            let mut buf = Vec::new();
            backend::auth(&mut buf, 3, &[]);
            send(transport, &buf).await?;
            let msg = read_auth_message(transport).await?;
            let token = wire::parse_password(&msg)?;
            shared
                .gateway
                .check_token(server, database, login, &token)
                .await?;
            Ok(())
        }
        scram => {
            let verifier = match scram {
                Some(Credential::Scram(v)) => Some(v),
                _ => None,
            };
            let mut seed = shared.mock_key.to_vec();
            // Per database too: a login may be a user of one database only, and the mock salt
            // must not tell the others apart from it.
            seed.extend_from_slice(server.as_bytes());
            seed.push(0);
            seed.extend_from_slice(database.as_bytes());
            seed.push(0);
            seed.extend_from_slice(login.as_bytes());
            let mut exchange = ScramServer::new(verifier, &seed);
            let mut buf = Vec::new();
            backend::auth_sasl(&mut buf, &[MECHANISM]);
            send(transport, &buf).await?;
            let msg = read_auth_message(transport).await?;
            let (mechanism, data) = wire::parse_sasl_initial(&msg)?;
            if mechanism != MECHANISM {
                return Err(PgError::fatal(
                    sqlstate::PROTOCOL_VIOLATION,
                    "client selected an invalid SASL authentication mechanism",
                )
                .into());
            }
            let first = exchange.client_first(&data).map_err(scram_error)?;
            buf.clear();
            backend::auth(&mut buf, 11, first.as_bytes());
            send(transport, &buf).await?;
            let msg = read_auth_message(transport).await?;
            match exchange.client_final(&msg) {
                Ok(fin) => {
                    buf.clear();
                    backend::auth(&mut buf, 12, fin.as_bytes());
                    send(transport, &buf).await?;
                    Ok(())
                }
                Err(ScramError::WrongProof) => Err(failed()),
                Err(e) => Err(scram_error(e)),
            }
        }
    }
}

fn scram_error(e: ScramError) -> Abort {
    let code = match e {
        ScramError::ChannelBinding => sqlstate::FEATURE_NOT_SUPPORTED,
        ScramError::Random => sqlstate::INTERNAL_ERROR,
        _ => sqlstate::PROTOCOL_VIOLATION,
    };
    Abort::Error(PgError::fatal(code, e.to_string()))
}

async fn run_session(shared: Arc<Shared>, mut transport: Transport, ready: Ready) {
    let Ready {
        open,
        params,
        settings,
        greeting,
        control,
        pid,
        _permit,
    } = ready;
    let crate::gateway::OpenDatabase {
        connection,
        termination,
        barrier,
    } = open;
    let settings = Arc::new(Mutex::new(settings));
    let who = Identity {
        login: params.login.clone(),
        database: params.database.clone(),
        pid,
    };
    let prepared =
        sqlite::prepare_connection(&connection, &control, &settings, &who).and_then(|()| {
            barrier
                .map(|b| session::Commits::watch(&connection, b))
                .transpose()
        });
    let commits = match prepared {
        Ok(c) => c,
        Err(e) => {
            let mut buf = Vec::new();
            backend::error(
                &mut buf,
                &PgError::fatal(
                    sqlstate::INTERNAL_ERROR,
                    format!("cannot prepare the session: {e}"),
                ),
            );
            let _ = send(&mut transport, &buf).await;
            shared.registry.unregister(pid);
            return;
        }
    };
    if send(&mut transport, &greeting).await.is_err() {
        shared.registry.unregister(pid);
        return;
    }
    let (in_tx, in_rx) = mpsc::channel::<Frontend>(64);
    let (out_tx, mut out_rx) = mpsc::channel::<Vec<u8>>(8);
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    let worker_control = Arc::clone(&control);
    let spawned = std::thread::Builder::new()
        .name(format!("pgsql-{pid}"))
        .spawn(move || {
            session::run(
                connection,
                params,
                settings,
                worker_control,
                commits,
                in_rx,
                out_tx,
            );
            let _ = done_tx.send(());
        });
    if spawned.is_err() {
        let mut buf = Vec::new();
        backend::error(
            &mut buf,
            &PgError::fatal(
                sqlstate::INSUFFICIENT_RESOURCES,
                "could not start a session thread",
            ),
        );
        let _ = send(&mut transport, &buf).await;
        shared.registry.unregister(pid);
        return;
    }
    let (mut rd, mut wr) = tokio::io::split(transport);
    let max = shared.config.max_message_bytes;
    let reader = async {
        loop {
            match read_message(&mut rd, max).await {
                Ok(Some(Frontend::Terminate)) | Ok(None) => return None,
                Ok(Some(m)) => {
                    if in_tx.send(m).await.is_err() {
                        return None;
                    }
                }
                Err(Abort::Error(e)) => return Some(e),
                Err(Abort::Close) => return None,
            }
        }
    };
    let mut termination: Termination = termination;
    let shutdown = shared.shutdown.clone();
    let writer = async {
        loop {
            tokio::select! {
                biased;
                e = termination.fired() => return Some(e),
                _ = shutdown.cancelled() => {
                    return Some(PgError::fatal(sqlstate::ADMIN_SHUTDOWN, "terminating connection due to administrator command"));
                }
                chunk = out_rx.recv() => match chunk {
                    Some(c) => {
                        if wr.write_all(&c).await.is_err() || wr.flush().await.is_err() {
                            return None;
                        }
                    }
                    None => return None,
                },
            }
        }
    };
    let fatal = tokio::select! {
        e = reader => e,
        e = writer => e,
    };
    // Stop whatever the session runs; its thread ends when its channels close.
    control.kill();
    drop(in_tx);
    drop(out_rx);
    if let Some(e) = fatal {
        let mut buf = Vec::new();
        backend::error(&mut buf, &e.with_severity(Severity::Fatal));
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            let _ = wr.write_all(&buf).await;
            let _ = wr.flush().await;
        })
        .await;
    }
    let _ = wr.shutdown().await;
    // The session's connection (and whatever key it holds) is gone when the thread ends.
    let _ = done_rx.await;
    shared.registry.unregister(pid);
}
