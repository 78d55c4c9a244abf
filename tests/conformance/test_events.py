"""Events (KV-11): Event Grid-shaped webhook subscriptions on the management API, delivery to a
real local HTTP receiver (schema, retries, a receiver that is down while kagi restarts, dead
letters), and the rotation scheduler on the test clock."""

import json
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import DEFAULT_RG, KAGI_BIN, _start_server, create_sp, free_port, sp_token

EG_API = "2022-06-15"
# Small back-off so retries happen within a test.
FAST_RETRY = {"KAGI_EVENT_RETRY_BASE_MS": "100", "KAGI_EVENT_RETRY_MAX_MS": "400"}


class Receiver:
    """A webhook on 127.0.0.1 that fails the first `fail_first` POSTs (500), or all of them.
    (Also test_alerts.py's, for Azure Monitor's notifications.)"""

    def __init__(self, fail_first=0, always_fail=False, port=0):
        self.events = []
        self.attempts = 0
        self.headers = []
        self.fail_first = fail_first
        self.always_fail = always_fail
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with outer.lock:
                    outer.attempts += 1
                    fail = outer.always_fail or outer.attempts <= outer.fail_first
                    outer.headers.append(dict(self.headers))
                    if not fail:
                        got = json.loads(body)  # Event Grid: an array; Azure Monitor: one object
                        outer.events.extend(got if isinstance(got, list) else [got])
                self.send_response(500 if fail else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}/hook"

    def wait(self, n, timeout=20.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.events) >= n:
                    return list(self.events)
            time.sleep(0.05)
        with self.lock:
            raise AssertionError(f"expected {n} events within {timeout}s, got {self.events}")

    def types(self):
        with self.lock:
            return [e["eventType"] for e in self.events]

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def ev_kagi(tmp_path):
    """A private server with --test-clock and fast event retries."""
    srv = _start_server(tmp_path, "events", extra_args=["--test-clock"], env=FAST_RETRY)
    try:
        srv.put_rg(DEFAULT_RG)
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def receivers():
    made = []

    def make(**kw):
        r = Receiver(**kw)
        made.append(r)
        return r

    yield make
    for r in made:
        r.stop()


def subs_path(srv, vault):
    return srv.vault_path(vault.rg, vault.name) + "/providers/Microsoft.EventGrid/eventSubscriptions"


def put_sub(srv, vault, name, url, types=None, max_attempts=None, token=None):
    props = {"destination": {"endpointType": "WebHook", "properties": {"endpointUrl": url}}}
    if types is not None:
        props["filter"] = {"includedEventTypes": types}
    if max_attempts is not None:
        props["retryPolicy"] = {"maxDeliveryAttempts": max_attempts}
    headers = {"Authorization": f"Bearer {token}"} if token else None
    return srv.request(
        "PUT",
        srv.arm(f"{subs_path(srv, vault)}/{name}", EG_API),
        auth=token is None,
        headers=headers,
        json={"properties": props},
    )


