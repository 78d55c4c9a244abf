//! kagi's logical SQL servers and databases with transparent data encryption
//! (`Microsoft.Sql`, MISSION TD-1..TD-9, seed 003).
//!
//! Every database has one AES-256 data key (DEK), generated when it is created and never
//! changed. The DEK is kept only wrapped, under the server's TDE protector: the server's own
//! platform key (`ServiceManaged`), or a key version in a key vault reached through its data
//! plane with the server's managed identity (`AzureKeyVault`, through `kagi-cmk`). Switching
//! the protector and rotating it re-wrap DEKs only: one key vault call per database, whatever
//! its size, while its connections go on.
//!
//! Routes (management host; `{server}` is
//! `/subscriptions/{s}/resourceGroups/{rg}/providers/Microsoft.Sql/servers/{name}`):
//!
//! | route | what |
//! |---|---|
//! | `PUT`/`PATCH`/`GET`/`DELETE {server}` | a logical server (identity, administrator login, `keyId`) |
//! | `GET …/providers/Microsoft.Sql/servers` | list (subscription or group) |
//! | `PUT`/`GET`/`DELETE {server}/keys/{vault}_{key}_{version}`, `GET {server}/keys` | server keys |
//! | `GET`/`PUT {server}/encryptionProtector/current`, `GET {server}/encryptionProtector` | the TDE protector |
//! | `POST {server}/encryptionProtector/current/revalidate` | brings back databases made inaccessible |
//! | `PUT`/`PATCH`/`GET`/`DELETE {server}/databases/{db}`, `GET {server}/databases` | databases |
//! | `GET`/`PUT {server}/databases/{db}/transparentDataEncryption/current` | TDE state (always `Enabled`) |
//! | `GET {server}/inaccessibleDatabases` | databases whose protector cannot be reached |
//! | `GET {server}/activityLog` | `MakeDatabaseInaccessible`, `MakeDatabaseAccessible`, protector changes |
//! | `PUT {server}/databases/{db}` with `createMode` `PointInTimeRestore` or `Restore` | a restore from backups ([`backups`]) |
//! | `GET {server}/databases/{db}/backups`, `GET {server}/backupKeys` (kagi's) | backups with their time ranges and keys |
//! | `GET {server}/restorableDroppedDatabases` | dropped databases whose backups remain |
//! | `GET {server}/databases/{db}/providers/Microsoft.ResourceHealth/availabilityStatuses/current` | the database's health (TD-5) |
//! | `PUT {server}/databases/{db}` with `createMode: Secondary` | a geo-secondary of a database of another server ([`geo`]) |
//! | `GET {server}/databases/{db}/replicationLinks[/{id}]`, `DELETE …/{id}`, `POST …/{id}/failover`, `POST …/{id}/forceFailoverAllowDataLoss` | geo-replication links |
//!
//! The keeper ([`keeper`]) probes each server's protector: after a definite failure (the key
//! disabled or deleted, the permission or the identity removed) the server's databases become
//! `Inaccessible` after a bound, their DEKs are dropped from memory and their sessions cut; with
//! the key back within the heal window they come back by themselves, later only through
//! `revalidate`. A transient failure (the key vault unreachable) keeps databases working from
//! their DEK in memory for a day.

#![forbid(unsafe_code)]

mod backup_chain;
mod backup_files;
mod backups;
mod databases;
mod db_keys;
mod engine;
mod gateway;
mod geo;
mod homes;
pub mod keeper;
mod keys;
mod live;
mod logins;
mod protector;
mod replica_files;
pub mod routes;
mod servers;
mod startup;
mod takeover;
mod takeover_sweep;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use kagi_cmk::KeyAccess;
use kagi_core::{ErrorCode, KvError};
use kagi_host::{ArmRequest, Principal, ResourceProvider, ResourceRef, ResourceScope, ServiceHost};
use serde_json::{Value, json};

pub use backups::{BackupReport, spawn_backups};
pub use databases::{OpenDatabase, unavailable_message};
pub use gateway::SqlGateway;
pub use geo::spawn_geo;
pub use keeper::{SweepReport, spawn_keeper};
pub use startup::{OPEN_CONCURRENCY, OpenReport};

