//! Subscriptions, tenants and resource moves (MISSION BK-9, ID-3, X-4).
//!
//! **Subscriptions** are created by the bootstrap administrator (kagi-specific:
//! `PUT /kagi/admin/subscriptions/{id}`), in its own tenant unless another known tenant is named.
//!
//! **Tenant moves** ("transfer a subscription to another directory",
//! [`Platform::change_subscription_directory`]) re-home a subscription into another tenant
//! (created by the transfer when new) with Azure's consequences: every role assignment at or
//! below the subscription is deleted; managed identities of resources in it stay in the old
//! tenant, so they stop working for those resources (no new token is issued for an identity
//! whose tenant is not its resource's subscription's) until the system-assigned identity is
//! turned off and on again or the user-assigned one is recreated; key vaults keep their old
//! `tenantId` until it is updated. Nothing else moves: role definitions, locks and policy
//! assignments stay.
//!
//! **Resource moves** ([`Platform::move_service_resource`], [`Platform::move_key_vault`]) give
//! a resource a new resource group and/or subscription in the same tenant. The record, the
//! managed identities bound to it, its workload bindings and the documents and activity log its
//! service keeps about it (`service_resources`) follow in one store transaction (a crash leaves
//! it in exactly one place); role assignments at or below its old id are
//! orphaned by the move, as in Azure, and are deleted with it. Each has a `dry_run` form for
//! `validateMoveResources` that runs the very same checks.
//!
//! The bootstrap administrator is the administrator of every tenant kagi knows: it may obtain
//! a token in any of them (`/{tenant}/oauth2/v2.0/token`) and manages every subscription,
//! whichever tenant its token names.
//!
//! A child module of `directory` (it shares the directory's private state).

use std::collections::BTreeSet;

use kagi_core::{ErrorCode, KvError, ResourceGroupName, SubscriptionId, TenantId, VaultName};
use kagi_identity::Principal;
use kagi_store::{PrincipalRecord, ResourceRecord};
use serde_json::{Value, json};

use crate::{Platform, internal};
use kagi_directory::{bad, kind};

/// Moves and transfers are rare; serialising them keeps the checks and the commit of one from
/// interleaving with another's.
static MOVES: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Where a resource moves to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MoveTarget {
    /// Target subscription (lower-case).
    pub subscription_id: String,
    /// Target resource group as stored.
    pub resource_group: String,
}

impl MoveTarget {
    /// `/subscriptions/{s}/resourceGroups/{g}`.
    pub fn id(&self) -> String {
        format!(
            "/subscriptions/{}/resourceGroups/{}",
            self.subscription_id, self.resource_group
        )
    }
}

/// The subscription of a resource id or scope (`/subscriptions/{s}/…`), lower-case.
pub(crate) fn subscription_of(resource_id: &str) -> Option<String> {
    let mut segs = resource_id.trim_start_matches('/').split('/');
    match (segs.next(), segs.next()) {
        (Some(s), Some(id)) if s.eq_ignore_ascii_case("subscriptions") && !id.is_empty() => {
            Some(id.to_ascii_lowercase())
        }
        _ => None,
    }
}

fn conflict(inner: &'static str, message: impl Into<String>) -> KvError {
    KvError::conflict(message).with_inner(inner)
}

fn subscription_json(id: &str, tenant: &str, default: bool) -> Value {
    json!({
        "id": format!("/subscriptions/{id}"),
        "subscriptionId": id,
        "tenantId": tenant,
        "displayName": if default { "kagi default" } else { "kagi" },
        "state": "Enabled",
    })
}

impl Platform {
    // ----- tenants and subscriptions -----

    /// The tenant a subscription is in now (in memory; `None` for an unknown subscription).
    pub fn subscription_tenant_now(&self, subscription_id: &str) -> Option<String> {
        self.dir()
            .subscriptions
            .get(&subscription_id.to_ascii_lowercase())
            .cloned()
    }

