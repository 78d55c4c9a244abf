//! Password hashing for user principals: Argon2id with per-password random salt, stored as
//! `argon2id$v=19$m=19456,t=2,p=1$<salt>$<hash>` (base64url). Passwords are low-entropy, so,
//! unlike 256-bit client secrets, they get a memory-hard hash.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use crate::{CryptoError, Result};

const M_COST: u32 = 19 * 1024;
const T_COST: u32 = 2;
const P_COST: u32 = 1;

fn b64(b: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(b)
}

fn unb64(s: &str) -> Option<Vec<u8>> {
    URL_SAFE_NO_PAD.decode(s).ok()
}

fn derive(password: &str, salt: &[u8], m: u32, t: u32, p: u32) -> Result<[u8; 32]> {
    let params = argon2::Params::new(m, t, p, Some(32)).map_err(|_| CryptoError::Internal)?;
    let a = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let mut out = [0u8; 32];
    a.hash_password_into(password.as_bytes(), salt, &mut out)
        .map_err(|_| CryptoError::Internal)?;
    Ok(out)
}

/// Hashes a password for storage.
///
/// # Errors
/// [`CryptoError::Internal`] if the random source or Argon2 fails.
pub fn hash_password(password: &str) -> Result<String> {
    let salt = crate::random_bytes(16)?;
    let hash = derive(password, &salt, M_COST, T_COST, P_COST)?;
    Ok(format!(
        "argon2id$v=19$m={M_COST},t={T_COST},p={P_COST}${}${}",
        b64(&salt),
        b64(&hash)
    ))
}

/// A well-formed hash with the same parameters as [`hash_password`]'s that no password
/// matches (its salt and hash are zeros: finding a match means inverting Argon2id).
/// Verifying a password for a user name that does not exist against it costs what verifying a
/// real user's password costs, so the time of an answer does not tell which names exist.
pub fn dummy_hash() -> String {
    format!(
        "argon2id$v=19$m={M_COST},t={T_COST},p={P_COST}${}${}",
        b64(&[0u8; 16]),
        b64(&[0u8; 32])
    )
}

/// Checks a password against a stored hash, in constant time over the hash.
pub fn verify_password(password: &str, stored: &str) -> bool {
    let parts: Vec<&str> = stored.split('$').collect();
    let [alg, ver, params, salt, hash] = parts.as_slice() else {
        return false;
    };
    if *alg != "argon2id" || *ver != "v=19" {
        return false;
    }
    let mut mtp = [0u32; 3];
    for (i, kv) in params.split(',').enumerate().take(3) {
        match kv.split_once('=').and_then(|(_, v)| v.parse().ok()) {
            Some(v) => mtp[i] = v,
            None => return false,
        }
    }
    // Bounded parameters: a stored hash must not make verification arbitrarily expensive.
    if mtp[0] > 256 * 1024 || mtp[1] > 10 || mtp[2] > 4 {
        return false;
    }
    let (Some(salt), Some(expected)) = (unb64(salt), unb64(hash)) else {
        return false;
    };
    match derive(password, &salt, mtp[0], mtp[1], mtp[2]) {
        Ok(h) => {
            h.len() == expected.len()
                && h.iter().zip(&expected).fold(0u8, |a, (x, y)| a | (x ^ y)) == 0
        }
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_and_verify() {
        let h = hash_password("correct horse battery").unwrap();
        assert!(h.starts_with("argon2id$v=19$m=19456,t=2,p=1$"));
        assert!(verify_password("correct horse battery", &h));
        assert!(!verify_password("correct horse batterY", &h));
        assert!(!verify_password("correct horse battery", "garbage"));
        assert_ne!(
            h,
            hash_password("correct horse battery").unwrap(),
            "salts differ"
        );
        // The dummy hash parses with the real parameters (so it costs a full derivation) and
        // matches nothing.
        let dummy = dummy_hash();
        assert_eq!(
            dummy.rsplitn(3, '$').nth(2),
            h.rsplitn(3, '$').nth(2),
            "same algorithm and parameters"
        );
        assert!(!verify_password("", &dummy));
        assert!(!verify_password("correct horse battery", &dummy));
        assert_eq!(
            unb64(&b64(b"\x00\x01\xfe\xff\x10")).unwrap(),
            b"\x00\x01\xfe\xff\x10"
        );
    }
}
