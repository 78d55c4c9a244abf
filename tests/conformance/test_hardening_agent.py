"""Hardening of the backup agent's server side (issue 11, items 7 and 11), end to end.

- Item 7: a vault-credentials file alone no longer takes over a registered machine: registering
  an existing machine again (or storing its passphrase) needs proof of that machine's
  passphrase (its data key) or its current machine secret, or the administrator's allowance;
  none of these ever deletes recovery points.
- Item 11: an agent request is authorized before its body is read (only a machine writing its
  own objects may send one of 64 MiB); a vault's agent storage has a quota; writes are refused
  while the disk has less free space than the reserve kept for the audit log and the store.
"""

import base64
import json
import os
import socket
import ssl
from pathlib import Path

import pytest

from conftest import DEFAULT_RG, _start_server, assert_error_shape, inner_code
from test_backup_agent import (
    agent,
    agent_url,
    allow_secrets,
    backup_vault,
    credentials,
    fails,
    key_vault,
    passfile,
    register,
    secret_name,
)
from test_backup_vault import assert_same_tree, kagi_cli, manifest, ok, vref

pytestmark = pytest.mark.cli


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def objects_of(srv, machine):
    """The machine's objects on the server (relative names): its files, or its keys in the
    bucket (--blobs s3://…)."""
    mark = f"/agents/machines/{machine}/"
    return {k.split(mark, 1)[1] for k in srv.blob_objects() if mark in k}


def small_tree(root: Path) -> None:
    root.mkdir(parents=True)
    (root / "a.txt").write_text("hello hardening\n")
    (root / "b.bin").write_bytes(os.urandom(20_000))


def as_machine(st: Path, machine: str) -> dict:
    """The Authorization header of the machine whose state is in `st`."""
    secret = json.loads((st / "agent.json").read_text())["machineSecret"]
    return {"Authorization": f"KagiAgent {machine}:{secret}"}


def backed_up_machine(srv, tmp_path, machine):
    """A new vault on `srv` with `machine` registered and a small folder backed up once:
    (vault, credentials file, state dir, folder, recovery point)."""
    srv.put_rg(DEFAULT_RG)
    bv, _ = backup_vault(srv)
    creds = credentials(srv, bv, tmp_path)
    st = tmp_path / machine
    ok(register(st, creds, machine, passfile(tmp_path, "p" * 20)))
    src = tmp_path / "src"
    small_tree(src)
    ok(agent(st, "protect", str(src)))
    return bv, creds, st, src, ok(agent(st, "backup"))[0]["recoveryPoint"]


# --------------------------------------------------------------------------------------------
# item 7: registering an existing machine again
# --------------------------------------------------------------------------------------------


