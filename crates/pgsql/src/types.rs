//! PostgreSQL types for SQLite values: the OID a column is described with (from its declared
//! type, else from its first value), text and binary encodings of results, and decoding of
//! parameters. The table is in docs/PGWIRE.md.

use rusqlite::types::{Value, ValueRef};

use kagi_core::time::{civil_from_days, days_from_civil};

use crate::error::{PgError, sqlstate};

/// Type OIDs used here.
pub mod oid {
    /// bool
    pub const BOOL: u32 = 16;
    /// bytea
    pub const BYTEA: u32 = 17;
    /// "char"
    pub const CHAR: u32 = 18;
    /// name
    pub const NAME: u32 = 19;
    /// int8
    pub const INT8: u32 = 20;
    /// int2
    pub const INT2: u32 = 21;
    /// int4
    pub const INT4: u32 = 23;
    /// text
    pub const TEXT: u32 = 25;
    /// oid
    pub const OID: u32 = 26;
    /// json
    pub const JSON: u32 = 114;
    /// float4
    pub const FLOAT4: u32 = 700;
    /// float8
    pub const FLOAT8: u32 = 701;
    /// unknown
    pub const UNKNOWN: u32 = 705;
    /// bpchar
    pub const BPCHAR: u32 = 1042;
    /// varchar
    pub const VARCHAR: u32 = 1043;
    /// date
    pub const DATE: u32 = 1082;
    /// time
    pub const TIME: u32 = 1083;
    /// timestamp
    pub const TIMESTAMP: u32 = 1114;
    /// timestamptz
    pub const TIMESTAMPTZ: u32 = 1184;
    /// numeric
    pub const NUMERIC: u32 = 1700;
    /// uuid
    pub const UUID: u32 = 2950;
    /// jsonb
    pub const JSONB: u32 = 3802;
}

/// The OID a column with this SQLite declared type is described with.
pub fn oid_for_decltype(decl: &str) -> u32 {
    let d = decl.trim().to_ascii_lowercase();
    // The name without "(precision, scale)" and array brackets.
    let base = d.split('(').next().unwrap_or_default().trim();
    match base {
        "bool" | "boolean" => oid::BOOL,
        "bytea" | "blob" | "binary" | "varbinary" => oid::BYTEA,
        "real" | "float" | "float4" | "float8" | "double" | "double precision" => oid::FLOAT8,
        "numeric" | "decimal" => oid::NUMERIC,
        "date" => oid::DATE,
        "time" | "time without time zone" => oid::TIME,
        "timestamp" | "datetime" | "timestamp without time zone" => oid::TIMESTAMP,
        "timestamptz" | "timestamp with time zone" => oid::TIMESTAMPTZ,
        "uuid" => oid::UUID,
        "json" => oid::JSON,
        "jsonb" => oid::JSONB,
        _ => {
            // SQLite's affinity rules (section 3.1 of its datatype page), in its order.
            if base.contains("int") || base.ends_with("serial") {
                oid::INT8
            } else if base.contains("char") || base.contains("clob") || base.contains("text") {
                oid::TEXT
            } else if base.contains("blob") {
                oid::BYTEA
            } else if base.contains("real") || base.contains("floa") || base.contains("doub") {
                oid::FLOAT8
            } else {
                oid::TEXT
            }
        }
    }
}

/// The OID of a column without a declared type, from a value of it.
pub fn oid_for_value(v: ValueRef<'_>) -> u32 {
    match v {
        ValueRef::Integer(_) => oid::INT8,
        ValueRef::Real(_) => oid::FLOAT8,
        ValueRef::Blob(_) => oid::BYTEA,
        ValueRef::Null | ValueRef::Text(_) => oid::TEXT,
    }
}

