//! The SQL of versioned objects, written once for every kind: an object table
//! (`keys`, `secrets`: name, deletion times) and its version table (`key_versions`,
//! `secret_versions`: version, order, public info as JSON, sealed material). A kind is its
//! [`Tables`] and its version record ([`VersionRow`]); a third kind (certificates, HSM keys)
//! adds one of each, not a third copy of the SQL.

use kagi_core::{KeyVersion, ObjectName, VaultName};
use sqlx::{Any, AnyPool, AssertSqlSafe, Row, Transaction};

use super::{corrupt, is_unique_violation};
use crate::{KeyVersionRecord, ObjectRecord, Result, SecretVersionRecord, StoreError};

/// The tables of one kind of versioned object, and the noun of its messages.
pub(super) struct Tables {
    /// The object table.
    objects: &'static str,
    /// The version table.
    versions: &'static str,
    /// The version table's column of sealed material.
    sealed: &'static str,
    /// The object's name in messages ("key", "secret").
    noun: &'static str,
}

/// `keys` and `key_versions`.
pub(super) const KEYS: Tables = Tables {
    objects: "keys",
    versions: "key_versions",
    sealed: "sealed_private",
    noun: "key",
};

/// `secrets` and `secret_versions` (schema version 2).
pub(super) const SECRETS: Tables = Tables {
    objects: "secrets",
    versions: "secret_versions",
    sealed: "sealed_value",
    noun: "secret",
};

/// A version record as its row holds it.
pub(super) trait VersionRow: Sized {
    /// Version id, order, public info (as JSON) and sealed material.
    fn parts(&self) -> (&KeyVersion, i64, serde_json::Result<String>, &[u8]);
    /// The record of a row.
    fn from_parts(
        version: KeyVersion,
        seq: i64,
        info: &str,
        sealed: Vec<u8>,
    ) -> serde_json::Result<Self>;
}

/// `VersionRow` for a version record whose sealed material is the field `$sealed`.
macro_rules! version_row {
    ($record:ty, $sealed:ident) => {
        impl VersionRow for $record {
            fn parts(&self) -> (&KeyVersion, i64, serde_json::Result<String>, &[u8]) {
                let info = serde_json::to_string(&self.info);
                (&self.version, self.seq, info, &self.$sealed)
            }
            fn from_parts(
                version: KeyVersion,
                seq: i64,
                info: &str,
                sealed: Vec<u8>,
            ) -> serde_json::Result<Self> {
                Ok(Self {
                    version,
                    seq,
                    info: serde_json::from_str(info)?,
                    $sealed: sealed,
                })
            }
        }
    };
}

version_row!(KeyVersionRecord, sealed_private);
version_row!(SecretVersionRecord, sealed_value);

// The table and column names below come from the constants above, never from input.

/// Makes sure the object row is there and live before a version of order `seq` is added: the
/// first version (`seq` 1) creates it (or joins the one another writer just created); a later
/// one needs it to exist — on a shared store the node adding it may not have seen yet that
/// another node purged the object, which must not come back with one version — and neither
/// may be added to an object another node deleted meanwhile. The row is read with `lock`
/// (PostgreSQL: `FOR SHARE`, so that a deletion or purge waits for this transaction; SQLite's
/// transaction holds the write lock already).
async fn ensure_row(
    tx: &mut Transaction<'_, Any>,
    t: &Tables,
    vault: &VaultName,
    name: &ObjectName,
    seq: i64,
    lock: &str,
) -> Result<()> {
    if seq <= 1 {
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO {} (vault, name_folded, name) VALUES ($1, $2, $3) \
             ON CONFLICT (vault, name_folded) DO NOTHING",
            t.objects
        )))
        .bind(vault.as_str())
        .bind(name.folded())
        .bind(name.as_str())
        .execute(&mut **tx)
        .await?;
    }
    let row = sqlx::query(AssertSqlSafe(format!(
        "SELECT deleted_at FROM {} WHERE vault = $1 AND name_folded = $2{lock}",
        t.objects
    )))
    .bind(vault.as_str())
    .bind(name.folded())
    .fetch_optional(&mut **tx)
    .await?;
    let Some(r) = row else {
        return Err(StoreError::Conflict(format!(
            "{} {} no longer exists (purged meanwhile)",
            t.noun,
            name.as_str()
        )));
    };
    let deleted: Option<i64> = r.try_get("deleted_at")?;
    if deleted.is_some() {
        return Err(StoreError::Conflict(format!(
            "{} {} is deleted",
            t.noun,
            name.as_str()
        )));
    }
    Ok(())
}

