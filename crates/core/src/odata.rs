//! The small part of OData's `$filter` that ARM's resource list and Microsoft Graph's
//! directory lists are asked by the az CLI: `field eq 'v'`, `field ne 'v'`,
//! `startswith(field,'v')`, `substringof('v',field)`, `field/any(c:c eq 'v')`, joined by `and`
//! and `or` (`and` binds tighter), `not`, and parentheses.
//!
//! Field names and values compare without regard to ASCII case, as ARM and Graph compare
//! resource types, names, ids and display names. A filter outside this subset is refused with
//! [`FilterError`], never half-applied.

use std::fmt;

/// Why a `$filter` could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct FilterError(pub String);

/// A value a filter compares against: one string or a list of strings (a collection such as
/// Graph's `servicePrincipalNames`); absent fields are `None` and match nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FieldValue<'a> {
    /// A single string.
    One(&'a str),
    /// A collection of strings.
    Many(Vec<&'a str>),
}

/// A parsed `$filter`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Filter {
    /// `field eq 'value'` (or `ne` when `negated`).
    Eq {
        /// Field name, lower-cased.
        field: String,
        /// Value.
        value: String,
        /// `ne` instead of `eq`.
        negated: bool,
    },
    /// `startswith(field,'prefix')`.
    StartsWith {
        /// Field name, lower-cased.
        field: String,
        /// Prefix.
        prefix: String,
    },
    /// `substringof('part',field)` (ARM) or `contains(field,'part')`.
    Contains {
        /// Field name, lower-cased.
        field: String,
        /// Substring.
        part: String,
    },
    /// `field/any(x:x eq 'value')`.
    Any {
        /// Collection field name, lower-cased.
        field: String,
        /// Value one member must equal.
        value: String,
    },
    /// A function the caller allowed ([`Filter::parse_with_functions`]), such as ARM's
    /// `atScope()` or `assignedTo('id')`, with its string arguments.
    Call {
        /// Function name, lower-cased.
        name: String,
        /// String arguments.
        args: Vec<String>,
    },
    /// Both.
    And(Box<Filter>, Box<Filter>),
    /// Either.
    Or(Box<Filter>, Box<Filter>),
    /// Not.
    Not(Box<Filter>),
}

impl Filter {
    /// Parses a `$filter` expression.
    ///
    /// # Errors
    /// [`FilterError`] when it is empty, malformed or outside the supported subset.
    pub fn parse(text: &str) -> Result<Self, FilterError> {
        Self::parse_with_functions(text, &[])
    }

    /// Parses a `$filter` that may also call `functions` (lower-case names) with string
    /// arguments; [`Filter::matches_with`] decides them.
    ///
    /// # Errors
    /// As [`Filter::parse`].
    pub fn parse_with_functions(text: &str, functions: &[&str]) -> Result<Self, FilterError> {
        if text.len() > 4096 {
            return Err(FilterError("The $filter is too long.".into()));
        }
        let tokens = tokenize(text)?;
        let mut p = Parser {
            tokens,
            pos: 0,
            functions,
        };
        let f = p.or()?;
        if p.pos != p.tokens.len() {
            return Err(p.unexpected());
        }
        Ok(f)
    }

