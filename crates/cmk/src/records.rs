//! What services keep of their data keys, and helpers every one of them needs: a wrapped-key
//! record as JSON (the shape services store in their documents), fresh data keys, and a key
//! failure as an Azure error.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use kagi_core::{ErrorCode, KvError};
use serde_json::{Value, json};
use zeroize::Zeroizing;

use crate::validate::internal;
use crate::{Dek, FailureKind, KekRef, KeyError, WrappedKey};

/// A record as stored: `{"id", "kek": "pmk" | versioned key id, "wrapped": base64, "created"}`.
pub fn record_to_json(r: &WrappedKey) -> Value {
    json!({
        "id": r.id,
        "kek": match &r.kek { KekRef::Customer(kid) => kid.as_str(), _ => "pmk" },
        "wrapped": B64.encode(&r.wrapped),
        "created": r.created,
    })
}

/// A stored record; what kagi does not recognise is [`KekRef::Unknown`] (never taken for a
/// platform record), and damaged base64 an empty wrapped key (which no key opens).
pub fn record_from_json(v: &Value) -> WrappedKey {
    let kek = match v["kek"].as_str() {
        Some("pmk") => KekRef::Platform,
        Some(kid) if kid.starts_with("https://") => KekRef::Customer(kid.to_string()),
        _ => KekRef::Unknown,
    };
    WrappedKey {
        id: v["id"].as_str().unwrap_or_default().to_string(),
        kek,
        wrapped: v["wrapped"]
            .as_str()
            .and_then(|s| B64.decode(s).ok())
            .unwrap_or_default(),
        created: v["created"].as_i64().unwrap_or_default(),
    }
}

/// The records in `doc["records"]`.
pub fn records_in(doc: &Value) -> Vec<WrappedKey> {
    doc["records"]
        .as_array()
        .map(|a| a.iter().map(record_from_json).collect())
        .unwrap_or_default()
}

/// Appends `r` to `doc["records"]` (made if missing).
pub fn push_record(doc: &mut Value, r: &WrappedKey) {
    let mut records = doc["records"].as_array().cloned().unwrap_or_default();
    records.push(record_to_json(r));
    doc["records"] = json!(records);
}

/// A fresh random 32-byte key.
pub fn random_dek() -> Result<Dek, KvError> {
    let raw = Zeroizing::new(kagi_crypto::random_bytes(32).map_err(|e| internal("rng", e))?);
    dek_from(&raw, "rng")
}

/// A 32-byte key from `bytes` (`what` names it in the log when the length is wrong).
pub fn dek_from(bytes: &[u8], what: &str) -> Result<Dek, KvError> {
    if bytes.len() != 32 {
        return Err(internal(what, "a key of the wrong length"));
    }
    let mut k = Zeroizing::new([0u8; 32]);
    k.copy_from_slice(bytes);
    Ok(k)
}

/// A key failure as an Azure error with inner code `inner`: the key's own words, 403 when
/// definite (the key or the permission is gone), 503 when the key vault could not be reached.
pub fn key_failure_error(e: KeyError, inner: &'static str) -> KvError {
    match e {
        KeyError::Access(f) | KeyError::Unopened(Some(f)) => {
            let code = match f.kind {
                FailureKind::Definite => ErrorCode::Forbidden,
                FailureKind::Transient => ErrorCode::ServiceUnavailable,
            };
            KvError::new(code, f.message).with_inner(inner)
        }
        KeyError::Unopened(None) => internal("data keys", "no wrapped data key"),
        KeyError::Other(e) => e,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_through_their_document_shape() {
        for kek in [
            KekRef::Platform,
            KekRef::Customer("https://kv.localhost:8443/keys/k/v1".into()),
        ] {
            let r = WrappedKey {
                id: "1-abc".into(),
                kek,
                wrapped: vec![1, 2, 3],
                created: 7,
            };
            assert_eq!(record_from_json(&record_to_json(&r)), r);
        }
        let odd = json!({"id": "x", "kek": "hsm:1", "wrapped": "AQ==", "created": 1});
        assert_eq!(record_from_json(&odd).kek, KekRef::Unknown);
        assert_eq!(records_in(&json!({"records": [odd]})).len(), 1);
        let mut doc = json!({});
        push_record(&mut doc, &record_from_json(&odd));
        assert_eq!(records_in(&doc).len(), 1);
        assert!(dek_from(&[0u8; 31], "test").is_err());
        assert_ne!(*random_dek().unwrap(), *random_dek().unwrap());
    }
}
