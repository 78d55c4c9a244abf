//! The local certificate authority and per-name server certificates.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use kagi_crypto::x509::PermittedNames;
use kagi_vault::Platform;
use rcgen::{
    BasicConstraints, CertificateParams, CidrSubnet, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, GeneralSubtree, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    NameConstraints, SanType,
};
use rustls::crypto::aws_lc_rs::sign::any_supported_type;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// A TLS setup failure.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// File trouble.
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
    /// Certificate generation or parsing failed.
    #[error("certificate: {0}")]
    Cert(String),
}

fn cert_err(e: impl std::fmt::Display) -> TlsError {
    TlsError::Cert(e.to_string())
}

/// The CA: its certificate (written to `tls/ca.pem` for clients) and its signing key (sealed
/// under the root key in `tls/ca-key.sealed`).
pub struct LocalCa {
    issuer: Issuer<'static, KeyPair>,
    /// PEM of the CA certificate.
    pub cert_pem: String,
    /// Path of `ca.pem`.
    pub cert_path: PathBuf,
}

impl std::fmt::Debug for LocalCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalCa")
            .field("cert_path", &self.cert_path)
            .finish_non_exhaustive()
    }
}

/// What the CA may vouch for: names under the served DNS suffix (the suffix and its
/// subdomains) and the loopback addresses of the certificate for clients that send no SNI.
/// Clients are told to trust this CA, so the constraints keep its key, should it leak, from
/// vouching for any other host.
fn name_constraints(suffix: &str) -> NameConstraints {
    NameConstraints {
        permitted_subtrees: vec![
            GeneralSubtree::DnsName(suffix.to_string()),
            GeneralSubtree::IpAddress(CidrSubnet::from_v4_prefix(Ipv4Addr::LOCALHOST.octets(), 32)),
            GeneralSubtree::IpAddress(CidrSubnet::from_v6_prefix(
                Ipv6Addr::LOCALHOST.octets(),
                128,
            )),
        ],
        excluded_subtrees: Vec::new(),
    }
}

/// [`name_constraints`] as [`kagi_crypto::x509::permitted_names`] reads them from a certificate.
fn expected_names(suffix: &str) -> PermittedNames {
    let host = |addr: &[u8]| [addr, &vec![0xff; addr.len()]].concat();
    PermittedNames {
        dns: vec![suffix.to_string()],
        ip: vec![
            host(&Ipv4Addr::LOCALHOST.octets()),
            host(&Ipv6Addr::LOCALHOST.octets()),
        ],
    }
}

/// The CA's parameters. Rebuilt identically on every start from the key, so the issuer
/// (name, key identifier) of minted certificates matches the `ca.pem` clients trust.
fn ca_params(key: &KeyPair, suffix: &str) -> Result<CertificateParams, TlsError> {
    let mut p = CertificateParams::new(Vec::<String>::new()).map_err(cert_err)?;
    let id: String = p
        .key_identifier(key)
        .iter()
        .take(4)
        .map(|b| format!("{b:02x}"))
        .collect();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "kagi");
    dn.push(DnType::CommonName, format!("kagi local CA {id}"));
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.name_constraints = Some(name_constraints(suffix));
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::days(1);
    p.not_after = now + time::Duration::days(3650);
    Ok(p)
}

/// A new `ca.pem` for `key` when `pem` is not constrained to `suffix`: a CA made before name
/// constraints, or for another `--dns-suffix`. The key and the name stay, so certificates that
/// chain to the old `ca.pem` keep verifying for clients that still trust it.
fn constrained_again(key: &KeyPair, pem: &str, suffix: &str) -> Result<Option<String>, TlsError> {
    let current = kagi_crypto::x509::permitted_names(&pem_to_der(pem)?).map_err(cert_err)?;
    if current.as_ref() == Some(&expected_names(suffix)) {
        return Ok(None);
    }
    let cert = ca_params(key, suffix)?.self_signed(key).map_err(cert_err)?;
    Ok(Some(cert.pem()))
}

fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<(), TlsError> {
    kagi_fs::write_atomically(path, data, mode).map_err(|e| TlsError::Io(path.to_path_buf(), e))
}

