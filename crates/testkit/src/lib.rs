//! The harness of kagi's integration tests: the real HTTPS server in-process on a temporary data
//! directory (platform, local CA, per-SNI certificates, audit log, optionally the backup
//! service), a client that trusts nothing but kagi's CA and resolves every `*.localhost` name
//! to the server itself (no DNS involved), and the bootstrap administrator's requests.
//!
//! A dev-dependency only: nothing that ships may depend on this crate.
//!
//! ```no_run
//! # async fn demo() {
//! use kagi_testkit::{Options, TestServer};
//!
//! let s = TestServer::start(Options::default()).await;
//! let (status, _) = s
//!     .arm("GET", &format!("/subscriptions/{}", s.admin.subscription_id), None)
//!     .await;
//! assert_eq!(status, 200);
//! # }
//! ```

use std::net::{Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use kagi_audit::{AuditConfig, AuditLog};
use kagi_core::time::TestClock;
use kagi_http::tls::{LocalCa, SniResolver};
use kagi_vault::{BootstrapAdmin, Platform, PlatformConfig};
use serde_json::{Value, json};

/// The data plane's api-version, sent by [`TestServer::data`].
const DATA_API_VERSION: &str = "7.5";

/// The host names the server answers under (`localhost`, `<vault>.localhost`).
const DNS_SUFFIX: &str = "localhost";

/// How [`TestServer::start`] sets the server up.
#[derive(Clone, Debug)]
pub struct Options {
    /// The backup service's key settings; `None` leaves the backup service out.
    pub backup_service: Option<BackupKeys>,
    /// Also listen on `::1` (on the same port) when this host has IPv6 loopback, for clients
    /// that resolve `localhost` through the system resolver, which may answer either address.
    pub dual_stack: bool,
    /// The audit log's settings, made from the data directory; `None` opens it as the server
    /// does ([`AuditLog::open`]: the defaults and the environment).
    pub audit: Option<fn(&Path) -> AuditConfig>,
    /// The api-version [`TestServer::arm`] sends (default `2023-07-01`).
    pub arm_api_version: &'static str,
    /// Whether the bootstrap administrator logs in at start (into [`TestServer::token`]).
    pub login: bool,
    /// Whether requests, cryptographic operations, audit batches and gauges are counted into
    /// [`TestServer::metrics`] (as `kagi server --metrics-listen` does).
    pub metrics: bool,
}

impl Default for Options {
    /// The backup service with [`BackupKeys::default`], IPv4 only, the server's audit log,
    /// api-version `2023-07-01`, logged in, no metrics.
    fn default() -> Self {
        Self {
            backup_service: Some(BackupKeys::default()),
            dual_stack: false,
            audit: None,
            arm_api_version: "2023-07-01",
            login: true,
            metrics: false,
        }
    }
}

/// The backup service's key settings (see `kagi_backup_service::ServiceConfig`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackupKeys {
    /// How long an unwrapped data key is used before the key vault is asked again.
    pub key_cache_lifetime: Duration,
    /// How often a versionless key URI is resolved to its newest version.
    pub key_poll_interval: Duration,
}

impl Default for BackupKeys {
    /// Ten minutes of key cache, an hour between key polls.
    fn default() -> Self {
        Self {
            key_cache_lifetime: Duration::from_secs(600),
            key_poll_interval: Duration::from_secs(3600),
        }
    }
}

