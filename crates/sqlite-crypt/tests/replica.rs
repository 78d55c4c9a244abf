//! A replica kept current by copying the write-ahead log's bytes from another copy of the same
//! database (what the SQL service's geo-replication does): `reread_wal` makes its readers see
//! the frames appended from outside SQLite, and readers in a transaction keep their snapshot.

mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use common::key;
use kagi_sqlite_crypt::{is_open, open, open_existing, open_read_only, reread_wal};
use rusqlite::Connection;

fn wal(p: &Path) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push("-wal");
    PathBuf::from(s)
}

fn count(c: &Connection) -> i64 {
    c.query_row("SELECT count(*) FROM t", [], |r| r.get(0))
        .expect("count")
}

fn insert(c: &Connection, from: i64, to: i64) {
    c.execute(
        "WITH RECURSIVE s(x) AS (SELECT ?1 UNION ALL SELECT x + 1 FROM s WHERE x < ?2) \
         INSERT INTO t SELECT x, randomblob(300) FROM s",
        [from, to],
    )
    .expect("insert");
}

/// Copies bytes `from..` of the primary's WAL to the same offsets of the replica's, under the
/// replica's write lock, then (with `reread`) makes its readers look again.
fn ship(primary: &Path, replica: &Path, applier: &Connection, from: u64, reread: bool) -> u64 {
    let bytes = std::fs::read(wal(primary)).expect("primary wal");
    applier
        .execute_batch("BEGIN IMMEDIATE")
        .expect("write lock");
    let out = std::fs::OpenOptions::new()
        .write(true)
        .open(wal(replica))
        .expect("replica wal");
    out.write_all_at(&bytes[from as usize..], from)
        .expect("write");
    out.sync_data().expect("sync");
    if reread {
        assert!(reread_wal(replica).expect("reread"));
    }
    applier.execute_batch("ROLLBACK").expect("unlock");
    bytes.len() as u64
}

#[test]
fn frames_copied_into_a_replicas_log_are_seen_after_reread() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (primary, replica) = (dir.path().join("p.db"), dir.path().join("r.db"));
    let p = open(&primary, &key(3)).expect("primary");
    // The service's settings: SQLite never checkpoints on its own.
    p.pragma_update(None, "wal_autocheckpoint", 0)
        .expect("pragma");
    p.execute_batch("CREATE TABLE t (v INTEGER PRIMARY KEY, pad BLOB)")
        .expect("create");
    insert(&p, 1, 10);
    // The replica: the main file and the log as they are (same DEK and id, other path).
    std::fs::copy(&primary, &replica).expect("copy main");
    let mut shipped = std::fs::copy(wal(&primary), wal(&replica)).expect("copy wal");
    let applier = open_existing(&replica, &key(3)).expect("applier");
    applier
        .pragma_update(None, "wal_autocheckpoint", 0)
        .expect("pragma");
    let reader = open_read_only(&replica, &key(3)).expect("reader");
    assert_eq!(count(&reader), 10);
    // A reader inside a transaction, at 10 rows.
    let held = open_read_only(&replica, &key(3)).expect("held");
    held.execute_batch("BEGIN").expect("begin");
    assert_eq!(count(&held), 10);

    // Frames appended without telling SQLite: its index does not know them.
    insert(&p, 11, 20);
    shipped = ship(&primary, &replica, &applier, shipped, false);
    assert_eq!(count(&reader), 10, "the wal-index was not told");
    // Told: the next transaction rebuilds the index from the log.
    insert(&p, 21, 30);
    shipped = ship(&primary, &replica, &applier, shipped, true);
    assert_eq!(count(&reader), 30);
    // The reader in its transaction keeps its snapshot, then sees the rest.
    assert_eq!(count(&held), 10);
    held.execute_batch("COMMIT").expect("end");
    assert_eq!(count(&held), 30);
    // The replica's pages open under the same key and pass SQLite's checks.
    let verdict: String = reader
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .expect("check");
    assert_eq!(verdict, "ok");
    // More rows, one more time; the replica never wrote a frame of its own.
    insert(&p, 31, 40);
    ship(&primary, &replica, &applier, shipped, true);
    assert_eq!(count(&reader), 40);
    assert_eq!(
        std::fs::read(wal(&primary)).expect("p"),
        std::fs::read(wal(&replica)).expect("r")
    );
    assert!(is_open(&replica).expect("open"));
    drop((reader, held, applier));
    assert!(!is_open(&replica).expect("closed"));
    // Nothing open: nothing to tell, and the next open reads the log anyway.
    assert!(!reread_wal(&replica).expect("reread"));
    assert_eq!(
        count(&open_read_only(&replica, &key(3)).expect("again")),
        40
    );
}
