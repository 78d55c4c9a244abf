//! The PostgreSQL front end's view of the service ([`kagi_pgsql::Gateway`]): which server a
//! host name addresses, which node serves it (a server living on another node of a shared
//! store is reached through that node's SQL endpoint), how a login authenticates, and the
//! databases a session opens.

use std::sync::Arc;

use async_trait::async_trait;
use kagi_core::takeover::Taker;
use kagi_core::{ErrorCode, KvError};
use kagi_pgsql::{
    Credential, Gateway, LoginChange, OpenDatabase as Session, PgError, UPSTREAM_PHRASE, Upstream,
    sqlstate,
};
use serde_json::Value;

use crate::logins::DbUser;
use crate::{SERVER_TYPE, SqlService, id_of_body, logins};

/// The gateway of a [`SqlService`].
#[derive(Clone, Debug)]
pub struct SqlGateway(pub Arc<SqlService>);

/// A failure of the service during a session's setup, as PostgreSQL reports it.
fn pg_error(e: KvError) -> PgError {
    match e.code {
        ErrorCode::ServiceUnavailable => PgError::unavailable(e.message),
        ErrorCode::InternalError => PgError::fatal(sqlstate::INTERNAL_ERROR, e.message),
        _ => PgError::fatal(sqlstate::CONNECTION_REJECTED, e.message),
    }
}

impl SqlService {
    /// The server named `name` (server names are unique on the platform).
    pub(crate) fn server_named(&self, name: &str) -> Option<Value> {
        self.host
            .resources_of_type(SERVER_TYPE)
            .into_iter()
            .find(|s| {
                s["name"]
                    .as_str()
                    .is_some_and(|n| n.eq_ignore_ascii_case(name))
            })
    }
}

/// The server's Entra administrator: (login, object id).
fn entra_admin(server: &Value) -> Option<(String, String)> {
    let a = &server["properties"]["administrators"];
    Some((
        a["login"].as_str()?.to_string(),
        a["sid"].as_str()?.to_string(),
    ))
}

impl SqlGateway {
    /// The contained user `login` of `database` (none when the database does not exist).
    async fn db_user(
        &self,
        server: &Value,
        database: &str,
        login: &str,
    ) -> Result<Option<DbUser>, PgError> {
        let db = match self.0.database(server, database).await {
            Ok(d) => d,
            Err(e) if e.code == ErrorCode::ResourceNotFound => return Ok(None),
            Err(e) => return Err(pg_error(e)),
        };
        logins::db_user(
            self.0.host.as_ref(),
            &id_of_body(server),
            &db.database_id,
            login,
        )
        .await
        .map_err(pg_error)
    }

    /// Whether `login` may open `database`: the server's administrators and logins reach every
    /// database, a contained user its own.
    async fn may_open(&self, server: &Value, database: &str, login: &str) -> Result<bool, PgError> {
        if entra_admin(server).is_some_and(|(name, _)| name.eq_ignore_ascii_case(login)) {
            return Ok(true);
        }
        let server_login = logins::get(self.0.host.as_ref(), &id_of_body(server), login)
            .await
            .map_err(pg_error)?
            .is_some();
        Ok(server_login || self.db_user(server, database, login).await?.is_some())
    }

    /// A client TLS configuration trusting the cluster's CA. Every node of a cluster has the
    /// same CA (copied with the root key): the other nodes' SQL certificates chain to it.
    async fn cluster_tls(&self) -> Result<Arc<kagi_pgsql::rustls::ClientConfig>, PgError> {
        let ca = self.0.host.config().data_dir.join("tls").join("ca.pem");
        let pem = tokio::fs::read(&ca).await.map_err(|e| {
            tracing::error!(path = %ca.display(), error = %e, "cannot read the cluster's CA");
            PgError::fatal(
                sqlstate::INTERNAL_ERROR,
                "cannot reach the node serving this server",
            )
        })?;
        Upstream::trusting(&pem)
    }

    fn server(&self, name: &str) -> Result<Value, PgError> {
        self.0.server_named(name).ok_or_else(|| {
            PgError::fatal(
                sqlstate::INVALID_AUTHORIZATION_SPECIFICATION,
                format!("server \"{name}\" does not exist"),
            )
        })
    }
}

