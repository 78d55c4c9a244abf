//! Role-based access for vaults: the data actions each operation needs, Azure's built-in Key
//! Vault roles (same GUIDs, same data actions), custom roles, and scope matching.

use serde::{Deserialize, Serialize};

use crate::access::{DataAction, KeyPermission, SecretPermission};
use crate::{ErrorCode, KvError};

/// The Azure data action an operation needs (`Microsoft.KeyVault/vaults/keys/unwrap/action`).
pub fn data_action(action: DataAction) -> &'static str {
    use KeyPermission as K;
    use SecretPermission as S;
    match action {
        DataAction::Key(p) => match p {
            K::Get | K::List => "Microsoft.KeyVault/vaults/keys/read",
            K::Create => "Microsoft.KeyVault/vaults/keys/create/action",
            K::Update => "Microsoft.KeyVault/vaults/keys/update/action",
            K::Import => "Microsoft.KeyVault/vaults/keys/import/action",
            K::Delete => "Microsoft.KeyVault/vaults/keys/delete",
            K::Recover => "Microsoft.KeyVault/vaults/keys/recover/action",
            K::Backup => "Microsoft.KeyVault/vaults/keys/backup/action",
            K::Restore => "Microsoft.KeyVault/vaults/keys/restore/action",
            K::Decrypt => "Microsoft.KeyVault/vaults/keys/decrypt/action",
            K::Encrypt => "Microsoft.KeyVault/vaults/keys/encrypt/action",
            K::UnwrapKey => "Microsoft.KeyVault/vaults/keys/unwrap/action",
            K::WrapKey => "Microsoft.KeyVault/vaults/keys/wrap/action",
            K::Verify => "Microsoft.KeyVault/vaults/keys/verify/action",
            K::Sign => "Microsoft.KeyVault/vaults/keys/sign/action",
            K::Purge => "Microsoft.KeyVault/vaults/keys/purge/action",
            K::Rotate => "Microsoft.KeyVault/vaults/keys/rotate/action",
            K::GetRotationPolicy => "Microsoft.KeyVault/vaults/keyrotationpolicies/read",
            K::SetRotationPolicy => "Microsoft.KeyVault/vaults/keyrotationpolicies/write",
            K::Release => "Microsoft.KeyVault/vaults/keys/release/action",
            // "all" is an access-policy shorthand, never asked for by an operation.
            K::All => "Microsoft.KeyVault/vaults/keys/*",
        },
        DataAction::Secret(p) => match p {
            S::Get => "Microsoft.KeyVault/vaults/secrets/getSecret/action",
            S::List => "Microsoft.KeyVault/vaults/secrets/readMetadata/action",
            S::Set => "Microsoft.KeyVault/vaults/secrets/setSecret/action",
            S::Delete => "Microsoft.KeyVault/vaults/secrets/delete",
            S::Recover => "Microsoft.KeyVault/vaults/secrets/recover/action",
            S::Backup => "Microsoft.KeyVault/vaults/secrets/backup/action",
            S::Restore => "Microsoft.KeyVault/vaults/secrets/restore/action",
            S::Purge => "Microsoft.KeyVault/vaults/secrets/purge/action",
            S::All => "Microsoft.KeyVault/vaults/secrets/*",
        },
        DataAction::Random => "Microsoft.KeyVault/vaults/rng/action",
    }
}

/// One permission block of a role definition.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RolePermission {
    /// Control-plane actions.
    #[serde(default)]
    pub actions: Vec<String>,
    /// Control-plane exclusions.
    #[serde(default)]
    pub not_actions: Vec<String>,
    /// Data-plane actions (wildcards allowed).
    #[serde(default)]
    pub data_actions: Vec<String>,
    /// Data-plane exclusions.
    #[serde(default)]
    pub not_data_actions: Vec<String>,
}

/// A role definition's properties.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RoleDefinitionProperties {
    /// Display name.
    pub role_name: String,
    /// Description.
    #[serde(default)]
    pub description: String,
    /// `BuiltInRole` or `CustomRole`.
    #[serde(rename = "type", default = "custom")]
    pub role_type: String,
    /// What the role grants.
    pub permissions: Vec<RolePermission>,
    /// Where the role may be assigned.
    #[serde(default)]
    pub assignable_scopes: Vec<String>,
}

