//! The embedded store: one SQLite file in WAL mode.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use kagi_core::key::{KeyVersionInfo, Tags};
use kagi_core::{KeyVersion, ObjectName, VaultName};
use sqlx::Row;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

use crate::{
    KeyRecord, KeyVersionRecord, PrincipalRecord, ResourceGroupRecord, Result, SecretRecord,
    SecretVersionRecord, Store, StoreError, VaultRecord,
};
use kagi_core::secret::SecretVersionInfo;
use versioned::{KEYS, SECRETS};

mod alerts;
mod directory;
mod events;
pub(crate) mod services;
mod versioned;

/// Schema, applied in order; `user_version` records how far a file has come.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE meta (k TEXT PRIMARY KEY, v BLOB NOT NULL);
CREATE TABLE subscriptions (
    id TEXT PRIMARY KEY, tenant_id TEXT NOT NULL, created INTEGER NOT NULL);
CREATE TABLE resource_groups (
    subscription_id TEXT NOT NULL, name_folded TEXT NOT NULL, name TEXT NOT NULL,
    location TEXT NOT NULL, tags TEXT NOT NULL, created INTEGER NOT NULL,
    PRIMARY KEY (subscription_id, name_folded));
CREATE TABLE principals (
    object_id TEXT PRIMARY KEY, tenant_id TEXT NOT NULL, client_id TEXT NOT NULL UNIQUE,
    display_name TEXT NOT NULL, secret_hash BLOB NOT NULL, kind TEXT NOT NULL,
    created INTEGER NOT NULL);
CREATE TABLE vaults (
    name TEXT PRIMARY KEY, subscription_id TEXT NOT NULL, resource_group TEXT NOT NULL,
    location TEXT NOT NULL, tags TEXT NOT NULL, properties TEXT NOT NULL,
    created INTEGER NOT NULL, updated INTEGER NOT NULL,
    deleted_at INTEGER, purge_at INTEGER);
CREATE TABLE keys (
    vault TEXT NOT NULL REFERENCES vaults(name) ON DELETE CASCADE,
    name_folded TEXT NOT NULL, name TEXT NOT NULL, deleted_at INTEGER, purge_at INTEGER,
    PRIMARY KEY (vault, name_folded));
CREATE TABLE key_versions (
    vault TEXT NOT NULL, name_folded TEXT NOT NULL, version TEXT NOT NULL, seq INTEGER NOT NULL,
    info TEXT NOT NULL, sealed_private BLOB NOT NULL,
    PRIMARY KEY (vault, name_folded, version),
    FOREIGN KEY (vault, name_folded) REFERENCES keys(vault, name_folded) ON DELETE CASCADE);
"#,
    r#"
CREATE TABLE secrets (
    vault TEXT NOT NULL REFERENCES vaults(name) ON DELETE CASCADE,
    name_folded TEXT NOT NULL, name TEXT NOT NULL, deleted_at INTEGER, purge_at INTEGER,
    PRIMARY KEY (vault, name_folded));
CREATE TABLE secret_versions (
    vault TEXT NOT NULL, name_folded TEXT NOT NULL, version TEXT NOT NULL, seq INTEGER NOT NULL,
    info TEXT NOT NULL, sealed_value BLOB NOT NULL,
    PRIMARY KEY (vault, name_folded, version),
    FOREIGN KEY (vault, name_folded) REFERENCES secrets(vault, name_folded) ON DELETE CASCADE);
"#,
    crate::directory::SCHEMA,
    crate::events::SCHEMA,
    crate::services::SCHEMA,
    crate::directory::BINDINGS_SCHEMA,
    crate::alerts::SCHEMA,
];

/// The SQLite store.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pub(crate) pool: SqlitePool,
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

/// Creates the database file 0600 when it is missing — SQLite gives the `-wal` and `-shm` files
/// the database's mode — and takes group and other access away from existing ones.
fn restrict_to_owner(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    for suffix in ["", "-wal", "-shm"] {
        let mut name = path.as_os_str().to_owned();
        name.push(suffix);
        match std::fs::set_permissions(&name, std::fs::Permissions::from_mode(0o600)) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            other => other?,
        }
    }
    Ok(())
}

fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.is_unique_violation())
}

impl SqliteStore {
    /// Opens (creating if needed) the database file and brings its schema up to date. The file
    /// and its `-wal`/`-shm` companions are made owner-only (0600), also when an earlier kagi
    /// created them with the umask's mode: they hold webhook URLs, password hashes and sealed
    /// keys.
    pub async fn open(path: &Path) -> Result<Self> {
        restrict_to_owner(path)
            .map_err(|e| StoreError::Database(format!("{}: {e}", path.display())))?;
        let options = Self::options(path)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // FULL: a commit is on disk before it is acknowledged, even across power loss.
            .synchronous(SqliteSynchronous::Full);
        let store = Self {
            pool: Self::pool(options).await?,
        };
        store.migrate().await?;
        Ok(store)
    }

