//! Answers to the catalog queries psql sends for `\d`, `\dt`, `\di`, `\dv`, `\d NAME`, `\l`,
//! `\dn`, `\du` (and the empty lists of `\df`, `\dT`, …), computed from SQLite's schema
//! (`sqlite_schema`, `pragma_table_xinfo`, `pragma_index_list`, `pragma_foreign_key_list`).
//!
//! The queries are recognised by their shape (psql 15's text, which newer psql also send to a
//! server that reports version 15); anything else naming `pg_catalog` or
//! `information_schema` is refused with 0A000.

use rusqlite::Connection;
use rusqlite::types::Value;

use crate::error::PgError;
use crate::results::{Col, ResultSet};
use crate::types::oid;

/// What the catalog needs from the session.
pub(crate) struct Context<'a> {
    pub conn: &'a Connection,
    pub login: &'a str,
    pub database: &'a str,
    pub databases: &'a dyn Fn() -> Result<Vec<String>, PgError>,
}

/// An object of sqlite_schema.
#[derive(Debug, Clone)]
struct Obj {
    oid: i64,
    kind: char,
    name: String,
    table: String,
    sql: Option<String>,
}

const OID_BASE: i64 = 16_384;

fn objects(conn: &Connection) -> Result<Vec<Obj>, PgError> {
    let map = |e: rusqlite::Error| crate::sqlite::map_error(&e);
    let mut s = conn
        .prepare("SELECT rowid, type, name, tbl_name, sql FROM main.sqlite_schema")
        .map_err(map)?;
    let rows = s
        .query_map([], |r| {
            let t: String = r.get(1)?;
            Ok(Obj {
                oid: OID_BASE + r.get::<_, i64>(0)?,
                kind: match t.as_str() {
                    "table" => 'r',
                    "view" => 'v',
                    "index" => 'i',
                    _ => 'T',
                },
                name: r.get(2)?,
                table: r.get(3)?,
                sql: r.get(4)?,
            })
        })
        .map_err(map)?;
    rows.collect::<Result<_, _>>().map_err(map)
}

fn lower(s: &str) -> String {
    s.to_ascii_lowercase()
}

/// Collapses whitespace so the recognisers do not depend on psql's line breaks.
fn normalise(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut space = false;
    for c in sql.chars() {
        if c.is_whitespace() {
            space = true;
        } else {
            if space && !out.is_empty() {
                out.push(' ');
            }
            space = false;
            out.push(c.to_ascii_lowercase());
        }
    }
    out
}

/// Answers a catalog query.
pub(crate) fn answer(ctx: &Context<'_>, sql: &str) -> Result<ResultSet, PgError> {
    let q = normalise(sql);
    let has = |s: &str| q.contains(s);
    if has("from pg_catalog.pg_class c") && has("as \"name\"") && has("c.relkind in (") {
        return list_relations(ctx, sql, &q);
    }
    if q.starts_with("select c.oid, n.nspname, c.relname from pg_catalog.pg_class c") {
        return find_relations(ctx, sql);
    }
    if has("c.relchecks, c.relkind, c.relhasindex") {
        return table_info(ctx, &q);
    }
    if has("from pg_catalog.pg_attribute a") && has("a.attname") {
        return if has("as indexdef") {
            index_columns(ctx, &q)
        } else {
            table_columns(ctx, &q)
        };
    }
    if has("from pg_catalog.pg_class c, pg_catalog.pg_class c2, pg_catalog.pg_index i") {
        return table_indexes(ctx, &q);
    }
    if has("select i.indisunique, i.indisprimary") {
        return index_info(ctx, &q);
    }
    if has("select true as sametable, conname") {
        return foreign_keys(ctx, &q);
    }
    if has("select conname, conrelid::pg_catalog.regclass as ontable") {
        return referenced_by(ctx, &q);
    }
    if has("from pg_catalog.pg_trigger t") && has("t.tgname") {
        return triggers(ctx, &q);
    }
    if has("pg_catalog.pg_get_viewdef(") {
        return view_definition(ctx, &q, sql);
    }
    if has("from pg_catalog.pg_policy pol") {
        return Ok(empty(&[
            "polname",
            "polpermissive",
            "array_to_string",
            "pg_get_expr",
            "pg_get_expr",
            "cmd",
        ]));
    }
    if has("from pg_catalog.pg_statistic_ext") {
        return Ok(empty(&[
            "oid",
            "stxrelid",
            "nsp",
            "stxname",
            "columns",
            "ndist_enabled",
            "deps_enabled",
            "mcv_enabled",
            "stxstattarget",
        ]));
    }
    if has("from pg_catalog.pg_publication p") {
        return Ok(empty(&["pubname", "?column?", "?column?"]));
    }
    if has("pg_catalog.pg_inherits i") {
        return Ok(if has("c.oid = i.inhparent") {
            empty(&["oid"])
        } else if has("count(*)") {
            ResultSet {
                cols: vec![Col::new("count", oid::INT8)],
                rows: vec![vec![Value::Integer(0)]],
            }
        } else {
            empty(&["oid", "relkind", "inhdetachpending", "pg_get_expr"])
        });
    }
    if has("from pg_catalog.pg_rewrite r") {
        return Ok(empty(&["rulename", "btrim"]));
    }
    if has("from pg_catalog.pg_roles r") && has("r.rolname") {
        return Ok(roles(ctx));
    }
    if has("from pg_catalog.pg_database d") {
        let mut names = (ctx.databases)()?;
        if names.is_empty() {
            names.push(ctx.database.to_owned());
        }
        names.sort();
        let rows = names
            .into_iter()
            .map(|n| ("public".to_owned(), n, String::new(), String::new(), 'd'))
            .collect::<Vec<_>>();
        return Ok(by_aliases(ctx, sql, &rows, |alias, row| match alias {
            "name" => Value::Text(row.1.clone()),
            "encoding" => Value::Text("UTF8".into()),
            "collate" | "ctype" => Value::Text("C".into()),
            "locale provider" => Value::Text("libc".into()),
            _ => Value::Null,
        }));
    }
    if has("from pg_catalog.pg_namespace n") && has("as \"name\"") {
        let rows = vec![(
            "public".to_owned(),
            "public".to_owned(),
            String::new(),
            String::new(),
            'n',
        )];
        return Ok(by_aliases(ctx, sql, &rows, |alias, _| match alias {
            "name" => Value::Text("public".into()),
            "owner" => Value::Text(ctx.login.to_owned()),
            _ => Value::Null,
        }));
    }
    if has("from pg_catalog.pg_class c") && has("(c.relname) like '") {
        return complete_relation(ctx, &q);
    }
    // Other psql listings (\df, \dT, \dx, \do, …): nothing of that kind exists here.
    if has("as \"name\"") && has("from pg_catalog.") {
        return Ok(by_aliases(ctx, sql, &[], |_, _| Value::Null));
    }
    Err(PgError::unsupported(
        "this catalog query is not supported: kagi's SQL service answers the catalog queries of psql's \\d commands",
    )
    .with_hint("queries use SQLite's dialect and schema: sqlite_schema, pragma_table_info(), pragma_index_list()"))
}

