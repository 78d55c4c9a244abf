//! Jobs: key assignment, backup, restore and check run in the background; their state is
//! followed at `GET {vault id}/backupJobs/{id}`. A job lives in memory while it runs and is
//! written to `{vault dir}/jobs/{id}.json` when it starts and ends; a job found on disk still
//! `InProgress` with no runner (the server stopped) is answered as failed ("interrupted").

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use kagi_core::KvError;
use kagi_core::time::rfc3339;
use serde_json::{Value, json};

use crate::state::{io, write_atomic};

/// A running or ended job.
#[derive(Debug)]
pub struct JobHandle {
    body: Mutex<Value>,
    file: PathBuf,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl JobHandle {
    /// The job's JSON.
    pub fn get(&self) -> Value {
        lock(&self.body).clone()
    }

    /// Sets the progress.
    pub fn progress(&self, done: u64, total: u64, unit: &str) {
        lock(&self.body)["progress"] = json!({"done": done, "total": total, "unit": unit});
    }

    /// Ends the job as Completed with its stats.
    pub fn complete(&self, now: i64, stats: Value) {
        let snapshot = {
            let mut b = lock(&self.body);
            b["status"] = json!("Completed");
            b["endTime"] = json!(rfc3339(now));
            b["stats"] = stats;
            if let Some(total) = b["progress"]["total"].as_u64() {
                b["progress"]["done"] = json!(total);
            }
            b.clone()
        };
        self.persist(&snapshot);
    }

    /// Ends the job as Failed, keeping `stats` (e.g. the problems a check found).
    pub fn fail_with(&self, now: i64, e: &KvError, stats: Value) {
        lock(&self.body)["stats"] = stats;
        self.fail(now, e);
    }

    /// Ends the job as Failed.
    pub fn fail(&self, now: i64, e: &KvError) {
        let snapshot = {
            let mut b = lock(&self.body);
            b["status"] = json!("Failed");
            b["endTime"] = json!(rfc3339(now));
            b["error"] = json!({
                "code": e.inner.unwrap_or(e.code.as_str()),
                "message": e.message,
            });
            b.clone()
        };
        self.persist(&snapshot);
    }

    fn persist(&self, body: &Value) {
        if let Err(e) = write_atomic(&self.file, body.to_string().as_bytes()) {
            tracing::error!(error = %e, job = %self.file.display(), "job not persisted");
        }
    }
}

/// The jobs of the service, by id.
#[derive(Debug, Default)]
pub struct Jobs {
    live: Mutex<HashMap<String, Arc<JobHandle>>>,
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
            "progress": {"done": 0, "total": 0, "unit": "Bytes"},
            "error": null,
            "stats": null,
        });
        let handle = Arc::new(JobHandle {
            body: Mutex::new(body.clone()),
            file: vault_dir.join("jobs").join(format!("{id}.json")),
        });
        handle.persist(&body);
        lock(&self.live).insert(id, handle.clone());
        Ok(handle)
    }

    /// A job of a vault, by id.
    pub fn get(&self, vault_dir: &Path, id: &str) -> Option<Value> {
        if !id.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            return None;
        }
        if let Some(h) = lock(&self.live).get(&id.to_ascii_lowercase()) {
            let v = h.get();
            // Only the vault that ran it answers for it.
            if v["id"]
                .as_str()
                .is_some_and(|_| vault_dir.join("jobs").join(format!("{id}.json")).exists())
            {
                return Some(v);
            }
            return None;
        }
        let mut v: Value = serde_json::from_slice(
            &std::fs::read(vault_dir.join("jobs").join(format!("{id}.json"))).ok()?,
        )
        .ok()?;
        if v["status"] == json!("InProgress") {
            v["status"] = json!("Failed");
            v["error"] = json!({"code": "JobInterrupted", "message": "The server stopped while the job ran; nothing it wrote is visible. Run it again."});
        }
        Some(v)
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
