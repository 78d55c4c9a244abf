//! Database-level customer-managed keys (TD-2 "or per database"; Azure SQL's database-level
//! CMK, api-version 2024-05-01-preview): a database with its own user-assigned identity and its
//! own `encryptionProtector`, which wraps its DEK instead of the server's protector. The key
//! obeys the same rules (TD-1) checked with the database's identity; the keeper probes it and
//! drives that database alone through Inaccessible (TD-4); `revert` moves the database back
//! under the server's protector. As with the server's, every change re-wraps the DEK only.
//!
//! The database's document keeps `identity` (Azure's shape) and `cmk`: `kid` (the versioned
//! key in force), `keyName` (`{vault}_{key}_{version}`), `identity` (the user-assigned
//! identity's id), `autoRotation`, `thumbprint`, and `keys` (every key named in
//! `properties.keys`, with its thumbprint and when it was added); `cmkHealth` is the keeper's
//! record of its probes.

use std::sync::Arc;

use kagi_core::KvError;
use serde_json::{Value, json};

use crate::databases::{Database, KeyScope};
use crate::protector::{DbIdentity, Protector, key_name};
use crate::{SqlService, bad, id_of_body};

/// A database's own protector, if it has one.
pub(crate) fn own_protector(db: &Database) -> Option<Protector> {
    let c = &db.doc["cmk"];
    Some(Protector {
        server_key_name: c["keyName"].as_str()?.to_string(),
        kid: Some(c["kid"].as_str()?.to_string()),
        auto_rotation: c["autoRotation"].as_bool().unwrap_or(false),
        database: Some(DbIdentity {
            identity: c["identity"].as_str()?.to_string(),
            database: db.name.clone(),
        }),
    })
}

/// The user-assigned identity a database's document names (the first, in Azure's shape).
fn db_identity(db: &Database) -> Option<String> {
    db.doc["identity"]["userAssignedIdentities"]
        .as_object()
        .and_then(|m| m.keys().next().cloned())
}

impl SqlService {
    /// The protector of database `db`: its own, else its server's.
    pub(crate) async fn protector_for(
        &self,
        server: &Value,
        db: &Database,
    ) -> Result<Protector, KvError> {
        match own_protector(db) {
            Some(p) => Ok(p),
            None => self.protector(server).await,
        }
    }

    /// Stores the keeper's probe record of database `name`'s own key `kid` (unless its key
    /// moved meanwhile: then the record is of another key and goes).
    pub(crate) async fn put_db_health(
        &self,
        server: &Value,
        name: &str,
        kid: &str,
        health: Value,
    ) -> Result<(), KvError> {
        let _g = self.db_lock(server, name).await;
        let Ok(mut db) = self.database(server, name).await else {
            return Ok(());
        };
        if db.doc["cmk"]["kid"].as_str() != Some(kid) {
            return Ok(());
        }
        db.doc["cmkHealth"] = health;
        self.put_db_doc(server, &db).await
    }

    /// Applies the identity and key fields of a database `PUT`/`PATCH` (`identity`,
    /// `properties.encryptionProtector`, `keys`, `encryptionProtectorAutoRotation`) to `db`,
    /// re-wrapping its DEK when its protector changes; the caller holds its lock and stores it.
    pub(crate) async fn apply_database_keys(
        &self,
        server: &Value,
        db: &mut Database,
        input: &Value,
    ) -> Result<(), KvError> {
        let props = &input["properties"];
        if let Some(identity) = input.get("identity") {
            self.set_db_identity(db, identity)?;
        }
        let auto = props["encryptionProtectorAutoRotation"].as_bool();
        let protector = props["encryptionProtector"].as_str();
        let keys = props["keys"].as_object();
        if protector.is_none() && keys.is_none() && auto.is_none() {
            return Ok(());
        }
        if protector.is_some() && db.doc["geo"].is_object() {
            return Err(bad(
                "GeoReplicationOfDatabaseKeyNotSupported",
                format!(
                    "The database '{}' is in a geo-replication link: kagi replicates databases \
                     under their server's protector only; remove the link first.",
                    db.name
                ),
            ));
        }
        let ua = db_identity(db).ok_or_else(|| {
            bad(
                "AzureKeyVaultNoDatabaseIdentity",
                format!(
                    "The database '{}' has no user-assigned identity to reach the key vault \
                     with: give it one (identity.type 'UserAssigned') in the same request.",
                    db.name
                ),
            )
        })?;
        let who = DbIdentity {
            identity: ua.clone(),
            database: db.name.clone(),
        };
        let now = kagi_core::time::rfc3339(self.host.now());
        let mut cmk = db.doc["cmk"].clone();
        if !cmk.is_object() {
            cmk = json!({"keys": {}});
        }
        // The protector's own key is checked once, below.
        for uri in keys
            .into_iter()
            .flat_map(|m| m.keys())
            .filter(|u| protector.is_none_or(|p| !p.eq_ignore_ascii_case(u)))
        {
            let checked = self.check_protector_key_as(server, uri, Some(&who)).await?;
            cmk["keys"][checked.kid.as_str()] =
                json!({"thumbprint": checked.thumbprint, "creationDate": now});
        }
        if let Some(a) = auto {
            cmk["autoRotation"] = json!(a);
        }
        match protector {
            Some(uri) => {
                let checked = self.check_protector_key_as(server, uri, Some(&who)).await?;
                let name = key_name(&self.keys.parse(&checked.kid)?);
                cmk["keys"][checked.kid.as_str()] =
                    json!({"thumbprint": checked.thumbprint, "creationDate": now});
                cmk["kid"] = json!(checked.kid);
                cmk["keyName"] = json!(name);
                cmk["identity"] = json!(ua);
                cmk["thumbprint"] = json!(checked.thumbprint);
                self.move_database_key(server, db, Some(cmk)).await
            }
            None if db.has_own_key() => {
                // Only the keys or the rotation flag changed: no re-wrap.
                db.doc["cmk"] = cmk;
                Ok(())
            }
            None => Err(bad(
                "InvalidParameterValue",
                "properties.keys and encryptionProtectorAutoRotation go with a database's own \
                 properties.encryptionProtector.",
            )),
        }
    }

