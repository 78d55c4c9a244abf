"""SQL servers and databases with transparent data encryption (`Microsoft.Sql`) end to end: servers,
databases, server keys and the TDE protector over ARM; the databases used with real psql and psycopg
over the PostgreSQL protocol with TLS (the server chosen by SNI); the protector switched and rotated
while a client writes; revocation driving Azure's Inaccessible state machine on a test clock.
"""

import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import psycopg
import pytest

from conftest import DEFAULT_RG, advance_clock, wait_for, KAGI_BIN, LOCATION, _start_server, random_name, update_vault_properties

SQL_API = "2023-08-01"
ADMIN = "kagiadmin"
PASSWORD = "Str0ng!Passw0rd"


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def sql_path(srv, server, rest="", rg=DEFAULT_RG):
    return f"/subscriptions/{srv.subscription_id}/resourceGroups/{rg}/providers/Microsoft.Sql/servers/{server}{rest}"


def arm(srv, method, path, body=None):
    return srv.request(method, srv.arm(path, SQL_API), json=body)


def ok(r, *codes):
    assert r.status_code in (codes or (200, 201)), f"{r.status_code} {r.text[:1000]}"
    return r.json() if r.text else None


def create_server(srv, name=None, identity=True, extra=None):
    name = name or random_name("sql", 10).lower()
    body = {"location": LOCATION, "properties": {"administratorLogin": ADMIN, "administratorLoginPassword": PASSWORD}}
    if identity:
        body["identity"] = {"type": "SystemAssigned"}
    body["properties"].update(extra or {})
    return name, ok(arm(srv, "PUT", sql_path(srv, name), body))


def create_db(srv, server, name=None):
    name = name or random_name("db", 8)
    db = ok(arm(srv, "PUT", sql_path(srv, server, f"/databases/{name}"), {"location": LOCATION}))
    assert db["properties"]["status"] == "Online", db
    return name, db


def key_vault_with_key(srv, size=3072):
    vault = srv.create_vault(purge_protection=True)
    keys = srv.key_client(vault.url)
    key = keys.create_rsa_key(random_name("tde", 10), size=size)
    return vault, keys, key


def grant(srv, vault, object_id):
    policies = [{"tenantId": srv.tenant_id, "objectId": object_id,
                 "permissions": {"keys": ["get", "list", "wrapKey", "unwrapKey"]}}]
    r = update_vault_properties(srv, vault, accessPolicies=policies, enablePurgeProtection=True,
                                enableSoftDelete=True)
    assert r.status_code in (200, 201), r.text


def server_key_name(kid):
    host, _, path = kid.removeprefix("https://").partition("/")
    _, name, version = path.split("/")
    return f"{host.split('.')[0]}_{name}_{version}"


def set_protector(srv, server, kid, auto=False):
    name = server_key_name(kid)
    ok(arm(srv, "PUT", sql_path(srv, server, f"/keys/{name}"),
           {"properties": {"serverKeyType": "AzureKeyVault", "uri": kid}}))
    return arm(srv, "PUT", sql_path(srv, server, "/encryptionProtector/current"),
               {"properties": {"serverKeyType": "AzureKeyVault", "serverKeyName": name, "autoRotationEnabled": auto}})


def conninfo(srv, server, db, user=ADMIN, password=PASSWORD):
    return (f"host={server}.localhost port={srv.sql_port} dbname={db} user={user} password={password} "
            f"sslmode=verify-full sslrootcert={srv.ca_path} connect_timeout=10")


def connect(srv, server, db, **kw):
    return psycopg.connect(conninfo(srv, server, db, **kw), autocommit=True)


def psql(srv, server, db, sql, check=True):
    env = dict(os.environ, PGPASSWORD=PASSWORD)
    cmd = ["psql", f"host={server}.localhost port={srv.sql_port} dbname={db} user={ADMIN} "
           f"sslmode=verify-full sslrootcert={srv.ca_path}", "-X", "-v", "ON_ERROR_STOP=1", "-c", sql]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
    if check:
        assert p.returncode == 0, f"psql failed: {p.stderr}"
    return p


