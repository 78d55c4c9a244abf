//! The seam to the SQL service: [`Gateway`] resolves servers, logins and databases; the
//! service hands each session an [`OpenDatabase`], can cut every session of a database
//! through its [`Terminator`] and hold back what follows a commit until its
//! [`CommitBarrier`] has made the commit durable elsewhere.

use async_trait::async_trait;
use tokio::sync::watch;

use crate::error::{PgError, sqlstate};
use crate::forward::Upstream;
use crate::scram::ScramVerifier;

/// How a login proves itself.
#[derive(Debug, Clone)]
pub enum Credential {
    /// A SQL login: SCRAM-SHA-256 against this stored verifier.
    Scram(ScramVerifier),
    /// An Entra principal: the password is an access token, sent in cleartext (TLS only) and
    /// checked by [`Gateway::check_token`].
    AccessToken,
}

/// A database opened for one session.
pub struct OpenDatabase {
    /// The SQLite connection the session runs its SQL on (owned by the session's thread,
    /// dropped when the session ends).
    pub connection: rusqlite::Connection,
    /// Fires when the service wants the session gone (see [`Terminator`]).
    pub termination: Termination,
    /// What the session's commits must pass before the client hears of them (None: nothing
    /// to wait for, a commit is reported as soon as SQLite made it).
    pub barrier: Option<std::sync::Arc<dyn CommitBarrier>>,
}

/// Makes a session's commits durable beyond this node before the client hears of them.
///
/// The contract of PostgreSQL's synchronous replication (`synchronous_commit =
/// remote_write`): after a transaction of the session commits (autocommit statements,
/// COMMIT, the implicit transaction of a multi-statement Query or of the messages up to a
/// Sync), nothing the session sends afterwards (CommandComplete, ReadyForQuery, rows) leaves
/// for the client until [`CommitBarrier::commit`] has returned. Output is buffered until a
/// flush, so several commits may pass one call. A session that has already lost its client
/// (or is being terminated) by then ends without calling it: nobody would hear of the commit.
/// A commit that the barrier refuses stays committed locally, as in PostgreSQL: the client
/// just never hears that it did.
pub trait CommitBarrier: Send + Sync + 'static {
    /// Called on the session's own (blocking) thread after one or more transactions of the
    /// session committed, before any byte sent after those commits leaves for the client.
    /// Blocking is expected (it may upload); the thread is not one of the async runtime's,
    /// so `Handle::block_on` works here. Cancel requests do not interrupt it, so it should
    /// bound its own waiting. An error ends the session with that error (sent as a FATAL
    /// ErrorResponse in place of everything buffered since, then the connection closes).
    fn commit(&self) -> Result<(), PgError>;
}

impl std::fmt::Debug for OpenDatabase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenDatabase").finish_non_exhaustive()
    }
}

/// The service's handle to cut every session of one database: keep one per database, give
/// each [`OpenDatabase`] a [`Terminator::subscribe`]. [`Terminator::terminate`] ends every
/// session with that error (a FATAL ErrorResponse, the running statement interrupted);
/// dropping the Terminator ends them with 57P01 "terminating connection because the
/// database was closed".
#[derive(Debug)]
pub struct Terminator {
    tx: watch::Sender<Option<PgError>>,
}

impl Default for Terminator {
    fn default() -> Self {
        Self::new()
    }
}

impl Terminator {
    /// A terminator that has not fired.
    pub fn new() -> Self {
        Self {
            tx: watch::Sender::new(None),
        }
    }

    /// A receiver for one session. Subscribing after [`Terminator::terminate`] gives a
    /// receiver that has already fired (the session ends at once).
    pub fn subscribe(&self) -> Termination {
        Termination {
            rx: self.tx.subscribe(),
            _keep: None,
        }
    }

    /// Ends every session subscribed, now and later, with `error` (sent as FATAL).
    pub fn terminate(&self, error: PgError) {
        self.tx
            .send_replace(Some(error.with_severity(crate::Severity::Fatal)));
    }

    /// Whether [`Terminator::terminate`] was called.
    pub fn is_terminated(&self) -> bool {
        self.tx.borrow().is_some()
    }

    /// How many sessions hold a subscription. A session lets go of it only after its
    /// thread has dropped the connection, so 0 means no session still uses the database.
    pub fn sessions(&self) -> usize {
        self.tx.receiver_count()
    }
}

/// A session's side of a [`Terminator`].
#[derive(Debug, Clone)]
pub struct Termination {
    rx: watch::Receiver<Option<PgError>>,
    // Keeps the channel of [`Termination::never`] open.
    _keep: Option<std::sync::Arc<watch::Sender<Option<PgError>>>>,
}

impl Termination {
    /// A termination that never fires (for a database that is never cut).
    pub fn never() -> Self {
        let (tx, rx) = watch::channel(None);
        Self {
            rx,
            _keep: Some(std::sync::Arc::new(tx)),
        }
    }

