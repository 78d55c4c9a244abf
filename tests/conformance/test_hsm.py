"""HSM-protected keys (issue 15, KV-14): RSA-HSM and EC-HSM keys inside a SoftHSM2 token,
driven by the unmodified Azure SDK; the root key sealed by the token; BYOK import of a key
wrapped outside kagi; a backup vault on an HSM key; backups of HSM keys.

The token is looked into with OpenSC's `pkcs11-tool` (scripts/setup.sh installs it).
"""

import base64
import json
import os
import sqlite3
import subprocess
import time

import pytest
from azure.core.exceptions import HttpResponseError
from azure.keyvault.keys import JsonWebKey, KeyClient
from azure.keyvault.keys.crypto import (
    CryptographyClient,
    EncryptionAlgorithm,
    KeyWrapAlgorithm,
    SignatureAlgorithm,
)
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils
from cryptography.hazmat.primitives.keywrap import aes_key_wrap_with_padding

from conftest import DEFAULT_RG, SOFTHSM_MODULE, SOFTHSM_PIN, _start_server, random_name


def token_objects(srv, kind="privkey"):
    """The labels and access flags of the token's objects of one kind, via pkcs11-tool."""
    out = subprocess.run(
        ["pkcs11-tool", "--module", SOFTHSM_MODULE, "--token-label", "kagi", "--login", "--pin", SOFTHSM_PIN,
         "--list-objects", "--type", kind],
        env={**os.environ, **srv.hsm_env}, capture_output=True, text=True, check=True,
    ).stdout
    objects, current = [], None
    for line in out.splitlines():
        if not line.startswith(" ") and "Object" in line:
            current = {"head": line}
            objects.append(current)
        elif current is not None and ":" in line:
            k, v = line.split(":", 1)
            current[k.strip().lower()] = v.strip()
    return objects


def key_labels(srv):
    return {o.get("label") for o in token_objects(srv) if (o.get("label") or "").startswith("kagi-key-")}


def sealed_sizes(srv, vault, key_name):
    """Sizes of the sealed private parts that kagi.db keeps for a key's versions."""
    db = sqlite3.connect(f"file:{srv.data_dir / 'kagi.db'}?mode=ro", uri=True)
    try:
        return [n for (n,) in db.execute(
            "SELECT length(sealed_private) FROM key_versions WHERE vault = ? AND name_folded = ?",
            (vault.name, key_name.lower()))]
    finally:
        db.close()


def test_every_key_object_in_the_token_is_sensitive_and_not_extractable(kagi, premium_vault):
    """Generated, imported (JWK), BYOK-unwrapped and restored (copied) keys alike."""
    c = premium_vault.client
    c.create_ec_key("gen", curve="P-384", hardware_protected=True)
    local = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    n = local.private_numbers()
    jwk = JsonWebKey(kty="RSA-HSM", n=n.public_numbers.n.to_bytes(256, "big"), e=(65537).to_bytes(3, "big"),
                     d=n.d.to_bytes(256, "big"), p=n.p.to_bytes(128, "big"), q=n.q.to_bytes(128, "big"),
                     dp=n.dmp1.to_bytes(128, "big"), dq=n.dmq1.to_bytes(128, "big"), qi=n.iqmp.to_bytes(128, "big"))
    c.import_key("jwk", jwk)
    kek = c.create_rsa_key("kek", size=2048, hardware_protected=True, key_operations=["import"])
    pkcs8 = local.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    c.import_key("byok", JsonWebKey(kty="RSA-HSM", t=byok_blob(kek, pkcs8)))
    kagi.create_vault(sku="premium").client.restore_key_backup(c.backup_key("gen"))
    objects = [o for o in token_objects(kagi) if (o.get("label") or "").startswith("kagi-key-")]
    assert len(objects) >= 4, objects
    for o in objects:
        flags = [f.strip() for f in o.get("access", "").split(",")]
        assert "sensitive" in flags and "extractable" not in flags, o