def test_subscriptions_crud_and_bad_input(kagi, vault):
    r = put_sub(kagi, vault, "hook-1", "https://example.invalid/hook?code=s3cret",
                types=["Microsoft.KeyVault.KeyNewVersionCreated", "microsoft.keyvault.secretexpired"])
    assert r.status_code == 201, r.text
    s = r.json()
    assert s["name"] == "hook-1"
    assert s["type"] == "Microsoft.EventGrid/eventSubscriptions"
    assert s["id"].endswith(f"/vaults/{vault.name}/providers/Microsoft.EventGrid/eventSubscriptions/hook-1")
    dest = s["properties"]["destination"]
    assert dest["endpointType"] == "WebHook"
    # The query (which may hold a secret) is never shown.
    assert dest["properties"]["endpointBaseUrl"] == "https://example.invalid/hook"
    assert "s3cret" not in r.text
    assert s["properties"]["filter"]["includedEventTypes"] == [
        "Microsoft.KeyVault.KeyNewVersionCreated", "Microsoft.KeyVault.SecretExpired"]
    assert put_sub(kagi, vault, "hook-1", "https://example.invalid/other").status_code == 200
    got = kagi.request("GET", kagi.arm(f"{subs_path(kagi, vault)}/HOOK-1", EG_API))
    assert got.status_code == 200 and got.json()["properties"]["destination"]["properties"]["endpointBaseUrl"].endswith("/other")
    assert got.json()["properties"]["filter"]["includedEventTypes"] is None

    for url in ("ftp://example.com/x", "example.com/hook", "https:///nohost", "http://host:99999/", "file:///etc/passwd"):
        r = put_sub(kagi, vault, "bad-one", url)
        assert r.status_code == 400, (url, r.text)
        assert r.json()["error"]["code"] == "BadParameter"
    r = put_sub(kagi, vault, "bad-one", "https://example.com/", types=["Microsoft.KeyVault.KeyExploded"])
    assert r.status_code == 400
    assert put_sub(kagi, vault, "bad-one", "https://example.com/", max_attempts=0).status_code == 400
    assert put_sub(kagi, vault, "x", "https://example.com/").status_code == 400  # name too short
    listed = kagi.request("GET", kagi.arm(subs_path(kagi, vault), EG_API)).json()["value"]
    assert [s["name"] for s in listed] == ["hook-1"]

    # Only the bootstrap administrator manages subscriptions (the server dials webhooks).
    sp = create_sp(kagi)
    r = put_sub(kagi, vault, "sneaky", "http://169.254.169.254/", token=sp_token(kagi, sp))
    assert r.status_code == 403

    missing = kagi.vault_path(vault.rg, "nosuchvault1") + "/providers/Microsoft.EventGrid/eventSubscriptions"
    assert kagi.request("GET", kagi.arm(missing, EG_API)).status_code == 404
    assert kagi.request("DELETE", kagi.arm(f"{subs_path(kagi, vault)}/hook-1", EG_API)).status_code == 200
    assert kagi.request("DELETE", kagi.arm(f"{subs_path(kagi, vault)}/hook-1", EG_API)).status_code == 204
    assert kagi.request("GET", kagi.arm(f"{subs_path(kagi, vault)}/hook-1", EG_API)).status_code == 404


def test_events_arrive_with_event_grid_schema(kagi, vault, receivers):
    everything = receivers()
    secrets_only = receivers()
    assert put_sub(kagi, vault, "all-events", everything.url).status_code == 201
    assert put_sub(kagi, vault, "secrets-only", secrets_only.url,
                   types=["Microsoft.KeyVault.SecretNewVersionCreated"]).status_code == 201
    keys = vault.client
    k1 = keys.create_ec_key("evk", curve="P-256")
    k2 = keys.rotate_key("evk")
    keys.begin_delete_key("evk").wait()
    s = kagi.secret_client(vault.url).set_secret("evs", "value")

    events = everything.wait(4)
    assert sorted(e["eventType"] for e in events) == sorted([
        "Microsoft.KeyVault.KeyNewVersionCreated",
        "Microsoft.KeyVault.KeyNewVersionCreated",
        "Kagi.KeyVault.KeyDeleted",
        "Microsoft.KeyVault.SecretNewVersionCreated",
    ])
    created = [e for e in events if e["eventType"] == "Microsoft.KeyVault.KeyNewVersionCreated"]
    assert {e["data"]["Id"] for e in created} == {k1.id, k2.id}
    for e in events:
        assert set(e) >= {"id", "topic", "subject", "eventType", "eventTime", "data", "dataVersion", "metadataVersion"}
        assert e["topic"].lower() == kagi.vault_path(vault.rg, vault.name).lower()
        assert e["dataVersion"] == "1" and e["metadataVersion"] == "1"
        assert e["eventTime"].endswith("Z")
        d = e["data"]
        assert d["VaultName"] == vault.name
        assert set(d) == {"Id", "VaultName", "ObjectType", "ObjectName", "Version", "NBF", "EXP"}
        assert d["Id"].endswith(f"/{d['ObjectName']}/{d['Version']}")
        assert e["subject"] == d["ObjectName"]
    sec = next(e for e in events if e["data"]["ObjectType"] == "Secret")
    assert sec["data"]["Id"] == s.id
    assert sec["data"]["EXP"] is None

    only = secrets_only.wait(1)
    time.sleep(1.0)
    assert secrets_only.types() == ["Microsoft.KeyVault.SecretNewVersionCreated"]
    assert only[0]["data"]["Id"] == s.id
    # Each event once (at least once in general; no duplicates here).
    assert len({e["id"] for e in everything.events}) == len(everything.events) == 4
    assert everything.headers[0].get("aeg-event-type") == "Notification"


