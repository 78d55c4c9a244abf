//! The disk service on a real platform, without a block client: a disk created over its
//! ARM handler, opened through its NBD export resolver as a client's connection would, written
//! and read through the block-device seam, its log compacted after overwrites, and access
//! ended.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::path::Path;
use std::sync::Arc;

use kagi_disk_service::{DiskConfig, DiskService, NbdExports};
use kagi_nbd::{ClientInfo, ExportResolver, ReadData};
use kagi_testkit::{Options, TestServer};
use serde_json::{Value, json};

const MIB: usize = 1 << 20;

async fn call(
    svc: &Arc<DiskService>,
    s: &TestServer,
    method: &str,
    path: &str,
    body: Value,
) -> (u16, Value) {
    s.provider_call(svc.clone(), method, path, body).await
}

fn stored_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let m = e.metadata().unwrap();
        total += if m.is_dir() {
            stored_bytes(&e.path())
        } else {
            m.len()
        };
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_is_written_read_compacted_and_closed_through_the_service() {
    let s = TestServer::start(Options::default()).await;
    let sub = s.admin.subscription_id.clone();
    let group = format!("/subscriptions/{sub}/resourceGroups/rg1");
    let (st, v) = s
        .arm("PUT", &group, Some(json!({"location": "westeurope"})))
        .await;
    assert_eq!(st, 201, "{v}");
    let config = DiskConfig {
        nbd_socket: Some(s.dir().join("nbd-test.sock")),
        ..DiskConfig::default()
    };
    let svc = DiskService::new(s.platform.clone(), config).unwrap();
    let disk = format!("{group}/providers/Microsoft.Compute/disks/d1");
    let body = json!({"location": "westeurope", "properties": {
        "creationData": {"createOption": "Empty"}, "diskSizeGB": 1}});
    let (st, v) = call(&svc, &s, "PUT", &disk, body).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["properties"]["diskSizeBytes"], 1u64 << 30);

    let access = json!({"access": "Write", "durationInSeconds": 600});
    let (st, v) = call(&svc, &s, "POST", &format!("{disk}/beginGetAccess"), access).await;
    assert_eq!(st, 200, "{v}");
    let uri = v["accessSAS"].as_str().unwrap();
    let export = uri
        .strip_prefix("nbd+unix:///")
        .and_then(|u| u.split('?').next())
        .unwrap();
    let exports = NbdExports(svc.clone());
    let client = ClientInfo {
        tls: false,
        client_certificates: Vec::new(),
        peer: None,
    };
    assert!(exports.resolve("sas-not-granted", &client).await.is_err());
    let dev = exports.resolve(export, &client).await.unwrap().device;
    assert_eq!(dev.size(), 1 << 30);

    // 48 MiB written three times over: two thirds of the log become garbage.
    for pattern in [1u8, 2, 3] {
        for at in (0..48).step_by(4) {
            dev.write((at * MIB) as u64, vec![pattern; 4 * MIB], false)
                .await
                .unwrap();
        }
    }
    dev.flush().await.unwrap();
    let disks = s.dir().join("disks");
    let before = stored_bytes(&disks);
    assert!(before >= (144 * MIB) as u64, "{before}");
    svc.compact().await;
    let after = stored_bytes(&disks);
    assert!(after < before - (48 * MIB) as u64, "{before} -> {after}");
    for at in (0..48).step_by(16) {
        match dev.read((at * MIB) as u64, MIB as u32).await.unwrap() {
            ReadData::Data(d) => assert!(d.iter().all(|b| *b == 3)),
            ReadData::Zeroes => panic!("written data read as a hole"),
        }
    }

    // Ended: the export is gone for new connections.
    let (st, _) = call(&svc, &s, "POST", &format!("{disk}/endGetAccess"), json!({})).await;
    assert_eq!(st, 200);
    assert!(exports.resolve(export, &client).await.is_err());
}
