//! An accepted [`Connection`] and its [`DrainGuard`], which keeps the process draining while
//! the connection is served.

use std::fmt;
use std::net::TcpStream;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;

use crate::shared::Shared;

/// Counts a live connection; the process drains until every guard is dropped.
///
/// Keep it alive as long as the connection is served (it travels inside [`Connection`], or
/// separately after [`Connection::into_parts`]).
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

    /// The socket (blocking mode, close-on-exec) and its drain guard.
    pub fn into_parts(self) -> (OwnedFd, DrainGuard) {
        (self.fd, self.guard)
    }

    /// As a std TCP stream (blocking mode) and its drain guard. For a connection from a TCP
    /// listener.
    pub fn into_tcp(self) -> (TcpStream, DrainGuard) {
        (TcpStream::from(self.fd), self.guard)
    }

    /// As a std Unix stream (blocking mode) and its drain guard. For a connection from a Unix
    /// listener.
    pub fn into_unix(self) -> (std::os::unix::net::UnixStream, DrainGuard) {
        (std::os::unix::net::UnixStream::from(self.fd), self.guard)
    }

    /// As a tokio TCP stream (switched to non-blocking mode) and its drain guard. Must be called
    /// inside a tokio runtime.
    #[cfg(feature = "tokio")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tokio")))]
    pub fn into_tokio(self) -> std::io::Result<(tokio::net::TcpStream, DrainGuard)> {
        let std = TcpStream::from(self.fd);
        std.set_nonblocking(true)?;
        Ok((tokio::net::TcpStream::from_std(std)?, self.guard))
    }
}

impl AsRawFd for Connection {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}
