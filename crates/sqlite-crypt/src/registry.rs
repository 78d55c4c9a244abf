//! The databases this process has open: their keys, wal-index and process lock.
//!
//! `open` registers a database under its canonical path and a random 128-bit handle, and hands
//! SQLite the handle as a URI parameter. The VFS finds the key of a main file, WAL or journal by
//! that handle (a file opened without it, e.g. by `ATTACH` from SQL, is refused) and checks that
//! the handle belongs to that path. The registry holds entries weakly: the open files of a
//! database hold it, so its keys are dropped when its last connection closes.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard, RwLock, Weak};

use aws_lc_rs::constant_time::verify_slices_are_equal;
use rusqlite::ffi;

use crate::Rc;
use crate::codec::{self, HEADER_LEN, HeaderKind};
use crate::key::{DATABASE_ID_LEN, DatabaseKey, PageCipher};
use crate::shm::Shm;
use crate::{Error, hex};

/// One open database.
pub(crate) struct DbEntry {
    /// Canonical path of the main file.
    pub path: PathBuf,
    /// The secret handle SQLite is given in the URI.
    pub handle: [u8; 16],
    /// The database id.
    pub database_id: [u8; DATABASE_ID_LEN],
    /// Fingerprint of the DEK (see `DerivedKeys::check`).
    check: [u8; 32],
    /// `None` once revoked.
    keys: RwLock<Option<PageCipher>>,
    /// The wal-index.
    pub shm: Mutex<Shm>,
    /// Holds the exclusive `flock` on the main file while the database is open here.
    _lock: File,
}

impl DbEntry {
    /// Runs `f` with the database's cipher; `SQLITE_IOERR_AUTH` when the key was revoked.
    pub(crate) fn with_cipher<T>(
        &self,
        f: impl FnOnce(&PageCipher) -> Result<T, Rc>,
    ) -> Result<T, Rc> {
        let guard = self.keys.read().map_err(|_| ffi::SQLITE_IOERR_AUTH)?;
        match guard.as_ref() {
            Some(c) => f(c),
            None => Err(ffi::SQLITE_IOERR_AUTH),
        }
    }

    /// Locks the wal-index (a poisoned lock is taken over: the index is plain memory).
    pub(crate) fn shm(&self) -> MutexGuard<'_, Shm> {
        self.shm
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[derive(Default)]
struct Registry {
    by_path: HashMap<PathBuf, Weak<DbEntry>>,
    by_handle: HashMap<[u8; 16], Weak<DbEntry>>,
}

static REGISTRY: LazyLock<Mutex<Registry>> = LazyLock::new(Mutex::default);

fn registry() -> MutexGuard<'static, Registry> {
    REGISTRY
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The canonical path of a database file that may not exist yet.
pub(crate) fn canonical(path: &Path) -> Result<PathBuf, Error> {
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    if path.exists() {
        return std::fs::canonicalize(path).map_err(io);
    }
    let name = path.file_name().ok_or_else(|| {
        io(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a file name",
        ))
    })?;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    Ok(std::fs::canonicalize(parent).map_err(io)?.join(name))
}

/// The live entry of `path`, if the database is open in this process.
pub(crate) fn find_by_path(path: &Path) -> Option<Arc<DbEntry>> {
    registry().by_path.get(path).and_then(Weak::upgrade)
}

/// The live entry of a handle.
pub(crate) fn find_by_handle(handle: &[u8; 16]) -> Option<Arc<DbEntry>> {
    registry().by_handle.get(handle).and_then(Weak::upgrade)
}

/// The entry of `path` (canonical) for `key`: the live one when the database is already open in
/// this process (the key must be the same; a revoked key is put back), else a new one after
/// taking the process lock and checking the file's header and page 1 against the key. Only with
/// `create` (and `writable`) may the file be missing or empty (a new database).
pub(crate) fn acquire(
    path: &Path,
    key: &DatabaseKey,
    writable: bool,
    create: bool,
) -> Result<Arc<DbEntry>, Error> {
    let derived = key.derive()?;
    let mut reg = registry();
    reg.by_path.retain(|_, w| w.strong_count() > 0);
    reg.by_handle.retain(|_, w| w.strong_count() > 0);
    if let Some(entry) = reg.by_path.get(path).and_then(Weak::upgrade) {
        let same = entry.database_id == key.database_id()
            && verify_slices_are_equal(&entry.check, &derived.check).is_ok();
        if !same {
            return Err(Error::KeyMismatch {
                path: path.to_path_buf(),
            });
        }
        let mut keys = entry
            .keys
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if keys.is_none() {
            *keys = Some(derived.cipher);
        }
        drop(keys);
        return Ok(entry);
    }
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = OpenOptions::new()
        .read(true)
        .write(writable)
        .create(writable && create)
        .mode(0o600)
        .open(path)
        .map_err(io)?;
    file.try_lock().map_err(|e| match e {
        std::fs::TryLockError::WouldBlock => Error::InUse {
            path: path.to_path_buf(),
        },
        std::fs::TryLockError::Error(source) => io(source),
    })?;
    check_file(&file, path, &derived.cipher, writable && create)?;
    let mut handle = [0u8; 16];
    aws_lc_rs::rand::fill(&mut handle).map_err(|_| Error::Random)?;
    let entry = Arc::new(DbEntry {
        path: path.to_path_buf(),
        handle,
        database_id: key.database_id(),
        check: derived.check,
        keys: RwLock::new(Some(derived.cipher)),
        shm: Mutex::new(Shm::default()),
        _lock: file,
    });
    reg.by_path
        .insert(path.to_path_buf(), Arc::downgrade(&entry));
    reg.by_handle.insert(handle, Arc::downgrade(&entry));
    Ok(entry)
}

