//! Routes of the directory: managed-identity token endpoints, service principals
//! (Graph-shaped), and the ARM resources of identities, role-based access and locks.

use std::collections::HashMap;
use std::net::IpAddr;

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, Method, Response, header};
use kagi_core::{ErrorCode, KvError};
use kagi_vault::{Platform, Principal};
use serde_json::{Value, json};

use crate::respond::{self, parse_json, query_get};

/// The managed-identity endpoints, which authenticate by the workload's binding secret rather
/// than a bearer token. `None` when the path is not one of them.
///
/// - App Service style: `GET /msi/token?api-version=2019-08-01&resource=…` with
///   `X-IDENTITY-HEADER: <secret>` (`IDENTITY_ENDPOINT` + `IDENTITY_HEADER`).
/// - IMDS style: `GET /imds/{secret}/metadata/identity/oauth2/token?api-version=2018-02-01&
///   resource=…` with `Metadata: true` (`AZURE_POD_IDENTITY_AUTHORITY_HOST`).
pub(crate) async fn managed_identity(
    p: &Platform,
    method: &Method,
    segs: &[&str],
    l: &[&str],
    headers: &HeaderMap,
    pairs: &[(String, String)],
) -> Option<Response<Body>> {
    let (secret, imds) = match l {
        ["msi", "token"] => (
            headers
                .get("x-identity-header")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string(),
            false,
        ),
        ["imds", _, "metadata", "identity", "oauth2", "token"] => (segs[1].to_string(), true),
        _ => return None,
    };
    let refuse = |status: u16, error: &str, description: &str| {
        respond::json(
            status,
            &json!({"error": error, "error_description": description}),
        )
    };
    if method != Method::GET {
        return Some(refuse(405, "invalid_request", "Use GET."));
    }
    if imds
        && !headers
            .get("metadata")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case("true"))
    {
        return Some(refuse(
            400,
            "invalid_request",
            "Required metadata header not specified",
        ));
    }
    let Some(resource) = query_get(pairs, "resource") else {
        return Some(refuse(
            400,
            "invalid_request",
            "The resource parameter is required.",
        ));
    };
    let selector = [
        "client_id",
        "object_id",
        "principal_id",
        "mi_res_id",
        "msi_res_id",
    ]
    .into_iter()
    .find_map(|k| query_get(pairs, k).map(|v| (k, v)));
    match p.managed_identity_token(&secret, resource, selector).await {
        Ok(grant) => {
            let expires_on = p.token_expires_on();
            Some(respond::json(
                200,
                &json!({
                    "access_token": grant.access_token,
                    "expires_in": grant.expires_in.to_string(),
                    "expires_on": expires_on.to_string(),
                    "ext_expires_in": grant.expires_in.to_string(),
                    "not_before": (expires_on - grant.expires_in).to_string(),
                    "resource": resource,
                    "token_type": "Bearer",
                }),
            ))
        }
        Err(e) if e.status() == 401 => Some(refuse(401, "invalid_client", &e.message)),
        Err(e) => Some(refuse(e.status(), "invalid_request", &e.message)),
    }
}

/// `POST /{tenant}/oauth2/v2.0/token`: the form body, from the connection's address (the
/// password grant is throttled per source). A 429 carries `Retry-After`.
pub(crate) async fn token_endpoint(
    p: &Platform,
    tenant: &str,
    source: Option<IpAddr>,
    body: &[u8],
) -> Response<Body> {
    let mut form: HashMap<String, String> = form_urlencoded::parse(body)
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    let answer = p.token_request(tenant, &form, source).await;
    // The decoded fields hold the password or the client secret.
    form.values_mut().for_each(zeroize::Zeroize::zeroize);
    match answer {
        Ok(grant) => respond::json(200, &grant),
        Err(e) => {
            let mut r = respond::json(e.status, &e);
            if let Some(v) = e
                .retry_after
                .and_then(|s| HeaderValue::from_str(&s.to_string()).ok())
            {
                r.headers_mut().insert(header::RETRY_AFTER, v);
            }
            r
        }
    }
}

