//! Restore against crafted trees (names that climb or repeat, links in the way) and modes
//! that must not survive without their owner.

#![allow(clippy::unwrap_used)]

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::sync::Arc;

use kagi_crypto::data_key::DataKey;

use super::*;
use crate::pack::{self, KIND_DATA, KIND_TREE, Packer};
use crate::repo::SnapshotInfo;
use crate::{BackupOptions, ObjectStoreBackend};

struct Env {
    _rt: tokio::runtime::Runtime,
    tmp: tempfile::TempDir,
    repo: Repository,
}

fn env() -> Env {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let backend =
        Arc::new(ObjectStoreBackend::local(&tmp.path().join("repo"), rt.handle().clone()).unwrap());
    let repo = Repository::init(backend, DataKey::generate().unwrap()).unwrap();
    Env { _rt: rt, tmp, repo }
}

/// An environment with a folder `outside` (which a restore must never touch) and a target
/// path `t` beside it (not created).
fn env_with_outside() -> (Env, PathBuf, PathBuf) {
    let e = env();
    let outside = e.tmp.path().join("outside");
    fs::create_dir(&outside).unwrap();
    let target = e.tmp.path().join("t");
    (e, outside, target)
}

impl Env {
    /// Stores a blob as a backup would (its own pack and index); returns its id.
    fn blob(&mut self, kind: u8, plain: &[u8]) -> String {
        let id = self.repo.key.blob_id(plain);
        let sealed = pack::seal_blob(&self.repo.key, kind, &id, plain, 3).unwrap();
        let mut packer = Packer::new();
        packer
            .add(
                self.repo.backend.as_ref(),
                &self.repo.key,
                kind,
                &id,
                &sealed,
            )
            .unwrap();
        packer
            .flush(self.repo.backend.as_ref(), &self.repo.key)
            .unwrap();
        self.repo.write_index(&packer.written).unwrap();
        self.repo.add_to_index(&packer.written).unwrap();
        hex::encode(id)
    }

    /// Stores a tree as given (no checks, no sorting): what a hostile writer could store.
    fn tree(&mut self, nodes: Vec<Node>) -> String {
        self.blob(KIND_TREE, &serde_json::to_vec(&Tree { nodes }).unwrap())
    }

    /// Stores a recovery point of the tree `root`.
    fn snapshot(&mut self, root: Vec<Node>) -> String {
        let tree = self.tree(root);
        let s = SnapshotInfo {
            id: hex::encode(kagi_crypto::random_bytes(16).unwrap()),
            time: 1,
            source: "/crafted".into(),
            tree,
            parent: None,
            files: 0,
            bytes: 0,
            written_nanos: 0,
        };
        self.repo.write_snapshot(&s).unwrap();
        s.id
    }

    fn file(&mut self, name: &str, content: &[u8], mode: u32) -> Node {
        let id = self.blob(KIND_DATA, content);
        Node {
            size: content.len() as u64,
            content: vec![id],
            ..node(name, NodeKind::File, mode)
        }
    }

    fn dir(&mut self, name: &str, nodes: Vec<Node>) -> Node {
        Node {
            subtree: Some(self.tree(nodes)),
            ..node(name, NodeKind::Dir, 0o755)
        }
    }

    fn restore(&self, snap: &str, target: &Path, opts: &RestoreOptions) -> Result<RestoreStats> {
        self.repo.restore_with(snap, None, target, opts, &|_| {})
    }
}

fn node(name: &str, kind: NodeKind, mode: u32) -> Node {
    Node {
        name: Some(name.into()),
        name_b64: None,
        kind,
        mode,
        uid: None,
        gid: None,
        mtime_ns: 1_700_000_000_000_000_000,
        size: 0,
        content: Vec::new(),
        subtree: None,
        target: None,
        target_b64: None,
    }
}

fn symlink(name: &str, target: &Path) -> Node {
    Node {
        target: Some(target.to_str().unwrap().into()),
        ..node(name, NodeKind::Symlink, 0o777)
    }
}

