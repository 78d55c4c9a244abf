//! TD-9: after a start, every database of every server is opened (its DEK unwrapped into
//! memory) before clients need it: one key vault call per database, the key itself checked once
//! per server, at most [`OPEN_CONCURRENCY`] calls at once.

use std::sync::Arc;
use std::time::Instant;

use kagi_cmk::{Kek, KeyOwner, dek_from, key_unusable};
use serde_json::Value;

use crate::protector::identity_choice;
use crate::{SERVER_TYPE, SqlService, id_of_body};

/// Key vault calls in flight at once while opening (Azure's guidance: a key vault serves a few
/// hundred databases per server; this keeps its throttling limits far away).
pub const OPEN_CONCURRENCY: usize = 16;

/// What opening every database did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OpenReport {
    /// Databases whose DEK is now in memory.
    pub opened: u64,
    /// Key vault unwraps made (customer keys; the platform key is local).
    pub unwraps: u64,
    /// Databases not opened (the keeper's probes decide what happens to them).
    pub failed: u64,
    /// Wall time, in milliseconds.
    pub millis: u64,
}

impl SqlService {
    /// Removes database files no database names (a create or restore that a crash cut
    /// short: ciphertext whose key records are gone or were never kept), among those last
    /// written before `started` (the process's start: a create under way now writes after it).
    /// Returns how many databases' files went.
    pub async fn remove_orphan_files(&self, started: std::time::SystemTime) -> u64 {
        let mut known = std::collections::HashSet::new();
        for server in self.host.resources_of_type(SERVER_TYPE) {
            if let Ok(dbs) = self.databases_of(&server).await {
                known.extend(dbs.into_iter().map(|d| d.database_id.to_ascii_lowercase()));
            }
        }
        let dir = self.host.config().data_dir.join("sql");
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return 0;
        };
        let mut removed = 0;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().to_ascii_lowercase();
            let Some(id) = name.strip_suffix(".db") else {
                continue;
            };
            let before_start = entry
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t < started);
            if id.len() == 36 && !known.contains(id) && before_start {
                tracing::warn!(file = %entry.path().display(), "orphan database file removed");
                if crate::engine::remove_files(&entry.path()).await.is_ok() {
                    removed += 1;
                }
            }
        }
        removed
    }

    /// Opens every Online database that is not open yet.
    pub async fn open_all(self: &Arc<Self>) -> OpenReport {
        let started = Instant::now();
        let limit = Arc::new(tokio::sync::Semaphore::new(OPEN_CONCURRENCY));
        let mut tasks = tokio::task::JoinSet::new();
        let mut report = OpenReport::default();
        for server in self.local_servers().await {
            let Ok(dbs) = self.databases_of(&server).await else {
                continue;
            };
            let server_kek = self.usable_kek(&server).await.map(Arc::new);
            let server = Arc::new(server);
            for db in dbs {
                if db.inaccessible() || self.open_dek(&db.database_id).is_some() {
                    continue;
                }
                // A database with a key of its own opens with its own identity.
                // A database whose key cannot be reached now is counted as not opened (the
                // keeper's passes and its first client try again).
                let kek = match crate::db_keys::own_protector(&db) {
                    Some(p) => match self.kek(&server, &p).await {
                        Ok(k) => Arc::new(k),
                        Err(_) => {
                            report.failed += 1;
                            continue;
                        }
                    },
                    None => match &server_kek {
                        Some(k) => k.clone(),
                        None => {
                            report.failed += 1;
                            continue;
                        }
                    },
                };
                let (svc, server, kek, limit) = (self.clone(), server.clone(), kek, limit.clone());
                tasks.spawn(async move {
                    let _permit = limit.acquire_owned().await;
                    (id_of_body(&server), svc.open_one(&server, &db, &kek).await)
                });
            }
        }
        let mut probed = std::collections::BTreeSet::new();
        while let Some(done) = tasks.join_next().await {
            match done {
                Ok((server_id, Some(remote))) => {
                    report.opened += 1;
                    report.unwraps += u64::from(remote);
                    probed.insert(server_id);
                }
                _ => report.failed += 1,
            }
        }
        // A server whose key just unwrapped its databases' keys needs no probe now.
        for server_id in probed {
            if let Err(e) = self.mark_probed(&server_id).await {
                tracing::warn!(server = %server_id, error = %e.message, "probe time not kept");
            }
        }
        report.millis = started.elapsed().as_millis() as u64;
        report
    }

    /// The server's key encryption key when its key can be used now (checked once for all
    /// its databases); `None` otherwise.
    async fn usable_kek(&self, server: &Value) -> Option<Kek> {
        let protector = self.protector(server).await.ok()?;
        if let Some(kid) = &protector.kid {
            let ua = identity_choice(server).ok()?;
            let token = self
                .host
                .identity_token(&id_of_body(server), ua.as_deref())
                .ok()?;
            let uri = self.keys.parse(kid).ok()?;
            let bundle = self.keys.client().get_key(&uri, &token).await.ok()?;
            if key_unusable(&bundle, self.host.now(), "SQL server").is_some() {
                return None;
            }
        }
        self.kek(server, &protector).await.ok()
    }

    /// Opens one database with `kek`: its record under `kek` unwrapped (the key vault's
    /// unwrap alone for a customer key). Returns whether the key vault was called; `None`
    /// when it could not be opened.
    async fn open_one(
        &self,
        server: &Value,
        db: &crate::databases::Database,
        kek: &Kek,
    ) -> Option<bool> {
        let owner = self.db_keys(server, db);
        let records = owner.wrapped_keys().await.ok()?;
        let record = records
            .iter()
            .filter(|r| r.kek.id().eq_ignore_ascii_case(&kek.id()))
            .max_by_key(|r| r.created)?;
        let (dek, remote) = match kek {
            Kek::Customer { kid, token, .. } => {
                let uri = self.keys.parse(kid).ok()?;
                let plain = self
                    .keys
                    .client()
                    .unwrap(&uri, token, &record.wrapped)
                    .await
                    .ok()?;
                (
                    dek_from(&zeroize::Zeroizing::new(plain), "unwrapped DEK").ok()?,
                    true,
                )
            }
            Kek::Platform(_) => (
                self.keys
                    .unwrap(&owner, kek, record, self.host.now())
                    .await
                    .ok()?,
                false,
            ),
        };
        self.remember_open(server, db, dek).await;
        Some(remote)
    }
}
