"""BK-9: backup vaults and resource moves, subscriptions and tenant moves.

- A backup vault with the platform key moves between resource groups and subscriptions (ARM's
  `moveResources`, driven through `kagi backup vault move`, `kagi resource move` and Azure's
  own long-running-operation poller) and still backs up and restores.
- A vault encrypted with a customer-managed key is refused, by the move and by its validation,
  through the API and the CLI.
- After its subscription moves to another tenant, a CMK vault's backups and restores fail with
  an error naming the cause and the fix, until its identity and key are configured again in the
  new tenant; then earlier recovery points restore byte for byte.
"""

import hashlib
import json
import os
import subprocess
import uuid
from pathlib import Path

import pytest
import requests

from conftest import DEFAULT_RG, KAGI_BIN, LOCATION, RG_API, _start_server, random_name

# Moves rename the vault's folder; with the blobs in a bucket they are refused (test_several_nodes).
pytestmark = [pytest.mark.cli, pytest.mark.local_blobs]

RESOURCES_API = "2021-04-01"
KEY_PERMS = ["get", "list", "wrapKey", "unwrapKey"]


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def kagi_cli(srv, *args, subscription=None, timeout=300):
    """`kagi <args> --output json` against `srv`, in `subscription` (AZURE_SUBSCRIPTION_ID)."""
    env = dict(os.environ)
    for k in ("AZURE_TENANT_ID", "AZURE_CLIENT_ID", "AZURE_CLIENT_SECRET", "AZURE_SUBSCRIPTION_ID"):
        env.pop(k, None)
    if subscription:
        env["AZURE_SUBSCRIPTION_ID"] = subscription
    cmd = [str(KAGI_BIN), *args, "--server", srv.base, "--data-dir", str(srv.data_dir), "--output", "json"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def ok(p):
    assert p.returncode == 0, f"exit {p.returncode}\n--- stdout\n{p.stdout[-3000:]}\n--- stderr\n{p.stderr[-3000:]}"
    return json.loads(p.stdout) if p.stdout.strip() else None


def refused(p, *needles):
    assert p.returncode != 0, f"expected a refusal, got success:\n{p.stdout[-2000:]}"
    for n in needles:
        assert n in p.stderr, f"{n!r} not in stderr:\n{p.stderr[-3000:]}"
    return p.stderr


def make_tree(root: Path) -> None:
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "a.txt").write_text("hello moves\n")
    (root / "sub" / "deeper" / "mid.bin").write_bytes(os.urandom(300_000))
    (root / "sub" / "big.bin").write_bytes(os.urandom(1_500_000))
    os.symlink("sub/big.bin", root / "link")


