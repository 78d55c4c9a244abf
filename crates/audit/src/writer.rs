//! The writer: one thread owns `audit.jsonl`, appends batches and `fdatasync`s once per batch.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::chain::{GENESIS_HASH, check_line, seal_line, sha256_hex};
use crate::record::AuditRecord;

/// The audit directory under the data directory.
pub const AUDIT_DIR: &str = "audit";
/// The audit file in [`AUDIT_DIR`].
pub const AUDIT_FILE: &str = "audit.jsonl";
/// Fault injection for tests: when this environment variable names a path and that path
/// exists, the writer treats every write (and every reopen) as failed. Inert unless set.
pub const FAIL_FILE_ENV: &str = "KAGI_AUDIT_FAIL_FILE";
/// Environment variable overriding [`AuditConfig::ack_timeout`], in milliseconds.
pub const ACK_TIMEOUT_ENV: &str = "KAGI_AUDIT_TIMEOUT_MS";
/// Environment variable overriding [`AuditConfig::reserve`], in bytes (tests use a small one).
pub const RESERVE_ENV: &str = "KAGI_AUDIT_RESERVE_BYTES";
/// Default [`AuditConfig::reserve`]: room for well over a thousand records of the largest size.
pub const DEFAULT_RESERVE: u64 = 32 * 1024 * 1024;
/// The most bytes one record takes on disk (its URLs and ids are bounded, and even with every
/// character escaped a line stays under this): what each admitted request holds of the reserve.
pub const MAX_RECORD_BYTES: u64 = 24 * 1024;

/// How the writer behaves.
#[derive(Clone, Debug)]
pub struct AuditConfig {
    /// The longest a caller waits for its record to be acknowledged (default 2 s).
    pub ack_timeout: Duration,
    /// After a failure, how long the writer waits before reopening the file (default 500 ms).
    /// Appends in the meantime fail at once.
    pub retry_delay: Duration,
    /// The most records written and synced together (default 1024).
    pub max_batch: usize,
    /// Fault injection: while this path exists, writes fail (see [`FAIL_FILE_ENV`]).
    pub fail_file: Option<PathBuf>,
    /// Bytes of disk space kept allocated past the end of the file (`fallocate`, size
    /// unchanged), so that the records of requests already let in still fit when the disk
    /// fills up. The log is healthy only while it holds at least half of this: a full disk
    /// stops new requests before the records of admitted ones run out of room.
    pub reserve: u64,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            ack_timeout: Duration::from_secs(2),
            retry_delay: Duration::from_millis(500),
            max_batch: 1024,
            fail_file: None,
            reserve: DEFAULT_RESERVE,
        }
    }
}

impl AuditConfig {
    /// The defaults, with [`FAIL_FILE_ENV`], [`ACK_TIMEOUT_ENV`] and [`RESERVE_ENV`] applied
    /// when set.
    pub fn from_env() -> Self {
        let mut c = Self::default();
        if let Some(p) = std::env::var_os(FAIL_FILE_ENV).filter(|p| !p.is_empty()) {
            c.fail_file = Some(PathBuf::from(p));
        }
        if let Some(ms) = std::env::var(ACK_TIMEOUT_ENV)
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|ms| (1..=600_000).contains(ms))
        {
            c.ack_timeout = Duration::from_millis(ms);
        }
        if let Some(bytes) = std::env::var(RESERVE_ENV)
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|b| (4096..=1 << 30).contains(b))
        {
            c.reserve = bytes;
        }
        c
    }
}

/// Why a record could not be appended, or the log not opened.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuditError {
    /// The file or its directory could not be opened or created.
    #[error("cannot open the audit log {path}: {reason}")]
    Open {
        /// The file.
        path: String,
        /// The cause.
        reason: String,
    },
    /// The last record of the file is not a valid record, so the chain cannot be continued.
    #[error("the audit log {path} cannot be continued: {reason}")]
    Corrupt {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// Writing or syncing failed, or the log is in its failed state.
    #[error("the audit log cannot be written: {0}")]
    Write(String),
    /// No acknowledgement within the configured bound.
    #[error("the audit log did not acknowledge the record within {0:?}")]
    Timeout(Duration),
    /// The writer has stopped.
    #[error("the audit log is closed")]
    Closed,
}