    /// Opens an existing database so that nothing can write to it (`kagi server --read-only`):
    /// SQLite's read-only mode, so no write, checkpoint or WAL clean-up on close changes the
    /// file or its `-wal` (its `-shm` index is SQLite's shared memory, not data). The schema
    /// must be current already: a read-only node does not migrate.
    ///
    /// # Errors
    /// [`StoreError::Database`] when the file is missing or unreadable, [`StoreError::Corrupt`]
    /// when its schema is older or newer than this kagi's.
    pub async fn open_read_only(path: &Path) -> Result<Self> {
        let pool = Self::pool(
            Self::options(path)?
                .create_if_missing(false)
                .read_only(true),
        )
        .await?;
        let current: i64 = sqlx::query_scalar("PRAGMA user_version")
            .fetch_one(&pool)
            .await?;
        if current as usize != MIGRATIONS.len() {
            return Err(corrupt(
                "schema",
                format!(
                    "database schema {current} is not this kagi's ({}); a read-only node does not \
                     migrate: start this kagi once without --read-only on the primary",
                    MIGRATIONS.len()
                ),
            ));
        }
        Ok(Self { pool })
    }

    /// The connection options both opens share.
    fn options(path: &Path) -> Result<SqliteConnectOptions> {
        Ok(SqliteConnectOptions::from_str("sqlite:")?
            .filename(path)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10)))
    }

    async fn pool(options: SqliteConnectOptions) -> Result<SqlitePool> {
        Ok(SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await?)
    }

    /// Closes every connection and waits for them to end (the last one of a writable store
    /// checkpoints the WAL into the file); dropping the store closes them in the background.
    pub async fn close(self) {
        self.pool.close().await;
    }

    async fn migrate(&self) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        let current: i64 = sqlx::query_scalar("PRAGMA user_version")
            .fetch_one(&mut *tx)
            .await?;
        if current as usize > MIGRATIONS.len() {
            return Err(corrupt(
                "schema",
                format!("database schema {current} is newer than this kagi understands"),
            ));
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
            sqlx::raw_sql(*sql).execute(&mut *tx).await?;
            // The number comes from this list's length, never from input.
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "PRAGMA user_version = {}",
                i + 1
            )))
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>> {
        Ok(sqlx::query_scalar("SELECT v FROM meta WHERE k = ?")
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
        sqlx::query("INSERT INTO meta (k, v) VALUES (?, ?) ON CONFLICT (k) DO NOTHING")
            .bind(key)
            .bind(value)
            .execute(&mut *tx)
            .await?;
        let stored: Vec<u8> = sqlx::query_scalar("SELECT v FROM meta WHERE k = ?")
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
            "INSERT INTO subscriptions (id, tenant_id, created) VALUES (?, ?, ?) \
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
            sqlx::query_scalar("SELECT tenant_id FROM subscriptions WHERE id = ?")
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
             VALUES (?, ?, ?, ?, ?, ?) \
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

    async fn get_resource_group(
        &self,
        subscription_id: &str,
        name: &str,
    ) -> Result<Option<ResourceGroupRecord>> {
        let row = sqlx::query(
            "SELECT name, location, tags FROM resource_groups \
             WHERE subscription_id = ? AND name_folded = ?",
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

    async fn put_principal(&self, p: &PrincipalRecord) -> Result<()> {
        self.insert_principal_row(p).await
    }

    async fn principal_by_client_id(&self, client_id: &str) -> Result<Option<PrincipalRecord>> {
        self.principal_row_by_client_id(client_id).await
    }

    async fn put_vault(&self, v: &VaultRecord) -> Result<()> {
        let props = serde_json::to_string(&v.properties).map_err(|e| corrupt("vaults", e))?;
        sqlx::query(
            "INSERT INTO vaults (name, subscription_id, resource_group, location, tags, properties, \
             created, updated, deleted_at, purge_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) \
             ON CONFLICT (name) DO UPDATE SET subscription_id = excluded.subscription_id, \
             resource_group = excluded.resource_group, location = excluded.location, \
             tags = excluded.tags, properties = excluded.properties, updated = excluded.updated, \
             deleted_at = excluded.deleted_at, purge_at = excluded.purge_at",
        )
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
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn list_vaults(&self) -> Result<Vec<VaultRecord>> {
        let rows = sqlx::query("SELECT * FROM vaults ORDER BY name")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
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
            })
            .collect()
    }

    async fn purge_vault(&self, name: &VaultName) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM key_versions WHERE vault = ?")
            .bind(name.as_str())
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM keys WHERE vault = ?")
            .bind(name.as_str())
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM vaults WHERE name = ?")
            .bind(name.as_str())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn load_keys(&self, vault: &VaultName) -> Result<Vec<KeyRecord>> {
        versioned::load(&self.pool, &KEYS, vault).await
    }

    async fn add_key_version(
        &self,
        vault: &VaultName,
        name: &ObjectName,
        version: &KeyVersionRecord,
    ) -> Result<()> {
        versioned::add_version(&self.pool, &KEYS, vault, name, version).await
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
        versioned::load(&self.pool, &SECRETS, vault).await
    }

    async fn add_secret_version(
        &self,
        vault: &VaultName,
        name: &ObjectName,
        version: &SecretVersionRecord,
    ) -> Result<()> {
        versioned::add_version(&self.pool, &SECRETS, vault, name, version).await
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
}
