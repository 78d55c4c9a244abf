//! The token: loading the module, finding the token by label, logging in, a pool of
//! sessions, and the objects kagi keeps there.

use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU8};
use std::sync::{Arc, Mutex};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::MechanismType;
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsOaepParams, PkcsOaepSource};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use cryptoki::types::AuthPin;
use kagi_crypto::{
    CryptoError, Curve, KeyProvider, KeySpec, PrivateKeyOps, ProvidedKey, RsaPrivateComponents,
    TokenKeyRef,
};
use zeroize::Zeroizing;

use crate::session::{OAEP256_UNKNOWN, Token, crypto_err, curve_params, decrypt_err, hex, rv};

/// Where the token is and how to log in.
pub struct Pkcs11Config {
    /// The PKCS#11 module (`/usr/lib/softhsm/libsofthsm2.so`).
    pub module: PathBuf,
    /// The token's label.
    pub token_label: String,
    /// The user PIN.
    pub pin: Zeroizing<String>,
}

impl fmt::Debug for Pkcs11Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pkcs11Config")
            .field("module", &self.module)
            .field("token_label", &self.token_label)
            .finish_non_exhaustive()
    }
}

/// Why the token could not be opened. Messages name the module and token and say what to
/// check; they never carry the PIN.
#[derive(Debug, thiserror::Error)]
pub enum HsmError {
    /// The module could not be loaded or initialised.
    #[error("cannot load the PKCS#11 module {module}: {reason}")]
    Module {
        /// The module path.
        module: String,
        /// The cause.
        reason: String,
    },
    /// No slot holds a token with the label.
    #[error(
        "no PKCS#11 token labelled '{label}' in {module} (tokens present: {present}); check \
         --pkcs11-token and that the token is plugged in or initialised"
    )]
    TokenNotFound {
        /// The label looked for.
        label: String,
        /// The module.
        module: String,
        /// Labels of the tokens that are there.
        present: String,
    },
    /// The PIN was refused.
    #[error("logging in to PKCS#11 token '{label}' failed: {reason}; check --pkcs11-pin-file")]
    Login {
        /// The token.
        label: String,
        /// The token's answer.
        reason: String,
    },
    /// Another token call failed.
    #[error("PKCS#11 token '{label}': {what}: {reason}")]
    Token {
        /// The token.
        label: String,
        /// What was being done.
        what: &'static str,
        /// The token's answer.
        reason: String,
    },
}

/// Marks a root key sealed by a token (docs/HSM.md, "Sealed root key").
const ROOT_SEAL_MAGIC: &[u8] = b"kagi-hsm-root/1";
/// GCM's AAD for the root key, so the token key opens nothing else kagi may seal later.
const ROOT_SEAL_AAD: &[u8] = b"kagi/v1/root-key";
const GCM_IV_LEN: usize = 12;

fn new_id() -> Result<Vec<u8>, CryptoError> {
    kagi_crypto::random_bytes(16)
}

/// The label prefix of every key object kagi makes (its root-key wrapping keys differ).
const KEY_LABEL_PREFIX: &str = "kagi-key-";

/// Wipes the private values of a template once the token has them.
fn wipe(template: &mut [Attribute]) {
    use zeroize::Zeroize as _;
    for a in template {
        if let Attribute::PrivateExponent(v)
        | Attribute::Prime1(v)
        | Attribute::Prime2(v)
        | Attribute::Exponent1(v)
        | Attribute::Exponent2(v)
        | Attribute::Coefficient(v)
        | Attribute::Value(v) = a
        {
            v.zeroize();
        }
    }
}

/// What a private key object may do.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    /// An RSA key: decrypt and sign.
    Rsa,
    /// An EC key: sign.
    Ec,
    /// A BYOK key-exchange key: unwrap only (the token refuses it anything else).
    KeyExchange,
}

