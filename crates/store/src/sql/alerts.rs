//! Monitor resources and alert deliveries (schema in `crate::alerts::SCHEMA`). A delivery goes
//! with its action group (foreign key, cascade); activity entries and the notifications they
//! fired are written in one transaction.

use async_trait::async_trait;
use sqlx::Row;

use super::SqlStore;
use super::events::failed_state;
use super::services::insert_activity;
use crate::Result;
use crate::alerts::{AlertDeadLetter, AlertNotification, AlertStore, MonitorRecord};
use crate::events::{DeliveryOrigin, PendingDelivery};

fn monitor_row(r: &sqlx::any::AnyRow) -> Result<MonitorRecord> {
    Ok(MonitorRecord {
        id: r.try_get("id")?,
        resource_type: r.try_get("resource_type")?,
        subscription_id: r.try_get("subscription_id")?,
        resource_group: r.try_get("resource_group")?,
        body: r.try_get("body")?,
        created: r.try_get("created")?,
        updated: r.try_get("updated")?,
    })
}

fn attempts(n: i64) -> u32 {
    n.clamp(0, i64::from(u32::MAX)) as u32
}

// Each runs again when a concurrent node's transaction failed it (`super::retrying`).
impl SqlStore {
    /// [`AlertStore::put_monitor_resource`], once.
    async fn put_monitor_resource_once(&self, r: &MonitorRecord) -> Result<bool> {
        // It reads before it writes (`begin_write`).
        let mut tx = self.begin_write().await?;
        let existed =
            sqlx::query_scalar::<_, i64>("SELECT 1 FROM monitor_resources WHERE id = $1 LIMIT 1")
                .bind(&r.id)
                .fetch_optional(&mut *tx)
                .await?
                .is_some();
        sqlx::query(
            "INSERT INTO monitor_resources (id, resource_type, subscription_id, resource_group, \
             body, created, updated) VALUES ($1, $2, $3, $4, $5, $6, $7) \
             ON CONFLICT (id) DO UPDATE SET body = excluded.body, updated = excluded.updated",
        )
        .bind(&r.id)
        .bind(&r.resource_type)
        .bind(&r.subscription_id)
        .bind(&r.resource_group)
        .bind(&r.body)
        .bind(r.created)
        .bind(r.updated)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(!existed)
    }

    /// [`AlertStore::append_activity_with_alerts`], once.
    async fn append_activity_with_alerts_once(
        &self,
        resource_key: &str,
        at: i64,
        body: &str,
        notifications: &[AlertNotification],
    ) -> Result<i64> {
        let mut tx = self.begin_write().await?;
        let seq = insert_activity(&mut tx, resource_key, at, body).await?;
        for n in notifications {
            // An action group deleted since it was matched simply gets nothing (and its
            // foreign key would otherwise fail the entry itself).
            sqlx::query(
                "INSERT INTO alert_deliveries (id, action_group, receiver, alert, endpoint_url, \
                 body, state, attempts, next_attempt_ms, created, updated) \
                 SELECT $1, $2, $3, $4, $5, $6, 'pending', 0, 0, $7, $8 \
                 WHERE EXISTS (SELECT 1 FROM monitor_resources WHERE id = $9)",
            )
            .bind(&n.id)
            .bind(&n.action_group)
            .bind(&n.receiver)
            .bind(&n.alert)
            .bind(&n.endpoint_url)
            .bind(&n.body)
            .bind(at)
            .bind(at)
            .bind(&n.action_group)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(seq)
    }
}

#[async_trait]
impl AlertStore for SqlStore {
    async fn put_monitor_resource(&self, r: &MonitorRecord) -> Result<bool> {
        super::retrying(|| self.put_monitor_resource_once(r)).await
    }

    async fn get_monitor_resource(&self, id: &str) -> Result<Option<MonitorRecord>> {
        let row = sqlx::query("SELECT * FROM monitor_resources WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(monitor_row).transpose()
    }

    async fn list_monitor_resources(
        &self,
        resource_type: &str,
        subscription_id: Option<&str>,
    ) -> Result<Vec<MonitorRecord>> {
        let rows = sqlx::query(
            "SELECT * FROM monitor_resources WHERE resource_type = $1 \
             AND ($2 IS NULL OR subscription_id = $3) ORDER BY id",
        )
        .bind(resource_type)
        .bind(subscription_id)
        .bind(subscription_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(monitor_row).collect()
    }

    async fn delete_monitor_resource(&self, id: &str) -> Result<bool> {
        Ok(sqlx::query("DELETE FROM monitor_resources WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?
            .rows_affected()
            > 0)
    }

    async fn append_activity_with_alerts(
        &self,
        resource_key: &str,
        at: i64,
        body: &str,
        notifications: &[AlertNotification],
    ) -> Result<i64> {
        super::retrying(|| {
            self.append_activity_with_alerts_once(resource_key, at, body, notifications)
        })
        .await
    }

    async fn due_alert_deliveries(&self, now_ms: i64, limit: u32) -> Result<Vec<PendingDelivery>> {
        let rows = sqlx::query(
            "SELECT id, action_group, receiver, endpoint_url, attempts, body \
             FROM alert_deliveries WHERE state = 'pending' AND next_attempt_ms <= $1 \
             ORDER BY next_attempt_ms, created, rowid LIMIT $2",
        )
        .bind(now_ms)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(PendingDelivery {
                    origin: DeliveryOrigin::ActivityLogAlert,
                    event_id: r.try_get("id")?,
                    vault: r.try_get("action_group")?,
                    subscription: r.try_get("receiver")?,
                    endpoint_url: r.try_get("endpoint_url")?,
                    attempts: attempts(r.try_get("attempts")?),
                    max_attempts: None,
                    body: r.try_get("body")?,
                })
            })
            .collect()
    }

    async fn next_alert_delivery_ms(&self) -> Result<Option<i64>> {
        Ok(sqlx::query_scalar(
            "SELECT MIN(next_attempt_ms) FROM alert_deliveries WHERE state = 'pending'",
        )
        .fetch_one(&self.pool)
        .await?)
    }

    async fn alert_delivery_succeeded(&self, id: &str) -> Result<()> {
        sqlx::query("DELETE FROM alert_deliveries WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn alert_delivery_failed(
        &self,
        id: &str,
        attempts: u32,
        next_attempt_ms: Option<i64>,
        error: &str,
        now: i64,
    ) -> Result<()> {
        let (state, next) = failed_state(next_attempt_ms);
        sqlx::query(
            "UPDATE alert_deliveries SET state = $1, attempts = $2, next_attempt_ms = $3, \
             last_error = $4, updated = $5 WHERE id = $6",
        )
        .bind(state)
        .bind(i64::from(attempts))
        .bind(next)
        .bind(error)
        .bind(now)
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn alert_dead_letters(&self, action_group: &str) -> Result<Vec<AlertDeadLetter>> {
        let rows = sqlx::query(
            "SELECT id, alert, receiver, body, attempts, last_error, updated FROM alert_deliveries \
             WHERE action_group = $1 AND state = 'dead' ORDER BY updated, created, rowid",
        )
        .bind(action_group)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(AlertDeadLetter {
                    id: r.try_get("id")?,
                    alert: r.try_get("alert")?,
                    receiver: r.try_get("receiver")?,
                    body: r.try_get("body")?,
                    attempts: attempts(r.try_get("attempts")?),
                    last_error: r.try_get("last_error")?,
                    dead_lettered_at: r.try_get("updated")?,
                })
            })
            .collect()
    }
}
