//! The storage services the server hands their requests to, besides the key vault (which the
//! platform serves): built by whoever starts the server (`kagi server`, the test harness) and
//! reaching each request through its extensions.

use std::sync::{Arc, RwLock};

use kagi_backup_service::BackupService;
use kagi_core::{ErrorCode, KvError};

/// The storage services of one server. Cloning shares them.
#[derive(Clone, Debug, Default)]
pub struct Services {
    backup: Arc<RwLock<Option<Arc<BackupService>>>>,
}

impl Services {
    /// The services: backup vaults when `backup` is given (otherwise their routes answer 404).
    pub fn new(backup: Option<Arc<BackupService>>) -> Self {
        Self {
            backup: Arc::new(RwLock::new(backup)),
        }
    }

    /// The backup service, if the server runs one.
    pub fn backup(&self) -> Option<Arc<BackupService>> {
        self.backup
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Replaces the backup service (as a restarted server would build it anew); requests
    /// already being served finish on the one they started with.
    pub fn set_backup(&self, backup: Arc<BackupService>) {
        *self.backup.write().unwrap_or_else(|p| p.into_inner()) = Some(backup);
    }
}

/// The backup service of the server a request reached (its extensions carry [`Services`]).
pub(crate) fn backup_of(
    extensions: &axum::http::Extensions,
) -> Result<Arc<BackupService>, KvError> {
    extensions
        .get::<Services>()
        .and_then(Services::backup)
        .ok_or_else(|| KvError::new(ErrorCode::NotFound, "This server runs no backup service."))
}
