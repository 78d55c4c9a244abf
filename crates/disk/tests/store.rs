//! Round trips, holes, snapshots, compaction and concurrency.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use kagi_disk::{DiskError, DiskStore, Extent, ExtentKind, copy_volume, import_volume};

/// A plain model of a volume to compare against.
struct Model(Vec<u8>);

impl Model {
    fn write(&mut self, off: u64, data: &[u8]) {
        self.0[off as usize..off as usize + data.len()].copy_from_slice(data);
    }
}

fn check(v: &kagi_disk::Volume, m: &Model) {
    let mut got = vec![0xeeu8; m.0.len()];
    v.read(0, &mut got).unwrap();
    assert!(got == m.0, "volume differs from the model");
    // read_vec fills a new vector without zeroing it first: same bytes, holes included, at
    // any alignment.
    let len = m.0.len();
    for (off, n) in [
        (0, len),
        (1, len - 1),
        (4095, 8193.min(len - 4095)),
        (len - 1, 1),
    ] {
        let got = v.read_vec(off as u64, n).unwrap();
        assert!(
            got == m.0[off..off + n],
            "read_vec({off}, {n}) differs from the model"
        );
    }
}

#[test]
fn round_trips_at_odd_offsets_and_lengths_both_layers() {
    for inner in [false, true] {
        let (_d, s) = store();
        let f = family(&s, inner);
        let size = 2 * MIB;
        let v = f.create_volume("d", size).unwrap();
        let mut m = Model(vec![0; size as usize]);
        let cases: &[(u64, usize)] = &[
            (0, 1),
            (1, 4095),
            (4095, 2),
            (4096, 4096),
            (5000, 10000),
            (511, 512),
            (100_000, 300_000),
            (size - 3, 3),
            (12345, 1_100_000),
            (8192, 0),
        ];
        for (i, (off, len)) in cases.iter().enumerate() {
            let data = pattern(i as u64 + 1, *off, *len);
            v.write(*off, &data, i % 2 == 0).unwrap();
            m.write(*off, &data);
            // Odd reads too.
            let mut part = vec![0u8; *len];
            v.read(*off, &mut part).unwrap();
            assert_eq!(part, data);
        }
        check(&v, &m);
        drop((v, f));
        // Again after a reopen (checkpoint on close).
        let f = s
            .open_family("fam", if inner { keys_inner(1, 2) } else { keys(1) })
            .unwrap();
        check(&f.volume("d").unwrap(), &m);
    }
}

#[test]
fn out_of_range_and_sizes_refused() {
    let (_d, s) = store();
    let f = family(&s, false);
    assert!(matches!(
        f.create_volume("x", 1000),
        Err(DiskError::InvalidSize { .. })
    ));
    assert!(matches!(
        f.create_volume("bad/name", 4096),
        Err(DiskError::InvalidName(_))
    ));
    let v = f.create_volume("d", 8192).unwrap();
    assert!(matches!(
        f.create_volume("d", 8192),
        Err(DiskError::AlreadyExists(_))
    ));
    let mut b = [0u8; 2];
    assert!(matches!(
        v.read(8191, &mut b),
        Err(DiskError::OutOfRange { .. })
    ));
    assert!(matches!(
        v.write(u64::MAX, &b, false),
        Err(DiskError::OutOfRange { .. })
    ));
    assert!(matches!(
        v.trim(0, 8193, false),
        Err(DiskError::OutOfRange { .. })
    ));
    assert!(matches!(
        v.extents(8192, 1),
        Err(DiskError::OutOfRange { .. })
    ));
    assert!(matches!(
        f.resize_volume("d", 4096),
        Err(DiskError::InvalidSize { .. })
    ));
    f.resize_volume("d", 3 * 4096).unwrap();
    assert_eq!(v.size(), 3 * 4096);
    v.write(8192, &[7; 4096], false).unwrap();
    assert!(matches!(f.volume("nope"), Err(DiskError::NotFound(_))));
}

