"""Identity hardening (issue 11, items 8, 9, 12 and two parts of 14), end to end against a real server.

- 8: the password grant's `client_id` alone never makes a compound identity ("user via application X");
  an application is named in the token only when it authenticated (client secret or assertion).
- 9: the password grant is throttled per user name (known or not, answered alike) and per source
  address, with 429 + Retry-After in OAuth's error shape. (The bound on concurrent hashing and the
  dummy hash for unknown users are tested in crates/vault/tests/identity_hardening.rs.)
- 12: workload binding secrets expire, can be listed and revoked one by one, and serve the one
  identity they were minted for.
- 14: a client assertion (RFC 7523) is accepted once; the token signing key rotates, the old key
  validating (and published) until the tokens it signed have expired.
- Follow-up review: password guesses sent together are hashed no more than the lockout allows;
  a client assertion may live at most an hour, and one client cannot fill the replay cache.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import subprocess
import time
import uuid
from typing import Optional

import pytest
import requests

from test_certificate_credential import add_cert, make_cert
from test_identity import msi_token

from conftest import (
    DEFAULT_RG,
    IDENTITY_API,
    KAGI_BIN,
    LOCATION,
    KagiServer,
    assert_error_shape,
    b64url_decode,
    b64url_encode,
    create_sp,
    random_name,
    sp_token,
    update_vault_properties,
)

# The application id of tokens from the password grant when no client authenticated (docs/DESIGN.md).
PUBLIC_CLIENT_APP_ID = "2f0e6a3c-6b55-4c8e-9a4f-1d7b3e5c9a01"
USER_LOCKOUT_THRESHOLD = 5
SOURCE_LOCKOUT_THRESHOLD = 20
PASSWORD = "correct horse battery staple"


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def claims_of(token: str) -> dict:
    return json.loads(b64url_decode(token.split(".")[1]))


def header_of(token: str) -> dict:
    return json.loads(b64url_decode(token.split(".")[0]))


def token_url(srv: KagiServer, tenant: Optional[str] = None) -> str:
    return f"{srv.base}/{tenant or srv.tenant_id}/oauth2/v2.0/token"


def create_user(srv: KagiServer, password: str = PASSWORD) -> dict:
    upn = f"u{uuid.uuid4().hex[:10]}@contoso.example"
    r = srv.request(
        "POST",
        f"{srv.base}/v1.0/users",
        json={"displayName": upn, "userPrincipalName": upn, "passwordProfile": {"password": password}},
    )
    assert r.status_code == 201, r.text
    return r.json()


def password_grant(srv: KagiServer, upn: str, password: str, **extra) -> requests.Response:
    data = {
        "grant_type": "password",
        "client_id": extra.pop("client_id", str(uuid.uuid4())),
        "username": upn,
        "password": password,
        "scope": f"{srv.scope} offline_access openid profile",
    }
    data.update(extra)
    return requests.post(token_url(srv), data=data, verify=str(srv.ca_path), timeout=60)


def assert_oauth_error(r: requests.Response, status: int, error: Optional[str] = None) -> dict:
    assert r.status_code == status, f"expected {status}, got {r.status_code}: {r.text[:400]}"
    body = r.json()
    assert isinstance(body.get("error"), str) and body["error"], body
    assert body.get("error_description", "").startswith("AADSTS"), body
    assert isinstance(body.get("error_codes"), list) and body["error_codes"], body
    if error is not None:
        assert body["error"] == error, body
    assert "access_token" not in body
    return body


def assert_throttled(r: requests.Response) -> int:
    body = assert_oauth_error(r, 429)
    retry = r.headers.get("Retry-After")
    assert retry is not None and retry.isdigit() and int(retry) >= 1, (r.headers, body)
    return int(retry)


def advance(srv: KagiServer, seconds: int) -> None:
    # A fresh token each time: a cached one may have expired on the server's moved clock.
    r = srv.request(
        "POST",
        f"{srv.base}/kagi/test/clock",
        auth=False,
        headers={"Authorization": f"Bearer {fresh_admin_token(srv)}"},
        json={"advanceSeconds": seconds},
    )
    assert r.status_code == 200, r.text[:300]


def get_key_as(srv: KagiServer, vault, token: str, name: str) -> requests.Response:
    return srv.request(
        "GET", vault.data_url(f"/keys/{name}"), auth=False, headers={"Authorization": f"Bearer {token}"}
    )


def cli(srv: KagiServer, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [str(KAGI_BIN), *args, "--server", srv.base, "--data-dir", str(srv.data_dir), "--output", "json"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if check:
        assert p.returncode == 0, f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-1500:]}\n{p.stderr[-1500:]}"
    return p


# ---------------------------------------------------------------------------------------------
# 8: compound identities need an authenticated client
# ---------------------------------------------------------------------------------------------


def compound(srv: KagiServer, user: dict, app_id: str) -> dict:
    """An access-policy entry for "user via application app_id" that grants keys/get."""
    return {"tenantId": srv.tenant_id, "objectId": user["objectId"], "applicationId": app_id, "permissions": {"keys": ["get"]}}


def test_password_grant_client_id_alone_is_not_a_compound_identity(kagi, vault):
    user = create_user(kagi)
    app = create_sp(kagi, random_name("app", 12))
    vault.client.create_rsa_key("compound", size=2048)
    r = update_vault_properties(kagi, vault, accessPolicies=[compound(kagi, user, app["clientId"])])
    assert r.status_code == 200, r.text[:300]

    # The user names application X without its credential: refused, as Entra refuses a
    # confidential client that does not authenticate (AADSTS7000218).
    r = password_grant(kagi, user["userPrincipalName"], PASSWORD, client_id=app["clientId"])
    assert_oauth_error(r, 401, "invalid_client")

    # Without naming a registered application: a token of kagi's public client, which no access
    # policy's applicationId matches, and which the compound policy does not admit.
    r = password_grant(kagi, user["userPrincipalName"], PASSWORD)
    assert r.status_code == 200, r.text[:300]
    public = r.json()["access_token"]
    assert claims_of(public)["appid"] == PUBLIC_CLIENT_APP_ID
    assert get_key_as(kagi, vault, public, "compound").status_code == 403

    # A policy that names the public client as its application admits nobody through it.
    policies = [compound(kagi, user, PUBLIC_CLIENT_APP_ID), compound(kagi, user, app["clientId"])]
    r = update_vault_properties(kagi, vault, accessPolicies=policies)
    assert r.status_code == 200, r.text[:300]
    assert get_key_as(kagi, vault, public, "compound").status_code == 403

    # A wrong client secret: 401 invalid_client, no token.
    r = password_grant(kagi, user["userPrincipalName"], PASSWORD, client_id=app["clientId"], client_secret="wrong")
    assert_oauth_error(r, 401, "invalid_client")

    # With the application's secret: the token names it, and the compound policy applies.
    r = password_grant(
        kagi, user["userPrincipalName"], PASSWORD, client_id=app["clientId"], client_secret=app["clientSecret"]
    )
    assert r.status_code == 200, r.text[:300]
    via_app = r.json()["access_token"]
    c = claims_of(via_app)
    assert c["appid"] == app["clientId"] and c["oid"] == user["objectId"], c
    assert get_key_as(kagi, vault, via_app, "compound").status_code == 200


# ---------------------------------------------------------------------------------------------
# 9: throttling the password grant
# ---------------------------------------------------------------------------------------------


def test_password_grant_locks_out_a_user_name_known_or_not(clock_kagi):
    srv = clock_kagi
    user = create_user(srv)
    known = user["userPrincipalName"]
    unknown = f"nobody-{uuid.uuid4().hex[:8]}@contoso.example"
    for name in (known, unknown):
        for _ in range(USER_LOCKOUT_THRESHOLD):
            assert_oauth_error(password_grant(srv, name, "a wrong password!"), 400, "invalid_grant")
        # Locked: answered before any hash is computed, and alike for both names.
        retry = assert_throttled(password_grant(srv, name, "a wrong password!"))
        assert retry <= 60, retry
    # The right password is refused too while the name is locked.
    r = password_grant(srv, known, PASSWORD)
    retry = assert_throttled(r)
    body_known = r.json()
    body_unknown = password_grant(srv, unknown, PASSWORD).json()
    assert body_known["error"] == body_unknown["error"] and body_known["error_codes"] == body_unknown["error_codes"]
    # Once the lockout has passed, the right password works (and clears the count).
    advance(srv, retry + 1)
    r = password_grant(srv, known, PASSWORD)
    assert r.status_code == 200, r.text[:300]
    # Another user name is not affected by this one's lockout.
    other = create_user(srv)
    assert password_grant(srv, other["userPrincipalName"], PASSWORD).status_code == 200


def test_password_grant_throttles_a_source_address(private_kagi):
    srv = private_kagi
    user = create_user(srv)
    # Spraying: one failure per user name, never enough to lock a name, from one address.
    for i in range(SOURCE_LOCKOUT_THRESHOLD):
        r = password_grant(srv, f"spray{i}-{uuid.uuid4().hex[:6]}@contoso.example", "a wrong password!")
        assert_oauth_error(r, 400, "invalid_grant")
    assert_throttled(password_grant(srv, f"spray-{uuid.uuid4().hex[:6]}@contoso.example", "a wrong password!"))
    # The whole address is throttled, whatever the name; other grants are not.
    assert_throttled(password_grant(srv, user["userPrincipalName"], PASSWORD))
    assert srv.token()


# ---------------------------------------------------------------------------------------------
# 12: workload bindings expire, are revocable, and serve one identity
# ---------------------------------------------------------------------------------------------


def put_uami(srv: KagiServer, rg: str) -> dict:
    path = f"/subscriptions/{srv.subscription_id}/resourceGroups/{rg}/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{random_name('uami', 12)}"
    r = srv.request("PUT", srv.arm(path, IDENTITY_API), json={"location": LOCATION})
    assert r.status_code == 201, r.text[:300]
    return r.json()


def put_workload(srv: KagiServer, rg: str, identity: dict) -> dict:
    path = f"/subscriptions/{srv.subscription_id}/resourceGroups/{rg}/providers/Kagi.Compute/workloads/{random_name('wl', 12)}"
    r = srv.request("PUT", srv.arm(path, IDENTITY_API), json={"location": LOCATION, "identity": identity})
    assert r.status_code == 201, r.text[:300]
    return r.json()


def bind(srv: KagiServer, resource_id: str, client_id: Optional[str] = None, hours: Optional[int] = None):
    url = srv.arm(f"{resource_id}/listIdentityEnvironment", IDENTITY_API)
    if client_id:
        url += f"&clientId={client_id}"
    if hours is not None:
        url += f"&expiresInHours={hours}"
    return srv.request("POST", url)


@pytest.fixture
def workload(kagi):
    rg = random_name("hirg", 14)
    kagi.put_rg(rg)
    uami = put_uami(kagi, rg)
    wl = put_workload(kagi, rg, {"type": "SystemAssigned, UserAssigned", "userAssignedIdentities": {uami["id"]: {}}})
    return wl, uami


def test_binding_serves_only_the_identity_it_was_minted_for(kagi, workload):
    wl, uami = workload
    uami_cid = uami["properties"]["clientId"]
    r = bind(kagi, wl["id"])
    assert r.status_code == 200, r.text[:300]
    system = r.json()
    r = msi_token(kagi, system["IDENTITY_HEADER"])
    assert r.status_code == 200, r.text[:300]
    system_cid = claims_of(r.json()["access_token"])["appid"]
    assert claims_of(r.json()["access_token"])["oid"] == wl["identity"]["principalId"]
    # The system-assigned identity's binding cannot get the user-assigned identity's token.
    r = msi_token(kagi, system["IDENTITY_HEADER"], client_id=uami_cid)
    assert r.status_code == 400 and "access_token" not in r.text, r.text[:300]

    r = bind(kagi, wl["id"], client_id=uami_cid)
    assert r.status_code == 200, r.text[:300]
    named = r.json()
    assert named["AZURE_CLIENT_ID"] == uami_cid
    # Without a selector it serves its identity; the other identity is refused.
    r = msi_token(kagi, named["IDENTITY_HEADER"])
    assert r.status_code == 200 and claims_of(r.json()["access_token"])["appid"] == uami_cid, r.text[:300]
    r = msi_token(kagi, named["IDENTITY_HEADER"], client_id=system_cid)
    assert r.status_code == 400 and "access_token" not in r.text, r.text[:300]


def test_binding_expires(clock_kagi):
    srv = clock_kagi
    rg = random_name("hirg", 14)
    srv.put_rg(rg)
    wl = put_workload(srv, rg, {"type": "SystemAssigned"})
    r = bind(srv, wl["id"])
    assert r.status_code == 200, r.text[:300]
    default = r.json()
    r = bind(srv, wl["id"], hours=2)
    assert r.status_code == 200, r.text[:300]
    short = r.json()
    for env in (default, short):
        assert msi_token(srv, env["IDENTITY_HEADER"]).status_code == 200
    listed = {b["id"]: b for b in list_bindings(srv, wl["id"])}
    assert set(listed) == {default["binding"]["id"], short["binding"]["id"]}, listed
    exp_default = datetime.datetime.fromisoformat(listed[default["binding"]["id"]]["expiresOn"].replace("Z", "+00:00"))
    exp_short = datetime.datetime.fromisoformat(listed[short["binding"]["id"]]["expiresOn"].replace("Z", "+00:00"))
    assert exp_default - exp_short >= datetime.timedelta(days=89), (exp_default, exp_short)
    # Out-of-range lifetimes are refused.
    for hours in (0, 8761, -1):
        assert_error_shape(bind(srv, wl["id"], hours=hours), 400)

    advance(srv, 2 * 3600 + 1)
    assert msi_token(srv, short["IDENTITY_HEADER"]).status_code == 401
    assert msi_token(srv, default["IDENTITY_HEADER"]).status_code == 200
    advance(srv, 90 * 86400)
    assert msi_token(srv, default["IDENTITY_HEADER"]).status_code == 401


def list_bindings(srv: KagiServer, resource_id: str) -> list:
    r = srv.request("GET", srv.arm(f"{resource_id}/identityBindings", IDENTITY_API))
    assert r.status_code == 200, r.text[:300]
    value = r.json()["value"]
    for b in value:
        assert "IDENTITY_HEADER" not in b and "secret" not in json.dumps(b).lower(), b
    return value


def test_binding_revocation_one_at_a_time(kagi, workload):
    wl, uami = workload
    first = bind(kagi, wl["id"]).json()
    second = bind(kagi, wl["id"], client_id=uami["properties"]["clientId"]).json()
    listed = list_bindings(kagi, wl["id"])
    by_id = {b["id"]: b for b in listed}
    assert by_id[second["binding"]["id"]]["clientId"] == uami["properties"]["clientId"], listed
    assert first["binding"]["id"] in by_id, listed

    # CLI: list and revoke by id.
    out = json.loads(cli(kagi, "identity", "binding", "list", "--resource", wl["id"]).stdout)
    assert {b["id"] for b in out["value"]} == set(by_id), out
    cli(kagi, "identity", "binding", "revoke", "--resource", wl["id"], "--id", first["binding"]["id"])
    assert msi_token(kagi, first["IDENTITY_HEADER"]).status_code == 401
    assert msi_token(kagi, second["IDENTITY_HEADER"]).status_code == 200
    assert [b["id"] for b in list_bindings(kagi, wl["id"])] == [second["binding"]["id"]]

    # Revoking again, or an unknown id: 404 in Azure's error shape.
    r = kagi.request("DELETE", kagi.arm(f"{wl['id']}/identityBindings/{first['binding']['id']}", IDENTITY_API))
    assert_error_shape(r, 404)
    r = kagi.request("DELETE", kagi.arm(f"{wl['id']}/identityBindings/{second['binding']['id']}", IDENTITY_API))
    assert r.status_code == 200, r.text[:300]
    assert msi_token(kagi, second["IDENTITY_HEADER"]).status_code == 401


def test_identity_env_cli_expiry_flag(kagi, workload):
    wl, _ = workload
    p = cli(kagi, "identity", "env", "--resource", wl["id"], "--expires-in-hours", "5")
    env = json.loads(p.stdout)
    expires = datetime.datetime.fromisoformat(env["binding"]["expiresOn"].replace("Z", "+00:00"))
    now = datetime.datetime.now(datetime.timezone.utc)
    assert datetime.timedelta(hours=4) < expires - now <= datetime.timedelta(hours=5, minutes=1), (expires, now)
    assert msi_token(kagi, env["IDENTITY_HEADER"]).status_code == 200


# ---------------------------------------------------------------------------------------------
# 14: client assertions are accepted once
# ---------------------------------------------------------------------------------------------


def certificate(tmp_path):
    """A self-signed certificate (from test_certificate_credential): its key, DER and PEM."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    path, pem = make_cert(tmp_path, "replay")
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    der = x509.load_pem_x509_certificate(pem.encode()).public_bytes(serialization.Encoding.DER)
    return key, der, pem