fn overwrite() -> RestoreOptions {
    RestoreOptions {
        overwrite: true,
        ..RestoreOptions::default()
    }
}

/// Everything under `dir`, as sorted relative paths.
fn listing(dir: &Path) -> Vec<String> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
        for e in fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            out.push(p.strip_prefix(base).unwrap().display().to_string());
            if p.symlink_metadata().unwrap().is_dir() {
                walk(base, &p, out);
            }
        }
    }
    let mut out = Vec::new();
    if dir.exists() {
        walk(dir, dir, &mut out);
    }
    out.sort();
    out
}

fn mode(p: &Path) -> u32 {
    p.symlink_metadata().unwrap().mode() & 0o7777
}

#[test]
fn entry_names_that_are_not_one_path_component_are_refused_before_anything_is_written() {
    let mut e = env();
    let work = e.tmp.path().join("work");
    fs::create_dir_all(work.join("t")).unwrap();
    for bad in ["..", ".", "", "../x", "a/b", "nul\0"] {
        // The bad name sits below a good directory, so a restore that writes as it goes
        // would already have created "good".
        let evil = e.file(bad, b"escaped", 0o644);
        let good = e.dir("good", vec![evil]);
        let snap = e.snapshot(vec![good]);
        let r = e.restore(&snap, &work.join("t"), &RestoreOptions::default());
        assert_eq!(listing(&work), ["t"], "{bad:?} wrote something");
        let msg = format!("{}", r.unwrap_err());
        assert!(
            msg.contains("not a single path component"),
            "{bad:?}: {msg}"
        );
        // check reports the crafted tree as damage.
        let report = e.repo.check_report(false).unwrap();
        assert!(
            report
                .problems
                .iter()
                .any(|p| p.contains("single path component")),
            "{report:?}"
        );
        e.repo.forget(&snap).unwrap();
    }
}

#[test]
fn a_repeated_name_cannot_lead_a_restore_outside_its_target() {
    let (mut e, outside, target) = env_with_outside();
    // First "a" is a link to a folder outside the target, then a directory "a" whose content
    // would be written through it.
    let link = symlink("a", &outside);
    let pwned = e.file("pwned", b"escaped", 0o644);
    let dir = e.dir("a", vec![pwned]);
    for root in [vec![link.clone(), dir.clone()], vec![dir, link]] {
        let snap = e.snapshot(root);
        let msg = format!(
            "{}",
            e.restore(&snap, &target, &RestoreOptions::default())
                .unwrap_err()
        );
        assert!(msg.contains("appears more than once"), "{msg}");
        assert!(listing(&outside).is_empty(), "written outside the target");
        assert!(listing(&target).is_empty(), "{:?}", listing(&target));
    }
}

