//! PostgreSQL, for several kagi nodes sharing one database (and a hot standby serving a
//! read-only node). The statements are the SQLite store's; the schema is the same tables with
//! PostgreSQL's types (`BIGINT` for SQLite's 64-bit `INTEGER`, `BYTEA` for `BLOB`).

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyPool, ConnectOptions, Row};

use super::{corrupt, install_drivers, sqlite};
use crate::Result;

/// One version of the PostgreSQL schema.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Step {
    /// A step of SQLite's list, translated ([`from_sqlite`]): one schema, two engines.
    Sqlite(&'static str),
    /// PostgreSQL's own.
    Postgres(&'static str),
}

/// Schema versions, applied in order; `kagi_schema.version` records how far a database has
/// come. SQLite's steps are taken as they are, translated, except the two that only SQLite
/// needs in its form; a schema change appends a step to SQLite's list and here.
const MIGRATIONS: &[Step] = &[
    Step::Sqlite(sqlite::BASE_SCHEMA),
    Step::Sqlite(sqlite::SECRETS_SCHEMA),
    Step::Sqlite(crate::directory::SCHEMA),
    Step::Sqlite(crate::events::SCHEMA),
    Step::Sqlite(crate::services::SCHEMA),
    // SQLite's step moves the bindings of an earlier kagi over; a new database has none.
    Step::Postgres(BINDINGS),
    Step::Sqlite(crate::alerts::SCHEMA),
    Step::Postgres(ALERT_ORDER),
    Step::Postgres(CHANGE_FEED),
    Step::Postgres(LEASES),
    Step::Postgres(ASSERTIONS),
    Step::Postgres(CHANGE_FEED_2),
];

/// `crate::directory::BINDINGS_SCHEMA`'s resulting table.
const BINDINGS: &str = r#"
DROP TABLE identity_bindings;
CREATE TABLE identity_bindings (
    id TEXT PRIMARY KEY, secret_hash BYTEA NOT NULL UNIQUE, resource_id TEXT NOT NULL,
    client_id TEXT, created BIGINT NOT NULL, expires BIGINT NOT NULL);
CREATE INDEX identity_bindings_resource ON identity_bindings(resource_id);
"#;

/// SQLite's implicit rowid, which orders alert deliveries made in the same millisecond.
const ALERT_ORDER: &str = "ALTER TABLE alert_deliveries ADD COLUMN rowid BIGSERIAL;";

/// SQLite's schema in PostgreSQL's types: `BIGINT` for SQLite's 64-bit `INTEGER`, `BYTEA` for
/// `BLOB` (whole words only; the statements are otherwise the same).
fn from_sqlite(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len() + 64);
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut String| {
        out.push_str(match word.as_str() {
            "INTEGER" => "BIGINT",
            "BLOB" => "BYTEA",
            w => w,
        });
        word.clear();
    };
    for c in sql.chars() {
        if c.is_ascii_alphanumeric() || c == '_' {
            word.push(c);
        } else {
            flush(&mut word, &mut out);
            out.push(c);
        }
    }
    flush(&mut word, &mut out);
    out
}

impl Step {
    fn sql(self) -> std::borrow::Cow<'static, str> {
        match self {
            Self::Sqlite(sql) => from_sqlite(sql).into(),
            Self::Postgres(sql) => sql.into(),
        }
    }
}

/// The change feed, second form: a scope's number is drawn once its row is locked (two writers
/// of one scope then commit increasing numbers, which `--consistency strict` relies on), and
/// subscriptions (kept in every node's directory) are stamped too.
const CHANGE_FEED_2: &str = r#"
CREATE OR REPLACE FUNCTION kagi_note_change() RETURNS trigger LANGUAGE plpgsql AS $fn$
DECLARE
    changed TEXT := TG_ARGV[0];
BEGIN
    IF TG_NARGS > 1 THEN
        changed := changed || ':' || (to_jsonb(CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END)
            ->> TG_ARGV[1]);
    END IF;
    INSERT INTO kagi_changes (scope, seq) VALUES (changed, 0)
        ON CONFLICT ON CONSTRAINT kagi_changes_pkey DO NOTHING;
    UPDATE kagi_changes SET seq = nextval('kagi_change_seq') WHERE kagi_changes.scope = changed;
    PERFORM pg_notify('kagi_changes', changed);
    RETURN NULL;
