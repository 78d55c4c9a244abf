//! Embedded SQL benchmark (issue 13): SQLCipher 4 (rusqlite's bundled SQLCipher) with a raw key
//! and its defaults (page size 4096, HMAC-SHA512), on the same workload as `kagi-bench-sql`.

#[path = "../../src/workload.rs"]
mod workload;

use std::path::Path;

use rusqlite::Connection;
use workload::Result;

fn open(_engine: &str, path: &Path, synchronous: &str) -> Result<Connection> {
    let conn = Connection::open(path)?;
    // A raw key (64 hex digits) skips PBKDF2; the key must come before anything else.
    let hex: String = workload::KEY.iter().map(|b| format!("{b:02x}")).collect();
    conn.execute_batch(&format!("PRAGMA key = \"x'{hex}'\";"))?;
    let version: String = conn.query_row("PRAGMA cipher_version", [], |r| r.get(0))?;
    if !version.starts_with('4') {
        return Err(format!("SQLCipher {version}, not 4").into());
    }
    workload::wal_and_settings(&conn, synchronous)?;
    Ok(conn)
}

fn main() -> std::process::ExitCode {
    workload::main_with(&["sqlcipher4"], open)
}
