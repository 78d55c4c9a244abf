//! A backup vault as requests see it ([`VaultCtx`]), its customer-managed key settings
//! ([`CmkConfig`]), its activity log entries and the names of its resource and platform key:
//! what every part of the service (vaults, items, agents, moves, schedules) shares.

use std::path::PathBuf;

use kagi_core::KvError;
use kagi_core::time::rfc3339;
use kagi_host::{Principal, ResourceRef, ServiceHost};
use serde_json::{Value, json};

use crate::state::{VaultState, log_activity};
use crate::{BackupService, VAULT_TYPE};

/// A backup vault's id from its subscription, group and name (the store lower-cases it).
pub(crate) fn vault_id(sub: &str, rg: &str, name: &str) -> String {
    format!("/subscriptions/{sub}/resourceGroups/{rg}/providers/{VAULT_TYPE}/{name}")
}

/// Where backup vault `name` of group `rg` of subscription `sub` is, for the host.
pub(crate) fn vault_ref<'a>(sub: &'a str, rg: &'a str, name: &'a str) -> ResourceRef<'a> {
    ResourceRef {
        subscription: sub,
        resource_group: rg,
        resource_type: VAULT_TYPE,
        name,
    }
}

/// A vault as a request sees it.
#[derive(Clone, Debug)]
pub(crate) struct VaultCtx {
    /// The resource id as stored.
    pub id: String,
    /// The resource body.
    pub body: Value,
    /// The folder of its blobs.
    pub dir: PathBuf,
}

impl VaultCtx {
    /// The id the vault's platform key and its key entries are bound to: the id it was
    /// created with (recorded in its state by its first move), which a move does not change.
    pub(crate) async fn key_binding(&self, p: &dyn ServiceHost) -> Result<String, KvError> {
        Ok(VaultState::load(p, &self.id)
            .await?
            .and_then(|s| s.pmk_binding)
            .unwrap_or_else(|| self.id.clone()))
    }
}

/// The CMK settings of a vault body, when it has any.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct CmkConfig {
    pub key_uri: String,
    /// `None`: the system-assigned identity; `Some(id)`: that user-assigned identity.
    pub user_assigned: Option<String>,
}

impl CmkConfig {
    pub(crate) fn of(body: &Value) -> Option<Self> {
        let e = &body["properties"]["encryption"];
        let key_uri = e["keyVaultProperties"]["keyUri"].as_str()?.to_string();
        Some(Self {
            key_uri,
            user_assigned: identity_choice(&e["kekIdentity"]),
        })
    }

    pub(crate) fn describe_identity(&self, body: &Value) -> String {
        match &self.user_assigned {
            Some(u) => format!("user-assigned identity '{u}'"),
            None => format!(
                "system-assigned identity {}",
                body["identity"]["principalId"].as_str().unwrap_or("(none)")
            ),
        }
    }
}

/// The identity a `kekIdentity` block chooses: `None` for the system-assigned one.
pub(crate) fn identity_choice(kek_identity: &Value) -> Option<String> {
    let ua = kek_identity["userAssignedIdentity"]
        .as_str()
        .filter(|s| !s.is_empty());
    match (kek_identity["useSystemAssignedIdentity"].as_bool(), ua) {
        (Some(true), _) | (_, None) => None,
        (_, Some(u)) => Some(u.to_string()),
    }
}

/// An entry of a vault's activity log.
pub(crate) fn activity_entry(
    caller: Option<&Principal>,
    resource: &str,
    operation: &str,
    status: &str,
    message: &str,
    now: i64,
) -> Value {
    json!({
        "eventTimestamp": rfc3339(now),
        "operationName": operation,
        "status": status,
        "resourceId": resource,
        "caller": caller.map(|c| c.object_id.clone()).unwrap_or_else(|| "Microsoft.RecoveryServices".into()),
        "message": message,
    })
}

impl BackupService {
    /// Writes an activity-log entry (failures to write are logged, never answered).
    pub(crate) async fn log(&self, p: &dyn ServiceHost, v: &VaultCtx, entry: Value) {
        if let Err(e) = log_activity(p, &v.id, &entry).await {
            tracing::error!(error = %e, vault = %v.id, "activity log not written");
        }
    }

    /// Writes an activity-log entry of the service itself (no caller) about `v`, now.
    pub(crate) async fn note(
        &self,
        p: &dyn ServiceHost,
        v: &VaultCtx,
        operation: &str,
        status: &str,
        message: &str,
    ) {
        let entry = activity_entry(None, &v.id, operation, status, message, p.now());
        self.log(p, v, entry).await;
    }
}
