//! Protected items, their data keys and their jobs.
//!
//! Each item's DEK lives only wrapped, in its repository's `keys/`: under the vault's platform
//! key (AES-256-GCM, bound to the vault and item) or under the customer's key (RSA-OAEP-256
//! through the key vault's `wrapKey`). An unwrapped DEK is cached for the key-cache lifetime;
//! after it, the key vault is asked again (get + unwrapKey), so a disabled, expired or deleted
//! key, or a removed permission, stops jobs within one lifetime (BK-6), and nothing stored is
//! touched. A new key version (versionless URI, BK-5) or a new key is adopted by writing one new
//! `keys/` entry — 32 bytes wrapped, whatever the repository's size; entries under older
//! versions stay until the next backup job of the item has completed, then are removed.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use kagi_backup::{BackupOptions, BlobBackend, KeyEntry, ObjectStoreBackend, Repository};
use kagi_blobs::BlobRoot;
use kagi_cmk::{
    Dek, DekSlot, Kek, KekRef, KeyError, KeyOwner, Resolved, VersionInUse, WrappedKey, bad,
};
use kagi_core::time::rfc3339;
use kagi_core::{ErrorCode, KvError};
use kagi_crypto::data_key::DataKey;
use kagi_host::{Principal, ServiceHost};
use serde_json::{Value, json};
use zeroize::Zeroizing;

use crate::BackupService;
use crate::jobs::JobHandle;
use crate::leases::LeaseHold;
use crate::resource::{CmkConfig, VaultCtx, activity_entry};
use crate::state::{Item, KeyVersionInUse, VaultState, blob, io, pmk_label};

/// What the service keeps in memory for an item.
#[derive(Default)]
pub(crate) struct ItemRuntime {
    /// Serialises jobs on the item's repository.
    lock: tokio::sync::Mutex<()>,
    /// The item's data key, for the key-cache lifetime.
    dek: DekSlot,
}

impl std::fmt::Debug for ItemRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ItemRuntime(..)")
    }
}

/// The key that wrapped a `keys/` entry (`kind` `pmk` or `cmk`, anything else unknown).
fn entry_kek(e: &KeyEntry) -> KekRef {
    match e.kek["kind"].as_str() {
        Some("pmk") => KekRef::Platform,
        Some("cmk") => KekRef::Customer(e.kek["keyId"].as_str().unwrap_or_default().to_string()),
        _ => KekRef::Unknown,
    }
}

/// A `keys/` entry as kagi-cmk sees it (a damaged one wraps nothing).
fn record_of(e: &KeyEntry) -> WrappedKey {
    WrappedKey {
        id: e.id.clone(),
        kek: entry_kek(e),
        wrapped: kagi_core::b64::decode(&e.wrapped).unwrap_or_default(),
        created: e.created,
    }
}

/// The `keys/` entry of a record wrapped for the vault `vault_id`.
fn entry_of(r: &WrappedKey, vault_id: &str) -> KeyEntry {
    KeyEntry {
        id: r.id.clone(),
        kek: match &r.kek {
            KekRef::Customer(kid) => json!({"kind": "cmk", "keyId": kid}),
            KekRef::Platform | KekRef::Unknown => json!({"kind": "pmk", "vault": vault_id}),
        },
        wrapped: kagi_core::b64::encode(&r.wrapped),
        created: r.created,
    }
}

fn pmk_aad(vault_id: &str, item: &str) -> Vec<u8> {
    format!(
        "kagi/backup/pmk-wrap/v1/{}/{}",
        vault_id.to_ascii_lowercase(),
        item.to_ascii_lowercase()
    )
    .into_bytes()
}

/// The vault's platform key.
async fn pmk_of(p: &dyn ServiceHost, v: &VaultCtx) -> Result<Dek, KvError> {
    let state = VaultState::load(p, &v.id).await?.unwrap_or_default();
    let sealed =
        kagi_core::b64::decode(&state.pmk_sealed).ok_or_else(|| io("pmk", "not base64"))?;
    let binding = state.pmk_binding.clone().unwrap_or_else(|| v.id.clone());
    let raw = p.open_secret(&pmk_label(&binding), &sealed)?.secret;
    let mut k = Zeroizing::new([0u8; 32]);
    if raw.len() != 32 {
        return Err(io("pmk", "bad length"));
    }
    k.copy_from_slice(&raw);
    Ok(k)
}

