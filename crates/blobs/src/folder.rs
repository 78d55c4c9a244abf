//! One folder of the bucket reached from any thread, with blocking calls: what the storage
//! services' logs use (a disk family's log, a SQL database's live log), whose writers are
//! blocking threads — and sometimes a `Drop` on an async worker.
//!
//! The requests run on a small runtime of this module's own, and the calling thread waits on a
//! channel: no `block_on` inside a runtime (a panic), no wait for a worker the caller occupies.

use std::future::Future;
use std::io;
use std::sync::{Arc, OnceLock};

use futures::TryStreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{GetOptions, GetRange, ObjectStore, ObjectStoreExt, PutMode, PutOptions};

/// The runtime the bucket requests run on (never dropped: a runtime cannot be dropped inside
/// another).
fn runtime() -> io::Result<&'static tokio::runtime::Runtime> {
    static RUNTIME: OnceLock<Option<tokio::runtime::Runtime>> = OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("kagi-blob-log")
                .enable_all()
                .build()
                .ok()
        })
        .as_ref()
        .ok_or_else(|| io::Error::other("cannot start the threads that reach the bucket"))
}

/// Runs `request` on [`runtime`] and waits for it, from any thread, for `deadline` at most
/// (`TimedOut` then: the request may still complete).
fn wait<T: Send + 'static>(
    request: impl Future<Output = io::Result<T>> + Send + 'static,
    deadline: Option<std::time::Duration>,
) -> io::Result<T> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    runtime()?.spawn(async move {
        let _ = tx.send(request.await);
    });
    match deadline {
        None => rx
            .recv()
            .map_err(|_| io::Error::other("a request to the bucket was dropped"))?,
        Some(d) => match rx.recv_timeout(d) {
            Ok(r) => r,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the bucket did not answer within {} s", d.as_secs()),
            )),
            Err(_) => Err(io::Error::other("a request to the bucket was dropped")),
        },
    }
}

/// An object store error as I/O's (a create that found the object: `AlreadyExists`; a missing
/// object: `NotFound`).
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

/// The objects of one folder of the bucket (names relative to it), with blocking calls.
#[derive(Clone, Debug)]
pub struct BlockingFolder {
    folder: Arc<dyn ObjectStore>,
    deadline: Option<std::time::Duration>,
}

impl BlockingFolder {
    /// The folder over `folder` (see [`crate::BlobRoot::remote`]).
    pub fn new(folder: Arc<dyn ObjectStore>) -> Self {
        Self {
            folder,
            deadline: None,
        }
    }

    /// The same folder, whose creates ([`BlockingFolder::put_new`]) give up after `deadline`
    /// (`TimedOut`; the request may still complete in the bucket) instead of waiting out the
    /// store's own retries. Other calls wait for their answer.
    pub fn with_deadline(mut self, deadline: std::time::Duration) -> Self {
        self.deadline = Some(deadline);
        self
    }

    fn wait<T: Send + 'static>(
        &self,
        request: impl Future<Output = io::Result<T>> + Send + 'static,
    ) -> io::Result<T> {
        wait(request, self.deadline)
    }

    /// Creates object `name` holding `bytes`, unless it exists (`AlreadyExists`). A client
    /// retries a request whose answer was lost: a create that had been done then finds its own
    /// object, which succeeds when it holds the same bytes (an empty object — a fence — is
    /// never taken for one's own).
    pub fn put_new(&self, name: &str, bytes: &[u8]) -> io::Result<()> {
        let folder = self.folder.clone();
        let mine = bytes.to_vec();
        let path = ObjectPath::from(name);
        self.wait(async move {
            let create = PutOptions {
                mode: PutMode::Create,
                ..PutOptions::default()
            };
            match folder
                .put_opts(&path, mine.clone().into(), create)
                .await
                .map_err(io_error)
            {
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

    /// The folder's objects: (name, size).
    pub fn list(&self) -> io::Result<Vec<(String, u64)>> {
        let folder = self.folder.clone();
        wait(
            async move {
                let metas: Vec<_> = folder.list(None).try_collect().await.map_err(io_error)?;
                Ok(metas
                    .into_iter()
                    .filter_map(|m| Some((m.location.filename()?.to_string(), m.size)))
                    .collect())
            },
            None,
        )
    }

    /// Object `name`'s bytes (`NotFound` when it is not there).
    pub fn get(&self, name: &str) -> io::Result<Vec<u8>> {
        let folder = self.folder.clone();
        let path = ObjectPath::from(name);
        wait(
            async move {
                let got = folder.get(&path).await.map_err(io_error)?;
                Ok(got.bytes().await.map_err(io_error)?.to_vec())
            },
            None,
        )
    }

    /// The first `len` bytes (fewer when one is shorter) of each of objects `names`, in order,
    /// read a few dozen at a time.
    pub fn get_heads(&self, names: &[String], len: u64) -> io::Result<Vec<Vec<u8>>> {
        use futures::StreamExt;
        let folder = self.folder.clone();
        let paths: Vec<ObjectPath> = names.iter().map(|n| ObjectPath::from(n.as_str())).collect();
        wait(
            async move {
                futures::stream::iter(paths)
                    .map(|path| {
                        let folder = folder.clone();
                        async move {
                            let options = GetOptions {
                                range: Some(GetRange::Bounded(0..len)),
                                ..GetOptions::default()
                            };
                            let got = folder.get_opts(&path, options).await.map_err(io_error)?;
                            Ok(got.bytes().await.map_err(io_error)?.to_vec())
                        }
                    })
                    .buffered(32)
                    .collect::<Vec<io::Result<Vec<u8>>>>()
                    .await
                    .into_iter()
                    .collect()
            },
            None,
        )
    }

    /// Deletes objects `names` (one that is not there is fine).
    pub fn delete(&self, names: &[String]) -> io::Result<()> {
        let folder = self.folder.clone();
        let names: Vec<ObjectPath> = names.iter().map(|n| ObjectPath::from(n.as_str())).collect();
        wait(
            async move {
                for name in names {
                    match folder.delete(&name).await {
                        Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                        Err(e) => return Err(io_error(e)),
                    }
                }
                Ok(())
            },
            None,
        )
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use object_store::memory::InMemory;

    #[test]
    fn creates_once_lists_reads_and_deletes() {
        let f = BlockingFolder::new(Arc::new(InMemory::new()));
        f.put_new("a", b"one").unwrap();
        // Its own bytes again (a retried create) pass; other bytes or a fence do not.
        f.put_new("a", b"one").unwrap();
        assert_eq!(
            f.put_new("a", b"two").unwrap_err().kind(),
            io::ErrorKind::AlreadyExists
        );
        f.put_new("fence", b"").unwrap();
        assert_eq!(
            f.put_new("fence", b"").unwrap_err().kind(),
            io::ErrorKind::AlreadyExists
        );
        let mut listed = f.list().unwrap();
        listed.sort();
        assert_eq!(listed, vec![("a".into(), 3), ("fence".into(), 0)]);
        assert_eq!(f.get("a").unwrap(), b"one");
        f.put_new("b", b"x").unwrap();
        assert_eq!(
            f.get_heads(&["b".into(), "a".into()], 2).unwrap(),
            vec![b"x".to_vec(), b"on".to_vec()]
        );
        assert_eq!(f.get("c").unwrap_err().kind(), io::ErrorKind::NotFound);
        f.delete(&["a".into(), "b".into(), "c".into()]).unwrap();
        assert_eq!(f.list().unwrap().len(), 1);
    }
}
