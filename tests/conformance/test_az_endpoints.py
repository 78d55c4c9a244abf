"""What the az CLI needs of kagi, checked over raw HTTP (no az needed): ARM's cloud metadata,
the generic resource list with $filter, managed HSM lists, role lists with $filter, and the
Microsoft Graph reads (/me, servicePrincipals, users, directoryObjects/getByIds). Every refusal
is an Azure/Graph error body, never a 500; Graph and ARM reads need a token and the right to
read the directory or the subscription."""

from __future__ import annotations

import uuid

import pytest
import requests

from conftest import LOCATION, AUTHZ_API, assert_error_shape, create_sp, inner_code, random_name, sp_token

RES_API = "2021-04-01"
KV_READER_GUID = "21090545-7ca7-4776-b22c-e363652d74d2"


def graph(kagi, method, path, token=None, **kw):
    headers = {"Authorization": f"Bearer {token}"} if token else None
    return kagi.request(method, f"{kagi.base}/v1.0{path}", auth=token is None, headers=headers, **kw)


# ---------------------------------------------------------------------------------------------
# cloud metadata
# ---------------------------------------------------------------------------------------------


def test_cloud_metadata_is_served_without_a_token(kagi):
    r = requests.get(f"{kagi.base}/metadata/endpoints?api-version=2022-09-01", verify=str(kagi.ca_path), timeout=30)
    assert r.status_code == 200, r.text[:300]
    m = r.json()
    assert m["resourceManager"] == f"{kagi.base}/", m
    assert m["authentication"]["loginEndpoint"] == kagi.base, m
    assert m["authentication"]["audiences"] == [f"{kagi.base}/"], m
    assert m["microsoftGraphResourceId"] == f"{kagi.base}/", m
    assert m["suffixes"]["keyVaultDns"] == f".localhost:{kagi.port}", m
    # The audience it names is the one kagi issues tokens for.
    tok = requests.post(
        f"{kagi.base}/{kagi.tenant_id}/oauth2/v2.0/token",
        data={"grant_type": "client_credentials", "client_id": kagi.admin["clientId"],
              "client_secret": kagi.admin["clientSecret"], "scope": m["authentication"]["audiences"][0] + ".default"},
        verify=str(kagi.ca_path), timeout=30,
    )
    assert tok.status_code == 200, tok.text[:300]


# ---------------------------------------------------------------------------------------------
# ARM: generic resources, managed HSMs
# ---------------------------------------------------------------------------------------------


def test_resources_list_filters_on_type_and_name(kagi, make_vault):
    rg = random_name("resrg", 12)
    kagi.put_rg(rg)
    v1 = make_vault(rg=rg)
    v2 = make_vault(rg=rg)
    sub = f"/subscriptions/{kagi.subscription_id}"
    every = kagi.request("GET", kagi.arm(f"{sub}/resources", RES_API))
    assert every.status_code == 200, every.text[:300]
    ids = [r["id"] for r in every.json()["value"]]
    assert v1.body["id"] in ids and v2.body["id"] in ids, ids
    one = every.json()["value"][ids.index(v1.body["id"])]
    assert one == {"id": v1.body["id"], "name": v1.name, "type": "Microsoft.KeyVault/vaults", "location": LOCATION,
                   "tags": {}}, one

    f = f"resourceType eq 'Microsoft.KeyVault/vaults' and name eq '{v1.name}'"
    r = kagi.request("GET", kagi.arm(f"{sub}/resources", RES_API), params={"$filter": f})
    assert [x["id"] for x in r.json()["value"]] == [v1.body["id"]], r.text[:500]
    # types and names compare without regard to case, as ARM compares them
    f = f"resourcetype eq 'microsoft.keyvault/VAULTS' and name eq '{v2.name.upper()}'"
    r = kagi.request("GET", kagi.arm(f"{sub}/resources", RES_API), params={"$filter": f})
    assert [x["id"] for x in r.json()["value"]] == [v2.body["id"]], r.text[:500]
    r = kagi.request("GET", kagi.arm(f"{sub}/resources", RES_API),
                     params={"$filter": "resourceType eq 'Microsoft.Compute/virtualMachines'"})
    assert r.status_code == 200 and r.json()["value"] == [], r.text[:300]

    in_rg = kagi.request("GET", kagi.arm(f"{sub}/resourceGroups/{rg}/resources", RES_API))
    assert sorted(x["id"] for x in in_rg.json()["value"]) == sorted([v1.body["id"], v2.body["id"]]), in_rg.text[:500]
    # deleted vaults are not resources
    assert kagi.delete_vault(v2.name, rg).status_code == 200
    in_rg = kagi.request("GET", kagi.arm(f"{sub}/resourceGroups/{rg}/resources", RES_API))
    assert [x["id"] for x in in_rg.json()["value"]] == [v1.body["id"]], in_rg.text[:500]


