"""The backup agent (`kagi agent`, MP-1..MP-7, BK-11) end to end against real servers.

Each "machine" is a `kagi agent` process with its own state directory. The key vault side is
set up and checked with the unmodified Azure SDK; the agent reads a lost machine's passphrase
back with a service principal's own credentials.
"""

import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from conftest import (
    AUTHZ_API,
    DEFAULT_RG,
    KAGI_BIN,
    LOCATION,
    assign_role,
    create_sp,
    random_name,
    update_vault_properties,
)
from test_backup_vault import assert_same_tree, kagi_cli, make_tree, manifest, ok, vref

pytestmark = pytest.mark.cli

SECRETS_OFFICER = "b86a8fe4-44ce-4948-aee5-eccb2c155cd7"


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def agent(state: Path, *args, env=None, stdin=None, timeout=300):
    """Runs `kagi agent --state-dir STATE <args> --output json` as a separate process."""
    e = {k: v for k, v in os.environ.items() if not k.startswith("AZURE_")}
    e.update(env or {})
    return subprocess.run(
        [str(KAGI_BIN), "agent", "--state-dir", str(state), *args, "--output", "json"],
        capture_output=True, text=True, timeout=timeout, env=e, input=stdin,
    )


def fails(p, *needles):
    assert p.returncode != 0, f"expected a failure, got success:\n{p.stdout[-2000:]}"
    for n in needles:
        assert n in p.stderr, f"{n!r} not in stderr:\n{p.stderr[-3000:]}"
    return p.stderr


def backup_vault(srv, system_assigned=True, user_assigned=None):
    name = random_name("bv", 12)
    args = ["backup", "vault", "create", *vref(name), "--location", LOCATION]
    if system_assigned:
        args.append("--system-assigned")
    if user_assigned:
        args += ["--user-assigned-identity", user_assigned]
    return name, ok(kagi_cli(srv, *args))


def credentials(srv, bv, tmp_path, valid_hours=None) -> Path:
    out = tmp_path / f"{bv}-{uuid.uuid4().hex[:6]}.VaultCredentials"
    args = ["backup", "vault", "credentials", *vref(bv), "--out", str(out)]
    if valid_hours:
        args += ["--valid-hours", str(valid_hours)]
    p = kagi_cli(srv, *args)
    assert p.returncode == 0, p.stderr
    assert oct(out.stat().st_mode & 0o777) == "0o600", oct(out.stat().st_mode)
    return out


def passfile(tmp_path, value) -> Path:
    p = tmp_path / f"pass-{uuid.uuid4().hex[:8]}"
    p.write_text(value + "\n")
    return p


def key_vault(srv, purge_protection=True, rbac=False):
    return srv.create_vault(purge_protection=purge_protection, **({"enableRbacAuthorization": True} if rbac else {}))


def allow_secrets(srv, kv, object_id, perms=("set",)):
    policies = [{"tenantId": srv.tenant_id, "objectId": object_id, "permissions": {"secrets": list(perms)}}]
    r = update_vault_properties(srv, kv, accessPolicies=policies, enablePurgeProtection=True, enableSoftDelete=True)
    assert r.status_code in (200, 201), r.text


def secret_name(machine, bv):
    return f"AzBackup-{machine.replace('.', '-').replace('_', '-')}-{bv}"


def register(state, creds, machine, pf, kv_uri=None, env=None):
    args = ["register", "--vault-credentials", str(creds), "--machine-name", machine, "--passphrase-file", str(pf)]
    if kv_uri:
        args += ["--key-vault-uri", kv_uri]
    return agent(state, *args, env=env)


def activity(srv, bv):
    path = f"/subscriptions/{srv.subscription_id}/resourceGroups/{DEFAULT_RG}/providers/Microsoft.RecoveryServices/vaults/{bv}/activityLog"
    r = srv.request("GET", srv.arm(path, "2023-04-01"))
    assert r.status_code == 200, r.text
    return r.json()["value"]


# --------------------------------------------------------------------------------------------
# register, back up, change the passphrase twice, lose the machine, restore elsewhere
# --------------------------------------------------------------------------------------------


