//! Vaults as ARM models them (`Microsoft.KeyVault/vaults`), and the rules on their properties.

use serde::{Deserialize, Serialize};

use crate::access::{Caller, DataAction, KeyPermission, PUBLIC_CLIENT_APP_ID, SecretPermission};
use crate::{ErrorCode, KvError, TenantId};

/// The vault's pricing tier; HSM-protected keys need `premium`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SkuName {
    /// Software keys only.
    Standard,
    /// Software and HSM-protected keys.
    Premium,
}

/// `properties.sku`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sku {
    /// Always `A`.
    pub family: String,
    /// Tier.
    pub name: SkuName,
}

/// Permissions of one access policy entry, as lists of names (case-insensitive on input).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Permissions {
    /// Key permissions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys: Option<Vec<String>>,
    /// Secret permissions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secrets: Option<Vec<String>>,
    /// Certificate permissions (kept, not used).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificates: Option<Vec<String>>,
    /// Storage permissions (kept, not used).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<Vec<String>>,
}

/// One vault access policy entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AccessPolicyEntry {
    /// Tenant of the principal.
    pub tenant_id: String,
    /// Object id of the principal.
    pub object_id: String,
    /// Compound identity: the application acting for the principal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub application_id: Option<String>,
    /// Granted permissions.
    pub permissions: Permissions,
}

/// An IP rule of the vault firewall.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpRule {
    /// An address or CIDR range.
    pub value: String,
}

/// `properties.networkAcls`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetworkAcls {
    /// `AzureServices` or `None`.
    #[serde(default = "default_bypass")]
    pub bypass: String,
    /// `Allow` or `Deny`.
    #[serde(default = "default_action")]
    pub default_action: String,
    /// Allowed ranges.
    #[serde(default)]
    pub ip_rules: Vec<IpRule>,
    /// Virtual network rules (kept, not used).
    #[serde(default)]
    pub virtual_network_rules: Vec<serde_json::Value>,
}

fn default_bypass() -> String {
    "AzureServices".into()
}
fn default_action() -> String {
    "Allow".into()
}

/// The vault properties kagi keeps (and answers with, plus `vaultUri`/`provisioningState`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VaultProperties {
    /// Tenant whose principals the vault trusts.
    pub tenant_id: TenantId,
    /// Tier.
    pub sku: Sku,
    /// Access policies (used when RBAC is off).
    pub access_policies: Vec<AccessPolicyEntry>,
    /// Always true: soft delete cannot be turned off.
    pub enable_soft_delete: bool,
    /// Days a deleted vault or object stays recoverable (7–90).
    pub soft_delete_retention_in_days: u32,
    /// Once true, never false again.
    pub enable_purge_protection: bool,
    /// Use role assignments instead of access policies.
    pub enable_rbac_authorization: bool,
    /// Firewall.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_acls: Option<NetworkAcls>,
    /// `Enabled` or `Disabled`.
    pub public_network_access: String,
    /// Kept for fidelity.
    pub enabled_for_deployment: bool,
    /// Kept for fidelity.
    pub enabled_for_disk_encryption: bool,
    /// Kept for fidelity.
    pub enabled_for_template_deployment: bool,
}

/// The `properties` of a create or update request, every field optional.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VaultPropertiesInput {
    /// Tenant id.
    pub tenant_id: Option<String>,
    /// Tier.
    pub sku: Option<Sku>,
    /// Access policies.
    pub access_policies: Option<Vec<AccessPolicyEntry>>,
    /// Soft delete flag.
    pub enable_soft_delete: Option<bool>,
    /// Retention.
    pub soft_delete_retention_in_days: Option<i64>,
    /// Purge protection.
    pub enable_purge_protection: Option<bool>,
    /// RBAC flag.
    pub enable_rbac_authorization: Option<bool>,
    /// Firewall.
    pub network_acls: Option<NetworkAcls>,
    /// Public network access.
    pub public_network_access: Option<String>,
    /// `default` or `recover`.
    pub create_mode: Option<String>,
    /// Ignored (kagi computes it).
    pub vault_uri: Option<String>,
    /// Kept for fidelity.
    pub enabled_for_deployment: Option<bool>,
    /// Kept for fidelity.
    pub enabled_for_disk_encryption: Option<bool>,
    /// Kept for fidelity.
    pub enabled_for_template_deployment: Option<bool>,
    /// Provisioning state (ignored on input).
    pub provisioning_state: Option<String>,
}

