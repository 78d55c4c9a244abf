//! Databases: their documents, their DEK in memory while open, and the Online / Inaccessible
//! states (TD-4).

use std::path::PathBuf;
use std::sync::Arc;

use kagi_cmk::{Dek, KeyOwner};
use kagi_core::{ErrorCode, KvError};
use serde_json::{Map, Value, json};

use crate::keys::internal;
use crate::{SqlService, bad, id_of_body};

/// The document kind of databases (named by the database, lower case).
pub(crate) const DATABASE_DOC: &str = "database";
/// A database that works.
pub(crate) const ONLINE: &str = "Online";
/// A database whose protector cannot be reached: connections are refused, only drop works.
pub(crate) const INACCESSIBLE: &str = "Inaccessible";
/// The geo-replication role of a database that replication writes (`geo.role`).
pub(crate) const GEO_SECONDARY: &str = "Secondary";
/// Azure's replication state of a geo-secondary being copied whole (`geo.replicationState`).
pub(crate) const GEO_SEEDING: &str = "SEEDING";

/// Azure's fields of a database's keys, for its view.
fn keys_view(db: &Database) -> (Value, Value) {
    let c = &db.doc["cmk"];
    let keys: Map<String, Value> = c["keys"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        json!({"type": "AzureKeyVault", "thumbprint": v["thumbprint"],
                            "creationDate": v["creationDate"], "subregion": ""}),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let props = json!({
        "encryptionProtector": c["kid"],
        "encryptionProtectorAutoRotation": c["autoRotation"].as_bool().unwrap_or(false),
        "keys": if keys.is_empty() { Value::Null } else { Value::Object(keys) },
    });
    (db.doc["identity"].clone(), props)
}

/// Which databases of a server one protector covers.
#[derive(Clone, Copy, Debug)]
pub(crate) enum KeyScope<'a> {
    /// Those under the server's protector (without a key of their own).
    Server,
    /// Database `name`, under its own key.
    Database(&'a str),
}

impl KeyScope<'_> {
    /// Whether `db` is under this protector.
    pub(crate) fn covers(&self, db: &Database) -> bool {
        match self {
            KeyScope::Server => !db.has_own_key(),
            KeyScope::Database(name) => db.name.eq_ignore_ascii_case(name) && db.has_own_key(),
        }
    }
}

/// A database as its document keeps it.
#[derive(Clone, Debug)]
pub(crate) struct Database {
    /// Its name as created.
    pub(crate) name: String,
    /// Its id (a GUID): names its file and binds its platform-key wrap.
    pub(crate) database_id: String,
    /// The id bound into its pages: its own, or for a geo-secondary (and a database that was
    /// one) its primary's, whose pages it holds.
    pub(crate) page_id: String,
    /// The whole document.
    pub(crate) doc: Value,
}

impl Database {
    fn of(doc: Value) -> Option<Self> {
        let database_id = doc["databaseId"].as_str()?.to_string();
        Some(Self {
            name: doc["name"].as_str()?.to_string(),
            page_id: doc["pageId"].as_str().unwrap_or(&database_id).to_string(),
            database_id,
            doc,
        })
    }

    /// Whether it has a key of its own (database-level CMK): the fields a protector is made
    /// of (`db_keys::own_protector`), so that both always agree.
    pub(crate) fn has_own_key(&self) -> bool {
        let c = &self.doc["cmk"];
        ["kid", "keyName", "identity"]
            .iter()
            .all(|f| c[*f].is_string())
    }

    /// Whether it is a geo-secondary (read-only, written by replication only).
    pub(crate) fn is_secondary(&self) -> bool {
        self.doc["geo"]["role"].as_str() == Some(GEO_SECONDARY)
    }

    /// Whether it is a geo-secondary being seeded (no sessions until it is).
    pub(crate) fn is_seeding(&self) -> bool {
        self.is_secondary() && self.doc["geo"]["replicationState"].as_str() == Some(GEO_SEEDING)
    }

    /// Whether it is Inaccessible.
    pub(crate) fn inaccessible(&self) -> bool {
        self.doc["state"]["status"].as_str() == Some(INACCESSIBLE)
    }

    /// When it became Inaccessible (platform clock).
    pub(crate) fn inaccessible_since(&self) -> Option<i64> {
        self.doc["state"]["since"].as_i64()
    }
}

