"""Key management through azure.keyvault.keys.KeyClient."""

import hashlib
import os
import re
from datetime import datetime, timedelta, timezone

import pytest
from azure.core.exceptions import HttpResponseError, ResourceExistsError, ResourceNotFoundError
from azure.keyvault.keys import ApiVersion, JsonWebKey, KeyClient
from azure.keyvault.keys.crypto import KeyWrapAlgorithm, SignatureAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature

VERSION_RE = re.compile(r"^[0-9a-f]{32}$")
RSA_OPS = {"encrypt", "decrypt", "sign", "verify", "wrapKey", "unwrapKey"}
EC_OPS = {"sign", "verify"}
CURVE_BYTES = {"P-256": 32, "P-384": 48, "P-521": 66}


def now():
    return datetime.now(timezone.utc)


def whole_seconds(dt):
    return dt.replace(microsecond=0)


def int_bytes(i, length=None):
    length = length or (i.bit_length() + 7) // 8
    return i.to_bytes(length, "big")


def bits(b: bytes) -> int:
    return int.from_bytes(b, "big").bit_length()


def error_of(exc: HttpResponseError) -> dict:
    body = exc.response.json()
    assert isinstance(body.get("error"), dict), body
    return body["error"]


def assert_fresh_key(vault, key, name, kty):
    assert key.name == name
    assert key.key_type == kty
    version = key.properties.version
    assert VERSION_RE.match(version), version
    assert key.id == f"{vault.url}keys/{name}/{version}"
    assert key.key.kid == key.id
    assert key.properties.vault_url == vault.host_url
    assert key.properties.enabled is True
    assert key.properties.not_before is None and key.properties.expires_on is None
    created, updated = key.properties.created_on, key.properties.updated_on
    assert created is not None and updated is not None
    assert abs(created - now()) < timedelta(minutes=2), created
    assert updated == created
    assert key.properties.recovery_level == "CustomizedRecoverable+Purgeable"
    assert key.properties.recoverable_days == 7
    # private material is never returned
    for f in ("d", "p", "q", "dp", "dq", "qi", "k"):
        assert getattr(key.key, f) is None, f


# ---------------------------------------------------------------------------------------------
# create
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [2048, 3072, 4096])
def test_create_rsa_sizes(vault, size):
    name = f"rsa-{size}"
    key = vault.client.create_rsa_key(name, size=size)
    assert_fresh_key(vault, key, name, "RSA")
    assert bits(key.key.n) == size
    assert len(key.key.n) == size // 8  # no leading zero byte
    assert key.key.e == b"\x01\x00\x01"
    assert set(key.key_operations) == RSA_OPS


def test_create_rsa_default_size_is_2048(vault):
    key = vault.client.create_rsa_key("rsa-default")
    assert bits(key.key.n) == 2048


def test_create_rsa_hsm_in_premium_vault(premium_vault):
    key = premium_vault.client.create_rsa_key("hsm-rsa", size=2048, hardware_protected=True)
    assert key.key_type == "RSA-HSM"
    assert bits(key.key.n) == 2048
    assert premium_vault.client.get_key("hsm-rsa").key_type == "RSA-HSM"


def test_hsm_keys_refused_in_standard_vault(vault):
    for create in (
        lambda: vault.client.create_rsa_key("hsm-rsa", size=2048, hardware_protected=True),
        lambda: vault.client.create_ec_key("hsm-ec", curve="P-256", hardware_protected=True),
    ):
        with pytest.raises(HttpResponseError) as ei:
            create()
        assert ei.value.status_code == 400
        assert error_of(ei.value)["code"] == "BadParameter"
    assert vault.key_names() == []


@pytest.mark.parametrize("curve", ["P-256", "P-384", "P-521"])
def test_create_ec_curves(vault, curve):
    name = "ec-" + curve.lower()
    key = vault.client.create_ec_key(name, curve=curve)
    assert_fresh_key(vault, key, name, "EC")
    assert key.key.crv == curve
    assert len(key.key.x) == CURVE_BYTES[curve] and len(key.key.y) == CURVE_BYTES[curve]
    assert key.key.n is None and key.key.e is None
    assert set(key.key_operations) == EC_OPS


def test_create_ec_default_curve_is_p256(vault):
    key = vault.client.create_ec_key("ec-default")
    assert key.key.crv == "P-256"


