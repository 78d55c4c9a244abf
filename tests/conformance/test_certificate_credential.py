"""Service principals with certificate credentials: the unmodified ClientCertificateCredential
(MSAL client assertion, PS256 with x5t#S256) gets tokens from kagi and uses a vault."""

import datetime
import os

import pytest
from azure.core.exceptions import ClientAuthenticationError
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID


def make_cert(tmp_path, name):
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path = tmp_path / f"{name}.pem"
    path.write_bytes(key_pem + cert_pem)
    return path, cert_pem.decode()


def create_sp(kagi, name):
    r = kagi.request("POST", f"{kagi.base}/v1.0/servicePrincipals", json={"displayName": name})
    assert r.status_code == 201, r.text
    return r.json()


def add_cert(kagi, oid, pem):
    return kagi.request(
        "POST",
        f"{kagi.base}/v1.0/servicePrincipals/{oid}/addKey",
        json={"keyCredential": {"type": "AsymmetricX509Cert", "usage": "Verify", "key": pem}},
    )


def cert_credential(kagi, sp, path):
    from azure.identity import CertificateCredential

    return CertificateCredential(
        sp["tenantId"],
        sp["clientId"],
        certificate_path=str(path),
        authority=kagi.base,
        disable_instance_discovery=True,
        connection_verify=str(kagi.ca_path),
    )


def grant(kagi, vault, oid, keys):
    body = kagi.vault_body(kagi.tenant_id)
    body["properties"]["accessPolicies"] = [
        {"tenantId": kagi.tenant_id, "objectId": oid, "permissions": {"keys": keys}}
    ]
    r = kagi.put_vault_raw(vault.name, vault.rg, body=body)
    assert r.status_code == 200, r.text


def test_certificate_credential_reaches_a_vault(kagi, vault, tmp_path):
    sp = create_sp(kagi, "cert-app")
    path, pem = make_cert(tmp_path, "cert-app")
    r = add_cert(kagi, sp["objectId"], pem)
    assert r.status_code == 200, r.text
    assert r.json()["keyCredentials"][0]["type"] == "AsymmetricX509Cert"
    vault.client.create_rsa_key("k", size=2048)
    grant(kagi, vault, sp["objectId"], ["get"])
    client = kagi.key_client(vault.url, credential=cert_credential(kagi, sp, path))
    assert client.get_key("k").name == "k"
    # The same certificate cannot be registered twice.
    assert add_cert(kagi, sp["objectId"], pem).status_code == 409


def test_unregistered_certificate_is_refused(kagi, tmp_path):
    sp = create_sp(kagi, "cert-app-2")
    registered_path, pem = make_cert(tmp_path, "registered")
    assert add_cert(kagi, sp["objectId"], pem).status_code == 200
    other_path, _ = make_cert(tmp_path, "other")
    with pytest.raises(ClientAuthenticationError):
        cert_credential(kagi, sp, other_path).get_token(kagi.scope)
    # The registered one works, for this client only.
    assert cert_credential(kagi, sp, registered_path).get_token(kagi.scope).token
    sp2 = create_sp(kagi, "cert-app-3")
    with pytest.raises(ClientAuthenticationError):
        cert_credential(kagi, sp2, registered_path).get_token(kagi.scope)


def test_bad_certificate_input_is_400(kagi):
    sp = create_sp(kagi, "cert-app-4")
    for bad in ["", "not base64 !!", "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"]:
        r = add_cert(kagi, sp["objectId"], bad)
        assert r.status_code == 400, (bad, r.status_code, r.text)
        assert r.json()["error"]["code"] == "BadRequest"
