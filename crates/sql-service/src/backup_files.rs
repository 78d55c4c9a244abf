//! The files of SQL backups (docs/SQL.md, "Backups and point-in-time restore"), below the
//! service's records: a database's write-ahead log copied as ciphertext, full backups through
//! SQLite's backup API, and a database put back together from them. Everything here blocks;
//! the service calls it from `spawn_blocking`.
//!
//! Nothing here holds plaintext outside SQLite's page cache: a log backup is the WAL's bytes as
//! the encrypting VFS wrote them (frames sealed under the database's DEK, bound to its id and to
//! their offset in the WAL, checksums masked), a full backup is sealed under the same DEK and
//! id, and a restore replays them in a private directory under that DEK.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use kagi_sqlite_crypt::DatabaseKey;
use rusqlite::Connection;

use crate::backup_chain::{Cursor, Step, WalGen, next_step};

/// Length of the WAL header.
pub(crate) const WAL_HEADER_LEN: u64 = 32;
/// Length of a frame's header in the WAL.
const FRAME_HEADER_LEN: u64 = 24;
/// The first bytes of a log backup file (its format version last).
const LOG_MAGIC: [u8; 16] = *b"kagi-sql-log\0\0\0\x01";
/// Length of a log backup file's header: the magic, the WAL header as found, the first frame
/// and the number of frames (big-endian), eight zero bytes.
pub(crate) const LOG_HEADER_LEN: u64 = 64;
/// How long a pass waits for the database's write lock (sessions' writes come first).
pub(crate) const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);
/// Frames copied per read.
const CHUNK_FRAMES: u64 = 64;

/// What can go wrong with backup files.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FileError {
    /// A file system error.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The encrypting engine refused.
    #[error(transparent)]
    Engine(#[from] kagi_sqlite_crypt::Error),
    /// SQLite failed.
    #[error("SQLite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// Sessions held the write lock for longer than a pass waits.
    #[error("the database stayed busy")]
    Busy,
    /// A log or a backup is not what it should be.
    #[error("{0}")]
    Damaged(String),
}

/// Wraps an I/O error with the path it happened on.
pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> FileError + '_ {
    move |source| FileError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// The WAL header of a generation, as SQLite wrote it (in the clear: magic, version, page size,
/// checkpoint sequence, salts and its own checksum carry no data).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct WalHeader([u8; WAL_HEADER_LEN as usize]);

impl WalHeader {
    /// The header if it is one SQLite writes.
    pub(crate) fn parse(raw: [u8; WAL_HEADER_LEN as usize]) -> Option<Self> {
        let magic = be32(&raw, 0);
        let page = be32(&raw, 8);
        let ok = magic & !1 == 0x377f_0682
            && be32(&raw, 4) == 3_007_000
            && page.is_power_of_two()
            && (512..=65_536).contains(&page);
        ok.then_some(Self(raw))
    }

    /// The header's bytes.
    pub(crate) fn bytes(&self) -> &[u8; WAL_HEADER_LEN as usize] {
        &self.0
    }

    /// Its generation.
    pub(crate) fn generation(&self) -> WalGen {
        WalGen {
            salt1: be32(&self.0, 16),
            salt2: be32(&self.0, 20),
            checkpoint_seq: be32(&self.0, 12),
        }
    }

    pub(crate) fn frame_len(&self) -> u64 {
        FRAME_HEADER_LEN + u64::from(be32(&self.0, 8))
    }

    /// Where frame `n` (from 1) starts in the WAL.
    pub(crate) fn frame_offset(&self, n: u32) -> u64 {
        WAL_HEADER_LEN + u64::from(n.saturating_sub(1)) * self.frame_len()
    }

    /// Whether a frame header belongs to this generation.
    fn owns(&self, frame_header: &[u8]) -> bool {
        frame_header[8..16] == self.0[16..24]
    }
}

/// Where a database's log stands, read under its write lock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct WalState {
    /// The header of the current generation (`None` when the log has no frames).
    pub(crate) header: Option<WalHeader>,
    /// Committed frames in the log (SQLite's `mxFrame`).
    pub(crate) frames: u32,
    /// Frames already checkpointed into the main file (`nBackfill`).
    pub(crate) backfilled: u32,
}

impl WalState {
    /// The generation of its frames.
    pub(crate) fn generation(&self) -> Option<WalGen> {
        self.header.map(|h| h.generation())
    }
}

/// The WAL of database file `db`.
pub(crate) fn wal_of(db: &Path) -> PathBuf {
    let mut p = db.as_os_str().to_owned();
    p.push("-wal");
    PathBuf::from(p)
}

/// `PRAGMA wal_checkpoint(mode)`: (busy, frames in the log, frames checkpointed).
pub(crate) fn checkpoint(conn: &Connection, mode: &str) -> Result<(bool, u32, u32), FileError> {
    let (busy, log, done): (i64, i64, i64) =
        conn.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })?;
    // A checkpoint that could not run (the log's index being rebuilt or restarted by another
    // connection) answers busy with no counts: not a log that is missing.
    if busy != 0 && log < 0 {
        return Err(FileError::Busy);
    }
    let count = |n: i64| {
        u32::try_from(n).map_err(|_| FileError::Damaged("the database is not in WAL mode".into()))
    };
    Ok((busy != 0, count(log)?, count(done)?))
}