    /// Whether kagi knows a tenant: one that holds a subscription or a principal.
    pub(crate) fn tenant_known(&self, tenant: &str) -> bool {
        self.dir().tenant_known(tenant)
    }

    /// The tenant new identities of a resource are created in: its subscription's, or the
    /// caller's when the subscription is unknown.
    pub(crate) fn tenant_for_resource(&self, resource_key: &str, caller: &Principal) -> String {
        subscription_of(resource_key)
            .and_then(|s| self.subscription_tenant_now(&s))
            .unwrap_or_else(|| caller.tenant_id.clone())
    }

    /// Why a managed identity cannot act for a resource after a tenant move (ID-3): the
    /// identity is in another tenant than the subscription of the resource that uses it, or
    /// than the subscription of its own resource (a user-assigned identity). `None` when it
    /// can.
    pub(crate) fn identity_tenant_problem(
        &self,
        p: &PrincipalRecord,
        resource_key: &str,
    ) -> Option<KvError> {
        if p.kind != kind::SYSTEM_ASSIGNED && p.kind != kind::USER_ASSIGNED {
            return None;
        }
        let mut places = vec![resource_key.to_string()];
        places.extend(p.resource_id.clone());
        for place in places {
            let Some(sub) = subscription_of(&place) else {
                continue;
            };
            let Some(tenant) = self.subscription_tenant_now(&sub) else {
                continue;
            };
            if !tenant.eq_ignore_ascii_case(&p.tenant_id) {
                let fix = if p.kind == kind::SYSTEM_ASSIGNED {
                    "turn the resource's system-assigned identity off and on again (a new identity \
                     is created in the new tenant)"
                } else {
                    "create a user-assigned identity in the new tenant and assign it instead"
                };
                return Some(
                    bad(format!(
                        "The managed identity {} belongs to tenant {}, but subscription {sub} is \
                         now in tenant {tenant} (it was moved to another directory); the identity \
                         no longer works for its resources. To fix it, {fix}, then grant it \
                         access again.",
                        p.object_id, p.tenant_id
                    ))
                    .with_inner("ManagedIdentityTenantMismatch"),
                );
            }
        }
        None
    }

