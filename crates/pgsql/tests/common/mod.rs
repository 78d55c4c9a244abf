//! A test environment: the front end on a loopback port (TLS from a throwaway CA, and a Unix
//! socket) with a Gateway over plain SQLite files in a temporary directory, and helpers to
//! run the real psql.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use kagi_pgsql::{
    CancellationToken, CommitBarrier, Credential, Gateway, LoginChange, OpenDatabase, PgConfig,
    PgError, ScramVerifier, Terminator, Upstream, rusqlite, sqlstate,
};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// The DNS suffix of server host names in the tests (`srv1.pg.localhost`).
pub const SUFFIX: &str = "pg.localhost";
/// The administrator login of every test server and its password.
pub const ADMIN: &str = "admin";
pub const ADMIN_PW: &str = "s3cret-admin";
/// An Entra principal (access-token login) and the token the gateway accepts.
pub const ENTRA: &str = "alice@contoso.com";
pub const TOKEN: &str = "eyJ0eXAiOiJKV1QiLCJhbGciOiJub25lIn0.eyJzdWIiOiJhbGljZSJ9.test-token";

/// Azure's text for an inaccessible database.
pub fn azure_40613(db: &str, server: &str) -> String {
    format!(
        "Database '{db}' on server '{server}' is not currently available. Please retry the connection later. If the problem persists, contact customer support, and provide them the session tracing ID of '00000000-0000-0000-0000-000000000000'. (40613)"
    )
}

enum Login {
    Scram(ScramVerifier),
    Token,
}

struct TestServer {
    logins: HashMap<String, Login>,
    dir: PathBuf,
}

/// A Gateway over SQLite files: `<dir>/<server>/<db>.sqlite`.
pub struct TestGateway {
    servers: Mutex<HashMap<String, TestServer>>,
    terminators: Mutex<HashMap<(String, String), Terminator>>,
    unavailable: Mutex<HashSet<(String, String)>>,
    /// Servers another front end serves ([`Gateway::upstream`]).
    upstreams: Mutex<HashMap<String, Upstream>>,
    /// Where CancelRequests unknown here are passed on ([`Gateway::cancel_peers`]).
    cancel_peers: Mutex<Vec<Upstream>>,
    /// The commit barrier of the sessions opened from now on.
    barrier: Mutex<Option<Arc<dyn CommitBarrier>>>,
}

impl TestGateway {
    fn new(root: &Path, servers: &[&str]) -> Arc<Self> {
        let mut map = HashMap::new();
        for s in servers {
            let dir = root.join(s);
            std::fs::create_dir_all(&dir).unwrap();
            let mut logins = HashMap::new();
            logins.insert(
                ADMIN.to_owned(),
                Login::Scram(ScramVerifier::from_password(ADMIN_PW).unwrap()),
            );
            logins.insert(ENTRA.to_owned(), Login::Token);
            // Every server starts with a database "db1" (and "postgres", as psql expects one).
            for db in ["db1", "postgres"] {
                let c = rusqlite::Connection::open(dir.join(format!("{db}.sqlite"))).unwrap();
                c.execute_batch("PRAGMA journal_mode=WAL").unwrap();
            }
            map.insert((*s).to_owned(), TestServer { logins, dir });
        }
        Arc::new(Self {
            servers: Mutex::new(map),
            terminators: Mutex::new(HashMap::new()),
            unavailable: Mutex::new(HashSet::new()),
            upstreams: Mutex::new(HashMap::new()),
            cancel_peers: Mutex::new(Vec::new()),
            barrier: Mutex::new(None),
        })
    }

    /// Sessions opened from now on pass their commits through `barrier`.
    pub fn set_barrier(&self, barrier: Arc<dyn CommitBarrier>) {
        *self.barrier.lock().unwrap() = Some(barrier);
    }

    /// Makes a database Inaccessible: open sessions are cut with 40613, new ones refused.
    pub fn make_inaccessible(&self, server: &str, db: &str) {
        self.unavailable
            .lock()
            .unwrap()
            .insert((server.to_owned(), db.to_owned()));
        if let Some(t) = self
            .terminators
            .lock()
            .unwrap()
            .get(&(server.to_owned(), db.to_owned()))
        {
            t.terminate(PgError::unavailable(azure_40613(db, server)));
        }
    }

    /// Connections for `server` go to `up` from now on.
    pub fn forward(&self, server: &str, up: Upstream) {
        self.upstreams.lock().unwrap().insert(server.to_owned(), up);
    }

    /// CancelRequests unknown here are passed on to `peers` from now on.
    pub fn set_cancel_peers(&self, peers: Vec<Upstream>) {
        *self.cancel_peers.lock().unwrap() = peers;
    }

