//! Server keys and the TDE protector (TD-1..TD-3).
//!
//! A server key (`servers/{s}/keys/{vault}_{key}_{version}`) is a key version the server may
//! use, checked when it is added. The protector (`encryptionProtector/current`) is the key
//! that wraps every database's DEK: `ServiceManaged` (the server's platform key) or one of the
//! server keys. Setting it re-wraps each DEK under the new key (one key vault call per
//! database), then names it, then retires the records under the old key: at every instant
//! each database has a record that the named protector opens.

use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use kagi_cmk::{Kek, KeyRequest, KeyUri};
use kagi_core::{ErrorCode, KvError};
use kagi_host::Principal;
use serde_json::{Value, json};

use crate::databases::{Database, KeyScope};
use crate::keys::{DbKeys, SERVER_DOC, internal, server_pmk};
use crate::{SqlService, bad, id_of_body};

/// The document kind of server keys (named by the key name, lower case).
const SERVER_KEY_DOC: &str = "serverkey";
/// The protector's type for the server's platform key.
pub(crate) const SERVICE_MANAGED: &str = "ServiceManaged";
/// The protector's type for a key in a key vault.
pub(crate) const AZURE_KEY_VAULT: &str = "AzureKeyVault";

/// The protector in force, as the server's `protector` document keeps it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Protector {
    /// The server key's name (`ServiceManaged`, or `{vault}_{key}_{version}`).
    pub(crate) server_key_name: String,
    /// The versioned key id, for `AzureKeyVault`.
    pub(crate) kid: Option<String>,
    /// Follow the key's newest version.
    pub(crate) auto_rotation: bool,
    /// A database's own protector (database-level CMK): its user-assigned identity and the
    /// database's name, which reach the key instead of the server's identity.
    pub(crate) database: Option<DbIdentity>,
}

/// The identity a database-level protector reaches its key with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct DbIdentity {
    /// The user-assigned identity's resource id.
    pub(crate) identity: String,
    /// The database's name.
    pub(crate) database: String,
}

impl Protector {
    fn of(doc: Option<&Value>) -> Self {
        let d = doc.cloned().unwrap_or(Value::Null);
        match d["uri"].as_str() {
            Some(kid) => Protector {
                server_key_name: d["serverKeyName"].as_str().unwrap_or_default().to_string(),
                kid: Some(kid.to_string()),
                auto_rotation: d["autoRotationEnabled"].as_bool().unwrap_or(false),
                database: None,
            },
            None => Protector {
                server_key_name: SERVICE_MANAGED.into(),
                kid: None,
                auto_rotation: false,
                database: None,
            },
        }
    }

    /// What the DEK records of the protector are filed under (`pmk` or the key id).
    pub(crate) fn record_id(&self) -> String {
        self.kid.clone().unwrap_or_else(|| "pmk".into())
    }
}

/// A key that passed every protector rule: its versioned id and its thumbprint (the hex
/// SHA-256 of its public modulus as the key vault gives it, base64url; Azure shows a hex
/// string too).
pub(crate) struct CheckedKey {
    pub(crate) kid: String,
    pub(crate) thumbprint: String,
}

/// `{vault}_{key}_{version}`: Azure's name of a server key.
pub(crate) fn key_name(uri: &KeyUri) -> String {
    format!(
        "{}_{}_{}",
        uri.vault,
        uri.name,
        uri.version.as_deref().unwrap_or_default()
    )
}

/// The identity a server uses for its key: `primaryUserAssignedIdentityId`, else the
/// system-assigned one, else its only user-assigned one. `Err` when it has none.
pub(crate) fn identity_choice(server: &Value) -> Result<Option<String>, KvError> {
    let props = &server["properties"];
    if let Some(primary) = props["primaryUserAssignedIdentityId"].as_str() {
        return Ok(Some(primary.to_string()));
    }
    let ty = server["identity"]["type"]
        .as_str()
        .unwrap_or_default()
        .to_ascii_lowercase();
    if ty.contains("systemassigned") {
        return Ok(None);
    }
    let users = server["identity"]["userAssignedIdentities"].as_object();
    match users.map(|m| m.keys().collect::<Vec<_>>()) {
        Some(keys) if keys.len() == 1 => Ok(Some(keys[0].clone())),
        Some(keys) if keys.len() > 1 => Err(bad(
            "AzureKeyVaultNoServerIdentity",
            "The server has several user-assigned identities: name the one to reach the key \
             vault with in properties.primaryUserAssignedIdentityId.",
        )),
        _ => Err(bad(
            "AzureKeyVaultNoServerIdentity",
            format!(
                "The server '{}' has no managed identity to reach the key vault with: give it a \
                 system-assigned or user-assigned identity (identity.type) first.",
                server["name"].as_str().unwrap_or_default()
            ),
        )),
    }
}

