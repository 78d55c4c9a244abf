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

# A notification reaches the other node at once; the re-check (1 s) covers a lost one.
BOUND_S = 5.0


def pg_server_url() -> str:
    url = os.environ.get("KAGI_TEST_POSTGRES_URL")
    if not url:
        if os.environ.get("KAGI_REQUIRE_POSTGRES") == "1":
            pytest.fail("KAGI_REQUIRE_POSTGRES=1 but KAGI_TEST_POSTGRES_URL is not set")
        pytest.skip("no PostgreSQL: set KAGI_TEST_POSTGRES_URL (scripts/test.sh does)")
    return url


def start_nodes(tmp_path, count=2, extra_args=None):
    """Node 1 initialises the store; the others get a copy of its root key, CA and admin file."""
    store = scratch_pg_database(pg_server_url())
    args = ["--store", store, *(extra_args or [])]
    first = _start_server(tmp_path, "node1", args)
    nodes = [first]
    for i in range(2, count + 1):
        data = tmp_path / f"node{i}-data"
        data.mkdir(mode=0o700)
        shutil.copy2(first.data_dir / "root.key", data / "root.key")
        shutil.copytree(first.data_dir / "tls", data / "tls")
        shutil.copy2(first.admin_path, data / "bootstrap-admin.json")
        nodes.append(_start_server(tmp_path, f"node{i}", args))
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
