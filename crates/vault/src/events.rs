//! Events (KV-11): what is due (new versions, near expiry, expired, disabled, deleted), the
//! outbox they go to, the subscriptions that receive them, and the delivery worker — which
//! also delivers the notifications of activity log alerts (`alerts.rs`), from their own
//! outbox.
//!
//! Emission is a reconciliation, not a side effect of a request. For every key and secret the
//! service compares what it holds (versions, enabled flags, exp, deletion) with the event marks
//! in the store, and for each event that is due and not yet marked writes — in one transaction —
//! the mark, the event, and one delivery row per matching subscription. It runs right after
//! every committed change of the object (so events are immediate), and for everything on every
//! scheduler sweep (every 30 s, at start-up, and after each test-clock move). A crash between a
//! change's commit and its events therefore delays them to the next sweep and loses none, and
//! the marks keep every event to once per (object, version, kind).
//!
//! Delivery is at least once: the delivery rows are in the store before the first attempt; the
//! worker POSTs each event (Event Grid schema, a JSON array of one event) with a bounded time,
//! on its own tasks with bounded concurrency, retries with exponential back-off, and
//! dead-letters after the subscription's attempt limit. A slow or failing webhook never holds
//! a vault lock or a request.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use kagi_core::event::{
    EventKind, EventSubject, ObjectType, endpoint_base_url, event_grid_event, event_type,
    validate_event_types, validate_subscription_name, validate_webhook_url,
};
use kagi_core::rotation::{RotationPolicy, key_near_expiry_at, secret_near_expiry_at};
use kagi_core::{ErrorCode, KvError, ObjectName, VaultName};
use kagi_identity::Principal;
use kagi_store::VaultRecord;
use kagi_store::events::{
    DeliveryOrigin, EventEmission, EventMark, EventSubscriptionRecord, MarkTable, PendingDelivery,
};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::state::VaultState;
use crate::{Platform, internal};

/// Per-platform state of the event system.
#[derive(Debug, Default)]
pub(crate) struct EventRuntime {
    /// Wakes the delivery worker when deliveries were written or finished.
    pub(crate) wake: tokio::sync::Notify,
    /// Serialises scheduler sweeps, so two sweeps never rotate the same key twice.
    pub(crate) sweep: tokio::sync::Mutex<()>,
}

/// How the delivery worker behaves. [`DeliveryConfig::from_env`] reads overrides (for tests)
/// from `KAGI_EVENT_MAX_ATTEMPTS`, `KAGI_EVENT_RETRY_BASE_MS`, `KAGI_EVENT_RETRY_MAX_MS`,
/// `KAGI_EVENT_TIMEOUT_MS` and `KAGI_EVENT_CONCURRENCY`.
#[derive(Debug, Clone)]
pub struct DeliveryConfig {
    /// Attempts before a delivery is dead-lettered, unless the subscription sets its own.
    pub max_attempts: u32,
    /// Delay after the first failure; doubled after each further failure.
    pub retry_base: Duration,
    /// Longest delay between attempts.
    pub retry_max: Duration,
    /// Bound on one attempt (connect, send, answer).
    pub attempt_timeout: Duration,
    /// Attempts in flight at once.
    pub concurrency: usize,
    /// Longest the worker sleeps before looking for due deliveries again.
    pub poll: Duration,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        Self {
            max_attempts: 8,
            retry_base: Duration::from_secs(1),
            retry_max: Duration::from_secs(60),
            attempt_timeout: Duration::from_secs(5),
            concurrency: 16,
            poll: Duration::from_secs(1),
        }
    }
}

