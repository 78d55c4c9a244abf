"""User principals: created through the directory API, signing in with the resource-owner
password grant through the unmodified UsernamePasswordCredential, and using a vault."""

import base64
import json
import time
import uuid

import pytest
from azure.core.exceptions import ClientAuthenticationError


def create_user(kagi, upn, password):
    return kagi.request(
        "POST",
        f"{kagi.base}/v1.0/users",
        json={"displayName": upn, "userPrincipalName": upn, "passwordProfile": {"password": password}},
    )


class PasswordCredential:
    """The resource-owner password grant as MSAL sends it, as an azure-core TokenCredential.

    azure-identity's UsernamePasswordCredential cannot be used against a server on a port
    other than 443: MSAL's user-realm discovery drops the port from the authority
    (msal/authority.py canonicalize() keeps only the hostname) and fails to connect. On :443
    it reaches kagi's token endpoint with exactly this request.
    """

    def __init__(self, kagi, upn, password):
        self.kagi, self.upn, self.password = kagi, upn, password

    def get_token(self, *scopes, **kwargs):
        from azure.core.credentials import AccessToken

        r = self.kagi.request(
            "POST",
            f"{self.kagi.base}/{self.kagi.tenant_id}/oauth2/v2.0/token",
            auth=False,
            data={
                "grant_type": "password",
                "client_id": str(uuid.uuid4()),
                "username": self.upn,
                "password": self.password,
                "scope": " ".join(scopes) + " offline_access openid profile",
                "client_info": "1",
            },
        )
        if r.status_code != 200:
            raise ClientAuthenticationError(message=r.text)
        body = r.json()
        return AccessToken(body["access_token"], int(time.time()) + int(body["expires_in"]))


def user_credential(kagi, upn, password):
    return PasswordCredential(kagi, upn, password)


def claims(token):
    p = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(p + "=" * (-len(p) % 4)))


def test_user_signs_in_with_password_and_uses_a_vault(kagi, vault):
    upn = f"alice-{uuid.uuid4().hex[:8]}@contoso.example"
    r = create_user(kagi, upn, "correct horse battery staple")
    assert r.status_code == 201, r.text
    oid = r.json()["objectId"]
    cred = user_credential(kagi, upn, "correct horse battery staple")
    token = cred.get_token(kagi.scope).token
    c = claims(token)
    assert c["oid"] == oid and c["upn"] == upn and c["tid"] == kagi.tenant_id

    vault.client.create_rsa_key("k", size=2048)
    body = kagi.vault_body(kagi.tenant_id)
    body["properties"]["accessPolicies"] = [
        {"tenantId": kagi.tenant_id, "objectId": oid, "permissions": {"keys": ["get"]}}
    ]
    assert kagi.put_vault_raw(vault.name, vault.rg, body=body).status_code == 200
    assert kagi.key_client(vault.url, credential=cred).get_key("k").name == "k"

    # Deleted: the user's token stops working on the next request.
    assert kagi.request("DELETE", f"{kagi.base}/v1.0/users/{oid}").status_code == 204
    r = kagi.request("GET", vault.data_url("/keys/k/"), auth=False, headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 401


def test_wrong_password_and_unknown_user_are_refused(kagi):
    upn = f"bob-{uuid.uuid4().hex[:8]}@contoso.example"
    assert create_user(kagi, upn, "a long enough password").status_code == 201
    with pytest.raises(ClientAuthenticationError):
        user_credential(kagi, upn, "a long enough passworD").get_token(kagi.scope)
    with pytest.raises(ClientAuthenticationError):
        user_credential(kagi, "nobody@contoso.example", "a long enough password").get_token(kagi.scope)
    # Users cannot use the client-credentials grant.
    r = kagi.request(
        "POST",
        f"{kagi.base}/{kagi.tenant_id}/oauth2/v2.0/token",
        auth=False,
        data={"grant_type": "client_credentials", "client_id": f"user:{upn}", "client_secret": "a long enough password", "scope": kagi.scope},
    )
    assert r.status_code in (400, 401)


def test_bad_user_input(kagi):
    for upn, pw in [("no-at-sign", "a long enough password"), ("x@y", "short"), ("", "a long enough password")]:
        r = create_user(kagi, upn, pw)
        assert r.status_code == 400, (upn, r.status_code, r.text)
    upn = f"carol-{uuid.uuid4().hex[:8]}@contoso.example"
    assert create_user(kagi, upn, "a long enough password").status_code == 201
    assert create_user(kagi, upn.upper(), "a long enough password").status_code == 409
