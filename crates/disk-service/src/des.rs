//! Disk encryption sets: the customer's key (a versioned key URL, as Azure requires), the
//! identity that reaches it, the encryption type, and automatic rotation.

use std::sync::Arc;

use kagi_cmk::{Kek, KeyRequest};
use kagi_core::KvError;
use kagi_core::time::rfc3339;
use kagi_host::{Principal, PutResource, ResourceRef, ServiceHost};
use serde_json::{Value, json};

use crate::{DES_TYPE, DISK_TYPE, DiskService, bad};

/// Azure's limit of disk encryption sets per region and subscription.
const MAX_SETS_PER_REGION: usize = 5000;

/// The encryption types a set may have.
pub(crate) const CMK: &str = "EncryptionAtRestWithCustomerKey";
/// Platform and customer keys (double encryption, DK-9).
pub(crate) const DOUBLE: &str = "EncryptionAtRestWithPlatformAndCustomerKeys";

/// What a set says about its key.
#[derive(Clone, Debug)]
pub(crate) struct SetKey {
    /// The set's resource id.
    pub(crate) id: String,
    /// The versioned key id in force.
    pub(crate) kid: String,
    /// The user-assigned identity used for the key, if not the system-assigned one.
    pub(crate) user_assigned: Option<String>,
    /// `rotationToLatestKeyVersionEnabled`.
    pub(crate) auto_rotate: bool,
    /// The set's region.
    pub(crate) location: String,
    /// `encryptionType`.
    pub(crate) encryption_type: String,
}

impl SetKey {
    pub(crate) fn of(body: &Value) -> Option<Self> {
        let props = &body["properties"];
        Some(Self {
            id: body["id"].as_str()?.to_string(),
            kid: props["activeKey"]["keyUrl"].as_str()?.to_string(),
            user_assigned: user_assigned_choice(body),
            auto_rotate: props["rotationToLatestKeyVersionEnabled"]
                .as_bool()
                .unwrap_or(false),
            location: body["location"].as_str().unwrap_or_default().to_string(),
            encryption_type: props["encryptionType"].as_str().unwrap_or(CMK).to_string(),
        })
    }

    /// How errors name the identity.
    pub(crate) fn who(&self, body: &Value) -> String {
        match &self.user_assigned {
            Some(u) => format!("user-assigned identity {u}"),
            None => format!(
                "system-assigned identity {} of disk encryption set '{}'",
                body["identity"]["principalId"].as_str().unwrap_or("?"),
                self.id.rsplit('/').next().unwrap_or_default()
            ),
        }
    }

    /// The key encryption key of this set, with a token of its identity.
    pub(crate) fn kek(&self, host: &dyn ServiceHost, body: &Value) -> Result<Kek, KvError> {
        let token = host.identity_token(&self.id, self.user_assigned.as_deref())?;
        Ok(Kek::Customer {
            kid: self.kid.clone(),
            token,
            who: self.who(body),
        })
    }
}

/// The identity a set uses for its key: its only user-assigned one when it has no
/// system-assigned identity.
fn user_assigned_choice(body: &Value) -> Option<String> {
    let ty = body["identity"]["type"]
        .as_str()
        .unwrap_or_default()
        .to_ascii_lowercase();
    if ty.contains("systemassigned") {
        return None;
    }
    body["identity"]["userAssignedIdentities"]
        .as_object()
        .and_then(|m| m.keys().next().cloned())
}