#[test]
fn holes_extents_trim_and_zeroes() {
    let (_d, s) = store();
    let f = family(&s, false);
    let size = 8 * MIB;
    let v = f.create_volume("d", size).unwrap();
    let hole = |offset, length| Extent {
        offset,
        length,
        kind: ExtentKind::Hole,
    };
    let data = |offset, length| Extent {
        offset,
        length,
        kind: ExtentKind::Data,
    };
    assert_eq!(v.extents(0, size).unwrap(), vec![hole(0, size)]);
    v.write(4096 * 10, &[1u8; 4096 * 3], false).unwrap();
    v.write(5 * MIB + 1, &[2u8; 10], false).unwrap();
    assert_eq!(
        v.extents(0, size).unwrap(),
        vec![
            hole(0, 40960),
            data(40960, 12288),
            hole(53248, 5 * MIB - 53248),
            data(5 * MIB, 4096),
            hole(5 * MIB + 4096, size - 5 * MIB - 4096)
        ]
    );
    // Clipped to odd ranges.
    assert_eq!(v.extents(40961, 100).unwrap(), vec![data(40961, 100)]);
    assert_eq!(
        v.extents(40000, 2000).unwrap(),
        vec![hole(40000, 960), data(40960, 1040)]
    );

    // Trim punches only whole blocks; the edges stay.
    v.trim(40960 + 100, 4096 * 2, false).unwrap();
    assert_eq!(
        v.extents(40960, 12288).unwrap(),
        vec![data(40960, 4096), hole(45056, 4096), data(49152, 4096)]
    );
    let mut b = vec![0u8; 12288];
    v.read(40960, &mut b).unwrap();
    assert!(b[..4096].iter().all(|x| *x == 1) && b[4096..8192].iter().all(|x| *x == 0));

    // Zeroes: whole blocks become holes, edges are zero-filled.
    v.write(0, &[9u8; 20000], false).unwrap();
    v.write_zeroes(1000, 15000, true).unwrap();
    let mut b = vec![0u8; 20000];
    v.read(0, &mut b).unwrap();
    assert!(b[..1000].iter().all(|x| *x == 9));
    assert!(b[1000..16000].iter().all(|x| *x == 0));
    assert!(b[16000..].iter().all(|x| *x == 9));
    assert_eq!(
        v.extents(0, 20480).unwrap(),
        vec![data(0, 4096), hole(4096, 8192), data(12288, 8192)]
    );
    // Zeroing inside one block rewrites it.
    v.write_zeroes(17000, 10, false).unwrap();
    v.read(17000, &mut b[..10]).unwrap();
    assert_eq!(&b[..10], &[0; 10]);

    // Whole disk discard (mkfs does it) leaves nothing mapped, and it survives a reopen.
    v.trim(0, size, true).unwrap();
    assert_eq!(v.extents(0, size).unwrap(), vec![hole(0, size)]);
    drop((v, f));
    let f = s.open_family("fam", keys(1)).unwrap();
    assert_eq!(
        f.volume("d").unwrap().extents(0, size).unwrap(),
        vec![hole(0, size)]
    );
    assert_eq!(f.stats().live_bytes, 0);
}

#[test]
fn incremental_snapshots_share_blocks_and_store_only_changes() {
    for inner in [false, true] {
        let (_d, s) = store();
        let f = family(&s, inner);
        let ct = if inner { 4096 + 32 } else { 4096 + 16 };
        let v = f.create_volume("d", 16 * MIB).unwrap();
        v.write(0, &pattern(1, 0, 4 * MIB as usize), false).unwrap();
        let base = f.stats().live_bytes;
        assert_eq!(base, 1024 * ct);
        let s1 = f.snapshot("d", "s1").unwrap();
        assert_eq!(
            f.stats().live_bytes,
            base,
            "a snapshot of unchanged blocks stores nothing"
        );
        // 10 blocks change.
        for i in 0..10u64 {
            v.write(i * 100 * 4096, &pattern(2, 0, 4096), false)
                .unwrap();
        }
        let s2 = f.snapshot("d", "s2").unwrap();
        let st = f.stats();
        assert_eq!(
            st.live_bytes,
            base + 10 * ct,
            "only the changed blocks take new space"
        );
        let by = |id: &str| st.volumes.iter().find(|x| x.id == id).unwrap().clone();
        assert_eq!(
            by("s1").exclusive_bytes,
            10 * 4096,
            "s1 keeps the 10 old versions"
        );
        assert_eq!(by("s2").exclusive_bytes, 0);
        assert_eq!(by("d").exclusive_bytes, 0);
        assert_eq!(by("s1").mapped_bytes, 4 * MIB);
        assert!(by("s1").read_only && !by("d").read_only);
        // Contents.
        let mut b = vec![0u8; 4096];
        s1.read(0, &mut b).unwrap();
        assert_eq!(b, pattern(1, 0, 4096));
        s2.read(0, &mut b).unwrap();
        assert_eq!(b, pattern(2, 0, 4096));
        assert!(matches!(s1.write(0, &b, false), Err(DiskError::ReadOnly)));
        assert!(matches!(s1.trim(0, 4096, false), Err(DiskError::ReadOnly)));
        // A disk from a snapshot stays in the family and shares its blocks.
        let d2 = f.create_volume_from_snapshot("s1", "d2").unwrap();
        d2.read(0, &mut b).unwrap();
        assert_eq!(b, pattern(1, 0, 4096));
        d2.write(0, &[5; 4096], false).unwrap();
        s1.read(0, &mut b).unwrap();
        assert_eq!(b, pattern(1, 0, 4096));
        assert_eq!(f.stats().live_bytes, base + 11 * ct);
        assert_eq!(f.volumes().len(), 4);
    }
}

