//! Private key pairs: generation, import/export, signing and RSA decryption.
//!
//! Private material is held only inside aws-lc objects. aws-lc frees key memory through
//! `OPENSSL_free`, which cleanses it, when those objects drop, so `KeyPair` needs no `Drop`
//! of its own. Bytes that do leave aws-lc (PKCS#8, plaintexts) are returned in `Zeroizing`.

use std::fmt;

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rsa::{
    KeyPair as RsaKeyPair, KeyPairComponents, OaepPrivateDecryptingKey, Pkcs1PrivateDecryptingKey,
    PrivateDecryptingKey, PublicKeyComponents as RsaPublicKeyComponents,
};
use aws_lc_rs::signature::{EcdsaKeyPair, KeyPair as _};
use zeroize::Zeroizing;

use crate::alg::{Curve, EncryptionAlgorithm, RsaKeySize, SignatureAlgorithm};
use crate::error::{CryptoError, Result};
use crate::public::{PublicKey, bit_len, fixed_len, rejected, strip_leading_zeros};

/// The only RSA public exponent we generate (F4).
const RSA_F4: u32 = 65_537;

/// RSA private key components as carried in a JWK (all big-endian).
pub struct RsaPrivateComponents<'a> {
    /// Modulus.
    pub n: &'a [u8],
    /// Public exponent.
    pub e: &'a [u8],
    /// Private exponent.
    pub d: &'a [u8],
    /// First prime factor.
    pub p: &'a [u8],
    /// Second prime factor.
    pub q: &'a [u8],
    /// `d mod (p - 1)`.
    pub dp: &'a [u8],
    /// `d mod (q - 1)`.
    pub dq: &'a [u8],
    /// `q^-1 mod p`.
    pub qi: &'a [u8],
}

impl fmt::Debug for RsaPrivateComponents<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Only the size: everything else here is (or reveals) private material.
        f.debug_struct("RsaPrivateComponents")
            .field("bits", &bit_len(strip_leading_zeros(self.n)))
            .finish_non_exhaustive()
    }
}

/// A private key pair, usable for private operations.
///
/// Holds parsed aws-lc key objects so that signing and decryption need no re-parsing; it is
/// `Send + Sync` and cheap to share behind an `Arc`. `Debug` prints only the type and size.
pub struct KeyPair {
    inner: Inner,
    public: PublicKey,
}

enum Inner {
    Rsa {
        size: RsaKeySize,
        // aws-lc splits signing and decryption into separate types; both are built from the
        // same PKCS#8 document and share nothing else.
        signing: RsaKeyPair,
        oaep: OaepPrivateDecryptingKey,
        pkcs1: Pkcs1PrivateDecryptingKey,
    },
    Ec {
        curve: Curve,
        key: EcdsaKeyPair,
    },
}

impl KeyPair {
    /// Generates an RSA key pair. Only the public exponent 65537 is supported (`None` means
    /// 65537).
    ///
    /// # Errors
    /// [`CryptoError::Unsupported`] for another exponent, [`CryptoError::Internal`] if key
    /// generation fails.
    pub fn generate_rsa(size: RsaKeySize, public_exponent: Option<u32>) -> Result<Self> {
        let e = public_exponent.unwrap_or(RSA_F4);
        if e != RSA_F4 {
            return Err(CryptoError::Unsupported(format!(
                "RSA public exponent {e} (only 65537 is supported)"
            )));
        }
        // aws-lc generates with e = 65537.
        let signing = RsaKeyPair::generate(size.aws()).map_err(|_| CryptoError::Internal)?;
        Self::from_rsa(signing)
    }

    /// Generates an EC key pair on `curve`.
    ///
    /// # Errors
    /// [`CryptoError::Internal`] if key generation fails.
    pub fn generate_ec(curve: Curve) -> Result<Self> {
        let key = EcdsaKeyPair::generate(curve.signing_alg()).map_err(|_| CryptoError::Internal)?;
        Self::from_ec(curve, key)
    }