/// The template of a private key kagi keeps: sensitive, never extractable, in the token, and
/// allowed only what its role needs.
fn private_template(id: &[u8], kind: ObjectClass, key_type: KeyType, role: Role) -> Vec<Attribute> {
    vec![
        Attribute::Class(kind),
        Attribute::KeyType(key_type),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Sign(role != Role::KeyExchange),
        Attribute::Decrypt(role == Role::Rsa),
        Attribute::Unwrap(role == Role::KeyExchange),
        Attribute::Id(id.to_vec()),
        Attribute::Label(format!("{KEY_LABEL_PREFIX}{}", hex(id)).into_bytes()),
    ]
}

fn public_template(id: &[u8]) -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::PUBLIC_KEY),
        Attribute::Token(true),
        Attribute::Private(false),
        Attribute::Verify(true),
        Attribute::Id(id.to_vec()),
        Attribute::Label(format!("kagi-key-{}", hex(id)).into_bytes()),
    ]
}

/// The PKCS#11 key provider.
#[derive(Clone)]
pub struct Pkcs11Provider {
    token: Arc<Token>,
}

impl fmt::Debug for Pkcs11Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe())
    }
}

impl Pkcs11Provider {
    /// Loads the module, finds the token by label and logs in.
    ///
    /// # Errors
    /// [`HsmError`] saying which of those failed.
    pub fn open(config: &Pkcs11Config) -> Result<Self, HsmError> {
        let module = config.module.display().to_string();
        let module_err = |e: CkError| HsmError::Module {
            module: module.clone(),
            reason: e.to_string(),
        };
        let ctx = Pkcs11::new(&config.module).map_err(module_err)?;
        match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
            Err(e) if rv(&e) != Some(RvError::CryptokiAlreadyInitialized) => {
                return Err(module_err(e));
            }
            _ => {}
        }
        let mut present = Vec::new();
        let mut found = None;
        for slot in ctx.get_slots_with_initialized_token().map_err(module_err)? {
            let info = ctx.get_token_info(slot).map_err(module_err)?;
            let label = info.label().trim_end().to_string();
            if label == config.token_label {
                found = Some(slot);
                break;
            }
            present.push(format!("'{label}'"));
        }
        let Some(slot) = found else {
            return Err(HsmError::TokenNotFound {
                label: config.token_label.clone(),
                module,
                present: if present.is_empty() {
                    "none".into()
                } else {
                    present.join(", ")
                },
            });
        };
        let token = Token {
            ctx,
            slot,
            label: config.token_label.clone(),
            module,
            pin: AuthPin::from(config.pin.as_str().to_owned()),
            oaep256: AtomicU8::new(OAEP256_UNKNOWN),
            pin_refused: AtomicBool::new(false),
            idle: Mutex::new(Vec::new()),
        };
        let session = token
            .ctx
            .open_rw_session(slot)
            .map_err(|e| HsmError::Token {
                label: token.label.clone(),
                what: "open session",
                reason: e.to_string(),
            })?;
        token.login(&session).map_err(|e| HsmError::Login {
            label: token.label.clone(),
            reason: e.to_string(),
        })?;
        if let Ok(mut v) = token.idle.lock() {
            v.push(session);
        }
        Ok(Self {
            token: Arc::new(token),
        })
    }

    fn provided(&self, s: &Session, id: Vec<u8>) -> Result<ProvidedKey, CryptoError> {
        let key = self.token.key(s, &id)?;
        Ok(ProvidedKey {
            reference: TokenKeyRef {
                token: self.token.label.clone(),
                id,
            },
            ops: Arc::new(key),
        })
    }

    /// Destroys what was made under `id` after a later step failed (best effort: the
    /// failure being reported matters more than this one).
    fn forget(&self, id: &[u8]) {
        let r = TokenKeyRef {
            token: self.token.label.clone(),
            id: id.to_vec(),
        };
        let _ = self.destroy(&r);
    }

    /// `result`, destroying what was made under `id` if it is an error.
    fn or_forget<T>(&self, id: &[u8], result: Result<T, CryptoError>) -> Result<T, CryptoError> {
        if result.is_err() {
            self.forget(id);
        }
        result
    }

    fn check_ref(&self, r: &TokenKeyRef) -> Result<(), CryptoError> {
        if r.token == self.token.label {
            return Ok(());
        }
        Err(CryptoError::KeyNotHeld(format!(
            "the key is in PKCS#11 token '{}', but this kagi uses token '{}'",
            r.token, self.token.label
        )))
    }

    /// Runs `f` on a session, turning its token errors into crypto errors via `what`.
    fn run<T>(
        &self,
        what: &'static str,
        f: impl Fn(&Session) -> Result<T, CkError>,
    ) -> Result<T, CryptoError> {
        self.run_mapped(what, crypto_err, f)
    }

    /// As [`Self::run`] for an operation that decrypts its input.
    fn run_decrypting<T>(
        &self,
        what: &'static str,
        f: impl Fn(&Session) -> Result<T, CkError>,
    ) -> Result<T, CryptoError> {
        self.run_mapped(what, decrypt_err, f)
    }

    fn run_mapped<T>(
        &self,
        what: &'static str,
        map: fn(&str, &str, &CkError) -> CryptoError,
        f: impl Fn(&Session) -> Result<T, CkError>,
    ) -> Result<T, CryptoError> {
        self.token
            .with_session(f)
            .map_err(|e| map(&self.token.label, what, &e))
    }

    /// Runs `f`, which makes the objects of key `id`, and reads the key back; on any
    /// failure whatever `f` made is destroyed.
    fn run_key(
        &self,
        what: &'static str,
        id: &[u8],
        f: impl Fn(&Session) -> Result<(), CkError>,
    ) -> Result<ProvidedKey, CryptoError> {
        let made = self
            .run(what, f)
            .and_then(|()| self.run("read key", |s| Ok(self.provided(s, id.to_vec())))?);
        self.or_forget(id, made)
    }
}

