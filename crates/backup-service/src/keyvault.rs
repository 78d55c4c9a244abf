//! Reaching the customer's key: key URI rules and the key vault's data plane over HTTPS, with
//! the backup vault's managed identity's token — so every call is authorized, firewalled and
//! audited by the key vault like any other caller's.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Mutex;

use kagi_core::{ErrorCode, KvError};
use serde_json::{Value, json};

const API: &str = "api-version=7.5";

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
}

pub(crate) fn bad(inner: &'static str, message: impl Into<String>) -> KvError {
    KvError::new(ErrorCode::BadRequest, message).with_inner(inner)
}

fn printable(s: &str) -> String {
    kagi_core::ids::printable(s).to_string()
}

/// Parses and checks a key URI against this platform's host names (BK-4).
pub fn parse_key_uri(uri: &str, dns_suffix: &str, port: u16) -> Result<KeyUri, KvError> {
    let shown = printable(uri);
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
                "The URI '{shown}' identifies a secret; a backup vault needs a key \
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

/// What a call to the key vault failed with: the status and Azure's codes.
#[derive(Clone, Debug)]
pub struct VaultFailure {
    /// HTTP status (0: not reached).
    pub status: u16,
    /// `error.code`.
    pub code: String,
    /// `error.innererror.code`.
    pub inner: Option<String>,
    /// `error.message`.
    pub message: String,
}

impl VaultFailure {
    /// "403 Forbidden/KeyDisabled: …".
    pub fn reason(&self) -> String {
        match &self.inner {
            Some(i) => format!("{} {}/{}: {}", self.status, self.code, i, self.message),
            None => format!("{} {}: {}", self.status, self.code, self.message),
        }
    }
}

/// HTTPS client of the key vault data plane.
#[derive(Debug)]
pub struct VaultClient {
    addr: SocketAddr,
    ca_path: PathBuf,
    clients: Mutex<HashMap<String, reqwest::Client>>,
}

impl VaultClient {
    /// A client that reaches every vault host at `addr`, trusting the CA in `ca_path`.
    pub fn new(addr: SocketAddr, ca_path: PathBuf) -> Self {
        Self {
            addr,
            ca_path,
            clients: Mutex::new(HashMap::new()),
        }
    }

    fn client(&self, base: &str) -> Result<reqwest::Client, VaultFailure> {
        let host = base
            .trim_start_matches("https://")
            .split(':')
            .next()
            .unwrap_or("")
            .to_string();
        let mut map = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = map.get(&host) {
            return Ok(c.clone());
        }
        let unreachable = |m: String| VaultFailure {
            status: 0,
            code: "KeyVaultUnreachable".into(),
            inner: None,
            message: m,
        };
        let pem = std::fs::read(&self.ca_path)
            .map_err(|e| unreachable(format!("{}: {e}", self.ca_path.display())))?;
        let cert = reqwest::Certificate::from_pem(&pem).map_err(|e| unreachable(e.to_string()))?;
        let c = reqwest::Client::builder()
            .tls_certs_only([cert])
            .no_proxy()
            .timeout(std::time::Duration::from_secs(30))
            .user_agent(concat!("kagi-backup-service/", env!("CARGO_PKG_VERSION")))
            .resolve(&host, self.addr)
            .build()
            .map_err(|e| unreachable(e.to_string()))?;
        map.insert(host, c.clone());
        Ok(c)
    }

    async fn call(
        &self,
        base: &str,
        method: reqwest::Method,
        path_and_query: &str,
        token: &str,
        body: Option<Value>,
    ) -> Result<Value, VaultFailure> {
        let client = self.client(base)?;
        let mut req = client
            .request(method, format!("{base}{path_and_query}"))
            .bearer_auth(token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.map_err(|e| VaultFailure {
            status: 0,
            code: "KeyVaultUnreachable".into(),
            inner: None,
            message: e.to_string(),
        })?;
        let status = resp.status().as_u16();
        let v: Value = resp.json().await.unwrap_or(Value::Null);
        if (200..300).contains(&status) {
            return Ok(v);
        }
        Err(VaultFailure {
            status,
            code: v["error"]["code"].as_str().unwrap_or("Error").to_string(),
            inner: v["error"]["innererror"]["code"]
                .as_str()
                .map(str::to_string),
            message: v["error"]["message"]
                .as_str()
                .unwrap_or("(no message)")
                .to_string(),
        })
    }

    /// `GET {key}[/{version}]`: the key bundle.
    pub async fn get_key(&self, key: &KeyUri, token: &str) -> Result<Value, VaultFailure> {
        let v = key
            .version
            .as_deref()
            .map(|v| format!("/{v}"))
            .unwrap_or_default();
        self.call(
            &key.base,
            reqwest::Method::GET,
            &format!("/keys/{}{v}?{API}", key.name),
            token,
            None,
        )
        .await
    }

    /// `GET /keys?maxresults=1` (proves the list permission).
    pub async fn list_keys(&self, key: &KeyUri, token: &str) -> Result<Value, VaultFailure> {
        self.call(
            &key.base,
            reqwest::Method::GET,
            &format!("/keys?maxresults=1&{API}"),
            token,
            None,
        )
        .await
    }

    /// `PUT {vault}/secrets/{name}`: adds a version; returns the versioned secret id.
    pub async fn set_secret(
        &self,
        base: &str,
        name: &str,
        value: &str,
        tags: &Value,
        token: &str,
    ) -> Result<String, VaultFailure> {
        let r = self
            .call(
                base,
                reqwest::Method::PUT,
                &format!("/secrets/{name}?{API}"),
                token,
                Some(json!({"value": value, "contentType": "text/plain", "tags": tags})),
            )
            .await?;
        Ok(r["id"].as_str().unwrap_or_default().to_string())
    }

    /// `POST {kid}/wrapkey` (RSA-OAEP-256): returns (versioned kid, wrapped bytes).
    pub async fn wrap(
        &self,
        kid: &KeyUri,
        token: &str,
        plain: &[u8],
    ) -> Result<(String, Vec<u8>), VaultFailure> {
        self.op(kid, token, "wrapkey", plain).await
    }

    /// `POST {kid}/unwrapkey` (RSA-OAEP-256).
    pub async fn unwrap(
        &self,
        kid: &KeyUri,
        token: &str,
        wrapped: &[u8],
    ) -> Result<Vec<u8>, VaultFailure> {
        self.op(kid, token, "unwrapkey", wrapped)
            .await
            .map(|(_, v)| v)
    }

    async fn op(
        &self,
        kid: &KeyUri,
        token: &str,
        op: &str,
        value: &[u8],
    ) -> Result<(String, Vec<u8>), VaultFailure> {
        let v = kid
            .version
            .as_deref()
            .map(|v| format!("/{v}"))
            .unwrap_or_default();
        let r = self
            .call(
                &kid.base,
                reqwest::Method::POST,
                &format!("/keys/{}{v}/{op}?{API}", kid.name),
                token,
                Some(json!({"alg": "RSA-OAEP-256", "value": kagi_core::b64::encode(value)})),
            )
            .await?;
        let out = r["value"]
            .as_str()
            .and_then(kagi_core::b64::decode)
            .ok_or_else(|| VaultFailure {
                status: 502,
                code: "BadGateway".into(),
                inner: None,
                message: format!("{op} answered without a value"),
            })?;
        Ok((r["kid"].as_str().unwrap_or_default().to_string(), out))
    }
}

/// Why a key bundle cannot protect data now (disabled, not yet valid, expired, not RSA).
pub fn key_unusable(bundle: &Value, now: i64) -> Option<(&'static str, String)> {
    let kty = bundle["key"]["kty"].as_str().unwrap_or("");
    if kty != "RSA" && kty != "RSA-HSM" {
        return Some((
            "KeyTypeNotRsa",
            format!("the key is of type '{kty}'; a backup vault needs an RSA key"),
        ));
    }
    let a = &bundle["attributes"];
    if a["enabled"] == json!(false) {
        return Some(("KeyDisabled", "the key is disabled".into()));
    }
    if let Some(nbf) = a["nbf"].as_i64()
        && now < nbf
    {
        return Some(("KeyNotYetValid", "the key is not yet valid (nbf)".into()));
    }
    if let Some(exp) = a["exp"].as_i64()
        && now >= exp
    {
        return Some(("KeyExpired", "the key has expired".into()));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_uris() {
        let k = parse_key_uri("https://kv1.localhost:8443/keys/k1", "localhost", 8443).unwrap();
        assert_eq!((k.vault.as_str(), k.name.as_str()), ("kv1", "k1"));
        assert_eq!(k.version, None);
        let k = parse_key_uri("https://kv1.localhost:8443/keys/k1/abc", "localhost", 8443).unwrap();
        assert_eq!(k.version.as_deref(), Some("abc"));
        let inner = |u: &str| parse_key_uri(u, "localhost", 8443).unwrap_err().inner;
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
        assert_eq!(
            inner("https://kv1.localhost:8443/secrets/s1"),
            Some("KeyUriIsSecret")
        );
    }

    #[test]
    fn usability() {
        let ok = json!({"key": {"kty": "RSA"}, "attributes": {"enabled": true}});
        assert!(key_unusable(&ok, 0).is_none());
        let ec = json!({"key": {"kty": "EC"}, "attributes": {"enabled": true}});
        assert_eq!(key_unusable(&ec, 0).unwrap().0, "KeyTypeNotRsa");
        let off = json!({"key": {"kty": "RSA"}, "attributes": {"enabled": false}});
        assert_eq!(key_unusable(&off, 0).unwrap().0, "KeyDisabled");
        let exp = json!({"key": {"kty": "RSA"}, "attributes": {"enabled": true, "exp": 10}});
        assert_eq!(key_unusable(&exp, 10).unwrap().0, "KeyExpired");
    }
}