def test_failing_receiver_gets_the_event_after_retries(ev_kagi, receivers):
    srv = ev_kagi
    vault = srv.create_vault()
    flaky = receivers(fail_first=3)
    assert put_sub(srv, vault, "flaky", flaky.url, max_attempts=10).status_code == 201
    srv.secret_client(vault.url).set_secret("retry-me", "v")
    events = flaky.wait(1)
    assert flaky.attempts == 4
    assert events[0]["eventType"] == "Microsoft.KeyVault.SecretNewVersionCreated"
    dead = srv.request("GET", srv.arm(f"{subs_path(srv, vault)}/flaky/deadLetters", EG_API))
    assert dead.status_code == 200 and dead.json()["value"] == []


def test_always_failing_receiver_ends_in_dead_letters(ev_kagi, receivers):
    srv = ev_kagi
    vault = srv.create_vault()
    broken = receivers(always_fail=True)
    assert put_sub(srv, vault, "broken", broken.url, max_attempts=3).status_code == 201
    key = vault.client.create_ec_key("doomed", curve="P-256")
    deadline = time.monotonic() + 20
    dead = []
    while time.monotonic() < deadline:
        dead = srv.request("GET", srv.arm(f"{subs_path(srv, vault)}/broken/deadLetters", EG_API)).json()["value"]
        if dead:
            break
        time.sleep(0.1)
    assert len(dead) == 1, dead
    d = dead[0]
    assert d["attempts"] == 3
    assert broken.attempts == 3
    assert d["lastError"] == "HTTP 500"
    assert d["eventType"] == "Microsoft.KeyVault.KeyNewVersionCreated"
    assert d["event"]["data"]["Id"] == key.id
    # The CLI reads the same dead letters.
    out = subprocess.run(
        [str(KAGI_BIN), "keyvault", "event", "deadletters", "--vault-name", vault.name,
         "--server", srv.base, "--data-dir", str(srv.data_dir), "--output", "json"],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    listed = json.loads(out.stdout)["value"]
    assert [x["eventId"] for x in listed] == [d["eventId"]]
    assert listed[0]["subscription"] == "broken"


def test_receiver_down_while_kagi_restarts_still_gets_the_event(ev_kagi, receivers):
    srv = ev_kagi
    vault = srv.create_vault()
    port = free_port()  # nothing listens here yet: every attempt is refused
    url = f"http://127.0.0.1:{port}/hook"
    assert put_sub(srv, vault, "later", url, max_attempts=30).status_code == 201
    key = vault.client.create_ec_key("queued", curve="P-256")
    time.sleep(0.5)  # a few refused attempts
    srv.kill9()
    srv.start()  # the pending delivery resumes from the store
    late = receivers(port=port)
    events = late.wait(1, timeout=30)
    assert events[0]["eventType"] == "Microsoft.KeyVault.KeyNewVersionCreated"
    assert events[0]["data"]["Id"] == key.id


def test_cli_manages_subscriptions(kagi, vault, receivers):
    r = receivers()

    def cli(*args):
        p = subprocess.run(
            [str(KAGI_BIN), "keyvault", "event", *args, "--server", kagi.base, "--data-dir", str(kagi.data_dir),
             "--output", "json"],
            capture_output=True, text=True, timeout=60,
        )
        return p

    p = cli("subscription", "create", "--vault-name", vault.name, "--name", "cli-hook", "--endpoint", r.url,
            "--types", "Microsoft.KeyVault.KeyNewVersionCreated,Kagi.KeyVault.KeyDeleted")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["name"] == "cli-hook"
    p = cli("subscription", "list", "--vault-name", vault.name)
    assert [s["name"] for s in json.loads(p.stdout)["value"]] == ["cli-hook"]
    p = cli("subscription", "create", "--vault-name", vault.name, "--name", "bad-hook", "--endpoint", "ftp://x/")
    assert p.returncode != 0 and "400" in p.stderr
    vault.client.create_ec_key("via-cli", curve="P-256")
    assert r.wait(1)[0]["data"]["ObjectName"] == "via-cli"
    p = cli("subscription", "delete", "--vault-name", vault.name, "--name", "cli-hook")
    assert p.returncode == 0, p.stderr
    p = cli("subscription", "list", "--vault-name", vault.name)
    assert json.loads(p.stdout)["value"] == []


def _advance_day(srv):
    srv._credential = None  # tokens are checked against the server's clock
    r = srv.request("POST", f"{srv.base}/kagi/test/clock", json={"advanceSeconds": 86400})
    assert r.status_code == 200, r.text
    srv._credential = None


def test_scheduler_rotates_and_notifies_on_the_test_clock(ev_kagi, receivers):
    srv = ev_kagi
    vault = srv.create_vault()
    r = receivers()
    assert put_sub(srv, vault, "timeline", r.url, types=[
        "Microsoft.KeyVault.KeyNewVersionCreated", "Microsoft.KeyVault.KeyNearExpiry",
        "Microsoft.KeyVault.KeyExpired"]).status_code == 201
    from azure.keyvault.keys import KeyRotationLifetimeAction, KeyRotationPolicy, KeyRotationPolicyAction

    c = vault.client
    c.create_ec_key("auto", curve="P-256")
    c.update_key_rotation_policy("auto", KeyRotationPolicy(), expires_in="P45D", lifetime_actions=[
        KeyRotationLifetimeAction(KeyRotationPolicyAction.rotate, time_after_create="P30D"),
        KeyRotationLifetimeAction(KeyRotationPolicyAction.notify, time_before_expiry="P10D"),
    ])
    first = c.rotate_key("auto")  # exp = created + 45 days; the schedule starts here
    r.wait(2)
    for _ in range(90):  # three periods, one day at a time
        _advance_day(srv)
    c = srv.key_client(vault.url)
    # v0 and v1 were created in the same second: v0 has no exp.
    versions = sorted(c.list_properties_of_key_versions("auto"), key=lambda v: (v.created_on, v.expires_on is not None))
    assert len(versions) == 2 + 3, [v.created_on for v in versions]
    for v in versions[2:]:
        assert (v.expires_on - v.created_on).days == 45
    gaps = [(b.created_on - a.created_on).days for a, b in zip(versions[1:], versions[2:])]
    assert gaps == [30, 30, 30]
    # Day 0: v0 (create), v1 (manual rotate, exp day 45). Days 30/60/90: v2 (exp 75), v3 (exp 105),
    # v4 (exp 135). Notify 10 days before expiry: v1 near on day 35, expired on 45; v2 on 65 and 75.
    r.wait(5 + 2 + 2)
    time.sleep(1.0)
    by_type = {}
    for e in r.events:
        by_type.setdefault(e["eventType"], []).append(e["data"]["Version"])
    assert len(by_type["Microsoft.KeyVault.KeyNewVersionCreated"]) == 5
    v1, v2 = versions[1].version, versions[2].version
    assert v1 == first.properties.version
    assert by_type["Microsoft.KeyVault.KeyNearExpiry"] == [v1, v2]
    assert by_type["Microsoft.KeyVault.KeyExpired"] == [v1, v2]
    assert len(r.events) == 9