/// A database whose DEK is in memory: what connections to it use. Dropping the last handle
/// zeroizes the DEK.
pub struct OpenDatabase {
    /// The database id.
    pub database_id: String,
    /// The server's resource id.
    pub server_id: String,
    /// The database's name.
    pub name: String,
    /// Its file.
    pub file: PathBuf,
    /// The id bound into its pages.
    pub(crate) page_id: String,
    /// A geo-secondary: sessions read only.
    pub(crate) read_only: bool,
    /// Its data key.
    pub(crate) dek: Dek,
    /// Cuts every session of the database (Inaccessible, dropped).
    pub(crate) terminator: kagi_pgsql::Terminator,
    /// Its live log in the bucket (several nodes with `--blobs s3://…`; not for a
    /// geo-secondary, which its link writes).
    pub(crate) live: Option<Arc<crate::live::LiveLog>>,
}

impl std::fmt::Debug for OpenDatabase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenDatabase")
            .field("database_id", &self.database_id)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl OpenDatabase {
    /// Ends every session of the database with `error` (sent as FATAL).
    pub(crate) fn close(&self, error: kagi_pgsql::PgError) {
        self.terminator.terminate(error);
    }

    /// The page key of the database's files.
    pub(crate) fn page_key(&self) -> Result<kagi_sqlite_crypt::DatabaseKey, KvError> {
        kagi_sqlite_crypt::DatabaseKey::from_slices(&self.dek[..], &guid_bytes(&self.page_id))
            .map_err(|e| internal("the page key", e))
    }
}

/// The 16 bytes of a GUID (what the page format binds into every page); zeros for text that
/// is not a GUID (never the case for ids kagi made).
pub(crate) fn guid_bytes(guid: &str) -> [u8; 16] {
    let mut out = [0u8; 16];
    if let Ok(b) = hex::decode(guid.replace('-', ""))
        && b.len() == 16
    {
        out.copy_from_slice(&b);
    }
    out
}

/// Azure's rules for database names: 1 to 128 characters, none of `<>*%&:\/?`, not ending
/// with `.` or a space, and not a system database's name.
pub(crate) fn check_db_name(name: &str) -> Result<(), KvError> {
    let bad_char = name
        .chars()
        .any(|c| "<>*%&:\\/?".contains(c) || c.is_control());
    let reserved = ["master", "tempdb", "model", "msdb"]
        .iter()
        .any(|r| r.eq_ignore_ascii_case(name));
    if name.is_empty()
        || name.chars().count() > 128
        || bad_char
        || name.ends_with('.')
        || name.ends_with(' ')
        || reserved
    {
        return Err(bad(
            "InvalidDatabaseName",
            format!(
                "The database name '{name}' is not valid: 1 to 128 characters, none of \
                 <>*%&:\\/?, not ending with '.' or a space, and not master, tempdb, model or msdb."
            ),
        ));
    }
    Ok(())
}

/// A new GUID (version 4).
pub(crate) fn new_guid() -> Result<String, KvError> {
    let mut b = kagi_crypto::random_bytes(16).map_err(|e| internal("rng", e))?;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    ))
}

/// Whether a database `PUT` asks for a restore (`properties.createMode` other than `Default`).
fn restore_requested(input: &Value) -> bool {
    input["properties"]["createMode"]
        .as_str()
        .is_some_and(|m| !m.eq_ignore_ascii_case("Default"))
}

/// Azure's 40613 text, which connections to an inaccessible database get.
pub fn unavailable_message(db: &str, server: &str) -> String {
    format!(
        "Database '{db}' on server '{server}' is not currently available. Please retry the \
         connection later. If the problem persists, contact customer support, and provide them \
         the session tracing ID of '{}'. (error 40613)",
        new_guid().unwrap_or_default()
    )
}

impl SqlService {
    /// The lock that serialises the changes of database `name` of `server`, held.
    pub(crate) async fn db_lock(
        &self,
        server: &Value,
        name: &str,
    ) -> tokio::sync::OwnedMutexGuard<()> {
        self.lock_id(&format!("{}/databases/{name}", id_of_body(server)))
            .await
    }

    /// The file of database `database_id`.
    pub(crate) fn db_file(&self, database_id: &str) -> PathBuf {
        self.host
            .config()
            .data_dir
            .join("sql")
            .join(format!("{database_id}.db"))
    }

