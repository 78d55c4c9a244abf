//! Keys as Key Vault models them: types, operations, attributes, and the wire shapes of the
//! keys API (JSON Web Key, KeyBundle, requests).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{KvError, b64};

/// A key type (`kty`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum KeyType {
    /// RSA, software-protected.
    #[serde(rename = "RSA")]
    Rsa,
    /// RSA, HSM-protected.
    #[serde(rename = "RSA-HSM")]
    RsaHsm,
    /// Elliptic curve, software-protected.
    #[serde(rename = "EC")]
    Ec,
    /// Elliptic curve, HSM-protected.
    #[serde(rename = "EC-HSM")]
    EcHsm,
}

impl KeyType {
    /// Parses `kty`; anything but the four supported types is refused with Azure's error.
    pub fn parse(text: &str) -> Result<Self, KvError> {
        match text {
            "RSA" => Ok(Self::Rsa),
            "RSA-HSM" => Ok(Self::RsaHsm),
            "EC" => Ok(Self::Ec),
            "EC-HSM" => Ok(Self::EcHsm),
            other => Err(KvError::bad_parameter(format!(
                "Invalid kty '{}': kagi supports RSA, RSA-HSM, EC and EC-HSM keys.",
                crate::ids::printable(other)
            ))
            .with_inner("KeyTypeNotSupported")),
        }
    }

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Rsa => "RSA",
            Self::RsaHsm => "RSA-HSM",
            Self::Ec => "EC",
            Self::EcHsm => "EC-HSM",
        }
    }

    /// Whether this is an RSA type.
    pub fn is_rsa(self) -> bool {
        matches!(self, Self::Rsa | Self::RsaHsm)
    }

    /// Whether the type is HSM-protected (needs a premium vault).
    pub fn is_hsm(self) -> bool {
        matches!(self, Self::RsaHsm | Self::EcHsm)
    }

    /// The same family with or without HSM protection.
    pub fn with_hsm(self, hsm: bool) -> Self {
        match (self.is_rsa(), hsm) {
            (true, true) => Self::RsaHsm,
            (true, false) => Self::Rsa,
            (false, true) => Self::EcHsm,
            (false, false) => Self::Ec,
        }
    }

    /// The operations a new key of this type allows when the request names none.
    pub fn default_ops(self) -> Vec<KeyOperation> {
        use KeyOperation::*;
        if self.is_rsa() {
            vec![Encrypt, Decrypt, Sign, Verify, WrapKey, UnwrapKey]
        } else {
            vec![Sign, Verify]
        }
    }
}

/// A key operation (`key_ops` entry), also the name of a crypto endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum KeyOperation {
    /// Encrypt with the public key.
    #[serde(rename = "encrypt")]
    Encrypt,
    /// Decrypt with the private key.
    #[serde(rename = "decrypt")]
    Decrypt,
    /// Sign a digest.
    #[serde(rename = "sign")]
    Sign,
    /// Verify a signature.
    #[serde(rename = "verify")]
    Verify,
    /// Wrap a key.
    #[serde(rename = "wrapKey")]
    WrapKey,
    /// Unwrap a key.
    #[serde(rename = "unwrapKey")]
    UnwrapKey,
    /// Import: marks a BYOK key-exchange key, whose `key_ops` are exactly `["import"]`.
    #[serde(rename = "import")]
    Import,
    /// Export (accepted in `key_ops` for compatibility; kagi never exports private keys).
    #[serde(rename = "export")]
    Export,
}

impl KeyOperation {
    /// Parses an operation name (case-sensitive, as Azure).
    pub fn parse(text: &str) -> Result<Self, KvError> {
        serde_json::from_value(serde_json::Value::String(text.to_string())).map_err(|_| {
            KvError::bad_parameter(format!(
                "Invalid key operation '{}'.",
                crate::ids::printable(text)
            ))
        })
    }

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Encrypt => "encrypt",
            Self::Decrypt => "decrypt",
            Self::Sign => "sign",
            Self::Verify => "verify",
            Self::WrapKey => "wrapKey",
            Self::UnwrapKey => "unwrapKey",
            Self::Import => "import",
            Self::Export => "export",
        }
    }

    /// Whether this operation is meaningful for a key type.
    pub fn fits(self, kty: KeyType) -> bool {
        use KeyOperation::*;
        match self {
            Sign | Verify | Import | Export => true,
            Encrypt | Decrypt | WrapKey | UnwrapKey => kty.is_rsa(),
        }
    }
}

