//! Classification of one statement: what runs on SQLite, and the PostgreSQL commands the
//! front end answers itself (transaction control, SET/SHOW, logins, cursors, catalog
//! queries).

use crate::error::{PgError, sqlstate};
use crate::sql::{self, Kind, Tok};

/// The command tag family of a statement that runs on SQLite.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verb {
    /// `INSERT 0 n` (INSERT, REPLACE).
    Insert,
    /// `UPDATE n`.
    Update,
    /// `DELETE n`.
    Delete,
    /// `SELECT n` (SELECT, VALUES, and anything else that returns rows).
    Select,
    /// A fixed tag (`CREATE TABLE`, `DROP INDEX`, `VACUUM`, ...).
    Other(String),
}

impl Verb {
    /// The CommandComplete tag for `n` rows.
    pub fn tag(&self, n: u64) -> String {
        match self {
            Self::Insert => format!("INSERT 0 {n}"),
            Self::Update => format!("UPDATE {n}"),
            Self::Delete => format!("DELETE {n}"),
            Self::Select => format!("SELECT {n}"),
            Self::Other(t) => t.clone(),
        }
    }
}

/// What to do with a login (`CREATE|ALTER|DROP USER|ROLE`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoginStmt {
    /// CREATE USER|ROLE name … PASSWORD 'pw'.
    Create {
        /// Login name.
        login: String,
        /// Password, or a SCRAM verifier text.
        password: String,
    },
    /// ALTER USER|ROLE name … PASSWORD 'pw'.
    SetPassword {
        /// Login name.
        login: String,
        /// Password, or a SCRAM verifier text.
        password: String,
    },
    /// CREATE USER name FROM EXTERNAL PROVIDER [WITH OBJECT_ID = 'id'] (Azure SQL's Entra
    /// users).
    CreateExternal {
        /// The principal's name.
        login: String,
        /// Its object id, when given.
        object_id: Option<String>,
    },
    /// DROP USER|ROLE [IF EXISTS] name, ….
    Drop {
        /// Login names.
        logins: Vec<String>,
        /// IF EXISTS.
        if_exists: bool,
    },
}

/// How many rows a FETCH or MOVE asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Count {
    /// A number of rows.
    Rows(u64),
    /// ALL.
    All,
}

/// One classified statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stmt {
    /// Nothing but whitespace and comments.
    Empty,
    /// Runs on SQLite.
    Sql {
        /// Rewritten SQL.
        sql: String,
        /// Tag family.
        verb: Verb,
        /// Highest `$n`.
        params: usize,
        /// May run inside an implicit transaction (not VACUUM).
        in_tx: bool,
    },
    /// BEGIN / START TRANSACTION (SQLite's DEFERRED, IMMEDIATE or EXCLUSIVE).
    Begin(&'static str),
    /// COMMIT / END.
    Commit,
    /// ROLLBACK / ABORT.
    Rollback,
    /// SAVEPOINT name.
    Savepoint(String),
    /// RELEASE [SAVEPOINT] name.
    Release(String),
    /// ROLLBACK TO [SAVEPOINT] name.
    RollbackTo(String),
    /// SET name TO value (value None: DEFAULT).
    Set(String, Option<String>),
    /// A SET that is accepted and has no effect (SET TRANSACTION …, SET SESSION
    /// CHARACTERISTICS …).
    SetIgnored,
    /// RESET name (None: ALL).
    Reset(Option<String>),
    /// SHOW name (lower-cased; "all" for SHOW ALL).
    Show(String),
    /// A login change.
    Login(LoginStmt),
    /// DECLARE name CURSOR FOR query.
    Declare {
        /// Cursor name.
        name: String,
        /// The query (a Sql or Catalog statement).
        query: Box<Stmt>,
        /// WITH HOLD.
        hold: bool,
        /// BINARY.
        binary: bool,
    },
    /// FETCH / MOVE.
    Fetch {
        /// Cursor name.
        name: String,
        /// How many.
        count: Count,
        /// MOVE (no rows sent).
        is_move: bool,
    },
    /// CLOSE name (None: ALL).
    CloseCursor(Option<String>),
    /// DEALLOCATE name (None: ALL).
    Deallocate(Option<String>),
    /// DISCARD ALL and friends.
    Discard,
    /// A catalog query (pg_catalog, information_schema): answered by the catalog module.
    Catalog(String),
    /// A statement that is refused with this error.
    Refused(PgError),
}

