//! kagi's audit log (KV-10): one record per request, in Azure Key Vault's `AuditEvent` shape,
//! appended to `<data-dir>/audit/audit.jsonl` and hash-chained so that an edited, deleted,
//! inserted or reordered record is detected.
//!
//! - [`AuditRecord`]: what the HTTP layer knows about a request (never key material, secret
//!   values, bodies or tokens).
//! - [`AuditLog`]: the writer. One thread owns the file; callers send records and await an
//!   acknowledgement, which comes only after the batch holding the record has been written and
//!   `fdatasync`ed (group commit). A failure to write puts the log in a failed state in which
//!   every append fails at once and [`AuditLog::is_healthy`] is false, until a retry succeeds.
//! - [`verify`] and [`query`]: offline readers of the file, for `kagi audit`.
//!
//! The line format and the chain are described in `docs/FORMATS.md` ("Audit log").

#![forbid(unsafe_code)]

mod chain;
mod operation;
mod reader;
mod record;
mod timefmt;
mod writer;

pub use chain::{GENESIS_HASH, canonical_json, sha256_hex};
pub use operation::data_plane_operation;
pub use reader::{AuditEntry, Filter, Query, VerifyError, VerifyReport, query, verify};
pub use record::{
    AuditRecord, Claim, Identity, RequestProperties, ResultType, new_correlation_id, reason_phrase,
    sane_correlation_id,
};
pub use timefmt::{format_rfc3339_ms, now_unix_ms, parse_rfc3339_ms};
pub use writer::{
    AUDIT_DIR, AUDIT_FILE, Admission, AuditConfig, AuditError, AuditLog, BatchObserver,
    FAIL_FILE_ENV, MAX_RECORD_BYTES,
};
