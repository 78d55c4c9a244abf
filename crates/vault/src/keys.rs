//! The keys data plane: create, import, get, update, list, delete/recover/purge, backup and
//! restore, rotate, and the cryptographic operations.

use std::sync::Arc;

use kagi_core::access::{DataAction, KeyPermission};
use kagi_core::event::ObjectType;
use kagi_core::key::{
    BackupBlob, KeyAttributes, KeyCreateParameters, KeyImportParameters, KeyOperation,
    KeyOperationParameters, KeySignParameters, KeyType, KeyUpdateParameters, KeyVerifyParameters,
    KeyVersionInfo, PublicJwk, RandomParameters, WireKeyAttributes, parse_key_ops, patch_window,
    validate_tags, validate_times,
};
use kagi_core::{KeyVersion, KvError, ObjectName, b64};
use kagi_crypto::{
    Curve, EncryptionAlgorithm, KeySpec, PublicKey, RsaKeySize, SealPurpose, SignatureAlgorithm,
    StoredPrivateKey,
};
use kagi_identity::Principal;
use kagi_store::{KeyVersionRecord, VaultRecord};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::key_material::{
    NewMaterial, crypto_error, hsm_needs_premium, kek_not_in_hsm, parse_transfer_blob,
    restore_error, spec_for,
};
use crate::object_backup;
use crate::state::{KeyEntry, VaultState, VersionEntry, private_key_aad};
pub use crate::versioned::ListQuery;
use crate::versioned::{self, Kind, Names, ObjectView, random_version};
use crate::{Platform, internal};

fn public_jwk(p: &PublicKey) -> PublicJwk {
    match p {
        PublicKey::Rsa { n, e } => PublicJwk::Rsa {
            n: n.clone(),
            e: e.clone(),
        },
        PublicKey::Ec { curve, x, y } => PublicJwk::Ec {
            crv: curve.jwk_name().to_string(),
            x: x.clone(),
            y: y.clone(),
        },
    }
}

fn check_release_policy(p: &Option<Value>) -> Result<(), KvError> {
    if p.is_some() {
        return Err(KvError::bad_parameter(
            "Key release policies are not supported by kagi (there is no attestation service).",
        ));
    }
    Ok(())
}

fn new_attributes(w: Option<WireKeyAttributes>, now: i64) -> Result<KeyAttributes, KvError> {
    let w = w.unwrap_or_default();
    validate_times(w.nbf, w.exp)?;
    if w.exportable == Some(true) {
        return Err(KvError::bad_parameter(
            "Exportable keys need a release policy, which kagi does not support.",
        ));
    }
    Ok(KeyAttributes {
        enabled: w.enabled.unwrap_or(true),
        nbf: w.nbf,
        exp: w.exp,
        created: now,
        updated: now,
        exportable: false,
    })
}

/// The operation names of the crypto endpoints, as they appear in the path.
fn crypto_op(segment: &str) -> Option<KeyOperation> {
    Some(match segment {
        "encrypt" => KeyOperation::Encrypt,
        "decrypt" => KeyOperation::Decrypt,
        "wrapkey" => KeyOperation::WrapKey,
        "unwrapkey" => KeyOperation::UnwrapKey,
        "sign" => KeyOperation::Sign,
        "verify" => KeyOperation::Verify,
        _ => return None,
    })
}

/// One version in a key backup blob (sealed, never seen by clients in the clear).
#[derive(Serialize, Deserialize)]
struct BackupVersion {
    version: String,
    seq: i64,
    info: KeyVersionInfo,
    #[serde(with = "kagi_core::key::private_bytes")]
    pkcs8: Vec<u8>,
}

impl Drop for BackupVersion {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.pkcs8);
    }
}

/// A key version about to be added.
struct NewVersion {
    key: NewMaterial,
    kty: KeyType,
    key_ops: Vec<KeyOperation>,
    attributes: KeyAttributes,
    tags: kagi_core::key::Tags,
}

/// Keys as a kind of versioned object.
pub(crate) struct KeyKind;

impl Kind for KeyKind {
    type Version = VersionEntry;
    type Record = KeyVersionRecord;
    const NAMES: Names = Names::new(ObjectType::Key, "keys", "kid", &object_backup::KEYS, |op| {
        use KeyPermission::{Backup, Delete, Get, List, Purge, Recover, Restore, Update};
        DataAction::Key([Get, List, Update, Delete, Recover, Purge, Backup, Restore][op as usize])
    })
    .errors(KvError::key_not_found, KvError::deleted_key_not_found);

