"""The real az CLI (azure-cli from PyPI, pinned in scripts/az-venv.sh) end to end against a real
kagi server: the cloud registered from kagi's /metadata/endpoints, `az login --service-principal`
as the bootstrap administrator, then one test per command family. Each test has its own
AZURE_CONFIG_DIR. Every assertion reads what az printed, not only its exit code.

Skipped (loudly) only when the az venv is missing; tests/conformance/run.sh makes it.
"""

from __future__ import annotations

import uuid

import pytest

from az_helpers import Az, require_az
from conftest import LOCATION, create_sp, random_name

pytestmark = pytest.mark.az

KV_READER = "Key Vault Reader"
KV_READER_GUID = "21090545-7ca7-4776-b22c-e363652d74d2"


@pytest.fixture
def az(kagi, tmp_path) -> Az:
    require_az()
    return Az(kagi, tmp_path / "azure-config").sign_in()


@pytest.fixture
def rg(kagi, az) -> str:
    name = random_name("azrg", 14)
    out = az.json("group", "create", "--name", name, "--location", LOCATION)
    assert out["name"] == name and out["location"] == LOCATION, out
    return name


def admin_oid(kagi, az) -> str:
    sp = az.json("ad", "sp", "show", "--id", kagi.admin["clientId"])
    return sp["id"]


# ---------------------------------------------------------------------------------------------
# cloud and login
# ---------------------------------------------------------------------------------------------


def test_cloud_registered_from_metadata_and_login(kagi, az):
    cloud = az.json("cloud", "show", "--name", "kagi")
    ep = cloud["endpoints"]
    assert ep["resourceManager"] == f"{kagi.base}/", ep
    assert ep["activeDirectory"] == kagi.base, ep
    assert ep["activeDirectoryResourceId"] == f"{kagi.base}/", ep
    assert ep["microsoftGraphResourceId"] == f"{kagi.base}/", ep
    assert cloud["suffixes"]["keyvaultDns"] == f".localhost:{kagi.port}", cloud["suffixes"]
    assert cloud["isActive"] is True, cloud

    account = az.json("account", "show")
    assert account["id"] == kagi.subscription_id, account
    assert account["tenantId"] == kagi.tenant_id, account
    assert account["environmentName"] == "kagi", account
    assert account["user"] == {"name": kagi.admin["clientId"], "type": "servicePrincipal"}, account

    token = az.json("account", "get-access-token")
    assert token["subscription"] == kagi.subscription_id and token["tokenType"] == "Bearer", token
    # The token az got works against kagi as it is.
    r = kagi.request("GET", kagi.arm("/subscriptions", "2022-12-01"), auth=False,
                     headers={"Authorization": f"Bearer {token['accessToken']}"})
    assert r.status_code == 200 and kagi.subscription_id in r.text, r.text[:300]


# ---------------------------------------------------------------------------------------------
# resource groups
# ---------------------------------------------------------------------------------------------


def test_group_create_and_show(kagi, az):
    name = random_name("azrg", 14)
    created = az.json("group", "create", "--name", name, "--location", LOCATION, "--tags", "team=crypto")
    assert created["id"] == f"/subscriptions/{kagi.subscription_id}/resourceGroups/{name}", created
    assert created["tags"] == {"team": "crypto"}, created
    assert created["properties"]["provisioningState"] == "Succeeded", created
    shown = az.json("group", "show", "--name", name)
    assert shown["id"] == created["id"] and shown["location"] == LOCATION, shown
    assert az.json("group", "exists", "--name", name) is True
    assert az.json("group", "exists", "--name", random_name("nope", 14)) is False
    err = az.fails("group", "show", "--name", random_name("nope", 14), expect=3)
    assert "ResourceGroupNotFound" in err, err


def test_group_list(kagi, az, rg):
    groups = {g["name"]: g for g in az.json("group", "list")}
    assert rg in groups and "kagi-conformance" in groups, sorted(groups)
    assert groups[rg]["id"] == f"/subscriptions/{kagi.subscription_id}/resourceGroups/{rg}", groups[rg]
    assert groups[rg]["location"] == LOCATION, groups[rg]