/// A running server on a temporary data directory, and what a client needs to talk to it.
/// Dropping it stops the server and removes the directory.
pub struct TestServer {
    /// The port the server listens on.
    pub port: u16,
    /// The server's IPv4 loopback address.
    pub addr: SocketAddr,
    /// The bootstrap administrator created at first start.
    pub admin: BootstrapAdmin,
    /// PEM of kagi's local CA, the only certificate the clients trust.
    pub ca_pem: String,
    /// The platform the server serves.
    pub platform: Arc<Platform>,
    /// The storage services the server runs (the backup service unless the options left it
    /// out).
    pub services: kagi_http::Services,
    /// The platform's clock: the system time until a test moves it forward.
    pub clock: Arc<TestClock>,
    /// The audit log's file.
    pub audit_file: PathBuf,
    /// The metrics registry, when [`Options::metrics`] is on.
    pub metrics: Option<Arc<kagi_metrics::Metrics>>,
    /// The administrator's token from the last [`TestServer::login`] (empty before it).
    pub token: String,
    client: reqwest::Client,
    backup_keys: Option<BackupKeys>,
    /// The backup service registered in `services` (typed, for tests that call it directly).
    backup: std::sync::Mutex<Option<Arc<kagi_backup_service::BackupService>>>,
    arm_api_version: &'static str,
    task: tokio::task::JoinHandle<Result<(), kagi_http::ServeError>>,
    dir: tempfile::TempDir,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl std::fmt::Debug for TestServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestServer")
            .field("addr", &self.addr)
            .field("dir", &self.dir.path())
            .finish_non_exhaustive()
    }
}

impl TestServer {
    /// Starts a server on a fresh data directory and a free port, and waits until it accepts
    /// connections.
    ///
    /// # Panics
    ///
    /// When any part of the start fails, or the server stops or never listens.
    pub async fn start(options: Options) -> TestServer {
        let dir = tempfile::tempdir().expect("a temporary data directory");
        let (port, v6) = if options.dual_stack {
            free_dual_stack_port()
        } else {
            (free_port(), false)
        };
        let config = PlatformConfig {
            data_dir: dir.path().to_path_buf(),
            dns_suffix: DNS_SUFFIX.into(),
            port,
        };
        let clock = Arc::new(TestClock::new());
        let (platform, admin) = Platform::open(config, clock.clone())
            .await
            .expect("the platform opens");
        let admin = admin.expect("first start creates the bootstrap administrator");
        let ca = LocalCa::load_or_create(&platform, dir.path()).expect("the local CA");
        let ca_pem = ca.cert_pem.clone();
        let resolver = SniResolver::new(ca, DNS_SUFFIX);
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let mut addrs = vec![addr];
        if v6 {
            addrs.push(SocketAddr::from((Ipv6Addr::LOCALHOST, port)));
        }
        let platform = Arc::new(platform);
        let backup = options
            .backup_service
            .map(|keys| backup_service(&platform, keys, addr));
        let services = kagi_http::Services::default();
        if let Some(b) = &backup {
            services.register(b.clone());
        }
        let audit = match options.audit {
            Some(config) => AuditLog::open_with(dir.path(), config(dir.path())),
            None => AuditLog::open(dir.path()),
        }
        .expect("the audit log opens");
        let audit_file = audit.path().to_path_buf();
        let metrics = options.metrics.then(|| {
            let m = Arc::new(kagi_metrics::Metrics::new());
            kagi_http::enable_metrics(platform.clone(), &services, &audit, m.clone());
            m
        });
        let audit = Arc::new(audit);
        let (served, served_services) = (platform.clone(), services.clone());
        let task = tokio::spawn(async move {
            kagi_http::serve(served, served_services, audit, &addrs, resolver).await
        });
        // Readiness, not timing: poll until the listener accepts (or serve gave up).
        let mut ready = false;
        for _ in 0..1000 {
            if task.is_finished() {
                panic!("serve stopped: {:?}", task.await);
            }
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                ready = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(ready, "the server never started listening on {addr}");
        let client = client_builder(&ca_pem, addr)
            .build()
            .expect("the test client");
        let mut s = TestServer {
            port,
            addr,
            admin,
            ca_pem,
            platform,
            services,
            clock,
            audit_file,
            metrics,
            token: String::new(),
            client,
            backup_keys: options.backup_service,
            backup: std::sync::Mutex::new(backup),
            arm_api_version: options.arm_api_version,
            task,
            dir,
        };
        if options.login {
            s.login().await;
        }
        s
    }

    /// The server's data directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The client [`TestServer::arm`], [`TestServer::data`] and the token requests use (as
    /// [`TestServer::client_builder`] makes it).
    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }

    /// A client builder that trusts only kagi's CA, resolves `localhost` and every
    /// `*.localhost` name to the server (and nothing else), uses no proxy and follows no
    /// redirect.
    pub fn client_builder(&self) -> reqwest::ClientBuilder {
        client_builder(&self.ca_pem, self.addr)
    }

    /// The management host: `https://localhost:PORT`, the token authority.
    pub fn authority(&self) -> String {
        format!("https://{DNS_SUFFIX}:{}", self.port)
    }

    /// `path` on the management host.
    pub fn mgmt_url(&self, path: &str) -> String {
        format!("{}{path}", self.authority())
    }

    /// `path` on the host of `vault` (`https://VAULT.localhost:PORT`).
    pub fn vault_url(&self, vault: &str, path: &str) -> String {
        format!("https://{vault}.{DNS_SUFFIX}:{}{path}", self.port)
    }

    /// The token endpoint's answer for the bootstrap administrator in `tenant`, asked through
    /// `client` (client credentials, scope: this server).
    ///
    /// # Panics
    ///
    /// When the token endpoint does not answer 200 with JSON.
    pub async fn token_response(&self, client: &reqwest::Client, tenant: &str) -> Value {
        let r = client
            .post(self.mgmt_url(&format!("/{tenant}/oauth2/v2.0/token")))
            .form(&[
                ("grant_type", "client_credentials"),
                ("client_id", self.admin.client_id.as_str()),
                ("client_secret", self.admin.client_secret.as_str()),
                ("scope", &format!("{}/.default", self.authority())),
            ])
            .send()
            .await
            .expect("the token endpoint answers");
        assert_eq!(r.status(), 200, "token for tenant {tenant}");
        r.json().await.expect("a JSON token response")
    }

    /// A token for the bootstrap administrator in `tenant`, asked through `client`.
    ///
    /// # Panics
    ///
    /// As [`TestServer::token_response`], and when the answer has no access token.
    pub async fn token_with(&self, client: &reqwest::Client, tenant: &str) -> String {
        self.token_response(client, tenant).await["access_token"]
            .as_str()
            .expect("an access token")
            .to_string()
    }

    /// A token for the bootstrap administrator in `tenant`.
    ///
    /// # Panics
    ///
    /// As [`TestServer::token_with`].
    pub async fn token_in(&self, tenant: &str) -> String {
        self.token_with(&self.client, tenant).await
    }

    /// Gets the administrator a fresh token in its own tenant, into [`TestServer::token`]:
    /// at start, or after the test clock moved past the last one's lifetime.
    ///
    /// # Panics
    ///
    /// As [`TestServer::token_with`].
    pub async fn login(&mut self) {
        let token = self.token_in(&self.admin.tenant_id).await;
        self.token = token;
    }

    /// Sends `method url` with `token` and `body` (as JSON); the status, the headers and the
    /// body as JSON (`null` when it is not JSON).
    ///
    /// # Panics
    ///
    /// When `method` is not a method or the request gets no answer.
    pub async fn call(
        &self,
        method: &str,
        url: String,
        token: &str,
        body: Option<Value>,
    ) -> (u16, reqwest::header::HeaderMap, Value) {
        let method: reqwest::Method = method.parse().expect("an HTTP method");
        let mut r = self.client.request(method, url).bearer_auth(token);
        if let Some(b) = body {
            r = r.json(&b);
        }
        let r = r.send().await.expect("the server answers");
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        (status, headers, r.json().await.unwrap_or(Value::Null))
    }

    /// An ARM request handed straight to `provider`'s handler (no HTTP) as the bootstrap
    /// administrator: the status and body, or for an error its status and
    /// `{"error": message, "code": inner code}`.
    pub async fn provider_call(
        &self,
        provider: Arc<dyn kagi_host::ResourceProvider>,
        method: &str,
        path: &str,
        body: Value,
    ) -> (u16, Value) {
        let caller = self
            .platform
            .authenticate(&self.token)
            .expect("the admin's token");
        let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
        let lower: Vec<String> = segs.iter().map(|x| x.to_ascii_lowercase()).collect();
        let l: Vec<&str> = lower.iter().map(String::as_str).collect();
        let bytes = serde_json::to_vec(&body).unwrap_or_default();
        let req = kagi_host::ArmRequest {
            method,
            segs: &segs,
            l: &l,
            body: &bytes,
            wait: None,
        };
        match provider.handle(&caller, req).await {
            Ok(r) => (r.status, r.body),
            Err(e) => (
                e.code.status(),
                json!({"error": e.message, "code": e.inner}),
            ),
        }
    }

