//! Disks: created empty at a size, encrypted under their own data key (platform key, customer
//! key through a disk encryption set, or both layers), grown, re-keyed by switching sets, and
//! deleted.

use std::sync::Arc;

use kagi_cmk::{DekSlot, Kek, KeyError};
use kagi_core::time::rfc3339;
use kagi_core::{ErrorCode, KvError};
use kagi_host::{Principal, PutResource, ResourceRef, ServiceHost};
use serde_json::{Value, json};

use crate::des::{CMK, DOUBLE, SetKey, parts_of};
use crate::keys::{DiskKeys, internal};
use crate::runtime::{DiskRuntime, KeyState};
use crate::{DiskService, bad, des_ref};

/// The platform key only (the default).
pub(crate) const PMK: &str = "EncryptionAtRestWithPlatformKey";
/// Azure's largest managed disk, in GiB.
const MAX_SIZE_GB: u64 = 32_767;
const GIB: u64 = 1 << 30;

/// The key records of the disk `body`.
pub(crate) fn disk_keys<'a>(host: &'a dyn ServiceHost, body: &Value) -> Option<DiskKeys<'a>> {
    Some(DiskKeys {
        host,
        disk_id: body["id"].as_str()?.to_string(),
        unique_id: body["properties"]["uniqueId"].as_str()?.to_string(),
    })
}

/// A key failure as an Azure error: the key's own words, 403 when definite (the key or the
/// permission is gone), 503 when the key vault could not be reached.
pub(crate) fn key_error(e: KeyError) -> KvError {
    match e {
        KeyError::Access(f) | KeyError::Unopened(Some(f)) => {
            let code = match f.kind {
                kagi_cmk::FailureKind::Definite => ErrorCode::Forbidden,
                kagi_cmk::FailureKind::Transient => ErrorCode::ServiceUnavailable,
            };
            KvError::new(code, f.message).with_inner("KeyVaultAccessForbidden")
        }
        KeyError::Unopened(None) => internal("disk keys", "no wrapped data key"),
        KeyError::Other(e) => e,
    }
}

