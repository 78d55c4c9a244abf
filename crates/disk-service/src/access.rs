//! Access to a disk over NBD, Azure's way (`beginGetAccess`/`endGetAccess`): an access is an
//! unguessable export name bound to one disk, read-only or read-write, until it expires or is
//! ended. The name is the secret (like the signature of Azure's SAS URL): whoever holds the
//! URI can connect, on this machine's Unix socket. Ending the access, its expiry, and the
//! revocation of the disk's key disconnect its clients.
//!
//! The name also carries the node that made it (`sas-{secret}-{node}`), the disk family's home
//! (docs/SEVERAL_NODES.md, "Homes"): a connection for it that reaches another node (any node
//! behind a TCP load balancer) is passed on to the home's NBD listener (docs/NBD.md,
//! "Forwarding"). Names made before (`sas-{secret}`) are served where they are asked for.

use std::sync::Arc;

use async_trait::async_trait;
use kagi_core::{ErrorCode, KvError};
use kagi_host::{Principal, ResourceRef};
use kagi_nbd::{
    BlockDevice, BlockSizes, ClientInfo, DeviceError, Errno, Export, ExportResolver, Extent,
    ReadData, Refusal, Upstream, UpstreamTls, ZeroFlags,
};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::keys::internal;
use crate::runtime::DiskRuntime;
use crate::{DiskService, bad};

/// The longest access Azure grants (`durationInSeconds`), five days... kagi allows one day
/// less than Azure's SAS maximum of 2^31 seconds would, but more than any copy needs.
const MAX_ACCESS_SECONDS: i64 = 5 * 24 * 3600;

/// One access granted.
#[derive(Clone, Debug)]
pub(crate) struct Access {
    /// The disk's resource id (lower case).
    pub(crate) disk: String,
    /// Read-write or read-only.
    pub(crate) write: bool,
    /// When it ends (platform clock).
    pub(crate) expires: i64,
    /// Cancelled when the access ends: its clients are disconnected.
    pub(crate) disconnect: CancellationToken,
}

/// The document kind of a resource's accesses (by the hash of their export name).
const ACCESS_DOC: &str = "access";

/// The node named in export name `export` (`sas-{hex}-{node}`), if it names one.
fn export_home(export: &str) -> Option<&str> {
    let (_, node) = export.strip_prefix("sas-")?.split_once('-')?;
    let valid = (1..=64).contains(&node.len())
        && node
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-');
    valid.then_some(node)
}

/// TLS to another node's NBD listener: its certificate is checked against the CA every node of
/// the cluster shares (`<data>/tls/ca.pem`) for the platform's DNS suffix (the name access URIs
/// give, which every node's listener has a certificate for).
fn cluster_tls(config: &kagi_host::HostConfig) -> Result<UpstreamTls, String> {
    use kagi_nbd::rustls;
    let path = config.data_dir.join("tls").join("ca.pem");
    let pem = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let der = kagi_crypto::x509::certificate_der(&pem).map_err(|e| e.to_string())?;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(der.into()).map_err(|e| e.to_string())?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let server_name = rustls::pki_types::ServerName::try_from(config.dns_suffix.clone())
        .map_err(|e| e.to_string())?;
    Ok(UpstreamTls {
        config: Arc::new(tls),
        server_name,
    })
}

/// How an access is known: the SHA-256 of its export name (the name itself, a bearer secret,
/// is never stored).
fn access_key(export: &str) -> String {
    hex::encode(kagi_crypto::digest(
        kagi_crypto::DigestAlgorithm::Sha256,
        export.as_bytes(),
    ))
}

impl DiskService {
    /// Loads the accesses granted before a restart that have not expired (at start).
    pub(crate) async fn load_accesses(&self) -> Result<usize, KvError> {
        let p = self.host.as_ref();
        let now = p.now();
        let mut ids: Vec<String> = Vec::new();
        for ty in [crate::DISK_TYPE, crate::SNAPSHOT_TYPE] {
            ids.extend(
                p.resources_of_type(ty)
                    .iter()
                    .filter_map(|r| r["id"].as_str().map(str::to_string)),
            );
        }
        let mut loaded = 0;
        for id in ids {
            for (key, doc) in p.documents(&id, ACCESS_DOC).await? {
                let expires = doc["expires"].as_i64().unwrap_or(0);
                if expires <= now {
                    p.delete_document(&id, ACCESS_DOC, &key).await?;
                    continue;
                }
                let access = Access {
                    disk: id.to_ascii_lowercase(),
                    write: doc["write"].as_bool().unwrap_or(false),
                    expires,
                    disconnect: CancellationToken::new(),
                };
                self.accesses
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(key, access);
                loaded += 1;
            }
        }
        Ok(loaded)
    }