END
$fn$;
CREATE TRIGGER subscriptions_changed AFTER INSERT OR UPDATE OR DELETE ON subscriptions
    FOR EACH ROW EXECUTE FUNCTION kagi_note_change('directory');
"#;

/// Client assertions accepted by any node, until they expire (RFC 7523: accepted once).
const ASSERTIONS: &str = r#"
CREATE TABLE kagi_assertions (
    client TEXT NOT NULL, jti_digest BYTEA NOT NULL, forget_at BIGINT NOT NULL,
    PRIMARY KEY (client, jti_digest));
CREATE INDEX kagi_assertions_forget ON kagi_assertions (forget_at);
"#;

/// Leases for singleton work (`crate::lease`), on the database's clock. A write made under a
/// fence (the session setting `kagi.fence` = `name holder fencing`, set when the connection is
/// taken from the pool) is refused unless that lease is still the holder's with that fencing
/// number and unexpired: checked by a statement trigger in the writing transaction, sharing
/// the lease row's lock so that a takeover waits for it or it sees the takeover.
///
/// Versions also get a unique order here: a node whose memory lags another's must not add a
/// version with the order number another node just gave one (which would make "the current
/// version" ambiguous); it gets `Conflict` instead, and its memory catches up.
const LEASES: &str = r#"
CREATE UNIQUE INDEX key_versions_order ON key_versions (vault, name_folded, seq);
CREATE UNIQUE INDEX secret_versions_order ON secret_versions (vault, name_folded, seq);
CREATE TABLE kagi_leases (
    name TEXT PRIMARY KEY, holder TEXT NOT NULL, fencing BIGINT NOT NULL,
    expires TIMESTAMPTZ NOT NULL);
CREATE FUNCTION kagi_check_fence() RETURNS trigger LANGUAGE plpgsql AS $fn$
DECLARE
    fence TEXT := current_setting('kagi.fence', true);
    part TEXT[];
BEGIN
    IF fence IS NULL OR fence = '' THEN
        RETURN NULL;
    END IF;
    part := string_to_array(fence, ' ');
    PERFORM 1 FROM kagi_leases
        WHERE name = part[1] AND holder = part[2] AND fencing = part[3]::BIGINT
          AND expires > clock_timestamp()
        FOR SHARE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'lease % is no longer held with fencing number % by %',
            part[1], part[3], part[2] USING ERRCODE = 'KG001';
    END IF;
    RETURN NULL;
END
$fn$;
"#;

/// The tables singleton work writes, whose writes a fence guards.
const FENCED_TABLES: &[&str] = &[
    "vaults",
    "keys",
    "key_versions",
    "secrets",
    "secret_versions",
    "key_rotation_policies",
    "key_event_marks",
    "secret_event_marks",
    "event_outbox",
    "event_deliveries",
    "alert_deliveries",
];

/// The change feed (docs/SEVERAL_NODES.md): every write to a table whose rows a node keeps in
/// memory stamps the row's scope (`vault:<name>`, `directory`, …) in `kagi_changes` with a new
/// number and notifies channel `kagi_changes` with the scope, in the writing transaction, so
/// a node learns of it at once (LISTEN) or at its next re-check (a standby, a lost
/// notification). Triggers, not the statements, stamp: no write can forget to.
const CHANGE_FEED: &str = r#"
CREATE SEQUENCE kagi_change_seq;
CREATE TABLE kagi_changes (scope TEXT PRIMARY KEY, seq BIGINT NOT NULL);
CREATE FUNCTION kagi_note_change() RETURNS trigger LANGUAGE plpgsql AS $fn$
DECLARE
    scope TEXT := TG_ARGV[0];
BEGIN
    IF TG_NARGS > 1 THEN
        scope := scope || ':' || (to_jsonb(CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END)
            ->> TG_ARGV[1]);
    END IF;
    INSERT INTO kagi_changes (scope, seq) VALUES (scope, nextval('kagi_change_seq'))
        ON CONFLICT ON CONSTRAINT kagi_changes_pkey DO UPDATE SET seq = excluded.seq;
    PERFORM pg_notify('kagi_changes', scope);
    RETURN NULL;