pub(crate) fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _)
        if matches!(f.code, rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked))
}

/// A read snapshot held on a database between backup passes, at the end of what its backups
/// hold. No checkpoint can then pass a frame no backup holds (a session's `PRAGMA wal_checkpoint`
/// included): a snapshot in the log bounds every checkpoint at its frame (and keeps the log from
/// restarting); one taken when every frame was checkpointed reads the main file only, which
/// keeps any checkpoint from starting while letting the log restart.
pub(crate) struct Pin {
    _snapshot: Connection,
}

/// The connections of one backup pass over a database: `writer` takes the write lock while the
/// log is looked at, `pin` holds a read snapshot at the end of what is copied (see [`Pin`]),
/// `probe` reads where the log stands and checkpoints.
pub(crate) struct Pass {
    db: PathBuf,
    writer: Connection,
    pin: Connection,
    probe: Connection,
    locked: bool,
    pinned: bool,
}

impl Pass {
    /// Opens the pass's connections to the database file `db` (which must exist: a dropped
    /// database's file is never created again).
    pub(crate) fn open(db: &Path, key: &DatabaseKey) -> Result<Self, FileError> {
        let writer = crate::engine::open_existing_blocking(db, key)?;
        writer.busy_timeout(LOCK_WAIT)?;
        Ok(Self {
            db: db.to_path_buf(),
            writer,
            pin: crate::engine::open_existing_blocking(db, key)?,
            probe: crate::engine::open_existing_blocking(db, key)?,
            locked: false,
            pinned: false,
        })
    }

    /// Takes the write lock (no commit can happen until [`Pass::unlock`]) and reads where the
    /// log stands; with `pin`, also moves the pinned snapshot to its end.
    pub(crate) fn lock(&mut self, pin: bool) -> Result<WalState, FileError> {
        match self.writer.execute_batch("BEGIN IMMEDIATE") {
            Err(e) if is_busy(&e) => return Err(FileError::Busy),
            r => r?,
        }
        self.locked = true;
        self.observe(pin)
    }

    /// Reads where the log stands, and with `pin` moves the pinned snapshot to its end, while
    /// the write lock is held (by this pass, or by another connection: the geo-replication
    /// catches up under a backup pass's lock).
    pub(crate) fn observe(&mut self, pin: bool) -> Result<WalState, FileError> {
        // NOOP reads SQLite's wal-index without checkpointing anything.
        let (_, frames, backfilled) = checkpoint(&self.probe, "NOOP")?;
        if pin {
            self.pin_now()?;
        }
        let header = if frames == 0 {
            None
        } else {
            Some(self.read_header()?)
        };
        Ok(WalState {
            header,
            frames,
            backfilled,
        })
    }

    /// Pins a read snapshot at the log's end now (the write lock held: the end is what was
    /// just looked at).
    pub(crate) fn pin_now(&mut self) -> Result<(), FileError> {
        self.unpin()?;
        self.pin.execute_batch("BEGIN")?;
        self.pin
            .query_row("SELECT count(*) FROM sqlite_schema", [], |_| Ok(()))?;
        self.pinned = true;
        Ok(())
    }

    fn read_header(&self) -> Result<WalHeader, FileError> {
        let wal = wal_of(&self.db);
        let mut raw = [0u8; WAL_HEADER_LEN as usize];
        File::open(&wal)
            .and_then(|f| f.read_exact_at(&mut raw, 0))
            .map_err(io(&wal))?;
        WalHeader::parse(raw)
            .ok_or_else(|| FileError::Damaged("the WAL header is not SQLite's".into()))
    }

    /// Lets writers go on.
    pub(crate) fn unlock(&mut self) -> Result<(), FileError> {
        if self.locked {
            self.writer.execute_batch("ROLLBACK")?;
            self.locked = false;
        }
        Ok(())
    }

    /// Ends the pinned snapshot.
    pub(crate) fn unpin(&mut self) -> Result<(), FileError> {
        if self.pinned {
            self.pin.execute_batch("ROLLBACK")?;
            self.pinned = false;
        }
        Ok(())
    }

    /// A passive checkpoint (never waits, never past a pinned snapshot): (frames in the log,
    /// frames checkpointed).
    pub(crate) fn checkpoint(&self) -> Result<(u32, u32), FileError> {
        checkpoint(&self.probe, "PASSIVE").map(|(_, log, done)| (log, done))
    }

    /// The pinned snapshot, to hold until the next pass.
    pub(crate) fn keep(self) -> Option<Pin> {
        self.pinned.then_some(Pin {
            _snapshot: self.pin,
        })
    }

    /// Copies frames `first..=last` of the log (generation `header`) into a new log backup file
    /// `dest`, synced. The frames must be stable: under the write lock, or below the pinned
    /// snapshot. Returns the file's size.
    pub(crate) fn write_log(
        &self,
        header: &WalHeader,
        first: u32,
        last: u32,
        dest: &Path,
    ) -> Result<u64, FileError> {
        let mut out = new_file(dest)?;
        copy_log(&self.db, header, (first, last), (&mut out, dest))?;
        let (count, frame) = (u64::from(last + 1 - first), header.frame_len());
        out.sync_all().map_err(io(dest))?;
        Ok(LOG_HEADER_LEN + count * frame)
    }

