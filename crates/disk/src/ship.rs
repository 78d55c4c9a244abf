//! Shipping a family's log to shared storage (docs/DISK_FORMAT.md, "Shipping"), so that
//! another process — another kagi node — can open the family when this one is gone.
//!
//! The store stays a local log; what it made durable locally it also copies, before it
//! acknowledges it, as immutable objects created with "create only if absent": the family
//! header once, each segment's header when the segment is created (before any nonce of it is
//! used: a segment number is claimed in shared storage, so two writers can never both use
//! one), the bytes of a segment each flush made durable, and each checkpoint. A second writer
//! therefore fails on its first conflicting object instead of writing over the first one.
//! [`crate::DiskStore::fetch_family`] numbers a takeover (so every older copy is stale and
//! refuses to open), fences the previous writer off (empty objects at every name it could
//! create next) and rebuilds the family's directory from the objects.

use std::sync::Arc;

/// One object of a family in shared storage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LogObject {
    /// The family header (`family`).
    Header,
    /// The checkpoint whose replay starts at this segment.
    Checkpoint(u64),
    /// The `n`th takeover of the family (empty): a copy made before it is stale.
    Takeover(u64),
    /// Bytes of a segment from `start` (whole records; the first piece starts at 0 with the
    /// segment header).
    Piece {
        /// The segment.
        segment: u64,
        /// The offset of the piece's first byte in the segment.
        start: u64,
    },
}

impl LogObject {
    /// Its object name in shared storage (docs/DISK_FORMAT.md, "Shipping"): `family`,
    /// `checkpoint-{x}`, `piece-{segment}-{start}` (numbers as 16 lower-case hex digits, so
    /// that names sort as the objects do).
    pub fn name(self) -> String {
        match self {
            LogObject::Header => "family".into(),
            LogObject::Checkpoint(x) => format!("checkpoint-{x:016x}"),
            LogObject::Takeover(n) => format!("takeover-{n:016x}"),
            LogObject::Piece { segment, start } => format!("piece-{segment:016x}-{start:016x}"),
        }
    }

    /// The object a name names (`None` for any other name: not the family's).
    pub fn parse(name: &str) -> Option<LogObject> {
        if name == "family" {
            return Some(LogObject::Header);
        }
        if let Some(x) = name.strip_prefix("checkpoint-") {
            return hex16(x).map(LogObject::Checkpoint);
        }
        if let Some(n) = name.strip_prefix("takeover-") {
            return hex16(n).map(LogObject::Takeover);
        }
        let (segment, start) = name.strip_prefix("piece-")?.split_once('-')?;
        Some(LogObject::Piece {
            segment: hex16(segment)?,
            start: hex16(start)?,
        })
    }
}

/// 16 lower-case hex digits.
fn hex16(s: &str) -> Option<u64> {
    (s.len() == 16 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
        .then(|| u64::from_str_radix(s, 16).ok())
        .flatten()
}

/// Shared storage for one family's objects (an S3 prefix, say). Blocking calls: the store
/// calls them from the threads that write the family.
pub trait LogShip: Send + Sync + std::fmt::Debug {
    /// Creates `object` with `bytes`, only if it does not exist: an error of kind
    /// `AlreadyExists` if it does.
    fn put_new(&self, object: LogObject, bytes: &[u8]) -> std::io::Result<()>;

    /// Every object of the family, with its length.
    fn list(&self) -> std::io::Result<Vec<(LogObject, u64)>>;

    /// The bytes of `object`.
    fn get(&self, object: LogObject) -> std::io::Result<Vec<u8>>;

    /// Deletes objects (absent ones are no error).
    fn delete(&self, objects: &[LogObject]) -> std::io::Result<()>;
}

/// The checkpoints in a listing of a family's objects (an empty one is a fence, not a
/// checkpoint: see `crate::DiskStore::fetch_family`).
pub(crate) fn checkpoints(listing: &[(LogObject, u64)]) -> impl Iterator<Item = u64> + '_ {
    listing.iter().filter_map(|(o, len)| match o {
        LogObject::Checkpoint(x) if *len > 0 => Some(*x),
        _ => None,
    })
}

