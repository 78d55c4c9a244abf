//! Snapshots of disks: incremental ones stay in their disk's family and share every block
//! not written since (they cost only what changes after them), and use their disk's
//! encryption (DK-7); full ones are copies into a family of their own, under a data key of
//! their own. Both are read-only, opened for reading like disks (`beginGetAccess`).

use std::sync::Arc;

use kagi_core::KvError;
use kagi_core::time::rfc3339;
use kagi_host::{Principal, PutResource, ResourceRef};
use serde_json::{Value, json};

use crate::des::DOUBLE;
use crate::disks::PMK;
use crate::keys::disk_keys;
use crate::keys::{Place, internal};
use crate::{DiskService, bad};

impl DiskService {
    /// `PUT`/`PATCH {snapshot}`: created from a disk (`creationData.createOption: Copy`,
    /// `sourceResourceId`), then only its tags change.
    pub(crate) async fn put_snapshot(
        self: &Arc<Self>,
        caller: &Principal,
        at: ResourceRef<'_>,
        input: Value,
        patch: bool,
    ) -> Result<(u16, Value), KvError> {
        let p = self.host.as_ref();
        let (id, _g, tags) = match self
            .begin_copy(caller, at, patch, "snapshot", &input)
            .await?
        {
            Copy::New { id, guard, tags } => (id, guard, tags),
            Copy::Retagged(answer) => return Ok(answer),
        };
        let props_in = &input["properties"];
        let src = self
            .creation_source(caller, &props_in["creationData"])
            .await?
            .ok_or_else(|| {
                bad(
                    "InvalidParameter",
                    "A snapshot is made from a disk: creationData.createOption 'Copy' with \
                     sourceResourceId.",
                )
            })?;
        let incremental = props_in["incremental"].as_bool().unwrap_or(false);
        if incremental && src.snapshot {
            return Err(bad(
                "InvalidParameter",
                "An incremental snapshot is taken of a disk, not of another snapshot.",
            ));
        }
        let location = input["location"]
            .as_str()
            .or_else(|| src.body["location"].as_str())
            .unwrap_or_default()
            .to_string();
        let src_enc = &src.body["properties"]["encryption"];
        let enc = match props_in.get("encryption") {
            Some(e) if incremental && !same_encryption(e, src_enc) => {
                return Err(bad(
                    "InvalidParameter",
                    "An incremental snapshot uses its disk's encryption (its type and disk \
                     encryption set).",
                ));
            }
            Some(e) => e.clone(),
            None => src_enc.clone(),
        };
        if incremental
            && !location.eq_ignore_ascii_case(src.body["location"].as_str().unwrap_or_default())
        {
            return Err(bad(
                "InvalidParameter",
                "An incremental snapshot is in its disk's region.",
            ));
        }
        let (etype, set) = self.encryption_of(caller, &enc, &location, true).await?;
        let now = p.now();
        let unique = crate::disks::new_unique_id()?;
        let mut props = json!({
            "creationData": {"createOption": "Copy", "sourceResourceId": src.id,
                "sourceUniqueId": src.body["properties"]["uniqueId"]},
            "diskSizeGB": src.body["properties"]["diskSizeGB"],
            "diskSizeBytes": src.size,
            "uniqueId": unique,
            "timeCreated": rfc3339(now),
            "incremental": incremental,
            "encryption": enc,
            "provisioningState": "Succeeded",
            "diskState": "Unattached",
        });
        let candidate = json!({ "id": id });
        let keys = disk_keys(p, &candidate).ok_or_else(|| internal("snapshot", "no id"))?;
        let double = etype == DOUBLE;
        let made = if incremental {
            match self
                .join_family(&keys, &src, &unique, double, set.as_ref())
                .await
            {
                Ok((fam, from, place)) => {
                    let (f, v) = (fam.clone(), place.volume.clone());
                    let taken =
                        crate::keys::blocking("taking the snapshot", move || f.snapshot(&from, &v))
                            .await;
                    props["incrementalSnapshotFamilyId"] = json!(place.family);
                    taken.map(|_| (fam, place.volume))
                }
                Err(e) => Err(e),
            }
        } else {
            self.full_copy(&keys, &src, &unique, double, set.as_ref(), now)
                .await
        };
        let made = match made {
            Ok(m) => m,
            Err(e) => {
                self.undo_create(&id, None).await;
                return Err(e);
            }
        };
        let body = json!({"location": location, "properties": props, "tags": tags.unwrap_or_else(|| json!({})),
            "sku": {"name": "Standard_LRS", "tier": "Standard"}});
        let put = PutResource {
            at,
            body,
            identity: None,
        };
        match p.put_resource(caller, put).await {
            Ok((status, stored)) => Ok((status, self.with_state(stored))),
            Err(e) => {
                self.undo_create(&id, Some(made)).await;
                Err(e)
            }
        }
    }
}