/// An item as the owner of its data key: its repository's `keys/` entries, and the vault's
/// platform key bound to the vault and the item.
struct ItemKeys<'a> {
    p: &'a dyn ServiceHost,
    v: &'a VaultCtx,
    item: &'a str,
}

#[async_trait]
impl KeyOwner for ItemKeys<'_> {
    async fn wrapped_keys(&self) -> Result<Vec<WrappedKey>, KvError> {
        let repo = RepoAt::new(
            self.p.config().blobs,
            BackupService::item_dir(self.v, self.item),
        );
        let entries = tokio::task::spawn_blocking(move || {
            Repository::key_entries(repo.backend()?.as_ref()).map_err(engine)
        })
        .await
        .map_err(join)??;
        Ok(entries.iter().map(record_of).collect())
    }

    async fn add_wrapped_key(&self, key: WrappedKey) -> Result<(), KvError> {
        let entry = entry_of(&key, &self.v.id);
        let repo = RepoAt::new(
            self.p.config().blobs,
            BackupService::item_dir(self.v, self.item),
        );
        tokio::task::spawn_blocking(move || {
            Repository::put_key_entry(repo.backend()?.as_ref(), &entry).map_err(engine)
        })
        .await
        .map_err(join)?
    }

    async fn platform_key(&self) -> Result<Dek, KvError> {
        pmk_of(self.p, self.v).await
    }

    async fn platform_aad(&self) -> Result<Vec<u8>, KvError> {
        Ok(pmk_aad(&self.v.key_binding(self.p).await?, self.item))
    }
}

fn engine(e: kagi_backup::BackupError) -> KvError {
    match e {
        kagi_backup::BackupError::Invalid(m) => {
            KvError::new(ErrorCode::BadRequest, m).with_inner("UserErrorInvalidRequest")
        }
        kagi_backup::BackupError::Io { path, source } => {
            KvError::new(ErrorCode::BadRequest, format!("{path}: {source}"))
                .with_inner("UserErrorFileAccess")
        }
        kagi_backup::BackupError::Corrupt(m) => KvError::new(
            ErrorCode::Conflict,
            format!("The backup data is damaged: {m}"),
        )
        .with_inner("RepositoryDamaged"),
        other => io("backup engine", other),
    }
}

fn join(e: tokio::task::JoinError) -> KvError {
    io("backup task", e)
}

fn item_name_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        && !name.starts_with('.')
}

/// The item's `schedule` and `retention` properties: (interval hours, keep last), each
/// `None` when absent or null.
fn schedule_of(props: &Value) -> Result<(Option<u64>, Option<u64>), KvError> {
    let num = |v: &Value, what: &str, max: u64| -> Result<Option<u64>, KvError> {
        if v.is_null() {
            return Ok(None);
        }
        v.as_u64()
            .filter(|n| (1..=max).contains(n))
            .map(Some)
            .ok_or_else(|| {
                bad(
                    "InvalidSchedule",
                    format!("{what} must be an integer from 1 to {max}."),
                )
            })
    };
    Ok((
        num(
            &props["schedule"]["intervalHours"],
            "schedule.intervalHours",
            8760,
        )?,
        num(
            &props["retention"]["keepLast"],
            "retention.keepLast",
            100_000,
        )?,
    ))
}

fn item_json(v: &VaultCtx, name: &str, item: &Item) -> Value {
    json!({
        "id": format!("{}/backupProtectedItems/{name}", v.id),
        "name": name,
        "type": "Microsoft.RecoveryServices/vaults/backupProtectedItems",
        "properties": {
            "sourcePath": item.source_path,
            "protectionState": "Protected",
            "createdOn": rfc3339(item.created),
            "schedule": item.schedule_hours.map(|h| json!({"intervalHours": h})),
            "retention": item.keep_last.map(|k| json!({"keepLast": k})),
            "nextScheduledBackup": item.next_scheduled().map(rfc3339),
        },
    })
}

/// An item's repository: its folder below the data directory, and where its objects live.
struct RepoAt {
    blobs: BlobRoot,
    dir: PathBuf,
}

impl RepoAt {
    fn new(blobs: BlobRoot, dir: PathBuf) -> Self {
        Self { blobs, dir }
    }