    versioned::store_calls! {
        keys: add_key_version, update_key_version, set_key_deleted, purge_key, insert_key
    }

    fn attributes(v: &VersionEntry) -> Map<String, Value> {
        let a = &v.info.attributes;
        let mut m = versioned::attributes(a.enabled, a.nbf, a.exp, a.created, a.updated);
        m.insert("exportable".into(), json!(a.exportable));
        m
    }

    fn summary(v: &VersionEntry, item: &mut Value) {
        versioned::add_tags(&v.info.tags, item);
    }

    /// A KeyBundle: `{key: JWK, attributes, tags?}`.
    fn bundle(view: &ObjectView<'_>, name: &str, e: &VersionEntry) -> Value {
        let mut key = Map::new();
        key.insert(
            "kid".into(),
            json!(view.id::<Self>(name, Some(e.version.as_str()))),
        );
        key.insert("kty".into(), json!(e.info.kty.as_str()));
        key.insert(
            "key_ops".into(),
            json!(
                e.info
                    .key_ops
                    .iter()
                    .map(|o| o.as_str())
                    .collect::<Vec<_>>()
            ),
        );
        match &e.info.public {
            PublicJwk::Rsa { n, e } => {
                key.insert("n".into(), json!(b64::encode(n)));
                key.insert("e".into(), json!(b64::encode(e)));
            }
            PublicJwk::Ec { crv, x, y } => {
                key.insert("crv".into(), json!(crv));
                key.insert("x".into(), json!(b64::encode(x)));
                key.insert("y".into(), json!(b64::encode(y)));
            }
        }
        let mut out = json!({"key": Value::Object(key), "attributes": view.attributes::<Self>(e)});
        Self::summary(e, &mut out);
        out
    }

    fn empty_bundle(_: &ObjectView<'_>, _: &str) -> Value {
        json!({})
    }

    fn purged(platform: &Platform, vault: &kagi_core::VaultName, e: &KeyEntry) {
        platform.destroy_key_objects(vault, e);
    }
}

versioned::delegations!(
    KeyKind,
    /// `DELETE /keys/{name}`: soft delete of every version.
    delete_key,
    /// `GET /deletedkeys/{name}`.
    get_deleted_key,
    /// `POST /deletedkeys/{name}/recover`.
    recover_deleted_key,
    /// `DELETE /deletedkeys/{name}`: refused while purge protection holds.
    purge_deleted_key,
    /// `GET /keys`.
    list_keys,
    /// `GET /deletedkeys`.
    list_deleted_keys,
    /// `GET /keys/{name}/versions`.
    list_key_versions,
);

impl Platform {
    /// The live vault, with `action` authorized on it.
    fn vault_for(
        &self,
        caller: &Principal,
        vault: &str,
        action: DataAction,
    ) -> Result<(Arc<VaultState>, VaultRecord), KvError> {
        self.object_vault::<KeyKind>(caller, vault, action, None)
    }

    fn key_permission(
        &self,
        caller: &Principal,
        vault: &str,
        name: &str,
        permission: KeyPermission,
    ) -> Result<(Arc<VaultState>, VaultRecord), KvError> {
        self.object_vault::<KeyKind>(caller, vault, DataAction::Key(permission), Some(name))
    }

    /// Seals a new key pair and records it as the next version of `name`.
    async fn add_version(
        &self,
        state: &VaultState,
        record: &VaultRecord,
        name: &ObjectName,
        new: NewVersion,
    ) -> Result<Value, KvError> {
        let NewVersion {
            key,
            kty,
            key_ops,
            attributes,
            tags,
        } = new;
        let version = random_version()?;
        let stored = key
            .stored
            .encode()
            .map_err(|e| internal("encode private key", e))?;
        let sealed_private = self
            .root
            .seal(
                SealPurpose::PrivateKey,
                &private_key_aad(&record.name, name, &version),
                &stored,
            )
            .map_err(|e| internal("seal private key", e))?;
        let info = KeyVersionInfo {
            kty,
            public: public_jwk(key.ops.public_key()),
            key_ops,
            attributes,
            tags,
        };
        let made_in_hsm = match &key.stored {
            StoredPrivateKey::Token(r) => Some(r.clone()),
            StoredPrivateKey::Pkcs8(_) => None,
        };
        let added = self
            .add_object_version::<KeyKind>(state, record, name, |seq| {
                let rec = KeyVersionRecord {
                    version,
                    seq,
                    info,
                    sealed_private,
                };
                (rec.clone(), VersionEntry::with_material(rec, key.ops))
            })
            .await;
        // A version that did not reach the store leaves nothing in the HSM.
        let (shown, entry) = match (added, made_in_hsm) {
            (Ok(added), _) => added,
            (Err(e), Some(r)) => {
                self.destroy_token_key(&r);
                return Err(e);
            }
            (Err(e), None) => return Err(e),
        };
        Ok(KeyKind::bundle(
            &self.object_view(record),
            shown.as_str(),
            &entry,
        ))
    }