/// Public key material of a version, as the JWK fields that describe it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum PublicJwk {
    /// RSA modulus and exponent, big-endian.
    Rsa {
        /// Modulus.
        #[serde(with = "b64::bytes")]
        n: Vec<u8>,
        /// Public exponent.
        #[serde(with = "b64::bytes")]
        e: Vec<u8>,
    },
    /// EC point.
    Ec {
        /// Curve name (`P-256`, `P-384`, `P-521`, `P-256K`).
        crv: String,
        /// X coordinate.
        #[serde(with = "b64::bytes")]
        x: Vec<u8>,
        /// Y coordinate.
        #[serde(with = "b64::bytes")]
        y: Vec<u8>,
    },
}

/// Attributes of a key version as kagi keeps them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyAttributes {
    /// Whether the version may be used.
    pub enabled: bool,
    /// Not before (Unix seconds).
    pub nbf: Option<i64>,
    /// Expiry (Unix seconds).
    pub exp: Option<i64>,
    /// Creation time.
    pub created: i64,
    /// Last update time.
    pub updated: i64,
    /// Whether the private key may be exported (always false in kagi).
    #[serde(default)]
    pub exportable: bool,
}

impl KeyAttributes {
    /// Checks that a cryptographic operation may use this version at `now`. A disabled key
    /// refuses everything (403). Outside its nbf/exp window only the operations that produce
    /// protected data (encrypt, wrapKey, sign) are refused — decrypt, unwrapKey and verify keep
    /// working, as Azure documents, so data protected before expiry stays recoverable.
    pub fn check_usable(&self, op: KeyOperation, now: i64) -> Result<(), KvError> {
        if !self.enabled {
            return Err(KvError::forbidden(format!(
                "Operation {} is not allowed on a disabled key.",
                op.as_str()
            ))
            .with_inner("KeyDisabled"));
        }
        if !matches!(
            op,
            KeyOperation::Encrypt | KeyOperation::WrapKey | KeyOperation::Sign
        ) {
            return Ok(());
        }
        if let Some(nbf) = self.nbf
            && now < nbf
        {
            return Err(KvError::forbidden(format!(
                "Operation {} is not allowed on a key that is not yet valid (nbf {}).",
                op.as_str(),
                crate::time::rfc3339(nbf)
            ))
            .with_inner("KeyNotYetValid"));
        }
        if let Some(exp) = self.exp
            && now >= exp
        {
            return Err(KvError::forbidden(format!(
                "Operation {} is not allowed on an expired key (exp {}).",
                op.as_str(),
                crate::time::rfc3339(exp)
            ))
            .with_inner("KeyExpired"));
        }
        Ok(())
    }
}

/// Tags: at most 15, names up to 512 and values up to 256 characters (Azure's limits).
pub type Tags = BTreeMap<String, String>;

/// Validates tags against Azure's limits.
pub fn validate_tags(tags: &Tags) -> Result<(), KvError> {
    if tags.len() > 15 {
        return Err(KvError::bad_parameter(
            "Too many tags: an object can have at most 15 tags.",
        ));
    }
    for (k, v) in tags {
        if k.is_empty() || k.chars().count() > 512 || v.chars().count() > 256 {
            return Err(KvError::bad_parameter(
                "Invalid tag: names must be 1-512 characters and values at most 256.",
            ));
        }
    }
    Ok(())
}

/// Everything about one key version except its private material.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyVersionInfo {
    /// Key type.
    pub kty: KeyType,
    /// Public material.
    pub public: PublicJwk,
    /// Permitted operations.
    pub key_ops: Vec<KeyOperation>,
    /// Attributes.
    pub attributes: KeyAttributes,
    /// Tags.
    #[serde(default)]
    pub tags: Tags,
}

