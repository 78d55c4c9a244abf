//! Backup agents' objects on the server's disk, under `{vault dir}/agents/machines/{machine}/`
//! (docs/AGENT.md).
//!
//! - Acknowledged means durable: an object is written under a temporary name, flushed,
//!   renamed into place and its folder flushed ([`LocalWrites`]), and every folder created
//!   for it is flushed into its parent, before the answer. A power loss leaves the old object
//!   or the new one, never a torn one.
//! - Writes and deletions of one object are serialised: its old size is measured under its
//!   lock, so the vault's usage stays exact however many requests race on it.
//! - A vault's objects are bounded by a quota (`KAGI_AGENT_VAULT_QUOTA_BYTES`, default 1 TiB),
//!   counted once per process by walking the vault's `agents` folder, then kept up to date.
//! - No object is written while the disk would keep less free space than a reserve
//!   (`KAGI_AGENT_DISK_RESERVE_BYTES`, default 1 GiB), counting the writes still in flight:
//!   the audit log and the store share the disk, and without room for the audit log every
//!   request fails.
//! - Reads create nothing; file-system work runs on tokio's blocking threads.
//! - With `kagi server --blobs s3://…` the objects are keys in the shared bucket under the same
//!   path (every node serves every machine): a write is one PUT (S3 stores an object whole or
//!   not at all), the quota is counted by listing the vault's keys once per process, and
//!   there is no disk reserve to keep. Names keep the rule of a file system (`a` and `a/b`
//!   cannot both exist), so a repository moves between the two unchanged.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use futures::{StreamExt, TryStreamExt};
use kagi_backup::{BackupError, Fsync, LocalWrites, Syncer};
use kagi_core::{ErrorCode, KvError};
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt};

use crate::state::{blob, io};
use kagi_blobs::BlobRoot;

/// The default quota of one vault's agent objects.
const DEFAULT_QUOTA_BYTES: u64 = 1 << 40;
/// The default free space kept for the audit log and the store.
const DEFAULT_RESERVE_BYTES: u64 = 1 << 30;

/// A vault's stored bytes, with the inode of its `agents` folder when they were counted (a
/// folder moved away and a new vault's in its place are told apart).
#[derive(Debug, Default)]
struct Usage {
    inode: u64,
    bytes: Option<u64>,
}

/// The agents' storage limits, the bytes each vault uses and the writes in flight.
#[derive(Debug)]
pub(crate) struct AgentStorage {
    inner: Arc<Inner>,
}

/// Free bytes on the file system of a path (a seam: tests give a fixed amount).
type FreeBytes = fn(&Path) -> std::io::Result<u64>;

struct Inner {
    quota: u64,
    reserve: u64,
    free: FreeBytes,
    syncer: Arc<dyn Syncer>,
    /// By the vault's `agents` folder.
    usage: Mutex<HashMap<PathBuf, Arc<Mutex<Usage>>>>,
    /// Bytes of admitted writes not yet finished, on every vault: not yet counted in the
    /// disk's free space.
    pending: Mutex<u64>,
    /// A lock per object file being written or deleted (removed when no one holds it).
    objects: Mutex<HashMap<PathBuf, Arc<Mutex<()>>>>,
    /// Durable writes under each data folder.
    writes: Mutex<HashMap<PathBuf, Arc<LocalWrites>>>,
    /// Where the objects live.
    blobs: BlobRoot,
    /// With a bucket: a lock per object being written or deleted (as `objects`, held across
    /// the requests to the bucket).
    remote_objects: Mutex<HashMap<PathBuf, Arc<tokio::sync::Mutex<()>>>>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentStorage")
            .field("quota", &self.quota)
            .field("reserve", &self.reserve)
            .finish_non_exhaustive()
    }
}

fn env_bytes(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The bytes of the files under `dir` (0 when it does not exist).
fn bytes_under(dir: &Path) -> std::io::Result<u64> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let mut total = 0u64;
    for entry in entries {
        let entry = entry?;
        let meta = entry.metadata()?;
        total = total.saturating_add(if meta.is_dir() {
            bytes_under(&entry.path())?
        } else if meta.is_file() {
            meta.len()
        } else {
            0
        });
    }
    Ok(total)
}

/// Free bytes for an unprivileged writer on the file system of `path` (or of its nearest
/// existing ancestor).
fn free_bytes(path: &Path) -> std::io::Result<u64> {
    let mut p = path;
    while !p.exists() {
        p = p
            .parent()
            .ok_or_else(|| std::io::Error::other("no existing ancestor"))?;
    }
    let s = rustix::fs::statvfs(p)?;
    Ok(s.f_bavail.saturating_mul(s.f_frsize))
}

