//! Whole-vault backup and restore (the Managed HSM full backup of KV-6).
//!
//! A backup is one file (`kagi_crypto::vault_backup`): a header saying how the file key is
//! protected (Argon2id over an operator passphrase, or RSA-OAEP-256 by a vault key), then the
//! payload encrypted in authenticated chunks. The payload is JSON lines: a manifest (the
//! vault's settings and counts), one line per key (every version with its PKCS#8 private key,
//! attributes, tags, key_ops, kty), one per secret (every version with its value, content type,
//! attributes, tags), soft-deleted objects with their deletion times, the role assignments at
//! the vault's scope or below, the keys' rotation policies, and an end line with the count.
//!
//! Restore goes into an empty vault (or one it creates from the backup's settings), on this or
//! another kagi: every key version and secret value is sealed again under this platform's root
//! key and the target vault's AAD, with its version, attributes and times unchanged, so data
//! wrapped before the backup unwraps after it under the same versioned key id (modulo host).
//! The whole file is decrypted and checked before anything is written; a failure while
//! writing removes what was written. A journal naming everything the restore is about to
//! write is made durable before its first write and removed after its last, so a restore cut
//! short by a crash is rolled back at the next start: a restore is all or nothing.
//!
//! Both run as jobs (`crate::jobs`); only the bootstrap administrator may start them.

use std::collections::HashSet;
use std::io::{BufReader, BufWriter, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kagi_core::ids::uuid_v4;
use kagi_core::jobs::JobKind;
use kagi_core::key::{KeyOperationParameters, KeyVersionInfo, PublicJwk, Tags};
use kagi_core::secret::{SecretValue, SecretVersionInfo};
use kagi_core::vault::{AccessPolicyEntry, VaultInput, VaultProperties, VaultPropertiesInput};
use kagi_core::{ErrorCode, KeyVersion, KvError, ObjectName, SubscriptionId, VaultName};
use kagi_crypto::vault_backup::{
    Argon2Params, BackupFileError, BackupReader, BackupWriter, FileKey, Header, Protection,
    read_header,
};
use kagi_crypto::{PrivateKeyOps, PublicKey, SealPurpose, StoredPrivateKey};
use kagi_identity::Principal;
use kagi_store::{
    KeyRecord, KeyVersionRecord, RoleAssignmentRecord, SecretRecord, SecretVersionRecord,
    StoreError, VaultRecord,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use zeroize::Zeroizing;

use crate::arm::VaultWriter;
use crate::jobs::JobHandle;
use crate::secrets::value_aad;
use crate::state::{KeyEntry, SecretEntry, VaultState, VersionEntry, private_key_aad};
use crate::{Platform, internal};

/// Version of the payload (the JSON lines inside the encryption).
const PAYLOAD_FORMAT: u32 = 1;
/// Largest restore upload accepted (1 GiB).
pub const MAX_RESTORE_FILE: u64 = 1024 * 1024 * 1024;
/// Largest decrypted payload kept in memory while restoring.
const MAX_PAYLOAD: usize = 1024 * 1024 * 1024;
/// Shortest passphrase accepted.
const MIN_PASSPHRASE: usize = 8;
/// Longest passphrase accepted (bytes).
const MAX_PASSPHRASE: usize = 1024;

// ----- requests -----

/// Argon2id costs a backup request may choose (defaults: 64 MiB, 3 passes, 1 lane).
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KdfRequest {
    /// Memory in KiB.
    #[serde(rename = "memoryKiB")]
    pub memory_kib: Option<u32>,
    /// Passes.
    pub iterations: Option<u32>,
    /// Lanes.
    pub parallelism: Option<u32>,
}

/// Body of `POST {vault id}/backup`: exactly one of `passphrase` and `keyId`.
#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BackupRequest {
    /// The operator passphrase the file key is derived from.
    pub passphrase: Option<String>,
    /// A versioned key id (`https://{vault}.{host}/keys/{name}/{version}`) whose RSA key wraps
    /// a random file key with RSA-OAEP-256.
    pub key_id: Option<String>,
    /// Argon2id costs (passphrase only).
    pub kdf: Option<KdfRequest>,
}

impl std::fmt::Debug for BackupRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackupRequest")
            .field(
                "passphrase",
                &self.passphrase.as_ref().map(|_| "<redacted>"),
            )
            .field("key_id", &self.key_id)
            .field("kdf", &self.kdf)
            .finish()
    }
}

impl Drop for BackupRequest {
    fn drop(&mut self) {
        if let Some(p) = &mut self.passphrase {
            zeroize::Zeroize::zeroize(p);
        }
    }
}

/// What a restore is given besides the file.
#[derive(Default)]
pub struct RestoreRequest {
    /// The passphrase, for a passphrase-protected file.
    pub passphrase: Option<Zeroizing<String>>,
    /// When given, must equal the key id in the file's header (a check, not a choice).
    pub key_id: Option<String>,
    /// Create the vault in this region from the backup's settings (it must not exist);
    /// without it the vault must exist and be empty.
    pub location: Option<String>,
}

impl std::fmt::Debug for RestoreRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RestoreRequest")
            .field(
                "passphrase",
                &self.passphrase.as_ref().map(|_| "<redacted>"),
            )
            .field("key_id", &self.key_id)
            .field("location", &self.location)
            .finish()
    }
}

// ----- payload records -----

