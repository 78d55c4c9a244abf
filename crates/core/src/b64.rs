//! Base64url (RFC 4648 §5) as Key Vault uses it: unpadded on output, padding tolerated on input.

use base64::Engine;
use base64::engine::general_purpose::{URL_SAFE, URL_SAFE_NO_PAD};

/// Encodes bytes as unpadded base64url.
pub fn encode(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Decodes base64url, with or without padding. `None` when the input is not base64url.
pub fn decode(text: &str) -> Option<Vec<u8>> {
    if text.ends_with('=') {
        URL_SAFE.decode(text).ok()
    } else {
        URL_SAFE_NO_PAD.decode(text).ok()
    }
}

/// Serde adapter for a required base64url byte field.
pub mod bytes {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    /// Serializes as unpadded base64url.
    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::encode(v))
    }

    /// Deserializes base64url, refusing anything else.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        super::decode(&text).ok_or_else(|| D::Error::custom("value is not valid base64url"))
    }
}

/// Serde adapter for an optional base64url byte field.
pub mod opt_bytes {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    /// Serializes as unpadded base64url.
    pub fn serialize<S: Serializer>(v: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => s.serialize_str(&super::encode(v)),
            None => s.serialize_none(),
        }
    }

    /// Deserializes base64url, refusing anything else.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        match Option::<String>::deserialize(d)? {
            None => Ok(None),
            Some(text) => super::decode(&text)
                .map(Some)
                .ok_or_else(|| D::Error::custom("value is not valid base64url")),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn round_trip_and_padding() {
        assert_eq!(super::encode(b"\xfb\xff"), "-_8");
        assert_eq!(super::decode("-_8").unwrap(), b"\xfb\xff");
        assert_eq!(super::decode("-_8=").unwrap(), b"\xfb\xff");
        assert!(super::decode("+/8").is_none());
        assert!(super::decode("a").is_none());
    }
}
