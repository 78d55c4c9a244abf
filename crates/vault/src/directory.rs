//! The parts of the directory not yet in `kagi-directory`: managed identities (system- and
//! user-assigned), the resources that carry them, workload bindings and managed-identity
//! tokens, role definitions and assignments (RBAC), management locks, and the vault firewall
//! and access decision.
//!
//! They work on the directory's in-memory state ([`kagi_directory::State`], loaded at start,
//! written through to the store first), so an authorization decision reads no database and a
//! change applies to the very next request.

use std::net::IpAddr;

use kagi_core::access::{Caller, DataAction};
use kagi_core::ids::uuid_v4;
use kagi_core::rbac::{Scope, data_action};
use kagi_core::time::rfc3339;
use kagi_core::{ErrorCode, KvError, ResourceGroupName, SubscriptionId};
use kagi_directory::{TokenGrant, bad, new_secret, random16};
use kagi_identity::Principal;
use kagi_store::directory::BindingRecord;
use kagi_store::{PrincipalRecord, ResourceRecord, RoleAssignmentRecord, VaultRecord};
use serde_json::{Value, json};

use crate::{Platform, internal};

/// Kinds of principal (kept in `kagi-identity`, which tokens and the directory both use).
pub use kagi_directory::kind;

const UAMI_TYPE: &str = "Microsoft.ManagedIdentity/userAssignedIdentities";
/// A process that acts as a resource (an app, a VM): it exists to carry managed identities.
pub const WORKLOAD_TYPE: &str = "Kagi.Compute/workloads";

/// Whether resources of `resource_type` (any case) are the platform's own identity-carrying
/// resources (user-assigned identities and workloads) rather than a storage service's.
pub(crate) fn is_identity_type(resource_type: &str) -> bool {
    resource_type.eq_ignore_ascii_case(UAMI_TYPE)
        || resource_type.eq_ignore_ascii_case(WORKLOAD_TYPE)
}

/// The scope of a vault object (`{vault id}/keys/{name}`), or the vault itself.
pub(crate) fn object_scope(vault: &VaultRecord, object: Option<(&str, &str)>) -> String {
    let base = format!(
        "/subscriptions/{}/resourcegroups/{}/providers/microsoft.keyvault/vaults/{}",
        vault.subscription_id, vault.resource_group, vault.name
    )
    .to_ascii_lowercase();
    match object {
        Some((collection, name)) => format!("{base}/{collection}/{}", name.to_ascii_lowercase()),
        None => base,
    }
}

