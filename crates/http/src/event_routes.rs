//! Routes of event subscriptions on the management host (ARM-shaped, as Event Grid's
//! subscriptions on a Key Vault system topic):
//! `…/providers/Microsoft.KeyVault/vaults/{vault}/providers/Microsoft.EventGrid/eventSubscriptions[/{name}[/deadLetters]]`.

use axum::body::Body;
use axum::http::{Method, Response};
use kagi_core::{ErrorCode, KvError};
use kagi_vault::{Platform, Principal};

use crate::respond::{self, parse_json};

/// Serves an event-subscription request; `None` when the path is not one.
pub(crate) async fn arm(
    p: &Platform,
    caller: &Principal,
    method: &Method,
    segs: &[&str],
    l: &[&str],
    body: &[u8],
) -> Option<Result<Response<Body>, KvError>> {
    let (
        [
            "subscriptions",
            _,
            "resourcegroups",
            _,
            "providers",
            "microsoft.keyvault",
            "vaults",
            _,
            "providers",
            "microsoft.eventgrid",
            "eventsubscriptions",
            rest @ ..,
        ],
        [_, sub, _, rg, _, _, _, vault, _, _, _, raw_rest @ ..],
    ) = (l, segs)
    else {
        return None;
    };
    let ok = |status: u16, v: serde_json::Value| Ok(respond::json(status, &v));
    let r = match (rest, raw_rest, method) {
        ([] | [""], _, &Method::GET) => {
            match p.list_event_subscriptions(caller, sub, rg, vault).await {
                Ok(v) => ok(200, v),
                Err(e) => Err(e),
            }
        }
        ([_], [name], &Method::PUT) => {
            let input = match parse_json(body) {
                Ok(v) => v,
                Err(e) => return Some(Err(e)),
            };
            match p
                .put_event_subscription(caller, sub, rg, vault, name, input)
                .await
            {
                Ok((status, v)) => ok(status, v),
                Err(e) => Err(e),
            }
        }
        ([_], [name], &Method::GET) => {
            match p.get_event_subscription(caller, sub, rg, vault, name).await {
                Ok(v) => ok(200, v),
                Err(e) => Err(e),
            }
        }
        ([_], [name], &Method::DELETE) => {
            match p
                .delete_event_subscription(caller, sub, rg, vault, name)
                .await
            {
                Ok(status) => Ok(respond::empty(status)),
                Err(e) => Err(e),
            }
        }
        ([_, "deadletters"], [name, _], &Method::GET) => {
            match p.list_dead_letters(caller, sub, rg, vault, name).await {
                Ok(v) => ok(200, v),
                Err(e) => Err(e),
            }
        }
        ([] | [""] | [_] | [_, "deadletters"], _, m) => Err(KvError::new(
            ErrorCode::MethodNotAllowed,
            format!("The method {m} is not allowed on this resource."),
        )),
        _ => Err(KvError::new(
            ErrorCode::NotFound,
            "No management API is served at this path.",
        )),
    };
    Some(r)
}
