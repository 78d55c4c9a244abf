//! What a backup vault keeps besides its ARM resource.
//!
//! Records (in the store, through kagi-vault's `Platform` service documents and activity log,
//! keyed by the vault's lower-case id; SQLite by default — docs/FORMATS.md, "Service
//! documents"):
//!
//! - document `state` ([`STATE`], name empty): [`VaultState`] as JSON — the platform key
//!   sealed under the root key, the "protection was attempted" flag of BK-2, the key version in
//!   use, the protected items;
//! - the activity log: one JSON entry per row, numbered in commit order;
//! - documents `job` ([`JOB`], name: the job id): every job's last state (X-2, `jobs`);
//! - document `agent-registry` ([`AGENT_REGISTRY`], name empty): vault-credential hashes and
//!   registered machines (`agents`).
//!
//! Each write is one store transaction, durable before it returns. They go with the vault when
//! it is deleted and follow it when it moves, in the store transaction that deletes or moves
//! its resource.
//!
//! Blobs stay in the vault's folder `<data>/backup/{subscription}/{resource group}/{vault}/`
//! (lower-case), as object-store prefixes: `items/{item}/`, one backup repository per
//! protected item (docs/BACKUP_FORMAT.md), and `agents/machines/{machine}/`, the objects of
//! backup agents. A resource move renames the folder to the vault's new place (`moves`); the
//! platform key stays bound to the id the vault was created with (`pmkBinding`).
//!
//! An earlier kagi kept the records as files in the folder (`state.json`, `activity.jsonl`,
//! `jobs/{id}.json`, `agents/registry.json`): [`import_legacy`] moves them into the store once,
//! before the service serves anything, and renames each file `*.imported`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use kagi_core::KvError;
use kagi_host::ServiceHost;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Document kind of a vault's [`VaultState`] (name empty).
pub const STATE: &str = "state";
/// Document kind of a job (name: the job id).
pub const JOB: &str = "job";
/// Document kind of a vault's agent registry (name empty).
pub const AGENT_REGISTRY: &str = "agent-registry";
/// Document kind: the key version in use ([`KeyVersionInUse`]).
pub const KEY_VERSION: &str = "key-version";

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
    /// The versioned key id in use when the key was last set. Jobs keep the version they
    /// resolve in the [`KEY_VERSION`] document; this is its fallback for older vaults.
    pub current_kid: Option<String>,
    /// When `current_kid` was resolved (Unix seconds).
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

/// A failure of the object store (`kagi server --blobs`): logged, answered as an internal error.
pub(crate) fn blob(e: kagi_blobs::BlobError) -> KvError {
    io("object storage", e)
}

/// The label under which a vault's platform key is sealed.
pub(crate) fn pmk_label(vault_id: &str) -> String {
    format!("backup-pmk/{}", vault_id.to_ascii_lowercase())
}

/// Seals again, under the services' own seal purpose, every vault's platform key that an
/// earlier kagi sealed under the token-signing one: once, before the service serves anything
/// (a key left as it was still opens; failures are logged and tried again at the next start).
pub(crate) async fn reseal_platform_keys(p: &dyn ServiceHost) {
    for body in p.resources_of_type(crate::VAULT_TYPE) {
        let id = body["id"].as_str().unwrap_or_default();
        if let Err(e) = reseal_platform_key(p, id).await {
            tracing::error!(vault = %id, error = %e.message, "platform key not sealed anew");
        }
    }
}

async fn reseal_platform_key(p: &dyn ServiceHost, id: &str) -> Result<(), KvError> {
    let Some(mut state) = VaultState::load(p, id).await? else {
        return Ok(());
    };
    let sealed =
        kagi_core::b64::decode(&state.pmk_sealed).ok_or_else(|| io("pmk", "not base64"))?;
    let binding = state.pmk_binding.clone().unwrap_or_else(|| id.to_string());
    if let Some(resealed) = p.open_secret(&pmk_label(&binding), &sealed)?.resealed {
        state.pmk_sealed = kagi_core::b64::encode(&resealed);
        state.save(p, id).await?;
        tracing::info!(vault = %id, "platform key sealed under the service-key purpose");
    }
    Ok(())
}

/// The folder of a vault's blobs.
pub fn vault_dir(data: &Path, sub: &str, rg: &str, name: &str) -> PathBuf {
    data.join("backup")
        .join(sub.to_ascii_lowercase())
        .join(rg.to_ascii_lowercase())
        .join(name.to_ascii_lowercase())
}

