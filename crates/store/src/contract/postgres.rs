//! Scratch PostgreSQL databases for tests of the PostgreSQL store.
//!
//! `KAGI_TEST_POSTGRES_URL` names a server where the test may create databases (scripts/test.sh
//! starts one with `scripts/postgres.sh start` and sets it). Without it the PostgreSQL tests say
//! so on stderr and pass vacuously, unless `KAGI_REQUIRE_POSTGRES=1` (scripts/test.sh sets it
//! too): then a missing server fails them.

use std::sync::atomic::{AtomicU32, Ordering};

use sqlx::Connection;

/// The server the tests use, if one is configured.
///
/// # Panics
/// When none is configured and `KAGI_REQUIRE_POSTGRES=1`.
pub fn server_url() -> Option<String> {
    match std::env::var("KAGI_TEST_POSTGRES_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ if std::env::var("KAGI_REQUIRE_POSTGRES").as_deref() == Ok("1") => {
            panic!("KAGI_REQUIRE_POSTGRES=1 but KAGI_TEST_POSTGRES_URL is not set")
        }
        _ => {
            eprintln!(
                "SKIPPED: no PostgreSQL (set KAGI_TEST_POSTGRES_URL, e.g. from \
                 `scripts/postgres.sh start DIR`; scripts/test.sh does)"
            );
            None
        }
    }
}

/// Creates an empty database on the test server and returns its URL. Each call makes a new
/// one (named after the process and a counter), so tests running at once never share data;
/// the server is a scratch cluster that scripts/test.sh removes as a whole.
///
/// # Panics
/// When the server cannot be reached or refuses.
pub async fn scratch_database(server: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let name = format!(
        "kagi_test_{}_{}_{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    let mut admin = sqlx::PgConnection::connect(server)
        .await
        .expect("connect to the test PostgreSQL");
    // The name is made above from numbers, never from input.
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut admin)
        .await
        .expect("create a scratch database");
    let _ = admin.close().await;
    let mut url = url_parts(server);
    url.path = name;
    url.to_string()
}

/// A `postgres://…/db?params` URL split at its database name.
struct PgUrl {
    base: String,
    path: String,
    query: String,
}

fn url_parts(url: &str) -> PgUrl {
    let (before_query, query) = match url.split_once('?') {
        Some((b, q)) => (b, format!("?{q}")),
        None => (url, String::new()),
    };
    // The database is what follows the first '/' after "scheme://authority".
    let authority_start = before_query.find("://").map(|i| i + 3).unwrap_or(0);
    let (base, path) = match before_query[authority_start..].find('/') {
        Some(i) => (
            &before_query[..authority_start + i],
            &before_query[authority_start + i + 1..],
        ),
        None => (before_query, ""),
    };
    PgUrl {
        base: base.to_string(),
        path: path.to_string(),
        query,
    }
}

impl std::fmt::Display for PgUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}{}", self.base, self.path, self.query)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_database_name_is_replaced_and_parameters_kept() {
        let mut u = super::url_parts("postgres://u:p@127.0.0.1:5/kagi?sslmode=disable");
        u.path = "x".into();
        assert_eq!(
            u.to_string(),
            "postgres://u:p@127.0.0.1:5/x?sslmode=disable"
        );
        let mut u = super::url_parts("postgres://127.0.0.1:5");
        u.path = "x".into();
        assert_eq!(u.to_string(), "postgres://127.0.0.1:5/x");
    }
}
