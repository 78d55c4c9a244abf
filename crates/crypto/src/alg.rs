//! Algorithm and parameter identifiers, with their JOSE (JWA/JWK) names.

use aws_lc_rs::{digest, signature};

/// Supported RSA modulus sizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RsaKeySize {
    /// 2048-bit modulus.
    Rsa2048,
    /// 3072-bit modulus.
    Rsa3072,
    /// 4096-bit modulus.
    Rsa4096,
}

impl RsaKeySize {
    /// All supported sizes.
    pub const ALL: [Self; 3] = [Self::Rsa2048, Self::Rsa3072, Self::Rsa4096];

    /// Modulus length in bits.
    #[must_use]
    pub fn bits(self) -> u32 {
        match self {
            Self::Rsa2048 => 2048,
            Self::Rsa3072 => 3072,
            Self::Rsa4096 => 4096,
        }
    }

    /// The size with exactly `bits` bits, if supported.
    #[must_use]
    pub fn from_bits(bits: u32) -> Option<Self> {
        match bits {
            2048 => Some(Self::Rsa2048),
            3072 => Some(Self::Rsa3072),
            4096 => Some(Self::Rsa4096),
            _ => None,
        }
    }

    pub(crate) fn aws(self) -> aws_lc_rs::rsa::KeySize {
        match self {
            Self::Rsa2048 => aws_lc_rs::rsa::KeySize::Rsa2048,
            Self::Rsa3072 => aws_lc_rs::rsa::KeySize::Rsa3072,
            Self::Rsa4096 => aws_lc_rs::rsa::KeySize::Rsa4096,
        }
    }

    /// Maps an aws-lc bit count to a supported size, or `Unsupported`.
    pub(crate) fn from_key_bits(bits: usize) -> crate::Result<Self> {
        u32::try_from(bits)
            .ok()
            .and_then(Self::from_bits)
            .ok_or_else(|| {
                crate::CryptoError::Unsupported(format!(
                    "RSA key size {bits} bits (supported: 2048, 3072, 4096)"
                ))
            })
    }
}

/// Supported elliptic curves: the NIST prime curves and SECG secp256k1, as Key Vault offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Curve {
    /// NIST P-256 (secp256r1).
    P256,
    /// NIST P-384 (secp384r1).
    P384,
    /// NIST P-521 (secp521r1).
    P521,
    /// SECG secp256k1 (JWK `P-256K`).
    P256K,
}

impl Curve {
    /// The JWK `crv` name ("P-256", "P-384", "P-521", "P-256K").
    #[must_use]
    pub fn jwk_name(self) -> &'static str {
        match self {
            Self::P256 => "P-256",
            Self::P384 => "P-384",
            Self::P521 => "P-521",
            Self::P256K => "P-256K",
        }
    }

    /// Parses a JWK `crv` name.
    #[must_use]
    pub fn from_jwk_name(name: &str) -> Option<Self> {
        match name {
            "P-256" => Some(Self::P256),
            "P-384" => Some(Self::P384),
            "P-521" => Some(Self::P521),
            "P-256K" => Some(Self::P256K),
            _ => None,
        }
    }

    /// Length in bytes of one coordinate, of the private scalar, and of each half (r, s) of a
    /// fixed-size ECDSA signature.
    #[must_use]
    pub fn coordinate_len(self) -> usize {
        match self {
            Self::P256 | Self::P256K => 32,
            Self::P384 => 48,
            Self::P521 => 66,
        }
    }

    /// The ECDSA signing algorithm for this curve with its JWA hash, fixed-size r||s output.
    pub(crate) fn signing_alg(self) -> &'static signature::EcdsaSigningAlgorithm {
        match self {
            Self::P256 => &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            Self::P384 => &signature::ECDSA_P384_SHA384_FIXED_SIGNING,
            Self::P521 => &signature::ECDSA_P521_SHA512_FIXED_SIGNING,
            Self::P256K => &signature::ECDSA_P256K1_SHA256_FIXED_SIGNING,
        }
    }

    /// The matching verification algorithm (same hash, fixed-size r||s input).
    pub(crate) fn verification_alg(self) -> &'static signature::EcdsaVerificationAlgorithm {
        match self {
            Self::P256 => &signature::ECDSA_P256_SHA256_FIXED,
            Self::P384 => &signature::ECDSA_P384_SHA384_FIXED,
            Self::P521 => &signature::ECDSA_P521_SHA512_FIXED,
            Self::P256K => &signature::ECDSA_P256K1_SHA256_FIXED,
        }
    }

    /// All supported curves.
    pub const ALL: [Self; 4] = [Self::P256, Self::P384, Self::P521, Self::P256K];
}

