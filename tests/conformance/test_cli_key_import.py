"""`kagi keyvault key import`: keys made by the real `openssl` command (PEM plain and encrypted, PKCS#1,
SEC1, PKCS#12 with OpenSSL 3's defaults and with `-legacy`) are imported with the CLI, and each import is
proven by cryptography: something made with the local key is undone by the vault (unwrap, decrypt) or
something the vault makes is checked with the local key (a signature). A wrong password fails before
anything is sent. The BYOK path is checked only for reaching the server with `key_hsm` set."""

import hashlib
import json
import os
import re
import subprocess

import pytest
from azure.keyvault.keys.crypto import EncryptionAlgorithm, KeyWrapAlgorithm, SignatureAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from conftest import KAGI_BIN, b64url_decode, random_name
from test_cli import key_cmd, vault_create

pytestmark = pytest.mark.cli

PASSWORD = "correct horse battery staple"


def run(srv, *args, env=None, output_json=True):
    """`kagi <args>` against `srv`; returns the CompletedProcess."""
    cmd = [str(KAGI_BIN), *args, "--server", srv.base, "--data-dir", str(srv.data_dir)]
    if output_json:
        cmd += ["--output", "json"]
    full_env = {k: v for k, v in os.environ.items() if k != "KAGI_KEY_PASSWORD"}
    full_env.update(env or {})
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=full_env)


def ok(p) -> dict:
    assert p.returncode == 0, f"kagi failed ({p.returncode}):\n{p.stderr[-2000:]}"
    return json.loads(p.stdout)


def openssl(*args):
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """Key files made by openssl in one folder: {name: path}, plus the password file."""
    d = tmp_path_factory.mktemp("import-keys")
    pw = d / "password"
    pw.write_text(PASSWORD + "\n")
    f = {"password": pw}
    for kind, gen in [
        ("rsa", ["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"]),
        ("ec", ["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"]),
    ]:
        plain = d / f"{kind}.pem"
        openssl("genpkey", *gen, "-out", plain)
        f[f"{kind}-pem"] = plain
        enc = d / f"{kind}.enc.pem"
        openssl("pkcs8", "-topk8", "-in", plain, "-v2", "aes-256-cbc", "-passout", f"file:{pw}", "-out", enc)
        f[f"{kind}-pem-enc"] = enc
        crt = d / f"{kind}.crt"
        openssl("req", "-new", "-x509", "-key", plain, "-subj", "/CN=kagi-import-test", "-days", "1", "-out", crt)
        pfx = d / f"{kind}.pfx"
        openssl("pkcs12", "-export", "-inkey", plain, "-in", crt, "-passout", f"file:{pw}", "-out", pfx)
        f[f"{kind}-pfx"] = pfx
        legacy = d / f"{kind}.legacy.pfx"
        try:
            openssl("pkcs12", "-export", "-legacy", "-inkey", plain, "-in", crt, "-passout", f"file:{pw}",
                    "-out", legacy)
            f[f"{kind}-pfx-legacy"] = legacy
        except subprocess.CalledProcessError:
            pass  # an OpenSSL without the legacy provider: that case is skipped
    pkcs1 = d / "rsa.pkcs1.pem"
    openssl("rsa", "-in", f["rsa-pem"], "-traditional", "-out", pkcs1)
    f["rsa-pkcs1"] = pkcs1
    sec1 = d / "ec.sec1.pem"
    openssl("ec", "-in", f["ec-pem"], "-out", sec1)
    f["ec-sec1"] = sec1
    return f


@pytest.fixture(scope="module")
def vault_name(kagi):
    name = random_name("imp", 16)
    ok(run(kagi, *vault_create(name), "--sku", "premium"))
    return name


def local_private(path):
    return serialization.load_pem_private_key(path.read_bytes(), password=None)


