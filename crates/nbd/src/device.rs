//! The seam a storage service implements: a block device the server exports.

use async_trait::async_trait;
use thiserror::Error;

use crate::proto;

/// An NBD error number a device (or the server) answers a request with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Errno {
    /// `NBD_EPERM`: not permitted (a write to a read-only export).
    Perm,
    /// `NBD_EIO`: input/output error.
    Io,
    /// `NBD_ENOMEM`: out of memory.
    NoMem,
    /// `NBD_EINVAL`: invalid request.
    Inval,
    /// `NBD_ENOSPC`: no space left.
    NoSpc,
    /// `NBD_EOVERFLOW`: request too large.
    Overflow,
    /// `NBD_ENOTSUP`: not supported (a fast zero that would not be fast).
    NotSup,
    /// `NBD_ESHUTDOWN`: the server or export is going away; the client should disconnect.
    Shutdown,
}

impl Errno {
    /// The value on the wire.
    pub fn code(self) -> u32 {
        match self {
            Errno::Perm => proto::NBD_EPERM,
            Errno::Io => proto::NBD_EIO,
            Errno::NoMem => proto::NBD_ENOMEM,
            Errno::Inval => proto::NBD_EINVAL,
            Errno::NoSpc => proto::NBD_ENOSPC,
            Errno::Overflow => proto::NBD_EOVERFLOW,
            Errno::NotSup => proto::NBD_ENOTSUP,
            Errno::Shutdown => proto::NBD_ESHUTDOWN,
        }
    }
}

/// A failed device operation: the NBD error number and an optional message for the user,
/// sent in the structured `ERROR` chunk when the client negotiated structured replies (simple
/// replies carry the number only). The message must not contain secrets.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{errno:?}{}", message.as_deref().map(|m| format!(": {m}")).unwrap_or_default())]
pub struct DeviceError {
    /// The error number.
    pub errno: Errno,
    /// A message for a human (at most 4096 bytes are sent).
    pub message: Option<String>,
}

impl DeviceError {
    /// An error without a message.
    pub fn new(errno: Errno) -> Self {
        Self {
            errno,
            message: None,
        }
    }

    /// An error with a message for the user.
    pub fn with_message(errno: Errno, message: impl Into<String>) -> Self {
        Self {
            errno,
            message: Some(message.into()),
        }
    }

    /// `EIO` with a message.
    pub fn io(message: impl Into<String>) -> Self {
        Self::with_message(Errno::Io, message)
    }
}

/// Block size constraints a device advertises (`NBD_INFO_BLOCK_SIZE`). The server rejects
/// requests not aligned to `minimum` with `EINVAL`, and payloads above `maximum` (itself capped
/// by the server's limit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSizes {
    /// Smallest addressable unit: a power of two, 1 to 65536.
    pub minimum: u32,
    /// Size for efficient I/O: a power of two, at least 512 and at least `minimum`.
    pub preferred: u32,
    /// Largest payload of one request, at least `preferred`.
    pub maximum: u32,
}

impl Default for BlockSizes {
    /// 1 / 4096 / 32 MiB, the protocol's defaults (and qemu-nbd's).
    fn default() -> Self {
        Self {
            minimum: 1,
            preferred: 4096,
            maximum: 32 << 20,
        }
    }
}

/// Flags of a write-zeroes request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ZeroFlags {
    /// Persist before answering (`NBD_CMD_FLAG_FUA`).
    pub fua: bool,
    /// The range must stay allocated (`NBD_CMD_FLAG_NO_HOLE`); without it the device may punch
    /// a hole.
    pub no_hole: bool,
    /// Fail at once with [`Errno::NotSup`] unless zeroing is faster than writing zeroes
    /// (`NBD_CMD_FLAG_FAST_ZERO`); such a failure must leave the range unchanged.
    pub fast: bool,
}

/// What a read returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadData {
    /// The bytes, exactly as many as asked for.
    Data(Vec<u8>),
    /// The whole range reads as zeroes (sent as a hole chunk when structured replies are on,
    /// without building a buffer of zeroes).
    Zeroes,
}

/// One extent of block status (`base:allocation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Length in bytes (nonzero; a multiple of the minimum block size).
    pub length: u64,
    /// The extent is not allocated (`NBD_STATE_HOLE`).
    pub hole: bool,
    /// The extent reads as zeroes (`NBD_STATE_ZERO`).
    pub zero: bool,
}

impl Extent {
    /// Allocated data.
    pub fn data(length: u64) -> Self {
        Self {
            length,
            hole: false,
            zero: false,
        }
    }

    /// An unallocated range that reads as zeroes.
    pub fn hole(length: u64) -> Self {
        Self {
            length,
            hole: true,
            zero: true,
        }
    }

    /// The `base:allocation` flags.
    pub fn flags(&self) -> u32 {
        (if self.hole { proto::STATE_HOLE } else { 0 })
            | (if self.zero { proto::STATE_ZERO } else { 0 })
    }
}

/// A block device the server exports. The server checks bounds, alignment, read-only and
/// sizes before calling an operation, so `offset + len <= size()` always holds here, and reads
/// and writes are at most `block_sizes().maximum` long.
///
/// Several operations may run at once (requests of one connection run concurrently, and
/// connections are independent); the server orders overlapping requests of one connection (a
/// write waits for earlier overlapping reads and writes, a read or block status for earlier
/// overlapping writes, a flush for every earlier write). A device whose I/O blocks should run
/// it in `tokio::task::spawn_blocking`.
#[async_trait]
pub trait BlockDevice: Send + Sync + 'static {
    /// Size of the export in bytes.
    fn size(&self) -> u64;

    /// Whether the export refuses writes, trims and zeroing (with `EPERM`).
    fn read_only(&self) -> bool {
        false
    }

    /// Block size constraints.
    fn block_sizes(&self) -> BlockSizes {
        BlockSizes::default()
    }

    /// Whether a flush on one connection makes durable the writes completed on every
    /// connection to this device (advertised as `NBD_FLAG_CAN_MULTI_CONN`).
    fn can_multi_conn(&self) -> bool {
        false
    }

    /// Reads `len` bytes at `offset`.
    async fn read(&self, offset: u64, len: u32) -> Result<ReadData, DeviceError>;

    /// Writes `data` at `offset`; with `fua` it is durable before this returns.
    async fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> Result<(), DeviceError>;

    /// Makes every completed write durable.
    async fn flush(&self) -> Result<(), DeviceError>;

    /// Discards a range (it may then read as anything until rewritten; reading zeroes is
    /// typical). The default does nothing, which the protocol allows.
    async fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), DeviceError> {
        let _ = (offset, len, fua);
        Ok(())
    }

    /// Makes a range read as zeroes.
    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        flags: ZeroFlags,
    ) -> Result<(), DeviceError>;

    /// Allocation status from `offset` for about `len` bytes: consecutive extents starting at
    /// `offset`. The server trims the list to the request and to protocol limits; an empty list
    /// is answered as one allocated extent. The default reports everything allocated.
    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, DeviceError> {
        let _ = offset;
        Ok(vec![Extent::data(len)])
    }

    /// A hint that the range will be read soon. The default does nothing.
    async fn cache(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        let _ = (offset, len);
        Ok(())
    }
}
