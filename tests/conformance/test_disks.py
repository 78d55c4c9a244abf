"""Managed disks (`Microsoft.Compute`) end to end: disk encryption sets and disks created over
ARM, opened with beginGetAccess and read and written by real NBD clients (qemu-img, qemu-io,
nbdinfo, nbdcopy), under the platform key or a customer's key in a kagi key vault, with key
rotation and revocation.
"""

import hashlib
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from conftest import DEFAULT_RG, advance_clock, wait_for, LOCATION, _start_server, random_name, update_vault_properties

COMPUTE_API = "2025-01-02"
MIB = 1 << 20


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def compute_path(srv, kind, name, rg=DEFAULT_RG):
    return f"/subscriptions/{srv.subscription_id}/resourceGroups/{rg}/providers/Microsoft.Compute/{kind}/{name}"


def arm(srv, method, path, body=None):
    return srv.request(method, srv.arm(path, COMPUTE_API), json=body)


def ok(r, *codes):
    # A change of a disk encryption set is a long-running operation: 202 with the resource.
    assert r.status_code in (codes or (200, 201, 202)), f"{r.status_code} {r.text[:1000]}"
    return r.json() if r.text else None


def create_disk(srv, name=None, size_gb=1, encryption=None):
    name = name or random_name("disk", 12)
    props = {"creationData": {"createOption": "Empty"}, "diskSizeGB": size_gb}
    if encryption:
        props["encryption"] = encryption
    disk = ok(arm(srv, "PUT", compute_path(srv, "disks", name), {"location": LOCATION, "properties": props}))
    return name, disk


def grant_access(srv, name, access="Write", seconds=3600):
    r = arm(srv, "POST", compute_path(srv, "disks", name) + "/beginGetAccess",
            {"access": access, "durationInSeconds": seconds})
    return ok(r)["accessSAS"]


def end_access(srv, name):
    ok(arm(srv, "POST", compute_path(srv, "disks", name) + "/endGetAccess"), 200, 204)


def run(*args, timeout=300, check=True):
    p = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout)
    if check:
        assert p.returncode == 0, f"{args[0]} exit {p.returncode}\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}"
    return p


