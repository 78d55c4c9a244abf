"""`az group delete` with the real az CLI (issue 16, docs/AZ_CLI.md "Deleting a resource group"):
the DELETE answers 202 and a Location that az polls; everything in the group goes (key vaults
soft-deleted, recoverable), then the group; a lock, a resource that refuses its delete, an
unknown group or a caller who may not delete it refuse the whole deletion, and nothing in the
group is deleted then.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from az_helpers import Az
from conftest import LOCATION, create_sp, random_name
from test_az_ad import login_as
from test_az_cli import az  # noqa: F401  (the fixture)
from test_backup_vault import kagi_cli, ok

pytestmark = pytest.mark.az

KV_READER = "Key Vault Reader"


def new_group(az: Az) -> str:
    name = random_name("azdel", 14)
    az.json("group", "create", "--name", name, "--location", LOCATION)
    return name


def key_vault(az: Az, rg: str, *more: str) -> dict:
    return az.json("keyvault", "create", "--name", random_name("azkv", 16), "--resource-group", rg,
                   "--location", LOCATION, "--enable-rbac-authorization", "false", "--retention-days", "7", *more)


def gone(az: Az, *args: str) -> None:
    """`az ARGS` answers not found (exit 3)."""
    err = az.fails(*args, expect=3)
    assert "not found" in err.lower() or "NotFound" in err, err


def test_group_delete_takes_everything_in_it(kagi, az):
    rg = new_group(az)
    # A disk encryption set's key vault has purge protection (Azure's rule).
    vault = key_vault(az, rg, "--enable-purge-protection", "true")
    kid = az.json("keyvault", "key", "create", "--vault-name", vault["name"], "--name", "des-key", "--kty", "RSA",
                  "--size", "2048")["key"]["kid"]
    des = az.json("disk-encryption-set", "create", "--name", "des1", "--resource-group", rg, "--location", LOCATION,
                  "--key-url", kid, "--source-vault", vault["name"])
    az.json("keyvault", "set-policy", "--name", vault["name"], "--object-id", des["identity"]["principalId"],
            "--key-permissions", "get", "list", "wrapKey", "unwrapKey")
    # A disk that uses the set: it goes first, then the set, then the vault that holds the key.
    disk = az.json("disk", "create", "--name", "d1", "--resource-group", rg, "--location", LOCATION,
                   "--size-gb", "1", "--disk-encryption-set", des["id"])
    uami = az.json("identity", "create", "--name", "app-id", "--resource-group", rg, "--location", LOCATION)
    sp = create_sp(kagi, random_name("azsp", 12))
    az.json("role", "assignment", "create", "--assignee-object-id", sp["objectId"],
            "--assignee-principal-type", "ServicePrincipal", "--role", KV_READER,
            "--scope", f"/subscriptions/{kagi.subscription_id}/resourceGroups/{rg}")
    assert len(az.json("resource", "list", "--resource-group", rg)) == 4

    az.run("group", "delete", "--name", rg, "--yes")

    err = az.fails("group", "show", "--name", rg, expect=3)
    assert "ResourceGroupNotFound" in err, err
    assert az.json("group", "exists", "--name", rg) is False
    gone(az, "identity", "show", "--ids", uami["id"])
    gone(az, "disk", "show", "--ids", disk["id"])
    gone(az, "disk-encryption-set", "show", "--ids", des["id"])
    assert az.json("role", "assignment", "list", "--assignee", sp["clientId"], "--all") == []
    # The vault is soft-deleted, recoverable for its retention period, as Azure leaves it.
    deleted = {v["name"]: v for v in az.json("keyvault", "list-deleted")}
    assert vault["name"] in deleted, sorted(deleted)
    assert deleted[vault["name"]]["properties"]["vaultId"].lower() == vault["id"].lower(), deleted[vault["name"]]

    # An unknown group: az's not-found exit, ARM's code.
    err = az.fails("group", "delete", "--name", rg, "--yes", expect=3)
    assert "ResourceGroupNotFound" in err, err


def test_group_delete_is_refused_by_a_lock_and_deletes_nothing(kagi, az):
    rg = new_group(az)
    vault = key_vault(az, rg)
    uami = az.json("identity", "create", "--name", "app-id", "--resource-group", rg, "--location", LOCATION)
    az.json("lock", "create", "--name", "keep", "--lock-type", "CanNotDelete", "--resource-group", rg)

    err = az.fails("group", "delete", "--name", rg, "--yes", expect=1)
    assert "ScopeLocked" in err, err
    assert az.json("group", "show", "--name", rg)["name"] == rg
    assert az.json("keyvault", "show", "--name", vault["name"])["id"] == vault["id"]
    assert az.json("identity", "show", "--ids", uami["id"])["id"] == uami["id"]

    # Without the lock it goes.
    az.run("lock", "delete", "--name", "keep", "--resource-group", rg)
    az.run("group", "delete", "--name", rg, "--yes")
    assert az.json("group", "exists", "--name", rg) is False


def test_group_delete_is_refused_by_a_backup_vault_with_a_protected_item(kagi, az, tmp_path: Path):
    rg = new_group(az)
    vault = key_vault(az, rg)
    bv = random_name("bv", 14)
    ok(kagi_cli(kagi, "backup", "vault", "create", "--vault", bv, "--resource-group", rg, "--location", LOCATION))
    source = tmp_path / "docs"
    source.mkdir()
    (source / "a.txt").write_text("kept")
    ok(kagi_cli(kagi, "backup", "item", "protect", "--vault", bv, "--resource-group", rg, "--name", "docs",
                "--source", str(source)))

    err = az.fails("group", "delete", "--name", rg, "--yes", expect=1)
    assert "ResourceGroupDeletionBlocked" in err and "VaultHasProtectedItems" in err, err
    assert f"Microsoft.RecoveryServices/vaults/{bv}" in err, err
    # Nothing was deleted: neither the backup vault nor the key vault beside it.
    names = {r["name"] for r in az.json("resource", "list", "--resource-group", rg)}
    assert names == {bv, vault["name"]}, names
    assert vault["name"] not in {v["name"] for v in az.json("keyvault", "list-deleted")}


def test_group_delete_needs_more_than_a_reader(kagi, az, tmp_path: Path):
    rg = new_group(az)
    vault = key_vault(az, rg)
    scope = f"/subscriptions/{kagi.subscription_id}/resourceGroups/{rg}"
    out = az.json("ad", "sp", "create-for-rbac", "--name", random_name("azapp", 14), "--role", KV_READER,
                  "--scopes", scope)
    reader = login_as(kagi, tmp_path, out["appId"], out["password"])

    err = reader.fails("group", "delete", "--name", rg, "--yes", expect=1)
    assert "AuthorizationFailed" in err, err
    assert az.json("group", "show", "--name", rg)["name"] == rg
    assert az.json("keyvault", "show", "--name", vault["name"])["id"] == vault["id"]
    az.run("ad", "app", "delete", "--id", out["appId"])
