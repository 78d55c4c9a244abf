//! The byte stream of a connection: a Unix or TCP socket (split into independent halves for
//! transmission), or anything else, TLS included (split through a shared lock).

use std::io::IoSlice;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

/// Any stream a connection may run on.
pub(crate) trait Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Stream for T {}

/// The read side of a connection in transmission.
pub(crate) type ReadPart = Box<dyn AsyncRead + Unpin + Send>;
/// The write side of a connection in transmission.
pub(crate) type WritePart = Box<dyn AsyncWrite + Unpin + Send>;

pub(crate) enum Transport {
    Unix(UnixStream),
    Tcp(TcpStream),
    Other(Box<dyn Stream>),
    /// Placeholder while the stream is handed to the TLS acceptor.
    Closed,
}

impl Transport {
    /// Read and write halves. Sockets split without a lock, so a large reply being written
    /// never stalls the reading of the next request (nor the other way round).
    pub(crate) fn into_halves(self) -> (ReadPart, WritePart) {
        match self {
            Transport::Unix(s) => {
                let (r, w) = s.into_split();
                (Box::new(r), Box::new(w))
            }
            Transport::Tcp(s) => {
                let (r, w) = s.into_split();
                (Box::new(r), Box::new(w))
            }
            other => {
                let (r, w) = tokio::io::split(other);
                (Box::new(r), Box::new(w))
            }
        }
    }
}

/// Calls `$method` on whichever stream `$self` holds; `$closed` when it holds none.
macro_rules! dispatch {
    ($self:ident, $closed:expr, |$s:ident| $call:expr) => {
        match $self.get_mut() {
            Transport::Unix($s) => $call,
            Transport::Tcp($s) => $call,
            Transport::Other($s) => $call,
            Transport::Closed => $closed,
        }
    };
}

fn closed() -> std::io::Error {
    std::io::ErrorKind::NotConnected.into()
}

impl AsyncRead for Transport {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        dispatch!(self, Poll::Ready(Err(closed())), |s| Pin::new(s)
            .poll_read(cx, buf))
    }
}

impl AsyncWrite for Transport {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        dispatch!(self, Poll::Ready(Err(closed())), |s| Pin::new(s)
            .poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        dispatch!(self, Poll::Ready(Err(closed())), |s| Pin::new(s)
            .poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Transport::Unix(s) => s.is_write_vectored(),
            Transport::Tcp(s) => s.is_write_vectored(),
            Transport::Other(s) => s.is_write_vectored(),
            Transport::Closed => false,
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        dispatch!(self, Poll::Ready(Ok(())), |s| Pin::new(s).poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        dispatch!(self, Poll::Ready(Ok(())), |s| Pin::new(s).poll_shutdown(cx))
    }
}
