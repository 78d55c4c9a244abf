//! Access to the token: the opened module and slot, the login, a pool of sessions, and
//! what every part of this crate shares (error mapping, object lookup, curve encodings).

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

use cryptoki::context::Pkcs11;
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use kagi_crypto::{CryptoError, Curve};

/// The opened token, shared by the provider and every key it hands out.
pub(crate) struct Token {
    pub(crate) ctx: Pkcs11,
    pub(crate) slot: Slot,
    pub(crate) label: String,
    pub(crate) module: String,
    pub(crate) pin: AuthPin,
    /// Whether the token does RSA-OAEP with SHA-256 itself (`OAEP256_*`; unknown until the
    /// first such decryption).
    pub(crate) oaep256: AtomicU8,
    /// Set once the token refused the PIN (see [`Token::login`]).
    pub(crate) pin_refused: AtomicBool,
    /// Idle sessions. One stays open for the life of the process: closing a token's last
    /// session logs the application out.
    pub(crate) idle: Mutex<Vec<Session>>,
}

/// `Token::oaep256`: not tried yet.
pub(crate) const OAEP256_UNKNOWN: u8 = 0;
/// `Token::oaep256`: the token's own `CKM_RSA_PKCS_OAEP` with SHA-256.
pub(crate) const OAEP256_NATIVE: u8 = 1;
/// `Token::oaep256`: raw RSA in the token, OAEP decoding in kagi.
pub(crate) const OAEP256_RAW: u8 = 2;

/// Whether the token refused a mechanism or its parameters (SoftHSM2 answers OAEP with
/// SHA-256 with CKR_ARGUMENTS_BAD).
pub(crate) fn lacks_mechanism(err: &CkError) -> bool {
    matches!(
        rv(err),
        Some(RvError::MechanismInvalid | RvError::MechanismParamInvalid | RvError::ArgumentsBad)
    )
}

pub(crate) fn rv(err: &CkError) -> Option<RvError> {
    match err {
        CkError::Pkcs11(rv, _) => Some(*rv),
        _ => None,
    }
}

/// A failed decryption or unwrapping: SoftHSM reports bad padding, a wrong GCM tag or a
/// wrapped key that does not unwrap as CKR_GENERAL_ERROR, so during these operations that
/// answer (and the input-shaped ones) means the input, not the token.
pub(crate) fn decrypt_err(label: &str, what: &str, err: &CkError) -> CryptoError {
    match rv(err) {
        Some(
            RvError::GeneralError
            | RvError::FunctionFailed
            | RvError::DataInvalid
            | RvError::DataLenRange,
        ) => CryptoError::DecryptionFailed,
        _ => crypto_err(label, what, err),
    }
}

/// A token failure, as kagi's crypto error: the caller's mistake where the token says so,
/// "unavailable" otherwise (the key's holder failed, not the request).
pub(crate) fn crypto_err(label: &str, what: &str, err: &CkError) -> CryptoError {
    match rv(err) {
        Some(
            RvError::EncryptedDataInvalid
            | RvError::EncryptedDataLenRange
            | RvError::WrappedKeyInvalid
            | RvError::WrappedKeyLenRange,
        ) => CryptoError::DecryptionFailed,
        Some(
            RvError::CurveNotSupported | RvError::DomainParamsInvalid | RvError::MechanismInvalid,
        ) => CryptoError::Unsupported(format!("{what} in PKCS#11 token '{label}': {err}")),
        Some(RvError::KeyFunctionNotPermitted) => {
            CryptoError::Unsupported(format!("{what} is not permitted for this key by its token"))
        }
        _ => CryptoError::KeyUnavailable(format!("PKCS#11 token '{label}': {what}: {err}")),
    }
}

impl Token {
    /// Runs `f` on an idle session (opening one when none is idle), logging in again if the
    /// token forgot the login. A new session logs in first: if every earlier session was
    /// closed the application is logged out, and finds would then quietly skip private
    /// objects.
    pub(crate) fn with_session<T>(
        &self,
        f: impl Fn(&Session) -> Result<T, CkError>,
    ) -> Result<T, CkError> {
        let popped = self.idle.lock().ok().and_then(|mut v| v.pop());
        let session = match popped {
            Some(s) => s,
            None => {
                let s = self.ctx.open_rw_session(self.slot)?;
                self.login(&s)?;
                s
            }
        };
        let mut result = f(&session);
        if let Err(e) = &result
            && rv(e) == Some(RvError::UserNotLoggedIn)
        {
            self.login(&session)?;
            result = f(&session);
        }
        let broken = matches!(
            result.as_ref().err().and_then(rv),
            Some(RvError::SessionHandleInvalid | RvError::SessionClosed | RvError::DeviceRemoved)
        );
        if !broken && let Ok(mut v) = self.idle.lock() {
            v.push(session);
        }
        result
    }