@pytest.mark.parametrize("curve", ["P-256", "P-384", "P-521"])
def test_create_ec_hsm_in_premium_vault(premium_vault, curve):
    key = premium_vault.client.create_ec_key("hsm-ec", curve=curve, hardware_protected=True)
    assert key.key_type == "EC-HSM"
    assert key.key.crv == curve


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(key_type="RSA", size=1024),
        dict(key_type="RSA", size=2000),
        dict(key_type="RSA", size=16384),
        dict(key_type="EC", curve="P-192"),
        dict(key_type="EC", curve="secp256r1"),
        dict(key_type="ECDSA"),
    ],
    ids=["rsa1024", "rsa2000", "rsa16384", "p192", "bad-curve-name", "bad-kty"],
)
def test_unsupported_key_parameters(vault, kwargs):
    with pytest.raises(HttpResponseError) as ei:
        vault.client.create_key("bad", **kwargs)
    assert ei.value.status_code == 400, ei.value
    assert error_of(ei.value)["code"] == "BadParameter"
    with pytest.raises(ResourceNotFoundError):
        vault.client.get_key("bad")


# ---------------------------------------------------------------------------------------------
# get / update
# ---------------------------------------------------------------------------------------------


def test_get_latest_and_specific_version(vault):
    c = vault.client
    v1 = c.create_ec_key("multi")
    v2 = c.create_ec_key("multi")
    assert v1.properties.version != v2.properties.version
    assert v1.key.x != v2.key.x

    latest = c.get_key("multi")
    assert latest.id == v2.id
    assert latest.key.x == v2.key.x

    first = c.get_key("multi", v1.properties.version)
    assert first.id == v1.id
    assert first.key.x == v1.key.x
    assert first.properties.created_on == v1.properties.created_on


def test_get_missing_key_is_404(vault):
    with pytest.raises(ResourceNotFoundError) as ei:
        vault.client.get_key("nope")
    assert ei.value.status_code == 404
    assert error_of(ei.value)["code"] == "KeyNotFound"

    vault.client.create_ec_key("exists")
    with pytest.raises(ResourceNotFoundError) as ei:
        vault.client.get_key("exists", "0123456789abcdef0123456789abcdef")
    assert error_of(ei.value)["code"] == "KeyNotFound"


def test_update_key_properties(vault):
    c = vault.client
    created = c.create_rsa_key("upd", size=2048, tags={"a": "1"})
    assert created.properties.tags == {"a": "1"}

    exp = whole_seconds(now() + timedelta(days=30))
    nbf = whole_seconds(now() - timedelta(days=1))
    updated = c.update_key_properties(
        "upd",
        enabled=False,
        expires_on=exp,
        not_before=nbf,
        tags={"env": "test", "owner": "conformance"},
        key_operations=["sign", "verify"],
    )
    assert updated.id == created.id  # same version
    p = updated.properties
    assert p.enabled is False
    assert p.expires_on == exp
    assert p.not_before == nbf
    assert p.tags == {"env": "test", "owner": "conformance"}  # tags are replaced, not merged
    assert sorted(updated.key_operations) == ["sign", "verify"]
    assert p.created_on == created.properties.created_on
    assert p.updated_on >= created.properties.updated_on
    assert updated.key.n == created.key.n

    # (GET of a disabled key is not asserted either way: listing is)
    listed = list(c.list_properties_of_key_versions("upd"))
    assert len(listed) == 1
    assert listed[0].enabled is False
    assert listed[0].expires_on == exp and listed[0].not_before == nbf
    assert listed[0].tags == {"env": "test", "owner": "conformance"}

    # a PATCH without tags/ops leaves them alone
    again = c.update_key_properties("upd", enabled=True)
    assert again.properties.enabled is True
    assert again.properties.tags == {"env": "test", "owner": "conformance"}
    assert again.properties.expires_on == exp
    assert sorted(again.key_operations) == ["sign", "verify"]

    got = c.get_key("upd")
    assert got.properties.enabled is True
    assert got.properties.expires_on == exp
    assert got.properties.not_before == nbf
    assert got.properties.tags == {"env": "test", "owner": "conformance"}
    assert sorted(got.key_operations) == ["sign", "verify"]
    assert got.properties.updated_on >= p.updated_on


def test_update_specific_version_only(vault):
    c = vault.client
    v1 = c.create_ec_key("pv")
    v2 = c.create_ec_key("pv")
    upd = c.update_key_properties("pv", v1.properties.version, enabled=False, tags={"old": "yes"})
    assert upd.id == v1.id and upd.properties.enabled is False
    by_version = {p.version: p for p in c.list_properties_of_key_versions("pv")}
    assert by_version[v1.properties.version].enabled is False
    assert by_version[v1.properties.version].tags == {"old": "yes"}
    assert by_version[v2.properties.version].enabled is True
    latest = c.get_key("pv")
    assert latest.id == v2.id
    assert latest.properties.enabled is True
    assert latest.properties.tags in (None, {})


