//! The HTTP client behind CLI commands: trusts the local CA, authenticates as the
//! `AZURE_*` service principal or the bootstrap administrator, and reaches vault hosts through
//! the server's address (so `*.localhost` need not resolve on the client machine).

use std::net::ToSocketAddrs;
use std::path::Path;

use anyhow::{Context as _, bail};
use serde_json::Value;

/// Output format.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Output {
    /// Short human-readable lines.
    Table,
    /// The resource as JSON.
    Json,
}

/// Everything a client command needs.
pub struct Context {
    http: reqwest::Client,
    ca: Vec<u8>,
    /// `https://localhost:8443` (no trailing slash).
    pub base: String,
    host: String,
    port: u16,
    token: String,
    /// The tenant of `token`, and the credentials that obtain tokens in other tenants (a vault
    /// whose tenant is another answers 401 with its tenant in the challenge).
    tenant: String,
    credentials: (String, zeroize::Zeroizing<String>),
    /// Subscription used for ARM calls.
    pub subscription: String,
    /// Output format.
    pub output: Output,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Admin {
    tenant_id: String,
    subscription_id: String,
    client_id: String,
    client_secret: String,
}

impl Context {
    /// Connects and authenticates.
    pub async fn new(server: &str, data_dir: &Path, output: Output) -> anyhow::Result<Self> {
        let url =
            reqwest::Url::parse(server).with_context(|| format!("invalid --server {server}"))?;
        anyhow::ensure!(url.scheme() == "https", "--server must be an https:// URL");
        let host = url.host_str().context("--server has no host")?.to_string();
        let port = url.port_or_known_default().unwrap_or(443);
        let base = server.trim_end_matches('/').to_string();
        let ca_path = data_dir.join("tls/ca.pem");
        let ca = std::fs::read(&ca_path).with_context(|| {
            format!(
                "cannot read the kagi CA certificate {} (use --data-dir)",
                ca_path.display()
            )
        })?;
        let admin_path = data_dir.join("bootstrap-admin.json");
        let (tenant, sub, id, secret) = match (
            std::env::var("AZURE_TENANT_ID"),
            std::env::var("AZURE_CLIENT_ID"),
            std::env::var("AZURE_CLIENT_SECRET"),
        ) {
            (Ok(t), Ok(i), Ok(s)) => {
                let sub = std::env::var("AZURE_SUBSCRIPTION_ID").unwrap_or_else(|_| {
                    std::fs::read(&admin_path)
                        .ok()
                        .and_then(|b| serde_json::from_slice::<Admin>(&b).ok())
                        .map(|a| a.subscription_id)
                        .unwrap_or_default()
                });
                (t, sub, i, s)
            }
            _ => {
                let a: Admin = serde_json::from_slice(
                    &std::fs::read(&admin_path)
                        .with_context(|| format!("cannot read {} (or set AZURE_TENANT_ID, AZURE_CLIENT_ID, AZURE_CLIENT_SECRET)", admin_path.display()))?,
                )
                .with_context(|| format!("{} is not valid", admin_path.display()))?;
                // AZURE_SUBSCRIPTION_ID picks another subscription (`az account set`).
                let sub = std::env::var("AZURE_SUBSCRIPTION_ID").unwrap_or(a.subscription_id);
                (a.tenant_id, sub, a.client_id, a.client_secret)
            }
        };
        let http = Self::client(&ca, &host, port)?;
        let token = Self::token(&http, &base, &tenant, &id, &secret).await?;
        Ok(Self {
            http,
            ca,
            base,
            host,
            port,
            token,
            tenant,
            credentials: (id, zeroize::Zeroizing::new(secret)),
            subscription: sub,
            output,
        })
    }

    /// A client that trusts only the kagi CA and may reach `{vault}.{host}` at the server's
    /// address.
    pub fn client(ca_pem: &[u8], host: &str, port: u16) -> anyhow::Result<reqwest::Client> {
        Self::client_for(ca_pem, host, port, None)
    }

    fn client_for(
        ca_pem: &[u8],
        host: &str,
        port: u16,
        vault: Option<&str>,
    ) -> anyhow::Result<reqwest::Client> {
        let cert = reqwest::Certificate::from_pem(ca_pem)
            .context("the kagi CA certificate is not valid PEM")?;
        let mut b = reqwest::Client::builder()
            .tls_certs_only([cert])
            .timeout(std::time::Duration::from_secs(120))
            .user_agent(concat!("kagi-cli/", env!("CARGO_PKG_VERSION")));
        if let Some(vault) = vault {
            let addrs: Vec<_> = (host, port)
                .to_socket_addrs()
                .map(|a| a.collect())
                .unwrap_or_default();
            b = b.resolve_to_addrs(&format!("{vault}.{host}"), &addrs);
        }
        Ok(b.build()?)
    }

    /// A copy of this context whose client reaches `vault`.
    pub fn clone_for_vault(&self, vault: &str) -> anyhow::Result<Self> {
        Ok(Self {
            http: Self::client_for(
                &self.ca,
                &self.host,
                self.port,
                Some(&vault.to_ascii_lowercase()),
            )?,
            ca: self.ca.clone(),
            base: self.base.clone(),
            host: self.host.clone(),
            port: self.port,
            token: self.token.clone(),
            tenant: self.tenant.clone(),
            credentials: self.credentials.clone(),
            subscription: self.subscription.clone(),
            output: self.output,
        })
    }

