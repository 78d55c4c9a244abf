//! Resource moves and subscription transfers (MISSION BK-9, ID-3, X-4): the few changes that
//! re-home records, each one transaction so that a crash leaves a record in exactly one place.
//!
//! - [`MoveStore::move_resource`]: a generic ARM resource (backup vault, workload) gets a new id
//!   — its row, the workload bindings and the managed identities that name it follow, its
//!   service documents and activity log ([`crate::services`]) are re-keyed to the new id, and
//!   the role assignments at or below its old id (orphaned by the move, as in Azure) go.
//! - [`MoveStore::move_vault`]: a key vault changes subscription or resource group.
//! - [`MoveStore::change_subscription_tenant`]: a subscription moves to another tenant
//!   (directory); the role assignments in it go.

use async_trait::async_trait;

use crate::directory::ResourceRecord;
use crate::{Result, SqlStore, StoreError, VaultRecord};

/// What moves persist. Each method is one transaction.
#[async_trait]
pub trait MoveStore: Send + Sync {
    /// Replaces resource `old_id` by `new` (a new id), re-points the bindings and principals
    /// that named `old_id`, re-keys its service documents and activity to `new.id` (dropping
    /// rows that no resource owned there), and deletes the role assignments
    /// `removed_assignments`. Fails with `Conflict` when `new.id` exists; nothing changes then.
    async fn move_resource(
        &self,
        old_id: &str,
        new: &ResourceRecord,
        removed_assignments: &[String],
    ) -> Result<()>;

    /// Stores a key vault's new subscription and resource group and deletes the role
    /// assignments `removed_assignments`.
    async fn move_vault(&self, v: &VaultRecord, removed_assignments: &[String]) -> Result<()>;

    /// Sets the tenant of a subscription and deletes the role assignments
    /// `removed_assignments`. Fails with `Conflict` when the subscription does not exist.
    async fn change_subscription_tenant(
        &self,
        subscription_id: &str,
        tenant_id: &str,
        removed_assignments: &[String],
    ) -> Result<()>;
}

async fn delete_assignments(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    ids: &[String],
) -> Result<()> {
    for id in ids {
        sqlx::query("DELETE FROM role_assignments WHERE id = $1")
            .bind(id)
            .execute(&mut **tx)
            .await?;
    }
    Ok(())
}

