//! The SQLite side of a session: the hooks installed on the connection the Gateway hands over
//! (authorizer, progress handler for cancel and statement_timeout, PostgreSQL functions
//! such as `version()` and `pg_sleep()`), and the mapping of SQLite errors to SQLSTATEs.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rusqlite::functions::FunctionFlags;
use rusqlite::hooks::{AuthAction, AuthContext, Authorization};
use rusqlite::{Connection, ErrorCode, ffi};

use crate::error::{PgError, sqlstate};
use crate::settings::Settings;

/// Shared between a session's thread and the async side: cancel and termination requests.
pub(crate) struct Control {
    /// A statement is running (cancel interrupts only then, as PostgreSQL's does).
    pub busy: AtomicBool,
    /// A cancel request arrived for the running statement.
    pub cancel: AtomicBool,
    /// statement_timeout deadline in ms since `epoch` (0: none).
    pub deadline_ms: AtomicU64,
    /// The deadline passed.
    pub timed_out: AtomicBool,
    /// The session is being terminated.
    pub dying: AtomicBool,
    epoch: Instant,
    interrupt: rusqlite::InterruptHandle,
}

impl Control {
    pub(crate) fn new(conn: &Connection) -> Arc<Self> {
        Arc::new(Self {
            busy: AtomicBool::new(false),
            cancel: AtomicBool::new(false),
            deadline_ms: AtomicU64::new(0),
            timed_out: AtomicBool::new(false),
            dying: AtomicBool::new(false),
            epoch: Instant::now(),
            interrupt: conn.get_interrupt_handle(),
        })
    }

    /// A CancelRequest: interrupts the running statement, if any.
    pub(crate) fn cancel(&self) {
        if self.busy.load(Ordering::SeqCst) {
            self.cancel.store(true, Ordering::SeqCst);
            self.interrupt.interrupt();
        }
    }

    /// Termination: interrupts whatever runs and makes every later statement fail.
    pub(crate) fn kill(&self) {
        self.dying.store(true, Ordering::SeqCst);
        self.cancel.store(true, Ordering::SeqCst);
        self.interrupt.interrupt();
    }

    /// A statement starts, with an optional timeout.
    pub(crate) fn start(&self, timeout_ms: u64) {
        self.cancel
            .store(self.dying.load(Ordering::SeqCst), Ordering::SeqCst);
        self.timed_out.store(false, Ordering::SeqCst);
        let deadline = if timeout_ms == 0 {
            0
        } else {
            self.now_ms().saturating_add(timeout_ms).max(1)
        };
        self.deadline_ms.store(deadline, Ordering::SeqCst);
        self.busy.store(true, Ordering::SeqCst);
    }

