//! RSA paddings done outside a token that performs only the raw RSA operation
//! (`CKM_RSA_X_509`) or PKCS#1 v1.5 signing without hashing (`CKM_RSA_PKCS`).
//!
//! SoftHSM2 2.6 has RSA-OAEP with SHA-1 only; RSA-OAEP-256 decrypts as the raw RSA operation
//! inside the token followed by [`oaep_decode`] here. The decoding is written to take the
//! same path whatever the padding holds (RFC 8017 7.1.2 note: telling the failures apart is
//! Manger's attack), and every failure is the same [`CryptoError::DecryptionFailed`].

use aws_lc_rs::digest;
use zeroize::Zeroizing;

use crate::alg::{DigestAlgorithm, EncryptionAlgorithm, SignatureAlgorithm};
use crate::error::{CryptoError, Result};

/// DER `DigestInfo` prefixes (RFC 8017 9.2 note 1) for the hashes Azure's RS* use.
fn digest_info_prefix(alg: DigestAlgorithm) -> &'static [u8] {
    match alg {
        DigestAlgorithm::Sha256 => &[
            0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02,
            0x01, 0x05, 0x00, 0x04, 0x20,
        ],
        DigestAlgorithm::Sha384 => &[
            0x30, 0x41, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02,
            0x02, 0x05, 0x00, 0x04, 0x30,
        ],
        DigestAlgorithm::Sha512 => &[
            0x30, 0x51, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02,
            0x03, 0x05, 0x00, 0x04, 0x40,
        ],
    }
}

/// The `DigestInfo` an RSASSA-PKCS1-v1_5 signature (RS256/384/512) signs, for a token's
/// `CKM_RSA_PKCS`, which pads but does not hash.
///
/// # Errors
/// [`CryptoError::Unsupported`] for a non-RS algorithm, [`CryptoError::InvalidInput`] for a
/// digest of the wrong length.
pub fn pkcs1_digest_info(alg: SignatureAlgorithm, digest: &[u8]) -> Result<Vec<u8>> {
    if !matches!(
        alg,
        SignatureAlgorithm::RS256 | SignatureAlgorithm::RS384 | SignatureAlgorithm::RS512
    ) {
        return Err(CryptoError::Unsupported(format!(
            "{} is not an RSASSA-PKCS1-v1_5 algorithm",
            alg.jwa()
        )));
    }
    check_digest_len(alg, digest)?;
    let mut out = digest_info_prefix(alg.digest_algorithm()).to_vec();
    out.extend_from_slice(digest);
    Ok(out)
}

/// Checks that `digest` is as long as `alg`'s hash output.
///
/// # Errors
/// [`CryptoError::InvalidInput`] otherwise.
pub fn check_digest_len(alg: SignatureAlgorithm, digest: &[u8]) -> Result<()> {
    alg.import_digest(digest).map(|_| ())
}

fn oaep_hash(alg: EncryptionAlgorithm) -> Result<&'static digest::Algorithm> {
    match alg {
        EncryptionAlgorithm::RsaOaep => Ok(&digest::SHA1_FOR_LEGACY_USE_ONLY),
        EncryptionAlgorithm::RsaOaep256 => Ok(&digest::SHA256),
        EncryptionAlgorithm::Rsa1_5 => Err(CryptoError::Unsupported(
            "RSA1_5 is not an OAEP scheme".into(),
        )),
    }
}

/// MGF1 (RFC 8017 B.2.1) of `seed`, XORed into `out`.
fn xor_mgf1(hash: &'static digest::Algorithm, seed: &[u8], out: &mut [u8]) {
    for (counter, chunk) in out.chunks_mut(hash.output_len()).enumerate() {
        let mut ctx = digest::Context::new(hash);
        ctx.update(seed);
        // At most k / hLen blocks: far below 2^32.
        ctx.update(&(counter as u32).to_be_bytes());
        for (o, m) in chunk.iter_mut().zip(ctx.finish().as_ref()) {
            *o ^= m;
        }
    }
}

/// 0xff if `b` is zero, else 0x00, without a branch on `b` (`black_box` keeps the optimiser
/// from turning the masks back into branches).
fn ct_is_zero(b: u8) -> u8 {
    let b = std::hint::black_box(b);
    // (b - 1) has its top bit set only when b == 0 (as a 16-bit value).
    (u16::from(b).wrapping_sub(1) >> 8) as u8
}