#[test]
fn gc_with_snapshots_and_deletes_keeps_data_and_frees_space() {
    let (_d, s) = store();
    let f = family(&s, false);
    let v = f.create_volume("d", 64 * MIB).unwrap();
    let mut m = Model(vec![0; 64 * MIB as usize]);
    // ~140 MiB of log: several segments.
    for round in 0..3u64 {
        for i in 0..48u64 {
            let data = pattern(round * 100 + i, i * MIB, MIB as usize);
            v.write(i * MIB, &data, false).unwrap();
            m.write(i * MIB, &data);
        }
        if round == 0 {
            f.snapshot("d", "s0").unwrap();
        }
    }
    let snap_model = {
        let mut b = vec![0u8; 64 * MIB as usize];
        f.volume("s0").unwrap().read(0, &mut b).unwrap();
        b
    };
    let before = f.stats();
    let r = f.gc(0.5).unwrap();
    let after = f.stats();
    assert!(r.segments_deleted > 0, "{r:?}");
    assert!(after.log_bytes < before.log_bytes, "{before:?} {after:?}");
    assert_eq!(after.live_bytes, before.live_bytes);
    check(&v, &m);
    let mut b = vec![0u8; 64 * MIB as usize];
    f.volume("s0").unwrap().read(0, &mut b).unwrap();
    assert!(b == snap_model);
    // Deleting the snapshot frees its old versions.
    f.delete_volume("s0").unwrap();
    f.gc(0.3).unwrap();
    let freed = f.stats();
    assert!(freed.live_bytes < after.live_bytes);
    assert!(freed.log_bytes < after.log_bytes);
    assert!(
        freed.log_bytes <= freed.live_bytes * 2 + 16 * MIB,
        "{freed:?}"
    );
    check(&v, &m);
    // Survives a reopen.
    drop((v, f));
    let f = s.open_family("fam", keys(1)).unwrap();
    check(&f.volume("d").unwrap(), &m);
    assert!(matches!(f.volume("s0"), Err(DiskError::NotFound(_))));
}

#[test]
fn gc_concurrent_with_writers() {
    let (_d, s) = store();
    let f = family(&s, false);
    let v = f.create_volume("d", 16 * MIB).unwrap();
    for i in 0..16 {
        v.write(i * MIB, &pattern(i, 0, MIB as usize), false)
            .unwrap();
    }
    f.snapshot("d", "s").unwrap();
    std::thread::scope(|sc| {
        let v2 = v.clone();
        let w = sc.spawn(move || {
            for r in 0..60u64 {
                let i = r % 16;
                v2.write(i * MIB, &pattern(1000 + r, 0, MIB as usize), false)
                    .unwrap();
            }
        });
        for _ in 0..5 {
            f.gc(0.1).unwrap();
        }
        w.join().unwrap();
    });
    f.gc(0.1).unwrap();
    let snap = f.volume("s").unwrap();
    let mut b = vec![0u8; MIB as usize];
    for i in 0..16u64 {
        snap.read(i * MIB, &mut b).unwrap();
        assert!(b == pattern(i, 0, MIB as usize));
        v.read(i * MIB, &mut b).unwrap();
        let last = (0..60u64).filter(|r| r % 16 == i).max().unwrap();
        assert!(b == pattern(1000 + last, 0, MIB as usize));
    }
}

