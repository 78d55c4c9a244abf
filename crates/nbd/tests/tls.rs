//! TLS over TCP with a test CA made by rcgen: nbdinfo with `nbds://` and libnbd's
//! tls-certificates directory, qemu with `--object tls-creds-x509`, client certificates seen by
//! the resolver, and TLS required of everyone.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;

use common::pki::{make_pki, qemu_io, qemu_tls, server_config};
use common::*;
use kagi_nbd::{Config, NbdServer, proto};

const MIB: u64 = 1 << 20;

async fn tls_server(
    device: Arc<MemDevice>,
) -> (NbdServer, SocketAddr, tempfile::TempDir, Arc<MapResolver>) {
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki(&dir.path().join("pki"));
    let resolver = MapResolver::new(vec![("disk", export(device))]);
    let server = NbdServer::new(resolver.clone(), Config::default()).unwrap();
    let addr = server
        .listen_tcp("127.0.0.1:0".parse().unwrap(), Some(server_config(&pki)))
        .await
        .unwrap();
    (server, addr, dir, resolver)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_and_nbdcopy_over_tls_with_client_certificate() {
    let device = MemDevice::new(4 * MIB);
    device.fill(0, &[0x42; 65536]);
    let (_server, addr, dir, resolver) = tls_server(device.clone()).await;
    let certs = dir.path().join("pki");
    let uri = format!(
        "nbds://localhost:{}/disk?tls-certificates={}",
        addr.port(),
        certs.display()
    );
    let size = run_ok("nbdinfo", &["--size", &uri]).await;
    assert_eq!(size.trim(), (4 * MIB).to_string());
    let map = run_ok("nbdinfo", &["--map", &uri]).await;
    assert!(map.contains("hole,zero"), "{map}");
    // The resolver saw a TLS client with its certificate.
    {
        let seen = resolver.seen_clients.lock().unwrap();
        let last = seen.last().unwrap();
        assert!(last.tls);
        assert_eq!(last.client_certificates.len(), 1);
        assert!(last.peer.is_some());
    }
    let image = pattern(4 * MIB as usize, 5);
    let src = file(dir.path(), "src.raw", &image);
    run_ok("nbdcopy", &[src.to_str().unwrap(), &uri]).await;
    assert!(device.contents(0, image.len()) == image);

    // Without TLS the client is refused (TLS required), and a wrong CA fails the handshake.
    let plain = run(
        "nbdinfo",
        &[&format!("nbd://localhost:{}/disk", addr.port())],
        &[],
    )
    .await;
    assert!(!plain.ok);
    let other = tempfile::tempdir().unwrap();
    make_pki(other.path());
    let wrong_ca = format!(
        "nbds://localhost:{}/disk?tls-certificates={}",
        addr.port(),
        other.path().display()
    );
    assert!(!run("nbdinfo", &["--size", &wrong_ca], &[]).await.ok);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_over_tls_with_tls_creds_x509() {
    let device = MemDevice::new(4 * MIB);
    let (_server, addr, dir, _resolver) = tls_server(device.clone()).await;
    let (object, image) = qemu_tls(&dir.path().join("pki"), addr.port(), "disk");
    let out = qemu_io(
        &object,
        &image,
        &["write -f -P 0xab 0 1M", "read -P 0xab 0 1M"],
    )
    .await;
    assert!(!out.contains("failed"), "{out}");
    assert_eq!(device.contents(0, 4), vec![0xab; 4]);
    let info = run_ok(
        "qemu-img",
        &["info", "--object", &object, "--image-opts", &image],
    )
    .await;
    assert!(info.contains("virtual size: 4 MiB"), "{info}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_listener_requires_starttls_first() {
    let device = MemDevice::new(MIB);
    let (_server, addr, _dir, _resolver) = tls_server(device).await;
    let mut c = Raw::tcp(addr).await;
    c.greet().await;
    assert_eq!(c.go("disk").await, proto::REP_ERR_TLS_REQD);
    assert_eq!(
        c.final_reply(proto::OPT_LIST, &[]).await,
        proto::REP_ERR_TLS_REQD
    );
    assert_eq!(
        c.final_reply(proto::OPT_STRUCTURED_REPLY, &[]).await,
        proto::REP_ERR_TLS_REQD
    );
    assert_eq!(c.final_reply(77, &[]).await, proto::REP_ERR_TLS_REQD);
    // EXPORT_NAME cannot be refused with an error: the server hangs up.
    c.option(proto::OPT_EXPORT_NAME, b"disk").await.unwrap();
    assert!(c.closed().await);
    // ABORT is answered.
    let mut c = Raw::tcp(addr).await;
    c.greet().await;
    assert_eq!(c.final_reply(proto::OPT_ABORT, &[]).await, proto::REP_ACK);
}
