//! Key Vault events (KV-11) in the Event Grid event schema, the event types subscriptions may
//! filter on, and the checks on subscriptions (webhook URL, names). No I/O.

use serde_json::{Value, json};

use crate::KvError;

/// What an event is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ObjectType {
    /// A key.
    Key,
    /// A secret.
    Secret,
}

impl ObjectType {
    /// `Key` or `Secret`, as `data.ObjectType` carries it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Key => "Key",
            Self::Secret => "Secret",
        }
    }

    /// The path segment of the object's id (`keys`, `secrets`).
    pub fn path(self) -> &'static str {
        match self {
            Self::Key => "keys",
            Self::Secret => "secrets",
        }
    }
}

/// What happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EventKind {
    /// A version was created (create, import, rotate, set, restore).
    NewVersionCreated,
    /// A version is near its expiry.
    NearExpiry,
    /// A version has expired.
    Expired,
    /// A version was disabled (kagi extension).
    Disabled,
    /// The object was soft-deleted (kagi extension).
    Deleted,
}

impl EventKind {
    /// Short name used in marks (`NewVersionCreated`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NewVersionCreated => "NewVersionCreated",
            Self::NearExpiry => "NearExpiry",
            Self::Expired => "Expired",
            Self::Disabled => "Disabled",
            Self::Deleted => "Deleted",
        }
    }

    /// Whether Azure defines the event (`Microsoft.KeyVault.*`) or kagi adds it
    /// (`Kagi.KeyVault.*`).
    pub fn is_azure(self) -> bool {
        matches!(
            self,
            Self::NewVersionCreated | Self::NearExpiry | Self::Expired
        )
    }
}

/// The `eventType` of an event about `object`.
pub fn event_type(object: ObjectType, kind: EventKind) -> String {
    let ns = if kind.is_azure() {
        "Microsoft.KeyVault"
    } else {
        "Kagi.KeyVault"
    };
    format!("{ns}.{}{}", object.as_str(), kind.as_str())
}

/// Every event type kagi emits.
pub fn emitted_types() -> Vec<String> {
    let mut out = Vec::new();
    for o in [ObjectType::Key, ObjectType::Secret] {
        for k in [
            EventKind::NewVersionCreated,
            EventKind::NearExpiry,
            EventKind::Expired,
            EventKind::Disabled,
            EventKind::Deleted,
        ] {
            out.push(event_type(o, k));
        }
    }
    out
}

/// Azure Key Vault event types kagi accepts in a filter but never emits (no certificates, no
/// access-policy events yet).
pub const ACCEPTED_NOT_EMITTED: &[&str] = &[
    "Microsoft.KeyVault.CertificateNewVersionCreated",
    "Microsoft.KeyVault.CertificateNearExpiry",
    "Microsoft.KeyVault.CertificateExpired",
    "Microsoft.KeyVault.VaultAccessPolicyChanged",
];

/// Checks `includedEventTypes` and returns them in canonical spelling (matching is
/// case-insensitive, as Event Grid's). Unknown types are 400.
pub fn validate_event_types(types: &[String]) -> Result<Vec<String>, KvError> {
    let known: Vec<String> = emitted_types()
        .into_iter()
        .chain(ACCEPTED_NOT_EMITTED.iter().map(|s| s.to_string()))
        .collect();
    let mut out: Vec<String> = Vec::new();
    for t in types {
        let Some(k) = known.iter().find(|k| k.eq_ignore_ascii_case(t)) else {
            return Err(KvError::bad_parameter(format!(
                "Unknown event type '{}'. Key Vault event types are {}.",
                crate::ids::printable(t),
                known.join(", ")
            ))
            .with_inner("InvalidEventType"));
        };
        if !out.contains(k) {
            out.push(k.clone());
        }
    }
    Ok(out)
}

/// Checks a webhook URL: `http` or `https`, a host, an optional numeric port, no spaces or
/// control characters, at most 2048 characters. (Dialled by the server: only the bootstrap
/// administrator may create subscriptions.)
pub fn validate_webhook_url(url: &str) -> Result<(), KvError> {
    match webhook_url_problem(url) {
        None => Ok(()),
        Some(why) => Err(KvError::bad_parameter(format!(
            "Invalid webhook endpointUrl '{}': {why}.",
            crate::ids::printable(url)
        ))
        .with_inner("InvalidEndpointUrl")),
    }
}

/// What is wrong with a webhook URL (the rules of [`validate_webhook_url`]), if anything: the
/// one check behind every webhook kagi dials (event subscriptions, action groups), each caller
/// wording its own error.
pub fn webhook_url_problem(url: &str) -> Option<&'static str> {
    if url.len() > 2048 {
        return Some("longer than 2048 characters");
    }
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Some("it contains spaces or control characters");
    }
    let lower = url.to_ascii_lowercase();
    let rest = if let Some(r) = lower.strip_prefix("https://") {
        r
    } else if let Some(r) = lower.strip_prefix("http://") {
        r
    } else {
        return Some("the scheme must be http or https");
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let hostport = authority.rsplit('@').next().unwrap_or("");
    let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
        let Some((h, after)) = v6.split_once(']') else {
            return Some("unterminated IPv6 address");
        };
        (h, after.strip_prefix(':'))
    } else {
        match hostport.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (hostport, None),
        }
    };
    if host.is_empty() {
        return Some("it has no host");
    }
    if !host
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':'))
    {
        return Some("the host is not a valid name or address");
    }
    if let Some(p) = port
        && p.parse::<u16>().ok().filter(|p| *p > 0).is_none()
    {
        return Some("the port is not a number from 1 to 65535");
    }
    None
}

