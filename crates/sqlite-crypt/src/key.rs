//! A database's data key and the keys derived from it.

use std::fmt;

use aws_lc_rs::aead::{AES_256_GCM_SIV, LessSafeKey, UnboundKey};
use aws_lc_rs::hkdf::{HKDF_SHA256, Salt};
use aws_lc_rs::hmac;
use zeroize::Zeroizing;

use crate::Error;

/// Length of a data key (DEK), in bytes.
pub const DEK_LEN: usize = 32;
/// Length of a database id, in bytes.
pub const DATABASE_ID_LEN: usize = 16;

/// HKDF salt: names the format, so that keys derived for another purpose from the same DEK differ.
const HKDF_SALT: &[u8] = b"kagi-sqlite-crypt v1";

/// A database's 32-byte data key (DEK) and its 16-byte database id.
///
/// The DEK is wiped from memory when the value is dropped and never shown by `Debug`; the id is
/// not secret (it is written in the clear in the database's header).
pub struct DatabaseKey {
    dek: Zeroizing<[u8; DEK_LEN]>,
    database_id: [u8; DATABASE_ID_LEN],
}

impl DatabaseKey {
    /// A key from the DEK and the database id. The caller's copy of `dek` is theirs to wipe.
    #[must_use]
    pub fn new(dek: [u8; DEK_LEN], database_id: [u8; DATABASE_ID_LEN]) -> Self {
        Self {
            dek: Zeroizing::new(dek),
            database_id,
        }
    }

    /// A key from slices, e.g. a DEK just unwrapped by the key vault.
    ///
    /// # Errors
    /// [`Error::InvalidKey`] when `dek` is not 32 bytes or `database_id` not 16 bytes.
    pub fn from_slices(dek: &[u8], database_id: &[u8]) -> Result<Self, Error> {
        let mut key = Zeroizing::new([0u8; DEK_LEN]);
        if dek.len() != DEK_LEN || database_id.len() != DATABASE_ID_LEN {
            return Err(Error::InvalidKey);
        }
        key.copy_from_slice(dek);
        let mut id = [0u8; DATABASE_ID_LEN];
        id.copy_from_slice(database_id);
        Ok(Self {
            dek: key,
            database_id: id,
        })
    }

    /// A new random DEK for the database `database_id`.
    ///
    /// # Errors
    /// [`Error::Random`] when the system's random generator fails.
    pub fn generate(database_id: [u8; DATABASE_ID_LEN]) -> Result<Self, Error> {
        let mut dek = Zeroizing::new([0u8; DEK_LEN]);
        aws_lc_rs::rand::fill(dek.as_mut_slice()).map_err(|_| Error::Random)?;
        Ok(Self { dek, database_id })
    }

    /// The database id.
    #[must_use]
    pub fn database_id(&self) -> [u8; DATABASE_ID_LEN] {
        self.database_id
    }

    /// The DEK's bytes, e.g. to wrap them under the TDE protector.
    #[must_use]
    pub fn dek(&self) -> &[u8; DEK_LEN] {
        &self.dek
    }

    /// Derives the working keys (see docs/TDE_FORMAT.md, "Keys").
    pub(crate) fn derive(&self) -> Result<DerivedKeys, Error> {
        let prk = Salt::new(HKDF_SHA256, HKDF_SALT).extract(self.dek.as_slice());
        let expand = |label: &[u8]| -> Result<Zeroizing<[u8; 32]>, Error> {
            let mut out = Zeroizing::new([0u8; 32]);
            let info = [label, self.database_id.as_slice()];
            prk.expand(&info, HKDF_SHA256)
                .and_then(|okm| okm.fill(out.as_mut_slice()))
                .map_err(|_| Error::InvalidKey)?;
            Ok(out)
        };
        let page = expand(b"page key")?;
        let mask = expand(b"checksum mask key")?;
        let check = expand(b"key check value")?;
        let aead =
            UnboundKey::new(&AES_256_GCM_SIV, page.as_slice()).map_err(|_| Error::InvalidKey)?;
        Ok(DerivedKeys {
            cipher: PageCipher {
                aead: LessSafeKey::new(aead),
                mask: hmac::Key::new(hmac::HMAC_SHA256, mask.as_slice()),
                database_id: self.database_id,
            },
            check: *check,
        })
    }
}

impl fmt::Debug for DatabaseKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DatabaseKey")
            .field("database_id", &crate::hex(&self.database_id))
            .finish_non_exhaustive()
    }
}

/// The keys a database's files are encrypted with, derived from its DEK.
pub(crate) struct DerivedKeys {
    /// Seals and opens pages.
    pub cipher: PageCipher,
    /// A one-way fingerprint of the DEK and id: tells whether a second `open` brings the same key
    /// without keeping the DEK itself.
    pub check: [u8; 32],
}

/// The AEAD key and the checksum-mask key of one database (or of one temporary file).
pub struct PageCipher {
    pub(crate) aead: LessSafeKey,
    pub(crate) mask: hmac::Key,
    pub(crate) database_id: [u8; DATABASE_ID_LEN],
}

impl PageCipher {
    /// A cipher for a temporary file: fresh random keys that live as long as the file, and an
    /// all-zero database id.
    ///
    /// # Errors
    /// [`Error::Random`] when the system's random generator fails.
    pub fn ephemeral() -> Result<Self, Error> {
        let mut bytes = Zeroizing::new([0u8; 64]);
        aws_lc_rs::rand::fill(bytes.as_mut_slice()).map_err(|_| Error::Random)?;
        let (page, mask) = bytes.split_at(32);
        let aead = UnboundKey::new(&AES_256_GCM_SIV, page).map_err(|_| Error::InvalidKey)?;
        Ok(Self {
            aead: LessSafeKey::new(aead),
            mask: hmac::Key::new(hmac::HMAC_SHA256, mask),
            database_id: [0; DATABASE_ID_LEN],
        })
    }

    /// The cipher of a database key (for tests and tools that use the codec directly).
    ///
    /// # Errors
    /// [`Error::InvalidKey`] when key derivation fails.
    pub fn for_database(key: &DatabaseKey) -> Result<Self, Error> {
        Ok(key.derive()?.cipher)
    }

    /// The database id bound into every page.
    #[must_use]
    pub fn database_id(&self) -> [u8; DATABASE_ID_LEN] {
        self.database_id
    }
}

impl fmt::Debug for PageCipher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PageCipher")
            .field("database_id", &crate::hex(&self.database_id))
            .finish_non_exhaustive()
    }
}