def db_status(srv, server, db):
    return ok(arm(srv, "GET", sql_path(srv, server, f"/databases/{db}")))["properties"]["status"]


def files_under(root: Path):
    return [p for p in root.rglob("*") if p.is_file()]


@pytest.fixture
def sql_kagi(tmp_path):
    """A private server whose SQL keeper probes every second, on a test clock."""
    env = {
        "KAGI_SQL_KEY_POLL_SECONDS": "1",
        "KAGI_SQL_KEEPER_TICK_SECONDS": "1",
        "KAGI_SQL_INACCESSIBLE_AFTER_SECONDS": "600",
        "KAGI_SQL_HEAL_WINDOW_SECONDS": "1800",
    }
    srv = _start_server(tmp_path, "sql", env=env, extra_args=["--test-clock"])
    try:
        srv.put_rg(DEFAULT_RG)
        yield srv
    finally:
        srv.stop()


# --------------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------------


def test_psql_and_psycopg_on_a_service_managed_database_leave_only_ciphertext(kagi, tmp_path):
    srv = kagi
    srv.put_rg(DEFAULT_RG)
    server, body = create_server(srv, identity=False)
    assert body["properties"]["fullyQualifiedDomainName"] == f"{server}.localhost"
    assert "administratorLoginPassword" not in body["properties"]
    db, _ = create_db(srv, server)
    tde = ok(arm(srv, "GET", sql_path(srv, server, f"/databases/{db}/transparentDataEncryption/current")))
    assert tde["properties"]["state"] == "Enabled"
    protector = ok(arm(srv, "GET", sql_path(srv, server, "/encryptionProtector/current")))
    assert protector["properties"]["serverKeyType"] == "ServiceManaged"

    marker = "KAGI-SQL-PLAINTEXT-" + random_name("m", 8)
    psql(srv, server, db, "CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT NOT NULL)")
    with connect(srv, server, db) as c:
        with c.cursor() as cur:
            cur.executemany("INSERT INTO notes (body) VALUES (%s)", [(f"{marker}-{i}",) for i in range(2000)])
            cur.execute("SELECT count(*), min(body) FROM notes WHERE body LIKE %s", (marker + "%",))
            n, first = cur.fetchone()
    assert n == 2000 and first.startswith(marker)
    out = psql(srv, server, db, r"\dt").stdout
    assert "notes" in out, out
    # Nothing on disk holds the marker, and the sqlite3 shell cannot read the database.
    for f in files_under(srv.data_dir):
        assert marker.encode() not in f.read_bytes(), f
    dbfiles = [f for f in files_under(srv.data_dir / "sql") if f.suffix == ".db"]
    assert dbfiles, "no database file"
    if shutil.which("sqlite3"):
        p = subprocess.run(["sqlite3", str(dbfiles[0]), "SELECT count(*) FROM notes"], capture_output=True, text=True)
        assert p.returncode != 0, p.stdout
    # A wrong password and a missing database get PostgreSQL's errors.
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        connect(srv, server, db, password="Wrong!Passw0rd")
    with pytest.raises(psycopg.OperationalError, match="does not exist"):
        connect(srv, server, "nosuchdb")


