//! A store opened read-only (`kagi server --read-only`) reads what a normal open wrote,
//! refuses every write, and leaves the database file and its WAL as they were.

#![allow(clippy::unwrap_used)]

use kagi_store::{SqlStore, Store};

#[tokio::test]
async fn read_only_store_reads_and_refuses_writes() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("kagi.db");
    let store = SqlStore::open_sqlite(&db).await.unwrap();
    store.put_meta_if_absent("probe", b"x").await.unwrap();
    store.ensure_subscription("t", "s", 1).await.unwrap();
    store.close().await;
    // The bytes of a file; an empty or missing `-wal` alike (a read-only open of a store whose
    // WAL was checkpointed away leaves an empty one: no data).
    let file = |name: &str| {
        let bytes = std::fs::read(dir.path().join(name)).unwrap_or_default();
        (bytes.len(), fnv1a(&bytes))
    };
    let before = (file("kagi.db"), file("kagi.db-wal"));

    let ro = SqlStore::open_sqlite_read_only(&db).await.unwrap();
    assert_eq!(
        ro.get_meta("probe").await.unwrap().as_deref(),
        Some(&b"x"[..])
    );
    // What every start does succeeds without writing, as the rows exist.
    assert_eq!(ro.put_meta_if_absent("probe", b"y").await.unwrap(), b"x");
    ro.ensure_subscription("t", "s", 2).await.unwrap();
    assert_eq!(
        ro.subscription_tenant("s").await.unwrap().as_deref(),
        Some("t")
    );
    // Real writes fail.
    assert!(ro.put_meta_if_absent("other", b"z").await.is_err());
    assert!(ro.ensure_subscription("t", "s2", 2).await.is_err());
    ro.close().await;
    assert_eq!((file("kagi.db"), file("kagi.db-wal")), before);
}

/// A cheap fingerprint of bytes for comparison (FNV-1a; no dependency needed).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[tokio::test]
async fn read_only_open_needs_an_existing_store() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("kagi.db");
    assert!(SqlStore::open_sqlite_read_only(&db).await.is_err());
    assert!(!db.exists());
}
