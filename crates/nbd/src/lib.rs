//! kagi-nbd: an NBD (Network Block Device) server, generic over a block device.
//!
//! A storage service implements [`BlockDevice`] for what it serves and [`ExportResolver`] to
//! map the export name a client asks for to an [`Export`] (or a [`Refusal`]); [`NbdServer`]
//! does the rest: fixed newstyle handshake with `NBD_OPT_GO`/`INFO`, `EXPORT_NAME`, `LIST`,
//! structured replies, extended headers, `base:allocation` block status and `STARTTLS`; reads,
//! writes, flush, trim, write zeroes, block status and cache, several in flight per
//! connection; Unix and TCP listeners, TLS on TCP; disconnecting one export's clients and a
//! graceful shutdown. [`proto`] is the wire format without I/O. See docs/NBD.md.
//!
//! ```no_run
//! # use std::sync::Arc;
//! # use kagi_nbd::{Config, ExportResolver, NbdServer};
//! # async fn run(resolver: Arc<dyn ExportResolver>) -> Result<(), kagi_nbd::ServerError> {
//! let server = NbdServer::new(resolver, Config::default())?;
//! server.listen_unix("/run/kagi/nbd.sock").await?;
//! // ... later
//! server.shutdown().await;
//! # Ok(()) }
//! ```

#![forbid(unsafe_code)]

mod device;
mod export;
mod forward;
mod handshake;
pub mod proto;
mod server;
mod shared;
mod transmission;
mod transport;

pub use device::{BlockDevice, BlockSizes, DeviceError, Errno, Extent, ReadData, ZeroFlags};
pub use export::{
    ClientInfo, Export, ExportListing, ExportResolver, Refusal, Upstream, UpstreamTls,
};
/// The TLS library of [`NbdServer::listen_tcp`]'s configuration.
pub use rustls;
pub use server::{Config, NbdServer, ServerError};
pub use tokio_util::sync::CancellationToken;
