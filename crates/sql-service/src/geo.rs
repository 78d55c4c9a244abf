//! Geo-replication (TD-7; docs/SQL.md, "Geo-replication"): a readable secondary of a database on
//! another logical server, kept current by shipping the primary's write-ahead log as it is
//! (ciphertext) and writing it into the secondary's log at the same offsets.
//!
//! The secondary holds the primary's pages: the same DEK and page id, its DEK wrapped under its
//! own server's protector. Creating it needs the primary's protector on the secondary's server
//! (the same key material, reachable by that server's identity). Sessions on a secondary read
//! only. A planned failover ships everything committed under the primary's write lock, swaps the
//! roles and seeds the old primary again from the new one; a forced failover swaps at once. A
//! database that becomes inaccessible, or is dropped, leaves its link: its partner stands alone.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kagi_core::{ErrorCode, KvError};
use kagi_host::Principal;
use kagi_sqlite_crypt::DatabaseKey;
use serde_json::{Value, json};

use crate::backup_chain::Cursor;
use crate::backup_files::{FileError, Pass, Tail, io};
use crate::databases::{DATABASE_DOC, Database, check_db_name, new_guid};
use crate::keys::internal;
use crate::protector::Protector;
use crate::replica_files::{self, Applied};
use crate::{SERVER_TYPE, SqlService, bad, id_of_body, server_ref};

/// The role of the database that takes writes.
const PRIMARY: &str = "Primary";
/// The role of the database that replication writes.
const SECONDARY: &str = crate::databases::GEO_SECONDARY;
/// Azure's replication state of a secondary being copied whole.
const SEEDING: &str = crate::databases::GEO_SEEDING;
/// Azure's replication state of a secondary that follows its primary's log.
const CATCH_UP: &str = "CATCH_UP";
/// How long a link waits for its partner database's lock before leaving the partner to notice
/// at its next tick (two links breaking at once would otherwise wait for each other).
const PARTNER_WAIT: Duration = Duration::from_secs(5);

/// One side of a link, as a database's document keeps it (`geo`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Link {
    /// The link's id (a GUID, the same on both sides).
    pub(crate) id: String,
    /// `Primary` or `Secondary`.
    pub(crate) role: String,
    /// The partner's server (resource id).
    pub(crate) partner_server_id: String,
    /// The partner database's name (the same name).
    pub(crate) partner_database: String,
    /// When the link was made (platform clock).
    pub(crate) start: i64,
    /// A secondary's state: `SEEDING` or `CATCH_UP`.
    pub(crate) state: Option<String>,
    /// Whether the secondary has ever held the database's data (seeded once, or a primary
    /// before a failover): a secondary being seeded again is not an empty one.
    pub(crate) seeded: bool,
}

impl Link {
    /// The link of `db`, if it has one.
    pub(crate) fn of(db: &Database) -> Option<Link> {
        let g = &db.doc["geo"];
        Some(Link {
            id: g["linkId"].as_str()?.to_string(),
            role: g["role"].as_str()?.to_string(),
            partner_server_id: g["partnerServerId"].as_str()?.to_string(),
            partner_database: g["partnerDatabase"].as_str()?.to_string(),
            start: g["startTime"].as_i64().unwrap_or(0),
            state: g["replicationState"].as_str().map(str::to_string),
            seeded: g["seeded"].as_bool().unwrap_or(false),
        })
    }

    fn to_json(&self) -> Value {
        json!({"linkId": self.id, "role": self.role, "partnerServerId": self.partner_server_id,
            "partnerDatabase": self.partner_database, "startTime": self.start,
            "replicationState": self.state, "seeded": self.seeded})
    }

    fn is_secondary(&self) -> bool {
        self.role == SECONDARY
    }

    /// A secondary that was never seeded: it holds no data.
    pub(crate) fn is_unseeded_secondary(&self) -> bool {
        self.is_secondary() && !self.seeded
    }
}

/// Where one link's shipping stands, in memory. After a start it is found again from the
/// secondary's log (and the primary's snapshot is taken anew).
#[derive(Default)]
struct LinkRun {
    /// Whether `cursor` was found (from the secondary's log, or by shipping).
    known: bool,
    /// The primary's pass, its snapshot pinned at the end of what is shipped: no checkpoint
    /// can pass it, and the primary's log cannot restart over a frame not shipped.
    pass: Option<Pass>,
    /// The last frame shipped.
    cursor: Option<Cursor>,
    /// The next file number in the spool.
    next_seq: u64,
    /// When (platform clock) the secondary last had everything the primary had committed.
    caught_up: Option<i64>,
}

/// The links' shipping, by link id: `None` while a task works on it.
#[derive(Default)]
pub(crate) struct GeoState {
    runs: Mutex<HashMap<String, Option<LinkRun>>>,
}

impl std::fmt::Debug for GeoState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GeoState").finish_non_exhaustive()
    }
}

impl GeoState {
    fn runs(&self) -> std::sync::MutexGuard<'_, HashMap<String, Option<LinkRun>>> {
        self.runs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Takes link `id`'s run to work on it (a new one if it has none); `None` while another task
    /// has it.
    fn take(&self, id: &str) -> Option<LinkRun> {
        let mut runs = self.runs();
        match runs.get_mut(id) {
            Some(slot) => slot.take(),
            None => {
                runs.insert(id.to_string(), None);
                Some(LinkRun::default())
            }
        }
    }

    /// Gives back a run taken with [`GeoState::take`] (unless the link went meanwhile).
    fn give_back(&self, id: &str, run: LinkRun) {
        if let Some(slot) = self.runs().get_mut(id) {
            *slot = Some(run);
        }
    }

