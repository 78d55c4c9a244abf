//! A blob root's folder and file operations, on an in-memory object store and, when
//! `KAGI_TEST_S3_BLOBS` names one (`s3://bucket/prefix`, AWS variables set: scripts/test.sh
//! starts a server), on a real S3 server. `KAGI_REQUIRE_S3=1` makes a missing server a failure.

use std::path::Path;
use std::sync::Arc;

use kagi_blobs::{BlobLocation, BlobRoot};
use object_store::memory::InMemory;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

fn roots() -> Vec<BlobRoot> {
    let data = Path::new("/data");
    let mut out = vec![BlobRoot::with_store(
        BlobLocation::S3 {
            bucket: "memory".into(),
            prefix: "pre/fix".into(),
        },
        data,
        Arc::new(InMemory::new()),
    )];
    match std::env::var("KAGI_TEST_S3_BLOBS") {
        Ok(url) => {
            let mut loc = BlobLocation::parse(&url).expect("KAGI_TEST_S3_BLOBS");
            // A prefix of its own per run: runs never see each other's objects.
            if let BlobLocation::S3 { prefix, .. } = &mut loc {
                let nonce = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .expect("clock")
                    .as_nanos();
                *prefix = format!("{prefix}/blobs-test-{nonce}")
                    .trim_start_matches('/')
                    .to_owned();
            }
            out.push(BlobRoot::open(&loc, data).expect("open S3"));
        }
        Err(_) => assert!(
            std::env::var("KAGI_REQUIRE_S3").is_err(),
            "KAGI_REQUIRE_S3 is set but KAGI_TEST_S3_BLOBS is not"
        ),
    }
    out
}

async fn put(store: &Arc<dyn ObjectStore>, name: &str, body: &'static [u8]) {
    store
        .put(&ObjectPath::from(name), PutPayload::from_static(body))
        .await
        .expect("put");
}

async fn names(store: &Arc<dyn ObjectStore>) -> Vec<String> {
    use futures::TryStreamExt;
    let mut n: Vec<String> = store
        .list(None)
        .map_ok(|m| m.location.to_string())
        .try_collect()
        .await
        .expect("list");
    n.sort();
    n
}

#[tokio::test]
async fn folders_are_removed_whole() {
    for root in roots() {
        let at = |p: &str| Path::new("/data").join(p);
        let a = root.remote(&at("vaults/a")).unwrap().unwrap();
        let ab = root.remote(&at("vaults/ab")).unwrap().unwrap();
        put(&a, "config", b"c").await;
        put(&a, "data/00/0011", b"d").await;
        put(&ab, "keep", b"k").await;
        assert_eq!(root.has_objects(&at("vaults/a")).await.unwrap(), Some(true));
        assert_eq!(
            root.has_objects(&at("vaults/b")).await.unwrap(),
            Some(false)
        );
        assert_eq!(names(&a).await, vec!["config", "data/00/0011"]);
        let got = a.get(&ObjectPath::from("data/00/0011")).await.unwrap();
        assert_eq!(&got.bytes().await.unwrap()[..], b"d");

        assert!(root.remove_all(&at("vaults/a")).await.unwrap());
        assert_eq!(names(&a).await, Vec::<String>::new());
        // A folder whose name starts like another's is not part of it.
        assert_eq!(names(&ab).await, vec!["keep"]);
        // Removing again (as after a crash) is fine.
        assert!(root.remove_all(&at("vaults/a")).await.unwrap());
        assert!(root.remove_all(&at("vaults/ab")).await.unwrap());
    }
    let local = BlobRoot::local(Path::new("/data"));
    assert!(!local.remove_all(Path::new("/data/x")).await.unwrap());
    assert_eq!(local.has_objects(Path::new("/data/x")).await.unwrap(), None);
}

#[tokio::test]
async fn the_probe_needs_conditional_writes() {
    for root in roots() {
        root.probe().await.expect("probe");
    }
    assert!(BlobRoot::local(Path::new("/data")).probe().await.is_ok());
}

#[tokio::test]
async fn files_go_up_and_come_back_whole() {
    let tmp = std::env::temp_dir().join(format!("kagi-blobs-files-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    for root in roots() {
        // A root over the temporary folder as its data directory.
        let root = BlobRoot::with_store(
            root.location().clone(),
            &tmp,
            root.remote(root.data_dir()).unwrap().unwrap(),
        );
        let dir = tmp.join("up");
        std::fs::create_dir_all(&dir).unwrap();
        // Larger than one part of a multipart upload (10 MiB in object_store's BufWriter).
        let body: Vec<u8> = (0..12 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(dir.join("big.bin"), &body).unwrap();
        assert!(root.upload_file(&dir, "big.bin").await.unwrap());
        std::fs::remove_file(dir.join("big.bin")).unwrap();
        assert!(root.download_file(&dir, "big.bin").await.unwrap());
        assert_eq!(std::fs::read(dir.join("big.bin")).unwrap(), body);
        assert!(!root.download_file(&dir, "missing").await.unwrap());
        assert!(root.remove(&dir, "big.bin").await.unwrap());
        assert!(root.remove(&dir, "big.bin").await.unwrap());
        std::fs::remove_file(dir.join("big.bin")).unwrap();
        assert!(!root.download_file(&dir, "big.bin").await.unwrap());
    }
    let local = BlobRoot::local(&tmp);
    assert!(!local.upload_file(&tmp, "x").await.unwrap());
    std::fs::remove_dir_all(&tmp).unwrap();
}
