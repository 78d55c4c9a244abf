//! The engine on object stores other than local files: an in-memory one and, when
//! `KAGI_TEST_S3_BLOBS` names a bucket (scripts/test.sh starts an S3 server), S3. A
//! repository's backup, restore and check behave as on local files, and two writers creating
//! one repository at once cannot both succeed (the conditional write decides).

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::sync::Arc;

use common::{assert_same, pseudo_random, runtime};
use kagi_backup::{
    BackupError, BackupOptions, BlobBackend, ObjectInfo, ObjectStoreBackend, Repository,
};
use kagi_blobs::{BlobLocation, BlobRoot};
use kagi_crypto::data_key::DataKey;
use object_store::ObjectStore;
use object_store::memory::InMemory;

/// Fresh, empty stores: in memory, and a prefix of its own in the test bucket.
fn stores() -> Vec<(&'static str, Arc<dyn ObjectStore>)> {
    let mut out: Vec<(&'static str, Arc<dyn ObjectStore>)> =
        vec![("memory", Arc::new(InMemory::new()))];
    match std::env::var("KAGI_TEST_S3_BLOBS") {
        Ok(url) => {
            let loc = BlobLocation::parse(&url).unwrap();
            let data = Path::new("/data");
            let root = BlobRoot::open(&loc, data).unwrap();
            let nonce = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos();
            let dir = data.join(format!("engine-test-{nonce}"));
            out.push(("s3", root.remote(&dir).unwrap().unwrap()));
        }
        Err(_) => assert!(
            std::env::var("KAGI_REQUIRE_S3").is_err(),
            "KAGI_REQUIRE_S3 is set but KAGI_TEST_S3_BLOBS is not"
        ),
    }
    out
}

#[test]
fn backup_restore_and_check_on_object_stores() {
    let rt = runtime();
    for (what, store) in stores() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        std::fs::create_dir_all(src.join("sub")).unwrap();
        std::fs::write(src.join("a.bin"), pseudo_random(7, 2 * 1024 * 1024 + 5)).unwrap();
        std::fs::write(src.join("sub/b.txt"), b"hello\n").unwrap();
        let backend: Arc<dyn BlobBackend> =
            Arc::new(ObjectStoreBackend::new(store, rt.handle().clone()));
        let key = DataKey::generate().unwrap();
        let raw = *key.expose_for_wrapping();
        let mut repo = Repository::init(backend.clone(), key).unwrap();
        let first = repo
            .backup(&src, &BackupOptions::default(), 1_000, &|_| {})
            .unwrap();
        std::fs::write(src.join("sub/b.txt"), b"changed\n").unwrap();
        let second = repo
            .backup(&src, &BackupOptions::default(), 2_000, &|_| {})
            .unwrap();
        assert_eq!(second.files_read, 1, "{what}");
        drop(repo);
        let repo = Repository::open(backend.clone(), DataKey::from_bytes(&raw).unwrap()).unwrap();
        assert_eq!(repo.snapshots().unwrap().len(), 2, "{what}");
        let out = tmp.path().join("out");
        repo.restore(&second.snapshot.id, None, &out, false, 2, &|_| {})
            .unwrap();
        assert_same(&src, &out);
        assert_eq!(
            repo.check_report(true).unwrap(),
            Default::default(),
            "{what}"
        );
        // No object holds the plaintext.
        for name in backend.list("").unwrap() {
            let bytes = backend.get(&name).unwrap();
            assert!(
                !bytes.windows(8).any(|w| w == b"changed\n"),
                "{what}: {name} holds plaintext"
            );
        }
        assert!(!first.snapshot.id.is_empty());
    }
}

/// A backend that never sees an existing object by looking (as a writer that looked just
/// before another one wrote).
struct LooksTooEarly(Arc<dyn BlobBackend>);

impl BlobBackend for LooksTooEarly {
    fn put(&self, name: &str, data: Vec<u8>) -> kagi_backup::Result<()> {
        self.0.put(name, data)
    }
    fn get(&self, name: &str) -> kagi_backup::Result<Vec<u8>> {
        self.0.get(name)
    }
    fn get_range(&self, name: &str, start: u64, len: u64) -> kagi_backup::Result<Vec<u8>> {
        self.0.get_range(name, start, len)
    }
    fn list(&self, prefix: &str) -> kagi_backup::Result<Vec<String>> {
        self.0.list(prefix)
    }
    fn delete(&self, name: &str) -> kagi_backup::Result<()> {
        self.0.delete(name)
    }
    fn exists(&self, _: &str) -> kagi_backup::Result<bool> {
        Ok(false)
    }
    fn list_meta(&self, prefix: &str) -> kagi_backup::Result<Vec<ObjectInfo>> {
        self.0.list_meta(prefix)
    }
    fn put_new(&self, name: &str, data: Vec<u8>) -> kagi_backup::Result<bool> {
        self.0.put_new(name, data)
    }
}

#[test]
fn two_writers_cannot_both_create_one_repository() {
    let rt = runtime();
    for (what, store) in stores() {
        let a: Arc<dyn BlobBackend> =
            Arc::new(ObjectStoreBackend::new(store.clone(), rt.handle().clone()));
        let b: Arc<dyn BlobBackend> = Arc::new(LooksTooEarly(Arc::new(ObjectStoreBackend::new(
            store,
            rt.handle().clone(),
        ))));
        let key = DataKey::generate().unwrap();
        let raw = *key.expose_for_wrapping();
        Repository::init(a.clone(), key).unwrap();
        let config = a.get("config").unwrap();
        let again = Repository::init(b, DataKey::generate().unwrap());
        assert!(matches!(again, Err(BackupError::Invalid(_))), "{what}");
        // The first repository is intact and opens with its key.
        assert_eq!(a.get("config").unwrap(), config, "{what}");
        Repository::open(a, DataKey::from_bytes(&raw).unwrap()).unwrap();
    }
}