    /// The statement ended.
    pub(crate) fn stop(&self) {
        self.busy.store(false, Ordering::SeqCst);
        self.deadline_ms.store(0, Ordering::SeqCst);
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Whether the running statement must stop (checked by the progress handler and by
    /// pg_sleep).
    fn should_stop(&self) -> bool {
        if self.cancel.load(Ordering::SeqCst) {
            return true;
        }
        let d = self.deadline_ms.load(Ordering::SeqCst);
        if d != 0 && self.now_ms() >= d {
            self.timed_out.store(true, Ordering::SeqCst);
            return true;
        }
        false
    }

    /// The error for a statement stopped by cancel, timeout or termination, if it was.
    pub(crate) fn stop_reason(&self) -> Option<PgError> {
        if self.timed_out.load(Ordering::SeqCst) {
            Some(PgError::error(
                sqlstate::QUERY_CANCELED,
                "canceling statement due to statement timeout",
            ))
        } else if self.cancel.load(Ordering::SeqCst) {
            Some(PgError::error(
                sqlstate::QUERY_CANCELED,
                "canceling statement due to user request",
            ))
        } else {
            None
        }
    }
}

/// Who the session is, for the SQL functions.
pub(crate) struct Identity {
    pub login: String,
    pub database: String,
    pub pid: u32,
}

/// PRAGMAs a client may use: (name, may also be set). Not among the settable ones:
/// journal_mode, synchronous, page_size, auto_vacuum, writable_schema, locking_mode,
/// mmap_size and the directory and key pragmas, which the service owns (WAL mode, the page
/// format of the encrypting VFS); database_list is not readable (it shows file paths).
const PRAGMAS: &[(&str, bool)] = &[
    ("table_info", true),
    ("table_xinfo", true),
    ("table_list", true),
    ("index_list", true),
    ("index_info", true),
    ("index_xinfo", true),
    ("foreign_key_list", true),
    ("foreign_key_check", true),
    ("integrity_check", true),
    ("quick_check", true),
    ("collation_list", false),
    ("function_list", false),
    ("module_list", false),
    ("pragma_list", false),
    ("compile_options", false),
    ("page_count", false),
    ("page_size", false),
    ("freelist_count", false),
    ("max_page_count", false),
    ("user_version", true),
    ("application_id", true),
    ("schema_version", false),
    ("data_version", false),
    ("encoding", false),
    ("journal_mode", false),
    ("synchronous", false),
    ("auto_vacuum", false),
    ("foreign_keys", true),
    ("defer_foreign_keys", true),
    ("recursive_triggers", true),
    ("case_sensitive_like", true),
    // Readable only: an unbounded page cache would let one login exhaust the process.
    ("cache_size", false),
    ("busy_timeout", true),
    ("automatic_index", true),
    ("optimize", true),
    ("analysis_limit", true),
    ("query_only", true),
    ("reverse_unordered_selects", true),
    ("legacy_alter_table", true),
    ("ignore_check_constraints", true),
    ("stats", false),
    ("secure_delete", false),
    ("temp_store", false),
    ("incremental_vacuum", true),
    ("shrink_memory", true),
    ("cache_spill", true),
    ("count_changes", false),
    ("short_column_names", false),
    ("full_column_names", false),
];

fn authorize(ctx: AuthContext<'_>) -> Authorization {
    match ctx.action {
        // VACUUM attaches an empty name (a temporary database) internally: that one is
        // allowed; a named file never is.
        AuthAction::Attach { filename: "" } => Authorization::Allow,
        AuthAction::Attach { .. } | AuthAction::Detach { .. } => Authorization::Deny,
        AuthAction::Pragma {
            pragma_name,
            pragma_value,
        } => {
            let name = pragma_name.to_ascii_lowercase();
            let allowed = PRAGMAS
                .iter()
                .any(|(n, settable)| *n == name && (*settable || pragma_value.is_none()));
            if allowed {
                Authorization::Allow
            } else {
                Authorization::Deny
            }
        }
        AuthAction::Function { function_name }
            if function_name.eq_ignore_ascii_case("load_extension") =>
        {
            Authorization::Deny
        }
        _ => Authorization::Allow,
    }
}

/// Installs the session's hooks and functions on the connection.
pub(crate) fn prepare_connection(
    conn: &Connection,
    control: &Arc<Control>,
    settings: &Arc<Mutex<Settings>>,
    who: &Identity,
) -> rusqlite::Result<()> {
    use rusqlite::config::DbConfig;
    // Clients must not be able to corrupt the file (writable_schema, shadow tables), and SQL
    // in the schema runs only functions marked innocuous.
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_DEFENSIVE, true)?;
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_TRUSTED_SCHEMA, false)?;
    conn.authorizer(Some(authorize))?;
    let c = Arc::clone(control);
    conn.progress_handler(1000, Some(move || c.should_stop()))?;

