//! `kagi keyvault key import`: reads a private key from a PEM or PKCS#12 file, or an Azure BYOK
//! transfer blob, and builds the body of the key-import request (`PUT /keys/{name}`).
//!
//! Keys are parsed here, on the client, and travel as JWK components, as `az keyvault key import`
//! sends them: the server never sees the file or its password. Private material stays in buffers
//! that are wiped when dropped (`Zeroizing`, `JsonWebKey`'s own wipe) and is never put into an
//! error message. Parsing uses RustCrypto's DER crates; nothing links OpenSSL.

use std::path::{Path, PathBuf};

use base64::Engine as _;
use clap::{ArgGroup, Args};
use der::asn1::{AnyRef, ObjectIdentifier, OctetString, OctetStringRef};
use der::referenced::OwnedToRef as _;
use der::{Decode as _, Encode as _};
use kagi_core::key::JsonWebKey;
use kagi_crypto::Curve;
use serde::Serialize;
use zeroize::{Zeroize as _, Zeroizing};

/// Largest key, PKCS#12 or BYOK file read (they are a few KB; this only stops a wrong path to a
/// large file from being read whole).
const MAX_FILE: u64 = 1 << 20;
/// Highest PBKDF2 / PKCS#12 KDF iteration count accepted (OpenSSL uses 2048; a file asking for
/// more than this would keep the CLI busy for minutes).
const MAX_ITERATIONS: u32 = 10_000_000;
/// Highest scrypt memory cost (128·N·r bytes) accepted.
const MAX_SCRYPT_MEMORY: u64 = 1 << 30;

/// Flags of `kagi keyvault key import`.
#[derive(Args, Debug)]
#[command(group(ArgGroup::new("source").required(true).args(["pem_file", "pfx_file", "byok_file"])))]
pub struct ImportArgs {
    /// Key name.
    #[arg(long)]
    pub name: String,
    /// PEM file with one private key: PKCS#8 (PRIVATE KEY), encrypted PKCS#8 (ENCRYPTED PRIVATE
    /// KEY), PKCS#1 (RSA PRIVATE KEY) or SEC1 (EC PRIVATE KEY); other blocks are skipped.
    #[arg(long, value_name = "FILE")]
    pem_file: Option<PathBuf>,
    /// PKCS#12 file (.pfx/.p12) holding one private key.
    #[arg(long, value_name = "FILE")]
    pfx_file: Option<PathBuf>,
    /// Azure BYOK transfer blob (.byok, JSON), made by an HSM vendor's tool with the vault's KEK.
    #[arg(long, value_name = "FILE")]
    byok_file: Option<PathBuf>,
    /// File whose first line is the password of an encrypted PEM or a PKCS#12 file (default:
    /// the KAGI_KEY_PASSWORD environment variable).
    #[arg(long, value_name = "FILE")]
    password_file: Option<PathBuf>,
    /// Key type of a BYOK blob: RSA-HSM or EC-HSM (RSA and EC mean the same).
    #[arg(long)]
    kty: Option<String>,
    /// Curve of an EC-HSM BYOK blob: P-256, P-384, P-521 or P-256K.
    #[arg(long)]
    curve: Option<String>,
    /// Import as an HSM-protected key (RSA-HSM/EC-HSM; needs a premium vault).
    #[arg(long)]
    hsm: bool,
    #[command(flatten)]
    flags: KeyFlags,
}

/// What a new key may do and when: the flags `key create` and `key import` share.
#[derive(Args, Debug)]
pub struct KeyFlags {
    /// Permitted operations, comma-separated (wrapKey,unwrapKey,…).
    #[arg(long, value_delimiter = ',')]
    pub ops: Option<Vec<String>>,
    /// Expiry, Unix seconds.
    #[arg(long)]
    pub expires: Option<i64>,
    /// Activation, Unix seconds.
    #[arg(long)]
    pub not_before: Option<i64>,
    /// Make the key disabled.
    #[arg(long)]
    pub disabled: bool,
}

/// Why a key could not be read for import. No variant carries key material or a password.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// A file is far larger than any key file.
    #[error("{path} is {size} bytes; a key file is at most {MAX_FILE} bytes")]
    TooLarge {
        /// The file.
        path: String,
        /// Its size.
        size: u64,
    },
    /// The --pem-file holds no PEM block.
    #[error("not a PEM file (no -----BEGIN …----- line); for a .pfx/.p12 file use --pfx-file")]
    NotPem,
    /// The --pfx-file is not PKCS#12.
    #[error("not a PKCS#12 (.pfx/.p12) file; for a PEM file use --pem-file")]
    NotPkcs12,
    /// No private key in the file.
    #[error("the file holds no private key{}", found_list(.0))]
    NoPrivateKey(Vec<String>),
    /// More than one private key in the file.
    #[error("the file holds {0} private keys; import needs a file with exactly one")]
    SeveralKeys(usize),
    /// The key is encrypted and no password was given.
    #[error("the key is encrypted: give its password with --password-file or KAGI_KEY_PASSWORD")]
    PasswordNeeded,
    /// Decryption or the integrity check failed.
    #[error("wrong password (or a damaged file): the key could not be decrypted")]
    WrongPassword,
    /// OpenSSL's old PEM encryption (`Proc-Type: 4,ENCRYPTED`).
    #[error(
        "the key uses OpenSSL's legacy PEM encryption (Proc-Type/DEK-Info), which kagi does not \
         read; convert it to encrypted PKCS#8: openssl pkcs8 -topk8 -v2 aes-256-cbc -in KEY -out NEW"
    )]
    LegacyPemEncryption,
    /// A key type Key Vault cannot hold.
    #[error("the key is {0}; Key Vault imports RSA and EC (P-256, P-384, P-521, P-256K) keys")]
    UnsupportedKeyType(String),
    /// An EC curve Key Vault does not offer.
    #[error("the key's curve {0} is not supported (P-256, P-384, P-521 or P-256K)")]
    UnsupportedCurve(String),
    /// Something the reader does not implement (an encryption scheme, a PEM block type, …).
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// The DER structures are not well formed.
    #[error("malformed {what}: {detail}")]
    Malformed {
        /// Which structure.
        what: &'static str,
        /// The decoder's complaint (positions and tags, never content).
        detail: String,
    },
    /// A flag value is wrong.
    #[error("{0}")]
    BadFlag(String),
    /// The --byok-file is not a BYOK blob.
    #[error("{0} is not an Azure BYOK transfer blob (a JSON object)")]
    NotByok(String),
}

