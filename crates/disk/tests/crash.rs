//! Crashes: a child process writing is killed with SIGKILL; torn and damaged log tails.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::*;
use kagi_disk::{DiskError, DiskStore};

const SLOTS: u64 = 200;
const SLOT: u64 = 64 * 1024;
const VOL: u64 = SLOTS * SLOT;
const CHILD_ENV: &str = "KAGI_DISK_CRASH_CHILD";

/// Generation `g`'s content: its number, then a pattern of it.
fn gen_data(g: u64) -> Vec<u8> {
    let mut d = pattern(g, 0, SLOT as usize - 12000);
    d[..8].copy_from_slice(&g.to_le_bytes());
    d
}

/// Generation `g` goes to slot `g % SLOTS` at an odd offset inside it.
fn gen_offset(g: u64) -> u64 {
    (g % SLOTS) * SLOT + 1000 + (g % 7) * 3
}

/// Run by the child process only: writes generations forever from the one in the
/// environment, printing "durable G" after each flush or FUA write.
#[test]
#[ignore = "run by crash tests as a child process"]
fn crash_child_writer() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let (dir, start) = spec.split_once(':').unwrap();
    let start: u64 = start.parse().unwrap();
    let s = DiskStore::open(dir).unwrap();
    let f = s.open_family("fam", keys_inner(1, 2)).unwrap();
    let v = f.volume("d").unwrap();
    let mut out = std::io::stdout();
    for g in start.. {
        let fua = g % 5 == 0;
        v.write(gen_offset(g), &gen_data(g), fua).unwrap();
        if g % 3 == 0 {
            // The tail of a slot, which no generation's data reaches.
            v.trim(((g + 100) % SLOTS) * SLOT + SLOT - 8192, 8192, false)
                .unwrap();
        }
        if fua || g % 8 == 0 {
            if !fua {
                f.flush().unwrap();
            }
            use std::io::Write;
            writeln!(out, "durable {g}").unwrap();
            out.flush().unwrap();
        }
    }
}

/// Checks every slot against the generations known durable (later ones may have landed too;
/// nothing older than the durable state may show).
fn verify(dir: &Path, durable_ranges: &[(u64, u64)]) {
    let s = DiskStore::open(dir).unwrap();
    let f = s.open_family("fam", keys_inner(1, 2)).unwrap();
    let v = f.volume("d").unwrap();
    for slot in 0..SLOTS {
        // The newest durable generation that wrote this slot.
        let want_min = durable_ranges
            .iter()
            .flat_map(|(a, b)| *a..=*b)
            .filter(|g| g % SLOTS == slot)
            .max();
        let Some(want_min) = want_min else { continue };
        let mut head = [0u8; 8];
        // Any generation of this slot starts at an offset that depends on g % 7.
        let mut found = None;
        for k in 0..7 {
            v.read(slot * SLOT + 1000 + k * 3, &mut head).unwrap();
            let g = u64::from_le_bytes(head);
            if g % SLOTS == slot && g >= want_min && gen_offset(g) == slot * SLOT + 1000 + k * 3 {
                found = Some(g);
            }
        }
        let g = found.unwrap_or_else(|| panic!("slot {slot}: generation >= {want_min} lost"));
        let mut got = vec![0u8; SLOT as usize - 12000];
        v.read(gen_offset(g), &mut got).unwrap();
        assert!(got == gen_data(g), "slot {slot}: generation {g} damaged");
    }
}

