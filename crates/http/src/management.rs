//! The management host: health, the Entra-shaped token service, and the ARM-shaped API.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{HeaderValue, Method, Request, Response, header};
use kagi_core::route_table::{ApiVersion, Auth, RouteMiss};
use kagi_core::{ErrorCode, KvError};
use kagi_vault::{Platform, Principal};

use crate::respond::{self, parse_json, query_get, query_pairs};

/// Serves one request to the management host: only a request that matches a route of the
/// server's route tables ([`crate::route_table`]) reaches a handler; any other is answered
/// 404 (405 for a served path with another method) before anything else is looked at.
pub(crate) async fn handle(platform: Arc<Platform>, req: Request<Body>) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_string();
    let segs = crate::route_table::management_segments(&path);
    let lower: Vec<String> = segs.iter().map(|s| s.to_ascii_lowercase()).collect();
    let l: Vec<&str> = lower.iter().map(String::as_str).collect();
    let services = parts.extensions.get::<crate::Services>().cloned();
    let found = match crate::route_table::find_management(
        services.as_ref(),
        parts.method.as_str(),
        &segs,
    ) {
        Ok(found) => found,
        Err(RouteMiss::NotFound) => return respond::error(&no_route(&segs)),
        Err(RouteMiss::MethodNotAllowed) => {
            let mut r = respond::error(&method_not_allowed(&parts.method));
            let allow = crate::route_table::allowed_management(services.as_ref(), &segs);
            if let Ok(v) = HeaderValue::from_str(&allow) {
                r.headers_mut().insert(header::ALLOW, v);
            }
            return r;
        }
    };

    match found.route.auth {
        // Health, discovery and the token service.
        Auth::Anonymous => {
            return anonymous(&platform, services.as_ref(), &parts, &segs, &l, body).await;
        }
        // Agents (of a provider: backup agents) authenticate by their own credentials, before
        // their bodies are read.
        Auth::Agent => {
            return crate::agent_routes::handle(
                found.provider,
                &parts.method,
                &segs,
                parts.uri.query(),
                &parts.headers,
                &parts.extensions,
                body,
            )
            .await;
        }
        // Managed-identity token endpoints authenticate by the workload's binding secret.
        Auth::BindingSecret => {
            let pairs = query_pairs(parts.uri.query());
            return crate::identity_routes::managed_identity(
                &platform,
                &parts.method,
                &segs,
                &l,
                &parts.headers,
                &pairs,
            )
            .await
            .unwrap_or_else(|| respond::error(&no_route(&segs)));
        }
        Auth::Bearer => {}
    }

    let Some(token) = respond::bearer(&parts.headers) else {
        return arm_challenge(
            &platform,
            KvError::new(
                ErrorCode::Unauthorized,
                "Authentication failed. The 'Authorization' header is missing.",
            )
            .with_inner("AuthenticationFailed"),
        );
    };
    let caller = match platform.authenticate(token) {
        Ok(c) => c,
        Err(e) => return arm_challenge(&platform, e.with_inner("InvalidAuthenticationToken")),
    };
    crate::context::note_caller(&parts.extensions, &caller);
    let pairs = query_pairs(parts.uri.query());
    if found.route.api_version == ApiVersion::Arm
        && let Err(e) = kagi_core::api_version::check_arm(query_get(&pairs, "api-version"))
    {
        return respond::error(&e);
    }
    // Whole-vault backup and restore and their jobs: restore bodies exceed the 1 MiB limit.
    if crate::backup_routes::matches(&l, &parts.method) {
        return crate::backup_routes::handle(
            platform.clone(),
            &caller,
            &l,
            &segs,
            parts.uri.query(),
            &parts.headers,
            body,
        )
        .await;
    }
    // The test clock (`kagi server --test-clock`): no api-version.
    if let ["kagi", "test", "clock"] = l.as_slice() {
        return test_clock(&platform, &caller, &parts.method, parts.headers, body).await;
    }
    let body = match respond::read_body(&parts.headers, body).await {
        Ok(b) => b,
        Err(e) => return respond::error(&e),
    };
    // A storage service's route: its provider serves it.
    if let Some(provider) = found.provider {
        return crate::provider_routes::arm(&platform, provider, &caller, &parts, &segs, &l, body)
            .await;
    }
    // Subscription administration (kagi's own, no api-version): see `move_routes`.
    if let ["kagi", "admin", ..] = l.as_slice() {
        if let Some(r) =
            crate::move_routes::admin(&platform, &caller, &parts.method, &segs, &l, &body).await
        {
            return r;
        }
        if let Some(r) =
            crate::identity_routes::admin(&platform, &caller, &parts.method, &l, &body).await
        {
            return r;
        }
        return respond::error(&no_route(&segs));
    }
    if l.first() == Some(&"v1.0") {
        return match crate::identity_routes::graph(
            &platform,
            &caller,
            &parts.method,
            &segs,
            &l,
            &body,
            respond::odata_filter(&pairs),
        )
        .await
        {
            Some(Ok(r)) => r,
            Some(Err(e)) => respond::error(&e),
            None => respond::error(&no_route(&segs)),
        };
    }
    if let Some(r) = crate::move_routes::arm(
        &platform,
        &parts,
        &caller,
        &parts.method,
        &segs,
        &l,
        &body,
        query_get(&pairs, "api-version").unwrap_or_default(),
    )
    .await
    {
        return r;
    }
    if let Some(r) =
        crate::event_routes::arm(&platform, &caller, &parts.method, &segs, &l, &body).await
    {
        return r.unwrap_or_else(|e| respond::error(&e));
    }
    if let Some(r) =
        crate::monitor_routes::arm(&platform, &caller, &parts.method, &segs, &l, &body).await
    {
        return r.unwrap_or_else(|e| respond::error(&e));
    }
    if let Some(r) =
        crate::identity_routes::arm(&platform, &caller, &parts.method, &segs, &l, &body, &pairs)
            .await
    {
        return r.unwrap_or_else(|e| respond::error(&e));
    }
    match arm(
        &platform,
        &caller,
        &parts.method,
        &segs,
        &l,
        &body,
        respond::odata_filter(&pairs),
    )
    .await
    {
        Ok(r) => r,
        Err(e) => respond::error(&e),
    }
}

