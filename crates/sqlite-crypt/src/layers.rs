//! What the VFS does with each kind of file, in safe Rust over a [`RawFile`] (the underlying
//! file of SQLite's default VFS, or a buffer in tests).
//!
//! - main file: every page sealed in place with [`codec::seal_main_page`];
//! - WAL: each frame's page sealed with its header's fields bound in, the header's checksum masked;
//! - rollback journal: each record's page sealed, the record's checksum masked;
//! - temporary files: fixed blocks sealed under a key of their own;
//! - anything else (a super-journal, which holds file names): passed through.

use std::sync::Arc;

use rusqlite::ffi;

use crate::codec::{
    self, CodecError, NONCE_LEN, PageKind, RESERVE, TEMP_BLOCK, WAL_FRAME_HEADER_LEN,
    WAL_HEADER_LEN,
};
use crate::key::PageCipher;
use crate::registry::DbEntry;
use crate::shm::ShmClient;

use crate::Rc;

/// Whether a read found all the bytes it asked for; a short read zero-fills the rest (SQLite's
/// `SQLITE_IOERR_SHORT_READ` contract).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ReadStatus {
    Full,
    Short,
}

/// The file under the encryption: positioned reads and writes, size and truncation.
pub(crate) trait RawFile {
    /// Reads `buf.len()` bytes at `off`, zero-filling what lies past the end of the file.
    fn read_at(&mut self, buf: &mut [u8], off: u64) -> Result<ReadStatus, Rc>;
    /// Writes `buf` at `off`.
    fn write_at(&mut self, buf: &[u8], off: u64) -> Result<(), Rc>;
    /// The file's size in bytes.
    fn size(&mut self) -> Result<u64, Rc>;
    /// Cuts (or extends) the file to `size` bytes.
    fn truncate(&mut self, size: u64) -> Result<(), Rc>;
}

/// How one open file is encrypted.
// Boxed once per open file, so the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Layer {
    Main(MainLayer),
    Wal(WalLayer),
    Journal(JournalLayer),
    Temp(TempLayer),
    /// Passed through: a super-journal holds only the names of journals.
    Plain,
}

impl Layer {
    pub(crate) fn main(db: Arc<DbEntry>) -> Self {
        Self::Main(MainLayer {
            db,
            scratch: Vec::new(),
            shm: ShmClient::default(),
        })
    }

    pub(crate) fn wal(db: Arc<DbEntry>) -> Self {
        Self::Wal(WalLayer {
            db,
            scratch: Vec::new(),
            page_size: None,
            high_water: None,
            pending: None,
        })
    }

    pub(crate) fn journal(db: Arc<DbEntry>) -> Self {
        Self::Journal(JournalLayer {
            db,
            scratch: Vec::new(),
            state: JournalState::Idle,
            last_read: None,
        })
    }

    pub(crate) fn temp(cipher: PageCipher) -> Self {
        Self::Temp(TempLayer {
            cipher,
            logical_size: 0,
            counter: 0,
            scratch: vec![0; TEMP_BLOCK + RESERVE],
        })
    }

    pub(crate) fn read(
        &mut self,
        raw: &mut dyn RawFile,
        buf: &mut [u8],
        off: u64,
    ) -> Result<ReadStatus, Rc> {
        match self {
            Self::Main(l) => l.read(raw, buf, off),
            Self::Wal(l) => l.read(raw, buf, off),
            Self::Journal(l) => l.read(raw, buf, off),
            Self::Temp(l) => l.read(raw, buf, off),
            Self::Plain => raw.read_at(buf, off),
        }
    }

    pub(crate) fn write(&mut self, raw: &mut dyn RawFile, buf: &[u8], off: u64) -> Result<(), Rc> {
        match self {
            Self::Main(l) => l.write(raw, buf, off),
            Self::Wal(l) => l.write(raw, buf, off),
            Self::Journal(l) => l.write(raw, buf, off),
            Self::Temp(l) => l.write(raw, buf, off),
            Self::Plain => raw.write_at(buf, off),
        }
    }

