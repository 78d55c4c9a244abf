//! Resource moves (ARM's `moveResources` / `validateMoveResources`) and kagi's subscription
//! administration (MISSION BK-9, X-4).
//!
//! | route | what |
//! |---|---|
//! | `POST /subscriptions/{s}/resourceGroups/{g}/moveResources?api-version=…` `{"resources": [ids], "targetResourceGroup": "/subscriptions/{s2}/resourceGroups/{g2}"}` | moves; 202 with `Location` |
//! | `POST /subscriptions/{s}/resourceGroups/{g}/validateMoveResources?api-version=…` (same body) | the same checks, nothing moves; 202 with `Location` |
//! | `GET /subscriptions/{s}/operationresults/{id}?api-version=…` | the outcome: 204 (a group deletion's: 200, `crate::operations`) |
//! | `DELETE /subscriptions/{s}/resourceGroups/{g}?api-version=…` | deletes the group and what it holds; 202 with `Location` (`crate::group_delete`) |
//! | `PUT /kagi/admin/subscriptions/{id}` `{"tenantId"?}` | creates a subscription (201; 200 when it exists) |
//! | `GET /kagi/admin/subscriptions[/{id}]` | every subscription with its tenant |
//! | `POST /kagi/admin/subscriptions/{id}/changeDirectory` `{"tenantId"}` | moves a subscription to another tenant |
//!
//! All of them are for the bootstrap administrator only.
//!
//! **The long-running shape.** Azure answers both POSTs with 202 and a `Location` to poll
//! until it answers 204 (success) or an error. kagi does the work before answering — a move is
//! one store transaction and one `rename` — and answers 202 only once it has succeeded, with a
//! `Location` that answers 204 at once (`Retry-After: 1`, `crate::operations`), so Azure's
//! pollers (`az resource move`, `begin_move_resources(…).result()`) work unchanged, and a
//! refusal is the immediate error of the POST itself, with nothing changed.
//!
//! **What moves.** Every resource must be in the source group of the URL; the target must be
//! another group, in a subscription of the same tenant. Key vaults (`Microsoft.KeyVault/vaults`)
//! move with their keys, secrets and access policies (their URIs name the vault, not its
//! group). The resources of a registered storage service move when its provider says the type
//! is movable ([`kagi_host::ResourceProvider::movable`]), by the provider's own checks and
//! steps (backup vaults with the platform key move with their identities and state; one
//! encrypted with a customer-managed key is refused with
//! `UserErrorCMKEncryptedVaultMoveNotSupported`). Any other type is refused with
//! `ResourceMoveNotSupported`.
//! A refusal by a resource's own rules answers 409 `ResourceMoveProviderValidationFailed` with
//! the resource's error in `details` (and its code in `innererror`), as ARM does. Every
//! resource is validated before any moves; if one of several then fails to move, those already
//! moved are moved back.
//!
//! **Where it runs.** A disk, snapshot or image lives on one node of several, its home
//! (docs/SEVERAL_NODES.md, "Homes"), whose memory holds its open accesses: a request moving
//! (or validating the move of) resources whose home is another node is forwarded there whole
//! (`crate::forward`; its `Location` names that node, which answers the polls). Resources with
//! homes on two nodes cannot move in one request: 409 `CrossNodeOperationNotSupported`.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{Method, Response};
use kagi_core::{ErrorCode, KvError};
use kagi_host::MoveRequest;
use kagi_vault::{Platform, Principal};
use serde_json::{Value, json};

use crate::Services;
use crate::forward::{home_node, on_resource};
use crate::operations::{Outcome, accepted};
use crate::respond::{self, parse_json};

/// ARM's limit on resources in one move request.
const MAX_RESOURCES: usize = 800;

fn bad(inner: &'static str, message: impl Into<String>) -> KvError {
    KvError::new(ErrorCode::BadRequest, message).with_inner(inner)
}

/// The kinds of resource kagi can move.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// A key vault (the platform moves it).
    KeyVault,
    /// A resource of a storage service, by its type as the provider names it.
    Provider(&'static str),
}

