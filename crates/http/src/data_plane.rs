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
    crate::context::note_caller(&parts.extensions, &caller);
    // The firewall decides on the connection's address, never on a header a client can set.
    caller.network_address = parts
        .extensions
        .get::<crate::context::RemoteAddr>()
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
        Ok(r) => {
            crate::metrics::count_crypto(
                parts.extensions.get::<crate::Services>(),
                &platform,
                &caller,
                &vault,
                parts.method.as_str(),
                &path,
            );
            r
        }
        Err(e) => {
            if e.status() >= 500 {
                tracing::error!(vault, method = %parts.method, path, "request failed");
            }
            // A token of another tenant (AKV10032) is answered with the vault's challenge, as
            // Key Vault does, so that clients obtain a token in the vault's tenant and retry.
            if e.status() == 401 {
                return challenge(&platform, &vault, &e);
            }
            let mut r = respond::error(&e);
            if e.status() == 405 {
                // The methods the data plane's table serves at this path (RFC 9110 §15.5.6).
                let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
                let allow = kagi_core::route_table::allowed_methods(
                    kagi_core::routes::DATA_PLANE.iter(),
                    &segs,
                )
                .join(", ");
                if let Ok(v) = HeaderValue::from_str(&allow) {
                    r.headers_mut().insert(header::ALLOW, v);
                }
            }
            r
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
    use kagi_core::routes::{DataPlaneRoute as R, RouteMiss};
    let ok = |v: serde_json::Value| Ok(respond::json(200, &v));
    let route = R::parse(method.as_str(), path).map_err(|miss| match miss {
        RouteMiss::NotFound => not_found(path),
        RouteMiss::MethodNotAllowed => method_not_allowed(method),
    })?;
    match route {
        R::KeyList => ok(p.list_keys(caller, vault, list)?),
        R::KeyRestore => ok(p.restore_key(caller, vault, parse_json(body)?).await?),
        R::KeyCreate(name) => ok(p.create_key(caller, vault, name, parse_json(body)?).await?),
        R::KeyImport(name) => ok(p.import_key(caller, vault, name, parse_json(body)?).await?),
        R::KeyDelete(name) => ok(p.delete_key(caller, vault, name).await?),
        R::KeyGet(name, version) => ok(p.get_key(caller, vault, name, version)?),
        R::KeyUpdate(name, version) => ok(p
            .update_key(caller, vault, name, version, parse_json(body)?)
            .await?),
        R::KeyListVersions(name) => ok(p.list_key_versions(caller, vault, name, list)?),
        R::KeyBackup(name) => Ok(respond::json(200, &p.backup_key(caller, vault, name)?)),
        R::KeyRotate(name) => ok(p.rotate_key(caller, vault, name).await?),
        R::KeyGetRotationPolicy(name) => ok(p.get_key_rotation_policy(caller, vault, name).await?),
        R::KeySetRotationPolicy(name) => ok(p
            .set_key_rotation_policy(caller, vault, name, parse_json(body)?)
            .await?),
        R::KeyCrypto(name, version, op) => crypto(p, caller, vault, name, version, op, body),
        R::KeyListDeleted => ok(p.list_deleted_keys(caller, vault, list)?),
        R::KeyGetDeleted(name) => ok(p.get_deleted_key(caller, vault, name)?),
        R::KeyPurge(name) => {
            p.purge_deleted_key(caller, vault, name).await?;
            Ok(respond::empty(204))
        }
        R::KeyRecover(name) => ok(p.recover_deleted_key(caller, vault, name).await?),
        R::RandomGet => ok(p.random(caller, vault, parse_json(body)?)?),
        R::SecretList => ok(p.list_secrets(caller, vault, list)?),
        R::SecretRestore => ok(p.restore_secret(caller, vault, parse_json(body)?).await?),
        R::SecretSet(name) => ok(p.set_secret(caller, vault, name, parse_json(body)?).await?),
        R::SecretDelete(name) => ok(p.delete_secret(caller, vault, name).await?),
        R::SecretGet(name, version) => ok(p.get_secret(caller, vault, name, version)?),
        R::SecretUpdate(name, version) => ok(p
            .update_secret(caller, vault, name, version, parse_json(body)?)
            .await?),
        R::SecretListVersions(name) => ok(p.list_secret_versions(caller, vault, name, list)?),
        R::SecretBackup(name) => Ok(respond::json(200, &p.backup_secret(caller, vault, name)?)),
        R::SecretListDeleted => ok(p.list_deleted_secrets(caller, vault, list)?),
        R::SecretGetDeleted(name) => ok(p.get_deleted_secret(caller, vault, name)?),
        R::SecretPurge(name) => {
            p.purge_deleted_secret(caller, vault, name).await?;
            Ok(respond::empty(204))
        }
        R::SecretRecover(name) => ok(p.recover_deleted_secret(caller, vault, name).await?),
    }
}

fn crypto(
    p: &Platform,
    caller: &Principal,
    vault: &str,
    name: &str,
    version: Option<&str>,
    op: kagi_core::routes::CryptoOp,
    body: &[u8],
) -> Result<Response<Body>, KvError> {
    use kagi_core::routes::CryptoOp;
    let v = match op {
        CryptoOp::Sign => p.sign(caller, vault, name, version, parse_json(body)?)?,
        CryptoOp::Verify => p.verify(caller, vault, name, version, parse_json(body)?)?,
        _ => p.key_operation(
            caller,
            vault,
            name,
            version,
            op.segment(),
            parse_json(body)?,
        )?,
    };
    Ok(respond::json(200, &v))
}