/// A create-or-update request body for a vault.
#[derive(Clone, Debug, Deserialize)]
pub struct VaultInput {
    /// Region.
    pub location: Option<String>,
    /// Tags.
    #[serde(default)]
    pub tags: Option<crate::key::Tags>,
    /// Properties.
    pub properties: Option<VaultPropertiesInput>,
}

fn bad(message: impl Into<String>) -> KvError {
    KvError::new(ErrorCode::BadRequest, message)
}

fn validate_retention(days: i64) -> Result<u32, KvError> {
    if (7..=90).contains(&days) {
        Ok(days as u32)
    } else {
        Err(bad(format!(
            "The property \"softDeleteRetentionInDays\" must be between 7 and 90 (got {days})."
        )))
    }
}

fn validate_acls(acls: &Option<NetworkAcls>) -> Result<(), KvError> {
    if let Some(acls) = acls {
        if !matches!(acls.bypass.as_str(), "AzureServices" | "None") {
            return Err(bad("networkAcls.bypass must be AzureServices or None."));
        }
        if !matches!(acls.default_action.as_str(), "Allow" | "Deny") {
            return Err(bad("networkAcls.defaultAction must be Allow or Deny."));
        }
        for rule in &acls.ip_rules {
            crate::access::IpRange::parse(&rule.value)?;
        }
    }
    Ok(())
}

fn validate_policies(policies: &[AccessPolicyEntry]) -> Result<(), KvError> {
    if policies.len() > 1024 {
        return Err(bad("A vault can have at most 1024 access policies."));
    }
    for p in policies {
        TenantId::parse(&p.tenant_id)?;
        crate::ids::ObjectId::parse(&p.object_id).map_err(|e| bad(e.message))?;
        for name in p.permissions.keys.iter().flatten() {
            crate::access::KeyPermission::parse(name)?;
        }
        for name in p.permissions.secrets.iter().flatten() {
            crate::access::SecretPermission::parse(name)?;
        }
    }
    Ok(())
}

impl VaultProperties {
    /// Properties of a new vault. `tenantId` and `sku` are required, as in ARM.
    pub fn create(input: VaultPropertiesInput) -> Result<Self, KvError> {
        let tenant_id = TenantId::parse(
            input
                .tenant_id
                .as_deref()
                .ok_or_else(|| bad("The property \"tenantId\" is required."))?,
        )?;
        let sku = input
            .sku
            .ok_or_else(|| bad("The property \"sku\" is required."))?;
        if input.enable_soft_delete == Some(false) {
            return Err(bad(
                "Soft delete cannot be disabled: every vault keeps deleted objects recoverable \
                 for softDeleteRetentionInDays.",
            ));
        }
        let retention = validate_retention(input.soft_delete_retention_in_days.unwrap_or(90))?;
        validate_acls(&input.network_acls)?;
        let access_policies = input.access_policies.unwrap_or_default();
        validate_policies(&access_policies)?;
        let public_network_access = input
            .public_network_access
            .unwrap_or_else(|| "Enabled".into());
        validate_public_access(&public_network_access)?;
        Ok(Self {
            tenant_id,
            sku,
            access_policies,
            enable_soft_delete: true,
            soft_delete_retention_in_days: retention,
            enable_purge_protection: input.enable_purge_protection.unwrap_or(false),
            enable_rbac_authorization: input.enable_rbac_authorization.unwrap_or(false),
            network_acls: input.network_acls,
            public_network_access,
            enabled_for_deployment: input.enabled_for_deployment.unwrap_or(false),
            enabled_for_disk_encryption: input.enabled_for_disk_encryption.unwrap_or(false),
            enabled_for_template_deployment: input.enabled_for_template_deployment.unwrap_or(false),
        })
    }

