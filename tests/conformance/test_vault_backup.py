"""Whole-vault backup and restore between two kagi instances, through the `kagi` CLI.

The source is the session server, the target a private server with its own data directory (so its
own root key, tenant and directory). The data is made and checked with the unmodified Azure SDK.
"""

import base64
import json
import os
import subprocess

import pytest

from conftest import DEFAULT_RG, KAGI_BIN, LOCATION, random_name

pytestmark = pytest.mark.cli

PASSPHRASE = "correct horse battery staple"


def kagi_cli(srv, *args, env=None, timeout=300):
    """Runs `kagi <args> --server URL --data-dir DIR --output json` and returns the process."""
    cmd = [str(KAGI_BIN), *args, "--server", srv.base, "--data-dir", str(srv.data_dir), "--output", "json"]
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env)


def ok(p):
    assert p.returncode == 0, f"exit {p.returncode}\n--- stdout\n{p.stdout[-3000:]}\n--- stderr\n{p.stderr[-3000:]}"
    return json.loads(p.stdout)


@pytest.fixture
def source(kagi):
    """A vault on the session server with an RSA key (two versions), an EC key and secrets."""
    from azure.keyvault.keys import KeyCurveName
    from azure.keyvault.keys.crypto import KeyWrapAlgorithm, SignatureAlgorithm

    vault = kagi.create_vault(purge_protection=False)
    keys = kagi.key_client(vault.url)
    first = keys.create_rsa_key("cmk", size=2048, tags={"app": "billing"})
    dek = os.urandom(32)
    wrapped_first = kagi.crypto_client(first).wrap_key(KeyWrapAlgorithm.rsa_oaep_256, dek).encrypted_key
    second = keys.create_rsa_key("cmk", size=2048)
    wrapped_second = kagi.crypto_client(second).wrap_key(KeyWrapAlgorithm.rsa_oaep_256, dek).encrypted_key
    ec = keys.create_ec_key("signer", curve=KeyCurveName.p_256)
    digest = __import__("hashlib").sha256(b"kagi").digest()
    signature = kagi.crypto_client(ec).sign(SignatureAlgorithm.es256, digest).signature
    secrets = kagi.secret_client(vault.url)
    secrets.set_secret("db-password", "first", content_type="text/plain")
    s2 = secrets.set_secret("db-password", "second", tags={"rotated": "yes"})
    secrets.set_secret("api-token", "t0k3n")
    return dict(
        vault=vault,
        dek=dek,
        first=first,
        second=second,
        wrapped_first=wrapped_first,
        wrapped_second=wrapped_second,
        ec=ec,
        digest=digest,
        signature=signature,
        secret_version=s2.properties.version,
    )


