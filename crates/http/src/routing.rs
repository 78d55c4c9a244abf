//! Host routing: the management host (the DNS suffix itself, or a bare address) or a vault's
//! data plane (`{vault}.{suffix}`).

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, header};
use kagi_vault::Platform;

/// The host a request is for: the Host header (HTTP/1.1) or the URI authority (HTTP/2),
/// without the port, lower-cased.
pub(crate) fn request_host(req: &Request<Body>) -> String {
    let raw = req
        .uri()
        .host()
        .map(str::to_string)
        .or_else(|| {
            req.headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_string)
        })
        .unwrap_or_default();
    let host = if raw.starts_with('[') {
        raw.split(']')
            .next()
            .unwrap_or("")
            .trim_start_matches('[')
            .to_string()
    } else {
        raw.split(':').next().unwrap_or("").to_string()
    };
    host.to_ascii_lowercase()
}

pub(crate) async fn dispatch(
    platform: Arc<Platform>,
    req: Request<Body>,
) -> axum::http::Response<Body> {
    let host = request_host(&req);
    let suffix = platform.config().dns_suffix.to_ascii_lowercase();
    if host == suffix || host.is_empty() || host.parse::<std::net::IpAddr>().is_ok() {
        // On a shared store with strict consistency: every change other nodes made first.
        platform.catch_up(None).await;
        return crate::management::handle(platform, req).await;
    }
    match host.strip_suffix(&format!(".{suffix}")) {
        Some(vault) if !vault.contains('.') => {
            let vault = vault.to_string();
            platform.catch_up(Some(&vault)).await;
            crate::data_plane::handle(platform, vault, req).await
        }
        _ => crate::respond::error(&kagi_core::KvError::new(
            kagi_core::ErrorCode::NotFound,
            format!(
                "kagi does not serve the host {}.",
                kagi_core::ids::printable(&host)
            ),
        )),
    }
}
