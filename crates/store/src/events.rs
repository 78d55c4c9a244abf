//! Records of rotation policies, event marks, event subscriptions and the event outbox
//! (deliveries and dead letters). The schema is [`SCHEMA`]; the SQL is in `sql/events.rs`.

/// Schema of rotation policies and events, applied as one migration.
pub(crate) const SCHEMA: &str = r#"
CREATE TABLE key_rotation_policies (
    vault TEXT NOT NULL, name_folded TEXT NOT NULL, policy TEXT NOT NULL,
    PRIMARY KEY (vault, name_folded),
    FOREIGN KEY (vault, name_folded) REFERENCES keys(vault, name_folded) ON DELETE CASCADE);
CREATE TABLE key_event_marks (
    vault TEXT NOT NULL, name_folded TEXT NOT NULL, mark TEXT NOT NULL, kind TEXT NOT NULL,
    created INTEGER NOT NULL,
    PRIMARY KEY (vault, name_folded, mark, kind),
    FOREIGN KEY (vault, name_folded) REFERENCES keys(vault, name_folded) ON DELETE CASCADE);
CREATE TABLE secret_event_marks (
    vault TEXT NOT NULL, name_folded TEXT NOT NULL, mark TEXT NOT NULL, kind TEXT NOT NULL,
    created INTEGER NOT NULL,
    PRIMARY KEY (vault, name_folded, mark, kind),
    FOREIGN KEY (vault, name_folded) REFERENCES secrets(vault, name_folded) ON DELETE CASCADE);
CREATE TABLE event_subscriptions (
    vault TEXT NOT NULL REFERENCES vaults(name) ON DELETE CASCADE,
    name_folded TEXT NOT NULL, name TEXT NOT NULL, endpoint_url TEXT NOT NULL,
    included_types TEXT NOT NULL, max_attempts INTEGER,
    created INTEGER NOT NULL, updated INTEGER NOT NULL,
    PRIMARY KEY (vault, name_folded));
CREATE TABLE event_outbox (
    id TEXT PRIMARY KEY, vault TEXT NOT NULL REFERENCES vaults(name) ON DELETE CASCADE,
    event_type TEXT NOT NULL, body TEXT NOT NULL, created INTEGER NOT NULL);
CREATE TABLE event_deliveries (
    event_id TEXT NOT NULL REFERENCES event_outbox(id) ON DELETE CASCADE,
    vault TEXT NOT NULL, subscription TEXT NOT NULL,
    state TEXT NOT NULL, attempts INTEGER NOT NULL, next_attempt_ms INTEGER NOT NULL,
    last_error TEXT, updated INTEGER NOT NULL,
    PRIMARY KEY (event_id, vault, subscription),
    FOREIGN KEY (vault, subscription) REFERENCES event_subscriptions(vault, name_folded)
        ON DELETE CASCADE);
CREATE INDEX event_deliveries_due ON event_deliveries(state, next_attempt_ms);
CREATE INDEX event_deliveries_sub ON event_deliveries(vault, subscription, state);
"#;

/// `key` or `secret` marks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MarkTable {
    /// `key_event_marks`.
    Key,
    /// `secret_event_marks`.
    Secret,
}

/// A record that an event was emitted for (an object, a mark, a kind): the reason it is not
/// emitted twice. `mark` is the version, `{version}@{exp}` for expiry events, empty for
/// object-level events.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct EventMark {
    /// Keys or secrets.
    pub table: MarkTable,
    /// Lower-case object name.
    pub name_folded: String,
    /// What the mark is about.
    pub mark: String,
    /// Event kind (`NewVersionCreated`, …).
    pub kind: String,
}

/// One event to emit, if its mark is new: the event row and one delivery per subscription,
/// written with the mark in one transaction.
#[derive(Clone, Debug)]
pub struct EventEmission {
    /// The mark that makes it happen once.
    pub mark: EventMark,
    /// Event id (UUID).
    pub event_id: String,
    /// `eventType`.
    pub event_type: String,
    /// The event (JSON text, Event Grid schema).
    pub body: String,
    /// Subscriptions (lower-case names) whose filter matches.
    pub subscriptions: Vec<String>,
}

/// An event subscription (webhook) of a vault.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventSubscriptionRecord {
    /// Name as given.
    pub name: String,
    /// Webhook URL (may carry a secret in its query).
    pub endpoint_url: String,
    /// `includedEventTypes` (empty: every type).
    pub included_types: Vec<String>,
    /// Delivery attempts before dead-lettering (`None`: the server default).
    pub max_attempts: Option<u32>,
    /// Creation time.
    pub created: i64,
    /// Last change.
    pub updated: i64,
}

/// Which outbox a delivery comes from: the two share the delivery worker, and differ in how
/// the body is sent and where the outcome is recorded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DeliveryOrigin {
    /// A key vault event (`event_deliveries`): sent as an Event Grid array of one event.
    KeyVaultEvent,
    /// An activity log alert's notification (`alert_deliveries`, [`crate::alerts`]): sent as
    /// it is.
    ActivityLogAlert,
}

/// A delivery waiting for its next attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PendingDelivery {
    /// Which outbox it is in.
    pub origin: DeliveryOrigin,
    /// Event id (an alert notification: its delivery id).
    pub event_id: String,
    /// Vault (an alert notification: its action group's lower-case id).
    pub vault: String,
    /// Subscription, lower-case (an alert notification: the receiver's name).
    pub subscription: String,
    /// Webhook URL.
    pub endpoint_url: String,
    /// Attempts made so far.
    pub attempts: u32,
    /// Subscription's attempt limit (`None`: the server default).
    pub max_attempts: Option<u32>,
    /// The event (JSON text).
    pub body: String,
}

/// A delivery that gave up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeadLetter {
    /// Event id.
    pub event_id: String,
    /// `eventType`.
    pub event_type: String,
    /// The event (JSON text).
    pub body: String,
    /// Attempts made.
    pub attempts: u32,
    /// The last failure.
    pub last_error: Option<String>,
    /// When it was dead-lettered (Unix seconds).
    pub dead_lettered_at: i64,
}
