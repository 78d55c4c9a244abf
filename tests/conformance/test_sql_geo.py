"""Geo-replication of SQL databases (TD-7) end to end: a geo-secondary on another logical server
needs the primary's TDE protector (the same key material), reads the same rows through psycopg
and psql while the primary keeps writing, refuses writes, shows its lag, survives kill -9 of kagi,
fails over (planned, with nothing lost, then forced) and leaves its link, standing alone, when its
partner becomes inaccessible.
"""

import json
import subprocess
import threading
import time

import psycopg
import pytest

from conftest import DEFAULT_RG, KAGI_BIN, LOCATION, _start_server, advance_clock, random_name, update_vault_properties, wait_for
from test_sql import ADMIN, arm, connect, create_db, create_server, db_status, files_under, key_vault_with_key, ok, psql, server_key_name, set_protector, sql_path

OTHER_LOCATION = "northeurope"


@pytest.fixture
def geo_kagi(tmp_path):
    """A private server shipping every geo link's log every second, on a test clock."""
    env = {
        "KAGI_SQL_GEO_SECONDS": "1",
        "KAGI_SQL_KEY_POLL_SECONDS": "1",
        "KAGI_SQL_KEEPER_TICK_SECONDS": "1",
        "KAGI_SQL_LOG_BACKUP_SECONDS": "2",
    }
    srv = _start_server(tmp_path, "geo", env=env, extra_args=["--test-clock"])
    try:
        srv.put_rg(DEFAULT_RG)
        yield srv
    finally:
        srv.stop()


def grant_all(srv, vault, object_ids):
    policies = [{"tenantId": srv.tenant_id, "objectId": o,
                 "permissions": {"keys": ["get", "list", "wrapKey", "unwrapKey"]}} for o in object_ids]
    r = update_vault_properties(srv, vault, accessPolicies=policies, enablePurgeProtection=True,
                                enableSoftDelete=True)
    assert r.status_code in (200, 201), r.text


def add_server_key(srv, server, kid):
    ok(arm(srv, "PUT", sql_path(srv, server, f"/keys/{server_key_name(kid)}"),
           {"properties": {"serverKeyType": "AzureKeyVault", "uri": kid}}))


def create_secondary(srv, server, primary_server, db):
    source = sql_path(srv, primary_server, f"/databases/{db}")
    return arm(srv, "PUT", sql_path(srv, server, f"/databases/{db}"),
               {"location": OTHER_LOCATION, "properties": {"createMode": "Secondary", "sourceDatabaseId": source,
                                                           "secondaryType": "Geo"}})


def links(srv, server, db):
    return ok(arm(srv, "GET", sql_path(srv, server, f"/databases/{db}/replicationLinks")))["value"]


def count(srv, server, db, table="t"):
    with connect(srv, server, db) as c:
        return c.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


def rows(srv, server, db):
    with connect(srv, server, db) as c:
        return c.execute("SELECT v, body FROM t ORDER BY v").fetchall()


def caught_up(srv, server, db, want):
    try:
        return count(srv, server, db) == want
    except psycopg.Error:
        return False


def linked_pair(srv):
    """A primary with a customer-managed protector and a geo-secondary in another region."""
    primary, pbody = create_server(srv)
    secondary, sbody = create_server(srv, extra=None)
    vault, keys, key = key_vault_with_key(srv)
    grant_all(srv, vault, [pbody["identity"]["principalId"]])
    ok(set_protector(srv, primary, key.id))
    db, _ = create_db(srv, primary)
    with connect(srv, primary, db) as c:
        c.execute("CREATE TABLE t (v INTEGER PRIMARY KEY, body TEXT)")
        c.execute("INSERT INTO t VALUES (1, 'GEO-PLAINTEXT-ROW-0001')")
    return primary, secondary, sbody, vault, keys, key, db, pbody


