//! Routes of whole-vault backup and restore, and of the jobs that run them (management host,
//! bootstrap administrator only):
//!
//! - `POST {vault id}/backup?api-version=…` with `{"passphrase": "…"}` or `{"keyId": "…"}`:
//!   202 and the job, with `Azure-AsyncOperation` (and `Location`) naming its status URL.
//! - `POST {vault id}/restore?api-version=…[&location=L][&keyId=K]` with the backup file as the
//!   body (`application/octet-stream`, up to 1 GiB — this route alone takes bodies over 1 MiB;
//!   the body is streamed into `<data>/jobs/`) and, for a passphrase-protected file, the
//!   header `x-kagi-backup-passphrase: <base64 of the UTF-8 passphrase>`: 202 and the job.
//! - `GET /kagi/jobs/{id}`: the job (`status`, `progress`, `startTime`, `endTime`, `error`).
//! - `GET /kagi/jobs/{id}/result`: the backup file once the job is Completed.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, HeaderValue, Method, Response, header};
use http_body_util::BodyExt;
use kagi_core::{ErrorCode, KvError};
use kagi_vault::{BackupRequest, MAX_RESTORE_FILE, Platform, Principal, RestoreRequest};
use tokio::io::{AsyncRead, AsyncWriteExt, ReadBuf};
use zeroize::Zeroizing;

use crate::respond::{self, parse_json, query_get, query_pairs};

/// Header carrying the passphrase of a restore (base64 or base64url of its UTF-8 bytes).
pub(crate) const PASSPHRASE_HEADER: &str = "x-kagi-backup-passphrase";

/// Whether a management path is one of these routes.
pub(crate) fn matches(l: &[&str], method: &Method) -> bool {
    matches!(
        (l, method),
        (
            ["kagi", "jobs", _] | ["kagi", "jobs", _, "result"],
            &Method::GET
        ) | (
            [
                "subscriptions",
                _,
                "resourcegroups",
                _,
                "providers",
                "microsoft.keyvault",
                "vaults",
                _,
                "backup" | "restore",
            ],
            &Method::POST,
        )
    )
}

/// Serves one of the routes [`matches`] accepts.
pub(crate) async fn handle(
    platform: Arc<Platform>,
    caller: &Principal,
    l: &[&str],
    segs: &[&str],
    query: Option<&str>,
    headers: &HeaderMap,
    body: Body,
) -> Response<Body> {
    let r = match l {
        ["kagi", "jobs", _] => platform
            .job(caller, segs[2])
            .await
            .map(|v| respond::json(200, &v)),
        ["kagi", "jobs", _, "result"] => download(&platform, caller, segs[2]).await,
        [.., "backup"] => backup(&platform, caller, segs, query, headers, body).await,
        _ => restore(&platform, caller, segs, query, headers, body).await,
    };
    r.unwrap_or_else(|e| respond::error(&e))
}

fn accepted(platform: &Platform, job: &serde_json::Value) -> Response<Body> {
    let mut r = respond::json(202, job);
    let id = job["id"].as_str().unwrap_or("");
    if let Ok(v) = HeaderValue::from_str(&platform.job_url(id)) {
        r.headers_mut().insert("azure-asyncoperation", v.clone());
        r.headers_mut().insert(header::LOCATION, v);
    }
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    r
}

