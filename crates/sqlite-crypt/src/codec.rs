//! The page codec: pure functions over byte slices, no I/O (docs/TDE_FORMAT.md describes the
//! format they implement).
//!
//! Every page is sealed with AES-256-GCM-SIV: the page's usable bytes are encrypted in place, and
//! the 12-byte nonce and 16-byte tag go into the last [`RESERVE`] bytes of the page, the bytes
//! SQLite reserves at the end of each page. The associated data binds the format version, the kind
//! of file, the page number, the byte offset in the file and the database id, so a page moved to
//! another place or into another database fails to open.

use aws_lc_rs::aead::{Aad, Nonce};
use aws_lc_rs::hmac;

use crate::key::{DATABASE_ID_LEN, PageCipher};

/// Length of a nonce.
pub const NONCE_LEN: usize = 12;
/// Length of an authentication tag.
pub const TAG_LEN: usize = 16;
/// Bytes reserved at the end of every page: the nonce, then the tag.
pub const RESERVE: usize = NONCE_LEN + TAG_LEN;
/// The first 16 bytes of a kagi database file (its last byte is the format version).
pub const FILE_MAGIC: [u8; 16] = *b"kagi-tde format\x01";
/// The format version (the last byte of [`FILE_MAGIC`], and the first byte of every page's
/// associated data).
pub const FORMAT_VERSION: u8 = 1;
/// The first 16 bytes of a plain SQLite database file.
pub const SQLITE_MAGIC: [u8; 16] = *b"SQLite format 3\0";
/// Length of SQLite's database header at the start of page 1.
pub const HEADER_LEN: usize = 100;
/// Length of a WAL file's header.
pub const WAL_HEADER_LEN: usize = 32;
/// Length of a WAL frame's header.
pub const WAL_FRAME_HEADER_LEN: usize = 24;
/// Logical block size of a temporary file; each block is stored followed by [`RESERVE`] bytes.
pub const TEMP_BLOCK: usize = 4096;
/// Smallest SQLite page size.
pub const MIN_PAGE_SIZE: usize = 512;
/// Largest SQLite page size.
pub const MAX_PAGE_SIZE: usize = 65536;

/// Header bytes of page 1 kept in the clear: page size, file format versions, reserved bytes per
/// page and the payload fractions.
const GEOMETRY: std::ops::Range<usize> = 16..24;
/// The first encrypted run of page 1 ends here; the database id and 4 zero bytes follow.
const RUN_A_END: usize = 72;
/// Where page 1 keeps the database id in the clear (SQLite's "reserved for expansion" bytes,
/// which SQLite requires to be zero).
const ID_AT: std::ops::Range<usize> = 72..88;
/// The second encrypted run of page 1 starts here.
const RUN_B_START: usize = 92;
/// Bytes of page 1 not encrypted in the middle of the page (id and 4 reserved bytes).
const GAP: usize = RUN_B_START - RUN_A_END;

/// Which file a page lives in; bound into the page's associated data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum PageKind {
    /// A database's main file.
    Main = 1,
    /// A frame of a database's write-ahead log.
    Wal = 2,
    /// A page record of a database's rollback journal.
    Journal = 3,
    /// A block of a temporary file (ephemeral key).
    Temp = 4,
}

/// Why a page could not be sealed or opened.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// The tag did not verify: wrong key, another database, another place, or damage.
    #[error("page failed authentication (wrong key, another database or place, or damaged)")]
    Authentication,
    /// The bytes do not have the shape the codec expects.
    #[error("malformed page: {0}")]
    Malformed(&'static str),
    /// The system's random generator failed.
    #[error("random generator failed")]
    Random,
}

/// Whether `n` is a valid SQLite page size.
#[must_use]
pub fn page_size_ok(n: usize) -> bool {
    n.is_power_of_two() && (MIN_PAGE_SIZE..=MAX_PAGE_SIZE).contains(&n)
}

/// SQLite's "pending byte" page, which is never used as a page; the rollback journal uses its
/// number to mark the super-journal record.
#[must_use]
pub fn pending_byte_page(page_size: usize) -> u32 {
    let pages = 0x4000_0000usize / page_size.max(1);
    u32::try_from(pages).unwrap_or(u32::MAX).saturating_add(1)
}

/// A fresh random nonce.
///
/// # Errors
/// [`CodecError::Random`] when the random generator fails.
pub fn fresh_nonce() -> Result<[u8; NONCE_LEN], CodecError> {
    let mut nonce = [0u8; NONCE_LEN];
    aws_lc_rs::rand::fill(&mut nonce).map_err(|_| CodecError::Random)?;
    Ok(nonce)
}