    /// The repository's objects: durable local files, or the shared bucket. Called on a
    /// blocking thread of the runtime (the engine blocks on it).
    fn backend(&self) -> Result<Arc<dyn BlobBackend>, KvError> {
        let rt = tokio::runtime::Handle::current();
        Ok(Arc::new(
            match self.blobs.remote(&self.dir).map_err(blob)? {
                Some(store) => ObjectStoreBackend::new(store, rt),
                None => ObjectStoreBackend::local(&self.dir, rt).map_err(engine)?,
            },
        ))
    }
}

impl BackupService {
    fn item_dir(v: &VaultCtx, item: &str) -> PathBuf {
        v.dir.join("items").join(item.to_ascii_lowercase())
    }

    /// The item's repository for this node across nodes: the store lease
    /// `backup-item:{folder}`, waited for as long as another node's work on it takes. Taken
    /// with (after) the process's lock of the item, and held as long as it.
    async fn hold_item(&self, v: &VaultCtx, item: &str) -> Result<LeaseHold, KvError> {
        let rel = self.blobs.key_of(&Self::item_dir(v, item)).map_err(blob)?;
        LeaseHold::take(
            &self.host,
            format!("backup-item:{}", rel.as_ref().to_ascii_lowercase()),
            None,
            KvError::internal,
        )
        .await
    }

    fn item_rt(&self, v: &VaultCtx, item: &str) -> Arc<ItemRuntime> {
        self.items
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(Self::item_dir(v, item).display().to_string())
            .or_default()
            .clone()
    }

    async fn load_item(p: &dyn ServiceHost, v: &VaultCtx, item: &str) -> Result<Item, KvError> {
        VaultState::load(p, &v.id)
            .await?
            .and_then(|s| s.items.get(&item.to_ascii_lowercase()).cloned())
            .ok_or_else(|| {
                KvError::new(
                    ErrorCode::NotFound,
                    format!(
                        "The backup vault has no protected item '{}'.",
                        kagi_core::ids::printable(item)
                    ),
                )
                .with_inner("ProtectedItemNotFound")
            })
    }

    pub(crate) async fn list_items(
        &self,
        p: &dyn ServiceHost,
        v: &VaultCtx,
    ) -> Result<(u16, Value), KvError> {
        let s = VaultState::load(p, &v.id).await?.unwrap_or_default();
        let value: Vec<Value> = s.items.iter().map(|(n, i)| item_json(v, n, i)).collect();
        Ok((200, json!({"value": value})))
    }

    pub(crate) async fn get_item(
        &self,
        p: &dyn ServiceHost,
        v: &VaultCtx,
        item: &str,
    ) -> Result<(u16, Value), KvError> {
        let i = Self::load_item(p, v, item).await?;
        Ok((200, item_json(v, &item.to_ascii_lowercase(), &i)))
    }

    /// A key access failure: logged in the activity log, answered with the key and reason.
    async fn key_failure(&self, p: &dyn ServiceHost, v: &VaultCtx, message: String) -> KvError {
        let op = "Microsoft.RecoveryServices/vaults/keyAccess";
        self.note(p, v, op, "Failed", &message).await;
        bad("UserErrorKeyVaultKeyNotAccessible", message)
    }

    /// The answer to a failure of the item's keys (key failures logged as such).
    async fn key_error(&self, p: &dyn ServiceHost, v: &VaultCtx, e: KeyError) -> KvError {
        match e {
            KeyError::Access(f) => self.key_failure(p, v, f.message).await,
            KeyError::Unopened(first) => {
                let m =
                    first.map_or_else(|| "the item has no wrapped data key".into(), |f| f.message);
                self.key_failure(p, v, format!("{m}. Backups and restores of this vault fail until access returns; nothing stored is changed.")).await
            }
            KeyError::Other(e) => e,
        }
    }

