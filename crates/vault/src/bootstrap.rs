//! First start and every start: the data directory, the root key, the store, the token
//! signing key, the default tenant and subscription, and the bootstrap administrator.

use std::collections::HashMap;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;
use std::sync::{Arc, RwLock};

use kagi_core::ids::uuid_v4;
use kagi_core::time::Clock;
use kagi_crypto::{KeyProvider, RootKey};
use kagi_store::{PrincipalRecord, SqlStore, Store};
use serde::{Deserialize, Serialize};

use crate::state::VaultState;
use crate::{Platform, PlatformConfig};

/// Why the platform could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    /// A file or directory problem.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The root key could not be loaded or does not match the store.
    #[error("root key: {0}")]
    RootKey(String),
    /// The store failed.
    #[error("store: {0}")]
    Store(#[from] kagi_store::StoreError),
    /// Stored state is inconsistent.
    #[error("{0}")]
    Corrupt(String),
}

/// The data directory's root key, made on a first start (sealed by the HSM when there is one).
fn load_root_key(
    dir: &Path,
    hsm: Option<&dyn KeyProvider>,
) -> Result<Arc<dyn RootKey>, StartupError> {
    Ok(Arc::new(
        kagi_crypto::load_or_create_root_key(dir, hsm)
            .map_err(|e| StartupError::RootKey(e.to_string()))?,
    ))
}

/// Creates the data directory (owner only) if it is missing.
fn make_data_dir(dir: &Path) -> Result<(), StartupError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io(dir))
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StartupError + '_ {
    move |source| StartupError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// The bootstrap administrator's credentials, as written to `bootstrap-admin.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BootstrapAdmin {
    /// Tenant.
    pub tenant_id: String,
    /// Default subscription.
    pub subscription_id: String,
    /// Client id.
    pub client_id: String,
    /// Client secret.
    pub client_secret: String,
    /// Token authority (`https://localhost:8443`).
    pub authority: String,
}

/// The directory's load failures, as start-up failures.
fn load_error(e: kagi_directory::LoadError) -> StartupError {
    match e {
        kagi_directory::LoadError::Store(e) => StartupError::Store(e),
        kagi_directory::LoadError::RootKey(m) => StartupError::RootKey(m),
        kagi_directory::LoadError::Corrupt(m) => StartupError::Corrupt(m),
    }
}

fn random16() -> Result<[u8; 16], StartupError> {
    kagi_crypto::random_array().map_err(|e| StartupError::RootKey(e.to_string()))
}

/// Writes a credentials file atomically with mode 0600.
pub(crate) fn write_private_file(path: &Path, contents: &[u8]) -> Result<(), StartupError> {
    kagi_fs::write_atomically(path, contents, 0o600).map_err(io(path))
}

impl Platform {
    /// Opens the platform on its data directory, creating what a first start needs.
    /// Returns the bootstrap administrator's credentials when they were created just now
    /// (to be printed once).
    pub async fn open(
        config: PlatformConfig,
        clock: Arc<dyn Clock>,
    ) -> Result<(Self, Option<BootstrapAdmin>), StartupError> {
        Self::open_with_hsm(config, clock, None).await
    }

    /// [`Self::open`] with an HSM: it seals the root key (`root.key.sealed`; a plain
    /// `root.key` is sealed and removed) and holds RSA-HSM and EC-HSM keys.
    pub async fn open_with_hsm(
        config: PlatformConfig,
        clock: Arc<dyn Clock>,
        hsm: Option<Arc<dyn KeyProvider>>,
    ) -> Result<(Self, Option<BootstrapAdmin>), StartupError> {
        let dir = &config.data_dir;
        make_data_dir(dir)?;
        // The root key first: a store file without one is refused, not given a new key.
        let root = load_root_key(dir, hsm.as_deref())?;
        let store = Arc::new(SqlStore::open_sqlite(&dir.join("kagi.db")).await?);
        let (mut platform, admin) = Self::open_with(config, clock, root, store).await?;
        platform.hsm = hsm;
        Ok((platform, admin))
    }

    /// [`Self::open_with_hsm`] on a store opened by the caller (PostgreSQL, shared by several
    /// nodes; or one opened read-only). The data directory still holds the root key, which
    /// must be the one the store was sealed under (every node of a store has a copy).
    pub async fn open_on_store(
        config: PlatformConfig,
        clock: Arc<dyn Clock>,
        hsm: Option<Arc<dyn KeyProvider>>,
        store: Arc<dyn Store>,
    ) -> Result<(Self, Option<BootstrapAdmin>), StartupError> {
        make_data_dir(&config.data_dir)?;
        let root = load_root_key(&config.data_dir, hsm.as_deref())?;
        let (mut platform, admin) = Self::open_with(config, clock, root, store).await?;
        platform.hsm = hsm;
        Ok((platform, admin))
    }

