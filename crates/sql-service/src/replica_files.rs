//! The files of geo-replication (docs/SQL.md, "Geo-replication"), below the service's links:
//! the primary's write-ahead log shipped as ciphertext into the link's spool directory (log
//! backup files, [`crate::backup_files`]), and applied to the secondary's copy of the database,
//! which has the same DEK and page id: a frame goes to the same offset of the secondary's log,
//! byte for byte, and SQLite's own recovery reads it there. Everything here blocks.
//!
//! Nothing is decrypted on the way: a shipped frame opens only under the database's DEK and
//! id at its offset, which the secondary has.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use kagi_sqlite_crypt::DatabaseKey;

use crate::backup_chain::{Cursor, WalGen, cursor_after};
use crate::backup_files::{
    self, FileError, LOCK_WAIT, LOG_HEADER_LEN, LogFile, Pass, StageOne, WAL_HEADER_LEN, WalHeader,
    checkpoint, finish, generations, io, is_busy, sync_dir, wal_of,
};

/// What one shipment left: the pass holding the primary's snapshot at the end of what was
/// shipped, and where shipping stands.
pub(crate) struct Shipment {
    /// The pass (its snapshot pinned at the end of what is shipped).
    pub(crate) pass: Pass,
    /// Where shipping stands: the last frame in the spool.
    pub(crate) cursor: Option<Cursor>,
    /// The next spool sequence number.
    pub(crate) next_seq: u64,
    /// When (platform clock) the primary's log was looked at.
    pub(crate) taken: i64,
    /// Whether a full copy (a new seed) was shipped.
    pub(crate) seeded: bool,
}

/// Ships what the primary `db` committed since `cursor` into `spool` (numbered from `seq`): the
/// frames as a log file, or, when the log no longer continues `cursor` (or there is none), a full
/// copy of a snapshot with its log generation, to seed the secondary again. Then a checkpoint
/// that never passes the new snapshot, which stays pinned; the previous shipment's pass
/// (`previous`) goes once the new snapshot holds the log and what it holds is shipped. On an
/// error `previous` is left as it was: its snapshot keeps holding the log where shipping stands.
pub(crate) fn ship(
    (db, key): (&Path, &DatabaseKey),
    previous: &mut Option<Pass>,
    cursor: Option<Cursor>,
    clock: &dyn Fn() -> i64,
    spool: &Path,
    seq: u64,
) -> Result<Shipment, FileError> {
    let one = backup_files::stage_one((db, key), cursor, (false, clock), spool, seq)?;
    // The new snapshot holds the log and the frames it holds are in the spool (synced).
    drop(previous.take());
    let StageOne {
        mut pass,
        state,
        taken,
        log,
        full,
    } = one;
    let (mut cursor, mut next_seq) = (cursor, seq);
    for w in log.iter().chain(full.iter()) {
        cursor = Some(cursor_after(w.generation, w.last));
        next_seq = w.seq + 1;
    }
    if let Some(c) = cursor {
        // Never a second stage: the backup pass's restarts the log under steady writes, and
        // calls the link to catch up under its lock ([`catch_up`]).
        let copied = (state.generation(), state.frames);
        finish(&mut pass, &c, copied, (spool, next_seq, u32::MAX))?;
        // The snapshot is held from here until the next shipment's: the log cannot restart
        // over a frame not shipped, so a new generation is the next one, from its first frame.
        cursor = Some(Cursor { drained: true, ..c });
    }
    Ok(Shipment {
        pass,
        cursor,
        next_seq,
        taken,
        seeded: full.is_some(),
    })
}