    /// The KEK in force (resolving a versionless key URI at most once per poll interval).
    async fn current_kek(&self, p: &dyn ServiceHost, v: &VaultCtx) -> Result<Kek, KvError> {
        let body = p.resource(&v.id).unwrap_or_else(|| v.body.clone());
        let state = VaultState::load(p, &v.id).await?.unwrap_or_default();
        let Some(cmk) = CmkConfig::of(&body) else {
            return Ok(Kek::Platform(pmk_of(p, v).await?));
        };
        // BK-9: a key configured in another tenant than the subscription's now is not used.
        self.check_cmk_tenant(p, v, &state).await?;
        let who = cmk.describe_identity(&body);
        let token = match p.identity_token(&v.id, cmk.user_assigned.as_deref()) {
            Ok(t) => t,
            Err(e) => {
                let message = format!(
                    "The key '{}' cannot be reached: the {who} is unusable: {}",
                    cmk.key_uri, e.message
                );
                return Err(self.key_failure(p, v, message).await);
            }
        };
        let uri = self.keys.parse(&cmk.key_uri)?;
        let in_use = match &uri.version {
            Some(_) => VersionInUse::default(),
            None => {
                let k = KeyVersionInUse::load(p, &v.id, &state).await?;
                VersionInUse {
                    kid: k.kid,
                    resolved_at: k.resolved_at,
                }
            }
        };
        let poll = self.config.key_poll_interval;
        let resolved = match self
            .keys
            .resolve_version(&uri, &token, &in_use, poll, p.now())
            .await
        {
            Ok(r) => r,
            Err(f) => {
                let message = format!(
                    "The key '{}' could not be read by the {who}: {}",
                    cmk.key_uri,
                    f.reason()
                );
                return Err(self.key_failure(p, v, message).await);
            }
        };
        if let Resolved::Fresh { kid, changed } = &resolved {
            if *changed {
                let op = "Microsoft.RecoveryServices/vaults/encryption/keyVersionChanged";
                let message = format!("New version of '{}' in use: {kid}.", cmk.key_uri);
                self.note(p, v, op, "Succeeded", &message).await;
            }
            KeyVersionInUse {
                kid: Some(kid.clone()),
                resolved_at: p.now(),
            }
            .save(p, &v.id)
            .await?;
        }
        Ok(Kek::Customer {
            kid: resolved.kid().to_string(),
            token,
            who,
        })
    }

    /// The item's DEK (cached, or unwrapped by the key vault), and the number of `keys/`
    /// entries written to adopt the KEK in force (0 or 1). Caller holds the item's lock.
    async fn dek(
        &self,
        p: &dyn ServiceHost,
        v: &VaultCtx,
        item: &str,
        rt: &ItemRuntime,
    ) -> Result<(Dek, String, u64), KvError> {
        let kek = self.current_kek(p, v).await?;
        let owner = ItemKeys { p, v, item };
        let lifetime = self.config.key_cache_lifetime;
        let opened = match self
            .keys
            .data_key(&owner, &kek, &rt.dek, lifetime, p.now())
            .await
        {
            Ok(k) => k,
            Err(e) => return Err(self.key_error(p, v, e).await),
        };
        if opened.written > 0 {
            let op = "Microsoft.RecoveryServices/vaults/backupProtectedItems/rewrapDataKey";
            let message = format!(
                "The data key of item '{item}' was wrapped under {}.",
                opened.kek_id
            );
            self.note(p, v, op, "Succeeded", &message).await;
        }
        Ok((opened.dek, opened.kek_id, opened.written))
    }

    /// Re-wraps an item's DEK under the KEK in force (the key-assignment job). Returns the
    /// number of `keys/` entries written.
    pub(crate) async fn rewrap_item(
        &self,
        p: &dyn ServiceHost,
        v: &VaultCtx,
        item: &str,
    ) -> Result<u64, KvError> {
        let rt = self.item_rt(v, item);
        let _g = rt.lock.lock().await;
        let _item = self.hold_item(v, item).await?;
        let (_, _, n) = self.dek(p, v, item, &rt).await?;
        Ok(n)
    }

