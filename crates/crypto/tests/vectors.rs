//! Interoperability and known-answer tests against fixtures produced with OpenSSL 3.0
//! (see `fixtures/README.md` for the exact commands). Nothing here runs OpenSSL.

use kagi_crypto::{
    CryptoError, Curve, EncryptionAlgorithm, KeyPair, PublicKey, RsaPrivateComponents,
    SignatureAlgorithm,
};

const MESSAGE: &[u8] = include_bytes!("fixtures/message.txt");
const MESSAGE_SHA256: &[u8] = include_bytes!("fixtures/message.sha256");
const MESSAGE_SHA384: &[u8] = include_bytes!("fixtures/message.sha384");
const RSA2048_PKCS8: &[u8] = include_bytes!("fixtures/rsa2048.pk8.der");

fn rsa_components() -> Vec<(String, Vec<u8>)> {
    include_str!("fixtures/rsa2048_components.txt")
        .lines()
        .map(|line| {
            let (name, value) = line.split_once('=').expect("name=HEX");
            (name.to_owned(), hex::decode(value).expect("hex"))
        })
        .collect()
}

fn get<'a>(all: &'a [(String, Vec<u8>)], name: &str) -> &'a [u8] {
    &all.iter().find(|(n, _)| n == name).expect("component").1
}

/// The fixture key, once parsed from PKCS#8 and once built from its JWK-style components.
fn rsa_keys() -> [KeyPair; 2] {
    let all = rsa_components();
    let from_components = KeyPair::rsa_from_components(&RsaPrivateComponents {
        n: get(&all, "n"),
        e: get(&all, "e"),
        d: get(&all, "d"),
        p: get(&all, "p"),
        q: get(&all, "q"),
        dp: get(&all, "dp"),
        dq: get(&all, "dq"),
        qi: get(&all, "qi"),
    })
    .expect("fixture components import");
    [
        KeyPair::from_pkcs8(RSA2048_PKCS8).expect("fixture PKCS#8 parses"),
        from_components,
    ]
}

#[test]
fn digests_match_openssl() {
    assert_eq!(
        kagi_crypto::digest(kagi_crypto::DigestAlgorithm::Sha256, MESSAGE),
        MESSAGE_SHA256
    );
    assert_eq!(
        kagi_crypto::digest(kagi_crypto::DigestAlgorithm::Sha384, MESSAGE),
        MESSAGE_SHA384
    );
}

#[test]
fn pkcs8_and_components_give_the_same_key() {
    let [a, b] = rsa_keys();
    assert_eq!(a.public_key(), b.public_key());
    let all = rsa_components();
    assert_eq!(
        a.public_key(),
        &PublicKey::Rsa {
            n: get(&all, "n").to_vec(),
            e: get(&all, "e").to_vec(),
        }
    );
}

#[test]
fn decrypts_openssl_ciphertexts() {
    let cases: [(EncryptionAlgorithm, &[u8]); 3] = [
        (
            EncryptionAlgorithm::RsaOaep,
            include_bytes!("fixtures/rsa2048_oaep_sha1.bin"),
        ),
        (
            EncryptionAlgorithm::RsaOaep256,
            include_bytes!("fixtures/rsa2048_oaep_sha256.bin"),
        ),
        (
            EncryptionAlgorithm::Rsa1_5,
            include_bytes!("fixtures/rsa2048_pkcs1.bin"),
        ),
    ];
    for key in rsa_keys() {
        for (alg, ciphertext) in cases {
            assert_eq!(
                &key.decrypt(alg, ciphertext).unwrap()[..],
                MESSAGE,
                "{alg:?}"
            );
        }
        // The SHA-1 OAEP ciphertext does not open as OAEP-256 (nor vice versa).
        assert!(matches!(
            key.decrypt(EncryptionAlgorithm::RsaOaep256, cases[0].1),
            Err(CryptoError::DecryptionFailed)
        ));
        assert!(matches!(
            key.decrypt(EncryptionAlgorithm::RsaOaep, cases[1].1),
            Err(CryptoError::DecryptionFailed)
        ));
    }
}

#[test]
fn rs256_matches_openssl_byte_for_byte() {
    let expected: &[u8] = include_bytes!("fixtures/rsa2048_rs256.sig");
    for key in rsa_keys() {
        let alg = SignatureAlgorithm::RS256;
        assert!(
            key.public_key()
                .verify_digest(alg, MESSAGE_SHA256, expected)
                .unwrap()
        );
        assert_eq!(key.sign_digest(alg, MESSAGE_SHA256).unwrap(), expected);
    }
}

