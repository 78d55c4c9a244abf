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
        Ok((204, _)) => respond::empty(204),
        Ok((s, v)) if v.is_null() => respond::empty(s),
        Ok((s, v)) => respond::json(s, &v),
        Err(e) => respond::error(&e),
    })
}