#[async_trait]
impl Gateway for SqlGateway {
    fn server_for_host(&self, host: &str) -> Option<String> {
        let suffix = format!(".{}", self.0.host.config().dns_suffix);
        let name = host
            .len()
            .checked_sub(suffix.len())
            .filter(|&n| host[n..].eq_ignore_ascii_case(&suffix))
            .map(|n| &host[..n])?;
        self.0
            .server_named(name)
            .and_then(|s| s["name"].as_str().map(str::to_string))
    }

    async fn upstream(&self, server: &str) -> Result<Option<Upstream>, PgError> {
        let Some(s) = self.0.server_named(server) else {
            return Ok(None);
        };
        let Some(home) = self.0.home_elsewhere(&s).await.map_err(pg_error)? else {
            return Ok(None);
        };
        // A server whose home is gone is taken over by its taker (live logs in the bucket):
        // the connection goes there, or is served here when this node is it.
        let home = self.0.serving_home(&s, home, Taker::First).await.map_err(|e| {
            tracing::warn!(server, reason = %e.message, "the server's home is not running and the server cannot be taken over now");
            PgError::unavailable(format!("{UPSTREAM_PHRASE} cannot be reached now"))
                .with_hint("retry the connection")
        })?;
        if home == self.0.host.node_name() {
            return Ok(None);
        }
        // The reason names the node: the log's, not the client's, which has not authenticated.
        let address = self
            .0
            .home_sql_endpoint(server, &home)
            .await
            .map_err(|e| {
                tracing::warn!(server, node = %home, reason = %e.message, "cannot forward a connection to the server's home");
                PgError::unavailable(format!("{UPSTREAM_PHRASE} cannot be reached now"))
                    .with_hint("retry the connection")
            })?;
        let config = self.0.host.config();
        let name = s["name"].as_str().unwrap_or(server);
        Ok(Some(Upstream {
            name: format!("the node '{home}'"),
            address,
            tls_name: format!("{name}.{}", config.dns_suffix),
            tls: self.cluster_tls().await?,
            forwarded_by: self.0.host.node_name(),
        }))
    }

    /// The other running nodes that serve SQL: a CancelRequest that reaches this node for a
    /// session it neither holds nor forwarded (the client's cancel connection went to another
    /// node than its session's) is passed on to them, once.
    async fn cancel_peers(&self) -> Vec<Upstream> {
        let nodes = match self.0.host.live_nodes().await {
            Ok(n) => n,
            Err(e) => {
                tracing::debug!(reason = %e.message, "cannot list the nodes to pass a cancel request on to");
                return Vec::new();
            }
        };
        let me = self.0.host.node_name();
        let peers: Vec<(String, String)> = nodes
            .into_iter()
            .filter(|n| n.name != me)
            .filter_map(|n| Some((n.name, n.sql.filter(|a| !a.is_empty())?)))
            .collect();
        if peers.is_empty() {
            return Vec::new();
        }
        let Ok(tls) = self.cluster_tls().await else {
            return Vec::new();
        };
        // A cancel picks no server: any name every node's certificate covers will do, and
        // each mints one for the DNS suffix itself.
        let tls_name = self.0.host.config().dns_suffix.clone();
        peers
            .into_iter()
            .map(|(name, address)| Upstream {
                name: format!("the node '{name}'"),
                address,
                tls_name: tls_name.clone(),
                tls: Arc::clone(&tls),
                forwarded_by: me.clone(),
            })
            .collect()
    }