    /// Parses an unencrypted PKCS#8 (v1) private key, RSA or EC.
    ///
    /// # Errors
    /// [`CryptoError::Unsupported`] for RSA sizes other than 2048/3072/4096,
    /// [`CryptoError::InvalidKey`] if the document is not an RSA or P-256/P-384/P-521/P-256K key.
    pub fn from_pkcs8(der: &[u8]) -> Result<Self> {
        let rsa_err = match RsaKeyPair::from_pkcs8(der) {
            Ok(signing) => return Self::from_rsa(signing),
            Err(err) => err,
        };
        for curve in Curve::ALL {
            if let Ok(key) = EcdsaKeyPair::from_pkcs8(curve.signing_alg(), der) {
                return Self::from_ec(curve, key);
            }
        }
        // aws-lc refuses RSA keys outside 2048..=8192 bits with these identifiers.
        match rsa_err.description_() {
            "TooSmall" | "TooLarge" => Err(CryptoError::Unsupported(
                "RSA key size (supported: 2048, 3072, 4096 bits)".into(),
            )),
            _ => Err(CryptoError::InvalidKey(
                "not a PKCS#8 RSA or EC (P-256, P-384, P-521, P-256K) private key".into(),
            )),
        }
    }

    /// Serializes the private key as unencrypted PKCS#8 (v1); [`Self::from_pkcs8`] reads it back.
    ///
    /// # Errors
    /// [`CryptoError::Internal`] if serialization fails.
    pub fn to_pkcs8(&self) -> Result<Zeroizing<Vec<u8>>> {
        // The aws-lc buffers returned here zeroize themselves on drop too.
        match &self.inner {
            Inner::Rsa { signing, .. } => signing
                .as_der()
                .map(|der| Zeroizing::new(der.as_ref().to_vec())),
            Inner::Ec { key, .. } => key
                .to_pkcs8v1()
                .map(|doc| Zeroizing::new(doc.as_ref().to_vec())),
        }
        .map_err(|_| CryptoError::Internal)
    }

    /// Builds an RSA key pair from JWK components, validating that they are consistent
    /// (`n = p*q`, `d`, CRT values).
    ///
    /// # Errors
    /// [`CryptoError::Unsupported`] for moduli other than 2048/3072/4096 bits,
    /// [`CryptoError::InvalidKey`] if the components are malformed or inconsistent.
    pub fn rsa_from_components(c: &RsaPrivateComponents<'_>) -> Result<Self> {
        // aws-lc wants the public values without leading zeros; JWK producers sometimes add them.
        let n = strip_leading_zeros(c.n);
        let e = strip_leading_zeros(c.e);
        RsaKeySize::from_key_bits(bit_len(n))?;
        let components = KeyPairComponents {
            public_key: RsaPublicKeyComponents { n, e },
            d: c.d,
            p: c.p,
            q: c.q,
            dP: c.dp,
            dQ: c.dq,
            qInv: c.qi,
        };
        let signing = RsaKeyPair::from_components(&components)
            .map_err(|err| rejected("RSA private key components", &err))?;
        Self::from_rsa(signing)
    }

    /// Builds an EC key pair from JWK components, checking that `d` matches the point `(x, y)`.
    ///
    /// # Errors
    /// [`CryptoError::InvalidKey`] if a component is malformed, the point is not on the curve,
    /// or `d` does not belong to it.
    pub fn ec_from_components(curve: Curve, x: &[u8], y: &[u8], d: &[u8]) -> Result<Self> {
        let public = PublicKey::ec_from_components(curve, x, y)?;
        let PublicKey::Ec { x, y, .. } = &public else {
            return Err(CryptoError::Internal);
        };
        let d = Zeroizing::new(fixed_len(d, curve.coordinate_len(), "d")?);
        let mut point = Vec::with_capacity(1 + x.len() + y.len());
        point.push(0x04);
        point.extend_from_slice(x);
        point.extend_from_slice(y);
        let key = EcdsaKeyPair::from_private_key_and_public_key(curve.signing_alg(), &d, &point)
            .map_err(|err| match err.description_() {
                "InconsistentComponents" => {
                    CryptoError::InvalidKey("EC private key d does not match x and y".into())
                }
                _ => rejected("EC private key", &err),
            })?;
        Self::from_ec(curve, key)
    }