/// The routes anyone may call: health, the OpenAPI description, the cloud metadata, the token
/// service's discovery documents and its token endpoint.
async fn anonymous(
    platform: &Platform,
    services: Option<&crate::Services>,
    parts: &axum::http::request::Parts,
    segs: &[&str],
    l: &[&str],
    body: Body,
) -> Response<Body> {
    match (l, &parts.method) {
        (["healthz"], &Method::GET) => respond::json(200, &serde_json::json!({"status": "ok"})),
        (["openapi.json"], &Method::GET) => respond::json(
            200,
            &crate::route_table::served_document(platform, services),
        ),
        // ARM's cloud metadata, unauthenticated as ARM serves it: `az cloud register
        // --endpoint-resource-manager https://localhost:8443/` reads every other endpoint
        // from it.
        (["metadata", "endpoints"], &Method::GET) => respond::json(200, &cloud_metadata(platform)),
        ([_, "v2.0", ".well-known", "openid-configuration"], &Method::GET) => {
            respond::json(200, &platform.openid_configuration(segs[0]))
        }
        ([_, "discovery", "v2.0", "keys"] | [_, "discovery", "keys"], &Method::GET) => {
            respond::json(200, &platform.jwks())
        }
        ([_, "oauth2", "v2.0", "token"], &Method::POST) => {
            // The raw form holds the password or the client secret: wiped when dropped.
            let body = match respond::read_secret_body(&parts.headers, body).await {
                Ok(b) => b,
                Err(e) => return respond::error(&e),
            };
            let source = parts
                .extensions
                .get::<crate::context::RemoteAddr>()
                .map(|r| r.0.ip().to_canonical());
            crate::identity_routes::token_endpoint(platform, segs[0], source, &body).await
        }
        _ => respond::error(&no_route(segs)),
    }
}

/// The answer to a path no route table holds (and to a table's route no handler serves,
/// which the route tests rule out).
fn no_route(segs: &[&str]) -> KvError {
    KvError::new(
        ErrorCode::NotFound,
        format!(
            "No management API is served at /{}.",
            kagi_core::ids::printable(&segs.join("/"))
        ),
    )
}

fn arm_challenge(platform: &Platform, e: KvError) -> Response<Body> {
    let mut r = respond::error(&e);
    let authority = platform.config().authority();
    if let Ok(v) = HeaderValue::from_str(&format!(
        "Bearer authorization_uri=\"{authority}/{}\", error=\"invalid_token\"",
        platform.default_tenant()
    )) {
        r.headers_mut().insert(header::WWW_AUTHENTICATE, v);
    }
    r
}

