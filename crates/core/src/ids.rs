//! Names and ids, each a newtype that can only hold a valid value.

use std::fmt;

use crate::KvError;

macro_rules! string_newtype {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// The value as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        // Deserializing validates, so an invalid id cannot enter through stored JSON either.
        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let text = <String as serde::Deserialize>::deserialize(d)?;
                Self::parse(&text).map_err(|e| <D::Error as serde::de::Error>::custom(e.message))
            }
        }
    };
}

string_newtype!(
    /// A vault name: 3–24 characters, letters, digits and hyphens, starting with a letter,
    /// ending with a letter or digit, no two hyphens in a row (Azure's rule; it is a DNS label).
    /// Stored lower-case: DNS names are case-insensitive, so `MyVault` and `myvault` are one vault.
    VaultName
);

impl VaultName {
    /// Validates and normalises a vault name.
    pub fn parse(text: &str) -> Result<Self, KvError> {
        let ok = (3..=24).contains(&text.len())
            && text.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            && text.starts_with(|c: char| c.is_ascii_alphabetic())
            && text.ends_with(|c: char| c.is_ascii_alphanumeric())
            && !text.contains("--");
        if ok {
            Ok(Self(text.to_ascii_lowercase()))
        } else {
            Err(KvError::new(
                crate::ErrorCode::BadRequest,
                format!(
                    "The vault name '{}' is invalid. A vault's name must be between 3-24 \
                     alphanumeric characters. The name must begin with a letter, end with a \
                     letter or digit, and not contain consecutive hyphens.",
                    printable(text)
                ),
            ))
        }
    }
}

string_newtype!(
    /// A key or secret name: `^[0-9a-zA-Z-]{1,127}$`. Names compare case-insensitively in Azure;
    /// kagi stores the name as first given and looks it up lower-cased.
    ObjectName
);

impl ObjectName {
    /// Validates an object name.
    pub fn parse(text: &str) -> Result<Self, KvError> {
        if (1..=127).contains(&text.len())
            && text.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        {
            Ok(Self(text.to_string()))
        } else {
            Err(KvError::bad_parameter(format!(
                "The request URI contains an invalid name: {}. Names must match \
                 ^[0-9a-zA-Z-]{{1,127}}$.",
                printable(text)
            )))
        }
    }

    /// The lookup key: Key Vault names are case-insensitive.
    pub fn folded(&self) -> String {
        self.0.to_ascii_lowercase()
    }
}

string_newtype!(
    /// An object version: 32 lower-case hexadecimal characters.
    KeyVersion
);

impl KeyVersion {
    /// Validates a version from a URI.
    pub fn parse(text: &str) -> Result<Self, KvError> {
        if text.len() == 32 && text.chars().all(|c| c.is_ascii_hexdigit()) {
            Ok(Self(text.to_ascii_lowercase()))
        } else {
            Err(KvError::bad_parameter(format!(
                "The request URI contains an invalid version: {}",
                printable(text)
            )))
        }
    }

    /// A version from 16 random bytes supplied by the caller.
    pub fn from_random(bytes: [u8; 16]) -> Self {
        Self(bytes.iter().map(|b| format!("{b:02x}")).collect())
    }
}

/// Formats 16 random bytes as a version-4 UUID.
pub fn uuid_v4(mut bytes: [u8; 16]) -> String {
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let h: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

fn is_uuid(text: &str) -> bool {
    text.len() == 36
        && text.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_hexdigit(),
        })
}

string_newtype!(
    /// A tenant id (a UUID, lower-case).
    TenantId
);

impl TenantId {
    /// Validates a tenant id.
    pub fn parse(text: &str) -> Result<Self, KvError> {
        if is_uuid(text) {
            Ok(Self(text.to_ascii_lowercase()))
        } else {
            Err(KvError::new(
                crate::ErrorCode::BadRequest,
                format!("'{}' is not a valid tenant id (a GUID).", printable(text)),
            ))
        }
    }
}

string_newtype!(
    /// A subscription id (a UUID, lower-case).
    SubscriptionId
);

impl SubscriptionId {
    /// Validates a subscription id.
    pub fn parse(text: &str) -> Result<Self, KvError> {
        if is_uuid(text) {
            Ok(Self(text.to_ascii_lowercase()))
        } else {
            Err(KvError::new(
                crate::ErrorCode::BadRequest,
                format!(
                    "The provided subscription identifier '{}' is malformed or invalid.",
                    printable(text)
                ),
            ))
        }
    }
}

string_newtype!(
    /// A resource group name: 1–90 characters of letters, digits, `-_.()`, not ending in `.`.
    /// Case-insensitive as in ARM; stored as given, compared folded.
    ResourceGroupName
);

impl ResourceGroupName {
    /// Validates a resource group name.
    pub fn parse(text: &str) -> Result<Self, KvError> {
        if (1..=90).contains(&text.len())
            && text
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.()".contains(c))
            && !text.ends_with('.')
        {
            Ok(Self(text.to_string()))
        } else {
            Err(KvError::new(
                crate::ErrorCode::BadRequest,
                format!("Resource group name '{}' is invalid.", printable(text)),
            ))
        }
    }

    /// The lookup key: ARM names are case-insensitive.
    pub fn folded(&self) -> String {
        self.0.to_ascii_lowercase()
    }
}

string_newtype!(
    /// The object id of a principal (a UUID).
    ObjectId
);

impl ObjectId {
    /// Validates an object id.
    pub fn parse(text: &str) -> Result<Self, KvError> {
        if is_uuid(text) {
            Ok(Self(text.to_ascii_lowercase()))
        } else {
            Err(KvError::bad_parameter(format!(
                "'{}' is not a valid object id (a GUID).",
                printable(text)
            )))
        }
    }
}

/// Echoes user input in a message without letting it forge log lines or grow without bound.
pub fn printable(text: &str) -> String {
    let mut out: String = text
        .chars()
        .take(140)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    if text.chars().count() > 140 {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vault_names() {
        assert_eq!(VaultName::parse("MyVault-1").unwrap().as_str(), "myvault-1");
        for bad in [
            "ab",
            "1abc",
            "abc-",
            "a--b",
            "a_bc",
            &"a".repeat(25),
            "é-abc",
        ] {
            assert!(VaultName::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn object_names() {
        assert!(ObjectName::parse("key-1").is_ok());
        assert!(ObjectName::parse(&"a".repeat(127)).is_ok());
        for bad in ["", "a_b", "a b", "a/b", &"a".repeat(128)] {
            let e = ObjectName::parse(bad).unwrap_err();
            assert_eq!(e.status(), 400);
        }
    }

    #[test]
    fn versions_and_uuids() {
        let v = KeyVersion::from_random([0xab; 16]);
        assert_eq!(v.as_str().len(), 32);
        assert_eq!(KeyVersion::parse(v.as_str()).unwrap(), v);
        assert!(KeyVersion::parse("xyz").is_err());
        let u = uuid_v4([0xff; 16]);
        assert!(is_uuid(&u));
        assert_eq!(&u[14..15], "4");
        assert!(TenantId::parse(&u).is_ok());
        assert!(SubscriptionId::parse("nope").is_err());
    }

    #[test]
    fn printable_strips_controls() {
        assert_eq!(printable("a\nb"), "a?b");
        assert!(printable(&"x".repeat(500)).chars().count() <= 141);
    }
}