    /// A full backup of the pinned snapshot into `dest` under `key` (the database's own DEK
    /// and id), synced. Returns its size.
    pub(crate) fn write_full(&self, dest: &Path, key: &DatabaseKey) -> Result<u64, FileError> {
        if !self.pinned {
            return Err(FileError::Damaged(
                "a full backup needs a pinned snapshot".into(),
            ));
        }
        kagi_sqlite_crypt::backup(&self.pin, dest, key)?;
        let f = File::open(dest).map_err(io(dest))?;
        f.sync_all().map_err(io(dest))?;
        Ok(f.metadata().map_err(io(dest))?.len())
    }
}

/// Writes frames `first..=last` of the log of database file `db` (generation `header`) in the
/// format of a log backup file to `out` (named `dest` in errors). The frames must be stable (under the write lock,
/// below a pinned snapshot, or committed and not yet checkpointed); a frame of another
/// generation (the log restarted meanwhile) or a last frame that is not a commit is an error.
pub(crate) fn copy_log(
    db: &Path,
    header: &WalHeader,
    (first, last): (u32, u32),
    (out, dest): (&mut impl Write, &Path),
) -> Result<(), FileError> {
    if first == 0 || last < first {
        return Err(FileError::Damaged(format!("no frames {first} to {last}")));
    }
    let wal = wal_of(db);
    let src = File::open(&wal).map_err(io(&wal))?;
    let count = u64::from(last + 1 - first);
    let frame = header.frame_len();
    let mut head = Vec::with_capacity(LOG_HEADER_LEN as usize);
    head.extend_from_slice(&LOG_MAGIC);
    head.extend_from_slice(&header.0);
    head.extend_from_slice(&first.to_be_bytes());
    head.extend_from_slice(&(last + 1 - first).to_be_bytes());
    head.resize(LOG_HEADER_LEN as usize, 0);
    out.write_all(&head).map_err(io(dest))?;
    let mut buf = vec![0u8; (CHUNK_FRAMES.min(count) * frame) as usize];
    let mut done = 0u64;
    let mut last_header = [0u8; FRAME_HEADER_LEN as usize];
    while done < count {
        let n = (count - done).min(CHUNK_FRAMES);
        let bytes = &mut buf[..(n * frame) as usize];
        let at = header.frame_offset(first) + done * frame;
        src.read_exact_at(bytes, at)
            .map_err(|e| FileError::Damaged(format!("the log ends before frame {last}: {e}")))?;
        for f in bytes.chunks_exact(frame as usize) {
            if !header.owns(f) {
                return Err(FileError::Damaged(
                    "a frame of the log belongs to another generation".into(),
                ));
            }
            last_header.copy_from_slice(&f[..FRAME_HEADER_LEN as usize]);
        }
        out.write_all(bytes).map_err(io(dest))?;
        done += n;
    }
    // The copy ends at a commit (a frame with the database size in it).
    if be32(&last_header, 4) == 0 {
        return Err(FileError::Damaged(format!(
            "frame {last} of the log is not a commit"
        )));
    }
    Ok(())
}

/// Where the log of database file `db` ends now, read through `probe` (a connection to it):
/// its generation's header and its last committed frame, or `None` when it has no frames.
/// The header is read on both sides of the frame count, so that both are of one generation.
pub(crate) fn log_end(
    db: &Path,
    probe: &Connection,
) -> Result<Option<(WalHeader, u32)>, FileError> {
    let wal = wal_of(db);
    let header = || -> Result<Option<WalHeader>, FileError> {
        let mut raw = [0u8; WAL_HEADER_LEN as usize];
        match File::open(&wal).and_then(|f| f.read_exact_at(&mut raw, 0)) {
            Ok(()) => Ok(WalHeader::parse(raw)),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::UnexpectedEof
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(io(&wal)(e)),
        }
    };
    for _ in 0..100 {
        let before = header()?;
        let frames = match checkpoint(probe, "NOOP") {
            Ok((_, frames, _)) => frames,
            // Another connection is rebuilding or restarting the log's index: a moment.
            Err(FileError::Busy) => {
                std::thread::sleep(std::time::Duration::from_millis(1));
                continue;
            }
            Err(e) => return Err(e),
        };
        let after = header()?;
        if before != after {
            continue;
        }
        return Ok(after.filter(|_| frames > 0).map(|h| (h, frames)));
    }
    Err(FileError::Busy)
}

impl LogFile {
    /// The generation header, first frame and number of frames of a log backup file's
    /// bytes (`head`, its first [`LOG_HEADER_LEN`] bytes; `len`, its length).
    pub(crate) fn parse_head(head: &[u8], len: u64) -> Option<(WalHeader, u32, u32)> {
        if head.len() < LOG_HEADER_LEN as usize || head[..16] != LOG_MAGIC {
            return None;
        }
        let mut raw = [0u8; WAL_HEADER_LEN as usize];
        raw.copy_from_slice(&head[16..48]);
        let header = WalHeader::parse(raw)?;
        let (first, count) = (be32(head, 48), be32(head, 52));
        (first > 0 && count > 0 && len == LOG_HEADER_LEN + u64::from(count) * header.frame_len())
            .then_some((header, first, count))
    }
}

