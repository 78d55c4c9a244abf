//! kagi's managed disks (`Microsoft.Compute`, MISSION DK-1..DK-10, seed 001): disk encryption
//! sets (DES) naming a customer's key, and disks encrypted under their own data key, which is
//! wrapped by the disk's platform key and, with a set, by the set's key version through the key
//! vault's data plane with the set's managed identity (`kagi-cmk`). Disks are stored by
//! `kagi-disk` (authenticated encryption per 4 KiB block, no plaintext on disk) and handed to
//! block clients over NBD (`kagi-nbd`) by `beginGetAccess`, Azure's way of giving out a disk.
//!
//! Routes (management host; `{des}` is
//! `/subscriptions/{s}/resourceGroups/{rg}/providers/Microsoft.Compute/diskEncryptionSets/{name}`,
//! `{disk}` the same with `disks/{name}`):
//!
//! | route | what |
//! |---|---|
//! | `PUT`/`PATCH`/`GET`/`DELETE {des}` | a disk encryption set |
//! | `GET {des}/associatedResources` | the disks that use it |
//! | `GET …/providers/Microsoft.Compute/diskEncryptionSets` | list (subscription or group) |
//! | `PUT`/`PATCH`/`GET`/`DELETE {disk}` | a disk (`createOption` `Empty`) |
//! | `GET …/providers/Microsoft.Compute/disks` | list |
//! | `POST {disk}/beginGetAccess` `{"access": "Read"\|"Write", "durationInSeconds": N}` | `{"accessSAS": "nbd+unix:///…?socket=…"}` |
//! | `POST {disk}/endGetAccess` | closes the access and disconnects its clients |
//! | `GET {des}/activityLog`, `GET {disk}/activityLog` | rotations, revocations, recoveries |
//!
//! The key's life (see [`keeper`]): with `rotationToLatestKeyVersionEnabled` every disk of a
//! set moves to the key's newest version while open; a key disabled or deleted, or a
//! permission removed, fails I/O after a grace period and refuses new access until the key is
//! back.

#![forbid(unsafe_code)]

mod access;
mod des;
mod disks;
mod homes;
mod images;
mod import;
pub mod keeper;
mod keys;
pub mod routes;
mod runtime;
mod shipping;
mod snapshots;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use kagi_cmk::KeyAccess;
use kagi_core::{ErrorCode, KvError};
use kagi_host::{ArmRequest, Principal, ResourceProvider, ResourceRef, ResourceScope, ServiceHost};
use serde_json::Value;

pub use access::NbdExports;
pub use keeper::{KeeperReport, spawn_keeper};

/// The namespace.
pub const NAMESPACE: &str = "Microsoft.Compute";
/// Disk encryption sets.
pub const DES_TYPE: &str = "Microsoft.Compute/diskEncryptionSets";
/// Disks.
pub const DISK_TYPE: &str = "Microsoft.Compute/disks";
/// Snapshots.
pub const SNAPSHOT_TYPE: &str = "Microsoft.Compute/snapshots";
/// Images.
pub const IMAGE_TYPE: &str = "Microsoft.Compute/images";

/// How the service runs.
#[derive(Clone, Debug)]
pub struct DiskConfig {
    /// How often each set's key is checked: its newest version (rotation) and whether it can
    /// still be used (revocation). Default one hour (`KAGI_DISK_KEY_POLL_SECONDS`).
    pub key_poll_interval: Duration,
    /// How long disks keep working after their key became unusable (DK-5). Default one hour,
    /// as Azure (`KAGI_DISK_REVOCATION_GRACE_SECONDS`).
    pub revocation_grace: Duration,
    /// Where the key vault hosts are reached (default `127.0.0.1:{port}`).
    pub connect: Option<SocketAddr>,
    /// The NBD server's Unix socket (default `<data>/nbd.sock`).
    pub nbd_socket: Option<PathBuf>,
    /// How often the keeper looks for sets whose check is due (default a minute;
    /// `KAGI_DISK_KEEPER_TICK_SECONDS`).
    pub keeper_tick: Duration,
}

use kagi_host::env_seconds as env_secs;