fn empty(names: &[&str]) -> ResultSet {
    ResultSet {
        cols: names.iter().map(|n| Col::new(n, oid::TEXT)).collect(),
        rows: Vec::new(),
    }
}

/// The quoted aliases of a listing query's select list (`… as "Name"`), in order.
fn aliases(sql: &str) -> Vec<String> {
    let lower_sql = sql.to_ascii_lowercase();
    let end = lower_sql
        .find("\nfrom ")
        .or_else(|| lower_sql.find(" from pg_catalog"))
        .unwrap_or(sql.len());
    let mut out = Vec::new();
    let mut rest = &sql[..end];
    while let Some(pos) = rest.to_ascii_lowercase().find(" as \"") {
        let after = &rest[pos + 5..];
        let Some(close) = after.find('"') else { break };
        out.push(after[..close].to_owned());
        rest = &after[close + 1..];
    }
    out
}

/// (schema, name, type word, table, kind) rows turned into the columns a listing asks for.
fn by_aliases(
    ctx: &Context<'_>,
    sql: &str,
    rows: &[(String, String, String, String, char)],
    extra: impl Fn(&str, &(String, String, String, String, char)) -> Value,
) -> ResultSet {
    let names = aliases(sql);
    let cols = names.iter().map(|n| Col::new(n, oid::TEXT)).collect();
    let rows = rows
        .iter()
        .map(|row| {
            names
                .iter()
                .map(|a| match lower(a).as_str() {
                    "schema" => Value::Text(row.0.clone()),
                    "name" if row.4 != 'd' && row.4 != 'n' => Value::Text(row.1.clone()),
                    "type" => Value::Text(row.2.clone()),
                    "owner" if row.4 != 'd' => Value::Text(ctx.login.to_owned()),
                    "table" => Value::Text(row.3.clone()),
                    "persistence" => Value::Text("permanent".into()),
                    "access method" => match row.4 {
                        'r' => Value::Text("heap".into()),
                        'i' => Value::Text("btree".into()),
                        _ => Value::Null,
                    },
                    "size" => size_of(ctx.conn, &row.1),
                    other => extra(other, row),
                })
                .collect()
        })
        .collect();
    ResultSet { cols, rows }
}

fn size_of(conn: &Connection, name: &str) -> Value {
    let bytes: Option<i64> = conn
        .query_row(
            "SELECT sum(pgsize) FROM dbstat WHERE name = ?1",
            [name],
            |r| r.get(0),
        )
        .ok()
        .flatten();
    match bytes {
        Some(b) => Value::Text(pretty_size(b)),
        None => Value::Null,
    }
}

/// pg_size_pretty.
fn pretty_size(b: i64) -> String {
    let units = ["bytes", "kB", "MB", "GB", "TB"];
    let mut v = b;
    let mut u = 0;
    while v.abs() >= 10 * 1024 && u < units.len() - 1 {
        v = (v + 512) / 1024;
        u += 1;
    }
    format!("{v} {}", units[u])
}

fn kind_word(k: char) -> &'static str {
    match k {
        'r' => "table",
        'v' => "view",
        'i' => "index",
        _ => "trigger",
    }
}

/// The regular expression after `field OPERATOR(pg_catalog.~) '` in a psql query.
fn pattern_for(sql: &str, field: &str) -> Option<String> {
    let needle = format!("{field} OPERATOR(pg_catalog.~) '");
    let start = sql.find(&needle)? + needle.len();
    let rest = &sql[start..];
    let mut out = String::new();
    let mut chars = rest.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\'' {
            if chars.peek() == Some(&'\'') {
                out.push('\'');
                chars.next();
                continue;
            }
            return Some(out);
        }
        out.push(c);
    }
    None
}

