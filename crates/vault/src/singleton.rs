//! Singleton work on a store several nodes share (docs/SEVERAL_NODES.md): the rotation
//! scheduler, purge sweeps and event delivery run on the node holding their lease
//! (`kagi_store::lease`), with their writes fenced. On SQLite the lease is always this node's.

use std::collections::HashSet;
use std::future::Future;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use kagi_store::lease::{Fence, fenced};

use crate::Platform;

/// How long a lease lasts unless renewed (renewed every third of it); `KAGI_LEASE_MS`.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(10);

/// This process's name as a lease holder: host, process id and a random part, so a
/// restarted node is a new holder.
pub fn node_id() -> &'static str {
    static ID: OnceLock<String> = OnceLock::new();
    ID.get_or_init(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().replace(char::is_whitespace, "-"))
            .unwrap_or_else(|_| "node".into());
        let random: [u8; 4] = kagi_crypto::random_array().unwrap_or_default();
        format!(
            "{host}-{}-{}",
            std::process::id(),
            random
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        )
    })
}

/// The leases this process holds now, to give up at a clean shutdown.
static HELD: Mutex<Option<HashSet<&'static str>>> = Mutex::new(None);

fn set_held(name: &'static str, held: bool) {
    let mut guard = HELD.lock().unwrap_or_else(|p| p.into_inner());
    let set = guard.get_or_insert_with(HashSet::new);
    if held {
        set.insert(name);
    } else {
        set.remove(name);
    }
}

impl Platform {
    /// Gives up every lease this node holds (a clean shutdown), so another node takes the
    /// work over at once instead of when the leases expire.
    pub async fn release_leases(&self) {
        let held: Vec<&'static str> = HELD
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default();
        for name in held {
            if let Err(e) = self.store.release_lease(name, node_id()).await {
                tracing::warn!(lease = name, error = %e, "cannot give the lease up");
            }
            set_held(name, false);
        }
    }

    /// Runs the job `make` builds (a loop that runs until dropped) whenever this node holds
    /// lease `name`: it starts when the lease is taken, runs fenced by it, and is dropped as
    /// soon as a renewal fails to keep the lease (or, with the store unreachable, before the
    /// lease could have expired). Never returns.
    pub async fn run_singleton<F, Fut>(
        self: Arc<Self>,
        name: &'static str,
        lease: Duration,
        mut make: F,
    ) where
        F: FnMut() -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        // A lease shorter than this would have the loop hammer the store.
        let lease = lease.max(Duration::from_millis(300));
        let holder = node_id();
        let ttl_ms = i64::try_from(lease.as_millis()).unwrap_or(i64::MAX);
        let renew_every = lease / 3;
        loop {
            let taken_at = tokio::time::Instant::now();
            let fencing = match self.store.acquire_lease(name, holder, ttl_ms).await {
                Ok(Some(f)) => f,
                Ok(None) => {
                    tokio::time::sleep(renew_every).await;
                    continue;
                }
                Err(e) => {
                    tracing::warn!(lease = name, error = %e, "cannot take the lease");
                    tokio::time::sleep(renew_every).await;
                    continue;
                }
            };
            tracing::info!(
                lease = name,
                holder,
                fencing,
                "took the lease: running here"
            );
            set_held(name, true);
            let fence = Fence {
                name: name.to_string(),
                holder: holder.to_string(),
                fencing,
            };
            // A task of its own: the renewals below must not wait on it (a job in the middle of
            // a fenced transaction holds the lease row's share lock, which a renewal's update
            // waits for — polled from this task, neither would ever move).
            let mut job = tokio::spawn(fenced(fence, make()));
            // Until this instant the lease is surely ours (measured from before asking).
            let mut held_until = taken_at + lease;
            let lost = loop {
                tokio::select! {
                    _ = &mut job => break false,
                    () = tokio::time::sleep(renew_every) => {}
                }
                let asked_at = tokio::time::Instant::now();
                match self.store.acquire_lease(name, holder, ttl_ms).await {
                    Ok(Some(f)) if f == fencing => held_until = asked_at + lease,
                    Ok(_) => break true,
                    Err(e) => {
                        tracing::warn!(lease = name, error = %e, "cannot renew the lease");
                        // Stop well before another node could take it over.
                        if tokio::time::Instant::now() + renew_every >= held_until {
                            break true;
                        }
                    }
                }
            };
            job.abort();
            set_held(name, false);
            if lost {
                tracing::warn!(
                    lease = name,
                    holder,
                    fencing,
                    "lost the lease: stopped here"
                );
            }
        }
    }
}
