//! `DELETE /subscriptions/{s}/resourceGroups/{g}?api-version=…` (`az group delete`): the group
//! and everything in it, all or nothing as far as anything can refuse.
//!
//! 1. **Checks, before anything is deleted** ([`kagi_vault::Platform::resource_group_deletion`]
//!    and each storage service's [`kagi_host::ResourceProvider::check_delete`]): the caller may
//!    delete the group (403 `AuthorizationFailed`), it exists (404 `ResourceGroupNotFound`), no
//!    lock is at, above or below it (409 `ScopeLocked`), and no resource in it refuses its
//!    delete (a backup vault that protects items, a disk with an access open, a disk
//!    encryption set used by disks outside the group, a key vault being restored into): 409
//!    `ResourceGroupDeletionBlocked` with each refusal in `details` (target, code, message).
//!    Nothing is deleted then.
//! 2. **The deletion**, in an order where a resource goes before what it uses: backup vaults,
//!    disks, snapshots and images, disk encryption sets, SQL servers (with their databases),
//!    any other storage service's resources — each through its provider's own `DELETE` —
//!    then key vaults (soft-deleted, recoverable for their retention period, as Azure's group
//!    deletion leaves them), action groups and activity log alerts, user-assigned identities
//!    and workloads, and last the group with the role and policy assignments at or below it.
//! 3. **The answer**: 202 with a `Location` (`crate::operations`) that answers 200 — or, when
//!    a resource failed to go half-way, 409 `ResourceGroupDeletionBlocked` naming it: what was
//!    deleted before it stays deleted, and the group stays, so the deletion can be run again.
//!
//! The work is done before the 202 is sent, as for moves.

use std::sync::Arc;

use axum::body::Body;
use axum::http::request::Parts;
use axum::http::{Method, Response, header};
use kagi_core::KvError;
use kagi_host::ResourceProvider;
use kagi_vault::{Platform, Principal};
use serde_json::{Value, json};

use crate::Services;
use crate::forward::{home_elsewhere, on_resource};
use crate::operations::{Outcome, accepted};
use crate::respond;

/// A resource that refused, or failed, to be deleted.
#[derive(Clone, Debug, PartialEq)]
struct Refusal {
    /// Its id.
    target: String,
    /// Its error's code (the inner one when there is one).
    code: String,
    /// Its error's message.
    message: String,
}

impl Refusal {
    fn of(target: &str, e: &KvError) -> Self {
        Refusal {
            target: target.to_string(),
            code: e.inner.unwrap_or(e.code.as_str()).to_string(),
            message: e.message.clone(),
        }
    }
}

/// ARM's `ResourceGroupDeletionBlocked` naming `refused` (`Type/name` in the message, as ARM
/// names them), after `what` happened.
fn blocked(group: &str, refused: &[Refusal], what: &str) -> Value {
    let names: Vec<String> = refused
        .iter()
        .map(|r| {
            let s: Vec<&str> = r.target.trim_matches('/').split('/').collect();
            match s.as_slice() {
                [.., "providers", ns, ty, name] => format!("{ns}/{ty}/{name}"),
                _ => r.target.clone(),
            }
        })
        .collect();
    json!({"error": {
        "code": "ResourceGroupDeletionBlocked",
        "message": format!(
            "Deletion of resource group '{group}' failed as resources with identifiers '{}' \
             could not be deleted. {what}",
            names.join(",")
        ),
        "details": refused.iter().map(|r| json!({
            "code": r.code,
            "target": r.target,
            "message": r.message,
        })).collect::<Vec<_>>(),
    }})
}

/// The order in which the storage services' resources go: a resource before what it uses
/// (a disk before its disk encryption set).
fn rank(resource_type: &str) -> u8 {
    match resource_type.to_ascii_lowercase().as_str() {
        "microsoft.recoveryservices/vaults" => 0,
        "microsoft.compute/disks" | "microsoft.compute/snapshots" | "microsoft.compute/images" => 1,
        "microsoft.compute/diskencryptionsets" => 2,
        "microsoft.sql/servers" => 3,
        _ => 4,
    }
}