    async fn credential(
        &self,
        server: &str,
        database: &str,
        login: &str,
    ) -> Result<Option<Credential>, PgError> {
        let Some(s) = self.0.server_named(server) else {
            return Ok(None);
        };
        // Its databases are opened only where their files are (`upstream` sent the connection
        // there, unless the home changed meanwhile).
        if let Some(home) = self.0.home_elsewhere(&s).await.map_err(pg_error)? {
            tracing::warn!(server, node = %home, "a connection for a server of another node reached this one");
            return Err(pg_error(crate::homes::served_elsewhere(server)));
        }
        // The server's Entra administrator signs in with an access token as the password.
        if entra_admin(&s).is_some_and(|(name, _)| name.eq_ignore_ascii_case(login)) {
            return Ok(Some(Credential::AccessToken));
        }
        let aad_only = s["properties"]["administrators"]["azureADOnlyAuthentication"]
            == serde_json::json!(true);
        // A contained user of the database it connects to.
        match self.db_user(&s, database, login).await? {
            Some(DbUser::External { .. }) => return Ok(Some(Credential::AccessToken)),
            Some(DbUser::Sql(v)) if !aad_only => return Ok(Some(Credential::Scram(v))),
            _ => {}
        }
        if aad_only {
            return Ok(None);
        }
        let found = logins::get(self.0.host.as_ref(), &id_of_body(&s), login)
            .await
            .map_err(pg_error)?;
        Ok(found.map(|(v, _)| Credential::Scram(v)))
    }

    async fn check_token(
        &self,
        server: &str,
        database: &str,
        login: &str,
        token: &str,
    ) -> Result<(), PgError> {
        let refused = || PgError::password_failed(login);
        let s = self.0.server_named(server).ok_or_else(refused)?;
        let who = self.0.host.authenticate(token).map_err(|_| refused())?;
        // A principal of the server's tenant only (the tenant its subscription is in).
        let tenant = kagi_host::subscription_of(&id_of_body(&s))
            .and_then(|sub| self.0.host.subscription_tenant(sub));
        if tenant.is_some_and(|t| !t.eq_ignore_ascii_case(&who.tenant_id)) {
            return Err(refused());
        }
        if let Some((name, sid)) = entra_admin(&s)
            && name.eq_ignore_ascii_case(login)
        {
            return if who.object_id.eq_ignore_ascii_case(&sid) {
                Ok(())
            } else {
                Err(refused())
            };
        }
        // An Entra user of the database: its object id, or its name as the token's UPN,
        // client id or object id.
        let Ok(Some(DbUser::External { object_id })) = self.db_user(&s, database, login).await
        else {
            return Err(refused());
        };
        let matches = match &object_id {
            Some(oid) => who.object_id.eq_ignore_ascii_case(oid),
            None => {
                who.upn
                    .as_deref()
                    .is_some_and(|u| u.eq_ignore_ascii_case(login))
                    || who.client_id.eq_ignore_ascii_case(login)
                    || who.object_id.eq_ignore_ascii_case(login)
            }
        };
        if matches { Ok(()) } else { Err(refused()) }
    }

    async fn open(&self, server: &str, database: &str, login: &str) -> Result<Session, PgError> {
        let s = self.server(server)?;
        // Authenticated for this database: an administrator, a login of the server, or a user
        // of this database (checked again here, whatever the front end did).
        if !self.may_open(&s, database, login).await? {
            return Err(PgError::fatal(
                sqlstate::INSUFFICIENT_PRIVILEGE,
                format!("permission denied for database \"{database}\""),
            ));
        }
        self.0
            .takeover_settled(&crate::id_of_body(&s))
            .await
            .map_err(pg_error)?;
        let open = match self.0.open_database(&s, database).await {
            Ok(o) => o,
            Err(e) if e.code == ErrorCode::ResourceNotFound => {
                return Err(PgError::fatal(
                    sqlstate::INVALID_CATALOG_NAME,
                    format!("database \"{database}\" does not exist"),
                ));
            }
            Err(e) => return Err(pg_error(e)),
        };
        let termination = open.terminator.subscribe();
        let key = open.page_key().map_err(pg_error)?;
        let connection = if open.read_only {
            crate::engine::connect_read_only(open.file.clone(), key).await
        } else {
            crate::engine::connect(open.file.clone(), key).await
        }
        .map_err(pg_error)?;
        // A primary's commits are in the bucket before its client hears of them.
        let barrier = (open.live.is_some() && !open.read_only).then(|| {
            Arc::new(ShipBarrier {
                open: open.clone(),
                service: Arc::downgrade(&self.0),
                runtime: tokio::runtime::Handle::current(),
            }) as Arc<dyn kagi_pgsql::CommitBarrier>
        });
        Ok(Session {
            connection,
            termination,
            barrier,
        })
    }

