//! kagi's backup vaults (`Microsoft.RecoveryServices/vaults`, MISSION BK-1..BK-10, X-1, X-2).
//!
//! A backup vault is an ARM resource stored in the directory (with its managed identities);
//! it protects folders of the kagi host as *items*, each its own deduplicating, encrypted
//! repository (`kagi-backup`) under `<data>/backup/{sub}/{rg}/{vault}/items/{item}/`. Its other
//! records — its state, activity log, jobs and agent registry — are in the store, reached only
//! through its host ([`kagi_host::ServiceHost`]: documents and activity, see [`state`]); they go
//! with the vault's resource when it is deleted or moved, in the same store transaction. Each
//! item's data key (DEK) is wrapped by the vault's key encryption key: a platform key held by
//! kagi (PMK, the default) or the customer's RSA key (CMK), reached only over HTTPS through the
//! key vault's data plane with a token of the vault's managed identity (`kagi-cmk`) — so those
//! calls are authorized, firewalled and audited like anyone's.
//!
//! The service is built explicitly on a host ([`BackupService::new`]); `kagi server` builds it
//! on its `Platform` and hands it to the HTTP layer and to the scheduler.
//!
//! Routes (management host, bootstrap administrator; `{vault id}` is
//! `/subscriptions/{s}/resourceGroups/{rg}/providers/Microsoft.RecoveryServices/vaults/{name}`):
//!
//! | route | what |
//! |---|---|
//! | `PUT`/`PATCH`/`GET`/`DELETE {vault id}` | the vault |
//! | `GET …/providers/Microsoft.RecoveryServices/vaults` | list (subscription or group) |
//! | `PUT {vault id}/backupProtectedItems/{item}` `{"properties":{"sourcePath":"/abs", "schedule"?:{"intervalHours":N}, "retention"?:{"keepLast":K}}}` | protect a folder (again with the same path: change schedule/retention) |
//! | `GET {vault id}/backupProtectedItems[/{item}]` | items |
//! | `POST {vault id}/backupProtectedItems/{item}/backup` | 202, a Backup job |
//! | `POST {vault id}/backupProtectedItems/{item}/restore` `{recoveryPointId, targetPath, subPath?, overwrite?}` | 202, a Restore job |
//! | `GET {vault id}/backupProtectedItems/{item}/recoveryPoints` | recovery points |
//! | `POST {vault id}/backupProtectedItems/{item}/check` `{readData?}` | 202, a Check job (`Repository::check`; Failed `RepositoryDamaged` with `stats.problems` when damaged) |
//! | `GET {vault id}/backupJobs[/{id}]` | jobs |
//! | `GET {vault id}/activityLog` | the activity log |
//! | `POST {vault id}/vaultCredentials` `{"validHours"?: N}` | vault credentials for registering backup agents ([`agents`]) |
//! | `GET {vault id}/registeredMachines`, `DELETE …/registeredMachines/{machine}` | backup agents; unregistering deletes that machine's backups |
//! | `POST {vault id}/registeredMachines/{machine}/allowReregistration` `{"validHours"?: N}` | lets the next registration of that machine name in through vault credentials alone (once; its backups are kept) |
//!
//! Scheduled backups ([`spawn_scheduler`], started by `kagi server`): an item with a schedule
//! gets a Backup job (`stats.trigger` = `Schedule`) every `intervalHours` of the platform clock,
//! then retention forgets recovery points beyond the newest `keepLast` (snapshot objects only;
//! unreferenced packs are not pruned yet).
//!
//! Moves (BK-9; `POST /subscriptions/{s}/resourceGroups/{g}/moveResources`, served by kagi-http,
//! see [`BackupService::move_vault`]): a vault with the platform key moves with its identities, its records
//! and its folder, crash-safely; a vault with a customer-managed key is refused. After its subscription moves to
//! another tenant, a CMK vault's jobs fail with `UserErrorCMKTenantMismatch` until its identity
//! and key are configured again in the new tenant.
//!
//! Policy (X-3, BK-10; served by kagi-vault/kagi-http, evaluated by `kagi_core::policy`): a Deny
//! assignment of `…/policyDefinitions/kagi-backup-vaults-cmk` at the vault's subscription or
//! group makes `PUT`/`PATCH {vault id}` of a vault without a customer-managed key answer 403
//! `RequestDisallowedByPolicy` naming the assignment (logged in the activity log of an existing
//! vault).

#![forbid(unsafe_code)]

