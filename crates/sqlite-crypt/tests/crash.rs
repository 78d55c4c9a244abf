//! kill -9 in the middle of transactions: after reopening, every committed transaction is
//! there in full and no uncommitted one is. The writer is this test binary run again as a child
//! (the `crash_child` test, which does nothing unless its environment variable is set).

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use kagi_sqlite_crypt::open;

const CHILD: &str = "KAGI_SQLITE_CRYPT_CRASH_CHILD";
/// Rows per transaction.
const ROWS: i64 = 150;

/// The child: commits transactions forever, printing each number after its COMMIT returned.
/// A small page cache makes SQLite spill pages mid-transaction and rewrite WAL frames in place.
#[test]
fn crash_child() {
    let Ok(spec) = std::env::var(CHILD) else {
        return;
    };
    let (path, mode) = spec.split_once('|').expect("path|mode");
    let conn = open(path, &common::key(1)).expect("open");
    conn.execute_batch(&format!(
        "PRAGMA journal_mode = {mode}; PRAGMA cache_size = 8;
         CREATE TABLE IF NOT EXISTS t(txn INTEGER, seq INTEGER, body BLOB);
         CREATE INDEX IF NOT EXISTS t_txn ON t(txn);"
    ))
    .expect("setup");
    let mut txn: i64 = conn
        .query_row("SELECT coalesce(max(txn), 0) FROM t", [], |r| r.get(0))
        .expect("max");
    loop {
        txn += 1;
        let tx = conn.unchecked_transaction().expect("begin");
        for seq in 0..ROWS {
            tx.execute(
                "INSERT INTO t(txn, seq, body) VALUES (?1, ?2, randomblob(300))",
                (txn, seq),
            )
            .expect("insert");
        }
        // Rewrites pages of earlier transactions too.
        tx.execute(
            "UPDATE t SET body = randomblob(300) WHERE txn = ?1 - 3",
            [txn],
        )
        .expect("update");
        tx.commit().expect("commit");
        println!("committed {txn}");
    }
}

/// Starts the child, waits for `commits` more commits, then kills it with SIGKILL.
fn run_child_and_kill(path: &std::path::Path, mode: &str, commits: usize) -> i64 {
    let mut child = Command::new(std::env::current_exe().expect("test binary"))
        .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
        .env(CHILD, format!("{}|{mode}", path.display()))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let stdout = child.stdout.take().expect("stdout");
    let mut last = 0;
    let mut seen = 0;
    for line in BufReader::new(stdout).lines() {
        let line = line.expect("line");
        if let Some(n) = line.strip_prefix("committed ") {
            last = n.parse().expect("number");
            seen += 1;
            if seen == commits {
                break;
            }
        }
    }
    child.kill().expect("SIGKILL");
    child.wait().expect("wait");
    assert_eq!(seen, commits, "the child stopped early");
    last
}

fn check_after_crash(path: &std::path::Path, last_reported: i64) -> i64 {
    let conn = open(path, &common::key(1)).expect("reopen after the crash");
    let check: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .expect("integrity");
    assert_eq!(check, "ok");
    let mut stmt = conn
        .prepare("SELECT txn, count(*) FROM t GROUP BY txn ORDER BY txn")
        .expect("prepare");
    let counts: Vec<(i64, i64)> = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("rows");
    let max = counts.last().map_or(0, |c| c.0);
    // Transactions the child committed after its last line was read are there too.
    assert!(max >= last_reported, "{max} vs {last_reported}");
    for (i, (txn, count)) in counts.iter().enumerate() {
        assert_eq!(*txn, i as i64 + 1, "no transaction lost");
        assert_eq!(*count, ROWS, "transaction {txn} is whole");
    }
    max
}

#[test]
fn committed_transactions_survive_kill_9() {
    for mode in ["WAL", "DELETE"] {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("crash.db");
        let mut committed = 0;
        for round in 0..4 {
            let last = run_child_and_kill(&path, mode, 3 + round);
            assert!(last > committed);
            committed = check_after_crash(&path, last);
        }
        let files: Vec<_> = std::fs::read_dir(dir.path())
            .expect("dir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        for name in &files {
            let bytes = common::read(&dir.path().join(name));
            assert!(
                !common::contains(&bytes, b"CREATE TABLE"),
                "{name:?} holds plaintext"
            );
        }
    }
}
