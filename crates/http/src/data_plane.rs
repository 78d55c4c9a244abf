//! The vault data plane (`https://{vault}.{suffix}/...`): challenge, token check, routing.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{HeaderValue, Method, Request, Response, header};
use kagi_core::KvError;
use kagi_vault::{ListQuery, Platform, Principal};

use crate::respond::{self, parse_json, query_get, query_pairs};

fn challenge(platform: &Platform, vault: &str, e: &KvError) -> Response<Body> {
    let authority = platform.config().authority();
    let tenant = platform.challenge_tenant(vault);
    let mut r = respond::error(e);
    if let Ok(v) = HeaderValue::from_str(&format!(
        "Bearer authorization=\"{authority}/{tenant}\", resource=\"{authority}\""
    )) {
        r.headers_mut().insert(header::WWW_AUTHENTICATE, v);
    }
    r
}

/// Serves one data-plane request for `vault`.
pub(crate) async fn handle(
    platform: Arc<Platform>,
    vault: String,
    req: Request<Body>,
) -> Response<Body> {
    let (parts, body) = req.into_parts();
    // Challenge before looking at the body: the SDK's first request carries none.
    let Some(token) = respond::bearer(&parts.headers) else {
        return challenge(
            &platform,
            &vault,
            &KvError::unauthorized("AKV10000: Request is missing a Bearer or PoP token."),
        );
    };
    let mut caller = match platform.authenticate(token) {
        Ok(p) => p,
        Err(e) => return challenge(&platform, &vault, &e),
    };
    crate::audit::note_caller(&parts.extensions, &caller);
    // The firewall decides on the connection's address, never on a header a client can set.
    caller.network_address = parts
        .extensions
        .get::<crate::RemoteAddr>()
        .map(|r| r.0.ip().to_canonical());
    let pairs = query_pairs(parts.uri.query());
    let api_version = query_get(&pairs, "api-version");
    if let Err(e) = kagi_core::api_version::check_data_plane(api_version) {
        return respond::error(&e);
    }
    // Wiped when the request is done: key imports, wrapKey/encrypt plaintexts and secret
    // values arrive in this buffer (the conversion takes read_body's buffer, no copy).
    let body = match respond::read_body(&parts.headers, body).await {
        Ok(b) => zeroize::Zeroizing::new(Vec::from(b)),
        Err(e) => return respond::error(&e),
    };
    let list = ListQuery {
        maxresults: query_get(&pairs, "maxresults").map(str::to_string),
        skiptoken: query_get(&pairs, "$skiptoken").map(str::to_string),
        api_version: api_version.unwrap_or_default().to_string(),
    };
    let path = parts.uri.path().to_string();
    match route(
        &platform,
        &caller,
        &vault,
        &parts.method,
        &path,
        &body,
        &list,
    )
    .await
    {
        Ok(r) => r,
        Err(e) => {
            if e.status() >= 500 {
                tracing::error!(vault, method = %parts.method, path, "request failed");
            }
            // A token of another tenant (AKV10032) is answered with the vault's challenge, as
            // Key Vault does, so that clients obtain a token in the vault's tenant and retry.
            if e.status() == 401 {
                return challenge(&platform, &vault, &e);
            }
            respond::error(&e)
        }
    }
}

fn not_found(path: &str) -> KvError {
    KvError::new(
        kagi_core::ErrorCode::NotFound,
        format!(
            "The request URI {} is not served by this vault.",
            kagi_core::ids::printable(path)
        ),
    )
}

fn method_not_allowed(method: &Method) -> KvError {
    KvError::new(
        kagi_core::ErrorCode::MethodNotAllowed,
        format!("The method {method} is not allowed on this URI."),
    )
}