impl KeyProvider for Pkcs11Provider {
    fn describe(&self) -> String {
        format!(
            "PKCS#11 token '{}' ({})",
            self.token.label, self.token.module
        )
    }

    fn token_label(&self) -> &str {
        &self.token.label
    }

    fn generate(&self, spec: KeySpec) -> Result<ProvidedKey, CryptoError> {
        let id = new_id()?;
        self.run_key("generate key", &id, |s| {
            let (mech, mut public, private) = match spec {
                KeySpec::Rsa(size) | KeySpec::RsaKeyExchange(size) => {
                    let role = match spec {
                        KeySpec::RsaKeyExchange(_) => Role::KeyExchange,
                        _ => Role::Rsa,
                    };
                    let mut p = public_template(&id);
                    p.push(Attribute::KeyType(KeyType::RSA));
                    p.push(Attribute::ModulusBits(u64::from(size.bits()).into()));
                    p.push(Attribute::PublicExponent(vec![0x01, 0x00, 0x01]));
                    p.push(Attribute::Encrypt(true));
                    (
                        Mechanism::RsaPkcsKeyPairGen,
                        p,
                        private_template(&id, ObjectClass::PRIVATE_KEY, KeyType::RSA, role),
                    )
                }
                KeySpec::Ec(curve) => {
                    let mut p = public_template(&id);
                    p.push(Attribute::KeyType(KeyType::EC));
                    p.push(Attribute::EcParams(curve_params(curve).to_vec()));
                    (
                        Mechanism::EccKeyPairGen,
                        p,
                        private_template(&id, ObjectClass::PRIVATE_KEY, KeyType::EC, Role::Ec),
                    )
                }
            };
            // Key generation templates do not name the class; SoftHSM refuses a mismatch.
            public.retain(|a| !matches!(a, Attribute::Class(_)));
            let private: Vec<_> = private
                .into_iter()
                .filter(|a| !matches!(a, Attribute::Class(_)))
                .collect();
            s.generate_key_pair(&mech, &public, &private)?;
            Ok(())
        })
    }

