//! Records of kagi's own storage services (backup vaults today; disk encryption sets and SQL
//! servers later) that are not blobs, and the policy assignments. The schema is [`SCHEMA`];
//! the SQL is in `sql/services.rs`.
//!
//! - **Service documents** (`service_documents`): small JSON documents a service keeps about
//!   one of its resources, addressed by (resource key, kind, name). The store does not read
//!   them; the service owns their shape. Backup vaults keep `state` (name empty: the vault's
//!   state), `job` (name: the job id) and `agent-registry` (name empty).
//! - **Service activity** (`service_activity`): an append-only log per resource, numbered
//!   1, 2, 3, … in the order the store committed the entries.
//! - **Policy assignments** (`policy_assignments`): one JSON body per assignment id.
//!
//! The resource key is the resource's lower-case ARM id, the same as `resources.id`. Rows are
//! not tied to `resources` by a foreign key, because a service may write a resource's first
//! document before the resource row (a backup vault seals its platform key first); instead
//! [`crate::DirectoryStore::delete_resource`] deletes them in the transaction that deletes the
//! resource, and [`crate::MoveStore::move_resource`] re-keys them in the transaction that moves
//! it — so they never outlive their resource nor stay behind at its old id.

/// Schema of service documents, service activity and policy assignments, applied as one
/// migration.
pub(crate) const SCHEMA: &str = r#"
CREATE TABLE service_documents (
    resource_key TEXT NOT NULL, kind TEXT NOT NULL, name TEXT NOT NULL,
    body TEXT NOT NULL, updated INTEGER NOT NULL,
    PRIMARY KEY (resource_key, kind, name));
CREATE TABLE service_activity (
    resource_key TEXT NOT NULL, seq INTEGER NOT NULL, at INTEGER NOT NULL, body TEXT NOT NULL,
    PRIMARY KEY (resource_key, seq));
CREATE TABLE policy_assignments (
    id TEXT PRIMARY KEY, body TEXT NOT NULL, updated INTEGER NOT NULL);
"#;

/// One service document.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceDocument {
    /// What it is (`state`, `job`, `agent-registry`, …), chosen by the service.
    pub kind: String,
    /// Which one of its kind (a job id; empty for a resource's only document of a kind).
    pub name: String,
    /// The document (JSON text).
    pub body: String,
    /// When it was last written (Unix seconds, platform clock).
    pub updated: i64,
}

/// The document a conditional write depends on ([`crate::Store::put_service_document_if`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DocumentRef<'a> {
    /// Its resource's key.
    pub resource_key: &'a str,
    /// Its kind.
    pub kind: &'a str,
    /// Its name.
    pub name: &'a str,
}

/// What a conditional write asks of the document it depends on: given its body (`None`:
/// absent), whether the write goes ahead.
pub type DocumentCondition<'a> = &'a (dyn Fn(Option<&str>) -> bool + Send + Sync);

/// One entry of a resource's activity log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ActivityRecord {
    /// Position in the resource's log (1, 2, 3, …).
    pub seq: i64,
    /// When it was appended (Unix seconds).
    pub at: i64,
    /// The entry (JSON text).
    pub body: String,
}

/// A resource's documents and activity found in files written by an earlier kagi, imported
/// once into the store ([`crate::Store::import_service_data`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceImport {
    /// Documents (their `updated` is the time of the import's caller).
    pub documents: Vec<ServiceDocument>,
    /// Activity entries, oldest first: (time, JSON text).
    pub activity: Vec<(i64, String)>,
}