/// typlen of a type (RowDescription).
pub fn typlen(oid: u32) -> i16 {
    match oid {
        oid::BOOL | oid::CHAR => 1,
        oid::INT2 => 2,
        oid::INT4 | oid::OID | oid::FLOAT4 | oid::DATE => 4,
        oid::INT8 | oid::FLOAT8 | oid::TIME | oid::TIMESTAMP | oid::TIMESTAMPTZ => 8,
        oid::NAME => 64,
        oid::UUID => 16,
        _ => -1,
    }
}

/// The PostgreSQL name of a type OID (format_type, ParameterDescription docs).
pub fn type_name(oid: u32) -> &'static str {
    match oid {
        oid::BOOL => "boolean",
        oid::BYTEA => "bytea",
        oid::INT8 => "bigint",
        oid::INT2 => "smallint",
        oid::INT4 => "integer",
        oid::FLOAT4 => "real",
        oid::FLOAT8 => "double precision",
        oid::NUMERIC => "numeric",
        oid::DATE => "date",
        oid::TIME => "time without time zone",
        oid::TIMESTAMP => "timestamp without time zone",
        oid::TIMESTAMPTZ => "timestamp with time zone",
        oid::UUID => "uuid",
        oid::JSON => "json",
        oid::JSONB => "jsonb",
        oid::NAME => "name",
        oid::OID => "oid",
        oid::CHAR => "\"char\"",
        _ => "text",
    }
}

fn bad_value(type_oid: u32, what: &str) -> PgError {
    PgError::error(
        sqlstate::INVALID_TEXT_REPRESENTATION,
        format!(
            "invalid input syntax for type {}: \"{what}\"",
            type_name(type_oid)
        ),
    )
}

/// PostgreSQL's text for a float8.
pub fn float_text(f: f64) -> String {
    if f.is_nan() {
        "NaN".into()
    } else if f.is_infinite() {
        if f > 0.0 { "Infinity" } else { "-Infinity" }.into()
    } else {
        // Shortest round-trip digits; exponent form as PostgreSQL prints it (1e+300).
        let s = format!("{f:?}");
        match s.split_once('e') {
            Some((m, e)) if !e.starts_with('-') => format!("{m}e+{e}"),
            _ => s.strip_suffix(".0").map(str::to_owned).unwrap_or(s),
        }
    }
}

/// bytea in hex text format.
pub fn bytea_hex(b: &[u8]) -> String {
    let mut s = String::with_capacity(2 + 2 * b.len());
    s.push_str("\\x");
    s.push_str(&hex::encode(b));
    s
}

fn truthy(v: ValueRef<'_>) -> Option<bool> {
    match v {
        ValueRef::Integer(i) => Some(i != 0),
        ValueRef::Real(f) => Some(f != 0.0),
        ValueRef::Text(t) => parse_bool(std::str::from_utf8(t).ok()?),
        ValueRef::Blob(_) | ValueRef::Null => None,
    }
}

/// PostgreSQL's boolean input words.
pub fn parse_bool(s: &str) -> Option<bool> {
    match s.trim().to_ascii_lowercase().as_str() {
        "t" | "true" | "y" | "yes" | "on" | "1" => Some(true),
        "f" | "false" | "n" | "no" | "off" | "0" => Some(false),
        _ => None,
    }
}

fn text_of(v: ValueRef<'_>) -> String {
    match v {
        ValueRef::Null => String::new(),
        ValueRef::Integer(i) => i.to_string(),
        ValueRef::Real(f) => float_text(f),
        ValueRef::Text(t) => String::from_utf8_lossy(t).into_owned(),
        ValueRef::Blob(b) => bytea_hex(b),
    }
}