    /// Ends the accesses whose time is over, and those of disks and snapshots that are gone
    /// (deleted through another node while this one, their home, was deemed not running: a
    /// resource with an open access is neither deleted nor moved here): their connections are
    /// cut (an access is checked when a client connects; this ends the connections it let
    /// in), and they are forgotten.
    pub(crate) async fn expire_accesses(&self) {
        let now = self.host.now();
        let expired: Vec<(String, String)> = {
            let mut all = self.accesses.lock().unwrap_or_else(|p| p.into_inner());
            let keys: Vec<String> = all
                .iter()
                .filter(|(_, a)| a.expires <= now || self.host.resource(&a.disk).is_none())
                .map(|(k, _)| k.clone())
                .collect();
            keys.into_iter()
                .filter_map(|k| {
                    let a = all.remove(&k)?;
                    a.disconnect.cancel();
                    Some((a.disk, k))
                })
                .collect()
        };
        for (disk, key) in expired {
            let id = self
                .host
                .resource(&disk)
                .and_then(|b| b["id"].as_str().map(str::to_string))
                .unwrap_or(disk);
            if let Err(e) = self.host.delete_document(&id, ACCESS_DOC, &key).await {
                tracing::warn!(disk = %id, error = %e, "expired access not forgotten");
            }
        }
    }

    /// The disks and snapshots (lower-case ids) with an access open on any node, from the
    /// store (one query): on a store several nodes share, a list answered here shows the
    /// accesses their homes hold. Empty on one node (this node's accesses are in memory) or
    /// when the store cannot say.
    pub(crate) async fn accesses_anywhere(&self) -> std::collections::HashSet<String> {
        if !self.host.shares_store() {
            return std::collections::HashSet::new();
        }
        let now = self.host.now();
        match self.host.documents_of_kind(ACCESS_DOC).await {
            Ok(docs) => docs
                .into_iter()
                .filter(|(_, _, d)| d["expires"].as_i64().is_some_and(|e| e > now))
                .map(|(id, _, _)| id)
                .collect(),
            Err(e) => {
                tracing::warn!(error = %e.message, "open accesses not read for a list");
                std::collections::HashSet::new()
            }
        }
    }

    fn accesses_of(&self, disk_id: &str) -> Vec<(String, Access)> {
        let now = self.host.now();
        let all = self.accesses.lock().unwrap_or_else(|p| p.into_inner());
        all.iter()
            .filter(|(_, a)| a.disk.eq_ignore_ascii_case(disk_id) && a.expires > now)
            .map(|(k, a)| (k.clone(), a.clone()))
            .collect()
    }

    /// Whether disk `id` has an access open now.
    pub(crate) fn access_open(&self, id: &str) -> bool {
        !self.accesses_of(id).is_empty()
    }

    /// Whether disk `id` has a read-write access open now.
    pub(crate) fn open_for_write(&self, id: &str) -> bool {
        self.accesses_of(id).iter().any(|(_, a)| a.write)
    }

    /// Ends every access of disk `id`: their clients are disconnected, and they are gone for
    /// good (not back after a restart).
    pub(crate) async fn end_accesses(&self, id: &str) -> Result<usize, KvError> {
        let ended: Vec<String> = {
            let mut all = self.accesses.lock().unwrap_or_else(|p| p.into_inner());
            let ended: Vec<String> = all
                .iter()
                .filter(|(_, a)| a.disk.eq_ignore_ascii_case(id))
                .map(|(k, _)| k.clone())
                .collect();
            for k in &ended {
                if let Some(a) = all.remove(k) {
                    a.disconnect.cancel();
                }
            }
            ended
        };
        for k in &ended {
            self.host.delete_document(id, ACCESS_DOC, k).await?;
        }
        Ok(ended.len())
    }

