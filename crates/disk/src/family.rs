//! A disk family: its header, keys, volumes, log of segments, checkpoints and compaction.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use crate::crypto::{Cipher, FamilyKeys};
use crate::error::{DiskError, Result};
use crate::format::{
    BLOCK_SIZE, CHECKPOINT_HEADER_LEN, CHECKPOINT_NONCE_OFFSET, CHUNK_BLOCKS, CheckpointHeader,
    Cursor, FamilyHeader, Kind, REC_FIELDS_LEN, REC_HEADER_LEN, RecordHeader, SEG_HEADER_LEN,
    SEGMENT_SIZE, check_name, encode_segment_header,
};
use crate::index::{Chunk, Entry, VolIndex, chunks_for};
use crate::segment::{Segment, parse_segment_name, segment_path};
use crate::ship::{LogObject, LogShip, Shipped, shipped_segments};
use crate::{lock, read, write};

/// Segments written between automatic checkpoints (bounds the replay at open to about
/// 256 MiB of log).
const CHECKPOINT_EVERY_SEGMENTS: u32 = 4;
/// File space is reserved ahead of the records in steps of this size.
const RESERVE_STEP: u64 = 8 << 20;
/// Locks serialising read-modify-write of partial blocks (hashed by volume and block).
const STRIPES: usize = 64;

/// A volume's state, shared by its handles.
pub(crate) struct Vol {
    pub number: u64,
    pub id: String,
    pub read_only: bool,
    pub deleted: AtomicBool,
    pub index: RwLock<VolIndex>,
}

/// The append position. Guarded by one mutex held only to reserve (and to rotate).
struct Log {
    cur: Arc<Segment>,
    off: u64,
    /// File space reserved in `cur` (fallocate), or `SEGMENT_SIZE` without fallocate.
    reserved: u64,
    next_seg: u64,
    next_seq: u64,
    /// Earlier segments not yet known durable (sealed and synced).
    unsynced: Vec<Arc<Segment>>,
    rotations: u32,
}

struct Meta {
    /// Replay starts at this segment: the newest durable checkpoint covers all before it.
    ckpt_seg: u64,
    next_volume: u64,
}

/// A reservation: (segment, offset, seq, the segment rotated out to make room).
type Reserved = (Arc<Segment>, u64, u64, Option<Arc<Segment>>);

/// The state of an open family.
pub(crate) struct Inner {
    pub id: String,
    dir: PathBuf,
    seg_dir: PathBuf,
    header: FamilyHeader,
    pub ct_len: usize,
    cipher: RwLock<Option<Arc<Cipher>>>,
    volumes: RwLock<BTreeMap<String, Arc<Vol>>>,
    /// Writers hold it shared from reservation to index update; a checkpoint holds it
    /// exclusively while it rotates and captures the index, so the capture reflects exactly
    /// the records before the checkpoint's segment.
    gate: RwLock<()>,
    log: Mutex<Log>,
    segments: RwLock<HashMap<u64, Arc<Segment>>>,
    /// Serialises metadata operations, checkpoints and compaction.
    meta: Mutex<Meta>,
    stripes: Vec<Mutex<()>>,
    failed: AtomicBool,
    _lockfile: File,
    /// Shared storage the log is copied to (`crate::ship`), if any.
    ship: Option<Arc<dyn LogShip>>,
    /// What of each segment is in shared storage; held while a piece is shipped, so pieces
    /// follow each other without gaps or overlaps.
    shipped: Mutex<BTreeMap<u64, Shipped>>,
    /// Checkpoints in shared storage (older ones are deleted once a newer one is there).
    shipped_checkpoints: Mutex<Vec<u64>>,
}

/// A record being built: header space, then one slot per block (plaintext in the first
/// `BLOCK_SIZE` bytes, tags after).
pub(crate) struct RecordBuf {
    pub buf: Vec<u8>,
    ct: usize,
}

impl RecordBuf {
    pub(crate) fn new(blocks: usize, ct: usize) -> RecordBuf {
        RecordBuf {
            buf: vec![0u8; REC_HEADER_LEN + blocks * ct],
            ct,
        }
    }
    /// An empty record with room for `blocks` slots, filled with [`Self::push_plain`]: no
    /// slot is zero-filled before its plaintext is copied in.
    pub(crate) fn with_capacity(blocks: usize, ct: usize) -> RecordBuf {
        let mut buf = Vec::with_capacity(REC_HEADER_LEN + blocks * ct);
        buf.resize(REC_HEADER_LEN, 0);
        RecordBuf { buf, ct }
    }
    /// Appends the next block's slot: `plain` (one block) and room for its tags.
    pub(crate) fn push_plain(&mut self, plain: &[u8]) {
        debug_assert_eq!(plain.len(), BLOCK_SIZE as usize);
        self.buf.extend_from_slice(plain);
        self.buf.resize(self.buf.len() + self.ct - plain.len(), 0);
    }
    /// The whole ciphertext-sized slot of block `i`.
    pub(crate) fn slot(&mut self, i: usize) -> &mut [u8] {
        let s = REC_HEADER_LEN + i * self.ct;
        &mut self.buf[s..s + self.ct]
    }
}

/// What a checkpoint saves (and what compaction and statistics read): the volumes' indexes
/// with their chunks shared, as of one instant.
pub(crate) struct Captured {
    next_seq: u64,
    next_seg: u64,
    next_volume: u64,
    volumes: Vec<(u64, String, bool, VolIndex)>,
}

/// What [`crate::Family::gc`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Segments whose live blocks were copied to the log's head.
    pub segments_rewritten: u64,
    /// Segment files deleted.
    pub segments_deleted: u64,
    /// Ciphertext bytes copied.
    pub bytes_moved: u64,
    /// Bytes of segment files deleted.
    pub bytes_freed: u64,
}

/// Space used by a family and its volumes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FamilyStats {
    /// Segment files.
    pub segments: u64,
    /// Bytes of records in all segment files (live and garbage).
    pub log_bytes: u64,
    /// Ciphertext bytes of the blocks some volume still uses (each shared block once).
    pub live_bytes: u64,
    /// Per volume (disks and snapshots), by id.
    pub volumes: Vec<VolumeStats>,
}

/// Space used by one volume.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VolumeStats {
    /// The volume's id.
    pub id: String,
    /// Whether it is a snapshot (read-only).
    pub read_only: bool,
    /// Its size in bytes.
    pub size: u64,
    /// Bytes of blocks holding data (not holes).
    pub mapped_bytes: u64,
    /// Bytes of blocks no other volume shares: what deleting this volume would free, and for
    /// an incremental snapshot what it stores beyond its neighbours.
    pub exclusive_bytes: u64,
}

