//! Forwarding: a front server passes connections for exports that live on another server (its
//! upstream, over TCP with TLS) on to it, transparently to real clients (nbdinfo, nbdcopy,
//! qemu-io, qemu-img) and to hand-driven ones (`EXPORT_NAME`, simple replies); never twice; an
//! upstream that is down or silent is an NBD error naming it, in bounded time; an export the
//! upstream disconnects is disconnected through the front.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use common::pki::{Pki, client_config, make_pki, qemu_io, qemu_tls, server_config};
use common::*;
use kagi_nbd::{
    ClientInfo, Config, Export, ExportListing, ExportResolver, NbdServer, Refusal, Upstream,
    UpstreamTls, proto,
};

const MIB: u64 = 1 << 20;

/// A [`MapResolver`] whose names listed in `routes` live elsewhere (or are refused: `Err`).
struct Routing {
    local: Arc<MapResolver>,
    routes: Mutex<HashMap<String, Result<Upstream, Refusal>>>,
}

#[async_trait]
impl ExportResolver for Routing {
    async fn resolve(&self, name: &str, client: &ClientInfo) -> Result<Export, Refusal> {
        self.local.resolve(name, client).await
    }

    async fn list(&self, client: &ClientInfo) -> Result<Vec<ExportListing>, Refusal> {
        self.local.list(client).await
    }

    async fn upstream(
        &self,
        name: &str,
        _client: &ClientInfo,
    ) -> Result<Option<Upstream>, Refusal> {
        self.routes.lock().unwrap().get(name).cloned().transpose()
    }
}

/// An upstream at `addr` with TLS verified by the test CA for "localhost".
fn upstream(pki: &Pki, addr: SocketAddr, label: &str) -> Upstream {
    Upstream {
        address: addr.to_string(),
        tls: Some(UpstreamTls {
            config: client_config(pki),
            server_name: "localhost".try_into().unwrap(),
        }),
        label: label.into(),
    }
}

/// Two servers sharing one CA: `home` serves "disk" on TLS TCP; `front` serves "near" itself and
/// forwards "disk" to home, on TLS TCP and on a Unix socket.
struct Pair {
    dir: tempfile::TempDir,
    pki: Pki,
    device: Arc<MemDevice>,
    home: NbdServer,
    home_addr: SocketAddr,
    home_routes: Arc<Routing>,
    home_exports: Arc<MapResolver>,
    front: NbdServer,
    front_addr: SocketAddr,
    front_socket: std::path::PathBuf,
    front_routes: Arc<Routing>,
}