/// One resource of a move request.
#[derive(Clone, Debug)]
struct Item {
    id: String,
    kind: Kind,
}

/// The parsed request.
#[derive(Debug)]
struct Request {
    items: Vec<Item>,
    target_sub: String,
    target_rg: String,
}

/// `{"resources": [...], "targetResourceGroup": "..."}` against the source in the URL; `movable`
/// are the resource types of the storage services that move.
fn parse_request(
    source_sub: &str,
    source_rg: &str,
    body: &[u8],
    movable: &[&'static str],
) -> Result<Request, KvError> {
    let v: Value = parse_json(body)?;
    let ids = v["resources"]
        .as_array()
        .filter(|a| !a.is_empty())
        .ok_or_else(|| {
            bad(
                "InvalidResourceMoveRequest",
                "The property 'resources' must be a non-empty array of resource ids.",
            )
        })?;
    if ids.len() > MAX_RESOURCES {
        return Err(bad(
            "InvalidResourceMoveRequest",
            format!("At most {MAX_RESOURCES} resources can move in one request."),
        ));
    }
    let target = v["targetResourceGroup"].as_str().unwrap_or("");
    let t: Vec<&str> = target.trim_matches('/').split('/').collect();
    let (target_sub, target_rg) = match t.as_slice() {
        [s, sub, r, rg]
            if s.eq_ignore_ascii_case("subscriptions")
                && r.eq_ignore_ascii_case("resourceGroups") =>
        {
            (sub.to_string(), rg.to_string())
        }
        _ => {
            return Err(bad(
                "InvalidTargetResourceGroup",
                format!(
                    "The property 'targetResourceGroup' must be a resource group id \
                     (/subscriptions/{{id}}/resourceGroups/{{name}}), not '{}'.",
                    kagi_core::ids::printable(target)
                ),
            ));
        }
    };
    if target_sub.eq_ignore_ascii_case(source_sub) && target_rg.eq_ignore_ascii_case(source_rg) {
        return Err(bad(
            "InvalidTargetResourceGroup",
            "The source and target resource groups are the same; nothing would move.",
        ));
    }
    let mut items = Vec::new();
    for id in ids {
        let id = id.as_str().ok_or_else(|| {
            bad(
                "InvalidResourceMoveRequest",
                "Every entry of 'resources' must be a resource id.",
            )
        })?;
        let s: Vec<&str> = id.trim_matches('/').split('/').collect();
        let in_source = s.len() >= 4
            && s[0].eq_ignore_ascii_case("subscriptions")
            && s[1].eq_ignore_ascii_case(source_sub)
            && s[2].eq_ignore_ascii_case("resourceGroups")
            && s[3].eq_ignore_ascii_case(source_rg);
        if !in_source {
            return Err(bad(
                "ResourceNotInSourceResourceGroup",
                format!(
                    "The resource '{}' is not in the source resource group '{source_rg}': the \
                     resources to move must all be in the group named by the request URL.",
                    kagi_core::ids::printable(id)
                ),
            ));
        }
        let kind = match s.as_slice() {
            [_, _, _, _, pr, ns, ty, _]
                if pr.eq_ignore_ascii_case("providers")
                    && ns.eq_ignore_ascii_case("Microsoft.KeyVault")
                    && ty.eq_ignore_ascii_case("vaults") =>
            {
                Some(Kind::KeyVault)
            }
            [_, _, _, _, pr, ns, ty, _] if pr.eq_ignore_ascii_case("providers") => movable
                .iter()
                .find(|t| t.eq_ignore_ascii_case(&format!("{ns}/{ty}")))
                .map(|t| Kind::Provider(t)),
            _ => None,
        };
        let Some(kind) = kind else {
            let ty = match s.as_slice() {
                [_, _, _, _, _, ns, ty, ..] => format!("{ns}/{ty}"),
                _ => "(not a resource id)".into(),
            };
            let mut types = vec!["Microsoft.KeyVault/vaults"];
            types.extend_from_slice(movable);
            return Err(bad(
                "ResourceMoveNotSupported",
                format!(
                    "Resource move is not supported for resource types '{}'. kagi moves these \
                     resource types: {}.",
                    kagi_core::ids::printable(&ty),
                    types.join(", ")
                ),
            ));
        };
        if items
            .iter()
            .any(|i: &Item| i.id.eq_ignore_ascii_case(id.trim_end_matches('/')))
        {
            continue;
        }
        items.push(Item {
            id: id.trim_end_matches('/').to_string(),
            kind,
        });
    }
    Ok(Request {
        items,
        target_sub,
        target_rg,
    })
}

/// ARM's answer when a resource's own rules refuse its move: 409
/// `ResourceMoveProviderValidationFailed`, the resource's error in `details`.
fn provider_refusal(id: &str, e: &KvError) -> Response<Body> {
    let code = e.inner.unwrap_or(e.code.as_str());
    respond::json(
        409,
        &json!({"error": {
            "code": "ResourceMoveProviderValidationFailed",
            "message": format!("Resource move validation failed: {}", e.message),
            "details": [{"code": code, "target": id, "message": e.message}],
            "innererror": {"code": code},
        }}),
    )
}

/// Refusals that belong to the resource (its state, its rules) rather than the request.
fn is_provider_refusal(e: &KvError) -> bool {
    matches!(e.status(), 400 | 409) && e.inner != Some("ResourceNotInSourceResourceGroup")
}

/// Who moves what: the platform (key vaults) and the registered storage services (theirs),
/// for the request `parts` (forwarded as it came when what it moves lives on another node).
struct Movers<'a> {
    p: &'a Arc<Platform>,
    services: Services,
    parts: &'a axum::http::request::Parts,
}

