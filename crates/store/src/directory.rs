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

/// Bindings get an id, the one identity they serve and an expiry (issue 11, item 12). Bindings
/// made before this migration served every identity of their resource and never expired: they
/// keep working (no identity named: any of the resource's, as before) for 30 days after the
/// upgrade, listed and revocable like new ones, so that an upgrade breaks no running workload
/// and the old weakness ends by itself. Their ids are `legacy-{n}`.
pub(crate) const BINDINGS_SCHEMA: &str = r#"
CREATE TABLE identity_bindings_v2 (
    id TEXT PRIMARY KEY, secret_hash BLOB NOT NULL UNIQUE, resource_id TEXT NOT NULL,
    client_id TEXT, created INTEGER NOT NULL, expires INTEGER NOT NULL);
INSERT INTO identity_bindings_v2 (id, secret_hash, resource_id, client_id, created, expires)
    SELECT 'legacy-' || rowid, secret_hash, resource_id, NULL, created,
           CAST(strftime('%s', 'now') AS INTEGER) + 30 * 86400
    FROM identity_bindings;
DROP TABLE identity_bindings;
ALTER TABLE identity_bindings_v2 RENAME TO identity_bindings;
CREATE INDEX identity_bindings_resource ON identity_bindings(resource_id);
"#;

/// The meta row holding the sealed token signing key.
pub const SIGNING_KEY: &str = "token_signing_key";
/// The meta row holding the retired signing keys (JSON), which only validate until their time.
pub const RETIRED_SIGNING_KEYS: &str = "token_signing_keys_retired";

/// The secret that lets a process act as a resource's managed identity: only its SHA-256 is
/// kept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BindingRecord {
    /// Binding id (a GUID; `legacy-{n}` for bindings made before bindings had ids).
    pub id: String,
    /// SHA-256 of the secret.
    pub secret_hash: Vec<u8>,
    /// The resource, lower-case.
    pub resource_id: String,
    /// The client id of the one identity the binding serves; `None` only for legacy bindings,
    /// which serve any identity of the resource until they expire.
    pub client_id: Option<String>,
    /// Creation time.
    pub created: i64,
    /// The binding stops working at this time.
    pub expires: i64,
}

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

    /// Records a binding, and forgets the bindings that expired before `now` (of any resource).
    async fn put_binding(&self, b: &BindingRecord, now: i64) -> Result<()>;
    /// The binding of a secret (by its hash), expired or not.
    async fn binding_by_secret(&self, secret_hash: &[u8]) -> Result<Option<BindingRecord>>;
    /// The bindings of a resource, oldest first.
    async fn list_bindings(&self, resource_id: &str) -> Result<Vec<BindingRecord>>;
    /// Deletes one binding of a resource; `false` when it has no binding with that id.
    async fn delete_binding(&self, resource_id: &str, id: &str) -> Result<bool>;

    /// Replaces the token signing key: `current` (sealed) becomes the signing key and
    /// `retired` the list of keys that only validate, in one transaction, provided the stored
    /// signing key is still `expected` (`false`, and nothing written, when it is not: someone
    /// rotated in between).
    async fn replace_signing_key(
        &self,
        expected: &[u8],
        current: &[u8],
        retired: &[u8],
    ) -> Result<bool>;

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