    pub(crate) fn truncate(&mut self, raw: &mut dyn RawFile, size: u64) -> Result<(), Rc> {
        match self {
            Self::Temp(l) => l.truncate(raw, size),
            Self::Wal(l) => {
                l.flush(raw)?;
                raw.truncate(size)
            }
            _ => raw.truncate(size),
        }
    }

    pub(crate) fn size(&mut self, raw: &mut dyn RawFile) -> Result<u64, Rc> {
        match self {
            Self::Temp(l) => Ok(l.logical_size),
            Self::Wal(l) => {
                l.flush(raw)?;
                raw.size()
            }
            _ => raw.size(),
        }
    }

    /// Writes what is held back (a WAL frame header waiting for its page); called before a sync,
    /// a size query, a truncation and a close.
    pub(crate) fn flush(&mut self, raw: &mut dyn RawFile) -> Result<(), Rc> {
        match self {
            Self::Wal(l) => l.flush(raw),
            _ => Ok(()),
        }
    }

    /// The shared-memory client of a main file.
    pub(crate) fn main_parts(&mut self) -> Option<(&Arc<DbEntry>, &mut ShmClient)> {
        match self {
            Self::Main(l) => Some((&l.db, &mut l.shm)),
            _ => None,
        }
    }
}

fn read_error(e: CodecError) -> Rc {
    match e {
        CodecError::Authentication => {
            tracing::warn!("an encrypted SQLite page failed authentication");
            ffi::SQLITE_IOERR_DATA
        }
        CodecError::Malformed(why) => {
            tracing::warn!(why, "an encrypted SQLite page is malformed");
            ffi::SQLITE_IOERR_DATA
        }
        CodecError::Random => ffi::SQLITE_IOERR_READ,
    }
}

fn write_error(e: CodecError) -> Rc {
    tracing::error!(error = %e, "refused to write an SQLite page");
    ffi::SQLITE_IOERR_WRITE
}

fn be32(b: &[u8]) -> u32 {
    match b {
        [a, b, c, d, ..] => u32::from_be_bytes([*a, *b, *c, *d]),
        _ => 0,
    }
}

/// The page number of the page at `off` in a file of `page_size` pages.
fn page_number(off: u64, page_size: usize) -> Result<u32, Rc> {
    u32::try_from(off / page_size as u64 + 1).map_err(|_| ffi::SQLITE_IOERR_DATA)
}

/// After a short read of a page: nothing on disk means "zeros, short"; part of a page is damage.
fn short_page(raw: &mut dyn RawFile, buf: &mut [u8], off: u64) -> Result<ReadStatus, Rc> {
    if raw.size()? <= off {
        buf.fill(0);
        Ok(ReadStatus::Short)
    } else {
        buf.fill(0);
        Err(ffi::SQLITE_IOERR_DATA)
    }
}

fn scratch(v: &mut Vec<u8>, len: usize) -> &mut [u8] {
    if v.len() < len {
        v.resize(len, 0);
    }
    &mut v[..len]
}

/// A database's main file.
pub(crate) struct MainLayer {
    db: Arc<DbEntry>,
    scratch: Vec<u8>,
    shm: ShmClient,
}

