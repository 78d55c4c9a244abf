//! The keys data plane: create, import, get, update, list, delete/recover/purge, backup and
//! restore, rotate, and the cryptographic operations.

use std::sync::Arc;

use kagi_core::access::{DataAction, KeyPermission};
use kagi_core::key::{
    BackupBlob, KeyAttributes, KeyCreateParameters, KeyImportParameters, KeyOperation,
    KeyOperationParameters, KeySignParameters, KeyType, KeyUpdateParameters, KeyVerifyParameters,
    KeyVersionInfo, PublicJwk, RandomParameters, WireKeyAttributes, parse_key_ops, validate_tags,
    validate_times,
};
use kagi_core::paging;
use kagi_core::time::DAY;
use kagi_core::{ErrorCode, KeyVersion, KvError, ObjectName, VaultName, b64};
use kagi_crypto::{
    CryptoError, Curve, EncryptionAlgorithm, KeyPair, PublicKey, RsaKeySize, RsaPrivateComponents,
    SealPurpose, SignatureAlgorithm,
};
use kagi_identity::Principal;
use kagi_store::{KeyRecord, KeyVersionRecord, StoreError, VaultRecord};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::object_backup;
use crate::render::VaultView;
use crate::state::{KeyEntry, VaultState, VersionEntry, private_key_aad};
use crate::{Platform, internal};

/// Paging parameters of a list request.
#[derive(Debug, Default, Clone)]
pub struct ListQuery {
    /// `maxresults`.
    pub maxresults: Option<String>,
    /// `$skiptoken`.
    pub skiptoken: Option<String>,
    /// The api-version to carry into `nextLink`.
    pub api_version: String,
}

fn crypto_error(e: CryptoError) -> KvError {
    match e {
        CryptoError::InvalidInput(m) | CryptoError::Unsupported(m) | CryptoError::InvalidKey(m) => {
            KvError::bad_parameter(m)
        }
        CryptoError::DecryptionFailed => {
            KvError::bad_parameter("The ciphertext could not be decrypted with this key.")
        }
        other => internal("crypto", other),
    }
}

fn store_error(context: &str, e: StoreError) -> KvError {
    internal(context, e)
}

fn random_version() -> Result<KeyVersion, KvError> {
    kagi_crypto::random_array()
        .map(KeyVersion::from_random)
        .map_err(|e| internal("rng", e))
}

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

fn missing_private() -> KvError {
    KvError::bad_parameter(
        "The key to import must contain its private key material (RSA: n, e, d, p, q, dp, dq, \
         qi; EC: crv, x, y, d).",
    )
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
    key: KeyPair,
    kty: KeyType,
    key_ops: Vec<KeyOperation>,
    attributes: KeyAttributes,
    tags: kagi_core::key::Tags,
}

impl Platform {
    fn vault_for(
        &self,
        caller: &Principal,
        vault: &str,
        action: DataAction,
    ) -> Result<(Arc<VaultState>, VaultRecord), KvError> {
        self.vault_for_key(caller, vault, action, None)
    }

    /// The live vault, with `action` authorized on it or on one key (so that role assignments
    /// at key scope count).
    fn vault_for_key(
        &self,
        caller: &Principal,
        vault: &str,
        action: DataAction,
        key: Option<&str>,
    ) -> Result<(Arc<VaultState>, VaultRecord), KvError> {
        let name = VaultName::parse(vault)
            .map_err(|_| KvError::new(ErrorCode::VaultNotFound, "The vault was not found."))?;
        let state = self.usable_vault(&name)?;
        let record = state.record();
        self.authorize_object(caller, &record, action, key.map(|k| ("keys", k)))?;
        Ok((state, record))
    }