def test_agent_passphrase_in_key_vault_and_restore_on_new_machine(kagi, tmp_path):
    bv, body = backup_vault(kagi)
    principal = body["identity"]["principalId"]
    kv = key_vault(kagi)
    allow_secrets(kagi, kv, principal, ("set",))  # exactly what MP-2 needs
    creds = credentials(kagi, bv, tmp_path)
    machine = "host1.corp.example"
    name = secret_name(machine, bv)

    p1 = "first passphrase, long enough"
    state = tmp_path / "machine1"
    out = ok(register(state, creds, machine, passfile(tmp_path, p1), kv.url))
    assert out["secretId"].startswith(f"{kv.url.rstrip('/')}/secrets/{name}/"), out
    assert out["repositoryCreated"] is True, out

    # The passphrase is not on the machine's disk in any form (MP-4).
    for f in state.rglob("*"):
        if f.is_file():
            assert p1.encode() not in f.read_bytes(), f
            assert oct(f.stat().st_mode & 0o777) == "0o600", f

    # BK-2: a registered machine counts; the vault can no longer switch to CMK.
    p = kagi_cli(kagi, "backup", "vault", "encryption", *vref(bv), "--key-uri", f"{kv.url.rstrip('/')}/keys/any")
    assert p.returncode != 0 and "CmkNotAllowedAfterProtection" in p.stderr + p.stdout, p.stderr

    src = tmp_path / "src"
    make_tree(src)
    first_tree = manifest(src)
    ok(agent(state, "protect", str(src)))
    b1 = ok(agent(state, "backup"))[0]
    rp1 = b1["recoveryPoint"]
    assert b1["files"] >= 7, b1

    # Nothing readable on the server.
    stored = {k: v for k, v in kagi.blob_objects().items() if f"/agents/machines/{machine}/" in k}
    assert stored, "no objects stored for the machine"
    for k, data in stored.items():
        assert b"hello kagi" not in data and b"name with space" not in data, k

    # Two passphrase changes: three versions of the same secret (MP-5), the URI remembered.
    p2 = "second passphrase, also long"
    r = agent(state, "set-passphrase", "--passphrase-file", str(passfile(tmp_path, p2)))
    assert r.returncode == 0, r.stderr
    assert name in json.loads(r.stdout)["secretId"], r.stdout
    r = agent(state, "set-passphrase", "--generate-passphrase")
    assert r.returncode == 0, r.stderr
    assert "generated passphrase" not in r.stderr, "a passphrase kept in the key vault must not be printed"
    secrets = kagi.secret_client(kv.url)
    versions = list(secrets.list_properties_of_secret_versions(name))
    assert len(versions) == 3, [v.id for v in versions]
    p3 = secrets.get_secret(name).value
    assert p3 not in (p1, p2) and len(p3) >= 16

    (src / "small.txt").write_text("changed after the passphrase changes\n")
    second_tree = manifest(src)
    rp2 = ok(agent(state, "backup"))[0]["recoveryPoint"]

    # The machine is lost.
    shutil.rmtree(state)

    # A new machine registers with the same vault and restores machine 1's data, reading the
    # passphrase from the key vault with a user's own credentials (MP-6).
    user = create_sp(kagi)
    allow_secrets(kagi, kv, principal, ("set",))
    policies = [
        {"tenantId": kagi.tenant_id, "objectId": principal, "permissions": {"secrets": ["set"]}},
        {"tenantId": kagi.tenant_id, "objectId": user["objectId"], "permissions": {"secrets": ["get"]}},
    ]
    r = update_vault_properties(kagi, kv, accessPolicies=policies, enablePurgeProtection=True, enableSoftDelete=True)
    assert r.status_code in (200, 201), r.text
    creds2 = credentials(kagi, bv, tmp_path)
    state2 = tmp_path / "machine2"
    ok(register(state2, creds2, "host2.corp.example", passfile(tmp_path, "machine two's own passphrase")))
    env = {"AZURE_TENANT_ID": user["tenantId"], "AZURE_CLIENT_ID": user["clientId"],
           "AZURE_CLIENT_SECRET": user["clientSecret"]}

    # A wrong passphrase is detected before anything is written.
    wrong_target = tmp_path / "wrong"
    p = agent(state2, "restore", "--source-machine", machine, "--recovery-point", rp1, "--target", str(wrong_target),
              "--passphrase-file", str(passfile(tmp_path, p1)))
    fails(p, "passphrase")
    assert not wrong_target.exists() or not any(wrong_target.iterdir())

    points = ok(agent(state2, "recovery-points", "--source-machine", machine, "--key-vault-uri", kv.url, env=env))
    assert sorted(x["id"] for x in points) == sorted([rp1, rp2]), points
    ok(agent(state2, "restore", "--source-machine", machine, "--recovery-point", rp1,
             "--target", str(tmp_path / "r1"), "--key-vault-uri", kv.url, env=env))
    assert_same_tree(first_tree, tmp_path / "r1")
    ok(agent(state2, "restore", "--source-machine", machine, "--recovery-point", rp2,
             "--target", str(tmp_path / "r2"), "--passphrase-file", str(passfile(tmp_path, p3))))
    assert_same_tree(second_tree, tmp_path / "r2")

    # Machine 2 may read machine 1's backups, never change them.
    m2 = json.loads((state2 / "agent.json").read_text())
    hdr = {"Authorization": f"KagiAgent host2.corp.example:{m2['machineSecret']}"}
    obj = f"{kagi.base}/kagi/agent/subscriptions/{kagi.subscription_id}/resourceGroups/{DEFAULT_RG}/providers/Microsoft.RecoveryServices/vaults/{bv}/machines/{machine}/objects/config"
    assert kagi.request("GET", obj, auth=False, headers=hdr).status_code == 200
    r = kagi.request("DELETE", obj, auth=False, headers=hdr)
    assert r.status_code == 403, r.text
    assert kagi.request("PUT", obj, auth=False, headers=hdr, data=b"x").status_code == 403

    ops = [e["operationName"] for e in activity(kagi, bv)]
    for op in ("vaultCredentials/action", "agents/passphrase/write", "agents/register", "agents/Backup",
               "agents/SetPassphrase", "agents/Restore"):
        assert any(o.endswith(op) for o in ops), (op, ops)
    log = json.dumps(activity(kagi, bv))
    for p in (p1, p2, p3):
        assert p not in log

    # Agent requests are in the audit log, under the backup vault, with the machine as caller;
    # no passphrase or machine secret is.
    audit = (kagi.data_dir / "audit" / "audit.jsonl").read_text()
    vault_id = f"/subscriptions/{kagi.subscription_id}/resourceGroups/{DEFAULT_RG}/providers/Microsoft.RecoveryServices/vaults/{bv}".lower()
    agent_records = [json.loads(line) for line in audit.splitlines() if "/kagi/agent/" in line]
    assert agent_records, "no agent request was audited"
    assert all(r["resourceId"].lower() == vault_id for r in agent_records), agent_records[0]
    assert any(f"agent:" in json.dumps(r.get("identity")) and machine in json.dumps(r.get("identity"))
               for r in agent_records), agent_records[-1]
    for secret in (p1, p2, p3, m2["machineSecret"]):
        assert secret not in audit


