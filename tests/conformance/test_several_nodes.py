"""Several kagi nodes on one PostgreSQL store (issue 14, docs/SEVERAL_NODES.md).

Two nodes share a scratch database on the test PostgreSQL (KAGI_TEST_POSTGRES_URL, which
scripts/test.sh starts with scripts/postgres.sh) and a copy of one root key and TLS CA. What one
node writes, the other serves: vaults, keys, secrets, access policies. A revoked grant is
refused on the other node within the change feed's bound, which the test measures and prints.
"""

import os
import shutil
import time

import pytest
from azure.core.exceptions import HttpResponseError, ResourceNotFoundError
from azure.keyvault.keys.crypto import KeyWrapAlgorithm

from conftest import (
    DEFAULT_RG,
    _start_server,
    create_sp,
    random_name,
    scratch_pg_database,
    sp_credential,
)

# Each test starts nodes of its own, in the main pass; not again in the passes that run the
# session server on PostgreSQL, S3 or as several nodes (scripts/test.sh), whose `-k` expressions
# (`test_sql`, `test_disks`, …) match some of these tests' names.
pytestmark = pytest.mark.skipif(
    any(os.environ.get(v) for v in ("KAGI_CONFORMANCE_NODES", "KAGI_CONFORMANCE_POSTGRES", "KAGI_CONFORMANCE_BLOBS")),
    reason="starts nodes of its own: runs in the main pass",
)

# A notification reaches the other node at once; the re-check (1 s) covers a lost one.
BOUND_S = 5.0


def pg_server_url() -> str:
    url = os.environ.get("KAGI_TEST_POSTGRES_URL")
    if not url:
        if os.environ.get("KAGI_REQUIRE_POSTGRES") == "1":
            pytest.fail("KAGI_REQUIRE_POSTGRES=1 but KAGI_TEST_POSTGRES_URL is not set")
        pytest.skip("no PostgreSQL: set KAGI_TEST_POSTGRES_URL (scripts/test.sh does)")
    return url


def start_nodes(tmp_path, count=2, extra_args=None, env=None):
    """Node 1 initialises the store; the others get a copy of its root key, CA and admin file."""
    store = scratch_pg_database(pg_server_url())
    args = ["--store", store, *(extra_args or [])]
    first = _start_server(tmp_path, "node1", args, env=env)
    nodes = [first]
    for i in range(2, count + 1):
        data = tmp_path / f"node{i}-data"
        data.mkdir(mode=0o700)
        shutil.copy2(first.data_dir / "root.key", data / "root.key")
        shutil.copytree(first.data_dir / "tls", data / "tls")
        shutil.copy2(first.admin_path, data / "bootstrap-admin.json")
        nodes.append(_start_server(tmp_path, f"node{i}", args, env=env))
    return store, nodes


def until(check, bound=BOUND_S):
    """Polls `check` until it returns a true value; returns (value, seconds taken)."""
    start = time.monotonic()
    while True:
        try:
            got = check()
        except (ResourceNotFoundError, HttpResponseError):
            got = None
        if got:
            return got, time.monotonic() - start
        if time.monotonic() - start > bound:
            pytest.fail(f"not seen on the other node within {bound} s")
        time.sleep(0.02)


def test_two_nodes_serve_one_store(tmp_path):
    _, (n1, n2) = start_nodes(tmp_path)
    try:
        n1.put_rg(DEFAULT_RG)
        vault = n1.create_vault()
        # The vault made on node 1 is served by node 2 (its own URL, its own port).
        r, took_vault = until(lambda: n2.get_vault(vault.name).status_code == 200)
        k1 = n1.key_client(n1.vault_url(vault.name))
        k2 = n2.key_client(n2.vault_url(vault.name))
        key = k1.create_rsa_key(random_name("k", 10), size=2048)
        seen, took_key = until(lambda: k2.get_key(key.name))
        assert seen.id.rsplit("/", 1)[-1] == key.id.rsplit("/", 1)[-1]
        # Wrapped on node 2, unwrapped on node 1, and the other way round.
        cek = os.urandom(32)
        wrapped = n2.crypto_client(seen).wrap_key(KeyWrapAlgorithm.rsa_oaep_256, cek)
        assert n1.crypto_client(key).unwrap_key(KeyWrapAlgorithm.rsa_oaep_256, wrapped.encrypted_key).key == cek
        # A rotation on node 2 is node 1's current version.
        rotated = k2.rotate_key(key.name)
        _, took_rotation = until(lambda: k1.get_key(key.name).properties.version == rotated.properties.version)
        # Secrets: set on one, read on the other; deleted on the other, gone on the first.
        s1 = n1.secret_client(n1.vault_url(vault.name))
        s2 = n2.secret_client(n2.vault_url(vault.name))
        s2.set_secret("shared", "from node 2")
        got, took_secret = until(lambda: s1.get_secret("shared"))
        assert got.value == "from node 2"
        s1.begin_delete_secret("shared").wait()
        until(lambda: n2.request("GET", n2.vault_url(vault.name) + "secrets/shared?api-version=7.4").status_code == 404)
        print(
            f"\nseen on the other node after: vault {took_vault * 1000:.0f} ms, key "
            f"{took_key * 1000:.0f} ms, rotation {took_rotation * 1000:.0f} ms, secret "
            f"{took_secret * 1000:.0f} ms"
        )
        # Each node keeps its own audit chain; `kagi audit verify --node-dir …` checks them all.
        for n in (n1, n2):
            n.stop()
        import json
        import subprocess

        from conftest import KAGI_BIN

        out = subprocess.run(
            [str(KAGI_BIN), "--output", "json", "audit", "verify",
             "--node-dir", str(n1.data_dir), "--node-dir", str(n2.data_dir)],
            capture_output=True, text=True, check=True, timeout=60,
        ).stdout
        report = json.loads(out)
        assert report["ok"] and len(report["logs"]) == 2, report
        assert all(log["records"] > 0 for log in report["logs"]), report
        assert report["records"] == sum(log["records"] for log in report["logs"])
    finally:
        for n in (n1, n2):
            n.stop()


def test_a_grant_revoked_on_one_node_is_refused_on_the_other(tmp_path):
    _, (n1, n2) = start_nodes(tmp_path)
    try:
        n1.put_rg(DEFAULT_RG)
        sp = create_sp(n1)
        policy = {
            "tenantId": n1.tenant_id,
            "objectId": sp["objectId"],
            "permissions": {"keys": ["get", "wrapKey", "unwrapKey"], "secrets": [], "certificates": []},
        }
        vault = n1.create_vault(accessPolicies=[policy])
        key = n1.key_client(n1.vault_url(vault.name)).create_rsa_key(random_name("k", 10), size=2048)
        # The service principal, with a token from node 2, reads the key on node 2.
        sp_keys = n2.key_client(n2.vault_url(vault.name), credential=sp_credential(n2, sp))
        until(lambda: sp_keys.get_key(key.name))
        # Node 1 removes the grant; node 2 refuses the next requests within the bound.
        path = n1.vault_path(DEFAULT_RG, vault.name) + "/accessPolicies/remove"
        r = n1.request("PUT", n1.arm(path), json={"properties": {"accessPolicies": [policy]}})
        assert r.status_code in (200, 201), r.text
        revoked_at = time.monotonic()

        def refused():
            try:
                sp_keys.get_key(key.name)
                return False
            except HttpResponseError as e:
                return e.status_code == 403

        while not refused():
            assert time.monotonic() - revoked_at < BOUND_S, "the revoked grant still works on node 2"
            time.sleep(0.01)
        took = time.monotonic() - revoked_at
        print(f"\nrevoked on node 1, refused on node 2 after {took * 1000:.0f} ms")
    finally:
        for n in (n1, n2):
            n.stop()


ANSI = __import__("re").compile(r"\x1b\[[0-9;]*m")


def holds(node, lease):
    """Whether `node`'s log says it took `lease` (and has not lost it since)."""
    text = ANSI.sub("", node.log_path.read_text(errors="replace"))
    took = text.rfind(f'took the lease: running here lease="{lease}"')
    if took < 0:
        took = text.rfind(f"took the lease: running here lease={lease}")
    lost = text.rfind(f'lost the lease: stopped here lease="{lease}"')
    return took >= 0 and took > lost


def test_singleton_work_runs_on_one_node_and_moves_when_it_dies(tmp_path):
    lease_ms = 1500
    _, nodes = start_nodes(tmp_path, count=3, env={"KAGI_LEASE_MS": str(lease_ms)})
    try:
        for lease in ("rotation", "purge", "event-delivery"):
            _, _ = until(lambda: sum(holds(n, lease) for n in nodes) == 1, bound=lease_ms / 1000 * 3)
        holder = next(n for n in nodes if holds(n, "rotation"))
        others = [n for n in nodes if n is not holder]
        holder.proc.kill()  # kill -9: no release, the lease must expire
        holder.proc.wait(10)
        killed_at = time.monotonic()
        new_holder, _ = until(
            lambda: next((n for n in others if holds(n, "rotation")), None), bound=lease_ms / 1000 * 4
        )
        took = time.monotonic() - killed_at
        assert sum(holds(n, "rotation") for n in others) == 1
        print(f"\nrotation lease ({lease_ms} ms) moved to another node {took * 1000:.0f} ms after kill -9")
        # A clean stop gives its leases up at once.
        new_holder.stop()
        stopped_at = time.monotonic()
        last = next(n for n in others if n is not new_holder)
        until(lambda: holds(last, "rotation"), bound=lease_ms / 1000 * 4)
        print(f"after a clean stop: {(time.monotonic() - stopped_at) * 1000:.0f} ms")
        new_holder.start()
        # The survivors still serve.
        new_holder.put_rg(DEFAULT_RG)
        v = new_holder.create_vault()
        k = new_holder.key_client(new_holder.vault_url(v.name)).create_ec_key("after-kill")
        other = next(n for n in others if n is not new_holder)
        until(lambda: other.key_client(other.vault_url(v.name)).get_key(k.name))
    finally:
        for n in nodes:
            n.stop()


REPO = __import__("pathlib").Path(__file__).resolve().parents[2]


def pg_cluster(pg_dir):
    """A primary and a streaming standby of our own (scripts/postgres.sh); their env lines."""
    import subprocess

    out = subprocess.run(
        [str(REPO / "scripts/postgres.sh"), "start", str(pg_dir), "--standby"],
        check=True, capture_output=True, text=True, timeout=180,
    ).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def pg_script(pg_dir, *args):
    import subprocess

    subprocess.run([str(REPO / "scripts/postgres.sh"), *args, str(pg_dir)], check=True, timeout=180)


def copy_node_files(src, dst_dir):
    dst_dir.mkdir(mode=0o700)
    shutil.copy2(src.data_dir / "root.key", dst_dir / "root.key")
    shutil.copytree(src.data_dir / "tls", dst_dir / "tls")
    shutil.copy2(src.admin_path, dst_dir / "bootstrap-admin.json")


def test_a_replica_on_a_hot_standby_serves_crypto_through_a_failover(tmp_path):
    import subprocess

    from azure.keyvault.keys.crypto import SignatureAlgorithm

    if os.environ.get("KAGI_TEST_POSTGRES_URL") is None and os.environ.get("KAGI_REQUIRE_POSTGRES") != "1":
        pytest.skip("no PostgreSQL harness configured (scripts/test.sh sets KAGI_TEST_POSTGRES_URL)")
    import tempfile

    # Not under pytest's 0700 directories: the clusters run as an unprivileged user.
    pg_dir = __import__("pathlib").Path(tempfile.mkdtemp(prefix="kagi-replica-pg."))
    pg_dir.chmod(0o755)
    pg = pg_cluster(pg_dir)
    primary = replica = None
    try:
        primary = _start_server(tmp_path, "primary", ["--store", pg["PG_PRIMARY_URL"]])
        primary.put_rg(DEFAULT_RG)
        vault = primary.create_vault()
        keys = primary.key_client(primary.vault_url(vault.name))
        rsa = keys.create_rsa_key("rsa", size=2048)
        primary.secret_client(primary.vault_url(vault.name)).set_secret("s", "before")

        copy_node_files(primary, tmp_path / "replica-data")
        replica = _start_server(
            tmp_path, "replica", ["--read-only", "--store", pg["PG_STANDBY_URL"]]
        )
        rkeys = replica.key_client(replica.vault_url(vault.name))
        rsecrets = replica.secret_client(replica.vault_url(vault.name), retry_total=0)
        assert rkeys.get_key("rsa").id.rsplit("/", 1)[-1] == rsa.id.rsplit("/", 1)[-1]
        assert rsecrets.get_secret("s").value == "before"
        # What the primary writes later reaches the replica (streaming replication, then the
        # replica's re-check of the change feed: a standby has no notifications).
        ec = keys.create_ec_key("ec", curve="P-256")
        _, took = until(lambda: rkeys.get_key("ec"))
        print(f"\na key made on the primary is served by the replica after {took * 1000:.0f} ms")
        # Writes on the replica: 503 in Azure's words with Retry-After.
        with pytest.raises(HttpResponseError) as exc:
            rsecrets.set_secret("s", "on the replica")
        assert exc.value.status_code == 503
        assert "read-only state" in str(exc.value)
        assert exc.value.response.headers.get("Retry-After")

        # The primary region goes: kagi's primary node and PostgreSQL's primary stop.
        primary.stop()
        subprocess.run(
            ["runuser", "-u", os.environ.get("KAGI_PG_USER", "kagi-pg"), "--",
             f"{pg['PG_BIN']}/pg_ctl", "-D", pg["PG_PRIMARY_DIR"], "stop", "-m", "immediate"]
            if os.geteuid() == 0
            else [f"{pg['PG_BIN']}/pg_ctl", "-D", pg["PG_PRIMARY_DIR"], "stop", "-m", "immediate"],
            check=True, timeout=60,
        )
        # Cryptographic operations and reads keep working on the replica.
        cek = os.urandom(32)
        rc = replica.crypto_client(rkeys.get_key("rsa"))
        wrapped = rc.wrap_key(KeyWrapAlgorithm.rsa_oaep_256, cek)
        assert rc.unwrap_key(KeyWrapAlgorithm.rsa_oaep_256, wrapped.encrypted_key).key == cek
        digest = os.urandom(32)
        ec_crypto = replica.crypto_client(rkeys.get_key("ec"))
        sig = ec_crypto.sign(SignatureAlgorithm.es256, digest)
        assert ec_crypto.verify(SignatureAlgorithm.es256, digest, sig.signature).is_valid
        assert rsecrets.get_secret("s").value == "before"

        # Failover: the standby is promoted, and the node follows it: it restarts itself
        # without --read-only (same process id) and takes writes, with no command of ours.
        from azure.core.exceptions import AzureError

        pid = replica.proc.pid
        pg_script(pg_dir, "promote")
        wkeys = replica.key_client(replica.vault_url(vault.name), retry_total=0)

        def create_after_failover():
            try:
                return wkeys.create_rsa_key("after-failover", size=2048)
            except AzureError:
                return None  # still read-only (503), or restarting
        made, took = until(create_after_failover, bound=60)
        print(f"\nthe replica took writes {took:.1f} s after its standby was promoted")
        assert made.properties.enabled
        assert replica.proc.pid == pid and replica.proc.poll() is None
        assert "restarting without --read-only" in replica.log_path.read_text()
        replica.secret_client(replica.vault_url(vault.name)).set_secret("s", "after")
        wrapped_again = replica.crypto_client(wkeys.get_key("rsa")).unwrap_key(
            KeyWrapAlgorithm.rsa_oaep_256, wrapped.encrypted_key
        )
        assert wrapped_again.key == cek
    finally:
        for n in (replica, primary):
            if n is not None:
                n.stop()
        pg_script(pg_dir, "destroy")
        shutil.rmtree(pg_dir, ignore_errors=True)