/// Ships the frames committed since `cursor` while another connection holds the primary's write
/// lock (a backup pass's second stage), then pins the pass's snapshot at the log's end — only
/// once they are in the spool: a failure leaves the snapshot where shipping stands, so no
/// checkpoint can pass a frame not shipped. Returns the new cursor and next sequence number;
/// `None` when the log does not continue `cursor`.
pub(crate) fn catch_up(
    pass: &mut Pass,
    cursor: Cursor,
    spool: &Path,
    seq: u64,
) -> Result<Option<(Cursor, u64)>, FileError> {
    let state = pass.observe(false)?;
    match crate::backup_chain::next_step(Some(&cursor), state.generation(), state.frames) {
        crate::backup_chain::Step::Copy { first, last } => {
            let Some(h) = state.header.filter(|_| last >= first) else {
                pass.pin_now()?;
                return Ok(Some((cursor, seq)));
            };
            let w = backup_files::log_backup(pass, spool, &h, (first, last), seq)?;
            sync_dir(spool)?;
            pass.pin_now()?;
            let c = cursor_after(w.generation, w.last);
            Ok(Some((Cursor { drained: true, ..c }, w.seq + 1)))
        }
        crate::backup_chain::Step::Break(_) => Ok(None),
    }
}

/// A shipped file in a spool directory.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Spooled {
    /// A full copy (its database file, and its log generation when the log had frames).
    Full {
        seq: u64,
        db: PathBuf,
        wal: Option<PathBuf>,
    },
    /// Frames of the log.
    Log { seq: u64, path: PathBuf },
}

impl Spooled {
    fn seq(&self) -> u64 {
        match self {
            Spooled::Full { seq, .. } | Spooled::Log { seq, .. } => *seq,
        }
    }

    fn files(&self) -> Vec<PathBuf> {
        match self {
            Spooled::Full { db, wal, .. } => {
                std::iter::once(db.clone()).chain(wal.clone()).collect()
            }
            Spooled::Log { path, .. } => vec![path.clone()],
        }
    }
}

/// The shipped files of `spool`, in order (a missing directory holds none).
fn spooled(spool: &Path) -> Result<Vec<Spooled>, FileError> {
    let Ok(entries) = std::fs::read_dir(spool) else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let seq_of = |s: &str| s.parse::<u64>().ok();
        if let Some(seq) = name
            .strip_prefix("log-")
            .and_then(|r| r.strip_suffix(".bak"))
            .and_then(seq_of)
        {
            out.push(Spooled::Log {
                seq,
                path: e.path(),
            });
        } else if let Some(seq) = name
            .strip_prefix("full-")
            .and_then(|r| r.strip_suffix(".bak"))
            .and_then(seq_of)
        {
            let wal = spool.join(format!("full-{seq:08}-wal.bak"));
            out.push(Spooled::Full {
                seq,
                db: e.path(),
                wal: wal.exists().then_some(wal),
            });
        }
        // Anything else (`.partial` files of a shipment cut short) is not shipped yet.
    }
    out.sort_by_key(Spooled::seq);
    Ok(out)
}

/// What applying the spool did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Applied {
    /// Files applied.
    pub(crate) files: u64,
    /// Whether a full copy was applied (the secondary seeded).
    pub(crate) seeded: bool,
    /// Whether files remain (the secondary was busy: see [`FileError::Busy`]).
    pub(crate) pending: bool,
    /// Whether what remains starts with a full copy, which needs the secondary closed.
    pub(crate) seed_pending: bool,
}

