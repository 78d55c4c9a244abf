"""Cryptographic operations through azure.keyvault.keys.crypto.CryptographyClient.

How the SDK splits work (azure-keyvault-keys 4.11, crypto/_client.py): once it has the key's public JWK
(from a KeyVaultKey, or by GET-ing the key id), encrypt, wrap_key and verify run LOCALLY whenever the
key's key_ops allow them; decrypt, unwrap_key and sign always go to the server (the server never returns
private material). So server-side refusals are tested with decrypt/unwrap/sign, and server-side
encrypt/wrap/verify are exercised with ``Remote`` below, which calls the SDK's own generated operations
(the exact requests the SDK sends when it cannot work locally).
"""

import hashlib
import os
from datetime import datetime, timedelta, timezone

import pytest
from azure.core.exceptions import HttpResponseError
from azure.keyvault.keys.crypto import EncryptionAlgorithm, KeyWrapAlgorithm, SignatureAlgorithm
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature

from conftest import random_name

HASHES = {
    "256": (hashlib.sha256, hashes.SHA256),
    "384": (hashlib.sha384, hashes.SHA384),
    "512": (hashlib.sha512, hashes.SHA512),
}
RSA_WRAP_ALGS = [KeyWrapAlgorithm.rsa_oaep, KeyWrapAlgorithm.rsa_oaep_256, KeyWrapAlgorithm.rsa1_5]
RSA_ENC_ALGS = [EncryptionAlgorithm.rsa_oaep, EncryptionAlgorithm.rsa_oaep_256, EncryptionAlgorithm.rsa1_5]
RSA_SIGN_ALGS = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512"]
EC_CASES = [("P-256", "ES256", 32), ("P-384", "ES384", 48), ("P-521", "ES512", 66)]


def now():
    return datetime.now(timezone.utc)


def digest_for(alg: str, data: bytes = b"kagi conformance message") -> bytes:
    return HASHES[alg[-3:]][0](data).digest()


def rsa_public(key) -> rsa.RSAPublicKey:
    return rsa.RSAPublicNumbers(int.from_bytes(key.key.e, "big"), int.from_bytes(key.key.n, "big")).public_key()


def ec_public(key) -> ec.EllipticCurvePublicKey:
    curve = {"P-256": ec.SECP256R1(), "P-384": ec.SECP384R1(), "P-521": ec.SECP521R1()}[key.key.crv]
    return ec.EllipticCurvePublicNumbers(
        int.from_bytes(key.key.x, "big"), int.from_bytes(key.key.y, "big"), curve
    ).public_key()


def oaep_padding(alg):
    if alg == "RSA1_5":
        return padding.PKCS1v15()
    h = hashes.SHA1() if alg == "RSA-OAEP" else hashes.SHA256()
    return padding.OAEP(mgf=padding.MGF1(h), algorithm=h, label=None)


def verify_rsa_locally(pub, alg, digest, signature):
    h = HASHES[alg[-3:]][1]()
    if alg.startswith("RS"):
        pad = padding.PKCS1v15()
    else:
        pad = padding.PSS(mgf=padding.MGF1(h), salt_length=h.digest_size)
    pub.verify(signature, digest, pad, Prehashed(h))


def verify_ec_locally(pub, alg, digest, signature, coord_len):
    assert len(signature) == 2 * coord_len, f"{alg} signature must be r||s of {2 * coord_len} bytes"
    r = int.from_bytes(signature[:coord_len], "big")
    s = int.from_bytes(signature[coord_len:], "big")
    pub.verify(encode_dss_signature(r, s), digest, ec.ECDSA(Prehashed(HASHES[alg[-3:]][1]())))


