//! The transmission phase: requests read in order, handled concurrently, replies written as
//! they complete.
//!
//! Ordering: the reader sees requests in the client's order and makes each one wait for the
//! earlier in-flight requests it conflicts with: a write (WRITE, TRIM, WRITE_ZEROES) waits for
//! earlier overlapping reads and writes, a read or block status for earlier overlapping
//! writes, a flush for every earlier write. Everything else runs at once.

use std::io::IoSlice;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::device::{BlockDevice, BlockSizes, DeviceError, Errno, ReadData, ZeroFlags};
use crate::handshake::{BASE_ALLOCATION_ID, Session};
use crate::proto::{self, ReplyStyle, Request};
use crate::shared::Shared;
use crate::transport::WritePart;

/// One reply: its header bytes and, for reads, the data (written without copying it).
struct Reply {
    head: Vec<u8>,
    data: Option<Vec<u8>>,
}

/// A validated request.
enum Op {
    Read { len: u32 },
    Write { data: Vec<u8>, fua: bool },
    Flush,
    Trim { len: u64, fua: bool },
    Zero { len: u64, flags: ZeroFlags },
    BlockStatus { len: u64, req_one: bool },
    Cache { len: u64 },
}

/// How a request conflicts with others.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Read,
    Write,
    Flush,
    Other,
}

/// An in-flight request the reader still knows about.
struct InFlight {
    start: u64,
    end: u64,
    kind: Kind,
    done: CancellationToken,
}

/// Per-connection facts every request handler needs.
struct Conn {
    device: Arc<dyn BlockDevice>,
    style: ReplyStyle,
    size: u64,
    sizes: BlockSizes,
    meta_context: bool,
    extended: bool,
}

/// Byte budget unit (KiB), so one request's permits fit the semaphore's u32 count.
const BUDGET_UNIT: u64 = 1024;

pub(crate) async fn run(shared: &Shared, session: Session) {
    let Session {
        stream,
        export,
        style,
        extended,
        meta_context,
        size,
        sizes,
    } = session;
    let config = &shared.config;
    let conn = Arc::new(Conn {
        device: export.device.clone(),
        style,
        size,
        sizes,
        meta_context,
        extended,
    });
    let (rd, wr) = stream.into_halves();
    let mut rd = BufReader::with_capacity(64 * 1024, rd);
    let (tx, rx) = mpsc::channel::<Reply>(config.max_in_flight * 2);
    let writer_dead = CancellationToken::new();
    let mut writer = tokio::spawn(write_replies(wr, rx, writer_dead.clone()));
    let slots = Arc::new(Semaphore::new(config.max_in_flight));
    let budget_units =
        (config.max_in_flight_bytes as u64 / BUDGET_UNIT).min(u64::from(u32::MAX)) as u32;
    let budget = Arc::new(Semaphore::new(budget_units as usize));
    let mut tasks = JoinSet::new();
    let mut inflight: Vec<InFlight> = Vec::new();
    let header_len = proto::request_header_len(extended);
    let stop = Stop {
        tokens: [&shared.shutdown, &export.disconnect, &writer_dead],
    };

    loop {
        while tasks.try_join_next().is_some() {}
        let mut header = [0u8; proto::EXTENDED_REQUEST_LEN];
        match stop.until(rd.read_exact(&mut header[..header_len])).await {
            Some(Ok(_)) => {}
            _ => break,
        }
        let req = match proto::parse_request(&header[..header_len], extended) {
            Ok(r) => r,
            Err(e) => {
                // Without a valid header we cannot find the next one: hang up.
                tracing::debug!(error = %e, "NBD bad request header");
                break;
            }
        };
        if req.command == proto::CMD_DISC {
            break;
        }
        let Some(Ok(slot)) = stop.until(slots.clone().acquire_owned()).await else {
            break;
        };

        // Read (or drop) the payload first, so the stream stays in sync whatever the answer.
        let payload_len = req.payload_len(extended);
        let mut payload = None;
        let mut payload_permit = None;
        if payload_len > 0 {
            let max = u64::from(conn.sizes.maximum);
            if req.command != proto::CMD_WRITE || payload_len > max {
                let error = if req.command == proto::CMD_WRITE {
                    "write larger than the maximum payload"
                } else {
                    "this command takes no payload"
                };
                let reply = error_reply(&conn, &req, &inval(error));
                if payload_len > 2 * max {
                    // Draining gigabytes is what a hostile client wants: answer and hang up.
                    let _ = stop.until(tx.send(reply)).await;
                    break;
                }
                if !matches!(stop.until(drain(&mut rd, payload_len)).await, Some(Ok(()))) {
                    break;
                }
                if !matches!(stop.until(tx.send(reply)).await, Some(Ok(()))) {
                    break;
                }
                continue;
            }
            let Some(Ok(permit)) = stop.until(acquire_budget(&budget, payload_len)).await else {
                break;
            };
            payload_permit = Some(permit);
            // Read into spare capacity: the payload is not zero-filled first.
            let mut data = Vec::with_capacity(payload_len as usize);
            let mut body = (&mut rd).take(payload_len);
            let read = stop.until(body.read_to_end(&mut data)).await;
            if !matches!(read, Some(Ok(n)) if n as u64 == payload_len) {
                break;
            }
            payload = Some(data);
        }

        let op = match validate(&conn, &req, payload) {
            Ok(op) => op,
            Err(e) => {
                if !matches!(
                    stop.until(tx.send(error_reply(&conn, &req, &e))).await,
                    Some(Ok(()))
                ) {
                    break;
                }
                continue;
            }
        };
        let read_permit = match &op {
            Op::Read { len } => match stop.until(acquire_budget(&budget, u64::from(*len))).await {
                Some(Ok(p)) => Some(p),
                _ => break,
            },
            _ => None,
        };

        // Find what this request must wait for, and register it.
        let (start, end, kind) = extent_of(&req, &op);
        inflight.retain(|f| !f.done.is_cancelled());
        let waits: Vec<CancellationToken> = inflight
            .iter()
            .filter(|f| conflicts(kind, start, end, f))
            .map(|f| f.done.clone())
            .collect();
        let done = CancellationToken::new();
        if kind != Kind::Other {
            inflight.push(InFlight {
                start,
                end,
                kind,
                done: done.clone(),
            });
        }
        let guard = done.drop_guard();
        let conn = conn.clone();
        let tx = tx.clone();
        let counted = export.requests.clone().map(Counted::new);
        tasks.spawn(async move {
            let _permits = (slot, payload_permit, read_permit, counted);
            for w in waits {
                w.cancelled().await;
            }
            let reply = execute(&conn, &req, op, guard).await;
            let _ = tx.send(reply).await;
        });
    }

    // Answer what is in flight, then close (the writer ends when every sender is gone). A
    // device or client that does not let this finish in time is abandoned.
    let finish = async {
        while tasks.join_next().await.is_some() {}
        drop(tx);
        let _ = (&mut writer).await;
    };
    if tokio::time::timeout(config.drain_timeout, finish)
        .await
        .is_err()
    {
        tasks.abort_all();
        writer.abort();
    }
}

