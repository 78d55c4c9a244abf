//! Prune: space is given back after `forget`, what is kept still restores byte for byte, and a
//! prune that fails at any storage operation (as if killed there) leaves a repository that
//! restores, checks clean and prunes to completion next time.

#![allow(clippy::unwrap_used)]

mod common;

use std::fs;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::{Faulty, assert_same, copy_dir, dir_size, local, pseudo_random, runtime, walk_files};
use kagi_backup::{BackupOptions, PruneOptions, PruneStats, Repository};
use kagi_crypto::data_key::DataKey;

const MIB: usize = 1024 * 1024;
const MIB64: u64 = MIB as u64;

fn opts(grace: Option<Duration>) -> PruneOptions {
    PruneOptions {
        unindexed_grace: grace,
        ..PruneOptions::default()
    }
}

struct Scenario {
    /// The repository folder.
    repo: std::path::PathBuf,
    /// The data key, raw.
    key: [u8; 32],
    /// What recovery point B holds (its source, unchanged since).
    src: std::path::PathBuf,
    /// Recovery point B.
    b: String,
}

/// Builds a repository with three recovery points and a killed backup, then forgets two:
///
/// - A = {shared, a, sub/keep}: after forgetting A, its pack is half used (shared, sub/keep);
/// - X = {shared (unchanged, so not stored again), x, sub/keep}: X's pack holds only x and X's
///   trees, so it is entirely unused after forgetting X;
/// - B = {shared, b, sub/keep}: kept;
/// - a backup of another folder killed before its index was stored leaves one unindexed pack.
fn scenario(dir: &Path, rt: &tokio::runtime::Runtime) -> Scenario {
    let src = dir.join("src");
    fs::create_dir_all(src.join("sub")).unwrap();
    fs::write(src.join("shared.bin"), pseudo_random(1, 3 * MIB)).unwrap();
    fs::write(src.join("sub/keep.txt"), b"kept in every recovery point\n").unwrap();
    fs::write(src.join("a.bin"), pseudo_random(2, 3 * MIB)).unwrap();
    let repo_dir = dir.join("repo");
    let backend = local(&repo_dir, rt);
    let key = DataKey::generate().unwrap();
    let raw = *key.expose_for_wrapping();
    let mut repo = Repository::init(backend.clone(), key).unwrap();
    let o = BackupOptions::default();
    let a = repo.backup(&src, &o, 1_000, &|_| {}).unwrap();
    fs::remove_file(src.join("a.bin")).unwrap();
    fs::write(src.join("x.bin"), pseudo_random(3, 2 * MIB)).unwrap();
    let x = repo.backup(&src, &o, 2_000, &|_| {}).unwrap();
    assert!(x.files_unchanged >= 2, "X must reuse shared.bin");
    fs::remove_file(src.join("x.bin")).unwrap();
    fs::write(src.join("b.bin"), pseudo_random(4, 3 * MIB)).unwrap();
    let b = repo.backup(&src, &o, 3_000, &|_| {}).unwrap();

    // The killed backup: its pack is stored, its index and snapshot never are.
    let other = dir.join("other");
    fs::create_dir_all(&other).unwrap();
    fs::write(other.join("c.bin"), pseudo_random(5, MIB)).unwrap();
    let mut faulty = Faulty::new(backend.clone());
    faulty.fail_put_prefix = Some("index/".into());
    let mut killed =
        Repository::open(Arc::new(faulty), DataKey::from_bytes(&raw).unwrap()).unwrap();
    assert!(killed.backup(&other, &o, 4_000, &|_| {}).is_err());

    repo.forget(&a.snapshot.id).unwrap();
    repo.forget(&x.snapshot.id).unwrap();
    assert_eq!(walk_files(&repo_dir.join("data")).len(), 4);
    Scenario {
        repo: repo_dir,
        key: raw,
        src,
        b: b.snapshot.id,
    }
}

fn reopen(s: &Scenario, rt: &tokio::runtime::Runtime) -> Repository {
    Repository::open(local(&s.repo, rt), DataKey::from_bytes(&s.key).unwrap()).unwrap()
}

fn restore_matches(repo: &Repository, s: &Scenario, out: &Path) {
    repo.restore(&s.b, None, out, false, 2, &|_| {}).unwrap();
    assert_same(&s.src, out);
    fs::remove_dir_all(out).unwrap();
}

