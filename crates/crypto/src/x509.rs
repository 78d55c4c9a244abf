//! Just enough X.509 to register a certificate credential: the SubjectPublicKeyInfo inside a
//! certificate, and its SHA-256 thumbprint (`x5t#S256`). No path validation: a certificate
//! credential is a public key the administrator registered, as in Entra ID.

use crate::{CryptoError, DigestAlgorithm, Result};

/// One DER element: (tag, header length, content length).
fn element(der: &[u8]) -> Result<(u8, usize, usize)> {
    let bad = || CryptoError::InvalidInput("the certificate is not valid DER".into());
    let tag = *der.first().ok_or_else(bad)?;
    let first = *der.get(1).ok_or_else(bad)?;
    let (header, len) = if first < 0x80 {
        (2, first as usize)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 {
            return Err(bad());
        }
        let bytes = der.get(2..2 + n).ok_or_else(bad)?;
        (
            2 + n,
            bytes.iter().fold(0usize, |acc, b| (acc << 8) | *b as usize),
        )
    };
    if der.len() < header + len {
        return Err(bad());
    }
    Ok((tag, header, len))
}

/// The DER of the SubjectPublicKeyInfo of a DER certificate.
pub fn certificate_spki(cert: &[u8]) -> Result<&[u8]> {
    let bad = || CryptoError::InvalidInput("the certificate is not an X.509 certificate".into());
    let (tag, h, l) = element(cert)?;
    if tag != 0x30 {
        return Err(bad());
    }
    let tbs_outer = &cert[h..h + l];
    let (tag, h, l) = element(tbs_outer)?;
    if tag != 0x30 {
        return Err(bad());
    }
    let mut rest = &tbs_outer[h..h + l];
    // tbsCertificate: [0] version (optional), serial, signature, issuer, validity, subject, spki.
    let mut index = 0;
    loop {
        let (tag, h, l) = element(rest)?;
        if index == 0 && tag == 0xa0 {
            rest = &rest[h + l..];
            continue;
        }
        if index == 5 {
            if tag != 0x30 {
                return Err(bad());
            }
            return Ok(&rest[..h + l]);
        }
        rest = &rest[h + l..];
        index += 1;
    }
}

/// The elements of a DER sequence's contents, each as (tag, contents).
fn elements(mut der: &[u8]) -> Result<Vec<(u8, &[u8])>> {
    let mut out = Vec::new();
    while !der.is_empty() {
        let (tag, h, l) = element(der)?;
        out.push((tag, &der[h..h + l]));
        der = &der[h + l..];
    }
    Ok(out)
}

/// The contents of the one element `der` holds, checking its tag.
fn contents(der: &[u8], want: u8) -> Result<&[u8]> {
    let (tag, h, l) = element(der)?;
    if tag != want || der.len() != h + l {
        return Err(CryptoError::InvalidInput(
            "the certificate is not valid DER".into(),
        ));
    }
    Ok(&der[h..h + l])
}

/// The permitted subtrees of a certificate's name constraints (RFC 5280 4.2.1.10).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PermittedNames {
    /// `dNSName` subtrees.
    pub dns: Vec<String>,
    /// `iPAddress` subtrees: the address followed by its mask (8 or 32 bytes).
    pub ip: Vec<Vec<u8>>,
}

/// DER of the OID 2.5.29.30 (id-ce-nameConstraints).
const NAME_CONSTRAINTS_OID: [u8; 3] = [0x55, 0x1d, 0x1e];

/// The permitted subtrees of a DER certificate's name constraints; `None` when it has no name
/// constraints extension.
///
/// # Errors
/// [`CryptoError::InvalidInput`] when the certificate is not DER.
pub fn permitted_names(cert: &[u8]) -> Result<Option<PermittedNames>> {
    // The certificate holds tbsCertificate, signatureAlgorithm and signature.
    let tbs = match elements(contents(cert, 0x30)?)?.first() {
        Some((0x30, tbs)) => *tbs,
        _ => {
            return Err(CryptoError::InvalidInput(
                "the certificate is not valid DER".into(),
            ));
        }
    };
    let Some((_, extensions)) = elements(tbs)?.into_iter().find(|(tag, _)| *tag == 0xa3) else {
        return Ok(None);
    };
    for (_, extension) in elements(contents(extensions, 0x30)?)? {
        let fields = elements(extension)?;
        let (Some((0x06, oid)), Some((0x04, value))) = (fields.first(), fields.last()) else {
            continue;
        };
        if *oid != NAME_CONSTRAINTS_OID {
            continue;
        }
        let mut names = PermittedNames::default();
        let subtrees = elements(contents(value, 0x30)?)?;
        for (_, subtree) in subtrees.iter().filter(|(tag, _)| *tag == 0xa0) {
            for (_, general_subtree) in elements(subtree)? {
                match elements(general_subtree)?.first() {
                    Some((0x82, dns)) => names.dns.push(String::from_utf8_lossy(dns).into_owned()),
                    Some((0x87, ip)) => names.ip.push(ip.to_vec()),
                    _ => {}
                }
            }
        }
        return Ok(Some(names));
    }
    Ok(None)
}

/// The certificate's SHA-256 thumbprint, as the hex of the digest of its DER.
pub fn thumbprint_sha256(cert: &[u8]) -> String {
    crate::digest(DigestAlgorithm::Sha256, cert)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The certificate's SHA-1 thumbprint (`x5t`), hex. SHA-1 only names the certificate here
/// (MSAL still sends it when given a SHA-1 thumbprint); it protects nothing.
pub fn thumbprint_sha1(cert: &[u8]) -> String {
    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA1_FOR_LEGACY_USE_ONLY, cert)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The DER of the first certificate in a PEM text, or the input itself if it is DER already.
pub fn certificate_der(input: &[u8]) -> Result<Vec<u8>> {
    let text = std::str::from_utf8(input).ok();
    match text.and_then(|t| t.find("-----BEGIN CERTIFICATE-----").map(|i| &t[i..])) {
        Some(pem) => {
            let body: String = pem
                .lines()
                .skip(1)
                .take_while(|l| !l.starts_with("-----END"))
                .collect::<String>()
                .replace(['\r', ' '], "");
            base64_standard(&body).ok_or_else(|| {
                CryptoError::InvalidInput("the certificate PEM is not valid base64".into())
            })
        }
        None => Ok(input.to_vec()),
    }
}

fn base64_standard(text: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(text).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_garbage() {
        assert!(certificate_spki(b"").is_err());
        assert!(certificate_spki(&[0x30, 0x82, 0xff, 0xff]).is_err());
        assert!(certificate_spki(&[0x30, 0x03, 0x02, 0x01, 0x00]).is_err());
    }

    #[test]
    fn base64_decodes() {
        assert_eq!(base64_standard("aGVsbG8=").unwrap(), b"hello");
        assert!(base64_standard("a$b").is_none());
    }
}
