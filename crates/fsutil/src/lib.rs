//! Durable writes of the small files kagi keeps beside its database (credentials, certificates,
//! whole-vault backup jobs and restore journals, storage services' state files, the agent's
//! state): a file is replaced whole and atomically, so a crash leaves the old content or the
//! new, never a torn file; and a directory is flushed after a name in it is created, renamed or
//! removed, so the change itself survives power loss.
//!
//! A crate of its own, on std alone, so that crates that only write files do not depend on the
//! store (and its database driver).

#![forbid(unsafe_code)]

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Replaces `path` with `bytes`: a temporary file with `mode` in the same directory, fsync,
/// rename over the target, fsync of the directory (so the rename itself survives power loss).
/// Creates the parent directory if needed.
pub fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| std::io::Error::other("the path has no parent directory"))?;
    std::fs::create_dir_all(dir)?;
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp = dir.join(tmp_name);
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    sync_dir(dir)
}

/// Flushes a directory's entries to stable storage: a name created, renamed or removed in it
/// is durable once this returns.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Flushes the directory that holds `path` ([`sync_dir`] of its parent; the current directory
/// for a bare file name).
pub fn sync_parent(path: &Path) -> std::io::Result<()> {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => sync_dir(parent),
        _ => sync_dir(Path::new(".")),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn replaces_whole_with_mode() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/f.json");
        super::write_atomically(&p, b"one", 0o600).unwrap();
        super::write_atomically(&p, b"two", 0o600).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(!dir.path().join("sub/f.json.tmp").exists());
    }

    #[test]
    fn syncs_a_parent_or_fails_for_a_missing_one() {
        let dir = tempfile::tempdir().unwrap();
        super::sync_parent(&dir.path().join("f")).unwrap();
        super::sync_parent(std::path::Path::new("bare-name")).unwrap();
        assert!(super::sync_parent(&dir.path().join("missing/f")).is_err());
    }
}
