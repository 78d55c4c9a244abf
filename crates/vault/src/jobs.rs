//! The job registry: long operations (whole-vault backup and restore) run in the background
//! and are followed at `GET /kagi/jobs/{id}`.
//!
//! Jobs live in memory and each is also written to `<data>/jobs/{id}.json` (mode 0600) when it
//! starts, changes phase and ends, next to its result file (`{id}.kvbak`). When the server
//! starts again, a job that was running is answered as failed ("interrupted"); ended jobs and
//! their results are kept for [`RETENTION`] after they end, then removed.

use std::collections::HashMap;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use kagi_core::jobs::{Job, JobError, JobKind, JobProgress, JobStatus};
use kagi_core::{ErrorCode, KvError};
use kagi_identity::Principal;
use serde_json::Value;

use crate::{Platform, internal};

/// How long an ended job and its result file are kept.
pub const RETENTION: i64 = 24 * 3600;

/// Jobs by id; `None` until loaded from the data directory.
type JobTable = Option<HashMap<String, Arc<JobHandle>>>;

/// The jobs of one platform (loaded from the data directory on first use).
#[derive(Debug, Default)]
pub(crate) struct Jobs {
    table: Mutex<JobTable>,
}

/// One job: its state, shared by the task that runs it and the readers that poll it.
#[derive(Debug)]
pub(crate) struct JobHandle {
    job: Mutex<Job>,
    dir: PathBuf,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Writes `bytes` to `path` atomically with mode 0600.
pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    kagi_fs::write_atomically(path, bytes, 0o600)
}

impl JobHandle {
    /// A snapshot of the job.
    pub(crate) fn get(&self) -> Job {
        lock(&self.job).clone()
    }

    pub(crate) fn id(&self) -> String {
        lock(&self.job).id.clone()
    }

    fn persist(&self, job: &Job) {
        let path = self.dir.join(format!("{}.json", job.id));
        match serde_json::to_vec(job) {
            Ok(bytes) => {
                if let Err(e) = write_private(&path, &bytes) {
                    tracing::warn!(job = %job.id, error = %e, "job row not written");
                }
            }
            Err(e) => tracing::warn!(job = %job.id, error = %e, "job row not encoded"),
        }
    }

    /// Starts a phase: `total` `unit`s to do (persisted).
    pub(crate) fn phase(&self, phase: &str, unit: &str, total: u64) {
        let mut j = lock(&self.job);
        j.progress = JobProgress {
            done: 0,
            total,
            unit: unit.into(),
            phase: phase.into(),
        };
        self.persist(&j);
    }

    /// Sets the units done in the current phase (memory only).
    pub(crate) fn set_done(&self, done: u64) {
        let mut j = lock(&self.job);
        j.progress.done = done;
    }

    /// Adds to the units done in the current phase (memory only).
    pub(crate) fn advance(&self, n: u64) {
        let mut j = lock(&self.job);
        j.progress.done = j.progress.done.saturating_add(n);
    }

    /// Ends the job successfully.
    pub(crate) fn complete(&self, now: i64, result: Option<Value>, result_bytes: Option<u64>) {
        let mut j = lock(&self.job);
        j.status = JobStatus::Completed;
        j.end_time = Some(now);
        j.result = result;
        j.result_bytes = result_bytes;
        j.progress.phase = "done".into();
        j.progress.done = j.progress.total;
        self.persist(&j);
    }

    /// Ends the job with an error (a 500 carries no detail; the cause is logged).
    pub(crate) fn fail(&self, now: i64, e: &KvError) {
        let mut j = lock(&self.job);
        j.status = JobStatus::Failed;
        j.end_time = Some(now);
        j.error = Some(JobError::from(e));
        self.persist(&j);
        tracing::warn!(job = %j.id, error = %e, "job failed");
    }
}

fn job_not_found(id: &str) -> KvError {
    KvError::new(
        ErrorCode::NotFound,
        format!(
            "There is no job '{}' (ended jobs are kept for 24 hours).",
            kagi_core::ids::printable(id)
        ),
    )
    .with_inner("JobNotFound")
}

impl Platform {
    /// `kagi_jobs{service="keyvault", kind, state}` for the metrics: every kind and state,
    /// zero included. Jobs not loaded yet (none started or looked at since the server
    /// started) count as none: a scrape reads no file.
    pub fn job_gauges(&self) -> Vec<kagi_core::gauge::GaugeSample> {
        use kagi_core::gauge::{GaugeSample, JOBS, JOBS_HELP};
        let mut counts: Vec<((JobKind, JobStatus), i64)> = Vec::new();
        for kind in [JobKind::VaultBackup, JobKind::VaultRestore] {
            for status in [
                JobStatus::InProgress,
                JobStatus::Completed,
                JobStatus::Failed,
            ] {
                counts.push(((kind, status), 0));
            }
        }
        if let Some(table) = lock(&self.jobs.table).as_ref() {
            for handle in table.values() {
                let j = lock(&handle.job);
                if let Some((_, n)) = counts.iter_mut().find(|(k, _)| *k == (j.kind, j.status)) {
                    *n += 1;
                }
            }
        }
        counts
            .into_iter()
            .map(|((kind, status), n)| {
                GaugeSample::new(JOBS, JOBS_HELP, n)
                    .label("service", "keyvault")
                    .label("kind", format!("{kind:?}"))
                    .label("state", format!("{status:?}"))
            })
            .collect()
    }