    fn import_rsa(&self, c: &RsaPrivateComponents<'_>) -> Result<ProvidedKey, CryptoError> {
        let id = new_id()?;
        self.run_key("import key", &id, |s| {
            let mut t = private_template(&id, ObjectClass::PRIVATE_KEY, KeyType::RSA, Role::Rsa);
            t.extend([
                Attribute::Modulus(c.n.to_vec()),
                Attribute::PublicExponent(c.e.to_vec()),
                Attribute::PrivateExponent(c.d.to_vec()),
                Attribute::Prime1(c.p.to_vec()),
                Attribute::Prime2(c.q.to_vec()),
                Attribute::Exponent1(c.dp.to_vec()),
                Attribute::Exponent2(c.dq.to_vec()),
                Attribute::Coefficient(c.qi.to_vec()),
            ]);
            let made = s.create_object(&t);
            wipe(&mut t);
            made?;
            let mut p = public_template(&id);
            p.extend([
                Attribute::KeyType(KeyType::RSA),
                Attribute::Encrypt(true),
                Attribute::Modulus(c.n.to_vec()),
                Attribute::PublicExponent(c.e.to_vec()),
            ]);
            s.create_object(&p)?;
            Ok(())
        })
    }

    fn import_ec(
        &self,
        curve: Curve,
        x: &[u8],
        y: &[u8],
        d: &[u8],
    ) -> Result<ProvidedKey, CryptoError> {
        let id = new_id()?;
        let mut point = vec![0x04, 0];
        point.push(0x04);
        point.extend_from_slice(x);
        point.extend_from_slice(y);
        // DER OCTET STRING length (< 128 for every supported curve except P-521).
        let inner = point.len() - 2;
        let point = if inner < 0x80 {
            point[1] = inner as u8;
            point
        } else {
            let mut p = vec![0x04, 0x81, inner as u8];
            p.extend_from_slice(&point[2..]);
            p
        };
        self.run_key("import key", &id, |s| {
            let mut t = private_template(&id, ObjectClass::PRIVATE_KEY, KeyType::EC, Role::Ec);
            t.extend([
                Attribute::EcParams(curve_params(curve).to_vec()),
                Attribute::Value(d.to_vec()),
            ]);
            let made = s.create_object(&t);
            wipe(&mut t);
            made?;
            let mut p = public_template(&id);
            p.extend([
                Attribute::KeyType(KeyType::EC),
                Attribute::EcParams(curve_params(curve).to_vec()),
                Attribute::EcPoint(point.clone()),
            ]);
            s.create_object(&p)?;
            Ok(())
        })
    }

    fn import_wrapped(
        &self,
        kek: &TokenKeyRef,
        wrapped: &[u8],
    ) -> Result<ProvidedKey, CryptoError> {
        self.check_ref(kek)?;
        let kek_key = self.run("find key", |s| Ok(self.token.key(s, &kek.id)))??;
        let Some(len) = kek_key.rsa_len() else {
            return Err(CryptoError::InvalidKey("a key-exchange key is RSA".into()));
        };
        if wrapped.len() <= len {
            return Err(CryptoError::DecryptionFailed);
        }
        let (aes_part, key_part) = wrapped.split_at(len);
        let id = new_id()?;
        // SoftHSM2 2.6 lacks CKM_RSA_AES_KEY_WRAP: its two halves, both inside the token.
        let is_rsa = self.run_decrypting("unwrap key", |s| {
            let oaep = PkcsOaepParams::new(
                MechanismType::SHA1,
                PkcsMgfType::MGF1_SHA1,
                PkcsOaepSource::empty(),
            );
            let aes = s.unwrap_key(
                &Mechanism::RsaPkcsOaep(oaep),
                kek_key.handle(),
                aes_part,
                &[
                    Attribute::Class(ObjectClass::SECRET_KEY),
                    Attribute::KeyType(KeyType::AES),
                    Attribute::Token(false),
                    Attribute::Sensitive(true),
                    Attribute::Extractable(false),
                    Attribute::Unwrap(true),
                ],
            )?;
            // The target's type is read after unwrapping: try RSA, then EC.
            let mut out = Err(CkError::NotSupported);
            for (key_type, role) in [(KeyType::RSA, Role::Rsa), (KeyType::EC, Role::Ec)] {
                out = s.unwrap_key(
                    &Mechanism::AesKeyWrapPad,
                    aes,
                    key_part,
                    &private_template(&id, ObjectClass::PRIVATE_KEY, key_type, role),
                );
                if out.is_ok() {
                    break;
                }
            }
            let _ = s.destroy_object(aes);
            rsa_of(s, out?)
        })?;
        if !is_rsa {
            // The token keeps no public point beside an unwrapped EC private key.
            self.forget(&id);
            return Err(CryptoError::Unsupported(
                "BYOK of EC keys into this token (it does not expose the public point of an \
                 unwrapped EC key); import EC keys as a JWK with hsm=true"
                    .into(),
            ));
        }
        // An unusable target (an RSA size kagi does not take) leaves nothing behind.
        let provided = self.run("read key", |s| Ok(self.provided(s, id.clone())))?;
        self.or_forget(&id, provided)
    }

