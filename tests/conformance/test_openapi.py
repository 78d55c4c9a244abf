"""The OpenAPI description of every route kagi serves (`GET /openapi.json`, issue 16), and a
schemathesis run against it.

The description is generated from kagi's route tables, the same tables the server routes by
(crates/http/tests/openapi.rs checks that every operation it describes is served). Here it is
read from a real server, and schemathesis (in a venv of its own, made by openapi-venv.sh) sends
what it generates from it to a private server: every operation of the management host, then
every operation of a vault's data plane, with a bearer token, path parameters drawn partly from
real names (the subscription, the resource group, the vault, a key), bounded in time. No answer
may be a 5xx (schemathesis's `not_a_server_error` check, and the server's own audit log, which
records every answer) and the server must not panic.

KAGI_OPENAPI_SECONDS (default 130) is the time the two passes share, two thirds to the
management host.
"""

from __future__ import annotations

import json
import os
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import List, Tuple

import pytest
import requests

from conftest import REPO

OPENAPI_VENV = Path(os.environ.get("KAGI_OPENAPI_VENV", str(REPO / ".venv-openapi")))
ST = OPENAPI_VENV / "bin" / "st"
FUZZ_SECONDS = int(os.environ.get("KAGI_OPENAPI_SECONDS", "130"))


def operations(doc: dict):
    """(path, method, operation) of every operation of the document."""
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if method != "servers":
                yield path, method, op


def test_openapi_json_describes_the_routes_to_anyone(kagi):
    r = requests.get(f"{kagi.base}/openapi.json", verify=str(kagi.ca_path), timeout=30)
    assert r.status_code == 200, r.text[:500]
    assert r.headers["content-type"].startswith("application/json")
    doc = r.json()
    assert doc["openapi"].startswith("3.0")
    assert doc["servers"][0]["url"] == kagi.base
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    error = doc["components"]["schemas"]["Error"]
    assert error["properties"]["error"]["required"] == ["code", "message"]

    ops = list(operations(doc))
    ids = [op["operationId"] for _, _, op in ops]
    assert len(ids) == len(set(ids)), "operation ids are unique"
    # The operation id is the audit log's name (suffixed where several routes share one).
    by_path = {(p, m): op for p, m, op in ops}
    assert by_path[("/keys/{keyName}/wrapkey", "post")]["operationId"] == "KeyWrap"
    assert by_path[("/keys/{keyName}/{keyVersion}/wrapkey", "post")]["x-kagi-operation"] == "KeyWrap"
    vault = "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/providers/Microsoft.KeyVault/vaults/{vaultName}"
    assert by_path[(vault, "put")]["operationId"] == "VaultPut"
    # Every family is there: ARM, the storage services, Graph, kagi's own, the token service.
    for path in (
        "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}",
        "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/providers/Microsoft.Compute/disks/{diskName}",
        "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/providers/Microsoft.Sql/servers/{serverName}",
        "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}/providers/Microsoft.RecoveryServices/vaults/{vaultName}",
        "/{scope}/providers/Microsoft.Authorization/roleAssignments/{roleAssignmentName}",
        "/v1.0/servicePrincipals",
        "/kagi/admin/subscriptions",
        "/{tenant}/oauth2/v2.0/token",
        "/openapi.json",
    ):
        assert path in doc["paths"], path
    # The data plane is on a vault's host; ARM takes an api-version, kagi's own routes none.
    assert doc["paths"]["/keys"]["servers"][0]["url"] == f"https://{{vaultName}}.localhost:{kagi.port}"
    assert {"$ref": "#/components/parameters/api-version-arm"} in by_path[(vault, "get")]["parameters"]
    assert by_path[("/kagi/admin/subscriptions", "get")]["parameters"] == []
    assert by_path[("/{tenant}/oauth2/v2.0/token", "post")]["security"] == []
    # The test clock is served (and described) only under `kagi server --test-clock`.
    assert "/kagi/test/clock" not in doc["paths"]


def test_what_the_description_does_not_hold_is_not_served(kagi):
    r = kagi.request("GET", kagi.arm(f"/subscriptions/{kagi.subscription_id}/providers/Microsoft.Web/sites"))
    assert r.status_code == 404, r.text[:500]
    assert r.json()["error"]["code"] == "NotFound"
    r = kagi.request("DELETE", kagi.arm("/subscriptions"))
    assert r.status_code == 405, r.text[:500]
    assert r.headers["allow"] == "GET"
    # The data plane too: a vault's keys are listed, not posted to.
    vault = kagi.create_vault()
    r = kagi.request("POST", f"{kagi.vault_url(vault.name)}keys?api-version=7.4", json={})
    assert r.status_code == 405, r.text[:500]
    assert r.headers["allow"] == "GET", r.headers
    r = kagi.request("PUT", f"{kagi.vault_url(vault.name)}secrets?api-version=7.4", json={})
    assert r.status_code == 405 and r.headers["allow"] == "GET", (r.status_code, r.headers)


