"""`kagi keyvault secret …`, `kagi keyvault set-policy|delete-policy` and `--output json` everywhere,
driving the real CLI against a real server (issue 16)."""

import json
import subprocess
import time

import pytest
from azure.core.exceptions import HttpResponseError

from conftest import DEFAULT_RG, KAGI_BIN, LOCATION, create_sp, random_name, sp_credential
from test_cli import cli, vault_create

pytestmark = pytest.mark.cli


def secret_cmd(verb, vault, *extra):
    return ["keyvault", "secret", verb, "--vault-name", vault, *extra]


def names(out):
    return sorted(i["id"].rstrip("/").split("/")[-1] for i in out["value"])


def retry(fn, tries=20, delay=0.25):
    """Soft delete and recovery settle quickly but not within one request: retry a little."""
    for i in range(tries):
        try:
            return fn()
        except AssertionError:
            if i == tries - 1:
                raise
            time.sleep(delay)


@pytest.fixture
def cli_vault(kagi):
    name = random_name("cs", 16)
    cli(kagi, *vault_create(name))
    return name


def test_cli_secret_set_show_list_versions(kagi, cli_vault, tmp_path):
    v = cli_vault
    s1 = cli(
        kagi,
        *secret_cmd(
            "set", v, "--name", "db", "--value", "first", "--content-type", "text/plain",
            "--expires", "2035-01-01T00:00:00Z", "--not-before", "1700000000",
            "--tags", "env=prod", "team=core",
        ),
    )
    assert s1["value"] == "first"
    assert s1["contentType"] == "text/plain"
    assert s1["tags"] == {"env": "prod", "team": "core"}
    assert s1["attributes"]["exp"] == 2051222400 and s1["attributes"]["nbf"] == 1700000000
    assert s1["attributes"]["enabled"] is True

    # --file: the exact bytes of the file, never on the command line.
    f = tmp_path / "value.txt"
    f.write_text("multi\nline \"value\"\n")
    s2 = cli(kagi, *secret_cmd("set", v, "--name", "db", "--file", str(f)))
    assert s2["value"] == "multi\nline \"value\"\n"
    assert s2["id"] != s1["id"]

    # show prints the value (as az does), newest version unless --version.
    shown = cli(kagi, *secret_cmd("show", v, "--name", "db"))
    assert shown["value"] == "multi\nline \"value\"\n" and shown["id"] == s2["id"]
    old = cli(kagi, *secret_cmd("show", v, "--name", "db", "--version", s1["id"].rsplit("/", 1)[1]))
    assert old["value"] == "first"

    # The SDK sees the same secret.
    assert kagi.secret_client(kagi.vault_url(v)).get_secret("db").value == s2["value"]

    disabled = cli(kagi, *secret_cmd("set", v, "--name", "off", "--value", "x", "--disabled"))
    assert disabled["attributes"]["enabled"] is False

    listed = cli(kagi, *secret_cmd("list", v))
    assert names(listed) == ["db", "off"]
    assert all("value" not in i for i in listed["value"]), "lists never carry values"
    versions = cli(kagi, *secret_cmd("versions", v, "--name", "db"))
    assert sorted(i["id"] for i in versions["value"]) == sorted([s1["id"], s2["id"]])

    # Table output: one line per secret; show's line holds the value, as az's table does.
    table = subprocess.run(
        [str(KAGI_BIN), *secret_cmd("list", v), "--server", kagi.base, "--data-dir", str(kagi.data_dir)],
        capture_output=True, text=True, timeout=60,
    )
    assert table.returncode == 0 and len(table.stdout.strip().splitlines()) == 2, table.stdout


def test_cli_secret_delete_recover_purge(kagi, cli_vault):
    v = cli_vault
    cli(kagi, *secret_cmd("set", v, "--name", "gone", "--value", "v1"))
    cli(kagi, *secret_cmd("set", v, "--name", "back", "--value", "v2"))

    d = cli(kagi, *secret_cmd("delete", v, "--name", "back"))
    assert d["recoveryId"].endswith("/deletedsecrets/back") and "scheduledPurgeDate" in d
    cli(kagi, *secret_cmd("delete", v, "--name", "gone"))

    def deleted():
        out = cli(kagi, *secret_cmd("list-deleted", v))
        assert sorted(i["recoveryId"].rsplit("/", 1)[1] for i in out["value"]) == ["back", "gone"], out
    retry(deleted)
    assert cli(kagi, *secret_cmd("list", v))["value"] == []

    rec = cli(kagi, *secret_cmd("recover", v, "--name", "back"))
    assert rec["id"].split("/secrets/")[1].startswith("back")
    assert cli(kagi, *secret_cmd("show", v, "--name", "back"))["value"] == "v2"

    assert cli(kagi, *secret_cmd("purge", v, "--name", "gone")) == {"name": "gone", "purged": True}

    def purged():
        out = cli(kagi, *secret_cmd("list-deleted", v))
        assert out["value"] == [], out
    retry(purged)
    # A purged name can be set again from scratch.
    assert cli(kagi, *secret_cmd("set", v, "--name", "gone", "--value", "new"))["value"] == "new"