    fn forget(&self, id: &str) {
        self.runs().remove(id);
    }

    /// Takes link `id`'s run, waiting (at most ten seconds) for a task working on it.
    async fn take_waiting(&self, id: &str) -> Option<LinkRun> {
        for _ in 0..100 {
            if let Some(run) = self.take(id) {
                return Some(run);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        None
    }

    fn caught_up(&self, id: &str) -> Option<i64> {
        self.runs()
            .get(id)
            .and_then(|r| r.as_ref())
            .and_then(|r| r.caught_up)
    }
}

/// `/subscriptions/{s}/resourceGroups/{rg}/providers/Microsoft.Sql/servers/{srv}/databases/{db}`.
pub(crate) fn parse_database_id(id: &str) -> Option<(&str, &str, &str, &str)> {
    let parts: Vec<&str> = id.trim_matches('/').split('/').collect();
    match parts.as_slice() {
        [s, sub, g, rg, p, ns, t, srv, d, db]
            if s.eq_ignore_ascii_case("subscriptions")
                && g.eq_ignore_ascii_case("resourceGroups")
                && p.eq_ignore_ascii_case("providers")
                && ns.eq_ignore_ascii_case("Microsoft.Sql")
                && t.eq_ignore_ascii_case("servers")
                && d.eq_ignore_ascii_case("databases") =>
        {
            Some((sub, rg, srv, db))
        }
        _ => None,
    }
}

/// The name of the server `id` names (its last segment).
fn name_of(id: &str) -> &str {
    id.rsplit('/').next().unwrap_or(id)
}

/// The refusal to replicate a database with a key of its own (database-level CMK).
fn own_key_refused(name: &str) -> KvError {
    bad(
        "GeoReplicationOfDatabaseKeyNotSupported",
        format!(
            "The database '{name}' has a key of its own (database-level CMK): kagi replicates \
             databases under their server's protector only; revert it first."
        ),
    )
}

fn link_not_found(name: &str, link: &str) -> KvError {
    KvError::new(
        ErrorCode::ResourceNotFound,
        format!("The replication link '{link}' of database '{name}' was not found."),
    )
    .with_inner("ReplicationLinkNotFound")
}

impl SqlService {
    /// The spool directory of link `id`: the primary's shipped log, until the secondary has it.
    fn geo_spool(&self, id: &str) -> PathBuf {
        self.host
            .config()
            .data_dir
            .join("sql-geo")
            .join(id.to_ascii_lowercase())
    }

    /// The server of resource id `id`.
    fn server_by_id(&self, id: &str) -> Option<Value> {
        self.host.resource(id).filter(|s| {
            s["type"]
                .as_str()
                .is_none_or(|t| t.eq_ignore_ascii_case(SERVER_TYPE))
        })
    }

    /// `PUT {server}/databases/{name}` with `createMode: Secondary`: a geo-secondary of
    /// `sourceDatabaseId` (the caller holds the new database's lock).
    pub(crate) async fn create_secondary(
        self: &Arc<Self>,
        caller: &Principal,
        server: &Value,
        name: &str,
        input: &Value,
    ) -> Result<(u16, Value), KvError> {
        check_db_name(name)?;
        let props = &input["properties"];
        let source = props["sourceDatabaseId"].as_str().ok_or_else(|| {
            bad(
                "InvalidSourceDatabaseId",
                "createMode 'Secondary' needs properties.sourceDatabaseId: the resource id of the \
                 primary database.",
            )
        })?;
        let (sub, rg, srv, db_name) = parse_database_id(source).ok_or_else(|| {
            bad(
                "InvalidSourceDatabaseId",
                format!("'{source}' is not the resource id of a database of Microsoft.Sql."),
            )
        })?;
        if let Some(t) = props["secondaryType"].as_str()
            && !t.eq_ignore_ascii_case("Geo")
        {
            return Err(bad(
                "InvalidSecondaryType",
                format!("secondaryType '{t}' is not served: kagi makes 'Geo' secondaries."),
            ));
        }
        if !db_name.eq_ignore_ascii_case(name) {
            return Err(bad(
                "InvalidSecondaryDatabaseName",
                format!("A geo-secondary has the name of its primary: '{db_name}', not '{name}'."),
            ));
        }
        // The caller must see the primary's server.
        let pserver = self
            .host
            .get_resource(caller, server_ref(sub, rg, srv))
            .map_err(|_| {
                KvError::new(
                    ErrorCode::ResourceNotFound,
                    format!("The source database '{source}' was not found."),
                )
                .with_inner("SourceDatabaseNotFound")
            })?;
        let (server_id, pserver_id) = (id_of_body(server), id_of_body(&pserver));
        if server_id.eq_ignore_ascii_case(&pserver_id) {
            return Err(bad(
                "InvalidSecondaryServer",
                "A geo-secondary is on another server than its primary.",
            ));
        }
        self.check_same_home("A geo-secondary", server, &pserver)
            .await?;
        let _pg = self.db_lock(&pserver, db_name).await;
        let mut pdb = self.database(&pserver, db_name).await.map_err(|e| {
            if e.code == ErrorCode::ResourceNotFound {
                KvError::new(
                    ErrorCode::ResourceNotFound,
                    format!("The source database '{source}' was not found."),
                )
                .with_inner("SourceDatabaseNotFound")
            } else {
                e
            }
        })?;
        if pdb.inaccessible() {
            return Err(KvError::conflict(format!(
                "The database '{}' is inaccessible: it cannot be replicated until its key is back.",
                pdb.name
            ))
            .with_inner("DatabaseInaccessible"));
        }
        if Link::of(&pdb).is_some() {
            return Err(KvError::conflict(format!(
                "The database '{}' is already in a geo-replication link (kagi keeps one \
                 geo-secondary per database, and a secondary has none of its own).",
                pdb.name
            ))
            .with_inner("GeoReplicationLinkExists"));
        }
        if pdb.has_own_key() {
            return Err(own_key_refused(&pdb.name));
        }
        let popen = self.open_db(&pserver, &pdb).await?;
        let pprot = self.protector(&pserver).await?;
        if let Some(kid) = &pprot.kid {
            self.check_same_key_material(server, &pserver, &pdb, kid)
                .await?;
        }
        let now = self.host.now();
        let (database_id, link_id) = (new_guid()?, new_guid()?);
        let link = Link {
            id: link_id.clone(),
            role: SECONDARY.into(),
            partner_server_id: pserver_id.clone(),
            partner_database: pdb.name.clone(),
            start: now,
            state: Some(SEEDING.into()),
            seeded: false,
        };
        let doc = json!({
            "name": pdb.name,
            "databaseId": database_id,
            "pageId": pdb.page_id,
            "creationDate": kagi_core::time::rfc3339(now),
            "collation": pdb.doc["collation"],
            "maxSizeBytes": pdb.doc["maxSizeBytes"],
            "sku": input.get("sku").cloned().unwrap_or_else(|| pdb.doc["sku"].clone()),
            "tags": input.get("tags").cloned().unwrap_or(Value::Null),
            "state": {"status": crate::databases::ONLINE},
            "geo": link.to_json(),
        });
        let sdb = Database {
            name: pdb.name.clone(),
            database_id: database_id.clone(),
            page_id: pdb.page_id.clone(),
            doc,
        };
        let _gate = self.server_gate(&server_id).await;
        // The primary's DEK (from memory), wrapped under this server's protector.
        let protector = self.protector(server).await?;
        let kek = self.kek(server, &protector).await?;
        let owner = self.db_keys(server, &sdb);
        let record = self
            .keys
            .wrap(&owner, &kek, &popen.dek, now)
            .await
            .map_err(|e| kagi_cmk::key_failure_error(e, "AzureKeyVaultKeyAccessFailed"))?;
        kagi_cmk::KeyOwner::add_wrapped_key(&owner, record).await?;
        let made = async {
            self.put_db_doc(server, &sdb).await?;
            pdb.doc["geo"] = Link {
                id: link_id.clone(),
                role: PRIMARY.into(),
                partner_server_id: server_id.clone(),
                partner_database: sdb.name.clone(),
                start: now,
                state: None,
                seeded: true,
            }
            .to_json();
            self.put_db_doc(&pserver, &pdb).await
        }
        .await;
        if let Err(e) = made {
            let _ = self
                .host
                .delete_document(&server_id, DATABASE_DOC, &sdb.name.to_ascii_lowercase())
                .await;
            let _ = owner.delete().await;
            return Err(e);
        }
        for (at, msg) in [
            (
                &server_id,
                format!("Geo-secondary '{}' of {source} created.", sdb.name),
            ),
            (
                &pserver_id,
                format!(
                    "Database '{}' replicated to server '{}'.",
                    pdb.name,
                    name_of(&server_id)
                ),
            ),
        ] {
            self.link_activity(
                at,
                &sdb.name,
                "Microsoft.Sql/servers/databases/replicationLinks/write",
                &msg,
            )
            .await;
        }
        tracing::info!(database = %sdb.name, link = %link_id, "geo-secondary created");
        Ok((201, self.db_view(server, &sdb)))
    }

    async fn link_activity(&self, server_id: &str, db: &str, op: &str, message: &str) {
        let entry = json!({"operationName": op, "status": "Succeeded",
            "eventTimestamp": kagi_core::time::rfc3339(self.host.now()),
            "resourceId": format!("{server_id}/databases/{db}"), "message": message});
        if let Err(e) = self.host.append_activity(server_id, &entry).await {
            tracing::warn!(error = %e.message, "activity not recorded");
        }
    }

    /// The secondary's server must have the primary's protector among its keys, and its
    /// identity must open the primary's DEK with it: Azure's rule that both ends reach the
    /// same key material.
    async fn check_same_key_material(
        &self,
        server: &Value,
        pserver: &Value,
        pdb: &Database,
        kid: &str,
    ) -> Result<(), KvError> {
        let missing = |why: String| {
            bad(
                "SameKeyMaterialNotFoundOnRemoteServer",
                format!(
                    "The TDE protector of server '{}' is the key '{kid}', which server '{}' \
                     cannot use: {why}. Add the key to the server's keys, with access for the \
                     server's identity, first.",
                    pserver["name"].as_str().unwrap_or_default(),
                    server["name"].as_str().unwrap_or_default(),
                ),
            )
        };
        let uri = self.keys.parse(kid)?;
        let name = crate::protector::key_name(&uri);
        if self.get_server_key(server, &name).await.is_err() {
            return Err(missing(format!("it has no server key '{name}'")));
        }
        let here = Protector {
            server_key_name: name,
            kid: Some(kid.to_string()),
            auto_rotation: false,
            database: None,
        };
        let kek = self.kek(server, &here).await?;
        let owner = self.db_keys(pserver, pdb);
        let records = kagi_cmk::KeyOwner::wrapped_keys(&owner).await?;
        let record = records
            .iter()
            .filter(|r| r.kek.id().eq_ignore_ascii_case(kid))
            .max_by_key(|r| r.created)
            .ok_or_else(|| missing("the primary's key records name another key".into()))?;
        self.keys
            .unwrap(&owner, &kek, record, self.host.now())
            .await
            .map(|_| ())
            .map_err(|e| missing(kagi_cmk::key_failure_error(e, "x").message))
    }

    /// Removes `db`'s link from its document (the caller holds `db`'s lock and stores the
    /// document) and from its partner's: the partner stands alone (read-write), or, a secondary
    /// never seeded, is dropped. Returns the link left.
    pub(crate) async fn leave_link(
        &self,
        server: &Value,
        db: &mut Database,
        reason: &str,
    ) -> Result<Option<Link>, KvError> {
        let Some(link) = Link::of(db) else {
            return Ok(None);
        };
        let _ = db.doc.as_object_mut().map(|o| o.remove("geo"));
        // A pass shipping or seeding now finishes first (its run is taken, then dropped with
        // the primary's snapshot).
        let run = self.geo.take_waiting(&link.id).await;
        self.geo.forget(&link.id);
        drop(run);
        let spool = self.geo_spool(&link.id);
        let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(spool)).await;
        if link.is_secondary() {
            // Read-write from its next session.
            self.end_sessions(
                &db.database_id,
                "terminating connection: the geo-replication link was removed",
            );
        }
        let server_id = id_of_body(server);
        self.link_activity(
            &server_id,
            &db.name,
            "Microsoft.Sql/servers/databases/replicationLinks/delete",
            &format!("Geo-replication link of '{}' removed: {reason}.", db.name),
        )
        .await;
        if let Some(pserver) = self.server_by_id(&link.partner_server_id) {
            let lock =
                tokio::time::timeout(PARTNER_WAIT, self.db_lock(&pserver, &link.partner_database))
                    .await;
            // Not had: the partner drops its side at its next tick.
            if let Ok(_g) = lock
                && let Ok(mut partner) = self.database(&pserver, &link.partner_database).await
                && let Some(theirs) = Link::of(&partner).filter(|l| l.id == link.id)
            {
                let _ = partner.doc.as_object_mut().map(|o| o.remove("geo"));
                if theirs.is_unseeded_secondary() {
                    let _gate = self.server_gate(&id_of_body(&pserver)).await;
                    self.drop_database(&pserver, &partner).await?;
                } else {
                    self.put_db_doc(&pserver, &partner).await?;
                    if theirs.is_secondary() {
                        self.end_sessions(
                            &partner.database_id,
                            "terminating connection: the geo-replication link was removed",
                        );
                    }
                }
                self.link_activity(
                    &id_of_body(&pserver),
                    &partner.name,
                    "Microsoft.Sql/servers/databases/replicationLinks/delete",
                    &format!(
                        "Geo-replication link of '{}' removed: on server '{}', {reason}.",
                        partner.name,
                        name_of(&server_id)
                    ),
                )
                .await;
            }
        }
        tracing::info!(database = %db.name, link = %link.id, reason, "geo-replication link left");
        Ok(Some(link))
    }

    /// [`SqlService::leave_link`], then `db`'s document stored, or, a secondary never seeded,
    /// `db` dropped (the caller holds `db`'s lock).
    async fn leave_link_and_store(
        &self,
        server: &Value,
        db: &mut Database,
        reason: &str,
    ) -> Result<(), KvError> {
        let left = self.leave_link(server, db, reason).await?;
        if left.is_some_and(|l| l.is_unseeded_secondary()) {
            let _gate = self.server_gate(&id_of_body(server)).await;
            self.drop_database(server, db).await
        } else {
            self.put_db_doc(server, db).await
        }
    }

    /// One pass of geo-replication over every link: each primary's new frames shipped and
    /// applied; links whose partner is gone are left. Failures are logged and tried again.
    pub async fn geo_pass(self: &Arc<Self>) {
        let mut known = std::collections::HashSet::new();
        let mut listed_all = true;
        for server in self.local_servers().await {
            let Ok(dbs) = self.databases_of(&server).await else {
                listed_all = false;
                continue;
            };
            for db in dbs {
                let Some(link) = Link::of(&db) else { continue };
                known.insert(link.id.to_ascii_lowercase());
                let r = if link.is_secondary() {
                    self.partner_links_back(&server, &db, &link)
                        .await
                        .map(|_| ())
                } else {
                    self.tick_link(&server, &db, &link).await
                };
                if let Err(e) = r {
                    tracing::warn!(database = %db.name, link = %link.id, error = %e.message,
                        "geo-replication pass failed");
                }
            }
        }
        if listed_all {
            // Spools of links that are gone (left while a pass was shipping).
            let root = self.host.config().data_dir.join("sql-geo");
            let _ = tokio::task::spawn_blocking(move || {
                for e in std::fs::read_dir(root).into_iter().flatten().flatten() {
                    let name = e.file_name().to_string_lossy().to_ascii_lowercase();
                    if !known.contains(&name) {
                        let _ = std::fs::remove_dir_all(e.path());
                    }
                }
            })
            .await;
        }
    }

    /// Whether the partner of `db`'s link still has that link; when it does not, `db` leaves it.
    async fn partner_links_back(
        &self,
        server: &Value,
        db: &Database,
        link: &Link,
    ) -> Result<Option<(Value, Database)>, KvError> {
        let partner = match self.server_by_id(&link.partner_server_id) {
            Some(s) => match self.database(&s, &link.partner_database).await {
                Ok(d) if Link::of(&d).is_some_and(|l| l.id == link.id) => Some((s, d)),
                Ok(_) => None,
                Err(e) if e.code == ErrorCode::ResourceNotFound => None,
                Err(e) => return Err(e),
            },
            None => None,
        };
        if partner.is_none() {
            let _g = self.db_lock(server, &db.name).await;
            let mut now = self.database(server, &db.name).await?;
            if Link::of(&now).is_some_and(|l| l.id == link.id) {
                self.leave_link_and_store(server, &mut now, "its partner is gone")
                    .await?;
            }
        }
        Ok(partner)
    }

    /// Ships what primary `pdb` committed since the last tick and applies it to the secondary.
    async fn tick_link(
        self: &Arc<Self>,
        pserver: &Value,
        pdb: &Database,
        link: &Link,
    ) -> Result<(), KvError> {
        let Some((sserver, sdb)) = self.partner_links_back(pserver, pdb, link).await? else {
            return Ok(());
        };
        if pdb.inaccessible() || sdb.inaccessible() {
            // The keeper makes the inaccessible one leave; nothing to ship meanwhile.
            return Ok(());
        }
        let Some(popen) = self.open_entry(&pdb.database_id) else {
            return Ok(());
        };
        let sopen = self.open_db(&sserver, &sdb).await?;
        let Some(mut run) = self.geo.take(&link.id) else {
            return Ok(());
        };
        let (pkey, skey) = (popen.page_key()?, sopen.page_key()?);
        let (pfile, replica) = (popen.file.clone(), sopen.file.clone());
        let spool = self.geo_spool(&link.id);
        let host = self.host.clone();
        let seeding = sdb.is_seeding();
        let worked = tokio::task::spawn_blocking(move || {
            let r = (|| -> Result<(Applied, Option<i64>), FileError> {
                std::fs::create_dir_all(&spool).map_err(io(&spool))?;
                // What is in the spool goes first: the secondary takes the log in order. A seed
                // only while the secondary is marked as being seeded (no session opens it).
                let before = replica_files::apply_spool(&replica, &skey, &spool, seeding)?;
                if before.pending {
                    return Ok((before, None));
                }
                if !run.known {
                    run.cursor = if seeding {
                        None
                    } else {
                        replica_files::replica_cursor(&replica, &skey)?
                    };
                    run.next_seq = 1;
                    run.known = true;
                }
                let clock = || host.now();
                let shipped = replica_files::ship(
                    (&pfile, &pkey),
                    &mut run.pass,
                    run.cursor,
                    &clock,
                    &spool,
                    run.next_seq,
                )?;
                if shipped.seeded {
                    tracing::info!(replica = %replica.display(), "geo-replication: a seed shipped");
                }
                run.pass = Some(shipped.pass);
                run.cursor = shipped.cursor;
                run.next_seq = shipped.next_seq;
                let mut after = replica_files::apply_spool(&replica, &skey, &spool, seeding)?;
                after.seeded |= before.seeded;
                Ok((after, (!after.pending).then_some(shipped.taken)))
            })();
            (run, r)
        })
        .await
        .map_err(|e| internal("geo-replication", e))?;
        let (mut run, result) = worked;
        let outcome = match result {
            Ok((applied, caught_up)) => {
                if caught_up.is_some() {
                    run.caught_up = caught_up;
                }
                Ok(applied)
            }
            // A busy primary or secondary: tried again at the next tick, where it stands (the
            // primary's snapshot still holds the log).
            Err(FileError::Busy) => Ok(Applied::default()),
            Err(FileError::Damaged(why)) => {
                // The secondary cannot follow (its log is not the primary's, or a shipped file
                // does not continue it): a new seed mends it. The spool goes, the snapshot goes
                // with the run, and shipping starts again from a full copy.
                tracing::warn!(database = %sdb.name, link = %link.id, why, "geo-secondary needs a new seed");
                let s = self.geo_spool(&link.id);
                let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(s)).await;
                run = LinkRun {
                    known: true,
                    next_seq: 1,
                    ..LinkRun::default()
                };
                Ok(Applied {
                    seed_pending: true,
                    pending: true,
                    ..Applied::default()
                })
            }
            Err(e) => {
                // Found again from the secondary's log next time (a new seed if need be).
                run = LinkRun::default();
                Err(e)
            }
        };
        self.geo.give_back(&link.id, run);
        let applied = outcome.map_err(|e| internal("geo-replication", e))?;
        if applied.seed_pending && !seeding {
            // A new seed replaces the secondary's files: its sessions end first.
            self.set_replication_state(&sserver, &sdb.name, &link.id, SEEDING)
                .await?;
            self.end_sessions(
                &sdb.database_id,
                "terminating connection: the geo-secondary is being seeded again",
            );
        } else if applied.seed_pending {
            self.end_sessions(
                &sdb.database_id,
                "terminating connection: the geo-secondary is being seeded",
            );
        }
        if applied.seeded && !applied.seed_pending {
            self.set_replication_state(&sserver, &sdb.name, &link.id, CATCH_UP)
                .await?;
            tracing::info!(database = %sdb.name, link = %link.id, "geo-secondary seeded");
        }
        Ok(())
    }