/// kagi's own administration of the token service under `/kagi/admin` (the bootstrap
/// administrator only; no api-version). `None` when the path is not one of them.
///
/// | Route | Does |
/// |---|---|
/// | `GET /kagi/admin/signingKeys` | the signing key and the retired keys that still validate |
/// | `POST /kagi/admin/signingKeys/rotate` `{"revokePrevious"?: bool}` | rotates the signing key |
pub(crate) async fn admin(
    p: &Platform,
    caller: &Principal,
    method: &Method,
    l: &[&str],
    body: &[u8],
) -> Option<Response<Body>> {
    let r = match (l, method) {
        (["kagi", "admin", "signingkeys"], &Method::GET) => p.signing_keys(caller),
        (["kagi", "admin", "signingkeys", "rotate"], &Method::POST) => {
            let input: Value = if body.iter().all(u8::is_ascii_whitespace) {
                json!({})
            } else {
                match parse_json(body) {
                    Ok(v) => v,
                    Err(e) => return Some(respond::error(&e)),
                }
            };
            match input.get("revokePrevious") {
                None | Some(Value::Null) => p.rotate_signing_key(caller, false).await,
                Some(Value::Bool(b)) => p.rotate_signing_key(caller, *b).await,
                Some(_) => Err(KvError::new(
                    ErrorCode::BadRequest,
                    "revokePrevious must be true or false.",
                )),
            }
        }
        (["kagi", "admin", "signingkeys", ..], _) => Err(KvError::new(
            ErrorCode::MethodNotAllowed,
            "Use GET /kagi/admin/signingKeys or POST /kagi/admin/signingKeys/rotate.",
        )),
        _ => return None,
    };
    Some(match r {
        Ok(v) => respond::json(200, &v),
        Err(e) => respond::error(&e),
    })
}

/// Graph-shaped service principal endpoints under `/v1.0/servicePrincipals` (no api-version).
pub(crate) async fn graph(
    p: &Platform,
    caller: &Principal,
    method: &Method,
    segs: &[&str],
    l: &[&str],
    body: &[u8],
    filter: Option<&str>,
) -> Option<Result<Response<Body>, KvError>> {
    let r = match (l, method) {
        (["v1.0", "me"], &Method::GET) => p.graph_me(caller).map(|v| respond::json(200, &v)),
        (["v1.0", "directoryobjects", "getbyids"], &Method::POST) => match parse_json(body) {
            Ok(input) => p
                .graph_get_by_ids(caller, &input)
                .map(|v| respond::json(200, &v)),
            Err(e) => Err(e),
        },
        (["v1.0", "serviceprincipals", _], &Method::GET) => p
            .graph_get(caller, false, segs[2])
            .map(|v| respond::json(200, &v)),
        (["v1.0", "users", _], &Method::GET) => p
            .graph_get(caller, true, segs[2])
            .map(|v| respond::json(200, &v)),
        (["v1.0", "serviceprincipals"], &Method::POST) => {
            let input: Value = match parse_json(body) {
                Ok(v) => v,
                Err(e) => return Some(Err(e)),
            };
            // `{"appId"}` (`az ad sp create --id`, `az ad sp create-for-rbac`): the service
            // principal kagi made with the application.
            if let Some(app_id) = input.get("appId").and_then(Value::as_str) {
                return Some(
                    p.service_principal_of_application(caller, app_id)
                        .map(|v| respond::json(201, &v)),
                );
            }
            let name = input
                .get("displayName")
                .and_then(Value::as_str)
                .unwrap_or("");
            p.create_service_principal(caller, name)
                .await
                .map(|v| respond::json(201, &v))
        }
        (["v1.0", "applications"], &Method::GET) => p
            .graph_applications(caller, filter)
            .map(|v| respond::json(200, &v)),
        (["v1.0", "applications"], &Method::POST) => match parse_json::<Value>(body) {
            Ok(input) => p
                .create_application(caller, &input)
                .await
                .map(|v| respond::json(201, &v)),
            Err(e) => Err(e),
        },
        (["v1.0", "applications", _], &Method::GET) => p
            .graph_application(caller, segs[2])
            .map(|v| respond::json(200, &v)),
        (["v1.0", "applications", _], &Method::PATCH) => match parse_json::<Value>(body) {
            Ok(input) => p
                .update_application(caller, segs[2], &input)
                .map(|()| respond::empty(204)),
            Err(e) => Err(e),
        },
        (["v1.0", "applications", _], &Method::DELETE) => p
            .delete_application(caller, segs[2])
            .await
            .map(|()| respond::empty(204)),
        // Graph takes `addPassword` without a body too.
        (["v1.0", "applications", _, "addpassword"], &Method::POST) => {
            match if body.is_empty() {
                Ok(serde_json::json!({}))
            } else {
                parse_json::<Value>(body)
            } {
                Ok(input) => p
                    .add_application_password(caller, segs[2], &input)
                    .await
                    .map(|v| respond::json(200, &v)),
                Err(e) => Err(e),
            }
        }
        (
            [
                "v1.0",
                "applications" | "serviceprincipals",
                _,
                "removepassword",
            ],
            &Method::POST,
        ) => match parse_json::<Value>(body) {
            Ok(input) => p
                .remove_application_password(caller, segs[2], &input)
                .await
                .map(|()| respond::empty(204)),
            Err(e) => Err(e),
        },
        (["v1.0", "serviceprincipals"], &Method::GET) => p
            .graph_service_principals(caller, filter)
            .map(|v| respond::json(200, &v)),
        (["v1.0", "serviceprincipals", _], &Method::DELETE) => p
            .delete_service_principal(caller, segs[2])
            .await
            .map(|()| respond::empty(204)),
        (["v1.0", "serviceprincipals", _, "addkey"], &Method::POST) => {
            let input: Value = match parse_json(body) {
                Ok(v) => v,
                Err(e) => return Some(Err(e)),
            };
            let cert = input["keyCredential"]["key"].as_str().unwrap_or("");
            p.add_service_principal_certificate(caller, segs[2], cert)
                .await
                .map(|v| respond::json(200, &v))
        }
        (["v1.0", "serviceprincipals", _, "addpassword"], &Method::POST) => p
            .reset_service_principal_secret(caller, segs[2])
            .await
            .map(|v| respond::json(200, &v)),
        (["v1.0", "users"], &Method::POST) => {
            let input: Value = match parse_json(body) {
                Ok(v) => v,
                Err(e) => return Some(Err(e)),
            };
            p.create_user(
                caller,
                input["userPrincipalName"].as_str().unwrap_or(""),
                input["displayName"].as_str().unwrap_or(""),
                input["passwordProfile"]["password"].as_str().unwrap_or(""),
            )
            .await
            .map(|v| respond::json(201, &v))
        }
        (["v1.0", "users"], &Method::GET) => p
            .graph_users(caller, filter)
            .map(|v| respond::json(200, &v)),
        (["v1.0", "users", _], &Method::DELETE) => p
            .delete_user(caller, segs[2])
            .await
            .map(|()| respond::empty(204)),
        (["v1.0", ..], _) => Err(KvError::new(
            ErrorCode::NotFound,
            "No directory API is served at this path.",
        )),
        _ => return None,
    };
    Some(r)
}

