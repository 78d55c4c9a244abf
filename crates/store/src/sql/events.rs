//! Rotation policies, event marks, event subscriptions and the event outbox (schema in
//! `crate::events::SCHEMA`). Policies and marks of a key or secret go with it when it is purged,
//! and everything of a vault when the vault is purged (foreign keys cascade).

use kagi_core::rotation::RotationPolicy;
use kagi_core::{ObjectName, VaultName};
use sqlx::Row;

use super::{SqlStore, corrupt};
use crate::Result;
use crate::events::{
    DeadLetter, DeliveryOrigin, EventEmission, EventMark, EventSubscriptionRecord, MarkTable,
    PendingDelivery,
};

fn marks_table(t: MarkTable) -> &'static str {
    match t {
        MarkTable::Key => "key_event_marks",
        MarkTable::Secret => "secret_event_marks",
    }
}

fn subscription_row(r: &sqlx::any::AnyRow) -> Result<EventSubscriptionRecord> {
    let types: String = r.try_get("included_types")?;
    let max: Option<i64> = r.try_get("max_attempts")?;
    Ok(EventSubscriptionRecord {
        name: r.try_get("name")?,
        endpoint_url: r.try_get("endpoint_url")?,
        included_types: serde_json::from_str(&types)
            .map_err(|e| corrupt("event_subscriptions", e))?,
        max_attempts: max.map(|m| m.clamp(1, i64::from(u32::MAX)) as u32),
        created: r.try_get("created")?,
        updated: r.try_get("updated")?,
    })
}

/// The state and next attempt of a delivery that failed: retried at `next_attempt_ms`, or dead
/// when there is none (in either outbox).
pub(super) fn failed_state(next_attempt_ms: Option<i64>) -> (&'static str, i64) {
    match next_attempt_ms {
        Some(t) => ("pending", t),
        None => ("dead", 0),
    }
}

impl SqlStore {
    pub(super) async fn policy_get(
        &self,
        vault: &VaultName,
        name: &ObjectName,
    ) -> Result<Option<RotationPolicy>> {
        let text: Option<String> = sqlx::query_scalar(
            "SELECT policy FROM key_rotation_policies WHERE vault = $1 AND name_folded = $2",
        )
        .bind(vault.as_str())
        .bind(name.folded())
        .fetch_optional(&self.pool)
        .await?;
        text.map(|t| serde_json::from_str(&t).map_err(|e| corrupt("key_rotation_policies", e)))
            .transpose()
    }

