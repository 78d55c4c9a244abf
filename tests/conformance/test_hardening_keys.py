"""Hardening of keys, secrets and the server's files (issue 11: items 10, 14, 15, 16).

- Key and secret backups restore only into a vault of the subscription, tenant and location of
  the vault they were taken from (Azure: same subscription and geography); blobs made before
  that binding restore only for the bootstrap administrator.
- Listing the versions of a name that does not exist answers 200 with an empty list, as Azure.
- EC keys on P-256K (secp256k1): create, import, sign and verify with ES256K.
- The data directory is 0700 and ``kagi.db`` 0600 even when they existed before.
- The local CA is name-constrained to the served DNS suffix (and the loopback addresses).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import uuid

import pytest
from azure.core.exceptions import HttpResponseError
from azure.keyvault.keys import JsonWebKey
from azure.keyvault.keys.crypto import SignatureAlgorithm
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    Prehashed,
    decode_dss_signature,
    encode_dss_signature,
)
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from conftest import (
    LOCATION,
    RG_API,
    b64url_decode,
    b64url_encode,
    create_sp,
    random_name,
    sp_credential,
    update_vault_properties,
)

# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def error_of(exc: HttpResponseError) -> dict:
    return exc.response.json()["error"]


def refused_as_other_place(call) -> dict:
    """The restore is refused with Azure's 400 BadParameter, naming the binding."""
    with pytest.raises(HttpResponseError) as ei:
        call()
    assert ei.value.status_code == 400, ei.value
    err = error_of(ei.value)
    assert err["code"] == "BadParameter", err
    assert err["message"].startswith("Cannot decrypt backup blob"), err
    return err


def put_vault(srv, sub: str, rg: str, tenant: str, location: str = LOCATION) -> str:
    """A vault in `sub`/`rg` with tenantId `tenant` at `location`; returns its URI."""
    name = random_name("hk", 16)
    body = srv.vault_body(tenant)
    body["location"] = location
    r = srv.request(
        "PUT", srv.arm(f"/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.KeyVault/vaults/{name}"),
        json=body,
    )
    assert r.status_code == 201, r.text
    return r.json()["properties"]["vaultUri"]


def new_subscription(srv, tenant: str | None = None) -> str:
    sub = str(uuid.uuid4())
    r = srv.request("PUT", f"{srv.base}/kagi/admin/subscriptions/{sub}", json={})
    assert r.status_code == 201, r.text
    if tenant:
        r = srv.request("POST", f"{srv.base}/kagi/admin/subscriptions/{sub}/changeDirectory", json={"tenantId": tenant})
        assert r.status_code == 200, r.text
    r = srv.request("PUT", srv.arm(f"/subscriptions/{sub}/resourcegroups/rg1", RG_API), json={"location": LOCATION})
    assert r.status_code in (200, 201), r.text
    return sub


def tenant_credential(srv, tenant: str):
    from azure.identity import ClientSecretCredential

    return ClientSecretCredential(
        tenant, srv.admin["clientId"], srv.admin["clientSecret"], authority=srv.base,
        disable_instance_discovery=True, connection_verify=str(srv.ca_path),
    )


KEY_BACKUP = (b"KAGI-KEY-BACKUP\x01", b"kagi/v1/key-backup")
SECRET_BACKUP = (b"KAGI-SECRET-BACKUP\x01", b"kagi/v1/secret-backup")


def as_legacy(srv, blob: bytes, kind) -> bytes:
    """The blob as a kagi before the binding made it (format 1, no `boundTo`), sealed again
    with the server's own root key (docs/FORMATS.md, "Sealing")."""
    magic, aad = kind
    root = (srv.data_dir / "root.key").read_bytes()
    subkey = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"kagi/v1/key-backup").derive(root)
    assert blob.startswith(magic)
    sealed = blob[len(magic):]
    assert sealed[0] == 1
    payload = json.loads(AESGCM(subkey).decrypt(sealed[1:13], sealed[13:], aad))
    assert payload["format"] == 2 and "boundTo" in payload, sorted(payload)
    payload["format"] = 1
    del payload["boundTo"]
    nonce = os.urandom(12)
    return magic + b"\x01" + nonce + AESGCM(subkey).encrypt(nonce, json.dumps(payload).encode(), aad)


# ---------------------------------------------------------------------------------------------
# item 10: backups are bound to their subscription, tenant and location
# ---------------------------------------------------------------------------------------------