impl DiskService {
    /// `PUT`/`PATCH {des}`.
    pub(crate) async fn put_des(
        self: &Arc<Self>,
        caller: &Principal,
        at: ResourceRef<'_>,
        input: Value,
        patch: bool,
    ) -> Result<(u16, Value), KvError> {
        let p = self.host.as_ref();
        let (id, _g, existing) = self
            .begin_put(caller, at, patch, "disk encryption set")
            .await?;
        // As clients see it: the key version the set follows now (after automatic rotations),
        // so that a change of anything else keeps it.
        let existing = match existing {
            Some(e) => Some(self.set_view(e).await),
            None => None,
        };
        let props_in = &input["properties"];
        let mut props = existing
            .as_ref()
            .map(|e| e["properties"].clone())
            .unwrap_or_else(|| json!({}));
        // Read-only fields are the set's own state, shown by `set_view`; never stored.
        if let Some(o) = props.as_object_mut() {
            for field in [
                "previousKeys",
                "lastKeyRotationTimestamp",
                "autoKeyRotationError",
            ] {
                o.remove(field);
            }
        }
        for field in [
            "activeKey",
            "encryptionType",
            "rotationToLatestKeyVersionEnabled",
        ] {
            if let Some(v) = props_in.get(field) {
                props[field] = v.clone();
            }
        }
        let key_url = props["activeKey"]["keyUrl"].as_str().ok_or_else(|| {
            bad(
                "InvalidParameter",
                "The disk encryption set needs properties.activeKey.keyUrl.",
            )
        })?;
        let key = self.keys.parse(key_url)?;
        if key.version.is_none() {
            return Err(bad(
                "InvalidParameter",
                format!(
                    "The key URL '{key_url}' has no version: a disk encryption set needs a \
                     versioned key URL (with rotationToLatestKeyVersionEnabled, kagi moves it \
                     to newer versions itself)."
                ),
            ));
        }
        let etype = props["encryptionType"].as_str().unwrap_or(CMK).to_string();
        if etype != CMK && etype != DOUBLE {
            return Err(bad(
                "InvalidParameter",
                format!(
                    "The encryption type '{etype}' is not valid for a disk encryption set: \
                     '{CMK}' or '{DOUBLE}'."
                ),
            ));
        }
        props["encryptionType"] = json!(etype);
        if props["rotationToLatestKeyVersionEnabled"].is_null() {
            props["rotationToLatestKeyVersionEnabled"] = json!(false);
        }
        // `sourceVault.id` is kept as given (Azure needs it only across subscriptions); the
        // key URL alone decides which vault is used.
        if props["activeKey"]["sourceVault"]["id"].as_str().is_none()
            && let Some(f) = p.key_vault_facts(&key.vault)
        {
            props["activeKey"]["sourceVault"] = json!({ "id": f.id });
        }
        props["provisioningState"] = json!("Succeeded");
        let identity_in = input
            .get("identity")
            .or_else(|| existing.as_ref().and_then(|e| e.get("identity")));
        let ty = identity_in
            .and_then(|i| i["type"].as_str())
            .unwrap_or("None")
            .to_ascii_lowercase();
        if !ty.contains("assigned") {
            return Err(bad(
                "InvalidParameter",
                "A disk encryption set needs a managed identity (identity.type SystemAssigned \
                 or UserAssigned) to reach its key.",
            ));
        }
        let location = input["location"]
            .as_str()
            .or_else(|| existing.as_ref().and_then(|e| e["location"].as_str()))
            .unwrap_or_default()
            .to_string();
        if existing.is_none() {
            let same_region = p
                .resources_of_type(DES_TYPE)
                .iter()
                .filter(|r| {
                    r["id"]
                        .as_str()
                        .and_then(kagi_host::subscription_of)
                        .is_some_and(|s| s.eq_ignore_ascii_case(at.subscription))
                        && r["location"]
                            .as_str()
                            .is_some_and(|l| l.eq_ignore_ascii_case(&location))
                })
                .count();
            if same_region >= MAX_SETS_PER_REGION {
                return Err(KvError::conflict(format!(
                    "The subscription already has {MAX_SETS_PER_REGION} disk encryption sets in \
                     region '{location}', Azure's limit."
                ))
                .with_inner("QuotaExceeded"));
            }
        }
        let mut body = json!({"location": location, "properties": props});
        if let Some(t) = input
            .get("tags")
            .or_else(|| existing.as_ref().and_then(|e| e.get("tags")))
        {
            body["tags"] = t.clone();
        }
        // The key is checked with the set's identity: a user-assigned one can hold access
        // already; a system-assigned one created with the set cannot, so a new set with one is
        // checked when a disk first uses it (as Azure does).
        let candidate = json!({"id": id, "location": location, "identity": identity_in.cloned(),
            "properties": body["properties"].clone()});
        let new = SetKey::of(&candidate).ok_or_else(|| keys_internal("set"))?;
        let check_now = existing.is_some() || new.user_assigned.is_some();
        if check_now {
            self.validate_set_key(&new, &candidate).await?;
        }
        let old = existing.as_ref().and_then(SetKey::of);
        // A new key (not a rotation the set follows itself): every disk of the set is wrapped
        // under it before the set names it; the records under the old one go once it does.
        let key_changes = old
            .as_ref()
            .is_some_and(|o| !o.kid.eq_ignore_ascii_case(&new.kid));
        if key_changes {
            self.rewrap_set(&new, &candidate, false).await?;
        }
        let put = PutResource {
            at,
            body,
            identity: identity_in,
        };
        let (status, stored) = p.put_resource(caller, put).await?;
        if props_in.get("activeKey").is_some() {
            let mut doc = p
                .document(&id, "set", "rotation")
                .await?
                .unwrap_or_else(|| json!({}));
            if let Some(o) = doc.as_object_mut() {
                o.remove("kid");
            }
            p.put_document(&id, "set", "rotation", &doc).await?;
        }

        if key_changes {
            let stored_key = SetKey::of(&stored).ok_or_else(|| keys_internal("set"))?;
            self.rewrap_set(&stored_key, &stored, true).await?;
        }
        Ok((status, self.set_view(stored).await))
    }