impl Default for DiskConfig {
    fn default() -> Self {
        Self {
            key_poll_interval: env_secs("KAGI_DISK_KEY_POLL_SECONDS", 3600),
            revocation_grace: env_secs("KAGI_DISK_REVOCATION_GRACE_SECONDS", 3600),
            connect: None,
            nbd_socket: None,
            keeper_tick: env_secs("KAGI_DISK_KEEPER_TICK_SECONDS", 60),
        }
    }
}

/// The disk service of one platform.
pub struct DiskService {
    host: Arc<dyn ServiceHost>,
    config: DiskConfig,
    keys: KeyAccess,
    store: Arc<kagi_disk::DiskStore>,
    nbd_socket: PathBuf,
    /// Open disk families, by disk resource id (lower case).
    open: Mutex<HashMap<String, Arc<runtime::DiskRuntime>>>,
    /// Accesses granted, by export name.
    accesses: Mutex<HashMap<String, access::Access>>,
    /// Serialises changes of one resource.
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// When each set's key was last checked (platform clock), by set id (lower case).
    checked: Mutex<HashMap<String, i64>>,
    /// With a TCP listener: the start of access URIs (`nbds://{host}:{port}/`) and their
    /// query (`?tls-certificates={dir}`).
    tcp: std::sync::OnceLock<(String, String)>,
    /// Long-running operations' statuses (`…/locations/{l}/DiskOperations/{id}`), kept an
    /// hour; by operation id.
    operations: Mutex<HashMap<String, (i64, Value)>>,
}

impl std::fmt::Debug for DiskService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskService")
            .field("config", &self.config)
            .field("nbd_socket", &self.nbd_socket)
            .finish_non_exhaustive()
    }
}

