//! Transparent data encryption for SQLite databases.
//!
//! A SQLite VFS shim (`kagi-tde`, wrapping SQLite's default VFS) seals every page SQLite writes
//! — the main file, the write-ahead log, the rollback journal and temporary files — with
//! AES-256-GCM-SIV under keys derived from the database's 32-byte data key (DEK), with the page
//! number, its place in the file and the 16-byte database id bound into each page. The format and
//! the decisions behind it are in docs/TDE_FORMAT.md.
//!
//! ```no_run
//! use kagi_sqlite_crypt::{DatabaseKey, open};
//! # fn main() -> Result<(), kagi_sqlite_crypt::Error> {
//! let key = DatabaseKey::new([7; 32], *b"database-id-0001");
//! let conn = open("/var/lib/kagi/sql/db1.sqlite", &key)?;
//! conn.execute_batch("CREATE TABLE IF NOT EXISTS t(x); INSERT INTO t VALUES ('secret');")?;
//! # Ok(()) }
//! ```
#![deny(unsafe_code)]

pub mod codec;
mod ffi;
mod key;
mod layers;
mod registry;
mod shm;

/// An SQLite result code.
pub(crate) type Rc = i32;

use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rusqlite::{Connection, OpenFlags};

pub use key::{DATABASE_ID_LEN, DEK_LEN, DatabaseKey, PageCipher};

/// What can go wrong opening, inspecting or copying an encrypted database.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The DEK is not 32 bytes or the database id not 16 bytes.
    #[error("a data key is 32 bytes and a database id 16 bytes")]
    InvalidKey,
    /// The system's random generator failed.
    #[error("the system's random generator failed")]
    Random,
    /// The file is not a kagi encrypted database.
    #[error("{}: not a kagi encrypted database ({reason})", path.display())]
    NotKagiDatabase {
        /// The file.
        path: PathBuf,
        /// What it is instead.
        reason: &'static str,
    },
    /// The data key does not open the database (its page 1 fails authentication).
    #[error("{}: the data key does not open this database", path.display())]
    WrongKey {
        /// The file.
        path: PathBuf,
    },
    /// The file belongs to another database id.
    #[error("{}: the file belongs to database {found}, not {expected}", path.display())]
    DatabaseIdMismatch {
        /// The file.
        path: PathBuf,
        /// The id of the key given (hex).
        expected: String,
        /// The id in the file's header (hex).
        found: String,
    },
    /// The database is open in this process under another key.
    #[error("{}: already open in this process under another data key", path.display())]
    KeyMismatch {
        /// The file.
        path: PathBuf,
    },
    /// Another process has the database open (one process at a time: see docs/TDE_FORMAT.md).
    #[error("{}: the database is open in another process", path.display())]
    InUse {
        /// The file.
        path: PathBuf,
    },
    /// A file system error.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// SQLite failed; see [`is_page_authentication_failure`] and [`is_key_revoked`].
    #[error("SQLite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The VFS could not be registered with SQLite.
    #[error("cannot register the encrypting VFS with SQLite (code {0})")]
    Register(i32),
    /// The database is in a journal mode other than WAL after `open` asked for WAL.
    #[error("{}: the database stays in journal mode {mode}", path.display())]
    JournalMode {
        /// The file.
        path: PathBuf,
        /// The mode SQLite reports.
        mode: String,
    },
    /// An online backup could not finish because the source stayed busy or locked.
    #[error("the backup's source database is busy")]
    Busy,
}

/// Lower-case hex of bytes (ids in errors and logs).
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses the 32-hex-digit handle of a URI.
pub(crate) fn parse_handle(s: &[u8]) -> Option<[u8; 16]> {
    if s.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (o, pair) in out.iter_mut().zip(s.chunks_exact(2)) {
        let text = std::str::from_utf8(pair).ok()?;
        *o = u8::from_str_radix(text, 16).ok()?;
    }
    Some(out)
}

