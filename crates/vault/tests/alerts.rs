//! Action groups and activity log alerts (`kagi_vault::Platform`) without HTTP: their ARM
//! resources and checks, and the notifications that activity entries fire, delivered by the
//! event delivery worker to a local webhook receiver — also when the platform restarts between
//! the entry and the delivery.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use kagi_core::alert::MonitorKind::{self, ActionGroup, ActivityLogAlert};
use kagi_core::time::TestClock;
use kagi_vault::{BootstrapAdmin, DeliveryConfig, MonitorRef, Platform, Principal};
use serde_json::{Value, json};

mod common;

use common::{open, receiver, sign_in, wait_for};

struct Env {
    dir: tempfile::TempDir,
    clock: Arc<TestClock>,
    p: Arc<Platform>,
    creds: BootstrapAdmin,
    admin: Principal,
    worker: Option<tokio::task::JoinHandle<()>>,
}

impl Env {
    async fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(TestClock::new());
        let (p, created) = open(dir.path(), &clock).await;
        let creds = created.unwrap();
        let admin = sign_in(&p, &creds).await;
        let env = Self {
            dir,
            clock,
            p: Arc::new(p),
            creds,
            admin,
            worker: None,
        };
        for rg in ["rg1", "rg2"] {
            env.p
                .put_resource_group(
                    &env.admin,
                    &env.creds.subscription_id,
                    rg,
                    serde_json::from_value(json!({"location": "westeurope"})).unwrap(),
                )
                .await
                .unwrap();
        }
        env
    }

    fn start_worker(&mut self) {
        self.worker = Some(tokio::spawn(kagi_vault::run_event_delivery(
            self.p.clone(),
            DeliveryConfig::default(),
        )));
    }

    fn stop_worker(&mut self) {
        if let Some(w) = self.worker.take() {
            w.abort();
        }
    }

    /// Drops the platform (and its worker) and opens it again on the same data directory.
    async fn restart(&mut self) {
        self.stop_worker();
        let (p, created) = open(self.dir.path(), &self.clock).await;
        assert!(created.is_none());
        self.p = Arc::new(p);
        self.admin = sign_in(&self.p, &self.creds).await;
    }

    fn sub(&self) -> &str {
        &self.creds.subscription_id
    }

    fn rg_id(&self, rg: &str) -> String {
        format!("/subscriptions/{}/resourceGroups/{rg}", self.sub())
    }

    fn server(&self, rg: &str) -> String {
        format!("{}/providers/Microsoft.Sql/servers/s1", self.rg_id(rg))
    }

    fn ag_id(&self, name: &str) -> String {
        format!(
            "{}/providers/Microsoft.Insights/actionGroups/{name}",
            self.rg_id("rg1")
        )
    }

    fn at<'a>(&'a self, kind: MonitorKind, rg: &'a str, name: &'a str) -> MonitorRef<'a> {
        MonitorRef {
            kind,
            subscription: self.sub(),
            resource_group: rg,
            name,
        }
    }

    async fn put(
        &self,
        kind: MonitorKind,
        rg: &str,
        name: &str,
        body: Value,
    ) -> Result<(u16, Value), (u16, Option<&'static str>)> {
        self.p
            .put_monitor_resource(&self.admin, self.at(kind, rg, name), body)
            .await
            .map_err(|e| (e.status(), e.inner))
    }

    /// An alert in rg1 on the two database operations, scoped to `scope_rg`.
    async fn put_alert(&self, name: &str, scope_rg: &str, enabled: bool) {
        let body = self.alert_body(&self.rg_id(scope_rg), enabled);
        self.put(ActivityLogAlert, "rg1", name, body).await.unwrap();
    }

    async fn patch(&self, kind: MonitorKind, rg: &str, name: &str, patch: Value) -> Value {
        self.p
            .patch_monitor_resource(&self.admin, self.at(kind, rg, name), patch)
            .await
            .unwrap()
    }

    async fn delete(&self, kind: MonitorKind, rg: &str, name: &str) -> u16 {
        self.p
            .delete_monitor_resource(&self.admin, self.at(kind, rg, name))
            .await
            .unwrap()
    }

    fn alert_body(&self, scope: &str, enabled: bool) -> Value {
        json!({"location": "Global", "properties": {
            "scopes": [scope],
            "condition": {"allOf": [
                {"field": "category", "equals": "Administrative"},
                {"anyOf": [{"field": "operationName", "equals": "MakeDatabaseInaccessible"},
                           {"field": "operationName", "equals": "MakeDatabaseAccessible"}]}]},
            "actions": {"actionGroups": [{"actionGroupId": self.ag_id("ag1"),
                                          "webhookProperties": {"runbook": "tde"}}]},
            "enabled": enabled, "description": "database inaccessible or back"}})
    }

    /// What the SQL service appends when a database goes (or comes back).
    async fn db_entry(&self, rg: &str, op: &str) {
        let server = self.server(rg);
        let entry = json!({"operationName": op, "status": "Succeeded",
            "eventTimestamp": "2026-12-05T10:00:00Z",
            "resourceId": format!("{server}/databases/orders"),
            "message": "Database 'orders' is inaccessible: KeyDisabled"});
        self.p
            .append_service_activity(&server, &entry)
            .await
            .unwrap();
    }
}