class Remote:
    """Server-side key operations via the SDK's generated client (no local short-cut)."""

    def __init__(self, vault, key):
        self.c = vault.client._client
        self.m = vault.client._models
        self.name = key.name
        self.version = key.properties.version

    def wrap(self, alg, value):
        return self.c.wrap_key(self.name, self.version, self.m.KeyOperationsParameters(algorithm=alg, value=value))

    def unwrap(self, alg, value):
        return self.c.unwrap_key(self.name, self.version, self.m.KeyOperationsParameters(algorithm=alg, value=value))

    def encrypt(self, alg, value):
        return self.c.encrypt(self.name, self.version, self.m.KeyOperationsParameters(algorithm=alg, value=value))

    def decrypt(self, alg, value):
        return self.c.decrypt(self.name, self.version, self.m.KeyOperationsParameters(algorithm=alg, value=value))

    def sign(self, alg, digest):
        return self.c.sign(self.name, self.version, self.m.KeySignParameters(algorithm=alg, value=digest))

    def verify(self, alg, digest, signature):
        return self.c.verify(
            self.name, self.version, self.m.KeyVerifyParameters(algorithm=alg, digest=digest, signature=signature)
        ).value


def status_of(fn):
    with pytest.raises(HttpResponseError) as ei:
        fn()
    return ei.value.status_code


# ---------------------------------------------------------------------------------------------
# RSA
# ---------------------------------------------------------------------------------------------


@pytest.fixture(params=[2048, 3072, 4096], ids=lambda s: f"rsa{s}")
def rsa_key(request, vault):
    key = vault.client.create_rsa_key(random_name("k", 10), size=request.param)
    return vault, key, request.param