def test_bad_sql_requests_get_azure_errors(kagi):
    srv = kagi
    srv.put_rg(DEFAULT_RG)
    r = arm(srv, "PUT", sql_path(srv, "Bad_Name"), {"location": LOCATION, "properties": {
        "administratorLogin": ADMIN, "administratorLoginPassword": PASSWORD}})
    assert r.status_code == 400 and "InvalidServerName" in r.text, r.text
    r = arm(srv, "PUT", sql_path(srv, random_name("s", 8).lower()), {"location": LOCATION, "properties": {
        "administratorLogin": ADMIN, "administratorLoginPassword": "weak"}})
    assert r.status_code == 400 and "PasswordNotComplex" in r.text, r.text
    server, _ = create_server(srv, identity=False)
    # The same name again, elsewhere: server names are host names.
    srv.put_rg("rg-other")
    r = arm(srv, "PUT", sql_path(srv, server, rg="rg-other"), {"location": LOCATION, "properties": {
        "administratorLogin": ADMIN, "administratorLoginPassword": PASSWORD}})
    assert r.status_code == 409 and "NameAlreadyExists" in r.text, r.text
    # A customer key needs an identity.
    vault, keys, key = key_vault_with_key(srv)
    r = arm(srv, "PUT", sql_path(srv, server, f"/keys/{server_key_name(key.id)}"),
            {"properties": {"serverKeyType": "AzureKeyVault", "uri": key.id}})
    assert r.status_code == 400 and r.json()["error"]["code"] == "AzureKeyVaultNoServerIdentity", r.text
    r = arm(srv, "PUT", sql_path(srv, server, "/encryptionProtector/current"),
            {"properties": {"serverKeyType": "AzureKeyVault", "serverKeyName": "kv_nokey_1"}})
    assert r.status_code == 404 and "ServerKeyNotFound" in r.text, r.text
    db, _ = create_db(srv, server)
    r = arm(srv, "PUT", sql_path(srv, server, f"/databases/{db}/transparentDataEncryption/current"),
            {"properties": {"state": "Disabled"}})
    assert r.status_code == 400, r.text
    r = arm(srv, "PUT", sql_path(srv, server, "/databases/master"), {"location": LOCATION})
    assert r.status_code == 400, r.text


def test_protector_rules_td1(kagi):
    srv = kagi
    srv.put_rg(DEFAULT_RG)
    server, body = create_server(srv)
    principal = body["identity"]["principalId"]
    # RSA 4096 is not a TDE protector.
    vault, keys, big = key_vault_with_key(srv, size=4096)
    grant(srv, vault, principal)
    r = arm(srv, "PUT", sql_path(srv, server, f"/keys/{server_key_name(big.id)}"),
            {"properties": {"serverKeyType": "AzureKeyVault", "uri": big.id}})
    assert r.status_code == 400 and "AzureKeyVaultRsaKeyNotSupported" in r.text, r.text
    # Without the permission.
    vault2, keys2, key2 = key_vault_with_key(srv)
    r = arm(srv, "PUT", sql_path(srv, server, f"/keys/{server_key_name(key2.id)}"),
            {"properties": {"serverKeyType": "AzureKeyVault", "uri": key2.id}})
    assert r.status_code == 400 and "AzureKeyVaultMissingPermissions" in r.text, r.text
    # An older version is refused once a newer one exists.
    grant(srv, vault2, principal)
    newer = keys2.create_rsa_key(key2.name, size=3072)
    r = arm(srv, "PUT", sql_path(srv, server, f"/keys/{server_key_name(key2.id)}"),
            {"properties": {"serverKeyType": "AzureKeyVault", "uri": key2.id}})
    assert r.status_code == 400 and "NotLatestVersion" in r.text, r.text
    # A disabled key.
    keys2.update_key_properties(key2.name, newer.properties.version, enabled=False)
    r = arm(srv, "PUT", sql_path(srv, server, f"/keys/{server_key_name(newer.id)}"),
            {"properties": {"serverKeyType": "AzureKeyVault", "uri": newer.id}})
    assert r.status_code == 400 and "AzureKeyVaultKeyDisabled" in r.text, r.text
    # A vault without purge protection.
    plain_vault = srv.create_vault(purge_protection=False)
    plain_key = srv.key_client(plain_vault.url).create_rsa_key(random_name("tde", 8), size=2048)
    r = arm(srv, "PUT", sql_path(srv, server, f"/keys/{server_key_name(plain_key.id)}"),
            {"properties": {"serverKeyType": "AzureKeyVault", "uri": plain_key.id}})
    assert r.status_code == 400 and "PurgeProtection" in r.text, r.text


def writer(srv, server, db, stop, errors, counter):
    """Inserts rows in a loop on one connection until `stop` is set; errors are collected."""
    try:
        with connect(srv, server, db) as c:
            with c.cursor() as cur:
                cur.execute("CREATE TABLE IF NOT EXISTS w (id INTEGER PRIMARY KEY, v TEXT)")
                while not stop.is_set():
                    cur.execute("INSERT INTO w (v) VALUES (%s)", ("row",))
                    counter[0] += 1
    except Exception as e:  # noqa: BLE001 - any failure of the client fails the test
        errors.append(repr(e))


