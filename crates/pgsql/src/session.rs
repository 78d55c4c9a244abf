//! One session after authentication, on its own thread: the simple and extended query
//! protocols, PostgreSQL's transaction states on top of SQLite's, portals (one live SQLite
//! cursor at a time, others buffered), cursors, settings, login statements and catalog
//! queries. The async side only moves messages between the socket and this thread.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use rusqlite::Connection;
use rusqlite::types::{Value, ValueRef};
use tokio::sync::mpsc;

use crate::catalog;
use crate::commands::{self, Count, LoginStmt, Stmt, Verb};
use crate::error::{PgError, Severity, sqlstate};
use crate::gateway::{CommitBarrier, Gateway, LoginChange};
use crate::results::{Col, ResultSet};
use crate::scram::ScramVerifier;
use crate::settings::Settings;
use crate::sql;
use crate::sqlite::{self, Control};
use crate::types::{self, oid};
use crate::wire::{FieldDesc, Frontend, Target, TxStatus, backend};

/// Output is handed to the socket writer in chunks of about this size.
const CHUNK: usize = 64 * 1024;

/// What a session needs besides its connection.
pub(crate) struct SessionParams {
    pub server: String,
    pub database: String,
    pub login: String,
    pub gateway: Arc<dyn Gateway>,
    pub runtime: tokio::runtime::Handle,
    /// Most bytes of rows a session keeps for suspended portals and cursors.
    pub max_buffered_bytes: usize,
}

/// The client or the session is gone: the thread ends.
#[derive(Debug)]
pub(crate) struct Gone;

/// Why a step failed.
enum Fail {
    Gone,
    Pg(PgError),
}

impl From<Gone> for Fail {
    fn from(_: Gone) -> Self {
        Fail::Gone
    }
}

impl From<PgError> for Fail {
    fn from(e: PgError) -> Self {
        Fail::Pg(e)
    }
}

/// PostgreSQL's transaction state, kept on top of SQLite's autocommit flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tx {
    /// No transaction (SQLite autocommit).
    Idle,
    /// An implicit transaction: several statements of one Query, or the messages up to a
    /// Sync.
    Implicit,
    /// BEGIN … (ReadyForQuery 'T').
    Block,
    /// An error happened in a block (ReadyForQuery 'E'): only ROLLBACK gets out.
    Failed,
}

struct Prepared {
    stmt: Stmt,
    param_types: Vec<u32>,
    /// Columns sent by Describe of the statement: portals encode with these.
    described: Option<Vec<Col>>,
}

struct Buffered {
    cols: Vec<Col>,
    rows: VecDeque<Vec<Value>>,
    verb: Verb,
    sent: u64,
}

enum PState {
    Fresh,
    Buffered(Buffered),
    Done(String),
    Failed(PgError),
}

struct Portal {
    stmt: Stmt,
    params: Vec<Value>,
    formats: Vec<i16>,
    announced: Option<Vec<Col>>,
    state: PState,
    /// A cursor declared WITH HOLD survives the end of its transaction.
    hold: bool,
}

/// What comes after running a portal: done, or a message the hold loop read and did not
/// handle.
enum Flow {
    Done,
    Next(Frontend),
}

/// How a statement's rows go out.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Simple query: RowDescription first, every row.
    Simple,
    /// Describe of a portal whose column types need a row: RowDescription, then hold.
    Describe,
    /// Execute with a row limit (0: all).
    Execute(u32),
}

/// What a command that is not plain SQL produced.
enum Outcome {
    Tag(String),
    Rows(ResultSet, String),
}

/// A session's commits on their way to the service's [`CommitBarrier`]: a commit hook on the
/// connection notes that a transaction committed, the next flush waits for the barrier.
pub(crate) struct Commits {
    barrier: Arc<dyn CommitBarrier>,
    /// A transaction committed since the barrier last passed.
    pending: Arc<AtomicBool>,
}

impl Commits {
    /// Installs the commit hook on `conn` (it lives as long as the connection, which the
    /// session drops at its end).
    pub(crate) fn watch(
        conn: &Connection,
        barrier: Arc<dyn CommitBarrier>,
    ) -> rusqlite::Result<Self> {
        let pending = Arc::new(AtomicBool::new(false));
        let hook = Arc::clone(&pending);
        // SQLite calls it only for transactions that wrote, just before they commit; a commit
        // that then fails costs one needless barrier, never a missed one. False: never veto.
        conn.commit_hook(Some(move || {
            hook.store(true, Ordering::SeqCst);
            false
        }))?;
        Ok(Self { barrier, pending })
    }
}

/// The session's output: messages are buffered and handed to the socket writer by
/// [`Out::flush`], the only way bytes leave the session's thread.
struct Out {
    buf: Vec<u8>,
    tx: mpsc::Sender<Vec<u8>>,
    commits: Option<Commits>,
}