@pytest.mark.parametrize(
    "bad",
    ["tags eq 'x'", "name gt 'a'", "name eq 'unterminated", "resourceType eq", "endswith(name,'x')", "(name eq 'x'"],
)
def test_resources_list_refuses_filters_it_cannot_apply(kagi, bad):
    r = kagi.request("GET", kagi.arm(f"/subscriptions/{kagi.subscription_id}/resources", RES_API), params={"$filter": bad})
    assert_error_shape(r, 400, "BadRequest")
    assert inner_code(r) == "InvalidFilterInQueryString", r.text[:300]


def test_resources_list_of_an_unknown_group_or_subscription(kagi):
    r = kagi.request("GET", kagi.arm(f"/subscriptions/{kagi.subscription_id}/resourceGroups/{random_name('no', 12)}/resources", RES_API))
    assert_error_shape(r, 404, "ResourceGroupNotFound")
    r = kagi.request("GET", kagi.arm(f"/subscriptions/{uuid.uuid4()}/resources", RES_API))
    assert_error_shape(r, 404)


def test_managed_hsm_lists_are_empty(kagi):
    sub = f"/subscriptions/{kagi.subscription_id}"
    for path in (f"{sub}/providers/Microsoft.KeyVault/managedHSMs", f"{sub}/providers/Microsoft.KeyVault/deletedManagedHSMs",
                 f"{sub}/resourceGroups/kagi-conformance/providers/Microsoft.KeyVault/managedHSMs"):
        r = kagi.request("GET", kagi.arm(path))
        assert r.status_code == 200 and r.json() == {"value": []}, (path, r.text[:300])


def test_arm_lists_need_the_right_to_read_the_subscription(kagi):
    sp = create_sp(kagi)
    tok = sp_token(kagi, sp)
    sub = f"/subscriptions/{kagi.subscription_id}"
    for path, api in ((f"{sub}/resources", RES_API), (f"{sub}/providers/Microsoft.KeyVault/deletedManagedHSMs", "2023-07-01")):
        r = kagi.request("GET", kagi.arm(path, api), auth=False, headers={"Authorization": f"Bearer {tok}"})
        assert_error_shape(r, 403)
        r = kagi.request("GET", kagi.arm(path, api), auth=False)
        assert_error_shape(r, 401)


def test_resource_group_head(kagi):
    rg = f"/subscriptions/{kagi.subscription_id}/resourcegroups"
    assert kagi.request("HEAD", kagi.arm(f"{rg}/kagi-conformance", RES_API)).status_code == 204
    assert kagi.request("HEAD", kagi.arm(f"{rg}/{random_name('no', 12)}", RES_API)).status_code == 404


# ---------------------------------------------------------------------------------------------
# role lists with $filter
# ---------------------------------------------------------------------------------------------