fn schemas(got: &[Value]) -> Vec<String> {
    let mut s: Vec<String> = got
        .iter()
        .map(|v| v["schemaId"].as_str().unwrap().to_string())
        .collect();
    s.sort();
    s
}

#[tokio::test]
async fn resources_are_checked_stored_and_served() {
    let env = Env::new().await;
    let (url, _) = receiver().await;
    let ag = json!({"location": "Global", "properties": {"groupShortName": "dba", "enabled": true,
        "webhookReceivers": [{"name": "hook", "serviceUri": url, "useCommonAlertSchema": true}]}});
    let (status, view) = env
        .put(ActionGroup, "rg1", "ag1", ag.clone())
        .await
        .unwrap();
    assert_eq!(status, 201);
    assert_eq!(view["id"], env.ag_id("ag1"));
    assert_eq!(view["type"], "Microsoft.Insights/ActionGroups");
    assert_eq!(view["location"], "Global");
    assert_eq!(view["properties"]["emailReceivers"], json!([]));
    // Names are case-insensitive; the first spelling stays.
    let (status, view) = env
        .put(ActionGroup, "rg1", "AG1", ag.clone())
        .await
        .unwrap();
    assert_eq!((status, view["name"].as_str()), (200, Some("ag1")));

    let bad_groups = [
        (
            json!({"location": "westeurope", "properties": {"groupShortName": "x"}}),
            Some("LocationNotAvailableForResourceType"),
        ),
        (
            json!({"location": "Global", "properties": {"groupShortName": "much-too-long"}}),
            Some("InvalidActionGroup"),
        ),
        (
            json!({"location": "Global", "properties": {"groupShortName": "x",
            "webhookReceivers": [{"name": "h", "serviceUri": "file:///etc/passwd"}]}}),
            Some("InvalidServiceUri"),
        ),
        (
            json!({"location": "Global", "properties": {"groupShortName": "x",
            "smsReceivers": [{"name": "s", "countryCode": "1", "phoneNumber": "5555555555"}]}}),
            Some("ReceiverTypeNotSupported"),
        ),
    ];
    for (body, inner) in bad_groups {
        assert_eq!(
            env.put(ActionGroup, "rg1", "bad", body.clone())
                .await
                .unwrap_err(),
            (400, inner),
            "{body}"
        );
    }
    assert_eq!(
        env.put(ActionGroup, "nope", "ag", ag.clone())
            .await
            .unwrap_err()
            .0,
        404
    );
    assert_eq!(
        env.put(ActionGroup, "rg1", "a/b", ag).await.unwrap_err().0,
        400
    );

    let (status, alert) = env
        .put(
            ActivityLogAlert,
            "rg1",
            "a1",
            env.alert_body(&env.rg_id("rg1"), true),
        )
        .await
        .unwrap();
    assert_eq!(status, 201);
    assert_eq!(alert["type"], "Microsoft.Insights/ActivityLogAlerts");
    assert_eq!(
        alert["properties"]["actions"]["actionGroups"][0]["webhookProperties"]["runbook"],
        "tde"
    );
    let mut missing = env.alert_body(&env.rg_id("rg1"), true);
    missing["properties"]["actions"]["actionGroups"][0]["actionGroupId"] = json!(env.ag_id("none"));
    assert_eq!(
        env.put(ActivityLogAlert, "rg1", "a2", missing)
            .await
            .unwrap_err(),
        (400, Some("ActionGroupNotFound"))
    );
    let mut other = env.alert_body(&env.rg_id("rg1"), true);
    other["properties"]["scopes"] = json!(["/subscriptions/00000000-0000-4000-8000-00000000abcd"]);
    assert_eq!(
        env.put(ActivityLogAlert, "rg1", "a2", other)
            .await
            .unwrap_err(),
        (400, Some("InvalidActivityLogAlert"))
    );

    // Read, list, patch, delete.
    let got = env
        .p
        .get_monitor_resource(&env.admin, env.at(ActivityLogAlert, "RG1", "A1"))
        .await
        .unwrap();
    assert_eq!(got, alert);
    env.put(
        ActivityLogAlert,
        "rg2",
        "a3",
        env.alert_body(&env.rg_id("rg2"), false),
    )
    .await
    .unwrap();
    let count = |v: Value| v["value"].as_array().unwrap().len();
    let in_rg1 = env
        .p
        .list_monitor_resources(&env.admin, ActivityLogAlert, env.sub(), Some("rg1"))
        .await
        .unwrap();
    let in_sub = env
        .p
        .list_monitor_resources(&env.admin, ActivityLogAlert, env.sub(), None)
        .await
        .unwrap();
    assert_eq!((count(in_rg1), count(in_sub)), (1, 2));
    let patched = env
        .patch(
            ActivityLogAlert,
            "rg2",
            "a3",
            json!({"tags": {"env": "prod"}, "properties": {"enabled": true}}),
        )
        .await;
    assert_eq!(
        (
            patched["tags"]["env"].as_str(),
            patched["properties"]["enabled"].as_bool()
        ),
        (Some("prod"), Some(true))
    );
    assert_eq!(patched["properties"]["scopes"], json!([env.rg_id("rg2")]));
    assert_eq!(env.delete(ActivityLogAlert, "rg2", "a3").await, 200);
    assert_eq!(env.delete(ActivityLogAlert, "rg2", "a3").await, 204);
    let e = env
        .p
        .get_monitor_resource(&env.admin, env.at(ActivityLogAlert, "rg2", "a3"))
        .await
        .unwrap_err();
    assert_eq!(e.status(), 404);
}