#[derive(Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
enum Record {
    Manifest(Box<Manifest>),
    Key(KeyItem),
    Secret(SecretItem),
    RoleAssignment(AssignmentItem),
    RotationPolicy(RotationItem),
    End(EndItem),
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Manifest {
    format: u32,
    kagi_version: String,
    created: i64,
    source: SourceVault,
    counts: Counts,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SourceVault {
    name: String,
    id: String,
    vault_uri: String,
    location: String,
    #[serde(default)]
    tags: Tags,
    properties: VaultProperties,
    created: i64,
    updated: i64,
}

#[derive(Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Counts {
    keys: u64,
    key_versions: u64,
    secrets: u64,
    secret_versions: u64,
    role_assignments: u64,
    rotation_policies: u64,
}

impl Counts {
    fn objects(&self) -> u64 {
        self.key_versions + self.secret_versions + self.role_assignments + self.rotation_policies
    }
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct KeyItem {
    name: String,
    deleted_at: Option<i64>,
    purge_at: Option<i64>,
    versions: Vec<KeyVersionItem>,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct KeyVersionItem {
    version: String,
    seq: i64,
    info: KeyVersionInfo,
    #[serde(with = "kagi_core::b64::bytes")]
    pkcs8: Vec<u8>,
}

impl Drop for KeyVersionItem {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.pkcs8);
    }
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SecretItem {
    name: String,
    deleted_at: Option<i64>,
    purge_at: Option<i64>,
    versions: Vec<SecretVersionItem>,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SecretVersionItem {
    version: String,
    seq: i64,
    info: SecretVersionInfo,
    value: SecretValue,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct AssignmentItem {
    /// The scope below the vault: `""` (the vault), `/keys/{name}` or `/secrets/{name}`.
    scope: String,
    principal_id: String,
    role_definition_id: String,
    id: String,
    created: i64,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RotationItem {
    /// The key's name, lower-case.
    key: String,
    policy: Value,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct EndItem {
    records: u64,
}

// ----- helpers -----

fn bad(message: impl Into<String>) -> KvError {
    KvError::bad_parameter(message)
}

fn file_error(e: BackupFileError) -> KvError {
    match e {
        BackupFileError::WrongKey => {
            bad("The passphrase (or the key) does not open this backup file; nothing was restored.")
                .with_inner("BackupPassphraseMismatch")
        }
        BackupFileError::NotABackup => {
            bad("The request body is not a kagi vault backup file.").with_inner("InvalidBackupFile")
        }
        BackupFileError::Unsupported(m) => {
            bad(format!("The backup file is not supported: {m}.")).with_inner("InvalidBackupFile")
        }
        BackupFileError::Corrupt(m) => bad(format!(
            "The backup file is damaged or was altered ({m}); nothing was restored."
        ))
        .with_inner("InvalidBackupFile"),
        BackupFileError::InvalidParameter(m) => bad(m),
        e @ (BackupFileError::Io(_) | BackupFileError::Internal) => internal("backup file", e),
    }
}

fn invalid_payload(what: impl std::fmt::Display) -> KvError {
    bad(format!(
        "The backup file decrypted but its content is not valid: {what}; nothing was restored."
    ))
    .with_inner("InvalidBackupFile")
}

fn vault_arm_id(r: &VaultRecord) -> String {
    format!(
        "/subscriptions/{}/resourceGroups/{}/providers/Microsoft.KeyVault/vaults/{}",
        r.subscription_id, r.resource_group, r.name
    )
}

fn argon2_params(k: Option<&KdfRequest>) -> Result<Argon2Params, KvError> {
    let d = Argon2Params::default();
    let p = match k {
        None => d,
        Some(k) => Argon2Params {
            memory_kib: k.memory_kib.unwrap_or(d.memory_kib),
            iterations: k.iterations.unwrap_or(d.iterations),
            parallelism: k.parallelism.unwrap_or(d.parallelism),
        },
    };
    p.validate().map_err(|e| bad(format!("kdf: {e}.")))?;
    Ok(p)
}

fn check_passphrase(p: &str) -> Result<(), KvError> {
    if p.chars().count() < MIN_PASSPHRASE || p.len() > MAX_PASSPHRASE {
        return Err(bad(format!(
            "The passphrase must be at least {MIN_PASSPHRASE} characters and at most \
             {MAX_PASSPHRASE} bytes."
        )));
    }
    Ok(())
}

/// Splits `https://{vault}.{host}[:port]/keys/{name}/{version}` into its parts.
fn parse_key_id(kid: &str) -> Result<(String, String, String), KvError> {
    let invalid = || {
        bad(format!(
            "keyId must be a versioned key id such as https://{{vault}}.localhost:8443/keys/{{name}}/{{version}} (got '{}').",
            kagi_core::ids::printable(kid)
        ))
    };
    let rest = kid.strip_prefix("https://").ok_or_else(invalid)?;
    let (host, path) = rest.split_once('/').ok_or_else(invalid)?;
    let vault = host.split(['.', ':']).next().unwrap_or("");
    let segs: Vec<&str> = path.trim_end_matches('/').split('/').collect();
    match segs.as_slice() {
        ["keys", name, version] if !vault.is_empty() && !name.is_empty() => {
            VaultName::parse(vault).map_err(|_| invalid())?;
            ObjectName::parse(name).map_err(|_| invalid())?;
            KeyVersion::parse(version).map_err(|_| invalid())?;
            Ok((vault.to_string(), name.to_string(), version.to_string()))
        }
        _ => Err(invalid()),
    }
}

fn same_public(public: &PublicKey, jwk: &PublicJwk) -> bool {
    match (public, jwk) {
        (PublicKey::Rsa { n, e }, PublicJwk::Rsa { n: jn, e: je }) => n == jn && e == je,
        (PublicKey::Ec { curve, x, y }, PublicJwk::Ec { crv, x: jx, y: jy }) => {
            curve.jwk_name() == crv && x == jx && y == jy
        }
        _ => false,
    }
}

/// A consistent copy of a vault taken under its write lock.
struct Snapshot {
    record: VaultRecord,
    keys: Vec<KeyEntry>,
    secrets: Vec<SecretEntry>,
    assignments: Vec<RoleAssignmentRecord>,
    rotation: Vec<(String, Value)>,
}

impl Snapshot {
    fn counts(&self) -> Counts {
        Counts {
            keys: self.keys.len() as u64,
            key_versions: self.keys.iter().map(|k| k.versions.len() as u64).sum(),
            secrets: self.secrets.len() as u64,
            secret_versions: self.secrets.iter().map(|s| s.versions.len() as u64).sum(),
            role_assignments: self.assignments.len() as u64,
            rotation_policies: self.rotation.len() as u64,
        }
    }
}

/// How the file key of a backup being written is protected.
enum WriteProtection {
    Passphrase(Zeroizing<String>, Argon2Params),
    Wrapped {
        key: FileKey,
        key_id: String,
        wrapped: Vec<u8>,
    },
}

/// Everything checked and sealed for the target, ready to be written.
struct Prepared {
    manifest: Manifest,
    keys: Vec<(KeyRecord, Vec<Arc<dyn PrivateKeyOps>>)>,
    secrets: Vec<SecretRecord>,
    assignments: Vec<AssignmentItem>,
    rotation: Vec<(ObjectName, Value)>,
}

/// Where a restore goes.
struct Target {
    sub: SubscriptionId,
    resource_group: String,
    name: VaultName,
    location: Option<String>,
}

/// `<data>/restore-journal`: one file per restore in progress.
const JOURNAL_DIR: &str = "restore-journal";

/// Everything a restore is about to write, kept on disk while it writes (see the module
/// documentation). Roll-back removes what it names; what was never written is not there.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RestoreJournal {
    vault: String,
    /// The restore creates the vault: roll-back purges it whole.
    created_vault: bool,
    keys: Vec<String>,
    secrets: Vec<String>,
    /// The ids the restored role assignments get.
    assignment_ids: Vec<String>,
    /// An existing vault's settings before the restore changes them.
    previous: Option<PreviousVault>,
}

#[derive(Debug, Serialize, Deserialize)]
struct PreviousVault {
    properties: VaultProperties,
    tags: Tags,
}

impl RestoreJournal {
    fn plan(
        target: &Target,
        p: &Prepared,
        existing: Option<&VaultRecord>,
    ) -> Result<Self, KvError> {
        let assignment_ids = p
            .assignments
            .iter()
            .map(|_| {
                kagi_crypto::random_array()
                    .map(uuid_v4)
                    .map_err(|e| internal("rng", e))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            vault: target.name.to_string(),
            created_vault: target.location.is_some(),
            keys: p.keys.iter().map(|(k, _)| k.name.to_string()).collect(),
            secrets: p.secrets.iter().map(|s| s.name.to_string()).collect(),
            assignment_ids,
            previous: existing.map(|r| PreviousVault {
                properties: r.properties.clone(),
                tags: r.tags.clone(),
            }),
        })
    }

    /// Writes the journal durably (file and directory entry) before the restore's first write.
    fn write(&self, data_dir: &Path, job: &str) -> Result<PathBuf, KvError> {
        let dir = data_dir.join(JOURNAL_DIR);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .and_then(|()| kagi_fs::sync_dir(data_dir))
            .map_err(|e| internal("create restore journal directory", e))?;
        let path = dir.join(format!("{job}.json"));
        let bytes = serde_json::to_vec(self).map_err(|e| internal("restore journal", e))?;
        kagi_fs::write_atomically(&path, &bytes, 0o600)
            .map_err(|e| internal("write restore journal", e))?;
        Ok(path)
    }

    /// Removes every object the journal names from the store (the vault's memory is loaded
    /// afterwards, or updated by the caller). Removing what is not there is a no-op, so this
    /// may run again after a crash of its own.
    async fn roll_back(&self, store: &dyn kagi_store::Store) -> Result<(), String> {
        let vault = VaultName::parse(&self.vault).map_err(|e| e.message)?;
        for id in &self.assignment_ids {
            store
                .delete_role_assignment(id)
                .await
                .map_err(|e| format!("role assignment {id}: {e}"))?;
        }
        if self.created_vault {
            return store
                .purge_vault(&vault)
                .await
                .map_err(|e| format!("vault {vault}: {e}"));
        }
        for key in &self.keys {
            let name = ObjectName::parse(key).map_err(|e| e.message)?;
            store
                .purge_key(&vault, &name)
                .await
                .map_err(|e| format!("key {key}: {e}"))?;
        }
        for secret in &self.secrets {
            let name = ObjectName::parse(secret).map_err(|e| e.message)?;
            store
                .purge_secret(&vault, &name)
                .await
                .map_err(|e| format!("secret {secret}: {e}"))?;
        }
        if let Some(previous) = &self.previous {
            let current = store
                .list_vaults()
                .await
                .map_err(|e| format!("vaults: {e}"))?
                .into_iter()
                .find(|r| r.name == vault);
            if let Some(mut record) = current {
                record.properties = previous.properties.clone();
                record.tags = previous.tags.clone();
                store
                    .put_vault(&record)
                    .await
                    .map_err(|e| format!("vault {vault}: {e}"))?;
            }
        }
        Ok(())
    }
}

/// Removes a journal once its restore has ended, durably: a journal that came back after a
/// power loss would roll back a restore that succeeded.
fn remove_journal(path: &Path) -> std::io::Result<()> {
    std::fs::remove_file(path)?;
    kagi_fs::sync_parent(path)
}

/// Rolls back the restores that a crash interrupted (called at start, before the store is
/// loaded into memory). Returns how many there were.
pub(crate) async fn roll_back_interrupted_restores(
    data_dir: &Path,
    store: &dyn kagi_store::Store,
) -> Result<usize, crate::StartupError> {
    let dir = data_dir.join(JOURNAL_DIR);
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(source) => {
            return Err(crate::StartupError::Io {
                path: dir.display().to_string(),
                source,
            });
        }
    };
    let mut done = 0;
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "json") {
            // A temporary file of a journal never completed: its restore wrote nothing.
            let _ = std::fs::remove_file(&path);
            continue;
        }
        let journal: RestoreJournal = std::fs::read(&path)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
            .map_err(|e| {
                crate::StartupError::Corrupt(format!(
                    "restore journal {}: {e} (the restore it belongs to was interrupted;                      inspect the vault it names before removing the file)",
                    path.display()
                ))
            })?;
        journal.roll_back(store).await.map_err(|e| {
            crate::StartupError::Corrupt(format!(
                "rolling back the interrupted restore of vault {} failed: {e}",
                journal.vault
            ))
        })?;
        remove_journal(&path).map_err(|source| crate::StartupError::Io {
            path: path.display().to_string(),
            source,
        })?;
        tracing::warn!(vault = %journal.vault, "an interrupted vault restore was rolled back");
        done += 1;
    }
    Ok(done)
}

/// What a restore holds while it writes: the ids its journal gave the role assignments, and a
/// new vault's reserved name.
struct Claim<'a> {
    assignment_ids: &'a [String],
    reservation: Option<&'a crate::arm::VaultNameReservation<'a>>,
}

/// What a restore wrote, to be removed again if a later step fails.
#[derive(Default)]
struct Written {
    created_vault: bool,
    keys: Vec<ObjectName>,
    secrets: Vec<ObjectName>,
    assignments: Vec<String>,
}

fn create_private(path: &Path) -> Result<std::fs::File, KvError> {
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| internal("create backup file", e))
}