    /// The databases of `server`.
    pub(crate) async fn databases_of(&self, server: &Value) -> Result<Vec<Database>, KvError> {
        Ok(self
            .host
            .documents(&id_of_body(server), DATABASE_DOC)
            .await?
            .into_iter()
            .filter_map(|(_, d)| Database::of(d))
            .collect())
    }

    /// Database `name` of `server`, or Azure's 404.
    pub(crate) async fn database(&self, server: &Value, name: &str) -> Result<Database, KvError> {
        self.host
            .document(
                &id_of_body(server),
                DATABASE_DOC,
                &name.to_ascii_lowercase(),
            )
            .await?
            .and_then(Database::of)
            .ok_or_else(|| no_such_database(server, name))
    }

    pub(crate) async fn put_db_doc(&self, server: &Value, db: &Database) -> Result<(), KvError> {
        self.host
            .put_document(
                &id_of_body(server),
                DATABASE_DOC,
                &db.name.to_ascii_lowercase(),
                &db.doc,
            )
            .await
    }

    pub(crate) fn db_view(&self, server: &Value, db: &Database) -> Value {
        let d = &db.doc;
        let mut view = json!({
            "id": format!("{}/databases/{}", id_of_body(server), db.name),
            "name": db.name,
            "type": "Microsoft.Sql/servers/databases",
            "location": server["location"],
            "tags": d["tags"],
            "kind": "v12.0,user",
            "sku": d["sku"],
            "properties": {
                "collation": d["collation"],
                "maxSizeBytes": d["maxSizeBytes"],
                "status": d["state"]["status"],
                "databaseId": db.database_id,
                "creationDate": d["creationDate"],
                "currentServiceObjectiveName": d["sku"]["name"],
                "requestedServiceObjectiveName": d["sku"]["name"],
                "defaultSecondaryLocation": server["location"],
                "zoneRedundant": false,
                "readScale": "Disabled",
                "isLedgerOn": false,
                "inaccessibilityReason": d["state"]["reason"],
                "secondaryType": if db.is_secondary() { json!("Geo") } else { Value::Null },
            },
        });
        // Database-level CMK (2024-05-01-preview's fields).
        let (identity, keys) = keys_view(db);
        if !identity.is_null() {
            view["identity"] = identity;
        }
        if db.has_own_key() {
            for (k, v) in keys.as_object().into_iter().flatten() {
                view["properties"][k.as_str()] = v.clone();
            }
        }
        view
    }

    /// `GET {server}/databases/{name}`.
    pub(crate) async fn get_database(&self, server: &Value, name: &str) -> Result<Value, KvError> {
        let db = self.database(server, name).await?;
        let mut view = self.db_view(server, &db);
        if let Some(t) = self.earliest_restore_date(server, &db).await {
            view["properties"]["earliestRestoreDate"] = json!(t);
        }
        Ok(view)
    }

    /// `GET {server}/databases` (or only the inaccessible ones).
    pub(crate) async fn list_databases(
        &self,
        server: &Value,
        only_inaccessible: bool,
    ) -> Result<(u16, Value), KvError> {
        let dbs = self.databases_of(server).await?;
        let value: Vec<Value> = dbs
            .iter()
            .filter(|d| !only_inaccessible || d.inaccessible())
            .map(|d| self.db_view(server, d))
            .collect();
        Ok((200, json!({ "value": value })))
    }

