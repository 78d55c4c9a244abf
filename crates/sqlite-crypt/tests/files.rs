//! Encrypted databases on disk: round trips, what the files hold, what fails to open.

mod common;

use std::process::Command;

use common::{NEEDLE, contains, fill, key, key_with_shared_dek, read, sibling, verify};
use kagi_sqlite_crypt::{
    DatabaseKey, Error, backup, inspect, is_key_revoked, is_page_authentication_failure, open,
    open_existing, open_read_only, revoke_key,
};
use rusqlite::Connection;

const PAGE: usize = 4096;

#[test]
fn open_existing_never_makes_a_new_database() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("lost.db");
    assert!(matches!(
        open_existing(&path, &key(1)),
        Err(Error::Io { .. })
    ));
    assert!(!path.exists(), "nothing was created");
    std::fs::write(&path, b"").expect("empty file");
    assert!(matches!(
        open_existing(&path, &key(1)),
        Err(Error::NotKagiDatabase { .. })
    ));
    std::fs::remove_file(&path).expect("remove");
    let conn = open(&path, &key(1)).expect("create");
    conn.execute_batch("CREATE TABLE t (x); INSERT INTO t VALUES (1);")
        .expect("write");
    drop(conn);
    let conn = open_existing(&path, &key(1)).expect("open existing");
    let n: i64 = conn
        .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
        .expect("read");
    assert_eq!(n, 1);
}

#[test]
fn tables_larger_than_the_page_cache_round_trip() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("big.db");
    let conn = open(&path, &key(1)).expect("open");
    conn.execute_batch("PRAGMA cache_size = 16").expect("cache");
    fill(&conn, 20_000);
    let pages: i64 = conn
        .query_row("PRAGMA page_count", [], |r| r.get(0))
        .expect("page_count");
    assert!(
        pages > 16 * 20,
        "the table ({pages} pages) must dwarf the cache"
    );
    verify(&conn, 20_000);
    drop(conn);
    let conn = open(&path, &key(1)).expect("reopen");
    conn.execute_batch("PRAGMA cache_size = 16").expect("cache");
    verify(&conn, 20_000);
    let check: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .expect("integrity");
    assert_eq!(check, "ok");
}

#[test]
fn the_main_file_and_the_wal_hold_no_plaintext() {
    let dir = tempfile::tempdir().expect("tempdir");
    // The control: the same rows in a plain SQLite file are found by the grep.
    let plain = dir.path().join("plain.db");
    let conn = Connection::open(&plain).expect("plain");
    fill(&conn, 200);
    drop(conn);
    assert!(contains(&read(&plain), NEEDLE));

    let path = dir.path().join("enc.db");
    let conn = open(&path, &key(1)).expect("open");
    conn.execute_batch("PRAGMA wal_autocheckpoint = 0")
        .expect("no checkpoints");
    fill(&conn, 2_000);
    let wal = read(&sibling(&path, "-wal"));
    assert!(
        wal.len() > 100 * PAGE,
        "the rows are in the WAL ({} bytes)",
        wal.len()
    );
    assert!(!contains(&wal, NEEDLE));
    assert!(!contains(&read(&path), NEEDLE));
    assert!(
        !sibling(&path, "-shm").exists(),
        "the wal-index lives in memory"
    );
    conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")
        .expect("checkpoint");
    let main = read(&path);
    assert!(main.len() > 100 * PAGE);
    assert!(!contains(&main, NEEDLE));
    verify(&conn, 2_000);
}

#[test]
fn the_rollback_journal_holds_no_plaintext_and_rolls_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("journal.db");
    let conn = open(&path, &key(1)).expect("open");
    let mode: String = conn
        .query_row("PRAGMA journal_mode = DELETE", [], |r| r.get(0))
        .expect("journal mode");
    assert_eq!(mode, "delete");
    fill(&conn, 3_000);
    // A small cache makes SQLite spill changed pages to the database before the commit, so the
    // rollback below reads the journal back.
    conn.execute_batch("PRAGMA cache_size = 10; BEGIN; UPDATE t SET body = 'gone';")
        .expect("update");
    let journal = read(&sibling(&path, "-journal"));
    assert!(
        journal.len() > 100 * PAGE,
        "the journal holds the old pages ({} bytes)",
        journal.len()
    );
    assert!(!contains(&journal, NEEDLE));
    assert!(!contains(&read(&path), NEEDLE));
    conn.execute_batch("ROLLBACK").expect("rollback");
    verify(&conn, 3_000);
    drop(conn);
    let conn = open(&path, &key(1)).expect("reopen");
    verify(&conn, 3_000);
}