def assertion(srv: KagiServer, sp: dict, key, der: bytes, jti: Optional[str], lifetime: int = 600) -> str:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    header = {"alg": "RS256", "typ": "JWT", "x5t#S256": b64url_encode(hashlib.sha256(der).digest())}
    now = int(time.time())
    body = {"aud": token_url(srv), "iss": sp["clientId"], "sub": sp["clientId"], "iat": now, "exp": now + lifetime}
    if jti is not None:
        body["jti"] = jti
    signing_input = f"{b64url_encode(json.dumps(header).encode())}.{b64url_encode(json.dumps(body).encode())}"
    sig = key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{b64url_encode(sig)}"


def assertion_grant(srv: KagiServer, sp: dict, jwt: str, session=requests) -> requests.Response:
    return session.post(
        token_url(srv),
        data={
            "grant_type": "client_credentials",
            "client_id": sp["clientId"],
            "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            "client_assertion": jwt,
            "scope": srv.scope,
        },
        verify=str(srv.ca_path),
        timeout=30,
    )


def test_client_assertion_replay_is_refused(kagi, tmp_path):
    sp = create_sp(kagi, random_name("cert", 12))
    key, der, pem = certificate(tmp_path)
    r = add_cert(kagi, sp["objectId"], pem)
    assert r.status_code == 200, r.text[:300]
    jwt = assertion(kagi, sp, key, der, str(uuid.uuid4()))
    assert assertion_grant(kagi, sp, jwt).status_code == 200
    body = assert_oauth_error(assertion_grant(kagi, sp, jwt), 401, "invalid_client")
    assert "jti" in body["error_description"], body
    # A fresh assertion (new jti) is accepted; one without a jti is not.
    assert assertion_grant(kagi, sp, assertion(kagi, sp, key, der, str(uuid.uuid4()))).status_code == 200
    assert_oauth_error(assertion_grant(kagi, sp, assertion(kagi, sp, key, der, None)), 401, "invalid_client")