    async fn list_databases(&self, server: &str) -> Result<Vec<String>, PgError> {
        let s = self.server(server)?;
        let dbs = self.0.databases_of(&s).await.map_err(pg_error)?;
        Ok(dbs.into_iter().map(|d| d.name).collect())
    }

    async fn change_login(
        &self,
        server: &str,
        database: &str,
        actor: &str,
        change: LoginChange,
    ) -> Result<(), PgError> {
        let s = self.server(server)?;
        let id = id_of_body(&s);
        let host = self.0.host.as_ref();
        // One change of a server's logins and users at a time.
        let _logins = self.0.lock_id(&logins::lock_name(&id)).await;
        let err = |e: KvError| PgError::error(sqlstate::INTERNAL_ERROR, e.message);
        // The SQL administrator, or the Entra administrator.
        let is_admin = entra_admin(&s).is_some_and(|(name, _)| name.eq_ignore_ascii_case(actor))
            || logins::get(host, &id, actor)
                .await
                .map_err(err)?
                .is_some_and(|(_, admin)| admin);
        if !is_admin {
            return Err(PgError::error(
                sqlstate::INSUFFICIENT_PRIVILEGE,
                "permission denied: only the server administrator creates, alters and drops users",
            ));
        }
        let db = self.0.database(&s, database).await.map_err(pg_error)?;
        let dbid = db.database_id.clone();
        // Whether `login` is a login of the server (and whether the administrator), and whether
        // a user of this database.
        let server_login = |login: String| {
            let id = id.clone();
            async move {
                logins::get(host, &id, &login)
                    .await
                    .map(|f| f.map(|(_, a)| a))
            }
        };
        let db_user = |login: String| {
            let (id, dbid) = (id.clone(), dbid.clone());
            async move { logins::db_user(host, &id, &dbid, &login).await }
        };
        let exists = |login: &str| {
            PgError::error(
                sqlstate::DUPLICATE_OBJECT,
                format!("role \"{login}\" already exists"),
            )
        };
        let missing = |login: &str| {
            PgError::error(
                sqlstate::UNDEFINED_OBJECT,
                format!("role \"{login}\" does not exist"),
            )
        };
        let entra_name =
            |login: &str| entra_admin(&s).is_some_and(|(name, _)| name.eq_ignore_ascii_case(login));
        match change {
            LoginChange::Create { login, verifier } => {
                if entra_name(&login)
                    || server_login(login.clone()).await.map_err(err)?.is_some()
                    || db_user(login.clone()).await.map_err(err)?.is_some()
                {
                    return Err(exists(&login));
                }
                logins::put_db_user(host, &id, &dbid, &login, &DbUser::Sql(verifier))
                    .await
                    .map_err(err)
            }
            LoginChange::CreateExternal { login, object_id } => {
                if let Some(oid) = &object_id
                    && !is_guid(oid)
                {
                    return Err(PgError::error(
                        sqlstate::INVALID_PARAMETER_VALUE,
                        format!("OBJECT_ID '{oid}' is not a GUID"),
                    ));
                }
                if entra_name(&login)
                    || server_login(login.clone()).await.map_err(err)?.is_some()
                    || db_user(login.clone()).await.map_err(err)?.is_some()
                {
                    return Err(exists(&login));
                }
                let user = DbUser::External { object_id };
                logins::put_db_user(host, &id, &dbid, &login, &user)
                    .await
                    .map_err(err)
            }
            LoginChange::SetPassword { login, verifier } => {
                match db_user(login.clone()).await.map_err(err)? {
                    Some(DbUser::Sql(_)) => {
                        return logins::put_db_user(
                            host,
                            &id,
                            &dbid,
                            &login,
                            &DbUser::Sql(verifier),
                        )
                        .await
                        .map_err(err);
                    }
                    Some(DbUser::External { .. }) => {
                        return Err(PgError::error(
                            sqlstate::FEATURE_NOT_SUPPORTED,
                            format!(
                                "role \"{login}\" is an Entra user: it signs in with an access token, not a password"
                            ),
                        ));
                    }
                    None => {}
                }
                let Some(admin) = server_login(login.clone()).await.map_err(err)? else {
                    return Err(missing(&login));
                };
                logins::put(host, &id, &login, &verifier, admin)
                    .await
                    .map_err(err)
            }
            LoginChange::Drop { login, if_exists } => {
                if logins::remove_db_user(host, &id, &dbid, &login)
                    .await
                    .map_err(err)?
                {
                    return Ok(());
                }
                match server_login(login.clone()).await.map_err(err)? {
                    Some(true) => Err(PgError::error(
                        sqlstate::INSUFFICIENT_PRIVILEGE,
                        format!(
                            "role \"{login}\" is the server administrator and cannot be dropped"
                        ),
                    )),
                    Some(false) => logins::remove(host, &id, &login)
                        .await
                        .map(|_| ())
                        .map_err(err),
                    None if if_exists => Ok(()),
                    None => Err(missing(&login)),
                }
            }
        }
    }
}

