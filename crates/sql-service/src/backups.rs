//! Automatic backups of SQL databases and point-in-time restore (TD-6; docs/SQL.md, "Backups
//! and point-in-time restore").
//!
//! Every Online database gets a full backup every [`SqlConfig::full_backup_interval`] (SQLite's
//! backup API, under the database's own DEK and id) and a log backup every
//! [`SqlConfig::log_backup_interval`] (the WAL frames committed since the last one, copied as
//! ciphertext), then a checkpoint that never goes past what was copied; a read snapshot held
//! between passes keeps any other checkpoint from passing it either. Each backup is synced,
//! then recorded under the server with a copy of the database's wrapped DEK and the protector
//! in force: rotation never touches a backup, and a restore unwraps each backup's DEK with the
//! key it was taken under. A restore (`createMode: PointInTimeRestore`) replays the full backup
//! and its log backups up to the point in a private directory, under the old DEK, and copies
//! the result into a new database under a new DEK.
//!
//! With `kagi server --blobs s3://…` every backup file is also uploaded to the bucket
//! (`sql-backups/{database id}/{file}`, ciphertext as it is on disk) before its record is
//! written, so the backups outlive the machine; a restore fetches the files of its chain that
//! are not on this node's disk from there, and retention deletes them from both places.
//!
//! [`SqlConfig::full_backup_interval`]: crate::SqlConfig
//! [`SqlConfig::log_backup_interval`]: crate::SqlConfig

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use kagi_cmk::{KeyError, records_in};
use kagi_core::{ErrorCode, KvError};
use kagi_host::Principal;
use kagi_sqlite_crypt::DatabaseKey;
use serde_json::{Value, json};

use crate::backup_chain::{Cursor, Taken, WalGen, chain_for, cursor_after};
use crate::backup_files::{self, Ending, FileError, Pin, StageOne, Written, finish, finish_tail};
use crate::databases::{Database, OpenDatabase};
use crate::geo::parse_database_id;
use crate::homes::HomeGuard;
use crate::keys::{DBKEYS_DOC, DbKeys, internal};
use crate::protector::{AZURE_KEY_VAULT, Protector, SERVICE_MANAGED, key_name};
use crate::{SERVER_TYPE, SqlService, bad, id_of_body, server_ref};

/// The document kind (under the server) of the databases that have backups, named by database
/// id: the database's name, and when it was dropped.
const INDEX_DOC: &str = "sqlbackupdb";
/// A log that a pass could not drain (writers kept committing) and that holds at least this many
/// frames gets a short second stage under the write lock, so that it can restart: under steady
/// writes it would otherwise grow without end.
const RESTART_FRAMES: u32 = 1024;
/// How often retention and the sweep of leftovers run (at most).
const HOUSEKEEPING_SECS: i64 = 3600;

/// The document kind of one database's backup records (named by sequence number).
fn record_kind(database_id: &str) -> String {
    format!("sqlbackup/{}", database_id.to_ascii_lowercase())
}

/// A blocking step on the blocking pool. A database that stayed busy is no failure of kagi's:
/// 503, not logged as an error.
pub(crate) async fn blocking<T: Send + 'static>(
    what: &str,
    f: impl FnOnce() -> Result<T, FileError> + Send + 'static,
) -> Result<T, KvError> {
    match tokio::task::spawn_blocking(f).await {
        Err(e) => Err(internal(what, e)),
        Ok(Err(FileError::Busy)) => Err(KvError::new(
            ErrorCode::ServiceUnavailable,
            format!("The database stayed busy during {what}; try again later."),
        )),
        Ok(r) => r.map_err(|e| internal(what, e)),
    }
}

/// What one backup pass did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BackupReport {
    /// Full backups recorded.
    pub full: u64,
    /// Log backups recorded.
    pub log: u64,
    /// Backups removed by retention.
    pub removed: u64,
    /// Databases whose pass failed (they are tried again at the next pass).
    pub failed: u64,
}

/// How far a takeover's first backup is numbered past the last record it read.
const TAKEOVER_SEQ_GAP: u64 = 16;

/// Where the backups of one database stand, in memory (rebuilt from the records after a start).
#[derive(Clone, Debug)]
struct DbState {
    cursor: Option<Cursor>,
    next_seq: u64,
    chain: u64,
    last_full: Option<i64>,
    last_taken: Option<i64>,
    last_attempt: i64,
    /// The first piece of the live log that carries these backups on (the pieces before it
    /// are an earlier home's, replayed into the database a takeover backed up: `crate::live`).
    live_from: Option<u64>,
}

impl DbState {
    fn of(records: &[Value]) -> Self {
        let last = records.last();
        DbState {
            cursor: last.map(cursor_of),
            next_seq: last.and_then(|r| r["seq"].as_u64()).unwrap_or(0) + 1,
            chain: last.and_then(|r| r["chain"].as_u64()).unwrap_or(0),
            last_full: records
                .iter()
                .filter(|r| r["type"] == "Full")
                .filter_map(|r| r["taken"].as_i64())
                .max(),
            last_taken: last.and_then(|r| r["taken"].as_i64()),
            last_attempt: i64::MIN / 2,
            live_from: last.and_then(|r| r["liveFrom"].as_u64()),
        }
    }
}

/// Where the backups stand once backup record `r` is (its log generation and last frame).
pub(crate) fn cursor_of(r: &Value) -> Cursor {
    Cursor {
        generation: wal_generation(&r["wal"]),
        frames: u32::try_from(r["wal"]["last"].as_u64().unwrap_or(0)).unwrap_or(0),
        drained: false,
    }
}

fn wal_generation(w: &Value) -> Option<WalGen> {
    let n = |k: &str| w[k].as_u64().and_then(|v| u32::try_from(v).ok());
    Some(WalGen {
        salt1: n("salt1")?,
        salt2: n("salt2")?,
        checkpoint_seq: n("checkpointSeq")?,
    })
}

/// What the backup pass and restores keep in memory.
#[derive(Debug, Default)]
pub(crate) struct BackupState {
    dbs: Mutex<HashMap<String, DbState>>,
    /// Databases (by id) whose retention next runs at that time.
    retention_at: Mutex<HashMap<String, i64>>,
    /// Work directories of restores in progress.
    restores: Mutex<HashSet<PathBuf>>,
    /// When leftovers are next swept.
    sweep_at: Mutex<i64>,
    /// The snapshot each Online database's backups hold between passes (see [`Pin`]).
    pins: Mutex<HashMap<String, Pin>>,
}

impl std::fmt::Debug for Pin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pin")
    }
}

fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl SqlService {
    /// Where the backups of database `database_id` are.
    fn backup_dir(&self, database_id: &str) -> PathBuf {
        self.host
            .config()
            .data_dir
            .join("sql-backups")
            .join(database_id.to_ascii_lowercase())
    }

    /// Where restores work.
    fn restore_root(&self) -> PathBuf {
        self.host.config().data_dir.join("sql-restore")
    }

    /// Uploads backup files of database `database_id` to the bucket (`--blobs s3://…`; nothing
    /// to do on local files), before the record that names them is written.
    async fn share_backup_files(&self, database_id: &str, files: &[String]) -> Result<(), KvError> {
        let (blobs, dir) = (self.host.config().blobs, self.backup_dir(database_id));
        for f in files {
            blobs
                .upload_file(&dir, f)
                .await
                .map_err(|e| internal("upload a backup file", e))?;
        }
        Ok(())
    }

    /// The backup records of database `database_id` of `server`, by sequence number.
    pub(crate) async fn records(
        &self,
        server_id: &str,
        database_id: &str,
    ) -> Result<Vec<Value>, KvError> {
        let mut all: Vec<Value> = self
            .host
            .documents(server_id, &record_kind(database_id))
            .await?
            .into_iter()
            .map(|(_, d)| d)
            .collect();
        all.sort_by_key(|d| d["seq"].as_u64().unwrap_or(0));
        Ok(all)
    }

    /// One pass of automatic backups over every server: each Online database whose full or log
    /// backup is due, then retention. Failures are logged and tried again at the next pass.
    pub async fn backup_pass(self: &Arc<Self>) -> BackupReport {
        let mut report = BackupReport::default();
        let now = self.host.now();
        let mut sweep = {
            let mut at = locked(&self.backups.sweep_at);
            let due = now >= *at;
            if due {
                *at = now + HOUSEKEEPING_SECS;
            }
            due
        };
        let servers = self.local_servers().await;
        let mut known = HashSet::new();
        let mut active = HashSet::new();
        for server in &servers {
            // A server this node is taking (back) over is backed up by the takeover itself;
            // a pass now would back up the copies it replaces.
            if self.taking_over(&id_of_body(server)) {
                continue;
            }
            let dbs = match self.databases_of(server).await {
                Ok(d) => d,
                Err(e) => {
                    tracing::warn!(error = %e.message, "SQL backups: databases not listed");
                    report.failed += 1;
                    sweep = false;
                    continue;
                }
            };
            // A geo-secondary is not backed up (its primary is), as in Azure.
            for db in dbs
                .iter()
                .filter(|d| !d.inaccessible() && !d.is_secondary())
            {
                let open = locked(&self.open).get(&db.database_id).cloned();
                let Some(open) = open else { continue };
                active.insert(db.database_id.clone());
                match self.backup_database(server, db, &open, &mut report).await {
                    Ok(()) => {}
                    // Sessions held the write lock: the next pass tries again.
                    Err(e) if e.code == ErrorCode::ServiceUnavailable => {
                        tracing::info!(database = %db.name, "SQL backup put off: {}", e.message);
                        if let Some(st) = locked(&self.backups.dbs).get_mut(&db.database_id) {
                            st.last_attempt = i64::MIN / 2;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(database = %db.name, error = %e.message, "SQL backup failed");
                        report.failed += 1;
                        // Rebuilt from the records next time (leftover files removed).
                        locked(&self.backups.dbs).remove(&db.database_id);
                    }
                }
            }
            match self.keep_backups_of(server, &dbs, now, &mut report).await {
                Ok(ids) => known.extend(ids),
                Err(e) => {
                    tracing::warn!(error = %e.message, "SQL backups: retention failed");
                    report.failed += 1;
                    // A failed listing must not make the sweep take live backups for leftovers.
                    sweep = false;
                }
            }
        }
        // The databases of a server this node is taking over (not its home yet, or taking it
        // back) keep the state the takeover set; no leftover sweep meanwhile.
        for server in self.host.resources_of_type(SERVER_TYPE) {
            if self.taking_over(&id_of_body(&server)) {
                sweep = false;
                if let Ok(dbs) = self.databases_of(&server).await {
                    active.extend(dbs.into_iter().map(|d| d.database_id));
                }
            }
        }
        // A database no longer Online loses its pin (it holds the database's files open); its
        // state is rebuilt from the records when it comes back, as after a start.
        let gone: Vec<String> = locked(&self.backups.pins)
            .keys()
            .filter(|id| !active.contains(*id))
            .cloned()
            .collect();
        for id in gone {
            locked(&self.backups.pins).remove(&id);
            locked(&self.backups.dbs).remove(&id);
        }
        if sweep {
            self.sweep_leftovers(&known).await;
        }
        report
    }

    /// The in-memory state of `db`'s backups, rebuilt from its records when missing (files no
    /// record names, left by a pass that died, are removed then).
    async fn db_state(&self, server: &Value, db: &Database) -> Result<DbState, KvError> {
        if let Some(s) = locked(&self.backups.dbs).get(&db.database_id) {
            return Ok(s.clone());
        }
        let server_id = id_of_body(server);
        let id = db.database_id.to_ascii_lowercase();
        if self
            .host
            .document(&server_id, INDEX_DOC, &id)
            .await?
            .is_none()
        {
            let entry = json!({"databaseId": db.database_id, "name": db.name, "dropped": null});
            self.host
                .put_document(&server_id, INDEX_DOC, &id, &entry)
                .await?;
        }
        let records = self.records(&server_id, &db.database_id).await?;
        let named: HashSet<String> = records
            .iter()
            .flat_map(|r| file_names(r).into_iter())
            .collect();
        let dir = self.backup_dir(&db.database_id);
        blocking("removing leftover backup files", move || {
            remove_unnamed(&dir, &named)
        })
        .await?;
        let state = DbState::of(&records);
        locked(&self.backups.dbs).insert(db.database_id.clone(), state.clone());
        Ok(state)
    }

    /// The key the backups of `db` are under now: a copy of its DEK records and the protector
    /// in force (the one a record is under; the newest record's during a change).
    async fn key_snapshot(&self, server: &Value, db: &Database) -> Result<Value, KvError> {
        let dek = self
            .host
            .document(&id_of_body(server), DBKEYS_DOC, &db.database_id)
            .await?
            .unwrap_or_else(|| json!({"records": []}));
        let records = records_in(&dek);
        let protector = self.protector_for(server, db).await?;
        let in_force = protector.record_id();
        let key_id = if records
            .iter()
            .any(|r| r.kek.id().eq_ignore_ascii_case(&in_force))
        {
            in_force
        } else {
            records
                .iter()
                .max_by_key(|r| r.created)
                .map(|r| r.kek.id())
                .ok_or_else(|| internal("backups", "a database without a wrapped data key"))?
        };
        let view = match key_id.as_str() {
            "pmk" => json!({"serverKeyType": SERVICE_MANAGED, "serverKeyName": SERVICE_MANAGED,
                "uri": null, "thumbprint": null}),
            kid if protector.database.is_some() => {
                // The database's own key, reached with its own identity.
                let name = self
                    .keys
                    .parse(kid)
                    .map(|u| key_name(&u))
                    .unwrap_or_default();
                json!({"serverKeyType": AZURE_KEY_VAULT, "serverKeyName": name, "uri": kid,
                    "thumbprint": db.doc["cmk"]["keys"][kid]["thumbprint"],
                    "identity": protector.database.as_ref().map(|d| d.identity.clone())})
            }
            kid => {
                let name = self
                    .keys
                    .parse(kid)
                    .map(|u| key_name(&u))
                    .unwrap_or_default();
                let thumbprint = match self.get_server_key(server, &name).await {
                    Ok((_, v)) => v["properties"]["thumbprint"].clone(),
                    Err(_) => Value::Null,
                };
                json!({"serverKeyType": AZURE_KEY_VAULT, "serverKeyName": name, "uri": kid,
                    "thumbprint": thumbprint})
            }
        };
        Ok(json!({"dek": {"records": dek["records"]}, "protector": view}))
    }

    /// Records a backup written by a pass (after its files are synced), under the pass's
    /// `guard`.
    async fn record(
        &self,
        (server, guard): (&Value, &HomeGuard),
        db: &Database,
        w: &Written,
        (chain, live_from): (u64, Option<u64>),
        range: (i64, i64),
        keys: &Value,
    ) -> Result<(), KvError> {
        self.share_backup_files(&db.database_id, &w.files).await?;
        let full = w.full();
        let doc = json!({
            "seq": w.seq,
            "type": if full { "Full" } else { "Log" },
            "chain": chain,
            "taken": range.1,
            "from": range.0,
            "to": range.1,
            "databaseId": db.database_id,
            "pageId": db.page_id,
            "databaseName": db.name,
            "files": w.files,
            "size": w.size,
            "wal": w.generation.map(|g| json!({"salt1": g.salt1, "salt2": g.salt2,
                "checkpointSeq": g.checkpoint_seq, "first": w.first, "last": w.last})),
            "liveFrom": live_from,
            "dek": keys["dek"],
            "protector": keys["protector"],
        });
        self.put_guarded(
            guard,
            &id_of_body(server),
            (&record_kind(&db.database_id), &format!("{:010}", w.seq)),
            &doc,
        )
        .await
    }

    /// The backups of one database, when due: the first stage and its records, then the end
    /// of the pass (a second stage and its record when writers kept the log busy), the pin
    /// kept until the next pass.
    async fn backup_database(
        &self,
        server: &Value,
        db: &Database,
        open: &Arc<OpenDatabase>,
        report: &mut BackupReport,
    ) -> Result<(), KvError> {
        // One pass over a database at a time (the backup pass, and a backup taken at once).
        let _pass = self.lock_id(&format!("{}/pass", db.database_id)).await;
        let now = self.host.now();
        let mut st = self.db_state(server, db).await?;
        let secs = |d: std::time::Duration| i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
        let full_due = st
            .last_full
            .is_none_or(|t| now - t >= secs(self.config.full_backup_interval));
        if !full_due && now - st.last_attempt < secs(self.config.log_backup_interval) {
            return Ok(());
        }
        st.last_attempt = now;
        locked(&self.backups.dbs).insert(db.database_id.clone(), st.clone());
        // Another node taking the server over: this one records nothing more.
        let guard = self.home_guard(server).await?;
        if matches!(guard, HomeGuard::Elsewhere) {
            return Ok(());
        }
        // The live log up to date first: committed frames not shipped yet (a crash between a
        // commit and its piece) go now, and a copy of the database behind what the live log
        // holds (its data directory put back from an earlier snapshot) is found at the first
        // pass after a start, before a client reads it for long.
        // (Not in a takeover's own pass: its log is this node's from when the home is
        // recorded.)
        if let Some(live) = open.live.clone()
            && db.doc["geo"]["role"].is_null()
            && matches!(&guard, HomeGuard::Home(home) if home.get("takingOver").is_none())
        {
            let key = open.page_key()?;
            match tokio::task::spawn_blocking(move || live.ship(&key)).await {
                Ok(Ok(())) => {}
                Ok(Err(crate::live::LiveError::Behind(_))) => {
                    return Err(self.rebuild_from_bucket(server, (db, open), "its live log"));
                }
                Ok(Err(crate::live::LiveError::TakenOver)) => {
                    return self.take_back_later(server, (db, open));
                }
                Ok(Err(e)) => return Err(internal("shipping the live log", e)),
                Err(e) => return Err(internal("shipping the live log", e)),
            }
        }
        let keys = self.key_snapshot(server, db).await?;
        let dir = self.backup_dir(&db.database_id);
        let key = open.page_key()?;
        let file = open.file.clone();
        // Where the live log stands before the snapshot: a full backup holds every piece
        // before it, and records it (`liveFrom`).
        let live_next = match open.live.clone() {
            Some(live) => Some(
                tokio::task::spawn_blocking(move || live.next_piece())
                    .await
                    .map_err(|e| internal("reading the live log", e))?
                    .map_err(|e| internal("reading the live log", e))?,
            ),
            None => None,
        };
        let (cursor, seq, host) = (st.cursor, st.next_seq, self.host.clone());
        let one = blocking("a backup", move || {
            let clock = || host.now();
            backup_files::stage_one((&file, &key), cursor, (full_due, &clock), &dir, seq)
        })
        .await?;
        // The new snapshot holds the log: the previous one goes.
        locked(&self.backups.pins).remove(&db.database_id);
        let StageOne {
            mut pass,
            state,
            taken,
            log,
            full,
        } = one;
        // With a live log, a copy behind its own backups is an older copy of the database
        // (its data directory put back from an earlier snapshot): what it lacks was
        // acknowledged, and is in the bucket. Nothing of it is recorded; the database is
        // rebuilt from the bucket. (A geo-replication link is not taken over: its database
        // keeps the backups' old way, a new chain.)
        if open.live.is_some()
            && db.doc["geo"]["role"].is_null()
            && crate::backup_chain::is_behind(st.cursor.as_ref(), state.generation(), state.frames)
        {
            drop(pass);
            let dir = self.backup_dir(&db.database_id);
            for w in log.iter().chain(full.iter()) {
                for f in &w.files {
                    let _ = tokio::fs::remove_file(dir.join(f)).await;
                }
            }
            return Err(self.rebuild_from_bucket(server, (db, open), "its backups"));
        }
        for w in log.iter().chain(full.iter()) {
            let chain = if w.full() { w.seq } else { st.chain };
            if w.full() {
                // A takeover's first backup carries on from its fence (`start_live_lineage`).
                st.live_from = st.live_from.max(live_next);
            }
            let from = if w.full() {
                taken
            } else {
                st.last_taken.unwrap_or(taken)
            };
            self.record(
                (server, &guard),
                db,
                w,
                (chain, st.live_from),
                (from, taken),
                &keys,
            )
            .await?;
            if w.full() {
                report.full += 1;
                st.chain = w.seq;
                st.last_full = Some(taken);
                // Retention looks at this database again now that a full backup is newer.
                locked(&self.backups.retention_at).remove(&db.database_id);
            } else {
                report.log += 1;
            }
            st.cursor = Some(cursor_after(w.generation, w.last));
            st.next_seq = w.seq + 1;
            st.last_taken = Some(taken);
        }
        locked(&self.backups.dbs).insert(db.database_id.clone(), st.clone());
        let Some(mut cursor) = st.cursor else {
            return Ok(());
        };
        let copied = (state.generation(), state.frames);
        let (dir, seq) = (self.backup_dir(&db.database_id), st.next_seq);
        let (mut pass, ending) = blocking("the end of a backup", move || {
            let ending = finish(&mut pass, &cursor, copied, (&dir, seq, RESTART_FRAMES))?;
            Ok((pass, ending))
        })
        .await?;
        cursor.drained = match ending {
            Ending::Done { drained } => drained,
            Ending::Tail { written, .. } => {
                // The write lock is held: writers wait for this record (one small document),
                // and the log is as it was at this time.
                let taken = self.host.now();
                let from = st.last_taken.unwrap_or(taken);
                self.record(
                    (server, &guard),
                    db,
                    &written,
                    (st.chain, st.live_from),
                    (from, taken),
                    &keys,
                )
                .await?;
                report.log += 1;
                st.next_seq = written.seq + 1;
                st.last_taken = Some(taken);
                cursor = cursor_after(written.generation, written.last);
                // Its geo-replication link catches up under the same lock, so that the log can
                // restart.
                let mut hook = self.tail_hook(server, db).await;
                let (p, drained) = blocking("the end of a backup", move || {
                    let drained = finish_tail(&mut pass, &mut |phase, _| {
                        if let Some(h) = hook.as_mut() {
                            h.at(phase);
                        }
                    })?;
                    drop(hook);
                    Ok((pass, drained))
                })
                .await?;
                pass = p;
                drained
            }
        };
        st.cursor = Some(cursor);
        let live_from = st.live_from;
        locked(&self.backups.dbs).insert(db.database_id.clone(), st);
        if let Some(pin) = pass.keep() {
            locked(&self.backups.pins).insert(db.database_id.clone(), pin);
        }
        // The live log's pieces these backups hold whole go.
        if let Some(live) = open.live.clone() {
            match tokio::task::spawn_blocking(move || live.prune(&cursor, live_from)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(database = %db.name, error = %e, "SQL live log: pieces the backups hold not removed");
                }
                Err(e) => {
                    tracing::warn!(database = %db.name, error = %e, "SQL live log: pruning failed")
                }
            }
        }
        Ok(())
    }

    /// Ends the sessions of database `db`, whose copy on this node is behind `what` (its
    /// backups, or its live log), keeps it closed to sessions, and rebuilds it from the
    /// bucket in the background ([`Self::take_back_later`]). The 503 the pass ends with.
    fn rebuild_from_bucket(
        &self,
        server: &Value,
        (db, open): (&Database, &OpenDatabase),
        what: &str,
    ) -> KvError {
        tracing::error!(database = %db.name, behind = what, "this node's copy of the database is behind what was acknowledged: rebuilt from the bucket");
        // No session opens it meanwhile (nor for good, if its server cannot be taken back:
        // a geo-replication link, an Inaccessible database).
        self.mark_behind(&db.database_id);
        self.end_sessions(
            &db.database_id,
            "terminating connection because this node's copy of the database is behind what \
             was acknowledged: the database is rebuilt from the bucket; reconnect",
        );
        match self.take_back_later(server, (db, open)) {
            Ok(()) => KvError::new(
                ErrorCode::ServiceUnavailable,
                format!(
                    "The database '{}' is being rebuilt from the bucket.",
                    db.name
                ),
            ),
            Err(e) => e,
        }
    }

    /// Takes the server of database `db` back from the bucket in the background, once, if
    /// this node is still its home under the takeover number `open`'s live log was opened
    /// with (`crate::takeover`, `after_fence`).
    fn take_back_later(
        &self,
        server: &Value,
        (db, open): (&Database, &OpenDatabase),
    ) -> Result<(), KvError> {
        let seen = open.live.as_ref().map_or(0, |l| l.home_takeover());
        let service = self.arc()?;
        tokio::spawn(service.rebuild_later(id_of_body(server), db.database_id.clone(), seen));
        Ok(())
    }

    /// Forgets where database `id`'s backups stand (rebuilt from its records when needed).
    pub(crate) fn forget_backup_state(&self, id: &str) {
        locked(&self.backups.dbs).remove(id);
    }

    /// Notes that database `db`'s backups from now on are carried on by its live log from
    /// piece `from`, and that its next backup is a full one (a takeover: the pieces before it
    /// were replayed into what that backup holds).
    pub(crate) async fn start_live_lineage(
        &self,
        server: &Value,
        db: &Database,
        from: u64,
    ) -> Result<(), KvError> {
        // After a pass under way (it records nothing now: the home record is marked), so that
        // its state does not replace this.
        let _pass = self.lock_id(&format!("{}/pass", db.database_id)).await;
        let mut st = self.db_state(server, db).await?;
        st.live_from = Some(from);
        // The next pass takes a full backup, whatever the log looks like: a log that looks
        // like it continues the backups (an empty one, after backups that held no frame) would
        // otherwise be taken for their continuation.
        st.last_full = None;
        // Numbered clear of what the old home may still record: a pass it had under way when
        // it was cut off records at most a log backup, a full one and a tail after the last
        // record the takeover read, and their files and records must not be this node's.
        st.next_seq += TAKEOVER_SEQ_GAP;
        locked(&self.backups.dbs).insert(db.database_id.clone(), st);
        Ok(())
    }

    /// Backs database `db` up now, whatever the intervals (a full backup when it has none or
    /// its log no longer continues its backups): a new database's first backup, and a database
    /// taken over, whose live log must carry on from a backup (`crate::live`).
    pub(crate) async fn backup_now(
        &self,
        server: &Value,
        db: &Database,
        open: &Arc<OpenDatabase>,
    ) -> Result<(), KvError> {
        if let Some(st) = locked(&self.backups.dbs).get_mut(&db.database_id) {
            st.last_attempt = i64::MIN / 2;
        }
        let mut report = BackupReport::default();
        self.backup_database(server, db, open, &mut report).await
    }

    /// Retention for every database of `server` that has backups (live or dropped), when due;
    /// notes databases dropped without a note. Returns the ids of the databases with backups.
    async fn keep_backups_of(
        &self,
        server: &Value,
        dbs: &[Database],
        now: i64,
        report: &mut BackupReport,
    ) -> Result<Vec<String>, KvError> {
        let server_id = id_of_body(server);
        let mut ids = Vec::new();
        for (id, mut entry) in self.host.documents(&server_id, INDEX_DOC).await? {
            ids.push(id.clone());
            let live = dbs.iter().any(|d| d.database_id.eq_ignore_ascii_case(&id));
            if !live && entry["dropped"].is_null() {
                // Dropped without the note (a crash in between): dropped now, as far as known.
                entry["dropped"] = json!(now);
                self.host
                    .put_document(&server_id, INDEX_DOC, &id, &entry)
                    .await?;
            }
            let due = locked(&self.backups.retention_at)
                .get(&id)
                .is_none_or(|at| now >= *at);
            if !due {
                continue;
            }
            let retention =
                i64::try_from(self.config.backup_retention.as_secs()).unwrap_or(i64::MAX);
            locked(&self.backups.retention_at)
                .insert(id.clone(), now + retention.clamp(1, HOUSEKEEPING_SECS));
            report.removed += self
                .apply_retention(&server_id, &id, entry["dropped"].as_i64(), now, retention)
                .await?;
        }
        Ok(ids)
    }

    /// Removes the backups of database `id` that retention lets go: records first, then files
    /// (a crash in between leaves files no record names, removed later).
    async fn apply_retention(
        &self,
        server_id: &str,
        id: &str,
        dropped: Option<i64>,
        now: i64,
        retention: i64,
    ) -> Result<u64, KvError> {
        let _g = self.lock_id(&format!("{id}/backups")).await;
        let records = self.records(server_id, id).await?;
        let taken: Vec<Taken> = records.iter().filter_map(taken_of).collect();
        let gone = crate::backup_chain::expired(&taken, now, retention, dropped);
        let mut files = Vec::new();
        for r in records
            .iter()
            .filter(|r| r["seq"].as_u64().is_some_and(|s| gone.contains(&s)))
        {
            let seq = r["seq"].as_u64().unwrap_or(0);
            self.host
                .delete_document(server_id, &record_kind(id), &format!("{seq:010}"))
                .await?;
            files.extend(file_names(r));
        }
        let all_gone = !records.is_empty() && gone.len() == records.len();
        let dir = self.backup_dir(id);
        let blobs = self.host.config().blobs;
        for f in &files {
            if let Err(e) = blobs.remove(&dir, f).await {
                tracing::warn!(file = %f, error = %e, "SQL backups: expired file not removed from the bucket");
            }
        }
        blocking("removing expired backups", move || {
            for f in &files {
                let _ = std::fs::remove_file(dir.join(f));
            }
            if all_gone {
                let _ = std::fs::remove_dir_all(&dir);
            }
            Ok(())
        })
        .await?;
        if all_gone && dropped.is_some() {
            self.host.delete_document(server_id, INDEX_DOC, id).await?;
            locked(&self.backups.retention_at).remove(id);
        }
        Ok(gone.len() as u64)
    }

    /// Removes what no record names: backup directories of databases no server knows (a
    /// deleted server's), and work directories of restores that are not running.
    async fn sweep_leftovers(&self, known: &HashSet<String>) {
        let roots = (
            self.host.config().data_dir.join("sql-backups"),
            self.restore_root(),
        );
        let running = locked(&self.backups.restores).clone();
        // A restore running here may be fetching another node's backups (its work directory
        // is named `{database id}-{random}`): they stay until it is done.
        let fetching = running.iter().filter_map(|w| {
            let name = w.file_name()?.to_string_lossy().to_string();
            Some(name.rsplit_once('-')?.0.to_string())
        });
        let known: HashSet<String> = known
            .iter()
            .cloned()
            .chain(fetching)
            .map(|k| k.to_ascii_lowercase())
            .collect();
        let r = tokio::task::spawn_blocking(move || {
            let dirs = |root: &Path| -> Vec<PathBuf> {
                std::fs::read_dir(root)
                    .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
                    .unwrap_or_default()
            };
            for d in dirs(&roots.0) {
                let name = d
                    .file_name()
                    .map(|n| n.to_string_lossy().to_ascii_lowercase());
                if name.is_some_and(|n| !known.contains(&n)) {
                    let _ = std::fs::remove_dir_all(&d);
                }
            }
            for d in dirs(&roots.1) {
                if !running.contains(&d) {
                    let _ = std::fs::remove_dir_all(&d);
                }
            }
        })
        .await;
        if let Err(e) = r {
            tracing::warn!(error = %e, "SQL backups: leftovers not swept");
        }
    }

    /// Removes every backup of database `db` (records first, then files): its point-in-time
    /// restore history, which Azure loses when a database comes back by `revalidate` after the
    /// heal window. Its backups start again with a full backup.
    pub(crate) async fn drop_backup_history(
        &self,
        server: &Value,
        db: &Database,
    ) -> Result<u64, KvError> {
        let server_id = id_of_body(server);
        let _g = self.lock_id(&format!("{}/backups", db.database_id)).await;
        let records = self.records(&server_id, &db.database_id).await?;
        for r in &records {
            let seq = r["seq"].as_u64().unwrap_or(0);
            self.host
                .delete_document(
                    &server_id,
                    &record_kind(&db.database_id),
                    &format!("{seq:010}"),
                )
                .await?;
        }
        self.forget_backup_pin(&db.database_id);
        let dir = self.backup_dir(&db.database_id);
        if let Err(e) = self.host.config().blobs.remove_all(&dir).await {
            tracing::warn!(database = %db.name, error = %e, "SQL backups: files not removed from the bucket");
        }
        blocking("removing backups", move || {
            let _ = std::fs::remove_dir_all(&dir);
            Ok(())
        })
        .await?;
        Ok(records.len() as u64)
    }

    /// Ends the snapshot the backups of database `id` hold (it stopped being backed up: a
    /// primary that failed over).
    pub(crate) fn forget_backup_pin(&self, id: &str) {
        locked(&self.backups.pins).remove(id);
        locked(&self.backups.dbs).remove(id);
    }

    /// Notes that database `db` of `server` was dropped: its backups stay for the retention
    /// period, restorable under its name.
    pub(crate) async fn note_dropped(&self, server: &Value, db: &Database) {
        let server_id = id_of_body(server);
        let id = db.database_id.to_ascii_lowercase();
        locked(&self.backups.pins).remove(&db.database_id);
        locked(&self.backups.dbs).remove(&db.database_id);
        let r = async {
            if let Some(mut entry) = self.host.document(&server_id, INDEX_DOC, &id).await? {
                entry["dropped"] = json!(self.host.now());
                self.host
                    .put_document(&server_id, INDEX_DOC, &id, &entry)
                    .await?;
            }
            Ok::<(), KvError>(())
        }
        .await;
        if let Err(e) = r {
            tracing::warn!(database = %db.name, error = %e.message, "SQL backups: drop not noted");
        }
    }
}