mod agent_objects;
pub mod agents;
mod items;
pub mod jobs;
mod leases;
mod moves;
mod resource;
pub mod routes;
mod schedule;
pub mod state;
mod vaults;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use kagi_cmk::KeyAccess;
use kagi_core::{ErrorCode, KvError};
use kagi_host::{
    AdmittedAgent, AgentCall, AgentHead, AgentReply, MoveRequest, Principal, ResourceProvider,
    ResourceScope, ServiceHost,
};
use serde_json::Value;

pub use schedule::spawn_scheduler;

/// The namespace.
pub const NAMESPACE: &str = "Microsoft.RecoveryServices";

/// The resource type.
pub const VAULT_TYPE: &str = "Microsoft.RecoveryServices/vaults";

/// How the service runs.
#[derive(Clone, Debug)]
pub struct ServiceConfig {
    /// How long an unwrapped data key is used before the key vault is asked again (default
    /// 10 minutes; `KAGI_BACKUP_KEY_CACHE_SECONDS`). Revocation takes effect within it.
    pub key_cache_lifetime: Duration,
    /// How often a versionless key URI is resolved to its newest version (default one hour;
    /// `KAGI_BACKUP_KEY_POLL_SECONDS`).
    pub key_poll_interval: Duration,
    /// Where the key vault hosts are reached (default `127.0.0.1:{port}`).
    pub connect: Option<SocketAddr>,
}

use kagi_host::env_seconds as env_secs;

impl Default for ServiceConfig {
    fn default() -> Self {
        Self {
            key_cache_lifetime: env_secs("KAGI_BACKUP_KEY_CACHE_SECONDS", 600),
            key_poll_interval: env_secs("KAGI_BACKUP_KEY_POLL_SECONDS", 3600),
            connect: None,
        }
    }
}

/// The backup service of one platform.
#[derive(Debug)]
pub struct BackupService {
    /// The platform it runs in.
    host: Arc<dyn ServiceHost>,
    config: ServiceConfig,
    data_dir: PathBuf,
    /// The key vaults' data plane, with the vaults' managed identities.
    keys: KeyAccess,
    jobs: jobs::Jobs,
    /// Per-vault serialisation of state changes.
    vault_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Per-item runtime: a lock over the repository and the cached data key.
    items: Mutex<HashMap<String, Arc<items::ItemRuntime>>>,
    /// Set once the records an earlier kagi kept in files are in the store ([`state`]).
    imported: tokio::sync::OnceCell<()>,
    /// Backup agents' objects: quota and free-space reserve ([`agents`]).
    agent_storage: agent_objects::AgentStorage,
    /// Where repositories and agents' objects live (the host's `--blobs`).
    blobs: kagi_blobs::BlobRoot,
}

/// A vault locked across nodes ([`BackupService::lock_vault`]); unlocked when dropped.
#[derive(Debug)]
pub(crate) struct VaultGuard {
    _lease: leases::LeaseHold,
    _local: tokio::sync::OwnedMutexGuard<()>,
}

/// Whether a management path (lower-cased segments) belongs to this service.
pub fn matches(l: &[&str]) -> bool {
    l.windows(2)
        .any(|w| w == ["providers", "microsoft.recoveryservices"])
}

