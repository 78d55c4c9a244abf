//! What SQLite keeps across a reopen of its file; the behaviours every backend shares are in
//! the contract suite (`tests/contract.rs`).

mod common;

use common::*;
use kagi_core::ObjectName;
use kagi_store::{KeyRecord, SqlStore, Store, StoreError};

#[tokio::test]
async fn keys_versions_delete_recover_purge_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kagi.db");
    let v = vault("vault-one");
    let name = ObjectName::parse("Key-A").unwrap();
    {
        let s = SqlStore::open_sqlite(&path).await.unwrap();
        s.put_vault(&v).await.unwrap();
        s.add_key_version(&v.name, &name, &version(1, 1))
            .await
            .unwrap();
        s.add_key_version(&v.name, &name, &version(1, 2))
            .await
            .unwrap();
        // Same version twice is a conflict and changes nothing.
        assert!(matches!(
            s.add_key_version(&v.name, &name, &version(1, 2)).await,
            Err(StoreError::Conflict(_))
        ));
        let mut info = version(1, 1).info;
        info.attributes.enabled = false;
        s.update_key_version(&v.name, &name, &version(1, 1).version, &info)
            .await
            .unwrap();
        s.set_key_deleted(&v.name, &name, Some((100, 200)))
            .await
            .unwrap();
    }
    let s = SqlStore::open_sqlite(&path).await.unwrap();
    let keys = s.load_keys(&v.name).await.unwrap();
    assert_eq!(keys.len(), 1);
    let k = &keys[0];
    assert_eq!(k.name.as_str(), "Key-A");
    assert_eq!((k.deleted_at, k.purge_at), (Some(100), Some(200)));
    assert_eq!(k.versions.len(), 2);
    assert_eq!(k.versions[0].seq, 1);
    assert!(!k.versions[0].info.attributes.enabled);
    assert!(k.versions[1].info.attributes.enabled);
    assert_eq!(k.versions[1].sealed_private, vec![7; 64]);

    // Lookups are case-insensitive: "key-a" is the same key.
    let lower = ObjectName::parse("key-a").unwrap();
    s.set_key_deleted(&v.name, &lower, None).await.unwrap();
    assert_eq!(s.load_keys(&v.name).await.unwrap()[0].deleted_at, None);

    let record: KeyRecord = k.clone();
    assert!(matches!(
        s.insert_key(&v.name, &record).await,
        Err(StoreError::Conflict(_))
    ));
    s.purge_key(&v.name, &name).await.unwrap();
    assert!(s.load_keys(&v.name).await.unwrap().is_empty());
    s.insert_key(&v.name, &record).await.unwrap();
    assert_eq!(s.load_keys(&v.name).await.unwrap()[0].versions.len(), 2);

    s.purge_vault(&v.name).await.unwrap();
    assert!(s.list_vaults().await.unwrap().is_empty());
    assert!(s.load_keys(&v.name).await.unwrap().is_empty());
}
