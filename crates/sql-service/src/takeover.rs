//! A SQL server whose home is gone, taken over from the bucket (docs/SEVERAL_NODES.md,
//! "SQL servers whose home is gone"). With several nodes on one store and `--blobs s3://…`,
//! every database's backups and live log (`crate::live`) are in the bucket, and every commit
//! was there before it was acknowledged. A request for a server whose home is not running
//! (its presence lease lapsed) makes the first taker of that home's servers (the node it
//! reached sends it there: [`SqlService::serving_home`]) take the server over, under a lease:
//! for each database it fences the old home's live log off (that node, if it still runs, can
//! acknowledge nothing more), replays the newest backup chain and the live log's pieces after
//! it, writes the database file here and takes a full backup of it (the live log carries on
//! from it), then records this node as the server's home. Takeovers are numbered (in the home
//! record and in every fence): a live log refuses to ship past a fence of a later takeover
//! than its home's, even one opened after the fence (a restarted old home). A home fenced off
//! by a takeover that did not finish (it is still the recorded home) takes its server back the
//! same way, from the bucket.

use std::sync::Arc;

use kagi_core::takeover::{Taker, first_taker};
use kagi_core::{ErrorCode, KvError};
use serde_json::Value;

use crate::backup_chain::{Taken, chain_for, live_tail};
use crate::backups::{Source, taken_of};
use crate::databases::Database;
use crate::keys::internal;
use crate::{SqlService, id_of_body};

/// How long a takeover's lease lasts unless renewed (renewed every third of it).
const TAKEOVER_LEASE_MS: i64 = 120_000;

/// [`SqlService::sql_taker`] of `gone` among the running `nodes`, given every server's home
/// record (`records`).
pub(crate) fn taker_among<'a>(
    gone: &str,
    nodes: &'a [kagi_host::NodeCard],
    records: impl Iterator<Item = &'a Value> + Clone,
) -> Option<&'a str> {
    let serving = nodes
        .iter()
        .filter(|n| n.sql.is_some())
        .map(|n| n.name.as_str());
    let holding: Vec<&str> = serving
        .clone()
        .filter(|n| {
            records.clone().any(|r| {
                r["node"].as_str() == Some(n) || r["takingOver"]["node"].as_str() == Some(n)
            })
        })
        .collect();
    if holding.is_empty() {
        first_taker(gone, serving)
    } else {
        first_taker(gone, holding)
    }
}

fn unavailable(message: String) -> KvError {
    KvError::new(ErrorCode::ServiceUnavailable, message)
}

impl SqlService {
    /// The node that serves `server`, whose recorded home is `home`: that node while it runs;
    /// when it does not and this node ships live logs, the node that takes the home's servers
    /// over ([`SqlService::sql_taker`]), which takes the request there; this one once it has
    /// taken the server over, when it is that node or `taker` lets any node serving SQL.
    pub(crate) async fn serving_home(
        self: &Arc<Self>,
        server: &Value,
        home: String,
        taker: Taker,
    ) -> Result<String, KvError> {
        let me = self.host.node_name();
        if home == me || !self.ships_live_logs() {
            return Ok(home);
        }
        let nodes = self.host.live_nodes().await?;
        if nodes.iter().any(|n| n.name == home) {
            return Ok(home);
        }
        if taker == Taker::First
            && let Some(first) = self.sql_taker(&home, &nodes).await?
            && first != me
        {
            return Ok(first);
        }
        // Only a node serving SQL may become a server's home (its clients connect there).
        if !nodes.iter().any(|n| n.name == me && n.sql.is_some()) {
            return Err(unavailable(format!(
                "The server's node '{home}' is not running, and no running node serving SQL \
                 (--sql-listen) can take it over now."
            )));
        }
        self.take_over(server, &home, None).await?;
        Ok(self.server_home(&id_of_body(server)).await?.unwrap_or(me))
    }

    /// The node that takes the servers of `gone`, a home that is not running, over, among the
    /// running nodes `nodes` that serve SQL: every server of a cluster lives on one node (a new
    /// server goes to the node of the others), as operations joining two servers need, so a
    /// node that already serves some, or is taking one over, takes the rest; else the first
    /// taker of the gone home's name (`kagi_core::takeover::first_taker`: every node names the
    /// same one). Among several that serve some (servers made while their node was down), the
    /// first taker of those. `None`: no node serves SQL.
    pub(crate) async fn sql_taker(
        &self,
        gone: &str,
        nodes: &[kagi_host::NodeCard],
    ) -> Result<Option<String>, KvError> {
        let records = self.home_records().await?;
        Ok(taker_among(gone, nodes, records.iter().map(|(_, r)| r)).map(str::to_string))
    }