/// A page's associated data: version, kind, page number, offset, database id, and up to 16 bytes
/// more (page 1's clear geometry, a WAL frame's header).
struct Ad {
    bytes: [u8; 48],
    len: usize,
}

impl Ad {
    fn new(c: &PageCipher, kind: PageKind, pgno: u32, offset: u64, extra: &[u8]) -> Self {
        let mut bytes = [0u8; 48];
        bytes[0] = FORMAT_VERSION;
        bytes[1] = kind as u8;
        bytes[4..8].copy_from_slice(&pgno.to_be_bytes());
        bytes[8..16].copy_from_slice(&offset.to_be_bytes());
        bytes[16..32].copy_from_slice(&c.database_id);
        let n = extra.len().min(16);
        bytes[32..32 + n].copy_from_slice(&extra[..n]);
        Self { bytes, len: 32 + n }
    }

    fn aad(&self) -> Aad<&[u8]> {
        Aad::from(&self.bytes[..self.len])
    }
}

fn split_reserve(page: &mut [u8]) -> Result<(&mut [u8], &mut [u8]), CodecError> {
    if page.len() <= RESERVE {
        return Err(CodecError::Malformed("page shorter than the reserve"));
    }
    let usable = page.len() - RESERVE;
    Ok(page.split_at_mut(usable))
}

/// Whether the page's reserved bytes are zero: SQLite never writes there, and the codec replaces
/// them with the nonce and tag, so anything else would be lost.
#[must_use]
pub fn reserve_is_clear(page: &[u8]) -> bool {
    page.len() > RESERVE && page[page.len() - RESERVE..].iter().all(|&b| b == 0)
}

/// Encrypts `page[..len - RESERVE]` in place and writes `nonce` and the tag into the reserve.
///
/// # Errors
/// [`CodecError::Malformed`] for a page not longer than the reserve.
pub fn seal_page(
    c: &PageCipher,
    kind: PageKind,
    pgno: u32,
    offset: u64,
    extra_ad: &[u8],
    page: &mut [u8],
    nonce: [u8; NONCE_LEN],
) -> Result<(), CodecError> {
    let ad = Ad::new(c, kind, pgno, offset, extra_ad);
    let (body, reserve) = split_reserve(page)?;
    let tag = c
        .aead
        .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), ad.aad(), body)
        .map_err(|_| CodecError::Malformed("page too long"))?;
    reserve[..NONCE_LEN].copy_from_slice(&nonce);
    reserve[NONCE_LEN..].copy_from_slice(tag.as_ref());
    Ok(())
}

/// Reads the nonce and tag of a sealed page.
fn nonce_and_tag(page: &[u8]) -> Result<([u8; NONCE_LEN], [u8; TAG_LEN]), CodecError> {
    if page.len() <= RESERVE {
        return Err(CodecError::Malformed("page shorter than the reserve"));
    }
    let reserve = &page[page.len() - RESERVE..];
    let mut nonce = [0u8; NONCE_LEN];
    let mut tag = [0u8; TAG_LEN];
    nonce.copy_from_slice(&reserve[..NONCE_LEN]);
    tag.copy_from_slice(&reserve[NONCE_LEN..]);
    Ok((nonce, tag))
}

/// The nonce stored in a sealed page's reserve.
///
/// # Errors
/// [`CodecError::Malformed`] for a page not longer than the reserve.
pub fn page_nonce(page: &[u8]) -> Result<[u8; NONCE_LEN], CodecError> {
    nonce_and_tag(page).map(|(n, _)| n)
}

/// Decrypts a page sealed by [`seal_page`] in place, zeroes its reserve and returns its nonce.
/// On failure the page is zeroed.
///
/// # Errors
/// [`CodecError::Authentication`] when the tag does not verify.
pub fn open_page(
    c: &PageCipher,
    kind: PageKind,
    pgno: u32,
    offset: u64,
    extra_ad: &[u8],
    page: &mut [u8],
) -> Result<[u8; NONCE_LEN], CodecError> {
    let (nonce, tag) = nonce_and_tag(page)?;
    let ad = Ad::new(c, kind, pgno, offset, extra_ad);
    let (body, reserve) = split_reserve(page)?;
    let opened = c.aead.open_in_place_separate_tag(
        Nonce::assume_unique_for_key(nonce),
        ad.aad(),
        &tag,
        body,
    );
    reserve.fill(0);
    if opened.is_err() {
        body.fill(0);
        return Err(CodecError::Authentication);
    }
    Ok(nonce)
}

