//! Unit tests of the layers over an in-memory file.

use super::*;
use crate::key::DatabaseKey;

/// A file in memory.
#[derive(Default)]
struct Mem(Vec<u8>);

impl RawFile for Mem {
    fn read_at(&mut self, buf: &mut [u8], off: u64) -> Result<ReadStatus, Rc> {
        let off = off as usize;
        let have = self.0.len().saturating_sub(off).min(buf.len());
        buf[..have].copy_from_slice(&self.0[off.min(self.0.len())..off.min(self.0.len()) + have]);
        buf[have..].fill(0);
        Ok(if have == buf.len() {
            ReadStatus::Full
        } else {
            ReadStatus::Short
        })
    }
    fn write_at(&mut self, buf: &[u8], off: u64) -> Result<(), Rc> {
        let end = off as usize + buf.len();
        if self.0.len() < end {
            self.0.resize(end, 0);
        }
        self.0[off as usize..end].copy_from_slice(buf);
        Ok(())
    }
    fn size(&mut self) -> Result<u64, Rc> {
        Ok(self.0.len() as u64)
    }
    fn truncate(&mut self, size: u64) -> Result<(), Rc> {
        self.0.resize(size as usize, 0);
        Ok(())
    }
}

/// A deterministic pseudo-random sequence (xorshift) for the tests' choices.
struct Rng(u64);

impl Rng {
    fn next(&mut self, bound: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % bound
    }
}

#[test]
fn temporary_files_behave_like_plain_files_at_any_offset() {
    let mut layer = Layer::temp(PageCipher::ephemeral().expect("cipher"));
    let mut raw = Mem::default();
    let mut model: Vec<u8> = Vec::new();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for step in 0..400 {
        let off = rng.next(40_000);
        let len = 1 + rng.next(9_000) as usize;
        match rng.next(10) {
            0..=4 => {
                let data: Vec<u8> = (0..len).map(|i| b'A' + ((i + step) % 26) as u8).collect();
                layer.write(&mut raw, &data, off).expect("write");
                let end = off as usize + len;
                if model.len() < end {
                    model.resize(end, 0);
                }
                model[off as usize..end].copy_from_slice(&data);
            }
            5..=8 => {
                let mut buf = vec![0xff; len];
                let status = layer.read(&mut raw, &mut buf, off).expect("read");
                let mut want = vec![0u8; len];
                let from = (off as usize).min(model.len());
                let have = (model.len() - from).min(len);
                want[..have].copy_from_slice(&model[from..from + have]);
                assert_eq!(buf, want, "step {step}");
                assert_eq!(status == ReadStatus::Full, have == len);
            }
            _ => {
                layer.truncate(&mut raw, off).expect("truncate");
                model.resize(off as usize, 0);
            }
        }
        assert_eq!(layer.size(&mut raw).expect("size"), model.len() as u64);
    }
    assert!(!raw.0.windows(12).any(|w| w == b"ABCDEFGHIJKL"));
}

fn entry(dir: &tempfile::TempDir) -> Arc<DbEntry> {
    let path = dir.path().join("db");
    crate::registry::acquire(&path, &DatabaseKey::new([3; 32], [4; 16]), true, true).expect("entry")
}

fn page(seed: u8) -> Vec<u8> {
    let mut p: Vec<u8> = (0..4096).map(|i| (i as u8).wrapping_mul(seed)).collect();
    p[4096 - RESERVE..].fill(0);
    p
}

fn header(pgno: u32, salts: [u8; 8], cksum: [u8; 8]) -> [u8; 24] {
    let mut h = [0u8; 24];
    h[..4].copy_from_slice(&pgno.to_be_bytes());
    h[8..16].copy_from_slice(&salts);
    h[16..].copy_from_slice(&cksum);
    h
}

