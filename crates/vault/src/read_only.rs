//! Opening the platform for a read-only node (`kagi server --read-only`, docs/READ_ONLY.md):
//! the store is opened in SQLite's read-only mode, so nothing the node does (a start, a
//! request that slipped past the HTTP layer's refusal, a background task) can change it.

use std::sync::Arc;

use kagi_core::time::Clock;
use kagi_crypto::KeyProvider;
use kagi_store::SqlStore;

use crate::bootstrap::{BootstrapAdmin, StartupError};
use crate::{Platform, PlatformConfig};

impl Platform {
    /// [`Self::open_with_hsm`] on a data directory a normal start has initialised, with the
    /// store opened read-only. Every write the platform tries fails in the store (SQLite's
    /// "attempt to write a readonly database"); the HTTP layer refuses writes before that.
    ///
    /// # Errors
    /// [`StartupError`] as [`Self::open_with_hsm`]; [`StartupError::Store`] when the store is
    /// missing, its schema is not current, or the start would have to write (a first start, a
    /// restore cut short by a crash).
    pub async fn open_read_only(
        config: PlatformConfig,
        clock: Arc<dyn Clock>,
        hsm: Option<Arc<dyn KeyProvider>>,
    ) -> Result<(Self, Option<BootstrapAdmin>), StartupError> {
        let store =
            Arc::new(SqlStore::open_sqlite_read_only(&config.data_dir.join("kagi.db")).await?);
        Self::open_on_store(config, clock, hsm, store).await
    }
}