def test_register_existing_machine_needs_proof(kagi, tmp_path):
    bv, body = backup_vault(kagi)
    kv = key_vault(kagi)
    allow_secrets(kagi, kv, body["identity"]["principalId"])
    creds = credentials(kagi, bv, tmp_path)
    machine = "victim.corp.example"
    pass1 = "the victim's own passphrase"
    st = tmp_path / "victim"
    ok(register(st, creds, machine, passfile(tmp_path, pass1), kv.url))
    src = tmp_path / "src"
    small_tree(src)
    tree = manifest(src)
    ok(agent(st, "protect", str(src)))
    rp = ok(agent(st, "backup"))[0]["recoveryPoint"]
    stored = objects_of(kagi, machine)
    assert stored
    name = secret_name(machine, bv)
    secrets = kagi.secret_client(kv.url)
    version = secrets.get_secret(name).properties.version

    # Someone holding only the vault credentials file.
    cred = {"Authorization": f"KagiVaultCredential {json.loads(creds.read_text())['secret']}"}
    attempts = [
        ("passphrase", {"machineName": machine, "keyVaultUri": kv.url, "passphrase": "the attacker's passphrase"}),
        ("passphrase", {"machineName": machine.upper(), "keyVaultUri": kv.url, "passphrase": "the attacker's passphrase"}),
        ("register", {"machineName": machine}),
        ("register", {"machineName": machine.upper(), "keyVaultUri": kv.url}),
        ("register", {"machineName": machine, "keyProof": b64(os.urandom(32)), "machineSecret": b64(os.urandom(32))}),
    ]
    for route, req in attempts:
        r = kagi.request("POST", agent_url(kagi, bv, route), auth=False, headers=cred, json=req)
        assert_error_shape(r, 403)
        assert inner_code(r) == "UserErrorMachineAlreadyRegistered", (route, r.text)
        assert "passphrase" in r.json()["error"]["message"], r.text
    # ... changed nothing: the machine still works, its backups and its secret are intact.
    assert rp in [p["id"] for p in ok(agent(st, "recovery-points"))]
    assert objects_of(kagi, machine) == stored
    assert secrets.get_secret(name).properties.version == version
    assert secrets.get_secret(name).value == pass1

    # The honest agent with a wrong passphrase is refused before anything is sent.
    fails(register(tmp_path / "wrong", creds, machine, passfile(tmp_path, "not the right passphrase")), "passphrase")
    assert ok(agent(st, "recovery-points"))

    # The machine itself registers again (it has its machine secret and its data key).
    ok(register(st, creds, machine, passfile(tmp_path, pass1)))
    assert rp in [p["id"] for p in ok(agent(st, "recovery-points"))]

    # The machine is rebuilt: a new state directory, the same name and passphrase. The
    # passphrase opens the data key, which proves the machine (and stores the passphrase again).
    st2 = tmp_path / "rebuilt"
    out = ok(register(st2, creds, machine, passfile(tmp_path, pass1), kv.url))
    assert out["registeredAgain"] is True and out["repositoryCreated"] is False, out
    assert secrets.get_secret(name).properties.version != version
    assert rp in [p["id"] for p in ok(agent(st2, "recovery-points"))]
    ok(agent(st2, "restore", "--recovery-point", rp, "--target", str(tmp_path / "r")))
    assert_same_tree(tree, tmp_path / "r")
    fails(agent(st, "recovery-points"), "100110")  # the old state was replaced, as asked
    assert objects_of(kagi, machine) >= stored

    # The administrator allows one registration of the name without proof.
    p = kagi_cli(kagi, "backup", "vault", "allow-reregistration", *vref(bv), "--machine", "nobody.example")
    assert p.returncode != 0 and "MachineNotFound" in p.stderr, p.stderr
    allowed = ok(kagi_cli(kagi, "backup", "vault", "allow-reregistration", *vref(bv), "--machine", machine))
    assert allowed["name"] == machine and allowed["reregistrationAllowedUntil"], allowed
    r = kagi.request("POST", agent_url(kagi, bv, "register"), auth=False, headers=cred, json={"machineName": machine})
    assert r.status_code == 200, r.text
    assert r.json()["registeredAgain"] is True
    r = kagi.request("POST", agent_url(kagi, bv, "register"), auth=False, headers=cred, json={"machineName": machine})
    assert_error_shape(r, 403)  # once only
    assert objects_of(kagi, machine) >= stored  # registering never deletes recovery points
    ops = [e["operationName"] for e in kagi.request(
        "GET", kagi.arm(f"/subscriptions/{kagi.subscription_id}/resourceGroups/{DEFAULT_RG}/providers/"
                        f"Microsoft.RecoveryServices/vaults/{bv}/activityLog", "2023-04-01")).json()["value"]]
    assert any(o.endswith("registeredMachines/allowReregistration/action") for o in ops), ops

    # The rightful owner takes the machine back with the passphrase.
    st3 = tmp_path / "reclaimed"
    ok(register(st3, creds, machine, passfile(tmp_path, pass1)))
    assert rp in [p["id"] for p in ok(agent(st3, "recovery-points"))]


# --------------------------------------------------------------------------------------------
# item 11: authorization before the body, quota, free-space reserve
# --------------------------------------------------------------------------------------------


def answer_to_head(srv, method, path, headers, length, final=True):
    """Sends only the head of a request that announces `length` bytes (`Expect: 100-continue`)
    and never its body. Returns the server's first answer's status, or with `final` the first
    final one: a server that needs the body before it can decide never gives one (the socket's
    timeout then fails the test)."""
    ctx = ssl.create_default_context(cafile=str(srv.ca_path))
    with socket.create_connection(("localhost", srv.port), timeout=120) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as s:
            head = [f"{method} {path} HTTP/1.1", f"Host: localhost:{srv.port}",
                    f"Content-Length: {length}", "Expect: 100-continue",
                    "Content-Type: application/octet-stream"]
            head += [f"{k}: {v}" for k, v in headers.items()]
            s.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
            data = b""
            while True:
                while b"\r\n\r\n" not in data:
                    chunk = s.recv(4096)
                    assert chunk, f"connection closed without an answer: {data!r}"
                    data += chunk
                answer, data = data.split(b"\r\n\r\n", 1)
                status = int(answer.split(b" ", 2)[1])
                if not final or status >= 200:
                    return status


