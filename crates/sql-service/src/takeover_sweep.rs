//! The takeover sweep (docs/SEVERAL_NODES.md, "SQL servers whose home is gone"): a server
//! whose home is gone is taken over without waiting for a request naming it, so that its
//! backups, TDE probes and retention go on and its first client does not wait for the
//! takeover. Every node that could take a server over (it ships live logs, serves SQL and is
//! present itself) looks every few seconds for servers whose recorded home is not among the
//! running nodes and, once this node has seen that home absent for `KAGI_TAKEOVER_AFTER`
//! seconds (default 30: a node restarting quickly keeps its servers), takes each over through
//! [`SqlService::serving_home`], the path a request takes, if it is that home's taker
//! ([`SqlService::sql_taker`]: a lost node's servers go to one node); once the taker has made
//! no progress for a while, whichever it is (the taker may be failing). Nodes sweeping at once are safe: the takeover's lease decides, and the others
//! find the new home at their next pass.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use kagi_core::takeover::{GoneHomes, Taker};
use serde_json::Value;

use crate::{SERVER_TYPE, SqlService, id_of_body};

/// Starts the sweep on a node that ships live logs (several nodes, blobs in a bucket); on any
/// other node nothing is ever taken over, and nothing is started.
pub(crate) fn spawn_takeover_sweep(service: Arc<SqlService>) {
    if !service.ships_live_logs() {
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

impl SqlService {
    /// One pass of the sweep: every server whose home has been gone for the grace, and whose
    /// last failed try is far enough behind, taken over here (one after the other).
    async fn take_over_gone_homes(self: &Arc<Self>, gone: &mut GoneHomes) {
        let me = self.host.node_name();
        let nodes = match self.host.live_nodes().await {
            Ok(nodes) => nodes,
            Err(e) => {
                tracing::debug!(error = %e.message, "takeover sweep: the running nodes could not be read");
                return;
            }
        };
        // Only a node serving SQL takes a server over, and not while its own presence has
        // lapsed (cut off from the store, it is the one that looks gone).
        if !nodes.iter().any(|n| n.name == me && n.sql.is_some()) {
            gone.forget_all();
            return;
        }
        let live: HashSet<String> = nodes.iter().map(|n| n.name.clone()).collect();
        let records: HashMap<String, Value> = match self.home_records().await {
            Ok(records) => records.into_iter().collect(),
            Err(e) => {
                tracing::debug!(error = %e.message, "takeover sweep: the servers' homes could not be read");
                return;
            }
        };
        let mut elsewhere = Vec::new();
        // Gone homes a running node is taking a server of over now: their first taker is at
        // work, however long one server takes.
        let mut in_hand = HashSet::new();
        for server in self.host.resources_of_type(SERVER_TYPE) {
            let Some(record) = records.get(&id_of_body(&server).to_ascii_lowercase()) else {
                continue;
            };
            let Some(home) = record["node"].as_str().filter(|h| *h != me) else {
                continue;
            };
            if record["takingOver"]["node"]
                .as_str()
                .is_some_and(|t| live.contains(t))
            {
                in_hand.insert(home.to_string());
            }
            elsewhere.push((server, home.to_string()));
        }
        let now = Instant::now();
        let long_gone = gone.observe(elsewhere.iter().map(|(_, home)| home.as_str()), &live, now);
        for home in &in_hand {
            gone.progressing(home, now);
        }
        elsewhere.retain(|(_, home)| long_gone.contains(home));
        gone.keep_tries_of(elsewhere.iter().map(|(server, _)| id_of_body(server)));
        for (server, home) in elsewhere {
            let id = id_of_body(&server);
            if !gone.due(&id, Instant::now()) {
                continue;
            }
            let taker = gone.others_may_take(&home, Instant::now());
            // Another node's to take (read from what this pass has read already): it takes
            // it, or a request sent there does.
            if taker == Taker::First
                && crate::takeover::taker_among(&home, &nodes, records.values())
                    .is_some_and(|t| t != me)
            {
                gone.succeeded(&id);
                continue;
            }
            let outcome = self.serving_home(&server, home.clone(), taker).await;
            let here = outcome.map(|node| node == me && self.host.resource(&id).is_some());
            kagi_host::note_takeover(gone, "SQL server", (&id, &home), here);
        }
    }
}
