//! A hostile client on a raw socket: oversized and malformed startup packets, unknown and
//! lying messages after authentication, GSSENCRequest, garbage. Each gets an ErrorResponse
//! or a disconnect, and the server goes on serving.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::io::{Read, Write};

use common::*;

fn assert_alive(env: &Env) {
    let mut s = raw_session(env);
    let mut q = b"SELECT 1".to_vec();
    q.push(0);
    s.write_all(&msg(b'Q', &q)).unwrap();
    let msgs = read_until(&mut s, b'Z');
    assert!(msgs.iter().any(|(t, _)| *t == b'D'), "{msgs:?}");
}

#[test]
fn hostile_startup_packets() {
    let env = Env::start();
    // Longer than 10 000 bytes.
    let mut s = connect(&env);
    s.write_all(&100_000u32.to_be_bytes()).unwrap();
    let r = read_until(&mut s, b'E');
    assert_eq!(error_code(&r.last().unwrap().1), "08P01");
    // Shorter than a code.
    let mut s = connect(&env);
    s.write_all(&[0, 0, 0, 2]).unwrap();
    assert_eq!(
        error_code(&read_until(&mut s, b'E').last().unwrap().1),
        "08P01"
    );
    // Protocol 2.
    let mut s = connect(&env);
    let mut p = startup(&[("user", "x")]);
    p[4..8].copy_from_slice(&(2u32 << 16).to_be_bytes());
    s.write_all(&p).unwrap();
    assert_eq!(
        error_code(&read_until(&mut s, b'E').last().unwrap().1),
        "0A000"
    );
    // No user.
    let mut s = connect(&env);
    s.write_all(&startup(&[("database", "db1")])).unwrap();
    assert_eq!(
        error_code(&read_until(&mut s, b'E').last().unwrap().1),
        "28000"
    );
    // Parameters without their terminator.
    let mut s = connect(&env);
    let mut p = startup(&[("user", "x")]);
    p.pop();
    p[3] -= 1;
    s.write_all(&p).unwrap();
    assert_eq!(
        error_code(&read_until(&mut s, b'E').last().unwrap().1),
        "08P01"
    );
    // GSSENCRequest is declined with 'N'; the client may go on with a startup packet.
    let mut s = connect(&env);
    s.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30]).unwrap();
    let mut b = [0u8; 1];
    s.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"N");
    // A cancel request for nobody: just closed.
    let mut s = connect(&env);
    s.write_all(&[0, 0, 0, 16, 0x04, 0xd2, 0x16, 0x2e, 0, 0, 0, 1, 0, 0, 0, 2])
        .unwrap();
    assert!(read_until(&mut s, b'E').is_empty());
    // A client that sends garbage for SCRAM.
    let mut s = connect(&env);
    s.write_all(&startup(&[("user", "admin@srv1")])).unwrap();
    read_until(&mut s, b'R');
    let mut bad = b"SCRAM-SHA-256\0".to_vec();
    bad.extend_from_slice(&5u32.to_be_bytes());
    bad.extend_from_slice(b"x,y,z");
    s.write_all(&msg(b'p', &bad)).unwrap();
    assert_eq!(
        error_code(&read_until(&mut s, b'E').last().unwrap().1),
        "08P01"
    );
    // Random bytes.
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..50 {
        let mut s = connect(&env);
        let n = 1 + (seed % 300) as usize;
        let junk: Vec<u8> = (0..n)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect();
        let _ = s.write_all(&junk);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let _ = read_until(&mut s, b'E');
    }
    assert_alive(&env);
}