async fn arm(
    p: &Platform,
    caller: &Principal,
    method: &Method,
    segs: &[&str],
    l: &[&str],
    body: &[u8],
    filter: Option<&str>,
) -> Result<Response<Body>, KvError> {
    let ok = |status: u16, v: serde_json::Value| Ok(respond::json(status, &v));
    const KV: &str = "microsoft.keyvault";
    match (l, method) {
        (["subscriptions"], &Method::GET) => ok(200, p.list_subscriptions(caller).await?),
        (["subscriptions", _, "resources"], &Method::GET) => {
            ok(200, p.list_resources(caller, segs[1], None, filter).await?)
        }
        (["subscriptions", _, "resourcegroups", _, "resources"], &Method::GET) => ok(
            200,
            p.list_resources(caller, segs[1], Some(segs[3]), filter)
                .await?,
        ),
        // kagi serves no managed HSM pools: the lists are empty (the az CLI lists them beside
        // vaults in `az keyvault list` and `az keyvault list-deleted`).
        (
            [
                "subscriptions",
                _,
                "providers",
                kv,
                "managedhsms" | "deletedmanagedhsms",
            ]
            | [
                "subscriptions",
                _,
                "resourcegroups",
                _,
                "providers",
                kv,
                "managedhsms",
            ],
            &Method::GET,
        ) if *kv == KV => ok(200, p.list_managed_hsms(caller, segs[1]).await?),
        (["subscriptions", _, "resourcegroups"], &Method::GET) => {
            // `az group list --tag` filters on tagName/tagValue: refused, not ignored.
            if let Some(f) = filter {
                return Err(KvError::new(
                    ErrorCode::BadRequest,
                    format!(
                        "Invalid $filter '{}' specified in the query string: kagi lists \
                         resource groups without a filter.",
                        kagi_core::ids::printable(f)
                    ),
                )
                .with_inner("InvalidFilterInQueryString"));
            }
            ok(200, p.list_resource_groups(caller, segs[1]).await?)
        }
        (["subscriptions", _, "resourcegroups", _], &Method::PUT) => {
            let (status, v) = p
                .put_resource_group(caller, segs[1], segs[3], parse_json(body)?)
                .await?;
            ok(status, v)
        }
        (["subscriptions", _, "resourcegroups", _], &Method::GET) => {
            ok(200, p.get_resource_group(caller, segs[1], segs[3]).await?)
        }
        // `az group exists`: 204 when the group exists, 404 when not (no body either way).
        (["subscriptions", _, "resourcegroups", _], &Method::HEAD) => {
            p.get_resource_group(caller, segs[1], segs[3]).await?;
            Ok(respond::empty(204))
        }
        (
            [
                "subscriptions",
                _,
                "resourcegroups",
                _,
                "providers",
                kv,
                "vaults",
            ],
            &Method::GET,
        ) if *kv == KV => ok(200, p.list_vaults(caller, segs[1], Some(segs[3])).await?),
        (
            [
                "subscriptions",
                _,
                "resourcegroups",
                _,
                "providers",
                kv,
                "vaults",
                _,
            ],
            m,
        ) if *kv == KV => {
            let (sub, rg, name) = (segs[1], segs[3], segs[7]);
            match *m {
                Method::PUT | Method::PATCH => {
                    let (status, v) = p
                        .put_vault(
                            caller,
                            sub,
                            rg,
                            name,
                            parse_json(body)?,
                            *m == Method::PATCH,
                        )
                        .await?;
                    ok(status, v)
                }
                Method::GET => ok(200, p.get_vault(caller, sub, rg, name).await?),
                Method::DELETE => Ok(respond::empty(p.delete_vault(caller, sub, rg, name).await?)),
                _ => Err(method_not_allowed(m)),
            }
        }
        (
            [
                "subscriptions",
                _,
                "resourcegroups",
                _,
                "providers",
                kv,
                "vaults",
                _,
                "accesspolicies",
                _,
            ],
            &Method::PUT,
        ) if *kv == KV => ok(
            200,
            p.update_access_policy(
                caller,
                segs[1],
                segs[3],
                segs[7],
                segs[9],
                parse_json(body)?,
            )
            .await?,
        ),
        (["subscriptions", _, "providers", kv, "vaults"], &Method::GET) if *kv == KV => {
            ok(200, p.list_vaults(caller, segs[1], None).await?)
        }
        (["subscriptions", _, "providers", kv, "deletedvaults"], &Method::GET) if *kv == KV => {
            ok(200, p.list_deleted_vaults(caller, segs[1]).await?)
        }
        (
            [
                "subscriptions",
                _,
                "providers",
                kv,
                "locations",
                _,
                "deletedvaults",
                _,
            ],
            &Method::GET,
        ) if *kv == KV => ok(
            200,
            p.get_deleted_vault(caller, segs[1], segs[5], segs[7])
                .await?,
        ),
        (
            [
                "subscriptions",
                _,
                "providers",
                kv,
                "locations",
                _,
                "deletedvaults",
                _,
                "purge",
            ],
            &Method::POST,
        ) if *kv == KV => Ok(respond::empty(
            p.purge_deleted_vault(caller, segs[1], segs[5], segs[7])
                .await?,
        )),
        _ => Err(no_route(segs)),
    }
}

