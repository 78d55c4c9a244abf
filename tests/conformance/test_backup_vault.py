"""Backup vaults (`Microsoft.RecoveryServices/vaults`) end to end, through the `kagi backup` CLI.

Folders of the kagi host are protected as items, backed up into encrypted, deduplicating
repositories and restored; the key vault side (CMK) is set up with the unmodified Azure SDK.
"""

import hashlib
import json
import os
import shutil
import stat
import subprocess
import time
from pathlib import Path

import pytest

from conftest import DEFAULT_RG, KAGI_BIN, LOCATION, _start_server, random_name

pytestmark = pytest.mark.cli

CRASH_MB = int(os.environ.get("KAGI_TEST_BACKUP_CRASH_MB", "200"))


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def cli_cmd(srv, *args):
    return [str(KAGI_BIN), *args, "--server", srv.base, "--data-dir", str(srv.data_dir), "--output", "json"]


def kagi_cli(srv, *args, timeout=300):
    """Runs `kagi <args> --server URL --data-dir DIR --output json` and returns the process."""
    return subprocess.run(cli_cmd(srv, *args), capture_output=True, text=True, timeout=timeout)


def ok(p):
    assert p.returncode == 0, f"exit {p.returncode}\n--- stdout\n{p.stdout[-3000:]}\n--- stderr\n{p.stderr[-3000:]}"
    return json.loads(p.stdout) if p.stdout.strip() else None


def vref(name):
    return ["--vault", name, "--resource-group", DEFAULT_RG]


def create_backup_vault(srv, system_assigned=False):
    name = random_name("bv", 14)
    args = ["backup", "vault", "create", *vref(name), "--location", LOCATION]
    if system_assigned:
        args.append("--system-assigned")
    out = ok(kagi_cli(srv, *args))
    return name, out


def protect(srv, vault, item, source):
    return ok(kagi_cli(srv, "backup", "item", "protect", *vref(vault), "--name", item, "--source", str(source)))


def backup_now(srv, vault, item):
    job = ok(kagi_cli(srv, "backup", "now", *vref(vault), "--item", item))
    assert job["status"] == "Completed", job
    assert job["stats"]["recoveryPointId"], job
    return job


def restore(srv, vault, item, rp, target: Path):
    target.mkdir(parents=True, exist_ok=True)
    job = ok(kagi_cli(srv, "backup", "restore", *vref(vault), "--item", item, "--recovery-point", rp,
                      "--target", str(target)))
    assert job["status"] == "Completed", job
    return job


def recovery_points(srv, vault, item):
    return ok(kagi_cli(srv, "backup", "recovery-points", *vref(vault), "--item", item))["value"]


def jobs(srv, vault):
    return ok(kagi_cli(srv, "backup", "job", "list", *vref(vault)))["value"]


