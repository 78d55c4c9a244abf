//! Keys, authentication of every block, and no plaintext or key on disk.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};

use common::*;
use kagi_disk::{DiskError, DiskStore, FamilyKeys};
use zeroize::Zeroizing;

fn all_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            all_files(&p, out);
        } else {
            out.push(p);
        }
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// The highest-numbered segment file of at least `min_len` bytes.
fn last_segment(root: &Path, fam: &str, min_len: u64) -> PathBuf {
    let mut segs: Vec<PathBuf> = std::fs::read_dir(root.join(fam).join("segments"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| std::fs::metadata(p).unwrap().len() >= min_len)
        .collect();
    segs.sort();
    segs.pop().unwrap()
}

/// Copies the ciphertext of the block at `from` in `src` over the one at `to` in `dst`.
fn copy_block(src: &Path, from: u64, dst: &Path, to: u64) {
    let block = std::fs::read(src).unwrap()[from as usize..from as usize + 4112].to_vec();
    let mut bytes = std::fs::read(dst).unwrap();
    bytes[to as usize..to as usize + 4112].copy_from_slice(&block);
    std::fs::write(dst, &bytes).unwrap();
}

#[test]
fn no_plaintext_or_key_reaches_the_directory() {
    for inner in [false, true] {
        let (d, s) = store();
        let dek: [u8; 32] = std::array::from_fn(|i| 0xa0 ^ i as u8);
        let ik: [u8; 32] = std::array::from_fn(|i| 0x50 ^ (i as u8 * 3));
        let k = || {
            if inner {
                FamilyKeys::with_inner(Zeroizing::new(dek), Zeroizing::new(ik))
            } else {
                FamilyKeys::new(Zeroizing::new(dek))
            }
        };
        let f = s.create_family("fam", k(), inner).unwrap();
        let v = f.create_volume("d", 8 * MIB).unwrap();
        let marker = b"KAGI-PLAINTEXT-MARKER-0123456789";
        let data: Vec<u8> = marker
            .iter()
            .cycle()
            .take(3 * MIB as usize)
            .copied()
            .collect();
        v.write(0, &data, false).unwrap();
        v.write(5 * MIB + 77, &data[..100_000], true).unwrap();
        f.snapshot("d", "s").unwrap();
        v.write(0, &vec![0x41; 500_000], false).unwrap();
        f.gc(0.0).unwrap();
        f.flush().unwrap();
        // Open (log not yet checkpointed) and closed states both.
        for round in 0..2 {
            let mut files = Vec::new();
            all_files(d.path(), &mut files);
            assert!(files.len() > 3);
            for p in &files {
                let bytes = std::fs::read(p).unwrap();
                assert!(!contains(&bytes, &marker[..16]), "plaintext in {p:?}");
                assert!(!contains(&bytes, &[0x41; 32]), "plaintext in {p:?}");
                assert!(!contains(&bytes, &dek[..16]), "data key in {p:?}");
                assert!(!contains(&bytes, &ik[..16]), "inner key in {p:?}");
            }
            if round == 0 {
                drop((v.clone(), f.clone()));
            }
        }
        drop((v, f));
        let f = s.open_family("fam", k()).unwrap();
        let mut b = vec![0u8; 32];
        f.volume("s").unwrap().read(0, &mut b).unwrap();
        assert_eq!(&b, marker);
    }
}

#[test]
fn wrong_keys_are_refused() {
    let (_d, s) = store();
    drop(s.create_family("plain", keys(1), false).unwrap());
    drop(s.create_family("double", keys_inner(1, 2), true).unwrap());
    assert!(matches!(
        s.open_family("plain", keys(2)),
        Err(DiskError::WrongKey)
    ));
    assert!(matches!(
        s.open_family("plain", keys_inner(1, 2)),
        Err(DiskError::InnerKey(_))
    ));
    assert!(matches!(
        s.open_family("double", keys(1)),
        Err(DiskError::InnerKey(_))
    ));
    assert!(matches!(
        s.open_family("double", keys_inner(1, 3)),
        Err(DiskError::WrongKey)
    ));
    assert!(matches!(
        s.open_family("double", keys_inner(9, 2)),
        Err(DiskError::WrongKey)
    ));
    assert!(matches!(
        s.create_family("x", keys(1), true),
        Err(DiskError::InnerKey(_))
    ));
    s.open_family("plain", keys(1)).unwrap();
    let f = s.open_family("double", keys_inner(1, 2)).unwrap();
    assert!(f.has_inner_layer());
    // Opening an already open family checks the keys too.
    assert!(matches!(
        s.open_family("double", keys_inner(1, 3)),
        Err(DiskError::WrongKey)
    ));
}

#[test]
fn locked_family_refuses_io_and_unlock_restores() {
    let (_d, s) = store();
    let f = family(&s, true);
    let v = f.create_volume("d", MIB).unwrap();
    v.write(100, b"before the revocation", false).unwrap();
    f.lock();
    assert!(f.is_locked());
    let mut b = [0u8; 21];
    assert!(matches!(v.read(100, &mut b), Err(DiskError::Locked)));
    assert!(matches!(v.write(0, &b, false), Err(DiskError::Locked)));
    assert!(matches!(v.trim(0, 4096, false), Err(DiskError::Locked)));
    assert!(matches!(
        v.write_zeroes(0, 4096, false),
        Err(DiskError::Locked)
    ));
    assert!(matches!(v.extents(0, 4096), Err(DiskError::Locked)));
    assert!(matches!(v.flush(), Err(DiskError::Locked)));
    assert!(matches!(f.snapshot("d", "s"), Err(DiskError::Locked)));
    assert!(matches!(f.create_volume("e", 4096), Err(DiskError::Locked)));
    assert!(matches!(
        f.unlock(keys_inner(1, 3)),
        Err(DiskError::WrongKey)
    ));
    assert!(f.is_locked());
    f.unlock(keys_inner(1, 2)).unwrap();
    v.read(100, &mut b).unwrap();
    assert_eq!(&b, b"before the revocation");
    v.write(0, b"after", true).unwrap();
    // Locked at close: no checkpoint, the next open replays the log: nothing lost.
    f.lock();
    drop((v, f));
    let f = s.open_family("fam", keys_inner(1, 2)).unwrap();
    let v = f.volume("d").unwrap();
    v.read(100, &mut b).unwrap();
    assert_eq!(&b, b"before the revocation");
    let mut a = [0u8; 5];
    v.read(0, &mut a).unwrap();
    assert_eq!(&a, b"after");
}

/// Writes block 0 and block 1 in two records of one segment, closes, and returns the
/// segment's path and the ciphertext offsets of the two blocks.
fn two_blocks(s: &DiskStore, fam: &str, k: FamilyKeys) -> (PathBuf, u64, u64) {
    let f = s.create_family(fam, k, false).unwrap();
    let v = f.create_volume("d", MIB).unwrap();
    v.write(0, &[0xaa; 4096], false).unwrap();
    v.write(4096, &[0xbb; 4096], false).unwrap();
    f.lock(); // keep the log as written (no checkpoint rotation at close)
    drop((v, f));
    let seg = last_segment(s.root(), fam, 65);
    // Segment header 64, record header 56, block 4096 + tag 16.
    (seg, 64 + 56, 64 + 56 + 4112 + 56)
}

#[test]
fn a_block_moved_to_another_address_or_family_fails() {
    let (_d, s) = store();
    let (seg, b0, b1) = two_blocks(&s, "a", keys(1));
    copy_block(&seg, b0, &seg, b1);
    // Replay at open verifies the log after the checkpoint: the forged record is cut off
    // there (block 1 becomes a hole, never block 0's content).
    let f = s.open_family("a", keys(1)).unwrap();
    let v = f.volume("d").unwrap();
    let mut b = vec![0u8; 8192];
    v.read(0, &mut b).unwrap();
    assert!(b[..4096].iter().all(|x| *x == 0xaa));
    assert!(
        b[4096..].iter().all(|x| *x == 0),
        "the moved block must not read as data"
    );
    drop((v, f));

    // After a checkpoint the index is trusted and the read itself must catch it.
    let (_d2, s) = store();
    let f = s.create_family("b", keys(1), false).unwrap();
    let v = f.create_volume("d", MIB).unwrap();
    v.write(0, &[0xaa; 4096], false).unwrap();
    v.write(4096, &[0xbb; 4096], false).unwrap();
    drop((v, f)); // checkpoint at close
    let seg = last_segment(s.root(), "b", 64 + 2 * (56 + 4112));
    copy_block(&seg, b0, &seg, b1);
    let f = s.open_family("b", keys(1)).unwrap();
    let v = f.volume("d").unwrap();
    let mut b = vec![0u8; 4096];
    v.read(0, &mut b).unwrap();
    assert!(matches!(
        v.read(4096, &mut b),
        Err(DiskError::Corrupt { .. })
    ));
    assert!(matches!(
        v.read(4000, &mut b),
        Err(DiskError::Corrupt { .. })
    ));
    // A sub-block write needs the old block: refused too, nothing written.
    assert!(matches!(
        v.write(4097, &[1], false),
        Err(DiskError::Corrupt { .. })
    ));
    // A whole-block write replaces it.
    v.write(4096, &[0xcc; 4096], false).unwrap();
    v.read(4096, &mut b).unwrap();
    assert!(b.iter().all(|x| *x == 0xcc));
    drop((v, f));

    // Same key, same positions, another family: the family id in the associated data
    // refuses it.
    let (_d3, s) = store();
    for fam in ["x", "y"] {
        let f = s.create_family(fam, keys(1), false).unwrap();
        let v = f.create_volume("d", MIB).unwrap();
        v.write(0, &[if fam == "x" { 0x11 } else { 0x22 }; 4096], false)
            .unwrap();
        drop((v, f));
    }
    let find = |fam: &str| last_segment(s.root(), fam, 64 + 56 + 4112);
    let (sx, sy) = (find("x"), find("y"));
    assert_eq!(
        sx.file_name(),
        sy.file_name(),
        "same operations, same segment numbers"
    );
    copy_block(&sx, b0, &sy, b0);
    let f = s.open_family("y", keys(1)).unwrap();
    let mut b = vec![0u8; 4096];
    assert!(matches!(
        f.volume("d").unwrap().read(0, &mut b),
        Err(DiskError::Corrupt { .. })
    ));
}

#[test]
fn damaged_metadata_never_panics() {
    let (_d, s) = store();
    let f = family(&s, false);
    let v = f.create_volume("d", MIB).unwrap();
    v.write(0, &pattern(1, 0, 100_000), false).unwrap();
    f.snapshot("d", "s").unwrap();
    drop((v, f));
    let dir = s.root().join("fam");
    for name in ["checkpoint", "family"] {
        let p = dir.join(name);
        let orig = std::fs::read(&p).unwrap();
        let positions: Vec<usize> = (0..orig.len())
            .step_by(orig.len() / 40 + 1)
            .chain([orig.len() - 1])
            .collect();
        for pos in positions {
            let mut bad = orig.clone();
            bad[pos] ^= 0x40;
            std::fs::write(&p, &bad).unwrap();
            match s.open_family("fam", keys(1)) {
                Err(DiskError::CorruptMeta { .. }) | Err(DiskError::WrongKey) => {}
                Err(e) => panic!("{name}@{pos}: unexpected {e}"),
                Ok(_) => panic!("{name}@{pos}: damage not detected"),
            }
        }
        for len in [0, 10, orig.len() / 2] {
            std::fs::write(&p, &orig[..len]).unwrap();
            assert!(s.open_family("fam", keys(1)).is_err());
        }
        std::fs::write(&p, &orig).unwrap();
    }
    s.open_family("fam", keys(1)).unwrap();
}