    /// The database's `identity`: user-assigned identities only (Azure's rule for
    /// database-level keys); `None` removes it, which its own key would still need.
    fn set_db_identity(&self, db: &mut Database, identity: &Value) -> Result<(), KvError> {
        let ty = identity["type"].as_str().ok_or_else(|| {
            bad(
                "InvalidIdentityType",
                "identity.type is 'UserAssigned' or 'None'.",
            )
        })?;
        if ty.eq_ignore_ascii_case("None") {
            if db.has_own_key() {
                return Err(bad(
                    "DatabaseIdentityInUse",
                    format!(
                        "The database '{}' reaches its own key with its identity: revert to the \
                         server's protector first.",
                        db.name
                    ),
                ));
            }
            let _ = db.doc.as_object_mut().map(|o| o.remove("identity"));
            return Ok(());
        }
        if !ty.eq_ignore_ascii_case("UserAssigned") {
            return Err(bad(
                "InvalidIdentityType",
                format!(
                    "A database's identity is 'UserAssigned' (or 'None'), not '{ty}': databases \
                     have no system-assigned identity."
                ),
            ));
        }
        let named = identity["userAssignedIdentities"]
            .as_object()
            .filter(|m| m.len() == 1)
            .ok_or_else(|| {
                bad(
                    "InvalidIdentity",
                    "identity.userAssignedIdentities names exactly one identity for a database.",
                )
            })?;
        let (id, _) = named.iter().next().ok_or_else(|| {
            bad(
                "InvalidIdentity",
                "identity.userAssignedIdentities is empty.",
            )
        })?;
        if db_identity(db).is_some_and(|old| !old.eq_ignore_ascii_case(id)) && db.has_own_key() {
            return Err(bad(
                "DatabaseIdentityInUse",
                format!(
                    "The database '{}' reaches its own key with its identity: revert it to the \
                     server's protector first, then change its identity.",
                    db.name
                ),
            ));
        }
        let found = self.host.user_assigned_identity(id)?;
        db.doc["identity"] = json!({
            "type": "UserAssigned",
            "tenantId": found["tenantId"],
            "userAssignedIdentities": {id.as_str(): {"principalId": found["principalId"],
                "clientId": found["clientId"]}},
        });
        Ok(())
    }