/// Where the move of `items` must run: the one node other than this one that is the home of
/// every resource of `items` that has a home, if there is one; none when they all live here
/// or have no home. 409 `CrossNodeOperationNotSupported` when they live on different nodes.
async fn home_of_items(m: &Movers<'_>, items: &[Item]) -> Result<Option<String>, KvError> {
    // (node, resource) of every resource that lives on one node.
    let mut homed: Vec<(String, &str)> = Vec::new();
    for item in items {
        let Kind::Provider(ty) = item.kind else {
            continue;
        };
        let Some(provider) = m.services.provider_of_type(ty) else {
            continue;
        };
        let home = on_resource("GET", &item.id, async |req| {
            home_node(m.p, provider.as_ref(), &req).await
        })
        .await?;
        if let Some(home) = home {
            homed.push((home, &item.id));
        }
    }
    let Some((first, _)) = homed.first() else {
        return Ok(None);
    };
    if homed.iter().all(|(h, _)| h == first) {
        return Ok(Some(first.clone()).filter(|h| h != m.p.node_name()));
    }
    let placed: Vec<String> = homed
        .iter()
        .map(|(h, id)| format!("'{}' on '{h}'", kagi_core::ids::printable(id)))
        .collect();
    Err(KvError::conflict(format!(
        "The resources to move live on different nodes ({}): a move runs on the node that \
         holds them. Move the resources of each node in a request of their own.",
        placed.join(", ")
    ))
    .with_inner("CrossNodeOperationNotSupported"))
}

async fn move_one(
    m: &Movers<'_>,
    caller: &Principal,
    item: &Item,
    sub: &str,
    rg: &str,
    dry_run: bool,
) -> Result<Value, KvError> {
    match item.kind {
        Kind::Provider(ty) => {
            let Some(provider) = m.services.provider_of_type(ty) else {
                return Err(KvError::new(
                    ErrorCode::NotFound,
                    format!("This server runs no service for {ty}."),
                ));
            };
            let to = MoveRequest {
                id: &item.id,
                subscription: sub,
                resource_group: rg,
                dry_run,
            };
            provider.move_resource(caller, to).await
        }
        Kind::KeyVault => m.p.move_key_vault(caller, &item.id, sub, rg, dry_run).await,
    }
}