    /// `POST {disk}/beginGetAccess`.
    pub(crate) async fn begin_access(
        &self,
        caller: &Principal,
        at: ResourceRef<'_>,
        input: Value,
    ) -> Result<(u16, Value), KvError> {
        let name = at.name;
        let (id, _g) = self.locked(at).await;
        let disk = self.host.get_resource(caller, at)?;
        let write = match input["access"].as_str() {
            Some(a) if a.eq_ignore_ascii_case("Read") => false,
            Some(a) if a.eq_ignore_ascii_case("Write") => true,
            _ => {
                return Err(bad("InvalidParameter", "access must be 'Read' or 'Write'."));
            }
        };
        let seconds = input["durationInSeconds"]
            .as_i64()
            .filter(|s| (1..=MAX_ACCESS_SECONDS).contains(s))
            .ok_or_else(|| {
                bad(
                    "InvalidParameter",
                    format!(
                        "durationInSeconds must be a whole number from 1 to {MAX_ACCESS_SECONDS}."
                    ),
                )
            })?;
        if write && at.resource_type == crate::SNAPSHOT_TYPE {
            return Err(bad(
                "InvalidParameter",
                "A snapshot is read-only: its access is 'Read'.",
            ));
        }
        let disk_id = disk["id"].as_str().unwrap_or(&id).to_ascii_lowercase();
        if write && self.access_open(&disk_id) {
            return Err(KvError::conflict(format!(
                "The disk '{name}' already has an active access; end it before granting write \
                 access."
            ))
            .with_inner("OperationNotAllowed"));
        }
        // The key decides: a revoked key refuses access, naming the key (DK-5).
        let rt = self.runtime(&disk).await.map_err(|e| {
            KvError::new(
                e.code,
                format!("Access to the disk '{name}' is refused: {}", e.message),
            )
            .with_inner(e.inner.unwrap_or("KeyVaultAccessForbidden"))
        })?;
        if let Some(reason) = rt.refusal() {
            return Err(KvError::new(
                ErrorCode::Forbidden,
                format!("Access to the disk '{name}' is refused: {reason}"),
            )
            .with_inner("KeyVaultAccessForbidden"));
        }
        let raw = kagi_crypto::random_bytes(32).map_err(|e| internal("rng", e))?;
        // The home rides in the name: whichever node a client reaches passes it on there.
        let export = format!("sas-{}-{}", hex::encode(raw), self.host.node_name());
        let access = Access {
            disk: disk_id,
            write,
            expires: self.host.now() + seconds,
            disconnect: CancellationToken::new(),
        };
        // Durable before it is handed out: an access outlives a restart, as a SAS does.
        let key = access_key(&export);
        let doc = json!({"write": write, "expires": access.expires});
        let doc_id = disk["id"].as_str().unwrap_or(&id);
        self.host
            .put_document(doc_id, ACCESS_DOC, &key, &doc)
            .await?;
        self.accesses
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, access);
        let uri = match self.tcp.get() {
            Some((base, query)) => format!("{base}{export}{query}"),
            None => format!("nbd+unix:///{export}?socket={}", self.nbd_socket.display()),
        };
        tracing::info!(disk = %id, write, seconds, "disk access granted");
        Ok((200, json!({ "accessSAS": uri })))
    }

    /// `POST {disk}/endGetAccess`.
    pub(crate) async fn end_access(
        &self,
        caller: &Principal,
        at: ResourceRef<'_>,
    ) -> Result<(u16, Value), KvError> {
        // Under the disk's lock, read again under it: a change of the disk meanwhile (a switch
        // of set) is never written over with an older copy.
        let (_, _g) = self.locked(at).await;
        let disk = self.host.get_resource(caller, at)?;
        let id = disk["id"].as_str().unwrap_or_default().to_string();
        let wrote = self.accesses_of(&id).iter().any(|(_, a)| a.write);
        let n = self.end_accesses(&id).await?;
        // The end of an upload (a write access ended): an ordinary disk from now on.
        if wrote && disk["properties"]["diskState"] == json!("ReadyToUpload") {
            let mut body = json!({"location": disk["location"], "properties": disk["properties"],
                "sku": disk["sku"]});
            if disk["tags"].is_object() {
                body["tags"] = disk["tags"].clone();
            }
            body["properties"]["diskState"] = json!("Unattached");
            let put = kagi_host::PutResource {
                at,
                body,
                identity: None,
            };
            self.host.put_resource(caller, put).await?;
        }
        // What was written is flushed before the access is reported closed: writes its
        // connections still run finish first.
        if let Some(rt) = self.open_disk(&id) {
            rt.settle(std::time::Duration::from_secs(30)).await;
            let vol = rt.volume.clone();
            tokio::task::spawn_blocking(move || vol.flush())
                .await
                .map_err(|e| internal("flush", e))?
                .map_err(|e| internal("flush", e))?;
        }
        tracing::info!(disk = %id, ended = n, "disk access ended");
        Ok((200, Value::Null))
    }
}