/// The size of the object file `file`; `None` when there is none (nothing there, a folder
/// there, or a file in the place of one of its folders).
fn object_size(file: &Path) -> std::io::Result<Option<u64>> {
    match std::fs::symlink_metadata(file) {
        Ok(m) => Ok(m.is_file().then_some(m.len())),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Whether storing `name` in `dir` would put a file where a folder is, or a folder where a
/// file is (`a` then `a/b`, or the reverse): object names are paths on this disk.
fn name_conflicts(dir: &Path, name: &str) -> bool {
    let mut at = dir.to_path_buf();
    let parts: Vec<&str> = name.split('/').collect();
    for (i, part) in parts.iter().enumerate() {
        at.push(part);
        match std::fs::symlink_metadata(&at) {
            Ok(m) if i + 1 < parts.len() && !m.is_dir() => return true,
            Ok(m) if i + 1 == parts.len() && m.is_dir() => return true,
            Ok(_) => {}
            Err(_) => return false,
        }
    }
    false
}

fn name_conflict(name: &str) -> KvError {
    KvError::new(
        ErrorCode::Conflict,
        format!(
            "The object '{}' cannot be stored: an object's name cannot also be the folder of \
             other objects ('a' and 'a/b').",
            kagi_core::ids::printable(name)
        ),
    )
    .with_inner("ObjectNameConflict")
}

fn object_missing(name: &str) -> KvError {
    KvError::new(
        ErrorCode::NotFound,
        format!("No object '{}'.", kagi_core::ids::printable(name)),
    )
    .with_inner("ObjectNotFound")
}

/// The object store of a machine's folder holding the object `name`: 404 when there is no
/// such object (nothing there, a folder there, or a file in the place of one of its folders;
/// a read never creates anything).
fn store_with(blobs: &BlobRoot, dir: &Path, name: &str) -> Result<Arc<dyn ObjectStore>, KvError> {
    if let Some(bucket) = blobs.remote(dir).map_err(blob)? {
        // A missing object is found missing by the request itself.
        return Ok(bucket);
    }
    match object_size(&dir.join(name)) {
        Ok(Some(_)) => {}
        Ok(None) => return Err(object_missing(name)),
        Err(e) => return Err(io("stat agent object", e)),
    }
    store_of(blobs, dir)?.ok_or_else(|| object_missing(name))
}

/// The object store of a machine's folder; `None` when the folder does not exist (a read
/// never creates it).
fn store_of(blobs: &BlobRoot, dir: &Path) -> Result<Option<Arc<dyn ObjectStore>>, KvError> {
    if let Some(bucket) = blobs.remote(dir).map_err(blob)? {
        return Ok(Some(bucket));
    }
    if !dir.is_dir() {
        return Ok(None);
    }
    LocalFileSystem::new_with_prefix(dir)
        .map(|fs| Some(Arc::new(fs) as Arc<dyn ObjectStore>))
        .map_err(|e| io("agent objects", e))
}

/// Objects under a prefix with their size and modification time (Unix seconds), by name.
pub(crate) async fn list_meta(
    blobs: &BlobRoot,
    dir: &Path,
    prefix: &str,
) -> Result<Vec<(String, u64, i64)>, KvError> {
    let Some(store) = store_of(blobs, dir)? else {
        return Ok(Vec::new());
    };
    let p = (!prefix.is_empty()).then(|| ObjectPath::from(prefix));
    let metas: Vec<_> = store
        .list(p.as_ref())
        .try_collect()
        .await
        .map_err(|e| io("list agent objects", e))?;
    let mut out: Vec<_> = metas
        .into_iter()
        .map(|m| (m.location.to_string(), m.size, m.last_modified.timestamp()))
        .collect();
    out.sort();
    Ok(out)
}

/// An object's bytes, or those of a half-open range of it.
pub(crate) async fn get_object(
    blobs: &BlobRoot,
    dir: &Path,
    name: &str,
    range: Option<(u64, u64)>,
) -> Result<Vec<u8>, KvError> {
    let store = store_with(blobs, dir, name)?;
    let path = ObjectPath::from(name);
    let r = match range {
        Some((start, end)) => {
            let size = match store.head(&path).await {
                Ok(m) => m.size,
                Err(object_store::Error::NotFound { .. }) => return Err(object_missing(name)),
                Err(e) => return Err(io("stat agent object", e)),
            };
            if start >= size {
                return Err(KvError::new(
                    ErrorCode::RangeNotSatisfiable,
                    format!("The object is {size} bytes; the range starts at {start}."),
                ));
            }
            store
                .get_range(&path, start..end.min(size))
                .await
                .map(|b| b.to_vec())
        }
        None => match store.get(&path).await {
            Ok(g) => g.bytes().await.map(|b| b.to_vec()),
            Err(e) => Err(e),
        },
    };
    match r {
        Ok(b) => Ok(b),
        Err(object_store::Error::NotFound { .. }) => Err(object_missing(name)),
        Err(e) => Err(io("read agent object", e)),
    }
}

/// Whether an object exists (404 if not).
pub(crate) async fn head_object(blobs: &BlobRoot, dir: &Path, name: &str) -> Result<(), KvError> {
    let store = store_with(blobs, dir, name)?;
    match store.head(&ObjectPath::from(name)).await {
        Ok(_) => Ok(()),
        Err(object_store::Error::NotFound { .. }) => Err(object_missing(name)),
        Err(e) => Err(io("stat agent object", e)),
    }
}

/// The size of the object `name` in a bucket; `None` when there is none.
async fn remote_size(bucket: &Arc<dyn ObjectStore>, name: &str) -> Result<Option<u64>, KvError> {
    match bucket.head(&ObjectPath::from(name)).await {
        Ok(m) => Ok(Some(m.size)),
        Err(object_store::Error::NotFound { .. }) => Ok(None),
        Err(e) => Err(io("stat agent object", e)),
    }
}

/// Whether storing `name` in a bucket would break the file-system rule the local folders
/// keep: one of its folders is an object (`a` for `a/b`), or it is the folder of objects
/// (`a/b` for `a`).
async fn remote_name_conflicts(bucket: &Arc<dyn ObjectStore>, name: &str) -> Result<bool, KvError> {
    let parts: Vec<&str> = name.split('/').collect();
    for i in 1..parts.len() {
        if remote_size(bucket, &parts[..i].join("/")).await?.is_some() {
            return Ok(true);
        }
    }
    let under = ObjectPath::from(name);
    Ok(bucket
        .list(Some(&under))
        .next()
        .await
        .transpose()
        .map_err(|e| io("list agent objects", e))?
        .is_some())
}

/// Runs blocking file-system work on tokio's blocking threads.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, KvError> + Send + 'static,
) -> Result<T, KvError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| io("agent storage task", e))?
}

