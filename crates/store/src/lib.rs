//! kagi's persistence behind a small trait.
//!
//! The store keeps what must survive a crash: resource groups, principals, vaults, keys and
//! their versions (private material only as sealed bytes — the store never sees a plaintext
//! key), the directory, events, and the non-blob records of kagi's storage services (their
//! documents and activity logs, [`services`]), policy assignments, and action groups and
//! activity log alerts with their notifications ([`alerts`]). It has no opinion on rules; the
//! service decides, the store records atomically.
//! [`SqlStore`] is the embedded default (WAL, `synchronous=FULL`, so an acknowledged write
//! survives kill -9 and power loss); the trait is what a PostgreSQL store will implement.

#![forbid(unsafe_code)]

pub mod alerts;
pub mod changes;
#[cfg(feature = "contract")]
pub mod contract;
pub mod directory;
pub mod events;
pub mod lease;
pub mod moves;
mod secrets;
pub mod services;
mod sql;

use async_trait::async_trait;
use kagi_core::key::{KeyVersionInfo, Tags};
use kagi_core::vault::VaultProperties;
use kagi_core::{KeyVersion, ObjectName, VaultName};

pub use alerts::{AlertDeadLetter, AlertNotification, AlertStore, MonitorRecord};
pub use directory::{
    CertificateRecord, DirectoryStore, LockRecord, ResourceRecord, RoleAssignmentRecord,
    RoleDefinitionRecord,
};
pub use moves::MoveStore;
pub use secrets::{SecretRecord, SecretVersionRecord};
pub use services::{
    ActivityRecord, DocumentCondition, DocumentRef, ServiceDocument, ServiceImport,
};
pub use sql::{Dialect, SqlStore, StoreLocation};

/// A store failure. The service maps every variant to a 5xx (or 409 for [`Self::Conflict`]):
/// none of them is the client's fault.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The backend failed (I/O, a lost connection, a constraint the trait does not name). The
    /// message is the backend's, without row data; the type is the same for every backend,
    /// so callers never see the backend's own error types.
    #[error("database error: {0}")]
    Database(String),
    /// A stored row could not be decoded (corruption or a newer format).
    #[error("corrupt record in {table}: {detail}")]
    Corrupt {
        /// Table name.
        table: &'static str,
        /// What failed.
        detail: String,
    },
    /// A uniqueness rule was violated (the row exists).
    #[error("conflict: {0}")]
    Conflict(String),
    /// Concurrent transactions kept changing what this one read (PostgreSQL's serialisation
    /// failure, 40001, on a store several nodes share); the store ran it again a few times
    /// before giving up. Nothing was written.
    #[error("contended: {0}")]
    Contended(String),
}

// Backends turn their own errors into the neutral one at their boundary.
impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        if sql::is_serialization_failure(&e) {
            return Self::Contended(e.to_string());
        }
        Self::Database(e.to_string())
    }
}

/// Result of store calls.
pub type Result<T> = std::result::Result<T, StoreError>;

/// A resource group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResourceGroupRecord {
    /// Subscription id.
    pub subscription_id: String,
    /// Name as created.
    pub name: String,
    /// Region.
    pub location: String,
    /// Tags.
    pub tags: Tags,
}

/// A principal that can obtain tokens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrincipalRecord {
    /// Object id (`oid`).
    pub object_id: String,
    /// Tenant (`tid`).
    pub tenant_id: String,
    /// Client (application) id.
    pub client_id: String,
    /// Display name.
    pub display_name: String,
    /// SHA-256 of the client secret (secrets are 256-bit random, so a fast hash suffices).
    pub secret_hash: Vec<u8>,
    /// `ServicePrincipal`, later `ManagedIdentity`, `User`.
    pub kind: String,
    /// Creation time.
    pub created: i64,
    /// For a managed identity: the resource it belongs to (system-assigned: the resource that
    /// owns it; user-assigned: its own resource id).
    pub resource_id: Option<String>,
}

