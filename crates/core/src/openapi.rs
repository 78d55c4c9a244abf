//! The OpenAPI 3 description of kagi's routes, generated from the route tables
//! ([`crate::route_table`]) and nothing else: a route is described exactly when it is served.
//! Pure: the server hands in the routes it serves (the platform's and its storage services')
//! and the URLs it answers at (`GET /openapi.json`, `kagi openapi`).
//!
//! What the tables know is described: the host (the management host, or a vault's host with a
//! `servers` of its own), the method and path, the path parameters, the `api-version` a route
//! requires, its query and header parameters, its authentication, whether it takes a JSON
//! object, a form or bytes, and its operation name (the audit log's, as `x-kagi-operation`, and
//! as the `operationId`, made unique with a `_2`, `_3`… where routes share one). Bodies are
//! generic JSON objects; errors are Azure's `{"error": {"code", "message"}}` (the token
//! endpoints': OAuth's `{"error", "error_description"}`).

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};

use crate::route_table::{ApiVersion, Auth, Host, ParamIn, RequestBody, Route, param_name};

/// The OpenAPI version of the document.
pub const OPENAPI_VERSION: &str = "3.0.3";

/// The data-plane api-versions the description offers (every `7.4`…`7.6`, preview tails and
/// dated version from `2025-01-01` to `2026-04-01` is accepted).
const DATA_PLANE_VERSIONS: &[&str] = &["7.4", "7.5", "7.6", "2025-07-01"];

/// Where the described server answers, and what it calls itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DocumentInfo {
    /// kagi's version (`info.version`).
    pub version: String,
    /// The management host's URL (`https://localhost:8443`).
    pub management_url: String,
    /// A vault's URL with `{vaultName}` for its name (`https://{vaultName}.localhost:8443`).
    pub vault_url: String,
}

impl DocumentInfo {
    /// The URLs of a server at `https://{dns_suffix}[:{port}]` (port 443 left out).
    pub fn for_server(version: &str, dns_suffix: &str, port: u16) -> Self {
        let port = if port == 443 {
            String::new()
        } else {
            format!(":{port}")
        };
        Self {
            version: version.to_string(),
            management_url: format!("https://{dns_suffix}{port}"),
            vault_url: format!("https://{{vaultName}}.{dns_suffix}{port}"),
        }
    }
}

/// The OpenAPI path of a route: its template with `{*name}` written `{name}`.
pub fn openapi_path(route: &Route) -> String {
    route.path.replace("{*", "{")
}

/// The OpenAPI 3 document describing `routes` (in their tables' order: an operation id
/// shared by several routes is suffixed from the second on). When two routes have the same
/// host, method and path, the first is described.
pub fn document<'r>(routes: impl IntoIterator<Item = &'r Route>, info: &DocumentInfo) -> Value {
    let mut paths: BTreeMap<String, Map<String, Value>> = BTreeMap::new();
    let mut path_params: BTreeMap<&str, Value> = BTreeMap::new();
    let mut seen_ids: BTreeMap<&str, usize> = BTreeMap::new();
    for route in routes {
        let item = paths.entry(openapi_path(route)).or_default();
        let method = route.method.to_ascii_lowercase();
        if item.contains_key(&method) {
            continue;
        }
        if route.host == Host::Vault && !item.contains_key("servers") {
            item.insert(
                "servers".into(),
                json!([{
                    "url": info.vault_url,
                    "description": "A key vault's host.",
                    "variables": {"vaultName": {"default": "myvault"}},
                }]),
            );
        }
        for segment in route.segments() {
            if let Some(name) = param_name(segment) {
                path_params
                    .entry(name)
                    .or_insert_with(|| path_param(name, segment.starts_with("{*")));
            }
        }
        let n = seen_ids.entry(route.operation).or_default();
        *n += 1;
        let id = if *n == 1 {
            route.operation.to_string()
        } else {
            format!("{}_{n}", route.operation)
        };
        item.insert(method, operation(route, id));
    }
    json!({
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "kagi",
            "version": info.version,
            "description": "Every route kagi serves, generated from its route tables: the management host (Entra-shaped token service, ARM, Microsoft Graph, kagi's own) and each vault's data plane (Azure Key Vault). Errors are Azure's {\"error\": {\"code\", \"message\"}}.",
        },
        "servers": [{"url": info.management_url, "description": "The management host."}],
        "tags": [
            {"name": "management", "description": "The management host."},
            {"name": "data-plane", "description": "A key vault's data plane, on the vault's host."},
        ],
        "paths": paths,
        "components": components(path_params),
    })
}

