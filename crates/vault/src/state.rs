//! The in-memory view of vaults and keys.

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};

use kagi_core::key::KeyVersionInfo;
use kagi_core::{KeyVersion, KvError, ObjectName, VaultName};
use kagi_crypto::{KeyProvider, PrivateKeyOps, RootKey, SealPurpose, StoredPrivateKey};
use kagi_store::{KeyRecord, KeyVersionRecord, ObjectRecord, SecretVersionRecord, VaultRecord};

/// One vault: its record, its keys, and the lock that serialises its writes.
#[derive(Debug)]
pub(crate) struct VaultState {
    record: RwLock<VaultRecord>,
    /// Keys by lower-case name; see `crate::keys`.
    pub(crate) keys: RwLock<ObjectMap<VersionEntry>>,
    /// Secrets by lower-case name (values sealed); see `crate::secrets`.
    pub(crate) secrets: RwLock<SecretMap>,
    /// Held across "commit to store, then apply to memory" so writes to one vault are ordered.
    pub(crate) write: tokio::sync::Mutex<()>,
    /// Set while a whole-vault restore writes into this vault (and kept when its roll-back is
    /// left to the next start): the vault then serves no one but the restore.
    restoring: std::sync::atomic::AtomicBool,
}

/// A versioned object (key, secret) and its versions, as memory holds it (material sealed).
#[derive(Debug)]
pub(crate) struct Entry<V> {
    pub(crate) name: ObjectName,
    pub(crate) deleted_at: Option<i64>,
    pub(crate) purge_at: Option<i64>,
    /// In creation order; the last is the current version.
    pub(crate) versions: Vec<Arc<V>>,
}

// Not derived: a copy shares the versions, so `V` need not be `Clone`.
impl<V> Clone for Entry<V> {
    fn clone(&self) -> Self {
        Self {
            name: self.name.clone(),
            deleted_at: self.deleted_at,
            purge_at: self.purge_at,
            versions: self.versions.clone(),
        }
    }
}

/// The id and order of a version.
pub(crate) trait Versioned {
    /// The version id.
    fn version(&self) -> &KeyVersion;
    /// Order of creation (the highest is the current version).
    fn seq(&self) -> i64;
}

macro_rules! versioned {
    ($t:ty) => {
        impl Versioned for $t {
            fn version(&self) -> &KeyVersion {
                &self.version
            }
            fn seq(&self) -> i64 {
                self.seq
            }
        }
    };
}
versioned!(VersionEntry);
versioned!(SecretVersionRecord);

impl<V> Entry<V> {
    /// The entry of a stored object.
    pub(crate) fn from_record<R: Into<V>>(r: ObjectRecord<R>) -> Self {
        Self {
            name: r.name,
            deleted_at: r.deleted_at,
            purge_at: r.purge_at,
            versions: r.versions.into_iter().map(|v| Arc::new(v.into())).collect(),
        }
    }

    pub(crate) fn latest(&self) -> Option<&Arc<V>> {
        self.versions.last()
    }
}

impl<V: Versioned> Entry<V> {
    pub(crate) fn version(&self, v: &KeyVersion) -> Option<&Arc<V>> {
        self.versions.iter().find(|e| e.version() == v)
    }
}

/// The objects of one kind in one vault, by lower-case name.
pub(crate) type ObjectMap<V> = BTreeMap<String, Entry<V>>;

/// A secret and its versions (values sealed).
pub(crate) type SecretEntry = Entry<SecretVersionRecord>;

/// The in-memory secrets of one vault.
pub(crate) type SecretMap = ObjectMap<SecretVersionRecord>;

/// A key and its versions.
pub(crate) type KeyEntry = Entry<VersionEntry>;

/// A key version: public info, its sealed private key (a PKCS#8 document, or where an HSM
/// keeps it), and the opened key once first used.
#[derive(Debug)]
pub(crate) struct VersionEntry {
    pub(crate) version: KeyVersion,
    pub(crate) seq: i64,
    pub(crate) info: KeyVersionInfo,
    pub(crate) sealed_private: Vec<u8>,
    material: OnceLock<Arc<dyn PrivateKeyOps>>,
}

/// The AAD that binds a sealed private key to its place: a sealed blob copied to another
/// vault, key or version does not open.
pub(crate) fn private_key_aad(
    vault: &VaultName,
    name: &ObjectName,
    version: &KeyVersion,
) -> Vec<u8> {
    format!("kagi/v1/key/{}/{}/{}", vault, name.folded(), version).into_bytes()
}