def test_kill_9_of_a_node_under_mixed_load_loses_no_acknowledged_write(tmp_path):
    import threading

    lease_ms = 1500
    _, nodes = start_nodes(tmp_path, count=3, env={"KAGI_LEASE_MS": str(lease_ms)})
    n1, n2, n3 = nodes
    try:
        n1.put_rg(DEFAULT_RG)
        vault = n1.create_vault()
        until(lambda: all(n.get_vault(vault.name).status_code == 200 for n in (n2, n3)))
        acked_keys = {}  # name -> [version ids acknowledged, in order]
        acked_secrets = {}  # name -> (version, value)
        backups = []
        errors = []
        stop = threading.Event()
        lock = threading.Lock()

        def worker(node, tag):
            keys = node.key_client(node.vault_url(vault.name))
            secrets = node.secret_client(node.vault_url(vault.name))
            i = 0
            while not stop.is_set():
                i += 1
                try:
                    name = f"{tag}-k{i}"
                    k = keys.create_ec_key(name, curve="P-256")
                    with lock:
                        acked_keys[name] = [k.properties.version]
                    r = keys.rotate_key(name)
                    with lock:
                        acked_keys[name].append(r.properties.version)
                    sig = node.crypto_client(r).sign("ES256", b"\x01" * 32)
                    assert sig.signature
                    s = secrets.set_secret(f"{tag}-s{i}", f"value-{tag}-{i}")
                    with lock:
                        acked_secrets[s.name] = (s.properties.version, f"value-{tag}-{i}")
                    if i % 5 == 0:
                        backups.append((name, keys.backup_key(name)))
                except Exception as e:  # noqa: BLE001 - every failure is reported below
                    errors.append(f"{tag}: {e!r}")

        threads = [threading.Thread(target=worker, args=(n, f"w{j}-{i}")) for i, n in enumerate((n2, n3)) for j in range(2)]
        for t in threads:
            t.start()
        time.sleep(4)
        n1.proc.kill()  # kill -9 of the node holding the leases, mid-load
        n1.proc.wait(10)
        time.sleep(4)
        stop.set()
        for t in threads:
            t.join(60)
        assert not errors, errors[:5]
        assert len(acked_keys) > 10 and len(acked_secrets) > 10, (len(acked_keys), len(acked_secrets))
        # Every acknowledged write is there, on both survivors and on the killed node restarted,
        # and no version exists that was not acknowledged (no duplicate rotation).
        n1.start()
        for node in (n2, n3, n1):
            keys = node.key_client(node.vault_url(vault.name))
            secrets = node.secret_client(node.vault_url(vault.name))
            for name, versions in acked_keys.items():
                stored = [v.version for v in keys.list_properties_of_key_versions(name)]
                assert sorted(stored) == sorted(versions), (node.log_path.name, name, stored, versions)
            for name, (version, value) in acked_secrets.items():
                assert secrets.get_secret(name, version).value == value
        assert backups, "no key backup was taken"
        print(f"\n{len(acked_keys)} keys (each created and rotated), {len(acked_secrets)} secrets, "
              f"{len(backups)} key backups acknowledged through two nodes while the third was killed: all there")
    finally:
        for n in nodes:
            n.stop()


def test_strict_consistency_serves_every_change_at_the_next_request(tmp_path):
    _, (n1, n2) = start_nodes(tmp_path, extra_args=["--consistency", "strict"])
    try:
        n1.put_rg(DEFAULT_RG)
        sp = create_sp(n1)
        policy = {
            "tenantId": n1.tenant_id,
            "objectId": sp["objectId"],
            "permissions": {"keys": ["get"], "secrets": ["get"], "certificates": []},
        }
        vault = n1.create_vault(accessPolicies=[policy])
        # No waiting anywhere below: each read on node 2 follows a write acknowledged by node 1.
        assert n2.get_vault(vault.name).status_code == 200
        s1 = n1.secret_client(n1.vault_url(vault.name))
        s2 = n2.secret_client(n2.vault_url(vault.name))
        k1 = n1.key_client(n1.vault_url(vault.name))
        k2 = n2.key_client(n2.vault_url(vault.name))
        for i in range(20):
            s1.set_secret("s", f"v{i}")
            assert s2.get_secret("s").value == f"v{i}"
        key = k1.create_ec_key("k")
        assert k2.get_key("k").properties.version == key.properties.version
        rotated = k1.rotate_key("k")
        assert k2.get_key("k").properties.version == rotated.properties.version
        sp_secrets = n2.secret_client(n2.vault_url(vault.name), credential=sp_credential(n2, sp))
        assert sp_secrets.get_secret("s").value == "v19"
        path = n1.vault_path(DEFAULT_RG, vault.name) + "/accessPolicies/remove"
        r = n1.request("PUT", n1.arm(path), json={"properties": {"accessPolicies": [policy]}})
        assert r.status_code in (200, 201), r.text
        with pytest.raises(HttpResponseError) as exc:
            sp_secrets.get_secret("s")
        assert exc.value.status_code == 403
    finally:
        for n in (n1, n2):
            n.stop()


def test_concurrent_policy_changes_on_two_nodes_lose_nothing(tmp_path):
    _, (n1, n2) = start_nodes(tmp_path)
    try:
        n1.put_rg(DEFAULT_RG)
        vault = n1.create_vault()
        until(lambda: n2.get_vault(vault.name).status_code == 200)
        path = n1.vault_path(DEFAULT_RG, vault.name) + "/accessPolicies/add"

        def policy(oid):
            return {"tenantId": n1.tenant_id, "objectId": oid,
                    "permissions": {"keys": ["get"], "secrets": [], "certificates": []}}

        granted, refused = [], 0
        for i in range(10):
            a, b = f"00000000-0000-0000-0000-{i:06d}000001", f"00000000-0000-0000-0000-{i:06d}000002"
            # Back to back on two nodes: each may not have seen the other's last change yet.
            for node, oid in ((n1, a), (n2, b)):
                r = node.request("PUT", node.arm(path), json={"properties": {"accessPolicies": [policy(oid)]}})
                if r.status_code == 200:
                    granted.append(oid)
                else:
                    # A change computed from what the node had not seen yet is refused, not
                    # applied.
                    assert r.status_code == 409, r.text
                    refused += 1
        assert len(granted) >= 10, (granted, refused)
        until(lambda: n2.get_vault(vault.name).status_code == 200)
        for node in (n1, n2):
            def has_all():
                body = node.get_vault(vault.name).json()
                have = {p["objectId"] for p in body["properties"]["accessPolicies"]}
                return set(granted) <= have
            until(has_all)
        print(f"\n{len(granted)} grants acknowledged on two nodes, none lost; {refused} refused with 409")
    finally:
        for n in (n1, n2):
            n.stop()


def s3_blobs_url() -> str:
    url = os.environ.get("KAGI_TEST_S3_BLOBS")
    if not url:
        if os.environ.get("KAGI_REQUIRE_S3") == "1":
            pytest.fail("KAGI_REQUIRE_S3=1 but KAGI_TEST_S3_BLOBS is not set")
        pytest.skip("no S3 server: set KAGI_TEST_S3_BLOBS and AWS_* (scripts/test.sh does)")
    return url


def test_backups_on_shared_blobs_are_served_by_every_node(tmp_path):
    """Two nodes on one store and one bucket (`--blobs s3://…`): a backup vault made on node 1
    is backed up through node 2 and restored through node 1, then, with node 1 killed, through
    node 2 again. The repository is in the bucket only, and holds no plaintext."""
    import uuid

    from conftest import S3Bucket
    from test_backup_vault import assert_same_tree, create_backup_vault, kagi_cli, make_tree, manifest, ok, vref

    blobs = f"{s3_blobs_url().rstrip('/')}/nodes-{uuid.uuid4().hex}"
    _, (n1, n2) = start_nodes(tmp_path, extra_args=["--blobs", blobs])
    try:
        n1.put_rg(DEFAULT_RG)
        src = tmp_path / "src"
        make_tree(src)
        before = manifest(src)
        bv, _ = create_backup_vault(n1)
        ok(kagi_cli(n1, "backup", "item", "protect", *vref(bv), "--name", "docs", "--source", str(src)))
        # Node 2 serves the vault once the change feed brought it (milliseconds).
        until(lambda: kagi_cli(n2, "backup", "vault", "show", *vref(bv)).returncode == 0)
        job = ok(kagi_cli(n2, "backup", "now", *vref(bv), "--item", "docs"))
        assert job["status"] == "Completed", job
        rp = job["stats"]["recoveryPointId"]
        points = ok(kagi_cli(n1, "backup", "recovery-points", *vref(bv), "--item", "docs"))["value"]
        assert rp in {p["name"] for p in points} | {p.get("recoveryPointId") for p in points}, points
        restored = ok(kagi_cli(n1, "backup", "restore", *vref(bv), "--item", "docs", "--recovery-point", rp,
                               "--target", str(tmp_path / "r1")))
        assert restored["status"] == "Completed", restored
        assert_same_tree(before, tmp_path / "r1")

        # The objects are in the bucket, not in either node's data directory.
        for n in (n1, n2):
            assert not list((n.data_dir / "backup").rglob("config")), n.data_dir
        keys = S3Bucket.from_url(blobs).list("backup")
        assert any(k.endswith(f"/{bv.lower()}/items/docs/config") for k in keys), keys
        assert any("/items/docs/data/" in k for k in keys), keys
        bucket = S3Bucket.from_url(blobs)
        for k in keys:
            data = bucket.get(f"backup/{k}")
            assert b"hello kagi" not in data and b"spaces are fine" not in data, k

        # Node 1 dies; node 2 restores from the bucket on its own.
        n1.proc.kill()
        n1.proc.wait(10)
        again = ok(kagi_cli(n2, "backup", "restore", *vref(bv), "--item", "docs", "--recovery-point", rp,
                            "--target", str(tmp_path / "r2")))
        assert again["status"] == "Completed", again
        assert_same_tree(before, tmp_path / "r2")
    finally:
        for n in (n1, n2):
            n.stop()


def test_vault_backup_jobs_are_served_by_every_node(tmp_path):
    """A whole-vault backup started on node 1 is followed and downloaded through node 2 (the job
    mirrored in the store, its result file in the bucket), then restored through node 2."""
    import uuid

    from conftest import LOCATION
    from test_backup_vault import kagi_cli, ok

    blobs = f"{s3_blobs_url().rstrip('/')}/nodes-{uuid.uuid4().hex}"
    _, (n1, n2) = start_nodes(tmp_path, extra_args=["--blobs", blobs])
    try:
        n1.put_rg(DEFAULT_RG)
        vault = n1.create_vault()
        key = n1.key_client(n1.vault_url(vault.name)).create_rsa_key("cmk", size=2048)
        r = n1.request("POST", n1.arm(n1.vault_path(DEFAULT_RG, vault.name) + "/backup"), json={"keyId": key.id})
        assert r.status_code == 202, r.text
        status = r.headers["Azure-AsyncOperation"].replace(n1.base, n2.base)

        def ended():
            job = n2.request("GET", status).json()
            return job if job.get("status") in ("Completed", "Failed") else None

        job, _ = until(ended, bound=60)
        assert job["status"] == "Completed", job
        data = n2.request("GET", job["resultUrl"].replace(n1.base, n2.base))
        assert data.status_code == 200, data.text
        assert len(data.content) == job["resultBytes"]
        # The result file is in the bucket (the node that made it uploaded it before "Completed").
        from conftest import S3Bucket

        assert f"{job['id']}.kvbak" in S3Bucket.from_url(blobs).list("jobs")
        (tmp_path / "v.kvbak").write_bytes(data.content)
        target = random_name("rnode", 14)
        out = ok(kagi_cli(n2, "keyvault", "restore", "--name", target, "--resource-group", DEFAULT_RG,
                          "--location", LOCATION, "--file", str(tmp_path / "v.kvbak"), "--key-id", key.id))
        assert out["keyVersions"] == 1, out
        got, _ = until(lambda: n1.key_client(n1.vault_url(target)).get_key("cmk"))
        assert got.properties.version == key.properties.version
    finally:
        for n in (n1, n2):
            n.stop()