/// A path parameter: one segment, or (`multi`) one or more.
fn path_param(name: &str, multi: bool) -> Value {
    let mut p = json!({
        "name": name,
        "in": "path",
        "required": true,
        "schema": {"type": "string", "minLength": 1},
    });
    if multi {
        p["description"] =
            "One or more path segments: a resource id (or scope) without its leading slash.".into();
        p["x-ms-skip-url-encoding"] = true.into();
    }
    p
}

/// A reference to a component.
fn reference(kind: &str, name: &str) -> Value {
    json!({"$ref": format!("#/components/{kind}/{name}")})
}

/// One operation of the document.
fn operation(route: &Route, id: String) -> Value {
    let mut params: Vec<Value> = route
        .path_params()
        .map(|name| reference("parameters", name))
        .collect();
    match route.api_version {
        ApiVersion::None => {}
        ApiVersion::DataPlane => params.push(reference("parameters", "api-version-data-plane")),
        ApiVersion::Arm => params.push(reference("parameters", "api-version-arm")),
    }
    for p in route.params {
        params.push(json!({
            "name": p.name,
            "in": match p.at {
                ParamIn::Query => "query",
                ParamIn::Header => "header",
            },
            "required": p.required,
            "description": p.description,
            "schema": {"type": "string"},
        }));
    }
    let tag = match route.host {
        Host::Management => "management",
        Host::Vault => "data-plane",
    };
    let security = match route.auth {
        Auth::Bearer => json!([{"bearer": []}]),
        Auth::Agent => json!([{"agentCredential": []}]),
        // The binding secret is a parameter (a header, or a path segment of IMDS's URL).
        Auth::Anonymous | Auth::BindingSecret => json!([]),
    };
    let error = if route.operation == "Authentication" {
        "OAuthError"
    } else {
        "Error"
    };
    let success = if route.method == "HEAD" {
        "NoBody"
    } else {
        "Success"
    };
    let mut op = json!({
        "operationId": id,
        "summary": route.summary,
        "tags": [tag],
        "x-kagi-operation": route.operation,
        "parameters": params,
        "security": security,
        "responses": {
            "2XX": reference("responses", success),
            "default": reference("responses", error),
        },
    });
    let body = match route.body {
        RequestBody::None => None,
        RequestBody::Json => Some("Json"),
        RequestBody::OptionalJson => Some("OptionalJson"),
        RequestBody::Form => Some("Form"),
        RequestBody::Bytes => Some("Bytes"),
    };
    if let Some(body) = body {
        op["requestBody"] = reference("requestBodies", body);
    }
    op
}