/// Applies the shipped files of `spool` to the secondary `replica` (under `key`: the primary's
/// DEK and page id), in order, each removed (and the removal synced) once applied, so that no
/// file is applied again after a crash. A full copy makes everything shipped before it moot.
/// Stops at the first file the secondary cannot take yet: a full copy unless `may_seed` (the
/// secondary is marked as being seeded, so no session can open it) and no connection to it is
/// open, a new log generation while a reader is in the old one.
pub(crate) fn apply_spool(
    replica: &Path,
    key: &DatabaseKey,
    spool: &Path,
    may_seed: bool,
) -> Result<Applied, FileError> {
    let mut files = spooled(spool)?;
    if let Some(last_full) = files
        .iter()
        .rposition(|f| matches!(f, Spooled::Full { .. }))
    {
        for moot in files.drain(..last_full) {
            for f in moot.files() {
                let _ = std::fs::remove_file(f);
            }
        }
    }
    let mut out = Applied::default();
    for f in &files {
        let r = match f {
            Spooled::Full { .. } if !may_seed => Err(FileError::Busy),
            Spooled::Full { db, wal, .. } => seed(replica, db, wal.as_deref(), key).map(|_| true),
            Spooled::Log { path, .. } => apply_log(replica, path, key).map(|_| false),
        };
        match r {
            Ok(seeded) => {
                out.files += 1;
                out.seeded |= seeded;
                for p in f.files() {
                    std::fs::remove_file(&p).map_err(io(&p))?;
                }
                sync_dir(spool)?;
            }
            Err(FileError::Busy) => {
                out.pending = true;
                out.seed_pending = matches!(f, Spooled::Full { .. });
                break;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// Replaces the secondary's files with a full copy and its log generation (the secondary must
/// have no connection open: `Busy` otherwise). Returns the generation and its frames.
fn seed(
    replica: &Path,
    full: &Path,
    wal: Option<&Path>,
    key: &DatabaseKey,
) -> Result<(Option<WalGen>, u32), FileError> {
    if kagi_sqlite_crypt::is_open(replica)? {
        return Err(FileError::Busy);
    }
    let dir = replica
        .parent()
        .ok_or_else(|| FileError::Damaged("a database file without a directory".into()))?;
    let with = |suffix: &str| {
        let mut p = replica.as_os_str().to_owned();
        p.push(suffix);
        PathBuf::from(p)
    };
    let (replica_wal, seed_db, seed_wal) = (wal_of(replica), with(".seed"), with(".seed-wal"));
    // The copy and its log are written whole beside the database first.
    std::fs::copy(full, &seed_db).map_err(io(&seed_db))?;
    File::open(&seed_db)
        .and_then(|f| f.sync_all())
        .map_err(io(&seed_db))?;
    let (generation, frames) = match wal {
        Some(w) => {
            let gens = generations(&[w.to_path_buf()])?;
            let g = gens
                .first()
                .ok_or_else(|| FileError::Damaged("an empty log generation".into()))?;
            backup_files::write_wal(g, &seed_wal)?;
            File::open(&seed_wal)
                .and_then(|f| f.sync_all())
                .map_err(io(&seed_wal))?;
            (Some(g.header.generation()), g.frames)
        }
        None => (None, 0),
    };
    // Then, in an order where a crash at any point leaves a consistent database: the old log
    // goes (the old file alone is the old snapshot), the copy takes the database's name (a
    // snapshot of its own), then its log.
    for old in [replica_wal.clone(), with("-journal")] {
        match std::fs::remove_file(&old) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(&old)(e)),
            _ => {}
        }
    }
    sync_dir(dir)?;
    std::fs::rename(&seed_db, replica).map_err(io(replica))?;
    sync_dir(dir)?;
    if wal.is_some() {
        std::fs::rename(&seed_wal, &replica_wal).map_err(io(&replica_wal))?;
        sync_dir(dir)?;
    }
    // Opening runs SQLite's recovery over the log: every frame must open and chain.
    let conn = crate::engine::open_existing_blocking(replica, key)?;
    let (_, found, _) = checkpoint(&conn, "NOOP")?;
    if found != frames {
        return Err(FileError::Damaged(format!(
            "only {found} of {frames} shipped frames could be read"
        )));
    }
    Ok((generation, frames))
}

/// Where the secondary's log stands: the shipping cursor a link starts from after a start (not
/// drained: a log that restarted meanwhile needs a new seed). `None` without a secondary file.
pub(crate) fn replica_cursor(
    replica: &Path,
    key: &DatabaseKey,
) -> Result<Option<Cursor>, FileError> {
    if !replica.exists() {
        return Ok(None);
    }
    let conn = crate::engine::open_existing_blocking(replica, key)?;
    let (_, frames, _) = checkpoint(&conn, "NOOP")?;
    let generation = wal_header(&wal_of(replica))?.map(|h| h.generation());
    Ok(Some(Cursor {
        generation: generation.filter(|_| frames > 0),
        frames,
        drained: false,
    }))
}

/// The header of the log of `wal`, if it has one.
fn wal_header(wal: &Path) -> Result<Option<WalHeader>, FileError> {
    let f = match File::open(wal) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(wal)(e)),
    };
    let mut raw = [0u8; WAL_HEADER_LEN as usize];
    match f.read_exact_at(&mut raw, 0) {
        Ok(()) => Ok(WalHeader::parse(raw)),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(None),
        Err(e) => Err(io(wal)(e)),
    }
}