async fn route(
    p: &Platform,
    caller: &Principal,
    vault: &str,
    method: &Method,
    path: &str,
    body: &[u8],
    list: &ListQuery,
) -> Result<Response<Body>, KvError> {
    let ok = |v: serde_json::Value| Ok(respond::json(200, &v));
    let segs: Vec<&str> = path.strip_prefix('/').unwrap_or(path).split('/').collect();
    let lower: Vec<String> = segs.iter().map(|s| s.to_ascii_lowercase()).collect();
    let l: Vec<&str> = lower.iter().map(String::as_str).collect();
    match (l.as_slice(), method) {
        (["keys"] | ["keys", ""], &Method::GET) => ok(p.list_keys(caller, vault, list)?),
        (["keys", "restore"], &Method::POST) => {
            ok(p.restore_key(caller, vault, parse_json(body)?).await?)
        }
        (["keys", _, "create"], &Method::POST) => ok(p
            .create_key(caller, vault, segs[1], parse_json(body)?)
            .await?),
        (["keys", _], &Method::PUT) => ok(p
            .import_key(caller, vault, segs[1], parse_json(body)?)
            .await?),
        (["keys", _], &Method::DELETE) => ok(p.delete_key(caller, vault, segs[1]).await?),
        (["keys", _] | ["keys", _, ""], &Method::GET) => {
            ok(p.get_key(caller, vault, segs[1], None)?)
        }
        (["keys", _] | ["keys", _, ""], &Method::PATCH) => ok(p
            .update_key(caller, vault, segs[1], None, parse_json(body)?)
            .await?),
        (["keys", _, "versions"], &Method::GET) => {
            ok(p.list_key_versions(caller, vault, segs[1], list)?)
        }
        (["keys", _, "backup"], &Method::POST) => {
            Ok(respond::json(200, &p.backup_key(caller, vault, segs[1])?))
        }
        (["keys", _, "rotate"], &Method::POST) => ok(p.rotate_key(caller, vault, segs[1]).await?),
        (["keys", _, "rotationpolicy"], &Method::GET) => {
            ok(p.get_key_rotation_policy(caller, vault, segs[1]).await?)
        }
        (["keys", _, "rotationpolicy"], &Method::PUT) => ok(p
            .set_key_rotation_policy(caller, vault, segs[1], parse_json(body)?)
            .await?),
        (["keys", _, op], &Method::POST) if kagi_vault::is_crypto_segment(op) => {
            crypto(p, caller, vault, segs[1], None, op, body)
        }
        (["keys", _, _], &Method::GET) => ok(p.get_key(caller, vault, segs[1], Some(segs[2]))?),
        (["keys", _, _], &Method::PATCH) => ok(p
            .update_key(caller, vault, segs[1], Some(segs[2]), parse_json(body)?)
            .await?),
        (["keys", _, _, op], &Method::POST) if kagi_vault::is_crypto_segment(op) => {
            crypto(p, caller, vault, segs[1], Some(segs[2]), op, body)
        }
        (["deletedkeys"] | ["deletedkeys", ""], &Method::GET) => {
            ok(p.list_deleted_keys(caller, vault, list)?)
        }
        (["deletedkeys", _], &Method::GET) => ok(p.get_deleted_key(caller, vault, segs[1])?),
        (["deletedkeys", _], &Method::DELETE) => {
            p.purge_deleted_key(caller, vault, segs[1]).await?;
            Ok(respond::empty(204))
        }
        (["deletedkeys", _, "recover"], &Method::POST) => {
            ok(p.recover_deleted_key(caller, vault, segs[1]).await?)
        }
        (["rng"], &Method::POST) => ok(p.random(caller, vault, parse_json(body)?)?),
        // --- secrets ---
        (["secrets"] | ["secrets", ""], &Method::GET) => ok(p.list_secrets(caller, vault, list)?),
        (["secrets", "restore"], &Method::POST) => {
            ok(p.restore_secret(caller, vault, parse_json(body)?).await?)
        }
        (["secrets", _], &Method::PUT) => ok(p
            .set_secret(caller, vault, segs[1], parse_json(body)?)
            .await?),
        (["secrets", _], &Method::DELETE) => ok(p.delete_secret(caller, vault, segs[1]).await?),
        (["secrets", _] | ["secrets", _, ""], &Method::GET) => {
            ok(p.get_secret(caller, vault, segs[1], None)?)
        }
        (["secrets", _] | ["secrets", _, ""], &Method::PATCH) => ok(p
            .update_secret(caller, vault, segs[1], None, parse_json(body)?)
            .await?),
        (["secrets", _, "versions"], &Method::GET) => {
            ok(p.list_secret_versions(caller, vault, segs[1], list)?)
        }
        (["secrets", _, "backup"], &Method::POST) => Ok(respond::json(
            200,
            &p.backup_secret(caller, vault, segs[1])?,
        )),
        (["secrets", _, _], &Method::GET) => {
            ok(p.get_secret(caller, vault, segs[1], Some(segs[2]))?)
        }
        (["secrets", _, _], &Method::PATCH) => ok(p
            .update_secret(caller, vault, segs[1], Some(segs[2]), parse_json(body)?)
            .await?),
        (["deletedsecrets"] | ["deletedsecrets", ""], &Method::GET) => {
            ok(p.list_deleted_secrets(caller, vault, list)?)
        }
        (["deletedsecrets", _], &Method::GET) => ok(p.get_deleted_secret(caller, vault, segs[1])?),
        (["deletedsecrets", _], &Method::DELETE) => {
            p.purge_deleted_secret(caller, vault, segs[1]).await?;
            Ok(respond::empty(204))
        }
        (["deletedsecrets", _, "recover"], &Method::POST) => {
            ok(p.recover_deleted_secret(caller, vault, segs[1]).await?)
        }
        (["secrets", ..] | ["deletedsecrets", ..], m) => {
            if matches!(
                l.as_slice(),
                ["secrets"] | ["secrets", _] | ["secrets", _, _] | ["deletedsecrets", _]
            ) {
                Err(method_not_allowed(m))
            } else {
                Err(not_found(path))
            }
        }
        (["keys", ..] | ["deletedkeys", ..] | ["rng"], m) => {
            // A known path shape with an unknown method, or an unknown path under /keys.
            if matches!(
                l.as_slice(),
                ["keys", _] | ["keys", _, _] | ["deletedkeys", _] | ["rng"]
            ) {
                Err(method_not_allowed(m))
            } else {
                Err(not_found(path))
            }
        }
        _ => Err(not_found(path)),
    }
}

fn crypto(
    p: &Platform,
    caller: &Principal,
    vault: &str,
    name: &str,
    version: Option<&str>,
    op: &str,
    body: &[u8],
) -> Result<Response<Body>, KvError> {
    let v = match op {
        "sign" => p.sign(caller, vault, name, version, parse_json(body)?)?,
        "verify" => p.verify(caller, vault, name, version, parse_json(body)?)?,
        _ => p.key_operation(caller, vault, name, version, op, parse_json(body)?)?,
    };
    Ok(respond::json(200, &v))
}
