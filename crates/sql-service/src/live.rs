//! A database's live log in the bucket (docs/SQL.md, "The live log"): with several nodes on
//! one store and `--blobs s3://…`, the frames every commit adds to a database's write-ahead
//! log are in the bucket before the client hears of the commit (the PostgreSQL front end waits
//! for [`LiveLog::ship`] through its commit barrier), so that another node can take the
//! database's server over when its home is gone (`crate::takeover`): the backups (a full
//! backup and its log backups, also in the bucket) and then the live log's pieces after them.
//!
//! A piece is object `{seq:012}` of the folder `sql-live/{database id}/`, created only if
//! absent, in the format of a log backup file (a WAL generation's header, the first frame,
//! the count, then the frames as the encrypting VFS wrote them: ciphertext). Pieces are
//! numbered one after another whatever their generation, so the next name is known: a
//! takeover fences the old home off with an empty object there, and the old home's next
//! piece then fails ([`LiveError::TakenOver`]). Pieces the backups hold whole are deleted
//! after each backup pass, the newest excepted (it tells where numbering stands).

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use kagi_blobs::BlockingFolder;
use kagi_sqlite_crypt::DatabaseKey;
use rusqlite::Connection;

use crate::backup_chain::{Cursor, LivePiece, WalGen};
use crate::backup_files::{FileError, LOG_HEADER_LEN, LogFile, copy_log, log_end, wal_of};

/// The folder (below the data directory) of the live logs.
pub(crate) const LIVE_DIR: &str = "sql-live";

/// The first bytes of a fence (its format version last), then the takeover's number
/// (big-endian) and the node that took over.
const FENCE_MAGIC: [u8; 16] = *b"kagi-sql-fence\0\x01";

/// The bytes of the fence takeover `takeover` by node `node` puts.
pub(crate) fn fence_bytes(takeover: u64, node: &str) -> Vec<u8> {
    let mut b = FENCE_MAGIC.to_vec();
    b.extend_from_slice(&takeover.to_be_bytes());
    b.extend_from_slice(node.as_bytes());
    b
}

