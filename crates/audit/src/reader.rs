//! Offline readers of an audit file: chain verification and queries.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::Path;

use serde_json::Value;

use crate::chain::{GENESIS_HASH, check_line, sha256_hex};

/// A chain that verified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifyReport {
    /// Number of records.
    pub records: u64,
    /// `hash` of the last record (empty for an empty log): keep it elsewhere to detect a
    /// truncated or rewritten tail later.
    pub last_hash: String,
}

/// Why verification failed.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// A record is not what the chain says it must be.
    #[error("line {line}: {reason}")]
    Broken {
        /// 1-based line number of the first bad record.
        line: u64,
        /// What is wrong with it.
        reason: String,
    },
}

/// Verifies the whole chain of the file at `path`: every line is a canonical record whose
/// `hash` matches its content, `seq` counts 1, 2, … without gaps, and each `prevHash` is the
/// SHA-256 of the line before (64 zeros for the first). An edited, deleted, inserted or
/// reordered record, or a forged one appended without the right hash, breaks it; the error
/// names the first bad line.
///
/// # Errors
/// [`VerifyError::Io`] if the file cannot be read, [`VerifyError::Broken`] at the first bad
/// line.
pub fn verify(path: &Path) -> Result<VerifyReport, VerifyError> {
    let io = |source| VerifyError::Io {
        path: path.display().to_string(),
        source,
    };
    let mut reader = BufReader::new(File::open(path).map_err(io)?);
    let mut expected_prev = GENESIS_HASH.to_string();
    let mut last_hash = String::new();
    let mut n: u64 = 0;
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let read = reader.read_until(b'\n', &mut buf).map_err(io)?;
        if read == 0 {
            break;
        }
        let line_no = n + 1;
        let broken = |reason: String| VerifyError::Broken {
            line: line_no,
            reason,
        };
        if buf.last() != Some(&b'\n') {
            return Err(broken(
                "the last line is incomplete (no newline): a write in progress, a crash, or an \
                 appended fragment"
                    .into(),
            ));
        }
        buf.pop();
        let text = std::str::from_utf8(&buf).map_err(|_| broken("the line is not UTF-8".into()))?;
        let link = check_line(text).map_err(broken)?;
        if link.seq != line_no {
            return Err(broken(format!(
                "seq is {} where {line_no} was expected (a record was deleted, inserted or moved)",
                link.seq
            )));
        }
        if link.prev_hash != expected_prev {
            return Err(broken(
                "prevHash does not match the previous line (a record before it was changed, \
                 deleted, inserted or moved)"
                    .into(),
            ));
        }
        expected_prev = sha256_hex(&buf);
        last_hash = link
            .value
            .get("hash")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        n = line_no;
    }
    Ok(VerifyReport {
        records: n,
        last_hash,
    })
}

/// Which records a query returns; every set field must match.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    /// Records at or after this instant (Unix milliseconds).
    pub since_ms: Option<i64>,
    /// Records at or before this instant (Unix milliseconds).
    pub until_ms: Option<i64>,
    /// `operationName`, case-insensitive.
    pub operation: Option<String>,
    /// `resultType` (`Success` / `Failure`), case-insensitive.
    pub result: Option<String>,
    /// The caller's object id (`identity.claim.oid`), case-insensitive.
    pub caller_oid: Option<String>,
    /// A substring of `resourceId` or `properties.id`, case-insensitive.
    pub resource: Option<String>,
}

impl Filter {
    /// Whether a record matches.
    pub fn matches(&self, r: &Value) -> bool {
        let s = |v: Option<&Value>| v.and_then(Value::as_str).unwrap_or_default().to_string();
        if self.since_ms.is_some() || self.until_ms.is_some() {
            let Some(t) = r
                .get("time")
                .and_then(Value::as_str)
                .and_then(crate::parse_rfc3339_ms)
            else {
                return false;
            };
            if self.since_ms.is_some_and(|since| t < since)
                || self.until_ms.is_some_and(|until| t > until)
            {
                return false;
            }
        }
        if let Some(op) = &self.operation
            && !s(r.get("operationName")).eq_ignore_ascii_case(op)
        {
            return false;
        }
        if let Some(result) = &self.result
            && !s(r.get("resultType")).eq_ignore_ascii_case(result)
        {
            return false;
        }
        if let Some(oid) = &self.caller_oid
            && !s(r.pointer("/identity/claim/oid")).eq_ignore_ascii_case(oid)
        {
            return false;
        }
        if let Some(needle) = &self.resource {
            let needle = needle.to_ascii_lowercase();
            let hay = [s(r.get("resourceId")), s(r.pointer("/properties/id"))];
            if !hay.iter().any(|h| h.to_ascii_lowercase().contains(&needle)) {
                return false;
            }
        }
        true
    }
}

/// One record read back.
#[derive(Clone, Debug)]
pub struct AuditEntry {
    /// 1-based line number in the file.
    pub line: u64,
    /// The line as stored (without newline): export it as is and it still verifies.
    pub raw: String,
    /// The parsed record.
    pub record: Value,
}

/// The records of a file that match a filter, in file order. Lines that are not JSON
/// objects (damage; `verify` reports it) are returned as errors and the iteration goes on;
/// an incomplete last line is skipped.
#[derive(Debug)]
pub struct Query {
    reader: BufReader<File>,
    filter: Filter,
    line: u64,
}

/// Reads the records of `path` matching `filter`. Does not verify the chain (see [`verify`]).
///
/// # Errors
/// If the file cannot be opened.
pub fn query(path: &Path, filter: Filter) -> std::io::Result<Query> {
    Ok(Query {
        reader: BufReader::new(File::open(path)?),
        filter,
        line: 0,
    })
}

impl Iterator for Query {
    type Item = Result<AuditEntry, String>;

    fn next(&mut self) -> Option<Self::Item> {
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match self.reader.read_until(b'\n', &mut buf) {
                Ok(0) => return None,
                Ok(_) => {}
                Err(e) => return Some(Err(format!("read error after line {}: {e}", self.line))),
            }
            if buf.last() != Some(&b'\n') {
                return None;
            }
            buf.pop();
            self.line += 1;
            let raw = match String::from_utf8(std::mem::take(&mut buf)) {
                Ok(s) => s,
                Err(_) => return Some(Err(format!("line {}: not UTF-8", self.line))),
            };
            let record: Value = match serde_json::from_str(&raw) {
                Ok(v @ Value::Object(_)) => v,
                _ => return Some(Err(format!("line {}: not a JSON object", self.line))),
            };
            if self.filter.matches(&record) {
                return Some(Ok(AuditEntry {
                    line: self.line,
                    raw,
                    record,
                }));
            }
        }
    }
}