# --------------------------------------------------------------------------------------------
# RBAC: Secrets Officer, and a custom role with only secrets/set
# --------------------------------------------------------------------------------------------


def test_agent_rbac_secrets_officer_and_custom_role(kagi, tmp_path):
    bv, body = backup_vault(kagi)
    principal = body["identity"]["principalId"]
    kv = key_vault(kagi, rbac=True)
    scope = kagi.vault_path(kv.rg, kv.name)
    creds = credentials(kagi, bv, tmp_path)

    # No role yet: 391225, and nothing registered.
    st = tmp_path / "m0"
    e = fails(register(st, creds, "rbac0.example", passfile(tmp_path, "p" * 20), kv.url), "391225")
    assert principal in e, e
    assert not (st / "agent.json").exists() or json.loads((st / "agent.json").read_text())["registration"]["state"] != "complete"

    # A custom role with only the secrets/set data action is enough.
    sub_scope = f"/subscriptions/{kagi.subscription_id}"
    role_id = str(uuid.uuid4())
    role = {"properties": {
        "roleName": f"set-secrets-only-{role_id[:8]}",
        "permissions": [{"actions": [], "notActions": [],
                         "dataActions": ["Microsoft.KeyVault/vaults/secrets/setSecret/action"], "notDataActions": []}],
        "assignableScopes": [sub_scope]}}
    r = kagi.request("PUT", kagi.arm(f"{sub_scope}/providers/Microsoft.Authorization/roleDefinitions/{role_id}", AUTHZ_API), json=role)
    assert r.status_code == 201, r.text
    aid = assign_role(kagi, scope, role_id, principal)
    out = ok(register(tmp_path / "m1", creds, "rbac1.example", passfile(tmp_path, "q" * 20), kv.url))
    assert secret_name("rbac1.example", bv) in out["secretId"], out

    # The built-in Key Vault Secrets Officer instead.
    assert kagi.request("DELETE", kagi.arm(aid, AUTHZ_API)).status_code == 200
    fails(register(tmp_path / "m2", creds, "rbac2.example", passfile(tmp_path, "r" * 20), kv.url), "391225")
    assign_role(kagi, scope, SECRETS_OFFICER, principal)
    ok(register(tmp_path / "m3", creds, "rbac2.example", passfile(tmp_path, "r" * 20), kv.url))


