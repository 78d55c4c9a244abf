//! The SQL store: one implementation of [`Store`] over sqlx's `Any` driver, so SQLite (the
//! embedded default, `sqlite.rs`) and PostgreSQL (several nodes, `postgres.rs`) run the same
//! statements. The statements are written in the SQL both understand: `$1` placeholders,
//! `ON CONFLICT`, `RETURNING`, integer columns read as `i64`, no boolean results (SQLite has
//! none; `SELECT 1 … LIMIT 1` answers "exists?"). What differs — connecting, the schema and its
//! migrations, how a transaction that reads before it writes is begun — is the dialect's.

use async_trait::async_trait;
use kagi_core::key::{KeyVersionInfo, Tags};
use kagi_core::{KeyVersion, ObjectName, VaultName};
use sqlx::AnyPool;
use sqlx::{Any, Row, Transaction};

use crate::{
    KeyRecord, KeyVersionRecord, PrincipalRecord, ResourceGroupRecord, Result, SecretRecord,
    SecretVersionRecord, Store, StoreError, VaultRecord,
};
use kagi_core::secret::SecretVersionInfo;
use versioned::{KEYS, SECRETS};

mod alerts;
mod directory;
mod events;
mod groups;
mod postgres;
pub(crate) mod services;
mod sqlite;
mod versioned;

/// Which SQL engine a [`SqlStore`] talks to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dialect {
    /// One SQLite file in WAL mode (`kagi.db` in the data directory).
    Sqlite,
    /// A PostgreSQL database shared by several kagi nodes.
    Postgres,
}

/// Where a [`SqlStore`] lives, as `kagi server --store` names it.
#[derive(Clone, PartialEq, Eq)]
pub enum StoreLocation {
    /// A SQLite file (the default: `kagi.db` in the data directory).
    Sqlite(std::path::PathBuf),
    /// A PostgreSQL database, as a `postgres://` URL (which may carry a password).
    Postgres(String),
}

impl StoreLocation {
    /// Reads `--store`: `sqlite` (or nothing) for `<data_dir>/kagi.db`, or a
    /// `postgres://`/`postgresql://` URL.
    ///
    /// # Errors
    /// A message naming what is accepted, for anything else.
    pub fn parse(
        arg: Option<&str>,
        data_dir: &std::path::Path,
    ) -> std::result::Result<Self, String> {
        match arg.map(str::trim) {
            None | Some("") | Some("sqlite") => Ok(Self::Sqlite(data_dir.join("kagi.db"))),
            Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
                Ok(Self::Postgres(url.to_string()))
            }
            Some(other) => Err(format!(
                "--store {}: expected `sqlite` (the data directory's kagi.db) or a \
                 postgres://user@host:port/database URL",
                Self::Postgres(other.to_string()).redacted()
            )),
        }
    }

    /// The location for logs: a URL's password replaced by `***`.
    pub fn redacted(&self) -> String {
        match self {
            Self::Sqlite(path) => path.display().to_string(),
            Self::Postgres(url) => redact_password(url),
        }
    }
}

// A URL may carry a password: Debug shows the redacted form only.
impl std::fmt::Debug for StoreLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StoreLocation({})", self.redacted())
    }
}

/// `scheme://user:password@host/…?password=…` → `scheme://user:***@host/…?password=***`.
fn redact_password(url: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let mut out = redact_userinfo(base);
    if let Some(q) = query {
        let params: Vec<String> = q
            .split('&')
            .map(|p| match p.split_once('=') {
                Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                _ => p.to_string(),
            })
            .collect();
        out.push('?');
        out.push_str(&params.join("&"));
    }
    out
}

/// The user-info part of `redact_password`.
fn redact_userinfo(url: &str) -> String {
    let Some(start) = url.find("://").map(|i| i + 3) else {
        return url.to_string();
    };
    let authority_end = url[start..]
        .find(['/', '?'])
        .map_or(url.len(), |i| start + i);
    let authority = &url[start..authority_end];
    match (authority.rfind('@'), authority.find(':')) {
        (Some(at), Some(colon)) if colon < at => format!(
            "{}{}:***{}",
            &url[..start],
            &authority[..colon],
            &url[start + at..]
        ),
        _ => url.to_string(),
    }
}