def test_switch_to_customer_key_and_rotation_while_a_client_writes(sql_kagi):
    srv = sql_kagi
    server, body = create_server(srv)
    db, _ = create_db(srv, server)
    vault, keys, key = key_vault_with_key(srv)
    grant(srv, vault, body["identity"]["principalId"])
    stop, errors, counter = threading.Event(), [], [0]
    t = threading.Thread(target=writer, args=(srv, server, db, stop, errors, counter))
    t.start()
    try:
        wait_for("rows written", lambda: counter[0] > 20)
        # SMK -> CMK: one re-wrap per database, online.
        started = time.monotonic()
        p = ok(set_protector(srv, server, key.id, auto=True))
        switch_s = time.monotonic() - started
        assert p["properties"]["serverKeyType"] == "AzureKeyVault"
        assert p["properties"]["uri"] == key.id
        before = counter[0]
        wait_for("rows after the switch", lambda: counter[0] > before + 20)
        # A new version is followed by the keeper (autoRotationEnabled).
        rotated = keys.create_rsa_key(key.name, size=3072)
        wait_for("protector on the new version", lambda: ok(arm(
            srv, "GET", sql_path(srv, server, "/encryptionProtector/current")))["properties"]["uri"] == rotated.id)
        before = counter[0]
        wait_for("rows after the rotation", lambda: counter[0] > before + 20)
    finally:
        stop.set()
        t.join(30)
    assert not errors, errors
    assert switch_s < 30
    # Only the newest version's record remains: the old version no longer matters.
    keys.update_key_properties(key.name, key.properties.version, enabled=False)
    srv.stop()
    srv.start()
    with connect(srv, server, db) as c:
        n = c.execute("SELECT count(*) FROM w").fetchone()[0]
    assert n >= counter[0] - 1
    log = ok(arm(srv, "GET", sql_path(srv, server, "/activityLog")))["value"]
    assert any("encryptionProtector" in e.get("operationName", "") for e in log), log


