//! A key inside the token: its private operations as [`PrivateKeyOps`].

use std::fmt;
use std::sync::Arc;

use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsOaepParams, PkcsOaepSource, PkcsPssParams};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::ObjectHandle;
use kagi_crypto::padding::{check_digest_len, oaep_decode, pkcs1_digest_info};
use kagi_crypto::{
    CryptoError, DigestAlgorithm, EncryptionAlgorithm, PrivateKeyOps, PublicKey, SignatureAlgorithm,
};
use zeroize::Zeroizing;

use crate::token::{Token, crypto_err, decrypt_err};

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
    handle: ObjectHandle,
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
        handle: ObjectHandle,
        public: PublicKey,
        kind: KeyKind,
    ) -> Self {
        Self {
            token,
            handle,
            public,
            kind,
        }
    }

    pub(crate) fn kind(&self) -> KeyKind {
        self.kind
    }

    pub(crate) fn handle(&self) -> ObjectHandle {
        self.handle
    }

    fn run(
        &self,
        what: &str,
        mech: &Mechanism<'_>,
        input: &[u8],
        sign: bool,
    ) -> Result<Vec<u8>, CryptoError> {
        self.token
            .with_session(|s| {
                if sign {
                    s.sign(mech, self.handle, input)
                } else {
                    s.decrypt(mech, self.handle, input)
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
            // The token has OAEP with SHA-1 only: raw RSA inside, the padding outside.
            EncryptionAlgorithm::RsaOaep256 => {
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
