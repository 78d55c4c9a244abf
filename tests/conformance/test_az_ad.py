"""The real az CLI's `az ad app` and `az ad sp create|create-for-rbac` against kagi's Microsoft
Graph applications (docs/AZ_CLI.md): an application and its service principal are one kagi
service principal; its one password is kept as a hash and shown once. Each new credential is
then used the way a user would: `az login --service-principal` with it.
"""

from __future__ import annotations

import pytest

from az_helpers import Az
from conftest import create_sp, random_name, sp_token
from test_az_cli import az, rg  # noqa: F401  (fixtures)
from test_az_endpoints import graph
from test_cli import cli

pytestmark = pytest.mark.az

KV_READER = "Key Vault Reader"


def login_as(kagi, tmp_path, app_id: str, password: str, expect: int = 0) -> Az:
    """A fresh az signed in as the application, or failing to (`expect` 1)."""
    other = Az(kagi, tmp_path / f"az-{random_name('cfg', 8)}")
    other.run("cloud", "register", "--name", "kagi", "--endpoint-resource-manager", f"{kagi.base}/")
    other.run("cloud", "set", "--name", "kagi")
    other.run("login", "--service-principal", "--username", app_id, "--password", password,
              "--tenant", kagi.tenant_id, "--allow-no-subscriptions", expect=expect)
    return other


def everything_the_server_wrote(kagi, tmp_path) -> str:
    """The server's log, its audit records and every file of its data directory, as text."""
    out = tmp_path / "audit.jsonl"
    cli(kagi, "audit", "export", "--file", str(out))
    parts = [out.read_bytes(), kagi.log_path.read_bytes()]
    parts += [p.read_bytes() for p in kagi.data_dir.rglob("*") if p.is_file()]
    return b"\n".join(parts).decode("utf-8", "replace")


def test_create_for_rbac_then_login_with_it(kagi, az, rg, tmp_path):
    name = random_name("azapp", 14)
    scope = f"/subscriptions/{kagi.subscription_id}/resourceGroups/{rg}"
    out = az.json("ad", "sp", "create-for-rbac", "--name", name, "--role", KV_READER, "--scopes", scope)
    assert out["displayName"] == name and out["tenant"] == kagi.tenant_id, out
    app_id, password = out["appId"], out["password"]
    assert password and len(password) >= 40, out

    app = az.json("ad", "app", "show", "--id", app_id)
    assert app["appId"] == app_id and app["displayName"] == name, app
    assert len(app["passwordCredentials"]) == 1 and app["passwordCredentials"][0]["secretText"] is None, app
    sp = az.json("ad", "sp", "show", "--id", app_id)
    assert sp["appId"] == app_id and sp["servicePrincipalType"] == "Application", sp
    # The role assignment went through kagi's role assignments, at the scope asked.
    assigned = az.json("role", "assignment", "list", "--assignee", app_id, "--scope", scope)
    assert [(a["roleDefinitionName"], a["scope"].lower()) for a in assigned] == [(KV_READER, scope.lower())], assigned

    # The new credential signs in, and what it may do is what the role gives it.
    other = login_as(kagi, tmp_path, app_id, password)
    me = other.json("account", "show")
    assert me["user"] == {"name": app_id, "type": "servicePrincipal"}, me
    # A reader of the group is no directory administrator: Graph refuses it.
    err = other.fails("ad", "app", "list", expect=1)
    assert "403" in err or "Forbidden" in err or "authorization" in err.lower(), err

    # Run again with the same name: the same application, a new password; the old one stops.
    again = az.json("ad", "sp", "create-for-rbac", "--name", name)
    assert again["appId"] == app_id and again["password"] != password, again
    login_as(kagi, tmp_path, app_id, password, expect=1)
    login_as(kagi, tmp_path, app_id, again["password"])

    # The secrets were shown once: not in the log, the audit records or the data directory.
    written = everything_the_server_wrote(kagi, tmp_path)
    assert password not in written and again["password"] not in written

    az.run("ad", "app", "delete", "--id", app_id)
    assert az.fails("ad", "sp", "show", "--id", app_id, expect=3)
    login_as(kagi, tmp_path, app_id, again["password"], expect=1)