impl Platform {
    /// A fresh file in `<data>/jobs` (mode 0600) to receive a restore upload.
    pub fn create_restore_upload(&self) -> Result<(PathBuf, std::fs::File), KvError> {
        // Loading the job table first sweeps uploads left by a previous run, never this one.
        drop(self.job_table()?);
        let name = kagi_crypto::random_bytes(16)
            .map_err(|e| internal("rng", e))?
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>();
        let path = self.jobs_dir()?.join(format!("{name}.upload"));
        let file = create_private(&path)?;
        Ok((path, file))
    }

    /// `POST {vault id}/backup`: checks the request, wraps the file key when a key id is
    /// given (with the caller's authorization, so a refusal is answered now), and starts a
    /// job that writes the backup to `<data>/jobs/{id}.kvbak`. Answers the job.
    pub async fn start_vault_backup(
        self: &Arc<Self>,
        caller: &Principal,
        subscription: &str,
        resource_group: &str,
        name: &str,
        req: BackupRequest,
    ) -> Result<Value, KvError> {
        let sub = self.authorize_arm(caller, subscription).await?;
        let record = self.vault_in(&sub, resource_group, name)?;
        let protection = match (&req.passphrase, &req.key_id) {
            (Some(p), None) => {
                check_passphrase(p)?;
                WriteProtection::Passphrase(
                    Zeroizing::new(p.clone()),
                    argon2_params(req.kdf.as_ref())?,
                )
            }
            (None, Some(kid)) => {
                if req.kdf.is_some() {
                    return Err(bad("kdf applies only to passphrase-protected backups."));
                }
                let (vault, key, version) = parse_key_id(kid)?;
                let file_key = FileKey::random().map_err(|e| internal("file key", e))?;
                let wrapped = self.key_operation(
                    caller,
                    &vault,
                    &key,
                    Some(&version),
                    "wrapkey",
                    KeyOperationParameters {
                        alg: "RSA-OAEP-256".into(),
                        value: file_key.expose_for_wrapping().to_vec(),
                        iv: None,
                        aad: None,
                        tag: None,
                    },
                )?;
                let key_id = wrapped["kid"]
                    .as_str()
                    .ok_or_else(|| internal("wrap file key", "no kid"))?
                    .to_string();
                let wrapped = wrapped["value"]
                    .as_str()
                    .and_then(kagi_core::b64::decode)
                    .ok_or_else(|| internal("wrap file key", "no value"))?;
                WriteProtection::Wrapped {
                    key: file_key,
                    key_id,
                    wrapped,
                }
            }
            _ => {
                return Err(bad(
                    "Give exactly one of passphrase and keyId to protect the backup.",
                ));
            }
        };
        let job = self.new_job(JobKind::VaultBackup, &vault_arm_id(&record))?;
        self.announce_job(&job).await;
        let view = job.get().to_json(&self.job_url(&job.id()));
        let platform = self.clone();
        tokio::spawn(async move {
            let result = platform.run_backup(&job, &record.name, protection).await;
            // The result file reaches the bucket before the job is written as completed.
            let result = match result {
                Ok(r) => platform.share_result(&job.id()).await.map(|()| r),
                Err(e) => Err(e),
            };
            match result {
                Ok((bytes, summary)) => {
                    job.complete(platform.clock.now(), Some(summary), Some(bytes))
                }
                Err(e) => {
                    let _ = std::fs::remove_file(platform.backup_part_path(&job));
                    job.fail(platform.clock.now(), &e);
                }
            }
        });
        tracing::info!(vault = %name, "vault backup started");
        Ok(view)
    }

    fn backup_part_path(&self, job: &JobHandle) -> PathBuf {
        self.config
            .data_dir
            .join("jobs")
            .join(format!("{}.part", job.id()))
    }

