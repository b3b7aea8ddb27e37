//! The driver as a task of a tokio runtime (`Server::run_async`, `Worker::run_async`).

#[cfg(feature = "tokio")]
use std::os::fd::{AsRawFd, RawFd};

#[cfg(feature = "tokio")]
use super::Driver;
#[cfg(feature = "tokio")]
use crate::connection::Connection;
#[cfg(feature = "tokio")]
use crate::error::Error;
#[cfg(feature = "tokio")]
use crate::machine::ExitReason;

/// Starts `driver` (prepared) and drives it as a task of the current tokio runtime until it
/// exits: see
/// [`Server::run_async`](crate::Server::run_async). The runtime's reactor watches one fd, the driver's wake set (an epoll
/// instance holding the fds the ring waits on; `wake_set.rs` says why not the ring's eventfd).
#[cfg(feature = "tokio")]
#[allow(unsafe_code)]
pub(crate) async fn serve_async(
    mut driver: Driver,
    mut on_connection: impl FnMut(Connection),
) -> Result<ExitReason, Error> {
    use tokio::io::unix::AsyncFd;
    use tokio::io::Interest;

    let fd = driver
        .readiness_fd()
        .expect("a driver made with Waiting::InRuntime has a wake set");
    // SAFETY: the wake set's fd stays open while registered: `driver` owns it and, a
    // parameter, is dropped after this local.
    let wake_set = unsafe { AsyncFd::register_with_interest(NotifyFd(fd), Interest::READABLE) }
        .map_err(|e| Error::io("registering with the runtime")(e.into()))?;
    // Only now, with every fallible step behind it: the first accept takes connections.
    driver.start()?;
    loop {
        if let Some(exit) = driver.turn(false, &mut on_connection)? {
            return Ok(exit);
        }
        if driver.has_pending_work() {
            // More deferred completions than one turn runs (or completions posted by this
            // turn's submit): go again, but let the runtime's other tasks (the connections just
            // handed over) run first.
            tokio::task::yield_now().await;
            continue;
        }
        // The next turn drains the wake set first, so a readiness that comes after this
        // clear is a new edge and wakes the runtime again.
        wake_set
            .readable()
            .await
            .map_err(Error::io("polling the wake set"))?
            .clear_ready();
    }
}

#[cfg(feature = "tokio")]
struct NotifyFd(RawFd);

#[cfg(feature = "tokio")]
impl AsRawFd for NotifyFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}