    let pure = FunctionFlags::SQLITE_UTF8
        | FunctionFlags::SQLITE_DETERMINISTIC
        | FunctionFlags::SQLITE_INNOCUOUS;
    let volatile = FunctionFlags::SQLITE_UTF8;
    let version = format!(
        "PostgreSQL {} on {}-linux, SQLite {}",
        crate::settings::SERVER_VERSION,
        std::env::consts::ARCH,
        rusqlite::version()
    );
    conn.create_scalar_function("version", 0, pure, move |_| Ok(version.clone()))?;
    for name in ["current_user", "session_user", "current_role", "user"] {
        let login = who.login.clone();
        conn.create_scalar_function(name, 0, pure, move |_| Ok(login.clone()))?;
    }
    for name in ["current_database", "current_catalog"] {
        let db = who.database.clone();
        conn.create_scalar_function(name, 0, pure, move |_| Ok(db.clone()))?;
    }
    conn.create_scalar_function("current_schema", 0, pure, |_| Ok("public"))?;
    let pid = i64::from(who.pid);
    conn.create_scalar_function("pg_backend_pid", 0, pure, move |_| Ok(pid))?;
    for n_arg in [1, 2] {
        let s = Arc::clone(settings);
        conn.create_scalar_function("current_setting", n_arg, volatile, move |ctx| {
            let name: String = ctx.get(0)?;
            let missing_ok = n_arg == 2 && ctx.get::<bool>(1).unwrap_or(false);
            let guard = s
                .lock()
                .map_err(|_| rusqlite::Error::UserFunctionError("settings poisoned".into()))?;
            match guard.get(&name) {
                Some(v) => Ok(Some(v.to_owned())),
                None if missing_ok => Ok(None),
                None => Err(rusqlite::Error::UserFunctionError(
                    format!("unrecognized configuration parameter \"{name}\"").into(),
                )),
            }
        })?;
    }
    conn.create_scalar_function("now", 0, volatile, |_| Ok(crate::types::now_text()))?;
    conn.create_scalar_function("gen_random_uuid", 0, volatile, |_| {
        let mut b = [0u8; 16];
        aws_lc_rs::rand::fill(&mut b)
            .map_err(|_| rusqlite::Error::UserFunctionError("random generator failed".into()))?;
        b[6] = (b[6] & 0x0f) | 0x40;
        b[8] = (b[8] & 0x3f) | 0x80;
        Ok(crate::types::format_uuid(&b))
    })?;
    conn.create_scalar_function("pg_bool", 1, pure, |ctx| {
        use rusqlite::types::ValueRef;
        Ok(match ctx.get_raw(0) {
            ValueRef::Null => None,
            ValueRef::Integer(i) => Some(i != 0),
            ValueRef::Real(f) => Some(f != 0.0),
            ValueRef::Text(t) => match std::str::from_utf8(t)
                .ok()
                .and_then(crate::types::parse_bool)
            {
                Some(b) => Some(b),
                None => {
                    return Err(rusqlite::Error::UserFunctionError(
                        format!(
                            "invalid input syntax for type boolean: \"{}\"",
                            String::from_utf8_lossy(t)
                        )
                        .into(),
                    ));
                }
            },
            ValueRef::Blob(_) => {
                return Err(rusqlite::Error::UserFunctionError(
                    "cannot cast bytea to boolean".into(),
                ));
            }
        })
    })?;
    let c = Arc::clone(control);
    conn.create_scalar_function("pg_sleep", 1, volatile, move |ctx| {
        let secs: f64 = ctx.get(0)?;
        let until = Instant::now() + Duration::from_secs_f64(secs.clamp(0.0, 86_400.0));
        // Sleeps in slices so a cancel or termination stops it (sqlite3_interrupt does not
        // reach a running function).
        while Instant::now() < until {
            if c.should_stop() {
                return Err(rusqlite::Error::UserFunctionError(
                    "canceling statement".into(),
                ));
            }
            std::thread::sleep(
                Duration::from_millis(10).min(until.saturating_duration_since(Instant::now())),
            );
        }
        Ok(None::<i64>)
    })?;
    Ok(())
}