# --------------------------------------------------------------------------------------------
# every error code, from a real scenario
# --------------------------------------------------------------------------------------------


def test_agent_error_codes(kagi, tmp_path):
    pf = passfile(tmp_path, "a passphrase of some length")

    # 391224: only a user-assigned identity.
    uami = kagi.request("PUT", kagi.arm(
        f"/subscriptions/{kagi.subscription_id}/resourceGroups/{DEFAULT_RG}/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{random_name('ua', 10)}",
        "2023-01-31"), json={"location": LOCATION})
    assert uami.status_code in (200, 201), uami.text
    bv_ua, _ = backup_vault(kagi, system_assigned=False, user_assigned=uami.json()["id"])
    kv = key_vault(kagi)
    st = tmp_path / "e1"
    e = fails(register(st, credentials(kagi, bv_ua, tmp_path), "e1.example", pf, kv.url), "391224")
    assert "system-assigned" in e
    assert not (st / "agent.json").exists()

    bv, body = backup_vault(kagi)
    principal = body["identity"]["principalId"]
    creds = credentials(kagi, bv, tmp_path)

    # 100272: malformed key vault URIs.
    for bad in ("not a uri", "http://x.localhost/", f"{kv.url.rstrip('/')}/secrets/x", "https://.localhost:1/"):
        fails(register(tmp_path / "e2", creds, "e2.example", pf, bad), "100272")

    # 391225: the identity has no permission on this key vault.
    fails(register(tmp_path / "e3", creds, "e3.example", pf, kv.url), "391225", principal)

    # 391282: the machine's secret exists but is soft-deleted.
    allow_secrets(kagi, kv, principal)
    name = secret_name("e4.example", bv)
    secrets = kagi.secret_client(kv.url)
    secrets.set_secret(name, "old")
    secrets.begin_delete_secret(name).wait()
    e = fails(register(tmp_path / "e4", creds, "e4.example", pf, kv.url), "391282")
    assert "recover" in e.lower()
    secrets.begin_recover_deleted_secret(name).wait()
    ok(register(tmp_path / "e4", creds, "e4.example", pf, kv.url))

    # 391283: the key vault is soft-deleted.
    gone = key_vault(kagi)
    assert kagi.delete_vault(gone.name).status_code == 200
    fails(register(tmp_path / "e5", creds, "e5.example", pf, gone.url), "391283")

    # Incomplete registration: the passphrase step succeeded, the registration did not. Every
    # later command says so until register finishes.
    st = tmp_path / "e6"
    fails(register(st, creds, "e6.example", pf, kv.url, env={"KAGI_AGENT_TEST_FAIL_AFTER_PASSPHRASE": "1"}))
    for cmd in (["status"], ["backup"], ["protect", str(tmp_path)]):
        p = agent(st, *cmd)
        assert "incomplete" in p.stderr, (cmd, p.stderr)
    assert agent(st, "backup").returncode != 0
    ok(register(st, creds, "e6.example", pf, kv.url))
    p = agent(st, "status")
    assert p.returncode == 0 and "incomplete" not in p.stderr, p.stderr
    assert json.loads(p.stdout)["registration"]["state"] == "complete"

    # Key vault without purge protection: a warning, not a failure (MP-3).
    weak = key_vault(kagi, purge_protection=False)
    allow_secrets_weak = [{"tenantId": kagi.tenant_id, "objectId": principal, "permissions": {"secrets": ["set"]}}]
    r = update_vault_properties(kagi, weak, accessPolicies=allow_secrets_weak)
    assert r.status_code in (200, 201), r.text
    p = register(tmp_path / "e7", creds, "e7.example", pf, weak.url)
    assert p.returncode == 0, p.stderr
    assert "purge protection" in p.stderr, p.stderr