@pytest.mark.sqlite_store
def test_hsm_keys_are_made_and_used_inside_the_token(kagi, premium_vault, vault):
    before = key_labels(kagi)
    c = premium_vault.client
    rsa_key = c.create_rsa_key("hsm-rsa", size=2048, hardware_protected=True)
    ec_key = c.create_ec_key("hsm-ec", curve="P-256", hardware_protected=True)
    soft = c.create_rsa_key("soft-rsa", size=2048)
    assert rsa_key.key_type == "RSA-HSM" and ec_key.key_type == "EC-HSM"
    assert rsa_key.key.d is None and not getattr(rsa_key.key, "t", None)
    made = key_labels(kagi) - before
    assert len(made) == 2, made  # the two HSM keys, not the software one

    # Every private key kagi made is sensitive and never extractable.
    for o in token_objects(kagi):
        if o.get("label") in made:
            access = o.get("access", "")
            assert "sensitive" in access and "never extractable" in access, o

    # kagi.db holds a sealed token reference for them (tens of bytes), a sealed PKCS#8
    # document (over a kilobyte) for the software key: no key material of an HSM key.
    sizes = {n: sealed_sizes(kagi, premium_vault, n) for n in ("hsm-rsa", "hsm-ec", "soft-rsa")}
    assert all(len(v) == 1 for v in sizes.values()), sizes
    assert sizes["hsm-rsa"][0] < 100 and sizes["hsm-ec"][0] < 100 and sizes["soft-rsa"][0] > 1000, sizes

    crypto = kagi.crypto_client(rsa_key)
    dek = os.urandom(32)
    for alg in (KeyWrapAlgorithm.rsa_oaep, KeyWrapAlgorithm.rsa_oaep_256, KeyWrapAlgorithm.rsa1_5):
        wrapped = crypto.wrap_key(alg, dek).encrypted_key
        assert crypto.unwrap_key(alg, wrapped).key == dek, alg
    # A ciphertext made outside kagi with the public key decrypts inside the token.
    pub = rsa.RSAPublicNumbers(int.from_bytes(rsa_key.key.e, "big"), int.from_bytes(rsa_key.key.n, "big")).public_key()
    ct = pub.encrypt(b"made outside", padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None))
    assert crypto.decrypt(EncryptionAlgorithm.rsa_oaep_256, ct).plaintext == b"made outside"
    digest = hashes.Hash(hashes.SHA256())
    digest.update(b"signed inside the token")
    d = digest.finalize()
    for alg in (SignatureAlgorithm.rs256, SignatureAlgorithm.ps256):
        sig = crypto.sign(alg, d).signature
        assert crypto.verify(alg, d, sig).is_valid
    pub.verify(crypto.sign(SignatureAlgorithm.rs256, d).signature, d, padding.PKCS1v15(), utils.Prehashed(hashes.SHA256()))

    ec_crypto = kagi.crypto_client(ec_key)
    sig = ec_crypto.sign(SignatureAlgorithm.es256, d).signature
    r, s = int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big")
    ec_pub = ec.EllipticCurvePublicNumbers(int.from_bytes(ec_key.key.x, "big"), int.from_bytes(ec_key.key.y, "big"),
                                          ec.SECP256R1()).public_key()
    ec_pub.verify(utils.encode_dss_signature(r, s), d, ec.ECDSA(utils.Prehashed(hashes.SHA256())))

    # Rotation makes the new version inside the token too.
    rotated = c.rotate_key("hsm-rsa")
    assert rotated.key_type == "RSA-HSM" and rotated.properties.version != rsa_key.properties.version
    assert len(key_labels(kagi) - before) == 3
    new_crypto = kagi.crypto_client(rotated)
    assert new_crypto.unwrap_key(KeyWrapAlgorithm.rsa_oaep, new_crypto.wrap_key(KeyWrapAlgorithm.rsa_oaep, dek).encrypted_key).key == dek

    # A standard vault refuses HSM keys with Azure's error.
    with pytest.raises(HttpResponseError) as e:
        vault.client.create_rsa_key("no-hsm", size=2048, hardware_protected=True)
    assert e.value.status_code == 400

    # Purging destroys the key's objects in the token.
    c.begin_delete_key("hsm-rsa").wait()
    c.purge_deleted_key("hsm-rsa")
    assert len(key_labels(kagi) - before) == 1, key_labels(kagi) - before