    /// `POST /keys/{name}/create`.
    pub async fn create_key(
        &self,
        caller: &Principal,
        vault: &str,
        name: &str,
        params: KeyCreateParameters,
    ) -> Result<Value, KvError> {
        let (state, record) = self.key_permission(caller, vault, name, KeyPermission::Create)?;
        let name = ObjectName::parse(name)?;
        let kty = KeyType::parse(&params.kty)?;
        if kty.is_hsm() && !record.properties.allows_hsm() {
            return Err(KvError::bad_parameter(format!(
                "Key type {} is not supported in a standard vault: HSM-protected keys need the \
                 premium SKU.",
                kty.as_str()
            ))
            .with_inner("KeyTypeNotSupported"));
        }
        check_release_policy(&params.release_policy)?;
        let key_ops = match &params.key_ops {
            Some(ops) => parse_key_ops(ops, kty)?,
            None => kty.default_ops(),
        };
        let tags = params.tags.unwrap_or_default();
        validate_tags(&tags)?;
        let now = self.clock.now();
        let attributes = new_attributes(params.attributes, now)?;
        // Refuse a soft-deleted name before spending time on key generation.
        if let Some(k) = state.key(&name)
            && k.deleted_at.is_some()
        {
            return Err(KvError::deleted_but_recoverable("Key", name.as_str()));
        }
        let spec = if kty.is_rsa() {
            if params.crv.is_some() {
                return Err(KvError::bad_parameter("crv is not valid for RSA keys."));
            }
            let bits = params.key_size.unwrap_or(2048);
            let size = RsaKeySize::from_bits(bits).ok_or_else(|| {
                KvError::bad_parameter(format!(
                    "Key size {bits} is not supported: RSA keys are 2048, 3072 or 4096 bits."
                ))
                .with_inner("KeySizeNotSupported")
            })?;
            if let Some(e) = params.public_exponent
                && e != 65537
            {
                return Err(KvError::bad_parameter(
                    "Only the public exponent 65537 is supported.",
                ));
            }
            KeySpec::Rsa(size)
        } else {
            if params.key_size.is_some_and(|s| s != 0) && params.crv.is_none() {
                return Err(KvError::bad_parameter(
                    "key_size is not valid for EC keys; use crv.",
                ));
            }
            let crv = params.crv.as_deref().unwrap_or("P-256");
            let curve = Curve::from_jwk_name(crv).ok_or_else(|| {
                KvError::bad_parameter(format!(
                    "Curve {} is not supported: EC keys use P-256, P-384, P-521 or P-256K.",
                    kagi_core::ids::printable(crv)
                ))
                .with_inner("CurveNotSupported")
            })?;
            KeySpec::Ec(curve)
        };
        let key = self
            .generate_material(kty, spec_for(spec, &key_ops))
            .await?;
        self.add_version(
            &state,
            &record,
            &name,
            NewVersion {
                key,
                kty,
                key_ops,
                attributes,
                tags,
            },
        )
        .await
    }

