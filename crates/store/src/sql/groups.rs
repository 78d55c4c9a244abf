//! [`crate::Store::delete_resource_group`]: the last step of a resource group's deletion, once
//! its contents are gone.
//!
//! Everything below a group is found by the group's scope as a prefix of a lower-case id or
//! scope (`/subscriptions/{s}/resourcegroups/{g}/…`), compared with `substr(…, 1, length(…))`
//! rather than `LIKE`, whose `_` would match any character of a group name.

use super::SqlStore;
use crate::Result;
use crate::StoreError;

impl SqlStore {
    /// [`crate::Store::delete_resource_group`], once (it reads before it writes, so it runs
    /// again when a concurrent node's transaction failed it: `super::retrying`).
    pub(super) async fn delete_resource_group_once(
        &self,
        subscription_id: &str,
        name: &str,
    ) -> Result<bool> {
        let folded = name.to_ascii_lowercase();
        let scope = format!(
            "/subscriptions/{}/resourcegroups/{folded}",
            subscription_id.to_ascii_lowercase()
        );
        let below = format!("{scope}/");
        let mut tx = self.begin_write().await?;
        let exists = sqlx::query_scalar::<_, i64>(
            "SELECT 1 FROM resource_groups WHERE subscription_id = $1 AND name_folded = $2 LIMIT 1",
        )
        .bind(subscription_id)
        .bind(&folded)
        .fetch_optional(&mut *tx)
        .await?
        .is_some();
        if !exists {
            return Ok(false);
        }
        // What still holds the group: its contents go before it does (a soft-deleted vault
        // keeps its group's name, as in Azure, and holds nothing).
        let held = sqlx::query_scalar::<_, String>(
            "SELECT name FROM vaults WHERE subscription_id = $1 AND lower(resource_group) = $2 \
                 AND deleted_at IS NULL \
             UNION ALL SELECT id FROM resources WHERE substr(id, 1, length($3)) = $3 \
             UNION ALL SELECT id FROM monitor_resources WHERE substr(id, 1, length($3)) = $3 \
             UNION ALL SELECT id FROM locks WHERE scope = $4 OR substr(scope, 1, length($3)) = $3 \
             LIMIT 1",
        )
        .bind(subscription_id)
        .bind(&folded)
        .bind(&below)
        .bind(&scope)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(held) = held {
            return Err(StoreError::Conflict(format!(
                "resource group {scope} still holds {held}"
            )));
        }
        sqlx::query(
            "DELETE FROM role_assignments WHERE scope = $1 OR substr(scope, 1, length($2)) = $2",
        )
        .bind(&scope)
        .bind(&below)
        .execute(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM policy_assignments WHERE substr(id, 1, length($1)) = $1")
            .bind(&below)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM resource_groups WHERE subscription_id = $1 AND name_folded = $2")
            .bind(subscription_id)
            .bind(&folded)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(true)
    }
}
