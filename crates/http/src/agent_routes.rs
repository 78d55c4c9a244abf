//! Agents' routes (`/kagi/agent/{resource id}/…`, management host): authenticated by the
//! provider of the resource's namespace (backup agents: by vault credentials or a machine
//! credential rather than a bearer token) before their bodies are read, and carrying objects
//! up to the limit it sets (64 MiB for backup agents). Served by that provider
//! ([`kagi_host::ResourceProvider::admit_agent`]); this only translates. The backup agents'
//! protocol is in `docs/AGENT.md`.

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, Method, Response, StatusCode, header};
use http_body_util::BodyExt;
use kagi_core::{ErrorCode, KvError};
use kagi_host::{AgentCall, AgentHead, AgentReply, MAX_AGENT_JSON_BYTES as MAX_JSON_BYTES};
use kagi_vault::Principal;
use zeroize::Zeroizing;

use crate::respond::{self, query_get, query_pairs};

/// `Range: bytes=a-b` (inclusive) as a half-open range.
fn range_of(headers: &HeaderMap) -> Result<Option<(u64, u64)>, KvError> {
    let Some(v) = headers.get(header::RANGE) else {
        return Ok(None);
    };
    let bad = || KvError::bad_parameter("Only 'Range: bytes=FIRST-LAST' is supported.");
    let s = v.to_str().map_err(|_| bad())?;
    let (a, b) = s
        .strip_prefix("bytes=")
        .and_then(|r| r.split_once('-'))
        .ok_or_else(bad)?;
    let (a, b): (u64, u64) = (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
    if b < a {
        return Err(bad());
    }
    Ok(Some((a, b.checked_add(1).ok_or_else(bad)?)))
}

/// Reads a body of at most `limit` bytes (the caller is authorized by then) into a buffer
/// wiped when dropped. A JSON route's body (a passphrase, a key proof, a machine secret) gets
/// its whole limit up front, so the buffer never moves and leaves no unwiped copy behind; an
/// object (ciphertext) gets its announced length.
async fn read_limited(
    content_length: Option<u64>,
    body: Body,
    limit: usize,
) -> Result<Zeroizing<Vec<u8>>, KvError> {
    let too_large = || {
        KvError::new(
            ErrorCode::RequestEntityTooLarge,
            format!("The request body is larger than {limit} bytes."),
        )
    };
    if content_length.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    let mut body = body;
    let mut buf = Zeroizing::new(Vec::with_capacity(if limit <= MAX_JSON_BYTES {
        limit
    } else {
        content_length.map_or(0, |n| n as usize)
    }));
    while let Some(frame) = body.frame().await {
        let frame =
            frame.map_err(|_| KvError::bad_parameter("The request body could not be read."))?;
        if let Ok(data) = frame.into_data() {
            if buf.len() + data.len() > limit {
                return Err(too_large());
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok(buf)
}

/// Serves an agent request by `provider`, whose route table holds it (`None`: 404).
pub(crate) async fn handle(
    provider: Option<std::sync::Arc<dyn kagi_host::ResourceProvider>>,
    method: &Method,
    segs: &[&str],
    query: Option<&str>,
    headers: &HeaderMap,
    extensions: &axum::http::Extensions,
    body: Body,
) -> Response<Body> {
    let range = match range_of(headers) {
        Ok(r) => r,
        Err(e) => return respond::error(&e),
    };
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let content_length = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    // Authenticate and authorize before reading the body: only a machine writing its own
    // objects gets to send 64 MiB, and only within its vault's quota and the disk's reserve.
    let head = AgentHead {
        method: method.as_str(),
        segs: &segs[2..],
        authorization,
        content_length,
    };
    let Some(provider) = provider else {
        return respond::error(&KvError::new(ErrorCode::NotFound, "No such agent route."));
    };
    let session = match provider.admit_agent(head).await {
        Ok(s) => s,
        Err(e) => return respond::error(&e),
    };
    crate::context::note_caller(
        extensions,
        &Principal {
            tenant_id: String::new(),
            object_id: session.caller().to_string(),
            client_id: String::new(),
            kind: "Agent".into(),
            network_address: None,
            upn: None,
        },
    );
    let body = match read_limited(content_length, body, session.body_limit()).await {
        Ok(b) => b,
        Err(e) => return respond::error(&e),
    };
    let pairs = query_pairs(query);
    let prefix = query_get(&pairs, "prefix").unwrap_or("");
    let r = session
        .serve(AgentCall {
            method: method.as_str(),
            segs: &segs[2..],
            prefix,
            range,
            body,
        })
        .await;
    match r {
        Ok(AgentReply::Json(s, v)) => respond::json(s, &v),
        Ok(AgentReply::Empty(s)) => respond::empty(s),
        Ok(AgentReply::Bytes(b)) => {
            let mut r = Response::new(Body::from(b));
            *r.status_mut() = StatusCode::OK;
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            r
        }
        Err(e) => respond::error(&e),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn a_json_body_is_read_into_one_buffer_wiped_on_drop() {
        // A passphrase, with no Content-Length.
        let body = Body::from(b"secret-passphrase-".repeat(100));
        let buf: Zeroizing<Vec<u8>> = read_limited(None, body, MAX_JSON_BYTES).await.unwrap();
        assert_eq!(buf.len(), 1800);
        // Allocated once, at the limit: never grown, so no copy was freed unwiped.
        assert_eq!(buf.capacity(), MAX_JSON_BYTES);
        let too_large = Body::from(vec![b'x'; MAX_JSON_BYTES + 1]);
        let e = read_limited(None, too_large, MAX_JSON_BYTES)
            .await
            .unwrap_err();
        assert_eq!(e.status(), 413);
    }
}
