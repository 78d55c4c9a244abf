//! Management operations in ARM's shape: subscriptions, resource groups, vaults and deleted
//! vaults.

use std::sync::Arc;

use kagi_core::key::Tags;
use kagi_core::time::{DAY, rfc3339};
use kagi_core::vault::{AccessPolicyEntry, Permissions, VaultInput, VaultProperties};
use kagi_core::{ErrorCode, KvError, ResourceGroupName, SubscriptionId, VaultName};
use kagi_identity::Principal;
use kagi_store::{ResourceGroupRecord, VaultRecord};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::state::VaultState;
use crate::{Platform, internal};

/// Body of a resource group PUT.
#[derive(Debug, Deserialize)]
pub struct ResourceGroupInput {
    /// Region.
    pub location: String,
    /// Tags.
    #[serde(default)]
    pub tags: Option<Tags>,
}

fn not_found(code: ErrorCode, message: String) -> KvError {
    KvError::new(code, message)
}

fn vault_id(r: &VaultRecord) -> String {
    format!(
        "/subscriptions/{}/resourceGroups/{}/providers/Microsoft.KeyVault/vaults/{}",
        r.subscription_id, r.resource_group, r.name
    )
}

fn check_location(location: &str) -> Result<String, KvError> {
    let l = location.trim().to_ascii_lowercase().replace(' ', "");
    if l.is_empty() || l.len() > 64 || !l.chars().all(|c| c.is_ascii_alphanumeric()) {
        return Err(KvError::new(
            ErrorCode::BadRequest,
            "The location must be a region name such as westeurope.",
        ));
    }
    Ok(l)
}

impl Platform {
    /// Checks that the caller may manage resources in `subscription`. Until role assignments
    /// exist, only the bootstrap administrator may — in every subscription, whichever tenant
    /// its token names, since it administers every tenant kagi knows (a subscription moved to
    /// another tenant stays manageable).
    pub(crate) async fn authorize_arm(
        &self,
        caller: &Principal,
        subscription: &str,
    ) -> Result<SubscriptionId, KvError> {
        let sub = SubscriptionId::parse(subscription)?;
        // The subscription must exist.
        self.store
            .subscription_tenant(sub.as_str())
            .await
            .map_err(|e| internal("subscription lookup", e))?
            .ok_or_else(|| {
                not_found(
                    ErrorCode::NotFound,
                    format!("The subscription '{sub}' could not be found."),
                )
                .with_inner("SubscriptionNotFound")
            })?;
        if caller.object_id != self.admin_object_id {
            return Err(KvError::forbidden(format!(
                "The client '{}' with object id '{}' does not have authorization to perform \
                 this action over scope '/subscriptions/{sub}'.",
                caller.client_id, caller.object_id
            ))
            .with_inner("AuthorizationFailed"));
        }
        Ok(sub)
    }

    /// `GET /subscriptions`.
    pub async fn list_subscriptions(&self, caller: &Principal) -> Result<Value, KvError> {
        let subs = self
            .store
            .list_subscriptions()
            .await
            .map_err(|e| internal("list subscriptions", e))?;
        let value: Vec<Value> = subs
            .into_iter()
            .filter(|(_, t)| t.eq_ignore_ascii_case(&caller.tenant_id))
            .map(|(id, tenant)| {
                json!({
                    "id": format!("/subscriptions/{id}"),
                    "subscriptionId": id,
                    "tenantId": tenant,
                    "displayName": if id == self.default_subscription { "kagi default" } else { "kagi" },
                    "state": "Enabled",
                })
            })
            .collect();
        Ok(json!({ "value": value }))
    }

    /// `PUT /subscriptions/{sub}/resourcegroups/{rg}`: 201 when created, 200 when it existed.
    pub async fn put_resource_group(
        &self,
        caller: &Principal,
        subscription: &str,
        name: &str,
        input: ResourceGroupInput,
    ) -> Result<(u16, Value), KvError> {
        let sub = self.authorize_arm(caller, subscription).await?;
        let name = ResourceGroupName::parse(name)?;
        let location = check_location(&input.location)?;
        let tags = input.tags.unwrap_or_default();
        kagi_core::key::validate_tags(&tags)
            .map_err(|e| KvError::new(ErrorCode::BadRequest, e.message))?;
        let existing = self
            .store
            .get_resource_group(sub.as_str(), name.as_str())
            .await
            .map_err(|e| internal("get resource group", e))?;
        if let Some(rg) = &existing
            && rg.location != location
        {
            return Err(KvError::conflict(format!(
                "Invalid resource group location '{location}'. The Resource group already \
                 exists in location '{}'.",
                rg.location
            ))
            .with_inner("InvalidResourceGroupLocation"));
        }
        let record = ResourceGroupRecord {
            subscription_id: sub.to_string(),
            name: existing
                .as_ref()
                .map_or_else(|| name.to_string(), |r| r.name.clone()),
            location,
            tags,
        };
        self.store
            .put_resource_group(&record, self.clock.now())
            .await
            .map_err(|e| internal("put resource group", e))?;
        Ok((if existing.is_some() { 200 } else { 201 }, rg_json(&record)))
    }

    /// `GET /subscriptions/{sub}/resourcegroups/{rg}`.
    pub async fn get_resource_group(
        &self,
        caller: &Principal,
        subscription: &str,
        name: &str,
    ) -> Result<Value, KvError> {
        let sub = self.authorize_arm(caller, subscription).await?;
        Ok(rg_json(&self.resource_group(&sub, name).await?))
    }