/// RSA encryption schemes (JWA key-management algorithms).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EncryptionAlgorithm {
    /// RSAES-OAEP with SHA-1 and MGF1-SHA-1 ("RSA-OAEP").
    RsaOaep,
    /// RSAES-OAEP with SHA-256 and MGF1-SHA-256 ("RSA-OAEP-256").
    RsaOaep256,
    /// RSAES-PKCS1-v1_5 ("RSA1_5"). Kept for Azure compatibility; prefer OAEP.
    Rsa1_5,
}

impl EncryptionAlgorithm {
    /// All supported schemes.
    pub const ALL: [Self; 3] = [Self::RsaOaep, Self::RsaOaep256, Self::Rsa1_5];

    /// Parses a JWA name.
    #[must_use]
    pub fn from_jwa(name: &str) -> Option<Self> {
        match name {
            "RSA-OAEP" => Some(Self::RsaOaep),
            "RSA-OAEP-256" => Some(Self::RsaOaep256),
            "RSA1_5" => Some(Self::Rsa1_5),
            _ => None,
        }
    }

    /// The JWA name.
    #[must_use]
    pub fn jwa(self) -> &'static str {
        match self {
            Self::RsaOaep => "RSA-OAEP",
            Self::RsaOaep256 => "RSA-OAEP-256",
            Self::Rsa1_5 => "RSA1_5",
        }
    }

    /// The largest plaintext this scheme can encrypt under a modulus of `modulus_len` bytes.
    pub(crate) fn max_plaintext_len(self, modulus_len: usize) -> usize {
        // OAEP: k - 2*hLen - 2; PKCS#1 v1.5: k - 11 (RFC 8017 7.1.1 and 7.2.1).
        let overhead = match self {
            Self::RsaOaep => 2 * 20 + 2,
            Self::RsaOaep256 => 2 * 32 + 2,
            Self::Rsa1_5 => 11,
        };
        modulus_len.saturating_sub(overhead)
    }

    pub(crate) fn oaep(self) -> Option<&'static aws_lc_rs::rsa::OaepAlgorithm> {
        match self {
            Self::RsaOaep => Some(&aws_lc_rs::rsa::OAEP_SHA1_MGF1SHA1),
            Self::RsaOaep256 => Some(&aws_lc_rs::rsa::OAEP_SHA256_MGF1SHA256),
            Self::Rsa1_5 => None,
        }
    }
}

/// Hash functions used for signing digests.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DigestAlgorithm {
    /// SHA-256.
    Sha256,
    /// SHA-384.
    Sha384,
    /// SHA-512.
    Sha512,
}

impl DigestAlgorithm {
    /// Output length in bytes.
    #[must_use]
    pub fn output_len(self) -> usize {
        match self {
            Self::Sha256 => 32,
            Self::Sha384 => 48,
            Self::Sha512 => 64,
        }
    }

    pub(crate) fn aws_algorithm(self) -> &'static digest::Algorithm {
        match self {
            Self::Sha256 => &digest::SHA256,
            Self::Sha384 => &digest::SHA384,
            Self::Sha512 => &digest::SHA512,
        }
    }
}

