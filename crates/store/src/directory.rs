//! The directory: principals beyond the bootstrap administrator, ARM resources that carry
//! identities (user-assigned identities, workloads, and the storage services to come), the
//! secrets that bind a workload to its resource, role definitions and assignments, and locks.

use async_trait::async_trait;

use crate::{PrincipalRecord, Result};

/// Schema of the directory, applied as one migration.
pub(crate) const SCHEMA: &str = r#"
ALTER TABLE principals ADD COLUMN resource_id TEXT;
ALTER TABLE principals ADD COLUMN deleted INTEGER NOT NULL DEFAULT 0;
CREATE INDEX principals_resource ON principals(resource_id);
CREATE TABLE resources (
    id TEXT PRIMARY KEY, type TEXT NOT NULL, subscription_id TEXT NOT NULL,
    resource_group TEXT NOT NULL, name TEXT NOT NULL, location TEXT NOT NULL,
    body TEXT NOT NULL, created INTEGER NOT NULL, updated INTEGER NOT NULL);
CREATE TABLE identity_bindings (
    secret_hash BLOB PRIMARY KEY, resource_id TEXT NOT NULL, created INTEGER NOT NULL);
CREATE TABLE role_definitions (
    id TEXT PRIMARY KEY, scope TEXT NOT NULL, body TEXT NOT NULL);
CREATE TABLE role_assignments (
    id TEXT PRIMARY KEY, scope TEXT NOT NULL, principal_id TEXT NOT NULL,
    role_definition_id TEXT NOT NULL, created INTEGER NOT NULL);
CREATE TABLE principal_certificates (
    thumbprint TEXT PRIMARY KEY, sha1 TEXT NOT NULL, object_id TEXT NOT NULL, spki BLOB NOT NULL,
    created INTEGER NOT NULL);
CREATE TABLE locks (
    id TEXT PRIMARY KEY, scope TEXT NOT NULL, name TEXT NOT NULL, level TEXT NOT NULL,
    notes TEXT NOT NULL);
"#;

/// An ARM resource kept generically: its id (lower-case), type, place, and body (JSON).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResourceRecord {
    /// Resource id, lower-case.
    pub id: String,
    /// Resource type (`Microsoft.ManagedIdentity/userAssignedIdentities`).
    pub resource_type: String,
    /// Subscription.
    pub subscription_id: String,
    /// Resource group as given.
    pub resource_group: String,
    /// Name as given.
    pub name: String,
    /// Region.
    pub location: String,
    /// The resource body as answered (JSON text).
    pub body: String,
    /// Creation time.
    pub created: i64,
    /// Last change.
    pub updated: i64,
}

/// A certificate credential of a principal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertificateRecord {
    /// SHA-256 thumbprint of the certificate DER, hex (`x5t#S256`).
    pub sha256: String,
    /// SHA-1 thumbprint, hex (`x5t`).
    pub sha1: String,
    /// Principal object id.
    pub object_id: String,
    /// SubjectPublicKeyInfo DER.
    pub spki: Vec<u8>,
    /// Registration time.
    pub created: i64,
}

/// A role assignment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoleAssignmentRecord {
    /// Assignment GUID.
    pub id: String,
    /// Normalised scope.
    pub scope: String,
    /// Principal object id.
    pub principal_id: String,
    /// Role definition GUID.
    pub role_definition_id: String,
    /// Creation time.
    pub created: i64,
}

/// A custom role definition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoleDefinitionRecord {
    /// GUID.
    pub id: String,
    /// Scope it was created at.
    pub scope: String,
    /// Properties (JSON text).
    pub body: String,
}

/// A management lock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LockRecord {
    /// `{scope}/providers/Microsoft.Authorization/locks/{name}`, lower-case.
    pub id: String,
    /// Normalised scope.
    pub scope: String,
    /// Name as given.
    pub name: String,
    /// `CanNotDelete` or `ReadOnly`.
    pub level: String,
    /// Notes.
    pub notes: String,
}

/// What the directory persists. Each method is one transaction.
#[async_trait]
pub trait DirectoryStore: Send + Sync {
    /// Every principal that is not deleted.
    async fn list_principals(&self) -> Result<Vec<PrincipalRecord>>;
    /// Marks a principal deleted (its tokens stop working; the object id is never reused).
    async fn delete_principal(&self, object_id: &str) -> Result<()>;
    /// Replaces a principal's secret hash.
    async fn set_principal_secret(&self, object_id: &str, secret_hash: &[u8]) -> Result<()>;

    /// Registers a certificate credential for a principal.
    async fn add_principal_certificate(&self, c: &CertificateRecord) -> Result<()>;
    /// Every certificate credential of a principal that is not deleted.
    async fn list_principal_certificates(&self) -> Result<Vec<CertificateRecord>>;

    /// Creates or replaces a resource, and in the same transaction creates the principals
    /// given and deletes those named (its system-assigned identity's life follows it).
    async fn put_resource(
        &self,
        r: &ResourceRecord,
        new_principals: &[PrincipalRecord],
        deleted_principals: &[String],
    ) -> Result<()>;
    /// Every resource.
    async fn list_resources(&self) -> Result<Vec<ResourceRecord>>;
    /// Deletes a resource, its bindings, its service documents and activity log
    /// ([`crate::services`]), and the principals named, in one transaction.
    async fn delete_resource(&self, id: &str, deleted_principals: &[String]) -> Result<()>;

    /// Records a binding secret (hash) for a resource.
    async fn put_binding(&self, secret_hash: &[u8], resource_id: &str, now: i64) -> Result<()>;
    /// The resource a binding secret belongs to.
    async fn binding_resource(&self, secret_hash: &[u8]) -> Result<Option<String>>;

    /// Creates or replaces a custom role definition.
    async fn put_role_definition(&self, d: &RoleDefinitionRecord) -> Result<()>;
    /// Deletes a custom role definition.
    async fn delete_role_definition(&self, id: &str) -> Result<()>;
    /// Every custom role definition.
    async fn list_role_definitions(&self) -> Result<Vec<RoleDefinitionRecord>>;

    /// Creates a role assignment.
    async fn put_role_assignment(&self, a: &RoleAssignmentRecord) -> Result<()>;
    /// Deletes a role assignment.
    async fn delete_role_assignment(&self, id: &str) -> Result<()>;
    /// Every role assignment.
    async fn list_role_assignments(&self) -> Result<Vec<RoleAssignmentRecord>>;

    /// Creates or replaces a lock.
    async fn put_lock(&self, l: &LockRecord) -> Result<()>;
    /// Deletes a lock.
    async fn delete_lock(&self, id: &str) -> Result<()>;
    /// Every lock.
    async fn list_locks(&self) -> Result<Vec<LockRecord>>;
}