    /// `GET /subscriptions/{sub}/resourcegroups`: the subscription's resource groups, by name
    /// (`az group list`).
    pub async fn list_resource_groups(
        &self,
        caller: &Principal,
        subscription: &str,
    ) -> Result<Value, KvError> {
        let sub = self.authorize_arm(caller, subscription).await?;
        let groups = self
            .store
            .list_resource_groups(sub.as_str())
            .await
            .map_err(|e| internal("list resource groups", e))?;
        let value: Vec<Value> = groups.iter().map(rg_json).collect();
        Ok(json!({ "value": value }))
    }

    async fn resource_group(
        &self,
        sub: &SubscriptionId,
        name: &str,
    ) -> Result<ResourceGroupRecord, KvError> {
        let name = ResourceGroupName::parse(name)?;
        self.store
            .get_resource_group(sub.as_str(), name.as_str())
            .await
            .map_err(|e| internal("get resource group", e))?
            .ok_or_else(|| {
                not_found(
                    ErrorCode::ResourceGroupNotFound,
                    format!("Resource group '{name}' could not be found."),
                )
            })
    }

    /// `PUT` (or `PATCH` when `patch`) of a vault. 201 when created or recovered, 200 when
    /// updated.
    pub async fn put_vault(
        &self,
        caller: &Principal,
        subscription: &str,
        resource_group: &str,
        name: &str,
        input: VaultInput,
        patch: bool,
    ) -> Result<(u16, Value), KvError> {
        self.put_vault_as(
            caller,
            subscription,
            resource_group,
            name,
            input,
            patch,
            VaultWriter::Client,
        )
        .await
    }