    /// Sets a secondary's replication state.
    async fn set_replication_state(
        &self,
        server: &Value,
        name: &str,
        link: &str,
        state: &str,
    ) -> Result<(), KvError> {
        let _g = self.db_lock(server, name).await;
        let mut db = self.database(server, name).await?;
        if db.doc["geo"]["linkId"].as_str() != Some(link)
            || db.doc["geo"]["replicationState"].as_str() == Some(state)
        {
            return Ok(());
        }
        db.doc["geo"]["replicationState"] = json!(state);
        if state == CATCH_UP {
            db.doc["geo"]["seeded"] = json!(true);
        }
        self.put_db_doc(server, &db).await
    }

    /// The hook a backup pass's second stage calls under the primary's write lock (see
    /// [`crate::backup_files::finish_tail`]): the link catches up with the log's end before the
    /// checkpoint, and moves its snapshot past the checkpoint after it, so that the log can
    /// restart under steady writes. `None` when `db` is no primary or its link is busy.
    pub(crate) async fn tail_hook(&self, server: &Value, db: &Database) -> Option<TailHook> {
        let link = Link::of(db).filter(|l| !l.is_secondary())?;
        let sserver = self.server_by_id(&link.partner_server_id)?;
        let sdb = self
            .database(&sserver, &link.partner_database)
            .await
            .ok()
            .filter(|d| Link::of(d).is_some_and(|l| l.id == link.id) && !d.is_seeding())?;
        let sopen = self.open_entry(&sdb.database_id)?;
        let skey = sopen.page_key().ok()?;
        let _ = server;
        let run = self.geo.take(&link.id)?;
        Some(TailHook {
            geo: self.geo.clone(),
            link: link.id.clone(),
            run: Some(run),
            spool: self.geo_spool(&link.id),
            replica: sopen.file.clone(),
            key: skey,
            failed: false,
        })
    }