def test_agent_request_authorized_before_its_body(kagi, tmp_path):
    bv, _ = backup_vault(kagi)
    creds = credentials(kagi, bv, tmp_path)
    st_a, st_b = tmp_path / "a", tmp_path / "b"
    ok(register(st_a, creds, "a.example", passfile(tmp_path, "a" * 20)))
    ok(register(st_b, creds, "b.example", passfile(tmp_path, "b" * 20)))
    cred = {"Authorization": f"KagiVaultCredential {json.loads(creds.read_text())['secret']}"}
    as_a, as_b = as_machine(st_a, "a.example"), as_machine(st_b, "b.example")
    path = agent_url(kagi, bv, "machines/a.example/objects/data/00/big").split(str(kagi.port), 1)[1]
    big = 32 << 20

    # The vault credentials, another machine, a method that carries no object or one no route
    # serves (refused by the router, before the provider is asked): answered without the
    # announced 32 MiB.
    assert answer_to_head(kagi, "PUT", path, cred, big) == 403
    assert answer_to_head(kagi, "PUT", path, as_b, big) == 403
    assert answer_to_head(kagi, "POST", path, as_a, big) == 405
    assert answer_to_head(kagi, "DELETE", path, as_a, big) == 413
    probe = agent_url(kagi, bv, "probe").split(str(kagi.port), 1)[1]
    assert answer_to_head(kagi, "POST", probe, as_a, 1000) == 401
    # The owner may send it: the server asks for the body.
    assert answer_to_head(kagi, "PUT", path, as_a, big, final=False) == 100
    # Nothing was stored, and the machine still works.
    assert kagi.request("GET", agent_url(kagi, bv, "machines/a.example/objects/data/00/big"),
                        auth=False, headers=as_a).status_code == 404
    ok(agent(st_a, "status"))


def test_agent_vault_storage_quota(tmp_path):
    quota = 256 * 1024
    srv = _start_server(tmp_path, "quota", env={"KAGI_AGENT_VAULT_QUOTA_BYTES": str(quota)})
    try:
        bv, creds, st, src, rp = backed_up_machine(srv, tmp_path, "q1.example")

        # Beyond the quota: refused with a clear error, nothing stored.
        (src / "big.bin").write_bytes(os.urandom(400 * 1024))
        fails(agent(st, "backup"), "UserErrorVaultStorageQuotaExceeded")
        hdr = as_machine(st, "q1.example")
        url = agent_url(srv, bv, "machines/q1.example/objects/data/ff/over")
        r = srv.request("PUT", url, auth=False, headers=hdr, data=os.urandom(quota))
        err = assert_error_shape(r, 403, "Forbidden")
        assert inner_code(r) == "UserErrorVaultStorageQuotaExceeded", r.text
        assert "quota" in err["message"], err
        assert srv.request("GET", url, auth=False, headers=hdr).status_code == 404
        # Per vault: another machine of the same vault is refused too ...
        st2 = tmp_path / "q2"
        ok(register(st2, creds, "q2.example", passfile(tmp_path, "r" * 20)))
        r = srv.request("PUT", agent_url(srv, bv, "machines/q2.example/objects/data/ff/over"), auth=False,
                        headers=as_machine(st2, "q2.example"), data=os.urandom(quota))
        assert inner_code(r) == "UserErrorVaultStorageQuotaExceeded", r.text
        # ... another vault is not, and small writes and reads go on.
        bv2, _ = backup_vault(srv)
        st3 = tmp_path / "q3"
        ok(register(st3, credentials(srv, bv2, tmp_path), "q3.example", passfile(tmp_path, "s" * 20)))
        src3 = tmp_path / "src3"
        small_tree(src3)
        (src3 / "c.bin").write_bytes(os.urandom(150 * 1024))
        ok(agent(st3, "protect", str(src3)))
        ok(agent(st3, "backup"))
        ok(agent(st, "restore", "--recovery-point", rp, "--target", str(tmp_path / "r")))
        # Deleting frees quota.
        small = agent_url(srv, bv, "machines/q1.example/objects/data/ff/small")
        assert srv.request("PUT", small, auth=False, headers=hdr, data=b"x" * 1000).status_code == 201
        assert srv.request("DELETE", small, auth=False, headers=hdr).status_code == 204
    finally:
        srv.stop()