/// Serves the `DELETE` (`parts`: the request's, for its providers, and for the deletes that
/// another node serves: see [`delete_one`]).
pub(crate) async fn delete(
    p: &Arc<Platform>,
    parts: &Parts,
    caller: &Principal,
    sub: &str,
    rg: &str,
    api_version: &str,
) -> Response<Body> {
    let services = parts
        .extensions
        .get::<Services>()
        .cloned()
        .unwrap_or_default();
    let request = Request {
        parts,
        caller,
        api_version,
    };
    match run(p, &services, &request, sub, rg).await {
        Ok(r) => r,
        Err(e) => respond::error(&e),
    }
}

/// The group's `DELETE` as it came.
struct Request<'a> {
    parts: &'a Parts,
    caller: &'a Principal,
    api_version: &'a str,
}

async fn run(
    p: &Arc<Platform>,
    services: &Services,
    request: &Request<'_>,
    sub: &str,
    rg: &str,
) -> Result<Response<Body>, KvError> {
    let (caller, api_version) = (request.caller, request.api_version);
    let plan = p.resource_group_deletion(caller, sub, rg).await?;
    let mut refused: Vec<Refusal> = plan
        .refusals
        .iter()
        .map(|(id, e)| Refusal::of(id, e))
        .collect();
    let mut services_resources: Vec<(String, String, Arc<dyn ResourceProvider>)> = Vec::new();
    for (id, ty) in &plan.service_resources {
        let Some(provider) = services.provider_of_type(ty) else {
            refused.push(Refusal {
                target: id.clone(),
                code: "NoRegisteredProviderFound".into(),
                message: format!("This server runs no service for {ty}, which would delete it."),
            });
            continue;
        };
        match provider.clone().check_delete(caller, id, &plan.ids).await {
            Ok(()) => services_resources.push((id.clone(), ty.clone(), provider)),
            // A failure to check is no refusal: it is answered as it is.
            Err(e) if e.status() >= 500 => return Err(e),
            Err(e) => refused.push(Refusal::of(id, &e)),
        }
    }
    if !refused.is_empty() {
        return Ok(respond::json(
            409,
            &blocked(&plan.name, &refused, "Nothing was deleted."),
        ));
    }
    services_resources.sort_by(|a, b| (rank(&a.1), &a.0).cmp(&(rank(&b.1), &b.0)));
    let mut failed = None;
    for (id, _, provider) in services_resources {
        if let Err(r) = delete_one(p, request, provider, &id).await {
            failed = Some(r);
            break;
        }
    }
    if failed.is_none()
        && let Err((id, e)) = p.finish_resource_group_deletion(caller, &plan).await
    {
        failed = Some(Refusal::of(&id, &e));
    }
    let outcome = match failed {
        None => Outcome::Deleted,
        Some(r) => {
            tracing::warn!(group = %plan.id(), resource = %r.target, error = %r.message, "resource group deletion failed half-way");
            Outcome::Failed(
                409,
                blocked(
                    &plan.name,
                    std::slice::from_ref(&r),
                    "The resources deleted before it stay deleted; the resource group stays.",
                ),
            )
        }
    };
    accepted(p, &plan.subscription, api_version, outcome)
}

