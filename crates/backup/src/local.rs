//! Durable writes to a repository in a local folder.
//!
//! `object_store`'s local backend does not flush by default, and never flushes a deletion: a
//! power loss could then undo an acknowledged backup, or bring back an index that prune had
//! deleted after the packs it names. Here every write is flushed before it returns: the content
//! under a temporary name, then the new name in its directory, and every directory created on
//! the way in its parent; a deletion is flushed too, so the steps of prune stay in order on disk.
//!
//! [`LocalWrites`] is public: the backup service stores its agents' objects with it too.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::{BackupError, Result, io_err};

/// Flushes files and directory entries to stable storage. A seam so that tests can see which
/// syncs a write makes, and in what order; [`Fsync`] is the real one.
pub trait Syncer: Send + Sync {
    /// Flushes a file's contents and metadata.
    fn sync_file(&self, file: &File, path: &Path) -> io::Result<()>;
    /// Flushes a directory's entries.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
}

/// `fsync` on files and directories.
#[derive(Debug)]
pub struct Fsync;

impl Syncer for Fsync {
    fn sync_file(&self, file: &File, _path: &Path) -> io::Result<()> {
        file.sync_all()
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        kagi_fs::sync_dir(dir)
    }
}

/// Writes and deletes files under a root folder, durably: [`LocalWrites::put`] writes a
/// temporary file, flushes it, renames it into place and flushes the directory, so a power
/// loss leaves the old content or the new, never a torn file; every directory it creates is
/// flushed into its parent first. Safe to share between threads; it blocks (call it off an
/// async runtime's workers).
pub struct LocalWrites {
    root: PathBuf,
    syncer: Arc<dyn Syncer>,
    /// Directories whose own entry is known to be flushed into their parent (by this process),
    /// with their inode then: one removed and created anew is flushed again. A directory found
    /// already existing is flushed into its parent once all the same: another writer (or a
    /// crash before it synced) may have left its entry unflushed. The lock is held only to
    /// look up and record, never across a flush.
    durable: Mutex<HashMap<PathBuf, u64>>,
}

impl std::fmt::Debug for LocalWrites {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalWrites")
            .field("root", &self.root)
            .finish_non_exhaustive()
    }
}

fn inode(dir: &Path) -> Option<u64> {
    fs::metadata(dir)
        .ok()
        .filter(|m| m.is_dir())
        .map(|m| m.ino())
}

impl LocalWrites {
    /// Creates the folder `root` (and missing parents) durably, and flushes its entry into its
    /// parent even when it exists (it may have been created without a flush). [`Fsync`] is
    /// the `syncer` outside tests.
    pub fn new(root: &Path, syncer: Arc<dyn Syncer>) -> Result<Self> {
        let root = std::path::absolute(root).map_err(io_err(root))?;
        let mut w = Self {
            root,
            syncer,
            durable: Mutex::new(HashMap::new()),
        };
        w.ensure_dir(&w.root)?;
        // Object paths are derived from the canonical root (as `object_store` makes them).
        w.root = fs::canonicalize(&w.root).map_err(io_err(&w.root))?;
        if let (Ok(mut d), Some(ino)) = (w.durable.lock(), inode(&w.root)) {
            d.insert(w.root.clone(), ino);
        }
        Ok(w)
    }

