"""Prometheus metrics (`kagi server --metrics-listen`) and structured logs (`--log-format json`).

Each test starts its own server, so the counters hold exactly this test's requests. The
exposition is parsed by a small parser here (the suite does not depend on prometheus_client).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest
import requests

from conftest import DEFAULT_RG, KAGI_BIN, _start_server, b64url_encode, free_port, random_name

Labels = Tuple[Tuple[str, str], ...]

_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_exposition(text: str) -> Dict[str, List[Tuple[Dict[str, str], float]]]:
    """Samples by name: [(labels, value)]. Comments (# HELP, # TYPE, # UNIT, # EOF) are skipped."""
    out: Dict[str, List[Tuple[Dict[str, str], float]]] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        assert m, f"not a sample line: {line!r}"
        name, labels, value = m.groups()
        parsed = dict(_LABEL.findall(labels or ""))
        out.setdefault(name, []).append((parsed, float(value)))
    return out


def value(samples, name: str, **labels: str) -> float:
    """The value of the one sample of `name` with exactly `labels` (0 when absent)."""
    found = [v for (l, v) in samples.get(name, []) if l == labels]
    assert len(found) <= 1, f"{name}{labels}: {found}"
    return found[0] if found else 0.0


def scrape(port: int) -> Dict[str, List[Tuple[Dict[str, str], float]]]:
    r = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/openmetrics-text"), r.headers
    assert r.text.endswith("# EOF\n")
    return parse_exposition(r.text)


def audit_records(data_dir: Path) -> list:
    p = subprocess.run(
        [str(KAGI_BIN), "audit", "query", "--output", "json", "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 0, p.stderr
    return [json.loads(line) for line in p.stdout.splitlines() if line.strip()]


@pytest.fixture
def metrics_kagi(tmp_path):
    port = free_port()
    srv = _start_server(tmp_path, "metrics", extra_args=["--metrics-listen", f"127.0.0.1:{port}"])
    srv.metrics_port = port
    try:
        srv.put_rg(DEFAULT_RG)
        yield srv
    finally:
        srv.stop()


def test_counters_move_with_sdk_calls(metrics_kagi):
    srv = metrics_kagi
    port = srv.metrics_port
    vault = srv.create_vault()
    client = srv.key_client(vault.url)
    before = scrape(port)

    # Azure SDK: create an RSA key, wrap on the server, and a 404 for a key that is not there.
    name = random_name("k", 12)
    key = client.create_rsa_key(name, size=2048)
    r = vault.raw(
        "POST",
        f"/keys/{name}/{key.properties.version}/wrapkey",
        json={"alg": "RSA-OAEP-256", "value": b64url_encode(os.urandom(32))},
    )
    assert r.status_code == 200, r.text
    from azure.core.exceptions import ResourceNotFoundError

    with pytest.raises(ResourceNotFoundError):
        client.get_key(random_name("missing", 12))

    after = scrape(port)
    req = "kagi_http_requests_total"
    assert value(after, req, operation="KeyCreate", status="200") == value(
        before, req, operation="KeyCreate", status="200"
    ) + 1
    assert value(after, req, operation="KeyWrap", status="200") == value(
        before, req, operation="KeyWrap", status="200"
    ) + 1
    assert value(after, req, operation="KeyGet", status="404") >= value(
        before, req, operation="KeyGet", status="404"
    ) + 1
    # The SDK's first request of each client is the 401 challenge.
    assert value(after, req, operation="KeyCreate", status="401") >= 1
    # The management plane: the vault PUT, under the audit log's name.
    assert value(after, req, operation="VaultPut", status="200") + value(
        after, req, operation="VaultPut", status="201"
    ) >= 1

    # The latency histogram: one observation per request, cumulative buckets ending in +Inf.
    h = "kagi_http_request_duration_seconds"
    assert value(after, h + "_count", operation="KeyWrap") == value(
        before, h + "_count", operation="KeyWrap"
    ) + 1
    buckets = [(l, v) for (l, v) in after[h + "_bucket"] if l.get("operation") == "KeyWrap"]
    assert buckets and buckets[-1][0]["le"] == "+Inf" and buckets[-1][1] == value(
        after, h + "_count", operation="KeyWrap"
    )
    assert [v for _, v in buckets] == sorted(v for _, v in buckets)

    # Cryptographic operations by key type and operation.
    c = "kagi_crypto_operations_total"
    assert value(after, c, kty="RSA", op="wrapkey") == value(before, c, kty="RSA", op="wrapkey") + 1

    # Audit batches: every record is in some batch, each batch was synced once.
    assert value(after, "kagi_audit_batch_records_sum") >= value(after, "kagi_audit_batch_records_count") >= 1
    assert value(after, "kagi_audit_batch_records_sum") > value(before, "kagi_audit_batch_records_sum")
    assert value(after, "kagi_audit_fsync_duration_seconds_count") == value(
        after, "kagi_audit_batch_records_count"
    )

    # Gauges computed at scrape time.
    assert value(after, "kagi_jobs", service="keyvault", kind="VaultBackup", state="InProgress") == 0
    assert value(after, "kagi_disks_open", key_state="Usable") == 0
    assert value(after, "kagi_sql_databases_inaccessible") == 0
    assert value(after, "kagi_backup_vaults", protector="CustomerManaged") == 0
    for service in ("disk", "sql"):
        assert any(l == {"service": service} for (l, _) in after["kagi_cmk_keys_in_grace"]), service

    # Bounded labels: no vault or key name, no request id anywhere in the exposition.
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    assert vault.name not in text and name not in text


def test_metrics_listener_serves_only_get_metrics(metrics_kagi):
    port = metrics_kagi.metrics_port
    assert requests.get(f"http://127.0.0.1:{port}/", timeout=10).status_code == 404
    assert requests.post(f"http://127.0.0.1:{port}/metrics", timeout=10).status_code == 405
    # The HTTPS listener does not serve it.
    r = requests.get(f"{metrics_kagi.base}/metrics", verify=str(metrics_kagi.ca_path), timeout=10)
    assert r.status_code != 200 or "kagi_http_requests_total" not in r.text


def test_no_metrics_listener_without_the_flag(tmp_path):
    port = free_port()
    srv = _start_server(tmp_path, "nometrics")
    try:
        with pytest.raises(requests.ConnectionError):
            requests.get(f"http://127.0.0.1:{port}/metrics", timeout=2)
        assert "metrics (Prometheus" not in srv.log_path.read_text()
    finally:
        srv.stop()


def test_json_logs_carry_the_audit_records_request_id(tmp_path):
    srv = _start_server(tmp_path, "jsonlog", extra_args=["--log-format", "json"])
    try:
        srv.put_rg(DEFAULT_RG)
        vault = srv.create_vault()
        request_id = "metrics-log-" + secrets.token_hex(8)
        r = vault.raw("GET", f"/keys/{random_name('missing', 12)}", headers={"x-ms-client-request-id": request_id})
        assert r.status_code == 404
        assert r.headers["x-ms-request-id"] == request_id
    finally:
        srv.stop()

    # The server's stdout (its start banner) shares the log file; stderr is the JSON log.
    lines = srv.log_path.read_text().splitlines()
    objects = []
    for line in lines:
        if line.startswith("{"):
            obj = json.loads(line)  # one object per line, whole
            assert isinstance(obj, dict)
            assert {"timestamp", "level", "fields", "target"} <= obj.keys(), obj
            objects.append(obj)
        else:
            # Nothing logged is left as text: only the banner and the harness's own lines.
            assert not re.match(r"^\S+Z\s+(INFO|WARN|ERROR|DEBUG)", line), line
    assert objects, "no JSON log line"

    def request_ids(obj) -> set:
        ids = {s.get("request_id") for s in obj.get("spans", [])}
        ids.add(obj.get("span", {}).get("request_id"))
        return ids - {None}

    mine = [o for o in objects if request_id in request_ids(o)]
    assert mine, "no log line of the request"
    answered = [o for o in mine if o["fields"].get("message") == "request answered"]
    assert len(answered) == 1, mine
    assert answered[0]["fields"]["operation"] == "KeyGet"
    assert answered[0]["fields"]["status"] == 404

    # The audit record of that request carries the same id.
    records = [rec for rec in audit_records(srv.data_dir) if rec.get("correlationId") == request_id]
    assert len(records) == 1, records
    assert records[0]["operationName"] == "KeyGet"

    # Every request logged has its own id, each matching one audit record.
    logged = {i for o in objects if o["fields"].get("message") == "request answered" for i in request_ids(o)}
    audited = {rec["correlationId"] for rec in audit_records(srv.data_dir)}
    assert logged and logged <= audited


def _base_name(sample: str) -> str:
    for suffix in ("_bucket", "_count", "_sum", "_total"):
        if sample.endswith(suffix):
            return sample[: -len(suffix)]
    return sample


def test_docs_and_dashboard_name_exactly_the_exported_metrics(metrics_kagi):
    """docs/METRICS.md lists every metric the server exports, and the Grafana dashboard uses
    only metrics that exist."""
    repo = Path(__file__).resolve().parents[2]
    exported = {_base_name(n) for n in scrape(metrics_kagi.metrics_port)}
    assert {"kagi_http_requests", "kagi_cmk_keys_in_grace", "kagi_audit_batch_records"} <= exported

    doc = (repo / "docs" / "METRICS.md").read_text()
    documented = {_base_name(n) for n in re.findall(r"^\| `(kagi_[a-z_]+)`", doc, re.M)}
    # Crypto counters appear only once something was counted; the table lists them all.
    assert exported <= documented, exported - documented

    dashboard = json.loads((repo / "docs" / "grafana-kagi.json").read_text())
    exprs = []

    def walk(node):
        if isinstance(node, dict):
            if isinstance(node.get("expr"), str):
                exprs.append(node["expr"])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(dashboard)
    used = {_base_name(n) for e in exprs for n in re.findall(r"\bkagi_[a-z_]+", e)}
    assert used and used <= documented, used - documented
    assert documented <= used, f"metrics no panel shows: {documented - used}"