/// Maps a SQLite error to the client's error.
pub(crate) fn map_error(e: &rusqlite::Error) -> PgError {
    match e {
        rusqlite::Error::SqliteFailure(f, msg) => {
            let text = msg.clone().unwrap_or_else(|| f.to_string());
            let code = match f.code {
                ErrorCode::ConstraintViolation => match f.extended_code {
                    ffi::SQLITE_CONSTRAINT_UNIQUE | ffi::SQLITE_CONSTRAINT_PRIMARYKEY => {
                        sqlstate::UNIQUE_VIOLATION
                    }
                    ffi::SQLITE_CONSTRAINT_FOREIGNKEY => sqlstate::FOREIGN_KEY_VIOLATION,
                    ffi::SQLITE_CONSTRAINT_NOTNULL => sqlstate::NOT_NULL_VIOLATION,
                    ffi::SQLITE_CONSTRAINT_CHECK => sqlstate::CHECK_VIOLATION,
                    _ => sqlstate::INTEGRITY_CONSTRAINT_VIOLATION,
                },
                // A transaction that read and now writes while another one writes (SQLite does
                // not wait there: it would deadlock), or whose snapshot another one has passed:
                // PostgreSQL's answer to the same conflict, which clients retry.
                ErrorCode::DatabaseBusy
                    if f.extended_code == ffi::SQLITE_BUSY_SNAPSHOT
                        || f.extended_code == ffi::SQLITE_BUSY =>
                {
                    sqlstate::SERIALIZATION_FAILURE
                }
                ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked => sqlstate::LOCK_NOT_AVAILABLE,
                ErrorCode::OperationInterrupted => sqlstate::QUERY_CANCELED,
                ErrorCode::ReadOnly => sqlstate::READ_ONLY_SQL_TRANSACTION,
                ErrorCode::DiskFull => sqlstate::DISK_FULL,
                ErrorCode::OutOfMemory => sqlstate::OUT_OF_MEMORY,
                ErrorCode::SystemIoFailure => sqlstate::IO_ERROR,
                ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase => sqlstate::DATA_CORRUPTED,
                ErrorCode::TooBig => sqlstate::PROGRAM_LIMIT_EXCEEDED,
                ErrorCode::TypeMismatch => sqlstate::DATATYPE_MISMATCH,
                ErrorCode::AuthorizationForStatementDenied | ErrorCode::PermissionDenied => {
                    sqlstate::INSUFFICIENT_PRIVILEGE
                }
                ErrorCode::ParameterOutOfRange => sqlstate::PROTOCOL_VIOLATION,
                _ => code_from_message(&text),
            };
            let text = if f.code == ErrorCode::OperationInterrupted {
                "canceling statement due to user request".to_owned()
            } else if code == sqlstate::SERIALIZATION_FAILURE {
                "could not serialize access due to concurrent update (another transaction \
                 writes the database: retry the transaction; a transaction that will write can \
                 start with BEGIN IMMEDIATE to wait for its turn instead)"
                    .to_owned()
            } else {
                text
            };
            PgError::error(code, text)
        }
        rusqlite::Error::UserFunctionError(inner) => {
            let text = inner.to_string();
            PgError::error(code_from_message(&text), text)
        }
        rusqlite::Error::SqlInputError { error, msg, .. } => {
            let code = if error.code == ErrorCode::AuthorizationForStatementDenied {
                sqlstate::INSUFFICIENT_PRIVILEGE
            } else {
                code_from_message(msg)
            };
            PgError::error(code, msg.clone())
        }
        rusqlite::Error::InvalidParameterCount(got, want) => PgError::error(
            sqlstate::PROTOCOL_VIOLATION,
            format!(
                "bind message supplies {got} parameters, but prepared statement requires {want}"
            ),
        ),
        other => PgError::error(sqlstate::INTERNAL_ERROR, other.to_string()),
    }
}

