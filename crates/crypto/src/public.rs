//! Public keys: verification and RSA encryption.

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rsa::{
    OaepPublicEncryptingKey, Pkcs1PublicEncryptingKey, PublicEncryptingKey,
    PublicKeyComponents as RsaPublicKeyComponents,
};
use aws_lc_rs::signature::ParsedPublicKey;

use crate::alg::{Curve, EncryptionAlgorithm, RsaKeySize, SignatureAlgorithm};
use crate::error::{CryptoError, Result};

/// A public key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PublicKey {
    /// An RSA public key.
    Rsa {
        /// Modulus, big-endian without leading zeros.
        n: Vec<u8>,
        /// Public exponent, big-endian without leading zeros.
        e: Vec<u8>,
    },
    /// An EC public key (uncompressed point).
    Ec {
        /// The curve.
        curve: Curve,
        /// X coordinate, big-endian, exactly [`Curve::coordinate_len`] bytes.
        x: Vec<u8>,
        /// Y coordinate, big-endian, exactly [`Curve::coordinate_len`] bytes.
        y: Vec<u8>,
    },
}

impl PublicKey {
    /// Builds an RSA public key from its JWK components (big-endian `n` and `e`).
    ///
    /// Leading zero bytes are stripped. Only 2048-, 3072- and 4096-bit moduli are accepted.
    ///
    /// # Errors
    /// [`CryptoError::Unsupported`] for other modulus sizes, [`CryptoError::InvalidKey`] if
    /// aws-lc rejects the key (e.g. even exponent).
    pub fn rsa_from_components(n: &[u8], e: &[u8]) -> Result<Self> {
        let n = strip_leading_zeros(n);
        let e = strip_leading_zeros(e);
        if e.is_empty() {
            return Err(CryptoError::InvalidKey(
                "RSA public exponent is zero".into(),
            ));
        }
        RsaKeySize::from_key_bits(bit_len(n))?;
        // Round-trip through SubjectPublicKeyInfo so aws-lc's full public-key checks run.
        let der = RsaPublicKeyComponents { n, e }
            .as_der()
            .map_err(|_| CryptoError::InvalidKey("RSA public key components are invalid".into()))?;
        PublicEncryptingKey::from_der(der.as_ref())
            .map_err(|err| rejected("RSA public key", &err))?;
        Ok(Self::Rsa {
            n: n.to_vec(),
            e: e.to_vec(),
        })
    }

    /// An RSA public key from DER: a SubjectPublicKeyInfo (as in X.509 certificates) or a
    /// PKCS#1 RSAPublicKey.
    ///
    /// # Errors
    /// [`CryptoError::InvalidKey`] when the DER is not an RSA public key of a supported size.
    pub fn rsa_from_spki_der(der: &[u8]) -> Result<Self> {
        let key = aws_lc_rs::rsa::PublicKey::from_der(der)
            .map_err(|err| rejected("RSA public key", &err))?;
        Self::rsa_from_components(
            key.modulus().big_endian_without_leading_zero(),
            key.exponent().big_endian_without_leading_zero(),
        )
    }

    /// Builds an EC public key from its JWK coordinates, checking that the point is on `curve`.
    ///
    /// Coordinates shorter than the field size are left-padded; leading zeros beyond it are
    /// ignored.
    ///
    /// # Errors
    /// [`CryptoError::InvalidKey`] if a coordinate is too long or the point is not on the curve.
    pub fn ec_from_components(curve: Curve, x: &[u8], y: &[u8]) -> Result<Self> {
        let x = fixed_len(x, curve.coordinate_len(), "x")?;
        let y = fixed_len(y, curve.coordinate_len(), "y")?;
        let key = Self::Ec { curve, x, y };
        key.parsed_ec(curve)?;
        Ok(key)
    }

    /// Modulus size in bits for RSA keys, `None` for EC keys.
    #[must_use]
    pub fn rsa_bits(&self) -> Option<u32> {
        match self {
            Self::Rsa { n, .. } => u32::try_from(bit_len(strip_leading_zeros(n))).ok(),
            Self::Ec { .. } => None,
        }
    }

