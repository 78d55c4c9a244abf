//! Talking to the kagi server: the agent routes (`/kagi/agent/{vault id}/…`, docs/AGENT.md),
//! the token endpoint and a key vault's data plane (restoring with the passphrase kept as a
//! secret). Every connection trusts only the CA from the vault credentials file.

use std::sync::Arc;

use kagi_backup::{BackupError, BlobBackend, ObjectInfo};
use serde_json::{Value, json};

use crate::AgentError;

/// How the agent authenticates to the agent routes.
#[derive(Clone)]
pub enum AgentAuth {
    /// The secret of a vault credentials file (registration).
    VaultCredential(String),
    /// A registered machine: its name and secret.
    Machine(String, String),
}

impl std::fmt::Debug for AgentAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::VaultCredential(_) => f.write_str("VaultCredential(..)"),
            Self::Machine(m, _) => write!(f, "Machine({m}, ..)"),
        }
    }
}

impl AgentAuth {
    fn header(&self) -> String {
        match self {
            Self::VaultCredential(s) => format!("KagiVaultCredential {s}"),
            Self::Machine(m, s) => format!("KagiAgent {m}:{s}"),
        }
    }
}

/// What proves, to a vault where this machine's name is registered already, that the caller is
/// that machine (docs/AGENT.md, "Registering again"): either is enough.
#[derive(Default)]
pub struct MachineProof {
    /// The key proof (base64url) derived from the repository's data key, which the machine's
    /// passphrase unwraps.
    pub key_proof: Option<String>,
    /// The machine's current secret (base64url), from its state.
    pub machine_secret: Option<String>,
}

impl std::fmt::Debug for MachineProof {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MachineProof(..)")
    }
}

impl MachineProof {
    /// Adds the proof's fields to a request body.
    fn add_to(&self, body: &mut Value) {
        if let Some(k) = &self.key_proof {
            body["keyProof"] = json!(k);
        }
        if let Some(s) = &self.machine_secret {
            body["machineSecret"] = json!(s);
        }
    }
}

/// Binds the key proof to its purpose: it is derived from the data key but opens nothing.
const KEY_PROOF_LABEL: &[u8] = b"kagi/agent/machine-key-proof/v1";

/// HMAC-SHA256 of a fixed label under the raw data key: one-way, so the server (which keeps
/// only its SHA-256) learns nothing of the key from it.
fn proof_bytes(dek: &kagi_crypto::data_key::DataKey) -> zeroize::Zeroizing<[u8; 32]> {
    zeroize::Zeroizing::new(kagi_crypto::data_key::hmac_sha256(
        dek.expose_for_wrapping(),
        KEY_PROOF_LABEL,
    ))
}

/// The key proof of a repository's data key (base64url).
pub fn key_proof(dek: &kagi_crypto::data_key::DataKey) -> String {
    kagi_core::b64::encode(&*proof_bytes(dek))
}