def random_image(path: Path, mib: int, seed: int) -> bytes:
    """A raw image of `mib` MiB: a recognizable pattern in the first half, random data after."""
    import random

    rnd = random.Random(seed)
    half = (mib * MIB) // 2
    data = (b"KAGI-PLAINTEXT-MARKER-%d " % seed) * (half // 26 + 1)
    data = data[:half] + rnd.randbytes(mib * MIB - half)
    path.write_bytes(data)
    return data


def read_back(uri, path: Path, size: int) -> bytes:
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", uri, path)
    with open(path, "rb") as f:
        return f.read(size)


def assert_no_plaintext(data_dir: Path, marker: bytes):
    for root, _, files in os.walk(data_dir):
        for f in files:
            p = Path(root) / f
            if p.is_socket():
                continue
            try:
                blob = p.read_bytes()
            except OSError:
                continue
            assert marker not in blob, f"plaintext found in {p}"


def key_vault_with_key(srv):
    vault = srv.create_vault(purge_protection=True)
    keys = srv.key_client(vault.url)
    key = keys.create_rsa_key(random_name("dk", 10), size=2048)
    return vault, keys, key


def grant(srv, vault, object_id):
    policies = [{"tenantId": srv.tenant_id, "objectId": object_id,
                 "permissions": {"keys": ["get", "list", "wrapKey", "unwrapKey"]}}]
    r = update_vault_properties(srv, vault, accessPolicies=policies, enablePurgeProtection=True,
                                enableSoftDelete=True)
    assert r.status_code in (200, 201), r.text


def create_set(srv, key_id, rotate=False, name=None):
    name = name or random_name("des", 12)
    body = {
        "location": LOCATION,
        "identity": {"type": "SystemAssigned"},
        "properties": {
            "activeKey": {"keyUrl": key_id},
            "encryptionType": "EncryptionAtRestWithCustomerKey",
            "rotationToLatestKeyVersionEnabled": rotate,
        },
    }
    des = ok(arm(srv, "PUT", compute_path(srv, "diskEncryptionSets", name), body))
    return name, des


NBD_CLIENT = r"""
import sys, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
print("ready", flush=True)
for line in sys.stdin:
    words = line.split()
    if words == ["close"]:
        h.shutdown()
        break
    try:
        if words[0] == "write":  # write OFFSET BYTE: 1 MiB of BYTE, with FUA
            h.pwrite(bytes([int(words[2], 16)]) * (1 << 20), int(words[1]), nbd.CMD_FLAG_FUA)
            print("ok", flush=True)
        else:
            print("ok " + h.pread(4, int(words[0])).hex(), flush=True)
    except nbd.Error as e:
        print(f"err {e.errno} {e.string}", flush=True)
"""


class NbdClient:
    """One libnbd connection kept open across requests (Debian's python3-libnbd)."""

    def __init__(self, uri):
        self.p = subprocess.Popen(["/usr/bin/python3", "-c", NBD_CLIENT, uri], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.p.stdout.readline().strip()
        assert line == "ready", line + self.p.stderr.read()

    def read(self, offset):
        return self.send(f"{offset}")

    def write_fua(self, offset, byte):
        return self.send(f"write {offset} {byte:02x}")

    def send(self, line):
        self.p.stdin.write(line + "\n")
        self.p.stdin.flush()
        return self.p.stdout.readline().strip()

    def close(self):
        self.p.stdin.write("close\n")
        self.p.stdin.flush()
        self.p.wait(timeout=30)


@pytest.fixture
def disk_kagi(tmp_path):
    """A private server whose disk service checks keys every second, on a test clock."""
    env = {
        "KAGI_DISK_KEY_POLL_SECONDS": "1",
        "KAGI_DISK_KEEPER_TICK_SECONDS": "1",
        "KAGI_DISK_REVOCATION_GRACE_SECONDS": "3600",
    }
    srv = _start_server(tmp_path, "disks", env=env, extra_args=["--test-clock"])
    try:
        srv.put_rg(DEFAULT_RG)
        yield srv
    finally:
        srv.stop()


# --------------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------------


def test_platform_key_disk_round_trip_with_qemu_img_and_nbdinfo(kagi, tmp_path):
    srv = kagi
    srv.put_rg(DEFAULT_RG)
    name, disk = create_disk(srv)
    props = disk["properties"]
    assert props["encryption"]["type"] == "EncryptionAtRestWithPlatformKey"
    assert props["diskSizeBytes"] == 1 << 30
    assert props["diskState"] == "Unattached"
    assert props["uniqueId"]

    image = tmp_path / "in.raw"
    data = random_image(image, 8, seed=1)
    uri = grant_access(srv, name, "Write")
    assert uri.startswith("nbd+unix:///sas-"), uri
    got = ok(arm(srv, "GET", compute_path(srv, "disks", name)))
    assert got["properties"]["diskState"] == "ActiveSAS"
    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", image, uri)

    # nbdinfo: the size, and the map of a sparse disk (written data, then a hole).
    info = json.loads(run("nbdinfo", "--json", uri).stdout)
    assert info["exports"][0]["export-size"] == 1 << 30
    extents = json.loads(run("nbdinfo", "--map", "--json", uri).stdout)
    holes = [e for e in extents if e["type"] & 1]
    assert holes and holes[-1]["offset"] + holes[-1]["length"] == 1 << 30, extents
    assert sum(e["length"] for e in extents if not e["type"] & 1) >= len(data) // 2
    end_access(srv, name)
    assert ok(arm(srv, "GET", compute_path(srv, "disks", name)))["properties"]["diskState"] == "Unattached"
    # The old URI no longer opens anything.
    assert run("nbdinfo", uri, check=False).returncode != 0

    # Read back through a new read-only access, byte for byte; writes refused.
    ro = grant_access(srv, name, "Read")
    assert read_back(ro, tmp_path / "out.raw", len(data)) == data
    p = run("qemu-io", "-f", "raw", "-c", "write -P 0x11 0 4k", ro, check=False)
    assert p.returncode != 0 or "failed" in (p.stdout + p.stderr).lower(), p.stdout + p.stderr
    end_access(srv, name)
    assert_no_plaintext(srv.data_dir, b"KAGI-PLAINTEXT-MARKER-1")

    # A disk with an open access cannot be deleted; without one it can.
    uri = grant_access(srv, name, "Read")
    r = arm(srv, "DELETE", compute_path(srv, "disks", name))
    assert r.status_code == 409, r.text
    end_access(srv, name)
    ok(arm(srv, "DELETE", compute_path(srv, "disks", name)), 200, 202, 204)
    assert arm(srv, "GET", compute_path(srv, "disks", name)).status_code == 404


def test_bad_disk_requests_get_azure_errors(kagi):
    srv = kagi
    srv.put_rg(DEFAULT_RG)
    for props, needle in [
        ({"creationData": {"createOption": "Empty"}}, "diskSizeGB"),
        ({"creationData": {"createOption": "Empty"}, "diskSizeGB": 0}, "diskSizeGB"),
        ({"creationData": {"createOption": "Empty"}, "diskSizeGB": 1,
          "encryption": {"type": "EncryptionAtRestWithCustomerKey"}}, "diskEncryptionSetId"),
        ({"creationData": {"createOption": "Empty"}, "diskSizeGB": 1,
          "encryption": {"type": "Rot13"}}, "Rot13"),
    ]:
        r = arm(srv, "PUT", compute_path(srv, "disks", random_name("bad", 10)),
                {"location": LOCATION, "properties": props})
        assert r.status_code == 400, r.text
        assert needle in r.json()["error"]["message"], r.text
    name, _ = create_disk(srv)
    r = arm(srv, "PATCH", compute_path(srv, "disks", name), {"properties": {"diskSizeGB": 0}})
    assert r.status_code == 400
    r = arm(srv, "POST", compute_path(srv, "disks", name) + "/beginGetAccess",
            {"access": "Everything", "durationInSeconds": 60})
    assert r.status_code == 400, r.text
    # A versionless key URL is refused for a set.
    r = arm(srv, "PUT", compute_path(srv, "diskEncryptionSets", random_name("des", 10)),
            {"location": LOCATION, "identity": {"type": "SystemAssigned"},
             "properties": {"activeKey": {"keyUrl": srv.vault_url("nokv") + "keys/k"}}})
    assert r.status_code == 400, r.text


def test_customer_key_disk_rotation_and_revocation(disk_kagi, tmp_path):
    srv = disk_kagi
    vault, keys, key = key_vault_with_key(srv)
    set_name, des = create_set(srv, key.id, rotate=True)
    principal = des["identity"]["principalId"]
    assert des["properties"]["activeKey"]["keyUrl"] == key.id

    # The set's identity has no access yet: a disk under it is refused, naming the rule.
    enc = {"type": "EncryptionAtRestWithCustomerKey", "diskEncryptionSetId": des["id"]}
    r = arm(srv, "PUT", compute_path(srv, "disks", random_name("disk", 10)),
            {"location": LOCATION, "properties": {"creationData": {"createOption": "Empty"},
                                                  "diskSizeGB": 1, "encryption": enc}})
    assert r.status_code in (400, 403), r.text
    grant(srv, vault, principal)
    name, disk = create_disk(srv, encryption=enc)
    assert disk["properties"]["encryption"]["diskEncryptionSetId"] == des["id"]
    assoc = ok(arm(srv, "GET", compute_path(srv, "diskEncryptionSets", set_name) + "/associatedResources"))
    assert [d.lower() for d in assoc["value"]] == [disk["id"].lower()]

    image = tmp_path / "in.raw"
    data = random_image(image, 4, seed=2)
    # Long enough to outlast the grace period the test clock skips.
    uri = grant_access(srv, name, "Write", seconds=4 * 86400)
    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", image, uri)

    # Rotation: a new key version; the set follows it while qemu-io writes in a loop.
    import threading

    stop = threading.Event()
    failures = []
    rounds = []

    def writer():
        while not stop.is_set():
            n = len(rounds) % 200 + 1
            p = run("qemu-io", "-f", "raw", "-c", f"write -P {n} 8M 64k", "-c", f"read -P {n} 8M 64k",
                    uri, check=False)
            if p.returncode != 0 or "failed" in p.stdout:
                failures.append(p.stdout + p.stderr)
            rounds.append(n)

    t = threading.Thread(target=writer)
    t.start()
    try:
        wait_for("writes", lambda: len(rounds) >= 2)
        new_key = keys.rotate_key(key.name)
        assert new_key.id != key.id
        got = wait_for("rotation", lambda: (
            lambda d: d if d["properties"]["activeKey"]["keyUrl"] == new_key.id else None
        )(ok(arm(srv, "GET", compute_path(srv, "diskEncryptionSets", set_name)))))
        before = len(rounds)
        wait_for("writes after the rotation", lambda: len(rounds) >= before + 2)
    finally:
        stop.set()
        t.join(timeout=60)
    assert failures == [], failures[:2]
    assert got["properties"]["lastKeyRotationTimestamp"]
    assert got["properties"]["previousKeys"] == []
    run("qemu-io", "-f", "raw", "-c", "write -P 0x5a 4M 1M", "-c", "read -P 0x5a 4M 1M", uri)
    assert read_back(uri, tmp_path / "rot.raw", len(data)) == data

    # Revocation: a client stays connected throughout (libnbd, from Debian's python3).
    client = NbdClient(uri)
    assert client.read(4 * MIB) == "ok 5a5a5a5a"
    # The key disabled: I/O goes on through the grace period...
    keys.update_key_properties(key.name, enabled=False)
    for v in keys.list_properties_of_key_versions(key.name):
        keys.update_key_properties(key.name, v.version, enabled=False)
    wait_for("grace period", lambda: ok(arm(srv, "GET", compute_path(srv, "disks", name)))
             ["properties"].get("keyState", {}).get("state") == "GracePeriod")
    run("qemu-io", "-f", "raw", "-c", "read -P 0x5a 4M 1M", uri)
    assert client.read(4 * MIB) == "ok 5a5a5a5a"
    # ...and fails after it: EIO with the reason on the open connection, new connections and
    # new access refused, naming the key.
    advance_clock(srv, 3601)
    wait_for("revocation", lambda: ok(arm(srv, "GET", compute_path(srv, "disks", name)))
             ["properties"].get("keyState", {}).get("state") == "Revoked")
    failed = client.read(4 * MIB)
    assert failed.startswith("err EIO "), failed
    # The refusal carries the reason (libnbd shows a server's message in its debug output).
    refused = subprocess.run(["nbdinfo", uri], capture_output=True, text=True, timeout=60,
                             env={**os.environ, "LIBNBD_DEBUG": "1"})
    assert refused.returncode != 0
    assert "disabled" in refused.stderr.lower(), refused.stderr[-2000:]
    r = arm(srv, "POST", compute_path(srv, "disks", name) + "/beginGetAccess",
            {"access": "Read", "durationInSeconds": 60})
    assert r.status_code == 403, r.text
    assert key.name in r.json()["error"]["message"], r.text
    log = ok(arm(srv, "GET", compute_path(srv, "disks", name) + "/activityLog"))["value"]
    assert any("unusable" in e["message"] for e in log), log

    # Re-enabled: the disk comes back with nothing lost.
    for v in keys.list_properties_of_key_versions(key.name):
        keys.update_key_properties(key.name, v.version, enabled=True)
    wait_for("recovery", lambda: "keyState" not in ok(arm(srv, "GET", compute_path(srv, "disks", name)))["properties"])
    # The connection that saw EIO reads again; so does the access granted before.
    assert client.read(4 * MIB) == "ok 5a5a5a5a"
    client.close()
    run("qemu-io", "-f", "raw", "-c", "read -P 0x5a 4M 1M", uri)
    end_access(srv, name)
    ro = grant_access(srv, name, "Read")
    assert read_back(ro, tmp_path / "back.raw", len(data)) == data
    run("qemu-io", "-f", "raw", "-r", "-c", "read -P 0x5a 4M 1M", ro)
    assert_no_plaintext(srv.data_dir, b"KAGI-PLAINTEXT-MARKER-2")


def test_fua_writes_survive_kill_9(tmp_path):
    srv = _start_server(tmp_path, "diskcrash")
    try:
        srv.put_rg(DEFAULT_RG)
        name, _ = create_disk(srv)
        uri = grant_access(srv, name, "Write")
        run("qemu-io", "-f", "raw", "-c", "write -f -P 0xab 0 1M", "-c", "write -P 0xcd 1M 1M", "-c", "flush", uri)
        # A write acknowledged with FUA on a connection still open (no flush at close): the
        # server is killed under it.
        client = NbdClient(uri)
        assert client.write_fua(2 * MIB, 0xef) == "ok"
        srv.kill9()
        client.p.kill()
        srv.start()
        # The access outlives the restart (as a SAS does) and the data is there.
        run("qemu-io", "-f", "raw", "-r", "-c", "read -P 0xab 0 1M", "-c", "read -P 0xcd 1M 1M",
            "-c", "read -P 0xef 2M 1M", uri)
        ro = grant_access(srv, name, "Read")
        run("qemu-io", "-f", "raw", "-r", "-c", "read -P 0xab 0 1M", "-c", "read -P 0xcd 1M 1M", ro)
        end_access(srv, name)
        srv.stop()
        srv.start()
        # An ended access stays ended.
        assert run("nbdinfo", uri, check=False).returncode != 0
    finally:
        srv.stop()


def create_snapshot(srv, source_id, incremental=True, name=None, encryption=None):
    name = name or random_name("snap", 12)
    props = {"creationData": {"createOption": "Copy", "sourceResourceId": source_id}, "incremental": incremental}
    if encryption:
        props["encryption"] = encryption
    snap = ok(arm(srv, "PUT", compute_path(srv, "snapshots", name), {"location": LOCATION, "properties": props}))
    return name, snap


def test_snapshots_and_copies_share_or_copy_data(kagi, tmp_path):
    srv = kagi
    srv.put_rg(DEFAULT_RG)
    name, disk = create_disk(srv)
    image = tmp_path / "in.raw"
    data = random_image(image, 4, seed=3)
    uri = grant_access(srv, name, "Write")
    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", image, uri)

    # An incremental and a full snapshot of the same moment; then the disk changes.
    inc_name, inc = create_snapshot(srv, disk["id"], incremental=True)
    full_name, full = create_snapshot(srv, disk["id"], incremental=False)
    assert inc["properties"]["incremental"] is True
    assert inc["properties"]["incrementalSnapshotFamilyId"]
    assert "incrementalSnapshotFamilyId" not in full["properties"]
    assert inc["properties"]["creationData"]["sourceUniqueId"] == disk["properties"]["uniqueId"]
    run("qemu-io", "-f", "raw", "-c", "write -P 0x77 0 1M", uri)
    end_access(srv, name)

    # Both snapshots still hold the old data, read-only.
    for snap in (inc_name, full_name):
        r = arm(srv, "POST", compute_path(srv, "snapshots", snap) + "/beginGetAccess",
                {"access": "Write", "durationInSeconds": 60})
        assert r.status_code == 400, r.text
        r = arm(srv, "POST", compute_path(srv, "snapshots", snap) + "/beginGetAccess",
                {"access": "Read", "durationInSeconds": 600})
        snap_uri = ok(r)["accessSAS"]
        assert read_back(snap_uri, tmp_path / f"{snap}.raw", len(data)) == data
        ok(arm(srv, "POST", compute_path(srv, "snapshots", snap) + "/endGetAccess"), 200, 204)

    # A disk copied from the incremental snapshot, bigger: the old data, then writable.
    copy_name = random_name("copy", 10)
    body = {"location": LOCATION, "properties": {"diskSizeGB": 2,
            "creationData": {"createOption": "Copy", "sourceResourceId": inc["id"]}}}
    copy = ok(arm(srv, "PUT", compute_path(srv, "disks", copy_name), body))
    assert copy["properties"]["diskSizeBytes"] == 2 << 30
    assert copy["properties"]["creationData"]["sourceResourceId"] == inc["id"]
    curi = grant_access(srv, copy_name, "Write")
    assert read_back(curi, tmp_path / "copy.raw", len(data)) == data
    run("qemu-io", "-f", "raw", "-c", "write -P 0x42 1G 1M", "-c", "read -P 0x42 1G 1M", curi)
    end_access(srv, copy_name)

    # Deleting the disk keeps its snapshots and copies readable.
    ok(arm(srv, "DELETE", compute_path(srv, "disks", name)), 200, 202, 204)
    ro = grant_access(srv, copy_name, "Read")
    assert read_back(ro, tmp_path / "copy2.raw", len(data)) == data
    end_access(srv, copy_name)
    for kind, n in (("snapshots", inc_name), ("snapshots", full_name), ("disks", copy_name)):
        ok(arm(srv, "DELETE", compute_path(srv, kind, n)), 200, 202, 204)
        assert arm(srv, "GET", compute_path(srv, kind, n)).status_code == 404
    assert_no_plaintext(srv.data_dir, b"KAGI-PLAINTEXT-MARKER-3")


def test_ext4_through_nbdfuse_snapshot_and_copy(kagi, tmp_path):
    """mkfs.ext4 on a kagi disk through nbdfuse and a loop device; files survive an
    incremental snapshot and a new disk made from it."""
    srv = kagi
    srv.put_rg(DEFAULT_RG)
    name, disk = create_disk(srv)

    def attach(uri, where):
        fuse_dir = tmp_path / f"fuse-{where}"
        fuse_dir.mkdir()
        proc = subprocess.Popen(["nbdfuse", str(fuse_dir), uri], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        wait_for("nbdfuse", lambda: (fuse_dir / "nbd").exists(), timeout=20)
        loop = run("losetup", "--find", "--show", fuse_dir / "nbd").stdout.strip()
        return proc, fuse_dir, loop

    def detach(proc, fuse_dir, loop):
        run("losetup", "-d", loop, check=False)
        run("fusermount3" if shutil.which("fusermount3") else "fusermount", "-u", fuse_dir, check=False)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()

    import shutil

    files = {f"file{i}.bin": os.urandom(100_000 + i) for i in range(5)}
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    attached = attach(grant_access(srv, name, "Write"), "a")
    try:
        run("mkfs.ext4", "-q", "-F", attached[2])
        run("mount", attached[2], mnt)
        try:
            for n, b in files.items():
                (mnt / n).write_bytes(b)
        finally:
            run("umount", mnt)
    finally:
        detach(*attached)
    end_access(srv, name)

    _, snap = create_snapshot(srv, disk["id"], incremental=True)
    copy_name = random_name("copy", 10)
    body = {"location": LOCATION, "properties": {
            "creationData": {"createOption": "Copy", "sourceResourceId": snap["id"]}}}
    ok(arm(srv, "PUT", compute_path(srv, "disks", copy_name), body))
    attached = attach(grant_access(srv, copy_name, "Write"), "b")
    try:
        run("mount", attached[2], mnt)
        try:
            got = {n: (mnt / n).read_bytes() for n in files}
        finally:
            run("umount", mnt)
    finally:
        detach(*attached)
    end_access(srv, copy_name)
    assert got == files


def test_disk_access_over_tcp_with_tls(tmp_path):
    """With --nbd-listen, access URIs are nbds:// (TLS with the kagi CA): nbdinfo and nbdcopy
    use them as given; without TLS the server answers nothing but the refusal."""
    from conftest import free_port

    port = free_port()
    srv = _start_server(tmp_path, "disktcp", extra_args=["--nbd-listen", f"localhost:{port}"])
    try:
        srv.put_rg(DEFAULT_RG)
        name, _ = create_disk(srv)
        uri = grant_access(srv, name, "Write")
        assert uri.startswith(f"nbds://localhost:{port}/sas-"), uri
        assert "tls-certificates=" in uri
        image = tmp_path / "in.raw"
        data = random_image(image, 2, seed=4)
        run("nbdcopy", image, uri)
        out = tmp_path / "out.raw"
        run("nbdcopy", uri, out)
        assert out.read_bytes()[: len(data)] == data
        info = json.loads(run("nbdinfo", "--json", uri).stdout)
        assert info["exports"][0]["export-size"] == 1 << 30
        # The same export without TLS is refused.
        plain = uri.replace("nbds://", "nbd://").split("?")[0]
        assert run("nbdinfo", plain, check=False).returncode != 0
        end_access(srv, name)
        assert run("nbdinfo", uri, check=False).returncode != 0
    finally:
        srv.stop()


def test_the_azure_sdk_manages_sets_disks_snapshots_and_access(kagi, tmp_path):
    """The unmodified azure-mgmt-compute: a disk encryption set on a kagi key, a CMK disk,
    access, an incremental snapshot, list and delete."""
    from azure.mgmt.compute import ComputeManagementClient
    from azure.mgmt.compute.models import (
        CreationData,
        Disk,
        DiskEncryptionSet,
        Encryption,
        EncryptionSetIdentity,
        GrantAccessData,
        KeyForDiskEncryptionSet,
        Snapshot,
    )

    srv = kagi
    srv.put_rg(DEFAULT_RG)
    c = ComputeManagementClient(srv.credential, srv.subscription_id, base_url=srv.base,
                                credential_scopes=[srv.scope], connection_verify=str(srv.ca_path))
    vault, keys, key = key_vault_with_key(srv)
    set_name = random_name("sdkdes", 10)
    des = c.disk_encryption_sets.begin_create_or_update(DEFAULT_RG, set_name, DiskEncryptionSet(
        location=LOCATION,
        identity=EncryptionSetIdentity(type="SystemAssigned"),
        active_key=KeyForDiskEncryptionSet(key_url=key.id),
        encryption_type="EncryptionAtRestWithCustomerKey",
    )).result()
    assert des.active_key.key_url == key.id
    assert des.identity.principal_id
    grant(srv, vault, des.identity.principal_id)
    # Azure's way, which the SDK's poller followed: a change of a set is a long-running
    # operation, 202 with the status URL in Azure-AsyncOperation.
    r = arm(srv, "PATCH", compute_path(srv, "diskEncryptionSets", set_name), {"tags": {"lro": "1"}})
    assert r.status_code == 202, r.text
    assert r.headers["Location"] == r.headers["Azure-AsyncOperation"]
    op = srv.request("GET", r.headers["Azure-AsyncOperation"])
    assert op.status_code == 200 and op.json()["status"] == "Succeeded", op.text
    assert op.json()["properties"]["output"]["tags"] == {"lro": "1"}

    name = random_name("sdkdisk", 10)
    disk = c.disks.begin_create_or_update(DEFAULT_RG, name, Disk(
        location=LOCATION,
        creation_data=CreationData(create_option="Empty"),
        disk_size_gb=1,
        encryption=Encryption(type="EncryptionAtRestWithCustomerKey", disk_encryption_set_id=des.id),
    )).result()
    assert disk.encryption.disk_encryption_set_id == des.id
    assert disk.disk_size_bytes == 1 << 30
    assert disk.unique_id

    uri = c.disks.begin_grant_access(DEFAULT_RG, name, GrantAccessData(access="Write", duration_in_seconds=600)).result().access_sas
    image = tmp_path / "in.raw"
    data = random_image(image, 2, seed=5)
    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", image, uri)
    assert c.disks.get(DEFAULT_RG, name).disk_state == "ActiveSAS"
    c.disks.begin_revoke_access(DEFAULT_RG, name).result()
    assert c.disks.get(DEFAULT_RG, name).disk_state == "Unattached"

    snap = c.snapshots.begin_create_or_update(DEFAULT_RG, random_name("sdksnap", 10), Snapshot(
        location=LOCATION,
        creation_data=CreationData(create_option="Copy", source_resource_id=disk.id),
        incremental=True,
    )).result()
    assert snap.incremental is True
    assert snap.encryption.disk_encryption_set_id == des.id
    ro = c.snapshots.begin_grant_access(DEFAULT_RG, snap.name, GrantAccessData(access="Read", duration_in_seconds=600)).result().access_sas
    assert read_back(ro, tmp_path / "snap.raw", len(data)) == data
    c.snapshots.begin_revoke_access(DEFAULT_RG, snap.name).result()

    assert [d.name for d in c.disks.list_by_resource_group(DEFAULT_RG) if d.name == name] == [name]
    assert set_name in [s.name for s in c.disk_encryption_sets.list_by_resource_group(DEFAULT_RG)]
    assocs = list(c.disk_encryption_sets.list_associated_resources(DEFAULT_RG, set_name))
    assert {a.lower() for a in assocs} == {disk.id.lower(), snap.id.lower()}
    c.snapshots.begin_delete(DEFAULT_RG, snap.name).result()
    c.disks.begin_delete(DEFAULT_RG, name).result()
    c.disk_encryption_sets.begin_delete(DEFAULT_RG, set_name).result()
    assert [d for d in c.disks.list_by_resource_group(DEFAULT_RG) if d.name == name] == []


def test_moves_follow_dk7(disk_kagi, tmp_path):
    """A disk moves to another resource group with its data; not while an access is open;
    a CMK disk never to another subscription; a set only while nothing uses it."""
    from test_backup_moves import new_subscription, post_move, put_rg

    srv = disk_kagi
    sub = srv.subscription_id
    put_rg(srv, sub, "rg-moved")
    name, disk = create_disk(srv)
    image = tmp_path / "in.raw"
    data = random_image(image, 2, seed=6)
    uri = grant_access(srv, name, "Write")
    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", image, uri)
    r = post_move(srv, sub, DEFAULT_RG, [disk["id"]], sub, "rg-moved")
    assert r.status_code in (400, 409), r.text
    assert "active access" in r.text
    end_access(srv, name)
    r = post_move(srv, sub, DEFAULT_RG, [disk["id"]], sub, "rg-moved")
    assert r.status_code in (200, 202, 204), r.text
    wait_for("move", lambda: arm(srv, "GET", compute_path(srv, "disks", name, rg="rg-moved")).status_code == 200)
    assert arm(srv, "GET", compute_path(srv, "disks", name)).status_code == 404
    ro = ok(arm(srv, "POST", compute_path(srv, "disks", name, rg="rg-moved") + "/beginGetAccess",
                {"access": "Read", "durationInSeconds": 600}))["accessSAS"]
    assert read_back(ro, tmp_path / "moved.raw", len(data)) == data
    ok(arm(srv, "POST", compute_path(srv, "disks", name, rg="rg-moved") + "/endGetAccess"), 200, 204)

    # A CMK disk stays in its subscription; its set moves only when unused.
    vault, keys, key = key_vault_with_key(srv)
    set_name, des = create_set(srv, key.id)
    grant(srv, vault, des["identity"]["principalId"])
    cmk_name, cmk = create_disk(srv, encryption={"type": "EncryptionAtRestWithCustomerKey",
                                                 "diskEncryptionSetId": des["id"]})
    other = new_subscription(srv)
    put_rg(srv, other, "rg-other")
    r = post_move(srv, sub, DEFAULT_RG, [cmk["id"]], other, "rg-other")
    assert r.status_code == 409, r.text
    assert r.json()["error"]["code"] == "ResourceMoveProviderValidationFailed", r.text
    assert "another subscription" in r.text
    r = post_move(srv, sub, DEFAULT_RG, [des["id"]], sub, "rg-moved")
    assert r.status_code == 409, r.text
    assert "used by disks" in r.text
    r = post_move(srv, sub, DEFAULT_RG, [cmk["id"]], sub, "rg-moved")
    assert r.status_code in (200, 202, 204), r.text
    wait_for("move", lambda: arm(srv, "GET", compute_path(srv, "disks", cmk_name, rg="rg-moved")).status_code == 200)


def test_double_encryption(kagi, tmp_path):
    """DK-9: a set of type EncryptionAtRestWithPlatformAndCustomerKeys gives its disks an inner
    layer under a platform key; the type is fixed at creation."""
    srv = kagi
    srv.put_rg(DEFAULT_RG)
    vault, keys, key = key_vault_with_key(srv)
    body = {"location": LOCATION, "identity": {"type": "SystemAssigned"}, "properties": {
        "activeKey": {"keyUrl": key.id}, "encryptionType": "EncryptionAtRestWithPlatformAndCustomerKeys"}}
    set_name = random_name("dbl", 10)
    des = ok(arm(srv, "PUT", compute_path(srv, "diskEncryptionSets", set_name), body))
    grant(srv, vault, des["identity"]["principalId"])
    # A disk's type must match its set's.
    r = arm(srv, "PUT", compute_path(srv, "disks", random_name("bad", 10)), {"location": LOCATION, "properties": {
        "creationData": {"createOption": "Empty"}, "diskSizeGB": 1,
        "encryption": {"type": "EncryptionAtRestWithCustomerKey", "diskEncryptionSetId": des["id"]}}})
    assert r.status_code == 400, r.text
    # A disk that names the set without a type takes the set's type (the kagi CLI sends that).
    _, by_set = create_disk(srv, encryption={"diskEncryptionSetId": des["id"]})
    assert by_set["properties"]["encryption"]["type"] == "EncryptionAtRestWithPlatformAndCustomerKeys"
    enc = {"type": "EncryptionAtRestWithPlatformAndCustomerKeys", "diskEncryptionSetId": des["id"]}
    name, disk = create_disk(srv, encryption=enc)
    assert disk["properties"]["encryption"]["type"] == enc["type"]
    image = tmp_path / "in.raw"
    data = random_image(image, 2, seed=7)
    uri = grant_access(srv, name, "Write")
    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", image, uri)
    end_access(srv, name)
    _, snap = create_snapshot(srv, disk["id"], incremental=False)
    assert snap["properties"]["encryption"]["type"] == enc["type"]
    ro = ok(arm(srv, "POST", compute_path(srv, "snapshots", snap["name"]) + "/beginGetAccess",
                {"access": "Read", "durationInSeconds": 600}))["accessSAS"]
    assert read_back(ro, tmp_path / "snap.raw", len(data)) == data
    # The layers cannot be changed afterwards.
    r = arm(srv, "PATCH", compute_path(srv, "disks", name), {"properties": {"encryption": {
        "type": "EncryptionAtRestWithPlatformKey", "diskEncryptionSetId": None}}})
    assert r.status_code == 400, r.text
    assert "Double encryption" in r.text, r.text
    assert_no_plaintext(srv.data_dir, b"KAGI-PLAINTEXT-MARKER-7")


def test_images_and_disks_made_from_them(disk_kagi, tmp_path):
    """An image of a disk (a copy of its own, here under a set); disks FromImage share its
    blocks and read what the disk held; the image follows its set's rotation."""
    srv = disk_kagi
    vault, keys, key = key_vault_with_key(srv)
    set_name, des = create_set(srv, key.id, rotate=True)
    grant(srv, vault, des["identity"]["principalId"])
    name, disk = create_disk(srv)
    image = tmp_path / "in.raw"
    data = random_image(image, 2, seed=8)
    uri = grant_access(srv, name, "Write")
    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", image, uri)
    end_access(srv, name)
    img_name = random_name("img", 10)
    body = {"location": LOCATION, "properties": {"storageProfile": {"osDisk": {
        "osType": "Linux", "osState": "Generalized", "managedDisk": {"id": disk["id"]},
        "diskEncryptionSet": {"id": des["id"]}}}}}
    img = ok(arm(srv, "PUT", compute_path(srv, "images", img_name), body))
    assert img["properties"]["storageProfile"]["osDisk"]["diskSizeGB"] == 1
    assert img["properties"]["storageProfile"]["osDisk"]["diskEncryptionSet"]["id"] == des["id"]
    # The disk changes; the image does not.
    uri = grant_access(srv, name, "Write")
    run("qemu-io", "-f", "raw", "-c", "write -P 0x99 0 1M", uri)
    end_access(srv, name)
    from_img = random_name("fromimg", 10)
    body = {"location": LOCATION, "properties": {"creationData": {
        "createOption": "FromImage", "imageReference": {"id": img["id"]}}}}
    d2 = ok(arm(srv, "PUT", compute_path(srv, "disks", from_img), body))
    assert d2["properties"]["creationData"]["createOption"] == "FromImage"
    assert d2["properties"]["diskSizeGB"] == 1
    ro = grant_access(srv, from_img, "Read")
    assert read_back(ro, tmp_path / "fromimg.raw", len(data)) == data
    end_access(srv, from_img)
    assoc = ok(arm(srv, "GET", compute_path(srv, "diskEncryptionSets", set_name) + "/associatedResources"))
    assert img["id"].lower() in [a.lower() for a in assoc["value"]]
    # No access to an image itself; rotation reaches it.
    r = arm(srv, "POST", compute_path(srv, "images", img_name) + "/beginGetAccess",
            {"access": "Read", "durationInSeconds": 60})
    assert r.status_code == 404, r.text
    new_key = keys.rotate_key(key.name)
    wait_for("rotation", lambda: ok(arm(srv, "GET", compute_path(srv, "diskEncryptionSets", set_name)))
             ["properties"]["activeKey"]["keyUrl"] == new_key.id)
    d3 = random_name("fromimg", 10)
    ok(arm(srv, "PUT", compute_path(srv, "disks", d3), body))
    ro = grant_access(srv, d3, "Read")
    assert read_back(ro, tmp_path / "d3.raw", len(data)) == data
    end_access(srv, d3)
    # Bad references get Azure errors.
    r = arm(srv, "PUT", compute_path(srv, "images", random_name("img", 10)),
            {"location": LOCATION, "properties": {"storageProfile": {"osDisk": {}}}})
    assert r.status_code == 400, r.text
    r = arm(srv, "PUT", compute_path(srv, "disks", random_name("d", 10)), {"location": LOCATION, "properties": {
        "creationData": {"createOption": "FromImage", "imageReference": {"id": disk["id"]}}}})
    assert r.status_code == 404, r.text


def disable_all_versions(keys, key_name, enabled=False):
    for v in keys.list_properties_of_key_versions(key_name):
        keys.update_key_properties(key_name, v.version, enabled=enabled)


def test_no_way_around_a_revoked_customer_key(disk_kagi, tmp_path):
    """With the set's key disabled, a CMK disk cannot be switched to the platform key, copied
    fully, or re-keyed onto another key: nothing of it is readable without its key."""
    srv = disk_kagi
    vault, keys, key = key_vault_with_key(srv)
    set_name, des = create_set(srv, key.id)
    grant(srv, vault, des["identity"]["principalId"])
    name, disk = create_disk(srv, encryption={"type": "EncryptionAtRestWithCustomerKey",
                                              "diskEncryptionSetId": des["id"]})
    uri = grant_access(srv, name, "Write")
    run("qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 1M", uri)
    end_access(srv, name)
    disable_all_versions(keys, key.name)
    srv.stop()
    srv.start()
    r = arm(srv, "POST", compute_path(srv, "disks", name) + "/beginGetAccess", {"access": "Read", "durationInSeconds": 60})
    assert r.status_code == 403, r.text
    # To the platform key: refused (the data key cannot be opened).
    r = arm(srv, "PATCH", compute_path(srv, "disks", name), {"properties": {"encryption": {
        "type": "EncryptionAtRestWithPlatformKey", "diskEncryptionSetId": None}}})
    assert r.status_code == 403, r.text
    # A full snapshot under the platform key: refused.
    r = arm(srv, "PUT", compute_path(srv, "snapshots", random_name("s", 10)), {"location": LOCATION, "properties": {
        "creationData": {"createOption": "Copy", "sourceResourceId": disk["id"]}, "incremental": False,
        "encryption": {"type": "EncryptionAtRestWithPlatformKey"}}})
    assert r.status_code == 403, r.text
    # The set moved onto another key: refused, and the disk still refuses access.
    key2 = keys.create_rsa_key(random_name("k2", 8), size=2048)
    body = {"location": LOCATION, "identity": {"type": "SystemAssigned"},
            "properties": {"activeKey": {"keyUrl": key2.id}}}
    r = arm(srv, "PATCH", compute_path(srv, "diskEncryptionSets", set_name), body)
    assert r.status_code == 403, r.text
    # Refused means unchanged: the set still names its key.
    got = ok(arm(srv, "GET", compute_path(srv, "diskEncryptionSets", set_name)))
    assert got["properties"]["activeKey"]["keyUrl"] == key.id
    r = arm(srv, "POST", compute_path(srv, "disks", name) + "/beginGetAccess", {"access": "Read", "durationInSeconds": 60})
    assert r.status_code == 403, r.text
    # The key back: the disk reads, nothing lost.
    disable_all_versions(keys, key.name, enabled=True)
    ro = grant_access(srv, name, "Read")
    run("qemu-io", "-f", "raw", "-r", "-c", "read -P 0x5a 0 1M", ro)


def test_a_set_switch_and_a_patch_after_rotation_keep_disks_readable(disk_kagi, tmp_path):
    srv = disk_kagi
    vault, keys, key = key_vault_with_key(srv)
    set_a, des_a = create_set(srv, key.id, rotate=True)
    grant(srv, vault, des_a["identity"]["principalId"])
    name, disk = create_disk(srv, encryption={"type": "EncryptionAtRestWithCustomerKey",
                                              "diskEncryptionSetId": des_a["id"]})
    uri = grant_access(srv, name, "Write")
    run("qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 1M", uri)
    end_access(srv, name)
    # Rotation, then a PATCH of the set's tags only: the set stays on the new version...
    new_key = keys.rotate_key(key.name)
    wait_for("rotation", lambda: ok(arm(srv, "GET", compute_path(srv, "diskEncryptionSets", set_a)))
             ["properties"]["activeKey"]["keyUrl"] == new_key.id)
    got = ok(arm(srv, "PATCH", compute_path(srv, "diskEncryptionSets", set_a), {"tags": {"team": "x"}}))
    assert got["properties"]["activeKey"]["keyUrl"] == new_key.id
    listed = ok(arm(srv, "GET", f"/subscriptions/{srv.subscription_id}/resourceGroups/{DEFAULT_RG}/providers/Microsoft.Compute/diskEncryptionSets"))
    assert [s["properties"]["activeKey"]["keyUrl"] for s in listed["value"] if s["name"] == set_a] == [new_key.id]
    # ...and the disk reads with the old version disabled.
    keys.update_key_properties(key.name, key.properties.version, enabled=False)
    srv.stop()
    srv.start()
    ro = grant_access(srv, name, "Read")
    run("qemu-io", "-f", "raw", "-r", "-c", "read -P 0x5a 0 1M", ro)
    end_access(srv, name)
    # A switch to a set whose identity reaches only its own key vault.
    vault_b, keys_b, key_b = key_vault_with_key(srv)
    set_b, des_b = create_set(srv, key_b.id)
    grant(srv, vault_b, des_b["identity"]["principalId"])
    got = ok(arm(srv, "PATCH", compute_path(srv, "disks", name), {"properties": {"encryption": {
        "type": "EncryptionAtRestWithCustomerKey", "diskEncryptionSetId": des_b["id"]}}}))
    assert got["properties"]["encryption"]["diskEncryptionSetId"] == des_b["id"]
    # Set A's key no longer matters; set B's does.
    disable_all_versions(keys, key.name)
    ro = grant_access(srv, name, "Read")
    run("qemu-io", "-f", "raw", "-r", "-c", "read -P 0x5a 0 1M", ro)
    end_access(srv, name)
    disable_all_versions(keys_b, key_b.name)
    srv.stop()
    srv.start()
    r = arm(srv, "POST", compute_path(srv, "disks", name) + "/beginGetAccess", {"access": "Read", "durationInSeconds": 60})
    assert r.status_code == 403, r.text


def test_an_expired_access_cuts_its_connections(disk_kagi):
    srv = disk_kagi
    name, _ = create_disk(srv)
    uri = grant_access(srv, name, "Write", seconds=30)
    client = NbdClient(uri)
    assert client.read(0).startswith("ok ")
    advance_clock(srv, 31)
    wait_for("expiry", lambda: client.read(0).startswith("err"))
    assert run("nbdinfo", uri, check=False).returncode != 0
    assert ok(arm(srv, "GET", compute_path(srv, "disks", name)))["properties"]["diskState"] == "Unattached"


def test_bad_snapshot_requests_get_azure_errors(kagi):
    srv = kagi
    srv.put_rg(DEFAULT_RG)
    _, disk = create_disk(srv)
    for props, needle in [
        ({"encryption": {"type": "Rot13"}}, "Rot13"),
        ({"encryption": {"type": "EncryptionAtRestWithCustomerKey"}}, "diskEncryptionSetId"),
        ({"incremental": True, "encryption": {"type": "EncryptionAtRestWithCustomerKey"}}, "disk's encryption"),
    ]:
        props["creationData"] = {"createOption": "Copy", "sourceResourceId": disk["id"]}
        props.setdefault("incremental", False)
        r = arm(srv, "PUT", compute_path(srv, "snapshots", random_name("bad", 10)),
                {"location": LOCATION, "properties": props})
        assert r.status_code == 400, r.text
        assert needle in r.json()["error"]["message"], r.text
    r = arm(srv, "PUT", compute_path(srv, "snapshots", random_name("bad", 10)), {"location": "eastus", "properties": {
        "creationData": {"createOption": "Copy", "sourceResourceId": disk["id"]}, "incremental": True}})
    assert r.status_code == 400, r.text
    # A failed creation leaves nothing behind.
    families = lambda: sorted(p.name for p in (srv.data_dir / "disks").iterdir() if not p.name.startswith("."))
    before = families()
    r = arm(srv, "PUT", compute_path(srv, "disks", "disk_2"), {"location": LOCATION, "properties": {
        "creationData": {"createOption": "Empty"}, "diskSizeGB": 1}})
    assert r.status_code in (400, 404), r.text
    assert families() == before


def test_upload_a_disk(kagi, tmp_path):
    """createOption Upload: ReadyToUpload, ActiveUpload while the write access is open,
    Unattached once it ends; the disk holds what was uploaded."""
    srv = kagi
    srv.put_rg(DEFAULT_RG)
    name = random_name("up", 10)
    size = 32 * MIB + 512
    body = {"location": LOCATION, "properties": {"creationData": {"createOption": "Upload", "uploadSizeBytes": size}}}
    disk = ok(arm(srv, "PUT", compute_path(srv, "disks", name), body))
    assert disk["properties"]["diskState"] == "ReadyToUpload"
    assert disk["properties"]["diskSizeBytes"] == 32 * MIB + 4096
    assert disk["properties"]["creationData"] == {"createOption": "Upload", "uploadSizeBytes": size}
    uri = grant_access(srv, name, "Write")
    assert ok(arm(srv, "GET", compute_path(srv, "disks", name)))["properties"]["diskState"] == "ActiveUpload"
    image = tmp_path / "up.raw"
    data = random_image(image, 32, seed=9)
    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", image, uri)
    end_access(srv, name)
    assert ok(arm(srv, "GET", compute_path(srv, "disks", name)))["properties"]["diskState"] == "Unattached"
    ro = grant_access(srv, name, "Read")
    assert ok(arm(srv, "GET", compute_path(srv, "disks", name)))["properties"]["diskState"] == "ActiveSAS"
    assert read_back(ro, tmp_path / "back.raw", len(data)) == data
    r = arm(srv, "PUT", compute_path(srv, "disks", random_name("up", 10)), {"location": LOCATION, "properties": {
        "creationData": {"createOption": "Upload", "uploadSizeBytes": 1024}}})
    assert r.status_code == 400, r.text
    assert "uploadSizeBytes" in r.text


def test_a_rotation_the_set_cannot_do_is_reported(disk_kagi):
    """autoKeyRotationError: the set's identity lost its permission; the disk's key state says
    why too. Granted again, the rotation completes and the error goes."""
    srv = disk_kagi
    vault, keys, key = key_vault_with_key(srv)
    set_name, des = create_set(srv, key.id, rotate=True)
    principal = des["identity"]["principalId"]
    grant(srv, vault, principal)
    name, _ = create_disk(srv, encryption={"type": "EncryptionAtRestWithCustomerKey", "diskEncryptionSetId": des["id"]})
    grant_access(srv, name, "Read")
    r = update_vault_properties(srv, vault, accessPolicies=[], enablePurgeProtection=True, enableSoftDelete=True)
    assert r.status_code in (200, 201), r.text
    new_key = keys.rotate_key(key.name)
    got = wait_for("the error", lambda: (lambda d: d if "autoKeyRotationError" in d["properties"] else None)(
        ok(arm(srv, "GET", compute_path(srv, "diskEncryptionSets", set_name)))))
    assert got["properties"]["activeKey"]["keyUrl"] == key.id
    assert "autoKeyRotationError" in got["properties"], got
    assert ok(arm(srv, "GET", compute_path(srv, "disks", name)))["properties"]["keyState"]["state"] == "GracePeriod"
    grant(srv, vault, principal)
    got = wait_for("the rotation", lambda: (lambda d: d if d["properties"]["activeKey"]["keyUrl"] == new_key.id else None)(
        ok(arm(srv, "GET", compute_path(srv, "diskEncryptionSets", set_name)))))
    assert "autoKeyRotationError" not in got["properties"], got
    wait_for("recovery", lambda: "keyState" not in ok(arm(srv, "GET", compute_path(srv, "disks", name)))["properties"])


def test_cmk_stays_on_a_disk_with_incremental_snapshots(disk_kagi):
    """DK-7: with an incremental snapshot, the customer-managed key cannot be turned off (even
    after the disk moved to another resource group); without one it can."""
    from test_backup_moves import post_move, put_rg

    srv = disk_kagi
    vault, keys, key = key_vault_with_key(srv)
    _, des = create_set(srv, key.id)
    grant(srv, vault, des["identity"]["principalId"])
    enc = {"type": "EncryptionAtRestWithCustomerKey", "diskEncryptionSetId": des["id"]}
    to_pmk = {"properties": {"encryption": {"type": "EncryptionAtRestWithPlatformKey", "diskEncryptionSetId": None}}}
    name, disk = create_disk(srv, encryption=enc)
    create_snapshot(srv, disk["id"], incremental=True)
    put_rg(srv, srv.subscription_id, "rg-dk7")
    r = post_move(srv, srv.subscription_id, DEFAULT_RG, [disk["id"]], srv.subscription_id, "rg-dk7")
    assert r.status_code in (200, 202, 204), r.text
    moved = compute_path(srv, "disks", name, rg="rg-dk7")
    wait_for("move", lambda: arm(srv, "GET", moved).status_code == 200)
    r = arm(srv, "PATCH", moved, to_pmk)
    assert r.status_code == 400, r.text
    assert "incremental snapshots" in r.text
    other, _ = create_disk(srv, encryption=enc)
    got = ok(arm(srv, "PATCH", compute_path(srv, "disks", other), to_pmk))
    assert got["properties"]["encryption"] == {"type": "EncryptionAtRestWithPlatformKey"}


def test_import_a_raw_image_from_a_url(kagi, tmp_path):
    """createOption Import: a raw image named by URL is streamed into a new encrypted disk; a
    source that cannot be read leaves no disk."""
    import functools
    import http.server
    import threading

    srv = kagi
    srv.put_rg(DEFAULT_RG)
    served = tmp_path / "served"
    served.mkdir()
    data = random_image(served / "img.raw", 3, seed=11)
    # A zero stretch in the middle stays a hole.
    data = data[:MIB] + bytes(MIB) + data[2 * MIB:]
    (served / "img.raw").write_bytes(data)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_port}/img.raw"
        name = random_name("imp", 10)
        disk = ok(arm(srv, "PUT", compute_path(srv, "disks", name), {"location": LOCATION, "properties": {
            "creationData": {"createOption": "Import", "sourceUri": url}}}))
        assert disk["properties"]["diskSizeGB"] == 1, disk
        assert disk["properties"]["creationData"] == {"createOption": "Import", "sourceUri": url}
        uri = grant_access(srv, name, "Read")
        assert read_back(uri, tmp_path / "back.raw", len(data)) == data
        holes = json.loads(run("nbdinfo", "--map", "--json", uri).stdout)
        assert any(e["offset"] <= MIB and e["offset"] + e["length"] >= 2 * MIB and e["type"] & 1
                   for e in holes), holes
        end_access(srv, name)
        # A source that cannot be read: 400, and nothing is left behind.
        for bad_uri in (url + ".missing", "ftp://example.invalid/img.raw"):
            r = arm(srv, "PUT", compute_path(srv, "disks", "impbad"), {"location": LOCATION, "properties": {
                "creationData": {"createOption": "Import", "sourceUri": bad_uri}, "diskSizeGB": 1}})
            assert r.status_code == 400, r.text
            assert "sourceUri" in r.json()["error"]["message"], r.text
            assert arm(srv, "GET", compute_path(srv, "disks", "impbad")).status_code == 404
        assert_no_plaintext(srv.data_dir, b"KAGI-PLAINTEXT-MARKER-11")
    finally:
        httpd.shutdown()