    /// [`Platform::put_vault`], or a whole-vault restore's create or update: a restore's vault
    /// is created marked as being restored into, and only a restore changes a vault so marked.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn put_vault_as(
        &self,
        caller: &Principal,
        subscription: &str,
        resource_group: &str,
        name: &str,
        input: VaultInput,
        patch: bool,
        writer: VaultWriter<'_>,
    ) -> Result<(u16, Value), KvError> {
        let sub = self.authorize_arm(caller, subscription).await?;
        let rg = self.resource_group(&sub, resource_group).await?;
        let name = VaultName::parse(name)?;
        let props_in = input.properties.unwrap_or_default();
        if let Some(tags) = &input.tags {
            kagi_core::key::validate_tags(tags)
                .map_err(|e| KvError::new(ErrorCode::BadRequest, e.message))?;
        }
        let now = self.clock.now();
        let existing = self.vault_state(&name);
        let same_place = |r: &VaultRecord| {
            r.subscription_id == sub.as_str() && r.resource_group.eq_ignore_ascii_case(&rg.name)
        };
        let recover = props_in
            .create_mode
            .as_deref()
            .is_some_and(|m| m.eq_ignore_ascii_case("recover"));
        if let Some(mode) = props_in.create_mode.as_deref()
            && !matches!(mode.to_ascii_lowercase().as_str(), "recover" | "default")
        {
            return Err(KvError::new(
                ErrorCode::BadRequest,
                "createMode must be default or recover.",
            ));
        }

        if let Some(state) = existing {
            let _w = state.write.lock().await;
            if state.is_restoring() && matches!(writer, VaultWriter::Client) {
                return Err(crate::restore_in_progress(&name));
            }
            let current = state.record();
            if current.deleted_at.is_some() {
                if !recover {
                    return Err(KvError::conflict(format!(
                        "A vault with the same name already exists in deleted state. You need to \
                         either recover or purge existing key vault '{name}'."
                    ))
                    .with_inner("ConflictError"));
                }
                if current.subscription_id != sub.as_str() {
                    return Err(KvError::new(
                        ErrorCode::VaultAlreadyExists,
                        format!("The vault name '{name}' is already in use."),
                    ));
                }
                let mut record = current.clone();
                record.resource_group = rg.name.clone();
                record.deleted_at = None;
                record.purge_at = None;
                record.updated = now;
                self.replace_vault(&record, &current, "recover vault")
                    .await?;
                state.set_record(record.clone());
                tracing::info!(vault = %name, "vault recovered");
                return Ok((201, self.vault_json(&record)));
            }
            if !same_place(&current) {
                return Err(KvError::new(
                    ErrorCode::VaultAlreadyExists,
                    format!(
                        "The vault name '{name}' is already in use. Vault names are globally unique."
                    ),
                ));
            }
            if recover {
                return Err(KvError::conflict(format!(
                    "Vault '{name}' is not in a deleted state; nothing to recover."
                )));
            }
            if let Some(loc) = &input.location
                && check_location(loc)? != current.location
            {
                return Err(KvError::new(
                    ErrorCode::BadRequest,
                    format!(
                        "The location of vault '{name}' cannot be changed from '{}'.",
                        current.location
                    ),
                ));
            }
            let _ = patch; // PUT and PATCH both merge: ARM clients resend what they read.
            self.check_not_locked(&crate::directory::object_scope(&current, None), "write")?;
            let mut record = current.clone();
            record.properties = current.properties.update(props_in)?;
            if let Some(tags) = input.tags {
                record.tags = tags;
            }
            record.updated = now;
            self.replace_vault(&record, &current, "update vault")
                .await?;
            state.set_record(record.clone());
            tracing::info!(vault = %name, "vault updated");
            return Ok((200, self.vault_json(&record)));
        }

        if recover {
            return Err(not_found(
                ErrorCode::ResourceNotFound,
                format!("There is no deleted vault named '{name}' to recover."),
            ));
        }
        if patch {
            return Err(not_found(
                ErrorCode::ResourceNotFound,
                format!(
                    "The Resource 'Microsoft.KeyVault/vaults/{name}' under resource group '{}' was not found.",
                    rg.name
                ),
            ));
        }
        let location = check_location(input.location.as_deref().ok_or_else(|| {
            KvError::new(
                ErrorCode::BadRequest,
                "The property \"location\" is required.",
            )
        })?)?;
        let record = VaultRecord {
            name: name.clone(),
            subscription_id: sub.to_string(),
            resource_group: rg.name.clone(),
            location,
            tags: input.tags.unwrap_or_default(),
            properties: VaultProperties::create(props_in)?,
            created: now,
            updated: now,
            deleted_at: None,
            purge_at: None,
        };
        // The name is reserved first (two creates of one name cannot both commit) but the vault
        // is shown only once the store holds it: nobody reads, or writes into, a vault that a
        // failed commit then takes away.
        let _reserved = match writer {
            VaultWriter::Restore(Some(r)) if r.name == name => None,
            _ => Some(self.reserve_vault_name(&name)?),
        };
        self.store
            .insert_vault(&record)
            .await
            .map_err(|e| match e {
                // Another node of a shared store created this name first.
                kagi_store::StoreError::Conflict(_) => KvError::new(
                    ErrorCode::VaultAlreadyExists,
                    format!("The vault name '{name}' is already in use."),
                ),
                e => internal("create vault", e),
            })?;
        let state = VaultState::new(record.clone(), Vec::new());
        state.set_restoring(matches!(writer, VaultWriter::Restore(_)));
        self.vaults_write().insert(name.clone(), Arc::new(state));
        tracing::info!(vault = %name, "vault created");
        Ok((201, self.vault_json(&record)))
    }

    /// `PUT …/vaults/{name}/accessPolicies/{add|replace|remove}` (ARM's
    /// `Vaults_UpdateAccessPolicy`): changes the entries of the listed principals only, under
    /// the vault's write lock (two concurrent changes for different principals both land).
    /// `add` merges the listed permissions into the principal's entry (creating it), `replace`
    /// sets the entry's permissions to the listed ones, `remove` takes the listed permissions
    /// away and drops the entry once it grants nothing (or when the request lists none). An
    /// RBAC vault keeps its access policies, unused until it is switched back. Answers the
    /// vault's resulting access policies.
    pub async fn update_access_policy(
        &self,
        caller: &Principal,
        subscription: &str,
        resource_group: &str,
        name: &str,
        operation: &str,
        input: AccessPolicyInput,
    ) -> Result<Value, KvError> {
        let sub = self.authorize_arm(caller, subscription).await?;
        let op = PolicyOperation::parse(operation)?;
        let record = self.vault_in(&sub, resource_group, name)?;
        let state = self.vault_state(&record.name).ok_or_else(|| {
            not_found(
                ErrorCode::ResourceNotFound,
                format!(
                    "The Resource 'Microsoft.KeyVault/vaults/{}' was not found.",
                    record.name
                ),
            )
        })?;
        let _w = state.write.lock().await;
        if state.is_restoring() {
            return Err(crate::restore_in_progress(&record.name));
        }
        // Read again under the lock: the vault may have changed (or been deleted) meanwhile.
        let current = self.vault_in(&sub, resource_group, name)?;
        self.check_not_locked(&crate::directory::object_scope(&current, None), "write")?;
        let policies = apply_policy_change(
            &current.properties.access_policies,
            op,
            input.properties.access_policies,
        );
        let mut record = current.clone();
        record.properties = current
            .properties
            .update(kagi_core::vault::VaultPropertiesInput {
                access_policies: Some(policies),
                ..Default::default()
            })?;
        record.updated = self.clock.now();
        self.replace_vault(&record, &current, "update access policies")
            .await?;
        state.set_record(record.clone());
        tracing::info!(vault = %record.name, operation, "vault access policies changed");
        Ok(json!({
            "id": format!("{}/accessPolicies/{}", vault_id(&record), op.name()),
            "name": op.name(),
            "type": "Microsoft.KeyVault/vaults/accessPolicies",
            "location": record.location,
            "properties": {"accessPolicies": record.properties.access_policies},
        }))
    }

    /// Writes `record` over `current`, the record this change was computed from: when another
    /// node of a shared store changed the vault meanwhile, nothing is written, memory is read
    /// again from the store, and the client gets 409 to retry against what is there now.
    async fn replace_vault(
        &self,
        record: &VaultRecord,
        current: &VaultRecord,
        what: &str,
    ) -> Result<(), KvError> {
        match self.store.replace_vault(record, current).await {
            Ok(()) => Ok(()),
            Err(kagi_store::StoreError::Conflict(_)) => {
                // The caller holds the vault's write lock: refresh its record only.
                if let Ok(stored) = self.store.list_vaults().await
                    && let Some(state) = self.vault_state(&record.name)
                {
                    match stored.into_iter().find(|v| v.name == record.name) {
                        Some(fresh) => state.set_record(fresh),
                        None => {
                            self.vaults_write().remove(&record.name);
                        }
                    }
                }
                Err(KvError::conflict(format!(
                    "The vault '{}' was changed by another request meanwhile; read it again and \
                     retry.",
                    record.name
                )))
            }
            Err(e) => Err(internal(what, e)),
        }
    }

    /// Reserves `name` for a vault being created, or answers that it is taken. The
    /// reservation ends when the guard is dropped (after the vault is in the map, or on
    /// failure, or if the request is dropped).
    pub(crate) fn reserve_vault_name(
        &self,
        name: &VaultName,
    ) -> Result<VaultNameReservation<'_>, KvError> {
        let mut creating = self.vault_creates.lock().unwrap_or_else(|p| p.into_inner());
        if self.vault_state(name).is_some() || !creating.insert(name.clone()) {
            return Err(KvError::new(
                ErrorCode::VaultAlreadyExists,
                format!("The vault name '{name}' is already in use."),
            ));
        }
        Ok(VaultNameReservation {
            platform: self,
            name: name.clone(),
        })
    }

    /// `GET` of a vault.
    pub async fn get_vault(
        &self,
        caller: &Principal,
        subscription: &str,
        resource_group: &str,
        name: &str,
    ) -> Result<Value, KvError> {
        let sub = self.authorize_arm(caller, subscription).await?;
        let record = self.vault_in(&sub, resource_group, name)?;
        Ok(self.vault_json(&record))
    }

    pub(crate) fn vault_in(
        &self,
        sub: &SubscriptionId,
        resource_group: &str,
        name: &str,
    ) -> Result<VaultRecord, KvError> {
        let missing = || {
            not_found(
                ErrorCode::ResourceNotFound,
                format!(
                    "The Resource 'Microsoft.KeyVault/vaults/{}' under resource group '{}' was not found.",
                    kagi_core::ids::printable(name),
                    kagi_core::ids::printable(resource_group)
                ),
            )
        };
        let name = VaultName::parse(name).map_err(|_| missing())?;
        let record = self.vault_state(&name).ok_or_else(missing)?.record();
        if record.deleted_at.is_some()
            || record.subscription_id != sub.as_str()
            || !record.resource_group.eq_ignore_ascii_case(resource_group)
        {
            return Err(missing());
        }
        Ok(record)
    }

    /// Lists live vaults of a subscription, or of one resource group.
    pub async fn list_vaults(
        &self,
        caller: &Principal,
        subscription: &str,
        resource_group: Option<&str>,
    ) -> Result<Value, KvError> {
        let sub = self.authorize_arm(caller, subscription).await?;
        if let Some(rg) = resource_group {
            self.resource_group(&sub, rg).await?;
        }
        let mut value: Vec<Value> = self
            .all_vaults()
            .iter()
            .map(|v| v.record())
            .filter(|r| {
                r.deleted_at.is_none()
                    && r.subscription_id == sub.as_str()
                    && resource_group.is_none_or(|rg| r.resource_group.eq_ignore_ascii_case(rg))
            })
            .map(|r| self.vault_json(&r))
            .collect();
        value.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
        Ok(json!({ "value": value }))
    }

    /// `DELETE` of a vault: soft delete for its retention period. 200 when deleted, 204 when
    /// there was nothing to delete (ARM's idempotent answer).
    pub async fn delete_vault(
        &self,
        caller: &Principal,
        subscription: &str,
        resource_group: &str,
        name: &str,
    ) -> Result<u16, KvError> {
        let sub = self.authorize_arm(caller, subscription).await?;
        let Ok(record) = self.vault_in(&sub, resource_group, name) else {
            return Ok(204);
        };
        let Some(state) = self.vault_state(&record.name) else {
            return Ok(204);
        };
        let _w = state.write.lock().await;
        delete_refusal(&state)?;
        let mut record = state.record();
        let current = record.clone();
        if record.deleted_at.is_some() {
            return Ok(204);
        }
        self.check_not_locked(&crate::directory::object_scope(&record, None), "delete")?;
        let now = self.clock.now();
        record.deleted_at = Some(now);
        record.purge_at =
            Some(now + i64::from(record.properties.soft_delete_retention_in_days) * DAY);
        record.updated = now;
        self.replace_vault(&record, &current, "delete vault")
            .await?;
        state.set_record(record.clone());
        tracing::info!(vault = %record.name, "vault soft-deleted");
        Ok(200)
    }

    /// `GET /subscriptions/{sub}/providers/Microsoft.KeyVault/deletedVaults`.
    pub async fn list_deleted_vaults(
        &self,
        caller: &Principal,
        subscription: &str,
    ) -> Result<Value, KvError> {
        let sub = self.authorize_arm(caller, subscription).await?;
        let mut value: Vec<Value> = self
            .all_vaults()
            .iter()
            .map(|v| v.record())
            .filter(|r| r.deleted_at.is_some() && r.subscription_id == sub.as_str())
            .map(|r| deleted_vault_json(&r))
            .collect();
        value.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
        Ok(json!({ "value": value }))
    }

    fn deleted_vault_in(
        &self,
        sub: &SubscriptionId,
        location: &str,
        name: &str,
    ) -> Result<(Arc<VaultState>, VaultRecord), KvError> {
        let missing = || {
            not_found(
                ErrorCode::ResourceNotFound,
                format!(
                    "The deleted vault '{}' was not found.",
                    kagi_core::ids::printable(name)
                ),
            )
        };
        let name = VaultName::parse(name).map_err(|_| missing())?;
        let state = self.vault_state(&name).ok_or_else(missing)?;
        let r = state.record();
        if r.deleted_at.is_none()
            || r.subscription_id != sub.as_str()
            || !r.location.eq_ignore_ascii_case(&location.replace(' ', ""))
        {
            return Err(missing());
        }
        Ok((state, r))
    }

    /// `GET .../locations/{location}/deletedVaults/{name}`.
    pub async fn get_deleted_vault(
        &self,
        caller: &Principal,
        subscription: &str,
        location: &str,
        name: &str,
    ) -> Result<Value, KvError> {
        let sub = self.authorize_arm(caller, subscription).await?;
        Ok(deleted_vault_json(
            &self.deleted_vault_in(&sub, location, name)?.1,
        ))
    }

    /// `POST .../locations/{location}/deletedVaults/{name}/purge`; refused under purge
    /// protection until the retention period has ended.
    pub async fn purge_deleted_vault(
        &self,
        caller: &Principal,
        subscription: &str,
        location: &str,
        name: &str,
    ) -> Result<u16, KvError> {
        let sub = self.authorize_arm(caller, subscription).await?;
        let (state, _) = self.deleted_vault_in(&sub, location, name)?;
        let _w = state.write.lock().await;
        let r = state.record();
        self.check_not_locked(&crate::directory::object_scope(&r, None), "delete")?;
        if r.deleted_at.is_none() {
            return Err(KvError::conflict(format!(
                "Vault '{}' is not deleted.",
                r.name
            )));
        }
        if r.properties.enable_purge_protection && r.purge_at.is_some_and(|t| self.clock.now() < t)
        {
            return Err(KvError::conflict(format!(
                "Operation 'purge' is not allowed on vault '{}' because purge protection is \
                 enabled. The vault will be purged automatically on {}.",
                r.name,
                rfc3339(r.purge_at.unwrap_or_default())
            ))
            .with_inner("PurgeProtectionEnabled"));
        }
        self.store
            .purge_vault(&r.name)
            .await
            .map_err(|e| internal("purge vault", e))?;
        let removed = self.vaults_write().remove(&r.name);
        if let Some(state) = removed {
            self.destroy_vault_key_objects(&state);
        }
        tracing::info!(vault = %r.name, "vault purged");
        Ok(200)
    }

    /// `GET /subscriptions/{sub}[/resourceGroups/{rg}]/resources[?$filter=…]`: ARM's generic
    /// resource list (id, name, type, location, tags) of the live vaults and the
    /// identity-carrying resources (managed identities, workloads, and the storage services'
    /// resources that carry one), filtered on `resourceType`, `name`, `location` and
    /// `resourceGroup` (the az CLI's `az keyvault list` and `az keyvault show` without a
    /// resource group ask `resourceType eq 'Microsoft.KeyVault/vaults' [and name eq '…']`).
    ///
    /// # Errors
    /// 400 `InvalidFilterInQueryString` for a filter outside that subset; 404 for an
    /// unknown subscription or resource group.
    pub async fn list_resources(
        &self,
        caller: &Principal,
        subscription: &str,
        resource_group: Option<&str>,
        filter: Option<&str>,
    ) -> Result<Value, KvError> {
        use kagi_core::odata::{FieldValue, Filter};
        let sub = self.authorize_arm(caller, subscription).await?;
        if let Some(rg) = resource_group {
            self.resource_group(&sub, rg).await?;
        }
        let invalid = |m: String| {
            KvError::new(
                ErrorCode::BadRequest,
                format!(
                    "Invalid $filter '{}' specified in the query string: {m}",
                    kagi_core::ids::printable(filter.unwrap_or_default())
                ),
            )
            .with_inner("InvalidFilterInQueryString")
        };
        let filter = filter
            .map(|f| Filter::parse(f).map_err(|e| invalid(e.0)))
            .transpose()?;
        const FIELDS: &[&str] = &["resourcetype", "name", "location", "resourcegroup"];
        if let Some(bad) = filter
            .as_ref()
            .and_then(|f| f.fields().into_iter().find(|n| !FIELDS.contains(n)))
        {
            return Err(invalid(format!(
                "kagi filters on resourceType, name, location and resourceGroup, not '{}'.",
                kagi_core::ids::printable(bad)
            )));
        }
        // (resource group, generic resource) of every live resource of the subscription.
        let mut all: Vec<(String, Value)> = self
            .all_vaults()
            .iter()
            .map(|v| v.record())
            .filter(|r| r.deleted_at.is_none() && r.subscription_id == sub.as_str())
            .map(|r| {
                let v = self.vault_json(&r);
                (r.resource_group.clone(), generic_resource(&v))
            })
            .collect();
        all.extend(
            self.dir()
                .resources
                .values()
                .filter(|(r, _)| r.subscription_id.eq_ignore_ascii_case(sub.as_str()))
                .map(|(r, body)| (r.resource_group.clone(), generic_resource(body))),
        );
        let mut value: Vec<Value> = all
            .into_iter()
            .filter(|(rg, _)| resource_group.is_none_or(|want| rg.eq_ignore_ascii_case(want)))
            .filter(|(rg, v)| {
                filter.as_ref().is_none_or(|f| {
                    f.matches(&|name| {
                        Some(FieldValue::One(match name {
                            "resourcetype" => v["type"].as_str()?,
                            "name" => v["name"].as_str()?,
                            "location" => v["location"].as_str()?,
                            "resourcegroup" => rg.as_str(),
                            _ => return None,
                        }))
                    })
                })
            })
            .map(|(_, v)| v)
            .collect();
        value.sort_by(|a, b| {
            a["id"]
                .as_str()
                .map(str::to_ascii_lowercase)
                .cmp(&b["id"].as_str().map(str::to_ascii_lowercase))
        });
        Ok(json!({ "value": value }))
    }

    /// `GET …/providers/Microsoft.KeyVault/managedHSMs` and `…/deletedManagedHSMs`: kagi
    /// serves no managed HSM pools, so the list is empty once the caller may read the
    /// subscription.
    ///
    /// # Errors
    /// As any ARM read of the subscription (404 unknown, 403 not allowed).
    pub async fn list_managed_hsms(
        &self,
        caller: &Principal,
        subscription: &str,
    ) -> Result<Value, KvError> {
        self.authorize_arm(caller, subscription).await?;
        Ok(json!({ "value": [] }))
    }

    /// The ARM resource id of a vault (live or soft-deleted), for audit records; `None` for
    /// a name that is not a vault.
    pub fn vault_resource_id(&self, vault: &str) -> Option<String> {
        self.vault_audit_info(vault).map(|(id, _)| id)
    }

    /// The ARM resource id of a vault and whether it authorizes with RBAC
    /// (`enableRbacAuthorization`), read together for audit records.
    pub fn vault_audit_info(&self, vault: &str) -> Option<(String, bool)> {
        let name = VaultName::parse(vault).ok()?;
        let r = self.vault_state(&name)?.record();
        Some((vault_id(&r), r.properties.enable_rbac_authorization))
    }

    fn vault_json(&self, r: &VaultRecord) -> Value {
        let mut props = serde_json::to_value(&r.properties).unwrap_or_else(|_| json!({}));
        props["vaultUri"] = json!(self.config.vault_uri(&r.name));
        props["provisioningState"] = json!("Succeeded");
        json!({
            "id": vault_id(r),
            "name": r.name.as_str(),
            "type": "Microsoft.KeyVault/vaults",
            "location": r.location,
            "tags": r.tags,
            "systemData": {
                "createdAt": rfc3339(r.created),
                "lastModifiedAt": rfc3339(r.updated),
            },
            "properties": props,
        })
    }
}