struct Job {
    record: AuditRecord,
    ack: oneshot::Sender<Result<u64, AuditError>>,
}

#[derive(Debug)]
struct Shared {
    healthy: AtomicBool,
    /// Bytes allocated past the end of the file (`u64::MAX` when not known: no reserve, or a
    /// filesystem without `fallocate`).
    headroom: AtomicU64,
    /// Bytes of it promised to admitted requests whose records are not written yet.
    promised: AtomicU64,
    /// Milliseconds since `epoch` (plus one) when the batch being written started; 0 if idle.
    busy_since: AtomicU64,
    epoch: Instant,
    /// Told of every batch written (metrics); set at most once.
    observer: std::sync::OnceLock<Arc<dyn BatchObserver>>,
}

/// What is told of every audit batch written (`kagi server --metrics-listen` counts them).
pub trait BatchObserver: Send + Sync + std::fmt::Debug {
    /// A batch of `records` records was written and `fdatasync`ed in `sync` (write included).
    /// Called on the writer thread: it must not block.
    fn batch_written(&self, records: usize, sync: Duration);
}

impl Shared {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX - 1) + 1
    }
}

/// The append-only, hash-chained audit log of one data directory.
///
/// Cloning is not needed: share it in an `Arc`. Dropping the last handle stops the writer
/// thread once it has written what it was sent.
#[derive(Debug)]
pub struct AuditLog {
    tx: mpsc::Sender<Job>,
    shared: Arc<Shared>,
    ack_timeout: Duration,
    path: PathBuf,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job").finish_non_exhaustive()
    }
}

impl AuditLog {
    /// Opens (creating if needed) `<data_dir>/audit/audit.jsonl` with the default
    /// configuration plus the environment's ([`AuditConfig::from_env`]).
    ///
    /// # Errors
    /// [`AuditError::Open`] if the directory or file cannot be created or opened,
    /// [`AuditError::Corrupt`] if its last record is not valid.
    pub fn open(data_dir: &Path) -> Result<Self, AuditError> {
        Self::open_with(data_dir, AuditConfig::from_env())
    }

    /// Opens the log under `data_dir` with `config`. The chain is continued from the file's
    /// last line; an incomplete last line (a crash in the middle of a write, never
    /// acknowledged) is cut off.
    ///
    /// # Errors
    /// As [`AuditLog::open`].
    pub fn open_with(data_dir: &Path, config: AuditConfig) -> Result<Self, AuditError> {
        let path = data_dir.join(AUDIT_DIR).join(AUDIT_FILE);
        let file = open_file(&path, &config)?;
        let shared = Arc::new(Shared {
            healthy: AtomicBool::new(true),
            headroom: AtomicU64::new(file.headroom()),
            promised: AtomicU64::new(0),
            busy_since: AtomicU64::new(0),
            epoch: Instant::now(),
            observer: std::sync::OnceLock::new(),
        });
        let (tx, rx) = mpsc::channel();
        let writer = Writer {
            rx,
            shared: shared.clone(),
            path: path.clone(),
            config: config.clone(),
        };
        std::thread::Builder::new()
            .name("kagi-audit".into())
            .spawn(move || writer.run(file))
            .map_err(|e| AuditError::Open {
                path: path.display().to_string(),
                reason: format!("cannot start the writer thread: {e}"),
            })?;
        Ok(Self {
            tx,
            shared,
            ack_timeout: config.ack_timeout,
            path,
        })
    }

    /// The file this log appends to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tells `observer` of every batch written from now on. Only the first observer set is
    /// kept; returns whether `observer` is it.
    pub fn set_observer(&self, observer: Arc<dyn BatchObserver>) -> bool {
        self.shared.observer.set(observer).is_ok()
    }