/// Appends the text format of `v` for a column of type `type_oid` (a non-NULL value).
pub fn encode_text(type_oid: u32, v: ValueRef<'_>, out: &mut Vec<u8>) {
    match (type_oid, v) {
        (_, ValueRef::Text(t))
            if !matches!(
                type_oid,
                oid::BOOL | oid::BYTEA | oid::TIMESTAMP | oid::TIMESTAMPTZ
            ) =>
        {
            out.extend_from_slice(t)
        }
        (oid::BOOL, v) => match truthy(v) {
            Some(b) => out.push(if b { b't' } else { b'f' }),
            None => out.extend_from_slice(text_of(v).as_bytes()),
        },
        (oid::BYTEA, ValueRef::Text(t)) => out.extend_from_slice(bytea_hex(t).as_bytes()),
        (oid::TIMESTAMP, ValueRef::Text(t)) => out
            .extend_from_slice(normalise_timestamp(&String::from_utf8_lossy(t), false).as_bytes()),
        (oid::TIMESTAMPTZ, ValueRef::Text(t)) => {
            out.extend_from_slice(normalise_timestamp(&String::from_utf8_lossy(t), true).as_bytes())
        }
        (_, v) => out.extend_from_slice(text_of(v).as_bytes()),
    }
}

/// ISO 8601 timestamps as PostgreSQL prints them: a space between date and time, and for
/// timestamptz an offset (`+00` when the stored text has none; TimeZone is UTC).
fn normalise_timestamp(s: &str, tz: bool) -> String {
    let mut t = s.trim().to_owned();
    if t.len() > 10 && t.as_bytes().get(10) == Some(&b'T') {
        t.replace_range(10..11, " ");
    }
    if tz {
        if let Some(stripped) = t.strip_suffix('Z') {
            t = format!("{stripped}+00");
        } else if parse_timestamp(&t).is_some_and(|(_, off)| off.is_none()) {
            t.push_str("+00");
        }
    }
    t
}

/// Appends the binary format of `v` for a column of type `type_oid`.
pub fn encode_binary(type_oid: u32, v: ValueRef<'_>, out: &mut Vec<u8>) -> Result<(), PgError> {
    match type_oid {
        oid::INT8 | oid::INT4 | oid::INT2 | oid::OID => {
            let i = as_i64(v).ok_or_else(|| bad_value(type_oid, &text_of(v)))?;
            match type_oid {
                oid::INT8 => out.extend_from_slice(&i.to_be_bytes()),
                oid::INT2 => out.extend_from_slice(
                    &i16::try_from(i)
                        .map_err(|_| out_of_range("smallint"))?
                        .to_be_bytes(),
                ),
                oid::OID => out.extend_from_slice(
                    &u32::try_from(i)
                        .map_err(|_| out_of_range("oid"))?
                        .to_be_bytes(),
                ),
                _ => out.extend_from_slice(
                    &i32::try_from(i)
                        .map_err(|_| out_of_range("integer"))?
                        .to_be_bytes(),
                ),
            }
        }
        oid::FLOAT8 | oid::FLOAT4 => {
            let f = as_f64(v).ok_or_else(|| bad_value(type_oid, &text_of(v)))?;
            if type_oid == oid::FLOAT8 {
                out.extend_from_slice(&f.to_be_bytes());
            } else {
                out.extend_from_slice(&(f as f32).to_be_bytes());
            }
        }
        oid::BOOL => {
            let b = truthy(v).ok_or_else(|| bad_value(type_oid, &text_of(v)))?;
            out.push(u8::from(b));
        }
        oid::BYTEA => match v {
            ValueRef::Blob(b) | ValueRef::Text(b) => out.extend_from_slice(b),
            other => out.extend_from_slice(text_of(other).as_bytes()),
        },
        oid::NUMERIC => {
            let s = match v {
                ValueRef::Real(f) if f.is_finite() => format!("{f}"),
                other => text_of(other),
            };
            numeric_to_binary(&s, out).ok_or_else(|| bad_value(type_oid, &s))?;
        }
        oid::DATE => {
            let s = text_of(v);
            let days = parse_date(s.trim()).ok_or_else(|| bad_value(type_oid, &s))?;
            let d = i32::try_from(days - PG_EPOCH_DAYS).map_err(|_| out_of_range("date"))?;
            out.extend_from_slice(&d.to_be_bytes());
        }
        oid::TIMESTAMP | oid::TIMESTAMPTZ => {
            let s = text_of(v);
            let (micros, offset) =
                parse_timestamp(s.trim()).ok_or_else(|| bad_value(type_oid, &s))?;
            let utc = micros - i64::from(offset.unwrap_or(0)) * 1_000_000;
            out.extend_from_slice(&utc.to_be_bytes());
        }
        oid::TIME => {
            let s = text_of(v);
            let micros = parse_time(s.trim()).ok_or_else(|| bad_value(type_oid, &s))?;
            out.extend_from_slice(&micros.to_be_bytes());
        }
        oid::UUID => {
            let s = text_of(v);
            let hex_digits: String = s.chars().filter(|c| *c != '-').collect();
            let b = hex::decode(&hex_digits)
                .ok()
                .filter(|b| b.len() == 16)
                .ok_or_else(|| bad_value(type_oid, &s))?;
            out.extend_from_slice(&b);
        }
        oid::JSONB => {
            out.push(1);
            out.extend_from_slice(text_of(v).as_bytes());
        }
        _ => match v {
            ValueRef::Text(t) => out.extend_from_slice(t),
            other => out.extend_from_slice(text_of(other).as_bytes()),
        },
    }
    Ok(())
}

