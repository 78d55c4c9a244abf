//! Errors: [`PgError`] is what a client sees (an ErrorResponse or NoticeResponse); [`ServeError`]
//! is what the listener API returns to the service.

use std::fmt;

/// SQLSTATE codes this crate sends (PostgreSQL's Appendix A names).
pub mod sqlstate {
    /// 00000 successful_completion (notices).
    pub const SUCCESSFUL_COMPLETION: &str = "00000";
    /// 01000 warning.
    pub const WARNING: &str = "01000";
    /// 08P01 protocol_violation.
    pub const PROTOCOL_VIOLATION: &str = "08P01";
    /// 08006 connection_failure.
    pub const CONNECTION_FAILURE: &str = "08006";
    /// 08004 sqlserver_rejected_establishment_of_sqlconnection.
    pub const CONNECTION_REJECTED: &str = "08004";
    /// 0A000 feature_not_supported.
    pub const FEATURE_NOT_SUPPORTED: &str = "0A000";
    /// 22P02 invalid_text_representation.
    pub const INVALID_TEXT_REPRESENTATION: &str = "22P02";
    /// 22P03 invalid_binary_representation.
    pub const INVALID_BINARY_REPRESENTATION: &str = "22P03";
    /// 22021 character_not_in_repertoire (bytes that are not UTF-8).
    pub const CHARACTER_NOT_IN_REPERTOIRE: &str = "22021";
    /// 22003 numeric_value_out_of_range.
    pub const NUMERIC_VALUE_OUT_OF_RANGE: &str = "22003";
    /// 22023 invalid_parameter_value.
    pub const INVALID_PARAMETER_VALUE: &str = "22023";
    /// 22001 string_data_right_truncation (SQLITE_TOOBIG).
    pub const STRING_DATA_RIGHT_TRUNCATION: &str = "22001";
    /// 23000 integrity_constraint_violation.
    pub const INTEGRITY_CONSTRAINT_VIOLATION: &str = "23000";
    /// 23502 not_null_violation.
    pub const NOT_NULL_VIOLATION: &str = "23502";
    /// 23503 foreign_key_violation.
    pub const FOREIGN_KEY_VIOLATION: &str = "23503";
    /// 23505 unique_violation.
    pub const UNIQUE_VIOLATION: &str = "23505";
    /// 23514 check_violation.
    pub const CHECK_VIOLATION: &str = "23514";
    /// 24000 invalid_cursor_state.
    pub const INVALID_CURSOR_STATE: &str = "24000";
    /// 25001 active_sql_transaction.
    pub const ACTIVE_SQL_TRANSACTION: &str = "25001";
    /// 25P01 no_active_sql_transaction.
    pub const NO_ACTIVE_SQL_TRANSACTION: &str = "25P01";
    /// 25P02 in_failed_sql_transaction.
    pub const IN_FAILED_SQL_TRANSACTION: &str = "25P02";
    /// 25006 read_only_sql_transaction.
    pub const READ_ONLY_SQL_TRANSACTION: &str = "25006";
    /// 26000 invalid_sql_statement_name.
    pub const INVALID_SQL_STATEMENT_NAME: &str = "26000";
    /// 28000 invalid_authorization_specification.
    pub const INVALID_AUTHORIZATION_SPECIFICATION: &str = "28000";
    /// 28P01 invalid_password.
    pub const INVALID_PASSWORD: &str = "28P01";
    /// 34000 invalid_cursor_name.
    pub const INVALID_CURSOR_NAME: &str = "34000";
    /// 3B001 invalid_savepoint_specification.
    pub const INVALID_SAVEPOINT_SPECIFICATION: &str = "3B001";
    /// 3D000 invalid_catalog_name (no such database).
    pub const INVALID_CATALOG_NAME: &str = "3D000";
    /// 40001 serialization_failure.
    pub const SERIALIZATION_FAILURE: &str = "40001";
    /// 42501 insufficient_privilege.
    pub const INSUFFICIENT_PRIVILEGE: &str = "42501";
    /// 42601 syntax_error.
    pub const SYNTAX_ERROR: &str = "42601";
    /// 42703 undefined_column.
    pub const UNDEFINED_COLUMN: &str = "42703";
    /// 42704 undefined_object.
    pub const UNDEFINED_OBJECT: &str = "42704";
    /// 42710 duplicate_object.
    pub const DUPLICATE_OBJECT: &str = "42710";
    /// 42883 undefined_function.
    pub const UNDEFINED_FUNCTION: &str = "42883";
    /// 42P01 undefined_table.
    pub const UNDEFINED_TABLE: &str = "42P01";
    /// 42P03 duplicate_cursor.
    pub const DUPLICATE_CURSOR: &str = "42P03";
    /// 42P05 duplicate_prepared_statement.
    pub const DUPLICATE_PREPARED_STATEMENT: &str = "42P05";
    /// 42P07 duplicate_table.
    pub const DUPLICATE_TABLE: &str = "42P07";
    /// 42804 datatype_mismatch.
    pub const DATATYPE_MISMATCH: &str = "42804";
    /// 53000 insufficient_resources.
    pub const INSUFFICIENT_RESOURCES: &str = "53000";
    /// 53100 disk_full.
    pub const DISK_FULL: &str = "53100";
    /// 53200 out_of_memory.
    pub const OUT_OF_MEMORY: &str = "53200";
    /// 53300 too_many_connections.
    pub const TOO_MANY_CONNECTIONS: &str = "53300";
    /// 54000 program_limit_exceeded.
    pub const PROGRAM_LIMIT_EXCEEDED: &str = "54000";
    /// 55P03 lock_not_available.
    pub const LOCK_NOT_AVAILABLE: &str = "55P03";
    /// 55P02 cant_change_runtime_param.
    pub const CANT_CHANGE_RUNTIME_PARAM: &str = "55P02";
    /// 42702 ambiguous_column.
    pub const AMBIGUOUS_COLUMN: &str = "42702";
    /// 42000 syntax_error_or_access_rule_violation (SQLite's generic SQL errors).
    pub const SYNTAX_ERROR_OR_ACCESS_RULE_VIOLATION: &str = "42000";
    /// 57014 query_canceled.
    pub const QUERY_CANCELED: &str = "57014";
    /// 57P01 admin_shutdown.
    pub const ADMIN_SHUTDOWN: &str = "57P01";
    /// 57P03 cannot_connect_now: the code this crate recommends for a database that is not
    /// available (Azure's 40613 "Database '…' on server '…' is not currently available").
    pub const CANNOT_CONNECT_NOW: &str = "57P03";
    /// 58030 io_error.
    pub const IO_ERROR: &str = "58030";
    /// XX000 internal_error.
    pub const INTERNAL_ERROR: &str = "XX000";
    /// XX001 data_corrupted.
    pub const DATA_CORRUPTED: &str = "XX001";
}