impl BackupService {
    /// The service on `host` with `config`. Before it serves anything, it finishes the vault
    /// moves a crash interrupted (BK-9); build one per host.
    pub fn new(host: Arc<dyn ServiceHost>, config: ServiceConfig) -> Arc<Self> {
        let c = host.config();
        let addr = config
            .connect
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], c.port)));
        let user_agent = concat!("kagi-backup-service/", env!("CARGO_PKG_VERSION"));
        let svc = Arc::new(BackupService {
            keys: KeyAccess::new(&c, addr, "backup vault", user_agent),
            data_dir: c.data_dir.clone(),
            host,
            config,
            jobs: jobs::Jobs::default(),
            vault_locks: Mutex::new(HashMap::new()),
            items: Mutex::new(HashMap::new()),
            imported: tokio::sync::OnceCell::new(),
            agent_storage: agent_objects::AgentStorage::from_env(c.blobs.clone()),
            blobs: c.blobs.clone(),
        });
        svc.recover_moves(svc.host.as_ref());
        svc
    }

    /// The host it runs on.
    pub fn host(&self) -> &Arc<dyn ServiceHost> {
        &self.host
    }

    /// Removes every object of the folder `dir` (a vault's, an item's, a machine's): its keys
    /// in the bucket, or its files (gone already is fine; the removal is flushed into the
    /// parent folder).
    pub(crate) async fn remove_blobs(&self, dir: &std::path::Path) -> Result<(), KvError> {
        if self.blobs.remove_all(dir).await.map_err(state::blob)? {
            return Ok(());
        }
        let dir = dir.to_owned();
        tokio::task::spawn_blocking(move || match std::fs::remove_dir_all(&dir) {
            Ok(()) => kagi_fs::sync_parent(&dir),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        })
        .await
        .map_err(|e| state::io("remove task", e))?
        .map_err(|e| state::io("remove folder", e))
    }

    /// Serves one management request for `Microsoft.RecoveryServices`: (status, body).
    pub async fn handle(
        self: &Arc<Self>,
        caller: &Principal,
        req: ArmRequest<'_>,
    ) -> Result<(u16, Value), KvError> {
        self.route(&self.host.clone(), caller, req).await
    }

    /// Checks (`dry_run`: `validateMoveResources`) or performs (`moveResources`) the move of a
    /// backup vault to another resource group or subscription of the same tenant (BK-9; see
    /// the `moves` module): refused for a vault encrypted with a customer-managed key. Returns
    /// the vault as it is (or would be) stored after the move.
    pub async fn move_vault(
        self: &Arc<Self>,
        caller: &Principal,
        vault_id: &str,
        target_subscription: &str,
        target_resource_group: &str,
        dry_run: bool,
    ) -> Result<Value, KvError> {
        let p = self.host.clone();
        self.move_vault_on(
            &p,
            caller,
            vault_id,
            target_subscription,
            target_resource_group,
            dry_run,
        )
        .await
    }

    /// Authenticates and authorizes a backup-agent request (`/kagi/agent/{vault id}/…`, see
    /// [`agents`]) before its body is read.
    pub async fn agent_authenticate(
        &self,
        head: agents::AgentHead<'_>,
    ) -> Result<agents::AgentSession, KvError> {
        self.admit_agent(self.host.as_ref(), head).await
    }

    /// Serves a backup-agent request that [`BackupService::agent_authenticate`] admitted.
    pub async fn agent_serve(
        self: &Arc<Self>,
        session: &agents::AgentSession,
        call: agents::AgentCall<'_>,
    ) -> Result<agents::AgentReply, KvError> {
        self.serve_agent(&self.host.clone(), session, call).await
    }
}

/// One management request for `Microsoft.RecoveryServices`, as the HTTP layer parsed it.
pub use kagi_host::ArmRequest;

use kagi_host::json_body;

/// Backup vaults as the platform's HTTP layer sees them: `Microsoft.RecoveryServices/vaults`,
/// movable (with the platform key), their identities trusted by vault firewalls, with backup
/// agents. Audit names are ARM's generic ones.
#[async_trait]
impl ResourceProvider for BackupService {
    fn namespace(&self) -> &'static str {
        NAMESPACE
    }

    fn resource_types(&self) -> &'static [&'static str] {
        &[VAULT_TYPE]
    }

    fn routes(&self) -> &'static [kagi_core::route_table::Route] {
        routes::ROUTES
    }

    async fn handle(
        self: Arc<Self>,
        caller: &Principal,
        req: ArmRequest<'_>,
    ) -> Result<kagi_host::ArmReply, KvError> {
        self.route(&self.host.clone(), caller, req)
            .await
            .map(Into::into)
    }

    fn movable(&self, resource_type: &str) -> bool {
        resource_type.eq_ignore_ascii_case(VAULT_TYPE)
    }

    async fn move_resource(
        self: Arc<Self>,
        caller: &Principal,
        to: MoveRequest<'_>,
    ) -> Result<Value, KvError> {
        self.move_vault(
            caller,
            to.id,
            to.subscription,
            to.resource_group,
            to.dry_run,
        )
        .await
    }

    /// A vault that still protects items or has backup agents registered (what its `DELETE`
    /// refuses).
    async fn check_delete(
        self: Arc<Self>,
        caller: &Principal,
        id: &str,
        deleting: &[String],
    ) -> Result<(), KvError> {
        let _ = deleting;
        self.ready(self.host.as_ref()).await?;
        let segs: Vec<&str> = id.trim_matches('/').split('/').collect();
        let [_, sub, _, rg, _, _, _, name] = segs.as_slice() else {
            return Ok(());
        };
        if self
            .host
            .get_resource(caller, resource::vault_ref(sub, rg, name))
            .is_err()
        {
            return Ok(());
        }
        self.delete_refusal(self.host.as_ref(), sub, rg, name).await
    }

    fn trusted_for_vault_firewall(&self) -> bool {
        true
    }

    /// `kagi_backup_vaults{protector}` (vaults whose data keys a customer-managed key or the
    /// platform key protects) and `kagi_jobs{service="backup", kind, state="InProgress"}`
    /// (the jobs running now, by operation), from memory.
    fn gauges(&self) -> Vec<kagi_core::gauge::GaugeSample> {
        use kagi_core::gauge::{GaugeSample, JOBS, JOBS_HELP};
        let (mut cmk, mut pmk) = (0, 0);
        for body in self.host.resources_of_type(VAULT_TYPE) {
            if body["properties"]["encryption"]["keyVaultProperties"]["keyUri"].is_string() {
                cmk += 1;
            } else {
                pmk += 1;
            }
        }
        let vaults = |protector: &str, n| {
            GaugeSample::new(
                "kagi_backup_vaults",
                "Backup vaults, by what protects their data keys: CustomerManaged (a key vault key) or PlatformManaged.",
                n,
            )
            .label("protector", protector)
        };
        let mut all = vec![
            vaults("CustomerManaged", cmk),
            vaults("PlatformManaged", pmk),
        ];
        for (operation, n) in self.jobs.running_by_operation() {
            all.push(
                GaugeSample::new(JOBS, JOBS_HELP, n)
                    .label("service", "backup")
                    .label("kind", operation)
                    .label("state", "InProgress"),
            );
        }
        all
    }

    async fn admit_agent(
        self: Arc<Self>,
        head: AgentHead<'_>,
    ) -> Result<Box<dyn AdmittedAgent>, KvError> {
        let session = self.agent_authenticate(head).await?;
        Ok(Box::new(AdmittedBackupAgent { svc: self, session }))
    }
}