#[test]
fn hostile_messages_after_login() {
    let env = Env::start();
    // An unknown message type: FATAL 08P01, then the connection ends.
    let mut s = raw_session(&env);
    s.write_all(&msg(b'z', b"")).unwrap();
    let r = read_until(&mut s, b'E');
    assert_eq!(error_code(&r.last().unwrap().1), "08P01");
    assert!(read_until(&mut s, b'Z').is_empty(), "connection closed");
    // A length below 4.
    let mut s = raw_session(&env);
    s.write_all(&[b'Q', 0, 0, 0, 1]).unwrap();
    assert_eq!(
        error_code(&read_until(&mut s, b'E').last().unwrap().1),
        "08P01"
    );
    // Sync with a body longer than small messages may have.
    let mut s = raw_session(&env);
    s.write_all(&[b'S', 0, 1, 0, 0]).unwrap();
    assert_eq!(
        error_code(&read_until(&mut s, b'E').last().unwrap().1),
        "08P01"
    );
    // A Bind announcing more bytes than it carries.
    let mut s = raw_session(&env);
    let mut parse = b"\0SELECT $1\0".to_vec();
    parse.extend_from_slice(&0i16.to_be_bytes());
    let mut bind = b"\0\0".to_vec();
    bind.extend_from_slice(&0i16.to_be_bytes());
    bind.extend_from_slice(&1i16.to_be_bytes());
    bind.extend_from_slice(&1_000_000i32.to_be_bytes());
    s.write_all(&[msg(b'P', &parse), msg(b'B', &bind), msg(b'S', b"")].concat())
        .unwrap();
    let r = read_until(&mut s, b'E');
    assert_eq!(error_code(&r.last().unwrap().1), "08P01");
    // Extended protocol errors are statement errors: skip to Sync, then go on.
    let mut s = raw_session(&env);
    let mut bad_parse = b"\0SELEC 1\0".to_vec();
    bad_parse.extend_from_slice(&0i16.to_be_bytes());
    let mut exec = b"\0".to_vec();
    exec.extend_from_slice(&0i32.to_be_bytes());
    s.write_all(
        &[
            msg(b'P', &bad_parse),
            msg(b'B', b"\0\0\0\0\0\0\0\0"),
            msg(b'E', &exec),
            msg(b'S', b""),
        ]
        .concat(),
    )
    .unwrap();
    let r = read_until(&mut s, b'Z');
    let types: Vec<u8> = r.iter().map(|(t, _)| *t).collect();
    assert_eq!(types, b"EZ", "{r:?}");
    assert_eq!(error_code(&r[0].1), "42601");
    // Bind to a statement that does not exist; Execute of a missing portal.
    s.write_all(
        &[
            msg(b'B', b"\0nosuch\0\0\0\0\0\0\0"),
            msg(b'S', b""),
            msg(b'E', b"nope\0\0\0\0\0"),
            msg(b'S', b""),
        ]
        .concat(),
    )
    .unwrap();
    let r1 = read_until(&mut s, b'Z');
    let r2 = read_until(&mut s, b'Z');
    assert_eq!(error_code(&r1[0].1), "26000");
    assert_eq!(error_code(&r2[0].1), "34000");
    // Bind with a wrong parameter count.
    let mut parse = b"p1\0SELECT $1, $2\0".to_vec();
    parse.extend_from_slice(&0i16.to_be_bytes());
    s.write_all(
        &[
            msg(b'P', &parse),
            msg(b'B', b"\0p1\0\0\0\0\0\0\0"),
            msg(b'S', b""),
        ]
        .concat(),
    )
    .unwrap();
    let r = read_until(&mut s, b'Z');
    assert_eq!(
        error_code(&r.iter().find(|(t, _)| *t == b'E').unwrap().1),
        "08P01"
    );
    // A binary int8 parameter of the wrong width.
    let mut parse = b"p2\0SELECT $1\0".to_vec();
    parse.extend_from_slice(&1i16.to_be_bytes());
    parse.extend_from_slice(&20u32.to_be_bytes());
    let mut bind = b"\0p2\0".to_vec();
    bind.extend_from_slice(&1i16.to_be_bytes());
    bind.extend_from_slice(&1i16.to_be_bytes());
    bind.extend_from_slice(&1i16.to_be_bytes());
    bind.extend_from_slice(&3i32.to_be_bytes());
    bind.extend_from_slice(&[1, 2, 3]);
    bind.extend_from_slice(&0i16.to_be_bytes());
    s.write_all(&[msg(b'P', &parse), msg(b'B', &bind), msg(b'S', b"")].concat())
        .unwrap();
    let r = read_until(&mut s, b'Z');
    assert_eq!(
        error_code(&r.iter().find(|(t, _)| *t == b'E').unwrap().1),
        "22P03"
    );
    // Several statements in one Parse.
    let mut parse = b"\0SELECT 1; SELECT 2\0".to_vec();
    parse.extend_from_slice(&0i16.to_be_bytes());
    s.write_all(&[msg(b'P', &parse), msg(b'S', b"")].concat())
        .unwrap();
    let r = read_until(&mut s, b'Z');
    assert_eq!(error_code(&r[0].1), "42601");
    // A query that is not UTF-8: FATAL 22021.
    s.write_all(&msg(b'Q', b"SELECT '\xff'\0")).unwrap();
    assert_eq!(
        error_code(&read_until(&mut s, b'E').last().unwrap().1),
        "22021"
    );
    assert_alive(&env);
}

#[test]
fn execute_with_row_limit_suspends_the_portal() {
    let env = Env::start();
    let mut s = raw_session(&env);
    let mut q = b"CREATE TABLE n(v INTEGER); INSERT INTO n VALUES (1),(2),(3),(4),(5)".to_vec();
    q.push(0);
    s.write_all(&msg(b'Q', &q)).unwrap();
    read_until(&mut s, b'Z');
    let mut parse = b"\0SELECT v FROM n ORDER BY v\0".to_vec();
    parse.extend_from_slice(&0i16.to_be_bytes());
    let bind = b"\0\0\0\0\0\0\0\0".to_vec();
    let exec = |n: i32| {
        let mut e = b"\0".to_vec();
        e.extend_from_slice(&n.to_be_bytes());
        msg(b'E', &e)
    };
    s.write_all(
        &[
            msg(b'P', &parse),
            msg(b'B', &bind),
            msg(b'D', b"P\0"),
            exec(2),
            msg(b'H', b""),
        ]
        .concat(),
    )
    .unwrap();
    let r = read_until(&mut s, b's');
    let types: Vec<u8> = r.iter().map(|(t, _)| *t).collect();
    assert_eq!(types, b"12TDDs", "{r:?}");
    s.write_all(&[exec(2), exec(0), msg(b'S', b"")].concat())
        .unwrap();
    let r = read_until(&mut s, b'Z');
    let types: Vec<u8> = r.iter().map(|(t, _)| *t).collect();
    assert_eq!(types, b"DDsDCZ", "{r:?}");
    let tag = &r[4].1;
    // Each Execute's tag counts its own rows, as PostgreSQL's do.
    assert_eq!(tag, b"SELECT 1\0");
}
