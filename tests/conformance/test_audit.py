"""The audit log (KV-10): every request recorded once with Azure's AuditEvent fields, nothing secret
in it, tampering detected by `kagi audit verify`, and requests refused with 503 (quickly) while the
log cannot be written.

The server under test is private (own data dir), so the log holds exactly this test's requests.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from conftest import DEFAULT_RG, KAGI_BIN, KagiServer, b64url_decode, b64url_encode, random_name


def kagi_cli(data_dir: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    cmd = [str(KAGI_BIN), *args, "--data-dir", str(data_dir)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def audit_query(data_dir: Path, *filters: str) -> list:
    p = kagi_cli(data_dir, "audit", "query", *filters, "--output", "json")
    assert p.returncode == 0, p.stderr
    return [json.loads(line) for line in p.stdout.splitlines() if line.strip()]


def audit_verify(data_dir: Path) -> subprocess.CompletedProcess:
    return kagi_cli(data_dir, "audit", "verify")


def token_oid(token: str) -> str:
    return json.loads(b64url_decode(token.split(".")[1]))["oid"]


def audit_file(data_dir: Path) -> Path:
    return data_dir / "audit" / "audit.jsonl"


def tampered_copy(tmp_path: Path, name: str, lines: list) -> Path:
    d = tmp_path / name
    (d / "audit").mkdir(parents=True)
    (d / "audit" / "audit.jsonl").write_bytes(b"".join(lines))
    return d


def test_every_request_is_audited_once_and_tampering_is_detected(private_kagi, tmp_path):
    srv = private_kagi
    vault = srv.create_vault()
    token = srv.token()
    admin_oid = token_oid(token)

    # SDK: create a key and unwrap with it (unwrap always goes to the server).
    key_name = random_name("k", 12)
    key = srv.key_client(vault.url).create_rsa_key(key_name, size=2048)
    dek = os.urandom(32)
    # Wrap on the server (the SDK would wrap locally with the public key).
    wrap_id = "audit-wrap-" + secrets.token_hex(8)
    r = vault.raw(
        "POST",
        f"/keys/{key_name}/{key.properties.version}/wrapkey",
        json={"alg": "RSA-OAEP-256", "value": b64url_encode(dek)},
        headers={"x-ms-client-request-id": wrap_id},
    )
    assert r.status_code == 200, r.text
    assert r.headers["x-ms-request-id"] == wrap_id
    wrapped = b64url_decode(r.json()["value"])
    from azure.keyvault.keys.crypto import KeyWrapAlgorithm

    assert srv.crypto_client(key).unwrap_key(KeyWrapAlgorithm.rsa_oaep_256, wrapped).key == dek

    # Refused: no token.
    noauth_id = "audit-noauth-" + secrets.token_hex(8)
    r = vault.raw("GET", f"/keys/{key_name}", auth=False, headers={"x-ms-client-request-id": noauth_id})
    assert r.status_code == 401
    # Not found.
    missing_id = "audit-404-" + secrets.token_hex(8)
    r = vault.raw("GET", "/keys/does-not-exist", headers={"x-ms-client-request-id": missing_id})
    assert r.status_code == 404

    records = audit_query(srv.data_dir)
    assert records, "the audit log is empty"
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))

    def one(pred, what):
        found = [r for r in records if pred(r)]
        assert len(found) == 1, f"{what}: {len(found)} records\n" + "\n".join(json.dumps(r) for r in found)
        return found[0]

    created = one(lambda r: r["operationName"] == "KeyCreate" and r["httpStatusCode"] == 200, "KeyCreate")
    assert created["properties"]["id"] == key.id
    assert created["resultType"] == "Success" and created["resultSignature"] == "OK"
    assert created["identity"]["claim"]["oid"] == admin_oid
    assert created["identity"]["claim"]["tid"] == srv.tenant_id
    assert created["resourceId"].lower() == vault.body["id"].lower()

    wrap = one(lambda r: r["correlationId"] == wrap_id, "KeyWrap")
    assert (wrap["operationName"], wrap["resultType"], wrap["httpStatusCode"]) == ("KeyWrap", "Success", 200)
    assert wrap["identity"]["claim"]["oid"] == admin_oid
    assert wrap["properties"]["id"] == key.id
    assert wrap["properties"]["httpMethod"] == "POST"

    unwrap = one(lambda r: r["operationName"] == "KeyUnwrap" and r["httpStatusCode"] == 200, "KeyUnwrap")
    assert unwrap["identity"]["claim"]["oid"] == admin_oid
    assert unwrap["properties"]["id"] == key.id

    refused = one(lambda r: r["correlationId"] == noauth_id, "refused")
    assert (refused["operationName"], refused["resultType"], refused["httpStatusCode"]) == ("KeyGet", "Failure", 401)
    assert refused["resultSignature"] == "Unauthorized"
    assert "identity" not in refused

    missing = one(lambda r: r["correlationId"] == missing_id, "404")
    assert (missing["operationName"], missing["resultType"], missing["httpStatusCode"]) == ("KeyGet", "Failure", 404)
    assert missing["resultDescription"] == "KeyNotFound"
    assert missing["identity"]["claim"]["oid"] == admin_oid

    vault_put = one(lambda r: r["operationName"] == "VaultPut", "VaultPut")
    assert vault_put["httpStatusCode"] in (200, 201)
    auth = [r for r in records if r["operationName"] == "Authentication"]
    assert auth and all(r["identity"]["claim"]["oid"] == admin_oid for r in auth if r["httpStatusCode"] == 200)

    # Filters of `kagi audit query`.
    only_wraps = audit_query(srv.data_dir, "--operation", "KeyWrap")
    assert [r["correlationId"] for r in only_wraps] == [wrap_id]
    failures = audit_query(srv.data_dir, "--result", "Failure")
    assert {noauth_id, missing_id} <= {r["correlationId"] for r in failures}
    assert all(r["resultType"] == "Failure" for r in failures)
    by_caller = audit_query(srv.data_dir, "--caller", admin_oid, "--resource", key_name)
    assert {"KeyCreate", "KeyWrap", "KeyUnwrap"} <= {r["operationName"] for r in by_caller}
    assert not audit_query(srv.data_dir, "--since", "2999-01-01T00:00:00Z")
    table = kagi_cli(srv.data_dir, "audit", "query", "--operation", "KeyWrap")
    assert table.returncode == 0 and "KeyWrap" in table.stdout

    # Nothing secret in the raw file: no key material, no token, no client secret.
    raw = audit_file(srv.data_dir).read_bytes()
    for needle in {
        b64url_encode(dek),
        base64.b64encode(dek).decode(),
        token,
        token.split(".")[2],
        srv.admin["clientSecret"],
    }:
        assert needle.encode() not in raw, needle
    # The file is private.
    assert audit_file(srv.data_dir).stat().st_mode & 0o777 == 0o600
    assert (srv.data_dir / "audit").stat().st_mode & 0o777 == 0o700

    # Export: JSON lines, exactly as stored.
    export = tmp_path / "export.jsonl"
    p = kagi_cli(srv.data_dir, "audit", "export", "--file", str(export))
    assert p.returncode == 0, p.stderr
    srv.stop()  # no more appends; the file is final

    lines = audit_file(srv.data_dir).read_bytes().splitlines(keepends=True)
    assert export.read_bytes() == b"".join(lines)
    p = audit_verify(srv.data_dir)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith(f"ok: {len(lines)} records, chain intact"), p.stdout
    p = kagi_cli(srv.data_dir, "audit", "verify", "--file", str(export))
    assert p.returncode == 0, p.stderr
    assert len(lines) >= 6

    # One byte edited in one record (a digit of its status code).
    i = next(n for n, l in enumerate(lines) if b'"httpStatusCode":200' in l and n > 1)
    edited = list(lines)
    edited[i] = edited[i].replace(b'"httpStatusCode":200', b'"httpStatusCode":201', 1)
    p = audit_verify(tampered_copy(tmp_path, "edited", edited))
    assert p.returncode == 1, p.stdout + p.stderr
    assert f"line {i + 1}" in p.stderr, p.stderr

    # A line deleted.
    deleted = lines[:2] + lines[3:]
    p = audit_verify(tampered_copy(tmp_path, "deleted", deleted))
    assert p.returncode == 1, p.stdout + p.stderr
    assert "line 3" in p.stderr, p.stderr

    # Two lines swapped.
    swapped = list(lines)
    swapped[1], swapped[2] = swapped[2], swapped[1]
    p = audit_verify(tampered_copy(tmp_path, "swapped", swapped))
    assert p.returncode == 1, p.stdout + p.stderr
    assert "line 2" in p.stderr, p.stderr

    # A forged record appended (a copy of the last with the next seq; its hash does not match).
    forged = json.loads(lines[-1])
    forged["seq"] += 1
    forged["operationName"] = "KeyPurge"
    p = audit_verify(tampered_copy(tmp_path, "forged", lines + [json.dumps(forged).encode() + b"\n"]))
    assert p.returncode == 1, p.stdout + p.stderr
    assert f"line {len(lines) + 1}" in p.stderr, p.stderr


@pytest.fixture
def faulty_kagi(tmp_path, monkeypatch):
    """A private server with the audit fault-injection hook armed (inert until the trigger exists)."""
    trigger = tmp_path / "audit-fail-trigger"
    monkeypatch.setenv("KAGI_AUDIT_FAIL_FILE", str(trigger))
    srv = KagiServer(tmp_path / "faulty-data", tmp_path / "faulty.log")
    srv.start()
    try:
        srv.put_rg(DEFAULT_RG)
        srv.trigger = trigger
        yield srv
    finally:
        srv.stop()


def test_unwritable_audit_log_refuses_requests_with_503_and_recovers(faulty_kagi):
    srv = faulty_kagi
    vault = srv.create_vault()
    key = srv.key_client(vault.url).create_rsa_key(random_name("k", 12), size=2048)
    get_key = lambda: vault.raw("GET", f"/keys/{key.name}", timeout=30)  # noqa: E731
    assert get_key().status_code == 200

    srv.trigger.write_text("fail")
    started = time.monotonic()
    r = get_key()
    assert r.status_code == 503, r.text
    assert r.json() == {
        "error": {
            "code": "ServiceUnavailable",
            "message": "The audit log cannot be written; the request was not served.",
        }
    }
    # Management and token requests too, and every later one, quickly.
    assert srv.get_vault(vault.name).status_code == 503
    for _ in range(3):
        assert get_key().status_code == 503
    assert time.monotonic() - started < 10

    srv.trigger.unlink()
    deadline = time.monotonic() + 15
    while True:
        status = get_key().status_code
        if status == 200:
            break
        assert status == 503
        assert time.monotonic() < deadline, "requests were not served again after the audit log recovered"
        time.sleep(0.1)

    srv.stop()
    p = audit_verify(srv.data_dir)
    assert p.returncode == 0, p.stderr
    records = audit_query(srv.data_dir)
    assert all(r["httpStatusCode"] != 503 for r in records)
