//! Byte layouts of the family header, segment header, record header and checkpoint (see
//! docs/DISK_FORMAT.md). All integers are little-endian except inside nonces.

use crate::error::{DiskError, Result};

/// Bytes in one block: the unit of encryption, of the index and of holes.
pub const BLOCK_SIZE: u64 = 4096;
/// Block size as a usize, for buffers.
pub(crate) const BS: usize = BLOCK_SIZE as usize;
/// AEAD tag length (AES-256-GCM and ChaCha20-Poly1305).
pub(crate) const TAG_LEN: usize = 16;
/// Segment files are reserved at this size and never grow beyond it.
pub(crate) const SEGMENT_SIZE: u64 = 64 << 20;
/// Length of the segment file header.
pub(crate) const SEG_HEADER_LEN: u64 = 64;
/// Length of a record header (40 bytes of fields and a 16-byte GMAC tag).
pub(crate) const REC_HEADER_LEN: usize = 56;
/// Length of the authenticated fields of a record header.
pub(crate) const REC_FIELDS_LEN: usize = 40;
/// At most this many blocks in one record (1 MiB of plaintext).
pub(crate) const MAX_RECORD_BLOCKS: usize = 256;
/// Blocks per index chunk (the copy-on-write unit shared between snapshots).
pub(crate) const CHUNK_BLOCKS: usize = 1024;
/// The nonce offset used by checkpoints: beyond every record offset (segments are < 4 GiB).
pub(crate) const CHECKPOINT_NONCE_OFFSET: u32 = u32::MAX;

pub(crate) const FAMILY_MAGIC: &[u8; 8] = b"KAGIDSK1";
pub(crate) const SEGMENT_MAGIC: &[u8; 8] = b"KAGISEG1";
pub(crate) const CHECKPOINT_MAGIC: &[u8; 8] = b"KAGICKP1";
pub(crate) const RECORD_MAGIC: &[u8; 4] = b"KDRC";
pub(crate) const VERSION: u32 = 1;
pub(crate) const FAMILY_HEADER_LEN: usize = 136;
pub(crate) const FAMILY_FIELDS_LEN: usize = 40;
pub(crate) const KEY_CHECK_LEN: usize = 32;
pub(crate) const CHECKPOINT_HEADER_LEN: usize = 56;

/// Record kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Blocks written to a volume.
    Data = 1,
    /// A range of a volume made a hole (trim, write-zeroes): no payload.
    Zero = 2,
    /// Blocks copied by compaction: replay ignores them (the checkpoint that follows points
    /// at them).
    Reloc = 3,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Kind> {
        match v {
            1 => Some(Kind::Data),
            2 => Some(Kind::Zero),
            3 => Some(Kind::Reloc),
            _ => None,
        }
    }
    /// Whether records of this kind carry block payloads.
    pub(crate) fn has_payload(self) -> bool {
        matches!(self, Kind::Data | Kind::Reloc)
    }
}

/// The fields of a record header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RecordHeader {
    pub kind: Kind,
    pub volume: u64,
    pub first_block: u64,
    pub count: u32,
    pub seq: u64,
}

impl RecordHeader {
    pub(crate) fn encode(&self) -> [u8; REC_FIELDS_LEN] {
        let mut b = [0u8; REC_FIELDS_LEN];
        b[0..4].copy_from_slice(RECORD_MAGIC);
        b[4] = self.kind as u8;
        b[8..16].copy_from_slice(&self.volume.to_le_bytes());
        b[16..24].copy_from_slice(&self.first_block.to_le_bytes());
        b[24..28].copy_from_slice(&self.count.to_le_bytes());
        b[32..40].copy_from_slice(&self.seq.to_le_bytes());
        b
    }

