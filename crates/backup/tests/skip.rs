//! Unreadable files and folders are skipped with a warning; an unreadable or missing source
//! folder is an error.
//!
//! `chmod 000` does not stop root (CAP_DAC_OVERRIDE) from reading. When the tests run as root,
//! the permission test re-runs itself as the unprivileged user `nobody` (65534), where the
//! permissions apply; if that is impossible it says so and asserts nothing.

#![allow(clippy::unwrap_used)]

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;

use common::{local, runtime};
use kagi_backup::{BackupError, BackupOptions, MAX_SKIPPED_LISTED, Repository};
use kagi_crypto::data_key::DataKey;

const AS_NOBODY: &str = "KAGI_BACKUP_TEST_AS_NOBODY";
/// The permission test's name, as libtest filters it when the test re-runs itself.
const UNREADABLE_TEST: &str = "unreadable_entries_are_skipped_with_a_warning";

fn chmod(p: &Path, mode: u32) {
    fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
}

/// Whether `chmod 000` stops this process from reading (false for root).
fn permissions_apply(dir: &Path) -> bool {
    let probe = dir.join("probe");
    fs::write(&probe, b"x").unwrap();
    chmod(&probe, 0o000);
    let blocked = fs::File::open(&probe).is_err();
    chmod(&probe, 0o600);
    fs::remove_file(&probe).unwrap();
    blocked
}

