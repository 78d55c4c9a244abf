//! Resources of kagi's own storage services (backup vaults, and later disk encryption sets and
//! SQL servers): a small public API over the directory's resources table so that service
//! crates store their ARM resources, give them managed identities (system- and user-assigned,
//! through the same rules as every other identity-carrying resource) and obtain tokens for
//! those identities in-process — how a service "proves it is the resource" when it calls a key
//! vault over HTTPS.
//!
//! The non-blob records a service keeps about its resources live in the store too, behind the
//! methods below, so that they are as durable as the resource and go with it: *documents*
//! (small JSON values addressed by kind and name, e.g. a backup vault's `state`, its `job`s,
//! its `agent-registry`) and an append-only *activity log*. They are keyed by the resource's
//! lower-case id; the store deletes them in the transaction that deletes the resource
//! ([`Platform::delete_service_resource`]) and re-keys them in the transaction that moves it
//! ([`Platform::move_service_resource`]). Service crates reach them only through these methods.
//!
//! A child module of `directory` (it shares the directory's private state).

use kagi_core::{ErrorCode, KvError, VaultName};
use kagi_identity::Principal;
use kagi_store::{ResourceRecord, ServiceDocument, ServiceImport};
use serde_json::{Value, json};

use crate::{Platform, internal};
use kagi_directory::{bad, kind};

pub use kagi_host::KeyVaultFacts;

/// The store key of a resource id: lower-case, no trailing slash (as `resources.id`).
fn store_key(resource_id: &str) -> String {
    resource_id.trim_end_matches('/').to_ascii_lowercase()
}

fn parse_document(kind: &str, body: &str) -> Result<Value, KvError> {
    serde_json::from_str(body).map_err(|e| internal(&format!("service document {kind}"), e))
}

fn resource_key(sub: &str, rg: &str, resource_type: &str, name: &str) -> String {
    format!("/subscriptions/{sub}/resourcegroups/{rg}/providers/{resource_type}/{name}")
        .to_ascii_lowercase()
}

fn not_found(resource_type: &str, name: &str, rg: &str) -> KvError {
    KvError::new(
        ErrorCode::ResourceNotFound,
        format!(
            "The Resource '{resource_type}/{}' under resource group '{}' was not found.",
            kagi_core::ids::printable(name),
            kagi_core::ids::printable(rg)
        ),
    )
}

impl Platform {
    /// `PUT` of a storage-service resource: `body` carries `location`, `tags` and
    /// `properties` as the service computed them; `identity` is the request's `identity`
    /// block (absent: unchanged). Creates or deletes the system-assigned identity and
    /// resolves user-assigned ones like every resource that carries identities. The
    /// bootstrap administrator only. Returns (201 or 200, the stored body).
    #[allow(clippy::too_many_arguments)]
    pub async fn put_service_resource(
        &self,
        caller: &Principal,
        sub: &str,
        rg: &str,
        resource_type: &str,
        name: &str,
        body: Value,
        identity: Option<&Value>,
    ) -> Result<(u16, Value), KvError> {
        let (sub, rg) = self.check_group(caller, sub, rg).await?;
        if name.is_empty()
            || name.len() > 50
            || !name.starts_with(|c: char| c.is_ascii_alphabetic())
            || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        {
            return Err(bad(
                "Resource names are 2-50 letters, digits and '-', starting with a letter.",
            )
            .with_inner("InvalidResourceName"));
        }
        let id =
            format!("/subscriptions/{sub}/resourceGroups/{rg}/providers/{resource_type}/{name}");
        let key = id.to_ascii_lowercase();
        let now = self.clock.now();
        let existing = self.dir().resources.get(&key).cloned();
        let location = match (body.get("location").and_then(Value::as_str), &existing) {
            (Some(l), Some((r, _))) if !l.replace(' ', "").eq_ignore_ascii_case(&r.location) => {
                return Err(bad(format!(
                    "The location of '{name}' cannot change from '{}'.",
                    r.location
                )));
            }
            (_, Some((r, _))) => r.location.clone(),
            (Some(l), None) => l.to_ascii_lowercase().replace(' ', ""),
            (None, None) => return Err(bad("The property \"location\" is required.")),
        };
        let old_identity = existing
            .as_ref()
            .map(|(_, b)| b["identity"].clone())
            .unwrap_or(Value::Null);
        let (identity, created, deleted) =
            self.apply_identity(caller, &key, name, &old_identity, identity, now)?;
        let tags = body.get("tags").cloned().unwrap_or_else(|| {
            existing
                .as_ref()
                .map(|(_, b)| b["tags"].clone())
                .unwrap_or_else(|| json!({}))
        });
        let out = json!({
            "id": id, "name": name, "type": resource_type, "location": location,
            "tags": tags, "identity": identity,
            "properties": body.get("properties").cloned().unwrap_or_else(|| json!({})),
        });
        let record = ResourceRecord {
            id: key.clone(),
            resource_type: resource_type.into(),
            subscription_id: sub.to_string(),
            resource_group: rg.to_string(),
            name: name.to_string(),
            location,
            body: out.to_string(),
            created: existing.as_ref().map_or(now, |(r, _)| r.created),
            updated: now,
        };
        self.commit_resource(record, out.clone(), created, &deleted)
            .await?;
        tracing::info!(resource = %id, "service resource written");
        Ok((if existing.is_some() { 200 } else { 201 }, out))
    }

