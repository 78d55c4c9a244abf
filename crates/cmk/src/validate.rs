//! Validating a key for a consumer before any data depends on it (BK-4): the key URI, the key
//! vault's properties, the key, and the identity's get, list, wrapKey and unwrapKey — the
//! last four by really calling the key vault with the identity's token. One error per rule.

use kagi_core::KvError;
use kagi_host::{ServiceHost, subscription_of};

use crate::{KeyAccess, VaultFailure, bad, key_unusable};

/// The key a resource asks to use, and how it reaches it.
#[derive(Clone, Copy, Debug)]
pub struct KeyRequest<'a> {
    /// The key URI as given (versionless or versioned).
    pub key_uri: &'a str,
    /// The resource that will use the key (its managed identity calls the key vault).
    pub resource_id: &'a str,
    /// The resource's region: the key vault must be in the same one.
    pub location: &'a str,
    /// `None`: the resource's system-assigned identity; `Some(id)`: that user-assigned one.
    pub user_assigned: Option<&'a str>,
    /// The identity as errors name it ("system-assigned identity {oid}").
    pub who: &'a str,
}

impl KeyAccess {
    /// Checks every rule for using `req`'s key; returns the versioned key id in force.
    pub async fn validate(
        &self,
        host: &dyn ServiceHost,
        req: &KeyRequest<'_>,
    ) -> Result<String, KvError> {
        self.validate_with(host, req, None).await
    }

    /// [`KeyAccess::validate`] with the key vault called with `token` (an identity the
    /// platform does not know as the resource's own, such as a SQL database's) instead of the
    /// resource's managed identity, when given.
    pub async fn validate_with(
        &self,
        host: &dyn ServiceHost,
        req: &KeyRequest<'_>,
        token: Option<&str>,
    ) -> Result<String, KvError> {
        let consumer = self.consumer;
        let key = self.parse(req.key_uri)?;
        let facts = host.key_vault_facts(&key.vault).ok_or_else(|| {
            bad(
                "KeyVaultNotFound",
                format!(
                    "The key vault '{}' of key URI '{}' does not exist.",
                    key.vault, req.key_uri
                ),
            )
        })?;
        let location = req.location;
        if !self.any_region && !facts.location.eq_ignore_ascii_case(location) {
            return Err(bad(
                "KeyVaultRegionMismatch",
                format!(
                    "The key vault '{}' is in region '{}' but the {consumer} is in '{location}'; \
                     the key must be in a vault of the same region.",
                    facts.name, facts.location
                ),
            ));
        }
        // BK-9: the key vault must be of the tenant the resource's subscription is in (a key
        // vault keeps its tenantId after a tenant move until it is updated).
        if let Some(tenant) =
            subscription_of(req.resource_id).and_then(|s| host.subscription_tenant(s))
            && !facts.tenant_id.eq_ignore_ascii_case(&tenant)
        {
            return Err(bad(
                "KeyVaultTenantMismatch",
                format!(
                    "The key vault '{}' belongs to tenant {} but the {consumer}'s subscription \
                     is in tenant {tenant}; use a key vault of tenant {tenant} (after a tenant \
                     move, update the key vault's tenantId and its access policies).",
                    facts.name, facts.tenant_id
                ),
            ));
        }
        if !facts.soft_delete || !facts.purge_protection {
            return Err(bad(
                "KeyVaultSoftDeleteOrPurgeProtectionDisabled",
                format!(
                    "The key vault '{}' must have soft delete and purge protection enabled \
                     (soft delete: {}, purge protection: {}).",
                    facts.name, facts.soft_delete, facts.purge_protection
                ),
            ));
        }
        let token = match token {
            Some(t) => t.to_string(),
            None => host.identity_token(req.resource_id, req.user_assigned)?,
        };
        let lacks = |perm: &str, f: &VaultFailure| -> KvError {
            if f.status == 403
                && f.inner
                    .as_deref()
                    .is_none_or(|i| i.starts_with("ForbiddenBy"))
            {
                bad(
                    "IdentityLacksKeyPermission",
                    format!(
                        "The {} lacks the '{perm}' permission on key '{}' ({}). Grant get, \
                         list, wrapKey and unwrapKey (an access policy, or the Key Vault Crypto \
                         Service Encryption User role plus list).",
                        req.who,
                        req.key_uri,
                        f.reason()
                    ),
                )
            } else if f.status == 404 {
                bad(
                    if key.version.is_some() {
                        "KeyVersionNotFound"
                    } else {
                        "KeyNotFound"
                    },
                    format!("The key '{}' was not found ({}).", req.key_uri, f.reason()),
                )
            } else {
                bad(
                    "KeyVaultKeyNotAccessible",
                    format!(
                        "The key '{}' could not be used: {}.",
                        req.key_uri,
                        f.reason()
                    ),
                )
            }
        };
        let bundle = self
            .client
            .get_key(&key, &token)
            .await
            .map_err(|f| lacks("get", &f))?;
        if let Some((inner, why)) = key_unusable(&bundle, host.now(), consumer) {
            return Err(bad(
                inner,
                format!("The key '{}' cannot be used: {why}.", req.key_uri),
            ));
        }
        self.client
            .list_keys(&key, &token)
            .await
            .map_err(|f| lacks("list", &f))?;
        let kid_text = bundle["key"]["kid"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let kid = self.parse(&kid_text)?;
        let probe = kagi_crypto::random_bytes(32).map_err(|e| internal("rng", e))?;
        let (_, wrapped) = self
            .client
            .wrap(&kid, &token, &probe)
            .await
            .map_err(|f| lacks("wrapKey", &f))?;
        let back = self
            .client
            .unwrap(&kid, &token, &wrapped)
            .await
            .map_err(|f| lacks("unwrapKey", &f))?;
        if back != probe {
            return Err(bad(
                "KeyVaultKeyNotAccessible",
                format!("The key '{}' did not unwrap what it wrapped.", req.key_uri),
            ));
        }
        Ok(kid_text)
    }
}

/// Logs a failure of kagi itself and answers a bare 500.
pub(crate) fn internal(context: &str, e: impl std::fmt::Display) -> KvError {
    tracing::error!(context, error = %e, "customer-managed key failure");
    KvError::internal()
}
