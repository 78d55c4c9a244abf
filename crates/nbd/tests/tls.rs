//! TLS over TCP with a test CA made by rcgen: nbdinfo with `nbds://` and libnbd's
//! tls-certificates directory, qemu with `--object tls-creds-x509`, client certificates seen by
//! the resolver, and TLS required of everyone.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use common::*;
use kagi_nbd::{Config, NbdServer, proto};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

const MIB: u64 = 1 << 20;

/// A CA, a server certificate for localhost/127.0.0.1 and a client certificate, written the
/// way qemu and libnbd look for them (ca-cert.pem, client-cert.pem, client-key.pem).
struct Pki {
    ca_der: CertificateDer<'static>,
    server_chain: Vec<CertificateDer<'static>>,
    server_key: PrivateKeyDer<'static>,
}

fn leaf(issuer: &Issuer<'_, KeyPair>, cn: &str, server: bool) -> (rcgen::Certificate, KeyPair) {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(DnType::CommonName, cn);
    if server {
        p.subject_alt_names = vec![
            SanType::DnsName("localhost".try_into().unwrap()),
            SanType::IpAddress("127.0.0.1".parse().unwrap()),
        ];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    } else {
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    }
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    let cert = p.signed_by(&key, issuer).unwrap();
    (cert, key)
}

fn make_pki(dir: &Path) -> Pki {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "kagi-nbd test CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let (server_cert, server_key) = leaf(&issuer, "localhost", true);
    let (client_cert, client_key) = leaf(&issuer, "test-client", false);
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("ca-cert.pem"), ca_cert.pem()).unwrap();
    std::fs::write(dir.join("client-cert.pem"), client_cert.pem()).unwrap();
    std::fs::write(dir.join("client-key.pem"), client_key.serialize_pem()).unwrap();
    Pki {
        ca_der: ca_cert.der().clone(),
        server_chain: vec![server_cert.der().clone()],
        server_key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server_key.serialize_der())),
    }
}

/// A server config that asks for (but does not require) a client certificate from the CA.
fn server_config(pki: &Pki) -> Arc<rustls::ServerConfig> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.ca_der.clone()).unwrap();
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .allow_unauthenticated()
    .build()
    .unwrap();
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(pki.server_chain.clone(), pki.server_key.clone_key())
        .unwrap();
    Arc::new(config)
}

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
    let object = format!(
        "tls-creds-x509,id=tls0,endpoint=client,dir={}",
        dir.path().join("pki").display()
    );
    let image = format!(
        "driver=nbd,server.type=inet,server.host=localhost,server.port={},export=disk,tls-creds=tls0",
        addr.port()
    );
    let out = run_ok(
        "qemu-io",
        &[
            "--object",
            &object,
            "--image-opts",
            &image,
            "-c",
            "write -f -P 0xab 0 1M",
            "-c",
            "read -P 0xab 0 1M",
        ],
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