    /// Takes a consistent copy of the vault (under its write lock, so no write is half in).
    async fn snapshot(&self, name: &VaultName) -> Result<Snapshot, KvError> {
        let state = self.usable_vault(name)?;
        let _w = state.write.lock().await;
        let record = state.record();
        let keys: Vec<KeyEntry> = state.keys().values().cloned().collect();
        let secrets: Vec<SecretEntry> = state
            .secrets
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        let scope = crate::directory::object_scope(&record, None);
        let assignments = self.role_assignments_within(&scope);
        let rotation = self
            .store
            .list_rotation_policies(&record.name)
            .await
            .map_err(|e| internal("list rotation policies", e))?
            .into_iter()
            .filter_map(|(k, p)| serde_json::to_value(p).ok().map(|v| (k, v)))
            .collect();
        Ok(Snapshot {
            record,
            keys,
            secrets,
            assignments,
            rotation,
        })
    }

    async fn run_backup(
        self: &Arc<Self>,
        job: &Arc<JobHandle>,
        name: &VaultName,
        protection: WriteProtection,
    ) -> Result<(u64, Value), KvError> {
        job.phase("snapshot", "objects", 0);
        let snap = self.snapshot(name).await?;
        let platform = self.clone();
        let job2 = job.clone();
        tokio::task::spawn_blocking(move || platform.write_backup(&job2, &snap, protection))
            .await
            .map_err(|e| internal("backup task", e))?
    }

    /// Writes the backup file (blocking: Argon2, unsealing and encryption).
    fn write_backup(
        &self,
        job: &JobHandle,
        snap: &Snapshot,
        protection: WriteProtection,
    ) -> Result<(u64, Value), KvError> {
        let counts = snap.counts();
        let part = self.backup_part_path(job);
        let file = create_private(&part)?;
        let out = BufWriter::with_capacity(256 * 1024, file);
        job.phase("encrypt", "objects", counts.objects());
        let mut w = match &protection {
            WriteProtection::Passphrase(p, params) => {
                BackupWriter::with_passphrase(out, p.as_bytes(), *params)
            }
            WriteProtection::Wrapped {
                key,
                key_id,
                wrapped,
            } => BackupWriter::new(
                out,
                &Protection::WrappedKey {
                    key_id: key_id.clone(),
                    wrapped: wrapped.clone(),
                },
                key,
                kagi_crypto::vault_backup::DEFAULT_CHUNK_SIZE,
            ),
        }
        .map_err(file_error)?;
        drop(protection);
        let r = &snap.record;
        let records = std::cell::Cell::new(0u64);
        let emit = |w: &mut BackupWriter<BufWriter<std::fs::File>>,
                    rec: &Record,
                    hint: usize|
         -> Result<(), KvError> {
            let mut line = Zeroizing::new(Vec::with_capacity(hint));
            serde_json::to_writer(&mut *line, rec).map_err(|e| internal("backup encode", e))?;
            line.push(b'\n');
            w.write_all(&line)
                .map_err(|e| internal("write backup file", e))?;
            records.set(records.get() + 1);
            Ok(())
        };
        let manifest = Manifest {
            format: PAYLOAD_FORMAT,
            kagi_version: env!("CARGO_PKG_VERSION").into(),
            created: self.clock.now(),
            source: SourceVault {
                name: r.name.to_string(),
                id: vault_arm_id(r),
                vault_uri: self.config.vault_uri(&r.name),
                location: r.location.clone(),
                tags: r.tags.clone(),
                properties: r.properties.clone(),
                created: r.created,
                updated: r.updated,
            },
            counts,
        };
        emit(&mut w, &Record::Manifest(Box::new(manifest)), 4096)?;
        for k in &snap.keys {
            let mut versions = Vec::with_capacity(k.versions.len());
            for v in &k.versions {
                let der = self
                    .root
                    .open(
                        SealPurpose::PrivateKey,
                        &private_key_aad(&r.name, &k.name, &v.version),
                        &v.sealed_private,
                    )
                    .map_err(|e| internal("unseal for vault backup", e))?;
                versions.push(KeyVersionItem {
                    version: v.version.to_string(),
                    seq: v.seq,
                    info: v.info.clone(),
                    pkcs8: der.to_vec(),
                });
            }
            let n = versions.len();
            let rec = Record::Key(KeyItem {
                name: k.name.to_string(),
                deleted_at: k.deleted_at,
                purge_at: k.purge_at,
                versions,
            });
            emit(&mut w, &rec, 8192 * n.max(1))?;
            job.advance(n as u64);
        }
        for s in &snap.secrets {
            let mut versions = Vec::with_capacity(s.versions.len());
            for v in &s.versions {
                let plain = self
                    .root
                    .open(
                        SealPurpose::Secret,
                        &value_aad(&r.name, &s.name, &v.version),
                        &v.sealed_value,
                    )
                    .map_err(|e| internal("unseal secret for vault backup", e))?;
                let value = SecretValue::from_utf8(&plain)
                    .ok_or_else(|| internal("vault backup", "stored secret is not UTF-8"))?;
                versions.push(SecretVersionItem {
                    version: v.version.to_string(),
                    seq: v.seq,
                    info: v.info.clone(),
                    value,
                });
            }
            let n = versions.len();
            let size: usize = versions.iter().map(|v| v.value.len() * 2 + 1024).sum();
            let rec = Record::Secret(SecretItem {
                name: s.name.to_string(),
                deleted_at: s.deleted_at,
                purge_at: s.purge_at,
                versions,
            });
            emit(&mut w, &rec, size)?;
            job.advance(n as u64);
        }
        let base = crate::directory::object_scope(r, None);
        for a in &snap.assignments {
            let rec = Record::RoleAssignment(AssignmentItem {
                scope: a.scope.strip_prefix(&base).unwrap_or("").to_string(),
                principal_id: a.principal_id.clone(),
                role_definition_id: a.role_definition_id.clone(),
                id: a.id.clone(),
                created: a.created,
            });
            emit(&mut w, &rec, 512)?;
            job.advance(1);
        }
        for (key, policy) in &snap.rotation {
            let rec = Record::RotationPolicy(RotationItem {
                key: key.clone(),
                policy: policy.clone(),
            });
            emit(&mut w, &rec, 1024)?;
            job.advance(1);
        }
        let rec = Record::End(EndItem {
            records: records.get(),
        });
        emit(&mut w, &rec, 64)?;
        let out = w.finish().map_err(file_error)?;
        let file = out
            .into_inner()
            .map_err(|e| internal("flush backup file", e.error().to_string()))?;
        file.sync_all()
            .map_err(|e| internal("sync backup file", e))?;
        let bytes = file
            .metadata()
            .map_err(|e| internal("backup file size", e))?
            .len();
        let done = part.with_extension("kvbak");
        std::fs::rename(&part, &done).map_err(|e| internal("rename backup file", e))?;
        // The job is answered as done only once the new name survives a power loss too.
        kagi_fs::sync_parent(&done).map_err(|e| internal("sync backup directory", e))?;
        tracing::info!(vault = %r.name, bytes, "vault backed up");
        let c = snap.counts();
        Ok((
            bytes,
            json!({
                "vault": r.name.as_str(),
                "keys": c.keys,
                "keyVersions": c.key_versions,
                "secrets": c.secrets,
                "secretVersions": c.secret_versions,
                "roleAssignments": c.role_assignments,
                "rotationPolicies": c.rotation_policies,
                "bytes": bytes,
            }),
        ))
    }

    /// Checks a restore before its file is received: the caller may manage the subscription,
    /// and the target is a new vault name (with `location`) or an existing empty vault.
    pub async fn check_vault_restore(
        &self,
        caller: &Principal,
        subscription: &str,
        resource_group: &str,
        name: &str,
        location: Option<&str>,
    ) -> Result<(), KvError> {
        let sub = self.authorize_arm(caller, subscription).await?;
        self.restore_target(&sub, resource_group, name, location)
            .await
            .map(|_| ())
    }