def prove(kagi, imported: dict, local_key):
    """The vault holds the private half of `local_key`."""
    kid = imported["key"]["kid"]
    crypto = kagi.crypto_client(kid)
    pub = local_key.public_key()
    if isinstance(pub, rsa.RSAPublicKey):
        nums = pub.public_numbers()
        assert nums.n.bit_length() == 2048
        assert int.from_bytes(b64url_decode(imported["key"]["n"]), "big") == nums.n
        assert imported["key"]["e"] == "AQAB"
        # wrap locally, unwrap in the vault
        cek = os.urandom(32)
        wrapped = pub.encrypt(cek, padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None))
        assert crypto.unwrap_key(KeyWrapAlgorithm.rsa_oaep_256, wrapped).key == cek
        # encrypt locally (RSA-OAEP is SHA-1), decrypt in the vault
        msg = b"imported with kagi"
        ct = pub.encrypt(msg, padding.OAEP(mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None))
        assert crypto.decrypt(EncryptionAlgorithm.rsa_oaep, ct).plaintext == msg
        # sign in the vault, verify locally
        digest = hashlib.sha256(msg).digest()
        sig = crypto.sign(SignatureAlgorithm.rs256, digest).signature
        pub.verify(sig, msg, padding.PKCS1v15(), hashes.SHA256())
    else:
        assert imported["key"]["crv"] == "P-256"
        nums = pub.public_numbers()
        assert int.from_bytes(b64url_decode(imported["key"]["x"]), "big") == nums.x
        assert int.from_bytes(b64url_decode(imported["key"]["y"]), "big") == nums.y
        msg = b"imported with kagi"
        sig = crypto.sign(SignatureAlgorithm.es256, hashlib.sha256(msg).digest()).signature
        assert len(sig) == 64
        r, s = int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big")
        pub.verify(encode_dss_signature(r, s), msg, ec.ECDSA(hashes.SHA256()))


CASES = [
    # (case, flag, file, password via)
    ("rsa-pem", "--pem-file", None),
    ("rsa-pkcs1", "--pem-file", None),
    ("rsa-pem-enc", "--pem-file", "file"),
    ("rsa-pfx", "--pfx-file", "file"),
    ("rsa-pfx-legacy", "--pfx-file", "env"),
    ("ec-pem", "--pem-file", None),
    ("ec-sec1", "--pem-file", None),
    ("ec-pem-enc", "--pem-file", "env"),
    ("ec-pfx", "--pfx-file", "file"),
    ("ec-pfx-legacy", "--pfx-file", "file"),
]


@pytest.mark.parametrize("case,flag,password", CASES, ids=[c[0] for c in CASES])
def test_import_and_use(kagi, keys, vault_name, case, flag, password):
    if case not in keys:
        pytest.skip(f"this openssl cannot write {case}")
    name = case
    args = [*key_cmd("import", vault_name, "--name", name, flag, str(keys[case]))]
    env = None
    if password == "file":
        args += ["--password-file", str(keys["password"])]
    elif password == "env":
        env = {"KAGI_KEY_PASSWORD": PASSWORD}
    out = ok(run(kagi, *args, env=env))
    assert out["key"]["kty"] == ("RSA" if case.startswith("rsa") else "EC")
    assert out["key"]["kid"].split("/keys/")[1].startswith(name + "/")
    assert "d" not in out["key"] and "p" not in out["key"]
    prove(kagi, out, local_private(keys[case.split("-")[0] + "-pem"]))


def test_import_hsm(kagi, keys, vault_name):
    """--hsm sends Hsm: true. The session server has no PKCS#11 token, so it refuses HSM keys and says
    so; a server with one makes an RSA-HSM key (tests with a token: test_hsm*.py)."""
    p = run(kagi, *key_cmd("import", vault_name, "--name", "hsm", "--pem-file", str(keys["rsa-pem"]), "--hsm"))
    if p.returncode == 0:
        out = json.loads(p.stdout)
        assert out["key"]["kty"] == "RSA-HSM"
        prove(kagi, out, local_private(keys["rsa-pem"]))
    else:
        assert "KeyTypeNotSupported" in p.stderr and "HSM" in p.stderr, p.stderr
        assert not key_exists(kagi, vault_name, "hsm")


def test_import_flags_ops_dates(kagi, keys, vault_name):
    out = ok(run(kagi, *key_cmd("import", vault_name, "--name", "flags", "--pem-file", str(keys["rsa-pem"]),
                                "--ops", "unwrapKey,wrapKey", "--not-before", "1700000000",
                                "--expires", "4102444800")))
    assert out["key"]["kty"] == "RSA"
    assert sorted(out["key"]["key_ops"]) == ["unwrapKey", "wrapKey"]
    assert out["attributes"]["nbf"] == 1700000000 and out["attributes"]["exp"] == 4102444800
    assert out["attributes"]["enabled"] is True
    crypto = kagi.crypto_client(out["key"]["kid"])
    cek = os.urandom(32)
    pub = local_private(keys["rsa-pem"]).public_key()
    wrapped = pub.encrypt(cek, padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None))
    assert crypto.unwrap_key(KeyWrapAlgorithm.rsa_oaep_256, wrapped).key == cek

    out = ok(run(kagi, *key_cmd("import", vault_name, "--name", "off", "--pem-file", str(keys["ec-pem"]),
                                "--disabled")))
    assert out["attributes"]["enabled"] is False

    # table output: one line with the key id
    p = run(kagi, *key_cmd("import", vault_name, "--name", "table", "--pem-file", str(keys["ec-pem"])),
            output_json=False)
    assert p.returncode == 0, p.stderr
    assert "/keys/table/" in p.stdout and "EC" in p.stdout