impl LocalCa {
    /// Loads the CA from `<data>/tls`, or creates it, constrained to the platform's DNS suffix
    /// (a `ca.pem` that is not is issued again from the same key).
    pub fn load_or_create(platform: &Platform, data_dir: &Path) -> Result<Self, TlsError> {
        let suffix = platform.config().dns_suffix.clone();
        let dir = data_dir.join("tls");
        std::fs::create_dir_all(&dir).map_err(|e| TlsError::Io(dir.clone(), e))?;
        let key_path = dir.join("ca-key.sealed");
        let cert_path = dir.join("ca.pem");
        let (key, cert_pem) = match (
            std::fs::read(&key_path),
            std::fs::read_to_string(&cert_path),
        ) {
            (Ok(sealed), Ok(pem)) => {
                let der = platform
                    .open_platform_secret("tls-ca", &sealed)
                    .map_err(|e| cert_err(e.message))?;
                let key = KeyPair::try_from(der.as_slice()).map_err(cert_err)?;
                match constrained_again(&key, &pem, &suffix)? {
                    Some(pem) => {
                        write_file(&cert_path, pem.as_bytes(), 0o644)?;
                        tracing::info!(
                            suffix,
                            "local CA certificate issued again, constrained to the DNS suffix (same key)"
                        );
                        (key, pem)
                    }
                    None => (key, pem),
                }
            }
            _ => {
                let key = KeyPair::generate().map_err(cert_err)?;
                let cert = ca_params(&key, &suffix)?
                    .self_signed(&key)
                    .map_err(cert_err)?;
                let sealed = platform
                    .seal_platform_secret("tls-ca", &key.serialize_der())
                    .map_err(|e| cert_err(e.message))?;
                write_file(&key_path, &sealed, 0o600)?;
                write_file(&cert_path, cert.pem().as_bytes(), 0o644)?;
                (key, cert.pem())
            }
        };
        let params = ca_params(&key, &suffix)?;
        Ok(Self {
            issuer: Issuer::new(params, key),
            cert_pem,
            cert_path,
        })
    }

    /// Mints a server certificate for `name` (a DNS name or an IP address).
    pub fn mint(&self, names: &[String]) -> Result<CertifiedKey, TlsError> {
        let key = KeyPair::generate().map_err(cert_err)?;
        let mut p = CertificateParams::new(Vec::<String>::new()).map_err(cert_err)?;
        for n in names {
            p.subject_alt_names.push(match n.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(n.clone().try_into().map_err(cert_err)?),
            });
        }
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            names.first().cloned().unwrap_or_default(),
        );
        p.distinguished_name = dn;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        p.use_authority_key_identifier_extension = true;
        let now = time::OffsetDateTime::now_utc();
        p.not_before = now - time::Duration::hours(1);
        p.not_after = now + time::Duration::days(365);
        let cert = p.signed_by(&key, &self.issuer).map_err(cert_err)?;
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let signing = any_supported_type(&der).map_err(cert_err)?;
        Ok(CertifiedKey::new(
            vec![
                cert.der().clone(),
                CertificateDer::from(pem_to_der(&self.cert_pem)?),
            ],
            signing,
        ))
    }
}

#[cfg(test)]
impl LocalCa {
    /// A CA for `suffix` without a data directory (tests).
    #[allow(clippy::unwrap_used)]
    pub(crate) fn scratch(suffix: &str) -> LocalCa {
        let key = KeyPair::generate().unwrap();
        let cert_pem = ca_params(&key, suffix)
            .unwrap()
            .self_signed(&key)
            .unwrap()
            .pem();
        LocalCa {
            issuer: Issuer::new(ca_params(&key, suffix).unwrap(), key),
            cert_pem,
            cert_path: PathBuf::new(),
        }
    }
}

fn pem_to_der(pem: &str) -> Result<Vec<u8>, TlsError> {
    kagi_crypto::x509::certificate_der(pem.as_bytes()).map_err(cert_err)
}

/// Picks (minting on first use) the certificate for the SNI name of each connection: the
/// management host, any `{vault}.{suffix}` host, or loopback addresses when no SNI is sent.
pub struct SniResolver {
    ca: LocalCa,
    suffix: String,
    cache: Mutex<HashMap<String, Arc<CertifiedKey>>>,
}

impl std::fmt::Debug for SniResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SniResolver")
            .field("suffix", &self.suffix)
            .finish_non_exhaustive()
    }
}

impl SniResolver {
    /// A resolver for hosts under `suffix`.
    pub fn new(ca: LocalCa, suffix: &str) -> Self {
        Self {
            ca,
            suffix: suffix.to_ascii_lowercase(),
            cache: Mutex::new(HashMap::new()),
        }
    }