#[test]
fn concurrent_writers_and_readers() {
    let (_d, s) = store();
    let f = family(&s, true);
    let v = f.create_volume("d", 32 * MIB).unwrap();
    std::thread::scope(|sc| {
        for t in 0..8u64 {
            let v = v.clone();
            sc.spawn(move || {
                // Each thread owns a 4 MiB region; odd sizes, read back at once.
                let base = t * 4 * MIB;
                for r in 0..40u64 {
                    let off = base + (r * 37_337) % (3 * MIB);
                    let len = 1 + ((r * 7919) % 200_000) as usize;
                    let data = pattern(t * 1000 + r, off, len);
                    v.write(off, &data, r % 10 == 0).unwrap();
                    let mut b = vec![0u8; len];
                    v.read(off, &mut b).unwrap();
                    assert!(b == data);
                }
            });
        }
        // Sub-block writes from many threads into the same blocks: no byte lost.
        for t in 0..8u64 {
            let v = v.clone();
            sc.spawn(move || {
                for blk in 0..64u64 {
                    let off = 31 * MIB + blk * 4096 + t * 512;
                    v.write(off, &[t as u8 + 1; 512], false).unwrap();
                }
            });
        }
        let f2 = f.clone();
        sc.spawn(move || {
            for _ in 0..20 {
                f2.flush().unwrap();
            }
        });
    });
    let mut b = vec![0u8; 64 * 4096];
    v.read(31 * MIB, &mut b).unwrap();
    for (i, x) in b.iter().enumerate() {
        assert_eq!(*x as usize, (i % 4096) / 512 + 1, "byte {i}");
    }
}

#[test]
fn copy_into_another_family_and_import() {
    let (_d, s) = store();
    let a = s.create_family("a", keys(1), false).unwrap();
    let b = s.create_family("b", keys_inner(3, 4), true).unwrap();
    let v = a.create_volume("d", 4 * MIB).unwrap();
    v.write(12345, &pattern(7, 0, 300_000), false).unwrap();
    let c = copy_volume(&v, &b, "copy").unwrap();
    let (mut x, mut y) = (vec![0u8; 4 * MIB as usize], vec![0u8; 4 * MIB as usize]);
    v.read(0, &mut x).unwrap();
    c.read(0, &mut y).unwrap();
    assert!(x == y);
    assert_eq!(
        v.extents(0, 4 * MIB).unwrap(),
        c.extents(0, 4 * MIB).unwrap()
    );

    let mut image = vec![0u8; 3 * MIB as usize + 100];
    image[MIB as usize..MIB as usize + 5000].copy_from_slice(&pattern(9, 0, 5000));
    *image.last_mut().unwrap() = 1;
    let imp = import_volume(&b, "imp", image.len() as u64, &mut &image[..]).unwrap();
    assert_eq!(imp.size(), 3 * MIB + 4096);
    let mut got = vec![0u8; image.len()];
    imp.read(0, &mut got).unwrap();
    assert!(got == image);
    // Zero blocks stay holes.
    assert_eq!(
        b.stats()
            .volumes
            .iter()
            .find(|s| s.id == "imp")
            .unwrap()
            .mapped_bytes,
        3 * 4096
    );
    assert!(matches!(
        import_volume(&b, "big", 10, &mut &image[..]),
        Err(DiskError::InvalidSize { .. })
    ));
    assert!(matches!(b.volume("big"), Err(DiskError::NotFound(_))));
}

#[test]
fn families_listed_deleted_and_exclusive() {
    let (d, s) = store();
    let f = s.create_family("one", keys(1), false).unwrap();
    assert!(matches!(
        s.create_family("one", keys(1), false),
        Err(DiskError::AlreadyExists(_))
    ));
    assert!(matches!(s.delete_family("one"), Err(DiskError::Busy)));
    // Another store on the same root (as another process would) cannot open it.
    let s2 = DiskStore::open(d.path()).unwrap();
    assert!(matches!(
        s2.open_family("one", keys(1)),
        Err(DiskError::Busy)
    ));
    assert_eq!(s.families().unwrap(), vec!["one".to_string()]);
    drop(f);
    s.delete_family("one").unwrap();
    assert!(s.families().unwrap().is_empty());
    assert!(matches!(
        s.open_family("one", keys(1)),
        Err(DiskError::NotFound(_))
    ));
}

