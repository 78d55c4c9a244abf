//! A small SQL lexer (PostgreSQL and SQLite tokens): splitting a Query into statements,
//! rewriting PostgreSQL spellings SQLite lacks (`$1` parameters, `x::type` casts,
//! `pg_catalog.`-qualified functions, `current_user`, `ILIKE`, `SERIAL`), and the first words
//! that classify a statement. It never fails: text it does not understand passes through to
//! SQLite, which reports the error.

/// Kinds of tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A keyword or unquoted identifier.
    Word,
    /// `"identifier"`, `[identifier]` or `` `identifier` ``.
    QuotedIdent,
    /// `'string'` (also `X'..'` and `E'..'`, whose prefix is part of the token).
    Str,
    /// A number.
    Number,
    /// `$1`, `?`, `?1`, `:name`, `@name`, `$name`.
    Param,
    /// Any other character or operator (`;`, `(`, `)`, `,`, `.`, `::`, `<=`, ...).
    Punct,
}

/// A token: its kind and byte range in the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tok {
    /// Kind.
    pub kind: Kind,
    /// Start offset.
    pub start: usize,
    /// End offset (exclusive).
    pub end: usize,
}

impl Tok {
    /// The token's text in `src`.
    pub fn text<'a>(&self, src: &'a str) -> &'a str {
        src.get(self.start..self.end).unwrap_or_default()
    }

    /// Whether this is the word `kw` (case-insensitive).
    pub fn is_word(&self, src: &str, kw: &str) -> bool {
        self.kind == Kind::Word && self.text(src).eq_ignore_ascii_case(kw)
    }

    /// Whether this is the punctuation `p`.
    pub fn is_punct(&self, src: &str, p: &str) -> bool {
        self.kind == Kind::Punct && self.text(src) == p
    }
}

fn is_ident_start(c: char) -> bool {
    c.is_alphabetic() || c == '_' || !c.is_ascii() && !c.is_whitespace()
}

fn is_ident_char(c: char) -> bool {
    is_ident_start(c) || c.is_ascii_digit() || c == '$'
}

/// Tokenises `src`, skipping whitespace and comments.
pub fn tokenize(src: &str) -> Vec<Tok> {
    let b = src.as_bytes();
    let mut toks = Vec::new();
    let mut i = 0;
    let n = b.len();
    // Byte offset of the next char boundary after i.
    let next_char = |i: usize| -> usize {
        let mut j = i + 1;
        while j < n && !src.is_char_boundary(j) {
            j += 1;
        }
        j
    };
    while i < n {
        let c = b[i];
        let start = i;
        let kind;
        if c.is_ascii_whitespace() {
            i += 1;
            continue;
        } else if c == b'-' && b.get(i + 1) == Some(&b'-') {
            while i < n && b[i] != b'\n' {
                i += 1;
            }
            continue;
        } else if c == b'/' && b.get(i + 1) == Some(&b'*') {
            i += 2;
            while i < n && !(b[i] == b'*' && b.get(i + 1) == Some(&b'/')) {
                i += 1;
            }
            i = (i + 2).min(n);
            continue;
        } else if c == b'\'' {
            i = skip_quoted(b, i, b'\'', false);
            kind = Kind::Str;
        } else if (c == b'E' || c == b'e' || c == b'X' || c == b'x') && b.get(i + 1) == Some(&b'\'')
        {
            i = skip_quoted(b, i + 1, b'\'', c == b'E' || c == b'e');
            kind = Kind::Str;
        } else if c == b'"' || c == b'`' {
            i = skip_quoted(b, i, c, false);
            kind = Kind::QuotedIdent;
        } else if c == b'[' {
            while i < n && b[i] != b']' {
                i += 1;
            }
            i = (i + 1).min(n);
            kind = Kind::QuotedIdent;
        } else if c.is_ascii_digit() || (c == b'.' && b.get(i + 1).is_some_and(u8::is_ascii_digit))
        {
            while i < n && (b[i].is_ascii_alphanumeric() || b[i] == b'.' || b[i] == b'_') {
                // An exponent sign belongs to the number.
                if (b[i] == b'e' || b[i] == b'E') && matches!(b.get(i + 1), Some(b'+' | b'-')) {
                    i += 1;
                }
                i += 1;
            }
            kind = Kind::Number;
        } else if c == b'?'
            || c == b'$'
            || c == b':'
                && b.get(i + 1)
                    .is_some_and(|&d| d.is_ascii_alphabetic() || d == b'_')
            || c == b'@'
        {
            if c == b':' && b.get(i + 1) == Some(&b':') {
                i += 2;
                kind = Kind::Punct;
            } else {
                i += 1;
                while i < n && (b[i].is_ascii_alphanumeric() || b[i] == b'_' || b[i] == b'$') {
                    i += 1;
                }
                kind = Kind::Param;
            }
        } else if let Some(ch) = src
            .get(i..)
            .and_then(|s| s.chars().next())
            .filter(|&ch| is_ident_start(ch))
        {
            i += ch.len_utf8();
            while let Some(ch) = src
                .get(i..)
                .and_then(|s| s.chars().next())
                .filter(|&ch| is_ident_char(ch))
            {
                i += ch.len_utf8();
            }
            kind = Kind::Word;
        } else {
            // Two-character operators PostgreSQL and SQLite share, and `::`.
            let two = src.get(i..i + 2).unwrap_or("");
            i = if ["::", "<=", ">=", "<>", "!=", "||", "==", "<<", ">>", "->"].contains(&two) {
                i + 2
            } else {
                next_char(i)
            };
            kind = Kind::Punct;
        }
        toks.push(Tok {
            kind,
            start,
            end: i.min(n),
        });
    }
    toks
}