/// A backup-agent request admitted by [`BackupService::agent_authenticate`], with the service
/// that serves it.
#[derive(Debug)]
struct AdmittedBackupAgent {
    svc: Arc<BackupService>,
    session: agents::AgentSession,
}

#[async_trait]
impl AdmittedAgent for AdmittedBackupAgent {
    fn caller(&self) -> &str {
        self.session.caller()
    }

    fn body_limit(&self) -> usize {
        self.session.body_limit()
    }

    async fn serve(self: Box<Self>, call: AgentCall<'_>) -> Result<AgentReply, KvError> {
        self.svc.agent_serve(&self.session, call).await
    }
}

impl BackupService {
    /// Before the service touches any vault: the records an earlier kagi kept as files under
    /// `<data>/backup/**` are imported into the store, once per service (a failed import is
    /// tried again by the next request, which it refuses meanwhile).
    async fn ready(&self, p: &dyn ServiceHost) -> Result<(), KvError> {
        self.imported
            .get_or_try_init(|| async {
                state::import_legacy(p, &self.data_dir).await?;
                state::reseal_platform_keys(p).await;
                Ok::<_, KvError>(())
            })
            .await
            .map(|_| ())
    }

    /// A vault's lock across nodes: this process's lock of its folder, then the store lease
    /// `backup-vault:{folder}` (waiting while another node holds it, at most a minute): a
    /// vault's state and records are read, changed and written by one node at a time.
    pub(crate) async fn lock_vault(&self, dir: &std::path::Path) -> Result<VaultGuard, KvError> {
        let local = self
            .vault_lock(&dir.display().to_string())
            .lock_owned()
            .await;
        let rel = self.blobs.key_of(dir).map_err(state::blob)?;
        let lease = leases::LeaseHold::take(
            &self.host,
            format!("backup-vault:{}", rel.as_ref().to_ascii_lowercase()),
            Some(std::time::Duration::from_secs(60)),
            || {
                KvError::conflict(
                    "The backup vault is busy with a change on another node; retry shortly.",
                )
            },
        )
        .await?;
        Ok(VaultGuard {
            _lease: lease,
            _local: local,
        })
    }

