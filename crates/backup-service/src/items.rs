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

use kagi_backup::{BackupOptions, BlobBackend, KeyEntry, ObjectStoreBackend, Repository};
use kagi_core::time::rfc3339;
use kagi_core::{ErrorCode, KvError};
use kagi_crypto::data_key::DataKey;
use kagi_vault::{Platform, Principal};
use serde_json::{Value, json};
use zeroize::Zeroizing;

use crate::BackupService;
use crate::jobs::JobHandle;
use crate::keyvault::bad;
use crate::state::{Item, KeyVersionInUse, VaultState, io};
use crate::vaults::{CmkConfig, VaultCtx, activity_entry, kid_uri, pmk_label};

type Dek = Zeroizing<[u8; 32]>;

struct CachedDek {
    dek: Dek,
    at: Instant,
    kek_id: String,
}

/// What the service keeps in memory for an item.
#[derive(Default)]
pub(crate) struct ItemRuntime {
    /// Serialises jobs on the item's repository.
    lock: tokio::sync::Mutex<()>,
    dek: std::sync::Mutex<Option<CachedDek>>,
}

impl std::fmt::Debug for ItemRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ItemRuntime(..)")
    }
}

/// The key encryption key in force.
enum Kek {
    Pmk(Dek),
    Cmk {
        kid: String,
        token: String,
        who: String,
    },
}

impl Kek {
    fn id(&self) -> String {
        match self {
            Kek::Pmk(_) => "pmk".into(),
            Kek::Cmk { kid, .. } => kid.clone(),
        }
    }
}

