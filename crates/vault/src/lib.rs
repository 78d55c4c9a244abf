//! The key vault service: what every request does once the HTTP layer has parsed it and the
//! caller's token has been validated.
//!
//! [`Platform`] holds the store, the root key, the clock, the directory (`kagi-directory`:
//! principals and the token endpoint, answered there; see `directory_delegates`), and an
//! in-memory view of every vault and key (public attributes, sealed private keys and, once
//! used, the unsealed key objects). Reads and cryptographic operations are served from memory
//! — no database read on the hot path; every change is committed to the store first and
//! applied to memory after, under a per-vault write lock, so memory never shows what the store
//! does not hold.

#![forbid(unsafe_code)]

// Action groups and activity log alerts (TD-5).
mod alerts;
pub use alerts::MonitorRef;
mod arm;
mod bootstrap;
mod directory;
mod directory_delegates;
mod events;
mod follow;
pub use events::{DeliveryConfig, run_event_delivery};
pub use follow::DEFAULT_RECHECK as CHANGE_RECHECK;
pub use singleton::{DEFAULT_LEASE, node_id};
mod key_material;
mod keys;
// Subscriptions, tenant moves and resource moves (BK-9, ID-3).
mod moves;
mod nodes;
mod object_backup;
// Policy assignments and compliance.
mod policy_assignments;
mod read_only;
mod rotation;
pub use rotation::SweepReport;
mod jobs;
pub use jobs::JOBS_KEY;
mod secrets;
mod service_host;
// Storage-service resources (backup vaults, …) and what they learn of key vaults.
mod service_resources;
mod singleton;
mod state;
mod test_clock;
mod vault_backup;
pub use vault_backup::{BackupRequest, KdfRequest, MAX_RESTORE_FILE, RestoreRequest};
mod versioned;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use kagi_core::time::Clock;
use kagi_core::{KvError, VaultName};
use kagi_crypto::RootKey;
use kagi_store::Store;

pub use arm::{AccessPolicyInput, AccessPolicyProperties, ResourceGroupInput};
pub use bootstrap::{BootstrapAdmin, StartupError};
pub use directory::WORKLOAD_TYPE;
pub use kagi_directory::{TokenGrant, TokenRequestError};
pub use kagi_host::NodeCard;
pub use kagi_identity::Principal;
pub use keys::ListQuery;
pub use moves::MoveTarget;
pub use service_resources::KeyVaultFacts;

use state::VaultState;

/// Where and how the platform runs.
#[derive(Debug, Clone)]
pub struct PlatformConfig {
    /// Data directory (store, root key, TLS, bootstrap credentials).
    pub data_dir: PathBuf,
    /// DNS suffix of vault hosts (`localhost` → `{vault}.localhost`).
    pub dns_suffix: String,
    /// Public port (part of every URL kagi hands out).
    pub port: u16,
}

impl PlatformConfig {
    /// `https://{suffix}:{port}`: the management, token and resource URL.
    pub fn authority(&self) -> String {
        if self.port == 443 {
            format!("https://{}", self.dns_suffix)
        } else {
            format!("https://{}:{}", self.dns_suffix, self.port)
        }
    }

    /// `https://{vault}.{suffix}:{port}/`.
    pub fn vault_uri(&self, vault: &VaultName) -> String {
        if self.port == 443 {
            format!("https://{}.{}/", vault, self.dns_suffix)
        } else {
            format!("https://{}.{}:{}/", vault, self.dns_suffix, self.port)
        }
    }
}

