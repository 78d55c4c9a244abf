"""Fixtures for the kagi Azure SDK conformance suite.

One `kagi server` per session (``kagi`` fixture), a fresh vault per test
(``vault`` / ``premium_vault`` / ``make_vault``), and a private server on its own
data dir for restart tests (``private_kagi``).

Every data-plane interaction goes through the unmodified Azure SDK for Python;
``requests`` is used only for ARM management calls and raw-HTTP checks.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import pytest
import requests

REPO = Path(__file__).resolve().parents[2]
KAGI_BIN = Path(os.environ.get("KAGI_BIN", str(REPO / "target" / "debug" / "kagi")))

STARTUP_TIMEOUT = 30.0
LOCATION = "westeurope"
RG_API = "2021-04-01"
KV_API = "2023-07-01"
DATA_API = "7.4"  # oldest data-plane api-version the server must accept; used for raw requests
DEFAULT_RG = "kagi-conformance"

# Keep SDK failures fast and single-shot: a 5xx must surface as a failure, not be retried for minutes.
SDK_TIMEOUTS = dict(connection_timeout=10, read_timeout=120, retry_total=0)


# --------------------------------------------------------------------------------------------
# pytest hooks
# --------------------------------------------------------------------------------------------


def pytest_configure(config):
    config.addinivalue_line("markers", "cli: tests of the kagi command-line interface")
    config.addinivalue_line(
        "markers", "sqlite_store: tests that read or check the SQLite file itself (kagi.db)"
    )
    config.addinivalue_line(
        "markers", "local_blobs: tests that change blob files in the data directory directly"
    )


def pytest_collection_modifyitems(config, items):
    # On the PostgreSQL backend (KAGI_CONFORMANCE_POSTGRES) there is no kagi.db to read, and
    # with blobs in a bucket (KAGI_CONFORMANCE_BLOBS) no blob files; these tests run in the
    # suite's SQLite pass.
    skips = []
    if os.environ.get("KAGI_CONFORMANCE_POSTGRES"):
        skips.append(("sqlite_store", "reads the SQLite file; the store is on PostgreSQL"))
    if os.environ.get("KAGI_CONFORMANCE_BLOBS"):
        skips.append(("local_blobs", "changes blob files; the blobs are in a bucket"))
    for mark, reason in skips:
        for item in items:
            if mark in item.keywords:
                item.add_marker(pytest.mark.skip(reason=reason))


def pytest_sessionstart(session):
    # Fail fast, with a clear message, if *.localhost does not resolve (libnss-myhostname missing).
    # Only relevant when tests actually run, not for --collect-only.
    if session.config.option.collectonly:
        return
    try:
        socket.getaddrinfo("probe.localhost", 443)
    except socket.gaierror as exc:
        pytest.exit(
            "'probe.localhost' does not resolve ({}). kagi vaults live at https://<vault>.localhost:PORT/; "
            "install libnss-myhostname (apt-get install libnss-myhostname, which adds 'myhostname' to "
            "/etc/nsswitch.conf) or add /etc/hosts entries.".format(exc),
            returncode=3,
        )


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port that is free on both loopbacks (best effort)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s4:
            s4.bind(("127.0.0.1", 0))
            port = s4.getsockname()[1]
            try:
                with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s6:
                    s6.bind(("::1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port found")


def random_name(prefix: str = "v", length: int = 16) -> str:
    """A name of exactly `length` chars: prefix (must start with a letter) + random lowercase hex."""
    assert len(prefix) < length
    return prefix + secrets.token_hex(length)[: length - len(prefix)]


def b64url_decode(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def b64url_encode(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).decode().rstrip("=")


def tail(path: Path, lines: int = 80) -> str:
    try:
        data = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return "<no log file>"
    return "\n".join(data[-lines:])


def assert_error_shape(resp: requests.Response, status: Optional[int] = None, code: Optional[str] = None) -> dict:
    """Azure error body: {"error": {"code": str, "message": str, ...}}. Returns the error object."""
    if status is not None:
        assert resp.status_code == status, f"expected {status}, got {resp.status_code}: {resp.text[:500]}"
    assert resp.status_code != 500, resp.text[:500]
    try:
        body = resp.json()
    except ValueError:
        raise AssertionError(f"error body is not JSON: {resp.text[:500]!r}")
    assert isinstance(body, dict) and isinstance(body.get("error"), dict), body
    err = body["error"]
    assert isinstance(err.get("code"), str) and err["code"], body
    assert isinstance(err.get("message"), str) and err["message"], body
    if code is not None:
        assert err["code"] == code, body
    return err


def parse_challenge(header: str) -> tuple:
    """Parse 'Bearer a="x", b="y"' into ("Bearer", {"a": "x", "b": "y"})."""
    scheme, _, rest = header.strip().partition(" ")
    params = {}
    for item in rest.split(","):
        item = item.strip()
        if not item:
            continue
        k, sep, v = item.partition("=")
        assert sep, f"malformed challenge parameter {item!r} in {header!r}"
        params[k.strip()] = v.strip().strip('"')
    return scheme, params


# --------------------------------------------------------------------------------------------
# the server process
# --------------------------------------------------------------------------------------------


def scratch_pg_database(server_url: str) -> str:
    """Creates an empty database on a PostgreSQL server; returns its URL (same credentials)."""
    import psycopg

    name = f"kagi_conf_{os.getpid()}_{secrets.token_hex(6)}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    base, _, rest = server_url.partition("://")
    authority, _, tail = rest.partition("/")
    query = tail.partition("?")[2]
    return f"{base}://{authority}/{name}" + (f"?{query}" if query else "")


class KagiServer:
    """A `kagi server` child process bound to one data dir and one port."""

    def __init__(
        self,
        data_dir: Path,
        log_path: Path,
        port: Optional[int] = None,
        extra_args: Optional[List[str]] = None,
        env: Optional[Dict[str, str]] = None,
    ):
        self.extra_args: List[str] = list(extra_args or [])  # e.g. ["--test-clock"]
        self.extra_env: Dict[str, str] = dict(env or {})  # e.g. {"KAGI_EVENT_RETRY_BASE_MS": "100"}
        self.data_dir = Path(data_dir)
        self.log_path = Path(log_path)
        self.port = port or free_port()
        # The SQL service's PostgreSQL listener (each server its own port).
        self.sql_port = free_port()
        self.proc: Optional[subprocess.Popen] = None
        # Where it listens; a node of a cluster listens on a loopback address of its own.
        self.listen_host = "localhost"
        # The other nodes and the round-robin proxy of a cluster (`_start_cluster`).
        self.cluster: List[Any] = []
        # KAGI_CONFORMANCE_POSTGRES (a PostgreSQL server URL): each server keeps its store in a
        # scratch database of its own there (`--store`), kept across its restarts.
        self.store_url: Optional[str] = (
            scratch_pg_database(os.environ["KAGI_CONFORMANCE_POSTGRES"])
            if os.environ.get("KAGI_CONFORMANCE_POSTGRES") and "--store" not in self.extra_args
            else None
        )
        # KAGI_CONFORMANCE_BLOBS (`s3://bucket[/prefix]`, the AWS_* variables set: scripts/s3.sh):
        # each server keeps its blobs under a prefix of its own in that bucket (`--blobs`), kept
        # across its restarts.
        self.blobs_url: Optional[str] = (
            f"{os.environ['KAGI_CONFORMANCE_BLOBS'].rstrip('/')}/{uuid.uuid4().hex}"
            if os.environ.get("KAGI_CONFORMANCE_BLOBS") and "--blobs" not in self.extra_args
            else None
        )
        self._log_fh = None
        self._credential = None
        self._admin: Optional[dict] = None

    # -- paths / identity ------------------------------------------------------------------
    @property
    def base(self) -> str:
        return f"https://localhost:{self.port}"

    @property
    def ca_path(self) -> Path:
        return self.data_dir / "tls" / "ca.pem"

    @property
    def admin_path(self) -> Path:
        return self.data_dir / "bootstrap-admin.json"

    @property
    def admin(self) -> dict:
        if self._admin is None:
            self._admin = json.loads(self.admin_path.read_text())
        return self._admin

    @property
    def tenant_id(self) -> str:
        return self.admin["tenantId"]

    @property
    def subscription_id(self) -> str:
        return self.admin["subscriptionId"]

    @property
    def scope(self) -> str:
        return f"{self.base}/.default"

    def vault_url(self, name: str) -> str:
        return f"https://{name}.localhost:{self.port}/"

    def blob_objects(self, folder: str = "backup") -> Dict[str, bytes]:
        """Every blob the server keeps below `folder` of its data directory, by path relative
        to it: its files, or with `--blobs s3://…` (KAGI_CONFORMANCE_BLOBS) the objects under
        its prefix in the bucket."""
        if not self.blobs_url:
            root = self.data_dir / folder
            if not root.exists():
                return {}
            return {
                str(f.relative_to(root)): f.read_bytes()
                for f in root.rglob("*")
                if f.is_file() and "#" not in f.name
            }
        s3 = S3Bucket.from_url(self.blobs_url)
        return {k: s3.get(f"{folder}/{k}") for k in s3.list(folder)}

    def store_bytes(self) -> bytes:
        """Everything the store holds, as bytes: the SQLite files, or every value of every
        table of the server's PostgreSQL database (to check what is sealed at rest)."""
        if not self.store_url:
            return b"".join(
                (self.data_dir / f).read_bytes()
                for f in ("kagi.db", "kagi.db-wal")
                if (self.data_dir / f).exists()
            )
        import psycopg

        out = bytearray()
        with psycopg.connect(self.store_url) as conn:
            tables = [
                r[0]
                for r in conn.execute(
                    "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
                )
            ]
            for t in tables:
                for row in conn.execute(f'SELECT * FROM "{t}"'):
                    for v in row:
                        if isinstance(v, (bytes, bytearray, memoryview)):
                            out += bytes(v)
                        elif v is not None:
                            out += str(v).encode()
        return bytes(out)

    # -- lifecycle -------------------------------------------------------------------------
    def command(self) -> List[str]:
        return [
            str(KAGI_BIN),
            "server",
            "--data-dir",
            str(self.data_dir),
            "--listen",
            f"{self.listen_host}:{self.port}",
            *([] if "--sql-listen" in self.extra_args else ["--sql-listen", f"localhost:{self.sql_port}"]),
            *(["--store", self.store_url] if self.store_url else []),
            *(["--blobs", self.blobs_url] if self.blobs_url else []),
            *self.extra_args,
        ]

    def start(self, timeout: float = STARTUP_TIMEOUT) -> "KagiServer":
        if not KAGI_BIN.exists():
            pytest.fail(f"kagi binary not found at {KAGI_BIN} (build it, or set KAGI_BIN)", pytrace=False)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_fh = open(self.log_path, "ab")
        self._log_fh.write(f"\n===== start {time.strftime('%H:%M:%S')}: {' '.join(self.command())}\n".encode())
        self._log_fh.flush()
        env = dict(os.environ)
        env.setdefault("RUST_BACKTRACE", "1")
        env.update(self.extra_env)
        self.proc = subprocess.Popen(
            self.command(), stdout=self._log_fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
        )
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last_err: Any = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._fail(f"kagi server exited early with code {self.proc.returncode}")
            if self.ca_path.exists() and self.admin_path.exists():
                try:
                    r = requests.get(f"{self.base}/healthz", verify=str(self.ca_path), timeout=2)
                    if r.status_code == 200:
                        return
                    last_err = f"healthz answered {r.status_code}: {r.text[:200]}"
                except requests.RequestException as exc:
                    last_err = exc
            time.sleep(0.1)
        self._fail(f"kagi server not ready within {timeout}s (last error: {last_err})")

    def _fail(self, msg: str) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        pytest.fail(f"{msg}\n--- tail of {self.log_path} ---\n{tail(self.log_path)}", pytrace=False)

    def stop(self, timeout: float = 15.0) -> Optional[int]:
        """SIGTERM, then SIGKILL if it does not exit. Returns the exit code."""
        rc = None
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                rc = self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                rc = self.proc.wait(10)
        elif self.proc:
            rc = self.proc.returncode
        self._close_log()
        return rc

    def kill9(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self._close_log()

    def restart(self, hard: bool = True) -> "KagiServer":
        """kill -9 (or SIGTERM when hard=False) and start again on the same data dir and port."""
        if hard:
            self.kill9()
        else:
            self.stop()
        self._admin = None
        return self.start()

    def _close_log(self) -> None:
        if self._log_fh:
            self._log_fh.close()
            self._log_fh = None

    def log_tail(self, lines: int = 80) -> str:
        return tail(self.log_path, lines)

    # -- auth ------------------------------------------------------------------------------
    def new_credential(self, secret: Optional[str] = None, **kwargs):
        from azure.identity import ClientSecretCredential

        return ClientSecretCredential(
            self.admin["tenantId"],
            self.admin["clientId"],
            secret if secret is not None else self.admin["clientSecret"],
            authority=self.admin.get("authority", self.base),
            disable_instance_discovery=True,
            connection_verify=str(self.ca_path),
            **kwargs,
        )

    @property
    def credential(self):
        if self._credential is None:
            self._credential = self.new_credential()
        return self._credential

    def token(self) -> str:
        return self.credential.get_token(self.scope).token

    def auth_headers(self) -> Dict[str, str]:
        return {"Authorization": f"Bearer {self.token()}"}

    # -- SDK clients -----------------------------------------------------------------------
    def client_kwargs(self, **overrides) -> dict:
        kw = dict(SDK_TIMEOUTS)
        kw["connection_verify"] = str(self.ca_path)
        kw.update(overrides)
        return kw

    def key_client(self, vault_url: str, credential=None, **kwargs):
        from azure.keyvault.keys import KeyClient

        return KeyClient(vault_url, credential or self.credential, **self.client_kwargs(**kwargs))

    def secret_client(self, vault_url: str, credential=None, **kwargs):
        from azure.keyvault.secrets import SecretClient

        return SecretClient(vault_url, credential or self.credential, **self.client_kwargs(**kwargs))

    def crypto_client(self, key, credential=None, **kwargs):
        from azure.keyvault.keys.crypto import CryptographyClient

        return CryptographyClient(key, credential or self.credential, **self.client_kwargs(**kwargs))

    # -- raw HTTP --------------------------------------------------------------------------
    def request(self, method: str, url: str, *, auth: bool = True, headers=None, **kwargs) -> requests.Response:
        h = dict(headers or {})
        if auth:
            h.update(self.auth_headers())
        kwargs.setdefault("timeout", 60)
        return requests.request(method, url, headers=h, verify=str(self.ca_path), **kwargs)

    # -- ARM management --------------------------------------------------------------------
    def arm(self, path: str, api_version: str = KV_API) -> str:
        sep = "&" if "?" in path else "?"
        return f"{self.base}{path}{sep}api-version={api_version}"

    def rg_path(self, rg: str) -> str:
        return f"/subscriptions/{self.subscription_id}/resourcegroups/{rg}"

    def vault_path(self, rg: str, name: str) -> str:
        return f"/subscriptions/{self.subscription_id}/resourceGroups/{rg}/providers/Microsoft.KeyVault/vaults/{name}"

    def deleted_vaults_path(self) -> str:
        return f"/subscriptions/{self.subscription_id}/providers/Microsoft.KeyVault/deletedVaults"

    def deleted_vault_path(self, name: str, location: str = LOCATION) -> str:
        return (
            f"/subscriptions/{self.subscription_id}/providers/Microsoft.KeyVault/locations/{location}"
            f"/deletedVaults/{name}"
        )

    def put_rg(self, rg: str = DEFAULT_RG) -> requests.Response:
        r = self.request("PUT", self.arm(self.rg_path(rg), RG_API), json={"location": LOCATION})
        assert r.status_code in (200, 201), f"resource group PUT: {r.status_code} {r.text[:500]}"
        return r

    @staticmethod
    def vault_body(
        tenant_id: str,
        sku: str = "standard",
        purge_protection: bool = False,
        retention: int = 7,
        create_mode: Optional[str] = None,
        **extra_props,
    ) -> dict:
        props = {
            "tenantId": tenant_id,
            "sku": {"family": "A", "name": sku},
            "enableSoftDelete": True,
            "softDeleteRetentionInDays": retention,
            "enablePurgeProtection": purge_protection,
            "accessPolicies": [],
        }
        if create_mode:
            props["createMode"] = create_mode
        props.update(extra_props)
        return {"location": LOCATION, "properties": props}

    def put_vault_raw(self, name: str, rg: str = DEFAULT_RG, body: Optional[dict] = None, **kw) -> requests.Response:
        if body is None:
            body = self.vault_body(self.tenant_id, **kw)
        return self.request("PUT", self.arm(self.vault_path(rg, name)), json=body)

    def create_vault(self, name: Optional[str] = None, rg: str = DEFAULT_RG, **kw) -> "Vault":
        name = name or random_name("v", 16)
        r = self.put_vault_raw(name, rg, **kw)
        assert r.status_code in (200, 201), f"vault PUT {name}: {r.status_code} {r.text[:500]}"
        body = r.json()
        url = body["properties"]["vaultUri"]
        return Vault(server=self, name=name, rg=rg, url=url, body=body)

    def get_vault(self, name: str, rg: str = DEFAULT_RG) -> requests.Response:
        return self.request("GET", self.arm(self.vault_path(rg, name)))

    def delete_vault(self, name: str, rg: str = DEFAULT_RG) -> requests.Response:
        return self.request("DELETE", self.arm(self.vault_path(rg, name)))

    def list_deleted_vaults(self) -> requests.Response:
        return self.request("GET", self.arm(self.deleted_vaults_path()))

    def get_deleted_vault(self, name: str, location: str = LOCATION) -> requests.Response:
        return self.request("GET", self.arm(self.deleted_vault_path(name, location)))

    def purge_deleted_vault(self, name: str, location: str = LOCATION) -> requests.Response:
        return self.request("POST", self.arm(self.deleted_vault_path(name, location) + "/purge"))

    def recover_vault(self, name: str, rg: str = DEFAULT_RG, **kw) -> requests.Response:
        return self.put_vault_raw(name, rg, create_mode="recover", **kw)


@dataclass
class Vault:
    server: KagiServer
    name: str
    rg: str
    url: str  # vaultUri, with trailing slash
    body: dict
    _client: Any = field(default=None, repr=False)

    @property
    def client(self):
        """A KeyClient for this vault (shared per test)."""
        if self._client is None:
            self._client = self.server.key_client(self.url)
        return self._client

    @property
    def host_url(self) -> str:
        return self.url.rstrip("/")

    def data_url(self, path: str, api_version: Optional[str] = DATA_API) -> str:
        """Raw data-plane URL. path starts with '/'."""
        url = self.host_url + path
        if api_version is not None:
            url += ("&" if "?" in path else "?") + f"api-version={api_version}"
        return url

    def raw(self, method: str, path: str, *, api_version: Optional[str] = DATA_API, **kwargs) -> requests.Response:
        return self.server.request(method, self.data_url(path, api_version), **kwargs)

    def key_names(self) -> List[str]:
        return sorted(p.name for p in self.client.list_properties_of_keys())


# --------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------


SOFTHSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"
SOFTHSM_PIN = "1234-kagi"


def softhsm_token(dir: Path, label: str = "kagi") -> Tuple[List[str], Dict[str, str]]:
    """A SoftHSM2 token in `dir` (made once; scripts/setup.sh installs softhsm2): the
    `kagi server` flags and the environment that use it."""
    tokens = dir / "tokens"
    tokens.mkdir(parents=True, exist_ok=True)
    conf = dir / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n")
    pin = dir / "pin"
    pin.write_text(SOFTHSM_PIN + "\n")
    os.chmod(pin, 0o600)
    env = {"SOFTHSM2_CONF": str(conf)}
    if not any(tokens.iterdir()):
        subprocess.run(
            ["softhsm2-util", "--init-token", "--free", "--label", label, "--pin", SOFTHSM_PIN, "--so-pin", "5678-kagi"],
            env={**os.environ, **env},
            check=True,
            stdout=subprocess.DEVNULL,
        )
    args = ["--pkcs11-module", SOFTHSM_MODULE, "--pkcs11-token", label, "--pkcs11-pin-file", str(pin)]
    return args, env


def _start_server(
    tmp_dir: Path,
    name: str,
    extra_args: Optional[List[str]] = None,
    env: Optional[Dict[str, str]] = None,
    hsm: bool = False,
) -> KagiServer:
    """A server with its own data dir; `hsm=True` gives it a SoftHSM2 token (`srv.hsm_env`)."""
    extra_args = list(extra_args or [])
    env = dict(env or {})
    hsm_env: Dict[str, str] = {}
    if hsm:
        hsm_args, hsm_env = softhsm_token(tmp_dir / f"{name}-softhsm")
        extra_args += hsm_args
        env.update(hsm_env)
    srv = KagiServer(tmp_dir / f"{name}-data", tmp_dir / f"{name}.log", extra_args=extra_args, env=env)
    srv.hsm_env = hsm_env
    srv.start()
    return srv


class RoundRobinProxy:
    """A TCP load balancer on localhost:PORT (both loopbacks): each connection goes to the next
    backend in turn (skipping one that refuses), as any TCP balancer in front of kagi nodes."""

    def __init__(self, port: int, backends: List[Tuple[str, int]]):
        import asyncio
        import threading

        self.port, self.backends, self.next = port, backends, 0
        self.loop = asyncio.new_event_loop()
        self.servers: List[Any] = []
        ready = threading.Event()

        def run():
            asyncio.set_event_loop(self.loop)
            for host in ("127.0.0.1", "::1"):
                self.servers.append(
                    self.loop.run_until_complete(asyncio.start_server(self._serve, host, port))
                )
            ready.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        ready.wait(10)

    async def _serve(self, reader, writer):
        import asyncio

        upstream = None
        for _ in range(len(self.backends)):
            host, port = self.backends[self.next % len(self.backends)]
            self.next += 1
            try:
                upstream = await asyncio.open_connection(host, port)
                break
            except OSError:
                continue
        if upstream is None:
            writer.close()
            return
        up_reader, up_writer = upstream

        async def pipe(src, dst):
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                try:
                    dst.close()
                except (ConnectionError, OSError):
                    pass

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def stop(self) -> None:
        for srv in self.servers:
            self.loop.call_soon_threadsafe(srv.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


class S3Bucket:
    """A minimal S3 client (path-style requests signed with AWS Signature V4, from the AWS_*
    variables) for tests that look at what kagi stored in a bucket."""

    def __init__(self, bucket: str, prefix: str) -> None:
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT") or ""
        self.region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        self.key_id = os.environ["AWS_ACCESS_KEY_ID"]
        self.secret = os.environ["AWS_SECRET_ACCESS_KEY"]

    @classmethod
    def from_url(cls, url: str) -> "S3Bucket":
        rest = url[len("s3://"):]
        bucket, _, prefix = rest.partition("/")
        return cls(bucket, prefix)

    def _request(
        self,
        method: str,
        key: str,
        query: Dict[str, str],
        body: bytes = b"",
        extra: Optional[Dict[str, str]] = None,
    ) -> bytes:
        import datetime
        import hashlib
        import hmac
        import urllib.parse
        import urllib.request

        path = "/" + urllib.parse.quote(f"{self.bucket}/{key}".rstrip("/"), safe="/-_.~")
        qs = "&".join(
            f"{urllib.parse.quote(k, safe='-_.~')}={urllib.parse.quote(v, safe='-_.~')}"
            for k, v in sorted(query.items())
        )
        host = urllib.parse.urlparse(self.endpoint).netloc
        now = datetime.datetime.now(datetime.timezone.utc)
        amz_date, day = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
        empty = hashlib.sha256(body).hexdigest()
        headers = {"host": host, "x-amz-content-sha256": empty, "x-amz-date": amz_date}
        signed = ";".join(sorted(headers))
        canonical = "\n".join(
            [method, path, qs, *(f"{k}:{headers[k]}" for k in sorted(headers)), "", signed, empty]
        )
        scope = f"{day}/{self.region}/s3/aws4_request"
        to_sign = "\n".join(
            ["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()]
        )
        k = ("AWS4" + self.secret).encode()
        for part in (day, self.region, "s3", "aws4_request"):
            k = hmac.new(k, part.encode(), hashlib.sha256).digest()
        sig = hmac.new(k, to_sign.encode(), hashlib.sha256).hexdigest()
        auth = f"AWS4-HMAC-SHA256 Credential={self.key_id}/{scope}, SignedHeaders={signed}, Signature={sig}"
        req = urllib.request.Request(
            f"{self.endpoint}{path}" + (f"?{qs}" if qs else ""),
            method=method,
            data=body if method == "PUT" else None,
            headers={
                **{k: v for k, v in headers.items() if k != "host"},
                "Authorization": auth,
                "Content-Type": "application/octet-stream",
                **(extra or {}),
            },
        )
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.read()

    def list(self, folder: str = "") -> List[str]:
        """Keys under `folder`, relative to it."""
        import xml.etree.ElementTree as ET

        base = "/".join(p for p in (self.prefix, folder.strip("/")) if p) + "/"
        out: List[str] = []
        token: Optional[str] = None
        while True:
            q = {"list-type": "2", "prefix": base}
            if token:
                q["continuation-token"] = token
            root = ET.fromstring(self._request("GET", "", q))
            ns = root.tag.split("}")[0] + "}" if root.tag.startswith("{") else ""
            out += [c.findtext(f"{ns}Key")[len(base):] for c in root.findall(f"{ns}Contents")]
            token = root.findtext(f"{ns}NextContinuationToken")
            if not token:
                return out

    def get(self, key: str) -> bytes:
        return self._request("GET", "/".join(p for p in (self.prefix, key) if p), {})


def _start_cluster(tmp: Path, count: int) -> KagiServer:
    """KAGI_CONFORMANCE_NODES=N (with KAGI_CONFORMANCE_POSTGRES): the session server as N nodes on
    one PostgreSQL database with strict consistency, each on a loopback address of its own
    (127.0.0.2, .3, …) and one port, behind a round-robin TCP proxy on localhost:PORT, so every
    URL kagi hands out reaches the proxy. Node 1 is the returned server (its data directory:
    CA, admin, audit log); the other nodes have copies of its root key, CA and admin file."""
    import shutil

    port = free_port()
    hsm_args, hsm_env = softhsm_token(tmp / "session-softhsm")
    store = scratch_pg_database(os.environ["KAGI_CONFORMANCE_POSTGRES"])
    hosts = [f"127.0.0.{i + 2}" for i in range(count)]
    proxy = RoundRobinProxy(port, [(h, port) for h in hosts])
    nodes: List[KagiServer] = []
    for i, host in enumerate(hosts):
        data = tmp / f"session-node{i + 1}-data"
        # `--store` comes from `store_url` (set below, before the start).
        args = [*hsm_args, "--consistency", "strict"]
        if i:
            data.mkdir(mode=0o700)
            for f in ("root.key", "root.key.sealed", "bootstrap-admin.json"):
                if (nodes[0].data_dir / f).exists():
                    shutil.copy2(nodes[0].data_dir / f, data / f)
            shutil.copytree(nodes[0].data_dir / "tls", data / "tls")
            args += ["--sql-listen", "none"]
        node = KagiServer(
            data, tmp / f"session-node{i + 1}.log", port=port, extra_args=[*args, "--store", store], env=hsm_env
        )
        node.extra_args = args
        node.listen_host = host
        node.store_url = store
        if nodes:
            # One bucket prefix for the cluster: every node serves every vault's blobs.
            node.blobs_url = nodes[0].blobs_url
        node.hsm_env = hsm_env
        node.start()
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            try:
                socket.create_connection((host, port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    node._fail(f"node {host} never listened")
                time.sleep(0.1)
        nodes.append(node)
    first = nodes[0]
    first.cluster = [*nodes[1:], proxy]
    return first


@pytest.fixture(scope="session")
def kagi(tmp_path_factory) -> KagiServer:
    """The shared server for the whole session (KAGI_CONFORMANCE_NODES=N: N nodes behind a
    round-robin proxy, see `_start_cluster`)."""
    tmp = tmp_path_factory.mktemp("kagi")
    count = int(os.environ.get("KAGI_CONFORMANCE_NODES", "1"))
    # With an HSM, as premium vaults' RSA-HSM/EC-HSM keys need one (and its root key sealed by it).
    srv = _start_cluster(tmp, count) if count > 1 else _start_server(tmp, "session", hsm=True)
    ca = str(srv.ca_path)
    saved = {k: os.environ.get(k) for k in ("REQUESTS_CA_BUNDLE", "SSL_CERT_FILE")}
    os.environ["REQUESTS_CA_BUNDLE"] = ca
    os.environ["SSL_CERT_FILE"] = ca
    try:
        srv.put_rg(DEFAULT_RG)
        yield srv
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        rc = srv.stop()
        if rc not in (0, None, -signal.SIGTERM):
            print(f"\nkagi server exited with {rc} after SIGTERM; log tail:\n{srv.log_tail()}")
        for other in srv.cluster:
            other.stop()


@pytest.fixture
def make_vault(kagi) -> Callable[..., Vault]:
    """Factory: make_vault(sku="premium", purge_protection=True, retention=7, name=None)."""

    def _make(**kw) -> Vault:
        return kagi.create_vault(**kw)

    return _make


@pytest.fixture
def vault(make_vault) -> Vault:
    """A fresh standard vault with soft delete (7 days) and no purge protection."""
    return make_vault()


@pytest.fixture
def premium_vault(make_vault) -> Vault:
    return make_vault(sku="premium")


@pytest.fixture
def private_kagi(tmp_path) -> KagiServer:
    """A server with its own data dir and port, for kill/restart tests."""
    srv = _start_server(tmp_path, "private")
    try:
        srv.put_rg(DEFAULT_RG)
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def hsm_kagi(tmp_path) -> KagiServer:
    """A private server with its own SoftHSM2 token (`srv.hsm_env` reaches it)."""
    srv = _start_server(tmp_path, "hsm", hsm=True)
    try:
        srv.put_rg(DEFAULT_RG)
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def clock_kagi(tmp_path) -> KagiServer:
    """A private server started with --test-clock (POST /kagi/test/clock moves its time)."""
    srv = _start_server(tmp_path, "clock", extra_args=["--test-clock"])
    try:
        srv.put_rg(DEFAULT_RG)
        yield srv
    finally:
        srv.stop()


@pytest.fixture(autouse=True)
def _dump_server_log_on_failure(request):
    """Print the server log tail when a test fails (helps when the server 500s or panics)."""
    yield
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        for fixture_name in ("kagi", "private_kagi", "clock_kagi"):
            if fixture_name in request.fixturenames:
                try:
                    srv = request.getfixturevalue(fixture_name)
                except Exception:  # pragma: no cover - fixture itself failed
                    continue
                print(f"\n--- {fixture_name} log tail ({srv.log_path}) ---\n{srv.log_tail(60)}")


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


# --------------------------------------------------------------------------------------------
# identities and authorization helpers (test_identity.py, test_authz_matrix.py)
# --------------------------------------------------------------------------------------------

IDENTITY_API = "2023-01-31"  # Microsoft.ManagedIdentity and Kagi.Compute resources
AUTHZ_API = "2022-04-01"  # Microsoft.Authorization (roleAssignments, roleDefinitions)
LOCKS_API = "2020-05-01"  # Microsoft.Authorization/locks


def inner_code(resp: requests.Response) -> Optional[str]:
    """error.innererror.code of an Azure error body, or None."""
    try:
        body = resp.json()
    except ValueError:
        return None
    err = body.get("error") if isinstance(body, dict) else None
    inner = err.get("innererror") if isinstance(err, dict) else None
    return inner.get("code") if isinstance(inner, dict) else None


def create_sp(srv: KagiServer, name: Optional[str] = None) -> dict:
    """POST /v1.0/servicePrincipals as the admin; returns {objectId, clientId, clientSecret, tenantId, ...}."""
    r = srv.request("POST", f"{srv.base}/v1.0/servicePrincipals", json={"displayName": name or random_name("sp", 12)})
    assert r.status_code == 201, f"service principal POST: {r.status_code} {r.text[:500]}"
    return r.json()


def delete_sp(srv: KagiServer, object_id: str) -> requests.Response:
    return srv.request("DELETE", f"{srv.base}/v1.0/servicePrincipals/{object_id}")


def sp_credential(srv: KagiServer, sp: dict, secret: Optional[str] = None):
    """An unmodified azure-identity ClientSecretCredential for a service principal."""
    from azure.identity import ClientSecretCredential

    return ClientSecretCredential(
        sp["tenantId"],
        sp["clientId"],
        secret if secret is not None else sp["clientSecret"],
        authority=srv.base,
        disable_instance_discovery=True,
        connection_verify=str(srv.ca_path),
    )


def sp_token(srv: KagiServer, sp: dict) -> str:
    """A raw client-credentials token for a service principal (no SDK cache)."""
    r = requests.post(
        f"{srv.base}/{sp['tenantId']}/oauth2/v2.0/token",
        data={
            "grant_type": "client_credentials",
            "client_id": sp["clientId"],
            "client_secret": sp["clientSecret"],
            "scope": srv.scope,
        },
        verify=str(srv.ca_path),
        timeout=30,
    )
    assert r.status_code == 200, f"token for {sp['clientId']}: {r.status_code} {r.text[:300]}"
    return r.json()["access_token"]


def role_definition_id(srv: KagiServer, role_guid: str) -> str:
    return f"/subscriptions/{srv.subscription_id}/providers/Microsoft.Authorization/roleDefinitions/{role_guid}"


def put_role_assignment(
    srv: KagiServer, scope: str, role_guid: str, principal_id: str, assignment_id: Optional[str] = None
) -> requests.Response:
    """PUT {scope}/providers/Microsoft.Authorization/roleAssignments/{guid}; returns the raw response."""
    import uuid

    aid = assignment_id or str(uuid.uuid4())
    return srv.request(
        "PUT",
        srv.arm(f"{scope}/providers/Microsoft.Authorization/roleAssignments/{aid}", AUTHZ_API),
        json={"properties": {"roleDefinitionId": role_definition_id(srv, role_guid), "principalId": principal_id}},
    )


def assign_role(srv: KagiServer, scope: str, role_guid: str, principal_id: str) -> str:
    """Creates a role assignment (asserting 201); returns its ARM id (for DELETE)."""
    r = put_role_assignment(srv, scope, role_guid, principal_id)
    assert r.status_code == 201, f"role assignment at {scope}: {r.status_code} {r.text[:500]}"
    return r.json()["id"]


def update_vault_properties(srv: KagiServer, vault: "Vault", **props) -> requests.Response:
    """PUT the vault again with the given properties (kagi merges properties on PUT)."""
    body = {
        "location": LOCATION,
        "properties": {"tenantId": srv.tenant_id, "sku": {"family": "A", "name": "standard"}, **props},
    }
    return srv.request("PUT", srv.arm(srv.vault_path(vault.rg, vault.name)), json=body)


def advance_clock(srv, seconds):
    """Moves a `--test-clock` server's clock forward."""
    r = srv.request("POST", f"{srv.base}/kagi/test/clock", json={"advanceSeconds": seconds})
    assert r.status_code in (200, 204), r.text


def wait_for(what, predicate, timeout=30.0):
    """Polls `predicate` until it is truthy (returned), failing after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = predicate()
        if v:
            return v
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}")
