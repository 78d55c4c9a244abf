//! The nodes of several on one store (docs/SEVERAL_NODES.md, "Homes"). A node's name is kept
//! in its data directory (`node-name`), so a restarted node is the same node; while it runs, it
//! holds the lease `node:{name}` and has told the store where the others reach it (the
//! document `node/{name}` of `/kagi/nodes`). What lives in one node's data directory — a disk
//! family's log, a SQL server's databases — names that node as its home, and the other nodes
//! forward its requests there.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use kagi_core::KvError;
use kagi_host::NodeCard;

use crate::StartupError;
use crate::{Platform, internal};

/// The store key of the nodes' documents.
const NODES_KEY: &str = "/kagi/nodes";
/// Their kind.
const NODE_KIND: &str = "node";
/// How long a node counts as running after its last renewal (renewed every third of it).
const PRESENCE_MS: i64 = 10_000;

/// The lease a running node holds.
fn presence_lease(name: &str) -> String {
    format!("node:{name}")
}

/// This data directory's node name, made on first start: the host name and 8 random hex
/// digits (two nodes copied from one data directory must not share it: the file is not
/// copied with the root key).
pub(crate) fn load_node_name(dir: &Path) -> Result<String, StartupError> {
    let path = dir.join("node-name");
    match std::fs::read_to_string(&path) {
        Ok(s) if valid_name(s.trim()) => return Ok(s.trim().to_string()),
        Ok(_) => {
            return Err(StartupError::Corrupt(format!(
                "{}: not a node name (letters, digits, '-' and '.', at most 64)",
                path.display()
            )));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(StartupError::Io {
                path: path.display().to_string(),
                source,
            });
        }
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| {
            h.trim()
                .chars()
                .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
                .take(40)
                .collect::<String>()
        })
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "node".into());
    let random: [u8; 4] =
        kagi_crypto::random_array().map_err(|e| StartupError::RootKey(e.to_string()))?;
    let name = format!(
        "{host}-{}",
        random
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    );
    kagi_fs::write_atomically(&path, name.as_bytes(), 0o600).map_err(|source| {
        StartupError::Io {
            path: path.display().to_string(),
            source,
        }
    })?;
    Ok(name)
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
}

impl Platform {
    /// This node's name (see the module).
    pub fn node_name(&self) -> &str {
        &self.node_name
    }

    /// Announces this node to the others and keeps its presence lease, until the process
    /// ends: where they reach it (`card`; its name is this node's). A node that cannot renew
    /// for [`PRESENCE_MS`] counts as stopped: requests for what it holds are refused with 503
    /// until it is back. Never returns.
    pub async fn keep_presence(self: Arc<Self>, card: NodeCard) {
        let card = NodeCard {
            name: self.node_name.clone(),
            ..card
        };
        let lease = presence_lease(&card.name);
        let mut announced = false;
        loop {
            // The holder is the name itself: a node restarted within the lease is present
            // again at once rather than after the lease of its previous process ran out.
            match self
                .store
                .acquire_lease(&lease, &card.name, PRESENCE_MS)
                .await
            {
                Ok(Some(_)) => {}
                Ok(None) => {
                    tracing::warn!(node = %card.name, "another process holds this node's presence")
                }
                Err(e) => tracing::warn!(error = %e, "cannot renew this node's presence"),
            }
            if !announced {
                match serde_json::to_value(&card) {
                    Ok(doc) => match self
                        .put_service_document(NODES_KEY, NODE_KIND, &card.name, &doc)
                        .await
                    {
                        Ok(()) => announced = true,
                        Err(_) => tracing::warn!("cannot announce this node; retrying"),
                    },
                    Err(e) => tracing::error!(error = %e, "node card"),
                }
            }
            tokio::time::sleep(Duration::from_millis(PRESENCE_MS as u64 / 3)).await;
        }
    }

    /// Whether other nodes may share this node's store (PostgreSQL). On one node (SQLite)
    /// homes mean nothing: everything is served here, whatever node names were recorded (a
    /// data directory copied elsewhere, or its `node-name` made anew).
    pub fn shares_store(&self) -> bool {
        self.store.shared()
    }

    /// The nodes running now, this one first — while it holds its presence lease, as the
    /// others see it: a node cut off from the store for longer (or not yet present) is not
    /// running to itself either, so it takes nothing over. On one node (SQLite) only this one.
    pub async fn live_nodes(&self) -> Result<Vec<NodeCard>, KvError> {
        let mut nodes = vec![NodeCard {
            name: self.node_name.clone(),
            https: String::new(),
            sql: Some(String::new()),
            nbd: None,
        }];
        for (name, doc) in self.service_documents(NODES_KEY, NODE_KIND).await? {
            if name == self.node_name {
                if let Ok(card) = serde_json::from_value::<NodeCard>(doc) {
                    nodes[0] = card;
                }
                continue;
            }
            let holder = self
                .store
                .lease_holder(&presence_lease(&name))
                .await
                .map_err(|e| internal("read a node's presence", e))?;
            if holder.as_deref() != Some(name.as_str()) {
                continue;
            }
            match serde_json::from_value::<NodeCard>(doc) {
                Ok(card) => nodes.push(card),
                Err(e) => tracing::warn!(node = %name, error = %e, "unreadable node card"),
            }
        }
        if self.shares_store() {
            let holder = self
                .store
                .lease_holder(&presence_lease(&self.node_name))
                .await
                .map_err(|e| internal("read this node's presence", e))?;
            if holder.as_deref() != Some(self.node_name.as_str()) {
                nodes.remove(0);
            }
        }
        Ok(nodes)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_node_keeps_its_name_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let first = super::load_node_name(dir.path()).unwrap();
        assert!(super::valid_name(&first), "{first}");
        assert_eq!(super::load_node_name(dir.path()).unwrap(), first);
        std::fs::write(dir.path().join("node-name"), "bad name/").unwrap();
        assert!(super::load_node_name(dir.path()).is_err());
    }
}