    pub(super) async fn policy_put(
        &self,
        vault: &VaultName,
        name: &ObjectName,
        policy: &RotationPolicy,
    ) -> Result<()> {
        let text =
            serde_json::to_string(policy).map_err(|e| corrupt("key_rotation_policies", e))?;
        sqlx::query(
            "INSERT INTO key_rotation_policies (vault, name_folded, policy) VALUES ($1, $2, $3) \
             ON CONFLICT (vault, name_folded) DO UPDATE SET policy = excluded.policy",
        )
        .bind(vault.as_str())
        .bind(name.folded())
        .bind(text)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub(super) async fn policy_list(
        &self,
        vault: &VaultName,
    ) -> Result<Vec<(String, RotationPolicy)>> {
        let rows = sqlx::query(
            "SELECT name_folded, policy FROM key_rotation_policies WHERE vault = $1 \
             ORDER BY name_folded",
        )
        .bind(vault.as_str())
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let text: String = r.try_get("policy")?;
                Ok((
                    r.try_get("name_folded")?,
                    serde_json::from_str(&text).map_err(|e| corrupt("key_rotation_policies", e))?,
                ))
            })
            .collect()
    }

    pub(super) async fn marks_load(
        &self,
        vault: &VaultName,
        only: Option<(MarkTable, &str)>,
    ) -> Result<Vec<EventMark>> {
        let mut out = Vec::new();
        for table in [MarkTable::Key, MarkTable::Secret] {
            if only.is_some_and(|(t, _)| t != table) {
                continue;
            }
            // The table name comes from a fixed list, never from input.
            let sql = format!(
                "SELECT name_folded, mark, kind FROM {} WHERE vault = $1{}",
                marks_table(table),
                if only.is_some() {
                    " AND name_folded = $2"
                } else {
                    ""
                }
            );
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(vault.as_str());
            if let Some((_, name)) = only {
                q = q.bind(name);
            }
            for r in q.fetch_all(&self.pool).await? {
                out.push(EventMark {
                    table,
                    name_folded: r.try_get("name_folded")?,
                    mark: r.try_get("mark")?,
                    kind: r.try_get("kind")?,
                });
            }
        }
        Ok(out)
    }

    pub(super) async fn events_record(
        &self,
        vault: &VaultName,
        emissions: &[EventEmission],
        unmarks: &[EventMark],
        now: i64,
    ) -> Result<Vec<bool>> {
        let mut tx = self.pool.begin().await?;
        for m in unmarks {
            let sql = format!(
                "DELETE FROM {} WHERE vault = $1 AND name_folded = $2 AND mark = $3 AND kind = $4",
                marks_table(m.table)
            );
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(vault.as_str())
                .bind(&m.name_folded)
                .bind(&m.mark)
                .bind(&m.kind)
                .execute(&mut *tx)
                .await?;
        }
        let mut written = Vec::with_capacity(emissions.len());
        for e in emissions {
            let sql = format!(
                "INSERT INTO {} (vault, name_folded, mark, kind, created) VALUES ($1, $2, $3, $4, $5) \
                 ON CONFLICT DO NOTHING",
                marks_table(e.mark.table)
            );
            let fresh = sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(vault.as_str())
                .bind(&e.mark.name_folded)
                .bind(&e.mark.mark)
                .bind(&e.mark.kind)
                .bind(now)
                .execute(&mut *tx)
                .await?
                .rows_affected()
                == 1;
            written.push(fresh);
            if !fresh || e.subscriptions.is_empty() {
                continue;
            }
            sqlx::query(
                "INSERT INTO event_outbox (id, vault, event_type, body, created) \
                 VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(&e.event_id)
            .bind(vault.as_str())
            .bind(&e.event_type)
            .bind(&e.body)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            for s in &e.subscriptions {
                // A subscription deleted since it was matched simply gets nothing.
                sqlx::query(
                    "INSERT INTO event_deliveries (event_id, vault, subscription, state, attempts, \
                     next_attempt_ms, updated) SELECT $1, $2, $3, 'pending', 0, 0, $4 \
                     WHERE EXISTS (SELECT 1 FROM event_subscriptions \
                     WHERE vault = $5 AND name_folded = $6)",
                )
                .bind(&e.event_id)
                .bind(vault.as_str())
                .bind(s)
                .bind(now)
                .bind(vault.as_str())
                .bind(s)
                .execute(&mut *tx)
                .await?;
            }
        }
        tx.commit().await?;
        Ok(written)
    }

    pub(super) async fn subscription_put(
        &self,
        vault: &VaultName,
        s: &EventSubscriptionRecord,
    ) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        let existed: Option<i64> = sqlx::query_scalar(
            "SELECT created FROM event_subscriptions WHERE vault = $1 AND name_folded = $2",
        )
        .bind(vault.as_str())
        .bind(s.name.to_ascii_lowercase())
        .fetch_optional(&mut *tx)
        .await?;
        let types = serde_json::to_string(&s.included_types)
            .map_err(|e| corrupt("event_subscriptions", e))?;
        sqlx::query(
            "INSERT INTO event_subscriptions (vault, name_folded, name, endpoint_url, \
             included_types, max_attempts, created, updated) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
             ON CONFLICT (vault, name_folded) DO UPDATE SET endpoint_url = excluded.endpoint_url, \
             included_types = excluded.included_types, max_attempts = excluded.max_attempts, \
             updated = excluded.updated",
        )
        .bind(vault.as_str())
        .bind(s.name.to_ascii_lowercase())
        .bind(&s.name)
        .bind(&s.endpoint_url)
        .bind(types)
        .bind(s.max_attempts.map(i64::from))
        .bind(s.created)
        .bind(s.updated)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(existed.is_none())
    }

    pub(super) async fn subscription_list(
        &self,
        vault: &VaultName,
    ) -> Result<Vec<EventSubscriptionRecord>> {
        let rows =
            sqlx::query("SELECT * FROM event_subscriptions WHERE vault = $1 ORDER BY name_folded")
                .bind(vault.as_str())
                .fetch_all(&self.pool)
                .await?;
        rows.iter().map(subscription_row).collect()
    }

    pub(super) async fn subscription_delete(&self, vault: &VaultName, name: &str) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        let done =
            sqlx::query("DELETE FROM event_subscriptions WHERE vault = $1 AND name_folded = $2")
                .bind(vault.as_str())
                .bind(name.to_ascii_lowercase())
                .execute(&mut *tx)
                .await?
                .rows_affected()
                > 0;
        // Events no subscription waits for any more.
        sqlx::query(
            "DELETE FROM event_outbox WHERE vault = $1 AND NOT EXISTS \
             (SELECT 1 FROM event_deliveries d WHERE d.event_id = event_outbox.id)",
        )
        .bind(vault.as_str())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(done)
    }

    pub(super) async fn deliveries_due(
        &self,
        now_ms: i64,
        limit: u32,
    ) -> Result<Vec<PendingDelivery>> {
        let rows = sqlx::query(
            "SELECT d.event_id, d.vault, d.subscription, d.attempts, s.endpoint_url, \
             s.max_attempts, o.body FROM event_deliveries d \
             JOIN event_subscriptions s ON s.vault = d.vault AND s.name_folded = d.subscription \
             JOIN event_outbox o ON o.id = d.event_id \
             WHERE d.state = 'pending' AND d.next_attempt_ms <= $1 \
             ORDER BY d.next_attempt_ms, o.created LIMIT $2",
        )
        .bind(now_ms)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let attempts: i64 = r.try_get("attempts")?;
                let max: Option<i64> = r.try_get("max_attempts")?;
                Ok(PendingDelivery {
                    origin: DeliveryOrigin::KeyVaultEvent,
                    event_id: r.try_get("event_id")?,
                    vault: r.try_get("vault")?,
                    subscription: r.try_get("subscription")?,
                    endpoint_url: r.try_get("endpoint_url")?,
                    attempts: attempts.clamp(0, i64::from(u32::MAX)) as u32,
                    max_attempts: max.map(|m| m.clamp(1, i64::from(u32::MAX)) as u32),
                    body: r.try_get("body")?,
                })
            })
            .collect()
    }

    pub(super) async fn deliveries_next_ms(&self) -> Result<Option<i64>> {
        Ok(sqlx::query_scalar(
            "SELECT MIN(next_attempt_ms) FROM event_deliveries WHERE state = 'pending'",
        )
        .fetch_one(&self.pool)
        .await?)
    }

    pub(super) async fn delivery_done(
        &self,
        event_id: &str,
        vault: &str,
        subscription: &str,
    ) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "DELETE FROM event_deliveries WHERE event_id = $1 AND vault = $2 AND subscription = $3",
        )
        .bind(event_id)
        .bind(vault)
        .bind(subscription)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "DELETE FROM event_outbox WHERE id = $1 AND NOT EXISTS \
             (SELECT 1 FROM event_deliveries WHERE event_id = $2)",
        )
        .bind(event_id)
        .bind(event_id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) async fn delivery_fail(
        &self,
        event_id: &str,
        vault: &str,
        subscription: &str,
        attempts: u32,
        next_attempt_ms: Option<i64>,
        error: &str,
        now: i64,
    ) -> Result<()> {
        let (state, next) = failed_state(next_attempt_ms);
        sqlx::query(
            "UPDATE event_deliveries SET state = $1, attempts = $2, next_attempt_ms = $3, \
             last_error = $4, updated = $5 WHERE event_id = $6 AND vault = $7 AND subscription = $8",
        )
        .bind(state)
        .bind(i64::from(attempts))
        .bind(next)
        .bind(error)
        .bind(now)
        .bind(event_id)
        .bind(vault)
        .bind(subscription)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub(super) async fn dead_letters_list(
        &self,
        vault: &VaultName,
        subscription: &str,
    ) -> Result<Vec<DeadLetter>> {
        let rows = sqlx::query(
            "SELECT d.event_id, o.event_type, o.body, d.attempts, d.last_error, d.updated \
             FROM event_deliveries d JOIN event_outbox o ON o.id = d.event_id \
             WHERE d.vault = $1 AND d.subscription = $2 AND d.state = 'dead' \
             ORDER BY d.updated, o.created",
        )
        .bind(vault.as_str())
        .bind(subscription.to_ascii_lowercase())
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let attempts: i64 = r.try_get("attempts")?;
                Ok(DeadLetter {
                    event_id: r.try_get("event_id")?,
                    event_type: r.try_get("event_type")?,
                    body: r.try_get("body")?,
                    attempts: attempts.clamp(0, i64::from(u32::MAX)) as u32,
                    last_error: r.try_get("last_error")?,
                    dead_lettered_at: r.try_get("updated")?,
                })
            })
            .collect()
    }
}