#[test]
fn a_family_set_aside_is_kept_whole_and_never_listed_or_opened() {
    let (d, s) = store();
    let f = s.create_family("two", keys(2), false).unwrap();
    let v = f.create_volume("disk", 1 << 20).unwrap();
    v.write(0, &[9u8; 4096], true).unwrap();
    assert!(matches!(s.set_aside("two"), Err(DiskError::Busy)));
    drop((v, f));
    let to = s.set_aside("two").unwrap();
    assert_eq!(to, d.path().join(kagi_disk::ORPHANED_DIR).join("two"));
    assert!(to.join("family").is_file() && to.join("segments").is_dir());
    assert!(s.families().unwrap().is_empty());
    assert!(matches!(
        s.open_family("two", keys(2)),
        Err(DiskError::NotFound(_))
    ));
    // A store opened on the root keeps it (nothing at open removes it).
    drop(s);
    let s = DiskStore::open(d.path()).unwrap();
    assert!(to.join("family").is_file());
    // A second family of the same id set aside goes beside the first.
    drop(s.create_family("two", keys(2), false).unwrap());
    let again = s.set_aside("two").unwrap();
    assert_eq!(again, d.path().join(kagi_disk::ORPHANED_DIR).join("two.1"));
    assert!(to.join("family").is_file());
}

/// Checkpoints and snapshots taken while threads write: after a reopen (with and without a
/// checkpoint at close) every volume reads exactly as before.
#[test]
fn checkpoints_and_snapshots_during_writes_survive_reopen() {
    for checkpoint_at_close in [false, true] {
        let (_d, s) = store();
        let f = family(&s, false);
        let v = f.create_volume("d", 8 * MIB).unwrap();
        std::thread::scope(|sc| {
            for t in 0..4u64 {
                let v = v.clone();
                sc.spawn(move || {
                    for r in 0..60u64 {
                        let off = (t * 2 * MIB) + (r * 12_345) % (2 * MIB - 70_000);
                        v.write(off, &pattern(t * 100 + r, off, 65_000), false)
                            .unwrap();
                        if r % 7 == 0 {
                            v.trim(off, 16_384, false).unwrap();
                        }
                    }
                });
            }
            for i in 0..6 {
                f.snapshot("d", &format!("s{i}")).unwrap();
                f.checkpoint().unwrap();
            }
        });
        let read_all = |f: &kagi_disk::Family| {
            let mut out = Vec::new();
            for info in f.volumes() {
                let mut b = vec![0u8; info.size as usize];
                f.volume(&info.id).unwrap().read(0, &mut b).unwrap();
                let ext = f.volume(&info.id).unwrap().extents(0, info.size).unwrap();
                out.push((info.id, b, ext));
            }
            out
        };
        let before = read_all(&f);
        if !checkpoint_at_close {
            f.lock();
        }
        drop((v, f));
        let f = s.open_family("fam", keys(1)).unwrap();
        let after = read_all(&f);
        assert_eq!(before.len(), 7);
        for (b, a) in before.iter().zip(&after) {
            assert_eq!(b.0, a.0);
            assert!(b.1 == a.1, "{} differs after reopen", b.0);
            assert_eq!(b.2, a.2, "{} extents differ", b.0);
        }
    }
}

/// Enough log for automatic checkpoints (every 4 segments of 64 MiB) while writing; the
/// replay after them gives the same content.
#[test]
fn automatic_checkpoints_while_writing() {
    let (d, s) = store();
    let f = family(&s, false);
    let v = f.create_volume("d", 32 * MIB).unwrap();
    let mut m = Model(vec![0; 32 * MIB as usize]);
    let ckpt = d.path().join("fam/checkpoint");
    let first = std::fs::metadata(&ckpt).unwrap().modified().unwrap();
    let mut rewritten = false;
    for r in 0..300u64 {
        let off = (r % 32) * MIB;
        let data = pattern(r, off, MIB as usize);
        v.write(off, &data, false).unwrap();
        m.write(off, &data);
        rewritten |= std::fs::read(&ckpt).unwrap().len() > 1000
            || std::fs::metadata(&ckpt).unwrap().modified().unwrap() != first;
    }
    assert!(rewritten, "no automatic checkpoint");
    f.lock();
    drop((v, f));
    let f = s.open_family("fam", keys(1)).unwrap();
    check(&f.volume("d").unwrap(), &m);
}