/// EME-OAEP decoding (RFC 8017 7.1.2 step 3) of the raw RSA output `em` (the modulus length
/// `k`, shorter outputs left-padded with zeros), with an empty label.
///
/// # Errors
/// [`CryptoError::DecryptionFailed`] for any malformed padding, without saying which check
/// failed; [`CryptoError::Unsupported`] for RSA1_5.
pub fn oaep_decode(alg: EncryptionAlgorithm, em: &[u8], k: usize) -> Result<Zeroizing<Vec<u8>>> {
    let hash = oaep_hash(alg)?;
    let h = hash.output_len();
    if k < 2 * h + 2 || em.len() > k {
        return Err(CryptoError::DecryptionFailed);
    }
    let mut buf = Zeroizing::new(vec![0u8; k]);
    buf[k - em.len()..].copy_from_slice(em);
    let (y, rest) = buf.split_at_mut(1);
    let (seed, db) = rest.split_at_mut(h);
    xor_mgf1(hash, db, seed);
    xor_mgf1(hash, seed, db);
    let l_hash = digest::digest(hash, b"");
    // Every check runs to the end; `good` is 0xff only if all pass.
    let mut diff = 0u8;
    for (a, b) in db[..h].iter().zip(l_hash.as_ref()) {
        diff |= a ^ b;
    }
    let mut good = ct_is_zero(diff) & ct_is_zero(y[0]);
    let mut found = 0u8;
    let mut bad = 0u8;
    let mut index = 0usize;
    for (i, &b) in db[h..].iter().enumerate() {
        let is_one = ct_is_zero(b ^ 1);
        let is_zero = ct_is_zero(b);
        let first_one = !found & is_one;
        // Select i without a branch: the mask widened to usize.
        let mask = usize::from(first_one & 1).wrapping_neg();
        index = (index & !mask) | (i & mask);
        bad |= !found & !is_zero & !is_one;
        found |= is_one;
    }
    good &= found & !bad;
    if good != 0xff {
        return Err(CryptoError::DecryptionFailed);
    }
    Ok(Zeroizing::new(db[h + index + 1..].to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// EME-OAEP encoding (RFC 8017 7.1.1 step 2) with a fixed seed, to test the decoder.
    fn oaep_encode(alg: EncryptionAlgorithm, msg: &[u8], k: usize, seed: &[u8]) -> Vec<u8> {
        let hash = oaep_hash(alg).unwrap();
        let h = hash.output_len();
        let mut db = digest::digest(hash, b"").as_ref().to_vec();
        db.resize(k - msg.len() - h - 2, 0);
        db.push(1);
        db.extend_from_slice(msg);
        let mut seed = seed[..h].to_vec();
        xor_mgf1(hash, &seed, &mut db);
        xor_mgf1(hash, &db, &mut seed);
        let mut em = vec![0u8];
        em.extend_from_slice(&seed);
        em.extend_from_slice(&db);
        em
    }

    #[test]
    fn oaep_round_trips_and_refuses_tampering() {
        let seed = [7u8; 32];
        for alg in [
            EncryptionAlgorithm::RsaOaep,
            EncryptionAlgorithm::RsaOaep256,
        ] {
            for msg in [&b""[..], b"a", &[0x5a; 100]] {
                let em = oaep_encode(alg, msg, 256, &seed);
                assert_eq!(oaep_decode(alg, &em, 256).unwrap().as_slice(), msg);
                // The raw RSA output may lose its leading zero byte.
                assert_eq!(oaep_decode(alg, &em[1..], 256).unwrap().as_slice(), msg);
                for i in [0, 1, 40, 100, 255] {
                    let mut bad = em.clone();
                    bad[i] ^= 0x01;
                    assert!(matches!(
                        oaep_decode(alg, &bad, 256),
                        Err(CryptoError::DecryptionFailed)
                    ));
                }
            }
        }
        let em = oaep_encode(EncryptionAlgorithm::RsaOaep256, b"x", 256, &seed);
        assert!(oaep_decode(EncryptionAlgorithm::RsaOaep, &em, 256).is_err());
        assert!(oaep_decode(EncryptionAlgorithm::RsaOaep256, &[0; 300], 256).is_err());
        assert!(oaep_decode(EncryptionAlgorithm::Rsa1_5, &em, 256).is_err());
    }

    #[test]
    fn digest_info_has_the_right_shape() {
        let d = [0xabu8; 32];
        let di = pkcs1_digest_info(SignatureAlgorithm::RS256, &d).unwrap();
        assert_eq!(di.len(), 19 + 32);
        assert_eq!(&di[19..], &d);
        assert!(pkcs1_digest_info(SignatureAlgorithm::PS256, &d).is_err());
        assert!(pkcs1_digest_info(SignatureAlgorithm::RS512, &d).is_err());
        for (alg, len) in [
            (SignatureAlgorithm::RS384, 48usize),
            (SignatureAlgorithm::RS512, 64),
        ] {
            let di = pkcs1_digest_info(alg, &vec![1; len]).unwrap();
            // SEQUENCE length covers the rest.
            assert_eq!(usize::from(di[1]) + 2, di.len());
        }
    }

    #[test]
    fn ct_is_zero_is_exact() {
        for b in 0..=255u8 {
            assert_eq!(ct_is_zero(b), if b == 0 { 0xff } else { 0 });
        }
    }
}
