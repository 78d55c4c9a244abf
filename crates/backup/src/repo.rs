//! A repository: config, wrapped keys, index, snapshots, and reading blobs back.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use kagi_crypto::data_key::DataKey;
use serde::{Deserialize, Serialize};

use crate::backend::BlobBackend;
use crate::pack::{self, KIND_TREE, PackHeader};
use crate::tree::Tree;
use crate::{BackupError, Result};

/// Format version of repositories this engine writes.
pub const FORMAT_VERSION: u32 = 1;

/// `config`: public, describes the repository and proves which data key opens it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Config {
    pub version: u32,
    pub id: String,
    pub chunk_min: u32,
    pub chunk_avg: u32,
    pub chunk_max: u32,
    /// `DataKey::seal` of a fixed text: opening it proves the key is this repository's.
    pub key_check: String,
}

/// A wrapped data key as stored in `keys/{id}`: the key encryption key that wrapped it (an
/// opaque description chosen by the caller, e.g. a key vault key id) and the wrapped bytes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyEntry {
    /// Entry id.
    pub id: String,
    /// Who can unwrap it (e.g. `{"kind":"cmk","keyId":"https://…/keys/k/v"}`).
    pub kek: serde_json::Value,
    /// The wrapped data key, base64.
    pub wrapped: String,
    /// Creation time (Unix seconds).
    pub created: i64,
}

/// A recovery point.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    /// Snapshot id, hex.
    pub id: String,
    /// Time taken (Unix seconds).
    pub time: i64,
    /// What was backed up (the source folder path).
    pub source: String,
    /// Root tree id, hex.
    pub tree: String,
    /// The snapshot this one was compared with.
    #[serde(default)]
    pub parent: Option<String>,
    /// Files in it.
    pub files: u64,
    /// Bytes of file content in it.
    pub bytes: u64,
    /// When it was written (Unix nanoseconds of the writer's clock): orders recovery points
    /// taken within the same second, so retention never mistakes the newest for an older one.
    /// 0 in recovery points written before the field existed.
    #[serde(default)]
    pub written_nanos: u128,
}

#[derive(Clone, Debug)]
pub(crate) struct Location {
    pub pack: Arc<str>,
    pub kind: u8,
    pub offset: u64,
    pub len: u64,
}

/// One `index/{id}` object as read from storage.
pub(crate) struct IndexFile {
    /// Object name.
    pub name: String,
    /// Stored (sealed) size.
    pub size: u64,
    /// The packs it lists.
    pub packs: Vec<PackHeader>,
}

/// What [`Repository::check_report`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CheckReport {
    /// Damage: a recovery point that cannot be restored in full, a blob that fails
    /// authentication, an index that names a pack that is not stored. Any entry here means the
    /// check failed.
    pub problems: Vec<String>,
    /// Harmless findings that cost space but no data, such as packs no index references (left
    /// by an interrupted backup or prune; `prune` removes them). They do not fail the check.
    pub warnings: Vec<String>,
}

impl CheckReport {
    /// Whether the repository is undamaged (warnings do not count).
    pub fn is_healthy(&self) -> bool {
        self.problems.is_empty()
    }
}

/// An open repository.
pub struct Repository {
    pub(crate) backend: Arc<dyn BlobBackend>,
    pub(crate) key: Arc<DataKey>,
    pub(crate) config: Config,
    pub(crate) index: HashMap<[u8; 32], Location>,
    /// Every pack the loaded index files name, including those whose blobs all have another
    /// copy (which `index` does not show): check tells unreferenced packs apart with it.
    pub(crate) indexed_packs: HashSet<Arc<str>>,
}

const KEY_CHECK: &[u8] = b"kagi backup repository";

pub(crate) fn parse_id(hex_id: &str) -> Result<[u8; 32]> {
    let mut id = [0u8; 32];
    hex::decode_to_slice(hex_id, &mut id)
        .map_err(|_| BackupError::Corrupt(format!("bad blob id {hex_id}")))?;
    Ok(id)
}

fn json<T: Serialize>(v: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(v).map_err(|e| BackupError::Corrupt(e.to_string()))
}

