//! Microsoft Graph's applications, as the az CLI uses them (`az ad sp create-for-rbac`,
//! `az ad app create|list|show|delete|credential reset`, `az ad sp create --id`):
//! `GET|POST /v1.0/applications`, `GET|PATCH|DELETE /v1.0/applications/{id}`,
//! `POST /v1.0/applications/{id}/addPassword|removePassword`.
//!
//! In Entra an application and its service principal are two objects; in kagi they are one:
//! a service principal (kind `ServicePrincipal`) *is* its application, with the same object id
//! (`id`) and application id (`appId`). Creating an application creates its service principal,
//! and `POST /v1.0/servicePrincipals {"appId"}` answers that one. An application has at most
//! one password, kept only as a hash: `addPassword` replaces it (the old secret stops
//! working) and shows the new one once; `removePassword` removes it (no secret works until the
//! next `addPassword`). An application made here starts without a password.

use kagi_core::odata::{FieldValue, Filter};
use kagi_core::time::rfc3339;
use kagi_core::{ErrorCode, KvError};
use kagi_identity::Principal;
use kagi_store::{CertificateRecord, PrincipalRecord};
use serde_json::{Value, json};

use crate::graph::{graph_json, not_found, parse_filter, password_credentials, password_key_id};
use crate::{Directory, bad, internal, kind, new_secret};

const APP_FIELDS: &[&str] = &["id", "displayname", "appid", "identifieruris"];

/// Graph's 400 for a request it cannot apply.
fn bad_request(message: impl Into<String>) -> KvError {
    bad(message).with_inner("Request_BadRequest")
}

/// A service principal as Graph shows its application, with its certificates (`certs`, those
/// of every principal; registered through the service principal's `addKey`).
pub(crate) fn application_json(p: &PrincipalRecord, certs: &[CertificateRecord]) -> Value {
    let keys: Vec<Value> = certs
        .iter()
        .filter(|c| c.object_id == p.object_id)
        .map(|c| {
            json!({
                "customKeyIdentifier": c.sha1.to_ascii_uppercase(),
                "displayName": null,
                "keyId": password_key_id(c.sha256.as_bytes()),
                "startDateTime": rfc3339(c.created),
                "endDateTime": null,
                "type": "AsymmetricX509Cert",
                "usage": "Verify",
            })
        })
        .collect();
    json!({
        "@odata.type": "#microsoft.graph.application",
        "id": p.object_id,
        "appId": p.client_id,
        "displayName": p.display_name,
        "createdDateTime": rfc3339(p.created),
        "publisherDomain": null,
        "signInAudience": "AzureADMyOrg",
        "identifierUris": [],
        "keyCredentials": keys,
        "passwordCredentials": password_credentials(p),
        "api": {},
        "web": {"redirectUris": [], "homePageUrl": null},
        "publicClient": {"redirectUris": []},
        "requiredResourceAccess": [],
        "appRoles": [],
        "tags": [],
    })
}

fn app_field<'a>(p: &'a PrincipalRecord, name: &str) -> Option<FieldValue<'a>> {
    Some(match name {
        "id" => FieldValue::One(&p.object_id),
        "displayname" => FieldValue::One(&p.display_name),
        "appid" => FieldValue::One(&p.client_id),
        "identifieruris" => FieldValue::Many(Vec::new()),
        _ => return None,
    })
}

/// Whether a property of an application body asks for nothing kagi would have to keep: absent
/// values, empty lists and objects, `false`.
fn is_empty_value(v: &Value) -> bool {
    match v {
        Value::Null | Value::Bool(false) => true,
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.values().all(is_empty_value),
        Value::String(s) => s.is_empty(),
        _ => false,
    }
}

/// Checks an application body (create or update): `displayName` (required when `create`),
/// `signInAudience` only `AzureADMyOrg`, any other property empty. Returns the display name.
/// A property kagi cannot keep is refused, never dropped: a client must not believe an
/// application has redirect URIs or certificates it does not have.
fn application_input(body: &Value, create: bool) -> Result<Option<String>, KvError> {
    let obj = body
        .as_object()
        .ok_or_else(|| bad_request("The request body must be a JSON object."))?;
    let mut name = None;
    for (k, v) in obj {
        match k.as_str() {
            "displayName" => {
                let n = v
                    .as_str()
                    .map(str::trim)
                    .filter(|n| !n.is_empty() && n.len() <= 120 && !n.chars().any(char::is_control))
                    .ok_or_else(|| {
                        bad_request("displayName must be a string of 1 to 120 characters.")
                    })?;
                name = Some(n.to_string());
            }
            "signInAudience" if v.is_null() || v.as_str() == Some("AzureADMyOrg") => {}
            _ if is_empty_value(v) => {}
            other => {
                return Err(bad_request(format!(
                    "Property '{}' is not supported by kagi's applications (they keep a display \
                     name and one password; certificates go to the service principal's addKey).",
                    kagi_core::ids::printable(other)
                )));
            }
        }
    }
    if create && name.is_none() {
        return Err(bad_request("displayName is required."));
    }
    Ok(name)
}