    /// Whether an object matches; `get` answers a field by its lower-cased name.
    pub fn matches<'a>(&self, get: &dyn Fn(&str) -> Option<FieldValue<'a>>) -> bool {
        self.matches_with(get, &|_, _| false)
    }

    /// As [`Filter::matches`], with `call` deciding the functions allowed at parse time.
    pub fn matches_with<'a>(
        &self,
        get: &dyn Fn(&str) -> Option<FieldValue<'a>>,
        call: &dyn Fn(&str, &[String]) -> bool,
    ) -> bool {
        let eq = |a: &str, b: &str| a.eq_ignore_ascii_case(b);
        let lower = |s: &str| s.to_ascii_lowercase();
        match self {
            Self::Eq {
                field,
                value,
                negated,
            } => {
                let hit = match get(field) {
                    Some(FieldValue::One(v)) => eq(v, value),
                    Some(FieldValue::Many(vs)) => vs.iter().any(|v| eq(v, value)),
                    None => false,
                };
                hit != *negated
            }
            Self::StartsWith { field, prefix } => match get(field) {
                Some(FieldValue::One(v)) => lower(v).starts_with(&lower(prefix)),
                _ => false,
            },
            Self::Contains { field, part } => match get(field) {
                Some(FieldValue::One(v)) => lower(v).contains(&lower(part)),
                _ => false,
            },
            Self::Any { field, value } => match get(field) {
                Some(FieldValue::Many(vs)) => vs.iter().any(|v| eq(v, value)),
                Some(FieldValue::One(v)) => eq(v, value),
                None => false,
            },
            Self::Call { name, args } => call(name, args),
            Self::And(a, b) => a.matches_with(get, call) && b.matches_with(get, call),
            Self::Or(a, b) => a.matches_with(get, call) || b.matches_with(get, call),
            Self::Not(a) => !a.matches_with(get, call),
        }
    }

    /// Every field the filter names (lower-cased), to refuse fields a list does not know.
    pub fn fields(&self) -> Vec<&str> {
        match self {
            Self::Eq { field, .. }
            | Self::StartsWith { field, .. }
            | Self::Contains { field, .. }
            | Self::Any { field, .. } => vec![field.as_str()],
            Self::Call { .. } => Vec::new(),
            Self::And(a, b) | Self::Or(a, b) => {
                let mut v = a.fields();
                v.extend(b.fields());
                v
            }
            Self::Not(a) => a.fields(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Ident(String),
    Str(String),
    Open,
    Close,
    Comma,
    Colon,
    Slash,
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Ident(s) => write!(f, "{s}"),
            Self::Str(s) => write!(f, "'{s}'"),
            Self::Open => write!(f, "("),
            Self::Close => write!(f, ")"),
            Self::Comma => write!(f, ","),
            Self::Colon => write!(f, ":"),
            Self::Slash => write!(f, "/"),
        }
    }
}

fn tokenize(text: &str) -> Result<Vec<Token>, FilterError> {
    let mut out = Vec::new();
    let mut chars = text.chars().peekable();
    while let Some(&c) = chars.peek() {
        match c {
            c if c.is_whitespace() => {
                chars.next();
            }
            '(' | ')' | ',' | ':' | '/' => {
                chars.next();
                out.push(match c {
                    '(' => Token::Open,
                    ')' => Token::Close,
                    ',' => Token::Comma,
                    ':' => Token::Colon,
                    _ => Token::Slash,
                });
            }
            '\'' => {
                chars.next();
                let mut s = String::new();
                loop {
                    match chars.next() {
                        // '' is a quote inside a string literal.
                        Some('\'') if chars.peek() == Some(&'\'') => {
                            chars.next();
                            s.push('\'');
                        }
                        Some('\'') => break,
                        Some(ch) => s.push(ch),
                        None => {
                            return Err(FilterError(
                                "The $filter has a string literal without its closing quote."
                                    .into(),
                            ));
                        }
                    }
                }
                out.push(Token::Str(s));
            }
            c if c.is_ascii_alphanumeric() || c == '_' || c == '.' || c == '-' || c == '@' => {
                let mut s = String::new();
                while let Some(&ch) = chars.peek() {
                    if ch.is_ascii_alphanumeric()
                        || ch == '_'
                        || ch == '.'
                        || ch == '-'
                        || ch == '@'
                    {
                        s.push(ch);
                        chars.next();
                    } else {
                        break;
                    }
                }
                out.push(Token::Ident(s));
            }
            other => {
                return Err(FilterError(format!(
                    "The $filter has an unexpected character '{}'.",
                    other.escape_default()
                )));
            }
        }
    }
    if out.is_empty() {
        return Err(FilterError("The $filter is empty.".into()));
    }
    Ok(out)
}