/// The URL without its query and fragment (what Event Grid shows as `endpointBaseUrl`: a
/// query may carry a secret).
pub fn endpoint_base_url(url: &str) -> &str {
    url.split(['?', '#']).next().unwrap_or(url)
}

/// Checks an event subscription name: 3–64 letters, digits and hyphens (Event Grid's rule).
pub fn validate_subscription_name(name: &str) -> Result<(), KvError> {
    if !(3..=64).contains(&name.len())
        || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    {
        return Err(KvError::bad_parameter(format!(
            "Invalid event subscription name '{}': use 3-64 letters, digits and hyphens.",
            crate::ids::printable(name)
        )));
    }
    Ok(())
}

/// What an event says about its object.
#[derive(Clone, Debug)]
pub struct EventSubject<'a> {
    /// ARM id of the vault (the event's `topic`).
    pub topic: &'a str,
    /// Vault name.
    pub vault_name: &'a str,
    /// `https://{vault}.{suffix}:{port}/`.
    pub vault_uri: &'a str,
    /// Key or secret.
    pub object_type: ObjectType,
    /// Object name as created.
    pub name: &'a str,
    /// The version concerned.
    pub version: &'a str,
    /// Its nbf.
    pub nbf: Option<i64>,
    /// Its exp.
    pub exp: Option<i64>,
}

/// One event in the Event Grid event schema (Key Vault's `data` shape: `Id`, `VaultName`,
/// `ObjectType`, `ObjectName`, `Version`, `NBF`, `EXP`, the dates as strings of Unix seconds or
/// null).
pub fn event_grid_event(id: &str, event_type: &str, event_time: i64, s: &EventSubject) -> Value {
    let object_id = format!(
        "{}{}/{}/{}",
        s.vault_uri,
        s.object_type.path(),
        s.name,
        s.version
    );
    json!({
        "id": id,
        "topic": s.topic,
        "subject": s.name,
        "eventType": event_type,
        "eventTime": crate::time::rfc3339(event_time),
        "data": {
            "Id": object_id,
            "VaultName": s.vault_name,
            "ObjectType": s.object_type.as_str(),
            "ObjectName": s.name,
            "Version": s.version,
            "NBF": s.nbf.map(|t| t.to_string()),
            "EXP": s.exp.map(|t| t.to_string()),
        },
        "dataVersion": "1",
        "metadataVersion": "1",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn types() {
        assert_eq!(
            event_type(ObjectType::Key, EventKind::NewVersionCreated),
            "Microsoft.KeyVault.KeyNewVersionCreated"
        );
        assert_eq!(
            event_type(ObjectType::Secret, EventKind::Deleted),
            "Kagi.KeyVault.SecretDeleted"
        );
        assert_eq!(emitted_types().len(), 10);
        let v = validate_event_types(&[
            "microsoft.keyvault.keyexpired".into(),
            "Microsoft.KeyVault.KeyExpired".into(),
            "Microsoft.KeyVault.VaultAccessPolicyChanged".into(),
        ])
        .unwrap();
        assert_eq!(
            v,
            vec![
                "Microsoft.KeyVault.KeyExpired".to_string(),
                "Microsoft.KeyVault.VaultAccessPolicyChanged".to_string()
            ]
        );
        let e = validate_event_types(&["Microsoft.KeyVault.KeyExploded".into()]).unwrap_err();
        assert_eq!(e.status(), 400);
    }

    #[test]
    fn urls() {
        for ok in [
            "https://example.com/hook",
            "http://127.0.0.1:8080/x?code=1",
            "http://[::1]:9000/",
            "https://user@hooks.example.org",
            "HTTPS://Example.com",
        ] {
            assert!(validate_webhook_url(ok).is_ok(), "{ok}");
        }
        for bad in [
            "ftp://example.com/",
            "example.com/hook",
            "https://",
            "https:///path",
            "http://host:99999/",
            "http://host:abc/",
            "http://ho st/",
            "javascript:alert(1)",
            "file:///etc/passwd",
            "http://[::1/",
        ] {
            assert_eq!(
                validate_webhook_url(bad).unwrap_err().status(),
                400,
                "{bad}"
            );
        }
        assert_eq!(endpoint_base_url("https://h/x?code=secret"), "https://h/x");
    }

    #[test]
    fn names() {
        assert!(validate_subscription_name("sub-1").is_ok());
        assert!(validate_subscription_name("ab").is_err());
        assert!(validate_subscription_name("a_b_c").is_err());
    }

    #[test]
    fn schema() {
        let s = EventSubject {
            topic: "/subscriptions/s/resourceGroups/rg/providers/Microsoft.KeyVault/vaults/v1",
            vault_name: "v1",
            vault_uri: "https://v1.localhost:8443/",
            object_type: ObjectType::Key,
            name: "cmk",
            version: "0123456789abcdef0123456789abcdef",
            nbf: None,
            exp: Some(1_800_000_000),
        };
        let e = event_grid_event("id1", "Microsoft.KeyVault.KeyNearExpiry", 0, &s);
        assert_eq!(e["subject"], "cmk");
        assert_eq!(e["eventTime"], "1970-01-01T00:00:00Z");
        assert_eq!(
            e["data"]["Id"],
            "https://v1.localhost:8443/keys/cmk/0123456789abcdef0123456789abcdef"
        );
        assert_eq!(e["data"]["ObjectType"], "Key");
        assert_eq!(e["data"]["EXP"], "1800000000");
        assert!(e["data"]["NBF"].is_null());
        assert_eq!(e["dataVersion"], "1");
        assert_eq!(e["metadataVersion"], "1");
    }
}
