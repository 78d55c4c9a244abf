//! Microsoft Graph's reads of the directory, in Graph's shape, as the az CLI asks them:
//! `GET /v1.0/servicePrincipals[?$filter=…]`, `GET /v1.0/servicePrincipals/{id}`,
//! `GET /v1.0/users[?$filter=…]`, `GET /v1.0/users/{id}`, `GET /v1.0/me` and
//! `POST /v1.0/directoryObjects/getByIds`.
//!
//! Graph calls a managed identity a service principal (`servicePrincipalType:
//! ManagedIdentity`), and so does kagi; users are listed apart. Each object keeps kagi's own
//! fields (`objectId`, `clientId`, `principalType`, …) beside Graph's (`id`, `appId`,
//! `servicePrincipalNames`, …), so older clients of these lists keep working.

use kagi_core::odata::{FieldValue, Filter};
use kagi_core::time::rfc3339;
use kagi_core::{ErrorCode, KvError};
use kagi_identity::Principal;
use kagi_store::PrincipalRecord;
use serde_json::{Value, json};

use crate::{Directory, kind};

/// Graph answers at most this many ids in one `getByIds`.
const MAX_IDS: usize = 1000;

fn is_user(p: &PrincipalRecord) -> bool {
    p.kind == kind::USER
}

fn upn(p: &PrincipalRecord) -> &str {
    p.client_id.strip_prefix("user:").unwrap_or(&p.client_id)
}

/// Graph's `servicePrincipalType` of a kagi principal kind.
fn sp_type(p: &PrincipalRecord) -> &'static str {
    match p.kind.as_str() {
        kind::SYSTEM_ASSIGNED | kind::USER_ASSIGNED => "ManagedIdentity",
        _ => "Application",
    }
}

/// The names a service principal is found by: its application id and, for a managed
/// identity, the resource it belongs to (as Graph lists them).
fn sp_names(p: &PrincipalRecord) -> Vec<&str> {
    let mut names = vec![p.client_id.as_str()];
    if let Some(r) = p.resource_id.as_deref() {
        names.push(r);
    }
    names
}

fn common(p: &PrincipalRecord) -> Value {
    json!({
        "id": p.object_id,
        "displayName": p.display_name,
        "objectId": p.object_id,
        "tenantId": p.tenant_id,
        "principalType": p.kind,
        "resourceId": p.resource_id,
        "createdDateTime": rfc3339(p.created),
    })
}

/// The key id of a password: derived from its hash (so it names this password and no other)
/// without saying anything about the secret.
pub(crate) fn password_key_id(secret_hash: &[u8]) -> String {
    let mut input = b"kagi application password key id\0".to_vec();
    input.extend_from_slice(secret_hash);
    let d = kagi_crypto::digest(kagi_crypto::DigestAlgorithm::Sha256, &input);
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&d[..16]);
    kagi_core::ids::uuid_v4(bytes)
}

/// A service principal's (and its application's) `passwordCredentials`: its one password, if it has one (never the secret).
pub(crate) fn password_credentials(p: &PrincipalRecord) -> Value {
    if p.secret_hash.is_empty() {
        return json!([]);
    }
    json!([{
        "customKeyIdentifier": null,
        "displayName": null,
        "endDateTime": null,
        "hint": null,
        "keyId": password_key_id(&p.secret_hash),
        "secretText": null,
        "startDateTime": null,
    }])
}

/// A principal as Graph shows it (a user or a service principal).
pub(crate) fn graph_json(p: &PrincipalRecord) -> Value {
    let mut v = common(p);
    if is_user(p) {
        v["@odata.type"] = json!("#microsoft.graph.user");
        v["userPrincipalName"] = json!(upn(p));
        v["mail"] = Value::Null;
        v["accountEnabled"] = json!(true);
        v["clientId"] = json!(p.client_id);
    } else {
        v["@odata.type"] = json!("#microsoft.graph.servicePrincipal");
        v["appId"] = json!(p.client_id);
        v["clientId"] = json!(p.client_id);
        v["appDisplayName"] = json!(p.display_name);
        v["appOwnerOrganizationId"] = json!(p.tenant_id);
        v["servicePrincipalType"] = json!(sp_type(p));
        v["servicePrincipalNames"] = json!(sp_names(p));
        v["accountEnabled"] = json!(true);
        v["passwordCredentials"] = password_credentials(p);
        v["alternativeNames"] = json!(p.resource_id.as_deref().map_or_else(Vec::new, |r| vec![r]));
    }
    v
}

