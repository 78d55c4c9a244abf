//! kagi's backup agent (MISSION MP-1..MP-7): backs up a machine's folders into a kagi backup
//! vault. Everything is encrypted on the machine by the backup engine (`kagi-backup`) under a
//! random data key that a passphrase wraps (Argon2id, [`passphrase`]); the server stores only
//! ciphertext objects. The passphrase can be kept as a key vault secret written by the backup
//! vault's system-assigned identity, so that the data of a lost machine can be restored on
//! another one by reading that secret.
//!
//! State lives in the agent's own directory (`agent.json`, mode 0600, replaced atomically). It
//! holds the machine's credential and the working data key — never the passphrase, in any
//! form: changing the passphrase or restoring elsewhere needs it from the user or the key vault.
//! A registration whose passphrase step succeeded but whose registration did not is recorded
//! as incomplete, and every later command says so until `register` finishes it.

#![forbid(unsafe_code)]

pub mod passphrase;
pub mod remote;

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kagi_backup::{BackupOptions, BackupStats, BlobBackend, Progress, Repository, RestoreStats};
use kagi_crypto::data_key::DataKey;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use zeroize::Zeroizing;

pub use kagi_backup::RestoreOptions;
pub use remote::{AgentAuth, VaultConnection};

/// Agent failures. Messages name files, vaults and machines, never passphrases or keys.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The server answered with an error.
    #[error("{}", server_message(*status, code, inner.as_deref(), message))]
    Server {
        /// HTTP status.
        status: u16,
        /// Top-level code.
        code: String,
        /// Inner code (an agent error name such as `UserErrorSecretExistsSoftDeleted`).
        inner: Option<String>,
        /// Message.
        message: String,
    },
    /// The server or key vault could not be reached or answered nonsense.
    #[error("cannot reach kagi: {0}")]
    Unreachable(String),
    /// No passphrase-wrapped key opens with the passphrase given.
    #[error(
        "the passphrase is not the one these backups were made with (nothing was written); \
         use the machine's current passphrase, or read it from the key vault with \
         --key-vault-uri"
    )]
    WrongPassphrase,
    /// The machine is not registered (no state).
    #[error("this machine is not registered with a backup vault: run `kagi agent register`")]
    NotRegistered,
    /// Registration was left incomplete.
    #[error(
        "the registration of this machine is incomplete ({0}); run `kagi agent register` again \
         to finish it"
    )]
    RegistrationIncomplete(String),
    /// Bad input.
    #[error("{0}")]
    Invalid(String),
    /// The engine failed.
    #[error(transparent)]
    Backup(#[from] kagi_backup::BackupError),
    /// Local state could not be read or written.
    #[error("agent state {path}: {reason}")]
    State {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// Cryptography failed.
    #[error("crypto: {0}")]
    Crypto(String),
}

fn server_message(status: u16, code: &str, inner: Option<&str>, message: &str) -> String {
    match inner.and_then(kagi_core::agent::AgentErrorCode::by_name) {
        // The message already starts with "Name (number): ".
        Some(_) => format!("error {message}"),
        None => format!(
            "{code}{} ({status}): {message}",
            inner.map(|i| format!("/{i}")).unwrap_or_default()
        ),
    }
}

impl From<kagi_core::KvError> for AgentError {
    fn from(e: kagi_core::KvError) -> Self {
        Self::Invalid(e.message)
    }
}

/// Result of agent calls.
pub type Result<T> = std::result::Result<T, AgentError>;

/// Receives the progress of a backup or restore (called from worker threads).
pub type ProgressFn = Arc<dyn Fn(&Progress) + Send + Sync>;

/// The vault credentials file an administrator downloads (`kagi backup vault credentials`).
#[derive(Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VaultCredentials {
    /// The backup vault's resource id.
    pub vault_id: String,
    /// Its name.
    pub vault_name: String,
    /// The kagi server (`https://host:port`).
    pub server_url: String,
    /// The kagi CA (PEM) the agent trusts.
    pub ca_certificate: String,
    /// The credential (base64url of 32 bytes).
    pub secret: String,
    /// Expiry (RFC 3339).
    pub expires_on: String,
}