# ---------------------------------------------------------------------------------------------
# key vaults
# ---------------------------------------------------------------------------------------------


def test_keyvault_create_show_list_update(kagi, az, rg):
    name = random_name("azkv", 16)
    created = az.json(
        "keyvault", "create", "--name", name, "--resource-group", rg, "--location", LOCATION,
        "--enable-rbac-authorization", "false", "--retention-days", "7",
    )
    props = created["properties"]
    assert props["vaultUri"] == f"https://{name}.localhost:{kagi.port}/", props
    assert props["enableRbacAuthorization"] is False and props["softDeleteRetentionInDays"] == 7, props
    # az gives the signed-in principal (found through Graph: /me, then servicePrincipals by
    # appId) an access policy with every permission.
    oid = admin_oid(kagi, az)
    policies = {p["objectId"]: p["permissions"] for p in props["accessPolicies"]}
    assert oid in policies and "all" in policies[oid]["keys"], props["accessPolicies"]

    # show without a resource group: ARM's generic resource list with a $filter
    shown = az.json("keyvault", "show", "--name", name)
    assert shown["id"] == created["id"] and shown["resourceGroup"] == rg, shown
    listed = az.json("keyvault", "list")
    assert created["id"] in [v["id"] for v in listed], listed
    in_rg = az.json("keyvault", "list", "--resource-group", rg)
    assert [v["name"] for v in in_rg] == [name], in_rg

    updated = az.json("keyvault", "update", "--name", name, "--resource-group", rg,
                      "--enabled-for-disk-encryption", "true", "--default-action", "Allow")
    assert updated["properties"]["enabledForDiskEncryption"] is True, updated["properties"]
    assert az.json("keyvault", "show", "--name", name, "--resource-group", rg)["properties"][
        "enabledForDiskEncryption"] is True


def test_keyvault_set_policy_gives_a_service_principal_access(kagi, az, rg):
    name = random_name("azkv", 16)
    az.json("keyvault", "create", "--name", name, "--resource-group", rg, "--location", LOCATION,
            "--enable-rbac-authorization", "false")
    sp = create_sp(kagi, random_name("azsp", 12))
    # --spn: az finds the object id through Graph (servicePrincipals?$filter=servicePrincipalNames/any(…))
    out = az.json("keyvault", "set-policy", "--name", name, "--resource-group", rg, "--spn", sp["clientId"],
                  "--key-permissions", "get", "list", "wrapKey", "unwrapKey", "--secret-permissions", "get")
    policies = {p["objectId"]: p["permissions"] for p in out["properties"]["accessPolicies"]}
    assert sorted(policies[sp["objectId"]]["keys"]) == ["get", "list", "unwrapKey", "wrapKey"], policies
    assert policies[sp["objectId"]]["secrets"] == ["get"], policies
    # and by object id, replacing the key permissions only
    out = az.json("keyvault", "set-policy", "--name", name, "--object-id", sp["objectId"], "--key-permissions", "get")
    policies = {p["objectId"]: p["permissions"] for p in out["properties"]["accessPolicies"]}
    assert policies[sp["objectId"]]["keys"] == ["get"] and policies[sp["objectId"]]["secrets"] == ["get"], policies
    out = az.json("keyvault", "delete-policy", "--name", name, "--object-id", sp["objectId"])
    assert sp["objectId"] not in [p["objectId"] for p in out["properties"]["accessPolicies"]], out


