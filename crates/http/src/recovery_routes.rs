//! `Microsoft.RecoveryServices` (backup vaults, their items, jobs and activity log): served by
//! `kagi-backup-service`; this only translates.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Method, Response};
use kagi_vault::{Platform, Principal};

use crate::respond;

/// Serves the request when its path is a backup-vault route.
pub(crate) async fn arm(
    p: &Arc<Platform>,
    caller: &Principal,
    method: &Method,
    segs: &[&str],
    l: &[&str],
    body: &[u8],
) -> Option<Response<Body>> {
    if !kagi_backup_service::matches(l) {
        return None;
    }
    Some(
        match kagi_backup_service::handle(p, caller, method.as_str(), segs, l, body).await {
            Ok((204, _)) => respond::empty(204),
            Ok((s, v)) if v.is_null() => respond::empty(s),
            Ok((s, v)) => respond::json(s, &v),
            Err(e) => respond::error(&e),
        },
    )
}
