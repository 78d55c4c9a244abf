//! `Microsoft.RecoveryServices` (backup vaults, their items, jobs and activity log): served by
//! `kagi-backup-service`; this only translates.

use axum::body::Body;
use axum::http::{Extensions, Method, Response};
use kagi_vault::Principal;

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

/// Serves the request when its path is a backup-vault route (by the backup service in the
/// request's `extensions`).
pub(crate) async fn arm(
    extensions: &Extensions,
    caller: &Principal,
    method: &Method,
    segs: &[&str],
    l: &[&str],
    body: &[u8],
    wait: Option<std::time::Duration>,
) -> Option<Response<Body>> {
    if !kagi_backup_service::matches(l) {
        return None;
    }
    let req = kagi_backup_service::ArmRequest {
        method: method.as_str(),
        segs,
        l,
        body,
        wait,
    };
    let answer = match crate::services::backup_of(extensions) {
        Ok(backup) => backup.handle(caller, req).await,
        Err(e) => Err(e),
    };
    Some(match answer {
        Ok((204, _)) => respond::empty(204),
        Ok((s, v)) if v.is_null() => respond::empty(s),
        Ok((s, v)) => respond::json(s, &v),
        Err(e) => respond::error(&e),
    })
}