/// The end of a quoted token starting at `i` (on its opening quote); `backslash` lets `\`
/// escape the next byte (E'' strings).
fn skip_quoted(b: &[u8], i: usize, q: u8, backslash: bool) -> usize {
    let n = b.len();
    let mut j = i + 1;
    while j < n {
        if backslash && b[j] == b'\\' {
            j += 2;
            continue;
        }
        if b[j] == q {
            if b.get(j + 1) == Some(&q) {
                j += 2;
                continue;
            }
            return j + 1;
        }
        j += 1;
    }
    n
}

/// Splits a Query string into its statements (without the `;`), dropping empty ones. A
/// `CREATE TRIGGER` body (`BEGIN … END`) keeps its inner semicolons.
pub fn split_statements(src: &str) -> Vec<&str> {
    let toks = tokenize(src);
    let mut out = Vec::new();
    let mut stmt_start: Option<usize> = None;
    let mut first_tok = 0usize;
    let mut depth = 0i32;
    let mut trigger = false;
    for (idx, t) in toks.iter().enumerate() {
        if stmt_start.is_none() {
            if t.is_punct(src, ";") {
                continue;
            }
            stmt_start = Some(t.start);
            first_tok = idx;
            depth = 0;
            trigger = is_create_trigger(src, &toks[idx..]);
        }
        if trigger && idx > first_tok {
            if t.is_word(src, "BEGIN") || t.is_word(src, "CASE") {
                depth += 1;
            } else if t.is_word(src, "END") {
                depth -= 1;
            }
        }
        if t.is_punct(src, ";")
            && (!trigger || depth <= 0 && saw_body(src, &toks[first_tok..idx]))
            && let Some(s) = stmt_start.take()
        {
            out.push(src[s..t.start].trim());
        }
    }
    if let Some(s) = stmt_start {
        let rest = src[s..].trim();
        if !rest.is_empty() {
            out.push(rest);
        }
    }
    out
}

fn is_create_trigger(src: &str, toks: &[Tok]) -> bool {
    let mut it = toks.iter();
    if !it.next().is_some_and(|t| t.is_word(src, "CREATE")) {
        return false;
    }
    for t in it.take(2) {
        if t.is_word(src, "TRIGGER") {
            return true;
        }
        if !(t.is_word(src, "TEMP") || t.is_word(src, "TEMPORARY")) {
            return false;
        }
    }
    false
}

