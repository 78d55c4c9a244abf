//! What a kagi storage service (backup vaults today; encrypted disks and SQL databases next)
//! may ask of the platform it runs in: the [`ServiceHost`] trait.
//!
//! A service never sees the whole platform (`kagi_vault::Platform` implements this trait); it
//! gets the clock, its configuration, its ARM resources and the records kept with them
//! (documents and an activity log, deleted and moved with the resource in the same store
//! transaction), tokens for its resources' managed identities, the facts about a key vault it
//! needs for its acceptance rules, policy evaluation, and sealing of its own platform keys
//! under the root key. Keys in key vaults are reached only through the key vault's data plane
//! over HTTPS, with an identity token (`kagi-cmk`), so those calls are authorized, firewalled
//! and audited like anyone's.
//!
//! What a service offers the platform in return is the [`ResourceProvider`] trait: its ARM
//! namespace and resource types, the requests, moves and agent requests under it, the audit
//! log's names for them, and whether vault firewalls trust its resources' identities.

#![forbid(unsafe_code)]

mod provider;
mod takeover;

use std::path::PathBuf;

use async_trait::async_trait;
use kagi_core::KvError;
use serde_json::Value;
use zeroize::Zeroizing;

pub use kagi_identity::Principal;
pub use provider::{
    AdmittedAgent, AgentCall, AgentHead, AgentReply, ArmReply, ArmRequest, MAX_AGENT_JSON_BYTES,
    ResourceProvider, json_body, move_not_supported,
};
pub use takeover::{note_takeover, spawn_takeover_sweep};

/// Results of the host: errors in the API's own format.
type Result<T, E = KvError> = std::result::Result<T, E>;

/// Where the platform runs: what a service needs to find its files and to recognise the key
/// vault hosts of this platform.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostConfig {
    /// The data directory (a service keeps its blobs below it; `tls/ca.pem` is the CA to
    /// trust when calling the platform over HTTPS).
    pub data_dir: PathBuf,
    /// DNS suffix of vault hosts (`localhost` → `{vault}.localhost`).
    pub dns_suffix: String,
    /// Public port (part of every URL the platform hands out).
    pub port: u16,
    /// Where the service keeps its objects: files below `data_dir`, or a bucket several
    /// nodes share (`kagi server --blobs`).
    pub blobs: kagi_blobs::BlobRoot,
}

impl HostConfig {
    /// `:{port}`, or nothing for 443.
    fn port_part(&self) -> String {
        match self.port {
            443 => String::new(),
            p => format!(":{p}"),
        }
    }

    /// `https://{suffix}[:{port}]`: the management, token and resource URL.
    pub fn authority(&self) -> String {
        format!("https://{}{}", self.dns_suffix, self.port_part())
    }

    /// `https://{vault}.{suffix}[:{port}]/`: a key vault's URI.
    pub fn key_vault_uri(&self, vault: &str) -> String {
        format!("https://{vault}.{}{}/", self.dns_suffix, self.port_part())
    }
}

/// The subscription of a resource id (`/subscriptions/{s}/…`), as written in the id.
pub fn subscription_of(resource_id: &str) -> Option<&str> {
    let mut segs = resource_id.trim_start_matches('/').split('/');
    match (segs.next(), segs.next()) {
        (Some(s), Some(sub)) if s.eq_ignore_ascii_case("subscriptions") => Some(sub),
        _ => None,
    }
}

/// What a storage service may read about a key vault (for its own acceptance rules: same
/// region, tenant, soft delete, purge protection). Reading keys still goes through the data
/// plane.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyVaultFacts {
    /// Vault name.
    pub name: String,
    /// The vault's resource id (`/subscriptions/…/providers/Microsoft.KeyVault/vaults/{name}`).
    pub id: String,
    /// Region.
    pub location: String,
    /// Tenant.
    pub tenant_id: String,
    /// Subscription.
    pub subscription_id: String,
    /// Soft delete on.
    pub soft_delete: bool,
    /// Purge protection on.
    pub purge_protection: bool,
}