    fn load(&self, r: &TokenKeyRef) -> Result<Arc<dyn PrivateKeyOps>, CryptoError> {
        self.check_ref(r)?;
        let key = self.run("find key", |s| Ok(self.token.key(s, &r.id)))??;
        Ok(Arc::new(key))
    }

    fn copy(&self, r: &TokenKeyRef) -> Result<ProvidedKey, CryptoError> {
        self.check_ref(r)?;
        let id = new_id()?;
        let label = format!("{KEY_LABEL_PREFIX}{}", hex(&id)).into_bytes();
        // Only kagi's key objects are copied: a reference from a backup file must not reach
        // anything else in the token (its root-key wrapping keys above all).
        let copied = self.run("copy key", |s| {
            let Some(private) = self.token.find_one(s, ObjectClass::PRIVATE_KEY, &r.id)? else {
                return Ok(false);
            };
            let ours = s
                .get_attributes(private, &[AttributeType::Label])?
                .iter()
                .any(|a| matches!(a, Attribute::Label(l) if l.starts_with(KEY_LABEL_PREFIX.as_bytes())));
            if !ours {
                return Ok(false);
            }
            let public = self.token.find_one(s, ObjectClass::PUBLIC_KEY, &r.id)?;
            for h in std::iter::once(private).chain(public) {
                s.copy_object(h, &[Attribute::Id(id.clone()), Attribute::Label(label.clone())])?;
            }
            Ok(true)
        });
        match copied {
            Ok(true) => {}
            Ok(false) => {
                return Err(CryptoError::KeyNotHeld(format!(
                    "PKCS#11 token '{}' holds no key with id {}",
                    self.token.label,
                    hex(&r.id)
                )));
            }
            Err(e) => return self.or_forget(&id, Err(e)),
        }
        let provided = self.run("read key", |s| Ok(self.provided(s, id.clone())))?;
        self.or_forget(&id, provided)
    }

    fn destroy(&self, r: &TokenKeyRef) -> Result<(), CryptoError> {
        self.check_ref(r)?;
        self.run("destroy key", |s| {
            for h in s.find_objects(&[Attribute::Id(r.id.clone())])? {
                s.destroy_object(h)?;
            }
            Ok(())
        })
    }

    fn seal_root_key(&self, raw: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let id = new_id()?;
        let iv: [u8; GCM_IV_LEN] = kagi_crypto::random_array()?;
        // Some tokens choose the GCM IV themselves and write it back: the IV kept is the one
        // the token used.
        let (iv, ct) = self.run("seal root key", |s| {
            let key = self.token.new_root_wrap_key(s, &id)?;
            let mut iv = iv;
            let params = GcmParams::new(&mut iv, ROOT_SEAL_AAD, 128.into())?;
            let ct = s.encrypt(&Mechanism::AesGcm(params), key, raw)?;
            Ok((iv, ct))
        })?;
        let mut out = ROOT_SEAL_MAGIC.to_vec();
        out.push(id.len() as u8);
        out.extend_from_slice(&id);
        out.extend_from_slice(&iv);
        out.extend_from_slice(&ct);
        Ok(out)
    }

