//! Reloading the directory from the store, when another node sharing it changed it
//! (docs/SEVERAL_NODES.md).

use std::sync::atomic::Ordering;

use kagi_store::StoreError;

use crate::{Directory, State};

impl Directory {
    /// Replaces the in-memory directory with the store's. A change this node applied while
    /// the store was being read (committed before, or after, the read) makes it read again:
    /// swapping in the older read would undo that change until the next reload.
    ///
    /// Returns `false` when local changes kept racing every read: the caller tries again later.
    ///
    /// # Errors
    /// The store's, with the directory left as it was.
    pub async fn reload(&self) -> Result<bool, StoreError> {
        for _ in 0..5 {
            let before = self.local_changes.load(Ordering::Acquire);
            let fresh = State::load(self.store.as_ref()).await?;
            let mut state = self.state.write().unwrap_or_else(|p| p.into_inner());
            if self.local_changes.load(Ordering::Acquire) == before {
                *state = fresh;
                return Ok(true);
            }
        }
        Ok(false)
    }
}