    /// Obtains a token by client credentials.
    pub async fn token(
        http: &reqwest::Client,
        base: &str,
        tenant: &str,
        id: &str,
        secret: &str,
    ) -> anyhow::Result<String> {
        let r = http
            .post(format!("{base}/{tenant}/oauth2/v2.0/token"))
            .form(&[
                ("grant_type", "client_credentials"),
                ("client_id", id),
                ("client_secret", secret),
                ("scope", &format!("{base}/.default")),
            ])
            .send()
            .await
            .with_context(|| format!("cannot reach kagi at {base}"))?;
        let status = r.status();
        let body: Value = r.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            bail!(
                "token request refused ({status}): {}",
                body["error_description"].as_str().unwrap_or("no detail")
            );
        }
        body["access_token"]
            .as_str()
            .map(str::to_string)
            .context("token response without access_token")
    }

    /// A client without the overall request timeout (large uploads and downloads) and the
    /// bearer token, for commands that stream bodies.
    pub(crate) fn streaming(&self) -> anyhow::Result<(reqwest::Client, &str)> {
        let cert = reqwest::Certificate::from_pem(&self.ca)
            .context("the kagi CA certificate is not valid PEM")?;
        let http = reqwest::Client::builder()
            .tls_certs_only([cert])
            .connect_timeout(std::time::Duration::from_secs(30))
            .user_agent(concat!("kagi-cli/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok((http, &self.token))
    }

    /// The URL of a vault.
    pub fn vault_url(&self, vault: &str) -> String {
        format!(
            "https://{}.{}:{}/",
            vault.to_ascii_lowercase(),
            self.host,
            self.port
        )
    }

    /// The tenant a 401 challenge names (`Bearer authorization="{base}/{tenant}", …`), when it
    /// is not the tenant of the token sent.
    fn challenged_tenant(&self, r: &reqwest::Response) -> Option<String> {
        if r.status() != reqwest::StatusCode::UNAUTHORIZED {
            return None;
        }
        let h = r
            .headers()
            .get(reqwest::header::WWW_AUTHENTICATE)?
            .to_str()
            .ok()?;
        let (_, rest) = h.split_once("authorization=\"")?;
        let uri = rest.split('"').next()?;
        let tenant = uri.strip_prefix(&self.base)?.trim_matches('/');
        (!tenant.is_empty() && !tenant.contains('/') && !tenant.eq_ignore_ascii_case(&self.tenant))
            .then(|| tenant.to_string())
    }

    /// Sends a request and returns the JSON body, or fails with the server's error message.
    /// A key vault of another tenant (after its subscription moved there) answers 401 naming
    /// its tenant; the request is then sent once more with a token of that tenant, as the
    /// Azure SDK's challenge policy does.
    pub async fn call(
        &self,
        method: reqwest::Method,
        url: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<Value> {
        self.call_with(method, url, body, &[]).await
    }

    /// [`Self::call`] with extra request headers (e.g. `Prefer: wait=1`).
    pub async fn call_with(
        &self,
        method: reqwest::Method,
        url: &str,
        body: Option<&Value>,
        headers: &[(&str, &str)],
    ) -> anyhow::Result<Value> {
        self.exchange(method, url, headers, |req| match body {
            Some(b) => req.json(b),
            None => req,
        })
        .await
    }

    /// [`Self::call`] with a JSON body that holds key material: the buffer is handed to the
    /// HTTP client without a copy and wiped when the client drops it.
    pub async fn call_secret(
        &self,
        method: reqwest::Method,
        url: &str,
        body: zeroize::Zeroizing<Vec<u8>>,
    ) -> anyhow::Result<Value> {
        let body = bytes::Bytes::from_owner(body);
        self.exchange(method, url, &[], |req| {
            req.header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body.clone())
        })
        .await
    }

    /// Sends a request built by `with_body` (once more with another tenant's token when a 401
    /// challenge names one) and reads the JSON answer.
    async fn exchange(
        &self,
        method: reqwest::Method,
        url: &str,
        headers: &[(&str, &str)],
        with_body: impl Fn(reqwest::RequestBuilder) -> reqwest::RequestBuilder,
    ) -> anyhow::Result<Value> {
        let send = |token: &str| {
            let mut req = self.http.request(method.clone(), url).bearer_auth(token);
            for (k, v) in headers {
                req = req.header(*k, *v);
            }
            with_body(req).send()
        };
        let mut r = send(&self.token)
            .await
            .with_context(|| format!("{method} {url} failed"))?;
        if let Some(tenant) = self.challenged_tenant(&r) {
            let (id, secret) = &self.credentials;
            let token = Self::token(&self.http, &self.base, &tenant, id, secret).await?;
            r = send(&token)
                .await
                .with_context(|| format!("{method} {url} failed"))?;
        }
        let status = r.status();
        let text = r.text().await.unwrap_or_default();
        let v: Value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        if !status.is_success() {
            let code = v["error"]["code"].as_str().unwrap_or("");
            let inner = v["error"]["innererror"]["code"]
                .as_str()
                .map(|c| format!(" ({c})"))
                .unwrap_or_default();
            let msg = v["error"]["message"].as_str().unwrap_or("no detail");
            bail!("{status} {code}{inner}: {msg}");
        }
        Ok(v)
    }
}

/// Follows `nextLink` until the list ends.
pub(crate) async fn collect_pages(ctx: &Context, first: &str) -> anyhow::Result<Value> {
    let mut items = Vec::new();
    let mut next = Some(first.to_string());
    let mut pages = 0;
    while let Some(url) = next {
        pages += 1;
        if pages > 10_000 {
            bail!("the server kept returning nextLink; stopped after 10000 pages");
        }
        let v = ctx.call(reqwest::Method::GET, &url, None).await?;
        if let Some(a) = v["value"].as_array() {
            items.extend(a.iter().cloned());
        }
        next = v["nextLink"]
            .as_str()
            .filter(|s| !s.is_empty())
            .map(str::to_string);
    }
    Ok(serde_json::json!({"value": items}))
}