impl DeliveryConfig {
    /// The defaults, with the `KAGI_EVENT_*` overrides that are set and valid.
    pub fn from_env() -> Self {
        fn env(name: &str) -> Option<u64> {
            std::env::var(name).ok()?.trim().parse().ok()
        }
        let mut c = Self::default();
        if let Some(n) = env("KAGI_EVENT_MAX_ATTEMPTS").filter(|n| (1..=1000).contains(n)) {
            c.max_attempts = n as u32;
        }
        if let Some(ms) = env("KAGI_EVENT_RETRY_BASE_MS").filter(|n| *n >= 1) {
            c.retry_base = Duration::from_millis(ms);
        }
        if let Some(ms) = env("KAGI_EVENT_RETRY_MAX_MS").filter(|n| *n >= 1) {
            c.retry_max = Duration::from_millis(ms);
        }
        if let Some(ms) = env("KAGI_EVENT_TIMEOUT_MS").filter(|n| *n >= 1) {
            c.attempt_timeout = Duration::from_millis(ms);
        }
        if let Some(n) = env("KAGI_EVENT_CONCURRENCY").filter(|n| (1..=1024).contains(n)) {
            c.concurrency = n as usize;
        }
        c
    }

    /// The delay before attempt `attempts + 1`, after `attempts` failures (≥ 1).
    pub fn backoff(&self, attempts: u32) -> Duration {
        let factor = 1u32
            .checked_shl(attempts.saturating_sub(1))
            .unwrap_or(u32::MAX);
        self.retry_base
            .checked_mul(factor)
            .unwrap_or(self.retry_max)
            .min(self.retry_max)
    }
}

fn mark_table(o: ObjectType) -> MarkTable {
    match o {
        ObjectType::Key => MarkTable::Key,
        ObjectType::Secret => MarkTable::Secret,
    }
}

fn vault_arm_id(r: &VaultRecord) -> String {
    format!(
        "/subscriptions/{}/resourceGroups/{}/providers/Microsoft.KeyVault/vaults/{}",
        r.subscription_id, r.resource_group, r.name
    )
}

/// One version as the event rules see it.
struct VersionView {
    version: String,
    enabled: bool,
    nbf: Option<i64>,
    exp: Option<i64>,
}

/// One key or secret as the event rules see it.
struct ObjectView {
    object: ObjectType,
    name: ObjectName,
    deleted: bool,
    versions: Vec<VersionView>,
    /// Key: the policy (for near-expiry timing). Secrets use the fixed 30 days.
    policy: Option<RotationPolicy>,
}

impl ObjectView {
    fn near_expiry_at(&self, exp: i64) -> Option<i64> {
        match self.object {
            ObjectType::Key => key_near_expiry_at(self.policy.as_ref(), exp),
            ObjectType::Secret => Some(secret_near_expiry_at(exp)),
        }
    }
}

/// A new UUID for an event (or an alert's firing, entry or notification).
pub(crate) fn new_event_id() -> Result<String, KvError> {
    kagi_crypto::random_array()
        .map(kagi_core::ids::uuid_v4)
        .map_err(|e| internal("rng", e))
}

/// Serialises event reconciliation (see `reconcile_events`).
static RECONCILE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

impl Platform {
    /// Emits the events a committed change of one key or secret made due. Failures are logged:
    /// the next scheduler sweep emits whatever this missed.
    pub(crate) async fn after_change(
        &self,
        state: &VaultState,
        object: ObjectType,
        name: &ObjectName,
    ) {
        if let Err(e) = self.reconcile_events(state, Some((object, name))).await {
            tracing::error!(error = %e, object = object.as_str(), name = %name,
                "emitting events failed; the next scheduler sweep retries");
        }
    }