impl Repository {
    /// Creates a repository in an empty location, protected by `key`.
    pub fn init(backend: Arc<dyn BlobBackend>, key: DataKey) -> Result<Self> {
        let exists = || BackupError::Invalid("a repository already exists here".into());
        if backend.exists("config")? {
            return Err(exists());
        }
        let config = Config {
            version: FORMAT_VERSION,
            id: hex::encode(kagi_crypto::random_bytes(16)?),
            chunk_min: 16 * 1024,
            chunk_avg: 64 * 1024,
            chunk_max: 1024 * 1024,
            key_check: hex::encode(key.seal(b"kagi/key-check/v1", KEY_CHECK)?),
        };
        // Conditional: of two writers creating one repository at once, one wins.
        if !backend.put_new("config", json(&config)?)? {
            return Err(exists());
        }
        Ok(Self {
            backend,
            key: Arc::new(key),
            config,
            index: HashMap::new(),
            indexed_packs: HashSet::new(),
        })
    }

    /// Opens a repository with its data key, loading the index.
    pub fn open(backend: Arc<dyn BlobBackend>, key: DataKey) -> Result<Self> {
        let config: Config = serde_json::from_slice(&backend.get("config")?)
            .map_err(|e| BackupError::Corrupt(format!("config: {e}")))?;
        if config.version != FORMAT_VERSION {
            return Err(BackupError::Invalid(format!(
                "repository format {} is not supported",
                config.version
            )));
        }
        let check = hex::decode(&config.key_check)
            .map_err(|_| BackupError::Corrupt("config key check".into()))?;
        if key.open(b"kagi/key-check/v1", &check).ok().as_deref() != Some(KEY_CHECK) {
            return Err(BackupError::Invalid(
                "this data key does not open the repository".into(),
            ));
        }
        let mut repo = Self {
            backend,
            key: Arc::new(key),
            config,
            index: HashMap::new(),
            indexed_packs: HashSet::new(),
        };
        for file in repo.read_index_files()? {
            repo.add_to_index(&file.packs)?;
        }
        Ok(repo)
    }

    /// Reads and opens every index file in storage.
    pub(crate) fn read_index_files(&self) -> Result<Vec<IndexFile>> {
        let mut out = Vec::new();
        for name in self.backend.list("index")? {
            let sealed = self.backend.get(&name)?;
            let packs: Vec<PackHeader> = pack::unpack_metadata(
                &self
                    .key
                    .open(format!("kagi/index/v1/{name}").as_bytes(), &sealed)
                    .map_err(|_| BackupError::Corrupt(format!("{name} failed authentication")))?,
                &name,
            )?;
            out.push(IndexFile {
                name,
                size: sealed.len() as u64,
                packs,
            });
        }
        Ok(out)
    }

    pub(crate) fn add_to_index(&mut self, packs: &[PackHeader]) -> Result<()> {
        for p in packs {
            let pack: Arc<str> = Arc::from(p.pack.as_str());
            self.indexed_packs.insert(pack.clone());
            for b in &p.blobs {
                self.index.insert(
                    parse_id(&b.id)?,
                    Location {
                        pack: pack.clone(),
                        kind: b.kind as u8,
                        offset: b.offset,
                        len: b.len,
                    },
                );
            }
        }
        Ok(())
    }

    /// Writes an index file for `packs` (after the packs themselves are stored); returns its
    /// stored size (0 when there is nothing to index and no file is written).
    pub(crate) fn write_index(&self, packs: &[PackHeader]) -> Result<u64> {
        if packs.is_empty() {
            return Ok(0);
        }
        let name = format!("index/{}", hex::encode(kagi_crypto::random_bytes(16)?));
        let sealed = self.key.seal(
            format!("kagi/index/v1/{name}").as_bytes(),
            &pack::pack_metadata(&packs)?,
        )?;
        let size = sealed.len() as u64;
        self.backend.put(&name, sealed)?;
        Ok(size)
    }

    /// Stores a snapshot: the last write of a backup, which makes it visible.
    pub(crate) fn write_snapshot(&self, s: &SnapshotInfo) -> Result<()> {
        let name = format!("snapshots/{}", s.id);
        let sealed = self
            .key
            .seal(format!("kagi/snapshot/v1/{}", s.id).as_bytes(), &json(s)?)?;
        self.backend.put(&name, sealed)
    }

