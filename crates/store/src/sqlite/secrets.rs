//! The `secrets` and `secret_versions` tables (schema version 2), mirroring `keys` and
//! `key_versions`. Rows of a vault go with it when the vault row is deleted (foreign keys
//! cascade).

use kagi_core::secret::SecretVersionInfo;
use kagi_core::{KeyVersion, ObjectName, VaultName};
use sqlx::{Row, Sqlite, Transaction};

use super::{SqliteStore, corrupt, is_unique_violation};
use crate::{Result, SecretRecord, SecretVersionRecord, StoreError};

impl SqliteStore {
    async fn ensure_secret_row(
        tx: &mut Transaction<'_, Sqlite>,
        vault: &VaultName,
        name: &ObjectName,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO secrets (vault, name_folded, name) VALUES (?, ?, ?) \
             ON CONFLICT (vault, name_folded) DO NOTHING",
        )
        .bind(vault.as_str())
        .bind(name.folded())
        .bind(name.as_str())
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    async fn insert_secret_version(
        tx: &mut Transaction<'_, Sqlite>,
        vault: &VaultName,
        name: &ObjectName,
        v: &SecretVersionRecord,
    ) -> Result<()> {
        let info = serde_json::to_string(&v.info).map_err(|e| corrupt("secret_versions", e))?;
        sqlx::query(
            "INSERT INTO secret_versions (vault, name_folded, version, seq, info, sealed_value) \
             VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(vault.as_str())
        .bind(name.folded())
        .bind(v.version.as_str())
        .bind(v.seq)
        .bind(info)
        .bind(&v.sealed_value)
        .execute(&mut **tx)
        .await
        .map_err(|e| {
            if is_unique_violation(&e) {
                StoreError::Conflict(format!("secret version {} exists", v.version))
            } else {
                e.into()
            }
        })?;
        Ok(())
    }

    pub(super) async fn secrets_load(&self, vault: &VaultName) -> Result<Vec<SecretRecord>> {
        let secrets = sqlx::query(
            "SELECT name_folded, name, deleted_at, purge_at FROM secrets WHERE vault = ? \
             ORDER BY name_folded",
        )
        .bind(vault.as_str())
        .fetch_all(&self.pool)
        .await?;
        let versions = sqlx::query(
            "SELECT name_folded, version, seq, info, sealed_value FROM secret_versions \
             WHERE vault = ? ORDER BY name_folded, seq",
        )
        .bind(vault.as_str())
        .fetch_all(&self.pool)
        .await?;
        let mut out: Vec<(String, SecretRecord)> = Vec::with_capacity(secrets.len());
        for r in &secrets {
            let name: String = r.try_get("name")?;
            out.push((
                r.try_get("name_folded")?,
                SecretRecord {
                    name: ObjectName::parse(&name).map_err(|e| corrupt("secrets", e))?,
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
            let record = SecretVersionRecord {
                version: KeyVersion::parse(&version).map_err(|e| corrupt("secret_versions", e))?,
                seq: r.try_get("seq")?,
                info: serde_json::from_str::<SecretVersionInfo>(&info)
                    .map_err(|e| corrupt("secret_versions", e))?,
                sealed_value: r.try_get("sealed_value")?,
            };
            let idx = out
                .binary_search_by(|(f, _)| f.as_str().cmp(folded.as_str()))
                .map_err(|_| corrupt("secret_versions", "version without secret"))?;
            out[idx].1.versions.push(record);
        }
        Ok(out.into_iter().map(|(_, s)| s).collect())
    }

    pub(super) async fn secrets_add_version(
        &self,
        vault: &VaultName,
        name: &ObjectName,
        version: &SecretVersionRecord,
    ) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        Self::ensure_secret_row(&mut tx, vault, name).await?;
        Self::insert_secret_version(&mut tx, vault, name, version).await?;
        tx.commit().await?;
        Ok(())
    }

    pub(super) async fn secrets_update_version(
        &self,
        vault: &VaultName,
        name: &ObjectName,
        version: &KeyVersion,
        info: &SecretVersionInfo,
    ) -> Result<()> {
        let info = serde_json::to_string(info).map_err(|e| corrupt("secret_versions", e))?;
        sqlx::query(
            "UPDATE secret_versions SET info = ? \
             WHERE vault = ? AND name_folded = ? AND version = ?",
        )
        .bind(info)
        .bind(vault.as_str())
        .bind(name.folded())
        .bind(version.as_str())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub(super) async fn secrets_set_deleted(
        &self,
        vault: &VaultName,
        name: &ObjectName,
        deleted: Option<(i64, i64)>,
    ) -> Result<()> {
        sqlx::query(
            "UPDATE secrets SET deleted_at = ?, purge_at = ? WHERE vault = ? AND name_folded = ?",
        )
        .bind(deleted.map(|d| d.0))
        .bind(deleted.map(|d| d.1))
        .bind(vault.as_str())
        .bind(name.folded())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub(super) async fn secrets_purge(&self, vault: &VaultName, name: &ObjectName) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM secret_versions WHERE vault = ? AND name_folded = ?")
            .bind(vault.as_str())
            .bind(name.folded())
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM secrets WHERE vault = ? AND name_folded = ?")
            .bind(vault.as_str())
            .bind(name.folded())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    pub(super) async fn secrets_insert(
        &self,
        vault: &VaultName,
        secret: &SecretRecord,
    ) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO secrets (vault, name_folded, name, deleted_at, purge_at) \
             VALUES (?, ?, ?, ?, ?)",
        )
        .bind(vault.as_str())
        .bind(secret.name.folded())
        .bind(secret.name.as_str())
        .bind(secret.deleted_at)
        .bind(secret.purge_at)
        .execute(&mut *tx)
        .await
        .map_err(|e| {
            if is_unique_violation(&e) {
                StoreError::Conflict(format!("secret {} exists", secret.name))
            } else {
                e.into()
            }
        })?;
        for v in &secret.versions {
            Self::insert_secret_version(&mut tx, vault, &secret.name, v).await?;
        }
        tx.commit().await?;
        Ok(())
    }
}