def manifest(root: Path) -> dict:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                out[rel] = ("dir",)
            else:
                out[rel] = ("file", hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def rg_id(sub, rg):
    return f"/subscriptions/{sub}/resourceGroups/{rg}"


def bv_id(sub, rg, name):
    return f"{rg_id(sub, rg)}/providers/Microsoft.RecoveryServices/vaults/{name}"


def put_rg(srv, sub, rg):
    r = srv.request("PUT", srv.arm(f"/subscriptions/{sub}/resourcegroups/{rg}", RG_API), json={"location": LOCATION})
    assert r.status_code in (200, 201), r.text


def new_subscription(srv):
    out = ok(kagi_cli(srv, "subscription", "create"))
    assert out["tenantId"] == srv.tenant_id, out
    return out["subscriptionId"]


def vref(name, rg):
    return ["--vault", name, "--resource-group", rg]


def backup_now(srv, name, rg, item, subscription=None):
    job = ok(kagi_cli(srv, "backup", "now", *vref(name, rg), "--item", item, subscription=subscription))
    assert job["status"] == "Completed", job
    return job["stats"]["recoveryPointId"]


def restore_same(srv, name, rg, item, rp, target: Path, expected: dict, subscription=None):
    target.mkdir(parents=True)
    job = ok(kagi_cli(srv, "backup", "restore", *vref(name, rg), "--item", item, "--recovery-point", rp,
                      "--target", str(target), subscription=subscription))
    assert job["status"] == "Completed", job
    assert manifest(target) == expected


def post_move(srv, source_sub, source_rg, ids, target_sub, target_rg, validate=False):
    action = "validateMoveResources" if validate else "moveResources"
    return srv.request(
        "POST",
        srv.arm(f"/subscriptions/{source_sub}/resourceGroups/{source_rg}/{action}", RESOURCES_API),
        json={"resources": ids, "targetResourceGroup": rg_id(target_sub, target_rg)},
    )


def lro_move(srv, source_sub, source_rg, ids, target_sub, target_rg, validate=False):
    """The move through azure-core's own long-running-operation poller (what `az resource
    move` and `begin_move_resources(...).result()` use): 202 + Location, polled to 204."""
    from azure.core import PipelineClient
    from azure.core.pipeline.policies import BearerTokenCredentialPolicy, RequestIdPolicy, RetryPolicy
    from azure.core.polling import LROPoller
    from azure.core.polling.base_polling import LROBasePolling
    from azure.core.rest import HttpRequest

    client = PipelineClient(
        srv.base,
        policies=[RequestIdPolicy(), RetryPolicy(retry_total=0), BearerTokenCredentialPolicy(srv.credential, srv.scope)],
    )
    action = "validateMoveResources" if validate else "moveResources"
    req = HttpRequest(
        "POST",
        f"{srv.base}/subscriptions/{source_sub}/resourceGroups/{source_rg}/{action}",
        params={"api-version": RESOURCES_API},
        json={"resources": ids, "targetResourceGroup": rg_id(target_sub, target_rg)},
    )
    initial = client._pipeline.run(req, stream=False)  # what generated management clients do
    assert initial.http_response.status_code == 202, initial.http_response.text()
    poller = LROPoller(client, initial, lambda r: None, LROBasePolling(timeout=1))
    poller.result(timeout=60)
    assert poller.status() == "Succeeded"


def grant(srv, sub, rg, kv, tenant, object_id):
    """Sets the key vault's tenantId and replaces its access policies by one for `object_id`."""
    r = srv.request(
        "PUT",
        srv.arm(f"{rg_id(sub, rg)}/providers/Microsoft.KeyVault/vaults/{kv}"),
        json={"location": LOCATION, "properties": {
            "tenantId": tenant,
            "accessPolicies": [{"tenantId": tenant, "objectId": object_id, "permissions": {"keys": KEY_PERMS}}],
        }},
    )
    assert r.status_code in (200, 201), r.text
    return r.json()


def key_vault(srv, sub, rg, tenant):
    """A key vault (soft delete + purge protection) in `sub`/`rg` with tenantId `tenant`."""
    name = random_name("kv", 16)
    body = srv.vault_body(tenant, purge_protection=True)
    r = srv.request("PUT", srv.arm(f"{rg_id(sub, rg)}/providers/Microsoft.KeyVault/vaults/{name}"), json=body)
    assert r.status_code == 201, r.text
    return name, r.json()["properties"]["vaultUri"]


def tenant_credential(srv, tenant):
    from azure.identity import ClientSecretCredential

    return ClientSecretCredential(
        tenant, srv.admin["clientId"], srv.admin["clientSecret"], authority=srv.base,
        disable_instance_discovery=True, connection_verify=str(srv.ca_path),
    )


def error_of(r):
    body = r.json()
    return body["error"]


# --------------------------------------------------------------------------------------------
# 1. a PMK vault moves, across groups and subscriptions
# --------------------------------------------------------------------------------------------


def test_pmk_vault_moves_across_groups_and_subscriptions(kagi, tmp_path):
    sub1 = kagi.subscription_id
    rg_a, rg_b, rg_c = random_name("mva", 10), random_name("mvb", 10), random_name("mvc", 10)
    put_rg(kagi, sub1, rg_a)
    put_rg(kagi, sub1, rg_b)
    sub2 = new_subscription(kagi)
    put_rg(kagi, sub2, rg_c)
    listed = ok(kagi_cli(kagi, "subscription", "list"))["value"]
    assert {s["subscriptionId"] for s in listed} >= {sub1, sub2}, listed

    src = tmp_path / "src"
    make_tree(src)
    before = manifest(src)
    name = random_name("bv", 14)
    created = ok(kagi_cli(kagi, "backup", "vault", "create", *vref(name, rg_a), "--location", LOCATION,
                          "--system-assigned"))
    principal = created["identity"]["principalId"]
    ok(kagi_cli(kagi, "backup", "item", "protect", *vref(name, rg_a), "--name", "bk9-docs", "--source", str(src)))
    rp1 = backup_now(kagi, name, rg_a, "bk9-docs")

    # Validate, then move to another group with the CLI.
    out = ok(kagi_cli(kagi, "backup", "vault", "move", *vref(name, rg_a), "--target-resource-group", rg_b,
                      "--validate-only"))
    assert out["status"] == "Succeeded", out
    ok(kagi_cli(kagi, "backup", "vault", "show", *vref(name, rg_a)))  # validation moved nothing
    moved = ok(kagi_cli(kagi, "backup", "vault", "move", *vref(name, rg_a), "--target-resource-group", rg_b))
    assert moved["id"] == bv_id(sub1, rg_b, name), moved
    assert moved["identity"]["principalId"] == principal, moved
    refused(kagi_cli(kagi, "backup", "vault", "show", *vref(name, rg_a)), "404")
    # The vault's records are in the store; its folder keeps its blobs (items/), in the new
    # resource group's folder (or keys, in a bucket).
    owners = {
        tuple(k.split("/")[1:3])
        for k in kagi.blob_objects()
        if k.split("/")[3:5] == ["items", "bk9-docs"] and k.split("/")[2] == name.lower()
    }
    assert owners == {(rg_b.lower(), name.lower())}, owners
    # Still backs up; the earlier recovery point restores.
    (src / "a.txt").write_text("after the first move\n")
    after = manifest(src)
    rp2 = backup_now(kagi, name, rg_b, "bk9-docs")
    restore_same(kagi, name, rg_b, "bk9-docs", rp1, tmp_path / "r1", before)
    activity = ok(kagi_cli(kagi, "backup", "activity", *vref(name, rg_b)))["value"]
    assert any("Vault moved from" in e["message"] for e in activity), activity

    # Across subscriptions, through Azure's own poller: validate, then move.
    vid = bv_id(sub1, rg_b, name)
    lro_move(kagi, sub1, rg_b, [vid], sub2, rg_c, validate=True)
    lro_move(kagi, sub1, rg_b, [vid], sub2, rg_c)
    shown = ok(kagi_cli(kagi, "backup", "vault", "show", *vref(name, rg_c), subscription=sub2))
    assert shown["id"] == bv_id(sub2, rg_c, name) and shown["identity"]["principalId"] == principal, shown
    restore_same(kagi, name, rg_c, "bk9-docs", rp1, tmp_path / "r2", before, subscription=sub2)
    restore_same(kagi, name, rg_c, "bk9-docs", rp2, tmp_path / "r3", after, subscription=sub2)
    rp3 = backup_now(kagi, name, rg_c, "bk9-docs", subscription=sub2)
    rps = ok(kagi_cli(kagi, "backup", "recovery-points", *vref(name, rg_c), "--item", "bk9-docs", subscription=sub2))
    assert {p["name"] for p in rps["value"]} == {rp1, rp2, rp3}, rps
    ok(kagi_cli(kagi, "backup", "check", *vref(name, rg_c), "--item", "bk9-docs", "--read-data", subscription=sub2))

    # And back, with `kagi resource move`.
    out = ok(kagi_cli(kagi, "resource", "move", "--ids", bv_id(sub2, rg_c, name), "--destination-group", rg_a,
                      "--destination-subscription", sub1))
    assert out["status"] == "Succeeded", out
    restore_same(kagi, name, rg_a, "bk9-docs", rp3, tmp_path / "r4", after)


def test_move_requests_are_checked(kagi):
    sub = kagi.subscription_id
    rg_a, rg_b = random_name("mvx", 10), random_name("mvy", 10)
    put_rg(kagi, sub, rg_a)
    put_rg(kagi, sub, rg_b)
    name = random_name("bv", 14)
    ok(kagi_cli(kagi, "backup", "vault", "create", *vref(name, rg_a), "--location", LOCATION))
    vid = bv_id(sub, rg_a, name)

    r = post_move(kagi, sub, rg_a, [vid], sub, rg_a)
    assert r.status_code == 400 and error_of(r)["innererror"]["code"] == "InvalidTargetResourceGroup", r.text
    r = post_move(kagi, sub, rg_b, [vid], sub, rg_a)
    assert r.status_code == 400 and error_of(r)["innererror"]["code"] == "ResourceNotInSourceResourceGroup", r.text
    r = post_move(kagi, sub, rg_a, [vid], sub, "no-such-group")
    assert r.status_code == 404, r.text
    uami = kagi.request(
        "PUT",
        kagi.arm(f"{rg_id(sub, rg_a)}/providers/Microsoft.ManagedIdentity/userAssignedIdentities/u1", "2023-01-31"),
        json={"location": LOCATION},
    )
    assert uami.status_code == 201, uami.text
    for validate in (True, False):
        r = post_move(kagi, sub, rg_a, [uami.json()["id"]], sub, rg_b, validate=validate)
        assert r.status_code == 400, r.text
        assert error_of(r)["innererror"]["code"] == "ResourceMoveNotSupported", r.text
    # Only the administrator moves.
    from conftest import create_sp, sp_token

    sp = create_sp(kagi)
    r = requests.post(
        kagi.arm(f"/subscriptions/{sub}/resourceGroups/{rg_a}/moveResources", RESOURCES_API),
        headers={"Authorization": f"Bearer {sp_token(kagi, sp)}"},
        json={"resources": [vid], "targetResourceGroup": rg_id(sub, rg_b)},
        verify=str(kagi.ca_path), timeout=30,
    )
    assert r.status_code == 403, r.text
    ok(kagi_cli(kagi, "backup", "vault", "show", *vref(name, rg_a)))


# --------------------------------------------------------------------------------------------
# 2. a CMK vault never moves
# --------------------------------------------------------------------------------------------


def test_cmk_vault_move_is_refused(kagi, tmp_path):
    sub = kagi.subscription_id
    rg_b = random_name("mvt", 10)
    put_rg(kagi, sub, rg_b)
    sub2 = new_subscription(kagi)
    rg_c = random_name("mvs", 10)
    put_rg(kagi, sub2, rg_c)
    name = random_name("bv", 14)
    created = ok(kagi_cli(kagi, "backup", "vault", "create", *vref(name, DEFAULT_RG), "--location", LOCATION,
                          "--system-assigned"))
    kv = kagi.create_vault(purge_protection=True)
    key = kagi.key_client(kv.url).create_rsa_key(random_name("cmk", 10), size=2048)
    grant(kagi, sub, kv.rg, kv.name, kagi.tenant_id, created["identity"]["principalId"])
    key_uri = f"{kv.url.rstrip('/')}/keys/{key.name}"
    ok(kagi_cli(kagi, "backup", "vault", "encryption", *vref(name, DEFAULT_RG), "--key-uri", key_uri))
    vid = bv_id(sub, DEFAULT_RG, name)

    # The API: the move and its validation give the same refusal.
    for validate in (True, False):
        r = post_move(kagi, sub, DEFAULT_RG, [vid], sub, rg_b, validate=validate)
        assert r.status_code == 409, r.text
        err = error_of(r)
        assert err["code"] == "ResourceMoveProviderValidationFailed", err
        assert err["innererror"]["code"] == "UserErrorCMKEncryptedVaultMoveNotSupported", err
        assert err["details"][0]["target"] == vid, err
        assert "customer-managed key" in err["message"], err
    r = post_move(kagi, sub, DEFAULT_RG, [vid], sub2, rg_c)
    assert r.status_code == 409 and error_of(r)["innererror"]["code"] == "UserErrorCMKEncryptedVaultMoveNotSupported"

    # The CLI.
    refused(kagi_cli(kagi, "backup", "vault", "move", *vref(name, DEFAULT_RG), "--target-resource-group", rg_b),
            "UserErrorCMKEncryptedVaultMoveNotSupported")
    refused(kagi_cli(kagi, "backup", "vault", "move", *vref(name, DEFAULT_RG), "--target-resource-group", rg_b,
                     "--validate-only"), "UserErrorCMKEncryptedVaultMoveNotSupported")
    refused(kagi_cli(kagi, "resource", "move", "--ids", vid, "--destination-group", rg_c,
                     "--destination-subscription", sub2), "UserErrorCMKEncryptedVaultMoveNotSupported")

    # Nothing moved; the vault still works where it is.
    shown = ok(kagi_cli(kagi, "backup", "vault", "show", *vref(name, DEFAULT_RG)))
    assert shown["id"] == vid and shown["properties"]["encryption"]["keyVaultProperties"]["keyUri"] == key_uri
    src = tmp_path / "src"
    make_tree(src)
    ok(kagi_cli(kagi, "backup", "item", "protect", *vref(name, DEFAULT_RG), "--name", "bk9-data", "--source", str(src)))
    backup_now(kagi, name, DEFAULT_RG, "bk9-data")


# --------------------------------------------------------------------------------------------
# 3. a tenant move stops a CMK vault until identity and key are configured again
# --------------------------------------------------------------------------------------------


@pytest.fixture
def tenant_kagi(tmp_path):
    """A private server (this test moves a subscription to another tenant) whose backup
    service asks the key vault again after one second."""
    srv = _start_server(tmp_path, "tenant", env={"KAGI_BACKUP_KEY_CACHE_SECONDS": "1"})
    try:
        srv.put_rg(DEFAULT_RG)
        yield srv
    finally:
        srv.stop()


def test_tenant_move_fails_cmk_jobs_until_identity_and_key_are_reconfigured(tenant_kagi, tmp_path):
    srv = tenant_kagi
    t1 = srv.tenant_id
    sub2 = new_subscription(srv)
    rg = random_name("tm", 10)
    put_rg(srv, sub2, rg)
    kv, kv_url = key_vault(srv, sub2, rg, t1)
    k1 = srv.key_client(kv_url).create_rsa_key("k1", size=2048)
    name = random_name("bv", 14)
    created = ok(kagi_cli(srv, "backup", "vault", "create", *vref(name, rg), "--location", LOCATION,
                          "--system-assigned", subscription=sub2))
    old_principal = created["identity"]["principalId"]
    assert created["identity"]["tenantId"] == t1, created
    grant(srv, sub2, rg, kv, t1, old_principal)
    ok(kagi_cli(srv, "backup", "vault", "encryption", *vref(name, rg), "--key-uri", f"{kv_url}keys/k1",
                subscription=sub2))
    src = tmp_path / "src"
    make_tree(src)
    first = manifest(src)
    ok(kagi_cli(srv, "backup", "item", "protect", *vref(name, rg), "--name", "bk9-data", "--source", str(src),
                subscription=sub2))
    rp1 = backup_now(srv, name, rg, "bk9-data", subscription=sub2)
    (src / "a.txt").write_text("second recovery point\n")
    second = manifest(src)
    rp2 = backup_now(srv, name, rg, "bk9-data", subscription=sub2)
    # A role assignment in the subscription: the tenant move deletes it.
    from conftest import assign_role

    assign_role(srv, f"/subscriptions/{sub2}", "21090545-7ca7-4776-b22c-e363652d74d2", old_principal)

    # The subscription moves to a new tenant.
    t2 = str(uuid.uuid4())
    moved = ok(kagi_cli(srv, "subscription", "change-directory", "--id", sub2, "--tenant", t2))
    assert (moved["previousTenantId"], moved["tenantId"], moved["tenantCreated"]) == (t1, t2, True), moved
    assert moved["roleAssignmentsRemoved"] == 1, moved
    assert moved["keyVaultsWithPreviousTenantId"] == [kv], moved
    assert any(name in r for r in moved["resourcesWithIdentitiesInPreviousTenant"]), moved
    assert ok(kagi_cli(srv, "subscription", "show", "--id", sub2))["tenantId"] == t2
    # ARM lists subscriptions per tenant: the moved one is now in the new tenant's list.
    subs_t1 = srv.request("GET", srv.arm("/subscriptions", RG_API)).json()["value"]
    assert sub2 not in {s["subscriptionId"] for s in subs_t1}, subs_t1

    # Backups and restores fail with the cause and the fix, in the CLI, the job and the log.
    err = refused(kagi_cli(srv, "backup", "now", *vref(name, rg), "--item", "bk9-data", subscription=sub2),
                  "UserErrorCMKTenantMismatch", t2, "kagi backup vault encryption")
    assert "identity" in err
    refused(kagi_cli(srv, "backup", "restore", *vref(name, rg), "--item", "bk9-data", "--recovery-point", rp1,
                     "--target", str(tmp_path / "nope"), subscription=sub2), "UserErrorCMKTenantMismatch")
    jobs = ok(kagi_cli(srv, "backup", "job", "list", *vref(name, rg), subscription=sub2))["value"]
    failed = [j for j in jobs if j["status"] == "Failed"]
    assert {j["operation"] for j in failed} >= {"Backup", "Restore"}, jobs
    assert all(j["error"]["code"] == "UserErrorCMKTenantMismatch" for j in failed), failed
    activity = ok(kagi_cli(srv, "backup", "activity", *vref(name, rg), subscription=sub2))["value"]
    assert any(e["status"] == "Failed" and t2 in e["message"] for e in activity), activity

    # Configure again: the identity off and on (a new one, in the new tenant)…
    ok(kagi_cli(srv, "backup", "vault", "identity", *vref(name, rg), "--type", "None", subscription=sub2))
    renewed = ok(kagi_cli(srv, "backup", "vault", "identity", *vref(name, rg), "--type", "SystemAssigned",
                          subscription=sub2))
    new_principal = renewed["identity"]["principalId"]
    assert new_principal != old_principal and renewed["identity"]["tenantId"] == t2, renewed
    # …the key vault into the new tenant, granting the new identity…
    grant(srv, sub2, rg, kv, t2, new_principal)
    # …where the administrator works with a token of the new tenant (the SDK follows the
    # vault's challenge to it)…
    keys_t2 = srv.key_client(kv_url, credential=srv.new_credential(additionally_allowed_tenants=["*"]))
    k2 = keys_t2.create_rsa_key("k2", size=2048)
    assert k2.properties.vault_url.rstrip("/") == kv_url.rstrip("/")
    # (the CLI follows the challenge the same way)
    k3 = ok(kagi_cli(srv, "keyvault", "key", "create", "--vault-name", kv, "--name", "k3", "--kty", "RSA",
                     "--size", "2048", subscription=sub2))
    assert "/keys/k3/" in json.dumps(k3), k3
    # Still refused until the key is set again.
    refused(kagi_cli(srv, "backup", "now", *vref(name, rg), "--item", "bk9-data", subscription=sub2),
            "UserErrorCMKTenantMismatch")
    # …and the key set again: the item's data key is re-wrapped under it.
    ok(kagi_cli(srv, "backup", "vault", "encryption", *vref(name, rg), "--key-uri", f"{kv_url}keys/k2",
                subscription=sub2))
    jobs = ok(kagi_cli(srv, "backup", "job", "list", *vref(name, rg), subscription=sub2))["value"]
    cfg = [j for j in jobs if j["operation"] == "ConfigureEncryption"]
    assert len(cfg) == 2 and all(j["status"] == "Completed" for j in cfg), cfg
    assert sorted(j["stats"]["keyEntriesWritten"] for j in cfg) == [0, 1], cfg

    # Backups and restores work again; the earlier recovery points restore byte for byte.
    restore_same(srv, name, rg, "bk9-data", rp1, tmp_path / "r1", first, subscription=sub2)
    restore_same(srv, name, rg, "bk9-data", rp2, tmp_path / "r2", second, subscription=sub2)
    backup_now(srv, name, rg, "bk9-data", subscription=sub2)
    assert k1.name == "k1"
