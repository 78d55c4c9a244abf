//! Metrics over real HTTPS, in-process: requests counted under their audit operation names and
//! statuses, cryptographic operations under their key type, audit batches, and the gauges of
//! the platform and the services, with no resource name in any label.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use kagi_testkit::{Options, TestServer};
use serde_json::json;

/// The value of the sample line `series` (name and labels exactly as rendered), if present.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test]
async fn requests_crypto_audit_and_gauges_are_counted() {
    let s = TestServer::start(Options {
        metrics: true,
        ..Options::default()
    })
    .await;
    let metrics = s.metrics.clone().expect("metrics on");
    s.create_vault("rg1", "metricsvault").await;
    let (status, key) = s
        .data(
            "POST",
            "metricsvault",
            "/keys/secretkeyname/create",
            Some(json!({"kty": "RSA", "key_size": 2048})),
        )
        .await;
    assert_eq!(status, 200, "{key}");
    for _ in 0..2 {
        let (status, body) = s
            .data(
                "POST",
                "metricsvault",
                "/keys/secretkeyname/wrapkey",
                Some(json!({"alg": "RSA-OAEP-256", "value": "AAECAwQFBgcICQoLDA0ODw"})),
            )
            .await;
        assert_eq!(status, 200, "{body}");
    }
    let (status, _) = s.data("GET", "metricsvault", "/keys/missing", None).await;
    assert_eq!(status, 404);

    let text = metrics.render();
    let count = |series: &str| sample(&text, series).unwrap_or(0.0);
    assert_eq!(
        count(r#"kagi_http_requests_total{operation="KeyCreate",status="200"}"#),
        1.0,
        "{text}"
    );
    assert_eq!(
        count(r#"kagi_http_requests_total{operation="KeyWrap",status="200"}"#),
        2.0
    );
    assert_eq!(
        count(r#"kagi_http_requests_total{operation="KeyGet",status="404"}"#),
        1.0
    );
    assert_eq!(
        count(r#"kagi_http_request_duration_seconds_count{operation="KeyWrap"}"#),
        2.0
    );
    assert_eq!(
        count(r#"kagi_crypto_operations_total{kty="RSA",op="wrapkey"}"#),
        2.0
    );
    // The management plane under the audit log's names.
    assert!(
        count(r#"kagi_http_requests_total{operation="VaultPut",status="200"}"#) >= 1.0
            || count(r#"kagi_http_requests_total{operation="VaultPut",status="201"}"#) >= 1.0
    );
    // Every answered request's record went through a batch (the login's too).
    assert!(count("kagi_audit_batch_records_sum") >= 5.0);
    assert!(count("kagi_audit_fsync_duration_seconds_count") >= 1.0);
    // Gauges: the platform's jobs and the backup service's vaults.
    assert_eq!(
        sample(
            &text,
            r#"kagi_jobs{service="keyvault",kind="VaultBackup",state="InProgress"}"#
        ),
        Some(0.0)
    );
    assert_eq!(
        sample(&text, r#"kagi_backup_vaults{protector="PlatformManaged"}"#),
        Some(0.0)
    );
    // Bounded labels: no vault or key name.
    assert!(!text.contains("metricsvault") && !text.contains("secretkeyname"));
}