/// Why a vault may not be deleted now: a whole-vault restore is writing into it. Its `DELETE`
/// and a resource group's deletion ask.
fn delete_refusal(state: &VaultState) -> Result<(), KvError> {
    if state.is_restoring() {
        return Err(crate::restore_in_progress(&state.record().name));
    }
    Ok(())
}

/// What a resource group's deletion deletes, found by [`Platform::resource_group_deletion`]:
/// the storage services' resources, which their providers delete (the HTTP layer asks them),
/// and the platform's own (key vaults, user-assigned identities, workloads, action groups and
/// activity log alerts), which [`Platform::finish_resource_group_deletion`] deletes with the
/// group.
#[derive(Clone, Debug)]
pub struct GroupDeletion {
    /// The subscription.
    pub subscription: String,
    /// The group's name as created.
    pub name: String,
    /// The storage services' resources in it: (id as stored, type), by id.
    pub service_resources: Vec<(String, String)>,
    /// The lower-case id of every resource it deletes.
    pub ids: Vec<String>,
    /// The platform's own refusals (a vault being restored into): (resource id, why).
    pub refusals: Vec<(String, KvError)>,
    /// Its live key vaults.
    key_vaults: Vec<VaultName>,
    /// Its user-assigned identities and workloads: (type, name).
    identity_resources: Vec<(String, String)>,
    /// Its action groups and activity log alerts (lower-case ids).
    monitor_resources: Vec<String>,
}

