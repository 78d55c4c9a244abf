"""psycopg 3 against kagi's PostgreSQL front end (run by tests/psycopg.rs).

Usage: psycopg_client.py DSN TOKEN_DSN
Exits non-zero with a traceback on the first failed check; prints "ok" at the end.
"""

import datetime
import decimal
import sys

import psycopg
from psycopg import errors, sql

dsn, token_dsn = sys.argv[1], sys.argv[2]


def check(cond, what):
    if not cond:
        raise AssertionError(what)


with psycopg.connect(dsn, autocommit=True) as conn:
    check(conn.info.server_version == 150000, conn.info.server_version)
    check(conn.info.parameter_status("server_encoding") == "UTF8", "server_encoding")
    check(conn.info.parameter_status("integer_datetimes") == "on", "integer_datetimes")
    check(conn.info.backend_pid > 0, "backend pid")
    conn.execute(
        "CREATE TABLE t(id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, score REAL,"
        " qty INTEGER, ok BOOLEAN, raw BLOB, born DATE, seen TIMESTAMP, price NUMERIC)"
    )
    # Parameterised insert: every common Python type, in text and binary formats.
    cur = conn.execute(
        "INSERT INTO t(name, score, qty, ok, raw, born, seen, price) VALUES (%s, %s, %s, %s, %s, %s, %s, %s) RETURNING id",
        ("alpha", 1.25, 7, True, b"\x00\x01\xff", datetime.date(2024, 2, 29),
         datetime.datetime(2024, 1, 2, 3, 4, 5, 600000), decimal.Decimal("12.5")),
    )
    check(cur.fetchone() == (1,), "RETURNING id typed as an integer")
    cur = conn.cursor()
    cur.execute("INSERT INTO t(name, qty, ok) VALUES (%s, %s, %s)", ("beta", 2**40, False))
    check(cur.rowcount == 1, f"rowcount {cur.rowcount}")
    cur.execute("INSERT INTO t(name, qty) VALUES (%b, %b)", ("gamma", -3))
    row = conn.execute("SELECT name, score, qty, ok, raw, born, seen, price FROM t WHERE id = %s", (1,)).fetchone()
    check(row[0] == "alpha" and row[1] == 1.25 and row[2] == 7 and row[3] is True, row)
    check(row[4] == b"\x00\x01\xff", row[4])
    check(row[5] == datetime.date(2024, 2, 29), row[5])
    check(row[6] == datetime.datetime(2024, 1, 2, 3, 4, 5, 600000), row[6])
    check(row[7] == decimal.Decimal("12.5"), row[7])
    # Expressions without a declared type are typed from their value.
    check(conn.execute("SELECT count(*), 1.5, 'x', NULL FROM t").fetchone() == (3, 1.5, "x", None), "expression types")
    check(conn.execute("SELECT qty FROM t WHERE name = %s", ("beta",)).fetchone()[0] == 2**40, "int8")
    # Binary results.
    bcur = conn.cursor(binary=True)
    bcur.execute("SELECT id, name, score, raw, ok, born FROM t WHERE id = %s", (1,))
    check(bcur.fetchone() == (1, "alpha", 1.25, b"\x00\x01\xff", True, datetime.date(2024, 2, 29)), "binary row")
    # NULL parameters, and a query with no rows.
    check(conn.execute("SELECT id FROM t WHERE name = %s", (None,)).fetchall() == [], "no rows")

    # executemany (pipelined by psycopg) and its row count.
    cur.executemany("INSERT INTO t(name, qty) VALUES (%s, %s)", [(f"n{i}", i) for i in range(50)])
    check(conn.execute("SELECT count(*) FROM t WHERE name LIKE 'n%'").fetchone()[0] == 50, "executemany")
    # Prepared statements: psycopg prepares a query after it ran a few times.
    for i in range(8):
        r = conn.execute("SELECT qty FROM t WHERE name = %s", (f"n{i}",), prepare=(i > 3)).fetchone()
        check(r == (i,), r)

    # Errors carry their SQLSTATE class.
    try:
        conn.execute("INSERT INTO t(name) VALUES ('alpha')")
        raise AssertionError("duplicate accepted")
    except errors.UniqueViolation as e:
        check(e.sqlstate == "23505", e.sqlstate)
    try:
        conn.execute("SELECT * FROM nosuch")
        raise AssertionError("missing table accepted")
    except errors.UndefinedTable:
        pass
    try:
        conn.execute("SELEC 1")
        raise AssertionError("syntax error accepted")
    except errors.SyntaxError:
        pass
    # The connection is usable after errors.
    check(conn.execute("SELECT 1").fetchone() == (1,), "after errors")

    # Pipeline mode explicitly: an error aborts the rest of the pipeline batch.
    with conn.pipeline():
        c1 = conn.execute("SELECT 10")
        c2 = conn.execute("SELECT %s::int", (20,))
    check(c1.fetchone() == (10,) and c2.fetchone() == (20,), "pipeline")

    # sql composition with identifiers.
    q = sql.SQL("SELECT {} FROM {} WHERE id = %s").format(sql.Identifier("name"), sql.Identifier("t"))
    check(conn.execute(q, (1,)).fetchone() == ("alpha",), "sql.Identifier")

