//! A read-only node (`kagi server --read-only`, issue 14, KV-13): reads, lists and every
//! cryptographic operation are served; every write is answered 503 `ServiceUnavailable` in
//! Azure's words, with a `Retry-After` (the Azure SDKs retry 503s), before it reaches a
//! handler, so a refused request changes nothing. The refusal is still audited (the audit log
//! is the node's own file).
//!
//! The data plane's requests are classified by the route table
//! ([`kagi_core::routes::DataPlaneRoute::class`]); the management host's by method: `GET`,
//! `HEAD` and `OPTIONS` are reads, and so are the token endpoints (clients must sign in),
//! ARM's `list*` actions, Azure Policy's `queryResults` and Graph's `getByIds`; every other
//! request writes.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::body::Body;
use axum::http::{HeaderValue, Response, header};

/// Seconds a refused client is told to wait before retrying.
pub(crate) const RETRY_AFTER_SECONDS: u32 = 2;

/// Whether the server refuses writes. Cloning shares the flag.
#[derive(Clone, Debug, Default)]
pub(crate) struct ReadOnlyFlag(Arc<AtomicBool>);

impl ReadOnlyFlag {
    pub(crate) fn set(&self, on: bool) {
        self.0.store(on, Ordering::Release);
    }

    pub(crate) fn get(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// Where a request goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Plane {
    /// A vault's data plane.
    Vault,
    /// The management host (ARM, token endpoints, directory).
    Management,
    /// A host kagi does not serve (answered 404 anyway).
    Unknown,
}

/// Whether a request to `plane` changes stored state. Data-plane requests that match no
/// route are not writes: they are answered 404/405 without touching anything.
pub(crate) fn is_write(plane: Plane, method: &str, path: &str, operation: &str) -> bool {
    match plane {
        Plane::Vault => kagi_core::routes::DataPlaneRoute::parse(method, path)
            .is_ok_and(|r| !r.class().served_read_only()),
        Plane::Management => {
            let m = method.to_ascii_uppercase();
            if matches!(m.as_str(), "GET" | "HEAD" | "OPTIONS") || operation == "Authentication" {
                return false;
            }
            // ARM's `list*` actions (POST …/listKeys), Azure Policy's compliance query
            // (POST …/policyStates/latest/queryResults) and Microsoft Graph's
            // POST /v1.0/directoryObjects/getByIds read.
            let last = path
                .rsplit('/')
                .find(|s| !s.is_empty())
                .unwrap_or("")
                .to_ascii_lowercase();
            !(m == "POST"
                && (last.starts_with("list") || last == "queryresults" || last == "getbyids"))
        }
        Plane::Unknown => false,
    }
}

/// The answer to a write on a read-only node: Azure's 503 for operation `operation`.
pub(crate) fn refusal(operation: &str) -> Response<Body> {
    let mut r = crate::respond::json(
        503,
        &serde_json::json!({"error": {
            "code": "ServiceUnavailable",
            "message": format!(
                "Operation \"{operation}\" is unavailable: the service is currently in a read-only state."
            ),
        }}),
    );
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECONDS));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_plane_writes_follow_the_route_table() {
        assert!(is_write(Plane::Vault, "PUT", "/secrets/s", "SecretSet"));
        assert!(is_write(
            Plane::Vault,
            "POST",
            "/keys/k/create",
            "KeyCreate"
        ));
        assert!(is_write(
            Plane::Vault,
            "POST",
            "/keys/k/rotate",
            "KeyRotate"
        ));
        assert!(!is_write(
            Plane::Vault,
            "POST",
            "/keys/k/v/unwrapkey",
            "KeyUnwrap"
        ));
        assert!(!is_write(
            Plane::Vault,
            "POST",
            "/keys/k/backup",
            "KeyBackup"
        ));
        assert!(!is_write(Plane::Vault, "GET", "/secrets", "SecretList"));
        // Unrouted: answered 404/405 by the handler, nothing to refuse.
        assert!(!is_write(
            Plane::Vault,
            "PUT",
            "/certificates/c",
            "UnknownOperation"
        ));
    }

    #[test]
    fn management_writes_by_method() {
        let v = "/subscriptions/s/resourceGroups/g/providers/Microsoft.KeyVault/vaults/v";
        assert!(!is_write(Plane::Management, "GET", v, "VaultGet"));
        assert!(is_write(Plane::Management, "PUT", v, "VaultPut"));
        assert!(is_write(Plane::Management, "PATCH", v, "VaultPatch"));
        assert!(is_write(Plane::Management, "DELETE", v, "VaultDelete"));
        assert!(is_write(
            Plane::Management,
            "POST",
            &format!("{v}/purge"),
            "VaultPurge"
        ));
        assert!(!is_write(
            Plane::Management,
            "POST",
            &format!("{v}/listKeys"),
            "x"
        ));
        let query =
            "/subscriptions/s/providers/Microsoft.PolicyInsights/policyStates/latest/queryResults";
        assert!(!is_write(Plane::Management, "POST", query, "x"));
        assert!(!is_write(
            Plane::Management,
            "POST",
            "/v1.0/directoryObjects/getByIds",
            "x"
        ));
        assert!(is_write(
            Plane::Management,
            "POST",
            "/v1.0/servicePrincipals",
            "x"
        ));
        assert!(!is_write(
            Plane::Management,
            "POST",
            "/t/oauth2/v2.0/token",
            "Authentication"
        ));
        assert!(!is_write(Plane::Unknown, "PUT", "/x", "UnknownOperation"));
    }

    #[test]
    fn refusal_is_azures() {
        let r = refusal("SecretSet");
        assert_eq!(r.status(), 503);
        assert_eq!(
            r.headers()
                .get(header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok()),
            Some("2")
        );
    }
}