/// ARM's `GET /metadata/endpoints` for this server: the az CLI's cloud (`az cloud register
/// --endpoint-resource-manager`) and other SDKs read the login endpoint, the token audience,
/// Microsoft Graph and the key vault DNS suffix from it. kagi is all of them: one authority,
/// one audience (tokens for Graph and for ARM are the same token).
fn cloud_metadata(platform: &Platform) -> serde_json::Value {
    let config = platform.config();
    let authority = config.authority();
    let audience = format!("{authority}/");
    // `https://{vault}.{suffix}[:port]/` without the vault and the slash: `.localhost:8443`.
    let vault_dns = match authority.strip_prefix("https://") {
        Some(host) => format!(".{host}"),
        None => format!(".{}", config.dns_suffix),
    };
    serde_json::json!({
        "name": "kagi",
        "resourceManager": audience,
        "portal": audience,
        "gallery": audience,
        "graph": audience,
        "graphAudience": audience,
        "microsoftGraphResourceId": audience,
        "authentication": {
            "loginEndpoint": authority,
            "audiences": [audience],
            "tenant": platform.default_tenant(),
            "identityProvider": "AAD",
        },
        "suffixes": {
            "keyVaultDns": vault_dns,
            "sqlServerHostname": format!(".{}", config.dns_suffix),
        },
    })
}

/// Body of `POST /kagi/test/clock`.
#[derive(serde::Deserialize)]
struct ClockAdvance {
    #[serde(rename = "advanceSeconds")]
    advance_seconds: i64,
}

/// `POST https://{suffix}:{port}/kagi/test/clock` with `{"advanceSeconds": N}` (0 ≤ N ≤ 100
/// years) moves the platform's test clock forward, runs the purge sweep at the new time, and
/// answers `{"now": <unix seconds>}`. It exists only under `kagi server --test-clock`
/// (otherwise 404, like any unknown path) and only the bootstrap administrator may call it
/// (bearer token required; others 403; a bad body 400).
///
/// Access tokens are validated against the same clock ([`Platform::authenticate`] reads the
/// platform clock), so once the clock has moved past a token's expiry (one hour) the token is
/// refused with 401 and the client simply obtains a new one, as it would after an hour.
async fn test_clock(
    platform: &Platform,
    caller: &Principal,
    method: &Method,
    headers: axum::http::HeaderMap,
    body: Body,
) -> Response<Body> {
    if !platform.has_test_clock() {
        return respond::error(&KvError::new(
            ErrorCode::NotFound,
            "No management API is served at /kagi/test/clock.",
        ));
    }
    if method != Method::POST {
        return respond::error(&method_not_allowed(method));
    }
    let body = match respond::read_body(&headers, body).await {
        Ok(b) => b,
        Err(e) => return respond::error(&e),
    };
    let result = async {
        platform.authorize_test_clock(caller)?;
        let req: ClockAdvance = parse_json(&body)?;
        platform
            .advance_test_clock(caller, req.advance_seconds)
            .await
    }
    .await;
    match result {
        Ok(now) => respond::json(200, &serde_json::json!({ "now": now })),
        Err(e) => respond::error(&e),
    }
}

fn method_not_allowed(m: &Method) -> KvError {
    KvError::new(
        ErrorCode::MethodNotAllowed,
        format!("The method {m} is not allowed on this resource."),
    )
}