/// The files a record names.
fn file_names(record: &Value) -> Vec<String> {
    record["files"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|f| f.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Removes the files of `dir` not in `named` (a missing directory is fine).
fn remove_unnamed(dir: &Path, named: &HashSet<String>) -> Result<(), FileError> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    let mut removed = false;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if !named.contains(&name) {
            let _ = std::fs::remove_file(e.path());
            removed = true;
        }
    }
    if removed {
        backup_files::sync_dir(dir)?;
    }
    Ok(())
}

/// A record as the chain rules see it.
pub(crate) fn taken_of(r: &Value) -> Option<Taken> {
    Some(Taken {
        seq: r["seq"].as_u64()?,
        full: r["type"] == "Full",
        chain: r["chain"].as_u64()?,
        taken: r["taken"].as_i64()?,
    })
}

/// Starts the automatic backups: a pass every log backup interval (at least a second, at most a
/// minute); whether a database's backup is due follows the platform clock.
pub fn spawn_backups(service: Arc<SqlService>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let every = service.config.log_backup_interval.clamp(
            std::time::Duration::from_secs(1),
            std::time::Duration::from_secs(60),
        );
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let r = service.backup_pass().await;
            if r != BackupReport::default() {
                tracing::info!(?r, "SQL backup pass");
            }
        }
    })
}

