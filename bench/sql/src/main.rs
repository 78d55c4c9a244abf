//! Embedded SQL benchmark (issue 13): plain SQLite and kagi's encrypted engine on the workload of
//! `workload.rs`. Run by scripts/bench-sql.sh; `kagi-bench-sql` alone prints its usage.

mod workload;

use std::path::Path;

use rusqlite::Connection;
use workload::Result;

fn open(engine: &str, path: &Path, synchronous: &str) -> Result<Connection> {
    if engine == "kagi" {
        // kagi's `open` sets WAL, synchronous=FULL and the reserved bytes itself.
        let key = kagi_sqlite_crypt::DatabaseKey::new(workload::KEY, *b"bench-sql-db-id!");
        let conn = kagi_sqlite_crypt::open(path, &key)?;
        workload::settings_of_run(&conn, synchronous)?;
        Ok(conn)
    } else {
        let conn = Connection::open(path)?;
        workload::wal_and_settings(&conn, synchronous)?;
        Ok(conn)
    }
}

fn main() -> std::process::ExitCode {
    workload::main_with(&["sqlite", "kagi"], open)
}