    /// Opens the platform over a given root key and store.
    pub async fn open_with(
        config: PlatformConfig,
        clock: Arc<dyn Clock>,
        root: Arc<dyn RootKey>,
        store: Arc<dyn Store>,
    ) -> Result<(Self, Option<BootstrapAdmin>), StartupError> {
        // A store sealed under another root key would fail on every key: refuse at start.
        let fp = root.fingerprint();
        let stored = store
            .put_meta_if_absent("root_key_fingerprint", fp.as_bytes())
            .await?;
        if stored != fp.as_bytes() {
            return Err(StartupError::RootKey(format!(
                "the store was sealed under root key {} but this data directory's root key is \
                 {fp} (every node of a shared store needs a copy of the first node's root key)",
                String::from_utf8_lossy(&stored)
            )));
        }

        let issuer = kagi_directory::load_token_issuer(
            store.as_ref(),
            root.as_ref(),
            &config.authority(),
            clock.now(),
        )
        .await
        .map_err(load_error)?;

        let tenant = String::from_utf8_lossy(
            &store
                .put_meta_if_absent("default_tenant", uuid_v4(random16()?).as_bytes())
                .await?,
        )
        .into_owned();
        let subscription = String::from_utf8_lossy(
            &store
                .put_meta_if_absent("default_subscription", uuid_v4(random16()?).as_bytes())
                .await?,
        )
        .into_owned();
        store
            .ensure_subscription(&tenant, &subscription, clock.now())
            .await?;

        let (admin, created) =
            ensure_bootstrap_admin(&config, store.as_ref(), &tenant, &subscription, clock.now())
                .await?;

        // Before anything is loaded into memory: a restore cut short by a crash is undone.
        crate::vault_backup::roll_back_interrupted_restores(&config.data_dir, store.as_ref())
            .await?;
        // Loaded after the bootstrap administrator exists, so it is in the directory too.
        let state = kagi_directory::State::load(store.as_ref()).await?;
        let mut vaults = HashMap::new();
        for record in store.list_vaults().await? {
            let keys = store.load_keys(&record.name).await?;
            let secrets = store.load_secrets(&record.name).await?;
            vaults.insert(
                record.name.clone(),
                Arc::new(VaultState::new(record, keys).with_secrets(secrets)),
            );
        }
        let node_name = crate::nodes::load_node_name(&config.data_dir)?;
        let directory = kagi_directory::Directory::new(kagi_directory::Parts {
            store: store.clone(),
            clock: clock.clone(),
            root: root.clone(),
            issuer,
            authority: config.authority(),
            admin_object_id: admin.object_id.clone(),
            state,
        });
        let platform = Self {
            config,
            store,
            root,
            clock,
            default_tenant: tenant,
            default_subscription: subscription,
            admin_object_id: admin.object_id,
            vaults: RwLock::new(vaults),
            vault_creates: Default::default(),
            directory,
            test_clock: None,
            jobs: Default::default(),
            events: Default::default(),
            trusted_service_types: Default::default(),
            hsm: None,
            applied: Default::default(),
            strict_reads: Default::default(),
            blobs: Default::default(),
            node_name,
        };
        Ok((platform, created))
    }
}

/// Reads `bootstrap-admin.json`, or creates the administrator and the file. The file is
/// written before the principal is stored, so a crash in between leaves a file whose principal
/// the next start inserts — never a principal whose secret nobody has.
async fn ensure_bootstrap_admin(
    config: &PlatformConfig,
    store: &dyn Store,
    tenant: &str,
    subscription: &str,
    now: i64,
) -> Result<(PrincipalRecord, Option<BootstrapAdmin>), StartupError> {
    let path = config.data_dir.join("bootstrap-admin.json");
    let (creds, created) = match std::fs::read(&path) {
        Ok(bytes) => {
            let mode = std::fs::metadata(&path)
                .map_err(io(&path))?
                .permissions()
                .mode();
            if mode & 0o077 != 0 {
                return Err(StartupError::Corrupt(format!(
                    "{} is readable by other users (mode {:o}); run: chmod 600 {}",
                    path.display(),
                    mode & 0o777,
                    path.display()
                )));
            }
            let creds: BootstrapAdmin = serde_json::from_slice(&bytes)
                .map_err(|e| StartupError::Corrupt(format!("{}: {e}", path.display())))?;
            (creds, false)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // The directory's rule: a secret users can pass on a command line.
            let secret =
                kagi_directory::new_secret().map_err(|e| StartupError::RootKey(e.to_string()))?;
            let creds = BootstrapAdmin {
                tenant_id: tenant.to_string(),
                subscription_id: subscription.to_string(),
                client_id: uuid_v4(random16()?),
                client_secret: secret,
                authority: config.authority(),
            };
            let json = serde_json::to_vec_pretty(&creds)
                .map_err(|e| StartupError::Corrupt(e.to_string()))?;
            write_private_file(&path, &json)?;
            (creds, true)
        }
        Err(e) => return Err(io(&path)(e)),
    };
    let principal = match store.principal_by_client_id(&creds.client_id).await? {
        Some(p) => {
            if !kagi_identity::secret_matches(&creds.client_secret, &p.secret_hash) {
                return Err(StartupError::Corrupt(format!(
                    "{} does not match the administrator stored in this data directory",
                    path.display()
                )));
            }
            p
        }
        None => {
            let p = PrincipalRecord {
                object_id: uuid_v4(random16()?),
                tenant_id: creds.tenant_id.clone(),
                client_id: creds.client_id.clone(),
                display_name: "kagi bootstrap administrator".into(),
                secret_hash: kagi_identity::hash_secret(&creds.client_secret),
                kind: crate::directory::kind::BOOTSTRAP.into(),
                created: now,
                resource_id: None,
            };
            store.put_principal(&p).await?;
            p
        }
    };
    // The authority in the file follows the port kagi now listens on.
    let mut creds = creds;
    if creds.authority != config.authority() {
        creds.authority = config.authority();
        let json =
            serde_json::to_vec_pretty(&creds).map_err(|e| StartupError::Corrupt(e.to_string()))?;
        write_private_file(&path, &json)?;
    }
    Ok((principal, created.then_some(creds)))
}