def test_a_geo_secondary_follows_its_primary_fails_over_and_loses_nothing(geo_kagi):
    srv = geo_kagi
    primary, secondary, sbody, vault, keys, key, db, pbody = linked_pair(srv)

    # The secondary's server must reach the same key material.
    r = create_secondary(srv, secondary, primary, db)
    assert r.status_code == 400 and r.json()["error"]["code"] == "SameKeyMaterialNotFoundOnRemoteServer", r.text
    grant_all(srv, vault, [pbody["identity"]["principalId"], sbody["identity"]["principalId"]])
    r = create_secondary(srv, secondary, primary, db)
    assert r.status_code == 400 and r.json()["error"]["code"] == "SameKeyMaterialNotFoundOnRemoteServer", r.text
    add_server_key(srv, secondary, key.id)
    # Azure's other rules: the same name, another server, a database that exists.
    r = arm(srv, "PUT", sql_path(srv, secondary, "/databases/othername"),
            {"location": OTHER_LOCATION, "properties": {"createMode": "Secondary",
                                                        "sourceDatabaseId": sql_path(srv, primary, f"/databases/{db}")}})
    assert r.status_code == 400 and r.json()["error"]["code"] == "InvalidSecondaryDatabaseName", r.text
    r = create_secondary(srv, primary, primary, db)
    assert r.status_code == 409, r.text  # the primary's own name exists there
    made = ok(create_secondary(srv, secondary, primary, db), 201)
    assert made["properties"]["secondaryType"] == "Geo"
    # A database in a link keeps its server's protector.
    r = srv.request("PATCH", srv.arm(sql_path(srv, primary, f"/databases/{db}"), "2024-05-01-preview"),
                    json={"properties": {"encryptionProtector": key.id}})
    assert r.status_code == 400 and r.json()["error"]["code"] == "GeoReplicationOfDatabaseKeyNotSupported", r.text
    r = create_secondary(srv, secondary, primary, db)
    assert r.status_code == 409, r.text

    wait_for("seeded", lambda: links(srv, secondary, db)[0]["properties"]["replicationState"] == "CATCH_UP")
    link = links(srv, secondary, db)[0]
    assert link["properties"]["role"] == "Secondary" and link["properties"]["partnerServer"] == primary
    assert link["properties"]["linkType"] == "GEO" and link["properties"]["partnerRole"] == "Primary"
    plink = links(srv, primary, db)[0]
    assert plink["name"] == link["name"] and plink["properties"]["role"] == "Primary"
    wait_for("first row on the secondary", lambda: caught_up(srv, secondary, db, 1))

    # The primary keeps writing; the secondary follows, and reads only.
    stop, errors, n = threading.Event(), [], [1]

    def writer():
        try:
            with connect(srv, primary, db) as c:
                while not stop.is_set():
                    n[0] += 1
                    c.execute("INSERT INTO t VALUES (%s, %s)", (n[0], f"GEO-PLAINTEXT-ROW-{n[0]:04d}"))
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))

    t = threading.Thread(target=writer)
    t.start()
    try:
        wait_for("rows", lambda: n[0] > 300)
        with connect(srv, secondary, db) as c:
            seen = c.execute("SELECT count(*) FROM t").fetchone()[0]
            assert seen >= 1
            with pytest.raises(psycopg.Error) as e:
                c.execute("INSERT INTO t VALUES (-1, 'no')")
            assert e.value.sqlstate == "25006", e.value
        out = psql(srv, secondary, db, "SELECT count(*) FROM t")
        assert out.stdout.strip()
    finally:
        stop.set()
        t.join(30)
    assert not errors, errors
    total = n[0]
    wait_for("the secondary caught up", lambda: caught_up(srv, secondary, db, total), timeout=60)
    assert rows(srv, secondary, db) == rows(srv, primary, db)
    lag = links(srv, secondary, db)[0]["properties"]
    assert lag["lastReplicatedTime"] and lag["replicationLagSeconds"] is not None and lag["replicationLagSeconds"] < 60, lag

    # Only ciphertext was shipped and stored.
    for f in files_under(srv.data_dir):
        assert b"GEO-PLAINTEXT-ROW" not in f.read_bytes(), f

    # kill -9 of kagi: the link resumes, nothing is lost.
    srv.restart(hard=True)
    with connect(srv, primary, db) as c:
        c.execute("INSERT INTO t VALUES (100000, 'after the restart')")
    wait_for("the secondary after the restart", lambda: caught_up(srv, secondary, db, total + 1), timeout=60)

    # A planned failover: everything the primary committed is on the new primary.
    with connect(srv, primary, db) as c:
        c.execute("INSERT INTO t VALUES (100001, 'just before the failover')")
    lid = link["name"]
    r = arm(srv, "POST", sql_path(srv, secondary, f"/databases/{db}/replicationLinks/{lid}/failover"))
    done = ok(r, 200, 202)
    assert done["properties"]["role"] == "Primary", done
    assert count(srv, secondary, db) == total + 2
    with connect(srv, secondary, db) as c:
        c.execute("INSERT INTO t VALUES (100002, 'on the new primary')")
    # The old primary is seeded again from the new one, then reads only.
    wait_for("old primary seeded", lambda: links(srv, primary, db)[0]["properties"]["replicationState"] == "CATCH_UP",
             timeout=60)
    wait_for("old primary follows", lambda: caught_up(srv, primary, db, total + 3), timeout=60)
    with connect(srv, primary, db) as c:
        with pytest.raises(psycopg.Error):
            c.execute("INSERT INTO t VALUES (-2, 'no')")

    # A forced failover back.
    r = arm(srv, "POST", sql_path(srv, primary, f"/databases/{db}/replicationLinks/{lid}/forceFailoverAllowDataLoss"))
    assert ok(r, 200, 202)["properties"]["role"] == "Primary"
    with connect(srv, primary, db) as c:
        c.execute("INSERT INTO t VALUES (100003, 'primary again')")
    wait_for("secondary seeded again", lambda: links(srv, secondary, db)[0]["properties"]["replicationState"] == "CATCH_UP",
             timeout=60)
    wait_for("secondary follows again", lambda: caught_up(srv, secondary, db, total + 4), timeout=60)

    # The link removed: both stand alone and take writes.
    ok(arm(srv, "DELETE", sql_path(srv, primary, f"/databases/{db}/replicationLinks/{lid}")), 200, 204)
    assert links(srv, primary, db) == [] and links(srv, secondary, db) == []
    for s in (primary, secondary):
        with connect(srv, s, db) as c:
            c.execute("INSERT INTO t VALUES (200000, 'standalone')")
    ops = [e.get("operationName", "") for e in ok(arm(srv, "GET", sql_path(srv, secondary, "/activityLog")))["value"]]
    assert any("replicationLinks/failover" in o for o in ops), ops