#[test]
fn prune_after_forget_frees_space_and_keeps_the_rest() {
    let rt = runtime();
    let tmp = tempfile::tempdir().unwrap();
    let s = scenario(tmp.path(), &rt);
    let out = tmp.path().join("out");
    let mut repo = reopen(&s, &rt);

    // Before: healthy, with one warning for the killed backup's pack.
    let report = repo.check_report(true).unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert_eq!(report.warnings.len(), 1, "{:?}", report.warnings);
    assert!(report.warnings[0].contains("not referenced by any index"));
    assert!(
        repo.check(true).unwrap().is_empty(),
        "warnings do not fail check"
    );

    // A dry run plans and changes nothing.
    let before = dir_size(&s.repo);
    let files_before = walk_files(&s.repo);
    let plan = repo
        .prune(
            &PruneOptions {
                dry_run: true,
                ..opts(Some(Duration::from_secs(3600)))
            },
            &|_| {},
        )
        .unwrap();
    assert!(plan.dry_run);
    assert_eq!((plan.packs_deleted, plan.packs_repacked), (1, 1));
    assert_eq!(walk_files(&s.repo), files_before);

    // The real prune, with a grace period that protects the fresh unindexed pack.
    let progress = std::sync::Mutex::new(Vec::new());
    let st = repo
        .prune(&opts(Some(Duration::from_secs(3600))), &|p| {
            progress.lock().unwrap().push(p.clone())
        })
        .unwrap();
    assert_eq!(st.snapshots, 1);
    assert_eq!(st.packs_deleted, 1, "X's pack is entirely unused: {st:?}");
    assert_eq!(st.packs_repacked, 1, "A's pack is half unused: {st:?}");
    assert_eq!(st.packs_written, 1, "{st:?}");
    assert_eq!(st.unindexed_packs_kept, 1, "{st:?}");
    assert_eq!(st.unindexed_packs_deleted, 0, "{st:?}");
    // a.bin (3 MiB) and x.bin (2 MiB) are about 80 chunks of 64 KiB.
    assert!(st.blobs_removed > 40, "{st:?}");
    assert!(st.blobs_repacked > 0);
    assert_eq!(st.bytes_unused_remaining, 0, "{st:?}");
    let after = dir_size(&s.repo);
    assert!(after + 4 * MIB64 < before, "before {before}, after {after}");
    // The accounting is exact: only packs and index files changed.
    assert_eq!(before - after, st.bytes_freed, "{st:?}");
    // The dry run's estimate was close (it cannot know the new pack's header size).
    assert!(
        plan.bytes_freed.abs_diff(st.bytes_freed) < 64 * 1024,
        "{plan:?} {st:?}"
    );
    let progress = progress.into_inner().unwrap();
    let last = progress.last().unwrap();
    assert_eq!(last.files_done, 2, "one pack repacked, one deleted");
    assert_eq!(last.bytes_done, last.bytes_total);
    assert!(last.bytes_total > 0);

    // B restores byte for byte, through this object and a freshly opened one.
    restore_matches(&repo, &s, &out);
    let fresh = reopen(&s, &rt);
    restore_matches(&fresh, &s, &out);
    let report = fresh.check_report(true).unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert_eq!(report.warnings.len(), 1, "the young unindexed pack stays");
    assert_eq!(fresh.snapshots().unwrap().len(), 1);

    // Without a grace period the killed backup's pack goes too.
    let st2 = repo.prune(&opts(Some(Duration::ZERO)), &|_| {}).unwrap();
    assert_eq!(st2.unindexed_packs_deleted, 1, "{st2:?}");
    assert_eq!((st2.packs_deleted, st2.packs_repacked), (0, 0), "{st2:?}");
    let report = reopen(&s, &rt).check_report(true).unwrap();
    assert_eq!(
        report,
        Default::default(),
        "clean: no problems, no warnings"
    );

    // Nothing is left to do, and a prune with nothing to do writes nothing.
    let files = walk_files(&s.repo);
    let st3 = repo.prune(&opts(Some(Duration::ZERO)), &|_| {}).unwrap();
    assert_eq!(
        st3,
        PruneStats {
            snapshots: 1,
            duration_ms: st3.duration_ms,
            ..PruneStats::default()
        }
    );
    assert_eq!(walk_files(&s.repo), files);

    // The pruned repository object's index is current: a.bin's chunks were deleted, so a
    // backup through it of a.bin again must store them again, not deduplicate against
    // deleted packs; the result checks clean and restores.
    fs::write(s.src.join("a.bin"), pseudo_random(2, 3 * MIB)).unwrap();
    let again = repo
        .backup(&s.src, &BackupOptions::default(), 5_000, &|_| {})
        .unwrap();
    assert_eq!(again.files_read, 1, "{again:?}");
    assert_eq!(again.chunks_dedup, 0, "{again:?}");
    assert!(again.bytes_added > 3 * MIB64, "{again:?}");
    let fresh = reopen(&s, &rt);
    assert!(fresh.check(true).unwrap().is_empty());
    fresh
        .restore(&again.snapshot.id, None, &out, false, 1, &|_| {})
        .unwrap();
    assert_same(&s.src, &out);
}

