//! The key vault's data plane over HTTPS, called with a token of the service's managed
//! identity, so every call is authorized, firewalled and audited by the key vault like any
//! other caller's; and what a failed call means for the data the key protects.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Mutex;

use serde_json::{Value, json};

use crate::KeyUri;

const API: &str = "api-version=7.5";

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

/// What a failure means for the data a key protects: a disk or a database reacts to each
/// differently (stop now, or retry and keep serving from what is unwrapped).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureKind {
    /// The key vault answered that this identity cannot use the key now (4xx: the key
    /// disabled, deleted or expired, the permission removed, the identity gone): it stays so
    /// until someone acts.
    Definite,
    /// The key vault was not reached or failed itself (5xx, a timeout, throttling, not
    /// reachable): asking again may succeed.
    Transient,
}

impl VaultFailure {
    /// Whether the failure is [`FailureKind::Definite`] or [`FailureKind::Transient`].
    pub fn kind(&self) -> FailureKind {
        match self.status {
            408 | 429 => FailureKind::Transient,
            400..=499 => FailureKind::Definite,
            _ => FailureKind::Transient,
        }
    }

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
    user_agent: String,
    clients: Mutex<HashMap<String, reqwest::Client>>,
}

impl VaultClient {
    /// A client that reaches every vault host at `addr`, trusting the CA in `ca_path`, and
    /// names itself `user_agent` (the key vault's audit log shows it).
    pub fn new(addr: SocketAddr, ca_path: PathBuf, user_agent: &str) -> Self {
        Self {
            addr,
            ca_path,
            user_agent: user_agent.to_string(),
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
            .user_agent(self.user_agent.clone())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn failure(status: u16) -> VaultFailure {
        VaultFailure {
            status,
            code: "Forbidden".into(),
            inner: Some("KeyDisabled".into()),
            message: "Operation get is not allowed on a disabled key.".into(),
        }
    }

    #[test]
    fn failures_are_definite_or_transient() {
        for s in [400, 401, 403, 404, 409] {
            assert_eq!(failure(s).kind(), FailureKind::Definite, "{s}");
        }
        for s in [0, 408, 429, 500, 502, 503] {
            assert_eq!(failure(s).kind(), FailureKind::Transient, "{s}");
        }
        assert_eq!(
            failure(403).reason(),
            "403 Forbidden/KeyDisabled: Operation get is not allowed on a disabled key."
        );
    }

    #[tokio::test]
    async fn an_unreachable_vault_is_a_transient_failure() {
        // Nothing listens on port 9 of the loopback; the CA file does not exist either.
        let c = VaultClient::new(
            SocketAddr::from(([127, 0, 0, 1], 9)),
            PathBuf::from("/nonexistent/ca.pem"),
            "kagi-cmk-test",
        );
        let key = crate::parse_key_uri("https://kv.localhost:8443/keys/k", "localhost", 8443, "x")
            .unwrap();
        let f = c.get_key(&key, "token").await.unwrap_err();
        assert_eq!((f.status, f.code.as_str()), (0, "KeyVaultUnreachable"));
        assert_eq!(f.kind(), FailureKind::Transient);
    }
}
