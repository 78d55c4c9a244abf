//! `kagi server --read-only` (docs/READ_ONLY.md): what the start does differently. The HTTP
//! layer refuses writes (`kagi_http::Services::set_read_only`); here the node checks that its
//! data directory was made by a normal start, and says once that its own writers are paused.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// Refuses a data directory that was never initialised: a first start writes (the store, its
/// meta rows, the root key, the bootstrap administrator), which a read-only node must not. On
/// a shared PostgreSQL store the data directory needs its copy of the root key.
pub(crate) fn check_initialised(
    data_dir: &Path,
    store: &kagi_store::StoreLocation,
) -> anyhow::Result<()> {
    let needed: Vec<std::path::PathBuf> = match store {
        kagi_store::StoreLocation::Sqlite(db) => {
            vec![db.clone(), data_dir.join("bootstrap-admin.json")]
        }
        kagi_store::StoreLocation::Postgres(_) => {
            let plain = data_dir.join("root.key");
            let sealed = data_dir.join("root.key.sealed");
            vec![if sealed.is_file() { sealed } else { plain }]
        }
    };
    if let Some(missing) = needed.iter().find(|p| !p.is_file()) {
        anyhow::bail!(
            "--read-only: {} was never initialised (no {}); start kagi once without \
             --read-only on it (or point --data-dir at a replica of one, or copy the root key \
             of a node of this store) first",
            data_dir.display(),
            missing.display()
        );
    }
    Ok(())
}

/// Says, once at start, what a read-only node does not do.
pub(crate) fn announce() {
    println!("  read-only: writes answer 503 ServiceUnavailable (Retry-After); on a standby the");
    println!("    node restarts itself writable when the standby is promoted; else restart it");
    println!("    without --read-only (KAGI_READ_ONLY unset)");
    tracing::warn!(
        "read-only: paused the rotation scheduler, purge sweeps, event delivery, backup \
         schedules, disk key checks and TDE probes; disks (NBD) and SQL databases are not served"
    );
}

/// The platform on its data directory and store: [`kagi_vault::Platform::open_read_only`]
/// (the store opened so that nothing can write to it) when `read_only`, else a normal open; a
/// PostgreSQL store is opened here (read-only: every transaction read-only, as on a standby),
/// and returned too.
pub(crate) async fn open_platform(
    config: kagi_vault::PlatformConfig,
    clock: Arc<dyn kagi_core::time::Clock>,
    hsm: Option<Arc<dyn kagi_crypto::KeyProvider>>,
    read_only: bool,
    store: &kagi_store::StoreLocation,
) -> Result<
    (
        kagi_vault::Platform,
        Option<kagi_vault::BootstrapAdmin>,
        Option<kagi_store::SqlStore>,
    ),
    kagi_vault::StartupError,
> {
    let (platform, admin) = match store {
        kagi_store::StoreLocation::Sqlite(_) if read_only => {
            kagi_vault::Platform::open_read_only(config, clock, hsm).await?
        }
        kagi_store::StoreLocation::Sqlite(_) => {
            kagi_vault::Platform::open_with_hsm(config, clock, hsm).await?
        }
        kagi_store::StoreLocation::Postgres(_) => {
            let opened = kagi_store::SqlStore::open(store, read_only).await?;
            let platform = kagi_vault::Platform::open_on_store(
                config,
                clock,
                hsm,
                std::sync::Arc::new(opened.clone()),
            )
            .await?;
            return Ok((platform.0, platform.1, Some(opened)));
        }
    };
    Ok((platform, admin, None))
}

/// Resolves once the hot standby that `store` is on has been promoted (a failover: it takes
/// writes now), looking every `poll`. Never resolves when the store was no standby when the
/// node started: a node made read-only on a primary stays read-only.
pub(crate) async fn promoted(store: kagi_store::SqlStore, poll: Duration) {
    loop {
        match store.in_recovery().await {
            Ok(true) => break,
            Ok(false) => return std::future::pending().await,
            Err(e) => tracing::warn!(error = %e, "cannot tell whether the store is a standby"),
        }
        tokio::time::sleep(poll).await;
    }
    loop {
        tokio::time::sleep(poll).await;
        match store.in_recovery().await {
            Ok(false) => return,
            Ok(true) => {}
            // The standby restarting, or its primary's region going: look again.
            Err(e) => tracing::debug!(error = %e, "cannot tell whether the standby was promoted"),
        }
    }
}

/// Replaces this process with the same command without `--read-only` (and without
/// `KAGI_READ_ONLY`): the node starts again writable, with the same process id, listening on
/// the same addresses. Returns only if that failed.
pub(crate) fn restart_writable() -> anyhow::Error {
    use std::os::unix::process::CommandExt;
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => return anyhow::anyhow!("restarting without --read-only: {e}"),
    };
    let args = std::env::args_os().skip(1).filter(|a| {
        let a = a.to_string_lossy();
        a != "--read-only" && !a.starts_with("--read-only=")
    });
    let e = std::process::Command::new(exe)
        .args(args)
        .env_remove("KAGI_READ_ONLY")
        .exec();
    anyhow::anyhow!("restarting without --read-only: {e}")
}