fn out_of_range(t: &str) -> PgError {
    PgError::error(
        sqlstate::NUMERIC_VALUE_OUT_OF_RANGE,
        format!("value out of range for type {t}"),
    )
}

fn as_i64(v: ValueRef<'_>) -> Option<i64> {
    match v {
        ValueRef::Integer(i) => Some(i),
        ValueRef::Real(f) if f.fract() == 0.0 && f.abs() < 9.2e18 => Some(f as i64),
        ValueRef::Text(t) => std::str::from_utf8(t).ok()?.trim().parse().ok(),
        _ => None,
    }
}

fn as_f64(v: ValueRef<'_>) -> Option<f64> {
    match v {
        ValueRef::Integer(i) => Some(i as f64),
        ValueRef::Real(f) => Some(f),
        ValueRef::Text(t) => parse_float(std::str::from_utf8(t).ok()?),
        _ => None,
    }
}

/// A float as PostgreSQL reads one (NaN, Infinity spelled its way too).
pub fn parse_float(s: &str) -> Option<f64> {
    let t = s.trim();
    match t.to_ascii_lowercase().as_str() {
        "nan" => Some(f64::NAN),
        "infinity" | "+infinity" | "inf" | "+inf" => Some(f64::INFINITY),
        "-infinity" | "-inf" => Some(f64::NEG_INFINITY),
        _ => t.parse().ok(),
    }
}

/// Decodes one Bind parameter of type `type_oid` (0 = unspecified) in `format`.
pub fn decode_param(type_oid: u32, format: i16, data: &[u8]) -> Result<Value, PgError> {
    if format == 1 {
        return decode_binary(type_oid, data);
    }
    let s = std::str::from_utf8(data).map_err(|_| {
        PgError::error(
            sqlstate::CHARACTER_NOT_IN_REPERTOIRE,
            "invalid byte sequence for encoding \"UTF8\"",
        )
    })?;
    Ok(match type_oid {
        oid::INT2 | oid::INT4 | oid::INT8 | oid::OID => {
            Value::Integer(s.trim().parse().map_err(|_| bad_value(type_oid, s))?)
        }
        oid::FLOAT4 | oid::FLOAT8 => {
            Value::Real(parse_float(s).ok_or_else(|| bad_value(type_oid, s))?)
        }
        oid::NUMERIC => numeric_value(s).ok_or_else(|| bad_value(type_oid, s))?,
        oid::BOOL => Value::Integer(i64::from(
            parse_bool(s).ok_or_else(|| bad_value(type_oid, s))?,
        )),
        oid::BYTEA => Value::Blob(parse_bytea_text(s).ok_or_else(|| bad_value(type_oid, s))?),
        _ => Value::Text(s.to_owned()),
    })
}

