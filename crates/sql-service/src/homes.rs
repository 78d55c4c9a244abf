//! Where a SQL server lives when several nodes share one store (docs/SEVERAL_NODES.md,
//! "Homes"): its databases' files are in one node's data directory. A new server goes to a
//! node that serves SQL over the PostgreSQL protocol — the node of the servers made before
//! it when that one runs (copies and geo-replication join databases of two servers, which
//! must then be on one node), else this one, else the first by name — and is recorded there
//! (`/kagi/sql-servers`, document `home/{server id}`) before it is created. Every request
//! naming the server is served by that node (the HTTP layer forwards it there, the PostgreSQL
//! front end splices connections to its SQL endpoint: the gateway's `upstream`), and only
//! that node opens, probes, backs up and replicates its databases. A server made before homes
//! were recorded has none and is served where it is asked for (one node).

use kagi_core::takeover::Taker;
use kagi_core::{ErrorCode, KvError};
use kagi_host::ArmRequest;
use serde_json::{Value, json};

use crate::{SERVER_TYPE, SqlService, id_of_body};

/// The lease a takeover of server `server_id` holds (`crate::takeover`).
pub(crate) fn takeover_lease(server_id: &str) -> String {
    format!("sql-takeover:{}", server_id.to_ascii_lowercase())
}

/// Home record `record` without a takeover's mark (`takingOver`).
pub(crate) fn without_mark(record: &Value) -> Value {
    let mut unmarked = record.clone();
    if let Some(o) = unmarked.as_object_mut() {
        o.remove("takingOver");
    }
    unmarked
}

/// What a node's backup records of a server are guarded by: with several nodes, another node
/// that takes the server over first marks its home record (`takingOver`), and a record of the
/// old home is written only while the home record is what its pass found, so that a pass the
/// old home had under way when it was cut off records nothing after the takeover began.
#[derive(Clone, Debug)]
pub(crate) enum HomeGuard {
    /// One node: nothing to guard against.
    Unshared,
    /// The server's home record as the pass found it (this node's, or this node's takeover).
    Home(Value),
    /// Another node serves the server, or is taking it over: no pass here.
    Elsewhere,
}

impl SqlService {
    /// Stores document (`kind`, `name`) of `server_id` under `guard`: refused (503, nothing
    /// written) when the server's home record changed since the pass read it.
    pub(crate) async fn put_guarded(
        &self,
        guard: &HomeGuard,
        server_id: &str,
        (kind, name): (&str, &str),
        doc: &Value,
    ) -> Result<(), KvError> {
        let home = match guard {
            HomeGuard::Unshared => {
                return self.host.put_document(server_id, kind, name, doc).await;
            }
            HomeGuard::Home(home) => home,
            HomeGuard::Elsewhere => return Err(taken_elsewhere(server_id)),
        };
        let lower = server_id.to_ascii_lowercase();
        let written = self
            .host
            .put_document_if(
                server_id,
                (kind, name),
                doc,
                (SERVERS_KEY, HOME_KIND, &lower),
                Some(home),
            )
            .await?;
        if written {
            Ok(())
        } else {
            Err(taken_elsewhere(server_id))
        }
    }
}

/// A record refused because another node is taking the server over, or took it.
fn taken_elsewhere(server_id: &str) -> KvError {
    KvError::new(
        ErrorCode::ServiceUnavailable,
        format!("The server '{server_id}' is being taken over by another node, or was."),
    )
}

/// The store key of servers' homes.
const SERVERS_KEY: &str = "/kagi/sql-servers";
/// Their kind.
const HOME_KIND: &str = "home";

impl SqlService {
    /// The node a server lives on, if recorded; none on one node (SQLite), whose every server
    /// is its own whatever was recorded.
    pub(crate) async fn server_home(&self, server_id: &str) -> Result<Option<String>, KvError> {
        Ok(self
            .home_record(server_id)
            .await?
            .and_then(|d| d["node"].as_str().map(str::to_string)))
    }

    /// Records that a server made here lives on this node (a takeover replaces the record
    /// with its number: `crate::takeover`).
    pub(crate) async fn record_server_home(&self, server_id: &str) -> Result<(), KvError> {
        let (node, takeover) = (self.host.node_name(), 0);
        self.host
            .put_document(
                SERVERS_KEY,
                HOME_KIND,
                &server_id.to_ascii_lowercase(),
                &json!({ "node": node, "takeover": takeover }),
            )
            .await
    }

    /// The number of the takeover that made a server's home its home (0: made there, or on
    /// one node).
    pub(crate) async fn server_takeover(&self, server_id: &str) -> Result<u64, KvError> {
        Ok(self
            .home_record(server_id)
            .await?
            .and_then(|d| d["takeover"].as_u64())
            .unwrap_or(0))
    }

    /// Every server's home record, by lower-case server id (none on one node), in one read.
    pub(crate) async fn home_records(&self) -> Result<Vec<(String, Value)>, KvError> {
        if !self.host.shares_store() {
            return Ok(Vec::new());
        }
        self.host.documents(SERVERS_KEY, HOME_KIND).await
    }