/// What a PUT of a snapshot or image is about.
pub(crate) enum Copy {
    /// A new one, to make: its id, its lock held, its tags.
    New {
        id: String,
        guard: tokio::sync::OwnedMutexGuard<()>,
        tags: Option<Value>,
    },
    /// One that exists, answered: only its tags changed.
    Retagged((u16, Value)),
}

impl DiskService {
    /// The start of a PUT of a snapshot or image (`noun`), which once made never changes but
    /// for its tags.
    pub(crate) async fn begin_copy(
        &self,
        caller: &Principal,
        at: ResourceRef<'_>,
        patch: bool,
        noun: &str,
        input: &Value,
    ) -> Result<Copy, KvError> {
        let (id, guard, existing) = self.begin_put(caller, at, patch, noun).await?;
        let tags = input
            .get("tags")
            .or_else(|| existing.as_ref().and_then(|e| e.get("tags")))
            .cloned();
        match existing {
            Some(body) => Ok(Copy::Retagged(self.retag(caller, at, body, tags).await?)),
            None => Ok(Copy::New { id, guard, tags }),
        }
    }

    /// A PUT of a snapshot or image that exists: what it holds never changes; its tags may.
    async fn retag(
        &self,
        caller: &Principal,
        at: ResourceRef<'_>,
        mut body: Value,
        tags: Option<Value>,
    ) -> Result<(u16, Value), KvError> {
        body["tags"] = tags.unwrap_or_else(|| json!({}));
        let mut put_body = json!({"location": body["location"], "tags": body["tags"],
            "properties": body["properties"]});
        if !body["sku"].is_null() {
            put_body["sku"] = body["sku"].clone();
        }
        let put = PutResource {
            at,
            body: put_body,
            identity: None,
        };
        let (st, stored) = self.host.put_resource(caller, put).await?;
        Ok((st, self.with_state(stored)))
    }

    /// A full copy of `src` into a new family of its own (a full snapshot, an image): its data
    /// decrypted from the source's family and encrypted under a new data key, wrapped for the
    /// resource of `keys` (under `set`'s key too, if any).
    pub(crate) async fn full_copy(
        &self,
        keys: &crate::keys::DiskKeys<'_>,
        src: &crate::disks::Source,
        unique: &str,
        double: bool,
        set: Option<&(crate::des::SetKey, Value)>,
        now: i64,
    ) -> Result<(kagi_disk::Family, String), KvError> {
        // The source's key is asked now, as the source is opened: a copy under another key
        // must not take data out from under a key that can no longer be used.
        self.open_dek(&src.body).await?;
        let src_rt = self.runtime(&src.body).await?;
        if let Some(reason) = src_rt.refusal() {
            return Err(KvError::new(kagi_core::ErrorCode::Forbidden, reason)
                .with_inner("KeyVaultAccessForbidden"));
        }
        if src_rt.family.has_inner_layer() != double {
            return Err(bad(
                "InvalidParameter",
                "A copy keeps its source's layers of encryption: double encryption exactly when \
                 the source has it.",
            ));
        }
        let place = Place {
            family: unique.to_string(),
            volume: unique.to_string(),
        };
        let fam = self.new_family(keys, &place, double, set, now).await?;
        // A point in time: an incremental snapshot of the source (taken at once), copied,
        // then dropped, so that writes going on meanwhile do not tear the copy.
        let src_fam = src_rt.family.clone();
        let src_vol = src_rt.volume.id().to_string();
        let vol = place.volume.clone();
        let made = (fam.clone(), place.volume.clone());
        let copied = tokio::task::spawn_blocking(move || {
            let moment = format!("copy-{vol}");
            let frozen = src_fam.snapshot(&src_vol, &moment)?;
            let copied = kagi_disk::copy_volume(&frozen, &fam, &vol);
            drop(frozen);
            let dropped = src_fam.delete_volume(&moment);
            copied.and(dropped)
        })
        .await
        .map_err(|e| internal("copying the disk", e))
        .and_then(|r| r.map_err(|e| internal("copying the disk", e)));
        if let Err(e) = copied {
            // The new family holds nothing anyone names: removed with the failed copy.
            drop(made);
            let (store, id) = (self.store.clone(), place.family.clone());
            let _ =
                crate::keys::blocking("removing a failed copy", move || store.delete_family(&id))
                    .await;
            return Err(e);
        }
        Ok(made)
    }
}

/// Whether encryption settings `a` and `b` name the same type and set.
fn same_encryption(a: &Value, b: &Value) -> bool {
    let ty = |v: &Value| v["type"].as_str().unwrap_or(PMK).to_string();
    let set = |v: &Value| {
        v["diskEncryptionSetId"]
            .as_str()
            .map(str::to_ascii_lowercase)
    };
    ty(a) == ty(b) && set(a) == set(b)
}
