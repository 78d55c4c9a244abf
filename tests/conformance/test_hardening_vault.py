"""Issue 11 (hardening), item 2: a whole-vault restore cut short by kill -9 is rolled back at the
next start (all or nothing), so the vault can be restored into again at once, even with purge
protection on. Driven through the real job API and a real server process.
"""

from __future__ import annotations

import base64
import time

import pytest

from conftest import DEFAULT_RG, LOCATION, random_name
from test_vault_backup import PASSPHRASE, kagi_cli, ok

pytestmark = pytest.mark.cli

SECRETS = 300


def backup_of_many_secrets(srv, tmp_path):
    """A vault of SECRETS secrets backed up with the CLI: (backup file, passphrase file)."""
    source = srv.create_vault(purge_protection=False)
    client = srv.secret_client(source.url)
    for i in range(SECRETS):
        client.set_secret(f"s{i:04d}", f"value-{i}")
    backup = tmp_path / "v.kvbak"
    pass_file = tmp_path / "pass.txt"
    pass_file.write_text(PASSPHRASE + "\n")
    pass_file.chmod(0o600)
    ok(kagi_cli(srv, "keyvault", "backup", "--name", source.name, "--resource-group", source.rg,
                "--file", str(backup), "--passphrase-file", str(pass_file)))
    return backup, pass_file


def start_restore(srv, target: str, raw: bytes, location):
    path = srv.vault_path(DEFAULT_RG, target) + "/restore"
    url = srv.arm(path) + (f"&location={location}" if location else "")
    r = srv.request(
        "POST", url, data=raw,
        headers={"Content-Type": "application/octet-stream",
                 "x-kagi-backup-passphrase": base64.b64encode(PASSPHRASE.encode()).decode()})
    assert r.status_code == 202, r.text
    return r.headers["Azure-AsyncOperation"]


def kill_mid_restore(srv, status_url) -> bool:
    """Polls the job and kills the server while it writes; False if the job ended first."""
    while True:
        job = srv.request("GET", status_url).json()
        progress = job.get("progress", {})
        if job["status"] != "InProgress":
            return False
        if progress.get("phase") == "restore" and 0 < progress.get("done", 0) < progress.get("total", 0):
            srv.kill9()
            return True
        time.sleep(0.005)


@pytest.mark.parametrize("into_existing", [False, True])
def test_a_restore_killed_half_way_is_rolled_back_at_start(private_kagi, tmp_path, into_existing):
    srv = private_kagi
    backup, pass_file = backup_of_many_secrets(srv, tmp_path)
    raw = backup.read_bytes()

    for attempt in range(3):
        if into_existing:
            target = srv.create_vault(purge_protection=True).name
            location = None
        else:
            target = random_name("crash", 16)
            location = LOCATION
        status_url = start_restore(srv, target, raw, location)
        if kill_mid_restore(srv, status_url):
            break
    else:
        pytest.fail("the restore always ended before it could be killed")

    srv.start()
    # All or nothing: the new vault is gone, or the existing one is as empty as before.
    if into_existing:
        assert srv.get_vault(target).status_code == 200
        r = srv.request("GET", srv.vault_url(target) + "secrets?api-version=7.4")
        assert r.status_code == 200 and r.json()["value"] == [], r.text[:500]
        r = srv.request("GET", srv.vault_url(target) + "deletedsecrets?api-version=7.4")
        assert r.status_code == 200 and r.json()["value"] == [], r.text[:500]
    else:
        assert srv.get_vault(target).status_code == 404
        assert srv.get_deleted_vault(target).status_code == 404
    # The interrupted job says so.
    job = srv.request("GET", status_url).json()
    assert job["status"] == "Failed", job
    # And the same restore goes through now.
    out = ok(kagi_cli(srv, "keyvault", "restore", "--name", target, "--resource-group", DEFAULT_RG,
                      *(["--location", location] if location else []),
                      "--file", str(backup), "--passphrase-file", str(pass_file)))
    assert out["secrets"] == SECRETS
    names = {p.name for p in srv.secret_client(srv.vault_url(target)).list_properties_of_secrets()}
    assert len(names) == SECRETS


def test_a_vault_being_restored_into_serves_no_one_else(private_kagi, tmp_path):
    """While a restore writes into a vault, other callers are refused (409
    VaultRestoreInProgress) instead of reading half a vault or writing what a roll-back would
    take away; once the job has ended the vault serves everyone again."""
    srv = private_kagi
    backup, pass_file = backup_of_many_secrets(srv, tmp_path)
    raw = backup.read_bytes()

    for attempt in range(3):
        target = srv.create_vault(purge_protection=True)
        status_url = start_restore(srv, target.name, raw, None)
        refused = None
        while True:
            job = srv.request("GET", status_url).json()
            if job["status"] != "InProgress":
                break
            if job.get("progress", {}).get("phase") == "restore":
                r = target.raw("PUT", "/secrets/intruder", json={"value": "x"})
                refused = r
                break
            time.sleep(0.005)
        if refused is not None:
            break
    else:
        pytest.fail("the restore always ended before a request could be made during it")
    assert refused.status_code == 409, refused.text
    assert refused.json()["error"]["innererror"]["code"] == "VaultRestoreInProgress"
    while srv.request("GET", status_url).json()["status"] == "InProgress":
        time.sleep(0.05)
    assert srv.request("GET", status_url).json()["status"] == "Completed"
    r = target.raw("PUT", "/secrets/after", json={"value": "x"})
    assert r.status_code == 200, r.text
    r = target.raw("GET", "/secrets/intruder")
    assert r.status_code == 404, r.text