/// Whether `s` is a GUID (8-4-4-4-12 hex digits).
fn is_guid(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    parts.len() == 5
        && parts
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(p, n)| p.len() == n && p.chars().all(|c| c.is_ascii_hexdigit()))
}

/// How long a commit waits for the bucket before its session gives up (the commit stays in
/// this node's log and goes with the next piece).
const SHIP_PATIENCE: std::time::Duration = std::time::Duration::from_secs(30);

/// The commit barrier of a session of `open` (see `kagi_pgsql::CommitBarrier`): its commits
/// are in the bucket before the client hears of them.
pub(crate) struct ShipBarrier {
    pub(crate) open: Arc<crate::databases::OpenDatabase>,
    /// The service, told when the live log is fenced off (`SqlService::after_fence`).
    pub(crate) service: std::sync::Weak<SqlService>,
    /// Where that runs.
    pub(crate) runtime: tokio::runtime::Handle,
}

impl kagi_pgsql::CommitBarrier for ShipBarrier {
    fn commit(&self) -> Result<(), kagi_pgsql::PgError> {
        let Some(live) = &self.open.live else {
            return Ok(());
        };
        let key = self.open.page_key().map_err(|e| {
            kagi_pgsql::PgError::fatal(kagi_pgsql::sqlstate::INTERNAL_ERROR, e.message)
        })?;
        let started = std::time::Instant::now();
        let mut pause = std::time::Duration::from_millis(100);
        loop {
            match live.ship(&key) {
                Ok(()) => return Ok(()),
                Err(
                    cut @ (crate::live::LiveError::TakenOver | crate::live::LiveError::Behind(_)),
                ) => {
                    let e = match &cut {
                        crate::live::LiveError::Behind(_) => kagi_pgsql::PgError::fatal(
                            "57P01",
                            "terminating connection because this node's copy of the database is \
                             behind what its live log in the bucket holds (its data directory is \
                             older than what was acknowledged): the last transaction was not \
                             acknowledged, and the database is rebuilt from the bucket; reconnect",
                        ),
                        _ => kagi_pgsql::PgError::fatal(
                            "57P01",
                            "terminating connection because another node took this database's \
                             server over: the last transaction was not acknowledged and is not \
                             part of the database there",
                        ),
                    };
                    // Every session of the database ends: nothing more commits here.
                    self.open.close(e.clone());
                    tracing::warn!(database = %self.open.name, reason = %cut, "live log cut off: sessions ended");
                    if let Some(service) = self.service.upgrade() {
                        let (server, db) =
                            (self.open.server_id.clone(), self.open.database_id.clone());
                        if matches!(cut, crate::live::LiveError::Behind(_)) {
                            service.mark_behind(&db);
                        }
                        self.runtime
                            .spawn(service.after_fence(server, db, live.home_takeover()));
                    }
                    return Err(e);
                }
                Err(e) if started.elapsed() < SHIP_PATIENCE => {
                    tracing::warn!(database = %self.open.name, error = %e, "a commit waits for the bucket");
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(std::time::Duration::from_secs(2));
                }
                Err(e) => {
                    tracing::error!(database = %self.open.name, error = %e, "a commit could not reach the bucket");
                    return Err(kagi_pgsql::PgError::fatal(
                        "58030",
                        "could not ship the commit to the bucket: the transaction has \
                         already committed on this node, but might not survive the loss of \
                         the node; it is shipped with the next commit",
                    ));
                }
            }
        }
    }
}
