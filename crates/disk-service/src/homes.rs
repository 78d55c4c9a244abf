//! Where a disk family lives when several nodes share one store (docs/SEVERAL_NODES.md,
//! "Homes"): a family's log is in the data directory of the node that made it, which is
//! recorded (`/kagi/disk-families`, document `home/{family}`) before the family is created.
//! Every request naming a disk, snapshot or image of the family — or, for a new one, made
//! from one of them — is served by that node; the HTTP layer forwards it there. A family made
//! before homes were recorded has none and is served where it is asked for (one node).
//!
//! When blobs are in a bucket, every family's log is shipped there as it is made durable
//! (`crate::shipping`). A request for a family whose home is not running (its presence lease
//! lapsed) then makes the family's first taker (see [`DiskService::serving_home`]; the node
//! it reached sends it there) take the family over: under the lease
//! `disk-takeover:{family}`, it fences the old home off, fetches the log from the bucket and
//! records itself as the home. Without a bucket the family waits for its home (503), but for
//! a `DELETE` of one of its resources, served by the node it reached.
//!
//! A family whose home is gone is also taken over without a request, by the takeover sweep
//! ([`spawn_takeover_sweep`]): every node present itself looks every few seconds for families
//! whose recorded home is not among the running nodes and, once it has seen that home absent
//! for `KAGI_TAKEOVER_AFTER` seconds (default 30: a node restarting quickly keeps its
//! families), takes over those whose first taker it is, the way a request does; after
//! longer, any family of that home (its first taker may be failing). Nodes sweeping at once
//! are safe: the takeover's lease decides, and the others find the new home at their next
//! pass.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

use kagi_core::takeover::{GoneHomes, Taker, first_taker};
use kagi_core::{ErrorCode, KvError};
use kagi_host::{ArmRequest, json_body};
use serde_json::{Value, json};

use crate::DiskService;
use crate::keys::{disk_keys, internal};

/// The store key of families' homes.
const FAMILIES_KEY: &str = "/kagi/disk-families";
/// Their kind.
const HOME_KIND: &str = "home";
/// How long a node may take to take a family over (fence, fetch, record) before another may
/// try: fetching a large log from the bucket takes a while.
const TAKEOVER_LEASE_MS: i64 = 120_000;

impl DiskService {
    /// Records that `family` lives on this node (before it is created).
    pub(crate) async fn record_home(&self, family: &str) -> Result<(), KvError> {
        let node = self.host.node_name();
        self.host
            .put_document(FAMILIES_KEY, HOME_KIND, family, &json!({ "node": node }))
            .await
    }

    /// Forgets where `family` lived (it was deleted).
    pub(crate) async fn forget_home(&self, family: &str) {
        if let Err(e) = self
            .host
            .delete_document(FAMILIES_KEY, HOME_KIND, family)
            .await
        {
            tracing::warn!(family, error = %e.message, "cannot forget a deleted family's home");
        }
    }

    /// The family of resource `id` (a disk, snapshot or image) and the node holding it, if it
    /// has one recorded.
    async fn home_of(&self, id: &str) -> Result<Option<(String, String)>, KvError> {
        let body = json!({ "id": id });
        let Some(keys) = disk_keys(self.host.as_ref(), &body) else {
            return Ok(None);
        };
        let Some(family) = keys.family_if_any().await? else {
            return Ok(None);
        };
        Ok(self
            .recorded_home(&family)
            .await?
            .map(|home| (family, home)))
    }

    /// The node recorded as `family`'s home.
    pub(crate) async fn recorded_home(&self, family: &str) -> Result<Option<String>, KvError> {
        Ok(self
            .host
            .document(FAMILIES_KEY, HOME_KIND, family)
            .await?
            .and_then(|d| d["node"].as_str().map(str::to_string)))
    }