/// Runs the `sqlite3` shell on a file and returns its exit success and its stderr.
fn sqlite3_shell(path: &std::path::Path) -> (bool, String) {
    let out = Command::new("sqlite3")
        .arg(path)
        .arg("SELECT count(*) FROM t;")
        .output()
        .expect("the sqlite3 shell is installed (scripts/setup.sh)");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_sqlite3_shell_cannot_read_an_encrypted_database() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("shell.db");
    let conn = open(&path, &key(1)).expect("open");
    conn.execute_batch("PRAGMA wal_autocheckpoint = 0")
        .expect("no checkpoints");
    fill(&conn, 500);
    // With the WAL still full of frames.
    let (ok, err) = sqlite3_shell(&path);
    assert!(!ok);
    assert!(err.contains("file is not a database"), "{err}");
    drop(conn);
    let (ok, err) = sqlite3_shell(&path);
    assert!(!ok);
    assert!(err.contains("file is not a database"), "{err}");
}

/// Overwrites page `to` of a database file with page `from` of `source`.
fn copy_page(source: &std::path::Path, from: usize, dest: &std::path::Path, to: usize) {
    let src = read(source);
    let mut dst = read(dest);
    let page = src[(from - 1) * PAGE..from * PAGE].to_vec();
    dst[(to - 1) * PAGE..to * PAGE].copy_from_slice(&page);
    std::fs::write(dest, dst).expect("write");
}

/// Reads every row, expecting a page authentication failure and never a wrong row.
fn assert_reads_fail(conn: &Connection) {
    let mut failed = false;
    common::each_row(conn, |row| match row {
        Ok((id, body)) => {
            assert_eq!(body, common::marker(id), "never wrong data");
            true
        }
        Err(e) => {
            assert!(is_page_authentication_failure(&e), "{e:?}");
            failed = true;
            false
        }
    });
    assert!(failed, "every row read back although a page was replaced");
}

/// Creates a database of 1,000 rows at `path`.
fn create(path: &std::path::Path, key: &DatabaseKey) {
    fill(&open(path, key).expect("open"), 1_000);
}

#[test]
fn a_page_moved_to_another_offset_fails_to_read() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("moved.db");
    create(&path, &key(1));
    assert!(read(&path).len() >= 10 * PAGE);
    copy_page(&path, 5, &path, 6);
    let conn = open(&path, &key(1)).expect("reopen: page 1 is intact");
    assert_reads_fail(&conn);
}

#[test]
fn a_page_from_another_database_fails_to_read() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = dir.path().join("a.db");
    let b = dir.path().join("b.db");
    // Same DEK, other database id, same content: only the id tells the pages apart.
    create(&a, &key_with_shared_dek(1));
    create(&b, &key_with_shared_dek(2));
    copy_page(&b, 6, &a, 6);
    let conn = open(&a, &key_with_shared_dek(1)).expect("reopen");
    assert_reads_fail(&conn);
}

#[test]
fn a_wrong_key_or_id_or_a_plain_file_is_refused_clearly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("keyed.db");
    fill(&open(&path, &key(1)).expect("open"), 10);
    let wrong_dek = DatabaseKey::new([0xee; 32], [1; 16]);
    match open(&path, &wrong_dek) {
        Err(e @ Error::WrongKey { .. }) => {
            assert!(e.to_string().contains("does not open"), "{e}")
        }
        other => panic!("{other:?}"),
    }
    match open(&path, &key(2)) {
        Err(Error::DatabaseIdMismatch {
            expected, found, ..
        }) => {
            assert_eq!(expected, "02".repeat(16));
            assert_eq!(found, "01".repeat(16));
        }
        other => panic!("{other:?}"),
    }
    let info = inspect(&path).expect("inspect");
    assert_eq!(info.database_id, [1; 16]);
    assert_eq!(info.format_version, 1);

    let plain = dir.path().join("plain.db");
    fill(&Connection::open(&plain).expect("plain"), 10);
    assert!(matches!(
        open(&plain, &key(1)),
        Err(Error::NotKagiDatabase { .. })
    ));
    assert!(matches!(
        inspect(&plain),
        Err(Error::NotKagiDatabase { reason, .. }) if reason.contains("plain")
    ));
    // Nothing went wrong with the right key.
    verify(&open(&path, &key(1)).expect("open"), 10);
}