impl Stmt {
    /// The tag of commands that have no rows.
    pub fn fixed_tag(&self) -> &'static str {
        match self {
            Self::Begin(_) => "BEGIN",
            Self::Commit => "COMMIT",
            Self::Rollback | Self::RollbackTo(_) => "ROLLBACK",
            Self::Savepoint(_) => "SAVEPOINT",
            Self::Release(_) => "RELEASE",
            Self::Set(..) | Self::SetIgnored => "SET",
            Self::Reset(_) => "RESET",
            Self::Declare { .. } => "DECLARE CURSOR",
            Self::CloseCursor(_) => "CLOSE CURSOR",
            Self::Deallocate(_) => "DEALLOCATE",
            Self::Discard => "DISCARD ALL",
            Self::Login(LoginStmt::Create { .. } | LoginStmt::CreateExternal { .. }) => {
                "CREATE ROLE"
            }
            Self::Login(LoginStmt::SetPassword { .. }) => "ALTER ROLE",
            Self::Login(LoginStmt::Drop { .. }) => "DROP ROLE",
            _ => "",
        }
    }

    /// Whether this is allowed in a failed transaction block.
    pub fn ends_failed_block(&self) -> bool {
        matches!(self, Self::Commit | Self::Rollback | Self::RollbackTo(_))
    }
}

fn unsupported(what: &str, hint: &str) -> Stmt {
    let e = PgError::unsupported(format!("{what} is not supported by kagi's SQL service"));
    Stmt::Refused(if hint.is_empty() {
        e
    } else {
        e.with_hint(hint)
    })
}

fn syntax(msg: &str) -> Stmt {
    Stmt::Refused(PgError::syntax(msg))
}

/// Whether a statement is a query on the PostgreSQL catalogs.
fn mentions_catalog(src: &str, toks: &[Tok]) -> bool {
    toks.iter().any(|t| {
        if t.kind != Kind::Word {
            return false;
        }
        let w = t.text(src).to_ascii_lowercase();
        w == "pg_catalog"
            || w == "information_schema"
            || (w.starts_with("pg_") && CATALOG_TABLES.contains(&w.as_str()))
    })
}

/// Catalog relations a query may name without the `pg_catalog.` prefix.
const CATALOG_TABLES: &[&str] = &[
    "pg_class",
    "pg_namespace",
    "pg_attribute",
    "pg_type",
    "pg_database",
    "pg_roles",
    "pg_user",
    "pg_index",
    "pg_constraint",
    "pg_proc",
    "pg_settings",
    "pg_tables",
    "pg_views",
    "pg_indexes",
    "pg_am",
    "pg_description",
    "pg_attrdef",
    "pg_stat_activity",
    "pg_extension",
    "pg_authid",
    "pg_cursors",
    "pg_prepared_statements",
    "pg_trigger",
    "pg_inherits",
    "pg_collation",
    "pg_enum",
    "pg_range",
    "pg_sequence",
    "pg_sequences",
    "pg_matviews",
    "pg_policy",
];