    /// The recovery points, oldest first.
    pub fn snapshots(&self) -> Result<Vec<SnapshotInfo>> {
        let mut out = Vec::new();
        for name in self.backend.list("snapshots")? {
            let id = name.rsplit('/').next().unwrap_or("").to_string();
            let sealed = self.backend.get(&name)?;
            let s: SnapshotInfo = serde_json::from_slice(
                &self
                    .key
                    .open(format!("kagi/snapshot/v1/{id}").as_bytes(), &sealed)
                    .map_err(|_| BackupError::Corrupt(format!("{name} failed authentication")))?,
            )
            .map_err(|e| BackupError::Corrupt(format!("{name}: {e}")))?;
            if s.id != id {
                return Err(BackupError::Corrupt(format!(
                    "{name} names another snapshot"
                )));
            }
            out.push(s);
        }
        out.sort_by(|a, b| (a.time, a.written_nanos, &a.id).cmp(&(b.time, b.written_nanos, &b.id)));
        Ok(out)
    }

    /// One recovery point by id (or unique id prefix).
    pub fn snapshot(&self, id: &str) -> Result<SnapshotInfo> {
        let mut found: Vec<SnapshotInfo> = self
            .snapshots()?
            .into_iter()
            .filter(|s| s.id.starts_with(id))
            .collect();
        match found.len() {
            1 => Ok(found.remove(0)),
            0 => Err(BackupError::Invalid(format!("no recovery point {id}"))),
            _ => Err(BackupError::Invalid(format!(
                "recovery point id {id} is ambiguous"
            ))),
        }
    }

    /// Forgets a recovery point: removes its snapshot object only. The packs only it
    /// referenced stay until [`Repository::prune`] removes or repacks them.
    pub fn forget(&self, id: &str) -> Result<()> {
        let s = self.snapshot(id)?;
        self.backend.delete(&format!("snapshots/{}", s.id))
    }

    /// Whether a blob is stored.
    pub(crate) fn has(&self, id: &[u8; 32]) -> bool {
        self.index.contains_key(id)
    }