    /// Appends a record and waits until it is on disk (written and `fdatasync`ed with its
    /// batch). Returns the record's sequence number.
    ///
    /// # Errors
    /// [`AuditError::Write`] if the batch could not be written or the log is in its failed
    /// state, [`AuditError::Timeout`] if no acknowledgement came within the configured bound,
    /// [`AuditError::Closed`] if the writer has stopped. In every case the record may not be
    /// in the log, and the request it describes must not be answered as served.
    pub async fn append(&self, record: AuditRecord) -> Result<u64, AuditError> {
        let (ack, rx) = oneshot::channel();
        self.tx
            .send(Job { record, ack })
            .map_err(|_| AuditError::Closed)?;
        match tokio::time::timeout(self.ack_timeout, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(AuditError::Closed),
            Err(_) => Err(AuditError::Timeout(self.ack_timeout)),
        }
    }

    /// Admits one request: the log is healthy and the reserve still has room for its record on
    /// top of those of every request admitted before it and not yet written. `None`: answer 503
    /// before doing any work. Hold the admission until the request's record is appended.
    pub fn admit(&self) -> Option<Admission> {
        if !self.is_healthy() {
            return None;
        }
        let promised = self
            .shared
            .promised
            .fetch_add(MAX_RECORD_BYTES, Ordering::AcqRel)
            + MAX_RECORD_BYTES;
        if promised > self.shared.headroom.load(Ordering::Acquire) {
            self.shared
                .promised
                .fetch_sub(MAX_RECORD_BYTES, Ordering::AcqRel);
            return None;
        }
        Some(Admission(self.shared.clone()))
    }

    /// Whether appends are expected to succeed: false while the writer is in its failed state,
    /// or when the batch being written has taken longer than the acknowledgement bound (a
    /// hung disk). Two atomic loads.
    pub fn is_healthy(&self) -> bool {
        if !self.shared.healthy.load(Ordering::Acquire) {
            return false;
        }
        let busy = self.shared.busy_since.load(Ordering::Acquire);
        busy == 0
            || u128::from(self.shared.now_ms().saturating_sub(busy)) <= self.ack_timeout.as_millis()
    }
}

/// A request's claim on the audit log's reserve ([`AuditLog::admit`]); released when dropped.
#[derive(Debug)]
pub struct Admission(Arc<Shared>);

impl Drop for Admission {
    fn drop(&mut self) {
        self.0
            .promised
            .fetch_sub(MAX_RECORD_BYTES, Ordering::AcqRel);
    }
}

/// The open file and the chain's head.
struct OpenFile {
    file: File,
    /// The last sequence number written (0 when empty).
    seq: u64,
    /// SHA-256 of the last line (the next record's `prevHash`).
    prev: String,
    /// Length of the file after the last complete batch.
    len: u64,
    /// The file offset up to which disk space is allocated (at least `len`).
    reserved_to: u64,
    /// The reserve could not be renewed: new requests are refused, records still written.
    low: bool,
    /// Whether `reserved_to` is real space (`fallocate` worked), so admissions can count on it.
    fallocated: bool,
}

impl OpenFile {
    /// Bytes allocated past the end of the file, as admissions may count on them.
    fn headroom(&self) -> u64 {
        if self.fallocated {
            self.reserved_to.saturating_sub(self.len)
        } else {
            u64::MAX
        }
    }

    /// Tops the space allocated past the end of the file up to `reserve` bytes once less than
    /// half of it is left. A filesystem without `fallocate` gets a probe instead: a block
    /// written and synced to a scratch file, which fails as the log's next write would.
    fn keep_reserve(&mut self, dir: &Path, reserve: u64) -> std::io::Result<()> {
        if reserve == 0 || self.reserved_to.saturating_sub(self.len) >= reserve / 2 {
            return Ok(());
        }
        match rustix::fs::fallocate(
            &self.file,
            rustix::fs::FallocateFlags::KEEP_SIZE,
            self.len,
            reserve,
        ) {
            Ok(()) => {
                self.reserved_to = self.len + reserve;
                self.fallocated = true;
                Ok(())
            }
            Err(e) if e == rustix::io::Errno::OPNOTSUPP || e == rustix::io::Errno::NOSYS => {
                let probe = dir.join(".space-probe");
                let written = File::create(&probe).and_then(|mut f| {
                    f.write_all(&vec![0u8; 64 * 1024])?;
                    f.sync_data()
                });
                let _ = std::fs::remove_file(&probe);
                written
            }
            Err(e) => Err(e.into()),
        }
    }
}

