//! Rotation policies, the rotation scheduler and events (`kagi_vault::Platform`) without HTTP:
//! a real SQLite store, the movable test clock of `kagi server --test-clock`, restarts by
//! dropping and reopening the platform, and a tiny local webhook receiver.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use kagi_core::key::KeyCreateParameters;
use kagi_core::rotation::RotationPolicyParameters;
use kagi_core::time::{DAY, TestClock};
use kagi_core::vault::VaultInput;
use kagi_vault::{BootstrapAdmin, DeliveryConfig, ListQuery, Platform, Principal};
use serde_json::{Value, json};

mod common;

use common::{open, receiver, sign_in, wait_for};

struct Env {
    dir: tempfile::TempDir,
    clock: Arc<TestClock>,
    p: Platform,
    creds: BootstrapAdmin,
    admin: Principal,
}

impl Env {
    async fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(TestClock::new());
        let (p, created) = open(dir.path(), &clock).await;
        let creds = created.unwrap();
        let admin = sign_in(&p, &creds).await;
        Self {
            dir,
            clock,
            p,
            creds,
            admin,
        }
    }

    /// Drops the platform and opens it again on the same data directory and clock.
    async fn restart(&mut self) {
        let (p, created) = open(self.dir.path(), &self.clock).await;
        assert!(created.is_none());
        self.p = p;
        self.admin = sign_in(&self.p, &self.creds).await;
    }

    async fn vault(&self, name: &str) {
        self.p
            .put_resource_group(
                &self.admin,
                &self.creds.subscription_id,
                "rg1",
                serde_json::from_value(json!({"location": "westeurope"})).unwrap(),
            )
            .await
            .unwrap();
        let input: VaultInput = serde_json::from_value(json!({"location": "westeurope",
            "properties": {"tenantId": self.creds.tenant_id, "sku": {"family": "A", "name": "standard"},
                           "softDeleteRetentionInDays": 7}}))
        .unwrap();
        self.p
            .put_vault(
                &self.admin,
                &self.creds.subscription_id,
                "rg1",
                name,
                input,
                false,
            )
            .await
            .unwrap();
    }

    async fn ec_key(&self, vault: &str, name: &str, attributes: Value) -> Value {
        let params: KeyCreateParameters =
            serde_json::from_value(json!({"kty": "EC", "crv": "P-256", "attributes": attributes}))
                .unwrap();
        self.p
            .create_key(&self.admin, vault, name, params)
            .await
            .unwrap()
    }

    async fn set_policy(&self, vault: &str, name: &str, body: Value) -> Result<Value, u16> {
        let params: RotationPolicyParameters = serde_json::from_value(body).unwrap();
        self.p
            .set_key_rotation_policy(&self.admin, vault, name, params)
            .await
            .map_err(|e| e.status())
    }

    fn versions(&self, vault: &str, name: &str) -> Vec<Value> {
        let q = ListQuery {
            maxresults: Some("25".into()),
            skiptoken: None,
            api_version: "7.5".into(),
        };
        let mut out: Vec<Value> = Vec::new();
        let mut query = q.clone();
        loop {
            let page = self
                .p
                .list_key_versions(&self.admin, vault, name, &query)
                .unwrap();
            out.extend(page["value"].as_array().unwrap().iter().cloned());
            match page["nextLink"].as_str() {
                Some(link) => {
                    let token = link
                        .split("$skiptoken=")
                        .nth(1)
                        .unwrap()
                        .split('&')
                        .next()
                        .unwrap();
                    query.skiptoken = Some(token.to_string());
                }
                None => break,
            }
        }
        out.sort_by_key(|v| v["attributes"]["created"].as_i64().unwrap());
        out
    }

    async fn day(&self) {
        self.p.advance_test_clock(&self.admin, DAY).await.unwrap();
    }
}

const ROTATE_30: &str = r#"{"lifetimeActions": [
    {"trigger": {"timeAfterCreate": "P30D"}, "action": {"type": "Rotate"}},
    {"trigger": {"timeBeforeExpiry": "P10D"}, "action": {"type": "Notify"}}],
    "attributes": {"expiryTime": "P90D"}}"#;

fn rotate_30() -> Value {
    serde_json::from_str(ROTATE_30).unwrap()
}

