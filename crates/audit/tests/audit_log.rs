//! The audit log end to end: chain, group commit, recovery, failure and queries.

#![allow(clippy::unwrap_used, missing_docs)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kagi_audit::{
    AuditConfig, AuditError, AuditLog, AuditRecord, Claim, Filter, Identity, RequestProperties,
    ResultType, VerifyError, format_rfc3339_ms, now_unix_ms, query, verify,
};

fn record(op: &str, status: u16, oid: Option<&str>) -> AuditRecord {
    AuditRecord {
        time: format_rfc3339_ms(now_unix_ms()),
        operation_name: op.into(),
        result_type: ResultType::from_status(status),
        result_signature: kagi_audit::reason_phrase(status).into(),
        result_description: (status >= 400).then(|| "Forbidden/ForbiddenByPolicy".into()),
        http_status_code: status,
        caller_ip_address: Some("127.0.0.1".into()),
        identity: oid.map(|oid| Identity {
            claim: Claim {
                oid: oid.into(),
                appid: "app".into(),
                tid: "tenant".into(),
                upn: None,
            },
        }),
        resource_id: "/subscriptions/s/resourceGroups/rg/providers/Microsoft.KeyVault/vaults/v"
            .into(),
        properties: RequestProperties {
            id: "https://v.localhost:8443/keys/k/0123456789abcdef0123456789abcdef".into(),
            request_uri: "https://v.localhost:8443/keys/k/wrapkey?api-version=7.4".into(),
            client_info: "test".into(),
            http_method: "POST".into(),
            is_rbac_authorized: Some(false),
        },
        correlation_id: kagi_audit::new_correlation_id(),
        duration_ms: 1,
    }
}

fn fast_config() -> AuditConfig {
    AuditConfig {
        ack_timeout: Duration::from_secs(2),
        retry_delay: Duration::from_millis(100),
        max_batch: 1024,
        fail_file: None,
        reserve: 64 * 1024,
    }
}

fn file_of(dir: &Path) -> PathBuf {
    dir.join("audit").join("audit.jsonl")
}

async fn log_with(dir: &Path, n: usize) -> PathBuf {
    let log = AuditLog::open_with(dir, fast_config()).unwrap();
    for i in 0..n {
        let oid = format!("oid-{i}");
        log.append(record("KeyWrap", 200, Some(&oid)))
            .await
            .unwrap();
    }
    log.path().to_path_buf()
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

fn write_lines(path: &Path, lines: &[String]) {
    let mut text = lines.join("\n");
    text.push('\n');
    std::fs::write(path, text).unwrap();
}

fn broken_line(path: &Path) -> u64 {
    match verify(path) {
        Err(VerifyError::Broken { line, .. }) => line,
        other => panic!("expected a broken chain, got {other:?}"),
    }
}

#[tokio::test]
async fn chain_verifies_and_detects_tampering() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_with(dir.path(), 10).await;
    let report = verify(&path).unwrap();
    assert_eq!(report.records, 10);
    assert_eq!(report.last_hash.len(), 64);
    let original = lines(&path);
    assert_eq!(original.len(), 10);
    let tampered = dir.path().join("t.jsonl");

    // An edited field.
    let mut l = original.clone();
    l[4] = l[4].replace("\"httpStatusCode\":200", "\"httpStatusCode\":201");
    assert_ne!(l[4], original[4]);
    write_lines(&tampered, &l);
    assert_eq!(broken_line(&tampered), 5);

    // One changed byte anywhere in a record (here: inside the caller's oid).
    let mut l = original.clone();
    l[2] = l[2].replace("oid-2", "oid-X");
    write_lines(&tampered, &l);
    assert_eq!(broken_line(&tampered), 3);

    // A deleted line.
    let mut l = original.clone();
    l.remove(3);
    write_lines(&tampered, &l);
    assert_eq!(broken_line(&tampered), 4);

    // The last line deleted is not detectable by the chain alone, but the count and the
    // last hash change.
    let mut l = original.clone();
    l.pop();
    write_lines(&tampered, &l);
    let r = verify(&tampered).unwrap();
    assert_eq!(r.records, 9);
    assert_ne!(r.last_hash, report.last_hash);

    // A swapped pair.
    let mut l = original.clone();
    l.swap(6, 7);
    write_lines(&tampered, &l);
    assert_eq!(broken_line(&tampered), 7);

    // An inserted copy of a record.
    let mut l = original.clone();
    let dup = l[1].clone();
    l.insert(2, dup);
    write_lines(&tampered, &l);
    assert_eq!(broken_line(&tampered), 3);

    // A forged record appended: right seq and prevHash, but a hash it could not compute
    // without following the format; here the last record altered and re-linked.
    let mut l = original.clone();
    let prev = kagi_audit::sha256_hex(l[9].as_bytes());
    let mut forged: serde_json::Value = serde_json::from_str(&l[9]).unwrap();
    forged["seq"] = 11.into();
    forged["prevHash"] = prev.into();
    forged["operationName"] = "KeyPurge".into();
    l.push(kagi_audit::canonical_json(&forged));
    write_lines(&tampered, &l);
    assert_eq!(broken_line(&tampered), 11);

    // Whitespace added to a record (content equal, form not canonical).
    let mut l = original.clone();
    l[0] = l[0].replacen(',', ", ", 1);
    write_lines(&tampered, &l);
    assert_eq!(broken_line(&tampered), 1);

    // Garbage appended without a newline.
    let mut text = original.join("\n");
    text.push_str("\n{\"seq\":11");
    std::fs::write(&tampered, text).unwrap();
    assert_eq!(broken_line(&tampered), 11);

    // The original is untouched and still verifies.
    assert_eq!(verify(&path).unwrap(), report);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn group_commit_acknowledges_every_record_once_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(AuditLog::open_with(dir.path(), fast_config()).unwrap());
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..8 {
        let log = log.clone();
        tasks.spawn(async move {
            let mut seqs = Vec::new();
            for i in 0..200 {
                let oid = format!("task{t}-{i}");
                seqs.push(log.append(record("KeyGet", 200, Some(&oid))).await.unwrap());
            }
            seqs
        });
    }
    let mut all = Vec::new();
    while let Some(r) = tasks.join_next().await {
        let seqs = r.unwrap();
        // Each task's own records are in the order it appended them.
        assert!(seqs.windows(2).all(|w| w[0] < w[1]));
        all.extend(seqs);
    }
    all.sort_unstable();
    assert_eq!(all, (1..=1600).collect::<Vec<u64>>());
    assert_eq!(verify(log.path()).unwrap().records, 1600);
    // Every record is in the file exactly once.
    let text = std::fs::read_to_string(log.path()).unwrap();
    for t in 0..8 {
        for i in 0..200 {
            assert_eq!(text.matches(&format!("\"task{t}-{i}\"")).count(), 1);
        }
    }
}