    /// `<data>/jobs`, created 0700.
    pub(crate) fn jobs_dir(&self) -> Result<PathBuf, KvError> {
        let dir = self.config.data_dir.join("jobs");
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|e| internal("create jobs directory", e))?;
        Ok(dir)
    }

    /// The job table, loaded from the data directory on first use: jobs that were running
    /// when the server stopped fail as interrupted; expired jobs are removed with their files.
    pub(crate) fn job_table(&self) -> Result<MutexGuard<'_, JobTable>, KvError> {
        let mut t = lock(&self.jobs.table);
        if t.is_none() {
            let dir = self.jobs_dir()?;
            let now = self.clock.now();
            let mut map = HashMap::new();
            let entries = std::fs::read_dir(&dir).map_err(|e| internal("read jobs", e))?;
            for entry in entries.flatten() {
                let path = entry.path();
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.ends_with(".upload") || name.ends_with(".part") || name.ends_with(".tmp") {
                    // Left by a job that was running when the server stopped.
                    let _ = std::fs::remove_file(&path);
                    continue;
                }
                if !name.ends_with(".json") {
                    continue;
                }
                let Some(job) = std::fs::read(&path)
                    .ok()
                    .and_then(|b| serde_json::from_slice::<Job>(&b).ok())
                else {
                    continue;
                };
                let was_running = job.status == JobStatus::InProgress;
                let job = job.interrupted(now);
                if job.end_time.is_some_and(|t| now - t > RETENTION) {
                    let _ = std::fs::remove_file(&path);
                    let _ = std::fs::remove_file(dir.join(format!("{}.kvbak", job.id)));
                    continue;
                }
                let handle = Arc::new(JobHandle {
                    job: Mutex::new(job.clone()),
                    dir: dir.clone(),
                });
                if was_running {
                    handle.persist(&job);
                }
                map.insert(job.id.clone(), handle);
            }
            *t = Some(map);
        }
        Ok(t)
    }

    /// Registers a new running job.
    pub(crate) fn new_job(&self, kind: JobKind, resource: &str) -> Result<Arc<JobHandle>, KvError> {
        let id = kagi_crypto::random_bytes(16)
            .map_err(|e| internal("rng", e))?
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>();
        let job = Job {
            id: id.clone(),
            kind,
            resource: resource.to_string(),
            status: JobStatus::InProgress,
            progress: JobProgress {
                done: 0,
                total: 0,
                unit: "objects".into(),
                phase: "starting".into(),
            },
            start_time: self.clock.now(),
            end_time: None,
            error: None,
            result: None,
            result_bytes: None,
        };
        let handle = Arc::new(JobHandle {
            job: Mutex::new(job.clone()),
            dir: self.jobs_dir()?,
        });
        handle.persist(&job);
        let mut t = self.job_table()?;
        let map = t.get_or_insert_with(HashMap::new);
        let now = self.clock.now();
        map.retain(|_, h| h.get().end_time.is_none_or(|e| now - e <= RETENTION));
        map.insert(id, handle.clone());
        Ok(handle)
    }

    fn require_job_admin(&self, caller: &Principal) -> Result<(), KvError> {
        if caller.object_id == self.admin_object_id {
            Ok(())
        } else {
            Err(KvError::forbidden(format!(
                "The client '{}' with object id '{}' does not have authorization to read jobs.",
                caller.client_id, caller.object_id
            ))
            .with_inner("AuthorizationFailed"))
        }
    }

    fn job_handle(&self, id: &str) -> Result<Arc<JobHandle>, KvError> {
        self.job_table()?
            .as_ref()
            .and_then(|m| m.get(&id.to_ascii_lowercase()).cloned())
            .ok_or_else(|| job_not_found(id))
    }

    /// The URL at which a job is polled.
    pub fn job_url(&self, id: &str) -> String {
        format!("{}/kagi/jobs/{id}", self.config.authority())
    }

    /// `GET /kagi/jobs/{id}` (bootstrap administrator only).
    pub fn job(&self, caller: &Principal, id: &str) -> Result<Value, KvError> {
        self.require_job_admin(caller)?;
        let job = self.job_handle(id)?.get();
        Ok(job.to_json(&self.job_url(&job.id)))
    }

    /// The result file of a completed backup job and its size, for
    /// `GET /kagi/jobs/{id}/result` (bootstrap administrator only). 409 while the job runs or
    /// after it failed; 404 for a job without a result file.
    pub fn job_result_file(&self, caller: &Principal, id: &str) -> Result<(PathBuf, u64), KvError> {
        self.require_job_admin(caller)?;
        let job = self.job_handle(id)?.get();
        match job.status {
            JobStatus::InProgress => {
                return Err(KvError::conflict(
                    "The job is still running; poll its status until it is Completed.",
                )
                .with_inner("JobNotCompleted"));
            }
            JobStatus::Failed => {
                return Err(
                    KvError::conflict("The job failed; it has no result.").with_inner("JobFailed")
                );
            }
            JobStatus::Completed => {}
        }
        if job.kind != JobKind::VaultBackup {
            return Err(KvError::new(
                ErrorCode::NotFound,
                "This job produces no file; its result is in its status.",
            ));
        }
        let path = self.jobs_dir()?.join(format!("{}.kvbak", job.id));
        let len = std::fs::metadata(&path)
            .map_err(|_| job_not_found(id))?
            .len();
        Ok((path, len))
    }
}
