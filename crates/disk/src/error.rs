//! The store's one error type.

/// Every error the disk store returns.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// The byte range is not inside the volume.
    #[error("range {offset}+{len} is outside the volume of {size} bytes")]
    OutOfRange {
        /// First byte of the request.
        offset: u64,
        /// Length of the request.
        len: u64,
        /// The volume's size in bytes.
        size: u64,
    },
    /// A write, trim or zeroing on a snapshot (read-only volume).
    #[error("the volume is read-only")]
    ReadOnly,
    /// The family's keys were dropped by [`crate::Family::lock`]: the service maps this to EIO
    /// "key revoked".
    #[error("the disk family is locked: its key was revoked")]
    Locked,
    /// A block or record failed authentication or points at missing data: the file was
    /// damaged or tampered with (moved, copied from another address or family, or edited).
    #[error("corrupt or forged data in segment {segment} at offset {offset}")]
    Corrupt {
        /// Segment number.
        segment: u64,
        /// Byte offset in the segment.
        offset: u64,
    },
    /// A family header or checkpoint file is damaged.
    #[error("corrupt metadata in {file}: {reason}")]
    CorruptMeta {
        /// The file's name inside the family directory.
        file: &'static str,
        /// What was wrong.
        reason: String,
    },
    /// The data key (or the inner-layer key) does not open the family's key check.
    #[error("wrong key for this disk family")]
    WrongKey,
    /// The inner-layer key is missing for a family created with the inner layer, or given for
    /// one created without.
    #[error("inner-layer key mismatch: {0}")]
    InnerKey(&'static str),
    /// The file system is full.
    #[error("no space left on the device")]
    NoSpace,
    /// No family or volume of that name.
    #[error("{0} not found")]
    NotFound(String),
    /// A family or volume of that name exists already.
    #[error("{0} already exists")]
    AlreadyExists(String),
    /// A family or volume name outside `[A-Za-z0-9._-]{1,128}` (or starting with a dot).
    #[error("invalid name {0:?}: use 1 to 128 of A-Z a-z 0-9 . _ -, not starting with a dot")]
    InvalidName(String),
    /// A size that is zero, not a multiple of the block size, or smaller than the current.
    #[error("invalid size {size}: {reason}")]
    InvalidSize {
        /// The size asked for.
        size: u64,
        /// Why it was refused.
        reason: &'static str,
    },
    /// Another process (or another open in this one that is being dropped) holds the family.
    #[error("the disk family is open elsewhere")]
    Busy,

    /// Another process took the family over from shared storage after this copy was made
    /// (`DiskStore::fetch_family`): this copy is stale and is never opened again.
    #[error("the disk family was taken over by another process; this copy is stale")]
    TakenOver,
    /// A write or sync failed earlier; nothing more is written until the family is reopened
    /// (after a failed fsync the kernel may have dropped dirty pages, so carrying on could
    /// acknowledge writes that are lost).
    #[error("the disk family stopped after a failed write or sync; reopen it")]
    Failed,
    /// An operating-system error other than a full disk.
    #[error("I/O error: {0}")]
    Io(std::io::Error),
}

impl From<std::io::Error> for DiskError {
    fn from(e: std::io::Error) -> Self {
        if e.raw_os_error() == Some(rustix::io::Errno::NOSPC.raw_os_error()) {
            DiskError::NoSpace
        } else {
            DiskError::Io(e)
        }
    }
}

/// The store's result type.
pub type Result<T, E = DiskError> = std::result::Result<T, E>;