/// Answers the fields a `$filter` may name, by their lower-cased Graph names.
fn field<'a>(p: &'a PrincipalRecord, name: &str) -> Option<FieldValue<'a>> {
    let one = FieldValue::One;
    Some(match name {
        "id" => one(&p.object_id),
        "displayname" => one(&p.display_name),
        "appid" if !is_user(p) => one(&p.client_id),
        "serviceprincipalnames" if !is_user(p) => FieldValue::Many(sp_names(p)),
        "serviceprincipaltype" if !is_user(p) => one(sp_type(p)),
        "userprincipalname" | "mail" if is_user(p) => one(upn(p)),
        _ => return None,
    })
}

const SP_FIELDS: &[&str] = &[
    "id",
    "displayname",
    "appid",
    "serviceprincipalnames",
    "serviceprincipaltype",
];
const USER_FIELDS: &[&str] = &["id", "displayname", "userprincipalname", "mail"];

/// Parses a Graph `$filter`, refusing fields the list cannot filter on (Graph's 400
/// `Request_UnsupportedQuery`), never ignoring them.
pub(crate) fn parse_filter(text: Option<&str>, known: &[&str]) -> Result<Option<Filter>, KvError> {
    let Some(text) = text else { return Ok(None) };
    let unsupported =
        |m: String| KvError::new(ErrorCode::BadRequest, m).with_inner("Request_UnsupportedQuery");
    let f = Filter::parse(text).map_err(|e| unsupported(e.0))?;
    if let Some(bad) = f.fields().into_iter().find(|n| !known.contains(n)) {
        return Err(unsupported(format!(
            "Unsupported or invalid query filter clause specified for property '{}' of resource.",
            kagi_core::ids::printable(bad)
        )));
    }
    Ok(Some(f))
}

pub(crate) fn not_found(id: &str) -> KvError {
    KvError::new(
        ErrorCode::NotFound,
        format!(
            "Resource '{}' does not exist or one of its queried reference-property objects are \
             not present.",
            kagi_core::ids::printable(id)
        ),
    )
    .with_inner("Request_ResourceNotFound")
}

impl Directory {
    fn graph_list(
        &self,
        caller: &Principal,
        users: bool,
        filter: Option<&str>,
    ) -> Result<Value, KvError> {
        self.require_admin(caller)?;
        let filter = parse_filter(filter, if users { USER_FIELDS } else { SP_FIELDS })?;
        let state = self.state();
        let mut list: Vec<&PrincipalRecord> = state
            .principals
            .values()
            .filter(|p| is_user(p) == users)
            .filter(|p| {
                filter
                    .as_ref()
                    .is_none_or(|f| f.matches(&|name| field(p, name)))
            })
            .collect();
        list.sort_by(|a, b| a.object_id.cmp(&b.object_id));
        let value: Vec<Value> = list.into_iter().map(graph_json).collect();
        let context = if users { "users" } else { "servicePrincipals" };
        Ok(json!({
            "@odata.context": format!("{}/v1.0/$metadata#{context}", self.authority),
            "value": value,
        }))
    }

    /// `GET /v1.0/servicePrincipals[?$filter=…]`: service principals and managed identities
    /// (the administrator only).
    ///
    /// # Errors
    /// 403 for others; 400 `Request_UnsupportedQuery` for a filter outside the subset kagi
    /// reads (`appId`, `displayName`, `id`, `servicePrincipalNames/any(…)`,
    /// `servicePrincipalType`).
    pub fn graph_service_principals(
        &self,
        caller: &Principal,
        filter: Option<&str>,
    ) -> Result<Value, KvError> {
        self.graph_list(caller, false, filter)
    }

