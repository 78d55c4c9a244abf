//! Azure Monitor's action groups and activity log alerts (MISSION TD-5): their ARM resources
//! (`Microsoft.Insights/actionGroups`, `Microsoft.Insights/activityLogAlerts`), and the firing
//! of alerts when an activity-log entry is appended.
//!
//! Firing is part of the append: [`Platform::append_service_activity`] matches the entry
//! against the enabled alerts of its subscription (`kagi_core::alert`) and writes the entry and
//! one notification per webhook receiver of each enabled action group of each matching alert
//! in one store transaction. An entry the store holds therefore never lacks its notifications,
//! even across a crash; the event delivery worker (`events.rs`) delivers them at least once,
//! with the key vault's events: the same bounded attempts, back-off, concurrency limit and dead
//! letters.
//!
//! The bootstrap administrator only, like every other ARM resource of the platform; audited by
//! the HTTP layer like every ARM request.

use std::collections::HashMap;

use kagi_core::alert::{
    ActionGroup, ActivityEvent, ActivityLogAlert, Firing, MonitorKind, check_location, check_tags,
    common_alert_payload, legacy_alert_payload, validate_name,
};
use kagi_core::{ErrorCode, KvError};
use kagi_identity::Principal;
use kagi_store::{AlertNotification, MonitorRecord};
use serde_json::{Value, json};

use crate::events::new_event_id;
use crate::{Platform, internal};

fn store_type(kind: MonitorKind) -> String {
    kind.id_type().to_ascii_lowercase()
}

/// Where one action group or activity log alert is: its kind, subscription, resource group and
/// name, as the request's path gives them.
#[derive(Clone, Copy, Debug)]
pub struct MonitorRef<'a> {
    /// Action group or activity log alert.
    pub kind: MonitorKind,
    /// Subscription id.
    pub subscription: &'a str,
    /// Resource group name.
    pub resource_group: &'a str,
    /// Resource name.
    pub name: &'a str,
}

impl MonitorRef<'_> {
    /// Its ARM id, as the path spells it.
    fn id(&self) -> String {
        format!(
            "/subscriptions/{}/resourceGroups/{}/providers/{}/{}",
            self.subscription,
            self.resource_group,
            self.kind.id_type(),
            self.name
        )
    }

    /// 404 for it.
    fn not_found(&self) -> KvError {
        KvError::new(
            ErrorCode::ResourceNotFound,
            format!(
                "The Resource '{}/{}' under resource group '{}' was not found.",
                self.kind.id_type(),
                kagi_core::ids::printable(self.name),
                kagi_core::ids::printable(self.resource_group)
            ),
        )
    }
}

fn parse_body(r: &MonitorRecord) -> Result<Value, KvError> {
    serde_json::from_str(&r.body).map_err(|e| internal("monitor resource", e))
}

/// The `properties` of a body of `kind`, checked (for an alert, in `subscription`).
fn checked_properties(
    kind: MonitorKind,
    body: &Value,
    subscription: &str,
) -> Result<(Value, Vec<String>), KvError> {
    Ok(match kind {
        MonitorKind::ActionGroup => (ActionGroup::parse(body)?.properties_view(), Vec::new()),
        MonitorKind::ActivityLogAlert => {
            let a = ActivityLogAlert::parse(body, subscription)?;
            let groups = a
                .actions
                .iter()
                .map(|g| g.action_group_id.clone())
                .collect();
            (a.properties_view(), groups)
        }
    })
}

impl Platform {
    async fn monitor_record(&self, id: &str) -> Result<Option<MonitorRecord>, KvError> {
        self.store
            .get_monitor_resource(&id.to_ascii_lowercase())
            .await
            .map_err(|e| internal("read monitor resource", e))
    }

    /// Refuses an alert whose action groups do not exist (400 `ActionGroupNotFound`).
    async fn check_action_groups(&self, ids: &[String]) -> Result<(), KvError> {
        for id in ids {
            if self.monitor_record(id).await?.is_none() {
                return Err(KvError::new(
                    ErrorCode::BadRequest,
                    format!(
                        "The action group '{}' does not exist.",
                        kagi_core::ids::printable(id)
                    ),
                )
                .with_inner("ActionGroupNotFound"));
            }
        }
        Ok(())
    }

    /// Stores `view` (the whole resource) at `existing`'s place or as a new resource.
    async fn store_monitor(
        &self,
        kind: MonitorKind,
        sub: &str,
        rg: &str,
        existing: Option<&MonitorRecord>,
        view: &Value,
    ) -> Result<bool, KvError> {
        let now = self.clock.now();
        let id = view["id"].as_str().unwrap_or_default().to_ascii_lowercase();
        let record = MonitorRecord {
            id,
            resource_type: store_type(kind),
            subscription_id: sub.to_ascii_lowercase(),
            resource_group: rg.to_ascii_lowercase(),
            body: view.to_string(),
            created: existing.map_or(now, |r| r.created),
            updated: now,
        };
        self.store
            .put_monitor_resource(&record)
            .await
            .map_err(|e| internal("write monitor resource", e))
    }