/// Writes the frames of the log file `log` into the secondary's log at their offsets, under the
/// secondary's write lock, and has SQLite read them. A frame the secondary has already must be
/// the same bytes (a file applied twice after a crash); any other is a secondary that went its
/// own way, which only a new seed mends. A new generation starts after a checkpoint of the old
/// one (`Busy` while a reader is in it).
fn apply_log(replica: &Path, path: &Path, key: &DatabaseKey) -> Result<u32, FileError> {
    let log = LogFile::read(path)?;
    let conn = crate::engine::open_existing_blocking(replica, key)?;
    conn.busy_timeout(LOCK_WAIT)?;
    // Reads the wal-index while `conn` holds the write lock (a checkpoint, even NOOP, cannot
    // run inside a transaction of its own connection).
    let probe = crate::engine::open_existing_blocking(replica, key)?;
    let replica_wal = wal_of(replica);
    let same =
        wal_header(&replica_wal)?.is_some_and(|h| h.bytes()[16..24] == log.header.bytes()[16..24]);
    if !same {
        if log.first != 1 {
            return Err(FileError::Damaged(
                "shipped frames do not continue the secondary's log".into(),
            ));
        }
        // The old generation goes into the main file, and the log is emptied.
        let (busy, _, _) = checkpoint(&conn, "TRUNCATE")?;
        if busy {
            return Err(FileError::Busy);
        }
    }
    match conn.execute_batch("BEGIN IMMEDIATE") {
        Err(e) if is_busy(&e) => return Err(FileError::Busy),
        r => r?,
    }
    let written = write_frames(&probe, &log, &replica_wal, same);
    // Whatever happened, the index is read again from the file.
    let reread = kagi_sqlite_crypt::reread_wal(replica);
    conn.execute_batch("ROLLBACK")?;
    let have = written?;
    reread?;
    // The next transaction rebuilds the index: every frame must open and chain.
    conn.query_row("SELECT count(*) FROM sqlite_schema", [], |_| Ok(()))?;
    let (_, found, _) = checkpoint(&conn, "NOOP")?;
    let want = have.max(log.last());
    if found != want {
        return Err(FileError::Damaged(format!(
            "only {found} of {want} frames of the secondary's log could be read"
        )));
    }
    Ok(found)
}