/// A request counted in its export's `requests` while it exists (until its reply is sent).
struct Counted(Arc<tokio::sync::watch::Sender<usize>>);

impl Counted {
    fn new(counter: Arc<tokio::sync::watch::Sender<usize>>) -> Self {
        counter.send_modify(|n| *n += 1);
        Self(counter)
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// Tokens that end a connection: server shutdown, export disconnect, a dead writer.
struct Stop<'a> {
    tokens: [&'a CancellationToken; 3],
}

impl Stop<'_> {
    /// Runs `f` unless the connection is told to stop first (`None` then).
    async fn until<F: std::future::Future>(&self, f: F) -> Option<F::Output> {
        let [a, b, c] = self.tokens;
        tokio::select! {
            biased;
            _ = a.cancelled() => None,
            _ = b.cancelled() => None,
            _ = c.cancelled() => None,
            r = f => Some(r),
        }
    }
}

/// Reserves `len` bytes of the connection's in-flight budget.
async fn acquire_budget(budget: &Arc<Semaphore>, len: u64) -> Result<OwnedSemaphorePermit, ()> {
    let units = len.div_ceil(BUDGET_UNIT).max(1);
    let units = u32::try_from(units).map_err(|_| ())?;
    budget
        .clone()
        .acquire_many_owned(units)
        .await
        .map_err(|_| ())
}

/// Reads and drops `len` bytes.
async fn drain<R: tokio::io::AsyncRead + Unpin>(rd: &mut R, len: u64) -> std::io::Result<()> {
    let copied = tokio::io::copy(&mut rd.take(len), &mut tokio::io::sink()).await?;
    if copied < len {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

fn inval(message: &str) -> DeviceError {
    DeviceError::with_message(Errno::Inval, message)
}

/// Checks flags, bounds, alignment and permissions; the error is the reply.
fn validate(conn: &Conn, req: &Request, payload: Option<Vec<u8>>) -> Result<Op, DeviceError> {
    let fua = req.flags & proto::CMD_FLAG_FUA != 0;
    let allowed = proto::CMD_FLAG_FUA
        | match req.command {
            proto::CMD_READ => proto::CMD_FLAG_DF,
            proto::CMD_WRITE if conn.extended => proto::CMD_FLAG_PAYLOAD_LEN,
            proto::CMD_WRITE_ZEROES => proto::CMD_FLAG_NO_HOLE | proto::CMD_FLAG_FAST_ZERO,
            proto::CMD_BLOCK_STATUS => proto::CMD_FLAG_REQ_ONE,
            _ => 0,
        };
    if req.flags & !allowed != 0 {
        return Err(inval("command flags not valid for this command"));
    }
    let len = req.length;
    let writes = matches!(
        req.command,
        proto::CMD_WRITE | proto::CMD_TRIM | proto::CMD_WRITE_ZEROES
    );
    if writes && conn.device.read_only() {
        return Err(DeviceError::with_message(
            Errno::Perm,
            "the export is read-only",
        ));
    }
    if req.command != proto::CMD_FLUSH {
        let beyond = req
            .offset
            .checked_add(len)
            .is_none_or(|end| end > conn.size);
        if beyond {
            let errno = if matches!(req.command, proto::CMD_WRITE | proto::CMD_WRITE_ZEROES) {
                Errno::NoSpc
            } else {
                Errno::Inval
            };
            return Err(DeviceError::with_message(
                errno,
                "request beyond the end of the export",
            ));
        }
        let min = u64::from(conn.sizes.minimum.max(1));
        if !req.offset.is_multiple_of(min) || !len.is_multiple_of(min) {
            return Err(inval("request not aligned to the minimum block size"));
        }
    }
    let max = u64::from(conn.sizes.maximum);
    match req.command {
        proto::CMD_READ => {
            if len > max {
                return Err(inval("read larger than the maximum payload"));
            }
            Ok(Op::Read { len: len as u32 })
        }
        proto::CMD_WRITE => match payload {
            Some(data) => Ok(Op::Write { data, fua }),
            // A write of length 0.
            None => Ok(Op::Write {
                data: Vec::new(),
                fua,
            }),
        },
        proto::CMD_FLUSH => Ok(Op::Flush),
        proto::CMD_TRIM => Ok(Op::Trim { len, fua }),
        proto::CMD_WRITE_ZEROES => Ok(Op::Zero {
            len,
            flags: ZeroFlags {
                fua,
                no_hole: req.flags & proto::CMD_FLAG_NO_HOLE != 0,
                fast: req.flags & proto::CMD_FLAG_FAST_ZERO != 0,
            },
        }),
        proto::CMD_BLOCK_STATUS => {
            if !conn.meta_context {
                return Err(inval("no metadata context was negotiated"));
            }
            if len == 0 {
                return Err(inval("block status of length 0"));
            }
            Ok(Op::BlockStatus {
                len,
                req_one: req.flags & proto::CMD_FLAG_REQ_ONE != 0,
            })
        }
        proto::CMD_CACHE => Ok(Op::Cache { len }),
        _ => Err(inval("unknown command")),
    }
}

fn extent_of(req: &Request, op: &Op) -> (u64, u64, Kind) {
    let (len, kind) = match op {
        Op::Read { len } => (u64::from(*len), Kind::Read),
        Op::BlockStatus { len, .. } => (*len, Kind::Read),
        Op::Write { data, .. } => (data.len() as u64, Kind::Write),
        Op::Trim { len, .. } | Op::Zero { len, .. } => (*len, Kind::Write),
        Op::Flush => (0, Kind::Flush),
        Op::Cache { .. } => (0, Kind::Other),
    };
    (req.offset, req.offset.saturating_add(len), kind)
}

/// Whether a new request of `kind` over `[start, end)` must wait for in-flight `f`.
fn conflicts(kind: Kind, start: u64, end: u64, f: &InFlight) -> bool {
    let overlap = start < f.end && f.start < end;
    match (kind, f.kind) {
        (Kind::Flush, Kind::Write) => true,
        (Kind::Write, Kind::Write | Kind::Read) | (Kind::Read, Kind::Write) => overlap,
        _ => false,
    }
}

/// Runs one request on the device and builds its reply. `done` is dropped as soon as the
/// device has finished, releasing requests that wait for this one.
async fn execute(conn: &Conn, req: &Request, op: Op, done: DropGuard) -> Reply {
    let dev = &conn.device;
    let offset = req.offset;
    let result = match op {
        Op::Read { len } => {
            let r = if len == 0 {
                Ok(ReadData::Data(Vec::new()))
            } else {
                dev.read(offset, len).await
            };
            drop(done);
            return match r {
                Ok(data) => read_reply(conn, req, len, data),
                Err(e) => error_reply(conn, req, &e),
            };
        }
        Op::Write { data, fua } => {
            if data.is_empty() {
                Ok(())
            } else {
                dev.write(offset, data, fua).await
            }
        }
        Op::Flush => dev.flush().await,
        Op::Trim { len, fua } if len > 0 => dev.trim(offset, len, fua).await,
        Op::Zero { len, flags } if len > 0 => dev.write_zeroes(offset, len, flags).await,
        Op::Trim { .. } | Op::Zero { .. } => Ok(()),
        Op::Cache { len } => dev.cache(offset, len).await,
        Op::BlockStatus { len, req_one } => {
            let r = dev.block_status(offset, len).await;
            drop(done);
            return match r {
                Ok(extents) => {
                    let descriptors = clip_extents(&extents, len, req_one);
                    Reply {
                        head: proto::encode_block_status(
                            conn.style,
                            req.cookie,
                            offset,
                            BASE_ALLOCATION_ID,
                            &descriptors,
                        ),
                        data: None,
                    }
                }
                Err(e) => error_reply(conn, req, &e),
            };
        }
    };
    drop(done);
    match result {
        Ok(()) => ok_reply(conn, req),
        Err(e) => error_reply(conn, req, &e),
    }
}

/// Most descriptors sent in one block status reply.
const MAX_DESCRIPTORS: usize = 1 << 16;

/// Turns the device's extents into descriptors the protocol allows: nonzero lengths, none past
/// the requested length, one only with REQ_ONE, at least one.
fn clip_extents(extents: &[crate::device::Extent], len: u64, req_one: bool) -> Vec<(u64, u32)> {
    let mut out = Vec::new();
    let mut covered = 0u64;
    for e in extents {
        if covered >= len || out.len() >= MAX_DESCRIPTORS {
            break;
        }
        let length = e.length.min(len - covered);
        if length == 0 {
            continue;
        }
        let flags = e.flags();
        match out.last_mut() {
            Some((l, f)) if *f == flags => *l += length,
            _ => out.push((length, flags)),
        }
        covered += length;
        if req_one {
            break;
        }
    }
    if req_one {
        out.truncate(1);
    }
    if out.is_empty() {
        out.push((len, 0));
    }
    out
}

fn read_reply(conn: &Conn, req: &Request, len: u32, data: ReadData) -> Reply {
    let data = match data {
        ReadData::Data(d) if d.len() != len as usize => {
            return error_reply(conn, req, &DeviceError::io("device returned a short read"));
        }
        ReadData::Zeroes if conn.style != ReplyStyle::Simple && len > 0 => {
            return Reply {
                head: proto::encode_offset_hole(
                    conn.style, req.cookie, req.offset, req.offset, len, true,
                ),
                data: None,
            };
        }
        ReadData::Zeroes => vec![0u8; len as usize],
        ReadData::Data(d) => d,
    };
    let head = match conn.style {
        ReplyStyle::Simple => proto::encode_simple_reply(req.cookie, 0).to_vec(),
        _ if data.is_empty() => proto::encode_none_chunk(conn.style, req.cookie, req.offset),
        style => proto::encode_offset_data_header(
            style,
            req.cookie,
            req.offset,
            req.offset,
            data.len() as u64,
            true,
        ),
    };
    Reply {
        head,
        data: Some(data),
    }
}

fn ok_reply(conn: &Conn, req: &Request) -> Reply {
    let head = match conn.style {
        // A simple reply is allowed (and shorter) when structured replies are on.
        ReplyStyle::Simple | ReplyStyle::Structured => {
            proto::encode_simple_reply(req.cookie, 0).to_vec()
        }
        ReplyStyle::Extended => proto::encode_none_chunk(conn.style, req.cookie, req.offset),
    };
    Reply { head, data: None }
}

fn error_reply(conn: &Conn, req: &Request, e: &DeviceError) -> Reply {
    let code = e.errno.code();
    let head = match conn.style {
        ReplyStyle::Simple => proto::encode_simple_reply(req.cookie, code).to_vec(),
        style => proto::encode_error_chunk(
            style,
            req.cookie,
            req.offset,
            code,
            e.message.as_deref().unwrap_or(""),
        ),
    };
    Reply { head, data: None }
}

/// Writes replies as they come, several per system call when they queue up.
async fn write_replies(mut wr: WritePart, mut rx: mpsc::Receiver<Reply>, dead: CancellationToken) {
    let mut batch = Vec::new();
    while let Some(first) = rx.recv().await {
        batch.push(first);
        while batch.len() < 64 {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        let mut slices = Vec::with_capacity(batch.len() * 2);
        for r in &batch {
            slices.push(IoSlice::new(&r.head));
            if let Some(d) = &r.data
                && !d.is_empty()
            {
                slices.push(IoSlice::new(d));
            }
        }
        let written = write_all_vectored(&mut wr, &mut slices).await;
        drop(slices);
        batch.clear();
        if written.is_err() || wr.flush().await.is_err() {
            dead.cancel();
            return;
        }
    }
    let _ = wr.shutdown().await;
}

async fn write_all_vectored<W: AsyncWrite + Unpin>(
    w: &mut W,
    mut bufs: &mut [IoSlice<'_>],
) -> std::io::Result<()> {
    while !bufs.is_empty() {
        let n = w.write_vectored(bufs).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut bufs, n);
    }
    Ok(())
}