/// How errors name the server's identity.
fn who(server: &Value, user_assigned: Option<&str>) -> String {
    match user_assigned {
        Some(u) => format!("user-assigned identity {u}"),
        None => format!(
            "system-assigned identity {} of SQL server '{}'",
            server["identity"]["principalId"].as_str().unwrap_or("?"),
            server["name"].as_str().unwrap_or_default()
        ),
    }
}

/// How errors name a database's identity.
pub(crate) fn db_who(d: &DbIdentity) -> String {
    format!(
        "user-assigned identity {} of database '{}'",
        d.identity, d.database
    )
}

/// A validation error of kagi-cmk under the code Azure SQL uses for the same rule.
pub(crate) fn sql_error(e: KvError) -> KvError {
    let code = match e.inner {
        Some("IdentityLacksKeyPermission") => "AzureKeyVaultMissingPermissions",
        Some("KeyDisabled") => "AzureKeyVaultKeyDisabled",
        Some("KeyTypeNotRsa") => "AzureKeyVaultRsaKeyNotSupported",
        Some("KeyExpired") => "AzureKeyVaultKeyExpired",
        Some("KeyNotYetValid") => "AzureKeyVaultKeyNotYetActive",
        Some("KeyVaultSoftDeleteOrPurgeProtectionDisabled") => {
            "AzureKeyVaultSoftDeleteAndPurgeProtectionRequired"
        }
        Some("KeyNotFound" | "KeyVersionNotFound" | "KeyVaultNotFound") => {
            "AzureKeyVaultKeyNotFound"
        }
        _ => return e,
    };
    KvError::new(e.code, e.message).with_inner(code)
}

impl SqlService {
    /// The server's protector.
    pub(crate) async fn protector(&self, server: &Value) -> Result<Protector, KvError> {
        let doc = self
            .host
            .document(&id_of_body(server), SERVER_DOC, "protector")
            .await?;
        Ok(Protector::of(doc.as_ref()))
    }

    /// The key encryption key of `protector`, with a token of the server's identity.
    pub(crate) async fn kek(&self, server: &Value, protector: &Protector) -> Result<Kek, KvError> {
        let id = id_of_body(server);
        match &protector.kid {
            None => Ok(Kek::Platform(server_pmk(self.host.as_ref(), &id).await?)),
            Some(kid) => {
                if let Some(d) = &protector.database {
                    let token = self.host.user_assigned_token(
                        &d.identity,
                        &format!("{id}/databases/{}", d.database),
                    )?;
                    return Ok(Kek::Customer {
                        kid: kid.clone(),
                        token,
                        who: db_who(d),
                    });
                }
                let ua = identity_choice(server)?;
                let token = self.host.identity_token(&id, ua.as_deref())?;
                Ok(Kek::Customer {
                    kid: kid.clone(),
                    token,
                    who: who(server, ua.as_deref()),
                })
            }
        }
    }

    /// Every rule for a TDE protector (TD-1), probed with the server's identity: returns the
    /// versioned key id. `server` may be a server about to be created (`keyId`).
    pub(crate) async fn check_protector_key(
        &self,
        server: &Value,
        key_uri: &str,
    ) -> Result<CheckedKey, KvError> {
        self.check_protector_key_as(server, key_uri, None).await
    }