fn saw_body(src: &str, toks: &[Tok]) -> bool {
    toks.iter().any(|t| t.is_word(src, "BEGIN"))
}

/// The first `n` words of a statement, upper-cased (quoted identifiers and other tokens
/// stop the list).
pub fn leading_words(src: &str, n: usize) -> Vec<String> {
    tokenize(src)
        .iter()
        .take(n)
        .take_while(|t| t.kind == Kind::Word)
        .map(|t| t.text(src).to_ascii_uppercase())
        .collect()
}

/// A statement rewritten for SQLite.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rewritten {
    /// The SQL to prepare.
    pub sql: String,
    /// The highest `$n` seen (PostgreSQL's parameter count).
    pub params: usize,
}

/// SQLite's type name for a PostgreSQL cast target; None for `boolean` (cast by function).
fn cast_target(words: &str) -> Option<&'static str> {
    let w = words.to_ascii_lowercase();
    let base = w
        .split('(')
        .next()
        .unwrap_or_default()
        .trim()
        .trim_end_matches("[]")
        .trim();
    let base = base.strip_prefix("pg_catalog.").unwrap_or(base);
    Some(match base {
        "bool" | "boolean" => return None,
        "int" | "integer" | "int2" | "int4" | "int8" | "bigint" | "smallint" | "oid" => "INTEGER",
        "real" | "float" | "float4" | "float8" | "double precision" => "REAL",
        "numeric" | "decimal" => "NUMERIC",
        "bytea" => "BLOB",
        _ => "TEXT",
    })
}

const TYPE_CONTINUATIONS: &[(&str, &[&str])] = &[
    ("double", &["precision"]),
    ("character", &["varying"]),
    ("timestamp", &["with", "without"]),
    ("time", &["with", "without"]),
    ("with", &["time"]),
    ("without", &["time"]),
];

