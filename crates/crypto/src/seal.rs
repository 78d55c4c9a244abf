//! The root key and sealing of data at rest (AES-256-GCM under HKDF-derived subkeys).

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use aws_lc_rs::hkdf;
use zeroize::Zeroizing;

use crate::error::{CryptoError, Result};

/// First byte of every sealed blob, so the format can evolve.
const FORMAT_V1: u8 = 0x01;
const HEADER_LEN: usize = 1 + NONCE_LEN;
const TAG_LEN: usize = 16;
/// Root key length in bytes (AES-256 / HKDF input).
const ROOT_KEY_LEN: usize = 32;
/// Prefix of every HKDF `info`; bump the version to rotate all derivations at once.
const INFO_PREFIX: &[u8] = b"kagi/v1/";
const FINGERPRINT_LEN: usize = 8;

/// What sealed data is for; each purpose gets its own subkey derived by HKDF-SHA256 from the
/// root key (info = `b"kagi/v1/" + label`), so a ciphertext of one purpose never opens as
/// another.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SealPurpose {
    /// Private key material of vault keys ("private-key").
    PrivateKey,
    /// Exported key backups ("key-backup").
    KeyBackup,
    /// Secret values ("secret").
    Secret,
    /// Token signing keys ("token-signing").
    Token,
    /// Whole-vault backups ("vault-backup").
    VaultBackup,
    /// Storage services' own keys, such as a backup vault's platform key ("service-key").
    ServiceKey,
}

impl SealPurpose {
    /// All purposes, in subkey-table order.
    pub const ALL: [Self; 6] = [
        Self::PrivateKey,
        Self::KeyBackup,
        Self::Secret,
        Self::Token,
        Self::VaultBackup,
        Self::ServiceKey,
    ];

    /// The label appended to `kagi/v1/` in the HKDF info. Changing one makes existing data
    /// unreadable.
    #[must_use]
    pub fn label(self) -> &'static str {
        match self {
            Self::PrivateKey => "private-key",
            Self::KeyBackup => "key-backup",
            Self::Secret => "secret",
            Self::Token => "token-signing",
            Self::VaultBackup => "vault-backup",
            Self::ServiceKey => "service-key",
        }
    }

    fn index(self) -> usize {
        match self {
            Self::PrivateKey => 0,
            Self::KeyBackup => 1,
            Self::Secret => 2,
            Self::Token => 3,
            Self::VaultBackup => 4,
            Self::ServiceKey => 5,
        }
    }
}

