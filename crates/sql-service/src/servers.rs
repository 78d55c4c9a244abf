//! Logical servers: name, region, managed identity, administrator login and, optionally, a
//! customer key from the start (`keyId`).

use std::sync::Arc;

use kagi_core::{ErrorCode, KvError};
use kagi_host::{Principal, PutResource, ResourceRef};
use serde_json::{Value, json};

use crate::keys::ensure_server_pmk;
use crate::{SERVER_TYPE, SqlService, bad, id_of_body};

/// Fields a client may set; the rest of `properties` is the server's own.
const SETTABLE: [&str; 5] = [
    "administratorLogin",
    "primaryUserAssignedIdentityId",
    "publicNetworkAccess",
    "minimalTlsVersion",
    "administrators",
];

/// Checks `properties.administrators` (the server's Entra administrator: Azure's
/// `ServerExternalAdministrator`): `administratorType` `ActiveDirectory`, a `login` (the user
/// name clients give) and the principal's object id `sid`.
fn check_entra_admin(a: &Value) -> Result<(), KvError> {
    // No administrator: absent, null, or an object without values (`{}`, which the az CLI
    // sends from `az sql server create` without `--external-admin-*`).
    if a.is_null()
        || a.as_object()
            .is_some_and(|o| o.values().all(Value::is_null))
    {
        return Ok(());
    }
    let ty = a["administratorType"].as_str().unwrap_or("ActiveDirectory");
    let login = a["login"].as_str().unwrap_or_default();
    let sid = a["sid"].as_str().unwrap_or_default();
    let guid = sid.len() == 36 && sid.chars().all(|c| c.is_ascii_hexdigit() || c == '-');
    if !ty.eq_ignore_ascii_case("ActiveDirectory") || login.is_empty() || !guid {
        return Err(bad(
            "InvalidServerAdministrator",
            "properties.administrators needs administratorType 'ActiveDirectory', a login and \
             the principal's object id as sid.",
        ));
    }
    Ok(())
}