    /// Parses the fields (the tag is checked by the caller). `None` for anything that is not a
    /// well-formed header: a torn tail or zeros.
    pub(crate) fn decode(b: &[u8]) -> Option<RecordHeader> {
        let b = b.get(..REC_FIELDS_LEN)?;
        if &b[0..4] != RECORD_MAGIC || b[5..8] != [0, 0, 0] || b[28..32] != [0, 0, 0, 0] {
            return None;
        }
        let h = RecordHeader {
            kind: Kind::from_u8(b[4])?,
            volume: le64(&b[8..16]),
            first_block: le64(&b[16..24]),
            count: le32(&b[24..28]),
            seq: le64(&b[32..40]),
        };
        let max = if h.kind.has_payload() {
            MAX_RECORD_BLOCKS as u32
        } else {
            u32::MAX
        };
        (h.count >= 1 && h.count <= max).then_some(h)
    }

    /// Length of the whole record on disk.
    pub(crate) fn record_len(&self, block_ct_len: usize) -> u64 {
        let payload = if self.kind.has_payload() {
            self.count as u64 * block_ct_len as u64
        } else {
            0
        };
        REC_HEADER_LEN as u64 + payload
    }
}

pub(crate) fn le64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

pub(crate) fn le32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_le_bytes(a)
}

/// The segment file header: plaintext, checked against the file name and the family.
pub(crate) fn encode_segment_header(uid: &[u8; 16], no: u64, block_ct_len: usize) -> [u8; 64] {
    let mut b = [0u8; SEG_HEADER_LEN as usize];
    b[0..8].copy_from_slice(SEGMENT_MAGIC);
    b[8..12].copy_from_slice(&VERSION.to_le_bytes());
    b[12..16].copy_from_slice(&(block_ct_len as u32).to_le_bytes());
    b[16..32].copy_from_slice(uid);
    b[32..40].copy_from_slice(&no.to_le_bytes());
    b
}

/// The parsed family header.
pub(crate) struct FamilyHeader {
    pub uid: [u8; 16],
    pub inner_layer: bool,
    pub outer_check: [u8; KEY_CHECK_LEN + TAG_LEN],
    pub inner_check: [u8; KEY_CHECK_LEN + TAG_LEN],
}

impl FamilyHeader {
    /// The authenticated fields (bytes 0..40), also the key checks' associated data.
    pub(crate) fn fields(uid: &[u8; 16], inner_layer: bool) -> [u8; FAMILY_FIELDS_LEN] {
        let mut b = [0u8; FAMILY_FIELDS_LEN];
        b[0..8].copy_from_slice(FAMILY_MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&u32::from(inner_layer).to_le_bytes());
        b[16..32].copy_from_slice(uid);
        b[32..36].copy_from_slice(&(BLOCK_SIZE as u32).to_le_bytes());
        b
    }

    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(FAMILY_HEADER_LEN);
        b.extend_from_slice(&Self::fields(&self.uid, self.inner_layer));
        b.extend_from_slice(&self.outer_check);
        b.extend_from_slice(&self.inner_check);
        b
    }

    pub(crate) fn decode(b: &[u8]) -> Result<FamilyHeader> {
        let bad = |reason: &str| DiskError::CorruptMeta {
            file: "family",
            reason: reason.to_string(),
        };
        if b.len() != FAMILY_HEADER_LEN || &b[0..8] != FAMILY_MAGIC {
            return Err(bad("not a family header"));
        }
        if le32(&b[8..12]) != VERSION {
            return Err(bad("unknown version"));
        }
        let flags = le32(&b[12..16]);
        if flags > 1 || le32(&b[32..36]) != BLOCK_SIZE as u32 || le32(&b[36..40]) != 0 {
            return Err(bad("unknown flags or block size"));
        }
        let mut uid = [0u8; 16];
        uid.copy_from_slice(&b[16..32]);
        let mut outer_check = [0u8; KEY_CHECK_LEN + TAG_LEN];
        outer_check.copy_from_slice(&b[40..88]);
        let mut inner_check = [0u8; KEY_CHECK_LEN + TAG_LEN];
        inner_check.copy_from_slice(&b[88..136]);
        if flags == 0 && inner_check != [0u8; KEY_CHECK_LEN + TAG_LEN] {
            return Err(bad(
                "an inner key check in a family without the inner layer",
            ));
        }
        Ok(FamilyHeader {
            uid,
            inner_layer: flags == 1,
            outer_check,
            inner_check,
        })
    }
}