    /// The public half.
    #[must_use]
    pub fn public_key(&self) -> &PublicKey {
        &self.public
    }

    /// Decrypts an RSA ciphertext.
    ///
    /// # Errors
    /// [`CryptoError::Unsupported`] for EC keys, [`CryptoError::InvalidInput`] if the
    /// ciphertext length differs from the modulus length, [`CryptoError::DecryptionFailed`]
    /// (without detail) if the padding does not check out.
    pub fn decrypt(
        &self,
        alg: EncryptionAlgorithm,
        ciphertext: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>> {
        let Inner::Rsa {
            size, oaep, pkcs1, ..
        } = &self.inner
        else {
            return Err(CryptoError::Unsupported(format!(
                "{} decryption with an EC key",
                alg.jwa()
            )));
        };
        let k = size.bits() as usize / 8;
        if ciphertext.len() != k {
            return Err(CryptoError::InvalidInput(format!(
                "ciphertext is {} bytes; a {}-bit key needs exactly {k}",
                ciphertext.len(),
                size.bits()
            )));
        }
        let mut out = Zeroizing::new(vec![0u8; k]);
        let len = match alg.oaep() {
            Some(oaep_alg) => oaep
                .decrypt(oaep_alg, ciphertext, &mut out, None)
                .map(|p| p.len()),
            None => pkcs1.decrypt(ciphertext, &mut out).map(|p| p.len()),
        }
        .map_err(|_| CryptoError::DecryptionFailed)?;
        out.truncate(len);
        Ok(out)
    }

    /// Signs a precomputed `digest`.
    ///
    /// RS*/PS* need an RSA key (PSS: salt as long as the digest, MGF1 with the same hash);
    /// ES* need an EC key on the matching curve and produce the fixed-size `r || s` form.
    ///
    /// # Errors
    /// [`CryptoError::Unsupported`] if `alg` does not fit the key, [`CryptoError::InvalidInput`]
    /// if the digest length is wrong for `alg`.
    pub fn sign_digest(&self, alg: SignatureAlgorithm, digest: &[u8]) -> Result<Vec<u8>> {
        self.public.check_signature_alg(alg)?;
        let digest = alg.import_digest(digest)?;
        match &self.inner {
            Inner::Rsa { signing, .. } => {
                let encoding = alg.rsa_encoding().ok_or(CryptoError::Internal)?;
                let mut sig = vec![0u8; signing.public_modulus_len()];
                signing
                    .sign_digest(encoding, &digest, &mut sig)
                    .map_err(|_| CryptoError::Internal)?;
                Ok(sig)
            }
            Inner::Ec { key, .. } => key
                .sign_digest(&digest)
                .map(|sig| sig.as_ref().to_vec())
                .map_err(|_| CryptoError::Internal),
        }
    }

    fn from_rsa(signing: RsaKeyPair) -> Result<Self> {
        let pkcs8 = signing.as_der().map_err(|_| CryptoError::Internal)?;
        let decrypting = PrivateDecryptingKey::from_pkcs8(pkcs8.as_ref())
            .map_err(|err| rejected("RSA private key", &err))?;
        let size = RsaKeySize::from_key_bits(decrypting.key_size_bits())?;
        let components = RsaPublicKeyComponents::<Vec<u8>>::from(signing.public_key());
        let public = PublicKey::Rsa {
            n: strip_leading_zeros(&components.n).to_vec(),
            e: strip_leading_zeros(&components.e).to_vec(),
        };
        let oaep =
            OaepPrivateDecryptingKey::new(decrypting.clone()).map_err(|_| CryptoError::Internal)?;
        let pkcs1 =
            Pkcs1PrivateDecryptingKey::new(decrypting).map_err(|_| CryptoError::Internal)?;
        Ok(Self {
            inner: Inner::Rsa {
                size,
                signing,
                oaep,
                pkcs1,
            },
            public,
        })
    }

    fn from_ec(curve: Curve, key: EcdsaKeyPair) -> Result<Self> {
        let point = key.public_key().as_ref();
        let len = curve.coordinate_len();
        // Uncompressed SEC 1 point: 0x04 || x || y.
        if point.len() != 1 + 2 * len || point[0] != 0x04 {
            return Err(CryptoError::Internal);
        }
        let public = PublicKey::Ec {
            curve,
            x: point[1..=len].to_vec(),
            y: point[1 + len..].to_vec(),
        };
        Ok(Self {
            inner: Inner::Ec { curve, key },
            public,
        })
    }
}

impl fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.inner {
            Inner::Rsa { size, .. } => f
                .debug_struct("KeyPair")
                .field("kty", &"RSA")
                .field("bits", &size.bits())
                .finish_non_exhaustive(),
            Inner::Ec { curve, .. } => f
                .debug_struct("KeyPair")
                .field("kty", &"EC")
                .field("crv", &curve.jwk_name())
                .finish_non_exhaustive(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::OnceLock;

    use super::*;
    use crate::alg::DigestAlgorithm;
    use crate::digest;

    const SIZES: [RsaKeySize; 3] = RsaKeySize::ALL;
    const ENC_ALGS: [EncryptionAlgorithm; 3] = EncryptionAlgorithm::ALL;
    const RSA_SIG_ALGS: [SignatureAlgorithm; 6] = [
        SignatureAlgorithm::RS256,
        SignatureAlgorithm::RS384,
        SignatureAlgorithm::RS512,
        SignatureAlgorithm::PS256,
        SignatureAlgorithm::PS384,
        SignatureAlgorithm::PS512,
    ];

    /// One generated key per size for the whole test binary: RSA keygen is slow.
    fn rsa(size: RsaKeySize) -> &'static KeyPair {
        static KEYS: [OnceLock<KeyPair>; 3] = [OnceLock::new(), OnceLock::new(), OnceLock::new()];
        let slot = match size {
            RsaKeySize::Rsa2048 => &KEYS[0],
            RsaKeySize::Rsa3072 => &KEYS[1],
            RsaKeySize::Rsa4096 => &KEYS[2],
        };
        slot.get_or_init(|| KeyPair::generate_rsa(size, None).unwrap())
    }

