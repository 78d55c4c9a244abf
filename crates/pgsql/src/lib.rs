//! kagi-pgsql: the PostgreSQL wire protocol (v3) front end of kagi's SQL service.
//!
//! Logical SQL servers whose databases are SQLite databases: clients (psql, psycopg, any
//! libpq or protocol-level driver) connect over TLS; the server is chosen by the TLS SNI host
//! name `{server}.{dns-suffix}` or a user name `login@server`; logins authenticate with
//! SCRAM-SHA-256 against stored verifiers, or with an access token as the password (Entra
//! principals); SQL (SQLite's dialect) runs on a `rusqlite::Connection` the service opens.
//! The service implements [`Gateway`]; [`serve`] does the rest. A server that another front
//! end serves ([`Gateway::upstream`]) has its connections spliced there after the
//! StartupMessage ([`Upstream`]). See docs/PGWIRE.md.
//!
//! ```no_run
//! # use std::sync::Arc;
//! # async fn run(gateway: Arc<dyn kagi_pgsql::Gateway>, tls: Arc<kagi_pgsql::rustls::ServerConfig>) -> Result<(), kagi_pgsql::ServeError> {
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:5432").await?;
//! let shutdown = kagi_pgsql::CancellationToken::new();
//! let config = kagi_pgsql::PgConfig { tls: Some(tls), ..Default::default() };
//! kagi_pgsql::serve(listener, None, gateway, config, shutdown).await
//! # }
//! ```

#![forbid(unsafe_code)]

mod catalog;
mod commands;
mod error;
mod forward;
mod gateway;
mod peers;
mod results;
pub mod scram;
mod server;
mod session;
mod settings;
mod sql;
mod sqlite;
pub mod types;
pub mod wire;

pub use error::{PgError, ServeError, Severity, sqlstate};
pub use forward::{FORWARDED_BY, UPSTREAM_PHRASE, Upstream};
pub use gateway::{
    CommitBarrier, Credential, Gateway, LoginChange, OpenDatabase, Termination, Terminator,
};
/// The SQLite binding of [`OpenDatabase::connection`].
pub use rusqlite;
/// The TLS library of [`PgConfig::tls`].
pub use rustls;
pub use scram::ScramVerifier;
pub use server::{PgConfig, serve};
pub use settings::SERVER_VERSION;
pub use tokio_util::sync::CancellationToken;

/// Entry points for the fuzz targets (crates/pgsql/fuzz): the parts of the front end that
/// read client input and are not reachable through [`wire`] and [`types`].
pub mod fuzzing {
    /// Splits `input` into statements, classifies each and rewrites it for SQLite.
    pub fn sql(input: &str) {
        for stmt in crate::sql::split_statements(input) {
            let _ = crate::commands::classify(stmt);
            let _ = crate::sql::rewrite(stmt);
        }
    }
}