#[tokio::test]
async fn policy_get_set_and_bad_input() {
    let env = Env::new().await;
    env.vault("rv1").await;
    env.ec_key("rv1", "Cmk", json!({})).await;
    // No policy: Azure's default, a Notify 30 days before expiry.
    let d = env
        .p
        .get_key_rotation_policy(&env.admin, "rv1", "cmk")
        .await
        .unwrap();
    assert_eq!(
        d["id"],
        "https://rv1.localhost:8443/keys/Cmk/rotationpolicy"
    );
    assert_eq!(
        d["lifetimeActions"],
        json!([{"trigger": {"timeBeforeExpiry": "P30D"}, "action": {"type": "Notify"}}])
    );
    assert!(d["attributes"].get("expiryTime").is_none());

    let set = env.set_policy("rv1", "cmk", rotate_30()).await.unwrap();
    assert_eq!(set["attributes"]["expiryTime"], "P90D");
    let got = env
        .p
        .get_key_rotation_policy(&env.admin, "rv1", "cmk")
        .await
        .unwrap();
    assert_eq!(got, set);
    let created = got["attributes"]["created"].as_i64().unwrap();

    for bad in [
        json!({"attributes": {"expiryTime": "90 days"}}),
        json!({"attributes": {"expiryTime": "P7D"}}),
        json!({"lifetimeActions": [{"trigger": {"timeBeforeExpiry": "P30D"}, "action": {"type": "Rotate"}}]}),
        json!({"lifetimeActions": [{"trigger": {"timeAfterCreate": "P1D"}, "action": {"type": "Rotate"}}]}),
        json!({"lifetimeActions": [{"trigger": {"timeAfterCreate": "P30D"}, "action": {"type": "Delete"}}]}),
    ] {
        assert_eq!(env.set_policy("rv1", "cmk", bad).await.unwrap_err(), 400);
    }
    // Nothing was stored by the bad requests.
    let after = env
        .p
        .get_key_rotation_policy(&env.admin, "rv1", "cmk")
        .await
        .unwrap();
    assert_eq!(after, set);
    // Replacing keeps the creation time; an empty policy means the default actions.
    env.clock.advance(60);
    let empty = env
        .set_policy(
            "rv1",
            "cmk",
            json!({"lifetimeActions": [], "attributes": {}}),
        )
        .await
        .unwrap();
    assert_eq!(empty["attributes"]["created"].as_i64().unwrap(), created);
    assert!(empty["attributes"]["updated"].as_i64().unwrap() > created);
    assert_eq!(empty["lifetimeActions"][0]["action"]["type"], "Notify");
    // Unknown key: 404.
    assert_eq!(
        env.set_policy("rv1", "nokey", rotate_30())
            .await
            .unwrap_err(),
        404
    );

    // rotate applies expiryTime.
    env.set_policy("rv1", "cmk", rotate_30()).await.unwrap();
    let r = env.p.rotate_key(&env.admin, "rv1", "cmk").await.unwrap();
    let a = &r["attributes"];
    assert_eq!(
        a["exp"].as_i64().unwrap(),
        a["created"].as_i64().unwrap() + 90 * DAY
    );
}

async fn year_of_rotation(restart_at: Option<i64>) {
    let mut env = Env::new().await;
    env.vault("rv2").await;
    let first = env.ec_key("rv2", "cmk", json!({})).await;
    let t0 = first["attributes"]["created"].as_i64().unwrap();
    env.set_policy("rv2", "cmk", rotate_30()).await.unwrap();
    for day in 1..=365 {
        if Some(day) == restart_at {
            env.restart().await;
            // The server's first sweep at start-up: nothing is due, nothing happens.
            let r = env.p.run_scheduler().await.unwrap();
            assert_eq!(r.rotated, 0);
        }
        env.day().await;
        // A second sweep at the same instant never rotates again.
        assert_eq!(env.p.run_scheduler().await.unwrap().rotated, 0);
    }
    let versions = env.versions("rv2", "cmk");
    assert_eq!(versions.len(), 13, "the original and 12 rotations");
    for (k, v) in versions.iter().enumerate().skip(1) {
        let created = v["attributes"]["created"].as_i64().unwrap();
        let expected = t0 + k as i64 * 30 * DAY;
        // Real time passes while the test runs; the schedule is exact to the day.
        assert!(
            (expected..expected + 600).contains(&created),
            "rotation {k} at {created}, expected {expected}"
        );
        assert_eq!(v["attributes"]["exp"].as_i64().unwrap(), created + 90 * DAY);
    }
}

#[tokio::test]
async fn thirty_day_policy_rotates_twelve_times_in_a_year() {
    year_of_rotation(None).await;
}

#[tokio::test]
async fn thirty_day_policy_same_count_across_a_restart() {
    year_of_rotation(Some(180)).await;
}

