//! Action groups, activity log alerts and their notifications on a real SQLite file: the
//! notifications are written with the activity entry that fired them, go with their action
//! group, retry, dead-letter, and survive a reopen.

#![allow(clippy::unwrap_used)]

use kagi_store::events::DeliveryOrigin;
use kagi_store::{AlertNotification, AlertStore, MonitorRecord, SqlStore, Store};

const AG: &str =
    "/subscriptions/s1/resourcegroups/rg1/providers/microsoft.insights/actiongroups/ag1";
const ALERT: &str =
    "/subscriptions/s1/resourcegroups/rg1/providers/microsoft.insights/activitylogalerts/a1";
const SERVER: &str = "/subscriptions/s1/resourcegroups/rg1/providers/microsoft.sql/servers/s1";

fn record(id: &str, resource_type: &str, body: &str, t: i64) -> MonitorRecord {
    MonitorRecord {
        id: id.into(),
        resource_type: resource_type.into(),
        subscription_id: "s1".into(),
        resource_group: "rg1".into(),
        body: body.into(),
        created: t,
        updated: t,
    }
}

fn note(id: &str, receiver: &str) -> AlertNotification {
    AlertNotification {
        id: id.into(),
        alert: ALERT.into(),
        action_group: AG.into(),
        receiver: receiver.into(),
        endpoint_url: "http://127.0.0.1:9/hook".into(),
        body: format!(r#"{{"n":"{id}"}}"#),
    }
}

#[tokio::test]
async fn resources_are_put_listed_and_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let s = SqlStore::open_sqlite(&dir.path().join("kagi.db"))
        .await
        .unwrap();
    let ty = "microsoft.insights/actiongroups";
    assert!(
        s.put_monitor_resource(&record(AG, ty, "{}", 1))
            .await
            .unwrap()
    );
    assert!(
        !s.put_monitor_resource(&record(AG, ty, r#"{"v":2}"#, 2))
            .await
            .unwrap()
    );
    let got = s.get_monitor_resource(AG).await.unwrap().unwrap();
    assert_eq!(
        (got.body.as_str(), got.created, got.updated),
        (r#"{"v":2}"#, 1, 2)
    );
    let mut other = record(&AG.replace("s1", "s2"), ty, "{}", 1);
    other.subscription_id = "s2".into();
    s.put_monitor_resource(&other).await.unwrap();
    assert_eq!(s.list_monitor_resources(ty, None).await.unwrap().len(), 2);
    assert_eq!(
        s.list_monitor_resources(ty, Some("s1"))
            .await
            .unwrap()
            .len(),
        1
    );
    assert!(
        s.list_monitor_resources("microsoft.insights/activitylogalerts", None)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(s.delete_monitor_resource(AG).await.unwrap());
    assert!(!s.delete_monitor_resource(AG).await.unwrap());
    assert!(s.get_monitor_resource(AG).await.unwrap().is_none());
}

#[tokio::test]
async fn notifications_come_with_their_entry_retry_dead_letter_and_go_with_their_group() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kagi.db");
    {
        let s = SqlStore::open_sqlite(&path).await.unwrap();
        s.put_monitor_resource(&record(AG, "microsoft.insights/actiongroups", "{}", 1))
            .await
            .unwrap();
        // The entry and its notifications, numbered with the log's other entries.
        assert_eq!(
            s.append_service_activity(SERVER, 1, r#""first""#)
                .await
                .unwrap(),
            1
        );
        let seq = s
            .append_activity_with_alerts(
                SERVER,
                2,
                r#""fired""#,
                &[note("n1", "a"), note("n2", "b")],
            )
            .await
            .unwrap();
        assert_eq!(seq, 2);
        // A notification of a group deleted meanwhile is left out; the entry is kept.
        let mut gone = note("n3", "a");
        gone.action_group = AG.replace("ag1", "gone");
        assert_eq!(
            s.append_activity_with_alerts(SERVER, 3, r#""again""#, &[gone])
                .await
                .unwrap(),
            3
        );
    }
    let s = SqlStore::open_sqlite(&path).await.unwrap();
    assert_eq!(s.list_service_activity(SERVER).await.unwrap().len(), 3);
    let due = s.due_alert_deliveries(0, 10).await.unwrap();
    let ids: Vec<&str> = due.iter().map(|d| d.event_id.as_str()).collect();
    assert_eq!(ids, ["n1", "n2"]);
    assert!(
        due.iter()
            .all(|d| d.origin == DeliveryOrigin::ActivityLogAlert
                && d.vault == AG
                && d.attempts == 0
                && d.endpoint_url == "http://127.0.0.1:9/hook")
    );
    assert_eq!(due[0].body, r#"{"n":"n1"}"#);
    assert_eq!(s.next_alert_delivery_ms().await.unwrap(), Some(0));

    s.alert_delivery_succeeded("n1").await.unwrap();
    s.alert_delivery_failed("n2", 1, Some(5_000), "HTTP 500", 3)
        .await
        .unwrap();
    assert!(s.due_alert_deliveries(4_999, 10).await.unwrap().is_empty());
    let again = s.due_alert_deliveries(5_000, 10).await.unwrap();
    assert_eq!((again.len(), again[0].attempts), (1, 1));
    s.alert_delivery_failed("n2", 2, None, "HTTP 500", 4)
        .await
        .unwrap();
    assert!(
        s.due_alert_deliveries(i64::MAX, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(s.next_alert_delivery_ms().await.unwrap(), None);
    let dead = s.alert_dead_letters(AG).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(
        (
            dead[0].id.as_str(),
            dead[0].receiver.as_str(),
            dead[0].attempts,
            dead[0].dead_lettered_at
        ),
        ("n2", "b", 2, 4)
    );
    assert_eq!(dead[0].last_error.as_deref(), Some("HTTP 500"));
    // The key vault's outbox is apart: its worker query sees none of these.
    assert!(s.due_deliveries(i64::MAX, 10).await.unwrap().is_empty());

    s.append_activity_with_alerts(SERVER, 5, r#""pending""#, &[note("n4", "a")])
        .await
        .unwrap();
    assert!(s.delete_monitor_resource(AG).await.unwrap());
    assert!(
        s.due_alert_deliveries(i64::MAX, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(s.alert_dead_letters(AG).await.unwrap().is_empty());
}