/// `moveResources`, `validateMoveResources`, a resource group's `DELETE` and
/// `operationresults` (after the api-version check; storage services' resources moved or
/// deleted by their providers in the request's `extensions`). `None` when the path is none
/// of them.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn arm(
    p: &Arc<Platform>,
    parts: &axum::http::request::Parts,
    caller: &Principal,
    method: &Method,
    segs: &[&str],
    l: &[&str],
    body: &[u8],
    api_version: &str,
) -> Option<Response<Body>> {
    let validate = match l {
        ["subscriptions", _, "resourcegroups", _, "moveresources"] => false,
        [
            "subscriptions",
            _,
            "resourcegroups",
            _,
            "validatemoveresources",
        ] => true,
        ["subscriptions", _, "operationresults", _] => {
            return Some(crate::operations::answer(p, parts, segs[1], segs[3]).await);
        }
        ["subscriptions", _, "resourcegroups", _] if *method == Method::DELETE => {
            return Some(
                crate::group_delete::delete(p, parts, caller, segs[1], segs[3], api_version).await,
            );
        }
        _ => return None,
    };
    if *method != Method::POST {
        return Some(respond::error(&KvError::new(
            ErrorCode::MethodNotAllowed,
            format!("The method {method} is not allowed on this resource."),
        )));
    }
    let movers = Movers {
        p,
        services: parts
            .extensions
            .get::<Services>()
            .cloned()
            .unwrap_or_default(),
        parts,
    };
    Some(
        match moves(
            &movers,
            caller,
            segs[1],
            segs[3],
            body,
            validate,
            api_version,
        )
        .await
        {
            Ok(r) => r,
            Err(e) => respond::error(&e),
        },
    )
}

async fn moves(
    m: &Movers<'_>,
    caller: &Principal,
    source_sub: &str,
    source_rg: &str,
    body: &[u8],
    validate: bool,
    api_version: &str,
) -> Result<Response<Body>, KvError> {
    // The caller may manage the source; the source group exists.
    m.p.get_resource_group(caller, source_sub, source_rg)
        .await?;
    let req = parse_request(source_sub, source_rg, body, &m.services.movable_types())?;
    // On the node the resources live on.
    if let Some(home) = home_of_items(m, &req.items).await? {
        if crate::forward::was_forwarded(m.parts) {
            return Ok(crate::forward::misrouted(&home));
        }
        let body = axum::body::Bytes::copy_from_slice(body);
        return Ok(crate::forward::forward(m.p, &home, m.parts, body).await);
    }
    // Every resource passes before any moves.
    for item in &req.items {
        if let Err(e) = move_one(m, caller, item, &req.target_sub, &req.target_rg, true).await {
            if is_provider_refusal(&e) {
                return Ok(provider_refusal(&item.id, &e));
            }
            return Err(e);
        }
    }
    if validate {
        return accepted(m.p, source_sub, api_version, Outcome::Moved);
    }
    let mut done: Vec<(Item, String)> = Vec::new();
    for item in &req.items {
        match move_one(m, caller, item, &req.target_sub, &req.target_rg, false).await {
            Ok(moved) => {
                let new_id = moved["id"].as_str().unwrap_or_default().to_string();
                done.push((item.clone(), new_id));
            }
            Err(e) => {
                // Put back what already moved, so that the failed request changes nothing.
                for (prev, new_id) in done.iter().rev() {
                    let back = Item {
                        id: new_id.clone(),
                        ..prev.clone()
                    };
                    if let Err(err) = move_one(m, caller, &back, source_sub, source_rg, false).await
                    {
                        tracing::error!(resource = %new_id, error = %err, "moving back after a failed move failed");
                    }
                }
                if is_provider_refusal(&e) {
                    return Ok(provider_refusal(&item.id, &e));
                }
                return Err(e);
            }
        }
    }
    accepted(m.p, source_sub, api_version, Outcome::Moved)
}

