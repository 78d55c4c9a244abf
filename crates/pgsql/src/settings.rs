//! Session settings (GUCs): what SET, SHOW, RESET and `current_setting()` see, and which
//! ones are reported to the client in ParameterStatus.

use std::collections::BTreeMap;

use crate::error::{PgError, sqlstate};

/// The version the front end reports (libpq parses it as 150000; psql 15 prints no version
/// warning, newer psql send the catalog queries of a 15 server).
pub const SERVER_VERSION: &str = "15.0 (kagi, SQLite dialect)";
/// server_version_num.
pub const SERVER_VERSION_NUM: &str = "150000";

/// (name as PostgreSQL spells it, default, reported in ParameterStatus, description).
const KNOWN: &[(&str, &str, bool, &str)] = &[
    (
        "application_name",
        "",
        true,
        "Sets the application name to be reported in statistics and logs.",
    ),
    (
        "client_encoding",
        "UTF8",
        true,
        "Sets the client's character set encoding.",
    ),
    (
        "DateStyle",
        "ISO, MDY",
        true,
        "Sets the display format for date and time values.",
    ),
    (
        "default_transaction_isolation",
        "serializable",
        false,
        "Sets the transaction isolation level of each new transaction.",
    ),
    (
        "default_transaction_read_only",
        "off",
        true,
        "Sets the default read-only status of new transactions.",
    ),
    (
        "extra_float_digits",
        "1",
        false,
        "Sets the number of digits displayed for floating-point values.",
    ),
    (
        "in_hot_standby",
        "off",
        true,
        "Shows whether hot standby is currently active.",
    ),
    (
        "integer_datetimes",
        "on",
        true,
        "Shows whether datetimes are integer based.",
    ),
    (
        "IntervalStyle",
        "postgres",
        true,
        "Sets the display format for interval values.",
    ),
    (
        "is_superuser",
        "off",
        true,
        "Shows whether the current user is a superuser.",
    ),
    (
        "lc_collate",
        "C",
        false,
        "Shows the collation order locale.",
    ),
    (
        "lc_ctype",
        "C",
        false,
        "Shows the character classification and case conversion locale.",
    ),
    (
        "lc_messages",
        "C",
        false,
        "Sets the language in which messages are displayed.",
    ),
    (
        "lock_timeout",
        "0",
        false,
        "Sets the maximum allowed duration of any wait for a lock.",
    ),
    (
        "max_identifier_length",
        "63",
        false,
        "Shows the maximum identifier length.",
    ),
    (
        "password_encryption",
        "scram-sha-256",
        false,
        "Chooses the algorithm for encrypting passwords.",
    ),
    (
        "search_path",
        "\"$user\", public",
        false,
        "Sets the schema search order for names that are not schema-qualified.",
    ),
    (
        "server_encoding",
        "UTF8",
        true,
        "Shows the server (database) character set encoding.",
    ),
    (
        "server_version",
        SERVER_VERSION,
        true,
        "Shows the server version.",
    ),
    (
        "server_version_num",
        SERVER_VERSION_NUM,
        false,
        "Shows the server version as an integer.",
    ),
    (
        "session_authorization",
        "",
        true,
        "Sets the session user name.",
    ),
    (
        "standard_conforming_strings",
        "on",
        true,
        "Causes '...' strings to treat backslashes literally.",
    ),
    (
        "statement_timeout",
        "0",
        false,
        "Sets the maximum allowed duration of any statement.",
    ),
    (
        "TimeZone",
        "UTC",
        true,
        "Sets the time zone for displaying and interpreting time stamps.",
    ),
    (
        "transaction_isolation",
        "serializable",
        false,
        "Sets the current transaction's isolation level.",
    ),
    (
        "transaction_read_only",
        "off",
        false,
        "Sets the current transaction's read-only status.",
    ),
    (
        "idle_in_transaction_session_timeout",
        "0",
        false,
        "Sets the maximum allowed idle time between queries, when in a transaction.",
    ),
];

