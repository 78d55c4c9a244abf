//! The real psql (Debian's postgresql-client) against the front end over TLS: logins
//! (SCRAM, access token, wrong passwords), server selection by SNI and by `login@server`,
//! simple queries and tags, `\dt`, `\d`, `\l`, `\conninfo`, transactions, logins created in
//! SQL, termination with Azure's 40613 text, and cancel.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::time::{Duration, Instant};

use common::*;

#[test]
fn scram_login_simple_queries_and_tags() {
    let env = Env::start();
    let out = ok(&env.admin(
        "CREATE TABLE items(id INTEGER PRIMARY KEY, name TEXT NOT NULL, price REAL, data BLOB);
         INSERT INTO items(name, price, data) VALUES ('apple', 1.5, x'00ff');
         INSERT INTO items(name, price) VALUES ('pear', 2), ('plum', NULL);
         UPDATE items SET price = 3 WHERE name <> 'apple';
         DELETE FROM items WHERE name = 'plum';
         SELECT id, name, price, data FROM items ORDER BY id;",
    ));
    for tag in [
        "CREATE TABLE",
        "INSERT 0 1",
        "INSERT 0 2",
        "UPDATE 2",
        "DELETE 1",
    ] {
        assert!(out.contains(tag), "missing {tag} in:\n{out}");
    }
    assert!(out.contains("  1 | apple |   1.5 | \\x00ff"), "{out}");
    assert!(out.contains("  2 | pear  |     3 | \n"), "{out}");
    assert!(out.contains("(2 rows)"), "{out}");
    // Unaligned output of functions the front end provides.
    let out = ok(&env.psql(
        &env.conninfo("srv1", ADMIN, "db1"),
        ADMIN_PW,
        &[
            "-At",
            "-c",
            "SELECT version()",
            "-c",
            "SELECT current_user, current_database()",
            "-c",
            "SHOW server_version",
            "-c",
            "SHOW DateStyle",
        ],
    ));
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[0].starts_with("PostgreSQL 15.0 (kagi, SQLite dialect)"),
        "{out}"
    );
    assert_eq!(lines[1], "admin|db1");
    assert_eq!(lines[2], "15.0 (kagi, SQLite dialect)");
    assert_eq!(lines[3], "ISO, MDY");
    // SET is accepted for session settings and SHOW sees it; an empty query is fine.
    let out = ok(&env.admin("SET application_name = 'kagi-test'; SHOW application_name; ;"));
    assert!(out.contains("kagi-test"), "{out}");
    // An error carries SQLSTATE 42P01.
    let o = env.psql(
        &env.conninfo("srv1", ADMIN, "db1"),
        ADMIN_PW,
        &["-v", "VERBOSITY=verbose", "-c", "SELECT * FROM nosuch"],
    );
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("ERROR:  42P01: no such table: nosuch"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn wrong_password_and_unknown_login_fail_alike() {
    let env = Env::start();
    for (user, pw) in [(ADMIN, "wrong"), ("nobody", ADMIN_PW)] {
        let o = env.psql(&env.conninfo("srv1", user, "db1"), pw, &["-c", "SELECT 1"]);
        assert!(!o.status.success());
        let e = stderr(&o);
        assert!(
            e.contains(&format!(
                "FATAL:  password authentication failed for user \"{user}\""
            )),
            "{e}"
        );
    }
    // An unknown server fails the same way.
    let o = env.psql(
        &env.conninfo_ip("admin@nosuchserver", "db1"),
        ADMIN_PW,
        &["-c", "SELECT 1"],
    );
    assert!(
        stderr(&o).contains("password authentication failed for user \"admin@nosuchserver\""),
        "{}",
        stderr(&o)
    );
}

#[test]
fn access_token_login_over_tls() {
    let env = Env::start();
    let out = ok(&env.psql(
        &env.conninfo("srv1", ENTRA, "db1"),
        TOKEN,
        &["-At", "-c", "SELECT current_user"],
    ));
    assert_eq!(out.trim(), ENTRA);
    let o = env.psql(
        &env.conninfo("srv1", ENTRA, "db1"),
        "not-the-token",
        &["-c", "SELECT 1"],
    );
    assert!(
        stderr(&o).contains(&format!(
            "password authentication failed for user \"{ENTRA}\""
        )),
        "{}",
        stderr(&o)
    );
    // Entra user names contain '@': without SNI the server is after the last one.
    let out = ok(&env.psql(
        &env.conninfo_ip(&format!("{ENTRA}@srv2"), "db1"),
        TOKEN,
        &["-At", "-c", "SELECT current_user"],
    ));
    assert_eq!(out.trim(), ENTRA);
}

#[test]
fn sni_and_login_at_server_select_the_server() {
    let env = Env::start();
    ok(&env.admin("CREATE TABLE whoami(s TEXT); INSERT INTO whoami VALUES ('one')"));
    ok(&env.psql(
        &env.conninfo("srv2", ADMIN, "db1"),
        ADMIN_PW,
        &[
            "-c",
            "CREATE TABLE whoami(s TEXT); INSERT INTO whoami VALUES ('two')",
        ],
    ));
    let ask = |conninfo: String| {
        ok(&env.psql(&conninfo, ADMIN_PW, &["-At", "-c", "SELECT s FROM whoami"]))
            .trim()
            .to_owned()
    };
    assert_eq!(ask(env.conninfo("srv1", ADMIN, "db1")), "one");
    assert_eq!(ask(env.conninfo("srv2", ADMIN, "db1")), "two");
    assert_eq!(ask(env.conninfo_ip("admin@srv2", "db1")), "two");
    assert_eq!(ask(env.conninfo_ip("admin@srv1", "db1")), "one");
    // By SNI, a @server suffix naming the same server is accepted (Azure single server's form).
    assert_eq!(ask(env.conninfo("srv2", "admin@srv2", "db1")), "two");
    // No SNI and no @server: the error says how to address a server.
    let o = env.psql(
        &env.conninfo_ip(ADMIN, "db1"),
        ADMIN_PW,
        &["-c", "SELECT 1"],
    );
    assert!(
        stderr(&o).contains("no server is named by this connection"),
        "{}",
        stderr(&o)
    );
    // A missing database.
    let o = env.psql(
        &env.conninfo("srv1", ADMIN, "nosuchdb"),
        ADMIN_PW,
        &["-c", "SELECT 1"],
    );
    assert!(
        stderr(&o).contains("database \"nosuchdb\" does not exist"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn plaintext_is_refused_with_the_reason() {
    let env = Env::start();
    let conn = format!(
        "host=127.0.0.1 port={} user=admin@srv1 dbname=db1 sslmode=disable",
        env.port
    );
    let o = env.psql(&conn, ADMIN_PW, &["-c", "SELECT 1"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("SSL connection is required"),
        "{}",
        stderr(&o)
    );
    // The Unix socket is local: no TLS needed there.
    let conn = format!(
        "host={} port={} user=admin@srv1 dbname=db1",
        env.socket_dir.display(),
        env.port
    );
    assert_eq!(
        ok(&env.psql(&conn, ADMIN_PW, &["-At", "-c", "SELECT 42"])).trim(),
        "42"
    );
}

#[test]
fn psql_describe_commands() {
    let env = Env::start();
    ok(&env.admin(
        "CREATE TABLE t(id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, b BLOB, d DATE, x NUMERIC(10,2) DEFAULT 1.5);
         CREATE TABLE u(id INT REFERENCES t(id) ON DELETE CASCADE, v VARCHAR(20));
         CREATE INDEX ui ON u(v);
         CREATE VIEW vv AS SELECT id, name FROM t;",
    ));
    let c = env.conninfo("srv1", ADMIN, "db1");
    let dt = ok(&env.psql(&c, ADMIN_PW, &["-c", "\\dt"]));
    assert!(dt.contains("List of relations"), "{dt}");
    assert!(dt.contains(" public | t    | table | admin"), "{dt}");
    assert!(dt.contains(" public | u    | table | admin"), "{dt}");
    assert!(dt.contains("(2 rows)"), "{dt}");
    let d = ok(&env.psql(&c, ADMIN_PW, &["-c", "\\d"]));
    assert!(d.contains(" public | vv   | view  | admin"), "{d}");
    let dtt = ok(&env.psql(&c, ADMIN_PW, &["-c", "\\d t"]));
    for want in [
        "Table \"public.t\"",
        " id     | integer       |           | not null | ",
        " name   | text          |           | not null | ",
        " b      | blob          |           |          | ",
        " x      | numeric(10,2) |           |          | 1.5",
        "Indexes:",
        "\"t_pkey\" PRIMARY KEY, rowid (id)",
        "\"sqlite_autoindex_t_1\" UNIQUE CONSTRAINT, btree (name)",
        "Referenced by:",
        "TABLE \"u\" CONSTRAINT \"u_id_fkey\" FOREIGN KEY (id) REFERENCES t(id) ON DELETE CASCADE",
    ] {
        assert!(dtt.contains(want), "missing {want:?} in:\n{dtt}");
    }
    let du = ok(&env.psql(&c, ADMIN_PW, &["-c", "\\d u"]));
    assert!(du.contains("\"ui\" btree (v)"), "{du}");
    assert!(du.contains("Foreign-key constraints:"), "{du}");
    assert!(du.contains(" v      | varchar(20) |"), "{du}");
    let dv = ok(&env.psql(&c, ADMIN_PW, &["-c", "\\d+ vv"]));
    assert!(dv.contains("View \"public.vv\""), "{dv}");
    assert!(dv.contains("SELECT id, name FROM t"), "{dv}");
    let di = ok(&env.psql(&c, ADMIN_PW, &["-c", "\\di"]));
    assert!(di.contains(" public | ui  ") && di.contains("| u"), "{di}");
    let dpat = ok(&env.psql(&c, ADMIN_PW, &["-c", "\\dt t*"]));
    assert!(dpat.contains("(1 row)"), "{dpat}");
    let o = env.psql(&c, ADMIN_PW, &["-c", "\\d nosuch"]);
    assert!(
        stderr(&o).contains("Did not find any relation named \"nosuch\""),
        "{}",
        stderr(&o)
    );
    let l = ok(&env.psql(&c, ADMIN_PW, &["-c", "\\l"]));
    assert!(
        l.contains("List of databases") && l.contains(" db1 ") && l.contains(" postgres "),
        "{l}"
    );
    let info = ok(&env.psql(&c, ADMIN_PW, &["-c", "\\conninfo"]));
    assert!(
        info.contains(
            "You are connected to database \"db1\" as user \"admin\" on host \"srv1.pg.localhost\""
        ),
        "{info}"
    );
    assert!(info.contains("SSL connection (protocol: TLSv1.3"), "{info}");
    // Empty lists for what SQLite has none of.
    let df = ok(&env.psql(&c, ADMIN_PW, &["-c", "\\df"]));
    assert!(df.contains("(0 rows)"), "{df}");
    let dn = ok(&env.psql(&c, ADMIN_PW, &["-c", "\\dn"]));
    assert!(dn.contains(" public | admin"), "{dn}");
    // The query interactive psql 15 sends to complete "SELECT * FROM t<Tab>".
    let complete = "SELECT c.relname, NULL::pg_catalog.text FROM pg_catalog.pg_class c WHERE c.relkind IN ('r', 'S', 'v', 'm', 'f', 'p') AND (c.relname) LIKE 't%' AND pg_catalog.pg_table_is_visible(c.oid) AND c.relnamespace <> (SELECT oid FROM pg_catalog.pg_namespace WHERE nspname = 'pg_catalog')\nUNION ALL\nSELECT NULL::pg_catalog.text, n.nspname FROM pg_catalog.pg_namespace n WHERE n.nspname LIKE 't%' AND n.nspname NOT LIKE E'pg\\\\_%'\nLIMIT 1000";
    assert_eq!(
        ok(&env.psql(&c, ADMIN_PW, &["-At", "-c", complete])),
        "t|\n"
    );
}

#[test]
fn error_in_transaction_block_until_rollback() {
    let env = Env::start();
    ok(&env.admin("CREATE TABLE t(v INTEGER)"));
    let c = env.conninfo("srv1", ADMIN, "db1");
    let script = env.dir.path().join("tx.sql");
    std::fs::write(
        &script,
        "\\set VERBOSITY verbose\nBEGIN;\nINSERT INTO t VALUES (1);\nSELECT nosuch FROM t;\nINSERT INTO t VALUES (2);\nROLLBACK;\nSELECT count(*) AS n FROM t;\nBEGIN;\nINSERT INTO t VALUES (3);\nCOMMIT;\nSELECT count(*) AS n FROM t;\n",
    )
    .unwrap();
    let o = env.psql(
        &c,
        ADMIN_PW,
        &["-v", "ON_ERROR_STOP=0", "-f", script.to_str().unwrap()],
    );
    let (out, err) = (stdout(&o), stderr(&o));
    assert!(
        err.contains("ERROR:  42703: no such column: nosuch"),
        "{err}"
    );
    assert!(err.contains("ERROR:  25P02: current transaction is aborted, commands ignored until end of transaction block"), "{err}");
    assert!(out.contains("ROLLBACK"), "{out}");
    // Nothing of the failed block; the second block committed.
    let counts: Vec<&str> = out
        .lines()
        .map(str::trim)
        .filter(|l| *l == "0" || *l == "1")
        .collect();
    assert_eq!(counts, vec!["0", "1"], "{out}");
}

#[test]
fn logins_created_in_sql_can_log_in() {
    let env = Env::start();
    ok(&env.admin("CREATE USER bob WITH PASSWORD 'b0b-pw'"));
    assert!(env.gateway.has_login("srv1", "bob"));
    let bob = env.conninfo("srv1", "bob", "db1");
    assert_eq!(
        ok(&env.psql(&bob, "b0b-pw", &["-At", "-c", "SELECT current_user"])).trim(),
        "bob"
    );
    // bob may not create logins (the gateway decides).
    let o = env.psql(
        &bob,
        "b0b-pw",
        &["-c", "CREATE ROLE eve WITH LOGIN PASSWORD 'x'"],
    );
    assert!(
        stderr(&o).contains("permission denied to create role"),
        "{}",
        stderr(&o)
    );
    ok(&env.admin("ALTER USER bob WITH PASSWORD 'new-pw'"));
    assert!(
        !env.psql(&bob, "b0b-pw", &["-c", "SELECT 1"])
            .status
            .success()
    );
    ok(&env.psql(&bob, "new-pw", &["-c", "SELECT 1"]));
    // psql's \password sends a SCRAM verifier computed by libpq, never the password.
    ok(&env.admin("DROP USER bob"));
    let o = env.psql(&bob, "new-pw", &["-c", "SELECT 1"]);
    assert!(
        stderr(&o).contains("password authentication failed for user \"bob\""),
        "{}",
        stderr(&o)
    );
    let o = env.admin("DROP ROLE bob");
    assert!(
        stderr(&o).contains("role \"bob\" does not exist"),
        "{}",
        stderr(&o)
    );
    ok(&env.admin("DROP ROLE IF EXISTS bob"));
}

#[test]
fn inaccessible_database_cuts_sessions_with_40613() {
    let env = Env::start();
    ok(&env.admin("CREATE TABLE t(v INTEGER)"));
    let c = env.conninfo("srv1", ADMIN, "db1");
    // One session busy in a statement, one idle in a transaction.
    let busy = env
        .psql_cmd(&c, ADMIN_PW, &["-c", "SELECT pg_sleep(60)"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut idle = env
        .psql_cmd(
            &c,
            ADMIN_PW,
            &[
                "-c",
                "BEGIN",
                "-c",
                "INSERT INTO t VALUES (1)",
                "-c",
                "SELECT pg_sleep(60)",
            ],
        )
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while env.gateway.sessions("srv1", "db1") < 2 {
        assert!(Instant::now() < deadline, "sessions did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let t0 = Instant::now();
    env.gateway.make_inaccessible("srv1", "db1");
    let busy = busy.wait_with_output().unwrap();
    let _ = idle.wait();
    assert!(t0.elapsed() < Duration::from_secs(30));
    let text = azure_40613("db1", "srv1");
    assert!(!busy.status.success());
    assert!(
        stderr(&busy).contains(&format!("FATAL:  {text}")),
        "{}",
        stderr(&busy)
    );
    // New connections are refused with the same text.
    let o = env.psql(&c, ADMIN_PW, &["-c", "SELECT 1"]);
    assert!(
        stderr(&o).contains(&format!("FATAL:  {text}")),
        "{}",
        stderr(&o)
    );
    // Every session let go of its connection; the uncommitted row never landed.
    let deadline = Instant::now() + Duration::from_secs(10);
    while env.gateway.sessions("srv1", "db1") > 0 {
        assert!(
            Instant::now() < deadline,
            "sessions still hold the database"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let conn = kagi_pgsql::rusqlite::Connection::open(env.gateway.db_path("srv1", "db1")).unwrap();
    let n: i64 = conn
        .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 0);
}

#[test]
fn cancel_interrupts_running_statements() {
    let env = Env::start();
    let c = env.conninfo("srv1", ADMIN, "db1");
    for sql in [
        "SELECT pg_sleep(60)",
        // A statement that runs in SQLite's VM: interrupted through sqlite3_interrupt.
        "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c",
    ] {
        let t0 = Instant::now();
        let o = psql_ctrl_c(&env, &c, &env, sql);
        assert!(t0.elapsed() < Duration::from_secs(40));
        assert!(
            stderr(&o).contains("ERROR:  57014: canceling statement due to user request"),
            "{sql}: {}",
            stderr(&o)
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while env.gateway.sessions("srv1", "db1") > 0 {
            assert!(Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

#[test]
fn statement_timeout_is_enforced() {
    let env = Env::start();
    for sql in [
        "SET statement_timeout = '300ms'; SELECT pg_sleep(30)",
        "SET statement_timeout TO 300; WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c",
    ] {
        let t0 = Instant::now();
        let o = env.psql(
            &env.conninfo("srv1", ADMIN, "db1"),
            ADMIN_PW,
            &["-v", "VERBOSITY=verbose", "-c", sql],
        );
        assert!(t0.elapsed() < Duration::from_secs(20));
        assert!(
            stderr(&o).contains("ERROR:  57014: canceling statement due to statement timeout"),
            "{}",
            stderr(&o)
        );
    }
}

#[test]
fn shutdown_ends_sessions_with_57p01() {
    let mut env = Env::start();
    let c = env.conninfo("srv1", ADMIN, "db1");
    let busy = env
        .psql_cmd(&c, ADMIN_PW, &["-c", "SELECT pg_sleep(60)"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while env.gateway.sessions("srv1", "db1") < 1 {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(50));
    }
    env.shutdown();
    let o = busy.wait_with_output().unwrap();
    assert!(
        stderr(&o).contains("FATAL:  terminating connection due to administrator command"),
        "{}",
        stderr(&o)
    );
    assert_eq!(env.gateway.sessions("srv1", "db1"), 0);
}
