//! Temporary files (sorter runs of a big ORDER BY, a TEMP table) with `temp_store = FILE`: SQLite
//! unlinks them as soon as they are open, so the test reads them through /proc/self/fd while the
//! query holds them.

mod common;

use common::{NEEDLE, contains, fill, key};
use kagi_sqlite_crypt::open;

/// The contents of this process's open, unlinked SQLite temporary files.
fn open_temp_files() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc/self/fd").expect("fds") {
        let fd = entry.expect("fd").path();
        let Ok(target) = std::fs::read_link(&fd) else {
            continue;
        };
        if target.to_string_lossy().contains("etilqs_") {
            out.push(std::fs::read(&fd).unwrap_or_default());
        }
    }
    out
}

#[test]
fn temporary_files_hold_no_plaintext() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("temp.db");
    let conn = open(&path, &key(1)).expect("open");
    conn.execute_batch("PRAGMA temp_store = FILE; PRAGMA cache_size = 20;")
        .expect("pragmas");
    fill(&conn, 20_000);

    // A sort too big for the cache spills sorted runs to temporary files.
    let mut stmt = conn
        .prepare("SELECT body FROM t ORDER BY substr(body, 18) DESC")
        .expect("prepare");
    let mut rows = stmt.query([]).expect("query");
    let first: String = rows
        .next()
        .expect("step")
        .expect("a row")
        .get(0)
        .expect("body");
    assert!(first.starts_with("PLAINTEXT-MARKER-00019999"));
    let files = open_temp_files();
    let bytes: usize = files.iter().map(Vec::len).sum();
    assert!(
        bytes > 1 << 20,
        "the sort spilled ({} files, {bytes} bytes)",
        files.len()
    );
    assert!(files.iter().all(|f| !contains(f, NEEDLE)));
    drop(rows);
    drop(stmt);

    // A TEMP table bigger than the cache lives in a temporary database file.
    conn.execute_batch("CREATE TEMP TABLE copy AS SELECT * FROM t")
        .expect("temp table");
    let files = open_temp_files();
    let bytes: usize = files.iter().map(Vec::len).sum();
    assert!(bytes > 1 << 20, "the temp table is on disk ({bytes} bytes)");
    assert!(files.iter().all(|f| !contains(f, NEEDLE)));
    let n: i64 = conn
        .query_row(
            "SELECT count(*) FROM copy WHERE body LIKE 'PLAINTEXT-MARKER-%'",
            [],
            |r| r.get(0),
        )
        .expect("count");
    assert_eq!(n, 20_000);
}