fn found_list(found: &[String]) -> String {
    if found.is_empty() {
        String::new()
    } else {
        format!(" (it has: {})", found.join(", "))
    }
}

fn malformed(what: &'static str) -> impl Fn(der::Error) -> ImportError {
    move |e| ImportError::Malformed {
        what,
        detail: e.to_string(),
    }
}

type Result<T> = std::result::Result<T, ImportError>;

mod oid {
    use der::asn1::ObjectIdentifier as Oid;

    pub const RSA: Oid = Oid::new_unwrap("1.2.840.113549.1.1.1");
    pub const RSA_PSS: Oid = Oid::new_unwrap("1.2.840.113549.1.1.10");
    pub const EC: Oid = Oid::new_unwrap("1.2.840.10045.2.1");
    pub const DSA: Oid = Oid::new_unwrap("1.2.840.10040.4.1");
    pub const X25519: Oid = Oid::new_unwrap("1.3.101.110");
    pub const X448: Oid = Oid::new_unwrap("1.3.101.111");
    pub const ED25519: Oid = Oid::new_unwrap("1.3.101.112");
    pub const ED448: Oid = Oid::new_unwrap("1.3.101.113");
    pub const P256: Oid = Oid::new_unwrap("1.2.840.10045.3.1.7");
    pub const P384: Oid = Oid::new_unwrap("1.3.132.0.34");
    pub const P521: Oid = Oid::new_unwrap("1.3.132.0.35");
    pub const SECP256K1: Oid = Oid::new_unwrap("1.3.132.0.10");
    pub const DATA: Oid = Oid::new_unwrap("1.2.840.113549.1.7.1");
    pub const ENCRYPTED_DATA: Oid = Oid::new_unwrap("1.2.840.113549.1.7.6");
    pub const KEY_BAG: Oid = Oid::new_unwrap("1.2.840.113549.1.12.10.1.1");
    pub const SHROUDED_KEY_BAG: Oid = Oid::new_unwrap("1.2.840.113549.1.12.10.1.2");
    pub const PBE_SHA1_3DES: Oid = Oid::new_unwrap("1.2.840.113549.1.12.1.3");
    pub const PBE_SHA1_2DES: Oid = Oid::new_unwrap("1.2.840.113549.1.12.1.4");
    pub const PBE_SHA1_RC2_128: Oid = Oid::new_unwrap("1.2.840.113549.1.12.1.5");
    pub const PBE_SHA1_RC2_40: Oid = Oid::new_unwrap("1.2.840.113549.1.12.1.6");
    pub const SHA1: Oid = Oid::new_unwrap("1.3.14.3.2.26");
    pub const SHA224: Oid = Oid::new_unwrap("2.16.840.1.101.3.4.2.4");
    pub const SHA256: Oid = Oid::new_unwrap("2.16.840.1.101.3.4.2.1");
    pub const SHA384: Oid = Oid::new_unwrap("2.16.840.1.101.3.4.2.2");
    pub const SHA512: Oid = Oid::new_unwrap("2.16.840.1.101.3.4.2.3");
    pub const PBMAC1: Oid = Oid::new_unwrap("1.2.840.113549.1.5.14");
}

// --- the request ---------------------------------------------------------------------------------

#[derive(Serialize)]
struct Attributes {
    enabled: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    exp: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    nbf: Option<i64>,
}

/// `KeyImportParameters` as Key Vault reads it.
#[derive(Serialize)]
struct ImportBody<'a> {
    key: &'a JsonWebKey,
    #[serde(rename = "Hsm", skip_serializing_if = "std::ops::Not::not")]
    hsm: bool,
    attributes: Attributes,
}

/// Reads the key named by `args` and returns the JSON body of `PUT /keys/{name}`, in a buffer
/// that is wiped when dropped.
///
/// # Errors
/// [`ImportError`] when a file cannot be read or parsed, the password is missing or wrong, or a
/// flag is inconsistent. Nothing is sent in those cases.
pub fn request_body(args: &ImportArgs) -> Result<Zeroizing<Vec<u8>>> {
    if args.byok_file.is_none() && (args.kty.is_some() || args.curve.is_some()) {
        // A key file says what it is; --kty and --curve describe only a BYOK blob.
        return Err(ImportError::BadFlag(
            "--kty and --curve go with --byok-file only".into(),
        ));
    }
    let (mut key, hsm) = if let Some(path) = &args.pem_file {
        let data = read_file(path)?;
        let password = password(args)?;
        (
            parse_pem(&data, password.as_deref().map(String::as_bytes))?,
            args.hsm,
        )
    } else if let Some(path) = &args.pfx_file {
        let data = read_file(path)?;
        let password = password(args)?;
        (
            parse_pkcs12(&data, password.as_deref().map_or("", String::as_str))?,
            args.hsm,
        )
    } else if let Some(path) = &args.byok_file {
        let data = read_file(path)?;
        let key =
            byok_jwk(&data, args.kty.as_deref(), args.curve.as_deref()).map_err(|e| match e {
                ImportError::NotByok(_) => ImportError::NotByok(path.display().to_string()),
                e => e,
            })?;
        // A BYOK key lives in an HSM by definition.
        (key, true)
    } else {
        return Err(ImportError::BadFlag(
            "give one of --pem-file, --pfx-file or --byok-file".into(),
        ));
    };
    key.key_ops = args.flags.ops.clone();
    let body = ImportBody {
        key: &key,
        hsm,
        attributes: Attributes {
            enabled: !args.flags.disabled,
            exp: args.flags.expires,
            nbf: args.flags.not_before,
        },
    };
    to_json(&body)
}

/// Serializes into a buffer of exactly the right size, so that no reallocation leaves an
/// unwiped copy of the key behind.
fn to_json<T: Serialize>(value: &T) -> Result<Zeroizing<Vec<u8>>> {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let fail = |e: serde_json::Error| ImportError::Unsupported(format!("request body: {e}"));
    let mut count = Count(0);
    serde_json::to_writer(&mut count, value).map_err(fail)?;
    let mut out = Zeroizing::new(Vec::with_capacity(count.0));
    serde_json::to_writer(&mut *out, value).map_err(fail)?;
    Ok(out)
}

fn read_file(path: &Path) -> Result<Zeroizing<Vec<u8>>> {
    let err = |source| ImportError::Read {
        path: path.display().to_string(),
        source,
    };
    let size = std::fs::metadata(path).map_err(err)?.len();
    if size > MAX_FILE {
        return Err(ImportError::TooLarge {
            path: path.display().to_string(),
            size,
        });
    }
    std::fs::read(path).map(Zeroizing::new).map_err(err)
}

