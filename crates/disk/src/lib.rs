//! kagi's encrypted block store for managed disks.
//!
//! A **disk family** is a disk, its snapshots and the disks created from those snapshots: they
//! share blocks and one AES-256 data key (DEK), which the caller (the disk service) unwraps and
//! hands over as [`FamilyKeys`] when it opens the family. The store never writes a key; a key
//! check sealed in the family header refuses a wrong key ([`DiskError::WrongKey`]).
//!
//! - Every 4 KiB block is sealed with AES-256-GCM (aws-lc) under the DEK, with its family's
//!   random id and its block address as associated data, and a nonce made of its position in
//!   the log (segment number, byte offset), which is never reused: a block moved to another
//!   address, place or family fails to read ([`DiskError::Corrupt`]).
//! - Double encryption (DK-9, chosen at creation): the block is first sealed with
//!   ChaCha20-Poly1305 under a second, platform-held key.
//! - Writes append records to the family's current segment file; an in-memory index maps
//!   (volume, block) to (segment, offset), is checkpointed (sealed too), and the log after the
//!   checkpoint is replayed at open, a torn tail cut off. Unwritten, trimmed and zeroed blocks
//!   are holes: not stored, and reported by [`Volume::extents`].
//! - Snapshots share the volume's index chunks copy-on-write: they cost only the blocks
//!   written after them ([`Family::stats`] measures it). [`Family::gc`] compacts segments.
//! - [`Family::lock`] drops the keys: every I/O then fails with [`DiskError::Locked`] until
//!   [`Family::unlock`].
//! - `write(.., fua = true)` and `flush()` return only when durable; a flush covers every
//!   handle and thread of the family.
//!
//! The on-disk format, nonces and crash guarantees are in `docs/DISK_FORMAT.md`.

#![forbid(unsafe_code)]

mod copy;
mod crypto;
mod error;
mod family;
mod format;
mod index;
mod segment;
mod ship;
mod volume;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard, Weak};

pub use copy::{copy_volume, import_volume};
pub use crypto::FamilyKeys;
pub use error::{DiskError, Result};
pub use family::{FamilyStats, GcReport, VolumeStats};
pub use format::BLOCK_SIZE;
pub use ship::{LogObject, LogShip, ShipFactory};
pub use volume::{Extent, ExtentKind, Volume};

use family::Inner;

// A poisoned lock means a thread panicked while holding it; the data it guards is still
// consistent at every await-free step, so carry on rather than cascade the panic.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
pub(crate) fn read<T>(m: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(|e| e.into_inner())
}
pub(crate) fn write<T>(m: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(|e| e.into_inner())
}

/// The store: a root directory with one subdirectory per disk family.
pub struct DiskStore {
    root: PathBuf,
    /// Families open in this process: a second open returns the same one (two logs writing
    /// one family would corrupt it; another process is kept out by a lock file).
    open: Mutex<HashMap<String, Weak<Inner>>>,
    /// Shared storage each family's log is copied to (`ship`), if any.
    ship: Option<ShipFactory>,
}

/// A disk, its snapshot or a disk made from one of its snapshots, as listed by
/// [`Family::volumes`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeInfo {
    /// The volume's id.
    pub id: String,
    /// Whether it is a snapshot.
    pub read_only: bool,
    /// Size in bytes.
    pub size: u64,
}

impl DiskStore {
    /// Opens (creating it if needed) the store at `root`, and removes what an interrupted
    /// family creation or deletion left.
    pub fn open(root: impl AsRef<Path>) -> Result<DiskStore> {
        let root = root.as_ref().to_path_buf();
        std::fs::create_dir_all(&root)?;
        for e in std::fs::read_dir(&root)? {
            let e = e?;
            let name = e.file_name();
            let name = name.to_string_lossy();
            if name.starts_with('.') && (name.ends_with(".creating") || name.ends_with(".deleting"))
            {
                std::fs::remove_dir_all(e.path())?;
            }
        }
        Ok(DiskStore {
            root,
            open: Mutex::new(HashMap::new()),
            ship: None,
        })
    }

    /// Like [`DiskStore::open`], with every family's log copied to shared storage as it
    /// becomes durable ([`LogShip`], made by `factory` per family): a family created here can
    /// be opened by another process after [`DiskStore::fetch_family`]
    /// (docs/DISK_FORMAT.md, "Shipping").
    pub fn open_shipped(root: impl AsRef<Path>, factory: ShipFactory) -> Result<DiskStore> {
        Ok(DiskStore {
            ship: Some(factory),
            ..DiskStore::open(root)?
        })
    }

    /// Whether its families' logs are shipped to shared storage ([`DiskStore::open_shipped`]).
    pub fn is_shipped(&self) -> bool {
        self.ship.is_some()
    }

