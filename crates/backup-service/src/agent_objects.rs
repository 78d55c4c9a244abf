//! Backup agents' objects on the server's disk, under `{vault dir}/agents/machines/{machine}/`
//! (docs/AGENT.md).
//!
//! - Acknowledged means durable: an object's file, its rename into place and every folder
//!   created for it are fsynced (each new folder into its parent) before the answer.
//! - A vault's objects are bounded by a quota (`KAGI_AGENT_VAULT_QUOTA_BYTES`, default 1 TiB),
//!   counted once per process by walking the vault's `agents` folder, then kept up to date.
//! - No object is written while the disk would keep less free space than a reserve
//!   (`KAGI_AGENT_DISK_RESERVE_BYTES`, default 1 GiB): the audit log and the store share the
//!   disk, and without room for the audit log every request fails.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock, Mutex};

use futures::TryStreamExt;
use kagi_core::{ErrorCode, KvError};
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

use crate::state::io;

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

/// The agents' storage limits and the bytes each vault uses.
#[derive(Debug)]
pub(crate) struct AgentStorage {
    quota: u64,
    reserve: u64,
    /// By the vault's `agents` folder.
    usage: Mutex<HashMap<PathBuf, Arc<Mutex<Usage>>>>,
}

fn env_bytes(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

/// Folders known to be durable in their parents, with the inode seen when their parent was
/// fsynced. Every folder of the agents' tree is created here, under this lock, so a folder
/// found here was fsynced into its parent by whoever created it.
static DURABLE_DIRS: LazyLock<Mutex<HashMap<PathBuf, u64>>> = LazyLock::new(Default::default);

#[cfg(test)]
thread_local! {
    /// The folders fsynced by this thread (tests check which).
    static SYNCED: std::cell::RefCell<Vec<PathBuf>> = const { std::cell::RefCell::new(Vec::new()) };
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()?;
    #[cfg(test)]
    SYNCED.with(|s| s.borrow_mut().push(dir.to_path_buf()));
    Ok(())
}

/// Creates `dir` and every missing folder between `root` (which exists) and it; each folder is
/// fsynced into its parent before this returns, so an object acknowledged inside it survives a
/// power loss with its path.
pub(crate) fn ensure_dir(root: &Path, dir: &Path) -> std::io::Result<()> {
    let rel = dir
        .strip_prefix(root)
        .map_err(|_| std::io::Error::other("the folder is outside the data folder"))?;
    let mut known = DURABLE_DIRS.lock().unwrap_or_else(|p| p.into_inner());
    let mut current = root.to_path_buf();
    for part in rel.components() {
        let parent = current.clone();
        current.push(part);
        let seen = match std::fs::symlink_metadata(&current) {
            Ok(m) if m.is_dir() => Some(m.ino()),
            Ok(_) => return Err(std::io::Error::other("a file is in the place of a folder")),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        if seen.is_some() && known.get(&current) == seen.as_ref() {
            continue;
        }
        if seen.is_none() {
            match std::fs::create_dir(&current) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e),
            }
        }
        // Also for a folder found but not known: whoever made it may not have synced it.
        sync_dir(&parent)?;
        known.insert(current.clone(), std::fs::symlink_metadata(&current)?.ino());
    }
    Ok(())
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

fn size_of(file: &Path) -> u64 {
    std::fs::symlink_metadata(file).map_or(0, |m| m.len())
}

fn object_missing(name: &str) -> KvError {
    KvError::new(
        ErrorCode::NotFound,
        format!("No object '{}'.", kagi_core::ids::printable(name)),
    )
    .with_inner("ObjectNotFound")
}

/// The object store of a machine's folder (created, durably, if missing).
fn store_of(root: &Path, dir: &Path) -> Result<LocalFileSystem, KvError> {
    ensure_dir(root, dir).map_err(|e| io("mkdir agent objects", e))?;
    LocalFileSystem::new_with_prefix(dir).map_err(|e| io("agent objects", e))
}

/// Objects under a prefix with their size and modification time (Unix seconds), by name.
pub(crate) async fn list_meta(
    root: &Path,
    dir: &Path,
    prefix: &str,
) -> Result<Vec<(String, u64, i64)>, KvError> {
    let store = store_of(root, dir)?;
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
    root: &Path,
    dir: &Path,
    name: &str,
    range: Option<(u64, u64)>,
) -> Result<Vec<u8>, KvError> {
    let store = store_of(root, dir)?;
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
pub(crate) async fn head_object(root: &Path, dir: &Path, name: &str) -> Result<(), KvError> {
    match store_of(root, dir)?.head(&ObjectPath::from(name)).await {
        Ok(_) => Ok(()),
        Err(object_store::Error::NotFound { .. }) => Err(object_missing(name)),
        Err(e) => Err(io("stat agent object", e)),
    }
}

/// Stores an object durably: the file, its rename into place and any new folder on its path
/// are fsynced before this returns.
async fn write_object(root: &Path, dir: &Path, name: &str, body: Vec<u8>) -> Result<(), KvError> {
    let file = dir.join(name);
    let parent = file.parent().unwrap_or(dir);
    // The object's folders are made (durably) here, not by the store's own `create_dir_all`.
    ensure_dir(root, parent).map_err(|e| io("mkdir agent objects", e))?;
    let store = LocalFileSystem::new_with_prefix(dir).map_err(|e| io("agent objects", e))?;
    // LocalFileSystem writes to a temporary file and renames it into place: a reader never
    // sees half an object.
    store
        .put(&ObjectPath::from(name), PutPayload::from(body))
        .await
        .map_err(|e| io("write agent object", e))?;
    std::fs::File::open(&file)
        .and_then(|f| f.sync_all())
        .map_err(|e| io("sync agent object", e))?;
    sync_dir(parent).map_err(|e| io("sync agent folder", e))
}

impl AgentStorage {
    /// Limits from the environment (`KAGI_AGENT_VAULT_QUOTA_BYTES`,
    /// `KAGI_AGENT_DISK_RESERVE_BYTES`).
    pub(crate) fn from_env() -> Self {
        Self {
            quota: env_bytes("KAGI_AGENT_VAULT_QUOTA_BYTES", DEFAULT_QUOTA_BYTES),
            reserve: env_bytes("KAGI_AGENT_DISK_RESERVE_BYTES", DEFAULT_RESERVE_BYTES),
            usage: Mutex::new(HashMap::new()),
        }
    }

    fn usage_slot(&self, vault_dir: &Path) -> Arc<Mutex<Usage>> {
        self.usage
            .lock()
            .unwrap_or_else(|p| p.into_inner())
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
    /// exceed its quota (403) or the disk would keep less than the reserve (507).
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

    /// Checks, before its body is read, that an object of `len` bytes could be stored at
    /// `name` in the machine folder `dir` of the vault at `vault_dir`.
    pub(crate) fn admit(
        &self,
        vault_dir: &Path,
        dir: &Path,
        name: &str,
        len: u64,
    ) -> Result<(), KvError> {
        let slot = self.usage_slot(vault_dir);
        let mut usage = slot.lock().unwrap_or_else(|p| p.into_inner());
        let used = Self::bytes_used(&mut usage, vault_dir)?;
        let free = free_bytes(dir).map_err(|e| io("free space", e))?;
        self.check(used, size_of(&dir.join(name)), len, free)
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
        let len = body.len() as u64;
        let old = size_of(&dir.join(name));
        let slot = self.usage_slot(vault_dir);
        {
            // Checked and reserved at once, so concurrent writes cannot pass the quota together.
            let mut usage = slot.lock().unwrap_or_else(|p| p.into_inner());
            let used = Self::bytes_used(&mut usage, vault_dir)?;
            let free = free_bytes(dir).map_err(|e| io("free space", e))?;
            self.check(used, old, len, free)?;
            usage.bytes = Some(used.saturating_add(len));
        }
        let result = write_object(root, dir, name, body).await;
        let mut usage = slot.lock().unwrap_or_else(|p| p.into_inner());
        let release = if result.is_ok() { old } else { len };
        usage.bytes = usage.bytes.map(|b| b.saturating_sub(release));
        result
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
        let file = dir.join(name);
        let old = size_of(&file);
        match store_of(root, dir)?.delete(&ObjectPath::from(name)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(io("delete agent object", e)),
        }
        if let Some(parent) = file.parent().filter(|p| p.exists()) {
            sync_dir(parent).map_err(|e| io("sync agent folder", e))?;
        }
        let slot = self.usage_slot(vault_dir);
        let mut usage = slot.lock().unwrap_or_else(|p| p.into_inner());
        usage.bytes = usage.bytes.map(|b| b.saturating_sub(old));
        Ok(())
    }

    /// Forgets what a vault uses (a machine's folder was removed): counted again when needed.
    pub(crate) fn forget(&self, vault_dir: &Path) {
        self.usage
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&vault_dir.join("agents"));
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn storage(quota: u64, reserve: u64) -> AgentStorage {
        AgentStorage {
            quota,
            reserve,
            usage: Mutex::new(HashMap::new()),
        }
    }

    /// Stores an object; answers the folders this thread fsynced meanwhile.
    async fn put_synced(root: &Path, vault: &Path, machine: &Path, name: &str) -> Vec<PathBuf> {
        SYNCED.with(|s| s.borrow_mut().clear());
        storage(1 << 30, 0)
            .put(root, vault, machine, name, b"x".to_vec())
            .await
            .unwrap();
        SYNCED.with(|s| s.borrow().clone())
    }

    #[tokio::test(flavor = "current_thread")]
    async fn new_folders_are_synced_into_their_parents() {
        let root = tempfile::tempdir().unwrap();
        let vault = root.path().join("backup/s/g/v");
        let machine = vault.join("agents/machines/m1");
        let synced = put_synced(root.path(), &vault, &machine, "data/ab/abcd").await;
        // Every folder made for the object is durable in its parent, and the object's rename in
        // its folder.
        let mut made = vec![machine.join("data/ab")];
        let mut d = machine.join("data/ab");
        while d != root.path() {
            d = d.parent().unwrap().to_path_buf();
            made.push(d.clone());
        }
        for dir in made {
            assert!(
                synced.contains(&dir),
                "{} not synced: {synced:?}",
                dir.display()
            );
        }
        assert_eq!(std::fs::read(machine.join("data/ab/abcd")).unwrap(), b"x");

        // A folder made by someone else, not yet known durable, is synced into its parent too.
        std::fs::create_dir(machine.join("data/cd")).unwrap();
        let synced = put_synced(root.path(), &vault, &machine, "data/cd/cdef").await;
        assert!(synced.contains(&machine.join("data")), "{synced:?}");
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
        assert!(s.admit(&vault, &m, "b", 20).is_err());
        s.delete(root.path(), &vault, &m, "a").await.unwrap();
        s.admit(&vault, &m, "b", 20).unwrap();
        s.put(root.path(), &vault, &m, "b", vec![0; 20])
            .await
            .unwrap();
        // A new process counts what is on disk.
        let again = storage(100, 0);
        let e = again.admit(&vault, &m, "c", 81).unwrap_err();
        assert_eq!(e.inner, Some("UserErrorVaultStorageQuotaExceeded"));
        again.admit(&vault, &m, "c", 80).unwrap();
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
}
