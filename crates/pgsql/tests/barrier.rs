//! The commit barrier ([`CommitBarrier`]) on a raw client: nothing the session sends after a
//! commit (autocommit statement, COMMIT, a Query of several statements, a Sync) reaches the
//! client before the barrier passes; reads and rolled-back transactions never call it; a
//! barrier that fails ends the session with its error, FATAL, in place of the completion.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use common::*;
use kagi_pgsql::{CommitBarrier, PgError, rusqlite, sqlstate};

/// Longest wait for anything (only to end a test that would hang).
const LIMIT: Duration = Duration::from_secs(30);

#[derive(Default)]
struct Calls {
    /// Calls of `commit` so far.
    made: usize,
    /// Calls allowed to return.
    allowed: usize,
}

/// A barrier that counts its calls and holds each until the test releases it, then returns
/// `fails` (None: passes).
struct Gate {
    calls: Mutex<Calls>,
    changed: Condvar,
    fails: Mutex<Option<PgError>>,
}

impl Gate {
    /// Every call waits for a [`Gate::release`].
    fn holding() -> Arc<Self> {
        Arc::new(Self {
            calls: Mutex::default(),
            changed: Condvar::new(),
            fails: Mutex::new(None),
        })
    }

    /// Every call returns at once, with `error`.
    fn failing(error: PgError) -> Arc<Self> {
        let gate = Self::holding();
        gate.calls.lock().unwrap().allowed = usize::MAX;
        gate.fail_with(error);
        gate
    }

    fn fail_with(&self, error: PgError) {
        *self.fails.lock().unwrap() = Some(error);
    }

    fn made(&self) -> usize {
        self.calls.lock().unwrap().made
    }

    /// Waits until `commit` has been called `n` times.
    fn wait_calls(&self, n: usize) {
        let calls = self.calls.lock().unwrap();
        let (calls, wait) = self
            .changed
            .wait_timeout_while(calls, LIMIT, |c| c.made < n)
            .unwrap();
        assert!(
            !wait.timed_out(),
            "the barrier was called {} times, not {n}",
            calls.made
        );
    }

    /// Lets one more call return.
    fn release(&self) {
        self.calls.lock().unwrap().allowed += 1;
        self.changed.notify_all();
    }
}

impl CommitBarrier for Gate {
    fn commit(&self) -> Result<(), PgError> {
        let mut calls = self.calls.lock().unwrap();
        calls.made += 1;
        let me = calls.made;
        self.changed.notify_all();
        let (_calls, wait) = self
            .changed
            .wait_timeout_while(calls, LIMIT, |c| c.allowed < me)
            .unwrap();
        if wait.timed_out() {
            return Err(PgError::fatal(
                sqlstate::INTERNAL_ERROR,
                "the test never released the barrier",
            ));
        }
        self.fails.lock().unwrap().clone().map_or(Ok(()), Err)
    }
}

/// srv1/db1 with table `t(v)`, created beside the front end (no session commits it).
fn env_with_table(barrier: Arc<Gate>) -> Env {
    let env = Env::start();
    env.gateway.set_barrier(barrier);
    rusqlite::Connection::open(env.gateway.db_path("srv1", "db1"))
        .unwrap()
        .execute_batch("CREATE TABLE t(v INTEGER)")
        .unwrap();
    env
}

/// Rows of `t`, read beside the front end.
fn rows_in_t(env: &Env) -> i64 {
    rusqlite::Connection::open(env.gateway.db_path("srv1", "db1"))
        .unwrap()
        .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
        .unwrap()
}

fn types(msgs: &[(u8, Vec<u8>)]) -> String {
    msgs.iter().map(|(t, _)| char::from(*t)).collect()
}

/// Sends `sql` as a simple Query and reads up to its ReadyForQuery; the message types.
fn run(s: &mut UnixStream, sql: &str) -> String {
    s.write_all(&query(sql)).unwrap();
    types(&read_until(s, b'Z'))
}

/// Nothing arrives while the barrier holds a commit. (Called while the session's thread
/// is inside the barrier: a correct front end sends nothing however long this waits.)
#[track_caller]
fn assert_silent(s: &mut UnixStream) {
    s.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut b = [0u8; 1];
    let r = s.read(&mut b);
    assert!(
        matches!(&r, Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)),
        "the client heard from the session before the barrier passed: {r:?}"
    );
    s.set_read_timeout(Some(LIMIT)).unwrap();
}

#[track_caller]
fn assert_closed(s: &mut UnixStream) {
    let mut b = [0u8; 1];
    assert_eq!(s.read(&mut b).unwrap(), 0, "the connection is closed");
}