/// Bytes counted as pending until dropped.
struct Pending<'a>(&'a Mutex<u64>, u64);

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        let mut p = lock(self.0);
        *p = p.saturating_sub(self.1);
    }
}

impl AgentStorage {
    /// Limits from the environment (`KAGI_AGENT_VAULT_QUOTA_BYTES`,
    /// `KAGI_AGENT_DISK_RESERVE_BYTES`), objects in `blobs`.
    pub(crate) fn from_env(blobs: BlobRoot) -> Self {
        Self::with(
            env_bytes("KAGI_AGENT_VAULT_QUOTA_BYTES", DEFAULT_QUOTA_BYTES),
            env_bytes("KAGI_AGENT_DISK_RESERVE_BYTES", DEFAULT_RESERVE_BYTES),
            free_bytes,
            Arc::new(Fsync),
            blobs,
        )
    }

    fn with(
        quota: u64,
        reserve: u64,
        free: FreeBytes,
        syncer: Arc<dyn Syncer>,
        blobs: BlobRoot,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                quota,
                reserve,
                free,
                syncer,
                usage: Mutex::new(HashMap::new()),
                pending: Mutex::new(0),
                objects: Mutex::new(HashMap::new()),
                writes: Mutex::new(HashMap::new()),
                blobs,
                remote_objects: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Where the objects live.
    pub(crate) fn blobs(&self) -> &BlobRoot {
        &self.inner.blobs
    }

    /// The bucket's view of the folder `dir`, when objects live in a bucket.
    fn bucket(&self, dir: &Path) -> Result<Option<Arc<dyn ObjectStore>>, KvError> {
        self.inner.blobs.remote(dir).map_err(blob)
    }

    /// Creates `dir` and every missing folder between `root` (the data folder) and it, each
    /// flushed into its parent before this returns. (A bucket has no folders.)
    pub(crate) async fn ensure_dir(&self, root: &Path, dir: &Path) -> Result<(), KvError> {
        if !self.inner.blobs.is_local() {
            return Ok(());
        }
        let (inner, root, dir) = (self.inner.clone(), root.to_owned(), dir.to_owned());
        blocking(move || {
            let (writes, dir) = inner.under(&root, &dir)?;
            writes
                .ensure_dir(&dir)
                .map_err(|e| io("mkdir agent objects", e))
        })
        .await
    }

    /// Checks, before its body is read, that an object of `len` bytes could be stored at
    /// `name` in the machine folder `dir` of the vault at `vault_dir`.
    pub(crate) async fn admit(
        &self,
        vault_dir: &Path,
        dir: &Path,
        name: &str,
        len: u64,
    ) -> Result<(), KvError> {
        if let Some(bucket) = self.bucket(dir)? {
            let old = remote_size(&bucket, name).await?.unwrap_or(0);
            let used = self.remote_used_checked(vault_dir, old, len).await?;
            return self.inner.check(used, old, len, u64::MAX);
        }
        let inner = self.inner.clone();
        let (vault_dir, file) = (vault_dir.to_owned(), dir.join(name));
        blocking(move || inner.admit(&vault_dir, &file, len)).await
    }

    /// Stores an object within the vault's quota and the disk's reserve, durably.
    pub(crate) async fn put(
        &self,
        root: &Path,
        vault_dir: &Path,
        dir: &Path,
        name: &str,
        body: Vec<u8>,
    ) -> Result<(), KvError> {
        if let Some(bucket) = self.bucket(dir)? {
            return self.remote_put(&bucket, vault_dir, dir, name, body).await;
        }
        let inner = self.inner.clone();
        let (root, vault_dir, dir, name) = (
            root.to_owned(),
            vault_dir.to_owned(),
            dir.to_owned(),
            name.to_owned(),
        );
        blocking(move || inner.put(&root, &vault_dir, &dir, &name, &body)).await
    }

    /// Removes an object (gone already is fine); the removal is durable before this returns,
    /// so a passphrase's removed key entry cannot come back after a power loss.
    pub(crate) async fn delete(
        &self,
        root: &Path,
        vault_dir: &Path,
        dir: &Path,
        name: &str,
    ) -> Result<(), KvError> {
        if let Some(bucket) = self.bucket(dir)? {
            return self.remote_delete(&bucket, vault_dir, dir, name).await;
        }
        let inner = self.inner.clone();
        let (root, vault_dir, file) = (root.to_owned(), vault_dir.to_owned(), dir.join(name));
        blocking(move || inner.delete(&root, &vault_dir, &file)).await
    }

    /// The vault's stored bytes in the bucket, counted by listing when not known.
    async fn remote_used(&self, vault_dir: &Path) -> Result<u64, KvError> {
        let slot = self.inner.usage_slot(vault_dir);
        if let Some(b) = lock(&slot).bytes {
            return Ok(b);
        }
        let Some(bucket) = self.bucket(&vault_dir.join("agents"))? else {
            return Ok(0);
        };
        let counted = bucket
            .list(None)
            .try_fold(0u64, |n, m| {
                futures::future::ready(Ok(n.saturating_add(m.size)))
            })
            .await
            .map_err(|e| io("count agent objects", e))?;
        // Another request may have counted (and then added to) it meanwhile: keep theirs.
        Ok(*lock(&slot).bytes.get_or_insert(counted))
    }

    /// The vault's stored bytes in the bucket; counted again by listing when the count this
    /// node keeps would refuse an object of `len` bytes replacing one of `old`: other nodes'
    /// deletions (an agent's prune sent to another node) are not in it.
    async fn remote_used_checked(
        &self,
        vault_dir: &Path,
        old: u64,
        len: u64,
    ) -> Result<u64, KvError> {
        let used = self.remote_used(vault_dir).await?;
        if self.inner.check(used, old, len, u64::MAX).is_ok() {
            return Ok(used);
        }
        lock(&self.inner.usage_slot(vault_dir)).bytes = None;
        self.remote_used(vault_dir).await
    }

    /// Holds the lock of one object in the bucket for `work`.
    async fn with_remote_object<T>(
        &self,
        key: PathBuf,
        work: impl std::future::Future<Output = T>,
    ) -> T {
        let object = lock(&self.inner.remote_objects)
            .entry(key.clone())
            .or_default()
            .clone();
        let r = {
            let _held = object.lock().await;
            work.await
        };
        let mut objects = lock(&self.inner.remote_objects);
        if Arc::strong_count(&object) == 2 {
            objects.remove(&key);
        }
        r
    }

    /// [`AgentStorage::put`] with a bucket: one PUT, within the quota.
    async fn remote_put(
        &self,
        bucket: &Arc<dyn ObjectStore>,
        vault_dir: &Path,
        dir: &Path,
        name: &str,
        body: Vec<u8>,
    ) -> Result<(), KvError> {
        self.with_remote_object(dir.join(name), async {
            if remote_name_conflicts(bucket, name).await? {
                return Err(name_conflict(name));
            }
            let old = remote_size(bucket, name).await?.unwrap_or(0);
            let len = body.len() as u64;
            let used = self.remote_used_checked(vault_dir, old, len).await?;
            let slot = self.inner.usage_slot(vault_dir);
            {
                let mut usage = lock(&slot);
                let used = usage.bytes.unwrap_or(used);
                self.inner.check(used, old, len, u64::MAX)?;
                usage.bytes = Some(used.saturating_add(len));
            }
            let written = bucket
                .put(&ObjectPath::from(name), body.into())
                .await
                .map_err(|e| io("write agent object", e));
            let release = if written.is_ok() { old } else { len };
            let mut usage = lock(&slot);
            usage.bytes = usage.bytes.map(|b| b.saturating_sub(release));
            written.map(drop)
        })
        .await
    }

    /// [`AgentStorage::delete`] with a bucket.
    async fn remote_delete(
        &self,
        bucket: &Arc<dyn ObjectStore>,
        vault_dir: &Path,
        dir: &Path,
        name: &str,
    ) -> Result<(), KvError> {
        self.with_remote_object(dir.join(name), async {
            let Some(old) = remote_size(bucket, name).await? else {
                return Ok(());
            };
            match bucket.delete(&ObjectPath::from(name)).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(io("delete agent object", e)),
            }
            let slot = self.inner.usage_slot(vault_dir);
            let mut usage = lock(&slot);
            usage.bytes = usage.bytes.map(|b| b.saturating_sub(old));
            Ok(())
        })
        .await
    }