#[tokio::test]
async fn downtime_catches_up_once() {
    let mut env = Env::new().await;
    env.vault("rv3").await;
    env.ec_key("rv3", "cmk", json!({})).await;
    env.set_policy("rv3", "cmk", rotate_30()).await.unwrap();
    // The server is down for 100 days (the clock moves, nothing runs), then starts again.
    env.clock.advance(100 * DAY);
    env.restart().await;
    let r = env.p.run_scheduler().await.unwrap();
    assert_eq!(
        r.rotated, 1,
        "one rotation however many periods were missed"
    );
    assert_eq!(env.p.run_scheduler().await.unwrap().rotated, 0);
    env.restart().await;
    assert_eq!(env.p.run_scheduler().await.unwrap().rotated, 0);
    assert_eq!(env.versions("rv3", "cmk").len(), 2);
    // The schedule restarts from the catch-up version: 30 days later, one more.
    for _ in 0..29 {
        env.day().await;
    }
    assert_eq!(env.versions("rv3", "cmk").len(), 2);
    env.day().await;
    assert_eq!(env.versions("rv3", "cmk").len(), 3);
}

// ----- events -----

fn types(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| e["eventType"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn events_for_versions_expiry_and_deletion_arrive_once() {
    let mut env = Env::new().await;
    env.vault("ev1").await;
    let (url, got) = receiver().await;
    let sub = env.creds.subscription_id.clone();
    let (status, s) = env
        .p
        .put_event_subscription(
            &env.admin,
            &sub,
            "rg1",
            "ev1",
            "hook1",
            json!({"properties": {"destination": {"endpointType": "WebHook",
                "properties": {"endpointUrl": format!("{url}?code=secret")}}}}),
        )
        .await
        .unwrap();
    assert_eq!(status, 201);
    assert_eq!(
        s["properties"]["destination"]["properties"]["endpointBaseUrl"],
        url.as_str()
    );
    // Bad input is 400 and stores nothing.
    for bad in [
        json!({"properties": {"destination": {"endpointType": "WebHook", "properties": {"endpointUrl": "ftp://x/"}}}}),
        json!({"properties": {"destination": {"endpointType": "WebHook", "properties": {"endpointUrl": url}},
               "filter": {"includedEventTypes": ["Microsoft.KeyVault.KeyExploded"]}}}),
        json!({"properties": {"destination": {"endpointType": "EventHub", "properties": {"endpointUrl": url}}}}),
    ] {
        let e = env
            .p
            .put_event_subscription(&env.admin, &sub, "rg1", "ev1", "bad1", bad)
            .await
            .unwrap_err();
        assert_eq!(e.status(), 400);
    }
    let list = env
        .p
        .list_event_subscriptions(&env.admin, &sub, "rg1", "ev1")
        .await
        .unwrap();
    assert_eq!(list["value"].as_array().unwrap().len(), 1);

    let worker = tokio::spawn(kagi_vault::run_event_delivery(
        Arc::new(open(env.dir.path(), &env.clock).await.0),
        DeliveryConfig::default(),
    ));
    // A key expiring in 40 days: created now; near expiry (default 30 days) on day 10.
    let now = env.p.now();
    let k = env
        .ec_key("ev1", "cmk", json!({"exp": now + 40 * DAY}))
        .await;
    let events = wait_for(&got, 1).await;
    assert_eq!(types(&events), ["Microsoft.KeyVault.KeyNewVersionCreated"]);
    let e = &events[0];
    assert_eq!(e["subject"], "cmk");
    assert_eq!(e["data"]["Id"], k["key"]["kid"]);
    assert_eq!(e["data"]["VaultName"], "ev1");
    assert_eq!(e["data"]["ObjectType"], "Key");
    assert_eq!(e["data"]["EXP"], (now + 40 * DAY).to_string());
    assert!(
        e["topic"]
            .as_str()
            .unwrap()
            .ends_with("/resourceGroups/rg1/providers/Microsoft.KeyVault/vaults/ev1")
    );
    for _ in 0..11 {
        env.day().await;
    }
    let events = wait_for(&got, 2).await;
    assert_eq!(types(&events)[1], "Microsoft.KeyVault.KeyNearExpiry");
    // A restart, and sweeps at the same time, emit nothing again.
    env.restart().await;
    env.p.run_scheduler().await.unwrap();
    env.p.run_scheduler().await.unwrap();
    for _ in 0..30 {
        env.day().await;
    }
    let events = wait_for(&got, 3).await;
    assert_eq!(types(&events)[2], "Microsoft.KeyVault.KeyExpired");
    env.p.delete_key(&env.admin, "ev1", "cmk").await.unwrap();
    let events = wait_for(&got, 4).await;
    assert_eq!(types(&events)[3], "Kagi.KeyVault.KeyDeleted");
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(
        got.lock().unwrap().len(),
        4,
        "{:?}",
        types(&got.lock().unwrap())
    );
    worker.abort();
}