/// The first line of --password-file, else KAGI_KEY_PASSWORD, else none.
fn password(args: &ImportArgs) -> Result<Option<Zeroizing<String>>> {
    if let Some(path) = &args.password_file {
        let mut text =
            Zeroizing::new(
                std::fs::read_to_string(path).map_err(|source| ImportError::Read {
                    path: path.display().to_string(),
                    source,
                })?,
            );
        if let Some(end) = text.find('\n') {
            text.truncate(end);
        }
        if text.ends_with('\r') {
            text.pop();
        }
        return Ok(Some(text));
    }
    Ok(std::env::var("KAGI_KEY_PASSWORD").ok().map(Zeroizing::new))
}

/// The JWK of a BYOK import, as `az keyvault key import --byok-file` builds it: the blob's bytes
/// as `key_hsm`, `kty` RSA-HSM or EC-HSM, `crv` for EC.
fn byok_jwk(blob: &[u8], kty: Option<&str>, curve: Option<&str>) -> Result<JsonWebKey> {
    let kty = match kty.unwrap_or("RSA-HSM").to_ascii_uppercase().as_str() {
        "RSA" | "RSA-HSM" => "RSA-HSM",
        "EC" | "EC-HSM" => "EC-HSM",
        other => {
            return Err(ImportError::BadFlag(format!(
                "--kty {other}: a BYOK key is RSA-HSM or EC-HSM"
            )));
        }
    };
    let crv = match (kty, curve) {
        ("EC-HSM", Some(c)) => Some(
            Curve::from_jwk_name(c)
                .ok_or_else(|| ImportError::UnsupportedCurve(c.to_string()))?
                .jwk_name()
                .to_string(),
        ),
        ("EC-HSM", None) => {
            return Err(ImportError::BadFlag(
                "--curve is needed for an EC-HSM BYOK key (P-256, P-384, P-521 or P-256K)".into(),
            ));
        }
        (_, Some(_)) => {
            return Err(ImportError::BadFlag(
                "--curve is for EC-HSM keys only".into(),
            ));
        }
        (_, None) => None,
    };
    // Azure's transfer blob is a JSON object ({"schema_version", "header", "ciphertext", …});
    // checking that much catches a PEM or PKCS#12 file given here by mistake.
    match serde_json::from_slice::<serde_json::Value>(blob) {
        Ok(v) if v.is_object() => {}
        _ => return Err(ImportError::NotByok(String::new())),
    }
    let mut jwk = JsonWebKey::default();
    jwk.kty = Some(kty.to_string());
    jwk.crv = crv;
    jwk.key_hsm = Some(blob.to_vec());
    Ok(jwk)
}

// --- PEM -----------------------------------------------------------------------------------------

/// Reads the one private key of a PEM file. `password` opens an ENCRYPTED PRIVATE KEY block.
///
/// # Errors
/// [`ImportError`]: no PEM, no or several private keys, missing or wrong password, a key type,
/// curve or encryption kagi does not read, malformed DER.
pub fn parse_pem(data: &[u8], password: Option<&[u8]>) -> Result<JsonWebKey> {
    let text = std::str::from_utf8(data).map_err(|_| ImportError::NotPem)?;
    let mut blocks = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("-----BEGIN ") {
        let after = &rest[start + "-----BEGIN ".len()..];
        let label_end = after.find("-----").ok_or(ImportError::NotPem)?;
        let label = &after[..label_end];
        let body_start = &after[label_end + 5..];
        let end_marker = format!("-----END {label}-----");
        let end = body_start
            .find(&end_marker)
            .ok_or_else(|| ImportError::Malformed {
                what: "PEM",
                detail: format!("no {end_marker} line"),
            })?;
        blocks.push((label, &body_start[..end]));
        rest = &body_start[end + end_marker.len()..];
    }
    if blocks.is_empty() {
        return Err(ImportError::NotPem);
    }
    let keys: Vec<_> = blocks
        .iter()
        .filter(|(label, _)| label.ends_with("PRIVATE KEY"))
        .collect();
    match keys.as_slice() {
        [] => Err(ImportError::NoPrivateKey(
            blocks.iter().map(|(l, _)| (*l).to_string()).collect(),
        )),
        [(label, body)] => {
            let der = pem_body(body)?;
            match *label {
                "PRIVATE KEY" => from_pkcs8(&der),
                "ENCRYPTED PRIVATE KEY" => {
                    let password = password.ok_or(ImportError::PasswordNeeded)?;
                    let info = pkcs12::pbe_params::EncryptedPrivateKeyInfo::from_der(&der)
                        .map_err(malformed("encrypted PKCS#8"))?;
                    let plain = decrypt(
                        &info.encryption_algorithm,
                        info.encrypted_data.as_bytes(),
                        password,
                    )?;
                    decrypted_pkcs8(&plain)
                }
                "RSA PRIVATE KEY" => from_pkcs1(&der),
                "EC PRIVATE KEY" => from_sec1(&der, None, None),
                other => Err(ImportError::Unsupported(format!(
                    "{other} PEM blocks (convert the key to PKCS#8: \
                     openssl pkcs8 -topk8 -nocrypt -in KEY -out NEW)"
                ))),
            }
        }
        several => Err(ImportError::SeveralKeys(several.len())),
    }
}

/// The DER inside a PEM block body (between BEGIN and END lines).
fn pem_body(body: &str) -> Result<Zeroizing<Vec<u8>>> {
    if body.contains("Proc-Type:") || body.contains("DEK-Info:") {
        return Err(ImportError::LegacyPemEncryption);
    }
    let mut b64 = Zeroizing::new(String::with_capacity(body.len()));
    b64.extend(body.chars().filter(|c| !c.is_ascii_whitespace()));
    let engine = base64::engine::general_purpose::STANDARD;
    let mut der = Zeroizing::new(Vec::with_capacity(base64::decoded_len_estimate(b64.len())));
    engine
        .decode_vec(b64.as_bytes(), &mut der)
        .map_err(|_| ImportError::Malformed {
            what: "PEM",
            detail: "the block is not valid base64".into(),
        })?;
    Ok(der)
}

// --- key structures ------------------------------------------------------------------------------

/// A PKCS#8 document that came out of decryption: if it does not parse, the password was wrong
/// (CBC padding alone lets one wrong password in 256 through).
fn decrypted_pkcs8(der: &[u8]) -> Result<JsonWebKey> {
    from_pkcs8(der).map_err(|e| match e {
        ImportError::Malformed { .. } => ImportError::WrongPassword,
        e => e,
    })
}

