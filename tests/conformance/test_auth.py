"""Authentication: the Key Vault challenge, OIDC discovery, token issuance."""

import base64
import json
import time

import pytest
import requests
from azure.core.exceptions import ClientAuthenticationError
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from conftest import DATA_API, assert_error_shape, b64url_decode, parse_challenge, random_name


def _expected_challenge(kagi):
    return {"authorization": f"{kagi.base}/{kagi.tenant_id}", "resource": kagi.base}


def _assert_challenge(kagi, resp):
    assert resp.status_code == 401, resp.text[:300]
    header = resp.headers.get("WWW-Authenticate")
    assert header, f"401 without WWW-Authenticate; headers={dict(resp.headers)}"
    scheme, params = parse_challenge(header)
    assert scheme == "Bearer", header
    # Exactly these two parameters, exactly these values (the SDK derives tenant and scope from them;
    # it splits on ',' and '=' so values must contain neither).
    assert params == _expected_challenge(kagi), header
    # The exact rendering the contract promises.
    assert header == (
        f'Bearer authorization="{kagi.base}/{kagi.tenant_id}", resource="{kagi.base}"'
    ), header


def test_no_token_gets_401_with_exact_challenge(kagi, vault):
    r = vault.raw("GET", "/keys", auth=False)
    _assert_challenge(kagi, r)
    err = assert_error_shape(r, 401)
    assert err["code"] == "Unauthorized", err


def test_challenge_precedes_body_parsing(kagi, vault):
    """The SDK's first request is bodiless (Content-Length: 0) but keeps Content-Type: application/json.
    The server must answer 401 + challenge before looking at the (empty or garbage) body."""
    for body in (b"", b"{not json"):
        r = vault.raw(
            "POST",
            "/keys/challenge-probe/create",
            auth=False,
            data=body,
            headers={"Content-Type": "application/json", "Content-Length": str(len(body))},
        )
        _assert_challenge(kagi, r)
    # nothing was created by the unauthenticated calls
    assert vault.key_names() == []


def test_challenge_on_every_vault_path(kagi, vault):
    for method, path in [
        ("GET", "/keys/somekey/"),
        ("GET", "/deletedkeys"),
        ("POST", "/keys/somekey/abcdef0123456789abcdef0123456789/unwrapkey"),
        ("POST", "/rng"),
    ]:
        _assert_challenge(kagi, vault.raw(method, path, auth=False))


