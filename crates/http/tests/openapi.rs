//! The OpenAPI description and the routes agree (issue 16). A request the router serves
//! matches a route of a table by construction (anything else is refused before a handler sees
//! it); these tests check the other way: every operation of the document a running server
//! answers at `GET /openapi.json` reaches a handler (no 404 or 405 of a router, no 5xx), a
//! path no table holds is refused, and the document served is the one of the server's tables.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use kagi_core::route_table::Route;
use kagi_testkit::{Options, TestServer};
use serde_json::{Value, json};

/// The storage services' tables, as `kagi server` registers them (backup, disks, SQL).
fn provider_tables() -> [&'static [Route]; 3] {
    [
        kagi_backup_service::routes::ROUTES,
        kagi_disk_service::routes::ROUTES,
        kagi_sql_service::routes::ROUTES,
    ]
}

/// A test server running the three storage services `kagi server` runs.
async fn server() -> TestServer {
    let s = TestServer::start(Options::default()).await;
    let disks = kagi_disk_service::DiskService::new(
        s.platform.clone(),
        kagi_disk_service::DiskConfig::default(),
    )
    .unwrap();
    s.services.register(disks);
    let sql = kagi_sql_service::SqlService::new(
        s.platform.clone(),
        kagi_sql_service::SqlConfig::default(),
    )
    .unwrap();
    s.services.register(sql);
    s
}

/// What the routers answer for a request no handler serves: such an answer to a described
/// operation means the document describes a route that is not served.
fn unrouted(status: u16, body: &Value) -> bool {
    if status == 405 {
        return true;
    }
    let message = body["error"]["message"].as_str().unwrap_or("");
    status == 404
        && (message == "Not found."
            || [
                "No management API is served",
                "is not served by this vault",
                "No such route",
                "No such agent route",
                "No route for",
                "No directory API is served",
                "No authorization API is served",
                "No policy insights API is served",
            ]
            .iter()
            .any(|m| message.contains(m)))
}