#[tokio::test]
async fn matching_entries_notify_each_receiver_in_its_schema_once() {
    let mut env = Env::new().await;
    let (url, got) = receiver().await;
    env.put(ActionGroup, "rg1", "ag1", json!({"location": "Global", "properties": {
        "groupShortName": "dba",
        "webhookReceivers": [
            {"name": "common", "serviceUri": format!("{url}?code=common"), "useCommonAlertSchema": true},
            {"name": "legacy", "serviceUri": format!("{url}?code=legacy")}]}}))
        .await
        .unwrap();
    env.put_alert("a1", "rg1", true).await;
    // Scoped elsewhere, or disabled: never fire here.
    env.put_alert("elsewhere", "rg2", true).await;
    env.put_alert("off", "rg1", false).await;
    env.start_worker();

    env.db_entry("rg1", "MakeDatabaseInaccessible").await;
    let n = wait_for(&got, 2).await;
    assert_eq!(
        schemas(&n),
        [
            "Microsoft.Insights/activityLogs",
            "azureMonitorCommonAlertSchema"
        ]
    );
    let db = format!("{}/databases/orders", env.server("rg1"));
    let common = n
        .iter()
        .find(|v| v["schemaId"] == "azureMonitorCommonAlertSchema")
        .unwrap();
    let ess = &common["data"]["essentials"];
    assert_eq!(ess["alertRule"], "a1");
    assert_eq!(ess["alertTargetIDs"], json!([db]));
    assert_eq!(ess["monitoringService"], "Activity Log - Administrative");
    assert_eq!(ess["description"], "database inaccessible or back");
    assert_eq!(
        common["data"]["alertContext"]["operationName"],
        "MakeDatabaseInaccessible"
    );
    assert_eq!(common["data"]["customProperties"]["runbook"], "tde");
    let legacy = n
        .iter()
        .find(|v| v["schemaId"] == "Microsoft.Insights/activityLogs")
        .unwrap();
    assert_eq!(legacy["data"]["context"]["activityLog"]["resourceId"], db);
    assert_eq!(legacy["data"]["status"], "Activated");
    // One firing: the same event data id in both.
    assert_eq!(
        common["data"]["alertContext"]["eventDataId"],
        legacy["data"]["context"]["activityLog"]["eventDataId"]
    );
    // The webhook URL (with its secret) is in no payload.
    assert!(n.iter().all(|v| !v.to_string().contains("code=")));

    // Other operations, other groups: nothing.
    env.db_entry("rg1", "Microsoft.Sql/servers/databases/write")
        .await;
    env.db_entry("rg2", "Microsoft.Sql/servers/databases/write")
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(got.lock().unwrap().len(), 2);

    // An entry appended while nothing delivers, then a restart: delivered after it.
    env.stop_worker();
    env.db_entry("rg1", "MakeDatabaseAccessible").await;
    env.restart().await;
    env.start_worker();
    let n = wait_for(&got, 4).await;
    assert_eq!(n.len(), 4);
    assert!(n[2..].iter().all(|v| {
        v["data"]["alertContext"]["operationName"] == "MakeDatabaseAccessible"
            || v["data"]["context"]["activityLog"]["operationName"] == "MakeDatabaseAccessible"
    }));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(got.lock().unwrap().len(), 4, "delivered twice");

    // A disabled action group receives nothing; a deleted one neither.
    env.patch(
        ActionGroup,
        "rg1",
        "ag1",
        json!({"properties": {"enabled": false}}),
    )
    .await;
    env.db_entry("rg1", "MakeDatabaseInaccessible").await;
    assert_eq!(env.delete(ActionGroup, "rg1", "ag1").await, 200);
    env.db_entry("rg1", "MakeDatabaseAccessible").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(got.lock().unwrap().len(), 4);
    // The activity log itself has every entry.
    assert_eq!(
        env.p
            .service_activity(&env.server("rg1"))
            .await
            .unwrap()
            .len(),
        5
    );
    env.stop_worker();
}