/// The frames of `log` into the log `wal` (a new one after the header when `!same`); returns
/// how many frames the secondary had before (`probe` reads it).
fn write_frames(
    probe: &rusqlite::Connection,
    log: &LogFile,
    wal: &Path,
    same: bool,
) -> Result<u32, FileError> {
    let (_, have, _) = checkpoint(probe, "NOOP")?;
    let have = if same { have } else { 0 };
    if log.first > have + 1 {
        return Err(FileError::Damaged(format!(
            "shipped frames start at {} but the secondary has {have}",
            log.first
        )));
    }
    let out = OpenOptions::new()
        .write(true)
        .read(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(wal)
        .map_err(io(wal))?;
    if !same {
        out.set_len(0).map_err(io(wal))?;
        out.write_all_at(log.header.bytes(), 0).map_err(io(wal))?;
    }
    let src = File::open(&log.path).map_err(io(&log.path))?;
    let frame = log.header.frame_len();
    let mut buf = vec![0u8; frame as usize];
    let mut mine = vec![0u8; frame as usize];
    for i in 0..log.count {
        let n = log.first + i;
        src.read_exact_at(&mut buf, LOG_HEADER_LEN + u64::from(i) * frame)
            .map_err(io(&log.path))?;
        let at = log.header.frame_offset(n);
        if n <= have {
            out.read_exact_at(&mut mine, at).map_err(io(wal))?;
            if mine != buf {
                return Err(FileError::Damaged(format!(
                    "frame {n} of the secondary's log is not the primary's: it needs a new seed"
                )));
            }
            continue;
        }
        out.write_all_at(&buf, at).map_err(io(wal))?;
    }
    out.sync_data().map_err(io(wal))?;
    Ok(have)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::backup_files::{Tail, finish_tail};

    fn key() -> DatabaseKey {
        DatabaseKey::new([5; 32], *b"geo-replica-db-1")
    }

    fn rows(conn: &rusqlite::Connection) -> Vec<i64> {
        let mut st = conn.prepare("SELECT v FROM t ORDER BY v").unwrap();
        st.query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    fn insert(conn: &rusqlite::Connection, from: i64, to: i64) {
        conn.execute(
            "WITH RECURSIVE s(x) AS (SELECT ?1 UNION ALL SELECT x + 1 FROM s WHERE x < ?2) \
             INSERT INTO t SELECT x, randomblob(600) FROM s",
            [from, to],
        )
        .unwrap();
    }

    struct Link {
        primary: PathBuf,
        replica: PathBuf,
        spool: PathBuf,
        cursor: Option<Cursor>,
        seq: u64,
        pass: Option<Pass>,
    }

    impl Link {
        /// One shipment; returns whether it was a seed.
        fn ship(&mut self) -> bool {
            let s = ship(
                (&self.primary, &key()),
                &mut self.pass,
                self.cursor,
                &|| 0,
                &self.spool,
                self.seq,
            )
            .unwrap();
            self.pass = Some(s.pass);
            self.cursor = s.cursor;
            self.seq = s.next_seq;
            s.seeded
        }

        fn apply(&self) -> Applied {
            apply_spool(&self.replica, &key(), &self.spool, true).unwrap()
        }
    }

    fn setup() -> (tempfile::TempDir, rusqlite::Connection, Link) {
        let tmp = tempfile::tempdir().unwrap();
        let primary = tmp.path().join("p.db");
        let conn = crate::engine::open_blocking(&primary, &key()).unwrap();
        conn.execute_batch("CREATE TABLE t (v INTEGER PRIMARY KEY, pad BLOB)")
            .unwrap();
        let link = Link {
            primary,
            replica: tmp.path().join("r.db"),
            spool: tmp.path().join("spool"),
            cursor: None,
            seq: 1,
            pass: None,
        };
        (tmp, conn, link)
    }

    fn generation(link: &Link) -> u32 {
        link.cursor.unwrap().generation.unwrap().salt1
    }

    #[test]
    fn a_secondary_follows_its_primary_across_log_restarts_and_new_seeds() {
        let (_tmp, conn, mut link) = setup();
        insert(&conn, 1, 10);
        // The first shipment seeds the secondary.
        assert!(link.ship());
        let a = link.apply();
        assert!(a.seeded && !a.pending);
        let reader = crate::engine::connect_read_only_blocking(&link.replica, &key()).unwrap();
        assert_eq!(rows(&reader), (1..=10).collect::<Vec<_>>());
        // New rows: log frames, seen by the reader's next transaction.
        insert(&conn, 11, 20);
        assert!(!link.ship());
        assert_eq!(link.apply().files, 1);
        assert_eq!(rows(&reader), (1..=20).collect::<Vec<_>>());
        assert!(std::fs::read_dir(&link.spool).unwrap().next().is_none());
        // The shipment checkpointed the primary and pinned at the end: the next write restarts
        // the log, and its frames are shipped from the first.
        let before = generation(&link);
        insert(&conn, 21, 30);
        assert!(!link.ship());
        assert_eq!(generation(&link), before.wrapping_add(1));
        // A reader in a transaction holds the secondary's old generation: the new one waits.
        reader.execute_batch("BEGIN").unwrap();
        assert_eq!(rows(&reader).len(), 20);
        let a = link.apply();
        assert!(a.pending && !a.seed_pending && a.files == 0);
        reader.execute_batch("COMMIT").unwrap();
        assert_eq!(link.apply().files, 1);
        assert_eq!(rows(&reader), (1..=30).collect::<Vec<_>>());
        // A log that no longer continues the shipments (kagi restarted, the pin lost, the log
        // restarted): a new seed, which waits until no connection to the secondary is open.
        link.pass = None;
        link.cursor = Some(Cursor {
            drained: false,
            ..link.cursor.unwrap()
        });
        let (_, log, done) = checkpoint(&conn, "PASSIVE").unwrap();
        assert_eq!(log, done);
        insert(&conn, 31, 40);
        insert(&conn, 41, 50);
        assert!(link.ship());
        let a = link.apply();
        assert!(a.pending && a.seed_pending);
        drop(reader);
        assert!(link.apply().seeded);
        let reader = crate::engine::connect_read_only_blocking(&link.replica, &key()).unwrap();
        assert_eq!(rows(&reader), (1..=50).collect::<Vec<_>>());
        // A file applied twice (a crash between applying and removing it) is harmless.
        insert(&conn, 51, 55);
        link.ship();
        let copy = link.spool.join("copy");
        let shipped = std::fs::read_dir(&link.spool)
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        std::fs::copy(&shipped, &copy).unwrap();
        assert_eq!(link.apply().files, 1);
        std::fs::rename(&copy, &shipped).unwrap();
        assert_eq!(link.apply().files, 1);
        assert_eq!(rows(&reader), (1..=55).collect::<Vec<_>>());
        // No plaintext went anywhere: the rows are only in the primary's page cache.
        conn.execute("INSERT INTO t VALUES (1000, 'KAGI-GEO-PLAINTEXT')", [])
            .unwrap();
        link.ship();
        for dir in [
            link.spool.clone(),
            link.replica.parent().unwrap().to_path_buf(),
        ] {
            for e in std::fs::read_dir(dir).unwrap().flatten() {
                if e.path().is_file() {
                    let bytes = std::fs::read(e.path()).unwrap();
                    assert!(!bytes.windows(18).any(|w| w == b"KAGI-GEO-PLAINTEXT"));
                }
            }
        }
        link.apply();
        assert_eq!(rows(&reader).last(), Some(&1000));
    }

    #[test]
    fn a_secondary_that_went_its_own_way_is_refused() {
        let (_tmp, conn, mut link) = setup();
        insert(&conn, 1, 5);
        link.ship();
        link.apply();
        // A reader in the log keeps the primary's log from restarting from here on.
        insert(&conn, 6, 6);
        let held = crate::engine::open_blocking(&link.primary, &key()).unwrap();
        held.execute_batch("BEGIN").unwrap();
        rows(&held);
        link.ship();
        link.apply();
        // Someone wrote to the secondary (nothing in kagi does): its log is not the primary's.
        let rogue = crate::engine::open_existing_blocking(&link.replica, &key()).unwrap();
        insert(&rogue, 100, 100);
        drop(rogue);
        insert(&conn, 7, 10);
        link.ship();
        assert!(matches!(
            apply_spool(&link.replica, &key(), &link.spool, true),
            Err(FileError::Damaged(_))
        ));
    }

    #[test]
    fn under_a_backup_passs_lock_the_link_catches_up_and_lets_the_log_restart() {
        let (_tmp, conn, mut link) = setup();
        insert(&conn, 1, 5);
        link.ship();
        link.apply();
        // A reader keeps the log from draining while rows come in.
        let held = crate::engine::open_blocking(&link.primary, &key()).unwrap();
        held.execute_batch("BEGIN").unwrap();
        rows(&held);
        insert(&conn, 6, 20);
        link.ship();
        held.execute_batch("COMMIT").unwrap();
        insert(&conn, 21, 30);
        // A backup pass's second stage holds the write lock: the link ships up to the end
        // before the checkpoint and moves its snapshot after it.
        let mut backup = Pass::open(&link.primary, &key()).unwrap();
        backup.lock(true).unwrap();
        let before = generation(&link);
        let (spool, replica) = (link.spool.clone(), link.replica.clone());
        let (mut cursor, mut seq) = (link.cursor.unwrap(), link.seq);
        let mut pass = link.pass.take().unwrap();
        let drained = finish_tail(&mut backup, &mut |phase, _| match phase {
            Tail::BeforeCheckpoint => {
                let (c, s) = catch_up(&mut pass, cursor, &spool, seq).unwrap().unwrap();
                (cursor, seq) = (c, s);
                apply_spool(&replica, &key(), &spool, false).unwrap();
            }
            Tail::AfterCheckpoint => pass.pin_now().unwrap(),
        })
        .unwrap();
        assert!(drained);
        (link.cursor, link.seq, link.pass) = (Some(cursor), seq, Some(pass));
        drop(backup);
        // Both snapshots allow it: the next write restarts the log.
        insert(&conn, 31, 40);
        link.ship();
        assert_eq!(generation(&link), before.wrapping_add(1));
        link.apply();
        let reader = crate::engine::connect_read_only_blocking(&link.replica, &key()).unwrap();
        assert_eq!(rows(&reader), (1..=40).collect::<Vec<_>>());
    }

    #[test]
    fn a_catch_up_that_fails_under_a_backup_passs_lock_keeps_the_log_where_shipping_stands() {
        let (_tmp, conn, mut link) = setup();
        insert(&conn, 1, 5);
        link.ship();
        link.apply();
        let held = crate::engine::open_blocking(&link.primary, &key()).unwrap();
        held.execute_batch("BEGIN").unwrap();
        rows(&held);
        insert(&conn, 6, 20);
        link.ship();
        link.apply();
        held.execute_batch("COMMIT").unwrap();
        // Committed on the primary, not shipped yet.
        insert(&conn, 21, 30);
        let mut backup = Pass::open(&link.primary, &key()).unwrap();
        backup.lock(true).unwrap();
        let before = generation(&link);
        let (spool, seq) = (link.spool.clone(), link.seq);
        let cursor = link.cursor.unwrap();
        let mut pass = link.pass.take().unwrap();
        // The spool cannot take a file now (disk full, I/O error): a directory in the way.
        let blocker = spool.join(format!("log-{seq:08}.bak.partial"));
        std::fs::create_dir_all(&blocker).unwrap();
        let mut failed = false;
        // What the link's hook does: no new snapshot after a failed catch-up.
        finish_tail(&mut backup, &mut |phase, _| match phase {
            Tail::BeforeCheckpoint => {
                failed = catch_up(&mut pass, cursor, &spool, seq).is_err();
            }
            Tail::AfterCheckpoint if failed => {}
            Tail::AfterCheckpoint => pass.pin_now().unwrap(),
        })
        .unwrap();
        assert!(failed, "the injected failure happened");
        std::fs::remove_dir(&blocker).unwrap();
        link.pass = Some(pass);
        drop(backup);
        // The link's snapshot kept the log from restarting over the frames not shipped: the
        // next shipment has them, in the same generation.
        insert(&conn, 31, 40);
        assert!(!link.ship());
        assert_eq!(generation(&link), before);
        link.apply();
        let reader = crate::engine::connect_read_only_blocking(&link.replica, &key()).unwrap();
        assert_eq!(rows(&reader), (1..=40).collect::<Vec<_>>());
    }
}
