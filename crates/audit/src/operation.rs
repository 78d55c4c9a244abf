//! Operation names from the method and path of a request.
//!
//! Data plane: Azure Key Vault's `AuditEvent` names (`KeyCreate`, `KeyWrap`, `SecretGet`, …).
//! The management host's names are its routes' (`kagi_core::management_routes` and the storage
//! services' tables), which the HTTP layer looks up as it routes the request.

/// The operation name of a request to a vault host: its route's in the data plane's route
/// table (`kagi_core::routes`, which the HTTP layer dispatches on too), or `UnknownOperation`.
pub fn data_plane_operation(method: &str, path: &str) -> &'static str {
    kagi_core::routes::data_plane_operation(method, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_plane_names() {
        let cases = [
            ("GET", "/keys", "KeyList"),
            ("GET", "/keys/", "KeyList"),
            ("POST", "/keys/restore", "KeyRestore"),
            ("POST", "/keys/k/create", "KeyCreate"),
            ("PUT", "/keys/k", "KeyImport"),
            ("DELETE", "/keys/k", "KeyDelete"),
            ("GET", "/keys/k", "KeyGet"),
            ("GET", "/keys/k/", "KeyGet"),
            ("GET", "/keys/k/0123", "KeyGet"),
            ("PATCH", "/keys/k", "KeyUpdate"),
            ("PATCH", "/keys/k/0123", "KeyUpdate"),
            ("GET", "/keys/k/versions", "KeyListVersions"),
            ("POST", "/keys/k/backup", "KeyBackup"),
            ("POST", "/keys/k/rotate", "KeyRotate"),
            ("POST", "/keys/k/wrapKey", "KeyWrap"),
            ("POST", "/keys/k/v1/unwrapkey", "KeyUnwrap"),
            ("POST", "/keys/k/v1/encrypt", "KeyEncrypt"),
            ("POST", "/keys/k/decrypt", "KeyDecrypt"),
            ("POST", "/keys/k/v/sign", "KeySign"),
            ("POST", "/keys/k/verify", "KeyVerify"),
            ("GET", "/deletedkeys", "KeyListDeleted"),
            ("GET", "/deletedkeys/k", "KeyGetDeleted"),
            ("DELETE", "/deletedkeys/k", "KeyPurge"),
            ("POST", "/deletedkeys/k/recover", "KeyRecover"),
            ("POST", "/rng", "RandomGet"),
            ("GET", "/secrets", "SecretList"),
            ("POST", "/secrets/restore", "SecretRestore"),
            ("PUT", "/secrets/s", "SecretSet"),
            ("DELETE", "/secrets/s", "SecretDelete"),
            ("GET", "/secrets/s", "SecretGet"),
            ("GET", "/secrets/s/v", "SecretGet"),
            ("PATCH", "/secrets/s/v", "SecretUpdate"),
            ("GET", "/secrets/s/versions", "SecretListVersions"),
            ("POST", "/secrets/s/backup", "SecretBackup"),
            ("GET", "/deletedsecrets", "SecretListDeleted"),
            ("GET", "/deletedsecrets/s", "SecretGetDeleted"),
            ("DELETE", "/deletedsecrets/s", "SecretPurge"),
            ("POST", "/deletedsecrets/s/recover", "SecretRecover"),
            ("GET", "/nothing/here", "UnknownOperation"),
            ("PUT", "/rng", "UnknownOperation"),
        ];
        for (m, p, want) in cases {
            assert_eq!(data_plane_operation(m, p), want, "{m} {p}");
        }
    }
}