# ---------------------------------------------------------------------------------------------
# 14: rotating the token signing key
# ---------------------------------------------------------------------------------------------


def jwks_kids(srv: KagiServer) -> set:
    r = requests.get(f"{srv.base}/{srv.tenant_id}/discovery/v2.0/keys", verify=str(srv.ca_path), timeout=30)
    assert r.status_code == 200, r.text[:300]
    return {k["kid"] for k in r.json()["keys"]}


def arm_with(srv: KagiServer, token: str) -> requests.Response:
    return srv.request(
        "GET",
        srv.arm(srv.rg_path(DEFAULT_RG), "2021-04-01"),
        auth=False,
        headers={"Authorization": f"Bearer {token}"},
    )


def fresh_admin_token(srv: KagiServer) -> str:
    return sp_token(srv, {"tenantId": srv.tenant_id, "clientId": srv.admin["clientId"], "clientSecret": srv.admin["clientSecret"]})


def test_signing_key_rotation(clock_kagi):
    srv = clock_kagi
    old_token = fresh_admin_token(srv)
    old_kid = header_of(old_token)["kid"]
    assert jwks_kids(srv) == {old_kid}

    # Only the administrator may rotate.
    sp = create_sp(srv, random_name("sp", 12))
    r = srv.request("POST", f"{srv.base}/kagi/admin/signingKeys/rotate", auth=False,
                    headers={"Authorization": f"Bearer {sp_token(srv, sp)}"}, json={})  # fmt: skip
    assert_error_shape(r, 403)

    out = json.loads(cli(srv, "identity", "signing-key", "rotate").stdout)
    current = [k for k in out["value"] if k["status"] == "Current"]
    assert len(current) == 1 and current[0]["kid"] != old_kid, out
    new_kid = current[0]["kid"]
    assert {k["kid"] for k in out["value"] if k["status"] == "Retired"} == {old_kid}, out

    # Both keys validate and both are published; new tokens carry the new key.
    assert jwks_kids(srv) == {old_kid, new_kid}
    assert arm_with(srv, old_token).status_code == 200
    new_token = fresh_admin_token(srv)
    assert header_of(new_token)["kid"] == new_kid
    assert arm_with(srv, new_token).status_code == 200

    # Across a restart too.
    srv.restart()
    assert arm_with(srv, old_token).status_code == 200
    assert jwks_kids(srv) == {old_kid, new_kid}
    listed = srv.request("GET", f"{srv.base}/kagi/admin/signingKeys")
    assert listed.status_code == 200 and {k["kid"] for k in listed.json()["value"]} == {old_kid, new_kid}, listed.text

    # Once every token of the old key has expired, the old key is gone.
    advance(srv, 3600 + 120)
    assert jwks_kids(srv) == {new_kid}
    assert arm_with(srv, fresh_admin_token(srv)).status_code == 200

    # --revoke-previous: the previous key stops validating at once (a leaked key).
    before = fresh_admin_token(srv)
    out = json.loads(cli(srv, "identity", "signing-key", "rotate", "--revoke-previous").stdout)
    assert [k["status"] for k in out["value"]] == ["Current"], out
    assert arm_with(srv, before).status_code == 401
    assert arm_with(srv, fresh_admin_token(srv)).status_code == 200