def test_revocation_makes_databases_inaccessible_and_healing_follows_azure(sql_kagi):
    srv = sql_kagi
    server, body = create_server(srv)
    db, _ = create_db(srv, server)
    vault, keys, key = key_vault_with_key(srv)
    grant(srv, vault, body["identity"]["principalId"])
    ok(set_protector(srv, server, key.id))
    ok(arm(srv, "PATCH", sql_path(srv, server, f"/databases/{db}"), {"tags": {"team": "payments"}}))
    with connect(srv, server, db) as c:
        c.execute("CREATE TABLE kept (v TEXT)")
        c.execute("INSERT INTO kept VALUES ('before revocation')")
    session = connect(srv, server, db)

    # 1. The key is disabled: after the bound the database is Inaccessible, sessions are cut,
    #    new connections get 40613.
    keys.update_key_properties(key.name, key.properties.version, enabled=False)
    time.sleep(2.5)  # the keeper sees the failure; the bound has not passed
    assert db_status(srv, server, db) == "Online"
    # The revocation cannot be escaped by moving the databases' keys away meanwhile.
    r = arm(srv, "PUT", sql_path(srv, server, "/encryptionProtector/current"),
            {"properties": {"serverKeyType": "ServiceManaged", "serverKeyName": "ServiceManaged"}})
    assert r.status_code == 400 and "AzureKeyVaultKeyInaccessible" in r.text, r.text
    p = ok(arm(srv, "GET", sql_path(srv, server, "/encryptionProtector/current")))
    assert p["properties"]["serverKeyType"] == "AzureKeyVault"
    advance_clock(srv, 601)
    wait_for("Inaccessible", lambda: db_status(srv, server, db) == "Inaccessible")
    with pytest.raises(psycopg.OperationalError, match="is not currently available"):
        connect(srv, server, db)
    with pytest.raises(psycopg.Error):
        session.execute("SELECT 1")
    listed = ok(arm(srv, "GET", sql_path(srv, server, "/inaccessibleDatabases")))["value"]
    assert [d["name"] for d in listed] == [db]
    health_path = sql_path(srv, server, f"/databases/{db}/providers/Microsoft.ResourceHealth/availabilityStatuses/current")
    health = ok(srv.request("GET", srv.arm(health_path, "2022-10-01")))["properties"]
    assert health["availabilityState"] == "Unavailable" and "KeyDisabled" in health["summary"], health
    # Only drop is allowed meanwhile.
    r = arm(srv, "PATCH", sql_path(srv, server, f"/databases/{db}"), {"tags": {"a": "b"}})
    assert r.status_code == 409, r.text

    # 2. Back within 30 minutes: online again by itself.
    advance_clock(srv, 600)
    keys.update_key_properties(key.name, key.properties.version, enabled=True)
    wait_for("Online again", lambda: db_status(srv, server, db) == "Online")
    health = ok(srv.request("GET", srv.arm(health_path, "2022-10-01")))["properties"]
    assert health["availabilityState"] == "Available", health
    with connect(srv, server, db) as c:
        assert c.execute("SELECT v FROM kept").fetchone()[0] == "before revocation"

    # 3. Back after 30 minutes: it stays Inaccessible until revalidate.
    keys.update_key_properties(key.name, key.properties.version, enabled=False)
    time.sleep(2.5)  # the keeper sees the failure first; the bound counts from then
    advance_clock(srv, 601)
    wait_for("Inaccessible again", lambda: db_status(srv, server, db) == "Inaccessible")
    advance_clock(srv, 1801)
    keys.update_key_properties(key.name, key.properties.version, enabled=True)
    time.sleep(3)
    assert db_status(srv, server, db) == "Inaccessible"
    # Its settings are kept until then (it healed by itself within the window above).
    assert ok(arm(srv, "GET", sql_path(srv, server, f"/databases/{db}")))["tags"] == {"team": "payments"}
    ok(arm(srv, "POST", sql_path(srv, server, "/encryptionProtector/current/revalidate")), 200, 202, 204)
    assert db_status(srv, server, db) == "Online"
    # Back after the window: as in Azure, its tags (and point-in-time restore history) are lost.
    assert not ok(arm(srv, "GET", sql_path(srv, server, f"/databases/{db}")))["tags"]
    with connect(srv, server, db) as c:
        assert c.execute("SELECT v FROM kept").fetchone()[0] == "before revocation"
    ops = [e.get("operationName") for e in ok(arm(srv, "GET", sql_path(srv, server, "/activityLog")))["value"]]
    assert ops.count("MakeDatabaseInaccessible") == 2, ops
    assert ops.count("MakeDatabaseAccessible") == 2, ops


def test_committed_rows_survive_kill_9(tmp_path):
    srv = _start_server(tmp_path, "sqlkill")
    try:
        srv.put_rg(DEFAULT_RG)
        server, _ = create_server(srv, identity=False)
        db, _ = create_db(srv, server)
        with connect(srv, server, db) as c:
            c.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
            for i in range(50):
                c.execute("INSERT INTO t (v) VALUES (%s)", (f"committed-{i}",))
        open_tx = psycopg.connect(conninfo(srv, server, db))
        open_tx.execute("INSERT INTO t (v) VALUES ('uncommitted')")
        srv.proc.kill()
        srv.proc.wait(10)
        # What a create cut short by the crash would leave: a file no database names.
        orphan = srv.data_dir / "sql" / "0f0f0f0f-0000-4000-8000-000000000000.db"
        orphan.write_bytes(os.urandom(8192))
        srv.start()
        with connect(srv, server, db) as c:
            rows = [r[0] for r in c.execute("SELECT v FROM t ORDER BY id").fetchall()]
        assert rows == [f"committed-{i}" for i in range(50)]
        wait_for("the orphan removed", lambda: not orphan.exists())
    finally:
        srv.stop()


