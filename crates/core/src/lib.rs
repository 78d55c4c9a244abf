//! kagi's pure core: the names, models and rules of the key vault, with no I/O and no async.
//!
//! Everything here is deterministic given its inputs (time and randomness are passed in), so
//! the rules can be tested exhaustively without a server, a store or a clock.

#![forbid(unsafe_code)]

pub mod access;
pub mod agent;
pub mod alert;
pub mod api_version;
pub mod b64;
pub mod error;
pub mod event;
pub mod gauge;
pub mod ids;
pub mod jobs;
pub mod key;
pub mod management_routes;
pub mod odata;
pub mod openapi;
pub mod paging;
pub mod policy;
pub mod rbac;
pub mod rotation;
pub mod route_table;
pub mod routes;
pub mod secret;
pub mod takeover;
pub mod time;
pub mod vault;

pub use error::{ErrorCode, KvError};
pub use ids::{KeyVersion, ObjectName, ResourceGroupName, SubscriptionId, TenantId, VaultName};