#[test]
fn commits_reach_the_client_only_after_the_barrier() {
    let gate = Gate::holding();
    let env = env_with_table(gate.clone());
    let mut s = raw_session(&env);
    s.set_read_timeout(Some(LIMIT)).unwrap();

    // Reads commit nothing: simple (one statement, several) and extended.
    assert_eq!(run(&mut s, "SELECT 1"), "TDCZ");
    assert_eq!(run(&mut s, "SELECT 1; SELECT count(*) FROM t"), "TDCTDCZ");
    let mut parse = b"\0SELECT v FROM t\0".to_vec();
    parse.extend_from_slice(&0i16.to_be_bytes());
    let execute = msg(b'E', b"\0\0\0\0\0");
    s.write_all(
        &[
            msg(b'P', &parse),
            msg(b'B', b"\0\0\0\0\0\0\0\0"),
            execute.clone(),
            msg(b'S', b""),
        ]
        .concat(),
    )
    .unwrap();
    assert_eq!(types(&read_until(&mut s, b'Z')), "12CZ");
    assert_eq!(gate.made(), 0, "reads call no barrier");

    // An autocommit INSERT: committed, but its completion waits for the barrier.
    s.write_all(&query("INSERT INTO t VALUES (1)")).unwrap();
    gate.wait_calls(1);
    assert_eq!(rows_in_t(&env), 1, "committed before the barrier is called");
    assert_silent(&mut s);
    gate.release();
    let r = read_until(&mut s, b'Z');
    assert_eq!(types(&r), "CZ");
    assert_eq!(r[0].1, b"INSERT 0 1\0");
    assert_eq!(gate.made(), 1);

    // BEGIN; INSERT; COMMIT as separate queries: the barrier once, at the COMMIT.
    assert_eq!(run(&mut s, "BEGIN"), "CZ");
    assert_eq!(run(&mut s, "INSERT INTO t VALUES (2)"), "CZ");
    assert_eq!(gate.made(), 1, "nothing committed inside the block yet");
    s.write_all(&query("COMMIT")).unwrap();
    gate.wait_calls(2);
    assert_silent(&mut s);
    gate.release();
    let r = read_until(&mut s, b'Z');
    assert_eq!(types(&r), "CZ");
    assert_eq!(r[0].1, b"COMMIT\0");

    // A rolled-back transaction commits nothing.
    assert_eq!(
        run(&mut s, "BEGIN; INSERT INTO t VALUES (9); ROLLBACK"),
        "CCCZ"
    );
    assert_eq!(gate.made(), 2);

    // One Query with a COMMIT in the middle: nothing of it, not even what came before the
    // commit, goes out before the barrier passes; the barrier runs once.
    s.write_all(&query(
        "BEGIN; INSERT INTO t VALUES (3); COMMIT; SELECT v FROM t ORDER BY v",
    ))
    .unwrap();
    gate.wait_calls(3);
    assert_silent(&mut s);
    gate.release();
    assert_eq!(types(&read_until(&mut s, b'Z')), "CCCTDDDCZ");

    // The extended protocol: the implicit transaction commits at the Sync. Flush sends the
    // INSERT's completion without a barrier (nothing committed yet); the Sync waits for it.
    let mut parse = b"\0INSERT INTO t VALUES (4)\0".to_vec();
    parse.extend_from_slice(&0i16.to_be_bytes());
    s.write_all(
        &[
            msg(b'P', &parse),
            msg(b'B', b"\0\0\0\0\0\0\0\0"),
            execute,
            msg(b'H', b""),
        ]
        .concat(),
    )
    .unwrap();
    assert_eq!(types(&read_until(&mut s, b'C')), "12C");
    assert_eq!(gate.made(), 3);
    s.write_all(&msg(b'S', b"")).unwrap();
    gate.wait_calls(4);
    assert_silent(&mut s);
    gate.release();
    assert_eq!(types(&read_until(&mut s, b'Z')), "Z");

    assert_eq!(gate.made(), 4);
    assert_eq!(rows_in_t(&env), 4);
}

#[test]
fn a_failed_barrier_ends_the_session_with_its_error() {
    let gate = Gate::failing(PgError::fatal(
        sqlstate::IO_ERROR,
        "could not ship the log to the bucket",
    ));
    let env = env_with_table(gate.clone());

    // COMMIT: the barrier's error, FATAL, in place of the COMMIT's completion; then closed.
    let mut s = raw_session(&env);
    s.set_read_timeout(Some(LIMIT)).unwrap();
    assert_eq!(run(&mut s, "BEGIN"), "CZ");
    assert_eq!(run(&mut s, "INSERT INTO t VALUES (1)"), "CZ");
    s.write_all(&query("COMMIT")).unwrap();
    let r = read_until(&mut s, b'E');
    assert_eq!(types(&r), "E", "{r:?}");
    assert_eq!(error_field(&r[0].1, b'S'), "FATAL");
    assert_eq!(error_field(&r[0].1, b'V'), "FATAL");
    assert_eq!(error_code(&r[0].1), sqlstate::IO_ERROR);
    assert_eq!(
        error_field(&r[0].1, b'M'),
        "could not ship the log to the bucket"
    );
    assert_closed(&mut s);
    assert_eq!(gate.made(), 1);

    // An autocommit INSERT, and a barrier error that is not FATAL: made FATAL.
    gate.fail_with(PgError::error(sqlstate::DISK_FULL, "the bucket is full"));
    let mut s = raw_session(&env);
    s.set_read_timeout(Some(LIMIT)).unwrap();
    s.write_all(&query("INSERT INTO t VALUES (2)")).unwrap();
    let r = read_until(&mut s, b'E');
    assert_eq!(types(&r), "E", "{r:?}");
    assert_eq!(error_field(&r[0].1, b'S'), "FATAL");
    assert_eq!(error_code(&r[0].1), sqlstate::DISK_FULL);
    assert_eq!(error_field(&r[0].1, b'M'), "the bucket is full");
    assert_closed(&mut s);
    assert_eq!(gate.made(), 2);

    // As with PostgreSQL's synchronous replication, the commits stand locally; a session
    // that only reads never meets the barrier.
    assert_eq!(rows_in_t(&env), 2);
    let mut s = raw_session(&env);
    s.set_read_timeout(Some(LIMIT)).unwrap();
    s.write_all(&query("SELECT count(*) FROM t")).unwrap();
    let r = read_until(&mut s, b'Z');
    assert_eq!(types(&r), "TDCZ");
    assert_eq!(gate.made(), 2);
}
