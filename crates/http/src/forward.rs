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
use kagi_host::{ArmRequest, ResourceProvider};
use kagi_vault::Platform;

use crate::respond;

/// The header a forwarded request carries: the name of the node that forwarded it.
pub(crate) const FORWARDED_BY: &str = "x-kagi-forwarded-by";

/// How long a forwarded request may take (a disk import or copy answers 202 quickly; a
/// `Prefer: wait` job read waits at most 60 s).
const FORWARD_TIMEOUT: Duration = Duration::from_secs(120);

/// How often a forwarded request that waits for its answer checks that the home is still
/// present.
const PRESENCE_CHECK: Duration = Duration::from_secs(2);

/// How long the home may take to accept a connection (TCP and TLS): a home that is gone
/// without its presence lease having lapsed yet is answered 503 at once, not after
/// [`FORWARD_TIMEOUT`].
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Clients kept, one per node; more nodes than this (names of nodes long gone) start the
/// cache afresh.
const KEPT_CLIENTS: usize = 64;

/// The node other than this one that must serve `req` of `provider`
/// ([`ResourceProvider::home`]), if any. None on one node (SQLite, a store no other node can
/// share): everything is served here, whatever homes were recorded (a data directory copied
/// elsewhere, or its `node-name` made anew).
pub(crate) async fn home_elsewhere(
    platform: &Platform,
    provider: &dyn ResourceProvider,
    req: &ArmRequest<'_>,
) -> Result<Option<String>, KvError> {
    Ok(home_node(platform, provider, req)
        .await?
        .filter(|home| home != platform.node_name()))
}

/// The node that must serve `req` of `provider`, this one included, if it names one; none on
/// one node (see [`home_elsewhere`]).
pub(crate) async fn home_node(
    platform: &Platform,
    provider: &dyn ResourceProvider,
    req: &ArmRequest<'_>,
) -> Result<Option<String>, KvError> {
    if !platform.shares_store() {
        return Ok(None);
    }
    provider.home(req).await
}

/// What `f` makes of a `method` request without a body on resource `id`, as a client would
/// send it (to ask a provider where it is served, or to have it served).
pub(crate) async fn on_resource<T>(
    method: &str,
    id: &str,
    f: impl AsyncFnOnce(ArmRequest<'_>) -> T,
) -> T {
    let segs: Vec<&str> = id.trim_matches('/').split('/').collect();
    let lower: Vec<String> = segs.iter().map(|s| s.to_ascii_lowercase()).collect();
    let l: Vec<&str> = lower.iter().map(String::as_str).collect();
    f(ArmRequest {
        method,
        segs: &segs,
        l: &l,
        body: &[],
        wait: None,
    })
    .await
}

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

/// The 504 for a request the home accepted and then did not answer in full (it failed, or
/// stopped, while serving it): not retried blindly, since it may have been done.
fn gateway_timeout(home: &str) -> Response<Body> {
    respond::json(
        504,
        &serde_json::json!({"error": {
            "code": "GatewayTimeout",
            "message": format!(
                "The node '{home}' serving the resource accepted the request but did not \
                 answer it. Whether it was done is unknown: read the resource before retrying."
            ),
        }}),
    )
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
    let client = match client_for(platform, home, addr) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot make the forwarding client");
            return respond::error(&KvError::internal());
        }
    };
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let url = format!("https://{host_name}:{}{path}", addr.port());
    let from = Sender {
        node: platform.node_name(),
        home,
        host_header: &host_header,
    };
    // A home that accepted the request and then stopped (paused, cut off) never answers: once
    // its presence lapses, the wait ends (504), and the client's next request is served
    // without it (a disk or SQL server is taken over).
    let lapsed = async {
        loop {
            tokio::time::sleep(PRESENCE_CHECK).await;
            match platform.live_nodes().await {
                Ok(nodes) if !nodes.iter().any(|n| n.name == home) => return,
                _ => {}
            }
        }
    };
    tokio::select! {
        answer = send(&client, &url, &from, parts, body) => answer,
        () = lapsed => {
            tracing::warn!(node = %home, "the resource's node stopped being present while it served a forwarded request");
            gateway_timeout(home)
        }
    }
}