def key_exists(kagi, vault_name, name) -> bool:
    return run(kagi, *key_cmd("show", vault_name, "--name", name)).returncode == 0


@pytest.mark.parametrize("case", ["rsa-pem-enc", "ec-pem-enc", "rsa-pfx", "rsa-pfx-legacy"])
def test_wrong_password_creates_nothing(kagi, keys, vault_name, tmp_path, case):
    if case not in keys:
        pytest.skip(f"this openssl cannot write {case}")
    wrong = "not the password"
    pw = tmp_path / "wrong"
    pw.write_text(wrong + "\n")
    name = f"wrong-{case}"
    flag = "--pfx-file" if "pfx" in case else "--pem-file"
    for how in ("file", "env"):
        extra = ["--password-file", str(pw)] if how == "file" else []
        env = {"KAGI_KEY_PASSWORD": wrong} if how == "env" else None
        p = run(kagi, *key_cmd("import", vault_name, "--name", name, flag, str(keys[case]), *extra), env=env)
        assert p.returncode != 0
        assert "wrong password" in p.stderr, p.stderr
        assert wrong not in p.stderr and PASSWORD not in p.stderr
        assert not key_exists(kagi, vault_name, name)


def test_missing_password_and_bad_files(kagi, keys, vault_name, tmp_path):
    p = run(kagi, *key_cmd("import", vault_name, "--name", "nopw", "--pem-file", str(keys["rsa-pem-enc"])))
    assert p.returncode != 0 and "KAGI_KEY_PASSWORD" in p.stderr, p.stderr
    # a certificate alone is not a key
    p = run(kagi, *key_cmd("import", vault_name, "--name", "cert", "--pem-file",
                           str(keys["rsa-pem"]).replace("rsa.pem", "rsa.crt")))
    assert p.returncode != 0 and "no private key" in p.stderr, p.stderr
    # a .pfx given as PEM, and the other way round
    p = run(kagi, *key_cmd("import", vault_name, "--name", "swap", "--pem-file", str(keys["rsa-pfx"])))
    assert p.returncode != 0 and "--pfx-file" in p.stderr, p.stderr
    p = run(kagi, *key_cmd("import", vault_name, "--name", "swap", "--pfx-file", str(keys["rsa-pem"])))
    assert p.returncode != 0 and "--pem-file" in p.stderr, p.stderr
    # an Ed25519 key is refused with its name
    ed = tmp_path / "ed.pem"
    openssl("genpkey", "-algorithm", "ED25519", "-out", ed)
    p = run(kagi, *key_cmd("import", vault_name, "--name", "ed", "--pem-file", str(ed)))
    assert p.returncode != 0 and "Ed25519" in p.stderr, p.stderr
    # exactly one source
    p = run(kagi, *key_cmd("import", vault_name, "--name", "two", "--pem-file", str(keys["rsa-pem"]),
                           "--pfx-file", str(keys["rsa-pfx"])))
    assert p.returncode != 0
    for name in ("nopw", "cert", "swap", "ed", "two"):
        assert not key_exists(kagi, vault_name, name)


def test_byok_blob_reaches_the_server(kagi, vault_name, tmp_path):
    """Only that the request goes out with key_hsm: the blob is made up, so the server refuses it, and
    its refusal is about the BYOK blob (key_hsm, its KEK or the transfer format)."""
    blob = tmp_path / "k.byok"
    blob.write_text(json.dumps({
        "schema_version": "1.0.0",
        "header": {"kid": f"https://{vault_name}.vault.azure.net/keys/kek/0", "alg": "dir",
                   "enc": "CKM_RSA_AES_KEY_WRAP"},
        "ciphertext": "bm90IGEgcmVhbCBibG9i",
        "generator": "kagi conformance test",
    }))
    p = run(kagi, *key_cmd("import", vault_name, "--name", "byok", "--byok-file", str(blob)))
    assert p.returncode != 0
    assert re.search(r"BYOK|key_hsm|KEK|transfer", p.stderr, re.I), p.stderr
    # the flags are checked on the client
    p = run(kagi, *key_cmd("import", vault_name, "--name", "byok", "--byok-file", str(blob), "--kty", "EC-HSM"))
    assert p.returncode != 0 and "--curve" in p.stderr, p.stderr
    assert not key_exists(kagi, vault_name, "byok")