/// The newest takeover in a listing (0: none).
pub(crate) fn epoch(listing: &[(LogObject, u64)]) -> u64 {
    listing
        .iter()
        .filter_map(|(o, _)| match o {
            LogObject::Takeover(n) => Some(*n),
            _ => None,
        })
        .max()
        .unwrap_or(0)
}

/// Makes the [`LogShip`] of a family, by family id.
pub type ShipFactory = Arc<dyn Fn(&str) -> Arc<dyn LogShip> + Send + Sync>;

/// What the family shipped of a segment: the pieces' starts and where the next one starts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Shipped {
    pub(crate) starts: Vec<u64>,
    pub(crate) end: u64,
    /// An empty piece at `end`: a process that took the family over closed the segment, so
    /// its previous writer can ship nothing more to it (`crate::DiskStore::fetch_family`).
    pub(crate) fenced: bool,
}

/// The contiguous pieces of each segment in a listing (from offset 0; a piece after a gap is
/// ignored: its bytes could not be replayed in order).
pub(crate) fn shipped_segments(
    listing: &[(LogObject, u64)],
) -> std::collections::BTreeMap<u64, Shipped> {
    let mut pieces: std::collections::BTreeMap<u64, Vec<(u64, u64)>> = Default::default();
    for (o, len) in listing {
        if let LogObject::Piece { segment, start } = o {
            pieces.entry(*segment).or_default().push((*start, *len));
        }
    }
    pieces
        .into_iter()
        .map(|(no, mut ps)| {
            ps.sort_unstable();
            let mut s = Shipped::default();
            for (start, len) in ps {
                if start != s.end || s.fenced {
                    break;
                }
                s.starts.push(start);
                s.end = start + len;
                s.fenced = len == 0;
            }
            (no, s)
        })
        .collect()
}

#[cfg(test)]
pub(crate) mod testing {
    //! A [`LogShip`] in a directory, for tests; can be told to fail.

    use super::*;
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[derive(Debug)]
    pub(crate) struct DirShip {
        pub(crate) dir: PathBuf,
        pub(crate) fail: AtomicBool,
    }

    impl DirShip {
        pub(crate) fn new(dir: PathBuf) -> Arc<DirShip> {
            std::fs::create_dir_all(&dir).unwrap();
            Arc::new(DirShip {
                dir,
                fail: AtomicBool::new(false),
            })
        }

        fn check(&self) -> std::io::Result<()> {
            if self.fail.load(Ordering::SeqCst) {
                return Err(std::io::Error::other("shared storage unreachable"));
            }
            Ok(())
        }
    }

    impl LogShip for DirShip {
        fn put_new(&self, object: LogObject, bytes: &[u8]) -> std::io::Result<()> {
            self.check()?;
            let path = self.dir.join(object.name());
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(path)?;
            std::io::Write::write_all(&mut f, bytes)
        }

        fn list(&self) -> std::io::Result<Vec<(LogObject, u64)>> {
            self.check()?;
            let mut out = Vec::new();
            for e in std::fs::read_dir(&self.dir)? {
                let e = e?;
                if let Some(o) = e.file_name().to_str().and_then(LogObject::parse) {
                    out.push((o, e.metadata()?.len()));
                }
            }
            Ok(out)
        }

        fn get(&self, object: LogObject) -> std::io::Result<Vec<u8>> {
            self.check()?;
            std::fs::read(self.dir.join(object.name()))
        }