impl std::fmt::Debug for VaultCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VaultCredentials")
            .field("vault_id", &self.vault_id)
            .field("expires_on", &self.expires_on)
            .finish_non_exhaustive()
    }
}

impl VaultCredentials {
    /// Reads a vault credentials file.
    pub fn read(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| AgentError::State {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        serde_json::from_slice(&bytes).map_err(|e| {
            AgentError::Invalid(format!(
                "{} is not a vault credentials file: {e}",
                path.display()
            ))
        })
    }
}

/// A protected folder of this machine.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Folder {
    /// Absolute path.
    pub path: String,
    /// Back up every this many hours (`None`: on demand only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule_hours: Option<u64>,
    /// Keep the newest this many recovery points of the folder (`None`: all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_last: Option<u64>,
    /// When its last backup started (Unix seconds; 0: never).
    #[serde(default)]
    pub last_run: i64,
}

/// Where a registration stands.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(tag = "state", rename_all = "camelCase")]
pub enum Registration {
    /// Registered: backups may run.
    Complete,
    /// A step succeeded and a later one did not.
    Incomplete {
        /// What is done and what is missing.
        reason: String,
    },
}

/// The agent's state file (`agent.json`).
#[derive(Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentState {
    /// This machine's fully qualified name.
    pub machine_name: String,
    /// The backup vault.
    pub vault_id: String,
    /// Its name.
    pub vault_name: String,
    /// The kagi server.
    pub server_url: String,
    /// The kagi CA (PEM).
    pub ca_certificate: String,
    /// The machine's credential (base64url), once registered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine_secret: Option<String>,
    /// The key vault that keeps the passphrase (remembered for passphrase changes, MP-5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_vault_uri: Option<String>,
    /// The secret's identifier (versioned) after the last passphrase change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_id: Option<String>,
    /// Where the registration stands.
    pub registration: Registration,
    /// The repository's data key (base64url), which scheduled backups need without asking
    /// for the passphrase. It opens this machine's backups, not the passphrase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_key: Option<String>,
    /// Protected folders.
    #[serde(default)]
    pub folders: Vec<Folder>,
}

impl std::fmt::Debug for AgentState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentState")
            .field("machine_name", &self.machine_name)
            .field("vault_id", &self.vault_id)
            .field("registration", &self.registration)
            .finish_non_exhaustive()
    }
}

fn state_file(dir: &Path) -> PathBuf {
    dir.join("agent.json")
}

impl AgentState {
    /// Loads the state (`None`: never registered here).
    pub fn load(dir: &Path) -> Result<Option<Self>> {
        let path = state_file(dir);
        match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| AgentError::State {
                    path: path.display().to_string(),
                    reason: e.to_string(),
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(AgentError::State {
                path: path.display().to_string(),
                reason: e.to_string(),
            }),
        }
    }

    /// Stores the state (0600, atomically and durably).
    pub fn save(&self, dir: &Path) -> Result<()> {
        let path = state_file(dir);
        let bytes =
            Zeroizing::new(
                serde_json::to_vec_pretty(self).map_err(|e| AgentError::State {
                    path: path.display().to_string(),
                    reason: e.to_string(),
                })?,
            );
        kagi_fs::write_atomically(&path, &bytes, 0o600).map_err(|e| AgentError::State {
            path: path.display().to_string(),
            reason: e.to_string(),
        })
    }
}

/// What registration did.
#[derive(Clone, Debug, Default)]
pub struct RegisterOutcome {
    /// The key vault secret that keeps the passphrase, when a key vault was given.
    pub secret_id: Option<String>,
    /// Warnings (e.g. the key vault lacks purge protection).
    pub warnings: Vec<String>,
    /// The machine was registered before (its backups are kept).
    pub registered_again: bool,
    /// A new repository was created (false: the machine's existing one was opened).
    pub repository_created: bool,
}

/// What to register.
pub struct RegisterRequest<'a> {
    /// The vault credentials.
    pub credentials: &'a VaultCredentials,
    /// This machine's fully qualified name.
    pub machine: &'a str,
    /// The passphrase.
    pub passphrase: &'a str,
    /// Keep the passphrase in this key vault.
    pub key_vault_uri: Option<&'a str>,
}