def test_update_missing_key_is_404(vault):
    with pytest.raises(ResourceNotFoundError):
        vault.client.update_key_properties("ghost", enabled=False)


# ---------------------------------------------------------------------------------------------
# list
# ---------------------------------------------------------------------------------------------


def test_list_keys_pages(vault):
    c = vault.client
    names = [f"page-{i:02d}" for i in range(30)]
    for n in names:
        c.create_ec_key(n, curve="P-256", tags={"i": n[-2:]})

    items = list(c.list_properties_of_keys())
    assert sorted(p.name for p in items) == names
    for p in items:
        assert p.id == f"{vault.url}keys/{p.name}"  # list items carry the versionless kid
        assert p.version is None
        assert p.enabled is True
        assert p.created_on is not None and p.updated_on is not None
        assert p.tags == {"i": p.name[-2:]}

    pages = [list(pg) for pg in c.list_properties_of_keys().by_page()]
    assert len(pages) >= 2, "30 keys must need more than one page (nextLink)"
    assert len(pages[0]) == 25, [len(pg) for pg in pages]  # Azure's default page size
    assert sum(len(pg) for pg in pages) == 30

    small = [list(pg) for pg in c.list_properties_of_keys(max_page_size=10).by_page()]
    assert all(len(pg) <= 10 for pg in small), [len(pg) for pg in small]
    assert len([pg for pg in small if pg]) >= 3
    assert sorted(p.name for pg in small for p in pg) == names


def test_list_key_versions(vault):
    c = vault.client
    made = [c.create_ec_key("versions") for _ in range(3)]
    c.create_ec_key("other")
    listed = list(c.list_properties_of_key_versions("versions"))
    assert sorted(p.id for p in listed) == sorted(k.id for k in made)
    for p in listed:
        assert p.name == "versions"
        assert VERSION_RE.match(p.version)
        assert p.created_on is not None

    pages = [list(pg) for pg in c.list_properties_of_key_versions("versions", max_page_size=2).by_page()]
    assert all(len(pg) <= 2 for pg in pages)
    assert sorted(p.id for pg in pages for p in pg) == sorted(k.id for k in made)


def test_list_versions_of_missing_key(vault):
    # Azure answers 200 with an empty list (test_hardening_keys.py checks the raw answer).
    assert list(vault.client.list_properties_of_key_versions("nope")) == []


# ---------------------------------------------------------------------------------------------
# import
# ---------------------------------------------------------------------------------------------


def rsa_jwk(priv: rsa.RSAPrivateKey, **extra) -> JsonWebKey:
    pn = priv.private_numbers()
    pub = pn.public_numbers
    size = (pub.n.bit_length() + 7) // 8
    return JsonWebKey(
        kty="RSA",
        n=int_bytes(pub.n, size),
        e=int_bytes(pub.e),
        d=int_bytes(pn.d, size),
        p=int_bytes(pn.p),
        q=int_bytes(pn.q),
        dp=int_bytes(pn.dmp1),
        dq=int_bytes(pn.dmq1),
        qi=int_bytes(pn.iqmp),
        **extra,
    )


def ec_jwk(priv: ec.EllipticCurvePrivateKey, crv: str, **extra) -> JsonWebKey:
    size = CURVE_BYTES[crv]
    pn = priv.private_numbers()
    return JsonWebKey(
        kty="EC",
        crv=crv,
        x=int_bytes(pn.public_numbers.x, size),
        y=int_bytes(pn.public_numbers.y, size),
        d=int_bytes(pn.private_value, size),
        **extra,
    )


def test_import_rsa_then_unwrap_locally_wrapped(vault, kagi):
    local = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = rsa_jwk(local)
    key = vault.client.import_key("imported-rsa", jwk, tags={"src": "local"})
    assert key.key_type == "RSA"
    assert key.key.n == jwk.n
    assert key.key.e == b"\x01\x00\x01"
    assert key.key.d is None and key.key.p is None
    assert key.properties.tags == {"src": "local"}
    assert VERSION_RE.match(key.properties.version)

    dek = os.urandom(32)
    pub = local.public_key()
    for alg, pad in [
        (KeyWrapAlgorithm.rsa_oaep, padding.OAEP(padding.MGF1(hashes.SHA1()), hashes.SHA1(), None)),
        (KeyWrapAlgorithm.rsa_oaep_256, padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), None)),
        (KeyWrapAlgorithm.rsa1_5, padding.PKCS1v15()),
    ]:
        wrapped = pub.encrypt(dek, pad)
        assert kagi.crypto_client(key).unwrap_key(alg, wrapped).key == dek, alg


