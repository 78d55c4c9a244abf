//! The secrets data plane: set (each set adds a version), get, update, list, soft delete,
//! recover, purge, backup and restore.
//!
//! Values are sealed under the root key (purpose `secret`, AAD
//! `kagi/v1/secret/{vault}/{name, lower-case}/{version}`) before they reach the store, and stay
//! sealed in memory: a value is opened only to answer a get or to build a backup, and the
//! plaintext lives in [`SecretValue`]/`Zeroizing` buffers that are wiped when dropped. Values
//! never appear in logs, errors or `Debug` output.

use std::sync::{Arc, RwLockReadGuard, RwLockWriteGuard};

use kagi_core::access::{DataAction, SecretPermission};
use kagi_core::key::BackupBlob;
use kagi_core::paging;
use kagi_core::secret::{
    SecretSetParameters, SecretUpdateParameters, SecretValue, SecretVersionInfo,
    deleted_secret_not_found, secret_not_found,
};
use kagi_core::time::DAY;
use kagi_core::{ErrorCode, KeyVersion, KvError, ObjectName, VaultName};
use kagi_crypto::SealPurpose;
use kagi_identity::Principal;
use kagi_store::{SecretRecord, SecretVersionRecord, StoreError, VaultRecord};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::keys::ListQuery;
use crate::object_backup;
use crate::state::{SecretEntry, SecretMap, VaultState};
use crate::{Platform, internal};

impl SecretEntry {
    fn from_record(r: SecretRecord) -> Self {
        Self {
            name: r.name,
            deleted_at: r.deleted_at,
            purge_at: r.purge_at,
            versions: r.versions.into_iter().map(Arc::new).collect(),
        }
    }

    fn latest(&self) -> Option<&Arc<SecretVersionRecord>> {
        self.versions.last()
    }

    fn pick(&self, version: Option<&str>) -> Result<Arc<SecretVersionRecord>, KvError> {
        match version.filter(|v| !v.is_empty()) {
            None => self.latest().cloned(),
            Some(v) => {
                let v = KeyVersion::parse(v)?;
                self.versions.iter().find(|e| e.version == v).cloned()
            }
        }
        .ok_or_else(|| secret_not_found(self.name.as_str(), version))
    }
}

impl VaultState {
    /// Adds the vault's stored secrets (at start-up).
    pub(crate) fn with_secrets(self, secrets: Vec<SecretRecord>) -> Self {
        *self.secrets_mut() = secrets
            .into_iter()
            .map(|s| (s.name.folded(), SecretEntry::from_record(s)))
            .collect();
        self
    }

    fn secrets(&self) -> RwLockReadGuard<'_, SecretMap> {
        self.secrets.read().unwrap_or_else(|p| p.into_inner())
    }

    fn secrets_mut(&self) -> RwLockWriteGuard<'_, SecretMap> {
        self.secrets.write().unwrap_or_else(|p| p.into_inner())
    }

    fn secret(&self, name: &ObjectName) -> Option<SecretEntry> {
        self.secrets().get(&name.folded()).cloned()
    }
}

/// The AAD that binds a sealed value to its place: a sealed value copied to another vault,
/// secret or version does not open.
pub(crate) fn value_aad(vault: &VaultName, name: &ObjectName, version: &KeyVersion) -> Vec<u8> {
    format!("kagi/v1/secret/{}/{}/{}", vault, name.folded(), version).into_bytes()
}

/// One version in a secret backup blob (sealed; never seen by clients in the clear).
#[derive(Serialize, Deserialize)]
struct BackupVersion {
    version: String,
    seq: i64,
    info: SecretVersionInfo,
    value: SecretValue,
}

fn random_version() -> Result<KeyVersion, KvError> {
    kagi_crypto::random_array()
        .map(KeyVersion::from_random)
        .map_err(|e| internal("rng", e))
}

fn store_error(context: &str, e: StoreError) -> KvError {
    internal(context, e)
}