impl GroupDeletion {
    /// `/subscriptions/{s}/resourceGroups/{g}`.
    pub fn id(&self) -> String {
        format!(
            "/subscriptions/{}/resourceGroups/{}",
            self.subscription, self.name
        )
    }
}

impl Platform {
    /// The first step of `DELETE /subscriptions/{s}/resourcegroups/{g}`: the caller may
    /// delete it (403 `AuthorizationFailed`), it exists (404 `ResourceGroupNotFound`), no lock
    /// at, above or below it (409 `ScopeLocked`); then what it holds, with the platform's own
    /// refusals. Nothing changes.
    ///
    /// # Errors
    /// Those above, and 5xx for a store failure.
    pub async fn resource_group_deletion(
        &self,
        caller: &Principal,
        subscription: &str,
        name: &str,
    ) -> Result<GroupDeletion, KvError> {
        let sub = self.authorize_arm(caller, subscription).await?;
        let rg = self.resource_group(&sub, name).await?;
        let scope = format!("/subscriptions/{sub}/resourcegroups/{}", rg.name).to_ascii_lowercase();
        self.check_not_locked_within(&scope)?;
        let in_group = |s: &str, g: &str| {
            s.eq_ignore_ascii_case(sub.as_str()) && g.eq_ignore_ascii_case(&rg.name)
        };
        let mut plan = GroupDeletion {
            subscription: sub.to_string(),
            name: rg.name.clone(),
            service_resources: Vec::new(),
            ids: Vec::new(),
            refusals: Vec::new(),
            key_vaults: Vec::new(),
            identity_resources: Vec::new(),
            monitor_resources: Vec::new(),
        };
        for state in self.all_vaults() {
            let r = state.record();
            if r.deleted_at.is_some() || !in_group(&r.subscription_id, &r.resource_group) {
                continue;
            }
            let id = vault_id(&r);
            if let Err(e) = delete_refusal(&state) {
                plan.refusals.push((id.clone(), e));
            }
            plan.ids.push(id.to_ascii_lowercase());
            plan.key_vaults.push(r.name.clone());
        }
        let mut resources: Vec<(String, String, String)> = self
            .dir()
            .resources
            .values()
            .filter(|(r, _)| in_group(&r.subscription_id, &r.resource_group))
            .map(|(r, body)| {
                let id = body["id"].as_str().unwrap_or(&r.id).to_string();
                (id, r.resource_type.clone(), r.name.clone())
            })
            .collect();
        resources.sort();
        for (id, ty, name) in resources {
            plan.ids.push(id.to_ascii_lowercase());
            if crate::directory::is_identity_type(&ty) {
                plan.identity_resources.push((ty, name));
            } else {
                plan.service_resources.push((id, ty));
            }
        }
        for kind in [
            kagi_core::alert::MonitorKind::ActionGroup,
            kagi_core::alert::MonitorKind::ActivityLogAlert,
        ] {
            let ty = kind.id_type().to_ascii_lowercase();
            let all = self
                .store
                .list_monitor_resources(&ty, Some(sub.as_str()))
                .await
                .map_err(|e| internal("list monitor resources", e))?;
            for m in all
                .into_iter()
                .filter(|m| m.resource_group.eq_ignore_ascii_case(&rg.name))
            {
                plan.ids.push(m.id.clone());
                plan.monitor_resources.push(m.id);
            }
        }
        Ok(plan)
    }