fn from_pkcs8(der: &[u8]) -> Result<JsonWebKey> {
    let info = pkcs8::PrivateKeyInfoRef::try_from(der).map_err(|e| ImportError::Malformed {
        what: "PKCS#8 private key",
        detail: e.to_string(),
    })?;
    let private = info.private_key.as_bytes();
    match info.algorithm.oid {
        oid::RSA => from_pkcs1(private),
        oid::EC => {
            let curve = info
                .algorithm
                .parameters
                .map(|p| p.decode_as::<ObjectIdentifier>())
                .transpose()
                .map_err(malformed("EC algorithm parameters"))?;
            from_sec1(private, curve, Some(der))
        }
        oid::RSA_PSS => Err(ImportError::UnsupportedKeyType(
            "an RSASSA-PSS key (id-RSASSA-PSS); export it as a plain RSA key".into(),
        )),
        other => Err(ImportError::UnsupportedKeyType(key_type_name(other))),
    }
}

fn key_type_name(oid: ObjectIdentifier) -> String {
    match oid {
        oid::ED25519 => "Ed25519".into(),
        oid::ED448 => "Ed448".into(),
        oid::X25519 => "X25519".into(),
        oid::X448 => "X448".into(),
        oid::DSA => "DSA".into(),
        other => format!("of algorithm {other}"),
    }
}

fn unsigned(bytes: &[u8]) -> Vec<u8> {
    let first = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
    bytes[first..].to_vec()
}

fn from_pkcs1(der: &[u8]) -> Result<JsonWebKey> {
    let k = pkcs1::RsaPrivateKeyRef::try_from(der).map_err(|e| ImportError::Malformed {
        what: "RSA private key",
        detail: e.to_string(),
    })?;
    if k.other_prime_infos.is_some() {
        return Err(ImportError::UnsupportedKeyType(
            "a multi-prime RSA key".into(),
        ));
    }
    // JsonWebKey wipes itself on drop, so it is filled field by field (no `..Default`).
    let mut jwk = JsonWebKey::default();
    jwk.kty = Some("RSA".into());
    jwk.n = Some(unsigned(k.modulus.as_bytes()));
    jwk.e = Some(unsigned(k.public_exponent.as_bytes()));
    jwk.d = Some(unsigned(k.private_exponent.as_bytes()));
    jwk.p = Some(unsigned(k.prime1.as_bytes()));
    jwk.q = Some(unsigned(k.prime2.as_bytes()));
    jwk.dp = Some(unsigned(k.exponent1.as_bytes()));
    jwk.dq = Some(unsigned(k.exponent2.as_bytes()));
    jwk.qi = Some(unsigned(k.coefficient.as_bytes()));
    Ok(jwk)
}

fn curve_of(oid: ObjectIdentifier) -> Result<Curve> {
    match oid {
        oid::P256 => Ok(Curve::P256),
        oid::P384 => Ok(Curve::P384),
        oid::P521 => Ok(Curve::P521),
        oid::SECP256K1 => Ok(Curve::P256K),
        other => Err(ImportError::UnsupportedCurve(other.to_string())),
    }
}

/// A SEC1 `ECPrivateKey`. `outer_curve` is the curve named by a PKCS#8 wrapper, `pkcs8` that
/// wrapper (used to compute the public point when the key does not carry it).
fn from_sec1(
    der: &[u8],
    outer_curve: Option<ObjectIdentifier>,
    pkcs8: Option<&[u8]>,
) -> Result<JsonWebKey> {
    let k = sec1::EcPrivateKey::try_from(der).map_err(|e| ImportError::Malformed {
        what: "EC private key",
        detail: e.to_string(),
    })?;
    let inner_curve = k.parameters.and_then(|p| p.named_curve());
    let curve_oid = match (outer_curve, inner_curve) {
        (Some(a), Some(b)) if a != b => {
            return Err(ImportError::Malformed {
                what: "EC private key",
                detail: "the PKCS#8 wrapper and the key name different curves".into(),
            });
        }
        (Some(c), _) | (None, Some(c)) => c,
        (None, None) => {
            return Err(ImportError::Malformed {
                what: "EC private key",
                detail: "no named curve".into(),
            });
        }
    };
    let curve = curve_of(curve_oid)?;
    let len = curve.coordinate_len();
    let scalar = &k.private_key[k.private_key.iter().take_while(|b| **b == 0).count()..];
    if scalar.is_empty() || scalar.len() > len {
        return Err(ImportError::Malformed {
            what: "EC private key",
            detail: "the private scalar does not fit the curve".into(),
        });
    }
    let mut d = Vec::with_capacity(len);
    d.resize(len - scalar.len(), 0);
    d.extend_from_slice(scalar);
    let mut jwk = JsonWebKey::default();
    jwk.kty = Some("EC".into());
    jwk.crv = Some(curve.jwk_name().into());
    jwk.d = Some(d);
    match k.public_key {
        Some(point) if point.len() == 1 + 2 * len && point[0] == 0x04 => {
            jwk.x = Some(point[1..=len].to_vec());
            jwk.y = Some(point[1 + len..].to_vec());
        }
        // No public point, or a compressed one: let aws-lc compute it from the scalar.
        _ => {
            let doc;
            let pkcs8 = match pkcs8 {
                Some(p) => p,
                None => {
                    doc = wrap_sec1(der, curve_oid)?;
                    &doc[..]
                }
            };
            let pair =
                kagi_crypto::KeyPair::from_pkcs8(pkcs8).map_err(|e| ImportError::Malformed {
                    what: "EC private key",
                    detail: e.to_string(),
                })?;
            let kagi_crypto::PublicKey::Ec { x, y, .. } = pair.public_key() else {
                return Err(ImportError::Malformed {
                    what: "EC private key",
                    detail: "not an EC key".into(),
                });
            };
            jwk.x = Some(x.clone());
            jwk.y = Some(y.clone());
        }
    }
    Ok(jwk)
}

/// A PKCS#8 document around a SEC1 key.
fn wrap_sec1(sec1: &[u8], curve: ObjectIdentifier) -> Result<Zeroizing<Vec<u8>>> {
    let fail = malformed("EC private key");
    let params = AnyRef::from(&curve);
    let info = pkcs8::PrivateKeyInfoRef::new(
        pkcs8::AlgorithmIdentifierRef {
            oid: oid::EC,
            parameters: Some(params),
        },
        OctetStringRef::new(sec1).map_err(&fail)?,
    );
    let mut out = Zeroizing::new(Vec::with_capacity(
        usize::try_from(info.encoded_len().map_err(&fail)?).map_err(|_| {
            ImportError::Malformed {
                what: "EC private key",
                detail: "too long".into(),
            }
        })?,
    ));
    info.encode_to_vec(&mut out).map_err(&fail)?;
    Ok(out)
}

