//! Forwarding a storage service's request to the node it lives on (docs/SEVERAL_NODES.md,
//! "Homes"): a disk family's log and a SQL server's databases are in one node's data
//! directory; a request for them that reached another node (any node of several behind a load
//! balancer) is sent on to that node as it came — same method, path, query, headers
//! (`Authorization` too: the home node authenticates and authorises it itself) and body —
//! and its answer is passed back. A forwarded request carries `x-kagi-forwarded-by`, and one
//! that arrives forwarded is never forwarded again.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::body::Body;
use axum::http::request::Parts;
use axum::http::{HeaderName, HeaderValue, Response, header};
use kagi_core::{ErrorCode, KvError};
use kagi_vault::Platform;

use crate::respond;

/// The header a forwarded request carries: the name of the node that forwarded it.
pub(crate) const FORWARDED_BY: &str = "x-kagi-forwarded-by";

/// How long a forwarded request may take (a disk import or copy answers 202 quickly; a
/// `Prefer: wait` job read waits at most 60 s).
const FORWARD_TIMEOUT: Duration = Duration::from_secs(120);

/// Whether `parts` arrived forwarded by another node.
pub(crate) fn was_forwarded(parts: &Parts) -> bool {
    parts.headers.contains_key(FORWARDED_BY)
}

/// The 503 for a request whose home node cannot serve it now: the Azure SDKs retry it.
fn unavailable(message: String) -> Response<Body> {
    let mut r = respond::error(&KvError::new(ErrorCode::ServiceUnavailable, message));
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("2"));
    r
}

/// The answer for a request that reached a node which is not its home although another node
/// forwarded it here (the homes changed meanwhile): never forwarded a second time.
pub(crate) fn misrouted(home: &str) -> Response<Body> {
    unavailable(format!(
        "The resource is served by the node '{home}'; this request was forwarded to another \
         node. Retry the request."
    ))
}

/// Sends the request (`parts`, `body`) to node `home` and answers with its answer.
pub(crate) async fn forward(
    platform: &Platform,
    home: &str,
    parts: &Parts,
    body: axum::body::Bytes,
) -> Response<Body> {
    let nodes = match platform.live_nodes().await {
        Ok(n) => n,
        Err(e) => return respond::error(&e),
    };
    let Some(card) = nodes.into_iter().find(|n| n.name == home) else {
        return unavailable(format!(
            "The resource is served by the node '{home}', which is not running. Retry when it \
             is back."
        ));
    };
    let Some(addr) = tokio::net::lookup_host(&card.https)
        .await
        .ok()
        .and_then(|mut a| a.next())
    else {
        tracing::warn!(node = %home, address = %card.https, "cannot resolve a node's address");
        return unavailable(format!(
            "The node '{home}' cannot be reached. Retry the request."
        ));
    };
    // The name the client used: the home node's certificate is issued for it, and it picks the
    // same host (management or vault) by it.
    let host_header = parts
        .headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
        .or_else(|| parts.uri.authority().map(|a| a.to_string()))
        .unwrap_or_default();
    let host_name = host_header
        .rsplit_once(':')
        .filter(|(_, p)| p.parse::<u16>().is_ok())
        .map_or(host_header.as_str(), |(h, _)| h)
        .trim_matches(['[', ']'])
        .to_string();
    if host_name.is_empty() {
        return respond::error(&KvError::new(
            ErrorCode::BadRequest,
            "The request has no Host header.",
        ));
    }
    let client = match client_for(platform, &host_name, addr) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot make the forwarding client");
            return respond::error(&KvError::internal());
        }
    };
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let url = format!("https://{host_name}:{}{path}", addr.port());
    let Ok(method) = reqwest::Method::from_bytes(parts.method.as_str().as_bytes()) else {
        return respond::error(&KvError::new(ErrorCode::BadRequest, "Unknown method."));
    };
    let mut req = client.request(method, &url).body(body);
    for (name, value) in &parts.headers {
        if !hop_by_hop(name) {
            req = req.header(name.as_str(), value.as_bytes());
        }
    }
    req = req
        .header(header::HOST.as_str(), host_header.as_str())
        .header(FORWARDED_BY, platform.node_name());
    let answer = match req.send().await {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!(node = %home, error = %e, "forwarding to the resource's node failed");
            return unavailable(format!(
                "The node '{home}' serving the resource did not answer. Retry the request."
            ));
        }
    };
    let status = answer.status().as_u16();
    let headers = answer.headers().clone();
    let bytes = match answer.bytes().await {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(node = %home, error = %e, "forwarded answer cut short");
            return unavailable(format!(
                "The node '{home}' serving the resource did not answer. Retry the request."
            ));
        }
    };
    let mut r = Response::new(Body::from(bytes));
    *r.status_mut() =
        axum::http::StatusCode::from_u16(status).unwrap_or(axum::http::StatusCode::BAD_GATEWAY);
    for (name, value) in &headers {
        if hop_by_hop(name) || name == header::CONTENT_LENGTH {
            continue;
        }
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(name.as_str().as_bytes()),
            HeaderValue::from_bytes(value.as_bytes()),
        ) {
            r.headers_mut().append(n, v);
        }
    }
    r
}

/// Headers of one connection (RFC 9110 §7.6.1), not passed on; `Host` is set apart.
fn hop_by_hop(name: &impl AsRef<str>) -> bool {
    matches!(
        name.as_ref().to_ascii_lowercase().as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "host"
            | "content-length"
            | FORWARDED_BY
    )
}

type Clients = Mutex<HashMap<(String, SocketAddr), reqwest::Client>>;

/// One client per (name, node address): it resolves the client's name to that node and
/// trusts the CA every node of the cluster shares (`tls/ca.pem`, copied with the root key).
fn client_for(
    platform: &Platform,
    host: &str,
    addr: SocketAddr,
) -> Result<reqwest::Client, String> {
    static CLIENTS: OnceLock<Arc<Clients>> = OnceLock::new();
    let clients = CLIENTS.get_or_init(Default::default);
    let mut map = clients.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(c) = map.get(&(host.to_string(), addr)) {
        return Ok(c.clone());
    }
    let ca_path = platform.config().data_dir.join("tls").join("ca.pem");
    let pem = std::fs::read(&ca_path).map_err(|e| format!("{}: {e}", ca_path.display()))?;
    let cert = reqwest::Certificate::from_pem(&pem).map_err(|e| e.to_string())?;
    let c = reqwest::Client::builder()
        .tls_certs_only([cert])
        .no_proxy()
        .timeout(FORWARD_TIMEOUT)
        .redirect(reqwest::redirect::Policy::none())
        .resolve(host, addr)
        .build()
        .map_err(|e| e.to_string())?;
    map.insert((host.to_string(), addr), c.clone());
    Ok(c)
}

#[cfg(test)]
mod tests {
    #[test]
    fn connection_headers_are_not_passed_on() {
        for h in [
            "Connection",
            "transfer-encoding",
            "Host",
            "x-kagi-forwarded-by",
        ] {
            assert!(super::hop_by_hop(&h), "{h}");
        }
        for h in [
            "authorization",
            "content-type",
            "prefer",
            "x-ms-client-request-id",
        ] {
            assert!(!super::hop_by_hop(&h), "{h}");
        }
    }
}