    fn names_for(&self, sni: Option<&str>) -> Option<Vec<String>> {
        match sni.map(str::to_ascii_lowercase) {
            None => Some(vec![self.suffix.clone(), "127.0.0.1".into(), "::1".into()]),
            Some(n) if n == self.suffix => Some(vec![n]),
            Some(n) => {
                let label = n.strip_suffix(&format!(".{}", self.suffix))?;
                // One label only: vault names are DNS labels, and this keeps the cache bounded
                // by the names a client can make valid certificates for.
                (!label.is_empty()
                    && label.len() <= 63
                    && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'))
                .then(|| vec![n.clone()])
            }
        }
    }
}

/// A TLS server configuration (TLS 1.2 and 1.3, aws-lc) presenting the certificates of
/// `resolver`, offering `alpn` protocols: the HTTPS listeners', and the NBD listener's.
pub fn server_config(
    resolver: SniResolver,
    alpn: Vec<Vec<u8>>,
) -> Result<rustls::ServerConfig, TlsError> {
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(cert_err)?
    .with_no_client_auth()
    .with_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = alpn;
    Ok(config)
}

/// Certificates kept per name; beyond this the cache is cleared (minting is cheap).
const CACHE_LIMIT: usize = 4096;

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let names = self.names_for(hello.server_name())?;
        // Keyed by every name the certificate carries: the no-SNI certificate (localhost and
        // the loopback addresses) must not be confused with the one for SNI `localhost`.
        let key = names.join(" ");
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = cache.get(&key) {
            return Some(c.clone());
        }
        match self.ca.mint(&names) {
            Ok(c) => {
                if cache.len() >= CACHE_LIMIT {
                    cache.clear();
                }
                let c = Arc::new(c);
                cache.insert(key, c.clone());
                Some(c)
            }
            Err(e) => {
                tracing::error!(error = %e, "minting a server certificate failed");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use rustls::client::danger::ServerCertVerifier;
    use rustls::pki_types::{ServerName, UnixTime};

    use super::*;

    fn ca(suffix: &str) -> LocalCa {
        LocalCa::scratch(suffix)
    }

    /// Whether a client trusting `ca.pem` (rustls-webpki) accepts `ca`'s certificate for `name`.
    fn accepted(ca: &LocalCa, name: &str) -> bool {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from(pem_to_der(&ca.cert_pem).unwrap()))
            .unwrap();
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::aws_lc_rs::default_provider()),
        )
        .build()
        .unwrap();
        let minted = ca.mint(&[name.to_string()]).unwrap();
        verifier
            .verify_server_cert(
                &minted.cert[0],
                &minted.cert[1..],
                &ServerName::try_from(name.to_string()).unwrap(),
                &[],
                UnixTime::now(),
            )
            .is_ok()
    }

    #[test]
    fn the_ca_vouches_only_for_the_served_names() {
        let ca = ca("localhost");
        for name in ["localhost", "v1.localhost", "127.0.0.1", "::1"] {
            assert!(accepted(&ca, name), "{name}");
        }
        for name in [
            "example.com",
            "localhost.example.com",
            "notlocalhost",
            "10.0.0.1",
        ] {
            assert!(!accepted(&ca, name), "{name}");
        }
        let names = kagi_crypto::x509::permitted_names(&pem_to_der(&ca.cert_pem).unwrap())
            .unwrap()
            .unwrap();
        assert_eq!(names, expected_names("localhost"));
    }

    #[test]
    fn an_unconstrained_ca_certificate_is_issued_again_from_its_key() {
        let key = KeyPair::generate().unwrap();
        let mut old = ca_params(&key, "localhost").unwrap();
        old.name_constraints = None;
        let old_pem = old.self_signed(&key).unwrap().pem();
        assert_eq!(
            kagi_crypto::x509::permitted_names(&pem_to_der(&old_pem).unwrap()).unwrap(),
            None
        );
        let new_pem = constrained_again(&key, &old_pem, "localhost")
            .unwrap()
            .expect("issued again");
        let der = pem_to_der(&new_pem).unwrap();
        assert_eq!(
            kagi_crypto::x509::permitted_names(&der).unwrap(),
            Some(expected_names("localhost"))
        );
        // Same key: a CA certificate for the same suffix is kept; another suffix is not.
        assert_eq!(
            constrained_again(&key, &new_pem, "localhost").unwrap(),
            None
        );
        assert!(
            constrained_again(&key, &new_pem, "kagi.test")
                .unwrap()
                .is_some()
        );
    }
}
