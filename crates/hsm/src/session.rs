//! Access to the token: the opened module and slot, the login, a pool of sessions, and
//! what every part of this crate shares (error mapping, object lookup, curve encodings).

use std::sync::Mutex;

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
    /// Idle sessions. One stays open for the life of the process: closing a token's last
    /// session logs the application out.
    pub(crate) idle: Mutex<Vec<Session>>,
}

/// The `CKA_ID` of the AES key that seals kagi's root key.
pub(crate) const ROOT_WRAP_ID: &[u8] = b"kagi-root-key-wrap";

pub(crate) fn rv(err: &CkError) -> Option<RvError> {
    match err {
        CkError::Pkcs11(rv, _) => Some(*rv),
        _ => None,
    }
}

/// A failed decryption or unwrapping: SoftHSM reports bad padding, a wrong GCM tag or a
/// wrapped key that does not unwrap as CKR_GENERAL_ERROR, so during these operations that
/// answer means the input, not the token.
pub(crate) fn decrypt_err(label: &str, what: &str, err: &CkError) -> CryptoError {
    match rv(err) {
        Some(RvError::GeneralError | RvError::FunctionFailed) => CryptoError::DecryptionFailed,
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
            | RvError::WrappedKeyLenRange
            | RvError::DataInvalid
            | RvError::DataLenRange,
        ) => CryptoError::DecryptionFailed,
        Some(
            RvError::CurveNotSupported | RvError::DomainParamsInvalid | RvError::MechanismInvalid,
        ) => CryptoError::Unsupported(format!("{what} in PKCS#11 token '{label}': {err}")),
        _ => CryptoError::KeyUnavailable(format!("PKCS#11 token '{label}': {what}: {err}")),
    }
}

impl Token {
    /// Runs `f` on an idle session (opening one when none is idle), logging in again if the
    /// token forgot the login.
    pub(crate) fn with_session<T>(
        &self,
        f: impl Fn(&Session) -> Result<T, CkError>,
    ) -> Result<T, CkError> {
        let popped = self.idle.lock().ok().and_then(|mut v| v.pop());
        let session = match popped {
            Some(s) => s,
            None => self.ctx.open_rw_session(self.slot)?,
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

    pub(crate) fn login(&self, session: &Session) -> Result<(), CkError> {
        match session.login(UserType::User, Some(&self.pin)) {
            Err(e) if rv(&e) == Some(RvError::UserAlreadyLoggedIn) => Ok(()),
            other => other,
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

    /// The AES key that seals the root key, made on first use.
    pub(crate) fn root_wrap_key(&self, s: &Session) -> Result<ObjectHandle, CkError> {
        if let Some(h) = self.find_one(s, ObjectClass::SECRET_KEY, ROOT_WRAP_ID)? {
            return Ok(h);
        }
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
                Attribute::Id(ROOT_WRAP_ID.to_vec()),
                Attribute::Label(ROOT_WRAP_ID.to_vec()),
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

/// `CKA_EC_POINT` is a DER OCTET STRING around the point in PKCS#11 2.20+; some tokens give
/// the bare point.
pub(crate) fn unwrap_octet_string(v: &[u8]) -> &[u8] {
    match v {
        [0x04, len, rest @ ..] if usize::from(*len) == rest.len() && *len < 0x80 => rest,
        [0x04, 0x81, len, rest @ ..] if usize::from(*len) == rest.len() => rest,
        _ => v,
    }
}

pub(crate) fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