END
$fn$;
CREATE TRIGGER vaults_changed AFTER INSERT OR UPDATE OR DELETE ON vaults
    FOR EACH ROW EXECUTE FUNCTION kagi_note_change('vault', 'name');
CREATE TRIGGER keys_changed AFTER INSERT OR UPDATE OR DELETE ON keys
    FOR EACH ROW EXECUTE FUNCTION kagi_note_change('vault', 'vault');
CREATE TRIGGER key_versions_changed AFTER INSERT OR UPDATE OR DELETE ON key_versions
    FOR EACH ROW EXECUTE FUNCTION kagi_note_change('vault', 'vault');
CREATE TRIGGER secrets_changed AFTER INSERT OR UPDATE OR DELETE ON secrets
    FOR EACH ROW EXECUTE FUNCTION kagi_note_change('vault', 'vault');
CREATE TRIGGER secret_versions_changed AFTER INSERT OR UPDATE OR DELETE ON secret_versions
    FOR EACH ROW EXECUTE FUNCTION kagi_note_change('vault', 'vault');
CREATE TRIGGER principals_changed AFTER INSERT OR UPDATE OR DELETE ON principals
    FOR EACH ROW EXECUTE FUNCTION kagi_note_change('directory');
CREATE TRIGGER resources_changed AFTER INSERT OR UPDATE OR DELETE ON resources
    FOR EACH ROW EXECUTE FUNCTION kagi_note_change('directory');
CREATE TRIGGER role_definitions_changed AFTER INSERT OR UPDATE OR DELETE ON role_definitions
    FOR EACH ROW EXECUTE FUNCTION kagi_note_change('directory');
CREATE TRIGGER role_assignments_changed AFTER INSERT OR UPDATE OR DELETE ON role_assignments
    FOR EACH ROW EXECUTE FUNCTION kagi_note_change('directory');
CREATE TRIGGER principal_certificates_changed
    AFTER INSERT OR UPDATE OR DELETE ON principal_certificates
    FOR EACH ROW EXECUTE FUNCTION kagi_note_change('directory');
CREATE TRIGGER locks_changed AFTER INSERT OR UPDATE OR DELETE ON locks
    FOR EACH ROW EXECUTE FUNCTION kagi_note_change('directory');
CREATE TRIGGER identity_bindings_changed AFTER INSERT OR UPDATE OR DELETE ON identity_bindings
    FOR EACH ROW EXECUTE FUNCTION kagi_note_change('directory');
"#;

/// The advisory lock key that serialises migrations (the bytes of "kagi").
const MIGRATION_LOCK: i64 = 0x6b61_6769;

/// Connects and brings the schema up to date.
pub(super) async fn open(url: &str) -> Result<AnyPool> {
    let pool = pool(url, "SET TIME ZONE 'UTC'").await?;
    migrate(&pool).await?;
    Ok(pool)
}

/// Connects with every transaction read-only; the schema must be this kagi's.
pub(super) async fn open_read_only(url: &str) -> Result<AnyPool> {
    let pool = pool(
        url,
        "SET TIME ZONE 'UTC'; SET default_transaction_read_only = on",
    )
    .await?;
    let current = version(&pool).await?;
    if current != MIGRATIONS.len() as i64 {
        return Err(corrupt(
            "schema",
            format!(
                "database schema {current} is not this kagi's ({}); a read-only node does not \
                 migrate: start this kagi once without --read-only on the primary",
                MIGRATIONS.len()
            ),
        ));
    }
    Ok(pool)
}

async fn pool(url: &str, settings: &'static str) -> Result<AnyPool> {
    install_drivers();
    let options = AnyConnectOptions::from_url(&url.parse().map_err(|e| {
        crate::StoreError::Database(format!("the PostgreSQL URL is not valid: {e}"))
    })?)?;
    Ok(AnyPoolOptions::new()
        .max_connections(16)
        // Both run in the task taking the connection — `after_connect` for a new one,
        // `before_acquire` for one reused from the pool — so either way that task's fence (or
        // none) becomes the session's, which the fence trigger checks.
        .after_connect(move |conn, _| {
            let fence = current_fence();
            Box::pin(async move {
                sqlx::raw_sql(settings).execute(&mut *conn).await?;
                set_fence(conn, fence).await?;
                Ok(())
            })
        })
        .before_acquire(|conn, _| {
            let fence = current_fence();
            Box::pin(async move {
                set_fence(conn, fence).await?;
                Ok(true)
            })
        })
        .connect_with(options)
        .await?)
}