async fn insert_version<V: VersionRow>(
    tx: &mut Transaction<'_, Any>,
    t: &Tables,
    vault: &VaultName,
    name: &ObjectName,
    v: &V,
) -> Result<()> {
    let (version, seq, info, sealed) = v.parts();
    let info = info.map_err(|e| corrupt(t.versions, e))?;
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO {} (vault, name_folded, version, seq, info, {}) VALUES ($1, $2, $3, $4, $5, $6)",
        t.versions, t.sealed
    )))
    .bind(vault.as_str())
    .bind(name.folded())
    .bind(version.as_str())
    .bind(seq)
    .bind(info)
    .bind(sealed)
    .execute(&mut **tx)
    .await
    .map_err(|e| {
        if is_unique_violation(&e) {
            StoreError::Conflict(format!("{} version {version} exists", t.noun))
        } else {
            e.into()
        }
    })?;
    Ok(())
}

/// Every object of a vault with its versions, by lower-case name.
///
/// Both reads run in one transaction begun with `begin_snapshot` (one snapshot: on a shared
/// store another node may add an object and its first version between two plain reads).
pub(super) async fn load<V: VersionRow>(
    pool: &AnyPool,
    begin_snapshot: &'static str,
    t: &Tables,
    vault: &VaultName,
) -> Result<Vec<ObjectRecord<V>>> {
    let mut tx = pool.begin_with(begin_snapshot).await?;
    let objects = sqlx::query(AssertSqlSafe(format!(
        "SELECT name_folded, name, deleted_at, purge_at FROM {} WHERE vault = $1 \
         ORDER BY name_folded",
        t.objects
    )))
    .bind(vault.as_str())
    .fetch_all(&mut *tx)
    .await?;
    let versions = sqlx::query(AssertSqlSafe(format!(
        "SELECT name_folded, version, seq, info, {} AS sealed FROM {} \
         WHERE vault = $1 ORDER BY name_folded, seq",
        t.sealed, t.versions
    )))
    .bind(vault.as_str())
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    // Matched by name, not by position: the database sorts in its own collation, which need
    // not be Rust's byte order (PostgreSQL's en_US ignores hyphens).
    let mut out: Vec<(String, ObjectRecord<V>)> = Vec::with_capacity(objects.len());
    let mut index = std::collections::HashMap::with_capacity(objects.len());
    for r in &objects {
        let name: String = r.try_get("name")?;
        let folded: String = r.try_get("name_folded")?;
        index.insert(folded.clone(), out.len());
        out.push((
            folded,
            ObjectRecord {
                name: ObjectName::parse(&name).map_err(|e| corrupt(t.objects, e))?,
                deleted_at: r.try_get("deleted_at")?,
                purge_at: r.try_get("purge_at")?,
                versions: Vec::new(),
            },
        ));
    }
    for r in &versions {
        let folded: String = r.try_get("name_folded")?;
        let version: String = r.try_get("version")?;
        let info: String = r.try_get("info")?;
        let record = V::from_parts(
            KeyVersion::parse(&version).map_err(|e| corrupt(t.versions, e))?,
            r.try_get("seq")?,
            &info,
            r.try_get("sealed")?,
        )
        .map_err(|e| corrupt(t.versions, e))?;
        let idx = *index
            .get(&folded)
            .ok_or_else(|| corrupt(t.versions, format!("version without {}", t.noun)))?;
        out[idx].1.versions.push(record);
    }
    Ok(out.into_iter().map(|(_, o)| o).collect())
}