def test_import_rsa_hsm_premium(premium_vault):
    local = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    key = premium_vault.client.import_key("imported-hsm", rsa_jwk(local), hardware_protected=True)
    assert key.key_type == "RSA-HSM"
    assert bits(key.key.n) == 2048


def test_import_hsm_refused_in_standard_vault(vault):
    local = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(HttpResponseError) as ei:
        vault.client.import_key("imported-hsm", rsa_jwk(local), hardware_protected=True)
    assert ei.value.status_code == 400
    assert vault.key_names() == []


@pytest.mark.parametrize(
    "crv,alg,h", [("P-256", "ES256", hashlib.sha256), ("P-384", "ES384", hashlib.sha384), ("P-521", "ES512", hashlib.sha512)]
)
def test_import_ec_then_sign(vault, kagi, crv, alg, h):
    curve = {"P-256": ec.SECP256R1(), "P-384": ec.SECP384R1(), "P-521": ec.SECP521R1()}[crv]
    local = ec.generate_private_key(curve)
    jwk = ec_jwk(local, crv)
    key = vault.client.import_key("imported-ec", jwk)
    assert key.key_type == "EC" and key.key.crv == crv
    assert key.key.x == jwk.x and key.key.y == jwk.y
    assert key.key.d is None

    digest = h(b"imported ec key").digest()
    sig = kagi.crypto_client(key).sign(alg, digest).signature
    size = CURVE_BYTES[crv]
    assert len(sig) == 2 * size
    der = encode_dss_signature(int.from_bytes(sig[:size], "big"), int.from_bytes(sig[size:], "big"))
    hash_alg = {"ES256": hashes.SHA256(), "ES384": hashes.SHA384(), "ES512": hashes.SHA512()}[alg]
    local.public_key().verify(der, digest, ec.ECDSA(Prehashed(hash_alg)))


def test_import_as_new_version(vault):
    local1 = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    local2 = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    k1 = vault.client.import_key("imp", rsa_jwk(local1))
    k2 = vault.client.import_key("imp", rsa_jwk(local2))
    assert k1.properties.version != k2.properties.version
    assert vault.client.get_key("imp").key.n == k2.key.n
    assert len(list(vault.client.list_properties_of_key_versions("imp"))) == 2


# ---------------------------------------------------------------------------------------------
# delete / recover / purge
# ---------------------------------------------------------------------------------------------


def _delete(client, name):
    poller = client.begin_delete_key(name)
    poller.wait()
    return poller.result()


def test_delete_key(vault):
    c = vault.client
    c.create_rsa_key("del", size=2048)
    latest = c.create_rsa_key("del", size=2048)
    before = now()
    deleted = _delete(c, "del")

    assert deleted.name == "del"
    assert deleted.id == latest.id
    assert deleted.recovery_id == f"{vault.url}deletedkeys/del"
    assert deleted.key.n == latest.key.n
    assert abs(deleted.deleted_date - before) < timedelta(minutes=2)
    assert abs((deleted.scheduled_purge_date - deleted.deleted_date) - timedelta(days=7)) < timedelta(minutes=1)
    assert deleted.properties.recovery_level == "CustomizedRecoverable+Purgeable"

    with pytest.raises(ResourceNotFoundError):
        c.get_key("del")
    assert "del" not in vault.key_names()

    got = c.get_deleted_key("del")
    assert got.id == latest.id
    assert got.recovery_id == deleted.recovery_id
    assert got.deleted_date == deleted.deleted_date
    assert got.scheduled_purge_date == deleted.scheduled_purge_date
    assert got.key.n == latest.key.n

    listed = [d for d in c.list_deleted_keys() if d.name == "del"]
    assert len(listed) == 1
    assert listed[0].recovery_id == deleted.recovery_id
    assert listed[0].deleted_date == deleted.deleted_date
    assert listed[0].scheduled_purge_date == deleted.scheduled_purge_date
    assert listed[0].id == f"{vault.url}keys/del"  # deleted items carry the versionless kid


