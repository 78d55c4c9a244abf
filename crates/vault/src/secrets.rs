//! The secrets data plane: set (each set adds a version), get, update, list, soft delete,
//! recover, purge, backup and restore.
//!
//! Values are sealed under the root key (purpose `secret`, AAD
//! `kagi/v1/secret/{vault}/{name, lower-case}/{version}`) before they reach the store, and stay
//! sealed in memory: a value is opened only to answer a get or to build a backup, and the
//! plaintext lives in [`SecretValue`]/`Zeroizing` buffers that are wiped when dropped. Values
//! never appear in logs, errors or `Debug` output.

use kagi_core::access::{DataAction, SecretPermission};
use kagi_core::event::ObjectType;
use kagi_core::key::BackupBlob;
use kagi_core::secret::{
    SecretSetParameters, SecretUpdateParameters, SecretValue, SecretVersionInfo,
    deleted_secret_not_found, secret_not_found,
};
use kagi_core::{KeyVersion, KvError, ObjectName, VaultName};
use kagi_crypto::SealPurpose;
use kagi_identity::Principal;
use kagi_store::{SecretRecord, SecretVersionRecord};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::object_backup;
use crate::state::{Entry, VaultState, write};
use crate::versioned::{self, Kind, Names, ObjectView, Op, random_version};
use crate::{Platform, internal};

/// Secrets as a kind of versioned object.
pub(crate) struct SecretKind;

impl Kind for SecretKind {
    type Version = SecretVersionRecord;
    type Record = SecretVersionRecord;
    const NAMES: Names = Names::new(
        ObjectType::Secret,
        "secrets",
        "id",
        &object_backup::SECRETS,
        |op| {
            use SecretPermission::{Backup, Delete, Get, List, Purge, Recover, Restore, Set};
            DataAction::Secret(
                [Get, List, Set, Delete, Recover, Purge, Backup, Restore][op as usize],
            )
        },
    )
    .errors(secret_not_found, deleted_secret_not_found);

    versioned::store_calls! {
        secrets: add_secret_version, update_secret_version, set_secret_deleted, purge_secret, insert_secret
    }

    fn attributes(v: &SecretVersionRecord) -> Map<String, Value> {
        let a = &v.info.attributes;
        versioned::attributes(a.enabled, a.nbf, a.exp, a.created, a.updated)
    }

    /// `contentType?, tags?`.
    fn summary(v: &SecretVersionRecord, item: &mut Value) {
        if let Some(ct) = &v.info.content_type {
            item["contentType"] = json!(ct);
        }
        versioned::add_tags(&v.info.tags, item);
    }

    /// A SecretBundle without the value: `{id, attributes, contentType?, tags?}`.
    fn bundle(view: &ObjectView<'_>, name: &str, v: &SecretVersionRecord) -> Value {
        view.version_item::<Self>(name, v)
    }

    fn empty_bundle(view: &ObjectView<'_>, name: &str) -> Value {
        json!({"id": view.id::<Self>(name, None)})
    }
}

impl VaultState {
    /// Adds the vault's stored secrets (at start-up).
    pub(crate) fn with_secrets(self, secrets: Vec<SecretRecord>) -> Self {
        *write(&self.secrets) = secrets
            .into_iter()
            .map(|s| (s.name.folded(), Entry::from_record(s)))
            .collect();
        self
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

/// A SecretBundle with the value.
fn with_value(
    view: &ObjectView<'_>,
    name: &str,
    v: &SecretVersionRecord,
    value: &SecretValue,
) -> Value {
    let mut out = SecretKind::bundle(view, name, v);
    out["value"] = json!(value.as_str());
    out
}

versioned::delegations!(
    SecretKind,
    /// `DELETE /secrets/{name}`: soft delete of every version for the vault's retention.
    delete_secret,
    /// `GET /deletedsecrets/{name}`.
    get_deleted_secret,
    /// `POST /deletedsecrets/{name}/recover`: live again, every version; answers the current
    /// version's bundle without the value.
    recover_deleted_secret,
    /// `DELETE /deletedsecrets/{name}`: permanent removal; refused (403) while purge protection
    /// holds the secret until its retention ends.
    purge_deleted_secret,
    /// `GET /secrets`: live secrets, versionless ids, no values.
    list_secrets,
    /// `GET /deletedsecrets`.
    list_deleted_secrets,
    /// `GET /secrets/{name}/versions`: every version, versioned ids, no values.
    list_secret_versions,
);

impl Platform {
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
        let action = SecretKind::action(Op::Update);
        let (state, record) = self.object_vault::<SecretKind>(caller, vault, action, Some(name))?;
        let name = ObjectName::parse(name)?;
        let (value, info) = params.into_version(self.clock.now())?;
        let version = random_version()?;
        let sealed_value = self.seal_value(&record.name, &name, &version, &value)?;
        let (shown, rec) = self
            .add_object_version::<SecretKind>(&state, &record, &name, |seq| {
                let rec = SecretVersionRecord {
                    version,
                    seq,
                    info,
                    sealed_value,
                };
                (rec.clone(), rec)
            })
            .await?;
        Ok(with_value(
            &self.object_view(&record),
            shown.as_str(),
            &rec,
            &value,
        ))
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
        let (record, s, v) = self.get_object::<SecretKind>(caller, vault, name, version)?;
        v.info.attributes.check_readable(self.clock.now())?;
        let value = self.open_value(&record.name, &s.name, &v)?;
        Ok(with_value(
            &self.object_view(&record),
            s.name.as_str(),
            &v,
            &value,
        ))
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
        let now = self.clock.now();
        self.update_object::<SecretKind>(caller, vault, name, version, |v| {
            Ok(SecretVersionRecord {
                info: params.apply(v.info.clone(), now)?,
                ..v.clone()
            })
        })
        .await
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
        self.backup_object::<SecretKind, _>(caller, vault, name, |record, name, v| {
            Ok(BackupVersion {
                version: v.version.to_string(),
                seq: v.seq,
                info: v.info.clone(),
                value: self.open_value(&record.name, name, v)?,
            })
        })
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
        self.restore_object::<SecretKind, BackupVersion>(caller, vault, blob, |record, name, v| {
            let version = KeyVersion::parse(&v.version).map_err(|_| object_backup::invalid())?;
            let sealed_value = self.seal_value(&record.name, name, &version, &v.value)?;
            let rec = SecretVersionRecord {
                version,
                seq: v.seq,
                info: v.info.clone(),
                sealed_value,
            };
            Ok((rec.clone(), rec))
        })
        .await
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
