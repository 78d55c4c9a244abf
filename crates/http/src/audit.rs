//! Auditing every request (KV-10): one record per request, written before the answer leaves.
//!
//! [`serve_audited`] wraps the host dispatch. Before any work it refuses with 503 when the
//! audit log cannot admit the request (unhealthy, or its reserve spoken for); after the answer is computed it appends the record and waits for
//! the acknowledgement (bounded), answering 503 instead of the computed response if the
//! record could not be written. `GET /healthz` on the management host is not audited.
//!
//! Records hold the request's method, path, peer address, user agent and correlation id, the
//! answer's status, error code and the object id it names — never a body, a key, a secret
//! value or a token. Handlers leave the authenticated caller in a [`CallerSlot`] in the
//! request's extensions ([`crate::context::note_caller`]).

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::http::{HeaderValue, Method, Request, Response, header};
use kagi_audit::{AuditLog, AuditRecord, Claim, Identity, RequestProperties, ResultType};
use kagi_vault::Platform;
use serde::Deserialize;

use crate::context::CallerSlot;

/// Header carrying the correlation id back to the client.
const REQUEST_ID: &str = "x-ms-request-id";
/// Header a client may send to choose the correlation id.
const CLIENT_REQUEST_ID: &str = "x-ms-client-request-id";
/// Longest URL, id or resource id kept in a record.
const MAX_URL: usize = 2048;
/// Longest user agent kept in a record.
const MAX_CLIENT_INFO: usize = 256;

/// Which API a request is for.
enum Target {
    Management,
    Vault(String),
    Unknown,
}

/// The 503 answered when the audit log cannot take the record.
fn unavailable(correlation: &str) -> Response<Body> {
    let mut r = crate::respond::json(
        503,
        &serde_json::json!({"error": {
            "code": "ServiceUnavailable",
            "message": "The audit log cannot be written; the request was not served."
        }}),
    );
    set_request_id(&mut r, correlation);
    r
}

fn set_request_id(r: &mut Response<Body>, correlation: &str) {
    if let Ok(v) = HeaderValue::from_str(correlation) {
        r.headers_mut().insert(REQUEST_ID, v);
    }
}

/// Printable ASCII only, at most `max` characters.
fn printable(text: &str, max: usize) -> String {
    text.chars()
        .filter(|c| c.is_ascii() && !c.is_ascii_control())
        .take(max)
        .collect()
}

/// The path as a record may show it: the IMDS-style managed-identity endpoint carries the
/// workload's binding secret in its second segment (`/imds/{secret}/metadata/...`).
/// Every segment that follows an `imds` segment is redacted, wherever it is and however it is
/// spelt (`/./imds/…`, `/%69mds/…`): the record must not hold a secret even of a path that is
/// not served.
fn redacted_path(path: &str) -> String {
    let segs: Vec<&str> = path.split('/').collect();
    let mut out: Vec<&str> = Vec::with_capacity(segs.len());
    for (i, seg) in segs.iter().enumerate() {
        let after_imds = i > 0 && percent_decoded(segs[i - 1]).eq_ignore_ascii_case(b"imds");
        out.push(if after_imds { "REDACTED" } else { seg });
    }
    out.join("/")
}