    /// The curve of an EC key, `None` for RSA keys.
    #[must_use]
    pub fn curve(&self) -> Option<Curve> {
        match self {
            Self::Rsa { .. } => None,
            Self::Ec { curve, .. } => Some(*curve),
        }
    }

    /// Encrypts `plaintext` (RSA keys only).
    ///
    /// # Errors
    /// [`CryptoError::Unsupported`] for EC keys, [`CryptoError::InvalidInput`] if the plaintext
    /// is longer than the scheme allows for this modulus.
    pub fn encrypt(&self, alg: EncryptionAlgorithm, plaintext: &[u8]) -> Result<Vec<u8>> {
        let Self::Rsa { n, e } = self else {
            return Err(CryptoError::Unsupported(format!(
                "{} encryption with an EC key",
                alg.jwa()
            )));
        };
        let n = strip_leading_zeros(n);
        let e = strip_leading_zeros(e);
        let max = alg.max_plaintext_len(n.len());
        if plaintext.len() > max {
            return Err(CryptoError::InvalidInput(format!(
                "plaintext is {} bytes; {} with a {}-bit key allows at most {max}",
                plaintext.len(),
                alg.jwa(),
                bit_len(n)
            )));
        }
        let key: PublicEncryptingKey = RsaPublicKeyComponents { n, e }
            .try_into()
            .map_err(|_| CryptoError::InvalidKey("RSA public key is not usable".into()))?;
        let mut out = vec![0u8; key.key_size_bytes()];
        let written = match alg.oaep() {
            Some(oaep) => OaepPublicEncryptingKey::new(key)
                .and_then(|k| k.encrypt(oaep, plaintext, &mut out, None).map(|c| c.len())),
            None => Pkcs1PublicEncryptingKey::new(key)
                .and_then(|k| k.encrypt(plaintext, &mut out).map(|c| c.len())),
        }
        .map_err(|_| CryptoError::Internal)?;
        out.truncate(written);
        Ok(out)
    }

    /// Verifies `signature` over a precomputed `digest`.
    ///
    /// ECDSA signatures are the fixed-size JWS form `r || s`. PSS signatures use a salt as long
    /// as the digest and MGF1 with the same hash.
    ///
    /// Returns `Ok(false)` if the signature does not verify.
    ///
    /// # Errors
    /// [`CryptoError::Unsupported`] if `alg` does not fit the key type or curve,
    /// [`CryptoError::InvalidInput`] if the digest length is wrong for `alg`.
    pub fn verify_digest(
        &self,
        alg: SignatureAlgorithm,
        digest: &[u8],
        signature: &[u8],
    ) -> Result<bool> {
        self.check_signature_alg(alg)?;
        let digest = alg.import_digest(digest)?;
        let parsed = match self {
            Self::Rsa { n, e } => {
                let params = alg.rsa_parameters().ok_or(CryptoError::Internal)?;
                RsaPublicKeyComponents {
                    n: strip_leading_zeros(n),
                    e: strip_leading_zeros(e),
                }
                .to_parsed_public_key(params)
                .map_err(|err| rejected("RSA public key", &err))?
            }
            Self::Ec { curve, .. } => self.parsed_ec(*curve)?,
        };
        Ok(parsed.verify_digest_sig(&digest, signature).is_ok())
    }

    /// Checks that `alg` can be used with this key's type and curve.
    ///
    /// # Errors
    /// [`CryptoError::Unsupported`] if it cannot.
    pub fn check_signature_alg(&self, alg: SignatureAlgorithm) -> Result<()> {
        match self {
            Self::Rsa { .. } if alg.is_rsa() => Ok(()),
            Self::Rsa { .. } => Err(CryptoError::Unsupported(format!(
                "{} cannot be used with an RSA key",
                alg.jwa()
            ))),
            Self::Ec { curve, .. } if alg.curve() == Some(*curve) => Ok(()),
            Self::Ec { curve, .. } => Err(CryptoError::Unsupported(format!(
                "{} cannot be used with a {} key",
                alg.jwa(),
                curve.jwk_name()
            ))),
        }
    }