    /// Why one of a resource's managed identities (the system-assigned one, or the named
    /// user-assigned one) cannot act for it after a tenant move; `None` when it can, or when
    /// the resource or identity does not exist (other checks report those).
    pub fn managed_identity_tenant_problem(
        &self,
        resource_id: &str,
        user_assigned: Option<&str>,
    ) -> Option<KvError> {
        let key = resource_id.trim_end_matches('/').to_ascii_lowercase();
        let body = self.dir().resources.get(&key).map(|(_, b)| b.clone())?;
        let oid = match user_assigned {
            None => body["identity"]["principalId"].as_str()?.to_string(),
            Some(u) => body["identity"]["userAssignedIdentities"]
                .as_object()?
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(u))?
                .1["principalId"]
                .as_str()?
                .to_string(),
        };
        let p = self.dir().principals.get(&oid).cloned()?;
        self.identity_tenant_problem(&p, &key)
    }

    /// `PUT /kagi/admin/subscriptions/{id}` (the bootstrap administrator only): creates a
    /// subscription in `tenant` (default: the administrator's own tenant; otherwise a tenant
    /// kagi knows). 201 when created, 200 when it exists in that tenant; 409 when it exists in
    /// another (a tenant move is `changeDirectory`).
    pub async fn create_subscription(
        &self,
        caller: &Principal,
        id: &str,
        tenant: Option<&str>,
    ) -> Result<(u16, Value), KvError> {
        self.require_admin(caller)?;
        let sub = SubscriptionId::parse(id)?;
        let home = self
            .dir()
            .principals
            .get(&self.admin_object_id)
            .map(|p| p.tenant_id.to_ascii_lowercase())
            .unwrap_or_else(|| self.default_tenant.clone());
        let tenant = match tenant {
            Some(t) => {
                let t = TenantId::parse(t)?.to_string();
                if !self.tenant_known(&t) {
                    return Err(bad(format!(
                        "Tenant '{t}' is not known to kagi; create the subscription in the \
                         administrator's tenant {home} and move it with changeDirectory."
                    ))
                    .with_inner("TenantNotFound"));
                }
                t
            }
            None => home,
        };
        let _serial = MOVES.lock().await;
        if let Some(existing) = self.subscription_tenant_now(sub.as_str()) {
            if existing == tenant {
                return Ok((
                    200,
                    subscription_json(
                        sub.as_str(),
                        &existing,
                        sub.as_str() == self.default_subscription,
                    ),
                ));
            }
            return Err(conflict(
                "SubscriptionExistsInAnotherTenant",
                format!(
                    "Subscription '{sub}' exists in tenant {existing}; move it with \
                     POST /kagi/admin/subscriptions/{sub}/changeDirectory."
                ),
            ));
        }
        self.store
            .ensure_subscription(&tenant, sub.as_str(), self.clock.now())
            .await
            .map_err(|e| internal("create subscription", e))?;
        self.dir_mut()
            .subscriptions
            .insert(sub.to_string(), tenant.clone());
        tracing::info!(subscription = %sub, tenant = %tenant, "subscription created");
        Ok((201, subscription_json(sub.as_str(), &tenant, false)))
    }

    /// `GET /kagi/admin/subscriptions` (the bootstrap administrator only): every
    /// subscription, whatever its tenant.
    pub fn list_all_subscriptions(&self, caller: &Principal) -> Result<Value, KvError> {
        self.require_admin(caller)?;
        let d = self.dir();
        let mut value: Vec<Value> = d
            .subscriptions
            .iter()
            .map(|(s, t)| subscription_json(s, t, *s == self.default_subscription))
            .collect();
        value.sort_by(|a, b| {
            a["subscriptionId"]
                .as_str()
                .cmp(&b["subscriptionId"].as_str())
        });
        Ok(json!({ "value": value }))
    }

    /// `GET /kagi/admin/subscriptions/{id}` (the bootstrap administrator only).
    pub fn get_subscription_admin(&self, caller: &Principal, id: &str) -> Result<Value, KvError> {
        self.require_admin(caller)?;
        let sub = SubscriptionId::parse(id)?;
        let tenant = self.subscription_tenant_now(sub.as_str()).ok_or_else(|| {
            KvError::new(
                ErrorCode::NotFound,
                format!("The subscription '{sub}' could not be found."),
            )
            .with_inner("SubscriptionNotFound")
        })?;
        Ok(subscription_json(
            sub.as_str(),
            &tenant,
            sub.as_str() == self.default_subscription,
        ))
    }

    /// `POST /kagi/admin/subscriptions/{id}/changeDirectory {"tenantId"}` (the bootstrap
    /// administrator only): transfers a subscription to another tenant, created if new. Role
    /// assignments at or below the subscription are deleted (in the same transaction); managed
    /// identities and key vaults are left as they are, and the answer lists them, since each
    /// needs reconfiguring in the new tenant.
    pub async fn change_subscription_directory(
        &self,
        caller: &Principal,
        id: &str,
        tenant: &str,
    ) -> Result<Value, KvError> {
        self.require_admin(caller)?;
        let sub = SubscriptionId::parse(id)?;
        let tenant = TenantId::parse(tenant)?.to_string();
        let _serial = MOVES.lock().await;
        let old = self.subscription_tenant_now(sub.as_str()).ok_or_else(|| {
            KvError::new(
                ErrorCode::NotFound,
                format!("The subscription '{sub}' could not be found."),
            )
            .with_inner("SubscriptionNotFound")
        })?;
        if old == tenant {
            return Err(bad(format!(
                "Subscription '{sub}' is already in tenant {tenant}."
            ))
            .with_inner("SubscriptionAlreadyInTenant"));
        }
        let scope = format!("/subscriptions/{sub}");
        let below = format!("{scope}/");
        let removed: Vec<String> = self
            .dir()
            .assignments
            .iter()
            .filter(|a| a.scope == scope || a.scope.starts_with(&below))
            .map(|a| a.id.clone())
            .collect();
        let new_tenant = !self.tenant_known(&tenant);
        self.store
            .change_subscription_tenant(sub.as_str(), &tenant, &removed)
            .await
            .map_err(|e| internal("change subscription tenant", e))?;
        let (identities, vaults) = {
            let mut d = self.dir_mut();
            d.subscriptions.insert(sub.to_string(), tenant.clone());
            d.assignments.retain(|a| !removed.contains(&a.id));
            let identities: BTreeSet<String> = d
                .principals
                .values()
                .filter(|p| {
                    (p.kind == kind::SYSTEM_ASSIGNED || p.kind == kind::USER_ASSIGNED)
                        && !p.tenant_id.eq_ignore_ascii_case(&tenant)
                        && p.resource_id
                            .as_deref()
                            .and_then(subscription_of)
                            .is_some_and(|s| s == sub.as_str())
                })
                .filter_map(|p| p.resource_id.clone())
                .collect();
            drop(d);
            let vaults: Vec<String> = self
                .all_vaults()
                .iter()
                .map(|v| v.record())
                .filter(|r| {
                    r.subscription_id == sub.as_str()
                        && !r
                            .properties
                            .tenant_id
                            .as_str()
                            .eq_ignore_ascii_case(&tenant)
                })
                .map(|r| r.name.to_string())
                .collect();
            (identities, vaults)
        };
        tracing::warn!(
            subscription = %sub, from = %old, to = %tenant,
            role_assignments_removed = removed.len(),
            "subscription moved to another tenant"
        );
        Ok(json!({
            "subscriptionId": sub.as_str(),
            "tenantId": tenant,
            "previousTenantId": old,
            "tenantCreated": new_tenant,
            "roleAssignmentsRemoved": removed.len(),
            "resourcesWithIdentitiesInPreviousTenant": identities,
            "keyVaultsWithPreviousTenantId": vaults,
        }))
    }

    // ----- resource moves -----

    /// Checks a move target: the subscription exists and is in the source's tenant, the group
    /// exists. Returns it with the group's stored name.
    async fn move_target(
        &self,
        source_sub: &str,
        target_sub: &str,
        target_rg: &str,
    ) -> Result<MoveTarget, KvError> {
        let sub = SubscriptionId::parse(target_sub)?;
        let rg = ResourceGroupName::parse(target_rg)?;
        let tenant = self.subscription_tenant_now(sub.as_str()).ok_or_else(|| {
            KvError::new(
                ErrorCode::NotFound,
                format!("The target subscription '{sub}' could not be found."),
            )
            .with_inner("SubscriptionNotFound")
        })?;
        let source_tenant = self.subscription_tenant_now(source_sub).unwrap_or_default();
        if !tenant.eq_ignore_ascii_case(&source_tenant) {
            return Err(bad(format!(
                "Resources cannot move across tenants: subscription '{source_sub}' is in tenant \
                 {source_tenant} and '{sub}' in tenant {tenant}. Move the subscription itself \
                 (changeDirectory) instead."
            ))
            .with_inner("CrossTenantMoveNotSupported"));
        }
        let found = self
            .store
            .get_resource_group(sub.as_str(), rg.as_str())
            .await
            .map_err(|e| internal("get resource group", e))?
            .ok_or_else(|| {
                KvError::new(
                    ErrorCode::ResourceGroupNotFound,
                    format!("The target resource group '{rg}' could not be found in subscription '{sub}'."),
                )
                .with_inner("TargetResourceGroupNotFound")
            })?;
        Ok(MoveTarget {
            subscription_id: sub.to_string(),
            resource_group: found.name,
        })
    }

    /// Role assignments orphaned by moving `scope` (at or below it).
    fn assignments_at_or_below(&self, scope: &str) -> Vec<String> {
        let below = format!("{scope}/");
        self.dir()
            .assignments
            .iter()
            .filter(|a| a.scope == scope || a.scope.starts_with(&below))
            .map(|a| a.id.clone())
            .collect()
    }

    /// Moves a resource of the resources table (a storage-service resource such as a backup
    /// vault, or a workload) to `target_sub`/`target_rg` (the bootstrap administrator only),
    /// with its identities, bindings, service documents and activity log in one store
    /// transaction. With `dry_run`, only checks. Returns the resource as it is (or would be) stored after
    /// the move. Refused: the source is locked (any lock: a move deletes it there), a ReadOnly
    /// lock on the target, the same group, another tenant, a name taken at the target.
    pub async fn move_service_resource(
        &self,
        caller: &Principal,
        resource_id: &str,
        target_sub: &str,
        target_rg: &str,
        dry_run: bool,
    ) -> Result<Value, KvError> {
        self.require_admin(caller)?;
        let _serial = MOVES.lock().await;
        let key = resource_id.trim_end_matches('/').to_ascii_lowercase();
        let (record, body) = self.dir().resources.get(&key).cloned().ok_or_else(|| {
            KvError::new(
                ErrorCode::ResourceNotFound,
                format!(
                    "The resource '{}' was not found.",
                    kagi_core::ids::printable(resource_id)
                ),
            )
        })?;
        let target = self
            .move_target(&record.subscription_id, target_sub, target_rg)
            .await?;
        if target
            .subscription_id
            .eq_ignore_ascii_case(&record.subscription_id)
            && target
                .resource_group
                .eq_ignore_ascii_case(&record.resource_group)
        {
            return Err(bad(format!(
                "The resource '{}' is already in resource group '{}'; the target must be another \
                 resource group.",
                record.name, record.resource_group
            ))
            .with_inner("InvalidTargetResourceGroup"));
        }
        let new_id = format!(
            "/subscriptions/{}/resourceGroups/{}/providers/{}/{}",
            target.subscription_id, target.resource_group, record.resource_type, record.name
        );
        let new_key = new_id.to_ascii_lowercase();
        if self.dir().resources.contains_key(&new_key) {
            return Err(conflict(
                "TargetResourceAlreadyExists",
                format!("A resource '{new_id}' already exists; it cannot be the target of a move."),
            ));
        }
        self.check_not_locked_within(&key)?;
        self.check_not_locked(&target.id(), "write")?;
        let mut new_body = body.clone();
        new_body["id"] = json!(new_id);
        if dry_run {
            return Ok(new_body);
        }
        let removed = self.assignments_at_or_below(&key);
        let new_record = ResourceRecord {
            id: new_key.clone(),
            subscription_id: target.subscription_id.clone(),
            resource_group: target.resource_group.clone(),
            body: new_body.to_string(),
            updated: self.clock.now(),
            ..record
        };
        self.store
            .move_resource(&key, &new_record, &removed)
            .await
            .map_err(|e| internal("move resource", e))?;
        {
            let mut d = self.dir_mut();
            d.resources.remove(&key);
            d.resources
                .insert(new_key.clone(), (new_record, new_body.clone()));
            for p in d.principals.values_mut() {
                if p.resource_id.as_deref() == Some(key.as_str()) {
                    p.resource_id = Some(new_key.clone());
                }
            }
            d.assignments.retain(|a| !removed.contains(&a.id));
        }
        tracing::info!(from = %key, to = %new_key, "resource moved");
        Ok(new_body)
    }

    /// Moves a key vault to `target_sub`/`target_rg` in the same tenant (the bootstrap
    /// administrator only; with `dry_run`, only checks). Its keys, secrets, access policies
    /// and key URIs are unchanged (URIs name the vault, not its group); role assignments at or
    /// below it are deleted. Returns the vault's new id.
    ///
    /// `vault_id` is the vault's full id
    /// (`/subscriptions/{s}/resourceGroups/{g}/providers/Microsoft.KeyVault/vaults/{n}`): a
    /// vault whose subscription or group is not the one named there is refused (400
    /// `ResourceNotInSourceResourceGroup`), as key vault names are unique across groups.
    pub async fn move_key_vault(
        &self,
        caller: &Principal,
        vault_id: &str,
        target_sub: &str,
        target_rg: &str,
        dry_run: bool,
    ) -> Result<Value, KvError> {
        self.require_admin(caller)?;
        let segs: Vec<&str> = vault_id.trim_matches('/').split('/').collect();
        let (id_sub, id_rg, name) = match segs.as_slice() {
            [sw, s, gw, g, pw, ns, vw, n]
                if sw.eq_ignore_ascii_case("subscriptions")
                    && gw.eq_ignore_ascii_case("resourceGroups")
                    && pw.eq_ignore_ascii_case("providers")
                    && ns.eq_ignore_ascii_case("Microsoft.KeyVault")
                    && vw.eq_ignore_ascii_case("vaults") =>
            {
                (*s, *g, *n)
            }
            _ => {
                return Err(bad(format!(
                    "'{}' is not a key vault id.",
                    kagi_core::ids::printable(vault_id)
                )));
            }
        };
        let _serial = MOVES.lock().await;
        let name = VaultName::parse(name)?;
        let state = self.usable_vault(&name)?;
        let _w = state.write.lock().await;
        let current = state.record();
        if !current.subscription_id.eq_ignore_ascii_case(id_sub)
            || !current.resource_group.eq_ignore_ascii_case(id_rg)
        {
            return Err(bad(format!(
                "The key vault '{name}' is not in resource group '{}' of subscription '{}': the \
                 resources to move must all be in the group named by the request URL.",
                kagi_core::ids::printable(id_rg),
                kagi_core::ids::printable(id_sub)
            ))
            .with_inner("ResourceNotInSourceResourceGroup"));
        }
        let target = self
            .move_target(&current.subscription_id, target_sub, target_rg)
            .await?;
        if target.subscription_id == current.subscription_id
            && target
                .resource_group
                .eq_ignore_ascii_case(&current.resource_group)
        {
            return Err(bad(format!(
                "The key vault '{name}' is already in resource group '{}'; the target must be \
                 another resource group.",
                current.resource_group
            ))
            .with_inner("InvalidTargetResourceGroup"));
        }
        let scope = crate::directory::object_scope(&current, None);
        // A lock on the vault, above it or on one of its keys or secrets refuses the move.
        self.check_not_locked_within(&scope)?;
        self.check_not_locked(&target.id(), "write")?;
        let new_id = format!("{}/providers/Microsoft.KeyVault/vaults/{name}", target.id());
        if dry_run {
            return Ok(json!({ "id": new_id }));
        }
        let removed = self.assignments_at_or_below(&scope);
        let mut record = current.clone();
        record.subscription_id = target.subscription_id.clone();
        record.resource_group = target.resource_group.clone();
        record.updated = self.clock.now();
        self.store
            .move_vault(&record, &removed)
            .await
            .map_err(|e| internal("move vault", e))?;
        state.set_record(record);
        self.dir_mut()
            .assignments
            .retain(|a| !removed.contains(&a.id));
        tracing::info!(vault = %name, to = %new_id, "key vault moved");
        Ok(json!({ "id": new_id }))
    }
}

#[cfg(test)]
mod tests {
    use super::subscription_of;

    #[test]
    fn subscriptions_of_ids() {
        assert_eq!(
            subscription_of("/subscriptions/ABC/resourceGroups/x").as_deref(),
            Some("abc")
        );
        assert_eq!(
            subscription_of("/subscriptions/abc").as_deref(),
            Some("abc")
        );
        assert_eq!(subscription_of("/providers/x"), None);
        assert_eq!(subscription_of(""), None);
    }
}