# ---------------------------------------------------------------------------------------------
# Follow-up review of the token endpoint: throttles that hold under concurrency, and a replay
# cache that one client cannot fill.
# ---------------------------------------------------------------------------------------------

# A client assertion may be valid for at most this long (from nbf, else iat, to exp), and one
# client may have at most this many remembered (crates/vault/src/token_guards.rs).
MAX_ASSERTION_LIFETIME = 3600
REPLAY_PER_CLIENT = 1000


def test_password_guesses_sent_together_are_hashed_no_more_than_the_lockout_allows(private_kagi):
    from concurrent.futures import ThreadPoolExecutor

    srv = private_kagi
    name = f"target-{uuid.uuid4().hex[:8]}@contoso.example"
    guesses = 6 * USER_LOCKOUT_THRESHOLD
    with ThreadPoolExecutor(max_workers=guesses) as pool:
        answers = list(pool.map(lambda _: password_grant(srv, name, "a wrong password!"), range(guesses)))
    statuses = sorted(r.status_code for r in answers)
    # Each guess takes its place in the name's budget before it is hashed, so guesses arriving
    # together cannot all pass a check made before the first of them failed.
    assert statuses.count(400) == USER_LOCKOUT_THRESHOLD, statuses
    for r in answers:
        if r.status_code == 400:
            assert_oauth_error(r, 400, "invalid_grant")
        else:
            assert_throttled(r)