/// Classifies one statement (as split from a Query, or a Parse's text).
pub fn classify(src: &str) -> Stmt {
    let toks = sql::tokenize(src);
    let Some(first) = toks.first() else {
        return Stmt::Empty;
    };
    let word = |i: usize| -> String {
        toks.get(i)
            .filter(|t| t.kind == Kind::Word)
            .map(|t| t.text(src).to_ascii_uppercase())
            .unwrap_or_default()
    };
    let w0 = if first.kind == Kind::Word {
        word(0)
    } else {
        String::new()
    };
    let w1 = word(1);
    match w0.as_str() {
        "BEGIN" | "START" => return parse_begin(src, &toks),
        "COMMIT" | "END" => return only_tx_words(src, &toks[1..], Stmt::Commit),
        "ABORT" => return only_tx_words(src, &toks[1..], Stmt::Rollback),
        "ROLLBACK" => {
            let mut rest = &toks[1..];
            if rest
                .first()
                .is_some_and(|t| t.is_word(src, "TRANSACTION") || t.is_word(src, "WORK"))
            {
                rest = &rest[1..];
            }
            if rest.first().is_some_and(|t| t.is_word(src, "TO")) {
                rest = &rest[1..];
                if rest.first().is_some_and(|t| t.is_word(src, "SAVEPOINT")) {
                    rest = &rest[1..];
                }
                return match one_name(src, rest) {
                    Some(n) => Stmt::RollbackTo(n),
                    None => syntax("syntax error in ROLLBACK TO SAVEPOINT"),
                };
            }
            if rest.first().is_some_and(|t| t.is_word(src, "PREPARED")) {
                return unsupported("ROLLBACK PREPARED", "");
            }
            return only_tx_words(src, rest, Stmt::Rollback);
        }
        "SAVEPOINT" => {
            return match one_name(src, &toks[1..]) {
                Some(n) => Stmt::Savepoint(n),
                None => syntax("syntax error in SAVEPOINT"),
            };
        }
        "RELEASE" => {
            let rest = if toks.get(1).is_some_and(|t| t.is_word(src, "SAVEPOINT")) {
                &toks[2..]
            } else {
                &toks[1..]
            };
            return match one_name(src, rest) {
                Some(n) => Stmt::Release(n),
                None => syntax("syntax error in RELEASE SAVEPOINT"),
            };
        }
        "SET" => return parse_set(src, &toks),
        "RESET" => {
            return match toks.get(1) {
                Some(t) if t.is_word(src, "ALL") => Stmt::Reset(None),
                Some(_) => Stmt::Reset(Some(setting_name(src, &toks[1..]))),
                None => syntax("syntax error at end of input"),
            };
        }
        "SHOW" => {
            let rest = &toks[1..];
            if rest.is_empty() {
                return syntax("syntax error at end of input");
            }
            return Stmt::Show(setting_name(src, rest));
        }
        "CREATE" | "ALTER" | "DROP" if matches!(w1.as_str(), "USER" | "ROLE") => {
            return parse_login(src, &toks, &w0);
        }
        "CREATE" | "DROP" | "ALTER"
            if matches!(
                w1.as_str(),
                "DATABASE"
                    | "SCHEMA"
                    | "EXTENSION"
                    | "SEQUENCE"
                    | "TYPE"
                    | "FUNCTION"
                    | "PROCEDURE"
                    | "GROUP"
                    | "TABLESPACE"
                    | "PUBLICATION"
                    | "SUBSCRIPTION"
                    | "POLICY"
                    | "DOMAIN"
                    | "MATERIALIZED"
            ) =>
        {
            let hint = if w1 == "DATABASE" {
                "databases are created and dropped through the management API (kagi sql db …)"
            } else {
                "queries use SQLite's dialect"
            };
            return unsupported(&format!("{w0} {w1}"), hint);
        }
        "GRANT" | "REVOKE" | "LISTEN" | "NOTIFY" | "UNLISTEN" | "COPY" | "LOCK" | "CLUSTER"
        | "CHECKPOINT" | "PREPARE" | "EXECUTE" | "CALL" | "DO" | "COMMENT" | "SECURITY"
        | "LOAD" | "IMPORT" | "TRUNCATE" | "REFRESH" => {
            let hint = match w0.as_str() {
                "TRUNCATE" => "use DELETE FROM table",
                "COPY" => "use INSERT statements (psycopg's executemany)",
                "PREPARE" | "EXECUTE" => "use the extended query protocol (Parse/Bind/Execute)",
                _ => "",
            };
            return unsupported(&w0, hint);
        }
        "ATTACH" | "DETACH" => {
            return Stmt::Refused(PgError::error(
                sqlstate::INSUFFICIENT_PRIVILEGE,
                format!("{w0} is not allowed"),
            ));
        }
        "VACUUM" if toks.iter().any(|t| t.is_word(src, "INTO")) => {
            return Stmt::Refused(PgError::error(
                sqlstate::INSUFFICIENT_PRIVILEGE,
                "VACUUM INTO is not allowed",
            ));
        }
        "DECLARE" => return parse_declare(src, &toks),
        "FETCH" | "MOVE" => return parse_fetch(src, &toks, w0 == "MOVE"),
        "CLOSE" => {
            return match toks.get(1) {
                Some(t) if t.is_word(src, "ALL") => Stmt::CloseCursor(None),
                _ => match one_name(src, &toks[1..]) {
                    Some(n) => Stmt::CloseCursor(Some(n)),
                    None => syntax("syntax error in CLOSE"),
                },
            };
        }
        "DEALLOCATE" => {
            let rest = if toks.get(1).is_some_and(|t| t.is_word(src, "PREPARE")) {
                &toks[2..]
            } else {
                &toks[1..]
            };
            return match rest.first() {
                Some(t) if t.is_word(src, "ALL") => Stmt::Deallocate(None),
                _ => match one_name(src, rest) {
                    Some(n) => Stmt::Deallocate(Some(n)),
                    None => syntax("syntax error in DEALLOCATE"),
                },
            };
        }
        "DISCARD" => return Stmt::Discard,
        _ => {}
    }
    if mentions_catalog(src, &toks) {
        return Stmt::Catalog(src.to_owned());
    }
    let rw = sql::rewrite(src);
    Stmt::Sql {
        verb: verb_of(src, &toks),
        in_tx: w0 != "VACUUM",
        params: rw.params,
        sql: rw.sql,
    }
}