fn list_relations(ctx: &Context<'_>, sql: &str, q: &str) -> Result<ResultSet, PgError> {
    let kinds: Vec<char> = q
        .find("c.relkind in (")
        .map(|p| {
            let rest = &q[p + 14..];
            let end = rest.find(')').unwrap_or(rest.len());
            rest[..end]
                .split(',')
                .filter_map(|s| s.trim().trim_matches('\'').chars().next())
                .collect()
        })
        .unwrap_or_default();
    let name_re = pattern_for(sql, "c.relname").map(|p| Regex::parse(&p));
    let schema_re = pattern_for(sql, "n.nspname").map(|p| Regex::parse(&p));
    if schema_re.as_ref().is_some_and(|r| !r.matches("public")) {
        return Ok(by_aliases(ctx, sql, &[], |_, _| Value::Null));
    }
    let mut rows: Vec<_> = objects(ctx.conn)?
        .into_iter()
        .filter(|o| kinds.contains(&o.kind))
        .filter(|o| match &name_re {
            Some(re) => re.matches(&o.name),
            None => !o.name.starts_with("sqlite_") || o.kind == 'i',
        })
        .map(|o| {
            (
                "public".to_owned(),
                o.name.clone(),
                kind_word(o.kind).to_owned(),
                o.table.clone(),
                o.kind,
            )
        })
        .collect();
    rows.sort_by(|a, b| a.1.cmp(&b.1));
    Ok(by_aliases(ctx, sql, &rows, |_, _| Value::Null))
}

fn find_relations(ctx: &Context<'_>, sql: &str) -> Result<ResultSet, PgError> {
    let name_re = pattern_for(sql, "c.relname").map(|p| Regex::parse(&p));
    let schema_re = pattern_for(sql, "n.nspname").map(|p| Regex::parse(&p));
    let mut rows: Vec<Vec<Value>> = Vec::new();
    if schema_re.is_none_or(|r| r.matches("public")) {
        let mut objs: Vec<Obj> = objects(ctx.conn)?
            .into_iter()
            .filter(|o| o.kind != 'T')
            .filter(|o| name_re.as_ref().is_none_or(|re| re.matches(&o.name)))
            .collect();
        objs.sort_by(|a, b| a.name.cmp(&b.name));
        rows = objs
            .into_iter()
            .map(|o| {
                vec![
                    Value::Integer(o.oid),
                    Value::Text("public".into()),
                    Value::Text(o.name),
                ]
            })
            .collect();
    }
    Ok(ResultSet {
        cols: vec![
            Col::new("oid", oid::OID),
            Col::new("nspname", oid::NAME),
            Col::new("relname", oid::NAME),
        ],
        rows,
    })
}

/// The OID a query asks about: the first `'digits'` literal.
fn quoted_oid(q: &str) -> Option<i64> {
    let b = q.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\'' {
            let start = i + 1;
            let mut j = start;
            while j < b.len() && b[j].is_ascii_digit() {
                j += 1;
            }
            if j > start && b.get(j) == Some(&b'\'') {
                return q[start..j].parse().ok();
            }
        }
        i += 1;
    }
    None
}

fn object_by_oid(ctx: &Context<'_>, q: &str) -> Result<Option<Obj>, PgError> {
    let Some(oid) = quoted_oid(q) else {
        return Ok(None);
    };
    Ok(objects(ctx.conn)?.into_iter().find(|o| o.oid == oid))
}

fn b(v: bool) -> Value {
    Value::Integer(i64::from(v))
}

fn table_info(ctx: &Context<'_>, q: &str) -> Result<ResultSet, PgError> {
    let cols = vec![
        Col::new("relchecks", oid::INT2),
        Col::new("relkind", oid::CHAR),
        Col::new("relhasindex", oid::BOOL),
        Col::new("relhasrules", oid::BOOL),
        Col::new("relhastriggers", oid::BOOL),
        Col::new("relrowsecurity", oid::BOOL),
        Col::new("relforcerowsecurity", oid::BOOL),
        Col::new("relhasoids", oid::BOOL),
        Col::new("relispartition", oid::BOOL),
        Col::new("?column?", oid::TEXT),
        Col::new("reltablespace", oid::OID),
        Col::new("reloftype", oid::TEXT),
        Col::new("relpersistence", oid::CHAR),
        Col::new("relreplident", oid::CHAR),
        Col::new("amname", oid::NAME),
    ];
    let Some(o) = object_by_oid(ctx, q)? else {
        return Ok(ResultSet {
            cols,
            rows: Vec::new(),
        });
    };
    let all = objects(ctx.conn)?;
    let has_index = all
        .iter()
        .any(|x| x.kind == 'i' && x.table.eq_ignore_ascii_case(&o.name))
        || rowid_pk(ctx.conn, &o.name)?.is_some();
    // psql shows foreign keys (both ways) only for tables with triggers, which is how
    // PostgreSQL implements them.
    let mut has_triggers = all
        .iter()
        .any(|x| x.kind == 'T' && x.table.eq_ignore_ascii_case(&o.name));
    if o.kind == 'r' && !has_triggers {
        for t in all.iter().filter(|x| x.kind == 'r') {
            let fks = foreign_keys_of(ctx.conn, &t.name)?;
            if fks.iter().any(|f| {
                t.name.eq_ignore_ascii_case(&o.name) || f.references.eq_ignore_ascii_case(&o.name)
            }) {
                has_triggers = true;
                break;
            }
        }
    }
    let am = match o.kind {
        'r' => Value::Text("heap".into()),
        'i' => Value::Text("btree".into()),
        _ => Value::Null,
    };
    let row = vec![
        Value::Integer(0),
        Value::Text(o.kind.to_string()),
        b(has_index && o.kind == 'r'),
        b(false),
        b(has_triggers),
        b(false),
        b(false),
        b(false),
        b(false),
        Value::Text(String::new()),
        Value::Integer(0),
        Value::Text(String::new()),
        Value::Text("p".into()),
        Value::Text("d".into()),
        am,
    ];
    Ok(ResultSet {
        cols,
        rows: vec![row],
    })
}