/// A secret opened by [`ServiceHost::open_secret`].
pub struct OpenedSecret {
    /// The secret.
    pub secret: Zeroizing<Vec<u8>>,
    /// The secret sealed again under the services' own seal purpose, when it was sealed by an
    /// earlier kagi under another purpose: the service stores it in place of what it had, so
    /// that the fallback is needed once. `None` when what was opened is current.
    pub resealed: Option<Vec<u8>>,
}

/// Shows whether it was resealed, never the secret.
impl std::fmt::Debug for OpenedSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenedSecret")
            .field("resealed", &self.resealed.is_some())
            .finish_non_exhaustive()
    }
}

/// A duration in whole seconds from the environment variable `name` (a service's tuning
/// knob, such as `KAGI_BACKUP_KEY_POLL_SECONDS`); `default` seconds when it is unset or not a
/// number.
pub fn env_seconds(name: &str, default: u64) -> std::time::Duration {
    std::time::Duration::from_secs(
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default),
    )
}

/// Where a resource is, or is to be: its subscription, resource group, type and name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResourceRef<'a> {
    /// Subscription id.
    pub subscription: &'a str,
    /// Resource group name.
    pub resource_group: &'a str,
    /// Resource type (`Microsoft.RecoveryServices/vaults`).
    pub resource_type: &'a str,
    /// Resource name.
    pub name: &'a str,
}

impl ResourceRef<'_> {
    /// (subscription, resource group, type, name).
    pub fn parts(&self) -> (&str, &str, &str, &str) {
        (
            self.subscription,
            self.resource_group,
            self.resource_type,
            self.name,
        )
    }
}

/// A resource as a `PUT` writes it.
#[derive(Clone, Debug, PartialEq)]
pub struct PutResource<'a> {
    /// Where.
    pub at: ResourceRef<'a>,
    /// `location`, `tags` and `properties`, as the service computed them.
    pub body: Value,
    /// The request's `identity` block (`None`: unchanged), from which the platform creates,
    /// resolves or deletes the resource's managed identities.
    pub identity: Option<&'a Value>,
}

/// The resources of one type in a subscription or in one of its resource groups.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResourceScope<'a> {
    /// Subscription id.
    pub subscription: &'a str,
    /// Resource group name (`None`: the whole subscription).
    pub resource_group: Option<&'a str>,
    /// Resource type.
    pub resource_type: &'a str,
}

/// A move of a resource to another resource group (of the same or another subscription of
/// the same tenant).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MoveRequest<'a> {
    /// The resource's id.
    pub id: &'a str,
    /// The target subscription.
    pub subscription: &'a str,
    /// The target resource group.
    pub resource_group: &'a str,
    /// Only check whether the move would succeed.
    pub dry_run: bool,
}

/// The platform facilities a storage service may use. `kagi_vault::Platform` implements it;
/// tests may implement it in memory.
///
/// Resource ids (`id`) are ARM ids (`/subscriptions/{s}/resourceGroups/{g}/providers/{type}/
/// {name}`), matched case-insensitively. Methods that take a `caller` answer for that caller
/// (today: the bootstrap administrator only); the others are the service acting for itself.
#[async_trait]
pub trait ServiceHost: Send + Sync + std::fmt::Debug {
    /// The platform time (Unix seconds): a test clock under `kagi server --test-clock`.
    fn now(&self) -> i64;

    /// Where and how the platform runs.
    fn config(&self) -> HostConfig;

