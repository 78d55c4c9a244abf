//! The blobs of `POST /keys/{name}/backup` and `POST /secrets/{name}/backup`: every version of
//! one object, sealed under the root key and bound to the place it may be restored in.
//!
//! Azure restores such a backup only into a vault of the same subscription and geography. kagi
//! binds a blob to the subscription, the tenant (`tenantId`) and the location of the vault it
//! was taken from — kagi has no geographies, so the location stands for one — and refuses a
//! restore anywhere else with Azure's 400 `BadParameter` "Cannot decrypt backup blob". Blobs
//! made before the binding (format 1) carry no place: only the bootstrap administrator, who
//! administers every subscription and tenant anyway, may restore them.

use kagi_core::key::BackupBlob;
use kagi_core::{KvError, ObjectName};
use kagi_crypto::SealPurpose;
use kagi_identity::Principal;
use kagi_store::VaultRecord;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::{Platform, internal};

/// One kind of object backup: its magic prefix (to tell a wrong blob from a damaged one) and
/// the AAD of its sealed payload.
pub(crate) struct BackupKind {
    magic: &'static [u8],
    aad: &'static [u8],
}

/// Key backups.
pub(crate) const KEYS: BackupKind = BackupKind {
    magic: b"KAGI-KEY-BACKUP\x01",
    aad: b"kagi/v1/key-backup",
};

/// Secret backups.
pub(crate) const SECRETS: BackupKind = BackupKind {
    magic: b"KAGI-SECRET-BACKUP\x01",
    aad: b"kagi/v1/secret-backup",
};

/// Payload format written today: 2 adds `boundTo`.
const FORMAT_BOUND: u32 = 2;
/// Blobs of kagi before the binding.
const FORMAT_LEGACY: u32 = 1;

/// Where a blob may be restored: the place of the vault it was taken from, normalised.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Place {
    subscription_id: String,
    tenant_id: String,
    location: String,
}

impl Place {
    fn of(record: &VaultRecord) -> Self {
        Self {
            subscription_id: record.subscription_id.to_ascii_lowercase(),
            tenant_id: record.properties.tenant_id.to_string().to_ascii_lowercase(),
            location: normalise_location(&record.location),
        }
    }
}

/// ARM treats "West Europe" and "westeurope" as one location.
fn normalise_location(location: &str) -> String {
    location
        .chars()
        .filter(|c| !c.is_whitespace())
        .flat_map(char::to_lowercase)
        .collect()
}

/// The sealed JSON (docs/FORMATS.md, "Key backup blob").
#[derive(Serialize, Deserialize)]
struct Payload<V> {
    format: u32,
    name: String,
    #[serde(rename = "boundTo", default, skip_serializing_if = "Option::is_none")]
    bound_to: Option<Place>,
    versions: Vec<V>,
}

/// A blob that is not one of ours, or is damaged.
pub(crate) fn invalid() -> KvError {
    KvError::bad_parameter("Backup blob contains invalid or corrupt version.")
        .with_inner("InvalidBackupBlob")
}

/// Whether a restore of a blob of `format` bound to `bound_to` may go into `target`.
fn check_place(
    format: u32,
    bound_to: Option<&Place>,
    target: &Place,
    caller_is_admin: bool,
) -> Result<(), KvError> {
    match (format, bound_to) {
        (FORMAT_BOUND, Some(place)) if place == target => Ok(()),
        (FORMAT_BOUND, Some(_)) => Err(KvError::bad_parameter(
            "Cannot decrypt backup blob: a backup restores only into a vault of the same \
             subscription, tenant and location as the vault it was taken from.",
        )),
        (FORMAT_LEGACY, None) if caller_is_admin => Ok(()),
        (FORMAT_LEGACY, None) => Err(KvError::bad_parameter(
            "Cannot decrypt backup blob: it was made by an earlier kagi and names no \
             subscription, tenant or location; only the bootstrap administrator may restore it.",
        )),
        _ => Err(invalid()),
    }
}