/// The namespace.
pub const NAMESPACE: &str = "Microsoft.Sql";
/// Logical servers.
pub const SERVER_TYPE: &str = "Microsoft.Sql/servers";

/// How the service runs. Every duration has an environment variable, for operators and for
/// tests on the test clock.
#[derive(Clone, Debug)]
pub struct SqlConfig {
    /// How often each server's protector is probed, and with `autoRotationEnabled` its newest
    /// version looked up. Default ten minutes (`KAGI_SQL_KEY_POLL_SECONDS`).
    pub key_poll_interval: Duration,
    /// How long after the first definite failure the databases become Inaccessible. Default
    /// ten minutes, Azure's bound (`KAGI_SQL_INACCESSIBLE_AFTER_SECONDS`).
    pub inaccessible_after: Duration,
    /// Databases whose key comes back within this long after they became Inaccessible come
    /// back by themselves; later they need `revalidate`. Default 30 minutes
    /// (`KAGI_SQL_HEAL_WINDOW_SECONDS`).
    pub heal_window: Duration,
    /// How long databases keep working from the DEK in memory while the key vault cannot be
    /// reached. Default 24 hours (`KAGI_SQL_TRANSIENT_GRACE_SECONDS`).
    pub transient_grace: Duration,
    /// How often the keeper looks for servers whose probe is due. Default a minute
    /// (`KAGI_SQL_KEEPER_TICK_SECONDS`).
    pub keeper_tick: Duration,
    /// Where the key vault hosts are reached (default `127.0.0.1:{port}`).
    pub connect: Option<SocketAddr>,
    /// How often each database gets a full backup. Default a day
    /// (`KAGI_SQL_FULL_BACKUP_SECONDS`).
    pub full_backup_interval: Duration,
    /// How often each database's log is backed up (the restore granularity). Default five
    /// minutes, Azure's (`KAGI_SQL_LOG_BACKUP_SECONDS`).
    pub log_backup_interval: Duration,
    /// How long backups are kept (the restore window). Default seven days, Azure's
    /// (`KAGI_SQL_BACKUP_RETENTION_SECONDS`).
    pub backup_retention: Duration,
    /// How often each geo-replication link ships its primary's new log frames to the
    /// secondary: the bound on the replication lag while the secondary keeps up. Default five
    /// seconds (`KAGI_SQL_GEO_SECONDS`).
    pub geo_interval: Duration,
}

use kagi_host::env_seconds as env_secs;

impl Default for SqlConfig {
    fn default() -> Self {
        Self {
            key_poll_interval: env_secs("KAGI_SQL_KEY_POLL_SECONDS", 600),
            inaccessible_after: env_secs("KAGI_SQL_INACCESSIBLE_AFTER_SECONDS", 600),
            heal_window: env_secs("KAGI_SQL_HEAL_WINDOW_SECONDS", 1800),
            transient_grace: env_secs("KAGI_SQL_TRANSIENT_GRACE_SECONDS", 86_400),
            keeper_tick: env_secs("KAGI_SQL_KEEPER_TICK_SECONDS", 60),
            connect: None,
            full_backup_interval: env_secs("KAGI_SQL_FULL_BACKUP_SECONDS", 86_400),
            log_backup_interval: env_secs("KAGI_SQL_LOG_BACKUP_SECONDS", 300),
            backup_retention: env_secs("KAGI_SQL_BACKUP_RETENTION_SECONDS", 7 * 86_400),
            geo_interval: env_secs("KAGI_SQL_GEO_SECONDS", 5),
        }
    }
}