    /// `GET {server}/databases/{db}/replicationLinks[/{id}]`.
    pub(crate) async fn list_links(
        &self,
        server: &Value,
        name: &str,
        id: Option<&str>,
    ) -> Result<Value, KvError> {
        let db = self.database(server, name).await?;
        let link = Link::of(&db);
        if let Some(id) = id {
            let link = link
                .filter(|l| l.id.eq_ignore_ascii_case(id))
                .ok_or_else(|| link_not_found(name, id))?;
            return Ok(self.link_view(server, &db, &link).await);
        }
        let mut value = Vec::new();
        if let Some(l) = link {
            value.push(self.link_view(server, &db, &l).await);
        }
        Ok(json!({ "value": value }))
    }

    async fn link_view(&self, server: &Value, db: &Database, link: &Link) -> Value {
        let partner_server = self.server_by_id(&link.partner_server_id);
        let partner = match &partner_server {
            Some(s) => self.database(s, &link.partner_database).await.ok(),
            None => None,
        };
        let secondary_state = if link.is_secondary() {
            link.state.clone()
        } else {
            partner.as_ref().and_then(Link::of).and_then(|l| l.state)
        };
        let now = self.host.now();
        let caught_up = self.geo.caught_up(&link.id);
        let (partner_role, role) = if link.is_secondary() {
            (PRIMARY, SECONDARY)
        } else {
            (SECONDARY, PRIMARY)
        };
        let seeding = secondary_state.as_deref() == Some(SEEDING);
        json!({
            "id": format!("{}/databases/{}/replicationLinks/{}", id_of_body(server), db.name, link.id),
            "name": link.id,
            "type": "Microsoft.Sql/servers/databases/replicationLinks",
            "properties": {
                "partnerServer": name_of(&link.partner_server_id),
                "partnerDatabase": link.partner_database,
                "partnerDatabaseId": partner.as_ref().map(|p| p.database_id.clone()),
                "partnerLocation": partner_server.as_ref().map(|s| s["location"].clone()),
                "role": role,
                "partnerRole": partner_role,
                "replicationMode": "ASYNC",
                "startTime": kagi_core::time::rfc3339(link.start),
                "percentComplete": if seeding { 0 } else { 100 },
                "replicationState": secondary_state,
                "isTerminationAllowed": true,
                "linkType": "GEO",
                "lastReplicatedTime": caught_up.map(kagi_core::time::rfc3339),
                "replicationLagSeconds": caught_up.map(|t| (now - t).max(0)),
            },
        })
    }

