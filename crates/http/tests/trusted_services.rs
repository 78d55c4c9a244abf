//! A key vault's firewall with `bypass: AzureServices` admits the system-assigned identities
//! of the storage services the server registered whose providers say they are trusted (backup
//! vaults), and those of the services to come (disk encryption sets), and nobody else's: a
//! backup vault's identity is refused by a server that runs no backup service.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use kagi_host::{PutResource, ResourceRef, ServiceHost};
use kagi_testkit::{Options, TestServer};
use serde_json::{Value, json};

/// The status of a read of key `k` of the firewalled vault `kvf` by the system-assigned
/// identity of a new resource of `resource_type` (with the inner error code, if any).
async fn read_by_identity_of(s: &TestServer, resource_type: &str) -> (u16, Value) {
    let sub = s.admin.subscription_id.clone();
    let host: &dyn ServiceHost = s.platform.as_ref();
    let admin = s.platform.authenticate(&s.token).unwrap();
    let name = format!("r{}", resource_type.len());
    let identity = json!({"type": "SystemAssigned"});
    let put = PutResource {
        at: ResourceRef {
            subscription: &sub,
            resource_group: "rg1",
            resource_type,
            name: &name,
        },
        body: json!({"location": "westeurope"}),
        identity: Some(&identity),
    };
    let (st, r) = host.put_resource(&admin, put).await.unwrap();
    assert_eq!(st, 201, "{r}");
    let id = r["id"].as_str().unwrap().to_string();
    let oid = r["identity"]["principalId"].as_str().unwrap().to_string();

    // The vault admits this identity by its access policy, and only 10.0.0.0/8 by address.
    let kv =
        format!("/subscriptions/{sub}/resourceGroups/rg1/providers/Microsoft.KeyVault/vaults/kvf");
    let grant = json!([{"tenantId": s.admin.tenant_id, "objectId": oid,
        "permissions": {"keys": ["get"]}}]);
    let body = json!({"location": "westeurope", "properties": {
        "tenantId": s.admin.tenant_id, "sku": {"family": "A", "name": "standard"},
        "accessPolicies": grant,
        "networkAcls": {"bypass": "AzureServices", "defaultAction": "Deny",
            "ipRules": [{"value": "10.0.0.0/8"}]}}});
    let (st, v) = s.arm("PUT", &kv, Some(body)).await;
    assert_eq!(st, 200, "{v}");

    let token = host.identity_token(&id, None).unwrap();
    let (st, v) = s.data_as(&token, "GET", "kvf", "/keys/k", None).await;
    (st, v["error"]["innererror"]["code"].clone())
}

/// A server with a resource group `rg1` and a key vault `kvf` holding key `k`.
async fn server(options: Options) -> TestServer {
    let s = TestServer::start(options).await;
    let sub = s.admin.subscription_id.clone();
    let (st, v) = s
        .arm(
            "PUT",
            &format!("/subscriptions/{sub}/resourceGroups/rg1"),
            Some(json!({"location": "westeurope"})),
        )
        .await;
    assert_eq!(st, 201, "{v}");
    let kv =
        format!("/subscriptions/{sub}/resourceGroups/rg1/providers/Microsoft.KeyVault/vaults/kvf");
    let body = json!({"location": "westeurope", "properties": {
        "tenantId": s.admin.tenant_id, "sku": {"family": "A", "name": "standard"},
        "accessPolicies": []}});
    let (st, v) = s.arm("PUT", &kv, Some(body)).await;
    assert_eq!(st, 201, "{v}");
    let (st, v) = s
        .data("POST", "kvf", "/keys/k/create", Some(json!({"kty": "EC"})))
        .await;
    assert_eq!(st, 200, "{v}");
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_registered_backup_service_is_trusted() {
    let s = server(Options::default()).await;
    let (st, e) = read_by_identity_of(&s, "Microsoft.RecoveryServices/vaults").await;
    assert_eq!(st, 200, "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_services_to_come_are_trusted() {
    let s = server(Options::default()).await;
    let (st, e) = read_by_identity_of(&s, "Microsoft.Compute/diskEncryptionSets").await;
    assert_eq!(st, 200, "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_resource_type_is_not_trusted() {
    let s = server(Options::default()).await;
    let (st, e) = read_by_identity_of(&s, "Microsoft.Web/sites").await;
    assert_eq!((st, e), (403, json!("ForbiddenByFirewall")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_vaults_are_not_trusted_without_the_backup_service() {
    let s = server(Options {
        backup_service: None,
        ..Options::default()
    })
    .await;
    let (st, e) = read_by_identity_of(&s, "Microsoft.RecoveryServices/vaults").await;
    assert_eq!((st, e), (403, json!("ForbiddenByFirewall")));
}