/// What a key version keeps of its private key, unsealed from its `sealed_private`.
pub(crate) fn unseal_stored_key(
    root: &dyn RootKey,
    vault: &VaultName,
    name: &ObjectName,
    version: &KeyVersion,
    sealed: &[u8],
) -> Result<StoredPrivateKey, KvError> {
    let bytes = root
        .open(
            SealPurpose::PrivateKey,
            &private_key_aad(vault, name, version),
            sealed,
        )
        .map_err(|e| crate::internal("unseal private key", e))?;
    StoredPrivateKey::decode(&bytes).map_err(|e| crate::internal("stored private key", e))
}

impl VersionEntry {
    pub(crate) fn new(r: KeyVersionRecord) -> Self {
        Self {
            version: r.version,
            seq: r.seq,
            info: r.info,
            sealed_private: r.sealed_private,
            material: OnceLock::new(),
        }
    }

    pub(crate) fn with_material(r: KeyVersionRecord, key: Arc<dyn PrivateKeyOps>) -> Self {
        let e = Self::new(r);
        let _ = e.material.set(key);
        e
    }

    /// A copy with new public info; the unsealed key carries over.
    pub(crate) fn with_info(&self, info: KeyVersionInfo) -> Self {
        let e = Self {
            version: self.version.clone(),
            seq: self.seq,
            info,
            sealed_private: self.sealed_private.clone(),
            material: OnceLock::new(),
        };
        if let Some(k) = self.material.get() {
            let _ = e.material.set(k.clone());
        }
        e
    }

    /// What the version keeps of its private key, unsealed.
    pub(crate) fn stored_key(
        &self,
        root: &dyn RootKey,
        vault: &VaultName,
        name: &ObjectName,
    ) -> Result<StoredPrivateKey, KvError> {
        unseal_stored_key(root, vault, name, &self.version, &self.sealed_private)
    }

    /// The private key, opened on first use (unsealed, or found in the HSM) and kept for the
    /// life of the process.
    pub(crate) fn private_key(
        &self,
        root: &dyn RootKey,
        hsm: Option<&dyn KeyProvider>,
        vault: &VaultName,
        name: &ObjectName,
    ) -> Result<Arc<dyn PrivateKeyOps>, KvError> {
        if let Some(k) = self.material.get() {
            return Ok(k.clone());
        }
        let stored = self.stored_key(root, vault, name)?;
        let key = kagi_crypto::open_stored_key(&stored, hsm).map_err(crate::hsm_error)?;
        Ok(self.material.get_or_init(|| key).clone())
    }
}

impl From<KeyVersionRecord> for VersionEntry {
    fn from(r: KeyVersionRecord) -> Self {
        Self::new(r)
    }
}

impl VaultState {
    pub(crate) fn new(record: VaultRecord, keys: Vec<KeyRecord>) -> Self {
        Self {
            record: RwLock::new(record),
            keys: RwLock::new(
                keys.into_iter()
                    .map(|k| (k.name.folded(), KeyEntry::from_record(k)))
                    .collect(),
            ),
            secrets: RwLock::new(BTreeMap::new()),
            write: tokio::sync::Mutex::new(()),
            restoring: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Whether a restore is writing into this vault (see `crate::vault_backup`).
    pub(crate) fn is_restoring(&self) -> bool {
        self.restoring.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Marks (or clears) this vault as being restored into.
    pub(crate) fn set_restoring(&self, on: bool) {
        self.restoring
            .store(on, std::sync::atomic::Ordering::Release);
    }

    /// A snapshot of the vault record.
    pub(crate) fn record(&self) -> VaultRecord {
        self.record
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub(crate) fn set_record(&self, r: VaultRecord) {
        *self.record.write().unwrap_or_else(|p| p.into_inner()) = r;
    }

    pub(crate) fn keys(&self) -> RwLockReadGuard<'_, ObjectMap<VersionEntry>> {
        read(&self.keys)
    }

    pub(crate) fn keys_mut(&self) -> RwLockWriteGuard<'_, ObjectMap<VersionEntry>> {
        write(&self.keys)
    }

    /// A copy of one key's entry (versions shared).
    pub(crate) fn key(&self, name: &ObjectName) -> Option<KeyEntry> {
        self.keys().get(&name.folded()).cloned()
    }
}

/// Reads a map of objects (a poisoned lock still holds consistent data: every change is one
/// insert or remove).
pub(crate) fn read<V>(map: &RwLock<ObjectMap<V>>) -> RwLockReadGuard<'_, ObjectMap<V>> {
    map.read().unwrap_or_else(|p| p.into_inner())
}

/// Writes a map of objects.
pub(crate) fn write<V>(map: &RwLock<ObjectMap<V>>) -> RwLockWriteGuard<'_, ObjectMap<V>> {
    map.write().unwrap_or_else(|p| p.into_inner())
}