/// Deletes resource `id` through its provider's own `DELETE` (which refuses as it would for
/// anyone; a 202 is a deletion already done, see `crate::operations`) — on the node it lives
/// on: a disk or SQL server whose home is another node is deleted there, by a `DELETE` sent
/// with the group's request's credentials (`crate::forward`).
async fn delete_one(
    p: &Platform,
    request: &Request<'_>,
    provider: Arc<dyn ResourceProvider>,
    id: &str,
) -> Result<(), Refusal> {
    let home = on_resource("DELETE", id, async |req| {
        home_elsewhere(p, provider.as_ref(), &req).await
    })
    .await
    .map_err(|e| Refusal::of(id, &e))?;
    let (status, body) = match home {
        Some(home) => forwarded(p, request, &home, id).await?,
        None => {
            let reply = on_resource("DELETE", id, async |req| {
                provider.handle(request.caller, req).await
            })
            .await
            .map_err(|e| Refusal::of(id, &e))?;
            (reply.status, reply.body)
        }
    };
    if status < 400 {
        return Ok(());
    }
    // An error in a body: another node's answer, or a provider that answers its errors itself
    // (Microsoft.Sql names the code itself, where kagi's errors carry it as the inner one).
    let error = &body["error"];
    let code = error["innererror"]["code"]
        .as_str()
        .or(error["code"].as_str())
        .unwrap_or("InternalError");
    Err(Refusal {
        target: id.to_string(),
        code: code.to_string(),
        message: error["message"]
            .as_str()
            .unwrap_or("The resource could not be deleted.")
            .to_string(),
    })
}

/// `DELETE {id}` sent to node `home`, with the group's request's `Authorization` and `Host`:
/// its status and body.
async fn forwarded(
    p: &Platform,
    request: &Request<'_>,
    home: &str,
    id: &str,
) -> Result<(u16, Value), Refusal> {
    let failed = |message: &str| Refusal {
        target: id.to_string(),
        code: "InternalError".into(),
        message: message.to_string(),
    };
    let query: String = form_urlencoded::Serializer::new(String::new())
        .append_pair("api-version", request.api_version)
        .finish();
    let mut builder = axum::http::Request::builder()
        .method(Method::DELETE)
        .uri(format!("{id}?{query}"));
    for name in [header::AUTHORIZATION, header::HOST] {
        if let Some(v) = request.parts.headers.get(&name) {
            builder = builder.header(name, v);
        }
    }
    let (parts, ()) = builder
        .body(())
        .map_err(|_| failed("The resource's id is not a path."))?
        .into_parts();
    let answer = crate::forward::forward(p, home, &parts, axum::body::Bytes::new()).await;
    let status = answer.status().as_u16();
    let bytes = axum::body::to_bytes(answer.into_body(), crate::MAX_BODY)
        .await
        .map_err(|_| failed("The answer of the resource's node was cut short."))?;
    Ok((
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_name_their_resources_as_arm_does() {
        let id =
            "/subscriptions/s/resourceGroups/g/providers/Microsoft.Compute/diskEncryptionSets/des1";
        let e = KvError::conflict("in use").with_inner("DiskEncryptionSetInUse");
        let v = blocked("g", &[Refusal::of(id, &e)], "Nothing was deleted.");
        assert_eq!(v["error"]["code"], "ResourceGroupDeletionBlocked");
        let m = v["error"]["message"].as_str().unwrap_or_default();
        assert!(
            m.contains("'Microsoft.Compute/diskEncryptionSets/des1'")
                && m.ends_with("Nothing was deleted."),
            "{m}"
        );
        assert_eq!(
            v["error"]["details"][0],
            json!({"code": "DiskEncryptionSetInUse", "target": id, "message": "in use"})
        );
    }

    #[test]
    fn a_resource_goes_before_what_it_uses() {
        let mut types = vec![
            "Microsoft.Sql/servers",
            "Microsoft.Compute/diskEncryptionSets",
            "Kagi.Other/things",
            "Microsoft.Compute/disks",
            "Microsoft.RecoveryServices/vaults",
        ];
        types.sort_by_key(|t| rank(t));
        assert_eq!(
            types,
            [
                "Microsoft.RecoveryServices/vaults",
                "Microsoft.Compute/disks",
                "Microsoft.Compute/diskEncryptionSets",
                "Microsoft.Sql/servers",
                "Kagi.Other/things",
            ]
        );
    }
}
