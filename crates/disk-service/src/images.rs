//! Images (`images/{name}`): a generalized copy of a disk or snapshot that disks are made from
//! (`createOption: FromImage`). An image is a family of its own, under a data key of its own
//! (a full copy, like a full snapshot); the disks made from it join its family and share its
//! blocks until they write them.

use std::sync::Arc;

use kagi_core::KvError;
use kagi_host::{Principal, PutResource, ResourceRef};
use serde_json::{Value, json};

use crate::des::DOUBLE;
use crate::disks::{PMK, new_unique_id};
use crate::keys::{disk_keys, internal};
use crate::snapshots::Copy;
use crate::{DiskService, bad};

impl DiskService {
    /// `PUT`/`PATCH {image}`: made from `storageProfile.osDisk.managedDisk.id` or
    /// `storageProfile.osDisk.snapshot.id`, optionally under `osDisk.diskEncryptionSet.id`;
    /// then only its tags change.
    pub(crate) async fn put_image(
        self: &Arc<Self>,
        caller: &Principal,
        at: ResourceRef<'_>,
        input: Value,
        patch: bool,
    ) -> Result<(u16, Value), KvError> {
        let p = self.host.as_ref();
        let (id, _g, tags) = match self.begin_copy(caller, at, patch, "image", &input).await? {
            Copy::New { id, guard, tags } => (id, guard, tags),
            Copy::Retagged(answer) => return Ok(answer),
        };
        let os = &input["properties"]["storageProfile"]["osDisk"];
        let source_id = os["managedDisk"]["id"]
            .as_str()
            .or_else(|| os["snapshot"]["id"].as_str())
            .ok_or_else(|| {
                bad(
                    "InvalidParameter",
                    "An image is made from a disk or snapshot: \
                     properties.storageProfile.osDisk.managedDisk.id or .snapshot.id.",
                )
            })?;
        let creation = json!({"createOption": "Copy", "sourceResourceId": source_id});
        let src = self
            .creation_source(caller, &creation)
            .await?
            .ok_or_else(|| internal("image", "no source"))?;
        let location = input["location"]
            .as_str()
            .or_else(|| src.body["location"].as_str())
            .unwrap_or_default()
            .to_string();
        let set = match os["diskEncryptionSet"]["id"].as_str() {
            Some(sid) => {
                let src_type = src.body["properties"]["encryption"]["type"]
                    .as_str()
                    .unwrap_or(PMK);
                let etype = if src_type == DOUBLE {
                    DOUBLE
                } else {
                    crate::des::CMK
                };
                Some(
                    self.usable_set(caller, sid, Some(etype), &location, true)
                        .await?,
                )
            }
            None => None,
        };
        let double = set
            .as_ref()
            .is_some_and(|(s, _)| s.encryption_type == DOUBLE);
        let unique = new_unique_id()?;
        let keys = disk_keys(p, &json!({ "id": id })).ok_or_else(|| internal("image", "no id"))?;
        let made = match self
            .full_copy(&keys, &src, &unique, double, set.as_ref(), p.now())
            .await
        {
            Ok(m) => m,
            Err(e) => {
                self.undo_create(&id, None).await;
                return Err(e);
            }
        };
        let mut os_out = json!({
            "osType": os["osType"].as_str().unwrap_or("Linux"),
            "osState": os["osState"].as_str().unwrap_or("Generalized"),
            "diskSizeGB": src.size.div_ceil(1 << 30),
            "storageAccountType": "Standard_LRS",
        });
        let key = if src.snapshot {
            "snapshot"
        } else {
            "managedDisk"
        };
        os_out[key] = json!({ "id": src.id });
        if let Some((s, _)) = &set {
            os_out["diskEncryptionSet"] = json!({ "id": s.id });
        }
        // Besides Azure's fields, the image's encryption as disks and snapshots state theirs:
        // rotation and revocation treat the image as one more user of its set.
        let encryption = match &set {
            Some((s, _)) => json!({"type": s.encryption_type, "diskEncryptionSetId": s.id}),
            None => json!({ "type": PMK }),
        };
        let props = json!({
            "storageProfile": {"osDisk": os_out, "dataDisks": []},
            "hyperVGeneration": input["properties"]["hyperVGeneration"].as_str().unwrap_or("V2"),
            "encryption": encryption,
            "provisioningState": "Succeeded",
        });
        let body = json!({"location": location, "properties": props,
            "tags": tags.unwrap_or_else(|| json!({}))});
        let put = PutResource {
            at,
            body,
            identity: None,
        };
        match p.put_resource(caller, put).await {
            Ok(answer) => Ok(answer),
            Err(e) => {
                self.undo_create(&id, Some(made)).await;
                Err(e)
            }
        }
    }
}
