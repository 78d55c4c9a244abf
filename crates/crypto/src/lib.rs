//! Cryptographic primitives for kagi, built on aws-lc-rs.
//!
//! - [`KeyPair`] / [`PublicKey`]: RSA (2048/3072/4096) and EC (P-256/P-384/P-521/P-256K) keys with the
//!   operations Azure Key Vault exposes: sign/verify over a caller-supplied digest and RSA
//!   encrypt/decrypt.
//! - [`PrivateKeyOps`] / [`KeyProvider`]: the seam between key operations and where private
//!   material lives (software keys here, PKCS#11 tokens in `kagi-hsm`); [`padding`] for
//!   providers that only do raw RSA.
//! - [`seal`]: the root key and AES-256-GCM sealing of data at rest.
//!
//! Private material lives either inside aws-lc objects (which cleanse it when freed) or in
//! [`zeroize::Zeroizing`] buffers, and never appears in `Debug` output or error messages.

#![forbid(unsafe_code)]

mod alg;
pub mod data_key;
pub mod error;
mod keypair;
pub mod padding;
pub mod password;
mod provider;
mod public;
pub mod seal;
pub mod vault_backup;
pub mod x509;

pub use alg::{Curve, DigestAlgorithm, EncryptionAlgorithm, RsaKeySize, SignatureAlgorithm};
pub use error::{CryptoError, Result};
pub use keypair::{KeyPair, RsaPrivateComponents};
pub use provider::{
    KeyProvider, KeySpec, PrivateKeyOps, ProvidedKey, StoredPrivateKey, TokenKeyRef,
    open_stored_key,
};
pub use public::PublicKey;
pub use seal::{
    AesRootKey, RootKey, SealPurpose, load_or_create_root_key, load_or_create_root_key_file,
};

use aws_lc_rs::rand::SecureRandom;

/// Hashes `data` with `alg`.
#[must_use]
pub fn digest(alg: DigestAlgorithm, data: &[u8]) -> Vec<u8> {
    aws_lc_rs::digest::digest(alg.aws_algorithm(), data)
        .as_ref()
        .to_vec()
}

/// Returns `N` random bytes as an array (ids, versions, nonces).
///
/// # Errors
/// [`CryptoError::Internal`] if the random source fails.
pub fn random_array<const N: usize>() -> Result<[u8; N]> {
    let mut out = [0u8; N];
    aws_lc_rs::rand::SystemRandom::new()
        .fill(&mut out)
        .map_err(|_| CryptoError::Internal)?;
    Ok(out)
}

/// Returns `n` bytes from the operating system's CSPRNG (via aws-lc).
///
/// # Errors
/// [`CryptoError::Internal`] if the random source fails.
pub fn random_bytes(n: usize) -> Result<Vec<u8>> {
    let mut out = vec![0u8; n];
    aws_lc_rs::rand::SystemRandom::new()
        .fill(&mut out)
        .map_err(|_| CryptoError::Internal)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_known_answers() {
        // FIPS 180-2 "abc" vectors (prefixes are enough to tell the algorithms apart).
        assert_eq!(
            hex::encode(digest(DigestAlgorithm::Sha256, b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(digest(DigestAlgorithm::Sha384, b"abc").len(), 48);
        assert!(
            hex::encode(digest(DigestAlgorithm::Sha512, b"abc")).starts_with("ddaf35a193617aba")
        );
    }

    #[test]
    fn random_bytes_has_requested_length_and_varies() {
        let a = random_bytes(32).unwrap();
        let b = random_bytes(32).unwrap();
        assert_eq!(a.len(), 32);
        assert_ne!(a, b);
        assert!(random_bytes(0).unwrap().is_empty());
    }
}
