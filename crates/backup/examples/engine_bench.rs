//! The backup engine alone, for benchmarks (scripts/bench-backup.sh):
//!
//!   engine_bench backup SRC REPO     back SRC up into REPO (created on first use)
//!   engine_bench restore REPO OUT    restore REPO's newest recovery point into OUT
//!
//! REPO is a folder, or `s3://bucket/prefix` (the AWS_* variables as for `kagi server --blobs`;
//! scripts/bench-blobs.sh). The data key lives unwrapped in `REPO.key` (for a bucket, in the file
//! `$KAGI_BENCH_KEY_FILE`) — acceptable for a benchmark only; the backup vault service keeps it
//! wrapped by the vault's key. Prints what was stored and how fast.

#![allow(clippy::unwrap_used, missing_docs)]

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use kagi_backup::{BackupOptions, ObjectStoreBackend, Repository};
use kagi_blobs::{BlobLocation, BlobRoot};
use kagi_crypto::data_key::DataKey;

/// The repository at `repo` (a folder or `s3://…`) and the file of its data key.
fn open(repo: &str, rt: &tokio::runtime::Runtime) -> (Arc<ObjectStoreBackend>, String) {
    if repo.starts_with("s3://") {
        let root = BlobRoot::open(&BlobLocation::parse(repo).unwrap(), Path::new("/")).unwrap();
        let store = root.remote(Path::new("/")).unwrap().unwrap();
        let key_file = std::env::var("KAGI_BENCH_KEY_FILE").expect("KAGI_BENCH_KEY_FILE");
        return (
            Arc::new(ObjectStoreBackend::new(store, rt.handle().clone())),
            key_file,
        );
    }
    (
        Arc::new(ObjectStoreBackend::local(Path::new(repo), rt.handle().clone()).unwrap()),
        format!("{repo}.key"),
    )
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    match args.get(1).map(String::as_str) {
        Some("backup") => {
            let src = Path::new(&args[2]);
            let (backend, key_file) = open(&args[3], &rt);
            let mut repo = match std::fs::read(&key_file) {
                Ok(raw) => Repository::open(
                    backend,
                    DataKey::from_bytes(&raw.try_into().unwrap()).unwrap(),
                )
                .unwrap(),
                Err(_) => {
                    let key = DataKey::generate().unwrap();
                    std::fs::write(&key_file, key.expose_for_wrapping()).unwrap();
                    Repository::init(backend, key).unwrap()
                }
            };
            let t = Instant::now();
            let s = repo
                .backup(src, &BackupOptions::default(), 0, &|_| {})
                .unwrap();
            let secs = t.elapsed().as_secs_f64();
            println!(
                "backup {:.2}s {:.0} MB/s: read {} B, {} new chunks ({} B), {} deduplicated, {} B added, {} files read, {} unchanged",
                secs,
                s.snapshot.bytes as f64 / 1e6 / secs,
                s.bytes_read,
                s.chunks_new,
                s.bytes_new,
                s.chunks_dedup,
                s.bytes_added,
                s.files_read,
                s.files_unchanged
            );
        }
        Some("restore") => {
            let out = Path::new(&args[3]);
            let (backend, key_file) = open(&args[2], &rt);
            let raw = std::fs::read(key_file).unwrap();
            let repo = Repository::open(
                backend,
                DataKey::from_bytes(&raw.try_into().unwrap()).unwrap(),
            )
            .unwrap();
            let snap = repo.snapshots().unwrap().pop().unwrap();
            let t = Instant::now();
            let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
            let r = repo
                .restore(&snap.id, None, out, false, workers, &|_| {})
                .unwrap();
            let secs = t.elapsed().as_secs_f64();
            println!(
                "restore {:.2}s {:.0} MB/s: {} B",
                secs,
                r.bytes as f64 / 1e6 / secs,
                r.bytes
            );
        }
        _ => eprintln!("usage: engine_bench backup SRC REPO | restore REPO OUT"),
    }
}
