//! Several threads, each with its own connection: one writer moving money between accounts,
//! readers checking in every read transaction that the total never changes.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use kagi_sqlite_crypt::{open, open_read_only};

const ACCOUNTS: i64 = 200;
const TOTAL: i64 = ACCOUNTS * 1_000;

#[test]
fn readers_and_a_writer_share_a_database_across_threads() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = Arc::new(dir.path().join("bank.db"));
    let setup = open(&*path, &common::key(1)).expect("open");
    setup
        .execute_batch(
            "CREATE TABLE accounts(id INTEGER PRIMARY KEY, balance INTEGER NOT NULL, pad BLOB);
             PRAGMA wal_autocheckpoint = 20;",
        )
        .expect("schema");
    for id in 0..ACCOUNTS {
        setup
            .execute(
                "INSERT INTO accounts VALUES (?1, 1000, randomblob(500))",
                [id],
            )
            .expect("insert");
    }
    let done = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..4)
        .map(|i| {
            let (path, done) = (Arc::clone(&path), Arc::clone(&done));
            std::thread::spawn(move || {
                let key = common::key(1);
                let conn = if i % 2 == 0 {
                    open(&*path, &key)
                } else {
                    open_read_only(&*path, &key)
                }
                .expect("reader");
                conn.busy_timeout(std::time::Duration::from_secs(30))
                    .expect("busy timeout");
                let mut reads = 0;
                while !done.load(Ordering::Acquire) || reads == 0 {
                    let total: i64 = conn
                        .query_row("SELECT sum(balance) FROM accounts", [], |r| r.get(0))
                        .expect("read");
                    assert_eq!(total, TOTAL);
                    reads += 1;
                }
                reads
            })
        })
        .collect();
    let writer = {
        let path = Arc::clone(&path);
        std::thread::spawn(move || {
            let mut conn = open(&*path, &common::key(1)).expect("writer");
            conn.busy_timeout(std::time::Duration::from_secs(30))
                .expect("busy timeout");
            for n in 0..600i64 {
                let tx = conn
                    .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                    .expect("begin");
                let (from, to) = ((n * 7) % ACCOUNTS, (n * 13 + 1) % ACCOUNTS);
                tx.execute(
                    "UPDATE accounts SET balance = balance - 10, pad = randomblob(500) WHERE id = ?1",
                    [from],
                )
                .expect("debit");
                tx.execute(
                    "UPDATE accounts SET balance = balance + 10, pad = randomblob(500) WHERE id = ?1",
                    [to],
                )
                .expect("credit");
                tx.commit().expect("commit");
            }
        })
    };
    writer.join().expect("writer");
    done.store(true, Ordering::Release);
    for r in readers {
        assert!(r.join().expect("reader") > 0);
    }
    let total: i64 = setup
        .query_row("SELECT sum(balance) FROM accounts", [], |r| r.get(0))
        .expect("sum");
    assert_eq!(total, TOTAL);
    let check: String = setup
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .expect("integrity");
    assert_eq!(check, "ok");
}
