//! [`DirectoryStore`] on SQLite.

use async_trait::async_trait;
use sqlx::Row;

use crate::directory::{
    BindingRecord, CertificateRecord, DirectoryStore, LockRecord, RETIRED_SIGNING_KEYS,
    ResourceRecord, RoleAssignmentRecord, RoleDefinitionRecord, SIGNING_KEY,
};
use crate::{PrincipalRecord, Result, StoreError};

use super::SqlStore;

/// What a deleted principal's secret hash becomes (an empty blob, written as a parameter: SQLite
/// and PostgreSQL spell blob literals differently).
const EMPTY_BLOB: &[u8] = &[];

fn principal(r: &sqlx::any::AnyRow) -> Result<PrincipalRecord> {
    Ok(PrincipalRecord {
        object_id: r.try_get("object_id")?,
        tenant_id: r.try_get("tenant_id")?,
        client_id: r.try_get("client_id")?,
        display_name: r.try_get("display_name")?,
        secret_hash: r.try_get("secret_hash")?,
        kind: r.try_get("kind")?,
        created: r.try_get("created")?,
        resource_id: r.try_get("resource_id")?,
    })
}

impl SqlStore {
    /// `Store::put_principal`: principals are the directory's, kept here with its other rows.
    pub(super) async fn insert_principal_row(&self, p: &PrincipalRecord) -> Result<()> {
        insert_principal(&self.pool, p).await
    }

