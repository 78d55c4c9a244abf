"""Identities and access control (issue 4), through the unmodified Azure SDK for Python where a client
would use it: service principals, managed identities (App Service and IMDS endpoint styles,
DefaultAzureCredential, user-assigned selection), ID-1 (a system-assigned identity in use cannot be
turned off), changes taking effect on the next request, the vault firewall, management locks, role
assignment validation and custom roles.

Managed-identity clients run in a SUBPROCESS with a controlled environment (the variables printed by
`kagi identity env`), so that no AZURE_*/IDENTITY_* variable leaks into the test process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from typing import Dict, Optional

import pytest
import requests
from azure.core.exceptions import ClientAuthenticationError, HttpResponseError
from azure.keyvault.keys.crypto import KeyWrapAlgorithm

from conftest import (
    AUTHZ_API,
    DATA_API,
    IDENTITY_API,
    KAGI_BIN,
    LOCATION,
    LOCKS_API,
    KagiServer,
    assert_error_shape,
    assign_role,
    b64url_decode,
    create_sp,
    delete_sp,
    inner_code,
    put_role_assignment,
    random_name,
    sp_credential,
    sp_token,
    update_vault_properties,
)

CRYPTO_USER = "12338af0-0e69-4776-bea7-57ae8d297424"
CSEU = "e147488a-f6f5-4113-8e2d-b22465e65bf6"
KEY_ADMIN_PERMS = ["get", "list", "create", "delete", "wrapKey", "unwrapKey"]


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def claims_of(token: str) -> dict:
    return json.loads(b64url_decode(token.split(".")[1]))


def http_error(exc: HttpResponseError) -> dict:
    body = exc.response.json()
    assert isinstance(body.get("error"), dict), body
    return body["error"]


def policy(srv: KagiServer, oid: str, keys=("get", "list"), secrets=()) -> dict:
    return {"tenantId": srv.tenant_id, "objectId": oid, "permissions": {"keys": list(keys), "secrets": list(secrets)}}


def set_policies(srv: KagiServer, vault, policies) -> None:
    r = update_vault_properties(srv, vault, accessPolicies=policies)
    assert r.status_code == 200, f"vault PUT (accessPolicies): {r.status_code} {r.text[:400]}"
    assert len(r.json()["properties"]["accessPolicies"]) == len(policies), r.text[:600]


def resource_path(srv: KagiServer, rg: str, rtype: str, name: str) -> str:
    return f"/subscriptions/{srv.subscription_id}/resourceGroups/{rg}/providers/{rtype}/{name}"


def put_uami(srv: KagiServer, rg: str, name: Optional[str] = None) -> dict:
    path = resource_path(srv, rg, "Microsoft.ManagedIdentity/userAssignedIdentities", name or random_name("uami", 12))
    r = srv.request("PUT", srv.arm(path, IDENTITY_API), json={"location": LOCATION})
    assert r.status_code == 201, f"UAMI PUT: {r.status_code} {r.text[:400]}"
    body = r.json()
    assert body["type"] == "Microsoft.ManagedIdentity/userAssignedIdentities", body
    assert body["id"].lower() == path.lower(), body
    props = body["properties"]
    assert props["tenantId"] == srv.tenant_id, body
    uuid.UUID(props["principalId"]), uuid.UUID(props["clientId"])
    return body


def workload_path(srv: KagiServer, rg: str, name: str) -> str:
    return resource_path(srv, rg, "Kagi.Compute/workloads", name)


def put_workload_raw(srv: KagiServer, rg: str, name: str, identity: Optional[dict]) -> requests.Response:
    body = {"location": LOCATION}
    if identity is not None:
        body["identity"] = identity
    return srv.request("PUT", srv.arm(workload_path(srv, rg, name), IDENTITY_API), json=body)


def put_workload(srv: KagiServer, rg: str, name: str, identity: dict) -> dict:
    r = put_workload_raw(srv, rg, name, identity)
    assert r.status_code in (200, 201), f"workload PUT: {r.status_code} {r.text[:400]}"
    return r.json()


def identity_env(srv: KagiServer, resource_id: str, client_id: Optional[str] = None, check: bool = True):
    """`kagi identity env --resource ID [--client-id ID]`: the printed KEY=VALUE lines as a dict."""
    cmd = [str(KAGI_BIN), "identity", "env", "--resource", resource_id, "--server", srv.base, "--data-dir", str(srv.data_dir)]
    if client_id:
        cmd += ["--client-id", client_id]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if not check:
        return p
    assert p.returncode == 0, f"{' '.join(cmd)} failed ({p.returncode}): {p.stderr[-1000:]}"
    env = dict(line.split("=", 1) for line in p.stdout.strip().splitlines() if "=" in line)
    assert {"IDENTITY_ENDPOINT", "IDENTITY_HEADER", "AZURE_POD_IDENTITY_AUTHORITY_HOST"} <= set(env), p.stdout
    return env


def child_env(srv: KagiServer, printed: Dict[str, str], style: str) -> Dict[str, str]:
    """A clean environment for a process acting as the workload: App Service style or IMDS style."""
    env = {
        k: v for k, v in os.environ.items() if not k.upper().startswith(("AZURE_", "IDENTITY_", "MSI_", "IMDS_"))
    }
    env["REQUESTS_CA_BUNDLE"] = env["SSL_CERT_FILE"] = str(srv.ca_path)
    extra = dict(printed)
    if style == "imds":
        extra.pop("IDENTITY_ENDPOINT", None)
        extra.pop("IDENTITY_HEADER", None)
    else:
        assert style == "appservice", style
        extra.pop("AZURE_POD_IDENTITY_AUTHORITY_HOST", None)
    env.update(extra)
    return env


# The program a workload runs: only the unmodified SDK, end to end (token, KeyClient, CryptographyClient).
CHILD = r"""
import base64, json, os, sys
cfg = json.loads(sys.argv[1])
out = {}
try:
    from azure.identity import DefaultAzureCredential, ManagedIdentityCredential
    from azure.keyvault.keys import KeyClient
    from azure.keyvault.keys.crypto import CryptographyClient, KeyWrapAlgorithm
    if cfg["credential"] == "default":
        cred = DefaultAzureCredential()
    elif cfg.get("client_id"):
        cred = ManagedIdentityCredential(client_id=cfg["client_id"])
    else:
        cred = ManagedIdentityCredential()
    tok = cred.get_token(cfg["scope"]).token
    p = tok.split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(p + "=" * (-len(p) % 4)))
    out.update(oid=claims.get("oid"), appid=claims.get("appid"), tid=claims.get("tid"), aud=claims.get("aud"))
    if cfg.get("vault_url"):
        kc = KeyClient(cfg["vault_url"], cred, retry_total=0)
        key = kc.get_key(cfg["key_name"])
        out["key_id"] = key.id
        crypto = CryptographyClient(key.id, cred, retry_total=0)
        dek = os.urandom(32)
        wrapped = crypto.wrap_key(KeyWrapAlgorithm.rsa_oaep_256, dek)
        out["unwrap_ok"] = crypto.unwrap_key(KeyWrapAlgorithm.rsa_oaep_256, wrapped.encrypted_key).key == dek
