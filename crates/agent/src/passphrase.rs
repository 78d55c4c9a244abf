//! The passphrase key hierarchy (MP-1): the repository's random data key (DEK) is wrapped by a
//! key derived from the passphrase with Argon2id, whose parameters and salt are stored beside
//! the wrapped key in the repository's `keys/` entry. Changing the passphrase writes a new
//! entry (the same DEK wrapped under the new passphrase) and removes the old one: data is
//! never re-encrypted, and every recovery point stays readable with the new passphrase.

use kagi_backup::KeyEntry;
use kagi_crypto::data_key::DataKey;
use kagi_crypto::vault_backup::{Argon2Params, FileKey};
use serde_json::{Value, json};

use crate::AgentError;

/// Binds a wrapped key to its purpose, so it cannot be confused with a service-wrapped key.
const WRAP_AAD: &[u8] = b"kagi/agent/passphrase-wrap/v1";

fn kek(passphrase: &str, params: Argon2Params, salt: &[u8]) -> Result<DataKey, AgentError> {
    let k = FileKey::from_passphrase(passphrase.as_bytes(), params, salt)
        .map_err(|e| AgentError::Crypto(e.to_string()))?;
    DataKey::from_bytes(k.expose_for_wrapping()).map_err(|e| AgentError::Crypto(e.to_string()))
}

/// Wraps `dek` under `passphrase` (fresh salt, default Argon2id cost: 64 MiB, 3 passes).
pub fn wrap(dek: &DataKey, passphrase: &str, now: i64) -> Result<KeyEntry, AgentError> {
    wrap_with(dek, passphrase, Argon2Params::default(), now)
}

/// Wraps `dek` under `passphrase` with explicit Argon2id parameters.
pub fn wrap_with(
    dek: &DataKey,
    passphrase: &str,
    params: Argon2Params,
    now: i64,
) -> Result<KeyEntry, AgentError> {
    let salt = kagi_crypto::random_bytes(16).map_err(|e| AgentError::Crypto(e.to_string()))?;
    let wrapped = kek(passphrase, params, &salt)?
        .seal(WRAP_AAD, dek.expose_for_wrapping())
        .map_err(|e| AgentError::Crypto(e.to_string()))?;
    let id_bytes = kagi_crypto::random_bytes(8).map_err(|e| AgentError::Crypto(e.to_string()))?;
    Ok(KeyEntry {
        id: format!(
            "{now}-{}",
            id_bytes
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        ),
        kek: json!({
            "kind": "passphrase",
            "kdf": "argon2id",
            "memoryKiB": params.memory_kib,
            "iterations": params.iterations,
            "parallelism": params.parallelism,
            "salt": kagi_core::b64::encode(&salt),
        }),
        wrapped: kagi_core::b64::encode(&wrapped),
        created: now,
    })
}

fn params_of(kek: &Value) -> Option<(Argon2Params, Vec<u8>)> {
    if kek["kind"] != "passphrase" || kek["kdf"] != "argon2id" {
        return None;
    }
    let n = |k: &str| kek[k].as_u64().and_then(|v| u32::try_from(v).ok());
    let params = Argon2Params {
        memory_kib: n("memoryKiB")?,
        iterations: n("iterations")?,
        parallelism: n("parallelism")?,
    };
    // Stored parameters are bounded before use: a tampered entry must not ask for 100 GiB.
    params.validate().ok()?;
    Some((params, kagi_core::b64::decode(kek["salt"].as_str()?)?))
}

/// Unwraps the data key from whichever entry `passphrase` opens; [`AgentError::WrongPassphrase`]
/// when none does.
pub fn unwrap(entries: &[KeyEntry], passphrase: &str) -> Result<DataKey, AgentError> {
    for e in entries {
        let Some((params, salt)) = params_of(&e.kek) else {
            continue;
        };
        let Some(wrapped) = kagi_core::b64::decode(&e.wrapped) else {
            continue;
        };
        if let Ok(raw) = kek(passphrase, params, &salt)?.open(WRAP_AAD, &wrapped) {
            let raw: [u8; 32] = raw
                .as_slice()
                .try_into()
                .map_err(|_| AgentError::Crypto("wrapped key has the wrong length".into()))?;
            let raw = zeroize::Zeroizing::new(raw);
            return DataKey::from_bytes(&raw).map_err(|e| AgentError::Crypto(e.to_string()));
        }
    }
    Err(AgentError::WrongPassphrase)
}

/// A generated passphrase: 32 characters from 24 random bytes (192 bits), URL-safe base64.
pub fn generate() -> Result<zeroize::Zeroizing<String>, AgentError> {
    let raw = zeroize::Zeroizing::new(
        kagi_crypto::random_array::<24>().map_err(|e| AgentError::Crypto(e.to_string()))?,
    );
    Ok(zeroize::Zeroizing::new(kagi_core::b64::encode(&*raw)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cheap() -> Argon2Params {
        Argon2Params {
            memory_kib: 1024,
            iterations: 1,
            parallelism: 1,
        }
    }

    #[test]
    fn right_passphrase_unwraps_wrong_one_does_not() {
        let dek = DataKey::generate().unwrap();
        let e = wrap_with(&dek, "correct horse battery staple", cheap(), 1).unwrap();
        let back = unwrap(std::slice::from_ref(&e), "correct horse battery staple").unwrap();
        assert_eq!(back.expose_for_wrapping(), dek.expose_for_wrapping());
        assert!(matches!(
            unwrap(&[e], "correct horse battery stapl3"),
            Err(AgentError::WrongPassphrase)
        ));
    }

    #[test]
    fn tampered_parameters_are_not_used() {
        let dek = DataKey::generate().unwrap();
        let mut e = wrap_with(&dek, "0123456789abcdef", cheap(), 1).unwrap();
        e.kek["memoryKiB"] = json!(u32::MAX);
        assert!(matches!(
            unwrap(&[e], "0123456789abcdef"),
            Err(AgentError::WrongPassphrase)
        ));
    }

    #[test]
    fn generated_passphrases_are_long_enough_and_differ() {
        let a = generate().unwrap();
        let b = generate().unwrap();
        assert_eq!(a.len(), 32);
        assert_ne!(*a, *b);
        kagi_core::agent::validate_passphrase(&a).unwrap();
    }
}
