//! qemu 10's clients (qemu-img, qemu-io, qemu-nbd -L) against the server: the extended-header
//! path (qemu asks for NBD_OPT_EXTENDED_HEADERS first).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::sync::atomic::Ordering;

use common::*;

const MIB: u64 = 1 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_img_convert_in_and_out_byte_for_byte() {
    let size = 8 * MIB;
    let device = MemDevice::new(size);
    let srv = TestServer::start(vec![("disk", export(device.clone()))]).await;
    // A source image with data, a hole in the middle and data at the very end.
    let mut image = pattern(size as usize, 7);
    image[2 * MIB as usize..5 * MIB as usize].fill(0);
    let src = file(srv.dir.path(), "src.raw", &image);
    let uri = srv.uri("disk");

    run_ok(
        "qemu-img",
        &[
            "convert",
            "-n",
            "-f",
            "raw",
            "-O",
            "raw",
            src.to_str().unwrap(),
            &uri,
        ],
    )
    .await;
    assert!(
        device.contents(0, size as usize) == image,
        "device differs from the source"
    );
    // qemu-img writes holes as zeroes without payload (or skips them): they stay unallocated.
    assert!(device.allocated() < (size / CHUNK) as usize);

    let out = srv.dir.path().join("out.raw");
    run_ok(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &uri,
            out.to_str().unwrap(),
        ],
    )
    .await;
    assert!(std::fs::read(&out).unwrap() == image, "copy out differs");

    let cmp = run_ok(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            src.to_str().unwrap(),
            &uri,
        ],
    )
    .await;
    assert!(cmp.contains("identical"), "{cmp}");

    // Block status over extended headers (BLOCK_STATUS_EXT): the hole is reported as one.
    let map = run_ok("qemu-img", &["map", "--output=json", &uri]).await;
    let hole = format!(
        "\"start\": {}, \"length\": {}, \"depth\": 0, \"present\": true, \"zero\": true, \"data\": false",
        2 * MIB,
        3 * MIB
    );
    assert!(map.contains(&hole), "{map}");

    let info = run_ok("qemu-img", &["info", "--output=json", &uri]).await;
    assert!(
        info.contains(&format!("\"virtual-size\": {size}")),
        "{info}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_fua_writes_and_pattern_reads() {
    let device = MemDevice::new(16 * MIB);
    let srv = TestServer::start(vec![("disk", export(device.clone()))]).await;
    let uri = srv.uri("disk");
    let out = run_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -f -P 0xab 0 1M",
            "-c",
            "write -P 0xcd 1M 1M",
            "-c",
            "write -z 2M 1M",
            "-c",
            "flush",
            "-c",
            "read -P 0xab 0 1M",
            "-c",
            "read -P 0xcd 1M 1M",
            "-c",
            "read -P 0 2M 1M",
            "-c",
            "read -P 0 15M 1M",
            &uri,
        ],
    )
    .await;
    assert!(!out.contains("Pattern verification failed"), "{out}");
    assert!(!out.to_lowercase().contains("error"), "{out}");
    assert!(
        device.fua_writes.load(Ordering::SeqCst) > 0,
        "FUA did not reach the device"
    );
    assert!(device.flushes.load(Ordering::SeqCst) > 0);
    assert_eq!(device.contents(0, 4), vec![0xab; 4]);

    // A failed pattern check is reported (the check above can fail).
    let bad = run(
        "qemu-io",
        &["-f", "raw", "-c", "read -P 0x11 0 4k", &uri],
        &[],
    )
    .await;
    assert!(
        bad.stdout.contains("Pattern verification failed"),
        "{}",
        bad.stdout
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_nbd_list_shows_flags_sizes_and_context() {
    let device = MemDevice::new(4 * MIB);
    let srv = TestServer::start(vec![("disk", export(device))]).await;
    let out = run_ok("qemu-nbd", &["-L", "-k", srv.socket.to_str().unwrap()]).await;
    assert!(out.contains("export: 'disk'"), "{out}");
    assert!(out.contains("description: test disk"), "{out}");
    assert!(out.contains("size:  4194304"), "{out}");
    for flag in [
        "flush",
        "fua",
        "trim",
        "zeroes",
        "cache",
        "fast-zero",
        "multi",
    ] {
        assert!(out.contains(flag), "flag {flag} missing: {out}");
    }
    assert!(out.contains("min block: 512"), "{out}");
    // qemu negotiated extended headers.
    assert!(out.contains("transaction size: 64-bit"), "{out}");
    assert!(out.contains("base:allocation"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_reports_unknown_export_and_read_only() {
    let ro = MemDevice::with(MIB, true);
    let srv = TestServer::start(vec![("ro", export(ro))]).await;
    let r = run("qemu-img", &["info", &srv.uri("nope")], &[]).await;
    assert!(!r.ok);
    assert!(r.stderr.contains("no such export"), "{}", r.stderr);
    let r = run(
        "qemu-io",
        &["-f", "raw", "-c", "write 0 4k", &srv.uri("ro")],
        &[],
    )
    .await;
    assert!(
        !r.ok || r.stdout.contains("failed") || r.stderr.contains("read-only"),
        "{} {}",
        r.stdout,
        r.stderr
    );
    let r = run(
        "qemu-io",
        &["-r", "-f", "raw", "-c", "read -P 0 0 4k", &srv.uri("ro")],
        &[],
    )
    .await;
    assert!(
        r.ok && !r.stdout.contains("failed"),
        "{} {}",
        r.stdout,
        r.stderr
    );
}
