//! Disks: created empty at a size, encrypted under their own data key (platform key, customer
//! key through a disk encryption set, or both layers), grown, re-keyed by switching sets, and
//! deleted.

use std::sync::Arc;

use kagi_cmk::{DekSlot, Kek};
use kagi_core::time::rfc3339;
use kagi_core::{ErrorCode, KvError};
use kagi_host::{Principal, PutResource, ResourceRef};
use serde_json::{Value, json};

use crate::des::{CMK, DOUBLE, SetKey};
use crate::import::ImportSource;
use crate::keys::{DiskKeys, Place, blocking, disk_keys, internal, key_error};
use crate::runtime::{DiskRuntime, KeyState};
use crate::{DiskService, bad, des_ref};

/// The platform key only (the default).
pub(crate) const PMK: &str = "EncryptionAtRestWithPlatformKey";
/// Azure's largest managed disk, in GiB.
const MAX_SIZE_GB: u64 = 32_767;
const GIB: u64 = 1 << 30;

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
        // A new disk's source: none (Empty), or a disk or snapshot to copy.
        let source = match &existing {
            Some(_) => None,
            None => {
                self.creation_source(caller, &props_in["creationData"])
                    .await?
            }
        };
        let location = input["location"]
            .as_str()
            .or_else(|| existing.as_ref().and_then(|e| e["location"].as_str()))
            .unwrap_or_default()
            .to_string();
        if location.is_empty() {
            return Err(bad("LocationRequired", "The disk needs a location."));
        }
        let mut props = existing
            .as_ref()
            .map(|e| e["properties"].clone())
            .unwrap_or_else(|| json!({}));
        // `Upload`: an empty disk of exactly the size to be uploaded (rounded up to a 4 KiB
        // block), ready for a write access (`ReadyToUpload`, `ActiveUpload` while open).
        let upload = match &existing {
            Some(_) => None,
            None => upload_size(&props_in["creationData"])?,
        };
        // `Import`: a raw image streamed in from creationData.sourceUri.
        let import = match &existing {
            Some(_) => None,
            None => ImportSource::of(&props_in["creationData"])?,
        };
        let import_bytes = match (&import, props_in.get("diskSizeGB")) {
            (Some(src), None) => Some(self.import_size(src).await?),
            _ => None,
        };
        // Size: given at creation, only grown later.
        let old_size = props["diskSizeBytes"].as_u64().or(upload);
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
            None => match old_size
                .or(import_bytes)
                .or_else(|| source.as_ref().map(|s| s.size))
            {
                Some(b) => b.div_ceil(GIB),
                None => {
                    return Err(bad(
                        "InvalidParameter",
                        "A new empty disk needs properties.diskSizeGB.",
                    ));
                }
            },
        };
        let size = match (upload, props_in.get("diskSizeGB")) {
            (Some(bytes), None) => bytes,
            _ => size_gb * GIB,
        };
        if let Some(src) = &source
            && size < src.size
        {
            return Err(bad(
                "InvalidParameter",
                format!(
                    "diskSizeGB {size_gb} is smaller than the source '{}' ({} bytes).",
                    src.id, src.size
                ),
            ));
        }
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
            props["creationData"] = match &source {
                None if upload.is_some() => json!({"createOption": "Upload",
                    "uploadSizeBytes": props_in["creationData"]["uploadSizeBytes"]}),
                None => match &import {
                    Some(src) => json!({"createOption": "Import", "sourceUri": src.uri()}),
                    None => json!({"createOption": "Empty"}),
                },
                Some(src) if src.body["type"] == json!(crate::IMAGE_TYPE) => {
                    json!({"createOption": "FromImage", "imageReference": {"id": src.id}})
                }
                Some(src) => json!({"createOption": "Copy", "sourceResourceId": src.id,
                    "sourceUniqueId": src.body["properties"]["uniqueId"]}),
            };
        }
        // Encryption: the type and the set.
        let enc_in = props_in.get("encryption");
        let old_set = props["encryption"]["diskEncryptionSetId"]
            .as_str()
            .map(str::to_string);
        let mut enc = props["encryption"].clone();
        if let Some(e) = enc_in {
            match e.get("type") {
                Some(t) => enc["type"] = t.clone(),
                // A new set named without a type: the type is the new set's.
                None if e.get("diskEncryptionSetId").is_some() => {
                    if let Some(o) = enc.as_object_mut() {
                        o.remove("type");
                    }
                }
                None => {}
            }
            if let Some(s) = e.get("diskEncryptionSetId") {
                enc["diskEncryptionSetId"] = s.clone();
            }
        }
        // An unchanged set is not checked again (a PATCH of tags or size must not depend on
        // the key vault); a new one is.
        let unchanged = existing.is_some()
            && enc["diskEncryptionSetId"]
                .as_str()
                .map(str::to_ascii_lowercase)
                == old_set.as_deref().map(str::to_ascii_lowercase);
        let (etype, set) = self
            .encryption_of(caller, &enc, &location, !unchanged)
            .await?;
        if existing.is_some() {
            let old_type = props["encryption"]["type"].as_str().unwrap_or(PMK);
            // DK-7: a disk with incremental snapshots keeps its customer-managed key.
            let unique = props["uniqueId"].as_str().unwrap_or_default();
            if old_type != PMK && etype == PMK && self.has_incremental_snapshots(unique) {
                return Err(bad(
                    "InvalidParameter",
                    format!(
                        "Customer-managed keys cannot be turned off on the disk '{name}': it has \
                         incremental snapshots."
                    ),
                ));
            }
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
            props["uniqueId"] = json!(new_unique_id()?);
            props["timeCreated"] = json!(rfc3339(now));
            props["diskState"] = json!(if upload.is_some() {
                "ReadyToUpload"
            } else {
                "Unattached"
            });
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
        // After a switch of key: the key whose records alone stay once the resource is stored.
        let mut retire: Option<Option<String>> = None;
        let mut made = None;
        if new_disk {
            // Keys first, then the data, then the resource; a failure on the way removes
            // what was made (a crash leaves at most keys and data that no resource names).
            let unique = candidate["properties"]["uniqueId"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            let double = etype == DOUBLE;
            match self
                .make_disk_data(
                    &keys,
                    source.as_ref(),
                    import.as_ref(),
                    &unique,
                    double,
                    set.as_ref(),
                    size,
                    now,
                )
                .await
            {
                Ok(m) => made = Some(m),
                Err(e) => {
                    self.undo_create(&id, None).await;
                    return Err(e);
                }
            }
        } else {
            let new_set = set.as_ref().map(|(s, _)| s.id.clone());
            let set_changed = new_set.as_deref().map(str::to_ascii_lowercase)
                != old_set.as_deref().map(str::to_ascii_lowercase);
            if set_changed {
                // Switching sets (or to or from one) re-wraps the data key only: opened the way
                // the disk is opened now (its current set's key, with that set's identity),
                // wrapped under the new key; the old records go once the disk names the new.
                let current = existing.as_ref().ok_or_else(|| internal("disk", "gone"))?;
                let dek = self.open_dek(current).await?;
                match &set {
                    Some((set, set_body)) => self.wrap_for_set(&keys, set, set_body, &dek).await?,
                    None => self.wrap_for_platform(&keys, &dek).await?,
                }
                retire = Some(set.as_ref().map(|(s, _)| s.kid.clone()));
            }
            if let Some(old) = old_size
                && size > old
            {
                let rt = self.runtime(&candidate).await?;
                let (fam, vol) = (rt.family.clone(), rt.volume.id().to_string());
                blocking("growing the disk", move || fam.resize_volume(&vol, size)).await?;
            }
        }
        let put = PutResource {
            at,
            body,
            identity: None,
        };
        let (status, stored) = match p.put_resource(caller, put).await {
            Ok(r) => r,
            Err(e) => {
                if new_disk {
                    self.undo_create(&id, made).await;
                }
                return Err(e);
            }
        };
        if let Some(keep) = retire {
            keys.retire_others(keep.as_deref()).await?;
        }
        Ok((status, self.with_state(stored)))
    }

    /// The encryption type and the set (checked for the caller, the region and the type, and
    /// with `check_key` its key probed with its identity) that `enc` (a resource's
    /// `encryption`) names, with Azure's error for each mistake.
    pub(crate) async fn encryption_of(
        &self,
        caller: &Principal,
        enc: &Value,
        location: &str,
        check_key: bool,
    ) -> Result<(String, Option<(SetKey, Value)>), KvError> {
        let given = enc["type"].as_str();
        if let Some(t) = given.filter(|t| ![PMK, CMK, DOUBLE].contains(t)) {
            return Err(bad(
                "InvalidParameter",
                format!("The encryption type '{t}' is not valid: '{PMK}', '{CMK}' or '{DOUBLE}'."),
            ));
        }
        let set_id = enc["diskEncryptionSetId"]
            .as_str()
            .filter(|s| !s.is_empty());
        match (given, set_id) {
            (Some(t), None) if t != PMK => Err(bad(
                "InvalidParameter",
                format!("Encryption type '{t}' needs encryption.diskEncryptionSetId."),
            )),
            (Some(PMK), Some(_)) => Err(bad(
                "InvalidParameter",
                format!(
                    "A resource encrypted with the platform key ('{PMK}') takes no disk \
                     encryption set."
                ),
            )),
            (_, None) => Ok((PMK.to_string(), None)),
            // A set without a type: the set's own type (customer key, or both layers).
            (t, Some(sid)) => {
                let (set, body) = self.usable_set(caller, sid, t, location, check_key).await?;
                Ok((set.encryption_type.clone(), Some((set, body))))
            }
        }
    }

    /// The data of a new disk: an empty volume in a family of its own, or (a copy) a volume
    /// in its source's family sharing every block until written. Returns where it is.
    #[allow(clippy::too_many_arguments)]
    async fn make_disk_data(
        &self,
        keys: &DiskKeys<'_>,
        source: Option<&Source>,
        import: Option<&ImportSource>,
        unique: &str,
        double: bool,
        set: Option<&(SetKey, Value)>,
        size: u64,
        now: i64,
    ) -> Result<(kagi_disk::Family, String), KvError> {
        match source {
            None => {
                let place = Place {
                    family: unique.to_string(),
                    volume: unique.to_string(),
                };
                let fam = self.new_family(keys, &place, double, set, now).await?;
                let (f, v) = (fam.clone(), place.volume.clone());
                let made = blocking("creating the disk", move || f.create_volume(&v, size)).await;
                let made = match (made, import) {
                    (Ok(vol), Some(src)) => self.import_into(src, vol, size).await.map(drop),
                    (made, _) => made.map(drop),
                };
                if let Err(e) = made {
                    drop(fam);
                    let (store, id) = (self.store.clone(), place.family.clone());
                    let _ =
                        blocking("removing a failed disk", move || store.delete_family(&id)).await;
                    return Err(e);
                }
                Ok((fam, place.volume))
            }
            Some(src) => {
                let (fam, from, place) = self.join_family(keys, src, unique, double, set).await?;
                let (f, v) = (fam.clone(), place.volume.clone());
                blocking("copying the disk", move || {
                    let vol = f.create_volume_from_snapshot(&from, &v)?;
                    if size > vol.size() {
                        f.resize_volume(&v, size)?;
                    }
                    Ok(())
                })
                .await?;
                Ok((fam, place.volume))
            }
        }
    }

    /// Undoes a creation that failed before its resource was stored: its data (when made) and
    /// the records kept under its id.
    pub(crate) async fn undo_create(&self, id: &str, made: Option<(kagi_disk::Family, String)>) {
        if let Some((fam, volume)) = made {
            self.drop_volume(fam, &volume, id).await;
        }
        if let Err(e) = self.host.clear_records(id).await {
            tracing::warn!(resource = %id, error = %e, "records of a failed creation not removed");
        }
    }

    /// Whether the disk of `unique_id` has incremental snapshots (matched by the disk's
    /// `uniqueId`, which a move does not change, unlike its resource id).
    fn has_incremental_snapshots(&self, unique_id: &str) -> bool {
        self.host
            .resources_of_type(crate::SNAPSHOT_TYPE)
            .iter()
            .any(|s| {
                s["properties"]["incremental"] == json!(true)
                    && s["properties"]["creationData"]["sourceUniqueId"]
                        .as_str()
                        .is_some_and(|src| src.eq_ignore_ascii_case(unique_id))
            })
    }

    /// The set `set_id` for a disk of type `etype` (any type the set has when `None`) in
    /// `location`: readable by the caller, of the same region and type, its key usable by its
    /// identity now.
    pub(crate) async fn usable_set(
        &self,
        caller: &Principal,
        set_id: &str,
        etype: Option<&str>,
        location: &str,
        check_key: bool,
    ) -> Result<(SetKey, Value), KvError> {
        let missing = || {
            KvError::new(
                ErrorCode::NotFound,
                format!("The disk encryption set '{set_id}' was not found."),
            )
            .with_inner("NotFound")
        };
        let (sub, rg, _, name) = ref_of(set_id).ok_or_else(missing)?;
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
        if let Some(etype) = etype.filter(|t| *t != set.encryption_type) {
            return Err(bad(
                "InvalidParameter",
                format!(
                    "The disk's encryption type '{etype}' does not match the disk encryption \
                     set's '{}'.",
                    set.encryption_type
                ),
            ));
        }
        if check_key {
            self.validate_set_key(&set, &body).await?;
        }
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

    /// Adds a record of `dek` wrapped under the resource's platform key.
    async fn wrap_for_platform(
        &self,
        keys: &DiskKeys<'_>,
        dek: &kagi_cmk::Dek,
    ) -> Result<(), KvError> {
        let pmk = kagi_cmk::KeyOwner::platform_key(keys).await?;
        let record = self
            .keys
            .wrap(keys, &Kek::Platform(pmk), dek, self.host.now())
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
                // Only the key version the set names now: a record left under another key
                // (or version) is never a way around the one in force.
                let in_force = matches!(&r.kek, kagi_cmk::KekRef::Customer(k) if k.eq_ignore_ascii_case(&s.kid));
                if !in_force {
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
        let keys = disk_keys(self.host.as_ref(), body).ok_or_else(|| internal("disk", "no id"))?;
        let inner = keys.inner_key().await?;
        let place = keys.place().await?;
        // With the log in the bucket another node may have taken the family over: a copy
        // here is then stale and never opened (an access this node granted before, say).
        let me = self.host.node_name();
        let refetch = match self.store.is_shipped() {
            true => match self.recorded_home(&place.family).await? {
                Some(home) if home != me => {
                    return Err(KvError::new(
                        ErrorCode::ServiceUnavailable,
                        format!(
                            "The disk is served by the node '{home}' now; ask again for an \
                             access (beginGetAccess) to reach it there."
                        ),
                    ));
                }
                _ => true,
            },
            false => false,
        };
        // Opening replays and checks the family's log: a blocking thread's work. A home
        // whose copy a takeover that did not finish made stale fetches its family back
        // (what it acknowledged is in the bucket).
        let store = self.store.clone();
        let (family, volume) = tokio::task::spawn_blocking(move || {
            let first = family_keys(dek.clone(), inner.clone());
            let family = match store.open_family(&place.family, first) {
                Err(kagi_disk::DiskError::TakenOver) if refetch => {
                    tracing::warn!(family = %place.family, "disk family fetched back from the bucket after a takeover that did not finish");
                    store.fetch_family(&place.family)?;
                    store.open_family(&place.family, family_keys(dek, inner))?
                }
                r => r?,
            };
            let volume = family.volume(&place.volume)?;
            Ok::<_, kagi_disk::DiskError>((family, volume))
        })
        .await
        .map_err(|e| internal("opening the disk", e))?
        .map_err(|e| internal("opening the disk", e))?;
        let rt = Arc::new(DiskRuntime {
            id: id.clone(),
            family,
            volume: Arc::new(volume),
            state: std::sync::Mutex::new(KeyState::Usable),
            in_flight: Arc::new(tokio::sync::watch::channel(0).0),
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
    pub(crate) fn with_state(&self, body: Value) -> Value {
        self.with_state_among(body, &std::collections::HashSet::new())
    }

    /// [`Self::with_state`], an access also counting as open when `open_anywhere` (lower-case
    /// ids: [`Self::accesses_anywhere`]) names the disk: a list answered by another node than
    /// the disk's home.
    pub(crate) fn with_state_among(
        &self,
        mut body: Value,
        open_anywhere: &std::collections::HashSet<String>,
    ) -> Value {
        let id = body["id"].as_str().unwrap_or_default().to_string();
        if self.access_open(&id) || open_anywhere.contains(&id.to_ascii_lowercase()) {
            let state = if body["properties"]["diskState"] == json!("ReadyToUpload") {
                "ActiveUpload"
            } else {
                "ActiveSAS"
            };
            body["properties"]["diskState"] = json!(state);
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

    /// Why the {noun} `name` (id `id`) may not be deleted now: an access is open (its
    /// `DELETE` and a resource group's deletion ask).
    pub(crate) async fn access_refusal(
        &self,
        id: &str,
        noun: &str,
        name: &str,
    ) -> Result<(), KvError> {
        self.expire_accesses().await;
        if self.access_open(id) {
            return Err(KvError::conflict(format!(
                "The {noun} '{name}' has an active access: end it (endGetAccess) before deleting \
                 it."
            ))
            .with_inner("OperationNotAllowed"));
        }
        Ok(())
    }

    /// `DELETE {disk}` and `DELETE {snapshot}` (`noun`): refused while an access is open.
    pub(crate) async fn delete_data(
        &self,
        caller: &Principal,
        at: ResourceRef<'_>,
        noun: &str,
    ) -> Result<(u16, Value), KvError> {
        let name = at.name;
        let Some((id, _g, body)) = self.begin_delete(caller, at).await else {
            return Ok((204, Value::Null));
        };
        self.access_refusal(&id, noun, name).await?;
        let family = match disk_keys(self.host.as_ref(), &body) {
            Some(keys) => keys.family_if_any().await?,
            None => None,
        };
        // A family whose home is another node (not running: the DELETE is served here, see
        // `crate::homes`) has no files here to open.
        let elsewhere = match &family {
            Some(f) => self
                .recorded_home(f)
                .await?
                .is_some_and(|home| home != self.host.node_name()),
            None => false,
        };
        // Opened before its keys go, to remove its blocks; with a revoked key they stay,
        // unreadable (the only wrapped copies of their key went with the resource).
        let rt = match elsewhere {
            true => None,
            false => self.runtime(&body).await.ok(),
        };
        let st = self.host.delete_resource(caller, at).await?;
        self.open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id.to_ascii_lowercase());
        if let Some(rt) = rt {
            let family = rt.family.clone();
            let volume = rt.volume.id().to_string();
            drop(rt);
            self.drop_volume(family, &volume, &id).await;
        } else if let Some(f) = family.filter(|_| elsewhere) {
            // Its files stay on its home, which sets them aside when it starts once no resource
            // names the family; its home is forgotten with its last resource.
            match self.families_in_use().await {
                Ok(used) if !used.contains(&f) => self.forget_home(&f).await,
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(family = %f, error = %e.message, "a deleted family's home not forgotten");
                }
            }
        }
        Ok((st, Value::Null))
    }

    /// The families some disk, snapshot or image names (their keys' place).
    pub(crate) async fn families_in_use(
        &self,
    ) -> Result<std::collections::HashSet<String>, KvError> {
        let p = self.host.as_ref();
        let mut used = std::collections::HashSet::new();
        for ty in [crate::DISK_TYPE, crate::SNAPSHOT_TYPE, crate::IMAGE_TYPE] {
            for body in p.resources_of_type(ty) {
                // A resource whose family cannot be told makes every family possibly used.
                let keys = disk_keys(p, &body)
                    .ok_or_else(|| internal("a disk resource without an id", ""))?;
                if let Some(family) = keys.family_if_any().await? {
                    used.insert(family);
                }
            }
        }
        Ok(used)
    }

    /// Sets the families of this node's store that no disk, snapshot or image names aside
    /// (at start, before anything is served; `DiskStore::set_aside`: kept under
    /// `disks/.orphaned/` for an operator to remove, never deleted): those deleted through
    /// another node while this one was not running (their `DELETE` was served there), and
    /// those a crash or a revoked key left behind. Returns how many; none when the resources
    /// cannot be read.
    pub async fn remove_orphan_families(&self) -> usize {
        let used = match self.families_in_use().await {
            Ok(u) => u,
            Err(e) => {
                tracing::warn!(error = %e.message, "orphan disk families not looked for");
                return 0;
            }
        };
        let store = self.store.clone();
        let removed = tokio::task::spawn_blocking(move || {
            let mut removed = 0;
            for family in store.families().unwrap_or_default() {
                if used.contains(&family) {
                    continue;
                }
                match store.set_aside(&family) {
                    Ok(to) => {
                        tracing::warn!(family, to = %to.display(), "disk family no disk, snapshot or image names set aside (deleted while this node was not running, or left by a crash): remove it once no disk needs it");
                        removed += 1;
                    }
                    Err(e) => tracing::warn!(family, error = %e, "orphan disk family not set aside"),
                }
            }
            removed
        })
        .await;
        removed.unwrap_or(0)
    }

    /// Removes `volume` from `family`; the last volume takes the family with it; otherwise
    /// the space only it used is reclaimed.
    async fn drop_volume(&self, family: kagi_disk::Family, volume: &str, id: &str) {
        let volume = volume.to_string();
        let fam = family.clone();
        let left = tokio::task::spawn_blocking(move || {
            fam.delete_volume(&volume)?;
            if !fam.volumes().is_empty() {
                fam.gc(0.5)?;
            }
            Ok::<_, kagi_disk::DiskError>(fam.volumes().len())
        })
        .await;
        let fid = family.id().to_string();
        drop(family);
        match left {
            Ok(Ok(0)) => {
                let store = self.store.clone();
                let family_id = fid.clone();
                let gone = blocking("removing the family", move || store.delete_family(&fid));
                match gone.await {
                    Ok(()) => self.forget_home(&family_id).await,
                    Err(e) => {
                        tracing::warn!(resource = %id, error = %e, "the family's files were not removed");
                    }
                }
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(resource = %id, error = %e, "blocks not removed"),
            Err(e) => tracing::warn!(resource = %id, error = %e, "blocks not removed"),
        }
    }

    /// The source of a new disk or snapshot (`creationData`): none for `Empty`, else the disk
    /// or snapshot `Copy` names, which the caller must be able to read.
    pub(crate) async fn creation_source(
        &self,
        caller: &Principal,
        creation: &Value,
    ) -> Result<Option<Source>, KvError> {
        let option = creation["createOption"].as_str().unwrap_or("Empty");
        if ["Empty", "Upload", "Import"]
            .iter()
            .any(|o| option.eq_ignore_ascii_case(o))
        {
            return Ok(None);
        }
        let sid = if option.eq_ignore_ascii_case("Copy") {
            creation["sourceResourceId"].as_str().ok_or_else(|| {
                bad(
                    "InvalidParameter",
                    "createOption 'Copy' needs creationData.sourceResourceId.",
                )
            })?
        } else if option.eq_ignore_ascii_case("FromImage") {
            creation["imageReference"]["id"].as_str().ok_or_else(|| {
                bad(
                    "InvalidParameter",
                    "createOption 'FromImage' needs creationData.imageReference.id (an image).",
                )
            })?
        } else {
            return Err(bad(
                "InvalidParameter",
                format!(
                    "createOption '{option}' is not served by this kagi: 'Empty', 'Upload', \
                     'Import' (with creationData.sourceUri), 'Copy' (with \
                     creationData.sourceResourceId naming a disk or snapshot) or 'FromImage' \
                     (with creationData.imageReference.id)."
                ),
            ));
        };
        let missing = || {
            KvError::new(
                ErrorCode::NotFound,
                format!("The source resource '{sid}' was not found."),
            )
            .with_inner("NotFound")
        };
        let (sub, rg, ty, name) = ref_of(sid).ok_or_else(missing)?;
        let image = option.eq_ignore_ascii_case("FromImage");
        let resource_type = match ty.to_ascii_lowercase().as_str() {
            "images" if image => crate::IMAGE_TYPE,
            "snapshots" if !image => crate::SNAPSHOT_TYPE,
            "disks" if !image => crate::DISK_TYPE,
            _ => return Err(missing()),
        };
        let at = ResourceRef {
            subscription: &sub,
            resource_group: &rg,
            resource_type,
            name: &name,
        };
        let body = self.host.get_resource(caller, at).map_err(|_| missing())?;
        let size = body["properties"]["diskSizeBytes"]
            .as_u64()
            .unwrap_or_else(|| {
                body["properties"]["storageProfile"]["osDisk"]["diskSizeGB"]
                    .as_u64()
                    .unwrap_or(0)
                    * GIB
            });
        Ok(Some(Source {
            id: body["id"].as_str().unwrap_or(sid).to_string(),
            size,
            snapshot: resource_type != crate::DISK_TYPE,
            body,
        }))
    }

    /// A new family for the resource whose keys are `keys`, its data at `place`: a new data
    /// key, wrapped under the platform key and, with a set, under the set's key.
    pub(crate) async fn new_family(
        &self,
        keys: &DiskKeys<'_>,
        place: &Place,
        double: bool,
        set: Option<&(SetKey, Value)>,
        now: i64,
    ) -> Result<kagi_disk::Family, KvError> {
        // Its home first: a node asked for it finds where it lives from the moment it exists.
        self.record_home(&place.family).await?;
        let dek = keys.create(now, double, place).await?;
        if let Some((s, b)) = set {
            self.wrap_for_set(keys, s, b, &dek).await?;
            keys.retire_others(Some(&s.kid)).await?;
        }
        let inner = keys.inner_key().await?;
        let (store, id) = (self.store.clone(), place.family.clone());
        blocking("creating the family", move || {
            store.create_family(&id, family_keys(dek, inner), double)
        })
        .await
    }

    /// A place for a new volume `volume` in the family of `src`, whose data key the resource
    /// of `keys` now holds: wrapped under its own set's key (or only the platform key).
    /// Returns the family, the source's volume and the new place.
    pub(crate) async fn join_family(
        &self,
        keys: &DiskKeys<'_>,
        src: &Source,
        volume: &str,
        double: bool,
        set: Option<&(SetKey, Value)>,
    ) -> Result<(kagi_disk::Family, String, Place), KvError> {
        let src_rt = self.runtime(&src.body).await?;
        if let Some(reason) = src_rt.refusal() {
            return Err(
                KvError::new(ErrorCode::Forbidden, reason).with_inner("KeyVaultAccessForbidden")
            );
        }
        if src_rt.family.has_inner_layer() != double {
            return Err(bad(
                "InvalidParameter",
                "A copy keeps its source's layers of encryption: double encryption \
                 (EncryptionAtRestWithPlatformAndCustomerKeys) exactly when the source has it.",
            ));
        }
        let src_keys =
            disk_keys(self.host.as_ref(), &src.body).ok_or_else(|| internal("source", "no id"))?;
        let place = Place {
            family: src_rt.family.id().to_string(),
            volume: volume.to_string(),
        };
        keys.copy_from(&src_keys, &place).await?;
        let dek = self.open_dek(&src.body).await?;
        match set {
            Some((s, b)) => {
                self.wrap_for_set(keys, s, b, &dek).await?;
                keys.retire_others(Some(&s.kid)).await?;
            }
            None => {
                self.wrap_for_platform(keys, &dek).await?;
                keys.retire_others(None).await?;
            }
        }
        Ok((src_rt.family.clone(), src_rt.volume.id().to_string(), place))
    }
}

/// A disk or snapshot that a new one is made from.
pub(crate) struct Source {
    /// Its resource id.
    pub(crate) id: String,
    /// The resource.
    pub(crate) body: Value,
    /// Its size in bytes.
    pub(crate) size: u64,
    /// Whether it is a snapshot or an image (read-only).
    pub(crate) snapshot: bool,
}

/// (subscription, group, type, name) of a `Microsoft.Compute` resource id.
pub(crate) fn ref_of(id: &str) -> Option<(String, String, String, String)> {
    let s: Vec<&str> = id.split('/').collect();
    match s.as_slice() {
        [
            "",
            "subscriptions",
            sub,
            rg_word,
            rg,
            "providers",
            ns,
            ty,
            name,
        ] if rg_word.eq_ignore_ascii_case("resourcegroups")
            && ns.eq_ignore_ascii_case(crate::NAMESPACE) =>
        {
            Some((
                sub.to_string(),
                rg.to_string(),
                ty.to_string(),
                name.to_string(),
            ))
        }
        _ => None,
    }
}

/// The size of an `Upload` disk (`creationData.uploadSizeBytes`, rounded up to a 4 KiB block);
/// `None` for another `createOption`.
fn upload_size(creation: &Value) -> Result<Option<u64>, KvError> {
    let upload = creation["createOption"]
        .as_str()
        .is_some_and(|o| o.eq_ignore_ascii_case("Upload"));
    if !upload {
        return Ok(None);
    }
    // Azure's smallest upload is 20 MiB and one VHD footer.
    let min = 20 * (1 << 20) + 512;
    creation["uploadSizeBytes"]
        .as_u64()
        .filter(|n| (min..=MAX_SIZE_GB * GIB).contains(n))
        .map(|n| Some(n.div_ceil(4096) * 4096))
        .ok_or_else(|| {
            bad(
                "InvalidParameter",
                format!(
                    "createOption 'Upload' needs creationData.uploadSizeBytes from {min} to {} \
                     bytes.",
                    MAX_SIZE_GB * GIB
                ),
            )
        })
}

/// A new `uniqueId` (a random UUID).
pub(crate) fn new_unique_id() -> Result<String, KvError> {
    let raw = kagi_crypto::random_bytes(16).map_err(|e| internal("rng", e))?;
    let mut b = [0u8; 16];
    b.copy_from_slice(&raw);
    Ok(kagi_core::ids::uuid_v4(b))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compute_ids_are_split_into_their_parts() {
        let id = "/subscriptions/s1/resourceGroups/rg/providers/Microsoft.Compute/snapshots/n";
        let parts = ref_of(id).unwrap();
        assert_eq!(
            parts,
            ("s1".into(), "rg".into(), "snapshots".into(), "n".into())
        );
        // Another namespace, a nested type or a short id is no Compute resource.
        let kv = "/subscriptions/s1/resourceGroups/rg/providers/Microsoft.KeyVault/vaults/n";
        assert!(ref_of(kv).is_none());
        assert!(ref_of(&format!("{id}/more")).is_none());
        assert!(ref_of("/subscriptions/s1").is_none());
    }

    #[test]
    fn unique_ids_are_random_uuids() {
        let (a, b) = (new_unique_id().unwrap(), new_unique_id().unwrap());
        assert_ne!(a, b);
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "4");
    }
}