impl MainLayer {
    fn read(&mut self, raw: &mut dyn RawFile, buf: &mut [u8], off: u64) -> Result<ReadStatus, Rc> {
        let len = buf.len();
        if codec::page_size_ok(len) && off.is_multiple_of(len as u64) {
            let pgno = page_number(off, len)?;
            if raw.read_at(buf, off)? == ReadStatus::Short {
                return short_page(raw, buf, off);
            }
            self.db
                .with_cipher(|c| codec::open_main_page(c, pgno, buf).map_err(read_error))?;
            return Ok(ReadStatus::Full);
        }
        // Less than a page: SQLite reads parts of page 1's header. Find the page size in the
        // clear part of the header, then open whole pages.
        let mut head = [0u8; codec::HEADER_LEN];
        if raw.read_at(&mut head, 0)? == ReadStatus::Short && raw.size()? == 0 {
            buf.fill(0);
            return Ok(ReadStatus::Short);
        }
        let codec::HeaderKind::Kagi(header) = codec::classify_header(&head) else {
            buf.fill(0);
            return Err(ffi::SQLITE_IOERR_DATA);
        };
        let ps = header.page_size;
        let end = off + len as u64;
        let mut pos = off;
        let mut status = ReadStatus::Full;
        while pos < end {
            let page_off = pos - pos % ps as u64;
            let within = (pos - page_off) as usize;
            let take = (end - pos).min((ps - within) as u64) as usize;
            let at = (pos - off) as usize;
            let out = &mut buf[at..at + take];
            let page = scratch(&mut self.scratch, ps);
            if raw.read_at(page, page_off)? == ReadStatus::Short {
                short_page(raw, out, page_off)?;
                status = ReadStatus::Short;
            } else {
                let pgno = page_number(page_off, ps)?;
                self.db
                    .with_cipher(|c| codec::open_main_page(c, pgno, page).map_err(read_error))?;
                out.copy_from_slice(&page[within..within + take]);
            }
            pos += take as u64;
        }
        Ok(status)
    }

    fn write(&mut self, raw: &mut dyn RawFile, buf: &[u8], off: u64) -> Result<(), Rc> {
        let len = buf.len();
        if !codec::page_size_ok(len) || !off.is_multiple_of(len as u64) {
            tracing::error!(
                len,
                off,
                "refused a write to an encrypted database that is not a page"
            );
            return Err(ffi::SQLITE_IOERR_WRITE);
        }
        let pgno = page_number(off, len).map_err(|_| ffi::SQLITE_IOERR_WRITE)?;
        let page = scratch(&mut self.scratch, len);
        page.copy_from_slice(buf);
        let nonce = codec::fresh_nonce().map_err(write_error)?;
        self.db
            .with_cipher(|c| codec::seal_main_page(c, pgno, page, nonce).map_err(write_error))?;
        raw.write_at(page, off)
    }
}

/// A WAL frame header waiting for its page, which SQLite writes in the next call: both are
/// written together, the header's checksum masked with the page's nonce.
struct PendingHeader {
    offset: u64,
    header: [u8; WAL_FRAME_HEADER_LEN],
    nonce: [u8; NONCE_LEN],
}

/// A database's write-ahead log.
pub(crate) struct WalLayer {
    db: Arc<DbEntry>,
    scratch: Vec<u8>,
    page_size: Option<usize>,
    /// The highest frame offset this file wrote since it last wrote the WAL header: a frame
    /// header written at or below it may be a rewrite of a frame of the current transaction.
    high_water: Option<u64>,
    pending: Option<PendingHeader>,
}

impl WalLayer {
    fn page_size(&mut self, raw: &mut dyn RawFile) -> Result<Option<usize>, Rc> {
        if self.page_size.is_none() {
            let mut head = [0u8; WAL_HEADER_LEN];
            if raw.read_at(&mut head, 0)? == ReadStatus::Full {
                let ps = be32(&head[8..12]) as usize;
                if codec::page_size_ok(ps) {
                    self.page_size = Some(ps);
                }
            }
        }
        Ok(self.page_size)
    }

    /// Writes a header whose page never came, masked with the nonce it was promised.
    fn flush(&mut self, raw: &mut dyn RawFile) -> Result<(), Rc> {
        let Some(p) = self.pending.take() else {
            return Ok(());
        };
        let mask = self
            .db
            .with_cipher(|c| Ok(codec::checksum_mask(c, PageKind::Wal, &p.nonce)))?;
        let mut header = p.header;
        for (b, m) in header[16..].iter_mut().zip(mask) {
            *b ^= m;
        }
        raw.write_at(&header, p.offset)
    }

