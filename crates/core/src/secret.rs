//! Secrets as Key Vault models them: the value (never printed), attributes and their rules,
//! and the wire shapes of the secrets API (SecretBundle, requests).

use serde::{Deserialize, Serialize};

use crate::key::Tags;
use crate::{ErrorCode, KvError};

/// Largest secret value: 25 KiB of UTF-8.
pub const MAX_VALUE_BYTES: usize = 25 * 1024;

/// Longest `contentType`, in characters.
pub const MAX_CONTENT_TYPE_CHARS: usize = 255;

/// A secret value. Its `Debug` prints `<redacted>`, and its memory is wiped when dropped, so a
/// value reaches neither a log nor a core dump of freed memory through kagi's own types.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct SecretValue(zeroize::Zeroizing<String>);

impl Serialize for SecretValue {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for SecretValue {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Self::new)
    }
}

impl SecretValue {
    /// Wraps a value.
    pub fn new(value: String) -> Self {
        Self(zeroize::Zeroizing::new(value))
    }

    /// The value.
    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }

    /// The value's bytes (UTF-8).
    pub fn as_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }

    /// Length in bytes of UTF-8.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the value is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Reads a value from UTF-8 bytes (an unsealed value); `None` if they are not UTF-8.
    pub fn from_utf8(bytes: &[u8]) -> Option<Self> {
        std::str::from_utf8(bytes)
            .ok()
            .map(|s| Self::new(s.to_string()))
    }
}

impl std::fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Checks a value against Azure's size limit.
pub fn validate_value(value: &SecretValue) -> Result<(), KvError> {
    if value.len() > MAX_VALUE_BYTES {
        return Err(KvError::bad_parameter(format!(
            "The secret value is {} bytes; a secret value can be at most {MAX_VALUE_BYTES} bytes \
             (25 KiB).",
            value.len()
        )));
    }
    Ok(())
}

/// Checks a `contentType`.
pub fn validate_content_type(content_type: Option<&str>) -> Result<(), KvError> {
    if let Some(ct) = content_type
        && ct.chars().count() > MAX_CONTENT_TYPE_CHARS
    {
        return Err(KvError::bad_parameter(format!(
            "contentType can be at most {MAX_CONTENT_TYPE_CHARS} characters."
        )));
    }
    Ok(())
}

/// 404 for a secret, as Azure words it.
pub fn secret_not_found(name: &str, version: Option<&str>) -> KvError {
    let id = match version {
        Some(v) if !v.is_empty() => format!("{name}/{v}"),
        _ => name.to_string(),
    };
    KvError::new(
        ErrorCode::SecretNotFound,
        format!("A secret with (name/id) {id} was not found in this key vault."),
    )
}

/// 404 for a soft-deleted secret that does not exist.
pub fn deleted_secret_not_found(name: &str) -> KvError {
    KvError::new(
        ErrorCode::SecretNotFound,
        format!("Deleted Secret not found: {name}"),
    )
}

/// Attributes of a secret version as kagi keeps them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretAttributes {
    /// Whether the value may be read.
    pub enabled: bool,
    /// Not before (Unix seconds).
    pub nbf: Option<i64>,
    /// Expiry (Unix seconds).
    pub exp: Option<i64>,
    /// Creation time.
    pub created: i64,
    /// Last update time.
    pub updated: i64,
}

impl SecretAttributes {
    /// Checks that the value of this version may be read at `now`: a disabled secret refuses
    /// (403 `SecretDisabled`), and so does one before its `nbf` (`SecretNotYetValid`) or from its
    /// `exp` on (`SecretExpired`), as Azure does. Listing and updating are not affected.
    pub fn check_readable(&self, now: i64) -> Result<(), KvError> {
        if !self.enabled {
            return Err(
                KvError::forbidden("Operation get is not allowed on a disabled secret.")
                    .with_inner("SecretDisabled"),
            );
        }
        if let Some(nbf) = self.nbf
            && now < nbf
        {
            return Err(KvError::forbidden(format!(
                "Operation get is not allowed on a secret that is not yet valid (nbf {}).",
                crate::time::rfc3339(nbf)
            ))
            .with_inner("SecretNotYetValid"));
        }
        if let Some(exp) = self.exp
            && now >= exp
        {
            return Err(KvError::forbidden(format!(
                "Operation get is not allowed on an expired secret (exp {}).",
                crate::time::rfc3339(exp)
            ))
            .with_inner("SecretExpired"));
        }
        Ok(())
    }
}