    /// The canonical root folder: paths given to the other methods are under it.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn is_durable(&self, dir: &Path) -> bool {
        let known = self.durable.lock().ok().and_then(|d| d.get(dir).copied());
        known.is_some() && known == inode(dir)
    }

    /// Makes sure the directory `dir` exists and that its entry, and those of its ancestors up
    /// to the root, are flushed into their parents. A file where a directory goes is an error
    /// of kind [`io::ErrorKind::AlreadyExists`].
    pub fn ensure_dir(&self, dir: &Path) -> Result<()> {
        if self.is_durable(dir) {
            return Ok(());
        }
        let inside = dir.starts_with(&self.root);
        // Of the folders that hold the repository, only missing ones are created (and flushed).
        if !inside && dir.is_dir() {
            return Ok(());
        }
        let Some(parent) = dir.parent() else {
            return Ok(());
        };
        self.ensure_dir(parent)?;
        match fs::create_dir(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => {}
            Err(e) => return Err(io_err(dir)(e)),
        }
        self.syncer.sync_dir(parent).map_err(io_err(parent))?;
        if inside && let (Ok(mut d), Some(ino)) = (self.durable.lock(), inode(dir)) {
            d.insert(dir.to_path_buf(), ino);
        }
        Ok(())
    }

    /// Stores `data` at `path` (under the root): returns once content and name are durable.
    /// Nothing is left behind when it fails.
    pub fn put(&self, path: &Path, data: &[u8]) -> Result<()> {
        let dir = path
            .parent()
            .filter(|d| d.starts_with(&self.root))
            .ok_or_else(|| {
                BackupError::Invalid(format!("{} is not an object path", path.display()))
            })?;
        self.ensure_dir(dir)?;
        let (mut file, tmp) = create_temporary(path)?;
        let r = file
            .write_all(data)
            .and_then(|()| self.syncer.sync_file(&file, &tmp))
            .map_err(io_err(&tmp))
            .and_then(|()| {
                drop(file);
                // rename replaces atomically: readers see the old object or the new one.
                fs::rename(&tmp, path).map_err(io_err(path))
            });
        if let Err(e) = r {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        self.syncer.sync_dir(dir).map_err(io_err(dir))
    }

    /// Removes the file at `path` (none is fine): returns once the removal is durable.
    pub fn delete(&self, path: &Path) -> Result<()> {
        match fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_err(path)(e)),
        }
        match path.parent() {
            Some(dir) => self.syncer.sync_dir(dir).map_err(io_err(dir)),
            None => Ok(()),
        }
    }
}