    /// `PUT /keys/{name}`: import a JWK with private material.
    pub async fn import_key(
        &self,
        caller: &Principal,
        vault: &str,
        name: &str,
        params: KeyImportParameters,
    ) -> Result<Value, KvError> {
        let (state, record) = self.key_permission(caller, vault, name, KeyPermission::Import)?;
        let name = ObjectName::parse(name)?;
        check_release_policy(&params.release_policy)?;
        let jwk = &params.key;
        let kty = KeyType::parse(jwk.kty.as_deref().unwrap_or(""))?;
        let kty = kty.with_hsm(kty.is_hsm() || params.hsm == Some(true));
        if kty.is_hsm() && !record.properties.allows_hsm() {
            return Err(hsm_needs_premium());
        }
        // Everything the request says is checked before a key reaches the HSM.
        let key_ops = match &jwk.key_ops {
            Some(ops) => parse_key_ops(ops, kty)?,
            None => kty.default_ops(),
        };
        let tags = params.tags.clone().unwrap_or_default();
        validate_tags(&tags)?;
        let attributes = new_attributes(params.attributes.clone(), self.clock.now())?;
        if let Some(k) = state.key(&name)
            && k.deleted_at.is_some()
        {
            return Err(KvError::deleted_but_recoverable("Key", name.as_str()));
        }
        let key = match &jwk.key_hsm {
            Some(blob) => self.import_byok(&state, &record, kty, blob)?,
            None => self.import_material(kty, jwk)?,
        };
        self.add_version(
            &state,
            &record,
            &name,
            NewVersion {
                key,
                kty,
                key_ops,
                attributes,
                tags,
            },
        )
        .await
    }

    /// A BYOK import: the `.byok` blob in `key_hsm`, unwrapped inside the HSM under the
    /// vault's key-exchange key that the blob names (RSA-HSM, `key_ops` with `import`,
    /// enabled and within its dates).
    fn import_byok(
        &self,
        state: &VaultState,
        record: &VaultRecord,
        kty: KeyType,
        blob: &[u8],
    ) -> Result<NewMaterial, KvError> {
        if !kty.is_hsm() {
            return Err(KvError::bad_parameter(
                "A BYOK transfer blob (key_hsm) imports an RSA-HSM or EC-HSM key: set kty \
                 accordingly.",
            ));
        }
        let transfer = parse_transfer_blob(blob)?;
        let (kek_name, kek_version) = kek_of(&transfer.kek_id, &record.name)?;
        let entry = Self::live_object::<KeyKind>(state, &kek_name).map_err(|_| {
            KvError::bad_parameter(format!(
                "The key-exchange key {} named by the BYOK blob is not a key of this vault.",
                kagi_core::ids::printable(&transfer.kek_id)
            ))
        })?;
        let kek = match &kek_version {
            Some(v) => entry.version(v),
            None => entry.latest(),
        }
        .ok_or_else(kek_not_in_hsm)?;
        if kek.info.kty != KeyType::RsaHsm {
            return Err(kek_not_in_hsm());
        }
        kek.info
            .check_operation(KeyOperation::Import, self.clock.now())?;
        // A key that can also decrypt could open the blobs sent under it (keys made before
        // key_ops kept import alone may have both).
        if kek.info.key_ops != [KeyOperation::Import] {
            return Err(kek_not_in_hsm());
        }
        let stored = kek.stored_key(self.root.as_ref(), &record.name, &kek_name)?;
        let key = self.import_transfer(&stored, &transfer.wrapped)?;
        if key.ops.public_key().rsa_bits().is_some() != kty.is_rsa() {
            self.discard_material(&key);
            return Err(KvError::bad_parameter(format!(
                "The key in the BYOK blob is not of type {}.",
                kty.as_str()
            )));
        }
        Ok(key)
    }

    /// `GET /keys/{name}/{version?}`.
    pub fn get_key(
        &self,
        caller: &Principal,
        vault: &str,
        name: &str,
        version: Option<&str>,
    ) -> Result<Value, KvError> {
        let (record, k, v) = self.get_object::<KeyKind>(caller, vault, name, version)?;
        Ok(KeyKind::bundle(
            &self.object_view(&record),
            k.name.as_str(),
            &v,
        ))
    }

    /// `PATCH /keys/{name}/{version?}`.
    pub async fn update_key(
        &self,
        caller: &Principal,
        vault: &str,
        name: &str,
        version: Option<&str>,
        params: KeyUpdateParameters,
    ) -> Result<Value, KvError> {
        let now = self.clock.now();
        self.update_object::<KeyKind>(caller, vault, name, version, |v| {
            check_release_policy(&params.release_policy)?;
            let mut info = v.info.clone();
            if let Some(ops) = &params.key_ops {
                info.key_ops = parse_key_ops(ops, info.kty)?;
            }
            if let Some(a) = params.attributes {
                if a.exportable == Some(true) {
                    return Err(KvError::bad_parameter("kagi keys are never exportable."));
                }
                let t = &mut info.attributes;
                (t.enabled, t.nbf, t.exp) =
                    patch_window((t.enabled, t.nbf, t.exp), (a.enabled, a.nbf, a.exp))?;
            }
            if let Some(tags) = params.tags {
                validate_tags(&tags)?;
                info.tags = tags;
            }
            info.attributes.updated = now;
            Ok(v.with_info(info))
        })
        .await
    }