    /// [`SqlService::check_protector_key`] with a database's identity (`database`) instead of
    /// the server's.
    pub(crate) async fn check_protector_key_as(
        &self,
        server: &Value,
        key_uri: &str,
        database: Option<&DbIdentity>,
    ) -> Result<CheckedKey, KvError> {
        let id = id_of_body(server);
        let (ua, who, token) = self.key_actor(server, database)?;
        let location = server["location"].as_str().unwrap_or_default();
        let req = KeyRequest {
            key_uri,
            resource_id: &id,
            location,
            user_assigned: ua.as_deref(),
            who: &who,
        };
        let kid = self
            .keys
            .validate_with(self.host.as_ref(), &req, Some(&token))
            .await
            .map_err(sql_error)?;
        let uri = self.keys.parse(&kid)?;
        // One read of the key's newest version: it must be this one (older ones may be
        // compromised), and it tells the size and the thumbprint.
        let bundle = self
            .keys
            .client()
            .get_key(&self.keys.parse(&uri.versionless())?, &token)
            .await
            .map_err(|f| bad("AzureKeyVaultKeyNotFound", f.reason()))?;
        let newest = bundle["key"]["kid"].as_str().unwrap_or_default();
        if !newest.eq_ignore_ascii_case(&kid) {
            return Err(bad(
                "AzureKeyVaultKeyNotLatestVersion",
                format!(
                    "The key version '{kid}' is not the newest version of its key ('{newest}'): \
                     a TDE protector must be the newest version."
                ),
            ));
        }
        // TD-1: RSA of 2048 or 3072 bits only.
        let modulus = bundle["key"]["n"]
            .as_str()
            .and_then(|n| URL_SAFE_NO_PAD.decode(n.trim_end_matches('=')).ok())
            .unwrap_or_default();
        let significant = modulus.iter().skip_while(|b| **b == 0).count();
        let bits = significant * 8;
        if bits != 2048 && bits != 3072 {
            return Err(bad(
                "AzureKeyVaultRsaKeyNotSupported",
                format!(
                    "The key '{kid}' is RSA of {bits} bits; a TDE protector is RSA or RSA-HSM of \
                     2048 or 3072 bits."
                ),
            ));
        }
        let n = bundle["key"]["n"].as_str().unwrap_or_default();
        Ok(CheckedKey {
            kid,
            thumbprint: hex::encode_upper(kagi_crypto::digest(
                kagi_crypto::DigestAlgorithm::Sha256,
                n.as_bytes(),
            )),
        })
    }

    /// Adds (or finds) the server key for `key_uri` after checking it; returns its name.
    pub(crate) async fn add_server_key(
        &self,
        server: &Value,
        key_uri: &str,
    ) -> Result<String, KvError> {
        let CheckedKey { kid, thumbprint } = self.check_protector_key(server, key_uri).await?;
        let uri = self.keys.parse(&kid)?;
        let name = key_name(&uri);
        let id = id_of_body(server);
        let doc_name = name.to_ascii_lowercase();
        if self
            .host
            .document(&id, SERVER_KEY_DOC, &doc_name)
            .await?
            .is_none()
        {
            let doc = json!({"name": name, "uri": kid, "thumbprint": thumbprint,
                "creationDate": kagi_core::time::rfc3339(self.host.now())});
            self.host
                .put_document(&id, SERVER_KEY_DOC, &doc_name, &doc)
                .await?;
        }
        Ok(name)
    }

    fn server_key_view(server: &Value, doc: &Value) -> Value {
        let name = doc["name"].as_str().unwrap_or_default();
        let service = name == SERVICE_MANAGED;
        json!({
            "id": format!("{}/keys/{name}", id_of_body(server)),
            "name": name,
            "type": "Microsoft.Sql/servers/keys",
            "kind": if service { "servicemanaged" } else { "azurekeyvault" },
            "location": server["location"],
            "properties": {
                "serverKeyType": if service { SERVICE_MANAGED } else { AZURE_KEY_VAULT },
                "uri": doc["uri"],
                "thumbprint": doc["thumbprint"],
                "creationDate": doc["creationDate"],
                "autoRotationEnabled": doc["autoRotationEnabled"],
            },
        })
    }

    /// `GET {server}/keys`: the service-managed key and every added key.
    pub(crate) async fn list_server_keys(&self, server: &Value) -> Result<(u16, Value), KvError> {
        let mut out = vec![Self::server_key_view(
            server,
            &json!({"name": SERVICE_MANAGED}),
        )];
        for (_, doc) in self
            .host
            .documents(&id_of_body(server), SERVER_KEY_DOC)
            .await?
        {
            out.push(Self::server_key_view(server, &doc));
        }
        Ok((200, json!({ "value": out })))
    }

    async fn server_key_doc(&self, server: &Value, name: &str) -> Result<Value, KvError> {
        if name.eq_ignore_ascii_case(SERVICE_MANAGED) {
            return Ok(json!({"name": SERVICE_MANAGED}));
        }
        self.host
            .document(
                &id_of_body(server),
                SERVER_KEY_DOC,
                &name.to_ascii_lowercase(),
            )
            .await?
            .ok_or_else(|| {
                KvError::new(
                    ErrorCode::NotFound,
                    format!(
                        "The server key '{name}' was not found on server '{}'.",
                        server["name"].as_str().unwrap_or_default()
                    ),
                )
                .with_inner("ServerKeyNotFound")
            })
    }