impl Platform {
    /// Seals the versions of `name`, taken from the vault `record`, as a backup blob bound to
    /// that vault's subscription, tenant and location.
    pub(crate) fn seal_object_backup<V: Serialize>(
        &self,
        kind: &BackupKind,
        record: &VaultRecord,
        name: &str,
        versions: Vec<V>,
    ) -> Result<BackupBlob, KvError> {
        let payload = zeroize::Zeroizing::new(
            serde_json::to_vec(&Payload {
                format: FORMAT_BOUND,
                name: name.to_string(),
                bound_to: Some(Place::of(record)),
                versions,
            })
            .map_err(|e| internal("backup encode", e))?,
        );
        let sealed = self
            .root
            .seal(SealPurpose::KeyBackup, kind.aad, &payload)
            .map_err(|e| internal("seal backup", e))?;
        let mut value = kind.magic.to_vec();
        value.extend_from_slice(&sealed);
        Ok(BackupBlob { value })
    }

    /// Opens a backup blob for a restore by `caller` into the vault `record`: its object name
    /// and versions, once the blob's place allows that vault.
    pub(crate) fn open_object_backup<V: DeserializeOwned>(
        &self,
        kind: &BackupKind,
        caller: &Principal,
        record: &VaultRecord,
        blob: &BackupBlob,
    ) -> Result<(ObjectName, Vec<V>), KvError> {
        let sealed = blob.value.strip_prefix(kind.magic).ok_or_else(invalid)?;
        let payload = self
            .root
            .open(SealPurpose::KeyBackup, kind.aad, sealed)
            .map_err(|_| invalid())?;
        let payload: Payload<V> = serde_json::from_slice(&payload).map_err(|_| invalid())?;
        check_place(
            payload.format,
            payload.bound_to.as_ref(),
            &Place::of(record),
            caller.kind == crate::directory::kind::BOOTSTRAP,
        )?;
        if payload.versions.is_empty() {
            return Err(invalid());
        }
        let name = ObjectName::parse(&payload.name).map_err(|_| invalid())?;
        Ok((name, payload.versions))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn place(sub: &str, tenant: &str, location: &str) -> Place {
        Place {
            subscription_id: sub.into(),
            tenant_id: tenant.into(),
            location: normalise_location(location),
        }
    }

    #[test]
    fn locations_compare_as_arm_does() {
        assert_eq!(normalise_location("West Europe"), "westeurope");
        assert_eq!(normalise_location("westeurope"), "westeurope");
    }

    #[test]
    fn a_bound_blob_restores_only_in_its_place() {
        let home = place("s1", "t1", "westeurope");
        assert!(check_place(2, Some(&home), &place("s1", "t1", "West Europe"), false).is_ok());
        for elsewhere in [
            place("s2", "t1", "westeurope"),
            place("s1", "t2", "westeurope"),
            place("s1", "t1", "eastus"),
        ] {
            for admin in [false, true] {
                let e = check_place(2, Some(&home), &elsewhere, admin).unwrap_err();
                assert_eq!((e.status(), e.inner), (400, None));
                assert!(e.message.starts_with("Cannot decrypt backup blob"));
            }
        }
    }

    #[test]
    fn a_legacy_blob_restores_only_for_the_administrator() {
        let target = place("s1", "t1", "westeurope");
        assert!(check_place(1, None, &target, true).is_ok());
        let e = check_place(1, None, &target, false).unwrap_err();
        assert!(e.message.contains("bootstrap administrator"));
        // Shapes no kagi wrote are damaged blobs.
        for (format, bound) in [(2, None), (1, Some(&target)), (3, Some(&target))] {
            let e = check_place(format, bound, &target, true).unwrap_err();
            assert_eq!(e.inner, Some("InvalidBackupBlob"));
        }
    }
}