/// Who sends a forwarded request, to which node, with which `Host`.
struct Sender<'a> {
    /// This node's name (`x-kagi-forwarded-by`).
    node: &'a str,
    /// The home's name, for the answers naming it.
    home: &'a str,
    /// The `Host` header as the client sent it.
    host_header: &'a str,
}

/// Sends the request (`parts`, `body`) to `url` with `client` and answers with the answer: 503
/// (`Retry-After`) when the home did not accept the connection, 504 when it accepted the
/// request but its answer did not come whole.
async fn send(
    client: &reqwest::Client,
    url: &str,
    from: &Sender<'_>,
    parts: &Parts,
    body: axum::body::Bytes,
) -> Response<Body> {
    let home = from.home;
    let Ok(method) = reqwest::Method::from_bytes(parts.method.as_str().as_bytes()) else {
        return respond::error(&KvError::new(ErrorCode::BadRequest, "Unknown method."));
    };
    let mut req = client.request(method, url).body(body);
    for (name, value) in &parts.headers {
        if !hop_by_hop(name) {
            req = req.header(name.as_str(), value.as_bytes());
        }
    }
    req = req
        .header(header::HOST.as_str(), from.host_header)
        .header(FORWARDED_BY, from.node);
    let answer = match req.send().await {
        Ok(a) => a,
        Err(e) if e.is_connect() => {
            tracing::warn!(node = %home, error = %e, "cannot connect to the resource's node");
            return unavailable(format!(
                "The node '{home}' serving the resource did not answer. Retry the request."
            ));
        }
        Err(e) => {
            tracing::warn!(node = %home, error = %e, "forwarded request failed after it was sent");
            return gateway_timeout(home);
        }
    };
    let status = answer.status().as_u16();
    let headers = answer.headers().clone();
    let bytes = match answer.bytes().await {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(node = %home, error = %e, "forwarded answer cut short");
            return gateway_timeout(home);
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

/// A node's client and the address it was made for.
struct NodeClient {
    addr: SocketAddr,
    client: reqwest::Client,
}

type Clients = Mutex<HashMap<String, NodeClient>>;

/// The client for node `node` at `addr`: one per node, made anew when its card names another
/// address. It sends every name to that address (the name the client used is the one the
/// home's certificate is for) and trusts the CA every node of the cluster shares
/// (`tls/ca.pem`, copied with the root key).
fn client_for(
    platform: &Platform,
    node: &str,
    addr: SocketAddr,
) -> Result<reqwest::Client, String> {
    static CLIENTS: OnceLock<Arc<Clients>> = OnceLock::new();
    let clients = CLIENTS.get_or_init(Default::default);
    let mut map = clients.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(c) = map.get(node).filter(|c| c.addr == addr) {
        return Ok(c.client.clone());
    }
    let ca_path = platform.config().data_dir.join("tls").join("ca.pem");
    let pem = std::fs::read(&ca_path).map_err(|e| format!("{}: {e}", ca_path.display()))?;
    let client = build_client(&pem, addr, CONNECT_TIMEOUT)?;
    if map.len() >= KEPT_CLIENTS && !map.contains_key(node) {
        map.clear();
    }
    map.insert(
        node.to_string(),
        NodeClient {
            addr,
            client: client.clone(),
        },
    );
    Ok(client)
}

/// A client that reaches `addr` whatever the name in the URL, trusting only `ca_pem`.
fn build_client(
    ca_pem: &[u8],
    addr: SocketAddr,
    connect_timeout: Duration,
) -> Result<reqwest::Client, String> {
    let cert = reqwest::Certificate::from_pem(ca_pem).map_err(|e| e.to_string())?;
    reqwest::Client::builder()
        .tls_certs_only([cert])
        .no_proxy()
        .connect_timeout(connect_timeout)
        .timeout(FORWARD_TIMEOUT)
        .redirect(reqwest::redirect::Policy::none())
        .dns_resolver(Arc::new(NodeAddress(addr)))
        .build()
        .map_err(|e| e.to_string())
}

/// Resolves every name to one node's address.
struct NodeAddress(SocketAddr);

impl reqwest::dns::Resolve for NodeAddress {
    fn resolve(&self, _name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let addr = self.0;
        Box::pin(async move {
            let addrs: reqwest::dns::Addrs = Box::new(std::iter::once(addr));
            Ok(addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::time::Instant;

    use tokio::io::AsyncReadExt;

    use super::*;
    use crate::tls::{LocalCa, SniResolver};

    /// A disk's `GET` as a client sent it, forwarded with a client trusting `ca_pem` to a home
    /// at `addr`: the answer, and how long it took.
    async fn forward_to(addr: SocketAddr, ca_pem: &str) -> (Response<Body>, Duration) {
        let path = "/subscriptions/s/resourceGroups/g/providers/Microsoft.Compute/disks/d?api-version=2023-04-02";
        let (parts, ()) = axum::http::Request::builder()
            .uri(path)
            .header(header::HOST, format!("localhost:{}", addr.port()))
            .body(())
            .unwrap()
            .into_parts();
        let client = build_client(ca_pem.as_bytes(), addr, CONNECT_TIMEOUT).unwrap();
        let host_header = format!("localhost:{}", addr.port());
        let from = Sender {
            node: "here-1",
            home: "there-2",
            host_header: &host_header,
        };
        let url = format!("https://localhost:{}{path}", addr.port());
        let started = Instant::now();
        let r = send(&client, &url, &from, &parts, axum::body::Bytes::new()).await;
        (r, started.elapsed())
    }

    async fn error_code(r: Response<Body>) -> String {
        let bytes = axum::body::to_bytes(r.into_body(), 1 << 16).await.unwrap();
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        v["error"]["code"].as_str().unwrap_or_default().to_string()
    }

    #[tokio::test]
    async fn a_home_that_does_not_accept_the_connection_is_answered_503_at_once() {
        // TCP is accepted, TLS never answered: a home that hangs.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let holder = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((tcp, _)) = listener.accept().await {
                held.push(tcp);
            }
        });
        let ca = LocalCa::scratch("localhost");
        let (r, took) = forward_to(addr, &ca.cert_pem).await;
        holder.abort();
        assert_eq!(r.status(), 503);
        assert!(r.headers().contains_key(header::RETRY_AFTER));
        assert!(
            took >= CONNECT_TIMEOUT && took < CONNECT_TIMEOUT + Duration::from_secs(5),
            "{took:?}"
        );
        assert_eq!(error_code(r).await, "ServiceUnavailable");
    }

    #[tokio::test]
    async fn a_home_that_fails_after_taking_the_request_is_answered_504() {
        // The home's TLS and the request are taken; then it goes without an answer.
        let ca = LocalCa::scratch("localhost");
        let ca_pem = ca.cert_pem.clone();
        let config =
            crate::tls::server_config(SniResolver::new(ca, "localhost"), Vec::new()).unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let home = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut tls = acceptor.accept(tcp).await.unwrap();
            let mut head = [0u8; 4096];
            let n = tls.read(&mut head).await.unwrap();
            String::from_utf8_lossy(&head[..n]).to_string()
        });
        let (r, _) = forward_to(addr, &ca_pem).await;
        let request = home.await.unwrap();
        assert!(request.starts_with("GET /subscriptions/s/"), "{request}");
        // The Host the client sent, and the marker, reach the home.
        let lower = request.to_ascii_lowercase();
        assert!(
            lower.contains(&format!("host: localhost:{}\r\n", addr.port())),
            "{request}"
        );
        assert!(
            lower.contains("x-kagi-forwarded-by: here-1\r\n"),
            "{request}"
        );
        assert_eq!(r.status(), 504);
        assert!(!r.headers().contains_key(header::RETRY_AFTER));
        assert_eq!(error_code(r).await, "GatewayTimeout");
    }

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