/// A numeric's text as SQLite stores numbers: an integer when it is one, else a real.
fn numeric_value(s: &str) -> Option<Value> {
    let t = s.trim();
    if let Ok(i) = t.parse::<i64>() {
        return Some(Value::Integer(i));
    }
    parse_float(t).map(Value::Real)
}

/// bytea text input: hex (`\x…`) or escape format.
pub fn parse_bytea_text(s: &str) -> Option<Vec<u8>> {
    if let Some(h) = s.strip_prefix("\\x") {
        let h: String = h.chars().filter(|c| !c.is_ascii_whitespace()).collect();
        return hex::decode(h).ok();
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' {
            if b.get(i + 1) == Some(&b'\\') {
                out.push(b'\\');
                i += 2;
            } else {
                let oct = b.get(i + 1..i + 4)?;
                if !oct.iter().all(|c| (b'0'..=b'7').contains(c)) {
                    return None;
                }
                let v = u32::from(oct[0] - b'0') * 64
                    + u32::from(oct[1] - b'0') * 8
                    + u32::from(oct[2] - b'0');
                out.push(u8::try_from(v).ok()?);
                i += 4;
            }
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Some(out)
}

fn decode_binary(type_oid: u32, d: &[u8]) -> Result<Value, PgError> {
    let bad = || {
        PgError::error(
            sqlstate::INVALID_BINARY_REPRESENTATION,
            format!(
                "incorrect binary data format in bind parameter of type {}",
                type_name(type_oid)
            ),
        )
    };
    let utf8 = |b: &[u8]| -> Result<String, PgError> {
        String::from_utf8(b.to_vec()).map_err(|_| {
            PgError::error(
                sqlstate::CHARACTER_NOT_IN_REPERTOIRE,
                "invalid byte sequence for encoding \"UTF8\"",
            )
        })
    };
    Ok(match type_oid {
        oid::INT2 => Value::Integer(i64::from(i16::from_be_bytes(
            d.try_into().map_err(|_| bad())?,
        ))),
        oid::INT4 => Value::Integer(i64::from(i32::from_be_bytes(
            d.try_into().map_err(|_| bad())?,
        ))),
        oid::OID => Value::Integer(i64::from(u32::from_be_bytes(
            d.try_into().map_err(|_| bad())?,
        ))),
        oid::INT8 => Value::Integer(i64::from_be_bytes(d.try_into().map_err(|_| bad())?)),
        oid::FLOAT4 => Value::Real(f64::from(f32::from_be_bytes(
            d.try_into().map_err(|_| bad())?,
        ))),
        oid::FLOAT8 => Value::Real(f64::from_be_bytes(d.try_into().map_err(|_| bad())?)),
        oid::BOOL => match d {
            [b] => Value::Integer(i64::from(*b != 0)),
            _ => return Err(bad()),
        },
        oid::BYTEA => Value::Blob(d.to_vec()),
        oid::NUMERIC => {
            let s = numeric_from_binary(d).ok_or_else(bad)?;
            numeric_value(&s).unwrap_or(Value::Text(s))
        }
        oid::DATE => {
            let days = i32::from_be_bytes(d.try_into().map_err(|_| bad())?);
            Value::Text(format_date(i64::from(days) + PG_EPOCH_DAYS))
        }
        oid::TIMESTAMP | oid::TIMESTAMPTZ => {
            let micros = i64::from_be_bytes(d.try_into().map_err(|_| bad())?);
            let mut s = format_timestamp(micros);
            if type_oid == oid::TIMESTAMPTZ {
                s.push_str("+00");
            }
            Value::Text(s)
        }
        oid::TIME => {
            let micros = i64::from_be_bytes(d.try_into().map_err(|_| bad())?);
            Value::Text(format_time(micros))
        }
        oid::UUID => {
            if d.len() != 16 {
                return Err(bad());
            }
            Value::Text(format_uuid(d))
        }
        oid::JSONB => match d.split_first() {
            Some((1, rest)) => Value::Text(utf8(rest)?),
            _ => return Err(bad()),
        },
        oid::TEXT | oid::VARCHAR | oid::BPCHAR | oid::NAME | oid::UNKNOWN | oid::JSON | 0 => {
            Value::Text(utf8(d)?)
        }
        other => {
            return Err(PgError::unsupported(format!(
                "binary format of parameters of type {other} is not supported; send it in text format"
            )));
        }
    })
}

/// 16 bytes as a hyphenated UUID.
pub fn format_uuid(b: &[u8]) -> String {
    let h = hex::encode(b);
    let part = |r: std::ops::Range<usize>| h.get(r).unwrap_or_default().to_owned();
    format!(
        "{}-{}-{}-{}-{}",
        part(0..8),
        part(8..12),
        part(12..16),
        part(16..20),
        part(20..32)
    )
}

/// Days from 1970-01-01 to 2000-01-01 (PostgreSQL's epoch).
const PG_EPOCH_DAYS: i64 = 10_957;

fn format_date(days: i64) -> String {
    let (y, m, d) = civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02}")
}

