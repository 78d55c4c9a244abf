//! The secret tables: versions, soft delete, purge, restore, and cascade with the vault.

mod common;

use common::*;
use kagi_core::ObjectName;
use kagi_store::{SecretRecord, SqlStore, Store, StoreError};

#[tokio::test]
async fn secrets_versions_delete_recover_purge_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kagi.db");
    let v = vault("vault-one");
    let name = ObjectName::parse("Secret-A").unwrap();
    {
        let s = SqlStore::open_sqlite(&path).await.unwrap();
        s.put_vault(&v).await.unwrap();
        s.add_secret_version(&v.name, &name, &secret_version(1, 1))
            .await
            .unwrap();
        s.add_secret_version(&v.name, &name, &secret_version(2, 2))
            .await
            .unwrap();
        assert!(matches!(
            s.add_secret_version(&v.name, &name, &secret_version(2, 2))
                .await,
            Err(StoreError::Conflict(_))
        ));
        let mut info = secret_version(1, 1).info;
        info.attributes.enabled = false;
        s.update_secret_version(&v.name, &name, &secret_version(1, 1).version, &info)
            .await
            .unwrap();
        s.set_secret_deleted(&v.name, &name, Some((100, 200)))
            .await
            .unwrap();
    }
    let s = SqlStore::open_sqlite(&path).await.unwrap();
    let secrets = s.load_secrets(&v.name).await.unwrap();
    assert_eq!(secrets.len(), 1);
    let sec = &secrets[0];
    assert_eq!(sec.name.as_str(), "Secret-A");
    assert_eq!((sec.deleted_at, sec.purge_at), (Some(100), Some(200)));
    assert_eq!(sec.versions.len(), 2);
    assert!(!sec.versions[0].info.attributes.enabled);
    assert_eq!(sec.versions[1].sealed_value, vec![2; 40]);
    // Keys and secrets are separate namespaces.
    assert!(s.load_keys(&v.name).await.unwrap().is_empty());

    s.set_secret_deleted(&v.name, &name, None).await.unwrap();
    assert_eq!(s.load_secrets(&v.name).await.unwrap()[0].deleted_at, None);
    s.purge_secret(&v.name, &name).await.unwrap();
    assert!(s.load_secrets(&v.name).await.unwrap().is_empty());

    // Restore inserts a whole secret; the name must be free.
    let rec = SecretRecord {
        name: ObjectName::parse("restored").unwrap(),
        deleted_at: None,
        purge_at: None,
        versions: vec![secret_version(3, 1), secret_version(4, 2)],
    };
    s.insert_secret(&v.name, &rec).await.unwrap();
    assert!(matches!(
        s.insert_secret(&v.name, &rec).await,
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(s.load_secrets(&v.name).await.unwrap(), vec![rec]);

    // Purging the vault takes its secrets with it.
    s.purge_vault(&v.name).await.unwrap();
    s.put_vault(&v).await.unwrap();
    assert!(s.load_secrets(&v.name).await.unwrap().is_empty());
}