/// Rewrites PostgreSQL spellings for SQLite (see the module documentation).
pub fn rewrite(src: &str) -> Rewritten {
    let toks = tokenize(src);
    let create_table = {
        let w = leading_words(src, 4);
        w.first().is_some_and(|x| x == "CREATE") && w.iter().skip(1).any(|x| x == "TABLE")
    };
    // Output pieces: (text before the token, replacement text).
    let mut pieces: Vec<(String, String)> = Vec::with_capacity(toks.len());
    let mut params = 0usize;
    let mut prev_end = 0usize;
    let mut i = 0usize;
    while i < toks.len() {
        let t = toks[i];
        let gap = src.get(prev_end..t.start).unwrap_or_default().to_owned();
        let text = t.text(src);
        let next = toks.get(i + 1);
        let prev = i.checked_sub(1).and_then(|p| toks.get(p));
        let mut repl = text.to_owned();
        match t.kind {
            Kind::Param
                if text.starts_with('$')
                    && text.len() > 1
                    && text[1..].bytes().all(|c| c.is_ascii_digit()) =>
            {
                if let Ok(n) = text[1..].parse::<usize>() {
                    params = params.max(n);
                }
                repl = format!("?{}", &text[1..]);
            }
            Kind::Word => {
                let lower = text.to_ascii_lowercase();
                let after_dot = prev.is_some_and(|p| p.is_punct(src, "."));
                let before_paren = next.is_some_and(|n| n.is_punct(src, "("));
                if lower == "pg_catalog"
                    && next.is_some_and(|n| n.is_punct(src, "."))
                    && toks.get(i + 3).is_some_and(|n| n.is_punct(src, "("))
                {
                    // pg_catalog.f( → f(
                    prev_end = toks.get(i + 1).map_or(t.end, |d| d.end);
                    pieces.push((gap, String::new()));
                    i += 2;
                    continue;
                }
                if !after_dot
                    && !before_paren
                    && matches!(
                        lower.as_str(),
                        "current_user"
                            | "session_user"
                            | "current_role"
                            | "current_catalog"
                            | "current_schema"
                    )
                {
                    repl = format!("{lower}()");
                } else if lower == "ilike" {
                    repl = "LIKE".into();
                } else if create_table
                    && matches!(
                        lower.as_str(),
                        "serial" | "bigserial" | "smallserial" | "serial4" | "serial8"
                    )
                {
                    repl = "INTEGER".into();
                }
            }
            Kind::Punct if text == "::" && !pieces.is_empty() => {
                // Collect the type name: words, dots, an optional (n[,m]) and [].
                let mut j = i + 1;
                let mut type_text = String::new();
                let mut last_word = String::new();
                while let Some(tk) = toks.get(j) {
                    let tt = tk.text(src);
                    let continues = type_text.is_empty()
                        || TYPE_CONTINUATIONS.iter().any(|(w, nexts)| {
                            last_word.eq_ignore_ascii_case(w)
                                && nexts.iter().any(|x| tt.eq_ignore_ascii_case(x))
                        })
                        || last_word.eq_ignore_ascii_case("time")
                            && tt.eq_ignore_ascii_case("zone")
                        || tk.is_punct(src, ".")
                        || type_text.ends_with('.');
                    if (tk.kind == Kind::Word
                        || tk.kind == Kind::QuotedIdent
                        || tk.is_punct(src, "."))
                        && continues
                    {
                        if !type_text.is_empty()
                            && !type_text.ends_with('.')
                            && !tk.is_punct(src, ".")
                        {
                            type_text.push(' ');
                        }
                        type_text.push_str(tt);
                        if tk.kind == Kind::Word {
                            last_word = tt.to_owned();
                        }
                        j += 1;
                    } else {
                        break;
                    }
                }
                if type_text.is_empty() {
                    pieces.push((gap, repl));
                    prev_end = t.end;
                    i += 1;
                    continue;
                }
                // (precision) and [] belong to the type.
                if toks.get(j).is_some_and(|tk| tk.is_punct(src, "(")) {
                    while let Some(tk) = toks.get(j) {
                        j += 1;
                        if tk.is_punct(src, ")") {
                            break;
                        }
                    }
                }
                while toks.get(j).is_some_and(|tk| tk.is_punct(src, "["))
                    && toks.get(j + 1).is_some_and(|tk| tk.is_punct(src, "]"))
                {
                    j += 2;
                }
                // The operand: the pieces back to the start of the previous primary.
                let from = operand_start(&pieces);
                // Keep the whitespace that preceded the operand.
                let gap0 = pieces.get(from).map(|p| p.0.clone()).unwrap_or_default();
                let operand: String = pieces
                    .drain(from..)
                    .enumerate()
                    .map(|(k, (g, s))| if k == 0 { s } else { g + &s })
                    .collect();
                let replacement = match cast_target(&type_text) {
                    Some(ty) => format!("CAST({operand} AS {ty})"),
                    None => format!("pg_bool({operand})"),
                };
                pieces.push((gap0, replacement));
                prev_end = toks.get(j - 1).map_or(t.end, |x| x.end);
                i = j;
                continue;
            }
            _ => {}
        }
        pieces.push((gap, repl));
        prev_end = t.end;
        i += 1;
    }
    let mut sql = String::with_capacity(src.len() + 16);
    for (g, s) in &pieces {
        sql.push_str(g);
        sql.push_str(s);
    }
    sql.push_str(src.get(prev_end..).unwrap_or_default());
    Rewritten { sql, params }
}

/// Where the operand of a `::` cast starts among the pieces emitted so far: a balanced
/// parenthesised group (with the function name before it), or a dotted name, or one token.
fn operand_start(pieces: &[(String, String)]) -> usize {
    let mut k = pieces.len();
    if k == 0 {
        return 0;
    }
    k -= 1;
    if pieces[k].1 == ")" {
        let mut depth = 0i32;
        loop {
            match pieces[k].1.as_str() {
                ")" => depth += 1,
                "(" => depth -= 1,
                _ => {}
            }
            if depth == 0 || k == 0 {
                break;
            }
            k -= 1;
        }
        // A function name right before the group.
        if k > 0
            && pieces[k].0.is_empty()
            && is_name(&pieces[k - 1].1)
            && !is_keyword(&pieces[k - 1].1)
        {
            k -= 1;
        }
    }
    // a.b.c
    while k >= 2 && pieces[k - 1].1 == "." && is_name(&pieces[k - 2].1) {
        k -= 2;
    }
    k
}