def test_cli_secret_errors(kagi, cli_vault):
    v = cli_vault
    p = cli(kagi, *secret_cmd("show", v, "--name", "missing"), check=False)
    assert p.returncode != 0 and p.stdout == ""
    assert "A secret with (name/id) missing was not found in this key vault." in p.stderr, p.stderr
    p = cli(kagi, *secret_cmd("delete", v, "--name", "missing"), check=False)
    assert p.returncode != 0 and "missing" in p.stderr
    # The server answers an empty list for the versions of a name it does not hold.
    assert cli(kagi, *secret_cmd("versions", v, "--name", "missing"))["value"] == []
    p = cli(kagi, *secret_cmd("recover", v, "--name", "missing"), check=False)
    assert p.returncode != 0 and "missing" in p.stderr
    p = cli(kagi, *secret_cmd("purge", v, "--name", "missing"), check=False)
    assert p.returncode != 0 and "missing" in p.stderr
    # --value and --file: one of them, not both; a missing file is the CLI's error, nothing sent.
    p = cli(kagi, *secret_cmd("set", v, "--name", "x"), check=False)
    assert p.returncode != 0
    p = cli(kagi, *secret_cmd("set", v, "--name", "x", "--value", "a", "--file", "/etc/hostname"), check=False)
    assert p.returncode != 0
    p = cli(kagi, *secret_cmd("set", v, "--name", "x", "--file", "/nonexistent/file"), check=False)
    assert p.returncode != 0 and "/nonexistent/file" in p.stderr
    p = cli(kagi, *secret_cmd("set", v, "--name", "x", "--value", "a", "--expires", "soon"), check=False)
    assert p.returncode != 0 and "soon" in p.stderr
    p = cli(kagi, *secret_cmd("set", v, "--name", "x", "--value", "a", "--tags", "novalue"), check=False)
    assert p.returncode != 0
    assert cli(kagi, *secret_cmd("list", v))["value"] == []


def test_cli_set_policy_and_delete_policy_are_effective(kagi, cli_vault):
    v = cli_vault
    cli(kagi, *secret_cmd("set", v, "--name", "shared", "--value", "s3cret"))
    sp = cli(kagi, "identity", "sp", "create", "--name", random_name("sp", 12))
    oid = sp["objectId"]
    client = kagi.secret_client(kagi.vault_url(v), credential=sp_credential(kagi, sp))

    with pytest.raises(HttpResponseError) as e:
        client.get_secret("shared")
    assert e.value.status_code == 403

    out = cli(kagi, "keyvault", "set-policy", "--name", v, "--object-id", oid, "--secret-permissions", "get", "list")
    entry = [p for p in out["properties"]["accessPolicies"] if p["objectId"] == oid]
    assert entry and entry[0]["permissions"]["secrets"] == ["get", "list"], out
    assert client.get_secret("shared").value == "s3cret"
    with pytest.raises(HttpResponseError) as e:
        client.set_secret("other", "x")
    assert e.value.status_code == 403

    # A second set-policy replaces the kinds it names and keeps the others (az's rule).
    out = cli(kagi, "keyvault", "set-policy", "--name", v, "--object-id", oid, "--resource-group", DEFAULT_RG,
              "--key-permissions", "get")
    entry = [p for p in out["properties"]["accessPolicies"] if p["objectId"] == oid]
    assert len(entry) == 1 and entry[0]["permissions"] == {"keys": ["get"], "secrets": ["get", "list"]}, out
    out = cli(kagi, "keyvault", "set-policy", "--name", v, "--object-id", oid, "--secret-permissions", "set")
    entry = [p for p in out["properties"]["accessPolicies"] if p["objectId"] == oid]
    assert entry[0]["permissions"]["secrets"] == ["set"]
    with pytest.raises(HttpResponseError) as e:
        client.get_secret("shared")
    assert e.value.status_code == 403
    client.set_secret("other", "x")
    cli(kagi, "keyvault", "set-policy", "--name", v, "--object-id", oid, "--secret-permissions", "get")
    assert client.get_secret("shared").value == "s3cret"

    out = cli(kagi, "keyvault", "delete-policy", "--name", v, "--object-id", oid)
    assert all(p["objectId"] != oid for p in out["properties"]["accessPolicies"]), out
    with pytest.raises(HttpResponseError) as e:
        client.get_secret("shared")
    assert e.value.status_code == 403

    # Nothing left to delete; no permission flag; an unknown permission (the server's 400).
    p = cli(kagi, "keyvault", "delete-policy", "--name", v, "--object-id", oid, check=False)
    assert p.returncode != 0 and oid in p.stderr
    p = cli(kagi, "keyvault", "set-policy", "--name", v, "--object-id", oid, check=False)
    assert p.returncode != 0 and "--secret-permissions" in p.stderr
    p = cli(kagi, "keyvault", "set-policy", "--name", v, "--object-id", oid, "--secret-permissions", "fly", check=False)
    assert p.returncode != 0 and "fly" in p.stderr