/// Azure's rule for server names: 1 to 63 lower-case letters, digits and hyphens, neither
/// first nor last a hyphen (the name is a DNS label).
fn valid_server_name(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// Azure's password rule for the administrator: 8 to 128 characters from at least three of
/// upper case, lower case, digits and symbols, and not containing the login.
fn check_password(login: &str, password: &str) -> Result<(), KvError> {
    let n = password.chars().count();
    let classes = [
        password.chars().any(|c| c.is_uppercase()),
        password.chars().any(|c| c.is_lowercase()),
        password.chars().any(|c| c.is_ascii_digit()),
        password.chars().any(|c| !c.is_alphanumeric()),
    ]
    .iter()
    .filter(|b| **b)
    .count();
    let contains_login =
        !login.is_empty() && password.to_lowercase().contains(&login.to_lowercase());
    if !(8..=128).contains(&n) || classes < 3 || contains_login {
        return Err(bad(
            "PasswordNotComplex",
            "Password validation failed. The password does not meet policy requirements because \
             it is not complex enough: 8 to 128 characters from three of upper case, lower case, \
             digits and symbols, without the login name.",
        ));
    }
    Ok(())
}

/// Azure's rule for the administrator login: 1 to 128 characters, a letter or `_` first,
/// then letters, digits and `_`; not a reserved name.
fn check_login(login: &str) -> Result<(), KvError> {
    const RESERVED: [&str; 10] = [
        "admin",
        "administrator",
        "sa",
        "root",
        "dbmanager",
        "loginmanager",
        "dbo",
        "guest",
        "public",
        "postgres",
    ];
    let ok_chars = login
        .chars()
        .next()
        .is_some_and(|c| c.is_alphabetic() || c == '_')
        && login.chars().all(|c| c.is_alphanumeric() || c == '_')
        && login.len() <= 128;
    if !ok_chars || RESERVED.contains(&login.to_ascii_lowercase().as_str()) {
        return Err(bad(
            "InvalidLoginName",
            format!(
                "The login name '{login}' is not valid: letters, digits and '_', a letter or '_' \
                 first, and not a reserved name ({}).",
                RESERVED.join(", ")
            ),
        ));
    }
    Ok(())
}

/// A server as clients see it: the write-only password never appears.
pub(crate) fn view(mut body: Value) -> Value {
    if let Some(p) = body["properties"].as_object_mut() {
        p.remove("administratorLoginPassword");
    }
    body["kind"] = json!("v12.0");
    body
}

impl SqlService {
    /// `PUT`/`PATCH {server}`.
    pub(crate) async fn put_server(
        self: &Arc<Self>,
        caller: &Principal,
        at: ResourceRef<'_>,
        input: Value,
        patch: bool,
    ) -> Result<(u16, Value), KvError> {
        let p = self.host.as_ref();
        if !valid_server_name(at.name) {
            return Err(bad(
                "InvalidServerName",
                format!(
                    "The server name '{}' is not valid: 1 to 63 lower-case letters, digits and \
                     hyphens, not starting or ending with a hyphen.",
                    at.name
                ),
            ));
        }
        let id = server_id(at);
        let _g = self.lock_id(&id).await;
        let existing = p.get_resource(caller, at).ok();
        if existing.is_none() {
            if patch {
                return Err(KvError::new(
                    ErrorCode::ResourceNotFound,
                    format!("The server '{}' was not found.", at.name),
                ));
            }
            // Server names are host names ({name}.{suffix}): unique on the platform.
            let taken = p.resources_of_type(SERVER_TYPE).iter().any(|s| {
                s["name"]
                    .as_str()
                    .is_some_and(|n| n.eq_ignore_ascii_case(at.name))
            });
            if taken {
                return Err(KvError::conflict(format!(
                    "The name '{}' already exists. Choose a different name.",
                    at.name
                ))
                .with_inner("NameAlreadyExists"));
            }
        }
        let props_in = &input["properties"];
        let mut props = existing
            .as_ref()
            .map(|e| e["properties"].clone())
            .unwrap_or_else(|| json!({}));
        for field in SETTABLE {
            if let Some(v) = props_in.get(field) {
                props[field] = v.clone();
            }
        }
        let old_login = existing
            .as_ref()
            .and_then(|e| e["properties"]["administratorLogin"].as_str());
        let login = props["administratorLogin"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        if let Some(old) = old_login
            && !old.eq_ignore_ascii_case(&login)
        {
            return Err(bad(
                "AdministratorLoginCannotBeChanged",
                "The administrator login of a server cannot be changed.",
            ));
        }
        check_login(&login)?;
        check_entra_admin(&props["administrators"])?;
        let password = props_in["administratorLoginPassword"].as_str();
        match (password, existing.is_some()) {
            (Some(pw), _) => check_password(&login, pw)?,
            (None, false) => {
                return Err(bad(
                    "InvalidParameterValue",
                    "A new server needs properties.administratorLoginPassword.",
                ));
            }
            (None, true) => {}
        }
        let location = input["location"]
            .as_str()
            .or_else(|| existing.as_ref().and_then(|e| e["location"].as_str()))
            .unwrap_or_default()
            .to_string();
        if location.is_empty() {
            return Err(bad("LocationRequired", "A server needs a location."));
        }
        let c = p.config();
        props["fullyQualifiedDomainName"] = json!(format!("{}.{}", at.name, c.dns_suffix));
        props["version"] = json!("12.0");
        props["state"] = json!("Ready");
        if props["publicNetworkAccess"].is_null() {
            props["publicNetworkAccess"] = json!("Enabled");
        }
        if props["minimalTlsVersion"].is_null() {
            props["minimalTlsVersion"] = json!("1.2");
        }
        let identity_in = input
            .get("identity")
            .or_else(|| existing.as_ref().and_then(|e| e.get("identity")));
        let mut body = json!({"location": location, "properties": props});
        if let Some(t) = input
            .get("tags")
            .or_else(|| existing.as_ref().and_then(|e| e.get("tags")))
        {
            body["tags"] = t.clone();
        }
        // A customer key from the start (`keyId`) needs an identity that already has access:
        // a user-assigned one (a system-assigned identity does not exist before the server).
        let key_id = props_in["keyId"].as_str().map(str::to_string);
        // TD-8: a Deny assignment of "SQL servers should use customer-managed keys" refuses a
        // server that would be stored without a key (keyId set now, or kept from before).
        let mut candidate = body.clone();
        candidate["type"] = json!(SERVER_TYPE);
        if let Some(k) = &key_id {
            candidate["properties"]["keyId"] = json!(k);
        }
        if let Some(e) = p.policy_deny(&id, &candidate).await? {
            return Err(e);
        }
        if let Some(kid) = &key_id {
            let candidate = json!({"id": id, "location": body["location"], "identity": identity_in.cloned(),
                "properties": body["properties"]});
            self.check_protector_key(&candidate, kid).await?;
        }
        let put = PutResource {
            at,
            body,
            identity: identity_in,
        };
        if existing.is_none() {
            // Where its databases will be, before it exists (see `crate::homes`).
            self.record_server_home(&id).await?;
        }
        let (status, stored) = p.put_resource(caller, put).await?;
        let stored_id = id_of_body(&stored);
        ensure_server_pmk(p, &stored_id).await?;
        if let Some(pw) = password {
            let _logins = self.lock_id(&crate::logins::lock_name(&stored_id)).await;
            crate::logins::set_admin(p, &stored_id, &login, pw).await?;
        }
        if existing.is_none() {
            p.append_activity(
                &stored_id,
                &json!({"operationName": "Microsoft.Sql/servers/write", "status": "Succeeded",
                    "eventTimestamp": kagi_core::time::rfc3339(p.now()),
                    "message": format!("Server '{}' created.", at.name)}),
            )
            .await?;
        }
        if let Some(kid) = key_id {
            // keyId sets the protector as a PUT of encryptionProtector/current would.
            let adopted = async {
                let name = self.add_server_key(&stored, &kid).await?;
                self.switch_protector(&stored, Some(&name), false).await?;
                self.note_key_id(caller, &stored).await
            };
            match adopted.await {
                Ok(stored) => return Ok((status, view(stored))),
                Err(e) => {
                    // A new server that cannot take its key is not left behind (without it).
                    if existing.is_none() {
                        let _ = p.delete_resource(caller, at).await;
                    }
                    return Err(e);
                }
            }
        }
        Ok((status, view(stored)))
    }

    /// `DELETE {server}`: its databases (files and keys) go with it.
    pub(crate) async fn delete_server(
        self: &Arc<Self>,
        caller: &Principal,
        at: ResourceRef<'_>,
    ) -> Result<(u16, Value), KvError> {
        let p = self.host.as_ref();
        let id = server_id(at);
        let _g = self.lock_id(&id).await;
        let Ok(server) = p.get_resource(caller, at) else {
            return Ok((204, Value::Null));
        };
        for db in self.databases_of(&server).await? {
            self.drop_database(&server, &db).await?;
        }
        // The server's documents (keys, protector, logins) go with it.
        let status = p.delete_resource(caller, at).await?;
        self.forget_server_home(&id).await;
        Ok((status, Value::Null))
    }
}

impl SqlService {
    /// Writes the protector's key into the stored server (`properties.keyId`, Azure's field;
    /// absent under the service-managed key), so that policy compliance sees it. Returns the
    /// stored server.
    pub(crate) async fn note_key_id(
        &self,
        caller: &Principal,
        server: &Value,
    ) -> Result<Value, KvError> {
        let protector = self.protector(server).await?;
        let mut props = server["properties"].clone();
        match &protector.kid {
            Some(kid) => props["keyId"] = json!(kid),
            None => {
                if let Some(o) = props.as_object_mut() {
                    o.remove("keyId");
                }
            }
        }
        if props == server["properties"] {
            return Ok(server.clone());
        }
        let id = id_of_body(server);
        let segs: Vec<&str> = id.trim_start_matches('/').split('/').collect();
        let (Some(sub), Some(rg), Some(name)) = (segs.get(1), segs.get(3), segs.get(7)) else {
            return Ok(server.clone());
        };
        let mut body = json!({"location": server["location"], "properties": props});
        if let Some(t) = server.get("tags") {
            body["tags"] = t.clone();
        }
        let put = PutResource {
            at: crate::server_ref(sub, rg, name),
            body,
            identity: None,
        };
        Ok(self.host.put_resource(caller, put).await?.1)
    }
}

/// The id of server `at`.
pub(crate) fn server_id(at: ResourceRef<'_>) -> String {
    let (sub, rg, ty, name) = at.parts();
    format!("/subscriptions/{sub}/resourceGroups/{rg}/providers/{ty}/{name}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_logins_and_passwords_follow_azure_rules() {
        assert!(valid_server_name("sql-1"));
        assert!(!valid_server_name("Sql1"));
        assert!(!valid_server_name("-a"));
        assert!(!valid_server_name(&"a".repeat(64)));
        assert!(check_login("kagiadmin").is_ok());
        assert!(check_login("admin").is_err());
        assert!(check_login("1abc").is_err());
        assert!(check_password("kagiadmin", "Str0ng!pass").is_ok());
        assert!(check_password("kagiadmin", "weakpass").is_err());
        assert!(check_password("kagiadmin", "Kagiadmin1!").is_err());
    }

    #[test]
    fn an_empty_entra_administrator_is_none() {
        for none in [json!(null), json!({}), json!({"login": null, "sid": null})] {
            assert!(check_entra_admin(&none).is_ok(), "{none}");
        }
        let sid = "8f2b7c9e-1d3a-4b5c-9e8f-0a1b2c3d4e5f";
        assert!(check_entra_admin(&json!({"login": "dba", "sid": sid})).is_ok());
        assert!(check_entra_admin(&json!({"login": "dba"})).is_err());
        assert!(check_entra_admin(&json!({"sid": sid, "administratorType": "Other"})).is_err());
    }
}