/// The tag family from the statement's words (the main verb after a WITH clause).
fn verb_of(src: &str, toks: &[Tok]) -> Verb {
    let words: Vec<String> = toks
        .iter()
        .take(6)
        .take_while(|t| t.kind == Kind::Word)
        .map(|t| t.text(src).to_ascii_uppercase())
        .collect();
    let w0 = words.first().map(String::as_str).unwrap_or_default();
    match w0 {
        "INSERT" | "REPLACE" => Verb::Insert,
        "UPDATE" => Verb::Update,
        "DELETE" => Verb::Delete,
        "SELECT" | "VALUES" | "PRAGMA" | "EXPLAIN" => Verb::Select,
        "WITH" => {
            // The first verb outside parentheses after the CTEs.
            let mut depth = 0i32;
            for t in toks {
                if t.is_punct(src, "(") {
                    depth += 1;
                } else if t.is_punct(src, ")") {
                    depth -= 1;
                } else if depth == 0 && t.kind == Kind::Word {
                    match t.text(src).to_ascii_uppercase().as_str() {
                        "INSERT" | "REPLACE" => return Verb::Insert,
                        "UPDATE" => return Verb::Update,
                        "DELETE" => return Verb::Delete,
                        "SELECT" | "VALUES" => return Verb::Select,
                        _ => {}
                    }
                }
            }
            Verb::Select
        }
        "CREATE" | "DROP" | "ALTER" => {
            let object = words
                .iter()
                .skip(1)
                .find(|w| {
                    !matches!(
                        w.as_str(),
                        "UNIQUE"
                            | "TEMP"
                            | "TEMPORARY"
                            | "VIRTUAL"
                            | "OR"
                            | "REPLACE"
                            | "IF"
                            | "NOT"
                            | "EXISTS"
                    )
                })
                .cloned()
                .unwrap_or_default();
            Verb::Other(format!("{w0} {object}").trim_end().to_owned())
        }
        "" => Verb::Select,
        other => Verb::Other(other.to_owned()),
    }
}

fn only_tx_words(src: &str, rest: &[Tok], stmt: Stmt) -> Stmt {
    let ok = rest.iter().all(|t| {
        t.is_word(src, "TRANSACTION")
            || t.is_word(src, "WORK")
            || t.is_word(src, "AND")
            || t.is_word(src, "NO")
            || t.is_word(src, "CHAIN")
    });
    if !ok {
        return syntax("syntax error in transaction statement");
    }
    if rest.iter().any(|t| t.is_word(src, "CHAIN")) && !rest.iter().any(|t| t.is_word(src, "NO")) {
        return unsupported("AND CHAIN", "");
    }
    stmt
}