    fn ship_of(&self, id: &str) -> Option<Arc<dyn LogShip>> {
        self.ship.as_ref().map(|f| f(id))
    }

    /// Replaces this store's copy of family `id` (if any) with the one in shared storage: its
    /// header, newest checkpoint and every shipped segment. For a process taking a family
    /// over from another that is gone; refused while the family is open here (`Busy`),
    /// `NotFound` without shared storage or when it holds no such family.
    pub fn fetch_family(&self, id: &str) -> Result<()> {
        format::check_name(id)?;
        // Not held during the download (other families open meanwhile); checked again before
        // the copy is replaced. An open of this family meanwhile finds its copy stale (the
        // takeover's number is created first) and fails.
        if lock(&self.open).get(id).and_then(Weak::upgrade).is_some() {
            return Err(DiskError::Busy);
        }
        let ship = self
            .ship_of(id)
            .ok_or_else(|| DiskError::NotFound(format!("disk family {id} in shared storage")))?;
        // Nothing is fenced unless the family can be fetched: a family made before its log
        // was shipped (no header or checkpoint there yet) stays its home's.
        let whole = |listing: &[(LogObject, u64)]| {
            let x = ship::checkpoints(listing).max();
            x.filter(|_| listing.iter().any(|(o, _)| *o == LogObject::Header))
                .ok_or_else(|| DiskError::NotFound(format!("disk family {id} in shared storage")))
        };
        let before = ship.list()?;
        whole(&before)?;
        // The takeover's number first: from now on the copy of any earlier process is stale
        // (it refuses to open), and a second process taking over at once fails here.
        let epoch = ship::epoch(&before) + 1;
        match ship.put_new(LogObject::Takeover(epoch), &[]) {
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(DiskError::Busy);
            }
            r => r?,
        }
        let listing = fence(ship.as_ref())?;
        let x = whole(&listing)?;
        let tmp = self.root.join(format!(".{id}.creating"));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(tmp.join("segments"))?;
        let put = |path: &Path, bytes: &[u8]| kagi_fs::write_atomically(path, bytes, 0o600);
        put(&tmp.join("family"), &ship.get(LogObject::Header)?)?;
        put(
            &tmp.join("checkpoint"),
            &ship.get(LogObject::Checkpoint(x))?,
        )?;
        for (no, shipped) in ship::shipped_segments(&listing) {
            if shipped.end == 0 {
                continue; // only claimed (a fence): never written
            }
            let mut bytes = Vec::with_capacity(usize::try_from(shipped.end).unwrap_or(0));
            for start in &shipped.starts {
                let piece = ship.get(LogObject::Piece {
                    segment: no,
                    start: *start,
                })?;
                if bytes.len() as u64 != *start {
                    return Err(DiskError::CorruptMeta {
                        file: "shared storage",
                        reason: format!(
                            "segment {no}: a piece does not start where the last ended"
                        ),
                    });
                }
                bytes.extend_from_slice(&piece);
            }
            put(&segment::segment_path(&tmp.join("segments"), no), &bytes)?;
        }
        kagi_fs::sync_dir(&tmp.join("segments"))?;
        put(&tmp.join(family::EPOCH_FILE), epoch.to_string().as_bytes())?;
        let open = lock(&self.open);
        if open.get(id).and_then(Weak::upgrade).is_some() {
            return Err(DiskError::Busy);
        }
        // The stale copy goes first (renamed, so a crash never leaves half of either).
        let dir = self.root.join(id);
        if dir.exists() {
            let _lock = family::lock_family_dir(&dir)?;
            let doomed = self.root.join(format!(".{id}.deleting"));
            std::fs::rename(&dir, &doomed)?;
            std::fs::remove_dir_all(&doomed)?;
        }
        std::fs::rename(&tmp, &dir)?;
        kagi_fs::sync_dir(&self.root)?;
        drop(open);
        Ok(())
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Creates a family. `inner` enables double encryption, and then `keys.inner_key` is
    /// required (and otherwise refused).
    pub fn create_family(&self, id: &str, keys: FamilyKeys, inner: bool) -> Result<Family> {
        let mut open = lock(&self.open);
        if open.get(id).and_then(Weak::upgrade).is_some() {
            return Err(DiskError::AlreadyExists(format!("disk family {id}")));
        }
        let fam = Inner::create(&self.root, id, keys, inner, self.ship_of(id))?;
        open.insert(id.to_string(), Arc::downgrade(&fam));
        Ok(Family { inner: fam })
    }

    /// Opens a family with its keys (replaying its log after a crash). If it is open already
    /// in this process, the keys are checked (and unlock it if it was locked) and the same
    /// family is returned.
    pub fn open_family(&self, id: &str, keys: FamilyKeys) -> Result<Family> {
        let mut open = lock(&self.open);
        if let Some(fam) = open.get(id).and_then(Weak::upgrade) {
            fam.unlock_keys(keys)?;
            return Ok(Family { inner: fam });
        }
        let fam = Inner::open(&self.root, id, keys, self.ship_of(id))?;
        open.insert(id.to_string(), Arc::downgrade(&fam));
        Ok(Family { inner: fam })
    }

