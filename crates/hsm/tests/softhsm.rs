//! The provider against a real SoftHSM2 token (Debian's `softhsm2`, installed by
//! scripts/setup.sh): keys generated and imported inside it, every private operation
//! checked against aws-lc's public operations, BYOK unwrapping, root-key sealing and the
//! start-up failures an operator meets.
//!
//! One token per test process: SoftHSM reads its configuration once, at `C_Initialize`.

#![allow(clippy::unwrap_used, missing_docs)]

use std::path::{Path, PathBuf};
use std::process::Command;

use kagi_crypto::{
    CryptoError, Curve, EncryptionAlgorithm, KeyPair, KeyProvider, KeySpec, PublicKey, RsaKeySize,
    SignatureAlgorithm, TokenKeyRef,
};
use kagi_hsm::{HsmError, Pkcs11Config, Pkcs11Provider};
use zeroize::Zeroizing;

const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
const LABEL: &str = "kagi-test";
const PIN: &str = "1234-pin";

fn init_token(dir: &Path) {
    let tokens = dir.join("tokens");
    std::fs::create_dir_all(&tokens).unwrap();
    std::fs::write(
        dir.join("softhsm2.conf"),
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
            tokens.display()
        ),
    )
    .unwrap();
    let status = Command::new("softhsm2-util")
        .env("SOFTHSM2_CONF", dir.join("softhsm2.conf"))
        .args([
            "--init-token",
            "--free",
            "--label",
            LABEL,
            "--pin",
            PIN,
            "--so-pin",
            "5678-so",
        ])
        .stdout(std::process::Stdio::null())
        .status()
        .expect("softhsm2-util (scripts/setup.sh installs softhsm2)");
    assert!(status.success());
}

/// Runs `body` in a child process of this test binary whose `SOFTHSM2_CONF` points at a fresh
/// token (SoftHSM reads it once per process, and this crate cannot set the environment of
/// its own process without `unsafe`).
fn in_token(name: &str, body: impl FnOnce(&Pkcs11Provider)) {
    in_token_unopened(name, || {
        let provider = Pkcs11Provider::open(&config(LABEL, PIN)).unwrap();
        body(&provider);
    });
}