/// Words that can stand right before a parenthesis without being a function name.
fn is_keyword(s: &str) -> bool {
    const KW: &[&str] = &[
        "select",
        "where",
        "and",
        "or",
        "not",
        "in",
        "when",
        "then",
        "else",
        "on",
        "by",
        "values",
        "as",
        "from",
        "exists",
        "returning",
        "using",
        "set",
        "having",
        "is",
        "like",
    ];
    KW.iter().any(|k| s.eq_ignore_ascii_case(k))
}

fn is_name(s: &str) -> bool {
    s.chars()
        .next()
        .is_some_and(|c| is_ident_start(c) || c == '"')
}

/// Parses a PostgreSQL identifier token: unquoted words are lower-cased, `"quoted"` ones
/// keep their case.
pub fn identifier(src: &str, t: &Tok) -> Option<String> {
    let text = t.text(src);
    match t.kind {
        Kind::Word => Some(text.to_lowercase()),
        Kind::QuotedIdent if text.starts_with('"') => {
            let inner = text.strip_prefix('"')?.strip_suffix('"')?;
            Some(inner.replace("\"\"", "\""))
        }
        _ => None,
    }
}

/// The value of a `'string'` token (standard-conforming: only `''` is an escape).
pub fn string_value(src: &str, t: &Tok) -> Option<String> {
    if t.kind != Kind::Str {
        return None;
    }
    let text = t.text(src);
    let inner = text.strip_prefix('\'')?.strip_suffix('\'')?;
    Some(inner.replace("''", "'"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits() {
        assert_eq!(
            split_statements("select 1; select ';' ;; -- x;\n select 2"),
            vec!["select 1", "select ';'", "select 2"]
        );
        assert!(split_statements(" ; ;-- c").is_empty());
        let trig = "CREATE TRIGGER tr AFTER INSERT ON t BEGIN UPDATE t SET x = CASE WHEN 1 THEN 2 END; DELETE FROM u; END; SELECT 1";
        let s = split_statements(trig);
        assert_eq!(s.len(), 2, "{s:?}");
        assert!(s[0].ends_with("END"));
        assert_eq!(
            split_statements("select 'unterminated"),
            vec!["select 'unterminated"]
        );
    }

    #[test]
    fn rewrites() {
        assert_eq!(
            rewrite("select $1, $12 from t where a = $2").sql,
            "select ?1, ?12 from t where a = ?2"
        );
        assert_eq!(rewrite("select $1, '$2'").params, 1);
        assert_eq!(
            rewrite("select pg_catalog.version()").sql,
            "select version()"
        );
        assert_eq!(rewrite("select current_user").sql, "select current_user()");
        assert_eq!(
            rewrite("select $1::int, 'x'::text").sql,
            "select CAST(?1 AS INTEGER), CAST('x' AS TEXT)"
        );
        assert_eq!(
            rewrite("select (a+1)::double precision").sql,
            "select CAST((a+1) AS REAL)"
        );
        assert_eq!(
            rewrite("select t.x::varchar(3)").sql,
            "select CAST(t.x AS TEXT)"
        );
        assert_eq!(rewrite("select 't'::boolean").sql, "select pg_bool('t')");
        assert_eq!(
            rewrite("select lower(x)::text from t").sql,
            "select CAST(lower(x) AS TEXT) from t"
        );
        assert_eq!(
            rewrite("select now()::timestamp with time zone").sql,
            "select CAST(now() AS TEXT)"
        );
        assert_eq!(
            rewrite("create table t(id serial primary key)").sql,
            "create table t(id INTEGER primary key)"
        );
        assert_eq!(
            rewrite("select a from t where a ilike 'x%'").sql,
            "select a from t where a LIKE 'x%'"
        );
        assert_eq!(rewrite("select 1::").sql, "select 1::");
    }
}