/// What can go wrong shipping a live log.
#[derive(Debug, thiserror::Error)]
pub(crate) enum LiveError {
    /// Another node fenced this one off: it took the database's server over.
    #[error("another node took the database over")]
    TakenOver,
    /// The bucket failed or could not be reached.
    #[error("the bucket: {0}")]
    Bucket(#[from] std::io::Error),
    /// The database's files.
    #[error(transparent)]
    File(#[from] FileError),
    /// The engine could not open a connection.
    #[error(transparent)]
    Engine(#[from] kagi_sqlite_crypt::Error),
    /// The log on this node is behind what the bucket holds.
    #[error("{0}")]
    Behind(String),
}

/// The name of piece `seq`.
pub(crate) fn piece_name(seq: u64) -> String {
    format!("{seq:012}")
}

/// The number of a piece's name.
pub(crate) fn piece_seq(name: &str) -> Option<u64> {
    (name.len() == 12 && name.bytes().all(|b| b.is_ascii_digit()))
        .then(|| name.parse().ok())
        .flatten()
}

/// What a piece's bytes (or its first [`LOG_HEADER_LEN`] of `len`) say it holds; a fence
/// has no generation, and the number of the takeover that put it.
pub(crate) fn describe(seq: u64, head: &[u8], len: u64) -> Option<LivePiece> {
    if len == 0 {
        return Some(LivePiece {
            seq,
            generation: None,
            first: 0,
            last: 0,
            fenced_by: 0,
        });
    }
    if head.starts_with(&FENCE_MAGIC) {
        let n = head.get(16..24)?;
        let mut be = [0u8; 8];
        be.copy_from_slice(n);
        return Some(LivePiece {
            seq,
            generation: None,
            first: 0,
            last: 0,
            fenced_by: u64::from_be_bytes(be),
        });
    }
    let (h, first, count) = LogFile::parse_head(head, len)?;
    Some(LivePiece {
        seq,
        generation: Some(h.generation()),
        first,
        last: first + count - 1,
        fenced_by: 0,
    })
}

/// The pieces of a live log folder, by number (a piece whose head cannot be read is an error:
/// a hole would follow).
pub(crate) fn pieces_of(folder: &BlockingFolder) -> Result<Vec<LivePiece>, LiveError> {
    let mut named: Vec<(u64, u64)> = folder
        .list()?
        .into_iter()
        .filter_map(|(name, size)| Some((piece_seq(&name)?, size)))
        .collect();
    named.sort_unstable();
    // Empty objects (an early format's fences) have no head to read.
    let names: Vec<String> = named
        .iter()
        .filter(|(_, size)| *size > 0)
        .map(|(seq, _)| piece_name(*seq))
        .collect();
    let mut heads = folder.get_heads(&names, LOG_HEADER_LEN)?.into_iter();
    let mut out = Vec::with_capacity(named.len());
    for (seq, size) in named {
        let head = if size > 0 {
            heads.next().unwrap_or_default()
        } else {
            Vec::new()
        };
        out.push(describe(seq, &head, size).ok_or_else(|| {
            LiveError::Behind(format!("piece {seq} of the live log is not a log piece"))
        })?);
    }
    Ok(out)
}

/// Where shipping stands.
#[derive(Default)]
struct State {
    /// A connection that reads where the log ends (opened at the first ship).
    probe: Option<Connection>,
    /// The next piece's number (`None`: the bucket not looked at yet).
    next_seq: Option<u64>,
    /// The generation and last frame shipped.
    shipped: Option<(WalGen, u32)>,
    /// Pieces in the bucket, by number (fences included).
    pieces: Vec<LivePiece>,
    /// Fenced off: every later ship fails.
    fenced: bool,
    /// A piece whose create failed or timed out: it may exist in the bucket all the same, so
    /// it is created again with the same bytes (which then count as this writer's) before
    /// anything else is shipped.
    pending: Option<(LivePiece, Vec<u8>)>,
    /// Every ship whose ticket is at most this one is in the bucket.
    done: u64,
}

/// One database's live log (see the module).
pub(crate) struct LiveLog {
    /// The database file.
    db: PathBuf,
    folder: BlockingFolder,
    /// The number of the takeover that made this node the home (0: the server was made
    /// here): a fence of a later takeover means another node took the database over.
    takeover: u64,
    /// Tickets of the ships asked for (each after its session's commit): a ship that reads
    /// where the log ends covers every ticket handed out before, so their sessions need no
    /// piece of their own (group commit).
    tickets: std::sync::atomic::AtomicU64,
    state: Mutex<State>,
}

impl std::fmt::Debug for LiveLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveLog")
            .field("db", &self.db)
            .finish_non_exhaustive()
    }
}

impl LiveLog {
    /// The live log of database file `db` in `folder`, on a home made by takeover number
    /// `takeover`.
    pub(crate) fn new(db: &Path, folder: BlockingFolder, takeover: u64) -> Self {
        Self {
            db: db.to_path_buf(),
            folder,
            takeover,
            tickets: std::sync::atomic::AtomicU64::new(0),
            state: Mutex::default(),
        }
    }

    /// The number of the takeover that made this node the home when it was opened.
    pub(crate) fn home_takeover(&self) -> u64 {
        self.takeover
    }