    /// Every rule for the set's key, probed with its identity: the versioned key id in force.
    pub(crate) async fn validate_set_key(
        &self,
        set: &SetKey,
        body: &Value,
    ) -> Result<String, KvError> {
        let who = set.who(body);
        let req = KeyRequest {
            key_uri: &set.kid,
            resource_id: &set.id,
            location: &set.location,
            user_assigned: set.user_assigned.as_deref(),
            who: &who,
        };
        self.keys.validate(self.host.as_ref(), &req).await
    }

    /// The disks, snapshots and images of set `set_id` (resource bodies).
    pub(crate) fn disks_of(&self, set_id: &str) -> Vec<Value> {
        let mut all = self.host.resources_of_type(DISK_TYPE);
        all.extend(self.host.resources_of_type(crate::SNAPSHOT_TYPE));
        all.extend(self.host.resources_of_type(crate::IMAGE_TYPE));
        all.into_iter()
            .filter(|d| {
                d["properties"]["encryption"]["diskEncryptionSetId"]
                    .as_str()
                    .is_some_and(|s| s.eq_ignore_ascii_case(set_id))
            })
            .collect()
    }

    /// Wraps the data key of every disk, snapshot and image of `set` under `set.kid` (one
    /// record each, where none exists: a re-run adds nothing), and with `retire` then keeps
    /// only that record (DK-6: rotation re-wraps only). Each resource is locked only while its
    /// own records change, and read again under its lock: one switched to another set
    /// meanwhile is left alone. Stops at the first resource that cannot be wrapped (the key
    /// vault unreachable, a permission gone): what was added stays, nothing was retired for
    /// that one, and the next pass of the keeper goes on.
    pub(crate) async fn rewrap_set(
        &self,
        set: &SetKey,
        body: &Value,
        retire: bool,
    ) -> Result<u64, KvError> {
        let p = self.host.as_ref();
        let kek = set.kek(p, body)?;
        let mut ids: Vec<String> = self
            .disks_of(&set.id)
            .iter()
            .filter_map(|d| d["id"].as_str().map(str::to_string))
            .collect();
        ids.sort_by_key(|id| id.to_ascii_lowercase());
        ids.dedup_by_key(|id| id.to_ascii_lowercase());
        let mut added = 0;
        for id in &ids {
            let _g = self.lock_id(id).await;
            let Some(d) = p.resource(id) else {
                continue;
            };
            let in_set = d["properties"]["encryption"]["diskEncryptionSetId"]
                .as_str()
                .is_some_and(|s| s.eq_ignore_ascii_case(&set.id));
            let Some(owner) = crate::keys::disk_keys(p, &d).filter(|_| in_set) else {
                continue;
            };
            let done = self
                .keys
                .rewrap_all(&[&owner], &kek, p.now())
                .await
                .map_err(crate::keys::key_error)?;
            if let Some((_, e)) = done.failed.into_iter().next() {
                let e = crate::keys::key_error(e);
                let name = d["name"].as_str().unwrap_or_default();
                return Err(KvError::new(
                    e.code,
                    format!(
                        "'{name}' could not be wrapped under '{}' (its earlier key still \
                         protects it): {}",
                        set.kid, e.message
                    ),
                )
                .with_inner("KeyVaultAccessForbidden"));
            }
            added += done.added;
            if retire {
                owner.retire_others(Some(&set.kid)).await?;
            }
        }
        if added > 0 {
            tracing::info!(set = %set.id, added, "disk encryption set re-wrapped");
        }
        Ok(added)
    }

    /// `DELETE {des}`: refused while disks use it.
    pub(crate) async fn delete_des(
        &self,
        caller: &Principal,
        at: ResourceRef<'_>,
    ) -> Result<(u16, Value), KvError> {
        let name = at.name;
        let Some((id, _g, _)) = self.begin_delete(caller, at).await else {
            return Ok((204, Value::Null));
        };
        let p = self.host.as_ref();
        self.set_in_use(&id, name, &[])?;
        let st = p.delete_resource(caller, at).await?;
        Ok((st, Value::Null))
    }

