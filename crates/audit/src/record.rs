//! The audit record: Azure Key Vault's `AuditEvent` fields for one request.

use serde::{Deserialize, Serialize};

/// Whether the request succeeded (HTTP status below 400) or not.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ResultType {
    /// The request was served (1xx–3xx).
    Success,
    /// The request was refused or failed (4xx, 5xx).
    Failure,
}

impl ResultType {
    /// `Success` below 400, `Failure` from 400 on.
    pub fn from_status(status: u16) -> Self {
        if status < 400 {
            Self::Success
        } else {
            Self::Failure
        }
    }

    /// `"Success"` or `"Failure"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Success => "Success",
            Self::Failure => "Failure",
        }
    }
}

/// The caller's token claims, as Azure logs them under `identity.claim`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    /// Object id of the principal.
    pub oid: String,
    /// Application (client) id.
    pub appid: String,
    /// Tenant id.
    pub tid: String,
    /// User principal name, for users only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upn: Option<String>,
}

/// The authenticated caller of a request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// The claims of the caller's token.
    pub claim: Claim,
}

/// Request details, under `properties`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RequestProperties {
    /// The object the request was about: the versioned key or secret id when the response
    /// carried one, else the request URL without its query.
    pub id: String,
    /// The request URL; of its query only `api-version`, `maxresults` and `$skiptoken` are
    /// kept.
    pub request_uri: String,
    /// The client's `User-Agent`, printable ASCII, truncated.
    pub client_info: String,
    /// The HTTP method.
    pub http_method: String,
    /// Whether the vault authorizes with RBAC (data plane, when the vault is known).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub is_rbac_authorized: Option<bool>,
}

/// One request, as the HTTP layer describes it to the audit log. The writer adds `category`
/// (`"AuditEvent"`), `seq`, `prevHash` and `hash`.
///
/// Nothing here may hold key material, secret values, request or response bodies, or tokens.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditRecord {
    /// When the request arrived, RFC 3339 UTC with milliseconds ([`crate::format_rfc3339_ms`]).
    pub time: String,
    /// Azure's operation name (`KeyWrap`, `SecretGet`, `VaultPut`, `Authentication`, …).
    pub operation_name: String,
    /// Success or failure.
    pub result_type: ResultType,
    /// The HTTP reason phrase of the answer (`OK`, `Unauthorized`, …).
    pub result_signature: String,
    /// On failure, the error code and inner code (`Forbidden/ForbiddenByPolicy`); never the
    /// message, which may echo input.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result_description: Option<String>,
    /// The HTTP status of the answer.
    pub http_status_code: u16,
    /// The peer address of the connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caller_ip_address: Option<String>,
    /// The authenticated caller; absent when the request carried no valid token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<Identity>,
    /// The vault's ARM id when known, else the ARM path or the request host.
    pub resource_id: String,
    /// Request details.
    pub properties: RequestProperties,
    /// The client's `x-ms-client-request-id` when sane, else a fresh UUID.
    pub correlation_id: String,
    /// Time from arrival to the computed answer, in milliseconds (before the audit append).
    pub duration_ms: u64,
}

/// The reason phrase of an HTTP status, as Azure writes it in `resultSignature`.
pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        301 => "Moved Permanently",
        302 => "Found",
        304 => "Not Modified",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        411 => "Length Required",
        412 => "Precondition Failed",
        413 => "Payload Too Large",
        415 => "Unsupported Media Type",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        s if s < 400 => "OK",
        _ => "Error",
    }
}

/// Whether a client-supplied `x-ms-client-request-id` may be used as the correlation id:
/// 1–128 characters of letters, digits, `-`, `_`, `.`, `:`, `{` and `}` (GUIDs, with or
/// without braces, and the like).
pub fn sane_correlation_id(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= 128
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:{}".contains(&b))
}

/// A fresh random (version 4) UUID.
pub fn new_correlation_id() -> String {
    let mut b = kagi_crypto::random_bytes(16).unwrap_or_else(|_| {
        // The CSPRNG failed (it does not): fall back to time and a counter, still unique.
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let t = crate::now_unix_ms() as u64;
        [t.to_be_bytes(), n.to_be_bytes()].concat()
    });
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn correlation_ids() {
        let a = new_correlation_id();
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "4");
        assert_ne!(a, new_correlation_id());
        assert!(sane_correlation_id(&a));
        assert!(sane_correlation_id(
            "{0b7f3a3e-1111-4222-8333-444455556666}"
        ));
        assert!(!sane_correlation_id(""));
        assert!(!sane_correlation_id("a b"));
        assert!(!sane_correlation_id("x\"y"));
        assert!(!sane_correlation_id(&"a".repeat(129)));
    }

    #[test]
    fn result_types_and_phrases() {
        assert_eq!(ResultType::from_status(204), ResultType::Success);
        assert_eq!(ResultType::from_status(401), ResultType::Failure);
        assert_eq!(reason_phrase(401), "Unauthorized");
        assert_eq!(reason_phrase(503), "Service Unavailable");
    }
}
