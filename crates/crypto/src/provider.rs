//! The seam between key operations and where private key material lives.
//!
//! A vault key version's private operations go through [`PrivateKeyOps`], which software
//! keys ([`KeyPair`]) and keys inside a hardware security module both implement. What a
//! version stores (sealed under the root key) is a [`StoredPrivateKey`]: the PKCS#8 document
//! of a software key, or a [`TokenKeyRef`] naming an object in a token that a
//! [`KeyProvider`] can find again. Providers depend on this crate, never the reverse.

use std::fmt;
use std::sync::Arc;

use zeroize::Zeroizing;

use crate::alg::{Curve, EncryptionAlgorithm, RsaKeySize, SignatureAlgorithm};
use crate::error::{CryptoError, Result};
use crate::keypair::{KeyPair, RsaPrivateComponents};
use crate::public::PublicKey;

/// The private half of a key, wherever it lives.
pub trait PrivateKeyOps: Send + Sync + fmt::Debug {
    /// The public half.
    fn public_key(&self) -> &PublicKey;

    /// Decrypts an RSA ciphertext (same contract as [`KeyPair::decrypt`]).
    ///
    /// # Errors
    /// As [`KeyPair::decrypt`]; [`CryptoError::KeyUnavailable`] if the key's holder cannot
    /// be reached.
    fn decrypt(&self, alg: EncryptionAlgorithm, ciphertext: &[u8]) -> Result<Zeroizing<Vec<u8>>>;

    /// Signs a precomputed digest (same contract as [`KeyPair::sign_digest`]).
    ///
    /// # Errors
    /// As [`KeyPair::sign_digest`]; [`CryptoError::KeyUnavailable`] if the key's holder cannot
    /// be reached.
    fn sign_digest(&self, alg: SignatureAlgorithm, digest: &[u8]) -> Result<Vec<u8>>;
}

impl PrivateKeyOps for KeyPair {
    fn public_key(&self) -> &PublicKey {
        KeyPair::public_key(self)
    }

    fn decrypt(&self, alg: EncryptionAlgorithm, ciphertext: &[u8]) -> Result<Zeroizing<Vec<u8>>> {
        KeyPair::decrypt(self, alg, ciphertext)
    }

    fn sign_digest(&self, alg: SignatureAlgorithm, digest: &[u8]) -> Result<Vec<u8>> {
        KeyPair::sign_digest(self, alg, digest)
    }
}

/// Where a token keeps a key: the token's label (to say which token a key needs) and the
/// object's `CKA_ID`, which kagi makes random and unique.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenKeyRef {
    /// The token's label.
    pub token: String,
    /// The object id (`CKA_ID`) shared by the private and public key objects.
    pub id: Vec<u8>,
}

/// Marks an encoded [`TokenKeyRef`]; a PKCS#8 document starts with 0x30 (a DER SEQUENCE),
/// so the two cannot be confused.
const TOKEN_REF_MAGIC: &[u8] = b"kagi-token-key/1";

/// What a key version keeps of its private key, sealed under the root key
/// (docs/HSM.md, "Stored key references").
pub enum StoredPrivateKey {
    /// A software key's unencrypted PKCS#8 document.
    Pkcs8(Zeroizing<Vec<u8>>),
    /// A key inside a token.
    Token(TokenKeyRef),
}

impl StoredPrivateKey {
    /// The bytes to seal: the PKCS#8 document as is, or
    /// `"kagi-token-key/1" || u8 len || label || u8 len || id`.
    ///
    /// # Errors
    /// [`CryptoError::InvalidInput`] if the label or id is longer than 255 bytes.
    pub fn encode(&self) -> Result<Zeroizing<Vec<u8>>> {
        match self {
            Self::Pkcs8(der) => Ok(der.clone()),
            Self::Token(r) => {
                let label = r.token.as_bytes();
                let (Ok(l), Ok(i)) = (u8::try_from(label.len()), u8::try_from(r.id.len())) else {
                    return Err(CryptoError::InvalidInput(
                        "token label and object id must be at most 255 bytes".into(),
                    ));
                };
                let mut out = TOKEN_REF_MAGIC.to_vec();
                out.push(l);
                out.extend_from_slice(label);
                out.push(i);
                out.extend_from_slice(&r.id);
                Ok(Zeroizing::new(out))
            }
        }
    }

