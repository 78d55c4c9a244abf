//! Creating a vault (issue 11, item 5): the vault is visible, and writable, only once the
//! store holds it. The store's commit is held back by a real SQLite write lock taken from
//! outside, and the vault is looked at meanwhile.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::Duration;

use kagi_testkit::{Options, TestServer};
use serde_json::json;
use sqlx::Connection;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vault_is_not_shown_before_its_commit() {
    let s = TestServer::start(Options {
        backup_service: None,
        ..Options::default()
    })
    .await;
    let sub = s.admin.subscription_id.clone();
    let (status, _) = s
        .arm(
            "PUT",
            &format!("/subscriptions/{sub}/resourcegroups/rg1"),
            Some(json!({"location": "westeurope"})),
        )
        .await;
    assert_eq!(status, 201);
    let vault = format!(
        "/subscriptions/{sub}/resourceGroups/rg1/providers/Microsoft.KeyVault/vaults/slowvault"
    );

    // Another writer holds SQLite's write lock: the create's commit waits for it.
    let db = s.dir().join("kagi.db");
    let mut blocker = sqlx::SqliteConnection::connect(&format!("sqlite://{}", db.display()))
        .await
        .unwrap();
    sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut blocker)
        .await
        .unwrap();

    let body = json!({"location": "westeurope", "properties": {
        "tenantId": s.admin.tenant_id, "sku": {"family": "A", "name": "standard"}}});
    let create = {
        let request = s
            .client()
            .put(s.mgmt_url(&format!("{vault}?api-version=2023-07-01")))
            .bearer_auth(&s.token)
            .json(&body);
        tokio::spawn(async move {
            let r = request.send().await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        })
    };
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(
        !create.is_finished(),
        "the create did not wait for the store"
    );

    let (status, v) = s.arm("GET", &vault, None).await;
    assert_eq!(status, 404, "the vault is shown before its commit: {v}");
    let (status, v) = s
        .data(
            "POST",
            "slowvault",
            "/keys/k/create",
            Some(json!({"kty": "RSA"})),
        )
        .await;
    assert_eq!(status, 404, "a key went into an uncommitted vault: {v}");
    // A second create of the name, in the same place with a valid body, is refused while the
    // first is under way (it would otherwise become an update of an uncommitted vault).
    let second = json!({"location": "westeurope", "properties": {
        "tenantId": s.admin.tenant_id, "sku": {"family": "A", "name": "standard"}}});
    let (status, v) = s.arm("PUT", &vault, Some(second)).await;
    assert_eq!(status, 409, "{v}");
    assert_eq!(v["error"]["code"], "VaultAlreadyExists", "{v}");

    sqlx::query("ROLLBACK").execute(&mut blocker).await.unwrap();
    let (status, v) = create.await.unwrap();
    assert_eq!(status, 201, "{v}");
    let (status, _) = s.arm("GET", &vault, None).await;
    assert_eq!(status, 200);
}