/// Creates a new temporary file next to `path`, named `{name}#{digits}`: `object_store` lists
/// never show such names (its own staging files), so one left by a crash stays invisible.
fn create_temporary(path: &Path) -> Result<(File, PathBuf)> {
    loop {
        let n = u64::from_le_bytes(kagi_crypto::random_array::<8>()?);
        let mut name = path.as_os_str().to_owned();
        name.push(format!("#{n}"));
        let tmp = PathBuf::from(name);
        match fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
        {
            Ok(f) => return Ok((f, tmp)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(io_err(&tmp)(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::path::PathBuf;
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::{BlobBackend, ObjectStoreBackend};

    /// Records each sync with what was on disk at that moment, and can fail file syncs.
    struct Recorder {
        base: PathBuf,
        events: Mutex<Vec<String>>,
        fail_files: bool,
    }

    impl Recorder {
        fn rel(&self, p: &Path) -> String {
            let r = p.strip_prefix(&self.base).unwrap().display().to_string();
            if r.is_empty() { ".".into() } else { r }
        }

        fn take(&self) -> Vec<String> {
            std::mem::take(&mut *self.events.lock().unwrap())
        }
    }

    impl Syncer for Recorder {
        fn sync_file(&self, file: &File, path: &Path) -> io::Result<()> {
            // A file is synced under a temporary name; its final name must not exist yet.
            let s = path.to_str().unwrap();
            let final_name = PathBuf::from(s.rsplit_once('#').map_or(s, |(f, _)| f));
            self.events.lock().unwrap().push(format!(
                "file {} (final name visible: {})",
                self.rel(&final_name),
                final_name.exists()
            ));
            if self.fail_files {
                return Err(io::Error::other("injected sync failure"));
            }
            file.sync_all()
        }

        fn sync_dir(&self, dir: &Path) -> io::Result<()> {
            let mut names: Vec<String> = std::fs::read_dir(dir)?
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|n| !n.contains('#'))
                .collect();
            names.sort();
            self.events.lock().unwrap().push(format!(
                "dir {} [{}]",
                self.rel(dir),
                names.join(" ")
            ));
            Fsync.sync_dir(dir)
        }
    }

    struct Setup {
        _tmp: tempfile::TempDir,
        _rt: tokio::runtime::Runtime,
        rec: Arc<Recorder>,
        b: ObjectStoreBackend,
    }

    fn setup(fail_files: bool) -> Setup {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path().canonicalize().unwrap();
        let rec = Arc::new(Recorder {
            base: base.clone(),
            events: Mutex::new(Vec::new()),
            fail_files,
        });
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .build()
            .unwrap();
        let b = ObjectStoreBackend::local_with(
            &base.join("repo/nested"),
            rt.handle().clone(),
            rec.clone(),
        )
        .unwrap();
        Setup {
            _tmp: tmp,
            _rt: rt,
            rec,
            b,
        }
    }

    #[test]
    fn local_writes_and_deletes_are_synced_before_they_return() {
        let Setup { rec, b, _tmp, _rt } = setup(false);
        // Creating the repository folder makes its new directories durable in their parents.
        assert_eq!(rec.take(), ["dir . [repo]", "dir repo [nested]"]);

        b.put("data/ab/p1", b"one".to_vec()).unwrap();
        assert_eq!(
            rec.take(),
            [
                // New directories, each synced into its parent...
                "dir repo/nested [data]",
                "dir repo/nested/data [ab]",
                // ...the file's content before it takes its name...
                "file repo/nested/data/ab/p1 (final name visible: false)",
                // ...and its name before put returns.
                "dir repo/nested/data/ab [p1]",
            ]
        );
        // A directory already known durable is not synced into its parent again.
        b.put("data/ab/p2", b"two".to_vec()).unwrap();
        assert_eq!(
            rec.take(),
            [
                "file repo/nested/data/ab/p2 (final name visible: false)",
                "dir repo/nested/data/ab [p1 p2]",
            ]
        );
        // Replacing an object is as durable as creating one.
        b.put("data/ab/p2", b"two again".to_vec()).unwrap();
        assert_eq!(
            rec.take(),
            [
                "file repo/nested/data/ab/p2 (final name visible: true)",
                "dir repo/nested/data/ab [p1 p2]",
            ]
        );
        assert_eq!(b.get("data/ab/p2").unwrap(), b"two again");
        assert_eq!(b.list("data").unwrap(), ["data/ab/p1", "data/ab/p2"]);

        // A removal is durable before delete returns (prune deletes the old only after this).
        b.delete("data/ab/p1").unwrap();
        assert_eq!(rec.take(), ["dir repo/nested/data/ab [p2]"]);
        // Deleting what is not there changes nothing and syncs nothing.
        b.delete("data/ab/p1").unwrap();
        assert!(rec.take().is_empty());
    }

    #[test]
    fn a_failed_sync_fails_the_write_and_leaves_no_object() {
        let Setup { rec, b, _tmp, _rt } = setup(true);
        rec.take();
        assert!(b.put("keys/k1", b"wrapped".to_vec()).is_err());
        assert!(!b.exists("keys/k1").unwrap());
        assert!(b.list("keys").unwrap().is_empty());
        // No temporary file is left behind either.
        let dir = rec.base.join("repo/nested/keys");
        assert_eq!(std::fs::read_dir(dir).unwrap().count(), 0);
    }

    #[test]
    fn a_directory_removed_and_made_again_is_synced_again() {
        let Setup { rec, b, _tmp, _rt } = setup(false);
        b.put("data/ab/p1", b"one".to_vec()).unwrap();
        std::fs::remove_dir_all(rec.base.join("repo/nested/data")).unwrap();
        rec.take();
        b.put("data/ab/p2", b"two".to_vec()).unwrap();
        assert_eq!(
            rec.take(),
            [
                "dir repo/nested [data]",
                "dir repo/nested/data [ab]",
                "file repo/nested/data/ab/p2 (final name visible: false)",
                "dir repo/nested/data/ab [p2]",
            ]
        );
    }
}