def test_backup_and_restore_into_another_instance(kagi, private_kagi, source, tmp_path):
    from azure.keyvault.keys.crypto import KeyWrapAlgorithm, SignatureAlgorithm

    vault = source["vault"]
    backup = tmp_path / "vault.kvbak"
    pass_file = tmp_path / "pass.txt"
    pass_file.write_text(PASSPHRASE + "\n")
    pass_file.chmod(0o600)

    out = ok(kagi_cli(kagi, "keyvault", "backup", "--name", vault.name, "--resource-group", vault.rg,
                      "--file", str(backup), "--passphrase-file", str(pass_file)))
    assert out["keys"] == 2 and out["keyVersions"] == 3
    assert out["secrets"] == 2 and out["secretVersions"] == 3
    assert backup.stat().st_mode & 0o777 == 0o600
    raw = backup.read_bytes()
    assert raw.startswith(b"KAGIVBAK")
    for needle in (b"db-password", b"second", b"t0k3n", vault.name.encode()):
        assert needle not in raw

    # Into the second instance, creating the vault from the backup's settings.
    target = random_name("rst", 16)
    out = ok(kagi_cli(private_kagi, "keyvault", "restore", "--name", target, "--resource-group", DEFAULT_RG,
                      "--location", LOCATION, "--file", str(backup), "--passphrase-env", "KAGI_TEST_PASS",
                      env={"KAGI_TEST_PASS": PASSPHRASE}))
    assert out["createdVault"] is True
    assert out["keyVersions"] == 3 and out["secretVersions"] == 3
    assert out["source"]["name"] == vault.name

    # The unmodified SDK on the second instance: same versions, the DEK unwraps, the signature verifies.
    url = private_kagi.vault_url(target)
    keys = private_kagi.key_client(url)
    for original, wrapped in ((source["first"], source["wrapped_first"]), (source["second"], source["wrapped_second"])):
        restored = keys.get_key("cmk", original.properties.version)
        assert restored.properties.version == original.properties.version
        assert restored.key.n == original.key.n
        assert restored.properties.created_on == original.properties.created_on
        plain = private_kagi.crypto_client(restored).unwrap_key(KeyWrapAlgorithm.rsa_oaep_256, wrapped).key
        assert plain == source["dek"]
    assert keys.get_key("cmk").properties.version == source["second"].properties.version
    assert keys.get_key("cmk", source["first"].properties.version).properties.tags == {"app": "billing"}
    ec = keys.get_key("signer")
    assert private_kagi.crypto_client(ec).verify(SignatureAlgorithm.es256, source["digest"], source["signature"]).is_valid

    secrets = private_kagi.secret_client(url)
    assert secrets.get_secret("db-password").value == "second"
    assert secrets.get_secret("db-password", source["secret_version"]).properties.tags == {"rotated": "yes"}
    versions = sorted(v.content_type or "" for v in secrets.list_properties_of_secret_versions("db-password"))
    assert versions == ["", "text/plain"]
    assert secrets.get_secret("api-token").value == "t0k3n"

    # A wrong passphrase: non-zero exit, a clear message, and no vault at the target.
    other = random_name("rst", 16)
    bad = kagi_cli(private_kagi, "keyvault", "restore", "--name", other, "--resource-group", DEFAULT_RG,
                   "--location", LOCATION, "--file", str(backup), "--passphrase-env", "KAGI_TEST_PASS",
                   env={"KAGI_TEST_PASS": "not the passphrase"})
    assert bad.returncode != 0
    assert "passphrase does not open" in bad.stderr, bad.stderr
    assert private_kagi.get_vault(other).status_code == 404

    # The server checks it too (a client that skips the local check).
    path = private_kagi.vault_path(DEFAULT_RG, other) + "/restore"
    r = private_kagi.request(
        "POST", private_kagi.arm(path) + f"&location={LOCATION}", data=raw,
        headers={"Content-Type": "application/octet-stream",
                 "x-kagi-backup-passphrase": base64.b64encode(b"not the passphrase").decode()})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["innererror"]["code"] == "BackupPassphraseMismatch"
    assert private_kagi.get_vault(other).status_code == 404

    # A restore into a vault that is not empty is refused, and the vault is unchanged.
    before = sorted(p.name for p in keys.list_properties_of_keys())
    again = kagi_cli(private_kagi, "keyvault", "restore", "--name", target, "--resource-group", DEFAULT_RG,
                     "--file", str(backup), "--passphrase-file", str(pass_file))
    assert again.returncode != 0
    assert "VaultNotEmpty" in again.stderr, again.stderr
    assert sorted(p.name for p in keys.list_properties_of_keys()) == before


def test_backup_with_a_key_id_and_job_api(kagi, source, tmp_path):
    """keyId mode on one instance, and the raw job API: 202, Azure-AsyncOperation, result download."""
    import time

    vault = source["vault"]
    kid = source["second"].id
    r = kagi.request("POST", kagi.arm(kagi.vault_path(vault.rg, vault.name) + "/backup"), json={"keyId": kid})
    assert r.status_code == 202, r.text
    status_url = r.headers["Azure-AsyncOperation"]
    assert status_url.startswith(f"{kagi.base}/kagi/jobs/")
    for _ in range(600):
        job = kagi.request("GET", status_url).json()
        if job["status"] != "InProgress":
            break
        time.sleep(0.1)
    assert job["status"] == "Completed", job
    assert set(job) >= {"id", "status", "progress", "startTime", "endTime", "error"}
    assert job["progress"]["done"] == job["progress"]["total"] == 6
    data = kagi.request("GET", job["resultUrl"])
    assert data.status_code == 200
    assert data.headers["Content-Type"] == "application/octet-stream"
    assert len(data.content) == job["resultBytes"]
    (tmp_path / "k.kvbak").write_bytes(data.content)

    # Restore on the same instance into a new vault with the CLI (the key unwraps the file key).
    target = random_name("rkid", 16)
    out = ok(kagi_cli(kagi, "keyvault", "restore", "--name", target, "--resource-group", DEFAULT_RG,
                      "--location", LOCATION, "--file", str(tmp_path / "k.kvbak"), "--key-id", kid))
    assert out["keyVersions"] == 3
    from azure.keyvault.keys.crypto import KeyWrapAlgorithm

    restored = kagi.key_client(kagi.vault_url(target)).get_key("cmk", source["first"].properties.version)
    plain = kagi.crypto_client(restored).unwrap_key(KeyWrapAlgorithm.rsa_oaep_256, source["wrapped_first"]).key
    assert plain == source["dek"]

    # Non-administrators may not read jobs; unknown jobs are 404.
    r = kagi.request("GET", f"{kagi.base}/kagi/jobs/0123456789abcdef0123456789abcdef")
    assert r.status_code == 404
    r = kagi.request("GET", status_url, auth=False)
    assert r.status_code == 401
