//! The metrics listener over real HTTP: `GET /metrics` answers the exposition, nothing else is
//! served.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use kagi_metrics::{Metrics, OperationName};

/// `method path` on the listener at `addr`: the status, the content type and the body.
async fn call(addr: SocketAddr, method: reqwest::Method, path: &str) -> (u16, String, String) {
    let r = reqwest::Client::new()
        .request(method, format!("http://{addr}{path}"))
        .send()
        .await
        .expect("request");
    let status = r.status().as_u16();
    let content_type = r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    (status, content_type, r.text().await.expect("body"))
}

#[tokio::test]
async fn serves_the_exposition_on_get_metrics_only() {
    let metrics = Arc::new(Metrics::new());
    let created = || {
        metrics.observe_request(
            OperationName::Fixed("KeyCreate"),
            200,
            Duration::from_millis(5),
        );
    };
    created();
    let addr = kagi_metrics::serve("127.0.0.1:0".parse().expect("addr"), metrics.clone())
        .await
        .expect("bind");
    let (status, content_type, text) = call(addr, reqwest::Method::GET, "/metrics").await;
    assert_eq!(status, 200);
    assert_eq!(content_type, kagi_metrics::CONTENT_TYPE, "OpenMetrics text");
    assert!(text.contains(r#"kagi_http_requests_total{operation="KeyCreate",status="200"} 1"#));

    // Counted between scrapes: the next scrape sees it.
    created();
    let (_, _, text) = call(addr, reqwest::Method::GET, "/metrics").await;
    assert!(text.contains(r#"kagi_http_requests_total{operation="KeyCreate",status="200"} 2"#));

    assert_eq!(call(addr, reqwest::Method::GET, "/other").await.0, 404);
    assert_eq!(call(addr, reqwest::Method::POST, "/metrics").await.0, 405);
}