def _schemathesis(srv, tmp: Path, name: str, base_url: str, tag: str, seconds: int, token: str) -> Path:
    """One schemathesis pass over the operations tagged `tag`; the path of its JUnit report."""
    report = tmp / f"{name}.xml"
    cmd = [
        str(ST), "--config-file", str(tmp / "schemathesis.toml"),
        "run", str(tmp / "openapi.json"),
        "--url", base_url,
        "--tls-verify", str(srv.ca_path),
        "-H", f"Authorization: Bearer {token}",
        "--include-tag", tag,
        "--checks", "not_a_server_error",
        "--phases", "examples,coverage,fuzzing",
        "--max-examples", "25",
        "--max-time", str(seconds),
        # One worker: hypothesis's lambda descriptions are not thread-safe (a worker's own
        # error, not the server's), and the server shares the machine's cores.
        "--workers", "1",
        "--suppress-health-check", "all",
        "--request-timeout", "30",
        "--seed", "16",
        "--report", "junit",
        "--report-junit-path", str(report),
    ]
    # In the test's directory: hypothesis keeps its database in the working directory.
    p = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=seconds + 120)
    (tmp / f"{name}.log").write_text(p.stdout + p.stderr)
    print(f"--- schemathesis {name}: exit {p.returncode}\n" + "\n".join(p.stdout.splitlines()[-25:]))
    assert report.exists(), p.stdout[-3000:] + p.stderr[-3000:]
    return report


def _failures(report: Path) -> List[str]:
    """The check failures of a JUnit report (its errors are schemathesis's own, not answers)."""
    out = []
    for case in ET.parse(report).getroot().iter("testcase"):
        for failure in case.findall("failure"):
            out.append(f"{case.get('name')}: {(failure.get('message') or failure.text or '')[:2000]}")
    return out


def _server_errors(data_dir: Path) -> Tuple[List[dict], int]:
    """Every audited answer with a 5xx status, and how many answers were audited."""
    errors, count = [], 0
    for f in sorted((data_dir / "audit").glob("*.jsonl")):
        for line in f.read_text().splitlines():
            rec = json.loads(line)
            count += 1
            if rec.get("httpStatusCode", 0) >= 500:
                errors.append(rec)
    return errors, count


@pytest.mark.skipif(not ST.exists(), reason=f"schemathesis is not installed at {ST} (tests/conformance/openapi-venv.sh)")
def test_schemathesis_finds_no_server_error(private_kagi, tmp_path):
    srv = private_kagi
    sub, rg = srv.subscription_id, "kagi-conformance"
    vault = srv.create_vault("openapifuzz")
    r = vault.raw("POST", "/keys/k1/create", json={"kty": "RSA", "key_size": 2048})
    assert r.status_code == 200, r.text[:500]
    key_version = r.json()["key"]["kid"].rsplit("/", 1)[1]
    r = vault.raw("PUT", "/secrets/s1", json={"value": "fuzz"})
    assert r.status_code == 200, r.text[:500]

    doc = requests.get(f"{srv.base}/openapi.json", verify=str(srv.ca_path), timeout=30).json()
    (tmp_path / "openapi.json").write_text(json.dumps(doc))
    # Real names often (probability below 1: schemathesis's own strings too), so requests get
    # past "not found" into the handlers.
    names = {
        "subscriptionId": [sub],
        "resourceGroupName": [rg],
        "vaultName": [vault.name],
        "scope": [f"subscriptions/{sub}", f"subscriptions/{sub}/resourceGroups/{rg}"],
        "tenant": [srv.tenant_id],
        "keyName": ["k1"],
        "keyVersion": [key_version],
        "secretName": ["s1"],
        "location": ["westeurope"],
    }
    toml = ["[dictionaries]"]
    toml += [f"{n} = {{ values = {json.dumps(v)} }}" for n, v in names.items()]
    toml += ["", "[parameters]"]
    toml += [f'"path.{n}" = {{ dictionary = "{n}", probability = 0.7 }}' for n in names]
    (tmp_path / "schemathesis.toml").write_text("\n".join(toml) + "\n")

    token = srv.token()
    # The data plane first: the management pass may delete the vault (or rotate the signing
    # key many times).
    data_seconds = max(10, FUZZ_SECONDS // 3)
    reports = [
        _schemathesis(srv, tmp_path, "data-plane", vault.host_url, "data-plane", data_seconds, token),
        _schemathesis(srv, tmp_path, "management", srv.base, "management", FUZZ_SECONDS - data_seconds, token),
    ]

    assert srv.proc.poll() is None, f"the server exited:\n{srv.log_tail()}"
    assert requests.get(f"{srv.base}/healthz", verify=str(srv.ca_path), timeout=10).status_code == 200
    log = srv.log_path.read_text(errors="replace")
    assert "panicked" not in log, "the server panicked:\n" + "\n".join(
        line for line in log.splitlines() if "panicked" in line
    )
    errors, audited = _server_errors(srv.data_dir)
    assert audited > 2000, f"only {audited} requests were made"
    assert not errors, f"{len(errors)} answers were 5xx, e.g.:\n" + "\n".join(
        f"{e['properties']['httpMethod']} {e['properties']['requestUri']}: {e['httpStatusCode']} "
        f"{e.get('resultDescription')}" for e in errors[:20]
    )
    failures = [f for report in reports for f in _failures(report)]
    assert not failures, "schemathesis found server errors:\n" + "\n\n".join(failures[:10])