# Transactions (psycopg's default: not autocommit).
with psycopg.connect(dsn) as conn:
    conn.execute("INSERT INTO t(name) VALUES ('tx1')")
    check(conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS, conn.info.transaction_status)
    conn.rollback()
    check(conn.execute("SELECT count(*) FROM t WHERE name = 'tx1'").fetchone()[0] == 0, "rolled back")
    conn.rollback()
    with conn.transaction():
        conn.execute("INSERT INTO t(name) VALUES ('tx2')")
        try:
            with conn.transaction():  # a SAVEPOINT
                conn.execute("INSERT INTO t(name) VALUES ('tx3')")
                conn.execute("INSERT INTO t(name) VALUES ('tx2')")  # duplicate
        except errors.UniqueViolation:
            pass
    conn.commit()
    names = {r[0] for r in conn.execute("SELECT name FROM t WHERE name LIKE 'tx%'")}
    check(names == {"tx2"}, names)
    conn.commit()
    # An error in a transaction block: 25P02 until rollback.
    try:
        conn.execute("SELECT nosuch FROM t")
    except errors.UndefinedColumn:
        pass
    check(conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR, "INERROR")
    try:
        conn.execute("SELECT 1")
        raise AssertionError("statement accepted in a failed transaction")
    except errors.InFailedSqlTransaction:
        pass
    conn.rollback()
    check(conn.execute("SELECT 2").fetchone() == (2,), "after rollback")
    conn.commit()

    # Server-side cursor.
    with conn.cursor(name="big") as sc:
        sc.itersize = 7
        sc.execute("SELECT qty FROM t WHERE name LIKE 'n%%' ORDER BY qty")
        got = [r[0] for r in sc]
    check(got == list(range(50)), got)
    with conn.cursor(name="some") as sc:
        sc.execute("SELECT qty FROM t WHERE name LIKE %s ORDER BY qty", ("n%",))
        check(sc.fetchmany(3) == [(0,), (1,), (2,)], "fetchmany")
        check(sc.fetchone() == (3,), "fetchone")
    conn.commit()

    # Logins created in SQL.
    conn.autocommit = True
    conn.execute("CREATE USER carol WITH PASSWORD 'c4rol'")

carol = dsn.replace("user=admin", "user=carol")
with psycopg.connect(carol, password="c4rol") as c:
    check(c.execute("SELECT current_user").fetchone() == ("carol",), "carol")
try:
    psycopg.connect(carol, password="wrong")
    raise AssertionError("wrong password accepted")
except psycopg.OperationalError as e:
    check('password authentication failed for user "carol"' in str(e), str(e))

# An Entra principal: the access token is the password.
with psycopg.connect(token_dsn) as c:
    check(c.execute("SELECT current_user").fetchone() == ("alice@contoso.com",), "token login")

print("ok")