/// The running service.
#[derive(Debug)]
pub struct Platform {
    config: PlatformConfig,
    store: Arc<dyn Store>,
    root: Arc<dyn RootKey>,
    clock: Arc<dyn Clock>,
    default_tenant: String,
    default_subscription: String,
    admin_object_id: String,
    vaults: RwLock<HashMap<VaultName, Arc<VaultState>>>,
    /// Names of vaults being created: taken before the store commit, so that two creates of
    /// one name cannot both commit, and the vault enters `vaults` only once committed.
    vault_creates: std::sync::Mutex<std::collections::HashSet<VaultName>>,
    /// Principals, identity-carrying resources, roles and locks, and the token endpoint.
    directory: kagi_directory::Directory,
    /// Set when the platform runs on a movable test clock (`kagi server --test-clock`).
    test_clock: Option<Arc<kagi_core::time::TestClock>>,
    /// Whole-vault backup and restore jobs (`crate::jobs`).
    jobs: jobs::Jobs,
    /// Event outbox wake-up and the scheduler's sweep lock.
    events: events::EventRuntime,
    /// Resource types (lower-case) whose system-assigned identities count as trusted services
    /// for a vault firewall's `bypass: AzureServices`
    /// ([`Platform::set_trusted_service_types`]).
    trusted_service_types: RwLock<Vec<String>>,
    /// The PKCS#11 token holding RSA-HSM and EC-HSM keys, when kagi runs with one.
    hsm: Option<Arc<dyn kagi_crypto::KeyProvider>>,
    /// The change numbers of a shared store's scopes that memory reflects (`crate::follow`).
    applied: std::sync::Mutex<HashMap<String, i64>>,
    /// Whether every request first catches up with the store's changes
    /// ([`Platform::set_strict_reads`]).
    strict_reads: std::sync::atomic::AtomicBool,
    /// Where the storage services keep their objects ([`Platform::set_blobs`]); local files
    /// below the data directory when not set.
    blobs: std::sync::OnceLock<kagi_blobs::BlobRoot>,
    /// This node's name (`crate::nodes`).
    node_name: String,
}

/// The answer for a vault that a restore is writing into.
pub(crate) fn restore_in_progress(name: &VaultName) -> KvError {
    KvError::conflict(format!(
        "A vault backup is being restored into the vault '{name}'; it serves requests again \
         once the restore job has ended."
    ))
    .with_inner("VaultRestoreInProgress")
}

/// A key that could not be opened: an HSM that is unreachable or lacks the key is 503 (the
/// request may succeed once the token is back); anything else is kagi's own failure.
pub(crate) fn hsm_error(e: kagi_crypto::CryptoError) -> KvError {
    match e {
        kagi_crypto::CryptoError::KeyUnavailable(m) | kagi_crypto::CryptoError::KeyNotHeld(m) => {
            tracing::error!(error = %m, "HSM key unavailable");
            KvError::new(
                kagi_core::ErrorCode::ServiceUnavailable,
                "The HSM holding this key cannot be reached or no longer holds it.",
            )
        }
        other => internal("open private key", other),
    }
}

/// Logs a failure of kagi itself and answers the client with a bare 500.
pub(crate) fn internal(context: &str, e: impl std::fmt::Display) -> KvError {
    tracing::error!(context, error = %e, "internal failure");
    KvError::internal()
}

impl Platform {
    /// Sets the resource types whose system-assigned identities count as "trusted Azure
    /// services" for a vault firewall's `bypass: AzureServices`: those of the storage services
    /// the server registered (kagi-http sets them when it starts serving). Applies to the next
    /// request; none until set.
    pub fn set_trusted_service_types<S: AsRef<str>>(&self, types: &[S]) {
        let types = types
            .iter()
            .map(|t| t.as_ref().to_ascii_lowercase())
            .collect();
        *self
            .trusted_service_types
            .write()
            .unwrap_or_else(|p| p.into_inner()) = types;
    }

