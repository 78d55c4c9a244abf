//! Backup and restore round trips on real folders, compared byte for byte.

#![allow(clippy::unwrap_used)]

mod common;

use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use common::{assert_same, local as open, pseudo_random, runtime, walk_files};
use kagi_backup::{BackupOptions, Repository};
use kagi_crypto::data_key::DataKey;

fn make_source(dir: &Path) {
    fs::create_dir_all(dir.join("sub/deeper")).unwrap();
    fs::create_dir_all(dir.join("empty")).unwrap();
    fs::write(dir.join("a.bin"), pseudo_random(1, 3 * 1024 * 1024 + 17)).unwrap();
    fs::write(dir.join("sub/b.bin"), pseudo_random(2, 5 * 1024 * 1024)).unwrap();
    fs::write(dir.join("sub/deeper/small.txt"), b"hello\n").unwrap();
    fs::write(dir.join("empty-file"), b"").unwrap();
    let log: String = (0..50_000)
        .map(|i| format!("2026-11-24 line {i} status=ok\n"))
        .collect();
    fs::write(dir.join("app.log"), log).unwrap();
    // A name that is not UTF-8.
    fs::write(dir.join(OsStr::from_bytes(b"odd-\xff\xfe-name")), b"odd").unwrap();
    std::os::unix::fs::symlink("sub/b.bin", dir.join("link")).unwrap();
    std::os::unix::fs::symlink(OsStr::from_bytes(b"dangling-\xff"), dir.join("dangling")).unwrap();
    // A sparse file: 24 MiB with data only at two places.
    let f = fs::File::create(dir.join("sparse.img")).unwrap();
    f.set_len(24 * 1024 * 1024).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_at(b"start", 0).unwrap();
    f.write_at(&pseudo_random(3, 4096), 20 * 1024 * 1024)
        .unwrap();
    fs::set_permissions(
        dir.join("sub/deeper/small.txt"),
        fs::Permissions::from_mode(0o640),
    )
    .unwrap();
    fs::set_permissions(dir.join("a.bin"), fs::Permissions::from_mode(0o755)).unwrap();
}

#[test]
fn full_incremental_restore_and_checks() {
    let rt = runtime();
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    make_source(&src);
    let backend = open(&tmp.path().join("repo"), &rt);
    let key = DataKey::generate().unwrap();
    let raw = *key.expose_for_wrapping();
    let mut repo = Repository::init(backend.clone(), key).unwrap();
    let opts = BackupOptions::default();
    let first = repo.backup(&src, &opts, 1_000, &|_| {}).unwrap();
    assert!(first.skipped.is_empty(), "{:?}", first.skipped);
    assert_eq!(first.files_unchanged, 0);
    assert!(first.chunks_new > 0);

    let out = tmp.path().join("restored");
    let stats = repo
        .restore(&first.snapshot.id, None, &out, false, 2, &|_| {})
        .unwrap();
    assert_eq!(stats.symlinks, 2);
    assert_same(&src, &out);
    // Holes stay holes.
    let sparse = out.join("sparse.img").metadata().unwrap();
    assert_eq!(sparse.len(), 24 * 1024 * 1024);
    assert!(
        sparse.blocks() * 512 < 8 * 1024 * 1024,
        "restored sparse file is not sparse"
    );

    // Incremental: change one file; unchanged files are not read again.
    fs::write(src.join("sub/deeper/small.txt"), b"changed\n").unwrap();
    let second = repo.backup(&src, &opts, 2_000, &|_| {}).unwrap();
    assert_eq!(
        second.snapshot.parent.as_deref(),
        Some(first.snapshot.id.as_str())
    );
    assert_eq!(second.files_read, 1);
    assert!(second.files_unchanged >= 6);
    assert!(
        second.bytes_added < 64 * 1024,
        "incremental added {} bytes",
        second.bytes_added
    );

    // A fresh process: reopen with the same key, both points restore.
    drop(repo);
    let repo = Repository::open(backend.clone(), DataKey::from_bytes(&raw).unwrap()).unwrap();
    assert_eq!(repo.snapshots().unwrap().len(), 2);
    let out2 = tmp.path().join("restored2");
    repo.restore(&second.snapshot.id, None, &out2, false, 1, &|_| {})
        .unwrap();
    assert_same(&src, &out2);
    assert!(repo.check(true).unwrap().is_empty());
    // Nothing unreferenced either: every pack written is indexed.
    assert_eq!(repo.check_report(true).unwrap(), Default::default());

    // Sub-path restore, and a non-empty target is refused.
    let out3 = tmp.path().join("restored3");
    repo.restore(
        &first.snapshot.id,
        Some(Path::new("sub/deeper")),
        &out3,
        false,
        1,
        &|_| {},
    )
    .unwrap();
    assert_eq!(fs::read(out3.join("small.txt")).unwrap(), b"hello\n");
    assert!(
        repo.restore(&first.snapshot.id, None, &out3, false, 1, &|_| {})
            .is_err()
    );

    // Another key does not open the repository.
    assert!(Repository::open(backend.clone(), DataKey::generate().unwrap()).is_err());
}

#[test]
fn corruption_is_detected_by_restore_and_check() {
    let rt = runtime();
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("data.bin"), pseudo_random(9, 2 * 1024 * 1024)).unwrap();
    let repo_dir = tmp.path().join("repo");
    let backend = open(&repo_dir, &rt);
    let mut repo = Repository::init(backend, DataKey::generate().unwrap()).unwrap();
    let s = repo
        .backup(&src, &BackupOptions::default(), 1, &|_| {})
        .unwrap();
    assert!(repo.check(true).unwrap().is_empty());
    // Flip one byte in the middle of the (only) pack.
    let pack = walk_files(&repo_dir.join("data")).pop().unwrap();
    let mut bytes = fs::read(&pack).unwrap();
    bytes[1000] ^= 0x40;
    fs::write(&pack, bytes).unwrap();
    let problems = repo.check(true).unwrap();
    assert!(!problems.is_empty());
    let err = repo
        .restore(
            &s.snapshot.id,
            None,
            &tmp.path().join("out"),
            false,
            1,
            &|_| {},
        )
        .unwrap_err();
    assert!(err.to_string().contains("failed authentication"), "{err}");
}

#[test]
fn a_repository_is_never_initialised_twice() {
    let rt = common::runtime();
    let dir = tempfile::tempdir().unwrap();
    let backend = common::local(dir.path(), &rt);
    assert!(!backend.exists("config").unwrap());
    Repository::init(backend.clone(), DataKey::generate().unwrap()).unwrap();
    // `exists` names the object itself; listing the prefix "config" would not find it.
    assert!(backend.exists("config").unwrap());
    assert!(backend.list("config").unwrap().is_empty());
    let config = std::fs::read(dir.path().join("config")).unwrap();
    let again = Repository::init(backend.clone(), DataKey::generate().unwrap());
    assert!(matches!(again, Err(kagi_backup::BackupError::Invalid(_))));
    assert_eq!(std::fs::read(dir.path().join("config")).unwrap(), config);
}