/// Signature algorithms (JWA names), all applied to a caller-supplied digest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SignatureAlgorithm {
    /// RSASSA-PKCS1-v1_5 with SHA-256.
    RS256,
    /// RSASSA-PKCS1-v1_5 with SHA-384.
    RS384,
    /// RSASSA-PKCS1-v1_5 with SHA-512.
    RS512,
    /// RSASSA-PSS with SHA-256, MGF1-SHA-256, salt length 32.
    PS256,
    /// RSASSA-PSS with SHA-384, MGF1-SHA-384, salt length 48.
    PS384,
    /// RSASSA-PSS with SHA-512, MGF1-SHA-512, salt length 64.
    PS512,
    /// ECDSA on P-256 with SHA-256.
    ES256,
    /// ECDSA on P-384 with SHA-384.
    ES384,
    /// ECDSA on P-521 with SHA-512.
    ES512,
    /// ECDSA on secp256k1 (P-256K) with SHA-256.
    ES256K,
}

impl SignatureAlgorithm {
    /// Parses a JWA name.
    #[must_use]
    pub fn from_jwa(name: &str) -> Option<Self> {
        match name {
            "RS256" => Some(Self::RS256),
            "RS384" => Some(Self::RS384),
            "RS512" => Some(Self::RS512),
            "PS256" => Some(Self::PS256),
            "PS384" => Some(Self::PS384),
            "PS512" => Some(Self::PS512),
            "ES256" => Some(Self::ES256),
            "ES384" => Some(Self::ES384),
            "ES512" => Some(Self::ES512),
            "ES256K" => Some(Self::ES256K),
            _ => None,
        }
    }