    fn view<'a>(&self, record: &'a VaultRecord) -> VaultView<'a> {
        VaultView {
            uri: self.config.vault_uri(&record.name),
            record,
        }
    }

    fn live_key(state: &VaultState, name: &ObjectName) -> Result<KeyEntry, KvError> {
        match state.key(name) {
            Some(k) if k.deleted_at.is_none() => Ok(k),
            _ => Err(KvError::key_not_found(name.as_str(), None)),
        }
    }

    fn pick_version(k: &KeyEntry, version: Option<&str>) -> Result<Arc<VersionEntry>, KvError> {
        match version.filter(|v| !v.is_empty()) {
            None => k.latest().cloned(),
            Some(v) => {
                let v = KeyVersion::parse(v)?;
                k.version(&v).cloned()
            }
        }
        .ok_or_else(|| KvError::key_not_found(k.name.as_str(), version))
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
        let der = key.to_pkcs8().map_err(crypto_error)?;
        let sealed = self
            .root
            .seal(
                SealPurpose::PrivateKey,
                &private_key_aad(&record.name, name, &version),
                &der,
            )
            .map_err(|e| internal("seal private key", e))?;
        let info = KeyVersionInfo {
            kty,
            public: public_jwk(key.public_key()),
            key_ops,
            attributes,
            tags,
        };
        let _w = state.write.lock().await;
        let existing = state.key(name);
        if let Some(k) = &existing
            && k.deleted_at.is_some()
        {
            return Err(KvError::deleted_but_recoverable("Key", name.as_str()));
        }
        let seq = existing
            .as_ref()
            .and_then(|k| k.latest().map(|v| v.seq))
            .unwrap_or(0)
            + 1;
        let rec = KeyVersionRecord {
            version,
            seq,
            info,
            sealed_private: sealed,
        };
        self.store
            .add_key_version(&record.name, name, &rec)
            .await
            .map_err(|e| store_error("add key version", e))?;
        let entry = Arc::new(VersionEntry::with_material(rec, Arc::new(key)));
        let display_name = existing
            .as_ref()
            .map_or_else(|| name.clone(), |k| k.name.clone());
        {
            let mut keys = state.keys_mut();
            let k = keys.entry(name.folded()).or_insert_with(|| KeyEntry {
                name: display_name.clone(),
                deleted_at: None,
                purge_at: None,
                versions: Vec::new(),
            });
            k.versions.push(entry.clone());
        }
        tracing::info!(vault = %record.name, key = %display_name, version = %entry.version, "key version created");
        drop(_w);
        self.after_change(state, kagi_core::event::ObjectType::Key, name)
            .await;
        Ok(self.view(record).bundle(display_name.as_str(), &entry))
    }

    /// `POST /keys/{name}/create`.
    pub async fn create_key(
        &self,
        caller: &Principal,
        vault: &str,
        name: &str,
        params: KeyCreateParameters,
    ) -> Result<Value, KvError> {
        let (state, record) = self.vault_for_key(
            caller,
            vault,
            DataAction::Key(KeyPermission::Create),
            Some(name),
        )?;
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
        let key = if kty.is_rsa() {
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
            // RSA key generation takes up to seconds: keep it off the async workers.
            tokio::task::spawn_blocking(move || KeyPair::generate_rsa(size, None))
                .await
                .map_err(|e| internal("keygen task", e))?
                .map_err(crypto_error)?
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
            KeyPair::generate_ec(curve).map_err(crypto_error)?
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

    /// `PUT /keys/{name}`: import a JWK with private material.
    pub async fn import_key(
        &self,
        caller: &Principal,
        vault: &str,
        name: &str,
        params: KeyImportParameters,
    ) -> Result<Value, KvError> {
        let (state, record) = self.vault_for_key(
            caller,
            vault,
            DataAction::Key(KeyPermission::Import),
            Some(name),
        )?;
        let name = ObjectName::parse(name)?;
        check_release_policy(&params.release_policy)?;
        let jwk = &params.key;
        let kty = KeyType::parse(jwk.kty.as_deref().unwrap_or(""))?;
        let kty = kty.with_hsm(kty.is_hsm() || params.hsm == Some(true));
        if kty.is_hsm() && !record.properties.allows_hsm() {
            return Err(
                KvError::bad_parameter("HSM-protected keys need a premium vault.")
                    .with_inner("KeyTypeNotSupported"),
            );
        }
        if jwk.key_hsm.is_some() {
            return Err(KvError::bad_parameter(
                "BYOK transfer blobs (key_hsm) are not supported; import the key as a JWK.",
            ));
        }
        let key = if kty.is_rsa() {
            fn f(v: &Option<Vec<u8>>) -> Result<&[u8], KvError> {
                v.as_deref().ok_or_else(missing_private)
            }
            KeyPair::rsa_from_components(&RsaPrivateComponents {
                n: f(&jwk.n)?,
                e: f(&jwk.e)?,
                d: f(&jwk.d)?,
                p: f(&jwk.p)?,
                q: f(&jwk.q)?,
                dp: f(&jwk.dp)?,
                dq: f(&jwk.dq)?,
                qi: f(&jwk.qi)?,
            })
            .map_err(crypto_error)?
        } else {
            let crv = jwk.crv.as_deref().ok_or_else(missing_private)?;
            let curve = Curve::from_jwk_name(crv).ok_or_else(|| {
                KvError::bad_parameter("Unsupported curve: P-256, P-384, P-521 or P-256K.")
                    .with_inner("CurveNotSupported")
            })?;
            fn f(v: &Option<Vec<u8>>) -> Result<&[u8], KvError> {
                v.as_deref().ok_or_else(missing_private)
            }
            KeyPair::ec_from_components(curve, f(&jwk.x)?, f(&jwk.y)?, f(&jwk.d)?)
                .map_err(crypto_error)?
        };
        let key_ops = match &jwk.key_ops {
            Some(ops) => parse_key_ops(ops, kty)?,
            None => kty.default_ops(),
        };
        let tags = params.tags.clone().unwrap_or_default();
        validate_tags(&tags)?;
        let attributes = new_attributes(params.attributes.clone(), self.clock.now())?;
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

    /// `GET /keys/{name}/{version?}`.
    pub fn get_key(
        &self,
        caller: &Principal,
        vault: &str,
        name: &str,
        version: Option<&str>,
    ) -> Result<Value, KvError> {
        let (state, record) = self.vault_for_key(
            caller,
            vault,
            DataAction::Key(KeyPermission::Get),
            Some(name),
        )?;
        let name = ObjectName::parse(name)?;
        let k = Self::live_key(&state, &name)?;
        let v = Self::pick_version(&k, version)?;
        Ok(self.view(&record).bundle(k.name.as_str(), &v))
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
        let (state, record) = self.vault_for_key(
            caller,
            vault,
            DataAction::Key(KeyPermission::Update),
            Some(name),
        )?;
        let name = ObjectName::parse(name)?;
        check_release_policy(&params.release_policy)?;
        let _w = state.write.lock().await;
        let k = Self::live_key(&state, &name)?;
        let v = Self::pick_version(&k, version)?;
        let mut info = v.info.clone();
        if let Some(ops) = &params.key_ops {
            info.key_ops = parse_key_ops(ops, info.kty)?;
        }
        if let Some(a) = params.attributes {
            if let Some(e) = a.enabled {
                info.attributes.enabled = e;
            }
            if a.nbf.is_some() {
                info.attributes.nbf = a.nbf;
            }
            if a.exp.is_some() {
                info.attributes.exp = a.exp;
            }
            if a.exportable == Some(true) {
                return Err(KvError::bad_parameter("kagi keys are never exportable."));
            }
            validate_times(info.attributes.nbf, info.attributes.exp)?;
        }
        if let Some(tags) = params.tags {
            validate_tags(&tags)?;
            info.tags = tags;
        }
        info.attributes.updated = self.clock.now();
        self.store
            .update_key_version(&record.name, &name, &v.version, &info)
            .await
            .map_err(|e| store_error("update key", e))?;
        let updated = Arc::new(v.with_info(info));
        {
            let mut keys = state.keys_mut();
            if let Some(entry) = keys.get_mut(&name.folded())
                && let Some(slot) = entry.versions.iter_mut().find(|e| e.version == v.version)
            {
                *slot = updated.clone();
            }
        }
        drop(_w);
        self.after_change(&state, kagi_core::event::ObjectType::Key, &name)
            .await;
        Ok(self.view(&record).bundle(k.name.as_str(), &updated))
    }

    fn next_link(
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

    /// `GET /keys`.
    pub fn list_keys(
        &self,
        caller: &Principal,
        vault: &str,
        q: &ListQuery,
    ) -> Result<Value, KvError> {
        let (state, record) =
            self.vault_for(caller, vault, DataAction::Key(KeyPermission::List))?;
        let size = paging::page_size(q.maxresults.as_deref())?;
        let after = q
            .skiptoken
            .as_deref()
            .map(paging::parse_skip_token)
            .transpose()?;
        let live: Vec<KeyEntry> = state
            .keys()
            .values()
            .filter(|k| k.deleted_at.is_none())
            .cloned()
            .collect();
        let (page, token) = paging::page(live, |k| k.name.folded(), after.as_deref(), size);
        let view = self.view(&record);
        Ok(json!({
            "value": page.iter().map(|k| view.item(k)).collect::<Vec<_>>(),
            "nextLink": self.next_link(&record, "keys", q, token, size),
        }))
    }

    /// `GET /keys/{name}/versions`.
    pub fn list_key_versions(
        &self,
        caller: &Principal,
        vault: &str,
        name: &str,
        q: &ListQuery,
    ) -> Result<Value, KvError> {
        let (state, record) = self.vault_for_key(
            caller,
            vault,
            DataAction::Key(KeyPermission::List),
            Some(name),
        )?;
        let name = ObjectName::parse(name)?;
        let size = paging::page_size(q.maxresults.as_deref())?;
        // Azure answers a name with no live key with an empty list, not 404.
        let Ok(k) = Self::live_key(&state, &name) else {
            return Ok(json!({"value": [], "nextLink": null}));
        };
        let after = q
            .skiptoken
            .as_deref()
            .map(paging::parse_skip_token)
            .transpose()?;
        let (page, token) = paging::page(
            k.versions.clone(),
            |v| v.version.to_string(),
            after.as_deref(),
            size,
        );
        let view = self.view(&record);
        Ok(json!({
            "value": page.iter().map(|v| view.version_item(k.name.as_str(), v)).collect::<Vec<_>>(),
            "nextLink": self.next_link(&record, &format!("keys/{}/versions", k.name), q, token, size),
        }))
    }

    /// `DELETE /keys/{name}`: soft delete of every version.
    pub async fn delete_key(
        &self,
        caller: &Principal,
        vault: &str,
        name: &str,
    ) -> Result<Value, KvError> {
        let (state, record) = self.vault_for_key(
            caller,
            vault,
            DataAction::Key(KeyPermission::Delete),
            Some(name),
        )?;
        let name = ObjectName::parse(name)?;
        let _w = state.write.lock().await;
        let k = Self::live_key(&state, &name)?;
        self.check_not_locked(
            &crate::directory::object_scope(&record, Some(("keys", name.as_str()))),
            "delete",
        )?;
        let now = self.clock.now();
        let purge_at = now + i64::from(record.properties.soft_delete_retention_in_days) * DAY;
        self.store
            .set_key_deleted(&record.name, &name, Some((now, purge_at)))
            .await
            .map_err(|e| store_error("delete key", e))?;
        let mut deleted = k.clone();
        deleted.deleted_at = Some(now);
        deleted.purge_at = Some(purge_at);
        state.keys_mut().insert(name.folded(), deleted.clone());
        tracing::info!(vault = %record.name, key = %k.name, "key soft-deleted");
        drop(_w);
        self.after_change(&state, kagi_core::event::ObjectType::Key, &name)
            .await;
        Ok(self.view(&record).deleted_bundle(&deleted))
    }

    fn deleted_key(state: &VaultState, name: &ObjectName) -> Result<KeyEntry, KvError> {
        match state.key(name) {
            Some(k) if k.deleted_at.is_some() => Ok(k),
            _ => Err(KvError::deleted_key_not_found(name.as_str())),
        }
    }

    /// `GET /deletedkeys/{name}`.
    pub fn get_deleted_key(
        &self,
        caller: &Principal,
        vault: &str,
        name: &str,
    ) -> Result<Value, KvError> {
        let (state, record) = self.vault_for_key(
            caller,
            vault,
            DataAction::Key(KeyPermission::Get),
            Some(name),
        )?;
        let name = ObjectName::parse(name)?;
        let k = Self::deleted_key(&state, &name)?;
        Ok(self.view(&record).deleted_bundle(&k))
    }

    /// `GET /deletedkeys`.
    pub fn list_deleted_keys(
        &self,
        caller: &Principal,
        vault: &str,
        q: &ListQuery,
    ) -> Result<Value, KvError> {
        let (state, record) =
            self.vault_for(caller, vault, DataAction::Key(KeyPermission::List))?;
        let size = paging::page_size(q.maxresults.as_deref())?;
        let after = q
            .skiptoken
            .as_deref()
            .map(paging::parse_skip_token)
            .transpose()?;
        let deleted: Vec<KeyEntry> = state
            .keys()
            .values()
            .filter(|k| k.deleted_at.is_some())
            .cloned()
            .collect();
        let (page, token) = paging::page(deleted, |k| k.name.folded(), after.as_deref(), size);
        let view = self.view(&record);
        Ok(json!({
            "value": page.iter().map(|k| view.deleted_item(k)).collect::<Vec<_>>(),
            "nextLink": self.next_link(&record, "deletedkeys", q, token, size),
        }))
    }

    /// `POST /deletedkeys/{name}/recover`.
    pub async fn recover_deleted_key(
        &self,
        caller: &Principal,
        vault: &str,
        name: &str,
    ) -> Result<Value, KvError> {
        let (state, record) = self.vault_for_key(
            caller,
            vault,
            DataAction::Key(KeyPermission::Recover),
            Some(name),
        )?;
        let name = ObjectName::parse(name)?;
        let _w = state.write.lock().await;
        let mut k = Self::deleted_key(&state, &name)?;
        self.store
            .set_key_deleted(&record.name, &name, None)
            .await
            .map_err(|e| store_error("recover key", e))?;
        k.deleted_at = None;
        k.purge_at = None;
        state.keys_mut().insert(name.folded(), k.clone());
        tracing::info!(vault = %record.name, key = %k.name, "key recovered");
        drop(_w);
        self.after_change(&state, kagi_core::event::ObjectType::Key, &name)
            .await;
        let latest = k
            .latest()
            .ok_or_else(|| internal("recover", "key without versions"))?;
        Ok(self.view(&record).bundle(k.name.as_str(), latest))
    }

    /// `DELETE /deletedkeys/{name}`: refused while purge protection holds.
    pub async fn purge_deleted_key(
        &self,
        caller: &Principal,
        vault: &str,
        name: &str,
    ) -> Result<(), KvError> {
        let (state, record) = self.vault_for_key(
            caller,
            vault,
            DataAction::Key(KeyPermission::Purge),
            Some(name),
        )?;
        let name = ObjectName::parse(name)?;
        let _w = state.write.lock().await;
        let k = Self::deleted_key(&state, &name)?;
        self.check_not_locked(
            &crate::directory::object_scope(&record, Some(("keys", name.as_str()))),
            "delete",
        )?;
        if record.properties.enable_purge_protection
            && k.purge_at.is_some_and(|t| self.clock.now() < t)
        {
            return Err(KvError::forbidden(format!(
                "Operation \"purge\" is not allowed because purge protection is enabled for this \
                 vault. Key Vault service will automatically purge it after the retention \
                 period has passed ({}).",
                kagi_core::time::rfc3339(k.purge_at.unwrap_or_default())
            ))
            .with_inner("PurgeProtectionEnabled"));
        }
        self.store
            .purge_key(&record.name, &name)
            .await
            .map_err(|e| store_error("purge key", e))?;
        state.keys_mut().remove(&name.folded());
        tracing::info!(vault = %record.name, key = %k.name, "key purged");
        Ok(())
    }

    /// Purges the vault's deleted keys whose retention has ended.
    pub(crate) async fn purge_expired_keys(
        &self,
        state: &VaultState,
        now: i64,
    ) -> Result<usize, KvError> {
        let record = state.record();
        let due: Vec<ObjectName> = state
            .keys()
            .values()
            .filter(|k| k.purge_at.is_some_and(|t| t <= now))
            .map(|k| k.name.clone())
            .collect();
        let mut purged = 0;
        for name in &due {
            let _w = state.write.lock().await;
            // Re-check under the lock: a recover may have run since the scan.
            if !state
                .key(name)
                .is_some_and(|k| k.deleted_at.is_some() && k.purge_at.is_some_and(|t| t <= now))
            {
                continue;
            }
            purged += 1;
            self.store
                .purge_key(&record.name, name)
                .await
                .map_err(|e| store_error("purge expired key", e))?;
            state.keys_mut().remove(&name.folded());
            tracing::info!(vault = %record.name, key = %name, "deleted key purged after retention");
        }
        Ok(purged)
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
        let (state, record) = self.vault_for_key(
            caller,
            vault,
            DataAction::Key(KeyPermission::Backup),
            Some(name),
        )?;
        let name = ObjectName::parse(name)?;
        let k = Self::live_key(&state, &name)?;
        let mut versions = Vec::with_capacity(k.versions.len());
        for v in &k.versions {
            let der = self
                .root
                .open(
                    SealPurpose::PrivateKey,
                    &private_key_aad(&record.name, &name, &v.version),
                    &v.sealed_private,
                )
                .map_err(|e| internal("unseal for backup", e))?;
            versions.push(BackupVersion {
                version: v.version.to_string(),
                seq: v.seq,
                info: v.info.clone(),
                pkcs8: der.to_vec(),
            });
        }
        let blob =
            self.seal_object_backup(&object_backup::KEYS, &record, k.name.as_str(), versions)?;
        tracing::info!(vault = %record.name, key = %k.name, "key backed up");
        Ok(blob)
    }

    /// `POST /keys/restore`: a backup taken in this vault's subscription, tenant and location,
    /// into a vault where the name is free.
    pub async fn restore_key(
        &self,
        caller: &Principal,
        vault: &str,
        blob: BackupBlob,
    ) -> Result<Value, KvError> {
        let (state, record) =
            self.vault_for(caller, vault, DataAction::Key(KeyPermission::Restore))?;
        let (name, payload): (_, Vec<BackupVersion>) =
            self.open_object_backup(&object_backup::KEYS, caller, &record, &blob)?;
        let mut versions = Vec::with_capacity(payload.len());
        let mut materials = Vec::with_capacity(payload.len());
        for v in &payload {
            let version = KeyVersion::parse(&v.version).map_err(|_| object_backup::invalid())?;
            let key = KeyPair::from_pkcs8(&v.pkcs8).map_err(|_| object_backup::invalid())?;
            let sealed = self
                .root
                .seal(
                    SealPurpose::PrivateKey,
                    &private_key_aad(&record.name, &name, &version),
                    &v.pkcs8,
                )
                .map_err(|e| internal("seal restored key", e))?;
            versions.push(KeyVersionRecord {
                version,
                seq: v.seq,
                info: v.info.clone(),
                sealed_private: sealed,
            });
            materials.push(Arc::new(key));
        }
        let _w = state.write.lock().await;
        match state.key(&name) {
            Some(k) if k.deleted_at.is_some() => {
                return Err(KvError::deleted_but_recoverable("Key", name.as_str()));
            }
            Some(_) => {
                return Err(KvError::conflict(format!(
                    "Key {name} already exists in this vault; restore needs a name that is not in use."
                )));
            }
            None => {}
        }
        let rec = KeyRecord {
            name: name.clone(),
            deleted_at: None,
            purge_at: None,
            versions,
        };
        self.store
            .insert_key(&record.name, &rec)
            .await
            .map_err(|e| match e {
                StoreError::Conflict(m) => KvError::conflict(m),
                e => store_error("restore key", e),
            })?;
        let entry = KeyEntry {
            name: name.clone(),
            deleted_at: None,
            purge_at: None,
            versions: rec
                .versions
                .into_iter()
                .zip(materials)
                .map(|(r, m)| Arc::new(VersionEntry::with_material(r, m)))
                .collect(),
        };
        state.keys_mut().insert(name.folded(), entry.clone());
        tracing::info!(vault = %record.name, key = %name, "key restored");
        drop(_w);
        self.after_change(&state, kagi_core::event::ObjectType::Key, &name)
            .await;
        let latest = entry.latest().ok_or_else(object_backup::invalid)?;
        Ok(self.view(&record).bundle(name.as_str(), latest))
    }

    /// `POST /keys/{name}/rotate`: a new version like the current one.
    pub async fn rotate_key(
        &self,
        caller: &Principal,
        vault: &str,
        name: &str,
    ) -> Result<Value, KvError> {
        let (state, record) = self.vault_for_key(
            caller,
            vault,
            DataAction::Key(KeyPermission::Rotate),
            Some(name),
        )?;
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
        let k = Self::live_key(state, name)?;
        let current = k
            .latest()
            .ok_or_else(|| KvError::key_not_found(name.as_str(), None))?;
        let kty = current.info.kty;
        let key = match &current.info.public {
            PublicJwk::Rsa { n, .. } => {
                let size = RsaKeySize::from_bits((n.len() * 8) as u32)
                    .ok_or_else(|| internal("rotate", "stored RSA key of unsupported size"))?;
                tokio::task::spawn_blocking(move || KeyPair::generate_rsa(size, None))
                    .await
                    .map_err(|e| internal("keygen task", e))?
                    .map_err(crypto_error)?
            }
            PublicJwk::Ec { crv, .. } => {
                let curve =
                    Curve::from_jwk_name(crv).ok_or_else(|| internal("rotate", "stored curve"))?;
                KeyPair::generate_ec(curve).map_err(crypto_error)?
            }
        };
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
        let (state, record) =
            self.vault_for_key(caller, vault, DataAction::Key(permission), Some(name))?;
        let name = ObjectName::parse(name)?;
        let k = Self::live_key(&state, &name)?;
        let v = Self::pick_version(&k, version)?;
        v.info.check_operation(op, self.clock.now())?;
        Ok((record, k.name.clone(), v))
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
                let key = v.key_pair(self.root.as_ref(), &record.name, &name)?;
                key.public_key()
                    .encrypt(alg, &params.value)
                    .map_err(crypto_error)?
            }
            _ => {
                let key = v.key_pair(self.root.as_ref(), &record.name, &name)?;
                key.decrypt(alg, &params.value)
                    .map_err(crypto_error)?
                    .to_vec()
            }
        };
        tracing::debug!(vault = %record.name, key = %name, version = %v.version, op = op.as_str(), "key operation");
        Ok(json!({
            "kid": self.view(&record).key_id(name.as_str(), Some(v.version.as_str())),
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
        let key = v.key_pair(self.root.as_ref(), &record.name, &name)?;
        let sig = key.sign_digest(alg, &params.value).map_err(crypto_error)?;
        Ok(json!({
            "kid": self.view(&record).key_id(name.as_str(), Some(v.version.as_str())),
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
        let key = v.key_pair(self.root.as_ref(), &record.name, &name)?;
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