def test_app_create_sp_create_credential_reset(kagi, az, tmp_path):
    name = random_name("azapp", 14)
    app = az.json("ad", "app", "create", "--display-name", name)
    app_id = app["appId"]
    # An application starts without a password.
    assert app["displayName"] == name and app["passwordCredentials"] == [], app
    listed = az.json("ad", "app", "list", "--display-name", name)
    assert [a["appId"] for a in listed] == [app_id], listed
    assert [a["id"] for a in az.json("ad", "app", "list", "--app-id", app_id)] == [app["id"]]

    sp = az.json("ad", "sp", "create", "--id", app_id)
    assert sp["appId"] == app_id and sp["displayName"] == name, sp
    assert az.json("ad", "sp", "show", "--id", app_id)["id"] == sp["id"]

    reset = az.json("ad", "app", "credential", "reset", "--id", app_id)
    assert reset["appId"] == app_id and reset["password"], reset
    other = login_as(kagi, tmp_path, app_id, reset["password"])
    assert other.json("account", "show")["user"]["name"] == app_id
    creds = az.json("ad", "app", "credential", "list", "--id", app_id)
    assert len(creds) == 1 and creds[0]["keyId"], creds

    # A second reset replaces the password: the first stops working.
    second = az.json("ad", "app", "credential", "reset", "--id", app_id)
    login_as(kagi, tmp_path, app_id, reset["password"], expect=1)
    login_as(kagi, tmp_path, app_id, second["password"])

    # Removing the password leaves the application without one.
    az.run("ad", "app", "credential", "delete", "--id", app_id, "--key-id",
           az.json("ad", "app", "credential", "list", "--id", app_id)[0]["keyId"])
    assert az.json("ad", "app", "credential", "list", "--id", app_id) == []
    login_as(kagi, tmp_path, app_id, second["password"], expect=1)

    az.run("ad", "app", "delete", "--id", app_id)
    assert az.json("ad", "app", "list", "--display-name", name) == []


def test_ad_sp_create_for_an_unknown_application(kagi, az):
    r = graph(kagi, "POST", "/servicePrincipals", json={"appId": "00000000-0000-0000-0000-000000000001"})
    assert r.status_code == 400 and r.json()["error"]["innererror"]["code"] == "Request_BadRequest", r.text


def test_applications_need_the_directory_administrator(kagi):
    sp = create_sp(kagi)
    tok = sp_token(kagi, sp)
    app = graph(kagi, "POST", "/applications", json={"displayName": random_name("app", 10)})
    assert app.status_code == 201, app.text
    app_id = app.json()["id"]
    for method, path, body in (
        ("GET", "/applications", None),
        ("POST", "/applications", {"displayName": "x"}),
        ("GET", f"/applications/{app_id}", None),
        ("PATCH", f"/applications/{app_id}", {"displayName": "x"}),
        ("DELETE", f"/applications/{app_id}", None),
        ("POST", f"/applications/{app_id}/addPassword", {}),
        ("POST", f"/applications/{app_id}/removePassword", {"keyId": app_id}),
    ):
        r = graph(kagi, method, path, token=tok, json=body)
        assert r.status_code == 403, (method, path, r.status_code, r.text[:300])
        r = kagi.request(method, f"{kagi.base}/v1.0{path}", auth=False, json=body)
        assert r.status_code == 401, (method, path, r.status_code)
    # Properties kagi cannot keep are refused, not dropped; so is a rename.
    for body in ({"displayName": "a", "identifierUris": ["api://x"]}, {"keyCredentials": []}, {"displayName": ""}):
        r = graph(kagi, "POST", "/applications", json=body)
        assert r.status_code == 400 and r.json()["error"]["innererror"]["code"] == "Request_BadRequest", r.text
    r = graph(kagi, "PATCH", f"/applications/{app_id}", json={"displayName": "renamed"})
    assert r.status_code == 400, r.text
    other = sp["objectId"][:-1] + ("1" if sp["objectId"].endswith("0") else "0")
    assert graph(kagi, "GET", f"/applications/{other}").status_code in (400, 404)
    assert graph(kagi, "DELETE", f"/applications/{app_id}").status_code == 204
    assert graph(kagi, "GET", f"/applications/{app_id}").status_code == 404


def test_sp_commands_on_an_application(kagi, az, tmp_path):
    name = random_name("azapp", 14)
    out = az.json("ad", "sp", "create-for-rbac", "--name", name)
    app_id = out["appId"]
    # `az ad sp credential reset` resets the application's password.
    reset = az.json("ad", "sp", "credential", "reset", "--id", app_id)
    assert reset["appId"] == app_id and reset["password"] != out["password"], reset
    login_as(kagi, tmp_path, app_id, reset["password"])
    login_as(kagi, tmp_path, app_id, out["password"], expect=1)
    # An update that changes nothing kagi keeps succeeds; a certificate is refused, not dropped.
    az.run("ad", "app", "update", "--id", app_id, "--display-name", name)
    err = az.fails("ad", "sp", "create-for-rbac", "--name", random_name("azapp", 14), "--create-cert", expect=1)
    assert "not supported" in err, err
    az.run("ad", "sp", "delete", "--id", app_id)
    assert az.json("ad", "app", "list", "--app-id", app_id) == []
