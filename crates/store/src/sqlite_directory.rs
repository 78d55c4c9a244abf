//! [`DirectoryStore`] on SQLite.

use async_trait::async_trait;
use sqlx::Row;

use crate::directory::{
    CertificateRecord, DirectoryStore, LockRecord, ResourceRecord, RoleAssignmentRecord,
    RoleDefinitionRecord,
};
use crate::{PrincipalRecord, Result, SqliteStore, StoreError};

fn principal(r: &sqlx::sqlite::SqliteRow) -> Result<PrincipalRecord> {
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

pub(crate) fn principal_row(r: &sqlx::sqlite::SqliteRow) -> Result<PrincipalRecord> {
    principal(r)
}

pub(crate) async fn insert_principal<'e, E>(e: E, p: &PrincipalRecord) -> Result<()>
where
    E: sqlx::Executor<'e, Database = sqlx::Sqlite>,
{
    sqlx::query(
        "INSERT INTO principals (object_id, tenant_id, client_id, display_name, secret_hash, \
         kind, created, resource_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
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

fn resource(r: &sqlx::sqlite::SqliteRow) -> Result<ResourceRecord> {
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

#[async_trait]
impl DirectoryStore for SqliteStore {
    async fn list_principals(&self) -> Result<Vec<PrincipalRecord>> {
        let rows =
            sqlx::query("SELECT * FROM principals WHERE deleted = 0 ORDER BY created, object_id")
                .fetch_all(&self.pool)
                .await?;
        rows.iter().map(principal).collect()
    }

    async fn delete_principal(&self, object_id: &str) -> Result<()> {
        sqlx::query("UPDATE principals SET deleted = 1, secret_hash = x'' WHERE object_id = ?")
            .bind(object_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn set_principal_secret(&self, object_id: &str, secret_hash: &[u8]) -> Result<()> {
        sqlx::query("UPDATE principals SET secret_hash = ? WHERE object_id = ? AND deleted = 0")
            .bind(secret_hash)
            .bind(object_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn add_principal_certificate(&self, c: &CertificateRecord) -> Result<()> {
        sqlx::query(
            "INSERT INTO principal_certificates (thumbprint, sha1, object_id, spki, created) \
             VALUES (?, ?, ?, ?, ?)",
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
             created, updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET \
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
            sqlx::query("UPDATE principals SET deleted = 1, secret_hash = x'' WHERE object_id = ?")
                .bind(oid)
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
        sqlx::query("DELETE FROM resources WHERE id = ?")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM identity_bindings WHERE resource_id = ?")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        // The service documents and activity of the resource go with it.
        crate::sqlite::services::delete_resource_rows(&mut tx, id).await?;
        for oid in deleted_principals {
            sqlx::query("UPDATE principals SET deleted = 1, secret_hash = x'' WHERE object_id = ?")
                .bind(oid)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn put_binding(&self, secret_hash: &[u8], resource_id: &str, now: i64) -> Result<()> {
        sqlx::query(
            "INSERT INTO identity_bindings (secret_hash, resource_id, created) VALUES (?, ?, ?)",
        )
        .bind(secret_hash)
        .bind(resource_id)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn binding_resource(&self, secret_hash: &[u8]) -> Result<Option<String>> {
        Ok(
            sqlx::query_scalar("SELECT resource_id FROM identity_bindings WHERE secret_hash = ?")
                .bind(secret_hash)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    async fn put_role_definition(&self, d: &RoleDefinitionRecord) -> Result<()> {
        sqlx::query(
            "INSERT INTO role_definitions (id, scope, body) VALUES (?, ?, ?) \
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
        sqlx::query("DELETE FROM role_definitions WHERE id = ?")
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
             VALUES (?, ?, ?, ?, ?)",
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
        sqlx::query("DELETE FROM role_assignments WHERE id = ?")
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
            "INSERT INTO locks (id, scope, name, level, notes) VALUES (?, ?, ?, ?, ?) \
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
        sqlx::query("DELETE FROM locks WHERE id = ?")
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
