//! ARM requests of the storage services: a request that matches a registered provider's route
//! table is served by that provider (see [`crate::route_table`]); this only translates.

use axum::body::Body;
use std::sync::Arc;

use axum::http::Response;
use axum::http::request::Parts;
use kagi_host::{ArmRequest, ResourceProvider};
use kagi_vault::{Platform, Principal};

use crate::respond;

/// `Prefer: wait=N` (RFC 7240): how long a job read may wait for the job to end (at most 60 s).
fn prefer_wait(headers: &axum::http::HeaderMap) -> Option<std::time::Duration> {
    headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .find_map(|p| p.trim().strip_prefix("wait=")?.trim().parse::<u64>().ok())
        .map(|s| std::time::Duration::from_secs(s.min(60)))
}

/// Serves a request of `provider`'s route table by it — on this node, or, when what it names
/// lives on another node, there ([`crate::forward`]).
pub(crate) async fn arm(
    platform: &Platform,
    provider: Arc<dyn ResourceProvider>,
    caller: &Principal,
    parts: &Parts,
    segs: &[&str],
    l: &[&str],
    body: axum::body::Bytes,
) -> Response<Body> {
    let req = ArmRequest {
        method: parts.method.as_str(),
        segs,
        l,
        body: &body,
        wait: prefer_wait(&parts.headers),
    };
    match crate::forward::home_elsewhere(platform, provider.as_ref(), &req).await {
        Ok(Some(home)) => {
            if crate::forward::was_forwarded(parts) {
                return crate::forward::misrouted(&home);
            }
            return crate::forward::forward(platform, &home, parts, body).await;
        }
        Ok(None) => {}
        Err(e) => return respond::error(&e),
    }
    match provider.handle(caller, req).await {
        Ok(reply) => {
            let mut r = match reply.status {
                204 => respond::empty(204),
                s if reply.body.is_null() => respond::empty(s),
                s => respond::json(s, &reply.body),
            };
            if let Some(url) = reply.async_operation
                && let Ok(v) = axum::http::HeaderValue::from_str(&url)
            {
                r.headers_mut().insert("azure-asyncoperation", v.clone());
                r.headers_mut().insert(axum::http::header::LOCATION, v);
                r.headers_mut().insert(
                    axum::http::header::RETRY_AFTER,
                    axum::http::HeaderValue::from_static("1"),
                );
            }
            r
        }
        Err(e) => respond::error(&e),
    }
}