    /// `GET /v1.0/users[?$filter=…]` (the administrator only; `userPrincipalName`, `mail`,
    /// `displayName`, `id`).
    ///
    /// # Errors
    /// As [`Directory::graph_service_principals`].
    pub fn graph_users(&self, caller: &Principal, filter: Option<&str>) -> Result<Value, KvError> {
        self.graph_list(caller, true, filter)
    }

    /// `GET /v1.0/servicePrincipals/{id}` (object id) or `GET /v1.0/users/{id}` (object id or
    /// user principal name), the administrator only.
    ///
    /// # Errors
    /// 404 `Request_ResourceNotFound` when no such object of that kind exists.
    pub fn graph_get(&self, caller: &Principal, users: bool, id: &str) -> Result<Value, KvError> {
        self.require_admin(caller)?;
        let state = self.state();
        state
            .principals
            .values()
            .find(|p| {
                is_user(p) == users
                    && (p.object_id.eq_ignore_ascii_case(id)
                        || (users && upn(p).eq_ignore_ascii_case(id)))
            })
            .map(graph_json)
            .ok_or_else(|| not_found(id))
    }

    /// `GET /v1.0/me`: the signed-in user. An application's token has no user, and Graph
    /// answers it 400 (`/me request is only valid with delegated authentication flow.`);
    /// the az CLI then looks the application up by its id instead.
    ///
    /// # Errors
    /// 400 for a token that is not a user's; 404 when the user no longer exists.
    pub fn graph_me(&self, caller: &Principal) -> Result<Value, KvError> {
        if caller.kind != kind::USER {
            return Err(KvError::new(
                ErrorCode::BadRequest,
                "/me request is only valid with delegated authentication flow.",
            )
            .with_inner("BadRequest"));
        }
        self.state()
            .principals
            .get(&caller.object_id)
            .map(graph_json)
            .ok_or_else(|| not_found(&caller.object_id))
    }

    /// `POST /v1.0/directoryObjects/getByIds` with `{"ids": [...], "types": [...]}`: the
    /// objects among `ids` that exist (others are left out, as Graph does), of the given
    /// types (`user`, `servicePrincipal`; all when absent), the administrator only.
    ///
    /// # Errors
    /// 403 for others; 400 for a body without `ids`, or with more than 1000.
    pub fn graph_get_by_ids(&self, caller: &Principal, body: &Value) -> Result<Value, KvError> {
        self.require_admin(caller)?;
        let bad = |m: &str| KvError::new(ErrorCode::BadRequest, m).with_inner("Request_BadRequest");
        let ids: Vec<&str> = body
            .get("ids")
            .and_then(Value::as_array)
            .ok_or_else(|| bad("The request body needs 'ids', an array of object ids."))?
            .iter()
            .map(|v| {
                v.as_str()
                    .ok_or_else(|| bad("Every id in 'ids' must be a string."))
            })
            .collect::<Result<_, _>>()?;
        if ids.len() > MAX_IDS {
            return Err(bad("At most 1000 ids may be asked at once."));
        }
        let types: Option<Vec<String>> = match body.get("types") {
            None | Some(Value::Null) => None,
            Some(Value::Array(a)) => Some(
                a.iter()
                    .map(|v| {
                        v.as_str()
                            .map(str::to_ascii_lowercase)
                            .ok_or_else(|| bad("Every type in 'types' must be a string."))
                    })
                    .collect::<Result<_, _>>()?,
            ),
            Some(_) => return Err(bad("'types' must be an array of type names.")),
        };
        let wanted = |p: &PrincipalRecord| {
            let t = if is_user(p) {
                "user"
            } else {
                "serviceprincipal"
            };
            types.as_ref().is_none_or(|ts| ts.iter().any(|x| x == t))
        };
        let state = self.state();
        let value: Vec<Value> = ids
            .iter()
            .filter_map(|id| state.principals.get(&id.to_ascii_lowercase()))
            .filter(|p| wanted(p))
            .map(graph_json)
            .collect();
        Ok(json!({ "value": value }))
    }
}
