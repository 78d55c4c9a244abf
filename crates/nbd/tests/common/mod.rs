//! Test support: an in-memory sparse device, a resolver over a fixed map, a running server,
//! and a runner for the real client tools (a missing tool fails the test: scripts/setup.sh
//! installs them).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

pub mod pki;

use async_trait::async_trait;
use kagi_nbd::{
    BlockDevice, BlockSizes, ClientInfo, Config, DeviceError, Errno, Export, ExportListing,
    ExportResolver, Extent, NbdServer, ReadData, Refusal, ZeroFlags,
};

/// Allocation unit of the test device: written chunks are data, the rest are holes.
pub const CHUNK: u64 = 64 * 1024;

/// A sparse in-memory block device that counts what it is asked to do.
pub struct MemDevice {
    size: u64,
    read_only: bool,
    chunks: Mutex<BTreeMap<u64, Vec<u8>>>,
    pub fua_writes: AtomicU64,
    pub flushes: AtomicU64,
    pub zeroes: AtomicU64,
    pub trims: AtomicU64,
    pub reads: AtomicU64,
    /// When set, every operation fails with this error.
    pub fail: Mutex<Option<DeviceError>>,
}

impl MemDevice {
    pub fn new(size: u64) -> Arc<Self> {
        Self::with(size, false)
    }

    pub fn with(size: u64, read_only: bool) -> Arc<Self> {
        Arc::new(Self {
            size,
            read_only,
            chunks: Mutex::new(BTreeMap::new()),
            fua_writes: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
            zeroes: AtomicU64::new(0),
            trims: AtomicU64::new(0),
            reads: AtomicU64::new(0),
            fail: Mutex::new(None),
        })
    }

    fn check(&self) -> Result<(), DeviceError> {
        match self.fail.lock().unwrap().clone() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Copies `data` in at `offset` (test setup, no NBD).
    pub fn fill(&self, offset: u64, data: &[u8]) {
        self.put(offset, data);
    }

    /// The device's bytes at `offset` (zeroes in holes).
    pub fn contents(&self, offset: u64, len: usize) -> Vec<u8> {
        let chunks = self.chunks.lock().unwrap();
        let mut out = vec![0u8; len];
        let mut pos = offset;
        while pos < offset + len as u64 {
            let base = pos - pos % CHUNK;
            let within = (pos - base) as usize;
            let n = ((CHUNK as usize - within) as u64).min(offset + len as u64 - pos) as usize;
            if let Some(c) = chunks.get(&base) {
                let at = (pos - offset) as usize;
                out[at..at + n].copy_from_slice(&c[within..within + n]);
            }
            pos += n as u64;
        }
        out
    }

    fn put(&self, offset: u64, data: &[u8]) {
        let mut chunks = self.chunks.lock().unwrap();
        let mut pos = offset;
        let mut src = data;
        while !src.is_empty() {
            let base = pos - pos % CHUNK;
            let within = (pos - base) as usize;
            let n = (CHUNK as usize - within).min(src.len());
            let chunk = chunks
                .entry(base)
                .or_insert_with(|| vec![0u8; CHUNK as usize]);
            chunk[within..within + n].copy_from_slice(&src[..n]);
            pos += n as u64;
            src = &src[n..];
        }
    }

    /// Zeroes a range; whole chunks become holes unless `keep` (NO_HOLE).
    fn zero(&self, offset: u64, len: u64, keep: bool) {
        let mut chunks = self.chunks.lock().unwrap();
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let base = pos - pos % CHUNK;
            let within = (pos - base) as usize;
            let n = (CHUNK - within as u64).min(end - pos) as usize;
            if n as u64 == CHUNK && !keep {
                chunks.remove(&base);
            } else if let Some(c) = chunks.get_mut(&base) {
                c[within..within + n].fill(0);
            } else if keep {
                chunks.insert(base, vec![0u8; CHUNK as usize]);
            }
            pos += n as u64;
        }
    }