#[test]
fn verifies_openssl_ps256_signature() {
    let sig: &[u8] = include_bytes!("fixtures/rsa2048_ps256.sig");
    let key = KeyPair::from_pkcs8(RSA2048_PKCS8).unwrap();
    let public = key.public_key();
    assert!(
        public
            .verify_digest(SignatureAlgorithm::PS256, MESSAGE_SHA256, sig)
            .unwrap()
    );
    assert!(
        !public
            .verify_digest(SignatureAlgorithm::RS256, MESSAGE_SHA256, sig)
            .unwrap()
    );
    // And our PSS signatures verify under the same parameters.
    let ours = key
        .sign_digest(SignatureAlgorithm::PS256, MESSAGE_SHA256)
        .unwrap();
    assert!(
        public
            .verify_digest(SignatureAlgorithm::PS256, MESSAGE_SHA256, &ours)
            .unwrap()
    );
}

#[test]
fn public_key_from_components_verifies_openssl_signature() {
    let all = rsa_components();
    // A leading zero on n (two's-complement style) is stripped.
    let mut n = vec![0u8];
    n.extend_from_slice(get(&all, "n"));
    let public = PublicKey::rsa_from_components(&n, get(&all, "e")).unwrap();
    assert_eq!(public.rsa_bits(), Some(2048));
    assert!(
        public
            .verify_digest(
                SignatureAlgorithm::RS256,
                MESSAGE_SHA256,
                include_bytes!("fixtures/rsa2048_rs256.sig"),
            )
            .unwrap()
    );
    // Encrypt with our public key, decrypt with the private one.
    let key = KeyPair::from_pkcs8(RSA2048_PKCS8).unwrap();
    let ct = public
        .encrypt(EncryptionAlgorithm::RsaOaep256, MESSAGE)
        .unwrap();
    assert_eq!(
        &key.decrypt(EncryptionAlgorithm::RsaOaep256, &ct).unwrap()[..],
        MESSAGE
    );
}

#[test]
fn verifies_openssl_ecdsa_signatures() {
    struct Case {
        curve: Curve,
        alg: SignatureAlgorithm,
        pkcs8: &'static [u8],
        point_hex: &'static str,
        sig: &'static [u8],
        digest: &'static [u8],
    }
    let cases = [
        Case {
            curve: Curve::P256,
            alg: SignatureAlgorithm::ES256,
            pkcs8: include_bytes!("fixtures/ec_p256.pk8.der"),
            point_hex: include_str!("fixtures/ec_p256.pub.hex"),
            sig: include_bytes!("fixtures/ec_p256_es256.sig"),
            digest: MESSAGE_SHA256,
        },
        Case {
            curve: Curve::P384,
            alg: SignatureAlgorithm::ES384,
            pkcs8: include_bytes!("fixtures/ec_p384.pk8.der"),
            point_hex: include_str!("fixtures/ec_p384.pub.hex"),
            sig: include_bytes!("fixtures/ec_p384_es384.sig"),
            digest: MESSAGE_SHA384,
        },
    ];
    for Case {
        curve,
        alg,
        pkcs8,
        point_hex,
        sig,
        digest,
    } in cases
    {
        let len = curve.coordinate_len();
        let point = hex::decode(point_hex.trim()).unwrap();
        let public =
            PublicKey::ec_from_components(curve, &point[1..=len], &point[1 + len..]).unwrap();
        let key = KeyPair::from_pkcs8(pkcs8).unwrap();
        assert_eq!(key.public_key(), &public);
        assert_eq!(sig.len(), 2 * len);
        assert!(public.verify_digest(alg, digest, sig).unwrap());
        let mut bad = sig.to_vec();
        bad[len] ^= 1; // first byte of s
        assert!(!public.verify_digest(alg, digest, &bad).unwrap());
        // Our signature over the same digest verifies too.
        let ours = key.sign_digest(alg, digest).unwrap();
        assert!(public.verify_digest(alg, digest, &ours).unwrap());
    }
}

#[test]
fn rsa_1024_pkcs8_is_unsupported() {
    assert!(matches!(
        KeyPair::from_pkcs8(include_bytes!("fixtures/rsa1024.pk8.der")),
        Err(CryptoError::Unsupported(_))
    ));
}