    /// Takes `server` over from node `gone` (this one: taking it back) under the lease
    /// `sql-takeover:{server id}`, renewed while it runs.
    /// With `seen`, only while the home's takeover number is that (a home taking its server
    /// back does so once, however many of its sessions asked).
    async fn take_over(
        self: &Arc<Self>,
        server: &Value,
        gone: &str,
        seen: Option<u64>,
    ) -> Result<(), KvError> {
        let id = id_of_body(server);
        // One takeover of a server at a time in this process (the lease is per node), and
        // under the lease across nodes.
        let _one = self.lock_id(&format!("takeover:{id}")).await;
        let taken = kagi_host::under_renewed_lease(
            self.host.as_ref(),
            &crate::homes::takeover_lease(&id),
            TAKEOVER_LEASE_MS,
            self.take_over_server(server, gone, seen),
            || {
                unavailable(
                    "This node lost the lease of the server's takeover to another node. Retry \
                     the request."
                        .into(),
                )
            },
        )
        .await?;
        taken.ok_or_else(|| {
            unavailable(format!(
                "The server's node '{gone}' is not running and another node is taking the \
                 server over. Retry the request."
            ))
        })
    }

    /// Whether this node is taking server `server_id` over now.
    pub(crate) fn taking_over(&self, server_id: &str) -> bool {
        self.lock_of(&format!("takeover:{server_id}"))
            .try_lock()
            .is_err()
    }

    /// Waits (at most a minute) for a takeover of server `server_id` under way on this node to
    /// end: a session must not open a database whose file is being put in place, under the
    /// live log of the home before it.
    pub(crate) async fn takeover_settled(&self, server_id: &str) -> Result<(), KvError> {
        let name = format!("takeover:{server_id}");
        match tokio::time::timeout(std::time::Duration::from_secs(60), self.lock_id(&name)).await {
            Ok(_done) => Ok(()),
            Err(_) => Err(unavailable(
                "The server is being taken over from the bucket by this node. Retry the \
                 connection."
                    .into(),
            )),
        }
    }

    /// [`Self::after_fence`], boxed: for a backup pass that finds its copy behind (the pass
    /// runs inside a takeover too, and the future's type would otherwise contain itself).
    pub(crate) fn rebuild_later(
        self: Arc<Self>,
        server_id: String,
        database_id: String,
        seen: u64,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
        Box::pin(self.after_fence(server_id, database_id, seen))
    }

    /// After a commit found the live log of database `database_id` of `server_id` fenced off,
    /// or this node's copy of the database behind what the live log holds (a data directory
    /// older than what was acknowledged), its entry having been opened when the home's
    /// takeover number was `seen`: when this node is still the server's recorded home with
    /// that number (the takeover that fenced it did not finish; or no earlier call took it
    /// back already), it takes the server back from the bucket; when another node serves it
    /// now, what this node has of the database goes.
    pub(crate) async fn after_fence(
        self: Arc<Self>,
        server_id: String,
        database_id: String,
        seen: u64,
    ) {
        let me = self.host.node_name();
        let Some(server) = self.host.resource(&server_id) else {
            return;
        };
        match self.home_record(&server_id).await {
            Ok(Some(home)) if home["node"].as_str() == Some(me.as_str()) => {}
            Ok(_) => {
                self.let_go_of(
                    &database_id,
                    "terminating connection because another node serves this database's \
                     server now",
                );
                return;
            }
            Err(_) => return,
        }
        match self.take_over(&server, &me, Some(seen)).await {
            Ok(()) => {
                tracing::warn!(server = %server_id, "SQL server taken back from the bucket after an unfinished takeover fenced this node off")
            }
            Err(e) => {
                tracing::warn!(server = %server_id, error = %e.message, "SQL server not taken back yet")
            }
        }
    }