// --- decryption ----------------------------------------------------------------------------------

/// Decrypts with a password-based scheme: PBES2 (PBKDF2 or scrypt, AES-CBC or 3DES-CBC) or
/// PKCS#12's own PBE (SHA-1 with 3DES or RC2, as `openssl pkcs12 -legacy` writes).
fn decrypt(
    alg: &spki_ref::AlgorithmIdentifierOwned,
    ciphertext: &[u8],
    password: &[u8],
) -> Result<Zeroizing<Vec<u8>>> {
    match alg.oid {
        oid::PBE_SHA1_3DES => pkcs12_pbe::<des::TdesEde3>(alg, ciphertext, password, 24),
        oid::PBE_SHA1_2DES => pkcs12_pbe::<des::TdesEde2>(alg, ciphertext, password, 16),
        oid::PBE_SHA1_RC2_128 => pkcs12_pbe::<rc2::Rc2>(alg, ciphertext, password, 16),
        oid::PBE_SHA1_RC2_40 => pkcs12_pbe::<rc2::Rc2>(alg, ciphertext, password, 5),
        _ => {
            let scheme = pkcs5::EncryptionScheme::try_from(alg.owned_to_ref()).map_err(|e| {
                ImportError::Unsupported(format!(
                    "key encryption {} ({e}); re-encrypt with \
                     openssl pkcs8 -topk8 -v2 aes-256-cbc",
                    alg.oid
                ))
            })?;
            if let Some(params) = scheme.pbes2() {
                check_kdf_cost(&params.kdf)?;
            }
            let mut buf = Zeroizing::new(ciphertext.to_vec());
            let len = scheme
                .decrypt_in_place(password, &mut buf)
                .map_err(|e| match e {
                    pkcs5::Error::DecryptFailed => ImportError::WrongPassword,
                    pkcs5::Error::NoPbes1CryptSupport => ImportError::Unsupported(
                        "PBES1 key encryption; re-encrypt with \
                         openssl pkcs8 -topk8 -v2 aes-256-cbc"
                            .into(),
                    ),
                    other => ImportError::Unsupported(format!("key encryption: {other}")),
                })?
                .len();
            buf.truncate(len);
            Ok(buf)
        }
    }
}

/// The spki types as the pkcs12 and cms crates use them.
mod spki_ref {
    pub use pkcs8::spki::AlgorithmIdentifierOwned;
}

fn check_kdf_cost(kdf: &pkcs5::pbes2::Kdf) -> Result<()> {
    let too_costly = match kdf {
        pkcs5::pbes2::Kdf::Pbkdf2(p) => p.iteration_count > MAX_ITERATIONS,
        pkcs5::pbes2::Kdf::Scrypt(p) => {
            p.parallelization > 16
                || 128u64
                    .checked_mul(p.cost_parameter)
                    .and_then(|m| m.checked_mul(u64::from(p.block_size)))
                    .is_none_or(|m| m > MAX_SCRYPT_MEMORY)
        }
        // A KDF added to pkcs5 later: its decrypt call refuses what it cannot do.
        _ => false,
    };
    if too_costly {
        return Err(ImportError::Unsupported(
            "the key's password derivation is far costlier than any tool writes".into(),
        ));
    }
    Ok(())
}

fn iterations(n: i32) -> Result<i32> {
    if n < 1 || n.unsigned_abs() > MAX_ITERATIONS {
        return Err(ImportError::Unsupported(format!(
            "PKCS#12 iteration count {n}"
        )));
    }
    Ok(n)
}

/// A PKCS#12 password as that standard's KDF takes it (UTF-8 here; the KDF makes it BMP).
fn utf8_password(password: &[u8]) -> Result<&str> {
    std::str::from_utf8(password)
        .map_err(|_| ImportError::Unsupported("a PKCS#12 password that is not UTF-8".into()))
}

/// PKCS#12 appendix B PBE (SHA-1 KDF, CBC mode).
fn pkcs12_pbe<C>(
    alg: &spki_ref::AlgorithmIdentifierOwned,
    ciphertext: &[u8],
    password: &[u8],
    key_len: usize,
) -> Result<Zeroizing<Vec<u8>>>
where
    C: cbc::cipher::BlockCipherDecrypt + cbc::cipher::KeyInit,
{
    use cbc::cipher::{BlockModeDecrypt as _, KeyIvInit as _, block_padding::Pkcs7};
    use pkcs12::kdf::{Pkcs12KeyType, derive_key_utf8};
    let params = alg
        .parameters
        .as_ref()
        .ok_or_else(|| ImportError::Malformed {
            what: "PKCS#12 PBE parameters",
            detail: "absent".into(),
        })?
        .decode_as::<pkcs12::pbe_params::Pkcs12PbeParams>()
        .map_err(malformed("PKCS#12 PBE parameters"))?;
    let rounds = iterations(params.iterations)?;
    let password = utf8_password(password)?;
    let salt = params.salt.as_bytes();
    let kdf = |kind, len| {
        derive_key_utf8::<sha1::Sha1>(password, salt, kind, rounds, len)
            .map(Zeroizing::new)
            .map_err(malformed("PKCS#12 password"))
    };
    let key = kdf(Pkcs12KeyType::EncryptionKey, key_len)?;
    let iv = kdf(Pkcs12KeyType::Iv, 8)?;
    let cipher =
        cbc::Decryptor::<C>::new_from_slices(&key, &iv).map_err(|_| ImportError::Malformed {
            what: "PKCS#12 PBE parameters",
            detail: "bad key or IV length".into(),
        })?;
    let mut buf = Zeroizing::new(ciphertext.to_vec());
    let len = cipher
        .decrypt_padded::<Pkcs7>(&mut buf)
        .map_err(|_| ImportError::WrongPassword)?
        .len();
    buf.truncate(len);
    Ok(buf)
}

// --- PKCS#12 -------------------------------------------------------------------------------------