def test_keyvault_delete_list_deleted_recover_purge(kagi, az, rg):
    name = random_name("azkv", 16)
    created = az.json("keyvault", "create", "--name", name, "--resource-group", rg, "--location", LOCATION,
                      "--retention-days", "7")
    az.run("keyvault", "delete", "--name", name, "--resource-group", rg)
    assert name not in [v["name"] for v in az.json("keyvault", "list")]

    deleted = {v["name"]: v for v in az.json("keyvault", "list-deleted")}
    assert name in deleted, deleted
    assert deleted[name]["properties"]["vaultId"].lower() == created["id"].lower(), deleted[name]
    assert deleted[name]["properties"]["location"] == LOCATION, deleted[name]
    shown = az.json("keyvault", "show-deleted", "--name", name)
    assert shown["name"] == name and shown["properties"]["scheduledPurgeDate"], shown

    recovered = az.json("keyvault", "recover", "--name", name)
    assert recovered["name"] == name and recovered["properties"]["vaultUri"] == created["properties"]["vaultUri"], recovered
    assert az.json("keyvault", "show", "--name", name)["id"] == created["id"]
    assert name not in [v["name"] for v in az.json("keyvault", "list-deleted")]

    az.run("keyvault", "delete", "--name", name)
    az.run("keyvault", "purge", "--name", name)
    assert name not in [v["name"] for v in az.json("keyvault", "list-deleted")]
    err = az.fails("keyvault", "show-deleted", "--name", name, expect=1)
    assert f"No deleted Vault or HSM was found with name {name}" in err, err
    # the name is free again
    again = az.json("keyvault", "create", "--name", name, "--resource-group", rg, "--location", LOCATION)
    assert again["name"] == name


def test_keyvault_list_deleted_includes_no_managed_hsms(az):
    # az asks deletedVaults and deletedManagedHSMs; kagi has no managed HSM pools.
    for v in az.json("keyvault", "list-deleted"):
        assert v["type"] == "Microsoft.KeyVault/deletedVaults", v
    assert az.json("keyvault", "list-deleted", "--resource-type", "hsm") == []


# ---------------------------------------------------------------------------------------------
# keys and secrets (data plane)
# ---------------------------------------------------------------------------------------------


def test_keys_and_secrets(kagi, az, rg):
    name = random_name("azkv", 16)
    az.json("keyvault", "create", "--name", name, "--resource-group", rg, "--location", LOCATION,
            "--enable-rbac-authorization", "false")
    key = az.json("keyvault", "key", "create", "--vault-name", name, "--name", "cmk", "--kty", "RSA", "--size", "3072")
    kid = key["key"]["kid"]
    assert kid.startswith(f"https://{name}.localhost:{kagi.port}/keys/cmk/"), kid
    assert key["key"]["kty"] == "RSA" and len(key["key"]["n"]) > 300, key["key"]
    ec = az.json("keyvault", "key", "create", "--vault-name", name, "--name", "sig", "--kty", "EC", "--curve", "P-256")
    assert ec["key"]["crv"] == "P-256", ec

    listed = az.json("keyvault", "key", "list", "--vault-name", name)
    assert sorted(k["name"] for k in listed) == ["cmk", "sig"], listed

    rotated = az.json("keyvault", "key", "rotate", "--vault-name", name, "--name", "cmk")
    assert rotated["key"]["kid"] != kid and rotated["key"]["kid"].startswith(kid.rsplit("/", 1)[0]), rotated
    versions = az.json("keyvault", "key", "list-versions", "--vault-name", name, "--name", "cmk")
    assert len(versions) == 2, versions

    enc = az.json("keyvault", "key", "encrypt", "--vault-name", name, "--name", "cmk", "--algorithm", "RSA-OAEP-256",
                  "--value", "aGVsbG8gYXo=", "--data-type", "base64")
    dec = az.json("keyvault", "key", "decrypt", "--vault-name", name, "--name", "cmk", "--algorithm", "RSA-OAEP-256",
                  "--value", enc["result"], "--data-type", "base64")
    assert dec["result"] == "aGVsbG8gYXo=", dec

    secret = az.json("keyvault", "secret", "set", "--vault-name", name, "--name", "db-password", "--value", "s3cr3t!")
    assert secret["value"] == "s3cr3t!" and secret["id"].startswith(f"https://{name}.localhost:{kagi.port}/secrets/db-password/")
    shown = az.json("keyvault", "secret", "show", "--vault-name", name, "--name", "db-password")
    assert shown["value"] == "s3cr3t!" and shown["id"] == secret["id"], shown
    az.json("keyvault", "secret", "set", "--vault-name", name, "--name", "db-password", "--value", "v2")
    assert az.json("keyvault", "secret", "show", "--vault-name", name, "--name", "db-password")["value"] == "v2"
    names = [s["name"] for s in az.json("keyvault", "secret", "list", "--vault-name", name)]
    assert names == ["db-password"], names