    /// Creates (or updates) resource group `rg` and key vault `vault` (standard, soft delete
    /// for 7 days) in the default subscription as the administrator; the vault's ARM body.
    ///
    /// # Panics
    ///
    /// When either is refused, and as [`TestServer::call`].
    pub async fn create_vault(&self, rg: &str, vault: &str) -> Value {
        let sub = &self.admin.subscription_id;
        let (status, body) = self
            .arm(
                "PUT",
                &format!("/subscriptions/{sub}/resourcegroups/{rg}"),
                Some(json!({"location": "westeurope"})),
            )
            .await;
        assert!(
            matches!(status, 200 | 201),
            "resource group {rg}: {status} {body}"
        );
        let (status, body) = self
            .arm(
                "PUT",
                &format!(
                    "/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.KeyVault/vaults/{vault}"
                ),
                Some(json!({"location": "westeurope", "properties": {
                    "tenantId": self.admin.tenant_id,
                    "sku": {"family": "A", "name": "standard"},
                    "softDeleteRetentionInDays": 7,
                }})),
            )
            .await;
        assert!(
            matches!(status, 200 | 201),
            "vault {vault}: {status} {body}"
        );
        body
    }

    /// The management API as the administrator: `method path` (the api-version added);
    /// the status and the body.
    ///
    /// # Panics
    ///
    /// As [`TestServer::call`].
    pub async fn arm(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let sep = if path.contains('?') { '&' } else { '?' };
        let url = self.mgmt_url(&format!("{path}{sep}api-version={}", self.arm_api_version));
        let (status, _, v) = self.call(method, url, &self.token, body).await;
        (status, v)
    }

    /// Key vault `vault`'s data plane as the administrator: `method path` (api-version 7.5
    /// added); the status and the body.
    ///
    /// # Panics
    ///
    /// As [`TestServer::call`].
    pub async fn data(
        &self,
        method: &str,
        vault: &str,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        self.data_as(&self.token, method, vault, path, body).await
    }

    /// [`TestServer::data`] with another token.
    ///
    /// # Panics
    ///
    /// As [`TestServer::call`].
    pub async fn data_as(
        &self,
        token: &str,
        method: &str,
        vault: &str,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let url = self.vault_url(vault, &format!("{path}?api-version={DATA_API_VERSION}"));
        let (status, _, v) = self.call(method, url, token, body).await;
        (status, v)
    }

    /// Builds the backup service again with the start's settings, as a restarted server
    /// does (it finishes interrupted work, such as vault moves, when it is built), and serves
    /// it from now on.
    ///
    /// # Panics
    ///
    /// When the server was started without the backup service.
    pub fn install_backup_service(&self) {
        let keys = self
            .backup_keys
            .expect("the server was started with the backup service");
        let backup = backup_service(&self.platform, keys, self.addr);
        self.services.register(backup.clone());
        *self.backup.lock().unwrap_or_else(|p| p.into_inner()) = Some(backup);
    }

    /// The backup service the server runs.
    ///
    /// # Panics
    ///
    /// When the server was started without the backup service.
    pub fn backup_service(&self) -> Arc<kagi_backup_service::BackupService> {
        self.backup
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .expect("the server was started with the backup service")
    }

    /// The folder of backup vault `name` (in resource group `rg` of subscription `sub`) on
    /// the server.
    pub fn backup_vault_dir(&self, sub: &str, rg: &str, name: &str) -> PathBuf {
        self.dir()
            .join("backup")
            .join(sub.to_ascii_lowercase())
            .join(rg.to_ascii_lowercase())
            .join(name)
    }

