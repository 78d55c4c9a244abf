//! Routes of Azure Monitor's action groups and activity log alerts on the management host:
//! `/subscriptions/{s}[/resourceGroups/{g}]/providers/Microsoft.Insights/{actionGroups|
//! activityLogAlerts}[/{name}[/deadLetters]]`.

use axum::body::Body;
use axum::http::{Method, Response};
use kagi_core::alert::MonitorKind;
use kagi_core::{ErrorCode, KvError};
use kagi_vault::{MonitorRef, Platform, Principal};

use crate::respond::{self, parse_json};

/// Serves an action group or activity log alert request; `None` when the path is not one.
pub(crate) async fn arm(
    p: &Platform,
    caller: &Principal,
    method: &Method,
    segs: &[&str],
    l: &[&str],
    body: &[u8],
) -> Option<Result<Response<Body>, KvError>> {
    // (subscription, resource group, kind, what follows the type)
    let (sub, rg, kind, rest) = match l {
        [
            "subscriptions",
            _,
            "providers",
            "microsoft.insights",
            ty,
            rest @ ..,
        ] => (segs[1], None, MonitorKind::from_segment(ty)?, rest),
        [
            "subscriptions",
            _,
            "resourcegroups",
            _,
            "providers",
            "microsoft.insights",
            ty,
            rest @ ..,
        ] => (segs[1], Some(segs[3]), MonitorKind::from_segment(ty)?, rest),
        _ => return None,
    };
    let at = |rg| MonitorRef {
        kind,
        subscription: sub,
        resource_group: rg,
        name: segs[segs.len() - rest.len()],
    };
    let json = |status: u16, v: serde_json::Value| respond::json(status, &v);
    Some(match (rg, rest, method) {
        (_, [] | [""], &Method::GET) => p
            .list_monitor_resources(caller, kind, sub, rg)
            .await
            .map(|v| json(200, v)),
        (Some(rg), [_], &Method::PUT) => match parse_json(body) {
            Ok(input) => p
                .put_monitor_resource(caller, at(rg), input)
                .await
                .map(|(s, v)| json(s, v)),
            Err(e) => Err(e),
        },
        (Some(rg), [_], &Method::PATCH) => match parse_json(body) {
            Ok(input) => p
                .patch_monitor_resource(caller, at(rg), input)
                .await
                .map(|v| json(200, v)),
            Err(e) => Err(e),
        },
        (Some(rg), [_], &Method::GET) => p
            .get_monitor_resource(caller, at(rg))
            .await
            .map(|v| json(200, v)),
        (Some(rg), [_], &Method::DELETE) => p
            .delete_monitor_resource(caller, at(rg))
            .await
            .map(respond::empty),
        (Some(rg), [_, "deadletters"], &Method::GET) if kind == MonitorKind::ActionGroup => p
            .list_alert_dead_letters(caller, at(rg))
            .await
            .map(|v| json(200, v)),
        (_, [] | [""], m) | (Some(_), [_], m) => Err(KvError::new(
            ErrorCode::MethodNotAllowed,
            format!("The method {m} is not allowed on this resource."),
        )),
        _ => Err(KvError::new(
            ErrorCode::NotFound,
            "No management API is served at this path.",
        )),
    })
}