/// The SQL store (SQLite or PostgreSQL).
#[derive(Debug, Clone)]
pub struct SqlStore {
    pub(crate) pool: AnyPool,
    dialect: Dialect,
    /// PostgreSQL's URL when this node may LISTEN for changes (a writable primary).
    listen_url: Option<String>,
    /// Opened read-only (`--read-only`, a hot standby): nothing is written.
    read_only: bool,
}

fn corrupt(table: &'static str, detail: impl ToString) -> StoreError {
    StoreError::Corrupt {
        table,
        detail: detail.to_string(),
    }
}

fn tags_json(tags: &Tags) -> String {
    serde_json::to_string(tags).unwrap_or_else(|_| "{}".into())
}

/// Writes a vault record: replacing one of the same name when `replace`, else only a new
/// name (`Conflict` otherwise: two nodes creating one name cannot both succeed).
async fn write_vault_in<'e, E>(e: E, v: &VaultRecord, replace: bool) -> Result<()>
where
    E: sqlx::Executor<'e, Database = Any>,
{
    let props = serde_json::to_string(&v.properties).map_err(|e| corrupt("vaults", e))?;
    let on_conflict = if replace {
        " ON CONFLICT (name) DO UPDATE SET subscription_id = excluded.subscription_id, \
         resource_group = excluded.resource_group, location = excluded.location, \
         tags = excluded.tags, properties = excluded.properties, updated = excluded.updated, \
         deleted_at = excluded.deleted_at, purge_at = excluded.purge_at"
    } else {
        ""
    };
    // The SQL is made of the two constant forms above, never of input.
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO vaults (name, subscription_id, resource_group, location, tags, properties, \
         created, updated, deleted_at, purge_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10){on_conflict}"
    )))
    .bind(v.name.as_str())
    .bind(&v.subscription_id)
    .bind(&v.resource_group)
    .bind(&v.location)
    .bind(tags_json(&v.tags))
    .bind(props)
    .bind(v.created)
    .bind(v.updated)
    .bind(v.deleted_at)
    .bind(v.purge_at)
    .execute(e)
    .await
    .map_err(|err| {
        if is_unique_violation(&err) {
            StoreError::Conflict(format!("vault {} exists", v.name))
        } else {
            changed_meanwhile(err, &v.name)
        }
    })?;
    Ok(())
}

/// Whether a statement failed for a serialisation failure (PostgreSQL's 40001: a concurrent
/// transaction changed what this one read).
pub(crate) fn is_serialization_failure(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.code().as_deref() == Some("40001"))
}

/// How many times a read-then-write transaction runs when concurrent ones keep failing it.
const ATTEMPTS: u32 = 10;

/// Runs a self-contained read-then-write transaction (`attempt` begins, reads, writes and
/// commits it) again while it fails with [`StoreError::Contended`]: the next run reads what
/// the concurrent writer committed, as a client's retry would, after a random pause below a
/// bound that doubles each time (10 ms to 1 s), so that the writers that failed together do
/// not all come back together.
pub(crate) async fn retrying<T, F, Fut>(mut attempt: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let mut n = 1;
    loop {
        match attempt().await {
            Err(StoreError::Contended(_)) if n < ATTEMPTS => {
                let bound = (10u64 << n).min(1000);
                let jitter = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| u64::from(d.subsec_nanos()));
                tokio::time::sleep(std::time::Duration::from_millis(jitter % bound + 1)).await;
                n += 1;
            }
            r => return r,
        }
    }
}

/// A serialisation failure is a conflict over vault `name`; anything else a database error.
fn changed_meanwhile(e: sqlx::Error, name: &VaultName) -> StoreError {
    if is_serialization_failure(&e) {
        StoreError::Conflict(format!("vault {name} changed meanwhile"))
    } else {
        e.into()
    }
}