    /// The node that serves `family`, whose recorded home is `home`: that node while it runs;
    /// when it does not and the family's log is in the bucket, the family's first taker among
    /// the running nodes (`kagi_core::takeover::first_taker` of the family: a lost node's
    /// families spread over the others), which takes the request there; this one once it has
    /// taken the family over, when it is that node or `taker` lets any node. Without a
    /// bucket, this one for a `DELETE` of one of its resources (`deleting`: it goes from the
    /// store, its blocks stay on the lost node, which sets aside the families no resource
    /// names when it starts).
    async fn serving_home(
        &self,
        family: &str,
        home: String,
        deleting: bool,
        taker: Taker,
    ) -> Result<String, KvError> {
        let me = self.host.node_name();
        let shipped = self.store.is_shipped();
        if home == me || !(shipped || deleting) {
            return Ok(home);
        }
        let nodes = self.host.live_nodes().await?;
        if nodes.iter().any(|n| n.name == home) {
            return Ok(home);
        }
        if !shipped {
            tracing::warn!(family, home = %home, "a disk deleted while its home node is not running: served here");
            return Ok(me);
        }
        if taker == Taker::First
            && let Some(first) = first_taker(family, nodes.iter().map(|n| n.name.as_str()))
            && first != me
        {
            return Ok(first.to_string());
        }
        // One takeover of a family at a time in this process (the lease is per node), and
        // under the lease across nodes.
        let _one = self.lock_id(&format!("takeover:{family}")).await;
        // Renewed while the log is fetched (a large one takes a while). A node that loses the
        // lease gives up; whatever it fetched is stale the moment another node numbers its
        // own takeover (docs/DISK_FORMAT.md, "Shipping").
        let taken = kagi_host::under_renewed_lease(
            self.host.as_ref(),
            &format!("disk-takeover:{family}"),
            TAKEOVER_LEASE_MS,
            self.take_over(family, &home),
            || {
                KvError::new(
                    ErrorCode::ServiceUnavailable,
                    "This node lost the lease of the disk's takeover to another node. Retry the \
                     request.",
                )
            },
        )
        .await?;
        taken.ok_or_else(|| {
            KvError::new(
                ErrorCode::ServiceUnavailable,
                format!(
                    "The disk's node '{home}' is not running and another node is taking its \
                     disks over. Retry the request."
                ),
            )
        })
    }

    /// Takes `family` over from node `gone` (under the takeover lease): fences `gone` off,
    /// fetches the log from the bucket and records this node as the home. The node now
    /// serving it (another node's, if one took it over meanwhile).
    async fn take_over(&self, family: &str, gone: &str) -> Result<String, KvError> {
        match self.recorded_home(family).await? {
            Some(home) if home == gone => {}
            Some(home) => return Ok(home),
            // Deleted meanwhile: whoever serves the request finds nothing.
            None => return Ok(self.host.node_name()),
        }
        // What this node still has open of the family (it was its home before and lost its
        // presence for a while): fenced off by the fetch below, so closed first.
        let closed: Vec<_> = {
            let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
            let ids: Vec<String> = open
                .iter()
                .filter(|(_, rt)| rt.family.id() == family)
                .map(|(id, _)| id.clone())
                .collect();
            ids.iter().filter_map(|id| open.remove(id)).collect()
        };
        let store = self.store.clone();
        let id = family.to_string();
        // Closing them (a checkpoint that reaches for the bucket, and fails: fenced) is a
        // blocking thread's work, not under the map's lock.
        tokio::task::spawn_blocking(move || {
            drop(closed);
            store.fetch_family(&id)
        })
        .await
        .map_err(|e| internal("taking a disk family over", e))?
        .map_err(|e| match e {
            kagi_disk::DiskError::Busy => KvError::new(
                ErrorCode::ServiceUnavailable,
                "The disk is still open on this node from before it lost its presence, or \
                     another node is taking it over; retry the request.",
            ),
            kagi_disk::DiskError::NotFound(_) => KvError::new(
                ErrorCode::ServiceUnavailable,
                format!(
                    "The disk's node '{gone}' is not running, and the disk's log is not in \
                         the bucket yet (the disk was last opened before its log was shipped): \
                         it is served again when that node is back."
                ),
            ),
            e => internal("taking a disk family over", e),
        })?;
        self.record_home(family).await?;
        tracing::warn!(
            family,
            from = gone,
            "disk family taken over from a node that is not running"
        );
        Ok(self.host.node_name())
    }

    /// The node that must serve `req` ([`kagi_host::ResourceProvider::home`]).
    pub(crate) async fn request_home(
        &self,
        req: &ArmRequest<'_>,
    ) -> Result<Option<String>, KvError> {
        let Ok(scope) = req.scope("microsoft.compute") else {
            return Ok(None);
        };
        // The status of a long-running operation is in the memory of the node that ran it.
        if let ["locations", _, "diskoperations", _] = scope.rest_l {
            return Ok(kagi_host::operation_node(scope.rest[3]).map(str::to_string));
        }
        let (Some(rg), [kind @ ("disks" | "snapshots" | "images"), ..]) =
            (scope.resource_group, scope.rest_l)
        else {
            return Ok(None);
        };
        let Some(name) = scope.rest.get(1) else {
            return Ok(None);
        };
        let id = format!(
            "/subscriptions/{}/resourceGroups/{rg}/providers/Microsoft.Compute/{kind}/{name}",
            scope.subscription
        );
        if let Some((family, home)) = self.home_of(&id).await? {
            let deleting = req.method == "DELETE" && scope.rest_l.len() == 2;
            return self
                .serving_home(&family, home, deleting, Taker::First)
                .await
                .map(Some);
        }
        // A new resource made from another: where its source lives. (A body that does not
        // parse is refused by whichever node serves it.)
        if req.method != "PUT" || scope.rest_l.len() != 2 {
            return Ok(None);
        }
        let Ok(input) = json_body(req.body) else {
            return Ok(None);
        };
        match source_of(&input) {
            Some(source) => match self.home_of(source).await? {
                Some((family, home)) => self
                    .serving_home(&family, home, false, Taker::First)
                    .await
                    .map(Some),
                None => Ok(None),
            },
            None => Ok(None),
        }
    }
}