/// `/kagi/admin/subscriptions…` (no api-version). `None` when the path is not one of them.
pub(crate) async fn admin(
    p: &Platform,
    caller: &Principal,
    method: &Method,
    segs: &[&str],
    l: &[&str],
    body: &[u8],
) -> Option<Response<Body>> {
    let r = match (l, method) {
        (["kagi", "admin", "subscriptions"], &Method::GET) => p
            .list_all_subscriptions(caller)
            .map(|v| respond::json(200, &v)),
        (["kagi", "admin", "subscriptions", _], &Method::GET) => p
            .get_subscription_admin(caller, segs[3])
            .map(|v| respond::json(200, &v)),
        (["kagi", "admin", "subscriptions", _], &Method::PUT) => {
            let input: Result<HashMap<String, Value>, KvError> = if body.is_empty() {
                Ok(HashMap::new())
            } else {
                parse_json(body)
            };
            match input {
                Ok(input) => p
                    .create_subscription(
                        caller,
                        segs[3],
                        input.get("tenantId").and_then(Value::as_str),
                    )
                    .await
                    .map(|(s, v)| respond::json(s, &v)),
                Err(e) => Err(e),
            }
        }
        (["kagi", "admin", "subscriptions", _, "changedirectory"], &Method::POST) => {
            match parse_json::<HashMap<String, Value>>(body) {
                Ok(input) => match input.get("tenantId").and_then(Value::as_str) {
                    Some(t) => p
                        .change_subscription_directory(caller, segs[3], t)
                        .await
                        .map(|v| respond::json(200, &v)),
                    None => Err(KvError::bad_parameter(
                        "The property \"tenantId\" is required.",
                    )),
                },
                Err(e) => Err(e),
            }
        }
        (["kagi", "admin", "subscriptions", ..], m) => Err(KvError::new(
            ErrorCode::MethodNotAllowed,
            format!("The method {m} is not allowed on this resource."),
        )),
        _ => return None,
    };
    Some(r.unwrap_or_else(|e| respond::error(&e)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SUB: &str = "00000000-0000-4000-8000-000000000001";

    fn req(body: Value) -> Result<Request, KvError> {
        let movable = ["Microsoft.RecoveryServices/vaults"];
        parse_request(SUB, "rg1", body.to_string().as_bytes(), &movable)
    }

    #[test]
    fn requests_are_checked() {
        let bv = format!(
            "/subscriptions/{SUB}/resourceGroups/RG1/providers/Microsoft.RecoveryServices/vaults/bv"
        );
        let kv = format!(
            "/subscriptions/{SUB}/resourceGroups/rg1/providers/Microsoft.KeyVault/vaults/kv"
        );
        let target = format!("/subscriptions/{SUB}/resourceGroups/rg2");
        let r = req(json!({"resources": [bv, kv, bv], "targetResourceGroup": target}));
        let r = r
            .ok()
            .map(|r| (r.items.len(), r.target_rg, r.items[1].kind));
        assert_eq!(r, Some((2, "rg2".to_string(), Kind::KeyVault)));

        let inner = |b: Value| req(b).err().and_then(|e| e.inner);
        assert_eq!(
            inner(json!({"resources": [], "targetResourceGroup": target})),
            Some("InvalidResourceMoveRequest")
        );
        assert_eq!(
            inner(json!({"resources": [bv], "targetResourceGroup": "rg2"})),
            Some("InvalidTargetResourceGroup")
        );
        assert_eq!(
            inner(
                json!({"resources": [bv], "targetResourceGroup": format!("/subscriptions/{SUB}/resourceGroups/RG1")})
            ),
            Some("InvalidTargetResourceGroup")
        );
        let elsewhere = format!(
            "/subscriptions/{SUB}/resourceGroups/other/providers/Microsoft.KeyVault/vaults/kv"
        );
        assert_eq!(
            inner(json!({"resources": [elsewhere], "targetResourceGroup": target})),
            Some("ResourceNotInSourceResourceGroup")
        );
        let uami = format!(
            "/subscriptions/{SUB}/resourceGroups/rg1/providers/Microsoft.ManagedIdentity/userAssignedIdentities/u"
        );
        assert_eq!(
            inner(json!({"resources": [uami], "targetResourceGroup": target})),
            Some("ResourceMoveNotSupported")
        );
    }
}