// ---------------------------------------------------------------------------------------------
// Restore
// ---------------------------------------------------------------------------------------------

/// A restore made ready before the new database exists: the source replayed to the restore
/// point in a private work directory (ciphertext under the source's DEK), open.
pub(crate) struct PreparedRestore {
    work: PathBuf,
    conn: Option<rusqlite::Connection>,
    state: Arc<SqlService>,
}

impl Drop for PreparedRestore {
    fn drop(&mut self) {
        self.conn = None;
        let _ = std::fs::remove_dir_all(&self.work);
        locked(&self.state.backups.restores).remove(&self.work);
    }
}

/// The database a restore starts from.
pub(crate) struct Source {
    pub(crate) name: String,
    pub(crate) database_id: String,
    /// Its server: the restore's own, or another (a restore onto another server, e.g. after
    /// the source server's home was lost: its records and backups are in the store and the
    /// bucket).
    pub(crate) server: Value,
}

/// .NET ticks (Azure's restorable dropped database ids) of Unix seconds.
fn ticks(unix: i64) -> i64 {
    (unix + 62_135_596_800).saturating_mul(10_000_000)
}

fn invalid_point(message: String) -> KvError {
    bad("InvalidRestorePointInTime", message)
}

impl SqlService {
    /// The database named `name` of `server` for its backups: the live one, else the one
    /// dropped last (or at `deleted`, to the second).
    async fn backup_source(
        &self,
        server: &Value,
        name: &str,
        deleted: Option<i64>,
    ) -> Result<(Source, Option<i64>), KvError> {
        if deleted.is_none()
            && let Ok(db) = self.database(server, name).await
        {
            return Ok((
                Source {
                    name: db.name,
                    database_id: db.database_id,
                    server: server.clone(),
                },
                None,
            ));
        }
        let dropped = self
            .host
            .documents(&id_of_body(server), INDEX_DOC)
            .await?
            .into_iter()
            .map(|(_, e)| e)
            .filter(|e| {
                e["name"]
                    .as_str()
                    .is_some_and(|n| n.eq_ignore_ascii_case(name))
            })
            .filter_map(|e| e["dropped"].as_i64().map(|d| (d, e)))
            .filter(|(d, _)| deleted.is_none_or(|want| want == *d))
            .max_by_key(|(d, _)| *d);
        let Some((when, e)) = dropped else {
            return Err(KvError::new(
                ErrorCode::ResourceNotFound,
                format!(
                    "The database '{}/{name}' was not found, and no dropped database of that \
                     name has backups.",
                    server["name"].as_str().unwrap_or_default()
                ),
            )
            .with_inner("SourceDatabaseNotFound"));
        };
        Ok((
            Source {
                name: e["name"].as_str().unwrap_or(name).to_string(),
                database_id: e["databaseId"].as_str().unwrap_or_default().to_string(),
                server: server.clone(),
            },
            Some(when),
        ))
    }

