//! The directory in memory: loaded from the store at start and written through to the store
//! first on every change, so an authorization decision reads no database and a change applies
//! to the very next request.

use std::collections::HashMap;

use kagi_core::rbac::RoleDefinitionProperties;
use kagi_store::{
    CertificateRecord, LockRecord, PrincipalRecord, ResourceRecord, RoleAssignmentRecord, Store,
    StoreError,
};
use serde_json::Value;

/// The in-memory directory. Its fields are public for the parts of the directory that still
/// live in the vault crate (identity-carrying resources, RBAC, locks, moves); every change goes
/// to the store first.
#[derive(Debug, Default)]
pub struct State {
    /// Principals by object id.
    pub principals: HashMap<String, PrincipalRecord>,
    /// Identity-carrying resources by lower-case id: the record and its parsed body.
    pub resources: HashMap<String, (ResourceRecord, Value)>,
    /// Custom role definitions by GUID: their scope and properties.
    pub custom_roles: HashMap<String, (String, RoleDefinitionProperties)>,
    /// Role assignments.
    pub assignments: Vec<RoleAssignmentRecord>,
    /// Management locks.
    pub locks: Vec<LockRecord>,
    /// Certificate credentials.
    pub certificates: Vec<CertificateRecord>,
    /// Subscriptions (lower-case) and the tenant each is in now.
    pub subscriptions: HashMap<String, String>,
}

impl State {
    /// Loads the directory from the store.
    pub async fn load(store: &dyn Store) -> Result<Self, StoreError> {
        let mut d = Self::default();
        for p in store.list_principals().await? {
            d.principals.insert(p.object_id.clone(), p);
        }
        for r in store.list_resources().await? {
            let body = serde_json::from_str(&r.body).map_err(|e| StoreError::Corrupt {
                table: "resources",
                detail: e.to_string(),
            })?;
            d.resources.insert(r.id.clone(), (r, body));
        }
        for r in store.list_role_definitions().await? {
            let props = serde_json::from_str(&r.body).map_err(|e| StoreError::Corrupt {
                table: "role_definitions",
                detail: e.to_string(),
            })?;
            d.custom_roles.insert(r.id.clone(), (r.scope, props));
        }
        d.assignments = store.list_role_assignments().await?;
        d.locks = store.list_locks().await?;
        d.certificates = store.list_principal_certificates().await?;
        for (sub, tenant) in store.list_subscriptions().await? {
            d.subscriptions
                .insert(sub.to_ascii_lowercase(), tenant.to_ascii_lowercase());
        }
        Ok(d)
    }

    /// Whether kagi knows a tenant: one that holds a subscription or a principal.
    pub fn tenant_known(&self, tenant: &str) -> bool {
        let t = tenant.to_ascii_lowercase();
        self.subscriptions.values().any(|s| *s == t)
            || self
                .principals
                .values()
                .any(|p| p.tenant_id.eq_ignore_ascii_case(&t))
    }
}