fn custom() -> String {
    "CustomRole".into()
}

/// Whether an action pattern (with `*` wildcards, case-insensitive) matches an action.
pub fn action_matches(pattern: &str, action: &str) -> bool {
    let p = pattern.to_ascii_lowercase();
    let a = action.to_ascii_lowercase();
    match p.split_once('*') {
        None => p == a,
        Some((prefix, rest)) => {
            a.starts_with(prefix) && {
                let tail = &a[prefix.len()..];
                rest.is_empty() || (0..=tail.len()).any(|i| action_matches(rest, &tail[i..]))
            }
        }
    }
}

impl RoleDefinitionProperties {
    /// Whether the role grants a data action.
    pub fn grants_data_action(&self, action: &str) -> bool {
        self.permissions.iter().any(|p| {
            p.data_actions.iter().any(|d| action_matches(d, action))
                && !p.not_data_actions.iter().any(|d| action_matches(d, action))
        })
    }

    /// Checks a custom role definition from a request.
    pub fn validate(&self) -> Result<(), KvError> {
        let bad = |m: &str| KvError::new(ErrorCode::BadRequest, m.to_string());
        if self.role_name.trim().is_empty() || self.role_name.len() > 256 {
            return Err(bad("roleName is required (at most 256 characters)."));
        }
        if self.permissions.is_empty() {
            return Err(bad(
                "A role definition needs at least one permissions entry.",
            ));
        }
        for p in &self.permissions {
            for a in p
                .data_actions
                .iter()
                .chain(&p.not_data_actions)
                .chain(&p.actions)
                .chain(&p.not_actions)
            {
                if a.is_empty()
                    || a.len() > 512
                    || !a
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "./*_-".contains(c))
                {
                    return Err(bad(&format!(
                        "'{}' is not a valid action.",
                        crate::ids::printable(a)
                    )));
                }
            }
        }
        for s in &self.assignable_scopes {
            Scope::parse(s)?;
        }
        Ok(())
    }
}

fn builtin(name: &str, description: &str, data_actions: &[&str]) -> RoleDefinitionProperties {
    RoleDefinitionProperties {
        role_name: name.into(),
        description: description.into(),
        role_type: "BuiltInRole".into(),
        permissions: vec![RolePermission {
            actions: vec![],
            not_actions: vec![],
            data_actions: data_actions.iter().map(|s| s.to_string()).collect(),
            not_data_actions: vec![],
        }],
        assignable_scopes: vec!["/".into()],
    }
}

