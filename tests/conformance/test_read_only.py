"""A read-only node (`kagi server --read-only`, issue 14 / KV-13): a data directory made by a
normal start, served again read-only. Reads, lists and cryptographic operations work; every
write answers 503 ServiceUnavailable in Azure's words with a Retry-After, the store is left
byte-for-byte as it was, and a restart without --read-only takes writes again."""

import hashlib
import subprocess
import time

import pytest
from azure.core.exceptions import HttpResponseError
from azure.keyvault.keys import KeyType
from azure.keyvault.keys.crypto import KeyWrapAlgorithm, SignatureAlgorithm

from conftest import KAGI_BIN, random_name


def read_only_message(operation: str) -> str:
    return f'Operation "{operation}" is unavailable: the service is currently in a read-only state.'


def assert_read_only(exc: HttpResponseError, operation: str) -> None:
    assert exc.status_code == 503, exc
    assert exc.error is not None and exc.error.code == "ServiceUnavailable", exc
    assert exc.error.message == read_only_message(operation)
    assert exc.response.headers.get("Retry-After") == "2"


def data_files(data_dir):
    """Every file of the data directory but the audit log (the node's own, still written),
    SQLite's `-shm` (its shared-memory index, not data) and an empty `-wal` (a read-only open
    leaves one where a clean shutdown had removed it): path -> sha256."""
    out = {}
    for p in sorted(data_dir.rglob("*")):
        rel = p.relative_to(data_dir)
        if rel.parts[0] == "audit" or rel.name.endswith("-shm") or not p.is_file():
            continue
        if rel.name.endswith("-wal") and p.stat().st_size == 0:
            continue
        out[str(rel)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.mark.sqlite_store
def test_read_only_node(private_kagi):
    srv = private_kagi
    # Data made normally.
    v = srv.create_vault()
    keys = srv.key_client(v.url)
    secrets = srv.secret_client(v.url)
    rsa = keys.create_rsa_key("rsa1", size=2048)
    ec = keys.create_ec_key("ec1", curve="P-256")
    keys.create_rsa_key("doomed", size=2048)
    secrets.set_secret("s1", "v1")
    srv.stop()
    before = data_files(srv.data_dir)
    assert "kagi.db" in before

    srv.extra_args.append("--read-only")
    srv.start()
    try:
        # Clients sign in (the token endpoint is served).
        fresh = srv.new_credential()
        assert fresh.get_token(srv.scope).token
        keys = srv.key_client(v.url, credential=fresh)
        secrets = srv.secret_client(v.url, credential=fresh)
        # Reads and lists.
        assert keys.get_key("rsa1").id == rsa.id
        assert {k.name for k in keys.list_properties_of_keys()} == {"rsa1", "ec1", "doomed"}
        assert len(list(keys.list_properties_of_key_versions("rsa1"))) == 1
        assert secrets.get_secret("s1").value == "v1"
        assert [s.name for s in secrets.list_properties_of_secrets()] == ["s1"]
        key_backup = keys.backup_key("rsa1")
        assert key_backup
        assert secrets.backup_secret("s1")
        r = srv.get_vault(v.name)
        assert r.status_code == 200, r.text
        # The storage services' resources can be read (their data planes are not served).
        sub = f"/subscriptions/{srv.subscription_id}/resourceGroups/{v.rg}/providers"
        for path, api in [
            (f"{sub}/Microsoft.Compute/disks", "2025-01-02"),
            (f"{sub}/Microsoft.Compute/diskEncryptionSets", "2025-01-02"),
            (f"{sub}/Microsoft.Sql/servers", "2023-08-01"),
        ]:
            r = srv.request("GET", srv.arm(path, api))
            assert r.status_code == 200, (path, r.status_code, r.text[:300])
        # Cryptographic operations.
        crypto = srv.crypto_client(rsa)
        cek = bytes(range(32))
        wrapped = crypto.wrap_key(KeyWrapAlgorithm.rsa_oaep_256, cek)
        assert crypto.unwrap_key(KeyWrapAlgorithm.rsa_oaep_256, wrapped.encrypted_key).key == cek
        digest = hashlib.sha256(b"read-only").digest()
        ec_crypto = srv.crypto_client(ec)
        sig = ec_crypto.sign(SignatureAlgorithm.es256, digest)
        assert ec_crypto.verify(SignatureAlgorithm.es256, digest, sig.signature).is_valid

        # Writes: 503 in Azure's words, with Retry-After (retries off: retry_total=0).
        writes = [
            ("KeyCreate", lambda: keys.create_rsa_key("new", size=2048)),
            ("KeyUpdate", lambda: keys.update_key_properties("rsa1", enabled=False)),
            ("KeyRotate", lambda: keys.rotate_key("rsa1")),
            ("KeyDelete", lambda: keys.begin_delete_key("doomed")),
            ("SecretSet", lambda: secrets.set_secret("s1", "v2")),
            ("SecretUpdate", lambda: secrets.update_secret_properties("s1", tags={"a": "b"})),
            ("SecretDelete", lambda: secrets.begin_delete_secret("s1")),
            ("KeyRestore", lambda: keys.restore_key_backup(key_backup)),
        ]
        for operation, call in writes:
            with pytest.raises(HttpResponseError) as e:
                call()
            assert_read_only(e.value, operation)
        # Import and restore by raw request.
        r = v.raw("PUT", "/keys/imported", json={"key": {"kty": "oct", "k": "AAAA"}})
        assert r.status_code == 503 and r.json()["error"]["message"] == read_only_message("KeyImport")
        # ARM writes, with the names the audit log gives them.
        r = srv.put_vault_raw(random_name("v", 16))
        assert r.status_code == 503, r.text
        assert r.json() == {"error": {"code": "ServiceUnavailable", "message": read_only_message("VaultPut")}}
        assert r.headers["Retry-After"] == "2"
        r = srv.delete_vault(v.name)
        assert r.status_code == 503 and r.json()["error"]["message"] == read_only_message("VaultDelete")

        # With the SDK's own retries, it honours Retry-After and still ends in ServiceUnavailable.
        retrying = srv.secret_client(v.url, retry_total=1)
        started = time.monotonic()
        with pytest.raises(HttpResponseError) as e:
            retrying.set_secret("s1", "v3")
        assert time.monotonic() - started >= 1.9
        assert_read_only(e.value, "SecretSet")

        # Nothing changed.
        assert secrets.get_secret("s1").value == "v1"
        assert keys.get_key("rsa1").properties.enabled is True
        assert {k.name for k in keys.list_properties_of_keys()} == {"rsa1", "ec1", "doomed"}
    finally:
        srv.stop()
    # The store (and every other file but the audit log) byte-for-byte as it was.
    assert data_files(srv.data_dir) == before
    # The refusals were audited.
    audit = (srv.data_dir / "audit" / "audit.jsonl").read_text()
    assert '"SecretSet"' in audit and "ServiceUnavailable" in audit

    # Promotion: a restart without --read-only takes writes.
    srv.extra_args.remove("--read-only")
    srv.start()
    keys = srv.key_client(v.url)
    secrets = srv.secret_client(v.url)
    assert secrets.set_secret("s1", "v2").value == "v2"
    assert keys.create_key("new", KeyType.rsa).name == "new"
    assert keys.rotate_key("rsa1").id != rsa.id


@pytest.mark.sqlite_store
def test_read_only_refuses_an_uninitialised_data_dir(tmp_path):
    data = tmp_path / "never-started"
    p = subprocess.run(
        [str(KAGI_BIN), "server", "--read-only", "--data-dir", str(data), "--listen", "localhost:0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode != 0
    assert "never initialised" in p.stderr + p.stdout
    assert not (data / "kagi.db").exists()


def test_read_only_from_the_environment(tmp_path):
    """KAGI_READ_ONLY=1 is --read-only."""
    data = tmp_path / "env"
    p = subprocess.run(
        [str(KAGI_BIN), "server", "--data-dir", str(data), "--listen", "localhost:0"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"KAGI_READ_ONLY": "1", "PATH": "/usr/bin:/bin"},
    )
    assert p.returncode != 0 and "never initialised" in p.stderr + p.stdout