    /// Applies an update (PUT on an existing vault or PATCH): the rules that make some
    /// properties one-way are enforced here.
    pub fn update(&self, input: VaultPropertiesInput) -> Result<Self, KvError> {
        let mut next = self.clone();
        if let Some(t) = input.tenant_id {
            next.tenant_id = TenantId::parse(&t)?;
        }
        if let Some(sku) = input.sku {
            next.sku = sku;
        }
        if let Some(p) = input.access_policies {
            validate_policies(&p)?;
            next.access_policies = p;
        }
        if input.enable_soft_delete == Some(false) {
            return Err(bad("Soft delete cannot be disabled on a vault."));
        }
        if let Some(days) = input.soft_delete_retention_in_days {
            let days = validate_retention(days)?;
            if days != self.soft_delete_retention_in_days {
                return Err(bad(
                    "The property \"softDeleteRetentionInDays\" cannot be changed after the \
                     vault is created.",
                ));
            }
        }
        match input.enable_purge_protection {
            Some(false) if self.enable_purge_protection => {
                return Err(bad(
                    "The property \"enablePurgeProtection\" cannot be set to false once \
                     enabled: purge protection can never be turned off.",
                ));
            }
            Some(v) => next.enable_purge_protection = v,
            None => {}
        }
        if let Some(v) = input.enable_rbac_authorization {
            next.enable_rbac_authorization = v;
        }
        if input.network_acls.is_some() {
            validate_acls(&input.network_acls)?;
            next.network_acls = input.network_acls;
        }
        if let Some(v) = input.public_network_access {
            validate_public_access(&v)?;
            next.public_network_access = v;
        }
        if let Some(v) = input.enabled_for_deployment {
            next.enabled_for_deployment = v;
        }
        if let Some(v) = input.enabled_for_disk_encryption {
            next.enabled_for_disk_encryption = v;
        }
        if let Some(v) = input.enabled_for_template_deployment {
            next.enabled_for_template_deployment = v;
        }
        Ok(next)
    }

    /// Azure's `recoveryLevel` for objects in this vault.
    pub fn recovery_level(&self) -> &'static str {
        match (
            self.enable_purge_protection,
            self.soft_delete_retention_in_days >= 90,
        ) {
            (true, true) => "Recoverable",
            (true, false) => "CustomizedRecoverable",
            (false, true) => "Recoverable+Purgeable",
            (false, false) => "CustomizedRecoverable+Purgeable",
        }
    }

    /// Whether HSM-protected key types are allowed.
    pub fn allows_hsm(&self) -> bool {
        self.sku.name == SkuName::Premium
    }
}

fn validate_public_access(v: &str) -> Result<(), KvError> {
    if matches!(v, "Enabled" | "Disabled") {
        Ok(())
    } else {
        Err(bad("publicNetworkAccess must be Enabled or Disabled."))
    }
}

impl AccessPolicyEntry {
    /// Whether this entry grants the action to the caller.
    fn grants(&self, caller: &Caller, action: DataAction) -> bool {
        let entry = self;

        if !entry.tenant_id.eq_ignore_ascii_case(&caller.tenant_id)
            || !entry.object_id.eq_ignore_ascii_case(&caller.object_id)
        {
            return false;
        }
        // A compound entry (object + application) applies only when the caller acts through it, and
        // only through an application that proved it is that application.
        if let Some(app) = &entry.application_id
            && caller.application_id.as_deref().is_none_or(|a| {
                !a.eq_ignore_ascii_case(app) || a.eq_ignore_ascii_case(PUBLIC_CLIENT_APP_ID)
            })
        {
            return false;
        }
        match action {
            DataAction::Key(wanted) => entry.permissions.keys.iter().flatten().any(|p| {
                KeyPermission::parse(p).is_ok_and(|p| p == wanted || p == KeyPermission::All)
            }),
            DataAction::Secret(wanted) => entry.permissions.secrets.iter().flatten().any(|p| {
                SecretPermission::parse(p).is_ok_and(|p| p == wanted || p == SecretPermission::All)
            }),
            DataAction::Random => true,
        }
    }
}

