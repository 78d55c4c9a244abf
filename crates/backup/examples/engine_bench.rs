//! Times the engine alone: `cargo run --release -p kagi-backup --example engine_bench -- SRC REPO OUT`
//! backs SRC up into a new repository at REPO, backs it up again (incremental), restores the
//! latest recovery point into OUT, and prints seconds and MB/s for each step.

#![allow(clippy::unwrap_used, missing_docs)]

use std::sync::Arc;
use std::time::Instant;

use kagi_backup::{BackupOptions, ObjectStoreBackend, Repository};
use kagi_crypto::data_key::DataKey;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (src, repo_dir, out) = (&args[1], &args[2], &args[3]);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let backend = Arc::new(
        ObjectStoreBackend::local(std::path::Path::new(repo_dir), rt.handle().clone()).unwrap(),
    );
    let mut repo = Repository::init(backend, DataKey::generate().unwrap()).unwrap();
    let opts = BackupOptions::default();
    for label in ["full", "again"] {
        let t = Instant::now();
        let s = repo
            .backup(std::path::Path::new(src), &opts, 1, &|_| {})
            .unwrap();
        let secs = t.elapsed().as_secs_f64();
        println!(
            "{label}: {:.2}s {:.0} MB/s read={} new={} added={} files_read={} unchanged={}",
            secs,
            s.snapshot.bytes as f64 / 1e6 / secs,
            s.bytes_read,
            s.bytes_new,
            s.bytes_added,
            s.files_read,
            s.files_unchanged
        );
    }
    let snap = repo.snapshots().unwrap().pop().unwrap();
    let t = Instant::now();
    let r = repo
        .restore(&snap.id, None, std::path::Path::new(out), false, 2, &|_| {})
        .unwrap();
    let secs = t.elapsed().as_secs_f64();
    println!(
        "restore: {:.2}s {:.0} MB/s bytes={}",
        secs,
        r.bytes as f64 / 1e6 / secs,
        r.bytes
    );
}
