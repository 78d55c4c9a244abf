//! The real psycopg 3 (pip `psycopg[binary]`, libpq inside) against the front end over TLS:
//! parameterised queries in text and binary formats, executemany, pipelines, prepared
//! statements, transactions and savepoints, server-side cursors, SQLSTATE classes, logins
//! created in SQL, an access-token login. The script is tests/psycopg_client.py.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::*;

/// The venv python with psycopg (KAGI_VENV, else the repository's .venv that
/// tests/conformance/run.sh builds from tests/conformance/requirements.txt).
fn python() -> PathBuf {
    let venv = std::env::var_os("KAGI_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.venv"));
    let py = venv.join("bin/python");
    let has = Command::new(&py)
        .args(["-c", "import psycopg"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        has,
        "psycopg is not importable by {}: build the venv first (tests/conformance/run.sh does, from \
         tests/conformance/requirements.txt, or `{}/bin/pip install 'psycopg[binary]'`); this test \
         does not skip",
        py.display(),
        venv.display()
    );
    py
}

#[test]
fn psycopg_end_to_end() {
    let py = python();
    let env = Env::start();
    let dsn = env.conninfo("srv1", ADMIN, "db1") + &format!(" password={ADMIN_PW}");
    let token_dsn = env.conninfo("srv1", ENTRA, "db1") + &format!(" password={TOKEN}");
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/psycopg_client.py");
    let o = Command::new(py)
        .arg(script)
        .arg(&dsn)
        .arg(&token_dsn)
        .output()
        .unwrap();
    let (out, err) = (stdout(&o), stderr(&o));
    assert!(o.status.success(), "psycopg script failed:\n{out}\n{err}");
    assert_eq!(out.trim(), "ok", "{err}");
}