def test_cli_set_policy_refused_on_an_rbac_vault(kagi):
    name = random_name("cr", 16)
    cli(kagi, *vault_create(name), "--enable-rbac-authorization")
    sp = cli(kagi, "identity", "sp", "create", "--name", random_name("sp", 12))
    p = cli(kagi, "keyvault", "set-policy", "--name", name, "--object-id", sp["objectId"],
            "--secret-permissions", "get", check=False)
    assert p.returncode != 0 and "enable-rbac-authorization" in p.stderr, p.stderr
    p = cli(kagi, "keyvault", "delete-policy", "--name", name, "--object-id", sp["objectId"], check=False)
    assert p.returncode != 0 and "enable-rbac-authorization" in p.stderr, p.stderr


def test_arm_access_policy_operations(kagi, cli_vault):
    """`PUT …/vaults/{name}/accessPolicies/{add|replace|remove}` with Azure's semantics."""
    v = cli_vault
    oid = create_sp(kagi)["objectId"]

    def put(kind, perms, vault=v):
        body = {"properties": {"accessPolicies": [{"tenantId": kagi.tenant_id, "objectId": oid, "permissions": perms}]}}
        return kagi.request("PUT", kagi.arm(f"{kagi.vault_path(DEFAULT_RG, vault)}/accessPolicies/{kind}"), json=body)

    def mine():
        r = kagi.get_vault(v)
        return [p for p in r.json()["properties"]["accessPolicies"] if p["objectId"] == oid]

    r = put("add", {"keys": ["get"]})
    assert r.status_code == 200, r.text
    assert r.json()["type"] == "Microsoft.KeyVault/vaults/accessPolicies" and r.json()["name"] == "add"
    assert put("add", {"keys": ["Get", "wrapKey"], "secrets": ["get"]}).status_code == 200
    assert mine()[0]["permissions"] == {"keys": ["get", "wrapKey"], "secrets": ["get"]}
    assert put("remove", {"keys": ["get"]}).status_code == 200
    assert mine()[0]["permissions"] == {"keys": ["wrapKey"], "secrets": ["get"]}
    assert put("replace", {"secrets": ["list"]}).status_code == 200
    assert mine()[0]["permissions"] == {"secrets": ["list"]}
    assert put("remove", {"secrets": ["list"]}).status_code == 200
    assert mine() == []

    r = put("merge", {"keys": ["get"]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "BadRequest", r.text
    r = put("add", {"keys": ["fly"]})
    assert r.status_code == 400, r.text
    r = put("add", {"keys": ["get"]}, vault=random_name("nx", 16))
    assert r.status_code == 404 and r.json()["error"]["code"] == "ResourceNotFound", r.text


def test_backup_vault_credentials_print_json(kagi, tmp_path):
    bv = random_name("bv", 12)
    cli(kagi, "backup", "vault", "create", "--vault", bv, "--resource-group", DEFAULT_RG, "--location", LOCATION)
    out = tmp_path / "creds.VaultCredentials"
    written = cli(kagi, "backup", "vault", "credentials", "--vault", bv, "--resource-group", DEFAULT_RG,
                  "--out", str(out))
    assert written["vaultName"] == bv and written["file"] == str(out) and written["expiresOn"], written
    assert set(written) == {"vaultName", "file", "expiresOn"}, "the credentials stay in the file"
    assert json.loads(out.read_text())["vaultName"] == bv


def test_audit_export_prints_json(kagi, tmp_path):
    out = tmp_path / "audit.jsonl"
    written = cli(kagi, "audit", "export", "--file", str(out))
    assert written["file"] == str(out) and written["records"] == len(out.read_text().splitlines()) > 0, written


def test_bench_honours_output_json(kagi):
    out = cli(kagi, "bench", "--sizes", "2048", "--seconds", "1", "--concurrency", "1")
    assert out["seconds"] == 1 and out["results"][0]["bits"] == 2048, out