enum State {
    Open(OpenFile),
    Failed { since: Instant },
}

struct Writer {
    rx: mpsc::Receiver<Job>,
    shared: Arc<Shared>,
    path: PathBuf,
    config: AuditConfig,
}

impl Writer {
    fn run(self, file: OpenFile) {
        let mut state = State::Open(file);
        loop {
            let first = match &mut state {
                State::Open(f) if f.low => match self.rx.recv_timeout(self.config.retry_delay) {
                    Ok(j) => j,
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        self.renew_reserve(f);
                        continue;
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => return,
                },
                State::Open(_) => match self.rx.recv() {
                    Ok(j) => j,
                    Err(_) => return,
                },
                State::Failed { since } => {
                    let wait = self.config.retry_delay.saturating_sub(since.elapsed());
                    match self.rx.recv_timeout(wait) {
                        Ok(j) => j,
                        Err(mpsc::RecvTimeoutError::Timeout) => {
                            state = self.reopen();
                            continue;
                        }
                        Err(mpsc::RecvTimeoutError::Disconnected) => return,
                    }
                }
            };
            let mut batch = vec![first];
            while batch.len() < self.config.max_batch.max(1) {
                match self.rx.try_recv() {
                    Ok(j) => batch.push(j),
                    Err(_) => break,
                }
            }
            if let State::Failed { since } = &state
                && since.elapsed() >= self.config.retry_delay
            {
                state = self.reopen();
            }
            match &mut state {
                State::Failed { .. } => {
                    for job in batch {
                        let _ = job.ack.send(Err(AuditError::Write(
                            "the audit log is in a failed state; retrying".into(),
                        )));
                    }
                }
                State::Open(f) => {
                    if let Err(reason) = self.write_batch(f, batch) {
                        tracing::error!(
                            path = %self.path.display(),
                            error = %reason,
                            "audit log write failed; refusing requests until it recovers"
                        );
                        self.shared.healthy.store(false, Ordering::Release);
                        state = State::Failed {
                            since: Instant::now(),
                        };
                    }
                }
            }
        }
    }

    /// Renews the reserve of free space; while it cannot, the log is unhealthy (new requests
    /// are refused) but stays open, writing the records of requests already admitted.
    fn renew_reserve(&self, f: &mut OpenFile) {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        let renewed = f.keep_reserve(dir, self.config.reserve);
        self.shared.headroom.store(f.headroom(), Ordering::Release);
        match renewed {
            Ok(()) if f.low => {
                f.low = false;
                self.shared.healthy.store(true, Ordering::Release);
                tracing::info!(path = %self.path.display(), "audit log has room again");
            }
            Ok(()) => {}
            Err(e) if !f.low => {
                f.low = true;
                self.shared.healthy.store(false, Ordering::Release);
                tracing::error!(
                    path = %self.path.display(),
                    error = %e,
                    "no room to keep the audit log's reserve; refusing requests until there is"
                );
            }
            Err(_) => {}
        }
    }

    fn reopen(&self) -> State {
        match open_file(&self.path, &self.config) {
            Ok(f) => {
                self.shared.headroom.store(f.headroom(), Ordering::Release);
                self.shared.healthy.store(true, Ordering::Release);
                tracing::info!(path = %self.path.display(), seq = f.seq, "audit log writable again");
                State::Open(f)
            }
            Err(e) => {
                tracing::debug!(error = %e, "audit log still not writable");
                State::Failed {
                    since: Instant::now(),
                }
            }
        }
    }