    /// `POST /keys/{name}/backup`: every version, sealed so that only a kagi holding the same
    /// root key can restore it, and only into a vault of this one's subscription, tenant and
    /// location.
    pub fn backup_key(
        &self,
        caller: &Principal,
        vault: &str,
        name: &str,
    ) -> Result<BackupBlob, KvError> {
        self.backup_object::<KeyKind, _>(caller, vault, name, |record, name, v| {
            // A software key's PKCS#8, or where the HSM keeps the key.
            let stored = v
                .stored_key(self.root.as_ref(), &record.name, name)?
                .encode()
                .map_err(|e| internal("encode for backup", e))?;
            Ok(BackupVersion {
                version: v.version.to_string(),
                seq: v.seq,
                info: v.info.clone(),
                pkcs8: stored.to_vec(),
            })
        })
    }

    /// `POST /keys/restore`: a backup taken in this vault's subscription, tenant and location,
    /// into a vault where the name is free.
    pub async fn restore_key(
        &self,
        caller: &Principal,
        vault: &str,
        blob: BackupBlob,
    ) -> Result<Value, KvError> {
        self.restore_object::<KeyKind, BackupVersion>(caller, vault, blob, |record, name, v| {
            let version = KeyVersion::parse(&v.version).map_err(|_| object_backup::invalid())?;
            if v.info.kty.is_hsm() && !record.properties.allows_hsm() {
                return Err(hsm_needs_premium());
            }
            let stored =
                StoredPrivateKey::decode(&v.pkcs8).map_err(|_| object_backup::invalid())?;
            let key = self
                .restored_material(&stored)
                .map_err(|e| restore_error(e, object_backup::invalid()))?;
            let sealed_private = self
                .root
                .seal(
                    SealPurpose::PrivateKey,
                    &private_key_aad(&record.name, name, &version),
                    &key.stored
                        .encode()
                        .map_err(|e| internal("encode restored key", e))?,
                )
                .map_err(|e| internal("seal restored key", e))?;
            let rec = KeyVersionRecord {
                version,
                seq: v.seq,
                info: v.info.clone(),
                sealed_private,
            };
            Ok((rec.clone(), VersionEntry::with_material(rec, key.ops)))
        })
        .await
    }

    /// `POST /keys/{name}/rotate`: a new version like the current one.
    pub async fn rotate_key(
        &self,
        caller: &Principal,
        vault: &str,
        name: &str,
    ) -> Result<Value, KvError> {
        let (state, record) = self.key_permission(caller, vault, name, KeyPermission::Rotate)?;
        let name = ObjectName::parse(name)?;
        self.rotate_key_version(&state, &record, &name).await
    }

    /// A new version like the current one (`rotate_key`, and the rotation scheduler), with the
    /// rotation policy's `expiryTime` applied (`exp = created + expiryTime`).
    pub(crate) async fn rotate_key_version(
        &self,
        state: &VaultState,
        record: &VaultRecord,
        name: &ObjectName,
    ) -> Result<Value, KvError> {
        let k = Self::live_object::<KeyKind>(state, name)?;
        let current = k
            .latest()
            .ok_or_else(|| KvError::key_not_found(name.as_str(), None))?;
        let kty = current.info.kty;
        let spec = match &current.info.public {
            PublicJwk::Rsa { n, .. } => KeySpec::Rsa(
                RsaKeySize::from_bits((n.len() * 8) as u32)
                    .ok_or_else(|| internal("rotate", "stored RSA key of unsupported size"))?,
            ),
            PublicJwk::Ec { crv, .. } => KeySpec::Ec(
                Curve::from_jwk_name(crv).ok_or_else(|| internal("rotate", "stored curve"))?,
            ),
        };
        let key = self
            .generate_material(kty, spec_for(spec, &current.info.key_ops))
            .await?;
        let now = self.clock.now();
        let attributes = KeyAttributes {
            enabled: true,
            nbf: None,
            exp: self.policy_expiry(&record.name, name, now).await?,
            created: now,
            updated: now,
            exportable: false,
        };
        self.add_version(
            state,
            record,
            name,
            NewVersion {
                key,
                kty,
                key_ops: current.info.key_ops.clone(),
                attributes,
                tags: current.info.tags.clone(),
            },
        )
        .await
    }