fn parse_begin(src: &str, toks: &[Tok]) -> Stmt {
    // BEGIN [DEFERRED|IMMEDIATE|EXCLUSIVE] [WORK|TRANSACTION] [mode, ...] / START TRANSACTION.
    if toks[0].is_word(src, "START") && !toks.get(1).is_some_and(|t| t.is_word(src, "TRANSACTION"))
    {
        return syntax("syntax error at or near \"START\"");
    }
    let mut mode = "DEFERRED";
    for t in &toks[1..] {
        let known = t.is_punct(src, ",")
            || [
                "DEFERRED",
                "IMMEDIATE",
                "EXCLUSIVE",
                "WORK",
                "TRANSACTION",
                "ISOLATION",
                "LEVEL",
                "SERIALIZABLE",
                "REPEATABLE",
                "READ",
                "COMMITTED",
                "UNCOMMITTED",
                "WRITE",
                "ONLY",
                "NOT",
                "DEFERRABLE",
            ]
            .iter()
            .any(|w| t.is_word(src, w));
        if !known {
            return syntax(&format!("syntax error at or near \"{}\"", t.text(src)));
        }
        if t.is_word(src, "IMMEDIATE") {
            mode = "IMMEDIATE";
        } else if t.is_word(src, "EXCLUSIVE") {
            mode = "EXCLUSIVE";
        }
    }
    if toks
        .windows(2)
        .any(|w| w[0].is_word(src, "READ") && w[1].is_word(src, "ONLY"))
    {
        return unsupported("READ ONLY transactions", "");
    }
    // ISOLATION LEVEL …, READ WRITE, [NOT] DEFERRABLE are accepted: SQLite
    // transactions are serializable.
    Stmt::Begin(mode)
}

fn one_name(src: &str, rest: &[Tok]) -> Option<String> {
    match rest {
        [t] => sql::identifier(src, t),
        _ => None,
    }
}

/// A setting name: one or more words (`transaction isolation level`, `time zone`), dotted
/// names (`kagi.x`), lower-cased.
fn setting_name(src: &str, rest: &[Tok]) -> String {
    let words: Vec<String> = rest
        .iter()
        .filter(|t| !t.is_punct(src, "."))
        .map(|t| sql::identifier(src, t).unwrap_or_else(|| t.text(src).to_ascii_lowercase()))
        .collect();
    let joined = words.join(" ");
    match joined.as_str() {
        "time zone" => "timezone".into(),
        "transaction isolation level" => "transaction_isolation".into(),
        "session authorization" => "session_authorization".into(),
        _ if rest.iter().any(|t| t.is_punct(src, ".")) => words.join("."),
        _ => joined,
    }
}

fn parse_set(src: &str, toks: &[Tok]) -> Stmt {
    let mut i = 1;
    if toks
        .get(i)
        .is_some_and(|t| t.is_word(src, "SESSION") || t.is_word(src, "LOCAL"))
    {
        if toks.get(i).is_some_and(|t| t.is_word(src, "SESSION"))
            && toks.get(i + 1).is_some_and(|t| {
                t.is_word(src, "CHARACTERISTICS") || t.is_word(src, "AUTHORIZATION")
            })
        {
            if toks
                .get(i + 1)
                .is_some_and(|t| t.is_word(src, "AUTHORIZATION"))
            {
                return unsupported("SET SESSION AUTHORIZATION", "");
            }
            return Stmt::SetIgnored;
        }
        i += 1;
    }
    let Some(name_tok) = toks.get(i) else {
        return syntax("syntax error at end of input");
    };
    if name_tok.is_word(src, "TRANSACTION") || name_tok.is_word(src, "CONSTRAINTS") {
        return Stmt::SetIgnored;
    }
    if name_tok.is_word(src, "ROLE") {
        return if toks.get(i + 1).is_some_and(|t| t.is_word(src, "NONE")) {
            Stmt::SetIgnored
        } else {
            unsupported("SET ROLE", "")
        };
    }
    // SET TIME ZONE x, SET NAMES x, SET SCHEMA x.
    let (name, value_from) = if name_tok.is_word(src, "TIME")
        && toks.get(i + 1).is_some_and(|t| t.is_word(src, "ZONE"))
    {
        ("timezone".to_owned(), i + 2)
    } else if name_tok.is_word(src, "NAMES") {
        ("client_encoding".to_owned(), i + 1)
    } else if name_tok.is_word(src, "SCHEMA") {
        ("search_path".to_owned(), i + 1)
    } else {
        // name [. name] {TO | =} value
        let mut j = i;
        while toks.get(j + 1).is_some_and(|t| t.is_punct(src, ".")) {
            j += 2;
        }
        let name = setting_name(src, &toks[i..=j.min(toks.len() - 1)]);
        let eq = toks.get(j + 1);
        if !eq.is_some_and(|t| t.is_word(src, "TO") || t.is_punct(src, "=")) {
            return syntax("syntax error in SET: expected TO or =");
        }
        (name, j + 2)
    };
    let rest = toks.get(value_from..).unwrap_or_default();
    if rest.is_empty() {
        return syntax("syntax error at end of input");
    }
    if rest.len() == 1 && (rest[0].is_word(src, "DEFAULT") || rest[0].is_word(src, "LOCAL")) {
        return Stmt::Set(name, None);
    }
    let mut parts = Vec::new();
    for t in rest {
        if t.is_punct(src, ",") {
            continue;
        }
        let v = match t.kind {
            Kind::Str => sql::string_value(src, t).unwrap_or_default(),
            Kind::QuotedIdent => sql::identifier(src, t).unwrap_or_default(),
            _ => t.text(src).to_owned(),
        };
        parts.push(v);
    }
    // A signed number arrives as two tokens ("-" "5").
    let value = if parts.len() == 2 && (parts[0] == "-" || parts[0] == "+") {
        parts.concat()
    } else {
        parts.join(", ")
    };
    Stmt::Set(name, Some(value))
}

