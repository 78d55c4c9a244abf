//! SQLite, the embedded default: one file in WAL mode with `synchronous=FULL`, so an
//! acknowledged write survives kill -9 and power loss.

use std::path::Path;
use std::str::FromStr;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{AnyPool, ConnectOptions};

use super::{corrupt, install_drivers};
use crate::{Result, StoreError};

/// The first schema: meta, subscriptions, resource groups, principals, vaults, keys.
pub(super) const BASE_SCHEMA: &str = r#"
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
"#;

/// Secrets and their versions.
pub(super) const SECRETS_SCHEMA: &str = r#"
CREATE TABLE secrets (
    vault TEXT NOT NULL REFERENCES vaults(name) ON DELETE CASCADE,
    name_folded TEXT NOT NULL, name TEXT NOT NULL, deleted_at INTEGER, purge_at INTEGER,
    PRIMARY KEY (vault, name_folded));
CREATE TABLE secret_versions (
    vault TEXT NOT NULL, name_folded TEXT NOT NULL, version TEXT NOT NULL, seq INTEGER NOT NULL,
    info TEXT NOT NULL, sealed_value BLOB NOT NULL,
    PRIMARY KEY (vault, name_folded, version),
    FOREIGN KEY (vault, name_folded) REFERENCES secrets(vault, name_folded) ON DELETE CASCADE);
"#;

/// Schema, applied in order; `user_version` records how far a file has come. PostgreSQL's
/// list (`postgres.rs`) takes these steps too, translated.
pub(super) const MIGRATIONS: &[&str] = &[
    BASE_SCHEMA,
    SECRETS_SCHEMA,
    crate::directory::SCHEMA,
    crate::events::SCHEMA,
    crate::services::SCHEMA,
    crate::directory::BINDINGS_SCHEMA,
    crate::alerts::SCHEMA,
];

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

/// Opens (creating if needed) the file and brings its schema up to date.
pub(super) async fn open(path: &Path) -> Result<AnyPool> {
    restrict_to_owner(path)
        .map_err(|e| StoreError::Database(format!("{}: {e}", path.display())))?;
    // FULL: a commit is on disk before it is acknowledged, even across power loss. WAL is a
    // property of the file; the other settings are per connection.
    let pool = pool(
        path,
        false,
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON; \
         PRAGMA busy_timeout = 10000;",
    )
    .await?;
    migrate(&pool).await?;
    Ok(pool)
}

/// Opens an existing file read-only; its schema must be this kagi's.
pub(super) async fn open_read_only(path: &Path) -> Result<AnyPool> {
    let pool = pool(
        path,
        true,
        "PRAGMA foreign_keys = ON; PRAGMA busy_timeout = 10000;",
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
    Ok(pool)
}

/// A pool of connections to the file, each set up with `pragmas` (the `Any` driver takes its
/// options as a URL, which carries the open mode but not these settings).
async fn pool(path: &Path, read_only: bool, pragmas: &'static str) -> Result<AnyPool> {
    install_drivers();
    let sqlite = SqliteConnectOptions::from_str("sqlite:")?
        .filename(path)
        .create_if_missing(!read_only)
        .read_only(read_only);
    let options = AnyConnectOptions::from_url(&sqlite.to_url_lossy())?;
    Ok(AnyPoolOptions::new()
        .max_connections(4)
        .after_connect(move |conn, _| {
            Box::pin(async move {
                sqlx::raw_sql(pragmas).execute(conn).await?;
                Ok(())
            })
        })
        .connect_with(options)
        .await?)
}

async fn migrate(pool: &AnyPool) -> Result<()> {
    let mut tx = pool.begin().await?;
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
