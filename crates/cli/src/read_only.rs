//! `kagi server --read-only` (docs/READ_ONLY.md): what the start does differently. The HTTP
//! layer refuses writes (`kagi_http::Services::set_read_only`); here the node checks that its
//! data directory was made by a normal start, and says once that its own writers are paused.

use std::path::Path;
use std::sync::Arc;

/// The store file a normal first start creates.
const STORE_FILE: &str = "kagi.db";

/// Refuses a data directory that was never initialised: a first start writes (the store, its
/// meta rows, the root key, the bootstrap administrator), which a read-only node must not.
pub(crate) fn check_initialised(data_dir: &Path) -> anyhow::Result<()> {
    let store = data_dir.join(STORE_FILE);
    let admin = data_dir.join("bootstrap-admin.json");
    if !store.is_file() || !admin.is_file() {
        anyhow::bail!(
            "--read-only: {} was never initialised (no {}); start kagi once without \
             --read-only on it (or point --data-dir at a replica of one) first",
            data_dir.display(),
            store.display()
        );
    }
    Ok(())
}

/// Says, once at start, what a read-only node does not do.
pub(crate) fn announce() {
    println!("  read-only: writes answer 503 ServiceUnavailable (Retry-After); to take writes,");
    println!("    restart without --read-only (KAGI_READ_ONLY unset)");
    tracing::warn!(
        "read-only: paused the rotation scheduler, purge sweeps, event delivery, backup \
         schedules, disk key checks and TDE probes; disks (NBD) and SQL databases are not served"
    );
}

/// The platform on its data directory: [`kagi_vault::Platform::open_read_only`] (the store
/// opened so that nothing can write to it) when `read_only`, else a normal open.
pub(crate) async fn open_platform(
    config: kagi_vault::PlatformConfig,
    clock: Arc<dyn kagi_core::time::Clock>,
    hsm: Option<Arc<dyn kagi_crypto::KeyProvider>>,
    read_only: bool,
) -> Result<(kagi_vault::Platform, Option<kagi_vault::BootstrapAdmin>), kagi_vault::StartupError> {
    if read_only {
        kagi_vault::Platform::open_read_only(config, clock, hsm).await
    } else {
        kagi_vault::Platform::open_with_hsm(config, clock, hsm).await
    }
}