def test_backups_restore_only_in_their_subscription_tenant_and_location(private_kagi):
    srv = private_kagi
    t1, sub1 = srv.tenant_id, srv.subscription_id
    src = srv.create_vault()
    src.client.create_ec_key("bound-key", curve="P-256")
    srv.secret_client(src.url).set_secret("bound-secret", "bound-value-51d0")
    kblob = src.client.backup_key("bound-key")
    sblob = srv.secret_client(src.url).backup_secret("bound-secret")

    # Same subscription, tenant and location: restores.
    same = put_vault(srv, sub1, "kagi-conformance", t1)
    assert srv.key_client(same).restore_key_backup(kblob).name == "bound-key"
    assert srv.secret_client(same).restore_secret_backup(sblob).name == "bound-secret"

    # Another subscription of the same tenant, same location: refused, nothing restored.
    sub2 = new_subscription(srv)
    elsewhere = put_vault(srv, sub2, "rg1", t1)
    refused_as_other_place(lambda: srv.key_client(elsewhere).restore_key_backup(kblob))
    refused_as_other_place(lambda: srv.secret_client(elsewhere).restore_secret_backup(sblob))
    assert list(srv.key_client(elsewhere).list_properties_of_keys()) == []
    assert list(srv.secret_client(elsewhere).list_properties_of_secrets()) == []

    # Same subscription, another location.
    far = put_vault(srv, sub1, "kagi-conformance", t1, location="eastus")
    refused_as_other_place(lambda: srv.key_client(far).restore_key_backup(kblob))
    refused_as_other_place(lambda: srv.secret_client(far).restore_secret_backup(sblob))

    # Same subscription and location, a vault of another tenant (reached with a token there).
    t2 = str(uuid.uuid4())
    new_subscription(srv, tenant=t2)  # makes t2 a tenant kagi knows
    foreign = put_vault(srv, sub1, "kagi-conformance", t2)
    cred = tenant_credential(srv, t2)
    refused_as_other_place(lambda: srv.key_client(foreign, credential=cred).restore_key_backup(kblob))
    refused_as_other_place(lambda: srv.secret_client(foreign, credential=cred).restore_secret_backup(sblob))
    assert list(srv.key_client(foreign, credential=cred).list_properties_of_keys()) == []


def test_blobs_made_before_the_binding_restore_only_for_the_administrator(private_kagi):
    srv = private_kagi
    src = srv.create_vault()
    src.client.create_rsa_key("old-key", size=2048)
    secrets = srv.secret_client(src.url)
    secrets.set_secret("old-secret", "old-value-93c1")
    legacy_key = as_legacy(srv, src.client.backup_key("old-key"), KEY_BACKUP)
    legacy_secret = as_legacy(srv, secrets.backup_secret("old-secret"), SECRET_BACKUP)

    # A service principal with every key and secret permission on a vault of the same place.
    sp = create_sp(srv)
    target = srv.create_vault()
    everything = {"keys": ["all"], "secrets": ["all"]}
    r = update_vault_properties(srv, target, accessPolicies=[
        {"tenantId": srv.tenant_id, "objectId": sp["objectId"], "permissions": everything}])
    assert r.status_code in (200, 201), r.text
    sp_keys = srv.key_client(target.url, credential=sp_credential(srv, sp))
    sp_secrets = srv.secret_client(target.url, credential=sp_credential(srv, sp))
    err = refused_as_other_place(lambda: sp_keys.restore_key_backup(legacy_key))
    assert "administrator" in err["message"], err
    refused_as_other_place(lambda: sp_secrets.restore_secret_backup(legacy_secret))
    assert list(sp_keys.list_properties_of_keys()) == []
    # The same principal restores a current blob of the same place.
    assert sp_keys.restore_key_backup(src.client.backup_key("old-key")).name == "old-key"

    # The bootstrap administrator restores the old blobs (nothing else is bound to them).
    other = srv.create_vault()
    assert other.client.restore_key_backup(legacy_key).name == "old-key"
    assert srv.secret_client(other.url).restore_secret_backup(legacy_secret).name == "old-secret"
    assert srv.secret_client(other.url).get_secret("old-secret").value == "old-value-93c1"


# ---------------------------------------------------------------------------------------------
# item 15: versions of a name that does not exist
# ---------------------------------------------------------------------------------------------


def test_versions_of_a_missing_name_are_an_empty_list(vault, kagi):
    assert list(vault.client.list_properties_of_key_versions("never-created")) == []
    secrets = kagi.secret_client(vault.url)
    assert list(secrets.list_properties_of_secret_versions("never-created")) == []
    for kind in ("keys", "secrets"):
        r = vault.raw("GET", f"/{kind}/never-created/versions")
        assert r.status_code == 200, r.text
        assert r.json() == {"value": [], "nextLink": None}
    # A soft-deleted name lists nothing either (its versions are under deletedkeys).
    vault.client.create_ec_key("gone", curve="P-256")
    vault.client.begin_delete_key("gone").wait()
    assert list(vault.client.list_properties_of_key_versions("gone")) == []


# ---------------------------------------------------------------------------------------------
# item 16: P-256K (secp256k1)
# ---------------------------------------------------------------------------------------------


def local_public(key) -> ec.EllipticCurvePublicKey:
    assert key.key.crv == "P-256K"
    return ec.EllipticCurvePublicNumbers(
        int.from_bytes(key.key.x, "big"), int.from_bytes(key.key.y, "big"), ec.SECP256K1()
    ).public_key()