/// Settings that SET may not change (reported values the protocol depends on).
const READ_ONLY: &[&str] = &[
    "server_version",
    "server_version_num",
    "server_encoding",
    "integer_datetimes",
    "lc_collate",
    "lc_ctype",
    "max_identifier_length",
    "in_hot_standby",
    "is_superuser",
    "session_authorization",
    "transaction_isolation",
];

/// One session's settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// lower-cased name → (PostgreSQL spelling, value).
    values: BTreeMap<String, (String, String)>,
    defaults: BTreeMap<String, String>,
}

impl Settings {
    /// The defaults, with the session's user.
    pub fn new(login: &str) -> Self {
        let mut values = BTreeMap::new();
        for (name, default, _, _) in KNOWN {
            values.insert(
                name.to_ascii_lowercase(),
                ((*name).to_owned(), (*default).to_owned()),
            );
        }
        if let Some(v) = values.get_mut("session_authorization") {
            v.1 = login.to_owned();
        }
        let defaults = values
            .iter()
            .map(|(k, (_, v))| (k.clone(), v.clone()))
            .collect();
        Self { values, defaults }
    }

    /// The value of `name` (any case), or None for an unknown setting.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.values
            .get(&name.to_ascii_lowercase())
            .map(|(_, v)| v.as_str())
    }

    /// SHOW's error for an unknown setting.
    pub fn unknown(name: &str) -> PgError {
        PgError::error(
            sqlstate::UNDEFINED_OBJECT,
            format!("unrecognized configuration parameter \"{name}\""),
        )
    }

    /// Sets `name`; returns the (PostgreSQL name, new value) to report if the client must
    /// hear of it. A startup parameter goes through here too.
    pub fn set(
        &mut self,
        name: &str,
        value: Option<&str>,
    ) -> Result<Option<(String, String)>, PgError> {
        let key = name.to_ascii_lowercase();
        if READ_ONLY.contains(&key.as_str()) {
            return Err(PgError::error(
                sqlstate::CANT_CHANGE_RUNTIME_PARAM,
                format!("parameter \"{name}\" cannot be changed"),
            ));
        }
        let value = match value {
            Some(v) => v.to_owned(),
            None => self.defaults.get(&key).cloned().unwrap_or_default(),
        };
        let value = validate(&key, value)?;
        let display = KNOWN
            .iter()
            .find(|(n, ..)| n.eq_ignore_ascii_case(&key))
            .map_or_else(|| key.clone(), |(n, ..)| (*n).to_owned());
        let reported = KNOWN
            .iter()
            .any(|(n, _, r, _)| *r && n.eq_ignore_ascii_case(&key));
        let changed = self.values.get(&key).map(|(_, v)| v.as_str()) != Some(value.as_str());
        self.values.insert(key, (display.clone(), value.clone()));
        Ok((reported && changed).then_some((display, value)))
    }

    /// RESET ALL: the settings to report.
    pub fn reset_all(&mut self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let keys: Vec<String> = self.values.keys().cloned().collect();
        for k in keys {
            if READ_ONLY.contains(&k.as_str()) {
                continue;
            }
            if let Ok(Some(r)) = self.set(&k, None) {
                out.push(r);
            }
        }
        out
    }

    /// The settings reported at startup, in order.
    pub fn reported(&self) -> Vec<(String, String)> {
        KNOWN
            .iter()
            .filter(|(_, _, r, _)| *r)
            .map(|(n, ..)| ((*n).to_owned(), self.get(n).unwrap_or_default().to_owned()))
            .collect()
    }

    /// SHOW ALL: (name, setting, description).
    pub fn all(&self) -> Vec<(String, String, String)> {
        self.values
            .values()
            .map(|(n, v)| {
                let d = KNOWN.iter().find(|(k, ..)| k == n).map_or("", |(.., d)| d);
                (n.clone(), v.clone(), d.to_owned())
            })
            .collect()
    }

    /// statement_timeout in milliseconds (0: none).
    pub fn statement_timeout_ms(&self) -> u64 {
        self.get("statement_timeout")
            .and_then(parse_duration_ms)
            .unwrap_or(0)
    }
}

