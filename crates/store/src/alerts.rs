//! Records of Azure Monitor's resources (action groups, activity log alerts) and the outbox of
//! their notifications. The schema is [`SCHEMA`]; the SQL is in `sql/alerts.rs`.
//!
//! - **Monitor resources** (`monitor_resources`): one ARM body per resource, by lower-case id.
//!   They live in their own table, not in the directory's `resources`: they carry no
//!   identities, and moves and service records do not apply to them.
//! - **Alert deliveries** (`alert_deliveries`): one row per (firing, webhook receiver), written
//!   in the transaction that appends the activity entry that fired it
//!   ([`AlertStore::append_activity_with_alerts`]), so an entry the store holds never lacks its
//!   notifications. The event delivery worker takes them with the key vault's events; they go
//!   when delivered, stay as dead letters after the attempt limit, and go with their action
//!   group when it is deleted.

use async_trait::async_trait;

use crate::Result;
use crate::events::PendingDelivery;

/// Schema of monitor resources and alert deliveries, applied as one migration.
pub(crate) const SCHEMA: &str = r#"
CREATE TABLE monitor_resources (
    id TEXT PRIMARY KEY, resource_type TEXT NOT NULL, subscription_id TEXT NOT NULL,
    resource_group TEXT NOT NULL, body TEXT NOT NULL,
    created INTEGER NOT NULL, updated INTEGER NOT NULL);
CREATE INDEX monitor_resources_type ON monitor_resources(resource_type, subscription_id);
CREATE TABLE alert_deliveries (
    id TEXT PRIMARY KEY,
    action_group TEXT NOT NULL REFERENCES monitor_resources(id) ON DELETE CASCADE,
    receiver TEXT NOT NULL, alert TEXT NOT NULL, endpoint_url TEXT NOT NULL, body TEXT NOT NULL,
    state TEXT NOT NULL, attempts INTEGER NOT NULL, next_attempt_ms INTEGER NOT NULL,
    last_error TEXT, created INTEGER NOT NULL, updated INTEGER NOT NULL);
CREATE INDEX alert_deliveries_due ON alert_deliveries(state, next_attempt_ms);
CREATE INDEX alert_deliveries_group ON alert_deliveries(action_group, state);
"#;

/// An action group or activity log alert.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MonitorRecord {
    /// Lower-case ARM id.
    pub id: String,
    /// Lower-case type (`microsoft.insights/actiongroups`, `…/activitylogalerts`).
    pub resource_type: String,
    /// Lower-case subscription id.
    pub subscription_id: String,
    /// Lower-case resource group name.
    pub resource_group: String,
    /// The resource's ARM body (JSON text).
    pub body: String,
    /// Creation time.
    pub created: i64,
    /// Last change.
    pub updated: i64,
}

/// One notification of one webhook receiver, written with the activity entry that fired it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AlertNotification {
    /// Delivery id (a UUID).
    pub id: String,
    /// The alert that fired (lower-case id).
    pub alert: String,
    /// The action group (lower-case id); the delivery goes with it.
    pub action_group: String,
    /// The receiver's name.
    pub receiver: String,
    /// Where it is POSTed (may carry a secret in its query).
    pub endpoint_url: String,
    /// The payload (JSON text).
    pub body: String,
}

/// A notification that gave up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AlertDeadLetter {
    /// Delivery id.
    pub id: String,
    /// The alert that fired (lower-case id).
    pub alert: String,
    /// The receiver's name.
    pub receiver: String,
    /// The payload (JSON text).
    pub body: String,
    /// Attempts made.
    pub attempts: u32,
    /// The last failure.
    pub last_error: Option<String>,
    /// When it was dead-lettered (Unix seconds).
    pub dead_lettered_at: i64,
}

/// What action groups, activity log alerts and their notifications persist. Each method is one
/// transaction.
#[async_trait]
pub trait AlertStore: Send + Sync {
    /// Creates or replaces a resource; `true` when it was created.
    async fn put_monitor_resource(&self, r: &MonitorRecord) -> Result<bool>;
    /// A resource by lower-case id.
    async fn get_monitor_resource(&self, id: &str) -> Result<Option<MonitorRecord>>;
    /// The resources of a lower-case type, in one subscription or all, by id.
    async fn list_monitor_resources(
        &self,
        resource_type: &str,
        subscription_id: Option<&str>,
    ) -> Result<Vec<MonitorRecord>>;
    /// Deletes a resource (an action group with its pending deliveries and dead letters);
    /// `true` if it existed.
    async fn delete_monitor_resource(&self, id: &str) -> Result<bool>;

    /// Appends an entry to a resource's activity log (as
    /// [`crate::Store::append_service_activity`]) and, in the same transaction, the
    /// notifications it fired; a notification whose action group was deleted meanwhile is
    /// left out. Returns the entry's position.
    async fn append_activity_with_alerts(
        &self,
        resource_key: &str,
        at: i64,
        body: &str,
        notifications: &[AlertNotification],
    ) -> Result<i64>;
    /// Pending notifications whose next attempt is due at `now_ms`, oldest first
    /// ([`crate::events::DeliveryOrigin::ActivityLogAlert`]).
    async fn due_alert_deliveries(&self, now_ms: i64, limit: u32) -> Result<Vec<PendingDelivery>>;
    /// The earliest next attempt of any pending notification (Unix milliseconds).
    async fn next_alert_delivery_ms(&self) -> Result<Option<i64>>;
    /// A notification was delivered: it is removed.
    async fn alert_delivery_succeeded(&self, id: &str) -> Result<()>;
    /// A notification failed: retried at `next_attempt_ms`, or dead-lettered when `None`.
    async fn alert_delivery_failed(
        &self,
        id: &str,
        attempts: u32,
        next_attempt_ms: Option<i64>,
        error: &str,
        now: i64,
    ) -> Result<()>;
    /// Dead-lettered notifications of an action group (lower-case id), oldest first.
    async fn alert_dead_letters(&self, action_group: &str) -> Result<Vec<AlertDeadLetter>>;
}
