//! The keeper: probes every server's TDE protector and drives the database states (TD-4), and
//! follows new key versions for servers with `autoRotationEnabled` (TD-3).
//!
//! Per server and probe:
//! - the protector answers (get, and the unwrap of a database's DEK): failures are forgotten;
//!   inaccessible databases whose key came back within the heal window come back online;
//!   with `autoRotationEnabled` a newer key version becomes the protector;
//! - a definite failure (4xx: key disabled or deleted, permission or identity removed): from
//!   the first one, the server's databases become Inaccessible after
//!   [`SqlConfig::inaccessible_after`](crate::SqlConfig);
//! - a transient failure (5xx, unreachable): the databases keep working from the DEK in
//!   memory, and become Inaccessible only if it lasts
//!   [`SqlConfig::transient_grace`](crate::SqlConfig).
//!
//! A server is probed every key poll interval, and at every tick while something is pending
//! (a failure seen, a database inaccessible).

use std::sync::Arc;

use kagi_cmk::{FailureKind, KeyError, key_unusable};
use kagi_core::KvError;
use serde_json::{Value, json};

use crate::databases::{Database, KeyScope};
use crate::keys::{DBKEYS_DOC, SERVER_DOC};
use crate::protector::Protector;
use crate::{SERVER_TYPE, SqlService, id_of_body};

/// Servers probed at once by a pass.
const PROBE_CONCURRENCY: usize = 8;

/// What one pass did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Servers whose protector was probed.
    pub probed: u64,
    /// Databases made Inaccessible.
    pub made_inaccessible: u64,
    /// Databases brought back online.
    pub recovered: u64,
    /// Servers whose protector moved to a newer key version.
    pub rotated: u64,
}

/// What a keeper pass saw of one server: its databases that are Inaccessible, and its
/// protectors (the server's and databases' own) that fail while a database under them still
/// works (inside the grace before it becomes Inaccessible).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct ServerView {
    inaccessible: i64,
    keys_in_grace: i64,
}

/// A probe's verdict.
enum Probe {
    Usable,
    Failed(FailureKind, String),
}

/// Starts the keeper: every database opened ([`SqlService::open_all`]), then a pass every
/// keeper tick; and the automatic backups ([`crate::spawn_backups`]), geo-replication
/// ([`crate::spawn_geo`]) and the takeover sweep (`crate::takeover_sweep`).
pub fn spawn_keeper(service: Arc<SqlService>) -> tokio::task::JoinHandle<()> {
    let started = std::time::SystemTime::now();
    tokio::spawn(async move {
        let orphans = service.remove_orphan_files(started).await;
        if orphans > 0 {
            tracing::warn!(orphans, "database files no database named were removed");
        }
        // TD-9: every database open again before the first probe.
        let opened = service.open_all().await;
        tracing::info!(
            databases = opened.opened,
            unwraps = opened.unwraps,
            failed = opened.failed,
            millis = opened.millis,
            "SQL databases opened"
        );
        // Automatic backups (TD-6) run on their own schedule, once the databases are open.
        crate::backups::spawn_backups(service.clone());
        // Geo-replication (TD-7): each link ships its primary's log on its own schedule.
        crate::geo::spawn_geo(service.clone());
        // Servers whose home is gone are taken over without waiting for a request.
        crate::takeover_sweep::spawn_takeover_sweep(service.clone());
        let mut tick = tokio::time::interval(service.config.keeper_tick);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            match service.sweep().await {
                Ok(r) if r != SweepReport::default() => tracing::info!(?r, "SQL keeper pass"),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e.message, "SQL keeper pass failed"),
            }
        }
    })
}