/// A vault row.
fn vault_row(r: &sqlx::any::AnyRow) -> Result<VaultRecord> {
    let name: String = r.try_get("name")?;
    let tags: String = r.try_get("tags")?;
    let props: String = r.try_get("properties")?;
    Ok(VaultRecord {
        name: VaultName::parse(&name).map_err(|e| corrupt("vaults", e))?,
        subscription_id: r.try_get("subscription_id")?,
        resource_group: r.try_get("resource_group")?,
        location: r.try_get("location")?,
        tags: serde_json::from_str(&tags).map_err(|e| corrupt("vaults", e))?,
        properties: serde_json::from_str(&props).map_err(|e| corrupt("vaults", e))?,
        created: r.try_get("created")?,
        updated: r.try_get("updated")?,
        deleted_at: r.try_get("deleted_at")?,
        purge_at: r.try_get("purge_at")?,
    })
}

fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.is_unique_violation())
}

/// Registers the SQLite and PostgreSQL drivers with sqlx's `Any` (idempotent).
fn install_drivers() {
    sqlx::any::install_default_drivers();
}

impl SqlStore {
    /// Opens (creating if needed) the SQLite database file and brings its schema up to date.
    /// The file and its `-wal`/`-shm` companions are made owner-only (0600), also when an
    /// earlier kagi created them with the umask's mode: they hold webhook URLs, password hashes
    /// and sealed keys.
    pub async fn open_sqlite(path: &std::path::Path) -> Result<Self> {
        Ok(Self {
            pool: sqlite::open(path).await?,
            dialect: Dialect::Sqlite,
            listen_url: None,
            read_only: false,
        })
    }

    /// Opens an existing SQLite database so that nothing can write to it (`kagi server
    /// --read-only`): SQLite's read-only mode, so no write, checkpoint or WAL clean-up on close
    /// changes the file or its `-wal` (its `-shm` index is SQLite's shared memory, not data).
    /// The schema must be current already: a read-only node does not migrate.
    ///
    /// # Errors
    /// [`StoreError::Database`] when the file is missing or unreadable, [`StoreError::Corrupt`]
    /// when its schema is older or newer than this kagi's.
    pub async fn open_sqlite_read_only(path: &std::path::Path) -> Result<Self> {
        Ok(Self {
            pool: sqlite::open_read_only(path).await?,
            dialect: Dialect::Sqlite,
            listen_url: None,
            read_only: true,
        })
    }

    /// Connects to a PostgreSQL database (`postgres://user@host:port/db`) and brings its schema
    /// up to date; several nodes starting at once migrate it once (under a transaction-scoped
    /// advisory lock, which connection poolers keep intact).
    pub async fn open_postgres(url: &str) -> Result<Self> {
        Ok(Self {
            pool: postgres::open(url).await?,
            dialect: Dialect::Postgres,
            listen_url: Some(url.to_string()),
            read_only: false,
        })
    }

    /// Connects to a PostgreSQL database without writing to it (a hot standby, `kagi server
    /// --read-only`): every transaction is read-only, and the schema must be current already.
    pub async fn open_postgres_read_only(url: &str) -> Result<Self> {
        Ok(Self {
            pool: postgres::open_read_only(url).await?,
            dialect: Dialect::Postgres,
            // A hot standby refuses LISTEN: it re-checks instead.
            listen_url: None,
            read_only: true,
        })
    }

    /// Opens the store at `location`, read-only (no migration, every write refused) or not.
    pub async fn open(location: &StoreLocation, read_only: bool) -> Result<Self> {
        match (location, read_only) {
            (StoreLocation::Sqlite(path), false) => Self::open_sqlite(path).await,
            (StoreLocation::Sqlite(path), true) => Self::open_sqlite_read_only(path).await,
            (StoreLocation::Postgres(url), false) => Self::open_postgres(url).await,
            (StoreLocation::Postgres(url), true) => Self::open_postgres_read_only(url).await,
        }
    }

    /// Whether the database is a hot standby (PostgreSQL in recovery, serving reads while it
    /// follows its primary); `false` on SQLite. A read-only node on a standby follows its
    /// promotion with it.
    pub async fn in_recovery(&self) -> Result<bool> {
        match self.dialect {
            Dialect::Sqlite => Ok(false),
            Dialect::Postgres => Ok(sqlx::query_scalar("SELECT pg_is_in_recovery()")
                .fetch_one(&self.pool)
                .await?),
        }
    }