/// Renders secrets for one vault.
struct SecretView<'a> {
    uri: String,
    record: &'a VaultRecord,
}

impl SecretView<'_> {
    fn id(&self, name: &str, version: Option<&str>) -> String {
        match version {
            Some(v) => format!("{}secrets/{name}/{v}", self.uri),
            None => format!("{}secrets/{name}", self.uri),
        }
    }

    fn attributes(&self, info: &SecretVersionInfo) -> Value {
        let a = &info.attributes;
        let mut m = Map::new();
        m.insert("enabled".into(), json!(a.enabled));
        if let Some(nbf) = a.nbf {
            m.insert("nbf".into(), json!(nbf));
        }
        if let Some(exp) = a.exp {
            m.insert("exp".into(), json!(exp));
        }
        m.insert("created".into(), json!(a.created));
        m.insert("updated".into(), json!(a.updated));
        m.insert(
            "recoveryLevel".into(),
            json!(self.record.properties.recovery_level()),
        );
        m.insert(
            "recoverableDays".into(),
            json!(self.record.properties.soft_delete_retention_in_days),
        );
        Value::Object(m)
    }

    /// `{id, attributes, contentType?, tags?}`.
    fn base(&self, id: String, info: &SecretVersionInfo) -> Value {
        let mut v = json!({"id": id, "attributes": self.attributes(info)});
        if let Some(ct) = &info.content_type {
            v["contentType"] = json!(ct);
        }
        if !info.tags.is_empty() {
            v["tags"] = json!(info.tags);
        }
        v
    }

    /// A SecretBundle, with the value when given.
    fn bundle(&self, name: &str, e: &SecretVersionRecord, value: Option<&SecretValue>) -> Value {
        let mut v = self.base(self.id(name, Some(e.version.as_str())), &e.info);
        if let Some(value) = value {
            v["value"] = json!(value.as_str());
        }
        v
    }

    fn deleted_fields(&self, mut v: Value, s: &SecretEntry) -> Value {
        let deleted = s.deleted_at.unwrap_or_default();
        v["recoveryId"] = json!(format!("{}deletedsecrets/{}", self.uri, s.name));
        v["deletedDate"] = json!(deleted);
        v["scheduledPurgeDate"] = json!(s.purge_at.unwrap_or(
            deleted + i64::from(self.record.properties.soft_delete_retention_in_days) * DAY
        ));
        v
    }

    /// A DeletedSecretBundle (current version, no value).
    fn deleted_bundle(&self, s: &SecretEntry) -> Value {
        let v = s
            .latest()
            .map(|e| self.bundle(s.name.as_str(), e, None))
            .unwrap_or_else(|| json!({"id": self.id(s.name.as_str(), None)}));
        self.deleted_fields(v, s)
    }

    /// A SecretItem for `GET /secrets` (versionless id, current version's attributes).
    fn item(&self, s: &SecretEntry) -> Value {
        let id = self.id(s.name.as_str(), None);
        match s.latest() {
            Some(e) => self.base(id, &e.info),
            None => json!({ "id": id }),
        }
    }

    /// A SecretItem for `GET /secrets/{name}/versions`.
    fn version_item(&self, name: &str, e: &SecretVersionRecord) -> Value {
        self.base(self.id(name, Some(e.version.as_str())), &e.info)
    }

    /// A DeletedSecretItem.
    fn deleted_item(&self, s: &SecretEntry) -> Value {
        let v = self.item(s);
        self.deleted_fields(v, s)
    }
}