    /// The key version for a cryptographic operation, checked for permission, key_ops and
    /// validity window.
    fn crypto_target(
        &self,
        caller: &Principal,
        vault: &str,
        name: &str,
        version: Option<&str>,
        op: KeyOperation,
    ) -> Result<(VaultRecord, ObjectName, Arc<VersionEntry>), KvError> {
        let permission = match op {
            KeyOperation::Encrypt => KeyPermission::Encrypt,
            KeyOperation::Decrypt => KeyPermission::Decrypt,
            KeyOperation::WrapKey => KeyPermission::WrapKey,
            KeyOperation::UnwrapKey => KeyPermission::UnwrapKey,
            KeyOperation::Sign => KeyPermission::Sign,
            KeyOperation::Verify => KeyPermission::Verify,
            KeyOperation::Import | KeyOperation::Export => KeyPermission::Import,
        };
        let action = DataAction::Key(permission);
        let (record, k, v) = self.lookup::<KeyKind>(caller, vault, name, version, action)?;
        v.info.check_operation(op, self.clock.now())?;
        Ok((record, k.name.clone(), v))
    }

    /// The key type of the version that `route` (a cryptographic operation of the data
    /// plane's route table) by `caller` uses, if the caller may use it: what the metrics
    /// count a successful operation under. Reads memory only.
    pub fn crypto_key_type(
        &self,
        caller: &Principal,
        vault: &str,
        route: &kagi_core::routes::DataPlaneRoute<'_>,
    ) -> Option<kagi_core::key::KeyType> {
        let kagi_core::routes::DataPlaneRoute::KeyCrypto(name, version, op) = *route else {
            return None;
        };
        let op = crypto_op(op.segment())?;
        let (_, _, v) = self.crypto_target(caller, vault, name, version, op).ok()?;
        Some(v.info.kty)
    }

    /// `POST /keys/{name}/{version?}/{encrypt|decrypt|wrapkey|unwrapkey}`.
    pub fn key_operation(
        &self,
        caller: &Principal,
        vault: &str,
        name: &str,
        version: Option<&str>,
        segment: &str,
        params: KeyOperationParameters,
    ) -> Result<Value, KvError> {
        let op = crypto_op(&segment.to_ascii_lowercase())
            .filter(|o| !matches!(o, KeyOperation::Sign | KeyOperation::Verify))
            .ok_or_else(|| KvError::bad_parameter("Unknown key operation."))?;
        let alg = EncryptionAlgorithm::from_jwa(&params.alg).ok_or_else(|| {
            KvError::bad_parameter(format!(
                "Algorithm {} is not supported: use RSA-OAEP, RSA-OAEP-256 or RSA1_5.",
                kagi_core::ids::printable(&params.alg)
            ))
        })?;
        if params.iv.is_some() || params.tag.is_some() || params.aad.is_some() {
            return Err(KvError::bad_parameter(
                "iv, aad and tag apply only to symmetric keys, which kagi does not have.",
            ));
        }
        let (record, name, v) = self.crypto_target(caller, vault, name, version, op)?;
        let out = match op {
            KeyOperation::Encrypt | KeyOperation::WrapKey => {
                let key =
                    v.private_key(self.root.as_ref(), self.hsm.as_deref(), &record.name, &name)?;
                key.public_key()
                    .encrypt(alg, &params.value)
                    .map_err(crypto_error)?
            }
            _ => {
                let key =
                    v.private_key(self.root.as_ref(), self.hsm.as_deref(), &record.name, &name)?;
                key.decrypt(alg, &params.value)
                    .map_err(crypto_error)?
                    .to_vec()
            }
        };
        tracing::debug!(vault = %record.name, key = %name, version = %v.version, op = op.as_str(), "key operation");
        Ok(json!({
            "kid": self.object_view(&record).id::<KeyKind>(name.as_str(), Some(v.version.as_str())),
            "value": b64::encode(&out),
        }))
    }