    /// The engine behind this store.
    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    /// Begins a transaction that reads before it writes. SQLite takes the write lock at once
    /// (`BEGIN IMMEDIATE`: a deferred transaction whose snapshot went stale cannot upgrade and
    /// fails with SQLITE_BUSY); PostgreSQL runs it SERIALIZABLE, so two nodes' racing
    /// read-then-write transactions cannot both commit what each read as absent.
    pub(crate) async fn begin_write(&self) -> Result<Transaction<'static, Any>> {
        let begin = match self.dialect {
            Dialect::Sqlite => "BEGIN IMMEDIATE",
            Dialect::Postgres => "BEGIN ISOLATION LEVEL SERIALIZABLE",
        };
        Ok(self.pool.begin_with(begin).await?)
    }

    /// Begins a transaction that reads a row, locks it, and then writes what depends on it:
    /// SQLite takes the write lock at once (`BEGIN IMMEDIATE`); PostgreSQL stays read committed
    /// and the read takes the returned lock clause (`FOR SHARE`), which makes a concurrent
    /// change of that row wait — without SERIALIZABLE's failures of transactions that only
    /// touched neighbouring rows.
    pub(crate) async fn begin_row_lock(&self) -> Result<(Transaction<'static, Any>, &'static str)> {
        Ok(match self.dialect {
            Dialect::Sqlite => (self.pool.begin_with("BEGIN IMMEDIATE").await?, ""),
            Dialect::Postgres => (self.pool.begin().await?, " FOR SHARE"),
        })
    }

    /// Writes a vault record (see [`write_vault_in`]).
    async fn write_vault(&self, v: &VaultRecord, replace: bool) -> Result<()> {
        write_vault_in(&self.pool, v, replace).await
    }

    /// The statement that begins reads that must see one snapshot (SQLite's transactions do;
    /// PostgreSQL's default gives each statement its own).
    fn begin_snapshot(&self) -> &'static str {
        match self.dialect {
            Dialect::Sqlite => "BEGIN",
            Dialect::Postgres => "BEGIN ISOLATION LEVEL REPEATABLE READ",
        }
    }

    /// Closes every connection and waits for them to end (the last one of a writable SQLite
    /// store checkpoints the WAL into the file); dropping the store closes them in the
    /// background.
    pub async fn close(self) {
        self.pool.close().await;
    }
}

#[async_trait]
impl Store for SqlStore {
    async fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>> {
        Ok(sqlx::query_scalar("SELECT v FROM meta WHERE k = $1")
            .bind(key)
            .fetch_optional(&self.pool)
            .await?)
    }

    async fn put_meta_if_absent(&self, key: &str, value: &[u8]) -> Result<Vec<u8>> {
        // Read first: set once, these rows are read at every start, and a read-only store
        // (which refuses even an INSERT that would do nothing) must start too.
        if let Some(stored) = self.get_meta(key).await? {
            return Ok(stored);
        }
        let mut tx = self.pool.begin().await?;
        sqlx::query("INSERT INTO meta (k, v) VALUES ($1, $2) ON CONFLICT (k) DO NOTHING")
            .bind(key)
            .bind(value)
            .execute(&mut *tx)
            .await?;
        let stored: Vec<u8> = sqlx::query_scalar("SELECT v FROM meta WHERE k = $1")
            .bind(key)
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(stored)
    }