    /// Takes `server` over from node `gone` (under the takeover lease). Everything that can
    /// fail without touching the bucket is checked before the old home is fenced off.
    async fn take_over_server(
        self: &Arc<Self>,
        server: &Value,
        gone: &str,
        seen: Option<u64>,
    ) -> Result<(), KvError> {
        let me = self.host.node_name();
        let id = id_of_body(server);
        let Some(home) = self.home_record(&id).await? else {
            return Ok(());
        };
        if home["node"].as_str() != Some(gone) {
            // Taken over by another node meanwhile, or deleted.
            return Ok(());
        }
        if seen.is_some_and(|n| home["takeover"].as_u64().unwrap_or(0) != n) {
            // Taken back already (by an earlier session's call, under a later number).
            return Ok(());
        }
        let name = server["name"].as_str().unwrap_or_default();
        let dbs = self.databases_of(server).await?;
        // A geo-replication link joins two servers of one node, and an Inaccessible
        // database's key cannot open its backups: those wait for their node.
        if let Some(db) = dbs.iter().find(|d| !d.doc["geo"]["role"].is_null()) {
            return Err(unavailable(format!(
                "The server '{name}' is served by the node '{gone}', which is not running, and \
                 its database '{}' is in a geo-replication link, which is not taken over to \
                 another node: the server is served again when that node is back (or fail \
                 over to the partner).",
                db.name
            )));
        }
        if let Some(db) = dbs.iter().find(|d| d.inaccessible()) {
            return Err(unavailable(format!(
                "The server '{name}' is served by the node '{gone}', which is not running, and \
                 its database '{}' is Inaccessible (its key cannot be used to read its backups): \
                 the server is served again when that node is back.",
                db.name
            )));
        }
        // Every database has a backup to start from and its key opens; the takeover's number
        // is past its home's and every fence in the bucket.
        let mut number = self.server_takeover(&id).await?;
        for db in &dbs {
            let records = self.records(&id, &db.database_id).await?;
            let taken: Vec<Taken> = records.iter().filter_map(taken_of).collect();
            if chain_for(&taken, i64::MAX).is_none() {
                return Err(unavailable(format!(
                    "The database '{name}/{}' has no backup in the bucket (it was made before \
                     its node shipped its live log): its server is served again when its node \
                     '{gone}' is back.",
                    db.name
                )));
            }
            self.open_db(server, db).await?;
            let folder = self
                .live_folder(&db.database_id)
                .ok_or_else(|| internal("taking a database over", "no live log"))?;
            let pieces = tokio::task::spawn_blocking(move || crate::live::pieces_of(&folder))
                .await
                .map_err(|e| internal("reading a live log", e))?
                .map_err(|e| bucket_unavailable("reading a live log", e))?;
            number = pieces
                .iter()
                .filter(|p| p.generation.is_none())
                .map(|p| p.fenced_by)
                .fold(number, u64::max);
        }
        let number = number + 1;
        // The home record is marked before anything is fenced: from then on the old home's
        // backup passes record nothing (`HomeGuard`), so the records read below are all it
        // recorded. (A mark left by a takeover that did not finish is replaced: this one holds
        // the lease now.)
        let unmarked = crate::homes::without_mark(&home);
        let mut marked = unmarked.clone();
        marked["takingOver"] = serde_json::json!({"node": me, "number": number});
        if !self.replace_home_record(&id, &home, &marked).await? {
            return Err(changed_hands(name));
        }
        match self
            .take_over_marked(server, gone, (&dbs, number), &marked)
            .await
        {
            Ok(()) => Ok(()),
            Err(e) => {
                for d in &dbs {
                    self.forget_open(&d.database_id);
                    self.forget_backup_state(&d.database_id);
                    self.forget_backup_pin(&d.database_id);
                }
                // The old home records again (if it runs and was not fenced off; if it was,
                // it takes its server back).
                if let Err(u) = self.replace_home_record(&id, &marked, &unmarked).await {
                    tracing::warn!(server = %id, error = %u.message, "a takeover's mark was not taken away");
                }
                Err(e)
            }
        }
    }

    /// The takeover of `server` from `gone` once its home record is `marked`: takeover
    /// `number` of its databases `dbs`.
    async fn take_over_marked(
        self: &Arc<Self>,
        server: &Value,
        gone: &str,
        (dbs, number): (&[Database], u64),
        marked: &Value,
    ) -> Result<(), KvError> {
        let me = self.host.node_name();
        let id = id_of_body(server);
        let name = server["name"].as_str().unwrap_or_default();
        // Each database fetched and backed up (a full backup: its live log carries on from
        // it) before the home is recorded, so no session commits before there is a base. A
        // failure leaves the old home fenced off, as the recorded home: a retried request takes
        // the server over again, and the old home, if it runs, takes it back.
        let mut fences = Vec::with_capacity(dbs.len());
        for db in dbs {
            let fetched = match self.fetch_database(server, db, number).await {
                Ok(fence) => match self.open_db(server, db).await {
                    Ok(open) => match self.backup_now(server, db, &open).await {
                        Ok(()) => self.check_base(server, db, fence).await.map(|()| fence),
                        Err(e) => Err(e),
                    },
                    Err(e) => Err(e),
                },
                Err(e) => Err(e),
            };
            fences.push(fetched?);
        }
        // Still gone, and still the old home's with this takeover's mark (nothing recorded
        // another meanwhile): checked in the write.
        let back = gone != me && self.host.live_nodes().await?.iter().any(|n| n.name == gone);
        let home = serde_json::json!({ "node": me, "takeover": number });
        if back || !self.replace_home_record(&id, marked, &home).await? {
            return Err(changed_hands(name));
        }
        tracing::warn!(server = %id, from = gone, takeover = number, databases = dbs.len(), "SQL server taken over from the bucket");
        // The old home's pieces are in the backups just taken (its fences stay), and its
        // databases' entries (opened under the earlier takeover number) are replaced.
        for (db, fence) in dbs.iter().zip(fences) {
            self.remove_live_log(&db.database_id, Some(fence)).await;
            self.end_sessions(
                &db.database_id,
                "terminating connection: the database was taken over",
            );
            self.forget_backup_pin(&db.database_id);
        }
        Ok(())
    }