    /// Whether it was fenced off (by a later takeover than its home's).
    #[cfg(test)]
    pub(crate) fn fenced(&self) -> bool {
        self.state().fenced
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Ships every committed frame of the log not shipped yet, under `key` (the database's:
    /// the probe connection). Blocks; one ship at a time per database, so commits that
    /// happened meanwhile go in one piece.
    pub(crate) fn ship(&self, key: &DatabaseKey) -> Result<(), LiveError> {
        use std::sync::atomic::Ordering::SeqCst;
        let ticket = self.tickets.fetch_add(1, SeqCst) + 1;
        let mut st = self.state();
        if st.fenced {
            return Err(LiveError::TakenOver);
        }
        // Shipped by a ship that read the log's end after this session's commit.
        if st.done >= ticket && st.pending.is_none() {
            return Ok(());
        }
        if st.next_seq.is_none() {
            let pieces = pieces_of(&self.folder)?;
            // A later takeover fenced this home off (whenever it was: before this log was
            // opened, as after a restart, too).
            if pieces
                .iter()
                .any(|p| p.generation.is_none() && p.fenced_by > self.takeover)
            {
                st.fenced = true;
                return Err(LiveError::TakenOver);
            }
            st.next_seq = Some(pieces.last().map_or(0, |p| p.seq + 1));
            // What this lineage shipped: the pieces after the newest fence (a takeover's, or
            // the start of a lineage of this home's own, as a geo failover writes).
            st.shipped = pieces
                .iter()
                .rev()
                .map_while(|p| p.generation.map(|g| (g, p.last)))
                .next();
            st.pieces = pieces;
        }
        if let Some((piece, bytes)) = st.pending.take() {
            self.put(&mut st, piece, bytes)?;
        }
        if st.probe.is_none() {
            st.probe = Some(crate::engine::open_existing_blocking(&self.db, key)?);
        }
        let mut tries = 0;
        loop {
            tries += 1;
            // Every ticket handed out so far was handed out after its commit: the end read
            // next holds them all.
            let covers = self.tickets.load(SeqCst);
            let probe = st.probe.as_ref().ok_or(FileError::Busy)?;
            let Some((header, end)) = log_end(&self.db, probe)? else {
                st.done = covers;
                return Ok(());
            };
            let generation = header.generation();
            let first = match st.shipped {
                Some((g, last)) if g.same(&generation) => {
                    if end < last {
                        return Err(LiveError::Behind(format!(
                            "the log of {} ends at frame {end}, and the bucket holds it to \
                             frame {last}",
                            self.db.display()
                        )));
                    }
                    last + 1
                }
                _ => 1,
            };
            if first > end {
                st.done = covers;
                return Ok(());
            }
            let mut bytes = Vec::new();
            match copy_log(
                &self.db,
                &header,
                (first, end),
                (&mut bytes, &wal_of(&self.db)),
            ) {
                // The log restarted while it was read: look again.
                Err(FileError::Damaged(_)) if tries < 5 => continue,
                r => r?,
            }
            let piece = LivePiece {
                seq: st.next_seq.unwrap_or(0),
                generation: Some(generation),
                first,
                last: end,
                fenced_by: 0,
            };
            self.put(&mut st, piece, bytes)?;
            st.done = covers;
            return Ok(());
        }
    }

    /// Creates `piece` (`bytes`) in the bucket and notes it shipped; a failure keeps it
    /// pending, a piece of other bytes there means a fence.
    fn put(&self, st: &mut State, piece: LivePiece, bytes: Vec<u8>) -> Result<(), LiveError> {
        match self.folder.put_new(&piece_name(piece.seq), &bytes) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                st.fenced = true;
                return Err(LiveError::TakenOver);
            }
            Err(e) => {
                st.pending = Some((piece, bytes));
                return Err(e.into());
            }
        }
        st.next_seq = Some(piece.seq + 1);
        st.shipped = piece.generation.map(|g| (g, piece.last));
        st.pieces.push(piece);
        Ok(())
    }

    /// The number the next piece will have: every piece below it holds only commits made
    /// before now. A full backup started after this records it (`liveFrom`), so that what
    /// comes before its lineage is told apart by number, not by WAL salts (which a database
    /// re-seeded from its geo-partner starts anew). Reads the bucket when nothing was shipped
    /// since this log was opened, without taking what it reads for shipping's state (the
    /// first ship looks for fences itself). Blocks.
    pub(crate) fn next_piece(&self) -> Result<u64, LiveError> {
        if let Some(next) = self.state().next_seq {
            return Ok(next);
        }
        Ok(pieces_of(&self.folder)?.last().map_or(0, |p| p.seq + 1))
    }

    /// Deletes the pieces the backups hold whole now that they reach `cursor` (and, from a
    /// full backup that recorded it, every piece before `live_from`), the newest piece
    /// excepted. Fences stay: a home that was fenced off and still runs would otherwise
    /// create the piece its fence holds and acknowledge a commit no other node has. Blocks.
    pub(crate) fn prune(&self, cursor: &Cursor, live_from: Option<u64>) -> Result<(), LiveError> {
        let Some(at) = cursor.generation else {
            return Ok(());
        };
        // A ship under way (a first one reads the whole live log) is not waited for: the
        // pieces go at a later pass.
        let mut st = match self.state.try_lock() {
            Ok(st) => st,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return Ok(()),
        };
        let Some(newest) = st.pieces.last().map(|p| p.seq) else {
            return Ok(());
        };
        let held = |p: &LivePiece| match p.generation {
            None => false,
            Some(_) if live_from.is_some_and(|from| p.seq < from) => true,
            Some(g) if g.same(&at) => p.last <= cursor.frames,
            Some(g) => (g.salt1.wrapping_sub(at.salt1) as i32) < 0,
        };
        let gone: Vec<u64> = st
            .pieces
            .iter()
            .filter(|p| p.seq != newest && held(p))
            .map(|p| p.seq)
            .collect();
        if gone.is_empty() {
            return Ok(());
        }
        // Forgotten first and deleted without the lock: commits do not wait for the deletes
        // (a piece that stays after a failed delete is only a leftover).
        st.pieces.retain(|p| !gone.contains(&p.seq));
        drop(st);
        let names: Vec<String> = gone.iter().map(|s| piece_name(*s)).collect();
        self.folder.delete(&names)?;
        Ok(())
    }
}

impl crate::SqlService {
    /// Whether this node ships its databases' live logs: several nodes on one store, blobs in
    /// a bucket.
    pub(crate) fn ships_live_logs(&self) -> bool {
        self.host.shares_store() && !self.host.config().blobs.is_local()
    }