    pub fn sessions(&self, server: &str, db: &str) -> usize {
        self.terminators
            .lock()
            .unwrap()
            .get(&(server.to_owned(), db.to_owned()))
            .map_or(0, Terminator::sessions)
    }

    pub fn has_login(&self, server: &str, login: &str) -> bool {
        self.servers
            .lock()
            .unwrap()
            .get(server)
            .is_some_and(|s| s.logins.contains_key(login))
    }

    pub fn db_path(&self, server: &str, db: &str) -> PathBuf {
        self.servers.lock().unwrap()[server]
            .dir
            .join(format!("{db}.sqlite"))
    }
}

#[async_trait]
impl Gateway for TestGateway {
    fn server_for_host(&self, host: &str) -> Option<String> {
        let server = host.strip_suffix(SUFFIX)?.strip_suffix('.')?;
        self.servers
            .lock()
            .unwrap()
            .contains_key(server)
            .then(|| server.to_owned())
    }

    async fn upstream(&self, server: &str) -> Result<Option<Upstream>, PgError> {
        Ok(self.upstreams.lock().unwrap().get(server).cloned())
    }

    async fn cancel_peers(&self) -> Vec<Upstream> {
        self.cancel_peers.lock().unwrap().clone()
    }

    async fn credential(
        &self,
        server: &str,
        _database: &str,
        login: &str,
    ) -> Result<Option<Credential>, PgError> {
        let servers = self.servers.lock().unwrap();
        Ok(servers
            .get(server)
            .and_then(|s| s.logins.get(login))
            .map(|l| match l {
                Login::Scram(v) => Credential::Scram(v.clone()),
                Login::Token => Credential::AccessToken,
            }))
    }

    async fn check_token(
        &self,
        _server: &str,
        _database: &str,
        login: &str,
        token: &str,
    ) -> Result<(), PgError> {
        if token == TOKEN {
            Ok(())
        } else {
            Err(PgError::password_failed(login))
        }
    }

    async fn open(
        &self,
        server: &str,
        database: &str,
        _login: &str,
    ) -> Result<OpenDatabase, PgError> {
        let key = (server.to_owned(), database.to_owned());
        if self.unavailable.lock().unwrap().contains(&key) {
            return Err(PgError::unavailable(azure_40613(database, server)));
        }
        let path = self.db_path(server, database);
        if !path.exists() {
            return Err(PgError::fatal(
                sqlstate::INVALID_CATALOG_NAME,
                format!("database \"{database}\" does not exist"),
            ));
        }
        let connection = rusqlite::Connection::open(path)
            .map_err(|e| PgError::fatal(sqlstate::IO_ERROR, e.to_string()))?;
        connection
            .busy_timeout(std::time::Duration::from_secs(5))
            .unwrap();
        let termination = self
            .terminators
            .lock()
            .unwrap()
            .entry(key)
            .or_default()
            .subscribe();
        Ok(OpenDatabase {
            connection,
            termination,
            barrier: self.barrier.lock().unwrap().clone(),
        })
    }