/// Runs the named test of this binary as `nobody`; `false` when that cannot be done here.
fn rerun_as_nobody(test: &str) -> bool {
    let exe = std::env::current_exe().unwrap();
    let out = std::process::Command::new(exe)
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env(AS_NOBODY, "1")
        .env("TMPDIR", "/tmp")
        .uid(65534)
        .gid(65534)
        .output();
    match out {
        Err(e) => {
            println!("note: cannot re-run {test} as nobody ({e})");
            false
        }
        Ok(o) => {
            let text = format!(
                "{}\n{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            assert!(o.status.success(), "{test} as nobody failed:\n{text}");
            if text.contains("NOT EXERCISED") {
                println!("note: {test} as nobody could not exercise the permissions:\n{text}");
                return false;
            }
            assert!(text.contains("1 passed"), "{test} did not run:\n{text}");
            println!("{test} ran as nobody:\n{text}");
            true
        }
    }
}

#[test]
fn unreadable_entries_are_skipped_with_a_warning() {
    let probe_dir = tempfile::tempdir().unwrap();
    if !permissions_apply(probe_dir.path()) {
        if std::env::var_os(AS_NOBODY).is_none() && rerun_as_nobody(UNREADABLE_TEST) {
            return;
        }
        // Honest skip: nothing below would fail a read, so asserting the skips would lie.
        println!(
            "NOT EXERCISED: chmod 000 does not block reads for this process (root?) and it \
             could not re-run as an unprivileged user"
        );
        return;
    }

    let rt = runtime();
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    fs::create_dir_all(src.join("open")).unwrap();
    fs::create_dir_all(src.join("locked")).unwrap();
    fs::write(src.join("ok.txt"), b"readable\n").unwrap();
    fs::write(src.join("open/nested.txt"), b"also readable\n").unwrap();
    fs::write(src.join("locked/inside.txt"), b"not reachable\n").unwrap();
    fs::write(src.join("secret.bin"), b"not readable\n").unwrap();
    chmod(&src.join("secret.bin"), 0o000);
    chmod(&src.join("locked"), 0o000);

    let mut repo = Repository::init(
        local(&tmp.path().join("repo"), &rt),
        DataKey::generate().unwrap(),
    )
    .unwrap();
    let st = repo
        .backup(&src, &BackupOptions::default(), 1, &|_| {})
        .unwrap();
    assert_eq!(st.skipped_count, 2, "{:?}", st.skipped_entries);
    let mut entries = st.skipped_entries.clone();
    entries.sort_by(|a, b| a.path.cmp(&b.path));
    assert!(entries[0].path.ends_with("src/locked"), "{entries:?}");
    assert!(
        entries[0].reason.contains("cannot list directory"),
        "{entries:?}"
    );
    assert!(entries[1].path.ends_with("src/secret.bin"), "{entries:?}");
    for e in &entries {
        assert!(e.reason.contains("Permission denied"), "{e:?}");
    }
    assert_eq!(st.skipped.len(), 2);
    assert!(
        st.skipped
            .iter()
            .any(|s| s.contains("secret.bin: Permission denied"))
    );
    assert_eq!(st.files_read, 2, "ok.txt and open/nested.txt");

    // The recovery point holds everything else, and not the skipped entries.
    let out = tmp.path().join("out");
    repo.restore(&st.snapshot.id, None, &out, false, 1, &|_| {})
        .unwrap();
    assert_eq!(fs::read(out.join("ok.txt")).unwrap(), b"readable\n");
    assert_eq!(
        fs::read(out.join("open/nested.txt")).unwrap(),
        b"also readable\n"
    );
    assert!(!out.join("secret.bin").exists());
    assert!(
        !out.join("locked").exists(),
        "an unlistable folder is left out"
    );
    assert!(repo.check(true).unwrap().is_empty());

    // Many unreadable files: all counted, a bounded number listed.
    let many = tmp.path().join("many");
    fs::create_dir_all(&many).unwrap();
    for i in 0..MAX_SKIPPED_LISTED + 5 {
        let p = many.join(format!("f{i}"));
        fs::write(&p, b"x").unwrap();
        chmod(&p, 0o000);
    }
    let st = repo
        .backup(&many, &BackupOptions::default(), 2, &|_| {})
        .unwrap();
    assert_eq!(st.skipped_count, MAX_SKIPPED_LISTED as u64 + 5);
    assert_eq!(st.skipped_entries.len(), MAX_SKIPPED_LISTED);
    assert_eq!(st.skipped.len(), MAX_SKIPPED_LISTED);

    // A source folder that cannot be read at all is an error, not an empty recovery point.
    chmod(&src, 0o000);
    let before = repo.snapshots().unwrap().len();
    let err = repo
        .backup(&src, &BackupOptions::default(), 3, &|_| {})
        .unwrap_err();
    assert!(matches!(err, BackupError::Io { .. }), "{err}");
    assert_eq!(repo.snapshots().unwrap().len(), before);

    // Let the temporary folders be removed.
    chmod(&src, 0o755);
    chmod(&src.join("locked"), 0o755);
}

#[test]
fn missing_source_is_an_error() {
    let rt = runtime();
    let tmp = tempfile::tempdir().unwrap();
    let mut repo = Repository::init(
        local(&tmp.path().join("repo"), &rt),
        DataKey::generate().unwrap(),
    )
    .unwrap();
    let err = repo
        .backup(
            &tmp.path().join("does-not-exist"),
            &BackupOptions::default(),
            1,
            &|_| {},
        )
        .unwrap_err();
    assert!(matches!(err, BackupError::Io { .. }), "{err}");
    assert!(repo.snapshots().unwrap().is_empty());
}

/// Special files are not backed up: they are reported like unreadable entries, and the
/// backup succeeds. This one needs no privileges to fail, so it runs as root too.
#[test]
fn special_files_are_skipped_and_reported() {
    let rt = runtime();
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("a.txt"), b"a").unwrap();
    // A Unix socket is a special file anyone can make without extra crates.
    let _listener = std::os::unix::net::UnixListener::bind(src.join("sock")).unwrap();
    let mut repo = Repository::init(
        local(&tmp.path().join("repo"), &rt),
        DataKey::generate().unwrap(),
    )
    .unwrap();
    let st = repo
        .backup(&src, &BackupOptions::default(), 1, &|_| {})
        .unwrap();
    assert_eq!(st.skipped_count, 1, "{:?}", st.skipped_entries);
    assert!(st.skipped_entries[0].path.ends_with("src/sock"));
    assert!(st.skipped_entries[0].reason.contains("not a regular file"));
    assert_eq!(st.files_read, 1);
}