/// Where a restore's passphrase comes from.
pub enum PassphraseSource<'a> {
    /// This machine's own data key (restoring its own backups).
    Local,
    /// Given by the user.
    Given(&'a str),
    /// Read from the key vault with the user's own service principal.
    KeyVault {
        /// The key vault.
        uri: &'a str,
        /// Tenant of the user.
        tenant: &'a str,
        /// Client id.
        client_id: &'a str,
        /// Client secret.
        client_secret: &'a str,
    },
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn join(e: tokio::task::JoinError) -> AgentError {
    AgentError::Invalid(format!("a worker thread failed: {e}"))
}

fn dek_of(state: &AgentState) -> Result<DataKey> {
    let raw = state
        .data_key
        .as_deref()
        .and_then(kagi_core::b64::decode)
        .ok_or_else(|| AgentError::RegistrationIncomplete("no data key on this machine".into()))?;
    let raw: Zeroizing<[u8; 32]> = Zeroizing::new(
        raw.as_slice()
            .try_into()
            .map_err(|_| AgentError::Crypto("the stored data key has the wrong length".into()))?,
    );
    DataKey::from_bytes(&raw).map_err(|e| AgentError::Crypto(e.to_string()))
}

fn state_error(path: &Path, e: std::io::Error) -> AgentError {
    AgentError::State {
        path: path.display().to_string(),
        reason: e.to_string(),
    }
}

/// Opens (creating it, 0600) a lock file of the state directory.
fn lock_file(dir: &Path, name: &str) -> Result<(std::fs::File, PathBuf)> {
    let path = dir.join(name);
    std::fs::create_dir_all(dir).map_err(|e| state_error(dir, e))?;
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| state_error(&path, e))?;
    Ok((f, path))
}

/// Holds the agent's job lock: one registration, backup, restore or passphrase change at a
/// time per state directory (prune and key changes need the repository to themselves, and the
/// state file is read and written around each job). Released when the returned file is
/// dropped, or when the process dies.
fn job_lock(dir: &Path) -> Result<std::fs::File> {
    let (f, path) = lock_file(dir, "job.lock")?;
    match f.try_lock() {
        Ok(()) => Ok(f),
        Err(std::fs::TryLockError::WouldBlock) => Err(AgentError::Invalid(
            "another kagi agent job of this machine is running; try again when it ends".into(),
        )),
        Err(std::fs::TryLockError::Error(e)) => Err(state_error(&path, e)),
    }
}

/// Holds the agent's state lock while `agent.json` is read, changed and written back (short:
/// never across a backup), so `protect` and the end of a backup cannot undo each other.
fn state_lock(dir: &Path) -> Result<std::fs::File> {
    let (f, path) = lock_file(dir, "state.lock")?;
    f.lock().map_err(|e| state_error(&path, e))?;
    Ok(f)
}

/// A registered (or partly registered) agent.
#[derive(Debug)]
pub struct Agent {
    dir: PathBuf,
    /// The state.
    pub state: AgentState,
    http: reqwest::Client,
}

