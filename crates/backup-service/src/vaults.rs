//! The vault resource and its encryption rules (BK-1 PMK by default, BK-2 CMK only on a vault
//! where nothing was ever protected, BK-3 never back to PMK, BK-4 the key and the identity's
//! access checked by really calling the key vault, BK-8 CMK at creation with a user-assigned
//! identity, BK-9 the key and its identity bound to the tenant they were configured in).
//!
//! BK-9 after a tenant move (`kagi_vault` `change_subscription_directory`): the tenant the key
//! was configured in is kept in the vault's state (`cmkTenantId`); while it differs from the
//! tenant of the vault's subscription, every job that needs the key fails with
//! `UserErrorCMKTenantMismatch` (written to the activity log and the job), naming the cause and
//! the fix. The fix is Azure's: turn the system-assigned identity off and on again (a
//! stale identity may be turned off even while the key uses it or a grant names it), grant the
//! new identity on a key vault of the new tenant, and set the encryption key again — which is
//! then validated and re-wraps every item's data key like a key change, even when the key URI
//! is the same.

use std::sync::Arc;

use kagi_cmk::{KeyRequest, bad};
use kagi_core::{ErrorCode, KvError};
use kagi_host::{Principal, PutResource, ServiceHost, subscription_of};
use serde_json::{Value, json};

use crate::resource::{CmkConfig, VaultCtx, activity_entry, identity_choice, vault_id, vault_ref};
use crate::state::{KeyVersionInUse, VaultState, pmk_label, read_activity, vault_dir};
use crate::{BackupService, VAULT_TYPE};

impl BackupService {
    pub(crate) fn vault_ctx(
        &self,
        p: &dyn ServiceHost,
        caller: &Principal,
        sub: &str,
        rg: &str,
        name: &str,
    ) -> Result<VaultCtx, KvError> {
        let body = p.get_resource(caller, vault_ref(sub, rg, name))?;
        let dir = vault_dir(&self.data_dir, sub, rg, name);
        // Nothing starts on a vault whose folder is being moved (`moves`).
        if crate::moves::is_moving(&dir) {
            return Err(KvError::conflict(format!(
                "The backup vault '{}' is being moved to another resource group or \
                 subscription; retry when the move has completed.",
                kagi_core::ids::printable(name)
            ))
            .with_inner("UserErrorBackupVaultResourceMoveInProgress"));
        }
        Ok(VaultCtx {
            id: body["id"].as_str().unwrap_or_default().to_string(),
            body,
            dir,
        })
    }

    /// BK-9: refuses to use a customer-managed key configured in another tenant than the one
    /// the vault's subscription is in now (its subscription was moved to another directory);
    /// the refusal names the cause and the fix and is written to the activity log.
    pub(crate) async fn check_cmk_tenant(
        &self,
        p: &dyn ServiceHost,
        v: &VaultCtx,
        state: &VaultState,
    ) -> Result<(), KvError> {
        let Some(configured) = &state.cmk_tenant_id else {
            return Ok(());
        };
        let Some(sub) = subscription_of(&v.id) else {
            return Ok(());
        };
        let Some(now) = p.subscription_tenant(sub) else {
            return Ok(());
        };
        if configured.eq_ignore_ascii_case(&now) {
            return Ok(());
        }
        let e = bad(
            "UserErrorCMKTenantMismatch",
            format!(
                "The customer-managed key of this backup vault and the identity that reaches it \
                 were configured in tenant {configured}, but the vault's subscription {sub} is now \
                 in tenant {now} (the subscription was moved to another directory). Backups and \
                 restores fail until both are configured again in tenant {now}: turn the vault's \
                 system-assigned identity off and on again (or assign a user-assigned identity \
                 created in tenant {now}), grant it get, list, wrapKey and unwrapKey on a key in a \
                 key vault of tenant {now} (a key vault of the moved subscription keeps tenant \
                 {configured} until its tenantId is updated), then set the encryption key again \
                 (kagi backup vault encryption). Recovery points are kept: their data keys are \
                 re-wrapped under the key set then, which needs the previous key to be reachable \
                 by the new identity."
            ),
        );
        self.log(
            p,
            v,
            activity_entry(
                None,
                &v.id,
                "Microsoft.RecoveryServices/vaults/keyAccess",
                "Failed",
                &e.message,
                p.now(),
            ),
        )
        .await;
        Err(e)
    }