/// `v`, or the component its `$ref` names.
fn resolve<'a>(doc: &'a Value, v: &'a Value) -> &'a Value {
    match v["$ref"].as_str() {
        Some(r) => doc.pointer(r.trim_start_matches('#')).unwrap(),
        None => v,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_described_operation_is_served() {
    let s = server().await;
    let vault = "openapiprobe";
    s.create_vault("rg1", vault).await;
    let sub = s.admin.subscription_id.clone();

    // Served to anyone, and exactly the document of the server's tables.
    let r = s
        .client()
        .get(s.mgmt_url("/openapi.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let doc: Value = r.json().await.unwrap();
    let mut expected = kagi_http::openapi_document(&provider_tables(), "localhost", s.port);
    // The test clock is served (and described) only under `kagi server --test-clock`.
    expected["paths"]
        .as_object_mut()
        .unwrap()
        .remove("/kagi/test/clock");
    assert_eq!(doc, expected);

    let value = |name: &str| -> String {
        match name {
            "subscriptionId" => sub.clone(),
            "resourceGroupName" => "rg1".into(),
            "vaultName" => vault.into(),
            "tenant" => s.admin.tenant_id.clone(),
            "scope" => format!("subscriptions/{sub}/resourceGroups/rg1"),
            "location" => "westeurope".into(),
            "operationKind" => "add".into(),
            "objectName" => "a/b".into(),
            other => format!("{other}1"),
        }
    };
    let mut failures = Vec::new();
    let mut count = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            if method == "servers" {
                continue;
            }
            count += 1;
            let params: Vec<&Value> = op["parameters"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| resolve(&doc, p))
                .collect();
            let mut url_path = path.clone();
            let mut query = Vec::new();
            let mut headers = Vec::new();
            for p in params {
                let name = p["name"].as_str().unwrap();
                match p["in"].as_str().unwrap() {
                    "path" => url_path = url_path.replace(&format!("{{{name}}}"), &value(name)),
                    "query" if name == "api-version" => {
                        let v = if item.get("servers").is_some() {
                            "7.5"
                        } else {
                            "2023-07-01"
                        };
                        query.push(format!("api-version={v}"));
                    }
                    "query" if p["required"] == true => {
                        query.push(format!("{name}={}", s.authority()));
                    }
                    "header" if p["required"] == true => {
                        let v = if name == "Metadata" { "true" } else { "x" };
                        headers.push((name.to_string(), v.to_string()));
                    }
                    _ => {}
                }
            }
            let url = if item.get("servers").is_some() {
                s.vault_url(vault, &url_path)
            } else {
                s.mgmt_url(&url_path)
            };
            let url = if query.is_empty() {
                url
            } else {
                format!("{url}?{}", query.join("&"))
            };
            let m: reqwest::Method = method.to_ascii_uppercase().parse().unwrap();
            let mut req = s.client().request(m, &url);
            if op["security"][0].get("bearer").is_some() {
                req = req.bearer_auth(&s.token);
            }
            for (k, v) in &headers {
                req = req.header(k, v);
            }
            let content = &resolve(&doc, &op["requestBody"])["content"];
            if content.get("application/json").is_some() {
                req = req.json(&json!({}));
            } else if content.get("application/x-www-form-urlencoded").is_some() {
                req = req.form(&[("grant_type", "client_credentials")]);
            } else if content.get("application/octet-stream").is_some() {
                req = req.body(Vec::new());
            }
            let r = req.send().await.unwrap();
            let status = r.status().as_u16();
            let body: Value = r.json().await.unwrap_or(Value::Null);
            if status >= 500 || unrouted(status, &body) {
                failures.push(format!("{} {url}: {status} {body}", method.to_uppercase()));
            }
        }
    }
    assert!(count >= 240, "{count} operations described");
    assert!(failures.is_empty(), "not served:\n{}", failures.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_no_table_holds_is_refused_before_any_handler() {
    let s = server().await;
    let sub = s.admin.subscription_id.clone();
    let server =
        format!("/subscriptions/{sub}/resourceGroups/rg1/providers/Microsoft.Sql/servers/s1");
    for (method, path, status) in [
        // Under a storage service's namespace, not in its table: the service is not asked.
        ("GET", format!("{server}/firewallRules"), 404),
        ("POST", server.clone(), 405),
        // The root scope serves role definitions to read only.
        (
            "PUT",
            "/providers/Microsoft.Authorization/roleDefinitions/r1".to_string(),
            405,
        ),
        ("GET", "/v1.0/groups".to_string(), 404),
        ("GET", "/kagi/admin/other".to_string(), 404),
    ] {
        let (st, v) = s.arm(method, &path, None).await;
        assert_eq!(st, status, "{method} {path}: {v}");
        assert!(unrouted(st, &v), "{method} {path}: {v}");
    }
    // An agent route no table holds: refused before any authentication or body.
    let agent = format!(
        "/kagi/agent/subscriptions/{sub}/resourceGroups/rg1/providers/Microsoft.RecoveryServices/vaults/v1/unknown"
    );
    let r = s
        .client()
        .post(s.mgmt_url(&agent))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}

/// A path parameter's name means one thing in every table (one segment, or several): the
/// description defines each once.
#[test]
fn path_parameter_names_are_used_one_way() {
    let mut multi = std::collections::BTreeMap::new();
    let tables = [
        kagi_core::management_routes::MANAGEMENT,
        kagi_core::routes::DATA_PLANE,
    ];
    for route in tables
        .iter()
        .chain(&provider_tables())
        .flat_map(|t| t.iter())
    {
        for s in route.segments() {
            if let Some(name) = kagi_core::route_table::param_name(s) {
                let was = multi.insert(name, s.starts_with("{*"));
                assert!(was.is_none_or(|w| w == s.starts_with("{*")), "{name}");
            }
        }
    }
}