/// Azure's built-in Key Vault data roles: (GUID, definition).
pub fn builtin_roles() -> &'static [(&'static str, RoleDefinitionProperties)] {
    // Built once: authorization looks roles up on every request of an RBAC vault.
    static ROLES: std::sync::OnceLock<Vec<(&'static str, RoleDefinitionProperties)>> =
        std::sync::OnceLock::new();
    ROLES.get_or_init(|| vec![
        (
            "00482a5a-887f-4fb3-b363-3b7fe8e74483",
            builtin(
                "Key Vault Administrator",
                "Perform all data plane operations on a key vault and all objects in it.",
                &["Microsoft.KeyVault/vaults/*"],
            ),
        ),
        (
            "14b46e9e-c2b7-41b4-b07b-48a6ebf60603",
            builtin(
                "Key Vault Crypto Officer",
                "Perform any action on the keys of a key vault, except manage permissions.",
                &[
                    "Microsoft.KeyVault/vaults/keys/*",
                    "Microsoft.KeyVault/vaults/keyrotationpolicies/*",
                ],
            ),
        ),
        (
            "12338af0-0e69-4776-bea7-57ae8d297424",
            builtin(
                "Key Vault Crypto User",
                "Perform cryptographic operations using keys.",
                &[
                    "Microsoft.KeyVault/vaults/keys/read",
                    "Microsoft.KeyVault/vaults/keys/update/action",
                    "Microsoft.KeyVault/vaults/keys/backup/action",
                    "Microsoft.KeyVault/vaults/keys/encrypt/action",
                    "Microsoft.KeyVault/vaults/keys/decrypt/action",
                    "Microsoft.KeyVault/vaults/keys/wrap/action",
                    "Microsoft.KeyVault/vaults/keys/unwrap/action",
                    "Microsoft.KeyVault/vaults/keys/sign/action",
                    "Microsoft.KeyVault/vaults/keys/verify/action",
                ],
            ),
        ),
        (
            "e147488a-f6f5-4113-8e2d-b22465e65bf6",
            builtin(
                "Key Vault Crypto Service Encryption User",
                "Read metadata of keys and perform wrap/unwrap operations.",
                &[
                    "Microsoft.KeyVault/vaults/keys/read",
                    "Microsoft.KeyVault/vaults/keys/wrap/action",
                    "Microsoft.KeyVault/vaults/keys/unwrap/action",
                ],
            ),
        ),
        (
            "b86a8fe4-44ce-4948-aee5-eccb2c155cd7",
            builtin(
                "Key Vault Secrets Officer",
                "Perform any action on the secrets of a key vault, except manage permissions.",
                &["Microsoft.KeyVault/vaults/secrets/*"],
            ),
        ),
        (
            "4633458b-17de-408a-b874-0445c86b69e6",
            builtin(
                "Key Vault Secrets User",
                "Read secret contents.",
                &[
                    "Microsoft.KeyVault/vaults/secrets/getSecret/action",
                    "Microsoft.KeyVault/vaults/secrets/readMetadata/action",
                ],
            ),
        ),
        (
            "21090545-7ca7-4776-b22c-e363652d74d2",
            builtin(
                "Key Vault Reader",
                "Read metadata of key vaults and their keys and secrets; cannot read secret values.",
                &[
                    "Microsoft.KeyVault/vaults/keys/read",
                    "Microsoft.KeyVault/vaults/secrets/readMetadata/action",
                    "Microsoft.KeyVault/vaults/certificates/read",
                ],
            ),
        ),
    ])
}

/// A built-in role by GUID.
pub fn builtin_role(guid: &str) -> Option<&'static RoleDefinitionProperties> {
    builtin_roles()
        .iter()
        .find(|(g, _)| g.eq_ignore_ascii_case(guid))
        .map(|(_, r)| r)
}

/// A scope of a role assignment or lock: subscription, resource group, resource, or an object
/// inside a vault. Stored normalised (lower-case, no trailing slash).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Scope(String);

impl Scope {
    /// Parses and normalises a scope (`/subscriptions/{id}[/resourceGroups/{rg}[/providers/…]]`).
    pub fn parse(text: &str) -> Result<Self, KvError> {
        let t = text.trim().trim_end_matches('/').to_ascii_lowercase();
        let segs: Vec<&str> = t.split('/').collect();
        let valid_segment = |s: &&str| {
            !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.()".contains(c))
        };
        // "/", a subscription, a resource group, or a resource (and its children): provider
        // namespace, then type/name pairs.
        let shape_ok = match segs.as_slice() {
            [""] => true,
            ["", "subscriptions", sub] => crate::SubscriptionId::parse(sub).is_ok(),
            ["", "subscriptions", sub, "resourcegroups", rg] => {
                crate::SubscriptionId::parse(sub).is_ok() && valid_segment(rg)
            }
            [
                "",
                "subscriptions",
                sub,
                "resourcegroups",
                rg,
                "providers",
                ns,
                rest @ ..,
            ] => {
                crate::SubscriptionId::parse(sub).is_ok()
                    && valid_segment(rg)
                    && valid_segment(ns)
                    && !rest.is_empty()
                    && rest.len() % 2 == 0
                    && rest.iter().all(valid_segment)
            }
            _ => false,
        };
        if !shape_ok || t.len() > 1024 {
            return Err(KvError::new(
                ErrorCode::BadRequest,
                format!("The scope '{}' is not valid.", crate::ids::printable(text)),
            )
            .with_inner("InvalidScope"));
        }
        Ok(Self(if t.is_empty() { "/".into() } else { t }))
    }