impl Out {
    /// Sends what is buffered, after the commit barrier when a transaction committed since it
    /// last passed. A barrier that fails ends the session: its error, FATAL, goes out in place
    /// of the buffered bytes.
    fn flush(&mut self) -> Result<(), Gone> {
        if self.buf.is_empty() {
            return Ok(());
        }
        if let Some(commits) = &self.commits
            && commits.pending.load(Ordering::SeqCst)
        {
            // Nobody is left to hear of the commit: no reason to wait for it.
            if self.tx.is_closed() {
                return Err(Gone);
            }
            commits.pending.store(false, Ordering::SeqCst);
            if let Err(e) = commits.barrier.commit() {
                self.buf.clear();
                backend::error(&mut self.buf, &e.with_severity(Severity::Fatal));
                let chunk = std::mem::take(&mut self.buf);
                let _ = self.tx.blocking_send(chunk);
                return Err(Gone);
            }
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
        self.tx.blocking_send(chunk).map_err(|_| Gone)
    }

    fn maybe_flush(&mut self) -> Result<(), Gone> {
        if self.buf.len() >= CHUNK {
            self.flush()
        } else {
            Ok(())
        }
    }
}

/// Runs a session until the client leaves or the session is cut. `conn` is dropped when it
/// returns (and with it the commit hook of `commits`).
pub(crate) fn run(
    conn: Connection,
    params: SessionParams,
    settings: Arc<Mutex<Settings>>,
    control: Arc<Control>,
    commits: Option<Commits>,
    rx: mpsc::Receiver<Frontend>,
    tx: mpsc::Sender<Vec<u8>>,
) {
    let mut st = State {
        p: params,
        settings,
        control,
        rx,
        out: Out {
            buf: Vec::with_capacity(CHUNK),
            tx,
            commits,
        },
        tx: Tx::Idle,
        stmts: HashMap::new(),
        portals: HashMap::new(),
        skipping: false,
    };
    let mut pending: Option<Frontend> = None;
    loop {
        let msg = match pending.take() {
            Some(m) => m,
            None => match st.rx.blocking_recv() {
                Some(m) => m,
                None => break,
            },
        };
        match st.handle(&conn, msg) {
            Ok(next) => pending = next,
            Err(Gone) => break,
        }
    }
    // Leave no transaction open in a connection the service may look at again.
    if !conn.is_autocommit() {
        let _ = conn.execute_batch("ROLLBACK");
    }
}

struct State {
    p: SessionParams,
    settings: Arc<Mutex<Settings>>,
    control: Arc<Control>,
    rx: mpsc::Receiver<Frontend>,
    out: Out,
    tx: Tx,
    stmts: HashMap<String, Prepared>,
    portals: HashMap<String, Portal>,
    /// After an error in the extended protocol: discard messages until Sync.
    skipping: bool,
}

impl State {
    fn handle(&mut self, conn: &Connection, msg: Frontend) -> Result<Option<Frontend>, Gone> {
        if self.skipping && !matches!(msg, Frontend::Sync) {
            return Ok(None);
        }
        let r = match msg {
            Frontend::Query(q) => return self.simple_query(conn, &q),
            Frontend::Parse {
                name,
                sql,
                param_types,
            } => self
                .parse(conn, name, &sql, param_types)
                .map(|()| Flow::Done),
            Frontend::Bind {
                portal,
                statement,
                param_formats,
                params,
                result_formats,
            } => self
                .bind(portal, &statement, &param_formats, &params, result_formats)
                .map(|()| Flow::Done),
            Frontend::Describe {
                target: Target::Statement,
                name,
            } => self.describe_statement(conn, &name).map(|()| Flow::Done),
            Frontend::Describe {
                target: Target::Portal,
                name,
            } => self.describe_portal(conn, &name),
            Frontend::Execute { portal, max_rows } => self.execute(conn, &portal, max_rows),
            Frontend::Close { target, name } => {
                match target {
                    Target::Statement => self.stmts.remove(&name).map(|_| ()),
                    Target::Portal => self.portals.remove(&name).map(|_| ()),
                };
                backend::empty(&mut self.out.buf, b'3');
                Ok(Flow::Done)
            }
            Frontend::Sync => {
                self.sync(conn)?;
                return Ok(None);
            }
            Frontend::Flush => {
                self.out.flush()?;
                return Ok(None);
            }
            Frontend::Terminate => return Err(Gone),
            Frontend::CopyData | Frontend::CopyDone | Frontend::CopyFail => return Ok(None),
            Frontend::FunctionCall => {
                self.send_error(&PgError::unsupported(
                    "the function call protocol is not supported",
                ))?;
                self.ready()?;
                return Ok(None);
            }
            Frontend::Password(_) => {
                self.send_error(&PgError::protocol("unexpected password message"))?;
                return Err(Gone);
            }
        };
        match r {
            Ok(Flow::Done) => Ok(None),
            Ok(Flow::Next(m)) => Ok(Some(m)),
            Err(Fail::Gone) => Err(Gone),
            Err(Fail::Pg(e)) => {
                self.extended_error(conn, &e)?;
                Ok(None)
            }
        }
    }

    // ----- output helpers -----

    fn send_error(&mut self, e: &PgError) -> Result<(), Gone> {
        backend::error(&mut self.out.buf, e);
        if e.severity() == Severity::Fatal {
            self.out.flush()?;
            return Err(Gone);
        }
        Ok(())
    }

    fn notice(&mut self, code: &str, msg: &str) {
        backend::error(
            &mut self.out.buf,
            &PgError::new(Severity::Warning, code, msg),
        );
    }

    fn ready(&mut self) -> Result<(), Gone> {
        let status = match self.tx {
            Tx::Idle | Tx::Implicit => TxStatus::Idle,
            Tx::Block => TxStatus::InBlock,
            Tx::Failed => TxStatus::Failed,
        };
        backend::ready(&mut self.out.buf, status);
        self.out.flush()
    }

    fn sqlite_error(&self, e: &rusqlite::Error) -> PgError {
        self.control
            .stop_reason()
            .unwrap_or_else(|| sqlite::map_error(e))
    }

    fn timeout_ms(&self) -> u64 {
        self.settings
            .lock()
            .map(|s| s.statement_timeout_ms())
            .unwrap_or(0)
    }

    // ----- transactions -----

    fn exec_tx(&self, conn: &Connection, sql: &str) -> Result<(), PgError> {
        conn.execute_batch(sql).map_err(|e| sqlite::map_error(&e))
    }

    fn begin_implicit(&mut self, conn: &Connection) -> Result<(), PgError> {
        if self.tx == Tx::Idle && conn.is_autocommit() {
            self.exec_tx(conn, "BEGIN")?;
            self.tx = Tx::Implicit;
        }
        Ok(())
    }

    /// The end of a transaction: portals go, except cursors WITH HOLD.
    fn end_transaction(&mut self) {
        self.tx = Tx::Idle;
        self.portals.retain(|_, p| p.hold);
    }

    fn rollback(&mut self, conn: &Connection) {
        if !conn.is_autocommit() {
            let _ = conn.execute_batch("ROLLBACK");
        }
        self.end_transaction();
    }

    /// Commits an implicit transaction (the end of a Query or a Sync).
    fn commit_implicit(&mut self, conn: &Connection) -> Result<(), Gone> {
        if self.tx != Tx::Implicit {
            return Ok(());
        }
        if let Err(e) = self.commit(conn) {
            self.send_error(&e)?;
        }
        Ok(())
    }

    /// COMMIT; a failed commit rolls back (PostgreSQL's COMMIT never leaves the
    /// transaction open). Either way the transaction ends.
    fn commit(&mut self, conn: &Connection) -> Result<(), PgError> {
        let r = if conn.is_autocommit() {
            Ok(())
        } else {
            self.exec_tx(conn, "COMMIT")
        };
        if r.is_err() {
            self.rollback(conn);
        }
        self.end_transaction();
        r
    }

    /// After a statement failed: an implicit transaction is rolled back, a block fails.
    fn fail_transaction(&mut self, conn: &Connection) {
        match self.tx {
            Tx::Implicit => self.rollback(conn),
            Tx::Block => self.tx = Tx::Failed,
            Tx::Idle | Tx::Failed => {}
        }
    }

    fn extended_error(&mut self, conn: &Connection, e: &PgError) -> Result<(), Gone> {
        self.send_error(e)?;
        self.skipping = true;
        self.fail_transaction(conn);
        Ok(())
    }

    fn sync(&mut self, conn: &Connection) -> Result<(), Gone> {
        self.skipping = false;
        self.commit_implicit(conn)?;
        if self.tx == Tx::Idle {
            self.portals.retain(|_, p| p.hold);
        }
        self.ready()
    }