/// A column of pragma_table_xinfo.
struct ColumnInfo {
    name: String,
    decl: String,
    notnull: bool,
    default: Option<String>,
    pk: i64,
}

fn columns_of(conn: &Connection, table: &str) -> Result<Vec<ColumnInfo>, PgError> {
    let map = |e: rusqlite::Error| crate::sqlite::map_error(&e);
    let mut s = conn
        .prepare(
            "SELECT name, type, \"notnull\", dflt_value, pk, hidden FROM pragma_table_xinfo(?1)",
        )
        .map_err(map)?;
    let rows = s
        .query_map([table], |r| {
            Ok((
                ColumnInfo {
                    name: r.get(0)?,
                    decl: r.get::<_, Option<String>>(1)?.unwrap_or_default(),
                    notnull: r.get::<_, i64>(2)? != 0,
                    default: r.get(3)?,
                    pk: r.get(4)?,
                },
                r.get::<_, i64>(5)?,
            ))
        })
        .map_err(map)?;
    let mut out = Vec::new();
    for r in rows {
        let (c, hidden) = r.map_err(map)?;
        // Hidden columns of virtual tables are not columns a user wrote.
        if hidden != 1 {
            out.push(c);
        }
    }
    Ok(out)
}

/// The INTEGER PRIMARY KEY column that aliases the rowid, if the table has one.
fn rowid_pk(conn: &Connection, table: &str) -> Result<Option<String>, PgError> {
    let cols = columns_of(conn, table)?;
    let pks: Vec<&ColumnInfo> = cols.iter().filter(|c| c.pk > 0).collect();
    Ok(match pks.as_slice() {
        [c] if c.decl.eq_ignore_ascii_case("integer") => Some(c.name.clone()),
        _ => None,
    })
}

fn display_type(decl: &str) -> String {
    decl.to_ascii_lowercase()
}

fn table_columns(ctx: &Context<'_>, q: &str) -> Result<ResultSet, PgError> {
    let mut cols = vec![
        Col::new("attname", oid::NAME),
        Col::new("format_type", oid::TEXT),
        Col::new("pg_get_expr", oid::TEXT),
        Col::new("attnotnull", oid::BOOL),
        Col::new("attcollation", oid::NAME),
        Col::new("attidentity", oid::CHAR),
        Col::new("attgenerated", oid::CHAR),
    ];
    let extras: Vec<&str> = [
        "a.attstorage",
        "attcompression",
        "attstattarget",
        "col_description",
    ]
    .into_iter()
    .filter(|e| q.contains(e))
    .collect();
    for e in &extras {
        cols.push(Col::new(e.trim_start_matches("a."), oid::TEXT));
    }
    let Some(o) = object_by_oid(ctx, q)? else {
        return Ok(ResultSet {
            cols,
            rows: Vec::new(),
        });
    };
    let rowid = rowid_pk(ctx.conn, &o.name)?;
    let rows = columns_of(ctx.conn, &o.name)?
        .into_iter()
        .map(|c| {
            let notnull = c.notnull || rowid.as_deref() == Some(c.name.as_str());
            let mut row = vec![
                Value::Text(c.name.clone()),
                Value::Text(display_type(&c.decl)),
                c.default.clone().map_or(Value::Null, Value::Text),
                b(notnull),
                Value::Null,
                Value::Text(String::new()),
                Value::Text(String::new()),
            ];
            for e in &extras {
                row.push(match *e {
                    "a.attstorage" => {
                        let t = crate::types::oid_for_decltype(&c.decl);
                        Value::Text(
                            if matches!(
                                t,
                                oid::TEXT | oid::BYTEA | oid::NUMERIC | oid::JSON | oid::JSONB
                            ) {
                                "x"
                            } else {
                                "p"
                            }
                            .into(),
                        )
                    }
                    "attcompression" => Value::Text(String::new()),
                    _ => Value::Null,
                });
            }
            row
        })
        .collect();
    Ok(ResultSet { cols, rows })
}

/// (key columns as written, unique, origin, partial WHERE) of an index.
struct IndexInfo {
    name: String,
    columns: Vec<String>,
    unique: bool,
    origin: String,
    predicate: Option<String>,
}

fn indexes_of(conn: &Connection, table: &str) -> Result<Vec<IndexInfo>, PgError> {
    let map = |e: rusqlite::Error| crate::sqlite::map_error(&e);
    let mut s = conn
        .prepare("SELECT name, \"unique\", origin FROM pragma_index_list(?1)")
        .map_err(map)?;
    let list: Vec<(String, bool, String)> = s
        .query_map([table], |r| {
            Ok((r.get(0)?, r.get::<_, i64>(1)? != 0, r.get(2)?))
        })
        .map_err(map)?
        .collect::<Result<_, _>>()
        .map_err(map)?;
    let mut out = Vec::new();
    for (name, unique, origin) in list {
        out.push(IndexInfo {
            columns: index_columns_of(conn, &name)?,
            predicate: index_predicate(conn, &name)?,
            name,
            unique,
            origin,
        });
    }
    Ok(out)
}