    pub(crate) async fn protect(
        &self,
        p: &dyn ServiceHost,
        caller: &Principal,
        v: &VaultCtx,
        name: &str,
        input: Value,
    ) -> Result<(u16, Value), KvError> {
        let _g = self.lock_vault(&v.dir).await?;
        let mut state = VaultState::load(p, &v.id).await?.unwrap_or_default();
        let name = name.to_ascii_lowercase();
        let source = input["properties"]["sourcePath"]
            .as_str()
            .unwrap_or("")
            .to_string();
        let sched = schedule_of(&input["properties"]);
        if let Some(i) = state.items.get_mut(&name) {
            if i.source_path == source {
                let (schedule_hours, keep_last) = sched?;
                // Schedule and retention are the item's only changeable properties.
                if (i.schedule_hours, i.keep_last) != (schedule_hours, keep_last) {
                    i.schedule_hours = schedule_hours;
                    i.keep_last = keep_last;
                    let out = item_json(v, &name, i);
                    state.save(p, &v.id).await?;
                    self.log(
                        p,
                        v,
                        activity_entry(
                            Some(caller),
                            &v.id,
                            "Microsoft.RecoveryServices/vaults/backupProtectedItems/write",
                            "Succeeded",
                            &format!(
                                "Item '{name}': schedule every {schedule_hours:?} h, keep last {keep_last:?}."
                            ),
                            p.now(),
                        ),
                    )
                    .await;
                    return Ok((200, out));
                }
                return Ok((200, item_json(v, &name, i)));
            }
            return Err(
                KvError::conflict("The item already protects another folder.")
                    .with_inner("ProtectedItemExists"),
            );
        }
        // BK-2: the attempt counts, whatever happens next.
        if !state.protection_attempted {
            state.protection_attempted = true;
            state.save(p, &v.id).await?;
        }
        let fail = async |e: KvError| -> KvError {
            self.log(
                p,
                v,
                activity_entry(
                    Some(caller),
                    &v.id,
                    "Microsoft.RecoveryServices/vaults/backupProtectedItems/write",
                    "Failed",
                    &e.message,
                    p.now(),
                ),
            )
            .await;
            e
        };
        let (schedule_hours, keep_last) = match sched {
            Ok(s) => s,
            Err(e) => return Err(fail(e).await),
        };
        if !item_name_ok(&name) {
            return Err(fail(bad(
                "InvalidItemName",
                "Item names are 1-64 letters, digits, '-', '_' and '.'.",
            ))
            .await);
        }
        let path = Path::new(&source);
        if !path.is_absolute() {
            return Err(fail(bad(
                "InvalidSourcePath",
                format!(
                    "properties.sourcePath must be an absolute path (got '{}').",
                    kagi_core::ids::printable(&source)
                ),
            ))
            .await);
        }
        match std::fs::read_dir(path) {
            Ok(_) => {}
            Err(e) => {
                return Err(fail(bad(
                    "InvalidSourcePath",
                    format!(
                        "The folder '{}' cannot be protected: {e}.",
                        kagi_core::ids::printable(&source)
                    ),
                ))
                .await);
            }
        }
        let kek = match self.current_kek(p, v).await {
            Ok(k) => k,
            Err(e) => return Err(fail(e).await),
        };
        let key = DataKey::generate().map_err(|e| io("dek", e))?;
        let dek: Dek = Zeroizing::new(*key.expose_for_wrapping());
        let owner = ItemKeys { p, v, item: &name };
        let entry = match self.keys.wrap(&owner, &kek, &dek, p.now()).await {
            Ok(r) => entry_of(&r, &v.id),
            Err(e) => {
                let e = self.key_error(p, v, e).await;
                return Err(fail(e).await);
            }
        };
        let dir = RepoAt::new(self.blobs.clone(), Self::item_dir(v, &name));
        // Objects an earlier item of this name left behind (a failed creation) go first.
        let _ = self.remove_blobs(&dir.dir).await;
        let created = tokio::task::spawn_blocking(move || -> Result<(), KvError> {
            let b = dir.backend()?;
            Repository::init(b.clone(), key).map_err(engine)?;
            Repository::put_key_entry(b.as_ref(), &entry).map_err(engine)
        })
        .await
        .map_err(join)?;
        if let Err(e) = created {
            return Err(fail(e).await);
        }
        let item = Item {
            source_path: source,
            created: p.now(),
            schedule_hours,
            keep_last,
            last_scheduled: 0,
        };
        state.items.insert(name.clone(), item.clone());
        state.save(p, &v.id).await?;
        self.item_rt(v, &name)
            .dek
            .put(dek, kek.id(), Instant::now());
        self.log(
            p,
            v,
            activity_entry(
                Some(caller),
                &v.id,
                "Microsoft.RecoveryServices/vaults/backupProtectedItems/write",
                "Succeeded",
                &format!("Folder '{}' protected as item '{name}'.", item.source_path),
                p.now(),
            ),
        )
        .await;
        Ok((201, item_json(v, &name, &item)))
    }

