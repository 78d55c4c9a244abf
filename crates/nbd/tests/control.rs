//! Disconnecting one export's clients, graceful shutdown, and the ordering of overlapping
//! requests in flight on one connection.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use common::*;
use kagi_nbd::{BlockDevice, DeviceError, Export, ReadData, ZeroFlags, proto};

const MIB: u64 = 1 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_an_export_disconnects_its_clients_only() {
    let a = MemDevice::new(MIB);
    let b = MemDevice::new(MIB);
    let export_a = export(a);
    let token = export_a.disconnect.clone();
    let srv = TestServer::start(vec![("a", export_a), ("b", export(b))]).await;
    let mut a1 = Raw::connect_simple(&srv.socket, "a").await;
    let mut a2 = Raw::connect_simple(&srv.socket, "a").await;
    let mut b1 = Raw::connect_simple(&srv.socket, "b").await;
    a1.read_at(0, 512).await;

    token.cancel();
    assert!(a1.closed().await);
    assert!(a2.closed().await);
    b1.read_at(0, 512).await;
    // The resolver still hands out the cancelled export: the server refuses it.
    let mut c = Raw::unix(&srv.socket).await;
    c.greet().await;
    assert_eq!(c.go("a").await, proto::REP_ERR_POLICY);
    assert_eq!(c.go("b").await, proto::REP_ACK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_connections_and_the_socket() {
    let srv = TestServer::start(vec![("a", export(MemDevice::new(MIB)))]).await;
    let mut c = Raw::connect_simple(&srv.socket, "a").await;
    let mut h = Raw::unix(&srv.socket).await;
    h.greet().await;
    c.read_at(0, 512).await;
    tokio::time::timeout(Duration::from_secs(20), srv.server.shutdown())
        .await
        .expect("shutdown did not finish");
    assert!(c.closed().await);
    assert!(h.closed().await);
    assert_eq!(srv.server.connection_count(), 0);
    assert!(!srv.socket.exists(), "socket file left behind");
    assert!(srv.server.listen_unix(&srv.socket).await.is_err());
}

/// A device whose writes of 0xaa bytes are slow, so a later overlapping write would overtake
/// them if the server did not order overlapping requests.
struct SlowFirst(Arc<MemDevice>);

#[async_trait]
impl BlockDevice for SlowFirst {
    fn size(&self) -> u64 {
        self.0.size()
    }
    async fn read(&self, offset: u64, len: u32) -> Result<ReadData, DeviceError> {
        self.0.read(offset, len).await
    }
    async fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> Result<(), DeviceError> {
        if data.first() == Some(&0xaa) {
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        self.0.write(offset, data, fua).await
    }
    async fn flush(&self) -> Result<(), DeviceError> {
        self.0.flush().await
    }
    async fn write_zeroes(&self, offset: u64, len: u64, f: ZeroFlags) -> Result<(), DeviceError> {
        self.0.write_zeroes(offset, len, f).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_requests_in_flight_keep_their_order() {
    let mem = MemDevice::new(MIB);
    let srv = TestServer::start(vec![("a", Export::new(Arc::new(SlowFirst(mem.clone()))))]).await;
    let mut c = Raw::connect_simple(&srv.socket, "a").await;
    // Slow write, then an overlapping fast write, a read of the range and a non-overlapping
    // write, all sent before any reply.
    c.request(0, proto::CMD_WRITE, 1, 0, 8192, &[0xaa; 8192])
        .await
        .unwrap();
    c.request(0, proto::CMD_WRITE, 2, 4096, 8192, &[0xbb; 8192])
        .await
        .unwrap();
    c.request(0, proto::CMD_READ, 3, 0, 16384, &[])
        .await
        .unwrap();
    c.request(0, proto::CMD_WRITE, 4, 65536, 4096, &[0xcc; 4096])
        .await
        .unwrap();
    let mut order = Vec::new();
    let mut read = Vec::new();
    for _ in 0..4 {
        let (err, cookie) = c.simple_reply().await.unwrap();
        assert_eq!(err, 0);
        if cookie == 3 {
            read = c.read_n(16384).await.unwrap();
        }
        order.push(cookie);
    }
    // The independent write finished first; the overlapping ones in order.
    assert_eq!(order[0], 4, "{order:?}");
    let mut expect = vec![0xaa; 4096];
    expect.extend([0xbb; 8192]);
    expect.extend([0; 4096]);
    assert!(read == expect, "read overtook or reordered the writes");
    assert_eq!(mem.contents(0, 16384), expect);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_counted_from_acceptance_until_answered() {
    let mem = MemDevice::new(MIB);
    let mut e = Export::new(Arc::new(SlowFirst(mem.clone())));
    let counter = Arc::new(tokio::sync::watch::channel(0usize).0);
    e.requests = Some(counter.clone());
    let token = e.disconnect.clone();
    let srv = TestServer::start(vec![("a", e)]).await;
    let mut c = Raw::connect_simple(&srv.socket, "a").await;
    // A slow write and one queued behind it (it overlaps): both count while neither has run.
    c.request(0, proto::CMD_WRITE, 1, 0, 4096, &[0xaa; 4096])
        .await
        .unwrap();
    c.request(0, proto::CMD_WRITE, 2, 0, 4096, &[0xbb; 4096])
        .await
        .unwrap();
    let mut rx = counter.subscribe();
    tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|n| *n == 2))
        .await
        .expect("the two requests were not counted")
        .unwrap();
    // Cut as an access's end cuts it: what was accepted still runs; zero means it all ran.
    token.cancel();
    tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|n| *n == 0))
        .await
        .expect("the count never came back to zero")
        .unwrap();
    assert_eq!(mem.contents(0, 4096), vec![0xbb; 4096]);
}
