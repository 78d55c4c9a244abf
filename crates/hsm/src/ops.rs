//! A key inside the token: its private operations as [`PrivateKeyOps`].

use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsOaepParams, PkcsOaepSource, PkcsPssParams};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use kagi_crypto::padding::{check_digest_len, oaep_decode, pkcs1_digest_info};
use kagi_crypto::{
    CryptoError, DigestAlgorithm, EncryptionAlgorithm, PrivateKeyOps, PublicKey, SignatureAlgorithm,
};
use zeroize::Zeroizing;

use crate::session::{
    OAEP256_NATIVE, OAEP256_RAW, Token, crypto_err, curve_from_params, decrypt_err, ec_point, hex,
    lacks_mechanism, rv,
};

/// What kind of key a token object is.
#[derive(Clone, Copy, Debug)]
pub(crate) enum KeyKind {
    /// RSA with a modulus of `len` bytes.
    Rsa {
        /// Modulus length in bytes.
        len: usize,
    },
    /// ECDSA.
    Ec,
}

/// A private key object in the token and its public half.
pub(crate) struct TokenKey {
    token: Arc<Token>,
    /// Its `CKA_ID`, to find the object again when the token no longer knows the handle
    /// (after an HSM restart or failover).
    id: Vec<u8>,
    handle: Mutex<ObjectHandle>,
    public: PublicKey,
    kind: KeyKind,
}

impl fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenKey")
            .field("token", &self.token.label)
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

fn hash_mechanism(alg: DigestAlgorithm) -> (MechanismType, PkcsMgfType) {
    match alg {
        DigestAlgorithm::Sha256 => (MechanismType::SHA256, PkcsMgfType::MGF1_SHA256),
        DigestAlgorithm::Sha384 => (MechanismType::SHA384, PkcsMgfType::MGF1_SHA384),
        DigestAlgorithm::Sha512 => (MechanismType::SHA512, PkcsMgfType::MGF1_SHA512),
    }
}

impl TokenKey {
    pub(crate) fn new(
        token: Arc<Token>,
        id: &[u8],
        handle: ObjectHandle,
        public: PublicKey,
        kind: KeyKind,
    ) -> Self {
        Self {
            token,
            id: id.to_vec(),
            handle: Mutex::new(handle),
            public,
            kind,
        }
    }

    /// The modulus length of an RSA key, `None` for EC.
    pub(crate) fn rsa_len(&self) -> Option<usize> {
        match self.kind {
            KeyKind::Rsa { len } => Some(len),
            KeyKind::Ec => None,
        }
    }

    pub(crate) fn handle(&self) -> ObjectHandle {
        *self.handle.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `op` with the key's object handle; a handle the token no longer knows is looked
    /// up again by `CKA_ID` once.
    pub(crate) fn call<T>(
        &self,
        op: impl Fn(&Session, ObjectHandle) -> Result<T, CkError>,
    ) -> Result<T, CkError> {
        let first = self.token.with_session(|s| op(s, self.handle()));
        match first {
            Err(e)
                if matches!(
                    rv(&e),
                    Some(RvError::ObjectHandleInvalid | RvError::KeyHandleInvalid)
                ) =>
            {
                let found = self
                    .token
                    .with_session(|s| self.token.find_one(s, ObjectClass::PRIVATE_KEY, &self.id))?;
                let Some(h) = found else { return Err(e) };
                *self.handle.lock().unwrap_or_else(|p| p.into_inner()) = h;
                self.token.with_session(|s| op(s, h))
            }
            other => other,
        }
    }

    fn run(
        &self,
        what: &str,
        mech: &Mechanism<'_>,
        input: &[u8],
        sign: bool,
    ) -> Result<Vec<u8>, CryptoError> {
        self.call(|s, h| {
            if sign {
                s.sign(mech, h, input)
            } else {
                s.decrypt(mech, h, input)
            }
        })
        .map_err(|e| {
            if sign {
                crypto_err(&self.token.label, what, &e)
            } else {
                decrypt_err(&self.token.label, what, &e)
            }
        })
    }
}

impl PrivateKeyOps for TokenKey {
    fn public_key(&self) -> &PublicKey {
        &self.public
    }

    fn decrypt(
        &self,
        alg: EncryptionAlgorithm,
        ciphertext: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        let KeyKind::Rsa { len } = self.kind else {
            return Err(CryptoError::Unsupported(format!(
                "{} decryption with an EC key",
                alg.jwa()
            )));
        };
        if ciphertext.len() != len {
            return Err(CryptoError::InvalidInput(format!(
                "ciphertext is {} bytes; a {}-bit key needs exactly {len}",
                ciphertext.len(),
                len * 8
            )));
        }
        match alg {
            EncryptionAlgorithm::Rsa1_5 => self
                .run("decrypt", &Mechanism::RsaPkcs, ciphertext, false)
                .map(Zeroizing::new),
            EncryptionAlgorithm::RsaOaep => {
                let params = PkcsOaepParams::new(
                    MechanismType::SHA1,
                    PkcsMgfType::MGF1_SHA1,
                    PkcsOaepSource::empty(),
                );
                self.run(
                    "decrypt",
                    &Mechanism::RsaPkcsOaep(params),
                    ciphertext,
                    false,
                )
                .map(Zeroizing::new)
            }
            // The token's own OAEP-SHA-256 where it has one; otherwise (SoftHSM2 2.6 has
            // OAEP with SHA-1 only) raw RSA inside and the padding outside. Which one is
            // learnt on first use.
            EncryptionAlgorithm::RsaOaep256 => {
                if self.token.oaep256.load(Ordering::Relaxed) != OAEP256_RAW {
                    let params = PkcsOaepParams::new(
                        MechanismType::SHA256,
                        PkcsMgfType::MGF1_SHA256,
                        PkcsOaepSource::empty(),
                    );
                    let native =
                        self.call(|s, h| s.decrypt(&Mechanism::RsaPkcsOaep(params), h, ciphertext));
                    match native {
                        Ok(p) => {
                            self.token.oaep256.store(OAEP256_NATIVE, Ordering::Relaxed);
                            return Ok(Zeroizing::new(p));
                        }
                        Err(e) if !lacks_mechanism(&e) => {
                            return Err(decrypt_err(&self.token.label, "decrypt", &e));
                        }
                        Err(_) => self.token.oaep256.store(OAEP256_RAW, Ordering::Relaxed),
                    }
                }
                let em =
                    Zeroizing::new(self.run("decrypt", &Mechanism::RsaX509, ciphertext, false)?);
                oaep_decode(alg, &em, len)
            }
        }
    }