/// ARM routes of the directory, matched anywhere under a scope. `None` when the path is not
/// one of them.
pub(crate) async fn arm(
    p: &Platform,
    caller: &Principal,
    method: &Method,
    segs: &[&str],
    l: &[&str],
    body: &[u8],
    pairs: &[(String, String)],
) -> Option<Result<Response<Body>, KvError>> {
    // {scope}/providers/Microsoft.PolicyInsights/policyStates/latest/queryResults (GET or POST)
    if let Some(i) = l
        .windows(2)
        .position(|w| w == ["providers", "microsoft.policyinsights"])
    {
        let scope = format!("/{}", segs[..i].join("/"));
        return Some(match (&l[i + 2..], method) {
            (["policystates", "latest", "queryresults"], &Method::GET | &Method::POST) => p
                .policy_states(caller, &scope)
                .await
                .map(|v| respond::json(200, &v)),
            _ => Err(KvError::new(
                ErrorCode::NotFound,
                "No policy insights API is served at this path.",
            )),
        });
    }
    // {scope}/providers/Microsoft.Authorization/{roleAssignments|roleDefinitions|locks|
    // policyAssignments}[/{id}]
    if let Some(i) = l
        .windows(2)
        .position(|w| w == ["providers", "microsoft.authorization"])
    {
        let scope = format!("/{}", segs[..i].join("/"));
        let rest = &l[i + 2..];
        let id = segs.get(i + 3).copied();
        let filter = respond::odata_filter(pairs);
        let json_body = || -> Result<Value, KvError> { parse_json(body) };
        let r = match (rest, method) {
            (["roleassignments"], &Method::GET) => p
                .list_role_assignments_filtered(caller, &scope, filter)
                .map(|v| respond::json(200, &v)),
            (["roleassignments", _], &Method::PUT) => match json_body() {
                Ok(b) => p
                    .put_role_assignment(caller, &scope, id.unwrap_or(""), b)
                    .await
                    .map(|(s, v)| respond::json(s, &v)),
                Err(e) => Err(e),
            },
            (["roleassignments", _], &Method::GET) => p
                .get_role_assignment(caller, id.unwrap_or(""))
                .map(|v| respond::json(200, &v)),
            (["roleassignments", _], &Method::DELETE) => p
                .delete_role_assignment(caller, id.unwrap_or(""))
                .await
                .map(|(s, v)| {
                    if s == 204 {
                        respond::empty(204)
                    } else {
                        respond::json(s, &v)
                    }
                }),
            (["roledefinitions"], &Method::GET) => p
                .list_role_definitions_filtered(caller, &scope, filter)
                .map(|v| respond::json(200, &v)),
            (["roledefinitions", _], &Method::PUT) => match json_body() {
                Ok(b) => p
                    .put_role_definition(caller, &scope, id.unwrap_or(""), b)
                    .await
                    .map(|(s, v)| respond::json(s, &v)),
                Err(e) => Err(e),
            },
            (["roledefinitions", _], &Method::GET) => p
                .get_role_definition(caller, &scope, id.unwrap_or(""))
                .map(|v| respond::json(200, &v)),
            (["roledefinitions", _], &Method::DELETE) => p
                .delete_role_definition(caller, id.unwrap_or(""))
                .await
                .map(respond::empty),
            (["policyassignments"], &Method::GET) => p
                .list_policy_assignments(caller, &scope)
                .await
                .map(|v| respond::json(200, &v)),
            (["policyassignments", _], &Method::PUT) => match json_body() {
                Ok(b) => p
                    .put_policy_assignment(caller, &scope, id.unwrap_or(""), b)
                    .await
                    .map(|(s, v)| respond::json(s, &v)),
                Err(e) => Err(e),
            },
            (["policyassignments", _], &Method::GET) => p
                .get_policy_assignment(caller, &scope, id.unwrap_or(""))
                .await
                .map(|v| respond::json(200, &v)),
            (["policyassignments", _], &Method::DELETE) => p
                .delete_policy_assignment(caller, &scope, id.unwrap_or(""))
                .await
                .map(|(s, v)| {
                    if s == 204 {
                        respond::empty(204)
                    } else {
                        respond::json(s, &v)
                    }
                }),
            (["locks"], &Method::GET) => {
                p.list_locks(caller, &scope).map(|v| respond::json(200, &v))
            }
            (["locks", _], &Method::PUT) => match json_body() {
                Ok(b) => p
                    .put_lock(caller, &scope, id.unwrap_or(""), b)
                    .await
                    .map(|(s, v)| respond::json(s, &v)),
                Err(e) => Err(e),
            },
            (["locks", _], &Method::GET) => p
                .get_lock(caller, &scope, id.unwrap_or(""))
                .map(|v| respond::json(200, &v)),
            (["locks", _], &Method::DELETE) => p
                .delete_lock(caller, &scope, id.unwrap_or(""))
                .await
                .map(respond::empty),
            _ => Err(KvError::new(
                ErrorCode::NotFound,
                "No authorization API is served at this path.",
            )),
        };
        return Some(r);
    }

    // /subscriptions/{s}/resourceGroups/{rg}/providers/{ns}/{type}[/{name}[/listIdentityEnvironment]]
    let (
        [
            "subscriptions",
            _,
            "resourcegroups",
            _,
            "providers",
            ns,
            ty,
            rest @ ..,
        ],
        m,
    ) = (l, method)
    else {
        return None;
    };
    let resource_type = format!("{}/{}", segs[5], segs[6]);
    let served = (*ns == "microsoft.managedidentity" && *ty == "userassignedidentities")
        || (*ns == "kagi.compute" && *ty == "workloads");
    if !served {
        return None;
    }
    let (sub, rg) = (segs[1], segs[3]);
    let r = match (rest, m) {
        ([], &Method::GET) => p
            .list_identity_resources(caller, sub, rg, &resource_type)
            .map(|v| respond::json(200, &v)),
        ([_], &Method::PUT) => match parse_json::<Value>(body) {
            Ok(b) => p
                .put_identity_resource(caller, sub, rg, &resource_type, segs[7], b)
                .await
                .map(|(s, v)| respond::json(s, &v)),
            Err(e) => Err(e),
        },
        ([_], &Method::GET) => p
            .get_identity_resource(caller, sub, rg, &resource_type, segs[7])
            .map(|v| respond::json(200, &v)),
        ([_], &Method::DELETE) => p
            .delete_identity_resource(caller, sub, rg, &resource_type, segs[7])
            .await
            .map(respond::empty),
        ([_, "listidentityenvironment"], &Method::POST) => {
            let id = format!("/{}", segs[..8].join("/"));
            match query_get(pairs, "expiresInHours")
                .map(|h| h.parse::<i64>())
                .transpose()
            {
                Ok(hours) => p
                    .bind_workload_for(caller, &id, query_get(pairs, "clientId"), hours)
                    .await
                    .map(|v| respond::json(200, &v)),
                Err(_) => Err(KvError::new(
                    ErrorCode::BadRequest,
                    "expiresInHours must be a whole number of hours.",
                )),
            }
        }
        // Workload bindings: listed (never their secrets) and revoked one at a time.
        ([_, "identitybindings"], &Method::GET) => p
            .list_bindings(caller, &format!("/{}", segs[..8].join("/")))
            .await
            .map(|v| respond::json(200, &v)),
        ([_, "identitybindings", _], &Method::DELETE) => p
            .revoke_binding(caller, &format!("/{}", segs[..8].join("/")), segs[9])
            .await
            .map(|v| respond::json(200, &v)),
        _ => Err(KvError::new(
            ErrorCode::MethodNotAllowed,
            "The method is not allowed on this resource.",
        )),
    };
    Some(r)
}