impl DiskService {
    /// `PUT`/`PATCH {disk}`.
    pub(crate) async fn put_disk(
        self: &Arc<Self>,
        caller: &Principal,
        at: ResourceRef<'_>,
        input: Value,
        patch: bool,
    ) -> Result<(u16, Value), KvError> {
        let name = at.name;
        let p = self.host.as_ref();
        let (id, _g, existing) = self.begin_put(caller, at, patch, "disk").await?;
        let props_in = &input["properties"];
        let location = input["location"]
            .as_str()
            .or_else(|| existing.as_ref().and_then(|e| e["location"].as_str()))
            .unwrap_or_default()
            .to_string();
        let mut props = existing
            .as_ref()
            .map(|e| e["properties"].clone())
            .unwrap_or_else(|| json!({}));
        // Size: given at creation, only grown later.
        let old_size = props["diskSizeBytes"].as_u64();
        let size_gb = match props_in.get("diskSizeGB") {
            Some(v) => v
                .as_u64()
                .filter(|g| (1..=MAX_SIZE_GB).contains(g))
                .ok_or_else(|| {
                    bad(
                        "InvalidParameter",
                        format!("diskSizeGB must be a whole number from 1 to {MAX_SIZE_GB}."),
                    )
                })?,
            None => match old_size {
                Some(b) => b / GIB,
                None => {
                    return Err(bad(
                        "InvalidParameter",
                        "A new empty disk needs properties.diskSizeGB.",
                    ));
                }
            },
        };
        let size = size_gb * GIB;
        if let Some(old) = old_size {
            if size < old {
                return Err(bad(
                    "InvalidParameter",
                    format!(
                        "The disk '{name}' cannot shrink from {} GiB to {size_gb} GiB.",
                        old / GIB
                    ),
                ));
            }
            if size > old && self.open_for_write(&id) {
                return Err(KvError::conflict(format!(
                    "The disk '{name}' cannot grow while it is open for writing (end its access \
                     first)."
                ))
                .with_inner("OperationNotAllowed"));
            }
        }
        if existing.is_none() {
            let option = props_in["creationData"]["createOption"]
                .as_str()
                .unwrap_or("Empty");
            if !option.eq_ignore_ascii_case("Empty") {
                return Err(bad(
                    "InvalidParameter",
                    format!(
                        "createOption '{option}' is not served by this kagi yet: create the disk \
                         with 'Empty' and write it over NBD (beginGetAccess)."
                    ),
                ));
            }
            props["creationData"] = json!({"createOption": "Empty"});
        }
        // Encryption: the type and the set.
        let enc_in = props_in.get("encryption");
        let old_set = props["encryption"]["diskEncryptionSetId"]
            .as_str()
            .map(str::to_string);
        let mut enc = props["encryption"].clone();
        if let Some(e) = enc_in {
            if let Some(t) = e.get("type") {
                enc["type"] = t.clone();
            }
            if let Some(s) = e.get("diskEncryptionSetId") {
                enc["diskEncryptionSetId"] = s.clone();
            }
        }
        let etype = enc["type"].as_str().unwrap_or(PMK).to_string();
        if ![PMK, CMK, DOUBLE].contains(&etype.as_str()) {
            return Err(bad(
                "InvalidParameter",
                format!(
                    "The encryption type '{etype}' is not valid: '{PMK}', '{CMK}' or '{DOUBLE}'."
                ),
            ));
        }
        let set_id = enc["diskEncryptionSetId"]
            .as_str()
            .filter(|s| !s.is_empty())
            .map(str::to_string);
        let set = match (&etype, &set_id) {
            (t, None) if t != PMK => {
                return Err(bad(
                    "InvalidParameter",
                    format!("Encryption type '{t}' needs encryption.diskEncryptionSetId."),
                ));
            }
            (t, Some(_)) if t == PMK => {
                return Err(bad(
                    "InvalidParameter",
                    format!(
                        "A disk encrypted with the platform key ('{PMK}') takes no disk \
                         encryption set."
                    ),
                ));
            }
            (_, Some(sid)) => Some(self.usable_set(caller, sid, &etype, &location).await?),
            _ => None,
        };
        if existing.is_some() {
            let old_type = props["encryption"]["type"].as_str().unwrap_or(PMK);
            if (old_type == DOUBLE) != (etype == DOUBLE) {
                return Err(bad(
                    "InvalidParameter",
                    "Double encryption is chosen when a disk is created: it cannot be turned on \
                     or off later.",
                ));
            }
        }
        enc["type"] = json!(etype);
        if set.is_none()
            && let Some(o) = enc.as_object_mut()
        {
            o.remove("diskEncryptionSetId");
        }
        props["encryption"] = enc;
        props["diskSizeGB"] = json!(size_gb);
        props["diskSizeBytes"] = json!(size);
        props["provisioningState"] = json!("Succeeded");
        let now = p.now();
        let new_disk = existing.is_none();
        if new_disk {
            let raw = kagi_crypto::random_bytes(16).map_err(|e| internal("rng", e))?;
            let mut b = [0u8; 16];
            b.copy_from_slice(&raw);
            props["uniqueId"] = json!(kagi_core::ids::uuid_v4(b));
            props["timeCreated"] = json!(rfc3339(now));
            props["diskState"] = json!("Unattached");
        }
        let mut body = json!({"location": location, "properties": props,
            "sku": input.get("sku").cloned().unwrap_or_else(|| json!({"name": "Standard_LRS", "tier": "Standard"}))});
        if let Some(t) = input
            .get("tags")
            .or_else(|| existing.as_ref().and_then(|e| e.get("tags")))
        {
            body["tags"] = t.clone();
        }
        let candidate = {
            let mut c = body.clone();
            c["id"] = json!(id);
            c
        };
        let keys = disk_keys(p, &candidate).ok_or_else(|| internal("disk", "no uniqueId"))?;
        if new_disk {
            // Keys first, then the family, then the resource: a crash leaves at most keys
            // and an empty family that no resource names (removed by the next create).
            let dek = keys.create(now, etype == DOUBLE).await?;
            if let Some((set, set_body)) = &set {
                self.wrap_for_set(&keys, set, set_body, &dek).await?;
            }
            let inner = keys.inner_key().await?;
            let double = inner.is_some();
            let unique = candidate["properties"]["uniqueId"]
                .as_str()
                .unwrap_or_default();
            self.store
                .create_family(unique, family_keys(dek, inner), double)
                .and_then(|f| f.create_volume("disk", size))
                .map_err(|e| internal("creating the disk", e))?;
        } else {
            let new_set = set.as_ref().map(|(s, _)| s.id.clone());
            let set_changed = new_set.as_deref().map(str::to_ascii_lowercase)
                != old_set.as_deref().map(str::to_ascii_lowercase);
            if set_changed {
                // Switching sets (or to or from one) re-wraps the data key only.
                let dek = self.open_dek(&candidate).await?;
                if let Some((set, set_body)) = &set {
                    self.wrap_for_set(&keys, set, set_body, &dek).await?;
                }
                keys.retire_customer_records(set.as_ref().map(|(s, _)| s.kid.as_str()))
                    .await?;
            }
            if let Some(old) = old_size
                && size > old
            {
                let rt = self.runtime(&candidate).await?;
                rt.family
                    .resize_volume("disk", size)
                    .map_err(|e| internal("growing the disk", e))?;
            }
        }
        let put = PutResource {
            at,
            body,
            identity: None,
        };
        let (status, stored) = p.put_resource(caller, put).await?;
        Ok((status, self.with_state(stored)))
    }

