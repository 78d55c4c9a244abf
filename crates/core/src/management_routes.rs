//! The management host's route table ([`MANAGEMENT`]): every request the platform itself serves
//! there — health and discovery, the token service, managed-identity tokens, ARM (resource
//! groups, key vaults, identities, role-based access, locks, policies, events, alerts, moves,
//! whole-vault backups), Microsoft Graph, and kagi's own administration. The storage services'
//! routes are in their providers' tables. The HTTP layer serves a request only when it
//! matches a route of one of these tables, and the audit log names it with the route's
//! operation (ARM's names: `{namespace}/{types…}[/{action}]/{read|write|delete|action}`, Key
//! Vault's `Vault*`, Entra's `Authentication`).

use crate::route_table::{Auth, Param, RequestBody, Route};

/// `$filter`, as ARM and Graph lists take it.
const FILTER: &[Param] = &[Param::query("$filter", "An OData filter.")];

/// What a managed-identity token request names (the audience, and which identity), after the
/// way the workload proves who it is (`proof`: a header).
const fn msi_token(proof: Param) -> [Param; 8] {
    let identity = "Which user-assigned identity (by this id); none: the system-assigned one.";
    [
        proof,
        Param::query("resource", "The audience of the token (the resource URI).").required(),
        Param::query(
            "api-version",
            "The endpoint's version (2019-08-01; IMDS: 2018-02-01).",
        ),
        Param::query("client_id", identity),
        Param::query("object_id", identity),
        Param::query("principal_id", identity),
        Param::query("mi_res_id", identity),
        Param::query("msi_res_id", identity),
    ]
}

/// App Service's managed-identity endpoint: the secret in a header.
const MSI_APP_SERVICE: &[Param] = &msi_token(
    Param::header(
        "X-IDENTITY-HEADER",
        "The workload's binding secret (IDENTITY_HEADER).",
    )
    .required(),
);

/// IMDS's token endpoint (the secret in the path): `Metadata: true`.
const MSI_IMDS: &[Param] = &msi_token(Param::header("Metadata", "Must be `true`.").required());

/// A restore's options.
const RESTORE: &[Param] = &[
    Param::query(
        "location",
        "The location of the restored vault (default: the backup's).",
    ),
    Param::query(
        "keyId",
        "The key vault key that protects the backup file, if one does.",
    ),
    Param::header(
        "x-kagi-backup-passphrase",
        "The base64 of the UTF-8 passphrase of a passphrase-protected backup file.",
    ),
];

/// A workload binding's options.
const BIND: &[Param] = &[
    Param::query(
        "clientId",
        "The client id of the identity the workload signs in as.",
    ),
    Param::query(
        "expiresInHours",
        "How long the binding lasts, in whole hours.",
    ),
];