macro_rules! check_mac {
    ($digest:ty, $mac:expr, $password:expr, $data:expr) => {{
        use hmac::{KeyInit as _, Mac as _};
        let mac = $mac;
        let key = Zeroizing::new(
            pkcs12::kdf::derive_key_utf8::<$digest>(
                $password,
                mac.mac_salt.as_bytes(),
                pkcs12::kdf::Pkcs12KeyType::Mac,
                iterations(mac.iterations)?,
                <$digest as hmac::digest::OutputSizeUser>::output_size(),
            )
            .map_err(malformed("PKCS#12 password"))?,
        );
        let mut hmac =
            hmac::Hmac::<$digest>::new_from_slice(&key).map_err(|_| ImportError::Malformed {
                what: "PKCS#12 MAC",
                detail: "bad key length".into(),
            })?;
        hmac.update($data);
        hmac.verify_slice(mac.mac.digest.as_bytes())
            .map_err(|_| ImportError::WrongPassword)
    }};
}

/// Checks the password-based integrity MAC of a PKCS#12 file: a wrong password fails here,
/// before anything is decrypted.
fn verify_mac(mac: &pkcs12::MacData, password: &str, data: &[u8]) -> Result<()> {
    match mac.mac.algorithm.oid {
        oid::SHA1 => check_mac!(sha1::Sha1, mac, password, data),
        oid::SHA224 => check_mac!(sha2::Sha224, mac, password, data),
        oid::SHA256 => check_mac!(sha2::Sha256, mac, password, data),
        oid::SHA384 => check_mac!(sha2::Sha384, mac, password, data),
        oid::SHA512 => check_mac!(sha2::Sha512, mac, password, data),
        oid::PBMAC1 => Err(ImportError::Unsupported(
            "PKCS#12 files protected by PBMAC1 (write the file without -pbmac1_pbkdf2)".into(),
        )),
        other => Err(ImportError::Unsupported(format!(
            "PKCS#12 MAC digest {other}"
        ))),
    }
}

/// Reads the one private key of a PKCS#12 file (as `openssl pkcs12 -export` writes it, with
/// OpenSSL 3's AES-256-CBC/PBKDF2 default or `-legacy` 3DES/RC2).
///
/// # Errors
/// [`ImportError`]: not PKCS#12, wrong password, no or several keys, unsupported protection or
/// key type.
pub fn parse_pkcs12(data: &[u8], password: &str) -> Result<JsonWebKey> {
    let pfx = pkcs12::pfx::Pfx::from_der(data).map_err(|_| ImportError::NotPkcs12)?;
    if pfx.auth_safe.content_type != oid::DATA {
        return Err(ImportError::Unsupported(
            "PKCS#12 files with public-key integrity (only password integrity is read)".into(),
        ));
    }
    let auth = pfx
        .auth_safe
        .content
        .decode_as::<OctetString>()
        .map_err(malformed("PKCS#12 authenticated safe"))?;
    if let Some(mac) = &pfx.mac_data {
        verify_mac(mac, password, auth.as_bytes())?;
    }
    let safes = pkcs12::AuthenticatedSafe::from_der(auth.as_bytes())
        .map_err(malformed("PKCS#12 authenticated safe"))?;
    let mut keys = Vec::new();
    let mut found = Vec::new();
    for safe in &safes {
        let contents = match safe.content_type {
            oid::DATA => Zeroizing::new(
                safe.content
                    .decode_as::<OctetString>()
                    .map_err(malformed("PKCS#12 safe contents"))?
                    .into_bytes()
                    .into_vec(),
            ),
            oid::ENCRYPTED_DATA => {
                let enc = safe
                    .content
                    .decode_as::<cms::encrypted_data::EncryptedData>()
                    .map_err(malformed("PKCS#12 encrypted data"))?;
                let Some(ct) = &enc.enc_content_info.encrypted_content else {
                    continue;
                };
                decrypt(
                    &enc.enc_content_info.content_enc_alg,
                    ct.as_bytes(),
                    password.as_bytes(),
                )?
            }
            other => {
                return Err(ImportError::Unsupported(format!(
                    "PKCS#12 content of type {other} (only password-protected files are read)"
                )));
            }
        };
        let mut bags = pkcs12::safe_bag::SafeContents::from_der(&contents).map_err(|e| {
            // Decrypted garbage (a wrong password without a MAC) fails here.
            if safe.content_type == oid::ENCRYPTED_DATA {
                ImportError::WrongPassword
            } else {
                malformed("PKCS#12 safe contents")(e)
            }
        })?;
        for bag in &mut bags {
            let key = match bag.bag_id {
                oid::KEY_BAG => Some(from_pkcs8(explicit_inner(&bag.bag_value)?)),
                oid::SHROUDED_KEY_BAG => {
                    let info = pkcs12::pbe_params::EncryptedPrivateKeyInfo::from_der(
                        explicit_inner(&bag.bag_value)?,
                    )
                    .map_err(malformed("PKCS#12 key bag"))?;
                    let plain = decrypt(
                        &info.encryption_algorithm,
                        info.encrypted_data.as_bytes(),
                        password.as_bytes(),
                    )?;
                    Some(decrypted_pkcs8(&plain))
                }
                other => {
                    found.push(bag_name(other));
                    None
                }
            };
            bag.bag_value.zeroize();
            if let Some(key) = key {
                keys.push(key?);
            }
        }
    }
    match keys.len() {
        0 => Err(ImportError::NoPrivateKey(found)),
        1 => Ok(keys.remove(0)),
        n => Err(ImportError::SeveralKeys(n)),
    }
}

/// The content of a `[0] EXPLICIT` wrapper (a SafeBag's bagValue).
fn explicit_inner(tlv: &[u8]) -> Result<&[u8]> {
    Ok(AnyRef::from_der(tlv)
        .map_err(malformed("PKCS#12 bag"))?
        .value())
}

