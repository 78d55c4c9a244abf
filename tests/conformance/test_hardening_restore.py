"""Restore safety (issue 11, item 6) end to end: through the backup agent and the backup service.

A restore gives back setuid and setgid bits only together with the recorded owner (the agent's
`restore --restore-owners`, as root, like restic); otherwise a user's setuid file would come back
as a setuid file of whoever restores (root, for the agent). And a restore never follows a
symbolic link already in its target. (Crafted trees with names such as `../x` or repeated names
are refused by the engine; those are tested in crates/backup/src/restore/tests.rs, as a real
backup cannot produce them.)
"""

import os
import stat
from pathlib import Path

import pytest

from test_backup_agent import agent, credentials, backup_vault, fails
from test_backup_vault import backup_now, create_backup_vault, kagi_cli, ok, protect, vref

pytestmark = pytest.mark.cli

ROOT = os.geteuid() == 0
OTHER = 4321  # an owner (user and group id) other than the one running the tests


def setuid_tree(src: Path) -> None:
    """A setuid file of the restoring user, setuid/setgid files and a setgid+sticky folder of
    another owner (when the tests run as root and can give files away)."""
    src.mkdir()
    (src / "mine").write_text("#!/bin/sh\n")
    os.chmod(src / "mine", 0o4755)
    (src / "theirs").write_text("#!/bin/sh\n")
    os.chmod(src / "theirs", 0o6755)
    (src / "shared").mkdir()
    os.chmod(src / "shared", 0o3775)
    if ROOT:
        os.chown(src / "theirs", OTHER, OTHER)
        os.chown(src / "shared", OTHER, OTHER)
        os.chmod(src / "theirs", 0o6755)  # chown cleared the bits
        os.chmod(src / "shared", 0o3775)


def mode_owner(p: Path):
    st = os.lstat(p)
    return stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid


def assert_no_setid(out: Path):
    me = (os.geteuid(), os.getegid())
    assert mode_owner(out / "mine") == (0o755, *me)
    assert mode_owner(out / "theirs") == (0o755, *me)
    # The sticky bit stays on a directory (it only limits deletion).
    assert mode_owner(out / "shared") == (0o1775, *me)


def registered_agent(kagi, tmp_path, name):
    bv, _ = backup_vault(kagi)
    creds = credentials(kagi, bv, tmp_path)
    st = tmp_path / name
    p = agent(st, "register", "--vault-credentials", str(creds), "--machine-name", f"{name}.example",
              "--generate-passphrase")
    assert p.returncode == 0, p.stderr
    return st


def test_agent_restore_drops_setuid_unless_owners_are_restored(kagi, tmp_path):
    st = registered_agent(kagi, tmp_path, "suid")
    src = tmp_path / "src"
    setuid_tree(src)
    ok(agent(st, "protect", str(src)))
    rp = ok(agent(st, "backup"))[0]["recoveryPoint"]

    out = tmp_path / "plain"
    ok(agent(st, "restore", "--recovery-point", rp, "--target", str(out)))
    assert_no_setid(out)

    owned = tmp_path / "owned"
    p = agent(st, "restore", "--recovery-point", rp, "--target", str(owned), "--restore-owners")
    if ROOT:
        ok(p)
        assert mode_owner(owned / "mine") == (0o4755, 0, 0)
        assert mode_owner(owned / "theirs") == (0o6755, OTHER, OTHER)
        assert mode_owner(owned / "shared") == (0o3775, OTHER, OTHER)
    else:
        fails(p, "needs root")
        assert not owned.exists()


def test_agent_restore_never_follows_links_in_the_target(kagi, tmp_path):
    st = registered_agent(kagi, tmp_path, "links")
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "inner.txt").write_text("restored\n")
    (src / "top.txt").write_text("restored\n")
    ok(agent(st, "protect", str(src)))
    rp = ok(agent(st, "backup"))[0]["recoveryPoint"]

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_text("precious\n")
    target = tmp_path / "target"
    target.mkdir()
    # Where the recovery point has a folder, a link to a folder outside; where it has a file, a
    # link to a file outside and then a hard link to it.
    os.symlink(outside, target / "sub")
    os.symlink(outside / "victim", target / "top.txt")
    ok(agent(st, "restore", "--recovery-point", rp, "--target", str(target), "--overwrite"))
    assert sorted(x.name for x in outside.iterdir()) == ["victim"]
    assert (outside / "victim").read_text() == "precious\n"
    assert not (target / "sub").is_symlink() and (target / "sub" / "inner.txt").read_text() == "restored\n"
    assert not (target / "top.txt").is_symlink() and (target / "top.txt").read_text() == "restored\n"

    (target / "top.txt").unlink()
    os.link(outside / "victim", target / "top.txt")
    ok(agent(st, "restore", "--recovery-point", rp, "--target", str(target), "--overwrite"))
    assert (outside / "victim").read_text() == "precious\n"
    assert (target / "top.txt").read_text() == "restored\n"
    assert os.lstat(target / "top.txt").st_nlink == 1


def test_service_restore_drops_setuid(kagi, tmp_path):
    src = tmp_path / "src"
    setuid_tree(src)
    vault, _ = create_backup_vault(kagi)
    protect(kagi, vault, "suid", src)
    rp = backup_now(kagi, vault, "suid")["stats"]["recoveryPointId"]
    out = tmp_path / "out"
    job = ok(kagi_cli(kagi, "backup", "restore", *vref(vault), "--item", "suid", "--recovery-point", rp,
                      "--target", str(out)))
    assert job["status"] == "Completed", job
    # The server restores as its own user (here the test's user).
    assert_no_setid(out)