    /// Reads, authenticates and decompresses the blobs `ids`, in order. A run of them stored
    /// back to back in one pack (as a file's chunks are when it was backed up at once) is read
    /// with one request of at most `max_run` bytes: on object storage a request costs far more
    /// than its bytes.
    pub(crate) fn load_many(&self, ids: &[[u8; 32]], max_run: u64) -> Result<Vec<Vec<u8>>> {
        let locs = ids
            .iter()
            .map(|id| {
                self.index.get(id).ok_or_else(|| {
                    BackupError::Corrupt(format!(
                        "blob {} is missing from the index",
                        hex::encode(id)
                    ))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let mut out = Vec::with_capacity(ids.len());
        let mut i = 0;
        while i < locs.len() {
            let first = locs[i];
            let mut end = first.offset.saturating_add(first.len);
            let mut j = i + 1;
            while j < locs.len()
                && locs[j].pack == first.pack
                && locs[j].offset == end
                && end.saturating_add(locs[j].len) - first.offset <= max_run
            {
                end += locs[j].len;
                j += 1;
            }
            let run = self
                .backend
                .get_range(&first.pack, first.offset, end - first.offset)?;
            if run.len() as u64 != end - first.offset {
                return Err(BackupError::Corrupt(format!(
                    "pack {} is shorter than its index says",
                    first.pack
                )));
            }
            for (id, loc) in ids[i..j].iter().zip(&locs[i..j]) {
                let at = (loc.offset - first.offset) as usize;
                out.push(pack::open_blob(
                    &self.key,
                    loc.kind,
                    id,
                    &run[at..at + loc.len as usize],
                    self.config.chunk_max as usize + 1024,
                )?);
            }
            i = j;
        }
        Ok(out)
    }

    /// Reads a tree blob.
    pub(crate) fn load_tree(&self, id_hex: &str) -> Result<Tree> {
        let id = parse_id(id_hex)?;
        let loc_kind = self.index.get(&id).map(|l| l.kind);
        if loc_kind != Some(KIND_TREE) {
            return Err(BackupError::Corrupt(format!("tree {id_hex} is missing")));
        }
        let sealed = {
            let loc = &self.index[&id];
            self.backend.get_range(&loc.pack, loc.offset, loc.len)?
        };
        let plain = pack::open_blob(&self.key, KIND_TREE, &id, &sealed, 256 * 1024 * 1024)?;
        let tree: Tree = serde_json::from_slice(&plain)
            .map_err(|e| BackupError::Corrupt(format!("tree {id_hex}: {e}")))?;
        // Backups never write such a tree: one that breaks the entry rules is damaged or
        // crafted, and restore must not act on it.
        tree.check_names()
            .map_err(|e| BackupError::Corrupt(format!("tree {id_hex}: {e}")))?;
        Ok(tree)
    }

    /// Adds a wrapped data key entry (public: the wrapped key is only usable by its KEK).
    pub fn put_key_entry(backend: &dyn BlobBackend, entry: &KeyEntry) -> Result<()> {
        backend.put(&format!("keys/{}", entry.id), json(entry)?)
    }

    /// The wrapped data key entries.
    pub fn key_entries(backend: &dyn BlobBackend) -> Result<Vec<KeyEntry>> {
        let mut out = Vec::new();
        for name in backend.list("keys")? {
            out.push(
                serde_json::from_slice(&backend.get(&name)?)
                    .map_err(|e| BackupError::Corrupt(format!("{name}: {e}")))?,
            );
        }
        out.sort_by(|a: &KeyEntry, b: &KeyEntry| (a.created, &a.id).cmp(&(b.created, &b.id)));
        Ok(out)
    }

    /// Removes a wrapped data key entry (after a newer one exists).
    pub fn delete_key_entry(backend: &dyn BlobBackend, id: &str) -> Result<()> {
        backend.delete(&format!("keys/{id}"))
    }

    /// Verifies the repository: every snapshot's trees and content are indexed, and (with
    /// `read_data`) every stored blob authenticates. Returns the problems found (damage only;
    /// [`Repository::check_report`] also returns warnings).
    pub fn check(&self, read_data: bool) -> Result<Vec<String>> {
        Ok(self.check_report(read_data)?.problems)
    }

    /// Verifies the repository as [`Repository::check`] does, and also compares the index with
    /// the packs in storage: an indexed pack that is missing is a problem (its blobs are gone,
    /// and a later backup would deduplicate against them); a stored pack that no index
    /// references is a warning (an interrupted backup or prune left it; it costs space, not
    /// data, and `prune` removes it).
    pub fn check_report(&self, read_data: bool) -> Result<CheckReport> {
        let mut problems = Vec::new();
        let mut warnings = Vec::new();
        let stored: HashSet<String> = self.backend.list("data")?.into_iter().collect();
        let mut missing: Vec<&Arc<str>> = self
            .indexed_packs
            .iter()
            .filter(|p| !stored.contains(p.as_ref()))
            .collect();
        missing.sort();
        for p in missing {
            problems.push(format!(
                "pack {p} is listed in the index but missing from storage"
            ));
        }
        let mut unreferenced: Vec<&String> = stored
            .iter()
            .filter(|p| !self.indexed_packs.contains(p.as_str()))
            .collect();
        unreferenced.sort();
        for p in unreferenced {
            warnings.push(format!(
                "pack {p} is not referenced by any index (left by an interrupted backup or \
                 prune; prune removes it)"
            ));
        }
        let mut seen_trees = std::collections::HashSet::new();
        for s in self.snapshots()? {
            let mut stack = vec![s.tree.clone()];
            while let Some(t) = stack.pop() {
                if !seen_trees.insert(t.clone()) {
                    continue;
                }
                match self.load_tree(&t) {
                    Ok(tree) => {
                        for n in tree.nodes {
                            if let Some(sub) = n.subtree {
                                stack.push(sub);
                            }
                            for c in n.content {
                                if parse_id(&c).map(|id| !self.has(&id)).unwrap_or(true) {
                                    problems
                                        .push(format!("snapshot {}: chunk {c} is missing", s.id));
                                }
                            }
                        }
                    }
                    Err(e) => problems.push(format!("snapshot {}: {e}", s.id)),
                }
            }
        }
        if read_data {
            let mut ids: Vec<(&[u8; 32], &Location)> = self.index.iter().collect();
            ids.sort_by(|a, b| (&a.1.pack, a.1.offset).cmp(&(&b.1.pack, b.1.offset)));
            for (id, loc) in ids {
                let r = self
                    .backend
                    .get_range(&loc.pack, loc.offset, loc.len)
                    .and_then(|sealed| {
                        pack::open_blob(
                            &self.key,
                            loc.kind,
                            id,
                            &sealed,
                            self.config.chunk_max as usize + 1024,
                        )
                        .map(|_| ())
                    });
                if let Err(e) = r {
                    problems.push(format!("{}: {e}", loc.pack));
                }
            }
        }
        Ok(CheckReport { problems, warnings })
    }

    /// The entries of the index (for tests and statistics).
    pub fn blob_count(&self) -> usize {
        self.index.len()
    }
}