    /// `GET {server}/keys/{name}`.
    pub(crate) async fn get_server_key(
        &self,
        server: &Value,
        name: &str,
    ) -> Result<(u16, Value), KvError> {
        let doc = self.server_key_doc(server, name).await?;
        Ok((200, Self::server_key_view(server, &doc)))
    }

    /// `PUT {server}/keys/{name}` `{"properties": {"serverKeyType": "AzureKeyVault", "uri"}}`.
    pub(crate) async fn put_server_key(
        &self,
        _caller: &Principal,
        server: &Value,
        name: &str,
        input: Value,
    ) -> Result<(u16, Value), KvError> {
        let props = &input["properties"];
        let ty = props["serverKeyType"].as_str().unwrap_or(AZURE_KEY_VAULT);
        if !ty.eq_ignore_ascii_case(AZURE_KEY_VAULT) {
            return Err(bad(
                "InvalidServerKeyType",
                format!("Only keys of type '{AZURE_KEY_VAULT}' are added to a server."),
            ));
        }
        let uri = props["uri"].as_str().ok_or_else(|| {
            bad(
                "InvalidParameterValue",
                "A server key needs properties.uri (a versioned key id).",
            )
        })?;
        let parsed = self.keys.parse(uri)?;
        if parsed.version.is_none() {
            return Err(bad(
                "InvalidServerKeyUri",
                format!("The key URI '{uri}' has no version: a server key is one key version."),
            ));
        }
        let expected = key_name(&parsed);
        if !expected.eq_ignore_ascii_case(name) {
            return Err(bad(
                "InvalidServerKeyName",
                format!("The server key for '{uri}' must be named '{expected}', not '{name}'."),
            ));
        }
        let _g = self.lock_id(&id_of_body(server)).await;
        let added = self.add_server_key(server, uri).await?;
        self.get_server_key(server, &added).await
    }

    /// `DELETE {server}/keys/{name}`: not the protector in force.
    pub(crate) async fn delete_server_key(
        &self,
        server: &Value,
        name: &str,
    ) -> Result<(u16, Value), KvError> {
        let _g = self.lock_id(&id_of_body(server)).await;
        if self
            .protector(server)
            .await?
            .server_key_name
            .eq_ignore_ascii_case(name)
        {
            return Err(KvError::conflict(format!(
                "The server key '{name}' is the server's TDE protector: set another protector \
                 before removing it."
            ))
            .with_inner("ServerKeyInUse"));
        }
        let gone = self
            .host
            .delete_document(
                &id_of_body(server),
                SERVER_KEY_DOC,
                &name.to_ascii_lowercase(),
            )
            .await?;
        Ok((if gone { 200 } else { 204 }, Value::Null))
    }

    /// `GET {server}/encryptionProtector/current`.
    pub(crate) async fn protector_view(&self, server: &Value) -> Result<Value, KvError> {
        let p = self.protector(server).await?;
        let key = self.server_key_doc(server, &p.server_key_name).await.ok();
        let service = p.kid.is_none();
        Ok(json!({
            "id": format!("{}/encryptionProtector/current", id_of_body(server)),
            "name": "current",
            "type": "Microsoft.Sql/servers/encryptionProtector",
            "kind": if service { "servicemanaged" } else { "azurekeyvault" },
            "location": server["location"],
            "properties": {
                "serverKeyName": p.server_key_name,
                "serverKeyType": if service { SERVICE_MANAGED } else { AZURE_KEY_VAULT },
                "uri": p.kid,
                "thumbprint": key.as_ref().map(|k| k["thumbprint"].clone()),
                "autoRotationEnabled": p.auto_rotation,
                "subregion": "",
            },
        }))
    }