    fn write(&mut self, raw: &mut dyn RawFile, buf: &[u8], off: u64) -> Result<(), Rc> {
        let len = buf.len();
        if off == 0 && len == WAL_HEADER_LEN {
            self.flush(raw)?;
            let ps = be32(&buf[8..12]) as usize;
            if codec::page_size_ok(ps) {
                self.page_size = Some(ps);
            }
            self.high_water = None;
            return raw.write_at(buf, 0);
        }
        let Some(ps) = self.page_size(raw)? else {
            tracing::error!("refused a WAL frame written before the WAL header");
            return Err(ffi::SQLITE_IOERR_WRITE);
        };
        let frame_len = (ps + WAL_FRAME_HEADER_LEN) as u64;
        if off < WAL_HEADER_LEN as u64 {
            return Err(ffi::SQLITE_IOERR_WRITE);
        }
        let within = (off - WAL_HEADER_LEN as u64) % frame_len;
        let frame = off - within;
        if len == WAL_FRAME_HEADER_LEN && within == 0 {
            self.flush(raw)?;
            let mut header = [0u8; WAL_FRAME_HEADER_LEN];
            header.copy_from_slice(buf);
            if self.high_water.is_some_and(|h| frame <= h)
                && self.rewrite_header(raw, &header, frame, ps)?
            {
                return Ok(());
            }
            let nonce = codec::fresh_nonce().map_err(write_error)?;
            self.pending = Some(PendingHeader {
                offset: frame,
                header,
                nonce,
            });
            return Ok(());
        }
        if len == ps && within == WAL_FRAME_HEADER_LEN as u64 {
            let full = ps + WAL_FRAME_HEADER_LEN;
            let pending = self.pending.take_if(|p| p.offset == frame);
            self.flush(raw)?;
            let db = &self.db;
            let buffer = scratch(&mut self.scratch, full);
            if let Some(p) = pending {
                buffer[..WAL_FRAME_HEADER_LEN].copy_from_slice(&p.header);
                buffer[WAL_FRAME_HEADER_LEN..].copy_from_slice(buf);
                db.with_cipher(|c| {
                    codec::seal_wal_frame(c, buffer, frame, p.nonce).map_err(write_error)
                })?;
            } else {
                // SQLite rewrites the page of a frame of the current transaction in place; the
                // header stays, its checksum is recomputed before the commit.
                if raw.read_at(buffer, frame)? == ReadStatus::Short {
                    return Err(ffi::SQLITE_IOERR_WRITE);
                }
                let nonce = codec::fresh_nonce().map_err(write_error)?;
                db.with_cipher(|c| {
                    codec::replace_wal_page(c, buffer, frame, buf, nonce).map_err(write_error)
                })?;
            }
            raw.write_at(buffer, frame)?;
            self.high_water = Some(self.high_water.map_or(frame, |h| h.max(frame)));
            return Ok(());
        }
        tracing::error!(
            len,
            off,
            "refused a WAL write that is neither a header nor a page"
        );
        Err(ffi::SQLITE_IOERR_WRITE)
    }

    /// A frame header written over a frame this file wrote in the current WAL generation, for the
    /// same page: SQLite recomputing checksums at commit (frames written after an in-place
    /// rewrite carry zero salts and checksums until then). The page is opened with the header on
    /// disk and sealed again under a fresh nonce with the new one. Returns false when the frame on
    /// disk is for another page or does not open: then this is a new frame, whose page follows.
    fn rewrite_header(
        &mut self,
        raw: &mut dyn RawFile,
        header: &[u8; WAL_FRAME_HEADER_LEN],
        frame: u64,
        ps: usize,
    ) -> Result<bool, Rc> {
        let buffer = scratch(&mut self.scratch, ps + WAL_FRAME_HEADER_LEN);
        if raw.read_at(buffer, frame)? == ReadStatus::Short || buffer[..4] != header[..4] {
            return Ok(false);
        }
        let nonce = codec::fresh_nonce().map_err(write_error)?;
        let rewritten = self.db.with_cipher(|c| {
            if codec::open_wal_frame(c, buffer, frame).is_err() {
                return Ok(false);
            }
            buffer[..WAL_FRAME_HEADER_LEN].copy_from_slice(header);
            codec::seal_wal_frame(c, buffer, frame, nonce).map_err(write_error)?;
            Ok(true)
        })?;
        if rewritten {
            raw.write_at(buffer, frame)?;
        }
        Ok(rewritten)
    }