    async fn ensure_subscription(
        &self,
        tenant_id: &str,
        subscription_id: &str,
        now: i64,
    ) -> Result<()> {
        // Read first: every start ensures the default subscription, a read-only store too.
        if self.subscription_tenant(subscription_id).await?.is_some() {
            return Ok(());
        }
        sqlx::query(
            "INSERT INTO subscriptions (id, tenant_id, created) VALUES ($1, $2, $3) \
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(subscription_id)
        .bind(tenant_id)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn subscription_tenant(&self, subscription_id: &str) -> Result<Option<String>> {
        Ok(
            sqlx::query_scalar("SELECT tenant_id FROM subscriptions WHERE id = $1")
                .bind(subscription_id)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    async fn list_subscriptions(&self) -> Result<Vec<(String, String)>> {
        let rows = sqlx::query("SELECT id, tenant_id FROM subscriptions ORDER BY id")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("id")?, r.try_get("tenant_id")?)))
            .collect()
    }

    async fn put_resource_group(&self, rg: &ResourceGroupRecord, now: i64) -> Result<()> {
        sqlx::query(
            "INSERT INTO resource_groups (subscription_id, name_folded, name, location, tags, created) \
             VALUES ($1, $2, $3, $4, $5, $6) \
             ON CONFLICT (subscription_id, name_folded) DO UPDATE SET tags = excluded.tags",
        )
        .bind(&rg.subscription_id)
        .bind(rg.name.to_ascii_lowercase())
        .bind(&rg.name)
        .bind(&rg.location)
        .bind(tags_json(&rg.tags))
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn list_resource_groups(
        &self,
        subscription_id: &str,
    ) -> Result<Vec<ResourceGroupRecord>> {
        let rows = sqlx::query(
            "SELECT name, location, tags FROM resource_groups \
             WHERE subscription_id = $1 ORDER BY name_folded",
        )
        .bind(subscription_id)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|r| {
                let tags: String = r.try_get("tags")?;
                Ok(ResourceGroupRecord {
                    subscription_id: subscription_id.to_string(),
                    name: r.try_get("name")?,
                    location: r.try_get("location")?,
                    tags: serde_json::from_str(&tags).map_err(|e| corrupt("resource_groups", e))?,
                })
            })
            .collect()
    }

    async fn get_resource_group(
        &self,
        subscription_id: &str,
        name: &str,
    ) -> Result<Option<ResourceGroupRecord>> {
        let row = sqlx::query(
            "SELECT name, location, tags FROM resource_groups \
             WHERE subscription_id = $1 AND name_folded = $2",
        )
        .bind(subscription_id)
        .bind(name.to_ascii_lowercase())
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| {
            let tags: String = r.try_get("tags")?;
            Ok(ResourceGroupRecord {
                subscription_id: subscription_id.to_string(),
                name: r.try_get("name")?,
                location: r.try_get("location")?,
                tags: serde_json::from_str(&tags).map_err(|e| corrupt("resource_groups", e))?,
            })
        })
        .transpose()
    }

    async fn delete_resource_group(&self, subscription_id: &str, name: &str) -> Result<bool> {
        retrying(|| self.delete_resource_group_once(subscription_id, name)).await
    }

    async fn put_principal(&self, p: &PrincipalRecord) -> Result<()> {
        self.insert_principal_row(p).await
    }

    async fn principal_by_client_id(&self, client_id: &str) -> Result<Option<PrincipalRecord>> {
        self.principal_row_by_client_id(client_id).await
    }

    async fn put_vault(&self, v: &VaultRecord) -> Result<()> {
        self.write_vault(v, true).await
    }

    async fn insert_vault(&self, v: &VaultRecord) -> Result<()> {
        self.write_vault(v, false).await
    }

    async fn list_vaults(&self) -> Result<Vec<VaultRecord>> {
        let rows = sqlx::query("SELECT * FROM vaults ORDER BY name")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(vault_row).collect()
    }

    async fn get_vault(&self, name: &VaultName) -> Result<Option<VaultRecord>> {
        sqlx::query("SELECT * FROM vaults WHERE name = $1")
            .bind(name.as_str())
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(vault_row)
            .transpose()
    }

    async fn replace_vault(&self, v: &VaultRecord, expected: &VaultRecord) -> Result<()> {
        let mut tx = self.begin_write().await?;
        let row = sqlx::query("SELECT * FROM vaults WHERE name = $1")
            .bind(v.name.as_str())
            .fetch_optional(&mut *tx)
            .await
            .map_err(|e| changed_meanwhile(e, &v.name))?;
        if row.as_ref().map(vault_row).transpose()?.as_ref() != Some(expected) {
            return Err(StoreError::Conflict(format!(
                "vault {} changed meanwhile",
                v.name
            )));
        }
        write_vault_in(&mut *tx, v, true).await?;
        tx.commit()
            .await
            .map_err(|e| changed_meanwhile(e, &v.name))?;
        Ok(())
    }