    /// `GET` of a storage-service resource (the bootstrap administrator only).
    pub fn get_service_resource(
        &self,
        caller: &Principal,
        sub: &str,
        rg: &str,
        resource_type: &str,
        name: &str,
    ) -> Result<Value, KvError> {
        self.require_admin(caller)?;
        self.service_resource(&resource_key(sub, rg, resource_type, name))
            .ok_or_else(|| not_found(resource_type, name, rg))
    }

    /// A stored resource by id (case-insensitive), for the service itself (no caller).
    pub fn service_resource(&self, resource_id: &str) -> Option<Value> {
        self.dir()
            .resources
            .get(&resource_id.trim_end_matches('/').to_ascii_lowercase())
            .map(|(_, b)| b.clone())
    }

    /// Lists the resources of a type in a subscription (`rg: None`) or a resource group.
    pub fn list_service_resources(
        &self,
        caller: &Principal,
        sub: &str,
        rg: Option<&str>,
        resource_type: &str,
    ) -> Result<Value, KvError> {
        self.require_admin(caller)?;
        let sub = sub.to_ascii_lowercase();
        let mut value: Vec<Value> = self
            .dir()
            .resources
            .values()
            .filter(|(r, _)| {
                r.resource_type.eq_ignore_ascii_case(resource_type)
                    && r.subscription_id.eq_ignore_ascii_case(&sub)
                    && rg.is_none_or(|g| r.resource_group.eq_ignore_ascii_case(g))
            })
            .map(|(_, b)| b.clone())
            .collect();
        value.sort_by(|a, b| a["id"].as_str().cmp(&b["id"].as_str()));
        Ok(json!({ "value": value }))
    }

    /// Every stored resource of a type, for the service itself (no caller): its scheduler.
    pub fn service_resources_of_type(&self, resource_type: &str) -> Vec<Value> {
        let mut value: Vec<Value> = self
            .dir()
            .resources
            .values()
            .filter(|(r, _)| r.resource_type.eq_ignore_ascii_case(resource_type))
            .map(|(_, b)| b.clone())
            .collect();
        value.sort_by(|a, b| a["id"].as_str().cmp(&b["id"].as_str()));
        value
    }

    /// `DELETE` of a storage-service resource: its system-assigned identity, its documents
    /// and its activity log go with it (one store transaction). 200 when deleted, 204 when
    /// absent. Locks at or above it refuse.
    pub async fn delete_service_resource(
        &self,
        caller: &Principal,
        sub: &str,
        rg: &str,
        resource_type: &str,
        name: &str,
    ) -> Result<u16, KvError> {
        self.require_admin(caller)?;
        let key = resource_key(sub, rg, resource_type, name);
        let Some((_, body)) = self.dir().resources.get(&key).cloned() else {
            return Ok(204);
        };
        self.check_not_locked(&key, "delete")?;
        let gone: Vec<String> = body["identity"]["principalId"]
            .as_str()
            .map(str::to_string)
            .into_iter()
            .collect();
        self.forget_resource(&key, gone).await?;
        tracing::info!(resource = %key, "service resource deleted");
        Ok(200)
    }

    // ----- documents and activity of a service's resources -----

    /// A document of a resource (`kind` and `name` as the service chose them), if stored.
    pub async fn service_document(
        &self,
        resource_id: &str,
        kind: &str,
        name: &str,
    ) -> Result<Option<Value>, KvError> {
        self.store
            .get_service_document(&store_key(resource_id), kind, name)
            .await
            .map_err(|e| internal("read service document", e))?
            .map(|d| parse_document(kind, &d.body))
            .transpose()
    }

    /// Stores a document of a resource (replacing the one of that kind and name); durable when
    /// this returns. The resource need not exist yet: a service may record what it needs to
    /// create it first.
    pub async fn put_service_document(
        &self,
        resource_id: &str,
        kind: &str,
        name: &str,
        body: &Value,
    ) -> Result<(), KvError> {
        let doc = ServiceDocument {
            kind: kind.to_string(),
            name: name.to_string(),
            body: body.to_string(),
            updated: self.clock.now(),
        };
        self.store
            .put_service_document(&store_key(resource_id), &doc)
            .await
            .map_err(|e| internal("write service document", e))
    }

