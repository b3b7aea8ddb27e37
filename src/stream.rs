//! The socket of an accepted connection, typed by the kind of listener that accepted it:
//! [`Socket`] (std, blocking) and [`TokioStream`] (tokio). Both travel inside a
//! [`Guarded`](crate::connection::Guarded), which holds the connection's drain guard.

use std::io::{self, IoSlice, Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

/// A connection's socket as a std stream (blocking mode), TCP or Unix by its listener.
#[derive(Debug)]
pub enum Socket {
    /// From a TCP listener.
    Tcp(TcpStream),
    /// From a Unix listener (path or abstract).
    Unix(UnixStream),
}

impl Socket {
    pub(crate) fn new(fd: OwnedFd, unix: bool) -> Socket {
        if unix {
            Socket::Unix(UnixStream::from(fd))
        } else {
            Socket::Tcp(TcpStream::from(fd))
        }
    }

    /// Another handle to the same socket (for a reader and a writer on two threads). The
    /// drain guard stays with the [`Guarded`](crate::Guarded) this came from: keep that alive.
    pub fn try_clone(&self) -> io::Result<Socket> {
        Ok(match self {
            Socket::Tcp(s) => Socket::Tcp(s.try_clone()?),
            Socket::Unix(s) => Socket::Unix(s.try_clone()?),
        })
    }

    /// Shuts down the read, write or both halves.
    pub fn shutdown(&self, how: std::net::Shutdown) -> io::Result<()> {
        match self {
            Socket::Tcp(s) => s.shutdown(how),
            Socket::Unix(s) => s.shutdown(how),
        }
    }
}

impl Read for Socket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Socket::Tcp(s) => s.read(buf),
            Socket::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Socket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Socket::Tcp(s) => s.write(buf),
            Socket::Unix(s) => s.write(buf),
        }
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Socket::Tcp(s) => s.write_vectored(bufs),
            Socket::Unix(s) => s.write_vectored(bufs),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(()) // sockets are unbuffered
    }
}

impl AsFd for Socket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Socket::Tcp(s) => s.as_fd(),
            Socket::Unix(s) => s.as_fd(),
        }
    }
}

impl AsRawFd for Socket {
    fn as_raw_fd(&self) -> RawFd {
        self.as_fd().as_raw_fd()
    }
}

impl From<Socket> for OwnedFd {
    fn from(socket: Socket) -> OwnedFd {
        match socket {
            Socket::Tcp(s) => s.into(),
            Socket::Unix(s) => s.into(),
        }
    }
}

#[cfg(feature = "tokio")]
pub use tokio_stream::TokioStream;

#[cfg(feature = "tokio")]
mod tokio_stream {
    use std::io::{self, IoSlice};
    use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
    use tokio::net::{TcpStream, UnixStream};

    use super::Socket;

    /// A connection's socket as a tokio stream, TCP or Unix by its listener. Read and write it
    /// as either (`AsyncRead`, `AsyncWrite`), or match on it for what only one kind has.
    #[derive(Debug)]
    pub enum TokioStream {
        /// From a TCP listener.
        Tcp(TcpStream),
        /// From a Unix listener (path or abstract).
        Unix(UnixStream),
    }

    impl TokioStream {
        /// Registers `socket` with the current tokio runtime (non-blocking mode).
        pub(crate) fn from_socket(socket: Socket) -> io::Result<TokioStream> {
            Ok(match socket {
                Socket::Tcp(s) => {
                    s.set_nonblocking(true)?;
                    TokioStream::Tcp(TcpStream::from_std(s)?)
                }
                Socket::Unix(s) => {
                    s.set_nonblocking(true)?;
                    TokioStream::Unix(UnixStream::from_std(s)?)
                }
            })
        }

        /// The peer's address, if it is a TCP peer.
        pub fn peer_addr(&self) -> Option<std::net::SocketAddr> {
            match self {
                TokioStream::Tcp(s) => s.peer_addr().ok(),
                TokioStream::Unix(_) => None,
            }
        }
    }

    macro_rules! each {
        ($self:ident, $s:ident => $e:expr) => {
            match $self.get_mut() {
                TokioStream::Tcp($s) => {
                    let $s = Pin::new($s);
                    $e
                }
                TokioStream::Unix($s) => {
                    let $s = Pin::new($s);
                    $e
                }
            }
        };
    }

    impl AsyncRead for TokioStream {
        fn poll_read(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            each!(self, s => s.poll_read(cx, buf))
        }
    }

    impl AsyncWrite for TokioStream {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            each!(self, s => s.poll_write(cx, buf))
        }

        fn poll_write_vectored(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            each!(self, s => s.poll_write_vectored(cx, bufs))
        }

        fn is_write_vectored(&self) -> bool {
            match self {
                TokioStream::Tcp(s) => s.is_write_vectored(),
                TokioStream::Unix(s) => s.is_write_vectored(),
            }
        }

        fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            each!(self, s => s.poll_flush(cx))
        }

        fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            each!(self, s => s.poll_shutdown(cx))
        }
    }

    impl AsFd for TokioStream {
        fn as_fd(&self) -> BorrowedFd<'_> {
            match self {
                TokioStream::Tcp(s) => s.as_fd(),
                TokioStream::Unix(s) => s.as_fd(),
            }
        }
    }

    impl AsRawFd for TokioStream {
        fn as_raw_fd(&self) -> RawFd {
            self.as_fd().as_raw_fd()
        }
    }
}
