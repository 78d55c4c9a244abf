//! Monitor resources and alert deliveries (schema in `crate::alerts::SCHEMA`). A delivery goes
//! with its action group (foreign key, cascade); activity entries and the notifications they
//! fired are written in one transaction.

use async_trait::async_trait;
use sqlx::Row;

use super::SqliteStore;
use super::events::failed_state;
use super::services::insert_activity;
use crate::Result;
use crate::alerts::{AlertDeadLetter, AlertNotification, AlertStore, MonitorRecord};
use crate::events::{DeliveryOrigin, PendingDelivery};

fn monitor_row(r: &sqlx::sqlite::SqliteRow) -> Result<MonitorRecord> {
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

#[async_trait]
impl AlertStore for SqliteStore {
    async fn put_monitor_resource(&self, r: &MonitorRecord) -> Result<bool> {
        // IMMEDIATE: it reads before it writes.
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let existed: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM monitor_resources WHERE id = ?)")
                .bind(&r.id)
                .fetch_one(&mut *tx)
                .await?;
        sqlx::query(
            "INSERT INTO monitor_resources (id, resource_type, subscription_id, resource_group, \
             body, created, updated) VALUES (?, ?, ?, ?, ?, ?, ?) \
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

    async fn get_monitor_resource(&self, id: &str) -> Result<Option<MonitorRecord>> {
        let row = sqlx::query("SELECT * FROM monitor_resources WHERE id = ?")
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
            "SELECT * FROM monitor_resources WHERE resource_type = ? \
             AND (? IS NULL OR subscription_id = ?) ORDER BY id",
        )
        .bind(resource_type)
        .bind(subscription_id)
        .bind(subscription_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(monitor_row).collect()
    }

    async fn delete_monitor_resource(&self, id: &str) -> Result<bool> {
        Ok(sqlx::query("DELETE FROM monitor_resources WHERE id = ?")
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
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let seq = insert_activity(&mut tx, resource_key, at, body).await?;
        for n in notifications {
            // An action group deleted since it was matched simply gets nothing (and its
            // foreign key would otherwise fail the entry itself).
            sqlx::query(
                "INSERT INTO alert_deliveries (id, action_group, receiver, alert, endpoint_url, \
                 body, state, attempts, next_attempt_ms, created, updated) \
                 SELECT ?, ?, ?, ?, ?, ?, 'pending', 0, 0, ?, ? \
                 WHERE EXISTS (SELECT 1 FROM monitor_resources WHERE id = ?)",
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

    async fn due_alert_deliveries(&self, now_ms: i64, limit: u32) -> Result<Vec<PendingDelivery>> {
        let rows = sqlx::query(
            "SELECT id, action_group, receiver, endpoint_url, attempts, body \
             FROM alert_deliveries WHERE state = 'pending' AND next_attempt_ms <= ? \
             ORDER BY next_attempt_ms, created, rowid LIMIT ?",
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
        sqlx::query("DELETE FROM alert_deliveries WHERE id = ?")
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
            "UPDATE alert_deliveries SET state = ?, attempts = ?, next_attempt_ms = ?, \
             last_error = ?, updated = ? WHERE id = ?",
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
             WHERE action_group = ? AND state = 'dead' ORDER BY updated, created, rowid",
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