    fn check_failed(&self, stmt: &Stmt) -> Result<(), PgError> {
        if self.tx == Tx::Failed && !stmt.ends_failed_block() {
            return Err(PgError::error(
                sqlstate::IN_FAILED_SQL_TRANSACTION,
                "current transaction is aborted, commands ignored until end of transaction block",
            ));
        }
        Ok(())
    }

    // ----- simple query -----

    fn simple_query(&mut self, conn: &Connection, q: &str) -> Result<Option<Frontend>, Gone> {
        self.stmts.remove("");
        self.portals.remove("");
        let parts = sql::split_statements(q);
        if parts.is_empty() {
            backend::empty(&mut self.out.buf, b'I');
        }
        let multi = parts.len() > 1;
        for part in parts {
            let stmt = commands::classify(part);
            match self.simple_statement(conn, &stmt, multi) {
                Ok(()) => {}
                Err(Fail::Gone) => return Err(Gone),
                Err(Fail::Pg(e)) => {
                    self.send_error(&e)?;
                    if !matches!(stmt, Stmt::Catalog(_)) {
                        self.fail_transaction(conn);
                    }
                    break;
                }
            }
        }
        self.commit_implicit(conn)?;
        self.ready()?;
        Ok(None)
    }

    fn simple_statement(
        &mut self,
        conn: &Connection,
        stmt: &Stmt,
        multi: bool,
    ) -> Result<(), Fail> {
        self.check_failed(stmt)?;
        match stmt {
            Stmt::Empty => Ok(()),
            Stmt::Sql {
                sql, verb, in_tx, ..
            } => {
                if multi && *in_tx {
                    self.begin_implicit(conn)?;
                }
                match self.run_sql(conn, sql, verb, &[], &[], None, Mode::Simple, "")? {
                    Flow::Done => Ok(()),
                    // Simple mode never holds a cursor.
                    Flow::Next(_) => Ok(()),
                }
            }
            other => {
                let outcome = self.command(conn, other, &[])?;
                match outcome {
                    Outcome::Tag(tag) => backend::command_complete(&mut self.out.buf, &tag),
                    Outcome::Rows(rs, tag) => {
                        let binary = matches!(other, Stmt::Fetch { name, .. } if self.cursor_is_binary(name));
                        let formats = if binary { vec![1] } else { Vec::new() };
                        let fields = field_descs(&rs.cols, &formats)?;
                        backend::row_description(&mut self.out.buf, &fields);
                        for row in &rs.rows {
                            self.data_row(&rs.cols, &formats, |i| {
                                row.get(i).map_or(ValueRef::Null, ValueRef::from)
                            })?;
                        }
                        backend::command_complete(&mut self.out.buf, &tag);
                    }
                }
                Ok(())
            }
        }
    }

    fn cursor_is_binary(&self, name: &str) -> bool {
        self.portals
            .get(name)
            .is_some_and(|p| p.formats.first() == Some(&1))
    }

    // ----- rows -----

    /// Appends a DataRow; on an encoding error nothing is appended.
    fn data_row<'v>(
        &mut self,
        cols: &[Col],
        formats: &[i16],
        get: impl Fn(usize) -> ValueRef<'v>,
    ) -> Result<(), Fail> {
        let buf = &mut self.out.buf;
        let start = buf.len();
        let at = backend::begin(buf, b'D');
        buf.extend_from_slice(&(cols.len() as u16).to_be_bytes());
        for (i, c) in cols.iter().enumerate() {
            let v = get(i);
            if v == ValueRef::Null {
                buf.extend_from_slice(&(-1i32).to_be_bytes());
                continue;
            }
            let len_at = buf.len();
            buf.extend_from_slice(&[0, 0, 0, 0]);
            if format_of(formats, i) == 1 {
                if let Err(e) = types::encode_binary(c.oid, v, buf) {
                    buf.truncate(start);
                    return Err(e.into());
                }
            } else {
                types::encode_text(c.oid, v, buf);
            }
            let len = (buf.len() - len_at - 4) as u32;
            buf[len_at..len_at + 4].copy_from_slice(&len.to_be_bytes());
        }
        backend::end(buf, at);
        self.out.maybe_flush()?;
        Ok(())
    }

    /// Runs SQL on SQLite. In Execute and Describe modes a cursor with rows left is held
    /// live (the next Execute of the same portal continues it) until another message needs
    /// the connection; its rows are then buffered.
    #[allow(clippy::too_many_arguments)]
    fn run_sql(
        &mut self,
        conn: &Connection,
        sql: &str,
        verb: &Verb,
        params: &[Value],
        formats: &[i16],
        announced: Option<&[Col]>,
        mode: Mode,
        portal: &str,
    ) -> Result<Flow, Fail> {
        let mut stmt = prepare_bound(conn, sql, params)?;
        let timeout = self.timeout_ms();
        if stmt.column_count() == 0 {
            self.control.start(timeout);
            let r = stmt.raw_execute();
            self.control.stop();
            let changed = r.map_err(|e| self.sqlite_error(&e))?;
            backend::command_complete(&mut self.out.buf, &verb.tag(changed as u64));
            return Ok(Flow::Done);
        }
        let meta = column_meta(&stmt);
        let mut rows = stmt.raw_query();
        self.control.start(timeout);
        let first = rows.next().map(|r| r.map(row_values));
        self.control.stop();
        let mut peek = first.map_err(|e| self.sqlite_error(&e))?;
        let cols: Vec<Col> = match announced {
            Some(a) if a.len() == meta.len() => a.to_vec(),
            _ => meta
                .iter()
                .enumerate()
                .map(|(i, (name, decl))| Col {
                    name: name.clone(),
                    oid: decl.unwrap_or_else(|| {
                        peek.as_ref()
                            .and_then(|r| r.get(i))
                            .map_or(oid::TEXT, |v| types::oid_for_value(ValueRef::from(v)))
                    }),
                })
                .collect(),
        };
        let fields = field_descs(&cols, formats)?;
        let mut sent = 0u64;
        match mode {
            Mode::Simple => {
                backend::row_description(&mut self.out.buf, &fields);
                self.stream(&mut rows, &mut peek, &cols, formats, 0, &mut sent)?;
                backend::command_complete(&mut self.out.buf, &rows_tag(verb, sent));
                Ok(Flow::Done)
            }
            Mode::Describe => {
                backend::row_description(&mut self.out.buf, &fields);
                self.hold(
                    portal, &mut rows, &mut peek, &cols, formats, verb, &mut sent,
                )
            }
            Mode::Execute(max) => {
                if self.stream(&mut rows, &mut peek, &cols, formats, max, &mut sent)? {
                    backend::command_complete(&mut self.out.buf, &rows_tag(verb, sent));
                    self.set_done(portal, rows_tag(verb, 0));
                    Ok(Flow::Done)
                } else {
                    backend::empty(&mut self.out.buf, b's');
                    self.hold(
                        portal, &mut rows, &mut peek, &cols, formats, verb, &mut sent,
                    )
                }
            }
        }
    }