#[tokio::test]
async fn reopening_continues_the_chain_and_cuts_an_incomplete_tail() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_with(dir.path(), 5).await;
    {
        let log = AuditLog::open_with(dir.path(), fast_config()).unwrap();
        assert_eq!(log.append(record("KeyGet", 200, None)).await.unwrap(), 6);
        assert_eq!(log.append(record("KeyGet", 404, None)).await.unwrap(), 7);
    }
    assert_eq!(verify(&path).unwrap().records, 7);

    // A crash in the middle of a write leaves a fragment that was never acknowledged.
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str("{\"category\":\"AuditEv");
    std::fs::write(&path, &text).unwrap();
    assert!(verify(&path).is_err());
    let log = AuditLog::open_with(dir.path(), fast_config()).unwrap();
    assert_eq!(log.append(record("KeyGet", 200, None)).await.unwrap(), 8);
    assert_eq!(verify(&path).unwrap().records, 8);
}

#[tokio::test]
async fn a_damaged_last_record_refuses_to_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_with(dir.path(), 3).await;
    let mut l = lines(&path);
    l[2] = l[2].replace("KeyWrap", "KeyWrapX");
    write_lines(&path, &l);
    match AuditLog::open_with(dir.path(), fast_config()) {
        Err(AuditError::Corrupt { .. }) => {}
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

#[tokio::test]
async fn creates_private_directory_and_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_with(dir.path(), 1).await;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&path), 0o600);
    assert_eq!(mode(path.parent().unwrap()), 0o700);
    let line = &lines(&path)[0];
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    assert_eq!(v["category"], "AuditEvent");
    assert_eq!(v["seq"], 1);
    assert_eq!(v["prevHash"], kagi_audit::GENESIS_HASH);
    assert_eq!(v["resultType"], "Success");
    assert_eq!(v["identity"]["claim"]["oid"], "oid-0");
    assert!(v["time"].as_str().unwrap().ends_with('Z'));
}

#[tokio::test]
async fn an_unopenable_path_fails_to_open() {
    let dir = tempfile::tempdir().unwrap();
    // The file's place taken by a directory: works as root too.
    std::fs::create_dir_all(file_of(dir.path())).unwrap();
    assert!(matches!(
        AuditLog::open_with(dir.path(), fast_config()),
        Err(AuditError::Open { .. })
    ));
    // The directory's place taken by a file.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("audit"), b"not a directory").unwrap();
    assert!(matches!(
        AuditLog::open_with(dir.path(), fast_config()),
        Err(AuditError::Open { .. })
    ));
}

