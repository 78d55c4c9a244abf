//! Volume I/O: reads, writes (whole blocks, read-modify-write of partial ones), holes, block
//! status.

use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::crypto::Cipher;
use crate::error::{DiskError, Result};
use crate::family::{Inner, RecordBuf, Vol};
use crate::format::{BLOCK_SIZE, BS, CHUNK_BLOCKS, Kind, MAX_RECORD_BLOCKS};
use crate::index::Entry;
use crate::segment::Segment;
use crate::{lock, read, write};

/// A disk or snapshot of a family. Cheap to clone; every method takes `&self` and may be
/// called from many threads at once (several NBD connections on one volume).
#[derive(Clone)]
pub struct Volume {
    pub(crate) fam: Arc<Inner>,
    pub(crate) vol: Arc<Vol>,
}

/// What a byte range holds, as NBD block status reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExtentKind {
    /// Stored data (which may happen to be zeros).
    Data,
    /// Never written, trimmed or zeroed: not stored, reads as zeros (NBD `HOLE | ZERO`).
    Hole,
}

/// A run of bytes of one kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// First byte.
    pub offset: u64,
    /// Length in bytes.
    pub length: u64,
    /// Data or hole.
    pub kind: ExtentKind,
}

/// Where a write landed: the segment and its record's end (what FUA syncs).
type Landed = (Arc<Segment>, u64);

impl Volume {
    /// The volume's id.
    pub fn id(&self) -> &str {
        &self.vol.id
    }

    /// Size in bytes (a multiple of 4096).
    pub fn size(&self) -> u64 {
        read(&self.vol.index).size
    }

    /// Whether this is a snapshot (read-only).
    pub fn is_read_only(&self) -> bool {
        self.vol.read_only
    }

    /// The family's keys, if the volume still exists and the family is unlocked.
    fn live(&self) -> Result<Arc<Cipher>> {
        if self.vol.deleted.load(Ordering::Acquire) {
            return Err(DiskError::NotFound(format!("volume {}", self.vol.id)));
        }
        self.fam.cipher()
    }