/// The `file:` URI SQLite opens a registered database with.
fn uri(path: &Path, handle: &[u8; 16]) -> String {
    let mut out = String::from("file:");
    for &b in path.as_os_str().as_bytes() {
        if b.is_ascii_alphanumeric() || b"/._~-".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out.push('?');
    out.push_str(&ffi::HANDLE_PARAM.to_string_lossy());
    out.push('=');
    out.push_str(&hex(handle));
    out
}

/// Opens (creating it if missing) the encrypted database at `path` with its key: WAL journal
/// mode, `synchronous=FULL`, foreign keys on, and the reserved bytes per page the codec needs.
///
/// The key stays in memory while any connection to the database is open in this process; a
/// second `open` of the same path must bring the same key. Only one process may have a database
/// open at a time.
///
/// # Errors
/// [`Error::WrongKey`], [`Error::DatabaseIdMismatch`], [`Error::NotKagiDatabase`],
/// [`Error::KeyMismatch`], [`Error::InUse`], [`Error::Io`], [`Error::Sqlite`].
pub fn open(path: impl AsRef<Path>, key: &DatabaseKey) -> Result<Connection, Error> {
    open_with(path.as_ref(), key, Access::Create, None)
}

/// Opens an encrypted database that exists, read-write, as [`open`] does, but never creates
/// one: a missing or empty file is an error ([`Error::Io`], [`Error::NotKagiDatabase`]), so a
/// database whose file was lost does not come back empty.
///
/// # Errors
/// As [`open`].
pub fn open_existing(path: impl AsRef<Path>, key: &DatabaseKey) -> Result<Connection, Error> {
    open_with(path.as_ref(), key, Access::Existing, None)
}

/// How a database file is opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Access {
    /// Read-write, created if missing or empty.
    Create,
    /// Read-write, only if it is a database already.
    Existing,
    /// Read-only.
    ReadOnly,
}

/// Opens an existing encrypted database read-only (SQLite's `SQLITE_OPEN_READONLY`), with
/// foreign keys on.
///
/// # Errors
/// As [`open`]; an empty or missing file is an error.
pub fn open_read_only(path: impl AsRef<Path>, key: &DatabaseKey) -> Result<Connection, Error> {
    open_with(path.as_ref(), key, Access::ReadOnly, None)
}

fn open_with(
    path: &Path,
    key: &DatabaseKey,
    how: Access,
    page_size: Option<i64>,
) -> Result<Connection, Error> {
    ffi::register().map_err(Error::Register)?;
    let read_only = how == Access::ReadOnly;
    let canonical = registry::canonical(path)?;
    let entry = registry::acquire(&canonical, key, !read_only, how == Access::Create)?;
    let access = match how {
        Access::ReadOnly => OpenFlags::SQLITE_OPEN_READ_ONLY,
        Access::Existing => OpenFlags::SQLITE_OPEN_READ_WRITE,
        Access::Create => OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE,
    };
    let flags = access | OpenFlags::SQLITE_OPEN_URI | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn =
        Connection::open_with_flags_and_vfs(uri(&canonical, &entry.handle), flags, ffi::VFS_NAME)?;
    if !read_only {
        if let Some(size) = page_size {
            conn.pragma_update(None, "page_size", size)?;
        }
        let reserve = i32::try_from(codec::RESERVE).unwrap_or(i32::MAX);
        ffi::set_reserve_bytes(&conn, reserve)
            .map_err(|rc| rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(rc), None))?;
        let mode: String =
            conn.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(Error::JournalMode {
                path: canonical,
                mode,
            });
        }
        conn.pragma_update(None, "synchronous", "FULL")?;
    }
    conn.pragma_update(None, "foreign_keys", true)?;
    // The connection's open files now hold the entry (and with it the key).
    drop(entry);
    Ok(conn)
}

/// What the clear header of a kagi database file says, read without the key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DatabaseFileInfo {
    /// The database id.
    pub database_id: [u8; DATABASE_ID_LEN],
    /// The format version (1).
    pub format_version: u8,
}

/// Tells whether `path` is a kagi encrypted database and reads its database id, without the key.
///
/// # Errors
/// [`Error::NotKagiDatabase`] (with the reason: empty, plain SQLite, unknown), [`Error::Io`].
pub fn inspect(path: impl AsRef<Path>) -> Result<DatabaseFileInfo, Error> {
    let canonical = registry::canonical(path.as_ref())?;
    registry::inspect(&canonical)
}

