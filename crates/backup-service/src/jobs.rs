//! Jobs: key assignment, backup, restore and check run in the background; their state is
//! followed at `GET {vault id}/backupJobs/{id}`.
//!
//! A job lives in memory while it runs and is written to `{vault dir}/jobs/{id}.json` (an
//! atomic file replace) when it starts, while it makes progress, and when it ends. Progress is
//! written at most at each new 5% step of `progress.total` and otherwise at most once every
//! [`PERSIST_EVERY`], from a short-lived writer thread, so the engine threads reporting progress
//! never wait for an fsync. `lastUpdateTime` is the platform time of the state last written.
//!
//! A job found on disk still `InProgress` with no runner in this process (the server stopped or
//! was killed while it ran) is answered as `Failed` with the error code `JobInterrupted`,
//! keeping the last progress written, and its file is rewritten so once. Its `endTime` is its
//! `lastUpdateTime`: the last moment the job is known to have been alive, rather than the time
//! the server noticed, which would depend on how long the server was down and on who asked
//! first. The job ended somewhere between that time and the next start of the server.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kagi_core::KvError;
use kagi_core::time::{Clock, SystemClock, rfc3339};
use serde_json::{Value, json};

use crate::state::{io, write_atomic};

/// The longest a running job's progress goes unwritten while it changes (within a 5% step).
pub const PERSIST_EVERY: Duration = Duration::from_secs(2);

/// Progress is also written at each new step of `total / PERSIST_STEPS` (5%).
const PERSIST_STEPS: u64 = 20;

/// The message of an interrupted job.
const INTERRUPTED: &str =
    "The server stopped while the job ran; nothing it wrote is visible. Run it again.";

/// Job files with a runner in this process. Process-wide rather than per [`Jobs`], so that a
/// job file is never taken for an interrupted one while any service instance still runs it.
static RUNNING: Mutex<BTreeSet<PathBuf>> = Mutex::new(BTreeSet::new());

/// Serialises the rewrites of interrupted jobs: two readers may find the same one, and the
/// atomic replace uses one temporary file name per target.
static REWRITE: Mutex<()> = Mutex::new(());

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn running(file: &Path) -> bool {
    lock(&RUNNING).contains(file)
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
    file: PathBuf,
    /// Platform time minus system time when the job started: progress reports carry no time,
    /// and the job's times are on the platform clock (which `--test-clock` moves).
    clock_offset: i64,
    /// Held while the file is written: orders a late progress write before the final one (so
    /// a job never goes back to `InProgress` on disk) and keeps writers off each other's
    /// temporary file.
    writing: Mutex<()>,
    /// A progress write is queued and has not yet taken its snapshot.
    queued: AtomicBool,
    /// [`PERSIST_EVERY`], except in tests.
    every: Duration,
}

impl JobHandle {
    /// The job's JSON.
    pub fn get(&self) -> Value {
        lock(&self.state).body.clone()
    }