/// Starts the takeover sweep (see the module) on a node whose families' logs are shipped to a
/// bucket shared with other nodes; on any other node nothing is taken over, and nothing is
/// started.
pub(crate) fn spawn_takeover_sweep(service: Arc<DiskService>) {
    if !(service.host.shares_store() && service.store.is_shipped()) {
        return;
    }
    kagi_host::spawn_takeover_sweep(move |mut gone| {
        let service = service.clone();
        async move {
            service.take_over_gone_homes(&mut gone).await;
            gone
        }
    });
}

impl DiskService {
    /// One pass of the takeover sweep: every family some resource names whose home has been
    /// gone for the grace, and whose last failed try is far enough behind, taken over here
    /// (one after the other).
    async fn take_over_gone_homes(&self, gone: &mut GoneHomes) {
        let me = self.host.node_name();
        let nodes = match self.host.live_nodes().await {
            Ok(nodes) => nodes,
            Err(e) => {
                tracing::debug!(error = %e.message, "takeover sweep: the running nodes could not be read");
                return;
            }
        };
        // Not while this node's own presence has lapsed (cut off from the store, it is the
        // one that looks gone).
        if !nodes.iter().any(|n| n.name == me) {
            gone.forget_all();
            return;
        }
        let live: HashSet<String> = nodes.into_iter().map(|n| n.name).collect();
        let homes = match self.host.documents(FAMILIES_KEY, HOME_KIND).await {
            Ok(docs) => docs,
            Err(e) => {
                tracing::debug!(error = %e.message, "takeover sweep: the families' homes could not be read");
                return;
            }
        };
        let mut elsewhere: Vec<(String, String)> = homes
            .into_iter()
            .filter_map(|(family, doc)| Some((family, doc["node"].as_str()?.to_string())))
            .filter(|(_, home)| *home != me)
            .collect();
        let now = Instant::now();
        let long_gone = gone.observe(elsewhere.iter().map(|(_, home)| home.as_str()), &live, now);
        elsewhere.retain(|(_, home)| long_gone.contains(home));
        gone.keep_tries_of(elsewhere.iter().map(|(family, _)| family.clone()));
        elsewhere.retain(|(family, _)| gone.due(family, now));
        if elsewhere.is_empty() {
            return;
        }
        // A home recorded for a family whose creation failed names nothing to take over.
        let used = match self.families_in_use().await {
            Ok(used) => used,
            Err(e) => {
                tracing::debug!(error = %e.message, "takeover sweep: the families in use could not be read");
                return;
            }
        };
        for (family, home) in elsewhere {
            if !used.contains(&family) {
                // Looked at again later, not at every pass.
                let unused = KvError::new(ErrorCode::NotFound, "no resource names the family");
                gone.failed(&family, &unused, Instant::now());
                tracing::debug!(family = %family, home = %home, "takeover sweep: a home recorded for a family no resource names");
                continue;
            }
            let taker = gone.others_may_take(&home, Instant::now());
            let outcome = self.serving_home(&family, home.clone(), false, taker).await;
            let here = outcome.map(|node| node == me);
            kagi_host::note_takeover(gone, "disk family", (&family, &home), here);
        }
    }
}

/// The disk, snapshot or image a new disk, snapshot or image is made from, if any.
fn source_of(input: &Value) -> Option<&str> {
    let p = &input["properties"];
    let os = &p["storageProfile"]["osDisk"];
    [
        &p["creationData"]["sourceResourceId"],
        &p["creationData"]["imageReference"]["id"],
        &os["managedDisk"]["id"],
        &os["snapshot"]["id"],
    ]
    .into_iter()
    .find_map(Value::as_str)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    #[test]
    fn the_source_of_a_copy_an_image_disk_and_an_image() {
        let copy = json!({"properties": {"creationData": {"createOption": "Copy", "sourceResourceId": "/s/a"}}});
        assert_eq!(super::source_of(&copy), Some("/s/a"));
        let from_image =
            json!({"properties": {"creationData": {"imageReference": {"id": "/s/i"}}}});
        assert_eq!(super::source_of(&from_image), Some("/s/i"));
        let image =
            json!({"properties": {"storageProfile": {"osDisk": {"snapshot": {"id": "/s/n"}}}}});
        assert_eq!(super::source_of(&image), Some("/s/n"));
        assert_eq!(
            super::source_of(&json!({"properties": {"creationData": {"createOption": "Empty"}}})),
            None
        );
    }
}