impl DiskService {
    /// The service on `host`: its disks under `<data>/disks`.
    pub fn new(host: Arc<dyn ServiceHost>, config: DiskConfig) -> Result<Arc<Self>, KvError> {
        let c = host.config();
        let addr = config
            .connect
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], c.port)));
        let user_agent = concat!("kagi-disk-service/", env!("CARGO_PKG_VERSION"));
        let root = c.data_dir.join("disks");
        let store = match shipping::factory(&c.blobs, &root) {
            Some(factory) => kagi_disk::DiskStore::open_shipped(root, factory),
            None => kagi_disk::DiskStore::open(root),
        }
        .map(Arc::new)
        .map_err(|e| keys::internal("opening the disk store", e))?;
        let nbd_socket = config
            .nbd_socket
            .clone()
            .unwrap_or_else(|| c.data_dir.join("nbd.sock"));
        Ok(Arc::new(Self {
            keys: KeyAccess::new(&c, addr, "disk encryption set", user_agent)
                .unwrapping_after_expiry(),
            host,
            config,
            store,
            nbd_socket,
            open: Mutex::new(HashMap::new()),
            accesses: Mutex::new(HashMap::new()),
            locks: Mutex::new(HashMap::new()),
            checked: Mutex::new(HashMap::new()),
            tcp: std::sync::OnceLock::new(),
            operations: Mutex::new(HashMap::new()),
        }))
    }

    /// The host it runs on.
    pub fn host(&self) -> &Arc<dyn ServiceHost> {
        &self.host
    }

    /// The Unix socket its NBD exports are served on.
    pub fn nbd_socket(&self) -> &std::path::Path {
        &self.nbd_socket
    }

    /// For a PUT or PATCH of `at`: its id, its lock held, and the resource as it is now (a
    /// PATCH of one that does not exist is a 404 calling it `noun`).
    async fn begin_put(
        &self,
        caller: &Principal,
        at: ResourceRef<'_>,
        patch: bool,
        noun: &str,
    ) -> Result<(String, tokio::sync::OwnedMutexGuard<()>, Option<Value>), KvError> {
        let (id, guard) = self.locked(at).await;
        let existing = self.host.get_resource(caller, at).ok();
        if patch && existing.is_none() {
            return Err(KvError::new(
                ErrorCode::ResourceNotFound,
                format!("The {noun} '{}' was not found.", at.name),
            ));
        }
        Ok((id, guard, existing))
    }

    /// For a DELETE of `at`: its id, its lock held, and the resource; `None` when it does not
    /// exist (answered 204, as ARM does).
    async fn begin_delete(
        &self,
        caller: &Principal,
        at: ResourceRef<'_>,
    ) -> Option<(String, tokio::sync::OwnedMutexGuard<()>, Value)> {
        let (id, guard) = self.locked(at).await;
        let body = self.host.get_resource(caller, at).ok()?;
        let id = body["id"].as_str().map(str::to_string).unwrap_or(id);
        Some((id, guard, body))
    }

    /// The lock that serialises the changes of resource `id`, held.
    pub(crate) async fn lock_id(&self, id: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = {
            let mut all = self.locks.lock().unwrap_or_else(|p| p.into_inner());
            all.entry(id.to_ascii_lowercase()).or_default().clone()
        };
        lock.lock_owned().await
    }

    /// The id of the resource `at`, and the lock that serialises its changes, held.
    async fn locked(&self, at: ResourceRef<'_>) -> (String, tokio::sync::OwnedMutexGuard<()>) {
        let id = des::id_of(at);
        let guard = self.lock_id(&id).await;
        (id, guard)
    }

    async fn route(
        self: &Arc<Self>,
        caller: &Principal,
        req: ArmRequest<'_>,
    ) -> Result<(u16, Value), KvError> {
        let p = self.host.as_ref();
        let (method, body) = (req.method, req.body);
        let not_found = || KvError::new(ErrorCode::NotFound, "No such route.");
        let scope = req.scope("microsoft.compute")?;
        let (sub, rg, rest, rest_l) = (
            scope.subscription,
            scope.resource_group,
            scope.rest,
            scope.rest_l,
        );
        let list = |ty: &str| {
            p.list_resources(
                caller,
                ResourceScope {
                    subscription: sub,
                    resource_group: rg,
                    resource_type: ty,
                },
            )
            .map(|v| (200, v))
        };
        match (rest_l, method, rg) {
            (["locations", _, "diskoperations", _], "GET", None) => self.operation(rest[3]),
            (["diskencryptionsets"], "GET", _) => {
                let (st, mut v) = list(DES_TYPE)?;
                if let Some(items) = v["value"].as_array_mut() {
                    for item in items.iter_mut() {
                        *item = self.set_view(item.take()).await;
                    }
                }
                Ok((st, v))
            }
            ([kind @ ("disks" | "snapshots")], "GET", _) => {
                let ty = if *kind == "disks" {
                    DISK_TYPE
                } else {
                    SNAPSHOT_TYPE
                };
                let (st, mut v) = list(ty)?;
                let open_anywhere = self.accesses_anywhere().await;
                if let Some(items) = v["value"].as_array_mut() {
                    for item in items.iter_mut() {
                        *item = self.with_state_among(item.take(), &open_anywhere);
                    }
                }
                Ok((st, v))
            }
            (["images"], "GET", _) => list(IMAGE_TYPE),
            (["images", _], "PUT" | "PATCH", Some(rg)) => {
                let input = json_body(body)?;
                let at = typed_ref(IMAGE_TYPE, sub, rg, rest[1]);
                self.put_image(caller, at, input, method == "PATCH").await
            }
            (["diskencryptionsets", _], "PUT" | "PATCH", Some(rg)) => {
                let input = json_body(body)?;
                self.put_des(caller, des_ref(sub, rg, rest[1]), input, method == "PATCH")
                    .await
            }
            (["diskencryptionsets", _], "GET", Some(rg)) => {
                let v = p.get_resource(caller, des_ref(sub, rg, rest[1]))?;
                Ok((200, self.set_view(v).await))
            }
            (["diskencryptionsets" | "disks", _, "activitylog"], "GET", Some(rg)) => {
                let at = if rest_l[0] == "disks" {
                    disk_ref(sub, rg, rest[1])
                } else {
                    des_ref(sub, rg, rest[1])
                };
                let v = p.get_resource(caller, at)?;
                let entries = p.activity(v["id"].as_str().unwrap_or_default()).await?;
                Ok((200, serde_json::json!({ "value": entries })))
            }
            (["diskencryptionsets", _], "DELETE", Some(rg)) => {
                self.delete_des(caller, des_ref(sub, rg, rest[1])).await
            }
            (["diskencryptionsets", _, "associatedresources"], "GET", Some(rg)) => {
                self.associated(caller, des_ref(sub, rg, rest[1]))
            }
            (["disks", _], "PUT" | "PATCH", Some(rg)) => {
                let input = json_body(body)?;
                self.put_disk(caller, disk_ref(sub, rg, rest[1]), input, method == "PATCH")
                    .await
            }
            (["snapshots", _], "PUT" | "PATCH", Some(rg)) => {
                let input = json_body(body)?;
                let at = snapshot_ref(sub, rg, rest[1]);
                self.put_snapshot(caller, at, input, method == "PATCH")
                    .await
            }
            ([kind @ ("disks" | "snapshots" | "images"), _, ..], _, Some(rg)) => {
                let (ty, noun) = match *kind {
                    "disks" => (DISK_TYPE, "disk"),
                    "snapshots" => (SNAPSHOT_TYPE, "snapshot"),
                    _ => (IMAGE_TYPE, "image"),
                };
                let at = typed_ref(ty, sub, rg, rest[1]);
                match (&rest_l[2..], method) {
                    ([], "GET") => {
                        let v = p.get_resource(caller, at)?;
                        Ok((200, self.with_state(v)))
                    }
                    ([], "DELETE") => self.delete_data(caller, at, noun).await,
                    (["begingetaccess"], "POST") if ty != IMAGE_TYPE => {
                        let input = json_body(body)?;
                        self.begin_access(caller, at, input).await
                    }
                    (["endgetaccess"], "POST") if ty != IMAGE_TYPE => {
                        self.end_access(caller, at).await
                    }
                    _ => Err(not_found()),
                }
            }
            _ => Err(not_found()),
        }
    }
}