    /// Waits until the session must end and returns the error to send.
    pub(crate) async fn fired(&mut self) -> PgError {
        loop {
            if let Some(e) = self.rx.borrow_and_update().clone() {
                return e;
            }
            if self.rx.changed().await.is_err() {
                return self.rx.borrow().clone().unwrap_or_else(|| {
                    PgError::fatal(
                        sqlstate::ADMIN_SHUTDOWN,
                        "terminating connection because the database was closed",
                    )
                });
            }
        }
    }
}

/// A change to a login made in SQL (`CREATE USER|ROLE … PASSWORD`, `ALTER USER|ROLE …
/// PASSWORD`, `DROP USER|ROLE`). The front end intercepts these statements (SQLite has no
/// such statements) and turns passwords into verifiers; the service stores them.
#[derive(Debug, Clone)]
pub enum LoginChange {
    /// Create `login` with this verifier.
    Create {
        /// Login name (case as PostgreSQL folds it: unquoted names lower-cased).
        login: String,
        /// Verifier of its password.
        verifier: ScramVerifier,
    },
    /// Set the password of an existing `login`.
    SetPassword {
        /// Login name.
        login: String,
        /// Verifier of the new password.
        verifier: ScramVerifier,
    },
    /// Create `login` as an Entra principal (`CREATE USER name FROM EXTERNAL PROVIDER [WITH
    /// OBJECT_ID = 'id']`): it signs in with an access token as the password.
    CreateExternal {
        /// The principal's name: a user's UPN, or an application's (client) id.
        login: String,
        /// The principal's object id, when given.
        object_id: Option<String>,
    },
    /// Drop `login`.
    Drop {
        /// Login name.
        login: String,
        /// `DROP … IF EXISTS`: a missing login is not an error.
        if_exists: bool,
    },
}

/// The SQL service behind the front end. All methods are called from async tasks (the
/// service may await its store and key vault); errors go to the client as they are (SQLSTATE,
/// message, detail, hint), with severity FATAL during connection setup.
#[async_trait]
pub trait Gateway: Send + Sync + 'static {
    /// The logical server a TLS SNI host name addresses (`{server}.{dns-suffix}`), or None
    /// for a host name that is not one of the service's (the connection then needs a user
    /// name `login@server`).
    fn server_for_host(&self, host: &str) -> Option<String>;

    /// Another front end that serves `server`, when this one does not: its connections are
    /// then forwarded there right after the StartupMessage, before any authentication (which
    /// the upstream does, end to end), marked so that they are never forwarded again (a
    /// forwarded connection for a server that has an upstream here is refused with 57P03).
    /// Refuse with a FATAL error when the server is served elsewhere but cannot be reached
    /// now. Default: None, every server is served here.
    async fn upstream(&self, server: &str) -> Result<Option<Upstream>, PgError> {
        let _ = server;
        Ok(None)
    }

    /// The other front ends a CancelRequest unknown here is passed on to, once (with
    /// [`crate::wire::PASSED_CANCEL_REQUEST`], which they serve but never pass on again):
    /// behind a load balancer a client's cancel connection may reach a front end that neither
    /// holds its session nor spliced it. Only the address and TLS settings of each
    /// [`Upstream`] are used (any name its certificate covers will do). Called for unknown
    /// cancels only, at most a few dozen times a second. Default: none.
    async fn cancel_peers(&self) -> Vec<Upstream> {
        Vec::new()
    }

    /// How `login` connecting to `database` on `server` authenticates (a login may be a
    /// user of that database only). `Ok(None)` for an unknown server or login: the front end
    /// then runs a mock SCRAM exchange and fails with the same 28P01 as for a wrong password.
    async fn credential(
        &self,
        server: &str,
        database: &str,
        login: &str,
    ) -> Result<Option<Credential>, PgError>;

    /// Checks an access token sent as the password of an [`Credential::AccessToken`] login
    /// connecting to `database`. Return [`PgError::password_failed`] for a token that is
    /// refused.
    async fn check_token(
        &self,
        server: &str,
        database: &str,
        login: &str,
        token: &str,
    ) -> Result<(), PgError>;

    /// Opens `database` on `server` for an authenticated `login`. Refuse with a FATAL error
    /// (for an Inaccessible database: [`PgError::unavailable`] with Azure's 40613 text; for
    /// a missing one 3D000 `database "…" does not exist`).
    async fn open(
        &self,
        server: &str,
        database: &str,
        login: &str,
    ) -> Result<OpenDatabase, PgError>;

    /// The databases of `server` (psql's `\l`). Default: none.
    async fn list_databases(&self, server: &str) -> Result<Vec<String>, PgError> {
        let _ = server;
        Ok(Vec::new())
    }

    /// Applies a login change made in SQL by `actor` (the session's login) in `database` (the
    /// session's). Default: refused (42501).
    async fn change_login(
        &self,
        server: &str,
        database: &str,
        actor: &str,
        change: LoginChange,
    ) -> Result<(), PgError> {
        let _ = (server, database, actor, change);
        Err(PgError::error(
            sqlstate::INSUFFICIENT_PRIVILEGE,
            "permission denied to create or change logins",
        ))
    }
}