    /// Forgets what a vault uses (a machine's folder was removed): counted again when needed.
    pub(crate) fn forget(&self, vault_dir: &Path) {
        lock(&self.inner.usage).remove(&vault_dir.join("agents"));
    }
}

impl Inner {
    fn usage_slot(&self, vault_dir: &Path) -> Arc<Mutex<Usage>> {
        lock(&self.usage)
            .entry(vault_dir.join("agents"))
            .or_default()
            .clone()
    }

    /// The vault's stored bytes, counted when not known (or when its folder changed).
    fn bytes_used(usage: &mut Usage, vault_dir: &Path) -> Result<u64, KvError> {
        let agents = vault_dir.join("agents");
        let inode = std::fs::metadata(&agents).map_or(0, |m| m.ino());
        match usage.bytes {
            Some(b) if usage.inode == inode => Ok(b),
            // Counted while the folder was missing: what is in it now came through here.
            Some(b) if usage.inode == 0 => {
                usage.inode = inode;
                Ok(b)
            }
            _ => {
                let b = bytes_under(&agents).map_err(|e| io("count agent objects", e))?;
                *usage = Usage {
                    inode,
                    bytes: Some(b),
                };
                Ok(b)
            }
        }
    }

    /// Refuses an object of `len` bytes replacing one of `old` bytes when the vault would
    /// exceed its quota (403) or the disk, with `free` bytes not yet promised to other writes,
    /// would keep less than the reserve (507).
    fn check(&self, used: u64, old: u64, len: u64, free: u64) -> Result<(), KvError> {
        if free < len.saturating_add(self.reserve) {
            return Err(KvError::new(
                ErrorCode::InsufficientStorage,
                format!(
                    "The server's disk has {free} bytes free and keeps {} of them for its audit \
                     log and store, so it does not accept this object of {len} bytes. Free disk \
                     space on the server (or, for its administrator, lower \
                     KAGI_AGENT_DISK_RESERVE_BYTES) and try again.",
                    self.reserve
                ),
            )
            .with_inner("ServerStorageReserveReached"));
        }
        if used.saturating_sub(old).saturating_add(len) > self.quota {
            return Err(KvError::forbidden(format!(
                "The backup vault's storage quota for agents is {} bytes; {used} are stored, \
                 and this object of {len} bytes would exceed it. Keep fewer recovery points \
                 (kagi agent protect --keep-last), unregister machines that are gone, or ask \
                 the administrator to raise the quota (KAGI_AGENT_VAULT_QUOTA_BYTES).",
                self.quota
            ))
            .with_inner("UserErrorVaultStorageQuotaExceeded"));
        }
        Ok(())
    }