#[async_trait]
impl MoveStore for SqlStore {
    async fn move_resource(
        &self,
        old_id: &str,
        new: &ResourceRecord,
        removed_assignments: &[String],
    ) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        let gone = sqlx::query("DELETE FROM resources WHERE id = $1")
            .bind(old_id)
            .execute(&mut *tx)
            .await?;
        if gone.rows_affected() != 1 {
            return Err(StoreError::Conflict(format!(
                "resource {old_id} does not exist"
            )));
        }
        sqlx::query(
            "INSERT INTO resources (id, type, subscription_id, resource_group, name, location, \
             body, created, updated) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(&new.id)
        .bind(&new.resource_type)
        .bind(&new.subscription_id)
        .bind(&new.resource_group)
        .bind(&new.name)
        .bind(&new.location)
        .bind(&new.body)
        .bind(new.created)
        .bind(new.updated)
        .execute(&mut *tx)
        .await
        .map_err(|e| {
            if matches!(&e, sqlx::Error::Database(d) if d.is_unique_violation()) {
                StoreError::Conflict(format!("resource {} exists", new.id))
            } else {
                e.into()
            }
        })?;
        sqlx::query("UPDATE identity_bindings SET resource_id = $1 WHERE resource_id = $2")
            .bind(&new.id)
            .bind(old_id)
            .execute(&mut *tx)
            .await?;
        sqlx::query("UPDATE principals SET resource_id = $1 WHERE resource_id = $2")
            .bind(&new.id)
            .bind(old_id)
            .execute(&mut *tx)
            .await?;
        crate::sql::services::rekey_resource_rows(&mut tx, old_id, &new.id).await?;
        delete_assignments(&mut tx, removed_assignments).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn move_vault(&self, v: &VaultRecord, removed_assignments: &[String]) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        let done = sqlx::query(
            "UPDATE vaults SET subscription_id = $1, resource_group = $2, updated = $3 WHERE name = $4",
        )
        .bind(&v.subscription_id)
        .bind(&v.resource_group)
        .bind(v.updated)
        .bind(v.name.as_str())
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() != 1 {
            return Err(StoreError::Conflict(format!(
                "vault {} does not exist",
                v.name
            )));
        }
        delete_assignments(&mut tx, removed_assignments).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn change_subscription_tenant(
        &self,
        subscription_id: &str,
        tenant_id: &str,
        removed_assignments: &[String],
    ) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        let done = sqlx::query("UPDATE subscriptions SET tenant_id = $1 WHERE id = $2")
            .bind(tenant_id)
            .bind(subscription_id)
            .execute(&mut *tx)
            .await?;
        if done.rows_affected() != 1 {
            return Err(StoreError::Conflict(format!(
                "subscription {subscription_id} does not exist"
            )));
        }
        delete_assignments(&mut tx, removed_assignments).await?;
        tx.commit().await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::directory::{DirectoryStore, RoleAssignmentRecord};
    use crate::{PrincipalRecord, Store};

    fn resource(id: &str, sub: &str, rg: &str) -> ResourceRecord {
        ResourceRecord {
            id: id.into(),
            resource_type: "Microsoft.RecoveryServices/vaults".into(),
            subscription_id: sub.into(),
            resource_group: rg.into(),
            name: "bv".into(),
            location: "westeurope".into(),
            body: "{}".into(),
            created: 1,
            updated: 1,
        }
    }

    #[tokio::test]
    async fn a_moved_resource_takes_its_identity_and_bindings_and_drops_its_assignments() {
        let dir = tempfile::tempdir().unwrap();
        let s = SqlStore::open_sqlite(&dir.path().join("kagi.db"))
            .await
            .unwrap();
        let old =
            "/subscriptions/s1/resourcegroups/a/providers/microsoft.recoveryservices/vaults/bv";
        let new =
            "/subscriptions/s1/resourcegroups/b/providers/microsoft.recoveryservices/vaults/bv";
        let identity = PrincipalRecord {
            object_id: "oid-1".into(),
            tenant_id: "t1".into(),
            client_id: "cid-1".into(),
            display_name: "bv".into(),
            secret_hash: Vec::new(),
            kind: "SystemAssignedIdentity".into(),
            created: 1,
            resource_id: Some(old.into()),
        };
        s.put_resource(
            &resource(old, "s1", "a"),
            std::slice::from_ref(&identity),
            &[],
        )
        .await
        .unwrap();
        s.put_binding(
            &crate::directory::BindingRecord {
                id: "b1".into(),
                secret_hash: b"h".to_vec(),
                resource_id: old.into(),
                client_id: Some("cid-1".into()),
                created: 1,
                expires: 100,
            },
            1,
        )
        .await
        .unwrap();
        for (id, scope) in [
            ("ra1", old.to_string()),
            ("ra2", "/subscriptions/s1".into()),
        ] {
            s.put_role_assignment(&RoleAssignmentRecord {
                id: id.into(),
                scope,
                principal_id: "oid-1".into(),
                role_definition_id: "r".into(),
                created: 1,
            })
            .await
            .unwrap();
        }
        // A target that exists is a conflict, and nothing changes.
        s.put_resource(&resource(new, "s1", "b"), &[], &[])
            .await
            .unwrap();
        assert!(matches!(
            s.move_resource(old, &resource(new, "s1", "b"), &["ra1".into()])
                .await,
            Err(StoreError::Conflict(_))
        ));
        assert_eq!(s.list_resources().await.unwrap().len(), 2);
        assert_eq!(s.list_role_assignments().await.unwrap().len(), 2);
        s.delete_resource(new, &[]).await.unwrap();

        s.move_resource(old, &resource(new, "s1", "b"), &["ra1".into()])
            .await
            .unwrap();
        let ids: Vec<String> = s
            .list_resources()
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.id)
            .collect();
        assert_eq!(ids, vec![new.to_string()]);
        assert_eq!(
            s.binding_by_secret(b"h")
                .await
                .unwrap()
                .map(|b| b.resource_id)
                .as_deref(),
            Some(new)
        );
        let p = s.list_principals().await.unwrap();
        assert_eq!(p[0].resource_id.as_deref(), Some(new));
        let left: Vec<String> = s
            .list_role_assignments()
            .await
            .unwrap()
            .into_iter()
            .map(|a| a.id)
            .collect();
        assert_eq!(left, vec!["ra2".to_string()]);
    }

    #[tokio::test]
    async fn a_subscription_changes_tenant() {
        let dir = tempfile::tempdir().unwrap();
        let s = SqlStore::open_sqlite(&dir.path().join("kagi.db"))
            .await
            .unwrap();
        s.ensure_subscription("t1", "s1", 1).await.unwrap();
        assert!(matches!(
            s.change_subscription_tenant("nope", "t2", &[]).await,
            Err(StoreError::Conflict(_))
        ));
        s.change_subscription_tenant("s1", "t2", &[]).await.unwrap();
        assert_eq!(
            s.subscription_tenant("s1").await.unwrap().as_deref(),
            Some("t2")
        );
    }
}