fn index_columns_of(conn: &Connection, index: &str) -> Result<Vec<String>, PgError> {
    let map = |e: rusqlite::Error| crate::sqlite::map_error(&e);
    let mut s = conn
        .prepare(
            "SELECT name, \"desc\", coll FROM pragma_index_xinfo(?1) WHERE key = 1 ORDER BY seqno",
        )
        .map_err(map)?;
    let rows = s
        .query_map([index], |r| {
            let name: Option<String> = r.get(0)?;
            let desc: i64 = r.get(1)?;
            let coll: Option<String> = r.get(2)?;
            let mut c = name.unwrap_or_else(|| "(expression)".into());
            if let Some(coll) = coll.filter(|c| !c.eq_ignore_ascii_case("BINARY")) {
                c.push_str(&format!(" COLLATE {coll}"));
            }
            if desc != 0 {
                c.push_str(" DESC");
            }
            Ok(c)
        })
        .map_err(map)?;
    rows.collect::<Result<_, _>>().map_err(map)
}

/// The WHERE clause of a partial index, from its CREATE INDEX text.
fn index_predicate(conn: &Connection, index: &str) -> Result<Option<String>, PgError> {
    let sql: Option<String> = conn
        .query_row(
            "SELECT sql FROM main.sqlite_schema WHERE type = 'index' AND name = ?1",
            [index],
            |r| r.get(0),
        )
        .ok()
        .flatten();
    Ok(sql.and_then(|s| {
        let toks = crate::sql::tokenize(&s);
        let mut depth = 0i32;
        for t in &toks {
            if t.is_punct(&s, "(") {
                depth += 1;
            } else if t.is_punct(&s, ")") {
                depth -= 1;
            } else if depth == 0 && t.is_word(&s, "WHERE") {
                return Some(s[t.end..].trim().to_owned());
            }
        }
        None
    }))
}

fn index_def(idx: &IndexInfo, table: &str, method: &str) -> String {
    let mut d = format!(
        "CREATE {}INDEX {} ON public.{} USING {method} ({})",
        if idx.unique { "UNIQUE " } else { "" },
        idx.name,
        table,
        idx.columns.join(", ")
    );
    if let Some(p) = &idx.predicate {
        d.push_str(&format!(" WHERE {p}"));
    }
    d
}

fn table_indexes(ctx: &Context<'_>, q: &str) -> Result<ResultSet, PgError> {
    let cols = vec![
        Col::new("relname", oid::NAME),
        Col::new("indisprimary", oid::BOOL),
        Col::new("indisunique", oid::BOOL),
        Col::new("indisclustered", oid::BOOL),
        Col::new("indisvalid", oid::BOOL),
        Col::new("pg_get_indexdef", oid::TEXT),
        Col::new("pg_get_constraintdef", oid::TEXT),
        Col::new("contype", oid::CHAR),
        Col::new("condeferrable", oid::BOOL),
        Col::new("condeferred", oid::BOOL),
        Col::new("indisreplident", oid::BOOL),
        Col::new("reltablespace", oid::OID),
    ];
    let Some(o) = object_by_oid(ctx, q)? else {
        return Ok(ResultSet {
            cols,
            rows: Vec::new(),
        });
    };
    let mut idx = indexes_of(ctx.conn, &o.name)?;
    let mut methods = vec!["btree"; idx.len()];
    // The rowid primary key has no index of its own: show it as what it is.
    if let Some(pk) = rowid_pk(ctx.conn, &o.name)? {
        idx.push(IndexInfo {
            name: format!("{}_pkey", o.name),
            columns: vec![pk],
            unique: true,
            origin: "pk".into(),
            predicate: None,
        });
        methods.push("rowid");
    }
    let mut rows: Vec<(bool, String, Vec<Value>)> = idx
        .iter()
        .zip(methods)
        .map(|(i, m)| {
            let primary = i.origin == "pk";
            let contype = match i.origin.as_str() {
                "pk" => Value::Text("p".into()),
                "u" => Value::Text("u".into()),
                _ => Value::Null,
            };
            let condef = match i.origin.as_str() {
                "pk" => Value::Text(format!("PRIMARY KEY ({})", i.columns.join(", "))),
                "u" => Value::Text(format!("UNIQUE ({})", i.columns.join(", "))),
                _ => Value::Null,
            };
            (
                primary,
                i.name.clone(),
                vec![
                    Value::Text(i.name.clone()),
                    b(primary),
                    b(i.unique),
                    b(false),
                    b(true),
                    Value::Text(index_def(i, &o.name, m)),
                    condef,
                    contype,
                    b(false),
                    b(false),
                    b(false),
                    Value::Integer(0),
                ],
            )
        })
        .collect();
    rows.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    Ok(ResultSet {
        cols,
        rows: rows.into_iter().map(|r| r.2).collect(),
    })
}

