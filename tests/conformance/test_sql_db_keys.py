"""Database-level customer-managed keys (Azure SQL's 2024-05-01-preview fields): a database with
its own user-assigned identity and its own `encryptionProtector`, checked with that identity,
re-wrapped online, probed by the keeper on its own (the database alone becomes Inaccessible when
its key goes, and comes back), reverted to the server's protector; its backups remember its key.
"""

import time

import psycopg
import pytest

from conftest import DEFAULT_RG, LOCATION, _start_server, advance_clock, random_name, update_vault_properties, wait_for
from test_sql import arm, connect, create_db, create_server, db_status, key_vault_with_key, ok, sql_path

DB_API = "2024-05-01-preview"


@pytest.fixture
def keys_kagi(tmp_path):
    env = {
        "KAGI_SQL_KEY_POLL_SECONDS": "1",
        "KAGI_SQL_KEEPER_TICK_SECONDS": "1",
        "KAGI_SQL_LOG_BACKUP_SECONDS": "1",
    }
    srv = _start_server(tmp_path, "dbkeys", env=env, extra_args=["--test-clock"])
    try:
        srv.put_rg(DEFAULT_RG)
        yield srv
    finally:
        srv.stop()


def user_identity(srv):
    r = srv.request("PUT", srv.arm(
        f"/subscriptions/{srv.subscription_id}/resourceGroups/{DEFAULT_RG}/providers/Microsoft.ManagedIdentity/"
        f"userAssignedIdentities/{random_name('ua', 10)}", "2023-01-31"), json={"location": LOCATION})
    assert r.status_code in (200, 201), r.text
    return r.json()


def grant(srv, vault, object_ids):
    policies = [{"tenantId": srv.tenant_id, "objectId": o,
                 "permissions": {"keys": ["get", "list", "wrapKey", "unwrapKey"]}} for o in object_ids]
    r = update_vault_properties(srv, vault, accessPolicies=policies, enablePurgeProtection=True, enableSoftDelete=True)
    assert r.status_code in (200, 201), r.text


def db_put(srv, server, db, body):
    return srv.request("PUT", srv.arm(sql_path(srv, server, f"/databases/{db}"), DB_API), json=body)


def db_get(srv, server, db):
    return ok(srv.request("GET", srv.arm(sql_path(srv, server, f"/databases/{db}"), DB_API)))