#[test]
fn max_unused_bounds_repacking() {
    let rt = runtime();
    let tmp = tempfile::tempdir().unwrap();
    let s = scenario(tmp.path(), &rt);
    let mut repo = reopen(&s, &rt);
    // Tolerating any waste: the unused pack is deleted, the half-used one is left as it is.
    let st = repo
        .prune(
            &PruneOptions {
                max_unused_percent: 100.0,
                ..opts(None)
            },
            &|_| {},
        )
        .unwrap();
    assert_eq!((st.packs_deleted, st.packs_repacked), (1, 0), "{st:?}");
    assert!(st.bytes_unused_remaining >= 3 * MIB64, "{st:?}");
    assert_eq!(
        st.unindexed_packs_kept, 1,
        "None never deletes unindexed packs"
    );
    // A's unused 3 MiB are a third of the 9 MiB of blobs stored: 40% tolerates them, 30%
    // does not.
    let st = repo
        .prune(
            &PruneOptions {
                max_unused_percent: 40.0,
                ..opts(None)
            },
            &|_| {},
        )
        .unwrap();
    assert_eq!(st.packs_repacked, 0, "{st:?}");
    let st = repo
        .prune(
            &PruneOptions {
                max_unused_percent: 30.0,
                ..opts(None)
            },
            &|_| {},
        )
        .unwrap();
    assert_eq!(st.packs_repacked, 1, "{st:?}");
    assert_eq!(st.bytes_unused_remaining, 0);
    restore_matches(&reopen(&s, &rt), &s, &tmp.path().join("out"));
}

#[test]
fn prune_refuses_a_damaged_repository_and_changes_nothing() {
    let rt = runtime();
    let tmp = tempfile::tempdir().unwrap();
    let s = scenario(tmp.path(), &rt);
    // Lose the packs: B can no longer be restored, so nothing can be decided about what it
    // needs, and prune must not make matters worse.
    let mut repo = reopen(&s, &rt);
    for p in walk_files(&s.repo.join("data")) {
        fs::remove_file(p).unwrap();
    }
    let files = walk_files(&s.repo);
    let err = repo
        .prune(&opts(Some(Duration::ZERO)), &|_| {})
        .unwrap_err();
    assert!(matches!(err, kagi_backup::BackupError::Corrupt(_)), "{err}");
    assert!(err.to_string().contains("run check"), "{err}");
    assert_eq!(walk_files(&s.repo), files, "nothing was written or deleted");
    let report = reopen(&s, &rt).check_report(false).unwrap();
    assert!(!report.problems.is_empty());
}

/// Fails the backend at every operation of a prune in turn (and every operation after it, as
/// a kill would), then verifies the repository as a restarted process would see it.
#[test]
fn prune_killed_at_any_operation_leaves_a_sound_repository() {
    let rt = runtime();
    let tmp = tempfile::tempdir().unwrap();
    let s = scenario(tmp.path(), &rt);
    let template = tmp.path().join("template");
    copy_dir(&s.repo, &template);
    let grace0 = opts(Some(Duration::ZERO));

    // How many operations a full prune takes.
    let counting = Arc::new(Faulty::new(local(&s.repo, &rt)));
    let mut repo =
        Repository::open(counting.clone(), DataKey::from_bytes(&s.key).unwrap()).unwrap();
    counting.arm(usize::MAX);
    let full = repo.prune(&grace0, &|_| {}).unwrap();
    assert_eq!((full.packs_deleted, full.packs_repacked), (1, 1));
    assert_eq!(full.unindexed_packs_deleted, 1);
    let total = counting.ops();
    println!("a full prune of this repository takes {total} storage operations");
    assert!(
        total >= 12,
        "a prune of this repository takes {total} operations"
    );
    let pruned_size = dir_size(&s.repo);

    let out = tmp.path().join("out");
    for n in 0..total {
        fs::remove_dir_all(&s.repo).unwrap();
        copy_dir(&template, &s.repo);
        let faulty = Arc::new(Faulty::new(local(&s.repo, &rt)));
        let mut repo =
            Repository::open(faulty.clone(), DataKey::from_bytes(&s.key).unwrap()).unwrap();
        faulty.arm(n);
        let err = repo.prune(&grace0, &|_| {}).unwrap_err();
        assert!(err.to_string().contains("injected failure"), "{n}: {err}");

        // A restarted process: every recovery point restores, check finds no damage.
        let repo = reopen(&s, &rt);
        let snaps = repo.snapshots().unwrap();
        assert_eq!(snaps.len(), 1, "after failing at operation {n}");
        restore_matches(&repo, &s, &out);
        let report = repo.check_report(true).unwrap();
        assert!(
            report.problems.is_empty(),
            "after failing at operation {n}: {:?}",
            report.problems
        );

        // The next prune completes, leaving the same clean repository as an uninterrupted one.
        let mut repo = reopen(&s, &rt);
        repo.prune(&grace0, &|_| {}).unwrap();
        let repo = reopen(&s, &rt);
        let report = repo.check_report(true).unwrap();
        assert_eq!(report, Default::default(), "after failing at operation {n}");
        restore_matches(&repo, &s, &out);
        // The same shape as an uninterrupted prune: B's pack and the repacked one, one index
        // (sizes may differ by a few bytes of compressed index).
        assert_eq!(walk_files(&s.repo.join("data")).len(), 2, "after {n}");
        assert_eq!(walk_files(&s.repo.join("index")).len(), 1, "after {n}");
        assert!(
            dir_size(&s.repo).abs_diff(pruned_size) < 1024,
            "after failing at operation {n}"
        );
    }
}