    fn vault_lock(&self, key: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.vault_locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key.to_string())
            .or_default()
            .clone()
    }

    async fn route(
        self: &Arc<Self>,
        host: &Arc<dyn ServiceHost>,
        caller: &Principal,
        req: ArmRequest<'_>,
    ) -> Result<(u16, Value), KvError> {
        let p = host.as_ref();
        let (method, body, wait) = (req.method, req.body, req.wait);
        self.ready(p).await?;
        let scope = req.scope("microsoft.recoveryservices")?;
        let (sub, rg, rest, rest_l) = (
            scope.subscription,
            scope.resource_group,
            scope.rest,
            scope.rest_l,
        );
        match (rest_l, method, rg) {
            (["vaults"], "GET", _) => p
                .list_resources(
                    caller,
                    ResourceScope {
                        subscription: sub,
                        resource_group: rg,
                        resource_type: VAULT_TYPE,
                    },
                )
                .map(|v| (200, v)),
            (["vaults", _], "PUT" | "PATCH", Some(rg)) => {
                self.put_vault(
                    host,
                    caller,
                    sub,
                    rg,
                    rest[1],
                    json_body(body)?,
                    method == "PATCH",
                )
                .await
            }
            (["vaults", _], "GET", Some(rg)) => p
                .get_resource(caller, resource::vault_ref(sub, rg, rest[1]))
                .map(|v| (200, v)),
            (["vaults", _], "DELETE", Some(rg)) => {
                self.delete_vault(p, caller, sub, rg, rest[1]).await
            }
            (["vaults", _, "registeredmachines"], "GET", Some(rg)) => {
                let v = self.vault_ctx(p, caller, sub, rg, rest[1])?;
                self.list_machines(p, &v).await
            }
            (["vaults", _, "registeredmachines", _], "DELETE", Some(rg)) => {
                let v = self.vault_ctx(p, caller, sub, rg, rest[1])?;
                self.delete_machine(p, caller, &v, rest[3]).await
            }
            (["vaults", _, "registeredmachines", _, "allowreregistration"], "POST", Some(rg)) => {
                let v = self.vault_ctx(p, caller, sub, rg, rest[1])?;
                self.allow_reregistration(p, caller, &v, rest[3], &json_body(body)?)
                    .await
            }
            (["vaults", _, "vaultcredentials"], "POST", Some(rg)) => {
                let v = self.vault_ctx(p, caller, sub, rg, rest[1])?;
                self.vault_credentials(p, caller, &v, &json_body(body)?)
                    .await
            }
            (["vaults", _, "activitylog"], "GET", Some(rg)) => {
                self.activity(p, caller, sub, rg, rest[1]).await
            }
            (["vaults", _, "backupjobs"], "GET", Some(rg)) => {
                let v = self.vault_ctx(p, caller, sub, rg, rest[1])?;
                let jobs = self.jobs.list(p, &v.id).await?;
                Ok((200, serde_json::json!({ "value": jobs })))
            }
            (["vaults", _, "backupjobs", _], "GET", Some(rg)) => {
                let v = self.vault_ctx(p, caller, sub, rg, rest[1])?;
                if let Some(w) = wait {
                    self.jobs.wait_end(rest[3], w).await;
                }
                self.jobs
                    .get(p, &v.id, rest[3])
                    .await?
                    .map(|j| (200, j))
                    .ok_or_else(|| {
                        KvError::new(ErrorCode::NotFound, "The job was not found.")
                            .with_inner("JobNotFound")
                    })
            }
            (["vaults", _, "backupprotecteditems"], "GET", Some(rg)) => {
                let v = self.vault_ctx(p, caller, sub, rg, rest[1])?;
                self.list_items(p, &v).await
            }
            (["vaults", _, "backupprotecteditems", _], "PUT", Some(rg)) => {
                let v = self.vault_ctx(p, caller, sub, rg, rest[1])?;
                self.protect(p, caller, &v, rest[3], json_body(body)?).await
            }
            (["vaults", _, "backupprotecteditems", _], "GET", Some(rg)) => {
                let v = self.vault_ctx(p, caller, sub, rg, rest[1])?;
                self.get_item(p, &v, rest[3]).await
            }
            (["vaults", _, "backupprotecteditems", _, "backup"], "POST", Some(rg)) => {
                let v = self.vault_ctx(p, caller, sub, rg, rest[1])?;
                self.start_backup(host, &v, rest[3]).await
            }
            (["vaults", _, "backupprotecteditems", _, "restore"], "POST", Some(rg)) => {
                let v = self.vault_ctx(p, caller, sub, rg, rest[1])?;
                self.start_restore(host, &v, rest[3], json_body(body)?)
                    .await
            }
            (["vaults", _, "backupprotecteditems", _, "check"], "POST", Some(rg)) => {
                let v = self.vault_ctx(p, caller, sub, rg, rest[1])?;
                self.start_check(host, &v, rest[3], &json_body(body)?).await
            }
            (["vaults", _, "backupprotecteditems", _, "recoverypoints"], "GET", Some(rg)) => {
                let v = self.vault_ctx(p, caller, sub, rg, rest[1])?;
                self.recovery_points(p, &v, rest[3]).await
            }
            _ => Err(KvError::new(
                ErrorCode::NotFound,
                format!("No route for {method} on this Microsoft.RecoveryServices path."),
            )),
        }
    }
}