/// As [`in_token`], without opening the token first.
fn in_token_unopened(name: &str, body: impl FnOnce()) {
    if std::env::var("KAGI_HSM_TEST_CHILD").as_deref() == Ok(name) {
        body();
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    init_token(dir.path());
    let out = Command::new(std::env::current_exe().unwrap())
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env("SOFTHSM2_CONF", dir.path().join("softhsm2.conf"))
        .env("KAGI_HSM_TEST_CHILD", name)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(text.contains("1 passed"), "the child ran nothing: {text}");
}

fn config(label: &str, pin: &str) -> Pkcs11Config {
    Pkcs11Config {
        module: PathBuf::from(MODULE),
        token_label: label.into(),
        pin: Zeroizing::new(pin.into()),
    }
}

fn digest(alg: SignatureAlgorithm) -> Vec<u8> {
    kagi_crypto::digest(alg.digest_algorithm(), b"kagi hsm test message")
}

/// Every private operation of `key` checked against software public operations.
fn exercise(key: &dyn kagi_crypto::PrivateKeyOps) {
    let public: &PublicKey = key.public_key();
    if public.rsa_bits().is_some() {
        for alg in EncryptionAlgorithm::ALL {
            let ct = public
                .encrypt(alg, b"a data key of 32 bytes, or so...")
                .unwrap();
            assert_eq!(
                key.decrypt(alg, &ct).unwrap().as_slice(),
                b"a data key of 32 bytes, or so...",
                "{}",
                alg.jwa()
            );
            let mut bad = ct.clone();
            bad[10] ^= 1;
            let r = key.decrypt(alg, &bad);
            assert!(
                matches!(r, Err(CryptoError::DecryptionFailed)),
                "{}: {r:?}",
                alg.jwa()
            );
            assert!(matches!(
                key.decrypt(alg, &ct[1..]),
                Err(CryptoError::InvalidInput(_))
            ));
        }
    } else {
        assert!(key.decrypt(EncryptionAlgorithm::RsaOaep, &[0; 32]).is_err());
    }
    for alg in SignatureAlgorithm::ALL {
        let d = digest(alg);
        match key.sign_digest(alg, &d) {
            Ok(sig) => {
                assert!(
                    public.verify_digest(alg, &d, &sig).unwrap(),
                    "{}",
                    alg.jwa()
                );
                let mut other = d.clone();
                other[0] ^= 1;
                assert!(
                    !public.verify_digest(alg, &other, &sig).unwrap(),
                    "{}",
                    alg.jwa()
                );
            }
            Err(CryptoError::Unsupported(_)) => {
                assert!(
                    public.check_signature_alg(alg).is_err(),
                    "{} refused",
                    alg.jwa()
                );
            }
            Err(e) => panic!("{}: {e}", alg.jwa()),
        }
        if public.check_signature_alg(alg).is_ok() {
            assert!(matches!(
                key.sign_digest(alg, &d[1..]),
                Err(CryptoError::InvalidInput(_))
            ));
        }
    }
}

#[test]
fn generated_keys_work_inside_the_token() {
    in_token("generated_keys_work_inside_the_token", |p| {
        for spec in [
            KeySpec::Rsa(RsaKeySize::Rsa2048),
            KeySpec::Rsa(RsaKeySize::Rsa3072),
            KeySpec::Ec(Curve::P256),
            KeySpec::Ec(Curve::P384),
            KeySpec::Ec(Curve::P521),
            KeySpec::Ec(Curve::P256K),
        ] {
            let k = p.generate(spec).unwrap();
            assert_eq!(k.reference.token, LABEL);
            assert_eq!(k.reference.id.len(), 16);
            exercise(k.ops.as_ref());
            // Found again by reference, with the same public key.
            let again = p.load(&k.reference).unwrap();
            assert_eq!(again.public_key(), k.ops.public_key());
            exercise(again.as_ref());
            // A copy is its own object: destroying the original leaves it.
            let copy = p.copy(&k.reference).unwrap();
            assert_ne!(copy.reference.id, k.reference.id);
            assert_eq!(copy.ops.public_key(), k.ops.public_key());
            p.destroy(&k.reference).unwrap();
            exercise(p.load(&copy.reference).unwrap().as_ref());
            p.destroy(&copy.reference).unwrap();
            p.destroy(&k.reference).unwrap();
            assert!(matches!(
                p.load(&k.reference),
                Err(CryptoError::KeyNotHeld(_))
            ));
            assert!(matches!(
                p.copy(&k.reference),
                Err(CryptoError::KeyNotHeld(_))
            ));
        }
        let elsewhere = TokenKeyRef {
            token: "other".into(),
            id: vec![1; 16],
        };
        let err = p.load(&elsewhere).unwrap_err().to_string();
        assert!(err.contains("'other'") && err.contains(LABEL), "{err}");
    });
}

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../crypto/tests/fixtures/");

fn fixture_file(name: &str) -> Vec<u8> {
    std::fs::read(format!("{FIXTURES}{name}")).unwrap()
}

fn decode_hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn fixture_hex(name: &str) -> Vec<u8> {
    decode_hex(String::from_utf8(fixture_file(name)).unwrap().trim())
}

fn rsa_components() -> Vec<(String, Vec<u8>)> {
    String::from_utf8(fixture_file("rsa2048_components.txt"))
        .unwrap()
        .lines()
        .map(|l| {
            let (n, v) = l.split_once('=').unwrap();
            (n.to_owned(), decode_hex(v))
        })
        .collect()
}

#[test]
fn imported_keys_match_openssl() {
    in_token("imported_keys_match_openssl", |p| {
        // The OpenSSL fixture key, given in the clear as JWK components.
        let all = rsa_components();
        let get = |n: &str| all.iter().find(|(k, _)| k == n).unwrap().1.as_slice();
        let c = kagi_crypto::RsaPrivateComponents {
            n: get("n"),
            e: get("e"),
            d: get("d"),
            p: get("p"),
            q: get("q"),
            dp: get("dp"),
            dq: get("dq"),
            qi: get("qi"),
        };
        let k = p.import_rsa(&c).unwrap();
        exercise(k.ops.as_ref());
        let message = fixture_file("message.txt");
        // OpenSSL's ciphertexts decrypt inside the token, OAEP-256's padding outside it.
        for (alg, file) in [
            (EncryptionAlgorithm::RsaOaep, "rsa2048_oaep_sha1.bin"),
            (EncryptionAlgorithm::RsaOaep256, "rsa2048_oaep_sha256.bin"),
            (EncryptionAlgorithm::Rsa1_5, "rsa2048_pkcs1.bin"),
        ] {
            let plain = k.ops.decrypt(alg, &fixture_file(file)).unwrap();
            assert_eq!(plain.as_slice(), message.as_slice(), "{}", alg.jwa());
        }
        // PKCS#1 v1.5 signatures are deterministic: byte for byte OpenSSL's.
        let sig = k
            .ops
            .sign_digest(SignatureAlgorithm::RS256, &fixture_file("message.sha256"))
            .unwrap();
        assert_eq!(sig, fixture_file("rsa2048_rs256.sig"));

        for (curve, name) in [(Curve::P256, "ec_p256"), (Curve::P384, "ec_p384")] {
            let point = fixture_hex(&format!("{name}.pub.hex"));
            let len = curve.coordinate_len();
            let (x, y) = (&point[1..=len], &point[1 + len..]);
            let d = fixture_hex(&format!("{name}.d.hex"));
            let k = p.import_ec(curve, x, y, &d).unwrap();
            assert_eq!(
                k.ops.public_key(),
                &PublicKey::ec_from_components(curve, x, y).unwrap()
            );
            exercise(k.ops.as_ref());
            exercise(p.load(&k.reference).unwrap().as_ref());
        }
    });
}

/// Azure's BYOK wrapping (CKM_RSA_AES_KEY_WRAP) done in software, as on the customer's side.
fn byok_wrap(kek: &PublicKey, pkcs8: &[u8]) -> Vec<u8> {
    use aws_lc_rs::key_wrap::{AES_256, AesKek, KeyWrapPadded};
    let aes: [u8; 32] = kagi_crypto::random_array().unwrap();
    let mut out = kek.encrypt(EncryptionAlgorithm::RsaOaep, &aes).unwrap();
    let kw = AesKek::new(&AES_256, &aes).unwrap();
    let mut buf = vec![0u8; pkcs8.len() + 16];
    let wrapped = kw.wrap_with_padding(pkcs8, &mut buf).unwrap();
    out.extend_from_slice(wrapped);
    out
}

#[test]
fn byok_blobs_unwrap_inside_the_token() {
    in_token("byok_blobs_unwrap_inside_the_token", |p| {
        let kek = p
            .generate(KeySpec::RsaKeyExchange(RsaKeySize::Rsa2048))
            .unwrap();
        // The token itself refuses a key-exchange key anything but unwrapping.
        let ct = kek
            .ops
            .public_key()
            .encrypt(EncryptionAlgorithm::RsaOaep, b"x")
            .unwrap();
        let err = kek
            .ops
            .decrypt(EncryptionAlgorithm::RsaOaep, &ct)
            .unwrap_err();
        assert!(matches!(err, CryptoError::Unsupported(_)), "{err}");
        let d = digest(SignatureAlgorithm::RS256);
        assert!(kek.ops.sign_digest(SignatureAlgorithm::RS256, &d).is_err());
        let target = KeyPair::from_pkcs8(&fixture_file("rsa2048.pk8.der")).unwrap();
        let blob = byok_wrap(kek.ops.public_key(), &target.to_pkcs8().unwrap());
        let k = p.import_wrapped(&kek.reference, &blob).unwrap();
        assert_eq!(k.ops.public_key(), target.public_key());
        let plain = k
            .ops
            .decrypt(
                EncryptionAlgorithm::RsaOaep256,
                &fixture_file("rsa2048_oaep_sha256.bin"),
            )
            .unwrap();
        assert_eq!(plain.as_slice(), fixture_file("message.txt").as_slice());
        exercise(k.ops.as_ref());
        // Tampered, truncated, or under another key-exchange key: refused.
        let mut bad = blob.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        let err = p.import_wrapped(&kek.reference, &bad).unwrap_err();
        assert!(matches!(err, CryptoError::DecryptionFailed), "{err}");
        assert!(p.import_wrapped(&kek.reference, &blob[..200]).is_err());
        let other = p
            .generate(KeySpec::RsaKeyExchange(RsaKeySize::Rsa2048))
            .unwrap();
        assert!(p.import_wrapped(&other.reference, &blob).is_err());
        // An ordinary RSA key cannot serve as a key-exchange key, even for its own blobs.
        let plain = p.generate(KeySpec::Rsa(RsaKeySize::Rsa2048)).unwrap();
        let own = byok_wrap(plain.ops.public_key(), &target.to_pkcs8().unwrap());
        assert!(p.import_wrapped(&plain.reference, &own).is_err());
        // An EC target: refused clearly (the token keeps no public point for it).
        let ec = KeyPair::generate_ec(Curve::P256).unwrap();
        let ec_blob = byok_wrap(kek.ops.public_key(), &ec.to_pkcs8().unwrap());
        let err = p.import_wrapped(&kek.reference, &ec_blob).unwrap_err();
        assert!(matches!(err, CryptoError::Unsupported(_)), "{err}");
    });
}

#[test]
fn the_root_key_is_sealed_by_the_token() {
    in_token("the_root_key_is_sealed_by_the_token", |p| {
        let raw = [7u8; 32];
        let sealed = p.seal_root_key(&raw).unwrap();
        assert!(!sealed.windows(32).any(|w| w == raw));
        assert_eq!(p.open_root_key(&sealed).unwrap().as_slice(), &raw);
        // Each sealing makes its own wrapping key (named in the output) and IV; both open.
        let again = p.seal_root_key(&raw).unwrap();
        assert_ne!(sealed[..40], again[..40]);
        assert_eq!(p.open_root_key(&again).unwrap().as_slice(), &raw);
        // A wrapping key is not a key object: a reference to it is not copied or loaded.
        let wrap_id = sealed[16..32].to_vec();
        let wrap = TokenKeyRef {
            token: LABEL.into(),
            id: wrap_id,
        };
        assert!(matches!(p.copy(&wrap), Err(CryptoError::KeyNotHeld(_))));
        assert!(matches!(p.load(&wrap), Err(CryptoError::KeyNotHeld(_))));
        // Sealed by a wrapping key the token does not have: said so.
        let mut other = sealed.clone();
        other[16] ^= 1;
        assert!(matches!(
            p.open_root_key(&other),
            Err(CryptoError::KeyNotHeld(_))
        ));
        let mut bad = sealed.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        let err = p.open_root_key(&bad).unwrap_err();
        assert!(matches!(err, CryptoError::DecryptionFailed), "{err}");
        assert!(matches!(
            p.open_root_key(b"junk"),
            Err(CryptoError::DecryptionFailed)
        ));
    });
}

#[test]
fn opening_fails_clearly() {
    // Before any login of this process: the login state is the process's, not the handle's.
    in_token_unopened("opening_fails_clearly", || {
        let err = Pkcs11Provider::open(&config("no-such-token", PIN)).unwrap_err();
        assert!(matches!(err, HsmError::TokenNotFound { .. }), "{err}");
        let text = err.to_string();
        assert!(
            text.contains("'no-such-token'") && text.contains(LABEL),
            "{text}"
        );
        let err = Pkcs11Provider::open(&config(LABEL, "wrong")).unwrap_err();
        assert!(matches!(err, HsmError::Login { .. }), "{err}");
        assert!(
            !err.to_string().contains("wrong"),
            "the PIN is not echoed: {err}"
        );
        let mut c = config(LABEL, PIN);
        c.module = PathBuf::from("/nonexistent/libpkcs11.so");
        let err = Pkcs11Provider::open(&c).unwrap_err();
        assert!(matches!(err, HsmError::Module { .. }), "{err}");
        assert!(err.to_string().contains("/nonexistent/libpkcs11.so"));
        Pkcs11Provider::open(&config(LABEL, PIN)).unwrap();
    });
}
