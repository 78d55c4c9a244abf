//! Small files kagi keeps beside the database (credentials, certificates, whole-vault backup
//! jobs, backup vault move journals): written whole and atomically, so a crash leaves the old
//! content or the new, never a torn file. Records that belong with the store's own (a storage
//! service's state, jobs and activity; policy assignments) are in the store, not here.

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
    std::fs::File::open(dir)?.sync_all()
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
}