/// A backup file written by a pass, not recorded yet.
#[derive(Clone, Debug)]
pub(crate) struct Written {
    /// Its sequence number.
    pub(crate) seq: u64,
    /// Its files (a full backup's database file first, then its log generation).
    pub(crate) files: Vec<String>,
    /// Their size.
    pub(crate) size: u64,
    /// The log generation of its frames.
    pub(crate) generation: Option<WalGen>,
    /// The first frame (1 for a full backup's generation).
    pub(crate) first: u32,
    /// The last frame: where the backups stand once it is recorded.
    pub(crate) last: u32,
}

impl Written {
    /// Whether it is a full backup.
    pub(crate) fn full(&self) -> bool {
        self.files.first().is_some_and(|f| f.starts_with("full-"))
    }
}

/// Writes `name` in `dir` through `write` under a temporary name, then gives it its name: a pass
/// killed half-way leaves only a `.partial` file, which the next start removes.
fn publish(
    dir: &Path,
    name: &str,
    write: impl FnOnce(&Path) -> Result<u64, FileError>,
) -> Result<u64, FileError> {
    let partial = dir.join(format!("{name}.partial"));
    let _ = std::fs::remove_file(&partial);
    let size = write(&partial).inspect_err(|_| {
        let _ = std::fs::remove_file(&partial);
    })?;
    let target = dir.join(name);
    std::fs::rename(&partial, &target).map_err(io(&target))?;
    Ok(size)
}

/// Log backup `seq`: frames `first..=last` of generation `h`.
pub(crate) fn log_backup(
    pass: &Pass,
    dir: &Path,
    h: &WalHeader,
    (first, last): (u32, u32),
    seq: u64,
) -> Result<Written, FileError> {
    let name = format!("log-{seq:08}.bak");
    let size = publish(dir, &name, |p| pass.write_log(h, first, last, p))?;
    Ok(Written {
        seq,
        files: vec![name],
        size,
        generation: Some(h.generation()),
        first,
        last,
    })
}

/// What the first stage of a pass leaves: the connections (the snapshot pinned at the end of
/// what was copied), where the log stood, and the files written.
pub(crate) struct StageOne {
    /// The pass's connections.
    pub(crate) pass: Pass,
    /// Where the log stood.
    pub(crate) state: WalState,
    /// When (platform clock) the log was looked at: the backups' point in time.
    pub(crate) taken: i64,
    /// The log backup written (its new frames).
    pub(crate) log: Option<Written>,
    /// The full backup written.
    pub(crate) full: Option<Written>,
}

/// The first stage of a pass over database `db` (backups in `dir`, numbered from `seq`): under
/// the write lock, where the log stands (`clock` read then) and a snapshot pinned at its end; the
/// new frames copied — under the lock only when the snapshot does not hold the log — and, when
/// `full_due` or the log no longer continues `cursor`, a full backup of the snapshot with the
/// log generation so far.
pub(crate) fn stage_one(
    (db, key): (&Path, &DatabaseKey),
    cursor: Option<Cursor>,
    (full_due, clock): (bool, &dyn Fn() -> i64),
    dir: &Path,
    mut seq: u64,
) -> Result<StageOne, FileError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let mut pass = Pass::open(db, key)?;
    let state = pass.lock(true)?;
    let taken = clock();
    let step = next_step(cursor.as_ref(), state.generation(), state.frames);
    if let Step::Break(why) = step {
        tracing::info!(file = %db.display(), why, "a full copy starts a new chain (backups) or seed (geo-replication)");
    }
    let full_now = full_due || matches!(step, Step::Break(_));
    // A snapshot taken when every frame is checkpointed reads the main file only and does not
    // keep the log from restarting: then the copy is made under the write lock.
    if state.backfilled < state.frames {
        pass.unlock()?;
    }
    let mut log = None;
    if let (Step::Copy { first, last }, Some(h)) = (step, state.header)
        && last >= first
    {
        log = Some(log_backup(&pass, dir, &h, (first, last), seq)?);
        seq += 1;
    }
    let mut full = None;
    if full_now {
        let (mut files, mut size) = (Vec::new(), 0);
        if let Some(h) = state.header {
            // The generation so far goes with the full backup: the log backups after it
            // continue that generation, and SQLite replays a generation from its first frame.
            let name = format!("full-{seq:08}-wal.bak");
            size += publish(dir, &name, |p| pass.write_log(&h, 1, state.frames, p))?;
            files.push(name);
        }
        pass.unlock()?;
        let name = format!("full-{seq:08}.bak");
        size += publish(dir, &name, |p| pass.write_full(p, key))?;
        files.insert(0, name);
        full = Some(Written {
            seq,
            files,
            size,
            generation: state.generation(),
            first: 1,
            last: state.frames,
        });
    }
    pass.unlock()?;
    sync_dir(dir)?;
    Ok(StageOne {
        pass,
        state,
        taken,
        log,
        full,
    })
}

/// How a pass ends, once the first stage's backups are recorded.
pub(crate) enum Ending {
    /// Done: whether every frame of the log is backed up and checkpointed (the pin then reads
    /// the main file only, and the log may restart).
    Done {
        /// Backed up and checkpointed, all of it.
        drained: bool,
    },
    /// Writers committed much meanwhile: the write lock is held and the frames since are
    /// copied, to be recorded before [`finish_tail`].
    Tail {
        /// The log backup of the frames since the first stage.
        written: Written,
    },
}