fn corrupt_meta(file: &'static str, reason: &str) -> DiskError {
    DiskError::CorruptMeta {
        file,
        reason: reason.to_string(),
    }
}

impl Inner {
    /// Creates a new family directory (written under a temporary name, then renamed, so a
    /// crash leaves either nothing or a whole family) and opens it.
    pub(crate) fn create(
        root: &Path,
        id: &str,
        keys: FamilyKeys,
        inner: bool,
        ship: Option<Arc<dyn LogShip>>,
    ) -> Result<Arc<Inner>> {
        check_name(id)?;
        let dir = root.join(id);
        if dir.exists() {
            return Err(DiskError::AlreadyExists(format!("disk family {id}")));
        }
        let mut uid = [0u8; 16];
        aws_lc_rs::rand::fill(&mut uid)
            .map_err(|_| std::io::Error::other("random generator failed"))?;
        let cipher = Cipher::new(keys, uid, inner)?;
        let tmp = root.join(format!(".{id}.creating"));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(tmp.join("segments"))?;
        let fields = FamilyHeader::fields(&uid, inner);
        let (outer_check, inner_check) = cipher.key_checks(&fields);
        let header = FamilyHeader {
            uid,
            inner_layer: inner,
            outer_check,
            inner_check,
        };
        kagi_fs::write_atomically(&tmp.join("family"), &header.encode(), 0o600)?;
        // The first checkpoint: no volumes, replay from segment 1, which has its own nonce
        // (1, u32::MAX) and is created before it.
        let first = Segment::create(&tmp.join("segments"), 1, &uid, cipher.block_ct_len())?;
        first.seal()?;
        first.sync_all_reserved()?;
        let empty = Captured {
            next_seq: 1,
            next_seg: 2,
            next_volume: 1,
            volumes: Vec::new(),
        };
        let bytes = encode_checkpoint(&empty, 1, &uid, &cipher);
        kagi_fs::write_atomically(&tmp.join("checkpoint"), &bytes, 0o600)?;
        // In shared storage before it exists here: the header first, so a family whose
        // objects exist already (another writer, or one not deleted) is refused.
        if let Some(ship) = &ship {
            let first = std::fs::read(segment_path(&tmp.join("segments"), 1))?;
            let shipped = ship
                .put_new(LogObject::Header, &header.encode())
                .and_then(|()| {
                    ship.put_new(
                        LogObject::Piece {
                            segment: 1,
                            start: 0,
                        },
                        &first,
                    )
                })
                .and_then(|()| ship.put_new(LogObject::Checkpoint(1), &bytes));
            if let Err(e) = shipped {
                let _ = std::fs::remove_dir_all(&tmp);
                return Err(if e.kind() == std::io::ErrorKind::AlreadyExists {
                    DiskError::AlreadyExists(format!("disk family {id} in shared storage"))
                } else {
                    e.into()
                });
            }
        }
        std::fs::rename(&tmp, &dir).map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists || e.raw_os_error() == Some(39) {
                DiskError::AlreadyExists(format!("disk family {id}"))
            } else {
                e.into()
            }
        })?;
        kagi_fs::sync_dir(root)?;
        Self::open_with(root, id, cipher, ship)
    }

    /// Opens an existing family with its keys.
    pub(crate) fn open(
        root: &Path,
        id: &str,
        keys: FamilyKeys,
        ship: Option<Arc<dyn LogShip>>,
    ) -> Result<Arc<Inner>> {
        check_name(id)?;
        let header = read_header(&root.join(id))?;
        let cipher = Cipher::new(keys, header.uid, header.inner_layer)?;
        Self::open_with(root, id, cipher, ship)
    }

    fn open_with(
        root: &Path,
        id: &str,
        cipher: Cipher,
        ship: Option<Arc<dyn LogShip>>,
    ) -> Result<Arc<Inner>> {
        let dir = root.join(id);
        let seg_dir = dir.join("segments");
        let lockfile = lock_family_dir(&dir)?;
        let header = read_header(&dir)?;
        cipher.verify_key_checks(&header)?;
        let ct = cipher.block_ct_len();
        let ckpt_bytes = std::fs::read(dir.join("checkpoint"))?;
        let loaded = decode_checkpoint(&ckpt_bytes, &header.uid, &cipher)?;
        let mut indexes: HashMap<u64, VolIndex> = HashMap::new();
        let mut names = Vec::new();
        for (number, vid, ro, idx) in loaded.captured.volumes {
            indexes.insert(number, idx);
            names.push((number, vid, ro));
        }

        let mut numbers = Vec::new();
        for e in std::fs::read_dir(&seg_dir)? {
            let e = e?;
            let name = e.file_name();
            match name.to_str().and_then(parse_segment_name) {
                Some(no) => numbers.push(no),
                None => tracing::warn!(family = id, file = ?name, "unknown file in segments"),
            }
        }
        numbers.sort_unstable();
        let mut segments = HashMap::new();
        let mut unsynced = Vec::new();
        let mut max_seq = 0u64;
        let mut max_file = 0u64;
        for no in numbers {
            max_file = max_file.max(no);
            let path = segment_path(&seg_dir, no);
            let file = OpenOptions::new().read(true).write(true).open(&path)?;
            let len = file.metadata()?.len();
            if no < loaded.ckpt_seg {
                // Sealed and synced before the checkpoint that covers it was written.
                segments.insert(no, Arc::new(Segment::from_file(no, file, path, len, true)));
                continue;
            }
            let Some(end) = replay_segment(
                &file,
                no,
                len,
                &header.uid,
                &cipher,
                &mut indexes,
                &mut max_seq,
            )?
            else {
                // Created but its header never became durable: no record, no nonce used.
                drop(file);
                std::fs::remove_file(&path)?;
                continue;
            };
            let seg = Arc::new(Segment::from_file(no, file, path, end, false));
            unsynced.push(seg.clone());
            segments.insert(no, seg);
        }
        // What shared storage has: the next segment is above every one claimed there too.
        let (shipped, shipped_checkpoints) = match &ship {
            Some(s) => {
                let listing = s.list()?;
                // Taken over by another process since this copy was made: stale for good.
                if crate::ship::epoch(&listing) > read_epoch(&dir)? {
                    return Err(DiskError::TakenOver);
                }
                // A family made before its log was shipped: its header goes up now, its
                // segments with the checkpoint below.
                if !listing.iter().any(|(o, _)| *o == LogObject::Header) {
                    match s.put_new(LogObject::Header, &std::fs::read(dir.join("family"))?) {
                        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                            return Err(e.into());
                        }
                        _ => {}
                    }
                }
                let checkpoints = crate::ship::checkpoints(&listing).collect();
                (shipped_segments(&listing), checkpoints)
            }
            None => Default::default(),
        };
        let max_shipped = shipped.keys().next_back().copied().unwrap_or(0);
        let next_seg = loaded
            .captured
            .next_seg
            .max(max_file + 1)
            .max(max_shipped + 1);
        let next_seq = loaded.captured.next_seq.max(max_seq + 1);
        let cur = Arc::new(Segment::create(&seg_dir, next_seg, &header.uid, ct)?);
        segments.insert(next_seg, cur.clone());
        let mut volumes = BTreeMap::new();
        for (number, vid, ro) in names {
            let index = indexes.remove(&number).unwrap_or_else(|| VolIndex::new(0));
            volumes.insert(
                vid.clone(),
                Arc::new(Vol {
                    number,
                    id: vid,
                    read_only: ro,
                    deleted: AtomicBool::new(false),
                    index: RwLock::new(index),
                }),
            );
        }
        let inner = Arc::new(Inner {
            id: id.to_string(),
            dir,
            seg_dir,
            header,
            ct_len: ct,
            cipher: RwLock::new(Some(Arc::new(cipher))),
            volumes: RwLock::new(volumes),
            gate: RwLock::new(()),
            log: Mutex::new(Log {
                cur: cur.clone(),
                off: SEG_HEADER_LEN,
                reserved: SEG_HEADER_LEN,
                next_seg: next_seg + 1,
                next_seq,
                unsynced,
                rotations: 0,
            }),
            segments: RwLock::new(segments),
            meta: Mutex::new(Meta {
                ckpt_seg: loaded.ckpt_seg,
                next_volume: loaded.captured.next_volume,
            }),
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            failed: AtomicBool::new(false),
            _lockfile: lockfile,
            ship,
            shipped: Mutex::new(shipped),
            shipped_checkpoints: Mutex::new(shipped_checkpoints),
        });
        inner.claim(&cur).map_err(|e| inner.fail(e))?;
        // Make the replayed state the checkpoint: the torn tails are cut (sealed to the
        // replayed end) and never replayed again.
        let cipher = inner.cipher()?;
        inner.checkpoint_locked(&mut lock(&inner.meta), &cipher)?;
        Ok(inner)
    }

    /// The keys, or `Locked`.
    pub(crate) fn cipher(&self) -> Result<Arc<Cipher>> {
        read(&self.cipher).clone().ok_or(DiskError::Locked)
    }

    pub(crate) fn check_ok(&self) -> Result<()> {
        if self.failed.load(Ordering::Acquire) {
            Err(DiskError::Failed)
        } else {
            Ok(())
        }
    }

    /// Stops all writing after a failed write or sync.
    fn fail(&self, e: DiskError) -> DiskError {
        tracing::error!(family = %self.id, error = %e, "disk family stopped after an I/O failure");
        self.failed.store(true, Ordering::Release);
        e
    }

    pub(crate) fn stripe(&self, volume: u64, block: u64) -> &Mutex<()> {
        let h = volume.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ block;
        &self.stripes[(h % STRIPES as u64) as usize]
    }

    pub(crate) fn segment(&self, no: u64) -> Option<Arc<Segment>> {
        read(&self.segments).get(&no).cloned()
    }

    pub(crate) fn lock_keys(&self) {
        // Dropping the last reference frees aws-lc's key schedules, which aws-lc cleanses.
        *write(&self.cipher) = None;
    }

    pub(crate) fn unlock_keys(&self, keys: FamilyKeys) -> Result<()> {
        let cipher = Cipher::new(keys, self.header.uid, self.header.inner_layer)?;
        cipher.verify_key_checks(&self.header)?;
        *write(&self.cipher) = Some(Arc::new(cipher));
        Ok(())
    }

    pub(crate) fn is_locked(&self) -> bool {
        read(&self.cipher).is_none()
    }

    pub(crate) fn inner_layer(&self) -> bool {
        self.header.inner_layer
    }

    // ----- the log -----

    /// Starts a new current segment; the old one joins the unsynced list and is returned.
    fn rotate(&self, log: &mut Log) -> Result<Arc<Segment>> {
        let no = log.next_seg;
        // The number is burnt even if creation fails, so it is never reused.
        log.next_seg += 1;
        if no > u32::MAX as u64 {
            return Err(DiskError::NoSpace);
        }
        let seg = Segment::create(&self.seg_dir, no, &self.header.uid, self.ct_len);
        // Shipping: a burnt number must never be followed by a later claim, or a takeover's
        // fence (the number after the last claimed one) would not stop this writer.
        let seg = Arc::new(match seg {
            Err(e) if self.ship.is_some() => return Err(self.fail(e)),
            seg => seg?,
        });
        write(&self.segments).insert(no, seg.clone());
        self.claim(&seg).map_err(|e| self.fail(e))?;
        let old = std::mem::replace(&mut log.cur, seg);
        log.unsynced.push(old.clone());
        log.off = SEG_HEADER_LEN;
        log.reserved = SEG_HEADER_LEN;
        log.rotations += 1;
        Ok(old)
    }

    /// Reserves `len` bytes at the log's head: (segment, offset, seq, segment rotated out).
    fn reserve(&self, len: u64) -> Result<Reserved> {
        let mut log = lock(&self.log);
        let mut rotated = None;
        if log.off + len > SEGMENT_SIZE {
            rotated = Some(self.rotate(&mut log)?);
        }
        if log.off + len > log.reserved {
            let upto = (log.off + len)
                .max(log.reserved + RESERVE_STEP)
                .min(SEGMENT_SIZE);
            log.reserved = if log.cur.reserve_space(log.reserved, upto)? {
                upto
            } else {
                SEGMENT_SIZE
            };
        }
        let off = log.off;
        log.off += len;
        let seq = log.next_seq;
        log.next_seq += 1;
        log.cur.begin(off, len);
        Ok((log.cur.clone(), off, seq, rotated))
    }

    /// Appends one record: reserves its place, seals header and blocks with nonces of that
    /// place, writes it with one pwrite, then calls `apply(segment, payload offset, seq)`
    /// (the index update) before the write counts as finished. Returns the segment and the
    /// record's end (for FUA).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn append(
        &self,
        cipher: &Cipher,
        kind: Kind,
        volume: u64,
        first_block: u64,
        count: u32,
        rec: Option<&mut RecordBuf>,
        apply: impl FnOnce(u64, u64, u64),
    ) -> Result<(Arc<Segment>, u64)> {
        let gate = read(&self.gate);
        self.check_ok()?;
        let mut header_only = [0u8; REC_HEADER_LEN];
        let buf: &mut [u8] = match rec {
            Some(r) => &mut r.buf,
            None => &mut header_only,
        };
        let len = buf.len() as u64;
        let (seg, off, seq, rotated) = self.reserve(len)?;
        let fields = RecordHeader {
            kind,
            volume,
            first_block,
            count,
            seq,
        }
        .encode();
        buf[..REC_FIELDS_LEN].copy_from_slice(&fields);
        buf[REC_FIELDS_LEN..REC_HEADER_LEN]
            .copy_from_slice(&cipher.mac_header(seg.no, off as u32, &fields));
        if kind.has_payload() {
            for (i, slot) in buf[REC_HEADER_LEN..]
                .chunks_exact_mut(self.ct_len)
                .enumerate()
            {
                let at = off + (REC_HEADER_LEN + i * self.ct_len) as u64;
                cipher.seal_block(seg.no, at as u32, first_block.wrapping_add(i as u64), slot);
            }
        }
        if let Err(e) = seg.file.write_all_at(buf, off) {
            seg.complete(off);
            return Err(self.fail(e.into()));
        }
        apply(seg.no, off + REC_HEADER_LEN as u64, seq);
        seg.complete(off);
        drop(gate);
        if let Some(old) = rotated {
            old.seal().map_err(|e| self.fail(e))?;
        }
        Ok((seg, off + len))
    }

    /// Makes one record durable (FUA): everything before it in its segment is synced too.
    pub(crate) fn sync_record(&self, seg: &Segment, end: u64) -> Result<()> {
        self.check_ok()?;
        seg.sync_to(end).map_err(|e| self.fail(e))?;
        self.ship_to(seg, end)
    }

    /// Makes durable every write acknowledged before the call, from every thread.
    pub(crate) fn flush(&self) -> Result<()> {
        self.check_ok()?;
        let segs: Vec<(Arc<Segment>, u64)> = {
            let log = lock(&self.log);
            log.unsynced
                .iter()
                .chain(std::iter::once(&log.cur))
                .map(|s| (s.clone(), s.end()))
                .collect()
        };
        for (s, end) in &segs {
            s.sync_to(*end).map_err(|e| self.fail(e))?;
            self.ship_to(s, *end)?;
        }
        lock(&self.log).unsynced.retain(|s| !s.is_durable());
        Ok(())
    }

    // ----- shipping (`crate::ship`) -----

    /// Claims a new segment in shared storage (its header), before any nonce of it is used:
    /// a segment another writer claimed first is refused (`Busy`).
    fn claim(&self, seg: &Segment) -> Result<()> {
        let Some(ship) = &self.ship else {
            return Ok(());
        };
        let mut shipped = lock(&self.shipped);
        let mut header = vec![0u8; SEG_HEADER_LEN as usize];
        seg.file.read_exact_at(&mut header, 0)?;
        put_piece(ship.as_ref(), seg.no, 0, &header)?;
        shipped.insert(
            seg.no,
            Shipped {
                starts: vec![0],
                end: SEG_HEADER_LEN,
                fenced: false,
            },
        );
        Ok(())
    }

    /// Copies what is durable of `seg` below `upto` (a record boundary) to shared storage,
    /// if not there yet. A failure stops the family, as a failed fsync does: what the caller
    /// is about to acknowledge would not be in shared storage.
    fn ship_to(&self, seg: &Segment, upto: u64) -> Result<()> {
        let Some(ship) = &self.ship else {
            return Ok(());
        };
        let mut shipped = lock(&self.shipped);
        let entry = shipped.entry(seg.no).or_default();
        if entry.end >= upto {
            return Ok(());
        }
        let start = entry.end;
        let mut bytes = vec![0u8; (upto - start) as usize];
        seg.file
            .read_exact_at(&mut bytes, start)
            .map_err(|e| self.fail(e.into()))?;
        put_piece(ship.as_ref(), seg.no, start, &bytes).map_err(|e| self.fail(e))?;
        entry.starts.push(start);
        entry.end = upto;
        Ok(())
    }

    /// Ships a durable checkpoint, then deletes the older ones (best effort: a newer one is
    /// there, and an older one is never read while a newer one exists).
    fn ship_checkpoint(&self, x: u64, bytes: &[u8]) -> Result<()> {
        let Some(ship) = &self.ship else {
            return Ok(());
        };
        let mut done = lock(&self.shipped_checkpoints);
        match ship.put_new(LogObject::Checkpoint(x), bytes) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(self.fail(DiskError::Busy));
            }
            Err(e) => return Err(self.fail(e.into())),
        }
        let older: Vec<LogObject> = done
            .iter()
            .filter(|c| **c < x)
            .map(|c| LogObject::Checkpoint(*c))
            .collect();
        if let Err(e) = ship.delete(&older) {
            tracing::warn!(family = %self.id, error = %e, "older checkpoints not deleted from shared storage");
        } else {
            done.retain(|c| *c >= x);
        }
        done.push(x);
        Ok(())
    }

    /// Deletes deleted segments' pieces from shared storage (after the checkpoint that no
    /// longer needs them was shipped); failures are logged, the pieces are only garbage.
    fn unship(&self, segments: &[u64]) {
        let Some(ship) = &self.ship else {
            return;
        };
        let mut shipped = lock(&self.shipped);
        let mut doomed = Vec::new();
        for no in segments {
            if let Some(s) = shipped.remove(no) {
                // A fence stays: a previous writer still running must keep failing on it.
                let kept = usize::from(s.fenced);
                let starts = &s.starts[..s.starts.len() - kept];
                doomed.extend(starts.iter().map(|start| LogObject::Piece {
                    segment: *no,
                    start: *start,
                }));
            }
        }
        if let Err(e) = ship.delete(&doomed) {
            tracing::warn!(family = %self.id, error = %e, "compacted segments not deleted from shared storage");
        }
    }

    /// After a write that rotated segments: checkpoint when enough log has accumulated (if no
    /// other metadata operation runs; the next write will try again).
    pub(crate) fn maybe_checkpoint(&self, cipher: &Cipher) -> Result<()> {
        if lock(&self.log).rotations < CHECKPOINT_EVERY_SEGMENTS {
            return Ok(());
        }
        let Ok(mut meta) = self.meta.try_lock() else {
            return Ok(());
        };
        self.checkpoint_locked(&mut meta, cipher).map(|_| ())
    }

    /// Writes a checkpoint: rotates to a new segment X and captures the index with no write
    /// in flight; seals and syncs every segment before X; then replaces the checkpoint file
    /// (sealed under nonce (X, u32::MAX)). Replay at open starts at X.
    fn checkpoint_locked(&self, meta: &mut Meta, cipher: &Cipher) -> Result<Captured> {
        let gate = write(&self.gate);
        self.check_ok()?;
        let (x, to_finish, captured) = {
            let mut log = lock(&self.log);
            self.rotate(&mut log)?;
            log.rotations = 0;
            let captured = self.capture(log.next_seq, log.next_seg, meta.next_volume);
            (log.cur.no, log.unsynced.clone(), captured)
        };
        drop(gate);
        for s in &to_finish {
            s.seal()
                .and_then(|_| s.sync_all_reserved())
                .map_err(|e| self.fail(e))?;
            self.ship_to(s, s.end())?;
        }
        lock(&self.log).unsynced.retain(|s| !s.is_durable());
        // Every segment the checkpoint can point into is in shared storage whole before it:
        // a flush may have dropped a durable segment from the unsynced list before another
        // thread shipped its tail, and a family made before shipping has its older segments
        // shipped here, once.
        if self.ship.is_some() {
            let mut below: Vec<Arc<Segment>> = read(&self.segments)
                .iter()
                .filter(|(no, _)| **no < x)
                .map(|(_, s)| s.clone())
                .collect();
            below.sort_by_key(|s| s.no);
            for s in &below {
                self.ship_to(s, s.end())?;
            }
        }
        let bytes = encode_checkpoint(&captured, x, &self.header.uid, cipher);
        kagi_fs::write_atomically(&self.dir.join("checkpoint"), &bytes, 0o600)?;
        self.ship_checkpoint(x, &bytes)?;
        meta.ckpt_seg = x;
        Ok(captured)
    }

    fn capture(&self, next_seq: u64, next_seg: u64, next_volume: u64) -> Captured {
        let volumes = read(&self.volumes)
            .values()
            .map(|v| (v.number, v.id.clone(), v.read_only, read(&v.index).clone()))
            .collect();
        Captured {
            next_seq,
            next_seg,
            next_volume,
            volumes,
        }
    }

    /// Writes a checkpoint now.
    pub(crate) fn checkpoint(&self) -> Result<()> {
        let cipher = self.cipher()?;
        self.checkpoint_locked(&mut lock(&self.meta), &cipher)
            .map(|_| ())
    }

    // ----- volumes -----

    pub(crate) fn volume(&self, id: &str) -> Result<Arc<Vol>> {
        read(&self.volumes)
            .get(id)
            .cloned()
            .ok_or_else(|| DiskError::NotFound(format!("volume {id}")))
    }

    pub(crate) fn volume_ids(&self) -> Vec<(String, bool, u64)> {
        read(&self.volumes)
            .values()
            .map(|v| (v.id.clone(), v.read_only, read(&v.index).size))
            .collect()
    }

    /// Adds a volume (with `index`) and makes it durable with a checkpoint.
    fn add_volume(
        &self,
        id: &str,
        read_only: bool,
        index: impl FnOnce() -> Result<VolIndex>,
    ) -> Result<Arc<Vol>> {
        check_name(id)?;
        let cipher = self.cipher()?;
        self.check_ok()?;
        let mut meta = lock(&self.meta);
        if read(&self.volumes).contains_key(id) {
            return Err(DiskError::AlreadyExists(format!("volume {id}")));
        }
        let vol = Arc::new(Vol {
            number: meta.next_volume,
            id: id.to_string(),
            read_only,
            deleted: AtomicBool::new(false),
            index: RwLock::new(index()?),
        });
        meta.next_volume += 1;
        write(&self.volumes).insert(id.to_string(), vol.clone());
        if let Err(e) = self.checkpoint_locked(&mut meta, &cipher) {
            write(&self.volumes).remove(id);
            return Err(e);
        }
        Ok(vol)
    }

    pub(crate) fn create_volume(&self, id: &str, size: u64) -> Result<Arc<Vol>> {
        check_size(size)?;
        self.add_volume(id, false, || Ok(VolIndex::new(size)))
    }

    /// A new volume sharing every block of `src` (a snapshot when `read_only`).
    pub(crate) fn clone_volume(&self, src: &str, id: &str, read_only: bool) -> Result<Arc<Vol>> {
        let src = self.volume(src)?;
        self.add_volume(id, read_only, || Ok(read(&src.index).clone()))
    }

    pub(crate) fn delete_volume(&self, id: &str) -> Result<()> {
        let cipher = self.cipher()?;
        self.check_ok()?;
        let mut meta = lock(&self.meta);
        let vol = write(&self.volumes)
            .remove(id)
            .ok_or_else(|| DiskError::NotFound(format!("volume {id}")))?;
        vol.deleted.store(true, Ordering::Release);
        if let Err(e) = self.checkpoint_locked(&mut meta, &cipher) {
            vol.deleted.store(false, Ordering::Release);
            write(&self.volumes).insert(id.to_string(), vol);
            return Err(e);
        }
        Ok(())
    }

    pub(crate) fn resize(&self, id: &str, size: u64) -> Result<()> {
        check_size(size)?;
        let cipher = self.cipher()?;
        self.check_ok()?;
        let mut meta = lock(&self.meta);
        let vol = self.volume(id)?;
        if vol.read_only {
            return Err(DiskError::ReadOnly);
        }
        let old = {
            let mut idx = write(&vol.index);
            let old = idx.size;
            if size < old {
                return Err(DiskError::InvalidSize {
                    size,
                    reason: "volumes only grow",
                });
            }
            idx.grow(size);
            old
        };
        if let Err(e) = self.checkpoint_locked(&mut meta, &cipher) {
            let mut idx = write(&vol.index);
            idx.size = old;
            idx.chunks.truncate(chunks_for(old));
            return Err(e);
        }
        Ok(())
    }

    // ----- compaction -----

    /// Copies the live blocks of segments with at least `min_garbage` (0.0..=1.0) garbage to
    /// the log's head, checkpoints, then deletes every segment before the checkpoint that no
    /// volume uses.
    pub(crate) fn gc(&self, min_garbage: f64) -> Result<GcReport> {
        let cipher = self.cipher()?;
        let mut meta = lock(&self.meta);
        let view = self.checkpoint_locked(&mut meta, &cipher)?;
        let live = live_map(&view);
        let mut candidates: Vec<Arc<Segment>> = read(&self.segments)
            .values()
            .filter(|s| s.no < meta.ckpt_seg)
            .cloned()
            .collect();
        candidates.sort_by_key(|s| s.no);
        let mut report = GcReport::default();
        for seg in &candidates {
            let Some(blocks) = live.get(&seg.no) else {
                continue;
            };
            let size = seg.end().saturating_sub(SEG_HEADER_LEN);
            let live_bytes = blocks.len() as u64 * self.ct_len as u64;
            if size == 0 || 1.0 - (live_bytes as f64 / size as f64) < min_garbage {
                continue;
            }
            self.relocate(&cipher, seg, blocks)?;
            report.segments_rewritten += 1;
            report.bytes_moved += live_bytes;
        }
        let view = if report.segments_rewritten > 0 {
            self.checkpoint_locked(&mut meta, &cipher)?
        } else {
            view
        };
        // Only segments before the durable checkpoint, and none any volume of it uses: the
        // checkpoint no longer needs them and replay never reads them. The checkpoint's own
        // segment is newer than all of them, so the highest number stays on disk.
        let live = live_map(&view);
        let dead: Vec<Arc<Segment>> = read(&self.segments)
            .values()
            .filter(|s| s.no < meta.ckpt_seg && !live.contains_key(&s.no))
            .cloned()
            .collect();
        for s in &dead {
            write(&self.segments).remove(&s.no);
            std::fs::remove_file(s.path())?;
            report.segments_deleted += 1;
            report.bytes_freed += s.end();
        }
        if !dead.is_empty() {
            kagi_fs::sync_dir(&self.seg_dir)?;
            self.unship(&dead.iter().map(|s| s.no).collect::<Vec<_>>());
        }
        Ok(report)
    }

    /// Rewrites the live blocks of `seg` (offset → block) as relocation records and points
    /// every volume that still uses the old place at the new one.
    fn relocate(&self, cipher: &Cipher, seg: &Segment, blocks: &BTreeMap<u32, u64>) -> Result<()> {
        let mut items: Vec<(u64, u32)> = blocks.iter().map(|(o, b)| (*b, *o)).collect();
        items.sort_unstable();
        let mut start = 0;
        while start < items.len() {
            let mut end = start + 1;
            while end < items.len()
                && end - start < crate::format::MAX_RECORD_BLOCKS
                && items[end].0 == items[end - 1].0 + 1
            {
                end += 1;
            }
            let run = &items[start..end];
            let mut rec = RecordBuf::new(run.len(), self.ct_len);
            for (i, (block, off)) in run.iter().enumerate() {
                let slot = rec.slot(i);
                seg.file.read_exact_at(slot, *off as u64)?;
                cipher.open_block(seg.no, *off, *block, slot)?;
            }
            self.append(
                cipher,
                Kind::Reloc,
                0,
                run[0].0,
                run.len() as u32,
                Some(&mut rec),
                |new_seg, at, _| self.replace_locations(seg.no, run, new_seg, at),
            )?;
            start = end;
        }
        Ok(())
    }

    /// In every volume, entries still at (`old_seg`, offset) of `run` move to the new record
    /// (same seq). Chunks shared between volumes are replaced by one shared new chunk.
    fn replace_locations(&self, old_seg: u64, run: &[(u64, u32)], new_seg: u64, at: u64) {
        let ct = self.ct_len as u64;
        let vols: Vec<Arc<Vol>> = read(&self.volumes).values().cloned().collect();
        let mut memo: HashMap<*const Chunk, (Arc<Chunk>, Arc<Chunk>)> = HashMap::new();
        for v in vols {
            let mut idx = write(&v.index);
            let mut ci_done = None;
            for (block, _) in run {
                let ci = (*block / CHUNK_BLOCKS as u64) as usize;
                if ci_done == Some(ci) {
                    continue;
                }
                ci_done = Some(ci);
                let Some(Some(chunk)) = idx.chunks.get(ci) else {
                    continue;
                };
                let key = Arc::as_ptr(chunk);
                if let Some((_, new)) = memo.get(&key) {
                    idx.chunks[ci] = Some(new.clone());
                    continue;
                }
                let mut copy: Option<Chunk> = None;
                for (i, (b, off)) in run.iter().enumerate() {
                    if (*b / CHUNK_BLOCKS as u64) as usize != ci {
                        continue;
                    }
                    let slot = (*b % CHUNK_BLOCKS as u64) as usize;
                    let e = chunk.0[slot];
                    if e.seg as u64 == old_seg && e.off == *off {
                        let c = copy.get_or_insert_with(|| (**chunk).clone());
                        c.0[slot] = Entry {
                            seg: new_seg as u32,
                            off: (at + i as u64 * ct) as u32,
                            seq: e.seq,
                        };
                    }
                }
                if let Some(c) = copy {
                    let new = Arc::new(c);
                    memo.insert(key, (chunk.clone(), new.clone()));
                    idx.chunks[ci] = Some(new);
                }
            }
        }
    }

    pub(crate) fn stats(&self) -> FamilyStats {
        let view = self.capture(0, 0, 0);
        let mut refs: HashMap<(u32, u32), u32> = HashMap::new();
        for (_, _, _, idx) in &view.volumes {
            for_each_data(idx, |_, e| *refs.entry((e.seg, e.off)).or_default() += 1);
        }
        let volumes = view
            .volumes
            .iter()
            .map(|(_, id, ro, idx)| {
                let (mut mapped, mut exclusive) = (0u64, 0u64);
                for_each_data(idx, |_, e| {
                    mapped += BLOCK_SIZE;
                    if refs.get(&(e.seg, e.off)) == Some(&1) {
                        exclusive += BLOCK_SIZE;
                    }
                });
                VolumeStats {
                    id: id.clone(),
                    read_only: *ro,
                    size: idx.size,
                    mapped_bytes: mapped,
                    exclusive_bytes: exclusive,
                }
            })
            .collect();
        let segs = read(&self.segments);
        FamilyStats {
            segments: segs.len() as u64,
            log_bytes: segs.values().map(|s| s.end()).sum(),
            live_bytes: refs.len() as u64 * self.ct_len as u64,
            volumes,
        }
    }

    /// At the last handle: a checkpoint (so the next open replays nothing) and the current
    /// segment's reservation given back.
    fn close(&self) -> Result<()> {
        let cipher = self.cipher()?;
        self.check_ok()?;
        self.checkpoint_locked(&mut lock(&self.meta), &cipher)?;
        let cur = lock(&self.log).cur.clone();
        cur.seal()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if self.is_locked() || self.failed.load(Ordering::Acquire) {
            return;
        }
        if let Err(e) = self.close() {
            tracing::warn!(family = %self.id, error = %e, "closing the disk family failed; the next open replays its log");
        }
    }
}