    /// The set `set_id` for a disk of type `etype` in `location`: readable by the caller, of
    /// the same region and type, its key usable by its identity now.
    async fn usable_set(
        &self,
        caller: &Principal,
        set_id: &str,
        etype: &str,
        location: &str,
    ) -> Result<(SetKey, Value), KvError> {
        let missing = || {
            KvError::new(
                ErrorCode::NotFound,
                format!("The disk encryption set '{set_id}' was not found."),
            )
            .with_inner("NotFound")
        };
        let (sub, rg, name) = parts_of(set_id).ok_or_else(missing)?;
        let body = self
            .host
            .get_resource(caller, des_ref(&sub, &rg, &name))
            .map_err(|_| missing())?;
        let body = self.set_view(body).await;
        let set = SetKey::of(&body).ok_or_else(missing)?;
        if !set.location.eq_ignore_ascii_case(location) {
            return Err(bad(
                "InvalidParameter",
                format!(
                    "The disk encryption set '{name}' is in region '{}' but the disk is in \
                     '{location}'.",
                    set.location
                ),
            ));
        }
        if set.encryption_type != etype {
            return Err(bad(
                "InvalidParameter",
                format!(
                    "The disk's encryption type '{etype}' does not match the disk encryption \
                     set's '{}'.",
                    set.encryption_type
                ),
            ));
        }
        self.validate_set_key(&set, &body).await?;
        Ok((set, body))
    }

    /// Adds a record of `dek` wrapped under `set`'s key version.
    async fn wrap_for_set(
        &self,
        keys: &DiskKeys<'_>,
        set: &SetKey,
        set_body: &Value,
        dek: &kagi_cmk::Dek,
    ) -> Result<(), KvError> {
        let kek = set.kek(self.host.as_ref(), set_body)?;
        let record = self
            .keys
            .wrap(keys, &kek, dek, self.host.now())
            .await
            .map_err(key_error)?;
        kagi_cmk::KeyOwner::add_wrapped_key(keys, record).await
    }

    /// The data key of disk `body`: through its set's key (with the set's identity) when it
    /// has one, else its platform key.
    pub(crate) async fn open_dek(&self, body: &Value) -> Result<kagi_cmk::Dek, KvError> {
        let p = self.host.as_ref();
        let keys = disk_keys(p, body).ok_or_else(|| internal("disk", "no uniqueId"))?;
        let set = match body["properties"]["encryption"]["diskEncryptionSetId"].as_str() {
            Some(sid) => {
                let set_body = p.resource(sid).ok_or_else(|| {
                    KvError::new(
                        ErrorCode::Forbidden,
                        format!("The disk encryption set '{sid}' of the disk is gone."),
                    )
                })?;
                let set_body = self.set_view(set_body).await;
                Some((
                    SetKey::of(&set_body).ok_or_else(|| internal("set", "malformed"))?,
                    set_body,
                ))
            }
            None => None,
        };
        let kek = match &set {
            Some((s, b)) => s.kek(p, b)?,
            None => Kek::Platform(kagi_cmk::KeyOwner::platform_key(&keys).await?),
        };
        // A disk with a set opens only through the set's key: its platform record is for
        // kagi's own use (the inner layer, a switch back to the platform key), not a way
        // around a revoked key.
        if let Some((s, _)) = &set {
            let records = kagi_cmk::KeyOwner::wrapped_keys(&keys).await?;
            let mut first_err = None;
            for r in records.iter().rev() {
                if matches!(r.kek, kagi_cmk::KekRef::Platform) {
                    continue;
                }
                match self.keys.unwrap(&keys, &kek, r, p.now()).await {
                    Ok(d) => return Ok(d),
                    Err(e) => {
                        first_err.get_or_insert(e);
                    }
                }
            }
            return Err(first_err.map(key_error).unwrap_or_else(|| {
                KvError::new(
                    ErrorCode::Forbidden,
                    format!(
                        "No record of the disk's data key under the key '{}'.",
                        s.kid
                    ),
                )
            }));
        }
        let opened = self
            .keys
            .data_key(
                &keys,
                &kek,
                &DekSlot::default(),
                std::time::Duration::ZERO,
                p.now(),
            )
            .await
            .map_err(key_error)?;
        Ok(opened.dek)
    }

