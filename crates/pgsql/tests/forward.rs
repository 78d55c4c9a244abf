//! Two front ends, one the upstream of the other for srv1 (`Gateway::upstream`): psql, a raw
//! client and cancel requests reach srv1's databases through the second, which splices the
//! connection to the first after the StartupMessage. Authentication is the upstream's, end to
//! end; the forwarded marker grants nothing and is never forwarded twice; an upstream that is
//! down or silent is a FATAL 57P03 naming it, in bounded time. A CancelRequest reaching a
//! third front end, which knows neither the session nor its splice, is passed on once to its
//! peers (`Gateway::cancel_peers`), and reaches the session through the edge.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::io::{Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;

/// (home, edge): the edge forwards srv1 to the home and serves srv2 itself.
fn pair() -> (Env, Env) {
    let home = Env::start();
    let edge = Env::start();
    edge.gateway
        .forward("srv1", home.upstream("srv1", "home", "edge"));
    (home, edge)
}

fn tables(env: &Env, server: &str) -> Vec<String> {
    let c = kagi_pgsql::rusqlite::Connection::open(env.gateway.db_path(server, "db1")).unwrap();
    let mut q = c
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
        .unwrap();
    q.query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

#[test]
fn psql_reaches_a_server_through_the_front_end_that_forwards_it() {
    let (home, edge) = pair();
    // SCRAM end to end with the home; the rows are in the home's database only.
    let c = edge.conninfo("srv1", ADMIN, "db1");
    let out = ok(&edge.psql(
        &c,
        ADMIN_PW,
        &[
            "-At",
            "-c",
            "CREATE TABLE fwd (v text)",
            "-c",
            "INSERT INTO fwd VALUES ('through the edge')",
            "-c",
            "SELECT v FROM fwd",
        ],
    ));
    assert!(out.contains("through the edge"), "{out}");
    assert_eq!(tables(&home, "srv1"), ["fwd"]);
    assert!(tables(&edge, "srv1").is_empty());
    // A wrong password is refused by the home, through the edge.
    let o = edge.psql(&c, "wrong", &["-c", "SELECT 1"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("password authentication failed for user \"admin\""),
        "{}",
        stderr(&o)
    );
    // An access token, the server named by the user name (no SNI): the edge names it to the
    // home by its host name.
    let c = edge.conninfo_ip(&format!("{ENTRA}@srv1"), "db1");
    assert_eq!(
        ok(&edge.psql(&c, TOKEN, &["-At", "-c", "SELECT v FROM fwd"])).trim(),
        "through the edge"
    );
    // srv2 is the edge's own.
    let c = edge.conninfo("srv2", ADMIN, "db1");
    ok(&edge.psql(&c, ADMIN_PW, &["-c", "CREATE TABLE mine (v int)"]));
    assert_eq!(tables(&edge, "srv2"), ["mine"]);
    assert!(tables(&home, "srv2").is_empty());
}

#[test]
fn a_cancel_request_reaching_the_forwarding_front_end_reaches_the_session() {
    let (home, edge) = pair();
    let c = edge.conninfo("srv1", ADMIN, "db1");
    let sql =
        "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c";
    // psql sends its CancelRequest to the address it connected to, the edge.
    let o = psql_ctrl_c(&edge, &c, &home, sql);
    assert!(
        stderr(&o).contains("ERROR:  57014: canceling statement due to user request"),
        "{}",
        stderr(&o)
    );
}

/// A peer that counts the connections it gets and closes them at once (no TLS): in every
/// front end's peer list, it counts how often a cancel is passed on.
fn counting_peer(ca_of: &Env) -> (kagi_pgsql::Upstream, Arc<AtomicUsize>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut peer = ca_of.cancel_peer("counter");
    peer.address = listener.local_addr().unwrap().to_string();
    let count = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&count);
    std::thread::spawn(move || {
        for s in listener.incoming() {
            counted.fetch_add(1, Ordering::SeqCst);
            drop(s);
        }
    });
    (peer, count)
}

#[test]
fn a_cancel_request_reaching_a_third_front_end_is_passed_on_once_and_reaches_the_session() {
    let (home, edge) = pair();
    let third = Env::start();
    let (counter, passed) = counting_peer(&home);
    // Each peer list names the others and the counter, pointing back: a cancel passed on again
    // would show at the counter (and could loop). The third's names the edge, not the home: the
    // cancel must reach the session through the edge's splice.
    home.gateway.set_cancel_peers(vec![
        edge.cancel_peer("edge"),
        third.cancel_peer("third"),
        counter.clone(),
    ]);
    edge.gateway.set_cancel_peers(vec![
        home.cancel_peer("home"),
        third.cancel_peer("third"),
        counter.clone(),
    ]);
    third
        .gateway
        .set_cancel_peers(vec![edge.cancel_peer("edge"), counter]);
    // A session through the edge: its BackendKeyData is the home's.
    let (mut s, pid, key) = raw_session_with_key(&edge);
    s.write_all(&query(
        "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c",
    ))
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    // A wrong key, at the third: passed on once (the counter's one connection), known to no
    // one; the statement runs on.
    send_cancel(&third, pid, key ^ 1);
    assert_eq!(passed.load(Ordering::SeqCst), 1);
    // The same at the edge: it passes it on to the home, the third and the counter, none of
    // which passes it on again.
    send_cancel(&edge, pid, key.wrapping_add(1));
    assert_eq!(passed.load(Ordering::SeqCst), 2);
    s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let mut byte = [0u8; 1];
    let still = s.read(&mut byte).unwrap_err();
    assert!(
        matches!(
            still.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
        "{still:?}"
    );
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // The right key, at the third: passed on to the edge, which sends it on to the home.
    let t0 = Instant::now();
    send_cancel(&third, pid, key);
    let r = read_until(&mut s, b'Z');
    let e = r.iter().find(|(t, _)| *t == b'E').expect("an error");
    assert_eq!(error_code(&e.1), "57014", "{r:?}");
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    assert_eq!(passed.load(Ordering::SeqCst), 3);
    // The session goes on.
    s.write_all(&query("SELECT 1")).unwrap();
    let r = read_until(&mut s, b'Z');
    assert!(r.iter().all(|(t, _)| *t != b'E'), "{r:?}");
}

#[test]
fn the_forwarded_marker_grants_nothing_and_is_never_forwarded_twice() {
    let (home, edge) = pair();
    let marked = |user: &str| {
        startup(&[
            ("user", user),
            ("database", "db1"),
            (kagi_pgsql::FORWARDED_BY, "someone"),
        ])
    };
    // Sent by a client straight to the home: it still authenticates, and a wrong token fails.
    let mut s = connect(&home);
    s.write_all(&marked(&format!("{ENTRA}@srv1"))).unwrap();
    let r = read_until(&mut s, b'R');
    assert_eq!(r.last().unwrap().1, 3u32.to_be_bytes(), "{r:?}");
    s.write_all(&msg(b'p', b"not-a-token\0")).unwrap();
    let r = read_until(&mut s, b'E');
    assert_eq!(error_code(&r.last().unwrap().1), "28P01");
    // With the right token the session opens, without the marker among its settings.
    let mut s = connect(&home);
    s.write_all(&marked(&format!("{ENTRA}@srv1"))).unwrap();
    read_until(&mut s, b'R');
    let mut pw = TOKEN.as_bytes().to_vec();
    pw.push(0);
    s.write_all(&msg(b'p', &pw)).unwrap();
    let r = read_until(&mut s, b'Z');
    assert_eq!(r.last().unwrap().0, b'Z', "{r:?}");
    s.write_all(&msg(
        b'Q',
        format!("SHOW {}\0", kagi_pgsql::FORWARDED_BY).as_bytes(),
    ))
    .unwrap();
    let r = read_until(&mut s, b'Z');
    assert!(r.iter().any(|(t, _)| *t == b'E'), "{r:?}");
    // A forwarded connection for a server the edge forwards again: refused, not looped.
    let mut s = connect(&edge);
    s.write_all(&marked(&format!("{ADMIN}@srv1"))).unwrap();
    let r = read_until(&mut s, b'E');
    let e = &r.last().unwrap().1;
    assert_eq!(error_code(e), "57P03");
    assert!(
        error_field(e, b'M').contains("already forwarded once")
            && !error_field(e, b'M').contains("'someone'")
            && !error_field(e, b'M').contains("'home'"),
        "{e:?}"
    );
}

#[test]
fn an_upstream_that_is_down_or_silent_is_a_fatal_57p03_naming_no_node() {
    let edge = Env::start_with(|c| c.upstream_timeout = Duration::from_secs(1));
    let home = Env::start();
    // Nothing listens at its address any more.
    let mut gone = home.upstream("srv1", "home", "edge");
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    gone.address = closed.local_addr().unwrap().to_string();
    drop(closed);
    edge.gateway.forward("srv1", gone.clone());
    let c = edge.conninfo("srv1", ADMIN, "db1");
    let t0 = Instant::now();
    let o = edge.psql(&c, ADMIN_PW, &["-c", "SELECT 1"]);
    assert!(!o.status.success());
    // Before authentication the client learns no node's name nor address.
    assert!(
        stderr(&o).contains("FATAL:  the node serving this server cannot be reached now"),
        "{}",
        stderr(&o)
    );
    assert!(
        !stderr(&o).contains("'home'") && !stderr(&o).contains(&gone.address),
        "{}",
        stderr(&o)
    );
    assert!(t0.elapsed() < Duration::from_secs(5));
    let mut s = connect(&edge);
    s.write_all(&startup(&[("user", "admin@srv1")])).unwrap();
    let r = read_until(&mut s, b'E');
    assert_eq!(error_code(&r.last().unwrap().1), "57P03", "{r:?}");
    // Accepts TCP but never answers: refused after the upstream timeout, not hung.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    gone.address = silent.local_addr().unwrap().to_string();
    edge.gateway.forward("srv1", gone);
    let t0 = Instant::now();
    let o = edge.psql(&c, ADMIN_PW, &["-c", "SELECT 1"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("the node serving this server cannot be reached")
            && !stderr(&o).contains("'home'"),
        "{}",
        stderr(&o)
    );
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(8),
        "{took:?}"
    );
}