    pub(crate) async fn activity(
        &self,
        p: &dyn ServiceHost,
        caller: &Principal,
        sub: &str,
        rg: &str,
        name: &str,
    ) -> Result<(u16, Value), KvError> {
        let v = self.vault_ctx(p, caller, sub, rg, name)?;
        Ok((200, json!({"value": read_activity(p, &v.id).await?})))
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn put_vault(
        self: &Arc<Self>,
        host: &Arc<dyn ServiceHost>,
        caller: &Principal,
        sub: &str,
        rg: &str,
        name: &str,
        input: Value,
        patch: bool,
    ) -> Result<(u16, Value), KvError> {
        let p = host.as_ref();
        let dir = vault_dir(&self.data_dir, sub, rg, name);
        let _g = self.lock_vault(&dir).await?;
        let existing = p.get_resource(caller, vault_ref(sub, rg, name)).ok();
        if patch && existing.is_none() {
            return Err(KvError::new(
                ErrorCode::ResourceNotFound,
                format!("The backup vault '{name}' was not found."),
            ));
        }
        let vault_id_hint = vault_id(sub, rg, name);
        let mut state = match &existing {
            Some(_) => VaultState::load(p, &vault_id_hint)
                .await?
                .unwrap_or_default(),
            None => VaultState::default(),
        };
        let old_cmk = existing.as_ref().and_then(CmkConfig::of);
        let props = &input["properties"];
        let enc_given = props.get("encryption");
        // What the request asks of encryption: unchanged, removed, or a key.
        let new_cmk = match enc_given {
            None => old_cmk.clone(),
            Some(e) => e["keyVaultProperties"]["keyUri"]
                .as_str()
                .map(|uri| CmkConfig {
                    key_uri: uri.to_string(),
                    user_assigned: identity_choice(&e["kekIdentity"]),
                }),
        };
        let refuse = async |e: KvError| -> KvError {
            if existing.is_some() {
                let v = VaultCtx {
                    id: vault_id_hint.clone(),
                    body: Value::Null,
                    dir: dir.clone(),
                };
                self.log(
                    p,
                    &v,
                    activity_entry(
                        Some(caller),
                        &vault_id_hint,
                        "Microsoft.RecoveryServices/vaults/write",
                        "Failed",
                        &e.message,
                        p.now(),
                    ),
                )
                .await;
            }
            e
        };
        // BK-3: once CMK, never back to PMK.
        if old_cmk.is_some() && new_cmk.is_none() {
            return Err(refuse(bad(
                "CannotDisableCustomerManagedKey",
                "Encryption with a customer-managed key cannot be turned off once enabled; the \
                 key can be changed (set properties.encryption.keyVaultProperties.keyUri).",
            ))
            .await);
        }
        // BK-9: after a tenant move, setting the key again (even the same URI) re-validates it
        // with the identity of the new tenant and records that tenant.
        let current_tenant = p.subscription_tenant(sub);
        let tenant_moved = state.cmk_tenant_id.as_ref().is_some_and(|t| {
            current_tenant
                .as_ref()
                .is_some_and(|c| !c.eq_ignore_ascii_case(t))
        });
        let cmk_changes =
            new_cmk.is_some() && (new_cmk != old_cmk || (enc_given.is_some() && tenant_moved));
        // BK-2: CMK only where nothing was ever protected (counting failed attempts).
        if cmk_changes && old_cmk.is_none() && state.protection_attempted {
            return Err(refuse(bad(
                "CmkNotAllowedAfterProtection",
                format!(
                    "Customer-managed keys can be enabled only on a backup vault in which no item \
                     was ever protected or registered (not even a failed attempt); '{name}' already \
                     had items. Create a new vault for CMK."
                ),
            ))
            .await);
        }
        // BK-8: at creation, only a user-assigned identity can have been granted access.
        if let Some(c) = &new_cmk
            && existing.is_none()
            && c.user_assigned.is_none()
        {
            return Err(bad(
                "SystemAssignedIdentityNotAllowedAtCreation",
                "A customer-managed key set when the vault is created must use a user-assigned \
                 identity (kekIdentity.userAssignedIdentity): the system-assigned identity does \
                 not exist yet and cannot have been granted access to the key.",
            ));
        }
        // The identity used for the key must stay on the vault.
        if let (Some(c), Some(idin)) = (&new_cmk, input.get("identity")) {
            let ty = idin["type"]
                .as_str()
                .unwrap_or("None")
                .to_ascii_lowercase()
                .replace(' ', "");
            let keeps = match &c.user_assigned {
                None => ty.contains("systemassigned"),
                Some(u) => {
                    ty.contains("userassigned")
                        && idin["userAssignedIdentities"]
                            .as_object()
                            .is_some_and(|m| m.keys().any(|k| k.eq_ignore_ascii_case(u)))
                }
            };
            // An identity left in the previous tenant by a tenant move no longer reaches the
            // key anyway: replacing it is the fix (BK-9).
            let stale = p
                .identity_tenant_problem(&vault_id_hint, c.user_assigned.as_deref())
                .is_some();
            if !keeps && !stale {
                return Err(refuse(bad(
                    "KekIdentityRemoved",
                    format!(
                        "The identity that reaches the customer-managed key ({}) cannot be \
                         removed from the vault while the key uses it.",
                        c.describe_identity(existing.as_ref().unwrap_or(&Value::Null))
                    ),
                ))
                .await);
            }
        }
        // X-3, BK-10: a Deny policy assignment at the subscription or group refuses the vault
        // as it would be stored (logged in the activity log of an existing vault).
        let mut candidate = existing
            .clone()
            .unwrap_or_else(|| json!({"properties": {}}));
        candidate["type"] = json!(VAULT_TYPE);
        if let Some(c) = &new_cmk {
            candidate["properties"]["encryption"] =
                json!({"keyVaultProperties": {"keyUri": c.key_uri}});
        }
        if let Some(e) = p.policy_deny(&vault_id_hint, &candidate).await? {
            tracing::warn!(vault = %vault_id_hint, "{}", e.message);
            return Err(refuse(e).await);
        }
        let location = input["location"].as_str().map(str::to_string).or_else(|| {
            existing
                .as_ref()
                .and_then(|e| e["location"].as_str().map(str::to_string))
        });
        let mut properties = existing
            .as_ref()
            .map(|e| e["properties"].clone())
            .unwrap_or_else(|| json!({}));
        properties["provisioningState"] = json!("Succeeded");
        let mut body = json!({"location": location, "properties": properties});
        if let Some(t) = input.get("tags") {
            body["tags"] = t.clone();
        }
        // Step 1: the resource with its identities and its current encryption.
        if existing.is_none() {
            // A folder an unfinished move names belongs to the moved vault (its rename is
            // retried): never wiped.
            if crate::moves::journal_names(&self.data_dir, &dir) {
                return Err(KvError::conflict(format!(
                    "A backup vault moved from or to '{name}' has not finished moving its data; \
                     retry when the move has completed."
                ))
                .with_inner("UserErrorBackupVaultResourceMoveInProgress"));
            }
            let raw = kagi_crypto::random_bytes(32).map_err(|e| crate::state::io("rng", e))?;
            let sealed = p.seal_secret(&pmk_label(&vault_id_hint), &raw)?;
            state = VaultState {
                pmk_sealed: kagi_core::b64::encode(&sealed),
                ..VaultState::default()
            };
            // A vault of the same name deleted earlier leaves nothing behind (nor does a
            // creation of it that failed half-way).
            let _ = self.remove_blobs(&dir).await;
            p.clear_records(&vault_id_hint).await?;
            state.save(p, &vault_id_hint).await?;
        }
        let (status, stored) = p
            .put_resource(
                caller,
                PutResource {
                    at: vault_ref(sub, rg, name),
                    body,
                    identity: input.get("identity"),
                },
            )
            .await?;
        let v = VaultCtx {
            id: stored["id"].as_str().unwrap_or_default().to_string(),
            body: stored.clone(),
            dir: dir.clone(),
        };
        self.log(
            p,
            &v,
            activity_entry(
                Some(caller),
                &v.id,
                "Microsoft.RecoveryServices/vaults/write",
                "Succeeded",
                if existing.is_none() {
                    "Vault created (platform-managed key)."
                } else {
                    "Vault updated."
                },
                p.now(),
            ),
        )
        .await;
        if !cmk_changes {
            return Ok((status, stored));
        }
        let Some(cmk) = new_cmk else {
            return Ok((status, stored));
        };
        // Step 2: the key, checked by really calling the key vault with the identity (BK-4).
        let job = self
            .jobs
            .start(host, &v.id, "ConfigureEncryption", name, p.now())
            .await?;
        let kid = match self.validate_cmk(p, &v, &cmk).await {
            Ok(kid) => kid,
            Err(e) => {
                job.fail(p.now(), &e).await;
                self.log(
                    p,
                    &v,
                    activity_entry(
                        Some(caller),
                        &v.id,
                        "Microsoft.RecoveryServices/vaults/encryption/write",
                        "Failed",
                        &e.message,
                        p.now(),
                    ),
                )
                .await;
                if existing.is_none() {
                    let _ = p.delete_resource(caller, vault_ref(sub, rg, name)).await;
                    let _ = self.remove_blobs(&dir).await;
                }
                return Err(e);
            }
        };
        // Step 3: store the encryption settings, then re-wrap every item's data key.
        let mut body = stored.clone();
        body["properties"]["encryption"] = json!({
            "keyVaultProperties": {"keyUri": cmk.key_uri},
            "kekIdentity": match &cmk.user_assigned {
                Some(u) => json!({"useSystemAssignedIdentity": false, "userAssignedIdentity": u}),
                None => json!({"useSystemAssignedIdentity": true}),
            },
            "infrastructureEncryption": "Disabled",
            "lastUpdateStatus": "Succeeded",
        });
        // The tenant first: a crash after the vault body says "CMK" must never leave a vault
        // whose key tenant is unknown (BK-9's check would be skipped). Recorded early, it is
        // harmless: it only matters once the body names a key.
        let mut state = VaultState::load(p, &v.id).await?.unwrap_or(state);
        state.cmk_tenant_id = current_tenant.clone();
        state.save(p, &v.id).await?;
        let (_, stored) = p
            .put_resource(
                caller,
                PutResource {
                    at: vault_ref(sub, rg, name),
                    body,
                    identity: None,
                },
            )
            .await?;
        let mut state = VaultState::load(p, &v.id).await?.unwrap_or(state);
        state.current_kid = Some(kid.clone());
        state.resolved_at = p.now();
        state.save(p, &v.id).await?;
        KeyVersionInUse {
            kid: Some(kid.clone()),
            resolved_at: p.now(),
        }
        .save(p, &v.id)
        .await?;
        let v = VaultCtx {
            body: stored.clone(),
            ..v
        };
        self.log(
            p,
            &v,
            activity_entry(
                Some(caller),
                &v.id,
                "Microsoft.RecoveryServices/vaults/encryption/write",
                "Succeeded",
                &format!(
                    "Customer-managed key assigned: {} (version in use {kid}), through the {}.",
                    cmk.key_uri,
                    cmk.describe_identity(&stored)
                ),
                p.now(),
            ),
        )
        .await;
        let svc = self.clone();
        let p2 = host.clone();
        let items: Vec<String> = state.items.keys().cloned().collect();
        tokio::spawn(async move {
            let total = items.len() as u64;
            job.progress(0, total, "Items");
            let mut written = 0u64;
            for (i, item) in items.iter().enumerate() {
                match svc.rewrap_item(p2.as_ref(), &v, item).await {
                    Ok(n) => written += n,
                    Err(e) => {
                        job.fail(p2.now(), &e).await;
                        return;
                    }
                }
                job.progress(i as u64 + 1, total, "Items");
            }
            job.complete(
                p2.now(),
                json!({"itemsRewrapped": total, "keyEntriesWritten": written}),
            )
            .await;
        });
        Ok((status, stored))
    }

    /// BK-4: the key URI, the key vault's properties, the key, and the identity's get, list,
    /// wrapKey and unwrapKey — the last four by calling the vault. Returns the versioned kid.
    pub(crate) async fn validate_cmk(
        &self,
        p: &dyn ServiceHost,
        v: &VaultCtx,
        cmk: &CmkConfig,
    ) -> Result<String, KvError> {
        let who = cmk.describe_identity(&v.body);
        let req = KeyRequest {
            key_uri: &cmk.key_uri,
            resource_id: &v.id,
            location: v.body["location"].as_str().unwrap_or(""),
            user_assigned: cmk.user_assigned.as_deref(),
            who: &who,
        };
        self.keys.validate(p, &req).await
    }

    /// Why vault `name` may not be deleted now (409): it still protects items, or backup
    /// agents are registered to it. Its `DELETE` and a resource group's deletion ask.
    pub(crate) async fn delete_refusal(
        &self,
        p: &dyn ServiceHost,
        sub: &str,
        rg: &str,
        name: &str,
    ) -> Result<(), KvError> {
        if let Some(s) = VaultState::load(p, &vault_id(sub, rg, name)).await?
            && !s.items.is_empty()
        {
            return Err(KvError::conflict(format!(
                "The backup vault '{name}' still protects {} item(s); stop protection first.",
                s.items.len()
            ))
            .with_inner("VaultHasProtectedItems"));
        }
        // Registered machines keep their backups here: deleting would destroy them silently.
        let machines = crate::agents::registered_machines(p, &vault_id(sub, rg, name)).await?;
        if !machines.is_empty() {
            return Err(KvError::conflict(format!(
                "The backup vault '{name}' has {} registered backup agent(s) ({}); their backups \
                 would be lost. Unregister them first.",
                machines.len(),
                machines.join(", ")
            ))
            .with_inner("VaultHasRegisteredAgents"));
        }
        Ok(())
    }

    pub(crate) async fn delete_vault(
        &self,
        p: &dyn ServiceHost,
        caller: &Principal,
        sub: &str,
        rg: &str,
        name: &str,
    ) -> Result<(u16, Value), KvError> {
        let dir = vault_dir(&self.data_dir, sub, rg, name);
        let _g = self.lock_vault(&dir).await?;
        if p.get_resource(caller, vault_ref(sub, rg, name)).is_err() {
            return Ok((204, Value::Null));
        }
        self.delete_refusal(p, sub, rg, name).await?;
        // Its documents and activity log go in the store transaction that deletes it; its
        // blobs after.
        let status = p.delete_resource(caller, vault_ref(sub, rg, name)).await?;
        let _ = self.remove_blobs(&dir).await;
        Ok((status, Value::Null))
    }
}