    async fn list_databases(&self, server: &str) -> Result<Vec<String>, PgError> {
        let dir = self.servers.lock().unwrap()[server].dir.clone();
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir).unwrap() {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            if let Some(db) = name.strip_suffix(".sqlite") {
                out.push(db.to_owned());
            }
        }
        Ok(out)
    }

    async fn change_login(
        &self,
        server: &str,
        _database: &str,
        actor: &str,
        change: LoginChange,
    ) -> Result<(), PgError> {
        if actor != ADMIN {
            return Err(PgError::error(
                sqlstate::INSUFFICIENT_PRIVILEGE,
                "permission denied to create role",
            ));
        }
        let mut servers = self.servers.lock().unwrap();
        let logins = &mut servers.get_mut(server).unwrap().logins;
        match change {
            LoginChange::Create { login, verifier } => {
                if logins.contains_key(&login) {
                    return Err(PgError::error(
                        sqlstate::DUPLICATE_OBJECT,
                        format!("role \"{login}\" already exists"),
                    ));
                }
                logins.insert(login, Login::Scram(verifier));
            }
            LoginChange::SetPassword { login, verifier } => match logins.get_mut(&login) {
                Some(l) => *l = Login::Scram(verifier),
                None => {
                    return Err(PgError::error(
                        sqlstate::UNDEFINED_OBJECT,
                        format!("role \"{login}\" does not exist"),
                    ));
                }
            },
            LoginChange::CreateExternal { login, .. } => {
                logins.insert(login, Login::Token);
            }
            LoginChange::Drop { login, if_exists } => {
                if logins.remove(&login).is_none() && !if_exists {
                    return Err(PgError::error(
                        sqlstate::UNDEFINED_OBJECT,
                        format!("role \"{login}\" does not exist"),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// A running front end.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub socket_dir: PathBuf,
    pub ca: PathBuf,
    pub gateway: Arc<TestGateway>,
    shutdown: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn tls_config(dir: &Path) -> (Arc<rustls::ServerConfig>, PathBuf) {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "kagi-pgsql test CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name
        .push(DnType::CommonName, "pg.localhost");
    p.subject_alt_names = vec![
        SanType::DnsName(format!("*.{SUFFIX}").try_into().unwrap()),
        SanType::DnsName("localhost".try_into().unwrap()),
        SanType::IpAddress("127.0.0.1".parse().unwrap()),
    ];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    let cert = p.signed_by(&key, &issuer).unwrap();
    let ca_path = dir.join("ca.pem");
    std::fs::write(&ca_path, ca_cert.pem()).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(cert.der().to_vec())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
        .unwrap();
    (Arc::new(config), ca_path)
}

impl Env {
    /// Servers srv1 and srv2, TLS required on TCP.
    pub fn start() -> Self {
        Self::start_with(|_| {})
    }

    pub fn start_with(tweak: impl FnOnce(&mut PgConfig)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (tls, ca) = tls_config(dir.path());
        let gateway = TestGateway::new(&dir.path().join("data"), &["srv1", "srv2"]);
        let socket_dir = dir.path().join("sock");
        std::fs::create_dir_all(&socket_dir).unwrap();
        let mut config = PgConfig {
            tls: Some(tls),
            ..Default::default()
        };
        tweak(&mut config);
        let shutdown = CancellationToken::new();
        let (tx, rx) = std::sync::mpsc::channel();
        let gw: Arc<dyn Gateway> = gateway.clone();
        let sd = shutdown.clone();
        let sock = socket_dir.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                let port = tcp.local_addr().unwrap().port();
                let unix =
                    tokio::net::UnixListener::bind(sock.join(format!(".s.PGSQL.{port}"))).unwrap();
                tx.send(port).unwrap();
                kagi_pgsql::serve(tcp, Some(unix), gw, config, sd)
                    .await
                    .unwrap();
            });
        });
        let port = rx.recv().unwrap();
        Self {
            dir,
            port,
            socket_dir,
            ca,
            gateway,
            shutdown,
            thread: Some(thread),
        }
    }

    /// A libpq connection string to `server` by SNI (`{server}.pg.localhost`).
    pub fn conninfo(&self, server: &str, user: &str, db: &str) -> String {
        format!(
            "host={server}.{SUFFIX} hostaddr=127.0.0.1 port={} user={user} dbname={db} sslmode=verify-full sslrootcert={}",
            self.port,
            self.ca.display()
        )
    }

    /// A connection string without SNI (an IP address host): the server comes from `user@server`.
    pub fn conninfo_ip(&self, user: &str, db: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user={user} dbname={db} sslmode=verify-full sslrootcert={}",
            self.port,
            self.ca.display()
        )
    }

    /// This front end as the upstream of `server` for another one, named `name` in messages,
    /// which marks what it forwards with `by`.
    pub fn upstream(&self, server: &str, name: &str, by: &str) -> Upstream {
        Upstream {
            name: format!("the node '{name}'"),
            address: format!("127.0.0.1:{}", self.port),
            tls_name: format!("{server}.{SUFFIX}"),
            tls: Upstream::trusting(&std::fs::read(&self.ca).unwrap()).unwrap(),
            forwarded_by: by.to_owned(),
        }
    }

    /// This front end as a peer that CancelRequests are passed on to, named `name` in the
    /// log (its certificate covers `localhost`).
    pub fn cancel_peer(&self, name: &str) -> Upstream {
        let mut up = self.upstream("srv1", name, name);
        up.tls_name = "localhost".into();
        up
    }

    /// Runs psql with `args` after the connection string; the password in PGPASSWORD.
    pub fn psql(&self, conninfo: &str, password: &str, args: &[&str]) -> Output {
        self.psql_cmd(conninfo, password, args)
            .output()
            .expect("psql (apt-get install postgresql-client)")
    }

    pub fn psql_cmd(&self, conninfo: &str, password: &str, args: &[&str]) -> Command {
        let mut c = Command::new("psql");
        c.arg("-X")
            .arg("-v")
            .arg("ON_ERROR_STOP=1")
            .arg(conninfo)
            .args(args);
        c.env("PGPASSWORD", password)
            .env("PGCONNECT_TIMEOUT", "10")
            .env_remove("PGSERVICE")
            .env("LC_ALL", "C.UTF-8");
        c.stdin(Stdio::null());
        c
    }

    /// psql as the administrator of srv1/db1 with `-c sql` (several statements allowed).
    pub fn admin(&self, sql: &str) -> Output {
        self.psql(&self.conninfo("srv1", ADMIN, "db1"), ADMIN_PW, &["-c", sql])
    }
}

impl Env {
    /// Cancels the listener's shutdown token and waits for `serve` to return.
    pub fn shutdown(&mut self) {
        self.shutdown.cancel();
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Runs `sql` with psql through `client` (`conninfo`, the administrator), waits until
/// `server` (the front end holding srv1/db1) runs it, then does what Ctrl-C does: psql sends a
/// CancelRequest. Its output.
pub fn psql_ctrl_c(client: &Env, conninfo: &str, server: &Env, sql: &str) -> Output {
    let child = client
        .psql_cmd(conninfo, ADMIN_PW, &["-v", "VERBOSITY=verbose", "-c", sql])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while server.gateway.sessions("srv1", "db1") < 1 {
        assert!(std::time::Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    let status = Command::new("kill")
        .arg("-INT")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(status.success());
    child.wait_with_output().unwrap()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts psql succeeded and returns its standard output.
#[track_caller]
pub fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "psql failed: {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        stdout(o),
        stderr(o)
    );
    stdout(o)
}

/// A raw client on the front end's Unix socket.
pub fn connect(env: &Env) -> UnixStream {
    let s = UnixStream::connect(env.socket_dir.join(format!(".s.PGSQL.{}", env.port))).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// A raw client past authentication (token login over the Unix socket) on srv1/db1.
pub fn raw_session(env: &Env) -> UnixStream {
    raw_session_with_key(env).0
}

/// [`raw_session`] and the session's BackendKeyData: (stream, process id, secret key).
pub fn raw_session_with_key(env: &Env) -> (UnixStream, u32, u32) {
    let mut s = connect(env);
    s.write_all(&startup(&[
        ("user", &format!("{ENTRA}@srv1")),
        ("database", "db1"),
    ]))
    .unwrap();
    let r = read_until(&mut s, b'R');
    assert_eq!(
        r.last().unwrap().1,
        3u32.to_be_bytes(),
        "cleartext password requested"
    );
    let mut pw = TOKEN.as_bytes().to_vec();
    pw.push(0);
    s.write_all(&msg(b'p', &pw)).unwrap();
    let msgs = read_until(&mut s, b'Z');
    assert_eq!(msgs.last().unwrap().0, b'Z', "{msgs:?}");
    let (_, k) = msgs
        .iter()
        .find(|(t, _)| *t == b'K')
        .expect("BackendKeyData");
    let pid = u32::from_be_bytes(k[..4].try_into().unwrap());
    let key = u32::from_be_bytes(k[4..8].try_into().unwrap());
    (s, pid, key)
}

/// Sends CancelRequest (`pid`, `key`) to `env` on a new connection (its Unix socket) and
/// waits until the front end closes it (it has served, sent on or passed on the request).
pub fn send_cancel(env: &Env, pid: u32, key: u32) {
    let mut s = connect(env);
    let mut req = 16u32.to_be_bytes().to_vec();
    req.extend_from_slice(&kagi_pgsql::wire::CANCEL_REQUEST.to_be_bytes());
    req.extend_from_slice(&pid.to_be_bytes());
    req.extend_from_slice(&key.to_be_bytes());
    s.write_all(&req).unwrap();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "{rest:?}");
}

/// A simple Query message.
pub fn query(sql: &str) -> Vec<u8> {
    let mut q = sql.as_bytes().to_vec();
    q.push(0);
    msg(b'Q', &q)
}

/// A StartupMessage (protocol 3.0) with `params`, length word included.
pub fn startup(params: &[(&str, &str)]) -> Vec<u8> {
    let mut body = 196_608u32.to_be_bytes().to_vec();
    for (k, v) in params {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut m = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    m.extend_from_slice(&body);
    m
}

/// A regular message: type, length word, body.
pub fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![tag];
    m.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    m.extend_from_slice(body);
    m
}

/// Reads backend messages until one of type `until` (or the end); returns (type, body) pairs.
pub fn read_until(s: &mut UnixStream, until: u8) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    loop {
        let mut head = [0u8; 5];
        if s.read_exact(&mut head).is_err() {
            return out;
        }
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        let mut body = vec![0u8; len - 4];
        s.read_exact(&mut body).unwrap();
        let t = head[0];
        out.push((t, body));
        if t == until {
            return out;
        }
    }
}

/// The SQLSTATE of an ErrorResponse.
pub fn error_code(body: &[u8]) -> String {
    error_field(body, b'C')
}

/// A field of an ErrorResponse (`C` SQLSTATE, `M` message, ...), empty when absent.
pub fn error_field(body: &[u8], wanted: u8) -> String {
    let mut i = 0;
    while i < body.len() && body[i] != 0 {
        let field = body[i];
        let end = i + 1 + body[i + 1..].iter().position(|&b| b == 0).unwrap();
        if field == wanted {
            return String::from_utf8_lossy(&body[i + 1..end]).into_owned();
        }
        i = end + 1;
    }
    String::new()
}