impl VaultProperties {
    /// Evaluates the vault's access policies for a caller. RBAC vaults are decided elsewhere.
    pub fn access_policies_allow(&self, caller: &Caller, action: DataAction) -> bool {
        self.access_policies
            .iter()
            .any(|e| e.grants(caller, action))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::access::{KeyPermission, SecretPermission};

    mod access_policies {
        use super::*;

        const T: &str = "72f988bf-86f1-41af-91ab-2d7cd011db47";
        const O: &str = "11111111-2222-4333-8444-555555555555";

        fn vault(keys: &[&str]) -> VaultProperties {
            let mut p = VaultProperties::create(
                serde_json::from_value(serde_json::json!({
                    "tenantId": T, "sku": {"family": "A", "name": "standard"}
                }))
                .unwrap(),
            )
            .unwrap();
            p.access_policies.push(AccessPolicyEntry {
                tenant_id: T.into(),
                object_id: O.into(),
                application_id: None,
                permissions: Permissions {
                    keys: Some(keys.iter().map(|s| s.to_string()).collect()),
                    ..Default::default()
                },
            });
            p
        }

        fn caller(oid: &str) -> Caller {
            Caller {
                tenant_id: T.into(),
                object_id: oid.into(),
                application_id: None,
            }
        }

        #[test]
        fn policies_grant_exactly_what_they_list() {
            let v = vault(&["Get", "wrapKey", "UnwrapKey"]);
            let c = caller(O);
            assert!(v.access_policies_allow(&c, DataAction::Key(KeyPermission::Get)));
            assert!(v.access_policies_allow(&c, DataAction::Key(KeyPermission::UnwrapKey)));
            assert!(!v.access_policies_allow(&c, DataAction::Key(KeyPermission::Delete)));
            assert!(!v.access_policies_allow(&c, DataAction::Secret(SecretPermission::Get)));
            let other = caller("99999999-2222-4333-8444-555555555555");
            assert!(!v.access_policies_allow(&other, DataAction::Key(KeyPermission::Get)));
            let all = vault(&["all"]);
            assert!(all.access_policies_allow(&c, DataAction::Key(KeyPermission::Purge)));
        }

        #[test]
        fn compound_entries_need_their_application_and_never_the_public_client() {
            const APP: &str = "66666666-2222-4333-8444-555555555555";
            let mut v = vault(&["get"]);
            v.access_policies[0].application_id = Some(APP.into());
            let get = DataAction::Key(KeyPermission::Get);
            let via = |app: Option<&str>| Caller {
                application_id: app.map(str::to_string),
                ..caller(O)
            };
            assert!(v.access_policies_allow(&via(Some(APP)), get));
            assert!(!v.access_policies_allow(&via(None), get));
            assert!(!v.access_policies_allow(&via(Some(PUBLIC_CLIENT_APP_ID)), get));
            v.access_policies[0].application_id = Some(PUBLIC_CLIENT_APP_ID.to_ascii_uppercase());
            assert!(!v.access_policies_allow(&via(Some(PUBLIC_CLIENT_APP_ID)), get));
        }
    }

    fn input() -> VaultPropertiesInput {
        serde_json::from_value(serde_json::json!({
            "tenantId": "72f988bf-86f1-41af-91ab-2d7cd011db47",
            "sku": {"family": "A", "name": "standard"},
            "softDeleteRetentionInDays": 7
        }))
        .unwrap()
    }

    #[test]
    fn create_defaults_and_rules() {
        let p = VaultProperties::create(input()).unwrap();
        assert!(p.enable_soft_delete);
        assert!(!p.enable_purge_protection);
        assert_eq!(p.recovery_level(), "CustomizedRecoverable+Purgeable");
        for days in [6, 91] {
            let mut i = input();
            i.soft_delete_retention_in_days = Some(days);
            assert!(VaultProperties::create(i).is_err());
        }
        let mut i = input();
        i.enable_soft_delete = Some(false);
        assert!(VaultProperties::create(i).is_err());
        let mut i = input();
        i.tenant_id = None;
        assert!(VaultProperties::create(i).is_err());
    }

    #[test]
    fn purge_protection_is_one_way() {
        let p = VaultProperties::create(input()).unwrap();
        let on = p
            .update(VaultPropertiesInput {
                enable_purge_protection: Some(true),
                ..Default::default()
            })
            .unwrap();
        assert!(on.enable_purge_protection);
        assert_eq!(on.recovery_level(), "CustomizedRecoverable");
        let off = on.update(VaultPropertiesInput {
            enable_purge_protection: Some(false),
            ..Default::default()
        });
        assert_eq!(off.unwrap_err().status(), 400);
        // Unrelated updates keep it on.
        let still = on
            .update(VaultPropertiesInput {
                enable_rbac_authorization: Some(true),
                ..Default::default()
            })
            .unwrap();
        assert!(still.enable_purge_protection);
    }

    #[test]
    fn retention_is_fixed_after_creation() {
        let p = VaultProperties::create(input()).unwrap();
        assert!(
            p.update(VaultPropertiesInput {
                soft_delete_retention_in_days: Some(30),
                ..Default::default()
            })
            .is_err()
        );
        assert!(
            p.update(VaultPropertiesInput {
                soft_delete_retention_in_days: Some(7),
                ..Default::default()
            })
            .is_ok()
        );
    }
}