#[test]
fn links_already_in_the_target_are_replaced_never_followed() {
    let mut e = env();
    let outside = e.tmp.path().join("outside");
    fs::create_dir(&outside).unwrap();
    fs::write(outside.join("victim"), b"precious").unwrap();
    fs::write(outside.join("linked"), b"precious").unwrap();
    let target = e.tmp.path().join("t");
    fs::create_dir(&target).unwrap();
    // A link to a folder where the recovery point has a directory, a link to a file and a
    // hard link where it has files, and a link where it has a link.
    std::os::unix::fs::symlink(&outside, target.join("a")).unwrap();
    std::os::unix::fs::symlink(outside.join("victim"), target.join("f")).unwrap();
    fs::hard_link(outside.join("linked"), target.join("h")).unwrap();
    let linked_mode = mode(&outside.join("linked"));
    std::os::unix::fs::symlink(&outside, target.join("l")).unwrap();

    let pwned = e.file("pwned", b"new", 0o600);
    let a = e.dir("a", vec![pwned]);
    let f = e.file("f", b"new", 0o666);
    let h = e.file("h", b"new", 0o666);
    let l = symlink("l", Path::new("elsewhere"));
    let snap = e.snapshot(vec![a, f, h, l]);
    let stats = e.restore(&snap, &target, &overwrite()).unwrap();
    assert_eq!((stats.files, stats.dirs, stats.symlinks), (3, 1, 1));

    assert_eq!(listing(&outside), ["linked", "victim"]);
    assert_eq!(fs::read(outside.join("victim")).unwrap(), b"precious");
    assert_eq!(fs::read(outside.join("linked")).unwrap(), b"precious");
    assert_eq!(mode(&outside.join("linked")), linked_mode);
    assert!(target.join("a").symlink_metadata().unwrap().is_dir());
    assert_eq!(fs::read(target.join("a/pwned")).unwrap(), b"new");
    for n in ["f", "h"] {
        let m = target.join(n).symlink_metadata().unwrap();
        assert!(m.is_file() && m.nlink() == 1, "{n}");
        assert_eq!(fs::read(target.join(n)).unwrap(), b"new");
    }
    assert_eq!(
        fs::read_link(target.join("l")).unwrap(),
        Path::new("elsewhere")
    );

    // A directory where the recovery point has a file is an error (restore deletes no
    // directory), and nothing is written through it.
    let a = e.file("a", b"file now", 0o644);
    let snap = e.snapshot(vec![a]);
    let msg = format!("{}", e.restore(&snap, &target, &overwrite()).unwrap_err());
    assert!(msg.contains("a directory is where"), "{msg}");
    assert_eq!(fs::read(target.join("a/pwned")).unwrap(), b"new");
}

#[test]
fn a_link_in_the_target_on_the_way_to_a_sub_directory_is_not_followed() {
    let (mut e, outside, target) = env_with_outside();
    fs::create_dir_all(target.join("d")).unwrap();
    // d/e is a link out; the recovery point has d/e/x (a directory e holding x).
    std::os::unix::fs::symlink(&outside, target.join("d/e")).unwrap();
    let x = e.file("x", b"new", 0o644);
    let inner = e.dir("e", vec![x]);
    let d = e.dir("d", vec![inner]);
    let snap = e.snapshot(vec![d]);
    e.restore(&snap, &target, &overwrite()).unwrap();
    assert!(listing(&outside).is_empty());
    assert_eq!(listing(&target), ["d", "d/e", "d/e/x"]);
}

#[test]
fn setuid_and_setgid_come_back_only_with_their_owner() {
    let mut e = env();
    let mut suid = e.file("suid", b"#!/bin/sh\n", 0o4755);
    let mut sgid = e.file("sgid", b"#!/bin/sh\n", 0o2750);
    let sticky_file = e.file("sticky-file", b"x", 0o1644);
    let mut shared = e.dir("shared", vec![]);
    shared.mode = 0o3775;
    for n in [&mut suid, &mut sgid, &mut shared] {
        n.uid = Some(4321);
        n.gid = Some(4321);
    }
    let snap = e.snapshot(vec![suid, sgid, sticky_file, shared]);

    // Without owners: the restoring user's files, without setuid/setgid; sticky stays on
    // the directory only.
    let t = e.tmp.path().join("plain");
    e.restore(&snap, &t, &RestoreOptions::default()).unwrap();
    assert_eq!(mode(&t.join("suid")), 0o755);
    assert_eq!(mode(&t.join("sgid")), 0o750);
    assert_eq!(mode(&t.join("sticky-file")), 0o644);
    assert_eq!(mode(&t.join("shared")), 0o1775);

    // With owners (root only): owner, group and the bits come back.
    let t = e.tmp.path().join("owned");
    let opts = RestoreOptions {
        owners: true,
        ..RestoreOptions::default()
    };
    let r = e.restore(&snap, &t, &opts);
    if rustix::process::geteuid().is_root() {
        r.unwrap();
        for (n, m) in [("suid", 0o4755), ("sgid", 0o2750), ("shared", 0o3775)] {
            let meta = t.join(n).symlink_metadata().unwrap();
            assert_eq!((meta.uid(), meta.gid()), (4321, 4321), "{n}");
            assert_eq!(meta.mode() & 0o7777, m, "{n}");
        }
        // An entry with no recorded owner keeps the restoring user's, so no setuid either.
        assert_eq!(mode(&t.join("sticky-file")), 0o644);
    } else {
        assert!(format!("{}", r.unwrap_err()).contains("needs root"));
        assert!(!t.exists());
    }
}