fn bag_name(oid: ObjectIdentifier) -> String {
    match oid.arcs().last() {
        Some(3) => "certificate".into(),
        Some(4) => "CRL".into(),
        Some(5) => "secret".into(),
        _ => oid.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kagi_crypto::{KeyPair, RsaPrivateComponents};

    const PASSWORD: &str = "test-password";

    macro_rules! fixture {
        ($name:literal) => {
            include_bytes!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/fixtures/key_import/",
                $name
            ))
            .as_slice()
        };
    }

    fn pem(data: &[u8]) -> JsonWebKey {
        parse_pem(data, None).expect("PEM parses")
    }

    fn pem_pw(data: &[u8]) -> JsonWebKey {
        parse_pem(data, Some(PASSWORD.as_bytes())).expect("encrypted PEM parses")
    }

    fn pfx(data: &[u8]) -> JsonWebKey {
        parse_pkcs12(data, PASSWORD).expect("PKCS#12 parses")
    }

    fn comps(k: &JsonWebKey) -> Vec<Option<Vec<u8>>> {
        vec![
            k.kty.clone().map(String::into_bytes),
            k.crv.clone().map(String::into_bytes),
            k.n.clone(),
            k.e.clone(),
            k.d.clone(),
            k.p.clone(),
            k.q.clone(),
            k.dp.clone(),
            k.dq.clone(),
            k.qi.clone(),
            k.x.clone(),
            k.y.clone(),
        ]
    }

    /// The components build a consistent RSA key pair (aws-lc checks n = p·q, d and the CRT
    /// values), of `bits` bits, with no leading zero bytes.
    fn assert_rsa(k: &JsonWebKey, bits: usize) {
        assert_eq!(k.kty.as_deref(), Some("RSA"));
        let f = |v: &Option<Vec<u8>>| v.clone().expect("component present");
        let (n, e, d, p, q, dp, dq, qi) = (
            f(&k.n),
            f(&k.e),
            f(&k.d),
            f(&k.p),
            f(&k.q),
            f(&k.dp),
            f(&k.dq),
            f(&k.qi),
        );
        assert_eq!(n.len() * 8, bits);
        for c in [&n, &e, &d, &p, &q, &dp, &dq, &qi] {
            assert_ne!(c[0], 0, "no leading zero byte");
        }
        KeyPair::rsa_from_components(&RsaPrivateComponents {
            n: &n,
            e: &e,
            d: &d,
            p: &p,
            q: &q,
            dp: &dp,
            dq: &dq,
            qi: &qi,
        })
        .expect("consistent RSA key");
    }

    /// A consistent EC key on `crv`, with fixed-length coordinates and scalar.
    fn assert_ec(k: &JsonWebKey, crv: &str) {
        assert_eq!(k.kty.as_deref(), Some("EC"));
        assert_eq!(k.crv.as_deref(), Some(crv));
        let curve = Curve::from_jwk_name(crv).expect("known curve");
        let len = curve.coordinate_len();
        let (x, y, d) = (
            k.x.clone().expect("x"),
            k.y.clone().expect("y"),
            k.d.clone().expect("d"),
        );
        assert_eq!((x.len(), y.len(), d.len()), (len, len, len));
        KeyPair::ec_from_components(curve, &x, &y, &d).expect("d matches (x, y)");
    }

    #[test]
    fn rsa_in_every_pem_form_gives_the_same_components() {
        let plain = pem(fixture!("rsa2048.pkcs8.pem"));
        assert_rsa(&plain, 2048);
        assert_eq!(comps(&pem(fixture!("rsa2048.pkcs1.pem"))), comps(&plain));
        assert_eq!(comps(&pem_pw(fixture!("rsa2048.enc.pem"))), comps(&plain));
        // Windows line ends.
        let crlf = String::from_utf8(fixture!("rsa2048.pkcs8.pem").to_vec())
            .expect("ASCII")
            .replace('\n', "\r\n");
        assert_eq!(comps(&pem(crlf.as_bytes())), comps(&plain));
    }

    #[test]
    fn rsa_pkcs12_modern_and_legacy() {
        let plain = pem(fixture!("rsa2048.pkcs8.pem"));
        assert_eq!(comps(&pfx(fixture!("rsa2048.pfx"))), comps(&plain));
        assert_eq!(comps(&pfx(fixture!("rsa2048.legacy.pfx"))), comps(&plain));
    }

    #[test]
    fn ec_in_every_form_gives_the_same_components() {
        let plain = pem(fixture!("p256.pkcs8.pem"));
        assert_ec(&plain, "P-256");
        // ecparam -genkey output: an EC PARAMETERS block before the key.
        assert_eq!(comps(&pem(fixture!("p256.sec1.pem"))), comps(&plain));
        // PBES2 with AES-128-CBC and PBKDF2-HMAC-SHA1.
        assert_eq!(comps(&pem_pw(fixture!("p256.enc.pem"))), comps(&plain));
        // No public point in the file: computed from d.
        assert_eq!(comps(&pem(fixture!("p256.nopub.pem"))), comps(&plain));
        assert_eq!(comps(&pfx(fixture!("p256.pfx"))), comps(&plain));
        assert_eq!(comps(&pfx(fixture!("p256.nocerts.pfx"))), comps(&plain));
    }

    #[test]
    fn other_curves() {
        assert_ec(&pem(fixture!("p384.pkcs8.pem")), "P-384");
        assert_ec(&pem(fixture!("p521.pkcs8.pem")), "P-521");
        assert_ec(&pem(fixture!("secp256k1.pkcs8.pem")), "P-256K");
    }

    #[test]
    fn a_certificate_beside_the_key_is_skipped() {
        let mut both = fixture!("rsa2048.crt").to_vec();
        both.extend_from_slice(fixture!("rsa2048.pkcs8.pem"));
        assert_eq!(
            comps(&pem(&both)),
            comps(&pem(fixture!("rsa2048.pkcs8.pem")))
        );
    }

    #[test]
    fn wrong_or_missing_passwords() {
        for bad in ["", "wrong", "test-passworD"] {
            for result in [
                parse_pem(fixture!("rsa2048.enc.pem"), Some(bad.as_bytes())),
                parse_pem(fixture!("p256.enc.pem"), Some(bad.as_bytes())),
                parse_pkcs12(fixture!("rsa2048.pfx"), bad),
                parse_pkcs12(fixture!("rsa2048.legacy.pfx"), bad),
                parse_pkcs12(fixture!("p256.nocerts.pfx"), bad),
            ] {
                assert!(
                    matches!(result, Err(ImportError::WrongPassword)),
                    "{bad:?}: {:?}",
                    result.map(|k| k.kty.clone())
                );
            }
        }
        assert!(matches!(
            parse_pem(fixture!("rsa2048.enc.pem"), None),
            Err(ImportError::PasswordNeeded)
        ));
    }

    #[test]
    fn refusals_say_why() {
        assert!(matches!(
            parse_pem(
                fixture!("rsa2048.legacy-enc.pem"),
                Some(PASSWORD.as_bytes())
            ),
            Err(ImportError::LegacyPemEncryption)
        ));
        let e = parse_pem(fixture!("ed25519.pem"), None).err();
        assert!(
            matches!(&e, Some(ImportError::UnsupportedKeyType(t)) if t == "Ed25519"),
            "{e:?}"
        );
        let e = parse_pem(fixture!("rsa2048.crt"), None).err();
        assert!(
            matches!(&e, Some(ImportError::NoPrivateKey(f)) if f == &["CERTIFICATE".to_string()]),
            "{e:?}"
        );
        let mut two = fixture!("rsa2048.pkcs8.pem").to_vec();
        two.extend_from_slice(fixture!("p256.pkcs8.pem"));
        assert!(matches!(
            parse_pem(&two, None),
            Err(ImportError::SeveralKeys(2))
        ));
        assert!(matches!(
            parse_pem(fixture!("rsa2048.pfx"), None),
            Err(ImportError::NotPem)
        ));
        assert!(matches!(
            parse_pem(b"just text", None),
            Err(ImportError::NotPem)
        ));
        assert!(matches!(
            parse_pkcs12(fixture!("rsa2048.pkcs8.pem"), PASSWORD),
            Err(ImportError::NotPkcs12)
        ));
        let truncated = &fixture!("rsa2048.pkcs8.pem")[..600];
        assert!(matches!(
            parse_pem(truncated, None),
            Err(ImportError::Malformed { .. })
        ));
    }

    #[test]
    fn errors_never_show_the_password() {
        let secret = "hunter2-very-secret";
        let errors = [
            parse_pem(fixture!("rsa2048.enc.pem"), Some(secret.as_bytes())).err(),
            parse_pkcs12(fixture!("rsa2048.pfx"), secret).err(),
        ];
        for e in errors.into_iter().flatten() {
            assert!(!e.to_string().contains(secret));
            assert!(!format!("{e:?}").contains(secret));
        }
    }

    fn args(extra: &[&str]) -> ImportArgs {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            a: ImportArgs,
        }
        let mut argv = vec!["import", "--name", "k"];
        argv.extend_from_slice(extra);
        Cli::try_parse_from(argv).expect("flags parse").a
    }

    fn body(a: &ImportArgs) -> serde_json::Value {
        serde_json::from_slice(&request_body(a).expect("body")).expect("JSON")
    }

    fn path(name: &str) -> String {
        format!(
            "{}/tests/fixtures/key_import/{name}",
            env!("CARGO_MANIFEST_DIR")
        )
    }

    #[test]
    fn the_request_body() {
        let b = body(&args(&[
            "--pem-file",
            &path("p256.pkcs8.pem"),
            "--ops",
            "sign,verify",
            "--expires",
            "4102444800",
            "--disabled",
        ]));
        let key = &b["key"];
        assert_eq!(key["kty"], "EC");
        assert_eq!(key["crv"], "P-256");
        assert_eq!(key["key_ops"], serde_json::json!(["sign", "verify"]));
        for c in ["x", "y", "d"] {
            let s = key[c].as_str().expect("base64url string");
            assert_eq!(s.len(), 43, "32 bytes, unpadded");
            assert!(!s.contains(['=', '+', '/']));
        }
        assert_eq!(
            b["attributes"],
            serde_json::json!({"enabled": false, "exp": 4102444800_i64})
        );
        assert!(b.get("Hsm").is_none());

        let b = body(&args(&["--pem-file", &path("rsa2048.pkcs8.pem"), "--hsm"]));
        assert_eq!(b["Hsm"], true);
        assert_eq!(b["key"]["kty"], "RSA");
        assert_eq!(b["key"]["e"], "AQAB");
        assert_eq!(b["attributes"], serde_json::json!({"enabled": true}));
    }

    #[test]
    fn the_password_comes_from_the_first_line_of_its_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pw = dir.path().join("pw");
        std::fs::write(&pw, format!("{PASSWORD}\r\nsecond line\n")).expect("write");
        let b = body(&args(&[
            "--pfx-file",
            &path("rsa2048.pfx"),
            "--password-file",
            pw.to_str().expect("UTF-8 path"),
        ]));
        assert_eq!(b["key"]["kty"], "RSA");
    }

    #[test]
    fn byok_bodies() {
        let dir = tempfile::tempdir().expect("tempdir");
        let blob = dir.path().join("k.byok");
        let json = br#"{"schema_version":"1.0.0","header":{"kid":"kek","alg":"dir","enc":"CKM_RSA_AES_KEY_WRAP"},"ciphertext":"abc","generator":"test"}"#;
        std::fs::write(&blob, json).expect("write");
        let blob = blob.to_str().expect("UTF-8 path");
        let b = body(&args(&["--byok-file", blob]));
        assert_eq!(b["key"]["kty"], "RSA-HSM");
        assert_eq!(b["Hsm"], true);
        let sent = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(b["key"]["key_hsm"].as_str().expect("key_hsm"))
            .expect("base64url");
        assert_eq!(sent, json);
        assert!(b["key"].get("crv").is_none());

        let b = body(&args(&[
            "--byok-file",
            blob,
            "--kty",
            "EC",
            "--curve",
            "P-384",
        ]));
        assert_eq!(b["key"]["kty"], "EC-HSM");
        assert_eq!(b["key"]["crv"], "P-384");

        for (extra, want) in [
            (&["--kty", "oct-HSM"][..], "RSA-HSM or EC-HSM"),
            (&["--kty", "EC-HSM"][..], "--curve is needed"),
            (
                &["--kty", "RSA-HSM", "--curve", "P-256"][..],
                "EC-HSM keys only",
            ),
            (&["--kty", "EC-HSM", "--curve", "P-192"][..], "P-192"),
        ] {
            let mut a = vec!["--byok-file", blob];
            a.extend_from_slice(extra);
            let e = request_body(&args(&a)).expect_err("refused");
            assert!(e.to_string().contains(want), "{e}");
        }
        let e = request_body(&args(&["--byok-file", &path("rsa2048.pkcs8.pem")]))
            .expect_err("a PEM is no BYOK blob");
        assert!(matches!(e, ImportError::NotByok(p) if p.ends_with("rsa2048.pkcs8.pem")));
    }

    #[test]
    fn exactly_one_source() {
        use clap::Parser;
        #[derive(Parser, Debug)]
        struct Cli {
            #[command(flatten)]
            a: ImportArgs,
        }
        assert!(Cli::try_parse_from(["import", "--name", "k"]).is_err());
        assert!(
            Cli::try_parse_from([
                "import",
                "--name",
                "k",
                "--pem-file",
                "a",
                "--pfx-file",
                "b"
            ])
            .is_err()
        );
        let e = request_body(&args(&["--pem-file", "a", "--kty", "RSA"])).expect_err("refused");
        assert!(e.to_string().contains("--byok-file only"), "{e}");
    }
}
