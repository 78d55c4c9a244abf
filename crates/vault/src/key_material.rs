//! Where a key version's private key is made and kept: in software (sealed PKCS#8), or
//! inside the HSM for RSA-HSM and EC-HSM keys; and Azure's BYOK transfer blobs.

use std::sync::Arc;

use kagi_core::key::{JsonWebKey, KeyType};
use kagi_core::{KvError, VaultName};
use kagi_crypto::{
    CryptoError, Curve, KeyPair, KeyProvider, KeySpec, PrivateKeyOps, RsaPrivateComponents,
    StoredPrivateKey, TokenKeyRef,
};
use serde::Deserialize;

use crate::state::{KeyEntry, VaultState};
use crate::{Platform, hsm_error, internal};

/// Crypto failures as Azure errors: the caller's input is 400, an unreachable HSM 503.
pub(crate) fn crypto_error(e: CryptoError) -> KvError {
    match e {
        CryptoError::InvalidInput(m) | CryptoError::Unsupported(m) | CryptoError::InvalidKey(m) => {
            KvError::bad_parameter(m)
        }
        CryptoError::DecryptionFailed => {
            KvError::bad_parameter("The ciphertext could not be decrypted with this key.")
        }
        e @ (CryptoError::KeyUnavailable(_) | CryptoError::KeyNotHeld(_)) => hsm_error(e),
        other => internal("crypto", other),
    }
}

/// A restore that needs an HSM key this kagi's HSM does not hold (another token, no token,
/// or the key purged from it) does not fit here: 400, not a retryable 503, with the details
/// (token label, object id) in the log only. A token that fails is 503.
pub(crate) fn restore_error(e: CryptoError, otherwise: KvError) -> KvError {
    match e {
        CryptoError::KeyNotHeld(m) => {
            tracing::warn!(reason = %m, "restore of an HSM key refused");
            KvError::bad_parameter(
                "The backup holds an HSM-protected key that this kagi's HSM does not hold: it \
                 was purged, or the backup comes from another HSM. An HSM key's backup restores \
                 only where the same HSM still holds the key.",
            )
        }
        e @ CryptoError::KeyUnavailable(_) => hsm_error(e),
        _ => otherwise,
    }
}

/// The answer for an HSM key type in a standard vault (Azure's).
pub(crate) fn hsm_needs_premium() -> KvError {
    KvError::bad_parameter("HSM-protected keys need a premium vault.")
        .with_inner("KeyTypeNotSupported")
}

/// `spec`, as a key-exchange key when `key_ops` are exactly `["import"]` (the HSM then
/// makes it unable to decrypt or sign).
pub(crate) fn spec_for(spec: KeySpec, key_ops: &[kagi_core::key::KeyOperation]) -> KeySpec {
    match spec {
        KeySpec::Rsa(size) if key_ops == [kagi_core::key::KeyOperation::Import] => {
            KeySpec::RsaKeyExchange(size)
        }
        other => other,
    }
}

/// A new version's private key: its operations and what the version keeps of it.
pub(crate) struct NewMaterial {
    /// The key's operations.
    pub(crate) ops: Arc<dyn PrivateKeyOps>,
    /// What is sealed into the version.
    pub(crate) stored: StoredPrivateKey,
}

impl NewMaterial {
    fn software(key: KeyPair) -> Result<Self, KvError> {
        let der = key.to_pkcs8().map_err(crypto_error)?;
        Ok(Self {
            ops: Arc::new(key),
            stored: StoredPrivateKey::Pkcs8(der),
        })
    }

    fn provided(p: kagi_crypto::ProvidedKey) -> Self {
        Self {
            ops: p.ops,
            stored: StoredPrivateKey::Token(p.reference),
        }
    }
}

fn missing_private() -> KvError {
    KvError::bad_parameter(
        "The key to import must contain its private key material (RSA: n, e, d, p, q, dp, dq, \
         qi; EC: crv, x, y, d).",
    )
}

/// One field of a JWK to import.
fn field(v: &Option<Vec<u8>>) -> Result<&[u8], KvError> {
    v.as_deref().ok_or_else(missing_private)
}

/// A `.byok` file (Azure's BYOK transfer blob), as carried in a JWK's `key_hsm`.
#[derive(Deserialize)]
struct TransferBlob {
    header: TransferHeader,
    ciphertext: String,
}

#[derive(Deserialize)]
struct TransferHeader {
    kid: String,
    #[serde(default)]
    enc: Option<String>,
}

/// A parsed transfer blob: the key-exchange key's id and the wrapped target.
pub(crate) struct Transfer {
    /// The key-exchange key (`https://{vault}…/keys/{name}/{version}`).
    pub(crate) kek_id: String,
    /// `CKM_RSA_AES_KEY_WRAP` output.
    pub(crate) wrapped: Vec<u8>,
}

