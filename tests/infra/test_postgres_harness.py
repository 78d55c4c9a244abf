"""scripts/postgres.sh, the PostgreSQL harness later tests use (issue 14): a primary and a
streaming standby from Debian's PostgreSQL 15, run as an unprivileged user in a directory of
their own; promote, stop and destroy idempotent; a crashed run cleaned up by the next start."""

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg
import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "postgres.sh"


def harness(*args: str) -> str:
    """Runs scripts/postgres.sh; its stdout."""
    done = subprocess.run(
        [str(SCRIPT), *args], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, f"postgres.sh {args}: {done.stderr}"
    return done.stdout


def parse(out: str) -> dict[str, str]:
    """The NAME=value lines postgres.sh prints."""
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def wait_for_row(url: str, row_id: int) -> str:
    """The row's value once the standby has replayed it (streaming: well under 10 s)."""
    deadline = time.monotonic() + 10
    while True:
        with psycopg.connect(url, autocommit=True) as conn:
            try:
                row = conn.execute("SELECT v FROM t WHERE id = %s", (row_id,)).fetchone()
            except psycopg.errors.UndefinedTable:
                row = None  # the CREATE TABLE is not replayed yet either
        if row is not None:
            return row[0]
        assert time.monotonic() < deadline, f"row {row_id} never reached {url}"
        time.sleep(0.05)


@pytest.fixture
def pgdir():
    # Not pytest's tmp_path: that is 0700 root's, and the clusters' user must get through to DIR.
    base = tempfile.mkdtemp(prefix="kagi-pg-test.", dir="/var/tmp")
    os.chmod(base, 0o755)
    d = os.path.join(base, "pg")
    yield d
    subprocess.run([str(SCRIPT), "destroy", d], capture_output=True, timeout=120)
    shutil.rmtree(base, ignore_errors=True)


def test_primary_and_standby_stream_promote_stop_destroy(pgdir):
    env = parse(harness("start", pgdir, "--standby"))
    primary, standby = env["PG_PRIMARY_URL"], env["PG_STANDBY_URL"]
    assert primary.startswith("postgres://kagi:") and primary.endswith("/kagi")
    assert standby != primary
    assert env["PG_PRIMARY_DIR"] == os.path.join(pgdir, "primary")
    assert env["PG_STANDBY_DIR"] == os.path.join(pgdir, "standby")
    assert parse(harness("env", pgdir)) == env
    # The password is needed: a login without it is refused.
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(primary.replace(primary.split(":")[2].split("@")[0], "wrong"))

    with psycopg.connect(primary, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        conn.execute("INSERT INTO t VALUES (1, 'written on the primary')")
    assert wait_for_row(standby, 1) == "written on the primary"
    with psycopg.connect(standby, autocommit=True) as conn:
        assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (True,)
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction) as refused:
            conn.execute("INSERT INTO t VALUES (2, 'on the standby')")
        assert refused.value.sqlstate == "25006"

    harness("promote", pgdir)
    harness("promote", pgdir)  # idempotent
    with psycopg.connect(standby, autocommit=True) as conn:
        assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (False,)
        conn.execute("INSERT INTO t VALUES (2, 'written on the promoted standby')")
        assert conn.execute("SELECT count(*) FROM t").fetchone() == (2,)

    harness("stop", pgdir)
    harness("stop", pgdir)  # idempotent
    for url in (primary, standby):
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(url, connect_timeout=2)
    harness("destroy", pgdir)
    harness("destroy", pgdir)  # idempotent
    assert not os.path.exists(pgdir)


def test_start_after_the_postmaster_was_killed(pgdir):
    first = parse(harness("start", pgdir, "--standby"))
    with psycopg.connect(first["PG_PRIMARY_URL"], autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    pidfile = Path(first["PG_PRIMARY_DIR"]) / "postmaster.pid"
    postmaster = int(pidfile.read_text().splitlines()[0])
    os.kill(postmaster, 9)

    env = parse(harness("start", pgdir, "--standby"))
    assert env["PG_PRIMARY_URL"] != first["PG_PRIMARY_URL"]  # a fresh password
    with psycopg.connect(env["PG_PRIMARY_URL"], autocommit=True) as conn:
        # A fresh cluster: the table of the crashed run went with it.
        assert conn.execute("SELECT to_regclass('t')").fetchone() == (None,)
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        conn.execute("INSERT INTO t VALUES (1, 'after the crash')")
    assert wait_for_row(env["PG_STANDBY_URL"], 1) == "after the crash"
    harness("destroy", pgdir)
    assert not os.path.exists(pgdir)
