//! What a backup vault keeps besides its ARM resource, under
//! `<data>/backup/{subscription}/{resource group}/{vault}/` (lower-case):
//!
//! - `state.json` (0600, replaced atomically: write, fsync, rename, fsync the folder): the
//!   platform key sealed under the root key, the "protection was attempted" flag of BK-2, the
//!   key version in use, the protected items;
//! - `activity.jsonl`: the activity log, one JSON object a line, fsynced per entry;
//! - `jobs/{id}.json`: every job's last state;
//! - `items/{item}/`: one backup repository per protected item (docs/BACKUP_FORMAT.md).
//!
//! A resource move renames the folder to the vault's new place (`moves`); the platform key stays
//! bound to the id the vault was created with (`pmkBinding`).

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use kagi_core::KvError;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A protected folder.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Item {
    /// Absolute path of the folder on the kagi host.
    pub source_path: String,
    /// Created (Unix seconds).
    pub created: i64,
    /// Scheduled backups every this many hours (`None`: on demand only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule_hours: Option<u64>,
    /// Retention: keep the newest this many recovery points (`None`: all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_last: Option<u64>,
    /// When the last scheduled backup started (Unix seconds; 0: never).
    #[serde(default)]
    pub last_scheduled: i64,
}

impl Item {
    /// When the next scheduled backup is due (Unix seconds), if scheduled.
    pub fn next_scheduled(&self) -> Option<i64> {
        let h = self.schedule_hours?;
        Some(self.created.max(self.last_scheduled) + (h as i64) * 3600)
    }
}

/// The persistent state of one backup vault.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VaultState {
    /// The platform key (PMK), sealed under the root key, base64url.
    pub pmk_sealed: String,
    /// Set (and persisted) before the first protection attempt, successful or not (BK-2).
    pub protection_attempted: bool,
    /// The versioned key id in use (CMK), and when it was last resolved.
    pub current_kid: Option<String>,
    /// When `current_kid` was last resolved from a versionless URI (Unix seconds).
    pub resolved_at: i64,
    /// Protected items by name.
    pub items: BTreeMap<String, Item>,
    /// The vault id (lower-case) the platform key and its key entries are bound to: the id
    /// the vault had when it was created, recorded by its first move (`None`: its current id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pmk_binding: Option<String>,
    /// The tenant the customer-managed key and its identity were configured in (BK-9): when
    /// the vault's subscription is moved to another tenant, jobs fail until both are
    /// configured again there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmk_tenant_id: Option<String>,
}

pub(crate) fn io(context: &str, e: impl std::fmt::Display) -> KvError {
    tracing::error!(context, error = %e, "backup service storage failure");
    KvError::internal()
}

/// The folder of a vault.
pub fn vault_dir(data: &Path, sub: &str, rg: &str, name: &str) -> PathBuf {
    data.join("backup")
        .join(sub.to_ascii_lowercase())
        .join(rg.to_ascii_lowercase())
        .join(name.to_ascii_lowercase())
}

/// Writes `bytes` to `path` atomically and durably.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), KvError> {
    kagi_store::file::write_atomically(path, bytes, 0o600).map_err(|e| io("write state", e))
}

impl VaultState {
    /// Loads the state of a vault (`None` when it has none).
    pub fn load(dir: &Path) -> Result<Option<Self>, KvError> {
        match fs::read(dir.join("state.json")) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| io("parse state", e)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io("read state", e)),
        }
    }

    /// Stores the state durably.
    pub fn save(&self, dir: &Path) -> Result<(), KvError> {
        let bytes = serde_json::to_vec_pretty(self).map_err(|e| io("state json", e))?;
        write_atomic(&dir.join("state.json"), &bytes)
    }
}

/// Appends one entry to a vault's activity log (fsynced).
pub fn log_activity(dir: &Path, entry: &Value) -> Result<(), KvError> {
    fs::create_dir_all(dir).map_err(|e| io("mkdir", e))?;
    let mut f = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(dir.join("activity.jsonl"))
        .map_err(|e| io("activity log", e))?;
    let mut line = entry.to_string();
    line.push('\n');
    f.write_all(line.as_bytes())
        .map_err(|e| io("activity log", e))?;
    f.sync_data().map_err(|e| io("activity log", e))
}

/// The activity log of a vault, oldest first.
pub fn read_activity(dir: &Path) -> Result<Vec<Value>, KvError> {
    match fs::read_to_string(dir.join("activity.jsonl")) {
        Ok(s) => Ok(s
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(io("read activity", e)),
    }
}