    /// `PUT …/resourceGroups/{rg}/providers/Microsoft.Insights/{actionGroups|activityLogAlerts}/
    /// {name}`: creates (201) or replaces (200) the resource. A body that does not check is 400
    /// and nothing is stored; an alert's action groups must exist.
    pub async fn put_monitor_resource(
        &self,
        caller: &Principal,
        at: MonitorRef<'_>,
        body: Value,
    ) -> Result<(u16, Value), KvError> {
        let (sub, rg) = self
            .check_group(caller, at.subscription, at.resource_group)
            .await?;
        let at = MonitorRef {
            subscription: sub.as_str(),
            resource_group: rg.as_str(),
            ..at
        };
        let (kind, name) = (at.kind, at.name);
        validate_name(kind, name)?;
        let location = check_location(kind, &body)?;
        let tags = check_tags(kind, &body)?;
        let (properties, groups) = checked_properties(kind, &body, sub.as_str())?;
        self.check_action_groups(&groups).await?;
        let id = at.id();
        self.check_not_locked(&id, "write")?;
        let existing = self.monitor_record(&id).await?;
        // A resource keeps the id and name it was created with (ARM's names are
        // case-insensitive).
        let (id, name) = match existing.as_ref().map(parse_body).transpose()? {
            Some(old) => (
                old["id"].as_str().unwrap_or(&id).to_string(),
                old["name"].as_str().unwrap_or(name).to_string(),
            ),
            None => (id, name.to_string()),
        };
        let view = json!({"id": id, "name": name, "type": kind.view_type(), "location": location,
            "tags": tags, "properties": properties});
        let created = self
            .store_monitor(kind, sub.as_str(), rg.as_str(), existing.as_ref(), &view)
            .await?;
        tracing::info!(resource = %id, "{} saved", kind.noun());
        Ok((if created { 201 } else { 200 }, view))
    }

    /// `PATCH` of one: `tags` and `properties.enabled` (Azure's patch body for both types).
    pub async fn patch_monitor_resource(
        &self,
        caller: &Principal,
        at: MonitorRef<'_>,
        patch: Value,
    ) -> Result<Value, KvError> {
        let (sub, rg) = self
            .check_group(caller, at.subscription, at.resource_group)
            .await?;
        let kind = at.kind;
        let id = at.id();
        self.check_not_locked(&id, "write")?;
        let existing = self
            .monitor_record(&id)
            .await?
            .ok_or_else(|| at.not_found())?;
        let mut view = parse_body(&existing)?;
        if patch.get("tags").is_some_and(|t| !t.is_null()) {
            view["tags"] = check_tags(kind, &patch)?;
        }
        match patch.get("properties").and_then(|p| p.get("enabled")) {
            None | Some(Value::Null) => {}
            Some(Value::Bool(b)) => view["properties"]["enabled"] = json!(b),
            Some(_) => {
                return Err(KvError::new(
                    ErrorCode::BadRequest,
                    "'properties.enabled' must be true or false.",
                ));
            }
        }
        view["properties"] = checked_properties(kind, &view, sub.as_str())?.0;
        self.store_monitor(kind, sub.as_str(), rg.as_str(), Some(&existing), &view)
            .await?;
        tracing::info!(resource = %id, "{} updated", kind.noun());
        Ok(view)
    }

    /// `GET` of one.
    pub async fn get_monitor_resource(
        &self,
        caller: &Principal,
        at: MonitorRef<'_>,
    ) -> Result<Value, KvError> {
        self.require_admin(caller)?;
        match self.monitor_record(&at.id()).await? {
            Some(r) => parse_body(&r),
            None => Err(at.not_found()),
        }
    }

    /// `GET` of the resources of `kind` in a subscription (`rg: None`) or a resource group.
    pub async fn list_monitor_resources(
        &self,
        caller: &Principal,
        kind: MonitorKind,
        sub: &str,
        rg: Option<&str>,
    ) -> Result<Value, KvError> {
        let (sub, rg) = match rg {
            Some(rg) => {
                let (s, g) = self.check_group(caller, sub, rg).await?;
                (s, Some(g.as_str().to_ascii_lowercase()))
            }
            None => (self.authorize_arm(caller, sub).await?, None),
        };
        let value = self
            .store
            .list_monitor_resources(&store_type(kind), Some(&sub.as_str().to_ascii_lowercase()))
            .await
            .map_err(|e| internal("list monitor resources", e))?
            .iter()
            .filter(|r| rg.as_ref().is_none_or(|g| &r.resource_group == g))
            .map(parse_body)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(json!({ "value": value }))
    }