    /// `PUT {server}/encryptionProtector/current`
    /// `{"properties": {"serverKeyType", "serverKeyName", "autoRotationEnabled"}}`.
    pub(crate) async fn put_protector(
        self: &Arc<Self>,
        caller: &Principal,
        server: &Value,
        input: Value,
    ) -> Result<(u16, Value), KvError> {
        let props = &input["properties"];
        let ty = props["serverKeyType"].as_str().unwrap_or(AZURE_KEY_VAULT);
        let auto = props["autoRotationEnabled"].as_bool().unwrap_or(false);
        let name = if ty.eq_ignore_ascii_case(SERVICE_MANAGED) {
            None
        } else if ty.eq_ignore_ascii_case(AZURE_KEY_VAULT) {
            Some(props["serverKeyName"].as_str().ok_or_else(|| {
                bad(
                    "InvalidParameterValue",
                    "An AzureKeyVault protector needs properties.serverKeyName.",
                )
            })?)
        } else {
            return Err(bad(
                "InvalidServerKeyType",
                format!("serverKeyType is '{SERVICE_MANAGED}' or '{AZURE_KEY_VAULT}', not '{ty}'."),
            ));
        };
        if name.is_none() {
            // TD-8: a Deny assignment refuses the move to the service-managed key.
            let mut candidate = server.clone();
            candidate["type"] = json!(crate::SERVER_TYPE);
            if let Some(o) = candidate["properties"].as_object_mut() {
                o.remove("keyId");
            }
            if let Some(e) = self
                .host
                .policy_deny(&id_of_body(server), &candidate)
                .await?
            {
                return Err(e);
            }
        }
        self.switch_protector(server, name, auto).await?;
        let server = self.note_key_id(caller, server).await?;
        Ok((200, self.protector_view(&server).await?))
    }

    /// Makes server key `name` (`None`: the service-managed key) the protector: checks it,
    /// re-wraps every database's DEK under it, names it, retires the older records.
    pub(crate) async fn switch_protector(
        &self,
        server: &Value,
        name: Option<&str>,
        auto_rotation: bool,
    ) -> Result<(), KvError> {
        let id = id_of_body(server);
        // TD-3: one change at a time; a second is refused rather than queued.
        let Some(_switching) = self.begin_switch(&id) else {
            return Err(KvError::conflict(
                "A change of the server's encryption protector is in progress; retry when it \
                 has finished.",
            )
            .with_inner("EncryptionProtectorChangeInProgress"));
        };
        // Databases are neither created nor dropped while their keys move (a database made
        // meanwhile would keep only a record under the old key).
        let _gate = self.server_gate(&id).await;
        let old = self.protector(server).await?;
        let new = match name {
            None => Protector {
                server_key_name: SERVICE_MANAGED.into(),
                kid: None,
                auto_rotation: false,
                database: None,
            },
            Some(n) => {
                let doc = self.server_key_doc(server, n).await?;
                let kid = doc["uri"].as_str().unwrap_or_default().to_string();
                // The key is checked again now: it may have changed since it was added.
                let kid = self.check_protector_key(server, &kid).await?.kid;
                Protector {
                    server_key_name: doc["name"].as_str().unwrap_or(n).to_string(),
                    kid: Some(kid),
                    auto_rotation,
                    database: None,
                }
            }
        };
        // Databases with keys of their own are not under the server's protector.
        let dbs: Vec<Database> = self
            .databases_of(server)
            .await?
            .into_iter()
            .filter(|d| KeyScope::Server.covers(d))
            .collect();
        if let Some(old_kid) = &old.kid {
            // Leaving a customer key needs that key now: its owner's revocation (disabled,
            // deleted, permission removed) must not be escaped by moving the databases'
            // keys away while the keeper's grace period runs.
            self.check_leaving_key(server, &old, old_kid, &dbs).await?;
        }
        if old.kid.is_some() && new.kid.is_none() {
            // Azure: not while a database under the customer key is inaccessible (its data
            // must stay out of reach while the key's permission is revoked).
            if let Some(db) = dbs.iter().find(|d| d.inaccessible()) {
                return Err(bad(
                    "InaccessibleDatabasesPreventChange",
                    format!(
                        "The database '{}' is inaccessible: the protector cannot move to the \
                         service-managed key until its key is reachable again.",
                        db.name
                    ),
                ));
            }
        }
        self.rewrap_databases(server, &old, &new, &dbs).await?;
        self.put_protector_doc(&id, &new).await?;
        for db in &dbs {
            self.db_keys(server, db)
                .retire_others(&new.record_id())
                .await?;
        }
        self.host
            .append_activity(
                &id,
                &json!({"operationName": "Microsoft.Sql/servers/encryptionProtector/write",
                    "status": "Succeeded", "eventTimestamp": kagi_core::time::rfc3339(self.host.now()),
                    "message": format!("TDE protector set to '{}' ({} databases re-wrapped).",
                        new.server_key_name, dbs.len())}),
            )
            .await?;
        Ok(())
    }

