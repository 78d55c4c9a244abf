//! Segment files: append-only logs of records, at most `SEGMENT_SIZE` (64 MiB) long, space reserved
//! ahead of the records in steps (so a full file system fails a reservation cleanly, before any
//! byte or nonce is used) and truncated to the records when sealed. Tracks the writes in flight so that a flush
//! covers every write reserved before it, and a sync never claims a record that an unfinished
//! earlier one could cut off at replay.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex};

use crate::error::Result;
use crate::format::{SEG_HEADER_LEN, encode_segment_header};
use crate::lock;

/// One segment file.
pub(crate) struct Segment {
    /// The segment number (also the file name, 16 hex digits).
    pub no: u64,
    pub file: File,
    path: PathBuf,
    state: Mutex<SegState>,
    cv: Condvar,
}

struct SegState {
    /// Start offsets of writes reserved but not finished (written and indexed).
    inflight: BTreeSet<u64>,
    /// End of the last reserved record (the valid length once nothing is in flight).
    end: u64,
    /// Everything below this is on stable storage.
    synced_to: u64,
    sealed: bool,
}

pub(crate) fn segment_path(dir: &Path, no: u64) -> PathBuf {
    dir.join(format!("{no:016x}"))
}

/// Parses a segment file name (16 lower-case hex digits).
pub(crate) fn parse_segment_name(name: &str) -> Option<u64> {
    if name.len() != 16 || !name.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    u64::from_str_radix(name, 16).ok().filter(|n| *n != 0)
}

impl Segment {
    /// Creates segment `no` durably: reserved, header written and synced, directory synced,
    /// before any record uses a nonce of it.
    pub(crate) fn create(
        dir: &Path,
        no: u64,
        uid: &[u8; 16],
        block_ct_len: usize,
    ) -> Result<Segment> {
        let path = segment_path(dir, no);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        let made = (|| -> Result<()> {
            file.write_all_at(&encode_segment_header(uid, no, block_ct_len), 0)?;
            file.sync_data()?;
            kagi_fs::sync_dir(dir)?;
            Ok(())
        })();
        if let Err(e) = made {
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        Ok(Segment::from_file(no, file, path, SEG_HEADER_LEN, false))
    }

    /// Wraps an existing file whose records end at `end`.
    pub(crate) fn from_file(no: u64, file: File, path: PathBuf, end: u64, sealed: bool) -> Segment {
        Segment {
            no,
            file,
            path,
            state: Mutex::new(SegState {
                inflight: BTreeSet::new(),
                end,
                synced_to: if sealed { end } else { 0 },
                sealed,
            }),
            cv: Condvar::new(),
        }
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Length of the records (the reserved end).
    pub(crate) fn end(&self) -> u64 {
        lock(&self.state).end
    }

    /// Registers a write reserved at `off..off+len` (called under the log lock, so reservation
    /// order and registration order agree).
    pub(crate) fn begin(&self, off: u64, len: u64) {
        let mut s = lock(&self.state);
        s.inflight.insert(off);
        s.end = s.end.max(off + len);
    }

    /// The write that started at `off` is finished (or abandoned).
    pub(crate) fn complete(&self, off: u64) {
        let mut s = lock(&self.state);
        s.inflight.remove(&off);
        self.cv.notify_all();
    }

    /// Waits until no write starting below `upto` is in flight.
    fn wait_below<'a>(
        &'a self,
        mut s: std::sync::MutexGuard<'a, SegState>,
        upto: u64,
    ) -> std::sync::MutexGuard<'a, SegState> {
        while s.inflight.first().is_some_and(|&o| o < upto) {
            s = self.cv.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        s
    }

    /// Makes every record below `upto` durable: waits for the earlier writes in flight (a
    /// torn one would cut the later ones off at replay), then fdatasync unless done already.
    pub(crate) fn sync_to(&self, upto: u64) -> Result<()> {
        let s = self.wait_below(lock(&self.state), upto);
        if s.synced_to >= upto {
            return Ok(());
        }
        let end = s.end;
        drop(s);
        self.file.sync_data()?;
        let mut s = lock(&self.state);
        // Everything reserved before the sync started and finished before it is covered; use
        // the smaller of the two bounds known to be complete.
        s.synced_to = s.synced_to.max(upto.min(end));
        Ok(())
    }

    /// Everything reserved so far, made durable.
    pub(crate) fn sync_all_reserved(&self) -> Result<()> {
        let end = self.end();
        self.sync_to(end)
    }

    /// Reserves file space up to `upto` (fallocate). `Ok(false)` where the file system has
    /// no fallocate: the file then grows as records are written.
    pub(crate) fn reserve_space(&self, from: u64, upto: u64) -> Result<bool> {
        match rustix::fs::fallocate(
            &self.file,
            rustix::fs::FallocateFlags::empty(),
            from,
            upto.saturating_sub(from),
        ) {
            Ok(()) => Ok(true),
            Err(e) if e == rustix::io::Errno::OPNOTSUPP => Ok(false),
            Err(e) => Err(std::io::Error::from(e).into()),
        }
    }

    /// Seals the segment: waits for its writes and truncates the reserved space to the
    /// records. Idempotent. Not a sync (flush and checkpoints sync). No cryptography: sealing
    /// uses no nonce.
    pub(crate) fn seal(&self) -> Result<()> {
        let mut s = self.wait_below(lock(&self.state), u64::MAX);
        if s.sealed {
            return Ok(());
        }
        self.file.set_len(s.end)?;
        s.sealed = true;
        Ok(())
    }

    /// Whether the segment is sealed and all of it is durable.
    pub(crate) fn is_durable(&self) -> bool {
        let s = lock(&self.state);
        s.sealed && s.synced_to >= s.end
    }

    #[cfg(test)]
    pub(crate) fn is_sealed(&self) -> bool {
        lock(&self.state).sealed
    }
}

impl std::fmt::Debug for Segment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Segment({})", self.no)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        let d = Path::new("/x");
        let p = segment_path(d, 0xab);
        let name = p.file_name().unwrap().to_str().unwrap();
        assert_eq!(parse_segment_name(name), Some(0xab));
        assert_eq!(parse_segment_name("0000000000000000"), None);
        assert_eq!(parse_segment_name("000000000000000G"), None);
        assert_eq!(parse_segment_name("00000000000000AB"), None);
        assert_eq!(parse_segment_name("ab.tmp"), None);
    }

    #[test]
    fn sync_waits_for_earlier_writes_and_seal_truncates() {
        let dir = tempfile::tempdir().unwrap();
        let s = std::sync::Arc::new(Segment::create(dir.path(), 1, &[7; 16], 4112).unwrap());
        s.begin(64, 100);
        s.begin(164, 100);
        s.complete(164);
        let s2 = s.clone();
        let t = std::thread::spawn(move || s2.sync_to(264).unwrap());
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(!t.is_finished(), "sync must wait for the earlier write");
        s.complete(64);
        t.join().unwrap();
        s.seal().unwrap();
        assert!(s.is_sealed() && s.is_durable());
        assert_eq!(std::fs::metadata(s.path()).unwrap().len(), 264);
    }
}
