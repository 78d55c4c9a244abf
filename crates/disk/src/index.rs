//! The in-memory index of a volume: block number → where its ciphertext is, in chunks of
//! [`CHUNK_BLOCKS`] entries that snapshots share copy-on-write (`Arc::make_mut`).

use std::sync::Arc;

use crate::format::CHUNK_BLOCKS;

/// One block's state. `seg == 0` means no data (a hole); `seq` is the family-wide sequence
/// number of the write or trim that produced this state (0: never written), so that an older
/// operation landing late, or replayed, never overrides a newer one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Entry {
    pub seg: u32,
    pub off: u32,
    pub seq: u64,
}

impl Entry {
    pub(crate) fn has_data(&self) -> bool {
        self.seg != 0
    }
    pub(crate) fn hole(seq: u64) -> Entry {
        Entry {
            seg: 0,
            off: 0,
            seq,
        }
    }
}

/// A chunk of entries.
#[derive(Clone)]
pub(crate) struct Chunk(pub [Entry; CHUNK_BLOCKS]);

impl Chunk {
    pub(crate) fn empty() -> Arc<Chunk> {
        Arc::new(Chunk([Entry::default(); CHUNK_BLOCKS]))
    }
}

/// A volume's size and map. `None` chunks were never written (all holes, seq 0).
#[derive(Clone)]
pub(crate) struct VolIndex {
    pub size: u64,
    pub chunks: Vec<Option<Arc<Chunk>>>,
}

pub(crate) fn chunks_for(size: u64) -> usize {
    let blocks = size / crate::format::BLOCK_SIZE;
    blocks.div_ceil(CHUNK_BLOCKS as u64) as usize
}

impl VolIndex {
    pub(crate) fn new(size: u64) -> VolIndex {
        VolIndex {
            size,
            chunks: vec![None; chunks_for(size)],
        }
    }

    pub(crate) fn blocks(&self) -> u64 {
        self.size / crate::format::BLOCK_SIZE
    }

    pub(crate) fn get(&self, block: u64) -> Entry {
        let (c, i) = split(block);
        match self.chunks.get(c) {
            Some(Some(chunk)) => chunk.0[i],
            _ => Entry::default(),
        }
    }

    /// Sets blocks `first..first+n` to `entry_of(i)` where the current state is older.
    /// Holes over never-written chunks leave them absent (they read the same). Blocks beyond
    /// the volume are ignored (a replayed record can never name them, but a file could).
    pub(crate) fn set_range(&mut self, first: u64, n: u64, entry_of: impl Fn(u64) -> Entry) {
        let end = first.saturating_add(n).min(self.blocks());
        let mut b = first;
        while b < end {
            let (c, i) = split(b);
            let in_chunk = ((CHUNK_BLOCKS - i) as u64).min(end - b);
            let slot = &mut self.chunks[c];
            let all_holes = (0..in_chunk).all(|k| !entry_of(b - first + k).has_data());
            if slot.is_none() && all_holes {
                b += in_chunk;
                continue;
            }
            let chunk = Arc::make_mut(slot.get_or_insert_with(Chunk::empty));
            for k in 0..in_chunk {
                let e = entry_of(b - first + k);
                let cur = &mut chunk.0[i + k as usize];
                if e.seq > cur.seq {
                    *cur = e;
                }
            }
            b += in_chunk;
        }
    }

    pub(crate) fn grow(&mut self, size: u64) {
        self.size = size;
        self.chunks.resize(chunks_for(size), None);
    }
}

fn split(block: u64) -> (usize, usize) {
    (
        (block / CHUNK_BLOCKS as u64) as usize,
        (block % CHUNK_BLOCKS as u64) as usize,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(seg: u32, off: u32, seq: u64) -> Entry {
        Entry { seg, off, seq }
    }

    #[test]
    fn newer_wins_and_snapshots_share_until_written() {
        let mut v = VolIndex::new(3 * CHUNK_BLOCKS as u64 * 4096);
        v.set_range(1020, 10, |k| data(1, k as u32, 5));
        assert_eq!(v.get(1025), data(1, 5, 5));
        v.set_range(1025, 1, |_| data(2, 0, 4));
        assert_eq!(v.get(1025), data(1, 5, 5), "older write must not win");
        let snap = v.clone();
        assert!(Arc::ptr_eq(
            snap.chunks[1].as_ref().unwrap(),
            v.chunks[1].as_ref().unwrap()
        ));
        v.set_range(1025, 1, |_| Entry::hole(6));
        assert!(!v.get(1025).has_data());
        assert_eq!(snap.get(1025), data(1, 5, 5));
        assert!(Arc::ptr_eq(
            snap.chunks[0].as_ref().unwrap(),
            v.chunks[0].as_ref().unwrap()
        ));
        v.set_range(2 * 1024, 1024, |_| Entry::hole(7));
        assert!(v.chunks[2].is_none());
        v.set_range(3 * 1024 - 1, 100, |_| data(3, 0, 8));
        assert_eq!(v.get(3 * 1024 - 1), data(3, 0, 8));
        assert_eq!(v.get(3 * 1024), Entry::default());
    }
}