fn parse_login(src: &str, toks: &[Tok], verb: &str) -> Stmt {
    let mut i = 2;
    if verb == "DROP" {
        let mut if_exists = false;
        if toks.get(i).is_some_and(|t| t.is_word(src, "IF"))
            && toks.get(i + 1).is_some_and(|t| t.is_word(src, "EXISTS"))
        {
            if_exists = true;
            i += 2;
        }
        let mut logins = Vec::new();
        for t in toks.get(i..).unwrap_or_default() {
            if t.is_punct(src, ",") {
                continue;
            }
            match sql::identifier(src, t) {
                Some(n) => logins.push(n),
                None => return syntax("syntax error in DROP ROLE"),
            }
        }
        if logins.is_empty() {
            return syntax("syntax error at end of input");
        }
        return Stmt::Login(LoginStmt::Drop { logins, if_exists });
    }
    let Some(login) = toks.get(i).and_then(|t| sql::identifier(src, t)) else {
        return syntax("syntax error: a role name is expected");
    };
    i += 1;
    if verb == "CREATE" && toks.get(i).is_some_and(|t| t.is_word(src, "FROM")) {
        return parse_external(src, toks, i, login);
    }
    let mut password = None;
    while let Some(t) = toks.get(i) {
        let w = t.text(src).to_ascii_uppercase();
        match w.as_str() {
            "WITH" | "LOGIN" | "NOLOGIN" | "INHERIT" | "NOINHERIT" | "NOSUPERUSER"
            | "NOCREATEDB" | "NOCREATEROLE" | "NOREPLICATION" | "NOBYPASSRLS" => i += 1,
            "ENCRYPTED" | "UNENCRYPTED" => i += 1,
            "PASSWORD" => {
                let v = toks.get(i + 1);
                match v {
                    Some(v) if v.kind == Kind::Str => password = sql::string_value(src, v),
                    Some(v) if v.is_word(src, "NULL") => {
                        return unsupported(
                            "a login without a password",
                            "give the login a password",
                        );
                    }
                    _ => return syntax("syntax error: PASSWORD needs a string"),
                }
                i += 2;
            }
            "RENAME" => return unsupported("renaming a login", "drop it and create it again"),
            "VALID" | "CONNECTION" | "IN" | "ROLE" | "ADMIN" | "USER" | "SYSID" | "SUPERUSER"
            | "CREATEDB" | "CREATEROLE" | "REPLICATION" | "BYPASSRLS" | "SET" | "RESET" => {
                return unsupported(&format!("the role option {w}"), "");
            }
            _ => return syntax(&format!("syntax error at or near \"{}\"", t.text(src))),
        }
    }
    let Some(password) = password else {
        return unsupported(
            &format!("{verb} ROLE without PASSWORD"),
            "logins authenticate with SCRAM-SHA-256: give a PASSWORD",
        );
    };
    Stmt::Login(if verb == "CREATE" {
        LoginStmt::Create { login, password }
    } else {
        LoginStmt::SetPassword { login, password }
    })
}