    /// The server of `id`, a database of another server than the restore's (a point-in-time
    /// restore onto another server): one the caller can see.
    fn other_source_server(
        &self,
        caller: &Principal,
        id: &str,
    ) -> Result<(Value, String), KvError> {
        let (sub, rg, srv, name) = parse_database_id(id).ok_or_else(|| {
            bad(
                "InvalidSourceDatabaseId",
                format!(
                    "sourceDatabaseId '{id}' is not the resource id of a database of Microsoft.Sql."
                ),
            )
        })?;
        let server = self
            .host
            .get_resource(caller, server_ref(sub, rg, srv))
            .map_err(|_| {
                KvError::new(
                    ErrorCode::ResourceNotFound,
                    format!("The source database '{id}' was not found."),
                )
                .with_inner("SourceDatabaseNotFound")
            })?;
        Ok((server, name.to_string()))
    }

    /// The source and restore point a restore request names.
    async fn restore_target(
        &self,
        caller: &Principal,
        server: &Value,
        input: &Value,
    ) -> Result<(Source, i64), KvError> {
        let props = &input["properties"];
        let mode = props["createMode"].as_str().unwrap_or_default();
        let server_id = id_of_body(server);
        let point = props["restorePointInTime"].as_str();
        let parse_point = |p: &str| {
            kagi_core::time::parse_rfc3339(p).ok_or_else(|| {
                invalid_point(format!("restorePointInTime '{p}' is not an RFC 3339 time."))
            })
        };
        let under = |id: &str, kind: &str| -> Option<String> {
            let rest = id
                .get(server_id.len()..)
                .filter(|_| id[..server_id.len()].eq_ignore_ascii_case(&server_id))?;
            let rest = rest.strip_prefix('/')?;
            let (k, name) = rest.split_once('/')?;
            (k.eq_ignore_ascii_case(kind) && !name.is_empty() && !name.contains('/'))
                .then(|| name.to_string())
        };
        if mode.eq_ignore_ascii_case("PointInTimeRestore") {
            let id = props["sourceDatabaseId"].as_str().unwrap_or_default();
            // A database of this server, or of another one (its backups are under that
            // server's records, and in the bucket when its home is gone).
            let (source_server, name) = match under(id, "databases") {
                Some(name) => (server.clone(), name),
                None => self.other_source_server(caller, id)?,
            };
            let deleted = match props["sourceDatabaseDeletionDate"].as_str() {
                Some(d) => Some(parse_point(d)?),
                None => None,
            };
            let point = point.ok_or_else(|| {
                invalid_point("A point-in-time restore needs properties.restorePointInTime.".into())
            })?;
            let (source, _) = self.backup_source(&source_server, &name, deleted).await?;
            return Ok((source, parse_point(point)?));
        }
        if mode.eq_ignore_ascii_case("Restore") {
            let id = props["restorableDroppedDatabaseId"]
                .as_str()
                .unwrap_or_default();
            let (name, at) = under(id, "restorableDroppedDatabases")
                .and_then(|n| {
                    let (name, t) = n.rsplit_once(',')?;
                    Some((name.to_string(), t.parse::<i64>().ok()?))
                })
                .ok_or_else(|| {
                    bad(
                        "InvalidRestorableDroppedDatabaseId",
                        format!(
                            "restorableDroppedDatabaseId '{id}' is not one of \
                             {server_id}/restorableDroppedDatabases."
                        ),
                    )
                })?;
            let dropped = self
                .host
                .documents(&server_id, INDEX_DOC)
                .await?
                .into_iter()
                .filter_map(|(_, e)| e["dropped"].as_i64())
                .find(|d| ticks(*d) == at);
            let (source, when) = self
                .backup_source(server, &name, dropped.or(Some(-1)))
                .await?;
            let point = match point {
                Some(p) => parse_point(p)?,
                None => when.unwrap_or_default(),
            };
            return Ok((source, point));
        }
        Err(bad(
            "InvalidCreateMode",
            format!(
                "createMode '{mode}' is not supported: kagi creates databases with 'Default', \
                 'PointInTimeRestore' (sourceDatabaseId, restorePointInTime) or 'Restore' \
                 (restorableDroppedDatabaseId)."
            ),
        ))
    }