    /// `DELETE {server}/databases/{db}/replicationLinks/{id}`: both databases stand alone (a
    /// secondary never seeded is dropped).
    pub(crate) async fn delete_link(
        &self,
        server: &Value,
        name: &str,
        id: &str,
    ) -> Result<(u16, Value), KvError> {
        let _g = self.db_lock(server, name).await;
        let mut db = self.database(server, name).await?;
        if !Link::of(&db).is_some_and(|l| l.id.eq_ignore_ascii_case(id)) {
            return Ok((204, Value::Null));
        }
        self.leave_link_and_store(server, &mut db, "the link was deleted")
            .await?;
        Ok((200, Value::Null))
    }

    /// `POST {server}/databases/{db}/replicationLinks/{id}/failover` (on the secondary; with
    /// `force`, `forceFailoverAllowDataLoss`): the secondary becomes the primary. A planned
    /// failover first ships and applies everything the primary committed, under its write lock,
    /// so nothing is lost; a forced one swaps at once. The old primary is then seeded again
    /// from the new one, and is a readable secondary once seeded.
    pub(crate) async fn failover(
        self: &Arc<Self>,
        server: &Value,
        name: &str,
        id: &str,
        force: bool,
    ) -> Result<(u16, Value), KvError> {
        let _sg = self.db_lock(server, name).await;
        let mut sdb = self.database(server, name).await?;
        let link = Link::of(&sdb)
            .filter(|l| l.id.eq_ignore_ascii_case(id))
            .ok_or_else(|| link_not_found(name, id))?;
        if !link.is_secondary() {
            // Already the primary: nothing to do, as in Azure.
            return Ok((200, self.link_view(server, &sdb, &link).await));
        }
        if let Some(pserver) = self.server_by_id(&link.partner_server_id) {
            self.check_same_home("A failover", server, &pserver).await?;
        }
        if sdb.is_seeding() {
            return Err(KvError::conflict(format!(
                "The geo-secondary '{name}' is still being seeded: it can take over once it has \
                 caught up."
            ))
            .with_inner("ReplicationLinkSeeding"));
        }
        if sdb.inaccessible() {
            return Err(KvError::conflict(format!(
                "The geo-secondary '{name}' is inaccessible: it cannot take over."
            ))
            .with_inner("DatabaseInaccessible"));
        }
        let pserver = self.server_by_id(&link.partner_server_id).ok_or_else(|| {
            KvError::conflict("The primary's server is gone: remove the link instead.")
                .with_inner("ReplicationLinkBroken")
        })?;
        let _pg = self.db_lock(&pserver, &link.partner_database).await;
        let mut pdb = self.database(&pserver, &link.partner_database).await?;
        if Link::of(&pdb).is_none_or(|l| l.id != link.id) {
            return Err(KvError::conflict("The primary has left the link.")
                .with_inner("ReplicationLinkBroken"));
        }
        let sopen = self.open_db(server, &sdb).await?;
        let skey = sopen.page_key()?;
        let replica = sopen.file.clone();
        // The new primary's live log starts a lineage of its own before it takes a commit.
        let takeover = self.server_takeover(&id_of_body(server)).await?;
        self.start_live_lineage_fence(&sdb.database_id, takeover)
            .await;
        let spool = self.geo_spool(&link.id);
        // The link's run (and the primary's snapshot it holds) goes: a new one seeds the old
        // primary from the new one. A pass working on it gives it back within moments.
        let Some(old_run) = self.geo.take_waiting(&link.id).await else {
            return Err(KvError::conflict(
                "The link is busy shipping the primary's log; try again.",
            )
            .with_inner("DatabaseBusy"));
        };
        if !force {
            if pdb.inaccessible() {
                return Err(KvError::conflict(
                    "The primary is inaccessible: only a forced failover \
                     (forceFailoverAllowDataLoss) can make the secondary take over.",
                )
                .with_inner("DatabaseInaccessible"));
            }
            if pdb.has_own_key() {
                return Err(own_key_refused(&pdb.name));
            }
            let popen = self.open_db(&pserver, &pdb).await?;
            let pkey = popen.page_key()?;
            let pfile = popen.file.clone();
            let primary_file = pfile.clone();
            // The primary's sessions end; from the write lock on, nothing more commits there.
            self.end_sessions(
                &pdb.database_id,
                "terminating connection: the database is failing over",
            );
            let mut run = old_run;
            let spool2 = spool.clone();
            let replica2 = replica.clone();
            let shipped = tokio::task::spawn_blocking(move || {
                let mut pass = Pass::open(&pfile, &pkey)?;
                pass.lock(false)?;
                std::fs::create_dir_all(&spool2).map_err(io(&spool2))?;
                let pending = replica_files::apply_spool(&replica2, &skey, &spool2, false)?;
                if pending.pending {
                    return Err(FileError::Busy);
                }
                if !run.known {
                    run.cursor = replica_files::replica_cursor(&replica2, &skey)?;
                }
                let cursor = run.cursor.ok_or_else(|| {
                    FileError::Damaged("nothing was shipped to the secondary yet".into())
                })?;
                let seq = run.next_seq.max(1);
                if replica_files::catch_up(&mut pass, cursor, &spool2, seq)?.is_none() {
                    return Err(FileError::Damaged(
                        "the primary's log does not continue what the secondary has".into(),
                    ));
                }
                // Readers of the secondary in an old generation get a moment (the primary's
                // writers wait meanwhile).
                for _ in 0..2 {
                    let a = replica_files::apply_spool(&replica2, &skey, &spool2, false)?;
                    if !a.pending {
                        return Ok(pass);
                    }
                }
                Err(FileError::Busy)
            })
            .await
            .map_err(|e| internal("a failover", e));
            let pass = match shipped {
                Ok(Ok(pass)) => pass,
                Ok(Err(e)) => {
                    self.geo.give_back(&link.id, LinkRun::default());
                    return Err(match e {
                        FileError::Busy => KvError::new(
                            ErrorCode::ServiceUnavailable,
                            "The primary or the secondary stayed busy during the failover: \
                             nothing changed; try again.",
                        )
                        .with_inner("DatabaseBusy"),
                        FileError::Damaged(why) => KvError::conflict(format!(
                            "The secondary is not ready to take over ({why}); it is seeded \
                             again by the next replication pass: try again once it has caught up."
                        ))
                        .with_inner("ReplicationLinkNotReady"),
                        e => internal("a failover", e),
                    });
                }
                Err(e) => {
                    self.geo.give_back(&link.id, LinkRun::default());
                    return Err(e);
                }
            };
            self.swap_roles(server, &mut sdb, &pserver, &mut pdb, &link)
                .await
                .inspect_err(|_| self.geo.give_back(&link.id, LinkRun::default()))?;
            // Sessions that raced the failover write nowhere: they end again now that the
            // roles are swapped, the key goes, and the old primary's files are replaced by the
            // seed.
            self.end_sessions(
                &pdb.database_id,
                "terminating connection: the database failed over",
            );
            crate::engine::revoke(&primary_file).await;
            let _ = tokio::task::spawn_blocking(move || drop(pass)).await;
        } else {
            drop(old_run);
            let s = spool.clone();
            let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(s)).await;
            self.swap_roles(server, &mut sdb, &pserver, &mut pdb, &link)
                .await
                .inspect_err(|_| self.geo.give_back(&link.id, LinkRun::default()))?;
            self.end_sessions(
                &pdb.database_id,
                "terminating connection: the database failed over",
            );
            crate::engine::revoke(&self.db_file(&pdb.database_id)).await;
        }
        // The new primary's next sessions write; the old primary's backups stop.
        self.end_sessions(
            &sdb.database_id,
            "terminating connection: the database is the primary now",
        );
        self.forget_backup_pin(&pdb.database_id);
        // A new run: nothing shipped, so the first tick seeds the old primary.
        self.geo.give_back(
            &link.id,
            LinkRun {
                known: true,
                next_seq: 1,
                ..LinkRun::default()
            },
        );
        let op = if force {
            "forced failover (data loss allowed)"
        } else {
            "planned failover"
        };
        for (s, db) in [(server, &sdb), (&pserver, &pdb)] {
            self.link_activity(
                &id_of_body(s),
                &db.name,
                "Microsoft.Sql/servers/databases/replicationLinks/failover/action",
                &format!(
                    "Geo-replication {op}: '{}' on server '{}' is the primary now.",
                    sdb.name,
                    server["name"].as_str().unwrap_or_default()
                ),
            )
            .await;
        }
        tracing::info!(database = %sdb.name, link = %link.id, force, "geo-replication failover");
        let now_link = Link::of(&sdb).unwrap_or(link);
        Ok((200, self.link_view(server, &sdb, &now_link).await))
    }

    /// Makes the secondary `sdb` the primary and the primary `pdb` a secondary to be seeded.
    async fn swap_roles(
        &self,
        server: &Value,
        sdb: &mut Database,
        pserver: &Value,
        pdb: &mut Database,
        link: &Link,
    ) -> Result<(), KvError> {
        let now = self.host.now();
        pdb.doc["geo"] = Link {
            id: link.id.clone(),
            role: SECONDARY.into(),
            partner_server_id: id_of_body(server),
            partner_database: sdb.name.clone(),
            start: now,
            state: Some(SEEDING.into()),
            seeded: true,
        }
        .to_json();
        sdb.doc["geo"] = Link {
            id: link.id.clone(),
            role: PRIMARY.into(),
            partner_server_id: id_of_body(pserver),
            partner_database: pdb.name.clone(),
            start: now,
            state: None,
            seeded: true,
        }
        .to_json();
        // The old primary first: were the second write lost, both would be secondaries and
        // nothing would write, rather than two primaries.
        self.put_db_doc(pserver, pdb).await?;
        self.put_db_doc(server, sdb).await
    }
}