/// Writes `bytes` to `path` atomically and durably (move journals).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), KvError> {
    kagi_fs::write_atomically(path, bytes, 0o600).map_err(|e| io("write file", e))
}

impl VaultState {
    /// Loads the state of the vault `vault_id` (`None` when it has none).
    pub async fn load(p: &dyn ServiceHost, vault_id: &str) -> Result<Option<Self>, KvError> {
        p.document(vault_id, STATE, "")
            .await?
            .map(|v| serde_json::from_value(v).map_err(|e| io("parse state", e)))
            .transpose()
    }

    /// Stores the state of the vault `vault_id` (durable when this returns).
    pub async fn save(&self, p: &dyn ServiceHost, vault_id: &str) -> Result<(), KvError> {
        let v = serde_json::to_value(self).map_err(|e| io("state json", e))?;
        p.put_document(vault_id, STATE, "", &v).await
    }
}

/// The key version a vault with a versionless key URI uses, and when it was resolved: its own
/// document (kind [`KEY_VERSION`]), because jobs update it while other requests change the
/// vault's state, and a job resolving the version must not write back a stale copy of that
/// state (a job may resolve it while the caller holds the vault's lock, or not).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KeyVersionInUse {
    /// The versioned key id.
    pub kid: Option<String>,
    /// When it was resolved (Unix seconds).
    pub resolved_at: i64,
}

impl KeyVersionInUse {
    /// The vault's key version (older vaults kept it in their state).
    pub async fn load(
        p: &dyn ServiceHost,
        vault_id: &str,
        state: &VaultState,
    ) -> Result<Self, KvError> {
        match p.document(vault_id, KEY_VERSION, "").await? {
            Some(v) => serde_json::from_value(v).map_err(|e| io("parse key version", e)),
            None => Ok(Self {
                kid: state.current_kid.clone(),
                resolved_at: state.resolved_at,
            }),
        }
    }

    /// Stores it (durable when this returns).
    pub async fn save(&self, p: &dyn ServiceHost, vault_id: &str) -> Result<(), KvError> {
        let v = serde_json::to_value(self).map_err(|e| io("key version json", e))?;
        p.put_document(vault_id, KEY_VERSION, "", &v).await
    }
}

/// Appends one entry to a vault's activity log (durable when this returns).
pub async fn log_activity(
    p: &dyn ServiceHost,
    vault_id: &str,
    entry: &Value,
) -> Result<(), KvError> {
    p.append_activity(vault_id, entry).await
}

/// The activity log of a vault, oldest first.
pub async fn read_activity(p: &dyn ServiceHost, vault_id: &str) -> Result<Vec<Value>, KvError> {
    p.activity(vault_id).await
}

/// The names of the sub-folders of `d` (none when it cannot be read).
pub(crate) fn subdirs(d: &Path) -> Vec<String> {
    std::fs::read_dir(d)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter(|e| e.path().is_dir())
                .map(|e| e.file_name().to_string_lossy().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// Unix seconds of an RFC 3339 UTC time as kagi writes them (`2026-11-24T09:00:00Z`, or with
/// fractional seconds); `None` for anything else.
fn unix_of_rfc3339(t: &str) -> Option<i64> {
    let b = t.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || !t.ends_with('Z') {
        return None;
    }
    let num = |r: std::ops::Range<usize>| t.get(r)?.parse::<i64>().ok();
    let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hh, mm, ss) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return None;
    }
    // Days from the civil date (proleptic Gregorian), H. Hinnant's algorithm.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + hh * 3600 + mm * 60 + ss)
}

/// Sets an imported file aside as `{name}.imported`.
fn set_aside(file: &Path) {
    let mut to = file.as_os_str().to_os_string();
    to.push(".imported");
    if let Err(e) = std::fs::rename(file, &to) {
        // Importing it again at the next start changes nothing; only the rename is retried.
        tracing::error!(error = %e, file = %file.display(), "imported file not set aside");
    }
}

fn read_json(file: &Path) -> Option<Value> {
    let bytes = match std::fs::read(file) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::error!(error = %e, file = %file.display(), "legacy file unreadable; left in place");
            return None;
        }
    };
    match serde_json::from_slice(&bytes) {
        Ok(v) => Some(v),
        Err(e) => {
            tracing::error!(error = %e, file = %file.display(), "legacy file unparsable; left in place");
            None
        }
    }
}