def test_bogus_token_is_401(kagi, vault):
    for token in ("not-a-jwt", "eyJhbGciOiJSUzI1NiJ9.eyJ0aWQiOiJ4In0.c2lnbmF0dXJl"):
        r = vault.raw("GET", "/keys", auth=False, headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 401, r.text[:300]
        # The challenge must come back with a rejected token too: that is how the SDK re-authenticates.
        assert r.headers.get("WWW-Authenticate"), dict(r.headers)
        assert_error_shape(r, 401)


def test_tampered_token_is_401(kagi, vault):
    tok = kagi.token()
    head, payload, sig = tok.split(".")
    claims = json.loads(b64url_decode(payload))
    claims["tid"] = "00000000-0000-0000-0000-000000000000"
    forged_payload = base64.urlsafe_b64encode(json.dumps(claims).encode()).decode().rstrip("=")
    r = vault.raw("GET", "/keys", auth=False, headers={"Authorization": f"Bearer {head}.{forged_payload}.{sig}"})
    assert r.status_code == 401, r.text[:300]
    # and the genuine token works
    r = vault.raw("GET", "/keys", auth=False, headers={"Authorization": f"Bearer {tok}"})
    assert r.status_code == 200, r.text[:300]
    assert r.json()["value"] == []


def test_oidc_discovery_document(kagi):
    r = requests.get(
        f"{kagi.base}/{kagi.tenant_id}/v2.0/.well-known/openid-configuration", verify=str(kagi.ca_path), timeout=30
    )
    assert r.status_code == 200, r.text[:300]
    doc = r.json()
    for k in ("token_endpoint", "authorization_endpoint", "issuer", "jwks_uri"):
        assert isinstance(doc.get(k), str) and doc[k].startswith("https://"), (k, doc)
    assert doc["token_endpoint"].startswith(kagi.base + "/"), doc
    assert doc["authorization_endpoint"].startswith(kagi.base + "/"), doc
    assert doc["issuer"].startswith(kagi.base + "/") and kagi.tenant_id in doc["issuer"], doc

    jr = requests.get(doc["jwks_uri"], verify=str(kagi.ca_path), timeout=30)
    assert jr.status_code == 200, jr.text[:300]
    jwks = jr.json()
    assert isinstance(jwks.get("keys"), list) and jwks["keys"], jwks
    for k in jwks["keys"]:
        assert k.get("kty") in ("RSA", "EC"), k
        assert k.get("kid"), k
        assert "d" not in k and "p" not in k, "JWKS must not publish private key material"


def _public_key_from_jwk(jwk):
    if jwk["kty"] == "RSA":
        n = int.from_bytes(b64url_decode(jwk["n"]), "big")
        e = int.from_bytes(b64url_decode(jwk["e"]), "big")
        return rsa.RSAPublicNumbers(e, n).public_key()
    curve = {"P-256": ec.SECP256R1(), "P-384": ec.SECP384R1(), "P-521": ec.SECP521R1()}[jwk["crv"]]
    x = int.from_bytes(b64url_decode(jwk["x"]), "big")
    y = int.from_bytes(b64url_decode(jwk["y"]), "big")
    return ec.EllipticCurvePublicNumbers(x, y, curve).public_key()


def test_token_is_a_jwt_signed_by_a_published_key(kagi):
    tok = kagi.token()
    parts = tok.split(".")
    assert len(parts) == 3, "access token must be a JWS compact JWT"
    header = json.loads(b64url_decode(parts[0]))
    claims = json.loads(b64url_decode(parts[1]))
    sig = b64url_decode(parts[2])
    assert claims.get("tid") == kagi.tenant_id, claims  # az CLI needs tid
    assert claims.get("exp", 0) > time.time() + 300, claims
    assert claims.get("iss", "").startswith(kagi.base), claims

    doc = requests.get(
        f"{kagi.base}/{kagi.tenant_id}/v2.0/.well-known/openid-configuration", verify=str(kagi.ca_path), timeout=30
    ).json()
    keys = requests.get(doc["jwks_uri"], verify=str(kagi.ca_path), timeout=30).json()["keys"]
    matching = [k for k in keys if k.get("kid") == header.get("kid")] if header.get("kid") else keys
    assert matching, f"token kid {header.get('kid')} not in JWKS"
    signed = (parts[0] + "." + parts[1]).encode()
    alg = header["alg"]
    hash_alg = {"256": hashes.SHA256(), "384": hashes.SHA384(), "512": hashes.SHA512()}[alg[-3:]]
    ok = False
    for jwk in matching:
        pub = _public_key_from_jwk(jwk)
        try:
            if alg.startswith("RS"):
                pub.verify(sig, signed, padding.PKCS1v15(), hash_alg)
            elif alg.startswith("PS"):
                pub.verify(sig, signed, padding.PSS(padding.MGF1(hash_alg), hash_alg.digest_size), hash_alg)
            elif alg.startswith("ES"):
                half = len(sig) // 2
                der = encode_dss_signature(int.from_bytes(sig[:half], "big"), int.from_bytes(sig[half:], "big"))
                pub.verify(der, signed, ec.ECDSA(hash_alg))
            else:
                pytest.fail(f"unexpected JWT alg {alg}")
            ok = True
            break
        except Exception:
            continue
    assert ok, "token signature does not verify against the published JWKS"


def test_wrong_secret_is_rejected(kagi):
    cred = kagi.new_credential(secret="definitely-not-the-secret")
    with pytest.raises(ClientAuthenticationError):
        cred.get_token(kagi.scope)


def test_wrong_client_id_is_rejected(kagi):
    from azure.identity import ClientSecretCredential

    cred = ClientSecretCredential(
        kagi.tenant_id,
        "11111111-2222-3333-4444-555555555555",
        kagi.admin["clientSecret"],
        authority=kagi.base,
        disable_instance_discovery=True,
        connection_verify=str(kagi.ca_path),
    )
    with pytest.raises(ClientAuthenticationError):
        cred.get_token(kagi.scope)


def test_sdk_with_wrong_secret_fails_cleanly(kagi, vault):
    client = kagi.key_client(vault.url, credential=kagi.new_credential(secret="wrong"))
    with pytest.raises(ClientAuthenticationError):
        client.get_key("anything")


def test_unknown_vault_host_is_404(kagi):
    name = random_name("nx", 16)
    r = kagi.request("GET", f"https://{name}.localhost:{kagi.port}/keys?api-version={DATA_API}")
    assert r.status_code == 404, r.text[:300]
    assert r.status_code != 500


def test_sdk_round_trip_smoke(kagi, vault):
    """The whole SDK path: challenge, token for the challenged tenant/scope, body replay."""
    key = vault.client.create_ec_key("smoke")
    assert key.name == "smoke"
    assert key.id.startswith(vault.url + "keys/smoke/")