/// `… FROM EXTERNAL PROVIDER [WITH OBJECT_ID = 'id']` after `CREATE USER name` (`toks[i]` is
/// FROM).
fn parse_external(src: &str, toks: &[Tok], i: usize, login: String) -> Stmt {
    let word = |j: usize, w: &str| toks.get(j).is_some_and(|t| t.is_word(src, w));
    if !(word(i + 1, "EXTERNAL") && word(i + 2, "PROVIDER")) {
        return syntax("syntax error: FROM EXTERNAL PROVIDER expected");
    }
    let rest = toks.get(i + 3..).unwrap_or_default();
    let object_id = match rest {
        [] => None,
        [w, o, eq, v]
            if w.is_word(src, "WITH")
                && o.is_word(src, "OBJECT_ID")
                && eq.is_punct(src, "=")
                && v.kind == Kind::Str =>
        {
            sql::string_value(src, v)
        }
        _ => return syntax("syntax error: WITH OBJECT_ID = '…' expected"),
    };
    Stmt::Login(LoginStmt::CreateExternal { login, object_id })
}

fn parse_declare(src: &str, toks: &[Tok]) -> Stmt {
    let Some(name) = toks.get(1).and_then(|t| sql::identifier(src, t)) else {
        return syntax("syntax error in DECLARE");
    };
    let mut i = 2;
    let mut binary = false;
    let mut hold = false;
    while let Some(t) = toks.get(i) {
        let w = t.text(src).to_ascii_uppercase();
        match w.as_str() {
            "BINARY" => binary = true,
            "INSENSITIVE" | "ASENSITIVE" | "NO" | "SCROLL" | "CURSOR" | "WITHOUT" => {}
            "WITH" => hold = true,
            "HOLD" => {}
            "FOR" => break,
            _ => return syntax(&format!("syntax error at or near \"{}\"", t.text(src))),
        }
        i += 1;
    }
    let Some(for_tok) = toks.get(i) else {
        return syntax("syntax error at end of input");
    };
    let query_src = src.get(for_tok.end..).unwrap_or_default().trim();
    let query = classify(query_src);
    match query {
        Stmt::Sql { .. } | Stmt::Catalog(_) => Stmt::Declare {
            name,
            query: Box::new(query),
            hold,
            binary,
        },
        Stmt::Refused(e) => Stmt::Refused(e),
        _ => syntax("DECLARE CURSOR needs a query"),
    }
}