    fn read(&mut self, raw: &mut dyn RawFile, buf: &mut [u8], off: u64) -> Result<ReadStatus, Rc> {
        self.flush(raw)?;
        let len = buf.len();
        let end = off + len as u64;
        let header_end = WAL_HEADER_LEN as u64;
        if end <= header_end {
            return raw.read_at(buf, off);
        }
        let Some(ps) = self.page_size(raw)? else {
            return raw.read_at(buf, off);
        };
        let full = ps + WAL_FRAME_HEADER_LEN;
        let mut status = ReadStatus::Full;
        let mut pos = off;
        if pos < header_end {
            let n = (header_end - off) as usize;
            if raw.read_at(&mut buf[..n], off)? == ReadStatus::Short {
                status = ReadStatus::Short;
            }
            pos = header_end;
        }
        while pos < end {
            let k = (pos - header_end) / full as u64;
            let frame = header_end + k * full as u64;
            let within = (pos - frame) as usize;
            let take = (end - pos).min((full - within) as u64) as usize;
            let at = (pos - off) as usize;
            let out = &mut buf[at..at + take];
            let buffer = scratch(&mut self.scratch, full);
            let whole_frame = within == 0 && take == full;
            if raw.read_at(buffer, frame)? == ReadStatus::Short {
                out.fill(0);
                status = ReadStatus::Short;
                // A frame only partly on disk is no frame; a page read from it is damage.
                if !whole_frame && raw.size()? > pos {
                    return Err(ffi::SQLITE_IOERR_DATA);
                }
            } else if within == WAL_FRAME_HEADER_LEN && take == ps {
                self.db.with_cipher(|c| {
                    codec::open_wal_page_into(c, buffer, frame, out).map_err(read_error)
                })?;
            } else {
                match self
                    .db
                    .with_cipher(|c| Ok(codec::open_wal_frame(c, buffer, frame)))?
                {
                    Ok(()) => out.copy_from_slice(&buffer[within..within + take]),
                    // SQLite reads whole frames only to recover the log: a frame that does not
                    // open is returned as zeros, which SQLite takes for the end of the log.
                    Err(CodecError::Authentication) if whole_frame => out.fill(0),
                    Err(e) => return Err(read_error(e)),
                }
            }
            pos += take as u64;
        }
        Ok(status)
    }
}

/// What the last writes to a rollback journal were: SQLite writes a record as its page number,
/// then its page, then its checksum.
#[derive(Clone, Copy)]
enum JournalState {
    Idle,
    AfterPageNumber { at: u64, pgno: u32 },
    AfterPage { end: u64, nonce: [u8; NONCE_LEN] },
}

/// A database's rollback journal.
pub(crate) struct JournalLayer {
    db: Arc<DbEntry>,
    scratch: Vec<u8>,
    state: JournalState,
    /// The end offset and nonce of the last record page read: its checksum follows.
    last_read: Option<(u64, [u8; NONCE_LEN])>,
}

/// Whether a journal access of `len` bytes at `off` is a record's page: records start at
/// multiples of 8 after a sector-aligned header, so their pages start 4 bytes past a multiple
/// of 8; headers start at multiples of the sector size.
fn is_record_page(len: usize, off: u64) -> bool {
    codec::page_size_ok(len) && off % 8 == 4
}