def test_delete_missing_key_is_404(vault):
    with pytest.raises(ResourceNotFoundError):
        vault.client.begin_delete_key("ghost")
    with pytest.raises(ResourceNotFoundError):
        vault.client.get_deleted_key("ghost")


def test_create_over_deleted_name_conflicts(vault):
    c = vault.client
    c.create_ec_key("zombie")
    _delete(c, "zombie")
    with pytest.raises(ResourceExistsError) as ei:
        c.create_ec_key("zombie")
    assert ei.value.status_code == 409
    err = error_of(ei.value)
    assert err["code"] == "Conflict"
    assert err["innererror"]["code"] == "ObjectIsDeletedButRecoverable"

    local = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(ResourceExistsError):
        c.import_key("zombie", ec_jwk(local, "P-256"))


def test_recover_deleted_key(vault, kagi):
    c = vault.client
    k1 = c.create_rsa_key("phoenix", size=2048, tags={"t": "1"})
    k2 = c.create_rsa_key("phoenix", size=2048)
    dek = os.urandom(32)
    wrapped = kagi.crypto_client(k1).wrap_key(KeyWrapAlgorithm.rsa_oaep, dek).encrypted_key
    _delete(c, "phoenix")

    poller = c.begin_recover_deleted_key("phoenix")
    recovered = poller.result()
    poller.wait()
    assert recovered.id == k2.id
    assert recovered.name == "phoenix"

    assert c.get_key("phoenix").id == k2.id
    assert c.get_key("phoenix", k1.properties.version).properties.tags == {"t": "1"}
    versions = sorted(p.version for p in c.list_properties_of_key_versions("phoenix"))
    assert versions == sorted([k1.properties.version, k2.properties.version])
    with pytest.raises(ResourceNotFoundError):
        c.get_deleted_key("phoenix")
    assert kagi.crypto_client(k1.id).unwrap_key(KeyWrapAlgorithm.rsa_oaep, wrapped).key == dek


def test_recover_missing_is_404(vault):
    with pytest.raises(ResourceNotFoundError):
        vault.client.begin_recover_deleted_key("ghost")


def test_purge_deleted_key_frees_name(vault):
    c = vault.client
    old = c.create_ec_key("purged")
    _delete(c, "purged")
    c.purge_deleted_key("purged")
    with pytest.raises(ResourceNotFoundError):
        c.get_deleted_key("purged")
    assert "purged" not in [d.name for d in c.list_deleted_keys()]
    with pytest.raises(ResourceNotFoundError):
        c.begin_recover_deleted_key("purged")

    new = c.create_ec_key("purged")
    assert new.properties.version != old.properties.version
    assert [p.version for p in c.list_properties_of_key_versions("purged")] == [new.properties.version]


def test_purge_of_live_key_is_404(vault):
    vault.client.create_ec_key("alive")
    with pytest.raises(ResourceNotFoundError):
        vault.client.purge_deleted_key("alive")
    assert vault.client.get_key("alive").name == "alive"


def test_purge_refused_with_purge_protection(make_vault):
    v = make_vault(purge_protection=True)
    c = v.client
    key = c.create_ec_key("protected")
    assert key.properties.recovery_level == "CustomizedRecoverable"
    assert key.properties.recoverable_days == 7
    _delete(c, "protected")
    with pytest.raises(HttpResponseError) as ei:
        c.purge_deleted_key("protected")
    assert ei.value.status_code == 403
    # still there, still recoverable
    assert c.get_deleted_key("protected").name == "protected"
    c.begin_recover_deleted_key("protected").wait()
    assert c.get_key("protected").id == key.id


def test_recovery_level_for_90_day_retention(make_vault):
    v = make_vault(retention=90)
    key = v.client.create_ec_key("k")
    assert key.properties.recovery_level == "Recoverable+Purgeable"
    assert key.properties.recoverable_days == 90


# ---------------------------------------------------------------------------------------------
# backup / restore
# ---------------------------------------------------------------------------------------------