    /// The open disk of `body`, opening its family if needed (the data key unwrapped now).
    pub(crate) async fn runtime(&self, body: &Value) -> Result<Arc<DiskRuntime>, KvError> {
        let id = body["id"].as_str().unwrap_or_default().to_ascii_lowercase();
        if let Some(rt) = self.open_disk(&id) {
            return Ok(rt);
        }
        let dek = self.open_dek(body).await?;
        let keys =
            disk_keys(self.host.as_ref(), body).ok_or_else(|| internal("disk", "no uniqueId"))?;
        let inner = keys.inner_key().await?;
        let unique = body["properties"]["uniqueId"].as_str().unwrap_or_default();
        let family = self
            .store
            .open_family(unique, family_keys(dek, inner))
            .map_err(|e| internal("opening the disk", e))?;
        let volume = family
            .volume("disk")
            .map_err(|e| internal("opening the disk", e))?;
        let rt = Arc::new(DiskRuntime {
            id: id.clone(),
            family,
            volume: Arc::new(volume),
            state: std::sync::Mutex::new(KeyState::Usable),
        });
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        Ok(open.entry(id).or_insert(rt).clone())
    }

    pub(crate) fn open_disk(&self, id: &str) -> Option<Arc<DiskRuntime>> {
        let open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        open.get(&id.to_ascii_lowercase()).cloned()
    }

    /// The disk as stored, with what only the running service knows: `diskState`
    /// (`ActiveSAS` while an access is open) and why its key cannot be used.
    pub(crate) fn with_state(&self, mut body: Value) -> Value {
        let id = body["id"].as_str().unwrap_or_default().to_string();
        if self.access_open(&id) {
            body["properties"]["diskState"] = json!("ActiveSAS");
        }
        if let Some(rt) = self.open_disk(&id) {
            match rt.key_state() {
                KeyState::Usable => {}
                KeyState::Failing { reason, .. } => {
                    body["properties"]["keyState"] =
                        json!({"state": "GracePeriod", "reason": reason});
                }
                KeyState::Revoked { reason } => {
                    body["properties"]["keyState"] = json!({"state": "Revoked", "reason": reason});
                }
            }
        }
        body
    }

    /// `DELETE {disk}`: refused while an access is open.
    pub(crate) async fn delete_disk(
        &self,
        caller: &Principal,
        at: ResourceRef<'_>,
    ) -> Result<(u16, Value), KvError> {
        let name = at.name;
        let Some((id, _g, disk)) = self.begin_delete(caller, at).await else {
            return Ok((204, Value::Null));
        };
        let p = self.host.as_ref();
        if self.access_open(&id) {
            return Err(KvError::conflict(format!(
                "The disk '{name}' has an active access: end it (endGetAccess) before deleting \
                 the disk."
            ))
            .with_inner("OperationNotAllowed"));
        }
        let st = p.delete_resource(caller, at).await?;
        // The resource (and its key records) went first: what is left of the data can no
        // longer be decrypted by anyone; then it is removed.
        self.open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id.to_ascii_lowercase());
        if let Some(unique) = disk["properties"]["uniqueId"].as_str()
            && let Err(e) = self.store.delete_family(unique)
        {
            tracing::warn!(disk = %id, error = %e, "the deleted disk's blocks were not all removed");
        }
        Ok((st, Value::Null))
    }
}

/// The store's keys of a family.
pub(crate) fn family_keys(
    dek: kagi_cmk::Dek,
    inner: Option<kagi_cmk::Dek>,
) -> kagi_disk::FamilyKeys {
    match inner {
        Some(i) => kagi_disk::FamilyKeys::with_inner(dek, i),
        None => kagi_disk::FamilyKeys::new(dek),
    }
}