def test_role_definition_and_assignment_filters(kagi, vault):
    sub = f"/subscriptions/{kagi.subscription_id}"
    defs = kagi.arm(f"{sub}/providers/Microsoft.Authorization/roleDefinitions", AUTHZ_API)
    r = kagi.request("GET", defs, params={"$filter": "roleName eq 'key vault reader'"})
    assert [d["name"] for d in r.json()["value"]] == [KV_READER_GUID], r.text[:500]
    assert r.json()["value"][0]["id"] == f"{sub}/providers/Microsoft.Authorization/roleDefinitions/{KV_READER_GUID}"
    r = kagi.request("GET", defs, params={"$filter": "type eq 'CustomRole' and roleName eq 'Key Vault Reader'"})
    assert r.json()["value"] == [], r.text[:300]
    r = kagi.request("GET", defs, params={"$filter": "description eq 'x'"})
    assert_error_shape(r, 400, "BadRequest")

    scope = kagi.vault_path(vault.rg, vault.name)
    sp1, sp2 = create_sp(kagi), create_sp(kagi)
    for sp, at in ((sp1, scope), (sp2, f"{scope}/keys/k1")):
        aid = str(uuid.uuid4())
        r = kagi.request("PUT", kagi.arm(f"{at}/providers/Microsoft.Authorization/roleAssignments/{aid}", AUTHZ_API),
                         json={"properties": {"roleDefinitionId": f"{sub}/providers/Microsoft.Authorization/roleDefinitions/{KV_READER_GUID}",
                                              "principalId": sp["objectId"]}})
        assert r.status_code == 201, r.text[:300]
        assert r.json()["properties"]["roleDefinitionId"] == f"{sub}/providers/Microsoft.Authorization/roleDefinitions/{KV_READER_GUID}"
    ras = kagi.arm(f"{scope}/providers/Microsoft.Authorization/roleAssignments", AUTHZ_API)

    def principals(params=None):
        r = kagi.request("GET", ras, params=params)
        assert r.status_code == 200, r.text[:300]
        return {a["properties"]["principalId"] for a in r.json()["value"]}

    # without a filter: at, above and below the scope; atScope(): at it or above only
    assert {sp1["objectId"], sp2["objectId"]} <= principals()
    assert sp1["objectId"] in principals({"$filter": "atScope()"})
    assert sp2["objectId"] not in principals({"$filter": "atScope()"})
    assert principals({"$filter": f"principalId eq '{sp2['objectId']}'"}) == {sp2["objectId"]}
    assert principals({"$filter": f"atScope() and assignedTo('{sp1['objectId']}')"}) == {sp1["objectId"]}
    r = kagi.request("GET", ras, params={"$filter": "roleName eq 'x'"})
    assert_error_shape(r, 400, "BadRequest")
    assert inner_code(r) == "InvalidFilterInQueryString"


# ---------------------------------------------------------------------------------------------
# Microsoft Graph
# ---------------------------------------------------------------------------------------------


def test_graph_me_for_an_application_is_graphs_400(kagi):
    r = graph(kagi, "GET", "/me")
    err = assert_error_shape(r, 400, "BadRequest")
    assert err["message"] == "/me request is only valid with delegated authentication flow.", err


def test_graph_service_principals_with_filters(kagi):
    name = random_name("graph", 14)
    sp = create_sp(kagi, name)
    for f in (f"appId eq '{sp['clientId']}'", f"displayName eq '{name}'", f"startswith(displayName,'{name[:10]}')",
              f"servicePrincipalNames/any(c:c eq '{sp['clientId']}')", f"id eq '{sp['objectId']}'"):
        r = graph(kagi, "GET", "/servicePrincipals", params={"$filter": f})
        assert r.status_code == 200, (f, r.text[:300])
        got = r.json()["value"]
        assert [s["id"] for s in got] == [sp["objectId"]], (f, got)
    s = got[0]
    assert s["appId"] == sp["clientId"] and s["displayName"] == name and s["servicePrincipalType"] == "Application", s
    assert s["@odata.type"] == "#microsoft.graph.servicePrincipal" and s["appOwnerOrganizationId"] == kagi.tenant_id, s
    assert "clientSecret" not in s and "secretHash" not in s, s
    r = graph(kagi, "GET", "/servicePrincipals", params={"$filter": f"appId eq '{uuid.uuid4()}'"})
    assert r.status_code == 200 and r.json()["value"] == [], r.text[:300]

    one = graph(kagi, "GET", f"/servicePrincipals/{sp['objectId']}")
    assert one.status_code == 200 and one.json()["appId"] == sp["clientId"], one.text[:300]
    missing = graph(kagi, "GET", f"/servicePrincipals/{uuid.uuid4()}")
    assert_error_shape(missing, 404, "NotFound")
    assert inner_code(missing) == "Request_ResourceNotFound"


