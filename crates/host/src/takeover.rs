//! The takeover sweep's loop and logging, shared by the storage services whose resources live
//! on one node (disk families, SQL servers: docs/SEVERAL_NODES.md, "Takeovers without a
//! request"). The rules are `kagi_core::takeover`'s; what a service looks for and how it takes
//! a resource over are its own.

use std::future::Future;
use std::time::Instant;

use kagi_core::KvError;
use kagi_core::takeover::{DEFAULT_GRACE_SECONDS, GRACE_VARIABLE, GoneHomes, Say};

/// Starts a sweep: `pass` runs every [`GoneHomes::every`], for as long as the process runs,
/// with the sweep's memory (its grace from `KAGI_TAKEOVER_AFTER`), which it hands back.
pub fn spawn_takeover_sweep<F, Fut>(mut pass: F)
where
    F: FnMut(GoneHomes) -> Fut + Send + 'static,
    Fut: Future<Output = GoneHomes> + Send,
{
    let mut gone = GoneHomes::new(crate::env_seconds(GRACE_VARIABLE, DEFAULT_GRACE_SECONDS));
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(gone.every()).await;
            gone = pass(gone).await;
        }
    });
}

/// Notes in `gone` and logs how a sweep's try to take `what` (`"SQL server"`, `"disk
/// family"`) `id` over from `home` came out: `Ok(true)` taken over here, `Ok(false)` served by
/// another node (or taken over there), `Err` failed (retried later, logged rarely).
pub fn note_takeover(
    gone: &mut GoneHomes,
    what: &str,
    (id, home): (&str, &str),
    outcome: Result<bool, KvError>,
) {
    match outcome {
        Ok(here) => {
            gone.succeeded(id);
            if here {
                tracing::info!(resource = %id, from = %home, "{what} whose home is gone taken over by the takeover sweep, with no request");
            }
        }
        Err(e) => match gone.failed(id, &e, Instant::now()) {
            Say::Warn => {
                tracing::warn!(resource = %id, home = %home, error = %e.message, "{what} whose home is gone not taken over")
            }
            Say::Debug => {
                tracing::debug!(resource = %id, home = %home, error = %e.message, "{what} whose home is gone not taken over this time")
            }
            Say::Nothing => {}
        },
    }
}
