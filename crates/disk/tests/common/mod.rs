//! Helpers shared by the integration tests.
#![allow(dead_code, clippy::unwrap_used)]

use kagi_disk::{DiskStore, Family, FamilyKeys};
use zeroize::Zeroizing;

pub const MIB: u64 = 1 << 20;

pub fn keys(k: u8) -> FamilyKeys {
    FamilyKeys::new(Zeroizing::new([k; 32]))
}

pub fn keys_inner(k: u8, i: u8) -> FamilyKeys {
    FamilyKeys::with_inner(Zeroizing::new([k; 32]), Zeroizing::new([i; 32]))
}

/// Deterministic bytes that depend on position and a seed (so misplaced data shows).
pub fn pattern(seed: u64, offset: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| {
            let x = (offset + i).wrapping_mul(0x9e37_79b9_7f4a_7c15)
                ^ seed.wrapping_mul(0xff51_afd7_ed55_8ccd);
            (x >> 29) as u8
        })
        .collect()
}

pub fn store() -> (tempfile::TempDir, DiskStore) {
    let dir = tempfile::tempdir().unwrap();
    let s = DiskStore::open(dir.path()).unwrap();
    (dir, s)
}

pub fn family(s: &DiskStore, inner: bool) -> Family {
    if inner {
        s.create_family("fam", keys_inner(1, 2), true).unwrap()
    } else {
        s.create_family("fam", keys(1), false).unwrap()
    }
}