/// The end of a pass whose first stage copied the log up to `copied` (its generation and last
/// frame) and is recorded (`cursor` says so): a checkpoint (never past the pinned snapshot),
/// then, under the write lock, the pin moved to the same end when nothing was committed since
/// (when everything is checkpointed, the log may then restart); or, with at least `tail_frames`
/// frames in the log, a second stage that copies the frames committed since.
pub(crate) fn finish(
    pass: &mut Pass,
    cursor: &Cursor,
    copied: (Option<WalGen>, u32),
    (dir, seq, tail_frames): (&Path, u64, u32),
) -> Result<Ending, FileError> {
    pass.checkpoint()?;
    let s = match pass.lock(false) {
        Err(FileError::Busy) => return Ok(Ending::Done { drained: false }),
        r => r?,
    };
    if s.frames == copied.1 && (s.frames == 0 || s.generation() == copied.0) {
        pass.pin_now()?;
        pass.unlock()?;
        return Ok(Ending::Done {
            drained: s.backfilled == s.frames,
        });
    }
    if s.frames >= tail_frames
        && let (Step::Copy { first, last }, Some(h)) =
            (next_step(Some(cursor), s.generation(), s.frames), s.header)
        && last >= first
    {
        let written = log_backup(pass, dir, &h, (first, last), seq)?;
        sync_dir(dir)?;
        return Ok(Ending::Tail { written });
    }
    // The pin stays at the end of what is backed up.
    pass.unlock()?;
    Ok(Ending::Done { drained: false })
}

/// The end of a second stage, once its backup is recorded: every frame in the log is backed up
/// and no commit can happen, so the checkpoint may go all the way; the pin then moves to the
/// log's end. Returns whether everything was checkpointed.
///
/// `others` is called for the other holders of snapshots on the database (its geo-replication
/// link), with the write lock held: at [`Tail::BeforeCheckpoint`] to catch up with the log's end
/// (the checkpoint could not pass their snapshot), at [`Tail::AfterCheckpoint`] to move their
/// snapshot past it (a snapshot in the log would keep it from restarting).
pub(crate) fn finish_tail(
    pass: &mut Pass,
    others: &mut dyn FnMut(Tail, &mut Pass),
) -> Result<bool, FileError> {
    pass.unpin()?;
    others(Tail::BeforeCheckpoint, pass);
    let (log, done) = pass.checkpoint()?;
    others(Tail::AfterCheckpoint, pass);
    pass.pin_now()?;
    pass.unlock()?;
    Ok(log == done)
}

/// Where a second stage stands when [`finish_tail`] calls the other snapshot holders.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Tail {
    /// Every frame is backed up; the checkpoint comes next.
    BeforeCheckpoint,
    /// The checkpoint is done; the lock is released next.
    AfterCheckpoint,
}

/// Creates `path` (which must not exist), readable by kagi only.
fn new_file(path: &Path) -> Result<File, FileError> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io(path))
}

/// Syncs a directory (after files in it were created, renamed or removed).
pub(crate) fn sync_dir(dir: &Path) -> Result<(), FileError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

/// A log backup file's generation header and frames.
pub(crate) struct LogFile {
    pub(crate) path: PathBuf,
    pub(crate) header: WalHeader,
    pub(crate) first: u32,
    pub(crate) count: u32,
}

impl LogFile {
    /// Reads and checks a log backup file's header.
    pub(crate) fn read(path: &Path) -> Result<Self, FileError> {
        let mut f = File::open(path).map_err(io(path))?;
        let mut head = [0u8; LOG_HEADER_LEN as usize];
        f.read_exact(&mut head).map_err(io(path))?;
        let len = f.seek(SeekFrom::End(0)).map_err(io(path))?;
        let (header, first, count) = Self::parse_head(&head, len)
            .ok_or_else(|| FileError::Damaged(format!("{} is not a log backup", path.display())))?;
        Ok(Self {
            path: path.to_path_buf(),
            header,
            first,
            count,
        })
    }

    /// Its last frame.
    pub(crate) fn last(&self) -> u32 {
        self.first + self.count - 1
    }
}

/// The log backups of one WAL generation, in order.
pub(crate) struct Generation {
    pub(crate) header: WalHeader,
    logs: Vec<LogFile>,
    pub(crate) frames: u32,
}

/// Sorts log backups (in the order taken) into generations, checking that each generation
/// starts at its first frame and has no hole (copies that overlap, as after a crash between
/// a copy and its record, are fine: a frame is the same bytes in both).
pub(crate) fn generations(logs: &[PathBuf]) -> Result<Vec<Generation>, FileError> {
    let mut out: Vec<Generation> = Vec::new();
    for path in logs {
        let log = LogFile::read(path)?;
        if log.count == 0 {
            continue;
        }
        match out.last_mut() {
            Some(g) if g.header.generation() == log.header.generation() => {
                if log.first > g.frames + 1 {
                    return Err(FileError::Damaged(format!(
                        "the log backups miss frames {} to {}",
                        g.frames + 1,
                        log.first - 1
                    )));
                }
                g.frames = g.frames.max(log.last());
                g.logs.push(log);
            }
            _ => {
                if out
                    .iter()
                    .any(|g| g.header.generation() == log.header.generation())
                {
                    return Err(FileError::Damaged(format!(
                        "{} goes back to an earlier log generation",
                        log.path.display()
                    )));
                }
                if log.first != 1 {
                    return Err(FileError::Damaged(format!(
                        "{} does not start its log at the first frame",
                        log.path.display()
                    )));
                }
                out.push(Generation {
                    header: log.header,
                    frames: log.last(),
                    logs: vec![log],
                });
            }
        }
    }
    Ok(out)
}