/// Decrypts a sealed page from `src` into `dst` (of the same length), leaving `src` alone.
/// On failure `dst` is zeroed.
///
/// # Errors
/// [`CodecError::Authentication`] when the tag does not verify.
pub fn open_page_into(
    c: &PageCipher,
    kind: PageKind,
    pgno: u32,
    offset: u64,
    extra_ad: &[u8],
    src: &[u8],
    dst: &mut [u8],
) -> Result<(), CodecError> {
    if src.len() != dst.len() {
        return Err(CodecError::Malformed(
            "source and destination differ in length",
        ));
    }
    let (nonce, tag) = nonce_and_tag(src)?;
    let ad = Ad::new(c, kind, pgno, offset, extra_ad);
    let usable = src.len() - RESERVE;
    let (out, reserve) = dst.split_at_mut(usable);
    reserve.fill(0);
    let opened = c.aead.open_separate_gather(
        Nonce::assume_unique_for_key(nonce),
        ad.aad(),
        &src[..usable],
        &tag,
        out,
    );
    if opened.is_err() {
        out.fill(0);
        return Err(CodecError::Authentication);
    }
    Ok(())
}

/// Eight bytes of a keyed PRF of a nonce: the mask that hides checksums SQLite computes over
/// plaintext (WAL frame checksums, rollback-journal record checksums).
#[must_use]
pub fn checksum_mask(c: &PageCipher, kind: PageKind, nonce: &[u8; NONCE_LEN]) -> [u8; 8] {
    let mut input = [0u8; 2 + NONCE_LEN];
    input[0] = FORMAT_VERSION;
    input[1] = kind as u8;
    input[2..].copy_from_slice(nonce);
    let tag = hmac::sign(&c.mask, &input);
    let mut out = [0u8; 8];
    out.copy_from_slice(&tag.as_ref()[..8]);
    out
}

/// Page 1's header page-size field (1 means 65536).
fn header_page_size(header: &[u8]) -> usize {
    match header.get(16..18) {
        Some(&[hi, lo]) => match u16::from_be_bytes([hi, lo]) {
            1 => MAX_PAGE_SIZE,
            n => usize::from(n),
        },
        _ => 0,
    }
}

fn is_page_one_shape(page: &[u8]) -> bool {
    page_size_ok(page.len()) && header_page_size(page) == page.len()
}

/// Turns a plaintext page of the main file into its stored form, in place.
///
/// Page 1 keeps in the clear the kagi magic (instead of SQLite's), the header's geometry (bytes
/// 16..24) and the database id (bytes 72..88, which SQLite keeps zero); the rest is sealed.
///
/// # Errors
/// [`CodecError::Malformed`] when the page is not a page SQLite would write with at least
/// [`RESERVE`] reserved bytes (see docs/TDE_FORMAT.md).
pub fn seal_main_page(
    c: &PageCipher,
    pgno: u32,
    page: &mut [u8],
    nonce: [u8; NONCE_LEN],
) -> Result<(), CodecError> {
    if !page_size_ok(page.len()) {
        return Err(CodecError::Malformed("not a page size"));
    }
    if !reserve_is_clear(page) {
        return Err(CodecError::Malformed("reserved bytes in use"));
    }
    let offset = u64::from(pgno.saturating_sub(1)) * page.len() as u64;
    if pgno != 1 {
        return seal_page(c, PageKind::Main, pgno, offset, &[], page, nonce);
    }
    if page[..16] != SQLITE_MAGIC || !is_page_one_shape(page) {
        return Err(CodecError::Malformed("page 1 without SQLite's header"));
    }
    if usize::from(page[20]) < RESERVE {
        return Err(CodecError::Malformed(
            "fewer reserved bytes per page than the codec needs",
        ));
    }
    if page[RUN_A_END..RUN_B_START].iter().any(|&b| b != 0) {
        return Err(CodecError::Malformed("header bytes 72..92 in use"));
    }
    let mut geometry = [0u8; 8];
    geometry.copy_from_slice(&page[GEOMETRY]);
    let usable = page.len() - RESERVE;
    // Make the two encrypted runs contiguous, seal them as one, and put run B back.
    page.copy_within(RUN_B_START..usable, RUN_A_END);
    let sealed_end = usable - GAP;
    let ad = Ad::new(c, PageKind::Main, 1, 0, &geometry);
    let tag = c
        .aead
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(nonce),
            ad.aad(),
            &mut page[GEOMETRY.end..sealed_end],
        )
        .map_err(|_| CodecError::Malformed("page too long"))?;
    page.copy_within(RUN_A_END..sealed_end, RUN_B_START);
    page[..16].copy_from_slice(&FILE_MAGIC);
    page[ID_AT].copy_from_slice(&c.database_id);
    page[ID_AT.end..RUN_B_START].fill(0);
    page[usable..usable + NONCE_LEN].copy_from_slice(&nonce);
    page[usable + NONCE_LEN..].copy_from_slice(tag.as_ref());
    Ok(())
}

