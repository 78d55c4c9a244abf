//! The job registry: long operations (whole-vault backup and restore) run in the background
//! and are followed at `GET /kagi/jobs/{id}`.
//!
//! Jobs live in memory and each is also written to `<data>/jobs/{id}.json` (mode 0600) when it
//! starts, changes phase and ends, next to its result file (`{id}.kvbak`). When the server
//! starts again, a job that was running is answered as failed ("interrupted"); ended jobs and
//! their results are kept for [`RETENTION`] after they end, then removed.
//!
//! Every job is mirrored into the store too (a service document of [`JOBS_KEY`], written by one
//! task per job: when it changed, at most once a second), so that every
//! node sharing the store answers for it: a node asked for a job it does not run reads the
//! store: a running job is alive while its node holds the job's lease (renewed by the mirror
//! task, on the database's clock; on SQLite there is one node), else interrupted. With
//! blobs in a bucket (`kagi server --blobs`) a backup's result file is uploaded to the bucket
//! (`jobs/{id}.kvbak`) before the job is written as completed, and another node fetches it from
//! there when it is downloaded through that node.

use std::collections::HashMap;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use kagi_core::jobs::{Job, JobError, JobKind, JobProgress, JobStatus};
use kagi_core::time::Clock;
use kagi_core::{ErrorCode, KvError};
use kagi_identity::Principal;
use kagi_store::{ServiceDocument, Store};
use serde_json::{Value, json};

use crate::{Platform, internal, node_id};

/// How long an ended job and its result file are kept.
pub const RETENTION: i64 = 24 * 3600;

/// The store's resource key under which jobs are mirrored (documents of kind `vault-job`).
pub const JOBS_KEY: &str = "/kagi/jobs";
const JOB_KIND: &str = "vault-job";
/// The lease a running job holds (renewed by its mirror task): while another node holds it,
/// the job runs there; once it expired (30 s, on the database's clock), its node died.
const LEASE_MS: i64 = 30_000;