pub(crate) fn des_ref<'a>(sub: &'a str, rg: &'a str, name: &'a str) -> ResourceRef<'a> {
    typed_ref(DES_TYPE, sub, rg, name)
}

pub(crate) fn typed_ref<'a>(
    resource_type: &'static str,
    sub: &'a str,
    rg: &'a str,
    name: &'a str,
) -> ResourceRef<'a> {
    ResourceRef {
        subscription: sub,
        resource_group: rg,
        resource_type,
        name,
    }
}

pub(crate) fn snapshot_ref<'a>(sub: &'a str, rg: &'a str, name: &'a str) -> ResourceRef<'a> {
    typed_ref(SNAPSHOT_TYPE, sub, rg, name)
}

pub(crate) fn disk_ref<'a>(sub: &'a str, rg: &'a str, name: &'a str) -> ResourceRef<'a> {
    typed_ref(DISK_TYPE, sub, rg, name)
}

/// A 400 with Azure's inner error code.
pub(crate) fn bad(inner: &'static str, message: impl Into<String>) -> KvError {
    kagi_cmk::bad(inner, message)
}

use kagi_host::json_body;

/// Disk encryption sets and disks as the platform's HTTP layer sees them: the identities of
/// sets are trusted by vault firewalls (as Azure's disk encryption sets are).
#[async_trait]
impl ResourceProvider for DiskService {
    fn namespace(&self) -> &'static str {
        NAMESPACE
    }

    fn resource_types(&self) -> &'static [&'static str] {
        &[DES_TYPE, DISK_TYPE, SNAPSHOT_TYPE, IMAGE_TYPE]
    }

    fn routes(&self) -> &'static [kagi_core::route_table::Route] {
        routes::ROUTES
    }

    async fn handle(
        self: Arc<Self>,
        caller: &Principal,
        req: ArmRequest<'_>,
    ) -> Result<kagi_host::ArmReply, KvError> {
        // A change of a disk encryption set is a long-running operation in Azure (202 and
        // its status); everything else answers when done, a create with 200 (never 201: the
        // SDKs' pollers accept only 200 and 202).
        let set_change = matches!(req.method, "PUT" | "PATCH" | "DELETE")
            && matches!(
                req.l,
                [
                    "subscriptions",
                    _,
                    "resourcegroups",
                    _,
                    "providers",
                    "microsoft.compute",
                    "diskencryptionsets",
                    _
                ]
            );
        let subscription = req.segs.get(1).map(|s| s.to_string()).unwrap_or_default();
        let started = self.host.now();
        let (status, body) = self.route(caller, req).await?;
        if set_change && status != 204 {
            let location = body["location"].as_str().unwrap_or("global").to_string();
            let url = self.finished_operation(&subscription, &location, started, &body);
            return Ok(kagi_host::ArmReply {
                status: 202,
                body,
                async_operation: Some(url),
            });
        }
        Ok((if status == 201 { 200 } else { status }, body).into())
    }

    async fn home(&self, req: &ArmRequest<'_>) -> Result<Option<String>, KvError> {
        self.request_home(req).await
    }

    /// What its `DELETE` refuses (a set used outside the group's deletion, an open access).
    async fn check_delete(
        self: Arc<Self>,
        _caller: &Principal,
        id: &str,
        deleting: &[String],
    ) -> Result<(), KvError> {
        self.delete_refusal(id, deleting).await
    }

    fn trusted_for_vault_firewall(&self) -> bool {
        true
    }

    /// `kagi_disks_open{key_state}` (open disks by the state of their key: `Usable`,
    /// `Failing` inside the revocation grace period, `Revoked` after it) and
    /// `kagi_cmk_keys_in_grace{service="disk"}`, from the open disks in memory.
    fn gauges(&self) -> Vec<kagi_core::gauge::GaugeSample> {
        use kagi_core::gauge::{GaugeSample, KEYS_IN_GRACE, KEYS_IN_GRACE_HELP};
        let (mut usable, mut failing, mut revoked) = (0, 0, 0);
        for disk in self.open.lock().unwrap_or_else(|p| p.into_inner()).values() {
            match disk.key_state() {
                runtime::KeyState::Usable => usable += 1,
                runtime::KeyState::Failing { .. } => failing += 1,
                runtime::KeyState::Revoked { .. } => revoked += 1,
            }
        }
        let open = |state: &str, n| {
            GaugeSample::new(
                "kagi_disks_open",
                "Disks open (their data key in memory), by the state of their key.",
                n,
            )
            .label("key_state", state)
        };
        vec![
            open("Usable", usable),
            open("Failing", failing),
            open("Revoked", revoked),
            GaugeSample::new(KEYS_IN_GRACE, KEYS_IN_GRACE_HELP, failing).label("service", "disk"),
        ]
    }

    fn movable(&self, resource_type: &str) -> bool {
        [DES_TYPE, DISK_TYPE, SNAPSHOT_TYPE, IMAGE_TYPE]
            .iter()
            .any(|t| t.eq_ignore_ascii_case(resource_type))
    }

    async fn move_resource(
        self: Arc<Self>,
        caller: &Principal,
        to: kagi_host::MoveRequest<'_>,
    ) -> Result<Value, KvError> {
        self.move_compute(caller, to).await
    }
}