    /// `DELETE` of one: 200, or 204 when there was none. An action group's pending
    /// notifications and dead letters go with it; alerts that name it stay (they notify it no
    /// more).
    pub async fn delete_monitor_resource(
        &self,
        caller: &Principal,
        at: MonitorRef<'_>,
    ) -> Result<u16, KvError> {
        self.require_admin(caller)?;
        let (kind, id) = (at.kind, at.id());
        if self.monitor_record(&id).await?.is_none() {
            return Ok(204);
        }
        self.check_not_locked(&id, "delete")?;
        let existed = self
            .store
            .delete_monitor_resource(&id.to_ascii_lowercase())
            .await
            .map_err(|e| internal("delete monitor resource", e))?;
        if existed {
            tracing::info!(resource = %id, "{} deleted", kind.noun());
        }
        Ok(if existed { 200 } else { 204 })
    }

    /// `GET …/actionGroups/{name}/deadLetters` (kagi extension): notifications that gave up,
    /// with the payload, the attempts made and the last error.
    pub async fn list_alert_dead_letters(
        &self,
        caller: &Principal,
        at: MonitorRef<'_>,
    ) -> Result<Value, KvError> {
        let at = MonitorRef {
            kind: MonitorKind::ActionGroup,
            ..at
        };
        self.get_monitor_resource(caller, at).await?;
        let id = at.id().to_ascii_lowercase();
        let dead = self
            .store
            .alert_dead_letters(&id)
            .await
            .map_err(|e| internal("alert dead letters", e))?;
        Ok(json!({
            "value": dead.iter().map(|d| json!({
                "id": d.id,
                "alertRuleId": d.alert,
                "receiver": d.receiver,
                "attempts": d.attempts,
                "lastError": d.last_error,
                "deadLetteredAt": kagi_core::time::rfc3339(d.dead_lettered_at),
                "payload": serde_json::from_str::<Value>(&d.body).unwrap_or(Value::Null),
            })).collect::<Vec<_>>(),
        }))
    }

    /// The notifications an activity entry fires: for every enabled alert of the entry's
    /// subscription that matches it, one per webhook receiver of each of its enabled action
    /// groups. A stored resource that no longer reads (written by another kagi) is skipped
    /// and logged, never a reason to lose the entry.
    pub(crate) async fn alert_notifications(
        &self,
        log_resource_id: &str,
        entry: &Value,
        now: i64,
    ) -> Result<Vec<AlertNotification>, KvError> {
        let event = ActivityEvent::from_entry(log_resource_id, entry, now);
        let sub = event.subscription_id.to_ascii_lowercase();
        if sub.is_empty() {
            return Ok(Vec::new());
        }
        let alerts = self
            .store
            .list_monitor_resources(&store_type(MonitorKind::ActivityLogAlert), Some(&sub))
            .await
            .map_err(|e| internal("list activity log alerts", e))?;
        let mut out = Vec::new();
        if alerts.is_empty() {
            return Ok(out);
        }
        let event_data_id = new_event_id()?;
        let mut groups: HashMap<String, Option<ActionGroup>> = HashMap::new();
        for rec in &alerts {
            let parsed = serde_json::from_str::<Value>(&rec.body).ok().and_then(|b| {
                ActivityLogAlert::parse(&b, &rec.subscription_id)
                    .ok()
                    .map(|a| (b, a))
            });
            let Some((body, alert)) = parsed else {
                tracing::error!(alert = %rec.id, "stored activity log alert does not read; skipped");
                continue;
            };
            if !alert.matches(&event) {
                continue;
            }
            let instance_id = new_event_id()?;
            let mut receivers = 0;
            for action in &alert.actions {
                let key = action.action_group_id.to_ascii_lowercase();
                if !groups.contains_key(&key) {
                    let group = match self.monitor_record(&key).await? {
                        Some(r) => parse_body(&r)
                            .ok()
                            .and_then(|b| ActionGroup::parse(&b).ok()),
                        None => None,
                    };
                    groups.insert(key.clone(), group);
                }
                let Some(group) = groups.get(&key).and_then(Option::as_ref) else {
                    continue;
                };
                if !group.enabled {
                    continue;
                }
                let firing = Firing {
                    alert_rule_id: body["id"].as_str().unwrap_or(&rec.id),
                    alert_rule: body["name"].as_str().unwrap_or_default(),
                    description: alert.description.as_deref(),
                    instance_id: &instance_id,
                    event_data_id: &event_data_id,
                    fired_at: now,
                    webhook_properties: &action.webhook_properties,
                };
                let common = common_alert_payload(&firing, &event).to_string();
                let legacy = legacy_alert_payload(&firing, &event).to_string();
                for w in &group.webhooks {
                    out.push(AlertNotification {
                        id: new_event_id()?,
                        alert: rec.id.clone(),
                        action_group: key.clone(),
                        receiver: w.name.clone(),
                        endpoint_url: w.service_uri.clone(),
                        body: if w.use_common_alert_schema {
                            common.clone()
                        } else {
                            legacy.clone()
                        },
                    });
                    receivers += 1;
                }
            }
            tracing::info!(alert = %rec.id, resource = %event.resource_id,
                operation = %event.operation_name, receivers, "activity log alert fired");
        }
        Ok(out)
    }
}