/// Creates one piece of a segment in shared storage; one that exists already means another
/// writer has the family (`Busy`).
/// The takeover a family's local copy was fetched at (`epoch`: decimal; none: 0, a copy
/// made here).
pub(crate) fn read_epoch(dir: &Path) -> Result<u64> {
    match std::fs::read_to_string(dir.join(EPOCH_FILE)) {
        Ok(text) => text.trim().parse().map_err(|_| DiskError::CorruptMeta {
            file: "epoch",
            reason: "not a number".into(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(e.into()),
    }
}

/// The file holding a fetched copy's takeover number.
pub(crate) const EPOCH_FILE: &str = "epoch";

fn put_piece(ship: &dyn LogShip, segment: u64, start: u64, bytes: &[u8]) -> Result<()> {
    match ship.put_new(LogObject::Piece { segment, start }, bytes) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(DiskError::Busy),
        Err(e) => Err(e.into()),
    }
}

fn check_size(size: u64) -> Result<()> {
    if size == 0 || !size.is_multiple_of(BLOCK_SIZE) {
        return Err(DiskError::InvalidSize {
            size,
            reason: "must be a positive multiple of 4096",
        });
    }
    // Azure's largest managed disk; the chunk vector of the index is 8 bytes per 4 MiB.
    if size > 64 << 40 {
        return Err(DiskError::InvalidSize {
            size,
            reason: "larger than 64 TiB",
        });
    }
    Ok(())
}

/// Takes the family directory's lock file (flock, released when the file closes): `Busy` if
/// another process, or another open in this one, holds it.
pub(crate) fn lock_family_dir(dir: &Path) -> Result<File> {
    let lockfile = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(dir.join("lock"))?;
    rustix::fs::flock(
        &lockfile,
        rustix::fs::FlockOperation::NonBlockingLockExclusive,
    )
    .map_err(|_| DiskError::Busy)?;
    Ok(lockfile)
}

fn read_header(dir: &Path) -> Result<FamilyHeader> {
    match std::fs::read(dir.join("family")) {
        Ok(b) => FamilyHeader::decode(&b),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(DiskError::NotFound(format!(
            "disk family {}",
            dir.file_name().and_then(|n| n.to_str()).unwrap_or("?")
        ))),
        Err(e) => Err(e.into()),
    }
}

fn for_each_data(idx: &VolIndex, mut f: impl FnMut(u64, &Entry)) {
    for (ci, chunk) in idx.chunks.iter().enumerate() {
        let Some(chunk) = chunk else { continue };
        for (i, e) in chunk.0.iter().enumerate() {
            if e.has_data() {
                f((ci * CHUNK_BLOCKS + i) as u64, e);
            }
        }
    }
}

/// Segment → (offset → block) of every block some volume uses.
fn live_map(view: &Captured) -> HashMap<u64, BTreeMap<u32, u64>> {
    let mut live: HashMap<u64, BTreeMap<u32, u64>> = HashMap::new();
    let mut seen: std::collections::HashSet<*const Chunk> = std::collections::HashSet::new();
    for (_, _, _, idx) in &view.volumes {
        for (ci, chunk) in idx.chunks.iter().enumerate() {
            let Some(chunk) = chunk else { continue };
            if !seen.insert(Arc::as_ptr(chunk)) {
                continue;
            }
            for (i, e) in chunk.0.iter().enumerate() {
                if e.has_data() {
                    live.entry(e.seg as u64)
                        .or_default()
                        .insert(e.off, (ci * CHUNK_BLOCKS + i) as u64);
                }
            }
        }
    }
    live
}

/// Replays one segment into the indexes. `None` when its header is not valid (it was being
/// created). Stops at the first record that is not whole and authentic: the torn tail.
fn replay_segment(
    file: &File,
    no: u64,
    file_len: u64,
    uid: &[u8; 16],
    cipher: &Cipher,
    indexes: &mut HashMap<u64, VolIndex>,
    max_seq: &mut u64,
) -> Result<Option<u64>> {
    let ct = cipher.block_ct_len();
    let mut head = [0u8; SEG_HEADER_LEN as usize];
    if file_len < SEG_HEADER_LEN
        || file.read_exact_at(&mut head, 0).is_err()
        || head != encode_segment_header(uid, no, ct)
    {
        return Ok(None);
    }
    let limit = file_len.min(SEGMENT_SIZE);
    let mut pos = SEG_HEADER_LEN;
    let mut body = Vec::new();
    'records: while pos + REC_HEADER_LEN as u64 <= limit {
        let mut h = [0u8; REC_HEADER_LEN];
        file.read_exact_at(&mut h, pos)?;
        let Some(rh) = RecordHeader::decode(&h[..REC_FIELDS_LEN]) else {
            break;
        };
        if !cipher.verify_header(no, pos as u32, &h[..REC_FIELDS_LEN], &h[REC_FIELDS_LEN..]) {
            break;
        }
        let len = rh.record_len(ct);
        if pos + len > limit {
            break;
        }
        let payload = pos + REC_HEADER_LEN as u64;
        if rh.kind.has_payload() {
            body.resize((len - REC_HEADER_LEN as u64) as usize, 0);
            file.read_exact_at(&mut body, payload)?;
            for (i, slot) in body.chunks_exact_mut(ct).enumerate() {
                let at = payload + (i * ct) as u64;
                if cipher
                    .open_block(no, at as u32, rh.first_block.wrapping_add(i as u64), slot)
                    .is_err()
                {
                    break 'records;
                }
            }
        }
        let seq = rh.seq;
        match (rh.kind, indexes.get_mut(&rh.volume)) {
            (Kind::Data, Some(idx)) => idx.set_range(rh.first_block, rh.count as u64, |k| Entry {
                seg: no as u32,
                off: (payload + k * ct as u64) as u32,
                seq,
            }),
            (Kind::Zero, Some(idx)) => {
                idx.set_range(rh.first_block, rh.count as u64, |_| Entry::hole(seq))
            }
            // Relocation copies, and records of deleted volumes.
            _ => {}
        }
        *max_seq = (*max_seq).max(seq);
        pos += len;
    }
    if pos < limit {
        let mut probe = [0u8; 8];
        let torn = file.read_exact_at(&mut probe, pos).is_ok() && probe != [0u8; 8];
        if torn {
            tracing::warn!(
                segment = no,
                offset = pos,
                "torn or damaged log tail cut off at replay"
            );
        }
    }
    Ok(Some(pos))
}

fn encode_checkpoint(c: &Captured, x: u64, uid: &[u8; 16], cipher: &Cipher) -> Vec<u8> {
    let mut chunk_ids: HashMap<*const Chunk, u32> = HashMap::new();
    let mut chunks: Vec<&Arc<Chunk>> = Vec::new();
    for (_, _, _, idx) in &c.volumes {
        for chunk in idx.chunks.iter().flatten() {
            chunk_ids.entry(Arc::as_ptr(chunk)).or_insert_with(|| {
                chunks.push(chunk);
                (chunks.len() - 1) as u32
            });
        }
    }
    let mut body = Vec::with_capacity(64 + chunks.len() * CHUNK_BLOCKS * 16);
    body.extend_from_slice(&c.next_seq.to_le_bytes());
    body.extend_from_slice(&c.next_volume.to_le_bytes());
    body.extend_from_slice(&(chunks.len() as u32).to_le_bytes());
    for chunk in &chunks {
        for e in chunk.0.iter() {
            body.extend_from_slice(&e.seg.to_le_bytes());
            body.extend_from_slice(&e.off.to_le_bytes());
            body.extend_from_slice(&e.seq.to_le_bytes());
        }
    }
    body.extend_from_slice(&(c.volumes.len() as u32).to_le_bytes());
    for (number, id, ro, idx) in &c.volumes {
        body.extend_from_slice(&number.to_le_bytes());
        body.push(u8::from(*ro));
        body.extend_from_slice(&idx.size.to_le_bytes());
        body.extend_from_slice(&(id.len() as u16).to_le_bytes());
        body.extend_from_slice(id.as_bytes());
        body.extend_from_slice(&(idx.chunks.len() as u32).to_le_bytes());
        for chunk in &idx.chunks {
            let r = chunk
                .as_ref()
                .and_then(|ch| chunk_ids.get(&Arc::as_ptr(ch)).copied())
                .unwrap_or(u32::MAX);
            body.extend_from_slice(&r.to_le_bytes());
        }
    }
    let header = CheckpointHeader {
        uid: *uid,
        ckpt_seg: x,
        next_seg: c.next_seg,
        body_len: (body.len() + crate::format::TAG_LEN) as u64,
    }
    .encode();
    cipher.seal_checkpoint(x, CHECKPOINT_NONCE_OFFSET, &header, &mut body);
    let mut out = Vec::with_capacity(CHECKPOINT_HEADER_LEN + body.len());
    out.extend_from_slice(&header);
    out.extend_from_slice(&body);
    out
}

struct Loaded {
    ckpt_seg: u64,
    captured: Captured,
}

fn decode_checkpoint(bytes: &[u8], uid: &[u8; 16], cipher: &Cipher) -> Result<Loaded> {
    let h = CheckpointHeader::decode(bytes)?;
    if &h.uid != uid {
        return Err(corrupt_meta("checkpoint", "belongs to another family"));
    }
    let mut body = bytes[CHECKPOINT_HEADER_LEN..].to_vec();
    let n = cipher.open_checkpoint(
        h.ckpt_seg,
        CHECKPOINT_NONCE_OFFSET,
        &bytes[..CHECKPOINT_HEADER_LEN],
        &mut body,
    )?;
    let mut c = Cursor::new(&body[..n]);
    let next_seq = c.u64()?;
    let next_volume = c.u64()?;
    let chunk_count = c.u32()? as usize;
    if chunk_count.saturating_mul(CHUNK_BLOCKS * 16) > c.remaining() {
        return Err(corrupt_meta(
            "checkpoint",
            "chunk table longer than the file",
        ));
    }
    let mut chunks = Vec::with_capacity(chunk_count);
    for _ in 0..chunk_count {
        let mut chunk = Chunk([Entry::default(); CHUNK_BLOCKS]);
        for e in chunk.0.iter_mut() {
            *e = Entry {
                seg: c.u32()?,
                off: c.u32()?,
                seq: c.u64()?,
            };
            if e.seq >= next_seq || e.seg as u64 >= h.next_seg {
                return Err(corrupt_meta("checkpoint", "entry beyond the log"));
            }
        }
        chunks.push(Arc::new(chunk));
    }
    let vol_count = c.u32()?;
    let mut volumes = Vec::new();
    let mut seen_ids = std::collections::HashSet::new();
    let mut seen_numbers = std::collections::HashSet::new();
    for _ in 0..vol_count {
        let number = c.u64()?;
        let flags = c.u8()?;
        let size = c.u64()?;
        let id_len = c.u16()? as usize;
        let id = std::str::from_utf8(c.take(id_len)?)
            .map_err(|_| corrupt_meta("checkpoint", "volume id is not UTF-8"))?
            .to_string();
        check_name(&id).map_err(|_| corrupt_meta("checkpoint", "invalid volume id"))?;
        check_size(size).map_err(|_| corrupt_meta("checkpoint", "invalid volume size"))?;
        if flags > 1 || number == 0 || number >= next_volume {
            return Err(corrupt_meta("checkpoint", "invalid volume flags or number"));
        }
        if !seen_ids.insert(id.clone()) || !seen_numbers.insert(number) {
            return Err(corrupt_meta("checkpoint", "duplicate volume"));
        }
        let slots = c.u32()? as usize;
        if slots != chunks_for(size) {
            return Err(corrupt_meta("checkpoint", "index does not match the size"));
        }
        let mut idx = VolIndex::new(size);
        for slot in idx.chunks.iter_mut() {
            let r = c.u32()?;
            if r != u32::MAX {
                let chunk = chunks
                    .get(r as usize)
                    .ok_or_else(|| corrupt_meta("checkpoint", "unknown chunk"))?;
                *slot = Some(chunk.clone());
            }
        }
        volumes.push((number, id, flags == 1, idx));
    }
    if c.remaining() != 0 {
        return Err(corrupt_meta("checkpoint", "trailing bytes"));
    }
    Ok(Loaded {
        ckpt_seg: h.ckpt_seg,
        captured: Captured {
            next_seq,
            next_seg: h.next_seg,
            next_volume,
            volumes,
        },
    })
}