impl Platform {
    pub(crate) fn dir(&self) -> std::sync::RwLockReadGuard<'_, kagi_directory::State> {
        self.directory.state()
    }

    pub(crate) fn dir_mut(&self) -> std::sync::RwLockWriteGuard<'_, kagi_directory::State> {
        self.directory.state_mut()
    }

    pub(crate) fn require_admin(&self, caller: &Principal) -> Result<(), KvError> {
        self.directory.require_admin(caller)
    }

    // ----- resources with identities -----

    pub(crate) async fn check_group(
        &self,
        caller: &Principal,
        sub: &str,
        rg: &str,
    ) -> Result<(SubscriptionId, ResourceGroupName), KvError> {
        self.require_admin(caller)?;
        let sub = SubscriptionId::parse(sub)?;
        let rg_name = ResourceGroupName::parse(rg)?;
        let found = self
            .store
            .get_resource_group(sub.as_str(), rg_name.as_str())
            .await
            .map_err(|e| internal("get resource group", e))?
            .ok_or_else(|| {
                KvError::new(
                    ErrorCode::ResourceGroupNotFound,
                    format!("Resource group '{rg_name}' could not be found."),
                )
            })?;
        Ok((sub, ResourceGroupName::parse(&found.name)?))
    }

    /// `PUT` of a user-assigned identity or a workload: creates or updates the resource and
    /// its identities. Returns (status, body).
    pub async fn put_identity_resource(
        &self,
        caller: &Principal,
        sub: &str,
        rg: &str,
        resource_type: &str,
        name: &str,
        input: Value,
    ) -> Result<(u16, Value), KvError> {
        let (sub, rg) = self.check_group(caller, sub, rg).await?;
        let type_canonical = if resource_type.eq_ignore_ascii_case(UAMI_TYPE) {
            UAMI_TYPE
        } else if resource_type.eq_ignore_ascii_case(WORKLOAD_TYPE) {
            WORKLOAD_TYPE
        } else {
            return Err(KvError::new(
                ErrorCode::NotFound,
                format!("Resource type '{resource_type}' is not served."),
            ));
        };
        if name.is_empty()
            || name.len() > 128
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_".contains(c))
        {
            return Err(bad(
                "Resource names are 1-128 letters, digits, '-' and '_'.",
            ));
        }
        let id =
            format!("/subscriptions/{sub}/resourceGroups/{rg}/providers/{type_canonical}/{name}");
        let key = id.to_ascii_lowercase();
        let now = self.clock.now();
        let existing = self.dir().resources.get(&key).cloned();
        let location = match (input.get("location").and_then(Value::as_str), &existing) {
            (Some(l), Some((r, _))) if !l.eq_ignore_ascii_case(&r.location) => {
                return Err(bad(format!(
                    "The location of '{name}' cannot change from '{}'.",
                    r.location
                )));
            }
            (_, Some((r, _))) => r.location.clone(),
            (Some(l), None) => l.to_ascii_lowercase().replace(' ', ""),
            (None, None) => return Err(bad("The property \"location\" is required.")),
        };
        let tags = input.get("tags").cloned().unwrap_or_else(|| {
            existing
                .as_ref()
                .map(|(_, b)| b["tags"].clone())
                .unwrap_or_else(|| json!({}))
        });
        let mut body = json!({
            "id": id, "name": name, "type": type_canonical, "location": location, "tags": tags,
        });
        let mut created = Vec::new();
        let mut deleted = Vec::new();
        if type_canonical == UAMI_TYPE {
            let p = match existing
                .as_ref()
                .and_then(|(_, b)| b["properties"]["principalId"].as_str())
            {
                Some(oid) => self
                    .dir()
                    .principals
                    .get(oid)
                    .cloned()
                    .ok_or_else(|| internal("uami", "principal missing"))?,
                None => {
                    let p = PrincipalRecord {
                        object_id: uuid_v4(random16()?),
                        // An identity belongs to its subscription's tenant, whichever tenant
                        // the administrator's token names.
                        tenant_id: self.tenant_for_resource(&key, caller),
                        client_id: uuid_v4(random16()?),
                        display_name: name.to_string(),
                        secret_hash: Vec::new(),
                        kind: kind::USER_ASSIGNED.into(),
                        created: now,
                        resource_id: Some(key.clone()),
                    };
                    created.push(p.clone());
                    p
                }
            };
            body["properties"] = json!({"tenantId": p.tenant_id, "principalId": p.object_id, "clientId": p.client_id});
        } else {
            let old_identity = existing
                .as_ref()
                .map(|(_, b)| b["identity"].clone())
                .unwrap_or(Value::Null);
            let (identity, new_p, gone) = self.apply_identity(
                caller,
                &key,
                name,
                &old_identity,
                input.get("identity"),
                now,
            )?;
            body["identity"] = identity;
            body["properties"] = json!({"provisioningState": "Succeeded"});
            created.extend(new_p);
            deleted.extend(gone);
        }
        let record = ResourceRecord {
            id: key.clone(),
            resource_type: type_canonical.into(),
            subscription_id: sub.to_string(),
            resource_group: rg.to_string(),
            name: name.to_string(),
            location,
            body: body.to_string(),
            created: existing.as_ref().map_or(now, |(r, _)| r.created),
            updated: now,
        };
        self.commit_resource(record, body.clone(), created, &deleted)
            .await?;
        tracing::info!(resource = %id, "resource written");
        Ok((if existing.is_some() { 200 } else { 201 }, body))
    }

    /// Stores a resource together with the identities it gained and lost (one transaction),
    /// then applies the same to the in-memory directory.
    pub(crate) async fn commit_resource(
        &self,
        record: ResourceRecord,
        body: Value,
        created: Vec<PrincipalRecord>,
        deleted: &[String],
    ) -> Result<(), KvError> {
        self.store
            .put_resource(&record, &created, deleted)
            .await
            .map_err(|e| internal("put resource", e))?;
        let mut d = self.dir_mut();
        for p in created {
            d.principals.insert(p.object_id.clone(), p);
        }
        for oid in deleted {
            d.principals.remove(oid);
        }
        d.resources.insert(record.id.clone(), (record, body));
        Ok(())
    }

    /// Applies an `identity` block to a resource: creates the system-assigned identity when it
    /// is turned on, deletes it when turned off (refused while it is in use), and resolves the
    /// user-assigned identities named. Reusable by every resource type that carries identities.
    pub(crate) fn apply_identity(
        &self,
        caller: &Principal,
        resource_key: &str,
        name: &str,
        old: &Value,
        input: Option<&Value>,
        now: i64,
    ) -> Result<(Value, Vec<PrincipalRecord>, Vec<String>), KvError> {
        let Some(input) = input else {
            return Ok((
                if old.is_null() {
                    json!({"type": "None"})
                } else {
                    old.clone()
                },
                vec![],
                vec![],
            ));
        };
        let ty = input
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("None")
            .replace(' ', "")
            .to_ascii_lowercase();
        let (system, user) = match ty.as_str() {
            "none" => (false, false),
            "systemassigned" => (true, false),
            "userassigned" => (false, true),
            "systemassigned,userassigned" => (true, true),
            _ => {
                return Err(bad(
                    "identity.type must be None, SystemAssigned, UserAssigned or 'SystemAssigned, UserAssigned'.",
                ));
            }
        };
        let mut created = Vec::new();
        let mut deleted = Vec::new();
        let old_system = old
            .get("principalId")
            .and_then(Value::as_str)
            .map(str::to_string);
        let system_oid = match (system, old_system) {
            (true, Some(oid)) => Some(oid),
            (true, None) => {
                let p = PrincipalRecord {
                    object_id: uuid_v4(random16()?),
                    tenant_id: self.tenant_for_resource(resource_key, caller),
                    client_id: uuid_v4(random16()?),
                    display_name: name.to_string(),
                    secret_hash: Vec::new(),
                    kind: kind::SYSTEM_ASSIGNED.into(),
                    created: now,
                    resource_id: Some(resource_key.to_string()),
                };
                let oid = p.object_id.clone();
                created.push(p);
                Some(oid)
            }
            (false, Some(oid)) => {
                // An identity left behind by a tenant move is already broken (ID-3): turning it
                // off is how it is replaced, whatever still names it.
                let principal = self.dir().principals.get(&oid).cloned();
                let stale = principal
                    .is_some_and(|p| self.identity_tenant_problem(&p, resource_key).is_some());
                if let Some(usage) = self.principal_usage(&oid).filter(|_| !stale) {
                    return Err(KvError::conflict(format!(
                        "The system-assigned identity {oid} of '{name}' is in use ({usage}). \
                         Turning it off would break that access; remove the grant first, or keep \
                         the identity."
                    ))
                    .with_inner("SystemAssignedIdentityInUse"));
                }
                deleted.push(oid);
                None
            }
            (false, None) => None,
        };
        let mut uas = serde_json::Map::new();
        if user {
            let named = input
                .get("userAssignedIdentities")
                .and_then(Value::as_object)
                .filter(|m| !m.is_empty())
                .ok_or_else(|| {
                    bad("identity.userAssignedIdentities must name at least one identity.")
                })?;
            let d = self.dir();
            for id in named.keys() {
                let (_, body) = d
                    .resources
                    .get(&id.to_ascii_lowercase())
                    .filter(|(r, _)| r.resource_type == UAMI_TYPE)
                    .ok_or_else(|| {
                        bad(format!(
                            "User-assigned identity '{}' does not exist.",
                            kagi_core::ids::printable(id)
                        ))
                    })?;
                uas.insert(
                    body["id"].as_str().unwrap_or(id).to_string(),
                    json!({"principalId": body["properties"]["principalId"], "clientId": body["properties"]["clientId"]}),
                );
            }
        }
        let type_name = match (system, user) {
            (true, true) => "SystemAssigned, UserAssigned",
            (true, false) => "SystemAssigned",
            (false, true) => "UserAssigned",
            (false, false) => "None",
        };
        let mut identity = json!({"type": type_name});
        if let Some(oid) = system_oid {
            // The identity's own tenant: after a tenant move it differs from the subscription's.
            let tenant = created
                .iter()
                .chain(self.dir().principals.get(&oid))
                .find(|p| p.object_id == oid)
                .map(|p| p.tenant_id.clone())
                .unwrap_or_else(|| caller.tenant_id.clone());
            identity["principalId"] = json!(oid);
            identity["tenantId"] = json!(tenant);
        }
        if user {
            identity["userAssignedIdentities"] = Value::Object(uas);
        }
        Ok((identity, created, deleted))
    }

    /// Where a principal is granted access, if anywhere (for the "in use" rule of ID-1).
    fn principal_usage(&self, oid: &str) -> Option<String> {
        if let Some(a) = self
            .dir()
            .assignments
            .iter()
            .find(|a| a.principal_id.eq_ignore_ascii_case(oid))
        {
            return Some(format!("role assignment {} at {}", a.id, a.scope));
        }
        for v in self.all_vaults() {
            let r = v.record();
            if r.deleted_at.is_none()
                && r.properties
                    .access_policies
                    .iter()
                    .any(|p| p.object_id.eq_ignore_ascii_case(oid))
            {
                return Some(format!("access policy on vault {}", r.name));
            }
        }
        None
    }

    /// `GET` of a user-assigned identity or workload.
    pub fn get_identity_resource(
        &self,
        caller: &Principal,
        sub: &str,
        rg: &str,
        resource_type: &str,
        name: &str,
    ) -> Result<Value, KvError> {
        self.require_admin(caller)?;
        let key =
            format!("/subscriptions/{sub}/resourcegroups/{rg}/providers/{resource_type}/{name}")
                .to_ascii_lowercase();
        self.dir()
            .resources
            .get(&key)
            .map(|(_, b)| b.clone())
            .ok_or_else(|| KvError::new(ErrorCode::ResourceNotFound, format!("The Resource '{resource_type}/{name}' under resource group '{rg}' was not found.")))
    }

    /// Lists user-assigned identities or workloads of a resource group.
    pub fn list_identity_resources(
        &self,
        caller: &Principal,
        sub: &str,
        rg: &str,
        resource_type: &str,
    ) -> Result<Value, KvError> {
        self.require_admin(caller)?;
        let prefix = format!("/subscriptions/{sub}/resourcegroups/{rg}/providers/{resource_type}/")
            .to_ascii_lowercase();
        let mut value: Vec<Value> = self
            .dir()
            .resources
            .iter()
            .filter(|(k, _)| k.starts_with(&prefix))
            .map(|(_, (_, b))| b.clone())
            .collect();
        value.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
        Ok(json!({ "value": value }))
    }

    /// `DELETE` of a user-assigned identity or workload: its system-assigned identity goes
    /// with it. 200 when deleted, 204 when absent.
    pub async fn delete_identity_resource(
        &self,
        caller: &Principal,
        sub: &str,
        rg: &str,
        resource_type: &str,
        name: &str,
    ) -> Result<u16, KvError> {
        self.require_admin(caller)?;
        let key =
            format!("/subscriptions/{sub}/resourcegroups/{rg}/providers/{resource_type}/{name}")
                .to_ascii_lowercase();
        let Some((_, body)) = self.dir().resources.get(&key).cloned() else {
            return Ok(204);
        };
        self.check_not_locked(&key, "delete")?;
        let mut gone = Vec::new();
        if let Some(oid) = body["identity"]["principalId"].as_str() {
            gone.push(oid.to_string());
        }
        if let Some(oid) = body["properties"]["principalId"].as_str() {
            gone.push(oid.to_string());
        }
        self.forget_resource(&key, gone).await?;
        tracing::info!(resource = %key, "resource deleted");
        Ok(200)
    }

    /// Deletes a resource and the identities `gone` that only it carried: the store first (one
    /// transaction, with the resource's service records), then the directory in memory.
    pub(crate) async fn forget_resource(
        &self,
        key: &str,
        gone: Vec<String>,
    ) -> Result<(), KvError> {
        self.store
            .delete_resource(key, &gone)
            .await
            .map_err(|e| internal("delete resource", e))?;
        let mut d = self.dir_mut();
        d.resources.remove(key);
        for oid in gone {
            d.principals.remove(&oid);
        }
        Ok(())
    }

    /// Binds a process to a resource for the default lifetime; see
    /// [`Self::bind_workload_for`].
    pub async fn bind_workload(
        &self,
        caller: &Principal,
        resource_id: &str,
        client_id: Option<&str>,
    ) -> Result<Value, KvError> {
        self.bind_workload_for(caller, resource_id, client_id, None)
            .await
    }

    /// Binds a process to one managed identity of a resource: returns the environment
    /// (`IDENTITY_ENDPOINT`, `IDENTITY_HEADER`, `AZURE_POD_IDENTITY_AUTHORITY_HOST`, and
    /// `AZURE_CLIENT_ID` when a user-assigned identity is named) with which it gets tokens for
    /// that identity and nothing else, and the binding's `id`, `clientId` and `expiresOn`.
    /// The identity is the user-assigned one named by `client_id`, else the system-assigned
    /// one, else the resource's only identity. The binding works for `expires_in_hours`
    /// (1–8760, default 2160: 90 days) unless revoked.
    pub async fn bind_workload_for(
        &self,
        caller: &Principal,
        resource_id: &str,
        client_id: Option<&str>,
        expires_in_hours: Option<i64>,
    ) -> Result<Value, KvError> {
        self.require_admin(caller)?;
        let hours = expires_in_hours.unwrap_or(BINDING_DEFAULT_HOURS);
        if !(1..=BINDING_MAX_HOURS).contains(&hours) {
            return Err(bad(format!(
                "expiresInHours must be 1 to {BINDING_MAX_HOURS} (default {BINDING_DEFAULT_HOURS})."
            )));
        }
        let key = resource_id.trim_end_matches('/').to_ascii_lowercase();
        let body = self.identity_resource_body(&key, resource_id)?;
        let identities = self.resource_identities(&key, &body);
        if identities.is_empty() {
            return Err(bad(
                "The resource has no managed identity; set identity.type first.",
            ));
        }
        let bound = match client_id {
            Some(cid) => identities
                .iter()
                .find(|p| p.client_id.eq_ignore_ascii_case(cid))
                .ok_or_else(|| {
                    bad(format!(
                        "No identity with client id '{}' is assigned to this resource.",
                        kagi_core::ids::printable(cid)
                    ))
                })?,
            None => default_identity(&identities).ok_or_else(|| {
                bad(
                    "The resource has several user-assigned identities and no system-assigned \
                     one; name the one to bind with clientId.",
                )
            })?,
        };
        let secret = new_secret()?;
        let now = self.clock.now();
        let record = BindingRecord {
            id: uuid_v4(random16()?),
            secret_hash: kagi_identity::hash_secret(&secret),
            resource_id: key.clone(),
            client_id: Some(bound.client_id.clone()),
            created: now,
            expires: now + hours * 3600,
        };
        self.store
            .put_binding(&record, now)
            .await
            .map_err(|e| internal("bind workload", e))?;
        tracing::info!(resource = %key, binding = %record.id, client_id = %bound.client_id, "workload binding created");
        let a = self.config.authority();
        let mut env = json!({
            "IDENTITY_ENDPOINT": format!("{a}/msi/token"),
            "IDENTITY_HEADER": secret,
            "AZURE_POD_IDENTITY_AUTHORITY_HOST": format!("{a}/imds/{secret}"),
            "binding": binding_json(&record, now),
        });
        if let Some(cid) = client_id {
            env["AZURE_CLIENT_ID"] = json!(cid);
        }
        Ok(env)
    }

    /// The body of an identity-carrying resource, or 404 naming `shown`.
    fn identity_resource_body(&self, key: &str, shown: &str) -> Result<Value, KvError> {
        self.dir()
            .resources
            .get(key)
            .map(|(_, b)| b.clone())
            .ok_or_else(|| {
                KvError::new(
                    ErrorCode::ResourceNotFound,
                    format!(
                        "Resource '{}' does not exist.",
                        kagi_core::ids::printable(shown)
                    ),
                )
            })
    }

    /// The lower-case id and the bindings of an identity-carrying resource (the administrator
    /// only; 404 when the resource does not exist).
    async fn resource_bindings(
        &self,
        caller: &Principal,
        resource_id: &str,
    ) -> Result<(String, Vec<BindingRecord>), KvError> {
        self.require_admin(caller)?;
        let key = resource_id.trim_end_matches('/').to_ascii_lowercase();
        self.identity_resource_body(&key, resource_id)?;
        let bindings = self
            .store
            .list_bindings(&key)
            .await
            .map_err(|e| internal("list bindings", e))?;
        Ok((key, bindings))
    }

    /// Lists the bindings of a resource (never their secrets): id, the client id served,
    /// creation, expiry and whether it still works.
    pub async fn list_bindings(
        &self,
        caller: &Principal,
        resource_id: &str,
    ) -> Result<Value, KvError> {
        let (_, bindings) = self.resource_bindings(caller, resource_id).await?;
        let now = self.clock.now();
        let value: Vec<Value> = bindings.iter().map(|b| binding_json(b, now)).collect();
        Ok(json!({ "value": value }))
    }

    /// Revokes one binding of a resource: its secret stops working on the next request.
    pub async fn revoke_binding(
        &self,
        caller: &Principal,
        resource_id: &str,
        id: &str,
    ) -> Result<Value, KvError> {
        let (key, bindings) = self.resource_bindings(caller, resource_id).await?;
        let found = bindings.into_iter().find(|b| b.id.eq_ignore_ascii_case(id));
        let deleted = match &found {
            Some(b) => self
                .store
                .delete_binding(&key, &b.id)
                .await
                .map_err(|e| internal("revoke binding", e))?,
            None => false,
        };
        match found.filter(|_| deleted) {
            Some(b) => {
                tracing::info!(resource = %key, binding = %b.id, "workload binding revoked");
                Ok(binding_json(&b, self.clock.now()))
            }
            None => Err(KvError::new(
                ErrorCode::NotFound,
                format!(
                    "The resource has no binding '{}'.",
                    kagi_core::ids::printable(id)
                ),
            )),
        }
    }

    /// The identities assigned to a resource: system-assigned first, then user-assigned.
    fn resource_identities(&self, key: &str, body: &Value) -> Vec<PrincipalRecord> {
        let d = self.dir();
        let mut out = Vec::new();
        if let Some(oid) = body["identity"]["principalId"].as_str()
            && let Some(p) = d.principals.get(oid)
        {
            out.push(p.clone());
        }
        if let Some(map) = body["identity"]["userAssignedIdentities"].as_object() {
            for v in map.values() {
                if let Some(p) = v["principalId"]
                    .as_str()
                    .and_then(|oid| d.principals.get(oid))
                {
                    out.push(p.clone());
                }
            }
        }
        if let Some(oid) = body["properties"]["principalId"].as_str()
            && body["type"]
                .as_str()
                .is_some_and(|t| t.eq_ignore_ascii_case(UAMI_TYPE))
            && let Some(p) = d.principals.get(oid)
        {
            out.push(p.clone());
        }
        let _ = key;
        out
    }

    /// Answers a managed-identity token request (App Service or IMDS style): `binding` is the
    /// workload's secret; `selector` picks a user-assigned identity by client id, object id or
    /// resource id (none: the system-assigned one, or the only one).
    pub async fn managed_identity_token(
        &self,
        binding: &str,
        resource: &str,
        selector: Option<(&str, &str)>,
    ) -> Result<TokenGrant, KvError> {
        let unknown =
            || KvError::unauthorized("The identity header is not valid for any resource.");
        if binding.is_empty() || binding.len() > 256 {
            return Err(unknown());
        }
        let now = self.clock.now();
        let binding = self
            .store
            .binding_by_secret(&kagi_identity::hash_secret(binding))
            .await
            .map_err(|e| internal("binding lookup", e))?
            .filter(|b| now < b.expires)
            .ok_or_else(unknown)?;
        let key = binding.resource_id;
        let body = self
            .dir()
            .resources
            .get(&key)
            .map(|(_, b)| b.clone())
            .ok_or_else(unknown)?;
        let ids = self.resource_identities(&key, &body);
        let matches = |p: &PrincipalRecord, (field, value): (&str, &str)| match field {
            "client_id" => p.client_id.eq_ignore_ascii_case(value),
            "object_id" | "principal_id" => p.object_id.eq_ignore_ascii_case(value),
            "mi_res_id" | "msi_res_id" => p
                .resource_id
                .as_deref()
                .is_some_and(|r| r.eq_ignore_ascii_case(value)),
            _ => false,
        };
        let chosen = match &binding.client_id {
            // The one identity the binding was minted for, while it is still assigned, and
            // only if the request asks for it (or for nothing in particular).
            Some(cid) => ids
                .iter()
                .find(|p| p.client_id.eq_ignore_ascii_case(cid))
                .filter(|p| selector.is_none_or(|s| matches(p, s))),
            // Legacy bindings (made before bindings named an identity) serve any identity of
            // their resource until they expire.
            None => match selector {
                Some(s) => ids.iter().find(|p| matches(p, s)),
                None => default_identity(&ids),
            },
        }
        .cloned()
        .ok_or_else(|| {
            bad("No managed identity this binding serves matches the request (a binding serves the one identity it was created for).")
                .with_inner("IdentityNotFound")
        })?;
        if let Some(e) = self.identity_tenant_problem(&chosen, &key) {
            return Err(e);
        }
        let audience = resource.trim_end_matches("/.default");
        if audience.trim_end_matches('/') != self.config.authority() {
            return Err(bad(format!(
                "kagi issues tokens for the resource {} only.",
                self.config.authority()
            ))
            .with_inner("InvalidResource"));
        }
        let grant = self
            .directory
            .issue(
                &Principal {
                    tenant_id: chosen.tenant_id.clone(),
                    object_id: chosen.object_id.clone(),
                    client_id: chosen.client_id.clone(),
                    kind: chosen.kind.clone(),
                    network_address: None,
                    upn: None,
                },
                audience,
            )
            .map_err(|_| internal("issue", "token"))?;
        tracing::info!(object_id = %chosen.object_id, resource = %key, "managed identity token issued");
        Ok(grant)
    }

    /// The seconds-since-epoch at which a token issued now expires.
    pub fn token_expires_on(&self) -> i64 {
        self.directory.token_expires_on()
    }

    /// The firewall decision for a caller.
    fn firewall_allows(&self, caller: &Principal, record: &VaultRecord) -> Result<(), KvError> {
        let acls = record.properties.network_acls.as_ref();
        let public_disabled = record
            .properties
            .public_network_access
            .eq_ignore_ascii_case("Disabled");
        let deny_default = acls.is_some_and(|a| a.default_action.eq_ignore_ascii_case("Deny"));
        if !public_disabled && !deny_default {
            return Ok(());
        }
        let trusted = acls.is_some_and(|a| a.bypass.eq_ignore_ascii_case("AzureServices"))
            && self.is_trusted_service(&caller.object_id);
        if trusted {
            return Ok(());
        }
        let ip: Option<IpAddr> = caller.network_address;
        if !public_disabled
            && let (Some(ip), Some(acls)) = (ip, acls)
            && acls.ip_rules.iter().any(|r| {
                kagi_core::access::IpRange::parse(&r.value).is_ok_and(|range| range.contains(ip))
            })
        {
            return Ok(());
        }
        Err(KvError::forbidden(format!(
            "Client address is not authorized and caller is not a trusted service.\r\nClient address: {}\r\nCaller: appid={};oid={}\r\nVault: {};location={}",
            ip.map(|i| i.to_string()).unwrap_or_else(|| "unknown".into()),
            caller.client_id,
            caller.object_id,
            record.name,
            record.location
        ))
        .with_inner("ForbiddenByFirewall"))
    }

    fn is_trusted_service(&self, oid: &str) -> bool {
        let d = self.dir();
        d.principals.get(oid).is_some_and(|p| {
            p.kind == kind::SYSTEM_ASSIGNED
                && p.resource_id
                    .as_deref()
                    .and_then(|r| d.resources.get(r))
                    .is_some_and(|(r, _)| self.trusts_service_type(&r.resource_type))
        })
    }

    /// Decides whether `caller` may do `action` on the vault (or on one of its objects):
    /// tenant, firewall, then the vault's access model — access policies, or role assignments
    /// at any scope from the subscription down to the object.
    pub(crate) fn authorize_object(
        &self,
        caller: &Principal,
        record: &VaultRecord,
        action: DataAction,
        object: Option<(&str, &str)>,
    ) -> Result<(), KvError> {
        if !caller
            .tenant_id
            .eq_ignore_ascii_case(record.properties.tenant_id.as_str())
        {
            return Err(KvError::unauthorized(format!(
                "AKV10032: Invalid issuer. Expected one of {}/{}/v2.0, found {}/{}/v2.0.",
                self.config.authority(),
                record.properties.tenant_id,
                self.config.authority(),
                caller.tenant_id
            )));
        }
        self.firewall_allows(caller, record)?;
        if caller.object_id == self.admin_object_id {
            return Ok(());
        }
        let who = format!("appid={};oid={}", caller.client_id, caller.object_id);
        if record.properties.enable_rbac_authorization {
            let wanted = data_action(action);
            if self
                .directory
                .rbac_allows(&caller.object_id, &object_scope(record, object), wanted)
            {
                return Ok(());
            }
            return Err(KvError::forbidden(format!(
                "Caller is not authorized to perform action on resource.\r\nIf role assignments, \
                 deny assignments or role definitions were changed recently, please observe \
                 propagation time.\r\nCaller: {who}\r\nAction: '{wanted}'\r\nResource: '{}'",
                object_scope(record, object)
            ))
            .with_inner("ForbiddenByRbac"));
        }
        let c = Caller {
            tenant_id: caller.tenant_id.clone(),
            object_id: caller.object_id.clone(),
            application_id: Some(caller.client_id.clone()),
        };
        if record.properties.access_policies_allow(&c, action) {
            return Ok(());
        }
        Err(KvError::forbidden(format!(
            "The user, group or application '{who}' does not have {} {} permission on key vault \
             '{};location={}'.",
            match action {
                DataAction::Key(_) => "keys",
                DataAction::Secret(_) => "secrets",
                DataAction::Random => "",
            },
            action.name(),
            record.name,
            record.location
        ))
        .with_inner("ForbiddenByPolicy"))
    }

    /// Refuses scopes that name a subscription, resource group, vault or resource that does not
    /// exist (keys and secrets inside an existing vault may be named before they exist).
    async fn check_scope_exists(&self, scope: &Scope) -> Result<(), KvError> {
        let missing = |what: String| {
            bad(format!("{what} in the scope does not exist.")).with_inner("InvalidScope")
        };
        let segs: Vec<&str> = scope.as_str().split('/').collect();
        if segs.len() < 3 {
            return Err(missing("The subscription".into()));
        }
        self.store
            .subscription_tenant(segs[2])
            .await
            .map_err(|e| internal("scope", e))?
            .ok_or_else(|| missing(format!("Subscription '{}'", segs[2])))?;
        if segs.len() >= 5 {
            self.store
                .get_resource_group(segs[2], segs[4])
                .await
                .map_err(|e| internal("scope", e))?
                .ok_or_else(|| missing(format!("Resource group '{}'", segs[4])))?;
        }
        if segs.len() > 8 && segs[6] == "microsoft.keyvault" && segs[7] == "vaults" {
            let name =
                kagi_core::VaultName::parse(segs[8]).map_err(|_| missing("The vault".into()))?;
            let v = self
                .live_vault(&name)
                .map_err(|_| missing(format!("Vault '{}'", segs[8])))?;
            let r = v.record();
            if r.subscription_id != segs[2] || !r.resource_group.eq_ignore_ascii_case(segs[4]) {
                return Err(missing(format!("Vault '{}'", segs[8])));
            }
        } else if segs.len() > 8 {
            let id = segs[..9].join("/");
            if !self.dir().resources.contains_key(&id) {
                return Err(missing(format!("The resource '{id}'")));
            }
        }
        Ok(())
    }

    /// Refuses `operation` on `scope` when a lock at or above it forbids it.
    pub(crate) fn check_not_locked(&self, scope: &str, operation: &str) -> Result<(), KvError> {
        self.directory.check_not_locked(scope, operation)
    }

    /// Refuses (409 `ScopeLocked`) when any lock is at, above or below `scope`.
    pub(crate) fn check_not_locked_within(&self, scope: &str) -> Result<(), KvError> {
        self.directory.check_not_locked_within(scope)
    }

    /// The role assignments whose scope is `scope` or below it, for whole-vault backups.
    pub(crate) fn role_assignments_within(&self, scope: &str) -> Vec<RoleAssignmentRecord> {
        self.directory.role_assignments_within(scope)
    }

    /// `PUT {scope}/providers/Microsoft.Authorization/roleAssignments/{guid}`, once the scope
    /// is known to exist.
    pub async fn put_role_assignment(
        &self,
        caller: &Principal,
        scope: &str,
        id: &str,
        input: Value,
    ) -> Result<(u16, Value), KvError> {
        self.require_admin(caller)?;
        let scope = Scope::parse(scope)?;
        self.check_scope_exists(&scope).await?;
        self.directory
            .put_role_assignment(caller, &scope, id, input)
            .await
    }

    /// `PUT {scope}/providers/Microsoft.Authorization/locks/{name}`, once the scope is known to
    /// exist.
    pub async fn put_lock(
        &self,
        caller: &Principal,
        scope: &str,
        name: &str,
        input: Value,
    ) -> Result<(u16, Value), KvError> {
        self.require_admin(caller)?;
        let scope = Scope::parse(scope)?;
        self.check_scope_exists(&scope).await?;
        self.directory.put_lock(caller, &scope, name, input).await
    }
}

/// Default lifetime of a workload binding, in hours (90 days).
const BINDING_DEFAULT_HOURS: i64 = 90 * 24;
/// Longest lifetime of a workload binding, in hours (a year).
const BINDING_MAX_HOURS: i64 = 365 * 24;

/// The identity a request that names none gets: the system-assigned one, or the only one.
fn default_identity(ids: &[PrincipalRecord]) -> Option<&PrincipalRecord> {
    ids.iter()
        .find(|p| p.kind == kind::SYSTEM_ASSIGNED)
        .or(if ids.len() == 1 { ids.first() } else { None })
}

fn binding_json(b: &BindingRecord, now: i64) -> Value {
    json!({
        "id": b.id,
        "clientId": b.client_id,
        "createdOn": rfc3339(b.created),
        "expiresOn": rfc3339(b.expires),
        "status": if now < b.expires { "Active" } else { "Expired" },
    })
}