except Exception as e:
    out["error"] = type(e).__name__
    out["message"] = str(e)[:1500]
print(json.dumps(out))
"""


def run_child(srv: KagiServer, env: Dict[str, str], credential: str = "managed", client_id=None, vault=None, key=None):
    cfg = {"credential": credential, "client_id": client_id, "scope": srv.scope}
    if vault is not None:
        cfg.update(vault_url=vault.url, key_name=key)
    p = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(cfg)], env=env, capture_output=True, text=True, timeout=180
    )
    assert p.returncode == 0, f"child failed ({p.returncode}):\n{p.stderr[-3000:]}"
    lines = [line for line in p.stdout.strip().splitlines() if line.startswith("{")]
    assert lines, f"child printed no JSON:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}"
    return json.loads(lines[-1])


def msi_token(srv: KagiServer, header: str, client_id: Optional[str] = None) -> requests.Response:
    """A raw App Service style managed-identity token request."""
    params = {"api-version": "2019-08-01", "resource": srv.base}
    if client_id:
        params["client_id"] = client_id
    return requests.get(
        f"{srv.base}/msi/token", params=params, headers={"X-IDENTITY-HEADER": header}, verify=str(srv.ca_path), timeout=30
    )


def principal_ids(srv: KagiServer) -> set:
    r = srv.request("GET", f"{srv.base}/v1.0/servicePrincipals")
    assert r.status_code == 200, r.text[:300]
    return {p["objectId"] for p in r.json()["value"]}


def raw_get_key(srv: KagiServer, vault, name: str, token: str) -> requests.Response:
    return requests.get(
        vault.data_url(f"/keys/{name}"), headers={"Authorization": f"Bearer {token}"}, verify=str(srv.ca_path), timeout=30
    )


@pytest.fixture
def rg(kagi) -> str:
    name = random_name("idrg", 14)
    kagi.put_rg(name)
    return name


# ---------------------------------------------------------------------------------------------
# service principals
# ---------------------------------------------------------------------------------------------


def test_service_principal_lifecycle(kagi, vault):
    sp = create_sp(kagi, "lifecycle app")
    for k in ("objectId", "clientId", "clientSecret", "tenantId", "displayName", "principalType"):
        assert sp.get(k), (k, sp)
    uuid.UUID(sp["objectId"]), uuid.UUID(sp["clientId"])
    assert sp["tenantId"] == kagi.tenant_id and sp["displayName"] == "lifecycle app", sp
    assert sp["objectId"] != sp["clientId"]
    listed = {p["objectId"]: p for p in kagi.request("GET", f"{kagi.base}/v1.0/servicePrincipals").json()["value"]}
    assert sp["objectId"] in listed and "clientSecret" not in listed[sp["objectId"]], listed.get(sp["objectId"])

    vault.client.create_rsa_key("sp-key", size=2048)
    set_policies(kagi, vault, [policy(kagi, sp["objectId"], keys=KEY_ADMIN_PERMS)])

    # use it: the unmodified SDK with a ClientSecretCredential
    cred = sp_credential(kagi, sp)
    client = kagi.key_client(vault.url, credential=cred)
    assert client.get_key("sp-key").name == "sp-key"
    created = client.create_ec_key("by-sp")
    crypto = kagi.crypto_client(client.get_key("sp-key").id, credential=cred)
    dek = os.urandom(32)
    wrapped = crypto.wrap_key(KeyWrapAlgorithm.rsa_oaep_256, dek)
    assert crypto.unwrap_key(KeyWrapAlgorithm.rsa_oaep_256, wrapped.encrypted_key).key == dek
    tok = cred.get_token(kagi.scope).token
    c = claims_of(tok)
    assert c["oid"] == sp["objectId"] and c["appid"] == sp["clientId"] and c["tid"] == kagi.tenant_id, c
    assert created.name == "by-sp"

    # addPassword: a new secret; the old one stops working for new tokens
    r = kagi.request("POST", f"{kagi.base}/v1.0/servicePrincipals/{sp['objectId']}/addPassword", json={})
    assert r.status_code == 200, r.text[:300]
    new_secret = r.json()["clientSecret"]
    assert new_secret and new_secret != sp["clientSecret"]
    with pytest.raises(ClientAuthenticationError):
        sp_credential(kagi, sp).get_token(kagi.scope)
    cred2 = sp_credential(kagi, sp, secret=new_secret)
    assert kagi.key_client(vault.url, credential=cred2).get_key("sp-key").name == "sp-key"

    # delete: the still-unexpired token is refused on the very next request, with a challenge
    assert raw_get_key(kagi, vault, "sp-key", tok).status_code == 200
    r = delete_sp(kagi, sp["objectId"])
    assert r.status_code == 204, r.text[:300]
    r = raw_get_key(kagi, vault, "sp-key", tok)
    assert_error_shape(r, 401)
    assert r.headers.get("WWW-Authenticate", "").startswith("Bearer "), dict(r.headers)
    with pytest.raises(ClientAuthenticationError):
        sp_credential(kagi, sp, secret=new_secret).get_token(kagi.scope)
    assert sp["objectId"] not in principal_ids(kagi)
    r = delete_sp(kagi, sp["objectId"])
    assert_error_shape(r, 404)
    r = kagi.request("POST", f"{kagi.base}/v1.0/servicePrincipals/{sp['objectId']}/addPassword", json={})
    assert_error_shape(r, 404)


def test_service_principal_bad_input(kagi):
    for body in ({}, {"displayName": ""}, {"displayName": "x" * 500}):
        r = kagi.request("POST", f"{kagi.base}/v1.0/servicePrincipals", json=body)
        assert_error_shape(r, 400)
    assert_error_shape(kagi.request("DELETE", f"{kagi.base}/v1.0/servicePrincipals/not-a-guid"), 400)
    assert_error_shape(kagi.request("DELETE", f"{kagi.base}/v1.0/servicePrincipals/{uuid.uuid4()}"), 404)


def test_service_principal_cannot_manage(kagi, vault):
    """Only the administrator manages identities, roles and locks; a service principal gets 403."""
    sp = create_sp(kagi)
    try:
        h = {"Authorization": f"Bearer {sp_token(kagi, sp)}"}
        r = kagi.request("POST", f"{kagi.base}/v1.0/servicePrincipals", auth=False, headers=h, json={"displayName": "x"})
        assert_error_shape(r, 403)
        r = kagi.request(
            "PUT",
            kagi.arm(f"{kagi.vault_path(vault.rg, vault.name)}/providers/Microsoft.Authorization/roleAssignments/"
                     f"{uuid.uuid4()}", AUTHZ_API),
            auth=False, headers=h,
            json={"properties": {"roleDefinitionId": f"/providers/Microsoft.Authorization/roleDefinitions/{CSEU}",
                                 "principalId": sp["objectId"]}},
        )  # fmt: skip
        assert_error_shape(r, 403)
        assert inner_code(r) == "AuthorizationFailed", r.text[:300]
    finally:
        delete_sp(kagi, sp["objectId"])


# ---------------------------------------------------------------------------------------------
# changes take effect on the next request
# ---------------------------------------------------------------------------------------------


def test_access_policy_change_takes_effect_on_next_request(kagi, vault):
    sp = create_sp(kagi)
    try:
        vault.client.create_rsa_key("ap-key", size=2048)
        client = kagi.key_client(vault.url, credential=sp_credential(kagi, sp))
        with pytest.raises(HttpResponseError) as ei:
            client.get_key("ap-key")
        assert ei.value.status_code == 403 and http_error(ei.value)["innererror"]["code"] == "ForbiddenByPolicy"

        set_policies(kagi, vault, [policy(kagi, sp["objectId"], keys=["get"])])
        assert client.get_key("ap-key").name == "ap-key"  # the very next call
        with pytest.raises(HttpResponseError) as ei:
            client.create_ec_key("not-granted")
        assert ei.value.status_code == 403 and http_error(ei.value)["innererror"]["code"] == "ForbiddenByPolicy"

        set_policies(kagi, vault, [])
        with pytest.raises(HttpResponseError) as ei:
            client.get_key("ap-key")  # the very next call
        assert ei.value.status_code == 403, ei.value
        err = http_error(ei.value)
        assert err["code"] == "Forbidden" and err["innererror"]["code"] == "ForbiddenByPolicy", err

        set_policies(kagi, vault, [policy(kagi, sp["objectId"], keys=["get"])])
        assert client.get_key("ap-key").name == "ap-key"
    finally:
        set_policies(kagi, vault, [])
        delete_sp(kagi, sp["objectId"])


def test_role_assignment_change_takes_effect_on_next_request(kagi, make_vault):
    vault = make_vault(enableRbacAuthorization=True)
    sp = create_sp(kagi)
    try:
        key = vault.client.create_rsa_key("rbac-key", size=2048)
        cred = sp_credential(kagi, sp)
        client = kagi.key_client(vault.url, credential=cred)
        with pytest.raises(HttpResponseError) as ei:
            client.get_key("rbac-key")
        assert ei.value.status_code == 403 and http_error(ei.value)["innererror"]["code"] == "ForbiddenByRbac"

        aid = assign_role(kagi, kagi.vault_path(vault.rg, vault.name), CRYPTO_USER, sp["objectId"])
        assert client.get_key("rbac-key").id == key.id
        crypto = kagi.crypto_client(key.id, credential=cred)
        dek = os.urandom(32)
        wrapped = crypto.wrap_key(KeyWrapAlgorithm.rsa_oaep_256, dek)
        assert crypto.unwrap_key(KeyWrapAlgorithm.rsa_oaep_256, wrapped.encrypted_key).key == dek

        r = kagi.request("DELETE", kagi.arm(aid, AUTHZ_API))
        assert r.status_code == 200, r.text[:300]
        with pytest.raises(HttpResponseError) as ei:
            client.get_key("rbac-key")
        assert ei.value.status_code == 403 and http_error(ei.value)["innererror"]["code"] == "ForbiddenByRbac"
        with pytest.raises(HttpResponseError) as ei:
            crypto.unwrap_key(KeyWrapAlgorithm.rsa_oaep_256, wrapped.encrypted_key)
        assert ei.value.status_code == 403
        # deleting it again: 204, nothing there
        assert kagi.request("DELETE", kagi.arm(aid, AUTHZ_API)).status_code == 204
    finally:
        delete_sp(kagi, sp["objectId"])


# ---------------------------------------------------------------------------------------------
# managed identities
# ---------------------------------------------------------------------------------------------


class MiWorld:
    pass


@pytest.fixture(scope="module")
def mi(kagi):
    """A resource group with: a vault granting access to a workload's system-assigned identity and to
    user-assigned identity uami1; workload wl1 (SystemAssigned + uami1), workload wl2 (uami1 only), and
    uami2 assigned to neither."""
    w = MiWorld()
    w.rg = random_name("mirg", 12)
    kagi.put_rg(w.rg)
    w.uami1 = put_uami(kagi, w.rg, "uami1")
    w.uami2 = put_uami(kagi, w.rg, "uami2")
    w.wl1 = put_workload(
        kagi, w.rg, "wl1", {"type": "SystemAssigned, UserAssigned", "userAssignedIdentities": {w.uami1["id"]: {}}}
    )
    w.wl2 = put_workload(kagi, w.rg, "wl2", {"type": "UserAssigned", "userAssignedIdentities": {w.uami1["id"]: {}}})
    w.system_oid = w.wl1["identity"]["principalId"]
    uas = w.wl1["identity"]["userAssignedIdentities"]
    assert list(uas) == [w.uami1["id"]], uas
    assert uas[w.uami1["id"]] == {
        "principalId": w.uami1["properties"]["principalId"],
        "clientId": w.uami1["properties"]["clientId"],
    }, uas
    assert "principalId" not in w.wl2["identity"], w.wl2
    w.vault = kagi.create_vault(
        name=random_name("mi", 16),
        accessPolicies=[
            policy(kagi, w.system_oid, keys=["get", "wrapKey", "unwrapKey"]),
            policy(kagi, w.uami1["properties"]["principalId"], keys=["get", "wrapKey", "unwrapKey"]),
        ],
    )
    w.vault.client.create_rsa_key("mi-key", size=2048)
    w.env_system = identity_env(kagi, w.wl1["id"])
    w.env_uami = identity_env(kagi, w.wl1["id"], client_id=w.uami1["properties"]["clientId"])
    assert w.env_uami.get("AZURE_CLIENT_ID") == w.uami1["properties"]["clientId"]
    assert "AZURE_CLIENT_ID" not in w.env_system
    return w


WHO = {
    # name: (credential, use AZURE_CLIENT_ID env (from --client-id), pass client_id=uami1, expected principal)
    "ManagedIdentityCredential-system": ("managed", False, False, "system"),
    # A binding serves the one identity it was minted for (issue 11, item 12): the user-assigned
    # identity's own binding.
    "ManagedIdentityCredential-client_id": ("managed", True, True, "uami1"),
    "DefaultAzureCredential-system": ("default", False, False, "system"),
    "DefaultAzureCredential-AZURE_CLIENT_ID": ("default", True, False, "uami1"),
}


@pytest.mark.parametrize("who", list(WHO))
@pytest.mark.parametrize("style", ["appservice", "imds"])
def test_managed_identity_sdk_reaches_vault(kagi, mi, style, who):
    credential, use_env_client_id, pass_client_id, expected = WHO[who]
    printed = mi.env_uami if use_env_client_id else mi.env_system
    env = child_env(kagi, printed, style)
    client_id = mi.uami1["properties"]["clientId"] if pass_client_id else None
    out = run_child(kagi, env, credential=credential, client_id=client_id, vault=mi.vault, key="mi-key")
    assert "error" not in out, out
    want_oid = mi.system_oid if expected == "system" else mi.uami1["properties"]["principalId"]
    assert out["oid"] == want_oid, out
    assert out["tid"] == kagi.tenant_id, out
    if expected == "uami1":
        assert out["appid"] == mi.uami1["properties"]["clientId"], out
    assert out["key_id"].startswith(mi.vault.url + "keys/mi-key/"), out
    assert out["unwrap_ok"] is True, out


@pytest.mark.parametrize("style", ["appservice", "imds"])
def test_managed_identity_unassigned_client_id_fails(kagi, mi, style):
    env = child_env(kagi, mi.env_system, style)
    for cid in (mi.uami2["properties"]["clientId"], str(uuid.uuid4())):
        out = run_child(kagi, env, client_id=cid)
        assert "error" in out and "oid" not in out, out
        assert out["error"] in ("ClientAuthenticationError", "CredentialUnavailableError"), out


@pytest.mark.parametrize("style", ["appservice", "imds"])
def test_managed_identity_unknown_header_fails(kagi, mi, style):
    printed = dict(mi.env_system)
    bogus = "x" + printed["IDENTITY_HEADER"][1:] if not printed["IDENTITY_HEADER"].startswith("x") else "y" + printed["IDENTITY_HEADER"][1:]
    printed["IDENTITY_HEADER"] = bogus
    printed["AZURE_POD_IDENTITY_AUTHORITY_HOST"] = f"{kagi.base}/imds/{bogus}"
    out = run_child(kagi, child_env(kagi, printed, style))
    assert "error" in out and "oid" not in out, out


def test_managed_identity_endpoints_raw(kagi, mi):
    header = mi.env_system["IDENTITY_HEADER"]
    r = msi_token(kagi, header)
    assert r.status_code == 200, r.text[:300]
    body = r.json()
    assert body["token_type"] == "Bearer" and body["resource"] == kagi.base, body
    assert int(body["expires_on"]) > 0 and claims_of(body["access_token"])["oid"] == mi.system_oid
    # unknown header → 401; missing → 401
    assert msi_token(kagi, "nope").status_code == 401
    assert msi_token(kagi, "").status_code == 401
    # another resource than kagi → 400
    r = requests.get(f"{kagi.base}/msi/token", params={"api-version": "2019-08-01", "resource": "https://vault.azure.net"},
                     headers={"X-IDENTITY-HEADER": header}, verify=str(kagi.ca_path), timeout=30)  # fmt: skip
    assert r.status_code == 400, r.text[:300]
    # IMDS: Metadata header required
    imds = mi.env_system["AZURE_POD_IDENTITY_AUTHORITY_HOST"] + "/metadata/identity/oauth2/token"
    params = {"api-version": "2018-02-01", "resource": kagi.base}
    r = requests.get(imds, params=params, verify=str(kagi.ca_path), timeout=30)
    assert r.status_code == 400, r.text[:300]
    r = requests.get(imds, params=params, headers={"Metadata": "true"}, verify=str(kagi.ca_path), timeout=30)
    assert r.status_code == 200 and claims_of(r.json()["access_token"])["oid"] == mi.system_oid, r.text[:300]
    # The system-assigned identity's binding does not serve the user-assigned one; its own does.
    uami = {**params, "client_id": mi.uami1["properties"]["clientId"]}
    r = requests.get(imds, params=uami, headers={"Metadata": "true"}, verify=str(kagi.ca_path), timeout=30)
    assert r.status_code == 400 and "access_token" not in r.text, r.text[:300]
    imds_uami = mi.env_uami["AZURE_POD_IDENTITY_AUTHORITY_HOST"] + "/metadata/identity/oauth2/token"
    r = requests.get(imds_uami, params=uami, headers={"Metadata": "true"}, verify=str(kagi.ca_path), timeout=30)
    assert r.status_code == 200, r.text[:300]
    assert claims_of(r.json()["access_token"])["oid"] == mi.uami1["properties"]["principalId"]


def test_managed_identity_has_no_client_secret(kagi, mi):
    """Managed identities get tokens only through their workload binding, never client credentials."""
    for cid in (mi.uami1["properties"]["clientId"],):
        for secret in ("", "anything"):
            r = requests.post(
                f"{kagi.base}/{kagi.tenant_id}/oauth2/v2.0/token",
                data={"grant_type": "client_credentials", "client_id": cid, "client_secret": secret, "scope": kagi.scope},
                verify=str(kagi.ca_path), timeout=30,
            )  # fmt: skip
            assert r.status_code in (400, 401), r.text[:300]
            assert "access_token" not in r.text


def test_binding_refuses_identity_not_assigned(kagi, mi):
    p = identity_env(kagi, mi.wl1["id"], client_id=mi.uami2["properties"]["clientId"], check=False)
    assert p.returncode != 0 and "IDENTITY_HEADER" not in p.stdout, p.stdout
    r = kagi.request(
        "POST", kagi.arm(f"{mi.wl1['id']}/listIdentityEnvironment?clientId={mi.uami2['properties']['clientId']}", IDENTITY_API)
    )
    assert_error_shape(r, 400)
    r = kagi.request("POST", kagi.arm(workload_path(kagi, mi.rg, "nonexistent") + "/listIdentityEnvironment", IDENTITY_API))
    assert_error_shape(r, 404)


def test_user_assigned_identity_shared_by_two_workloads(kagi, mi):
    uami_oid = mi.uami1["properties"]["principalId"]
    uami_cid = mi.uami1["properties"]["clientId"]
    out1 = run_child(kagi, child_env(kagi, mi.env_uami, "appservice"), client_id=uami_cid)
    env2 = identity_env(kagi, mi.wl2["id"])  # wl2 has only uami1: it is the default
    out2 = run_child(kagi, child_env(kagi, env2, "imds"), credential="managed", vault=mi.vault, key="mi-key")
    assert "error" not in out1 and "error" not in out2, (out1, out2)
    assert out1["oid"] == out2["oid"] == uami_oid, (out1, out2)
    assert out2["unwrap_ok"] is True
    # a process acting as wl2 cannot get wl1's system-assigned identity
    sys_cid = claims_of(msi_token(kagi, mi.env_system["IDENTITY_HEADER"]).json()["access_token"])["appid"]
    r = msi_token(kagi, env2["IDENTITY_HEADER"], client_id=sys_cid)
    assert r.status_code == 400 and "access_token" not in r.text, r.text[:300]
    out = run_child(kagi, child_env(kagi, env2, "appservice"), client_id=sys_cid)
    assert "error" in out, out


def test_user_assigned_identity_resource(kagi, rg):
    u = put_uami(kagi, rg)
    path = resource_path(kagi, rg, "Microsoft.ManagedIdentity/userAssignedIdentities", u["name"])
    r = kagi.request("GET", kagi.arm(path, IDENTITY_API))
    assert r.status_code == 200 and r.json()["properties"] == u["properties"], r.text[:300]
    # PUT again: same identity (same principal and client id)
    r = kagi.request("PUT", kagi.arm(path, IDENTITY_API), json={"location": LOCATION})
    assert r.status_code == 200 and r.json()["properties"] == u["properties"], r.text[:300]
    assert u["properties"]["principalId"] in principal_ids(kagi)
    r = kagi.request("DELETE", kagi.arm(path, IDENTITY_API))
    assert r.status_code == 200, r.text[:300]
    assert kagi.request("GET", kagi.arm(path, IDENTITY_API)).status_code == 404
    assert u["properties"]["principalId"] not in principal_ids(kagi)
    # a workload cannot name a user-assigned identity that does not exist
    r = put_workload_raw(kagi, rg, "wl-bad", {"type": "UserAssigned", "userAssignedIdentities": {path: {}}})
    assert_error_shape(r, 400)
    r = put_workload_raw(kagi, rg, "wl-bad", {"type": "Sometimes"})
    assert_error_shape(r, 400)


# ---------------------------------------------------------------------------------------------
# ID-1: a system-assigned identity in use cannot be turned off; it dies with its resource
# ---------------------------------------------------------------------------------------------


def test_system_assigned_identity_in_use_by_access_policy(kagi, rg, vault):
    wl = put_workload(kagi, rg, "wl-ap", {"type": "SystemAssigned"})
    oid = wl["identity"]["principalId"]
    uami = put_uami(kagi, rg)
    vault.client.create_ec_key("k")
    set_policies(kagi, vault, [policy(kagi, oid, keys=["get"])])
    token = msi_token(kagi, identity_env(kagi, wl["id"])["IDENTITY_HEADER"]).json()["access_token"]
    assert raw_get_key(kagi, vault, "k", token).status_code == 200

    for identity in ({"type": "None"}, {"type": "UserAssigned", "userAssignedIdentities": {uami["id"]: {}}}):
        r = put_workload_raw(kagi, rg, "wl-ap", identity)
        err = assert_error_shape(r, 409)
        assert inner_code(r) == "SystemAssignedIdentityInUse", r.text[:400]
        assert oid in err["message"], err
    r = kagi.request("GET", kagi.arm(wl["id"], IDENTITY_API))
    assert r.json()["identity"]["principalId"] == oid, r.text[:300]
    assert raw_get_key(kagi, vault, "k", token).status_code == 200  # nothing changed

    set_policies(kagi, vault, [])
    r = put_workload_raw(kagi, rg, "wl-ap", {"type": "None"})
    assert r.status_code == 200, r.text[:300]
    assert r.json()["identity"]["type"] == "None" and "principalId" not in r.json()["identity"], r.text[:300]
    assert oid not in principal_ids(kagi)
    assert_error_shape(raw_get_key(kagi, vault, "k", token), 401)
    # turning it on again makes a NEW identity
    wl2 = put_workload(kagi, rg, "wl-ap", {"type": "SystemAssigned"})
    assert wl2["identity"]["principalId"] != oid


def test_system_assigned_identity_in_use_by_role_assignment(kagi, rg):
    wl = put_workload(kagi, rg, "wl-rbac", {"type": "SystemAssigned"})
    oid = wl["identity"]["principalId"]
    aid = assign_role(kagi, f"/subscriptions/{kagi.subscription_id}/resourceGroups/{rg}", CSEU, oid)
    r = put_workload_raw(kagi, rg, "wl-rbac", {"type": "None"})
    assert_error_shape(r, 409)
    assert inner_code(r) == "SystemAssignedIdentityInUse", r.text[:400]
    assert kagi.request("DELETE", kagi.arm(aid, AUTHZ_API)).status_code == 200
    r = put_workload_raw(kagi, rg, "wl-rbac", {"type": "None"})
    assert r.status_code == 200, r.text[:300]
    assert oid not in principal_ids(kagi)


def test_workload_deletion_deletes_its_system_assigned_identity(kagi, rg, vault):
    wl = put_workload(kagi, rg, "wl-del", {"type": "SystemAssigned"})
    oid = wl["identity"]["principalId"]
    vault.client.create_ec_key("k")
    set_policies(kagi, vault, [policy(kagi, oid, keys=["get"])])
    header = identity_env(kagi, wl["id"])["IDENTITY_HEADER"]
    token = msi_token(kagi, header).json()["access_token"]
    assert raw_get_key(kagi, vault, "k", token).status_code == 200

    r = kagi.request("DELETE", kagi.arm(wl["id"], IDENTITY_API))
    assert r.status_code == 200, r.text[:300]
    r = raw_get_key(kagi, vault, "k", token)
    assert_error_shape(r, 401)
    assert r.headers.get("WWW-Authenticate"), dict(r.headers)
    assert oid not in principal_ids(kagi)
    assert msi_token(kagi, header).status_code == 401  # the binding died with the resource
    assert kagi.request("GET", kagi.arm(wl["id"], IDENTITY_API)).status_code == 404
    assert kagi.request("DELETE", kagi.arm(wl["id"], IDENTITY_API)).status_code == 204


# ---------------------------------------------------------------------------------------------
# firewall
# ---------------------------------------------------------------------------------------------


def _acls(default="Deny", bypass="None", ips=()):
    return {"defaultAction": default, "bypass": bypass, "ipRules": [{"value": v} for v in ips], "virtualNetworkRules": []}


def _assert_firewall_refusal(exc_info) -> None:
    assert exc_info.value.status_code == 403, exc_info.value
    err = http_error(exc_info.value)
    assert err["code"] == "Forbidden" and err["innererror"]["code"] == "ForbiddenByFirewall", err


def test_firewall_deny_then_ip_rules_admit(kagi, vault):
    vault.client.create_ec_key("fw")
    sp = create_sp(kagi)
    try:
        set_policies(kagi, vault, [policy(kagi, sp["objectId"], keys=["get"])])
        sp_client = kagi.key_client(vault.url, credential=sp_credential(kagi, sp))
        assert sp_client.get_key("fw").name == "fw"

        r = update_vault_properties(kagi, vault, networkAcls=_acls(ips=["10.0.0.0/8"]))
        assert r.status_code == 200, r.text[:300]
        assert r.json()["properties"]["networkAcls"]["defaultAction"] == "Deny", r.text[:500]
        for client in (vault.client, sp_client):  # the administrator too: the firewall is before identity
            with pytest.raises(HttpResponseError) as ei:
                client.get_key("fw")
            _assert_firewall_refusal(ei)
        r = vault.raw("GET", "/keys")
        assert_error_shape(r, 403)
        assert inner_code(r) == "ForbiddenByFirewall", r.text[:300]
        # the management plane is not behind the vault firewall
        assert kagi.get_vault(vault.name).status_code == 200

        r = update_vault_properties(kagi, vault, networkAcls=_acls(ips=["10.0.0.0/8", "127.0.0.1/32", "::1/128"]))
        assert r.status_code == 200, r.text[:300]
        assert vault.client.get_key("fw").name == "fw"  # the very next request
        assert sp_client.get_key("fw").name == "fw"

        # bypass AzureServices admits kagi's own services only, not a principal or the administrator
        r = update_vault_properties(kagi, vault, networkAcls=_acls(bypass="AzureServices", ips=["10.0.0.0/8"]))
        assert r.status_code == 200, r.text[:300]
        for client in (vault.client, sp_client):
            with pytest.raises(HttpResponseError) as ei:
                client.get_key("fw")
            _assert_firewall_refusal(ei)

        r = update_vault_properties(kagi, vault, networkAcls=_acls(default="Allow"))
        assert r.status_code == 200, r.text[:300]
        assert vault.client.get_key("fw").name == "fw"
    finally:
        update_vault_properties(kagi, vault, networkAcls=_acls(default="Allow"), accessPolicies=[])
        delete_sp(kagi, sp["objectId"])


@pytest.mark.parametrize("cidr", ["10.0.0.0/33", "300.1.2.3", "not-an-ip", "::1/129", "", "127.0.0.1/", "1.2.3.4/-1"])
def test_firewall_invalid_cidr_is_400(kagi, vault, cidr):
    r = update_vault_properties(kagi, vault, networkAcls=_acls(ips=[cidr]))
    assert_error_shape(r, 400)
    # nothing changed: still reachable
    assert vault.raw("GET", "/keys").status_code == 200
    acls = kagi.get_vault(vault.name).json()["properties"].get("networkAcls")
    assert not acls or acls.get("defaultAction") != "Deny", acls


def test_public_network_access_disabled_refuses_everyone(kagi, vault):
    vault.client.create_ec_key("pna")
    r = update_vault_properties(
        kagi, vault, publicNetworkAccess="Disabled", networkAcls=_acls(default="Allow", ips=["127.0.0.1/32", "::1/128"])
    )
    assert r.status_code == 200, r.text[:300]
    with pytest.raises(HttpResponseError) as ei:
        vault.client.get_key("pna")
    _assert_firewall_refusal(ei)
    r = update_vault_properties(kagi, vault, publicNetworkAccess="Enabled")
    assert r.status_code == 200, r.text[:300]
    assert vault.client.get_key("pna").name == "pna"


# ---------------------------------------------------------------------------------------------
# locks
# ---------------------------------------------------------------------------------------------


def lock_url(srv: KagiServer, scope: str, name: str) -> str:
    return srv.arm(f"{scope}/providers/Microsoft.Authorization/locks/{name}", LOCKS_API)


def put_lock(srv: KagiServer, scope: str, name: str, level: str = "CanNotDelete") -> dict:
    r = srv.request("PUT", lock_url(srv, scope, name), json={"properties": {"level": level, "notes": "test"}})
    assert r.status_code == 201, f"lock PUT: {r.status_code} {r.text[:400]}"
    assert r.json()["properties"]["level"] == level, r.text[:300]
    return r.json()


def test_vault_lock_refuses_vault_and_key_deletion(kagi, vault):
    vault.client.create_ec_key("locked")
    scope = kagi.vault_path(vault.rg, vault.name)
    put_lock(kagi, scope, "nodelete")
    assert kagi.request("GET", lock_url(kagi, scope, "nodelete")).status_code == 200

    r = kagi.delete_vault(vault.name)
    assert_error_shape(r, 409)
    assert inner_code(r) == "ScopeLocked", r.text[:300]
    with pytest.raises(HttpResponseError) as ei:
        vault.client.begin_delete_key("locked")
    assert ei.value.status_code == 409, ei.value
    assert http_error(ei.value)["innererror"]["code"] == "ScopeLocked"
    # reads and writes other than deletion still work
    assert vault.client.get_key("locked").name == "locked"
    vault.client.create_ec_key("still-creatable")

    r = kagi.request("DELETE", lock_url(kagi, scope, "nodelete"))
    assert r.status_code == 200, r.text[:300]
    vault.client.begin_delete_key("locked").result()
    assert kagi.delete_vault(vault.name).status_code in (200, 204)


def test_key_scope_lock_refuses_that_key_only(kagi, vault):
    vault.client.create_ec_key("k1")
    vault.client.create_ec_key("k2")
    scope = f"{kagi.vault_path(vault.rg, vault.name)}/keys/k1"
    put_lock(kagi, scope, "keep-k1")
    with pytest.raises(HttpResponseError) as ei:
        vault.client.begin_delete_key("k1")
    assert ei.value.status_code == 409, ei.value
    assert http_error(ei.value)["innererror"]["code"] == "ScopeLocked"
    vault.client.begin_delete_key("k2").result()
    r = kagi.request("DELETE", lock_url(kagi, scope, "keep-k1"))
    assert r.status_code == 200, r.text[:300]
    vault.client.begin_delete_key("k1").result()
    assert vault.key_names() == []


def test_read_only_lock_refuses_vault_changes(kagi, vault):
    scope = kagi.vault_path(vault.rg, vault.name)
    put_lock(kagi, scope, "ro", level="ReadOnly")
    try:
        r = update_vault_properties(kagi, vault, accessPolicies=[])
        assert_error_shape(r, 409)
        assert inner_code(r) == "ScopeLocked", r.text[:300]
        r = kagi.request("PATCH", kagi.arm(scope), json={"properties": {"enabledForDeployment": True}})
        assert_error_shape(r, 409)
        assert inner_code(r) == "ScopeLocked", r.text[:300]
        assert kagi.get_vault(vault.name).status_code == 200
        assert_error_shape(kagi.delete_vault(vault.name), 409)
    finally:
        assert kagi.request("DELETE", lock_url(kagi, scope, "ro")).status_code == 200
    assert update_vault_properties(kagi, vault, accessPolicies=[]).status_code == 200


def test_resource_group_lock_covers_the_vault(kagi, rg):
    vault = kagi.create_vault(rg=rg)
    scope = f"/subscriptions/{kagi.subscription_id}/resourceGroups/{rg}"
    put_lock(kagi, scope, "rg-lock")
    r = kagi.delete_vault(vault.name, rg=rg)
    assert_error_shape(r, 409)
    assert inner_code(r) == "ScopeLocked", r.text[:300]
    assert kagi.request("DELETE", lock_url(kagi, scope, "rg-lock")).status_code == 200
    assert kagi.delete_vault(vault.name, rg=rg).status_code in (200, 204)


def test_lock_bad_input(kagi, vault):
    scope = kagi.vault_path(vault.rg, vault.name)
    r = kagi.request("PUT", lock_url(kagi, scope, "bad"), json={"properties": {"level": "Sometimes"}})
    assert_error_shape(r, 400)
    r = kagi.request("PUT", lock_url(kagi, scope, "bad"), json={})
    assert_error_shape(r, 400)
    r = kagi.request("PUT", lock_url(kagi, kagi.vault_path(vault.rg, random_name("nx", 16)), "l"),
                     json={"properties": {"level": "CanNotDelete"}})  # fmt: skip
    assert_error_shape(r, 400)
    assert kagi.request("DELETE", lock_url(kagi, scope, "never-existed")).status_code == 204


def test_lock_at_missing_scope_is_refused(kagi):
    """A lock on a resource group or subscription that does not exist is refused, not stored."""
    for missing in (f"/subscriptions/{kagi.subscription_id}/resourceGroups/{random_name('nx', 12)}", f"/subscriptions/{uuid.uuid4()}"):
        r = kagi.request("PUT", lock_url(kagi, missing, "l"), json={"properties": {"level": "CanNotDelete"}})
        if r.status_code in (200, 201):
            kagi.request("DELETE", lock_url(kagi, missing, "l"))
        assert r.status_code in (400, 404), f"lock at missing scope {missing}: {r.status_code} {r.text[:300]}"


def test_role_assignment_at_unknown_subscription_is_refused(kagi):
    sp = create_sp(kagi)
    try:
        r = put_role_assignment(kagi, f"/subscriptions/{uuid.uuid4()}", CSEU, sp["objectId"])
        if r.status_code in (200, 201):
            kagi.request("DELETE", kagi.arm(r.json()["id"], AUTHZ_API))
        assert r.status_code in (400, 403, 404), f"assignment at an unknown subscription: {r.status_code} {r.text[:300]}"
        assert_error_shape(r)
    finally:
        delete_sp(kagi, sp["objectId"])


def _secrets_or_skip(vault):
    r = vault.raw("PUT", "/secrets/lock-probe", json={"value": "x"})
    if r.status_code == 404:
        pytest.skip("the secrets API (/secrets) is not served by this build")
    assert r.status_code == 200, r.text[:300]
    return kagi_secret_client(vault)


def kagi_secret_client(vault):
    return vault.server.secret_client(vault.url)


def test_locks_refuse_secret_deletion(kagi, vault):
    client = _secrets_or_skip(vault)
    client.set_secret("s1", "one")
    client.set_secret("s2", "two")
    vscope = kagi.vault_path(vault.rg, vault.name)
    # vault-scope lock: no secret can be deleted
    put_lock(kagi, vscope, "vault-lock")
    with pytest.raises(HttpResponseError) as ei:
        client.begin_delete_secret("s1")
    assert ei.value.status_code == 409, ei.value
    assert http_error(ei.value)["innererror"]["code"] == "ScopeLocked"
    assert kagi.request("DELETE", lock_url(kagi, vscope, "vault-lock")).status_code == 200
    # secret-scope lock: only that secret
    put_lock(kagi, f"{vscope}/secrets/s1", "secret-lock")
    with pytest.raises(HttpResponseError) as ei:
        client.begin_delete_secret("s1")
    assert ei.value.status_code == 409, ei.value
    client.begin_delete_secret("s2").result()
    assert kagi.request("DELETE", lock_url(kagi, f"{vscope}/secrets/s1", "secret-lock")).status_code == 200
    client.begin_delete_secret("s1").result()


# ---------------------------------------------------------------------------------------------
# role assignments and role definitions
# ---------------------------------------------------------------------------------------------


def test_role_assignment_validation(kagi, make_vault):
    vault = make_vault(enableRbacAuthorization=True)
    vscope = kagi.vault_path(vault.rg, vault.name)
    sp = create_sp(kagi)
    try:
        r = put_role_assignment(kagi, vscope, CSEU, str(uuid.uuid4()))
        assert_error_shape(r, 400)
        assert inner_code(r) == "PrincipalNotFound", r.text[:300]

        r = put_role_assignment(kagi, vscope, str(uuid.uuid4()), sp["objectId"])
        assert_error_shape(r, 400)
        assert inner_code(r) == "RoleDefinitionDoesNotExist", r.text[:300]

        sub = kagi.subscription_id
        for bad_scope in (
            "/subscriptions/not-a-guid",
            f"/subscriptions/{sub}/resourceGroups/{vault.rg}/providers/Microsoft.KeyVault/vaults/{random_name('nx', 16)}",
            f"/subscriptions/{sub}/resourceGroups/{vault.rg}/providers/Microsoft.KeyVault/vaults/bad_name!",
        ):
            r = put_role_assignment(kagi, bad_scope, CSEU, sp["objectId"])
            assert_error_shape(r, 400)

        r = put_role_assignment(kagi, vscope, CSEU, sp["objectId"], assignment_id="not-a-guid")
        assert_error_shape(r, 400)

        aid = str(uuid.uuid4())
        r = put_role_assignment(kagi, vscope, CSEU, sp["objectId"], assignment_id=aid)
        assert r.status_code == 201, r.text[:300]
        body = r.json()
        assert body["name"] == aid and body["type"] == "Microsoft.Authorization/roleAssignments", body
        assert body["properties"]["principalId"] == sp["objectId"], body
        assert body["properties"]["roleDefinitionId"].lower().endswith(CSEU), body
        # same id, same content: idempotent; same content, other id: 409 RoleAssignmentExists
        assert put_role_assignment(kagi, vscope, CSEU, sp["objectId"], assignment_id=aid).status_code in (200, 201)
        r = put_role_assignment(kagi, vscope, CSEU, sp["objectId"])
        assert_error_shape(r, 409)
        assert inner_code(r) == "RoleAssignmentExists", r.text[:300]
        # same id, other content: 409
        r = put_role_assignment(kagi, vscope, CRYPTO_USER, sp["objectId"], assignment_id=aid)
        assert_error_shape(r, 409)
        # GET and list
        r = kagi.request("GET", kagi.arm(f"{vscope}/providers/Microsoft.Authorization/roleAssignments/{aid}", AUTHZ_API))
        assert r.status_code == 200 and r.json()["name"] == aid, r.text[:300]
        r = kagi.request("GET", kagi.arm(f"{vscope}/providers/Microsoft.Authorization/roleAssignments", AUTHZ_API))
        assert aid in {a["name"] for a in r.json()["value"]}, r.text[:500]
        assert kagi.request("DELETE", kagi.arm(body["id"], AUTHZ_API)).status_code == 200
    finally:
        delete_sp(kagi, sp["objectId"])


@pytest.mark.parametrize(
    "suffix",
    [
        "/resourceGroups",  # a resource group without a name
        "/resourceGroups/{rg}/providers",  # a provider without a namespace/type/name
        "/resourceGroups/{rg}/providers/Microsoft.KeyVault",  # a namespace without a type
        "/resourceGroups/{rg}/whatever/{rg}",  # not an ARM path at all
        "/resourceGroups/{missing_rg}",  # a resource group that does not exist (Azure: 4xx, never 201)
    ],
)
def test_role_assignment_malformed_scope_is_400(kagi, vault, suffix):
    sp = create_sp(kagi)
    try:
        scope = f"/subscriptions/{kagi.subscription_id}" + suffix.format(rg=vault.rg, missing_rg=random_name("nx", 12))
        r = put_role_assignment(kagi, scope, CSEU, sp["objectId"])
        if r.status_code in (200, 201):
            kagi.request("DELETE", kagi.arm(r.json()["id"], AUTHZ_API))
        if "missing_rg" in suffix:
            assert r.status_code in (400, 404), f"assignment at a missing resource group: {r.status_code} {r.text[:300]}"
            assert_error_shape(r)
        else:
            assert_error_shape(r, 400)
    finally:
        delete_sp(kagi, sp["objectId"])


def test_custom_role_with_not_data_actions(kagi, make_vault):
    vault = make_vault(enableRbacAuthorization=True)
    vscope = kagi.vault_path(vault.rg, vault.name)
    sub_scope = f"/subscriptions/{kagi.subscription_id}"
    role_id = str(uuid.uuid4())
    role_url = kagi.arm(f"{sub_scope}/providers/Microsoft.Authorization/roleDefinitions/{role_id}", AUTHZ_API)
    role = {
        "properties": {
            "roleName": f"keys-but-never-delete-{role_id[:8]}",
            "description": "every key action except delete and purge",
            "permissions": [
                {
                    "actions": [],
                    "notActions": [],
                    "dataActions": ["Microsoft.KeyVault/vaults/keys/*"],
                    "notDataActions": ["Microsoft.KeyVault/vaults/keys/delete", "Microsoft.KeyVault/vaults/keys/purge/action"],
                }
            ],
            "assignableScopes": [sub_scope],
        }
    }
    r = kagi.request("PUT", role_url, json=role)
    assert r.status_code == 201, r.text[:400]
    assert r.json()["properties"]["type"] == "CustomRole", r.text[:400]
    assert kagi.request("GET", role_url).status_code == 200
    sp = create_sp(kagi)
    try:
        aid = assign_role(kagi, vscope, role_id, sp["objectId"])
        cred = sp_credential(kagi, sp)
        client = kagi.key_client(vault.url, credential=cred)
        key = client.create_rsa_key("custom", size=2048)
        assert client.get_key("custom").id == key.id
        crypto = kagi.crypto_client(key.id, credential=cred)
        wrapped = crypto.wrap_key(KeyWrapAlgorithm.rsa_oaep_256, b"k" * 32)
        assert crypto.unwrap_key(KeyWrapAlgorithm.rsa_oaep_256, wrapped.encrypted_key).key == b"k" * 32
        with pytest.raises(HttpResponseError) as ei:
            client.begin_delete_key("custom")
        assert ei.value.status_code == 403, ei.value
        err = http_error(ei.value)
        assert err["innererror"]["code"] == "ForbiddenByRbac", err
        assert "Microsoft.KeyVault/vaults/keys/delete" in err["message"], err
        # secrets are not in the role
        r = requests.get(vault.data_url("/secrets"), headers={"Authorization": f"Bearer {cred.get_token(kagi.scope).token}"},
                         verify=str(kagi.ca_path), timeout=30)  # fmt: skip
        assert r.status_code in (403, 404), r.text[:300]
        if r.status_code == 403:
            assert inner_code(r) == "ForbiddenByRbac"

        # a role definition in use cannot be deleted
        r = kagi.request("DELETE", role_url)
        assert_error_shape(r, 409)
        # tightening the role applies to the next request: drop keys/read from it too
        role["properties"]["permissions"][0]["notDataActions"].append("Microsoft.KeyVault/vaults/keys/read")
        r = kagi.request("PUT", role_url, json=role)
        assert r.status_code == 200, r.text[:400]
        with pytest.raises(HttpResponseError) as ei:
            client.get_key("custom")
        assert ei.value.status_code == 403
        assert kagi.request("DELETE", kagi.arm(aid, AUTHZ_API)).status_code == 200
        assert kagi.request("DELETE", role_url).status_code == 200
        assert kagi.request("GET", role_url).status_code == 404
    finally:
        delete_sp(kagi, sp["objectId"])


def test_role_definition_validation(kagi):
    sub_scope = f"/subscriptions/{kagi.subscription_id}"

    def put(role_guid, props):
        url = kagi.arm(f"{sub_scope}/providers/Microsoft.Authorization/roleDefinitions/{role_guid}", AUTHZ_API)
        return kagi.request("PUT", url, json={"properties": props})

    ok_perm = [{"dataActions": ["Microsoft.KeyVault/vaults/keys/read"]}]
    assert_error_shape(put(str(uuid.uuid4()), {"roleName": "", "permissions": ok_perm}), 400)
    assert_error_shape(put(str(uuid.uuid4()), {"roleName": "no perms", "permissions": []}), 400)
    assert_error_shape(put(str(uuid.uuid4()), {"roleName": "bad action", "permissions": [{"dataActions": ["keys read!"]}]}), 400)
    assert_error_shape(put(str(uuid.uuid4()), {"roleName": "bad scope", "permissions": ok_perm,
                                               "assignableScopes": ["/subscriptions/not-a-guid"]}), 400)  # fmt: skip
    assert_error_shape(put("not-a-guid", {"roleName": "bad id", "permissions": ok_perm}), 400)
    # built-in roles cannot be redefined
    r = put(CSEU, {"roleName": "hijack", "permissions": [{"dataActions": ["Microsoft.KeyVault/vaults/*"]}]})
    assert r.status_code in (400, 403, 409), r.text[:300]
    assert_error_shape(r)
    # and the built-ins are listed with Azure's GUIDs
    r = kagi.request("GET", kagi.arm(f"{sub_scope}/providers/Microsoft.Authorization/roleDefinitions", AUTHZ_API))
    names = {d["name"]: d["properties"]["roleName"] for d in r.json()["value"]}
    assert names.get(CSEU) == "Key Vault Crypto Service Encryption User", names
    assert names.get("00482a5a-887f-4fb3-b363-3b7fe8e74483") == "Key Vault Administrator", names