    fn object_views(
        state: &VaultState,
        only: Option<(ObjectType, &ObjectName)>,
        policies: &HashMap<String, RotationPolicy>,
    ) -> Vec<ObjectView> {
        let mut out = Vec::new();
        let want = |o: ObjectType, folded: &str| match only {
            None => true,
            Some((t, n)) => t == o && n.folded() == folded,
        };
        for (folded, k) in state.keys().iter() {
            if !want(ObjectType::Key, folded) {
                continue;
            }
            out.push(ObjectView {
                object: ObjectType::Key,
                name: k.name.clone(),
                deleted: k.deleted_at.is_some(),
                versions: k
                    .versions
                    .iter()
                    .map(|v| VersionView {
                        version: v.version.to_string(),
                        enabled: v.info.attributes.enabled,
                        nbf: v.info.attributes.nbf,
                        exp: v.info.attributes.exp,
                    })
                    .collect(),
                policy: policies.get(folded).cloned(),
            });
        }
        for (folded, s) in state
            .secrets
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            if !want(ObjectType::Secret, folded) {
                continue;
            }
            out.push(ObjectView {
                object: ObjectType::Secret,
                name: s.name.clone(),
                deleted: s.deleted_at.is_some(),
                versions: s
                    .versions
                    .iter()
                    .map(|v| VersionView {
                        version: v.version.to_string(),
                        enabled: v.info.attributes.enabled,
                        nbf: v.info.attributes.nbf,
                        exp: v.info.attributes.exp,
                    })
                    .collect(),
                policy: None,
            });
        }
        out
    }

    /// Emits every due event of a vault's keys and secrets (or of one object). Returns the
    /// number of events newly recorded.
    pub(crate) async fn reconcile_events(
        &self,
        state: &VaultState,
        only: Option<(ObjectType, &ObjectName)>,
    ) -> Result<usize, KvError> {
        // One reconciliation at a time: each reads the objects' state and then records marks;
        // interleaved, a sweep that read a key before its deletion could remove the mark the
        // deletion just recorded, and the event would be emitted twice.
        let _gate = RECONCILE.lock().await;
        let record = state.record();
        let store_err = |e| internal("events", e);
        let folded = only.map(|(o, n)| (mark_table(o), n.folded()));
        let marks: HashSet<EventMark> = self
            .store
            .load_event_marks(&record.name, folded.as_ref().map(|(t, n)| (*t, n.as_str())))
            .await
            .map_err(store_err)?
            .into_iter()
            .collect();
        let policies: HashMap<String, RotationPolicy> = match only {
            Some((ObjectType::Secret, _)) => HashMap::new(),
            Some((ObjectType::Key, n)) => self
                .store
                .get_rotation_policy(&record.name, n)
                .await
                .map_err(store_err)?
                .map(|p| (n.folded(), p))
                .into_iter()
                .collect(),
            None => self
                .store
                .list_rotation_policies(&record.name)
                .await
                .map_err(store_err)?
                .into_iter()
                .collect(),
        };
        let subscriptions = self
            .store
            .list_event_subscriptions(&record.name)
            .await
            .map_err(store_err)?;
        let views = Self::object_views(state, only, &policies);
        let now = self.clock.now();
        let topic = vault_arm_id(&record);
        let vault_uri = self.config.vault_uri(&record.name);
        let mut emissions = Vec::new();
        let mut unmarks = Vec::new();
        for o in &views {
            let table = mark_table(o.object);
            let mk = |mark: String, kind: EventKind| EventMark {
                table,
                name_folded: o.name.folded(),
                mark,
                kind: kind.as_str().to_string(),
            };
            let mut emit =
                |mark: EventMark, kind: EventKind, v: &VersionView| -> Result<(), KvError> {
                    if marks.contains(&mark) {
                        return Ok(());
                    }
                    let etype = event_type(o.object, kind);
                    let id = new_event_id()?;
                    let body = event_grid_event(
                        &id,
                        &etype,
                        now,
                        &EventSubject {
                            topic: &topic,
                            vault_name: record.name.as_str(),
                            vault_uri: &vault_uri,
                            object_type: o.object,
                            name: o.name.as_str(),
                            version: &v.version,
                            nbf: v.nbf,
                            exp: v.exp,
                        },
                    );
                    let subs = subscriptions
                        .iter()
                        .filter(|s| {
                            s.included_types.is_empty()
                                || s.included_types
                                    .iter()
                                    .any(|t| t.eq_ignore_ascii_case(&etype))
                        })
                        .map(|s| s.name.to_ascii_lowercase())
                        .collect();
                    emissions.push(EventEmission {
                        mark,
                        event_id: id,
                        event_type: etype,
                        body: body.to_string(),
                        subscriptions: subs,
                    });
                    Ok(())
                };
            for v in &o.versions {
                emit(
                    mk(v.version.clone(), EventKind::NewVersionCreated),
                    EventKind::NewVersionCreated,
                    v,
                )?;
                let disabled = mk(v.version.clone(), EventKind::Disabled);
                if !v.enabled {
                    emit(disabled, EventKind::Disabled, v)?;
                } else if marks.contains(&disabled) {
                    // Enabled again: the next disable is news again.
                    unmarks.push(disabled);
                }
                if o.deleted {
                    continue;
                }
                if let Some(exp) = v.exp {
                    // Marked per exp value: a new exp is a new expiry to announce.
                    let at = format!("{}@{exp}", v.version);
                    if o.near_expiry_at(exp).is_some_and(|t| now >= t) {
                        emit(
                            mk(at.clone(), EventKind::NearExpiry),
                            EventKind::NearExpiry,
                            v,
                        )?;
                    }
                    if now >= exp {
                        emit(mk(at, EventKind::Expired), EventKind::Expired, v)?;
                    }
                }
            }
            let deleted = mk(String::new(), EventKind::Deleted);
            if o.deleted {
                if let Some(current) = o.versions.last() {
                    emit(deleted, EventKind::Deleted, current)?;
                }
            } else if marks.contains(&deleted) {
                // Recovered: the next delete is news again.
                unmarks.push(deleted);
            }
        }
        if emissions.is_empty() && unmarks.is_empty() {
            return Ok(0);
        }
        let written = self
            .store
            .record_events(&record.name, &emissions, &unmarks, now)
            .await
            .map_err(store_err)?;
        let mut count = 0;
        let mut deliveries = false;
        for (e, fresh) in emissions.iter().zip(&written) {
            if *fresh {
                count += 1;
                if e.subscriptions.is_empty() {
                    tracing::debug!(vault = %record.name, event = %e.event_type,
                        subject = %e.mark.name_folded, "event emitted (no subscribers)");
                } else {
                    deliveries = true;
                    tracing::info!(vault = %record.name, event = %e.event_type,
                        subject = %e.mark.name_folded, subscribers = e.subscriptions.len(),
                        "event emitted");
                }
            }
        }
        if deliveries {
            self.events.wake.notify_one();
        }
        Ok(count)
    }
}