    fn set_done(&mut self, portal: &str, tag: String) {
        if let Some(p) = self.portals.get_mut(portal) {
            p.state = PState::Done(tag);
        }
    }

    /// Sends up to `max` rows (0: all); true when the rows are exhausted.
    #[allow(clippy::too_many_arguments)]
    fn stream(
        &mut self,
        rows: &mut rusqlite::Rows<'_>,
        peek: &mut Option<Vec<Value>>,
        cols: &[Col],
        formats: &[i16],
        max: u32,
        sent: &mut u64,
    ) -> Result<bool, Fail> {
        let max = u64::from(max);
        let mut n = 0u64;
        if let Some(r) = peek.take() {
            if max != 0 && n >= max {
                *peek = Some(r);
                return Ok(false);
            }
            self.data_row(cols, formats, |i| {
                r.get(i).map_or(ValueRef::Null, ValueRef::from)
            })?;
            n += 1;
            *sent += 1;
        }
        let timeout = self.timeout_ms();
        self.control.start(timeout);
        let r = loop {
            if max != 0 && n >= max {
                break Ok(false);
            }
            match rows.next() {
                Ok(Some(row)) => {
                    let res =
                        self.data_row(cols, formats, |i| row.get_ref(i).unwrap_or(ValueRef::Null));
                    if let Err(e) = res {
                        break Err(e);
                    }
                    n += 1;
                    *sent += 1;
                }
                Ok(None) => break Ok(true),
                Err(e) => break Err(Fail::Pg(self.sqlite_error(&e))),
            }
        };
        self.control.stop();
        r
    }

    /// Keeps a cursor open across messages: continues it for Execute of the same portal,
    /// answers Describe, Flush and (inside a block) Sync, and buffers the rest of its rows
    /// when another message needs the connection.
    #[allow(clippy::too_many_arguments)]
    fn hold(
        &mut self,
        portal: &str,
        rows: &mut rusqlite::Rows<'_>,
        peek: &mut Option<Vec<Value>>,
        cols: &[Col],
        formats: &[i16],
        verb: &Verb,
        sent: &mut u64,
    ) -> Result<Flow, Fail> {
        loop {
            let Some(msg) = self.rx.blocking_recv() else {
                return Err(Fail::Gone);
            };
            match msg {
                Frontend::Execute {
                    portal: p,
                    max_rows,
                } if p == portal => {
                    // Like PostgreSQL, each Execute's tag counts the rows it sent.
                    *sent = 0;
                    if self.stream(rows, peek, cols, formats, max_rows, sent)? {
                        backend::command_complete(&mut self.out.buf, &rows_tag(verb, *sent));
                        self.set_done(portal, rows_tag(verb, 0));
                        return Ok(Flow::Done);
                    }
                    backend::empty(&mut self.out.buf, b's');
                }
                Frontend::Describe {
                    target: Target::Portal,
                    name,
                } if name == portal => {
                    let fields = field_descs(cols, formats)?;
                    backend::row_description(&mut self.out.buf, &fields);
                }
                Frontend::Flush => self.out.flush()?,
                Frontend::Sync if self.tx == Tx::Block => {
                    self.skipping = false;
                    self.ready()?;
                }
                Frontend::Close {
                    target: Target::Portal,
                    name,
                } if name == portal => {
                    self.portals.remove(portal);
                    backend::empty(&mut self.out.buf, b'3');
                    return Ok(Flow::Done);
                }
                // The portal is about to go away: no need to keep its rows.
                Frontend::Bind { portal: ref p, .. } if p == portal => return Ok(Flow::Next(msg)),
                Frontend::Query(_) if portal.is_empty() => return Ok(Flow::Next(msg)),
                Frontend::Sync | Frontend::Terminate => return Ok(Flow::Next(msg)),
                other => {
                    self.buffer_rest(portal, rows, peek, cols, verb, *sent);
                    return Ok(Flow::Next(other));
                }
            }
        }
    }

    /// Moves the rest of a live cursor into its portal (bounded by max_buffered_bytes).
    fn buffer_rest(
        &mut self,
        portal: &str,
        rows: &mut rusqlite::Rows<'_>,
        peek: &mut Option<Vec<Value>>,
        cols: &[Col],
        verb: &Verb,
        sent: u64,
    ) {
        let mut buffered = VecDeque::new();
        let mut bytes = 0usize;
        if let Some(r) = peek.take() {
            bytes += values_size(&r);
            buffered.push_back(r);
        }
        self.control.start(self.timeout_ms());
        let state = loop {
            if bytes > self.p.max_buffered_bytes {
                break PState::Failed(PgError::error(
                    sqlstate::PROGRAM_LIMIT_EXCEEDED,
                    "the rows of a suspended portal exceed the session's buffer",
                ).with_hint("fetch the portal to its end before sending other statements, or use LIMIT/OFFSET"));
            }
            match rows.next() {
                Ok(Some(row)) => {
                    let v = row_values(row);
                    bytes += values_size(&v);
                    buffered.push_back(v);
                }
                Ok(None) => {
                    break PState::Buffered(Buffered {
                        cols: cols.to_vec(),
                        rows: std::mem::take(&mut buffered),
                        verb: verb.clone(),
                        sent,
                    });
                }
                Err(e) => break PState::Failed(self.sqlite_error(&e)),
            }
        };
        self.control.stop();
        if let Some(p) = self.portals.get_mut(portal) {
            p.state = state;
        }
    }

    // ----- extended query -----

    fn parse(
        &mut self,
        conn: &Connection,
        name: String,
        text: &str,
        param_types: Vec<u32>,
    ) -> Result<(), Fail> {
        if !name.is_empty() && self.stmts.contains_key(&name) {
            return Err(PgError::error(
                sqlstate::DUPLICATE_PREPARED_STATEMENT,
                format!("prepared statement \"{name}\" already exists"),
            )
            .into());
        }
        let parts = sql::split_statements(text);
        if parts.len() > 1 {
            return Err(PgError::syntax(
                "cannot insert multiple commands into a prepared statement",
            )
            .into());
        }
        let stmt = parts.first().map_or(Stmt::Empty, |s| commands::classify(s));
        self.check_failed(&stmt)?;
        let mut nparams = param_types.len();
        match &stmt {
            Stmt::Refused(e) => return Err(e.clone().into()),
            Stmt::Sql { sql, params, .. } => {
                let prepared = conn
                    .prepare_cached(sql)
                    .map_err(|e| sqlite::map_error(&e))?;
                nparams = nparams.max(*params).max(prepared.parameter_count());
            }
            _ => {}
        }
        let mut param_types = param_types;
        param_types.resize(nparams, 0);
        self.stmts.insert(
            name,
            Prepared {
                stmt,
                param_types,
                described: None,
            },
        );
        backend::empty(&mut self.out.buf, b'1');
        Ok(())
    }

