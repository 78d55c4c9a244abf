//! Bad and hostile clients over a raw socket: each gets an NBD error or a disconnect, the
//! server does not panic, and a connection opened before keeps working.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::time::Duration;

use common::*;
use kagi_nbd::{Config, proto};

const MIB: u64 = 1 << 20;

/// A server with one export and a healthy connection that wrote a marker.
async fn setup(config: Config) -> (TestServer, Raw) {
    let device = MemDevice::new(4 * MIB);
    device.fill(0, &[0x5a; 4096]);
    let srv = TestServer::start_with(vec![("disk", export(device))], config).await;
    let healthy = Raw::connect_simple(&srv.socket, "disk").await;
    (srv, healthy)
}

async fn still_works(healthy: &mut Raw) {
    assert_eq!(healthy.read_at(0, 4096).await, vec![0x5a; 4096]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_magic_and_bad_client_flags_are_disconnected() {
    let (srv, mut healthy) = setup(Config::default()).await;

    let mut c = Raw::unix(&srv.socket).await;
    c.greet().await;
    c.send(&pattern(100, 3)).await.unwrap();
    assert!(c.closed().await, "garbage option magic not disconnected");

    let mut c = Raw::unix(&srv.socket).await;
    c.read_n(18).await.unwrap();
    c.send(&0xffff_fff0u32.to_be_bytes()).await.unwrap();
    assert!(c.closed().await, "unknown client flags not disconnected");

    // Garbage in place of a request header after GO.
    let mut c = Raw::connect_simple(&srv.socket, "disk").await;
    c.send(&pattern(64, 4)).await.unwrap();
    assert!(c.closed().await, "garbage request magic not disconnected");

    still_works(&mut healthy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_option_length_gets_too_big_then_disconnect() {
    let (srv, mut healthy) = setup(Config::default()).await;
    let mut c = Raw::unix(&srv.socket).await;
    c.greet().await;
    let mut v = proto::IHAVEOPT.to_be_bytes().to_vec();
    v.extend(proto::OPT_GO.to_be_bytes());
    v.extend(0xffff_fff0u32.to_be_bytes());
    c.send(&v).await.unwrap();
    let (opt, ty, _) = c.option_reply().await.unwrap();
    assert_eq!((opt, ty), (proto::OPT_GO, proto::REP_ERR_TOO_BIG));
    assert!(c.closed().await);
    still_works(&mut healthy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_options_and_unknown_options() {
    let (srv, mut healthy) = setup(Config::default()).await;
    let mut c = Raw::unix(&srv.socket).await;
    c.greet().await;
    // Unknown options get ERR_UNSUP and the handshake goes on.
    assert_eq!(c.final_reply(999, b"whatever").await, proto::REP_ERR_UNSUP);
    assert_eq!(
        c.final_reply(proto::OPT_LIST, b"x").await,
        proto::REP_ERR_INVALID
    );
    assert_eq!(
        c.final_reply(proto::OPT_SET_META_CONTEXT, &[0; 8]).await,
        proto::REP_ERR_INVALID,
        "meta context before structured replies"
    );
    assert_eq!(c.go("nope").await, proto::REP_ERR_UNKNOWN);
    assert_eq!(c.go("forbidden").await, proto::REP_ERR_POLICY);
    assert_eq!(
        c.final_reply(proto::OPT_STARTTLS, &[]).await,
        proto::REP_ERR_POLICY
    );
    let mut answered = 6;
    loop {
        c.option(proto::OPT_STRUCTURED_REPLY, &[]).await.unwrap();
        let (_, ty, _) = c.option_reply().await.unwrap();
        answered += 1;
        if ty != proto::REP_ACK {
            assert_eq!(ty, proto::REP_ERR_TOO_BIG);
            break;
        }
        assert!(answered <= 64, "more than 64 options accepted");
    }
    assert_eq!(answered, 65);
    assert!(c.closed().await);
    still_works(&mut healthy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_errors_and_the_connection_stays_in_sync() {
    let (srv, mut healthy) = setup(Config::default()).await;
    let mut c = Raw::connect_simple(&srv.socket, "disk").await;
    // Beyond the end.
    c.request(0, proto::CMD_READ, 1, 4 * MIB, 512, &[])
        .await
        .unwrap();
    assert_eq!(c.simple_reply().await.unwrap(), (proto::NBD_EINVAL, 1));
    c.request(0, proto::CMD_READ, 2, u64::MAX - 10, 512, &[])
        .await
        .unwrap();
    assert_eq!(c.simple_reply().await.unwrap(), (proto::NBD_EINVAL, 2));
    c.request(0, proto::CMD_WRITE, 3, 4 * MIB - 512, 1024, &[1; 1024])
        .await
        .unwrap();
    assert_eq!(c.simple_reply().await.unwrap(), (proto::NBD_ENOSPC, 3));
    // Unknown command and flags; block status without a meta context.
    c.request(0, 42, 4, 0, 512, &[]).await.unwrap();
    assert_eq!(c.simple_reply().await.unwrap(), (proto::NBD_EINVAL, 4));
    c.request(1 << 9, proto::CMD_READ, 5, 0, 512, &[])
        .await
        .unwrap();
    assert_eq!(c.simple_reply().await.unwrap(), (proto::NBD_EINVAL, 5));
    c.request(0, proto::CMD_BLOCK_STATUS, 6, 0, 512, &[])
        .await
        .unwrap();
    assert_eq!(c.simple_reply().await.unwrap(), (proto::NBD_EINVAL, 6));
    // A read larger than the maximum payload.
    c.request(0, proto::CMD_READ, 7, 0, 33 << 20, &[])
        .await
        .unwrap();
    assert_eq!(c.simple_reply().await.unwrap(), (proto::NBD_EINVAL, 7));
    // A 40 MiB write (over the 32 MiB limit) is read, dropped and refused.
    c.request(0, proto::CMD_WRITE, 8, 0, 40 << 20, &vec![9u8; 40 << 20])
        .await
        .unwrap();
    assert_eq!(c.simple_reply().await.unwrap(), (proto::NBD_EINVAL, 8));
    // Still in sync, and nothing was written.
    assert_eq!(c.read_at(0, 4096).await, vec![0x5a; 4096]);
    still_works(&mut healthy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gib_write_length_gets_error_and_disconnect() {
    let (srv, mut healthy) = setup(Config::default()).await;
    let mut c = Raw::connect_simple(&srv.socket, "disk").await;
    c.request(0, proto::CMD_WRITE, 1, 0, 1 << 30, &[0; 4096])
        .await
        .unwrap();
    assert_eq!(c.simple_reply().await.unwrap(), (proto::NBD_EINVAL, 1));
    assert!(c.closed().await);
    still_works(&mut healthy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_mid_request_and_mid_handshake_leave_nothing_behind() {
    let (srv, mut healthy) = setup(Config::default()).await;
    assert_eq!(srv.server.connection_count(), 1);
    for round in 0..20u64 {
        let mut c = Raw::connect_simple(&srv.socket, "disk").await;
        // Half a write, then gone.
        c.request(0, proto::CMD_WRITE, round, 0, 1 << 20, &[1; 1000])
            .await
            .unwrap();
        drop(c);
        let mut c = Raw::unix(&srv.socket).await;
        c.greet().await;
        c.send(&proto::IHAVEOPT.to_be_bytes()[..5]).await.unwrap();
        drop(c);
    }
    let mut waited = 0;
    while srv.server.connection_count() > 1 {
        assert!(waited < 200, "connections left behind");
        tokio::time::sleep(Duration::from_millis(50)).await;
        waited += 1;
    }
    still_works(&mut healthy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_client_is_dropped_at_the_handshake_timeout() {
    let config = Config {
        handshake_timeout: Duration::from_millis(300),
        ..Config::default()
    };
    let (srv, mut healthy) = setup(config).await;
    let mut c = Raw::unix(&srv.socket).await;
    c.read_n(18).await.unwrap();
    // Says nothing: the server hangs up (well within the raw client's 20 s wait).
    assert!(c.closed().await);
    // The healthy connection is in transmission: no timeout applies to it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    still_works(&mut healthy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_name_of_unknown_export_is_a_disconnect() {
    let (srv, mut healthy) = setup(Config::default()).await;
    let mut c = Raw::unix(&srv.socket).await;
    c.greet().await;
    c.option(proto::OPT_EXPORT_NAME, b"nope").await.unwrap();
    assert!(c.closed().await);
    // EXPORT_NAME of a known export works (the old way in).
    let mut c = Raw::unix(&srv.socket).await;
    c.greet().await;
    c.option(proto::OPT_EXPORT_NAME, b"disk").await.unwrap();
    let reply = c.read_n(10).await.unwrap();
    assert_eq!(&reply[..8], &(4 * MIB).to_be_bytes());
    assert_eq!(c.read_at(0, 512).await, vec![0x5a; 512]);
    still_works(&mut healthy).await;
}