#[test]
fn a_setuid_file_backed_up_and_restored_loses_the_bit() {
    let e = env();
    let mut repo = e.repo;
    let src = e.tmp.path().join("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("tool"), b"#!/bin/sh\n").unwrap();
    fs::set_permissions(src.join("tool"), fs::Permissions::from_mode(0o4755)).unwrap();
    let st = repo
        .backup(&src, &BackupOptions::default(), 1, &|_| {})
        .unwrap();
    let out = e.tmp.path().join("out");
    repo.restore(&st.snapshot.id, None, &out, false, 1, &|_| {})
        .unwrap();
    assert_eq!(mode(&out.join("tool")), 0o755);
    // The owner was recorded: as root, restoring owners brings the bit back.
    if rustix::process::geteuid().is_root() {
        let out = e.tmp.path().join("owned");
        let opts = RestoreOptions {
            owners: true,
            ..RestoreOptions::default()
        };
        repo.restore_with(&st.snapshot.id, None, &out, &opts, &|_| {})
            .unwrap();
        assert_eq!(mode(&out.join("tool")), 0o4755);
    }
}

#[test]
fn tree_entry_rules() {
    let t = |names: &[&str]| Tree {
        nodes: names
            .iter()
            .map(|n| node(n, NodeKind::File, 0o644))
            .collect(),
    };
    assert!(t(&["a", "b", ".a", "..."]).check_names().is_ok());
    for bad in [&["a", "a"][..], &[""], &["."], &[".."], &["x/y"], &["n\0"]] {
        assert!(t(bad).check_names().is_err(), "{bad:?}");
    }
}

/// A recovery point whose directories `d0`, `d1` of each level share one subtree, `levels`
/// deep: a handful of distinct trees that a restore would expand into 2^levels entries.
fn shared_subtrees(e: &mut Env, levels: usize) -> String {
    let mut nodes = vec![e.file("f", b"x", 0o644)];
    for _ in 0..levels {
        let sub = e.tree(nodes);
        nodes = ["d0", "d1"]
            .iter()
            .map(|name| Node {
                subtree: Some(sub.clone()),
                ..node(name, NodeKind::Dir, 0o755)
            })
            .collect();
    }
    e.snapshot(nodes)
}

#[test]
fn subtrees_shared_without_end_are_refused_before_anything_is_written() {
    let (mut e, _outside, target) = env_with_outside();
    // 2^64 entries from 65 small trees: planning them all would never end.
    let snap = shared_subtrees(&mut e, 64);
    let msg = format!(
        "{}",
        e.restore(&snap, &target, &RestoreOptions::default())
            .unwrap_err()
    );
    assert!(msg.contains("more than"), "{msg}");
    assert!(listing(&target).is_empty(), "{:?}", listing(&target));
}

#[test]
fn a_restore_creates_at_most_max_entries() {
    let (mut e, _outside, target) = env_with_outside();
    // 2 × (1 + 2 × (1 + 2 × (1 + 2 × (1 + 1)))) = 46 entries.
    let snap = shared_subtrees(&mut e, 4);
    let limited = |max_entries| RestoreOptions {
        max_entries,
        ..RestoreOptions::default()
    };
    let msg = format!("{}", e.restore(&snap, &target, &limited(45)).unwrap_err());
    assert!(msg.contains("more than 45 entries"), "{msg}");
    assert!(listing(&target).is_empty(), "{:?}", listing(&target));
    let stats = e.restore(&snap, &target, &limited(46)).unwrap();
    assert_eq!(listing(&target).len(), 46);
    assert_eq!((stats.files, stats.dirs), (16, 30));
}
