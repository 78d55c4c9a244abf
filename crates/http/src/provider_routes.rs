//! ARM requests of the storage services: a path that names a registered provider's namespace
//! (`…/providers/{namespace}/…`) is served by that provider (see [`crate::Services`]); this
//! only translates.

use axum::body::Body;
use axum::http::{Extensions, Method, Response};
use kagi_host::ArmRequest;
use kagi_vault::Principal;

use crate::Services;
use crate::respond;

/// `Prefer: wait=N` (RFC 7240): how long a job read may wait for the job to end (at most 60 s).
pub(crate) fn prefer_wait(headers: &axum::http::HeaderMap) -> Option<std::time::Duration> {
    headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .find_map(|p| p.trim().strip_prefix("wait=")?.trim().parse::<u64>().ok())
        .map(|s| std::time::Duration::from_secs(s.min(60)))
}

/// Serves the request when its path names the namespace of a provider registered in the
/// request's `extensions`; `None` otherwise.
pub(crate) async fn arm(
    extensions: &Extensions,
    caller: &Principal,
    method: &Method,
    segs: &[&str],
    l: &[&str],
    body: &[u8],
    wait: Option<std::time::Duration>,
) -> Option<Response<Body>> {
    let provider = extensions.get::<Services>()?.provider_of_path(l)?;
    let req = ArmRequest {
        method: method.as_str(),
        segs,
        l,
        body,
        wait,
    };
    Some(match provider.handle(caller, req).await {
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
    })
}
