//! Jobs: key assignment, backup, restore and check run in the background; their state is
//! followed at `GET {vault id}/backupJobs/{id}`.
//!
//! A job lives in memory while it runs and is stored as the vault's service document `job`
//! named by its id (in the store, through `Platform::put_service_document`) when it starts,
//! while it makes progress, and when it ends. Progress is written at most at each new 5% step
//! of `progress.total` and otherwise at most once every [`PERSIST_EVERY`], by a task spawned on
//! the runtime the job started on, so the engine threads reporting progress (blocking threads,
//! outside the runtime) never wait for a commit. `lastUpdateTime` is the platform time of the
//! state last written.
//!
//! A job found in the store still `InProgress` with no runner in this process (the server
//! stopped or was killed while it ran) is answered as `Failed` with the error code
//! `JobInterrupted`, keeping the last progress written, and its document is rewritten so once.
//! Its `endTime` is its `lastUpdateTime`: the last moment the job is known to have been alive,
//! rather than the time the server noticed, which would depend on how long the server was down
//! and on who asked first. The job ended somewhere between that time and the next start of the
//! server.
//!
//! With several nodes on one store, a job runs on one of them, which holds the store lease
//! `backup-job:{id}` while it runs (renewed; given up at its end, or expiring with its node).
//! Another node asked for the job finds it `InProgress` in the store with no runner of its own:
//! while the lease is held elsewhere the job is answered as stored (running there), and only a
//! job whose lease is free is taken for interrupted.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use kagi_core::KvError;
use kagi_core::time::{Clock, SystemClock, rfc3339};
use kagi_host::ServiceHost;
use serde_json::{Value, json};

use crate::leases::LeaseHold;
use crate::state::{JOB, io};

/// The longest a running job's progress goes unwritten while it changes (within a 5% step).
pub const PERSIST_EVERY: Duration = Duration::from_secs(2);

/// Progress is also written at each new step of `total / PERSIST_STEPS` (5%).
const PERSIST_STEPS: u64 = 20;

/// The message of an interrupted job.
const INTERRUPTED: &str =
    "The server stopped while the job ran; nothing it wrote is visible. Run it again.";

/// Jobs (vault key, job id) with a runner in this process. Process-wide rather than per
/// [`Jobs`], so that a stored job is never taken for an interrupted one while any service
/// instance still runs it.
static RUNNING: Mutex<BTreeSet<(String, String)>> = Mutex::new(BTreeSet::new());

/// Serialises the rewrites of interrupted jobs: two readers may find the same one.
static REWRITE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn running(vault_key: &str, id: &str) -> bool {
    lock(&RUNNING).contains(&(vault_key.to_string(), id.to_string()))
}

/// What is behind a job's mutex: its JSON and when its progress was last queued for writing.
#[derive(Debug)]
struct State {
    body: Value,
    /// The 5% step of the progress last queued for writing.
    step: u64,
    /// When progress was last queued for writing (or the job started).
    at: Instant,
}

/// A running or ended job.
#[derive(Debug)]
pub struct JobHandle {
    state: Mutex<State>,
    /// The vault's id, lower-case: the resource the job's document belongs to.
    vault_key: String,
    /// The job id (the document's name).
    id: String,
    /// Where the job is stored. Weak: the platform owns the services, not the reverse.
    platform: Weak<dyn ServiceHost>,
    /// The runtime progress writes are spawned on (reports come from blocking threads).
    runtime: tokio::runtime::Handle,
    /// Platform time minus system time when the job started: progress reports carry no time,
    /// and the job's times are on the platform clock (which `--test-clock` moves).
    clock_offset: i64,
    /// Held while the job is written: orders a late progress write before the final one (so
    /// a job never goes back to `InProgress` in the store).
    writing: tokio::sync::Mutex<()>,
    /// A progress write is queued and has not yet taken its snapshot.
    queued: AtomicBool,
    /// [`PERSIST_EVERY`], except in tests.
    every: Duration,
    /// Becomes true when the job has ended (long polls wait on it).
    ended: tokio::sync::watch::Sender<bool>,
    /// The job's end is in the store: its handle may be dropped.
    end_stored: AtomicBool,
    /// The lease that tells other nodes the job runs here (given up at its end).
    lease: Mutex<Option<LeaseHold>>,
}

/// The name of the lease a running job holds.
fn job_lease(id: &str) -> String {
    format!("backup-job:{}", id.to_ascii_lowercase())
}