/// The checkpoint file's plaintext header (the body's associated data).
pub(crate) struct CheckpointHeader {
    pub uid: [u8; 16],
    pub ckpt_seg: u64,
    pub next_seg: u64,
    pub body_len: u64,
}

impl CheckpointHeader {
    pub(crate) fn encode(&self) -> [u8; CHECKPOINT_HEADER_LEN] {
        let mut b = [0u8; CHECKPOINT_HEADER_LEN];
        b[0..8].copy_from_slice(CHECKPOINT_MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[16..32].copy_from_slice(&self.uid);
        b[32..40].copy_from_slice(&self.ckpt_seg.to_le_bytes());
        b[40..48].copy_from_slice(&self.next_seg.to_le_bytes());
        b[48..56].copy_from_slice(&self.body_len.to_le_bytes());
        b
    }

    pub(crate) fn decode(b: &[u8]) -> Result<CheckpointHeader> {
        let bad = |reason: &str| DiskError::CorruptMeta {
            file: "checkpoint",
            reason: reason.to_string(),
        };
        if b.len() < CHECKPOINT_HEADER_LEN || &b[0..8] != CHECKPOINT_MAGIC {
            return Err(bad("not a checkpoint"));
        }
        if le32(&b[8..12]) != VERSION || le32(&b[12..16]) != 0 {
            return Err(bad("unknown version"));
        }
        let mut uid = [0u8; 16];
        uid.copy_from_slice(&b[16..32]);
        let h = CheckpointHeader {
            uid,
            ckpt_seg: le64(&b[32..40]),
            next_seg: le64(&b[40..48]),
            body_len: le64(&b[48..56]),
        };
        if h.body_len != (b.len() - CHECKPOINT_HEADER_LEN) as u64 {
            return Err(bad("length does not match the file"));
        }
        if h.ckpt_seg == 0 || h.next_seg <= h.ckpt_seg {
            return Err(bad("segment numbers out of order"));
        }
        Ok(h)
    }
}

/// A bounds-checked reader over a checkpoint body: every read fails cleanly at the end.
pub(crate) struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Cursor { buf, pos: 0 }
    }
    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|e| *e <= self.buf.len());
        let Some(end) = end else {
            return Err(DiskError::CorruptMeta {
                file: "checkpoint",
                reason: "truncated body".into(),
            });
        };
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    pub(crate) fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    pub(crate) fn u16(&mut self) -> Result<u16> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    pub(crate) fn u32(&mut self) -> Result<u32> {
        Ok(le32(self.take(4)?))
    }
    pub(crate) fn u64(&mut self) -> Result<u64> {
        Ok(le64(self.take(8)?))
    }
    pub(crate) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
}

/// Family and volume names: safe as a directory name and in logs.
pub(crate) fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(DiskError::InvalidName(name.chars().take(140).collect()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_header_round_trip_and_rejects_garbage() {
        let h = RecordHeader {
            kind: Kind::Data,
            volume: 7,
            first_block: 1 << 40,
            count: 256,
            seq: 99,
        };
        let b = h.encode();
        assert_eq!(RecordHeader::decode(&b), Some(h));
        assert_eq!(RecordHeader::decode(&[0u8; 40]), None);
        let mut too_many = h;
        too_many.count = 257;
        assert_eq!(RecordHeader::decode(&too_many.encode()), None);
        let mut zero = h;
        zero.count = 0;
        assert_eq!(RecordHeader::decode(&zero.encode()), None);
        assert_eq!(RecordHeader::decode(&b[..20]), None);
        assert_eq!(h.record_len(4112), 56 + 256 * 4112);
    }

    #[test]
    fn names() {
        assert!(check_name("disk-1_a.b").is_ok());
        for bad in ["", ".x", "a/b", "a b", "..", &"x".repeat(129)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn cursor_never_reads_past_end() {
        let mut c = Cursor::new(&[1, 2, 3]);
        assert_eq!(c.u16().unwrap(), 0x0201);
        assert!(c.u32().is_err());
        assert!(c.take(usize::MAX).is_err());
        assert_eq!(c.u8().unwrap(), 3);
    }
}