def test_rsa_wrap_unwrap(rsa_key, kagi):
    vault, key, size = rsa_key
    dek = os.urandom(32)
    by_object = kagi.crypto_client(key)
    by_id = kagi.crypto_client(key.id)
    by_versionless_id = kagi.crypto_client(f"{vault.url}keys/{key.name}")
    remote = Remote(vault, key)
    pub = rsa_public(vault.client.get_key(key.name))
    for alg in RSA_WRAP_ALGS:
        for client in (by_object, by_id, by_versionless_id):
            w = client.wrap_key(alg, dek)  # local in the SDK (public key)
            assert len(w.encrypted_key) == size // 8
            u = client.unwrap_key(alg, w.encrypted_key)  # server
            assert u.key == dek, alg
            assert u.algorithm == alg

        # fully server-side
        rw = remote.wrap(alg, dek)
        assert rw.kid == key.id
        assert len(rw.result) == size // 8
        assert remote.unwrap(alg, rw.result).result == dek
        assert by_id.unwrap_key(alg, rw.result).key == dek

        # wrapped by `cryptography`, unwrapped by kagi
        local = pub.encrypt(dek, oaep_padding(alg.value))
        assert by_object.unwrap_key(alg, local).key == dek, alg
        ru = remote.unwrap(alg, local)
        assert ru.kid == key.id

    # unwrapping with the wrong padding fails cleanly (400), never 500
    w = pub.encrypt(dek, oaep_padding("RSA-OAEP-256"))
    assert status_of(lambda: remote.unwrap("RSA-OAEP", w)) == 400
    assert status_of(lambda: remote.unwrap("RSA-OAEP-256", b"\x00" * (size // 8))) == 400


def test_rsa_encrypt_decrypt(rsa_key, kagi):
    vault, key, size = rsa_key
    plaintext = os.urandom(64)
    cc = kagi.crypto_client(key.id)
    remote = Remote(vault, key)
    for alg in RSA_ENC_ALGS:
        e = cc.encrypt(alg, plaintext)  # local
        assert e.key_id == key.id
        assert cc.decrypt(alg, e.ciphertext).plaintext == plaintext  # server

        re1 = remote.encrypt(alg, plaintext)
        re2 = remote.encrypt(alg, plaintext)
        assert len(re1.result) == size // 8
        assert re1.result != re2.result  # randomized padding
        assert cc.decrypt(alg, re1.result).plaintext == plaintext
        assert remote.decrypt(alg, re2.result).result == plaintext


@pytest.mark.parametrize("alg", RSA_SIGN_ALGS)
def test_rsa_sign_verify_2048(vault, kagi, alg):
    key = vault.client.create_rsa_key("signer", size=2048)
    _check_rsa_sign(vault, kagi, key, alg, 2048)


def test_rsa_sign_verify_all_sizes(rsa_key, kagi):
    vault, key, size = rsa_key
    for alg in ("RS256", "PS512"):
        _check_rsa_sign(vault, kagi, key, alg, size)


def _check_rsa_sign(vault, kagi, key, alg, size):
    cc = kagi.crypto_client(key)
    remote = Remote(vault, key)
    pub = rsa_public(key)
    digest = digest_for(alg)
    s = cc.sign(alg, digest)  # server
    assert s.key_id == key.id
    assert s.algorithm == alg
    assert len(s.signature) == size // 8
    verify_rsa_locally(pub, alg, digest, s.signature)
    # local in the SDK. NB: pass the enum: with a plain str the SDK's local path fails on `.value`
    # and silently falls back to the server.
    assert cc.verify(SignatureAlgorithm(alg), digest, s.signature).is_valid
    assert remote.verify(alg, digest, s.signature) is True  # server
    tampered = bytes([s.signature[0] ^ 1]) + s.signature[1:]
    assert remote.verify(alg, digest, tampered) is False
    other_digest = digest_for(alg, b"another message")
    assert remote.verify(alg, other_digest, s.signature) is False
    with pytest.raises(InvalidSignature):
        verify_rsa_locally(pub, alg, other_digest, s.signature)
    again = cc.sign(alg, digest).signature
    if alg.startswith("RS"):
        assert again == s.signature  # PKCS#1 v1.5 is deterministic
    else:
        assert again != s.signature  # PSS is salted
        verify_rsa_locally(pub, alg, digest, again)


def test_remote_ops_are_standard_with_imported_key(vault, kagi):
    """Import a key whose private half we know, so server-side wrap/encrypt can be undone locally."""
    from azure.keyvault.keys import JsonWebKey

    local = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pn = local.private_numbers()

    def b(i, n=None):
        return i.to_bytes(n or (i.bit_length() + 7) // 8, "big")

    jwk = JsonWebKey(
        kty="RSA", n=b(pn.public_numbers.n, 256), e=b(pn.public_numbers.e), d=b(pn.d, 256),
        p=b(pn.p), q=b(pn.q), dp=b(pn.dmp1), dq=b(pn.dmq1), qi=b(pn.iqmp),
    )
    key = vault.client.import_key("known", jwk)
    remote = Remote(vault, key)
    dek = os.urandom(32)
    for alg in ("RSA-OAEP", "RSA-OAEP-256", "RSA1_5"):
        assert local.decrypt(remote.wrap(alg, dek).result, oaep_padding(alg)) == dek, alg
        assert local.decrypt(remote.encrypt(alg, dek).result, oaep_padding(alg)) == dek, alg
    for alg in RSA_SIGN_ALGS:
        digest = digest_for(alg)
        verify_rsa_locally(local.public_key(), alg, digest, remote.sign(alg, digest).result)


# ---------------------------------------------------------------------------------------------
# EC
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("curve,alg,coord", EC_CASES, ids=[c[1] for c in EC_CASES])
def test_ec_sign_verify(vault, kagi, curve, alg, coord):
    key = vault.client.create_ec_key("ec-signer", curve=curve)
    pub = ec_public(key)
    remote = Remote(vault, key)
    for cc in (kagi.crypto_client(key), kagi.crypto_client(key.id)):
        digest = digest_for(alg)
        s = cc.sign(alg, digest)
        assert s.key_id == key.id
        verify_ec_locally(pub, alg, digest, s.signature, coord)
        assert cc.verify(SignatureAlgorithm(alg), digest, s.signature).is_valid  # local in the SDK
        assert remote.verify(alg, digest, s.signature) is True
        bad = s.signature[:-1] + bytes([s.signature[-1] ^ 1])
        assert remote.verify(alg, digest, bad) is False


@pytest.mark.parametrize(
    "curve,alg",
    [("P-256", "ES384"), ("P-256", "ES512"), ("P-384", "ES256"), ("P-521", "ES256"), ("P-256", "RS256"), ("P-256", "PS256")],
)
def test_ec_mismatched_algorithm_is_400(vault, kagi, curve, alg):
    key = vault.client.create_ec_key("ec-mismatch", curve=curve)
    cc = kagi.crypto_client(key)
    assert status_of(lambda: cc.sign(alg, digest_for(alg))) == 400


def test_rsa_key_refuses_ec_algorithms(vault, kagi):
    key = vault.client.create_rsa_key("rsa-mismatch", size=2048)
    cc = kagi.crypto_client(key)
    assert status_of(lambda: cc.sign("ES256", digest_for("ES256"))) == 400
    assert status_of(lambda: cc.unwrap_key("A256KW", b"\x00" * 40)) == 400


def test_ec_key_cannot_wrap(vault, kagi):
    key = vault.client.create_ec_key("ec-nowrap", curve="P-256")
    remote = Remote(vault, key)
    assert status_of(lambda: remote.wrap("RSA-OAEP", os.urandom(32))) == 400
    assert status_of(lambda: kagi.crypto_client(key).unwrap_key("RSA-OAEP", os.urandom(256))) == 400


def test_wrong_digest_length_is_400(vault, kagi):
    rk = vault.client.create_rsa_key("rsa-digest", size=2048)
    ek = vault.client.create_ec_key("ec-digest", curve="P-256")
    assert status_of(lambda: kagi.crypto_client(rk).sign("RS256", b"\x01" * 20)) == 400
    assert status_of(lambda: kagi.crypto_client(rk).sign("PS256", b"\x01" * 48)) == 400
    assert status_of(lambda: kagi.crypto_client(ek).sign("ES256", b"\x01" * 48)) == 400


def test_unknown_algorithm_is_400(vault, kagi):
    key = vault.client.create_rsa_key("rsa-alg", size=2048)
    remote = Remote(vault, key)
    assert status_of(lambda: remote.unwrap("RSA-OAEP-999", b"\x00" * 256)) == 400
    assert status_of(lambda: remote.sign("RS999", b"\x00" * 32)) == 400


# ---------------------------------------------------------------------------------------------
# key state: enabled / exp / nbf / key_ops
# ---------------------------------------------------------------------------------------------


def _prepared_rsa(vault, kagi, name):
    """An RSA key plus ciphertexts and a signature made while it was usable."""
    key = vault.client.create_rsa_key(name, size=2048)
    dek = os.urandom(32)
    pub = rsa_public(key)
    wrapped = pub.encrypt(dek, oaep_padding("RSA-OAEP-256"))
    digest = digest_for("RS256")
    sig = kagi.crypto_client(key).sign("RS256", digest).signature
    return key, dek, wrapped, digest, sig


def test_disabled_key_refuses_private_operations(vault, kagi):
    key, dek, wrapped, digest, sig = _prepared_rsa(vault, kagi, "disabled")
    vault.client.update_key_properties(key.name, enabled=False)
    remote = Remote(vault, key)
    for cc in (kagi.crypto_client(key.id), kagi.crypto_client(key)):
        assert status_of(lambda: cc.unwrap_key(KeyWrapAlgorithm.rsa_oaep_256, wrapped)) == 403
        assert status_of(lambda: cc.decrypt(EncryptionAlgorithm.rsa_oaep_256, wrapped)) == 403
        assert status_of(lambda: cc.sign(SignatureAlgorithm.rs256, digest)) == 403
    assert status_of(lambda: remote.wrap("RSA-OAEP-256", dek)) == 403
    assert status_of(lambda: remote.encrypt("RSA-OAEP-256", dek)) == 403

    # re-enabling restores service: the 403 was the enabled flag and nothing else
    vault.client.update_key_properties(key.name, enabled=True)
    assert kagi.crypto_client(key.id).unwrap_key(KeyWrapAlgorithm.rsa_oaep_256, wrapped).key == dek


def _check_outside_validity_window(vault, kagi, key, dek, wrapped, digest, sig):
    """Azure ("Date-time controlled operations", about-keys-details): outside nbf/exp, encrypt, wrap and sign
    answer 403 Forbidden, while decrypt, unwrap and verify keep working (to recover old data)."""
    remote = Remote(vault, key)
    cc = kagi.crypto_client(key.id)
    # refused: operations that create new protected data
    assert status_of(lambda: cc.sign(SignatureAlgorithm.rs256, digest)) == 403
    assert status_of(lambda: remote.sign("RS256", digest)) == 403
    assert status_of(lambda: remote.wrap("RSA-OAEP-256", dek)) == 403
    assert status_of(lambda: remote.encrypt("RSA-OAEP-256", dek)) == 403
    # still allowed: operations that recover or check existing data
    assert cc.unwrap_key(KeyWrapAlgorithm.rsa_oaep_256, wrapped).key == dek
    assert cc.decrypt(EncryptionAlgorithm.rsa_oaep_256, wrapped).plaintext == dek
    assert remote.verify("RS256", digest, sig) is True


def test_expired_key(vault, kagi):
    key, dek, wrapped, digest, sig = _prepared_rsa(vault, kagi, "expired")
    upd = vault.client.update_key_properties(key.name, expires_on=now() - timedelta(hours=1))
    assert upd.properties.expires_on < now()
    _check_outside_validity_window(vault, kagi, key, dek, wrapped, digest, sig)
    # the SDK itself refuses local operations with a KeyVaultKey whose exp has passed
    with pytest.raises(ValueError):
        kagi.crypto_client(upd).wrap_key(KeyWrapAlgorithm.rsa_oaep_256, dek)


def test_not_yet_valid_key(vault, kagi):
    key, dek, wrapped, digest, sig = _prepared_rsa(vault, kagi, "future")
    upd = vault.client.update_key_properties(key.name, not_before=now() + timedelta(hours=1))
    assert upd.properties.not_before > now()
    _check_outside_validity_window(vault, kagi, key, dek, wrapped, digest, sig)


def test_key_created_with_future_nbf(vault, kagi):
    key = vault.client.create_rsa_key("born-later", size=2048, not_before=now() + timedelta(days=1))
    assert status_of(lambda: kagi.crypto_client(key.id).sign("RS256", digest_for("RS256"))) == 403


def test_key_operations_are_enforced(vault, kagi):
    key = vault.client.create_rsa_key("signonly", size=2048, key_operations=["sign", "verify"])
    assert sorted(key.key_operations) == ["sign", "verify"]
    pub = rsa_public(key)
    dek = os.urandom(32)
    wrapped = pub.encrypt(dek, oaep_padding("RSA-OAEP"))
    cc = kagi.crypto_client(key)

    for fn in (
        lambda: cc.unwrap_key(KeyWrapAlgorithm.rsa_oaep, wrapped),
        lambda: cc.decrypt(EncryptionAlgorithm.rsa_oaep, wrapped),
        # the SDK refuses wrap locally (not in key_ops) and falls back to the server, which must refuse too
        lambda: cc.wrap_key(KeyWrapAlgorithm.rsa_oaep, dek),
        lambda: cc.encrypt(EncryptionAlgorithm.rsa_oaep, dek),
    ):
        code = status_of(fn)
        assert code in (400, 403), code

    # allowed operations still work
    d = digest_for("PS256")
    verify_rsa_locally(pub, "PS256", d, cc.sign("PS256", d).signature)

    # widening key_ops by update takes effect
    vault.client.update_key_properties(key.name, key_operations=["sign", "verify", "unwrapKey", "wrapKey"])
    assert kagi.crypto_client(key.id).unwrap_key(KeyWrapAlgorithm.rsa_oaep, wrapped).key == dek


# ---------------------------------------------------------------------------------------------
# versions
# ---------------------------------------------------------------------------------------------


def test_pinned_version_survives_rotation(vault, kagi):
    v1 = vault.client.create_rsa_key("pinned", size=2048)
    pinned = kagi.crypto_client(v1.id)
    dek = os.urandom(32)
    wrapped = pinned.wrap_key(KeyWrapAlgorithm.rsa_oaep_256, dek).encrypted_key
    digest = digest_for("RS256")

    v2 = vault.client.rotate_key("pinned")
    assert v2.properties.version != v1.properties.version

    u = pinned.unwrap_key(KeyWrapAlgorithm.rsa_oaep_256, wrapped)
    assert u.key == dek
    assert u.key_id == v1.id
    s = pinned.sign("RS256", digest)
    assert s.key_id == v1.id
    verify_rsa_locally(rsa_public(v1), "RS256", digest, s.signature)

    # versionless client follows the newest version
    latest = kagi.crypto_client(f"{vault.url}keys/pinned")
    s2 = latest.sign("RS256", digest)
    verify_rsa_locally(rsa_public(v2), "RS256", digest, s2.signature)
    with pytest.raises(InvalidSignature):
        verify_rsa_locally(rsa_public(v1), "RS256", digest, s2.signature)