fn index_columns(ctx: &Context<'_>, q: &str) -> Result<ResultSet, PgError> {
    let cols = vec![
        Col::new("attname", oid::NAME),
        Col::new("format_type", oid::TEXT),
        Col::new("is_key", oid::TEXT),
        Col::new("indexdef", oid::TEXT),
    ];
    let Some(o) = object_by_oid(ctx, q)? else {
        return Ok(ResultSet {
            cols,
            rows: Vec::new(),
        });
    };
    let table_cols = columns_of(ctx.conn, &o.table)?;
    let rows = index_columns_of(ctx.conn, &o.name)?
        .into_iter()
        .map(|c| {
            let bare = c.split(' ').next().unwrap_or_default();
            let t = table_cols
                .iter()
                .find(|tc| tc.name.eq_ignore_ascii_case(bare))
                .map(|tc| display_type(&tc.decl))
                .unwrap_or_default();
            vec![
                Value::Text(bare.to_owned()),
                Value::Text(t),
                Value::Text("yes".into()),
                Value::Text(c),
            ]
        })
        .collect();
    Ok(ResultSet { cols, rows })
}

fn index_info(ctx: &Context<'_>, q: &str) -> Result<ResultSet, PgError> {
    let cols = vec![
        Col::new("indisunique", oid::BOOL),
        Col::new("indisprimary", oid::BOOL),
        Col::new("indisclustered", oid::BOOL),
        Col::new("indisvalid", oid::BOOL),
        Col::new("condeferrable", oid::BOOL),
        Col::new("condeferred", oid::BOOL),
        Col::new("indisreplident", oid::BOOL),
        Col::new("indnullsnotdistinct", oid::BOOL),
        Col::new("amname", oid::NAME),
        Col::new("relname", oid::NAME),
        Col::new("pg_get_expr", oid::TEXT),
    ];
    let Some(o) = object_by_oid(ctx, q)? else {
        return Ok(ResultSet {
            cols,
            rows: Vec::new(),
        });
    };
    let info = indexes_of(ctx.conn, &o.table)?
        .into_iter()
        .find(|i| i.name == o.name);
    let (unique, primary, pred) = info.map_or((false, false, None), |i| {
        (i.unique, i.origin == "pk", i.predicate)
    });
    let row = vec![
        b(unique),
        b(primary),
        b(false),
        b(true),
        b(false),
        b(false),
        b(false),
        b(false),
        Value::Text("btree".into()),
        Value::Text(o.table.clone()),
        pred.map_or(Value::Null, Value::Text),
    ];
    Ok(ResultSet {
        cols,
        rows: vec![row],
    })
}

/// A foreign key: (name, definition, referencing table, referenced table).
struct ForeignKey {
    name: String,
    def: String,
    table: String,
    references: String,
}

fn foreign_keys_of(conn: &Connection, table: &str) -> Result<Vec<ForeignKey>, PgError> {
    let map = |e: rusqlite::Error| crate::sqlite::map_error(&e);
    let mut s = conn
        .prepare("SELECT id, \"table\", \"from\", \"to\", on_update, on_delete FROM pragma_foreign_key_list(?1) ORDER BY id, seq")
        .map_err(map)?;
    type Row = (i64, String, String, Option<String>, String, String);
    let rows: Vec<Row> = s
        .query_map([table], |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
            ))
        })
        .map_err(map)?
        .collect::<Result<_, _>>()
        .map_err(map)?;
    let mut out: Vec<ForeignKey> = Vec::new();
    let mut i = 0;
    while i < rows.len() {
        let id = rows[i].0;
        let group: Vec<&Row> = rows[i..].iter().take_while(|r| r.0 == id).collect();
        i += group.len();
        let from: Vec<&str> = group.iter().map(|r| r.2.as_str()).collect();
        let to: Vec<&str> = group.iter().filter_map(|r| r.3.as_deref()).collect();
        let first = group[0];
        let mut def = format!("FOREIGN KEY ({}) REFERENCES {}", from.join(", "), first.1);
        if !to.is_empty() {
            def.push_str(&format!("({})", to.join(", ")));
        }
        if first.4 != "NO ACTION" {
            def.push_str(&format!(" ON UPDATE {}", first.4));
        }
        if first.5 != "NO ACTION" {
            def.push_str(&format!(" ON DELETE {}", first.5));
        }
        out.push(ForeignKey {
            name: format!("{table}_{}_fkey", from.join("_")),
            def,
            table: table.to_owned(),
            references: first.1.clone(),
        });
    }
    Ok(out)
}

fn foreign_keys(ctx: &Context<'_>, q: &str) -> Result<ResultSet, PgError> {
    let cols = vec![
        Col::new("sametable", oid::BOOL),
        Col::new("conname", oid::NAME),
        Col::new("condef", oid::TEXT),
        Col::new("ontable", oid::TEXT),
    ];
    let Some(o) = object_by_oid(ctx, q)? else {
        return Ok(ResultSet {
            cols,
            rows: Vec::new(),
        });
    };
    let mut fks = foreign_keys_of(ctx.conn, &o.name)?;
    fks.sort_by(|a, b| a.name.cmp(&b.name));
    let rows = fks
        .into_iter()
        .map(|f| {
            vec![
                b(true),
                Value::Text(f.name),
                Value::Text(f.def),
                Value::Text(f.table),
            ]
        })
        .collect();
    Ok(ResultSet { cols, rows })
}

fn referenced_by(ctx: &Context<'_>, q: &str) -> Result<ResultSet, PgError> {
    let cols = vec![
        Col::new("conname", oid::NAME),
        Col::new("ontable", oid::TEXT),
        Col::new("condef", oid::TEXT),
    ];
    let Some(o) = object_by_oid(ctx, q)? else {
        return Ok(ResultSet {
            cols,
            rows: Vec::new(),
        });
    };
    let mut all = Vec::new();
    for t in objects(ctx.conn)?.into_iter().filter(|x| x.kind == 'r') {
        all.extend(
            foreign_keys_of(ctx.conn, &t.name)?
                .into_iter()
                .filter(|f| f.references.eq_ignore_ascii_case(&o.name)),
        );
    }
    all.sort_by(|a, b| a.name.cmp(&b.name));
    let rows = all
        .into_iter()
        .map(|f| {
            vec![
                Value::Text(f.name),
                Value::Text(f.table),
                Value::Text(f.def),
            ]
        })
        .collect();
    Ok(ResultSet { cols, rows })
}

