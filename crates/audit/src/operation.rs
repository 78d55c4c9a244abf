//! Operation names from the method and path of a request.
//!
//! Data plane: Azure Key Vault's `AuditEvent` names (`KeyCreate`, `KeyWrap`, `SecretGet`, …).
//! Management host: `Authentication` for the token endpoints, Azure's `Vault*` names for
//! vaults (`VaultPut`, `VaultGet`, `VaultPatch`, `VaultDelete`, `VaultList`, `VaultListDeleted`,
//! `VaultGetDeleted`, `VaultPurge`), and ARM's operation names for every other resource
//! (`Microsoft.Resources/subscriptions/resourceGroups/write`,
//! `Microsoft.Authorization/roleAssignments/delete`, …).

/// The operation name of a request to a vault host: its route's in the data plane's route
/// table (`kagi_core::routes`, which the HTTP layer dispatches on too), or `UnknownOperation`.
pub fn data_plane_operation(method: &str, path: &str) -> &'static str {
    kagi_core::routes::data_plane_operation(method, path)
}

/// The operation name of a request to the management host (ARM, token endpoints).
pub fn management_operation(method: &str, path: &str) -> String {
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let lower: Vec<String> = segs.iter().map(|s| s.to_ascii_lowercase()).collect();
    let l: Vec<&str> = lower.iter().map(String::as_str).collect();
    let m = method.to_ascii_uppercase();
    // Token endpoints: Entra's, IMDS and the App Service style identity endpoint.
    if matches!(
        l.as_slice(),
        [.., "oauth2", "token"] | [.., "oauth2", "v2.0", "token"]
    ) || l.first() == Some(&"msi")
    {
        return "Authentication".into();
    }
    match l.as_slice() {
        [_, "v2.0", ".well-known", "openid-configuration"] => {
            return "OpenIdConfigurationGet".into();
        }
        [_, "discovery", "v2.0", "keys"] | [_, "discovery", "keys"] => return "JwksGet".into(),
        ["kagi", "test", "clock"] => return "TestClockAdvance".into(),
        // Graph-shaped directory: `/v1.0/servicePrincipals[/{id}[/addPassword]]`.
        ["v1.0", ..] if segs.len() >= 2 => {
            let verb = match (m.as_str(), segs.len()) {
                ("GET" | "HEAD", _) => "read",
                ("DELETE", _) => "delete",
                ("POST", n) if n >= 4 => "action",
                _ => "write",
            };
            return if segs.len() >= 4 {
                format!("Microsoft.Graph/{}/{}/{verb}", segs[1], segs[3])
            } else {
                format!("Microsoft.Graph/{}/{verb}", segs[1])
            };
        }
        _ => {}
    }
    // ARM: the resource types after the last `providers` segment (or the subscription and
    // resource group path before any), alternating type / name.
    let verb = match m.as_str() {
        "GET" | "HEAD" => "read",
        "DELETE" => "delete",
        "POST" => "action",
        _ => "write",
    };
    let (namespace, rest): (String, &[&str]) = match l.iter().rposition(|s| *s == "providers") {
        Some(i) if i + 1 < l.len() => (segs[i + 1].to_string(), &segs[i + 2..]),
        Some(_) => ("Microsoft.Resources".into(), &[]),
        None if l.first() == Some(&"subscriptions") => ("Microsoft.Resources".into(), &segs[..]),
        None => return "UnknownOperation".into(),
    };
    // Types sit at even offsets; a trailing odd segment after a name is an action (`purge`).
    let mut types: Vec<&str> = rest.iter().step_by(2).copied().collect();
    let is_action = m == "POST" && rest.len() >= 3 && rest.len() % 2 == 1;
    let action = if is_action { types.pop() } else { None };
    let ns_lower = namespace.to_ascii_lowercase();
    let types_lower: Vec<String> = types.iter().map(|t| t.to_ascii_lowercase()).collect();
    let tl: Vec<&str> = types_lower.iter().map(String::as_str).collect();
    let named = rest.len() % 2 == 0 && !rest.is_empty();
    if ns_lower == "microsoft.keyvault" {
        let vault_name = match (tl.as_slice(), m.as_str(), named, action) {
            (["vaults"], "GET", true, None) => Some("VaultGet"),
            (["vaults"], "GET", false, None) => Some("VaultList"),
            (["vaults"], "PUT", true, None) => Some("VaultPut"),
            (["vaults"], "PATCH", true, None) => Some("VaultPatch"),
            (["vaults"], "DELETE", true, None) => Some("VaultDelete"),
            (["deletedvaults"], "GET", false, None) => Some("VaultListDeleted"),
            (["locations", "deletedvaults"], "GET", true, None) => Some("VaultGetDeleted"),
            (["locations", "deletedvaults"], "POST", _, Some(a))
                if a.eq_ignore_ascii_case("purge") =>
            {
                Some("VaultPurge")
            }
            _ => None,
        };
        if let Some(n) = vault_name {
            return n.into();
        }
    }
    let mut name = namespace;
    for t in &types {
        name.push('/');
        name.push_str(t);
    }
    if let Some(a) = action {
        name.push('/');
        name.push_str(a);
    }
    name.push('/');
    name.push_str(verb);
    name
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

    #[test]
    fn management_names() {
        let vault = "/subscriptions/s/resourceGroups/rg/providers/Microsoft.KeyVault/vaults/v";
        let cases = [
            ("POST", "/t/oauth2/v2.0/token", "Authentication"),
            ("GET", "/metadata/identity/oauth2/token", "Authentication"),
            (
                "GET",
                "/t/v2.0/.well-known/openid-configuration",
                "OpenIdConfigurationGet",
            ),
            ("GET", "/t/discovery/v2.0/keys", "JwksGet"),
            ("PUT", vault, "VaultPut"),
            ("PATCH", vault, "VaultPatch"),
            ("GET", vault, "VaultGet"),
            ("DELETE", vault, "VaultDelete"),
            (
                "GET",
                "/subscriptions/s/resourceGroups/rg/providers/Microsoft.KeyVault/vaults",
                "VaultList",
            ),
            (
                "GET",
                "/subscriptions/s/providers/Microsoft.KeyVault/vaults",
                "VaultList",
            ),
            (
                "GET",
                "/subscriptions/s/providers/Microsoft.KeyVault/deletedVaults",
                "VaultListDeleted",
            ),
            (
                "GET",
                "/subscriptions/s/providers/Microsoft.KeyVault/locations/l/deletedVaults/v",
                "VaultGetDeleted",
            ),
            (
                "POST",
                "/subscriptions/s/providers/Microsoft.KeyVault/locations/l/deletedVaults/v/purge",
                "VaultPurge",
            ),
            (
                "GET",
                "/subscriptions",
                "Microsoft.Resources/subscriptions/read",
            ),
            (
                "PUT",
                "/subscriptions/s/resourcegroups/rg",
                "Microsoft.Resources/subscriptions/resourcegroups/write",
            ),
            (
                "PUT",
                "/subscriptions/s/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/id1",
                "Microsoft.ManagedIdentity/userAssignedIdentities/write",
            ),
            (
                "DELETE",
                "/subscriptions/s/resourceGroups/rg/providers/Microsoft.KeyVault/vaults/v/providers/Microsoft.Authorization/roleAssignments/g",
                "Microsoft.Authorization/roleAssignments/delete",
            ),
            ("GET", "/msi/token", "Authentication"),
            (
                "GET",
                "/imds/x/metadata/identity/oauth2/token",
                "Authentication",
            ),
            (
                "POST",
                "/v1.0/servicePrincipals",
                "Microsoft.Graph/servicePrincipals/write",
            ),
            (
                "GET",
                "/v1.0/servicePrincipals",
                "Microsoft.Graph/servicePrincipals/read",
            ),
            (
                "DELETE",
                "/v1.0/servicePrincipals/i",
                "Microsoft.Graph/servicePrincipals/delete",
            ),
            (
                "POST",
                "/v1.0/servicePrincipals/i/addPassword",
                "Microsoft.Graph/servicePrincipals/addPassword/action",
            ),
            ("GET", "/", "UnknownOperation"),
            ("GET", "/favicon.ico", "UnknownOperation"),
        ];
        for (m, p, want) in cases {
            assert_eq!(management_operation(m, p), want, "{m} {p}");
        }
    }
}