    async fn purge_vault(&self, name: &VaultName) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM key_versions WHERE vault = $1")
            .bind(name.as_str())
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM keys WHERE vault = $1")
            .bind(name.as_str())
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM vaults WHERE name = $1")
            .bind(name.as_str())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn load_keys(&self, vault: &VaultName) -> Result<Vec<KeyRecord>> {
        versioned::load(&self.pool, self.begin_snapshot(), &KEYS, vault).await
    }

    async fn add_key_version(
        &self,
        vault: &VaultName,
        name: &ObjectName,
        version: &KeyVersionRecord,
    ) -> Result<()> {
        let (tx, lock) = self.begin_row_lock().await?;
        versioned::add_version(tx, lock, &KEYS, vault, name, version).await
    }

    async fn update_key_version(
        &self,
        vault: &VaultName,
        name: &ObjectName,
        version: &KeyVersion,
        info: &KeyVersionInfo,
    ) -> Result<()> {
        versioned::update_version(
            &self.pool,
            &KEYS,
            vault,
            name,
            version,
            serde_json::to_string(info),
        )
        .await
    }

    async fn set_key_deleted(
        &self,
        vault: &VaultName,
        name: &ObjectName,
        deleted: Option<(i64, i64)>,
    ) -> Result<()> {
        versioned::set_deleted(&self.pool, &KEYS, vault, name, deleted).await
    }

    async fn purge_key(&self, vault: &VaultName, name: &ObjectName) -> Result<()> {
        versioned::purge(&self.pool, &KEYS, vault, name).await
    }

    async fn insert_key(&self, vault: &VaultName, key: &KeyRecord) -> Result<()> {
        versioned::insert(&self.pool, &KEYS, vault, key).await
    }

    // --- secrets ---
    async fn load_secrets(&self, vault: &VaultName) -> Result<Vec<SecretRecord>> {
        versioned::load(&self.pool, self.begin_snapshot(), &SECRETS, vault).await
    }

    async fn add_secret_version(
        &self,
        vault: &VaultName,
        name: &ObjectName,
        version: &SecretVersionRecord,
    ) -> Result<()> {
        let (tx, lock) = self.begin_row_lock().await?;
        versioned::add_version(tx, lock, &SECRETS, vault, name, version).await
    }

    async fn update_secret_version(
        &self,
        vault: &VaultName,
        name: &ObjectName,
        version: &KeyVersion,
        info: &SecretVersionInfo,
    ) -> Result<()> {
        versioned::update_version(
            &self.pool,
            &SECRETS,
            vault,
            name,
            version,
            serde_json::to_string(info),
        )
        .await
    }

    async fn set_secret_deleted(
        &self,
        vault: &VaultName,
        name: &ObjectName,
        deleted: Option<(i64, i64)>,
    ) -> Result<()> {
        versioned::set_deleted(&self.pool, &SECRETS, vault, name, deleted).await
    }

    async fn purge_secret(&self, vault: &VaultName, name: &ObjectName) -> Result<()> {
        versioned::purge(&self.pool, &SECRETS, vault, name).await
    }

    async fn insert_secret(&self, vault: &VaultName, secret: &SecretRecord) -> Result<()> {
        versioned::insert(&self.pool, &SECRETS, vault, secret).await
    }

    // --- rotation policies and events ---
    async fn get_rotation_policy(
        &self,
        vault: &VaultName,
        name: &ObjectName,
    ) -> Result<Option<kagi_core::rotation::RotationPolicy>> {
        self.policy_get(vault, name).await
    }

    async fn put_rotation_policy(
        &self,
        vault: &VaultName,
        name: &ObjectName,
        policy: &kagi_core::rotation::RotationPolicy,
    ) -> Result<()> {
        self.policy_put(vault, name, policy).await
    }

    async fn list_rotation_policies(
        &self,
        vault: &VaultName,
    ) -> Result<Vec<(String, kagi_core::rotation::RotationPolicy)>> {
        self.policy_list(vault).await
    }