fn triggers(ctx: &Context<'_>, q: &str) -> Result<ResultSet, PgError> {
    let cols = vec![
        Col::new("tgname", oid::NAME),
        Col::new("pg_get_triggerdef", oid::TEXT),
        Col::new("tgenabled", oid::CHAR),
        Col::new("tgisinternal", oid::BOOL),
        Col::new("parent", oid::TEXT),
    ];
    let Some(o) = object_by_oid(ctx, q)? else {
        return Ok(ResultSet {
            cols,
            rows: Vec::new(),
        });
    };
    let mut trig: Vec<Obj> = objects(ctx.conn)?
        .into_iter()
        .filter(|x| x.kind == 'T' && x.table.eq_ignore_ascii_case(&o.name))
        .collect();
    trig.sort_by(|a, b| a.name.cmp(&b.name));
    let rows = trig
        .into_iter()
        .map(|t| {
            let def = t
                .sql
                .unwrap_or_default()
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ");
            vec![
                Value::Text(t.name),
                Value::Text(def),
                Value::Text("O".into()),
                b(false),
                Value::Null,
            ]
        })
        .collect();
    Ok(ResultSet { cols, rows })
}

fn view_definition(ctx: &Context<'_>, q: &str, sql: &str) -> Result<ResultSet, PgError> {
    let _ = sql;
    let cols = vec![Col::new("pg_get_viewdef", oid::TEXT)];
    let Some(o) = object_by_oid(ctx, q)? else {
        return Ok(ResultSet {
            cols,
            rows: vec![vec![Value::Null]],
        });
    };
    let text = o.sql.unwrap_or_default();
    let toks = crate::sql::tokenize(&text);
    let body = toks
        .iter()
        .find(|t| t.is_word(&text, "AS"))
        .map(|t| text[t.end..].trim().to_owned())
        .unwrap_or(text.clone());
    Ok(ResultSet {
        cols,
        rows: vec![vec![Value::Text(format!(" {body};"))]],
    })
}

fn roles(ctx: &Context<'_>) -> ResultSet {
    let cols = vec![
        Col::new("rolname", oid::NAME),
        Col::new("rolsuper", oid::BOOL),
        Col::new("rolinherit", oid::BOOL),
        Col::new("rolcreaterole", oid::BOOL),
        Col::new("rolcreatedb", oid::BOOL),
        Col::new("rolcanlogin", oid::BOOL),
        Col::new("rolconnlimit", oid::INT4),
        Col::new("rolvaliduntil", oid::TIMESTAMPTZ),
        Col::new("memberof", oid::TEXT),
        Col::new("rolreplication", oid::BOOL),
        Col::new("rolbypassrls", oid::BOOL),
    ];
    let row = vec![
        Value::Text(ctx.login.to_owned()),
        b(false),
        b(true),
        b(false),
        b(false),
        b(true),
        Value::Integer(-1),
        Value::Null,
        Value::Text("{}".into()),
        b(false),
        b(false),
    ];
    ResultSet {
        cols,
        rows: vec![row],
    }
}

/// psql's tab completion of relation names: `(c.relname) LIKE 'prefix%'`.
fn complete_relation(ctx: &Context<'_>, q: &str) -> Result<ResultSet, PgError> {
    let needle = "(c.relname) like '";
    let prefix = q
        .find(needle)
        .map(|p| &q[p + needle.len()..])
        .and_then(|rest| rest.find('\'').map(|e| &rest[..e]))
        .unwrap_or_default()
        .trim_end_matches('%')
        .replace('\\', "");
    let mut names: Vec<String> = objects(ctx.conn)?
        .into_iter()
        .filter(|o| {
            matches!(o.kind, 'r' | 'v')
                && !o.name.starts_with("sqlite_")
                && o.name.to_ascii_lowercase().starts_with(&prefix)
        })
        .map(|o| o.name)
        .collect();
    names.sort();
    Ok(ResultSet {
        cols: vec![Col::new("relname", oid::NAME), Col::new("text", oid::TEXT)],
        rows: names
            .into_iter()
            .map(|n| vec![Value::Text(n), Value::Null])
            .collect(),
    })
}

/// The regular expressions psql builds from `\d` patterns (`^(name.*)$`): literals, `.`,
/// `*`, `+`, `?`, groups with `|`, bracket classes, backslash escapes, anchors. Matching is
/// ASCII case-insensitive, as SQLite's names are.
#[derive(Debug, Clone)]
enum Node {
    Char(char),
    Any,
    Class(Vec<(char, char)>, bool),
    Group(Vec<Vec<(Node, Rep)>>),
    Start,
    End,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Rep {
    One,
    Star,
    Plus,
    Opt,
}

#[derive(Debug, Clone)]
struct Regex {
    alts: Vec<Vec<(Node, Rep)>>,
}

impl Regex {
    fn parse(p: &str) -> Self {
        let chars: Vec<char> = p.chars().collect();
        let mut i = 0;
        let alts = parse_alts(&chars, &mut i);
        Self { alts }
    }