    /// Writes the protector document.
    pub(crate) async fn put_protector_doc(&self, id: &str, p: &Protector) -> Result<(), KvError> {
        let doc = match &p.kid {
            None => json!({"serverKeyName": SERVICE_MANAGED}),
            Some(kid) => json!({"serverKeyName": p.server_key_name, "uri": kid,
                "autoRotationEnabled": p.auto_rotation}),
        };
        self.host
            .put_document(id, SERVER_DOC, "protector", &doc)
            .await
    }

    /// The gate of a server's databases' keys, held while the protector changes and while a
    /// database is created or dropped.
    pub(crate) async fn server_gate(&self, server_id: &str) -> tokio::sync::OwnedMutexGuard<()> {
        self.lock_id(&format!("{server_id}/encryptionProtector"))
            .await
    }

    /// Marks a protector change of server `id` as running; `None` when one already is. The
    /// mark goes when the returned guard drops.
    fn begin_switch(&self, id: &str) -> Option<tokio::sync::OwnedMutexGuard<()>> {
        self.lock_of(&format!("{id}/switching"))
            .try_lock_owned()
            .ok()
    }

    /// Refuses to move off the customer key `kid` unless it works now: no failure pending in
    /// the keeper's health record, the key usable, and one database's key record opening
    /// under it.
    async fn check_leaving_key(
        &self,
        server: &Value,
        old: &Protector,
        kid: &str,
        dbs: &[Database],
    ) -> Result<(), KvError> {
        let refuse = |why: String| {
            bad(
                "AzureKeyVaultKeyInaccessible",
                format!(
                    "The server's TDE protector '{kid}' cannot be used now ({why}); the protector \
                     moves to another key only while its current key works. Restore access to \
                     the key first."
                ),
            )
        };
        let health = self
            .host
            .document(&id_of_body(server), SERVER_DOC, "health")
            .await?;
        if let Some(h) = health.filter(|h| h["failingSince"].is_i64()) {
            return Err(refuse(
                h["failure"].as_str().unwrap_or("failing").to_string(),
            ));
        }
        self.check_protector_key_usable(server, kid)
            .await
            .map_err(|e| refuse(e.message))?;
        if let Some(db) = dbs.iter().find(|d| !d.inaccessible()) {
            self.open_dek_under(server, db, old)
                .await
                .map_err(|e| refuse(kagi_cmk::key_failure_error(e, "x").message))?;
        }
        Ok(())
    }

    /// Database `db`'s DEK from its records under `protector` alone (never an older key's
    /// record, which would hide a revocation of the key in force), adding none.
    pub(crate) async fn open_dek_under(
        &self,
        server: &Value,
        db: &Database,
        protector: &Protector,
    ) -> Result<kagi_cmk::Dek, kagi_cmk::KeyError> {
        let kek = self.kek(server, protector).await?;
        let owner = self.db_keys(server, db);
        let mut records = kagi_cmk::KeyOwner::wrapped_keys(&owner).await?;
        records.retain(|r| r.kek.id().eq_ignore_ascii_case(&protector.record_id()));
        records.sort_by_key(|r| -r.created);
        let mut first_err = None;
        for r in &records {
            match self.keys.unwrap(&owner, &kek, r, self.host.now()).await {
                Ok(d) => return Ok(d),
                Err(kagi_cmk::KeyError::Access(f)) => {
                    first_err.get_or_insert(f);
                }
                Err(e) => return Err(e),
            }
        }
        Err(kagi_cmk::KeyError::Unopened(first_err))
    }

    /// Adds to every database a record of its DEK under `new` (where it has none). The DEK
    /// comes from memory when the database is open, else from a record under `old`.
    pub(crate) async fn rewrap_databases(
        &self,
        server: &Value,
        old: &Protector,
        new: &Protector,
        dbs: &[Database],
    ) -> Result<(), KvError> {
        let new_kek = self.kek(server, new).await?;
        let now = self.host.now();
        for db in dbs {
            let owner = self.db_keys(server, db);
            let records = kagi_cmk::KeyOwner::wrapped_keys(&owner).await?;
            if records
                .iter()
                .any(|r| r.kek.id().eq_ignore_ascii_case(&new.record_id()))
            {
                continue;
            }
            let dek = match self.open_dek(&db.database_id) {
                Some(d) => d,
                None => self
                    .open_dek_under(server, db, old)
                    .await
                    .map_err(|e| kagi_cmk::key_failure_error(e, "AzureKeyVaultKeyAccessFailed"))?,
            };
            let record = self
                .keys
                .wrap(&owner, &new_kek, &dek, now)
                .await
                .map_err(|e| kagi_cmk::key_failure_error(e, "AzureKeyVaultKeyAccessFailed"))?;
            kagi_cmk::KeyOwner::add_wrapped_key(&owner, record).await?;
        }
        Ok(())
    }