async fn backup(
    platform: &Arc<Platform>,
    caller: &Principal,
    segs: &[&str],
    query: Option<&str>,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response<Body>, KvError> {
    let pairs = query_pairs(query);
    kagi_core::api_version::check_arm(query_get(&pairs, "api-version"))?;
    let bytes = Zeroizing::new(respond::read_body(headers, body).await?.to_vec());
    let req: BackupRequest = parse_json(&bytes)?;
    let job = platform
        .start_vault_backup(caller, segs[1], segs[3], segs[7], req)
        .await?;
    Ok(accepted(platform, &job))
}

fn passphrase(headers: &HeaderMap) -> Result<Option<Zeroizing<String>>, KvError> {
    let Some(v) = headers.get(PASSPHRASE_HEADER) else {
        return Ok(None);
    };
    let bad = || {
        KvError::bad_parameter(format!(
            "The {PASSPHRASE_HEADER} header must be the base64 of the UTF-8 passphrase."
        ))
    };
    let text: String = v
        .to_str()
        .map_err(|_| bad())?
        .trim()
        .trim_end_matches('=')
        .replace('+', "-")
        .replace('/', "_");
    let raw = Zeroizing::new(kagi_core::b64::decode(&text).ok_or_else(bad)?);
    let s = std::str::from_utf8(&raw).map_err(|_| bad())?;
    Ok(Some(Zeroizing::new(s.to_string())))
}

async fn restore(
    platform: &Arc<Platform>,
    caller: &Principal,
    segs: &[&str],
    query: Option<&str>,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response<Body>, KvError> {
    let pairs = query_pairs(query);
    kagi_core::api_version::check_arm(query_get(&pairs, "api-version"))?;
    let location = query_get(&pairs, "location").map(str::to_string);
    let (sub, rg, name) = (segs[1], segs[3], segs[7]);
    let req = RestoreRequest {
        passphrase: passphrase(headers)?,
        key_id: query_get(&pairs, "keyId").map(str::to_string),
        location,
    };
    // Refuse before receiving up to 1 GiB.
    platform
        .check_vault_restore(caller, sub, rg, name, req.location.as_deref())
        .await?;
    let too_large = || {
        KvError::new(
            ErrorCode::RequestEntityTooLarge,
            format!("A vault backup file is at most {MAX_RESTORE_FILE} bytes."),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_RESTORE_FILE) {
        return Err(too_large());
    }
    let (path, file) = platform.create_restore_upload()?;
    if let Err(e) = receive(body, file, MAX_RESTORE_FILE).await {
        let _ = tokio::fs::remove_file(&path).await;
        return Err(match e {
            Receive::TooLarge => too_large(),
            Receive::Body => KvError::bad_parameter("The request body could not be read."),
            Receive::Io(e) => {
                tracing::error!(error = %e, "restore upload not written");
                KvError::internal()
            }
        });
    }
    let job = platform
        .start_vault_restore(caller, sub, rg, name, path, req)
        .await?;
    Ok(accepted(platform, &job))
}

enum Receive {
    TooLarge,
    Body,
    Io(std::io::Error),
}

/// Streams a request body into `file`, at most `limit` bytes.
async fn receive(body: Body, file: std::fs::File, limit: u64) -> Result<(), Receive> {
    let mut out = tokio::io::BufWriter::with_capacity(256 * 1024, tokio::fs::File::from_std(file));
    let mut body = body;
    let mut seen = 0u64;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|_| Receive::Body)?;
        if let Ok(data) = frame.into_data() {
            seen += data.len() as u64;
            if seen > limit {
                return Err(Receive::TooLarge);
            }
            out.write_all(&data).await.map_err(Receive::Io)?;
        }
    }
    out.flush().await.map_err(Receive::Io)?;
    out.into_inner().sync_all().await.map_err(Receive::Io)?;
    Ok(())
}

async fn download(
    platform: &Platform,
    caller: &Principal,
    id: &str,
) -> Result<Response<Body>, KvError> {
    let (path, len) = platform.job_result_file(caller, id).await?;
    let file = tokio::fs::File::open(&path).await.map_err(|e| {
        tracing::error!(error = %e, "backup result not readable");
        KvError::internal()
    })?;
    let mut r = Response::new(Body::new(FileBody {
        file,
        remaining: len,
    }));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    if let Ok(v) = HeaderValue::from_str(&format!(
        "attachment; filename=\"{}.kvbak\"",
        id.to_ascii_lowercase()
    )) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    Ok(r)
}

/// A file as a response body, read in 256 KiB frames.
struct FileBody {
    file: tokio::fs::File,
    remaining: u64,
}

impl hyper::body::Body for FileBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, std::io::Error>>> {
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        let want = usize::try_from(self.remaining.min(256 * 1024)).unwrap_or(256 * 1024);
        let mut buf = vec![0u8; want];
        let mut rb = ReadBuf::new(&mut buf);
        match Pin::new(&mut self.file).poll_read(cx, &mut rb) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Err(e)) => Poll::Ready(Some(Err(e))),
            Poll::Ready(Ok(())) => {
                let n = rb.filled().len();
                if n == 0 {
                    return Poll::Ready(Some(Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the backup file is shorter than announced",
                    ))));
                }
                self.remaining -= n as u64;
                buf.truncate(n);
                Poll::Ready(Some(Ok(hyper::body::Frame::data(Bytes::from(buf)))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        hyper::body::SizeHint::with_exact(self.remaining)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        let vault = [
            "subscriptions",
            "s",
            "resourcegroups",
            "rg",
            "providers",
            "microsoft.keyvault",
            "vaults",
            "v",
            "backup",
        ];
        assert!(matches(&vault, &Method::POST));
        assert!(!matches(&vault, &Method::GET));
        assert!(matches(&["kagi", "jobs", "x"], &Method::GET));
        assert!(matches(&["kagi", "jobs", "x", "result"], &Method::GET));
        assert!(!matches(&["kagi", "jobs"], &Method::GET));
        assert!(!matches(&vault[..8], &Method::POST));
    }

    #[test]
    fn passphrase_header_is_base64() {
        let mut h = HeaderMap::new();
        assert!(passphrase(&h).unwrap().is_none());
        h.insert(
            PASSPHRASE_HEADER,
            HeaderValue::from_static("cMOkc3MgcGhyYXNl"),
        );
        assert_eq!(passphrase(&h).unwrap().unwrap().as_str(), "päss phrase");
        h.insert(PASSPHRASE_HEADER, HeaderValue::from_static("not base64!"));
        assert!(passphrase(&h).is_err());
    }
}