    /// Checks that database `db`'s newest backup is the full one a takeover that fenced its
    /// live log at `fence` took: the base its live log carries on from.
    async fn check_base(&self, server: &Value, db: &Database, fence: u64) -> Result<(), KvError> {
        let records = self.records(&id_of_body(server), &db.database_id).await?;
        let based = records
            .last()
            .is_some_and(|r| r["type"] == "Full" && r["liveFrom"].as_u64() == Some(fence + 1));
        if based {
            Ok(())
        } else {
            Err(internal(
                "taking a database over",
                format!("database '{}': no full backup was taken of it", db.name),
            ))
        }
    }

    /// Puts database `db` of `server` on this node from the bucket for takeover `number`: its
    /// live log fenced off, its newest backup chain and the pieces after it replayed, its file
    /// written. Returns the fence's number (the pieces after it carry on the next backup).
    async fn fetch_database(
        self: &Arc<Self>,
        server: &Value,
        db: &Database,
        number: u64,
    ) -> Result<u64, KvError> {
        let folder = self
            .live_folder(&db.database_id)
            .ok_or_else(|| internal("taking a database over", "no live log"))?;
        // What this node still has of it (it was its home before) goes first: its file is
        // replaced.
        self.let_go_of(
            &db.database_id,
            "terminating connection: the database moved to another node",
        );
        let (fencing, node) = (folder.clone(), self.host.node_name());
        let (mut pieces, fenced_at) =
            tokio::task::spawn_blocking(move || crate::live::fence(&fencing, number, &node))
                .await
                .map_err(|e| internal("fencing a live log", e))?
                .map_err(|e| bucket_unavailable("fencing a live log", e))?;
        let records = self.records(&id_of_body(server), &db.database_id).await?;
        let taken: Vec<Taken> = records.iter().filter_map(taken_of).collect();
        let name = server["name"].as_str().unwrap_or_default();
        let Some(chain) = chain_for(&taken, i64::MAX) else {
            return Err(unavailable(format!(
                "The database '{name}/{}' has no backup in the bucket.",
                db.name
            )));
        };
        let last = chain
            .last()
            .and_then(|s| records.iter().find(|r| r["seq"].as_u64() == Some(*s)));
        let cursor = last.map(crate::backups::cursor_of);
        // Pieces before the chain's lineage are an earlier home's, replayed into the backup
        // its takeover took.
        let from = last.and_then(|r| r["liveFrom"].as_u64()).unwrap_or(0);
        pieces.retain(|p| p.seq >= from);
        let tail = live_tail(cursor.as_ref(), &pieces).map_err(|why| {
            // The old home may have recorded a backup and pruned what it holds between the
            // reads: a retry reads both again.
            unavailable(format!(
                "The database '{name}/{}' could not be put together from the bucket now \
                 ({why}). Retry the request.",
                db.name
            ))
        })?;
        let point = last.and_then(|r| r["taken"].as_i64()).unwrap_or(i64::MAX);
        let source = Source {
            name: db.name.clone(),
            database_id: db.database_id.clone(),
            server: server.clone(),
        };
        let pieces_used = tail.len();
        let prepared = self
            .replay_chain(
                server,
                &source,
                point,
                (&records, &chain),
                Some((folder, tail)),
            )
            .await?;
        let open = self.open_db(server, db).await?;
        crate::engine::remove_files(&open.file).await?;
        self.finish_restore(&open, prepared).await?;
        // Its file is the bucket's now: sessions may open it again.
        self.forget_behind(&db.database_id);
        tracing::info!(database = %db.name, backups = chain.len(), live_pieces = pieces_used, "SQL database fetched from the bucket");
        self.start_live_lineage(server, db, fenced_at + 1).await?;
        Ok(fenced_at)
    }
}

/// A takeover that found its server's home record changed by another node.
fn changed_hands(server: &str) -> KvError {
    unavailable(format!(
        "The server '{server}' changed hands while this node was taking it over. Retry the \
         request."
    ))
}

/// A bucket that failed during a takeover: 503, the request can be retried.
fn bucket_unavailable(what: &str, e: impl std::fmt::Display) -> KvError {
    tracing::warn!(error = %e, "{what}");
    unavailable(format!(
        "The bucket could not be reached while {what}. Retry the request."
    ))
}