def test_a_backup_vault_on_shared_blobs_is_not_moved(tmp_path):
    """With the blobs in a bucket a backup vault move is refused, validation included, and
    nothing moves (a bucket has no rename: docs/SEVERAL_NODES.md)."""
    import uuid

    from test_backup_vault import create_backup_vault, kagi_cli, ok, vref

    blobs = f"{s3_blobs_url().rstrip('/')}/nodes-{uuid.uuid4().hex}"
    _, (n1,) = start_nodes(tmp_path, count=1, extra_args=["--blobs", blobs])
    try:
        n1.put_rg(DEFAULT_RG)
        n1.put_rg("kagi-moves-target")
        bv, _ = create_backup_vault(n1)
        p = kagi_cli(n1, "backup", "vault", "move", *vref(bv), "--target-resource-group", "kagi-moves-target")
        assert p.returncode != 0 and "UserErrorBackupVaultMoveNotSupported" in p.stderr, p.stderr
        ok(kagi_cli(n1, "backup", "vault", "show", *vref(bv)))
    finally:
        n1.stop()



class Via:
    """Requests to one node of a cluster, through a proxy to it alone, with the cluster's token
    (the nodes of a cluster share one authority: one port, here on 127.0.0.2, .3, …)."""

    def __init__(self, first, node):
        from conftest import RoundRobinProxy, free_port

        self.first, self.node = first, node
        self.proxy = RoundRobinProxy(free_port(), [(node.listen_host, node.port)])
        self.base = f"https://localhost:{self.proxy.port}"
        self.subscription_id, self.ca_path, self.data_dir = first.subscription_id, first.ca_path, node.data_dir

    def arm(self, path, api):
        return f"{self.base}{path}{'&' if '?' in path else '?'}api-version={api}"

    def request(self, method, url, **kw):
        return self.first.request(method, url, **kw)


def test_disks_and_sql_servers_are_served_through_every_node_by_their_home(tmp_path, monkeypatch):
    """A disk family and a SQL server's databases live in the data directory of one node (their
    home); the other nodes forward their requests there. A disk made through node 2 is opened,
    written, snapshotted and read back through node 1; a SQL server made through node 2 lives on
    node 1, the node serving SQL. With a home down the other node answers 503 with Retry-After,
    and serves again once the home is back (its name survives the restart)."""
    import psycopg
    import test_disks as disks
    import test_sql as sql
    from conftest import LOCATION, _start_cluster

    monkeypatch.setenv("KAGI_CONFORMANCE_POSTGRES", pg_server_url())
    monkeypatch.delenv("KAGI_CONFORMANCE_BLOBS", raising=False)
    first = _start_cluster(tmp_path, 2)
    n2 = first.cluster[0]
    try:
        first.put_rg(DEFAULT_RG)
        via1, via2 = Via(first, first), Via(first, n2)
        name1 = (first.data_dir / "node-name").read_text().strip()
        name2 = (n2.data_dir / "node-name").read_text().strip()
        assert name1 != name2

        name, disk = disks.create_disk(via2)
        image = tmp_path / "in.raw"
        data = disks.random_image(image, 4, seed=14)
        # Through node 1: the access is opened on node 2, its socket in node 2's directory.
        uri = disks.grant_access(via1, name, "Write")
        assert str(n2.data_dir) in uri, uri
        got = disks.ok(disks.arm(via1, "GET", disks.compute_path(via1, "disks", name)))
        assert got["properties"]["diskState"] == "ActiveSAS", got
        # A list answered by node 1 (not the disk's home) shows the access too.
        listed = disks.ok(disks.arm(via1, "GET", disks.compute_path(via1, "disks", "").rstrip("/")))
        mine = [d for d in listed["value"] if d["name"] == name]
        assert mine and mine[0]["properties"]["diskState"] == "ActiveSAS", mine
        disks.run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", image, uri)
        disks.end_access(via1, name)
        # A snapshot made through node 1 joins the family on node 2, and reads back there.
        snap = random_name("snap", 10)
        body = {"location": LOCATION,
                "properties": {"creationData": {"createOption": "Copy", "sourceResourceId": disk["id"]}}}
        disks.ok(disks.arm(via1, "PUT", disks.compute_path(via1, "snapshots", snap), body))
        r = disks.arm(via1, "POST", disks.compute_path(via1, "snapshots", snap) + "/beginGetAccess",
                      {"access": "Read", "durationInSeconds": 600})
        snap_uri = disks.ok(r)["accessSAS"]
        assert str(n2.data_dir) in snap_uri, snap_uri
        assert disks.read_back(snap_uri, tmp_path / "snap.raw", len(data)) == data
        disks.ok(disks.arm(via1, "POST", disks.compute_path(via1, "snapshots", snap) + "/endGetAccess"),
                 200, 204)
        # The family's log is on node 2 only, as ciphertext.
        disks.assert_no_plaintext(n2.data_dir, b"KAGI-PLAINTEXT-MARKER-14")
        assert list(n2.data_dir.rglob("segments")) and not list(first.data_dir.rglob("segments"))

        # A SQL server made through node 2 (which does not serve SQL) lives on node 1.
        server, _ = sql.create_server(via2, identity=False)
        db, _ = sql.create_db(via2, server)
        with psycopg.connect(sql.conninfo(first, server, db), autocommit=True) as c:
            c.execute("CREATE TABLE t (v text)")
            c.execute("INSERT INTO t VALUES ('through the home')")
        dbs = sql.ok(sql.arm(via2, "GET", sql.sql_path(via2, server, "/databases")))
        assert [d["name"] for d in dbs["value"]] == [db], dbs

        # The disk's home stopped: node 1 answers 503 (which the SDKs retry), naming it.
        n2.kill9()
        r = disks.arm(via1, "GET", disks.compute_path(via1, "disks", name))
        assert r.status_code == 503 and r.headers.get("Retry-After"), (r.status_code, r.text)
        assert name2 in r.json()["error"]["message"], r.text
        # Back (same data directory, same name): served through node 1 again.
        n2.start()
        until(lambda: disks.arm(via1, "GET", disks.compute_path(via1, "disks", name)).status_code == 200,
              bound=20)
        disks.ok(disks.arm(via1, "DELETE", disks.compute_path(via1, "snapshots", snap)), 200, 202, 204)
        disks.ok(disks.arm(via1, "DELETE", disks.compute_path(via1, "disks", name)), 200, 202, 204)
        assert disks.arm(via2, "GET", disks.compute_path(via2, "disks", name)).status_code == 404
        assert not list(n2.data_dir.rglob("segments")) or not any(
            p.iterdir() for p in n2.data_dir.rglob("segments"))
        # The SQL server's rows are still there through its home.
        with psycopg.connect(sql.conninfo(first, server, db), autocommit=True) as c:
            assert c.execute("SELECT v FROM t").fetchall() == [("through the home",)]
    finally:
        for n in (first, *first.cluster):
            n.stop()


def up(via):
    """Whether the node behind `via` answers (its proxy reaches it)."""
    import requests

    try:
        return requests.get(f"{via.base}/healthz", verify=str(via.ca_path), timeout=2).status_code == 200
    except requests.RequestException:
        return False


def disk_written_on(home, through, tmp_path, size_mb, seed):
    """A disk made through `home` (a Via: it lives on that node), `size_mb` random MiB written
    into it with qemu-img through `through`: (name, disk, data)."""
    import test_disks as disks
    name, disk = disks.create_disk(home)
    image = tmp_path / "in.raw"
    data = disks.random_image(image, size_mb, seed=seed)
    uri = disks.grant_access(through, name, "Write")
    assert str(home.data_dir) in uri, uri
    disks.run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", image, uri)
    disks.end_access(through, name)
    return name, disk, data


def test_a_disk_whose_home_died_is_taken_over_from_the_bucket(tmp_path, monkeypatch):
    """With the blobs in a bucket (`--blobs s3://…`) a disk family's log is shipped there as it
    is made durable, as ciphertext. Its home killed (kill -9), the next request through another
    node makes that node take the family over once the home's presence lease has run out: what
    was written and flushed through the dead home, and its snapshot, read back through the new
    home. The old home, restarted, forwards to the new one, and deleting the disk and snapshot
    deletes their objects from the bucket."""
    import test_disks as disks
    from conftest import LOCATION, S3Bucket, _start_cluster

    monkeypatch.setenv("KAGI_CONFORMANCE_POSTGRES", pg_server_url())
    monkeypatch.setenv("KAGI_CONFORMANCE_BLOBS", s3_blobs_url())
    first = _start_cluster(tmp_path, 2)
    n2 = first.cluster[0]
    bucket = S3Bucket.from_url(first.blobs_url)
    try:
        first.put_rg(DEFAULT_RG)
        via1, via2 = Via(first, first), Via(first, n2)
        # The disk lives on node 2 (made through it); written through node 1.
        name, disk, data = disk_written_on(via2, via1, tmp_path, 4, seed=15)
        snap = random_name("snap", 10)
        body = {"location": LOCATION,
                "properties": {"creationData": {"createOption": "Copy", "sourceResourceId": disk["id"]}}}
        disks.ok(disks.arm(via1, "PUT", disks.compute_path(via1, "snapshots", snap), body))
        # The log is in the bucket, as ciphertext only.
        objects = bucket.list("disks")
        assert any("/piece-" in o for o in objects) and any(o.endswith("/family") for o in objects), objects
        marker = b"KAGI-PLAINTEXT-MARKER-15"
        for o in objects:
            assert marker not in bucket.get(f"disks/{o}"), o

        # An access granted by the home and left open when it dies.
        stale_uri = disks.grant_access(via2, name, "Read")
        assert str(n2.data_dir) in stale_uri, stale_uri
        # Home killed: once its presence lease has run out, node 1 takes the family over.
        n2.kill9()
        started = time.monotonic()
        until(lambda: disks.arm(via1, "GET", disks.compute_path(via1, "disks", name)).status_code == 200,
              bound=40)
        print(f"\ndisk family taken over {time.monotonic() - started:.1f} s after kill -9 of its home")
        uri = disks.grant_access(via1, name, "Write")
        assert str(first.data_dir) in uri, uri
        assert disks.read_back(uri, tmp_path / "back.raw", len(data)) == data
        # Written on through the new home.
        disks.run("qemu-io", "-f", "raw", "-c", "write -P 0x5a 8M 64k", uri)
        disks.end_access(via1, name)
        r = disks.arm(via1, "POST", disks.compute_path(via1, "snapshots", snap) + "/beginGetAccess",
                      {"access": "Read", "durationInSeconds": 600})
        snap_uri = disks.ok(r)["accessSAS"]
        assert disks.read_back(snap_uri, tmp_path / "snap.raw", len(data)) == data
        disks.ok(disks.arm(via1, "POST", disks.compute_path(via1, "snapshots", snap) + "/endGetAccess"),
                 200, 204)

        # The old home back: it forwards to the new one, and never writes the family again.
        n2.start()
        until(lambda: up(via2) and disks.arm(via2, "GET", disks.compute_path(via2, "disks", name)).ok, bound=30)
        # Its old access does not open its stale copy of the family.
        r = disks.run("qemu-img", "convert", "-f", "raw", "-O", "raw", stale_uri, tmp_path / "stale.raw", check=False)
        assert r.returncode != 0 and "is served by the node" in r.stderr, r.stdout + r.stderr
        uri = disks.grant_access(via2, name, "Read")
        assert str(first.data_dir) in uri and str(n2.data_dir) not in uri, uri
        got = disks.read_back(uri, tmp_path / "again.raw", 8 * 1024 * 1024 + 65536)
        assert got[: len(data)] == data and got[8 * 1024 * 1024:] == b"\x5a" * 65536
        disks.end_access(via2, name)

        # Deleted: their objects leave the bucket.
        disks.ok(disks.arm(via2, "DELETE", disks.compute_path(via2, "snapshots", snap)), 200, 202, 204)
        disks.ok(disks.arm(via2, "DELETE", disks.compute_path(via2, "disks", name)), 200, 202, 204)
        until(lambda: not bucket.list("disks"), bound=20)
    finally:
        for n in (first, *first.cluster):
            n.stop()


def in_log(node, *lines):
    """Whether `node`'s log holds a line containing every one of `lines`."""
    return any(all(part in line for part in lines)
               for line in node.log_path.read_text(errors="replace").splitlines())