/// The disk service's NBD exports: an export name is an access granted by
/// `beginGetAccess`.
#[derive(Debug)]
pub struct NbdExports(pub Arc<DiskService>);

#[async_trait]
impl ExportResolver for NbdExports {
    async fn resolve(&self, name: &str, _client: &ClientInfo) -> Result<Export, Refusal> {
        let svc = &self.0;
        let now = svc.host.now();
        let access = {
            let all = svc.accesses.lock().unwrap_or_else(|p| p.into_inner());
            all.get(&access_key(name)).cloned()
        };
        // One answer for unknown and expired names: the name is the secret.
        let unknown = || Refusal::Unknown("No such export, or its access has ended.".into());
        let access = access.filter(|a| a.expires > now).ok_or_else(unknown)?;
        let rt = match svc.open_disk(&access.disk) {
            Some(rt) => rt,
            // After a restart: opened (its key unwrapped) by its first client.
            None => {
                let body = svc.host.resource(&access.disk).ok_or_else(unknown)?;
                svc.runtime(&body).await.map_err(|e| {
                    Refusal::Policy(format!("The disk cannot be opened: {}", e.message))
                })?
            }
        };
        if let Some(reason) = rt.refusal() {
            return Err(Refusal::Policy(format!(
                "The disk's key cannot be used: {reason}"
            )));
        }
        let device = DiskDevice {
            rt: rt.clone(),
            write: access.write,
        };
        Ok(Export {
            device: Arc::new(device),
            description: Some(format!(
                "kagi disk {}",
                rt.id.rsplit('/').next().unwrap_or("")
            )),
            disconnect: access.disconnect.child_token(),
            // endGetAccess waits for every request its connections accepted.
            requests: Some(rt.in_flight.clone()),
        })
    }

    /// An export named for another node is served by it: its NBD listener over TLS. A node
    /// that is not running or serves no NBD over TCP is a refusal naming it.
    async fn upstream(
        &self,
        name: &str,
        _client: &ClientInfo,
    ) -> Result<Option<Upstream>, Refusal> {
        let host = &self.0.host;
        let Some(node) = export_home(name) else {
            return Ok(None);
        };
        // On one node (SQLite) every export is this node's, whatever name it carries.
        if node == host.node_name() || !host.shares_store() {
            return Ok(None);
        }
        let served = |why: &str| {
            Refusal::Unknown(format!("The export is served by the node '{node}', {why}"))
        };
        let nodes = host.live_nodes().await.map_err(|e| {
            tracing::warn!(node, error = %e.message, "cannot read the running nodes");
            served("which cannot be found now. Retry later.")
        })?;
        let Some(card) = nodes.into_iter().find(|n| n.name == node) else {
            return Err(served("which is not running. Retry when it is back."));
        };
        let Some(address) = card.nbd else {
            return Err(served(
                "which serves no NBD over TCP (kagi server --nbd-listen).",
            ));
        };
        let tls = cluster_tls(&host.config()).map_err(|e| {
            tracing::error!(error = %e, "no TLS configuration to reach another node's NBD");
            served("which this node cannot reach (its TLS trust is not set up).")
        })?;
        Ok(Some(Upstream {
            address,
            tls: Some(tls),
            label: format!("the node '{node}'"),
        }))
    }
}

/// A disk as an NBD block device: every operation runs on a blocking thread, and fails with
/// EIO naming the reason once the disk's key is revoked.
struct DiskDevice {
    rt: Arc<DiskRuntime>,
    write: bool,
}

