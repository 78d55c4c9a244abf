"""The `kagi` command-line interface (az-keyvault-like). Flag names live in ONE place: `cli()` and the
small builders below, so a rename is a one-line change."""

import json
import subprocess

import pytest

from conftest import DEFAULT_RG, KAGI_BIN, LOCATION, random_name

pytestmark = pytest.mark.cli


def cli(srv, *args, check=True, timeout=120):
    """Run `kagi <args> --server URL --data-dir DIR --output json`; return parsed JSON (or None if no stdout)."""
    cmd = [str(KAGI_BIN), *args, "--server", srv.base, "--data-dir", str(srv.data_dir), "--output", "json"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        pytest.fail(
            f"command failed ({p.returncode}): {' '.join(cmd)}\n--- stdout\n{p.stdout[-2000:]}\n"
            f"--- stderr\n{p.stderr[-2000:]}",
            pytrace=False,
        )
    if not check:
        return p
    out = p.stdout.strip()
    if not out:
        return None
    try:
        return json.loads(out)
    except ValueError:
        pytest.fail(f"`{' '.join(cmd)}` did not print JSON:\n{out[:2000]}", pytrace=False)


# --- command builders (adjust flag names here) ------------------------------------------------------------


def vault_create(name, rg=DEFAULT_RG):
    return ["keyvault", "create", "--name", name, "--resource-group", rg, "--location", LOCATION]


def vault_show(name, rg=DEFAULT_RG):
    return ["keyvault", "show", "--name", name, "--resource-group", rg]


def vault_list(rg=DEFAULT_RG):
    return ["keyvault", "list", "--resource-group", rg]


def vault_delete(name, rg=DEFAULT_RG):
    return ["keyvault", "delete", "--name", name, "--resource-group", rg]


def vault_recover(name, rg=DEFAULT_RG):
    return ["keyvault", "recover", "--name", name, "--resource-group", rg, "--location", LOCATION]


def vault_purge(name):
    return ["keyvault", "purge", "--name", name, "--location", LOCATION]


def key_cmd(verb, vault, *extra):
    return ["keyvault", "key", verb, "--vault-name", vault, *extra]


def as_list(out):
    if isinstance(out, dict) and "value" in out:
        return out["value"]
    assert isinstance(out, list), out
    return out


# --- tests ------------------------------------------------------------------------------------------------


def test_cli_vault_lifecycle(kagi):
    name = random_name("cli", 16)
    out = cli(kagi, *vault_create(name))
    assert out["name"] == name
    assert out["properties"]["vaultUri"] == f"https://{name}.localhost:{kagi.port}/"
    assert out["type"] == "Microsoft.KeyVault/vaults"

    shown = cli(kagi, *vault_show(name))
    assert shown["properties"]["vaultUri"] == out["properties"]["vaultUri"]
    # visible through the management API as well
    assert kagi.get_vault(name).status_code == 200

    assert name in [v["name"] for v in as_list(cli(kagi, *vault_list()))]

    cli(kagi, *vault_delete(name))
    assert cli(kagi, *vault_show(name), check=False).returncode != 0
    assert kagi.get_deleted_vault(name).status_code == 200

    cli(kagi, *vault_recover(name))
    assert cli(kagi, *vault_show(name))["name"] == name

    cli(kagi, *vault_delete(name))
    cli(kagi, *vault_purge(name))
    assert kagi.get_deleted_vault(name).status_code == 404
    assert cli(kagi, *vault_recover(name), check=False).returncode != 0


def test_cli_errors_exit_nonzero(kagi):
    p = cli(kagi, *vault_show(random_name("nx", 16)), check=False)
    assert p.returncode != 0
    assert p.stderr.strip(), "an error should be explained on stderr"
    p = cli(kagi, *vault_create("1-invalid_name"), check=False)
    assert p.returncode != 0


def test_cli_key_lifecycle(kagi, tmp_path):
    vname = random_name("cli", 16)
    vault_uri = cli(kagi, *vault_create(vname))["properties"]["vaultUri"]

    created = cli(kagi, *key_cmd("create", vname, "--name", "k", "--kty", "RSA", "--size", "2048"))
    kid = created["key"]["kid"]
    assert kid.startswith(f"{vault_uri}keys/k/")
    v1 = kid.rsplit("/", 1)[1]
    assert len(v1) == 32
    assert created["key"]["kty"] == "RSA"
    assert created["attributes"]["enabled"] is True

    # the SDK sees what the CLI made
    sdk = kagi.key_client(vault_uri)
    assert sdk.get_key("k").id == kid

    listed = as_list(cli(kagi, *key_cmd("list", vname)))
    assert [item["kid"] for item in listed] == [f"{vault_uri}keys/k"]

    shown = cli(kagi, *key_cmd("show", vname, "--name", "k"))
    assert shown["key"]["kid"] == kid
    assert shown["key"]["n"] == created["key"]["n"]

    rotated = cli(kagi, *key_cmd("rotate", vname, "--name", "k"))
    v2 = rotated["key"]["kid"].rsplit("/", 1)[1]
    assert v2 != v1
    assert cli(kagi, *key_cmd("show", vname, "--name", "k"))["key"]["kid"].endswith("/" + v2)
    versions = as_list(cli(kagi, *key_cmd("versions", vname, "--name", "k")))
    assert sorted(item["kid"].rsplit("/", 1)[1] for item in versions) == sorted([v1, v2])

    backup = tmp_path / "k.backup"
    cli(kagi, *key_cmd("backup", vname, "--name", "k", "--file", str(backup)))
    assert backup.exists() and backup.stat().st_size > 64

    deleted = cli(kagi, *key_cmd("delete", vname, "--name", "k"))
    assert deleted["recoveryId"] == f"{vault_uri}deletedkeys/k"
    assert cli(kagi, *key_cmd("show", vname, "--name", "k"), check=False).returncode != 0

    recovered = cli(kagi, *key_cmd("recover", vname, "--name", "k"))
    assert recovered["key"]["kid"].endswith("/" + v2)
    assert sdk.get_key("k").properties.version == v2

    cli(kagi, *key_cmd("delete", vname, "--name", "k"))
    cli(kagi, *key_cmd("purge", vname, "--name", "k"))
    assert [d.name for d in sdk.list_deleted_keys()] == []

    restored = cli(kagi, *key_cmd("restore", vname, "--file", str(backup)))
    assert restored["key"]["kid"] == f"{vault_uri}keys/k/{v2}"
    assert sorted(p.version for p in sdk.list_properties_of_key_versions("k")) == sorted([v1, v2])


def test_cli_ec_key(kagi):
    vname = random_name("cli", 16)
    cli(kagi, *vault_create(vname))
    out = cli(kagi, *key_cmd("create", vname, "--name", "e", "--kty", "EC", "--curve", "P-384"))
    assert out["key"]["kty"] == "EC"
    assert out["key"]["crv"] == "P-384"
    bad = cli(kagi, *key_cmd("create", vname, "--name", "r", "--kty", "RSA", "--size", "1024"), check=False)
    assert bad.returncode != 0


def test_output_into_a_closed_pipe_ends_quietly(kagi):
    """`kagi … | head` : when the reader has gone, kagi stops with SIGPIPE's status (141), without
    a panic message."""
    srv = kagi
    srv.put_rg(DEFAULT_RG)
    name = random_name("pipe", 12)
    cli(srv, *vault_create(name))
    cmd = [str(KAGI_BIN), "keyvault", "list", "--server", srv.base, "--data-dir", str(srv.data_dir),
           "--output", "json"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()  # the reader is gone before kagi writes
    _, err = p.communicate(timeout=120)
    assert b"panicked" not in err, err.decode(errors="replace")
    assert p.returncode == 141, (p.returncode, err.decode(errors="replace"))