def verify_locally(pub: ec.EllipticCurvePublicKey, digest: bytes, signature: bytes) -> None:
    assert len(signature) == 64
    der = encode_dss_signature(int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big"))
    pub.verify(der, digest, ec.ECDSA(Prehashed(hashes.SHA256())))  # raises if invalid


def server_verify(vault, key, digest: bytes, signature: bytes) -> bool:
    """The verify request the SDK sends when it cannot verify locally."""
    r = vault.raw(
        "POST", f"/keys/{key.name}/{key.properties.version}/verify",
        json={"alg": "ES256K", "digest": b64url_encode(digest), "value": b64url_encode(signature)},
    )
    assert r.status_code == 200, r.text
    return r.json()["value"]


def test_p256k_keys_create_sign_and_verify(vault, kagi):
    key = vault.client.create_ec_key("k1-created", curve="P-256K")
    assert key.key.kty == "EC" and key.key.crv == "P-256K"
    assert len(key.key.x) == 32 and len(key.key.y) == 32
    pub = local_public(key)
    digest = hashlib.sha256(b"secp256k1 through kagi").digest()
    for cc in (kagi.crypto_client(key), kagi.crypto_client(key.id)):
        signed = cc.sign(SignatureAlgorithm.es256_k, digest)
        assert signed.key_id == key.id
        verify_locally(pub, digest, signed.signature)
        assert cc.verify(SignatureAlgorithm.es256_k, digest, signed.signature).is_valid
        assert server_verify(vault, key, digest, signed.signature) is True
        bad = signed.signature[:-1] + bytes([signed.signature[-1] ^ 1])
        assert server_verify(vault, key, digest, bad) is False
    # ES256 is P-256's algorithm, not this curve's.
    with pytest.raises(HttpResponseError) as ei:
        kagi.crypto_client(key).sign(SignatureAlgorithm.es256, digest)
    assert ei.value.status_code == 400
    # Rotation keeps the curve.
    rotated = vault.client.rotate_key("k1-created")
    assert rotated.key.crv == "P-256K"


def test_p256k_import_and_signature_checked_with_cryptography(vault, kagi):
    local = ec.generate_private_key(ec.SECP256K1())
    nums = local.private_numbers()
    jwk = JsonWebKey(
        kty="EC", crv="P-256K", key_ops=["sign", "verify"],
        x=nums.public_numbers.x.to_bytes(32, "big"), y=nums.public_numbers.y.to_bytes(32, "big"),
        d=nums.private_value.to_bytes(32, "big"),
    )
    imported = vault.client.import_key("k1-imported", jwk)
    assert imported.key.crv == "P-256K"
    assert imported.key.x == jwk.x and imported.key.y == jwk.y
    assert imported.key.d is None
    digest = hashlib.sha256(b"signed by an imported secp256k1 key").digest()
    signed = kagi.crypto_client(imported).sign(SignatureAlgorithm.es256_k, digest)
    verify_locally(local.public_key(), digest, signed.signature)
    # A signature made locally verifies on the server.
    r, s = decode_dss_signature(local.sign(digest, ec.ECDSA(Prehashed(hashes.SHA256()))))
    raw = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    assert server_verify(vault, imported, digest, raw) is True
    # A P-256K point given as P-256 is not on that curve: refused.
    wrong = JsonWebKey(kty="EC", crv="P-256", x=jwk.x, y=jwk.y, d=jwk.d)
    with pytest.raises(HttpResponseError) as ei:
        vault.client.import_key("k1-wrong-curve", wrong)
    assert ei.value.status_code == 400


# ---------------------------------------------------------------------------------------------
# item 14: file modes and the CA's name constraints
# ---------------------------------------------------------------------------------------------


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.sqlite_store
def test_data_directory_and_store_are_private(private_kagi):
    srv = private_kagi
    # conftest creates the directory with Python's default mode (0755 under the usual umask)
    # before kagi starts, as an operator's `mkdir` would.
    assert mode(srv.data_dir) == 0o700, oct(mode(srv.data_dir))
    for name in ("kagi.db", "kagi.db-wal", "kagi.db-shm"):
        path = srv.data_dir / name
        if path.exists():
            assert mode(path) == 0o600, (name, oct(mode(path)))
    # An existing directory and database opened up by hand are closed again at the next start.
    srv.stop()
    os.chmod(srv.data_dir, 0o755)
    os.chmod(srv.data_dir / "kagi.db", 0o644)
    srv.start()
    assert mode(srv.data_dir) == 0o700
    assert mode(srv.data_dir / "kagi.db") == 0o600


def test_local_ca_is_limited_to_the_served_names(kagi, vault):
    ca = x509.load_pem_x509_certificate(kagi.ca_path.read_bytes())
    ext = ca.extensions.get_extension_for_class(x509.NameConstraints)
    assert ext.critical
    permitted = ext.value.permitted_subtrees
    assert [n.value for n in permitted if isinstance(n, x509.DNSName)] == ["localhost"]
    assert {str(n.value) for n in permitted if isinstance(n, x509.IPAddress)} == {"127.0.0.1/32", "::1/128"}
    assert ext.value.excluded_subtrees is None
    # OpenSSL (through requests and the SDK) still accepts the certificates kagi mints.
    vault.client.create_ec_key("after-constraints", curve="P-256")
    assert [k.name for k in vault.client.list_properties_of_keys()] == ["after-constraints"]
    assert kagi.request("GET", f"{kagi.base}/healthz", auth=False).status_code == 200