    /// The folder of database `database_id`'s live log, when this node ships live logs.
    pub(crate) fn live_folder(&self, database_id: &str) -> Option<BlockingFolder> {
        if !self.ships_live_logs() {
            return None;
        }
        let config = self.host.config();
        let dir = config
            .data_dir
            .join(LIVE_DIR)
            .join(database_id.to_ascii_lowercase());
        match config.blobs.blocking_folder(&dir) {
            // A commit's piece waits for the bucket for a bounded time (then retries, or gives up).
            Ok(f) => f.map(|f| f.with_deadline(std::time::Duration::from_secs(20))),
            Err(e) => {
                tracing::error!(database = database_id, error = %e, "the live log's folder cannot be named");
                None
            }
        }
    }

    /// A live log for database `database_id` opened on this node, the home its server's
    /// takeover number `takeover` made (see [`Self::live_folder`]).
    /// The one in use while sessions of an earlier entry hold it, if the same takeover made
    /// it.
    pub(crate) fn live_log(
        &self,
        database_id: &str,
        takeover: u64,
    ) -> Option<std::sync::Arc<LiveLog>> {
        let mut logs = self
            .live_logs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(live) = logs.get(database_id).and_then(std::sync::Weak::upgrade)
            && live.takeover == takeover
        {
            return Some(live);
        }
        let folder = self.live_folder(database_id)?;
        let live = std::sync::Arc::new(LiveLog::new(&self.db_file(database_id), folder, takeover));
        logs.retain(|_, l| l.strong_count() > 0);
        logs.insert(database_id.to_string(), std::sync::Arc::downgrade(&live));
        Some(live)
    }

    /// Notes that this node's copy of database `database_id` is behind what was acknowledged:
    /// sessions may not open it until a takeover replaces it.
    pub(crate) fn mark_behind(&self, database_id: &str) {
        self.behind
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(database_id.to_ascii_lowercase());
    }

    /// Database `database_id`'s copy on this node was replaced from the bucket.
    pub(crate) fn forget_behind(&self, database_id: &str) {
        self.behind
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&database_id.to_ascii_lowercase());
    }

    /// Whether this node's copy of database `database_id` was found behind (and not replaced
    /// since).
    pub(crate) fn found_behind(&self, database_id: &str) -> bool {
        self.behind
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains(&database_id.to_ascii_lowercase())
    }

    /// Forgets database `database_id`'s live log in use (its file is replaced, or it was
    /// fenced off): the next entry opens a log of its own.
    pub(crate) fn forget_live_log(&self, database_id: &str) {
        self.live_logs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(database_id);
    }