#[test]
fn a_second_open_needs_the_same_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("twice.db");
    let first = open(&path, &key(1)).expect("open");
    fill(&first, 10);
    let other = DatabaseKey::new([0xee; 32], [1; 16]);
    assert!(matches!(
        open(&path, &other),
        Err(Error::KeyMismatch { .. })
    ));
    let second = open(&path, &key(1)).expect("same key");
    verify(&second, 10);
}

#[test]
fn attach_and_vacuum_into_from_sql_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = dir.path().join("a.db");
    let b = dir.path().join("b.db");
    let conn_b = open(&b, &key(2)).expect("open b");
    fill(&conn_b, 10);
    let conn = open(&a, &key(1)).expect("open a");
    // An open database's key is not reachable by path from SQL.
    let attach = conn.execute("ATTACH DATABASE ?1 AS other", [b.to_str().expect("utf-8")]);
    assert!(attach.is_err(), "{attach:?}");
    let copy = dir.path().join("copy.db");
    let vacuum = conn.execute("VACUUM INTO ?1", [copy.to_str().expect("utf-8")]);
    assert!(vacuum.is_err(), "{vacuum:?}");
    assert!(!contains(&read(&copy), NEEDLE));
    // A temporary database is fine (it gets a key of its own).
    conn.execute_batch("ATTACH DATABASE '' AS scratch; CREATE TABLE scratch.s(x); INSERT INTO scratch.s VALUES (1);")
        .expect("attach a temporary database");
}

#[test]
fn backup_copies_a_snapshot_under_another_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("live.db");
    let conn = open(&path, &key(1)).expect("open");
    fill(&conn, 3_000);
    let copy = dir.path().join("backup.db");
    backup(&conn, &copy, &key(7)).expect("backup");
    assert!(!sibling(&copy, "-wal").exists(), "a single file");
    assert!(!contains(&read(&copy), NEEDLE));
    assert_eq!(inspect(&copy).expect("inspect").database_id, [7; 16]);
    assert!(matches!(
        open(&copy, &key(1)),
        Err(Error::DatabaseIdMismatch { .. })
    ));
    verify(&open_read_only(&copy, &key(7)).expect("open backup"), 3_000);
    // Writes after the backup are not in it.
    conn.execute("DELETE FROM t WHERE id >= 10", [])
        .expect("delete");
    verify(&open(&copy, &key(7)).expect("open backup"), 3_000);
    assert!(backup(&conn, &copy, &key(7)).is_err(), "never overwrites");
}

#[test]
fn a_revoked_key_stops_io_until_the_key_comes_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("revoked.db");
    let conn = open(&path, &key(1)).expect("open");
    fill(&conn, 2_000);
    let idle = open(&path, &key(1)).expect("a second connection");
    assert!(revoke_key(&path).expect("revoke"));
    // Pages SQLite still caches in memory are freed, the rest cannot be read.
    conn.execute_batch("PRAGMA shrink_memory").expect("shrink");
    for c in [&conn, &idle] {
        let err = c
            .query_row("SELECT sum(length(body)) FROM t", [], |r| {
                r.get::<_, i64>(0)
            })
            .expect_err("no key, no pages");
        assert!(is_key_revoked(&err), "{err:?}");
    }
    let err = conn
        .execute("INSERT INTO t(id, body) VALUES (-1, 'x')", [])
        .expect_err("no key, no writes");
    assert!(is_key_revoked(&err), "{err:?}");
    assert!(!revoke_key(&path).expect("revoke again"));
    // The key comes back with open (the database became accessible again).
    let again = open(&path, &key(1)).expect("reopen");
    verify(&again, 2_000);
    verify(&conn, 2_000);
    verify(&idle, 2_000);
}

#[test]
fn a_read_only_connection_reads_and_cannot_write() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("ro.db");
    drop({
        let conn = open(&path, &key(1)).expect("open");
        fill(&conn, 100);
        conn
    });
    let ro = open_read_only(&path, &key(1)).expect("read-only");
    verify(&ro, 100);
    assert!(ro.execute("DELETE FROM t", []).is_err());
    assert!(matches!(
        open_read_only(dir.path().join("missing.db"), &key(1)),
        Err(Error::Io { .. })
    ));
}