    /// The last step of a resource group's deletion, once the storage services' resources in
    /// it are gone: its key vaults (soft-deleted, recoverable for their retention period, as
    /// Azure's group deletion leaves them), action groups and activity log alerts,
    /// user-assigned identities and workloads, then the group with the role and policy
    /// assignments at or below it (one store transaction, refused while anything is left in
    /// the group: something created meanwhile).
    ///
    /// # Errors
    /// The resource that could not be deleted (its id: the group's own for the last step) and
    /// why; what was deleted before stays deleted, and the group stays.
    pub async fn finish_resource_group_deletion(
        &self,
        caller: &Principal,
        plan: &GroupDeletion,
    ) -> Result<(), (String, KvError)> {
        let (sub, rg) = (plan.subscription.as_str(), plan.name.as_str());
        for name in &plan.key_vaults {
            let id = format!(
                "/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.KeyVault/vaults/{name}"
            );
            self.delete_vault(caller, sub, rg, name.as_str())
                .await
                .map_err(|e| (id, e))?;
        }
        for id in &plan.monitor_resources {
            self.check_not_locked(id, "delete")
                .map_err(|e| (id.clone(), e))?;
            self.store
                .delete_monitor_resource(id)
                .await
                .map_err(|e| (id.clone(), internal("delete monitor resource", e)))?;
        }
        for (ty, name) in &plan.identity_resources {
            let id = format!("/subscriptions/{sub}/resourceGroups/{rg}/providers/{ty}/{name}");
            self.delete_identity_resource(caller, sub, rg, ty, name)
                .await
                .map_err(|e| (id, e))?;
        }
        let group = plan.id();
        let scope = group.to_ascii_lowercase();
        match self.store.delete_resource_group(sub, rg).await {
            Ok(_) => {}
            Err(kagi_store::StoreError::Conflict(m)) => {
                return Err((
                    group,
                    KvError::conflict(format!(
                        "The resource group '{rg}' was not deleted: something was created or \
                         locked in it while it was being deleted ({m})."
                    ))
                    .with_inner("ResourceGroupNotEmpty"),
                ));
            }
            Err(e) => return Err((group, internal("delete resource group", e))),
        }
        let below = format!("{scope}/");
        self.dir_mut()
            .assignments
            .retain(|a| a.scope != scope && !a.scope.starts_with(&below));
        tracing::info!(group = %plan.id(), "resource group deleted");
        Ok(())
    }
}