    /// `POST {vault id}/restore`: `upload` is the backup file (already received; removed when
    /// the job ends). Checks the target and the key now — a wrong passphrase, a key the caller
    /// may not unwrap with, a vault that is not empty (409) or missing (404) is answered at
    /// once — then starts a job that decrypts and checks the whole file before writing.
    pub async fn start_vault_restore(
        self: &Arc<Self>,
        caller: &Principal,
        subscription: &str,
        resource_group: &str,
        name: &str,
        upload: PathBuf,
        req: RestoreRequest,
    ) -> Result<Value, KvError> {
        let started = self
            .start_vault_restore_inner(caller, subscription, resource_group, name, &upload, req)
            .await;
        if started.is_err() {
            let _ = std::fs::remove_file(&upload);
        }
        started
    }

    async fn start_vault_restore_inner(
        self: &Arc<Self>,
        caller: &Principal,
        subscription: &str,
        resource_group: &str,
        name: &str,
        upload: &Path,
        req: RestoreRequest,
    ) -> Result<Value, KvError> {
        let sub = self.authorize_arm(caller, subscription).await?;
        let target = self
            .restore_target(&sub, resource_group, name, req.location.as_deref())
            .await?;
        let path = upload.to_path_buf();
        let header = tokio::task::spawn_blocking(move || -> Result<Header, KvError> {
            let file = std::fs::File::open(&path).map_err(|e| internal("open upload", e))?;
            read_header(&mut BufReader::new(file)).map_err(file_error)
        })
        .await
        .map_err(|e| internal("restore task", e))??;
        let key = match &header.protection {
            Protection::Passphrase { .. } => {
                let pass = req.passphrase.clone().ok_or_else(|| {
                    bad("This backup is protected by a passphrase; give it.")
                        .with_inner("BackupPassphraseRequired")
                })?;
                let h = header.clone();
                tokio::task::spawn_blocking(move || h.unlock_with_passphrase(pass.as_bytes()))
                    .await
                    .map_err(|e| internal("restore task", e))?
                    .map_err(file_error)?
            }
            Protection::WrappedKey { key_id, wrapped } => {
                if let Some(given) = &req.key_id
                    && given.trim_end_matches('/') != key_id
                {
                    return Err(bad(format!(
                        "This backup's file key is wrapped by {key_id}, not {}.",
                        kagi_core::ids::printable(given)
                    )));
                }
                let (vault, kname, version) = parse_key_id(key_id)?;
                let plain = self.key_operation(
                    caller,
                    &vault,
                    &kname,
                    Some(&version),
                    "unwrapkey",
                    KeyOperationParameters {
                        alg: "RSA-OAEP-256".into(),
                        value: wrapped.clone(),
                        iv: None,
                        aad: None,
                        tag: None,
                    },
                )?;
                let raw = Zeroizing::new(
                    plain["value"]
                        .as_str()
                        .and_then(kagi_core::b64::decode)
                        .ok_or_else(|| internal("unwrap file key", "no value"))?,
                );
                let key = FileKey::from_slice(&raw).map_err(file_error)?;
                header.check_key(&key).map_err(file_error)?;
                key
            }
        };
        let resource = format!(
            "/subscriptions/{}/resourceGroups/{}/providers/Microsoft.KeyVault/vaults/{}",
            target.sub, target.resource_group, target.name
        );
        let job = self.new_job(JobKind::VaultRestore, &resource)?;
        self.announce_job(&job).await;
        let view = job.get().to_json(&self.job_url(&job.id()));
        let platform = self.clone();
        let caller = caller.clone();
        let upload = upload.to_path_buf();
        tokio::spawn(async move {
            let result = platform
                .run_restore(&job, &caller, &target, &upload, header, key)
                .await;
            let _ = std::fs::remove_file(&upload);
            match result {
                Ok(report) => job.complete(platform.clock.now(), Some(report), None),
                Err(e) => job.fail(platform.clock.now(), &e),
            }
        });
        tracing::info!(vault = %name, "vault restore started");
        Ok(view)
    }

    /// Checks where a restore goes: a new vault (with `location`: the name must be free and
    /// the resource group exist) or an existing empty one.
    async fn restore_target(
        &self,
        sub: &SubscriptionId,
        resource_group: &str,
        name: &str,
        location: Option<&str>,
    ) -> Result<Target, KvError> {
        match location {
            Some(location) => {
                let vault = VaultName::parse(name)?;
                if self.vault_state(&vault).is_some() {
                    return Err(KvError::new(
                        ErrorCode::VaultAlreadyExists,
                        format!(
                            "The vault name '{vault}' is already in use; restore into it without \
                             a location, or choose a new name."
                        ),
                    ));
                }
                let rg = self
                    .store
                    .get_resource_group(sub.as_str(), resource_group)
                    .await
                    .map_err(|e| internal("get resource group", e))?
                    .ok_or_else(|| {
                        KvError::new(
                            ErrorCode::ResourceGroupNotFound,
                            format!(
                                "Resource group '{}' could not be found.",
                                kagi_core::ids::printable(resource_group)
                            ),
                        )
                    })?;
                Ok(Target {
                    sub: sub.clone(),
                    resource_group: rg.name,
                    name: vault,
                    location: Some(location.to_string()),
                })
            }
            None => {
                let record = self.vault_in(sub, resource_group, name)?;
                let state = self.usable_vault(&record.name)?;
                Self::check_empty(&state)?;
                Ok(Target {
                    sub: sub.clone(),
                    resource_group: record.resource_group,
                    name: record.name,
                    location: None,
                })
            }
        }
    }

    fn check_empty(state: &VaultState) -> Result<(), KvError> {
        let keys = state.keys().len();
        let secrets = state
            .secrets
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .len();
        if keys + secrets > 0 {
            return Err(KvError::conflict(format!(
                "The vault '{}' is not empty ({keys} keys and {secrets} secrets, deleted ones \
                 included); a vault backup is restored only into an empty vault.",
                state.record().name
            ))
            .with_inner("VaultNotEmpty"));
        }
        Ok(())
    }

    async fn run_restore(
        self: &Arc<Self>,
        job: &Arc<JobHandle>,
        caller: &Principal,
        target: &Target,
        upload: &Path,
        header: Header,
        key: FileKey,
    ) -> Result<Value, KvError> {
        let size = std::fs::metadata(upload)
            .map_err(|e| internal("upload size", e))?
            .len();
        job.phase("verify", "bytes", size);
        let platform = self.clone();
        let job2 = job.clone();
        let path = upload.to_path_buf();
        let vault = target.name.clone();
        let prepared = tokio::task::spawn_blocking(move || -> Result<Prepared, KvError> {
            let mut r = BufReader::with_capacity(
                256 * 1024,
                std::fs::File::open(&path).map_err(|e| internal("open upload", e))?,
            );
            // The header again, to leave the reader at the first chunk.
            let again = read_header(&mut r).map_err(file_error)?;
            if again.len() != header.len() {
                return Err(invalid_payload("the header changed"));
            }
            let reader = BackupReader::new(r, &header, &key).map_err(file_error)?;
            let payload = reader
                .read_all(MAX_PAYLOAD, |n| job2.set_done(n))
                .map_err(file_error)?;
            drop(key);
            platform.prepare(&payload, &vault)
        })
        .await
        .map_err(|e| internal("restore task", e))??;
        let result = self.restore_prepared(job, caller, target, &prepared).await;
        if result.is_err() {
            // Nothing of the restore stays (or the next start rolls it back): neither do the
            // HSM copies its keys made.
            self.discard_prepared_keys(&target.name, &prepared.keys);
        }
        result
    }