    pub(crate) async fn start_backup(
        self: &Arc<Self>,
        host: &Arc<dyn ServiceHost>,
        v: &VaultCtx,
        item: &str,
    ) -> Result<(u16, Value), KvError> {
        let p = host.as_ref();
        let it = Self::load_item(p, v, item).await?;
        let item = item.to_ascii_lowercase();
        let job = self
            .jobs
            .start(host, &v.id, "Backup", &item, p.now())
            .await?;
        let (svc, p2, v2, j2) = (self.clone(), host.clone(), v.clone(), job.clone());
        tokio::spawn(async move {
            match svc.run_backup(p2.as_ref(), &v2, &item, &it, &j2).await {
                Ok(stats) => j2.complete(p2.now(), stats).await,
                Err(e) => {
                    svc.job_failed(p2.as_ref(), &v2, &j2, "backup", &e, None)
                        .await
                }
            }
        });
        Ok((202, job.get()))
    }

    pub(crate) async fn run_backup(
        &self,
        p: &dyn ServiceHost,
        v: &VaultCtx,
        item: &str,
        it: &Item,
        job: &Arc<JobHandle>,
    ) -> Result<Value, KvError> {
        let rt = self.item_rt(v, item);
        let _g = rt.lock.lock().await;
        let _item = self.hold_item(v, item).await?;
        let (dek, kek_id, _) = self.dek(p, v, item, &rt).await?;
        let dir = RepoAt::new(self.blobs.clone(), Self::item_dir(v, item));
        let source = PathBuf::from(&it.source_path);
        let now = p.now();
        let j = job.clone();
        let stats =
            tokio::task::spawn_blocking(move || -> Result<kagi_backup::BackupStats, KvError> {
                let b = dir.backend()?;
                let key = DataKey::from_bytes(&dek).map_err(|e| io("dek", e))?;
                let mut repo = Repository::open(b.clone(), key).map_err(engine)?;
                let stats = repo
                    .backup(&source, &BackupOptions::default(), now, &|pr| {
                        j.progress(pr.bytes_done, pr.bytes_total, "Bytes")
                    })
                    .map_err(engine)?;
                // BK-5: entries under earlier keys served until this backup completed.
                let entries = Repository::key_entries(b.as_ref()).map_err(engine)?;
                if entries.iter().any(|e| entry_kek(e).id() == kek_id) {
                    for e in entries.iter().filter(|e| entry_kek(e).id() != kek_id) {
                        Repository::delete_key_entry(b.as_ref(), &e.id).map_err(engine)?;
                    }
                }
                Ok(stats)
            })
            .await
            .map_err(join)??;
        let secs = (stats.duration_ms as f64 / 1000.0).max(0.001);
        Ok(json!({
            "recoveryPointId": stats.snapshot.id,
            "files": stats.snapshot.files,
            "bytes": stats.snapshot.bytes,
            "filesRead": stats.files_read,
            "filesUnchanged": stats.files_unchanged,
            "bytesRead": stats.bytes_read,
            "chunksNew": stats.chunks_new,
            "chunksDeduplicated": stats.chunks_dedup,
            "bytesNew": stats.bytes_new,
            "bytesAdded": stats.bytes_added,
            "skipped": stats.skipped,
            "skippedCount": stats.skipped_count,
            "durationMs": stats.duration_ms,
            "megabytesPerSecond": (stats.bytes_read as f64 / 1e6 / secs * 10.0).round() / 10.0,
        }))
    }