fn format_time(micros: i64) -> String {
    let secs = micros.div_euclid(1_000_000);
    let frac = micros.rem_euclid(1_000_000);
    let (h, mi, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    if frac == 0 {
        format!("{h:02}:{mi:02}:{s:02}")
    } else {
        let f = format!("{frac:06}");
        format!("{h:02}:{mi:02}:{s:02}.{}", f.trim_end_matches('0'))
    }
}

/// The current time as timestamptz text (`now()`).
pub fn now_text() -> String {
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let micros =
        i64::try_from(since.as_micros()).unwrap_or(i64::MAX) - PG_EPOCH_DAYS * 86_400_000_000;
    format!("{}+00", format_timestamp(micros))
}

/// Microseconds since 2000-01-01 00:00:00 as `YYYY-MM-DD HH:MM:SS[.ffffff]`.
fn format_timestamp(micros: i64) -> String {
    let day_micros = 86_400_000_000i64;
    let days = micros.div_euclid(day_micros) + PG_EPOCH_DAYS;
    format!(
        "{} {}",
        format_date(days),
        format_time(micros.rem_euclid(day_micros))
    )
}

fn num(s: &str) -> Option<i64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// `YYYY-MM-DD` → days since 1970-01-01.
fn parse_date(s: &str) -> Option<i64> {
    let mut it = s.splitn(3, '-');
    let (y, m, d) = (num(it.next()?)?, num(it.next()?)?, num(it.next()?)?);
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return None;
    }
    Some(days_from_civil(y, m, d))
}

/// `HH:MM[:SS[.frac]]` → microseconds.
fn parse_time(s: &str) -> Option<i64> {
    let mut it = s.splitn(3, ':');
    let h = num(it.next()?)?;
    let mi = num(it.next()?)?;
    let (sec, frac) = match it.next() {
        Some(rest) => match rest.split_once('.') {
            Some((a, b)) => (num(a)?, b),
            None => (num(rest)?, ""),
        },
        None => (0, ""),
    };
    if h > 24 || mi > 59 || sec > 60 {
        return None;
    }
    let mut f = 0i64;
    let mut scale = 100_000i64;
    for c in frac.bytes().take(6) {
        if !c.is_ascii_digit() {
            return None;
        }
        f += i64::from(c - b'0') * scale;
        scale /= 10;
    }
    Some(((h * 60 + mi) * 60 + sec) * 1_000_000 + f)
}