#[test]
fn writes_acknowledged_durable_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = DiskStore::open(dir.path()).unwrap();
        let f = s.create_family("fam", keys_inner(1, 2), true).unwrap();
        f.create_volume("d", VOL).unwrap();
    }
    let exe = std::env::current_exe().unwrap();
    let mut next = 1u64;
    let mut ranges = Vec::new();
    // Several kills at different points, each reopening (replaying) what the last left.
    for (round, wait_for) in [40u64, 90, 1500, 25].iter().enumerate() {
        let mut child = Command::new(&exe)
            .args([
                "crash_child_writer",
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, format!("{}:{next}", dir.path().display()))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut durable = 0;
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        while let Some(Ok(line)) = lines.next() {
            if let Some(g) = line.strip_prefix("durable ") {
                durable = g.parse().unwrap();
                if durable >= next + wait_for {
                    break;
                }
            }
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        assert!(
            durable >= next + wait_for,
            "round {round}: the child stopped early"
        );
        ranges.push((next, durable));
        verify(dir.path(), &ranges);
        // The child may have written past `durable`; continue well after it.
        next = durable + 10_000;
    }
}

fn last_segment(root: &Path) -> PathBuf {
    let mut segs: Vec<PathBuf> = std::fs::read_dir(root.join("fam/segments"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    segs.sort();
    segs.into_iter()
        .rev()
        .find(|p| {
            let b = std::fs::read(p).unwrap();
            b.len() > 64 && b[64..68] == *b"KDRC"
        })
        .unwrap()
}

/// Writes `n` single-block records (block i = [i+1; 4096]) and leaves without a checkpoint
/// (locked at close), as a crash would.
fn log_without_checkpoint(s: &DiskStore, n: u64) {
    let f = s.create_family("fam", keys(1), false).unwrap();
    let v = f.create_volume("d", MIB).unwrap();
    for i in 0..n {
        v.write(i * 4096, &[i as u8 + 1; 4096], false).unwrap();
    }
    f.lock();
}

const REC: u64 = 56 + 4096 + 16;

fn blocks(s: &DiskStore) -> Vec<u8> {
    let f = s.open_family("fam", keys(1)).unwrap();
    let v = f.volume("d").unwrap();
    let mut out = Vec::new();
    let mut b = vec![0u8; 4096];
    for i in 0..8 {
        v.read(i * 4096, &mut b).unwrap();
        assert!(b.iter().all(|x| *x == b[0]), "block {i} mixed");
        out.push(b[0]);
    }
    out
}

/// Logs `n` records without a checkpoint, edits the last segment's bytes as a crash or an
/// attacker would, and reopens: the store and the blocks it then reads.
fn after_damage(
    n: u64,
    edit: impl FnOnce(&mut Vec<u8>),
) -> (tempfile::TempDir, DiskStore, Vec<u8>) {
    let (d, s) = store();
    log_without_checkpoint(&s, n);
    let seg = last_segment(d.path());
    let mut bytes = std::fs::read(&seg).unwrap();
    edit(&mut bytes);
    std::fs::write(&seg, &bytes).unwrap();
    let got = blocks(&s);
    (d, s, got)
}

#[test]
fn torn_tail_is_cut_off_at_replay() {
    // A record cut in its payload.
    let (_d, s, got) = after_damage(5, |b| b.truncate((64 + 4 * REC + 1000) as usize));
    assert_eq!(got, vec![1, 2, 3, 4, 0, 0, 0, 0]);
    // Replayed state was checkpointed: reopening again gives the same, and new writes work.
    {
        let f = s.open_family("fam", keys(1)).unwrap();
        f.volume("d")
            .unwrap()
            .write(5 * 4096, &[9; 4096], true)
            .unwrap();
    }
    assert_eq!(blocks(&s), vec![1, 2, 3, 4, 0, 9, 0, 0]);

    // A record whose header reached the disk but not all of its data (a page of it lost):
    // it and everything after it in the segment are cut.
    let at = (64 + 3 * REC + 56 + 2000) as usize;
    let (_d, _s, got) = after_damage(5, |b| b[at..at + 1000].fill(0));
    assert_eq!(got, vec![1, 2, 3, 0, 0, 0, 0, 0]);

    // Garbage after the last record (a reservation that was never written) is ignored.
    let (_d, _s, got) = after_damage(3, |b| {
        b.truncate((64 + 3 * REC) as usize);
        b.extend_from_slice(&pattern(5, 0, 9000));
    });
    assert_eq!(got, vec![1, 2, 3, 0, 0, 0, 0, 0]);

    // A forged record header (changed block address) fails its tag: cut there.
    let (_d, _s, got) = after_damage(4, |b| b[(64 + 2 * REC + 16) as usize] ^= 1);
    assert_eq!(got, vec![1, 2, 0, 0, 0, 0, 0, 0]);
}

#[test]
fn segment_created_but_not_durable_is_dropped() {
    let (d, s) = store();
    log_without_checkpoint(&s, 2);
    // A later segment whose header never reached the disk.
    let mut segs: Vec<PathBuf> = std::fs::read_dir(d.path().join("fam/segments"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    segs.sort();
    let last = segs
        .last()
        .unwrap()
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    let n = u64::from_str_radix(&last, 16).unwrap() + 1;
    let extra = d.path().join("fam/segments").join(format!("{n:016x}"));
    std::fs::write(&extra, [0u8; 30]).unwrap();
    assert_eq!(blocks(&s), vec![1, 2, 0, 0, 0, 0, 0, 0]);
    assert!(!extra.exists());
    // The store still refuses a family it cannot read rather than panicking.
    std::fs::remove_file(d.path().join("fam/checkpoint")).unwrap();
    assert!(matches!(
        s.open_family("fam", keys(1)),
        Err(DiskError::Io(_))
    ));
}
