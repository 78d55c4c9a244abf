//! libnbd 1.14's clients (nbdinfo, nbdcopy, nbdsh) against the server: the compact-header path
//! (libnbd does not know extended headers), with structured replies and with simple replies.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::sync::atomic::Ordering;

use common::*;
use kagi_nbd::DeviceError;

const MIB: u64 = 1 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_size_map_and_list() {
    let device = MemDevice::new(8 * MIB);
    device.fill(0, &pattern(MIB as usize, 1));
    device.fill(6 * MIB, &pattern(MIB as usize, 2));
    let other = MemDevice::new(MIB);
    let srv = TestServer::start(vec![("disk", export(device)), ("other", export(other))]).await;
    let uri = srv.uri("disk");

    let size = run_ok("nbdinfo", &["--size", &uri]).await;
    assert_eq!(size.trim(), (8 * MIB).to_string());

    let map = run_ok("nbdinfo", &["--map", &uri]).await;
    let rows: Vec<Vec<&str>> = map
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    let expect = [
        ("0", "1048576", "0"),
        ("1048576", "5242880", "3"),
        ("6291456", "1048576", "0"),
        ("7340032", "1048576", "3"),
    ];
    assert_eq!(rows.len(), expect.len(), "{map}");
    for (row, (off, len, ty)) in rows.iter().zip(expect) {
        assert_eq!((row[0], row[1], row[2]), (off, len, ty), "{map}");
    }
    assert!(map.contains("hole,zero"), "{map}");

    let info = run_ok("nbdinfo", &[&uri]).await;
    assert!(info.contains("description: test disk"), "{info}");
    assert!(info.contains("can_multi_conn: true"), "{info}");
    assert!(info.contains("block_size_minimum: 512"), "{info}");

    let list = run_ok("nbdinfo", &["--list", &uri]).await;
    assert!(
        list.contains("export=\"disk\"") && list.contains("export=\"other\""),
        "{list}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdcopy_in_and_out_with_multi_conn() {
    let size = 32 * MIB;
    let device = MemDevice::new(size);
    let srv = TestServer::start(vec![("disk", export(device.clone()))]).await;
    let mut image = pattern(size as usize, 9);
    image[8 * MIB as usize..20 * MIB as usize].fill(0);
    let src = file(srv.dir.path(), "src.raw", &image);
    let uri = srv.uri("disk");

    run_ok(
        "nbdcopy",
        &["--connections=4", "--flush", src.to_str().unwrap(), &uri],
    )
    .await;
    // CAN_MULTI_CONN made nbdcopy open several connections.
    assert!(srv.resolver.seen_clients.lock().unwrap().len() >= 2);
    assert!(device.contents(0, size as usize) == image, "device differs");
    assert!(device.flushes.load(Ordering::SeqCst) > 0);

    let out = srv.dir.path().join("out.raw");
    run_ok("nbdcopy", &["--connections=4", &uri, out.to_str().unwrap()]).await;
    assert!(std::fs::read(&out).unwrap() == image, "copy out differs");
}

/// Raw requests through nbdsh (libnbd's Python), with structured replies and without, strict
/// client checks off so the server's own checks answer.
const NBDSH_SCRIPT: &str = r#"
import errno
import nbd

def connect(name, structured):
    h = nbd.NBD()
    h.set_request_structured_replies(structured)
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.set_strict_mode(0)
    h.connect_uri("nbd+unix:///" + name + "?socket=" + SOCKET)
    assert h.get_structured_replies_negotiated() == structured
    return h

def expect_error(code, fn, *args):
    try:
        fn(*args)
    except nbd.Error as e:
        assert e.errnum == code, (e, code)
        return
    raise AssertionError("no error, expected %d" % code)

for structured in (True, False):
    h = connect("disk", structured)
    size = h.get_size()
    assert size == 4 << 20
    assert h.can_fua() and h.can_flush() and h.can_trim() and h.can_zero()
    assert h.can_cache() and h.can_multi_conn() and h.can_fast_zero()
    assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION) == structured
    data = bytes(range(256)) * 256
    h.pwrite(data, 65536, nbd.CMD_FLAG_FUA)
    assert h.pread(len(data), 65536) == data
    assert h.pread(512, 0) == bytes(512)
    h.flush()
    h.cache(65536, 65536)
    h.zero(4096, 65536 + 4096, nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FUA)
    assert h.pread(4096, 65536 + 4096) == bytes(4096)
    assert h.pread(4096, 65536 + 8192) == data[8192:12288]
    h.trim(65536, 0)
    assert h.pread(65536, 0) == bytes(65536)
    # Errors the server answers.
    expect_error(errno.EINVAL, h.pread, 512, size)
    expect_error(errno.ENOSPC, h.pwrite, b"x" * 512, size)
    expect_error(errno.EINVAL, h.pread, 100, 0)
    expect_error(errno.ENOTSUP, h.zero, 65536, 0, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE)
    if structured:
        extents = []
        def cb(ctx, off, ents, err):
            extents.append((ctx, list(ents)))
            return 0
        h.pwrite(data, 2 << 20)
        h.block_status(size, 0, cb)
        ctx, ents = extents[-1]
        assert ctx == nbd.CONTEXT_BASE_ALLOCATION
        # Holes and data exactly as written (the chunk at 64 KiB was written above).
        assert ents == [65536, 3, 65536, 0, (2 << 20) - 131072, 3, 65536, 0, (2 << 20) - 65536, 3], ents
        h.block_status(size, 0, cb, nbd.CMD_FLAG_REQ_ONE)
        assert extents[-1][1] == [65536, 3], extents[-1]
        h.block_status(65536, 2 << 20, cb, nbd.CMD_FLAG_REQ_ONE)
        assert extents[-1][1] == [65536, 0], extents[-1]
    else:
        expect_error(errno.EINVAL, h.block_status, 512, 0, lambda *a: 0)
    # Several requests in flight at once, answered in any order.
    # (The buffers must outlive their commands; a synchronous flush runs the queue.)
    bufs = [nbd.Buffer.from_bytearray(bytearray([i]) * 65536) for i in range(16)]
    cookies = [h.aio_pwrite(bufs[i], i * 65536) for i in range(16)]
    # The flush covers every write sent before it, but its reply may overtake theirs
    # (docs/NBD.md, "Ordering"): wait for each write's own reply.
    h.flush()
    pending = set(cookies)
    while pending:
        pending = {c for c in pending if not h.aio_command_completed(c)}
        if pending:
            h.poll(-1)
    for i in range(16):
        assert h.pread(65536, i * 65536) == bytes([i]) * 65536
    h.shutdown()

