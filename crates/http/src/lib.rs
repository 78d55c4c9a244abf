//! kagi's HTTPS front end.
//!
//! One listener serves every host: `{vault}.{suffix}` is a vault's data plane, `{suffix}` (and
//! a bare loopback address) the token endpoint and the ARM-shaped management API. TLS
//! certificates come from a local CA created on first start and are minted per SNI name, so
//! every vault host has a certificate that names it exactly (OpenSSL rejects `*.localhost`).
//! Handlers only translate: parse, call [`kagi_vault::Platform`], render.

#![forbid(unsafe_code)]

mod agent_routes;
mod audit;
mod backup_routes;
mod context;
mod data_plane;
mod event_routes;
mod forward;
mod group_delete;
mod identity_routes;
mod management;
mod metrics;
mod monitor_routes;
mod move_routes;
mod operations;
mod provider_routes;
mod read_only;
mod respond;
mod route_table;
mod routing;
mod server;
mod services;
pub mod tls;

pub use context::RemoteAddr;
pub use metrics::enable_metrics;
pub use route_table::openapi_document;
pub use server::{ServeError, bind, serve, serve_bound_until, serve_until};
pub use services::Services;

/// Largest request body accepted (Key Vault's own limit for a request is far smaller).
pub const MAX_BODY: usize = 1024 * 1024;