impl SqlService {
    /// Closes the databases open here whose server another node serves now (taken over while
    /// this node was cut off), or that another node deleted (their server, or the database,
    /// while this node was deemed not running): their sessions end (they would read a stale
    /// copy, or a deleted database) and their keys leave this node's memory. A deleted
    /// database's files go too (no create can be under way in a deleted server, and a dropped
    /// database's id is never used again).
    async fn close_moved_databases(&self) {
        if !self.host.shares_store() {
            return;
        }
        let open: Vec<(String, String, bool)> = self
            .open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|o| (o.server_id.clone(), o.database_id.clone(), o.read_only))
            .collect();
        let me = self.host.node_name();
        for (server, database, read_only) in open {
            // Why, and whether it was deleted.
            let (why, deleted) = if self.host.resource(&server).is_none() {
                ("its server was deleted through another node", true)
            } else {
                match self.server_home(&server).await {
                    Ok(Some(home)) if home != me => {
                        ("another node serves this database's server now", false)
                    }
                    // A drop deletes the database's key records first; a create (or restore)
                    // writes them before it opens the database. (A geo-secondary's are the
                    // link's business.)
                    Ok(_) if !read_only => {
                        match self.host.document(&server, DBKEYS_DOC, &database).await {
                            Ok(None) => ("the database was dropped through another node", true),
                            _ => continue,
                        }
                    }
                    _ => continue,
                }
            };
            if let Some(gone) =
                self.let_go_of(&database, format!("terminating connection because {why}"))
            {
                tracing::warn!(server = %server, database = %gone.name, why, "a database open here was closed");
                if deleted && let Err(e) = crate::engine::remove_files(&gone.file).await {
                    tracing::warn!(database = %gone.name, error = %e.message, "a deleted database's files were not removed");
                }
            }
        }
    }

    /// One pass over every server.
    pub async fn sweep(self: &Arc<Self>) -> Result<SweepReport, KvError> {
        self.close_moved_databases().await;
        // Servers are probed side by side (a few at a time), so that servers behind an
        // unreachable key vault do not delay everyone else's bound.
        let limit = Arc::new(tokio::sync::Semaphore::new(PROBE_CONCURRENCY));
        let mut tasks = tokio::task::JoinSet::new();
        for server in self.local_servers().await {
            let (svc, limit) = (self.clone(), limit.clone());
            tasks.spawn(async move {
                let _permit = limit.acquire_owned().await;
                let mut report = SweepReport::default();
                if let Err(e) = svc.keep_server(&server, &mut report).await {
                    tracing::warn!(server = %id_of_body(&server), error = %e.message, "SQL keeper");
                }
                report
            });
        }
        // Servers deleted since the last pass leave the view.
        let ids: std::collections::HashSet<String> = self
            .host
            .resources_of_type(SERVER_TYPE)
            .iter()
            .map(|s| id_of_body(s).to_ascii_lowercase())
            .collect();
        self.keeper_view
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|id, _| ids.contains(id));
        let mut report = SweepReport::default();
        while let Some(done) = tasks.join_next().await {
            if let Ok(r) = done {
                report.probed += r.probed;
                report.made_inaccessible += r.made_inaccessible;
                report.recovered += r.recovered;
                report.rotated += r.rotated;
            }
        }
        Ok(report)
    }

    async fn keep_server(&self, server: &Value, report: &mut SweepReport) -> Result<(), KvError> {
        let id = id_of_body(server);
        let now = self.host.now();
        let health = self
            .host
            .document(&id, SERVER_DOC, "health")
            .await?
            .unwrap_or_else(|| json!({}));
        let dbs = self.databases_of(server).await?;
        let mine = |d: &&Database| KeyScope::Server.covers(d);
        let pending =
            health["failingSince"].is_i64() || dbs.iter().filter(mine).any(|d| d.inaccessible());
        let mut failing = health["failingSince"].is_i64();
        if self.probe_due(&health, pending, now) {
            report.probed += 1;
            let protector = self.protector(server).await?;
            let verdict = match &protector.kid {
                None => Probe::Usable,
                Some(_) => self.probe(server, &protector, dbs.iter().find(mine)).await,
            };
            let health = self
                .judge(server, KeyScope::Server, health, verdict, report)
                .await?;
            failing = !health.1;
            self.host
                .put_document(&id, SERVER_DOC, "health", &health.0)
                .await?;
            if health.1 && protector.auto_rotation && self.follow_newest(server, &protector).await?
            {
                report.rotated += 1;
            }
        }
        // Databases with keys of their own: the same, each with its own identity and key. One
        // database's failure does not keep the others from being probed.
        for db in dbs.iter().filter(|d| d.has_own_key()) {
            if let Err(e) = self.keep_database_key(server, db, report).await {
                tracing::warn!(database = %db.name, error = %e.message, "SQL keeper: database key");
            }
        }
        // The databases as this pass found them (a change it made shows at the next pass).
        let works = |d: &Database| !d.inaccessible();
        let own_failing = dbs
            .iter()
            .filter(|d| d.has_own_key() && d.doc["cmkHealth"]["failingSince"].is_i64())
            .filter(|d| works(d))
            .count();
        let view = ServerView {
            inaccessible: i64::try_from(dbs.iter().filter(|d| d.inaccessible()).count())
                .unwrap_or(i64::MAX),
            keys_in_grace: i64::from(failing && dbs.iter().filter(mine).any(works))
                + i64::try_from(own_failing).unwrap_or(i64::MAX),
        };
        self.keeper_view
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.to_ascii_lowercase(), view);
        Ok(())
    }

    /// The SQL service's gauges for the metrics: databases open now, and what the keeper's
    /// last pass saw (databases Inaccessible, protectors failing inside their grace).
    pub(crate) fn keeper_gauges(&self) -> Vec<kagi_core::gauge::GaugeSample> {
        use kagi_core::gauge::{GaugeSample, KEYS_IN_GRACE, KEYS_IN_GRACE_HELP};
        let open = i64::try_from(self.open.lock().unwrap_or_else(|p| p.into_inner()).len())
            .unwrap_or(i64::MAX);
        let (inaccessible, in_grace) = self
            .keeper_view
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .fold((0, 0), |(a, b), v| {
                (a + v.inaccessible, b + v.keys_in_grace)
            });
        vec![
            GaugeSample::new(
                "kagi_sql_databases_open",
                "SQL databases open (their data key in memory).",
                open,
            ),
            GaugeSample::new(
                "kagi_sql_databases_inaccessible",
                "SQL databases Inaccessible because their TDE protector cannot be used, as the keeper's last pass saw them.",
                inaccessible,
            ),
            GaugeSample::new(KEYS_IN_GRACE, KEYS_IN_GRACE_HELP, in_grace).label("service", "sql"),
        ]
    }

    /// [`SqlService::keep_server`] for database `db`'s own key.
    async fn keep_database_key(
        &self,
        server: &Value,
        db: &Database,
        report: &mut SweepReport,
    ) -> Result<(), KvError> {
        let now = self.host.now();
        let protector = self.protector_for(server, db).await?;
        let kid = protector.kid.clone().unwrap_or_default();
        // A record of another key's probes (the key moved since) does not count.
        let health = match &db.doc["cmkHealth"] {
            h if h.is_object() && h["kid"].as_str() == Some(kid.as_str()) => h.clone(),
            _ => json!({"kid": kid}),
        };
        let pending = health["failingSince"].is_i64() || db.inaccessible();
        if !self.probe_due(&health, pending, now) {
            return Ok(());
        }
        report.probed += 1;
        let verdict = self.probe(server, &protector, Some(db)).await;
        let scope = KeyScope::Database(&db.name);
        let (health, usable) = self.judge(server, scope, health, verdict, report).await?;
        self.put_db_health(server, &db.name, &kid, health).await?;
        if usable
            && !db.inaccessible()
            && protector.auto_rotation
            && self.follow_newest_db(server, &db.name).await?
        {
            report.rotated += 1;
        }
        Ok(())
    }

    /// Whether a protector whose record is `health` is probed now: at every tick while
    /// something is pending, else every key poll interval.
    fn probe_due(&self, health: &Value, pending: bool, now: i64) -> bool {
        let last = health["lastProbe"].as_i64().unwrap_or(i64::MIN / 2);
        pending || now - last >= self.config.key_poll_interval.as_secs() as i64
    }

    /// What a probe's verdict does to the databases of `scope` (TD-4): the new health record,
    /// and whether the protector is usable.
    async fn judge(
        &self,
        server: &Value,
        scope: KeyScope<'_>,
        mut health: Value,
        verdict: Probe,
        report: &mut SweepReport,
    ) -> Result<(Value, bool), KvError> {
        let now = self.host.now();
        health["lastProbe"] = json!(now);
        match verdict {
            Probe::Usable => {
                if let Some(o) = health.as_object_mut() {
                    o.remove("failingSince");
                    o.remove("failure");
                    o.remove("kind");
                }
                report.recovered += self.recover_databases(server, scope, false).await?;
                Ok((health, true))
            }
            Probe::Failed(kind, why) => {
                let since = health["failingSince"].as_i64().unwrap_or(now);
                // A transient failure after a definite one keeps the definite clock.
                let kind = match (health["kind"].as_str(), kind) {
                    (Some("Definite"), _) | (_, FailureKind::Definite) => FailureKind::Definite,
                    _ => FailureKind::Transient,
                };
                health["failingSince"] = json!(since);
                health["failure"] = json!(why);
                health["kind"] = json!(format!("{kind:?}"));
                let bound = match kind {
                    FailureKind::Definite => self.config.inaccessible_after,
                    FailureKind::Transient => self.config.transient_grace,
                };
                if now - since >= bound.as_secs() as i64 {
                    report.made_inaccessible += self.make_inaccessible(server, scope, &why).await?;
                }
                Ok((health, false))
            }
        }
    }

    /// Records that server `id`'s protector answered now (a probe's success seen elsewhere):
    /// the next probe is a poll interval away.
    pub(crate) async fn mark_probed(&self, id: &str) -> Result<(), KvError> {
        let mut health = self
            .host
            .document(id, SERVER_DOC, "health")
            .await?
            .unwrap_or_else(|| json!({}));
        if health["failingSince"].is_i64() {
            return Ok(());
        }
        health["lastProbe"] = json!(self.host.now());
        self.host
            .put_document(id, SERVER_DOC, "health", &health)
            .await
    }

    /// Probes `protector` with the identity it uses (the server's, or a database's own): the
    /// key (enabled, valid) and the unwrap of `db`'s DEK record under it, as the engine would
    /// need.
    async fn probe(&self, server: &Value, protector: &Protector, db: Option<&Database>) -> Probe {
        let definite = |why: String| Probe::Failed(FailureKind::Definite, why);
        let Some(kid) = protector.kid.as_deref() else {
            return Probe::Usable;
        };
        let token = match self.kek(server, protector).await {
            Ok(kagi_cmk::Kek::Customer { token, .. }) => token,
            Ok(_) => return Probe::Usable,
            Err(e) => return definite(format!("the identity is gone: {}", e.message)),
        };
        let Ok(uri) = self.keys.parse(kid) else {
            return definite(format!("the key id '{kid}' is not valid"));
        };
        let bundle = match self.keys.client().get_key(&uri, &token).await {
            Ok(b) => b,
            Err(f) => {
                return Probe::Failed(
                    f.kind(),
                    format!("the key '{kid}' could not be read: {}", f.reason()),
                );
            }
        };
        if let Some((inner, why)) = key_unusable(&bundle, self.host.now(), "SQL server") {
            return definite(format!("the key '{kid}' cannot be used: {why} ({inner})"));
        }
        // The unwrap permission is what the databases need: probe it on one DEK record.
        let Some(db) = db else {
            return Probe::Usable;
        };
        // Only a record under the protector in force counts: an older key's record would hide
        // the revocation of this one.
        match self.open_dek_under(server, db, protector).await {
            Ok(_) => Probe::Usable,
            Err(KeyError::Access(f) | KeyError::Unopened(Some(f))) => {
                Probe::Failed(f.kind, f.message)
            }
            Err(KeyError::Unopened(None)) => definite("no wrapped data key".into()),
            Err(KeyError::Other(e)) => Probe::Failed(FailureKind::Transient, e.message),
        }
    }

    /// With `autoRotationEnabled`: when the key has a newer version, it becomes the
    /// protector (added as a server key, every DEK re-wrapped). Returns whether it moved.
    async fn follow_newest(
        &self,
        server: &Value,
        protector: &crate::protector::Protector,
    ) -> Result<bool, KvError> {
        let Some(kid) = &protector.kid else {
            return Ok(false);
        };
        let Some(newest) = self.newer_key_version(server, kid, None).await? else {
            return Ok(false);
        };
        let name = self.add_server_key(server, &newest).await?;
        self.switch_protector(server, Some(&name), true).await?;
        tracing::info!(server = %id_of_body(server), key = %newest, "TDE protector rotated");
        Ok(true)
    }
}