    /// `PUT` of a resource (see [`PutResource`]). Returns (201 or 200, the stored body).
    async fn put_resource(&self, caller: &Principal, put: PutResource<'_>) -> Result<(u16, Value)>;

    /// `GET` of a resource for `caller` (ARM's `ResourceNotFound` when absent).
    fn get_resource(&self, caller: &Principal, at: ResourceRef<'_>) -> Result<Value>;

    /// `DELETE` of a resource with its system-assigned identity, documents and activity log
    /// (one store transaction): 200 when deleted, 204 when absent.
    async fn delete_resource(&self, caller: &Principal, at: ResourceRef<'_>) -> Result<u16>;

    /// A stored resource by id, for the service itself.
    fn resource(&self, id: &str) -> Option<Value>;

    /// `{"value": [...]}`: the resources in `scope`, for `caller`.
    fn list_resources(&self, caller: &Principal, scope: ResourceScope<'_>) -> Result<Value>;

    /// Every stored resource of a type, by id, for the service itself (its scheduler).
    fn resources_of_type(&self, resource_type: &str) -> Vec<Value>;

    /// Moves a resource (same tenant) with its identities, documents and activity log (one
    /// store transaction); a dry run only checks. Returns the resource as it is (or would be)
    /// stored after the move.
    async fn move_resource(&self, caller: &Principal, to: MoveRequest<'_>) -> Result<Value>;

    /// A document of resource `id` (`kind` and `name` as the service chose them), if stored.
    async fn document(&self, id: &str, kind: &str, name: &str) -> Result<Option<Value>>;

    /// Stores document `doc` (replacing the one of that kind and name); durable when this
    /// returns. The resource need not exist yet.
    async fn put_document(&self, id: &str, kind: &str, name: &str, doc: &Value) -> Result<()>;

    /// Every document of kind `kind` of every resource: (resource id in lower case, name,
    /// document). For what a node must see of resources other nodes look after (their disks'
    /// open accesses).
    async fn documents_of_kind(&self, kind: &str) -> Result<Vec<(String, String, Value)>>;

    /// Stores a document of resource `id` only while document `guard` (a resource id, kind
    /// and name; possibly the one written: a compare-and-set) is `expected` (`None`: absent),
    /// checked in the writing transaction, so that no change of the guard slips in between;
    /// `false`, and nothing written, when it is not. A node that is no longer a resource's
    /// home records nothing after another node marked the guard.
    async fn put_document_if(
        &self,
        id: &str,
        (kind, name): (&str, &str),
        doc: &Value,
        guard: (&str, &str, &str),
        expected: Option<&Value>,
    ) -> Result<bool>;

    /// Deletes a document; `true` if it existed.
    async fn delete_document(&self, id: &str, kind: &str, name: &str) -> Result<bool>;

    /// Every document of one kind of a resource: (name, document), by name.
    async fn documents(&self, id: &str, kind: &str) -> Result<Vec<(String, Value)>>;

    /// Deletes every document and activity entry kept for a resource id (what a deleted
    /// resource of that id, or a creation that failed half-way, may have left).
    async fn clear_records(&self, id: &str) -> Result<()>;

    /// Imports documents (kind, name, document) and activity entries (time, entry; oldest
    /// first) that an earlier kagi kept in files, in one transaction; what is already stored
    /// is left as it is, so importing again changes nothing.
    async fn import_records(
        &self,
        id: &str,
        documents: &[(String, String, Value)],
        activity: &[(i64, Value)],
    ) -> Result<()>;

    /// Appends an entry to a resource's activity log; durable when this returns.
    async fn append_activity(&self, id: &str, entry: &Value) -> Result<()>;

    /// A resource's activity log, oldest first.
    async fn activity(&self, id: &str) -> Result<Vec<Value>>;

    /// An access token (audience: this platform) for a resource's managed identity: the
    /// system-assigned one (`user_assigned: None`) or the named user-assigned one, which the
    /// resource must carry now.
    fn identity_token(&self, id: &str, user_assigned: Option<&str>) -> Result<String>;

    /// A user-assigned identity that a service gives to a part of a resource the platform does
    /// not keep as a resource (a SQL database's own identity): `principalId`, `clientId` and
    /// `tenantId` of identity `id` (ARM's 400 when it does not exist). Default: none.
    fn user_assigned_identity(&self, id: &str) -> Result<Value> {
        Err(KvError::new(
            kagi_core::ErrorCode::BadRequest,
            format!("User-assigned identity '{id}' does not exist."),
        ))
    }

    /// An access token (audience: this platform) for the user-assigned identity `id`, used by
    /// `for_resource` (which the service vouches carries it: see
    /// [`ServiceHost::user_assigned_identity`]). Default: none.
    fn user_assigned_token(&self, id: &str, for_resource: &str) -> Result<String> {
        let _ = for_resource;
        Err(KvError::new(
            kagi_core::ErrorCode::BadRequest,
            format!("User-assigned identity '{id}' does not exist."),
        ))
    }

    /// Who an access token of this platform speaks for (signature, expiry, audience and the
    /// principal's existence checked), for a service whose own protocol carries tokens (the
    /// SQL service's logins of Entra principals).
    fn authenticate(&self, token: &str) -> Result<Principal>;

    /// Why a resource's managed identity cannot act for it after a tenant move; `None` when
    /// it can (or when the resource or identity does not exist).
    fn identity_tenant_problem(&self, id: &str, user_assigned: Option<&str>) -> Option<KvError>;

    /// The tenant a subscription is in now (`None` for an unknown subscription).
    fn subscription_tenant(&self, sub: &str) -> Option<String>;

    /// Region, tenant, soft delete and purge protection of a live key vault, if it exists.
    fn key_vault_facts(&self, vault: &str) -> Option<KeyVaultFacts>;

    /// Whether a key vault of that name is soft-deleted.
    fn key_vault_soft_deleted(&self, vault: &str) -> bool;

    /// The error a Deny policy assignment answers for creating or updating resource `id`
    /// into `body` (which carries `type`), if any.
    async fn policy_deny(&self, id: &str, body: &Value) -> Result<Option<KvError>>;

    /// Seals a secret of the service (a platform-managed key) under the root key, bound to
    /// `label`, with the services' own seal purpose.
    fn seal_secret(&self, label: &str, data: &[u8]) -> Result<Vec<u8>>;

    /// Opens what [`ServiceHost::seal_secret`] sealed under `label` (or what an earlier
    /// kagi sealed under another purpose: see [`OpenedSecret::resealed`]).
    fn open_secret(&self, label: &str, sealed: &[u8]) -> Result<OpenedSecret>;

    /// Takes, or renews, the lease `name` for this node for `ttl_ms` (on the store's clock):
    /// `true` when this node holds it now, `false` while another node of a shared store does.
    /// A service keeps work on one shared object (a repository in a bucket, a running job) to
    /// one node at a time with it. On one node (SQLite) it is always this node's.
    async fn acquire_lease(&self, name: &str, ttl_ms: i64) -> Result<bool> {
        let _ = (name, ttl_ms);
        Ok(true)
    }

    /// Gives the lease `name` up, if this node holds it.
    async fn release_lease(&self, name: &str) -> Result<()> {
        let _ = name;
        Ok(())
    }

    /// This node's name: the same across its restarts (kept in its data directory), so what
    /// lives in its data directory (a disk family, a SQL server's databases) can name its
    /// home. On one node it is the only name there is.
    fn node_name(&self) -> String {
        "local".into()
    }

    /// Whether other nodes may share this node's store (PostgreSQL), so that what lives in one
    /// node's data directory has a home. On one node (SQLite), no: everything is served here,
    /// whatever homes were recorded.
    fn shares_store(&self) -> bool {
        false
    }

    /// The nodes running now (each holding its presence lease), this one included, with
    /// where they serve; on one node, this one.
    async fn live_nodes(&self) -> Result<Vec<NodeCard>> {
        Ok(vec![NodeCard {
            name: self.node_name(),
            https: String::new(),
            sql: Some(String::new()),
            nbd: None,
        }])
    }
}

/// Runs `work` under the lease `name` of `host` ([`ServiceHost::acquire_lease`]), held for
/// `ttl_ms` and renewed every third of it, then given up: `Ok(None)` when another node holds
/// the lease; `lost()` when a renewal fails (the work is dropped there: another node may hold
/// the lease by then). For work that must run on one node at a time and may take longer than
/// one lease (a takeover fetching a disk or a database from the bucket).
pub async fn under_renewed_lease<T>(
    host: &dyn ServiceHost,
    name: &str,
    ttl_ms: i64,
    work: impl std::future::Future<Output = Result<T>>,
    lost: impl FnOnce() -> KvError,
) -> Result<Option<T>> {
    if !host.acquire_lease(name, ttl_ms).await? {
        return Ok(None);
    }
    let renewing = async {
        loop {
            let third = u64::try_from(ttl_ms / 3).unwrap_or(1).max(1);
            tokio::time::sleep(std::time::Duration::from_millis(third)).await;
            if !matches!(host.acquire_lease(name, ttl_ms).await, Ok(true)) {
                return;
            }
        }
    };
    let done = tokio::select! {
        done = work => done.map(Some),
        () = renewing => Err(lost()),
    };
    // A lease not given up lapses by itself.
    let _ = host.release_lease(name).await;
    done
}

/// The id of a long-running operation whose outcome is kept in node `node`'s memory:
/// `{32 hex digits}-{node}` (`random`: 16 random bytes), so that another node forwards the
/// reads of its status there ([`operation_node`]).
pub fn operation_id(random: [u8; 16], node: &str) -> String {
    let hex: String = random.iter().map(|b| format!("{b:02x}")).collect();
    format!("{hex}-{node}")
}

/// The node named in an operation id made by [`operation_id`] (`None` for any other id).
pub fn operation_node(id: &str) -> Option<&str> {
    let (random, node) = id.split_at_checked(32)?;
    let node = node.strip_prefix('-')?;
    (random.bytes().all(|b| b.is_ascii_hexdigit()) && !node.is_empty()).then_some(node)
}

/// A node of several on one store, as the others see it (docs/SEVERAL_NODES.md).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NodeCard {
    /// Its name ([`ServiceHost::node_name`]).
    pub name: String,
    /// `HOST:PORT` where the other nodes reach its HTTPS listener (`kagi server --advertise`).
    pub https: String,
    /// `HOST:PORT` of its SQL endpoint (the PostgreSQL protocol), if it serves one.
    #[serde(default)]
    pub sql: Option<String>,
    /// `HOST:PORT` of its NBD endpoint over TCP (`--nbd-listen`), if it serves one.
    #[serde(default)]
    pub nbd: Option<String>,
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_operation_id_names_its_node() {
        let id = operation_id([0x0f; 16], "host-1a2b.x");
        assert_eq!(id, format!("{}-host-1a2b.x", "0f".repeat(16)));
        assert_eq!(operation_node(&id), Some("host-1a2b.x"));
        assert_eq!(operation_node(&"0f".repeat(16)), None);
        assert_eq!(operation_node(&format!("{}-", "0f".repeat(16))), None);
        assert_eq!(operation_node("short-node"), None);
        assert_eq!(operation_node(&format!("{}-n", "zz".repeat(16))), None);
    }

    use super::*;

    #[test]
    fn urls_and_ids() {
        let c = |port| HostConfig {
            data_dir: PathBuf::from("/d"),
            dns_suffix: "localhost".into(),
            port,
            blobs: kagi_blobs::BlobRoot::local(std::path::Path::new("/d")),
        };
        assert_eq!(c(8443).authority(), "https://localhost:8443");
        assert_eq!(c(443).authority(), "https://localhost");
        assert_eq!(c(8443).key_vault_uri("kv1"), "https://kv1.localhost:8443/");
        assert_eq!(c(443).key_vault_uri("kv1"), "https://kv1.localhost/");
        assert_eq!(
            subscription_of("/subscriptions/s1/resourceGroups/g"),
            Some("s1")
        );
        assert_eq!(subscription_of("/providers/x"), None);
    }
}