fn xor4(buf: &[u8], mask: [u8; 8]) -> [u8; 4] {
    let mut out = [0u8; 4];
    for ((o, b), m) in out.iter_mut().zip(buf).zip(mask) {
        *o = b ^ m;
    }
    out
}

impl JournalLayer {
    fn record_page_number(&self, raw: &mut dyn RawFile, off: u64) -> Result<u32, Rc> {
        if let JournalState::AfterPageNumber { at, pgno } = self.state
            && at + 4 == off
        {
            return Ok(pgno);
        }
        let mut p = [0u8; 4];
        if raw.read_at(&mut p, off - 4)? == ReadStatus::Short {
            return Err(ffi::SQLITE_IOERR_WRITE);
        }
        Ok(be32(&p))
    }

    fn write(&mut self, raw: &mut dyn RawFile, buf: &[u8], off: u64) -> Result<(), Rc> {
        let len = buf.len();
        if len == 4 {
            if let JournalState::AfterPage { end, nonce } = self.state
                && end == off
            {
                self.state = JournalState::Idle;
                let mask = self
                    .db
                    .with_cipher(|c| Ok(codec::checksum_mask(c, PageKind::Journal, &nonce)))?;
                return raw.write_at(&xor4(buf, mask), off);
            }
            self.state = JournalState::AfterPageNumber {
                at: off,
                pgno: be32(buf),
            };
            return raw.write_at(buf, off);
        }
        if is_record_page(len, off) {
            let pgno = self.record_page_number(raw, off)?;
            // The super-journal record (file names) uses the pending-byte page's number.
            if pgno != codec::pending_byte_page(len) {
                let page = scratch(&mut self.scratch, len);
                page.copy_from_slice(buf);
                if !codec::reserve_is_clear(page) {
                    return Err(write_error(CodecError::Malformed("reserved bytes in use")));
                }
                let nonce = codec::fresh_nonce().map_err(write_error)?;
                self.db.with_cipher(|c| {
                    codec::seal_page(c, PageKind::Journal, pgno, off, &[], page, nonce)
                        .map_err(write_error)
                })?;
                raw.write_at(page, off)?;
                self.state = JournalState::AfterPage {
                    end: off + len as u64,
                    nonce,
                };
                return Ok(());
            }
        }
        self.state = JournalState::Idle;
        raw.write_at(buf, off)
    }

    fn read(&mut self, raw: &mut dyn RawFile, buf: &mut [u8], off: u64) -> Result<ReadStatus, Rc> {
        let len = buf.len();
        if is_record_page(len, off) {
            let mut p = [0u8; 4];
            let status = raw.read_at(&mut p, off - 4)?;
            let pgno = be32(&p);
            if status == ReadStatus::Full && pgno != codec::pending_byte_page(len) {
                if raw.read_at(buf, off)? == ReadStatus::Short {
                    return short_page(raw, buf, off);
                }
                let nonce = self.db.with_cipher(|c| {
                    codec::open_page(c, PageKind::Journal, pgno, off, &[], buf).map_err(read_error)
                })?;
                self.last_read = Some((off + len as u64, nonce));
                return Ok(ReadStatus::Full);
            }
        }
        if len == 4
            && let Some((end, nonce)) = self.last_read.take_if(|(end, _)| *end == off)
        {
            let _ = end;
            let status = raw.read_at(buf, off)?;
            let mask = self
                .db
                .with_cipher(|c| Ok(codec::checksum_mask(c, PageKind::Journal, &nonce)))?;
            let plain = xor4(buf, mask);
            buf.copy_from_slice(&plain);
            return Ok(status);
        }
        raw.read_at(buf, off)
    }
}

/// A temporary file: its logical bytes are stored in blocks of [`TEMP_BLOCK`] bytes, each
/// followed by its nonce and tag, under a key that lives as long as the file. Temporary files are
/// never reopened, so their logical size lives in memory.
pub(crate) struct TempLayer {
    cipher: PageCipher,
    logical_size: u64,
    counter: u64,
    scratch: Vec<u8>,
}