    /// Moves database `db`'s DEK under `cmk` (its own key), or with `None` back under the
    /// server's protector: one more record under the new key, the document naming it, then the
    /// older records retired. The caller holds the database's lock and stores the document.
    async fn move_database_key(
        &self,
        server: &Value,
        db: &mut Database,
        cmk: Option<Value>,
    ) -> Result<(), KvError> {
        // Not while the server's protector moves (it re-wraps databases under it).
        let _gate = self.server_gate(&id_of_body(server)).await;
        if db.inaccessible() {
            return Err(KvError::conflict(format!(
                "The database '{}' is inaccessible: its key cannot move until it is back.",
                db.name
            ))
            .with_inner("DatabaseInaccessible"));
        }
        let old = self.protector_for(server, db).await?;
        let mut next = db.clone();
        match &cmk {
            Some(c) => next.doc["cmk"] = c.clone(),
            None => {
                let _ = next.doc.as_object_mut().map(|o| o.remove("cmk"));
            }
        }
        let new = self.protector_for(server, &next).await?;
        if old.record_id().eq_ignore_ascii_case(&new.record_id()) && old.database == new.database {
            db.doc = next.doc;
            return Ok(());
        }
        // Leaving a customer key needs that key now (as for a server's protector): a revocation
        // must not be escaped by moving the DEK away while the keeper's bound runs. The DEK
        // comes from the old key's record, not from memory.
        let dek = if let Some(old_kid) = &old.kid {
            let refuse = |why: String| {
                bad(
                    "AzureKeyVaultKeyInaccessible",
                    format!(
                        "The database's current protector '{old_kid}' cannot be used now \
                         ({why}); its key moves only while the current key works. Restore \
                         access to the key first."
                    ),
                )
            };
            let failing = match &old.database {
                Some(_) => db.doc["cmkHealth"]["failingSince"].is_i64(),
                None => self
                    .host
                    .document(&id_of_body(server), crate::keys::SERVER_DOC, "health")
                    .await?
                    .is_some_and(|h| h["failingSince"].is_i64()),
            };
            if failing {
                return Err(refuse("the keeper has seen it fail".into()));
            }
            self.check_protector_key_usable_as(server, old_kid, old.database.as_ref())
                .await
                .map_err(|e| refuse(e.message))?;
            self.open_dek_under(server, db, &old)
                .await
                .map_err(|e| refuse(kagi_cmk::key_failure_error(e, "x").message))?
        } else {
            match self.open_dek(&db.database_id) {
                Some(d) => d,
                None => self
                    .open_dek_under(server, db, &old)
                    .await
                    .map_err(|e| kagi_cmk::key_failure_error(e, "AzureKeyVaultKeyAccessFailed"))?,
            }
        };
        let kek = self.kek(server, &new).await?;
        let owner = self.db_keys(server, db);
        let record = self
            .keys
            .wrap(&owner, &kek, &dek, self.host.now())
            .await
            .map_err(|e| kagi_cmk::key_failure_error(e, "AzureKeyVaultKeyAccessFailed"))?;
        kagi_cmk::KeyOwner::add_wrapped_key(&owner, record).await?;
        db.doc = next.doc;
        if let Some(o) = db.doc.as_object_mut() {
            o.remove("cmkHealth");
        }
        self.put_db_doc(server, db).await?;
        owner.retire_others(&new.record_id()).await?;
        self.host
            .append_activity(
                &id_of_body(server),
                &json!({"operationName": "Microsoft.Sql/servers/databases/encryptionProtector/write",
                    "status": "Succeeded", "eventTimestamp": kagi_core::time::rfc3339(self.host.now()),
                    "resourceId": format!("{}/databases/{}", id_of_body(server), db.name),
                    "message": format!("Database '{}' is under {}.", db.name,
                        new.kid.as_deref().map(|k| format!("its own key '{k}'"))
                            .unwrap_or_else(|| "the server's protector".into()))}),
            )
            .await
    }

    /// `POST {server}/databases/{db}/encryptionProtector/current/revert`: the database goes back
    /// under the server's protector (its DEK re-wrapped).
    pub(crate) async fn revert_database_key(
        &self,
        server: &Value,
        name: &str,
    ) -> Result<(u16, Value), KvError> {
        let _g = self.db_lock(server, name).await;
        let mut db = self.database(server, name).await?;
        if db.has_own_key() {
            self.move_database_key(server, &mut db, None).await?;
        }
        Ok((200, self.db_view(server, &db)))
    }

    /// `POST {server}/databases/{db}/encryptionProtector/current/revalidate`: probes the
    /// database's key now and, when it works, brings the database back however long ago it
    /// became inaccessible.
    pub(crate) async fn revalidate_database(
        self: &Arc<Self>,
        server: &Value,
        name: &str,
    ) -> Result<(u16, Value), KvError> {
        let db = self.database(server, name).await?;
        let Some(p) = own_protector(&db) else {
            // A database under the server's protector: the server's revalidate.
            return self.revalidate(server).await;
        };
        if let (Some(kid), Some(who)) = (&p.kid, &p.database) {
            self.check_protector_key_usable_as(server, kid, Some(who))
                .await?;
        }
        self.recover_databases(server, KeyScope::Database(name), true)
            .await?;
        Ok((200, Value::Null))
    }

    /// With `encryptionProtectorAutoRotation`: when database `name`'s key has a newer version,
    /// it becomes its protector. Returns whether it moved.
    pub(crate) async fn follow_newest_db(
        &self,
        server: &Value,
        name: &str,
    ) -> Result<bool, KvError> {
        let _g = self.db_lock(server, name).await;
        let mut db = self.database(server, name).await?;
        let Some(p) = own_protector(&db) else {
            return Ok(false);
        };
        let (Some(kid), Some(who)) = (&p.kid, &p.database) else {
            return Ok(false);
        };
        let Some(newest) = self.newer_key_version(server, kid, Some(who)).await? else {
            return Ok(false);
        };
        let input = json!({"properties": {"encryptionProtector": newest}});
        self.apply_database_keys(server, &mut db, &input).await?;
        tracing::info!(database = %name, key = %newest, "database key rotated");
        Ok(true)
    }
}