def test_backup_restore_into_other_vault(vault, make_vault, kagi):
    c = vault.client
    v1 = c.create_rsa_key("portable", size=2048, tags={"x": "y"})
    v2 = c.rotate_key("portable")
    dek = os.urandom(32)
    wrapped_v1 = kagi.crypto_client(v1).wrap_key(KeyWrapAlgorithm.rsa_oaep_256, dek).encrypted_key
    wrapped_v2 = kagi.crypto_client(v2).wrap_key(KeyWrapAlgorithm.rsa_oaep_256, dek).encrypted_key

    blob = c.backup_key("portable")
    assert isinstance(blob, bytes) and len(blob) > 64

    # restoring over an existing name conflicts
    with pytest.raises(ResourceExistsError):
        c.restore_key_backup(blob)

    _delete(c, "portable")
    c.purge_deleted_key("portable")

    other = make_vault()
    restored = other.client.restore_key_backup(blob)
    assert restored.name == "portable"
    assert restored.id == f"{other.url}keys/portable/{v2.properties.version}"
    assert restored.key.n == v2.key.n
    versions = sorted(p.version for p in other.client.list_properties_of_key_versions("portable"))
    assert versions == sorted([v1.properties.version, v2.properties.version])
    assert other.client.get_key("portable", v1.properties.version).properties.tags == {"x": "y"}

    cc1 = kagi.crypto_client(f"{other.url}keys/portable/{v1.properties.version}")
    assert cc1.unwrap_key(KeyWrapAlgorithm.rsa_oaep_256, wrapped_v1).key == dek
    cc2 = kagi.crypto_client(other.client.get_key("portable"))
    assert cc2.unwrap_key(KeyWrapAlgorithm.rsa_oaep_256, wrapped_v2).key == dek

    # and back into the original vault, whose name was purged
    back = c.restore_key_backup(blob)
    assert back.id == v2.id


def test_restore_garbage_is_400(vault):
    with pytest.raises(HttpResponseError) as ei:
        vault.client.restore_key_backup(b"this is not a backup" * 10)
    assert ei.value.status_code == 400
    assert vault.key_names() == []


def test_backup_missing_key_is_404(vault):
    with pytest.raises(ResourceNotFoundError):
        vault.client.backup_key("ghost")


# ---------------------------------------------------------------------------------------------
# rotate / rng / api versions
# ---------------------------------------------------------------------------------------------


def test_rotate_key(vault, kagi):
    c = vault.client
    v1 = c.create_rsa_key("rot", size=2048, key_operations=["wrapKey", "unwrapKey"])
    dek = os.urandom(32)
    wrapped = kagi.crypto_client(v1).wrap_key(KeyWrapAlgorithm.rsa_oaep_256, dek).encrypted_key

    v2 = c.rotate_key("rot")
    assert v2.name == "rot"
    assert v2.properties.version != v1.properties.version
    assert VERSION_RE.match(v2.properties.version)
    assert v2.key_type == "RSA"
    assert bits(v2.key.n) == 2048
    assert v2.key.n != v1.key.n
    assert sorted(v2.key_operations) == ["unwrapKey", "wrapKey"]

    assert c.get_key("rot").id == v2.id
    versions = sorted(p.version for p in c.list_properties_of_key_versions("rot"))
    assert versions == sorted([v1.properties.version, v2.properties.version])

    assert kagi.crypto_client(v1.id).unwrap_key(KeyWrapAlgorithm.rsa_oaep_256, wrapped).key == dek
    # the versionless client now uses v2, which cannot unwrap v1's ciphertext
    with pytest.raises(HttpResponseError) as ei:
        kagi.crypto_client(f"{vault.url}keys/rot").unwrap_key(KeyWrapAlgorithm.rsa_oaep_256, wrapped)
    assert ei.value.status_code == 400


def test_rotate_missing_is_404(vault):
    with pytest.raises(ResourceNotFoundError):
        vault.client.rotate_key("ghost")


def test_get_random_bytes(vault):
    a = vault.client.get_random_bytes(32)
    b = vault.client.get_random_bytes(32)
    assert isinstance(a, bytes) and len(a) == 32
    assert len(b) == 32
    assert a != b
    assert len(vault.client.get_random_bytes(1)) == 1


@pytest.mark.parametrize("api_version", ["7.4", "7.5", "7.6", "2025-07-01"])
def test_supported_api_versions(vault, kagi, api_version):
    c = kagi.key_client(vault.url, api_version=api_version)
    k = c.create_ec_key("apiv")
    assert c.get_key("apiv").id == k.id
    assert [p.name for p in c.list_properties_of_keys()] == ["apiv"]
    sig = c.get_cryptography_client("apiv", key_version=k.properties.version).sign(
        SignatureAlgorithm.es256, hashlib.sha256(b"x").digest()
    )
    assert len(sig.signature) == 64


def test_sdk_default_api_version_is_sent(vault):
    # the installed SDK's default must be accepted (2025-07-01 for azure-keyvault-keys 4.11)
    assert KeyClient(vault.url, object()).api_version == ApiVersion.V2025_07_01.value
    vault.client.create_ec_key("default-api")