    /// The key records of database `db` of `server`.
    pub(crate) fn db_keys<'a>(&'a self, server: &Value, db: &Database) -> DbKeys<'a> {
        DbKeys {
            host: self.host.as_ref(),
            server_id: id_of_body(server),
            db: db.database_id.clone(),
            database_id: db.database_id.clone(),
        }
    }

    /// `POST {server}/encryptionProtector/current/revalidate`: probes the protector now and,
    /// when it answers, brings back every inaccessible database, however long ago it went.
    pub(crate) async fn revalidate(
        self: &Arc<Self>,
        server: &Value,
    ) -> Result<(u16, Value), KvError> {
        let protector = self.protector(server).await?;
        if let Some(kid) = &protector.kid {
            self.check_protector_key_usable(server, kid).await?;
        }
        self.recover_databases(server, KeyScope::Server, true)
            .await?;
        Ok((200, Value::Null))
    }

    /// Who reaches a protector's key: a database's own identity, or the server's: the
    /// user-assigned identity used (if any), how errors name it, and a token of it.
    fn key_actor(
        &self,
        server: &Value,
        database: Option<&DbIdentity>,
    ) -> Result<(Option<String>, String, String), KvError> {
        let id = id_of_body(server);
        Ok(match database {
            Some(d) => {
                let token = self
                    .host
                    .user_assigned_token(&d.identity, &format!("{id}/databases/{}", d.database))?;
                (Some(d.identity.clone()), db_who(d), token)
            }
            None => {
                let ua = identity_choice(server)?;
                let token = self.host.identity_token(&id, ua.as_deref())?;
                let who = who(server, ua.as_deref());
                (ua, who, token)
            }
        })
    }

    /// The newest version of the key `kid` (reached with `database`'s identity, or the
    /// server's) when it is not `kid` itself; `None` when `kid` is the newest or the key
    /// cannot be read now (the keeper tries again).
    pub(crate) async fn newer_key_version(
        &self,
        server: &Value,
        kid: &str,
        database: Option<&DbIdentity>,
    ) -> Result<Option<String>, KvError> {
        let uri = self.keys.parse(kid)?;
        let (_, _, token) = self.key_actor(server, database)?;
        let versionless = self.keys.parse(&uri.versionless())?;
        let Ok(newest) = self.keys.client().get_key(&versionless, &token).await else {
            return Ok(None);
        };
        let newest = newest["key"]["kid"].as_str().unwrap_or_default();
        Ok((!newest.is_empty() && !newest.eq_ignore_ascii_case(kid)).then(|| newest.to_string()))
    }

    /// Whether the protector `kid` can be used now by the server's identity (get, then a
    /// wrap and unwrap probe): the error says why not.
    pub(crate) async fn check_protector_key_usable(
        &self,
        server: &Value,
        kid: &str,
    ) -> Result<(), KvError> {
        self.check_protector_key_usable_as(server, kid, None).await
    }

    /// [`SqlService::check_protector_key_usable`] with a database's identity (`database`)
    /// instead of the server's.
    pub(crate) async fn check_protector_key_usable_as(
        &self,
        server: &Value,
        kid: &str,
        database: Option<&DbIdentity>,
    ) -> Result<(), KvError> {
        let id = id_of_body(server);
        let (ua, who, token) = self.key_actor(server, database)?;
        let req = KeyRequest {
            key_uri: kid,
            resource_id: &id,
            location: server["location"].as_str().unwrap_or_default(),
            user_assigned: ua.as_deref(),
            who: &who,
        };
        self.keys
            .validate_with(self.host.as_ref(), &req, Some(&token))
            .await
            .map(|_| ())
            .map_err(sql_error)
            .map_err(|e| {
                if e.code == ErrorCode::InternalError {
                    internal("probing the protector", &e.message)
                } else {
                    e
                }
            })
    }
}
