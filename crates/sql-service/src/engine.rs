//! The databases' files: SQLite through kagi-sqlite-crypt, so that every page of the main
//! file, WAL, journal and temporary files is ciphertext under the database's DEK.

use std::path::{Path, PathBuf};

use kagi_core::KvError;

use kagi_sqlite_crypt::DatabaseKey;

use crate::keys::internal;

/// Opens the database file `path` under `key` with the settings of every connection the service
/// opens: SQLite never checkpoints on its own, neither after a commit (`wal_autocheckpoint=0`)
/// nor when the last connection closes (which would also delete the WAL). The backup pass
/// checkpoints, after it has copied the log's frames (`backups.rs`): a checkpoint it did not make
/// could let the log restart over frames no log backup holds.
pub(crate) fn open_blocking(
    path: &Path,
    key: &DatabaseKey,
) -> Result<rusqlite::Connection, kagi_sqlite_crypt::Error> {
    with_settings(kagi_sqlite_crypt::open(path, key)?)
}

/// As [`open_blocking`], for a database that exists: a missing or empty file is an error, so a
/// database whose file was lost never comes back empty.
pub(crate) fn open_existing_blocking(
    path: &Path,
    key: &DatabaseKey,
) -> Result<rusqlite::Connection, kagi_sqlite_crypt::Error> {
    with_settings(kagi_sqlite_crypt::open_existing(path, key)?)
}

fn with_settings(
    conn: rusqlite::Connection,
) -> Result<rusqlite::Connection, kagi_sqlite_crypt::Error> {
    conn.pragma_update(None, "wal_autocheckpoint", 0)?;
    conn.set_db_config(
        rusqlite::config::DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE,
        true,
    )?;
    Ok(conn)
}

/// Creates the database file `path` under `key` (an empty encrypted database).
pub(crate) async fn create(path: PathBuf, key: DatabaseKey) -> Result<(), KvError> {
    tokio::task::spawn_blocking(move || {
        open_blocking(&path, &key)?;
        // The new file's name is durable before the database is acknowledged.
        if let Some(dir) = path.parent() {
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|source| kagi_sqlite_crypt::Error::Io {
                    path: dir.to_path_buf(),
                    source,
                })?;
        }
        Ok::<_, kagi_sqlite_crypt::Error>(())
    })
    .await
    .map_err(|e| internal("creating a database", e))?
    .map_err(|e| internal("creating a database", e))
}

/// A new connection to the database file `path` under `key` (for one session).
pub(crate) async fn connect(
    path: PathBuf,
    key: DatabaseKey,
) -> Result<rusqlite::Connection, KvError> {
    tokio::task::spawn_blocking(move || open_existing_blocking(&path, &key))
        .await
        .map_err(|e| internal("opening a database", e))?
        .map_err(|e| internal("opening a database", e))
}

/// A read-only connection to the database file `path` under `key` (a session of a
/// geo-secondary: only replication writes it).
pub(crate) fn connect_read_only_blocking(
    path: &Path,
    key: &DatabaseKey,
) -> Result<rusqlite::Connection, kagi_sqlite_crypt::Error> {
    with_settings(kagi_sqlite_crypt::open_read_only(path, key)?)
}

/// [`connect_read_only_blocking`] on the blocking pool.
pub(crate) async fn connect_read_only(
    path: PathBuf,
    key: DatabaseKey,
) -> Result<rusqlite::Connection, KvError> {
    tokio::task::spawn_blocking(move || connect_read_only_blocking(&path, &key))
        .await
        .map_err(|e| internal("opening a database", e))?
        .map_err(|e| internal("opening a database", e))
}

/// Drops the page key of the database at `main` from memory (it became Inaccessible).
pub(crate) async fn revoke(main: &Path) {
    let path = main.to_path_buf();
    match tokio::task::spawn_blocking(move || kagi_sqlite_crypt::revoke_key(&path)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "page key not revoked"),
        Err(e) => tracing::warn!(error = %e, "page key not revoked"),
    }
}

/// The files of a database: the main file and what SQLite keeps beside it.
fn files_of(main: &Path) -> Vec<PathBuf> {
    ["", "-wal", "-shm", "-journal"]
        .iter()
        .map(|suffix| {
            let mut p = main.as_os_str().to_owned();
            p.push(suffix);
            PathBuf::from(p)
        })
        .collect()
}

/// Removes a database's files (those that exist), then syncs the directory.
pub(crate) async fn remove_files(main: &Path) -> Result<(), KvError> {
    let files = files_of(main);
    let dir = main.parent().map(Path::to_path_buf);
    tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        let mut removed = false;
        for f in files {
            match std::fs::remove_file(&f) {
                Ok(()) => removed = true,
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                Err(_) => {}
            }
        }
        // Nothing to sync when the files were not here (a database whose home is another
        // node, deleted while that node is not running: this node may have no `sql` at all).
        if let Some(d) = dir.filter(|_| removed) {
            std::fs::File::open(d)?.sync_all()?;
        }
        Ok(())
    })
    .await
    .map_err(|e| internal("removing a database", e))?
    .map_err(|e| internal("removing a database", e))
}