    /// The normalised text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether this scope contains `other` (is equal to it or an ancestor of it).
    pub fn contains(&self, other: &Scope) -> bool {
        self.0 == "/" || other.0 == self.0 || other.0.starts_with(&format!("{}/", self.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards() {
        assert!(action_matches(
            "Microsoft.KeyVault/vaults/*",
            "Microsoft.KeyVault/vaults/keys/read"
        ));
        assert!(action_matches(
            "microsoft.keyvault/vaults/keys/*",
            "Microsoft.KeyVault/vaults/keys/unwrap/action"
        ));
        assert!(!action_matches(
            "Microsoft.KeyVault/vaults/keys/*",
            "Microsoft.KeyVault/vaults/secrets/getSecret/action"
        ));
        assert!(action_matches(
            "*/read",
            "Microsoft.KeyVault/vaults/keys/read"
        ));
        assert!(!action_matches(
            "Microsoft.KeyVault/vaults/keys/read",
            "Microsoft.KeyVault/vaults/keys/read/x"
        ));
    }

    #[test]
    fn builtins_grant_what_azure_grants() {
        let roles = builtin_roles();
        let role = |id: &str| roles.iter().find(|(g, _)| *g == id).unwrap().1.clone();
        let cseu = role("e147488a-f6f5-4113-8e2d-b22465e65bf6");
        let unwrap = data_action(DataAction::Key(KeyPermission::UnwrapKey));
        assert!(cseu.grants_data_action(unwrap));
        assert!(cseu.grants_data_action(data_action(DataAction::Key(KeyPermission::Get))));
        assert!(!cseu.grants_data_action(data_action(DataAction::Key(KeyPermission::Sign))));
        assert!(!cseu.grants_data_action(data_action(DataAction::Key(KeyPermission::Delete))));
        let secrets_user = role("4633458b-17de-408a-b874-0445c86b69e6");
        assert!(
            secrets_user.grants_data_action(data_action(DataAction::Secret(SecretPermission::Get)))
        );
        assert!(
            !secrets_user
                .grants_data_action(data_action(DataAction::Secret(SecretPermission::Set)))
        );
        let reader = role("21090545-7ca7-4776-b22c-e363652d74d2");
        assert!(!reader.grants_data_action(data_action(DataAction::Secret(SecretPermission::Get))));
        assert!(reader.grants_data_action(data_action(DataAction::Secret(SecretPermission::List))));
        let admin = role("00482a5a-887f-4fb3-b363-3b7fe8e74483");
        assert!(admin.grants_data_action(data_action(DataAction::Secret(SecretPermission::Purge))));
    }

    #[test]
    fn not_data_actions_subtract() {
        let mut r = builtin("x", "", &["Microsoft.KeyVault/vaults/keys/*"]);
        r.permissions[0]
            .not_data_actions
            .push("Microsoft.KeyVault/vaults/keys/delete".into());
        assert!(!r.grants_data_action("Microsoft.KeyVault/vaults/keys/delete"));
        assert!(r.grants_data_action("Microsoft.KeyVault/vaults/keys/read"));
    }

    #[test]
    fn scopes() {
        let sub = Scope::parse("/subscriptions/00000000-1111-4222-8333-444444444444").unwrap();
        let rg =
            Scope::parse("/subscriptions/00000000-1111-4222-8333-444444444444/resourceGroups/RG1/")
                .unwrap();
        let rg2 =
            Scope::parse("/subscriptions/00000000-1111-4222-8333-444444444444/resourceGroups/rg10")
                .unwrap();
        assert!(sub.contains(&rg));
        assert!(rg.contains(&rg));
        assert!(!rg.contains(&rg2));
        assert!(!rg.contains(&sub));
        assert!(Scope::parse("/subscriptions/nope").is_err());
        let sub = "/subscriptions/00000000-1111-4222-8333-444444444444";
        for bad in [
            "/resourceGroups",
            "/resourceGroups/rg/providers",
            "/resourceGroups/rg/providers/Microsoft.KeyVault",
            "/resourceGroups/rg/whatever/rg",
            "/resourceGroups//providers/x/y/z",
        ] {
            assert!(Scope::parse(&format!("{sub}{bad}")).is_err(), "{bad}");
        }
        assert!(
            Scope::parse(&format!(
                "{sub}/resourceGroups/rg/providers/Microsoft.KeyVault/vaults/v/keys/k"
            ))
            .is_ok()
        );
        assert!(Scope::parse("/subscriptions/00000000-1111-4222-8333-444444444444//x").is_err());
    }
}