    /// The restore of a prepared payload: claim the target, journal, apply, settle.
    async fn restore_prepared(
        &self,
        job: &Arc<JobHandle>,
        caller: &Principal,
        target: &Target,
        prepared: &Prepared,
    ) -> Result<Value, KvError> {
        let hsm_keys = prepared
            .keys
            .iter()
            .any(|(k, _)| k.versions.iter().any(|v| v.info.kty.is_hsm()));
        if hsm_keys {
            let premium = match &target.location {
                Some(_) => prepared.manifest.source.properties.allows_hsm(),
                None => self
                    .usable_vault(&target.name)?
                    .record()
                    .properties
                    .allows_hsm(),
            };
            if !premium {
                return Err(crate::key_material::hsm_needs_premium());
            }
        }
        // The target is claimed before the journal names it: a new vault's name is reserved
        // for the whole restore; an existing vault is checked empty and marked as being
        // restored into under its write lock, so that nobody writes into it (nor reads a half
        // restored vault) until the restore has ended. A roll-back then removes only what the
        // restore wrote.
        let reservation = match &target.location {
            Some(_) => Some(self.reserve_vault_name(&target.name)?),
            None => None,
        };
        let existing = match &target.location {
            Some(_) => None,
            None => {
                let state = self.usable_vault(&target.name)?;
                {
                    let _w = state.write.lock().await;
                    Self::check_empty(&state)?;
                    state.set_restoring(true);
                }
                Some(state)
            }
        };
        let before = existing.as_ref().map(|s| s.record());
        let journal = RestoreJournal::plan(target, prepared, before.as_ref()).and_then(|j| {
            let path = j.write(&self.config.data_dir, &job.id())?;
            Ok((j, path))
        });
        let (journal, journal_path) = match journal {
            Ok(j) => j,
            Err(e) => {
                if let Some(state) = &existing {
                    state.set_restoring(false);
                }
                return Err(e);
            }
        };
        let mut written = Written::default();
        let result = self
            .apply(
                job,
                caller,
                target,
                prepared,
                Claim {
                    assignment_ids: &journal.assignment_ids,
                    reservation: reservation.as_ref(),
                },
                &mut written,
            )
            .await;
        let settled = match &result {
            Ok(_) => true,
            Err(_) => self.roll_back(caller, target, &written).await,
        };
        // The journal goes only once what it names is settled (all written, or all removed);
        // while it stays, the vault stays marked, and the next start rolls the restore back.
        let removed = settled
            && remove_journal(&journal_path)
                .map_err(|e| tracing::error!(error = %e, "restore journal not removed"))
                .is_ok();
        if !removed {
            tracing::error!(
                vault = %target.name,
                "restore not settled; the vault stays unavailable and the restore is rolled \
                 back at the next start"
            );
            return result.and_then(|_| {
                Err(internal(
                    "restore journal",
                    "the restore wrote everything but its journal could not be removed",
                ))
            });
        }
        if let Some(state) = self.vault_state(&target.name) {
            state.set_restoring(false);
        }
        result
    }

    /// Parses the payload and seals everything for `vault` (blocking).
    fn prepare(&self, payload: &[u8], vault: &VaultName) -> Result<Prepared, KvError> {
        let mut lines = payload
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .enumerate();
        let mut next = || -> Result<Option<Record>, KvError> {
            match lines.next() {
                None => Ok(None),
                Some((i, line)) => serde_json::from_slice(line)
                    .map(Some)
                    .map_err(|e| invalid_payload(format!("record {}: {e}", i + 1))),
            }
        };
        let Some(Record::Manifest(manifest)) = next()? else {
            return Err(invalid_payload("it does not start with a manifest"));
        };
        if manifest.format != PAYLOAD_FORMAT {
            return Err(invalid_payload(format!(
                "payload format {} (this kagi reads {PAYLOAD_FORMAT}; it may be newer)",
                manifest.format
            )));
        }
        let mut p = Prepared {
            manifest: *manifest,
            keys: Vec::new(),
            secrets: Vec::new(),
            assignments: Vec::new(),
            rotation: Vec::new(),
        };
        let mut names = HashSet::new();
        let mut secret_names = HashSet::new();
        // Keys are prepared once the whole payload has checked out: preparing an HSM key
        // copies its object in the token.
        let mut key_items = Vec::new();
        let mut records = 1u64;
        let mut ended = false;
        while let Some(rec) = next()? {
            if ended {
                return Err(invalid_payload("records after the end record"));
            }
            match rec {
                Record::Manifest(_) => return Err(invalid_payload("a second manifest")),
                Record::Key(k) => {
                    let name =
                        ObjectName::parse(&k.name).map_err(|_| invalid_payload("a key name"))?;
                    if !names.insert(name.folded()) {
                        return Err(invalid_payload(format!("key {name} appears twice")));
                    }
                    key_items.push((name, k));
                }
                Record::Secret(s) => {
                    let name =
                        ObjectName::parse(&s.name).map_err(|_| invalid_payload("a secret name"))?;
                    if !secret_names.insert(name.folded()) {
                        return Err(invalid_payload(format!("secret {name} appears twice")));
                    }
                    p.secrets.push(self.prepare_secret(vault, name, s)?);
                }
                Record::RoleAssignment(a) => {
                    if !(a.scope.is_empty()
                        || a.scope.starts_with("/keys/")
                        || a.scope.starts_with("/secrets/"))
                    {
                        return Err(invalid_payload("a role assignment scope"));
                    }
                    p.assignments.push(a);
                }
                Record::RotationPolicy(r) => {
                    let name = ObjectName::parse(&r.key)
                        .map_err(|_| invalid_payload("a rotation policy's key"))?;
                    if !names.contains(&name.folded()) {
                        return Err(invalid_payload(
                            "a rotation policy of a key not in the file",
                        ));
                    }
                    p.rotation.push((name, r.policy));
                }
                Record::End(e) => {
                    if e.records != records {
                        return Err(invalid_payload(format!(
                            "the end record counts {} records, the file has {records}",
                            e.records
                        )));
                    }
                    ended = true;
                    continue;
                }
            }
            records += 1;
        }
        if !ended {
            return Err(invalid_payload("no end record"));
        }
        let versions: u64 = key_items.iter().map(|(_, k)| k.versions.len() as u64).sum();
        let svs: u64 = p.secrets.iter().map(|s| s.versions.len() as u64).sum();
        let c = &p.manifest.counts;
        if c.keys != key_items.len() as u64
            || c.key_versions != versions
            || c.secrets != p.secrets.len() as u64
            || c.secret_versions != svs
        {
            return Err(invalid_payload(
                "the manifest's counts do not match the records",
            ));
        }
        for (name, k) in key_items {
            match self.prepare_key(vault, name, k) {
                Ok(key) => p.keys.push(key),
                Err(e) => {
                    self.discard_prepared_keys(vault, &p.keys);
                    return Err(e);
                }
            }
        }
        Ok(p)
    }

    /// Destroys the HSM copies that prepared keys made, for a restore that will not keep
    /// them.
    fn discard_prepared_keys(
        &self,
        vault: &VaultName,
        keys: &[(KeyRecord, Vec<Arc<dyn PrivateKeyOps>>)],
    ) {
        for (k, _) in keys {
            for v in &k.versions {
                let stored = crate::state::unseal_stored_key(
                    self.root.as_ref(),
                    vault,
                    &k.name,
                    &v.version,
                    &v.sealed_private,
                );
                if let Ok(StoredPrivateKey::Token(r)) = stored {
                    self.destroy_token_key(&r);
                }
            }
        }
    }