    /// Waits for backup job `job` (as a backup vault's API answered it) of the vault with
    /// resource id `vault` to end; the job as it ended.
    ///
    /// # Panics
    ///
    /// When the job cannot be read or does not end within a minute.
    pub async fn wait_job(&self, vault: &str, job: &Value) -> Value {
        let id = job["name"].as_str().expect("a job name");
        for _ in 0..3000 {
            let (s, j) = self
                .arm("GET", &format!("{vault}/backupJobs/{id}"), None)
                .await;
            assert_eq!(s, 200, "{j}");
            if j["status"] != "InProgress" {
                return j;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("job never ended");
    }

    /// Backs up protected item `item` of the backup vault with resource id `vault`; the job
    /// as it ended.
    ///
    /// # Panics
    ///
    /// When the backup is not accepted (202), or as [`TestServer::wait_job`].
    pub async fn backup(&self, vault: &str, item: &str) -> Value {
        let (s, j) = self
            .arm(
                "POST",
                &format!("{vault}/backupProtectedItems/{item}/backup"),
                None,
            )
            .await;
        assert_eq!(s, 202, "{j}");
        self.wait_job(vault, &j).await
    }

    /// Restores recovery point `rp` of protected item `item` of the backup vault with
    /// resource id `vault` into `target`; the job as it ended.
    ///
    /// # Panics
    ///
    /// When the restore is not accepted (202), or as [`TestServer::wait_job`].
    pub async fn restore(&self, vault: &str, item: &str, rp: &str, target: &Path) -> Value {
        let (s, j) = self
            .arm(
                "POST",
                &format!("{vault}/backupProtectedItems/{item}/restore"),
                Some(json!({"recoveryPointId": rp, "targetPath": target})),
            )
            .await;
        assert_eq!(s, 202, "{j}");
        self.wait_job(vault, &j).await
    }
}

/// A port nobody listens on right now on 127.0.0.1: bind port 0, read the port, let it go.
///
/// # Panics
///
/// When no port can be bound.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port on 127.0.0.1")
        .port()
}

/// A port free on 127.0.0.1 and, when this host has IPv6 loopback, on ::1 too; whether it has.
fn free_dual_stack_port() -> (u16, bool) {
    let v6 = std::net::TcpListener::bind("[::1]:0").is_ok();
    for _ in 0..100 {
        let port = free_port();
        if !v6 || std::net::TcpListener::bind(("::1", port)).is_ok() {
            return (port, v6);
        }
    }
    panic!("no port free on both loopback addresses");
}

/// The backup service on `platform` with `keys`, reaching the key vaults at `addr`.
fn backup_service(
    platform: &Arc<Platform>,
    keys: BackupKeys,
    addr: SocketAddr,
) -> Arc<kagi_backup_service::BackupService> {
    kagi_backup_service::BackupService::new(
        platform.clone(),
        kagi_backup_service::ServiceConfig {
            key_cache_lifetime: keys.key_cache_lifetime,
            key_poll_interval: keys.key_poll_interval,
            connect: Some(addr),
        },
    )
}

fn client_builder(ca_pem: &str, addr: SocketAddr) -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(ca_pem.as_bytes()).expect("the CA's PEM")])
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .dns_resolver(LocalhostResolver(addr))
        // HTTP/1.1 (where the Host header routes) unless a test asks for HTTP/2 itself: a
        // workspace build may enable reqwest's http2 feature, which would otherwise change
        // every test's protocol through ALPN.
        .http1_only()
}

/// Resolves `localhost` and every `*.localhost` name to the server, and nothing else.
struct LocalhostResolver(SocketAddr);

impl reqwest::dns::Resolve for LocalhostResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().trim_end_matches('.').to_ascii_lowercase();
        let served = host == DNS_SUFFIX || host.ends_with(&format!(".{DNS_SUFFIX}"));
        let result: Result<reqwest::dns::Addrs, _> = if served {
            Ok(Box::new(std::iter::once(self.0)))
        } else {
            Err(format!("the test client resolves only {DNS_SUFFIX} names, not {host}").into())
        };
        Box::pin(std::future::ready(result))
    }
}
