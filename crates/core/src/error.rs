//! The error every kagi API answers with, in Azure's shape:
//! `{"error":{"code","message","innererror":{"code"}}}` with an HTTP status.
//!
//! Error policy: a client mistake is a 4xx naming what was wrong; a 5xx means kagi itself failed
//! and carries no detail beyond a correlation hint. Messages never contain key material, secret
//! values or tokens — they name objects, never their contents.

use serde::Serialize;

/// Azure's top-level error codes that kagi answers with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum ErrorCode {
    /// 400: a request parameter is invalid.
    BadParameter,
    /// 400: ARM's generic invalid request.
    BadRequest,
    /// 401: no valid bearer token.
    Unauthorized,
    /// 403: the caller or the object's state forbids the operation.
    Forbidden,
    /// 404: the key does not exist.
    KeyNotFound,
    /// 404: the secret does not exist.
    SecretNotFound,
    /// 404: the vault does not exist.
    VaultNotFound,
    /// 404: an ARM resource does not exist.
    ResourceNotFound,
    /// 404: an ARM resource group does not exist.
    ResourceGroupNotFound,
    /// 404: a path that no API serves.
    NotFound,
    /// 405: a method the path does not serve.
    MethodNotAllowed,
    /// 409: the object's state conflicts with the request.
    Conflict,
    /// 409: the vault name is taken (globally, as DNS names are).
    VaultAlreadyExists,
    /// 413: the request body is too large.
    RequestEntityTooLarge,
    /// 416: a byte range outside the object.
    RangeNotSatisfiable,
    /// 500: kagi failed.
    InternalError,
    /// 503: kagi cannot serve the request now.
    ServiceUnavailable,
    /// 507: the server keeps its remaining disk space for itself (audit log, store).
    InsufficientStorage,
}

impl ErrorCode {
    /// The code as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BadParameter => "BadParameter",
            Self::BadRequest => "BadRequest",
            Self::Unauthorized => "Unauthorized",
            Self::Forbidden => "Forbidden",
            Self::KeyNotFound => "KeyNotFound",
            Self::SecretNotFound => "SecretNotFound",
            Self::VaultNotFound => "VaultNotFound",
            Self::ResourceNotFound => "ResourceNotFound",
            Self::ResourceGroupNotFound => "ResourceGroupNotFound",
            Self::NotFound => "NotFound",
            Self::MethodNotAllowed => "MethodNotAllowed",
            Self::Conflict => "Conflict",
            Self::VaultAlreadyExists => "VaultAlreadyExists",
            Self::RequestEntityTooLarge => "RequestEntityTooLarge",
            Self::RangeNotSatisfiable => "RangeNotSatisfiable",
            Self::InternalError => "InternalError",
            Self::ServiceUnavailable => "ServiceUnavailable",
            Self::InsufficientStorage => "InsufficientStorage",
        }
    }

    /// The HTTP status that goes with the code.
    pub fn status(self) -> u16 {
        match self {
            Self::BadParameter | Self::BadRequest => 400,
            Self::Unauthorized => 401,
            Self::Forbidden => 403,
            Self::KeyNotFound
            | Self::SecretNotFound
            | Self::VaultNotFound
            | Self::ResourceNotFound
            | Self::ResourceGroupNotFound
            | Self::NotFound => 404,
            Self::MethodNotAllowed => 405,
            Self::Conflict | Self::VaultAlreadyExists => 409,
            Self::RequestEntityTooLarge => 413,
            Self::RangeNotSatisfiable => 416,
            Self::InternalError => 500,
            Self::ServiceUnavailable => 503,
            Self::InsufficientStorage => 507,
        }
    }
}

/// An error answered to a client: a code, a message, and an optional inner code that narrows it
/// (`ObjectIsDeletedButRecoverable`, `KeySizeNotSupported`, …).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}: {message}", code.as_str())]
pub struct KvError {
    /// The top-level code.
    pub code: ErrorCode,
    /// The inner error code, when Azure gives one.
    pub inner: Option<&'static str>,
    /// A human-readable message.
    pub message: String,
}

impl KvError {
    /// An error with a code and message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            inner: None,
            message: message.into(),
        }
    }

    /// Adds an inner error code.
    #[must_use]
    pub fn with_inner(mut self, inner: &'static str) -> Self {
        self.inner = Some(inner);
        self
    }

    /// The HTTP status.
    pub fn status(&self) -> u16 {
        self.code.status()
    }

    /// 400 BadParameter.
    pub fn bad_parameter(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::BadParameter, message)
    }

    /// 403 Forbidden.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Forbidden, message)
    }

    /// 401 Unauthorized.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Unauthorized, message)
    }

    /// 500 with no detail: the cause goes to the server log, not to the client.
    pub fn internal() -> Self {
        Self::new(
            ErrorCode::InternalError,
            "kagi could not complete the request; see the server log",
        )
    }

    /// 404 for a key name, as Azure words it.
    pub fn key_not_found(name: &str, version: Option<&str>) -> Self {
        let id = match version {
            Some(v) => format!("{name}/{v}"),
            None => name.to_string(),
        };
        Self::new(
            ErrorCode::KeyNotFound,
            format!("A key with (name/id) {id} was not found in this key vault."),
        )
    }

    /// 404 for a soft-deleted key that does not exist.
    pub fn deleted_key_not_found(name: &str) -> Self {
        Self::new(
            ErrorCode::KeyNotFound,
            format!("Deleted Key not found: {name}"),
        )
    }

    /// 409 for a name that is soft-deleted and so cannot be reused.
    pub fn deleted_but_recoverable(kind: &str, name: &str) -> Self {
        Self::new(
            ErrorCode::Conflict,
            format!(
                "{kind} {name} is currently in a deleted but recoverable state, and its name \
                 cannot be reused; in this state, the {} can only be recovered or purged.",
                kind.to_lowercase()
            ),
        )
        .with_inner("ObjectIsDeletedButRecoverable")
    }

    /// 409 for recovering over a live object.
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Conflict, message)
    }
}

/// The wire body of an error.
#[derive(Serialize)]
pub struct ErrorBody<'a> {
    /// The error object.
    pub error: ErrorDetail<'a>,
}

/// The `error` object of an error body.
#[derive(Serialize)]
pub struct ErrorDetail<'a> {
    /// Top-level code.
    pub code: &'static str,
    /// Message.
    pub message: &'a str,
    /// Inner error, when present.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub innererror: Option<InnerError>,
}

/// The inner error object.
#[derive(Serialize)]
pub struct InnerError {
    /// Inner code.
    pub code: &'static str,
}

impl KvError {
    /// The error as Azure's JSON body.
    pub fn body(&self) -> ErrorBody<'_> {
        ErrorBody {
            error: ErrorDetail {
                code: self.code.as_str(),
                message: &self.message,
                innererror: self.inner.map(|code| InnerError { code }),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_shape() {
        let e = KvError::deleted_but_recoverable("Key", "k1");
        let json = serde_json::to_value(e.body()).unwrap();
        assert_eq!(json["error"]["code"], "Conflict");
        assert_eq!(
            json["error"]["innererror"]["code"],
            "ObjectIsDeletedButRecoverable"
        );
        assert_eq!(e.status(), 409);
        let e = KvError::key_not_found("k", None);
        let json = serde_json::to_value(e.body()).unwrap();
        assert!(json["error"].get("innererror").is_none());
        assert_eq!(e.status(), 404);
    }
}