    /// Whether the identities of resources of `resource_type` are trusted services.
    pub(crate) fn trusts_service_type(&self, resource_type: &str) -> bool {
        self.trusted_service_types
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&resource_type.to_ascii_lowercase())
    }

    /// The configuration.
    pub fn config(&self) -> &PlatformConfig {
        &self.config
    }

    /// Sets where the storage services keep their objects (`kagi server --blobs`), before
    /// they start; a second call changes nothing.
    pub fn set_blobs(&self, blobs: kagi_blobs::BlobRoot) {
        let _ = self.blobs.set(blobs);
    }

    /// Where the storage services keep their objects.
    pub fn blobs(&self) -> kagi_blobs::BlobRoot {
        self.blobs
            .get()
            .cloned()
            .unwrap_or_else(|| kagi_blobs::BlobRoot::local(&self.config.data_dir))
    }

    /// The tenant created on first start.
    pub fn default_tenant(&self) -> &str {
        &self.default_tenant
    }

    /// The subscription created on first start.
    pub fn default_subscription(&self) -> &str {
        &self.default_subscription
    }

    /// The tenant a vault's challenge names: the vault's, or the default for unknown hosts.
    pub fn challenge_tenant(&self, vault: &str) -> String {
        VaultName::parse(vault)
            .ok()
            .and_then(|n| self.live_vault(&n).ok())
            .map(|v| v.record().properties.tenant_id.to_string())
            .unwrap_or_else(|| self.default_tenant.clone())
    }

    /// Removes soft-deleted vaults and keys whose retention has ended.
    pub async fn purge_expired(&self) -> Result<usize, KvError> {
        let now = self.clock.now();
        let mut purged = 0;
        // On a store other nodes share, memory may not have seen a recover made elsewhere yet:
        // a vault with anything due is read again from the store before it is swept.
        let shared = !self
            .store
            .change_marks()
            .await
            .map_err(|e| internal("read the change feed", e))?
            .is_empty();
        let mut vaults: Vec<Arc<VaultState>> = self.all_vaults();
        if shared {
            let mut fresh = Vec::with_capacity(vaults.len());
            for v in vaults {
                let name = v.record().name;
                if v.has_purge_due(now) {
                    self.reload_vault(&name)
                        .await
                        .map_err(|e| internal("reload vault", e))?;
                }
                fresh.extend(self.vault_state(&name));
            }
            vaults = fresh;
        }
        for v in vaults {
            let record = v.record();
            if record.purge_at.is_some_and(|t| t <= now) {
                // Re-check under the vault's lock: a recover may have run since the scan.
                let _w = v.write.lock().await;
                if v.record().purge_at.is_none_or(|t| t > now) {
                    continue;
                }
                self.store
                    .purge_vault(&record.name)
                    .await
                    .map_err(|e| internal("purge vault", e))?;
                self.vaults_write().remove(&record.name);
                self.destroy_vault_key_objects(&v);
                purged += 1;
                continue;
            }
            purged += self.purge_expired_objects::<keys::KeyKind>(&v, now).await?;
            purged += self
                .purge_expired_objects::<secrets::SecretKind>(&v, now)
                .await?;
        }
        Ok(purged)
    }

    fn all_vaults(&self) -> Vec<Arc<VaultState>> {
        self.vaults
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    fn vaults_write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<VaultName, Arc<VaultState>>> {
        self.vaults.write().unwrap_or_else(|p| p.into_inner())
    }

    fn vault_state(&self, name: &VaultName) -> Option<Arc<VaultState>> {
        self.vaults
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }

    /// A live vault that is not being restored into, for its data plane and its changes: 404
    /// or 409 `VaultRestoreInProgress`.
    pub(crate) fn usable_vault(&self, name: &VaultName) -> Result<Arc<VaultState>, KvError> {
        let state = self.live_vault(name)?;
        if state.is_restoring() {
            return Err(restore_in_progress(name));
        }
        Ok(state)
    }

    /// A live (not soft-deleted) vault, or 404.
    pub(crate) fn live_vault(&self, name: &VaultName) -> Result<Arc<VaultState>, KvError> {
        match self.vault_state(name) {
            Some(v) if v.record().deleted_at.is_none() => Ok(v),
            _ => Err(KvError::new(
                kagi_core::ErrorCode::VaultNotFound,
                format!("The vault '{name}' was not found."),
            )),
        }
    }
}

impl Platform {
    /// Seals a platform secret (the TLS CA key, …) under the root key, bound to `label`.
    pub fn seal_platform_secret(&self, label: &str, data: &[u8]) -> Result<Vec<u8>, KvError> {
        self.root
            .seal(
                kagi_crypto::SealPurpose::Token,
                format!("kagi/v1/platform/{label}").as_bytes(),
                data,
            )
            .map_err(|e| internal("seal platform secret", e))
    }

    /// Opens a platform secret sealed by [`Self::seal_platform_secret`].
    pub fn open_platform_secret(
        &self,
        label: &str,
        sealed: &[u8],
    ) -> Result<zeroize::Zeroizing<Vec<u8>>, KvError> {
        self.root
            .open(
                kagi_crypto::SealPurpose::Token,
                format!("kagi/v1/platform/{label}").as_bytes(),
                sealed,
            )
            .map_err(|e| internal("open platform secret", e))
    }
}