impl JobHandle {
    /// The job's JSON.
    pub fn get(&self) -> Value {
        lock(&self.state).body.clone()
    }

    /// Sets the progress, and writes it to the store in the background when it reached a new
    /// 5% step or [`PERSIST_EVERY`] passed since it was last written. Callable from any thread.
    pub fn progress(self: &Arc<Self>, done: u64, total: u64, unit: &str) {
        let due = {
            let mut s = lock(&self.state);
            if s.body["status"] != "InProgress" {
                return; // a late report must not undo the final `done`.
            }
            s.body["progress"] = json!({"done": done, "total": total, "unit": unit});
            // Unknown total (0): no steps, only the interval writes.
            let step = done
                .min(total)
                .saturating_mul(PERSIST_STEPS)
                .checked_div(total)
                .unwrap_or(0);
            let due = step > s.step || s.at.elapsed() >= self.every;
            if due {
                s.step = step;
                s.at = Instant::now();
            }
            due
        };
        // One queued write covers every update made before it takes its snapshot.
        if due && !self.queued.swap(true, Ordering::SeqCst) {
            let me = self.clone();
            self.runtime.spawn(async move { me.write_progress().await });
        }
    }

    async fn write_progress(&self) {
        let _w = self.writing.lock().await;
        self.queued.store(false, Ordering::SeqCst);
        let snapshot = {
            let mut s = lock(&self.state);
            if s.body["status"] != "InProgress" {
                return; // ended meanwhile: the final state is (being) written.
            }
            s.body["lastUpdateTime"] = json!(rfc3339(self.now()));
            s.body.clone()
        };
        if let Err(e) = self.persist(&snapshot).await {
            tracing::error!(error = %e.message, job = %self.id, "job progress not persisted");
        }
    }

    fn now(&self) -> i64 {
        SystemClock.now().saturating_add(self.clock_offset)
    }

    /// Ends the job as Completed with its stats.
    pub async fn complete(&self, now: i64, stats: Value) {
        self.end(now, |b| {
            b["status"] = json!("Completed");
            b["stats"] = stats;
            if let Some(total) = b["progress"]["total"].as_u64() {
                b["progress"]["done"] = json!(total);
            }
        })
        .await;
    }

    /// Ends the job as Failed, keeping `stats` (e.g. the problems a check found).
    pub async fn fail_with(&self, now: i64, e: &KvError, stats: Value) {
        self.end(now, |b| {
            b["stats"] = stats;
            fail_body(b, e);
        })
        .await;
    }

    /// Ends the job as Failed.
    pub async fn fail(&self, now: i64, e: &KvError) {
        self.end(now, |b| fail_body(b, e)).await;
    }

    async fn end(&self, now: i64, change: impl FnOnce(&mut Value)) {
        let _w = self.writing.lock().await;
        let snapshot = {
            let mut s = lock(&self.state);
            change(&mut s.body);
            s.body["endTime"] = json!(rfc3339(now));
            s.body["lastUpdateTime"] = json!(rfc3339(now));
            s.body.clone()
        };
        let stored = self.persist(&snapshot).await;
        self.end_stored.store(stored.is_ok(), Ordering::SeqCst);
        if let Err(e) = stored {
            // Answered from memory while this process runs; after a restart the job reads as
            // interrupted, which is what the store can vouch for.
            tracing::error!(error = %e.message, job = %self.id, "job end not persisted");
        }
        lock(&RUNNING).remove(&(self.vault_key.clone(), self.id.clone()));
        lock(&self.lease).take();
        self.ended.send_replace(true);
    }

    async fn persist(&self, body: &Value) -> Result<(), KvError> {
        let p = self
            .platform
            .upgrade()
            .ok_or_else(|| io("job", "the platform is gone"))?;
        p.put_document(&self.vault_key, JOB, &self.id, body).await
    }

    /// Test only: forget that this process runs the job, as after a restart.
    #[cfg(test)]
    fn abandon(&self) {
        lock(&RUNNING).remove(&(self.vault_key.clone(), self.id.clone()));
    }

    /// Test only: waits until no progress write is queued or being written.
    #[cfg(test)]
    async fn flush(&self) {
        while self.queued.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        drop(self.writing.lock().await);
    }
}