/// A duration setting: a number of milliseconds, or with a unit (`5s`, `100ms`, `1min`).
fn parse_duration_ms(v: &str) -> Option<u64> {
    let v = v.trim();
    let split = v
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(v.len());
    let (num, unit) = v.split_at(split);
    let n: f64 = num.parse().ok()?;
    let factor = match unit.trim() {
        "" | "ms" => 1.0,
        "s" => 1000.0,
        "min" => 60_000.0,
        "h" => 3_600_000.0,
        "d" => 86_400_000.0,
        "us" => 0.001,
        _ => return None,
    };
    Some((n * factor) as u64)
}

fn validate(key: &str, value: String) -> Result<String, PgError> {
    let bad = |hint: &str| {
        PgError::error(
            sqlstate::INVALID_PARAMETER_VALUE,
            format!("invalid value for parameter \"{key}\": \"{value}\""),
        )
        .with_hint(hint)
    };
    match key {
        "client_encoding" => match value.to_ascii_uppercase().replace(['-', '_'], "").as_str() {
            "UTF8" | "UNICODE" => Ok("UTF8".into()),
            "SQLASCII" => Ok("SQL_ASCII".into()),
            _ => Err(PgError::unsupported(format!(
                "client_encoding \"{value}\" is not supported: kagi speaks UTF8"
            ))),
        },
        "standard_conforming_strings" => match crate::types::parse_bool(&value) {
            Some(true) => Ok("on".into()),
            _ => Err(bad(
                "SQLite string literals are standard-conforming: only on is supported",
            )),
        },
        "datestyle" => {
            if value.to_ascii_uppercase().contains("ISO") || value.is_empty() {
                Ok("ISO, MDY".into())
            } else {
                Err(bad(
                    "dates are sent in ISO format: only DateStyle ISO is supported",
                ))
            }
        }
        "intervalstyle" if value != "postgres" => {
            Err(bad("only IntervalStyle postgres is supported"))
        }
        "statement_timeout" | "lock_timeout" | "idle_in_transaction_session_timeout" => {
            parse_duration_ms(&value)
                .map(|_| value.clone())
                .ok_or_else(|| bad("a number of milliseconds, or with a unit: 5s, 1min"))
        }
        "default_transaction_read_only" | "transaction_read_only" => {
            match crate::types::parse_bool(&value) {
                Some(false) => Ok("off".into()),
                _ => Err(PgError::unsupported(
                    "read-only transactions are not supported",
                )),
            }
        }
        _ => Ok(value),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_and_report() {
        let mut s = Settings::new("alice");
        assert_eq!(s.get("session_authorization"), Some("alice"));
        assert_eq!(
            s.set("Application_Name", Some("psql")).expect("set"),
            Some(("application_name".into(), "psql".into()))
        );
        assert_eq!(s.set("application_name", Some("psql")).expect("set"), None);
        assert_eq!(s.set("search_path", Some("x")).expect("set"), None);
        assert!(s.set("server_version", Some("1")).is_err());
        assert!(s.set("client_encoding", Some("LATIN1")).is_err());
        assert_eq!(s.set("client_encoding", Some("utf-8")).expect("set"), None);
        s.set("statement_timeout", Some("2s")).expect("set");
        assert_eq!(s.statement_timeout_ms(), 2000);
        assert!(s.set("statement_timeout", Some("soon")).is_err());
        assert_eq!(s.set("my.custom", Some("1")).expect("set"), None);
        assert_eq!(s.get("MY.CUSTOM"), Some("1"));
    }
}