impl Directory {
    /// The application `id` (its object id; the administrator only).
    fn application(&self, caller: &Principal, id: &str) -> Result<PrincipalRecord, KvError> {
        self.require_admin(caller)?;
        self.state()
            .principals
            .values()
            .find(|p| p.kind == kind::SERVICE_PRINCIPAL && p.object_id.eq_ignore_ascii_case(id))
            .cloned()
            .ok_or_else(|| not_found(id))
    }

    /// `GET /v1.0/applications[?$filter=…]` (`id`, `displayName`, `appId`,
    /// `identifierUris/any(…)`), the administrator only.
    ///
    /// # Errors
    /// 403 for others; 400 `Request_UnsupportedQuery` for a filter kagi cannot apply.
    pub fn graph_applications(
        &self,
        caller: &Principal,
        filter: Option<&str>,
    ) -> Result<Value, KvError> {
        self.require_admin(caller)?;
        let filter: Option<Filter> = parse_filter(filter, APP_FIELDS)?;
        let state = self.state();
        let mut list: Vec<&PrincipalRecord> = state
            .principals
            .values()
            .filter(|p| p.kind == kind::SERVICE_PRINCIPAL)
            .filter(|p| {
                filter
                    .as_ref()
                    .is_none_or(|f| f.matches(&|name| app_field(p, name)))
            })
            .collect();
        list.sort_by(|a, b| a.object_id.cmp(&b.object_id));
        Ok(json!({
            "@odata.context": format!("{}/v1.0/$metadata#applications", self.authority),
            "value": list
                .into_iter()
                .map(|p| application_json(p, &state.certificates))
                .collect::<Vec<_>>(),
        }))
    }

    /// `GET /v1.0/applications/{id}`.
    ///
    /// # Errors
    /// 403 for others than the administrator; 404 `Request_ResourceNotFound`.
    pub fn graph_application(&self, caller: &Principal, id: &str) -> Result<Value, KvError> {
        let p = self.application(caller, id)?;
        Ok(application_json(&p, &self.state().certificates))
    }

    /// `POST /v1.0/applications {"displayName"}`: a new application and its service principal,
    /// without a password (`addPassword` makes one).
    ///
    /// # Errors
    /// 403 for others than the administrator; 400 `Request_BadRequest` for a body kagi cannot
    /// keep.
    pub async fn create_application(
        &self,
        caller: &Principal,
        body: &Value,
    ) -> Result<Value, KvError> {
        self.require_admin(caller)?;
        let name = application_input(body, true)?.unwrap_or_default();
        let p = self
            .insert_service_principal(caller, &name, Vec::new())
            .await?;
        tracing::info!(object_id = %p.object_id, "application created");
        Ok(application_json(&p, &[]))
    }

    /// `PATCH /v1.0/applications/{id}`: kagi keeps nothing an update could change but the
    /// display name, which it does not rename; an update that changes nothing succeeds (the az
    /// CLI patches an existing application of the same name before reusing it).
    ///
    /// # Errors
    /// 400 `Request_BadRequest` for a new display name or a property kagi cannot keep.
    pub fn update_application(
        &self,
        caller: &Principal,
        id: &str,
        body: &Value,
    ) -> Result<(), KvError> {
        let p = self.application(caller, id)?;
        if let Some(name) = application_input(body, false)?
            && name != p.display_name
        {
            return Err(bad_request(
                "kagi does not rename applications: create a new one and delete this one.",
            ));
        }
        Ok(())
    }

    /// `DELETE /v1.0/applications/{id}`: the application and its service principal.
    ///
    /// # Errors
    /// 403 for others than the administrator; 404 `Request_ResourceNotFound`.
    pub async fn delete_application(&self, caller: &Principal, id: &str) -> Result<(), KvError> {
        let p = self.application(caller, id)?;
        self.delete_service_principal(caller, &p.object_id).await
    }

    /// `POST /v1.0/applications/{id}/addPassword {"passwordCredential"?: {"displayName"?,
    /// "startDateTime"?, "endDateTime"?}}`: a new password, replacing the one it had; the
    /// secret is in the answer (`secretText`) and nowhere else.
    ///
    /// # Errors
    /// 403 for others than the administrator; 404 `Request_ResourceNotFound`.
    pub async fn add_application_password(
        &self,
        caller: &Principal,
        id: &str,
        body: &Value,
    ) -> Result<Value, KvError> {
        let p = self.application(caller, id)?;
        let secret = new_secret()?;
        let hash = kagi_identity::hash_secret(&secret);
        self.set_application_secret(&p, hash.clone()).await?;
        let cred = &body["passwordCredential"];
        let hint: String = secret.chars().take(3).collect();
        Ok(json!({
            "customKeyIdentifier": null,
            "displayName": cred.get("displayName").cloned().unwrap_or(Value::Null),
            "endDateTime": cred.get("endDateTime").cloned().unwrap_or(Value::Null),
            "hint": hint,
            "keyId": password_key_id(&hash),
            "secretText": secret,
            "startDateTime": rfc3339(self.clock.now()),
        }))
    }

