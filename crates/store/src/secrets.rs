//! Records of secrets and their versions. A value is stored only sealed under the root key
//! (purpose `secret`, AAD `kagi/v1/secret/{vault}/{name, lower-case}/{version}`): the store
//! never sees a plaintext secret.

use kagi_core::KeyVersion;
use kagi_core::secret::SecretVersionInfo;

/// One version of a secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecretVersionRecord {
    /// Version id (32 hex).
    pub version: KeyVersion,
    /// Order of creation within the secret (the highest is the current version).
    pub seq: i64,
    /// Everything but the value: content type, attributes, tags.
    pub info: SecretVersionInfo,
    /// The value, sealed under the root key (opaque here).
    pub sealed_value: Vec<u8>,
}

/// A secret with all its versions.
pub type SecretRecord = crate::ObjectRecord<SecretVersionRecord>;