    fn bind(
        &mut self,
        portal: String,
        statement: &str,
        param_formats: &[i16],
        params: &[Option<Vec<u8>>],
        result_formats: Vec<i16>,
    ) -> Result<(), Fail> {
        let Some(ps) = self.stmts.get(statement) else {
            return Err(PgError::error(
                sqlstate::INVALID_SQL_STATEMENT_NAME,
                format!("prepared statement \"{statement}\" does not exist"),
            )
            .into());
        };
        if params.len() != ps.param_types.len() {
            return Err(PgError::error(
                sqlstate::PROTOCOL_VIOLATION,
                format!("bind message supplies {} parameters, but prepared statement \"{statement}\" requires {}", params.len(), ps.param_types.len()),
            )
            .into());
        }
        if param_formats.len() > 1 && param_formats.len() != params.len() {
            return Err(PgError::error(
                sqlstate::PROTOCOL_VIOLATION,
                format!(
                    "bind message has {} parameter formats but {} parameters",
                    param_formats.len(),
                    params.len()
                ),
            )
            .into());
        }
        self.check_failed(&ps.stmt)?;
        let mut values = Vec::with_capacity(params.len());
        for (i, p) in params.iter().enumerate() {
            let v = match p {
                None => Value::Null,
                Some(bytes) => {
                    let t = ps.param_types.get(i).copied().unwrap_or(0);
                    types::decode_param(t, format_of(param_formats, i), bytes)?
                }
            };
            values.push(v);
        }
        if !portal.is_empty() && self.portals.contains_key(&portal) {
            return Err(PgError::error(
                sqlstate::DUPLICATE_CURSOR,
                format!("portal \"{portal}\" already exists"),
            )
            .into());
        }
        let p = Portal {
            stmt: ps.stmt.clone(),
            params: values,
            formats: result_formats,
            announced: ps.described.clone(),
            state: PState::Fresh,
            hold: false,
        };
        self.portals.insert(portal, p);
        backend::empty(&mut self.out.buf, b'2');
        Ok(())
    }

    /// Columns of a statement without running it: declared types, TEXT for expressions.
    fn static_columns(
        &mut self,
        conn: &Connection,
        stmt: &Stmt,
        params: &[Value],
    ) -> Result<Option<Vec<Col>>, Fail> {
        Ok(match stmt {
            Stmt::Sql { sql, .. } => {
                let s = conn
                    .prepare_cached(sql)
                    .map_err(|e| sqlite::map_error(&e))?;
                if s.column_count() == 0 {
                    None
                } else {
                    Some(
                        s.columns()
                            .iter()
                            .map(|c| {
                                Col::new(
                                    c.name(),
                                    c.decl_type().map_or(oid::TEXT, types::oid_for_decltype),
                                )
                            })
                            .collect(),
                    )
                }
            }
            Stmt::Show(name) => Some(show_columns(name)),
            Stmt::Catalog(_) => match self.command(conn, stmt, params)? {
                Outcome::Rows(rs, _) => Some(rs.cols),
                Outcome::Tag(_) => None,
            },
            Stmt::Fetch {
                name,
                is_move: false,
                ..
            } => match self.portals.get(name).map(|p| &p.state) {
                Some(PState::Buffered(b)) => Some(b.cols.clone()),
                _ => return Err(no_cursor(name).into()),
            },
            _ => None,
        })
    }

    fn describe_statement(&mut self, conn: &Connection, name: &str) -> Result<(), Fail> {
        let Some(ps) = self.stmts.get(name) else {
            return Err(PgError::error(
                sqlstate::INVALID_SQL_STATEMENT_NAME,
                format!("prepared statement \"{name}\" does not exist"),
            )
            .into());
        };
        let stmt = ps.stmt.clone();
        let types: Vec<u32> = ps
            .param_types
            .iter()
            .map(|&t| if t == 0 { oid::TEXT } else { t })
            .collect();
        let nulls = vec![Value::Null; types.len()];
        let cols = self.static_columns(conn, &stmt, &nulls)?;
        backend::parameter_description(&mut self.out.buf, &types);
        match &cols {
            Some(c) => backend::row_description(&mut self.out.buf, &field_descs(c, &[])?),
            None => backend::empty(&mut self.out.buf, b'n'),
        }
        if let Some(ps) = self.stmts.get_mut(name) {
            ps.described = cols;
        }
        Ok(())
    }

    fn describe_portal(&mut self, conn: &Connection, name: &str) -> Result<Flow, Fail> {
        let Some(p) = self.portals.get(name) else {
            return Err(no_portal(name).into());
        };
        let formats = p.formats.clone();
        match &p.state {
            PState::Buffered(b) => {
                let fields = field_descs(&b.cols, &formats)?;
                backend::row_description(&mut self.out.buf, &fields);
                return Ok(Flow::Done);
            }
            PState::Done(_) | PState::Failed(_) => {
                backend::empty(&mut self.out.buf, b'n');
                return Ok(Flow::Done);
            }
            PState::Fresh => {}
        }
        let stmt = p.stmt.clone();
        let params = p.params.clone();
        let announced = p.announced.clone();
        if let Stmt::Sql {
            sql, verb, in_tx, ..
        } = &stmt
        {
            // Declared types (or types a statement Describe announced) need no row.
            let known = match announced {
                Some(cols) => Some(cols),
                None if !has_untyped(conn, sql) => self.static_columns(conn, &stmt, &params)?,
                None => None,
            };
            if let Some(cols) = known {
                backend::row_description(&mut self.out.buf, &field_descs(&cols, &formats)?);
                return Ok(Flow::Done);
            }
            let prepared = conn
                .prepare_cached(sql)
                .map_err(|e| sqlite::map_error(&e))?;
            if prepared.column_count() == 0 {
                backend::empty(&mut self.out.buf, b'n');
                return Ok(Flow::Done);
            }
            drop(prepared);
            self.check_failed(&stmt)?;
            if *in_tx {
                self.begin_implicit(conn)?;
            }
            return self.run_sql(
                conn,
                sql,
                verb,
                &params,
                &formats,
                None,
                Mode::Describe,
                name,
            );
        }
        if matches!(stmt, Stmt::Catalog(_) | Stmt::Show(_)) {
            // Run it now; Execute sends the rows.
            self.check_failed(&stmt)?;
            let outcome = self.command(conn, &stmt, &params)?;
            if let Outcome::Rows(rs, _) = outcome {
                backend::row_description(&mut self.out.buf, &field_descs(&rs.cols, &formats)?);
                if let Some(p) = self.portals.get_mut(name) {
                    p.state = PState::Buffered(Buffered {
                        cols: rs.cols,
                        rows: rs.rows.into(),
                        verb: Verb::Select,
                        sent: 0,
                    });
                }
                return Ok(Flow::Done);
            }
        }
        match self.static_columns(conn, &stmt, &params)? {
            Some(c) => backend::row_description(&mut self.out.buf, &field_descs(&c, &formats)?),
            None => backend::empty(&mut self.out.buf, b'n'),
        }
        Ok(Flow::Done)
    }