/// The root of the key hierarchy. Behind a trait so an HSM or an unseal step can replace the
/// file.
pub trait RootKey: Send + Sync + fmt::Debug {
    /// Encrypts and authenticates `plaintext` for `purpose`, binding `aad`.
    ///
    /// # Errors
    /// [`CryptoError::Internal`] if encryption or the random source fails.
    fn seal(&self, purpose: SealPurpose, aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>>;

    /// Reverses [`RootKey::seal`] for the same `purpose` and `aad`.
    ///
    /// # Errors
    /// [`CryptoError::DecryptionFailed`] if the data was tampered with, or sealed under another
    /// root key, purpose or aad; [`CryptoError::Unsupported`] for an unknown format version.
    fn open(&self, purpose: SealPurpose, aad: &[u8], sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>>;

    /// A short public fingerprint of the root key (first 8 bytes of HKDF-derived
    /// "kagi/v1/fingerprint", hex), to tell which root key sealed a store — never the key.
    fn fingerprint(&self) -> String;
}

/// AES-256-GCM under HKDF-derived subkeys.
///
/// Sealed format: 1 byte version (0x01) || 12-byte random nonce || ciphertext || 16-byte tag.
/// The AAD given to GCM is the caller's `aad`. Subkeys are derived once at construction and
/// live only inside aws-lc key objects.
pub struct AesRootKey {
    keys: [LessSafeKey; SealPurpose::ALL.len()],
    fingerprint: String,
}

/// HKDF output length for the fingerprint.
struct FingerprintLen;

impl hkdf::KeyType for FingerprintLen {
    fn len(&self) -> usize {
        FINGERPRINT_LEN
    }
}

impl AesRootKey {
    /// Derives the subkeys from 32 raw root-key bytes.
    #[must_use]
    pub fn from_bytes(key: &[u8; ROOT_KEY_LEN]) -> Self {
        // No salt: the root key is already uniformly random, so extract needs none (RFC 5869
        // section 3.1), and there is nowhere to keep one that isn't next to the key anyway.
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, &[]).extract(key);
        // HKDF-Expand only fails when asking for more than 255 hash blocks; we ask for 1-2.
        let keys = SealPurpose::ALL.map(|purpose| {
            let info = [INFO_PREFIX, purpose.label().as_bytes()];
            let okm = prk
                .expand(&info, &AES_256_GCM)
                .expect("HKDF-SHA256 can produce a 32-byte key");
            LessSafeKey::new(UnboundKey::from(okm))
        });
        let mut fp = [0u8; FINGERPRINT_LEN];
        prk.expand(&[INFO_PREFIX, b"fingerprint"], FingerprintLen)
            .and_then(|okm| okm.fill(&mut fp))
            .expect("HKDF-SHA256 can produce 8 bytes");
        let fingerprint = fp.iter().map(|b| format!("{b:02x}")).collect();
        Self { keys, fingerprint }
    }

    /// Generates a new random root key, returning it with its raw bytes (to be stored).
    ///
    /// # Errors
    /// [`CryptoError::Internal`] if the random source fails.
    pub fn generate() -> Result<(Self, Zeroizing<[u8; ROOT_KEY_LEN]>)> {
        let mut raw = Zeroizing::new([0u8; ROOT_KEY_LEN]);
        aws_lc_rs::rand::fill(raw.as_mut()).map_err(|_| CryptoError::Internal)?;
        Ok((Self::from_bytes(&raw), raw))
    }

    fn key(&self, purpose: SealPurpose) -> &LessSafeKey {
        &self.keys[purpose.index()]
    }
}

impl RootKey for AesRootKey {
    fn seal(&self, purpose: SealPurpose, aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>> {
        // Random 96-bit nonces: safe for well beyond the number of seals one root key will see
        // (NIST SP 800-38D limit of 2^32 per key).
        let mut nonce = [0u8; NONCE_LEN];
        aws_lc_rs::rand::fill(&mut nonce).map_err(|_| CryptoError::Internal)?;
        seal_with_nonce(self.key(purpose), nonce, aad, plaintext)
    }

    fn open(&self, purpose: SealPurpose, aad: &[u8], sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>> {
        open_with_key(self.key(purpose), aad, sealed)
    }

    fn fingerprint(&self) -> String {
        self.fingerprint.clone()
    }
}

impl fmt::Debug for AesRootKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AesRootKey")
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

/// Seals into the v1 format with an explicit nonce. Callers other than tests must pass a
/// fresh random nonce.
pub(crate) fn seal_with_nonce(
    key: &LessSafeKey,
    nonce: [u8; NONCE_LEN],
    aad: &[u8],
    plaintext: &[u8],
) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(HEADER_LEN + plaintext.len() + TAG_LEN);
    out.push(FORMAT_V1);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(plaintext);
    // Encrypted in place, so no plaintext copy outlives this call.
    let tag = key
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad),
            &mut out[HEADER_LEN..],
        )
        .map_err(|_| CryptoError::Internal)?;
    out.extend_from_slice(tag.as_ref());
    Ok(out)
}

fn open_with_key(key: &LessSafeKey, aad: &[u8], sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>> {
    if sealed.len() < HEADER_LEN + TAG_LEN {
        return Err(CryptoError::DecryptionFailed);
    }
    if sealed[0] != FORMAT_V1 {
        return Err(CryptoError::Unsupported(format!(
            "sealed data format version {}",
            sealed[0]
        )));
    }
    let mut nonce = [0u8; NONCE_LEN];
    nonce.copy_from_slice(&sealed[1..HEADER_LEN]);
    let mut buf = Zeroizing::new(sealed[HEADER_LEN..].to_vec());
    let len = key
        .open_in_place(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad),
            &mut buf,
        )
        .map_err(|_| CryptoError::DecryptionFailed)?
        .len();
    buf.truncate(len);
    Ok(buf)
}