    /// The JWA name.
    #[must_use]
    pub fn jwa(self) -> &'static str {
        match self {
            Self::RS256 => "RS256",
            Self::RS384 => "RS384",
            Self::RS512 => "RS512",
            Self::PS256 => "PS256",
            Self::PS384 => "PS384",
            Self::PS512 => "PS512",
            Self::ES256 => "ES256",
            Self::ES384 => "ES384",
            Self::ES512 => "ES512",
            Self::ES256K => "ES256K",
        }
    }

    /// The hash the digest must have been computed with.
    #[must_use]
    pub fn digest_algorithm(self) -> DigestAlgorithm {
        match self {
            Self::RS256 | Self::PS256 | Self::ES256 | Self::ES256K => DigestAlgorithm::Sha256,
            Self::RS384 | Self::PS384 | Self::ES384 => DigestAlgorithm::Sha384,
            Self::RS512 | Self::PS512 | Self::ES512 => DigestAlgorithm::Sha512,
        }
    }

    /// Length in bytes of the digest this algorithm signs.
    #[must_use]
    pub fn digest_len(self) -> usize {
        self.digest_algorithm().output_len()
    }

    /// Whether this is an RSA algorithm (RS* or PS*).
    #[must_use]
    pub fn is_rsa(self) -> bool {
        self.curve().is_none()
    }

    /// The curve an ECDSA algorithm requires; `None` for RSA algorithms.
    #[must_use]
    pub fn curve(self) -> Option<Curve> {
        match self {
            Self::ES256 => Some(Curve::P256),
            Self::ES384 => Some(Curve::P384),
            Self::ES512 => Some(Curve::P521),
            Self::ES256K => Some(Curve::P256K),
            _ => None,
        }
    }

    /// All algorithms, e.g. for capability listings.
    pub const ALL: [Self; 10] = [
        Self::RS256,
        Self::RS384,
        Self::RS512,
        Self::PS256,
        Self::PS384,
        Self::PS512,
        Self::ES256,
        Self::ES384,
        Self::ES512,
        Self::ES256K,
    ];

    /// RSA signing padding; salt length defaults to the digest length for PSS.
    pub(crate) fn rsa_encoding(self) -> Option<&'static signature::RsaSignatureEncoding> {
        match self {
            Self::RS256 => Some(&signature::RSA_PKCS1_SHA256),
            Self::RS384 => Some(&signature::RSA_PKCS1_SHA384),
            Self::RS512 => Some(&signature::RSA_PKCS1_SHA512),
            Self::PS256 => Some(&signature::RSA_PSS_SHA256),
            Self::PS384 => Some(&signature::RSA_PSS_SHA384),
            Self::PS512 => Some(&signature::RSA_PSS_SHA512),
            _ => None,
        }
    }

    /// RSA verification parameters; PSS salt length is the digest length.
    pub(crate) fn rsa_parameters(self) -> Option<&'static signature::RsaParameters> {
        match self {
            Self::RS256 => Some(&signature::RSA_PKCS1_2048_8192_SHA256),
            Self::RS384 => Some(&signature::RSA_PKCS1_2048_8192_SHA384),
            Self::RS512 => Some(&signature::RSA_PKCS1_2048_8192_SHA512),
            Self::PS256 => Some(&signature::RSA_PSS_2048_8192_SHA256),
            Self::PS384 => Some(&signature::RSA_PSS_2048_8192_SHA384),
            Self::PS512 => Some(&signature::RSA_PSS_2048_8192_SHA512),
            _ => None,
        }
    }

    /// Imports `digest` as an aws-lc digest after checking its length.
    pub(crate) fn import_digest(self, digest: &[u8]) -> crate::Result<digest::Digest> {
        if digest.len() != self.digest_len() {
            return Err(crate::CryptoError::InvalidInput(format!(
                "{} requires a {}-byte digest, got {} bytes",
                self.jwa(),
                self.digest_len(),
                digest.len()
            )));
        }
        digest::Digest::import_less_safe(digest, self.digest_algorithm().aws_algorithm())
            .map_err(|_| crate::CryptoError::Internal)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jwa_names_round_trip() {
        for alg in SignatureAlgorithm::ALL {
            assert_eq!(SignatureAlgorithm::from_jwa(alg.jwa()), Some(alg));
        }
        for alg in EncryptionAlgorithm::ALL {
            assert_eq!(EncryptionAlgorithm::from_jwa(alg.jwa()), Some(alg));
        }
        for curve in Curve::ALL {
            assert_eq!(Curve::from_jwk_name(curve.jwk_name()), Some(curve));
        }
        assert_eq!(SignatureAlgorithm::from_jwa("rs256"), None);
        assert_eq!(EncryptionAlgorithm::from_jwa("RSA-OAEP-384"), None);
        assert_eq!(Curve::from_jwk_name("P-256K"), Some(Curve::P256K));
        assert_eq!(Curve::from_jwk_name("secp256k1"), None);
        assert_eq!(SignatureAlgorithm::ES256K.curve(), Some(Curve::P256K));
        assert_eq!(SignatureAlgorithm::ES256K.digest_len(), 32);
    }

    #[test]
    fn sizes_and_properties() {
        for size in RsaKeySize::ALL {
            assert_eq!(RsaKeySize::from_bits(size.bits()), Some(size));
        }
        assert_eq!(RsaKeySize::from_bits(1024), None);
        assert_eq!(SignatureAlgorithm::ES512.curve(), Some(Curve::P521));
        assert_eq!(SignatureAlgorithm::ES512.digest_len(), 64);
        assert_eq!(SignatureAlgorithm::PS384.digest_len(), 48);
        assert!(SignatureAlgorithm::RS256.is_rsa());
        assert!(!SignatureAlgorithm::ES256.is_rsa());
        assert_eq!(EncryptionAlgorithm::RsaOaep256.max_plaintext_len(256), 190);
        assert_eq!(EncryptionAlgorithm::RsaOaep.max_plaintext_len(256), 214);
        assert_eq!(EncryptionAlgorithm::Rsa1_5.max_plaintext_len(256), 245);
    }

    #[test]
    fn digest_import_checks_length() {
        assert!(matches!(
            SignatureAlgorithm::RS256.import_digest(&[0; 48]),
            Err(crate::CryptoError::InvalidInput(_))
        ));
        assert!(SignatureAlgorithm::ES384.import_digest(&[0; 48]).is_ok());
    }
}