    /// Reads what [`Self::encode`] wrote.
    ///
    /// # Errors
    /// [`CryptoError::InvalidKey`] if a token reference is truncated.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let Some(rest) = bytes.strip_prefix(TOKEN_REF_MAGIC) else {
            return Ok(Self::Pkcs8(Zeroizing::new(bytes.to_vec())));
        };
        let bad = || CryptoError::InvalidKey("truncated token key reference".into());
        let (&l, rest) = rest.split_first().ok_or_else(bad)?;
        let label = rest.get(..usize::from(l)).ok_or_else(bad)?;
        let rest = &rest[usize::from(l)..];
        let (&i, rest) = rest.split_first().ok_or_else(bad)?;
        if rest.len() != usize::from(i) {
            return Err(bad());
        }
        Ok(Self::Token(TokenKeyRef {
            token: String::from_utf8_lossy(label).into_owned(),
            id: rest.to_vec(),
        }))
    }
}

impl fmt::Debug for StoredPrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Pkcs8(_) => f.write_str("StoredPrivateKey::Pkcs8(..)"),
            Self::Token(r) => f.debug_tuple("StoredPrivateKey::Token").field(r).finish(),
        }
    }
}

/// A key a provider made or took in.
#[derive(Debug)]
pub struct ProvidedKey {
    /// How to find it again.
    pub reference: TokenKeyRef,
    /// Its operations.
    pub ops: Arc<dyn PrivateKeyOps>,
}

/// What kind of key to generate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeySpec {
    /// RSA with exponent 65537.
    Rsa(RsaKeySize),
    /// RSA with exponent 65537 that only unwraps BYOK transfer keys: a provider makes it
    /// unable to decrypt or sign, so that even a bug above it cannot turn a key-exchange key
    /// into a way to open transfer blobs.
    RsaKeyExchange(RsaKeySize),
    /// ECDSA on a curve.
    Ec(Curve),
}

/// A holder of private keys outside kagi's memory (a PKCS#11 token), which also protects
/// kagi's root key.
///
/// Every key it makes or takes in is sensitive and not extractable: private operations
/// happen inside it.
pub trait KeyProvider: Send + Sync + fmt::Debug {
    /// A short description for messages: which module and token.
    fn describe(&self) -> String;

    /// The token label every [`TokenKeyRef`] of this provider carries.
    fn token_label(&self) -> &str;

    /// Generates a key pair inside the provider.
    ///
    /// # Errors
    /// [`CryptoError::Unsupported`] if the provider lacks the key type or curve,
    /// [`CryptoError::KeyUnavailable`] if the provider fails.
    fn generate(&self, spec: KeySpec) -> Result<ProvidedKey>;