fn job_lease(id: &str) -> String {
    format!("vault-job:{id}")
}

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
    /// Wakes the job's mirror task (a phase began, or the job ended).
    changed: tokio::sync::Notify,
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
        self.changed.notify_one();
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
                if let Some(id) = name.strip_suffix(".kvbak") {
                    // A result fetched from the bucket for a job another node ran has no row
                    // here: it goes when the job would have.
                    let old = entry
                        .metadata()
                        .and_then(|m| m.modified())
                        .ok()
                        .and_then(|t| t.elapsed().ok())
                        .is_some_and(|age| age.as_secs() > RETENTION.unsigned_abs());
                    if old && !dir.join(format!("{id}.json")).exists() {
                        let _ = std::fs::remove_file(&path);
                    }
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
                    changed: tokio::sync::Notify::new(),
                });
                if was_running {
                    handle.persist(&job);
                    self.mirror_once(&job);
                }
                map.insert(job.id.clone(), handle);
            }
            *t = Some(map);
        }
        Ok(t)
    }

    /// Writes a job's state to the store once, in the background.
    fn mirror_once(&self, job: &Job) {
        let (store, doc) = (self.store.clone(), mirror_doc(self.clock.now(), job));
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if let Err(e) = store.put_service_document(JOBS_KEY, &doc).await {
                    tracing::warn!(job = %doc.name, error = %e, "job not mirrored to the store");
                }
            });
        }
    }

    /// Writes a new job's mirror to the store before its id is handed out, so that the next
    /// request for it finds it on any node (the mirror task writes the changes after).
    pub(crate) async fn announce_job(&self, handle: &JobHandle) {
        let doc = mirror_doc(self.clock.now(), &handle.get());
        if let Err(e) = self.store.put_service_document(JOBS_KEY, &doc).await {
            tracing::warn!(job = %doc.name, error = %e, "job not mirrored to the store");
        }
    }

    /// Keeps a running job's mirror in the store current until its end is written: at each
    /// change (at most once a second); its lease says it is alive. One task per job, so the
    /// writes of one job never overtake each other.
    fn mirror(&self, handle: Arc<JobHandle>) {
        let (store, clock) = (self.store.clone(), self.clock.clone());
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        rt.spawn(mirror_job(store, clock, handle));
    }

    /// Removes the store's mirrors (and the bucket's result files) of jobs ended longer ago
    /// than [`RETENTION`], in the background.
    fn expire_mirrors(&self) {
        let (store, now, blobs) = (self.store.clone(), self.clock.now(), self.blobs());
        let dir = self.jobs_dir().ok();
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        rt.spawn(async move {
            let Ok(docs) = store.list_service_documents(JOBS_KEY, JOB_KIND).await else {
                return;
            };
            for doc in docs {
                let ended = serde_json::from_str::<Value>(&doc.body)
                    .ok()
                    .and_then(|v| v["job"]["endTime"].as_i64());
                if ended.is_some_and(|t| now - t > RETENTION) {
                    if let Some(d) = &dir {
                        let _ = blobs.remove(d, &format!("{}.kvbak", doc.name)).await;
                    }
                    let _ = store
                        .delete_service_document(JOBS_KEY, JOB_KIND, &doc.name)
                        .await;
                }
            }
        });
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
            changed: tokio::sync::Notify::new(),
        });
        // The table is loaded from the folder (on first use) before this job's file is in it:
        // loading takes every running job it finds for one an earlier process left behind.
        let mut t = self.job_table()?;
        handle.persist(&job);
        self.mirror(handle.clone());
        let map = t.get_or_insert_with(HashMap::new);
        let now = self.clock.now();
        map.retain(|_, h| h.get().end_time.is_none_or(|e| now - e <= RETENTION));
        map.insert(id, handle.clone());
        drop(t);
        self.expire_mirrors();
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

    /// A job by id: one this node runs (or ran), else one another node sharing the store runs
    /// or ran, as mirrored there (running with its lease free: interrupted).
    async fn find_job(&self, id: &str) -> Result<Job, KvError> {
        if let Ok(h) = self.job_handle(id) {
            return Ok(h.get());
        }
        let id = id.to_ascii_lowercase();
        let doc = self
            .store
            .get_service_document(JOBS_KEY, JOB_KIND, &id)
            .await
            .map_err(|e| internal("read job", e))?
            .ok_or_else(|| job_not_found(&id))?;
        let mirrored: Value =
            serde_json::from_str(&doc.body).map_err(|e| internal("job mirror", e))?;
        let job: Job = serde_json::from_value(mirrored["job"].clone())
            .map_err(|e| internal("job mirror", e))?;
        let now = self.clock.now();
        let job = if job.status == JobStatus::InProgress && self.job_lease_free(&id).await {
            job.interrupted(now)
        } else {
            job
        };
        if job.end_time.is_some_and(|t| now - t > RETENTION) {
            return Err(job_not_found(&id));
        }
        Ok(job)
    }

    /// Whether no node holds the lease of running job `id` (asking takes it for a moment and
    /// gives it up again). A store that cannot tell counts as held: the job is not declared
    /// dead on an error.
    async fn job_lease_free(&self, id: &str) -> bool {
        let name = job_lease(id);
        match self.store.acquire_lease(&name, node_id(), 1_000).await {
            Ok(Some(_)) => {
                let _ = self.store.release_lease(&name, node_id()).await;
                true
            }
            _ => false,
        }
    }

    /// `GET /kagi/jobs/{id}` (bootstrap administrator only).
    pub async fn job(&self, caller: &Principal, id: &str) -> Result<Value, KvError> {
        self.require_job_admin(caller)?;
        let job = self.find_job(id).await?;
        Ok(job.to_json(&self.job_url(&job.id)))
    }

    /// With blobs in a bucket: uploads a backup job's result file there (`jobs/{id}.kvbak`),
    /// so that every node can serve it. Called before the job is written as completed.
    pub(crate) async fn share_result(&self, id: &str) -> Result<(), KvError> {
        self.blobs()
            .upload_file(&self.jobs_dir()?, &format!("{id}.kvbak"))
            .await
            .map(drop)
            .map_err(|e| internal("upload backup file", e))
    }

    /// The result file of a completed backup job and its size, for
    /// `GET /kagi/jobs/{id}/result` (bootstrap administrator only). 409 while the job runs or
    /// after it failed; 404 for a job without a result file.
    pub async fn job_result_file(
        &self,
        caller: &Principal,
        id: &str,
    ) -> Result<(PathBuf, u64), KvError> {
        self.require_job_admin(caller)?;
        let job = self.find_job(id).await?;
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
        let dir = self.jobs_dir()?;
        let path = dir.join(format!("{}.kvbak", job.id));
        if !path.exists() {
            // Made by another node: its file is in the bucket (ciphertext, as the file is).
            self.blobs()
                .download_file(&dir, &format!("{}.kvbak", job.id))
                .await
                .map_err(|e| internal("fetch backup file", e))?;
        }
        let len = std::fs::metadata(&path)
            .map_err(|_| job_not_found(id))?
            .len();
        Ok((path, len))
    }
}

/// A job's mirror document.
fn mirror_doc(now: i64, job: &Job) -> ServiceDocument {
    ServiceDocument {
        kind: JOB_KIND.into(),
        name: job.id.clone(),
        body: json!({ "job": job }).to_string(),
        updated: now,
    }
}

/// The body of [`Platform::mirror`].
async fn mirror_job(store: Arc<dyn Store>, clock: Arc<dyn Clock>, handle: Arc<JobHandle>) {
    let mut written: Option<Job> = None;
    let lease = job_lease(&handle.id());
    loop {
        // Renewed every round (at most a second apart): other nodes see the job alive.
        if let Err(e) = store.acquire_lease(&lease, node_id(), LEASE_MS).await {
            tracing::warn!(job = %lease, error = %e, "job lease not renewed");
        }
        let job = handle.get();
        // Liveness is the lease's: the document is written only when the job changed.
        if written.as_ref() != Some(&job) {
            match store
                .put_service_document(JOBS_KEY, &mirror_doc(clock.now(), &job))
                .await
            {
                Ok(()) => {
                    if job.status.is_terminal() {
                        let _ = store.release_lease(&lease, node_id()).await;
                        return;
                    }
                    written = Some(job);
                }
                Err(e) => {
                    tracing::warn!(job = %job.id, error = %e, "job not mirrored to the store")
                }
            }
        }
        tokio::select! {
            _ = handle.changed.notified() => {}
            _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
        }
    }
}
