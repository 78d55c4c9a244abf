//! The SQL service on a real platform, without a PostgreSQL client: a server and a database
//! created over its ARM handler, opened through its gateway as a session would be, its
//! protector moved to a key in a real key vault, and the key disabled: the keeper's pass makes
//! the database Inaccessible (sessions cut, connections refused), and the key back brings it
//! online with its rows.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::Arc;
use std::time::Duration;

use kagi_pgsql::Gateway;
use kagi_sql_service::{SqlConfig, SqlGateway, SqlService};
use kagi_testkit::{Options, TestServer};
use serde_json::{Value, json};

async fn call(
    svc: &Arc<SqlService>,
    s: &TestServer,
    method: &str,
    path: &str,
    body: Value,
) -> (u16, Value) {
    s.provider_call(svc.clone(), method, path, body).await
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_follows_its_protector_through_revocation_and_back() {
    let s = TestServer::start(Options::default()).await;
    let sub = s.admin.subscription_id.clone();
    let group = format!("/subscriptions/{sub}/resourceGroups/rg1");
    let (st, v) = s
        .arm("PUT", &group, Some(json!({"location": "westeurope"})))
        .await;
    assert_eq!(st, 201, "{v}");
    // Definite failures make databases Inaccessible at the keeper's first pass that sees one.
    let config = SqlConfig {
        inaccessible_after: Duration::ZERO,
        key_poll_interval: Duration::ZERO,
        ..SqlConfig::default()
    };
    let svc = SqlService::new(s.platform.clone(), config).unwrap();
    let gateway = SqlGateway(svc.clone());

    let server = format!("{group}/providers/Microsoft.Sql/servers/sql1");
    let body = json!({"location": "westeurope", "identity": {"type": "SystemAssigned"},
        "properties": {"administratorLogin": "kagiadmin", "administratorLoginPassword": "Str0ng!Passw0rd"}});
    let (st, v) = call(&svc, &s, "PUT", &server, body).await;
    assert!(st == 200 || st == 201, "{v}");
    let principal = v["identity"]["principalId"].as_str().unwrap().to_string();
    assert!(v["properties"].get("administratorLoginPassword").is_none());
    let (st, v) = call(
        &svc,
        &s,
        "PUT",
        &format!("{server}/databases/app"),
        json!({"location": "westeurope"}),
    )
    .await;
    assert_eq!(st, 201, "{v}");
    let database_id = v["properties"]["databaseId"].as_str().unwrap().to_string();
    assert_eq!(
        gateway.server_for_host("sql1.localhost").as_deref(),
        Some("sql1")
    );

    // A session's connection: rows in, and none of them on disk in plaintext.
    let open = gateway.open("sql1", "app", "kagiadmin").await.unwrap();
    open.connection
        .execute_batch("CREATE TABLE t (v TEXT); INSERT INTO t VALUES ('KAGI-SQL-MARKER-1');")
        .unwrap();
    drop(open);
    let file = s.dir().join("sql").join(format!("{database_id}.db"));
    for f in [file.clone(), file.with_extension("db-wal")] {
        if let Ok(bytes) = std::fs::read(&f) {
            assert!(!contains(&bytes, b"KAGI-SQL-MARKER-1"), "{}", f.display());
        }
    }

    // The protector moves to a key in a key vault the server's identity may use.
    let kv = format!("{group}/providers/Microsoft.KeyVault/vaults/kvs");
    let policies = json!([{"tenantId": s.admin.tenant_id, "objectId": principal,
        "permissions": {"keys": ["get", "list", "wrapKey", "unwrapKey"]}}]);
    let vault = json!({"location": "westeurope", "properties": {
        "tenantId": s.admin.tenant_id, "sku": {"family": "A", "name": "standard"},
        "enablePurgeProtection": true, "softDeleteRetentionInDays": 7, "accessPolicies": policies}});
    let (st, v) = s.arm("PUT", &kv, Some(vault)).await;
    assert_eq!(st, 201, "{v}");
    let (st, key) = s
        .data(
            "POST",
            "kvs",
            "/keys/tde/create",
            Some(json!({"kty": "RSA", "key_size": 2048})),
        )
        .await;
    assert_eq!(st, 200, "{key}");
    let kid = key["key"]["kid"].as_str().unwrap().to_string();
    let version = kid.rsplit('/').next().unwrap().to_string();
    let name = format!("kvs_tde_{version}");
    let (st, v) = call(
        &svc,
        &s,
        "PUT",
        &format!("{server}/keys/{name}"),
        json!({"properties": {"serverKeyType": "AzureKeyVault", "uri": kid}}),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    let (st, v) = call(
        &svc,
        &s,
        "PUT",
        &format!("{server}/encryptionProtector/current"),
        json!({"properties": {"serverKeyType": "AzureKeyVault", "serverKeyName": name}}),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["properties"]["uri"], kid.as_str());

    // The key disabled: one pass makes the database Inaccessible.
    let off = json!({"attributes": {"enabled": false}});
    let (st, v) = s
        .data("PATCH", "kvs", &format!("/keys/tde/{version}"), Some(off))
        .await;
    assert_eq!(st, 200, "{v}");
    let report = svc.sweep().await.unwrap();
    assert_eq!(report.made_inaccessible, 1, "{report:?}");
    let (_, v) = call(
        &svc,
        &s,
        "GET",
        &format!("{server}/databases/app"),
        json!({}),
    )
    .await;
    assert_eq!(v["properties"]["status"], "Inaccessible", "{v}");
    let refused = gateway
        .open("sql1", "app", "kagiadmin")
        .await
        .err()
        .unwrap();
    assert_eq!(refused.code(), "57P03");
    assert!(
        refused.message().contains("is not currently available"),
        "{}",
        refused.message()
    );

    // Back: the next pass brings it online, with its rows.
    let on = json!({"attributes": {"enabled": true}});
    let (st, v) = s
        .data("PATCH", "kvs", &format!("/keys/tde/{version}"), Some(on))
        .await;
    assert_eq!(st, 200, "{v}");
    let report = svc.sweep().await.unwrap();
    assert_eq!(report.recovered, 1, "{report:?}");
    let open = gateway.open("sql1", "app", "kagiadmin").await.unwrap();
    let v: String = open
        .connection
        .query_row("SELECT v FROM t", [], |r| r.get(0))
        .unwrap();
    assert_eq!(v, "KAGI-SQL-MARKER-1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_one_node_a_server_whose_home_names_another_node_is_served_here() {
    // One node (SQLite): a recorded home naming another node (this data directory copied
    // elsewhere, or its node name made anew) is not followed.
    let s = TestServer::start(Options::default()).await;
    let sub = s.admin.subscription_id.clone();
    let group = format!("/subscriptions/{sub}/resourceGroups/rg1");
    let (st, v) = s
        .arm("PUT", &group, Some(json!({"location": "westeurope"})))
        .await;
    assert_eq!(st, 201, "{v}");
    let svc = SqlService::new(s.platform.clone(), SqlConfig::default()).unwrap();
    s.services.register(svc.clone());
    let gateway = SqlGateway(svc.clone());
    let server = format!("{group}/providers/Microsoft.Sql/servers/sqlhome");
    let body = json!({"location": "westeurope",
        "properties": {"administratorLogin": "kagiadmin", "administratorLoginPassword": "Str0ng!Passw0rd"}});
    let (st, v) = s.arm("PUT", &server, Some(body)).await;
    assert!(st == 200 || st == 201 || st == 202, "{st} {v}");
    let database = format!("{server}/databases/app");
    let (st, v) = s
        .arm("PUT", &database, Some(json!({"location": "westeurope"})))
        .await;
    assert!(st == 200 || st == 201 || st == 202, "{st} {v}");

    let host: &dyn kagi_host::ServiceHost = s.platform.as_ref();
    host.put_document(
        "/kagi/sql-servers",
        "home",
        &server.to_ascii_lowercase(),
        &json!({"node": "another-data-directory-0a1b2c3d"}),
    )
    .await
    .unwrap();
    // Its requests are served here (not 503 naming the other node) …
    let (st, v) = s.arm("GET", &database, None).await;
    assert_eq!(st, 200, "{v}");
    // … and so are its sessions.
    let open = gateway.open("sqlhome", "app", "kagiadmin").await;
    assert!(open.is_ok(), "{:?}", open.err());
}