/// Reads the `.byok` JSON carried in `key_hsm`.
pub(crate) fn parse_transfer_blob(bytes: &[u8]) -> Result<Transfer, KvError> {
    let bad = |why: &str| {
        KvError::bad_parameter(format!(
            "key_hsm is not a BYOK transfer blob: {why}. It is the .byok file (JSON with \
             header.kid, header.enc = CKM_RSA_AES_KEY_WRAP and ciphertext) made against this \
             vault's key-exchange key."
        ))
    };
    let blob: TransferBlob =
        serde_json::from_slice(bytes).map_err(|_| bad("it is not the expected JSON"))?;
    match blob.header.enc.as_deref() {
        None | Some("CKM_RSA_AES_KEY_WRAP") => {}
        // RSA-OAEP with SHA-256 for the transfer key: the HSM kagi is tested with has OAEP
        // with SHA-1 only, and the AES key must not leave it.
        Some("RSA_AES_KEY_WRAP_256") => {
            return Err(KvError::bad_parameter(
                "BYOK blobs wrapped with RSA_AES_KEY_WRAP_256 are not supported: make the blob \
                 with CKM_RSA_AES_KEY_WRAP (RSA-OAEP-SHA1 and AES key wrap with padding).",
            ));
        }
        Some(_) => return Err(bad("header.enc is not CKM_RSA_AES_KEY_WRAP")),
    }
    // base64url as Azure's BYOK tools write it; standard base64 from other generators.
    let wrapped = kagi_core::b64::decode(&blob.ciphertext)
        .or_else(|| {
            use base64::Engine as _;
            base64::engine::general_purpose::STANDARD
                .decode(&blob.ciphertext)
                .ok()
        })
        .ok_or_else(|| bad("ciphertext is not base64"))?;
    Ok(Transfer {
        kek_id: blob.header.kid,
        wrapped,
    })
}

impl Platform {
    /// The HSM, for a key type that needs one.
    pub(crate) fn hsm_for_keys(&self) -> Result<Arc<dyn KeyProvider>, KvError> {
        self.hsm.clone().ok_or_else(|| {
            KvError::bad_parameter(
                "HSM-protected keys (RSA-HSM, EC-HSM) need an HSM, and this kagi runs without \
                 one: start it with --pkcs11-module, --pkcs11-token and --pkcs11-pin-file.",
            )
            .with_inner("KeyTypeNotSupported")
        })
    }

    /// Generates a key: inside the HSM for HSM key types, in software otherwise. RSA key
    /// generation takes up to seconds, so it runs off the async workers.
    pub(crate) async fn generate_material(
        &self,
        kty: KeyType,
        spec: KeySpec,
    ) -> Result<NewMaterial, KvError> {
        let hsm = if kty.is_hsm() {
            Some(self.hsm_for_keys()?)
        } else {
            None
        };
        tokio::task::spawn_blocking(move || match hsm {
            Some(hsm) => hsm
                .generate(spec)
                .map(NewMaterial::provided)
                .map_err(crypto_error),
            None => match spec {
                KeySpec::Rsa(size) | KeySpec::RsaKeyExchange(size) => {
                    KeyPair::generate_rsa(size, None)
                }
                KeySpec::Ec(curve) => KeyPair::generate_ec(curve),
            }
            .map_err(crypto_error)
            .and_then(NewMaterial::software),
        })
        .await
        .map_err(|e| internal("keygen task", e))?
    }

    /// Takes in a JWK's private key: checked in software, then kept sealed (software key
    /// types) or moved into the HSM.
    pub(crate) fn import_material(
        &self,
        kty: KeyType,
        jwk: &JsonWebKey,
    ) -> Result<NewMaterial, KvError> {
        let hsm = if kty.is_hsm() {
            Some(self.hsm_for_keys()?)
        } else {
            None
        };
        if kty.is_rsa() {
            let c = RsaPrivateComponents {
                n: field(&jwk.n)?,
                e: field(&jwk.e)?,
                d: field(&jwk.d)?,
                p: field(&jwk.p)?,
                q: field(&jwk.q)?,
                dp: field(&jwk.dp)?,
                dq: field(&jwk.dq)?,
                qi: field(&jwk.qi)?,
            };
            // Checks the components agree before anything reaches the token.
            let key = KeyPair::rsa_from_components(&c).map_err(crypto_error)?;
            return match hsm {
                Some(hsm) => hsm
                    .import_rsa(&c)
                    .map(NewMaterial::provided)
                    .map_err(crypto_error),
                None => NewMaterial::software(key),
            };
        }
        let crv = jwk.crv.as_deref().ok_or_else(missing_private)?;
        let curve = Curve::from_jwk_name(crv).ok_or_else(|| {
            KvError::bad_parameter("Unsupported curve: P-256, P-384, P-521 or P-256K.")
                .with_inner("CurveNotSupported")
        })?;
        let (x, y, d) = (field(&jwk.x)?, field(&jwk.y)?, field(&jwk.d)?);
        let key = KeyPair::ec_from_components(curve, x, y, d).map_err(crypto_error)?;
        match hsm {
            Some(hsm) => {
                let len = curve.coordinate_len();
                let fixed = |v: &[u8]| -> Vec<u8> {
                    let v = &v[v.len().saturating_sub(len)..];
                    let mut out = vec![0u8; len - v.len()];
                    out.extend_from_slice(v);
                    out
                };
                let d = zeroize::Zeroizing::new(fixed(d));
                hsm.import_ec(curve, &fixed(x), &fixed(y), &d)
                    .map(NewMaterial::provided)
                    .map_err(crypto_error)
            }
            None => NewMaterial::software(key),
        }
    }