/// The SQL service of one platform.
pub struct SqlService {
    host: Arc<dyn ServiceHost>,
    config: SqlConfig,
    keys: KeyAccess,
    /// Databases whose DEK is in memory, by database id (a GUID).
    open: Mutex<HashMap<String, Arc<OpenDatabase>>>,
    /// The live logs in use, by database id: a database reopened while sessions of its
    /// earlier entry still commit ships through the same log (two would each take the
    /// other's piece for a fence).
    live_logs: Mutex<HashMap<String, std::sync::Weak<live::LiveLog>>>,
    /// Databases whose copy on this node was found behind what was acknowledged (a data
    /// directory put back from an earlier snapshot), by id: no session opens them until a
    /// takeover puts the bucket's copy in place.
    behind: Mutex<std::collections::HashSet<String>>,
    /// Serialises changes of one resource (servers, and each server's protector).
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Where the automatic backups stand.
    backups: backups::BackupState,
    /// Where geo-replication links stand.
    geo: Arc<geo::GeoState>,
    /// What the keeper's last pass saw of each server (by id, lower case), for the metrics.
    keeper_view: Mutex<HashMap<String, keeper::ServerView>>,
    /// Itself, for work that outlives a borrowed `&self` (a takeover reached from
    /// [`ResourceProvider::home`]).
    me: std::sync::Weak<SqlService>,
}