    /// Seals, writes and syncs a batch, then acknowledges each record. On failure every record
    /// of the batch gets the error and the file is cut back to its previous length.
    fn write_batch(&self, f: &mut OpenFile, batch: Vec<Job>) -> Result<(), String> {
        let fail = |batch: Vec<(oneshot::Sender<Result<u64, AuditError>>, u64)>, why: &str| {
            // Unhealthy before anyone hears of the failure, so that no request slips through.
            self.shared.healthy.store(false, Ordering::Release);
            for (ack, _) in batch {
                let _ = ack.send(Err(AuditError::Write(why.to_string())));
            }
        };
        let mut buf = String::with_capacity(batch.len() * 1024);
        let mut seq = f.seq;
        let mut prev = f.prev.clone();
        let mut acks = Vec::with_capacity(batch.len());
        for job in batch {
            match seal_line(&job.record, seq + 1, &prev) {
                Ok(line) => {
                    seq += 1;
                    prev = sha256_hex(line.as_bytes());
                    buf.push_str(&line);
                    buf.push('\n');
                    acks.push((job.ack, seq));
                }
                Err(e) => {
                    let _ = job.ack.send(Err(AuditError::Write(format!(
                        "record not serializable: {e}"
                    ))));
                }
            }
        }
        if acks.is_empty() {
            return Ok(());
        }
        if let Some(trigger) = &self.config.fail_file
            && trigger.exists()
        {
            let why = format!("fault injection: {} exists", trigger.display());
            fail(acks, &why);
            return Err(why);
        }
        self.shared
            .busy_since
            .store(self.shared.now_ms(), Ordering::Release);
        let started = Instant::now();
        let written = f
            .file
            .write_all(buf.as_bytes())
            .and_then(|()| f.file.sync_data());
        self.shared.busy_since.store(0, Ordering::Release);
        match written {
            Ok(()) => {
                if let Some(observer) = self.shared.observer.get() {
                    observer.batch_written(acks.len(), started.elapsed());
                }
                f.seq = seq;
                f.prev = prev;
                f.len += buf.len() as u64;
                f.reserved_to = f.reserved_to.max(f.len);
                // Before anyone hears of these records: if the reserve cannot be renewed (a
                // full disk), new requests are refused from now on, while the records of those
                // already let in still fit in what is left of it.
                self.renew_reserve(f);
                for (ack, s) in acks {
                    let _ = ack.send(Ok(s));
                }
                Ok(())
            }
            Err(e) => {
                // Unacknowledged lines must not stay: cut back to the last complete batch.
                let _ = f.file.set_len(f.len);
                let why = e.to_string();
                fail(acks, &why);
                Err(why)
            }
        }
    }
}

/// Opens the file, creating the directory (0700) and the file (0600), and recovers the chain
/// head from its last line.
fn open_file(path: &Path, config: &AuditConfig) -> Result<OpenFile, AuditError> {
    let open_err = |reason: String| AuditError::Open {
        path: path.display().to_string(),
        reason,
    };
    if let Some(trigger) = &config.fail_file
        && trigger.exists()
    {
        return Err(open_err(format!(
            "fault injection: {} exists",
            trigger.display()
        )));
    }
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| open_err(e.to_string()))?;
        let meta = std::fs::metadata(dir).map_err(|e| open_err(e.to_string()))?;
        if meta.permissions().mode() & 0o077 != 0 {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .map_err(|e| open_err(e.to_string()))?;
        }
    }
    let file = OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| open_err(e.to_string()))?;
    let meta = file.metadata().map_err(|e| open_err(e.to_string()))?;
    if meta.is_file() && meta.permissions().mode() & 0o077 != 0 {
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(|e| open_err(e.to_string()))?;
    }
    let len = if meta.is_file() { meta.len() } else { 0 };
    let (last, complete) = last_line(&file, len).map_err(|e| open_err(e.to_string()))?;
    if complete < len {
        tracing::warn!(
            path = %path.display(),
            bytes = len - complete,
            "audit log ends with an incomplete record (never acknowledged); cutting it off"
        );
        file.set_len(complete)
            .and_then(|()| file.sync_data())
            .map_err(|e| open_err(e.to_string()))?;
    }
    let (seq, prev) = match last {
        None => (0, GENESIS_HASH.to_string()),
        Some(line) => {
            let corrupt = |reason: String| AuditError::Corrupt {
                path: path.display().to_string(),
                reason,
            };
            let text = std::str::from_utf8(&line)
                .map_err(|_| corrupt("the last record is not UTF-8".into()))?;
            let link =
                check_line(text).map_err(|why| corrupt(format!("the last record: {why}")))?;
            (link.seq, sha256_hex(&line))
        }
    };
    let mut open = OpenFile {
        file,
        seq,
        prev,
        len: complete,
        reserved_to: complete,
        low: false,
        fallocated: false,
    };
    // Healthy means the next records fit: opening a file on a full disk succeeds, writing
    // to it does not.
    let dir = path.parent().unwrap_or(Path::new("."));
    open.keep_reserve(dir, config.reserve).map_err(|e| {
        open_err(format!(
            "cannot reserve {} bytes of free space for it: {e}",
            config.reserve
        ))
    })?;
    Ok(open)
}