    /// `PUT`/`PATCH {server}/databases/{name}`.
    pub(crate) async fn put_database(
        self: &Arc<Self>,
        caller: &kagi_host::Principal,
        server: &Value,
        name: &str,
        input: Value,
        patch: bool,
    ) -> Result<(u16, Value), KvError> {
        check_db_name(name)?;
        let server_id = id_of_body(server);
        let _g = self.db_lock(server, name).await;
        // A store failure is not "no such database": the PUT would then make another.
        let existing = match self.database(server, name).await {
            Ok(db) => Some(db),
            Err(e) if e.code == ErrorCode::ResourceNotFound => None,
            Err(e) => return Err(e),
        };
        if existing.is_some() && restore_requested(&input) {
            return Err(KvError::conflict(format!(
                "The database '{name}' already exists: a restore creates a new database."
            ))
            .with_inner("DatabaseAlreadyExists"));
        }
        if let Some(mut db) = existing {
            if db.inaccessible() {
                return Err(inaccessible_error(server, &db));
            }
            for field in ["tags", "sku"] {
                if let Some(v) = input.get(field) {
                    db.doc[field] = v.clone();
                }
            }
            if let Some(v) = input["properties"].get("maxSizeBytes") {
                db.doc["maxSizeBytes"] = v.clone();
            }
            // Its own identity and key (database-level CMK).
            self.apply_database_keys(server, &mut db, &input).await?;
            self.put_db_doc(server, &db).await?;
            return Ok((200, self.db_view(server, &db)));
        }
        if patch {
            return Err(no_such_database(server, name));
        }
        if input["properties"]["createMode"]
            .as_str()
            .is_some_and(|m| m.eq_ignore_ascii_case("Secondary"))
        {
            return self.create_secondary(caller, server, name, &input).await;
        }
        // A restore replays the source's backups first: when it fails, nothing is created.
        let restore = if restore_requested(&input) {
            Some(self.prepare_restore(caller, server, &input).await?)
        } else {
            None
        };
        let database_id = new_guid()?;
        let now = self.host.now();
        let sku = input
            .get("sku")
            .cloned()
            .unwrap_or_else(|| json!({"name": "GP_S_Gen5_2", "tier": "GeneralPurpose"}));
        let doc = json!({
            "name": name,
            "databaseId": database_id,
            "creationDate": kagi_core::time::rfc3339(now),
            "collation": input["properties"]["collation"].as_str().unwrap_or("SQL_Latin1_General_CP1_CI_AS"),
            "maxSizeBytes": input["properties"]["maxSizeBytes"].as_u64().unwrap_or(34_359_738_368),
            "sku": sku,
            "tags": input.get("tags").cloned().unwrap_or(Value::Null),
            "state": {"status": ONLINE},
        });
        let db = Database {
            name: name.to_string(),
            page_id: database_id.clone(),
            database_id: database_id.clone(),
            doc,
        };
        // The protector does not change while the database is made (it would miss the
        // re-wrap).
        let gate = self.server_gate(&server_id).await;
        // The DEK, wrapped under the protector in force before anything refers to it.
        let dek = kagi_cmk::random_dek()?;
        let protector = self.protector(server).await?;
        let kek = self.kek(server, &protector).await?;
        let owner = self.db_keys(server, &db);
        let record = self
            .keys
            .wrap(&owner, &kek, &dek, now)
            .await
            .map_err(|e| kagi_cmk::key_failure_error(e, "AzureKeyVaultKeyAccessFailed"))?;
        owner.add_wrapped_key(record).await?;
        let open = self.remember_open(server, &db, dek).await;
        let made = match restore {
            Some(r) => self.finish_restore(&open, r).await,
            None => match open.page_key() {
                Ok(key) => crate::engine::create(open.file.clone(), key).await,
                Err(e) => Err(e),
            },
        };
        let made = match made {
            Ok(()) => self.put_db_doc(server, &db).await,
            Err(e) => Err(e),
        };
        if let Err(e) = made {
            // A failed create leaves nothing: no key records, no key in memory, no file.
            self.forget_open(&db.database_id);
            let _ = owner.delete().await;
            let _ = crate::engine::remove_files(&self.db_file(&db.database_id)).await;
            return Err(e);
        }
        drop(gate);
        // Made under the server's protector; its own key, when asked for, next (re-wrap
        // only). A key it cannot use leaves no database.
        let mut db = db;
        if let Err(e) = self.apply_database_keys(server, &mut db, &input).await {
            let _gate = self.server_gate(&server_id).await;
            let _ = self.drop_database(server, &db).await;
            return Err(e);
        }
        self.put_db_doc(server, &db).await?;
        // With a live log, its first full backup is in the bucket before the database is
        // acknowledged: the live log's pieces carry on from a backup (`crate::takeover`).
        if open.live.is_some() {
            let open = self.open_entry(&db.database_id).unwrap_or(open);
            if let Err(e) = self.backup_now(server, &db, &open).await {
                let _gate = self.server_gate(&server_id).await;
                let _ = self.drop_database(server, &db).await;
                return Err(e);
            }
        }
        Ok((201, self.db_view(server, &db)))
    }