    /// A server's home record as it is in the store (`None`: none, or one node).
    pub(crate) async fn home_record(&self, server_id: &str) -> Result<Option<Value>, KvError> {
        if !self.host.shares_store() {
            return Ok(None);
        }
        self.host
            .document(SERVERS_KEY, HOME_KIND, &server_id.to_ascii_lowercase())
            .await
    }

    /// Replaces a server's home record `from` with `to`, only if it is still `from` (checked
    /// in the writing transaction); `false` when it changed.
    pub(crate) async fn replace_home_record(
        &self,
        server_id: &str,
        from: &Value,
        to: &Value,
    ) -> Result<bool, KvError> {
        let name = server_id.to_ascii_lowercase();
        self.host
            .put_document_if(
                SERVERS_KEY,
                (HOME_KIND, &name),
                to,
                (SERVERS_KEY, HOME_KIND, &name),
                Some(from),
            )
            .await
    }

    /// What a backup pass over `server`'s databases records under (see [`HomeGuard`]).
    pub(crate) async fn home_guard(&self, server: &Value) -> Result<HomeGuard, KvError> {
        let id = id_of_body(server);
        let Some(record) = self.home_record(&id).await? else {
            return Ok(HomeGuard::Unshared);
        };
        let me = self.host.node_name();
        let taker = record["takingOver"]["node"].as_str();
        if taker == Some(me.as_str()) {
            // This node's own takeover (its first backup), or one of its own that did not
            // finish while this node is still the home.
            return Ok(HomeGuard::Home(record));
        }
        if record["node"].as_str() != Some(me.as_str()) {
            return Ok(HomeGuard::Elsewhere);
        }
        if taker.is_none() {
            return Ok(HomeGuard::Home(record));
        }
        // Another node marked it for a takeover. While that takeover holds its lease, this
        // node records nothing more; a mark whose takeover is gone (its node died before it
        // fenced this one off) is taken away, and the next pass records again.
        let lease = takeover_lease(&id);
        if self.host.acquire_lease(&lease, 10_000).await? {
            let cleared = self
                .replace_home_record(&id, &record, &without_mark(&record))
                .await;
            let _ = self.host.release_lease(&lease).await;
            if cleared? {
                tracing::warn!(server = %id, "the mark of a takeover that did not finish was taken away");
            }
        }
        Ok(HomeGuard::Elsewhere)
    }

    /// Forgets a deleted server's home.
    pub(crate) async fn forget_server_home(&self, server_id: &str) {
        if let Err(e) = self
            .host
            .delete_document(SERVERS_KEY, HOME_KIND, &server_id.to_ascii_lowercase())
            .await
        {
            tracing::warn!(server = server_id, error = %e.message, "cannot forget a deleted server's home");
        }
    }

    /// Whether `server`'s databases are this node's to open and look after.
    pub(crate) async fn homed_here(&self, server: &Value) -> bool {
        matches!(self.home_elsewhere(server).await, Ok(None))
    }

    /// The other node `server` lives on, if it lives on another.
    pub(crate) async fn home_elsewhere(&self, server: &Value) -> Result<Option<String>, KvError> {
        Ok(self
            .server_home(&id_of_body(server))
            .await?
            .filter(|home| *home != self.host.node_name()))
    }

    /// Refuses `what` (an operation joining the databases of `server`, served here, and of
    /// `partner`) when the two servers live on different nodes: each node opens only the
    /// databases in its own data directory, so the operation cannot run on either. A server
    /// with no home recorded is served here (one node, or made before homes were recorded).
    pub(crate) async fn check_same_home(
        &self,
        what: &str,
        server: &Value,
        partner: &Value,
    ) -> Result<(), KvError> {
        let me = self.host.node_name();
        let here = self.server_home(&id_of_body(server)).await?;
        let there = self.server_home(&id_of_body(partner)).await?;
        let (here, there) = (here.unwrap_or_else(|| me.clone()), there.unwrap_or(me));
        if here == there {
            return Ok(());
        }
        let name = |s: &Value| s["name"].as_str().unwrap_or_default().to_string();
        Err(KvError::conflict(format!(
            "{what} joins the databases of servers '{}' and '{}', which live on different \
             kagi nodes ('{here}' and '{there}'): a server's databases are in its node's data \
             directory, and kagi does not join databases across nodes. Use servers that live on \
             one node (a new server lives on the node of the servers made before it while that \
             node runs).",
            name(server),
            name(partner)
        ))
        .with_inner("CrossNodeOperationNotSupported"))
    }

    /// The servers this node looks after (see [`SqlService::homed_here`]).
    pub(crate) async fn local_servers(&self) -> Vec<Value> {
        let mut mine = Vec::new();
        for server in self.host.resources_of_type(SERVER_TYPE) {
            if self.homed_here(&server).await {
                mine.push(server);
            }
        }
        mine
    }