fn io_error(e: kagi_disk::DiskError) -> DeviceError {
    use kagi_disk::DiskError as E;
    let errno = match &e {
        E::NoSpace => Errno::NoSpc,
        E::OutOfRange { .. } | E::InvalidSize { .. } => Errno::Inval,
        E::ReadOnly => Errno::Perm,
        _ => Errno::Io,
    };
    match e {
        E::Locked => DeviceError::with_message(
            Errno::Io,
            "the disk's key has been revoked; I/O fails until the key is usable again",
        ),
        other => DeviceError::with_message(errno, other.to_string()),
    }
}

impl DiskDevice {
    fn check(&self) -> Result<(), DeviceError> {
        match self.rt.refusal() {
            Some(reason) => Err(DeviceError::with_message(Errno::Io, reason)),
            None => Ok(()),
        }
    }

    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&kagi_disk::Volume) -> Result<T, kagi_disk::DiskError> + Send + 'static,
    ) -> Result<T, DeviceError> {
        self.check()?;
        let running = self.rt.running();
        let vol = self.rt.volume.clone();
        tokio::task::spawn_blocking(move || {
            let _running = running;
            f(&vol)
        })
        .await
        .map_err(|_| DeviceError::io("the disk operation stopped"))?
        .map_err(io_error)
    }
}

#[async_trait]
impl BlockDevice for DiskDevice {
    fn size(&self) -> u64 {
        self.rt.volume.size()
    }

    fn read_only(&self) -> bool {
        !self.write
    }

    fn block_sizes(&self) -> BlockSizes {
        BlockSizes {
            minimum: 1,
            preferred: 4096,
            maximum: 32 * 1024 * 1024,
        }
    }

    fn can_multi_conn(&self) -> bool {
        true
    }

    async fn read(&self, offset: u64, len: u32) -> Result<ReadData, DeviceError> {
        self.run(move |v| Ok(ReadData::Data(v.read_vec(offset, len as usize)?)))
            .await
    }

    async fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> Result<(), DeviceError> {
        self.run(move |v| v.write(offset, &data, fua)).await
    }

    async fn flush(&self) -> Result<(), DeviceError> {
        self.run(|v| v.flush()).await
    }

    async fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), DeviceError> {
        self.run(move |v| v.trim(offset, len, fua)).await
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        flags: ZeroFlags,
    ) -> Result<(), DeviceError> {
        if flags.no_hole && flags.fast {
            // Writing zeros as data is not faster than writing them: the client asked to know.
            return Err(DeviceError::new(Errno::NotSup));
        }
        if flags.no_hole {
            // The range must stay allocated: zeros are written as data, a block at a time.
            return self
                .run(move |v| {
                    let step = 1 << 20;
                    let zeros = vec![0u8; step];
                    let mut at = 0;
                    while at < len {
                        let n = (len - at).min(step as u64) as usize;
                        v.write(offset + at, &zeros[..n], false)?;
                        at += n as u64;
                    }
                    if flags.fua { v.flush() } else { Ok(()) }
                })
                .await;
        }
        self.run(move |v| v.write_zeroes(offset, len, flags.fua))
            .await
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, DeviceError> {
        // An answer may cover less than asked (clients ask again from where it ends): at most
        // 1 GiB of the index is walked per request.
        let len = len.min(1 << 30);
        self.run(move |v| {
            Ok(v.extents(offset, len)?
                .into_iter()
                .map(|e| match e.kind {
                    kagi_disk::ExtentKind::Hole => Extent::hole(e.length),
                    kagi_disk::ExtentKind::Data => Extent::data(e.length),
                })
                .collect())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::export_home;

    #[test]
    fn an_export_name_names_its_home_node() {
        let hex = "ab".repeat(32);
        assert_eq!(
            export_home(&format!("sas-{hex}-kagi-1.example-0a1b2c3d")),
            Some("kagi-1.example-0a1b2c3d")
        );
        // Made before homes rode in names: served where asked.
        assert_eq!(export_home(&format!("sas-{hex}")), None);
        for bad in ["", "x", "sas-", "sas-ab-", "sas-ab-a/b", "other-ab-node"] {
            assert_eq!(export_home(bad), None, "{bad}");
        }
        assert_eq!(export_home(&format!("sas-ab-{}", "n".repeat(65))), None);
    }
}