    /// `DELETE {server}/databases/{name}`: allowed in every state (an inaccessible database
    /// can always be dropped).
    pub(crate) async fn delete_database(
        self: &Arc<Self>,
        server: &Value,
        name: &str,
    ) -> Result<(u16, Value), KvError> {
        let server_id = id_of_body(server);
        let _g = self.db_lock(server, name).await;
        let Ok(mut db) = self.database(server, name).await else {
            return Ok((204, Value::Null));
        };
        // A database in a geo-replication link leaves it first: its partner stands alone.
        if self
            .leave_link(server, &mut db, "the database was dropped")
            .await?
            .is_some()
        {
            self.put_db_doc(server, &db).await?;
        }
        let _gate = self.server_gate(&server_id).await;
        self.drop_database(server, &db).await?;
        Ok((200, Value::Null))
    }

    /// Closes a database, removes its files, its key records and its document.
    pub(crate) async fn drop_database(&self, server: &Value, db: &Database) -> Result<(), KvError> {
        self.end_sessions(
            &db.database_id,
            format!(
                "terminating connection because database \"{}\" was dropped",
                db.name
            ),
        );
        // Its backups stay for the retention period; its live log goes (what it holds after
        // the backups is the dropped database's last minutes, as in Azure's backups).
        self.note_dropped(server, db).await;
        self.remove_live_log(&db.database_id, None).await;
        // The key first, then the files, then the document: a crash on the way leaves a
        // database whose key is gone (it cannot open), which a repeated DELETE finishes.
        self.db_keys(server, db).delete().await?;
        crate::logins::remove_db_users(self.host.as_ref(), &id_of_body(server), &db.database_id)
            .await?;
        crate::engine::remove_files(&self.db_file(&db.database_id)).await?;
        self.host
            .delete_document(
                &id_of_body(server),
                DATABASE_DOC,
                &db.name.to_ascii_lowercase(),
            )
            .await
            .map(|_| ())
    }

    /// The database's resource health (Azure Resource Health's `availabilityStatuses/current`,
    /// TD-5): `Available`, or `Unavailable` with the reason while it is Inaccessible.
    pub(crate) async fn health_view(&self, server: &Value, name: &str) -> Result<Value, KvError> {
        let db = self.database(server, name).await?;
        let id = format!("{}/databases/{}", id_of_body(server), db.name);
        let now = kagi_core::time::rfc3339(self.host.now());
        let properties = if db.inaccessible() {
            let since = db
                .inaccessible_since()
                .map(kagi_core::time::rfc3339)
                .unwrap_or_else(|| now.clone());
            json!({
                "availabilityState": "Unavailable",
                "title": "Database inaccessible",
                "summary": format!(
                    "The database is inaccessible because the server's TDE protector cannot be \
                     reached: {}. Restore access to the key{}.",
                    db.doc["state"]["reason"].as_str().unwrap_or("unknown reason"),
                    if db.doc["state"]["needsRevalidation"] == json!(true) {
                        ", then revalidate the encryption protector"
                    } else {
                        "; the database comes back by itself"
                    }
                ),
                "reasonType": "Customer Initiated",
                "reasonChronicity": "Persistent",
                "occuredTime": since,
                "reportedTime": now,
            })
        } else {
            json!({
                "availabilityState": "Available",
                "title": "Available",
                "summary": "There aren't any known problems affecting this database.",
                "reportedTime": now,
            })
        };
        Ok(json!({
            "id": format!("{id}/providers/Microsoft.ResourceHealth/availabilityStatuses/current"),
            "name": "current",
            "type": "Microsoft.ResourceHealth/AvailabilityStatuses",
            "location": server["location"],
            "properties": properties,
        }))
    }

    /// `GET {server}/databases/{name}/transparentDataEncryption/current`.
    pub(crate) async fn tde_view(&self, server: &Value, name: &str) -> Result<Value, KvError> {
        let db = self.database(server, name).await?;
        Ok(json!({
            "id": format!("{}/databases/{}/transparentDataEncryption/current", id_of_body(server), db.name),
            "name": "current",
            "type": "Microsoft.Sql/servers/databases/transparentDataEncryption",
            "properties": {"state": "Enabled"},
        }))
    }