/// Turns a stored page of the main file back into SQLite's plaintext page, in place. On failure
/// the page is zeroed.
///
/// # Errors
/// [`CodecError::Authentication`] when the page does not open under this key, database id, page
/// number and offset.
pub fn open_main_page(c: &PageCipher, pgno: u32, page: &mut [u8]) -> Result<(), CodecError> {
    if !page_size_ok(page.len()) {
        return Err(CodecError::Malformed("not a page size"));
    }
    let offset = u64::from(pgno.saturating_sub(1)) * page.len() as u64;
    if pgno != 1 {
        return open_page(c, PageKind::Main, pgno, offset, &[], page).map(|_| ());
    }
    if page[..16] != FILE_MAGIC || !is_page_one_shape(page) || page[ID_AT] != c.database_id {
        page.fill(0);
        return Err(CodecError::Authentication);
    }
    let (nonce, tag) = nonce_and_tag(page)?;
    let mut geometry = [0u8; 8];
    geometry.copy_from_slice(&page[GEOMETRY]);
    let usable = page.len() - RESERVE;
    let sealed_end = usable - GAP;
    page.copy_within(RUN_B_START..usable, RUN_A_END);
    let ad = Ad::new(c, PageKind::Main, 1, 0, &geometry);
    let opened = c.aead.open_in_place_separate_tag(
        Nonce::assume_unique_for_key(nonce),
        ad.aad(),
        &tag,
        &mut page[GEOMETRY.end..sealed_end],
    );
    if opened.is_err() {
        page.fill(0);
        return Err(CodecError::Authentication);
    }
    page.copy_within(RUN_A_END..sealed_end, RUN_B_START);
    page[..16].copy_from_slice(&SQLITE_MAGIC);
    page[RUN_A_END..RUN_B_START].fill(0);
    page[usable..].fill(0);
    Ok(())
}

/// Applies (or removes: it is an XOR) the checksum mask to a WAL frame's header, with the nonce
/// stored in the frame's sealed page.
fn xor_frame_checksum(c: &PageCipher, frame: &mut [u8]) -> Result<(), CodecError> {
    let nonce = page_nonce(&frame[WAL_FRAME_HEADER_LEN..])?;
    let mask = checksum_mask(c, PageKind::Wal, &nonce);
    for (b, m) in frame[16..WAL_FRAME_HEADER_LEN].iter_mut().zip(mask) {
        *b ^= m;
    }
    Ok(())
}

fn frame_shape(frame: &[u8]) -> Result<(u32, [u8; 16]), CodecError> {
    if frame.len() <= WAL_FRAME_HEADER_LEN || !page_size_ok(frame.len() - WAL_FRAME_HEADER_LEN) {
        return Err(CodecError::Malformed("not a WAL frame"));
    }
    let mut fields = [0u8; 16];
    fields.copy_from_slice(&frame[..16]);
    let pgno = u32::from_be_bytes([fields[0], fields[1], fields[2], fields[3]]);
    Ok((pgno, fields))
}

/// Seals a WAL frame in place: `frame` is the 24-byte header SQLite wrote followed by the
/// plaintext page; `offset` is the frame's offset in the WAL. The page is sealed with the header's
/// page number, commit size and salts in its associated data, and the header's checksum is masked.
///
/// # Errors
/// [`CodecError::Malformed`] for a frame of the wrong size or a page whose reserve is in use.
pub fn seal_wal_frame(
    c: &PageCipher,
    frame: &mut [u8],
    offset: u64,
    nonce: [u8; NONCE_LEN],
) -> Result<(), CodecError> {
    let (pgno, fields) = frame_shape(frame)?;
    if !reserve_is_clear(&frame[WAL_FRAME_HEADER_LEN..]) {
        return Err(CodecError::Malformed("reserved bytes in use"));
    }
    if pgno == 1 && usize::from(frame[WAL_FRAME_HEADER_LEN + 20]) < RESERVE {
        return Err(CodecError::Malformed(
            "fewer reserved bytes per page than the codec needs",
        ));
    }
    let page = &mut frame[WAL_FRAME_HEADER_LEN..];
    seal_page(c, PageKind::Wal, pgno, offset, &fields, page, nonce)?;
    xor_frame_checksum(c, frame)
}

