//! Work on one shared object kept to one node at a time (docs/SEVERAL_NODES.md): with the
//! blobs in a bucket every node reaches every repository, so the lock an item's operations
//! take inside a process is not enough. [`LeaseHold`] holds a lease of the store
//! (`ServiceHost::acquire_lease`, on the database's clock) while the work runs: taken before
//! it starts, renewed every third of [`TTL_MS`], given up when dropped. On one node (SQLite)
//! every lease is this node's at once.
//!
//! A bucket cannot check a fencing number, so a node cut off from the store for longer than
//! the lease could overlap with the next holder; the lease is long (30 s) against that, and
//! the renewal logs an error the moment it is lost.

use std::sync::Arc;
use std::time::Duration;

use kagi_core::KvError;
use kagi_host::ServiceHost;

/// How long a lease lasts unless renewed.
pub(crate) const TTL_MS: i64 = 30_000;
/// How often a waiting node asks again.
const POLL: Duration = Duration::from_millis(250);

/// A lease this node holds; renewed in the background, given up when dropped.
#[derive(Debug)]
pub(crate) struct LeaseHold {
    name: String,
    host: Arc<dyn ServiceHost>,
    renew: tokio::task::JoinHandle<()>,
}

impl LeaseHold {
    /// Takes the lease `name`, waiting while another node holds it — at most `wait` (then
    /// `busy` is the answer), or as long as it takes when `None`.
    pub(crate) async fn take(
        host: &Arc<dyn ServiceHost>,
        name: String,
        wait: Option<Duration>,
        busy: impl FnOnce() -> KvError,
    ) -> Result<Self, KvError> {
        let started = tokio::time::Instant::now();
        while !host.acquire_lease(&name, TTL_MS).await? {
            if wait.is_some_and(|w| started.elapsed() >= w) {
                return Err(busy());
            }
            tokio::time::sleep(POLL).await;
        }
        let (h, n) = (host.clone(), name.clone());
        let renew = tokio::spawn(async move {
            let every = Duration::from_millis(u64::try_from(TTL_MS / 3).unwrap_or(10_000));
            loop {
                tokio::time::sleep(every).await;
                match h.acquire_lease(&n, TTL_MS).await {
                    Ok(true) => {}
                    Ok(false) => {
                        tracing::error!(lease = %n, "lease lost while its work runs: another node may start the same work");
                    }
                    Err(e) => tracing::warn!(lease = %n, error = %e.message, "lease not renewed"),
                }
            }
        });
        Ok(Self {
            name,
            host: host.clone(),
            renew,
        })
    }

    /// Whether the lease `name` is free (or already this node's): `false` while another node
    /// holds it. Asking takes it for a moment; it is given up again at once.
    pub(crate) async fn is_free(host: &dyn ServiceHost, name: &str) -> Result<bool, KvError> {
        if !host.acquire_lease(name, 1_000).await? {
            return Ok(false);
        }
        host.release_lease(name).await?;
        Ok(true)
    }
}

impl Drop for LeaseHold {
    fn drop(&mut self) {
        self.renew.abort();
        let (host, name) = (self.host.clone(), std::mem::take(&mut self.name));
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if let Err(e) = host.release_lease(&name).await {
                    tracing::warn!(lease = %name, error = %e.message, "lease not given up; it expires");
                }
            });
        }
    }
}