    async fn load_event_marks(
        &self,
        vault: &VaultName,
        only: Option<(crate::events::MarkTable, &str)>,
    ) -> Result<Vec<crate::events::EventMark>> {
        self.marks_load(vault, only).await
    }

    async fn record_events(
        &self,
        vault: &VaultName,
        emissions: &[crate::events::EventEmission],
        unmarks: &[crate::events::EventMark],
        now: i64,
    ) -> Result<Vec<bool>> {
        self.events_record(vault, emissions, unmarks, now).await
    }

    async fn put_event_subscription(
        &self,
        vault: &VaultName,
        sub: &crate::events::EventSubscriptionRecord,
    ) -> Result<bool> {
        self.subscription_put(vault, sub).await
    }

    async fn list_event_subscriptions(
        &self,
        vault: &VaultName,
    ) -> Result<Vec<crate::events::EventSubscriptionRecord>> {
        self.subscription_list(vault).await
    }

    async fn delete_event_subscription(&self, vault: &VaultName, name: &str) -> Result<bool> {
        self.subscription_delete(vault, name).await
    }

    async fn due_deliveries(
        &self,
        now_ms: i64,
        limit: u32,
    ) -> Result<Vec<crate::events::PendingDelivery>> {
        self.deliveries_due(now_ms, limit).await
    }

    async fn next_delivery_ms(&self) -> Result<Option<i64>> {
        self.deliveries_next_ms().await
    }

    async fn delivery_succeeded(&self, event_id: &str, vault: &str, sub: &str) -> Result<()> {
        self.delivery_done(event_id, vault, sub).await
    }

    async fn delivery_failed(
        &self,
        event_id: &str,
        vault: &str,
        sub: &str,
        attempts: u32,
        next_attempt_ms: Option<i64>,
        error: &str,
        now: i64,
    ) -> Result<()> {
        self.delivery_fail(event_id, vault, sub, attempts, next_attempt_ms, error, now)
            .await
    }

    async fn dead_letters(
        &self,
        vault: &VaultName,
        sub: &str,
    ) -> Result<Vec<crate::events::DeadLetter>> {
        self.dead_letters_list(vault, sub).await
    }

    // --- storage services and policy assignments ---
    async fn get_service_document(
        &self,
        resource_key: &str,
        kind: &str,
        name: &str,
    ) -> Result<Option<crate::ServiceDocument>> {
        self.documents_get(resource_key, kind, name).await
    }

    async fn put_service_document(
        &self,
        resource_key: &str,
        doc: &crate::ServiceDocument,
    ) -> Result<()> {
        self.documents_put(resource_key, doc).await
    }

    async fn list_service_documents_of_kind(
        &self,
        kind: &str,
    ) -> Result<Vec<(String, crate::ServiceDocument)>> {
        self.documents_of_kind(kind).await
    }

    async fn put_service_document_if(
        &self,
        resource_key: &str,
        doc: &crate::ServiceDocument,
        guard: crate::DocumentRef<'_>,
        holds: crate::DocumentCondition<'_>,
    ) -> Result<bool> {
        self.documents_put_if(resource_key, doc, guard, holds).await
    }

    async fn delete_service_document(
        &self,
        resource_key: &str,
        kind: &str,
        name: &str,
    ) -> Result<bool> {
        self.documents_delete(resource_key, kind, name).await
    }

    async fn list_service_documents(
        &self,
        resource_key: &str,
        kind: &str,
    ) -> Result<Vec<crate::ServiceDocument>> {
        self.documents_list(resource_key, kind).await
    }

    async fn append_service_activity(
        &self,
        resource_key: &str,
        at: i64,
        body: &str,
    ) -> Result<i64> {
        self.activity_append(resource_key, at, body).await
    }

    async fn list_service_activity(
        &self,
        resource_key: &str,
    ) -> Result<Vec<crate::ActivityRecord>> {
        self.activity_list(resource_key).await
    }

    async fn delete_service_data(&self, resource_key: &str) -> Result<()> {
        self.service_data_delete(resource_key).await
    }

