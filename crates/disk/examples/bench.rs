//! Quick local throughput check of the store (no NBD): sequential 1 MiB writes and reads,
//! then 4 KiB random writes and reads from 16 threads.
//!
//! `cargo run --release -p kagi-disk --example bench -- [DIR] [MIB] [--inner]`
//! The figures include the page cache (reads are not cold); `flush` is timed with the writes.

#![allow(clippy::unwrap_used)]

use std::time::Instant;

use kagi_disk::{DiskStore, FamilyKeys};
use zeroize::Zeroizing;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let inner = args.iter().any(|a| a == "--inner");
    let pos: Vec<&String> = args.iter().filter(|a| !a.starts_with("--")).collect();
    let tmp = tempfile::tempdir_in(pos.first().map(|s| s.as_str()).unwrap_or(".")).unwrap();
    let mib: u64 = pos.get(1).map(|s| s.parse().unwrap()).unwrap_or(1024);
    let size = mib << 20;
    let store = DiskStore::open(tmp.path()).unwrap();
    let keys = if inner {
        FamilyKeys::with_inner(Zeroizing::new([1; 32]), Zeroizing::new([2; 32]))
    } else {
        FamilyKeys::new(Zeroizing::new([1; 32]))
    };
    let fam = store.create_family("bench", keys, inner).unwrap();
    let vol = fam.create_volume("d", size).unwrap();
    let buf: Vec<u8> = (0..1 << 20).map(|i| (i * 7 + 3) as u8).collect();

    let t = Instant::now();
    for i in 0..mib {
        vol.write(i << 20, &buf, false).unwrap();
    }
    let unflushed = t.elapsed().as_secs_f64();
    fam.flush().unwrap();
    let w = t.elapsed().as_secs_f64();
    println!(
        "sequential write 1 MiB: {:.0} MB/s with the final flush, {:.0} MB/s before it (inner layer: {inner})",
        size as f64 / w / 1e6,
        size as f64 / unflushed / 1e6
    );

    let mut rb = vec![0u8; 1 << 20];
    let t = Instant::now();
    for i in 0..mib {
        vol.read(i << 20, &mut rb).unwrap();
    }
    let r = t.elapsed().as_secs_f64();
    println!("sequential read 1 MiB: {:.0} MB/s", size as f64 / r / 1e6);

    let blocks = size / 4096;
    let ops_per_thread = 20_000u64;
    for (name, write) in [("write", true), ("read", false)] {
        let t = Instant::now();
        std::thread::scope(|s| {
            for th in 0..16u64 {
                let vol = vol.clone();
                s.spawn(move || {
                    let mut x = th.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
                    let mut b = [0u8; 4096];
                    for _ in 0..ops_per_thread {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let off = (x % blocks) * 4096;
                        if write {
                            vol.write(off, &b, false).unwrap();
                        } else {
                            vol.read(off, &mut b).unwrap();
                        }
                    }
                });
            }
        });
        if write {
            fam.flush().unwrap();
        }
        let e = t.elapsed().as_secs_f64();
        println!(
            "random 4 KiB {name}, 16 threads: {:.0} IOPS",
            (16 * ops_per_thread) as f64 / e
        );
    }
    let st = fam.stats();
    println!(
        "log {} MiB, live {} MiB",
        st.log_bytes >> 20,
        st.live_bytes >> 20
    );
}