@pytest.mark.parametrize("bad", ["userPrincipalName eq 'x@y'", "appId eq", "appId gt 'x'", "foo(appId)", "'x'"])
def test_graph_refuses_filters_it_cannot_apply(kagi, bad):
    r = graph(kagi, "GET", "/servicePrincipals", params={"$filter": bad})
    assert_error_shape(r, 400, "BadRequest")
    assert inner_code(r) == "Request_UnsupportedQuery", r.text[:300]


def test_graph_users_and_get_by_ids(kagi):
    upn = f"{random_name('u', 10)}@kagi.test"
    r = kagi.request("POST", f"{kagi.base}/v1.0/users",
                     json={"displayName": "Graph User", "userPrincipalName": upn, "passwordProfile": {"password": "Pa55w0rd!Pa55w0rd"}})
    assert r.status_code == 201, r.text[:300]
    user = r.json()
    sp = create_sp(kagi)

    got = graph(kagi, "GET", "/users", params={"$filter": f"userPrincipalName eq '{upn}'"}).json()["value"]
    assert [u["id"] for u in got] == [user["objectId"]], got
    assert got[0]["userPrincipalName"] == upn and got[0]["@odata.type"] == "#microsoft.graph.user", got
    # users are not service principals and service principals are not users
    sps = {s["id"] for s in graph(kagi, "GET", "/servicePrincipals").json()["value"]}
    users = {u["id"] for u in graph(kagi, "GET", "/users").json()["value"]}
    assert user["objectId"] in users and user["objectId"] not in sps, (users, sps)
    assert sp["objectId"] in sps and sp["objectId"] not in users, (users, sps)
    assert graph(kagi, "GET", f"/users/{upn}").json()["id"] == user["objectId"]

    ids = [user["objectId"], sp["objectId"], str(uuid.uuid4())]
    r = graph(kagi, "POST", "/directoryObjects/getByIds", json={"ids": ids, "types": ["user", "group", "servicePrincipal"]})
    assert r.status_code == 200, r.text[:300]
    assert sorted(o["id"] for o in r.json()["value"]) == sorted(ids[:2]), r.text[:500]
    r = graph(kagi, "POST", "/directoryObjects/getByIds", json={"ids": ids, "types": ["servicePrincipal"]})
    assert [o["id"] for o in r.json()["value"]] == [sp["objectId"]], r.text[:500]
    for bad in ({}, {"ids": "x"}, {"ids": [1]}, {"ids": [], "types": "user"}, {"ids": ["x"] * 1001}):
        r = graph(kagi, "POST", "/directoryObjects/getByIds", json=bad)
        assert_error_shape(r, 400, "BadRequest")
    r = kagi.request("POST", f"{kagi.base}/v1.0/directoryObjects/getByIds", data=b"{not json",
                     headers={"Content-Type": "application/json"})
    assert_error_shape(r, 400)


def test_graph_needs_a_token_and_the_directory_right(kagi):
    for method, path, body in (("GET", "/servicePrincipals", None), ("GET", "/users", None),
                               ("POST", "/directoryObjects/getByIds", {"ids": []}), ("GET", "/me", None)):
        r = kagi.request(method, f"{kagi.base}/v1.0{path}", auth=False, json=body)
        assert_error_shape(r, 401)
    sp = create_sp(kagi)
    tok = sp_token(kagi, sp)
    for method, path, body in (("GET", "/servicePrincipals", None), ("GET", "/users", None),
                               ("POST", "/directoryObjects/getByIds", {"ids": [sp["objectId"]]}),
                               ("GET", f"/servicePrincipals/{sp['objectId']}", None)):
        r = graph(kagi, method, path, token=tok, json=body)
        assert_error_shape(r, 403)
    # /me for an application's own token: Graph's 400, not a 403
    assert_error_shape(graph(kagi, "GET", "/me", token=tok), 400)
