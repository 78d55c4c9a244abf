//! `kagi.db` and its WAL files are readable by their owner only: they hold webhook URLs,
//! password hashes and sealed keys.

#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use kagi_store::{SqlStore, Store};

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[tokio::test]
async fn the_database_files_are_private_even_when_they_existed_before() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("kagi.db");
    let store = SqlStore::open_sqlite(&db).await.unwrap();
    store.put_meta_if_absent("probe", b"x").await.unwrap();
    for name in ["kagi.db", "kagi.db-wal", "kagi.db-shm"] {
        assert_eq!(mode(&dir.path().join(name)), 0o600, "{name}");
    }
    drop(store);
    // A file an earlier kagi created with the umask's 0644.
    for name in ["kagi.db", "kagi.db-wal", "kagi.db-shm"] {
        let path = dir.path().join(name);
        if path.exists() {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
    }
    let store = SqlStore::open_sqlite(&db).await.unwrap();
    assert_eq!(
        store.get_meta("probe").await.unwrap().as_deref(),
        Some(&b"x"[..])
    );
    for name in ["kagi.db", "kagi.db-wal", "kagi.db-shm"] {
        let path = dir.path().join(name);
        if path.exists() {
            assert_eq!(mode(&path), 0o600, "{name}");
        }
    }
}
