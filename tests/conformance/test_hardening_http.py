"""Issue 11 (hardening), the HTTP front end and the audit log, against a real `kagi server`:

- item 4: with the audit log's disk full, no change runs without its audit record, and the log
  does not turn healthy again until there is room (a real tmpfs, full, under <data>/audit);
- item 13: a binding secret behind extra slashes (`//imds/{secret}/...`) is redacted like any;
- item 17: an answer given before the body is read (unsupported api-version, no token, a bad
  token) reaches a client that sends a large body first, as `requests` does.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import requests

from conftest import DEFAULT_RG, KagiServer, assert_error_shape, random_name


# --------------------------------------------------------------------------------------------
# item 4: a full audit disk
# --------------------------------------------------------------------------------------------


def _records(data_dir: Path) -> list:
    path = data_dir / "audit" / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_a_full_audit_disk_lets_no_change_run_unaudited(tmp_path):
    data = tmp_path / "data"
    audit_dir = data / "audit"
    audit_dir.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0700", "tmpfs", str(audit_dir)], check=True)
    # A 64 KiB reserve (the default is 4 MiB) so that a few dozen records exhaust it.
    srv = KagiServer(data, tmp_path / "server.log", env={"KAGI_AUDIT_RESERVE_BYTES": "65536"})
    try:
        srv.start()
        srv.put_rg(DEFAULT_RG)
        vault = srv.create_vault()
        token = srv.token()
        # Fill the audit filesystem.
        filler = audit_dir / "filler"
        with open(filler, "wb") as f:
            block = b"\0" * (1 << 16)
            try:
                while True:
                    f.write(block)
                    f.flush()
            except OSError:
                pass
        statuses = []

        def put(i):
            r = vault.raw(
                "PUT",
                f"/secrets/full{i}",
                json={"value": f"v{i}"},
                headers={"Authorization": f"Bearer {token}", "x-ms-client-request-id": f"full-{i}"},
            )
            statuses.append(r.status_code)

        # Changes go through (their records written into the reserve) until the log says it is
        # low; then every change is refused before any work, over many of the writer's retry
        # periods (500 ms), for as long as the disk stays full.
        while 503 not in statuses:
            assert len(statuses) < 500, "the log never ran low"
            put(len(statuses))
        first_refusal = len(statuses)
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            put(len(statuses))
            time.sleep(0.05)
        assert set(statuses[first_refusal:]) == {503}, statuses[first_refusal:]
        # Room again: the log recovers by itself.
        filler.unlink()
        deadline = time.monotonic() + 15
        while True:
            r = vault.raw("GET", "/secrets", headers={"Authorization": f"Bearer {token}"})
            if r.status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert r.status_code == 200, r.text
        listed = {
            f"full{i}"
            for i in range(len(statuses))
            if vault.raw("GET", f"/secrets/full{i}", headers={"Authorization": f"Bearer {token}"}).status_code == 200
        }
        recorded_ok = {
            rec["correlationId"]
            for rec in _records(data)
            if rec["operationName"] == "SecretSet" and rec["httpStatusCode"] == 200
        }
        for i, status in enumerate(statuses):
            exists = f"full{i}" in listed
            audited = f"full-{i}" in recorded_ok
            assert exists == audited, f"secret full{i}: exists={exists}, audited={audited}, answered {status}"
            assert exists == (status == 200), f"secret full{i}: exists={exists}, answered {status}"
    finally:
        srv.stop()
        subprocess.run(["umount", str(audit_dir)], check=False)


# --------------------------------------------------------------------------------------------
# item 13: redaction of binding secrets whatever the slashes
# --------------------------------------------------------------------------------------------


def test_a_binding_secret_behind_extra_slashes_is_redacted(private_kagi):
    srv = private_kagi
    for path in ("//imds/BINDINGSECRETA/metadata/identity/oauth2/token", "/imds//BINDINGSECRETB/metadata/identity/oauth2/token"):
        r = requests.get(
            srv.base + path,
            params={"api-version": "2018-02-01", "resource": "https://vault.azure.net"},
            headers={"Metadata": "true"},
            verify=str(srv.ca_path),
        )
        assert 400 <= r.status_code < 500, r.text
    text = (srv.data_dir / "audit" / "audit.jsonl").read_text()
    assert "BINDINGSECRET" not in text
    assert "/imds/REDACTED/" in text


# --------------------------------------------------------------------------------------------
# item 17: early answers reach clients that send their body first
# --------------------------------------------------------------------------------------------


def test_an_early_answer_reaches_a_client_still_sending_a_large_body(kagi, vault):
    body = json.dumps({"value": "x" * (2 * 1024 * 1024)})
    headers = {"Content-Type": "application/json"}
    cases = [
        # An unsupported api-version: answered before the body is read.
        (vault.data_url("/secrets/big", api_version="1.0"), {**kagi.auth_headers()}, 400),
        # No token: the challenge.
        (vault.data_url("/secrets/big"), {}, 401),
        # A token that is not kagi's.
        (vault.data_url("/secrets/big"), {"Authorization": "Bearer not.a.token"}, 401),
    ]
    for url, extra, status in cases:
        for _ in range(3):
            r = requests.put(url, data=body, headers={**headers, **extra}, verify=str(kagi.ca_path), timeout=60)
            assert_error_shape(r, status)
    # The same body with everything right is refused as too large, in Azure's shape.
    r = requests.put(vault.data_url("/secrets/big"), data=body, headers={**headers, **kagi.auth_headers()}, verify=str(kagi.ca_path))
    assert_error_shape(r, 413)


def test_an_early_answer_to_expect_continue_does_not_invite_the_body(kagi, vault):
    """`Expect: 100-continue` and no token: the 401 comes at once, without a 100 Continue, and the
    body is never asked for (the answer does not wait for it either)."""
    import socket
    import ssl
    from urllib.parse import urlsplit

    url = urlsplit(vault.data_url("/secrets/big"))
    ctx = ssl.create_default_context(cafile=str(kagi.ca_path))
    ctx.set_alpn_protocols(["http/1.1"])
    with socket.create_connection((url.hostname, url.port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname=url.hostname) as tls:
            tls.sendall(
                (
                    f"PUT {url.path}?{url.query} HTTP/1.1\r\nHost: {url.netloc}\r\n"
                    "Content-Type: application/json\r\nContent-Length: 2097152\r\n"
                    "Expect: 100-continue\r\n\r\n"
                ).encode()
            )
            started = time.monotonic()
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = tls.recv(4096)
                assert chunk, "connection closed without an answer"
                head += chunk
            assert head.startswith(b"HTTP/1.1 401"), head[:200]
            # Generous: a server that waited for the body would take its 10 s drain bound.
            assert time.monotonic() - started < 5


def test_a_request_in_flight_at_sigterm_finishes_with_its_record(tmp_path):
    """A stop (SIGTERM) while a change is being made: the server stops accepting, lets the request
    finish — its change, its audit record and its answer — and only then exits."""
    import threading

    srv = KagiServer(tmp_path / "data", tmp_path / "server.log")
    srv.start()
    srv.put_rg(DEFAULT_RG)
    vault = srv.create_vault()
    token = srv.token()
    result = {}

    def create():
        try:
            r = vault.raw(
                "POST",
                "/keys/atsigterm/create",
                json={"kty": "RSA", "key_size": 4096},
                headers={"Authorization": f"Bearer {token}", "x-ms-client-request-id": "at-sigterm"},
                timeout=60,
            )
            result["status"] = r.status_code
        except requests.RequestException as exc:
            result["error"] = repr(exc)

    worker = threading.Thread(target=create)
    worker.start()
    time.sleep(0.05)  # the RSA-4096 key is being generated
    rc = srv.stop(timeout=60)
    worker.join(60)
    assert rc == 0, srv.log_tail()
    assert result.get("status") == 200, result
    srv.start()
    try:
        r = vault.raw("GET", "/keys/atsigterm", headers={"Authorization": f"Bearer {srv.token()}"})
        assert r.status_code == 200, r.text
        records = [rec for rec in _records(srv.data_dir) if rec["correlationId"] == "at-sigterm"]
        assert [rec["httpStatusCode"] for rec in records] == [200], records
    finally:
        srv.stop()


def test_an_early_answer_to_a_large_agent_object_reaches_the_client(kagi):
    """A backup agent's pack (up to 64 MiB, typically just over 16) refused before its body is read
    (here: no credentials) still gets its answer, in Azure's shape, not a reset connection."""
    url = (f"{kagi.base}/kagi/agent/subscriptions/{kagi.subscription_id}/resourceGroups/{DEFAULT_RG}"
           f"/providers/Microsoft.RecoveryServices/vaults/nosuchvault/objects/data/ab/pack")
    body = b"\0" * (20 * 1024 * 1024)
    r = requests.put(url, data=body, headers={"Content-Type": "application/octet-stream"},
                     verify=str(kagi.ca_path), timeout=120)
    assert_error_shape(r)
    assert r.status_code in (401, 403, 404), r.text
