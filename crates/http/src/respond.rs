//! Turning results into responses, and requests into their parts.

use axum::body::Body;
use axum::http::{HeaderValue, Response, StatusCode, header};
use kagi_core::KvError;
use serde::Serialize;

/// A JSON response with a status.
pub(crate) fn json(status: u16, body: &impl Serialize) -> Response<Body> {
    let bytes = serde_json::to_vec(body).unwrap_or_else(|_| b"{}".to_vec());
    let mut r = Response::new(Body::from(bytes));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    r
}

/// An empty response.
pub(crate) fn empty(status: u16) -> Response<Body> {
    let mut r = Response::new(Body::empty());
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::NO_CONTENT);
    r
}

/// An error in Azure's shape.
pub(crate) fn error(e: &KvError) -> Response<Body> {
    json(e.status(), &e.body())
}

/// Parses a query string into pairs.
pub(crate) fn query_pairs(query: Option<&str>) -> Vec<(String, String)> {
    form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

/// The first value of a query parameter (case-insensitive name, as Azure treats them).
pub(crate) fn query_get<'a>(pairs: &'a [(String, String)], name: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// The `$filter` query parameter, if given and not blank (az sends `$filter=` for none).
pub(crate) fn odata_filter(pairs: &[(String, String)]) -> Option<&str> {
    query_get(pairs, "$filter").filter(|f| !f.trim().is_empty())
}

/// The most a body's buffer is sized to before its bytes arrive: a Content-Length alone (sent
/// by anyone, the token endpoint is unauthenticated) must not pin a whole [`crate::MAX_BODY`]
/// per request or stream. Larger bodies grow the buffer as they arrive.
const PREALLOCATE_AT_MOST: usize = 64 * 1024;

/// Reads a body up to [`crate::MAX_BODY`]; a larger one is refused without being kept.
pub(crate) async fn read_body(
    headers: &axum::http::HeaderMap,
    body: Body,
) -> Result<axum::body::Bytes, KvError> {
    // Taken out of its wrapper and turned into `Bytes` without a copy: nothing is left to wipe.
    Ok(std::mem::take(&mut *read_secret_body(headers, body).await?).into())
}

/// Reads a body up to [`crate::MAX_BODY`] into a buffer wiped when dropped, for bodies that
/// carry secrets (a password, a client secret) and are not handed on as `Bytes`.
pub(crate) async fn read_secret_body(
    headers: &axum::http::HeaderMap,
    body: Body,
) -> Result<zeroize::Zeroizing<Vec<u8>>, KvError> {
    use http_body_util::BodyExt;
    let too_large = || {
        KvError::new(
            kagi_core::ErrorCode::RequestEntityTooLarge,
            format!("The request body is larger than {} bytes.", crate::MAX_BODY),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    // What is not read here is drained by the server after the answer (`crate::server`), so
    // the client, which sends its whole body first, still gets the 413.
    if declared.is_some_and(|len| len > crate::MAX_BODY as u64) {
        return Err(too_large());
    }
    let mut body = body;
    // Bodies can carry key material (imports, wrapKey plaintexts, secret values): sized from
    // Content-Length up front (within bounds), and grown without leaving unwiped copies behind.
    let mut buf = zeroize::Zeroizing::new(Vec::with_capacity(
        declared.map_or(0, |len| len.min(PREALLOCATE_AT_MOST as u64) as usize),
    ));
    let mut seen = 0usize;
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            return Err(KvError::bad_parameter(
                "The request body could not be read.",
            ));
        };
        if let Ok(data) = frame.into_data() {
            seen += data.len();
            if seen > crate::MAX_BODY {
                return Err(too_large());
            }
            append_wiping(&mut buf, &data);
        }
    }
    Ok(buf)
}

/// Appends `data`; when `buf` is full its contents move to a larger buffer and the old one is
/// wiped, where `Vec`'s own growth would free it as it is.
fn append_wiping(buf: &mut zeroize::Zeroizing<Vec<u8>>, data: &[u8]) {
    if buf.capacity() - buf.len() < data.len() {
        let needed = buf.len() + data.len();
        let mut larger = zeroize::Zeroizing::new(Vec::with_capacity(
            (2 * buf.capacity()).min(crate::MAX_BODY).max(needed),
        ));
        larger.extend_from_slice(buf);
        std::mem::swap(buf, &mut larger);
    }
    buf.extend_from_slice(data);
}

/// Parses a JSON body into `T`, with Azure's 400 on failure.
pub(crate) fn parse_json<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, KvError> {
    if bytes.is_empty() {
        return Err(KvError::bad_parameter(
            "The request body is empty; a JSON object is required.",
        ));
    }
    serde_json::from_slice(bytes).map_err(|e| {
        // serde's message names the field and the expected type; cut it short.
        let msg: String = e.to_string().chars().take(200).collect();
        KvError::bad_parameter(format!("The request body is not valid: {msg}"))
    })
}

/// The bearer token of a request, if any.
pub(crate) fn bearer(headers: &axum::http::HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn declaring(len: usize) -> axum::http::HeaderMap {
        let mut h = axum::http::HeaderMap::new();
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
        h
    }

    #[tokio::test]
    async fn a_declared_length_alone_does_not_size_the_buffer() {
        // A Content-Length of 1 MiB, and three bytes: the buffer is not sized to the promise.
        let bytes = read_body(&declaring(crate::MAX_BODY), Body::from("a=b"))
            .await
            .unwrap();
        let buf = Vec::from(bytes);
        assert_eq!(buf, b"a=b");
        assert!(
            buf.capacity() <= PREALLOCATE_AT_MOST,
            "{} bytes allocated",
            buf.capacity()
        );
    }

    #[tokio::test]
    async fn bodies_larger_than_the_preallocation_still_arrive_whole() {
        let data: Vec<u8> = (0..crate::MAX_BODY).map(|i| (i % 251) as u8).collect();
        let got = read_secret_body(&declaring(data.len()), Body::from(data.clone()))
            .await
            .unwrap();
        assert!(*got == data);
        let e = read_body(
            &declaring(data.len() + 1),
            Body::from(vec![0u8; data.len() + 1]),
        )
        .await
        .unwrap_err();
        assert_eq!(e.status(), 413);
    }
}