/// What a backup pass's second stage runs for the link of the database it backs up (see
/// [`SqlService::tail_hook`]). Gives the link's run back when dropped.
pub(crate) struct TailHook {
    geo: Arc<GeoState>,
    link: String,
    run: Option<LinkRun>,
    spool: PathBuf,
    replica: PathBuf,
    key: DatabaseKey,
    /// The catch-up failed: the link's snapshot stays where shipping stands.
    failed: bool,
}

impl TailHook {
    /// Called by [`crate::backup_files::finish_tail`] under the primary's write lock.
    pub(crate) fn at(&mut self, phase: Tail) {
        let Some(run) = self.run.as_mut() else { return };
        let (Some(pass), Some(cursor)) = (run.pass.as_mut(), run.cursor) else {
            return;
        };
        let r = match phase {
            Tail::BeforeCheckpoint => {
                match replica_files::catch_up(pass, cursor, &self.spool, run.next_seq) {
                    Ok(Some((c, seq))) => {
                        run.cursor = Some(c);
                        run.next_seq = seq;
                        // The secondary takes it now if it can (never a seed here, under the
                        // primary's lock); else the next tick applies it.
                        replica_files::apply_spool(&self.replica, &self.key, &self.spool, false)
                            .map(|_| ())
                    }
                    Ok(None) => {
                        self.failed = true;
                        Ok(())
                    }
                    Err(e) => {
                        // Nothing moved: the snapshot still holds the log where shipping
                        // stands, so the checkpoint cannot pass a frame not shipped.
                        self.failed = true;
                        Err(e)
                    }
                }
            }
            // Only a link that shipped everything lets go of the log.
            Tail::AfterCheckpoint if self.failed => Ok(()),
            Tail::AfterCheckpoint => pass.pin_now(),
        };
        if let Err(e) = r {
            tracing::warn!(link = %self.link, error = %e, "geo-replication catch-up failed");
        }
    }
}

impl Drop for TailHook {
    fn drop(&mut self) {
        if let Some(run) = self.run.take() {
            self.geo.give_back(&self.link, run);
        }
    }
}

/// Starts geo-replication: a pass every [`crate::SqlConfig::geo_interval`].
pub fn spawn_geo(service: Arc<SqlService>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick =
            tokio::time::interval(service.config.geo_interval.max(Duration::from_millis(200)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            service.geo_pass().await;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_ids_parse() {
        let id =
            "/subscriptions/s1/resourceGroups/rg/providers/Microsoft.Sql/servers/a/databases/db";
        assert_eq!(parse_database_id(id), Some(("s1", "rg", "a", "db")));
        assert_eq!(
            parse_database_id("/subscriptions/s1/resourceGroups/rg"),
            None
        );
        assert_eq!(
            parse_database_id(
                "/subscriptions/s1/resourceGroups/rg/providers/Microsoft.Web/servers/a/databases/db"
            ),
            None
        );
        assert_eq!(name_of("/x/servers/abc"), "abc");
    }
}