impl std::fmt::Debug for SqlService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqlService")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl SqlService {
    /// The service on `host`: its databases under `<data>/sql`.
    pub fn new(host: Arc<dyn ServiceHost>, config: SqlConfig) -> Result<Arc<Self>, KvError> {
        let c = host.config();
        let addr = config
            .connect
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], c.port)));
        let user_agent = concat!("kagi-sql-service/", env!("CARGO_PKG_VERSION"));
        std::fs::create_dir_all(c.data_dir.join("sql"))
            .map_err(|e| keys::internal("creating the SQL data directory", e))?;
        Ok(Arc::new_cyclic(|me| Self {
            // TD-1: unlike disks and backup vaults, a server may use a key vault of another
            // region (Azure lifted that rule for TDE).
            keys: KeyAccess::new(&c, addr, "SQL server", user_agent).in_any_region(),
            host,
            config,
            open: Mutex::new(HashMap::new()),
            live_logs: Mutex::new(HashMap::new()),
            behind: Mutex::default(),
            locks: Mutex::new(HashMap::new()),
            backups: backups::BackupState::default(),
            geo: Arc::default(),
            keeper_view: Mutex::new(HashMap::new()),
            me: me.clone(),
        }))
    }

    /// The service as an `Arc` (it always is one: [`SqlService::new`]).
    pub(crate) fn arc(&self) -> Result<Arc<Self>, KvError> {
        self.me
            .upgrade()
            .ok_or_else(|| keys::internal("the SQL service", "it is shutting down"))
    }

    /// The host it runs on.
    pub fn host(&self) -> &Arc<dyn ServiceHost> {
        &self.host
    }

    /// The lock that serialises the changes of `id` (any case), held.
    pub(crate) async fn lock_id(&self, id: &str) -> tokio::sync::OwnedMutexGuard<()> {
        self.lock_of(id).lock_owned().await
    }

    fn lock_of(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut all = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        all.entry(id.to_ascii_lowercase()).or_default().clone()
    }

    async fn route(
        self: &Arc<Self>,
        caller: &Principal,
        req: ArmRequest<'_>,
    ) -> Result<(u16, Value), KvError> {
        let (method, body) = (req.method, req.body);
        let not_found = || KvError::new(ErrorCode::NotFound, "No such route.");
        let scope = req.scope("microsoft.sql")?;
        let (sub, rg, rest, rest_l) = (
            scope.subscription,
            scope.resource_group,
            scope.rest,
            scope.rest_l,
        );
        if let (["servers"], "GET") = (rest_l, method) {
            let scope = ResourceScope {
                subscription: sub,
                resource_group: rg,
                resource_type: SERVER_TYPE,
            };
            let mut v = self.host.list_resources(caller, scope)?;
            if let Some(items) = v["value"].as_array_mut() {
                for item in items.iter_mut() {
                    *item = servers::view(item.take());
                }
            }
            return Ok((200, v));
        }
        let (Some(rg), Some("servers"), Some(name)) = (rg, rest_l.first().copied(), rest.get(1))
        else {
            return Err(not_found());
        };
        let at = server_ref(sub, rg, name);
        let under = &rest_l[2..];
        match (under, method) {
            ([], "PUT" | "PATCH") => {
                self.put_server(caller, at, json_body(body)?, method == "PATCH")
                    .await
            }
            ([], "GET") => Ok((200, servers::view(self.host.get_resource(caller, at)?))),
            ([], "DELETE") => self.delete_server(caller, at).await,
            _ => {
                // Everything under a server needs the server, readable by the caller.
                let server = self.host.get_resource(caller, at)?;
                self.route_under(caller, &server, under, method, &rest[2..], body)
                    .await
            }
        }
    }

    async fn route_under(
        self: &Arc<Self>,
        caller: &Principal,
        server: &Value,
        under: &[&str],
        method: &str,
        segs: &[&str],
        body: &[u8],
    ) -> Result<(u16, Value), KvError> {
        let not_found = || KvError::new(ErrorCode::NotFound, "No such route.");
        match (under, method) {
            (["keys"], "GET") => self.list_server_keys(server).await,
            (["keys", _], "PUT") => {
                self.put_server_key(caller, server, segs[1], json_body(body)?)
                    .await
            }
            (["keys", _], "GET") => self.get_server_key(server, segs[1]).await,
            (["keys", _], "DELETE") => self.delete_server_key(server, segs[1]).await,
            (["encryptionprotector"], "GET") => {
                let current = self.protector_view(server).await?;
                Ok((200, json!({ "value": [current] })))
            }
            (["encryptionprotector", "current"], "GET") => {
                Ok((200, self.protector_view(server).await?))
            }
            (["encryptionprotector", "current"], "PUT" | "PATCH") => {
                self.put_protector(caller, server, json_body(body)?).await
            }
            (["encryptionprotector", "current", "revalidate"], "POST") => {
                self.revalidate(server).await
            }
            (["databases"], "GET") => self.list_databases(server, false).await,
            (["inaccessibledatabases"], "GET") => self.list_databases(server, true).await,
            (
                [
                    "databases",
                    _,
                    "providers",
                    "microsoft.resourcehealth",
                    "availabilitystatuses",
                    "current",
                ],
                "GET",
            ) => Ok((200, self.health_view(server, segs[1]).await?)),
            (["databases", _], "PUT" | "PATCH") => {
                self.put_database(caller, server, segs[1], json_body(body)?, method == "PATCH")
                    .await
            }
            (["databases", _, "replicationlinks"], "GET") => {
                Ok((200, self.list_links(server, segs[1], None).await?))
            }
            (["databases", _, "replicationlinks", _], "GET") => {
                Ok((200, self.list_links(server, segs[1], Some(segs[3])).await?))
            }
            (["databases", _, "replicationlinks", _], "DELETE") => {
                self.delete_link(server, segs[1], segs[3]).await
            }
            (["databases", _, "replicationlinks", _, "failover"], "POST") => {
                self.failover(server, segs[1], segs[3], false).await
            }
            (
                [
                    "databases",
                    _,
                    "replicationlinks",
                    _,
                    "forcefailoverallowdataloss",
                ],
                "POST",
            ) => self.failover(server, segs[1], segs[3], true).await,
            (["databases", _], "GET") => Ok((200, self.get_database(server, segs[1]).await?)),
            (
                [
                    "databases",
                    _,
                    "encryptionprotector",
                    "current",
                    "revalidate",
                ],
                "POST",
            ) => self.revalidate_database(server, segs[1]).await,
            (["databases", _, "encryptionprotector", "current", "revert"], "POST") => {
                self.revert_database_key(server, segs[1]).await
            }
            (["databases", _], "DELETE") => self.delete_database(server, segs[1]).await,
            (["databases", _, "backups"], "GET") => self.list_backups(server, segs[1]).await,
            (["restorabledroppeddatabases"], "GET") => self.list_restorable_dropped(server).await,
            (["backupkeys"], "GET") => self.list_backup_keys(server).await,
            (["databases", _, "transparentdataencryption"], "GET") => {
                let tde = self.tde_view(server, segs[1]).await?;
                Ok((200, json!({ "value": [tde] })))
            }
            (["databases", _, "transparentdataencryption", "current"], "GET") => {
                Ok((200, self.tde_view(server, segs[1]).await?))
            }
            (["databases", _, "transparentdataencryption", "current"], "PUT" | "PATCH") => {
                self.put_tde(server, segs[1], json_body(body)?).await
            }
            (["activitylog"], "GET") => {
                let entries = self.host.activity(&id_of_body(server)).await?;
                Ok((200, json!({ "value": entries })))
            }
            _ => Err(not_found()),
        }
    }
}