    /// Makes a restore ready (docs/SQL.md): the chain of backups for the point, each backup's
    /// DEK unwrapped with the key it was taken under, the database replayed to the point in a
    /// private directory. Nothing of the new database exists yet; an error leaves nothing.
    pub(crate) async fn prepare_restore(
        self: &Arc<Self>,
        caller: &Principal,
        server: &Value,
        input: &Value,
    ) -> Result<PreparedRestore, KvError> {
        let (source, point) = self.restore_target(caller, server, input).await?;
        let now = self.host.now();
        let at = kagi_core::time::rfc3339;
        if point > now {
            return Err(invalid_point(format!(
                "The restore point {} is in the future (now {}).",
                at(point),
                at(now)
            )));
        }
        let records = self
            .records(&id_of_body(&source.server), &source.database_id)
            .await?;
        let taken: Vec<Taken> = records.iter().filter_map(taken_of).collect();
        let Some(chain) = chain_for(&taken, point) else {
            return Err(invalid_point(
                match crate::backup_chain::earliest_restore_point(&taken) {
                    Some(e) => format!(
                        "The restore point {} is before the earliest restore point of database \
                         '{}' ({}).",
                        at(point),
                        source.name,
                        at(e)
                    ),
                    None => format!(
                        "Database '{}' has no backup to restore yet (the first full backup is \
                         taken within a log backup interval of its creation).",
                        source.name
                    ),
                },
            ));
        };
        self.replay_chain(server, &source, point, (&records, &chain), None)
            .await
    }

    /// Puts database `source` back together in a work directory from the backups `chain`
    /// (numbers of `records`) restored to `point`, then — for a takeover — the pieces `live`
    /// of its live log (downloaded there): the restore's [`PreparedRestore`].
    pub(crate) async fn replay_chain(
        self: &Arc<Self>,
        server: &Value,
        source: &Source,
        point: i64,
        (records, chain): (&[Value], &[u64]),
        live: Option<(kagi_blobs::BlockingFolder, Vec<u64>)>,
    ) -> Result<PreparedRestore, KvError> {
        let at = kagi_core::time::rfc3339;
        let chain: Vec<&Value> = chain
            .iter()
            .filter_map(|s| records.iter().find(|r| r["seq"].as_u64() == Some(*s)))
            .collect();
        if chain.is_empty() {
            return Err(internal("replaying backups", "no backup in the chain"));
        }
        let dek = self.unwrap_chain(server, source, point, &chain).await?;
        // The pages are bound to the page id the backups recorded (a database that was a
        // geo-secondary holds its old primary's pages).
        let page_id = chain
            .first()
            .and_then(|r| r["pageId"].as_str())
            .unwrap_or(&source.database_id);
        let old_key = DatabaseKey::from_slices(&dek[..], &crate::databases::guid_bytes(page_id))
            .map_err(|e| internal("the page key", e))?;
        // The work directory, private to kagi, known to the sweep as running.
        let root = self.restore_root();
        let suffix = hex::encode(kagi_crypto::random_bytes(8).map_err(|e| internal("rng", e))?);
        let work = root.join(format!(
            "{}-{suffix}",
            source.database_id.to_ascii_lowercase()
        ));
        locked(&self.backups.restores).insert(work.clone());
        let mut prepared = PreparedRestore {
            work: work.clone(),
            conn: None,
            state: self.clone(),
        };
        // The chain's files, linked in under the lock retention takes to remove files.
        let full_files = file_names(chain[0]);
        let mut names: Vec<String> = full_files.clone();
        for r in &chain[1..] {
            names.extend(file_names(r));
        }
        let dir = self.backup_dir(&source.database_id);
        {
            let _g = self
                .lock_id(&format!("{}/backups", source.database_id))
                .await;
            // Files this node does not have (another node took them, or this node's disk was
            // replaced) come from the bucket.
            let blobs = self.host.config().blobs;
            for n in &names {
                if !dir.join(n).exists()
                    && !blobs
                        .download_file(&dir, n)
                        .await
                        .map_err(|e| internal("fetch a backup file", e))?
                {
                    return Err(self.backup_file_missing(source, n).await);
                }
            }
            let (work, names) = (work.clone(), names.clone());
            blocking("linking backups for a restore", move || {
                link_into(&dir, &work, &names)
            })
            .await?;
        }
        let conn = blocking("replaying backups", move || {
            let full = work.join(&full_files[0]);
            let mut logs: Vec<PathBuf> = names[1..].iter().map(|n| work.join(n)).collect();
            let mut names = names;
            if let Some((folder, pieces)) = live {
                for seq in pieces {
                    let name = format!("live-{}.log", crate::live::piece_name(seq));
                    let bytes = folder.get(&crate::live::piece_name(seq)).map_err(|e| {
                        FileError::Damaged(format!("piece {seq} of the live log: {e}"))
                    })?;
                    let path = work.join(&name);
                    std::fs::write(&path, bytes).map_err(backup_files::io(&path))?;
                    logs.push(path);
                    names.push(name);
                }
            }
            let conn = backup_files::materialize(&work, &full, &logs, &old_key)?;
            for n in &names {
                let _ = std::fs::remove_file(work.join(n));
            }
            Ok(conn)
        })
        .await?;
        prepared.conn = Some(conn);
        tracing::info!(database = %source.name, point = %at(point), backups = chain.len(),
            "SQL restore: backups replayed");
        Ok(prepared)
    }

