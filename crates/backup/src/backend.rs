//! Where repository objects live: a small synchronous trait over `object_store` (local files
//! by default, S3 when scaled out).

use std::sync::Arc;
use std::time::SystemTime;

use futures::TryStreamExt;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};

use crate::local::{Fsync, LocalWrites, Syncer};
use crate::{BackupError, Result};

/// The operations the engine needs from storage. Objects are written whole and atomically.
pub trait BlobBackend: Send + Sync {
    /// Stores an object (replacing any with that name).
    fn put(&self, name: &str, data: Vec<u8>) -> Result<()>;
    /// Reads a whole object.
    fn get(&self, name: &str) -> Result<Vec<u8>>;
    /// Reads part of an object.
    fn get_range(&self, name: &str, start: u64, len: u64) -> Result<Vec<u8>>;
    /// Names of the objects under a prefix.
    fn list(&self, prefix: &str) -> Result<Vec<String>>;
    /// Removes an object.
    fn delete(&self, name: &str) -> Result<()>;
    /// Stores an object only if none of that name exists: `Ok(false)` when one does. Where
    /// two writers could race (two nodes creating one repository in a shared bucket), the
    /// store itself decides with a conditional write; the default looks first, which is
    /// enough for a single writer.
    fn put_new(&self, name: &str, data: Vec<u8>) -> Result<bool> {
        if self.exists(name)? {
            return Ok(false);
        }
        self.put(name, data).map(|()| true)
    }
    /// Whether an object of exactly this name exists. (Listing a prefix does not answer that:
    /// object stores list the objects *under* a prefix, never one named like it.) The default
    /// lists the object's folder.
    fn exists(&self, name: &str) -> Result<bool> {
        let folder = name.rsplit_once('/').map_or("", |(f, _)| f);
        Ok(self.list(folder)?.iter().any(|n| n == name))
    }
    /// Names of the objects under a prefix with their size and modification time, when the
    /// store knows them. Prune uses the times to leave alone packs that a backup may still be
    /// writing, and the sizes to account for the space it frees. The default knows neither
    /// (prune then treats unindexed packs as too recent to delete), so implementations over
    /// real stores should override it.
    fn list_meta(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        Ok(self
            .list(prefix)?
            .into_iter()
            .map(|name| ObjectInfo {
                name,
                size: None,
                modified: None,
            })
            .collect())
    }
}

/// An object as [`BlobBackend::list_meta`] lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectInfo {
    /// Object name.
    pub name: String,
    /// Size in bytes, when known.
    pub size: Option<u64>,
    /// Last modification time (the store's clock), when known.
    pub modified: Option<SystemTime>,
}

/// [`BlobBackend`] over any `object_store` implementation. Calls block the current thread on
/// the given runtime handle, so the engine runs on blocking threads.
pub struct ObjectStoreBackend {
    store: Arc<dyn ObjectStore>,
    runtime: tokio::runtime::Handle,
    /// Set on a local folder: writes and deletes go through it, durably (see `local.rs`).
    local: Option<(LocalWrites, LocalFileSystem)>,
}

impl ObjectStoreBackend {
    /// A backend over `store`, driven by `runtime`.
    pub fn new(store: Arc<dyn ObjectStore>, runtime: tokio::runtime::Handle) -> Self {
        Self {
            store,
            runtime,
            local: None,
        }
    }

    /// A backend on a local folder (created if needed). Every `put` and `delete` is durable
    /// (flushed to stable storage, directory entries included) when it returns.
    pub fn local(dir: &std::path::Path, runtime: tokio::runtime::Handle) -> Result<Self> {
        Self::local_with(dir, runtime, Arc::new(Fsync))
    }

    /// [`ObjectStoreBackend::local`] with the given way to flush (tests observe it).
    pub(crate) fn local_with(
        dir: &std::path::Path,
        runtime: tokio::runtime::Handle,
        syncer: Arc<dyn Syncer>,
    ) -> Result<Self> {
        let writes = LocalWrites::new(dir, syncer)?;
        let fs = LocalFileSystem::new_with_prefix(writes.root()).map_err(storage)?;
        Ok(Self {
            store: Arc::new(fs.clone()),
            runtime,
            local: Some((writes, fs)),
        })
    }
}

fn storage(e: object_store::Error) -> BackupError {
    BackupError::Storage(e.to_string())
}

impl BlobBackend for ObjectStoreBackend {
    fn put(&self, name: &str, data: Vec<u8>) -> Result<()> {
        let path = ObjectPath::from(name);
        if let Some((writes, fs)) = &self.local {
            return writes.put(&fs.path_to_filesystem(&path).map_err(storage)?, &data);
        }
        self.runtime
            .block_on(self.store.put(&path, PutPayload::from(data)))
            .map(|_| ())
            .map_err(storage)
    }

    fn get(&self, name: &str) -> Result<Vec<u8>> {
        let path = ObjectPath::from(name);
        self.runtime.block_on(async {
            let r = self.store.get(&path).await.map_err(storage)?;
            Ok(r.bytes().await.map_err(storage)?.to_vec())
        })
    }

    fn get_range(&self, name: &str, start: u64, len: u64) -> Result<Vec<u8>> {
        let path = ObjectPath::from(name);
        self.runtime
            .block_on(self.store.get_range(&path, start..start + len))
            .map(|b| b.to_vec())
            .map_err(storage)
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>> {
        let p = ObjectPath::from(prefix);
        self.runtime.block_on(async {
            let metas: Vec<_> = self
                .store
                .list(Some(&p))
                .try_collect()
                .await
                .map_err(storage)?;
            Ok(metas.into_iter().map(|m| m.location.to_string()).collect())
        })
    }

    fn exists(&self, name: &str) -> Result<bool> {
        let path = ObjectPath::from(name);
        match self.runtime.block_on(self.store.head(&path)) {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(storage(e)),
        }
    }

    fn list_meta(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        let p = ObjectPath::from(prefix);
        self.runtime.block_on(async {
            let metas: Vec<_> = self
                .store
                .list(Some(&p))
                .try_collect()
                .await
                .map_err(storage)?;
            Ok(metas
                .into_iter()
                .map(|m| ObjectInfo {
                    name: m.location.to_string(),
                    size: Some(m.size),
                    modified: Some(SystemTime::from(m.last_modified)),
                })
                .collect())
        })
    }

    fn put_new(&self, name: &str, data: Vec<u8>) -> Result<bool> {
        if self.local.is_some() {
            // One kagi process owns a data directory: looking first is enough.
            if self.exists(name)? {
                return Ok(false);
            }
            return self.put(name, data).map(|()| true);
        }
        let create = PutOptions {
            mode: PutMode::Create,
            ..PutOptions::default()
        };
        match self.runtime.block_on(self.store.put_opts(
            &ObjectPath::from(name),
            PutPayload::from(data),
            create,
        )) {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. })
            | Err(object_store::Error::Precondition { .. }) => Ok(false),
            Err(e) => Err(storage(e)),
        }
    }

    fn delete(&self, name: &str) -> Result<()> {
        let path = ObjectPath::from(name);
        if let Some((writes, fs)) = &self.local {
            return writes.delete(&fs.path_to_filesystem(&path).map_err(storage)?);
        }
        match self.runtime.block_on(self.store.delete(&path)) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(storage(e)),
        }
    }
}