    pub(crate) async fn start_restore(
        self: &Arc<Self>,
        host: &Arc<dyn ServiceHost>,
        v: &VaultCtx,
        item: &str,
        input: Value,
    ) -> Result<(u16, Value), KvError> {
        let p = host.as_ref();
        Self::load_item(p, v, item).await?;
        let rp = input["recoveryPointId"].as_str().unwrap_or("").to_string();
        if rp.is_empty() || !rp.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(bad(
                "InvalidRecoveryPoint",
                "recoveryPointId must name a recovery point (hex id).",
            ));
        }
        let target = input["targetPath"].as_str().unwrap_or("").to_string();
        if !Path::new(&target).is_absolute() {
            return Err(bad(
                "InvalidTargetPath",
                "targetPath must be an absolute path.",
            ));
        }
        let sub = input["subPath"].as_str().map(str::to_string);
        let overwrite = input["overwrite"].as_bool().unwrap_or(false);
        let item = item.to_ascii_lowercase();
        let job = self
            .jobs
            .start(host, &v.id, "Restore", &item, p.now())
            .await?;
        let (svc, p2, v2, j2) = (self.clone(), host.clone(), v.clone(), job.clone());
        tokio::spawn(async move {
            let r = async {
                let rt = svc.item_rt(&v2, &item);
                let _g = rt.lock.lock().await;
                let _item = svc.hold_item(&v2, &item).await?;
                let (dek, _, _) = svc.dek(p2.as_ref(), &v2, &item, &rt).await?;
                let dir = RepoAt::new(svc.blobs.clone(), Self::item_dir(&v2, &item));
                let j = j2.clone();
                let st = tokio::task::spawn_blocking(move || -> Result<kagi_backup::RestoreStats, KvError> {
                    let b = dir.backend()?;
                    let repo = Repository::open(b, DataKey::from_bytes(&dek).map_err(|e| io("dek", e))?).map_err(engine)?;
                    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
                    repo.restore(&rp, sub.as_deref().map(Path::new), Path::new(&target), overwrite, workers, &|pr| {
                        j.progress(pr.bytes_done, pr.bytes_total, "Bytes")
                    })
                    .map_err(engine)
                })
                .await
                .map_err(join)??;
                Ok::<_, KvError>(json!({"files": st.files, "dirs": st.dirs, "symlinks": st.symlinks, "bytes": st.bytes, "durationMs": st.duration_ms}))
            }
            .await;
            match r {
                Ok(s) => j2.complete(p2.now(), s).await,
                Err(e) => {
                    svc.job_failed(p2.as_ref(), &v2, &j2, "restore", &e, None)
                        .await
                }
            }
        });
        Ok((202, job.get()))
    }

    /// Retention: forgets the oldest recovery points beyond `keep`, then (if any were
    /// forgotten) prunes what no remaining one references. Returns the forgotten ids and the
    /// prune's statistics (`null` when nothing was forgotten). A failed prune does not fail
    /// the job (the backup and the forgetting are done; the next retention prunes again): its
    /// error is reported in the statistics.
    pub(crate) async fn apply_retention(
        &self,
        p: &dyn ServiceHost,
        v: &VaultCtx,
        item: &str,
        keep: u64,
    ) -> Result<(Vec<String>, Value), KvError> {
        let rt = self.item_rt(v, item);
        let _g = rt.lock.lock().await;
        let _item = self.hold_item(v, item).await?;
        let (dek, _, _) = self.dek(p, v, item, &rt).await?;
        let dir = RepoAt::new(self.blobs.clone(), Self::item_dir(v, item));
        tokio::task::spawn_blocking(move || -> Result<(Vec<String>, Value), KvError> {
            let mut repo = Repository::open(
                dir.backend()?,
                DataKey::from_bytes(&dek).map_err(|e| io("dek", e))?,
            )
            .map_err(engine)?;
            let snaps = repo.snapshots().map_err(engine)?;
            let excess = snaps.len().saturating_sub(keep as usize);
            let mut gone = Vec::new();
            for s in snaps.into_iter().take(excess) {
                repo.forget(&s.id).map_err(engine)?;
                gone.push(s.id);
            }
            if gone.is_empty() {
                return Ok((gone, Value::Null));
            }
            // The item's lock (held above) keeps other jobs of this item out, as prune needs.
            let pruned = match repo.prune(&kagi_backup::PruneOptions::default(), &|_| {}) {
                Ok(st) => json!(st),
                Err(e) => json!({"error": e.to_string()}),
            };
            Ok((gone, pruned))
        })
        .await
        .map_err(join)?
    }

    /// A Check job: `Repository::check(read_data)` on the item's repository. Completed when
    /// nothing is wrong; Failed (`RepositoryDamaged`) with `stats.problems` otherwise.
    pub(crate) async fn start_check(
        self: &Arc<Self>,
        host: &Arc<dyn ServiceHost>,
        v: &VaultCtx,
        item: &str,
        input: &Value,
    ) -> Result<(u16, Value), KvError> {
        let p = host.as_ref();
        Self::load_item(p, v, item).await?;
        let read_data = input["readData"].as_bool().unwrap_or(false);
        let item = item.to_ascii_lowercase();
        let job = self
            .jobs
            .start(host, &v.id, "Check", &item, p.now())
            .await?;
        let (svc, p2, v2, j2) = (self.clone(), host.clone(), v.clone(), job.clone());
        tokio::spawn(async move {
            let r = async {
                let rt = svc.item_rt(&v2, &item);
                let _g = rt.lock.lock().await;
                let _item = svc.hold_item(&v2, &item).await?;
                let (dek, _, _) = svc.dek(p2.as_ref(), &v2, &item, &rt).await?;
                let dir = RepoAt::new(svc.blobs.clone(), Self::item_dir(&v2, &item));
                let started = Instant::now();
                let report = tokio::task::spawn_blocking(
                    move || -> Result<kagi_backup::CheckReport, KvError> {
                        let repo = Repository::open(
                            dir.backend()?,
                            DataKey::from_bytes(&dek).map_err(|e| io("dek", e))?,
                        )
                        .map_err(engine)?;
                        repo.check_report(read_data).map_err(engine)
                    },
                )
                .await
                .map_err(join)??;
                Ok::<_, KvError>((report, started.elapsed().as_millis() as u64))
            }
            .await;
            match r {
                Ok((report, ms)) => {
                    // Warnings (unreferenced packs) cost space, not data: they do not fail it.
                    let problems = report.problems;
                    let stats = json!({"readData": read_data, "healthy": problems.is_empty(), "problems": problems, "warnings": report.warnings, "durationMs": ms});
                    if problems.is_empty() {
                        j2.complete(p2.now(), stats).await;
                    } else {
                        let e = KvError::new(
                            ErrorCode::Conflict,
                            format!(
                                "The check of item '{item}' found {} problem(s): {}",
                                problems.len(),
                                problems
                                    .iter()
                                    .take(5)
                                    .cloned()
                                    .collect::<Vec<_>>()
                                    .join("; ")
                            ),
                        )
                        .with_inner("RepositoryDamaged");
                        svc.job_failed(p2.as_ref(), &v2, &j2, "check", &e, Some(stats))
                            .await;
                    }
                }
                Err(e) => {
                    svc.job_failed(p2.as_ref(), &v2, &j2, "check", &e, None)
                        .await
                }
            }
        });
        Ok((202, job.get()))
    }

    /// Ends a job of `operation` as Failed (keeping `stats` when given) and writes the failure
    /// to the vault's activity log.
    async fn job_failed(
        &self,
        p: &dyn ServiceHost,
        v: &VaultCtx,
        job: &JobHandle,
        operation: &str,
        e: &KvError,
        stats: Option<Value>,
    ) {
        self.log(
            p,
            v,
            activity_entry(
                None,
                &v.id,
                &format!("Microsoft.RecoveryServices/vaults/backupJobs/{operation}"),
                "Failed",
                &e.message,
                p.now(),
            ),
        )
        .await;
        match stats {
            Some(s) => job.fail_with(p.now(), e, s).await,
            None => job.fail(p.now(), e).await,
        }
    }

    pub(crate) async fn recovery_points(
        &self,
        p: &dyn ServiceHost,
        v: &VaultCtx,
        item: &str,
    ) -> Result<(u16, Value), KvError> {
        Self::load_item(p, v, item).await?;
        let item = item.to_ascii_lowercase();
        let rt = self.item_rt(v, &item);
        let _g = rt.lock.lock().await;
        let _item = self.hold_item(v, &item).await?;
        let (dek, _, _) = self.dek(p, v, &item, &rt).await?;
        let dir = RepoAt::new(self.blobs.clone(), Self::item_dir(v, &item));
        let snaps = tokio::task::spawn_blocking(move || -> Result<_, KvError> {
            let repo = Repository::open(
                dir.backend()?,
                DataKey::from_bytes(&dek).map_err(|e| io("dek", e))?,
            )
            .map_err(engine)?;
            repo.snapshots().map_err(engine)
        })
        .await
        .map_err(join)??;
        let value: Vec<Value> = snaps
            .iter()
            .rev()
            .map(|s| json!({
                "id": format!("{}/backupProtectedItems/{item}/recoveryPoints/{}", v.id, s.id),
                "name": s.id,
                "type": "Microsoft.RecoveryServices/vaults/backupProtectedItems/recoveryPoints",
                "properties": {"recoveryPointTime": rfc3339(s.time), "sourcePath": s.source, "files": s.files, "bytes": s.bytes, "parent": s.parent},
            }))
            .collect();
        Ok((200, json!({"value": value})))
    }
}