/// Everything about one secret version except its value.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretVersionInfo {
    /// Content type, free text chosen by the client.
    #[serde(default)]
    pub content_type: Option<String>,
    /// Attributes.
    pub attributes: SecretAttributes,
    /// Tags.
    #[serde(default)]
    pub tags: Tags,
}

// ----- wire shapes -----

/// Secret attributes as the wire carries them (request side: `enabled`, `nbf`, `exp`; the
/// output-only fields are accepted and ignored, as clients resend what they read).
#[derive(Clone, Debug, Default, Deserialize)]
pub struct WireSecretAttributes {
    /// Enabled flag.
    pub enabled: Option<bool>,
    /// Not before.
    pub nbf: Option<i64>,
    /// Expiry.
    pub exp: Option<i64>,
}

/// Body of `PUT /secrets/{name}`.
#[derive(Debug, Deserialize)]
pub struct SecretSetParameters {
    /// The value (required).
    pub value: Option<SecretValue>,
    /// Content type.
    #[serde(rename = "contentType")]
    pub content_type: Option<String>,
    /// Tags.
    pub tags: Option<Tags>,
    /// Attributes.
    pub attributes: Option<WireSecretAttributes>,
}

/// Body of `PATCH /secrets/{name}/{version}`.
#[derive(Debug, Deserialize)]
pub struct SecretUpdateParameters {
    /// New content type.
    #[serde(rename = "contentType")]
    pub content_type: Option<String>,
    /// New attributes.
    pub attributes: Option<WireSecretAttributes>,
    /// New tags (replace all).
    pub tags: Option<Tags>,
}

impl SecretSetParameters {
    /// Validates a set request and returns the value, the attributes of the new version at
    /// `now`, its content type and tags.
    pub fn into_version(self, now: i64) -> Result<(SecretValue, SecretVersionInfo), KvError> {
        let value = self.value.ok_or_else(|| {
            KvError::bad_parameter("The secret value is required: the body must contain 'value'.")
        })?;
        validate_value(&value)?;
        validate_content_type(self.content_type.as_deref())?;
        let tags = self.tags.unwrap_or_default();
        crate::key::validate_tags(&tags)?;
        let a = self.attributes.unwrap_or_default();
        crate::key::validate_times(a.nbf, a.exp)?;
        Ok((
            value,
            SecretVersionInfo {
                content_type: self.content_type,
                attributes: SecretAttributes {
                    enabled: a.enabled.unwrap_or(true),
                    nbf: a.nbf,
                    exp: a.exp,
                    created: now,
                    updated: now,
                },
                tags,
            },
        ))
    }
}