def test_hsm_key_backups_restore_while_the_token_holds_the_key(kagi, make_vault):
    src = make_vault(sku="premium")
    key = src.client.create_rsa_key("hsm-b", size=2048, hardware_protected=True)
    blob = src.client.backup_key("hsm-b")
    src.client.create_rsa_key("soft-b", size=2048)
    soft_blob = src.client.backup_key("soft-b")
    # A sealed reference, not key material: far smaller than a software key's backup.
    assert len(blob) + 1000 < len(soft_blob), (len(blob), len(soft_blob))
    # HSM keys restore only into premium vaults.
    with pytest.raises(HttpResponseError) as e:
        make_vault().client.restore_key_backup(blob)
    assert e.value.status_code == 400 and "premium" in str(e.value), str(e.value)
    dst = make_vault(sku="premium")
    restored = dst.client.restore_key_backup(blob)
    assert restored.key_type == "RSA-HSM"
    dek = os.urandom(32)
    wrapped = kagi.crypto_client(key).wrap_key(KeyWrapAlgorithm.rsa_oaep_256, dek).encrypted_key
    assert kagi.crypto_client(restored).unwrap_key(KeyWrapAlgorithm.rsa_oaep_256, wrapped).key == dek
    # The restored copy is its own token object: purging the original leaves it working.
    src.client.begin_delete_key("hsm-b").wait()
    src.client.purge_deleted_key("hsm-b")
    assert kagi.crypto_client(restored).unwrap_key(KeyWrapAlgorithm.rsa_oaep_256, wrapped).key == dek
    # Once the token no longer holds the key, its backup is refused clearly (not retried).
    dst.client.begin_delete_key("hsm-b").wait()
    dst.client.purge_deleted_key("hsm-b")
    with pytest.raises(HttpResponseError) as e:
        dst.client.restore_key_backup(blob)
    assert e.value.status_code == 400 and "HSM" in str(e.value), str(e.value)


def byok_blob(kek, target_pkcs8: bytes) -> bytes:
    """Azure's .byok transfer blob, made as the customer's BYOK tool makes it:
    CKM_RSA_AES_KEY_WRAP = RSA-OAEP-SHA1(ephemeral AES-256 key) || AES-KWP(target PKCS#8)."""
    kek_pub = rsa.RSAPublicNumbers(int.from_bytes(kek.key.e, "big"), int.from_bytes(kek.key.n, "big")).public_key()
    aes = os.urandom(32)
    wrapped = kek_pub.encrypt(aes, padding.OAEP(mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None))
    wrapped += aes_key_wrap_with_padding(aes, target_pkcs8)
    doc = {
        "schema_version": "1.0.0",
        "header": {"kid": kek.id, "alg": "dir", "enc": "CKM_RSA_AES_KEY_WRAP"},
        "ciphertext": base64.urlsafe_b64encode(wrapped).decode().rstrip("="),
        "generator": "kagi conformance test",
    }
    return json.dumps(doc).encode()