impl Pair {
    async fn start(config: Config) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let pki = make_pki(&dir.path().join("pki"));
        let device = MemDevice::new(4 * MIB);
        device.fill(0, &[0x42; 65536]);
        let home_exports = MapResolver::new(vec![("disk", export(device.clone()))]);
        let home_routes = Arc::new(Routing {
            local: home_exports.clone(),
            routes: Mutex::new(HashMap::new()),
        });
        let home = NbdServer::new(home_routes.clone(), config.clone()).unwrap();
        let home_addr = home
            .listen_tcp("127.0.0.1:0".parse().unwrap(), Some(server_config(&pki)))
            .await
            .unwrap();
        let front_exports = MapResolver::new(vec![("near", export(MemDevice::new(MIB)))]);
        let front_routes = Arc::new(Routing {
            local: front_exports,
            routes: Mutex::new(HashMap::from([(
                "disk".to_string(),
                Ok(upstream(&pki, home_addr, "the node 'home'")),
            )])),
        });
        let front = NbdServer::new(front_routes.clone(), config).unwrap();
        let front_addr = front
            .listen_tcp("127.0.0.1:0".parse().unwrap(), Some(server_config(&pki)))
            .await
            .unwrap();
        let front_socket = dir.path().join("front.sock");
        front.listen_unix(&front_socket).await.unwrap();
        Self {
            dir,
            pki,
            device,
            home,
            home_addr,
            home_routes,
            home_exports,
            front,
            front_addr,
            front_socket,
            front_routes,
        }
    }

    fn front_uri(&self, name: &str) -> String {
        format!(
            "nbds://localhost:{}/{name}?tls-certificates={}",
            self.front_addr.port(),
            self.dir.path().join("pki").display()
        )
    }

    fn route(&self, name: &str, to: Result<Upstream, Refusal>) {
        self.front_routes
            .routes
            .lock()
            .unwrap()
            .insert(name.into(), to);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn libnbd_tools_work_through_the_front() {
    let p = Pair::start(Config::default()).await;
    let uri = p.front_uri("disk");
    let size = run_ok("nbdinfo", &["--size", &uri]).await;
    assert_eq!(size.trim(), (4 * MIB).to_string());
    // NBD_OPT_INFO with its name and description requests, answered by the home.
    let info = run_ok("nbdinfo", &[&uri]).await;
    assert!(info.contains("test disk"), "{info}");
    // Structured replies and base:allocation, negotiated before GO, replayed to the home.
    let map = run_ok("nbdinfo", &["--map", &uri]).await;
    assert!(map.contains("hole,zero"), "{map}");
    assert!(map.contains("data"), "{map}");
    let image = pattern(4 * MIB as usize, 9);
    let src = file(p.dir.path(), "src.raw", &image);
    run_ok("nbdcopy", &[src.to_str().unwrap(), &uri]).await;
    assert!(p.device.contents(0, image.len()) == image);
    let back = p.dir.path().join("back.raw");
    run_ok("nbdcopy", &[&uri, back.to_str().unwrap()]).await;
    assert!(std::fs::read(&back).unwrap() == image);
    // The front's own export is still served by the front.
    let near = run_ok("nbdinfo", &["--size", &p.front_uri("near")]).await;
    assert_eq!(near.trim(), MIB.to_string());
    // Every forwarded connection reached the home over TLS.
    assert!(
        p.home_exports
            .seen_clients
            .lock()
            .unwrap()
            .iter()
            .all(|c| c.tls)
    );
    // Connections end with their clients, on both servers.
    wait_for(|| p.front.connection_count() == 0 && p.home.connection_count() == 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_works_through_the_front_with_extended_headers() {
    let p = Pair::start(Config::default()).await;
    let (object, image) = qemu_tls(&p.dir.path().join("pki"), p.front_addr.port(), "disk");
    let out = qemu_io(
        &object,
        &image,
        &[
            "write -f -P 0xab 1M 1M",
            "read -P 0xab 1M 1M",
            "write -z 2M 64k",
        ],
    )
    .await;
    assert!(!out.contains("failed"), "{out}");
    assert_eq!(p.device.contents(MIB, 4), vec![0xab; 4]);
    let raw = p.dir.path().join("copy.raw");
    run_ok(
        "qemu-img",
        &[
            "convert",
            "--object",
            &object,
            "--image-opts",
            &image,
            "-O",
            "raw",
            raw.to_str().unwrap(),
        ],
    )
    .await;
    assert!(std::fs::read(&raw).unwrap() == p.device.contents(0, 4 * MIB as usize));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_name_and_simple_replies_through_a_unix_front() {
    let p = Pair::start(Config::default()).await;
    // EXPORT_NAME (no error reply possible) is forwarded too; NO_ZEROES was replayed, so the
    // answer is exactly size and flags.
    let mut c = Raw::unix(&p.front_socket).await;
    c.greet().await;
    c.option(proto::OPT_EXPORT_NAME, b"disk").await.unwrap();
    let answer = c.read_n(10).await.unwrap();
    assert_eq!(u64::from_be_bytes(answer[..8].try_into().unwrap()), 4 * MIB);
    assert_eq!(c.read_at(0, 512).await, vec![0x42; 512]);
    // GO with simple replies.
    let mut c = Raw::unix(&p.front_socket).await;
    c.greet().await;
    assert_eq!(c.go("disk").await, proto::REP_ACK);
    assert_eq!(c.read_at(512, 512).await, vec![0x42; 512]);
    // Ending the export at the home disconnects the client of the front.
    let token = p
        .home_exports
        .exports
        .lock()
        .unwrap()
        .get("disk")
        .unwrap()
        .disconnect
        .clone();
    token.cancel();
    assert!(c.closed().await);
    // And the home refuses it from then on, through the front.
    let mut c = Raw::unix(&p.front_socket).await;
    c.greet().await;
    assert_eq!(c.go("disk").await, proto::REP_ERR_POLICY);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_connection_is_never_forwarded_again() {
    let p = Pair::start(Config::default()).await;
    // The home believes "loop" lives on the front, which forwards it to the home.
    p.route("loop", Ok(upstream(&p.pki, p.home_addr, "the node 'home'")));
    p.home_routes.routes.lock().unwrap().insert(
        "loop".into(),
        Ok(upstream(&p.pki, p.front_addr, "the node 'front'")),
    );
    let mut c = Raw::unix(&p.front_socket).await;
    c.greet().await;
    c.option(proto::OPT_GO, &go_data("loop")).await.unwrap();
    let (_, ty, message) = c.option_reply().await.unwrap();
    assert_eq!(ty, proto::REP_ERR_UNKNOWN);
    let message = String::from_utf8(message).unwrap();
    assert!(message.contains("the node 'front'"), "{message}");
    assert!(message.contains("not passed on again"), "{message}");
    // Only the client's connection to the front and the front's to the home.
    assert_eq!(p.front.connection_count(), 1);
    assert_eq!(p.home.connection_count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_down_or_silent_is_an_error_naming_it() {
    let config = Config {
        forward_timeout: Duration::from_millis(700),
        ..Config::default()
    };
    let p = Pair::start(config).await;
    // Nothing listens there.
    let gone = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    p.route("down", Ok(upstream(&p.pki, gone, "the node 'down'")));
    // Accepts and says nothing.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    p.route(
        "silent",
        Ok(upstream(
            &p.pki,
            silent.local_addr().unwrap(),
            "the node 'silent'",
        )),
    );
    // The resolver knows it is not running.
    p.route(
        "stopped",
        Err(Refusal::Unknown(
            "served by the node 'stopped', which is not running".into(),
        )),
    );
    let mut c = Raw::unix(&p.front_socket).await;
    c.greet().await;
    for (name, expect) in [
        ("down", "the node 'down', which cannot be reached"),
        ("silent", "the node 'silent', which did not answer"),
        ("stopped", "the node 'stopped', which is not running"),
    ] {
        let started = Instant::now();
        c.option(proto::OPT_GO, &go_data(name)).await.unwrap();
        let (_, ty, message) = c.option_reply().await.unwrap();
        assert_eq!(ty, proto::REP_ERR_UNKNOWN, "{name}");
        let message = String::from_utf8(message).unwrap();
        assert!(message.contains(expect), "{name}: {message}");
        assert!(started.elapsed() < Duration::from_secs(3), "{name}");
    }
    // The connection is still in the handshake: the front's own export is served.
    assert_eq!(c.go("near").await, proto::REP_ACK);
    // Over TLS with a real client: an error, not a hang (libnbd 1.14 shows the server's
    // message in its debug output only).
    let r = run(
        "nbdinfo",
        &["--size", &p.front_uri("down")],
        &[("LIBNBD_DEBUG", "1")],
    )
    .await;
    assert!(!r.ok);
    assert!(r.stderr.contains("the node 'down'"), "{}", r.stderr);
    drop(silent);
}

/// The data of `NBD_OPT_GO` for `name` with no information requests.
fn go_data(name: &str) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend(name.as_bytes());
    d.extend(0u16.to_be_bytes());
    d
}

async fn wait_for(mut done: impl FnMut() -> bool) {
    let until = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < until, "condition not reached");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