/// A path segment with its `%XX` escapes decoded (others kept as they are).
fn percent_decoded(seg: &str) -> Vec<u8> {
    let b = seg.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match (
            b[i],
            b.get(i + 1).copied().and_then(hex),
            b.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push(u8::try_from(h * 16 + l).unwrap_or(b'%'));
                i += 3;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    out
}

/// An error code as it may appear in `resultDescription`: a short identifier.
fn code(text: &str) -> Option<String> {
    let c: String = text
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
        .take(64)
        .collect();
    (!c.is_empty()).then_some(c)
}

/// The parts of a JSON answer an audit record may use. Everything else (key material,
/// secret values, tokens) is skipped without being kept.
#[derive(Deserialize, Default)]
struct Probe {
    kid: Option<String>,
    id: Option<String>,
    key: Option<KeyProbe>,
    error: Option<serde_json::Value>,
    access_token: Option<String>,
}

#[derive(Deserialize)]
struct KeyProbe {
    kid: Option<String>,
}

/// The claims of a token kagi itself just issued (no need to check its signature again).
#[derive(Deserialize)]
struct IssuedClaims {
    oid: String,
    appid: String,
    tid: String,
    #[serde(default)]
    upn: Option<String>,
}

fn issued_identity(token: &str) -> Option<Identity> {
    let payload = kagi_core::b64::decode(token.split('.').nth(1)?)?;
    let c: IssuedClaims = serde_json::from_slice(&payload).ok()?;
    Some(Identity {
        claim: Claim {
            oid: printable(&c.oid, 64),
            appid: printable(&c.appid, 64),
            tid: printable(&c.tid, 64),
            upn: c.upn.as_deref().map(|u| printable(u, 128)),
        },
    })
}

/// A key or secret id with a version (`https://v.host/keys/k/{version}`), if `url` is one.
fn versioned_object_id(url: &str) -> Option<String> {
    let rest = url.strip_prefix("https://")?;
    let (_, path) = rest.split_once('/')?;
    let segs: Vec<&str> = path.split('/').collect();
    match segs.as_slice() {
        [kind, name, version]
            if matches!(*kind, "keys" | "secrets") && !name.is_empty() && !version.is_empty() =>
        {
            Some(printable(url, MAX_URL))
        }
        _ => None,
    }
}

/// Operations whose answers are lists: not parsed (they may be large and name no one object).
fn is_list(operation: &str) -> bool {
    operation.contains("List")
}

/// Serves one request through the dispatch, auditing it. Everything logged while it is
/// served is inside a `request` span carrying the request id the audit record and the
/// `x-ms-request-id` header carry (`kagi server --log-format json` shows it on every line).
pub(crate) async fn serve_audited(
    platform: Arc<Platform>,
    audit: Arc<AuditLog>,
    req: Request<Body>,
) -> Response<Body> {
    use tracing::Instrument;
    let started = Instant::now();
    let correlation = req
        .headers()
        .get(CLIENT_REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| kagi_audit::sane_correlation_id(v))
        .map_or_else(kagi_audit::new_correlation_id, str::to_string);
    let span = tracing::info_span!("request", request_id = %correlation);
    serve_in_span(platform, audit, req, started, correlation)
        .instrument(span)
        .await
}

/// [`serve_audited`] inside the request's span.
async fn serve_in_span(
    platform: Arc<Platform>,
    audit: Arc<AuditLog>,
    mut req: Request<Body>,
    started: Instant,
    correlation: String,
) -> Response<Body> {
    let time = kagi_audit::format_rfc3339_ms(kagi_audit::now_unix_ms());
    let host = crate::routing::request_host(&req);
    let suffix = platform.config().dns_suffix.to_ascii_lowercase();
    let target = if host == suffix || host.is_empty() || host.parse::<std::net::IpAddr>().is_ok() {
        Target::Management
    } else {
        match host.strip_suffix(&format!(".{suffix}")) {
            Some(v) if !v.contains('.') => Target::Vault(v.to_string()),
            _ => Target::Unknown,
        }
    };
    let path = req.uri().path().to_string();
    if matches!(target, Target::Management)
        && req.method() == Method::GET
        && path.eq_ignore_ascii_case("/healthz")
    {
        return crate::routing::dispatch(platform, req).await;
    }
    let services = req.extensions().get::<crate::Services>().cloned();
    let method = req.method().to_string();
    // From a route table, so a bounded set (the metrics label requests with it).
    let op_label: &'static str = match &target {
        Target::Vault(_) => kagi_audit::data_plane_operation(&method, &path),
        Target::Management => management_operation(services.as_ref(), &method, &path),
        Target::Unknown => "UnknownOperation",
    };
    // Held until the record is written: the log keeps room for it even if the disk fills.
    let Some(_admission) = audit.admit() else {
        let r = unavailable(&correlation);
        answered(services.as_ref(), op_label, r.status().as_u16(), started);
        return r;
    };

    let origin = {
        let port = platform.config().port;
        let h = printable(&host, 255);
        if port == 443 {
            format!("https://{h}")
        } else {
            format!("https://{h}:{port}")
        }
    };
    let url = printable(&format!("{origin}{}", redacted_path(&path)), MAX_URL);
    let kept_query: Vec<String> = crate::respond::query_pairs(req.uri().query())
        .into_iter()
        .filter(|(k, _)| {
            ["api-version", "maxresults", "$skiptoken"]
                .iter()
                .any(|n| k.eq_ignore_ascii_case(n))
        })
        .map(|(k, v)| format!("{k}={}", printable(&v, 512)))
        .collect();
    let request_uri = if kept_query.is_empty() {
        url.clone()
    } else {
        printable(&format!("{url}?{}", kept_query.join("&")), MAX_URL)
    };
    let client_info = req
        .headers()
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .map(|v| printable(v, MAX_CLIENT_INFO))
        .unwrap_or_default();
    let caller_ip = req
        .extensions()
        .get::<crate::context::RemoteAddr>()
        .map(|a| a.0.ip().to_canonical().to_string());
    let slot = CallerSlot::default();
    req.extensions_mut().insert(slot.clone());
    let operation = op_label.to_string();
    let plane = match &target {
        Target::Vault(_) => crate::read_only::Plane::Vault,
        Target::Management => crate::read_only::Plane::Management,
        Target::Unknown => crate::read_only::Plane::Unknown,
    };
    // A read-only node refuses writes before any handler runs (still audited below).
    let response = if services.as_ref().is_some_and(crate::Services::read_only)
        && crate::read_only::is_write(plane, &method, &path, &operation)
    {
        crate::read_only::refusal(&operation)
    } else {
        crate::routing::dispatch(platform.clone(), req).await
    };
    let duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);

    let status = response.status().as_u16();
    let (parts, body) = response.into_parts();
    // Every answer kagi builds is already in memory, except files (a vault backup download),
    // which are streamed through untouched: the record needs nothing from their bytes.
    let streamed = parts
        .headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes() == b"application/octet-stream");
    let (bytes, passthrough) = if streamed {
        (axum::body::Bytes::new(), Some(body))
    } else {
        (
            axum::body::to_bytes(body, usize::MAX)
                .await
                .unwrap_or_default(),
            None,
        )
    };

    let wants_probe = status >= 400
        || (matches!(target, Target::Vault(_)) && !is_list(&operation))
        || operation == "Authentication";
    let is_json = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    let probe: Probe = if wants_probe && is_json && !bytes.is_empty() {
        serde_json::from_slice(&bytes).unwrap_or_default()
    } else {
        Probe::default()
    };

    let result_description = if status >= 400 {
        match &probe.error {
            Some(serde_json::Value::Object(e)) => e
                .get("code")
                .and_then(|c| c.as_str())
                .and_then(code)
                .map(|c| {
                    match e
                        .get("innererror")
                        .and_then(|i| i.get("code"))
                        .and_then(|c| c.as_str())
                        .and_then(code)
                    {
                        Some(inner) => format!("{c}/{inner}"),
                        None => c,
                    }
                }),
            // OAuth's shape: {"error": "invalid_client", ...}.
            Some(serde_json::Value::String(s)) => code(s),
            _ => None,
        }
    } else {
        None
    };

    let noted = slot.0.lock().unwrap_or_else(|p| p.into_inner()).take();
    let identity = match noted {
        Some(p) => Some(Identity {
            claim: Claim {
                oid: p.object_id,
                appid: p.client_id,
                tid: p.tenant_id,
                upn: p.upn,
            },
        }),
        None if status == 200 && operation == "Authentication" => {
            probe.access_token.as_deref().and_then(issued_identity)
        }
        None => None,
    };

    let (resource_id, is_rbac_authorized) = match &target {
        Target::Vault(v) => match platform.vault_audit_info(v) {
            Some((id, rbac)) => (id, Some(rbac)),
            None => (printable(&host, 255), None),
        },
        Target::Management if path.to_ascii_lowercase().starts_with("/subscriptions/") => {
            (printable(path.trim_end_matches('/'), MAX_URL), None)
        }
        // Agents: the resource they act on (the path's first eight segments after the prefix).
        Target::Management
            if path
                .to_ascii_lowercase()
                .starts_with("/kagi/agent/subscriptions/") =>
        {
            let vault: Vec<&str> = path["/kagi/agent".len()..]
                .trim_start_matches('/')
                .split('/')
                .take(8)
                .collect();
            (printable(&format!("/{}", vault.join("/")), MAX_URL), None)
        }
        _ => (printable(&host, 255), None),
    };
    let object_id = if matches!(target, Target::Vault(_)) {
        probe
            .key
            .as_ref()
            .and_then(|k| k.kid.as_deref())
            .or(probe.kid.as_deref())
            .or(probe.id.as_deref())
            .and_then(versioned_object_id)
    } else {
        None
    };

    let record = AuditRecord {
        time,
        operation_name: operation,
        result_type: ResultType::from_status(status),
        result_signature: kagi_audit::reason_phrase(status).to_string(),
        result_description,
        http_status_code: status,
        caller_ip_address: caller_ip,
        identity,
        resource_id,
        properties: RequestProperties {
            id: object_id.unwrap_or(url),
            request_uri,
            client_info,
            http_method: method,
            is_rbac_authorized,
        },
        correlation_id: correlation.clone(),
        duration_ms,
    };
    if let Err(e) = audit.append(record).await {
        tracing::error!(error = %e, "audit record not written; answering 503");
        let r = unavailable(&correlation);
        answered(services.as_ref(), op_label, r.status().as_u16(), started);
        return r;
    }
    answered(services.as_ref(), op_label, status, started);
    let mut response =
        Response::from_parts(parts, passthrough.unwrap_or_else(|| Body::from(bytes)));
    set_request_id(&mut response, &correlation);
    response
}