def test_the_kagi_cli_manages_servers_databases_and_protectors(kagi):
    srv = kagi
    srv.put_rg(DEFAULT_RG)
    name = random_name("cli", 8).lower()

    def cli(*args):
        cmd = [str(KAGI_BIN), *args, "--server", srv.base, "--data-dir", str(srv.data_dir), "--output", "json"]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                           env=dict(os.environ, KAGI_SQL_ADMIN_PASSWORD=PASSWORD))
        assert p.returncode == 0, p.stderr
        return json.loads(p.stdout) if p.stdout.strip() else None

    s = cli("sql", "server", "create", "-n", name, "-g", DEFAULT_RG, "-u", ADMIN, "--assign-identity")
    assert s["properties"]["administratorLogin"] == ADMIN
    d = cli("sql", "db", "create", "-s", name, "-g", DEFAULT_RG, "-n", "appdb")
    assert d["properties"]["status"] == "Online"
    vault, keys, key = key_vault_with_key(srv)
    grant(srv, vault, s["identity"]["principalId"])
    p = cli("sql", "tde-key", "set", "-s", name, "-g", DEFAULT_RG, "--kid", key.id)
    assert p["properties"]["serverKeyType"] == "AzureKeyVault"
    listed = cli("sql", "key", "list", "-s", name, "-g", DEFAULT_RG)["value"]
    assert {k["properties"]["serverKeyType"] for k in listed} == {"ServiceManaged", "AzureKeyVault"}
    p = cli("sql", "tde-key", "set", "-s", name, "-g", DEFAULT_RG, "--server-key-type", "ServiceManaged")
    assert p["properties"]["serverKeyType"] == "ServiceManaged"
    with connect(srv, name, "appdb") as c:
        assert c.execute("SELECT 1 + 1").fetchone()[0] == 2
    cli("sql", "db", "delete", "-s", name, "-g", DEFAULT_RG, "-n", "appdb")
    cli("sql", "server", "delete", "-n", name, "-g", DEFAULT_RG)
    assert not (srv.data_dir / "sql" / f"{d['properties']['databaseId']}.db").exists()


def test_a_restart_opens_every_database_with_one_unwrap_each(tmp_path):
    """TD-9: after a restart each database's key is unwrapped once, before clients ask, and
    clients then cost the key vault nothing. (The keeper's hourly probe is out of the way.)"""
    srv = _start_server(tmp_path, "sqlopen", env={"KAGI_SQL_KEY_POLL_SECONDS": "3600"})
    try:
        restart_opens_each_database_once(srv)
    finally:
        srv.stop()


def restart_opens_each_database_once(srv):
    srv.put_rg(DEFAULT_RG)
    server, body = create_server(srv)
    principal = body["identity"]["principalId"]
    vault, keys, key = key_vault_with_key(srv)
    grant(srv, vault, principal)
    ok(set_protector(srv, server, key.id))
    dbs = [create_db(srv, server)[0] for _ in range(6)]
    audit = srv.data_dir / "audit" / "audit.jsonl"

    def unwraps():
        n = 0
        for line in audit.read_text().splitlines():
            if '"KeyUnwrap"' in line and principal in line:
                n += 1
        return n

    srv.stop()
    before = unwraps()
    srv.start()
    # The log holds both starts; the second one's line says the databases are open.
    wait_for("databases opened", lambda: srv.log_path.read_text(errors="replace").count("SQL databases opened") >= 2)
    assert unwraps() - before == len(dbs)
    for db in dbs:
        with connect(srv, server, db) as c:
            assert c.execute("SELECT 1").fetchone()[0] == 1
    assert unwraps() - before == len(dbs)