# ---------------------------------------------------------------------------------------------
# managed identities
# ---------------------------------------------------------------------------------------------


def test_identity_create_list_show(kagi, az, rg):
    created = az.json("identity", "create", "--name", "app-id", "--resource-group", rg, "--location", LOCATION)
    assert created["name"] == "app-id" and created["type"] == "Microsoft.ManagedIdentity/userAssignedIdentities"
    uuid.UUID(created["principalId"]), uuid.UUID(created["clientId"])
    assert created["tenantId"] == kagi.tenant_id, created
    listed = az.json("identity", "list", "--resource-group", rg)
    assert [i["id"] for i in listed] == [created["id"]], listed
    shown = az.json("identity", "show", "--name", "app-id", "--resource-group", rg)
    assert shown["principalId"] == created["principalId"] and shown["clientId"] == created["clientId"], shown
    # the identity is a service principal in Graph, found by its client id
    sp = az.json("ad", "sp", "show", "--id", created["clientId"])
    assert sp["id"] == created["principalId"] and sp["servicePrincipalType"] == "ManagedIdentity", sp
    az.run("identity", "delete", "--name", "app-id", "--resource-group", rg)
    assert az.json("identity", "list", "--resource-group", rg) == []


# ---------------------------------------------------------------------------------------------
# roles
# ---------------------------------------------------------------------------------------------


def test_role_definitions(az):
    every = az.json("role", "definition", "list")
    names = {r["roleName"] for r in every}
    assert {"Key Vault Administrator", KV_READER, "Key Vault Crypto Service Encryption User"} <= names, names
    one = az.json("role", "definition", "list", "--name", KV_READER)
    assert [r["name"] for r in one] == [KV_READER_GUID], one
    assert one[0]["roleType"] == "BuiltInRole" and one[0]["permissions"][0]["dataActions"], one
    assert az.json("role", "definition", "list", "--name", "No Such Role") == []


def test_role_assignment_create_list_delete(kagi, az, rg):
    name = random_name("azkv", 16)
    vault = az.json("keyvault", "create", "--name", name, "--resource-group", rg, "--location", LOCATION)
    scope = vault["id"]
    sp = create_sp(kagi, random_name("azsp", 12))

    # by application id: az resolves it through Graph
    created = az.json("role", "assignment", "create", "--assignee", sp["clientId"], "--role", KV_READER,
                      "--scope", scope)
    assert created["principalId"] == sp["objectId"], created
    assert created["roleDefinitionId"].endswith(KV_READER_GUID), created
    listed = az.json("role", "assignment", "list", "--scope", scope)
    mine = [a for a in listed if a["principalId"] == sp["objectId"]]
    assert len(mine) == 1, listed
    assert mine[0]["roleDefinitionName"] == KV_READER, mine[0]
    assert mine[0]["principalName"] == sp["clientId"], mine[0]
    assert mine[0]["scope"].lower() == scope.lower(), mine[0]
    by_assignee = az.json("role", "assignment", "list", "--assignee", sp["clientId"], "--all")
    assert [a["id"] for a in by_assignee] == [created["id"]], by_assignee

    # by object id, without Graph
    crypto = az.json("role", "assignment", "create", "--assignee-object-id", sp["objectId"],
                     "--assignee-principal-type", "ServicePrincipal",
                     "--role", "Key Vault Crypto User", "--scope", scope)
    assert crypto["principalId"] == sp["objectId"], crypto

    az.run("role", "assignment", "delete", "--assignee", sp["clientId"], "--role", KV_READER, "--scope", scope)
    left = [a["roleDefinitionName"] for a in az.json("role", "assignment", "list", "--scope", scope)
            if a["principalId"] == sp["objectId"]]
    assert left == ["Key Vault Crypto User"], left
    az.run("role", "assignment", "delete", "--ids", crypto["id"])
    assert [a for a in az.json("role", "assignment", "list", "--scope", scope) if a["principalId"] == sp["objectId"]] == []