/// SQLSTATE of a generic SQLite error (SQLITE_ERROR) from its message.
fn code_from_message(m: &str) -> &'static str {
    let l = m.to_ascii_lowercase();
    if l.starts_with("no such table") || l.contains("no such table:") {
        sqlstate::UNDEFINED_TABLE
    } else if l.starts_with("no such column") || l.contains("has no column named") {
        sqlstate::UNDEFINED_COLUMN
    } else if l.contains("syntax error")
        || l.starts_with("incomplete input")
        || l.starts_with("unrecognized token")
    {
        sqlstate::SYNTAX_ERROR
    } else if l.starts_with("no such function") || l.starts_with("wrong number of arguments") {
        sqlstate::UNDEFINED_FUNCTION
    } else if l.contains("already exists") {
        if l.starts_with("table") || l.starts_with("index") || l.starts_with("view") {
            sqlstate::DUPLICATE_TABLE
        } else {
            sqlstate::DUPLICATE_OBJECT
        }
    } else if l.starts_with("no such index")
        || l.starts_with("no such view")
        || l.starts_with("no such trigger")
        || l.starts_with("no such collation")
        || l.starts_with("no such module")
    {
        sqlstate::UNDEFINED_OBJECT
    } else if l.starts_with("not authorized") || l.contains("prohibited") {
        sqlstate::INSUFFICIENT_PRIVILEGE
    } else if l.starts_with("ambiguous column") {
        sqlstate::AMBIGUOUS_COLUMN
    } else if l.starts_with("no such savepoint") {
        sqlstate::INVALID_SAVEPOINT_SPECIFICATION
    } else if l.starts_with("cannot start a transaction within a transaction") {
        sqlstate::ACTIVE_SQL_TRANSACTION
    } else if l.starts_with("cannot commit") || l.starts_with("cannot rollback") {
        sqlstate::NO_ACTIVE_SQL_TRANSACTION
    } else if l.starts_with("too many") {
        sqlstate::PROGRAM_LIMIT_EXCEEDED
    } else if l.starts_with("datatype mismatch") {
        sqlstate::DATATYPE_MISMATCH
    } else if l.starts_with("invalid input syntax") {
        sqlstate::INVALID_TEXT_REPRESENTATION
    } else if l.starts_with("unrecognized configuration parameter") {
        sqlstate::UNDEFINED_OBJECT
    } else if l.starts_with("canceling statement") {
        sqlstate::QUERY_CANCELED
    } else {
        sqlstate::SYNTAX_ERROR_OR_ACCESS_RULE_VIOLATION
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(conn: &Connection, sql: &str) -> String {
        let e = conn.execute_batch(sql).expect_err(sql);
        map_error(&e).code().to_owned()
    }

    #[test]
    fn sqlite_errors_to_sqlstates() {
        let conn = Connection::open_in_memory().expect("open");
        conn.execute_batch(
            "PRAGMA foreign_keys=ON; CREATE TABLE p(id INTEGER PRIMARY KEY, u TEXT UNIQUE, n TEXT NOT NULL, c INT CHECK (c > 0));
             CREATE TABLE ch(pid INT REFERENCES p(id)); INSERT INTO p VALUES (1, 'a', 'x', 1);",
        )
        .expect("schema");
        assert_eq!(
            code(&conn, "INSERT INTO p VALUES (1, 'b', 'x', 1)"),
            "23505"
        );
        assert_eq!(
            code(&conn, "INSERT INTO p VALUES (2, 'a', 'x', 1)"),
            "23505"
        );
        assert_eq!(
            code(&conn, "INSERT INTO p VALUES (2, 'b', NULL, 1)"),
            "23502"
        );
        assert_eq!(
            code(&conn, "INSERT INTO p VALUES (2, 'b', 'x', 0)"),
            "23514"
        );
        assert_eq!(code(&conn, "INSERT INTO ch VALUES (9)"), "23503");
        assert_eq!(code(&conn, "SELECT * FROM nosuch"), "42P01");
        assert_eq!(code(&conn, "SELECT nosuch FROM p"), "42703");
        assert_eq!(code(&conn, "SELEC 1"), "42601");
        assert_eq!(code(&conn, "SELECT nosuch_fn()"), "42883");
        assert_eq!(code(&conn, "CREATE TABLE p(x)"), "42P07");
    }

    #[test]
    fn authorizer_denies_attach_and_service_pragmas() {
        let conn = Connection::open_in_memory().expect("open");
        let control = Control::new(&conn);
        let settings = Arc::new(Mutex::new(Settings::new("u")));
        let who = Identity {
            login: "u".into(),
            database: "d".into(),
            pid: 7,
        };
        prepare_connection(&conn, &control, &settings, &who).expect("prepare");
        for sql in [
            "ATTACH '/tmp/x.db' AS x",
            "PRAGMA journal_mode=DELETE",
            "PRAGMA writable_schema=ON",
            "PRAGMA database_list",
            "PRAGMA wal_checkpoint",
            "PRAGMA wal_checkpoint(TRUNCATE)",
            "PRAGMA cache_size=-100000000",
            "ATTACH 'file:/tmp/x.db?vfs=unix' AS y",
            "VACUUM INTO '/tmp/kagi-vacuum-into.db'",
        ] {
            assert_eq!(code(&conn, sql), "42501", "{sql}");
        }
        conn.execute_batch("PRAGMA foreign_keys=ON; PRAGMA user_version=3")
            .expect("allowed pragmas");
        // Plain VACUUM attaches a temporary database of its own: allowed.
        conn.execute_batch("CREATE TABLE v (x); VACUUM;")
            .expect("vacuum");
        let v: String = conn
            .query_row("SELECT version()", [], |r| r.get(0))
            .expect("version");
        assert!(v.starts_with("PostgreSQL 15.0 (kagi"));
        let s: String = conn
            .query_row("SELECT current_setting('DateStyle')", [], |r| r.get(0))
            .expect("setting");
        assert_eq!(s, "ISO, MDY");
        let pid: i64 = conn
            .query_row("SELECT pg_backend_pid()", [], |r| r.get(0))
            .expect("pid");
        assert_eq!(pid, 7);
    }
}
