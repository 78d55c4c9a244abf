"""Automatic backups of SQL databases and point-in-time restore (issue 13, TD-6) end to end: rows
written with psql and psycopg in batches while a server takes log backups every two seconds, restores
into new databases (Azure's `createMode: PointInTimeRestore`) at points between the batches, backups
that hold no plaintext, a protector rotated between backups (each backup unwrapped with its own key,
and a restore that needs a disabled key refused with Azure's error, naming the server, the time range
and the key), and kill -9 of the server while a writer runs.
"""

import calendar
import json
import subprocess
import threading
import time

import psycopg
import pytest

from conftest import DEFAULT_RG, KAGI_BIN, LOCATION, _start_server, advance_clock, wait_for
from test_sql import (arm, connect, create_db, create_server, grant, key_vault_with_key, ok, psql,
                      set_protector, sql_path)

LOG_SECONDS = 2


@pytest.fixture
def backup_kagi(tmp_path):
    """A private server on a test clock: log backups every two seconds, full backups hourly."""
    env = {
        "KAGI_SQL_LOG_BACKUP_SECONDS": str(LOG_SECONDS),
        "KAGI_SQL_FULL_BACKUP_SECONDS": "3600",
        "KAGI_SQL_KEY_POLL_SECONDS": "1",
        "KAGI_SQL_KEEPER_TICK_SECONDS": "1",
    }
    srv = _start_server(tmp_path, "sqlbak", env=env, extra_args=["--test-clock"])
    try:
        srv.put_rg(DEFAULT_RG)
        yield srv
    finally:
        srv.stop()


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def backups(srv, server, db):
    return ok(arm(srv, "GET", sql_path(srv, server, f"/databases/{db}/backups")))


def wait_new_backup(srv, server, db, seen, committed_at=None):
    """Waits for a backup beyond the `seen` first ones (the only writer being the test, it holds
    what was committed before); returns the newest. With `committed_at` (this machine's
    time.time() after a commit, the clock not moved) the newest must also have been taken in a
    later second: a pass that was already copying when the test committed is listed after `seen`
    was counted and yet holds nothing of the commit."""
    def newer():
        v = backups(srv, server, db)["value"]
        if committed_at is not None and v:
            t = calendar.timegm(time.strptime(v[-1]["properties"]["backupTime"], "%Y-%m-%dT%H:%M:%SZ"))
            if t <= int(committed_at):
                return None
        return v if len(v) > seen else None
    return wait_for(f"backup #{seen + 1} of {db}", newer, timeout=60)[-1]


def restore(srv, server, source, new, point):
    body = {"location": LOCATION, "properties": {
        "createMode": "PointInTimeRestore",
        "sourceDatabaseId": sql_path(srv, server, f"/databases/{source}"),
        "restorePointInTime": point}}
    return arm(srv, "PUT", sql_path(srv, server, f"/databases/{new}"), body)


def insert_batch(srv, server, db, batch, n=25):
    """One transaction of `n` rows marked with the batch."""
    values = ",".join(f"('KAGI-PITR-{batch}-{i:03}')" for i in range(n))
    psql(srv, server, db, f"INSERT INTO t (v) VALUES {values}")


def batches_in(srv, server, db):
    with connect(srv, server, db) as c:
        rows = [r[0] for r in c.execute("SELECT v FROM t ORDER BY v").fetchall()]
    return sorted({r.split("-")[2] for r in rows}), len(rows)