def test_a_disk_whose_home_died_is_taken_over_with_no_request(tmp_path, monkeypatch):
    """Issue 14: the takeover sweep. With the blobs in a bucket, a disk family whose home has
    died (kill -9, its data directory deleted) is taken over by another node by itself once the
    home's presence has lapsed and the node has seen it absent for KAGI_TAKEOVER_AFTER seconds
    (here 2), with no request naming the disk: node 1's log says so, and then what was written
    through the dead home reads back through node 1."""
    import test_disks as disks
    from conftest import _start_cluster

    monkeypatch.setenv("KAGI_CONFORMANCE_POSTGRES", pg_server_url())
    monkeypatch.setenv("KAGI_CONFORMANCE_BLOBS", s3_blobs_url())
    monkeypatch.setenv("KAGI_TAKEOVER_AFTER", "2")
    first = _start_cluster(tmp_path, 2)
    n2 = first.cluster[0]
    try:
        first.put_rg(DEFAULT_RG)
        via1, via2 = Via(first, first), Via(first, n2)
        # The disk lives on node 2 (made through it), written there.
        name, disk, data = disk_written_on(via2, via2, tmp_path, 2, seed=16)
        family = next(p.name for p in (n2.data_dir / "disks").iterdir() if (p / "family").is_file())

        n2.kill9()
        shutil.rmtree(n2.data_dir)
        started = time.monotonic()
        # No request names the disk: node 1 takes its family over by itself.
        until(lambda: in_log(first, "taken over by the takeover sweep", family), bound=60)
        print(f"\ndisk family taken over with no request {time.monotonic() - started:.1f} s after kill -9 of its home")
        assert (first.data_dir / "disks" / family / "family").is_file()
        got = disks.ok(disks.arm(via1, "GET", disks.compute_path(via1, "disks", name)))
        assert got["id"] == disk["id"], got
        uri = disks.grant_access(via1, name, "Read")
        assert str(first.data_dir) in uri, uri
        assert disks.read_back(uri, tmp_path / "back.raw", len(data)) == data
        disks.end_access(via1, name)
        disks.ok(disks.arm(via1, "DELETE", disks.compute_path(via1, "disks", name)), 200, 202, 204)
    finally:
        for n in (first, *first.cluster):
            n.stop()


def start_sql_cluster(tmp_path, count=2, env=None, blobs=None):
    """`count` nodes of one cluster (one store, root key, CA and HTTPS port, each on a loopback
    address of its own: 127.0.0.2, .3, …, behind a round-robin proxy on localhost), each with a
    SQL endpoint of its own on its address, which its node card advertises; with `env` in their
    environment and, given `blobs` (`s3://…`), that one bucket prefix for all."""
    from conftest import KagiServer, RoundRobinProxy, STARTUP_TIMEOUT, free_port, wait_for
    import socket

    def listening(host, port):
        try:
            socket.create_connection((host, port), timeout=1).close()
            return True
        except OSError:
            return False

    store = scratch_pg_database(pg_server_url())
    port = free_port()
    hosts = [f"127.0.0.{i + 2}" for i in range(count)]
    proxy = RoundRobinProxy(port, [(h, port) for h in hosts])
    nodes = []
    for i, host in enumerate(hosts):
        data = tmp_path / f"sqlnode{i + 1}-data"
        if nodes:
            data.mkdir(mode=0o700)
            shutil.copy2(nodes[0].data_dir / "root.key", data / "root.key")
            shutil.copy2(nodes[0].admin_path, data / "bootstrap-admin.json")
            shutil.copytree(nodes[0].data_dir / "tls", data / "tls")
        node = KagiServer(data, tmp_path / f"sqlnode{i + 1}.log", port=port, env=env)
        node.extra_args = ["--store", store, "--consistency", "strict",
                           "--sql-listen", f"{host}:{node.sql_port}"]
        if blobs:
            node.blobs_url = blobs
        node.listen_host = host
        node.start()
        # Its start may have been answered by another node through the proxy.
        wait_for(f"node {host} to listen", lambda: all(
            listening(host, p) for p in (port, node.sql_port)), STARTUP_TIMEOUT)
        nodes.append(node)
    nodes[0].cluster = [*nodes[1:], proxy]
    return nodes[0]


def pg_wire_refusal(node, server, db, user, ca_path, extra=()):
    """Connects to `node`'s SQL endpoint over TLS (SNI `{server}.localhost`) as a raw client
    (startup parameters `extra` too) and answers SCRAM's challenge with a wrong proof: the
    (SQLSTATE, message) of the ErrorResponse that ends the attempt (the wrong proof's 28P01, or
    an error before authentication)."""
    import base64
    import socket
    import ssl
    import struct

    def read_msg(t):
        head = b""
        while len(head) < 5:
            chunk = t.recv(5 - len(head))
            assert chunk, "closed without an ErrorResponse"
            head += chunk
        tag, n = head[:1], struct.unpack("!I", head[1:])[0] - 4
        body = b""
        while len(body) < n:
            chunk = t.recv(n - len(body))
            assert chunk, "closed in a message"
            body += chunk
        return tag, body

    def error(body):
        fields = {f[:1]: f[1:].decode() for f in body.split(b"\0") if f}
        return fields.get(b"C"), fields.get(b"M")

    s = socket.create_connection((node.listen_host, node.sql_port), timeout=20)
    s.sendall(struct.pack("!II", 8, 80877103))
    assert s.recv(1) == b"S"
    t = ssl.create_default_context(cafile=str(ca_path)).wrap_socket(s, server_hostname=f"{server}.localhost")
    with t:
        body = struct.pack("!I", 196608) + b"".join(
            k + b"\0" + v.encode() + b"\0" for k, v in ((b"user", user), (b"database", db), *extra)) + b"\0"
        t.sendall(struct.pack("!I", len(body) + 4) + body)
        tag, body = read_msg(t)
        if tag == b"E":
            return error(body)
        assert (tag, body[:4]) == (b"R", struct.pack("!I", 10)), (tag, body)
        first = f"n,,n=,r={base64.b64encode(os.urandom(18)).decode()}".encode()
        sasl = b"SCRAM-SHA-256\0" + struct.pack("!I", len(first)) + first
        t.sendall(b"p" + struct.pack("!I", len(sasl) + 4) + sasl)
        tag, body = read_msg(t)
        assert (tag, body[:4]) == (b"R", struct.pack("!I", 11)), (tag, body)
        nonce = dict(kv.split("=", 1) for kv in body[4:].decode().split(","))["r"]
        final = f"c=biws,r={nonce},p={base64.b64encode(bytes(32)).decode()}".encode()
        t.sendall(b"p" + struct.pack("!I", len(final) + 4) + final)
        tag, body = read_msg(t)
        assert tag == b"E", (tag, body)
        return error(body)


def test_pgwire_connections_reaching_another_node_are_forwarded_to_the_servers_home(tmp_path):
    """Two nodes serving SQL, each on its own endpoint: a server made through node 1 lives there,
    and psql and psycopg reach its databases through node 2's endpoint (as behind a TCP load
    balancer), which splices their connections to node 1's after the StartupMessage: SCRAM end
    to end (a wrong proof is refused with 28P01 by the home), rows written through node 2 read
    through node 1. With node 1 killed, node 2 answers a PostgreSQL error naming it, at once;
    once node 1 is back, node 2 forwards again."""
    import subprocess

    import psycopg
    import test_sql as sql

    first = start_sql_cluster(tmp_path, 2)
    n2 = first.cluster[0]
    try:
        first.put_rg(DEFAULT_RG)
        via1 = Via(first, first)
        name1 = (first.data_dir / "node-name").read_text().strip()
        server, _ = sql.create_server(via1, identity=False)
        db, _ = sql.create_db(via1, server)

        def dsn(node, password=sql.PASSWORD):
            return (f"host={server}.localhost hostaddr={node.listen_host} port={node.sql_port} "
                    f"dbname={db} user={sql.ADMIN} sslmode=verify-full sslrootcert={first.ca_path} "
                    f"connect_timeout=10" + (f" password={password}" if password else ""))

        # psycopg through node 2.
        with psycopg.connect(dsn(n2), autocommit=True) as c:
            c.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
            c.execute("INSERT INTO t VALUES (%s, %s)", (1, "through node 2"))
            assert c.execute("SELECT v FROM t WHERE id = %s", (1,)).fetchall() == [("through node 2",)]
        # psql through node 2.
        env = dict(os.environ, PGPASSWORD=sql.PASSWORD)
        p = subprocess.run(["psql", dsn(n2, None), "-X", "-qAt", "-v", "ON_ERROR_STOP=1",
                            "-c", "INSERT INTO t VALUES (2, 'psql through node 2')",
                            "-c", "SELECT count(*) FROM t"],
                           capture_output=True, text=True, env=env, timeout=60)
        assert p.returncode == 0, p.stderr
        assert p.stdout.strip() == "2", p.stdout
        # The rows are in the home's databases: read through node 1 directly.
        with psycopg.connect(dsn(first), autocommit=True) as c:
            assert c.execute("SELECT id, v FROM t ORDER BY id").fetchall() == [
                (1, "through node 2"), (2, "psql through node 2")]
        # Authentication is the home's: a wrong password fails through node 2 as on node 1.
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            psycopg.connect(dsn(n2, "Wr0ng!Passw0rd"))
        assert pg_wire_refusal(n2, server, db, sql.ADMIN, first.ca_path)[0] == "28P01"
        # A client's own forwarded marker grants nothing: node 2 refuses it (the server lives
        # elsewhere, and the connection claims to be forwarded already) …
        marker = ((b"kagi_forwarded_by", "a client"),)
        code, message = pg_wire_refusal(n2, server, db, sql.ADMIN, first.ca_path, marker)
        assert code == "57P03" and "already forwarded once" in message, (code, message)
        assert name1 not in message and "a client" not in message, message
        # … and node 1, the home, still authenticates it.
        assert pg_wire_refusal(first, server, db, sql.ADMIN, first.ca_path, marker)[0] == "28P01"

        # The home killed: node 2 answers at once with a PostgreSQL error, which names no node
        # (the client has not authenticated).
        first.kill9()
        t0 = time.monotonic()
        code, message = pg_wire_refusal(n2, server, db, sql.ADMIN, first.ca_path)
        assert code == "57P03" and "the node serving this server cannot be reached now" in message, (code, message)
        assert name1 not in message and first.listen_host not in message, message
        with pytest.raises(psycopg.OperationalError, match="the node serving this server cannot be reached") as refused:
            psycopg.connect(dsn(n2))
        assert name1 not in str(refused.value), refused.value
        assert time.monotonic() - t0 < 12
        # Back (same data directory, same name): forwarded again, the rows there.
        first.start()

        def rows():
            try:
                with psycopg.connect(dsn(n2), autocommit=True) as c:
                    return c.execute("SELECT count(*) FROM t").fetchone()[0] == 2
            except psycopg.OperationalError:
                return False

        until(rows, bound=30)
    finally:
        for n in (first, *first.cluster):
            n.stop()


def test_a_pgwire_cancel_reaching_a_third_node_reaches_the_session(tmp_path):
    """Three nodes serving SQL behind a TCP load balancer: a psycopg session to a server homed
    on node 1 reaches node 2 (spliced to node 1), and its cancel, a new connection, reaches
    node 3, which knows neither the session nor the splice: node 3 passes it on once to the
    other nodes (kagi's own request code) and the running statement ends with 57014
    (QueryCanceled, "due to user request"), at once, not at its statement_timeout."""
    import threading
    from types import SimpleNamespace

    import psycopg
    from conftest import RoundRobinProxy, free_port

    first = start_sql_cluster(tmp_path, 3)
    n2, n3 = first.cluster[0], first.cluster[1]
    # The balancer: the session's connection goes to node 2, the next one (the cancel) to node 3.
    balancer = RoundRobinProxy(free_port(), [(n2.listen_host, n2.sql_port), (n3.listen_host, n3.sql_port)])
    try:
        _, _, _, _, dsn = sql_server_on_node_1(first)
        c = psycopg.connect(dsn(SimpleNamespace(listen_host="127.0.0.1", sql_port=balancer.port)),
                            autocommit=True)
        c.execute("SET statement_timeout = '60s'")
        outcome = []

        def runaway():
            try:
                c.execute("WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n) "
                          "SELECT count(*) FROM n")
                outcome.append("finished")
            except psycopg.Error as e:
                outcome.append(e)

        t = threading.Thread(target=runaway, daemon=True)
        t.start()
        time.sleep(1)
        assert not outcome, outcome
        t0 = time.monotonic()
        # cancel_safe (libpq >= 17, what psycopg's Ctrl-C sends): a new connection, over TLS
        # as the session's; cancel() would hold the GIL, and the balancer runs in this process.
        c.cancel_safe(timeout=20)
        t.join(30)
        took = time.monotonic() - t0
        assert outcome, "the statement still runs"
        e = outcome[0]
        assert isinstance(e, psycopg.errors.QueryCanceled), repr(e)
        assert "canceling statement due to user request" in str(e), e
        assert took < 10, took
        print(f"\nthe cancel sent to node 3 ended the statement on node 1 in {took:.2f} s")
        # The session goes on.
        assert c.execute("SELECT 1").fetchone() == (1,)
        c.close()
    finally:
        for n in (first, *first.cluster):
            n.stop()
        balancer.stop()


