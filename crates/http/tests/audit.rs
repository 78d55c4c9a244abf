//! Auditing over real HTTPS, in-process: every request is recorded once with its caller and
//! outcome, nothing secret is recorded, and a failing audit log turns requests into 503s
//! until it recovers.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kagi_audit::{AuditConfig, AuditLog, Filter};
use kagi_core::time::SystemClock;
use kagi_http::tls::{LocalCa, SniResolver};
use kagi_vault::{BootstrapAdmin, Platform, PlatformConfig};
use reqwest::StatusCode;
use serde_json::{Value, json};

const API: &str = "api-version=7.5";
const ARM_API: &str = "api-version=2023-07-01";

struct Server {
    port: u16,
    addr: SocketAddr,
    admin: BootstrapAdmin,
    ca_pem: String,
    audit_file: PathBuf,
    trigger: PathBuf,
    task: tokio::task::JoinHandle<Result<(), kagi_http::ServeError>>,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn start() -> Server {
    let dir = tempfile::tempdir().unwrap();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let config = PlatformConfig {
        data_dir: dir.path().to_path_buf(),
        dns_suffix: "localhost".into(),
        port,
    };
    let (platform, admin) = Platform::open(config, Arc::new(SystemClock)).await.unwrap();
    let admin = admin.unwrap();
    let ca = LocalCa::load_or_create(&platform, dir.path()).unwrap();
    let ca_pem = ca.cert_pem.clone();
    let resolver = SniResolver::new(ca, "localhost");
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let trigger = dir.path().join("audit-fail");
    let audit = Arc::new(
        AuditLog::open_with(
            dir.path(),
            AuditConfig {
                retry_delay: Duration::from_millis(100),
                fail_file: Some(trigger.clone()),
                ..AuditConfig::default()
            },
        )
        .unwrap(),
    );
    let audit_file = audit.path().to_path_buf();
    let platform = Arc::new(platform);
    let task =
        tokio::spawn(async move { kagi_http::serve(platform, audit, &[addr], resolver).await });
    for _ in 0..1000 {
        assert!(!task.is_finished(), "serve stopped");
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Server {
        port,
        addr,
        admin,
        ca_pem,
        audit_file,
        trigger,
        task,
        _dir: dir,
    }
}

impl Server {
    fn client(&self) -> reqwest::Client {
        let mut b = reqwest::Client::builder()
            .tls_certs_only([reqwest::Certificate::from_pem(self.ca_pem.as_bytes()).unwrap()])
            .no_proxy()
            .user_agent("audit-test/1.0");
        for host in ["localhost", "myvault.localhost"] {
            b = b.resolve(host, self.addr);
        }
        b.build().unwrap()
    }

    fn mgmt(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.port)
    }

    fn vault(&self, path: &str) -> String {
        format!("https://myvault.localhost:{}{path}", self.port)
    }

    async fn token(&self, c: &reqwest::Client) -> String {
        let r = c
            .post(self.mgmt(&format!("/{}/oauth2/v2.0/token", self.admin.tenant_id)))
            .form(&[
                ("grant_type", "client_credentials"),
                ("client_id", self.admin.client_id.as_str()),
                ("client_secret", self.admin.client_secret.as_str()),
                (
                    "scope",
                    &format!("https://localhost:{}/.default", self.port),
                ),
            ])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        r.json::<Value>().await.unwrap()["access_token"]
            .as_str()
            .unwrap()
            .to_string()
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
    let r = c.get(s.mgmt("/healthz")).send().await.unwrap();
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
        .put(s.mgmt(&format!(
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
        .put(s.mgmt(&format!("{vault_id}?{ARM_API}")))
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
                "Microsoft.Resources/subscriptions/resourcegroups/write",
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
        c.get(s.mgmt(&format!("/subscriptions?{ARM_API}")))
            .bearer_auth(&token)
            .send()
    };
    assert_eq!(get().await.unwrap().status(), StatusCode::OK);

    std::fs::write(&s.trigger, b"").unwrap();
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
        c.get(s.mgmt("/healthz")).send().await.unwrap().status(),
        StatusCode::OK
    );

    std::fs::remove_file(&s.trigger).unwrap();
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