def after_second_of(stamp):
    """Sleeps until the platform second of `stamp` (RFC 3339) is over (the clock not moved)."""
    t = calendar.timegm(time.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ"))
    while time.time() < t + 1.05:
        time.sleep(0.05)


def first_full_backup(srv, server, db):
    """Waits for a new database's first backup (a full one, taken before anything is written);
    from then on, every write the test waits for lands in the next backup."""
    first = wait_new_backup(srv, server, db, 0)
    assert first["properties"]["backupType"] == "Full", first
    return 1


def kagi_sql(srv, *args):
    """`kagi sql …` against the server, its JSON output."""
    cmd = [str(KAGI_BIN), "sql", *args, "-g", DEFAULT_RG, "--server", srv.base, "--data-dir", str(srv.data_dir),
           "--output", "json"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def backup_files(srv):
    return [p for p in (srv.data_dir / "sql-backups").rglob("*") if p.is_file()]


# --------------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------------


def test_log_backups_restore_to_a_point_between_batches_and_hold_no_plaintext(backup_kagi):
    srv = backup_kagi
    server, _ = create_server(srv, identity=False)
    db, _ = create_db(srv, server)
    seen = first_full_backup(srv, server, db)
    # The table, then each batch, in a backup of its own before the next write.
    psql(srv, server, db, "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
    wait_new_backup(srv, server, db, seen)
    seen += 1
    points = {}
    for batch in ("B1", "B2", "B3"):
        insert_batch(srv, server, db, batch)
        newest = wait_new_backup(srv, server, db, seen)
        seen += 1
        points[batch] = newest["properties"]["backupTime"]
        assert newest["properties"]["backupType"] == "Log", newest
        # The next batch is committed after this backup's second.
        after_second_of(points[batch])

    listed = backups(srv, server, db)
    kinds = [b["properties"]["backupType"] for b in listed["value"]]
    assert kinds[0] == "Full" and kinds.count("Log") >= 3, kinds
    for b in listed["value"]:
        p = b["properties"]
        assert p["serverKeyType"] == "ServiceManaged" and p["rangeStart"] <= p["rangeEnd"], b
    assert listed["earliestRestoreDate"] <= points["B1"] <= listed["latestRestoreDate"], listed
    # Azure's field on the database itself.
    got = ok(arm(srv, "GET", sql_path(srv, server, f"/databases/{db}")))
    assert got["properties"]["earliestRestoreDate"] == listed["earliestRestoreDate"], got

    # A restore to the point after batch 2: batches 1 and 2, not 3, in a new database.
    r = restore(srv, server, db, "pitr2", points["B2"])
    assert r.status_code in (200, 201), r.text
    restored = r.json()
    assert restored["properties"]["status"] == "Online"
    source = ok(arm(srv, "GET", sql_path(srv, server, f"/databases/{db}")))
    assert restored["properties"]["databaseId"] != source["properties"]["databaseId"]
    assert batches_in(srv, server, "pitr2") == (["B1", "B2"], 50)
    # The original is untouched, and both take writes.
    assert batches_in(srv, server, db) == (["B1", "B2", "B3"], 75)
    psql(srv, server, "pitr2", "INSERT INTO t (v) VALUES ('KAGI-PITR-NEW-000')")
    assert batches_in(srv, server, "pitr2") == (["B1", "B2", "NEW"], 51)
    # Other points: after batch 1, and the latest.
    assert ok(restore(srv, server, db, "pitr1", points["B1"]))["properties"]["status"] == "Online"
    assert batches_in(srv, server, "pitr1") == (["B1"], 25)
    ok(restore(srv, server, db, "pitr3", listed["latestRestoreDate"]))
    assert batches_in(srv, server, "pitr3") == (["B1", "B2", "B3"], 75)

    # The CLI lists the backups and restores.
    listed_cli = kagi_sql(srv, "db", "list-backups", "-s", server, "-n", db)["value"]
    assert [b["name"] for b in listed_cli] == [b["name"] for b in listed["value"]]
    made = kagi_sql(srv, "db", "restore", "-s", server, "-n", "clipitr", "--source", db, "--time", points["B1"])
    assert made["properties"]["status"] == "Online"
    assert batches_in(srv, server, "clipitr") == (["B1"], 25)

    # Points outside the backups are 400s, and create nothing.
    r = restore(srv, server, db, "tooearly", "2001-01-01T00:00:00Z")
    assert r.status_code == 400 and r.json()["error"]["code"] == "InvalidRestorePointInTime", r.text
    r = restore(srv, server, db, "future", "2999-01-01T00:00:00Z")
    assert r.status_code == 400 and r.json()["error"]["code"] == "InvalidRestorePointInTime", r.text
    names = [d["name"] for d in ok(arm(srv, "GET", sql_path(srv, server, "/databases")))["value"]]
    assert sorted(names) == sorted([db, "pitr1", "pitr2", "pitr3", "clipitr"]), names

    # The backups' files hold none of the rows: only ciphertext under the database's key.
    files = backup_files(srv)
    assert any(f.name.startswith("full-") for f in files) and any(f.name.startswith("log-") for f in files)
    for f in files:
        data = f.read_bytes()
        assert b"KAGI-PITR" not in data and b"SQLite format 3" not in data, f
    # No restore left its work behind.
    assert not list((srv.data_dir / "sql-restore").glob("*"))


def cmk_database_with_a_table(srv):
    """A server whose protector is a customer key, a database of it with table `t`, backed up:
    (server, its body, vault, key client, key, database, backups seen)."""
    server, body = create_server(srv)
    vault, keys, key = key_vault_with_key(srv)
    grant(srv, vault, body["identity"]["principalId"])
    ok(set_protector(srv, server, key.id))
    db, _ = create_db(srv, server)
    seen = first_full_backup(srv, server, db)
    psql(srv, server, db, "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
    wait_new_backup(srv, server, db, seen)
    return server, body, vault, keys, key, db, seen + 1


def test_a_rotation_between_backups_and_a_restore_that_needs_a_disabled_key(backup_kagi):
    srv = backup_kagi
    server, body, vault, keys, key, db, seen = cmk_database_with_a_table(srv)

    insert_batch(srv, server, db, "A")
    newest = wait_new_backup(srv, server, db, seen)
    seen += 1
    assert newest["properties"]["keyUri"] == key.id, newest
    after_second_of(newest["properties"]["backupTime"])

    # A new key version becomes the protector: only the DEK's wrap changes; old backups keep
    # theirs.
    rotated = keys.create_rsa_key(key.name, size=3072)
    ok(set_protector(srv, server, rotated.id))
    insert_batch(srv, server, db, "B")
    newest = wait_new_backup(srv, server, db, seen)
    point_b = newest["properties"]["backupTime"]
    listed = backups(srv, server, db)["value"]
    old = [b for b in listed if b["properties"]["keyUri"] == key.id]
    new = [b for b in listed if b["properties"]["keyUri"] == rotated.id]
    assert old and new and len(old) + len(new) == len(listed), listed
    assert old[0]["properties"]["backupType"] == "Full"
    assert old[0]["properties"]["thumbprint"] != new[0]["properties"]["thumbprint"]
    in_use = ok(arm(srv, "GET", sql_path(srv, server, "/backupKeys")))["value"]
    assert sorted(k["properties"]["uri"] for k in in_use) == sorted([key.id, rotated.id]), in_use

    # Across the rotation: each backup's DEK unwrapped with its own key.
    ok(restore(srv, server, db, "across", point_b))
    assert batches_in(srv, server, "across") == (["A", "B"], 50)

    # The old version disabled: a restore that needs it fails with Azure's error, naming the
    # server, the time range and the key, and nothing is created.
    keys.update_key_properties(key.name, key.properties.version, enabled=False)
    # The DEK the "across" restore just unwrapped under it stays cached until the next key poll
    # (KAGI_SQL_KEY_POLL_SECONDS=1) sees the version disabled: the bound of a revocation.
    time.sleep(3)
    r = restore(srv, server, db, "needsold", point_b)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "MissingKeyVaultUriForRestore", err
    assert server in err["message"] and key.id in err["message"], err
    assert err["message"].startswith(f"Target server '{server}' doesn't have access to all AKV URIs created between"), err
    assert old[0]["properties"]["backupTime"] in err["message"], err
    assert arm(srv, "GET", sql_path(srv, server, "/databases/needsold")).status_code == 404
    # The source database is unaffected (its DEK is wrapped under the new version only).
    assert batches_in(srv, server, db) == (["A", "B"], 50)

    # A full backup under the new version (the clock moved past the full backup interval):
    # restores after it need only the new version.
    after_second_of(point_b)
    advance_clock(srv, 3601)
    wait_for("a full backup under the new version", lambda: any(
        b["properties"]["backupType"] == "Full" and b["properties"]["keyUri"] == rotated.id
        for b in backups(srv, server, db)["value"]), timeout=60)
    seen = len(backups(srv, server, db)["value"])
    insert_batch(srv, server, db, "C")
    newest = wait_new_backup(srv, server, db, seen)
    ok(restore(srv, server, db, "afterrot", newest["properties"]["backupTime"]))
    assert batches_in(srv, server, "afterrot") == (["A", "B", "C"], 75)
    # The old version back: the old points restore again.
    keys.update_key_properties(key.name, key.properties.version, enabled=True)
    ok(restore(srv, server, db, "oldagain", point_b))
    assert batches_in(srv, server, "oldagain") == (["A", "B"], 50)


def test_a_restore_onto_another_server_opens_the_backups_with_its_identity(backup_kagi):
    """A point-in-time restore onto another server than the source's (the way back when a
    server's home node is lost for good, docs/SEVERAL_NODES.md): backups under a customer key
    are unwrapped with the identity of the server restored onto, which must have access to that
    key, as in Azure; refused with MissingKeyVaultUriForRestore naming that server and the key
    until it has. The new database is under the target server's own protector."""
    from conftest import update_vault_properties

    srv = backup_kagi
    server, body, vault, keys, key, db, seen = cmk_database_with_a_table(srv)
    insert_batch(srv, server, db, "A")
    point = wait_new_backup(srv, server, db, seen)["properties"]["backupTime"]
    assert backups(srv, server, db)["value"][-1]["properties"]["keyUri"] == key.id

    other, other_body = create_server(srv)
    request = {"location": LOCATION, "properties": {
        "createMode": "PointInTimeRestore",
        "sourceDatabaseId": sql_path(srv, server, f"/databases/{db}"),
        "restorePointInTime": point}}
    # The other server's identity has no access to the key yet.
    r = arm(srv, "PUT", sql_path(srv, other, "/databases/noaccess"), request)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "MissingKeyVaultUriForRestore", err
    assert err["message"].startswith(f"Target server '{other}' doesn't have access"), err
    assert key.id in err["message"], err
    assert arm(srv, "GET", sql_path(srv, other, "/databases/noaccess")).status_code == 404
    # Given access (the source server keeps its own), the restore is made on the other server.
    policies = [{"tenantId": srv.tenant_id, "objectId": oid,
                 "permissions": {"keys": ["get", "list", "wrapKey", "unwrapKey"]}}
                for oid in (body["identity"]["principalId"], other_body["identity"]["principalId"])]
    r = update_vault_properties(srv, vault, accessPolicies=policies, enablePurgeProtection=True,
                                enableSoftDelete=True)
    assert r.status_code in (200, 201), r.text
    ok(arm(srv, "PUT", sql_path(srv, other, "/databases/moved"), request), 201)
    assert batches_in(srv, other, "moved") == (["A"], 25)
    # Under the other server's protector (service-managed): its backups say so.
    wait_new_backup(srv, other, "moved", 0)
    assert backups(srv, other, "moved")["value"][0]["properties"]["serverKeyType"] == "ServiceManaged"
    # The source is untouched.
    assert batches_in(srv, server, db) == (["A"], 25)


def test_kill_9_during_backups_with_a_writer_running_leaves_restorable_backups(tmp_path):
    env = {"KAGI_SQL_LOG_BACKUP_SECONDS": str(LOG_SECONDS), "KAGI_SQL_FULL_BACKUP_SECONDS": "3600"}
    srv = _start_server(tmp_path, "sqlbakkill", env=env, extra_args=["--test-clock"])
    try:
        srv.put_rg(DEFAULT_RG)
        server, _ = create_server(srv, identity=False)
        db, _ = create_db(srv, server)
        psql(srv, server, db, "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
        wait_for("a full backup", lambda: backups(srv, server, db)["value"], timeout=60)
        committed, stop, errors = [0], threading.Event(), []

        def write():
            try:
                with connect(srv, server, db) as c:
                    i = 0
                    while not stop.is_set():
                        i += 1
                        c.execute("INSERT INTO t (id, v) VALUES (%s, %s)", (i, "KAGI-PITR-W-" + "x" * 500))
                        committed[0] = i
            except psycopg.Error as e:
                errors.append(e)

        t = threading.Thread(target=write)
        t.start()
        seen = len(backups(srv, server, db)["value"])
        # Passes keep copying while the writer runs; kill -9 lands wherever they are.
        wait_for("log backups while writing", lambda: len(backups(srv, server, db)["value"]) >= seen + 3, timeout=60)
        time.sleep(LOG_SECONDS * 0.7)
        srv.kill9()
        # The writer stops by itself, at its first statement after the kill (setting `stop`
        # first could let it leave between two statements without meeting the dead server).
        t.join(30)
        stop.set()
        assert errors, "the writer should have lost its server"
        srv.start()

        listed = wait_for("backups listed after the restart", lambda: backups(srv, server, db), timeout=30)
        last = listed["value"][-1]["properties"]["backupTime"]
        # A pass after the start removes what the killed one left half-written.
        wait_for("no half-written backup", lambda: not any(f.name.endswith(".partial") for f in backup_files(srv)),
                 timeout=30)
        r = restore(srv, server, db, "afterkill", last)
        assert r.status_code in (200, 201), r.text
        with connect(srv, server, "afterkill") as c:
            ids = [row[0] for row in c.execute("SELECT id FROM t ORDER BY id").fetchall()]
        # A prefix of the committed rows, nothing partial.
        assert ids and ids == list(range(1, len(ids) + 1)) and len(ids) <= committed[0] + 1, (len(ids), committed)
        with connect(srv, server, db) as c:
            total = c.execute("SELECT count(*) FROM t").fetchone()[0]
        assert total >= committed[0]

        # Backups go on after the restart: a new row reaches a restore.
        seen = len(backups(srv, server, db)["value"])
        psql(srv, server, db, "INSERT INTO t (id, v) VALUES (1000000, 'KAGI-PITR-AFTER')")
        committed_at = time.time()
        # A second row in a later second: some backup is then taken in a later second than the
        # first row's commit (a backup is taken only when there is something new).
        while time.time() < int(committed_at) + 1.05:
            time.sleep(0.05)
        psql(srv, server, db, "INSERT INTO t (id, v) VALUES (1000001, 'KAGI-PITR-AFTER')")
        newest = wait_new_backup(srv, server, db, seen, committed_at=committed_at)
        ok(restore(srv, server, db, "later", newest["properties"]["backupTime"]))
        with connect(srv, server, "later") as c:
            n, first = c.execute("SELECT count(*), sum(CASE WHEN id = 1000000 THEN 1 ELSE 0 END) FROM t WHERE id <= 1000000").fetchone()
        assert first == 1 and n == total + 1, (n, first, total)
    finally:
        srv.stop()


def test_backups_in_a_bucket_restore_after_the_local_files_are_lost(tmp_path):
    """With `--blobs s3://…` every backup file is in the bucket before its record: with the
    server's own backup files gone (a replaced disk), a point-in-time restore fetches the chain
    from the bucket. No object holds the rows in the clear."""
    import os
    import shutil
    import uuid

    from conftest import S3Bucket

    url = os.environ.get("KAGI_TEST_S3_BLOBS")
    if not url:
        if os.environ.get("KAGI_REQUIRE_S3") == "1":
            pytest.fail("KAGI_REQUIRE_S3=1 but KAGI_TEST_S3_BLOBS is not set")
        pytest.skip("no S3 server: set KAGI_TEST_S3_BLOBS and AWS_* (scripts/test.sh does)")
    blobs = f"{url.rstrip('/')}/sqlbak-{uuid.uuid4().hex}"
    env = {
        "KAGI_SQL_LOG_BACKUP_SECONDS": str(LOG_SECONDS),
        "KAGI_SQL_FULL_BACKUP_SECONDS": "3600",
    }
    srv = _start_server(tmp_path, "sqlbucket", env=env, extra_args=["--blobs", blobs])
    try:
        srv.put_rg(DEFAULT_RG)
        server, _ = create_server(srv, identity=False)
        db, _ = create_db(srv, server)
        seen = first_full_backup(srv, server, db)
        psql(srv, server, db, "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
        insert_batch(srv, server, db, "B1")
        newest = wait_new_backup(srv, server, db, seen)
        point = newest["properties"]["backupTime"]
        keys = S3Bucket.from_url(blobs).list("sql-backups")
        local = sorted(str(p.relative_to(srv.data_dir / "sql-backups")) for p in backup_files(srv))
        assert local and set(local) <= set(keys), (local, keys)
        bucket = S3Bucket.from_url(blobs)
        for k in keys:
            assert b"KAGI-PITR" not in bucket.get(f"sql-backups/{k}"), k
        # The server's own copies are lost.
        shutil.rmtree(srv.data_dir / "sql-backups")
        r = restore(srv, server, db, "frombucket", point)
        assert r.status_code in (200, 201), r.text
        assert batches_in(srv, server, "frombucket") == (["B1"], 25)
    finally:
        srv.stop()