/// What the server keeps to check a key proof: the SHA-256 (hex) of its bytes.
pub fn key_check(dek: &kagi_crypto::data_key::DataKey) -> String {
    kagi_crypto::digest(kagi_crypto::DigestAlgorithm::Sha256, &*proof_bytes(dek))
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A client of one backup vault's agent routes.
#[derive(Clone, Debug)]
pub struct VaultConnection {
    http: reqwest::Client,
    server: String,
    vault_id: String,
    auth: AgentAuth,
}

/// An HTTPS client that trusts only `ca_pem`.
pub fn https_client(ca_pem: &str) -> Result<reqwest::Client, AgentError> {
    let cert = reqwest::Certificate::from_pem(ca_pem.as_bytes())
        .map_err(|e| AgentError::Invalid(format!("the CA certificate is not valid: {e}")))?;
    reqwest::Client::builder()
        .tls_certs_only([cert])
        .no_proxy()
        .timeout(std::time::Duration::from_secs(300))
        .user_agent(concat!("kagi-agent/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| AgentError::Invalid(format!("cannot build the HTTPS client: {e}")))
}

/// Turns an error answer into [`AgentError::Server`].
async fn failure(resp: reqwest::Response) -> AgentError {
    let status = resp.status().as_u16();
    let v: Value = resp.json().await.unwrap_or(Value::Null);
    let code = v["error"]["code"].as_str().unwrap_or("Error").to_string();
    let inner = v["error"]["innererror"]["code"]
        .as_str()
        .map(str::to_string);
    // ARM and key vault errors, or OAuth errors from the token endpoint.
    let (code, message) = match v["error"].as_str() {
        Some(oauth) => (
            oauth.to_string(),
            v["error_description"].as_str().unwrap_or("").to_string(),
        ),
        None => (
            code,
            v["error"]["message"]
                .as_str()
                .unwrap_or("(no message)")
                .to_string(),
        ),
    };
    AgentError::Server {
        status,
        code,
        inner,
        message,
    }
}

fn unreachable(server: &str, e: reqwest::Error) -> AgentError {
    AgentError::Unreachable(format!("{server}: {e}"))
}

impl VaultConnection {
    /// A connection to `vault_id` on `server` (an `https://host:port` URL).
    pub fn new(http: reqwest::Client, server: &str, vault_id: &str, auth: AgentAuth) -> Self {
        Self {
            http,
            server: server.trim_end_matches('/').to_string(),
            vault_id: vault_id.trim_end_matches('/').to_string(),
            auth,
        }
    }

    /// The same vault with another credential.
    pub fn with_auth(&self, auth: AgentAuth) -> Self {
        Self {
            auth,
            ..self.clone()
        }
    }

    fn url(&self, rest: &str) -> String {
        format!("{}/kagi/agent{}/{rest}", self.server, self.vault_id)
    }

    async fn post(&self, rest: &str, body: &Value) -> Result<Value, AgentError> {
        let resp = self
            .http
            .post(self.url(rest))
            .header("authorization", self.auth.header())
            .json(body)
            .send()
            .await
            .map_err(|e| unreachable(&self.server, e))?;
        if !resp.status().is_success() {
            return Err(failure(resp).await);
        }
        if resp.status().as_u16() == 204 {
            return Ok(Value::Null);
        }
        resp.json()
            .await
            .map_err(|e| AgentError::Unreachable(format!("bad answer from the server: {e}")))
    }

    /// Checks the credentials and that the vault accepts agents (BK-11).
    /// For a machine registered before, the answer carries its wrapped key entries.
    pub async fn probe(&self, machine: &str) -> Result<Value, AgentError> {
        self.post("probe", &json!({"machineName": machine})).await
    }

    /// Asks the vault to keep `passphrase` in the key vault at `key_vault_uri` (MP-2); with
    /// vault credentials, a machine registered already needs `proof`.
    pub async fn store_passphrase(
        &self,
        machine: &str,
        key_vault_uri: &str,
        passphrase: &str,
        proof: &MachineProof,
    ) -> Result<Value, AgentError> {
        let mut body =
            json!({"machineName": machine, "keyVaultUri": key_vault_uri, "passphrase": passphrase});
        proof.add_to(&mut body);
        self.post("passphrase", &body).await
    }

    /// Registers the machine (again, with `proof`); `key_check` lets the vault check the key
    /// proof of a later registration. Returns the machine secret.
    pub async fn register(
        &self,
        machine: &str,
        key_vault_uri: Option<&str>,
        secret_id: Option<&str>,
        proof: &MachineProof,
        key_check: &str,
    ) -> Result<String, AgentError> {
        let mut body = json!({"machineName": machine, "keyVaultUri": key_vault_uri,
            "secretId": secret_id, "keyCheck": key_check});
        proof.add_to(&mut body);
        let v = self.post("register", &body).await?;
        v["machineSecret"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| AgentError::Unreachable("registration answered without a secret".into()))
    }

    /// Records a job of this machine in the vault's activity log.
    pub async fn report(
        &self,
        machine: &str,
        operation: &str,
        status: &str,
        message: &str,
        stats: Value,
    ) -> Result<(), AgentError> {
        self.post(
            &format!("machines/{machine}/activity"),
            &json!({"operation": operation, "status": status, "message": message, "stats": stats}),
        )
        .await
        .map(|_| ())
    }

    /// The machines registered with the vault.
    pub async fn machines(&self) -> Result<Value, AgentError> {
        let resp = self
            .http
            .get(self.url("machines"))
            .header("authorization", self.auth.header())
            .send()
            .await
            .map_err(|e| unreachable(&self.server, e))?;
        if !resp.status().is_success() {
            return Err(failure(resp).await);
        }
        resp.json()
            .await
            .map_err(|e| AgentError::Unreachable(format!("bad answer from the server: {e}")))
    }

    /// The repository of `machine` in this vault, as a blob backend for the engine. Its calls
    /// block on `runtime`, so the engine must run on a blocking thread.
    pub fn backend(&self, machine: &str, runtime: tokio::runtime::Handle) -> Arc<RemoteBackend> {
        Arc::new(RemoteBackend {
            conn: self.clone(),
            prefix: self.url(&format!(
                "machines/{}/objects",
                machine.to_ascii_lowercase()
            )),
            runtime,
            windows: std::sync::Mutex::new(std::collections::VecDeque::new()),
            ends: std::sync::Mutex::new(std::collections::HashMap::new()),
        })
    }
}

/// A machine's repository on the server ([`BlobBackend`] over the agent routes).
#[derive(Debug)]
pub struct RemoteBackend {
    conn: VaultConnection,
    prefix: String,
    runtime: tokio::runtime::Handle,
    /// Windows of packs read most recently: a restore reads a file's chunks one by one, and
    /// they lie next to each other in a pack, so one request per window replaces one per chunk
    /// (packs are written once and never change).
    windows: std::sync::Mutex<std::collections::VecDeque<Window>>,
    /// Where the last read of each pack ended: a read that starts there is sequential, and
    /// only sequential reads fetch a window (a tree read here and there fetches just itself).
    ends: std::sync::Mutex<std::collections::HashMap<String, u64>>,
}

/// A cached part of a pack: (name, offset, bytes).
type Window = (String, u64, Arc<Vec<u8>>);

/// How much of a pack one read fetches at least.
const WINDOW_BYTES: u64 = 2 * 1024 * 1024;
/// Windows kept in memory by [`RemoteBackend`].
const CACHED_WINDOWS: usize = 16;

fn storage(e: AgentError) -> BackupError {
    BackupError::Storage(e.to_string())
}

impl RemoteBackend {
    fn send(
        &self,
        req: reqwest::RequestBuilder,
        missing_ok: bool,
    ) -> kagi_backup::Result<Option<Vec<u8>>> {
        self.runtime.block_on(async {
            let resp = req
                .header("authorization", self.conn.auth.header())
                .send()
                .await
                .map_err(|e| storage(unreachable(&self.conn.server, e)))?;
            if missing_ok && resp.status().as_u16() == 404 {
                return Ok(None);
            }
            if !resp.status().is_success() {
                return Err(storage(failure(resp).await));
            }
            let b = resp
                .bytes()
                .await
                .map_err(|e| storage(unreachable(&self.conn.server, e)))?;
            Ok(Some(b.to_vec()))
        })
    }

    fn list_json(&self, prefix: &str) -> kagi_backup::Result<Value> {
        let url = reqwest::Url::parse_with_params(&self.prefix, &[("prefix", prefix)])
            .map_err(|e| BackupError::Storage(format!("bad object URL: {e}")))?;
        let body = self
            .send(self.conn.http.get(url), false)?
            .unwrap_or_default();
        serde_json::from_slice(&body)
            .map_err(|e| BackupError::Storage(format!("bad list answer: {e}")))
    }

    /// `len` bytes of pack `name` at `start`, from a cached window, or fetched: exactly, or,
    /// when the read continues the previous one of that pack, a window of at least
    /// [`WINDOW_BYTES`] (the server stops at the pack's end).
    fn windowed(&self, name: &str, start: u64, len: u64) -> kagi_backup::Result<Vec<u8>> {
        let cache = || self.windows.lock().unwrap_or_else(|p| p.into_inner());
        let slice = |from: u64, data: &[u8]| {
            let s = (start - from) as usize;
            data.get(s..s + len as usize).map(<[u8]>::to_vec)
        };
        let sequential = {
            let mut ends = self.ends.lock().unwrap_or_else(|p| p.into_inner());
            if ends.len() > 4096 {
                ends.clear();
            }
            ends.insert(name.to_string(), start + len) == Some(start)
        };
        let hit = cache()
            .iter()
            .find(|(n, from, d)| {
                n == name && *from <= start && start + len <= from + d.len() as u64
            })
            .and_then(|(_, from, d)| slice(*from, d));
        if let Some(b) = hit {
            return Ok(b);
        }
        let want = if sequential {
            len.max(WINDOW_BYTES)
        } else {
            len
        };
        let req = self
            .conn
            .http
            .get(format!("{}/{name}", self.prefix))
            .header("range", format!("bytes={start}-{}", start + want - 1));
        let data = Arc::new(self.send(req, false)?.unwrap_or_default());
        let out = slice(start, &data).ok_or_else(|| {
            BackupError::Corrupt(format!("{name} is shorter than the index says"))
        })?;
        let mut c = cache();
        if c.len() >= CACHED_WINDOWS {
            c.pop_front();
        }
        c.push_back((name.to_string(), start, data));
        Ok(out)
    }
}

impl BlobBackend for RemoteBackend {
    fn put(&self, name: &str, data: Vec<u8>) -> kagi_backup::Result<()> {
        let req = self
            .conn
            .http
            .put(format!("{}/{name}", self.prefix))
            .body(data);
        self.send(req, false).map(|_| ())
    }

    fn exists(&self, name: &str) -> kagi_backup::Result<bool> {
        let req = self.conn.http.head(format!("{}/{name}", self.prefix));
        Ok(self.send(req, true)?.is_some())
    }

    fn get(&self, name: &str) -> kagi_backup::Result<Vec<u8>> {
        let req = self.conn.http.get(format!("{}/{name}", self.prefix));
        self.send(req, false).map(Option::unwrap_or_default)
    }

    fn get_range(&self, name: &str, start: u64, len: u64) -> kagi_backup::Result<Vec<u8>> {
        if len == 0 {
            return Ok(Vec::new());
        }
        if name.starts_with("data/") {
            return self.windowed(name, start, len);
        }
        let req = self
            .conn
            .http
            .get(format!("{}/{name}", self.prefix))
            .header("range", format!("bytes={start}-{}", start + len - 1));
        self.send(req, false).map(Option::unwrap_or_default)
    }

    fn list_meta(&self, prefix: &str) -> kagi_backup::Result<Vec<ObjectInfo>> {
        let v = self.list_json(prefix)?;
        Ok(v["objects"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|o| {
                        Some(ObjectInfo {
                            name: o["name"].as_str()?.to_string(),
                            size: o["size"].as_u64(),
                            modified: o["modified"]
                                .as_u64()
                                .map(|s| std::time::UNIX_EPOCH + std::time::Duration::from_secs(s)),
                        })
                    })
                    .collect()
            })
            .unwrap_or_default())
    }

    fn list(&self, prefix: &str) -> kagi_backup::Result<Vec<String>> {
        let v = self.list_json(prefix)?;
        Ok(v["value"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|n| n.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default())
    }

    fn delete(&self, name: &str) -> kagi_backup::Result<()> {
        let req = self.conn.http.delete(format!("{}/{name}", self.prefix));
        self.send(req, true).map(|_| ())
    }
}

/// Reads the newest version of secret `name` in the key vault at `key_vault_uri`, with a
/// token of the user's own service principal (client credentials at the server's token
/// endpoint) — how a passphrase kept in the key vault is read back on another machine (MP-6).
pub async fn read_secret_as_user(
    http: &reqwest::Client,
    server: &str,
    tenant: &str,
    client_id: &str,
    client_secret: &str,
    key_vault_uri: &str,
    name: &str,
) -> Result<zeroize::Zeroizing<String>, AgentError> {
    // Checked before any token is asked for: the user's token goes only to a key vault URI.
    let parsed = reqwest::Url::parse(key_vault_uri).ok().filter(|u| {
        u.scheme() == "https"
            && u.host_str().is_some_and(|h| h.contains('.'))
            && matches!(u.path(), "" | "/")
            && u.query().is_none()
    });
    if parsed.is_none() {
        return Err(AgentError::Invalid(
            kagi_core::agent::INVALID_KEY_VAULT_URI
                .error(format!(
                    "The key vault URI '{}' is not valid: copy the vault URI from the key \
                     vault's properties, e.g. https://myvault.localhost:8443/.",
                    kagi_core::ids::printable(key_vault_uri)
                ))
                .message,
        ));
    }
    let base = key_vault_uri.trim_end_matches('/');
    let secret_url = format!("{base}/secrets/{name}?api-version=7.5");
    // Like the Azure SDK: ask without a token, take the audience from the 401 challenge.
    let challenge = http
        .get(&secret_url)
        .send()
        .await
        .map_err(|e| unreachable(base, e))?;
    let header = challenge
        .headers()
        .get("www-authenticate")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let resource = header
        .split("resource=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .ok_or_else(|| {
            AgentError::Unreachable(format!("{base} did not answer with a bearer challenge"))
        })?;
    // As the Azure SDK does: the token's audience must be the key vault's own domain, so a
    // look-alike host cannot obtain a token meant for kagi.
    let vault_host = parsed
        .as_ref()
        .and_then(|u| u.host_str())
        .unwrap_or_default()
        .to_ascii_lowercase();
    let resource_host = reqwest::Url::parse(resource)
        .ok()
        .and_then(|u| u.host_str().map(str::to_ascii_lowercase))
        .unwrap_or_default();
    if resource_host.is_empty()
        || !(vault_host == resource_host || vault_host.ends_with(&format!(".{resource_host}")))
    {
        return Err(AgentError::Unreachable(format!(
            "{base} asked for a token for '{resource}', which is not its domain; refusing to send \
             your credentials' token there"
        )));
    }
    let scope = format!("{}/.default", resource.trim_end_matches('/'));
    let resp = http
        .post(format!(
            "{}/{tenant}/oauth2/v2.0/token",
            server.trim_end_matches('/')
        ))
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", client_id),
            ("client_secret", client_secret),
            ("scope", scope.as_str()),
        ])
        .send()
        .await
        .map_err(|e| unreachable(server, e))?;
    if !resp.status().is_success() {
        return Err(failure(resp).await);
    }
    let token: Value = resp
        .json()
        .await
        .map_err(|e| AgentError::Unreachable(format!("bad token answer: {e}")))?;
    let token = token["access_token"]
        .as_str()
        .ok_or_else(|| AgentError::Unreachable("token answer without access_token".into()))?;
    let resp = http
        .get(&secret_url)
        .bearer_auth(token)
        .send()
        .await
        .map_err(|e| unreachable(base, e))?;
    if !resp.status().is_success() {
        return Err(failure(resp).await);
    }
    let v: Value = resp
        .json()
        .await
        .map_err(|e| AgentError::Unreachable(format!("bad secret answer: {e}")))?;
    v["value"]
        .as_str()
        .map(|s| zeroize::Zeroizing::new(s.to_string()))
        .ok_or_else(|| AgentError::Unreachable("the secret has no value".into()))
}