    async fn import_service_data(
        &self,
        resource_key: &str,
        import: &crate::ServiceImport,
    ) -> Result<()> {
        self.service_data_import(resource_key, import).await
    }

    async fn list_policy_assignments(&self) -> Result<Vec<(String, String)>> {
        self.policies_list().await
    }

    async fn put_policy_assignment(&self, id: &str, body: &str, now: i64) -> Result<bool> {
        self.policies_put(id, body, now).await
    }

    async fn delete_policy_assignment(&self, id: &str) -> Result<Option<String>> {
        self.policies_delete(id).await
    }

    async fn import_policy_assignments(
        &self,
        assignments: &[(String, String)],
        now: i64,
    ) -> Result<()> {
        self.policies_import(assignments, now).await
    }

    async fn change_marks(&self) -> Result<Vec<(String, i64)>> {
        match self.dialect {
            Dialect::Sqlite => Ok(Vec::new()),
            Dialect::Postgres => postgres::change_marks(&self.pool).await,
        }
    }

    async fn remember_assertion(
        &self,
        client: &str,
        key: &[u8],
        forget_at: i64,
        now: i64,
    ) -> Result<bool> {
        match self.dialect {
            // A read-only node (a standby) writes nothing: its own replay cache decides.
            Dialect::Postgres if !self.read_only => {
                postgres::remember_assertion(&self.pool, client, key, forget_at, now).await
            }
            _ => Ok(true),
        }
    }

    async fn acquire_lease(&self, name: &str, holder: &str, ttl_ms: i64) -> Result<Option<i64>> {
        match self.dialect {
            // One process has the file: its leases are its own.
            Dialect::Sqlite => Ok(Some(0)),
            Dialect::Postgres => postgres::acquire_lease(&self.pool, name, holder, ttl_ms).await,
        }
    }

    async fn release_lease(&self, name: &str, holder: &str) -> Result<()> {
        match self.dialect {
            Dialect::Sqlite => Ok(()),
            Dialect::Postgres => postgres::release_lease(&self.pool, name, holder).await,
        }
    }

    async fn lease_holder(&self, name: &str) -> Result<Option<String>> {
        match self.dialect {
            Dialect::Sqlite => Ok(None),
            Dialect::Postgres => postgres::lease_holder(&self.pool, name).await,
        }
    }

    fn shared(&self) -> bool {
        self.dialect == Dialect::Postgres
    }

    async fn change_marks_for(&self, vault: &str) -> Result<Vec<(String, i64)>> {
        match self.dialect {
            Dialect::Sqlite => Ok(Vec::new()),
            Dialect::Postgres => postgres::change_marks_for(&self.pool, vault).await,
        }
    }

    async fn watch_changes(&self) -> Result<Option<Box<dyn crate::changes::ChangeWatch>>> {
        match &self.listen_url {
            Some(url) => Ok(Some(Box::new(postgres::Listener::connect(url).await?))),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::StoreLocation;

    #[test]
    fn store_locations_are_parsed_and_passwords_never_shown() {
        let dir = std::path::Path::new("/d");
        assert_eq!(
            StoreLocation::parse(None, dir),
            Ok(StoreLocation::Sqlite(dir.join("kagi.db")))
        );
        let pg =
            StoreLocation::parse(Some("postgres://kagi:s3cret@db:5432/kagi?x=1"), dir).unwrap();
        assert_eq!(pg.redacted(), "postgres://kagi:***@db:5432/kagi?x=1");
        assert!(!format!("{pg:?}").contains("s3cret"));
        let q = StoreLocation::parse(Some("postgres://h/db?user=k&password=s3cret"), dir).unwrap();
        assert_eq!(q.redacted(), "postgres://h/db?user=k&password=***");
        let e = StoreLocation::parse(Some("mysql://u:pw@h/db"), dir).unwrap_err();
        assert!(e.contains("postgres://") && !e.contains("pw@"), "{e}");
        assert_eq!(
            StoreLocation::parse(Some("postgresql://h/db"), dir)
                .unwrap()
                .redacted(),
            "postgresql://h/db"
        );
    }
}