/// ARM's generic resource (`GET …/resources`) of a resource's own body.
fn generic_resource(body: &Value) -> Value {
    let mut v = json!({
        "id": body["id"],
        "name": body["name"],
        "type": body["type"],
        "location": body["location"],
        "tags": body.get("tags").cloned().unwrap_or_else(|| json!({})),
    });
    for k in ["kind", "sku", "identity"] {
        if let Some(x) = body.get(k).filter(|x| !x.is_null()) {
            v[k] = x.clone();
        }
    }
    v
}

fn rg_json(r: &ResourceGroupRecord) -> Value {
    json!({
        "id": format!("/subscriptions/{}/resourceGroups/{}", r.subscription_id, r.name),
        "name": r.name,
        "type": "Microsoft.Resources/resourceGroups",
        "location": r.location,
        "tags": r.tags,
        "properties": {"provisioningState": "Succeeded"},
    })
}

fn deleted_vault_json(r: &VaultRecord) -> Value {
    json!({
        "id": format!(
            "/subscriptions/{}/providers/Microsoft.KeyVault/locations/{}/deletedVaults/{}",
            r.subscription_id, r.location, r.name
        ),
        "name": r.name.as_str(),
        "type": "Microsoft.KeyVault/deletedVaults",
        "properties": {
            "vaultId": vault_id(r),
            "location": r.location,
            "deletionDate": rfc3339(r.deleted_at.unwrap_or_default()),
            "scheduledPurgeDate": rfc3339(r.purge_at.unwrap_or_default()),
            "tags": r.tags,
            "purgeProtectionEnabled": r.properties.enable_purge_protection,
        },
    })
}

/// Who writes a vault: a client, or a whole-vault restore (with the name it reserved when it
/// creates the vault).
#[derive(Clone, Copy)]
pub(crate) enum VaultWriter<'a> {
    /// Anyone, through the management API.
    Client,
    /// A restore (`crate::vault_backup`).
    Restore(Option<&'a VaultNameReservation<'a>>),
}

/// A vault name held for a create in progress (see `Platform::reserve_vault_name`).
pub(crate) struct VaultNameReservation<'a> {
    platform: &'a Platform,
    name: VaultName,
}

impl Drop for VaultNameReservation<'_> {
    fn drop(&mut self) {
        self.platform
            .vault_creates
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.name);
    }
}

/// Body of `PUT …/accessPolicies/{operationKind}` (`VaultAccessPolicyParameters`).
#[derive(Debug, Deserialize)]
pub struct AccessPolicyInput {
    /// `properties`.
    pub properties: AccessPolicyProperties,
}

/// `properties` of [`AccessPolicyInput`].
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AccessPolicyProperties {
    /// The entries to add, replace or remove.
    pub access_policies: Vec<AccessPolicyEntry>,
}

/// ARM's `operationKind` of an access policy update.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PolicyOperation {
    Add,
    Replace,
    Remove,
}

impl PolicyOperation {
    fn parse(s: &str) -> Result<Self, KvError> {
        match s.to_ascii_lowercase().as_str() {
            "add" => Ok(Self::Add),
            "replace" => Ok(Self::Replace),
            "remove" => Ok(Self::Remove),
            _ => Err(KvError::new(
                ErrorCode::BadRequest,
                format!(
                    "The operation kind '{}' is not valid: it must be add, replace or remove.",
                    kagi_core::ids::printable(s)
                ),
            )),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Add => "add",
            Self::Replace => "replace",
            Self::Remove => "remove",
        }
    }
}

/// Whether two entries name the same principal (and the same application, for compound
/// identities).
fn same_principal(a: &AccessPolicyEntry, b: &AccessPolicyEntry) -> bool {
    a.tenant_id.eq_ignore_ascii_case(&b.tenant_id)
        && a.object_id.eq_ignore_ascii_case(&b.object_id)
        && match (&a.application_id, &b.application_id) {
            (None, None) => true,
            (Some(x), Some(y)) => x.eq_ignore_ascii_case(y),
            _ => false,
        }
}