fn parse_fetch(src: &str, toks: &[Tok], is_move: bool) -> Stmt {
    // FETCH [NEXT | FORWARD [n | ALL] | n | ALL] [FROM | IN] name
    let mut count = Count::Rows(1);
    let mut i = 1;
    while let Some(t) = toks.get(i) {
        if t.is_word(src, "FROM") || t.is_word(src, "IN") {
            i += 1;
            break;
        }
        if toks.len() == i + 1 {
            break;
        }
        let w = t.text(src).to_ascii_uppercase();
        match (t.kind, w.as_str()) {
            (Kind::Word, "NEXT" | "FORWARD") => {}
            (Kind::Word, "ALL") => count = Count::All,
            (Kind::Number, n) => match n.parse() {
                Ok(n) => count = Count::Rows(n),
                Err(_) => return syntax("invalid FETCH count"),
            },
            (Kind::Word, "PRIOR" | "FIRST" | "LAST" | "ABSOLUTE" | "RELATIVE" | "BACKWARD") => {
                return unsupported("scrolling cursors (only FORWARD fetches)", "");
            }
            _ => return syntax(&format!("syntax error at or near \"{}\"", t.text(src))),
        }
        i += 1;
    }
    match one_name(src, toks.get(i..).unwrap_or_default()) {
        Some(name) => Stmt::Fetch {
            name,
            count,
            is_move,
        },
        None => syntax("syntax error in FETCH: a cursor name is expected"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies() {
        assert_eq!(classify("  "), Stmt::Empty);
        assert_eq!(classify("begin"), Stmt::Begin("DEFERRED"));
        assert_eq!(classify("BEGIN IMMEDIATE"), Stmt::Begin("IMMEDIATE"));
        assert!(matches!(classify("BEGIN\nSELECT bogus"), Stmt::Refused(_)));
        assert_eq!(
            classify("start transaction isolation level serializable"),
            Stmt::Begin("DEFERRED")
        );
        assert_eq!(classify("end"), Stmt::Commit);
        assert_eq!(
            classify("rollback to savepoint s1"),
            Stmt::RollbackTo("s1".into())
        );
        assert_eq!(classify("release s1"), Stmt::Release("s1".into()));
        assert_eq!(
            classify("SET application_name = 'x'"),
            Stmt::Set("application_name".into(), Some("x".into()))
        );
        assert_eq!(
            classify("set time zone 'UTC'"),
            Stmt::Set("timezone".into(), Some("UTC".into()))
        );
        assert_eq!(
            classify("set search_path to a, b"),
            Stmt::Set("search_path".into(), Some("a, b".into()))
        );
        assert_eq!(
            classify("SET extra_float_digits = -3"),
            Stmt::Set("extra_float_digits".into(), Some("-3".into()))
        );
        assert_eq!(
            classify("show transaction isolation level"),
            Stmt::Show("transaction_isolation".into())
        );
        assert_eq!(classify("SHOW DateStyle"), Stmt::Show("datestyle".into()));
        assert_eq!(
            classify("CREATE USER \"alice@contoso.com\" FROM EXTERNAL PROVIDER"),
            Stmt::Login(LoginStmt::CreateExternal {
                login: "alice@contoso.com".into(),
                object_id: None,
            })
        );
        assert_eq!(
            classify("create user app1 from external provider with object_id = 'abc'"),
            Stmt::Login(LoginStmt::CreateExternal {
                login: "app1".into(),
                object_id: Some("abc".into()),
            })
        );
        assert!(matches!(
            classify("CREATE USER x FROM EXTERNAL"),
            Stmt::Refused(_)
        ));
        assert!(matches!(
            classify("CREATE USER x FROM EXTERNAL PROVIDER WITH PASSWORD 'p'"),
            Stmt::Refused(_)
        ));
        assert_eq!(
            classify("CREATE USER \"Bob\" WITH LOGIN PASSWORD 'it''s'"),
            Stmt::Login(LoginStmt::Create {
                login: "Bob".into(),
                password: "it's".into()
            })
        );
        assert_eq!(
            classify("drop role if exists a, b"),
            Stmt::Login(LoginStmt::Drop {
                logins: vec!["a".into(), "b".into()],
                if_exists: true
            })
        );
        assert!(matches!(classify("create role r"), Stmt::Refused(_)));
        assert!(matches!(classify("attach 'x' as y"), Stmt::Refused(_)));
        assert!(matches!(classify("vacuum into '/tmp/x'"), Stmt::Refused(_)));
        assert!(matches!(
            classify("select * from pg_catalog.pg_class"),
            Stmt::Catalog(_)
        ));
        assert_eq!(
            classify("FETCH FORWARD 5 FROM \"c\""),
            Stmt::Fetch {
                name: "c".into(),
                count: Count::Rows(5),
                is_move: false
            }
        );
        assert!(matches!(
            classify("declare c cursor for select 1"),
            Stmt::Declare { hold: false, .. }
        ));
        let Stmt::Sql { verb, .. } = classify("with x as (select 1) insert into t select * from x")
        else {
            panic!()
        };
        assert_eq!(verb, Verb::Insert);
        let Stmt::Sql { verb, .. } = classify("create unique index if not exists i on t(a)") else {
            panic!()
        };
        assert_eq!(verb.tag(0), "CREATE INDEX");
        let Stmt::Sql { verb, in_tx, .. } = classify("vacuum") else {
            panic!()
        };
        assert_eq!((verb.tag(0).as_str(), in_tx), ("VACUUM", false));
    }
}