def test_agent_bad_input(kagi, tmp_path):
    bv, _ = backup_vault(kagi)
    creds = credentials(kagi, bv, tmp_path)
    # Short, empty and whitespace passphrases never reach the server.
    for bad in ("short", "", " " * 20):
        fails(register(tmp_path / "b1", creds, "b1.example", passfile(tmp_path, bad)), "16 characters")
    # Machine names outside the secret-name rules.
    for bad in ("bad name", "a..b", "hôte.example", "x/y"):
        fails(register(tmp_path / "b2", creds, bad, passfile(tmp_path, "x" * 20)), "machine name")
    # A key vault that does not exist, and one that cannot be reached, give clear errors and
    # leave nothing registered.
    st = tmp_path / "b5"
    gone = f"https://{random_name('nokv', 12)}.{kagi.base.split('//')[1].split(':')[0]}:{kagi.base.rsplit(':', 1)[1]}/"
    fails(register(st, creds, "b5.example", passfile(tmp_path, "x" * 20), gone), "UserErrorKeyVaultNotFound")
    assert not (st / "agent.json").exists()
    # Foreign credentials: the file names another vault.
    other, _ = backup_vault(kagi)
    forged = json.loads(creds.read_text())
    forged["vaultId"] = forged["vaultId"].replace(bv, other)
    ff = tmp_path / "forged.VaultCredentials"
    ff.write_text(json.dumps(forged))
    fails(register(tmp_path / "b3", ff, "b3.example", passfile(tmp_path, "x" * 20)), "100110")
    # Generated passphrase without a key vault: shown once, on stdout.
    p = agent(tmp_path / "b4", "register", "--vault-credentials", str(creds), "--machine-name", "b4.example",
              "--generate-passphrase")
    assert p.returncode == 0, p.stderr
    assert "generated passphrase" in p.stderr
    # Backing up a folder that is not protected, restoring into a non-empty target.
    fails(agent(tmp_path / "b4", "backup", str(tmp_path)), "not protected")
    src = tmp_path / "bsrc"
    make_tree(src)
    ok(agent(tmp_path / "b4", "protect", str(src)))
    rp = ok(agent(tmp_path / "b4", "backup"))[0]["recoveryPoint"]
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    fails(agent(tmp_path / "b4", "restore", "--recovery-point", rp, "--target", str(full)), "not empty")
    # A key vault that cannot be reached: a clear error, nothing written.
    p = agent(tmp_path / "b4", "restore", "--source-machine", "b4.example", "--recovery-point", rp,
              "--target", str(tmp_path / "b6t"), "--key-vault-uri", "https://unreachable.localhost:1/",
              env={"AZURE_TENANT_ID": "t", "AZURE_CLIENT_ID": "c", "AZURE_CLIENT_SECRET": "s"})
    assert p.returncode != 0 and "cannot reach" in p.stderr, p.stderr
    assert not (tmp_path / "b6t").exists()
    assert [x.name for x in full.iterdir()] == ["keep.txt"]

    # Retention: keep the newest recovery point only; what it no longer uses is pruned.
    ok(agent(tmp_path / "b4", "protect", str(src), "--keep-last", "1"))
    (src / "sub" / "big.bin").write_bytes(os.urandom(2 * 1024 * 1024))
    latest = manifest(src)
    rp2 = ok(agent(tmp_path / "b4", "backup"))[0]["recoveryPoint"]
    points = ok(agent(tmp_path / "b4", "recovery-points"))
    assert [x["id"] for x in points] == [rp2], points
    ok(agent(tmp_path / "b4", "restore", "--target", str(tmp_path / "latest")))
    assert_same_tree(latest, tmp_path / "latest")


def test_agent_refused_on_cmk_vault(kagi, tmp_path):
    """BK-11: a vault with a customer-managed key refuses agents."""
    from test_backup_vault import cmk_key_vault

    bv, body = backup_vault(kagi)
    _, _, _, key_uri = cmk_key_vault(kagi, grant_to=body["identity"]["principalId"])
    ok(kagi_cli(kagi, "backup", "vault", "encryption", *vref(bv), "--key-uri", key_uri))
    creds = credentials(kagi, bv, tmp_path)
    st = tmp_path / "c1"
    fails(register(st, creds, "c1.example", passfile(tmp_path, "y" * 20)), "customer-managed key")
    assert not (st / "agent.json").exists()