    /// Checks an object of `len` bytes replacing one of `old` against the quota and the
    /// reserve, and if it fits, counts it in the vault's usage and in the writes in flight (until
    /// the answer is dropped), all at once: concurrent writes cannot pass either limit together.
    fn reserve(
        &self,
        slot: &Mutex<Usage>,
        vault_dir: &Path,
        dir: &Path,
        old: u64,
        len: u64,
    ) -> Result<Pending<'_>, KvError> {
        let mut usage = lock(slot);
        let used = Self::bytes_used(&mut usage, vault_dir)?;
        let mut pending = lock(&self.pending);
        let free = (self.free)(dir).map_err(|e| io("free space", e))?;
        self.check(used, old, len, free.saturating_sub(*pending))?;
        *pending = pending.saturating_add(len);
        usage.bytes = Some(used.saturating_add(len));
        Ok(Pending(&self.pending, len))
    }

    /// [`AgentStorage::admit`], blocking: the vault's usage may have to be counted first.
    fn admit(&self, vault_dir: &Path, file: &Path, len: u64) -> Result<(), KvError> {
        let slot = self.usage_slot(vault_dir);
        let mut usage = lock(&slot);
        let used = Self::bytes_used(&mut usage, vault_dir)?;
        let old = object_size(file)
            .map_err(|e| io("stat agent object", e))?
            .unwrap_or(0);
        let pending = *lock(&self.pending);
        let free = (self.free)(file).map_err(|e| io("free space", e))?;
        self.check(used, old, len, free.saturating_sub(pending))
    }

    /// The durable writer of the data folder `root`, and `path` (under `root`) as under its
    /// canonical root.
    fn under(&self, root: &Path, path: &Path) -> Result<(Arc<LocalWrites>, PathBuf), KvError> {
        let rel = path
            .strip_prefix(root)
            .map_err(|_| io("agent objects", "a path outside the data folder"))?;
        let mut writes = lock(&self.writes);
        let w = match writes.get(root) {
            Some(w) => w.clone(),
            None => {
                let w = Arc::new(
                    LocalWrites::new(root, self.syncer.clone())
                        .map_err(|e| io("agent objects", e))?,
                );
                writes.insert(root.to_owned(), w.clone());
                w
            }
        };
        let at = w.root().join(rel);
        Ok((w, at))
    }

    /// Runs `work` holding the lock of the object file `file`: writes and deletions of one
    /// object never overlap, so each measures the size it replaces exactly.
    fn with_object<T>(&self, file: &Path, work: impl FnOnce() -> T) -> T {
        let object = lock(&self.objects)
            .entry(file.to_owned())
            .or_default()
            .clone();
        let r = {
            let _held = lock(&object);
            work()
        };
        let mut objects = lock(&self.objects);
        // Ours and the map's: no one else holds or waits for it.
        if Arc::strong_count(&object) == 2 {
            objects.remove(file);
        }
        r
    }

    fn put(
        &self,
        root: &Path,
        vault_dir: &Path,
        dir: &Path,
        name: &str,
        body: &[u8],
    ) -> Result<(), KvError> {
        let file = dir.join(name);
        self.with_object(&file, || {
            if name_conflicts(dir, name) {
                return Err(name_conflict(name));
            }
            let old = object_size(&file)
                .map_err(|e| io("stat agent object", e))?
                .unwrap_or(0);
            let len = body.len() as u64;
            let slot = self.usage_slot(vault_dir);
            let pending = self.reserve(&slot, vault_dir, dir, old, len)?;
            let written = self
                .under(root, &file)
                .and_then(|(w, at)| w.put(&at, body).map_err(|e| write_error(name, e)));
            let mut usage = lock(&slot);
            let release = if written.is_ok() { old } else { len };
            usage.bytes = usage.bytes.map(|b| b.saturating_sub(release));
            drop(pending);
            written
        })
    }

    fn delete(&self, root: &Path, vault_dir: &Path, file: &Path) -> Result<(), KvError> {
        self.with_object(file, || {
            let Some(old) = object_size(file).map_err(|e| io("stat agent object", e))? else {
                return Ok(());
            };
            let (w, at) = self.under(root, file)?;
            w.delete(&at).map_err(|e| io("delete agent object", e))?;
            let slot = self.usage_slot(vault_dir);
            let mut usage = lock(&slot);
            usage.bytes = usage.bytes.map(|b| b.saturating_sub(old));
            Ok(())
        })
    }
}