    /// Ids of the families in the store.
    pub fn families(&self) -> Result<Vec<String>> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(&self.root)? {
            let e = e?;
            if let Some(name) = e.file_name().to_str()
                && !name.starts_with('.')
                && e.path().join("family").is_file()
            {
                out.push(name.to_string());
            }
        }
        out.sort();
        Ok(out)
    }

    /// Family `id`, closed here and in every other process (its lock file held), with this
    /// store's table of open families held: its directory, for removing it.
    fn closed_family(&self, id: &str) -> Result<(OpenTable<'_>, PathBuf, std::fs::File)> {
        format::check_name(id)?;
        let open = lock(&self.open);
        if open.get(id).and_then(Weak::upgrade).is_some() {
            return Err(DiskError::Busy);
        }
        let dir = self.root.join(id);
        if !dir.join("family").is_file() {
            return Err(DiskError::NotFound(format!("disk family {id}")));
        }
        // Another process holding it keeps its lock file locked.
        let lockfile = family::lock_family_dir(&dir)?;
        Ok((open, dir, lockfile))
    }

    /// Moves family `id` out of the way, whole, into `.orphaned/` under the root (a name
    /// [`DiskStore::families`] never lists and nothing opens), for a family no resource names
    /// any more: kept for an operator to remove rather than deleted, because a store that
    /// does not know a family (the wrong one, say) must never cost its data. Refused while it
    /// is open. Its objects in shared storage stay. Returns where it went.
    pub fn set_aside(&self, id: &str) -> Result<PathBuf> {
        let (open, dir, _lock) = self.closed_family(id)?;
        let aside = self.root.join(ORPHANED_DIR);
        std::fs::create_dir_all(&aside)?;
        let mut to = aside.join(id);
        for n in 1.. {
            if !to.exists() {
                break;
            }
            to = aside.join(format!("{id}.{n}"));
        }
        std::fs::rename(&dir, &to)?;
        kagi_fs::sync_dir(&aside)?;
        kagi_fs::sync_dir(&self.root)?;
        drop(open);
        Ok(to)
    }

    /// Deletes a family and all its volumes. Refused while it is open.
    pub fn delete_family(&self, id: &str) -> Result<()> {
        let (_open, dir, _lock) = self.closed_family(id)?;
        // Renamed first, so a crash midway never leaves a half family under its name.
        let doomed = self.root.join(format!(".{id}.deleting"));
        std::fs::rename(&dir, &doomed)?;
        kagi_fs::sync_dir(&self.root)?;
        std::fs::remove_dir_all(&doomed)?;
        // Its objects in shared storage go after its local copy: a failure here leaves only
        // ciphertext whose key went with the disk.
        if let Some(ship) = self.ship_of(id) {
            let objects: Vec<LogObject> = ship.list()?.into_iter().map(|(o, _)| o).collect();
            ship.delete(&objects)?;
        }
        Ok(())
    }
}

/// The table of a store's open families, held.
type OpenTable<'a> = MutexGuard<'a, HashMap<String, Weak<Inner>>>;

/// Where [`DiskStore::set_aside`] moves families, under the root.
pub const ORPHANED_DIR: &str = ".orphaned";

