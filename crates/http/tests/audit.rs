//! Auditing over real HTTPS, in-process: every request is recorded once with its caller and
//! outcome, nothing secret is recorded, and a failing audit log turns requests into 503s
//! until it recovers.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::ops::Deref;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use kagi_audit::{AuditConfig, Filter};
use kagi_testkit::{Options, TestServer};
use reqwest::StatusCode;
use serde_json::{Value, json};

const API: &str = "api-version=7.5";
const ARM_API: &str = "api-version=2023-07-01";

/// The shared harness, with this file's audit log.
struct Server(TestServer);

impl Deref for Server {
    type Target = TestServer;
    fn deref(&self) -> &TestServer {
        &self.0
    }
}

/// While this file exists in the data directory, audit writes fail.
const FAIL_FILE: &str = "audit-fail";

/// A server without the backup service, whose audit log retries after 100 ms and fails while
/// [`Server::trigger`] exists; nobody logged in (so the log starts empty).
async fn start() -> Server {
    Server(
        TestServer::start(Options {
            backup_service: None,
            audit: Some(|dir| AuditConfig {
                retry_delay: Duration::from_millis(100),
                fail_file: Some(dir.join(FAIL_FILE)),
                ..AuditConfig::default()
            }),
            login: false,
            ..Options::default()
        })
        .await,
    )
}

impl Server {
    fn client(&self) -> reqwest::Client {
        self.client_builder()
            .user_agent("audit-test/1.0")
            .build()
            .unwrap()
    }

    fn vault(&self, path: &str) -> String {
        self.vault_url("myvault", path)
    }

    async fn token(&self, c: &reqwest::Client) -> String {
        self.token_with(c, &self.admin.tenant_id).await
    }

    fn trigger(&self) -> PathBuf {
        self.dir().join(FAIL_FILE)
    }

    fn records(&self) -> Vec<Value> {
        kagi_audit::query(&self.audit_file, Filter::default())
            .unwrap()
            .map(|e| e.unwrap().record)
            .collect()
    }
}