    fn execute(&mut self, conn: &Connection, name: &str, max_rows: u32) -> Result<Flow, Fail> {
        let Some(p) = self.portals.get_mut(name) else {
            return Err(no_portal(name).into());
        };
        match &mut p.state {
            PState::Fresh => {}
            PState::Done(tag) => {
                let tag = tag.clone();
                backend::command_complete(&mut self.out.buf, &tag);
                return Ok(Flow::Done);
            }
            PState::Failed(e) => return Err(e.clone().into()),
            PState::Buffered(_) => {
                let PState::Buffered(mut b) = std::mem::replace(&mut p.state, PState::Fresh) else {
                    return Ok(Flow::Done);
                };
                let formats = p.formats.clone();
                b.sent = 0;
                let done = self.send_buffered(&mut b, &formats, max_rows)?;
                let tag = rows_tag(&b.verb, b.sent);
                if let Some(p) = self.portals.get_mut(name) {
                    if done {
                        backend::command_complete(&mut self.out.buf, &tag);
                        p.state = PState::Done(rows_tag(&b.verb, 0));
                    } else {
                        backend::empty(&mut self.out.buf, b's');
                        p.state = PState::Buffered(b);
                    }
                }
                return Ok(Flow::Done);
            }
        }
        let stmt = p.stmt.clone();
        let params = p.params.clone();
        let formats = p.formats.clone();
        let announced = p.announced.clone();
        self.check_failed(&stmt)?;
        match &stmt {
            Stmt::Empty => {
                backend::empty(&mut self.out.buf, b'I');
                Ok(Flow::Done)
            }
            Stmt::Sql {
                sql, verb, in_tx, ..
            } => {
                if *in_tx {
                    self.begin_implicit(conn)?;
                }
                self.run_sql(
                    conn,
                    sql,
                    verb,
                    &params,
                    &formats,
                    announced.as_deref(),
                    Mode::Execute(max_rows),
                    name,
                )
            }
            other => {
                match self.command(conn, other, &params)? {
                    Outcome::Tag(tag) => {
                        backend::command_complete(&mut self.out.buf, &tag);
                        self.set_done(name, tag);
                    }
                    Outcome::Rows(rs, tag) => {
                        let mut b = Buffered {
                            cols: rs.cols,
                            rows: rs.rows.into(),
                            verb: Verb::Other(tag.clone()),
                            sent: 0,
                        };
                        if self.send_buffered(&mut b, &formats, max_rows)? {
                            backend::command_complete(&mut self.out.buf, &tag);
                            self.set_done(name, tag);
                        } else {
                            backend::empty(&mut self.out.buf, b's');
                            if let Some(p) = self.portals.get_mut(name) {
                                p.state = PState::Buffered(b);
                            }
                        }
                    }
                }
                Ok(Flow::Done)
            }
        }
    }

    /// Sends up to `max` buffered rows; true when none are left.
    fn send_buffered(&mut self, b: &mut Buffered, formats: &[i16], max: u32) -> Result<bool, Fail> {
        let mut n = 0u32;
        while max == 0 || n < max {
            let Some(row) = b.rows.pop_front() else {
                return Ok(true);
            };
            self.data_row(&b.cols, formats, |i| {
                row.get(i).map_or(ValueRef::Null, ValueRef::from)
            })?;
            b.sent += 1;
            n += 1;
        }
        Ok(b.rows.is_empty() && max == 0)
    }

    // ----- commands the front end answers -----