impl SqlService {
    /// Serves every server's databases over the PostgreSQL protocol on `listeners`, with TLS
    /// (`tls`: certificates of the platform's CA, chosen by SNI), until `shutdown` is
    /// cancelled.
    pub fn serve_postgres(
        self: &Arc<Self>,
        listeners: Vec<tokio::net::TcpListener>,
        tls: Arc<kagi_pgsql::rustls::ServerConfig>,
        shutdown: kagi_pgsql::CancellationToken,
    ) {
        let gateway: Arc<dyn kagi_pgsql::Gateway> = Arc::new(SqlGateway(self.clone()));
        for listener in listeners {
            let config = kagi_pgsql::PgConfig {
                tls: Some(tls.clone()),
                ..kagi_pgsql::PgConfig::default()
            };
            let (gateway, shutdown) = (gateway.clone(), shutdown.clone());
            tokio::spawn(async move {
                if let Err(e) = kagi_pgsql::serve(listener, None, gateway, config, shutdown).await {
                    tracing::error!(error = %e, "the PostgreSQL listener stopped");
                }
            });
        }
    }
}

/// Where server `name` of group `rg` is.
pub(crate) fn server_ref<'a>(sub: &'a str, rg: &'a str, name: &'a str) -> ResourceRef<'a> {
    ResourceRef {
        subscription: sub,
        resource_group: rg,
        resource_type: SERVER_TYPE,
        name,
    }
}

/// The `id` of a resource body.
pub(crate) fn id_of_body(body: &Value) -> String {
    body["id"].as_str().unwrap_or_default().to_string()
}

/// A 400 with Azure's inner error code.
pub(crate) fn bad(inner: &'static str, message: impl Into<String>) -> KvError {
    kagi_cmk::bad(inner, message)
}

use kagi_host::json_body;

/// Logical servers and databases as the platform's HTTP layer sees them: server identities
/// are trusted by vault firewalls, as Azure SQL is a trusted Microsoft service.
#[async_trait]
impl ResourceProvider for SqlService {
    fn namespace(&self) -> &'static str {
        NAMESPACE
    }

    fn resource_types(&self) -> &'static [&'static str] {
        &[SERVER_TYPE]
    }

    fn routes(&self) -> &'static [kagi_core::route_table::Route] {
        routes::ROUTES
    }

    async fn handle(
        self: Arc<Self>,
        caller: &Principal,
        req: ArmRequest<'_>,
    ) -> Result<kagi_host::ArmReply, KvError> {
        match self.route(caller, req).await {
            Ok(reply) => Ok(reply.into()),
            // Microsoft.Sql names the error itself in `error.code` (what the SDKs and az show),
            // not in an inner error as the key vault does.
            Err(e) if e.inner.is_some() && e.code != ErrorCode::InternalError => Ok((
                e.status(),
                json!({"error": {"code": e.inner, "message": e.message}}),
            )
                .into()),
            Err(e) => Err(e),
        }
    }

    async fn home(&self, req: &ArmRequest<'_>) -> Result<Option<String>, KvError> {
        self.request_home(req).await
    }

    fn trusted_for_vault_firewall(&self) -> bool {
        true
    }

    /// `kagi_sql_databases_open`, and, as the keeper's last pass saw them,
    /// `kagi_sql_databases_inaccessible` and `kagi_cmk_keys_in_grace{service="sql"}`.
    fn gauges(&self) -> Vec<kagi_core::gauge::GaugeSample> {
        self.keeper_gauges()
    }
}