    /// Takes in an RSA private key given in the clear (components already checked by
    /// [`KeyPair::rsa_from_components`]).
    ///
    /// # Errors
    /// As [`Self::generate`].
    fn import_rsa(&self, components: &RsaPrivateComponents<'_>) -> Result<ProvidedKey>;

    /// Takes in an EC private key given in the clear (checked by
    /// [`KeyPair::ec_from_components`]).
    ///
    /// # Errors
    /// As [`Self::generate`].
    fn import_ec(&self, curve: Curve, x: &[u8], y: &[u8], d: &[u8]) -> Result<ProvidedKey>;

    /// Unwraps a private key wrapped with `CKM_RSA_AES_KEY_WRAP` under the key-exchange key
    /// `kek`: RSA-OAEP (SHA-1) of an ephemeral AES key, then that key's AES key wrap with
    /// padding (RFC 5649) of the target's PKCS#8 document. The target never leaves the
    /// provider in the clear.
    ///
    /// # Errors
    /// [`CryptoError::DecryptionFailed`] if the blob does not unwrap under `kek`,
    /// [`CryptoError::Unsupported`] for a target the provider cannot take in.
    fn import_wrapped(&self, kek: &TokenKeyRef, wrapped: &[u8]) -> Result<ProvidedKey>;

    /// Finds a key again.
    ///
    /// # Errors
    /// [`CryptoError::KeyNotHeld`] if the object is not in this provider's token,
    /// [`CryptoError::KeyUnavailable`] if the provider fails.
    fn load(&self, reference: &TokenKeyRef) -> Result<Arc<dyn PrivateKeyOps>>;

    /// Copies a key to a new object (a restored backup gets its own copy, so purging one
    /// never destroys the other's key).
    ///
    /// # Errors
    /// [`CryptoError::KeyNotHeld`] if the object is not a key of this provider's token,
    /// [`CryptoError::KeyUnavailable`] if the provider fails.
    fn copy(&self, reference: &TokenKeyRef) -> Result<ProvidedKey>;

    /// Destroys a key (its purge). Destroying a key that is already gone succeeds.
    ///
    /// # Errors
    /// [`CryptoError::KeyUnavailable`] if the provider fails.
    fn destroy(&self, reference: &TokenKeyRef) -> Result<()>;

    /// Encrypts kagi's root key under a key that never leaves the provider; each call makes
    /// its own wrapping key, named in the output, so data directories sharing a token never
    /// share (or race for) one.
    ///
    /// # Errors
    /// [`CryptoError::KeyUnavailable`] if the provider fails.
    fn seal_root_key(&self, raw: &[u8]) -> Result<Vec<u8>>;

    /// Reverses [`Self::seal_root_key`].
    ///
    /// # Errors
    /// [`CryptoError::DecryptionFailed`] if `sealed` was not sealed by this provider.
    fn open_root_key(&self, sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>>;
}

/// Opens a stored private key: a software key from its PKCS#8 document, a token key
/// through `provider`.
///
/// # Errors
/// [`CryptoError::KeyNotHeld`] for a token key when no provider is configured or the
/// provider does not hold it, [`CryptoError::KeyUnavailable`] when the provider fails; what [`KeyPair::from_pkcs8`] returns for a software key.
pub fn open_stored_key(
    stored: &StoredPrivateKey,
    provider: Option<&dyn KeyProvider>,
) -> Result<Arc<dyn PrivateKeyOps>> {
    match stored {
        StoredPrivateKey::Pkcs8(der) => Ok(Arc::new(KeyPair::from_pkcs8(der)?)),
        StoredPrivateKey::Token(r) => match provider {
            Some(p) => p.load(r),
            None => Err(CryptoError::KeyNotHeld(format!(
                "the key is inside the HSM token '{}', and this kagi has no PKCS#11 module \
                 configured",
                r.token
            ))),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_refs_round_trip_and_pkcs8_passes_through() {
        let r = TokenKeyRef {
            token: "kagi".into(),
            id: vec![1, 2, 3, 4],
        };
        let enc = StoredPrivateKey::Token(r.clone()).encode().unwrap();
        match StoredPrivateKey::decode(&enc).unwrap() {
            StoredPrivateKey::Token(back) => assert_eq!(back, r),
            StoredPrivateKey::Pkcs8(_) => panic!("decoded as PKCS#8"),
        }
        let der = KeyPair::generate_ec(Curve::P256)
            .unwrap()
            .to_pkcs8()
            .unwrap();
        match StoredPrivateKey::decode(&der).unwrap() {
            StoredPrivateKey::Pkcs8(back) => assert_eq!(*back, *der),
            StoredPrivateKey::Token(_) => panic!("decoded as a token reference"),
        }
        for cut in 0..enc.len() - TOKEN_REF_MAGIC.len() {
            assert!(StoredPrivateKey::decode(&enc[..TOKEN_REF_MAGIC.len() + cut]).is_err());
        }
        let software = open_stored_key(&StoredPrivateKey::decode(&der).unwrap(), None).unwrap();
        assert!(software.public_key().curve().is_some());
        let err = open_stored_key(&StoredPrivateKey::Token(r), None).unwrap_err();
        assert!(matches!(err, CryptoError::KeyNotHeld(m) if m.contains("'kagi'")));
    }
}