#[tokio::test]
async fn every_request_is_recorded_once_with_its_caller_and_outcome() {
    let s = start().await;
    let c = s.client();

    // Not audited: health.
    let r = c.get(s.mgmt_url("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(s.records().is_empty());

    // Unauthenticated: recorded without identity; the correlation id is echoed.
    let r = c
        .get(s.vault(&format!("/keys/cmk?{API}")))
        .header("x-ms-client-request-id", "corr-0001")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(r.headers()["x-ms-request-id"], "corr-0001");

    let token = s.token(&c).await;
    let sub = &s.admin.subscription_id;
    let r = c
        .put(s.mgmt_url(&format!(
            "/subscriptions/{sub}/resourcegroups/rg1?{ARM_API}"
        )))
        .bearer_auth(&token)
        .json(&json!({"location": "westeurope"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let vault_id = format!(
        "/subscriptions/{sub}/resourceGroups/rg1/providers/Microsoft.KeyVault/vaults/myvault"
    );
    let r = c
        .put(s.mgmt_url(&format!("{vault_id}?{ARM_API}")))
        .bearer_auth(&token)
        .json(&json!({"location": "westeurope", "properties": {
            "tenantId": s.admin.tenant_id, "sku": {"family": "A", "name": "standard"}}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let r = c
        .post(s.vault(&format!("/keys/cmk/create?{API}")))
        .bearer_auth(&token)
        .json(&json!({"kty": "RSA", "key_size": 2048}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let kid = r.json::<Value>().await.unwrap()["key"]["kid"]
        .as_str()
        .unwrap()
        .to_string();
    let plaintext = kagi_core::b64::encode(b"0123456789abcdef0123456789abcdef");
    let r = c
        .post(s.vault(&format!("/keys/cmk/wrapkey?{API}")))
        .bearer_auth(&token)
        .json(&json!({"alg": "RSA-OAEP-256", "value": plaintext}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = c
        .get(s.vault(&format!("/keys/missing?{API}")))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let generated = r.headers()["x-ms-request-id"].to_str().unwrap().to_string();
    assert_eq!(generated.len(), 36);

    let records = s.records();
    let ops: Vec<(&str, u64)> = records
        .iter()
        .map(|r| {
            (
                r["operationName"].as_str().unwrap(),
                r["httpStatusCode"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        ops,
        vec![
            ("KeyGet", 401),
            ("Authentication", 200),
            (
                "Microsoft.Resources/subscriptions/resourceGroups/write",
                201
            ),
            ("VaultPut", 201),
            ("KeyCreate", 200),
            ("KeyWrap", 200),
            ("KeyGet", 404),
        ]
    );
    for (i, r) in records.iter().enumerate() {
        assert_eq!(r["seq"], i as u64 + 1);
        assert_eq!(r["category"], "AuditEvent");
        assert_eq!(r["callerIpAddress"], "127.0.0.1");
        assert_eq!(r["properties"]["clientInfo"], "audit-test/1.0");
    }
    let unauth = &records[0];
    assert!(unauth.get("identity").is_none());
    assert_eq!(unauth["resultType"], "Failure");
    assert_eq!(unauth["resultSignature"], "Unauthorized");
    assert_eq!(unauth["resultDescription"], "Unauthorized");
    assert_eq!(unauth["correlationId"], "corr-0001");
    // The token endpoint: the identity the token was issued to, from the token it issued.
    let admin_oid = &records[1]["identity"]["claim"]["oid"];
    assert!(
        admin_oid.as_str().is_some_and(|o| o.len() == 36),
        "{}",
        records[1]
    );
    assert_eq!(records[1]["identity"]["claim"]["appid"], s.admin.client_id);
    for r in &records[2..] {
        assert_eq!(&r["identity"]["claim"]["oid"], admin_oid);
        assert_eq!(r["identity"]["claim"]["tid"], s.admin.tenant_id);
    }
    assert_eq!(records[3]["resourceId"], vault_id);
    assert_eq!(records[4]["resourceId"], vault_id);
    assert_eq!(records[4]["properties"]["isRbacAuthorized"], false);
    // The versioned key id, from the answers.
    assert_eq!(records[4]["properties"]["id"], kid);
    assert_eq!(records[5]["properties"]["id"], kid);
    assert_eq!(
        records[5]["properties"]["requestUri"],
        s.vault(&format!("/keys/cmk/wrapkey?{API}"))
    );
    assert_eq!(records[6]["resultDescription"], "KeyNotFound");
    assert_eq!(records[6]["correlationId"], generated.as_str());

    // Nothing secret in the file.
    let raw = std::fs::read_to_string(&s.audit_file).unwrap();
    assert!(!raw.contains(&token));
    assert!(!raw.contains(&plaintext));
    assert!(!raw.contains(&s.admin.client_secret));
    assert_eq!(kagi_audit::verify(&s.audit_file).unwrap().records, 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_audit_log_refuses_requests_until_it_recovers() {
    let s = start().await;
    let c = s.client();
    let token = s.token(&c).await;
    let get = || {
        c.get(s.mgmt_url(&format!("/subscriptions?{ARM_API}")))
            .bearer_auth(&token)
            .send()
    };
    assert_eq!(get().await.unwrap().status(), StatusCode::OK);

    std::fs::write(s.trigger(), b"").unwrap();
    let started = Instant::now();
    let r = get().await.unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({"error": {"code": "ServiceUnavailable",
            "message": "The audit log cannot be written; the request was not served."}})
    );
    // Refused before any work from now on, quickly.
    for _ in 0..3 {
        assert_eq!(
            get().await.unwrap().status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
    }
    assert!(started.elapsed() < Duration::from_secs(10));
    // Health stays up (it is not audited): the process is alive, the log is not.
    assert_eq!(
        c.get(s.mgmt_url("/healthz")).send().await.unwrap().status(),
        StatusCode::OK
    );

    std::fs::remove_file(s.trigger()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = get().await.unwrap().status();
        if status == StatusCode::OK {
            break;
        }
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(Instant::now() < deadline, "requests were not served again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Only the requests that were served are in the log, and the chain is intact.
    let records = s.records();
    assert!(records.iter().all(|r| r["httpStatusCode"] != 503));
    assert_eq!(
        kagi_audit::verify(&s.audit_file).unwrap().records as usize,
        records.len()
    );
}

impl Server {
    /// A resource group `rg1` and a standard vault `myvault` in it.
    async fn vault_ready(&self, c: &reqwest::Client, token: &str) {
        let sub = &self.admin.subscription_id;
        let rg = format!("/subscriptions/{sub}/resourcegroups/rg1");
        let r = c
            .put(self.mgmt_url(&format!("{rg}?{ARM_API}")))
            .bearer_auth(token)
            .json(&json!({"location": "westeurope"}))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{}", r.text().await.unwrap());
        let r = c
            .put(self.mgmt_url(&format!(
                "{rg}/providers/Microsoft.KeyVault/vaults/myvault?{ARM_API}"
            )))
            .bearer_auth(token)
            .json(&json!({"location": "westeurope", "properties": {
                "tenantId": self.admin.tenant_id, "sku": {"family": "A", "name": "standard"}}}))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{}", r.text().await.unwrap());
    }

    fn records_of(&self, correlation: &str) -> Vec<Value> {
        self.records()
            .into_iter()
            .filter(|r| r["correlationId"] == correlation)
            .collect()
    }
}

/// Issue 11, item 3: a client that gives up on a request (here: an HTTP/2 stream reset by a
/// client-side timeout, while the server generates an RSA-4096 key) must not cancel it half
/// way. The change either happens with its audit record or not at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_its_client_abandons_still_finishes_with_its_record() {
    let s = start().await;
    let c = s.client();
    let token = s.token(&c).await;
    s.vault_ready(&c, &token).await;
    let h2 = s.client_builder().http2_prior_knowledge().build().unwrap();
    // The HTTP/2 connection is up before the requests that are given up, so that they reach the
    // server (a timeout during the handshake would abandon a request the server never saw).
    let r = h2
        .get(s.vault(&format!("/keys?{API}")))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let mut abandoned = Vec::new();
    for i in 0..4 {
        let correlation = format!("abandoned-{i}");
        let r = h2
            .post(s.vault(&format!("/keys/big{i}/create?{API}")))
            .bearer_auth(&token)
            .header("x-ms-client-request-id", &correlation)
            .json(&json!({"kty": "RSA", "key_size": 4096}))
            .timeout(Duration::from_millis(150))
            .send()
            .await;
        if r.is_err() {
            abandoned.push((i, correlation));
        }
    }
    assert!(!abandoned.is_empty(), "no request was abandoned mid-flight");
    // Every abandoned request that reached the server finishes: its change with its record, or
    // neither. On a loaded machine one may not have reached it in time, so not every abandoned
    // request must have a record, but some must: on the old code none had.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut recorded = 0;
    for (i, correlation) in &abandoned {
        let records = loop {
            let r = s.records_of(correlation);
            if !r.is_empty() || Instant::now() > deadline {
                break r;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert!(records.len() <= 1, "request {correlation}: {records:?}");
        let status = records.first().and_then(|r| r["httpStatusCode"].as_u64());
        recorded += usize::from(status.is_some());
        let r = c
            .get(s.vault(&format!("/keys/big{i}?{API}")))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status() == StatusCode::OK,
            status == Some(200),
            "key big{i} exists: {}, its record says {status:?}",
            r.status()
        );
    }
    assert!(recorded > 0, "no abandoned request finished: {abandoned:?}");
}

/// Issue 11, item 13: `//imds/{secret}/…` is routed like `/imds/{secret}/…`, so it must be
/// redacted like it too: the path is normalised once, before routing and audit.
#[tokio::test]
async fn a_binding_secret_behind_extra_slashes_is_not_recorded() {
    let s = start().await;
    let c = s.client();
    for path in [
        "//imds/S3CR3T-BINDING-1/metadata/identity/oauth2/token",
        "///imds//S3CR3T-BINDING-2/metadata/identity/oauth2/token",
    ] {
        let r = c
            .get(s.mgmt_url(&format!(
                "{path}?api-version=2018-02-01&resource=https://vault.azure.net"
            )))
            .header("Metadata", "true")
            .send()
            .await
            .unwrap();
        assert!(r.status().is_client_error(), "{}", r.status());
    }
    let log = std::fs::read_to_string(&s.audit_file).unwrap();
    assert_eq!(s.records().len(), 2);
    assert!(!log.contains("S3CR3T-BINDING"), "{log}");
    assert!(log.contains("/imds/REDACTED/metadata"), "{log}");
}