def test_agent_expired_credentials(clock_kagi, tmp_path):
    srv = clock_kagi
    bv, _ = backup_vault(srv)
    creds = credentials(srv, bv, tmp_path, valid_hours=1)
    r = srv.request("POST", f"{srv.base}/kagi/test/clock", json={"advanceSeconds": 3700})
    assert r.status_code == 200, r.text
    fails(register(tmp_path / "x1", creds, "x1.example", passfile(tmp_path, "z" * 20)), "100110", "expired")


def test_agent_scheduled_backups(kagi, tmp_path):
    """`kagi agent run` takes a folder's scheduled backup when it is due (never run: at once)."""
    import time

    bv, _ = backup_vault(kagi)
    creds = credentials(kagi, bv, tmp_path)
    st = tmp_path / "s1"
    ok(register(st, creds, "sched.example", passfile(tmp_path, "s" * 20)))
    src = tmp_path / "ssrc"
    make_tree(src)
    ok(agent(st, "protect", str(src), "--schedule-hours", "24"))
    run = subprocess.Popen([str(KAGI_BIN), "agent", "--state-dir", str(st), "run", "--interval-seconds", "1"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            folders = json.loads((st / "agent.json").read_text())["folders"]
            if folders[0].get("lastRun", 0) > 0:
                break
            time.sleep(0.2)
        time.sleep(3)  # more intervals pass: the next run is a day away, so nothing more happens
    finally:
        run.terminate()
        out, err = run.communicate(timeout=30)
    assert "scheduled backup of" in err, err
    points = ok(agent(st, "recovery-points"))
    assert len(points) == 1, (points, err)
    ok(agent(st, "restore", "--target", str(tmp_path / "sr")))
    assert_same_tree(manifest(src), tmp_path / "sr")


def agent_url(srv, bv, tail):
    return (f"{srv.base}/kagi/agent/subscriptions/{srv.subscription_id}/resourceGroups/{DEFAULT_RG}"
            f"/providers/Microsoft.RecoveryServices/vaults/{bv}/{tail}")


def test_agent_routes_authorization_and_limits(kagi, tmp_path):
    bv, body = backup_vault(kagi)
    principal = body["identity"]["principalId"]
    kv = key_vault(kagi)
    allow_secrets(kagi, kv, principal)
    creds = credentials(kagi, bv, tmp_path)
    st_a, st_b = tmp_path / "a", tmp_path / "b"
    ok(register(st_a, creds, "web.corp.example", passfile(tmp_path, "a" * 20), kv.url))
    ok(register(st_b, creds, "db.corp.example", passfile(tmp_path, "b" * 20)))
    src = tmp_path / "src"
    make_tree(src)
    ok(agent(st_a, "protect", str(src)))
    ok(agent(st_a, "backup"))
    b = json.loads((st_b / "agent.json").read_text())
    as_b = {"Authorization": f"KagiAgent db.corp.example:{b['machineSecret']}"}

    # A machine's credential cannot register (and so cannot take over another machine).
    for route in ("register", "probe"):
        r = kagi.request("POST", agent_url(kagi, bv, route), auth=False, headers=as_b,
                         json={"machineName": "web.corp.example"})
        assert r.status_code == 401, (route, r.status_code, r.text)
    assert ok(agent(st_a, "recovery-points")), "machine A must still work"

    # Nothing is read before authentication (a large body is cut off after the 401); JSON
    # bodies are small.
    import requests

    r = kagi.request("POST", agent_url(kagi, bv, "probe"), auth=False, data=b"{}")
    assert r.status_code == 401, r.status_code
    try:
        r = kagi.request("POST", agent_url(kagi, bv, "probe"), auth=False, data=b"x" * (8 << 20))
        assert r.status_code == 401, r.status_code
    except requests.exceptions.ConnectionError:
        pass  # the server answered 401 and closed without reading 8 MiB
    assert kagi.request("GET", f"{kagi.base}/healthz", auth=False).status_code == 200
    cred = json.loads(creds.read_text())["secret"]
    r = kagi.request("POST", agent_url(kagi, bv, "probe"), auth=False,
                     headers={"Authorization": f"KagiVaultCredential {cred}"}, data=b"{" + b" " * (1 << 20) + b"}")
    assert r.status_code == 413, (r.status_code, r.text)

    # Ranges: an overflowing end is a 400, a start past the end a 416 (never a 500 or a panic).
    obj = agent_url(kagi, bv, "machines/web.corp.example/objects/config")
    r = kagi.request("GET", obj, auth=False, headers={**as_b, "Range": "bytes=0-18446744073709551615"})
    assert r.status_code == 400, (r.status_code, r.text)
    r = kagi.request("GET", obj, auth=False, headers={**as_b, "Range": "bytes=999999-1000000"})
    assert r.status_code == 416, (r.status_code, r.text)
    r = kagi.request("GET", obj, auth=False, headers={**as_b, "Range": "bytes=0-3"})
    assert r.status_code == 200 and len(r.content) == 4, (r.status_code, r.content)

    # Two FQDNs that map to one secret name: the second is refused, the first's secret intact.
    name = secret_name("web.corp.example", bv)
    before = kagi.secret_client(kv.url).get_secret(name).properties.version
    fails(register(tmp_path / "c", creds, "web-corp.example", passfile(tmp_path, "c" * 20), kv.url),
          "UserErrorSecretNameInUse")
    assert kagi.secret_client(kv.url).get_secret(name).properties.version == before

    # Registering again without a key vault keeps the remembered one (MP-5).
    ok(register(st_a, creds, "web.corp.example", passfile(tmp_path, "a" * 20)))
    assert json.loads((st_a / "agent.json").read_text())["keyVaultUri"] == kv.url
    r = agent(st_a, "set-passphrase", "--passphrase-file", str(passfile(tmp_path, "d" * 20)))
    assert r.returncode == 0, r.stderr
    assert kagi.secret_client(kv.url).get_secret(name).value == "d" * 20

    # A vault with registered machines is not deleted (their backups would go with it).
    p = kagi_cli(kagi, "backup", "vault", "delete", *vref(bv))
    assert p.returncode != 0 and "VaultHasRegisteredAgents" in p.stderr, p.stderr
    assert ok(agent(st_a, "recovery-points"))
    machines = ok(kagi_cli(kagi, "backup", "vault", "machines", *vref(bv)))["value"]
    assert {m["name"] for m in machines} == {"web.corp.example", "db.corp.example"}, machines
    for m in ("web.corp.example", "db.corp.example"):
        assert kagi_cli(kagi, "backup", "vault", "delete-machine", *vref(bv), "--machine", m).returncode != 0
        ok(kagi_cli(kagi, "backup", "vault", "delete-machine", *vref(bv), "--machine", m, "--yes"))
    fails(agent(st_a, "recovery-points"), "100110")
    assert not [k for k in kagi.blob_objects() if "/agents/machines/web.corp.example/" in k]
    ok(kagi_cli(kagi, "backup", "vault", "delete", *vref(bv)))


def test_agent_protect_during_a_backup_is_kept(kagi, tmp_path):
    """`protect` while a backup runs neither waits for it nor is undone by its end."""
    bv, _ = backup_vault(kagi)
    creds = credentials(kagi, bv, tmp_path)
    st = tmp_path / "p1"
    ok(register(st, creds, "busy.example", passfile(tmp_path, "p" * 20)))
    big = tmp_path / "big"
    big.mkdir()
    for i in range(12):
        (big / f"b{i}.bin").write_bytes(os.urandom(8 << 20))
    other = tmp_path / "other"
    make_tree(other)
    ok(agent(st, "protect", str(big)))
    bg = subprocess.Popen([str(KAGI_BIN), "agent", "--state-dir", str(st), "backup", "--output", "json"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ok(agent(st, "protect", str(other)))
        during = bg.poll() is None
        out, err = bg.communicate(timeout=300)
    finally:
        if bg.poll() is None:
            bg.kill()
    assert bg.returncode == 0, err
    state = json.loads((st / "agent.json").read_text())
    paths = {f["path"]: f for f in state["folders"]}
    assert set(paths) == {str(big.resolve()), str(other.resolve())}, (paths, during)
    assert paths[str(big.resolve())]["lastRun"] > 0
    # A second backup while none runs covers both folders, one recovery point each.
    points = ok(agent(st, "backup"))
    assert {p["folder"] for p in points} == set(paths), points
