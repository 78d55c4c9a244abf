//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::Path;

use kagi_sqlite_crypt::DatabaseKey;
use rusqlite::Connection;

/// A key for database number `n` (the DEK differs per `n` unless `same_dek`).
pub fn key(n: u8) -> DatabaseKey {
    DatabaseKey::new([n ^ 0x5a; 32], [n; 16])
}

/// A key with the DEK of `key(1)` but the database id of `key(n)`.
pub fn key_with_shared_dek(n: u8) -> DatabaseKey {
    DatabaseKey::new([1 ^ 0x5a; 32], [n; 16])
}

/// A plaintext value that is easy to find in a file.
pub fn marker(i: i64) -> String {
    format!("PLAINTEXT-MARKER-{i:08}-{}", "confidential ".repeat(16))
}

/// The part of every marker the greps look for.
pub const NEEDLE: &[u8] = b"PLAINTEXT-MARKER-";

/// Whether `hay` contains `needle`.
pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Inserts rows `0..n` of markers into `t(id, body)` in one transaction.
pub fn fill(conn: &Connection, n: i64) {
    conn.execute_batch("CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, body TEXT NOT NULL)")
        .expect("create");
    let tx = conn.unchecked_transaction().expect("begin");
    {
        let mut insert = tx
            .prepare("INSERT INTO t(id, body) VALUES (?1, ?2)")
            .expect("prepare");
        for i in 0..n {
            insert.execute((i, marker(i))).expect("insert");
        }
    }
    tx.commit().expect("commit");
}

/// Calls `f` with each row of `t` in id order until it returns false.
pub fn each_row(conn: &Connection, mut f: impl FnMut(rusqlite::Result<(i64, String)>) -> bool) {
    let mut stmt = conn
        .prepare("SELECT id, body FROM t ORDER BY id")
        .expect("prepare");
    let rows = stmt
        .query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))
        .expect("query");
    for row in rows {
        if !f(row) {
            return;
        }
    }
}

/// Checks that `t` holds exactly rows `0..n` with their markers.
pub fn verify(conn: &Connection, n: i64) {
    let mut expected = 0;
    each_row(conn, |row| {
        let (id, body) = row.expect("row");
        assert_eq!(id, expected);
        assert_eq!(body, marker(id));
        expected += 1;
        true
    });
    assert_eq!(expected, n);
}

/// The bytes of a file, or nothing when it does not exist.
pub fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_default()
}

/// `path` with a suffix appended (`-wal`, `-journal`).
pub fn sibling(path: &Path, suffix: &str) -> std::path::PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    s.into()
}