def test_byok_import_of_a_key_wrapped_outside_kagi(kagi, premium_vault):
    c = premium_vault.client
    kek = c.create_rsa_key("kek", size=2048, hardware_protected=True, key_operations=["import"])
    assert kek.key_operations == ["import"]
    local = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pkcs8 = local.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    blob = byok_blob(kek, pkcs8)

    imported = c.import_key("byok", JsonWebKey(kty="RSA-HSM", t=blob, key_ops=["wrapKey", "unwrapKey", "sign", "verify"]))
    assert imported.key_type == "RSA-HSM"
    assert int.from_bytes(imported.key.n, "big") == local.public_key().public_numbers().n

    # Data wrapped under the original key unwraps inside the token.
    dek = os.urandom(32)
    wrapped = local.public_key().encrypt(dek, padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None))
    crypto = kagi.crypto_client(imported)
    assert crypto.unwrap_key(KeyWrapAlgorithm.rsa_oaep_256, wrapped).key == dek
    digest = hashes.Hash(hashes.SHA256())
    digest.update(b"byok")
    d = digest.finalize()
    local.public_key().verify(crypto.sign(SignatureAlgorithm.rs256, d).signature, d, padding.PKCS1v15(),
                              utils.Prehashed(hashes.SHA256()))

    # The key-exchange key does nothing but import.
    with pytest.raises(HttpResponseError) as e:
        kagi.crypto_client(kek).wrap_key(KeyWrapAlgorithm.rsa_oaep, dek)
    assert e.value.status_code == 403
    # A key-exchange key is that and nothing else: import with another operation is refused.
    for ops in (["import", "unwrapKey"], ["decrypt", "import"]):
        with pytest.raises(HttpResponseError) as e:
            c.create_rsa_key("mixed-kek", size=2048, hardware_protected=True, key_operations=ops)
        assert e.value.status_code == 400, ops
    with pytest.raises(HttpResponseError) as e:
        c.update_key_properties("kek", key_operations=["import", "unwrapKey"])
    assert e.value.status_code == 400

    # A blob for another key-exchange key, a damaged blob, a software KEK, the wrong kty, a
    # key size kagi does not take, a disabled KEK: refused, and nothing is left in the token.
    other = c.create_rsa_key("kek2", size=2048, hardware_protected=True, key_operations=["import"])
    bad = json.loads(blob)
    bad["header"]["kid"] = other.id
    damaged = json.loads(blob)
    raw = bytearray(base64.urlsafe_b64decode(damaged["ciphertext"] + "=="))
    raw[-1] ^= 1
    damaged["ciphertext"] = base64.urlsafe_b64encode(bytes(raw)).decode()
    soft_kek = c.create_rsa_key("soft-kek", size=2048, key_operations=["import"])
    swapped = json.loads(blob)
    swapped["header"]["kid"] = soft_kek.id
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    small_blob = json.loads(byok_blob(kek, small.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())))
    before = key_labels(kagi)
    cases = [("wrong-kek", bad, "RSA-HSM"), ("damaged", damaged, "RSA-HSM"), ("via-soft-kek", swapped, "RSA-HSM"),
             ("as-ec", json.loads(blob), "EC-HSM"), ("rsa-1024", small_blob, "RSA-HSM")]
    for name, b, kty in cases:
        with pytest.raises(HttpResponseError) as e:
            c.import_key(name, JsonWebKey(kty=kty, t=json.dumps(b).encode()))
        assert e.value.status_code == 400, (name, str(e.value))
    c.update_key_properties("kek", enabled=False)
    with pytest.raises(HttpResponseError) as e:
        c.import_key("disabled-kek", JsonWebKey(kty="RSA-HSM", t=blob))
    assert e.value.status_code in (400, 403), str(e.value)
    assert key_labels(kagi) == before
    names = {k.name for k in c.list_properties_of_keys()}
    assert not names & ({name for name, _, _ in cases} | {"disabled-kek", "mixed-kek"}), names


def test_backup_vault_on_an_hsm_key(kagi, tmp_path):
    from test_backup_vault import (assert_same_tree, backup_now, create_backup_vault, grant, kagi_cli, make_tree,
                                   manifest, ok, protect, restore, vref)

    bv, body = create_backup_vault(kagi, system_assigned=True)
    kv = kagi.create_vault(sku="premium", purge_protection=True)
    key = kv.client.create_rsa_key(random_name("cmk", 10), size=2048, hardware_protected=True)
    grant(kagi, kv, body["identity"]["principalId"])
    key_uri = f"{kv.url.rstrip('/')}/keys/{key.name}"
    out = ok(kagi_cli(kagi, "backup", "vault", "encryption", *vref(bv), "--key-uri", key_uri))
    assert out["properties"]["encryption"]["keyVaultProperties"]["keyUri"] == key_uri, out
    src = tmp_path / "src"
    make_tree(src)
    before = manifest(src)
    protect(kagi, bv, "data", src)
    first = backup_now(kagi, bv, "data")
    restore(kagi, bv, "data", first["stats"]["recoveryPointId"], tmp_path / "r1")
    assert_same_tree(before, tmp_path / "r1")