/// Logs a request's answer (the `request` span carries its id) and counts it in the metrics
/// when they are on.
fn answered(
    services: Option<&crate::Services>,
    operation: &'static str,
    status: u16,
    started: Instant,
) {
    let elapsed = started.elapsed();
    tracing::info!(
        target: "kagi_http::access",
        operation,
        status,
        duration_ms = u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX),
        "request answered"
    );
    if let Some(metrics) = services.and_then(crate::Services::metrics) {
        metrics.observe_request(
            kagi_metrics::OperationName::Fixed(operation),
            status,
            elapsed,
        );
    }
}

/// The operation name of a management request: its route's (the platform's table or a storage
/// service's), or `UnknownOperation` for a request no route serves (answered 404 or 405).
fn management_operation(
    services: Option<&crate::Services>,
    method: &str,
    path: &str,
) -> &'static str {
    let segs = crate::route_table::management_segments(path);
    crate::route_table::find_management(services, method, &segs)
        .map_or("UnknownOperation", |found| found.route.operation)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versioned_ids_only() {
        let v = "https://v.localhost:8443/keys/k/0123456789abcdef0123456789abcdef";
        assert_eq!(versioned_object_id(v).as_deref(), Some(v));
        assert!(versioned_object_id("https://v.localhost:8443/keys/k").is_none());
        assert!(versioned_object_id("/subscriptions/s").is_none());
        assert!(versioned_object_id("https://v.localhost:8443/secrets/s/abc").is_some());
    }

    #[test]
    fn issued_identity_reads_the_payload_only() {
        let payload = kagi_core::b64::encode(br#"{"oid":"o","appid":"a","tid":"t","x":1}"#);
        let id = issued_identity(&format!("h.{payload}.sig")).unwrap();
        assert_eq!(id.claim.oid, "o");
        assert_eq!(id.claim.appid, "a");
        assert_eq!(id.claim.tid, "t");
        assert!(issued_identity("garbage").is_none());
    }

    #[test]
    fn binding_secrets_are_redacted() {
        assert_eq!(
            redacted_path("/imds/s3cr3t/metadata/identity/oauth2/token"),
            "/imds/REDACTED/metadata/identity/oauth2/token"
        );
        assert_eq!(redacted_path("/keys/k"), "/keys/k");
        assert_eq!(
            redacted_path("/./imds/s3cr3t/metadata"),
            "/./imds/REDACTED/metadata"
        );
        assert_eq!(redacted_path("/%69MDS/s3cr3t/x"), "/%69MDS/REDACTED/x");
        assert_eq!(redacted_path("/a/imds"), "/a/imds");
        assert_eq!(redacted_path("/"), "/");
    }

    #[test]
    fn codes_are_identifiers() {
        assert_eq!(code("Forbidden").as_deref(), Some("Forbidden"));
        assert_eq!(code("a b\"c").as_deref(), Some("abc"));
        assert!(code("  ").is_none());
    }
}