# ---------------------------------------------------------------------------------------------
# service principals (Microsoft Graph)
# ---------------------------------------------------------------------------------------------


def test_ad_sp_list_and_show(kagi, az):
    display = random_name("azsp", 12)
    sp = create_sp(kagi, display)
    listed = az.json("ad", "sp", "list", "--display-name", display)
    assert [s["id"] for s in listed] == [sp["objectId"]], listed
    assert listed[0]["appId"] == sp["clientId"] and listed[0]["displayName"] == display, listed
    assert listed[0]["servicePrincipalType"] == "Application", listed
    assert sp["clientId"] in listed[0]["servicePrincipalNames"], listed
    assert "clientSecret" not in listed[0], listed

    by_spn = az.json("ad", "sp", "list", "--spn", sp["clientId"])
    assert [s["id"] for s in by_spn] == [sp["objectId"]], by_spn
    everyone = az.json("ad", "sp", "list", "--all")
    assert {sp["objectId"], admin_oid(kagi, az)} <= {s["id"] for s in everyone}, everyone

    by_app = az.json("ad", "sp", "show", "--id", sp["clientId"])
    by_oid = az.json("ad", "sp", "show", "--id", sp["objectId"])
    assert by_app["id"] == by_oid["id"] == sp["objectId"], (by_app, by_oid)
    err = az.fails("ad", "sp", "show", "--id", str(uuid.uuid4()), expect=3)
    assert "does not exist" in err, err


# ---------------------------------------------------------------------------------------------
# disk encryption sets, disks and snapshots
# ---------------------------------------------------------------------------------------------


def test_disk_encryption_sets_disks_and_snapshots(kagi, az, rg):
    vault = random_name("azkv", 16)
    az.json("keyvault", "create", "--name", vault, "--resource-group", rg, "--location", LOCATION,
            "--enable-rbac-authorization", "false", "--enable-purge-protection", "true")
    kid = az.json("keyvault", "key", "create", "--vault-name", vault, "--name", "des-key", "--kty", "RSA",
                  "--size", "2048")["key"]["kid"]
    des = az.json("disk-encryption-set", "create", "--name", "des1", "--resource-group", rg, "--location", LOCATION,
                  "--key-url", kid, "--source-vault", vault)
    assert des["activeKey"]["keyUrl"] == kid and des["encryptionType"] == "EncryptionAtRestWithCustomerKey", des
    assert des["identity"]["type"] == "SystemAssigned" and des["provisioningState"] == "Succeeded", des
    principal = des["identity"]["principalId"]
    assert [d["id"] for d in az.json("disk-encryption-set", "list", "--resource-group", rg)] == [des["id"]]
    # the set's identity needs get, list, wrapKey and unwrapKey on the key (docs/DISKS.md)
    az.json("keyvault", "set-policy", "--name", vault, "--object-id", principal,
            "--key-permissions", "get", "list", "wrapKey", "unwrapKey")

    disk = az.json("disk", "create", "--name", "d1", "--resource-group", rg, "--location", LOCATION, "--size-gb", "1",
                   "--disk-encryption-set", des["id"])
    assert disk["encryption"] == {"diskEncryptionSetId": des["id"], "type": "EncryptionAtRestWithCustomerKey"}, disk
    assert disk["diskSizeGB"] == 1 and disk["provisioningState"] == "Succeeded", disk
    assert az.json("disk", "show", "--name", "d1", "--resource-group", rg)["id"] == disk["id"]
    assert [d["name"] for d in az.json("disk", "list", "--resource-group", rg)] == ["d1"]

    access = az.json("disk", "grant-access", "--name", "d1", "--resource-group", rg, "--access-level", "Read",
                     "--duration-in-seconds", "600")
    assert access["accessSAS"].startswith("nbd"), access
    az.run("disk", "revoke-access", "--name", "d1", "--resource-group", rg)

    snap = az.json("snapshot", "create", "--name", "s1", "--resource-group", rg, "--source", "d1")
    assert snap["encryption"]["diskEncryptionSetId"] == des["id"], snap
    assert [s["name"] for s in az.json("snapshot", "list", "--resource-group", rg)] == ["s1"]

    rotated = az.json("disk-encryption-set", "update", "--name", "des1", "--resource-group", rg,
                      "--enable-auto-key-rotation", "true")
    assert rotated["rotationToLatestKeyVersionEnabled"] is True, rotated

    az.run("snapshot", "delete", "--name", "s1", "--resource-group", rg)
    az.run("disk", "delete", "--name", "d1", "--resource-group", rg, "--yes")
    assert az.json("disk", "list", "--resource-group", rg) == []
    az.run("disk-encryption-set", "delete", "--name", "des1", "--resource-group", rg)
    assert az.json("disk-encryption-set", "list", "--resource-group", rg) == []