// ----- subscriptions (management API) -----

/// `properties` of an event subscription PUT.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SubscriptionInput {
    properties: Option<SubscriptionProperties>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SubscriptionProperties {
    destination: Option<Destination>,
    filter: Option<Filter>,
    retry_policy: Option<RetryPolicy>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Destination {
    endpoint_type: Option<String>,
    properties: Option<DestinationProperties>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct DestinationProperties {
    endpoint_url: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Filter {
    included_event_types: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RetryPolicy {
    max_delivery_attempts: Option<u32>,
}

fn not_found_subscription(name: &str) -> KvError {
    KvError::new(
        ErrorCode::ResourceNotFound,
        format!(
            "The event subscription '{}' was not found.",
            kagi_core::ids::printable(name)
        ),
    )
}

impl Platform {
    /// The vault an event-subscription path names, after checking that the caller is the
    /// bootstrap administrator (webhooks are dialled by the server: creating one is a
    /// privileged act).
    fn event_vault(
        &self,
        caller: &Principal,
        subscription: &str,
        resource_group: &str,
        vault: &str,
    ) -> Result<(Arc<VaultState>, VaultRecord), KvError> {
        if caller.object_id != self.admin_object_id {
            return Err(KvError::forbidden(format!(
                "The client '{}' with object id '{}' does not have authorization to manage event \
                 subscriptions; only the bootstrap administrator may.",
                caller.client_id, caller.object_id
            ))
            .with_inner("AuthorizationFailed"));
        }
        let missing = || {
            KvError::new(
                ErrorCode::ResourceNotFound,
                format!(
                    "The Resource 'Microsoft.KeyVault/vaults/{}' under resource group '{}' was not \
                     found.",
                    kagi_core::ids::printable(vault),
                    kagi_core::ids::printable(resource_group)
                ),
            )
        };
        let name = VaultName::parse(vault).map_err(|_| missing())?;
        let state = self.live_vault(&name).map_err(|_| missing())?;
        let record = state.record();
        if !record.subscription_id.eq_ignore_ascii_case(subscription)
            || !record.resource_group.eq_ignore_ascii_case(resource_group)
        {
            return Err(missing());
        }
        Ok((state, record))
    }

    fn subscription_view(&self, record: &VaultRecord, s: &EventSubscriptionRecord) -> Value {
        let topic = vault_arm_id(record);
        json!({
            "id": format!("{topic}/providers/Microsoft.EventGrid/eventSubscriptions/{}", s.name),
            "name": s.name,
            "type": "Microsoft.EventGrid/eventSubscriptions",
            "properties": {
                "topic": topic,
                "provisioningState": "Succeeded",
                "destination": {
                    "endpointType": "WebHook",
                    "properties": {
                        "endpointBaseUrl": endpoint_base_url(&s.endpoint_url),
                        "maxEventsPerBatch": 1,
                        "preferredBatchSizeInKilobytes": 64,
                    },
                },
                "filter": {
                    "includedEventTypes": if s.included_types.is_empty() {
                        Value::Null
                    } else {
                        json!(s.included_types)
                    },
                },
                "eventDeliverySchema": "EventGridSchema",
                "retryPolicy": {
                    "maxDeliveryAttempts": s.max_attempts.unwrap_or_else(|| DeliveryConfig::from_env().max_attempts),
                    "eventTimeToLiveInMinutes": 1440,
                },
                "createdAt": kagi_core::time::rfc3339(s.created),
                "updatedAt": kagi_core::time::rfc3339(s.updated),
            },
        })
    }

    /// `PUT …/vaults/{vault}/providers/Microsoft.EventGrid/eventSubscriptions/{name}`: creates
    /// (201) or replaces (200) a webhook subscription. Bad URLs, unknown event types and other
    /// bad input are 400 and nothing is stored.
    pub async fn put_event_subscription(
        &self,
        caller: &Principal,
        subscription: &str,
        resource_group: &str,
        vault: &str,
        name: &str,
        body: Value,
    ) -> Result<(u16, Value), KvError> {
        let (_, record) = self.event_vault(caller, subscription, resource_group, vault)?;
        validate_subscription_name(name)?;
        let input: SubscriptionInput = serde_json::from_value(body).map_err(|e| {
            let msg: String = e.to_string().chars().take(200).collect();
            KvError::bad_parameter(format!("The request body is not valid: {msg}"))
        })?;
        let props = input
            .properties
            .ok_or_else(|| KvError::bad_parameter("properties is required."))?;
        let dest = props
            .destination
            .ok_or_else(|| KvError::bad_parameter("properties.destination is required."))?;
        let kind = dest.endpoint_type.unwrap_or_else(|| "WebHook".into());
        if !kind.eq_ignore_ascii_case("WebHook") {
            return Err(KvError::bad_parameter(format!(
                "endpointType '{}' is not supported: kagi delivers to WebHook endpoints.",
                kagi_core::ids::printable(&kind)
            )));
        }
        let url = dest
            .properties
            .and_then(|p| p.endpoint_url)
            .ok_or_else(|| {
                KvError::bad_parameter("properties.destination.properties.endpointUrl is required.")
            })?;
        validate_webhook_url(&url)?;
        let types = validate_event_types(
            &props
                .filter
                .and_then(|f| f.included_event_types)
                .unwrap_or_default(),
        )?;
        let max_attempts = props.retry_policy.and_then(|r| r.max_delivery_attempts);
        if let Some(m) = max_attempts
            && !(1..=30).contains(&m)
        {
            return Err(KvError::bad_parameter(
                "retryPolicy.maxDeliveryAttempts must be from 1 to 30.",
            ));
        }
        let now = self.clock.now();
        let existing = self
            .store
            .list_event_subscriptions(&record.name)
            .await
            .map_err(|e| internal("list event subscriptions", e))?
            .into_iter()
            .find(|s| s.name.eq_ignore_ascii_case(name));
        let rec = EventSubscriptionRecord {
            name: existing
                .as_ref()
                .map_or_else(|| name.to_string(), |s| s.name.clone()),
            endpoint_url: url,
            included_types: types,
            max_attempts,
            created: existing.as_ref().map_or(now, |s| s.created),
            updated: now,
        };
        let created = self
            .store
            .put_event_subscription(&record.name, &rec)
            .await
            .map_err(|e| internal("put event subscription", e))?;
        tracing::info!(vault = %record.name, subscription = %rec.name, "event subscription saved");
        Ok((
            if created { 201 } else { 200 },
            self.subscription_view(&record, &rec),
        ))
    }

    async fn find_subscription(
        &self,
        record: &VaultRecord,
        name: &str,
    ) -> Result<EventSubscriptionRecord, KvError> {
        self.store
            .list_event_subscriptions(&record.name)
            .await
            .map_err(|e| internal("list event subscriptions", e))?
            .into_iter()
            .find(|s| s.name.eq_ignore_ascii_case(name))
            .ok_or_else(|| not_found_subscription(name))
    }

    /// `GET …/eventSubscriptions/{name}`.
    pub async fn get_event_subscription(
        &self,
        caller: &Principal,
        subscription: &str,
        resource_group: &str,
        vault: &str,
        name: &str,
    ) -> Result<Value, KvError> {
        let (_, record) = self.event_vault(caller, subscription, resource_group, vault)?;
        let s = self.find_subscription(&record, name).await?;
        Ok(self.subscription_view(&record, &s))
    }

    /// `GET …/eventSubscriptions`.
    pub async fn list_event_subscriptions(
        &self,
        caller: &Principal,
        subscription: &str,
        resource_group: &str,
        vault: &str,
    ) -> Result<Value, KvError> {
        let (_, record) = self.event_vault(caller, subscription, resource_group, vault)?;
        let all = self
            .store
            .list_event_subscriptions(&record.name)
            .await
            .map_err(|e| internal("list event subscriptions", e))?;
        Ok(json!({
            "value": all.iter().map(|s| self.subscription_view(&record, s)).collect::<Vec<_>>(),
        }))
    }

    /// `DELETE …/eventSubscriptions/{name}`: 200, or 204 when there was none. Its pending
    /// deliveries and dead letters go with it.
    pub async fn delete_event_subscription(
        &self,
        caller: &Principal,
        subscription: &str,
        resource_group: &str,
        vault: &str,
        name: &str,
    ) -> Result<u16, KvError> {
        let (_, record) = self.event_vault(caller, subscription, resource_group, vault)?;
        let existed = self
            .store
            .delete_event_subscription(&record.name, name)
            .await
            .map_err(|e| internal("delete event subscription", e))?;
        if existed {
            tracing::info!(vault = %record.name, subscription = name, "event subscription deleted");
        }
        Ok(if existed { 200 } else { 204 })
    }

    /// `GET …/eventSubscriptions/{name}/deadLetters` (kagi extension): deliveries that gave up,
    /// with the event, the attempts made and the last error.
    pub async fn list_dead_letters(
        &self,
        caller: &Principal,
        subscription: &str,
        resource_group: &str,
        vault: &str,
        name: &str,
    ) -> Result<Value, KvError> {
        let (_, record) = self.event_vault(caller, subscription, resource_group, vault)?;
        let s = self.find_subscription(&record, name).await?;
        let dead = self
            .store
            .dead_letters(&record.name, &s.name)
            .await
            .map_err(|e| internal("dead letters", e))?;
        Ok(json!({
            "value": dead.iter().map(|d| json!({
                "eventId": d.event_id,
                "eventType": d.event_type,
                "attempts": d.attempts,
                "lastError": d.last_error,
                "deadLetteredAt": kagi_core::time::rfc3339(d.dead_lettered_at),
                "event": serde_json::from_str::<Value>(&d.body).unwrap_or(Value::Null),
            })).collect::<Vec<_>>(),
        }))
    }
}

// ----- delivery -----

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The client that dials webhooks: system roots plus the kagi CA, no redirects (a webhook
/// cannot bounce the server to another address), bounded attempts.
fn webhook_client(platform: &Platform, config: &DeliveryConfig) -> reqwest::Client {
    let mut b = reqwest::Client::builder()
        .timeout(config.attempt_timeout)
        .connect_timeout(config.attempt_timeout)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("kagi-events/", env!("CARGO_PKG_VERSION")));
    let ca = platform.config.data_dir.join("tls/ca.pem");
    if let Ok(pem) = std::fs::read(&ca) {
        match reqwest::Certificate::from_pem(&pem) {
            Ok(cert) => b = b.tls_certs_merge([cert]),
            Err(e) => {
                tracing::warn!(error = %e, "the kagi CA is not valid PEM; webhooks trust system roots only")
            }
        }
    }
    b.build().unwrap_or_else(|e| {
        tracing::error!(error = %e, "webhook client with the kagi CA failed; using defaults");
        reqwest::Client::new()
    })
}

/// Pending deliveries of both outboxes (key vault events, alert notifications) due at `now`.
async fn due_deliveries(
    platform: &Platform,
    now: i64,
) -> Result<Vec<PendingDelivery>, kagi_store::StoreError> {
    let mut due = platform.store.due_deliveries(now, 256).await?;
    due.extend(platform.store.due_alert_deliveries(now, 256).await?);
    Ok(due)
}

/// The earliest next attempt in either outbox.
async fn next_delivery_ms(platform: &Platform) -> Option<i64> {
    let events = platform.store.next_delivery_ms().await;
    let alerts = platform.store.next_alert_delivery_ms().await;
    [events, alerts]
        .into_iter()
        .filter_map(|r| r.ok().flatten())
        .min()
}

/// Delivers pending events and alert notifications until the process ends: resumes what was
/// pending at start, wakes when deliveries are written, retries with back-off, dead-letters
/// after the attempt limit.
pub async fn run_event_delivery(platform: Arc<Platform>, config: DeliveryConfig) {
    let client = webhook_client(&platform, &config);
    let permits = Arc::new(tokio::sync::Semaphore::new(config.concurrency.max(1)));
    type Key = (DeliveryOrigin, String, String, String);
    let in_flight: Arc<std::sync::Mutex<HashSet<Key>>> = Arc::default();
    // Attempts that ended, taken out of `in_flight` only before the next read of due
    // deliveries: a read that began before an attempt recorded its outcome can still list the
    // delivery, and must find it in flight rather than send it a second time.
    let ended: Arc<std::sync::Mutex<Vec<Key>>> = Arc::default();
    loop {
        {
            let mut fl = in_flight.lock().unwrap_or_else(|p| p.into_inner());
            for key in ended.lock().unwrap_or_else(|p| p.into_inner()).drain(..) {
                fl.remove(&key);
            }
        }
        let now = now_ms();
        match due_deliveries(&platform, now).await {
            Ok(due) => {
                for d in due {
                    let key = (
                        d.origin,
                        d.event_id.clone(),
                        d.vault.clone(),
                        d.subscription.clone(),
                    );
                    if !in_flight
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(key.clone())
                    {
                        continue;
                    }
                    let Ok(permit) = permits.clone().acquire_owned().await else {
                        return;
                    };
                    let (p, c, cfg, done) = (
                        platform.clone(),
                        client.clone(),
                        config.clone(),
                        ended.clone(),
                    );
                    // Under the delivery job's lease fence, if it runs under one.
                    tokio::spawn(kagi_store::lease::inherit(async move {
                        attempt(&p, &c, &cfg, d).await;
                        done.lock().unwrap_or_else(|p| p.into_inner()).push(key);
                        drop(permit);
                        p.events.wake.notify_one();
                    }));
                }
            }
            Err(e) => tracing::error!(error = %e, "reading due event deliveries failed"),
        }
        let poll = config.poll.as_millis() as i64;
        let wait = match next_delivery_ms(&platform).await {
            Some(t) if t > now => (t - now).min(poll),
            _ => poll,
        };
        tokio::select! {
            _ = platform.events.wake.notified() => {}
            _ = tokio::time::sleep(Duration::from_millis(wait.max(1) as u64)) => {}
        }
    }
}

/// One attempt of one delivery, and its outcome recorded in its outbox. An event goes as
/// Event Grid sends it (an array of one event, `aeg-*` headers); an alert notification as
/// Azure Monitor sends it (the payload alone).
async fn attempt(
    p: &Platform,
    client: &reqwest::Client,
    config: &DeliveryConfig,
    d: PendingDelivery,
) {
    let request = client
        .post(&d.endpoint_url)
        .header("content-type", "application/json; charset=utf-8");
    let request = match d.origin {
        DeliveryOrigin::KeyVaultEvent => request
            .header("aeg-event-type", "Notification")
            .header("aeg-subscription-name", d.subscription.to_ascii_uppercase())
            .header("aeg-delivery-count", d.attempts.to_string())
            .body(format!("[{}]", d.body)),
        DeliveryOrigin::ActivityLogAlert => request.body(d.body.clone()),
    };
    let error = match request.send().await {
        Ok(r) if r.status().is_success() => None,
        Ok(r) => Some(format!("HTTP {}", r.status().as_u16())),
        Err(e) => Some(e.without_url().to_string().chars().take(300).collect()),
    };
    let outcome = match (&error, d.origin) {
        (None, DeliveryOrigin::KeyVaultEvent) => {
            p.store
                .delivery_succeeded(&d.event_id, &d.vault, &d.subscription)
                .await
        }
        (None, DeliveryOrigin::ActivityLogAlert) => {
            p.store.alert_delivery_succeeded(&d.event_id).await
        }
        (Some(err), origin) => {
            let attempts = d.attempts.saturating_add(1);
            let max = d.max_attempts.unwrap_or(config.max_attempts);
            let next =
                (attempts < max).then(|| now_ms() + config.backoff(attempts).as_millis() as i64);
            if next.is_none() {
                tracing::warn!(?origin, owner = %d.vault, receiver = %d.subscription, id = %d.event_id,
                    attempts, error = %err, "delivery dead-lettered");
            } else {
                tracing::info!(?origin, owner = %d.vault, receiver = %d.subscription, id = %d.event_id,
                    attempts, error = %err, "delivery failed; will retry");
            }
            match origin {
                DeliveryOrigin::KeyVaultEvent => {
                    p.store
                        .delivery_failed(
                            &d.event_id,
                            &d.vault,
                            &d.subscription,
                            attempts,
                            next,
                            err,
                            p.clock.now(),
                        )
                        .await
                }
                DeliveryOrigin::ActivityLogAlert => {
                    p.store
                        .alert_delivery_failed(&d.event_id, attempts, next, err, p.clock.now())
                        .await
                }
            }
        }
    };
    match outcome {
        Ok(()) if error.is_none() => {
            tracing::info!(origin = ?d.origin, owner = %d.vault, receiver = %d.subscription, id = %d.event_id, "delivered")
        }
        Ok(()) => {}
        Err(e) => tracing::error!(error = %e, "recording a delivery failed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        let c = DeliveryConfig::default();
        assert_eq!(c.backoff(1), Duration::from_secs(1));
        assert_eq!(c.backoff(2), Duration::from_secs(2));
        assert_eq!(c.backoff(4), Duration::from_secs(8));
        assert_eq!(c.backoff(7), Duration::from_secs(60));
        assert_eq!(c.backoff(40), Duration::from_secs(60));
    }
}
