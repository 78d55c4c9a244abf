//! Throughput of the server alone (a RAM device that only copies) next to qemu-nbd on a raw
//! file in /dev/shm, with nbdcopy. Prints figures, asserts only that the data is right.
//! Ignored by default: `cargo test --release -p kagi-nbd --test throughput -- --ignored --nocapture`.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::sync::{Arc, RwLock};
use std::time::Instant;

use async_trait::async_trait;
use common::*;
use kagi_nbd::{BlockDevice, DeviceError, Export, ReadData, ZeroFlags};

const SIZE: usize = 1 << 30;

struct Ram(RwLock<Vec<u8>>);

#[async_trait]
impl BlockDevice for Ram {
    fn size(&self) -> u64 {
        SIZE as u64
    }
    fn can_multi_conn(&self) -> bool {
        true
    }
    async fn read(&self, offset: u64, len: u32) -> Result<ReadData, DeviceError> {
        let o = offset as usize;
        Ok(ReadData::Data(
            self.0.read().unwrap()[o..o + len as usize].to_vec(),
        ))
    }
    async fn write(&self, offset: u64, data: Vec<u8>, _fua: bool) -> Result<(), DeviceError> {
        let o = offset as usize;
        self.0.write().unwrap()[o..o + data.len()].copy_from_slice(&data);
        Ok(())
    }
    async fn flush(&self) -> Result<(), DeviceError> {
        Ok(())
    }
    async fn write_zeroes(&self, offset: u64, len: u64, _f: ZeroFlags) -> Result<(), DeviceError> {
        let o = offset as usize;
        self.0.write().unwrap()[o..o + len as usize].fill(0);
        Ok(())
    }
}

async fn timed(label: &str, args: &[&str]) {
    let t = Instant::now();
    run_ok("nbdcopy", args).await;
    let s = t.elapsed().as_secs_f64();
    println!("{label}: {:.0} MB/s", SIZE as f64 / s / 1e6);
}

#[tokio::test(flavor = "multi_thread")]
#[ignore]
async fn nbdcopy_throughput_against_qemu_nbd() {
    let dir = tempfile::tempdir_in("/dev/shm").unwrap();
    let src = file(dir.path(), "src.raw", &pattern(SIZE, 3));
    let out = dir.path().join("out.raw");
    let device = Arc::new(Ram(RwLock::new(vec![0u8; SIZE])));
    let srv = TestServer::start(vec![("disk", Export::new(device))]).await;
    let uri = srv.uri("disk");
    timed("kagi-nbd write", &[src.to_str().unwrap(), &uri]).await;
    timed("kagi-nbd read", &[&uri, out.to_str().unwrap()]).await;
    assert!(std::fs::read(&out).unwrap() == std::fs::read(&src).unwrap());

    let raw = file(dir.path(), "qemu.raw", &vec![0u8; SIZE]);
    let sock = dir.path().join("qemu.sock");
    let mut qemu = tokio::process::Command::new("qemu-nbd")
        .args(["-f", "raw", "-x", "disk", "-e", "4", "-t", "-k"])
        .arg(&sock)
        .arg(&raw)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    while !sock.exists() {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let quri = format!("nbd+unix:///disk?socket={}", sock.display());
    timed("qemu-nbd write", &[src.to_str().unwrap(), &quri]).await;
    timed("qemu-nbd read", &[&quri, out.to_str().unwrap()]).await;
    let _ = qemu.kill().await;
}
