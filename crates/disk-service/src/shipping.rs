//! Disk families' logs in the bucket, when blobs are remote (`--blobs s3://…`): kagi-disk's
//! [`LogShip`] over the blob root, objects under `disks/{family}/` (docs/DISK_FORMAT.md,
//! "Shipping"). What a flush acknowledged is then in the bucket, so another node can take a
//! family over when its home is gone (`crate::homes`).
//!
//! The store calls a [`LogShip`] from the threads that write a family, and a family closed in
//! a `Drop` can call it from any thread, an async worker's included: its requests go through
//! [`BlockingFolder`], which runs them on a runtime of its own.

use std::io;
use std::path::Path;
use std::sync::Arc;

use kagi_blobs::BlockingFolder;
use kagi_disk::{LogObject, LogShip, ShipFactory};

/// One family's objects in the bucket.
#[derive(Debug)]
struct BucketLog {
    /// The family's folder (`disks/{family}`), or why it cannot be reached.
    folder: Result<BlockingFolder, String>,
}

impl BucketLog {
    fn folder(&self) -> io::Result<&BlockingFolder> {
        self.folder
            .as_ref()
            .map_err(|e| io::Error::other(e.clone()))
    }
}

impl LogShip for BucketLog {
    fn put_new(&self, object: LogObject, bytes: &[u8]) -> io::Result<()> {
        // A fence is empty; a piece, header or checkpoint never is: only the same bytes found
        // at its name are this writer's own (a retried create).
        self.folder()?.put_new(&object.name(), bytes)
    }

    fn list(&self) -> io::Result<Vec<(LogObject, u64)>> {
        Ok(self
            .folder()?
            .list()?
            .into_iter()
            .filter_map(|(name, size)| Some((LogObject::parse(&name)?, size)))
            .collect())
    }

    fn get(&self, object: LogObject) -> io::Result<Vec<u8>> {
        self.folder()?.get(&object.name())
    }

    fn delete(&self, objects: &[LogObject]) -> io::Result<()> {
        let names: Vec<String> = objects.iter().map(|o| o.name()).collect();
        self.folder()?.delete(&names)
    }
}

/// The [`ShipFactory`] of the families under `root` (`<data>/disks`) in `blobs`, or `None`
/// when blobs are local files (the families' logs then stay in the data directory only).
pub(crate) fn factory(blobs: &kagi_blobs::BlobRoot, root: &Path) -> Option<ShipFactory> {
    if blobs.is_local() {
        return None;
    }
    let (blobs, root) = (blobs.clone(), root.to_owned());
    Some(Arc::new(move |family: &str| -> Arc<dyn LogShip> {
        let folder = match blobs.blocking_folder(&root.join(family)) {
            Ok(Some(folder)) => Ok(folder),
            Ok(None) => Err("blobs are local files".to_string()),
            Err(e) => Err(e.to_string()),
        };
        Arc::new(BucketLog { folder })
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::ObjectStore;
    use object_store::memory::InMemory;

    fn log() -> (Arc<dyn ObjectStore>, Arc<dyn LogShip>) {
        let bucket: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let data = Path::new("/data");
        let blobs = kagi_blobs::BlobRoot::with_store(
            kagi_blobs::BlobLocation::S3 {
                bucket: "b".into(),
                prefix: String::new(),
            },
            data,
            bucket.clone(),
        );
        let factory = factory(&blobs, &data.join("disks")).unwrap();
        (bucket, factory("fam1"))
    }

    #[test]
    fn objects_are_created_once_listed_read_and_deleted_from_any_thread() {
        let (bucket, log) = log();
        let piece = LogObject::Piece {
            segment: 1,
            start: 0,
        };
        log.put_new(LogObject::Header, b"header").unwrap();
        log.put_new(piece, b"records").unwrap();
        let again = log.put_new(piece, b"other").unwrap_err();
        assert_eq!(again.kind(), io::ErrorKind::AlreadyExists);
        // The same bytes again (a retried create whose answer was lost) are no conflict; a
        // fence (empty) where one is is.
        log.put_new(piece, b"records").unwrap();
        log.put_new(LogObject::Takeover(1), b"").unwrap();
        let fenced = log.put_new(LogObject::Takeover(1), b"").unwrap_err();
        assert_eq!(fenced.kind(), io::ErrorKind::AlreadyExists);
        let mut listed = log.list().unwrap();
        listed.sort();
        assert_eq!(
            listed,
            vec![
                (LogObject::Header, 6),
                (LogObject::Takeover(1), 0),
                (piece, 7)
            ]
        );
        assert_eq!(log.get(piece).unwrap(), b"records");
        // Under the family's folder in the bucket.
        let whole = BlockingFolder::new(bucket);
        assert_eq!(
            whole
                .get("disks/fam1/piece-0000000000000001-0000000000000000")
                .unwrap(),
            b"records"
        );
        // From inside an async runtime too (a family dropped by an async task).
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            log.delete(&[piece, LogObject::Checkpoint(9)]).unwrap();
        });
        assert_eq!(
            log.list().unwrap(),
            vec![(LogObject::Header, 6), (LogObject::Takeover(1), 0)]
        );
        assert_eq!(log.get(piece).unwrap_err().kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn local_blobs_ship_nothing() {
        let data = Path::new("/data");
        assert!(factory(&kagi_blobs::BlobRoot::local(data), &data.join("disks")).is_none());
    }
}