/// Loads the root key file, or creates it (32 random bytes, raw, mode 0600) if absent.
///
/// # Errors
/// [`CryptoError::InvalidKey`] if the file has the wrong length, is not a regular file, or is
/// accessible by group or others (the message names the path and the fix);
/// [`CryptoError::Io`] if reading or creating it fails.
pub fn load_or_create_root_key_file(path: &Path) -> Result<AesRootKey> {
    match File::open(path) {
        Ok(file) => load_root_key(path, file),
        Err(err) if err.kind() == io::ErrorKind::NotFound => match create_root_key_file(path) {
            Ok(key) => Ok(key),
            // Another process created it between our open and create: use theirs.
            Err(CreateError::Exists) => {
                let file = File::open(path).map_err(|err| io_error("open", path, &err))?;
                load_root_key(path, file)
            }
            Err(CreateError::Other(err)) => Err(err),
        },
        Err(err) => Err(io_error("open", path, &err)),
    }
}

fn load_root_key(path: &Path, file: File) -> Result<AesRootKey> {
    read_root_key(path, file).map(|raw| AesRootKey::from_bytes(&raw))
}

/// The plain root key's file name in a data directory.
pub const ROOT_KEY_FILE: &str = "root.key";
/// The file name of a root key sealed by an HSM (docs/HSM.md).
pub const SEALED_ROOT_KEY_FILE: &str = "root.key.sealed";

/// Loads the data directory's root key: from `root.key` without a provider; sealed by
/// `provider` in `root.key.sealed` with one. A first start with a provider makes a root key
/// that exists only sealed. A directory that has a plain `root.key` is sealed on its first
/// start with a provider: the sealed file is written and synced, opened again to check it,
/// and only then is the plain file removed (a crash in between leaves both, and the next
/// start finishes the move).
///
/// # Errors
/// [`CryptoError::InvalidKey`] when the directory's root key is sealed and no provider is
/// given, or the sealed file does not open with this provider; what the provider or the
/// file system report otherwise.
pub fn load_or_create_root_key(
    dir: &Path,
    provider: Option<&dyn crate::KeyProvider>,
) -> Result<AesRootKey> {
    let plain = dir.join(ROOT_KEY_FILE);
    let sealed_path = dir.join(SEALED_ROOT_KEY_FILE);
    let Some(provider) = provider else {
        if sealed_path.exists() {
            return Err(CryptoError::InvalidKey(format!(
                "the root key of {} is sealed by an HSM ({}); start kagi with --pkcs11-module, \
                 --pkcs11-token and --pkcs11-pin-file",
                dir.display(),
                sealed_path.display()
            )));
        }
        if !plain.exists() {
            refuse_new_key_for_existing_store(dir)?;
        }
        return load_or_create_root_key_file(&plain);
    };
    let open = |bytes: &[u8]| -> Result<Zeroizing<[u8; ROOT_KEY_LEN]>> {
        let raw = provider.open_root_key(bytes).map_err(|e| match e {
            CryptoError::DecryptionFailed => CryptoError::InvalidKey(format!(
                "{} does not open with {}: it was sealed by another token or is damaged",
                sealed_path.display(),
                provider.describe()
            )),
            other => other,
        })?;
        let mut out = Zeroizing::new([0u8; ROOT_KEY_LEN]);
        if raw.len() != ROOT_KEY_LEN {
            return Err(CryptoError::InvalidKey(format!(
                "{} holds {} bytes, not a {ROOT_KEY_LEN}-byte root key",
                sealed_path.display(),
                raw.len()
            )));
        }
        out.copy_from_slice(&raw);
        Ok(out)
    };
    let raw = match std::fs::read(&sealed_path) {
        Ok(bytes) => open(&bytes)?,
        Err(err) if err.kind() == io::ErrorKind::NotFound => {
            let raw = match File::open(&plain) {
                Ok(file) => read_root_key(&plain, file)?,
                Err(err) if err.kind() == io::ErrorKind::NotFound => {
                    refuse_new_key_for_existing_store(dir)?;
                    AesRootKey::generate()?.1
                }
                Err(err) => return Err(io_error("open", &plain, &err)),
            };
            let sealed = provider.seal_root_key(raw.as_ref())?;
            match publish_new_file(&sealed_path, &sealed)? {
                // Read back from the disk: what opens next start is what is checked now.
                true => {
                    let back = std::fs::read(&sealed_path)
                        .map_err(|err| io_error("read", &sealed_path, &err))?;
                    if *open(&back)? != *raw {
                        return Err(CryptoError::Internal);
                    }
                    raw
                }
                // Another kagi on this directory sealed first: its key is the one.
                false => {
                    let theirs = std::fs::read(&sealed_path)
                        .map_err(|err| io_error("read", &sealed_path, &err))?;
                    open(&theirs)?
                }
            }
        }
        Err(err) => return Err(io_error("read", &sealed_path, &err)),
    };
    // The plain copy goes only once the sealed one is durable (and, on a later start, only
    // if it is the same key).
    match File::open(&plain) {
        Ok(file) => {
            if *read_root_key(&plain, file)? != *raw {
                return Err(CryptoError::InvalidKey(format!(
                    "{} and {} hold different root keys; move the one this data directory \
                     was not sealed under away",
                    plain.display(),
                    sealed_path.display()
                )));
            }
            std::fs::remove_file(&plain).map_err(|err| io_error("remove", &plain, &err))?;
            kagi_fs::sync_parent(&plain)
                .map_err(|err| io_error("sync directory of", &plain, &err))?;
        }
        Err(err) if err.kind() == io::ErrorKind::NotFound => {}
        Err(err) => return Err(io_error("open", &plain, &err)),
    }
    Ok(AesRootKey::from_bytes(&raw))
}