    fn signature_alg(alg: &str, v: &VersionEntry) -> Result<SignatureAlgorithm, KvError> {
        let a = SignatureAlgorithm::from_jwa(alg).ok_or_else(|| {
            KvError::bad_parameter(format!(
                "Algorithm {} is not supported for signing.",
                kagi_core::ids::printable(alg)
            ))
        })?;
        let fits = match &v.info.public {
            PublicJwk::Rsa { .. } => a.is_rsa(),
            PublicJwk::Ec { crv, .. } => a.curve().map(|c| c.jwk_name()) == Some(crv.as_str()),
        };
        if !fits {
            return Err(KvError::bad_parameter(format!(
                "Algorithm {} does not match the key type {}.",
                a.jwa(),
                v.info.kty.as_str()
            )));
        }
        Ok(a)
    }

    /// `POST /keys/{name}/{version?}/sign`.
    pub fn sign(
        &self,
        caller: &Principal,
        vault: &str,
        name: &str,
        version: Option<&str>,
        params: KeySignParameters,
    ) -> Result<Value, KvError> {
        let (record, name, v) =
            self.crypto_target(caller, vault, name, version, KeyOperation::Sign)?;
        let alg = Self::signature_alg(&params.alg, &v)?;
        let key = v.private_key(self.root.as_ref(), self.hsm.as_deref(), &record.name, &name)?;
        let sig = key.sign_digest(alg, &params.value).map_err(crypto_error)?;
        Ok(json!({
            "kid": self.object_view(&record).id::<KeyKind>(name.as_str(), Some(v.version.as_str())),
            "value": b64::encode(&sig),
        }))
    }

    /// `POST /keys/{name}/{version?}/verify`.
    pub fn verify(
        &self,
        caller: &Principal,
        vault: &str,
        name: &str,
        version: Option<&str>,
        params: KeyVerifyParameters,
    ) -> Result<Value, KvError> {
        let (record, name, v) =
            self.crypto_target(caller, vault, name, version, KeyOperation::Verify)?;
        let alg = Self::signature_alg(&params.alg, &v)?;
        let key = v.private_key(self.root.as_ref(), self.hsm.as_deref(), &record.name, &name)?;
        let ok = key
            .public_key()
            .verify_digest(alg, &params.digest, &params.value)
            .map_err(crypto_error)?;
        Ok(json!({ "value": ok }))
    }

    /// `POST /rng`.
    pub fn random(
        &self,
        caller: &Principal,
        vault: &str,
        params: RandomParameters,
    ) -> Result<Value, KvError> {
        let (_, _) = self.vault_for(caller, vault, DataAction::Random)?;
        if !(1..=128).contains(&params.count) {
            return Err(KvError::bad_parameter("count must be between 1 and 128."));
        }
        let bytes =
            kagi_crypto::random_bytes(params.count as usize).map_err(|e| internal("rng", e))?;
        Ok(json!({ "value": b64::encode(&bytes) }))
    }
}

/// The key name and version in a key-exchange key's id
/// (`https://{vault}.{suffix}/keys/{name}/{version?}`), which must be of `vault`.
fn kek_of(
    kid: &str,
    vault: &kagi_core::VaultName,
) -> Result<(ObjectName, Option<KeyVersion>), KvError> {
    let bad = || {
        KvError::bad_parameter(format!(
            "The BYOK blob's header.kid {} is not a key id of the vault '{vault}'.",
            kagi_core::ids::printable(kid)
        ))
    };
    let rest = kid.strip_prefix("https://").ok_or_else(bad)?;
    let (host, path) = rest.split_once('/').ok_or_else(bad)?;
    let host_vault = host.split('.').next().unwrap_or_default();
    if !host_vault.eq_ignore_ascii_case(vault.as_str()) {
        return Err(bad());
    }
    let mut parts = path.trim_end_matches('/').split('/');
    if parts.next() != Some("keys") {
        return Err(bad());
    }
    let name = ObjectName::parse(parts.next().ok_or_else(bad)?).map_err(|_| bad())?;
    let version = match parts.next() {
        Some(v) if !v.is_empty() => Some(KeyVersion::parse(v).map_err(|_| bad())?),
        _ => None,
    };
    if parts.next().is_some() {
        return Err(bad());
    }
    Ok((name, version))
}
