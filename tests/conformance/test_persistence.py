"""Durability: kill -9 and restart on the same data dir (own server, own data dir)."""

import os
import threading
import time
from datetime import datetime, timedelta, timezone

from azure.keyvault.keys.crypto import KeyWrapAlgorithm

from conftest import random_name


def snapshot(client, names):
    """Everything observable about the given keys: every version's attributes and tags (from the versions
    listing, which works for disabled keys too) plus public material of enabled versions."""
    out = {}
    for n in names:
        versions = {}
        for p in client.list_properties_of_key_versions(n):
            entry = dict(
                id=p.id,
                enabled=p.enabled,
                nbf=p.not_before,
                exp=p.expires_on,
                created=p.created_on,
                updated=p.updated_on,
                tags=p.tags,
                recovery_level=p.recovery_level,
                recoverable_days=p.recoverable_days,
            )
            if p.enabled:
                k = client.get_key(n, p.version)
                entry.update(
                    kty=k.key_type,
                    n=k.key.n,
                    e=k.key.e,
                    crv=k.key.crv,
                    x=k.key.x,
                    y=k.key.y,
                    ops=sorted(k.key_operations or []),
                )
            versions[p.version] = entry
        assert versions, f"no versions listed for {n}"
        latest = client.get_key(n).id if all(e["enabled"] for e in versions.values()) else None
        out[n] = dict(latest=latest, versions=versions)
    return out


def test_keys_survive_kill9(hsm_kagi):
    # With an HSM: its RSA-HSM key, and the root key it seals, survive kill -9 too.
    srv = hsm_kagi
    admin_before = srv.admin_path.read_bytes()
    ca_before = srv.ca_path.read_bytes()
    assert oct(srv.admin_path.stat().st_mode & 0o777) == "0o600"

    v = srv.create_vault(sku="premium")
    c = v.client
    soon = datetime.now(timezone.utc).replace(microsecond=0) + timedelta(days=10)
    past = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(days=1)

    rsa1 = c.create_rsa_key("dek-kek", size=2048, tags={"purpose": "kek"})
    rsa2 = c.rotate_key("dek-kek")
    rsa3 = c.create_rsa_key("dek-kek", size=3072, expires_on=soon)
    c.update_key_properties("dek-kek", rsa2.properties.version, tags={"state": "old"}, not_before=past)
    c.create_ec_key("signer", curve="P-384", key_operations=["sign", "verify"])
    c.create_rsa_key("hsm", size=2048, hardware_protected=True)
    c.create_ec_key("disabled", enabled=False)
    c.create_ec_key("gone")
    c.begin_delete_key("gone").wait()

    dek = os.urandom(32)
    wrapped = {
        k.properties.version: srv.crypto_client(k).wrap_key(KeyWrapAlgorithm.rsa_oaep_256, dek).encrypted_key
        for k in (rsa1, rsa2, rsa3)
    }
    names = ["dek-kek", "signer", "hsm", "disabled"]
    before = snapshot(c, names)
    deleted_before = c.get_deleted_key("gone")

    srv.restart(hard=True)

    assert srv.admin_path.read_bytes() == admin_before, "bootstrap-admin.json changed on restart"
    assert srv.ca_path.read_bytes() == ca_before, "CA changed on restart"

    # a brand-new credential and client (nothing cached in this process for them)
    fresh = srv.key_client(v.url, credential=srv.new_credential())
    after = snapshot(fresh, names)
    assert after == before
    assert sorted(p.name for p in fresh.list_properties_of_keys()) == sorted(names)
    d = fresh.get_deleted_key("gone")
    assert d.recovery_id == deleted_before.recovery_id
    assert d.deleted_date == deleted_before.deleted_date
    assert d.scheduled_purge_date == deleted_before.scheduled_purge_date

    for version, blob in wrapped.items():
        cc = srv.crypto_client(f"{v.url}keys/dek-kek/{version}", credential=srv.new_credential())
        assert cc.unwrap_key(KeyWrapAlgorithm.rsa_oaep_256, blob).key == dek

    # the vault itself (management plane) survived too
    g = srv.get_vault(v.name)
    assert g.status_code == 200, g.text
    assert g.json()["properties"]["sku"]["name"] == "premium"
    assert g.json()["properties"]["vaultUri"] == v.url

    # the pre-existing client (pooled connections died with the server) still works: same CA, same port
    assert c.get_key("signer").id == before["signer"]["latest"]


def test_tokens_issued_before_restart_stay_valid(private_kagi):
    """Long-running SDK clients keep a cached token; after a kagi restart the SDK re-sends it. If it were
    rejected, the SDK would fetch the same cached token again from MSAL and fail, so the token-signing key
    must persist across restarts (like Entra ID's)."""
    srv = private_kagi
    v = srv.create_vault()
    v.client.create_ec_key("k")
    token = srv.token()
    srv.restart(hard=True)
    r = srv.request("GET", v.data_url("/keys"), auth=False, headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200, r.text[:300]
    assert [item["kid"] for item in r.json()["value"]] == [f"{v.url}keys/k"]
    # and through the SDK with its cached challenge and token
    assert v.client.get_key("k").name == "k"


def test_graceful_restart(private_kagi):
    srv = private_kagi
    v = srv.create_vault()
    k = v.client.create_rsa_key("k", size=2048)
    rc = srv.stop()
    assert rc == 0, f"SIGTERM should exit cleanly, got {rc}\n{srv.log_tail()}"
    srv.start()
    # fresh credential: token survival is test_tokens_issued_before_restart_stay_valid's business
    assert srv.key_client(v.url, credential=srv.new_credential()).get_key("k").id == k.id


def test_acknowledged_creates_survive_kill9_under_load(private_kagi):
    srv = private_kagi
    v = srv.create_vault()
    # retry_total=0 (conftest default): a request cut by the kill fails instead of being retried later
    client = srv.key_client(v.url)
    client.create_ec_key("warmup")  # challenge + token before the load starts

    acked = []
    errors = []
    stop = threading.Event()

    def loop():
        i = 0
        while not stop.is_set():
            name = f"load-{i:05d}"
            try:
                k = client.create_ec_key(name, curve="P-256", tags={"i": str(i)})
            except Exception as exc:  # the kill interrupts one in-flight request
                errors.append(repr(exc))
                return
            acked.append((name, k.properties.version))
            i += 1

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    deadline = time.monotonic() + 20
    while len(acked) < 15 and time.monotonic() < deadline and t.is_alive():
        time.sleep(0.05)
    assert len(acked) >= 15, f"only {len(acked)} creates acknowledged before the kill; errors={errors}"
    srv.kill9()
    stop.set()
    t.join(30)
    assert not t.is_alive()
    n_acked = len(acked)

    srv.start()
    check = srv.key_client(v.url, credential=srv.new_credential())
    present = {p.name for p in check.list_properties_of_keys()}
    missing = [name for name, _ in acked if name not in present]
    assert not missing, f"{len(missing)} of {n_acked} acknowledged keys lost: {missing[:10]}"
    for name, version in acked:
        k = check.get_key(name, version)
        assert k.properties.tags == {"i": str(int(name.split("-")[1]))}
    # at most the one in-flight create may have landed beyond the acknowledged ones
    extra = present - {n for n, _ in acked} - {"warmup"}
    assert len(extra) <= 1, extra
    # and the store keeps working after recovery
    check.create_ec_key(random_name("post", 12))