    /// `POST /v1.0/applications/{id}/removePassword {"keyId"}`: removes the password with that
    /// key id (no secret works until the next `addPassword`).
    ///
    /// # Errors
    /// 404 `Request_ResourceNotFound` for an unknown application; 400 `Request_BadRequest`
    /// for a key id that is not its password's.
    pub async fn remove_application_password(
        &self,
        caller: &Principal,
        id: &str,
        body: &Value,
    ) -> Result<(), KvError> {
        let p = self.application(caller, id)?;
        let key_id = body["keyId"].as_str().unwrap_or("");
        if p.secret_hash.is_empty() || !password_key_id(&p.secret_hash).eq_ignore_ascii_case(key_id)
        {
            return Err(KvError::new(
                ErrorCode::BadRequest,
                format!(
                    "No password credential found with keyId '{}'.",
                    kagi_core::ids::printable(key_id)
                ),
            )
            .with_inner("Request_BadRequest"));
        }
        self.set_application_secret(&p, Vec::new()).await
    }

    async fn set_application_secret(
        &self,
        p: &PrincipalRecord,
        hash: Vec<u8>,
    ) -> Result<(), KvError> {
        self.store
            .set_principal_secret(&p.object_id, &hash)
            .await
            .map_err(|e| internal("set application password", e))?;
        let mut p = p.clone();
        p.secret_hash = hash;
        self.state_mut().principals.insert(p.object_id.clone(), p);
        Ok(())
    }

    /// `POST /v1.0/servicePrincipals {"appId"}`: the service principal of an application,
    /// which kagi made with it (201, as Graph answers a create).
    ///
    /// # Errors
    /// 403 for others than the administrator; 400 `Request_BadRequest` when no application
    /// has that id (Graph's words, which the az CLI recognises).
    pub fn service_principal_of_application(
        &self,
        caller: &Principal,
        app_id: &str,
    ) -> Result<Value, KvError> {
        self.require_admin(caller)?;
        self.state()
            .principals
            .values()
            .find(|p| p.kind == kind::SERVICE_PRINCIPAL && p.client_id.eq_ignore_ascii_case(app_id))
            .map(graph_json)
            .ok_or_else(|| {
                bad_request(format!(
                    "The appId '{}' of the service principal does not reference a valid \
                     application object.",
                    kagi_core::ids::printable(app_id)
                ))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_ids_name_one_hash_and_are_guids() {
        let a = password_key_id(&[1; 32]);
        assert_eq!(a, password_key_id(&[1; 32]));
        assert_ne!(a, password_key_id(&[2; 32]));
        assert!(kagi_core::ids::ObjectId::parse(&a).is_ok(), "{a}");
    }

    #[test]
    fn bodies_kagi_cannot_keep_are_refused() {
        let name = |b: Value, create| application_input(&b, create);
        assert_eq!(
            name(
                json!({"displayName": " app ", "keyCredentials": [], "web": {"redirectUris": []}}),
                true
            )
            .unwrap()
            .as_deref(),
            Some("app")
        );
        assert!(name(json!({"keyCredentials": []}), true).is_err());
        assert!(name(json!({"displayName": ""}), true).is_err());
        assert!(
            name(
                json!({"displayName": "a", "identifierUris": ["api://x"]}),
                true
            )
            .is_err()
        );
        assert!(
            name(
                json!({"displayName": "a", "signInAudience": "AzureADMultipleOrgs"}),
                true
            )
            .is_err()
        );
        assert!(name(json!([]), true).is_err());
        assert_eq!(name(json!({}), false).unwrap(), None);
    }

    #[test]
    fn an_application_without_password_lists_none() {
        let mut p = PrincipalRecord {
            object_id: "o".into(),
            tenant_id: "t".into(),
            client_id: "c".into(),
            display_name: "d".into(),
            secret_hash: Vec::new(),
            kind: kind::SERVICE_PRINCIPAL.into(),
            created: 0,
            resource_id: None,
        };
        assert_eq!(application_json(&p, &[])["passwordCredentials"], json!([]));
        p.secret_hash = vec![7; 32];
        let v = application_json(&p, &[]);
        assert_eq!(
            v["passwordCredentials"][0]["keyId"],
            json!(password_key_id(&[7; 32]))
        );
        assert!(v["passwordCredentials"][0]["secretText"].is_null());
    }
}