/// The running task's fence as the session setting's value (empty: none).
fn current_fence() -> String {
    crate::lease::current()
        .map(|f| f.setting())
        .unwrap_or_default()
}

async fn set_fence(conn: &mut sqlx::AnyConnection, fence: String) -> sqlx::Result<()> {
    sqlx::query("SELECT set_config('kagi.fence', $1, false)")
        .bind(fence)
        .execute(conn)
        .await?;
    Ok(())
}

/// The schema version of the database (0 when kagi never ran on it).
async fn version(pool: &AnyPool) -> Result<i64> {
    let exists: Option<i64> = sqlx::query_scalar(
        "SELECT 1::BIGINT FROM pg_catalog.pg_tables \
         WHERE schemaname = current_schema() AND tablename = 'kagi_schema'",
    )
    .fetch_optional(pool)
    .await?;
    if exists.is_none() {
        return Ok(0);
    }
    Ok(sqlx::query_scalar("SELECT version FROM kagi_schema")
        .fetch_optional(pool)
        .await?
        .unwrap_or(0))
}

/// Applies the missing migrations in one transaction. Nodes starting at once queue on a
/// transaction-scoped advisory lock (released by the commit, so a connection pooler in
/// transaction mode keeps it intact); the first applies, the others find the schema current.
async fn migrate(pool: &AnyPool) -> Result<()> {
    let mut tx = pool.begin().await?;
    // The function returns `void`, which the Any driver cannot decode: select a constant.
    sqlx::query("SELECT 1::BIGINT FROM (SELECT pg_advisory_xact_lock($1)) AS locked")
        .bind(MIGRATION_LOCK)
        .fetch_one(&mut *tx)
        .await?;
    sqlx::raw_sql("CREATE TABLE IF NOT EXISTS kagi_schema (version BIGINT NOT NULL)")
        .execute(&mut *tx)
        .await?;
    let current: i64 = sqlx::query_scalar("SELECT version FROM kagi_schema")
        .fetch_optional(&mut *tx)
        .await?
        .unwrap_or(0);
    if current > MIGRATIONS.len() as i64 {
        return Err(corrupt(
            "schema",
            format!("database schema {current} is newer than this kagi understands"),
        ));
    }
    for step in MIGRATIONS.iter().skip(current as usize) {
        // The steps are this file's constants and SQLite's, never input.
        sqlx::raw_sql(sqlx::AssertSqlSafe(step.sql().into_owned()))
            .execute(&mut *tx)
            .await?;
        if *step == Step::Postgres(LEASES) {
            for table in FENCED_TABLES {
                // Table names from the list above, never from input.
                sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                    "CREATE TRIGGER {table}_fenced BEFORE INSERT OR UPDATE OR DELETE ON {table} \
                     FOR EACH STATEMENT EXECUTE FUNCTION kagi_check_fence()"
                )))
                .execute(&mut *tx)
                .await?;
            }
        }
    }
    sqlx::query("DELETE FROM kagi_schema")
        .execute(&mut *tx)
        .await?;
    sqlx::query("INSERT INTO kagi_schema (version) VALUES ($1)")
        .bind(MIGRATIONS.len() as i64)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(())
}

/// Every scope's last change number.
pub(super) async fn change_marks(pool: &AnyPool) -> Result<Vec<(String, i64)>> {
    let rows = sqlx::query("SELECT scope, seq FROM kagi_changes ORDER BY scope")
        .fetch_all(pool)
        .await?;
    rows.iter()
        .map(|r| Ok((r.try_get("scope")?, r.try_get("seq")?)))
        .collect()
}