/// Writes generation `g` as the WAL `wal`: its header, then frames 1 to the last, each at its
/// place (frames are bound to their offset).
pub(crate) fn write_wal(g: &Generation, wal: &Path) -> Result<(), FileError> {
    let mut out = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(wal)
        .map_err(io(wal))?;
    out.write_all(&g.header.0).map_err(io(wal))?;
    let frame = g.header.frame_len();
    let mut written = 0u32;
    for log in &g.logs {
        if log.last() <= written {
            continue;
        }
        let skip = u64::from(written + 1 - log.first);
        let mut src = File::open(&log.path).map_err(io(&log.path))?;
        src.seek(SeekFrom::Start(LOG_HEADER_LEN + skip * frame))
            .map_err(io(&log.path))?;
        let n = u64::from(log.last() - written) * frame;
        let copied = std::io::copy(&mut src.take(n), &mut out).map_err(io(wal))?;
        if copied != n {
            return Err(FileError::Damaged(format!(
                "{} is short",
                log.path.display()
            )));
        }
        written = log.last();
    }
    Ok(())
}

/// Puts a database back together in the private directory `work`: the full backup `full` (a
/// database file under `key`) and the log backups `logs` in the order taken (the full
/// backup's copy of its log generation first), replayed one generation at a time by SQLite's
/// own recovery and checkpointed. Returns a connection to the result, whose integrity SQLite
/// has checked. Everything in `work` is ciphertext under `key`.
pub(crate) fn materialize(
    work: &Path,
    full: &Path,
    logs: &[PathBuf],
    key: &DatabaseKey,
) -> Result<Connection, FileError> {
    let db = work.join("restore.db");
    let wal = wal_of(&db);
    std::fs::copy(full, &db).map_err(io(&db))?;
    for g in generations(logs)? {
        write_wal(&g, &wal)?;
        let conn = kagi_sqlite_crypt::open(&db, key)?;
        // Opening ran recovery over the log: every frame must have opened and chained.
        let (_, found, _) = checkpoint(&conn, "NOOP")?;
        if found != g.frames {
            return Err(FileError::Damaged(format!(
                "only {found} of {} frames of a log generation could be replayed",
                g.frames
            )));
        }
        let (busy, _, _) = checkpoint(&conn, "TRUNCATE")?;
        if busy {
            return Err(FileError::Busy);
        }
        drop(conn);
        match std::fs::remove_file(&wal) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(&wal)(e)),
            _ => {}
        }
    }
    let conn = kagi_sqlite_crypt::open(&db, key)?;
    let verdict: String = conn.query_row("PRAGMA integrity_check", [], |r| r.get(0))?;
    if verdict != "ok" {
        return Err(FileError::Damaged(format!(
            "the restored database fails its integrity check: {verdict}"
        )));
    }
    Ok(conn)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::backup_chain::cursor_after;

    fn key() -> DatabaseKey {
        DatabaseKey::new([9; 32], *b"backup-test-db-1")
    }

    fn rows(conn: &Connection) -> Vec<i64> {
        let mut st = conn.prepare("SELECT v FROM t ORDER BY v").unwrap();
        st.query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    /// Backups as the service takes them (the records kept in memory): each pass through
    /// [`stage_one`] and [`finish`] (and [`finish_tail`]), the pin held between passes.
    struct Backups {
        dir: PathBuf,
        cursor: Option<Cursor>,
        files: Vec<(bool, PathBuf)>,
        seq: u64,
        pin: Option<Pin>,
    }

    impl Backups {
        fn record(&mut self, w: &Written) {
            for f in &w.files {
                let base = f.starts_with("full-") && !f.ends_with("-wal.bak");
                self.files.push((base, self.dir.join(f)));
            }
            self.cursor = Some(cursor_after(w.generation, w.last));
            self.seq = w.seq + 1;
        }

        /// One pass (a full backup when `full`); a second stage when the log holds at least
        /// `tail_frames` frames. Returns the log and full backups of the first stage.
        fn pass(
            &mut self,
            db: &Path,
            full: bool,
            tail_frames: u32,
        ) -> (Option<Written>, Option<Written>) {
            let one = stage_one(
                (db, &key()),
                self.cursor,
                (full, &|| 0),
                &self.dir,
                self.seq,
            )
            .unwrap();
            // The new pass's snapshot holds the log now.
            self.pin = None;
            let StageOne {
                mut pass,
                state,
                log,
                full,
                ..
            } = one;
            for w in log.iter().chain(full.iter()) {
                self.record(w);
            }
            let cursor = self.cursor.unwrap();
            let copied = (state.generation(), state.frames);
            let at = (self.dir.as_path(), self.seq, tail_frames);
            let drained = match finish(&mut pass, &cursor, copied, at).unwrap() {
                Ending::Done { drained } => drained,
                Ending::Tail { written, .. } => {
                    self.record(&written);
                    finish_tail(&mut pass, &mut |_, _| {}).unwrap()
                }
            };
            if let Some(c) = self.cursor.as_mut() {
                c.drained = drained;
            }
            self.pin = pass.keep();
            (log, full)
        }

        /// The database as of the last backup taken so far.
        fn restore(&self, work: &Path) -> Vec<i64> {
            let base = self.files.iter().rposition(|(full, _)| *full).unwrap();
            let logs: Vec<PathBuf> = self.files[base + 1..]
                .iter()
                .map(|(_, p)| p.clone())
                .collect();
            let _ = std::fs::remove_dir_all(work);
            std::fs::create_dir_all(work).unwrap();
            let conn = materialize(work, &self.files[base].1, &logs, &key()).unwrap();
            rows(&conn)
        }
    }

    /// A database with a table, and no backups yet.
    fn setup() -> (tempfile::TempDir, PathBuf, Connection, Backups) {
        let tmp = tempfile::tempdir().unwrap();
        let db = tmp.path().join("db.db");
        let dir = tmp.path().join("bak");
        std::fs::create_dir_all(&dir).unwrap();
        let conn = crate::engine::open_blocking(&db, &key()).unwrap();
        conn.execute_batch("CREATE TABLE t (v INTEGER PRIMARY KEY, pad BLOB)")
            .unwrap();
        let b = Backups {
            dir,
            cursor: None,
            files: Vec::new(),
            seq: 1,
            pin: None,
        };
        (tmp, db, conn, b)
    }

    fn insert(conn: &Connection, from: i64, to: i64) {
        conn.execute(
            "WITH RECURSIVE s(x) AS (SELECT ?1 UNION ALL SELECT x + 1 FROM s WHERE x < ?2) \
             INSERT INTO t SELECT x, randomblob(600) FROM s",
            [from, to],
        )
        .unwrap();
    }

    #[test]
    fn log_backups_replay_to_each_point_across_restarts_and_full_backups() {
        let (tmp, db, conn, mut b) = setup();
        insert(&conn, 1, 10);
        // The first pass: a full backup (with the log's frames so far).
        let (log, full) = b.pass(&db, false, u32::MAX);
        assert!(log.is_none() && full.unwrap().files.len() == 2);
        let work = tmp.path().join("work");
        assert_eq!(b.restore(&work), (1..=10).collect::<Vec<_>>());
        // More rows; a reader keeps an old snapshot, so the checkpoint cannot finish.
        insert(&conn, 11, 20);
        let reader = crate::engine::open_blocking(&db, &key()).unwrap();
        reader.execute_batch("BEGIN").unwrap();
        assert_eq!(rows(&reader).len(), 20);
        insert(&conn, 21, 30);
        let (log, full) = b.pass(&db, false, u32::MAX);
        assert!(log.is_some() && full.is_none());
        assert!(!b.cursor.unwrap().drained);
        assert_eq!(b.restore(&work), (1..=30).collect::<Vec<_>>());
        reader.execute_batch("ROLLBACK").unwrap();
        // Nothing new: no file, and now everything is checkpointed.
        let files = b.files.len();
        b.pass(&db, false, u32::MAX);
        assert_eq!(b.files.len(), files);
        assert!(b.cursor.unwrap().drained);
        // The next write restarts the log: a new generation, copied from its first frame.
        insert(&conn, 31, 40);
        let before = b.cursor.unwrap().generation.unwrap();
        let (log, full) = b.pass(&db, false, u32::MAX);
        assert!(full.is_none() && log.unwrap().first == 1);
        assert_eq!(
            b.cursor.unwrap().generation.unwrap().salt1,
            before.salt1.wrapping_add(1)
        );
        assert_eq!(b.restore(&work), (1..=40).collect::<Vec<_>>());
        // A full backup in the middle of a generation, then more of it.
        insert(&conn, 41, 50);
        b.pass(&db, true, u32::MAX);
        insert(&conn, 51, 60);
        conn.execute("DELETE FROM t WHERE v % 7 = 0", []).unwrap();
        b.pass(&db, false, u32::MAX);
        let expected: Vec<i64> = (1..=60).filter(|v| v % 7 != 0).collect();
        assert_eq!(b.restore(&work), expected);
        // Nothing in the backups is plaintext: the database's rows are not in them.
        conn.execute("INSERT INTO t VALUES (1000, 'KAGI-BACKUP-PLAINTEXT')", [])
            .unwrap();
        b.pass(&db, true, u32::MAX);
        for (_, p) in &b.files {
            let bytes = std::fs::read(p).unwrap();
            assert!(
                !bytes.windows(21).any(|w| w == b"KAGI-BACKUP-PLAINTEXT"),
                "{}",
                p.display()
            );
        }
        assert_eq!(b.restore(&work).last(), Some(&1000));
    }

    #[test]
    fn under_steady_writes_the_second_stage_lets_the_log_restart() {
        let (tmp, db, conn, mut b) = setup();
        b.pass(&db, false, 0);
        // A writer commits all along, between the copy and the checkpoint of every pass.
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writer = std::thread::spawn({
            let (db, stop) = (db.clone(), stop.clone());
            move || {
                let w = crate::engine::open_blocking(&db, &key()).unwrap();
                let mut n = 0;
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    n += 1;
                    insert(&w, n, n);
                    // A client's round trip between transactions.
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                n
            }
        });
        let mut gens = std::collections::BTreeSet::new();
        for _ in 0..10 {
            b.pass(&db, false, 0);
            gens.insert(b.cursor.unwrap().generation.map(|g| g.salt1));
        }
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let n = writer.join().unwrap();
        b.pass(&db, false, 0);
        let work = tmp.path().join("work");
        assert_eq!(b.restore(&work), (1..=n).collect::<Vec<_>>());
        assert!(gens.len() > 1, "the log never restarted: {gens:?}");
        drop(conn);
    }

    #[test]
    fn a_sessions_checkpoint_between_passes_cannot_lose_a_frame() {
        let (tmp, db, conn, mut b) = setup();
        insert(&conn, 1, 5);
        // A session's read snapshot at the log's end when the pass drains it: it keeps the
        // next write from restarting the log, so that write goes on in the same generation.
        let reader = crate::engine::open_blocking(&db, &key()).unwrap();
        reader.execute_batch("BEGIN").unwrap();
        assert_eq!(rows(&reader).len(), 5);
        b.pass(&db, false, u32::MAX);
        assert!(b.cursor.unwrap().drained);
        insert(&conn, 6, 10);
        reader.execute_batch("ROLLBACK").unwrap();
        // A session checkpoints (as `PRAGMA wal_checkpoint` from SQL would), then writes: the
        // pin held between passes keeps the checkpoint from copying the frames no backup
        // holds, so the log cannot restart over them.
        let session = crate::engine::open_blocking(&db, &key()).unwrap();
        let (_, log, done) = checkpoint(&session, "PASSIVE").unwrap();
        assert!(done < log, "{done} of {log} frames checkpointed");
        session.busy_timeout(std::time::Duration::ZERO).unwrap();
        let (busy, _, _) = checkpoint(&session, "TRUNCATE").unwrap();
        assert!(busy);
        insert(&conn, 11, 15);
        b.pass(&db, false, u32::MAX);
        let work = tmp.path().join("work");
        assert_eq!(b.restore(&work), (1..=15).collect::<Vec<_>>());
        // Without the pin, the same session would have let the log restart: the next pass
        // sees that and starts a new chain with a full backup rather than lose frames.
        b.pin = None;
        b.cursor.as_mut().unwrap().drained = false;
        insert(&conn, 16, 20);
        let (_, log, done) = checkpoint(&session, "PASSIVE").unwrap();
        assert_eq!(done, log);
        insert(&conn, 21, 25);
        let (_, full) = b.pass(&db, false, u32::MAX);
        assert!(full.is_some());
        assert_eq!(b.restore(&work), (1..=25).collect::<Vec<_>>());
    }

    #[test]
    fn damaged_or_incomplete_logs_are_refused() {
        let (tmp, db, conn, mut b) = setup();
        b.pass(&db, false, u32::MAX);
        // A reader keeps checkpoints back: the log backups that follow share a generation.
        let reader = crate::engine::open_blocking(&db, &key()).unwrap();
        reader.execute_batch("BEGIN").unwrap();
        assert!(rows(&reader).is_empty());
        insert(&conn, 1, 5);
        b.pass(&db, false, u32::MAX);
        insert(&conn, 6, 9);
        b.pass(&db, false, u32::MAX);
        reader.execute_batch("ROLLBACK").unwrap();
        let full = b.files[0].1.clone();
        let logs: Vec<PathBuf> = b.files[1..].iter().map(|(_, p)| p.clone()).collect();
        let work = tmp.path().join("work");
        std::fs::create_dir_all(&work).unwrap();
        // A hole in the chain.
        let holed = [logs[0].clone(), logs[2].clone()];
        assert!(matches!(
            materialize(&work, &full, &holed, &key()),
            Err(FileError::Damaged(_))
        ));
        // A log copied twice (a crash between a copy and its record) is harmless.
        std::fs::remove_dir_all(&work).unwrap();
        std::fs::create_dir_all(&work).unwrap();
        let twice = [&logs[..2], &logs[1..]].concat();
        let c = materialize(&work, &full, &twice, &key()).unwrap();
        assert_eq!(rows(&c), (1..=9).collect::<Vec<_>>());
        drop(c);
        // A generation never comes back.
        let back = [&logs[..], &logs[..1]].concat();
        assert!(matches!(
            materialize(&work, &full, &back, &key()),
            Err(FileError::Damaged(_))
        ));
        // A flipped byte in a frame: the frame does not open, the restore says so.
        let last = logs.last().unwrap();
        let mut bytes = std::fs::read(last).unwrap();
        let n = bytes.len();
        bytes[n - 100] ^= 1;
        std::fs::write(last, bytes).unwrap();
        std::fs::remove_dir_all(&work).unwrap();
        std::fs::create_dir_all(&work).unwrap();
        assert!(matches!(
            materialize(&work, &full, &logs, &key()),
            Err(FileError::Damaged(_))
        ));
        // Another key opens nothing.
        std::fs::remove_dir_all(&work).unwrap();
        std::fs::create_dir_all(&work).unwrap();
        let other = DatabaseKey::new([8; 32], *b"backup-test-db-1");
        assert!(materialize(&work, &full, &logs[..1], &other).is_err());
        // Not a log backup at all.
        assert!(matches!(
            materialize(&work, &full, std::slice::from_ref(&full), &key()),
            Err(FileError::Damaged(_))
        ));
    }
}