def test_client_assertion_valid_for_too_long_is_refused(kagi, tmp_path):
    sp = create_sp(kagi, random_name("cert", 12))
    key, der, pem = certificate(tmp_path)
    assert add_cert(kagi, sp["objectId"], pem).status_code == 200
    jwt = assertion(kagi, sp, key, der, str(uuid.uuid4()), lifetime=2 * MAX_ASSERTION_LIFETIME)
    body = assert_oauth_error(assertion_grant(kagi, sp, jwt), 401, "invalid_client")
    assert body["error_codes"] == [700024], body
    assert str(MAX_ASSERTION_LIFETIME) in body["error_description"], body
    jwt = assertion(kagi, sp, key, der, str(uuid.uuid4()), lifetime=MAX_ASSERTION_LIFETIME - 120)
    assert assertion_grant(kagi, sp, jwt).status_code == 200


def test_one_client_cannot_fill_the_assertion_replay_cache(private_kagi, tmp_path):
    srv = private_kagi
    greedy, other = (create_sp(srv, random_name("cert", 12)) for _ in range(2))
    creds = {}
    for sp in (greedy, other):
        key, der, pem = certificate(tmp_path)
        assert add_cert(srv, sp["objectId"], pem).status_code == 200
        creds[sp["clientId"]] = (key, der)

    def fresh(sp: dict) -> str:
        return assertion(srv, sp, *creds[sp["clientId"]], str(uuid.uuid4()))

    with requests.Session() as session:
        session.verify = str(srv.ca_path)
        for i in range(REPLAY_PER_CLIENT):
            r = assertion_grant(srv, greedy, fresh(greedy), session)
            assert r.status_code == 200, (i, r.text[:300])
        # Its share is used up: its own new assertions are refused until its old ones expire.
        assert_throttled(assertion_grant(srv, greedy, fresh(greedy), session))
        # Another client's are not.
        assert assertion_grant(srv, other, fresh(other), session).status_code == 200