impl KeyVersionInfo {
    /// Checks that `op` is permitted by this version's `key_ops` and state at `now`.
    pub fn check_operation(&self, op: KeyOperation, now: i64) -> Result<(), KvError> {
        if !op.fits(self.kty) {
            return Err(KvError::bad_parameter(format!(
                "Operation {} is not supported for {} keys.",
                op.as_str(),
                self.kty.as_str()
            )));
        }
        if !self.key_ops.contains(&op) {
            return Err(KvError::forbidden(format!(
                "Operation {} is not permitted on this key.",
                op.as_str()
            ))
            .with_inner("KeyOperationForbidden"));
        }
        self.attributes.check_usable(op, now)
    }
}

// ----- wire shapes -----

/// Serde adapter for a base64url field that carries private material (a private key, a
/// plaintext): the base64url text it travels as is wiped once encoded or decoded, so only the
/// field itself (which its owner wipes) holds the material.
pub mod private_bytes {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};
    use zeroize::Zeroizing;

    /// Serializes as unpadded base64url.
    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&Zeroizing::new(crate::b64::encode(v)))
    }

    /// Deserializes base64url, refusing anything else.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = Zeroizing::new(String::deserialize(d)?);
        crate::b64::decode(&text).ok_or_else(|| D::Error::custom("value is not valid base64url"))
    }

    /// The same for an optional field.
    pub mod opt {
        use serde::{Deserialize, Deserializer, Serializer};

        /// Serializes as unpadded base64url.
        pub fn serialize<S: Serializer>(v: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
            match v {
                Some(v) => super::serialize(v, s),
                None => s.serialize_none(),
            }
        }

        /// Deserializes base64url, refusing anything else.
        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
            #[derive(Deserialize)]
            struct Wrapped(#[serde(deserialize_with = "super::deserialize")] Vec<u8>);
            Ok(Option::<Wrapped>::deserialize(d)?.map(|w| w.0))
        }
    }
}

/// A JSON Web Key as the keys API sends and receives it.
#[derive(Clone, Default, Serialize, Deserialize)]
pub struct JsonWebKey {
    /// Key id (URL).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kid: Option<String>,
    /// Key type.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kty: Option<String>,
    /// Permitted operations.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_ops: Option<Vec<String>>,
    /// RSA modulus.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "b64::opt_bytes"
    )]
    pub n: Option<Vec<u8>>,
    /// RSA public exponent.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "b64::opt_bytes"
    )]
    pub e: Option<Vec<u8>>,
    /// RSA private exponent or EC private scalar (import only).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "private_bytes::opt"
    )]
    pub d: Option<Vec<u8>>,
    /// RSA CRT exponent for p (import only).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "private_bytes::opt"
    )]
    pub dp: Option<Vec<u8>>,
    /// RSA CRT exponent for q (import only).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "private_bytes::opt"
    )]
    pub dq: Option<Vec<u8>>,
    /// RSA CRT coefficient (import only).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "private_bytes::opt"
    )]
    pub qi: Option<Vec<u8>>,
    /// RSA prime p (import only).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "private_bytes::opt"
    )]
    pub p: Option<Vec<u8>>,
    /// RSA prime q (import only).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "private_bytes::opt"
    )]
    pub q: Option<Vec<u8>>,
    /// Symmetric key (refused: kagi has no oct keys).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "private_bytes::opt"
    )]
    pub k: Option<Vec<u8>>,
    /// HSM transfer blob (refused: BYOK transfer blobs are not supported).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "b64::opt_bytes"
    )]
    pub key_hsm: Option<Vec<u8>>,
    /// EC curve.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub crv: Option<String>,
    /// EC x.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "b64::opt_bytes"
    )]
    pub x: Option<Vec<u8>>,
    /// EC y.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "b64::opt_bytes"
    )]
    pub y: Option<Vec<u8>>,
}