const PHYSICAL_BLOCK: u64 = (TEMP_BLOCK + RESERVE) as u64;

impl TempLayer {
    /// Loads block `idx` into the scratch buffer as plaintext; a block never written reads as
    /// zeros.
    fn load(&mut self, raw: &mut dyn RawFile, idx: u64) -> Result<(), Rc> {
        let block = &mut self.scratch[..];
        raw.read_at(block, idx * PHYSICAL_BLOCK)?;
        if block[TEMP_BLOCK..TEMP_BLOCK + NONCE_LEN]
            .iter()
            .all(|&b| b == 0)
        {
            // Counter nonces start at 1: an all-zero nonce is a hole.
            block.fill(0);
            return Ok(());
        }
        codec::open_page(&self.cipher, PageKind::Temp, 0, idx, &[], block).map_err(read_error)?;
        Ok(())
    }

    fn store(&mut self, raw: &mut dyn RawFile, idx: u64) -> Result<(), Rc> {
        self.counter += 1;
        let mut nonce = [0u8; NONCE_LEN];
        nonce[4..].copy_from_slice(&self.counter.to_be_bytes());
        let block = &mut self.scratch[..];
        block[TEMP_BLOCK..].fill(0);
        codec::seal_page(&self.cipher, PageKind::Temp, 0, idx, &[], block, nonce)
            .map_err(write_error)?;
        raw.write_at(block, idx * PHYSICAL_BLOCK)
    }

    fn read(&mut self, raw: &mut dyn RawFile, buf: &mut [u8], off: u64) -> Result<ReadStatus, Rc> {
        let end = off + buf.len() as u64;
        let mut pos = off;
        while pos < end {
            let idx = pos / TEMP_BLOCK as u64;
            let within = (pos % TEMP_BLOCK as u64) as usize;
            let take = (end - pos).min((TEMP_BLOCK - within) as u64) as usize;
            let at = (pos - off) as usize;
            if pos >= self.logical_size {
                buf[at..].fill(0);
                return Ok(ReadStatus::Short);
            }
            self.load(raw, idx)?;
            buf[at..at + take].copy_from_slice(&self.scratch[within..within + take]);
            pos += take as u64;
        }
        if end > self.logical_size {
            let keep = self.logical_size.saturating_sub(off) as usize;
            buf[keep..].fill(0);
            return Ok(ReadStatus::Short);
        }
        Ok(ReadStatus::Full)
    }

    fn write(&mut self, raw: &mut dyn RawFile, buf: &[u8], off: u64) -> Result<(), Rc> {
        let end = off + buf.len() as u64;
        let mut pos = off;
        while pos < end {
            let idx = pos / TEMP_BLOCK as u64;
            let within = (pos % TEMP_BLOCK as u64) as usize;
            let take = (end - pos).min((TEMP_BLOCK - within) as u64) as usize;
            let at = (pos - off) as usize;
            if take < TEMP_BLOCK {
                if idx * (TEMP_BLOCK as u64) < self.logical_size {
                    self.load(raw, idx)?;
                } else {
                    self.scratch.fill(0);
                }
            }
            self.scratch[within..within + take].copy_from_slice(&buf[at..at + take]);
            self.store(raw, idx)?;
            pos += take as u64;
        }
        self.logical_size = self.logical_size.max(end);
        Ok(())
    }

    fn truncate(&mut self, raw: &mut dyn RawFile, size: u64) -> Result<(), Rc> {
        if size < self.logical_size {
            let block = TEMP_BLOCK as u64;
            let within = (size % block) as usize;
            if within != 0 {
                // Keep the rule that bytes past the end of the last block are zero.
                self.load(raw, size / block)?;
                self.scratch[within..TEMP_BLOCK].fill(0);
                self.store(raw, size / block)?;
            }
            raw.truncate(size.div_ceil(block) * PHYSICAL_BLOCK)?;
        }
        self.logical_size = size;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