#[test]
fn wal_frames_survive_sqlites_rewrites() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut wal = Layer::wal(entry(&dir));
    let mut raw = Mem::default();
    let mut wal_header = [0u8; 32];
    wal_header[8..12].copy_from_slice(&4096u32.to_be_bytes());
    wal.write(&mut raw, &wal_header, 0).expect("wal header");
    let frame = |i: u64| 32 + i * 4120;
    let salts = [1, 2, 3, 4, 5, 6, 7, 8];
    // Two frames, then an in-place rewrite of the first one's page, then frames written with zero
    // salts and checksums, then SQLite rewriting every header at commit.
    for (i, pgno) in [(0, 5), (1, 6)] {
        wal.write(&mut raw, &header(pgno, salts, [i as u8; 8]), frame(i))
            .expect("header");
        wal.write(&mut raw, &page(pgno as u8), frame(i) + 24)
            .expect("page");
    }
    wal.write(&mut raw, &page(50), frame(0) + 24)
        .expect("in place");
    wal.write(&mut raw, &header(7, [0; 8], [0; 8]), frame(2))
        .expect("zero header");
    wal.write(&mut raw, &page(7), frame(2) + 24).expect("page");
    for (i, pgno) in [(0, 5), (1, 6), (2, 7)] {
        wal.write(
            &mut raw,
            &header(pgno, salts, [0x40 + i as u8; 8]),
            frame(i),
        )
        .expect("rewrite");
    }
    assert!(
        !raw.0
            .windows(64)
            .any(|w| page(7).windows(64).any(|p| p == w))
    );
    for (i, pgno, content) in [(0, 5, page(50)), (1, 6, page(6)), (2, 7, page(7))] {
        let mut out = vec![0u8; 4096];
        wal.read(&mut raw, &mut out, frame(i) + 24)
            .expect("page read");
        assert_eq!(out, content);
        let mut whole = vec![0u8; 4120];
        wal.read(&mut raw, &mut whole, frame(i))
            .expect("frame read");
        assert_eq!(whole[..24], header(pgno, salts, [0x40 + i as u8; 8]));
        let mut cksum = [0u8; 8];
        wal.read(&mut raw, &mut cksum, frame(i) + 16)
            .expect("checksum read");
        assert_eq!(cksum, [0x40 + i as u8; 8]);
    }
    // A damaged frame reads as zeros when read whole (the end of the log), as an error otherwise.
    raw.0[frame(1) as usize + 100] ^= 1;
    let mut whole = vec![0xffu8; 4120];
    wal.read(&mut raw, &mut whole, frame(1))
        .expect("frame read");
    assert!(whole.iter().all(|&b| b == 0));
    let mut out = vec![0u8; 4096];
    assert_eq!(
        wal.read(&mut raw, &mut out, frame(1) + 24),
        Err(ffi::SQLITE_IOERR_DATA)
    );
}

#[test]
fn journal_records_seal_pages_and_mask_checksums() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut journal = Layer::journal(entry(&dir));
    let mut raw = Mem::default();
    let head = [0xd9u8; 512];
    journal.write(&mut raw, &head, 0).expect("header");
    let mut off = 512u64;
    for pgno in 2u32..6 {
        journal
            .write(&mut raw, &pgno.to_be_bytes(), off)
            .expect("pgno");
        journal
            .write(&mut raw, &page(pgno as u8), off + 4)
            .expect("page");
        journal
            .write(&mut raw, &(pgno * 1000).to_be_bytes(), off + 4100)
            .expect("cksum");
        off += 4104;
    }
    assert_eq!(raw.0[..512], head, "headers stay in the clear");
    let mut off = 512u64;
    for pgno in 2u32..6 {
        let mut n = [0u8; 4];
        journal.read(&mut raw, &mut n, off).expect("pgno");
        assert_eq!(u32::from_be_bytes(n), pgno);
        assert_ne!(
            raw.0[off as usize + 4100..off as usize + 4104],
            (pgno * 1000).to_be_bytes()
        );
        let mut p = vec![0u8; 4096];
        journal.read(&mut raw, &mut p, off + 4).expect("page");
        assert_eq!(p, page(pgno as u8));
        journal.read(&mut raw, &mut n, off + 4100).expect("cksum");
        assert_eq!(u32::from_be_bytes(n), pgno * 1000);
        off += 4104;
    }
}