/// The change numbers of the directory and of vault `vault`.
pub(super) async fn change_marks_for(pool: &AnyPool, vault: &str) -> Result<Vec<(String, i64)>> {
    let rows = sqlx::query("SELECT scope, seq FROM kagi_changes WHERE scope = $1 OR scope = $2")
        .bind(crate::changes::DIRECTORY_SCOPE)
        .bind(format!("{}{vault}", crate::changes::VAULT_SCOPE_PREFIX))
        .fetch_all(pool)
        .await?;
    rows.iter()
        .map(|r| Ok((r.try_get("scope")?, r.try_get("seq")?)))
        .collect()
}

/// LISTEN on channel `kagi_changes` (its own connection, outside the pool).
pub(super) struct Listener(sqlx::postgres::PgListener);

impl Listener {
    pub(super) async fn connect(url: &str) -> Result<Self> {
        let mut listener = sqlx::postgres::PgListener::connect(url).await?;
        listener.listen("kagi_changes").await?;
        Ok(Self(listener))
    }
}

#[async_trait::async_trait]
impl crate::changes::ChangeWatch for Listener {
    async fn next(&mut self) -> Result<Option<String>> {
        // `try_recv` answers None when the connection was lost; the next call re-connects and
        // listens again, and what was sent meanwhile is gone.
        Ok(self.0.try_recv().await?.map(|n| n.payload().to_string()))
    }
}

/// Takes or renews a lease (see `crate::Store::acquire_lease`).
pub(super) async fn acquire_lease(
    pool: &AnyPool,
    name: &str,
    holder: &str,
    ttl_ms: i64,
) -> Result<Option<i64>> {
    // One statement: a free or expired lease changes hands (fencing + 1); the holder's own is
    // renewed; another holder's live lease is left alone (no row returned).
    Ok(sqlx::query_scalar(
        "INSERT INTO kagi_leases (name, holder, fencing, expires) \
         VALUES ($1, $2, 1, clock_timestamp() + $3 * INTERVAL '1 millisecond') \
         ON CONFLICT (name) DO UPDATE SET \
           fencing = CASE WHEN kagi_leases.holder = excluded.holder THEN kagi_leases.fencing \
                          ELSE kagi_leases.fencing + 1 END, \
           holder = excluded.holder, expires = excluded.expires \
         WHERE kagi_leases.holder = excluded.holder OR kagi_leases.expires <= clock_timestamp() \
         RETURNING fencing",
    )
    .bind(name)
    .bind(holder)
    .bind(ttl_ms)
    .fetch_optional(pool)
    .await?)
}

/// Ends a lease now, if `holder` has it.
pub(super) async fn release_lease(pool: &AnyPool, name: &str, holder: &str) -> Result<()> {
    sqlx::query(
        "UPDATE kagi_leases SET expires = clock_timestamp() WHERE name = $1 AND holder = $2",
    )
    .bind(name)
    .bind(holder)
    .execute(pool)
    .await?;
    Ok(())
}

/// The live holder of a lease, if any.
pub(super) async fn lease_holder(pool: &AnyPool, name: &str) -> Result<Option<String>> {
    Ok(sqlx::query_scalar(
        "SELECT holder FROM kagi_leases WHERE name = $1 AND expires > clock_timestamp()",
    )
    .bind(name)
    .fetch_optional(pool)
    .await?)
}

/// Records an accepted client assertion; `false` when it is recorded and unexpired already.
pub(super) async fn remember_assertion(
    pool: &AnyPool,
    client: &str,
    key: &[u8],
    forget_at: i64,
    now: i64,
) -> Result<bool> {
    let mut tx = pool.begin().await?;
    // Expired ones go first (a handful per accepted assertion, on an index).
    sqlx::query("DELETE FROM kagi_assertions WHERE forget_at <= $1")
        .bind(now)
        .execute(&mut *tx)
        .await?;
    let fresh = sqlx::query(
        "INSERT INTO kagi_assertions (client, jti_digest, forget_at) VALUES ($1, $2, $3) \
         ON CONFLICT (client, jti_digest) DO NOTHING",
    )
    .bind(client)
    .bind(key)
    .bind(forget_at)
    .execute(&mut *tx)
    .await?
    .rows_affected()
        == 1;
    tx.commit().await?;
    Ok(fresh)
}
