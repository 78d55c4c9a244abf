//! What every part of the server shares: its limits ([`Config`]) and its state.

use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::export::ExportResolver;

/// Limits and timeouts of a server.
#[derive(Debug, Clone)]
pub struct Config {
    /// Options a client may send in one handshake before it is disconnected.
    pub max_options: u32,
    /// Longest option data accepted; a longer option gets `NBD_REP_ERR_TOO_BIG` and a
    /// disconnect.
    pub max_option_len: u32,
    /// Queries accepted in one meta context option (more get `NBD_REP_ERR_TOO_BIG`).
    pub max_meta_queries: u32,
    /// Largest payload of one request (advertised as the maximum block size, capped by the
    /// device's own maximum). Larger writes get `EINVAL`; payloads up to twice this are read
    /// and dropped so the connection stays in sync, larger ones end the connection.
    pub max_payload: u32,
    /// Requests of one connection handled at the same time.
    pub max_in_flight: usize,
    /// Bytes of read and write payloads of one connection held at the same time.
    pub max_in_flight_bytes: usize,
    /// Time a client has from connecting to entering transmission.
    pub handshake_timeout: Duration,
    /// Time in-flight requests get to finish when a connection ends (client disconnect, export
    /// disconnect, server shutdown) before they are abandoned.
    pub drain_timeout: Duration,
    /// Time to pass a connection on to the server an export lives on
    /// ([`ExportResolver::upstream`]): connecting, TLS and replaying the handshake. Past it the
    /// client gets an error naming the upstream.
    pub forward_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            max_options: 64,
            max_option_len: 64 * 1024,
            max_meta_queries: 128,
            max_payload: 32 << 20,
            max_in_flight: 64,
            max_in_flight_bytes: 128 << 20,
            handshake_timeout: Duration::from_secs(30),
            drain_timeout: Duration::from_secs(10),
            forward_timeout: Duration::from_secs(5),
        }
    }
}

/// The state of one server, shared by its listeners and connections.
pub(crate) struct Shared {
    pub(crate) resolver: Arc<dyn ExportResolver>,
    pub(crate) config: Config,
    pub(crate) shutdown: CancellationToken,
    pub(crate) tracker: TaskTracker,
    pub(crate) connections: AtomicUsize,
}