def test_a_database_with_its_own_key(keys_kagi):
    srv = keys_kagi
    server, _ = create_server(srv, identity=False)
    other, _ = create_db(srv, server)
    ua = user_identity(srv)
    vault, keys, key = key_vault_with_key(srv)
    identity = {"type": "UserAssigned", "userAssignedIdentities": {ua["id"]: {}}}

    # The identity must reach the key: refused until it is granted; nothing is created.
    r = db_put(srv, server, "owndb", {"location": LOCATION, "identity": identity,
                                       "properties": {"encryptionProtector": key.id}})
    assert r.status_code == 400 and r.json()["error"]["code"] == "AzureKeyVaultMissingPermissions", r.text
    r = srv.request("GET", srv.arm(sql_path(srv, server, "/databases/owndb"), DB_API))
    assert r.status_code == 404, r.text
    # A key without an identity, a system-assigned identity: refused.
    r = db_put(srv, server, "owndb", {"location": LOCATION, "properties": {"encryptionProtector": key.id}})
    assert r.status_code == 400 and r.json()["error"]["code"] == "AzureKeyVaultNoDatabaseIdentity", r.text
    r = db_put(srv, server, "owndb", {"location": LOCATION, "identity": {"type": "SystemAssigned"},
                                       "properties": {"encryptionProtector": key.id}})
    assert r.status_code == 400, r.text

    grant(srv, vault, [ua["properties"]["principalId"]])
    made = ok(db_put(srv, server, "owndb", {"location": LOCATION, "identity": identity,
                                             "properties": {"encryptionProtector": key.id,
                                                            "keys": {key.id: {}}}}), 201)
    assert made["properties"]["encryptionProtector"] == key.id
    assert made["identity"]["type"] == "UserAssigned"
    assert made["identity"]["userAssignedIdentities"][ua["id"]]["principalId"] == ua["properties"]["principalId"]
    assert made["properties"]["keys"][key.id]["thumbprint"]
    with connect(srv, server, "owndb") as c:
        c.execute("CREATE TABLE t (v TEXT)")
        c.execute("INSERT INTO t VALUES ('under its own key')")
    # The server's own protector is unchanged; its other database is not under the key.
    p = ok(arm(srv, "GET", sql_path(srv, server, "/encryptionProtector/current")))
    assert p["properties"]["serverKeyType"] == "ServiceManaged"

    # Rotation: a new version becomes the database's protector (re-wrap only, online).
    session = connect(srv, server, "owndb")
    rotated = keys.create_rsa_key(key.name, size=3072)
    ok(db_put(srv, server, "owndb", {"location": LOCATION, "properties": {"encryptionProtector": rotated.id}}), 200)
    session.execute("INSERT INTO t VALUES ('after the rotation')")
    assert db_get(srv, server, "owndb")["properties"]["encryptionProtector"] == rotated.id

    # The database's key disabled: after the bound this database alone is Inaccessible.
    keys.update_key_properties(key.name, rotated.properties.version, enabled=False)
    time.sleep(2.5)
    # The revocation cannot be escaped by moving the database's key away meanwhile.
    r = srv.request("POST", srv.arm(sql_path(srv, server, "/databases/owndb/encryptionProtector/current/revert"), DB_API))
    assert r.status_code == 400 and r.json()["error"]["code"] == "AzureKeyVaultKeyInaccessible", r.text
    advance_clock(srv, 601)
    wait_for("Inaccessible", lambda: db_status(srv, server, "owndb") == "Inaccessible")
    assert db_status(srv, server, other) == "Online"
    with pytest.raises(psycopg.OperationalError, match="is not currently available"):
        connect(srv, server, "owndb")
    # Back within the heal window: online by itself, nothing lost.
    keys.update_key_properties(key.name, rotated.properties.version, enabled=True)
    wait_for("Online", lambda: db_status(srv, server, "owndb") == "Online")
    with connect(srv, server, "owndb") as c:
        assert [r[0] for r in c.execute("SELECT v FROM t ORDER BY rowid")] == ["under its own key", "after the rotation"]
    r = arm(srv, "POST", sql_path(srv, server, "/databases/owndb/encryptionProtector/current/revalidate"))
    assert r.status_code in (200, 202, 204), r.text

    # Revert: back under the server's protector; the key no longer matters to it.
    reverted = ok(srv.request("POST", srv.arm(sql_path(srv, server, "/databases/owndb/encryptionProtector/current/revert"), DB_API)))
    assert "encryptionProtector" not in reverted["properties"] or reverted["properties"]["encryptionProtector"] is None
    keys.update_key_properties(key.name, rotated.properties.version, enabled=False)
    srv.stop()
    srv.start()
    with connect(srv, server, "owndb") as c:
        assert c.execute("SELECT count(*) FROM t").fetchone()[0] == 2
    # Its backups remember the keys they were taken under, its own among them.
    wait_for("backups", lambda: ok(arm(srv, "GET", sql_path(srv, server, "/databases/owndb/backups")))["value"])
    backups = ok(arm(srv, "GET", sql_path(srv, server, "/databases/owndb/backups")))["value"]
    assert backups, backups


def test_the_kagi_cli_gives_a_database_its_own_key(keys_kagi):
    import json
    import subprocess

    from conftest import KAGI_BIN

    srv = keys_kagi

    def cli(*args):
        cmd = [str(KAGI_BIN), *args, "--server", srv.base, "--data-dir", str(srv.data_dir), "--output", "json"]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        return json.loads(p.stdout) if p.stdout.strip() else None

    server, _ = create_server(srv, identity=False)
    ua = user_identity(srv)
    vault, keys, key = key_vault_with_key(srv)
    grant(srv, vault, [ua["properties"]["principalId"]])
    made = cli("sql", "db", "create", "-s", server, "-g", DEFAULT_RG, "-n", "clidb",
               "--user-assigned-identity-id", ua["id"], "--encryption-protector", key.id)
    assert made["properties"]["encryptionProtector"] == key.id
    plain = cli("sql", "db", "create", "-s", server, "-g", DEFAULT_RG, "-n", "plain")
    assert not plain["properties"].get("encryptionProtector")
    rotated = keys.create_rsa_key(key.name, size=3072)
    moved = cli("sql", "db", "tde-key", "set", "-s", server, "-g", DEFAULT_RG, "-n", "clidb",
                "--encryption-protector", rotated.id)
    assert moved["properties"]["encryptionProtector"] == rotated.id
    cli("sql", "db", "tde-key", "revalidate", "-s", server, "-g", DEFAULT_RG, "-n", "clidb")
    reverted = cli("sql", "db", "tde-key", "revert", "-s", server, "-g", DEFAULT_RG, "-n", "clidb")
    assert not reverted["properties"].get("encryptionProtector")
    with connect(srv, server, "clidb") as c:
        assert c.execute("SELECT 6 * 7").fetchone()[0] == 42