    /// The error of a restore whose backup file `file` is neither on this node's disk nor in
    /// the bucket: with its server's home on another node (no bucket), a restore onto a server
    /// of that node can use it.
    async fn backup_file_missing(&self, source: &Source, file: &str) -> KvError {
        let server = source.server["name"].as_str().unwrap_or_default();
        match self.home_elsewhere(&source.server).await {
            Ok(Some(home)) => KvError::conflict(format!(
                "The backups of database '{server}/{}' are in the data directory of the kagi \
                 node '{home}', which serves its server, and not in a bucket (`kagi server \
                 --blobs s3://…`): restore it onto a server that lives on that node.",
                source.name
            ))
            .with_inner("CrossNodeOperationNotSupported"),
            _ => internal(
                "fetch a backup file",
                format!(
                    "'{file}' of database '{server}/{}' is neither on this node nor in the bucket",
                    source.name
                ),
            ),
        }
    }

    /// The DEK of a chain of backups: each backup's copy unwrapped with the key it was taken
    /// under (once per key). A key that cannot be used fails the restore, naming the server,
    /// the time range of the backups under that key, and the key.
    async fn unwrap_chain(
        &self,
        server: &Value,
        source: &Source,
        point: i64,
        chain: &[&Value],
    ) -> Result<kagi_cmk::Dek, KvError> {
        let mut by_key: Vec<(String, Vec<&Value>)> = Vec::new();
        for r in chain {
            let key = r["protector"]["uri"].as_str().unwrap_or("pmk").to_string();
            match by_key
                .iter_mut()
                .find(|(k, _)| k.eq_ignore_ascii_case(&key))
            {
                Some((_, v)) => v.push(r),
                None => by_key.push((key, vec![r])),
            }
        }
        // The platform key that wraps a backup's DEK is its source server's.
        let owner = DbKeys {
            host: self.host.as_ref(),
            server_id: id_of_body(&source.server),
            db: source.name.to_ascii_lowercase(),
            database_id: source.database_id.clone(),
        };
        let now = self.host.now();
        let mut dek: Option<kagi_cmk::Dek> = None;
        for (key, backups) in &by_key {
            let first = backups[0];
            let failed =
                |e: KeyError| restore_key_error(server, source, point, key, first, backups, e);
            let kid = (key != "pmk").then(|| key.clone());
            let protector = Protector {
                server_key_name: first["protector"]["serverKeyName"]
                    .as_str()
                    .unwrap_or(SERVICE_MANAGED)
                    .to_string(),
                kid,
                auto_rotation: false,
                // A backup under a database's own key is opened with the database's identity.
                database: first["protector"]["identity"].as_str().map(|ua| {
                    crate::protector::DbIdentity {
                        identity: ua.to_string(),
                        database: source.name.clone(),
                    }
                }),
            };
            // A customer key is used with the identity of the server restored onto (which
            // must have access to it, as in Azure); the platform key is the source server's.
            let kek_server = if protector.kid.is_some() {
                server
            } else {
                &source.server
            };
            let kek = self
                .kek(kek_server, &protector)
                .await
                .map_err(|e| failed(KeyError::Other(e)))?;
            let records = records_in(&first["dek"]);
            let record = records
                .iter()
                .find(|r| r.kek.id().eq_ignore_ascii_case(key))
                .ok_or_else(|| failed(KeyError::Unopened(None)))?;
            let opened = self
                .keys
                .unwrap(&owner, &kek, record, now)
                .await
                .map_err(failed)?;
            match &dek {
                Some(d) if d[..] != opened[..] => {
                    return Err(internal(
                        "restore",
                        "backups of one database under two DEKs",
                    ));
                }
                Some(_) => {}
                None => dek = Some(opened),
            }
        }
        dek.ok_or_else(|| internal("restore", "a chain without backups"))
    }

    /// Writes the prepared restore into a new database's file under its own new DEK and id (as
    /// `open` holds them). The caller removes the new database's key records, key in memory and
    /// files when this fails.
    pub(crate) async fn finish_restore(
        &self,
        open: &OpenDatabase,
        mut prepared: PreparedRestore,
    ) -> Result<(), KvError> {
        let key = open.page_key()?;
        let file = open.file.clone();
        let conn = prepared.conn.take();
        let written = blocking("writing a restored database", move || {
            let conn = conn.ok_or_else(|| FileError::Damaged("no restore prepared".into()))?;
            kagi_sqlite_crypt::backup(&conn, &file, &key)?;
            Ok(())
        })
        .await;
        drop(prepared);
        written
    }
}

/// The error of a restore whose key cannot be used: Azure's `MissingKeyVaultUriForRestore`,
/// naming the server, the time range of the backups under the key, and the key.
fn restore_key_error(
    server: &Value,
    source: &Source,
    point: i64,
    key: &str,
    first: &Value,
    backups: &[&Value],
    e: KeyError,
) -> KvError {
    let at = kagi_core::time::rfc3339;
    let from = backups.iter().filter_map(|b| b["taken"].as_i64()).min();
    let to = backups.iter().filter_map(|b| b["taken"].as_i64()).max();
    let (why, transient) = match e {
        KeyError::Access(f) | KeyError::Unopened(Some(f)) => {
            (f.message, f.kind == kagi_cmk::FailureKind::Transient)
        }
        KeyError::Unopened(None) => ("no copy of the data key under it".to_string(), false),
        KeyError::Other(e) => (e.message, false),
    };
    let thumbprint = first["protector"]["thumbprint"]
        .as_str()
        .map(|t| format!(" (thumbprint {t})"))
        .unwrap_or_default();
    let key = if key == "pmk" {
        format!(
            "the service-managed key of server '{}'",
            source.server["name"].as_str().unwrap_or_default()
        )
    } else {
        format!("the key '{key}'{thumbprint}")
    };
    // Azure's text first ("Target server … doesn't have access to all AKV URIs created
    // between … and …"), then which key and why.
    let (server_name, from, to) = (
        server["name"].as_str().unwrap_or_default(),
        from.map(at).unwrap_or_default(),
        to.map(at).unwrap_or_default(),
    );
    let message = format!(
        "Target server '{server_name}' doesn't have access to all AKV URIs created between \
         {from} and {to}. Retry operation after restoring all AKV URIs. The restore of database \
         '{}' to {} needs the backups taken in that range, which are protected by {key}; the \
         server cannot use it: {why}. Give the server's identity access to that key again (or \
         restore to a point whose backups are under a key it can use).",
        source.name,
        at(point),
    );
    let code = if transient {
        ErrorCode::ServiceUnavailable
    } else {
        ErrorCode::BadRequest
    };
    KvError::new(code, message).with_inner("MissingKeyVaultUriForRestore")
}

