//! Helpers shared by the integration tests. Each test binary uses a different subset, hence
//! the `dead_code` allowance.

#![allow(dead_code, clippy::unwrap_used)]

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use kagi_backup::{BackupError, BlobBackend, ObjectInfo, ObjectStoreBackend};

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

/// Deterministic incompressible bytes (xorshift).
pub fn pseudo_random(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Compares two trees: names, kinds, content, modes, symlink targets, file mtimes.
pub fn assert_same(a: &Path, b: &Path) {
    let mut names_a: Vec<_> = fs::read_dir(a)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    let mut names_b: Vec<_> = fs::read_dir(b)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names_a.sort();
    names_b.sort();
    assert_eq!(names_a, names_b, "entries of {}", a.display());
    for n in names_a {
        let (pa, pb) = (a.join(&n), b.join(&n));
        let (ma, mb) = (
            pa.symlink_metadata().unwrap(),
            pb.symlink_metadata().unwrap(),
        );
        assert_eq!(ma.file_type(), mb.file_type(), "{}", pa.display());
        if ma.file_type().is_symlink() {
            assert_eq!(fs::read_link(&pa).unwrap(), fs::read_link(&pb).unwrap());
            continue;
        }
        assert_eq!(
            ma.mode() & 0o7777,
            mb.mode() & 0o7777,
            "mode of {}",
            pa.display()
        );
        if ma.is_dir() {
            assert_same(&pa, &pb);
        } else {
            assert_eq!(
                fs::read(&pa).unwrap(),
                fs::read(&pb).unwrap(),
                "content of {}",
                pa.display()
            );
            assert_eq!(
                (ma.mtime(), ma.mtime_nsec()),
                (mb.mtime(), mb.mtime_nsec()),
                "mtime of {}",
                pa.display()
            );
        }
    }
}

pub fn walk_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd {
            let p = e.unwrap().path();
            if p.is_dir() {
                out.extend(walk_files(&p));
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// Bytes of all files under `dir`.
pub fn dir_size(dir: &Path) -> u64 {
    walk_files(dir)
        .iter()
        .map(|p| p.metadata().unwrap().len())
        .sum()
}

/// Copies a folder tree (files and directories only).
pub fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for e in fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            fs::copy(e.path(), &target).unwrap();
        }
    }
}

pub fn local(dir: &Path, rt: &tokio::runtime::Runtime) -> Arc<dyn BlobBackend> {
    Arc::new(ObjectStoreBackend::local(dir, rt.handle().clone()).unwrap())
}

/// A backend that fails on purpose: every operation from the `fail_from`-th on (counting from
/// 0 after `arm`) fails, as if the process had been killed there; or every `put` under
/// `fail_put_prefix` fails (a backup killed before its index is stored).
pub struct Faulty {
    pub inner: Arc<dyn BlobBackend>,
    pub ops: AtomicUsize,
    pub fail_from: AtomicUsize,
    pub fail_put_prefix: Option<String>,
}

impl Faulty {
    pub fn new(inner: Arc<dyn BlobBackend>) -> Self {
        Self {
            inner,
            ops: AtomicUsize::new(0),
            fail_from: AtomicUsize::new(usize::MAX),
            fail_put_prefix: None,
        }
    }

    /// Restarts the count; operation number `n` and all after it fail.
    pub fn arm(&self, n: usize) {
        self.ops.store(0, Ordering::SeqCst);
        self.fail_from.store(n, Ordering::SeqCst);
    }

    pub fn ops(&self) -> usize {
        self.ops.load(Ordering::SeqCst)
    }

    fn step(&self, what: &str, name: &str) -> Result<(), BackupError> {
        let n = self.ops.fetch_add(1, Ordering::SeqCst);
        if n >= self.fail_from.load(Ordering::SeqCst) {
            return Err(BackupError::Storage(format!(
                "injected failure at operation {n} ({what} {name})"
            )));
        }
        Ok(())
    }
}

impl BlobBackend for Faulty {
    fn put(&self, name: &str, data: Vec<u8>) -> Result<(), BackupError> {
        self.step("put", name)?;
        if self
            .fail_put_prefix
            .as_deref()
            .is_some_and(|p| name.starts_with(p))
        {
            return Err(BackupError::Storage(format!(
                "injected failure: put {name}"
            )));
        }
        self.inner.put(name, data)
    }
    fn get(&self, name: &str) -> Result<Vec<u8>, BackupError> {
        self.step("get", name)?;
        self.inner.get(name)
    }
    fn get_range(&self, name: &str, start: u64, len: u64) -> Result<Vec<u8>, BackupError> {
        self.step("get_range", name)?;
        self.inner.get_range(name, start, len)
    }
    fn list(&self, prefix: &str) -> Result<Vec<String>, BackupError> {
        self.step("list", prefix)?;
        self.inner.list(prefix)
    }
    fn list_meta(&self, prefix: &str) -> Result<Vec<ObjectInfo>, BackupError> {
        self.step("list_meta", prefix)?;
        self.inner.list_meta(prefix)
    }
    fn delete(&self, name: &str) -> Result<(), BackupError> {
        self.step("delete", name)?;
        self.inner.delete(name)
    }
}