/// Adds a version, creating the object row with its first version (see [`ensure_row`]), in
/// `tx` (SQLite: begun with the write lock; PostgreSQL: read committed, the object row locked
/// by `lock`).
pub(super) async fn add_version<V: VersionRow>(
    mut tx: Transaction<'static, Any>,
    lock: &str,
    t: &Tables,
    vault: &VaultName,
    name: &ObjectName,
    version: &V,
) -> Result<()> {
    let seq = version.parts().1;
    ensure_row(&mut tx, t, vault, name, seq, lock).await?;
    insert_version(&mut tx, t, vault, name, version).await?;
    tx.commit().await?;
    Ok(())
}

/// Replaces the public part of a version (`info`: its JSON).
pub(super) async fn update_version(
    pool: &AnyPool,
    t: &Tables,
    vault: &VaultName,
    name: &ObjectName,
    version: &KeyVersion,
    info: serde_json::Result<String>,
) -> Result<()> {
    let info = info.map_err(|e| corrupt(t.versions, e))?;
    sqlx::query(AssertSqlSafe(format!(
        "UPDATE {} SET info = $1 WHERE vault = $2 AND name_folded = $3 AND version = $4",
        t.versions
    )))
    .bind(info)
    .bind(vault.as_str())
    .bind(name.folded())
    .bind(version.as_str())
    .execute(pool)
    .await?;
    Ok(())
}

/// Marks an object deleted (deletion and purge times) or live again (`None`).
pub(super) async fn set_deleted(
    pool: &AnyPool,
    t: &Tables,
    vault: &VaultName,
    name: &ObjectName,
    deleted: Option<(i64, i64)>,
) -> Result<()> {
    sqlx::query(AssertSqlSafe(format!(
        "UPDATE {} SET deleted_at = $1, purge_at = $2 WHERE vault = $3 AND name_folded = $4",
        t.objects
    )))
    .bind(deleted.map(|d| d.0))
    .bind(deleted.map(|d| d.1))
    .bind(vault.as_str())
    .bind(name.folded())
    .execute(pool)
    .await?;
    Ok(())
}

/// Removes an object and all its versions.
pub(super) async fn purge(
    pool: &AnyPool,
    t: &Tables,
    vault: &VaultName,
    name: &ObjectName,
) -> Result<()> {
    let mut tx = pool.begin().await?;
    for table in [t.versions, t.objects] {
        sqlx::query(AssertSqlSafe(format!(
            "DELETE FROM {table} WHERE vault = $1 AND name_folded = $2"
        )))
        .bind(vault.as_str())
        .bind(name.folded())
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Inserts a whole object (restore); `Conflict` if the name exists.
pub(super) async fn insert<V: VersionRow>(
    pool: &AnyPool,
    t: &Tables,
    vault: &VaultName,
    object: &ObjectRecord<V>,
) -> Result<()> {
    let mut tx = pool.begin().await?;
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO {} (vault, name_folded, name, deleted_at, purge_at) VALUES ($1, $2, $3, $4, $5)",
        t.objects
    )))
    .bind(vault.as_str())
    .bind(object.name.folded())
    .bind(object.name.as_str())
    .bind(object.deleted_at)
    .bind(object.purge_at)
    .execute(&mut *tx)
    .await
    .map_err(|e| {
        if is_unique_violation(&e) {
            StoreError::Conflict(format!("{} {} exists", t.noun, object.name))
        } else {
            e.into()
        }
    })?;
    for v in &object.versions {
        insert_version(&mut tx, t, vault, &object.name, v).await?;
    }
    tx.commit().await?;
    Ok(())
}