impl DiskService {
    /// A move of a set, disk or snapshot (DK-7): a disk or snapshot moves only while no access
    /// is open, and one under a customer-managed key never to another subscription; a set
    /// moves only while nothing uses it (disks name it by id). Everything else moves with the
    /// host's resource move (identities, documents and activity log in one transaction).
    async fn move_compute(
        &self,
        caller: &Principal,
        to: kagi_host::MoveRequest<'_>,
    ) -> Result<Value, KvError> {
        let p = self.host.as_ref();
        let body = p.resource(to.id).ok_or_else(|| {
            KvError::new(
                ErrorCode::ResourceNotFound,
                format!("The resource '{}' was not found.", to.id),
            )
        })?;
        let id = body["id"].as_str().unwrap_or(to.id).to_string();
        let name = body["name"].as_str().unwrap_or_default().to_string();
        let _g = self.lock_id(&id).await;
        self.expire_accesses().await;
        let same_subscription = kagi_host::subscription_of(&id)
            .is_some_and(|s| s.eq_ignore_ascii_case(to.subscription));
        let refuse = |inner: &'static str, message: String| {
            Err(KvError::new(ErrorCode::BadRequest, message).with_inner(inner))
        };
        let ty = body["type"].as_str().unwrap_or_default();
        if ty.eq_ignore_ascii_case(DES_TYPE) {
            if !self.disks_of(&id).is_empty() {
                return refuse(
                    "ResourceMoveNotSupported",
                    format!(
                        "The disk encryption set '{name}' is used by disks or snapshots, which \
                         name it by id: it moves only when none does."
                    ),
                );
            }
        } else {
            if self.access_open(&id) {
                return refuse(
                    "OperationNotAllowed",
                    format!("'{name}' has an active access: end it before moving it."),
                );
            }
            let cmk = body["properties"]["encryption"]["diskEncryptionSetId"].is_string();
            if cmk && !same_subscription {
                return refuse(
                    "ResourceMoveNotSupported",
                    format!(
                        "'{name}' is encrypted with a customer-managed key: it moves to another \
                         resource group, never to another subscription."
                    ),
                );
            }
        }
        let moved = p.move_resource(caller, to).await?;
        if !to.dry_run {
            // Opened again, under its new id, by its next use.
            self.open
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id.to_ascii_lowercase());
        }
        Ok(moved)
    }
}

