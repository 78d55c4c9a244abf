//! A test PKI made by rcgen: a CA, a server certificate for localhost/127.0.0.1 and a client
//! certificate, and the rustls configurations built on them.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// A CA, a server certificate for localhost/127.0.0.1 and a client certificate, written the
/// way qemu and libnbd look for them (ca-cert.pem, client-cert.pem, client-key.pem).
pub struct Pki {
    pub ca_der: CertificateDer<'static>,
    pub server_chain: Vec<CertificateDer<'static>>,
    pub server_key: PrivateKeyDer<'static>,
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

pub fn make_pki(dir: &Path) -> Pki {
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
pub fn server_config(pki: &Pki) -> Arc<rustls::ServerConfig> {
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

/// A client configuration trusting only the test CA (no client certificate).
pub fn client_config(pki: &Pki) -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.ca_der.clone()).unwrap();
    Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// qemu's `--object` (TLS credentials from `dir`, named tls0) and `--image-opts` for export
/// `export` on localhost:`port`.
pub fn qemu_tls(dir: &Path, port: u16, export: &str) -> (String, String) {
    (
        format!(
            "tls-creds-x509,id=tls0,endpoint=client,dir={}",
            dir.display()
        ),
        format!(
            "driver=nbd,server.type=inet,server.host=localhost,server.port={port},\
             export={export},tls-creds=tls0"
        ),
    )
}

/// Runs qemu-io on a [`qemu_tls`] image with `commands` (each a `-c`); returns its output.
pub async fn qemu_io(object: &str, image: &str, commands: &[&str]) -> String {
    let mut args = vec!["--object", object, "--image-opts", image];
    for c in commands {
        args.extend(["-c", c]);
    }
    super::run_ok("qemu-io", &args).await
}