/// Every route the platform serves on the management host, in the order they are tried (a
/// literal route before a parameter one of the same shape).
#[rustfmt::skip]
pub static MANAGEMENT: &[Route] = &[
    // Health, discovery and the token service: no authentication.
    Route::kagi("GET", "/healthz", "HealthGet", "Whether the server is up (not audited).").auth(Auth::Anonymous),
    Route::kagi("GET", "/openapi.json", "OpenApiGet", "This OpenAPI description of every route kagi serves.").auth(Auth::Anonymous),
    Route::kagi("GET", "/metadata/endpoints", "CloudMetadataGet", "ARM's cloud metadata: the login endpoint, audiences and DNS suffixes (az cloud register).").auth(Auth::Anonymous),
    Route::kagi("GET", "/{tenant}/v2.0/.well-known/openid-configuration", "OpenIdConfigurationGet", "The token service's OpenID configuration for a tenant.").auth(Auth::Anonymous),
    Route::kagi("GET", "/{tenant}/discovery/v2.0/keys", "JwksGet", "The keys that sign tokens (JWKS).").auth(Auth::Anonymous),
    Route::kagi("GET", "/{tenant}/discovery/keys", "JwksGet", "The keys that sign tokens (JWKS).").auth(Auth::Anonymous),
    Route::kagi("POST", "/{tenant}/oauth2/v2.0/token", "Authentication", "Entra's token endpoint: client credentials (secret or certificate assertion), password and refresh-token grants.").auth(Auth::Anonymous).body(RequestBody::Form),
    // Managed-identity tokens, by the workload's binding secret.
    Route::kagi("GET", "/msi/token", "Authentication", "A managed identity's token, App Service style (IDENTITY_ENDPOINT).").auth(Auth::BindingSecret).params(MSI_APP_SERVICE),
    Route::kagi("GET", "/imds/{bindingSecret}/metadata/identity/oauth2/token", "Authentication", "A managed identity's token, IMDS style (AZURE_POD_IDENTITY_AUTHORITY_HOST).").auth(Auth::BindingSecret).params(MSI_IMDS),

    // kagi's own: whole-vault backup jobs, the test clock, administration.
    Route::kagi("GET", "/kagi/jobs/{jobId}", "VaultBackupJobGet", "A whole-vault backup or restore job."),
    Route::kagi("GET", "/kagi/jobs/{jobId}/result", "VaultBackupJobResultGet", "The backup file of a completed whole-vault backup job.").params(&[Param::header("Range", "A byte range (bytes=FIRST-LAST).")]),
    Route::kagi("POST", "/kagi/test/clock", "TestClockAdvance", "Moves the test clock forward (only under kagi server --test-clock; 404 otherwise).").body(RequestBody::Json),
    Route::kagi("GET", "/kagi/admin/subscriptions", "KagiSubscriptionList", "Every subscription with its tenant (the bootstrap administrator only)."),
    Route::kagi("GET", "/kagi/admin/subscriptions/{subscriptionId}", "KagiSubscriptionGet", "A subscription with its tenant."),
    Route::kagi("PUT", "/kagi/admin/subscriptions/{subscriptionId}", "KagiSubscriptionPut", "Creates a subscription ({\"tenantId\"?}).").body(RequestBody::OptionalJson),
    Route::kagi("POST", "/kagi/admin/subscriptions/{subscriptionId}/changeDirectory", "KagiSubscriptionChangeDirectory", "Moves a subscription to another tenant ({\"tenantId\"}).").body(RequestBody::Json),
    Route::kagi("GET", "/kagi/admin/signingKeys", "SigningKeyList", "The token signing key and the retired keys that still validate."),
    Route::kagi("POST", "/kagi/admin/signingKeys/rotate", "SigningKeyRotate", "Rotates the token signing key ({\"revokePrevious\"?: bool})."),

    // Microsoft Graph (no api-version).
    Route::kagi("GET", "/v1.0/me", "Microsoft.Graph/me/read", "The signed-in principal."),
    Route::kagi("POST", "/v1.0/directoryObjects/getByIds", "Microsoft.Graph/directoryObjects/getByIds/action", "Directory objects by their ids.").body(RequestBody::Json),
    Route::kagi("GET", "/v1.0/servicePrincipals", "Microsoft.Graph/servicePrincipals/read", "Lists service principals.").params(FILTER),
    Route::kagi("POST", "/v1.0/servicePrincipals", "Microsoft.Graph/servicePrincipals/write", "Creates a service principal ({\"displayName\"}, with a client secret), or answers an application's ({\"appId\"}).").body(RequestBody::Json),
    Route::kagi("GET", "/v1.0/servicePrincipals/{servicePrincipalId}", "Microsoft.Graph/servicePrincipals/read", "A service principal."),
    Route::kagi("DELETE", "/v1.0/servicePrincipals/{servicePrincipalId}", "Microsoft.Graph/servicePrincipals/delete", "Deletes a service principal."),
    Route::kagi("POST", "/v1.0/servicePrincipals/{servicePrincipalId}/addKey", "Microsoft.Graph/servicePrincipals/addKey/action", "Adds a certificate credential.").body(RequestBody::Json),
    Route::kagi("POST", "/v1.0/servicePrincipals/{servicePrincipalId}/addPassword", "Microsoft.Graph/servicePrincipals/addPassword/action", "Makes a new client secret."),
    Route::kagi("GET", "/v1.0/applications", "Microsoft.Graph/applications/read", "Lists applications (kagi's service principals).").params(FILTER),
    Route::kagi("POST", "/v1.0/applications", "Microsoft.Graph/applications/write", "Creates an application and its service principal, without a password ({\"displayName\"}).").body(RequestBody::Json),
    Route::kagi("GET", "/v1.0/applications/{applicationId}", "Microsoft.Graph/applications/read", "An application."),
    Route::kagi("PATCH", "/v1.0/applications/{applicationId}", "Microsoft.Graph/applications/write", "Updates an application (nothing kagi keeps changes).").body(RequestBody::Json),
    Route::kagi("DELETE", "/v1.0/applications/{applicationId}", "Microsoft.Graph/applications/delete", "Deletes an application and its service principal."),
    Route::kagi("POST", "/v1.0/applications/{applicationId}/addPassword", "Microsoft.Graph/applications/addPassword/action", "Makes a new password, replacing the old one; the secret is shown once.").body(RequestBody::Json),
    Route::kagi("POST", "/v1.0/applications/{applicationId}/removePassword", "Microsoft.Graph/applications/removePassword/action", "Removes the password ({\"keyId\"}).").body(RequestBody::Json),
    Route::kagi("POST", "/v1.0/servicePrincipals/{servicePrincipalId}/removePassword", "Microsoft.Graph/servicePrincipals/removePassword/action", "Removes the client secret ({\"keyId\"}).").body(RequestBody::Json),
    Route::kagi("GET", "/v1.0/users", "Microsoft.Graph/users/read", "Lists users.").params(FILTER),
    Route::kagi("POST", "/v1.0/users", "Microsoft.Graph/users/write", "Creates a user.").body(RequestBody::Json),
    Route::kagi("GET", "/v1.0/users/{userId}", "Microsoft.Graph/users/read", "A user."),
    Route::kagi("DELETE", "/v1.0/users/{userId}", "Microsoft.Graph/users/delete", "Deletes a user."),

    // ARM: subscriptions, resources, resource groups, moves.
    Route::arm("GET", "/subscriptions", "Microsoft.Resources/subscriptions/read", "The subscriptions the caller can read."),
    Route::arm("GET", "/subscriptions/{subscriptionId}/resources", "Microsoft.Resources/subscriptions/resources/read", "The resources of a subscription.").params(FILTER),
    Route::arm("GET", "/subscriptions/{subscriptionId}/operationResults/{operationId}", "Microsoft.Resources/subscriptions/operationResults/read", "The outcome of a move (204 when it succeeded) or of a resource group deletion (200 when it succeeded, the error when it failed half-way)."),
    Route::arm("GET", "/subscriptions/{subscriptionId}/resourceGroups", "Microsoft.Resources/subscriptions/resourceGroups/read", "The resource groups of a subscription.").params(FILTER),
    Route::arm("PUT", "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}", "Microsoft.Resources/subscriptions/resourceGroups/write", "Creates or updates a resource group."),
    Route::arm("GET", "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}", "Microsoft.Resources/subscriptions/resourceGroups/read", "A resource group."),
    Route::arm("HEAD", "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}", "Microsoft.Resources/subscriptions/resourceGroups/read", "Whether a resource group exists (204 or 404)."),
    Route::arm("DELETE", "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}", "Microsoft.Resources/subscriptions/resourceGroups/delete", "Deletes a resource group and every resource in it, all or nothing as far as anything refuses (202, then its Location)."),
    Route::arm("GET", "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/resources", "Microsoft.Resources/subscriptions/resourceGroups/resources/read", "The resources of a resource group.").params(FILTER),
    Route::arm("POST", "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/moveResources", "Microsoft.Resources/subscriptions/resourceGroups/moveResources/action", "Moves resources to another resource group (202, then its Location).").body(RequestBody::Json),
    Route::arm("POST", "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/validateMoveResources", "Microsoft.Resources/subscriptions/resourceGroups/validateMoveResources/action", "Checks a move without moving anything.").body(RequestBody::Json),

    // Key vaults.
    Route::arm("GET", "/subscriptions/{subscriptionId}/providers/Microsoft.KeyVault/vaults", "VaultList", "The key vaults of a subscription."),
    Route::arm("GET", "/subscriptions/{subscriptionId}/providers/Microsoft.KeyVault/deletedVaults", "VaultListDeleted", "The deleted key vaults of a subscription."),
    Route::arm("GET", "/subscriptions/{subscriptionId}/providers/Microsoft.KeyVault/locations/{location}/deletedVaults/{vaultName}", "VaultGetDeleted", "A deleted key vault."),
    Route::arm("POST", "/subscriptions/{subscriptionId}/providers/Microsoft.KeyVault/locations/{location}/deletedVaults/{vaultName}/purge", "VaultPurge", "Purges a deleted key vault.").body(RequestBody::None),
    Route::arm("GET", "/subscriptions/{subscriptionId}/providers/Microsoft.KeyVault/managedHSMs", "Microsoft.KeyVault/managedHSMs/read", "Managed HSM pools (kagi serves none: an empty list)."),
    Route::arm("GET", "/subscriptions/{subscriptionId}/providers/Microsoft.KeyVault/deletedManagedHSMs", "Microsoft.KeyVault/deletedManagedHSMs/read", "Deleted managed HSM pools (an empty list)."),
    Route::arm("GET", "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/providers/Microsoft.KeyVault/managedHSMs", "Microsoft.KeyVault/managedHSMs/read", "Managed HSM pools of a resource group (an empty list)."),
    Route::arm("GET", "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/providers/Microsoft.KeyVault/vaults", "VaultList", "The key vaults of a resource group."),
    Route::arm("PUT", "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/providers/Microsoft.KeyVault/vaults/{vaultName}", "VaultPut", "Creates or replaces a key vault."),
    Route::arm("PATCH", "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/providers/Microsoft.KeyVault/vaults/{vaultName}", "VaultPatch", "Updates a key vault."),
    Route::arm("GET", "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/providers/Microsoft.KeyVault/vaults/{vaultName}", "VaultGet", "A key vault."),
    Route::arm("DELETE", "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/providers/Microsoft.KeyVault/vaults/{vaultName}", "VaultDelete", "Deletes a key vault (soft delete)."),
    Route::arm("PUT", "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/providers/Microsoft.KeyVault/vaults/{vaultName}/accessPolicies/{operationKind}", "Microsoft.KeyVault/vaults/accessPolicies/write", "Adds, replaces or removes access policies (add, replace, remove)."),
    Route::arm("POST", "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/providers/Microsoft.KeyVault/vaults/{vaultName}/backup", "Microsoft.KeyVault/vaults/backup/action", "Starts a whole-vault backup job ({\"passphrase\"} or {\"keyId\"}; 202 and the job).").body(RequestBody::Json),
    Route::arm("POST", "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/providers/Microsoft.KeyVault/vaults/{vaultName}/restore", "Microsoft.KeyVault/vaults/restore/action", "Starts restoring a whole-vault backup file (the body, up to 1 GiB; 202 and the job).").body(RequestBody::Bytes).params(RESTORE),

    // Event Grid subscriptions of a key vault.
    Route::arm("GET", "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/providers/Microsoft.KeyVault/vaults/{vaultName}/providers/Microsoft.EventGrid/eventSubscriptions", "Microsoft.EventGrid/eventSubscriptions/read", "The event subscriptions of a key vault."),
    Route::arm("PUT", "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/providers/Microsoft.KeyVault/vaults/{vaultName}/providers/Microsoft.EventGrid/eventSubscriptions/{eventSubscriptionName}", "Microsoft.EventGrid/eventSubscriptions/write", "Creates or replaces an event subscription (a webhook)."),
    Route::arm("GET", "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/providers/Microsoft.KeyVault/vaults/{vaultName}/providers/Microsoft.EventGrid/eventSubscriptions/{eventSubscriptionName}", "Microsoft.EventGrid/eventSubscriptions/read", "An event subscription."),
    Route::arm("DELETE", "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/providers/Microsoft.KeyVault/vaults/{vaultName}/providers/Microsoft.EventGrid/eventSubscriptions/{eventSubscriptionName}", "Microsoft.EventGrid/eventSubscriptions/delete", "Deletes an event subscription."),
    Route::arm("GET", "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/providers/Microsoft.KeyVault/vaults/{vaultName}/providers/Microsoft.EventGrid/eventSubscriptions/{eventSubscriptionName}/deadLetters", "Microsoft.EventGrid/eventSubscriptions/deadLetters/read", "The events an event subscription could not deliver."),

    // Azure Monitor: action groups and activity log alerts.
    Route::arm("GET", "/subscriptions/{subscriptionId}/providers/Microsoft.Insights/actionGroups", "Microsoft.Insights/actionGroups/read", "The action groups of a subscription."),
    Route::arm("GET", "/subscriptions/{subscriptionId}/providers/Microsoft.Insights/activityLogAlerts", "Microsoft.Insights/activityLogAlerts/read", "The activity log alerts of a subscription."),
    Route::arm("GET", "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/providers/Microsoft.Insights/actionGroups", "Microsoft.Insights/actionGroups/read", "The action groups of a resource group."),
    Route::arm("PUT", "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/providers/Microsoft.Insights/actionGroups/{actionGroupName}", "Microsoft.Insights/actionGroups/write", "Creates or replaces an action group."),
    Route::arm("PATCH", "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/providers/Microsoft.Insights/actionGroups/{actionGroupName}", "Microsoft.Insights/actionGroups/write", "Updates an action group."),
    Route::arm("GET", "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/providers/Microsoft.Insights/actionGroups/{actionGroupName}", "Microsoft.Insights/actionGroups/read", "An action group."),
    Route::arm("DELETE", "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/providers/Microsoft.Insights/actionGroups/{actionGroupName}", "Microsoft.Insights/actionGroups/delete", "Deletes an action group."),
    Route::arm("GET", "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/providers/Microsoft.Insights/actionGroups/{actionGroupName}/deadLetters", "Microsoft.Insights/actionGroups/deadLetters/read", "The alerts an action group could not deliver."),
    Route::arm("GET", "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/providers/Microsoft.Insights/activityLogAlerts", "Microsoft.Insights/activityLogAlerts/read", "The activity log alerts of a resource group."),
    Route::arm("PUT", "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/providers/Microsoft.Insights/activityLogAlerts/{activityLogAlertName}", "Microsoft.Insights/activityLogAlerts/write", "Creates or replaces an activity log alert."),
    Route::arm("PATCH", "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/providers/Microsoft.Insights/activityLogAlerts/{activityLogAlertName}", "Microsoft.Insights/activityLogAlerts/write", "Updates an activity log alert."),
    Route::arm("GET", "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/providers/Microsoft.Insights/activityLogAlerts/{activityLogAlertName}", "Microsoft.Insights/activityLogAlerts/read", "An activity log alert."),
    Route::arm("DELETE", "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/providers/Microsoft.Insights/activityLogAlerts/{activityLogAlertName}", "Microsoft.Insights/activityLogAlerts/delete", "Deletes an activity log alert."),

    // Managed identities and kagi's workloads, with their workload bindings.
    Route::arm("GET", "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/providers/Microsoft.ManagedIdentity/userAssignedIdentities", "Microsoft.ManagedIdentity/userAssignedIdentities/read", "The user-assigned identities of a resource group."),
    Route::arm("PUT", "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{resourceName}", "Microsoft.ManagedIdentity/userAssignedIdentities/write", "Creates or updates a user-assigned identity."),
    Route::arm("GET", "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{resourceName}", "Microsoft.ManagedIdentity/userAssignedIdentities/read", "A user-assigned identity."),
    Route::arm("DELETE", "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{resourceName}", "Microsoft.ManagedIdentity/userAssignedIdentities/delete", "Deletes a user-assigned identity."),
    Route::arm("POST", "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{resourceName}/listIdentityEnvironment", "Microsoft.ManagedIdentity/userAssignedIdentities/listIdentityEnvironment/action", "Binds a workload to the identity: the environment its SDK needs (a new binding secret).").params(BIND),
    Route::arm("GET", "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{resourceName}/identityBindings", "Microsoft.ManagedIdentity/userAssignedIdentities/identityBindings/read", "The workload bindings of the identity (never their secrets)."),
    Route::arm("DELETE", "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{resourceName}/identityBindings/{bindingId}", "Microsoft.ManagedIdentity/userAssignedIdentities/identityBindings/delete", "Revokes a workload binding."),
    Route::arm("GET", "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/providers/Kagi.Compute/workloads", "Kagi.Compute/workloads/read", "The workloads (with system-assigned identities) of a resource group."),
    Route::arm("PUT", "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/providers/Kagi.Compute/workloads/{resourceName}", "Kagi.Compute/workloads/write", "Creates or updates a workload."),
    Route::arm("GET", "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/providers/Kagi.Compute/workloads/{resourceName}", "Kagi.Compute/workloads/read", "A workload."),
    Route::arm("DELETE", "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/providers/Kagi.Compute/workloads/{resourceName}", "Kagi.Compute/workloads/delete", "Deletes a workload."),
    Route::arm("POST", "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/providers/Kagi.Compute/workloads/{resourceName}/listIdentityEnvironment", "Kagi.Compute/workloads/listIdentityEnvironment/action", "Binds a workload process to the workload's identity.").params(BIND),
    Route::arm("GET", "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/providers/Kagi.Compute/workloads/{resourceName}/identityBindings", "Kagi.Compute/workloads/identityBindings/read", "The workload bindings of the workload."),
    Route::arm("DELETE", "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/providers/Kagi.Compute/workloads/{resourceName}/identityBindings/{bindingId}", "Kagi.Compute/workloads/identityBindings/delete", "Revokes a workload binding."),

    // Role-based access, locks, policies and their compliance: at any scope (a subscription,
    // a resource group, a resource).
    Route::arm("GET", "/{*scope}/providers/Microsoft.Authorization/roleAssignments", "Microsoft.Authorization/roleAssignments/read", "The role assignments at and above a scope.").params(FILTER),
    Route::arm("PUT", "/{*scope}/providers/Microsoft.Authorization/roleAssignments/{roleAssignmentName}", "Microsoft.Authorization/roleAssignments/write", "Creates a role assignment."),
    Route::arm("GET", "/{*scope}/providers/Microsoft.Authorization/roleAssignments/{roleAssignmentName}", "Microsoft.Authorization/roleAssignments/read", "A role assignment."),
    Route::arm("DELETE", "/{*scope}/providers/Microsoft.Authorization/roleAssignments/{roleAssignmentName}", "Microsoft.Authorization/roleAssignments/delete", "Deletes a role assignment."),
    Route::arm("GET", "/{*scope}/providers/Microsoft.Authorization/roleDefinitions", "Microsoft.Authorization/roleDefinitions/read", "The role definitions usable at a scope.").params(FILTER),
    Route::arm("PUT", "/{*scope}/providers/Microsoft.Authorization/roleDefinitions/{roleDefinitionId}", "Microsoft.Authorization/roleDefinitions/write", "Creates or updates a custom role definition."),
    Route::arm("GET", "/{*scope}/providers/Microsoft.Authorization/roleDefinitions/{roleDefinitionId}", "Microsoft.Authorization/roleDefinitions/read", "A role definition."),
    Route::arm("DELETE", "/{*scope}/providers/Microsoft.Authorization/roleDefinitions/{roleDefinitionId}", "Microsoft.Authorization/roleDefinitions/delete", "Deletes a custom role definition."),
    Route::arm("GET", "/providers/Microsoft.Authorization/roleDefinitions", "Microsoft.Authorization/roleDefinitions/read", "The built-in and custom role definitions (the root scope).").params(FILTER),
    Route::arm("GET", "/providers/Microsoft.Authorization/roleDefinitions/{roleDefinitionId}", "Microsoft.Authorization/roleDefinitions/read", "A role definition by its id at the root scope."),
    Route::arm("GET", "/{*scope}/providers/Microsoft.Authorization/policyAssignments", "Microsoft.Authorization/policyAssignments/read", "The policy assignments at a scope."),
    Route::arm("PUT", "/{*scope}/providers/Microsoft.Authorization/policyAssignments/{policyAssignmentName}", "Microsoft.Authorization/policyAssignments/write", "Creates or replaces a policy assignment."),
    Route::arm("GET", "/{*scope}/providers/Microsoft.Authorization/policyAssignments/{policyAssignmentName}", "Microsoft.Authorization/policyAssignments/read", "A policy assignment."),
    Route::arm("DELETE", "/{*scope}/providers/Microsoft.Authorization/policyAssignments/{policyAssignmentName}", "Microsoft.Authorization/policyAssignments/delete", "Deletes a policy assignment."),
    Route::arm("GET", "/{*scope}/providers/Microsoft.Authorization/locks", "Microsoft.Authorization/locks/read", "The management locks at a scope."),
    Route::arm("PUT", "/{*scope}/providers/Microsoft.Authorization/locks/{lockName}", "Microsoft.Authorization/locks/write", "Creates or replaces a management lock."),
    Route::arm("GET", "/{*scope}/providers/Microsoft.Authorization/locks/{lockName}", "Microsoft.Authorization/locks/read", "A management lock."),
    Route::arm("DELETE", "/{*scope}/providers/Microsoft.Authorization/locks/{lockName}", "Microsoft.Authorization/locks/delete", "Deletes a management lock."),
    Route::arm("GET", "/{*scope}/providers/Microsoft.PolicyInsights/policyStates/latest/queryResults", "Microsoft.PolicyInsights/policyStates/queryResults/read", "The compliance of the resources at a scope with their policy assignments."),
    Route::arm("POST", "/{*scope}/providers/Microsoft.PolicyInsights/policyStates/latest/queryResults", "Microsoft.PolicyInsights/policyStates/queryResults/action", "The compliance of the resources at a scope with their policy assignments."),
];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route_table::{ApiVersion, Host, fill, find};

    fn segs(path: &str) -> Vec<&str> {
        path.trim_matches('/').split('/').collect()
    }

    /// Every route is reached by its own template filled in: none is shadowed by an earlier
    /// one, and no two routes have the same method and path shape.
    #[test]
    fn every_route_is_reached() {
        for route in MANAGEMENT {
            let path = fill(route, |n| format!("{n}1"));
            let (found, _) = find(MANAGEMENT, route.method, &segs(&path)).expect(route.path);
            assert_eq!(found, route, "{} {path}", route.method);
            assert_eq!(route.host, Host::Management);
        }
    }

    #[test]
    fn arm_routes_take_an_api_version() {
        for route in MANAGEMENT {
            let arm =
                route.path.starts_with("/subscriptions") || route.path.contains("/providers/");
            assert_eq!(route.api_version == ApiVersion::Arm, arm, "{}", route.path);
        }
    }
}
