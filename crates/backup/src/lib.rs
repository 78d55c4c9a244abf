//! kagi's backup engine.
//!
//! A repository holds encrypted, deduplicated recovery points of folders:
//!
//! - files are cut into content-defined chunks (FastCDC), so an insertion moves few chunk
//!   boundaries and an incremental backup stores only the chunks that changed;
//! - each chunk's id is a keyed hash (HMAC-SHA256 under a key derived from the data key), so
//!   whoever holds the storage cannot test a guess of the content;
//! - chunks are zstd-compressed when that helps, sealed with AES-256-GCM under the data key,
//!   and packed into pack files of about 16 MiB;
//! - directory trees (names, sizes, modes, owners, times, symlinks) are blobs too, encrypted
//!   alike; a restore never writes outside its target (see [`RestoreOptions`]);
//! - a recovery point (snapshot) is written last, after its packs and index: a crash leaves at
//!   most unreferenced packs, never a half-visible recovery point;
//! - unreadable files and folders are skipped and reported ([`BackupStats::skipped_entries`],
//!   [`BackupStats::skipped_count`]) rather than failing the backup; an unreadable source
//!   folder is an error;
//! - [`Repository::forget`] removes a recovery point's snapshot object, and
//!   [`Repository::prune`] then deletes packs nothing uses, repacks partly used ones beyond a
//!   tolerated share of unused space, and deletes packs left by killed backups after a grace
//!   period, in an order that keeps the repository consistent if it is killed at any point;
//! - [`Repository::check_report`] finds damage (problems) and unreferenced packs (warnings).
//!
//! The data key is never stored in the clear: the caller wraps it with a key encryption key
//! (the vault's platform key, or the customer's key through the key vault) and keeps the
//! wrapped form in `keys/`. Changing the key encryption key re-wraps 32 bytes. The on-disk
//! format is described in `docs/BACKUP_FORMAT.md`.

#![forbid(unsafe_code)]

mod backend;
mod backup;
mod local;
mod pack;
mod prune;
mod repo;
mod restore;
mod tree;

pub use backend::{BlobBackend, ObjectInfo, ObjectStoreBackend};
pub use backup::{BackupOptions, BackupStats, MAX_SKIPPED_LISTED, Progress, SkippedEntry};
pub use local::{Fsync, LocalWrites, Syncer};
pub use prune::{PruneOptions, PruneStats};
pub use repo::{CheckReport, KeyEntry, Repository, SnapshotInfo};
pub use restore::{DEFAULT_MAX_RESTORE_ENTRIES, RestoreOptions, RestoreStats};

/// Engine failures. Messages name files and objects, never data or keys.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// The storage backend failed.
    #[error("storage: {0}")]
    Storage(String),
    /// A local file operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// Stored data failed authentication or does not parse: corruption or tampering.
    #[error("repository damaged: {0}")]
    Corrupt(String),
    /// The request is invalid (unknown snapshot, target not empty, …).
    #[error("{0}")]
    Invalid(String),
    /// Cryptography failed.
    #[error("crypto: {0}")]
    Crypto(#[from] kagi_crypto::CryptoError),
}

/// Result of engine calls.
pub type Result<T> = std::result::Result<T, BackupError>;

pub(crate) fn io_err(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> BackupError + '_ {
    move |source| BackupError::Io {
        path: path.display().to_string(),
        source,
    }
}