impl SecretUpdateParameters {
    /// Applies an update to a version's info at `now`; nothing given, nothing changed (but
    /// `updated`).
    pub fn apply(
        self,
        mut info: SecretVersionInfo,
        now: i64,
    ) -> Result<SecretVersionInfo, KvError> {
        if let Some(ct) = self.content_type {
            validate_content_type(Some(&ct))?;
            info.content_type = Some(ct);
        }
        if let Some(a) = self.attributes {
            let t = &mut info.attributes;
            (t.enabled, t.nbf, t.exp) =
                crate::key::patch_window((t.enabled, t.nbf, t.exp), (a.enabled, a.nbf, a.exp))?;
        }
        if let Some(tags) = self.tags {
            crate::key::validate_tags(&tags)?;
            info.tags = tags;
        }
        info.attributes.updated = now;
        Ok(info)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(body: serde_json::Value) -> Result<(SecretValue, SecretVersionInfo), KvError> {
        serde_json::from_value::<SecretSetParameters>(body)
            .unwrap()
            .into_version(1000)
    }

    #[test]
    fn value_size_limit() {
        let max = "a".repeat(MAX_VALUE_BYTES);
        assert!(set(serde_json::json!({"value": max})).is_ok());
        let over = "a".repeat(MAX_VALUE_BYTES + 1);
        let e = set(serde_json::json!({"value": over})).unwrap_err();
        assert_eq!(e.status(), 400);
        assert_eq!(e.code, ErrorCode::BadParameter);
        // The limit counts bytes of UTF-8, not characters.
        let wide = "é".repeat(MAX_VALUE_BYTES / 2 + 1);
        assert!(set(serde_json::json!({"value": wide})).is_err());
        assert!(set(serde_json::json!({"value": ""})).is_ok());
        assert_eq!(set(serde_json::json!({})).unwrap_err().status(), 400);
    }

    #[test]
    fn content_type_and_times() {
        let ct = "x".repeat(MAX_CONTENT_TYPE_CHARS);
        let (_, info) = set(serde_json::json!({"value": "v", "contentType": ct})).unwrap();
        assert_eq!(info.content_type.as_deref().map(str::len), Some(255));
        let long = "x".repeat(MAX_CONTENT_TYPE_CHARS + 1);
        assert!(set(serde_json::json!({"value": "v", "contentType": long})).is_err());
        assert!(
            set(serde_json::json!({"value": "v", "attributes": {"nbf": 20, "exp": 10}})).is_err()
        );
        let (_, info) = set(serde_json::json!({
            "value": "v", "attributes": {"enabled": false, "nbf": 10, "exp": 20,
            "created": 1, "recoveryLevel": "x"}, "tags": {"a": "b"}
        }))
        .unwrap();
        assert!(!info.attributes.enabled);
        assert_eq!(info.attributes.created, 1000);
        assert_eq!(info.tags.get("a").map(String::as_str), Some("b"));
    }

    #[test]
    fn readability_window() {
        let a = SecretAttributes {
            enabled: true,
            nbf: Some(100),
            exp: Some(200),
            created: 0,
            updated: 0,
        };
        assert_eq!(
            a.check_readable(99).unwrap_err().inner,
            Some("SecretNotYetValid")
        );
        assert!(a.check_readable(100).is_ok());
        assert!(a.check_readable(199).is_ok());
        let e = a.check_readable(200).unwrap_err();
        assert_eq!((e.status(), e.inner), (403, Some("SecretExpired")));
        let off = SecretAttributes {
            enabled: false,
            ..a
        };
        let e = off.check_readable(150).unwrap_err();
        assert_eq!((e.status(), e.inner), (403, Some("SecretDisabled")));
        assert_eq!(
            e.message,
            "Operation get is not allowed on a disabled secret."
        );
    }

    #[test]
    fn update_merges() {
        let (_, info) = set(
            serde_json::json!({"value": "v", "contentType": "text/plain",
            "tags": {"a": "b"}}),
        )
        .unwrap();
        let upd: SecretUpdateParameters =
            serde_json::from_value(serde_json::json!({"attributes": {"enabled": false}})).unwrap();
        let next = upd.apply(info.clone(), 2000).unwrap();
        assert!(!next.attributes.enabled);
        assert_eq!(next.content_type.as_deref(), Some("text/plain"));
        assert_eq!(next.tags, info.tags);
        assert_eq!(next.attributes.updated, 2000);
        assert_eq!(next.attributes.created, 1000);
        let bad: SecretUpdateParameters =
            serde_json::from_value(serde_json::json!({"attributes": {"nbf": 5000, "exp": 10}}))
                .unwrap();
        assert!(bad.apply(info, 2000).is_err());
    }

    #[test]
    fn value_never_in_debug() {
        let p: SecretSetParameters =
            serde_json::from_value(serde_json::json!({"value": "hunter2-top-secret"})).unwrap();
        let text = format!("{p:?}");
        assert!(!text.contains("hunter2"), "{text}");
        assert!(text.contains("<redacted>"));
        let e = set(serde_json::json!({"value": "hunter2".repeat(5000)})).unwrap_err();
        assert!(!e.message.contains("hunter2"));
    }

    #[test]
    fn not_found_messages() {
        let e = secret_not_found("s1", Some("abc"));
        assert_eq!(e.status(), 404);
        assert_eq!(
            e.message,
            "A secret with (name/id) s1/abc was not found in this key vault."
        );
        assert_eq!(e.code.as_str(), "SecretNotFound");
        assert_eq!(deleted_secret_not_found("s1").status(), 404);
    }
}