    /// `PUT …/transparentDataEncryption/current`: `Enabled` is accepted; every kagi database
    /// is encrypted, so `Disabled` is refused.
    pub(crate) async fn put_tde(
        &self,
        server: &Value,
        name: &str,
        input: Value,
    ) -> Result<(u16, Value), KvError> {
        let state = input["properties"]["state"].as_str().unwrap_or("Enabled");
        if !state.eq_ignore_ascii_case("Enabled") {
            return Err(bad(
                "TdeCannotBeDisabled",
                "kagi databases are always encrypted: transparent data encryption cannot be \
                 disabled (state 'Enabled' only).",
            ));
        }
        Ok((200, self.tde_view(server, name).await?))
    }

    /// The DEK of an open database.
    pub(crate) fn open_dek(&self, database_id: &str) -> Option<Dek> {
        self.open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(database_id)
            .map(|o| o.dek.clone())
    }

    /// Keeps `dek` in memory as database `db`'s (unless it is open already); returns the open
    /// database.
    pub(crate) async fn remember_open(
        &self,
        server: &Value,
        db: &Database,
        dek: Dek,
    ) -> Arc<OpenDatabase> {
        // The live log knows which takeover made this node the home: a later one fences it.
        let live = if db.is_secondary() || !self.ships_live_logs() {
            None
        } else {
            match self.server_takeover(&id_of_body(server)).await {
                Ok(n) => self.live_log(&db.database_id, n),
                // Unknown: a live log that refuses every commit rather than one that might
                // ship past another node's fence.
                Err(e) => {
                    tracing::warn!(database = %db.name, error = %e.message, "the server's takeover number cannot be read");
                    self.live_log(&db.database_id, 0)
                }
            }
        };
        let open = Arc::new(OpenDatabase {
            database_id: db.database_id.clone(),
            server_id: id_of_body(server),
            name: db.name.clone(),
            file: self.db_file(&db.database_id),
            page_id: db.page_id.clone(),
            read_only: db.is_secondary(),
            dek,
            terminator: kagi_pgsql::Terminator::new(),
            live,
        });
        // One entry per database: when another task opened it meanwhile, its entry (whose
        // terminator its sessions hold) stays.
        self.open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(db.database_id.clone())
            .or_insert(open)
            .clone()
    }

    /// The open database `database_id`, if its DEK is in memory.
    pub(crate) fn open_entry(&self, database_id: &str) -> Option<Arc<OpenDatabase>> {
        self.open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(database_id)
            .cloned()
    }

    /// Ends the sessions of database `database_id` with FATAL 57P01 `why` and forgets its
    /// entry (its key leaves memory; the next session opens it anew, as it is then). The
    /// entry, if it was open.
    pub(crate) fn end_sessions(
        &self,
        database_id: &str,
        why: impl Into<String>,
    ) -> Option<Arc<OpenDatabase>> {
        let open = self.forget_open(database_id)?;
        open.close(kagi_pgsql::PgError::fatal("57P01", why.into()));
        Some(open)
    }

    /// [`Self::end_sessions`], and the rest of what this node holds of the database goes
    /// too: its live log in use and its backups' snapshot (its file is replaced, or another
    /// node serves it, or it is gone).
    pub(crate) fn let_go_of(
        &self,
        database_id: &str,
        why: impl Into<String>,
    ) -> Option<Arc<OpenDatabase>> {
        let open = self.end_sessions(database_id, why);
        self.forget_live_log(database_id);
        self.forget_backup_pin(database_id);
        open
    }

    pub(crate) fn forget_open(&self, database_id: &str) -> Option<Arc<OpenDatabase>> {
        self.open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(database_id)
    }

    /// The open database `name` of `server`, its DEK unwrapped now if it is not in memory;
    /// Azure's 40613 text when it is Inaccessible or its key cannot be reached.
    pub async fn open_database(
        &self,
        server: &Value,
        name: &str,
    ) -> Result<Arc<OpenDatabase>, KvError> {
        let db = self.database(server, name).await?;
        // A geo-secondary has no data to read until it is seeded; a copy found behind what
        // was acknowledged is not read until it is rebuilt from the bucket.
        if db.is_seeding() || self.found_behind(&db.database_id) {
            return Err(KvError::new(
                ErrorCode::ServiceUnavailable,
                unavailable_message(&db.name, server["name"].as_str().unwrap_or_default()),
            )
            .with_inner("DatabaseNotAvailable"));
        }
        self.open_db(server, &db).await
    }