    fn command(
        &mut self,
        conn: &Connection,
        stmt: &Stmt,
        params: &[Value],
    ) -> Result<Outcome, Fail> {
        let tag = stmt.fixed_tag().to_owned();
        match stmt {
            Stmt::Begin(mode) => {
                match self.tx {
                    Tx::Idle => {
                        if conn.is_autocommit() {
                            self.exec_tx(conn, &format!("BEGIN {mode}"))?;
                        }
                        self.tx = Tx::Block;
                    }
                    Tx::Implicit => self.tx = Tx::Block,
                    Tx::Block | Tx::Failed => self.notice(
                        sqlstate::ACTIVE_SQL_TRANSACTION,
                        "there is already a transaction in progress",
                    ),
                }
                Ok(Outcome::Tag(tag))
            }
            Stmt::Commit => match self.tx {
                Tx::Idle => {
                    self.notice(
                        sqlstate::NO_ACTIVE_SQL_TRANSACTION,
                        "there is no transaction in progress",
                    );
                    Ok(Outcome::Tag(tag))
                }
                Tx::Failed => {
                    self.rollback(conn);
                    Ok(Outcome::Tag("ROLLBACK".into()))
                }
                Tx::Implicit | Tx::Block => {
                    self.commit(conn)?;
                    Ok(Outcome::Tag(tag))
                }
            },
            Stmt::Rollback => {
                if self.tx == Tx::Idle {
                    self.notice(
                        sqlstate::NO_ACTIVE_SQL_TRANSACTION,
                        "there is no transaction in progress",
                    );
                }
                self.rollback(conn);
                Ok(Outcome::Tag(tag))
            }
            Stmt::Savepoint(name) | Stmt::Release(name) | Stmt::RollbackTo(name) => {
                let verb = match stmt {
                    Stmt::Savepoint(_) => "SAVEPOINT",
                    Stmt::Release(_) => "RELEASE",
                    _ => "ROLLBACK TO",
                };
                if matches!(self.tx, Tx::Idle | Tx::Implicit) {
                    return Err(PgError::error(
                        sqlstate::NO_ACTIVE_SQL_TRANSACTION,
                        format!("{verb} can only be used in transaction blocks"),
                    )
                    .into());
                }
                if conn.is_autocommit() {
                    return Err(PgError::error(
                        sqlstate::INVALID_SAVEPOINT_SPECIFICATION,
                        format!("savepoint \"{name}\" does not exist"),
                    )
                    .into());
                }
                self.exec_tx(conn, &format!("{verb} {}", quote_ident(name)))
                    .map_err(|e| {
                        if e.code() == sqlstate::INVALID_SAVEPOINT_SPECIFICATION
                            || e.message().contains("no such savepoint")
                        {
                            PgError::error(
                                sqlstate::INVALID_SAVEPOINT_SPECIFICATION,
                                format!("savepoint \"{name}\" does not exist"),
                            )
                        } else {
                            e
                        }
                    })?;
                if matches!(stmt, Stmt::RollbackTo(_)) {
                    self.tx = Tx::Block;
                }
                Ok(Outcome::Tag(tag))
            }
            Stmt::Set(name, value) => {
                let report = self.lock_settings()?.set(name, value.as_deref())?;
                if let Some((n, v)) = report {
                    backend::parameter_status(&mut self.out.buf, &n, &v);
                }
                Ok(Outcome::Tag(tag))
            }
            Stmt::SetIgnored => Ok(Outcome::Tag(tag)),
            Stmt::Reset(name) => {
                let reports = match name {
                    Some(n) => self.lock_settings()?.set(n, None)?.into_iter().collect(),
                    None => self.lock_settings()?.reset_all(),
                };
                for (n, v) in reports {
                    backend::parameter_status(&mut self.out.buf, &n, &v);
                }
                Ok(Outcome::Tag(tag))
            }
            Stmt::Show(name) => {
                let s = self.lock_settings()?;
                let rows = if name == "all" {
                    s.all()
                        .into_iter()
                        .map(|(n, v, d)| vec![Value::Text(n), Value::Text(v), Value::Text(d)])
                        .collect()
                } else {
                    vec![vec![Value::Text(
                        s.get(name)
                            .ok_or_else(|| Settings::unknown(name))?
                            .to_owned(),
                    )]]
                };
                Ok(Outcome::Rows(
                    ResultSet {
                        cols: show_columns(name),
                        rows,
                    },
                    "SHOW".into(),
                ))
            }
            Stmt::Login(l) => {
                self.login(l)?;
                Ok(Outcome::Tag(tag))
            }
            Stmt::Declare {
                name,
                query,
                hold,
                binary,
            } => {
                if !*hold && matches!(self.tx, Tx::Idle | Tx::Implicit) {
                    return Err(PgError::error(
                        sqlstate::NO_ACTIVE_SQL_TRANSACTION,
                        "DECLARE CURSOR can only be used in transaction blocks",
                    )
                    .into());
                }
                if self.portals.contains_key(name) {
                    return Err(PgError::error(
                        sqlstate::DUPLICATE_CURSOR,
                        format!("cursor \"{name}\" already exists"),
                    )
                    .into());
                }
                let rs = self.result_set(conn, query, params)?;
                self.portals.insert(
                    name.clone(),
                    Portal {
                        stmt: (**query).clone(),
                        params: Vec::new(),
                        formats: if *binary { vec![1] } else { Vec::new() },
                        announced: None,
                        state: PState::Buffered(Buffered {
                            cols: rs.cols,
                            rows: rs.rows.into(),
                            verb: Verb::Select,
                            sent: 0,
                        }),
                        hold: *hold,
                    },
                );
                Ok(Outcome::Tag(tag))
            }
            Stmt::Fetch {
                name,
                count,
                is_move,
            } => {
                let Some(PState::Buffered(b)) = self.portals.get_mut(name).map(|p| &mut p.state)
                else {
                    return Err(no_cursor(name).into());
                };
                let take = match count {
                    Count::All => b.rows.len(),
                    Count::Rows(n) => usize::try_from(*n).unwrap_or(usize::MAX).min(b.rows.len()),
                };
                let rows: Vec<Vec<Value>> = b.rows.drain(..take).collect();
                let n = rows.len();
                if *is_move {
                    return Ok(Outcome::Tag(format!("MOVE {n}")));
                }
                Ok(Outcome::Rows(
                    ResultSet {
                        cols: b.cols.clone(),
                        rows,
                    },
                    format!("FETCH {n}"),
                ))
            }
            Stmt::CloseCursor(name) => {
                match name {
                    Some(n) => {
                        if self.portals.remove(n).is_none() {
                            return Err(no_cursor(n).into());
                        }
                    }
                    None => self.portals.retain(|k, _| k.is_empty()),
                }
                Ok(Outcome::Tag(tag))
            }
            Stmt::Deallocate(name) => {
                match name {
                    Some(n) => {
                        if self.stmts.remove(n).is_none() {
                            return Err(PgError::error(
                                sqlstate::INVALID_SQL_STATEMENT_NAME,
                                format!("prepared statement \"{n}\" does not exist"),
                            )
                            .into());
                        }
                    }
                    None => self.stmts.retain(|k, _| k.is_empty()),
                }
                Ok(Outcome::Tag(tag))
            }
            Stmt::Discard => {
                if matches!(self.tx, Tx::Block | Tx::Failed) {
                    return Err(PgError::error(
                        sqlstate::ACTIVE_SQL_TRANSACTION,
                        "DISCARD ALL cannot run inside a transaction block",
                    )
                    .into());
                }
                self.stmts.clear();
                self.portals.clear();
                let reports = self.lock_settings()?.reset_all();
                for (n, v) in reports {
                    backend::parameter_status(&mut self.out.buf, &n, &v);
                }
                Ok(Outcome::Tag(tag))
            }
            Stmt::Catalog(text) => {
                let ctx = catalog::Context {
                    conn,
                    login: &self.p.login,
                    database: &self.p.database,
                    databases: &|| {
                        self.p
                            .runtime
                            .block_on(self.p.gateway.list_databases(&self.p.server))
                    },
                };
                let rs = catalog::answer(&ctx, text)?;
                let n = rs.rows.len();
                Ok(Outcome::Rows(rs, format!("SELECT {n}")))
            }
            Stmt::Refused(e) => Err(e.clone().into()),
            Stmt::Empty | Stmt::Sql { .. } => Ok(Outcome::Tag(String::new())),
        }
    }