/// How long an operation's status stays readable.
const OPERATION_KEPT_SECONDS: i64 = 3600;

impl DiskService {
    /// Records a long-running operation that started at `started` and has finished with the
    /// resource `output` (the work is done before the 202 is sent, so its status is final
    /// from the first poll); returns its status URL.
    fn finished_operation(
        &self,
        sub: &str,
        location: &str,
        started: i64,
        output: &Value,
    ) -> String {
        // Kept in this node's memory: the id names the node, so that another node forwards
        // the status's reads here (`crate::homes`).
        let random = kagi_crypto::random_array().unwrap_or_else(|_| {
            let mut r = [0u8; 16];
            r[..8].copy_from_slice(&started.to_be_bytes());
            r
        });
        let id = kagi_host::operation_id(random, &self.host.node_name());
        let now = self.host.now();
        let status = serde_json::json!({
            "name": id,
            "status": "Succeeded",
            "startTime": kagi_core::time::rfc3339(started),
            "endTime": kagi_core::time::rfc3339(now),
            "properties": {"output": output},
        });
        let mut ops = self.operations.lock().unwrap_or_else(|p| p.into_inner());
        ops.retain(|_, (at, _)| now - *at < OPERATION_KEPT_SECONDS);
        ops.insert(id.clone(), (now, status));
        format!(
            "{}/subscriptions/{sub}/providers/Microsoft.Compute/locations/{location}/DiskOperations/{id}?api-version=2025-01-02",
            self.host.config().authority()
        )
    }

    /// `GET …/locations/{l}/DiskOperations/{id}`.
    fn operation(&self, id: &str) -> Result<(u16, Value), KvError> {
        self.operations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .map(|(_, v)| (200, v.clone()))
            .ok_or_else(|| {
                KvError::new(
                    ErrorCode::NotFound,
                    format!("The operation '{id}' was not found (statuses are kept an hour)."),
                )
            })
    }

    /// Starts the NBD server of the service's accesses on its Unix socket.
    pub async fn start_nbd(self: &Arc<Self>) -> Result<kagi_nbd::NbdServer, kagi_nbd::ServerError> {
        match self.load_accesses().await {
            Ok(n) => tracing::info!(accesses = n, "disk accesses loaded"),
            Err(e) => tracing::error!(error = %e, "disk accesses not loaded"),
        }
        let resolver = Arc::new(NbdExports(self.clone()));
        let server = kagi_nbd::NbdServer::new(resolver, kagi_nbd::Config::default())?;
        server.listen_unix(&self.nbd_socket).await?;
        tracing::info!(socket = %self.nbd_socket.display(), "NBD server listening");
        Ok(server)
    }

    /// Serves the accesses over TCP too, at `addr`, with TLS (`tls`, certificates of the
    /// platform's CA) required: access URIs become `nbds://{host}:{port}/{export}` with the
    /// directory of the CA certificate as libnbd wants it (`ca-cert.pem`). Returns the bound
    /// address.
    pub async fn listen_tcp(
        &self,
        server: &kagi_nbd::NbdServer,
        addr: SocketAddr,
        host: &str,
        tls: Arc<kagi_nbd::rustls::ServerConfig>,
    ) -> Result<SocketAddr, KvError> {
        let dir = self.host.config().data_dir.join("tls").join("nbd");
        let ca = self.host.config().data_dir.join("tls").join("ca.pem");
        std::fs::create_dir_all(&dir)
            .and_then(|()| std::fs::copy(&ca, dir.join("ca-cert.pem")))
            .map_err(|e| keys::internal("writing the NBD client CA", e))?;
        let bound = server
            .listen_tcp(addr, Some(tls))
            .await
            .map_err(|e| keys::internal("listening for NBD", e))?;
        let dir = std::fs::canonicalize(&dir).unwrap_or(dir);
        let _ = self.tcp.set((
            format!("nbds://{host}:{}/", bound.port()),
            format!("?tls-certificates={}", dir.display()),
        ));
        tracing::info!(%bound, "NBD server listening on TCP (TLS)");
        Ok(bound)
    }
}