/// The last complete line of the first `len` bytes of `file` (without its newline), and the
/// length up to and including its newline (0 when there is no complete line).
fn last_line(file: &File, len: u64) -> std::io::Result<(Option<Vec<u8>>, u64)> {
    const CHUNK: u64 = 64 * 1024;
    const LIMIT: u64 = 16 * 1024 * 1024;
    let mut start = len;
    let mut tail: Vec<u8> = Vec::new();
    loop {
        // `tail` holds bytes [start, len).
        let newlines: Vec<usize> = tail
            .iter()
            .enumerate()
            .filter(|(_, b)| **b == b'\n')
            .map(|(i, _)| i)
            .collect();
        let last_nl = newlines.last().copied();
        let prev_nl = newlines.len().checked_sub(2).map(|i| newlines[i]);
        match (last_nl, prev_nl) {
            (Some(end), Some(begin)) => {
                return Ok((Some(tail[begin + 1..end].to_vec()), start + end as u64 + 1));
            }
            (Some(end), None) if start == 0 => {
                return Ok((Some(tail[..end].to_vec()), end as u64 + 1));
            }
            (None, None) if start == 0 => return Ok((None, 0)),
            _ => {}
        }
        if len - start >= LIMIT {
            return Err(std::io::Error::other(
                "no line boundary in the last 16 MiB of the audit log",
            ));
        }
        let from = start.saturating_sub(CHUNK);
        let mut chunk = vec![0u8; usize::try_from(start - from).unwrap_or(0)];
        file.read_exact_at(&mut chunk, from)?;
        chunk.extend_from_slice(&tail);
        tail = chunk;
        start = from;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_line_finds_boundaries() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        type Case<'a> = (&'a [u8], Option<&'a [u8]>, u64);
        let cases: &[Case<'_>] = &[
            (b"", None, 0),
            (b"abc", None, 0),
            (b"abc\n", Some(b"abc"), 4),
            (b"abc\ndef\n", Some(b"def"), 8),
            (b"abc\ndef\ngh", Some(b"def"), 8),
        ];
        for (content, line, complete) in cases {
            std::fs::write(&p, content).unwrap();
            let f = File::open(&p).unwrap();
            let (l, c) = last_line(&f, content.len() as u64).unwrap();
            assert_eq!(l.as_deref(), *line);
            assert_eq!(c, *complete);
        }
        // A long file: the boundary search crosses chunks.
        let mut big = Vec::new();
        for i in 0..20_000 {
            big.extend_from_slice(format!("line number {i}\n").as_bytes());
        }
        std::fs::write(&p, &big).unwrap();
        let f = File::open(&p).unwrap();
        let (l, c) = last_line(&f, big.len() as u64).unwrap();
        assert_eq!(l.as_deref(), Some(&b"line number 19999"[..]));
        assert_eq!(c, big.len() as u64);
    }
}