    /// `Store::principal_by_client_id`.
    pub(super) async fn principal_row_by_client_id(
        &self,
        client_id: &str,
    ) -> Result<Option<PrincipalRecord>> {
        let row = sqlx::query("SELECT * FROM principals WHERE client_id = $1 AND deleted = 0")
            .bind(client_id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(principal).transpose()
    }
}

async fn insert_principal<'e, E>(e: E, p: &PrincipalRecord) -> Result<()>
where
    E: sqlx::Executor<'e, Database = sqlx::Any>,
{
    sqlx::query(
        "INSERT INTO principals (object_id, tenant_id, client_id, display_name, secret_hash, \
         kind, created, resource_id) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(&p.object_id)
    .bind(&p.tenant_id)
    .bind(&p.client_id)
    .bind(&p.display_name)
    .bind(&p.secret_hash)
    .bind(&p.kind)
    .bind(p.created)
    .bind(&p.resource_id)
    .execute(e)
    .await
    .map_err(|e| {
        if matches!(&e, sqlx::Error::Database(d) if d.is_unique_violation()) {
            StoreError::Conflict(format!("principal {} exists", p.client_id))
        } else {
            e.into()
        }
    })?;
    Ok(())
}

fn resource(r: &sqlx::any::AnyRow) -> Result<ResourceRecord> {
    Ok(ResourceRecord {
        id: r.try_get("id")?,
        resource_type: r.try_get("type")?,
        subscription_id: r.try_get("subscription_id")?,
        resource_group: r.try_get("resource_group")?,
        name: r.try_get("name")?,
        location: r.try_get("location")?,
        body: r.try_get("body")?,
        created: r.try_get("created")?,
        updated: r.try_get("updated")?,
    })
}

fn binding(r: &sqlx::any::AnyRow) -> Result<BindingRecord> {
    Ok(BindingRecord {
        id: r.try_get("id")?,
        secret_hash: r.try_get("secret_hash")?,
        resource_id: r.try_get("resource_id")?,
        client_id: r.try_get("client_id")?,
        created: r.try_get("created")?,
        expires: r.try_get("expires")?,
    })
}

#[async_trait]
impl DirectoryStore for SqlStore {
    async fn list_principals(&self) -> Result<Vec<PrincipalRecord>> {
        let rows =
            sqlx::query("SELECT * FROM principals WHERE deleted = 0 ORDER BY created, object_id")
                .fetch_all(&self.pool)
                .await?;
        rows.iter().map(principal).collect()
    }

    async fn delete_principal(&self, object_id: &str) -> Result<()> {
        sqlx::query("UPDATE principals SET deleted = 1, secret_hash = $2 WHERE object_id = $1")
            .bind(object_id)
            .bind(EMPTY_BLOB)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn set_principal_secret(&self, object_id: &str, secret_hash: &[u8]) -> Result<()> {
        sqlx::query("UPDATE principals SET secret_hash = $1 WHERE object_id = $2 AND deleted = 0")
            .bind(secret_hash)
            .bind(object_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn add_principal_certificate(&self, c: &CertificateRecord) -> Result<()> {
        sqlx::query(
            "INSERT INTO principal_certificates (thumbprint, sha1, object_id, spki, created) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(&c.sha256)
        .bind(&c.sha1)
        .bind(&c.object_id)
        .bind(&c.spki)
        .bind(c.created)
        .execute(&self.pool)
        .await
        .map_err(|e| {
            if matches!(&e, sqlx::Error::Database(d) if d.is_unique_violation()) {
                StoreError::Conflict("this certificate is already registered".into())
            } else {
                e.into()
            }
        })?;
        Ok(())
    }

    async fn list_principal_certificates(&self) -> Result<Vec<CertificateRecord>> {
        let rows = sqlx::query(
            "SELECT c.* FROM principal_certificates c \
             JOIN principals p ON p.object_id = c.object_id WHERE p.deleted = 0",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(CertificateRecord {
                    sha256: r.try_get("thumbprint")?,
                    sha1: r.try_get("sha1")?,
                    object_id: r.try_get("object_id")?,
                    spki: r.try_get("spki")?,
                    created: r.try_get("created")?,
                })
            })
            .collect()
    }

    async fn put_resource(
        &self,
        r: &ResourceRecord,
        new_principals: &[PrincipalRecord],
        deleted_principals: &[String],
    ) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO resources (id, type, subscription_id, resource_group, name, location, body, \
             created, updated) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT (id) DO UPDATE SET \
             body = excluded.body, updated = excluded.updated, location = excluded.location",
        )
        .bind(&r.id)
        .bind(&r.resource_type)
        .bind(&r.subscription_id)
        .bind(&r.resource_group)
        .bind(&r.name)
        .bind(&r.location)
        .bind(&r.body)
        .bind(r.created)
        .bind(r.updated)
        .execute(&mut *tx)
        .await?;
        for p in new_principals {
            insert_principal(&mut *tx, p).await?;
        }
        for oid in deleted_principals {
            sqlx::query("UPDATE principals SET deleted = 1, secret_hash = $2 WHERE object_id = $1")
                .bind(oid)
                .bind(EMPTY_BLOB)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn list_resources(&self) -> Result<Vec<ResourceRecord>> {
        let rows = sqlx::query("SELECT * FROM resources ORDER BY id")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(resource).collect()
    }

    async fn delete_resource(&self, id: &str, deleted_principals: &[String]) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM resources WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM identity_bindings WHERE resource_id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        // The service documents and activity of the resource go with it.
        super::services::delete_resource_rows(&mut tx, id).await?;
        for oid in deleted_principals {
            sqlx::query("UPDATE principals SET deleted = 1, secret_hash = $2 WHERE object_id = $1")
                .bind(oid)
                .bind(EMPTY_BLOB)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn put_binding(&self, b: &BindingRecord, now: i64) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM identity_bindings WHERE expires <= $1")
            .bind(now)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO identity_bindings (id, secret_hash, resource_id, client_id, created, \
             expires) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&b.id)
        .bind(&b.secret_hash)
        .bind(&b.resource_id)
        .bind(&b.client_id)
        .bind(b.created)
        .bind(b.expires)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn binding_by_secret(&self, secret_hash: &[u8]) -> Result<Option<BindingRecord>> {
        sqlx::query("SELECT * FROM identity_bindings WHERE secret_hash = $1")
            .bind(secret_hash)
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(binding)
            .transpose()
    }

    async fn list_bindings(&self, resource_id: &str) -> Result<Vec<BindingRecord>> {
        let rows = sqlx::query(
            "SELECT * FROM identity_bindings WHERE resource_id = $1 ORDER BY created, id",
        )
        .bind(resource_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(binding).collect()
    }

    async fn delete_binding(&self, resource_id: &str, id: &str) -> Result<bool> {
        let done = sqlx::query("DELETE FROM identity_bindings WHERE resource_id = $1 AND id = $2")
            .bind(resource_id)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn replace_signing_key(
        &self,
        expected: &[u8],
        current: &[u8],
        retired: &[u8],
    ) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        let swapped = sqlx::query("UPDATE meta SET v = $1 WHERE k = $2 AND v = $3")
            .bind(current)
            .bind(SIGNING_KEY)
            .bind(expected)
            .execute(&mut *tx)
            .await?;
        if swapped.rows_affected() != 1 {
            return Ok(false);
        }
        sqlx::query(
            "INSERT INTO meta (k, v) VALUES ($1, $2) ON CONFLICT (k) DO UPDATE SET v = excluded.v",
        )
        .bind(RETIRED_SIGNING_KEYS)
        .bind(retired)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(true)
    }

    async fn put_role_definition(&self, d: &RoleDefinitionRecord) -> Result<()> {
        sqlx::query(
            "INSERT INTO role_definitions (id, scope, body) VALUES ($1, $2, $3) \
             ON CONFLICT (id) DO UPDATE SET body = excluded.body",
        )
        .bind(&d.id)
        .bind(&d.scope)
        .bind(&d.body)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn delete_role_definition(&self, id: &str) -> Result<()> {
        sqlx::query("DELETE FROM role_definitions WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn list_role_definitions(&self) -> Result<Vec<RoleDefinitionRecord>> {
        let rows = sqlx::query("SELECT * FROM role_definitions ORDER BY id")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                Ok(RoleDefinitionRecord {
                    id: r.try_get("id")?,
                    scope: r.try_get("scope")?,
                    body: r.try_get("body")?,
                })
            })
            .collect()
    }

    async fn put_role_assignment(&self, a: &RoleAssignmentRecord) -> Result<()> {
        sqlx::query(
            "INSERT INTO role_assignments (id, scope, principal_id, role_definition_id, created) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(&a.id)
        .bind(&a.scope)
        .bind(&a.principal_id)
        .bind(&a.role_definition_id)
        .bind(a.created)
        .execute(&self.pool)
        .await
        .map_err(|e| {
            if matches!(&e, sqlx::Error::Database(d) if d.is_unique_violation()) {
                StoreError::Conflict(format!("role assignment {} exists", a.id))
            } else {
                e.into()
            }
        })?;
        Ok(())
    }

    async fn delete_role_assignment(&self, id: &str) -> Result<()> {
        sqlx::query("DELETE FROM role_assignments WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn list_role_assignments(&self) -> Result<Vec<RoleAssignmentRecord>> {
        let rows = sqlx::query("SELECT * FROM role_assignments ORDER BY created, id")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                Ok(RoleAssignmentRecord {
                    id: r.try_get("id")?,
                    scope: r.try_get("scope")?,
                    principal_id: r.try_get("principal_id")?,
                    role_definition_id: r.try_get("role_definition_id")?,
                    created: r.try_get("created")?,
                })
            })
            .collect()
    }

    async fn put_lock(&self, l: &LockRecord) -> Result<()> {
        sqlx::query(
            "INSERT INTO locks (id, scope, name, level, notes) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (id) DO UPDATE SET level = excluded.level, notes = excluded.notes",
        )
        .bind(&l.id)
        .bind(&l.scope)
        .bind(&l.name)
        .bind(&l.level)
        .bind(&l.notes)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn delete_lock(&self, id: &str) -> Result<()> {
        sqlx::query("DELETE FROM locks WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn list_locks(&self) -> Result<Vec<LockRecord>> {
        let rows = sqlx::query("SELECT * FROM locks ORDER BY id")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                Ok(LockRecord {
                    id: r.try_get("id")?,
                    scope: r.try_get("scope")?,
                    name: r.try_get("name")?,
                    level: r.try_get("level")?,
                    notes: r.try_get("notes")?,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::Store;

    fn record(id: &str, hash: &[u8], resource: &str, expires: i64) -> BindingRecord {
        BindingRecord {
            id: id.into(),
            secret_hash: hash.to_vec(),
            resource_id: resource.into(),
            client_id: Some(format!("cid-{id}")),
            created: 10,
            expires,
        }
    }

    #[tokio::test]
    async fn bindings_are_listed_revoked_one_by_one_and_forgotten_once_expired() {
        let dir = tempfile::tempdir().unwrap();
        let s = SqlStore::open_sqlite(&dir.path().join("kagi.db"))
            .await
            .unwrap();
        s.put_binding(&record("a", b"ha", "/r1", 100), 10)
            .await
            .unwrap();
        s.put_binding(&record("b", b"hb", "/r1", 1000), 10)
            .await
            .unwrap();
        s.put_binding(&record("c", b"hc", "/r2", 1000), 10)
            .await
            .unwrap();
        assert_eq!(
            s.binding_by_secret(b"hb").await.unwrap(),
            Some(record("b", b"hb", "/r1", 1000))
        );
        let ids = |v: Vec<BindingRecord>| v.into_iter().map(|b| b.id).collect::<Vec<_>>();
        assert_eq!(ids(s.list_bindings("/r1").await.unwrap()), ["a", "b"]);
        // Only the binding named, and only under its own resource.
        assert!(!s.delete_binding("/r2", "b").await.unwrap());
        assert!(s.delete_binding("/r1", "b").await.unwrap());
        assert!(!s.delete_binding("/r1", "b").await.unwrap());
        assert_eq!(s.binding_by_secret(b"hb").await.unwrap(), None);
        assert_eq!(ids(s.list_bindings("/r2").await.unwrap()), ["c"]);
        // A new binding sweeps out those already expired.
        s.put_binding(&record("d", b"hd", "/r2", 2000), 100)
            .await
            .unwrap();
        assert_eq!(s.binding_by_secret(b"ha").await.unwrap(), None);
        assert_eq!(ids(s.list_bindings("/r2").await.unwrap()), ["c", "d"]);
    }

    #[tokio::test]
    async fn legacy_bindings_keep_working_for_thirty_days_then_expire() {
        crate::sql::install_drivers();
        // One connection: each in-memory connection is a database of its own.
        let pool = sqlx::any::AnyPoolOptions::new()
            .max_connections(1)
            .connect("sqlite::memory:")
            .await
            .unwrap();
        sqlx::raw_sql(
            "CREATE TABLE identity_bindings (secret_hash BLOB PRIMARY KEY, \
             resource_id TEXT NOT NULL, created INTEGER NOT NULL); \
             INSERT INTO identity_bindings VALUES (x'01', '/r1', 5), (x'02', '/r2', 6);",
        )
        .execute(&pool)
        .await
        .unwrap();
        sqlx::raw_sql(crate::directory::BINDINGS_SCHEMA)
            .execute(&pool)
            .await
            .unwrap();
        let rows = sqlx::query("SELECT * FROM identity_bindings ORDER BY created")
            .fetch_all(&pool)
            .await
            .unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let got: Vec<BindingRecord> = rows.iter().map(|r| binding(r).unwrap()).collect();
        assert_eq!(got.len(), 2);
        for (b, (hash, resource, created)) in got.iter().zip([(1u8, "/r1", 5), (2, "/r2", 6)]) {
            assert!(b.id.starts_with("legacy-"), "{b:?}");
            assert_eq!(b.secret_hash, vec![hash]);
            assert_eq!(b.resource_id, resource);
            assert_eq!(b.created, created);
            assert_eq!(b.client_id, None, "a legacy binding names no identity");
            assert!((b.expires - (now + 30 * 86400)).abs() < 300, "{b:?}");
        }
        assert_ne!(got[0].id, got[1].id);
    }

    #[tokio::test]
    async fn the_signing_key_is_replaced_only_from_the_expected_one() {
        let dir = tempfile::tempdir().unwrap();
        let s = SqlStore::open_sqlite(&dir.path().join("kagi.db"))
            .await
            .unwrap();
        s.put_meta_if_absent(SIGNING_KEY, b"k0").await.unwrap();
        assert!(!s.replace_signing_key(b"k9", b"k1", b"[1]").await.unwrap());
        assert_eq!(s.get_meta(SIGNING_KEY).await.unwrap().unwrap(), b"k0");
        assert_eq!(s.get_meta(RETIRED_SIGNING_KEYS).await.unwrap(), None);
        assert!(s.replace_signing_key(b"k0", b"k1", b"[1]").await.unwrap());
        assert!(s.replace_signing_key(b"k1", b"k2", b"[2]").await.unwrap());
        assert_eq!(s.get_meta(SIGNING_KEY).await.unwrap().unwrap(), b"k2");
        assert_eq!(
            s.get_meta(RETIRED_SIGNING_KEYS).await.unwrap().unwrap(),
            b"[2]"
        );
    }
}