    fn writable(&self) -> Result<Arc<Cipher>> {
        let c = self.live()?;
        if self.vol.read_only {
            return Err(DiskError::ReadOnly);
        }
        self.fam.check_ok()?;
        Ok(c)
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        let size = self.size();
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(DiskError::OutOfRange { offset, len, size }),
        }
    }

    /// Reads `buf.len()` bytes at `offset` (any alignment). Holes read as zeros.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let cipher = self.live()?;
        self.check_range(offset, buf.len() as u64)?;
        self.read_unchecked(&cipher, offset, buf)
    }

    /// Reads `len` bytes at `offset` into a new vector. Unlike [`Self::read`] into a zeroed
    /// buffer, every byte is written once: no buffer is zero-filled first (that memset was a
    /// tenth of a sequential read's CPU).
    pub fn read_vec(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
        let cipher = self.live()?;
        self.check_range(offset, len as u64)?;
        let mut out = Vec::with_capacity(len);
        self.read_into(&cipher, offset, len, &mut out)?;
        Ok(out)
    }

    fn read_unchecked(&self, cipher: &Cipher, offset: u64, buf: &mut [u8]) -> Result<()> {
        let len = buf.len();
        self.read_into(cipher, offset, len, &mut SliceSink { buf, at: 0 })
    }

    /// The read itself: the `len` bytes at `offset` go to `out` in order, a block's portion
    /// at a time.
    fn read_into(
        &self,
        cipher: &Cipher,
        offset: u64,
        len: usize,
        out: &mut dyn ReadSink,
    ) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let end = offset + len as u64;
        let first = offset / BLOCK_SIZE;
        let last = (end - 1) / BLOCK_SIZE;
        // Segments are looked up under the index lock: compaction deletes a file only after it
        // moved every entry away under this lock, and an open file stays readable.
        let (entries, segs) = {
            let idx = read(&self.vol.index);
            let entries: Vec<Entry> = (first..=last).map(|b| idx.get(b)).collect();
            let mut segs: HashMap<u32, Arc<Segment>> = HashMap::new();
            for e in entries.iter().filter(|e| e.has_data()) {
                if let std::collections::hash_map::Entry::Vacant(v) = segs.entry(e.seg) {
                    let s = self.fam.segment(e.seg as u64).ok_or(DiskError::Corrupt {
                        segment: e.seg as u64,
                        offset: e.off as u64,
                    })?;
                    v.insert(s);
                }
            }
            (entries, segs)
        };
        let ct = self.fam.ct_len;
        with_scratch(entries.len() * ct, |scratch| {
            let mut i = 0;
            while i < entries.len() {
                let e = entries[i];
                if !e.has_data() {
                    let (dst, _) = portion(first + i as u64, offset, end);
                    out.zeros(dst.len());
                    i += 1;
                    continue;
                }
                // Blocks written by one record lie back to back: one pread for the run.
                let mut j = i + 1;
                while j < entries.len()
                    && entries[j].seg == e.seg
                    && entries[j].has_data()
                    && entries[j].off as u64 == entries[j - 1].off as u64 + ct as u64
                {
                    j += 1;
                }
                let seg = &segs[&e.seg];
                let run = &mut scratch[..(j - i) * ct];
                seg.file.read_exact_at(run, e.off as u64).map_err(|err| {
                    if err.kind() == std::io::ErrorKind::UnexpectedEof {
                        DiskError::Corrupt {
                            segment: e.seg as u64,
                            offset: e.off as u64,
                        }
                    } else {
                        err.into()
                    }
                })?;
                for (k, slot) in run.chunks_exact_mut(ct).enumerate() {
                    let block = first + (i + k) as u64;
                    let at = e.off + (k * ct) as u32;
                    cipher.open_block(e.seg as u64, at, block, slot)?;
                    let (_, src) = portion(block, offset, end);
                    out.bytes(&slot[src]);
                }
                i = j;
            }
            Ok(())
        })
    }

    /// Writes `data` at `offset` (any alignment; partial blocks are read, patched and
    /// rewritten whole). With `fua` it returns only once the data is durable.
    pub fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        let cipher = self.writable()?;
        self.check_range(offset, data.len() as u64)?;
        if data.is_empty() {
            return if fua { self.fam.flush() } else { Ok(()) };
        }
        let end = offset + data.len() as u64;
        let first = offset / BLOCK_SIZE;
        let last = (end - 1) / BLOCK_SIZE;
        let partial = |b: u64| b * BLOCK_SIZE < offset || (b + 1) * BLOCK_SIZE > end;
        // Two writes to different sectors of one block must not lose each other's bytes:
        // read-modify-write holds the block's stripe lock.
        let mut stripes: Vec<&std::sync::Mutex<()>> = [first, last]
            .iter()
            .filter(|b| partial(**b))
            .map(|b| self.fam.stripe(self.vol.number, *b))
            .collect();
        stripes.dedup_by(|a, b| std::ptr::eq(*a, *b));
        if stripes.len() == 2
            && (stripes[0] as *const _ as usize) > (stripes[1] as *const _ as usize)
        {
            stripes.swap(0, 1);
        }
        let _guards: Vec<_> = stripes.iter().map(|m| lock(m)).collect();
        let ct = self.fam.ct_len;
        let mut landed = Vec::new();
        let mut b = first;
        while b <= last {
            let n = ((last - b + 1) as usize).min(MAX_RECORD_BLOCKS);
            let mut rec = RecordBuf::with_capacity(n, ct);
            for k in 0..n {
                let block = b + k as u64;
                let (dst, src) = portion(block, offset, end);
                if partial(block) {
                    let mut plain = [0u8; BS];
                    self.read_unchecked(&cipher, block * BLOCK_SIZE, &mut plain)?;
                    plain[src].copy_from_slice(&data[dst]);
                    rec.push_plain(&plain);
                } else {
                    rec.push_plain(&data[dst]);
                }
            }
            landed.push(self.append_data(&cipher, b, n, &mut rec)?);
            b += n as u64;
        }
        drop(_guards);
        self.finish(&cipher, fua, landed)
    }

    /// Writes `data` at `offset`, leaving out its all-zero 4 KiB blocks: for filling a range
    /// that is still holes (a copy or an import into a new volume), where a zero block needs
    /// no record. Not durable until a flush.
    pub fn write_over_holes(&self, offset: u64, data: &[u8]) -> Result<()> {
        let mut i = 0;
        while i < data.len() {
            let is_zero = |j: usize| data[j..(j + BS).min(data.len())].iter().all(|b| *b == 0);
            if is_zero(i) {
                i += BS;
                continue;
            }
            let mut j = i + BS;
            while j < data.len() && !is_zero(j) {
                j += BS;
            }
            let j = j.min(data.len());
            self.write(offset + i as u64, &data[i..j], false)?;
            i = j;
        }
        Ok(())
    }

    fn append_data(
        &self,
        cipher: &Cipher,
        first: u64,
        n: usize,
        rec: &mut RecordBuf,
    ) -> Result<Landed> {
        let vol = &self.vol;
        let ct = self.fam.ct_len as u64;
        self.fam.append(
            cipher,
            Kind::Data,
            vol.number,
            first,
            n as u32,
            Some(rec),
            |seg, at, seq| {
                write(&vol.index).set_range(first, n as u64, |k| Entry {
                    seg: seg as u32,
                    off: (at + k * ct) as u32,
                    seq,
                })
            },
        )
    }

    /// After writes: FUA syncs, and an automatic checkpoint when enough log accumulated.
    fn finish(&self, cipher: &Cipher, fua: bool, landed: Vec<Landed>) -> Result<()> {
        if fua {
            for (seg, end) in &landed {
                self.fam.sync_record(seg, *end)?;
            }
        }
        if let Err(e) = self.fam.maybe_checkpoint(cipher) {
            // The write itself is done; the next one tries the checkpoint again.
            tracing::warn!(family = %self.fam.id, error = %e, "automatic checkpoint failed");
        }
        Ok(())
    }

    /// Makes whole blocks `first..end` holes.
    fn punch(&self, cipher: &Cipher, first: u64, end: u64) -> Result<Vec<Landed>> {
        let vol = &self.vol;
        let mut landed = Vec::new();
        let mut b = first;
        while b < end {
            let n = (end - b).min(u32::MAX as u64);
            landed.push(self.fam.append(
                cipher,
                Kind::Zero,
                vol.number,
                b,
                n as u32,
                None,
                |_, _, seq| write(&vol.index).set_range(b, n, |_| Entry::hole(seq)),
            )?);
            b += n;
        }
        Ok(landed)
    }

    /// Discards the whole blocks inside the range (they become holes and read as zeros);
    /// the partial blocks at its edges are left as they are (NBD TRIM is advisory).
    pub fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        let cipher = self.writable()?;
        self.check_range(offset, len)?;
        let first = offset.div_ceil(BLOCK_SIZE);
        let end = (offset + len) / BLOCK_SIZE;
        let landed = if first < end {
            self.punch(&cipher, first, end)?
        } else {
            Vec::new()
        };
        self.finish(&cipher, fua, landed)
    }

    /// Makes the range read as zeros: whole blocks become holes, partial edge blocks are
    /// rewritten with zeros.
    pub fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        let cipher = self.writable()?;
        self.check_range(offset, len)?;
        let end = offset + len;
        let first = offset.div_ceil(BLOCK_SIZE);
        let last = end / BLOCK_SIZE;
        if first >= last {
            // No whole block: at most two partial ones.
            return self.write(offset, &vec![0u8; len as usize], fua);
        }
        let zeros = [0u8; BS];
        let head = first * BLOCK_SIZE - offset;
        if head > 0 {
            self.write(offset, &zeros[..head as usize], false)?;
        }
        let tail = end - last * BLOCK_SIZE;
        if tail > 0 {
            self.write(last * BLOCK_SIZE, &zeros[..tail as usize], false)?;
        }
        let landed = self.punch(&cipher, first, last)?;
        if fua && (head > 0 || tail > 0) {
            return self.fam.flush();
        }
        self.finish(&cipher, fua, landed)
    }

    /// Data and holes of the range, in order, covering it exactly (block granularity,
    /// clipped to the range).
    pub fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.live()?;
        self.check_range(offset, len)?;
        let mut out: Vec<Extent> = Vec::new();
        if len == 0 {
            return Ok(out);
        }
        let end = offset + len;
        let mut push = |lo: u64, hi: u64, kind: ExtentKind| match out.last_mut() {
            Some(x) if x.kind == kind && x.offset + x.length == lo => x.length += hi - lo,
            _ => out.push(Extent {
                offset: lo,
                length: hi - lo,
                kind,
            }),
        };
        let idx = read(&self.vol.index);
        let mut b = offset / BLOCK_SIZE;
        let last = (end - 1) / BLOCK_SIZE;
        while b <= last {
            let ci = (b / CHUNK_BLOCKS as u64) as usize;
            if matches!(idx.chunks.get(ci), Some(None) | None) {
                // A never-written chunk: one hole to its end.
                let next = ((ci as u64 + 1) * CHUNK_BLOCKS as u64).min(last + 1);
                push(
                    (b * BLOCK_SIZE).max(offset),
                    (next * BLOCK_SIZE).min(end),
                    ExtentKind::Hole,
                );
                b = next;
                continue;
            }
            let kind = if idx.get(b).has_data() {
                ExtentKind::Data
            } else {
                ExtentKind::Hole
            };
            push(
                (b * BLOCK_SIZE).max(offset),
                ((b + 1) * BLOCK_SIZE).min(end),
                kind,
            );
            b += 1;
        }
        Ok(out)
    }

    /// Makes every write acknowledged before the call durable, on every handle and
    /// connection of the family (so NBD can advertise CAN_MULTI_CONN).
    pub fn flush(&self) -> Result<()> {
        self.live()?;
        self.fam.flush()
    }
}

