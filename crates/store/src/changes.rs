//! The change feed of a store that several kagi nodes share (docs/SEVERAL_NODES.md).
//!
//! Each node keeps vaults and the directory in memory. A write on one node stamps the scope it
//! touched (`vault:<name>`, `directory`) with a new number in the same transaction; the other
//! nodes reload a scope when its number moves. They learn of it from a notification at once
//! ([`ChangeWatch`], PostgreSQL's LISTEN) and, because notifications are lost across reconnects
//! and a hot standby has none, from a periodic re-check of [`crate::Store::change_marks`].

use async_trait::async_trait;

/// The scope of a vault's record, keys, secrets and their versions is this and its name.
pub const VAULT_SCOPE_PREFIX: &str = "vault:";

/// The scope of principals, identity-carrying resources, roles, role assignments, locks,
/// certificates and workload bindings.
pub const DIRECTORY_SCOPE: &str = "directory";

/// A subscription to change notifications.
#[async_trait]
pub trait ChangeWatch: Send {
    /// The next scope that changed; `Ok(None)` when notifications may have been lost (the
    /// connection was re-made): the caller re-checks every scope.
    async fn next(&mut self) -> crate::Result<Option<String>>;
}