def test_policy_sql_servers_should_use_customer_managed_keys(kagi):
    """TD-8: the built-in policy with Audit (reported), Deny (refused) and Disabled (ignored),
    assigned at a resource group of its own."""
    srv = kagi
    rg = "rg-sql-policy"
    srv.put_rg(rg)
    scope = f"/subscriptions/{srv.subscription_id}/resourceGroups/{rg}"
    assignment = f"{scope}/providers/Microsoft.Authorization/policyAssignments/sqlcmk"
    definition = "/providers/Microsoft.Authorization/policyDefinitions/kagi-sql-servers-cmk"

    def assign(effect):
        body = {"properties": {"policyDefinitionId": definition, "parameters": {"effect": {"value": effect}}}}
        ok(srv.request("PUT", srv.arm(assignment, "2023-04-01"), json=body))

    def states():
        r = srv.request("POST", srv.arm(f"{scope}/providers/Microsoft.PolicyInsights/policyStates/latest/queryResults",
                                        "2019-10-01"))
        return {row["resourceId"].rsplit("/", 1)[-1]: row["complianceState"] for row in ok(r)["value"]}

    body = {"location": LOCATION, "identity": {"type": "SystemAssigned"},
            "properties": {"administratorLogin": ADMIN, "administratorLoginPassword": PASSWORD}}
    try:
        assign("Audit")
        audited = random_name("pa", 8).lower()
        server = ok(arm(srv, "PUT", sql_path(srv, audited, rg=rg), body))
        assert states()[audited] == "NonCompliant"
        vault, keys, key = key_vault_with_key(srv)
        grant(srv, vault, server["identity"]["principalId"])
        name = server_key_name(key.id)
        ok(arm(srv, "PUT", sql_path(srv, audited, f"/keys/{name}", rg=rg),
               {"properties": {"serverKeyType": "AzureKeyVault", "uri": key.id}}))
        ok(arm(srv, "PUT", sql_path(srv, audited, "/encryptionProtector/current", rg=rg),
               {"properties": {"serverKeyType": "AzureKeyVault", "serverKeyName": name}}))
        assert states()[audited] == "Compliant"

        assign("Deny")
        r = arm(srv, "PUT", sql_path(srv, random_name("pd", 8).lower(), rg=rg), body)
        assert r.status_code == 403 and "RequestDisallowedByPolicy" in r.text, r.text
        # Back to the service-managed key is refused too; the protector stays.
        r = arm(srv, "PUT", sql_path(srv, audited, "/encryptionProtector/current", rg=rg),
                {"properties": {"serverKeyType": "ServiceManaged", "serverKeyName": "ServiceManaged"}})
        assert r.status_code == 403 and "RequestDisallowedByPolicy" in r.text, r.text
        p = ok(arm(srv, "GET", sql_path(srv, audited, "/encryptionProtector/current", rg=rg)))
        assert p["properties"]["serverKeyType"] == "AzureKeyVault"

        assign("Disabled")
        ok(arm(srv, "PUT", sql_path(srv, random_name("px", 8).lower(), rg=rg), body))
    finally:
        srv.request("DELETE", srv.arm(assignment, "2023-04-01"))


def test_the_entra_administrator_signs_in_with_an_access_token(kagi):
    """A server's Entra administrator (properties.administrators) connects with an access token of
    this platform as the password; another principal's token, or a token as the password of a SQL
    login, is refused; with azureADOnlyAuthentication SQL logins are refused."""
    import base64

    srv = kagi
    srv.put_rg(DEFAULT_RG)
    token = srv.credential.get_token(srv.scope).token
    payload = token.split(".")[1]
    oid = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["oid"]
    admins = {"administratorType": "ActiveDirectory", "login": "kagi-admins", "sid": oid,
              "tenantId": srv.tenant_id}
    server, body = create_server(srv, identity=False, extra={"administrators": admins})
    assert body["properties"]["administrators"]["login"] == "kagi-admins"
    db, _ = create_db(srv, server)
    with connect(srv, server, db, user="kagi-admins", password=token) as c:
        assert c.execute("SELECT 40 + 2").fetchone()[0] == 42
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        connect(srv, server, db, user="kagi-admins", password=token[:-4] + "AAAA")
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        connect(srv, server, db, user=ADMIN, password=token)
    # Entra only: the SQL administrator's password no longer works.
    admins["azureADOnlyAuthentication"] = True
    ok(arm(srv, "PATCH", sql_path(srv, server), {"properties": {"administrators": admins}}))
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        connect(srv, server, db)
    with connect(srv, server, db, user="kagi-admins", password=token) as c:
        assert c.execute("SELECT 1").fetchone()[0] == 1