    /// Every document of one kind of every resource: (resource key, i.e. its lower-case id;
    /// name; document).
    pub async fn service_documents_of_kind(
        &self,
        kind: &str,
    ) -> Result<Vec<(String, String, Value)>, KvError> {
        self.store
            .list_service_documents_of_kind(kind)
            .await
            .map_err(|e| internal("list service documents", e))?
            .into_iter()
            .map(|(key, d)| Ok((key, d.name, parse_document(kind, &d.body)?)))
            .collect()
    }

    /// Stores a document of a resource only while document `guard` (resource id, kind, name)
    /// is `expected` (`None`: absent), checked in the writing transaction
    /// ([`kagi_store::Store::put_service_document_if`]); `false` when it is not.
    pub async fn put_service_document_if(
        &self,
        resource_id: &str,
        (kind, name): (&str, &str),
        body: &Value,
        (guard_id, guard_kind, guard_name): (&str, &str, &str),
        expected: Option<&Value>,
    ) -> Result<bool, KvError> {
        let doc = ServiceDocument {
            kind: kind.to_string(),
            name: name.to_string(),
            body: body.to_string(),
            updated: self.clock.now(),
        };
        let guard_key = store_key(guard_id);
        let guard = kagi_store::DocumentRef {
            resource_key: &guard_key,
            kind: guard_kind,
            name: guard_name,
        };
        // Compared as JSON, not as text: the same document may have been written with its
        // members in another order.
        let holds = |found: Option<&str>| match (found, expected) {
            (None, None) => true,
            (Some(text), Some(want)) => {
                serde_json::from_str::<Value>(text).is_ok_and(|have| have == *want)
            }
            _ => false,
        };
        self.store
            .put_service_document_if(&store_key(resource_id), &doc, guard, &holds)
            .await
            .map_err(|e| internal("write service document", e))
    }

    /// Deletes a document of a resource; `true` if it existed.
    pub async fn delete_service_document(
        &self,
        resource_id: &str,
        kind: &str,
        name: &str,
    ) -> Result<bool, KvError> {
        self.store
            .delete_service_document(&store_key(resource_id), kind, name)
            .await
            .map_err(|e| internal("delete service document", e))
    }

    /// Every document of one kind of a resource: (name, document), by name.
    pub async fn service_documents(
        &self,
        resource_id: &str,
        kind: &str,
    ) -> Result<Vec<(String, Value)>, KvError> {
        self.store
            .list_service_documents(&store_key(resource_id), kind)
            .await
            .map_err(|e| internal("list service documents", e))?
            .into_iter()
            .map(|d| Ok((d.name, parse_document(kind, &d.body)?)))
            .collect()
    }

    /// Appends an entry to a resource's activity log (at the platform time), with the
    /// notifications of the activity log alerts it fires in the same transaction (see
    /// `alerts.rs`); durable when this returns.
    pub async fn append_service_activity(
        &self,
        resource_id: &str,
        entry: &Value,
    ) -> Result<(), KvError> {
        let now = self.clock.now();
        let fired = self.alert_notifications(resource_id, entry, now).await?;
        self.store
            .append_activity_with_alerts(&store_key(resource_id), now, &entry.to_string(), &fired)
            .await
            .map_err(|e| internal("append service activity", e))?;
        if !fired.is_empty() {
            self.events.wake.notify_one();
        }
        Ok(())
    }

    /// A resource's activity log, oldest first.
    pub async fn service_activity(&self, resource_id: &str) -> Result<Vec<Value>, KvError> {
        self.store
            .list_service_activity(&store_key(resource_id))
            .await
            .map_err(|e| internal("read service activity", e))?
            .into_iter()
            .map(|r| parse_document("activity", &r.body))
            .collect()
    }

    /// Deletes every document and activity entry kept for a resource id: what a resource of
    /// that id deleted earlier may have left (a creation that failed half-way), before a new
    /// one is created.
    pub async fn clear_service_data(&self, resource_id: &str) -> Result<(), KvError> {
        self.store
            .delete_service_data(&store_key(resource_id))
            .await
            .map_err(|e| internal("clear service data", e))
    }