    /// Starts a new lineage in database `database_id`'s live log: a fence of this home's own
    /// takeover number `takeover` (it fences nobody off), after which what the log shipped
    /// before does not count. A geo-secondary that becomes the primary carries on its
    /// partner's log, not its own earlier one (a failover and back would otherwise find its
    /// log behind its old pieces). Logged, not failed: a takeover would refuse the database
    /// anyway while it is in a link.
    pub(crate) async fn start_live_lineage_fence(&self, database_id: &str, takeover: u64) {
        let Some(folder) = self.live_folder(database_id) else {
            return;
        };
        self.forget_live_log(database_id);
        let node = self.host.node_name();
        let put = tokio::task::spawn_blocking(move || fence(&folder, takeover, &node).map(drop))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()));
        if let Err(e) = put {
            tracing::warn!(database = database_id, error = %e, "a live log's new lineage was not started");
        }
    }

    /// Deletes the pieces of database `database_id`'s live log numbered below `below` (all
    /// of them: `None`, as when it was dropped, after a fence no home passes: a home cut off
    /// from the others that still runs must not acknowledge a commit to a dropped database),
    /// its fences excepted (a fenced-off home that still runs must keep failing).
    pub(crate) async fn remove_live_log(&self, database_id: &str, below: Option<u64>) {
        if below.is_none() {
            self.forget_live_log(database_id);
        }
        let Some(folder) = self.live_folder(database_id) else {
            return;
        };
        let node = self.host.node_name();
        let removed = tokio::task::spawn_blocking(move || {
            if below.is_none() {
                fence(&folder, u64::MAX, &node)?;
            }
            let pieces: Vec<String> = pieces_of(&folder)?
                .into_iter()
                .filter(|p| p.generation.is_some() && below.is_none_or(|b| p.seq < b))
                .map(|p| piece_name(p.seq))
                .collect();
            folder.delete(&pieces).map_err(LiveError::from)
        })
        .await;
        match removed {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(database = database_id, error = %e, "the live log of a dropped database was not removed from the bucket");
            }
            Err(e) => {
                tracing::warn!(database = database_id, error = %e, "the live log of a dropped database was not removed from the bucket");
            }
        }
    }
}