/// How bad a [`PgError`] is: `Error` ends the statement, `Fatal` ends the session;
/// `Warning` and `Notice` travel as a NoticeResponse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// The statement failed; the session goes on.
    Error,
    /// The session ends after this message.
    Fatal,
    /// A NoticeResponse with severity WARNING.
    Warning,
    /// A NoticeResponse with severity NOTICE.
    Notice,
}

impl Severity {
    /// The word PostgreSQL puts in the `S` and `V` fields.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Error => "ERROR",
            Self::Fatal => "FATAL",
            Self::Warning => "WARNING",
            Self::Notice => "NOTICE",
        }
    }
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error (or notice) as the client sees it: severity, SQLSTATE, message, optional detail
/// and hint. The [`crate::Gateway`] returns these too; their text goes to the client as is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{severity} {code}: {message}")]
pub struct PgError {
    severity: Severity,
    code: String,
    message: String,
    detail: Option<String>,
    hint: Option<String>,
}

impl PgError {
    /// An error with `severity`, SQLSTATE `code` (five characters 0-9/A-Z; anything else is
    /// sent as XX000) and `message`.
    pub fn new(severity: Severity, code: &str, message: impl Into<String>) -> Self {
        let valid = code.len() == 5
            && code
                .bytes()
                .all(|b| b.is_ascii_digit() || b.is_ascii_uppercase());
        Self {
            severity,
            code: if valid {
                code
            } else {
                sqlstate::INTERNAL_ERROR
            }
            .to_owned(),
            message: message.into(),
            detail: None,
            hint: None,
        }
    }

    /// A statement-level error (severity ERROR).
    pub fn error(code: &str, message: impl Into<String>) -> Self {
        Self::new(Severity::Error, code, message)
    }

    /// A session-ending error (severity FATAL).
    pub fn fatal(code: &str, message: impl Into<String>) -> Self {
        Self::new(Severity::Fatal, code, message)
    }

    /// PostgreSQL's failed-login error: FATAL 28P01 `password authentication failed for user
    /// "…"`, the same whether the login exists or not. A [`crate::Gateway`] returns it from
    /// `check_token` for a token it rejects.
    pub fn password_failed(user: &str) -> Self {
        Self::fatal(
            sqlstate::INVALID_PASSWORD,
            format!("password authentication failed for user \"{user}\""),
        )
    }

    /// The recommended error for a database that is not available (Inaccessible): FATAL
    /// 57P03 cannot_connect_now with the Gateway's message (Azure's 40613 text).
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::fatal(sqlstate::CANNOT_CONNECT_NOW, message)
    }

    /// The same error with a DETAIL field.
    #[must_use]
    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    /// The same error with a HINT field.
    #[must_use]
    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// The same error with another severity.
    #[must_use]
    pub fn with_severity(mut self, severity: Severity) -> Self {
        self.severity = severity;
        self
    }

    /// Severity.
    pub fn severity(&self) -> Severity {
        self.severity
    }

    /// SQLSTATE.
    pub fn code(&self) -> &str {
        &self.code
    }

    /// Primary message.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// DETAIL, if any.
    pub fn detail(&self) -> Option<&str> {
        self.detail.as_deref()
    }

    /// HINT, if any.
    pub fn hint(&self) -> Option<&str> {
        self.hint.as_deref()
    }

    pub(crate) fn protocol(message: impl Into<String>) -> Self {
        Self::fatal(sqlstate::PROTOCOL_VIOLATION, message)
    }

    pub(crate) fn unsupported(message: impl Into<String>) -> Self {
        Self::error(sqlstate::FEATURE_NOT_SUPPORTED, message)
    }

    pub(crate) fn syntax(message: impl Into<String>) -> Self {
        Self::error(sqlstate::SYNTAX_ERROR, message)
    }
}

/// What the listener API returns.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The configuration cannot work (for example no TLS configuration and plaintext refused).
    #[error("invalid PostgreSQL listener configuration: {0}")]
    Config(String),
    /// Reading the listener's local address failed.
    #[error("PostgreSQL listener: {0}")]
    Io(#[from] std::io::Error),
}