fn fail_body(b: &mut Value, e: &KvError) {
    b["status"] = json!("Failed");
    b["error"] = json!({
        "code": e.inner.unwrap_or(e.code.as_str()),
        "message": e.message,
    });
}

/// How long ended jobs are kept (the scheduler's sweep deletes older ones).
pub const JOB_RETENTION_DAYS: i64 = 180;

/// The jobs of the service, by id.
#[derive(Debug)]
pub struct Jobs {
    live: Mutex<HashMap<String, Arc<JobHandle>>>,
    every: Duration,
}

impl Default for Jobs {
    fn default() -> Self {
        Self {
            live: Mutex::default(),
            every: PERSIST_EVERY,
        }
    }
}

impl Jobs {
    /// The jobs running now, by operation (`Backup`, `Restore`, …: names from kagi's code).
    pub fn running_by_operation(&self) -> Vec<(String, i64)> {
        let mut by: std::collections::BTreeMap<String, i64> = std::collections::BTreeMap::new();
        for h in lock(&self.live).values() {
            if h.end_stored.load(Ordering::SeqCst) {
                continue;
            }
            let state = lock(&h.state);
            if state.body["status"] == "InProgress" {
                let op = state.body["operation"].as_str().unwrap_or("Other");
                *by.entry(op.to_string()).or_default() += 1;
            }
        }
        by.into_iter().collect()
    }

    /// Starts a job of `operation` on `entity` (an item name, or the vault) in the vault
    /// `vault_id`. The job is stored before this returns; if it cannot be, nothing starts.
    pub async fn start(
        &self,
        host: &Arc<dyn ServiceHost>,
        vault_id: &str,
        operation: &str,
        entity: &str,
        now: i64,
    ) -> Result<Arc<JobHandle>, KvError> {
        let id = kagi_core::ids::uuid_v4(kagi_crypto::random_array().map_err(|e| io("rng", e))?);
        let body = json!({
            "id": format!("{vault_id}/backupJobs/{id}"),
            "name": id,
            "type": "Microsoft.RecoveryServices/vaults/backupJobs",
            "operation": operation,
            "entityFriendlyName": entity,
            "status": "InProgress",
            "startTime": rfc3339(now),
            "endTime": null,
            "lastUpdateTime": rfc3339(now),
            "progress": {"done": 0, "total": 0, "unit": "Bytes"},
            "error": null,
            "stats": null,
        });
        let vault_key = vault_id.to_ascii_lowercase();
        let handle = Arc::new(JobHandle {
            state: Mutex::new(State {
                body: body.clone(),
                step: 0,
                at: Instant::now(),
            }),
            vault_key: vault_key.clone(),
            id: id.clone(),
            platform: Arc::downgrade(host),
            runtime: tokio::runtime::Handle::current(),
            clock_offset: now.saturating_sub(SystemClock.now()),
            writing: tokio::sync::Mutex::new(()),
            queued: AtomicBool::new(false),
            every: self.every,
            ended: tokio::sync::watch::Sender::new(false),
            end_stored: AtomicBool::new(false),
            lease: Mutex::new(None),
        });
        match LeaseHold::take(host, job_lease(&id), Some(Duration::ZERO), || {
            io("job lease", "held by another node")
        })
        .await
        {
            Ok(l) => *lock(&handle.lease) = Some(l),
            // Other nodes may then take it for interrupted; this node still runs it.
            Err(e) => tracing::warn!(job = %id, error = %e.message, "job lease not taken"),
        }
        // Registered as running before it is stored, so no reader ever finds it stored without
        // its runner and takes it for an interrupted job.
        let key = (vault_key, id.clone());
        lock(&RUNNING).insert(key.clone());
        let stored = {
            let _w = handle.writing.lock().await;
            handle.persist(&body).await
        };
        if let Err(e) = stored {
            lock(&RUNNING).remove(&key);
            return Err(e);
        }
        let mut live = lock(&self.live);
        // Ended jobs are answered from the store: drop their handles.
        live.retain(|_, h| !h.end_stored.load(Ordering::SeqCst));
        live.insert(id, handle.clone());
        drop(live);
        Ok(handle)
    }

    /// Waits until the job `id`, if this process runs it, has ended, or `max` has passed (a
    /// long poll: a client sees the end at once instead of at its next poll).
    pub async fn wait_end(&self, id: &str, max: Duration) {
        let handle = lock(&self.live).get(&id.to_ascii_lowercase()).cloned();
        if let Some(h) = handle {
            let mut rx = h.ended.subscribe();
            let _ = tokio::time::timeout(max, rx.wait_for(|ended| *ended)).await;
        }
    }

