//! Key URIs: `https://{vault}.{suffix}[:port]/keys/{name}[/{version}]`, checked against the
//! host names of this platform (a key is reached only through a key vault kagi serves).

use kagi_core::KvError;

use crate::bad;

/// A parsed key URI: `https://{vault}.{suffix}[:port]/keys/{name}[/{version}]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyUri {
    /// Key vault name.
    pub vault: String,
    /// Key name.
    pub name: String,
    /// Version, when pinned.
    pub version: Option<String>,
    /// `https://{vault}.{suffix}[:port]` (no trailing slash).
    pub base: String,
}

impl KeyUri {
    /// The key's URI without a version.
    pub fn versionless(&self) -> String {
        format!("{}/keys/{}", self.base, self.name)
    }

    /// The URI of one version of the key.
    pub fn versioned(&self, version: &str) -> String {
        format!("{}/keys/{}/{version}", self.base, self.name)
    }
}

/// Parses and checks a key URI against this platform's host names (BK-4); `consumer` names
/// what needs the key in the errors ("backup vault").
pub fn parse_key_uri(
    uri: &str,
    dns_suffix: &str,
    port: u16,
    consumer: &str,
) -> Result<KeyUri, KvError> {
    let shown = kagi_core::ids::printable(uri);
    let rest = uri.strip_prefix("https://").ok_or_else(|| {
        bad(
            "InvalidKeyUri",
            format!("The key URI '{shown}' is not valid: it must start with https://."),
        )
    })?;
    let (authority, path) = rest.split_once('/').ok_or_else(|| {
        bad(
            "InvalidKeyUri",
            format!("The key URI '{shown}' is not valid: it has no path."),
        )
    })?;
    let (host, given_port) = match authority.rsplit_once(':') {
        Some((h, p)) => (
            h,
            p.parse::<u16>().map_err(|_| {
                bad(
                    "InvalidKeyUri",
                    format!("The key URI '{shown}' is not valid: bad port."),
                )
            })?,
        ),
        None => (authority, 443),
    };
    let host = host.to_ascii_lowercase();
    let suffix = format!(".{}", dns_suffix.to_ascii_lowercase());
    let vault = match host.strip_suffix(&suffix) {
        Some(v) if !v.is_empty() && !v.contains('.') && given_port == port => v.to_string(),
        _ => {
            return Err(bad(
                "KeyVaultHostNotServed",
                format!(
                    "The key URI '{shown}' does not point at a key vault of this kagi \
                     (expected https://{{vault}}{suffix}:{port}/keys/...)."
                ),
            ));
        }
    };
    let segs: Vec<&str> = path.trim_end_matches('/').split('/').collect();
    match segs.as_slice() {
        ["keys", name] | ["keys", name, ""] if !name.is_empty() => Ok(KeyUri {
            vault,
            name: name.to_string(),
            version: None,
            base: format!("https://{authority}"),
        }),
        ["keys", name, version] if !name.is_empty() && !version.is_empty() => Ok(KeyUri {
            vault,
            name: name.to_string(),
            version: Some(version.to_string()),
            base: format!("https://{authority}"),
        }),
        ["secrets", ..] => Err(bad(
            "KeyUriIsSecret",
            format!(
                "The URI '{shown}' identifies a secret; a {consumer} needs a key \
                 (https://{{vault}}{suffix}/keys/{{name}}[/{{version}}])."
            ),
        )),
        _ => Err(bad(
            "InvalidKeyUri",
            format!(
                "The key URI '{shown}' is not valid: expected \
                 https://{{vault}}{suffix}/keys/{{name}}[/{{version}}]."
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_uris() {
        let parse = |u: &str| parse_key_uri(u, "localhost", 8443, "backup vault");
        let k = parse("https://kv1.localhost:8443/keys/k1").unwrap();
        assert_eq!((k.vault.as_str(), k.name.as_str()), ("kv1", "k1"));
        assert_eq!(k.version, None);
        assert_eq!(k.versionless(), "https://kv1.localhost:8443/keys/k1");
        let k = parse("https://kv1.localhost:8443/keys/k1/abc").unwrap();
        assert_eq!(k.version.as_deref(), Some("abc"));
        assert_eq!(k.versioned("def"), "https://kv1.localhost:8443/keys/k1/def");
        let inner = |u: &str| parse(u).unwrap_err().inner;
        assert_eq!(inner("not a uri"), Some("InvalidKeyUri"));
        assert_eq!(inner("https://kv1.localhost:8443/"), Some("InvalidKeyUri"));
        assert_eq!(
            inner("https://kv1.vault.azure.net/keys/k1"),
            Some("KeyVaultHostNotServed")
        );
        assert_eq!(
            inner("https://kv1.localhost:9999/keys/k1"),
            Some("KeyVaultHostNotServed")
        );
        let e = parse("https://kv1.localhost:8443/secrets/s1").unwrap_err();
        assert_eq!(e.inner, Some("KeyUriIsSecret"));
        assert!(
            e.message.contains("a backup vault needs a key"),
            "{}",
            e.message
        );
    }
}
