//! Long-running operations (whole-vault backup and restore) as jobs: what a job is, its
//! states, its progress and how it is answered at `GET /kagi/jobs/{id}`. The registry that
//! runs them lives in `kagi-vault`; this is only the model.

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// The state of a job, as `status` names it (Azure's long-running operation states).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobStatus {
    /// Running.
    InProgress,
    /// Finished; its result (if any) can be fetched.
    Completed,
    /// Finished with an error.
    Failed,
}

impl JobStatus {
    /// Whether the job has ended.
    pub fn is_terminal(self) -> bool {
        !matches!(self, Self::InProgress)
    }
}

/// What kind of work a job does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobKind {
    /// A whole-vault backup to a file.
    VaultBackup,
    /// A whole-vault restore from a file.
    VaultRestore,
}

/// Progress: `done` of `total` `unit`s in the current `phase`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobProgress {
    /// Units done.
    pub done: u64,
    /// Units in all (0 while unknown).
    pub total: u64,
    /// `objects` (key and secret versions, role assignments) or `bytes`.
    pub unit: String,
    /// What the job is doing: `snapshot`, `encrypt`, `verify`, `restore`, `done`.
    pub phase: String,
}

/// Why a job failed: Azure's error shape (code, message, optional inner code).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobError {
    /// HTTP status the failure corresponds to.
    pub status: u16,
    /// Error code.
    pub code: String,
    /// Message.
    pub message: String,
    /// Inner error code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inner: Option<String>,
}

impl From<&crate::KvError> for JobError {
    fn from(e: &crate::KvError) -> Self {
        Self {
            status: e.status(),
            code: e.code.as_str().to_string(),
            message: e.message.clone(),
            inner: e.inner.map(str::to_string),
        }
    }
}

/// A job as kagi keeps it (and persists it as one JSON file per job).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Job {
    /// Job id (32 hex).
    pub id: String,
    /// What it does.
    pub kind: JobKind,
    /// The ARM id of the vault it works on.
    pub resource: String,
    /// State.
    pub status: JobStatus,
    /// Progress.
    pub progress: JobProgress,
    /// Start (Unix seconds).
    pub start_time: i64,
    /// End (Unix seconds), once ended.
    #[serde(default)]
    pub end_time: Option<i64>,
    /// Why it failed.
    #[serde(default)]
    pub error: Option<JobError>,
    /// What it produced besides a file (a restore's report: counts, skipped assignments).
    #[serde(default)]
    pub result: Option<Value>,
    /// Size of the result file, once written.
    #[serde(default)]
    pub result_bytes: Option<u64>,
}

impl Job {
    /// The answer of `GET /kagi/jobs/{id}`.
    pub fn to_json(&self, status_url: &str) -> Value {
        let mut v = json!({
            "id": self.id,
            "name": self.id,
            "type": match self.kind {
                JobKind::VaultBackup => "Kagi.Jobs/vaultBackup",
                JobKind::VaultRestore => "Kagi.Jobs/vaultRestore",
            },
            "resourceId": self.resource,
            "status": self.status,
            "progress": self.progress,
            "startTime": crate::time::rfc3339(self.start_time),
            "endTime": self.end_time.map(crate::time::rfc3339),
            "error": self.error.as_ref().map(|e| {
                let mut err = json!({"code": e.code, "message": e.message});
                if let Some(inner) = &e.inner {
                    err["innererror"] = json!({"code": inner});
                }
                err
            }),
            "statusUrl": status_url,
        });
        if let Some(r) = &self.result {
            v["result"] = r.clone();
        }
        if let (JobKind::VaultBackup, JobStatus::Completed) = (self.kind, self.status) {
            v["resultUrl"] = json!(format!("{status_url}/result"));
            v["resultBytes"] = json!(self.result_bytes);
        }
        v
    }

    /// A job that was running when the server stopped: failed, "interrupted".
    pub fn interrupted(mut self, now: i64) -> Self {
        if self.status == JobStatus::InProgress {
            self.status = JobStatus::Failed;
            self.end_time = Some(now);
            self.error = Some(JobError {
                status: 500,
                code: "JobInterrupted".into(),
                message: "interrupted: the kagi server stopped while the job was running; \
                          start it again."
                    .into(),
                inner: None,
            });
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job() -> Job {
        Job {
            id: "0123456789abcdef0123456789abcdef".into(),
            kind: JobKind::VaultBackup,
            resource: "/subscriptions/s/resourceGroups/rg/providers/Microsoft.KeyVault/vaults/v"
                .into(),
            status: JobStatus::InProgress,
            progress: JobProgress {
                done: 1,
                total: 4,
                unit: "objects".into(),
                phase: "encrypt".into(),
            },
            start_time: 0,
            end_time: None,
            error: None,
            result: None,
            result_bytes: None,
        }
    }

    #[test]
    fn renders_and_round_trips() {
        let j = job();
        let v = j.to_json("https://localhost:8443/kagi/jobs/x");
        assert_eq!(v["status"], "InProgress");
        assert_eq!(v["progress"]["total"], 4);
        assert_eq!(v["startTime"], "1970-01-01T00:00:00Z");
        assert!(v["endTime"].is_null());
        assert!(v.get("resultUrl").is_none());
        let back: Job = serde_json::from_str(&serde_json::to_string(&j).unwrap()).unwrap();
        assert_eq!(back, j);
    }

    #[test]
    fn interrupted_jobs_fail_and_ended_ones_stay() {
        let j = job().interrupted(10);
        assert_eq!(j.status, JobStatus::Failed);
        assert_eq!(j.end_time, Some(10));
        assert!(j.error.as_ref().unwrap().message.starts_with("interrupted"));
        let mut done = job();
        done.status = JobStatus::Completed;
        done.result_bytes = Some(5);
        let v = done.clone().interrupted(10).to_json("u");
        assert_eq!(v["status"], "Completed");
        assert_eq!(v["resultUrl"], "u/result");
        assert!(JobStatus::Failed.is_terminal() && !JobStatus::InProgress.is_terminal());
    }

    #[test]
    fn errors_keep_azure_codes() {
        let e = crate::KvError::conflict("busy").with_inner("VaultNotEmpty");
        let je = JobError::from(&e);
        assert_eq!(je.status, 409);
        assert_eq!(je.inner.as_deref(), Some("VaultNotEmpty"));
        let mut j = job();
        j.status = JobStatus::Failed;
        j.error = Some(je);
        let v = j.to_json("u");
        assert_eq!(v["error"]["innererror"]["code"], "VaultNotEmpty");
    }
}