// Private JWK fields must never reach a log through Debug.
impl std::fmt::Debug for JsonWebKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JsonWebKey")
            .field("kid", &self.kid)
            .field("kty", &self.kty)
            .field("crv", &self.crv)
            .field("has_private", &self.d.is_some())
            .finish_non_exhaustive()
    }
}

impl zeroize::Zeroize for JsonWebKey {
    /// Wipes the private fields; the public ones stay.
    fn zeroize(&mut self) {
        for field in [
            &mut self.d,
            &mut self.dp,
            &mut self.dq,
            &mut self.qi,
            &mut self.p,
            &mut self.q,
            &mut self.k,
        ] {
            field.zeroize();
        }
    }
}

impl Drop for JsonWebKey {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(self);
    }
}

impl zeroize::ZeroizeOnDrop for JsonWebKey {}

/// Attributes as the wire carries them.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct WireKeyAttributes {
    /// Enabled flag.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// Not before.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nbf: Option<i64>,
    /// Expiry.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exp: Option<i64>,
    /// Created (output only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub created: Option<i64>,
    /// Updated (output only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub updated: Option<i64>,
    /// Recovery level (output only).
    #[serde(rename = "recoveryLevel", skip_serializing_if = "Option::is_none")]
    pub recovery_level: Option<String>,
    /// Recoverable days (output only).
    #[serde(rename = "recoverableDays", skip_serializing_if = "Option::is_none")]
    pub recoverable_days: Option<u32>,
    /// Exportable.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exportable: Option<bool>,
}

/// Body of `POST /keys/{name}/create`.
#[derive(Debug, Deserialize)]
pub struct KeyCreateParameters {
    /// Key type.
    pub kty: String,
    /// RSA key size in bits.
    pub key_size: Option<u32>,
    /// RSA public exponent.
    pub public_exponent: Option<u32>,
    /// Permitted operations.
    pub key_ops: Option<Vec<String>>,
    /// Attributes.
    pub attributes: Option<WireKeyAttributes>,
    /// Tags.
    pub tags: Option<Tags>,
    /// EC curve.
    pub crv: Option<String>,
    /// Secure key release policy (refused when present: kagi has no attestation service).
    pub release_policy: Option<serde_json::Value>,
}

/// Body of `PUT /keys/{name}` (import).
#[derive(Debug, Deserialize)]
pub struct KeyImportParameters {
    /// Whether to mark the key as HSM-protected.
    #[serde(rename = "Hsm")]
    pub hsm: Option<bool>,
    /// The key.
    pub key: JsonWebKey,
    /// Attributes.
    pub attributes: Option<WireKeyAttributes>,
    /// Tags.
    pub tags: Option<Tags>,
    /// Release policy (refused when present).
    pub release_policy: Option<serde_json::Value>,
}

// Its `key` wipes its private fields when dropped.
impl zeroize::ZeroizeOnDrop for KeyImportParameters {}

/// Body of `PATCH /keys/{name}/{version}`.
#[derive(Debug, Deserialize)]
pub struct KeyUpdateParameters {
    /// New permitted operations.
    pub key_ops: Option<Vec<String>>,
    /// New attributes.
    pub attributes: Option<WireKeyAttributes>,
    /// New tags (replace all).
    pub tags: Option<Tags>,
    /// Release policy (refused when present).
    pub release_policy: Option<serde_json::Value>,
}

/// Body of encrypt/decrypt/wrapkey/unwrapkey. The input of encrypt and wrapKey is the caller's
/// plaintext (often a data key): it is wiped when the parameters drop.
#[derive(Deserialize)]
pub struct KeyOperationParameters {
    /// Algorithm (`RSA-OAEP`, `RSA-OAEP-256`, `RSA1_5`).
    pub alg: String,
    /// Input.
    #[serde(with = "private_bytes")]
    pub value: Vec<u8>,
    /// AES-GCM IV (refused: no symmetric keys).
    #[serde(default, with = "b64::opt_bytes")]
    pub iv: Option<Vec<u8>>,
    /// AES-GCM additional data (refused: no symmetric keys).
    #[serde(default, with = "b64::opt_bytes")]
    pub aad: Option<Vec<u8>>,
    /// AES-GCM tag (refused: no symmetric keys).
    #[serde(default, with = "b64::opt_bytes")]
    pub tag: Option<Vec<u8>>,
}