fn entry_kek_id(e: &KeyEntry) -> String {
    match e.kek["kind"].as_str() {
        Some("cmk") => e.kek["keyId"].as_str().unwrap_or_default().to_string(),
        _ => "pmk".into(),
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

impl BackupService {
    fn item_dir(v: &VaultCtx, item: &str) -> PathBuf {
        v.dir.join("items").join(item.to_ascii_lowercase())
    }

    fn item_rt(&self, v: &VaultCtx, item: &str) -> Arc<ItemRuntime> {
        self.items
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(Self::item_dir(v, item).display().to_string())
            .or_default()
            .clone()
    }

    fn backend(dir: &Path) -> Result<Arc<dyn BlobBackend>, KvError> {
        Ok(Arc::new(
            ObjectStoreBackend::local(dir, tokio::runtime::Handle::current()).map_err(engine)?,
        ))
    }

    async fn load_item(p: &Platform, v: &VaultCtx, item: &str) -> Result<Item, KvError> {
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
        p: &Platform,
        v: &VaultCtx,
    ) -> Result<(u16, Value), KvError> {
        let s = VaultState::load(p, &v.id).await?.unwrap_or_default();
        let value: Vec<Value> = s.items.iter().map(|(n, i)| item_json(v, n, i)).collect();
        Ok((200, json!({"value": value})))
    }

    pub(crate) async fn get_item(
        &self,
        p: &Platform,
        v: &VaultCtx,
        item: &str,
    ) -> Result<(u16, Value), KvError> {
        let i = Self::load_item(p, v, item).await?;
        Ok((200, item_json(v, &item.to_ascii_lowercase(), &i)))
    }

    /// A key access failure: logged in the activity log, answered with the key and reason.
    async fn key_failure(&self, p: &Platform, v: &VaultCtx, message: String) -> KvError {
        self.log(
            p,
            v,
            activity_entry(
                None,
                &v.id,
                "Microsoft.RecoveryServices/vaults/keyAccess",
                "Failed",
                &message,
                p.now(),
            ),
        )
        .await;
        bad("UserErrorKeyVaultKeyNotAccessible", message)
    }

    /// The KEK in force (resolving a versionless key URI at most once per poll interval).
    async fn current_kek(&self, p: &Platform, v: &VaultCtx) -> Result<Kek, KvError> {
        let body = p.service_resource(&v.id).unwrap_or_else(|| v.body.clone());
        let state = VaultState::load(p, &v.id).await?.unwrap_or_default();
        let Some(cmk) = CmkConfig::of(&body) else {
            let sealed =
                kagi_core::b64::decode(&state.pmk_sealed).ok_or_else(|| io("pmk", "not base64"))?;
            let binding = state.pmk_binding.clone().unwrap_or_else(|| v.id.clone());
            let raw = p.open_platform_secret(&pmk_label(&binding), &sealed)?;
            let mut k = Zeroizing::new([0u8; 32]);
            if raw.len() != 32 {
                return Err(io("pmk", "bad length"));
            }
            k.copy_from_slice(&raw);
            return Ok(Kek::Pmk(k));
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
        let uri = kid_uri(p, &cmk.key_uri)?;
        if let Some(ver) = &uri.version {
            let kid = format!("{}/keys/{}/{ver}", uri.base, uri.name);
            return Ok(Kek::Cmk { kid, token, who });
        }
        let mut in_use = KeyVersionInUse::load(p, &v.id, &state).await?;
        // A version of another key (the key changed and a crash came before its version was
        // recorded) is never used for this one.
        if in_use.kid.as_deref().is_some_and(|k| {
            !k.to_ascii_lowercase()
                .starts_with(&format!("{}/", uri.versionless().to_ascii_lowercase()))
        }) {
            in_use = KeyVersionInUse::default();
        }
        let due = p.now() - in_use.resolved_at >= self.config.key_poll_interval.as_secs() as i64;
        if let (Some(kid), false) = (&in_use.kid, due) {
            return Ok(Kek::Cmk {
                kid: kid.clone(),
                token,
                who,
            });
        }
        let bundle = match self.vault_client.get_key(&uri, &token).await {
            Ok(b) => b,
            Err(f) => {
                let message = format!(
                    "The key '{}' could not be read by the {who}: {}",
                    cmk.key_uri,
                    f.reason()
                );
                return Err(self.key_failure(p, v, message).await);
            }
        };
        let kid = bundle["key"]["kid"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        if in_use.kid.as_deref() != Some(kid.as_str()) {
            self.log(
                p,
                v,
                activity_entry(
                    None,
                    &v.id,
                    "Microsoft.RecoveryServices/vaults/encryption/keyVersionChanged",
                    "Succeeded",
                    &format!("New version of '{}' in use: {kid}.", cmk.key_uri),
                    p.now(),
                ),
            )
            .await;
        }
        KeyVersionInUse {
            kid: Some(kid.clone()),
            resolved_at: p.now(),
        }
        .save(p, &v.id)
        .await?;
        Ok(Kek::Cmk { kid, token, who })
    }

    async fn wrap(
        &self,
        p: &Platform,
        v: &VaultCtx,
        item: &str,
        kek: &Kek,
        dek: &Dek,
    ) -> Result<KeyEntry, KvError> {
        let (kek_json, wrapped) = match kek {
            Kek::Pmk(k) => {
                let pmk = DataKey::from_bytes(k).map_err(|e| io("pmk", e))?;
                let sealed = pmk
                    .seal(&pmk_aad(&v.key_binding(p).await?, item), dek.as_ref())
                    .map_err(|e| io("pmk wrap", e))?;
                (json!({"kind": "pmk", "vault": v.id}), sealed)
            }
            Kek::Cmk { kid, token, who } => {
                let uri = kid_uri(p, kid)?;
                let (_, w) = match self.vault_client.wrap(&uri, token, dek.as_ref()).await {
                    Ok(w) => w,
                    Err(f) => {
                        let message = format!(
                            "The key '{kid}' could not wrap a data key for the {who}: {}",
                            f.reason()
                        );
                        return Err(self.key_failure(p, v, message).await);
                    }
                };
                (json!({"kind": "cmk", "keyId": kid}), w)
            }
        };
        let raw = kagi_crypto::random_bytes(16).map_err(|e| io("rng", e))?;
        Ok(KeyEntry {
            id: format!("{}-{}", p.now(), hex_of(&raw)),
            kek: kek_json,
            wrapped: kagi_core::b64::encode(&wrapped),
            created: p.now(),
        })
    }

    async fn unwrap(
        &self,
        p: &Platform,
        v: &VaultCtx,
        item: &str,
        kek: &Kek,
        e: &KeyEntry,
    ) -> Result<Dek, String> {
        let wrapped = kagi_core::b64::decode(&e.wrapped).ok_or("the key entry is damaged")?;
        let plain = match (e.kek["kind"].as_str(), kek) {
            (Some("pmk"), _) => {
                let Kek::Pmk(k) = self.pmk_of(p, v).await.map_err(|e| e.message)? else {
                    return Err("no platform key".into());
                };
                let pmk = DataKey::from_bytes(&k).map_err(|e| e.to_string())?;
                let binding = v.key_binding(p).await.map_err(|e| e.message)?;
                pmk.open(&pmk_aad(&binding, item), &wrapped)
                    .map_err(|_| "the platform key does not open this entry".to_string())?
            }
            (Some("cmk"), Kek::Cmk { token, who, .. }) => {
                let kid = entry_kek_id(e);
                let uri = kid_uri(p, &kid).map_err(|e| e.message)?;
                let bundle = self.vault_client.get_key(&uri, token).await.map_err(|f| {
                    format!(
                        "The key '{kid}' could not be read by the {who}: {}",
                        f.reason()
                    )
                })?;
                if let Some((inner, why)) = crate::keyvault::key_unusable(&bundle, p.now()) {
                    return Err(format!("The key '{kid}' cannot be used: {why} ({inner})"));
                }
                self.vault_client
                    .unwrap(&uri, token, &wrapped)
                    .await
                    .map_err(|f| {
                        format!(
                            "The key '{kid}' could not unwrap the data key for the {who}: {}",
                            f.reason()
                        )
                    })?
            }
            _ => return Err("the entry's key is unknown".into()),
        };
        let mut d = Zeroizing::new([0u8; 32]);
        if plain.len() != 32 {
            return Err("the unwrapped data key has the wrong length".into());
        }
        d.copy_from_slice(&plain);
        Ok(d)
    }

    async fn pmk_of(&self, p: &Platform, v: &VaultCtx) -> Result<Kek, KvError> {
        let state = VaultState::load(p, &v.id).await?.unwrap_or_default();
        let sealed =
            kagi_core::b64::decode(&state.pmk_sealed).ok_or_else(|| io("pmk", "not base64"))?;
        let binding = state.pmk_binding.clone().unwrap_or_else(|| v.id.clone());
        let raw = p.open_platform_secret(&pmk_label(&binding), &sealed)?;
        let mut k = Zeroizing::new([0u8; 32]);
        if raw.len() != 32 {
            return Err(io("pmk", "bad length"));
        }
        k.copy_from_slice(&raw);
        Ok(Kek::Pmk(k))
    }

    /// The item's DEK (cached, or unwrapped by the key vault), and the number of `keys/`
    /// entries written to adopt the KEK in force (0 or 1). Caller holds the item's lock.
    async fn dek(
        &self,
        p: &Platform,
        v: &VaultCtx,
        item: &str,
        rt: &ItemRuntime,
    ) -> Result<(Dek, String, u64), KvError> {
        let kek = self.current_kek(p, v).await?;
        let kek_id = kek.id();
        let dir = Self::item_dir(v, item);
        let cached = {
            let c = rt.dek.lock().unwrap_or_else(|p| p.into_inner());
            c.as_ref()
                .filter(|c| c.at.elapsed() < self.config.key_cache_lifetime)
                .map(|c| (c.dek.clone(), c.kek_id.clone(), c.at))
        };
        let cached_at = cached.as_ref().map(|c| c.2);
        let cached = cached.map(|(d, id, _)| (d, id));
        let (dek, has_current) = match cached {
            Some((d, id)) => (d, id == kek_id),
            None => {
                let d2 = dir.clone();
                let mut entries = tokio::task::spawn_blocking(move || {
                    Repository::key_entries(Self::backend(&d2)?.as_ref()).map_err(engine)
                })
                .await
                .map_err(join)??;
                let has_current = entries.iter().any(|e| entry_kek_id(e) == kek_id);
                entries.sort_by_key(|e| (entry_kek_id(e) != kek_id, -e.created));
                let mut found = None;
                let mut first_err = None;
                for e in &entries {
                    match self.unwrap(p, v, item, &kek, e).await {
                        Ok(d) => {
                            found = Some(d);
                            break;
                        }
                        Err(m) => {
                            first_err.get_or_insert(m);
                        }
                    }
                }
                match found {
                    Some(d) => (d, has_current),
                    None => {
                        let m =
                            first_err.unwrap_or_else(|| "the item has no wrapped data key".into());
                        return Err(self.key_failure(p, v, format!("{m}. Backups and restores of this vault fail until access returns; nothing stored is changed.")).await);
                    }
                }
            }
        };
        let mut written = 0;
        if !has_current {
            let entry = self.wrap(p, v, item, &kek, &dek).await?;
            let d2 = dir.clone();
            tokio::task::spawn_blocking(move || {
                Repository::put_key_entry(Self::backend(&d2)?.as_ref(), &entry).map_err(engine)
            })
            .await
            .map_err(join)??;
            written = 1;
            self.log(
                p,
                v,
                activity_entry(
                    None,
                    &v.id,
                    "Microsoft.RecoveryServices/vaults/backupProtectedItems/rewrapDataKey",
                    "Succeeded",
                    &format!("The data key of item '{item}' was wrapped under {kek_id}."),
                    p.now(),
                ),
            )
            .await;
        }
        // The lifetime counts from the last time the key vault was asked.
        let at = match (cached_at, written) {
            (Some(t), 0) => t,
            _ => Instant::now(),
        };
        *rt.dek.lock().unwrap_or_else(|p| p.into_inner()) = Some(CachedDek {
            dek: dek.clone(),
            at,
            kek_id: kek_id.clone(),
        });
        Ok((dek, kek_id, written))
    }

    /// Re-wraps an item's DEK under the KEK in force (the key-assignment job). Returns the
    /// number of `keys/` entries written.
    pub(crate) async fn rewrap_item(
        &self,
        p: &Platform,
        v: &VaultCtx,
        item: &str,
    ) -> Result<u64, KvError> {
        let rt = self.item_rt(v, item);
        let _g = rt.lock.lock().await;
        let (_, _, n) = self.dek(p, v, item, &rt).await?;
        Ok(n)
    }

    pub(crate) async fn protect(
        &self,
        p: &Platform,
        caller: &Principal,
        v: &VaultCtx,
        name: &str,
        input: Value,
    ) -> Result<(u16, Value), KvError> {
        let lock = self.vault_lock(&v.dir.display().to_string());
        let _g = lock.lock().await;
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
        let entry = match self.wrap(p, v, &name, &kek, &dek).await {
            Ok(e) => e,
            Err(e) => return Err(fail(e).await),
        };
        let dir = Self::item_dir(v, &name);
        let _ = std::fs::remove_dir_all(&dir);
        let created = tokio::task::spawn_blocking(move || -> Result<(), KvError> {
            let b = Self::backend(&dir)?;
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
        *self
            .item_rt(v, &name)
            .dek
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(CachedDek {
            dek,
            at: Instant::now(),
            kek_id: kek.id(),
        });
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
        p: &Arc<Platform>,
        v: &VaultCtx,
        item: &str,
    ) -> Result<(u16, Value), KvError> {
        let it = Self::load_item(p, v, item).await?;
        let item = item.to_ascii_lowercase();
        let job = self.jobs.start(p, &v.id, "Backup", &item, p.now()).await?;
        let (svc, p2, v2, j2) = (self.clone(), p.clone(), v.clone(), job.clone());
        tokio::spawn(async move {
            match svc.run_backup(&p2, &v2, &item, &it, &j2).await {
                Ok(stats) => j2.complete(p2.now(), stats).await,
                Err(e) => svc.job_failed(&p2, &v2, &j2, "backup", &e, None).await,
            }
        });
        Ok((202, job.get()))
    }

    pub(crate) async fn run_backup(
        &self,
        p: &Platform,
        v: &VaultCtx,
        item: &str,
        it: &Item,
        job: &Arc<JobHandle>,
    ) -> Result<Value, KvError> {
        let rt = self.item_rt(v, item);
        let _g = rt.lock.lock().await;
        let (dek, kek_id, _) = self.dek(p, v, item, &rt).await?;
        let dir = Self::item_dir(v, item);
        let source = PathBuf::from(&it.source_path);
        let now = p.now();
        let j = job.clone();
        let stats =
            tokio::task::spawn_blocking(move || -> Result<kagi_backup::BackupStats, KvError> {
                let b = Self::backend(&dir)?;
                let key = DataKey::from_bytes(&dek).map_err(|e| io("dek", e))?;
                let mut repo = Repository::open(b.clone(), key).map_err(engine)?;
                let stats = repo
                    .backup(&source, &BackupOptions::default(), now, &|pr| {
                        j.progress(pr.bytes_done, pr.bytes_total, "Bytes")
                    })
                    .map_err(engine)?;
                // BK-5: entries under earlier keys served until this backup completed.
                let entries = Repository::key_entries(b.as_ref()).map_err(engine)?;
                if entries.iter().any(|e| entry_kek_id(e) == kek_id) {
                    for e in entries.iter().filter(|e| entry_kek_id(e) != kek_id) {
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
        p: &Arc<Platform>,
        v: &VaultCtx,
        item: &str,
        input: Value,
    ) -> Result<(u16, Value), KvError> {
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
        let job = self.jobs.start(p, &v.id, "Restore", &item, p.now()).await?;
        let (svc, p2, v2, j2) = (self.clone(), p.clone(), v.clone(), job.clone());
        tokio::spawn(async move {
            let r = async {
                let rt = svc.item_rt(&v2, &item);
                let _g = rt.lock.lock().await;
                let (dek, _, _) = svc.dek(&p2, &v2, &item, &rt).await?;
                let dir = Self::item_dir(&v2, &item);
                let j = j2.clone();
                let st = tokio::task::spawn_blocking(move || -> Result<kagi_backup::RestoreStats, KvError> {
                    let b = Self::backend(&dir)?;
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
                Err(e) => svc.job_failed(&p2, &v2, &j2, "restore", &e, None).await,
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
        p: &Platform,
        v: &VaultCtx,
        item: &str,
        keep: u64,
    ) -> Result<(Vec<String>, Value), KvError> {
        let rt = self.item_rt(v, item);
        let _g = rt.lock.lock().await;
        let (dek, _, _) = self.dek(p, v, item, &rt).await?;
        let dir = Self::item_dir(v, item);
        tokio::task::spawn_blocking(move || -> Result<(Vec<String>, Value), KvError> {
            let mut repo = Repository::open(
                Self::backend(&dir)?,
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
        p: &Arc<Platform>,
        v: &VaultCtx,
        item: &str,
        input: &Value,
    ) -> Result<(u16, Value), KvError> {
        Self::load_item(p, v, item).await?;
        let read_data = input["readData"].as_bool().unwrap_or(false);
        let item = item.to_ascii_lowercase();
        let job = self.jobs.start(p, &v.id, "Check", &item, p.now()).await?;
        let (svc, p2, v2, j2) = (self.clone(), p.clone(), v.clone(), job.clone());
        tokio::spawn(async move {
            let r = async {
                let rt = svc.item_rt(&v2, &item);
                let _g = rt.lock.lock().await;
                let (dek, _, _) = svc.dek(&p2, &v2, &item, &rt).await?;
                let dir = Self::item_dir(&v2, &item);
                let started = Instant::now();
                let report = tokio::task::spawn_blocking(
                    move || -> Result<kagi_backup::CheckReport, KvError> {
                        let repo = Repository::open(
                            Self::backend(&dir)?,
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
                        svc.job_failed(&p2, &v2, &j2, "check", &e, Some(stats))
                            .await;
                    }
                }
                Err(e) => svc.job_failed(&p2, &v2, &j2, "check", &e, None).await,
            }
        });
        Ok((202, job.get()))
    }

    /// Ends a job of `operation` as Failed (keeping `stats` when given) and writes the failure
    /// to the vault's activity log.
    async fn job_failed(
        &self,
        p: &Platform,
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
        p: &Platform,
        v: &VaultCtx,
        item: &str,
    ) -> Result<(u16, Value), KvError> {
        Self::load_item(p, v, item).await?;
        let item = item.to_ascii_lowercase();
        let rt = self.item_rt(v, &item);
        let _g = rt.lock.lock().await;
        let (dek, _, _) = self.dek(p, v, &item, &rt).await?;
        let dir = Self::item_dir(v, &item);
        let snaps = tokio::task::spawn_blocking(move || -> Result<_, KvError> {
            let repo = Repository::open(
                Self::backend(&dir)?,
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

fn hex_of(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