# The reserve keeps the server's own disk from filling; objects in a bucket do not use it.
@pytest.mark.local_blobs
def test_agent_writes_refused_before_the_disk_is_full(tmp_path):
    srv = _start_server(tmp_path, "reserve")
    try:
        bv, _, st, src, rp = backed_up_machine(srv, tmp_path, "d1.example")
        hdr = as_machine(st, "d1.example")
        keep = agent_url(srv, bv, "machines/d1.example/objects/data/ee/keep")
        assert srv.request("PUT", keep, auth=False, headers=hdr, data=b"k" * 100).status_code == 201

        # A reserve larger than the disk's free space: as if the disk were nearly full.
        srv.stop()
        srv.extra_env["KAGI_AGENT_DISK_RESERVE_BYTES"] = str(1 << 60)
        srv.start()
        (src / "c.txt").write_text("a change that needs a new pack\n")
        fails(agent(st, "backup"), "ServerStorageReserveReached")
        url = agent_url(srv, bv, "machines/d1.example/objects/data/ee/new")
        r = srv.request("PUT", url, auth=False, headers=hdr, data=b"n" * 100)
        assert_error_shape(r, 507, "InsufficientStorage")
        assert inner_code(r) == "ServerStorageReserveReached", r.text
        assert srv.request("GET", url, auth=False, headers=hdr).status_code == 404
        # Reads, deletes and everything else still work, and are audited.
        audit = srv.data_dir / "audit" / "audit.jsonl"
        before = audit.stat().st_size
        ok(agent(st, "restore", "--recovery-point", rp, "--target", str(tmp_path / "r")))
        assert srv.request("DELETE", keep, auth=False, headers=hdr).status_code == 204
        assert ok(kagi_cli(srv, "backup", "vault", "machines", *vref(bv)))["value"]
        assert audit.stat().st_size > before

        # With room again, backups go on.
        srv.stop()
        del srv.extra_env["KAGI_AGENT_DISK_RESERVE_BYTES"]
        srv.start()
        ok(agent(st, "backup"))
    finally:
        srv.stop()


# --------------------------------------------------------------------------------------------
# follow-up review of items 1 and 11: per-object serialisation, name conflicts
# --------------------------------------------------------------------------------------------


def registered_machine(srv, tmp_path, machine):
    """A new vault on `srv` with `machine` registered: (vault, its Authorization header)."""
    bv, _ = backup_vault(srv)
    st = tmp_path / machine
    ok(register(st, credentials(srv, bv, tmp_path), machine, passfile(tmp_path, "c" * 20)))
    return bv, as_machine(st, machine)


def test_agent_object_where_a_folder_is_is_a_conflict(kagi, tmp_path):
    bv, hdr = registered_machine(kagi, tmp_path, "n1.example")

    def url(name):
        return agent_url(kagi, bv, f"machines/n1.example/objects/{name}")

    assert kagi.request("PUT", url("data/ab/cd"), auth=False, headers=hdr, data=b"one").status_code == 201
    before = objects_of(kagi, "n1.example")
    # An object below an object, or an object where a folder of objects is: the client's
    # mistake, in Azure's error shape, and nothing is written.
    for name in ["data/ab/cd/ef", "data/ab/cd/ef/gh", "data/ab", "data"]:
        r = kagi.request("PUT", url(name), auth=False, headers=hdr, data=b"two")
        assert_error_shape(r, 409, "Conflict")
        assert inner_code(r) == "ObjectNameConflict", r.text
        assert objects_of(kagi, "n1.example") == before, name
    assert kagi.request("GET", url("data/ab/cd"), auth=False, headers=hdr).content == b"one"
    assert kagi.request("GET", url("data/ab/cd/ef"), auth=False, headers=hdr).status_code == 404
    # Deleting a folder's name removes no object.
    assert kagi.request("DELETE", url("data/ab"), auth=False, headers=hdr).status_code == 204
    assert objects_of(kagi, "n1.example") == before


def test_agent_racing_deletes_cannot_lift_the_quota(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    quota = 256 * 1024
    srv = _start_server(tmp_path, "race", env={"KAGI_AGENT_VAULT_QUOTA_BYTES": str(quota)})
    try:
        srv.put_rg(DEFAULT_RG)
        bv, hdr = registered_machine(srv, tmp_path, "r1.example")

        def url(name):
            return agent_url(srv, bv, f"machines/r1.example/objects/data/aa/{name}")

        def put(name, size):
            return srv.request("PUT", url(name), auth=False, headers=hdr, data=b"x" * size).status_code

        assert put("keep", 200 * 1024) == 201
        with ThreadPoolExecutor(16) as pool:
            for _ in range(6):
                assert put("x", 50 * 1024) == 201
                # The same object deleted by many requests at once is counted as freed once.
                codes = list(pool.map(lambda _: srv.request("DELETE", url("x"), auth=False,
                                                           headers=hdr).status_code, range(16)))
                assert set(codes) == {204}, codes
        # 200 KiB are stored: 100 KiB more would pass the 256 KiB quota.
        r = srv.request("PUT", url("y"), auth=False, headers=hdr, data=b"y" * (100 * 1024))
        assert_error_shape(r, 403, "Forbidden")
        assert inner_code(r) == "UserErrorVaultStorageQuotaExceeded", r.text
        assert put("z", 50 * 1024) == 201
    finally:
        srv.stop()