/// Opens a WAL frame sealed by [`seal_wal_frame`] in place: the header gets its checksum back
/// and the page its plaintext. On failure the whole frame is zeroed.
///
/// # Errors
/// [`CodecError::Authentication`] when the page does not open.
pub fn open_wal_frame(c: &PageCipher, frame: &mut [u8], offset: u64) -> Result<(), CodecError> {
    let (pgno, fields) = frame_shape(frame)?;
    xor_frame_checksum(c, frame)?;
    let opened = open_page(
        c,
        PageKind::Wal,
        pgno,
        offset,
        &fields,
        &mut frame[WAL_FRAME_HEADER_LEN..],
    );
    if opened.is_err() {
        frame.fill(0);
    }
    opened.map(|_| ())
}

/// Opens the page of a sealed WAL frame into `out` (the page size), leaving `frame` alone.
///
/// # Errors
/// [`CodecError::Authentication`] when the page does not open.
pub fn open_wal_page_into(
    c: &PageCipher,
    frame: &[u8],
    offset: u64,
    out: &mut [u8],
) -> Result<(), CodecError> {
    let (pgno, fields) = frame_shape(frame)?;
    let page = &frame[WAL_FRAME_HEADER_LEN..];
    open_page_into(c, PageKind::Wal, pgno, offset, &fields, page, out)
}

/// Replaces the page of a sealed WAL frame whose header is unchanged (SQLite rewrites a page in
/// place when a transaction changes it again): the old checksum is unmasked, the new page sealed
/// under a fresh nonce and the checksum masked again.
///
/// # Errors
/// [`CodecError::Malformed`] for a frame or page of the wrong size.
pub fn replace_wal_page(
    c: &PageCipher,
    frame: &mut [u8],
    offset: u64,
    page: &[u8],
    nonce: [u8; NONCE_LEN],
) -> Result<(), CodecError> {
    frame_shape(frame)?;
    if page.len() != frame.len() - WAL_FRAME_HEADER_LEN {
        return Err(CodecError::Malformed("page size differs from the frame's"));
    }
    xor_frame_checksum(c, frame)?;
    frame[WAL_FRAME_HEADER_LEN..].copy_from_slice(page);
    seal_wal_frame(c, frame, offset, nonce)
}

/// What the first bytes of a file say it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeaderKind {
    /// A kagi database file.
    Kagi(FileHeader),
    /// An empty file (or one shorter than the header).
    Empty,
    /// A plain, unencrypted SQLite database.
    PlainSqlite,
    /// Anything else.
    Unknown,
}

/// The clear fields of a kagi database file's header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileHeader {
    /// Format version (1).
    pub format_version: u8,
    /// Page size in bytes.
    pub page_size: usize,
    /// Reserved bytes per page (at least [`RESERVE`]).
    pub reserve: usize,
    /// The database id.
    pub database_id: [u8; DATABASE_ID_LEN],
}

/// Reads what a file is from its first bytes (at least [`HEADER_LEN`] for a kagi file).
#[must_use]
pub fn classify_header(bytes: &[u8]) -> HeaderKind {
    if bytes.iter().all(|&b| b == 0) {
        return HeaderKind::Empty;
    }
    if bytes.len() >= 16 && bytes[..16] == SQLITE_MAGIC {
        return HeaderKind::PlainSqlite;
    }
    if bytes.len() < HEADER_LEN || bytes[..16] != FILE_MAGIC {
        return HeaderKind::Unknown;
    }
    let page_size = header_page_size(bytes);
    let reserve = usize::from(bytes[20]);
    if !page_size_ok(page_size) || reserve < RESERVE || page_size - reserve < 480 {
        return HeaderKind::Unknown;
    }
    let mut database_id = [0u8; DATABASE_ID_LEN];
    database_id.copy_from_slice(&bytes[ID_AT]);
    HeaderKind::Kagi(FileHeader {
        format_version: bytes[15],
        page_size,
        reserve,
        database_id,
    })
}

#[cfg(test)]
mod tests;