def manifest(root: Path) -> dict:
    """Relative path -> ('dir', mode) | ('file', mode, sha256, size) | ('link', target)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            rel = str(p.relative_to(root))
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode))
            else:
                h = hashlib.sha256()
                with open(p, "rb") as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        h.update(block)
                out[rel] = ("file", stat.S_IMODE(st.st_mode), h.hexdigest(), st.st_size)
    return out


def assert_same_tree(expected: dict, restored: Path):
    got = manifest(restored)
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    differ = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])
    assert not (missing or extra or differ), (
        f"restored tree differs: missing {missing}, extra {extra}, "
        f"different {[(k, expected[k], got[k]) for k in differ]}"
    )


def make_tree(root: Path) -> None:
    root.mkdir(parents=True)
    (root / "empty.txt").write_bytes(b"")
    (root / "small.txt").write_text("hello kagi\n")
    (root / "name with space.txt").write_text("spaces are fine\n")
    (root / "private.cfg").write_text("mode 0640\n")
    os.chmod(root / "private.cfg", 0o640)
    (root / "script.sh").write_text("#!/bin/sh\necho hi\n")
    os.chmod(root / "script.sh", 0o755)
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "sub" / "deeper" / "mid.bin").write_bytes(os.urandom(200_000))
    (root / "sub" / "big.bin").write_bytes(os.urandom(3 * 1024 * 1024 + 12345))
    (root / "empty-dir").mkdir()
    os.symlink("sub/deeper/mid.bin", root / "link-to-mid")
    os.symlink("/nonexistent/target", root / "dangling-link")


# --------------------------------------------------------------------------------------------
# 1. PMK round trip
# --------------------------------------------------------------------------------------------


def test_backup_vault_pmk_round_trip(kagi, tmp_path):
    src = tmp_path / "src"
    make_tree(src)
    before = manifest(src)

    vault, v = create_backup_vault(kagi)
    assert "keyUri" not in json.dumps(v.get("properties", {}).get("encryption") or {}), v
    protect(kagi, vault, "docs", src)

    first = backup_now(kagi, vault, "docs")
    s1 = first["stats"]
    assert s1["files"] >= 7, s1
    assert s1["bytesRead"] >= 3 * 1024 * 1024, s1

    # Change one small file; the second recovery point stores little.
    (src / "small.txt").write_text("hello kagi, changed\n")
    after = manifest(src)
    second = backup_now(kagi, vault, "docs")
    s2 = second["stats"]
    assert s2["recoveryPointId"] != s1["recoveryPointId"]
    assert s2["bytesNew"] < 64 * 1024, s2
    assert s2["bytesAdded"] < 256 * 1024, s2
    assert s2["bytesAdded"] < s1["bytesAdded"] / 10, (s1, s2)

    rps = recovery_points(kagi, vault, "docs")
    ids = [p["name"] for p in rps]
    assert set(ids) == {s1["recoveryPointId"], s2["recoveryPointId"]}, rps

    restore(kagi, vault, "docs", s1["recoveryPointId"], tmp_path / "r1")
    assert_same_tree(before, tmp_path / "r1")
    restore(kagi, vault, "docs", s2["recoveryPointId"], tmp_path / "r2")
    assert_same_tree(after, tmp_path / "r2")

    # A folder that is not empty is refused without --overwrite, and left alone.
    p = kagi_cli(kagi, "backup", "restore", *vref(vault), "--item", "docs", "--recovery-point",
                 s1["recoveryPointId"], "--target", str(tmp_path / "r2"))
    assert p.returncode != 0, p.stdout
    assert_same_tree(after, tmp_path / "r2")

    # Nothing is stored in the clear (in files, or in the bucket with --blobs s3://…).
    vault_folder = f"/{vault.lower()}/items/docs/"
    repo = {k: v for k, v in kagi.blob_objects().items() if vault_folder in f"/{k}"}
    assert any("/data/" in k for k in repo), sorted(repo)
    for k, data in repo.items():
        assert b"spaces are fine" not in data and b"hello kagi" not in data, k
        assert b"name with space" not in data, k


# --------------------------------------------------------------------------------------------
# 2. / 3. customer-managed key
# --------------------------------------------------------------------------------------------


@pytest.fixture
def cmk_kagi(tmp_path):
    """A private server whose backup service asks the key vault again after one second."""
    srv = _start_server(tmp_path, "cmk", env={"KAGI_BACKUP_KEY_CACHE_SECONDS": "1"})
    try:
        srv.put_rg(DEFAULT_RG)
        yield srv
    finally:
        srv.stop()


def cmk_key_vault(srv, grant_to=None):
    """A key vault with soft delete + purge protection and an RSA key; returns (vault, key_client, key, key_uri)."""
    vault = srv.create_vault(purge_protection=True)
    keys = srv.key_client(vault.url)
    key = keys.create_rsa_key(random_name("cmk", 10), size=2048)
    key_uri = f"{vault.url.rstrip('/')}/keys/{key.name}"
    if grant_to:
        grant(srv, vault, grant_to)
    return vault, keys, key, key_uri


def grant(srv, vault, object_id):
    from conftest import update_vault_properties

    policies = [
        {
            "tenantId": srv.tenant_id,
            "objectId": object_id,
            "permissions": {"keys": ["get", "list", "wrapKey", "unwrapKey"]},
        }
    ]
    r = update_vault_properties(srv, vault, accessPolicies=policies, enablePurgeProtection=True,
                                enableSoftDelete=True)
    assert r.status_code in (200, 201), r.text
    got = {p["objectId"] for p in r.json()["properties"]["accessPolicies"]}
    assert object_id in got, r.text


def test_backup_vault_cmk_through_cli(cmk_kagi, tmp_path):
    srv = cmk_kagi
    bv, body = create_backup_vault(srv, system_assigned=True)
    principal = body["identity"]["principalId"]
    assert principal, body
    kv, keys, key, key_uri = cmk_key_vault(srv, grant_to=principal)

    out = ok(kagi_cli(srv, "backup", "vault", "encryption", *vref(bv), "--key-uri", key_uri))
    assert out["properties"]["encryption"]["keyVaultProperties"]["keyUri"] == key_uri, out

    src = tmp_path / "src"
    make_tree(src)
    before = manifest(src)
    protect(srv, bv, "data", src)
    first = backup_now(srv, bv, "data")
    restore(srv, bv, "data", first["stats"]["recoveryPointId"], tmp_path / "r1")
    assert_same_tree(before, tmp_path / "r1")

    # Disable the key: after the key-cache lifetime a backup fails and names the key.
    keys.update_key_properties(key.name, enabled=False)
    time.sleep(2.5)
    (src / "small.txt").write_text("after disable\n")
    p = kagi_cli(srv, "backup", "now", *vref(bv), "--item", "data")
    assert p.returncode != 0, f"backup with a disabled key succeeded:\n{p.stdout[-2000:]}"
    assert key.name in p.stderr and "KeyDisabled" in p.stderr, p.stderr
    failed = [j for j in jobs(srv, bv) if j["operation"] == "Backup" and j["status"] == "Failed"]
    assert failed, jobs(srv, bv)
    assert key.name in json.dumps(failed[0].get("error")), failed[0]

    # Re-enable: the next backup succeeds and restores.
    keys.update_key_properties(key.name, enabled=True)
    time.sleep(1.5)
    after = manifest(src)
    second = backup_now(srv, bv, "data")
    restore(srv, bv, "data", second["stats"]["recoveryPointId"], tmp_path / "r2")
    assert_same_tree(after, tmp_path / "r2")


def test_backup_vault_cmk_refused_after_protection(kagi, tmp_path):
    """BK-2: once an item was protected, CMK can no longer be enabled."""
    bv, body = create_backup_vault(kagi, system_assigned=True)
    kv, keys, key, key_uri = cmk_key_vault(kagi, grant_to=body["identity"]["principalId"])
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("a")
    protect(kagi, bv, "first", src)

    p = kagi_cli(kagi, "backup", "vault", "encryption", *vref(bv), "--key-uri", key_uri)
    assert p.returncode != 0, p.stdout
    assert "CmkNotAllowedAfterProtection" in p.stderr + p.stdout, p.stderr
    shown = ok(kagi_cli(kagi, "backup", "vault", "show", *vref(bv)))
    assert not (shown.get("properties", {}).get("encryption") or {}).get("keyVaultProperties"), shown


# --------------------------------------------------------------------------------------------
# 4. crash safety
# --------------------------------------------------------------------------------------------


@pytest.mark.sqlite_store
@pytest.mark.local_blobs
def test_backup_vault_crash_safety(private_kagi, tmp_path):
    srv = private_kagi
    src = tmp_path / "src"
    make_tree(src)
    small = manifest(src)
    bv, _ = create_backup_vault(srv)
    protect(srv, bv, "bulk", src)
    first = backup_now(srv, bv, "bulk")
    rp1 = first["stats"]["recoveryPointId"]

    # ~200 MB of random data, then a backup killed mid-way.
    big = src / "bulk"
    big.mkdir()
    chunk = 8 * 1024 * 1024
    for i in range(max(1, CRASH_MB // 8)):
        (big / f"blob{i:03}.bin").write_bytes(os.urandom(chunk))
    full = manifest(src)

    def persisted_job(name):
        """The job as the server last persisted it: its file, or its row in the store."""
        files = list((srv.data_dir / "backup").rglob(f"jobs/{name}.json"))
        if files:
            try:
                return json.loads(files[0].read_text())
            except (OSError, ValueError):
                return None
        import sqlite3

        db = sqlite3.connect(str(srv.data_dir / "kagi.db"), timeout=5)
        try:
            row = db.execute("SELECT body FROM service_documents WHERE kind = 'job' AND name = ?",
                             (name,)).fetchone()
        except sqlite3.Error:
            row = None
        finally:
            db.close()
        return json.loads(row[0]) if row else None

    bg = subprocess.Popen(cli_cmd(srv, "backup", "now", *vref(bv), "--item", "bulk"),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        running = None
        persisted = None
        while time.monotonic() < deadline:
            running = [j for j in jobs(srv, bv) if j["operation"] == "Backup" and j["status"] == "InProgress"]
            if running and (running[0].get("progress") or {}).get("done", 0) > 0:
                # Progress is persisted while the job runs: wait until the stored job shows some.
                persisted = persisted_job(running[0]["name"])
                if persisted and persisted["status"] == "InProgress" and persisted["progress"]["done"] > 0:
                    break
            assert bg.poll() is None, f"backup ended before the kill: {bg.communicate()}"
            time.sleep(0.02)
        assert running, "the backup job never showed InProgress"
        assert persisted and persisted["progress"]["done"] > 0, f"no progress persisted: {persisted}"
        srv.kill9()
        bg_out, bg_err = bg.communicate(timeout=30)
    finally:
        if bg.poll() is None:
            bg.kill()
            bg.wait()
    assert bg.returncode != 0, f"the CLI reported success for a killed backup: {bg_out[-1000:]}"
    srv.start()

    # No half-finished recovery point.
    rps = recovery_points(srv, bv, "bulk")
    assert [p["name"] for p in rps] == [rp1], rps
    killed = [j for j in jobs(srv, bv) if j["name"] == running[0]["name"]]
    assert len(killed) == 1 and killed[0]["status"] == "Failed", killed
    assert killed[0]["error"]["code"] == "JobInterrupted", killed
    # It ended at its last persisted update, and keeps the last persisted progress (a later
    # write may have landed between our read and the kill).
    k = killed[0]
    assert k["endTime"] and k["endTime"] >= k["startTime"], k
    assert k["endTime"] == k["lastUpdateTime"], k
    assert k["endTime"] >= persisted["lastUpdateTime"], (k, persisted)
    assert k["progress"]["total"] == persisted["progress"]["total"], (k, persisted)
    assert persisted["progress"]["done"] <= k["progress"]["done"] <= k["progress"]["total"], (k, persisted)
    assert [j for j in jobs(srv, bv) if j["name"] == k["name"]] == [k], "answered the same again"

    # The next backup completes; every recovery point restores.
    second = backup_now(srv, bv, "bulk")
    rp2 = second["stats"]["recoveryPointId"]
    assert {p["name"] for p in recovery_points(srv, bv, "bulk")} == {rp1, rp2}
    restore(srv, bv, "bulk", rp1, tmp_path / "r1")
    assert_same_tree(small, tmp_path / "r1")
    restore(srv, bv, "bulk", rp2, tmp_path / "r2")
    assert_same_tree(full, tmp_path / "r2")
    shutil.rmtree(tmp_path / "r2")
    ok(kagi_cli(srv, "backup", "check", *vref(bv), "--item", "bulk", "--read-data"))

    # Corrupt one byte in the middle of every pack file: the killed backup may have left packs
    # that no index references (harmless until pruned, and not read by check), so flipping a
    # byte in only one could miss the recovery points. check --read-data must fail and name
    # the damaged packs it read.
    item_dirs = [p for p in (srv.data_dir / "backup").rglob("items/bulk") if p.is_dir()]
    assert len(item_dirs) == 1, item_dirs
    packs = [p for p in (item_dirs[0] / "data").rglob("*") if p.is_file()]
    assert packs, list(item_dirs[0].rglob("*"))
    for victim in packs:
        with open(victim, "r+b") as f:
            f.seek(victim.stat().st_size // 2)
            b = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([b[0] ^ 0x01]))
    p = kagi_cli(srv, "backup", "check", *vref(bv), "--item", "bulk", "--read-data")
    assert p.returncode != 0, f"check --read-data passed corrupted packs:\n{p.stdout[-2000:]}"
    assert "problem:" in p.stderr, p.stderr
    assert "RepositoryDamaged" in p.stderr, p.stderr
    assert any(v.name[:16] in p.stderr for v in packs), p.stderr[-3000:]