ro = connect("ro", True)
assert ro.is_read_only()
expect_error(errno.EPERM, ro.pwrite, b"x" * 512, 0)
expect_error(errno.EPERM, ro.trim, 512, 0)
ro.flush()
ro.shutdown()

for name, code in (("nope", "unknown"), ("forbidden", "policy")):
    try:
        connect(name, True)
        raise AssertionError("connected to " + name)
    except nbd.Error as e:
        print("refused", name, e)
print("nbdsh ok")
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdsh_raw_requests_structured_and_simple() {
    let device = MemDevice::new(4 * MIB);
    let ro = MemDevice::with(MIB, true);
    let srv = TestServer::start(vec![("disk", export(device.clone())), ("ro", export(ro))]).await;
    let script = format!(
        "SOCKET = {:?}\n{NBDSH_SCRIPT}",
        srv.socket.to_str().unwrap()
    );
    let path = file(srv.dir.path(), "raw.py", script.as_bytes());
    let out = run_ok(
        "nbdsh",
        &[
            "-c",
            &format!("exec(open({:?}).read())", path.to_str().unwrap()),
        ],
    )
    .await;
    assert!(out.contains("nbdsh ok"), "{out}");
    assert!(out.contains("refused nope"), "{out}");
    assert!(device.fua_writes.load(Ordering::SeqCst) >= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_error_message_reaches_the_client() {
    let device = MemDevice::new(MIB);
    let srv = TestServer::start(vec![("disk", export(device.clone()))]).await;
    *device.fail.lock().unwrap() = Some(DeviceError::io("key revoked: kagi key k1 is disabled"));
    let r = run(
        "nbdsh",
        &["-u", &srv.uri("disk"), "-c", "h.pread(512, 0)"],
        &[("LIBNBD_DEBUG", "1")],
    )
    .await;
    assert!(!r.ok);
    assert!(r.stderr.contains("Input/output error"), "{}", r.stderr);
    assert!(
        r.stderr.contains("key revoked: kagi key k1 is disabled"),
        "{}",
        r.stderr
    );
    let q = run(
        "qemu-io",
        &["-f", "raw", "-c", "read 0 512", &srv.uri("disk")],
        &[],
    )
    .await;
    assert!(
        q.stdout.contains("read failed: Input/output error"),
        "{} {}",
        q.stdout,
        q.stderr
    );
}