impl Platform {
    /// The live vault named by the host, after checking that `caller` may do `permission`.
    fn secret_vault(
        &self,
        caller: &Principal,
        vault: &str,
        permission: SecretPermission,
        secret: Option<&str>,
    ) -> Result<(Arc<VaultState>, VaultRecord), KvError> {
        let name = VaultName::parse(vault)
            .map_err(|_| KvError::new(ErrorCode::VaultNotFound, "The vault was not found."))?;
        let state = self.usable_vault(&name)?;
        let record = state.record();
        // The secret's own scope, so that role assignments on one secret count.
        self.authorize_object(
            caller,
            &record,
            DataAction::Secret(permission),
            secret.map(|s| ("secrets", s)),
        )?;
        Ok((state, record))
    }

    fn secret_view<'a>(&self, record: &'a VaultRecord) -> SecretView<'a> {
        SecretView {
            uri: self.config.vault_uri(&record.name),
            record,
        }
    }

    fn live_secret(state: &VaultState, name: &ObjectName) -> Result<SecretEntry, KvError> {
        match state.secret(name) {
            Some(s) if s.deleted_at.is_none() => Ok(s),
            _ => Err(secret_not_found(name.as_str(), None)),
        }
    }

    fn deleted_secret(state: &VaultState, name: &ObjectName) -> Result<SecretEntry, KvError> {
        match state.secret(name) {
            Some(s) if s.deleted_at.is_some() => Ok(s),
            _ => Err(deleted_secret_not_found(name.as_str())),
        }
    }

    fn seal_value(
        &self,
        vault: &VaultName,
        name: &ObjectName,
        version: &KeyVersion,
        value: &SecretValue,
    ) -> Result<Vec<u8>, KvError> {
        self.root
            .seal(
                SealPurpose::Secret,
                &value_aad(vault, name, version),
                value.as_bytes(),
            )
            .map_err(|e| internal("seal secret value", e))
    }

    fn open_value(
        &self,
        vault: &VaultName,
        name: &ObjectName,
        e: &SecretVersionRecord,
    ) -> Result<SecretValue, KvError> {
        let plain = self
            .root
            .open(
                SealPurpose::Secret,
                &value_aad(vault, name, &e.version),
                &e.sealed_value,
            )
            .map_err(|err| internal("unseal secret value", err))?;
        SecretValue::from_utf8(&plain)
            .ok_or_else(|| internal("unseal secret value", "stored value is not UTF-8"))
    }

    fn secrets_next_link(
        &self,
        record: &VaultRecord,
        path: &str,
        q: &ListQuery,
        token: Option<String>,
        size: usize,
    ) -> Value {
        match token {
            Some(t) => json!(format!(
                "{}{path}?api-version={}&$skiptoken={t}&maxresults={size}",
                self.config.vault_uri(&record.name),
                q.api_version
            )),
            None => Value::Null,
        }
    }

    /// `PUT /secrets/{name}`: adds a version (creating the secret on first set) and answers
    /// its SecretBundle with the value. A soft-deleted name is 409
    /// `ObjectIsDeletedButRecoverable`.
    pub async fn set_secret(
        &self,
        caller: &Principal,
        vault: &str,
        name: &str,
        params: SecretSetParameters,
    ) -> Result<Value, KvError> {
        let (state, record) =
            self.secret_vault(caller, vault, SecretPermission::Set, Some(name))?;
        let name = ObjectName::parse(name)?;
        let (value, info) = params.into_version(self.clock.now())?;
        let version = random_version()?;
        let sealed = self.seal_value(&record.name, &name, &version, &value)?;
        let _w = state.write.lock().await;
        let existing = state.secret(&name);
        if let Some(s) = &existing
            && s.deleted_at.is_some()
        {
            return Err(KvError::deleted_but_recoverable("Secret", name.as_str()));
        }
        let seq = existing
            .as_ref()
            .and_then(|s| s.latest().map(|v| v.seq))
            .unwrap_or(0)
            + 1;
        let rec = Arc::new(SecretVersionRecord {
            version,
            seq,
            info,
            sealed_value: sealed,
        });
        self.store
            .add_secret_version(&record.name, &name, &rec)
            .await
            .map_err(|e| store_error("add secret version", e))?;
        let shown = existing
            .as_ref()
            .map_or_else(|| name.clone(), |s| s.name.clone());
        state
            .secrets_mut()
            .entry(name.folded())
            .or_insert_with(|| SecretEntry {
                name: shown.clone(),
                deleted_at: None,
                purge_at: None,
                versions: Vec::new(),
            })
            .versions
            .push(rec.clone());
        tracing::info!(vault = %record.name, secret = %shown, version = %rec.version, "secret version created");
        drop(_w);
        self.after_change(&state, kagi_core::event::ObjectType::Secret, &name)
            .await;
        Ok(self
            .secret_view(&record)
            .bundle(shown.as_str(), &rec, Some(&value)))
    }

    /// `GET /secrets/{name}/{version?}`: the value of a version (the newest without one).
    /// Refused with 403 when the version is disabled (`SecretDisabled`), not yet valid
    /// (`SecretNotYetValid`) or expired (`SecretExpired`).
    pub fn get_secret(
        &self,
        caller: &Principal,
        vault: &str,
        name: &str,
        version: Option<&str>,
    ) -> Result<Value, KvError> {
        let (state, record) =
            self.secret_vault(caller, vault, SecretPermission::Get, Some(name))?;
        let name = ObjectName::parse(name)?;
        let s = Self::live_secret(&state, &name)?;
        let v = s.pick(version)?;
        v.info.attributes.check_readable(self.clock.now())?;
        let value = self.open_value(&record.name, &name, &v)?;
        Ok(self
            .secret_view(&record)
            .bundle(s.name.as_str(), &v, Some(&value)))
    }

    /// `PATCH /secrets/{name}/{version?}`: content type, attributes and tags of a version;
    /// answers the bundle without the value.
    pub async fn update_secret(
        &self,
        caller: &Principal,
        vault: &str,
        name: &str,
        version: Option<&str>,
        params: SecretUpdateParameters,
    ) -> Result<Value, KvError> {
        let (state, record) =
            self.secret_vault(caller, vault, SecretPermission::Set, Some(name))?;
        let name = ObjectName::parse(name)?;
        let _w = state.write.lock().await;
        let s = Self::live_secret(&state, &name)?;
        let v = s.pick(version)?;
        let info = params.apply(v.info.clone(), self.clock.now())?;
        self.store
            .update_secret_version(&record.name, &name, &v.version, &info)
            .await
            .map_err(|e| store_error("update secret", e))?;
        let updated = Arc::new(SecretVersionRecord {
            version: v.version.clone(),
            seq: v.seq,
            info,
            sealed_value: v.sealed_value.clone(),
        });
        if let Some(entry) = state.secrets_mut().get_mut(&name.folded())
            && let Some(slot) = entry
                .versions
                .iter_mut()
                .find(|e| e.version == updated.version)
        {
            *slot = updated.clone();
        }
        tracing::info!(vault = %record.name, secret = %s.name, version = %updated.version, "secret version updated");
        drop(_w);
        self.after_change(&state, kagi_core::event::ObjectType::Secret, &name)
            .await;
        Ok(self
            .secret_view(&record)
            .bundle(s.name.as_str(), &updated, None))
    }

    /// `GET /secrets`: live secrets, versionless ids, no values.
    pub fn list_secrets(
        &self,
        caller: &Principal,
        vault: &str,
        q: &ListQuery,
    ) -> Result<Value, KvError> {
        let (state, record) = self.secret_vault(caller, vault, SecretPermission::List, None)?;
        self.page_secrets(&state, &record, q, false)
    }

    /// `GET /deletedsecrets`.
    pub fn list_deleted_secrets(
        &self,
        caller: &Principal,
        vault: &str,
        q: &ListQuery,
    ) -> Result<Value, KvError> {
        let (state, record) = self.secret_vault(caller, vault, SecretPermission::List, None)?;
        self.page_secrets(&state, &record, q, true)
    }

    fn page_secrets(
        &self,
        state: &VaultState,
        record: &VaultRecord,
        q: &ListQuery,
        deleted: bool,
    ) -> Result<Value, KvError> {
        let size = paging::page_size(q.maxresults.as_deref())?;
        let after = q
            .skiptoken
            .as_deref()
            .map(paging::parse_skip_token)
            .transpose()?;
        let chosen: Vec<SecretEntry> = state
            .secrets()
            .values()
            .filter(|s| s.deleted_at.is_some() == deleted)
            .cloned()
            .collect();
        let (page, token) = paging::page(chosen, |s| s.name.folded(), after.as_deref(), size);
        let view = self.secret_view(record);
        let (items, path): (Vec<Value>, &str) = if deleted {
            (
                page.iter().map(|s| view.deleted_item(s)).collect(),
                "deletedsecrets",
            )
        } else {
            (page.iter().map(|s| view.item(s)).collect(), "secrets")
        };
        Ok(json!({
            "value": items,
            "nextLink": self.secrets_next_link(record, path, q, token, size),
        }))
    }

    /// `GET /secrets/{name}/versions`: every version, versioned ids, no values.
    pub fn list_secret_versions(
        &self,
        caller: &Principal,
        vault: &str,
        name: &str,
        q: &ListQuery,
    ) -> Result<Value, KvError> {
        let (state, record) =
            self.secret_vault(caller, vault, SecretPermission::List, Some(name))?;
        let name = ObjectName::parse(name)?;
        let size = paging::page_size(q.maxresults.as_deref())?;
        // Azure answers a name with no live secret with an empty list, not 404.
        let Ok(s) = Self::live_secret(&state, &name) else {
            return Ok(json!({"value": [], "nextLink": null}));
        };
        let after = q
            .skiptoken
            .as_deref()
            .map(paging::parse_skip_token)
            .transpose()?;
        let (page, token) = paging::page(
            s.versions.clone(),
            |v| v.version.to_string(),
            after.as_deref(),
            size,
        );
        let view = self.secret_view(&record);
        Ok(json!({
            "value": page.iter().map(|v| view.version_item(s.name.as_str(), v)).collect::<Vec<_>>(),
            "nextLink": self.secrets_next_link(&record, &format!("secrets/{}/versions", s.name), q, token, size),
        }))
    }

    /// `DELETE /secrets/{name}`: soft delete of every version for the vault's retention.
    pub async fn delete_secret(
        &self,
        caller: &Principal,
        vault: &str,
        name: &str,
    ) -> Result<Value, KvError> {
        let (state, record) =
            self.secret_vault(caller, vault, SecretPermission::Delete, Some(name))?;
        let name = ObjectName::parse(name)?;
        let _w = state.write.lock().await;
        let s = Self::live_secret(&state, &name)?;
        self.check_not_locked(
            &crate::directory::object_scope(&record, Some(("secrets", name.as_str()))),
            "delete",
        )?;
        let now = self.clock.now();
        let purge_at = now + i64::from(record.properties.soft_delete_retention_in_days) * DAY;
        self.store
            .set_secret_deleted(&record.name, &name, Some((now, purge_at)))
            .await
            .map_err(|e| store_error("delete secret", e))?;
        let mut deleted = s;
        deleted.deleted_at = Some(now);
        deleted.purge_at = Some(purge_at);
        state.secrets_mut().insert(name.folded(), deleted.clone());
        tracing::info!(vault = %record.name, secret = %deleted.name, "secret soft-deleted");
        drop(_w);
        self.after_change(&state, kagi_core::event::ObjectType::Secret, &name)
            .await;
        Ok(self.secret_view(&record).deleted_bundle(&deleted))
    }

    /// `GET /deletedsecrets/{name}`.
    pub fn get_deleted_secret(
        &self,
        caller: &Principal,
        vault: &str,
        name: &str,
    ) -> Result<Value, KvError> {
        let (state, record) =
            self.secret_vault(caller, vault, SecretPermission::Get, Some(name))?;
        let name = ObjectName::parse(name)?;
        let s = Self::deleted_secret(&state, &name)?;
        Ok(self.secret_view(&record).deleted_bundle(&s))
    }

    /// `POST /deletedsecrets/{name}/recover`: live again, every version; answers the current
    /// version's bundle without the value.
    pub async fn recover_deleted_secret(
        &self,
        caller: &Principal,
        vault: &str,
        name: &str,
    ) -> Result<Value, KvError> {
        let (state, record) =
            self.secret_vault(caller, vault, SecretPermission::Recover, Some(name))?;
        let name = ObjectName::parse(name)?;
        let _w = state.write.lock().await;
        let mut s = Self::deleted_secret(&state, &name)?;
        self.store
            .set_secret_deleted(&record.name, &name, None)
            .await
            .map_err(|e| store_error("recover secret", e))?;
        s.deleted_at = None;
        s.purge_at = None;
        state.secrets_mut().insert(name.folded(), s.clone());
        tracing::info!(vault = %record.name, secret = %s.name, "secret recovered");
        drop(_w);
        self.after_change(&state, kagi_core::event::ObjectType::Secret, &name)
            .await;
        let latest = s
            .latest()
            .ok_or_else(|| internal("recover secret", "secret without versions"))?;
        Ok(self
            .secret_view(&record)
            .bundle(s.name.as_str(), latest, None))
    }

    /// `DELETE /deletedsecrets/{name}`: permanent removal; refused (403) while purge protection
    /// holds the secret until its retention ends.
    pub async fn purge_deleted_secret(
        &self,
        caller: &Principal,
        vault: &str,
        name: &str,
    ) -> Result<(), KvError> {
        let (state, record) =
            self.secret_vault(caller, vault, SecretPermission::Purge, Some(name))?;
        let name = ObjectName::parse(name)?;
        let _w = state.write.lock().await;
        let s = Self::deleted_secret(&state, &name)?;
        self.check_not_locked(
            &crate::directory::object_scope(&record, Some(("secrets", name.as_str()))),
            "delete",
        )?;
        if record.properties.enable_purge_protection
            && s.purge_at.is_some_and(|t| self.clock.now() < t)
        {
            return Err(KvError::forbidden(format!(
                "Operation \"purge\" is not allowed because purge protection is enabled for this \
                 vault. Key Vault service will automatically purge it after the retention \
                 period has passed ({}).",
                kagi_core::time::rfc3339(s.purge_at.unwrap_or_default())
            ))
            .with_inner("PurgeProtectionEnabled"));
        }
        self.store
            .purge_secret(&record.name, &name)
            .await
            .map_err(|e| store_error("purge secret", e))?;
        state.secrets_mut().remove(&name.folded());
        tracing::info!(vault = %record.name, secret = %s.name, "secret purged");
        Ok(())
    }

    /// Purges the vault's deleted secrets whose retention has ended.
    pub(crate) async fn purge_expired_secrets(
        &self,
        state: &VaultState,
        now: i64,
    ) -> Result<usize, KvError> {
        let record = state.record();
        let due: Vec<ObjectName> = state
            .secrets()
            .values()
            .filter(|s| s.purge_at.is_some_and(|t| t <= now))
            .map(|s| s.name.clone())
            .collect();
        let mut purged = 0;
        for name in &due {
            let _w = state.write.lock().await;
            // Re-check under the lock: a recover may have run since the scan.
            if !state
                .secrets()
                .get(&name.folded())
                .is_some_and(|k| k.deleted_at.is_some() && k.purge_at.is_some_and(|t| t <= now))
            {
                continue;
            }
            purged += 1;
            self.store
                .purge_secret(&record.name, name)
                .await
                .map_err(|e| store_error("purge expired secret", e))?;
            state.secrets_mut().remove(&name.folded());
            tracing::info!(vault = %record.name, secret = %name, "deleted secret purged after retention");
        }
        Ok(purged)
    }

    /// `POST /secrets/{name}/backup`: every version with its value, sealed so that only a kagi
    /// holding the same root key can restore it, and only into a vault of this one's
    /// subscription, tenant and location.
    pub fn backup_secret(
        &self,
        caller: &Principal,
        vault: &str,
        name: &str,
    ) -> Result<BackupBlob, KvError> {
        let (state, record) =
            self.secret_vault(caller, vault, SecretPermission::Backup, Some(name))?;
        let name = ObjectName::parse(name)?;
        let s = Self::live_secret(&state, &name)?;
        let mut versions = Vec::with_capacity(s.versions.len());
        for v in &s.versions {
            versions.push(BackupVersion {
                version: v.version.to_string(),
                seq: v.seq,
                info: v.info.clone(),
                value: self.open_value(&record.name, &name, v)?,
            });
        }
        let blob =
            self.seal_object_backup(&object_backup::SECRETS, &record, s.name.as_str(), versions)?;
        tracing::info!(vault = %record.name, secret = %s.name, "secret backed up");
        Ok(blob)
    }

    /// `POST /secrets/restore`: a backup taken in this vault's subscription, tenant and
    /// location, into a vault where the name is free (every version, re-sealed for this vault).
    /// Answers the current version's bundle without the value.
    pub async fn restore_secret(
        &self,
        caller: &Principal,
        vault: &str,
        blob: BackupBlob,
    ) -> Result<Value, KvError> {
        let (state, record) = self.secret_vault(caller, vault, SecretPermission::Restore, None)?;
        let (name, payload): (_, Vec<BackupVersion>) =
            self.open_object_backup(&object_backup::SECRETS, caller, &record, &blob)?;
        let mut versions = Vec::with_capacity(payload.len());
        for v in &payload {
            let version = KeyVersion::parse(&v.version).map_err(|_| object_backup::invalid())?;
            let sealed_value = self.seal_value(&record.name, &name, &version, &v.value)?;
            versions.push(SecretVersionRecord {
                version,
                seq: v.seq,
                info: v.info.clone(),
                sealed_value,
            });
        }
        versions.sort_by_key(|v| v.seq);
        let _w = state.write.lock().await;
        match state.secret(&name) {
            Some(s) if s.deleted_at.is_some() => {
                return Err(KvError::deleted_but_recoverable("Secret", name.as_str()));
            }
            Some(_) => {
                return Err(KvError::conflict(format!(
                    "Secret {name} already exists in this vault; restore needs a name that is \
                     not in use."
                )));
            }
            None => {}
        }
        let rec = SecretRecord {
            name: name.clone(),
            deleted_at: None,
            purge_at: None,
            versions,
        };
        self.store
            .insert_secret(&record.name, &rec)
            .await
            .map_err(|e| match e {
                StoreError::Conflict(m) => KvError::conflict(m),
                e => store_error("restore secret", e),
            })?;
        let entry = SecretEntry::from_record(rec);
        state.secrets_mut().insert(name.folded(), entry.clone());
        tracing::info!(vault = %record.name, secret = %name, "secret restored");
        drop(_w);
        self.after_change(&state, kagi_core::event::ObjectType::Secret, &name)
            .await;
        let latest = entry.latest().ok_or_else(object_backup::invalid)?;
        Ok(self
            .secret_view(&record)
            .bundle(name.as_str(), latest, None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aad_binds_place() {
        let v = VaultName::parse("vault1").unwrap();
        let n = ObjectName::parse("My-Secret").unwrap();
        let ver = KeyVersion::from_random([0xab; 16]);
        assert_eq!(
            value_aad(&v, &n, &ver),
            format!("kagi/v1/secret/vault1/my-secret/{ver}").into_bytes()
        );
    }
}