    /// Sets the progress, and writes it to the job's file in the background when it reached a
    /// new 5% step or [`PERSIST_EVERY`] passed since it was last written.
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
            let spawned = std::thread::Builder::new()
                .name("kagi-job-progress".into())
                .spawn(move || me.write_progress());
            if spawned.is_err() {
                self.write_progress();
            }
        }
    }

    fn write_progress(&self) {
        let _w = lock(&self.writing);
        self.queued.store(false, Ordering::SeqCst);
        let snapshot = {
            let mut s = lock(&self.state);
            if s.body["status"] != "InProgress" {
                return; // ended meanwhile: the final state is (being) written.
            }
            s.body["lastUpdateTime"] = json!(rfc3339(self.now()));
            s.body.clone()
        };
        self.persist(&snapshot);
    }

    fn now(&self) -> i64 {
        SystemClock.now().saturating_add(self.clock_offset)
    }

    /// Ends the job as Completed with its stats.
    pub fn complete(&self, now: i64, stats: Value) {
        self.end(now, |b| {
            b["status"] = json!("Completed");
            b["stats"] = stats;
            if let Some(total) = b["progress"]["total"].as_u64() {
                b["progress"]["done"] = json!(total);
            }
        });
    }

    /// Ends the job as Failed, keeping `stats` (e.g. the problems a check found).
    pub fn fail_with(&self, now: i64, e: &KvError, stats: Value) {
        self.end(now, |b| {
            b["stats"] = stats;
            fail_body(b, e);
        });
    }

    /// Ends the job as Failed.
    pub fn fail(&self, now: i64, e: &KvError) {
        self.end(now, |b| fail_body(b, e));
    }

    fn end(&self, now: i64, change: impl FnOnce(&mut Value)) {
        let _w = lock(&self.writing);
        let snapshot = {
            let mut s = lock(&self.state);
            change(&mut s.body);
            s.body["endTime"] = json!(rfc3339(now));
            s.body["lastUpdateTime"] = json!(rfc3339(now));
            s.body.clone()
        };
        self.persist(&snapshot);
        lock(&RUNNING).remove(&self.file);
    }

    fn persist(&self, body: &Value) {
        if let Err(e) = write_atomic(&self.file, body.to_string().as_bytes()) {
            tracing::error!(error = %e, job = %self.file.display(), "job not persisted");
        }
    }

    /// Test only: forget that this process runs the job, as after a restart.
    #[cfg(test)]
    fn abandon(&self) {
        lock(&RUNNING).remove(&self.file);
    }

    /// Test only: waits until no progress write is queued or being written.
    #[cfg(test)]
    fn flush(&self) {
        while self.queued.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(1));
        }
        drop(lock(&self.writing));
    }
}

fn fail_body(b: &mut Value, e: &KvError) {
    b["status"] = json!("Failed");
    b["error"] = json!({
        "code": e.inner.unwrap_or(e.code.as_str()),
        "message": e.message,
    });
}

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
    /// Starts a job of `operation` on `entity` (an item name, or the vault) in a vault.
    pub fn start(
        &self,
        vault_id: &str,
        vault_dir: &Path,
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
        let file = vault_dir.join("jobs").join(format!("{id}.json"));
        let handle = Arc::new(JobHandle {
            state: Mutex::new(State {
                body: body.clone(),
                step: 0,
                at: Instant::now(),
            }),
            file: file.clone(),
            clock_offset: now.saturating_sub(SystemClock.now()),
            writing: Mutex::new(()),
            queued: AtomicBool::new(false),
            every: self.every,
        });
        // Registered as running before its file exists, so no reader ever finds the file
        // without its runner and takes it for an interrupted job.
        lock(&RUNNING).insert(file);
        lock(&self.live).insert(id, handle.clone());
        {
            let _w = lock(&handle.writing);
            handle.persist(&body);
        }
        Ok(handle)
    }

    /// A job of a vault, by id.
    pub fn get(&self, vault_dir: &Path, id: &str) -> Option<Value> {
        if !id.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            return None;
        }
        let file = vault_dir.join("jobs").join(format!("{id}.json"));
        if let Some(h) = lock(&self.live).get(&id.to_ascii_lowercase()) {
            // Only the vault that ran it answers for it.
            return file.exists().then(|| h.get());
        }
        let v = read_job(&file)?;
        if v["status"] != "InProgress" || running(&file) {
            return Some(v);
        }
        Some(interrupted(&file).unwrap_or_else(|| mark_interrupted(v)))
    }

    /// Every job of a vault, newest first.
    pub fn list(&self, vault_dir: &Path) -> Vec<Value> {
        let mut out: Vec<Value> = std::fs::read_dir(vault_dir.join("jobs"))
            .map(|rd| {
                rd.filter_map(Result::ok)
                    .filter_map(|e| {
                        let name = e.file_name().to_string_lossy().to_string();
                        let id = name.strip_suffix(".json")?;
                        self.get(vault_dir, id)
                    })
                    .collect()
            })
            .unwrap_or_default();
        out.sort_by(|a, b| {
            b["startTime"]
                .as_str()
                .cmp(&a["startTime"].as_str())
                .then(b["name"].as_str().cmp(&a["name"].as_str()))
        });
        out
    }
}