        fn delete(&self, objects: &[LogObject]) -> std::io::Result<()> {
            self.check()?;
            for o in objects {
                match std::fs::remove_file(self.dir.join(o.name())) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                    _ => {}
                }
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_names_round_trip_and_nothing_else_parses() {
        for o in [
            LogObject::Header,
            LogObject::Checkpoint(7),
            LogObject::Piece {
                segment: 3,
                start: u64::MAX,
            },
        ] {
            assert_eq!(LogObject::parse(&o.name()), Some(o));
        }
        assert_eq!(
            LogObject::Checkpoint(255).name(),
            "checkpoint-00000000000000ff"
        );
        for bad in [
            "familyx",
            "checkpoint-ff",
            "checkpoint-00000000000000FF",
            "piece-1-2",
            "x",
        ] {
            assert_eq!(LogObject::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn pieces_count_from_the_start_and_stop_at_a_gap() {
        let p = |segment, start| LogObject::Piece { segment, start };
        let listing = vec![
            (p(3, 64), 100),
            (p(3, 0), 64),
            (p(3, 400), 10), // after a gap: not replayable
            (p(4, 0), 64),
            (LogObject::Header, 136),
            (LogObject::Checkpoint(3), 500),
        ];
        let s = shipped_segments(&listing);
        assert_eq!(
            s[&3],
            Shipped {
                starts: vec![0, 64],
                end: 164,
                fenced: false
            }
        );
        assert_eq!(
            s[&4],
            Shipped {
                starts: vec![0],
                end: 64,
                fenced: false
            }
        );
        assert_eq!(s.len(), 2);
        let fenced = vec![(p(5, 0), 64), (p(5, 64), 0), (p(5, 65), 9)];
        assert_eq!(
            shipped_segments(&fenced)[&5],
            Shipped {
                starts: vec![0, 64],
                end: 64,
                fenced: true
            }
        );
    }

    /// Two stores (two processes' data directories) on one shared storage.
    fn two_stores() -> (
        tempfile::TempDir,
        crate::DiskStore,
        crate::DiskStore,
        Arc<testing::DirShip>,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let shared = testing::DirShip::new(dir.path().join("shared"));
        let factory = |ship: Arc<testing::DirShip>| -> ShipFactory {
            Arc::new(move |_id: &str| ship.clone() as Arc<dyn LogShip>)
        };
        let a =
            crate::DiskStore::open_shipped(dir.path().join("a"), factory(shared.clone())).unwrap();
        let b =
            crate::DiskStore::open_shipped(dir.path().join("b"), factory(shared.clone())).unwrap();
        (dir, a, b, shared)
    }

    fn keys() -> crate::FamilyKeys {
        crate::FamilyKeys::new(zeroize::Zeroizing::new([7u8; 32]))
    }

    fn data(seed: u8, len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect()
    }

    #[test]
    fn what_a_flush_acknowledged_is_served_by_the_process_that_takes_the_family_over() {
        let (_d, a, b, shared) = two_stores();
        let fam = a.create_family("f1", keys(), false).unwrap();
        let vol = fam.create_volume("disk", 16 << 20).unwrap();
        vol.write(0, &data(1, 1 << 20), false).unwrap();
        vol.flush().unwrap();
        fam.snapshot("disk", "snap").unwrap();
        vol.write(1 << 20, &data(2, 8192), true).unwrap(); // FUA
        // Not flushed: never acknowledged as durable, so it may be lost; never half of it.
        vol.write(2 << 20, &data(3, 4096), false).unwrap();
        // Process A is gone without closing (its handles leak: no checkpoint at close).
        std::mem::forget(vol);
        std::mem::forget(fam);
        // The objects are ciphertext: no plaintext block in shared storage.
        let needle = data(1, 1 << 20)[4096..4160].to_vec();
        for e in std::fs::read_dir(&shared.dir).unwrap() {
            let bytes = std::fs::read(e.unwrap().path()).unwrap();
            assert!(!bytes.windows(64).any(|w| w == needle.as_slice()));
        }
        b.fetch_family("f1").unwrap();
        let fam_b = b.open_family("f1", keys()).unwrap();
        let vol_b = fam_b.volume("disk").unwrap();
        assert_eq!(vol_b.read_vec(0, 1 << 20).unwrap(), data(1, 1 << 20));
        assert_eq!(vol_b.read_vec(1 << 20, 8192).unwrap(), data(2, 8192));
        let unflushed = vol_b.read_vec(2 << 20, 4096).unwrap();
        assert!(unflushed == data(3, 4096) || unflushed == vec![0; 4096]);
        let snap = fam_b.volume("snap").unwrap();
        assert_eq!(snap.read_vec(0, 1 << 20).unwrap(), data(1, 1 << 20));
        // B writes on; a third process would see B's writes.
        vol_b.write(4 << 20, &data(4, 4096), true).unwrap();
        drop(vol_b);
        drop(snap);
        drop(fam_b);
        a.fetch_family("f1").unwrap_err(); // A still has its copy open (leaked): refused
    }

    #[test]
    fn the_previous_writer_cannot_acknowledge_anything_after_a_takeover() {
        let (_d, a, b, _shared) = two_stores();
        let fam = a.create_family("f2", keys(), false).unwrap();
        let vol = fam.create_volume("disk", 16 << 20).unwrap();
        vol.write(0, &data(5, 65536), true).unwrap();
        // B takes over while A still runs (A was thought gone: a partition, a pause).
        b.fetch_family("f2").unwrap();
        let fam_b = b.open_family("f2", keys()).unwrap();
        // A's next acknowledgement needs shared storage, which refuses it: the write may have
        // reached A's own disk, but it fails, so nothing acknowledged is missing from B.
        vol.write(65536, &data(6, 4096), false).unwrap();
        assert!(matches!(vol.flush(), Err(crate::DiskError::Busy)));
        assert!(vol.write(0, &data(7, 4096), true).is_err());
        let vol_b = fam_b.volume("disk").unwrap();
        assert_eq!(vol_b.read_vec(0, 65536).unwrap(), data(5, 65536));
        vol_b.write(0, &data(8, 4096), true).unwrap();
    }

    #[test]
    fn the_previous_writer_cannot_start_a_segment_after_a_takeover() {
        let (_d, a, b, _shared) = two_stores();
        let fam = a.create_family("f5", keys(), false).unwrap();
        let vol = fam.create_volume("disk", 16 << 20).unwrap();
        vol.write(0, &data(5, 65536), true).unwrap();
        // Everything A wrote is shipped; B fetches the family (and has not opened it yet).
        b.fetch_family("f5").unwrap();
        // A snapshot needs a checkpoint, which starts a new segment: refused, so A never
        // acknowledges a snapshot that B would not have.
        assert!(fam.snapshot("disk", "snap").is_err());
        let fam_b = b.open_family("f5", keys()).unwrap();
        assert!(fam_b.volume("snap").is_err());
        // B's own segments and checkpoints go on.
        fam_b.snapshot("disk", "snap-b").unwrap();
        drop(fam_b);
        drop((vol, fam));
        let c = tempfile::tempdir().unwrap();
        let shared = _shared.clone();
        let c = crate::DiskStore::open_shipped(
            c.path().join("c"),
            Arc::new(move |_id: &str| shared.clone() as Arc<dyn LogShip>),
        )
        .unwrap();
        c.fetch_family("f5").unwrap();
        let fam_c = c.open_family("f5", keys()).unwrap();
        assert_eq!(
            fam_c.volume("snap-b").unwrap().read_vec(0, 65536).unwrap(),
            data(5, 65536)
        );
    }

    #[test]
    fn a_flush_that_cannot_reach_shared_storage_fails_and_stops_the_family() {
        let (_d, a, _b, shared) = two_stores();
        let fam = a.create_family("f3", keys(), false).unwrap();
        let vol = fam.create_volume("disk", 4 << 20).unwrap();
        vol.write(0, &data(9, 4096), false).unwrap();
        shared.fail.store(true, std::sync::atomic::Ordering::SeqCst);
        assert!(vol.flush().is_err());
        shared
            .fail
            .store(false, std::sync::atomic::Ordering::SeqCst);
        // As after a failed fsync: refused until reopened.
        assert!(matches!(
            vol.write(0, &data(9, 4096), true),
            Err(crate::DiskError::Failed)
        ));
    }

    #[test]
    fn compaction_deletes_the_shipped_pieces_of_the_segments_it_deletes() {
        let (_d, a, b, shared) = two_stores();
        let fam = a.create_family("f4", keys(), false).unwrap();
        let vol = fam.create_volume("disk", 64 << 20).unwrap();
        for round in 0..3u8 {
            vol.write(0, &data(round, 4 << 20), false).unwrap();
            fam.checkpoint().unwrap();
        }
        let before = shared.list().unwrap().len();
        let report = fam.gc(0.5).unwrap();
        assert!(report.segments_deleted > 0, "{report:?}");
        let after = shared.list().unwrap();
        assert!(after.len() < before, "{before} -> {}", after.len());
        assert_eq!(
            after
                .iter()
                .filter(|(o, _)| matches!(o, LogObject::Checkpoint(_)))
                .count(),
            1
        );
        drop(vol);
        drop(fam);
        b.fetch_family("f4").unwrap();
        let fam_b = b.open_family("f4", keys()).unwrap();
        assert_eq!(
            fam_b.volume("disk").unwrap().read_vec(0, 4 << 20).unwrap(),
            data(2, 4 << 20)
        );
        drop(fam_b);
        // Deleting the family deletes its objects too.
        b.delete_family("f4").unwrap();
        assert!(shared.list().unwrap().is_empty());
    }
}

/// The interleavings of an old writer and a takeover that an independent review found
/// (each lost an acknowledged change or locked a family out before the fixes).
#[cfg(test)]
mod takeover_races {
    use super::*;
    use std::sync::Mutex;

    type Hook = Box<dyn FnOnce() + Send>;

    /// Shared storage whose next put of a checkpoint first runs a hook (another process's
    /// takeover, at the worst moment).
    struct Hooked {
        inner: Arc<testing::DirShip>,
        hook: Arc<Mutex<Option<Hook>>>,
    }

    impl std::fmt::Debug for Hooked {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("Hooked")
        }
    }

    impl LogShip for Hooked {
        fn put_new(&self, object: LogObject, bytes: &[u8]) -> std::io::Result<()> {
            if matches!(object, LogObject::Checkpoint(_)) && !bytes.is_empty() {
                let hook = self.hook.lock().unwrap().take();
                if let Some(hook) = hook {
                    hook();
                }
            }
            self.inner.put_new(object, bytes)
        }
        fn list(&self) -> std::io::Result<Vec<(LogObject, u64)>> {
            self.inner.list()
        }
        fn get(&self, object: LogObject) -> std::io::Result<Vec<u8>> {
            self.inner.get(object)
        }
        fn delete(&self, objects: &[LogObject]) -> std::io::Result<()> {
            self.inner.delete(objects)
        }
    }

    fn keys() -> crate::FamilyKeys {
        crate::FamilyKeys::new(zeroize::Zeroizing::new([7u8; 32]))
    }

    fn store(dir: &std::path::Path, ship: Arc<dyn LogShip>) -> crate::DiskStore {
        crate::DiskStore::open_shipped(dir, Arc::new(move |_id: &str| ship.clone())).unwrap()
    }

    /// Two processes' stores (`a`, `b`) on one shared storage, in a temporary directory.
    fn two_stores() -> (
        tempfile::TempDir,
        Arc<testing::DirShip>,
        crate::DiskStore,
        crate::DiskStore,
    ) {
        let d = tempfile::tempdir().unwrap();
        let shared = testing::DirShip::new(d.path().join("shared"));
        let a = store(&d.path().join("a"), shared.clone());
        let b = store(&d.path().join("b"), shared.clone());
        (d, shared, a, b)
    }

    #[test]
    fn a_checkpoint_racing_the_fence_is_refused_not_lost() {
        let d = tempfile::tempdir().unwrap();
        let shared = testing::DirShip::new(d.path().join("shared"));
        let hook: Arc<Mutex<Option<Hook>>> = Arc::new(Mutex::new(None));
        let hooked = Hooked {
            inner: shared.clone(),
            hook: hook.clone(),
        };
        let a = store(&d.path().join("a"), Arc::new(hooked));
        let b = Arc::new(store(&d.path().join("b"), shared.clone()));
        let fam = a.create_family("f", keys(), false).unwrap();
        let vol = fam.create_volume("disk", 16 << 20).unwrap();
        vol.write(0, &[5u8; 65536], true).unwrap();
        // A's snapshot claims its checkpoint's segment, then B takes over, then A ships the
        // checkpoint: refused, so the snapshot is not acknowledged.
        let b2 = b.clone();
        *hook.lock().unwrap() = Some(Box::new(move || b2.fetch_family("f").unwrap()));
        let acked = fam.snapshot("disk", "snap");
        let fam_b = b.open_family("f", keys()).unwrap();
        assert!(acked.is_err(), "acknowledged after the fence");
        assert!(fam_b.volume("snap").is_err());
        drop(vol);
    }

    #[test]
    fn a_stale_copy_never_opens_again() {
        let (_d, _shared, a, b) = two_stores();
        let fam = a.create_family("f", keys(), false).unwrap();
        let vol = fam.create_volume("disk", 16 << 20).unwrap();
        vol.write(0, &[1u8; 4096], true).unwrap();
        drop((vol, fam));
        b.fetch_family("f").unwrap();
        {
            let fam_b = b.open_family("f", keys()).unwrap();
            let vol_b = fam_b.volume("disk").unwrap();
            vol_b.write(0, &[2u8; 4096], true).unwrap();
            fam_b.snapshot("disk", "snap-b").unwrap();
        }
        // A comes back: its copy is stale and refused; fetched anew, it has B's changes.
        assert!(matches!(
            a.open_family("f", keys()),
            Err(crate::DiskError::TakenOver)
        ));
        // B's own copy (fetched at the newest takeover) still opens.
        drop(b.open_family("f", keys()).unwrap());
        a.fetch_family("f").unwrap();
        let fam_a = a.open_family("f", keys()).unwrap();
        assert_eq!(
            fam_a.volume("disk").unwrap().read_vec(0, 4096).unwrap(),
            vec![2u8; 4096]
        );
        assert!(fam_a.volume("snap-b").is_ok());
        // And now B's copy is the stale one.
        assert!(matches!(
            b.open_family("f", keys()),
            Err(crate::DiskError::TakenOver)
        ));
    }

    #[test]
    fn a_burnt_segment_number_stops_the_family() {
        let (d, shared, a, b) = two_stores();
        let fam = a.create_family("f", keys(), false).unwrap();
        let vol = fam.create_volume("disk", 16 << 20).unwrap();
        vol.write(0, &[1u8; 4096], true).unwrap();
        let max = shipped_segments(&shared.list().unwrap())
            .keys()
            .next_back()
            .copied()
            .unwrap();
        // A local failure (ENOSPC, EIO; here a stray file) at the next segment number.
        let blocker = d
            .path()
            .join("a/f/segments")
            .join(format!("{:016x}", max + 1));
        std::fs::write(&blocker, b"x").unwrap();
        assert!(fam.snapshot("disk", "s1").is_err());
        std::fs::remove_file(&blocker).unwrap();
        b.fetch_family("f").unwrap();
        // Nothing more is acknowledged by A.
        assert!(fam.snapshot("disk", "s2").is_err());
        assert!(vol.write(4096, &[3u8; 4096], true).is_err());
        let fam_b = b.open_family("f", keys()).unwrap();
        assert!(fam_b.volume("s2").is_err());
    }

    fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            let t = to.join(e.file_name());
            if e.file_type().unwrap().is_dir() {
                copy_dir(&e.path(), &t)
            } else {
                std::fs::copy(e.path(), &t).unwrap();
            }
        }
    }

    #[test]
    fn a_home_fenced_by_an_abandoned_takeover_fetches_its_family_back() {
        let (d, shared, a, b) = two_stores();
        let fam = a.create_family("f", keys(), false).unwrap();
        let vol = fam.create_volume("disk", 16 << 20).unwrap();
        vol.write(0, &[1u8; 4096], true).unwrap();
        vol.write(4096, &[2u8; 4096], false).unwrap(); // not flushed: in A's file only
        // kill -9 of A: its directory as the kernel keeps it.
        copy_dir(&d.path().join("a/f"), &d.path().join("a2/f"));
        std::mem::forget(vol);
        std::mem::forget(fam);
        // B fences and fetches, then dies before it records itself as the home.
        b.fetch_family("f").unwrap();
        let a2 = store(&d.path().join("a2"), shared.clone());
        assert!(matches!(
            a2.open_family("f", keys()),
            Err(crate::DiskError::TakenOver)
        ));
        // The home (still recorded as such) fetches its family back: what it acknowledged is
        // there, and it writes on.
        a2.fetch_family("f").unwrap();
        let fam = a2.open_family("f", keys()).unwrap();
        let vol = fam.volume("disk").unwrap();
        assert_eq!(vol.read_vec(0, 4096).unwrap(), vec![1u8; 4096]);
        vol.write(8192, &[4u8; 4096], true).unwrap();
        fam.snapshot("disk", "after").unwrap();
    }
}