    fn prepare_key(
        &self,
        vault: &VaultName,
        name: ObjectName,
        k: KeyItem,
    ) -> Result<(KeyRecord, Vec<Arc<dyn PrivateKeyOps>>), KvError> {
        if k.versions.is_empty() {
            return Err(invalid_payload(format!("key {name} has no versions")));
        }
        let mut versions = Vec::with_capacity(k.versions.len());
        let mut seen = HashSet::new();
        for v in &k.versions {
            let version = KeyVersion::parse(&v.version)
                .map_err(|_| invalid_payload(format!("a version of key {name}")))?;
            if !seen.insert(version.to_string()) {
                return Err(invalid_payload(format!("key {name} repeats a version")));
            }
            let stored = StoredPrivateKey::decode(&v.pkcs8)
                .map_err(|_| invalid_payload(format!("the private key of {name}/{version}")))?;
            // A software key parsed again; an HSM key copied to its own object in the token.
            let pair = self.restored_material(&stored).map_err(|e| match e {
                e @ kagi_crypto::CryptoError::KeyUnavailable(_) => {
                    crate::key_material::crypto_error(e)
                }
                _ => invalid_payload(format!("the private key of {name}/{version}")),
            })?;
            if !same_public(pair.ops.public_key(), &v.info.public) {
                return Err(invalid_payload(format!(
                    "the private key of {name}/{version} does not match its public key"
                )));
            }
            let sealed = self
                .root
                .seal(
                    SealPurpose::PrivateKey,
                    &private_key_aad(vault, &name, &version),
                    &pair
                        .stored
                        .encode()
                        .map_err(|e| internal("encode restored key", e))?,
                )
                .map_err(|e| internal("seal restored key", e))?;
            versions.push((
                KeyVersionRecord {
                    version,
                    seq: v.seq,
                    info: v.info.clone(),
                    sealed_private: sealed,
                },
                pair.ops,
            ));
        }
        versions.sort_by_key(|(r, _)| r.seq);
        let (records, pairs): (Vec<_>, Vec<_>) = versions.into_iter().unzip();
        Ok((
            KeyRecord {
                name,
                deleted_at: k.deleted_at,
                purge_at: k.purge_at,
                versions: records,
            },
            pairs,
        ))
    }

    fn prepare_secret(
        &self,
        vault: &VaultName,
        name: ObjectName,
        s: SecretItem,
    ) -> Result<SecretRecord, KvError> {
        if s.versions.is_empty() {
            return Err(invalid_payload(format!("secret {name} has no versions")));
        }
        let mut versions = Vec::with_capacity(s.versions.len());
        let mut seen = HashSet::new();
        for v in &s.versions {
            let version = KeyVersion::parse(&v.version)
                .map_err(|_| invalid_payload(format!("a version of secret {name}")))?;
            if !seen.insert(version.to_string()) {
                return Err(invalid_payload(format!("secret {name} repeats a version")));
            }
            let sealed_value = self
                .root
                .seal(
                    SealPurpose::Secret,
                    &value_aad(vault, &name, &version),
                    v.value.as_bytes(),
                )
                .map_err(|e| internal("seal restored secret", e))?;
            versions.push(SecretVersionRecord {
                version,
                seq: v.seq,
                info: v.info.clone(),
                sealed_value,
            });
        }
        versions.sort_by_key(|v| v.seq);
        Ok(SecretRecord {
            name,
            deleted_at: s.deleted_at,
            purge_at: s.purge_at,
            versions,
        })
    }

    /// The backup's access policies whose principals exist here (tenant set to `tenant`),
    /// and the object ids of the others.
    fn restorable_policies(
        &self,
        policies: &[AccessPolicyEntry],
        tenant: &str,
    ) -> (Vec<AccessPolicyEntry>, Vec<Value>) {
        let mut kept = Vec::new();
        let mut skipped = Vec::new();
        for p in policies {
            let probe = Principal {
                tenant_id: tenant.to_string(),
                object_id: p.object_id.to_ascii_lowercase(),
                client_id: String::new(),
                kind: String::new(),
                network_address: None,
                upn: None,
            };
            if self.directory.check_principal_exists(&probe).is_ok() {
                let mut p = p.clone();
                p.tenant_id = tenant.to_string();
                kept.push(p);
            } else {
                skipped.push(json!({
                    "objectId": p.object_id,
                    "reason": "the principal does not exist in this directory",
                }));
            }
        }
        (kept, skipped)
    }