def test_nbd_connections_reaching_another_node_are_forwarded_to_the_disks_home(tmp_path, monkeypatch):
    """With --nbd-listen behind a TCP load balancer, an NBD connection may reach any node: an
    access's export name names its home (`sas-{secret}-{node}`), and another node passes the
    connection on to the home's NBD listener (TLS with the cluster's CA), transparently to
    qemu-img and nbdinfo. The home enforces the access (read-only, ended, expired); with the home
    killed, the other node refuses with an NBD error naming it, at once."""
    import json
    import re
    import socket
    import subprocess

    import test_disks as disks
    from conftest import STARTUP_TIMEOUT, RoundRobinProxy, _start_cluster, free_port

    monkeypatch.setenv("KAGI_CONFORMANCE_POSTGRES", pg_server_url())
    monkeypatch.delenv("KAGI_CONFORMANCE_BLOBS", raising=False)
    first = _start_cluster(tmp_path, 2)
    n2 = first.cluster[0]
    proxies = []
    try:
        # Each node again, now with an NBD listener on its own address, which its card names.
        nbd_port = {}
        for i, n in enumerate((first, n2)):
            nbd_port[i] = free_port()
            n.stop()
            n.extra_args = [*n.extra_args, "--nbd-listen", f"{n.listen_host}:{nbd_port[i]}"]
            n.start()
            deadline = time.monotonic() + STARTUP_TIMEOUT
            while True:
                try:
                    socket.create_connection((n.listen_host, nbd_port[i]), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        n._fail(f"no NBD listener on {n.listen_host}:{nbd_port[i]}")
                    time.sleep(0.1)
        name1 = (first.data_dir / "node-name").read_text().strip()
        name2 = (n2.data_dir / "node-name").read_text().strip()
        first.put_rg(DEFAULT_RG)
        via1 = Via(first, first)
        # What a balancer that picked node 2 does: every NBD connection goes to node 2.
        to_n2 = RoundRobinProxy(free_port(), [(n2.listen_host, nbd_port[1])])
        proxies.append(to_n2)

        def through_node2(uri):
            """The access URI (node 1's listener, as node 1 made it) pointed at node 2."""
            m = re.fullmatch(r"nbds://localhost:(\d+)/(sas-[0-9a-f]{64}-(.+))\?tls-certificates=(.+)", uri)
            assert m and m.group(3) == name1 and int(m.group(1)) == nbd_port[0], uri
            return (f"nbds://localhost:{to_n2.port}/{m.group(2)}?tls-certificates={m.group(4)}",
                    m.group(2), m.group(4))

        def qemu_opts(export, certs):
            return (["--object", f"tls-creds-x509,id=tls0,endpoint=client,dir={certs}"],
                    f"driver=nbd,server.type=inet,server.host=localhost,server.port={to_n2.port},"
                    f"export={export},tls-creds=tls0")

        def nbdinfo(uri):
            env = {**os.environ, "LIBNBD_DEBUG": "1"}  # libnbd 1.14 logs the server's message only
            return subprocess.run(["nbdinfo", "--json", uri], capture_output=True, text=True, timeout=60, env=env)

        # The disk lives on node 1 (made through it).
        name, _ = disks.create_disk(via1)
        image = tmp_path / "in.raw"
        data = disks.random_image(image, 4, seed=41)
        uri, export, certs = through_node2(disks.grant_access(via1, name, "Write"))
        objects, target = qemu_opts(export, certs)
        disks.run("qemu-img", "convert", "-n", *objects, "-f", "raw", "--target-image-opts", image, target)
        info = json.loads(disks.run("nbdinfo", "--json", uri).stdout)
        assert info["exports"][0]["export-size"] == 1 << 30, info
        out = tmp_path / "out.raw"
        disks.run("qemu-img", "convert", *objects, "--image-opts", target, "-O", "raw", out)
        with open(out, "rb") as f:
            assert f.read(len(data)) == data
        disks.run("nbdcopy", uri, tmp_path / "copy.raw")
        assert (tmp_path / "copy.raw").read_bytes()[: len(data)] == data
        # Served by node 1: node 2's directory holds no log of the disk.
        assert not list(n2.data_dir.rglob("segments")) or not any(
            p.iterdir() for p in n2.data_dir.rglob("segments"))
        # Ended on node 1: refused through node 2, by node 1.
        disks.end_access(via1, name)
        r = nbdinfo(uri)
        assert r.returncode != 0 and "access has ended" in r.stderr, r.stderr[-2000:]

        # Read-only and expiring accesses are enforced by the home through node 2.
        uri, export, certs = through_node2(disks.grant_access(via1, name, "Read", seconds=4))
        info = json.loads(disks.run("nbdinfo", "--json", uri).stdout)
        assert info["exports"][0]["is_read_only"] is True, info
        objects, target = qemu_opts(export, certs)
        w = disks.run("qemu-io", *objects, "--image-opts", target, "-c", "write -P 0x55 0 64k", check=False)
        assert w.returncode != 0 or "failed" in (w.stdout + w.stderr), w.stdout + w.stderr
        time.sleep(5)
        r = nbdinfo(uri)
        assert r.returncode != 0 and "access has ended" in r.stderr, r.stderr[-2000:]

        # Node 1 killed: node 2 refuses at once, naming it (an NBD error, not a hang).
        uri, _, _ = through_node2(disks.grant_access(via1, name, "Read"))
        assert disks.run("nbdinfo", "--json", uri).returncode == 0
        first.kill9()
        started = time.monotonic()
        r = nbdinfo(uri)
        took = time.monotonic() - started
        assert r.returncode != 0 and f"the node '{name1}'" in r.stderr, r.stderr[-2000:]
        assert took < 10, took
        # Once its presence lease has run out, the answer says it is not running.
        time.sleep(11)
        r = nbdinfo(uri)
        assert r.returncode != 0 and f"the node '{name1}', which is not running" in r.stderr, r.stderr[-2000:]
        assert name2 != name1
    finally:
        for p in proxies:
            p.stop()
        for n in (first, *first.cluster):
            n.stop()


def node_name(node):
    """The name a node keeps in its data directory."""
    return (node.data_dir / "node-name").read_text().strip()


def test_a_move_of_disks_runs_on_their_home(tmp_path, monkeypatch):
    """moveResources of a disk is forwarded to the disk's home, whose memory holds its accesses:
    through the other node, a disk with an access open on its home is refused, and once the
    access has ended it moves, its Location answered through the other node too. Disks of two
    homes in one request are refused with 409 CrossNodeOperationNotSupported naming both."""
    import test_disks as disks
    from conftest import _start_cluster

    api = "2021-04-01"
    monkeypatch.setenv("KAGI_CONFORMANCE_POSTGRES", pg_server_url())
    monkeypatch.delenv("KAGI_CONFORMANCE_BLOBS", raising=False)
    first = _start_cluster(tmp_path, 2)
    n2 = first.cluster[0]
    try:
        target = "kagi-moves-target"
        first.put_rg(DEFAULT_RG)
        first.put_rg(target)
        via1, via2 = Via(first, first), Via(first, n2)
        name1, name2 = node_name(first), node_name(n2)
        sub = first.subscription_id

        def move(via, ids, action="moveResources"):
            return via.request(
                "POST", via.arm(f"/subscriptions/{sub}/resourceGroups/{DEFAULT_RG}/{action}", api),
                json={"resources": ids, "targetResourceGroup": f"/subscriptions/{sub}/resourceGroups/{target}"})

        on1, disk1 = disks.create_disk(via1)
        on2, disk2 = disks.create_disk(via2)
        # Two homes in one request.
        r = move(via1, [disk1["id"], disk2["id"]])
        assert r.status_code == 409, (r.status_code, r.text)
        error = r.json()["error"]
        assert error["innererror"]["code"] == "CrossNodeOperationNotSupported", r.text
        assert name1 in error["message"] and name2 in error["message"], r.text

        # The access is open in node 2's memory: through node 1, the move is refused there.
        disks.grant_access(via1, on2, "Read")
        for action in ("validateMoveResources", "moveResources"):
            r = move(via1, [disk2["id"]], action)
            assert r.status_code == 409, (action, r.status_code, r.text)
            assert r.json()["error"]["code"] == "ResourceMoveProviderValidationFailed", r.text
        disks.end_access(via1, on2)
        r = move(via1, [disk2["id"]])
        assert r.status_code == 202, (r.status_code, r.text)
        location = r.headers["Location"]
        # The operation ran on node 2; polled through node 1.
        assert location.split("/operationresults/")[1].split("?")[0].endswith(f"-{name2}"), location
        path = location.split(f":{first.port}", 1)[1]
        assert via1.request("GET", f"{via1.base}{path}").status_code == 204
        moved = disks.compute_path(via1, "disks", on2, rg=target)
        got = disks.ok(disks.arm(via1, "GET", moved))
        assert got["id"].lower() == moved.lower(), got
        # Still served by its home: an access through node 1 opens on node 2.
        r = disks.arm(via1, "POST", moved + "/beginGetAccess", {"access": "Read", "durationInSeconds": 600})
        assert str(n2.data_dir) in disks.ok(r)["accessSAS"]
        disks.ok(disks.arm(via1, "POST", moved + "/endGetAccess"), 200, 204)
    finally:
        for n in (first, *first.cluster):
            n.stop()


def test_sql_operations_joining_servers_of_two_nodes_are_refused(tmp_path):
    """A geo-secondary joins the databases of two servers, which must live on one node: with
    the first server's node down, a server made through the other node lives there, and once
    the first node is back a geo-secondary of the first server's database on it is refused with
    409 CrossNodeOperationNotSupported naming both servers and nodes (while one on a server of
    the same node is made). A link whose servers came to live on different nodes cannot fail
    over either. Without a bucket, a point-in-time restore onto a server of the other node is
    refused the same way: the source's backups are in its home's data directory."""
    import psycopg
    import requests
    import test_sql as sql

    first = start_sql_cluster(tmp_path, 2, env={"KAGI_SQL_LOG_BACKUP_SECONDS": "2"})
    n2 = first.cluster[0]
    try:
        first.put_rg(DEFAULT_RG)
        via1, via2 = Via(first, first), Via(first, n2)
        name1, name2 = node_name(first), node_name(n2)
        primary, _ = sql.create_server(via1, identity=False)
        db, _ = sql.create_db(via1, primary)
        source = sql.sql_path(via1, primary, f"/databases/{db}")
        # Made while node 1 runs: on node 1, with the primary.
        partner, _ = sql.create_server(via2, identity=False)

        def secondary(via, server):
            return sql.arm(via, "PUT", sql.sql_path(via, server, f"/databases/{db}"),
                           {"location": "westus2", "properties": {"createMode": "Secondary",
                                                                 "sourceDatabaseId": source}})

        # Node 1 down (its presence lapsed): a server made through node 2 lives on node 2.
        first.stop()
        body = {"location": "westus2",
                "properties": {"administratorLogin": sql.ADMIN, "administratorLoginPassword": sql.PASSWORD}}
        elsewhere = random_name("sqlb", 10).lower()

        def answers(via, method, path, body=None):
            try:
                return sql.arm(via, method, path, body).status_code in (200, 201)
            except requests.RequestException:
                return False  # a node starting

        until(lambda: answers(via2, "PUT", sql.sql_path(via2, elsewhere), body), bound=30)
        first.start()
        # Back, and seen running by node 2.
        until(lambda: answers(via2, "GET", sql.sql_path(via2, primary)), bound=30)

        for via in (via1, via2):
            r = secondary(via, elsewhere)
            assert r.status_code == 409, (r.status_code, r.text)
            error = r.json()["error"]
            assert error["code"] == "CrossNodeOperationNotSupported", r.text
            for name in (primary, elsewhere, name1, name2):
                assert name in error["message"], (name, r.text)
        assert sql.arm(via1, "GET", sql.sql_path(via1, elsewhere, f"/databases/{db}")).status_code == 404
        until(lambda: sql.ok(sql.arm(via1, "GET", sql.sql_path(via1, primary, f"/databases/{db}/backups")))["value"],
              bound=60)
        restore = {"location": "westus2", "properties": {
            "createMode": "PointInTimeRestore", "sourceDatabaseId": source,
            "restorePointInTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}}
        r = sql.arm(via1, "PUT", sql.sql_path(via1, elsewhere, "/databases/restored"), restore)
        assert r.status_code == 409, (r.status_code, r.text)
        error = r.json()["error"]
        assert error["code"] == "CrossNodeOperationNotSupported" and name1 in error["message"], r.text

        # On a server of the primary's node, the geo-secondary is made.
        sql.ok(secondary(via2, partner), 200, 201)
        lid = sql.ok(sql.arm(via1, "GET", sql.sql_path(via1, partner, f"/databases/{db}/replicationLinks")))["value"][0]["name"]
        # The partner's home recorded as node 2 (as if it had come to live there): its failover
        # is refused, not run on either node.
        store = first.extra_args[first.extra_args.index("--store") + 1]
        with psycopg.connect(store, autocommit=True) as c:
            n = c.execute("UPDATE service_documents SET body = %s WHERE kind = 'home' AND name LIKE %s",
                          (f'{{"node": "{name2}"}}', f"%/servers/{partner}")).rowcount
            assert n == 1, n
        r = sql.arm(via1, "POST", sql.sql_path(via1, partner, f"/databases/{db}/replicationLinks/{lid}/failover"))
        assert r.status_code == 409 and r.json()["error"]["code"] == "CrossNodeOperationNotSupported", r.text
    finally:
        for n in (first, *first.cluster):
            n.stop()


def test_a_sql_server_whose_home_is_lost_is_taken_over_from_the_bucket_losing_no_commit(tmp_path):
    """Issue 14: a SQL server's home lost for good (kill -9, its data directory deleted). Two
    nodes serving SQL on one store and one bucket (`--blobs s3://…`), log backups every two
    seconds: server A lives on node 1, rows committed through psycopg and backed up (full, then
    log backups, each file uploaded to the bucket before its record), then more rows committed
    and acknowledged right before the kill (in no backup: in the live log, shipped before each
    commit was acknowledged). Node 1 lost: through node 2, A first answers 503 naming node 1,
    then, once node 1's presence has lapsed, node 2 takes A over (its live log fenced, its
    backups and live log replayed) and serves every acknowledged row through psycopg and psql.
    A new server B lands on node 2, and a point-in-time restore of A's database onto B (through
    ARM and through `kagi sql db restore --source-server`) holds them too. Nothing in the
    bucket holds a row in the clear."""
    import subprocess
    import uuid

    import psycopg
    import test_sql as sql
    from conftest import KAGI_BIN, LOCATION, S3Bucket

    blobs = f"{s3_blobs_url().rstrip('/')}/nodes-{uuid.uuid4().hex}"
    env = {"KAGI_SQL_LOG_BACKUP_SECONDS": "2", "KAGI_SQL_FULL_BACKUP_SECONDS": "3600"}
    first = start_sql_cluster(tmp_path, 2, env=env, blobs=blobs)
    n2 = first.cluster[0]
    bucket = S3Bucket.from_url(blobs)
    try:
        first.put_rg(DEFAULT_RG)
        via1 = Via(first, first)
        name1 = node_name(first)
        lost, _ = sql.create_server(via1, identity=False)
        db, made = sql.create_db(via1, lost)
        database_id = made["properties"]["databaseId"].lower()

        def dsn(node, server, database):
            return sql_dsn(node, server, database, n2.ca_path)

        def backups():
            return sql.ok(sql.arm(via1, "GET", sql.sql_path(via1, lost, f"/databases/{db}/backups")))["value"]

        def next_backup(seen):
            got, _ = until(lambda: (lambda v: v if len(v) > seen else None)(backups()), bound=60)
            return len(got), got[-1]["properties"]

        # The first full backup is taken before the database is acknowledged.
        seen, newest = len(backups()), backups()[0]["properties"]
        assert seen >= 1 and newest["backupType"] == "Full", newest
        with psycopg.connect(dsn(first, lost, db), autocommit=True) as c:
            c.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
            c.execute("INSERT INTO t VALUES " + ",".join(f"({i}, 'batch 1')" for i in range(1, 21)))
        seen, newest = next_backup(seen)
        with psycopg.connect(dsn(first, lost, db), autocommit=True) as c:
            c.execute("INSERT INTO t VALUES " + ",".join(f"({i}, 'batch 2')" for i in range(21, 41)))
        seen, newest = next_backup(seen)
        assert newest["backupType"] == "Log", newest
        # Acknowledged one by one, the last right before the kill: in no backup.
        with psycopg.connect(dsn(first, lost, db), autocommit=True) as c:
            for i in range(41, 51):
                c.execute("INSERT INTO t VALUES (%s, 'batch 3')", (i,))
            first.kill9()
        shutil.rmtree(first.data_dir)
        # Every file of A's backups and live log is in the bucket, ciphertext: no row in the
        # clear.
        objects = bucket.list(f"sql-backups/{database_id}")
        assert any(o.startswith("full-") for o in objects) and sum(o.startswith("log-") for o in objects) >= 2, objects
        pieces = bucket.list(f"sql-live/{database_id}")
        assert pieces, "the live log is in the bucket"
        for o in objects:
            assert b"batch 2" not in bucket.get(f"sql-backups/{database_id}/{o}"), o
        for o in pieces:
            assert b"batch 3" not in bucket.get(f"sql-live/{database_id}/{o}"), o

        via2 = Via(n2, n2)
        r = sql.arm(via2, "GET", sql.sql_path(via2, lost))
        assert r.status_code == 503 and name1 in r.json()["error"]["message"], (r.status_code, r.text)
        # Once node 1's presence has lapsed (about 10 s), node 2 takes A over.
        started = time.monotonic()
        until(lambda: sql.arm(via2, "GET", sql.sql_path(via2, lost)).status_code == 200, bound=60)
        print(f"\nserver A taken over by node 2 {time.monotonic() - started:.1f} s after the loss of node 1")
        with psycopg.connect(dsn(n2, lost, db), autocommit=True) as c:
            rows = c.execute("SELECT v, count(*) FROM t GROUP BY v ORDER BY v").fetchall()
            assert rows == [("batch 1", 20), ("batch 2", 20), ("batch 3", 10)], rows
        p = subprocess.run(["psql", dsn(n2, lost, db), "-X", "-qAt", "-v", "ON_ERROR_STOP=1",
                            "-c", "SELECT count(*), max(id) FROM t"],
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stderr
        assert p.stdout.strip() == "50|50", p.stdout
        # Its live log goes on from node 2 (a fence where node 1 would have shipped next).
        with psycopg.connect(dsn(n2, lost, db), autocommit=True) as c:
            c.execute("INSERT INTO t VALUES (51, 'on node 2')")
        assert (n2.data_dir / "sql" / f"{database_id}.db").exists()

        # A new server through node 2 (the live node serving SQL), and A's database restored
        # onto it from the bucket, to now.
        target = random_name("sqlb", 10).lower()
        body = {"location": LOCATION,
                "properties": {"administratorLogin": sql.ADMIN, "administratorLoginPassword": sql.PASSWORD}}
        until(lambda: sql.arm(via2, "PUT", sql.sql_path(via2, target), body).status_code in (200, 201), bound=40)
        time.sleep(1.1)
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        restore = {"location": LOCATION, "properties": {
            "createMode": "PointInTimeRestore",
            "sourceDatabaseId": sql.sql_path(via2, lost, f"/databases/{db}"),
            "restorePointInTime": now}}
        got = sql.ok(sql.arm(via2, "PUT", sql.sql_path(via2, target, f"/databases/{db}"), restore), 201)
        assert got["properties"]["status"] == "Online", got
        assert got["properties"]["databaseId"].lower() != database_id, got
        with psycopg.connect(dsn(n2, target, db), autocommit=True) as c:
            n = c.execute("SELECT count(*) FROM t WHERE id <= 50").fetchone()[0]
            assert n == 50, n
        # The same with kagi's CLI (docs/SEVERAL_NODES.md), through node 2's data directory.
        cli = subprocess.run(
            [str(KAGI_BIN), "sql", "db", "restore", "-s", target, "-g", DEFAULT_RG, "-n", "viacli",
             "--source", db, "--source-server", lost, "--time", now, "--server", n2.base,
             "--data-dir", str(n2.data_dir), "--output", "json"],
            capture_output=True, text=True, timeout=120)
        assert cli.returncode == 0, cli.stderr
        with psycopg.connect(dsn(n2, target, "viacli"), autocommit=True) as c:
            assert c.execute("SELECT count(*) FROM t WHERE id <= 50").fetchone()[0] == 50
        dbs = sql.ok(sql.arm(via2, "GET", sql.sql_path(via2, target, "/databases")))
        assert sorted(d["name"] for d in dbs["value"]) == sorted([db, "viacli"]), dbs
        # A's DELETE, served by node 2 (its home now): A, its database and its live log go.
        sql.ok(sql.arm(via2, "DELETE", sql.sql_path(via2, lost)), 200, 202, 204)
        assert sql.arm(via2, "GET", sql.sql_path(via2, lost)).status_code == 404
        assert sql.arm(via2, "GET", sql.sql_path(via2, lost, f"/databases/{db}")).status_code == 404
        # Only fences are left of its live log (the takeover's, where node 1 would have shipped
        # next, and the deletion's, which no home passes).
        left = bucket.list(f"sql-live/{database_id}")
        assert len(left) == 2 and all(bucket.get(f"sql-live/{database_id}/{o}").startswith(b"kagi-sql-fence")
                                      for o in left), left
        with psycopg.connect(dsn(n2, target, db), autocommit=True) as c:
            assert c.execute("SELECT count(*) FROM t").fetchone()[0] >= 50
    finally:
        for n in (first, *first.cluster):
            n.stop()


def test_a_home_records_no_backup_while_another_node_takes_its_server_over(tmp_path):
    """Issue 14: a takeover marks the server's home record before it fences the old home off,
    and from then on a backup pass of the old home records nothing (a pass it had under way
    when it was cut off must not add a branch to the server's backups after the takeover read
    them); a mark whose takeover's lease lapsed (its node died before it fenced anything) is
    taken away, and the home's backups go on. Fault injection through the store: the mark and
    the lease are written as a takeover by a node 'ghost' would write them."""
    import json

    import psycopg
    import test_sql as sql

    first = start_sql_cluster(tmp_path, 1, env={"KAGI_SQL_LOG_BACKUP_SECONDS": "1"})
    store = first.extra_args[first.extra_args.index("--store") + 1]
    try:
        first.put_rg(DEFAULT_RG)
        via = Via(first, first)
        server, _ = sql.create_server(via, identity=False)
        db, _ = sql.create_db(via, server)
        dsn = sql_dsn(first, server, db, first.ca_path)
        session = psycopg.connect(dsn, autocommit=True)
        session.execute("CREATE TABLE t (id int PRIMARY KEY)")
        with psycopg.connect(store, autocommit=True) as c:
            home_id, home = c.execute(
                "SELECT name, body FROM service_documents WHERE kind = 'home' AND name LIKE %s",
                (f"%/servers/{server}",)).fetchone()

            def records():
                return c.execute("SELECT count(*) FROM service_documents WHERE kind LIKE 'sqlbackup/%%'"
                                 ).fetchone()[0]

            rows = iter(range(1000, 2000))

            def backed_up_since(n):
                """Waits until a backup is recorded past `n` records, a row committed now and then."""
                def check():
                    session.execute("INSERT INTO t VALUES (%s)", (next(rows),))
                    time.sleep(0.25)
                    return records() > n
                until(check, bound=30)
            backed_up_since(records())
            marked = {**json.loads(home), "takingOver": {"node": "ghost", "number": 9}}
            lease = f"sql-takeover:{home_id}"
            c.execute("INSERT INTO kagi_leases (name, holder, fencing, expires) "
                      "VALUES (%s, 'ghost', 1, now() + interval '1 hour')", (lease,))
            c.execute("UPDATE service_documents SET body = %s WHERE kind = 'home' AND name = %s",
                      (json.dumps(marked), home_id))
            # A pass that read the home record before the mark may still be recording.
            time.sleep(2)
            before = records()
            for i in range(4):
                session.execute("INSERT INTO t VALUES (%s)", (i,))
                time.sleep(1)
            assert records() == before, "the home recorded backups while its server was being taken over"
            # The takeover's node died: its lease lapses, the mark goes, backups go on.
            c.execute("UPDATE kagi_leases SET expires = now() - interval '1 second' WHERE name = %s",
                      (lease,))
            backed_up_since(before)
            body = json.loads(c.execute("SELECT body FROM service_documents WHERE kind = 'home' AND name = %s",
                                        (home_id,)).fetchone()[0])
            assert body == json.loads(home), body
        session.close()
    finally:
        for n in (first, *first.cluster):
            n.stop()


def test_a_sql_home_whose_copy_is_older_than_its_live_log_rebuilds_from_the_bucket(tmp_path):
    """Issue 14: a home whose data directory is older than what it acknowledged (here its
    database files put back from a copy taken before five more commits, as a restore of the
    machine from an old snapshot would) must not carry on from its stale copy. Its first backup
    pass finds its log behind its backups (or its first commit finds the live log in the
    bucket ahead of its log: that session ends with FATAL 57P01, the transaction
    unacknowledged), nothing of the stale copy is backed up, and the home rebuilds the database
    from the bucket (backups and live log) with every acknowledged row."""
    import psycopg
    import test_sql as sql

    # No backup pass after the first full backup: the log keeps its generation.
    env = {"KAGI_SQL_LOG_BACKUP_SECONDS": "3600", "KAGI_SQL_FULL_BACKUP_SECONDS": "3600"}
    first = start_sql_cluster(tmp_path, 1, env=env, blobs=shared_bucket())
    try:
        first.put_rg(DEFAULT_RG)
        via = Via(first, first)
        server, _ = sql.create_server(via, identity=False)
        db, created = sql.create_db(via, server)
        dsn = sql_dsn(first, server, db, first.ca_path)
        files = first.data_dir / "sql"
        database_id = created["properties"]["databaseId"]

        def insert(ids):
            with psycopg.connect(dsn, autocommit=True) as c:
                for i in ids:
                    c.execute("INSERT INTO t VALUES (%s)", (i,))

        with psycopg.connect(dsn, autocommit=True) as c:
            c.execute("CREATE TABLE t (id int PRIMARY KEY)")
        insert(range(1, 6))
        first.kill9()
        old = tmp_path / "old-copy"
        old.mkdir()
        for f in files.glob(f"{database_id}.db*"):
            shutil.copy2(f, old / f.name)
        first.start()

        def up():
            try:
                insert([6])
                return True
            except psycopg.OperationalError:
                return None  # its SQL endpoint is not listening yet
        until(up, bound=30)
        insert(range(7, 11))
        first.kill9()
        for f in files.glob(f"{database_id}.db*"):
            f.unlink()
        for f in old.iterdir():
            shutil.copy2(f, files / f.name)
        first.start()
        until(lambda: sql.arm(via, "GET", sql.sql_path(via, server)).status_code == 200, bound=30)
        start = time.monotonic()

        def rows():
            try:
                with psycopg.connect(dsn, autocommit=True) as c:
                    return [r[0] for r in c.execute("SELECT id FROM t ORDER BY id").fetchall()]
            except psycopg.OperationalError:
                return None  # ended while the database is rebuilt
        ids, _ = until(lambda: (got := rows()) is not None and got[-1:] == [10] and got, bound=60)
        print(f"\nrebuilt from the bucket {time.monotonic() - start:.1f} s after the start")
        assert ids == list(range(1, 11)), ids
        insert([11])
        with psycopg.connect(dsn, autocommit=True) as c:
            assert c.execute("SELECT count(*) FROM t").fetchone()[0] == 11
        assert "behind what was acknowledged: rebuilt from the bucket" in first.log_path.read_text()
    finally:
        for n in (first, *first.cluster):
            n.stop()


def test_a_paused_sql_home_closes_what_was_deleted_through_another_node(tmp_path):
    """Issue 14: a home deemed not running while it still runs (here paused past its presence
    lease) is not told of a DELETE served meanwhile by another node; once it runs again its
    keeper finds out: sessions to a database dropped, and then to a server deleted, through
    node 2 end (FATAL 57P01 saying why) and their files go, while another database's session
    carries on until its own server goes."""
    import signal

    import psycopg
    import test_sql as sql

    first = start_sql_cluster(tmp_path, 2, env={"KAGI_SQL_KEEPER_TICK_SECONDS": "1"})
    n2 = first.cluster[0]
    try:
        via1, via2, server, db, dsn = sql_server_on_node_1(first)
        other, made = sql.create_db(via1, server)
        other_file = first.data_dir / "sql" / f"{made['properties']['databaseId']}.db"
        assert other_file.exists()

        def session(database):
            c = psycopg.connect(dsn(first, database), autocommit=True)
            c.execute("CREATE TABLE IF NOT EXISTS t (v int)")
            return c

        kept, doomed = session(db), session(other)
        # The test's token is fetched before node 1 stops (the token endpoint may be node 1's).
        assert sql.arm(via2, "GET", sql.sql_path(via2, server)).status_code == 200

        def while_node_1_is_paused(path):
            first.proc.send_signal(signal.SIGSTOP)
            try:
                until(lambda: sql.arm(via2, "DELETE", path).status_code in (200, 202, 204), bound=60)
            finally:
                first.proc.send_signal(signal.SIGCONT)

        def ended(c, why):
            def check():
                try:
                    c.execute("SELECT count(*) FROM t")
                    time.sleep(0.2)
                    return None
                except psycopg.OperationalError as e:
                    return str(e)
            said, took = until(check, bound=30)
            assert why in said, said
            return took

        while_node_1_is_paused(sql.sql_path(via2, server, f"/databases/{other}"))
        took = ended(doomed, "dropped through another node")
        print(f"\na session to a database dropped through node 2 ended {took:.1f} s after node 1 resumed")
        until(lambda: not other_file.exists(), bound=10)
        kept.execute("INSERT INTO t VALUES (1)")
        kept_file = next(f for f in (first.data_dir / "sql").glob("*.db"))
        while_node_1_is_paused(sql.sql_path(via2, server))
        # (Its databases go with it: whichever the keeper sees first is said.)
        ended(kept, "through another node")
        until(lambda: not kept_file.exists(), bound=10)
    finally:
        for n in (first, *first.cluster):
            n.stop()


def test_a_paused_disk_home_ends_the_access_of_a_disk_deleted_through_another_node(tmp_path):
    """Issue 14: a disk's home deemed not running while it still runs (paused past its presence
    lease) keeps an access to the disk in memory; once it runs again and learns that the disk
    was deleted through node 2 meanwhile, its keeper ends that access: the old access URI
    serves nothing any more (it did until a restart)."""
    import signal

    import test_disks as disks

    first = start_sql_cluster(tmp_path, 2, env={"KAGI_DISK_KEEPER_TICK_SECONDS": "1"})
    n2 = first.cluster[0]
    try:
        first.put_rg(DEFAULT_RG)
        via1, via2 = Via(first, first), Via(first, n2)
        name, _ = disks.create_disk(via1)
        stale_uri = disks.grant_access(via1, name, "Read")
        assert str(first.data_dir) in stale_uri, stale_uri
        disks.run("qemu-img", "info", stale_uri)
        path = disks.compute_path(via2, "disks", name)
        # The test's token is fetched before node 1 stops (the token endpoint may be node 1's).
        assert disks.arm(via2, "GET", path).status_code == 200
        first.proc.send_signal(signal.SIGSTOP)
        try:
            until(lambda: disks.arm(via2, "DELETE", path).status_code in (200, 202, 204), bound=60)
        finally:
            first.proc.send_signal(signal.SIGCONT)
        resumed = time.monotonic()
        until(lambda: disks.run("qemu-img", "info", stale_uri, check=False).returncode != 0, bound=30)
        print(f"\nthe deleted disk's access ended {time.monotonic() - resumed:.1f} s after its home resumed")
    finally:
        for n in (first, *first.cluster):
            n.stop()


def shared_bucket():
    """A prefix of its own in the test bucket."""
    import uuid
    return f"{s3_blobs_url().rstrip('/')}/nodes-{uuid.uuid4().hex}"


def sql_dsn(node, server, database, ca_path):
    """A libpq connection string to `database` of SQL server `server` through `node`'s SQL
    endpoint, as the administrator, verifying the cluster's CA at `ca_path`."""
    import test_sql as sql
    return (f"host={server}.localhost hostaddr={node.listen_host} port={node.sql_port} "
            f"dbname={database} user={sql.ADMIN} password={sql.PASSWORD} sslmode=verify-full "
            f"sslrootcert={ca_path} connect_timeout=10")


def sql_server_on_node_1(first):
    """A SQL server and database made through node 1 of a SQL cluster: (via node 1, via node 2,
    server, database, dsn(node) for psycopg to that database through a node's SQL endpoint)."""
    import test_sql as sql
    n2 = first.cluster[0]
    first.put_rg(DEFAULT_RG)
    via1, via2 = Via(first, first), Via(n2, n2)
    server, _ = sql.create_server(via1, identity=False)
    db, _ = sql.create_db(via1, server)

    def dsn(node, database=db):
        return sql_dsn(node, server, database, n2.ca_path)
    return via1, via2, server, db, dsn


def take_over_while_node_1_is_paused(first, via2, server, dsn):
    """Node 1 paused (SIGSTOP) until node 2 has taken `server` over and committed row 100
    through it, then resumed."""
    import signal

    import psycopg
    import test_sql as sql
    n2 = first.cluster[0]
    # The test's token is fetched before node 1 stops (the token endpoint may be node 1's).
    assert sql.arm(via2, "GET", sql.sql_path(via2, server)).status_code == 200
    first.proc.send_signal(signal.SIGSTOP)
    try:
        until(lambda: sql.arm(via2, "GET", sql.sql_path(via2, server)).status_code == 200, bound=60)
        with psycopg.connect(dsn(n2), autocommit=True) as c:
            c.execute("INSERT INTO t VALUES (100)")
    finally:
        first.proc.send_signal(signal.SIGCONT)


def test_a_paused_sql_home_is_fenced_off_by_the_node_that_took_its_server_over(tmp_path):
    """Issue 14: a home that is cut off but still running must acknowledge nothing once another
    node took its server over. Two nodes on one store and bucket; server A on node 1, a psycopg
    session open on node 1 commits rows. Node 1 is paused (SIGSTOP) until its presence lapses;
    node 2 takes A over and commits a row of its own. Node 1 resumes: its session's next commit
    is refused (FATAL 57P01, its live log fenced off) and is not in A; a new connection to node 1
    is forwarded to node 2, which serves every row acknowledged anywhere. Node 1 restarted serves
    A through node 2 too (its old copy is never opened). Node 2 killed: node 1 takes A back from
    the bucket, with every acknowledged row and without the refused one."""

    import psycopg
    import test_sql as sql

    first = start_sql_cluster(tmp_path, 2, env={"KAGI_SQL_LOG_BACKUP_SECONDS": "2"}, blobs=shared_bucket())
    n2 = first.cluster[0]
    try:
        via1, via2, server, db, dsn = sql_server_on_node_1(first)

        old = psycopg.connect(dsn(first), autocommit=True)
        old.execute("CREATE TABLE t (id int PRIMARY KEY)")
        for i in range(1, 6):
            old.execute("INSERT INTO t VALUES (%s)", (i,))
        take_over_while_node_1_is_paused(first, via2, server, dsn)
        with pytest.raises(psycopg.OperationalError) as refused:
            old.execute("INSERT INTO t VALUES (6)")
        assert "another node took" in str(refused.value), refused.value
        old.close()
        for node in (first, n2):
            with psycopg.connect(dsn(node), autocommit=True) as c:
                ids = [r[0] for r in c.execute("SELECT id FROM t ORDER BY id").fetchall()]
                assert ids == [1, 2, 3, 4, 5, 100], (node.listen_host, ids)
        # Restarted, node 1 serves A through its new home.
        first.stop()
        first.start()

        def insert_through_node_1():
            try:
                with psycopg.connect(dsn(first), autocommit=True) as c:
                    c.execute("INSERT INTO t VALUES (101)")
                return True
            except psycopg.OperationalError:
                return None  # its SQL endpoint is not listening yet
        until(insert_through_node_1, bound=30)
        with psycopg.connect(dsn(n2), autocommit=True) as c:
            assert c.execute("SELECT count(*) FROM t").fetchone()[0] == 7
            c.execute("INSERT INTO t VALUES (102)")
        # Node 2 dies: node 1 takes A back, from the bucket (a second takeover: the backup node
        # 2 took and its pieces after it), not from its own stale copy (which holds row 6).
        n2.kill9()
        until(lambda: sql.arm(via1, "GET", sql.sql_path(via1, server)).status_code == 200, bound=60)
        with psycopg.connect(dsn(first), autocommit=True) as c:
            ids = [r[0] for r in c.execute("SELECT id FROM t ORDER BY id").fetchall()]
            assert ids == [1, 2, 3, 4, 5, 100, 101, 102], ids
            c.execute("INSERT INTO t VALUES (103)")
    finally:
        for n in (first, *first.cluster):
            n.stop()


def test_an_idle_restarted_sql_home_acknowledges_nothing_after_a_takeover(tmp_path):
    """Issue 14 (found by review): as the paused-home test, but node 1's session has committed
    nothing since node 1 restarted (its live log never looked at the bucket). After the
    takeover, node 1's next commit is refused (the fence of a later takeover than its home's),
    and node 2 keeps committing."""

    import psycopg
    import test_sql as sql

    first = start_sql_cluster(tmp_path, 2, env={"KAGI_SQL_LOG_BACKUP_SECONDS": "2"}, blobs=shared_bucket())
    n2 = first.cluster[0]
    try:
        via1, via2, server, db, dsn = sql_server_on_node_1(first)

        with psycopg.connect(dsn(first), autocommit=True) as c:
            c.execute("CREATE TABLE t (id int PRIMARY KEY)")
            for i in range(1, 6):
                c.execute("INSERT INTO t VALUES (%s)", (i,))
        # Node 1 restarted: still the home; its database's live log is new.
        first.stop()
        first.start()

        def connect_1():
            try:
                return psycopg.connect(dsn(first), autocommit=True)
            except psycopg.OperationalError:
                return None
        old, _ = until(connect_1, bound=30)
        assert old.execute("SELECT count(*) FROM t").fetchone()[0] == 5
        take_over_while_node_1_is_paused(first, via2, server, dsn)
        outcome = {}
        try:
            old.execute("INSERT INTO t VALUES (6)")
            outcome["node 1 commit"] = "ACKNOWLEDGED"
        except psycopg.OperationalError as e:
            outcome["node 1 commit"] = f"refused: {e}"
        try:
            with psycopg.connect(dsn(n2), autocommit=True) as c:
                c.execute("INSERT INTO t VALUES (101)")
                outcome["node 2 commit"] = "ok"
                outcome["node 2 rows"] = [r[0] for r in c.execute("SELECT id FROM t ORDER BY id").fetchall()]
        except psycopg.OperationalError as e:
            outcome["node 2 commit"] = f"refused: {e}"
        assert outcome["node 1 commit"].startswith("refused"), outcome
        assert outcome["node 2 commit"] == "ok", outcome
    finally:
        for n in (first, *first.cluster):
            n.stop()


def test_a_sql_server_whose_home_died_is_taken_over_with_no_request(tmp_path):
    """Issue 14: the takeover sweep. Server A on node 1 with a committed row; node 1 killed
    (kill -9, its data directory deleted) and no request sent. Node 2, which serves SQL and has
    seen node 1 absent for KAGI_TAKEOVER_AFTER seconds (here 2) after its presence lapsed, takes
    A over by itself: its log says so and A's database file is in its data directory before any
    client asks; then psycopg and psql through node 2 read the row."""
    import subprocess

    import psycopg
    import test_sql as sql

    first = start_sql_cluster(tmp_path, 2, env={"KAGI_TAKEOVER_AFTER": "2"}, blobs=shared_bucket())
    n2 = first.cluster[0]
    try:
        via1, via2, server, db, dsn = sql_server_on_node_1(first)
        with psycopg.connect(dsn(first), autocommit=True) as c:
            c.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
            c.execute("INSERT INTO t VALUES (1, 'before the kill')")
        database_id = sql.ok(sql.arm(via1, "GET", sql.sql_path(via1, server, f"/databases/{db}")))[
            "properties"]["databaseId"].lower()

        first.kill9()
        shutil.rmtree(first.data_dir)
        started = time.monotonic()
        # No request names A: node 2 takes it over by itself.
        until(lambda: in_log(n2, "taken over by the takeover sweep", f"/servers/{server}"), bound=60)
        print(f"\nSQL server taken over with no request {time.monotonic() - started:.1f} s after kill -9 of its home")
        assert in_log(n2, "SQL server taken over from the bucket"), n2.log_tail(40)
        assert (n2.data_dir / "sql" / f"{database_id}.db").exists()
        with psycopg.connect(dsn(n2), autocommit=True) as c:
            assert c.execute("SELECT id, v FROM t").fetchall() == [(1, "before the kill")]
            c.execute("INSERT INTO t VALUES (2, 'on node 2')")
        p = subprocess.run(["psql", dsn(n2), "-X", "-qAt", "-v", "ON_ERROR_STOP=1",
                            "-c", "SELECT count(*) FROM t"], capture_output=True, text=True, timeout=60)
        assert p.returncode == 0 and p.stdout.strip() == "2", (p.stdout, p.stderr)
    finally:
        for n in (first, *first.cluster):
            n.stop()


def kill_and_lose_data(node):
    """kill -9 of `node`, and its data lost: all but its copy of the cluster's CA, which the
    test's own requests verify."""
    node.kill9()
    for p in node.data_dir.iterdir():
        if p.name != "tls":
            shutil.rmtree(p) if p.is_dir() else p.unlink()


def first_taker(key, nodes):
    """The node of `nodes` (names) that takes over first what is keyed `key`: the rule of
    kagi_core::takeover::first_taker (rendezvous hashing, 64-bit FNV-1a and SplitMix64's mixer)
    written again, so that the test knows where each resource must go."""
    mask = (1 << 64) - 1

    def weight(node):
        h = 0xCBF29CE484222325
        for b in node.encode() + b"\xff" + key.encode():
            h = ((h ^ b) * 0x100000001B3) & mask
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & mask
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & mask
        return h ^ (h >> 31)
    return max(nodes, key=lambda n: (weight(n), n))


@pytest.mark.parametrize("by", ["sweep", "requests"])
def test_a_lost_nodes_servers_go_to_one_survivor_and_its_disks_spread_over_the_survivors(tmp_path, by):
    """Issue 14: who takes over. Three nodes on one store and bucket; node 1 holds two SQL servers
    (a row committed in each) and disks, made until the rule spreads their families over both
    other nodes. Node 1 killed (kill -9, its data directory deleted). Each family is taken over
    by its own first taker (rendezvous hashing over the running nodes), so the survivors share
    them; both servers by the first taker of node 1's name, so they stay on one node (operations
    joining two servers need that), the other survivor taking none. `sweep`: no request is sent
    (KAGI_TAKEOVER_AFTER=2). `requests`: no sweep in time (KAGI_TAKEOVER_AFTER=3600), and every
    request is sent through the survivor that must not take its resource over, which sends it on
    to the one that must. Then a connection through the other survivor reads each server's row."""
    import psycopg
    import test_disks as disks
    import test_sql as sql

    grace = "2" if by == "sweep" else "3600"
    first = start_sql_cluster(tmp_path, 3, env={"KAGI_TAKEOVER_AFTER": grace}, blobs=shared_bucket())
    n2, n3 = first.cluster[0], first.cluster[1]
    try:
        via1, _, server, db, _ = sql_server_on_node_1(first)
        server_b, _ = sql.create_server(via1, identity=False)
        db_b, _ = sql.create_db(via1, server_b)
        for s, d in ((server, db), (server_b, db_b)):
            with psycopg.connect(sql_dsn(first, s, d, n2.ca_path), autocommit=True) as c:
                c.execute("CREATE TABLE t (v text)")
                c.execute("INSERT INTO t VALUES (%s)", (s,))
        survivors = {node_name(n): n for n in (n2, n3)}

        def families():
            return {p.name for p in (first.data_dir / "disks").iterdir() if (p / "family").is_file()}
        takers, family_of = {}, {}
        for _ in range(24):
            before = families()
            name, _ = disks.create_disk(via1)
            (family,) = families() - before
            family_of[name] = family
            takers[family] = first_taker(family, survivors)
            if len(set(takers.values())) == 2:
                break
        assert len(set(takers.values())) == 2, takers
        sql_home = survivors[first_taker(node_name(first), survivors)]
        other = n3 if sql_home is n2 else n2

        kill_and_lose_data(first)
        started = time.monotonic()
        if by == "requests":
            for name, family in family_of.items():
                loser = n3 if survivors[takers[family]] is n2 else n2
                via = Via(first, loser)
                until(lambda: disks.arm(via, "GET", disks.compute_path(via, "disks", name)).status_code == 200,
                      bound=90)
            for s, d in ((server, db), (server_b, db_b)):
                def reads():
                    try:
                        with psycopg.connect(sql_dsn(other, s, d, n2.ca_path), autocommit=True,
                                             connect_timeout=30) as c:
                            return c.execute("SELECT v FROM t").fetchall() == [(s,)]
                    except psycopg.OperationalError:
                        return False
                until(reads, bound=90)

        def all_taken():
            return (all((survivors[t].data_dir / "disks" / f / "family").is_file() for f, t in takers.items())
                    and all(in_log(sql_home, "SQL server taken over from the bucket", f"/servers/{s}")
                            for s in (server, server_b)))
        until(all_taken, bound=90)
        print(f"\n{len(takers)} families and 2 servers taken over ({by}) {time.monotonic() - started:.1f} s after "
              f"kill -9 of their home: families on {sorted(survivors[t].data_dir.name for t in takers.values())}")
        for f, t in takers.items():
            loser = n3 if survivors[t] is n2 else n2
            assert not (loser.data_dir / "disks" / f / "family").exists(), f
        assert not in_log(other, "SQL server taken over from the bucket"), other.log_tail(40)
        for s, d in ((server, db), (server_b, db_b)):
            with psycopg.connect(sql_dsn(other, s, d, n2.ca_path), autocommit=True) as c:
                assert c.execute("SELECT v FROM t").fetchall() == [(s,)]
    finally:
        for n in (first, *first.cluster):
            n.stop()


def test_a_lost_nodes_servers_go_to_the_node_that_serves_the_others(tmp_path):
    """Issue 14: SQL servers stay on one node. Three nodes; server A (a row committed) on node 1,
    killed; server B made meanwhile lives on the survivor it was made through, chosen as the
    one the hash would not pick for node 1's servers. A request for A through the other
    survivor (the hash's pick) is sent to B's node, which takes A over: A and B on one node."""
    import psycopg
    import test_sql as sql

    first = start_sql_cluster(tmp_path, 3, env={"KAGI_TAKEOVER_AFTER": "3600"}, blobs=shared_bucket())
    n2, n3 = first.cluster[0], first.cluster[1]
    try:
        via1, _, server, db, dsn = sql_server_on_node_1(first)
        with psycopg.connect(dsn(first), autocommit=True) as c:
            c.execute("CREATE TABLE t (v text)")
            c.execute("INSERT INTO t VALUES ('on node 1')")
        survivors = {node_name(n): n for n in (n2, n3)}
        picked = survivors[first_taker(node_name(first), survivors)]
        holder = n3 if picked is n2 else n2
        via_holder, via_picked = Via(first, holder), Via(first, picked)
        # The test's token, fetched before node 1 (maybe the token endpoint) stops.
        assert sql.arm(via_holder, "GET", sql.sql_path(via_holder, server)).status_code == 200

        kill_and_lose_data(first)
        # Once node 1's presence has lapsed, a new server goes to the node it is made through.
        # (No request names A before B exists: it would have A taken over.) Made once node 1's
        # presence has lapsed (503 before: B would go to node 1, the node of the others).
        server_b = random_name("sqlb", 10).lower()

        def made():
            r = sql.arm(via_holder, "PUT", sql.sql_path(via_holder, server_b),
                        {"location": sql.LOCATION, "properties": {
                            "administratorLogin": sql.ADMIN, "administratorLoginPassword": sql.PASSWORD}})
            return r.status_code in (200, 201)
        until(made, bound=30)
        db_b, _ = sql.create_db(via_holder, server_b)
        assert list((holder.data_dir / "sql").glob("*.db")), "B does not live on the node it was made through"

        until(lambda: sql.arm(via_picked, "GET", sql.sql_path(via_picked, server)).status_code == 200, bound=90)
        assert in_log(holder, "SQL server taken over from the bucket", f"/servers/{server}"), holder.log_tail(40)
        assert not in_log(picked, "SQL server taken over from the bucket"), picked.log_tail(40)
        with psycopg.connect(sql_dsn(picked, server, db, n2.ca_path), autocommit=True) as c:
            assert c.execute("SELECT v FROM t").fetchall() == [("on node 1",)]
        # An operation joining the two servers runs (one node): a geo-secondary of A's database
        # on B (refused with 409 CrossNodeOperationNotSupported across nodes).
        r = sql.arm(via_picked, "PUT", sql.sql_path(via_picked, server_b, f"/databases/{db}"),
                    {"location": "westus2", "properties": {
                        "createMode": "Secondary",
                        "sourceDatabaseId": sql.sql_path(via_picked, server, f"/databases/{db}")}})
        assert r.status_code in (200, 201, 202), (r.status_code, r.text)
    finally:
        for n in (first, *first.cluster):
            n.stop()


def test_a_disk_and_a_sql_server_whose_home_is_down_are_deleted_through_another_node(tmp_path):
    """Issue 14: a DELETE of a disk, snapshot, SQL server or database whose home is not running
    is served by the node it reached (without a bucket: nothing is taken over). Node 1 holds a
    disk with an incremental snapshot (one family) and a server with two databases; killed (kill -9), every other request
    for them through node 2 answers 503 naming it, but their DELETEs, once its presence has
    lapsed, are served by node 2: gone (404). Node 1 restarted on the same data directory
    serves none of them: no database file, no disk family left (removed at its start, logged),
    no NBD export of its old access, no PostgreSQL session for the deleted server."""
    import psycopg
    import test_disks as disks
    import test_sql as sql
    from conftest import LOCATION

    first = start_sql_cluster(tmp_path, 2)
    n2 = first.cluster[0]
    try:
        first.put_rg(DEFAULT_RG)
        via1, via2 = Via(first, first), Via(first, n2)
        name1 = node_name(first)
        # On node 1: a disk, written, and an incremental snapshot of it (one family) …
        name, disk = disks.create_disk(via1)
        uri = disks.grant_access(via1, name, "Write")
        assert str(first.data_dir) in uri, uri
        disks.run("qemu-io", "-f", "raw", "-c", "write -P 0x46 0 1M", uri)
        disks.end_access(via1, name)
        snap = random_name("snap", 10)
        source = {"createOption": "Copy", "sourceResourceId": disk["id"]}
        disks.ok(disks.arm(via1, "PUT", disks.compute_path(via1, "snapshots", snap),
                           {"location": LOCATION, "properties": {"creationData": source, "incremental": True}}))
        # … an access left open …
        stale_uri = disks.grant_access(via1, name, "Read")
        families = [p for p in (first.data_dir / "disks").iterdir() if (p / "family").is_file()]
        assert len(families) == 1, families
        # … and a server with two databases.
        server, _ = sql.create_server(via1, identity=False)
        db, made = sql.create_db(via1, server)
        other, _ = sql.create_db(via1, server)
        files = [first.data_dir / "sql" / f"{made['properties']['databaseId']}.db"]
        assert files[0].exists()

        def dsn(node, database):
            return sql_dsn(node, server, database, first.ca_path)

        with psycopg.connect(dsn(first, db), autocommit=True) as c:
            c.execute("CREATE TABLE t (v text)")
            c.execute("INSERT INTO t VALUES ('on node 1')")

        first.kill9()
        disk_path = disks.compute_path(via2, "disks", name)
        snap_path = disks.compute_path(via2, "snapshots", snap)
        # Once node 1's presence has lapsed, node 2 serves the DELETE of a database …
        started = time.monotonic()
        until(lambda: sql.arm(via2, "DELETE", sql.sql_path(via2, server, f"/databases/{other}")).status_code
              in (200, 202, 204), bound=40)
        print(f"\na database deleted through node 2 {time.monotonic() - started:.1f} s after kill -9 of its home")
        # … while every other request waits for the home: 503 naming it.
        for r in (sql.arm(via2, "GET", sql.sql_path(via2, server)),
                  sql.arm(via2, "GET", sql.sql_path(via2, server, f"/databases/{db}")),
                  disks.arm(via2, "GET", disk_path),
                  disks.arm(via2, "POST", disk_path + "/beginGetAccess",
                            {"access": "Read", "durationInSeconds": 600})):
            assert r.status_code == 503 and name1 in r.json()["error"]["message"], (r.status_code, r.text)
        # The server (with its last database), the snapshot and the disk go.
        sql.ok(sql.arm(via2, "DELETE", sql.sql_path(via2, server)), 200, 202, 204)
        disks.ok(disks.arm(via2, "DELETE", snap_path), 200, 202, 204)
        disks.ok(disks.arm(via2, "DELETE", disk_path), 200, 202, 204)
        for r in (sql.arm(via2, "GET", sql.sql_path(via2, server)),
                  sql.arm(via2, "GET", sql.sql_path(via2, server, f"/databases/{db}")),
                  disks.arm(via2, "GET", disk_path), disks.arm(via2, "GET", snap_path)):
            assert r.status_code == 404, (r.status_code, r.text)
        # A repeated DELETE is a 204, as for anything gone.
        assert disks.arm(via2, "DELETE", disk_path).status_code in (200, 204)
        assert sql.arm(via2, "DELETE", sql.sql_path(via2, server)).status_code in (200, 204)

        # Node 1 back on its data directory: what was deleted is never served nor opened, and
        # its files go.
        first.start()
        until(lambda: up(via1), bound=30)
        until(lambda: not files[0].exists(), bound=30)
        assert not any((p / "family").is_file() for p in (first.data_dir / "disks").iterdir())
        log = first.log_path.read_text(errors="replace")
        assert "orphan database file removed" in log and "disk family no disk" in log, first.log_tail(40)
        for via in (via1, via2):
            assert disks.arm(via, "GET", disks.compute_path(via, "disks", name)).status_code == 404
            assert sql.arm(via, "GET", sql.sql_path(via, server)).status_code == 404
        r = disks.run("qemu-img", "info", stale_uri, check=False)
        assert r.returncode != 0, r.stdout
        for node in (first, n2):
            with pytest.raises(psycopg.OperationalError):
                psycopg.connect(dsn(node, db))
        assert up(via1) and up(via2)
    finally:
        for n in (first, *first.cluster):
            n.stop()
