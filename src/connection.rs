//! An accepted [`Connection`], its [`DrainGuard`], which keeps the process draining while the
//! connection is served, and [`Guarded`], a stream that owns its guard.

use std::fmt;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;

use crate::shared::Shared;
use crate::stream::Socket;
#[cfg(feature = "tokio")]
use crate::stream::TokioStream;

/// Counts a live connection; the process drains until every guard is dropped.
///
/// Keep it alive as long as the connection is served: it travels inside [`Connection`], then
/// inside the [`Guarded`] stream made from it (or, apart, after [`Connection::into_parts`]).
#[must_use = "the drain ends when the guard is dropped: keep it as long as the connection is served"]
pub struct DrainGuard {
    shared: Arc<Shared>,
}

impl DrainGuard {
    pub(crate) fn new(shared: &Arc<Shared>) -> DrainGuard {
        shared.live.fetch_add(1, SeqCst);
        DrainGuard {
            shared: shared.clone(),
        }
    }
}

impl Drop for DrainGuard {
    fn drop(&mut self) {
        // SeqCst pairs with the driver's `draining.store(true)` then `live.load()`: either the
        // driver sees zero, or this sees `draining` and wakes it. No drain can be missed.
        let was = self.shared.live.fetch_sub(1, SeqCst);
        if (was == 1 && self.shared.draining.load(SeqCst)) || self.shared.accept_paused.load(SeqCst)
        {
            self.shared.wake();
        }
    }
}

impl fmt::Debug for DrainGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DrainGuard").finish_non_exhaustive()
    }
}

/// An accepted connection, with the guard that keeps its process from exiting under it.
#[must_use = "dropping it closes the connection"]
#[derive(Debug)]
pub struct Connection {
    fd: OwnedFd,
    listener: Arc<str>,
    unix: bool,
    guard: DrainGuard,
}

impl Connection {
    pub(crate) fn new(
        fd: OwnedFd,
        listener: Arc<str>,
        unix: bool,
        guard: DrainGuard,
    ) -> Connection {
        Connection {
            fd,
            listener,
            unix,
            guard,
        }
    }

    /// The name of the listener that accepted it.
    pub fn listener(&self) -> &str {
        &self.listener
    }

    /// Whether it came from a Unix listener (else TCP).
    pub fn is_unix(&self) -> bool {
        self.unix
    }

    /// The socket as a std stream (blocking mode), typed by its listener's kind, with the
    /// drain guard inside: the drain waits until the returned value is dropped.
    pub fn into_std(self) -> Guarded<Socket> {
        Guarded {
            stream: Socket::new(self.fd, self.unix),
            guard: self.guard,
        }
    }

    /// The socket as a std `TcpStream` with the drain guard inside, if a TCP listener accepted
    /// it; otherwise the connection back, untouched. For a service whose listeners are all
    /// TCP: `conn.into_tcp().unwrap().map(tokio_uring::net::TcpStream::from_std)`.
    pub fn into_tcp(self) -> Result<Guarded<std::net::TcpStream>, Connection> {
        if self.unix {
            return Err(self);
        }
        Ok(Guarded {
            stream: std::net::TcpStream::from(self.fd),
            guard: self.guard,
        })
    }

    /// The socket as a std `UnixStream` with the drain guard inside, if a Unix listener
    /// accepted it; otherwise the connection back, untouched.
    pub fn into_unix(self) -> Result<Guarded<std::os::unix::net::UnixStream>, Connection> {
        if !self.unix {
            return Err(self);
        }
        Ok(Guarded {
            stream: std::os::unix::net::UnixStream::from(self.fd),
            guard: self.guard,
        })
    }

    /// The socket as a tokio stream (switched to non-blocking mode, registered with the
    /// current runtime: call it inside one), typed by its listener's kind, with the drain
    /// guard inside: the drain waits until the returned value is dropped.
    #[cfg(feature = "tokio")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tokio")))]
    pub fn into_tokio(self) -> std::io::Result<Guarded<TokioStream>> {
        self.into_std().try_map(TokioStream::from_socket)
    }

    /// The bare socket (blocking mode, close-on-exec) and its drain guard, for a runtime this
    /// crate has no type for (tokio-uring, glommio, …); [`Connection::into_std`] then
    /// [`Guarded::map`] keeps them together instead.
    ///
    /// **The pitfall:** the guard is what keeps a replaced process from exiting under the
    /// connection. Bind it to a named variable that lives as long as the socket is served
    /// (`let (fd, _guard) = …`, not `let (fd, _) = …`, nor `.0`): dropped early, the drain
    /// ends while the connection is live and the process exits under it.
    pub fn into_parts(self) -> (OwnedFd, DrainGuard) {
        (self.fd, self.guard)
    }
}

/// A stream that owns its connection's [`DrainGuard`]: a replaced process drains until every
/// `Guarded` is dropped, so the guard cannot be lost while the stream is served. Reads and
/// writes (std or tokio) and derefs to the stream inside.
#[must_use = "dropping it closes the connection"]
#[derive(Debug)]
pub struct Guarded<S> {
    stream: S,
    guard: DrainGuard,
}

impl<S> Guarded<S> {
    /// The same guard around another stream made from this one, e.g. a runtime's stream from
    /// the std socket: `conn.into_std().map(|s| MyRuntimeStream::from(OwnedFd::from(s)))`
    /// (or a `match` on the [`Socket`]'s kind).
    pub fn map<T>(self, f: impl FnOnce(S) -> T) -> Guarded<T> {
        Guarded {
            stream: f(self.stream),
            guard: self.guard,
        }
    }

    /// [`Guarded::map`] with a conversion that can fail (the guard is dropped with the error).
    pub fn try_map<T, E>(self, f: impl FnOnce(S) -> Result<T, E>) -> Result<Guarded<T>, E> {
        Ok(Guarded {
            stream: f(self.stream)?,
            guard: self.guard,
        })
    }

    /// The stream and its guard, apart. Keep the guard as long as the stream is served (see
    /// [`Connection::into_parts`] for the pitfall).
    pub fn into_parts(self) -> (S, DrainGuard) {
        (self.stream, self.guard)
    }
}

impl<S> std::ops::Deref for Guarded<S> {
    type Target = S;
    fn deref(&self) -> &S {
        &self.stream
    }
}

impl<S> std::ops::DerefMut for Guarded<S> {
    fn deref_mut(&mut self) -> &mut S {
        &mut self.stream
    }
}

impl<S: Read> Read for Guarded<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.stream.read(buf)
    }
}

impl<S: Write> Write for Guarded<S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.stream.write(buf)
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        self.stream.write_vectored(bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.stream.flush()
    }
}

impl<S: AsRawFd> AsRawFd for Guarded<S> {
    fn as_raw_fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }
}

#[cfg(feature = "tokio")]
mod tokio_io {
    use std::io;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

    use super::Guarded;

    // `DrainGuard` is `Unpin`, so a `Guarded<S>` is pinned exactly as far as its stream.
    impl<S: AsyncRead + Unpin> AsyncRead for Guarded<S> {
        fn poll_read(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
        }
    }

    impl<S: AsyncWrite + Unpin> AsyncWrite for Guarded<S> {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
        }

        fn poll_write_vectored(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            bufs: &[io::IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
        }

        fn is_write_vectored(&self) -> bool {
            self.stream.is_write_vectored()
        }

        fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().stream).poll_flush(cx)
        }

        fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
        }
    }
}

impl AsRawFd for Connection {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}