/// A failed write: a conflict between an object and a folder of the same name (another
/// request made one meanwhile) is the client's; anything else is the server's.
fn write_error(name: &str, e: BackupError) -> KvError {
    match &e {
        BackupError::Io { source, .. }
            if matches!(
                source.kind(),
                std::io::ErrorKind::AlreadyExists
                    | std::io::ErrorKind::NotADirectory
                    | std::io::ErrorKind::IsADirectory
            ) =>
        {
            name_conflict(name)
        }
        _ => io("write agent object", e),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn local() -> BlobRoot {
        BlobRoot::local(Path::new("/"))
    }

    fn storage(quota: u64, reserve: u64) -> AgentStorage {
        AgentStorage::with(quota, reserve, free_bytes, Arc::new(Fsync), local())
    }

    /// Records the flushes made, in order.
    #[derive(Default)]
    struct Recorder(Mutex<Vec<String>>);

    impl Recorder {
        fn take(&self) -> Vec<String> {
            std::mem::take(&mut *self.0.lock().unwrap())
        }
    }

    impl Syncer for Recorder {
        fn sync_file(&self, file: &std::fs::File, path: &Path) -> std::io::Result<()> {
            self.0
                .lock()
                .unwrap()
                .push(format!("file {}", path.display()));
            file.sync_all()
        }

        fn sync_dir(&self, dir: &Path) -> std::io::Result<()> {
            self.0
                .lock()
                .unwrap()
                .push(format!("dir {}", dir.display()));
            Fsync.sync_dir(dir)
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn new_folders_are_synced_into_their_parents() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().canonicalize().unwrap();
        let vault = root.join("backup/s/g/v");
        let machine = vault.join("agents/machines/m1");
        let rec = Arc::new(Recorder::default());
        let s = AgentStorage::with(1 << 30, 0, free_bytes, rec.clone(), local());
        s.put(&root, &vault, &machine, "data/ab/abcd", b"x".to_vec())
            .await
            .unwrap();
        let synced = rec.take();
        // Every folder made for the object is durable in its parent, and the object's rename in
        // its folder.
        let mut d = machine.join("data/ab");
        loop {
            let shown = format!("dir {}", d.display());
            assert!(synced.contains(&shown), "{shown} not synced: {synced:?}");
            if d == root {
                break;
            }
            d = d.parent().unwrap().to_path_buf();
        }
        assert_eq!(std::fs::read(machine.join("data/ab/abcd")).unwrap(), b"x");

        // A folder made by someone else, not yet known durable, is synced into its parent too.
        std::fs::create_dir(machine.join("data/cd")).unwrap();
        s.put(&root, &vault, &machine, "data/cd/cdef", b"x".to_vec())
            .await
            .unwrap();
        let shown = format!("dir {}", machine.join("data").display());
        assert!(rec.take().contains(&shown));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn an_object_replaced_is_flushed_before_it_takes_the_name() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().canonicalize().unwrap();
        let vault = root.join("v");
        let m = vault.join("agents/machines/m1");
        let rec = Arc::new(Recorder::default());
        let s = AgentStorage::with(1 << 30, 0, free_bytes, rec.clone(), local());
        s.put(&root, &vault, &m, "a", b"one".to_vec())
            .await
            .unwrap();
        rec.take();
        s.put(&root, &vault, &m, "a", b"two".to_vec())
            .await
            .unwrap();
        // The new content is flushed under a temporary name, then renamed over the old object,
        // then the rename flushed: a power loss leaves "one" or "two", never a torn file.
        let events = rec.take();
        let temporary = format!("file {}#", m.join("a").display());
        assert_eq!(events.len(), 2, "{events:?}");
        assert!(events[0].starts_with(&temporary), "{events:?}");
        assert_eq!(events[1], format!("dir {}", m.display()));
        assert_eq!(std::fs::read(m.join("a")).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(&m).unwrap().count(), 1);
    }

    #[test]
    fn free_space_counts_writes_in_flight() {
        let tmp = tempfile::tempdir().unwrap();
        let vault = tmp.path().join("v");
        let m = vault.join("agents/machines/m1");
        // 1000 bytes free, whatever is written; 100 kept.
        let s = AgentStorage::with(u64::MAX, 100, |_| Ok(1000), Arc::new(Fsync), local());
        let i = &s.inner;
        let slot = i.usage_slot(&vault);
        let first = i.reserve(&slot, &vault, &m, 0, 500).unwrap();
        // 500 are promised to the first write: 400 more would leave less than 100.
        let e = i.reserve(&slot, &vault, &m, 0, 401).err().unwrap();
        assert_eq!(e.status(), 507);
        assert_eq!(e.inner, Some("ServerStorageReserveReached"));
        assert_eq!(
            i.admit(&vault, &m.join("b"), 401).unwrap_err().status(),
            507
        );
        let second = i.reserve(&slot, &vault, &m, 0, 400).unwrap();
        drop((first, second));
        assert_eq!(*i.pending.lock().unwrap(), 0);
        i.admit(&vault, &m.join("b"), 900).unwrap();
    }

    #[tokio::test(flavor = "current_thread")]
    async fn quota_counts_replacements_and_deletions() {
        let root = tempfile::tempdir().unwrap();
        let vault = root.path().join("v");
        let m = vault.join("agents/machines/m1");
        let s = storage(100, 0);
        s.put(root.path(), &vault, &m, "a", vec![0; 60])
            .await
            .unwrap();
        // Replacing an object counts only the difference.
        s.put(root.path(), &vault, &m, "a", vec![0; 90])
            .await
            .unwrap();
        let e = s
            .put(root.path(), &vault, &m, "b", vec![0; 20])
            .await
            .unwrap_err();
        assert_eq!(e.inner, Some("UserErrorVaultStorageQuotaExceeded"));
        assert_eq!(e.status(), 403);
        assert!(!m.join("b").exists());
        assert!(s.admit(&vault, &m, "b", 20).await.is_err());
        s.delete(root.path(), &vault, &m, "a").await.unwrap();
        s.admit(&vault, &m, "b", 20).await.unwrap();
        s.put(root.path(), &vault, &m, "b", vec![0; 20])
            .await
            .unwrap();
        // A new process counts what is on disk.
        let again = storage(100, 0);
        let e = again.admit(&vault, &m, "c", 81).await.unwrap_err();
        assert_eq!(e.inner, Some("UserErrorVaultStorageQuotaExceeded"));
        again.admit(&vault, &m, "c", 80).await.unwrap();
    }

    #[tokio::test(flavor = "current_thread")]
    async fn reserve_refuses_writes_before_the_disk_is_full() {
        let root = tempfile::tempdir().unwrap();
        let vault = root.path().join("v");
        let m = vault.join("agents/machines/m1");
        let s = storage(u64::MAX, u64::MAX / 2);
        let e = s
            .put(root.path(), &vault, &m, "a", vec![0; 10])
            .await
            .unwrap_err();
        assert_eq!(e.status(), 507);
        assert_eq!(e.inner, Some("ServerStorageReserveReached"));
        assert!(!m.join("a").exists());
    }

    /// The bytes the storage counts for a vault, and those really under its `agents` folder.
    fn counted_and_real(s: &AgentStorage, vault: &Path) -> (Option<u64>, u64) {
        let counted = s.inner.usage_slot(vault).lock().unwrap().bytes;
        (counted, bytes_under(&vault.join("agents")).unwrap())
    }

    /// A request on machine `m1`'s objects.
    enum Op {
        Put(String, Vec<u8>),
        Delete(&'static str),
    }

    /// Storage with a quota, and machine `m1` of vault `v` in a data folder, on a runtime with
    /// two worker threads, so that requests really race.
    struct Race {
        rt: tokio::runtime::Runtime,
        _tmp: tempfile::TempDir,
        root: PathBuf,
        vault: PathBuf,
        m: PathBuf,
        s: Arc<AgentStorage>,
    }

    impl Race {
        fn new(quota: u64) -> Self {
            let tmp = tempfile::tempdir().unwrap();
            let root = tmp.path().to_path_buf();
            let vault = root.join("v");
            Self {
                rt: tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .build()
                    .unwrap(),
                _tmp: tmp,
                m: vault.join("agents/machines/m1"),
                root,
                vault,
                s: Arc::new(storage(quota, 0)),
            }
        }

        /// Runs `ops` all at once; answers their results in order.
        fn at_once(&self, ops: Vec<Op>) -> Vec<Result<(), KvError>> {
            self.rt.block_on(async {
                let tasks: Vec<_> = ops
                    .into_iter()
                    .map(|op| {
                        let s = self.s.clone();
                        let (root, vault, m) =
                            (self.root.clone(), self.vault.clone(), self.m.clone());
                        tokio::spawn(async move {
                            match op {
                                Op::Put(name, body) => s.put(&root, &vault, &m, &name, body).await,
                                Op::Delete(name) => s.delete(&root, &vault, &m, name).await,
                            }
                        })
                    })
                    .collect();
                let mut results = Vec::new();
                for t in tasks {
                    results.push(t.await.unwrap());
                }
                results
            })
        }

        fn counted_and_real(&self) -> (Option<u64>, u64) {
            counted_and_real(&self.s, &self.vault)
        }
    }

    #[test]
    fn concurrent_deletes_and_puts_of_one_object_keep_the_count_exact() {
        let r = Race::new(1000);
        r.at_once(vec![Op::Put("keep".into(), vec![0; 100])]);
        for _ in 0..10 {
            r.at_once(vec![Op::Put("a".into(), vec![0; 50])]);
            for done in r.at_once((0..8).map(|_| Op::Delete("a")).collect()) {
                done.unwrap();
            }
            let (counted, real) = r.counted_and_real();
            assert_eq!(counted, Some(real), "after concurrent deletes");
            let puts = (0..8u8).map(|i| Op::Put("b".into(), vec![i; 30 + usize::from(i)]));
            for done in r.at_once(puts.collect()) {
                done.unwrap();
            }
            let (counted, real) = r.counted_and_real();
            assert_eq!(counted, Some(real), "after concurrent puts");
            r.at_once(vec![Op::Delete("b")]);
        }
        // 100 bytes are stored: 901 more would pass the quota, whatever was deleted twice.
        let e = r.at_once(vec![Op::Put("c".into(), vec![0; 901])]).remove(0);
        assert_eq!(
            e.unwrap_err().inner,
            Some("UserErrorVaultStorageQuotaExceeded")
        );
    }

    #[test]
    fn concurrent_uploads_cannot_pass_the_quota() {
        let r = Race::new(100);
        let puts = (0..10).map(|i| Op::Put(format!("o{i}"), vec![0; 30]));
        let stored = r
            .at_once(puts.collect())
            .iter()
            .filter(|p| p.is_ok())
            .count();
        assert_eq!(stored, 3);
        assert_eq!(r.counted_and_real(), (Some(90), 90));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn an_object_where_a_folder_is_or_the_reverse_is_a_conflict() {
        let root = tempfile::tempdir().unwrap();
        let vault = root.path().join("v");
        let m = vault.join("agents/machines/m1");
        let s = storage(1 << 20, 0);
        s.put(root.path(), &vault, &m, "a", b"file".to_vec())
            .await
            .unwrap();
        s.put(root.path(), &vault, &m, "c/d", b"file".to_vec())
            .await
            .unwrap();
        let before = counted_and_real(&s, &vault);
        for name in ["a/b", "a/b/c", "c"] {
            let e = s
                .put(root.path(), &vault, &m, name, b"x".to_vec())
                .await
                .unwrap_err();
            assert_eq!(e.status(), 409, "{name}: {e:?}");
            assert_eq!(e.inner, Some("ObjectNameConflict"), "{name}");
            assert_eq!(counted_and_real(&s, &vault), before, "{name}");
        }
        assert_eq!(std::fs::read(m.join("a")).unwrap(), b"file");
        assert_eq!(std::fs::read(m.join("c/d")).unwrap(), b"file");
        // Nothing else was written, not even a temporary file.
        let mut names: Vec<_> = std::fs::read_dir(&m)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["a", "c"]);
        // Deleting a folder's name deletes no object (there is none).
        s.delete(root.path(), &vault, &m, "c").await.unwrap();
        assert!(m.join("c/d").exists());
        assert_eq!(counted_and_real(&s, &vault), before);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn reads_create_no_folder() {
        let root = tempfile::tempdir().unwrap();
        let m = root.path().join("v/agents/machines/m1");
        assert!(list_meta(&local(), &m, "").await.unwrap().is_empty());
        assert_eq!(
            get_object(&local(), &m, "a", None)
                .await
                .unwrap_err()
                .status(),
            404
        );
        assert_eq!(
            head_object(&local(), &m, "a").await.unwrap_err().status(),
            404
        );
        assert!(!root.path().join("v").exists());
        // Through a file, or of a folder: no such object either.
        let s = storage(1 << 20, 0);
        let vault = root.path().join("v");
        s.put(root.path(), &vault, &m, "a/b", b"x".to_vec())
            .await
            .unwrap();
        for name in ["a/b/c", "a"] {
            let e = get_object(&local(), &m, name, None).await.unwrap_err();
            assert_eq!(e.status(), 404, "{name}");
            let e = head_object(&local(), &m, name).await.unwrap_err();
            assert_eq!(e.status(), 404, "{name}");
        }
    }
}