def test_root_key_sealed_by_the_token(tmp_path):
    # A server that starts without an HSM keeps a plain root key...
    srv = _start_server(tmp_path, "rk")
    try:
        srv.put_rg(DEFAULT_RG)
        v = srv.create_vault()
        srv.secret_client(v.url).set_secret("s", "kept across the move")
        assert (srv.data_dir / "root.key").exists()
    finally:
        srv.stop()

    # ...which its first start with one seals, removing the plain copy.
    from conftest import softhsm_token
    hsm_args, hsm_env = softhsm_token(tmp_path / "rk-softhsm")
    srv.extra_args += hsm_args
    srv.extra_env.update(hsm_env)
    srv.hsm_env = hsm_env
    srv.start()
    try:
        assert not (srv.data_dir / "root.key").exists()
        sealed = (srv.data_dir / "root.key.sealed").read_bytes()
        assert sealed.startswith(b"kagi-hsm-root/1") and len(sealed) < 100
        assert srv.secret_client(v.url).get_secret("s").value == "kept across the move"
        key = srv.create_vault(sku="premium").client.create_rsa_key("k", size=2048, hardware_protected=True)
        srv.restart()
        assert srv.secret_client(v.url).get_secret("s").value == "kept across the move"
        crypto = srv.crypto_client(key)
        dek = os.urandom(32)
        assert crypto.unwrap_key(KeyWrapAlgorithm.rsa_oaep, crypto.wrap_key(KeyWrapAlgorithm.rsa_oaep, dek).encrypted_key).key == dek
    finally:
        srv.stop()

    def start_fails(args, env):
        p = subprocess.run(args, env={**os.environ, **env}, capture_output=True, text=True, timeout=60)
        assert p.returncode != 0, p.stdout
        return p.stdout + p.stderr

    cmd = srv.command()
    # Without the HSM flags: refused, saying why.
    plain = [a for a in cmd]
    i = plain.index("--pkcs11-module")
    del plain[i:i + 6]
    assert "sealed by an HSM" in start_fails(plain, {})
    # A wrong PIN: refused, PIN not echoed.
    pin = tmp_path / "wrong-pin"
    pin.write_text("0000\n")
    os.chmod(pin, 0o600)
    wrong = list(cmd)
    wrong[wrong.index("--pkcs11-pin-file") + 1] = str(pin)
    out = start_fails(wrong, hsm_env)
    assert "logging in to PKCS#11 token 'kagi' failed" in out and "0000" not in out, out
    # The token gone: refused, naming it.
    tokens = tmp_path / "rk-softhsm" / "tokens"
    tokens.rename(tmp_path / "rk-softhsm" / "tokens-away")
    tokens.mkdir()
    out = start_fails(cmd, hsm_env)
    assert "no PKCS#11 token labelled 'kagi'" in out, out
    # Back: it serves again.
    tokens.rmdir()
    (tmp_path / "rk-softhsm" / "tokens-away").rename(tokens)
    srv.start()
    try:
        assert srv.secret_client(v.url).get_secret("s").value == "kept across the move"
    finally:
        srv.stop()


def test_disks_and_tde_protectors_on_hsm_keys(kagi, tmp_path):
    """Every CMK consumer takes an RSA-HSM key: a disk encryption set (a disk written and read
    with qemu-img) and a SQL server's TDE protector (rows written and read with psql)."""
    import test_disks as dk
    import test_sql as sq

    kv = kagi.create_vault(sku="premium", purge_protection=True)
    keys = kagi.key_client(kv.url)
    dkey = keys.create_rsa_key(random_name("dk", 10), size=2048, hardware_protected=True)
    tkey = keys.create_rsa_key(random_name("tde", 10), size=3072, hardware_protected=True)
    _, des = dk.create_set(kagi, dkey.id)
    dk.grant(kagi, kv, des["identity"]["principalId"])
    name, disk = dk.create_disk(kagi, encryption={"type": "EncryptionAtRestWithCustomerKey",
                                                  "diskEncryptionSetId": des["id"]})
    data = dk.random_image(tmp_path / "in.raw", 2, seed=15)
    uri = dk.grant_access(kagi, name, "Write")
    dk.run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", tmp_path / "in.raw", uri)
    dk.end_access(kagi, name)
    assert dk.read_back(dk.grant_access(kagi, name, "Read"), tmp_path / "out.raw", len(data)) == data
    dk.end_access(kagi, name)

    server, body = sq.create_server(kagi)
    sq.grant(kagi, kv, body["identity"]["principalId"])
    p = sq.ok(sq.set_protector(kagi, server, tkey.id))
    assert p["properties"]["uri"] == tkey.id, p
    db, _ = sq.create_db(kagi, server)
    sq.psql(kagi, server, db, "CREATE TABLE t (v TEXT); INSERT INTO t VALUES ('under an HSM key')")
    assert "under an HSM key" in sq.psql(kagi, server, db, "SELECT v FROM t").stdout