def test_a_database_that_becomes_inaccessible_leaves_its_link(geo_kagi):
    srv = geo_kagi
    primary, secondary, sbody, vault, keys, key, db, pbody = linked_pair(srv)
    grant_all(srv, vault, [pbody["identity"]["principalId"], sbody["identity"]["principalId"]])
    add_server_key(srv, secondary, key.id)
    ok(create_secondary(srv, secondary, primary, db), 201)
    wait_for("first row on the secondary", lambda: caught_up(srv, secondary, db, 1), timeout=60)
    # The primary's protector is disabled: after the bound the primary is Inaccessible, and
    # both databases leave the link; the secondary, whose own protector works, stands alone.
    keys.update_key_properties(key.name, key.properties.version, enabled=False)
    time.sleep(2.5)
    advance_clock(srv, 601)
    wait_for("primary inaccessible", lambda: db_status(srv, primary, db) == "Inaccessible")
    wait_for("link gone", lambda: links(srv, secondary, db) == [])
    assert links(srv, primary, db) == []
    assert db_status(srv, secondary, db) == "Online"
    with connect(srv, secondary, db) as c:
        c.execute("INSERT INTO t VALUES (2, 'standalone after the partner went')")
        assert c.execute("SELECT count(*) FROM t").fetchone()[0] == 2


def test_the_kagi_cli_makes_a_replica_and_fails_over(geo_kagi):
    srv = geo_kagi

    def cli(*args):
        cmd = [str(KAGI_BIN), *args, "--server", srv.base, "--data-dir", str(srv.data_dir), "--output", "json"]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        return json.loads(p.stdout) if p.stdout.strip() else None

    primary, _ = create_server(srv, identity=False)
    secondary, _ = create_server(srv, identity=False)
    db, _ = create_db(srv, primary)
    with connect(srv, primary, db) as c:
        c.execute("CREATE TABLE t (v INTEGER PRIMARY KEY, body TEXT)")
        c.execute("INSERT INTO t VALUES (1, 'one')")
    made = cli("sql", "db", "replica", "create", "-s", primary, "-g", DEFAULT_RG, "-n", db,
               "--partner-server", secondary)
    assert made["properties"]["secondaryType"] == "Geo"
    wait_for("seeded", lambda: cli("sql", "db", "replica", "list-links", "-s", secondary, "-g", DEFAULT_RG,
                                   "-n", db)["value"][0]["properties"]["replicationState"] == "CATCH_UP")
    wait_for("row on the secondary", lambda: caught_up(srv, secondary, db, 1))
    link = cli("sql", "db", "replica", "set-primary", "-s", secondary, "-g", DEFAULT_RG, "-n", db)
    assert link["properties"]["role"] == "Primary"
    with connect(srv, secondary, db) as c:
        c.execute("INSERT INTO t VALUES (2, 'two')")
    wait_for("old primary follows", lambda: caught_up(srv, primary, db, 2), timeout=60)
    cli("sql", "db", "replica", "delete-link", "-s", primary, "-g", DEFAULT_RG, "-n", db)
    assert cli("sql", "db", "replica", "list-links", "-s", primary, "-g", DEFAULT_RG, "-n", db)["value"] == []