    /// Imports a resource's documents (kind, name, document) and activity entries (time,
    /// entry; oldest first) that an earlier kagi kept in files, in one transaction: documents
    /// already stored and an activity log that already has entries are left as they are, so
    /// running the same import again changes nothing.
    pub async fn import_service_data(
        &self,
        resource_id: &str,
        documents: &[(String, String, Value)],
        activity: &[(i64, Value)],
    ) -> Result<(), KvError> {
        let now = self.clock.now();
        let import = ServiceImport {
            documents: documents
                .iter()
                .map(|(kind, name, body)| ServiceDocument {
                    kind: kind.clone(),
                    name: name.clone(),
                    body: body.to_string(),
                    updated: now,
                })
                .collect(),
            activity: activity
                .iter()
                .map(|(at, entry)| (*at, entry.to_string()))
                .collect(),
        };
        self.store
            .import_service_data(&store_key(resource_id), &import)
            .await
            .map_err(|e| internal("import service data", e))
    }

    /// An access token (audience: this platform) for one of a resource's managed identities:
    /// the system-assigned one (`user_assigned: None`) or the user-assigned identity with
    /// that resource id. The resource must carry that identity now.
    pub fn identity_token(
        &self,
        resource_id: &str,
        user_assigned: Option<&str>,
    ) -> Result<String, KvError> {
        let key = resource_id.trim_end_matches('/').to_ascii_lowercase();
        let body = self.service_resource(&key).ok_or_else(|| {
            KvError::new(
                ErrorCode::ResourceNotFound,
                format!(
                    "Resource '{}' does not exist.",
                    kagi_core::ids::printable(resource_id)
                ),
            )
        })?;
        let oid = match user_assigned {
            None => body["identity"]["principalId"]
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| {
                    bad("The resource has no system-assigned identity.")
                        .with_inner("SystemAssignedIdentityNotEnabled")
                })?,
            Some(uami) => body["identity"]["userAssignedIdentities"]
                .as_object()
                .and_then(|m| {
                    m.iter()
                        .find(|(k, _)| k.eq_ignore_ascii_case(uami))
                        .and_then(|(_, v)| v["principalId"].as_str().map(str::to_string))
                })
                .ok_or_else(|| {
                    bad(format!(
                        "The user-assigned identity '{}' is not assigned to the resource.",
                        kagi_core::ids::printable(uami)
                    ))
                    .with_inner("UserAssignedIdentityNotAssigned")
                })?,
        };
        self.service_identity_token(&oid, &key)
    }

    /// An access token of managed identity `oid` (system- or user-assigned) acting for the
    /// resource `resource_key` (lower case): refused when the identity is gone or was left in
    /// another tenant by a tenant move (ID-3).
    pub(crate) fn service_identity_token(
        &self,
        oid: &str,
        resource_key: &str,
    ) -> Result<String, KvError> {
        let p = self.dir().principals.get(oid).cloned().ok_or_else(|| {
            bad(format!("The identity {oid} no longer exists.")).with_inner("IdentityNotFound")
        })?;
        debug_assert!(p.kind == kind::SYSTEM_ASSIGNED || p.kind == kind::USER_ASSIGNED);
        // ID-3: an identity left in another tenant by a tenant move gets no token.
        if let Some(e) = self.identity_tenant_problem(&p, resource_key) {
            return Err(e);
        }
        let grant = self
            .directory
            .issue(
                &Principal {
                    tenant_id: p.tenant_id.clone(),
                    object_id: p.object_id.clone(),
                    client_id: p.client_id.clone(),
                    kind: p.kind.clone(),
                    network_address: None,
                    upn: None,
                },
                &self.config.authority(),
            )
            .map_err(|_| internal("issue", "identity token"))?;
        Ok(grant.access_token)
    }

    /// Whether a key vault of that name exists in the soft-deleted state (storage services
    /// name that state in their errors rather than "not found").
    pub fn key_vault_soft_deleted(&self, vault: &str) -> bool {
        VaultName::parse(vault)
            .ok()
            .and_then(|n| self.vault_state(&n))
            .is_some_and(|v| v.record().deleted_at.is_some())
    }

    /// Region, tenant, soft delete and purge protection of a live key vault, if it exists.
    pub fn key_vault_facts(&self, vault: &str) -> Option<KeyVaultFacts> {
        let name = VaultName::parse(vault).ok()?;
        let v = self.live_vault(&name).ok()?;
        let r = v.record();
        Some(KeyVaultFacts {
            name: r.name.to_string(),
            id: format!(
                "/subscriptions/{}/resourceGroups/{}/providers/Microsoft.KeyVault/vaults/{}",
                r.subscription_id, r.resource_group, r.name
            ),
            location: r.location.clone(),
            tenant_id: r.properties.tenant_id.to_string(),
            subscription_id: r.subscription_id.clone(),
            soft_delete: r.properties.enable_soft_delete,
            purge_protection: r.properties.enable_purge_protection,
        })
    }
}