    /// Database `db` of `server` with its DEK in memory (unwrapped now if it is not); Azure's
    /// 40613 text when it is Inaccessible or its key cannot be reached.
    pub(crate) async fn open_db(
        &self,
        server: &Value,
        db: &Database,
    ) -> Result<Arc<OpenDatabase>, KvError> {
        let name = db.name.as_str();
        let unavailable = || {
            KvError::new(
                ErrorCode::ServiceUnavailable,
                unavailable_message(&db.name, server["name"].as_str().unwrap_or_default()),
            )
            .with_inner("DatabaseNotAvailable")
        };
        if db.inaccessible() {
            return Err(unavailable());
        }
        let cached = self.open_entry(&db.database_id);
        match cached {
            // Opened for the role it has now (a geo-secondary's sessions read only).
            Some(open) if open.read_only == db.is_secondary() => return Ok(open),
            Some(stale) => {
                // Its role changed (a failover): its sessions end, the next ones open anew.
                self.end_sessions(
                    &db.database_id,
                    "terminating connection: the database's geo-replication role changed",
                );
                // A secondary's file is re-seeded: a primary's log that read it goes.
                self.forget_live_log(&db.database_id);
                return Ok(self.remember_open(server, db, stale.dek.clone()).await);
            }
            None => {}
        }
        // Only a record under the protector in force opens it (an older key's record would
        // hide a revocation of the key in force).
        let protector = self.protector_for(server, db).await?;
        let dek = self
            .open_dek_under(server, db, &protector)
            .await
            .map_err(|e| {
                tracing::warn!(database = %db.name, error = ?e, "database key not opened");
                unavailable()
            })?;
        // Made Inaccessible meanwhile: its key stays out of memory.
        if self.database(server, name).await?.inaccessible() {
            return Err(unavailable());
        }
        Ok(self.remember_open(server, db, dek).await)
    }

    /// Makes the online databases of `server` under `scope`'s protector Inaccessible (TD-4):
    /// DEK dropped from memory, sessions cut with 40613, activity `MakeDatabaseInaccessible`.
    /// Returns how many.
    pub(crate) async fn make_inaccessible(
        &self,
        server: &Value,
        scope: KeyScope<'_>,
        reason: &str,
    ) -> Result<u64, KvError> {
        let now = self.host.now();
        let mut n = 0;
        for listed in self.databases_of(server).await? {
            if !scope.covers(&listed) {
                continue;
            }
            // Under the database's lock, as it is now (dropped or changed meanwhile).
            let _g = self.db_lock(server, &listed.name).await;
            let Ok(mut db) = self.database(server, &listed.name).await else {
                continue;
            };
            // As it is now: it may have moved to or from a key of its own meanwhile.
            if db.inaccessible() || !scope.covers(&db) {
                continue;
            }
            // TD-7: it leaves its geo-replication link; its partner stands alone.
            let left = self
                .leave_link(server, &mut db, "the database became inaccessible")
                .await?;
            if left.is_some_and(|l| l.is_unseeded_secondary()) {
                // A secondary never seeded holds no data: it goes.
                let _gate = self.server_gate(&id_of_body(server)).await;
                self.drop_database(server, &db).await?;
                continue;
            }
            db.doc["state"] = json!({"status": INACCESSIBLE, "since": now, "reason": reason});
            self.put_db_doc(server, &db).await?;
            if let Some(open) = self.forget_open(&db.database_id) {
                open.close(kagi_pgsql::PgError::unavailable(unavailable_message(
                    &db.name,
                    server["name"].as_str().unwrap_or_default(),
                )));
            }
            // The page key goes from memory now, even before the last session has ended:
            // their reads and writes then fail.
            crate::engine::revoke(&self.db_file(&db.database_id)).await;
            self.host
                .append_activity(
                    &id_of_body(server),
                    &json!({"operationName": "MakeDatabaseInaccessible", "status": "Succeeded",
                        "eventTimestamp": kagi_core::time::rfc3339(now),
                        "resourceId": format!("{}/databases/{}", id_of_body(server), db.name),
                        "message": format!("Database '{}' is inaccessible: {reason}", db.name)}),
                )
                .await?;
            tracing::warn!(database = %db.name, reason, "database made inaccessible");
            n += 1;
        }
        Ok(n)
    }