fn read_job(file: &Path) -> Option<Value> {
    serde_json::from_slice(&std::fs::read(file).ok()?).ok()
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

/// Rewrites an interrupted job's file as Failed, once, and returns what it now holds (`None`
/// when it could not be read back; the caller then answers from what it read).
fn interrupted(file: &Path) -> Option<Value> {
    let _g = lock(&REWRITE);
    // Read again under the lock: another reader may have rewritten it meanwhile.
    let v = read_job(file)?;
    if v["status"] != "InProgress" || running(file) {
        return Some(v);
    }
    let v = mark_interrupted(v);
    match write_atomic(file, v.to_string().as_bytes()) {
        Ok(()) => tracing::warn!(job = %file.display(), "interrupted job marked failed"),
        Err(e) => {
            tracing::error!(error = %e, job = %file.display(), "interrupted job not rewritten")
        }
    }
    Some(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kagi_core::ErrorCode;

    const VAULT: &str =
        "/subscriptions/s/resourceGroups/rg/providers/Microsoft.RecoveryServices/vaults/v";
    /// 2030-01-01: ahead of the system clock, as under `--test-clock`.
    const T0: i64 = 1_893_456_000;

    /// Jobs that write progress only at 5% steps (no time-based writes during a test).
    fn steps_only() -> Jobs {
        Jobs {
            every: Duration::MAX,
            ..Jobs::default()
        }
    }

    fn on_disk(h: &JobHandle) -> Value {
        h.flush();
        read_job(&h.file).expect("job file")
    }

    fn name(h: &JobHandle) -> String {
        h.get()["name"].as_str().unwrap().to_string()
    }

    #[test]
    fn progress_is_written_at_each_five_percent_step() {
        let dir = tempfile::tempdir().unwrap();
        let h = steps_only()
            .start(VAULT, dir.path(), "Backup", "item", T0)
            .unwrap();
        let first = on_disk(&h);
        assert_eq!(first["status"], "InProgress");
        assert_eq!(first["lastUpdateTime"], rfc3339(T0));
        h.progress(10, 100, "Bytes");
        let d = on_disk(&h);
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
        assert_eq!(on_disk(&h)["progress"]["done"], 10);
        h.progress(15, 100, "Bytes");
        assert_eq!(on_disk(&h)["progress"]["done"], 15);
        // A jump over several steps is one write of the newest value.
        h.progress(90, 100, "Bytes");
        assert_eq!(on_disk(&h)["progress"]["done"], 90);
    }

    #[test]
    fn progress_is_written_when_the_interval_passed() {
        let dir = tempfile::tempdir().unwrap();
        let jobs = Jobs {
            every: Duration::ZERO,
            ..Jobs::default()
        };
        let h = jobs.start(VAULT, dir.path(), "Backup", "item", T0).unwrap();
        h.progress(1, 1000, "Bytes");
        assert_eq!(on_disk(&h)["progress"]["done"], 1);
        h.progress(2, 1000, "Bytes");
        assert_eq!(on_disk(&h)["progress"]["done"], 2);
        // Unknown total: only the interval writes.
        h.progress(7, 0, "Bytes");
        assert_eq!(on_disk(&h)["progress"]["done"], 7);
    }

    #[test]
    fn the_end_is_never_undone_by_progress() {
        let dir = tempfile::tempdir().unwrap();
        let jobs = Jobs {
            every: Duration::ZERO,
            ..Jobs::default()
        };
        for _ in 0..20 {
            let h = jobs
                .start(VAULT, dir.path(), "Restore", "item", T0)
                .unwrap();
            // Reporters racing the end, as the engine's restore workers do.
            std::thread::scope(|s| {
                for t in 0..4u64 {
                    let h = h.clone();
                    s.spawn(move || {
                        for i in 0..50 {
                            h.progress(t * 50 + i, 200, "Bytes");
                        }
                    });
                }
                h.complete(T0 + 5, json!({"files": 3}));
            });
            h.progress(1, 200, "Bytes");
            let d = on_disk(&h);
            assert_eq!(d["status"], "Completed", "{d}");
            assert_eq!(d["endTime"], rfc3339(T0 + 5));
            assert_eq!(d["progress"]["done"], d["progress"]["total"], "{d}");
            assert_eq!(d["stats"], json!({"files": 3}));
            assert_eq!(h.get(), d);
        }
    }

    #[test]
    fn failure_keeps_stats_and_progress() {
        let dir = tempfile::tempdir().unwrap();
        let h = steps_only()
            .start(VAULT, dir.path(), "Check", "item", T0)
            .unwrap();
        h.progress(30, 100, "Bytes");
        let e = KvError::new(ErrorCode::BadParameter, "damaged").with_inner("RepositoryDamaged");
        h.fail_with(T0 + 9, &e, json!({"problems": ["p"]}));
        let d = on_disk(&h);
        assert_eq!(d["status"], "Failed");
        assert_eq!(d["endTime"], rfc3339(T0 + 9));
        assert_eq!(d["error"]["code"], "RepositoryDamaged");
        assert_eq!(d["stats"]["problems"], json!(["p"]));
        assert_eq!(d["progress"]["done"], 30);
    }

    #[test]
    fn a_running_job_is_not_taken_for_an_interrupted_one() {
        let dir = tempfile::tempdir().unwrap();
        let h = steps_only()
            .start(VAULT, dir.path(), "Backup", "item", T0)
            .unwrap();
        h.progress(50, 100, "Bytes");
        let before = on_disk(&h);
        // Another service instance of the same process reads the file: the job still runs.
        let other = steps_only();
        assert_eq!(other.get(dir.path(), &name(&h)).unwrap(), before);
        assert_eq!(on_disk(&h), before);
        h.complete(T0 + 1, json!({}));
        assert_eq!(
            other.get(dir.path(), &name(&h)).unwrap()["status"],
            "Completed"
        );
    }

    #[test]
    fn an_interrupted_job_fails_once_at_its_last_update_with_its_progress() {
        let dir = tempfile::tempdir().unwrap();
        let h = steps_only()
            .start(VAULT, dir.path(), "Backup", "item", T0)
            .unwrap();
        h.progress(40, 100, "Bytes");
        let written = on_disk(&h);
        h.progress(42, 100, "Bytes"); // not written: lost with the process
        h.abandon(); // the process dies

        let restarted = steps_only();
        let v = restarted.get(dir.path(), &name(&h)).unwrap();
        assert_eq!(v["status"], "Failed");
        assert_eq!(v["error"]["code"], "JobInterrupted");
        assert_eq!(v["endTime"], written["lastUpdateTime"]);
        assert!(v["endTime"].as_str() >= v["startTime"].as_str(), "{v}");
        assert_eq!(v["progress"], written["progress"]);
        assert_eq!(v["progress"]["done"], 40);
        // Rewritten on disk, and answered the same from then on.
        assert_eq!(read_job(&h.file).unwrap(), v);
        assert_eq!(restarted.get(dir.path(), &name(&h)).unwrap(), v);
        assert_eq!(restarted.list(dir.path()), vec![v.clone()]);
        assert_eq!(steps_only().get(dir.path(), &name(&h)).unwrap(), v);
    }

    #[test]
    fn an_interrupted_job_of_an_older_server_ends_at_its_start() {
        let dir = tempfile::tempdir().unwrap();
        let id = "0b8c1f9e-6a58-4c3e-9d6f-2f1e3b7a5c4d";
        let old = json!({
            "id": format!("{VAULT}/backupJobs/{id}"), "name": id,
            "type": "Microsoft.RecoveryServices/vaults/backupJobs", "operation": "Backup",
            "entityFriendlyName": "item", "status": "InProgress", "startTime": rfc3339(T0),
            "endTime": null, "progress": {"done": 0, "total": 0, "unit": "Bytes"},
            "error": null, "stats": null,
        });
        let file = dir.path().join("jobs").join(format!("{id}.json"));
        write_atomic(&file, old.to_string().as_bytes()).unwrap();
        let v = Jobs::default().get(dir.path(), id).unwrap();
        assert_eq!(v["status"], "Failed");
        assert_eq!(v["endTime"], rfc3339(T0));
        assert_eq!(read_job(&file).unwrap(), v);
    }

    #[test]
    fn only_the_vault_that_ran_a_job_answers_for_it() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let jobs = steps_only();
        let h = jobs.start(VAULT, a.path(), "Backup", "item", T0).unwrap();
        assert!(jobs.get(a.path(), &name(&h)).is_some());
        assert!(jobs.get(b.path(), &name(&h)).is_none());
        assert!(jobs.get(a.path(), "../x").is_none());
    }
}