/// Hard-links (or copies, across file systems) backup files `names` of `dir` into `work`,
/// made private to kagi.
fn link_into(dir: &Path, work: &Path, names: &[String]) -> Result<(), FileError> {
    use std::os::unix::fs::DirBuilderExt;
    let ioe = |path: &Path| {
        let path = path.to_path_buf();
        move |source| FileError::Io { path, source }
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(work)
        .map_err(ioe(work))?;
    for n in names {
        let (from, to) = (dir.join(n), work.join(n));
        if std::fs::hard_link(&from, &to).is_err() {
            std::fs::copy(&from, &to).map_err(ioe(&from))?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Listing
// ---------------------------------------------------------------------------------------------

impl SqlService {
    fn backup_view(server: &Value, name: &str, r: &Value) -> Value {
        let at = |k: &str| r[k].as_i64().map(kagi_core::time::rfc3339);
        let backup = format!(
            "{}-{:08}",
            if r["type"] == "Full" { "full" } else { "log" },
            r["seq"].as_u64().unwrap_or(0)
        );
        let p = &r["protector"];
        json!({
            "id": format!("{}/databases/{name}/backups/{backup}", id_of_body(server)),
            "name": backup,
            "type": "Microsoft.Sql/servers/databases/backups",
            "properties": {
                "backupType": r["type"],
                "backupTime": at("taken"),
                "rangeStart": at("from"),
                "rangeEnd": at("to"),
                "sizeBytes": r["size"],
                "databaseId": r["databaseId"],
                "serverKeyType": p["serverKeyType"],
                "serverKeyName": p["serverKeyName"],
                "keyUri": p["uri"],
                "thumbprint": p["thumbprint"],
            },
        })
    }

    /// `GET {server}/databases/{name}/backups` (kagi's): every backup of the database (or of
    /// the database of that name dropped last), with its time range and the key it is under.
    pub(crate) async fn list_backups(
        &self,
        server: &Value,
        name: &str,
    ) -> Result<(u16, Value), KvError> {
        let (source, dropped) = self.backup_source(server, name, None).await?;
        let records = self
            .records(&id_of_body(server), &source.database_id)
            .await?;
        let taken: Vec<Taken> = records.iter().filter_map(taken_of).collect();
        let at = |t: Option<i64>| t.map(kagi_core::time::rfc3339);
        Ok((
            200,
            json!({
                "value": records.iter().map(|r| Self::backup_view(server, &source.name, r)).collect::<Vec<_>>(),
                "databaseId": source.database_id,
                "deletionDate": at(dropped),
                "earliestRestoreDate": at(crate::backup_chain::earliest_restore_point(&taken)),
                "latestRestoreDate": at(crate::backup_chain::latest_restore_point(&taken)),
            }),
        ))
    }

    /// The earliest point database `db` can be restored to (Azure's `earliestRestoreDate`),
    /// when it has a backup.
    pub(crate) async fn earliest_restore_date(
        &self,
        server: &Value,
        db: &Database,
    ) -> Option<String> {
        let records = self
            .records(&id_of_body(server), &db.database_id)
            .await
            .ok()?;
        let taken: Vec<Taken> = records.iter().filter_map(taken_of).collect();
        crate::backup_chain::earliest_restore_point(&taken).map(kagi_core::time::rfc3339)
    }

    /// `GET {server}/restorableDroppedDatabases`: dropped databases whose backups remain.
    pub(crate) async fn list_restorable_dropped(
        &self,
        server: &Value,
    ) -> Result<(u16, Value), KvError> {
        let server_id = id_of_body(server);
        let mut out = Vec::new();
        for (_, e) in self.host.documents(&server_id, INDEX_DOC).await? {
            let (Some(dropped), Some(name), Some(id)) = (
                e["dropped"].as_i64(),
                e["name"].as_str(),
                e["databaseId"].as_str(),
            ) else {
                continue;
            };
            let taken: Vec<Taken> = self
                .records(&server_id, id)
                .await?
                .iter()
                .filter_map(taken_of)
                .collect();
            let Some(earliest) = crate::backup_chain::earliest_restore_point(&taken) else {
                continue;
            };
            let rid = format!("{name},{}", ticks(dropped));
            out.push(json!({
                "id": format!("{server_id}/restorableDroppedDatabases/{rid}"),
                "name": rid,
                "type": "Microsoft.Sql/servers/restorableDroppedDatabases",
                "location": server["location"],
                "properties": {
                    "databaseName": name,
                    "databaseId": id,
                    "deletionDate": kagi_core::time::rfc3339(dropped),
                    "earliestRestoreDate": kagi_core::time::rfc3339(earliest),
                    "backupStorageRedundancy": "Local",
                },
            }));
        }
        Ok((200, json!({ "value": out })))
    }

    /// `GET {server}/backupKeys` (kagi's): every key that backups of the server's databases
    /// (live or dropped) are under, with the time range and databases of those backups — the
    /// keys to keep while the backups are retained.
    pub(crate) async fn list_backup_keys(&self, server: &Value) -> Result<(u16, Value), KvError> {
        let server_id = id_of_body(server);
        let mut keys: Vec<(String, Value)> = Vec::new();
        for (_, e) in self.host.documents(&server_id, INDEX_DOC).await? {
            let Some(id) = e["databaseId"].as_str() else {
                continue;
            };
            for r in self.records(&server_id, id).await? {
                let p = &r["protector"];
                let key = p["uri"].as_str().unwrap_or(SERVICE_MANAGED).to_string();
                let t = r["taken"].as_i64().unwrap_or_default();
                let i = match keys.iter().position(|(k, _)| k.eq_ignore_ascii_case(&key)) {
                    Some(i) => i,
                    None => {
                        keys.push((key, json!({"protector": p, "from": t, "to": t, "dbs": {}})));
                        keys.len() - 1
                    }
                };
                let entry = &mut keys[i].1;
                entry["from"] = json!(entry["from"].as_i64().unwrap_or(t).min(t));
                entry["to"] = json!(entry["to"].as_i64().unwrap_or(t).max(t));
                let d = &mut entry["dbs"][id];
                d["databaseName"] = e["name"].clone();
                d["databaseId"] = json!(id);
                d["dropped"] = json!(e["dropped"].is_i64());
                d["backups"] = json!(d["backups"].as_u64().unwrap_or(0) + 1);
                d["from"] = json!(d["from"].as_i64().unwrap_or(t).min(t));
                d["to"] = json!(d["to"].as_i64().unwrap_or(t).max(t));
            }
        }
        let at = |v: &Value| v.as_i64().map(kagi_core::time::rfc3339);
        let value: Vec<Value> = keys
            .into_iter()
            .map(|(_, v)| {
                let dbs: Vec<Value> = v["dbs"]
                    .as_object()
                    .map(|m| {
                        m.values()
                            .map(|d| {
                                let mut d = d.clone();
                                d["from"] = json!(at(&d["from"]));
                                d["to"] = json!(at(&d["to"]));
                                d
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                let p = &v["protector"];
                json!({
                    "name": p["serverKeyName"],
                    "properties": {
                        "serverKeyType": p["serverKeyType"],
                        "uri": p["uri"],
                        "thumbprint": p["thumbprint"],
                        "rangeStart": at(&v["from"]),
                        "rangeEnd": at(&v["to"]),
                        "databases": dbs,
                    },
                })
            })
            .collect();
        Ok((200, json!({ "value": value })))
    }
}