/// A store without its root key is not given a new one: everything in it would be
/// unreadable, and the new key file would hide the real problem (a lost or moved key file).
fn refuse_new_key_for_existing_store(dir: &Path) -> Result<()> {
    if dir.join("kagi.db").exists() {
        return Err(CryptoError::InvalidKey(format!(
            "{} has a store (kagi.db) but no root key ({ROOT_KEY_FILE} or \
             {SEALED_ROOT_KEY_FILE}); put the data directory's root key file back",
            dir.display()
        )));
    }
    Ok(())
}

/// Writes `bytes` to `path` only if no file is there, durably: a uniquely named temporary
/// file, synced, then hard-linked to `path` (which fails if `path` exists, so two starts
/// racing on one directory agree on one file), then the directory synced. `false` when
/// another process's file was there first.
fn publish_new_file(path: &Path, bytes: &[u8]) -> Result<bool> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let suffix: [u8; 8] = crate::random_array()?;
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("root"),
        suffix
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    ));
    let written = (|| -> io::Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()
    })();
    let linked = written.and_then(|()| std::fs::hard_link(&tmp, path));
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => {
            kagi_fs::sync_parent(path).map_err(|err| io_error("sync directory of", path, &err))?;
            Ok(true)
        }
        Err(err) if err.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(err) => Err(io_error("write", path, &err)),
    }
}

fn read_root_key(path: &Path, mut file: File) -> Result<Zeroizing<[u8; ROOT_KEY_LEN]>> {
    let meta = file
        .metadata()
        .map_err(|err| io_error("stat", path, &err))?;
    if !meta.is_file() {
        return Err(CryptoError::InvalidKey(format!(
            "root key file {} is not a regular file",
            path.display()
        )));
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(CryptoError::InvalidKey(format!(
            "root key file {} is accessible by group or others (mode {mode:03o}); \
             restrict it with `chmod 600 {}`",
            path.display(),
            path.display()
        )));
    }
    if meta.len() != ROOT_KEY_LEN as u64 {
        return Err(CryptoError::InvalidKey(format!(
            "root key file {} is {} bytes; it must hold exactly {ROOT_KEY_LEN} raw bytes",
            path.display(),
            meta.len()
        )));
    }
    let mut raw = Zeroizing::new([0u8; ROOT_KEY_LEN]);
    file.read_exact(raw.as_mut())
        .map_err(|err| io_error("read", path, &err))?;
    Ok(raw)
}

enum CreateError {
    Exists,
    Other(CryptoError),
}

fn create_root_key_file(path: &Path) -> std::result::Result<AesRootKey, CreateError> {
    let (key, raw) = AesRootKey::generate().map_err(CreateError::Other)?;
    let mut file = match OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(file) => file,
        Err(err) if err.kind() == io::ErrorKind::AlreadyExists => return Err(CreateError::Exists),
        Err(err) => return Err(CreateError::Other(io_error("create", path, &err))),
    };
    if let Err(err) = file.write_all(raw.as_ref()).and_then(|()| file.sync_all()) {
        // Don't leave a short file behind that would be refused on the next start.
        drop(file);
        let _ = std::fs::remove_file(path);
        return Err(CreateError::Other(io_error("write", path, &err)));
    }
    // fsync the directory so the new entry itself survives a crash.
    kagi_fs::sync_parent(path)
        .map_err(|err| CreateError::Other(io_error("sync directory of", path, &err)))?;
    Ok(key)
}