/// Appends until one succeeds or the bound passes.
async fn append_until_ok(log: &AuditLog, bound: Duration) -> u64 {
    let deadline = Instant::now() + bound;
    loop {
        match log.append(record("KeyGet", 200, None)).await {
            Ok(seq) => return seq,
            Err(e) => {
                assert!(Instant::now() < deadline, "the log did not recover: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_failure_refuses_in_bounded_time_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let trigger = dir.path().join("fail-now");
    let mut config = fast_config();
    config.fail_file = Some(trigger.clone());
    let log = AuditLog::open_with(dir.path(), config).unwrap();
    assert_eq!(log.append(record("KeyGet", 200, None)).await.unwrap(), 1);
    assert!(log.is_healthy());

    std::fs::write(&trigger, b"").unwrap();
    let started = Instant::now();
    let err = log.append(record("KeyGet", 200, None)).await.unwrap_err();
    assert!(matches!(err, AuditError::Write(_)), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(!log.is_healthy());
    // Later appends fail too, and quickly (no waiting for the acknowledgement bound).
    let started = Instant::now();
    for _ in 0..5 {
        assert!(log.append(record("KeyGet", 200, None)).await.is_err());
    }
    assert!(started.elapsed() < Duration::from_secs(10));

    std::fs::remove_file(&trigger).unwrap();
    let seq = append_until_ok(&log, Duration::from_secs(10)).await;
    assert_eq!(seq, 2, "failed appends must not consume sequence numbers");
    assert!(log.is_healthy());
    assert_eq!(verify(log.path()).unwrap().records, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_writer_recovers_on_its_own_while_nobody_appends() {
    let dir = tempfile::tempdir().unwrap();
    let trigger = dir.path().join("fail-now");
    let mut config = fast_config();
    config.fail_file = Some(trigger.clone());
    let log = AuditLog::open_with(dir.path(), config).unwrap();
    std::fs::write(&trigger, b"").unwrap();
    assert!(log.append(record("KeyGet", 200, None)).await.is_err());
    assert!(!log.is_healthy());
    std::fs::remove_file(&trigger).unwrap();
    // The HTTP layer stops appending while unhealthy; the writer must retry by itself.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !log.is_healthy() {
        assert!(
            Instant::now() < deadline,
            "the log did not become healthy again"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(log.append(record("KeyGet", 200, None)).await.unwrap(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_that_cannot_reserve_space_does_not_open() {
    // /dev/full refuses every write with ENOSPC, also for root, and cannot be fallocated.
    if !Path::new("/dev/full").exists() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = file_of(dir.path());
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::os::unix::fs::symlink("/dev/full", &path).unwrap();
    assert!(matches!(
        AuditLog::open_with(dir.path(), fast_config()),
        Err(AuditError::Open { .. })
    ));
    std::fs::remove_file(&path).unwrap();
    let log = AuditLog::open_with(dir.path(), fast_config()).unwrap();
    assert_eq!(log.append(record("KeyGet", 200, None)).await.unwrap(), 1);
    assert_eq!(verify(&path).unwrap().records, 1);
}

/// A small tmpfs mounted on a temporary directory for as long as this lives (root only).
struct Tmpfs(tempfile::TempDir);

impl Tmpfs {
    fn mount(size: &str) -> Option<Self> {
        let root = std::process::Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| o.stdout.trim_ascii() == b"0");
        if !root {
            eprintln!("skipped: mounting a tmpfs needs root");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(status.success(), "root could not mount a tmpfs");
        Some(Self(dir))
    }

    fn path(&self) -> &Path {
        self.0.path()
    }

    /// Fills the filesystem: writes until ENOSPC.
    fn fill(&self) -> PathBuf {
        use std::io::Write;
        let filler = self.path().join("filler");
        let mut f = std::fs::File::create(&filler).unwrap();
        let block = vec![0u8; 4096];
        while f.write_all(&block).is_ok() {}
        let _ = f.sync_all();
        filler
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.0.path())
            .status();
    }
}

/// A full disk (issue 11, item 4): records of requests already admitted still fit (the
/// reserve), the log then refuses new ones, and reopening the file is not taken for recovery:
/// the log stays unhealthy for as long as the disk is full, and recovers once it is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_keeps_the_log_unhealthy_until_there_is_room() {
    let Some(fs) = Tmpfs::mount("2m") else {
        return;
    };
    let log = AuditLog::open_with(fs.path(), fast_config()).unwrap();
    assert_eq!(log.append(record("KeyGet", 200, None)).await.unwrap(), 1);
    let filler = fs.fill();
    // What is admitted while healthy is written: appends succeed until the reserve runs low,
    // and then the log says so before the reserve is gone.
    let mut written = 1;
    while log.is_healthy() {
        log.append(record("KeyCreate", 200, Some("oid")))
            .await
            .expect("a record admitted while the log is healthy must be written");
        written += 1;
        assert!(written < 10_000, "the reserve never ran low");
    }
    // Several retry periods later, with the disk still full, it must still refuse.
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            !log.is_healthy(),
            "the log turned healthy while the disk is full"
        );
    }
    std::fs::remove_file(&filler).unwrap();
    let seq = append_until_ok(&log, Duration::from_secs(10)).await;
    assert_eq!(seq, written + 1);
    assert_eq!(verify(log.path()).unwrap().records, written + 1);
}

#[tokio::test]
async fn queries_filter_records() {
    let dir = tempfile::tempdir().unwrap();
    let log = AuditLog::open_with(dir.path(), fast_config()).unwrap();
    let before = now_unix_ms() - 1;
    log.append(record("KeyCreate", 200, Some("alice")))
        .await
        .unwrap();
    log.append(record("KeyWrap", 200, Some("bob")))
        .await
        .unwrap();
    log.append(record("KeyWrap", 403, Some("alice")))
        .await
        .unwrap();
    let mut other = record("VaultGet", 401, None);
    other.resource_id = "localhost".into();
    other.properties.id = "https://localhost:8443/subscriptions".into();
    log.append(other).await.unwrap();
    let path = log.path().to_path_buf();
    let run = |f: Filter| -> Vec<u64> {
        query(&path, f)
            .unwrap()
            .map(|e| e.unwrap().record["seq"].as_u64().unwrap())
            .collect()
    };
    assert_eq!(run(Filter::default()), vec![1, 2, 3, 4]);
    assert_eq!(
        run(Filter {
            operation: Some("keywrap".into()),
            ..Filter::default()
        }),
        vec![2, 3]
    );
    assert_eq!(
        run(Filter {
            result: Some("Failure".into()),
            ..Filter::default()
        }),
        vec![3, 4]
    );
    assert_eq!(
        run(Filter {
            caller_oid: Some("alice".into()),
            ..Filter::default()
        }),
        vec![1, 3]
    );
    assert_eq!(
        run(Filter {
            resource: Some("VAULTS/V".into()),
            ..Filter::default()
        }),
        vec![1, 2, 3]
    );
    assert_eq!(
        run(Filter {
            since_ms: Some(before),
            until_ms: Some(now_unix_ms() + 1000),
            ..Filter::default()
        }),
        vec![1, 2, 3, 4]
    );
    assert!(
        run(Filter {
            since_ms: Some(now_unix_ms() + 60_000),
            ..Filter::default()
        })
        .is_empty()
    );
    assert!(
        run(Filter {
            until_ms: Some(before - 60_000),
            ..Filter::default()
        })
        .is_empty()
    );
}

/// Admissions (issue 11, item 4): the reserve bounds the records of requests admitted and not
/// yet written, so a burst on a nearly full disk cannot promise more than fits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admissions_are_bounded_by_the_reserve() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = fast_config();
    config.reserve = 4 * kagi_audit::MAX_RECORD_BYTES;
    let log = AuditLog::open_with(dir.path(), config).unwrap();
    let held: Vec<_> = (0..4)
        .map(|_| log.admit().expect("room for four"))
        .collect();
    assert!(
        log.admit().is_none(),
        "a fifth record does not fit in the reserve"
    );
    drop(held);
    let one = log
        .admit()
        .expect("room again once the records are written");
    log.append(record("KeyGet", 200, None)).await.unwrap();
    drop(one);
    assert!(log.admit().is_some());
}

/// Counts what the log reports of its batches.
#[derive(Debug, Default)]
struct Batches {
    records: std::sync::atomic::AtomicUsize,
    batches: std::sync::atomic::AtomicUsize,
}

impl kagi_audit::BatchObserver for Batches {
    fn batch_written(&self, records: usize, sync: Duration) {
        use std::sync::atomic::Ordering;
        assert!(sync < Duration::from_secs(60));
        self.records.fetch_add(records, Ordering::SeqCst);
        self.batches.fetch_add(1, Ordering::SeqCst);
    }
}

#[tokio::test]
async fn the_observer_hears_of_every_record_written() {
    use std::sync::atomic::Ordering;
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(AuditLog::open_with(dir.path(), fast_config()).unwrap());
    let seen = Arc::new(Batches::default());
    assert!(log.set_observer(seen.clone()));
    assert!(
        !log.set_observer(Arc::new(Batches::default())),
        "only the first is kept"
    );
    let mut tasks = Vec::new();
    for i in 0..20 {
        let log = log.clone();
        tasks.push(tokio::spawn(async move {
            log.append(record(&format!("Op{i}"), 200, None))
                .await
                .unwrap()
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(seen.records.load(Ordering::SeqCst), 20);
    let batches = seen.batches.load(Ordering::SeqCst);
    assert!((1..=20).contains(&batches), "{batches}");
}
