//! What the service keeps in memory for an open disk: its family in the store (holding the
//! data key while the disk's key is usable) and the key's state.

use std::sync::{Arc, Mutex};

/// Whether a disk's key can be used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum KeyState {
    /// Usable.
    Usable,
    /// Unusable since `since` (platform clock): I/O goes on until the grace period ends.
    Failing {
        /// When the failure was first seen.
        since: i64,
        /// Why (names the key and the identity).
        reason: String,
    },
    /// The grace period is over: the data key is forgotten, I/O fails, access is refused.
    Revoked {
        /// Why.
        reason: String,
    },
}

/// An open disk.
pub(crate) struct DiskRuntime {
    /// The disk's resource id.
    pub(crate) id: String,
    /// Its family in the store, unlocked with the data key.
    pub(crate) family: kagi_disk::Family,
    /// Its volume (the disk itself).
    pub(crate) volume: Arc<kagi_disk::Volume>,
    /// The key's state.
    pub(crate) state: Mutex<KeyState>,
    /// Operations of its NBD connections running now (a write may still be running after its
    /// connection was cut: `endGetAccess` waits for them before it flushes).
    pub(crate) in_flight: Arc<tokio::sync::watch::Sender<usize>>,
}

impl std::fmt::Debug for DiskRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskRuntime")
            .field("id", &self.id)
            .field("state", &self.key_state())
            .finish_non_exhaustive()
    }
}

/// Counts an operation as running while it exists (moved into the blocking task that does
/// the work, so that a request given up on still counts until its write is done).
pub(crate) struct Running(Arc<tokio::sync::watch::Sender<usize>>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

impl DiskRuntime {
    /// Counts an operation of a connection until the guard is dropped.
    pub(crate) fn running(&self) -> Running {
        self.in_flight.send_modify(|n| *n += 1);
        Running(self.in_flight.clone())
    }

    /// Waits (at most `limit`) until no operation is running.
    pub(crate) async fn settle(&self, limit: std::time::Duration) {
        let mut rx = self.in_flight.subscribe();
        let _ = tokio::time::timeout(limit, rx.wait_for(|n| *n == 0)).await;
    }

    /// The key's state now.
    pub(crate) fn key_state(&self) -> KeyState {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Why I/O must fail now, if it must.
    pub(crate) fn refusal(&self) -> Option<String> {
        match self.key_state() {
            KeyState::Revoked { reason } => Some(reason),
            _ => None,
        }
    }

    /// The key became unusable at `now` (kept from the first time it was seen).
    pub(crate) fn failing(&self, now: i64, reason: &str) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if *s == KeyState::Usable {
            *s = KeyState::Failing {
                since: now,
                reason: reason.to_string(),
            };
        }
    }

    /// The grace period is over: every I/O of this disk fails from now on. (The family's
    /// data key is dropped by the keeper once no disk of the family can use it.)
    pub(crate) fn revoke(&self, reason: &str) {
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) = KeyState::Revoked {
            reason: reason.to_string(),
        };
    }

    /// Whether the disk's key is revoked.
    pub(crate) fn revoked(&self) -> bool {
        matches!(self.key_state(), KeyState::Revoked { .. })
    }

    /// The key is usable again: the family gets its data key back if it had lost it.
    pub(crate) fn restore(&self, keys: kagi_disk::FamilyKeys) -> Result<(), kagi_disk::DiskError> {
        if self.family.is_locked() {
            self.family.unlock(keys)?;
        }
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) = KeyState::Usable;
        Ok(())
    }
}