/// For block `block` and the request `offset..end`: the range in the request's buffer and the
/// range in the block that overlap.
/// Where a read's bytes go, in order.
trait ReadSink {
    /// `n` zero bytes (a hole).
    fn zeros(&mut self, n: usize);
    /// Plaintext.
    fn bytes(&mut self, b: &[u8]);
}

/// A caller's buffer, filled from the start.
struct SliceSink<'a> {
    buf: &'a mut [u8],
    at: usize,
}

impl ReadSink for SliceSink<'_> {
    fn zeros(&mut self, n: usize) {
        self.buf[self.at..self.at + n].fill(0);
        self.at += n;
    }
    fn bytes(&mut self, b: &[u8]) {
        self.buf[self.at..self.at + b.len()].copy_from_slice(b);
        self.at += b.len();
    }
}

impl ReadSink for Vec<u8> {
    fn zeros(&mut self, n: usize) {
        self.resize(self.len() + n, 0);
    }
    fn bytes(&mut self, b: &[u8]) {
        self.extend_from_slice(b);
    }
}

/// Largest ciphertext buffer a thread keeps between reads (a 1 MiB request needs a little
/// more than 1 MiB).
const KEPT_SCRATCH: usize = 4 << 20;

thread_local! {
    /// Each I/O thread's ciphertext buffer, kept so that a read does not allocate and zero
    /// one every time. It only ever holds ciphertext.
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` with a buffer of at least `len` bytes: this thread's kept one when it is free
/// and large enough to be worth keeping, else a new one.
fn with_scratch<T>(len: usize, f: impl FnOnce(&mut [u8]) -> T) -> T {
    if len <= KEPT_SCRATCH {
        let kept = SCRATCH.with(|s| s.try_borrow_mut().ok().map(|mut v| std::mem::take(&mut *v)));
        if let Some(mut v) = kept {
            if v.len() < len {
                v.resize(len, 0);
            }
            let r = f(&mut v[..len]);
            SCRATCH.with(|s| {
                if let Ok(mut slot) = s.try_borrow_mut() {
                    *slot = v;
                }
            });
            return r;
        }
    }
    f(&mut vec![0u8; len])
}

fn portion(block: u64, offset: u64, end: u64) -> (std::ops::Range<usize>, std::ops::Range<usize>) {
    let bs = block * BLOCK_SIZE;
    let lo = offset.max(bs);
    let hi = end.min(bs + BLOCK_SIZE);
    (
        (lo - offset) as usize..(hi - offset) as usize,
        (lo - bs) as usize..(hi - bs) as usize,
    )
}