/// A vault, live or soft-deleted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VaultRecord {
    /// Globally unique name.
    pub name: VaultName,
    /// Subscription id.
    pub subscription_id: String,
    /// Resource group name as given.
    pub resource_group: String,
    /// Region.
    pub location: String,
    /// ARM tags.
    pub tags: Tags,
    /// Properties.
    pub properties: VaultProperties,
    /// Creation time.
    pub created: i64,
    /// Last change.
    pub updated: i64,
    /// Set while soft-deleted.
    pub deleted_at: Option<i64>,
    /// When a soft-deleted vault is purged.
    pub purge_at: Option<i64>,
}

/// One version of a key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyVersionRecord {
    /// Version id.
    pub version: KeyVersion,
    /// Order of creation within the key (the highest is the current version).
    pub seq: i64,
    /// Everything public about the version.
    pub info: KeyVersionInfo,
    /// The private key, sealed under the root key (opaque here).
    pub sealed_private: Vec<u8>,
}

/// A versioned object (a key, a secret) with all its versions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectRecord<V> {
    /// Name as first created.
    pub name: ObjectName,
    /// Set while soft-deleted.
    pub deleted_at: Option<i64>,
    /// When a soft-deleted object is purged.
    pub purge_at: Option<i64>,
    /// Versions in creation order.
    pub versions: Vec<V>,
}

/// A key with all its versions.
pub type KeyRecord = ObjectRecord<KeyVersionRecord>;