    fn open_root_key(&self, sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        let rest = sealed
            .strip_prefix(ROOT_SEAL_MAGIC)
            .ok_or(CryptoError::DecryptionFailed)?;
        let (&id_len, rest) = rest.split_first().ok_or(CryptoError::DecryptionFailed)?;
        let id_len = usize::from(id_len);
        if rest.len() <= id_len + GCM_IV_LEN {
            return Err(CryptoError::DecryptionFailed);
        }
        let (id, rest) = rest.split_at(id_len);
        let (iv, ct) = rest.split_at(GCM_IV_LEN);
        let plain = self.run_decrypting("open root key", |s| {
            let Some(key) = self.token.find_one(s, ObjectClass::SECRET_KEY, id)? else {
                return Ok(None);
            };
            let mut iv: [u8; GCM_IV_LEN] = iv.try_into().unwrap_or([0; GCM_IV_LEN]);
            let params = GcmParams::new(&mut iv, ROOT_SEAL_AAD, 128.into())?;
            s.decrypt(&Mechanism::AesGcm(params), key, ct)
                .map(|p| Some(Zeroizing::new(p)))
        });
        match plain {
            Ok(Some(p)) => Ok(p),
            Ok(None) => Err(CryptoError::KeyNotHeld(format!(
                "PKCS#11 token '{}' has no key {} that sealed this root key: it was sealed by \
                 another token, or the key was deleted from this one",
                self.token.label,
                hex(id)
            ))),
            Err(e) => Err(e),
        }
    }
}

/// Whether the private key object `h` is RSA.
fn rsa_of(s: &Session, h: ObjectHandle) -> Result<bool, CkError> {
    let attrs = s.get_attributes(h, &[AttributeType::KeyType])?;
    Ok(attrs
        .iter()
        .any(|a| matches!(a, Attribute::KeyType(t) if *t == KeyType::RSA)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kagi_crypto::{EncryptionAlgorithm, RsaKeySize};
    use std::process::Command;

    const NAME: &str = "token::tests::a_stale_handle_is_found_again_by_its_id";

    /// After the token forgets a handle (here: the object is replaced by a copy with the same
    /// CKA_ID, as after an HSM restore), the key finds its object again. Runs in a child
    /// process whose SOFTHSM2_CONF points at a fresh token (see tests/softhsm.rs).
    #[test]
    fn a_stale_handle_is_found_again_by_its_id() {
        if std::env::var("KAGI_HSM_TEST_CHILD").as_deref() != Ok(NAME) {
            let dir = tempfile::tempdir().unwrap();
            let tokens = dir.path().join("tokens");
            std::fs::create_dir_all(&tokens).unwrap();
            let conf = dir.path().join("softhsm2.conf");
            std::fs::write(
                &conf,
                format!("directories.tokendir = {}\n", tokens.display()),
            )
            .unwrap();
            let init = Command::new("softhsm2-util")
                .env("SOFTHSM2_CONF", &conf)
                .args([
                    "--init-token",
                    "--free",
                    "--label",
                    "t",
                    "--pin",
                    "1234",
                    "--so-pin",
                    "5678",
                ])
                .output()
                .unwrap();
            assert!(init.status.success());
            let out = Command::new(std::env::current_exe().unwrap())
                .args([NAME, "--exact", "--nocapture", "--test-threads=1"])
                .env("SOFTHSM2_CONF", &conf)
                .env("KAGI_HSM_TEST_CHILD", NAME)
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success() && text.contains("1 passed"), "{text}");
            return;
        }
        let p = Pkcs11Provider::open(&Pkcs11Config {
            module: "/usr/lib/softhsm/libsofthsm2.so".into(),
            token_label: "t".into(),
            pin: Zeroizing::new("1234".into()),
        })
        .unwrap();
        let made = p.generate(KeySpec::Rsa(RsaKeySize::Rsa2048)).unwrap();
        let key = p
            .token
            .with_session(|s| Ok(p.token.key(s, &made.reference.id)))
            .unwrap()
            .unwrap();
        let old = key.handle();
        p.token
            .with_session(|s| {
                s.copy_object(old, &[])?;
                s.destroy_object(old)
            })
            .unwrap();
        let ct = key
            .public_key()
            .encrypt(EncryptionAlgorithm::RsaOaep, b"still here")
            .unwrap();
        let plain = key.decrypt(EncryptionAlgorithm::RsaOaep, &ct).unwrap();
        assert_eq!(plain.as_slice(), b"still here");
        assert_ne!(key.handle(), old);
    }
}
