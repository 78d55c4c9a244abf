//! Disk families' logs in the bucket, when blobs are remote (`--blobs s3://…`): kagi-disk's
//! [`LogShip`] over the blob root, objects under `disks/{family}/` (docs/DISK_FORMAT.md,
//! "Shipping"). What a flush acknowledged is then in the bucket, so another node can take a
//! family over when its home is gone (`crate::homes`).
//!
//! The store calls a [`LogShip`] from the threads that write a family, and a family closed in
//! a `Drop` can call it from any thread, an async worker's included. Its requests therefore
//! run on a small runtime of their own, and the calling thread waits on a channel: no
//! `block_on` inside a runtime (a panic), no wait for a worker the caller occupies.

use std::future::Future;
use std::io;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use futures::TryStreamExt;
use kagi_disk::{LogObject, LogShip, ShipFactory};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};

/// The runtime the bucket requests run on (never dropped: a runtime cannot be dropped inside
/// another).
fn runtime() -> io::Result<&'static tokio::runtime::Runtime> {
    static RUNTIME: OnceLock<Option<tokio::runtime::Runtime>> = OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("kagi-disk-ship")
                .enable_all()
                .build()
                .ok()
        })
        .as_ref()
        .ok_or_else(|| io::Error::other("cannot start the threads that reach the bucket"))
}

/// Runs `request` on [`runtime`] and waits for it, from any thread.
fn wait<T: Send + 'static>(
    request: impl Future<Output = io::Result<T>> + Send + 'static,
) -> io::Result<T> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    runtime()?.spawn(async move {
        let _ = tx.send(request.await);
    });
    rx.recv()
        .map_err(|_| io::Error::other("a request to the bucket was dropped"))?
}

/// An object store error as I/O's (a create that found the object: `AlreadyExists`).
fn io_error(e: object_store::Error) -> io::Error {
    match e {
        object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. } => {
            io::Error::new(io::ErrorKind::AlreadyExists, e.to_string())
        }
        object_store::Error::NotFound { .. } => {
            io::Error::new(io::ErrorKind::NotFound, e.to_string())
        }
        e => io::Error::other(e.to_string()),
    }
}

/// One family's objects in the bucket.
#[derive(Debug)]
struct BucketLog {
    /// The family's folder (`disks/{family}`), or why it cannot be reached.
    folder: Result<Arc<dyn ObjectStore>, String>,
}

impl BucketLog {
    fn folder(&self) -> io::Result<Arc<dyn ObjectStore>> {
        self.folder.clone().map_err(io::Error::other)
    }
}

impl LogShip for BucketLog {
    fn put_new(&self, object: LogObject, bytes: &[u8]) -> io::Result<()> {
        let folder = self.folder()?;
        let payload = PutPayload::from(bytes.to_vec());
        let mine = bytes.to_vec();
        wait(async move {
            let create = PutOptions {
                mode: PutMode::Create,
                ..PutOptions::default()
            };
            let path = ObjectPath::from(object.name());
            match folder
                .put_opts(&path, payload, create)
                .await
                .map_err(io_error)
            {
                // The client retries a request whose answer was lost: a create that had been
                // done then finds its own object. Only the same bytes are this writer's (a
                // fence is empty; a piece, header or checkpoint never is).
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && !mine.is_empty() => {
                    let there = folder.get(&path).await.map_err(io_error)?;
                    match there.bytes().await.map_err(io_error)? == mine.as_slice() {
                        true => Ok(()),
                        false => Err(e),
                    }
                }
                r => r.map(|_| ()),
            }
        })
    }

    fn list(&self) -> io::Result<Vec<(LogObject, u64)>> {
        let folder = self.folder()?;
        wait(async move {
            let metas: Vec<_> = folder.list(None).try_collect().await.map_err(io_error)?;
            Ok(metas
                .into_iter()
                .filter_map(|m| {
                    let name = m.location.filename()?;
                    Some((LogObject::parse(name)?, m.size))
                })
                .collect())
        })
    }

    fn get(&self, object: LogObject) -> io::Result<Vec<u8>> {
        let folder = self.folder()?;
        wait(async move {
            let got = folder
                .get(&ObjectPath::from(object.name()))
                .await
                .map_err(io_error)?;
            Ok(got.bytes().await.map_err(io_error)?.to_vec())
        })
    }

    fn delete(&self, objects: &[LogObject]) -> io::Result<()> {
        let folder = self.folder()?;
        let names: Vec<ObjectPath> = objects.iter().map(|o| o.name().into()).collect();
        wait(async move {
            for name in names {
                match folder.delete(&name).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                    Err(e) => return Err(io_error(e)),
                }
            }
            Ok(())
        })
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
        let folder = match blobs.remote(&root.join(family)) {
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
        let names: Vec<String> = wait(async move {
            let metas: Vec<_> = bucket.list(None).try_collect().await.map_err(io_error)?;
            Ok(metas.into_iter().map(|m| m.location.to_string()).collect())
        })
        .unwrap();
        assert!(names.contains(&"disks/fam1/piece-0000000000000001-0000000000000000".into()));
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