fn io_error(action: &str, path: &Path, err: &io::Error) -> CryptoError {
    CryptoError::Io(format!("{action} {}: {err}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn test_key() -> AesRootKey {
        let raw: [u8; 32] = std::array::from_fn(|i| i as u8);
        AesRootKey::from_bytes(&raw)
    }

    #[test]
    fn gcm_known_answer_mcgrew_viega_test_case_16() {
        let k = hex::decode("feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308")
            .unwrap();
        let p = hex::decode(
            "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72\
             1c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39",
        )
        .unwrap();
        let a = hex::decode("feedfacedeadbeeffeedfacedeadbeefabaddad2").unwrap();
        let iv: [u8; 12] = hex::decode("cafebabefacedbaddecaf888")
            .unwrap()
            .try_into()
            .unwrap();
        let c = "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa\
                 8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662";
        let t = "76fc6ece0f4e1768cddf8853bb2d551b";

        let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &k).unwrap());
        let sealed = seal_with_nonce(&key, iv, &a, &p).unwrap();
        assert_eq!(sealed[0], FORMAT_V1);
        assert_eq!(&sealed[1..13], &iv);
        assert_eq!(hex::encode(&sealed[13..sealed.len() - 16]), c);
        assert_eq!(hex::encode(&sealed[sealed.len() - 16..]), t);
        assert_eq!(&open_with_key(&key, &a, &sealed).unwrap()[..], &p[..]);
    }

    #[test]
    fn derivation_is_pinned() {
        // Computed independently (Python `cryptography`: HKDF-SHA256 with no salt, then
        // AES-256-GCM), so an accidental change to the derivation or format fails here.
        let key = test_key();
        assert_eq!(key.fingerprint(), "e3f8336fd03de8c9");
        let nonce: [u8; 12] = std::array::from_fn(|i| i as u8);
        let sealed = seal_with_nonce(
            key.key(SealPurpose::PrivateKey),
            nonce,
            b"aad",
            b"kagi seal test",
        )
        .unwrap();
        assert_eq!(
            hex::encode(&sealed),
            "01000102030405060708090a0b32846b85f68e1bcc845e03d498aa349bf3bb527d543fb6a04ae520f0913d"
        );
    }

    #[test]
    fn seal_open_round_trip_every_purpose() {
        let key = test_key();
        for purpose in SealPurpose::ALL {
            for msg in [&b""[..], b"x", &[7u8; 1000]] {
                let sealed = key.seal(purpose, b"ctx", msg).unwrap();
                assert_eq!(sealed.len(), HEADER_LEN + msg.len() + TAG_LEN);
                assert_eq!(&key.open(purpose, b"ctx", &sealed).unwrap()[..], msg);
            }
        }
        // Random nonces: sealing twice differs.
        let a = key.seal(SealPurpose::Secret, b"", b"same").unwrap();
        let b = key.seal(SealPurpose::Secret, b"", b"same").unwrap();
        assert_ne!(a, b);
    }

    #[test]
    fn open_rejects_wrong_purpose_aad_key_and_tampering() {
        let key = test_key();
        let sealed = key
            .seal(SealPurpose::PrivateKey, b"key-1", b"material")
            .unwrap();
        for purpose in SealPurpose::ALL {
            if purpose != SealPurpose::PrivateKey {
                assert!(matches!(
                    key.open(purpose, b"key-1", &sealed),
                    Err(CryptoError::DecryptionFailed)
                ));
            }
        }
        assert!(matches!(
            key.open(SealPurpose::PrivateKey, b"key-2", &sealed),
            Err(CryptoError::DecryptionFailed)
        ));
        let (other, _) = AesRootKey::generate().unwrap();
        assert!(matches!(
            other.open(SealPurpose::PrivateKey, b"key-1", &sealed),
            Err(CryptoError::DecryptionFailed)
        ));
        // Flip a bit in the nonce, the ciphertext and the tag.
        for i in [1, HEADER_LEN, sealed.len() - 1] {
            let mut bad = sealed.clone();
            bad[i] ^= 0x01;
            assert!(matches!(
                key.open(SealPurpose::PrivateKey, b"key-1", &bad),
                Err(CryptoError::DecryptionFailed)
            ));
        }
        assert!(matches!(
            key.open(
                SealPurpose::PrivateKey,
                b"key-1",
                &sealed[..sealed.len() - 1]
            ),
            Err(CryptoError::DecryptionFailed)
        ));
        assert!(matches!(
            key.open(
                SealPurpose::PrivateKey,
                b"key-1",
                &sealed[..HEADER_LEN + TAG_LEN - 1]
            ),
            Err(CryptoError::DecryptionFailed)
        ));
        let mut v2 = sealed.clone();
        v2[0] = 2;
        assert!(matches!(
            key.open(SealPurpose::PrivateKey, b"key-1", &v2),
            Err(CryptoError::Unsupported(_))
        ));
    }

    #[test]
    fn fingerprint_and_debug_do_not_reveal_key() {
        let (key, raw) = AesRootKey::generate().unwrap();
        let fp = key.fingerprint();
        assert_eq!(fp.len(), 16);
        assert!(fp.chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(AesRootKey::from_bytes(&raw).fingerprint(), fp);
        assert_ne!(test_key().fingerprint(), fp);
        let debug = format!("{key:?}");
        assert_eq!(debug, format!("AesRootKey {{ fingerprint: {fp:?}, .. }}"));
        let raw_hex = hex::encode(raw.as_ref());
        assert!(!debug.contains(&raw_hex[..8]));
        assert!(!raw_hex.contains(&fp));
    }

    #[test]
    fn root_key_file_is_created_0600_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("root.key");
        let created = load_or_create_root_key_file(&path).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(meta.len(), 32);
        let sealed = created.seal(SealPurpose::Secret, b"a", b"value").unwrap();

        let loaded = load_or_create_root_key_file(&path).unwrap();
        assert_eq!(loaded.fingerprint(), created.fingerprint());
        assert_eq!(
            &loaded.open(SealPurpose::Secret, b"a", &sealed).unwrap()[..],
            b"value"
        );
        let raw: [u8; 32] = std::fs::read(&path).unwrap().try_into().unwrap();
        assert_eq!(
            AesRootKey::from_bytes(&raw).fingerprint(),
            created.fingerprint()
        );
    }

    #[test]
    fn root_key_file_refused_when_readable_by_others_or_wrong_length() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("root.key");
        load_or_create_root_key_file(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = load_or_create_root_key_file(&path).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, CryptoError::InvalidKey(_)), "{msg}");
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(msg.contains("chmod 600"), "{msg}");

        let short = dir.path().join("short.key");
        std::fs::write(&short, [1u8; 31]).unwrap();
        std::fs::set_permissions(&short, std::fs::Permissions::from_mode(0o600)).unwrap();
        let err = load_or_create_root_key_file(&short).unwrap_err();
        assert!(matches!(err, CryptoError::InvalidKey(_)), "{err}");
        assert!(err.to_string().contains("31 bytes"), "{err}");

        let missing_dir = dir.path().join("no-such-dir").join("root.key");
        let err = load_or_create_root_key_file(&missing_dir).unwrap_err();
        assert!(matches!(err, CryptoError::Io(_)), "{err}");
        assert!(err.to_string().contains("no-such-dir"), "{err}");
    }

    /// A stand-in HSM for the root-key file logic: "seals" by XOR with a fixed pad.
    #[derive(Debug)]
    struct FakeHsm(u8);

    impl crate::KeyProvider for FakeHsm {
        fn describe(&self) -> String {
            "fake HSM".into()
        }
        fn token_label(&self) -> &str {
            "fake"
        }
        fn generate(&self, _: crate::KeySpec) -> Result<crate::ProvidedKey> {
            Err(CryptoError::Unsupported("fake".into()))
        }
        fn import_rsa(&self, _: &crate::RsaPrivateComponents<'_>) -> Result<crate::ProvidedKey> {
            Err(CryptoError::Unsupported("fake".into()))
        }
        fn import_ec(
            &self,
            _: crate::Curve,
            _: &[u8],
            _: &[u8],
            _: &[u8],
        ) -> Result<crate::ProvidedKey> {
            Err(CryptoError::Unsupported("fake".into()))
        }
        fn import_wrapped(&self, _: &crate::TokenKeyRef, _: &[u8]) -> Result<crate::ProvidedKey> {
            Err(CryptoError::Unsupported("fake".into()))
        }
        fn load(&self, _: &crate::TokenKeyRef) -> Result<std::sync::Arc<dyn crate::PrivateKeyOps>> {
            Err(CryptoError::Unsupported("fake".into()))
        }
        fn copy(&self, _: &crate::TokenKeyRef) -> Result<crate::ProvidedKey> {
            Err(CryptoError::Unsupported("fake".into()))
        }
        fn destroy(&self, _: &crate::TokenKeyRef) -> Result<()> {
            Ok(())
        }
        fn seal_root_key(&self, raw: &[u8]) -> Result<Vec<u8>> {
            let mut out = vec![b'F', self.0];
            out.extend(raw.iter().map(|b| b ^ self.0));
            Ok(out)
        }
        fn open_root_key(&self, sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>> {
            match sealed {
                [b'F', pad, rest @ ..] if *pad == self.0 => {
                    Ok(Zeroizing::new(rest.iter().map(|b| b ^ self.0).collect()))
                }
                _ => Err(CryptoError::DecryptionFailed),
            }
        }
    }

    #[test]
    fn a_root_key_made_with_an_hsm_exists_only_sealed() {
        let dir = tempfile::tempdir().unwrap();
        let hsm = FakeHsm(0x5a);
        let first = load_or_create_root_key(dir.path(), Some(&hsm)).unwrap();
        assert!(dir.path().join(SEALED_ROOT_KEY_FILE).exists());
        assert!(!dir.path().join(ROOT_KEY_FILE).exists());
        let again = load_or_create_root_key(dir.path(), Some(&hsm)).unwrap();
        assert_eq!(first.fingerprint(), again.fingerprint());
        // Without the HSM: refused, saying so.
        let err = load_or_create_root_key(dir.path(), None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("sealed by an HSM"), "{err}");
        // Another HSM: refused, naming the file.
        let err = load_or_create_root_key(dir.path(), Some(&FakeHsm(1)))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(SEALED_ROOT_KEY_FILE) && err.contains("another token"),
            "{err}"
        );
        // No temporary files left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }

    #[test]
    fn a_plain_root_key_is_sealed_then_removed_and_a_crash_in_between_heals() {
        let dir = tempfile::tempdir().unwrap();
        let plain = load_or_create_root_key(dir.path(), None).unwrap();
        let raw = std::fs::read(dir.path().join(ROOT_KEY_FILE)).unwrap();
        let hsm = FakeHsm(7);
        let sealed = load_or_create_root_key(dir.path(), Some(&hsm)).unwrap();
        assert_eq!(plain.fingerprint(), sealed.fingerprint());
        assert!(!dir.path().join(ROOT_KEY_FILE).exists());
        // A crash after the sealed file was published, before the plain one went: both
        // there, the same key; the next start removes the plain one.
        std::fs::write(dir.path().join(ROOT_KEY_FILE), &raw).unwrap();
        std::fs::set_permissions(
            dir.path().join(ROOT_KEY_FILE),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        let healed = load_or_create_root_key(dir.path(), Some(&hsm)).unwrap();
        assert_eq!(healed.fingerprint(), plain.fingerprint());
        assert!(!dir.path().join(ROOT_KEY_FILE).exists());
        // Two different keys: refused, nothing removed.
        std::fs::write(dir.path().join(ROOT_KEY_FILE), [9u8; 32]).unwrap();
        std::fs::set_permissions(
            dir.path().join(ROOT_KEY_FILE),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        let err = load_or_create_root_key(dir.path(), Some(&hsm))
            .unwrap_err()
            .to_string();
        assert!(err.contains("different root keys"), "{err}");
        assert!(dir.path().join(ROOT_KEY_FILE).exists());
    }

    #[test]
    fn a_store_without_its_root_key_gets_no_new_one() {
        for hsm in [None, Some(FakeHsm(3))] {
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join("kagi.db"), b"").unwrap();
            let err = load_or_create_root_key(
                dir.path(),
                hsm.as_ref().map(|h| h as &dyn crate::KeyProvider),
            )
            .unwrap_err()
            .to_string();
            assert!(err.contains("no root key"), "{err}");
            let names: Vec<_> = std::fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            assert_eq!(names.len(), 1, "nothing written: {names:?}");
        }
    }

    #[test]
    fn the_first_publisher_of_a_sealed_root_key_wins() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(SEALED_ROOT_KEY_FILE);
        assert!(publish_new_file(&path, b"first").unwrap());
        assert!(!publish_new_file(&path, b"second").unwrap());
        assert_eq!(std::fs::read(&path).unwrap(), b"first");
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