    /// Number of allocated chunks.
    pub fn allocated(&self) -> usize {
        self.chunks.lock().unwrap().len()
    }
}

#[async_trait]
impl BlockDevice for MemDevice {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn block_sizes(&self) -> BlockSizes {
        BlockSizes {
            minimum: 512,
            preferred: 4096,
            maximum: 32 << 20,
        }
    }

    fn can_multi_conn(&self) -> bool {
        true
    }

    async fn read(&self, offset: u64, len: u32) -> Result<ReadData, DeviceError> {
        self.check()?;
        self.reads.fetch_add(1, Ordering::SeqCst);
        let first = offset - offset % CHUNK;
        let all_holes = {
            let chunks = self.chunks.lock().unwrap();
            chunks
                .range(first..offset + u64::from(len))
                .next()
                .is_none()
        };
        if all_holes {
            return Ok(ReadData::Zeroes);
        }
        Ok(ReadData::Data(self.contents(offset, len as usize)))
    }

    async fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> Result<(), DeviceError> {
        self.check()?;
        if fua {
            self.fua_writes.fetch_add(1, Ordering::SeqCst);
        }
        self.put(offset, &data);
        Ok(())
    }

    async fn flush(&self) -> Result<(), DeviceError> {
        self.check()?;
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    async fn trim(&self, offset: u64, len: u64, _fua: bool) -> Result<(), DeviceError> {
        self.check()?;
        self.trims.fetch_add(1, Ordering::SeqCst);
        self.zero(offset, len, false);
        Ok(())
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        flags: ZeroFlags,
    ) -> Result<(), DeviceError> {
        self.check()?;
        if flags.fast && flags.no_hole {
            return Err(DeviceError::new(Errno::NotSup));
        }
        self.zeroes.fetch_add(1, Ordering::SeqCst);
        self.zero(offset, len, flags.no_hole);
        Ok(())
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, DeviceError> {
        self.check()?;
        let chunks = self.chunks.lock().unwrap();
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = offset;
        let end = offset.saturating_add(len).min(self.size);
        while pos < end {
            let base = pos - pos % CHUNK;
            let n = (base + CHUNK).min(end) - pos;
            let e = if chunks.contains_key(&base) {
                Extent::data(n)
            } else {
                Extent::hole(n)
            };
            match out.last_mut() {
                Some(last) if last.hole == e.hole => last.length += n,
                _ => out.push(e),
            }
            pos += n;
        }
        Ok(out)
    }
}

/// A resolver over a fixed map of names; `list` shows them when `listable`.
pub struct MapResolver {
    pub exports: Mutex<HashMap<String, Export>>,
    pub listable: bool,
    pub seen_clients: Mutex<Vec<ClientInfo>>,
}

impl MapResolver {
    pub fn new(exports: Vec<(&str, Export)>) -> Arc<Self> {
        Arc::new(Self {
            exports: Mutex::new(
                exports
                    .into_iter()
                    .map(|(n, e)| (n.to_string(), e))
                    .collect(),
            ),
            listable: true,
            seen_clients: Mutex::new(Vec::new()),
        })
    }
}

#[async_trait]
impl ExportResolver for MapResolver {
    async fn resolve(&self, name: &str, client: &ClientInfo) -> Result<Export, Refusal> {
        self.seen_clients.lock().unwrap().push(client.clone());
        if name == "forbidden" {
            return Err(Refusal::Policy("access denied by policy".into()));
        }
        self.exports
            .lock()
            .unwrap()
            .get(name)
            .cloned()
            .ok_or_else(|| Refusal::Unknown("no such export".into()))
    }

    async fn list(&self, _client: &ClientInfo) -> Result<Vec<ExportListing>, Refusal> {
        if !self.listable {
            return Ok(Vec::new());
        }
        let mut v: Vec<ExportListing> = self
            .exports
            .lock()
            .unwrap()
            .iter()
            .map(|(n, e)| ExportListing {
                name: n.clone(),
                description: e.description.clone().unwrap_or_default(),
            })
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(v)
    }
}

/// A server on a Unix socket in a temporary directory.
pub struct TestServer {
    pub server: NbdServer,
    pub socket: PathBuf,
    pub dir: tempfile::TempDir,
    pub resolver: Arc<MapResolver>,
}

impl TestServer {
    pub async fn start(exports: Vec<(&str, Export)>) -> Self {
        Self::start_with(exports, Config::default()).await
    }

    pub async fn start_with(exports: Vec<(&str, Export)>, config: Config) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("nbd.sock");
        let resolver = MapResolver::new(exports);
        let server = NbdServer::new(resolver.clone(), config).unwrap();
        server.listen_unix(&socket).await.unwrap();
        Self {
            server,
            socket,
            dir,
            resolver,
        }
    }

    /// `nbd+unix:///NAME?socket=PATH`, the URI qemu and libnbd both accept.
    pub fn uri(&self, name: &str) -> String {
        format!("nbd+unix:///{name}?socket={}", self.socket.display())
    }
}

/// An export of `device` described as "test disk".
pub fn export(device: Arc<MemDevice>) -> Export {
    let mut e = Export::new(device);
    e.description = Some("test disk".into());
    e
}

/// Output of a client tool.
pub struct Ran {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

/// Runs a client tool to completion (without blocking the runtime that serves it). A tool
/// that is not installed fails the test.
pub async fn run(program: &str, args: &[&str], env: &[(&str, &str)]) -> Ran {
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args).kill_on_drop(true);
    if program == "nbdsh" {
        // nbdsh runs `python3 -m nbd`; the module is Debian's (python3-libnbd), so the system
        // python3 must come first even where another python3 is on PATH.
        let path = std::env::var("PATH").unwrap_or_default();
        cmd.env("PATH", format!("/usr/bin:{path}"));
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = tokio::time::timeout(std::time::Duration::from_secs(120), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("{program} {args:?} timed out"))
        .unwrap_or_else(|e| {
            panic!("cannot run {program} ({e}); scripts/setup.sh installs the NBD client tools")
        });
    Ran {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs a tool that must succeed; returns its stdout.
pub async fn run_ok(program: &str, args: &[&str]) -> String {
    run_ok_env(program, args, &[]).await
}

/// Like [`run_ok`] with extra environment variables.
pub async fn run_ok_env(program: &str, args: &[&str], env: &[(&str, &str)]) -> String {
    let r = run(program, args, env).await;
    assert!(
        r.ok,
        "{program} {args:?} failed:\nstdout: {}\nstderr: {}",
        r.stdout, r.stderr
    );
    r.stdout
}

/// Deterministic bytes with some structure (not all equal), for byte-for-byte comparisons.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Writes `data` to a new file in `dir`.
pub fn file(dir: &Path, name: &str, data: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, data).unwrap();
    p
}

/// A hand-driven NBD client over any stream, for requests real clients never send.
pub struct Raw {
    pub s: Box<dyn RawStream>,
}

pub trait RawStream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> RawStream for T {}

use kagi_nbd::proto;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long a raw client waits for an answer before the test fails.
const RAW_WAIT: std::time::Duration = std::time::Duration::from_secs(20);

impl Raw {
    pub async fn unix(path: &Path) -> Self {
        Self {
            s: Box::new(tokio::net::UnixStream::connect(path).await.unwrap()),
        }
    }

    pub async fn tcp(addr: std::net::SocketAddr) -> Self {
        Self {
            s: Box::new(tokio::net::TcpStream::connect(addr).await.unwrap()),
        }
    }

    pub async fn read_n(&mut self, n: usize) -> std::io::Result<Vec<u8>> {
        let mut buf = vec![0u8; n];
        tokio::time::timeout(RAW_WAIT, self.s.read_exact(&mut buf))
            .await
            .expect("server did not answer")?;
        Ok(buf)
    }

    pub async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.s.write_all(bytes).await?;
        self.s.flush().await
    }

    /// Reads the greeting and answers with fixed newstyle + no zeroes.
    pub async fn greet(&mut self) {
        let g = self.read_n(18).await.unwrap();
        assert_eq!(&g[..16], b"NBDMAGICIHAVEOPT");
        self.send(&3u32.to_be_bytes()).await.unwrap();
    }

    pub async fn option(&mut self, option: u32, data: &[u8]) -> std::io::Result<()> {
        let mut v = proto::IHAVEOPT.to_be_bytes().to_vec();
        v.extend(option.to_be_bytes());
        v.extend((data.len() as u32).to_be_bytes());
        v.extend(data);
        self.send(&v).await
    }

    /// One option reply: (option, reply type, data).
    pub async fn option_reply(&mut self) -> std::io::Result<(u32, u32, Vec<u8>)> {
        let h = self.read_n(20).await?;
        assert_eq!(&h[..8], &proto::OPTION_REPLY_MAGIC.to_be_bytes());
        let option = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let ty = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let data = self.read_n(len as usize).await?;
        Ok((option, ty, data))
    }

    /// Sends `option` and returns its final reply type (after any INFO/SERVER replies).
    pub async fn final_reply(&mut self, option: u32, data: &[u8]) -> u32 {
        self.option(option, data).await.unwrap();
        loop {
            let (_, ty, _) = self.option_reply().await.unwrap();
            if ty == proto::REP_ACK || ty & proto::REP_FLAG_ERROR != 0 {
                return ty;
            }
        }
    }

    /// `NBD_OPT_GO` for `name` (no info requests): the final reply type.
    pub async fn go(&mut self, name: &str) -> u32 {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend(name.as_bytes());
        d.extend(0u16.to_be_bytes());
        self.final_reply(proto::OPT_GO, &d).await
    }

    /// Greeting and GO with simple replies and compact requests.
    pub async fn connect_simple(path: &Path, name: &str) -> Self {
        let mut r = Self::unix(path).await;
        r.greet().await;
        assert_eq!(r.go(name).await, proto::REP_ACK);
        r
    }

    /// A compact request header, with `payload` after it.
    pub async fn request(
        &mut self,
        flags: u16,
        cmd: u16,
        cookie: u64,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> std::io::Result<()> {
        let mut v = proto::REQUEST_MAGIC.to_be_bytes().to_vec();
        v.extend(flags.to_be_bytes());
        v.extend(cmd.to_be_bytes());
        v.extend(cookie.to_be_bytes());
        v.extend(offset.to_be_bytes());
        v.extend(len.to_be_bytes());
        v.extend(payload);
        self.send(&v).await
    }

    /// A simple reply: (error, cookie).
    pub async fn simple_reply(&mut self) -> std::io::Result<(u32, u64)> {
        let h = self.read_n(16).await?;
        assert_eq!(&h[..4], &proto::SIMPLE_REPLY_MAGIC.to_be_bytes());
        Ok((
            u32::from_be_bytes(h[4..8].try_into().unwrap()),
            u64::from_be_bytes(h[8..16].try_into().unwrap()),
        ))
    }

    /// Reads `len` bytes at `offset` (simple replies); panics on an error.
    pub async fn read_at(&mut self, offset: u64, len: u32) -> Vec<u8> {
        self.request(0, proto::CMD_READ, 77, offset, len, &[])
            .await
            .unwrap();
        let (err, cookie) = self.simple_reply().await.unwrap();
        assert_eq!((err, cookie), (0, 77));
        self.read_n(len as usize).await.unwrap()
    }

    /// Whether the server closed the connection (EOF or reset) within the wait.
    pub async fn closed(&mut self) -> bool {
        let mut buf = [0u8; 4096];
        loop {
            match tokio::time::timeout(RAW_WAIT, self.s.read(&mut buf)).await {
                Err(_) => return false,
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => continue,
            }
        }
    }
}