impl zeroize::Zeroize for KeyOperationParameters {
    fn zeroize(&mut self) {
        self.value.zeroize();
    }
}

impl Drop for KeyOperationParameters {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(self);
    }
}

impl zeroize::ZeroizeOnDrop for KeyOperationParameters {}

/// Body of `/sign`.
#[derive(Deserialize)]
pub struct KeySignParameters {
    /// Algorithm.
    pub alg: String,
    /// The digest to sign.
    #[serde(with = "b64::bytes")]
    pub value: Vec<u8>,
}

/// Body of `/verify`.
#[derive(Deserialize)]
pub struct KeyVerifyParameters {
    /// Algorithm.
    pub alg: String,
    /// The digest that was signed.
    #[serde(with = "b64::bytes")]
    pub digest: Vec<u8>,
    /// The signature.
    #[serde(with = "b64::bytes")]
    pub value: Vec<u8>,
}

/// Body of `POST /rng`.
#[derive(Debug, Deserialize)]
pub struct RandomParameters {
    /// Number of bytes, 1–128.
    pub count: i64,
}

/// Body of `POST /keys/restore` and the answer of backup.
#[derive(Debug, Serialize, Deserialize)]
pub struct BackupBlob {
    /// The opaque blob.
    #[serde(with = "b64::bytes")]
    pub value: Vec<u8>,
}

/// Parses the `key_ops` of a request and checks them against the key type.
pub fn parse_key_ops(ops: &[String], kty: KeyType) -> Result<Vec<KeyOperation>, KvError> {
    let mut out = Vec::with_capacity(ops.len());
    for op in ops {
        let op = KeyOperation::parse(op)?;
        if !op.fits(kty) {
            return Err(KvError::bad_parameter(format!(
                "Key operation {} is not valid for a {} key.",
                op.as_str(),
                kty.as_str()
            )));
        }
        if !out.contains(&op) {
            out.push(op);
        }
    }
    // A key-exchange key unwraps BYOK transfer blobs: if it could also decrypt or unwrap, its
    // holder could open any blob sent under it and read the key inside.
    if out.contains(&KeyOperation::Import) && out.len() > 1 {
        return Err(KvError::bad_parameter(
            "A key with the import operation is a BYOK key-exchange key: its key_ops must be \
             exactly [\"import\"].",
        ));
    }
    Ok(out)
}

/// Checks nbf/exp of a request: expiry must come after not-before.
pub fn validate_times(nbf: Option<i64>, exp: Option<i64>) -> Result<(), KvError> {
    if let (Some(nbf), Some(exp)) = (nbf, exp)
        && exp <= nbf
    {
        return Err(KvError::bad_parameter(
            "The expiry time (exp) must be later than the activation time (nbf).",
        ));
    }
    Ok(())
}