    /// Deletes the ended jobs of the vault `vault_id` that ended before `before` (Unix
    /// seconds): job history is kept for [`JOB_RETENTION_DAYS`], as Azure Backup keeps it for
    /// months, not for ever. Returns how many were deleted.
    pub async fn forget_ended(
        &self,
        p: &dyn ServiceHost,
        vault_id: &str,
        before: i64,
    ) -> Result<usize, KvError> {
        let vault_key = vault_id.to_ascii_lowercase();
        let mut gone = 0;
        for (id, job) in p.documents(&vault_key, JOB).await? {
            let ended = job["status"] != "InProgress"
                && job["endTime"]
                    .as_str()
                    .and_then(kagi_core::time::parse_rfc3339)
                    .is_some_and(|t| t < before);
            if ended && p.delete_document(&vault_key, JOB, &id).await? {
                gone += 1;
            }
        }
        Ok(gone)
    }

    /// A job of the vault `vault_id`, by id (`None`: the vault has no such job).
    pub async fn get(
        &self,
        p: &dyn ServiceHost,
        vault_id: &str,
        id: &str,
    ) -> Result<Option<Value>, KvError> {
        if !id.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            return Ok(None);
        }
        let (vault_key, id) = (vault_id.to_ascii_lowercase(), id.to_ascii_lowercase());
        // Only the vault that ran it (whose documents hold it) answers for it.
        let Some(stored) = p.document(&vault_key, JOB, &id).await? else {
            return Ok(None);
        };
        self.settle(p, &vault_key, &id, stored).await.map(Some)
    }

    /// Every job of the vault `vault_id`, newest first.
    pub async fn list(&self, p: &dyn ServiceHost, vault_id: &str) -> Result<Vec<Value>, KvError> {
        let vault_key = vault_id.to_ascii_lowercase();
        let mut out = Vec::new();
        for (id, stored) in p.documents(&vault_key, JOB).await? {
            out.push(self.settle(p, &vault_key, &id, stored).await?);
        }
        out.sort_by(|a, b| {
            b["startTime"]
                .as_str()
                .cmp(&a["startTime"].as_str())
                .then(b["name"].as_str().cmp(&a["name"].as_str()))
        });
        Ok(out)
    }

    /// What a stored job is now: its runner's state while this process has it, else the
    /// stored one, with an interrupted job failed (and rewritten) once.
    async fn settle(
        &self,
        p: &dyn ServiceHost,
        vault_key: &str,
        id: &str,
        stored: Value,
    ) -> Result<Value, KvError> {
        if let Some(h) = lock(&self.live).get(id) {
            return Ok(h.get());
        }
        if stored["status"] != "InProgress" || running(vault_key, id) {
            return Ok(stored);
        }
        // Running on another node (or the store cannot tell now): as stored.
        if !LeaseHold::is_free(p, &job_lease(id)).await.unwrap_or(false) {
            return Ok(stored);
        }
        Ok(interrupted(p, vault_key, id)
            .await
            .unwrap_or_else(|| mark_interrupted(stored)))
    }
}

/// A job left `InProgress` by a runner that is gone, as Failed: `JobInterrupted`, ended at its
/// last written update (see the module documentation), progress as last written.
fn mark_interrupted(mut v: Value) -> Value {
    v["status"] = json!("Failed");
    let last = match &v["lastUpdateTime"] {
        Value::String(t) => json!(t),
        // Written before jobs recorded their updates: the start is all that is known.
        _ => v["startTime"].clone(),
    };
    v["endTime"] = last.clone();
    v["lastUpdateTime"] = last;
    v["error"] = json!({"code": "JobInterrupted", "message": INTERRUPTED});
    v
}