/// Fences the live log in `folder` off for takeover `takeover` by node `node`: a fence at the
/// next piece's number, so that the node that wrote it can ship nothing more (and no home of
/// an earlier takeover ever again). Returns the pieces before the fence and the fence's number.
pub(crate) fn fence(
    folder: &BlockingFolder,
    takeover: u64,
    node: &str,
) -> Result<(Vec<LivePiece>, u64), LiveError> {
    let bytes = fence_bytes(takeover, node);
    for _ in 0..20 {
        let pieces = pieces_of(folder)?;
        let next = pieces.last().map_or(0, |p| p.seq + 1);
        match folder.put_new(&piece_name(next), &bytes) {
            Ok(()) => return Ok((pieces, next)),
            // The old home shipped one more meanwhile: fence after it.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(LiveError::Behind(
        "the live log kept growing while it was fenced off".into(),
    ))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use std::sync::Arc;

    fn key() -> DatabaseKey {
        DatabaseKey::new([3; 32], *b"live-log-test-01")
    }

    fn folder() -> BlockingFolder {
        BlockingFolder::new(Arc::new(kagi_blobs::object_store::memory::InMemory::new()))
    }

    #[test]
    fn names_are_numbers() {
        assert_eq!(piece_name(42), "000000000042");
        assert_eq!(piece_seq("000000000042"), Some(42));
        assert_eq!(piece_seq("00000000042"), None);
        assert_eq!(piece_seq("00000000004x"), None);
    }

    #[test]
    fn commits_ship_once_in_order_and_a_fence_stops_the_writer() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("d.db");
        let conn = crate::engine::open_blocking(&db, &key()).unwrap();
        let bucket = folder();
        let live = LiveLog::new(&db, bucket.clone(), 0);
        // Nothing committed: nothing shipped.
        live.ship(&key()).unwrap();
        assert!(pieces_of(&bucket).unwrap().is_empty());
        conn.execute_batch("CREATE TABLE t (v); INSERT INTO t VALUES (1);")
            .unwrap();
        live.ship(&key()).unwrap();
        live.ship(&key()).unwrap();
        conn.execute_batch("INSERT INTO t VALUES (2);").unwrap();
        live.ship(&key()).unwrap();
        let pieces = pieces_of(&bucket).unwrap();
        assert_eq!(pieces.len(), 2, "{pieces:?}");
        assert_eq!((pieces[0].first, pieces[1].first), (1, pieces[0].last + 1));
        // Another node fences; the next commit's ship fails and the one after too.
        let (before, at) = fence(&bucket, 1, "node-b").unwrap();
        assert_eq!((before, at), (pieces, 2));
        conn.execute_batch("INSERT INTO t VALUES (3);").unwrap();
        assert!(matches!(live.ship(&key()), Err(LiveError::TakenOver)));
        assert!(matches!(live.ship(&key()), Err(LiveError::TakenOver)));
        assert_eq!(pieces_of(&bucket).unwrap().len(), 3);
    }

    #[test]
    fn a_new_writer_carries_on_after_the_last_piece_and_prunes_what_backups_hold() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("d.db");
        let conn = crate::engine::open_blocking(&db, &key()).unwrap();
        let bucket = folder();
        conn.execute_batch("CREATE TABLE t (v); INSERT INTO t VALUES (1);")
            .unwrap();
        LiveLog::new(&db, bucket.clone(), 0).ship(&key()).unwrap();
        // Committed after the last ship (a crash before it): a new writer ships just that.
        conn.execute_batch("INSERT INTO t VALUES (2);").unwrap();
        let live = LiveLog::new(&db, bucket.clone(), 0);
        live.ship(&key()).unwrap();
        let pieces = pieces_of(&bucket).unwrap();
        assert_eq!(pieces.len(), 2);
        assert_eq!(pieces[1].first, pieces[0].last + 1);
        conn.execute_batch("INSERT INTO t VALUES (3);").unwrap();
        live.ship(&key()).unwrap();
        // Backups up to the second piece: the first two go (the newest stays in any case).
        let cursor = Cursor {
            generation: pieces[1].generation,
            frames: pieces[1].last,
            drained: false,
        };
        live.prune(&cursor, None).unwrap();
        let left = pieces_of(&bucket).unwrap();
        assert_eq!(left.iter().map(|p| p.seq).collect::<Vec<_>>(), vec![2]);
        let all = Cursor {
            frames: left[0].last,
            ..cursor
        };
        live.prune(&all, None).unwrap();
        assert_eq!(pieces_of(&bucket).unwrap().len(), 1);
        // A fence (another node's takeover) is never pruned: the writer it fenced off would
        // then create that piece.
        fence(&bucket, 1, "node-b").unwrap();
        // A home of an earlier takeover opened after the fence refuses at once (a restart of
        // the old home); the new home carries on.
        let restarted = LiveLog::new(&db, bucket.clone(), 0);
        assert!(matches!(restarted.ship(&key()), Err(LiveError::TakenOver)));
        assert!(restarted.fenced());
        let taken = LiveLog::new(&db, bucket.clone(), 1);
        conn.execute_batch("INSERT INTO t VALUES (4);").unwrap();
        taken.ship(&key()).unwrap();
        let now = pieces_of(&bucket).unwrap();
        let newest = now.last().unwrap();
        taken
            .prune(
                &Cursor {
                    generation: newest.generation,
                    frames: newest.last,
                    drained: false,
                },
                None,
            )
            .unwrap();
        let left = pieces_of(&bucket).unwrap();
        assert_eq!(left.len(), 2, "{left:?}");
        assert_eq!(left[0].generation, None);
        assert!(matches!(live.ship(&key()), Err(LiveError::TakenOver)));
    }

    #[test]
    fn pieces_before_a_full_backups_live_from_go_whatever_their_generation() {
        let dir = tempfile::tempdir().unwrap();
        let (db, other) = (dir.path().join("d.db"), dir.path().join("e.db"));
        let bucket = folder();
        // Pieces of another log first (as a database re-seeded from its geo-partner leaves:
        // salts that need not order before the new log's).
        let conn = crate::engine::open_blocking(&other, &key()).unwrap();
        conn.execute_batch("CREATE TABLE t (v); INSERT INTO t VALUES (1);")
            .unwrap();
        let first = LiveLog::new(&other, bucket.clone(), 0);
        first.ship(&key()).unwrap();
        conn.execute_batch("INSERT INTO t VALUES (2);").unwrap();
        first.ship(&key()).unwrap();
        // A log opened now learns the next number from the bucket, and changes nothing.
        let live = LiveLog::new(&db, bucket.clone(), 0);
        assert_eq!(live.next_piece().unwrap(), 2);
        let conn = crate::engine::open_blocking(&db, &key()).unwrap();
        conn.execute_batch("CREATE TABLE u (v); INSERT INTO u VALUES (1);")
            .unwrap();
        live.ship(&key()).unwrap();
        conn.execute_batch("INSERT INTO u VALUES (2);").unwrap();
        live.ship(&key()).unwrap();
        assert_eq!(live.next_piece().unwrap(), 4);
        let pieces = pieces_of(&bucket).unwrap();
        // Backups of the new log to its first piece, their full one taken from piece 2 on.
        let cursor = Cursor {
            generation: pieces[2].generation,
            frames: pieces[2].last,
            drained: false,
        };
        live.prune(&cursor, Some(2)).unwrap();
        let left: Vec<u64> = pieces_of(&bucket).unwrap().iter().map(|p| p.seq).collect();
        assert_eq!(left, vec![3]);
    }
}