    /// Brings back the inaccessible databases of `server` under `scope`'s protector whose key
    /// opens again: those that went within the heal window, or with `revalidated` all of them.
    /// Returns how many.
    pub(crate) async fn recover_databases(
        &self,
        server: &Value,
        scope: KeyScope<'_>,
        revalidated: bool,
    ) -> Result<u64, KvError> {
        let now = self.host.now();
        let window = self.config.heal_window.as_secs() as i64;
        let mut n = 0;
        for listed in self.databases_of(server).await? {
            if !scope.covers(&listed) {
                continue;
            }
            // Under the database's lock, as it is now (dropped or changed meanwhile).
            let _g = self.db_lock(server, &listed.name).await;
            let Ok(mut db) = self.database(server, &listed.name).await else {
                continue;
            };
            if !db.inaccessible() || !scope.covers(&db) {
                continue;
            }
            let within = db
                .inaccessible_since()
                .is_some_and(|since| now - since <= window);
            if !within && !revalidated {
                if db.doc["state"]["needsRevalidation"] != json!(true) {
                    db.doc["state"]["needsRevalidation"] = json!(true);
                    self.put_db_doc(server, &db).await?;
                }
                continue;
            }
            // The key must open the DEK now.
            let protector = self.protector_for(server, &db).await?;
            let opened = match self.open_dek_under(server, &db, &protector).await {
                Ok(o) => o,
                Err(e) if revalidated => {
                    return Err(kagi_cmk::key_failure_error(
                        e,
                        "AzureKeyVaultKeyAccessFailed",
                    ));
                }
                Err(_) => continue,
            };
            db.doc["state"] = json!({"status": ONLINE});
            // Back after the heal window (revalidated): as in Azure, its tags and its
            // point-in-time restore history are lost (its geo-replication link already went
            // when it became inaccessible).
            let late = !within;
            if late {
                db.doc["tags"] = Value::Null;
            }
            self.put_db_doc(server, &db).await?;
            if late {
                let dropped = self.drop_backup_history(server, &db).await?;
                tracing::info!(database = %db.name, backups = dropped, "settings reset after a late revalidate");
            }
            self.remember_open(server, &db, opened).await;
            self.host
                .append_activity(
                    &id_of_body(server),
                    &json!({"operationName": "MakeDatabaseAccessible", "status": "Succeeded",
                        "eventTimestamp": kagi_core::time::rfc3339(now),
                        "resourceId": format!("{}/databases/{}", id_of_body(server), db.name),
                        "message": format!("Database '{}' is accessible again{}.", db.name,
                            if late {
                                " (revalidated after the heal window: its tags and point-in-time \
                                 restore history are reset)"
                            } else if revalidated { " (revalidated)" } else { "" })}),
                )
                .await?;
            tracing::info!(database = %db.name, "database accessible again");
            n += 1;
        }
        Ok(n)
    }
}

/// Azure's 404 for database `name` of `server`.
fn no_such_database(server: &Value, name: &str) -> KvError {
    KvError::new(
        ErrorCode::ResourceNotFound,
        format!(
            "The database '{}/{name}' was not found.",
            server["name"].as_str().unwrap_or_default()
        ),
    )
    .with_inner("DatabaseDoesNotExist")
}

/// The refusal of anything but drop on an inaccessible database.
fn inaccessible_error(server: &Value, db: &Database) -> KvError {
    KvError::conflict(format!(
        "The database '{}' on server '{}' is inaccessible because its TDE protector cannot be \
         reached ({}); only dropping it is allowed until the key is back.",
        db.name,
        server["name"].as_str().unwrap_or_default(),
        db.doc["state"]["reason"]
            .as_str()
            .unwrap_or("unknown reason")
    ))
    .with_inner("DatabaseInaccessible")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_ids() {
        assert!(check_db_name("sales").is_ok());
        assert!(check_db_name("master").is_err());
        assert!(check_db_name("a/b").is_err());
        assert!(check_db_name("x.").is_err());
        let g = new_guid().unwrap();
        assert_eq!(g.len(), 36);
        assert_eq!(&g[14..15], "4");
        let m = unavailable_message("db1", "srv1");
        assert!(m.starts_with("Database 'db1' on server 'srv1' is not currently available."));
    }
}