/// `YYYY-MM-DD[ T]HH:MM:SS[.frac][Z|±HH[:MM]]` → (microseconds since 2000-01-01 in the
/// stated zone, offset in seconds if stated).
fn parse_timestamp(s: &str) -> Option<(i64, Option<i32>)> {
    let date = s.get(..10)?;
    let days = parse_date(date)? - PG_EPOCH_DAYS;
    let rest = s.get(10..)?;
    let rest = rest.strip_prefix([' ', 'T']).unwrap_or(rest);
    if rest.is_empty() {
        return Some((days * 86_400_000_000, None));
    }
    let (time, offset) = if let Some(t) = rest.strip_suffix('Z') {
        (t, Some(0))
    } else if let Some(pos) = rest.rfind(['+', '-']) {
        let (t, o) = rest.split_at(pos);
        let sign = if o.starts_with('-') { -1 } else { 1 };
        let o = &o[1..];
        let (oh, om) = match o.split_once(':') {
            Some((a, b)) => (num(a)?, num(b)?),
            None if o.len() == 4 => (num(&o[..2])?, num(&o[2..])?),
            None => (num(o)?, 0),
        };
        (t, Some(sign * i32::try_from(oh * 3600 + om * 60).ok()?))
    } else {
        (rest, None)
    };
    let micros = parse_time(time.trim())?;
    Some((days * 86_400_000_000 + micros, offset))
}

/// numeric binary format from decimal text (`-12.345`, `1e5` not accepted: SQLite prints
/// plain decimals).
fn numeric_to_binary(s: &str, out: &mut Vec<u8>) -> Option<()> {
    let t = s.trim();
    if t.eq_ignore_ascii_case("nan") {
        out.extend_from_slice(&[0, 0, 0, 0, 0xC0, 0, 0, 0]);
        return Some(());
    }
    let (neg, t) = match t.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, t.strip_prefix('+').unwrap_or(t)),
    };
    let (int, frac) = t.split_once('.').unwrap_or((t, ""));
    if int.is_empty() && frac.is_empty()
        || !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let int = int.trim_start_matches('0');
    let dscale = frac.len();
    // Pad the integer part on the left and the fraction on the right to groups of 4.
    let int_pad = (4 - int.len() % 4) % 4;
    let frac_pad = (4 - frac.len() % 4) % 4;
    let digits: String = "0".repeat(int_pad) + int + frac + &"0".repeat(frac_pad);
    let groups: Vec<i16> = digits
        .as_bytes()
        .chunks(4)
        .map(|c| c.iter().fold(0i16, |a, d| a * 10 + i16::from(d - b'0')))
        .collect();
    let int_groups = (int_pad + int.len()) / 4;
    let mut weight = int_groups as i32 - 1;
    // Strip leading and trailing zero groups.
    let mut start = 0;
    while start < groups.len() && groups[start] == 0 {
        start += 1;
        weight -= 1;
    }
    let mut end = groups.len();
    while end > start && groups[end - 1] == 0 {
        end -= 1;
    }
    let used = &groups[start..end];
    if used.is_empty() {
        weight = 0;
    }
    out.extend_from_slice(&i16::try_from(used.len()).ok()?.to_be_bytes());
    out.extend_from_slice(&i16::try_from(weight).ok()?.to_be_bytes());
    out.extend_from_slice(
        &(if neg && !used.is_empty() {
            0x4000u16
        } else {
            0
        })
        .to_be_bytes(),
    );
    out.extend_from_slice(&u16::try_from(dscale).ok()?.to_be_bytes());
    for g in used {
        out.extend_from_slice(&g.to_be_bytes());
    }
    Some(())
}