/// Imports the records an earlier kagi kept as files under `<data>/backup/**` into the store
/// (one transaction per vault), then renames each imported file `*.imported`. Only folders of
/// vaults that exist are imported (others belong to nothing and are left alone); a file that
/// cannot be read or parsed is left in place and logged. Documents already in the store win
/// over the files, so a crash between the import and the renames only repeats a no-op.
/// Returns the number of vaults imported.
pub(crate) async fn import_legacy(p: &dyn ServiceHost, data: &Path) -> Result<usize, KvError> {
    let root = data.join("backup");
    let mut imported = 0;
    for sub in subdirs(&root) {
        for rg in subdirs(&root.join(&sub)) {
            for name in subdirs(&root.join(&sub).join(&rg)) {
                let dir = root.join(&sub).join(&rg).join(&name);
                let id = format!(
                    "/subscriptions/{sub}/resourceGroups/{rg}/providers/{}/{name}",
                    crate::VAULT_TYPE
                );
                if import_vault(p, &id, &dir).await? {
                    imported += 1;
                }
            }
        }
    }
    if imported > 0 {
        tracing::info!(
            vaults = imported,
            "backup vault records imported into the store"
        );
    }
    Ok(imported)
}

async fn import_vault(p: &dyn ServiceHost, id: &str, dir: &Path) -> Result<bool, KvError> {
    let mut documents = Vec::new();
    let mut done = Vec::new();
    for (file, kind) in [
        (dir.join("state.json"), STATE),
        (dir.join("agents").join("registry.json"), AGENT_REGISTRY),
    ] {
        if let Some(v) = read_json(&file) {
            documents.push((kind.to_string(), String::new(), v));
            done.push(file);
        }
    }
    if let Ok(rd) = std::fs::read_dir(dir.join("jobs")) {
        for e in rd.filter_map(Result::ok) {
            let file_name = e.file_name().to_string_lossy().to_string();
            let Some(job) = file_name.strip_suffix(".json") else {
                continue;
            };
            if let Some(v) = read_json(&e.path()) {
                documents.push((JOB.to_string(), job.to_ascii_lowercase(), v));
                done.push(e.path());
            }
        }
    }
    let log = dir.join("activity.jsonl");
    let mut activity = Vec::new();
    match std::fs::read_to_string(&log) {
        Ok(text) => {
            // As the file was read: lines that do not parse (a torn last line) are skipped.
            activity = text
                .lines()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .map(|v| {
                    let at = v["eventTimestamp"]
                        .as_str()
                        .and_then(unix_of_rfc3339)
                        .unwrap_or(0);
                    (at, v)
                })
                .collect();
            done.push(log);
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::error!(error = %e, file = %log.display(), "legacy file unreadable; left in place")
        }
    }
    if done.is_empty() {
        return Ok(false);
    }
    if p.resource(id).is_none() {
        tracing::warn!(folder = %dir.display(), "legacy backup vault files of no existing vault left in place");
        return Ok(false);
    }
    p.import_records(id, &documents, &activity).await?;
    for f in &done {
        set_aside(f);
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Arc;

    use kagi_core::time::SystemClock;
    use kagi_vault::{Platform, PlatformConfig, Principal, ResourceGroupInput};
    use serde_json::{Value, json};

    use super::*;

    #[test]
    fn rfc3339_times_read_back() {
        for t in [0, 1, 951_782_400, 1_893_456_000, 1_767_225_600 + 86_399] {
            assert_eq!(
                unix_of_rfc3339(&kagi_core::time::rfc3339(t)),
                Some(t),
                "{t}"
            );
        }
        assert_eq!(
            unix_of_rfc3339("2026-01-31T09:00:00.123Z"),
            Some(1_769_850_000)
        );
        assert_eq!(unix_of_rfc3339("yesterday"), None);
        assert_eq!(unix_of_rfc3339("2026-13-01T00:00:00Z"), None);
    }

    struct Env {
        dir: tempfile::TempDir,
        platform: Arc<Platform>,
        p: Arc<dyn ServiceHost>,
        svc: std::sync::Mutex<Arc<crate::BackupService>>,
        admin: Principal,
        sub: String,
    }

    async fn env() -> Env {
        let dir = tempfile::tempdir().unwrap();
        let config = PlatformConfig {
            data_dir: dir.path().to_path_buf(),
            dns_suffix: "localhost".into(),
            port: 8443,
        };
        let (p, creds) = Platform::open(config, Arc::new(SystemClock)).await.unwrap();
        let creds = creds.unwrap();
        let form: HashMap<String, String> = [
            ("grant_type", "client_credentials".to_string()),
            ("client_id", creds.client_id.clone()),
            ("client_secret", creds.client_secret.clone()),
            ("scope", format!("{}/.default", p.config().authority())),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let grant = p.client_credentials(&creds.tenant_id, &form).await.unwrap();
        let admin = p.authenticate(&grant.access_token).unwrap();
        let sub = creds.subscription_id.clone();
        p.put_resource_group(
            &admin,
            &sub,
            "rg1",
            ResourceGroupInput {
                location: "westeurope".into(),
                tags: None,
            },
        )
        .await
        .unwrap();
        let platform = Arc::new(p);
        let p: Arc<dyn ServiceHost> = platform.clone();
        let svc = crate::BackupService::new(p.clone(), crate::ServiceConfig::default());
        Env {
            dir,
            platform,
            p,
            svc: std::sync::Mutex::new(svc),
            admin,
            sub,
        }
    }

    impl Env {
        fn vault_id(&self, name: &str) -> String {
            format!(
                "/subscriptions/{}/resourceGroups/rg1/providers/{}/{name}",
                self.sub,
                crate::VAULT_TYPE
            )
        }

        /// A new start: a fresh service over the same platform.
        fn restart(&self) {
            let svc = crate::BackupService::new(self.p.clone(), crate::ServiceConfig::default());
            *self.svc.lock().unwrap() = svc;
        }

        async fn call(&self, method: &str, path: &str, body: Value) -> (u16, Value) {
            let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
            let lower: Vec<String> = segs.iter().map(|s| s.to_ascii_lowercase()).collect();
            let l: Vec<&str> = lower.iter().map(String::as_str).collect();
            let body = if body.is_null() {
                Vec::new()
            } else {
                body.to_string().into_bytes()
            };
            let svc = self.svc.lock().unwrap().clone();
            match svc
                .handle(
                    &self.admin,
                    crate::ArmRequest {
                        method,
                        segs: &segs,
                        l: &l,
                        body: &body,
                        wait: None,
                    },
                )
                .await
            {
                Ok(r) => r,
                Err(e) => (
                    e.code.status(),
                    json!({"code": e.inner, "message": e.message}),
                ),
            }
        }
    }

    /// A data directory of an earlier kagi: its records are imported once, at the first
    /// request, the files set aside as `*.imported`; a second start changes nothing; deleting
    /// the vault deletes its records.
    #[tokio::test]
    async fn legacy_files_are_imported_once_and_go_with_the_vault() {
        let e = env().await;
        let id = e.vault_id("bv1");
        let (st, v) = e.call("PUT", &id, json!({"location": "westeurope"})).await;
        assert_eq!(st, 201, "{v}");
        let pmk = VaultState::load(e.p.as_ref(), &id)
            .await
            .unwrap()
            .unwrap()
            .pmk_sealed;
        // As an earlier kagi left it: nothing in the store, everything in files.
        e.p.clear_records(&id).await.unwrap();
        let dir = vault_dir(e.dir.path(), &e.sub, "rg1", "bv1");
        let src = e.dir.path().join("src");
        std::fs::create_dir_all(&src).unwrap();
        let state = json!({"pmkSealed": pmk, "protectionAttempted": true, "currentKid": null,
            "resolvedAt": 0, "items": {"docs": {"sourcePath": src, "created": 5}}});
        std::fs::create_dir_all(dir.join("jobs")).unwrap();
        std::fs::create_dir_all(dir.join("agents")).unwrap();
        std::fs::write(dir.join("state.json"), state.to_string()).unwrap();
        let first = json!({"eventTimestamp": "2026-01-31T09:00:00Z", "message": "one"});
        let second = json!({"eventTimestamp": "2026-01-31T09:00:01Z", "message": "two"});
        std::fs::write(
            dir.join("activity.jsonl"),
            format!("{first}\n{second}\n{{\"torn"),
        )
        .unwrap();
        let job_id = "0b8c1f9e-6a58-4c3e-9d6f-2f1e3b7a5c4d";
        let job = json!({"id": format!("{id}/backupJobs/{job_id}"), "name": job_id,
            "operation": "Backup", "status": "Completed", "startTime": "2026-01-31T09:00:00Z"});
        std::fs::write(
            dir.join("jobs").join(format!("{job_id}.json")),
            job.to_string(),
        )
        .unwrap();
        let registry = json!({"credentials": [], "machines": {"m1": {"name": "M1",
            "secretSha256": "00", "registered": 1}}});
        std::fs::write(dir.join("agents/registry.json"), registry.to_string()).unwrap();
        // A folder of no vault: left alone.
        let orphan = vault_dir(e.dir.path(), &e.sub, "rg1", "gone");
        std::fs::create_dir_all(&orphan).unwrap();
        std::fs::write(orphan.join("state.json"), "{}").unwrap();

        for round in 0..2 {
            e.restart();
            let (st, items) = e
                .call("GET", &format!("{id}/backupProtectedItems"), Value::Null)
                .await;
            assert_eq!(st, 200, "{items}");
            assert_eq!(items["value"][0]["name"], "docs", "round {round}: {items}");
            let (_, log) = e
                .call("GET", &format!("{id}/activityLog"), Value::Null)
                .await;
            assert_eq!(log["value"], json!([first, second]), "round {round}");
            let (_, jobs) = e
                .call("GET", &format!("{id}/backupJobs"), Value::Null)
                .await;
            assert_eq!(jobs["value"], json!([job]), "round {round}");
            let reg = e.p.document(&id, AGENT_REGISTRY, "").await.unwrap();
            assert_eq!(reg, Some(registry.clone()));
        }
        for f in ["state.json", "activity.jsonl", "agents/registry.json"] {
            assert!(!dir.join(f).exists(), "{f}");
            assert!(dir.join(format!("{f}.imported")).exists(), "{f}");
        }
        assert!(dir.join(format!("jobs/{job_id}.json.imported")).exists());
        assert!(orphan.join("state.json").exists());

        // Deleting the vault deletes its records with its resource (after its agents and
        // items are gone, which the service requires).
        e.p.put_document(
            &id,
            AGENT_REGISTRY,
            "",
            &json!({"credentials": [], "machines": {}}),
        )
        .await
        .unwrap();
        let mut s = VaultState::load(e.p.as_ref(), &id).await.unwrap().unwrap();
        s.items.clear();
        s.save(e.p.as_ref(), &id).await.unwrap();
        let (st, v) = e.call("DELETE", &id, Value::Null).await;
        assert_eq!(st, 200, "{v}");
        assert!(VaultState::load(e.p.as_ref(), &id).await.unwrap().is_none());
        assert!(read_activity(e.p.as_ref(), &id).await.unwrap().is_empty());
        assert!(e.p.documents(&id, JOB).await.unwrap().is_empty());
        assert!(
            e.p.document(&id, AGENT_REGISTRY, "")
                .await
                .unwrap()
                .is_none()
        );
    }

    /// A platform key sealed by an earlier kagi (under the token-signing purpose) still
    /// opens, and is sealed under the services' own purpose before the first request is
    /// served; the vault's data stays readable.
    #[tokio::test]
    async fn platform_keys_sealed_by_an_earlier_kagi_are_sealed_anew() {
        let e = env().await;
        let src = e.dir.path().join("src");
        std::fs::create_dir_all(&src).unwrap();
        std::fs::write(src.join("a.txt"), "kept").unwrap();
        let id = e.vault_id("bv1");
        let (st, v) = e.call("PUT", &id, json!({"location": "westeurope"})).await;
        assert_eq!(st, 201, "{v}");
        let item = format!("{id}/backupProtectedItems/docs");
        let (st, v) = e
            .call("PUT", &item, json!({"properties": {"sourcePath": src}}))
            .await;
        assert_eq!(st, 201, "{v}");
        let label = pmk_label(&id);
        let mut state = VaultState::load(e.p.as_ref(), &id).await.unwrap().unwrap();
        let sealed = kagi_core::b64::decode(&state.pmk_sealed).unwrap();
        let pmk = e.p.open_secret(&label, &sealed).unwrap().secret;
        // As an earlier kagi sealed it.
        let old = e.platform.seal_platform_secret(&label, &pmk).unwrap();
        state.pmk_sealed = kagi_core::b64::encode(&old);
        state.save(e.p.as_ref(), &id).await.unwrap();
        e.restart();
        let (st, v) = e
            .call("GET", &format!("{item}/recoveryPoints"), Value::Null)
            .await;
        assert_eq!(st, 200, "{v}");
        let now = VaultState::load(e.p.as_ref(), &id).await.unwrap().unwrap();
        let sealed = kagi_core::b64::decode(&now.pmk_sealed).unwrap();
        assert_ne!(sealed, old);
        let opened = e.p.open_secret(&label, &sealed).unwrap();
        assert_eq!(opened.secret, pmk);
        assert!(opened.resealed.is_none());
        assert!(e.platform.open_platform_secret(&label, &sealed).is_err());
    }
}