/// Registers this machine (MP-1, MP-2, MP-4): checks the vault accepts agents, optionally
/// stores the passphrase in the key vault, registers, then creates or opens the machine's
/// repository. Each step's success is recorded before the next, so a failure leaves the state
/// saying exactly what is missing.
pub async fn register(dir: &Path, req: RegisterRequest<'_>) -> Result<(Agent, RegisterOutcome)> {
    kagi_core::agent::validate_machine_name(req.machine)?;
    kagi_core::agent::validate_passphrase(req.passphrase)?;
    let c = req.credentials;
    let http = remote::https_client(&c.ca_certificate)?;
    let conn = VaultConnection::new(
        http.clone(),
        &c.server_url,
        &c.vault_id,
        AgentAuth::VaultCredential(c.secret.clone()),
    );
    let probe = conn.probe(req.machine).await?;
    // A machine registered before: its backups were made under some passphrase. Check this
    // one opens them before storing it anywhere (a wrong one in the key vault would be worse
    // than none).
    let existing: Vec<kagi_backup::KeyEntry> =
        serde_json::from_value(probe["existingKeyEntries"].clone()).unwrap_or_default();
    // The data key it opens also proves to the vault that this is that machine.
    let known_dek = if existing.is_empty() {
        None
    } else {
        let pass = Zeroizing::new(req.passphrase.to_string());
        Some(
            tokio::task::spawn_blocking(move || passphrase::unwrap(&existing, &pass))
                .await
                .map_err(join)??,
        )
    };
    let _lock = job_lock(dir)?;
    // Registration writes the whole state: hold the state lock throughout.
    let _state = state_lock(dir)?;
    let previous = AgentState::load(dir)?;
    if let Some(p) = &previous
        && (!p.vault_id.eq_ignore_ascii_case(&c.vault_id)
            || !p.machine_name.eq_ignore_ascii_case(req.machine))
        && p.registration == Registration::Complete
    {
        return Err(AgentError::Invalid(format!(
            "this state directory belongs to machine '{}' registered with {}; use another \
             --state-dir",
            p.machine_name, p.vault_id
        )));
    }
    let mut state = AgentState {
        machine_name: req.machine.to_string(),
        vault_id: c.vault_id.clone(),
        vault_name: c.vault_name.clone(),
        server_url: c.server_url.clone(),
        ca_certificate: c.ca_certificate.clone(),
        machine_secret: None,
        key_vault_uri: req.key_vault_uri.map(str::to_string),
        secret_id: None,
        registration: Registration::Incomplete {
            reason: "registration started".into(),
        },
        data_key: None,
        folders: Vec::new(),
    };
    let mut proof = remote::MachineProof {
        key_proof: known_dek.as_ref().map(remote::key_proof),
        machine_secret: None,
    };
    // Registering again (same vault and machine) keeps the folders and, unless another is
    // given, the key vault that keeps the passphrase (MP-5); the machine secret is proof too
    // (a registration interrupted before the repository had a key entry).
    if let Some(p) = previous.filter(|p| {
        p.vault_id.eq_ignore_ascii_case(&c.vault_id)
            && p.machine_name.eq_ignore_ascii_case(req.machine)
    }) {
        proof.machine_secret = p.machine_secret;
        state.folders = p.folders;
        if state.key_vault_uri.is_none() {
            state.key_vault_uri = p.key_vault_uri;
            state.secret_id = p.secret_id;
        }
    }
    // A new repository's data key is drawn now, so that the registration records its check.
    let dek = match known_dek {
        Some(dek) => dek,
        None => DataKey::generate().map_err(|e| AgentError::Crypto(e.to_string()))?,
    };
    let key_check = remote::key_check(&dek);
    let mut outcome = RegisterOutcome::default();
    if let Some(uri) = req.key_vault_uri {
        let v = conn
            .store_passphrase(req.machine, uri, req.passphrase, &proof)
            .await?;
        outcome.secret_id = v["secretId"].as_str().map(str::to_string);
        outcome.warnings = v["warnings"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|w| w.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        state.secret_id = outcome.secret_id.clone();
        state.registration = Registration::Incomplete {
            reason: format!(
                "the passphrase was stored in the key vault as {}, but the machine is not \
                 registered yet",
                outcome.secret_id.as_deref().unwrap_or("?")
            ),
        };
        state.save(dir)?;
        // Test hook: stop between the two steps, as a crash or a lost connection would.
        if std::env::var_os("KAGI_AGENT_TEST_FAIL_AFTER_PASSPHRASE").is_some() {
            return Err(AgentError::Unreachable(
                "connection lost after the passphrase was stored (test hook)".into(),
            ));
        }
    }
    if req.key_vault_uri.is_none() {
        // The server replaces the machine secret: until the answer is saved, the old state
        // must not claim to be complete.
        state.save(dir)?;
    }
    let secret = conn
        .register(
            req.machine,
            req.key_vault_uri,
            outcome.secret_id.as_deref(),
            &proof,
            &key_check,
        )
        .await?;
    state.machine_secret = Some(secret.clone());
    state.registration = Registration::Incomplete {
        reason: "the machine is registered but its repository is not set up yet".into(),
    };
    state.save(dir)?;
    let mconn = conn.with_auth(AgentAuth::Machine(req.machine.to_string(), secret));
    let backend: Arc<dyn BlobBackend> =
        mconn.backend(req.machine, tokio::runtime::Handle::current());
    let passphrase = Zeroizing::new(req.passphrase.to_string());
    let (dek, created, again) = tokio::task::spawn_blocking(move || -> Result<_> {
        let entries = Repository::key_entries(backend.as_ref())?;
        let has_config = backend.exists("config")?;
        let again = has_config || !entries.is_empty();
        // A key entry is written before the config, so a crash between them is finished by
        // the next registration with the same passphrase.
        let dek = if entries.is_empty() {
            Repository::put_key_entry(
                backend.as_ref(),
                &passphrase::wrap(&dek, &passphrase, now())?,
            )?;
            dek
        } else {
            passphrase::unwrap(&entries, &passphrase)?
        };
        let raw = Zeroizing::new(*dek.expose_for_wrapping());
        if has_config {
            Repository::open(backend, dek)?;
        } else {
            Repository::init(backend, dek)?;
        }
        Ok((raw, !has_config, again))
    })
    .await
    .map_err(join)?
    .inspect_err(|e| {
        if matches!(e, AgentError::WrongPassphrase) {
            state.registration = Registration::Incomplete {
                reason: "the passphrase does not open this machine's existing backups; \
                         register again with the passphrase they were made with"
                    .into(),
            };
            let _ = state.save(dir);
        }
    })?;
    outcome.repository_created = created;
    outcome.registered_again = again;
    state.data_key = Some(kagi_core::b64::encode(&*dek));
    state.registration = Registration::Complete;
    state.save(dir)?;
    Ok((
        Agent {
            dir: dir.to_path_buf(),
            state,
            http,
        },
        outcome,
    ))
}

impl Agent {
    /// Opens the agent of `dir`. An incomplete registration is an error here: callers that can
    /// work without one use [`Agent::open_any`].
    pub fn open(dir: &Path) -> Result<Self> {
        let a = Self::open_any(dir)?;
        if let Registration::Incomplete { reason } = &a.state.registration {
            return Err(AgentError::RegistrationIncomplete(reason.clone()));
        }
        Ok(a)
    }

    /// Opens the agent of `dir` whatever its registration state.
    pub fn open_any(dir: &Path) -> Result<Self> {
        let state = AgentState::load(dir)?.ok_or(AgentError::NotRegistered)?;
        let http = remote::https_client(&state.ca_certificate)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            state,
            http,
        })
    }

    /// Takes the job lock and re-reads the state under it: another process (`kagi agent
    /// protect`, `register`, `set-passphrase`) may have changed it since this one was opened.
    fn lock_and_reload(&mut self) -> Result<std::fs::File> {
        let lock = job_lock(&self.dir)?;
        self.state = AgentState::load(&self.dir)?.ok_or(AgentError::NotRegistered)?;
        if let Registration::Incomplete { reason } = &self.state.registration {
            return Err(AgentError::RegistrationIncomplete(reason.clone()));
        }
        Ok(lock)
    }

    fn conn(&self) -> Result<VaultConnection> {
        let secret = self
            .state
            .machine_secret
            .clone()
            .ok_or_else(|| AgentError::RegistrationIncomplete("not registered yet".into()))?;
        Ok(VaultConnection::new(
            self.http.clone(),
            &self.state.server_url,
            &self.state.vault_id,
            AgentAuth::Machine(self.state.machine_name.clone(), secret),
        ))
    }

    fn own_backend(&self) -> Result<Arc<dyn BlobBackend>> {
        Ok(self
            .conn()?
            .backend(&self.state.machine_name, tokio::runtime::Handle::current()))
    }

    /// Protects a folder (or changes its schedule and retention).
    pub fn protect(
        &mut self,
        path: &Path,
        schedule_hours: Option<u64>,
        keep_last: Option<u64>,
    ) -> Result<Folder> {
        // Not the job lock: protecting a folder must not wait for a long backup.
        let _lock = state_lock(&self.dir)?;
        self.refresh()?;
        if let Registration::Incomplete { reason } = &self.state.registration {
            return Err(AgentError::RegistrationIncomplete(reason.clone()));
        }
        let abs = std::fs::canonicalize(path)
            .map_err(|e| AgentError::Invalid(format!("{}: {e}", path.display())))?;
        if !abs.is_dir() {
            return Err(AgentError::Invalid(format!(
                "{} is not a folder",
                abs.display()
            )));
        }
        if schedule_hours == Some(0) || keep_last == Some(0) {
            return Err(AgentError::Invalid(
                "--schedule-hours and --keep-last must be at least 1".into(),
            ));
        }
        let p = abs.display().to_string();
        let f = Folder {
            path: p.clone(),
            schedule_hours,
            keep_last,
            last_run: 0,
        };
        match self.state.folders.iter_mut().find(|f| f.path == p) {
            Some(existing) => {
                existing.schedule_hours = schedule_hours;
                existing.keep_last = keep_last;
            }
            None => self.state.folders.push(f.clone()),
        }
        self.state.save(&self.dir)?;
        Ok(f)
    }

    /// Backs up one protected folder into a new recovery point, then applies its retention.
    pub async fn backup(&mut self, folder: &str, report: ProgressFn) -> Result<BackupStats> {
        let _lock = self.lock_and_reload()?;
        let f = self
            .state
            .folders
            .iter()
            .find(|f| f.path == folder)
            .cloned()
            .ok_or_else(|| {
                AgentError::Invalid(format!(
                    "{folder} is not protected (kagi agent protect {folder})"
                ))
            })?;
        let started = now();
        let dek = dek_of(&self.state)?;
        let backend = self.own_backend()?;
        let source = PathBuf::from(&f.path);
        let r = tokio::task::spawn_blocking(move || -> Result<BackupStats> {
            let mut repo = Repository::open(backend, dek)?;
            let stats = repo.backup(&source, &BackupOptions::default(), started, &*report)?;
            if let Some(keep) = f.keep_last {
                let mine: Vec<_> = repo
                    .snapshots()?
                    .into_iter()
                    .filter(|s| s.source == f.path)
                    .collect();
                let excess = mine.len().saturating_sub(keep as usize);
                for s in &mine[..excess] {
                    repo.forget(&s.id)?;
                }
                // Free what no remaining recovery point uses (the repository is this
                // machine's alone, and the agent runs one job at a time).
                if excess > 0 {
                    repo.prune(&kagi_backup::PruneOptions::default(), &|_: &Progress| {})?;
                }
            }
            Ok(stats)
        })
        .await
        .map_err(join)?;
        if r.is_ok() {
            // Re-read: `protect` may have run meanwhile; change only this folder's last run.
            let _state = state_lock(&self.dir)?;
            if let Some(mut fresh) = AgentState::load(&self.dir)? {
                if let Some(x) = fresh.folders.iter_mut().find(|x| x.path == folder) {
                    x.last_run = started;
                }
                fresh.save(&self.dir)?;
                self.state = fresh;
            }
        }
        let conn = self.conn()?;
        let (status, message, stats) = match &r {
            Ok(s) => (
                if s.skipped_count == 0 {
                    "Succeeded"
                } else {
                    "CompletedWithWarnings"
                },
                format!(
                    "Backup of {folder}: recovery point {} ({} files, {} bytes added).",
                    s.snapshot.id, s.snapshot.files, s.bytes_added
                ),
                json!({"recoveryPoint": s.snapshot.id, "bytesRead": s.bytes_read,
                       "bytesAdded": s.bytes_added, "skipped": s.skipped,
                       "skippedCount": s.skipped_count}),
            ),
            Err(e) => (
                "Failed",
                format!("Backup of {folder} failed: {e}"),
                json!({}),
            ),
        };
        // The job record is best effort: the recovery point exists either way.
        let _ = conn
            .report(&self.state.machine_name, "Backup", status, &message, stats)
            .await;
        r
    }

    /// The data key of `machine`'s repository from a passphrase source.
    async fn dek_for(&self, machine: &str, source: &PassphraseSource<'_>) -> Result<DataKey> {
        let passphrase: Zeroizing<String> = match source {
            PassphraseSource::Local => {
                if !machine.eq_ignore_ascii_case(&self.state.machine_name) {
                    return Err(AgentError::Invalid(format!(
                        "restoring machine '{machine}' needs its passphrase: give \
                         --passphrase-file or --key-vault-uri"
                    )));
                }
                return dek_of(&self.state);
            }
            PassphraseSource::Given(p) => Zeroizing::new((*p).to_string()),
            PassphraseSource::KeyVault {
                uri,
                tenant,
                client_id,
                client_secret,
            } => {
                let name =
                    kagi_core::agent::passphrase_secret_name(machine, &self.state.vault_name)?;
                remote::read_secret_as_user(
                    &self.http,
                    &self.state.server_url,
                    tenant,
                    client_id,
                    client_secret,
                    uri,
                    &name,
                )
                .await?
            }
        };
        let backend = self
            .conn()?
            .backend(machine, tokio::runtime::Handle::current());
        tokio::task::spawn_blocking(move || -> Result<DataKey> {
            let entries = Repository::key_entries(backend.as_ref())?;
            if entries.is_empty() {
                return Err(AgentError::Invalid(
                    "that machine has no backups in this vault".into(),
                ));
            }
            passphrase::unwrap(&entries, &passphrase)
        })
        .await
        .map_err(join)?
    }

    /// The recovery points of `machine` (default: this one).
    pub async fn recovery_points(
        &self,
        machine: Option<&str>,
        source: &PassphraseSource<'_>,
    ) -> Result<Vec<kagi_backup::SnapshotInfo>> {
        let machine = machine.unwrap_or(&self.state.machine_name).to_string();
        let dek = self.dek_for(&machine, source).await?;
        let backend = self
            .conn()?
            .backend(&machine, tokio::runtime::Handle::current());
        tokio::task::spawn_blocking(move || -> Result<_> {
            Ok(Repository::open(backend, dek)?.snapshots()?)
        })
        .await
        .map_err(join)?
    }

    /// Restores a recovery point of `machine` (default: this one) into `target`. The data key
    /// is unwrapped before anything is written, so a wrong passphrase writes nothing. Owners
    /// come back only with [`RestoreOptions::owners`] (as root); without them, setuid and
    /// setgid bits are dropped (the agent usually runs as root).
    #[allow(clippy::too_many_arguments)]
    pub async fn restore(
        &self,
        machine: Option<&str>,
        source: &PassphraseSource<'_>,
        recovery_point: &str,
        sub_path: Option<&Path>,
        target: &Path,
        options: RestoreOptions,
        report: ProgressFn,
    ) -> Result<RestoreStats> {
        let _lock = job_lock(&self.dir)?;
        let machine = machine.unwrap_or(&self.state.machine_name).to_string();
        let dek = self.dek_for(&machine, source).await?;
        let backend = self
            .conn()?
            .backend(&machine, tokio::runtime::Handle::current());
        let (rp, sub, tgt) = (
            recovery_point.to_string(),
            sub_path.map(Path::to_path_buf),
            target.to_path_buf(),
        );
        let r = tokio::task::spawn_blocking(move || -> Result<RestoreStats> {
            let repo = Repository::open(backend, dek)?;
            Ok(repo.restore_with(&rp, sub.as_deref(), &tgt, &options, &*report)?)
        })
        .await
        .map_err(join)?;
        let (status, message) = match &r {
            Ok(s) => (
                "Succeeded",
                format!(
                    "Restore of recovery point {recovery_point} of machine '{machine}' to {}: {} files, {} bytes.",
                    target.display(),
                    s.files,
                    s.bytes
                ),
            ),
            Err(e) => ("Failed", format!("Restore of {recovery_point} failed: {e}")),
        };
        let _ = self
            .conn()?
            .report(
                &self.state.machine_name,
                "Restore",
                status,
                &message,
                Value::Null,
            )
            .await;
        r
    }

    /// Changes the passphrase (MP-5): wraps the data key under the new passphrase, keeps it in
    /// the key vault (given or remembered) as a new version of the machine's secret, then
    /// removes the entries of older passphrases. If the key vault refuses, the new entry is
    /// removed again and nothing has changed. Returns the secret id, when a key vault is used.
    pub async fn set_passphrase(
        &mut self,
        new: &str,
        key_vault_uri: Option<&str>,
    ) -> Result<Option<String>> {
        kagi_core::agent::validate_passphrase(new)?;
        let _lock = self.lock_and_reload()?;
        let dek = dek_of(&self.state)?;
        let entry = passphrase::wrap(&dek, new, now())?;
        let backend = self.own_backend()?;
        let (b, e) = (backend.clone(), entry.clone());
        let old: Vec<String> = tokio::task::spawn_blocking(move || -> Result<_> {
            let old = Repository::key_entries(b.as_ref())?
                .into_iter()
                .map(|x| x.id)
                .collect();
            Repository::put_key_entry(b.as_ref(), &e)?;
            Ok(old)
        })
        .await
        .map_err(join)??;
        let uri = key_vault_uri
            .map(str::to_string)
            .or_else(|| self.state.key_vault_uri.clone());
        let mut secret_id = None;
        if let Some(uri) = &uri {
            let conn = self.conn()?;
            match conn
                .store_passphrase(
                    &self.state.machine_name,
                    uri,
                    new,
                    &remote::MachineProof::default(),
                )
                .await
            {
                Ok(v) => secret_id = v["secretId"].as_str().map(str::to_string),
                // No definite answer: the key vault may hold the new passphrase already. Keep
                // both entries, so that whichever passphrase it holds opens the backups.
                Err(err) if !matches!(&err, AgentError::Server { status, .. } if (400..500).contains(status)) =>
                {
                    return Err(AgentError::Invalid(format!(
                        "the passphrase change is unfinished ({err}); both the old and the new \
                         passphrase open the backups for now: run set-passphrase again"
                    )));
                }
                Err(err) => {
                    let (b, id) = (backend.clone(), entry.id.clone());
                    tokio::task::spawn_blocking(move || {
                        Repository::delete_key_entry(b.as_ref(), &id)
                    })
                    .await
                    .map_err(join)??;
                    return Err(err);
                }
            }
        }
        tokio::task::spawn_blocking(move || -> Result<()> {
            for id in old {
                Repository::delete_key_entry(backend.as_ref(), &id)?;
            }
            Ok(())
        })
        .await
        .map_err(join)??;
        {
            let _state = state_lock(&self.dir)?;
            self.refresh()?;
            self.state.key_vault_uri = uri;
            if secret_id.is_some() {
                self.state.secret_id = secret_id.clone();
            }
            self.state.save(&self.dir)?;
        }
        let _ = self
            .conn()?
            .report(
                &self.state.machine_name,
                "SetPassphrase",
                "Succeeded",
                &format!(
                    "Passphrase changed{}.",
                    secret_id
                        .as_deref()
                        .map(|s| format!("; kept in the key vault as {s}"))
                        .unwrap_or_default()
                ),
                Value::Null,
            )
            .await;
        Ok(secret_id)
    }

    /// Re-reads the state (another command may have protected a folder meanwhile).
    pub fn refresh(&mut self) -> Result<()> {
        self.state = AgentState::load(&self.dir)?.ok_or(AgentError::NotRegistered)?;
        Ok(())
    }

    /// The folders whose scheduled backup is due at `at`.
    pub fn due(&self, at: i64) -> Vec<String> {
        self.state
            .folders
            .iter()
            .filter(|f| {
                f.schedule_hours
                    .is_some_and(|h| f.last_run + (h as i64) * 3600 <= at)
            })
            .map(|f| f.path.clone())
            .collect()
    }

    /// The machines registered with this vault.
    pub async fn machines(&self) -> Result<Value> {
        self.conn()?.machines().await
    }
}