    /// Parses an EC key for verification with the curve's own hash; this also checks the
    /// point is on the curve.
    fn parsed_ec(&self, curve: Curve) -> Result<ParsedPublicKey> {
        let Self::Ec { x, y, .. } = self else {
            return Err(CryptoError::Internal);
        };
        let len = curve.coordinate_len();
        if x.len() != len || y.len() != len {
            return Err(CryptoError::InvalidKey(format!(
                "{} coordinates must be {len} bytes each",
                curve.jwk_name()
            )));
        }
        let mut point = Vec::with_capacity(1 + 2 * len);
        point.push(0x04); // SEC 1 uncompressed point
        point.extend_from_slice(x);
        point.extend_from_slice(y);
        ParsedPublicKey::new(curve.verification_alg(), point).map_err(|_| {
            CryptoError::InvalidKey(format!("point is not on curve {}", curve.jwk_name()))
        })
    }
}

/// Formats an aws-lc rejection; its description is a fixed identifier such as
/// "InconsistentComponents", never key material.
pub(crate) fn rejected(what: &str, err: &aws_lc_rs::error::KeyRejected) -> CryptoError {
    CryptoError::InvalidKey(format!("{what} rejected ({})", err.description_()))
}

pub(crate) fn strip_leading_zeros(bytes: &[u8]) -> &[u8] {
    let start = bytes.iter().position(|&b| b != 0).unwrap_or(bytes.len());
    &bytes[start..]
}

/// Number of significant bits in a big-endian integer without leading zero bytes.
pub(crate) fn bit_len(be: &[u8]) -> usize {
    match be.first() {
        Some(&top) => be.len() * 8 - top.leading_zeros() as usize,
        None => 0,
    }
}

/// Left-pads a big-endian integer to exactly `len` bytes.
pub(crate) fn fixed_len(bytes: &[u8], len: usize, name: &str) -> Result<Vec<u8>> {
    let significant = strip_leading_zeros(bytes);
    if significant.len() > len {
        return Err(CryptoError::InvalidKey(format!(
            "EC component {name} is longer than {len} bytes"
        )));
    }
    let mut out = vec![0u8; len - significant.len()];
    out.extend_from_slice(significant);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn helpers() {
        assert_eq!(strip_leading_zeros(&[0, 0, 1, 0]), &[1, 0]);
        assert_eq!(strip_leading_zeros(&[0, 0]), &[] as &[u8]);
        assert_eq!(bit_len(&[0x01, 0x00]), 9);
        assert_eq!(bit_len(&[0x80; 256]), 2048);
        assert_eq!(fixed_len(&[0, 0, 0, 7], 2, "x").unwrap(), vec![0, 7]);
        assert!(fixed_len(&[1, 2, 3], 2, "x").is_err());
    }

    #[test]
    fn rsa_public_key_size_checks() {
        // Odd 1024-bit "modulus": refused on size before any parsing.
        let mut n = vec![0xffu8; 128];
        n[127] = 0xfd;
        assert!(matches!(
            PublicKey::rsa_from_components(&n, &[1, 0, 1]),
            Err(CryptoError::Unsupported(_))
        ));
        // 2048-bit modulus with an even exponent: aws-lc rejects it.
        let mut n = vec![0xffu8; 256];
        n[255] = 0xfd;
        assert!(matches!(
            PublicKey::rsa_from_components(&n, &[1, 0, 0]),
            Err(CryptoError::InvalidKey(_))
        ));
    }

    #[test]
    fn ec_point_must_be_on_curve() {
        let err = PublicKey::ec_from_components(Curve::P256, &[1; 32], &[2; 32]).unwrap_err();
        assert!(matches!(err, CryptoError::InvalidKey(_)));
        assert!(PublicKey::ec_from_components(Curve::P256, &[1; 33], &[2; 32]).is_err());
    }

    #[test]
    fn ec_key_cannot_encrypt() {
        let key = PublicKey::Ec {
            curve: Curve::P256,
            x: vec![0; 32],
            y: vec![0; 32],
        };
        assert!(matches!(
            key.encrypt(EncryptionAlgorithm::RsaOaep256, b"x"),
            Err(CryptoError::Unsupported(_))
        ));
    }
}