/// What kagi persists. Every method is one atomic transaction.
#[async_trait]
pub trait Store:
    DirectoryStore + MoveStore + AlertStore + Send + Sync + std::fmt::Debug + 'static
{
    /// Reads a metadata value.
    async fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>>;
    /// Writes a metadata value if absent; returns the value now stored (so two racing
    /// first starts agree on one value).
    async fn put_meta_if_absent(&self, key: &str, value: &[u8]) -> Result<Vec<u8>>;

    /// Records a tenant and subscription pair (idempotent).
    async fn ensure_subscription(
        &self,
        tenant_id: &str,
        subscription_id: &str,
        now: i64,
    ) -> Result<()>;
    /// The tenant of a subscription.
    async fn subscription_tenant(&self, subscription_id: &str) -> Result<Option<String>>;
    /// All subscriptions with their tenants.
    async fn list_subscriptions(&self) -> Result<Vec<(String, String)>>;

    /// Creates or updates a resource group.
    async fn put_resource_group(&self, rg: &ResourceGroupRecord, now: i64) -> Result<()>;
    /// The resource groups of a subscription, by name (compared case-insensitively).
    async fn list_resource_groups(&self, subscription_id: &str)
    -> Result<Vec<ResourceGroupRecord>>;
    /// Reads a resource group (name compared case-insensitively).
    async fn get_resource_group(
        &self,
        subscription_id: &str,
        name: &str,
    ) -> Result<Option<ResourceGroupRecord>>;
    /// Deletes an empty resource group (name compared case-insensitively), with the role
    /// assignments and policy assignments at or below its scope, in one transaction. `false`
    /// when there is no such group. `Conflict`, and nothing changed, while the group still
    /// holds a live vault, a resource, a monitor resource, or a lock at or below its scope:
    /// its contents go first (a soft-deleted vault stays, as it does in Azure).
    async fn delete_resource_group(&self, subscription_id: &str, name: &str) -> Result<bool>;

    /// Creates a principal.
    async fn put_principal(&self, p: &PrincipalRecord) -> Result<()>;
    /// Finds a principal by client id.
    async fn principal_by_client_id(&self, client_id: &str) -> Result<Option<PrincipalRecord>>;

    /// Creates or replaces a vault record.
    async fn put_vault(&self, v: &VaultRecord) -> Result<()>;
    /// Creates a vault record; `Conflict` (and nothing changed) when the name exists, live or
    /// deleted — on a shared store, two nodes creating one name cannot both succeed.
    async fn insert_vault(&self, v: &VaultRecord) -> Result<()>;
    /// Replaces a vault record that is still `expected`; `Conflict` (and nothing changed) when
    /// the stored record is another — on a shared store, another node changed the vault since
    /// this node read it, and the change must not be overwritten.
    async fn replace_vault(&self, v: &VaultRecord, expected: &VaultRecord) -> Result<()>;
    /// Every vault, live and deleted.
    async fn list_vaults(&self) -> Result<Vec<VaultRecord>>;
    /// One vault, live or deleted (a node following another's change reads just that one).
    async fn get_vault(&self, name: &VaultName) -> Result<Option<VaultRecord>> {
        Ok(self
            .list_vaults()
            .await?
            .into_iter()
            .find(|v| &v.name == name))
    }
    /// Removes a vault and everything in it.
    async fn purge_vault(&self, name: &VaultName) -> Result<()>;

    /// Every key of a vault, with versions.
    async fn load_keys(&self, vault: &VaultName) -> Result<Vec<KeyRecord>>;
    /// Adds a version, creating the key row if it is new. Fails with `Conflict` if the
    /// version exists.
    async fn add_key_version(
        &self,
        vault: &VaultName,
        name: &ObjectName,
        version: &KeyVersionRecord,
    ) -> Result<()>;
    /// Replaces the public part of a version (attributes, ops, tags).
    async fn update_key_version(
        &self,
        vault: &VaultName,
        name: &ObjectName,
        version: &KeyVersion,
        info: &KeyVersionInfo,
    ) -> Result<()>;
    /// Marks a key deleted (with times) or live again (`None`).
    async fn set_key_deleted(
        &self,
        vault: &VaultName,
        name: &ObjectName,
        deleted: Option<(i64, i64)>,
    ) -> Result<()>;
    /// Removes a key and all its versions.
    async fn purge_key(&self, vault: &VaultName, name: &ObjectName) -> Result<()>;
    /// Inserts a whole key (restore). Fails with `Conflict` if the name exists.
    async fn insert_key(&self, vault: &VaultName, key: &KeyRecord) -> Result<()>;

    // --- secrets ---
    /// Every secret of a vault, with versions (values sealed).
    async fn load_secrets(&self, vault: &VaultName) -> Result<Vec<SecretRecord>>;
    /// Adds a secret version, creating the secret row if it is new. Fails with `Conflict` if
    /// the version exists.
    async fn add_secret_version(
        &self,
        vault: &VaultName,
        name: &ObjectName,
        version: &SecretVersionRecord,
    ) -> Result<()>;
    /// Replaces everything but the value of a version (content type, attributes, tags).
    async fn update_secret_version(
        &self,
        vault: &VaultName,
        name: &ObjectName,
        version: &KeyVersion,
        info: &kagi_core::secret::SecretVersionInfo,
    ) -> Result<()>;
    /// Marks a secret deleted (with times) or live again (`None`).
    async fn set_secret_deleted(
        &self,
        vault: &VaultName,
        name: &ObjectName,
        deleted: Option<(i64, i64)>,
    ) -> Result<()>;
    /// Removes a secret and all its versions.
    async fn purge_secret(&self, vault: &VaultName, name: &ObjectName) -> Result<()>;
    /// Inserts a whole secret (restore). Fails with `Conflict` if the name exists.
    async fn insert_secret(&self, vault: &VaultName, secret: &SecretRecord) -> Result<()>;

    // --- rotation policies and events (schema: `events::SCHEMA`) ---
    /// A key's rotation policy, if one was set.
    async fn get_rotation_policy(
        &self,
        vault: &VaultName,
        name: &ObjectName,
    ) -> Result<Option<kagi_core::rotation::RotationPolicy>>;
    /// Sets a key's rotation policy (the key row must exist).
    async fn put_rotation_policy(
        &self,
        vault: &VaultName,
        name: &ObjectName,
        policy: &kagi_core::rotation::RotationPolicy,
    ) -> Result<()>;
    /// Every rotation policy of a vault, by lower-case key name.
    async fn list_rotation_policies(
        &self,
        vault: &VaultName,
    ) -> Result<Vec<(String, kagi_core::rotation::RotationPolicy)>>;
    /// The event marks of a vault, or of one key or secret.
    async fn load_event_marks(
        &self,
        vault: &VaultName,
        only: Option<(events::MarkTable, &str)>,
    ) -> Result<Vec<events::EventMark>>;
    /// In one transaction: removes `unmarks`, then for each emission inserts its mark and, when
    /// the mark is new, the event and its deliveries. Returns which emissions were new.
    async fn record_events(
        &self,
        vault: &VaultName,
        emissions: &[events::EventEmission],
        unmarks: &[events::EventMark],
        now: i64,
    ) -> Result<Vec<bool>>;
    /// Creates or replaces an event subscription; `true` when it was created.
    async fn put_event_subscription(
        &self,
        vault: &VaultName,
        sub: &events::EventSubscriptionRecord,
    ) -> Result<bool>;
    /// Every event subscription of a vault.
    async fn list_event_subscriptions(
        &self,
        vault: &VaultName,
    ) -> Result<Vec<events::EventSubscriptionRecord>>;
    /// Deletes an event subscription with its deliveries and dead letters; `true` if it existed.
    async fn delete_event_subscription(&self, vault: &VaultName, name: &str) -> Result<bool>;
    /// Pending deliveries whose next attempt is due at `now_ms`, oldest first.
    async fn due_deliveries(&self, now_ms: i64, limit: u32)
    -> Result<Vec<events::PendingDelivery>>;
    /// The earliest next attempt of any pending delivery (Unix milliseconds).
    async fn next_delivery_ms(&self) -> Result<Option<i64>>;
    /// A delivery succeeded: it is removed (and its event once no delivery needs it).
    async fn delivery_succeeded(&self, event_id: &str, vault: &str, sub: &str) -> Result<()>;
    /// A delivery failed: retried at `next_attempt_ms`, or dead-lettered when `None`.
    #[allow(clippy::too_many_arguments)]
    async fn delivery_failed(
        &self,
        event_id: &str,
        vault: &str,
        sub: &str,
        attempts: u32,
        next_attempt_ms: Option<i64>,
        error: &str,
        now: i64,
    ) -> Result<()>;
    /// Dead-lettered deliveries of a subscription.
    async fn dead_letters(&self, vault: &VaultName, sub: &str) -> Result<Vec<events::DeadLetter>>;

    // --- storage services and policy assignments (schema: `services::SCHEMA`) ---
    /// A document of a resource (`resource_key`: its lower-case ARM id), if it exists.
    async fn get_service_document(
        &self,
        resource_key: &str,
        kind: &str,
        name: &str,
    ) -> Result<Option<ServiceDocument>>;
    /// Creates or replaces a document of a resource.
    async fn put_service_document(&self, resource_key: &str, doc: &ServiceDocument) -> Result<()>;
    /// Creates or replaces a document of a resource only if document `guard` (of any resource,
    /// possibly the one written) satisfies `holds`, checked in the writing transaction: a
    /// concurrent change of `guard` waits for this write to commit, or this write sees the
    /// change. `false`, and nothing written, when it does not hold. A compare-and-set, and a
    /// write fenced by another document (a node that is no longer a resource's home must not
    /// record what it did after another node took it over).
    async fn put_service_document_if(
        &self,
        resource_key: &str,
        doc: &ServiceDocument,
        guard: DocumentRef<'_>,
        holds: DocumentCondition<'_>,
    ) -> Result<bool>;
    /// Deletes a document; `true` if it existed.
    async fn delete_service_document(
        &self,
        resource_key: &str,
        kind: &str,
        name: &str,
    ) -> Result<bool>;
    /// Every document of one kind of a resource, by name.
    async fn list_service_documents(
        &self,
        resource_key: &str,
        kind: &str,
    ) -> Result<Vec<ServiceDocument>>;
    /// Every document of one kind, of every resource: (resource key, document), by resource
    /// key and name.
    async fn list_service_documents_of_kind(
        &self,
        kind: &str,
    ) -> Result<Vec<(String, ServiceDocument)>>;
    /// Appends an entry to a resource's activity log; returns its position (1, 2, …).
    async fn append_service_activity(&self, resource_key: &str, at: i64, body: &str)
    -> Result<i64>;
    /// A resource's activity log, oldest first.
    async fn list_service_activity(&self, resource_key: &str) -> Result<Vec<ActivityRecord>>;
    /// Deletes every document and activity entry of a resource: what a resource that is gone
    /// left behind, before another one with its id is created.
    async fn delete_service_data(&self, resource_key: &str) -> Result<()>;
    /// Imports what an earlier kagi kept in files, in one transaction: the documents that do
    /// not exist yet, and the activity entries if the resource has none yet. Importing the
    /// same data again changes nothing, so a crash before the files were set aside is harmless.
    async fn import_service_data(&self, resource_key: &str, import: &ServiceImport) -> Result<()>;

    /// Every policy assignment: (lower-case id, body as JSON text), by id.
    async fn list_policy_assignments(&self) -> Result<Vec<(String, String)>>;
    /// Creates or replaces a policy assignment (`id` lower-case); `true` when it was created.
    async fn put_policy_assignment(&self, id: &str, body: &str, now: i64) -> Result<bool>;
    /// Deletes a policy assignment; returns the body it had.
    async fn delete_policy_assignment(&self, id: &str) -> Result<Option<String>>;
    /// Inserts the assignments that do not exist yet (an import of the earlier file), in one
    /// transaction.
    async fn import_policy_assignments(
        &self,
        assignments: &[(String, String)],
        now: i64,
    ) -> Result<()>;
    // --- the change feed of a shared store (`changes`) ---
    /// Every scope's last change number. Empty for a store one process has to itself
    /// (SQLite), where nothing changes behind the node's back.
    async fn change_marks(&self) -> Result<Vec<(String, i64)>> {
        Ok(Vec::new())
    }

    /// The change numbers of the directory and of one vault (`vault:<name>`), those that have
    /// one: what a node compares before serving a request when it must see every change.
    async fn change_marks_for(&self, vault: &str) -> Result<Vec<(String, i64)>> {
        let _ = vault;
        Ok(Vec::new())
    }

    /// A subscription to change notifications, when the backend delivers them (PostgreSQL's
    /// LISTEN on a primary; not on a standby, which the re-check of [`Self::change_marks`]
    /// covers).
    async fn watch_changes(&self) -> Result<Option<Box<dyn changes::ChangeWatch>>> {
        Ok(None)
    }

    /// Records a client assertion a node accepted (its client, a digest of its `jti`) until
    /// `forget_at`; `false` when another node of a shared store recorded it already and it has
    /// not expired (a replay). A SQLite store has one node, whose own replay cache decides:
    /// always `true`.
    async fn remember_assertion(
        &self,
        client: &str,
        key: &[u8],
        forget_at: i64,
        now: i64,
    ) -> Result<bool>;

    // --- leases for singleton work (`lease`) ---
    /// Takes the lease `name` for `holder` for `ttl_ms` (on the database's clock) when it is
    /// free, expired or `holder`'s already (a renewal); returns its fencing number, which
    /// grows each time the lease changes hands, or `None` while another holder has it.
    async fn acquire_lease(&self, name: &str, holder: &str, ttl_ms: i64) -> Result<Option<i64>>;

    /// Gives the lease up now (a node shutting down), if `holder` has it.
    async fn release_lease(&self, name: &str, holder: &str) -> Result<()>;

    /// Who holds the lease `name` now (unexpired, on the database's clock), if anyone. A
    /// SQLite store has one node, which holds every lease: `None` there.
    async fn lease_holder(&self, name: &str) -> Result<Option<String>>;

    /// Whether other nodes may share this store (PostgreSQL). A SQLite file is one node's.
    fn shared(&self) -> bool;
}