/// Drops the key of the database at `path` if it is open in this process: from then on its
/// connections' reads and writes fail ([`is_key_revoked`]) until [`open`] brings the key back
/// (for a database that became inaccessible). Plaintext pages already in SQLite's page cache go
/// when the connections close. Returns whether a key was held.
///
/// # Errors
/// [`Error::Io`] when the path cannot be resolved.
pub fn revoke_key(path: impl AsRef<Path>) -> Result<bool, Error> {
    let canonical = registry::canonical(path.as_ref())?;
    Ok(registry::revoke(&canonical))
}

/// Makes the connections to the database at `path` read its write-ahead log from the file again
/// at their next transaction (SQLite's own recovery rebuilds the wal-index, which this process
/// keeps in memory). For a replica whose log is written from outside SQLite: frames copied as
/// they are from another copy of the same database (same DEK and database id, same offsets).
///
/// The caller holds the database's write lock (`BEGIN IMMEDIATE` on one of its connections)
/// while it writes the log and calls this, so that no writer and no recovery runs meanwhile, and
/// only appends after the last committed frame, or writes a new log once no reader uses the old
/// one (after `PRAGMA wal_checkpoint(TRUNCATE)`): readers keep their snapshots. Returns whether
/// the database was open in this process (when it is not, the next open reads the log anyway).
///
/// # Errors
/// [`Error::Io`] when the path cannot be resolved.
pub fn reread_wal(path: impl AsRef<Path>) -> Result<bool, Error> {
    let canonical = registry::canonical(path.as_ref())?;
    Ok(registry::forget_wal_index(&canonical))
}

/// Whether a connection to the database at `path` is open in this process.
///
/// # Errors
/// [`Error::Io`] when the path cannot be resolved.
pub fn is_open(path: impl AsRef<Path>) -> Result<bool, Error> {
    let canonical = registry::canonical(path.as_ref())?;
    Ok(registry::find_by_path(&canonical).is_some())
}

/// Copies a consistent snapshot of the database `source` is connected to into a new encrypted
/// database at `dest` under `dest_key` (SQLite's online backup API, in one step: the copy holds a
/// read transaction on the source while writers go on). Every page is opened with the source's
/// key and sealed again with the destination's; the destination is left as a single file.
///
/// # Errors
/// [`Error::Io`] when `dest` exists, [`Error::Busy`], and the errors of [`open`].
pub fn backup(
    source: &Connection,
    dest: impl AsRef<Path>,
    dest_key: &DatabaseKey,
) -> Result<(), Error> {
    let dest = dest.as_ref();
    if dest.exists() {
        return Err(Error::Io {
            path: dest.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::AlreadyExists, "backup target exists"),
        });
    }
    let page_size: i64 = source.pragma_query_value(None, "page_size", |row| row.get(0))?;
    let mut target = open_with(dest, dest_key, Access::Create, Some(page_size))?;
    {
        let copy = rusqlite::backup::Backup::new(source, &mut target)?;
        match copy.step(-1)? {
            rusqlite::backup::StepResult::Done => {}
            _ => return Err(Error::Busy),
        }
    }
    target.close().map_err(|(_, e)| Error::Sqlite(e))
}

/// Whether a SQLite error is a page that failed authentication (wrong key, moved, from another
/// database, or damaged): SQLite's `SQLITE_IOERR_DATA`.
#[must_use]
pub fn is_page_authentication_failure(err: &rusqlite::Error) -> bool {
    matches!(err, rusqlite::Error::SqliteFailure(e, _) if e.extended_code == rusqlite::ffi::SQLITE_IOERR_DATA)
}

/// Whether a SQLite error comes from a database whose key was revoked ([`revoke_key`]):
/// `SQLITE_IOERR_AUTH`.
#[must_use]
pub fn is_key_revoked(err: &rusqlite::Error) -> bool {
    matches!(err, rusqlite::Error::SqliteFailure(e, _) if e.extended_code == rusqlite::ffi::SQLITE_IOERR_AUTH)
}