    /// Logs the application in. Once the token has refused the PIN (changed, expired or
    /// locked since start), kagi stops offering it: each retry would count towards locking
    /// the token. A restart with the right PIN file is needed.
    pub(crate) fn login(&self, session: &Session) -> Result<(), CkError> {
        if self.pin_refused.load(Ordering::Relaxed) {
            return Err(CkError::Pkcs11(
                RvError::PinIncorrect,
                cryptoki::context::Function::Login,
            ));
        }
        match session.login(UserType::User, Some(&self.pin)) {
            Err(e) if rv(&e) == Some(RvError::UserAlreadyLoggedIn) => Ok(()),
            Err(e) => {
                if matches!(
                    rv(&e),
                    Some(RvError::PinIncorrect | RvError::PinLocked | RvError::PinExpired)
                ) {
                    self.pin_refused.store(true, Ordering::Relaxed);
                    tracing::error!(
                        token = %self.label,
                        "the PKCS#11 token refused the PIN; HSM keys are unavailable until kagi \
                         restarts with the right --pkcs11-pin-file"
                    );
                }
                Err(e)
            }
            Ok(()) => Ok(()),
        }
    }

    pub(crate) fn err(&self, what: &'static str) -> impl FnOnce(CkError) -> CryptoError + '_ {
        move |e| crypto_err(&self.label, what, &e)
    }

    pub(crate) fn find_one(
        &self,
        s: &Session,
        class: ObjectClass,
        id: &[u8],
    ) -> Result<Option<ObjectHandle>, CkError> {
        Ok(
            s.find_objects(&[Attribute::Class(class), Attribute::Id(id.to_vec())])?
                .into_iter()
                .next(),
        )
    }

    /// A new AES-256 key (sensitive, never extractable) to seal a root key, with `id`.
    pub(crate) fn new_root_wrap_key(
        &self,
        s: &Session,
        id: &[u8],
    ) -> Result<ObjectHandle, CkError> {
        s.generate_key(
            &Mechanism::AesKeyGen,
            &[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::AES),
                Attribute::ValueLen(32.into()),
                Attribute::Token(true),
                Attribute::Private(true),
                Attribute::Sensitive(true),
                Attribute::Extractable(false),
                Attribute::Encrypt(true),
                Attribute::Decrypt(true),
                Attribute::Id(id.to_vec()),
                Attribute::Label(format!("kagi-root-{}", hex(id)).into_bytes()),
            ],
        )
    }
}

/// The DER OID of each curve, as `CKA_EC_PARAMS` holds it.
pub(crate) fn curve_params(curve: Curve) -> &'static [u8] {
    match curve {
        Curve::P256 => &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07],
        Curve::P384 => &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22],
        Curve::P521 => &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x23],
        Curve::P256K => &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x0a],
    }
}

pub(crate) fn curve_from_params(params: &[u8]) -> Option<Curve> {
    Curve::ALL.into_iter().find(|c| curve_params(*c) == params)
}

/// The uncompressed point (`04 || x || y`, `point_len` bytes) in a `CKA_EC_POINT`: a DER
/// OCTET STRING around it in PKCS#11 2.20+, the bare point on some tokens (checked first, as a
/// bare point can look like an OCTET STRING header).
pub(crate) fn ec_point(v: &[u8], point_len: usize) -> Option<&[u8]> {
    match v {
        [0x04, ..] if v.len() == point_len => Some(v),
        [0x04, len, rest @ ..] if usize::from(*len) == rest.len() && *len < 0x80 => Some(rest),
        [0x04, 0x81, len, rest @ ..] if usize::from(*len) == rest.len() => Some(rest),
        _ => None,
    }
    .filter(|p| p.len() == point_len && p[0] == 0x04)
}

pub(crate) fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