    /// Where a new server goes (see the module).
    async fn home_for_new_server(&self) -> Result<String, KvError> {
        let me = self.host.node_name();
        let mut serving: Vec<String> = self
            .host
            .live_nodes()
            .await?
            .into_iter()
            .filter(|n| n.sql.is_some())
            .map(|n| n.name)
            .collect();
        if serving.is_empty() {
            // No node serves SQL: the server is managed here, as on one node without
            // `--sql-listen`.
            return Ok(me);
        }
        serving.sort();
        for server in self.host.resources_of_type(SERVER_TYPE) {
            if let Some(home) = self.server_home(&id_of_body(&server)).await?
                && serving.contains(&home)
            {
                return Ok(home);
            }
        }
        if serving.contains(&me) {
            return Ok(me);
        }
        Ok(serving.swap_remove(0))
    }

    /// The node that must serve `req` ([`kagi_host::ResourceProvider::home`]).
    pub(crate) async fn request_home(
        &self,
        req: &ArmRequest<'_>,
    ) -> Result<Option<String>, KvError> {
        let Ok(scope) = req.scope("microsoft.sql") else {
            return Ok(None);
        };
        let (Some(rg), ["servers", _, ..]) = (scope.resource_group, scope.rest_l) else {
            return Ok(None);
        };
        let id = format!(
            "/subscriptions/{}/resourceGroups/{rg}/providers/Microsoft.Sql/servers/{}",
            scope.subscription, scope.rest[1]
        );
        if let Some(home) = self.server_home(&id).await? {
            // A server (or database) deleted while its home is not running and cannot be taken
            // over goes from the store on the node serving the request, as Azure deletes what
            // it is asked to: a home lost for good would otherwise keep it forever. Its files
            // stay on that node, which never opens a database no server names and removes them
            // when it starts.
            let deleting = req.method == "DELETE"
                && matches!(
                    scope.rest_l,
                    ["servers", _] | ["servers", _, "databases", _]
                );
            let me = self.host.node_name();
            if home == me {
                return Ok(Some(home));
            }
            // With live logs in the bucket, a server whose home is gone is taken over by its
            // taker (the request goes there), or here when this node is it.
            if self.ships_live_logs()
                && let Some(server) = self.host.resource(&id)
            {
                match self
                    .arc()?
                    .serving_home(&server, home.clone(), Taker::First)
                    .await
                {
                    Ok(node) => return Ok(Some(node)),
                    // A server that cannot be taken over is still deleted (here: the taker, or
                    // the node the request reached when no node can take it).
                    Err(e) if deleting && !self.node_running(&home).await? => {
                        tracing::warn!(server = %id, home = %home, reason = %e.message, "deleted while its home node is not running and cannot be taken over: served here");
                        return Ok(Some(me));
                    }
                    Err(e) => return Err(e),
                }
            }
            if deleting && !self.node_running(&home).await? {
                tracing::warn!(server = %id, home = %home, "deleted while its home node is not running: served here");
                return Ok(Some(me));
            }
            return Ok(Some(home));
        }
        let exists = self.host.resource(&id).is_some_and(|b| {
            b["type"]
                .as_str()
                .is_some_and(|t| t.eq_ignore_ascii_case(SERVER_TYPE))
        });
        if req.method == "PUT" && scope.rest_l.len() == 2 && !exists {
            return self.home_for_new_server().await.map(Some);
        }
        Ok(None)
    }
}

impl SqlService {
    /// Whether node `name` is running (its presence lease is held).
    async fn node_running(&self, name: &str) -> Result<bool, KvError> {
        Ok(self.host.live_nodes().await?.iter().any(|n| n.name == name))
    }

    /// `HOST:PORT` of the SQL endpoint of `home`, the node `server` lives on: 503 while that
    /// node is not running or serves no SQL.
    pub(crate) async fn home_sql_endpoint(
        &self,
        server: &str,
        home: &str,
    ) -> Result<String, KvError> {
        let card = self
            .host
            .live_nodes()
            .await?
            .into_iter()
            .find(|n| n.name == home);
        let Some(card) = card else {
            return Err(KvError::new(
                ErrorCode::ServiceUnavailable,
                format!(
                    "The server '{server}' is served by the node '{home}', which is not running. \
                     Retry when it is back."
                ),
            ));
        };
        card.sql.filter(|a| !a.is_empty()).ok_or_else(|| {
            KvError::new(
                ErrorCode::ServiceUnavailable,
                format!(
                    "The server '{server}' is served by the node '{home}', which does not serve \
                     SQL over the PostgreSQL protocol now (--sql-listen)."
                ),
            )
        })
    }
}

/// The answer of a node asked to open a server that lives on another (a connection that was
/// not forwarded there: the homes changed while it started). It names no node: the client has
/// not authenticated.
pub(crate) fn served_elsewhere(server: &str) -> KvError {
    KvError::new(
        ErrorCode::ServiceUnavailable,
        format!("The server '{server}' is served by another node. Retry the connection."),
    )
}