/// Lists a family's objects after fencing its previous writer off: an empty piece at the end
/// of every segment it could still be appending to (those from the newest checkpoint on), one
/// at the start of the next segment, and an empty checkpoint at every segment it could still
/// start a checkpoint at, so that each object it ships from now on fails (its flush,
/// checkpoint or rotation then fails: nothing it acknowledges afterwards is lost). An object
/// it shipped in between makes the fence fail; list again.
fn fence(ship: &dyn LogShip) -> Result<Vec<(LogObject, u64)>> {
    for _ in 0..50 {
        let listing = ship.list()?;
        let from = ship::checkpoints(&listing).max().unwrap_or(0);
        let mut raced = false;
        let segments = ship::shipped_segments(&listing);
        // The segment after the last one is claimed too (an empty first piece), so the old
        // writer cannot start a segment the new one would never read (a rotation, a
        // checkpoint's new segment).
        let next = segments.keys().next_back().map_or(1, |no| no + 1);
        let fences = segments
            .iter()
            .filter(|(no, s)| **no >= from && !s.fenced)
            .map(|(no, s)| LogObject::Piece {
                segment: *no,
                start: s.end,
            })
            .chain([LogObject::Piece {
                segment: next,
                start: 0,
            }])
            // The checkpoints the old writer could still make (it starts a checkpoint at a
            // segment it claimed, and it claimed none above `next`): empty ones, taken first.
            .chain(
                (from + 1..=next)
                    .map(LogObject::Checkpoint)
                    .filter(|c| !listing.iter().any(|(o, _)| o == c)),
            );
        for at in fences {
            match ship.put_new(at, &[]) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => raced = true,
                Err(e) => return Err(e.into()),
            }
        }
        if !raced {
            // What the fences were put after: list once more, so the pieces counted are
            // exactly those before them.
            return Ok(ship.list()?);
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    Err(DiskError::Busy)
}

/// An open disk family. Cheap to clone; the last clone (with its volumes) closes it with a
/// checkpoint.
#[derive(Clone)]
pub struct Family {
    inner: Arc<Inner>,
}

impl Family {
    /// The family's id.
    pub fn id(&self) -> &str {
        &self.inner.id
    }

    /// Whether the family has the inner (double-encryption) layer.
    pub fn has_inner_layer(&self) -> bool {
        self.inner.inner_layer()
    }

    fn handle(&self, vol: Arc<family::Vol>) -> Volume {
        Volume {
            fam: self.inner.clone(),
            vol,
        }
    }

    /// Creates an empty (all holes) writable volume of `size` bytes (a positive multiple of
    /// 4096).
    pub fn create_volume(&self, id: &str, size: u64) -> Result<Volume> {
        Ok(self.handle(self.inner.create_volume(id, size)?))
    }

    /// A handle on an existing volume.
    pub fn volume(&self, id: &str) -> Result<Volume> {
        Ok(self.handle(self.inner.volume(id)?))
    }

    /// Every volume of the family.
    pub fn volumes(&self) -> Vec<VolumeInfo> {
        self.inner
            .volume_ids()
            .into_iter()
            .map(|(id, read_only, size)| VolumeInfo {
                id,
                read_only,
                size,
            })
            .collect()
    }

    /// An incremental snapshot of `volume_id`: a read-only volume sharing every block with it,
    /// taken at once (writes acknowledged before the call are in it). Durable on return.
    pub fn snapshot(&self, volume_id: &str, snapshot_id: &str) -> Result<Volume> {
        Ok(self.handle(self.inner.clone_volume(volume_id, snapshot_id, true)?))
    }

    /// A new writable volume with the content of `source_id` (a snapshot, or any volume),
    /// sharing its blocks within the family. Durable on return.
    pub fn create_volume_from_snapshot(&self, source_id: &str, new_id: &str) -> Result<Volume> {
        Ok(self.handle(self.inner.clone_volume(source_id, new_id, false)?))
    }

    /// Deletes a volume; its handles then fail with `NotFound`. Its blocks become garbage for
    /// [`Family::gc`] unless other volumes share them.
    pub fn delete_volume(&self, id: &str) -> Result<()> {
        self.inner.delete_volume(id)
    }

    /// Grows a writable volume to `size` bytes (new space reads as zeros).
    pub fn resize_volume(&self, id: &str, size: u64) -> Result<()> {
        self.inner.resize(id, size)
    }

    /// Revocation: makes acknowledged writes durable (best effort), then drops the keys. Every
    /// later I/O fails with [`DiskError::Locked`] until [`Family::unlock`]. Writes in flight
    /// finish with the keys they hold.
    pub fn lock(&self) {
        if let Err(e) = self.inner.flush() {
            tracing::warn!(family = %self.inner.id, error = %e, "flush before locking failed");
        }
        self.inner.lock_keys();
    }

    /// Gives the keys back after [`Family::lock`]; `WrongKey` if they are not the family's.
    pub fn unlock(&self, keys: FamilyKeys) -> Result<()> {
        self.inner.unlock_keys(keys)
    }

    /// Whether the keys are dropped.
    pub fn is_locked(&self) -> bool {
        self.inner.is_locked()
    }

    /// Makes every acknowledged write of every volume durable.
    pub fn flush(&self) -> Result<()> {
        self.inner.cipher()?;
        self.inner.flush()
    }

    /// Writes a checkpoint of the index now (otherwise done every few segments, on every
    /// metadata change and on close), so the next open replays little.
    pub fn checkpoint(&self) -> Result<()> {
        self.inner.checkpoint()
    }

    /// Compaction: segments whose share of garbage is at least `min_garbage` (0.0 to 1.0;
    /// 0.5 is a good default) have their live blocks rewritten at the log's head; segments
    /// no volume uses are deleted once a checkpoint that no longer needs them is durable.
    pub fn gc(&self, min_garbage: f64) -> Result<GcReport> {
        self.inner.gc(min_garbage)
    }

    /// Bytes stored: the log, the live blocks, and per volume the mapped and exclusive
    /// bytes.
    pub fn stats(&self) -> FamilyStats {
        self.inner.stats()
    }
}