    /// Why set `name` (id `id`) may not be deleted now: disks, snapshots or images use it,
    /// other than those of `deleting` (lower-case ids deleted with it).
    fn set_in_use(&self, id: &str, name: &str, deleting: &[String]) -> Result<(), KvError> {
        let used: Vec<String> = self
            .disks_of(id)
            .iter()
            .filter_map(|d| d["id"].as_str().map(str::to_string))
            .filter(|d| !deleting.contains(&d.to_ascii_lowercase()))
            .collect();
        if !used.is_empty() {
            return Err(KvError::conflict(format!(
                "The disk encryption set '{name}' is in use by {} resource(s): {}. Delete them \
                 or change their encryption first.",
                used.len(),
                used.join(", ")
            ))
            .with_inner("DiskEncryptionSetInUse"));
        }
        Ok(())
    }

    /// What the `DELETE` of resource `id` (a set, disk, snapshot or image) would refuse when a
    /// resource group's deletion deletes it with `deleting` (lower-case ids): a set used by
    /// anything else, a disk or snapshot with an access open.
    pub(crate) async fn delete_refusal(
        &self,
        id: &str,
        deleting: &[String],
    ) -> Result<(), KvError> {
        let Some(body) = self.host.resource(id) else {
            return Ok(());
        };
        let id = body["id"].as_str().unwrap_or(id);
        let name = body["name"].as_str().unwrap_or_default();
        let ty = body["type"].as_str().unwrap_or_default();
        if ty.eq_ignore_ascii_case(DES_TYPE) {
            self.set_in_use(id, name, deleting)
        } else if ty.eq_ignore_ascii_case(DISK_TYPE) {
            self.access_refusal(id, "disk", name).await
        } else if ty.eq_ignore_ascii_case(crate::SNAPSHOT_TYPE) {
            self.access_refusal(id, "snapshot", name).await
        } else {
            Ok(())
        }
    }

    /// `GET {des}/associatedResources`.
    pub(crate) fn associated(
        &self,
        caller: &Principal,
        at: ResourceRef<'_>,
    ) -> Result<(u16, Value), KvError> {
        let set = self.host.get_resource(caller, at)?;
        let id = set["id"].as_str().unwrap_or_default();
        let ids: Vec<Value> = self
            .disks_of(id)
            .iter()
            .filter_map(|d| d["id"].as_str().map(|s| json!(s)))
            .collect();
        Ok((200, json!({ "value": ids })))
    }

    /// Records a rotation (or its failure): the set's own state, kept beside its resource and
    /// shown in it ([`Self::set_view`]). `previous` is set while disks are being re-wrapped.
    pub(crate) async fn note_rotation(
        &self,
        set_id: &str,
        kid: Option<&str>,
        previous: Option<&str>,
        error: Option<&str>,
    ) -> Result<(), KvError> {
        let p = self.host.as_ref();
        let mut doc = p
            .document(set_id, "set", "rotation")
            .await?
            .unwrap_or_else(|| json!({}));
        if let Some(kid) = kid {
            doc["kid"] = json!(kid);
            doc["lastKeyRotationTimestamp"] = json!(rfc3339(p.now()));
        }
        doc["previous"] = json!(previous);
        doc["error"] = json!(error);
        p.put_document(set_id, "set", "rotation", &doc).await
    }

    /// A set's resource as stored, with its rotation state: the key version in force,
    /// `previousKeys` (while disks are re-wrapped), `lastKeyRotationTimestamp`,
    /// `autoKeyRotationError`.
    pub(crate) async fn set_view(&self, mut body: Value) -> Value {
        let id = body["id"].as_str().unwrap_or_default().to_string();
        let Ok(Some(doc)) = self.host.document(&id, "set", "rotation").await else {
            return body;
        };
        let props = &mut body["properties"];
        let vault = props["activeKey"]["sourceVault"].clone();
        if let Some(kid) = doc["kid"].as_str() {
            props["activeKey"]["keyUrl"] = json!(kid);
        }
        if let Some(t) = doc["lastKeyRotationTimestamp"].as_str() {
            props["lastKeyRotationTimestamp"] = json!(t);
        }
        props["previousKeys"] = match doc["previous"].as_str() {
            Some(prev) => json!([{ "keyUrl": prev, "sourceVault": vault }]),
            None => json!([]),
        };
        if let Some(e) = doc["error"].as_str() {
            props["autoKeyRotationError"] = json!({"code": "AutoKeyRotationFailed", "message": e});
        }
        body
    }
}

fn keys_internal(what: &str) -> KvError {
    crate::keys::internal(what, "malformed resource")
}

/// `/subscriptions/{sub}/resourceGroups/{rg}/providers/{type}/{name}`.
pub(crate) fn id_of(at: ResourceRef<'_>) -> String {
    let (sub, rg, ty, name) = at.parts();
    format!("/subscriptions/{sub}/resourceGroups/{rg}/providers/{ty}/{name}")
}