    fn matches(&self, s: &str) -> bool {
        let chars: Vec<char> = s.chars().map(|c| c.to_ascii_lowercase()).collect();
        // Unanchored search, as PostgreSQL's ~ is; psql anchors its patterns itself.
        (0..=chars.len()).any(|start| {
            self.alts
                .iter()
                .any(|seq| match_seq(seq, &chars, start, &mut |_| true))
        })
    }
}

fn parse_alts(c: &[char], i: &mut usize) -> Vec<Vec<(Node, Rep)>> {
    let mut alts = vec![Vec::new()];
    while *i < c.len() {
        let ch = c[*i];
        *i += 1;
        let node = match ch {
            ')' => return alts,
            '|' => {
                alts.push(Vec::new());
                continue;
            }
            '(' => Node::Group(parse_alts(c, i)),
            '.' => Node::Any,
            '^' => Node::Start,
            '$' => Node::End,
            '\\' => {
                let e = c.get(*i).copied().unwrap_or('\\');
                *i += 1;
                Node::Char(e.to_ascii_lowercase())
            }
            '[' => {
                let neg = c.get(*i) == Some(&'^');
                if neg {
                    *i += 1;
                }
                let mut ranges = Vec::new();
                let mut first = true;
                while *i < c.len() && (c[*i] != ']' || first) {
                    let a = c[*i].to_ascii_lowercase();
                    if c.get(*i + 1) == Some(&'-') && c.get(*i + 2).is_some_and(|&x| x != ']') {
                        ranges.push((a, c[*i + 2].to_ascii_lowercase()));
                        *i += 3;
                    } else {
                        ranges.push((a, a));
                        *i += 1;
                    }
                    first = false;
                }
                *i += 1;
                Node::Class(ranges, neg)
            }
            other => Node::Char(other.to_ascii_lowercase()),
        };
        let rep = match c.get(*i) {
            Some('*') => Rep::Star,
            Some('+') => Rep::Plus,
            Some('?') => Rep::Opt,
            _ => Rep::One,
        };
        if rep != Rep::One {
            *i += 1;
        }
        if let Some(last) = alts.last_mut() {
            last.push((node, rep));
        }
    }
    alts
}

/// Matches `seq` at `pos`, then calls `k` with the end position (continuation style, so
/// groups and repetitions backtrack).
fn match_seq(
    seq: &[(Node, Rep)],
    s: &[char],
    pos: usize,
    k: &mut dyn FnMut(usize) -> bool,
) -> bool {
    let Some(((node, rep), rest)) = seq.split_first() else {
        return k(pos);
    };
    match rep {
        Rep::One => match_node(node, s, pos, &mut |p| match_seq(rest, s, p, k)),
        Rep::Opt => {
            match_node(node, s, pos, &mut |p| match_seq(rest, s, p, k))
                || match_seq(rest, s, pos, k)
        }
        Rep::Star | Rep::Plus => {
            // Greedy: collect every end reachable by repeating, try the longest first.
            let mut ends = vec![pos];
            let mut frontier = vec![pos];
            let mut steps = 0;
            while let Some(p) = frontier.pop() {
                steps += 1;
                if steps > 10_000 {
                    break;
                }
                let mut next = Vec::new();
                match_node(node, s, p, &mut |q| {
                    if q > p && !ends.contains(&q) {
                        next.push(q);
                    }
                    false
                });
                ends.extend(&next);
                frontier.extend(next);
            }
            ends.sort_unstable_by(|a, b| b.cmp(a));
            ends.into_iter()
                .filter(|&e| *rep == Rep::Star || e > pos)
                .any(|e| match_seq(rest, s, e, k))
        }
    }
}

fn match_node(node: &Node, s: &[char], pos: usize, k: &mut dyn FnMut(usize) -> bool) -> bool {
    match node {
        Node::Char(c) => s.get(pos) == Some(c) && k(pos + 1),
        Node::Any => pos < s.len() && k(pos + 1),
        Node::Class(ranges, neg) => {
            s.get(pos)
                .is_some_and(|c| ranges.iter().any(|(a, b)| a <= c && c <= b) != *neg)
                && k(pos + 1)
        }
        Node::Start => pos == 0 && k(pos),
        Node::End => pos == s.len() && k(pos),
        Node::Group(alts) => alts.iter().any(|seq| match_seq(seq, s, pos, k)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn psql_patterns() {
        assert!(Regex::parse("^(t)$").matches("T"));
        assert!(!Regex::parse("^(t)$").matches("tt"));
        assert!(Regex::parse("^(t.*)$").matches("things"));
        assert!(!Regex::parse("^(t.*)$").matches("xt"));
        assert!(Regex::parse("^(a|b)$").matches("b"));
        assert!(Regex::parse("^(my\\_t)$").matches("my_t"));
        assert!(Regex::parse("^([ab]x?)$").matches("a"));
        assert!(Regex::parse("^(.+_pkey)$").matches("t_pkey"));
    }

    #[test]
    fn aliases_of_listing() {
        let q = "SELECT n.nspname as \"Schema\",\n  c.relname as \"Name\",\n CASE END as \"Type\"\nFROM pg_catalog.pg_class c";
        assert_eq!(aliases(q), vec!["Schema", "Name", "Type"]);
        assert_eq!(quoted_oid("where c.oid = '16384';"), Some(16384));
        assert_eq!(pretty_size(8192), "8192 bytes");
        assert_eq!(pretty_size(10 * 1024 * 1024), "10 MB");
    }
}