/// The permission lists of an entry, one per kind, for merging.
fn lists(p: &mut Permissions) -> [&mut Option<Vec<String>>; 4] {
    [
        &mut p.keys,
        &mut p.secrets,
        &mut p.certificates,
        &mut p.storage,
    ]
}

fn lists_of(p: &Permissions) -> [&Option<Vec<String>>; 4] {
    [&p.keys, &p.secrets, &p.certificates, &p.storage]
}

fn grants_nothing(p: &Permissions) -> bool {
    lists_of(p)
        .iter()
        .all(|l| l.as_ref().is_none_or(Vec::is_empty))
}

/// The access policies after one `add`, `replace` or `remove` of `changes`.
fn apply_policy_change(
    current: &[AccessPolicyEntry],
    op: PolicyOperation,
    changes: Vec<AccessPolicyEntry>,
) -> Vec<AccessPolicyEntry> {
    let mut out = current.to_vec();
    for change in changes {
        let pos = out.iter().position(|e| same_principal(e, &change));
        match (op, pos) {
            (PolicyOperation::Add | PolicyOperation::Replace, None) => out.push(change),
            (PolicyOperation::Replace, Some(i)) => out[i].permissions = change.permissions,
            (PolicyOperation::Add, Some(i)) => {
                let target = &mut out[i].permissions;
                for (have, add) in lists(target).into_iter().zip(lists_of(&change.permissions)) {
                    for name in add.iter().flatten() {
                        let list = have.get_or_insert_with(Vec::new);
                        if !list.iter().any(|n| n.eq_ignore_ascii_case(name)) {
                            list.push(name.clone());
                        }
                    }
                }
            }
            (PolicyOperation::Remove, Some(i)) => {
                if grants_nothing(&change.permissions) {
                    out.remove(i);
                    continue;
                }
                let target = &mut out[i].permissions;
                for (have, drop) in lists(target).into_iter().zip(lists_of(&change.permissions)) {
                    if let Some(list) = have.as_mut() {
                        list.retain(|n| !drop.iter().flatten().any(|d| d.eq_ignore_ascii_case(n)));
                    }
                }
                if grants_nothing(&out[i].permissions) {
                    out.remove(i);
                }
            }
            (PolicyOperation::Remove, None) => {}
        }
    }
    out
}

#[cfg(test)]
mod access_policy_tests {
    use super::*;

    const T: &str = "72f988bf-86f1-41af-91ab-2d7cd011db47";
    const O: &str = "11111111-2222-4333-8444-555555555555";

    fn entry(keys: &[&str], secrets: &[&str]) -> AccessPolicyEntry {
        let l = |v: &[&str]| (!v.is_empty()).then(|| v.iter().map(|s| s.to_string()).collect());
        AccessPolicyEntry {
            tenant_id: T.into(),
            object_id: O.into(),
            application_id: None,
            permissions: Permissions {
                keys: l(keys),
                secrets: l(secrets),
                ..Default::default()
            },
        }
    }

    #[test]
    fn add_merges_into_the_entry_without_duplicates() {
        let out = apply_policy_change(
            &[entry(&["get"], &[])],
            PolicyOperation::Add,
            vec![entry(&["Get", "wrapKey"], &["get"])],
        );
        assert_eq!(out.len(), 1);
        assert_eq!(
            out[0].permissions.keys.as_deref(),
            Some(&["get".to_string(), "wrapKey".to_string()][..])
        );
        assert_eq!(
            out[0].permissions.secrets.as_deref(),
            Some(&["get".to_string()][..])
        );
    }

    #[test]
    fn add_and_replace_create_a_missing_entry() {
        for op in [PolicyOperation::Add, PolicyOperation::Replace] {
            let out = apply_policy_change(&[], op, vec![entry(&["get"], &[])]);
            assert_eq!(out, vec![entry(&["get"], &[])]);
        }
    }

    #[test]
    fn replace_sets_the_permissions() {
        let out = apply_policy_change(
            &[entry(&["get", "list"], &["get"])],
            PolicyOperation::Replace,
            vec![entry(&["sign"], &[])],
        );
        assert_eq!(out, vec![entry(&["sign"], &[])]);
    }

    #[test]
    fn remove_takes_permissions_then_the_empty_entry() {
        let start = [entry(&["get", "list"], &["get"])];
        let out = apply_policy_change(&start, PolicyOperation::Remove, vec![entry(&["LIST"], &[])]);
        assert_eq!(
            out[0].permissions.keys.as_deref(),
            Some(&["get".to_string()][..])
        );
        let out = apply_policy_change(
            &out,
            PolicyOperation::Remove,
            vec![entry(&["get"], &["get"])],
        );
        assert!(out.is_empty());
        let out = apply_policy_change(&start, PolicyOperation::Remove, vec![entry(&[], &[])]);
        assert!(
            out.is_empty(),
            "an entry listing no permissions removes the whole entry"
        );
    }

    #[test]
    fn other_principals_and_compound_entries_are_untouched() {
        let mut other = entry(&["get"], &[]);
        other.object_id = "22222222-2222-4333-8444-555555555555".into();
        let mut compound = entry(&["get"], &[]);
        compound.application_id = Some("33333333-2222-4333-8444-555555555555".into());
        let out = apply_policy_change(
            &[other.clone(), compound.clone()],
            PolicyOperation::Remove,
            vec![entry(&[], &[])],
        );
        assert_eq!(out, vec![other, compound]);
    }

    #[test]
    fn operation_kinds() {
        assert_eq!(
            PolicyOperation::parse("ADD").ok(),
            Some(PolicyOperation::Add)
        );
        assert!(PolicyOperation::parse("merge").is_err());
    }
}