/// Rewrites an interrupted job as Failed, once, and returns what it now holds (`None` when it
/// could not be read back; the caller then answers from what it read).
async fn interrupted(p: &dyn ServiceHost, vault_key: &str, id: &str) -> Option<Value> {
    let _g = REWRITE.lock().await;
    // Read again under the lock: another reader may have rewritten it meanwhile.
    let v = p.document(vault_key, JOB, id).await.ok()??;
    if v["status"] != "InProgress" || running(vault_key, id) {
        return Some(v);
    }
    let v = mark_interrupted(v);
    match p.put_document(vault_key, JOB, id, &v).await {
        Ok(()) => tracing::warn!(job = %id, vault = %vault_key, "interrupted job marked failed"),
        Err(e) => {
            tracing::error!(error = %e.message, job = %id, "interrupted job not rewritten")
        }
    }
    Some(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kagi_core::ErrorCode;
    use kagi_vault::{Platform, PlatformConfig};

    const VAULT: &str =
        "/subscriptions/s/resourceGroups/rg/providers/Microsoft.RecoveryServices/vaults/v";
    const OTHER: &str =
        "/subscriptions/s/resourceGroups/rg/providers/Microsoft.RecoveryServices/vaults/w";
    /// 2030-01-01: ahead of the system clock, as under `--test-clock`.
    const T0: i64 = 1_893_456_000;

    /// A platform on a fresh data directory (the store the jobs are written to).
    async fn platform() -> (tempfile::TempDir, Arc<dyn ServiceHost>) {
        let dir = tempfile::tempdir().unwrap();
        let config = PlatformConfig {
            data_dir: dir.path().to_path_buf(),
            dns_suffix: "localhost".into(),
            port: 8443,
        };
        let (p, _) = Platform::open(config, Arc::new(SystemClock)).await.unwrap();
        (dir, Arc::new(p))
    }

    /// Jobs that write progress only at 5% steps (no time-based writes during a test).
    fn steps_only() -> Jobs {
        Jobs {
            every: Duration::MAX,
            ..Jobs::default()
        }
    }

    async fn stored(p: &dyn ServiceHost, h: &JobHandle) -> Value {
        h.flush().await;
        p.document(VAULT, JOB, &h.id)
            .await
            .unwrap()
            .expect("job document")
    }

    fn name(h: &JobHandle) -> String {
        h.get()["name"].as_str().unwrap().to_string()
    }

    #[tokio::test]
    async fn progress_is_written_at_each_five_percent_step() {
        let (_d, p) = platform().await;
        let h = steps_only()
            .start(&p, VAULT, "Backup", "item", T0)
            .await
            .unwrap();
        let first = stored(&*p, &h).await;
        assert_eq!(first["status"], "InProgress");
        assert_eq!(first["lastUpdateTime"], rfc3339(T0));
        h.progress(10, 100, "Bytes");
        let d = stored(&*p, &h).await;
        assert_eq!(
            d["progress"],
            json!({"done": 10, "total": 100, "unit": "Bytes"})
        );
        // Written on the platform clock (here ahead of the system clock), not the system's.
        assert!(
            d["lastUpdateTime"].as_str() >= Some(rfc3339(T0).as_str()),
            "{d}"
        );
        // Same 5% step: in memory only.
        h.progress(14, 100, "Bytes");
        assert_eq!(h.get()["progress"]["done"], 14);
        assert_eq!(stored(&*p, &h).await["progress"]["done"], 10);
        h.progress(15, 100, "Bytes");
        assert_eq!(stored(&*p, &h).await["progress"]["done"], 15);
        // A jump over several steps is one write of the newest value.
        h.progress(90, 100, "Bytes");
        assert_eq!(stored(&*p, &h).await["progress"]["done"], 90);
    }

    #[tokio::test]
    async fn progress_is_written_when_the_interval_passed() {
        let (_d, p) = platform().await;
        let jobs = Jobs {
            every: Duration::ZERO,
            ..Jobs::default()
        };
        let h = jobs.start(&p, VAULT, "Backup", "item", T0).await.unwrap();
        h.progress(1, 1000, "Bytes");
        assert_eq!(stored(&*p, &h).await["progress"]["done"], 1);
        h.progress(2, 1000, "Bytes");
        assert_eq!(stored(&*p, &h).await["progress"]["done"], 2);
        // Unknown total: only the interval writes.
        h.progress(7, 0, "Bytes");
        assert_eq!(stored(&*p, &h).await["progress"]["done"], 7);
    }

    /// Reports come from the engine's blocking threads, outside the runtime: they are written
    /// all the same.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn progress_from_blocking_threads_is_written() {
        let (_d, p) = platform().await;
        let h = steps_only()
            .start(&p, VAULT, "Backup", "item", T0)
            .await
            .unwrap();
        let h2 = h.clone();
        tokio::task::spawn_blocking(move || h2.progress(50, 100, "Bytes"))
            .await
            .unwrap();
        let h3 = h.clone();
        std::thread::spawn(move || h3.progress(75, 100, "Bytes"))
            .join()
            .unwrap();
        assert_eq!(stored(&*p, &h).await["progress"]["done"], 75);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_end_is_never_undone_by_progress() {
        let (_d, p) = platform().await;
        let jobs = Jobs {
            every: Duration::ZERO,
            ..Jobs::default()
        };
        for _ in 0..20 {
            let h = jobs.start(&p, VAULT, "Restore", "item", T0).await.unwrap();
            // Reporters racing the end, as the engine's restore workers do.
            let reporters: Vec<_> = (0..4u64)
                .map(|t| {
                    let h = h.clone();
                    std::thread::spawn(move || {
                        for i in 0..50 {
                            h.progress(t * 50 + i, 200, "Bytes");
                        }
                    })
                })
                .collect();
            h.complete(T0 + 5, json!({"files": 3})).await;
            for r in reporters {
                r.join().unwrap();
            }
            h.progress(1, 200, "Bytes");
            let d = stored(&*p, &h).await;
            assert_eq!(d["status"], "Completed", "{d}");
            assert_eq!(d["endTime"], rfc3339(T0 + 5));
            assert_eq!(d["progress"]["done"], d["progress"]["total"], "{d}");
            assert_eq!(d["stats"], json!({"files": 3}));
            assert_eq!(h.get(), d);
        }
    }

    #[tokio::test]
    async fn failure_keeps_stats_and_progress() {
        let (_d, p) = platform().await;
        let h = steps_only()
            .start(&p, VAULT, "Check", "item", T0)
            .await
            .unwrap();
        h.progress(30, 100, "Bytes");
        let e = KvError::new(ErrorCode::BadParameter, "damaged").with_inner("RepositoryDamaged");
        h.fail_with(T0 + 9, &e, json!({"problems": ["p"]})).await;
        let d = stored(&*p, &h).await;
        assert_eq!(d["status"], "Failed");
        assert_eq!(d["endTime"], rfc3339(T0 + 9));
        assert_eq!(d["error"]["code"], "RepositoryDamaged");
        assert_eq!(d["stats"]["problems"], json!(["p"]));
        assert_eq!(d["progress"]["done"], 30);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_long_poll_returns_when_the_job_ends_and_ended_handles_are_dropped() {
        let (_d, p) = platform().await;
        let jobs = steps_only();
        let h = jobs.start(&p, VAULT, "Restore", "item", T0).await.unwrap();
        let id = name(&h);
        let ender = h.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            ender.complete(T0 + 1, json!({})).await;
        });
        // Without the wait the read would find the job still running.
        jobs.wait_end(&id, Duration::from_secs(30)).await;
        let got = jobs.get(&*p, VAULT, &id).await.unwrap().unwrap();
        assert_eq!(got["status"], "Completed");
        // The next start drops the ended handle; the stored job answers the same.
        let next = jobs
            .start(&p, VAULT, "Backup", "item", T0 + 2)
            .await
            .unwrap();
        assert!(!lock(&jobs.live).contains_key(&id));
        assert!(lock(&jobs.live).contains_key(&name(&next)));
        assert_eq!(jobs.get(&*p, VAULT, &id).await.unwrap().unwrap(), got);
        // Waiting on an ended (or unknown) job returns at once.
        jobs.wait_end(&id, Duration::from_secs(30)).await;
    }

    #[tokio::test]
    async fn ended_jobs_are_forgotten_after_retention_running_ones_never() {
        let (_d, p) = platform().await;
        let jobs = steps_only();
        let old = jobs.start(&p, VAULT, "Backup", "item", T0).await.unwrap();
        old.complete(T0 + 10, json!({})).await;
        let recent = jobs.start(&p, VAULT, "Backup", "item", T0).await.unwrap();
        recent.complete(T0 + 100, json!({})).await;
        let running = jobs.start(&p, VAULT, "Backup", "item", T0).await.unwrap();
        assert_eq!(jobs.forget_ended(&*p, VAULT, T0 + 50).await.unwrap(), 1);
        assert!(jobs.get(&*p, VAULT, &name(&old)).await.unwrap().is_none());
        assert!(
            jobs.get(&*p, VAULT, &name(&recent))
                .await
                .unwrap()
                .is_some()
        );
        assert!(
            jobs.get(&*p, VAULT, &name(&running))
                .await
                .unwrap()
                .is_some()
        );
        assert_eq!(
            jobs.forget_ended(&*p, VAULT, T0 + 1_000_000).await.unwrap(),
            1
        );
        assert!(
            jobs.get(&*p, VAULT, &name(&running))
                .await
                .unwrap()
                .is_some()
        );
    }

    #[tokio::test]
    async fn a_running_job_is_not_taken_for_an_interrupted_one() {
        let (_d, p) = platform().await;
        let h = steps_only()
            .start(&p, VAULT, "Backup", "item", T0)
            .await
            .unwrap();
        h.progress(50, 100, "Bytes");
        let before = stored(&*p, &h).await;
        // Another service instance of the same process reads it: the job still runs.
        let other = steps_only();
        assert_eq!(
            other.get(&*p, VAULT, &name(&h)).await.unwrap().unwrap(),
            before
        );
        assert_eq!(stored(&*p, &h).await, before);
        h.complete(T0 + 1, json!({})).await;
        assert_eq!(
            other.get(&*p, VAULT, &name(&h)).await.unwrap().unwrap()["status"],
            "Completed"
        );
    }

    #[tokio::test]
    async fn an_interrupted_job_fails_once_at_its_last_update_with_its_progress() {
        let (_d, p) = platform().await;
        let h = steps_only()
            .start(&p, VAULT, "Backup", "item", T0)
            .await
            .unwrap();
        h.progress(40, 100, "Bytes");
        let written = stored(&*p, &h).await;
        h.progress(42, 100, "Bytes"); // not written: lost with the process
        h.abandon(); // the process dies

        let restarted = steps_only();
        let v = restarted.get(&*p, VAULT, &name(&h)).await.unwrap().unwrap();
        assert_eq!(v["status"], "Failed");
        assert_eq!(v["error"]["code"], "JobInterrupted");
        assert_eq!(v["endTime"], written["lastUpdateTime"]);
        assert!(v["endTime"].as_str() >= v["startTime"].as_str(), "{v}");
        assert_eq!(v["progress"], written["progress"]);
        assert_eq!(v["progress"]["done"], 40);
        // Rewritten in the store, and answered the same from then on.
        assert_eq!(stored(&*p, &h).await, v);
        assert_eq!(
            restarted.get(&*p, VAULT, &name(&h)).await.unwrap().unwrap(),
            v
        );
        assert_eq!(restarted.list(&*p, VAULT).await.unwrap(), vec![v.clone()]);
        assert_eq!(
            steps_only()
                .get(&*p, VAULT, &name(&h))
                .await
                .unwrap()
                .unwrap(),
            v
        );
    }

    #[tokio::test]
    async fn an_interrupted_job_of_an_older_server_ends_at_its_start() {
        let (_d, p) = platform().await;
        let id = "0b8c1f9e-6a58-4c3e-9d6f-2f1e3b7a5c4d";
        let old = json!({
            "id": format!("{VAULT}/backupJobs/{id}"), "name": id,
            "type": "Microsoft.RecoveryServices/vaults/backupJobs", "operation": "Backup",
            "entityFriendlyName": "item", "status": "InProgress", "startTime": rfc3339(T0),
            "endTime": null, "progress": {"done": 0, "total": 0, "unit": "Bytes"},
            "error": null, "stats": null,
        });
        p.put_document(VAULT, JOB, id, &old).await.unwrap();
        let v = Jobs::default().get(&*p, VAULT, id).await.unwrap().unwrap();
        assert_eq!(v["status"], "Failed");
        assert_eq!(v["endTime"], rfc3339(T0));
        assert_eq!(p.document(VAULT, JOB, id).await.unwrap().unwrap(), v);
    }

    #[tokio::test]
    async fn only_the_vault_that_ran_a_job_answers_for_it() {
        let (_d, p) = platform().await;
        let jobs = steps_only();
        let h = jobs.start(&p, VAULT, "Backup", "item", T0).await.unwrap();
        assert!(jobs.get(&*p, VAULT, &name(&h)).await.unwrap().is_some());
        assert!(jobs.get(&*p, OTHER, &name(&h)).await.unwrap().is_none());
        assert!(jobs.get(&*p, VAULT, "../x").await.unwrap().is_none());
        assert_eq!(jobs.list(&*p, OTHER).await.unwrap(), Vec::<Value>::new());
    }
}