    fn lock_settings(&self) -> Result<std::sync::MutexGuard<'_, Settings>, PgError> {
        self.settings.lock().map_err(|_| {
            PgError::error(sqlstate::INTERNAL_ERROR, "session settings are unavailable")
        })
    }

    /// Every row of a query (DECLARE CURSOR), bounded by max_buffered_bytes.
    fn result_set(
        &mut self,
        conn: &Connection,
        stmt: &Stmt,
        params: &[Value],
    ) -> Result<ResultSet, Fail> {
        match stmt {
            Stmt::Sql { sql, .. } => {
                let mut s = prepare_bound(conn, sql, params)?;
                let meta = column_meta(&s);
                let mut rows = s.raw_query();
                let mut out = Vec::new();
                let mut bytes = 0usize;
                self.control.start(self.timeout_ms());
                let r = loop {
                    match rows.next() {
                        Ok(Some(row)) => {
                            let v = row_values(row);
                            bytes += values_size(&v);
                            out.push(v);
                            if bytes > self.p.max_buffered_bytes {
                                break Err(PgError::error(
                                    sqlstate::PROGRAM_LIMIT_EXCEEDED,
                                    "the rows of the cursor exceed the session's buffer",
                                )
                                .with_hint("declare the cursor over fewer rows (LIMIT/OFFSET)"));
                            }
                        }
                        Ok(None) => break Ok(()),
                        Err(e) => break Err(self.sqlite_error(&e)),
                    }
                };
                self.control.stop();
                r?;
                let cols = meta
                    .iter()
                    .enumerate()
                    .map(|(i, (n, d))| {
                        Col::new(
                            n,
                            d.unwrap_or_else(|| {
                                out.first()
                                    .and_then(|r| r.get(i))
                                    .map_or(oid::TEXT, |v| types::oid_for_value(ValueRef::from(v)))
                            }),
                        )
                    })
                    .collect();
                Ok(ResultSet { cols, rows: out })
            }
            other => match self.command(conn, other, params)? {
                Outcome::Rows(rs, _) => Ok(rs),
                Outcome::Tag(_) => Err(PgError::syntax("the statement returns no rows").into()),
            },
        }
    }

    fn login(&mut self, l: &LoginStmt) -> Result<(), PgError> {
        let verifier = |pw: &str| -> Result<ScramVerifier, PgError> {
            if pw.starts_with("SCRAM-SHA-256$") {
                return pw.parse().map_err(|_| {
                    PgError::error(
                        sqlstate::INVALID_PARAMETER_VALUE,
                        "malformed SCRAM-SHA-256 verifier",
                    )
                });
            }
            if pw.starts_with("md5") && pw.len() == 35 {
                return Err(PgError::unsupported(
                    "MD5 password hashes are not supported: send the password or a SCRAM-SHA-256 verifier",
                ));
            }
            if pw.is_empty() {
                return Err(PgError::error(
                    sqlstate::INVALID_PARAMETER_VALUE,
                    "empty password",
                ));
            }
            ScramVerifier::from_password(pw)
                .map_err(|e| PgError::error(sqlstate::INTERNAL_ERROR, e.to_string()))
        };
        let changes = match l {
            LoginStmt::Create { login, password } => vec![LoginChange::Create {
                login: login.clone(),
                verifier: verifier(password)?,
            }],
            LoginStmt::SetPassword { login, password } => vec![LoginChange::SetPassword {
                login: login.clone(),
                verifier: verifier(password)?,
            }],
            LoginStmt::CreateExternal { login, object_id } => vec![LoginChange::CreateExternal {
                login: login.clone(),
                object_id: object_id.clone(),
            }],
            LoginStmt::Drop { logins, if_exists } => logins
                .iter()
                .map(|l| LoginChange::Drop {
                    login: l.clone(),
                    if_exists: *if_exists,
                })
                .collect(),
        };
        for change in changes {
            let fut = self.p.gateway.change_login(
                &self.p.server,
                &self.p.database,
                &self.p.login,
                change,
            );
            self.p
                .runtime
                .block_on(fut)
                .map_err(|e| e.with_severity(Severity::Error))?;
        }
        Ok(())
    }
}

/// Names and declared-type OIDs of a statement's result columns.
fn column_meta(stmt: &rusqlite::Statement<'_>) -> Vec<(String, Option<u32>)> {
    stmt.columns()
        .iter()
        .map(|c| {
            (
                c.name().to_owned(),
                c.decl_type().map(types::oid_for_decltype),
            )
        })
        .collect()
}

/// Prepares `sql` (from the cache) and binds `params` to `?1…`.
fn prepare_bound<'c>(
    conn: &'c Connection,
    sql: &str,
    params: &[Value],
) -> Result<rusqlite::CachedStatement<'c>, PgError> {
    let mut stmt = conn
        .prepare_cached(sql)
        .map_err(|e| sqlite::map_error(&e))?;
    let n = stmt.parameter_count();
    for (i, v) in params.iter().enumerate().take(n) {
        stmt.raw_bind_parameter(i + 1, v)
            .map_err(|e| sqlite::map_error(&e))?;
    }
    Ok(stmt)
}

/// Whether a statement has result columns without a declared type.
fn has_untyped(conn: &Connection, sql: &str) -> bool {
    conn.prepare_cached(sql)
        .map(|s| s.columns().iter().any(|c| c.decl_type().is_none()))
        .unwrap_or(true)
}

fn row_values(row: &rusqlite::Row<'_>) -> Vec<Value> {
    let n = row.as_ref().column_count();
    (0..n)
        .map(|i| row.get_ref(i).map(owned).unwrap_or(Value::Null))
        .collect()
}

/// An owned value (text that is not UTF-8 is repaired: PostgreSQL text must be UTF-8).
fn owned(v: ValueRef<'_>) -> Value {
    match v {
        ValueRef::Null => Value::Null,
        ValueRef::Integer(i) => Value::Integer(i),
        ValueRef::Real(f) => Value::Real(f),
        ValueRef::Text(t) => Value::Text(String::from_utf8_lossy(t).into_owned()),
        ValueRef::Blob(b) => Value::Blob(b.to_vec()),
    }
}

fn values_size(v: &[Value]) -> usize {
    v.iter()
        .map(|x| match x {
            Value::Text(t) => t.len(),
            Value::Blob(b) => b.len(),
            _ => 8,
        } + 24)
        .sum()
}

fn rows_tag(verb: &Verb, n: u64) -> String {
    verb.tag(n)
}

/// The format of column `i` from Bind's result formats (none: text; one: all).
fn format_of(formats: &[i16], i: usize) -> i16 {
    match formats {
        [] => 0,
        [f] => *f,
        many => many.get(i).copied().unwrap_or(0),
    }
}

fn field_descs(cols: &[Col], formats: &[i16]) -> Result<Vec<FieldDesc>, PgError> {
    if formats.len() > 1 && formats.len() != cols.len() {
        return Err(PgError::error(
            sqlstate::PROTOCOL_VIOLATION,
            format!(
                "bind message has {} result formats but query has {} columns",
                formats.len(),
                cols.len()
            ),
        ));
    }
    Ok(cols
        .iter()
        .enumerate()
        .map(|(i, c)| FieldDesc {
            name: c.name.clone(),
            type_oid: c.oid,
            format: format_of(formats, i),
        })
        .collect())
}

fn show_columns(name: &str) -> Vec<Col> {
    if name == "all" {
        vec![
            Col::new("name", oid::TEXT),
            Col::new("setting", oid::TEXT),
            Col::new("description", oid::TEXT),
        ]
    } else {
        vec![Col::new(name, oid::TEXT)]
    }
}

fn no_portal(name: &str) -> PgError {
    PgError::error(
        sqlstate::INVALID_CURSOR_NAME,
        format!("portal \"{name}\" does not exist"),
    )
}

fn no_cursor(name: &str) -> PgError {
    PgError::error(
        sqlstate::INVALID_CURSOR_NAME,
        format!("cursor \"{name}\" does not exist"),
    )
}

/// A SQLite identifier in double quotes.
pub(crate) fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}
