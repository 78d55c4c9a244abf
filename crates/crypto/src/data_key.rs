//! Data encryption keys (DEKs) of the storage services: a random 256-bit key from which the
//! blob encryption key and the keyed blob-id function are derived. Only the DEK is wrapped by
//! the customer's key, so rotating that key re-wraps 32 bytes, whatever the amount of data.

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use aws_lc_rs::{hkdf, hmac};
use zeroize::Zeroizing;

use crate::{CryptoError, Result};

/// Length of a DEK.
pub const DATA_KEY_LEN: usize = 32;
const TAG_LEN: usize = 16;

struct Len32;
impl hkdf::KeyType for Len32 {
    fn len(&self) -> usize {
        32
    }
}

/// A data encryption key and what is derived from it.
pub struct DataKey {
    raw: Zeroizing<[u8; DATA_KEY_LEN]>,
    aead: LessSafeKey,
    id_key: hmac::Key,
}

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DataKey(..)")
    }
}

impl DataKey {
    /// A fresh random DEK.
    ///
    /// # Errors
    /// [`CryptoError::Internal`] if the random source fails.
    pub fn generate() -> Result<Self> {
        let bytes = crate::random_bytes(DATA_KEY_LEN)?;
        let mut raw = Zeroizing::new([0u8; DATA_KEY_LEN]);
        raw.copy_from_slice(&bytes);
        Self::from_bytes(&raw)
    }

    /// A DEK from its bytes (after unwrapping).
    ///
    /// # Errors
    /// [`CryptoError::Internal`] if derivation fails.
    pub fn from_bytes(raw: &[u8; DATA_KEY_LEN]) -> Result<Self> {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, &[]).extract(raw);
        let mut enc = Zeroizing::new([0u8; 32]);
        prk.expand(&[b"kagi/v1/dek/blob-encryption"], Len32)
            .and_then(|okm| okm.fill(enc.as_mut()))
            .map_err(|_| CryptoError::Internal)?;
        let mut mac = Zeroizing::new([0u8; 32]);
        prk.expand(&[b"kagi/v1/dek/blob-id"], Len32)
            .and_then(|okm| okm.fill(mac.as_mut()))
            .map_err(|_| CryptoError::Internal)?;
        let aead = LessSafeKey::new(
            UnboundKey::new(&AES_256_GCM, enc.as_ref()).map_err(|_| CryptoError::Internal)?,
        );
        Ok(Self {
            raw: Zeroizing::new(*raw),
            aead,
            id_key: hmac::Key::new(hmac::HMAC_SHA256, mac.as_ref()),
        })
    }

    /// The raw key, to be wrapped by a key encryption key. Never store it unwrapped.
    pub fn expose_for_wrapping(&self) -> &[u8; DATA_KEY_LEN] {
        &self.raw
    }

    /// The keyed id of a blob: HMAC-SHA256 under a DEK-derived key, so whoever holds the
    /// storage cannot confirm a guess of the content by hashing it.
    pub fn blob_id(&self, plaintext: &[u8]) -> [u8; 32] {
        let tag = hmac::sign(&self.id_key, plaintext);
        let mut out = [0u8; 32];
        out.copy_from_slice(tag.as_ref());
        out
    }

    /// Encrypts with AES-256-GCM and a random nonce: `nonce ‖ ciphertext ‖ tag`.
    ///
    /// # Errors
    /// [`CryptoError::Internal`] if the random source or the cipher fails.
    pub fn seal(&self, aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>> {
        let nonce_bytes = crate::random_bytes(NONCE_LEN)?;
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&nonce_bytes);
        let mut out = Vec::with_capacity(NONCE_LEN + plaintext.len() + TAG_LEN);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(plaintext);
        let tag = self
            .aead
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut out[NONCE_LEN..],
            )
            .map_err(|_| CryptoError::Internal)?;
        out.extend_from_slice(tag.as_ref());
        Ok(out)
    }

    /// Decrypts what [`Self::seal`] produced with the same `aad`.
    ///
    /// # Errors
    /// [`CryptoError::DecryptionFailed`] if the data was altered, the AAD differs or the key is
    /// another.
    pub fn open(&self, aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>> {
        if sealed.len() < NONCE_LEN + TAG_LEN {
            return Err(CryptoError::DecryptionFailed);
        }
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&sealed[..NONCE_LEN]);
        let mut buf = sealed[NONCE_LEN..].to_vec();
        let len = self
            .aead
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut buf,
            )
            .map_err(|_| CryptoError::DecryptionFailed)?
            .len();
        buf.truncate(len);
        Ok(buf)
    }
}

/// HMAC-SHA256 of `data` under `key` (for keyed fingerprints outside a DEK).
pub fn hmac_sha256(key: &[u8], data: &[u8]) -> [u8; 32] {
    let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), data);
    let mut out = [0u8; 32];
    out.copy_from_slice(tag.as_ref());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_and_ids() {
        let k = DataKey::generate().unwrap();
        let c = k.seal(b"aad", b"hello").unwrap();
        assert_eq!(k.open(b"aad", &c).unwrap(), b"hello");
        assert!(k.open(b"other", &c).is_err());
        let mut t = c.clone();
        t[NONCE_LEN] ^= 1;
        assert!(k.open(b"aad", &t).is_err());
        let k2 = DataKey::from_bytes(k.expose_for_wrapping()).unwrap();
        assert_eq!(k2.open(b"aad", &c).unwrap(), b"hello");
        assert_eq!(k.blob_id(b"x"), k2.blob_id(b"x"));
        let other = DataKey::generate().unwrap();
        assert_ne!(k.blob_id(b"x"), other.blob_id(b"x"));
        assert!(other.open(b"aad", &c).is_err());
        assert_eq!(format!("{k:?}"), "DataKey(..)");
    }

    #[test]
    fn hmac_known_answer() {
        // RFC 4231 test case 2.
        let tag = hmac_sha256(b"Jefe", b"what do ya want for nothing?");
        assert_eq!(
            tag.iter().map(|b| format!("{b:02x}")).collect::<String>(),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