    fn fixture_components() -> Vec<(String, Vec<u8>)> {
        include_str!("../tests/fixtures/rsa2048_components.txt")
            .lines()
            .map(|line| {
                let (name, value) = line.split_once('=').unwrap();
                (name.to_owned(), hex::decode(value).unwrap())
            })
            .collect()
    }

    fn component<'a>(all: &'a [(String, Vec<u8>)], name: &str) -> &'a [u8] {
        &all.iter().find(|(n, _)| n == name).unwrap().1
    }

    fn components(all: &[(String, Vec<u8>)]) -> RsaPrivateComponents<'_> {
        RsaPrivateComponents {
            n: component(all, "n"),
            e: component(all, "e"),
            d: component(all, "d"),
            p: component(all, "p"),
            q: component(all, "q"),
            dp: component(all, "dp"),
            dq: component(all, "dq"),
            qi: component(all, "qi"),
        }
    }

    #[test]
    fn key_pair_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<KeyPair>();
    }

    #[test]
    fn generated_rsa_keys_have_requested_size_and_f4() {
        for size in SIZES {
            let key = rsa(size);
            assert_eq!(key.public_key().rsa_bits(), Some(size.bits()));
            let PublicKey::Rsa { e, n } = key.public_key() else {
                panic!("not RSA")
            };
            assert_eq!(e, &[1, 0, 1]);
            assert_ne!(n[0], 0);
        }
        assert!(matches!(
            KeyPair::generate_rsa(RsaKeySize::Rsa2048, Some(3)),
            Err(CryptoError::Unsupported(_))
        ));
    }

    #[test]
    fn rsa_encrypt_decrypt_round_trips() {
        for size in SIZES {
            let key = rsa(size);
            for alg in ENC_ALGS {
                let max = alg.max_plaintext_len(size.bits() as usize / 8);
                for msg in [&b""[..], b"hello", &vec![0xa5; max]] {
                    let ct = key.public_key().encrypt(alg, msg).unwrap();
                    assert_eq!(ct.len(), size.bits() as usize / 8);
                    assert_eq!(&key.decrypt(alg, &ct).unwrap()[..], msg, "{alg:?} {size:?}");
                }
                assert!(matches!(
                    key.public_key().encrypt(alg, &vec![0; max + 1]),
                    Err(CryptoError::InvalidInput(_))
                ));
            }
        }
    }

    #[test]
    fn rsa_decrypt_failures() {
        let key = rsa(RsaKeySize::Rsa2048);
        let other = rsa(RsaKeySize::Rsa3072);
        let alg = EncryptionAlgorithm::RsaOaep256;
        let mut ct = key.public_key().encrypt(alg, b"secret").unwrap();
        assert!(matches!(
            key.decrypt(alg, &ct[1..]),
            Err(CryptoError::InvalidInput(_))
        ));
        // Wrong OAEP hash.
        assert!(matches!(
            key.decrypt(EncryptionAlgorithm::RsaOaep, &ct),
            Err(CryptoError::DecryptionFailed)
        ));
        ct[100] ^= 1;
        assert!(matches!(
            key.decrypt(alg, &ct),
            Err(CryptoError::DecryptionFailed)
        ));
        let ct = other.public_key().encrypt(alg, b"secret").unwrap();
        assert!(matches!(
            key.decrypt(alg, &ct[..256]),
            Err(CryptoError::DecryptionFailed)
        ));
        let ec = KeyPair::generate_ec(Curve::P256).unwrap();
        assert!(matches!(
            ec.decrypt(alg, &ct),
            Err(CryptoError::Unsupported(_))
        ));
    }

    #[test]
    fn rsa_sign_verify_round_trips() {
        for size in SIZES {
            let key = rsa(size);
            for alg in RSA_SIG_ALGS {
                let d = digest(alg.digest_algorithm(), b"message");
                let sig = key.sign_digest(alg, &d).unwrap();
                assert_eq!(sig.len(), size.bits() as usize / 8);
                assert!(key.public_key().verify_digest(alg, &d, &sig).unwrap());
                let mut bad = sig.clone();
                bad[7] ^= 0x40;
                assert!(!key.public_key().verify_digest(alg, &d, &bad).unwrap());
                let other = digest(alg.digest_algorithm(), b"other message");
                assert!(!key.public_key().verify_digest(alg, &other, &sig).unwrap());
                assert!(!key.public_key().verify_digest(alg, &d, &sig[1..]).unwrap());
            }
        }
        // PKCS#1 v1.5 is deterministic, PSS is randomized.
        let key = rsa(RsaKeySize::Rsa2048);
        let d = digest(DigestAlgorithm::Sha256, b"m");
        let rs = SignatureAlgorithm::RS256;
        let ps = SignatureAlgorithm::PS256;
        assert_eq!(
            key.sign_digest(rs, &d).unwrap(),
            key.sign_digest(rs, &d).unwrap()
        );
        assert_ne!(
            key.sign_digest(ps, &d).unwrap(),
            key.sign_digest(ps, &d).unwrap()
        );
        // A PS256 signature is not an RS256 one.
        let sig = key.sign_digest(ps, &d).unwrap();
        assert!(!key.public_key().verify_digest(rs, &d, &sig).unwrap());
    }

    #[test]
    fn ec_sign_verify_round_trips() {
        for (curve, alg) in [
            (Curve::P256, SignatureAlgorithm::ES256),
            (Curve::P384, SignatureAlgorithm::ES384),
            (Curve::P521, SignatureAlgorithm::ES512),
            (Curve::P256K, SignatureAlgorithm::ES256K),
        ] {
            let key = KeyPair::generate_ec(curve).unwrap();
            let PublicKey::Ec { x, y, .. } = key.public_key() else {
                panic!("not EC")
            };
            assert_eq!(
                (x.len(), y.len()),
                (curve.coordinate_len(), curve.coordinate_len())
            );
            let d = digest(alg.digest_algorithm(), b"message");
            let sig = key.sign_digest(alg, &d).unwrap();
            assert_eq!(sig.len(), 2 * curve.coordinate_len());
            assert!(key.public_key().verify_digest(alg, &d, &sig).unwrap());
            let mut bad = sig.clone();
            bad[3] ^= 1;
            assert!(!key.public_key().verify_digest(alg, &d, &bad).unwrap());
            let other = KeyPair::generate_ec(curve).unwrap();
            assert!(!other.public_key().verify_digest(alg, &d, &sig).unwrap());
            // Rebuilding the public key from its coordinates gives an equal key.
            let rebuilt = PublicKey::ec_from_components(curve, x, y).unwrap();
            assert_eq!(&rebuilt, key.public_key());
        }
    }

    #[test]
    fn algorithm_and_digest_checks() {
        let rsa_key = rsa(RsaKeySize::Rsa2048);
        let ec_key = KeyPair::generate_ec(Curve::P384).unwrap();
        let d32 = [0u8; 32];
        let d48 = [0u8; 48];
        for (key, alg, digest) in [
            (rsa_key, SignatureAlgorithm::ES256, &d32[..]),
            (&ec_key, SignatureAlgorithm::RS384, &d48[..]),
            (&ec_key, SignatureAlgorithm::ES256, &d32[..]),
            (&ec_key, SignatureAlgorithm::ES512, &d48[..]),
        ] {
            assert!(matches!(
                key.sign_digest(alg, digest),
                Err(CryptoError::Unsupported(_))
            ));
            assert!(matches!(
                key.public_key().verify_digest(alg, digest, &[0; 96]),
                Err(CryptoError::Unsupported(_))
            ));
        }
        for (key, alg) in [
            (rsa_key, SignatureAlgorithm::RS256),
            (rsa_key, SignatureAlgorithm::PS512),
            (&ec_key, SignatureAlgorithm::ES384),
        ] {
            assert!(matches!(
                key.sign_digest(alg, &[0; 20]),
                Err(CryptoError::InvalidInput(_))
            ));
            assert!(matches!(
                key.public_key().verify_digest(alg, &[0; 20], &[0; 96]),
                Err(CryptoError::InvalidInput(_))
            ));
        }
    }

    #[test]
    fn pkcs8_round_trips() {
        let keys = [
            KeyPair::from_pkcs8(&rsa(RsaKeySize::Rsa3072).to_pkcs8().unwrap()).unwrap(),
            KeyPair::generate_ec(Curve::P256).unwrap(),
            KeyPair::generate_ec(Curve::P384).unwrap(),
            KeyPair::generate_ec(Curve::P521).unwrap(),
            KeyPair::generate_ec(Curve::P256K).unwrap(),
        ];
        for key in &keys {
            let der = key.to_pkcs8().unwrap();
            let back = KeyPair::from_pkcs8(&der).unwrap();
            assert_eq!(back.public_key(), key.public_key());
            assert_eq!(back.to_pkcs8().unwrap(), der);
        }
        assert!(matches!(
            KeyPair::from_pkcs8(b"not a key"),
            Err(CryptoError::InvalidKey(_))
        ));
    }

    #[test]
    fn rsa_components_import_and_consistency() {
        let all = fixture_components();
        let good = components(&all);
        let key = KeyPair::rsa_from_components(&good).unwrap();
        assert_eq!(key.public_key().rsa_bits(), Some(2048));
        let expected = PublicKey::rsa_from_components(good.n, good.e).unwrap();
        assert_eq!(key.public_key(), &expected);

        // Leading zeros on n and e (as some JWK producers emit) are tolerated.
        let mut padded_n = vec![0];
        padded_n.extend_from_slice(good.n);
        let padded = RsaPrivateComponents {
            n: &padded_n,
            e: &[0, 1, 0, 1],
            ..components(&all)
        };
        assert!(KeyPair::rsa_from_components(&padded).is_ok());

        // Modified d.
        let mut d = good.d.to_vec();
        d[100] ^= 1;
        let bad_d = RsaPrivateComponents {
            d: &d,
            ..components(&all)
        };
        assert!(matches!(
            KeyPair::rsa_from_components(&bad_d),
            Err(CryptoError::InvalidKey(_))
        ));

        // Swapped p and q: n still factors, but the CRT values no longer fit.
        let swapped = RsaPrivateComponents {
            p: good.q,
            q: good.p,
            ..components(&all)
        };
        assert!(matches!(
            KeyPair::rsa_from_components(&swapped),
            Err(CryptoError::InvalidKey(_))
        ));

        // Wrong public exponent.
        let wrong_e = RsaPrivateComponents {
            e: &[3],
            ..components(&all)
        };
        assert!(matches!(
            KeyPair::rsa_from_components(&wrong_e),
            Err(CryptoError::InvalidKey(_))
        ));

        // Unsupported size is reported as such before anything else.
        let short = RsaPrivateComponents {
            n: &good.n[..128],
            ..components(&all)
        };
        assert!(matches!(
            KeyPair::rsa_from_components(&short),
            Err(CryptoError::Unsupported(_))
        ));
    }

    #[test]
    fn ec_components_import_and_consistency() {
        let d = hex::decode(include_str!("../tests/fixtures/ec_p256.d.hex").trim()).unwrap();
        let point = hex::decode(include_str!("../tests/fixtures/ec_p256.pub.hex").trim()).unwrap();
        let (x, y) = (&point[1..33], &point[33..]);
        let key = KeyPair::ec_from_components(Curve::P256, x, y, &d).unwrap();
        let from_pkcs8 =
            KeyPair::from_pkcs8(include_bytes!("../tests/fixtures/ec_p256.pk8.der")).unwrap();
        assert_eq!(key.public_key(), from_pkcs8.public_key());

        // d of another key.
        let other = KeyPair::generate_ec(Curve::P256).unwrap();
        let PublicKey::Ec { x: ox, y: oy, .. } = other.public_key() else {
            panic!("not EC")
        };
        let err = KeyPair::ec_from_components(Curve::P256, ox, oy, &d).unwrap_err();
        assert!(matches!(err, CryptoError::InvalidKey(_)), "{err}");
        // Wrong curve for the coordinates, also one with the same coordinate length.
        assert!(KeyPair::ec_from_components(Curve::P384, x, y, &d).is_err());
        assert!(KeyPair::ec_from_components(Curve::P256K, x, y, &d).is_err());
    }

    #[test]
    fn p256k_components_import_and_es256_is_refused() {
        let key = KeyPair::generate_ec(Curve::P256K).unwrap();
        let der = key.to_pkcs8().unwrap();
        let PublicKey::Ec { x, y, .. } = key.public_key() else {
            panic!("not EC")
        };
        assert_eq!(
            KeyPair::from_pkcs8(&der).unwrap().public_key(),
            key.public_key()
        );
        assert!(PublicKey::ec_from_components(Curve::P256K, x, y).is_ok());
        assert!(PublicKey::ec_from_components(Curve::P256, x, y).is_err());
        let d = digest(DigestAlgorithm::Sha256, b"message");
        assert!(matches!(
            key.sign_digest(SignatureAlgorithm::ES256, &d),
            Err(CryptoError::Unsupported(_))
        ));
    }

    #[test]
    fn debug_output_has_no_key_material() {
        let all = fixture_components();
        let rsa_key = KeyPair::rsa_from_components(&components(&all)).unwrap();
        let text = format!("{rsa_key:?} {:?}", components(&all));
        assert_eq!(
            format!("{rsa_key:?}"),
            "KeyPair { kty: \"RSA\", bits: 2048, .. }"
        );
        for (_, value) in &all {
            let hex = hex::encode(&value[..8.min(value.len())]);
            assert!(!text.to_lowercase().contains(&hex) || value.len() < 4);
        }
        let ec = KeyPair::generate_ec(Curve::P521).unwrap();
        assert_eq!(
            format!("{ec:?}"),
            "KeyPair { kty: \"EC\", crv: \"P-521\", .. }"
        );
        let der = ec.to_pkcs8().unwrap();
        assert!(!format!("{ec:?}").contains(&hex::encode(&der[der.len() - 8..])));
    }
}