    fn sign_digest(&self, alg: SignatureAlgorithm, digest: &[u8]) -> Result<Vec<u8>, CryptoError> {
        self.public.check_signature_alg(alg)?;
        check_digest_len(alg, digest)?;
        match alg {
            SignatureAlgorithm::RS256 | SignatureAlgorithm::RS384 | SignatureAlgorithm::RS512 => {
                let info = pkcs1_digest_info(alg, digest)?;
                self.run("sign", &Mechanism::RsaPkcs, &info, true)
            }
            SignatureAlgorithm::PS256 | SignatureAlgorithm::PS384 | SignatureAlgorithm::PS512 => {
                let (hash_alg, mgf) = hash_mechanism(alg.digest_algorithm());
                let params = PkcsPssParams {
                    hash_alg,
                    mgf,
                    s_len: (alg.digest_len() as u64).into(),
                };
                self.run("sign", &Mechanism::RsaPkcsPss(params), digest, true)
            }
            // ECDSA over the caller's digest; PKCS#11 returns r || s at the curve's size.
            _ => self.run("sign", &Mechanism::Ecdsa, digest, true),
        }
    }
}

impl Token {
    /// A token key's operations, read from its objects.
    pub(crate) fn key(self: &Arc<Self>, s: &Session, id: &[u8]) -> Result<TokenKey, CryptoError> {
        let missing = || {
            CryptoError::KeyNotHeld(format!(
                "PKCS#11 token '{}' holds no key with id {}",
                self.label,
                hex(id)
            ))
        };
        let private = self
            .find_one(s, ObjectClass::PRIVATE_KEY, id)
            .map_err(self.err("find key"))?
            .ok_or_else(missing)?;
        let attrs = s
            .get_attributes(
                private,
                &[
                    AttributeType::KeyType,
                    AttributeType::Modulus,
                    AttributeType::PublicExponent,
                ],
            )
            .map_err(self.err("read key"))?;
        let mut key_type = None;
        let (mut n, mut e) = (None, None);
        for a in attrs {
            match a {
                Attribute::KeyType(t) => key_type = Some(t),
                Attribute::Modulus(v) => n = Some(v),
                Attribute::PublicExponent(v) => e = Some(v),
                _ => {}
            }
        }
        if key_type == Some(KeyType::RSA) {
            let (Some(n), Some(e)) = (n, e) else {
                return Err(missing());
            };
            let public = PublicKey::rsa_from_components(&n, &e)?;
            let bits = public.rsa_bits().unwrap_or(0) as usize;
            return Ok(TokenKey::new(
                self.clone(),
                id,
                private,
                public,
                KeyKind::Rsa {
                    len: bits.div_ceil(8),
                },
            ));
        }
        if key_type != Some(KeyType::EC) {
            return Err(CryptoError::Unsupported(format!(
                "key {} in token '{}' is neither RSA nor EC",
                hex(id),
                self.label
            )));
        }
        // A private EC key object carries no point: the public object with the same id does.
        let public_obj = self
            .find_one(s, ObjectClass::PUBLIC_KEY, id)
            .map_err(self.err("find public key"))?
            .ok_or_else(missing)?;
        let attrs = s
            .get_attributes(
                public_obj,
                &[AttributeType::EcParams, AttributeType::EcPoint],
            )
            .map_err(self.err("read public key"))?;
        let (mut params, mut point) = (None, None);
        for a in attrs {
            match a {
                Attribute::EcParams(v) => params = Some(v),
                Attribute::EcPoint(v) => point = Some(v),
                _ => {}
            }
        }
        let curve = params
            .as_deref()
            .and_then(curve_from_params)
            .ok_or_else(|| {
                CryptoError::Unsupported(format!(
                    "the curve of key {} in token '{}'",
                    hex(id),
                    self.label
                ))
            })?;
        let point = point.ok_or_else(missing)?;
        let len = curve.coordinate_len();
        let raw = ec_point(&point, 1 + 2 * len).ok_or_else(|| {
            CryptoError::InvalidKey("token EC point is not an uncompressed point".into())
        })?;
        let public = PublicKey::ec_from_components(curve, &raw[1..=len], &raw[1 + len..])?;
        Ok(TokenKey::new(
            self.clone(),
            id,
            private,
            public,
            KeyKind::Ec,
        ))
    }
}