/// A validity window (`enabled`, `nbf`, `exp`) after a PATCH that gives some of them: each
/// given value replaces the current one, and the result is checked as [`validate_times`] does.
pub fn patch_window(
    current: (bool, Option<i64>, Option<i64>),
    patch: (Option<bool>, Option<i64>, Option<i64>),
) -> Result<(bool, Option<i64>, Option<i64>), KvError> {
    let window = (
        patch.0.unwrap_or(current.0),
        patch.1.or(current.1),
        patch.2.or(current.2),
    );
    validate_times(window.1, window.2)?;
    Ok(window)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attrs() -> KeyAttributes {
        KeyAttributes {
            enabled: true,
            nbf: Some(100),
            exp: Some(200),
            created: 50,
            updated: 50,
            exportable: false,
        }
    }

    #[test]
    fn import_stands_alone_in_key_ops() {
        let ops = |v: &[&str]| {
            parse_key_ops(
                &v.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
                KeyType::RsaHsm,
            )
        };
        assert_eq!(ops(&["import"]).unwrap(), vec![KeyOperation::Import]);
        assert_eq!(
            ops(&["import", "import"]).unwrap(),
            vec![KeyOperation::Import]
        );
        for mixed in [
            &["import", "unwrapKey"][..],
            &["decrypt", "import"],
            &["import", "sign"],
        ] {
            assert!(ops(mixed).is_err(), "{mixed:?}");
        }
    }

    #[test]
    fn usability_window() {
        let a = attrs();
        let inner = |op, t| a.check_usable(op, t).unwrap_err().inner;
        assert_eq!(inner(KeyOperation::WrapKey, 99), Some("KeyNotYetValid"));
        assert!(a.check_usable(KeyOperation::WrapKey, 100).is_ok());
        assert!(a.check_usable(KeyOperation::Sign, 199).is_ok());
        assert_eq!(inner(KeyOperation::Encrypt, 200), Some("KeyExpired"));
        // Data protected before expiry stays recoverable.
        assert!(a.check_usable(KeyOperation::UnwrapKey, 200).is_ok());
        assert!(a.check_usable(KeyOperation::Decrypt, 99).is_ok());
        assert!(a.check_usable(KeyOperation::Verify, 500).is_ok());
        let disabled = KeyAttributes {
            enabled: false,
            ..attrs()
        };
        let e = disabled.check_usable(KeyOperation::Sign, 150).unwrap_err();
        assert_eq!(e.status(), 403);
        assert_eq!(e.inner, Some("KeyDisabled"));
    }

    #[test]
    fn key_ops_parse_and_fit() {
        assert_eq!(
            parse_key_ops(&["wrapKey".into(), "wrapKey".into()], KeyType::Rsa).unwrap(),
            vec![KeyOperation::WrapKey]
        );
        assert!(parse_key_ops(&["wrapkey".into()], KeyType::Rsa).is_err());
        assert!(parse_key_ops(&["encrypt".into()], KeyType::Ec).is_err());
        assert_eq!(KeyType::parse("oct").unwrap_err().status(), 400);
    }

    #[test]
    fn request_bodies_with_private_material_wipe_themselves() {
        fn wiped_on_drop<T: zeroize::ZeroizeOnDrop>() {}
        wiped_on_drop::<JsonWebKey>();
        wiped_on_drop::<KeyImportParameters>();
        // wrapKey and encrypt carry the caller's plaintext key material.
        wiped_on_drop::<KeyOperationParameters>();
        let body = br#"{"key": {"kty": "EC", "crv": "P-256", "x": "AQ", "y": "Ag", "d": "Aw"},
                        "attributes": {}}"#;
        let mut p: KeyImportParameters = serde_json::from_slice(body).unwrap();
        assert_eq!(p.key.d.as_deref(), Some(&[3u8][..]));
        zeroize::Zeroize::zeroize(&mut p.key);
        assert_eq!(
            (p.key.d.as_deref(), p.key.x.as_deref()),
            (None, Some(&[1u8][..]))
        );
        let mut op: KeyOperationParameters =
            serde_json::from_slice(br#"{"alg": "RSA-OAEP", "value": "BAU"}"#).unwrap();
        assert_eq!(op.value, [4, 5]);
        zeroize::Zeroize::zeroize(&mut op);
        assert!(op.value.is_empty());
    }

    #[test]
    fn jwk_debug_hides_private_parts() {
        let mut jwk = JsonWebKey::default();
        jwk.d = Some(vec![0x42; 8]);
        let text = format!("{jwk:?}");
        assert!(!text.contains("66"), "{text}");
        assert!(text.contains("has_private: true"));
    }

    #[test]
    fn tags_limits() {
        let mut t = Tags::new();
        for i in 0..15 {
            t.insert(format!("k{i}"), "v".into());
        }
        assert!(validate_tags(&t).is_ok());
        t.insert("k15".into(), "v".into());
        assert!(validate_tags(&t).is_err());
    }
}
