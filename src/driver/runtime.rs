//! A driver that waits in an async runtime (`Waiting::InRuntime`): its wake set, which holds
//! the fds its ring waits on, and the tokio adapter (`Server::run_async`, `Worker::run_async`).

#[cfg(feature = "tokio")]
use std::os::fd::AsRawFd;
use std::os::fd::{AsFd, RawFd};

use super::Driver;
#[cfg(feature = "tokio")]
use crate::connection::Connection;
use crate::error::Error;
#[cfg(feature = "tokio")]
use crate::machine::ExitReason;
use crate::wake_set::{Source, WakeSet};

impl Driver {
    /// The fd a runtime polls for readability to know when to turn (the wake set's epoll fd);
    /// `None` for a driver made to wait in the ring.
    pub(crate) fn readiness_fd(&self) -> Option<RawFd> {
        self.wake_set.as_ref().map(WakeSet::fd)
    }

    /// Puts into the wake set (if any) every fd the ring is about to wait on: before the ring
    /// arms its first op on them, as `wake_set.rs` requires. Listeners join when their first
    /// accepting op is armed (`watch_listener`).
    pub(super) fn watch_initial(&self) -> Result<(), Error> {
        let Some(set) = &self.wake_set else {
            return Ok(());
        };
        let watch = |fd: std::os::fd::BorrowedFd<'_>, source| {
            set.add(fd, source)
                .map_err(Error::io("adding to the wake set"))
        };
        watch(self.wake_fd(), Source::Other)?;
        if let Some(fd) = &self.signalfd {
            watch(fd.as_fd(), Source::Other)?;
        }
        if let Some(link) = &self.predecessor {
            watch(link.channel.as_fd(), Source::Other)?;
        }
        Ok(())
    }

    /// Adds `fd` to the wake set, if any; a failure (no memory, the user's epoll watch limit)
    /// is logged: the fd's events are then seen at the next wake-up of another kind, at the
    /// latest at the next deadline.
    pub(super) fn watch(&self, fd: std::os::fd::BorrowedFd<'_>) {
        if let Some(set) = &self.wake_set {
            if let Err(e) = set.add(fd, Source::Other) {
                tracing::error!(error = %e, "adding an fd to the wake set");
            }
        }
    }

    /// Listener `i` wakes the runtime from now on: called right before an op that waits on it
    /// is armed (a multishot accept, a takeover poll), so the wake set's order holds for every
    /// path that arms one. Listeners wake the runtime while this driver accepts, and only then
    /// (`unwatch_listeners` when it stops): a draining process is not woken for connections its
    /// successor takes. Added once (a syscall per listener is what a process with thousands
    /// pays).
    pub(super) fn watch_listener(&self, i: usize) {
        let (Some(set), slot) = (&self.wake_set, &self.accepts[i]) else {
            return;
        };
        if slot.watched.get() {
            return;
        }
        match set.add(slot.listener.fd.as_fd(), Source::Listener(i)) {
            Ok(()) => slot.watched.set(true),
            Err(e) => {
                tracing::error!(listener = %slot.listener.name, error = %e, "adding a listener to the wake set");
            }
        }
    }

    pub(super) fn unwatch_listeners(&self) {
        let Some(set) = &self.wake_set else { return };
        for slot in self.accepts.iter().filter(|s| s.watched.get()) {
            set.remove(slot.listener.fd.as_fd());
            slot.watched.set(false);
        }
    }
}

/// Starts `driver` (prepared) and drives it as a task of the current tokio runtime until it
/// exits: see
/// [`Server::run_async`]. The runtime's reactor watches one fd, the driver's wake set (an epoll
/// instance holding the fds the ring waits on; `wake_set.rs` says why not the ring's eventfd).
///
/// [`Server::run_async`]: crate::Server::run_async
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