    /// Unwraps a BYOK transfer blob inside the HSM under the key-exchange key `kek`.
    pub(crate) fn import_transfer(
        &self,
        kek: &StoredPrivateKey,
        wrapped: &[u8],
    ) -> Result<NewMaterial, KvError> {
        let hsm = self.hsm_for_keys()?;
        let StoredPrivateKey::Token(kek) = kek else {
            return Err(kek_not_in_hsm());
        };
        hsm.import_wrapped(kek, wrapped)
            .map(NewMaterial::provided)
            .map_err(|e| match e {
                CryptoError::DecryptionFailed => KvError::bad_parameter(
                    "The BYOK transfer blob does not unwrap under its key-exchange key: it was \
                     made for another key, or is damaged.",
                ),
                other => crypto_error(other),
            })
    }

    /// A restored version's material: a software key parsed again, a token key copied to a
    /// new object (so purging one version never destroys another's key).
    pub(crate) fn restored_material(
        &self,
        stored: &StoredPrivateKey,
    ) -> Result<NewMaterial, CryptoError> {
        match stored {
            StoredPrivateKey::Pkcs8(der) => Ok(NewMaterial {
                ops: Arc::new(KeyPair::from_pkcs8(der)?),
                stored: StoredPrivateKey::Pkcs8(der.clone()),
            }),
            StoredPrivateKey::Token(r) => match &self.hsm {
                Some(hsm) => hsm.copy(r).map(NewMaterial::provided),
                None => Err(CryptoError::KeyNotHeld(format!(
                    "the backup holds keys of the HSM token '{}', and this kagi runs without an \
                     HSM",
                    r.token
                ))),
            },
        }
    }

    /// Destroys the HSM objects of a purged key's versions. The store no longer names them,
    /// so a failure here leaves an orphan object in the token (logged), never a broken
    /// version.
    pub(crate) fn destroy_key_objects(&self, vault: &VaultName, e: &KeyEntry) {
        for v in &e.versions {
            if let Ok(StoredPrivateKey::Token(r)) = v.stored_key(self.root.as_ref(), vault, &e.name)
            {
                self.destroy_token_key(&r);
            }
        }
    }

    /// Destroys one HSM key (best effort, logged: its version is gone or never existed).
    pub(crate) fn destroy_token_key(&self, r: &TokenKeyRef) {
        let Some(hsm) = &self.hsm else {
            tracing::warn!(token = %r.token, "an HSM key was purged while kagi runs without its HSM; its object stays in the token");
            return;
        };
        if let Err(err) = hsm.destroy(r) {
            tracing::warn!(token = %r.token, error = %err, "could not destroy an HSM key; the object stays in the token");
        }
    }

    /// Destroys new material that will not be kept (an HSM object; nothing for software).
    pub(crate) fn discard_material(&self, m: &NewMaterial) {
        if let StoredPrivateKey::Token(r) = &m.stored {
            self.destroy_token_key(r);
        }
    }

    /// [`Self::destroy_key_objects`] for every key of a purged vault.
    pub(crate) fn destroy_vault_key_objects(&self, state: &VaultState) {
        let name = state.record().name;
        let keys: Vec<KeyEntry> = state.keys().values().cloned().collect();
        for e in &keys {
            self.destroy_key_objects(&name, e);
        }
    }
}

/// The answer for a key-exchange key that is not an HSM key.
pub(crate) fn kek_not_in_hsm() -> KvError {
    KvError::bad_parameter(
        "The key-exchange key of a BYOK import must be an RSA-HSM key with key_ops [\"import\"] \
         in this vault.",
    )
}