/// Checks an existing file's header and page 1 against the key (an empty file is a new
/// database, when one may be created).
fn check_file(file: &File, path: &Path, cipher: &PageCipher, create: bool) -> Result<(), Error> {
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut head = [0u8; HEADER_LEN];
    let n = read_up_to(file, &mut head, 0).map_err(io)?;
    let not_kagi = |reason| Error::NotKagiDatabase {
        path: path.to_path_buf(),
        reason,
    };
    match codec::classify_header(&head[..n]) {
        HeaderKind::Empty if n == 0 && create => Ok(()),
        HeaderKind::Empty => Err(not_kagi("empty file")),
        HeaderKind::PlainSqlite => Err(not_kagi("a plain, unencrypted SQLite database")),
        HeaderKind::Unknown => Err(not_kagi("unknown format")),
        HeaderKind::Kagi(h) => {
            if h.database_id != cipher.database_id() {
                return Err(Error::DatabaseIdMismatch {
                    path: path.to_path_buf(),
                    expected: hex(&cipher.database_id()),
                    found: hex(&h.database_id),
                });
            }
            let mut page = vec![0u8; h.page_size];
            if read_up_to(file, &mut page, 0).map_err(io)? != h.page_size {
                return Err(not_kagi("page 1 is cut short"));
            }
            codec::open_main_page(cipher, 1, &mut page).map_err(|_| Error::WrongKey {
                path: path.to_path_buf(),
            })
        }
    }
}

/// Reads as much of `buf` as the file has at `off`.
pub(crate) fn read_up_to(file: &File, buf: &mut [u8], off: u64) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], off + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Drops the key of the open database at `path` (canonical): its connections' reads and writes
/// fail from now on, until `open` brings the key back. Returns whether a key was held.
pub(crate) fn revoke(path: &Path) -> bool {
    let Some(entry) = find_by_path(path) else {
        return false;
    };
    let mut keys = entry
        .keys
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    keys.take().is_some()
}

/// Clears the wal-index header of `path` (canonical) if the database is open here; see
/// [`crate::reread_wal`].
pub(crate) fn forget_wal_index(path: &Path) -> bool {
    find_by_path(path).is_some_and(|entry| entry.shm().forget_header())
}

/// Reads the clear header of `path` (canonical). Runs under the registry's lock, and answers
/// from the registry for a database open here: opening and closing another descriptor of a file
/// SQLite holds would drop SQLite's POSIX locks on it.
pub(crate) fn inspect(path: &Path) -> Result<crate::DatabaseFileInfo, Error> {
    let reg = registry();
    if let Some(entry) = reg.by_path.get(path).and_then(Weak::upgrade) {
        return Ok(crate::DatabaseFileInfo {
            database_id: entry.database_id,
            format_version: codec::FORMAT_VERSION,
        });
    }
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(io)?;
    let mut head = [0u8; HEADER_LEN];
    let n = read_up_to(&file, &mut head, 0).map_err(io)?;
    drop(file);
    drop(reg);
    let not_kagi = |reason| Error::NotKagiDatabase {
        path: path.to_path_buf(),
        reason,
    };
    match codec::classify_header(&head[..n]) {
        HeaderKind::Kagi(h) => Ok(crate::DatabaseFileInfo {
            database_id: h.database_id,
            format_version: h.format_version,
        }),
        HeaderKind::Empty => Err(not_kagi("empty file")),
        HeaderKind::PlainSqlite => Err(not_kagi("a plain, unencrypted SQLite database")),
        HeaderKind::Unknown => Err(not_kagi("unknown format")),
    }
}