/// numeric binary format to decimal text.
fn numeric_from_binary(d: &[u8]) -> Option<String> {
    let word = |i: usize| -> Option<u16> { Some(u16::from_be_bytes([*d.get(i)?, *d.get(i + 1)?])) };
    let ndigits = usize::from(word(0)?);
    let weight = i32::from(word(2)? as i16);
    let sign = word(4)?;
    let dscale = usize::from(word(6)?);
    if d.len() != 8 + 2 * ndigits || dscale > 16_383 {
        return None;
    }
    match sign {
        0xC000 => return Some("NaN".into()),
        0xD000 => return Some("Infinity".into()),
        0xF000 => return Some("-Infinity".into()),
        0 | 0x4000 => {}
        _ => return None,
    }
    let mut digits = Vec::with_capacity(ndigits);
    for i in 0..ndigits {
        let g = word(8 + 2 * i)?;
        if g > 9999 {
            return None;
        }
        digits.push(g);
    }
    if weight.unsigned_abs() as usize > 1_000 {
        return None;
    }
    let group = |idx: i32| -> u16 {
        usize::try_from(idx)
            .ok()
            .and_then(|i| digits.get(i))
            .copied()
            .unwrap_or(0)
    };
    let mut int = String::new();
    for w in (0..=weight.max(-1)).rev() {
        let idx = weight - w;
        let g = group(idx);
        if int.is_empty() {
            if w >= 0 {
                int = g.to_string();
            }
        } else {
            int.push_str(&format!("{g:04}"));
        }
    }
    if int.is_empty() {
        int.push('0');
    }
    let mut frac = String::new();
    let mut w = -1;
    while frac.len() < dscale {
        let idx = weight - w;
        let g = group(idx);
        frac.push_str(&format!("{g:04}"));
        w -= 1;
    }
    frac.truncate(dscale);
    let mut s = String::new();
    if sign == 0x4000 {
        s.push('-');
    }
    s.push_str(&int);
    if dscale > 0 {
        s.push('.');
        s.push_str(&frac);
    }
    Some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decltype_table() {
        assert_eq!(oid_for_decltype("INTEGER"), oid::INT8);
        assert_eq!(oid_for_decltype("varchar(20)"), oid::TEXT);
        assert_eq!(oid_for_decltype("NUMERIC(10,2)"), oid::NUMERIC);
        assert_eq!(oid_for_decltype("BLOB"), oid::BYTEA);
        assert_eq!(oid_for_decltype("double precision"), oid::FLOAT8);
        assert_eq!(oid_for_decltype("timestamptz"), oid::TIMESTAMPTZ);
        assert_eq!(oid_for_decltype("money"), oid::TEXT);
        assert_eq!(oid_for_decltype("boolean"), oid::BOOL);
    }

    #[test]
    fn numeric_binary_round_trip() {
        for s in [
            "0",
            "1",
            "-12.345",
            "10000",
            "123456789.000001",
            "0.0001",
            "99990000",
        ] {
            let mut b = Vec::new();
            numeric_to_binary(s, &mut b).expect("encode");
            let back = numeric_from_binary(&b).expect("decode");
            assert_eq!(
                back.parse::<f64>().ok(),
                s.parse::<f64>().ok(),
                "{s} -> {back}"
            );
        }
        assert_eq!(numeric_from_binary(&[0, 1]), None);
    }

    #[test]
    fn dates_and_timestamps() {
        assert_eq!(parse_date("2000-01-01"), Some(PG_EPOCH_DAYS));
        assert_eq!(format_date(days_from_civil(2024, 2, 29)), "2024-02-29");
        let (m, off) = parse_timestamp("2000-01-02T01:00:00.5+01:00").expect("ts");
        assert_eq!(off, Some(3600));
        assert_eq!(m, 86_400_000_000 + 3_600_000_000 + 500_000);
        assert_eq!(format_timestamp(m), "2000-01-02 01:00:00.5");
        assert_eq!(
            normalise_timestamp("2024-01-01T10:00:00", true),
            "2024-01-01 10:00:00+00"
        );
        assert_eq!(parse_timestamp("garbage"), None);
    }

    #[test]
    fn text_encodings() {
        let mut o = Vec::new();
        encode_text(oid::BOOL, ValueRef::Integer(1), &mut o);
        encode_text(oid::BYTEA, ValueRef::Blob(&[0xde, 0xad]), &mut o);
        assert_eq!(o, b"t\\xdead");
        assert_eq!(float_text(1e300), "1e+300");
        assert_eq!(float_text(2.0), "2");
        assert_eq!(float_text(0.1), "0.1");
        assert_eq!(parse_bytea_text("\\x0a0B"), Some(vec![10, 11]));
        assert_eq!(parse_bytea_text("a\\\\b\\001"), Some(b"a\\b\x01".to_vec()));
        assert_eq!(parse_bytea_text("\\9"), None);
    }
}