#[tokio::test]
async fn an_unreachable_receiver_is_retried_then_dead_lettered() {
    let mut env = Env::new().await;
    // A port nothing listens on.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = format!("http://{}/hook", listener.local_addr().unwrap());
    drop(listener);
    env.put(
        ActionGroup,
        "rg1",
        "ag1",
        json!({"location": "Global", "properties": {
        "groupShortName": "dba", "webhookReceivers": [{"name": "down", "serviceUri": dead}]}}),
    )
    .await
    .unwrap();
    env.put_alert("a1", "rg1", true).await;
    env.worker = Some(tokio::spawn(kagi_vault::run_event_delivery(
        env.p.clone(),
        DeliveryConfig {
            max_attempts: 3,
            retry_base: Duration::from_millis(20),
            retry_max: Duration::from_millis(40),
            ..DeliveryConfig::default()
        },
    )));
    env.db_entry("rg1", "MakeDatabaseInaccessible").await;
    let mut letters = Value::Null;
    for _ in 0..200 {
        letters = env
            .p
            .list_alert_dead_letters(&env.admin, env.at(ActionGroup, "rg1", "ag1"))
            .await
            .unwrap();
        if !letters["value"].as_array().unwrap().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let d = &letters["value"][0];
    assert_eq!(
        (d["attempts"].as_u64(), d["receiver"].as_str()),
        (Some(3), Some("down"))
    );
    assert_eq!(d["payload"]["schemaId"], "Microsoft.Insights/activityLogs");
    env.stop_worker();
}