/// The shared components: parameters, bodies, security schemes and answers.
fn components(path_params: BTreeMap<&str, Value>) -> Value {
    let mut parameters: Map<String, Value> = path_params
        .into_iter()
        .map(|(name, p)| (name.to_string(), p))
        .collect();
    parameters.insert(
        "api-version-data-plane".into(),
        json!({
            "name": "api-version",
            "in": "query",
            "required": true,
            "description": "The Key Vault data-plane version: 7.4 to 7.6 (with -preview.N tails) or a dated version from 2025-01-01 to 2026-04-01.",
            "schema": {"type": "string", "enum": DATA_PLANE_VERSIONS},
        }),
    );
    parameters.insert(
        "api-version-arm".into(),
        json!({
            "name": "api-version",
            "in": "query",
            "required": true,
            "description": "An ARM api-version (any dated version).",
            "schema": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}(-preview)?$"},
        }),
    );
    let object = json!({"type": "object", "additionalProperties": true});
    let bytes = json!({"type": "string", "format": "binary"});
    let azure_error = json!({
        "type": "object",
        "required": ["error"],
        "properties": {"error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {
                "code": {"type": "string"},
                "message": {"type": "string"},
                "innererror": {"type": "object", "properties": {"code": {"type": "string"}}},
                "details": {"type": "array", "items": {"type": "object"}},
            },
        }},
    });
    json!({
        "parameters": parameters,
        "requestBodies": {
            "Json": {"required": true, "content": {"application/json": {"schema": object}}},
            "OptionalJson": {
                "required": false,
                "description": "A JSON object; no body is taken as {}.",
                "content": {"application/json": {"schema": object}},
            },
            "Form": {"required": true, "content": {"application/x-www-form-urlencoded": {
                "schema": {"type": "object", "additionalProperties": {"type": "string"}},
            }}},
            "Bytes": {"required": true, "content": {"application/octet-stream": {"schema": bytes}}},
        },
        "securitySchemes": {
            "bearer": {
                "type": "http",
                "scheme": "bearer",
                "bearerFormat": "JWT",
                "description": "An access token from kagi's token service (POST /{tenant}/oauth2/v2.0/token).",
            },
            "agentCredential": {
                "type": "apiKey",
                "in": "header",
                "name": "Authorization",
                "description": "A backup agent's credentials: `KagiVaultCredential <base64>` (the vault credentials file) or `KagiAgent <machine>:<base64>` (a registered machine).",
            },
        },
        "schemas": {
            "Error": azure_error,
            "OAuthError": {
                "type": "object",
                "required": ["error"],
                "properties": {
                    "error": {"type": "string"},
                    "error_description": {"type": "string"},
                },
            },
        },
        "responses": {
            "Success": {
                "description": "Success: a JSON document, bytes, or no body (201, 202 and 204 as Azure answers).",
                "content": {
                    "application/json": {"schema": {}},
                    "application/octet-stream": {"schema": bytes},
                },
            },
            "NoBody": {"description": "Success (no body)."},
            "Error": {
                "description": "An error in Azure's shape.",
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
            },
            "OAuthError": {
                "description": "An error in OAuth's shape (RFC 6749), or Azure's.",
                "content": {"application/json": {"schema": {"oneOf": [
                    {"$ref": "#/components/schemas/OAuthError"},
                    {"$ref": "#/components/schemas/Error"},
                ]}}},
            },
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc() -> Value {
        let routes = crate::management_routes::MANAGEMENT
            .iter()
            .chain(crate::routes::DATA_PLANE);
        document(
            routes,
            &DocumentInfo::for_server("0.1.0", "localhost", 8443),
        )
    }

    #[test]
    fn every_route_is_described_once() {
        let d = doc();
        let mut ids = std::collections::BTreeSet::new();
        let mut count = 0;
        for route in crate::management_routes::MANAGEMENT
            .iter()
            .chain(crate::routes::DATA_PLANE)
        {
            let op = &d["paths"][openapi_path(route)][route.method.to_ascii_lowercase()];
            assert_eq!(op["x-kagi-operation"], route.operation, "{}", route.path);
            assert!(
                ids.insert(op["operationId"].as_str().unwrap().to_string()),
                "{}",
                route.path
            );
            count += 1;
        }
        let described: usize = d["paths"]
            .as_object()
            .unwrap()
            .values()
            .map(|item| {
                item.as_object()
                    .unwrap()
                    .keys()
                    .filter(|k| *k != "servers")
                    .count()
            })
            .sum();
        assert_eq!(described, count, "no route shadows another");
    }

    #[test]
    fn shapes() {
        let d = doc();
        assert_eq!(d["openapi"], OPENAPI_VERSION);
        assert_eq!(d["servers"][0]["url"], "https://localhost:8443");
        let get_key = &d["paths"]["/keys/{keyName}/{keyVersion}"];
        assert_eq!(
            get_key["servers"][0]["url"],
            "https://{vaultName}.localhost:8443"
        );
        assert_eq!(get_key["get"]["operationId"], "KeyGet_2");
        assert_eq!(get_key["get"]["security"][0]["bearer"], json!([]));
        let params: Vec<&str> = get_key["get"]["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["$ref"].as_str().unwrap())
            .collect();
        assert_eq!(
            params,
            [
                "#/components/parameters/keyName",
                "#/components/parameters/keyVersion",
                "#/components/parameters/api-version-data-plane"
            ]
        );
        let token = &d["paths"]["/{tenant}/oauth2/v2.0/token"]["post"];
        assert_eq!(token["security"], json!([]));
        assert_eq!(
            token["requestBody"]["$ref"],
            "#/components/requestBodies/Form"
        );
        assert_eq!(
            token["responses"]["default"]["$ref"],
            "#/components/responses/OAuthError"
        );
        let scope = &d["components"]["parameters"]["scope"];
        assert_eq!(scope["x-ms-skip-url-encoding"], true);
        assert_eq!(d["components"]["parameters"]["keyName"]["in"], "path");
        assert_eq!(
            DocumentInfo::for_server("1", "kagi.example", 443).management_url,
            "https://kagi.example"
        );
    }
}