# ---------------------------------------------------------------------------------------------
# SQL servers and databases
# ---------------------------------------------------------------------------------------------


def test_sql_servers_databases_and_tde(kagi, az, rg):
    server = random_name("azsql", 14)
    created = az.json("sql", "server", "create", "--name", server, "--resource-group", rg, "--location", LOCATION,
                      "--admin-user", "kagiadmin", "--admin-password", "Str0ng!Passw0rd", "--assign-identity")
    assert created["identity"]["type"] == "SystemAssigned", created
    assert created["fullyQualifiedDomainName"] == f"{server}.localhost", created
    # the password is write-only: az shows the model's field, empty
    assert created["administratorLogin"] == "kagiadmin" and created.get("administratorLoginPassword") is None, created
    assert "Str0ng!Passw0rd" not in str(created), created
    assert [s["name"] for s in az.json("sql", "server", "list", "--resource-group", rg)] == [server]

    db = az.json("sql", "db", "create", "--server", server, "--resource-group", rg, "--name", "orders")
    assert db["status"] == "Online" and db["name"] == "orders", db
    assert [d["name"] for d in az.json("sql", "db", "list", "--server", server, "--resource-group", rg)] == ["orders"]

    # TDE with the service-managed protector until a customer key is set
    protector = az.json("sql", "server", "tde-key", "show", "--server", server, "--resource-group", rg)
    assert protector["serverKeyType"] == "ServiceManaged" and protector["kind"] == "servicemanaged", protector
    keys = az.json("sql", "server", "key", "list", "--server", server, "--resource-group", rg)
    assert [k["name"] for k in keys] == ["ServiceManaged"], keys
    tde = az.json("sql", "db", "tde", "show", "--server", server, "--resource-group", rg, "--database", "orders")
    assert tde["state"] == "Enabled", tde

    # az checks a key id against Azure's own key vault host names before sending anything, so a
    # kagi key (https://{vault}.localhost:8443/keys/…) cannot be given to `az sql server key
    # create` or `tde-key set`: `kagi sql tde-key set` does that (docs/AZ_CLI.md).
    err = az.fails("sql", "server", "key", "create", "--server", server, "--resource-group", rg,
                   "--kid", f"https://v.localhost:{kagi.port}/keys/k/0123456789abcdef0123456789abcdef", expect=1)
    assert "The provided uri is invalid" in err, err

    az.run("sql", "db", "delete", "--server", server, "--resource-group", rg, "--name", "orders", "--yes")
    az.run("sql", "server", "delete", "--name", server, "--resource-group", rg, "--yes")
    assert az.json("sql", "server", "list", "--resource-group", rg) == []