    /// Writes a prepared backup into the target (async: store and directory).
    async fn apply(
        &self,
        job: &JobHandle,
        caller: &Principal,
        target: &Target,
        p: &Prepared,
        claim: Claim<'_>,
        written: &mut Written,
    ) -> Result<Value, KvError> {
        let Claim {
            assignment_ids,
            reservation,
        } = claim;
        let counts = &p.manifest.counts;
        job.phase(
            "restore",
            "objects",
            counts.key_versions
                + counts.secret_versions
                + p.assignments.len() as u64
                + p.rotation.len() as u64,
        );
        let src = &p.manifest.source.properties;
        let (policies, skipped_policies) =
            self.restorable_policies(&src.access_policies, &caller.tenant_id);
        let mut notes = Vec::new();
        // Settings of the vault, as an update of its properties.
        let mut props = VaultPropertiesInput {
            sku: Some(src.sku.clone()),
            enable_rbac_authorization: Some(src.enable_rbac_authorization),
            network_acls: src.network_acls.clone(),
            public_network_access: Some(src.public_network_access.clone()),
            enabled_for_deployment: Some(src.enabled_for_deployment),
            enabled_for_disk_encryption: Some(src.enabled_for_disk_encryption),
            enabled_for_template_deployment: Some(src.enabled_for_template_deployment),
            enable_purge_protection: src.enable_purge_protection.then_some(true),
            ..Default::default()
        };
        if let Some(location) = &target.location {
            props.tenant_id = Some(caller.tenant_id.clone());
            props.soft_delete_retention_in_days =
                Some(i64::from(src.soft_delete_retention_in_days));
            props.access_policies = Some(policies.clone());
            // Under the name reserved for this restore: created here, or not at all.
            self.put_vault_as(
                caller,
                target.sub.as_str(),
                &target.resource_group,
                target.name.as_str(),
                VaultInput {
                    location: Some(location.clone()),
                    tags: Some(p.manifest.source.tags.clone()),
                    properties: Some(props.clone()),
                },
                false,
                VaultWriter::Restore(reservation),
            )
            .await?;
            written.created_vault = true;
        }
        let state = self.live_vault(&target.name)?;
        {
            let _w = state.write.lock().await;
            Self::check_empty(&state)?;
            let record = state.record();
            for (rec, pairs) in &p.keys {
                self.store
                    .insert_key(&record.name, rec)
                    .await
                    .map_err(|e| match e {
                        StoreError::Conflict(m) => KvError::conflict(m),
                        e => internal("restore key", e),
                    })?;
                written.keys.push(rec.name.clone());
                let entry = KeyEntry {
                    name: rec.name.clone(),
                    deleted_at: rec.deleted_at,
                    purge_at: rec.purge_at,
                    versions: rec
                        .versions
                        .iter()
                        .cloned()
                        .zip(pairs.iter().cloned())
                        .map(|(r, m)| Arc::new(VersionEntry::with_material(r, m)))
                        .collect(),
                };
                state.keys_mut().insert(rec.name.folded(), entry);
                job.advance(rec.versions.len() as u64);
            }
            for rec in &p.secrets {
                self.store
                    .insert_secret(&record.name, rec)
                    .await
                    .map_err(|e| match e {
                        StoreError::Conflict(m) => KvError::conflict(m),
                        e => internal("restore secret", e),
                    })?;
                written.secrets.push(rec.name.clone());
                let entry = SecretEntry {
                    name: rec.name.clone(),
                    deleted_at: rec.deleted_at,
                    purge_at: rec.purge_at,
                    versions: rec.versions.iter().cloned().map(Arc::new).collect(),
                };
                state
                    .secrets
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(rec.name.folded(), entry);
                job.advance(rec.versions.len() as u64);
            }
            for (name, policy) in &p.rotation {
                match serde_json::from_value::<kagi_core::rotation::RotationPolicy>(policy.clone())
                {
                    Ok(policy) => self
                        .store
                        .put_rotation_policy(&record.name, name, &policy)
                        .await
                        .map_err(|e| internal("restore rotation policy", e))?,
                    Err(e) => notes.push(format!(
                        "the rotation policy of key {name} was not restored: {e}"
                    )),
                }
                job.advance(1);
            }
        }
        let record = state.record();
        let base = crate::directory::object_scope(&record, None);
        let mut restored_assignments = 0u64;
        let mut skipped_assignments = Vec::new();
        for (a, id) in p.assignments.iter().zip(assignment_ids) {
            let scope = format!("{base}{}", a.scope);
            let body = json!({"properties": {
                "roleDefinitionId": format!("/providers/Microsoft.Authorization/roleDefinitions/{}", a.role_definition_id),
                "principalId": a.principal_id,
            }});
            match self.put_role_assignment(caller, &scope, id, body).await {
                Ok(_) => {
                    written.assignments.push(id.clone());
                    restored_assignments += 1;
                }
                Err(e)
                    if matches!(
                        e.inner,
                        Some(
                            "PrincipalNotFound"
                                | "RoleDefinitionDoesNotExist"
                                | "RoleAssignmentExists"
                                | "InvalidScope"
                        )
                    ) =>
                {
                    skipped_assignments.push(json!({
                        "scope": scope,
                        "principalId": a.principal_id,
                        "roleDefinitionId": a.role_definition_id,
                        "reason": e.message,
                    }));
                }
                Err(e) => return Err(e),
            }
            job.advance(1);
        }
        if target.location.is_none() {
            // An existing vault keeps its tenant, retention and access policies; the backup's
            // policies (whose principals exist here) are added.
            let mut merged = record.properties.access_policies.clone();
            for p in policies {
                if !merged.iter().any(|m| {
                    m.object_id.eq_ignore_ascii_case(&p.object_id)
                        && m.application_id == p.application_id
                }) {
                    merged.push(p);
                }
            }
            props.access_policies = Some(merged);
            if record.properties.soft_delete_retention_in_days != src.soft_delete_retention_in_days
            {
                notes.push(format!(
                    "softDeleteRetentionInDays stays {} (the backup's vault had {}; it cannot \
                     change after creation)",
                    record.properties.soft_delete_retention_in_days,
                    src.soft_delete_retention_in_days
                ));
            }
            let mut tags = record.tags.clone();
            for (k, v) in &p.manifest.source.tags {
                tags.entry(k.clone()).or_insert_with(|| v.clone());
            }
            self.put_vault_as(
                caller,
                target.sub.as_str(),
                &target.resource_group,
                target.name.as_str(),
                VaultInput {
                    location: None,
                    tags: Some(tags),
                    properties: Some(props),
                },
                true,
                VaultWriter::Restore(None),
            )
            .await?;
        }
        let deleted_keys = p
            .keys
            .iter()
            .filter(|(k, _)| k.deleted_at.is_some())
            .count();
        let deleted_secrets = p.secrets.iter().filter(|s| s.deleted_at.is_some()).count();
        tracing::info!(vault = %target.name, source = %p.manifest.source.name, "vault restored");
        Ok(json!({
            "vault": target.name.as_str(),
            "vaultUri": self.config.vault_uri(&target.name),
            "createdVault": written.created_vault,
            "source": {
                "name": p.manifest.source.name,
                "id": p.manifest.source.id,
                "vaultUri": p.manifest.source.vault_uri,
                "backupTime": kagi_core::time::rfc3339(p.manifest.created),
            },
            "keys": p.keys.len(),
            "keyVersions": counts.key_versions,
            "deletedKeys": deleted_keys,
            "secrets": p.secrets.len(),
            "secretVersions": counts.secret_versions,
            "deletedSecrets": deleted_secrets,
            "rotationPolicies": p.rotation.len(),
            "roleAssignments": {"restored": restored_assignments, "skipped": skipped_assignments},
            "accessPolicies": {"restored": src.access_policies.len() - skipped_policies.len(), "skipped": skipped_policies},
            "notes": notes,
        }))
    }

    /// Removes what a failed restore wrote; whether all of it went (failures are logged).
    async fn roll_back(&self, caller: &Principal, target: &Target, written: &Written) -> bool {
        let mut clean = true;
        for id in &written.assignments {
            if let Err(e) = self.delete_role_assignment(caller, id).await {
                tracing::error!(assignment = %id, error = %e, "restore roll-back: assignment left");
                clean = false;
            }
        }
        let Some(state) = self.vault_state(&target.name) else {
            return clean;
        };
        if written.created_vault {
            let _w = state.write.lock().await;
            if let Err(e) = self.store.purge_vault(&target.name).await {
                tracing::error!(vault = %target.name, error = %e, "restore roll-back: vault left");
                return false;
            }
            self.vaults_write().remove(&target.name);
            return clean;
        }
        let _w = state.write.lock().await;
        for name in &written.keys {
            match self.store.purge_key(&target.name, name).await {
                Ok(()) => {
                    state.keys_mut().remove(&name.folded());
                }
                Err(e) => {
                    tracing::error!(key = %name, error = %e, "restore roll-back: key left");
                    clean = false;
                }
            }
        }
        for name in &written.secrets {
            match self.store.purge_secret(&target.name, name).await {
                Ok(()) => {
                    state
                        .secrets
                        .write()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&name.folded());
                }
                Err(e) => {
                    tracing::error!(secret = %name, error = %e, "restore roll-back: secret left");
                    clean = false;
                }
            }
        }
        clean
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_ids_parse() {
        let (v, k, ver) =
            parse_key_id("https://vault1.localhost:8443/keys/cmk/0123456789abcdef0123456789abcdef")
                .unwrap();
        assert_eq!((v.as_str(), k.as_str()), ("vault1", "cmk"));
        assert_eq!(ver, "0123456789abcdef0123456789abcdef");
        for bad in [
            "https://vault1.localhost:8443/keys/cmk",
            "http://vault1.localhost/keys/cmk/0123456789abcdef0123456789abcdef",
            "https://vault1.localhost/secrets/s/0123456789abcdef0123456789abcdef",
            "vault1/keys/cmk/x",
        ] {
            assert!(parse_key_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn requests_hide_the_passphrase() {
        let r: BackupRequest =
            serde_json::from_value(json!({"passphrase": "hunter2hunter2"})).unwrap();
        assert!(!format!("{r:?}").contains("hunter2"));
        assert!(serde_json::from_value::<BackupRequest>(json!({"pass": "x"})).is_err());
        assert!(check_passphrase("short").is_err());
        assert!(check_passphrase("long enough").is_ok());
        assert!(
            argon2_params(Some(&KdfRequest {
                memory_kib: Some(4),
                iterations: None,
                parallelism: None
            }))
            .is_err()
        );
    }

    #[test]
    fn records_are_tagged() {
        let v = serde_json::to_value(Record::End(EndItem { records: 3 })).unwrap();
        assert_eq!(v, json!({"type": "end", "records": 3}));
        let a = serde_json::to_value(Record::RoleAssignment(AssignmentItem {
            scope: "/keys/k".into(),
            principal_id: "p".into(),
            role_definition_id: "r".into(),
            id: "i".into(),
            created: 1,
        }))
        .unwrap();
        assert_eq!(a["type"], "roleAssignment");
        assert_eq!(a["principalId"], "p");
    }
}