struct Parser<'f> {
    tokens: Vec<Token>,
    pos: usize,
    functions: &'f [&'f str],
}

impl Parser<'_> {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.pos)
    }

    fn next(&mut self) -> Option<Token> {
        let t = self.tokens.get(self.pos).cloned();
        self.pos += 1;
        t
    }

    fn unexpected(&self) -> FilterError {
        match self.tokens.get(self.pos) {
            Some(t) => FilterError(format!(
                "The $filter is not supported: unexpected '{t}'. kagi supports eq, ne, \
                 startswith, substringof, contains and any(), joined by and, or and not."
            )),
            None => FilterError("The $filter ends too early.".into()),
        }
    }

    fn keyword(&self, word: &str) -> bool {
        matches!(self.peek(), Some(Token::Ident(s)) if s.eq_ignore_ascii_case(word))
    }

    fn expect(&mut self, want: &Token) -> Result<(), FilterError> {
        if self.peek() == Some(want) {
            self.pos += 1;
            Ok(())
        } else {
            Err(self.unexpected())
        }
    }

    fn ident(&mut self) -> Result<String, FilterError> {
        match self.peek() {
            Some(Token::Ident(s)) => {
                let s = s.to_ascii_lowercase();
                self.pos += 1;
                Ok(s)
            }
            _ => Err(self.unexpected()),
        }
    }

    fn string(&mut self) -> Result<String, FilterError> {
        match self.peek() {
            Some(Token::Str(s)) => {
                let s = s.clone();
                self.pos += 1;
                Ok(s)
            }
            _ => Err(self.unexpected()),
        }
    }

    fn or(&mut self) -> Result<Filter, FilterError> {
        let mut left = self.and()?;
        while self.keyword("or") {
            self.pos += 1;
            let right = self.and()?;
            left = Filter::Or(Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn and(&mut self) -> Result<Filter, FilterError> {
        let mut left = self.unary()?;
        while self.keyword("and") {
            self.pos += 1;
            let right = self.unary()?;
            left = Filter::And(Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn unary(&mut self) -> Result<Filter, FilterError> {
        if self.keyword("not") {
            self.pos += 1;
            return Ok(Filter::Not(Box::new(self.unary()?)));
        }
        if self.peek() == Some(&Token::Open) {
            self.pos += 1;
            let f = self.or()?;
            self.expect(&Token::Close)?;
            return Ok(f);
        }
        self.clause()
    }

    fn clause(&mut self) -> Result<Filter, FilterError> {
        let name = self.ident()?;
        match self.peek() {
            Some(Token::Open) => {
                self.pos += 1;
                let f = match name.as_str() {
                    "startswith" => {
                        let field = self.ident()?;
                        self.expect(&Token::Comma)?;
                        let prefix = self.string()?;
                        Filter::StartsWith { field, prefix }
                    }
                    "contains" => {
                        let field = self.ident()?;
                        self.expect(&Token::Comma)?;
                        let part = self.string()?;
                        Filter::Contains { field, part }
                    }
                    "substringof" => {
                        let part = self.string()?;
                        self.expect(&Token::Comma)?;
                        let field = self.ident()?;
                        Filter::Contains { field, part }
                    }
                    _ if self.functions.contains(&name.as_str()) => {
                        let mut args = Vec::new();
                        while self.peek() != Some(&Token::Close) {
                            if !args.is_empty() {
                                self.expect(&Token::Comma)?;
                            }
                            args.push(self.string()?);
                        }
                        Filter::Call { name, args }
                    }
                    _ => {
                        self.pos -= 1;
                        return Err(FilterError(format!(
                            "The $filter function '{name}' is not supported."
                        )));
                    }
                };
                self.expect(&Token::Close)?;
                Ok(f)
            }
            Some(Token::Slash) => {
                self.pos += 1;
                if !self.keyword("any") {
                    return Err(self.unexpected());
                }
                self.pos += 1;
                self.expect(&Token::Open)?;
                let var = self.ident()?;
                self.expect(&Token::Colon)?;
                let var2 = self.ident()?;
                if var2 != var || !self.keyword("eq") {
                    return Err(self.unexpected());
                }
                self.pos += 1;
                let value = self.string()?;
                self.expect(&Token::Close)?;
                Ok(Filter::Any { field: name, value })
            }
            Some(Token::Ident(op))
                if op.eq_ignore_ascii_case("eq") || op.eq_ignore_ascii_case("ne") =>
            {
                let negated = op.eq_ignore_ascii_case("ne");
                self.next();
                let value = self.string()?;
                Ok(Filter::Eq {
                    field: name,
                    value,
                    negated,
                })
            }
            _ => Err(self.unexpected()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj<'a>(
        fields: &'a [(&'a str, FieldValue<'a>)],
    ) -> impl Fn(&str) -> Option<FieldValue<'a>> + 'a {
        move |name: &str| {
            fields
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.clone())
        }
    }

    #[test]
    fn the_filters_az_sends_parse_and_match() {
        let fields = [
            ("resourcetype", FieldValue::One("Microsoft.KeyVault/vaults")),
            ("name", FieldValue::One("MyVault")),
            (
                "serviceprincipalnames",
                FieldValue::Many(vec!["abc", "https://x"]),
            ),
        ];
        let get = obj(&fields);
        for (f, want) in [
            ("resourceType eq 'Microsoft.KeyVault/vaults'", true),
            (
                "resourceType eq 'microsoft.keyvault/vaults' and name eq 'myvault'",
                true,
            ),
            (
                "resourceType eq 'Microsoft.KeyVault/vaults' and name eq 'other'",
                false,
            ),
            ("name eq 'other' or name eq 'MYVAULT'", true),
            ("servicePrincipalNames/any(c:c eq 'ABC')", true),
            ("servicePrincipalNames/any(c:c eq 'nope')", false),
            ("startswith(name,'my')", true),
            ("substringof('vau',name)", true),
            ("not (name eq 'myvault')", false),
            ("name ne 'x'", true),
            ("missing eq 'x'", false),
            (
                "(name eq 'x' or name eq 'myvault') and resourceType eq 'Microsoft.KeyVault/vaults'",
                true,
            ),
            ("name eq 'it''s'", false),
        ] {
            let parsed = Filter::parse(f).unwrap_or_else(|e| panic!("{f}: {e}"));
            assert_eq!(parsed.matches(&get), want, "{f}");
        }
    }

    #[test]
    fn malformed_or_unsupported_filters_are_refused() {
        for f in [
            "",
            "   ",
            "name eq",
            "name eq 'x",
            "name gt 'x'",
            "endswith(name,'x')",
            "name eq 'x' and",
            "(name eq 'x'",
            "name eq 'x')",
            "tags/any(c:d eq 'x')",
            "name eq 'x' ; drop",
        ] {
            assert!(Filter::parse(f).is_err(), "{f:?} was accepted");
        }
    }

    #[test]
    fn allowed_functions_are_decided_by_the_caller() {
        let f = Filter::parse_with_functions(
            "atScope() and assignedTo('abc')",
            &["atscope", "assignedto"],
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let get = |_: &str| None;
        assert!(f.matches_with(&get, &|name, args| match name {
            "atscope" => args.is_empty(),
            "assignedto" => args == ["abc"],
            _ => false,
        }));
        assert!(!f.matches(&get));
        assert!(Filter::parse("atScope()").is_err());
        assert!(Filter::parse_with_functions("atScope(", &["atscope"]).is_err());
    }

    #[test]
    fn quotes_are_escaped_by_doubling() {
        let f = Filter::parse("name eq 'it''s'").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            f,
            Filter::Eq {
                field: "name".into(),
                value: "it's".into(),
                negated: false
            }
        );
        assert_eq!(f.fields(), vec!["name"]);
    }
}
