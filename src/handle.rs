//! [`Handle`] (upgrades and shutdown from any thread) and [`PhaseWatch`].

use std::os::fd::OwnedFd;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::{mpsc, Arc};
use std::time::Duration;

use bytes::Bytes;

use crate::error::{Error, UpgradeError};
use crate::machine::Phase;
use crate::shared::{Request, Shared, UpgradeReply};

/// Triggers upgrades and shutdown of a running [`Server`] from any thread.
///
/// [`Server`]: crate::Server
#[derive(Clone, Debug)]
pub struct Handle {
    shared: Arc<Shared>,
}

impl Handle {
    /// Upgrades to the new binary and waits for the outcome: the new process's pid once it is
    /// READY, or why it failed (this process then keeps serving).
    ///
    /// Blocks the calling thread. On a thread that runs one of the server's rings (the thread
    /// in [`Server::run`], or the runtime thread that awaits `run_async`), which would wait
    /// for itself, it requests nothing and returns [`UpgradeError::OnServerThread`]: inside an
    /// async runtime, use [`Handle::upgrade_async`].
    ///
    /// [`Server::run`]: crate::Server::run
    pub fn upgrade(&self) -> Result<u32, UpgradeError> {
        if self.shared.ring_threads.current_is_one() {
            return Err(UpgradeError::OnServerThread);
        }
        let (tx, rx) = mpsc::channel();
        self.shared
            .request(Request::Upgrade(UpgradeReply::Blocking(tx)));
        rx.recv().unwrap_or(Err(UpgradeError::NotRunning))
    }

    /// [`Handle::upgrade`] for async code: the same request, its outcome awaited without
    /// blocking a thread, so it can be awaited anywhere in the runtime, the server's own
    /// thread included (a request handler of the server it upgrades, a task beside
    /// `run_async`). Dropping the future does not cancel the upgrade.
    #[cfg(feature = "tokio")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tokio")))]
    pub async fn upgrade_async(&self) -> Result<u32, UpgradeError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.shared
            .request(Request::Upgrade(UpgradeReply::Async(tx)));
        rx.await.unwrap_or(Err(UpgradeError::NotRunning))
    }

    /// The number of the drain that the last `Draining` phase began (see
    /// [`Handle::commit_drain`]).
    #[cfg(feature = "axum")]
    pub(crate) fn drain_seq(&self) -> u64 {
        self.shared
            .drain_seq
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Commits drain `seq` (`Event::DrainCommitted`): `true` once it can no longer resume and
    /// no connection is handed over any more (or the server has exited or is gone); `false`
    /// if drain `seq` is not the current one (it resumed before the commit came).
    #[cfg(feature = "axum")]
    pub(crate) async fn commit_drain(&self, seq: u64) -> bool {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.shared.request(Request::CommitDrain(seq, tx));
        rx.await.unwrap_or(true)
    }

    /// Sets the blob that the next upgrade hands to the new process with the listeners
    /// (session-ticket keys, a warm cache index, …), read there with
    /// [`Server::inherited_state`] (at most [`MAX_STATE_LEN`](crate::MAX_STATE_LEN) bytes) or, of any size, with
    /// [`Server::inherited_state_reader`]. The state is sent in chunks straight from `state`
    /// (held here by reference, never copied whole) while this process keeps serving.
    /// Put your own format version in it: the two processes may be different releases of your
    /// service. The new process's ready timeout covers the transfer (64 MiB took 0.3 s
    /// here). Never fails today; the `Result` is kept for compatibility.
    ///
    /// [`Server::inherited_state`]: crate::Server::inherited_state
    /// [`Server::inherited_state_reader`]: crate::Server::inherited_state_reader
    pub fn set_handoff_state(&self, state: Bytes) -> Result<(), Error> {
        *self
            .shared
            .handoff_state
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = state;
        Ok(())
    }

    pub(crate) fn shared(&self) -> &Shared {
        &self.shared
    }

    pub(crate) fn from_shared(shared: Arc<Shared>) -> Handle {
        Handle { shared }
    }

    /// This process's generation: 0 when started by hand, one more at each upgrade.
    pub fn generation(&self) -> u32 {
        self.shared.generation
    }

    /// Sets named fds (a memfd, a pipe, a device…) that the next upgrade hands to the new
    /// process as they are, read there with [`Server::take_inherited_fds`]. This process keeps
    /// them open (the handoff sends duplicates). Any number: they travel 253 to a message
    /// (the kernel's `SCM_MAX_FD`); the new process must be allowed to hold them all
    /// (`RLIMIT_NOFILE`, inherited from this one).
    ///
    /// [`Server::take_inherited_fds`]: crate::Server::take_inherited_fds
    pub fn set_handoff_fds(&self, fds: Vec<(String, OwnedFd)>) -> Result<(), Error> {
        if let Some((name, _)) = fds
            .iter()
            .find(|(n, _)| n.len() > crate::handoff::MAX_NAME_LEN)
        {
            return Err(Error::Config(format!("fd name {name:?} is too long")));
        }
        *self
            .shared
            .handoff_fds
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = std::sync::Arc::new(fds);
        Ok(())
    }

    /// Asks the server to stop accepting, drain and return from `run`. Does not wait.
    pub fn shutdown(&self) {
        self.shared.request(Request::Shutdown);
    }

    /// The server's current phase.
    pub fn phase(&self) -> Phase {
        self.shared.phase.get().0
    }

    /// Watches the phase from any thread: [`PhaseWatch::changed`] and
    /// [`PhaseWatch::wait_for`] wait without polling.
    pub fn watch_phase(&self) -> PhaseWatch {
        PhaseWatch {
            seen: self.shared.phase.get().1,
            shared: self.shared.clone(),
        }
    }

    /// The phase as a `tokio::sync::watch` receiver, for async code.
    #[cfg(feature = "tokio")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tokio")))]
    pub fn phase_receiver(&self) -> tokio::sync::watch::Receiver<Phase> {
        self.shared.phase.sender.subscribe()
    }

    /// Connections accepted by this process and not yet dropped.
    pub fn live_connections(&self) -> usize {
        self.shared.live.load(SeqCst)
    }
}

/// Waits for phase changes of a [`Server`]; made by [`Handle::watch_phase`]. Like a watch
/// channel, it sees the latest phase, not necessarily every phase in between.
///
/// [`Server`]: crate::Server
#[derive(Debug)]
pub struct PhaseWatch {
    shared: Arc<Shared>,
    seen: u64,
}

impl PhaseWatch {
    /// The current phase.
    pub fn current(&self) -> Phase {
        self.shared.phase.get().0
    }

    /// Waits until the phase changed since this watch last looked, for at most `timeout`;
    /// returns the phase now, or `None` if nothing changed in time.
    pub fn changed(&mut self, timeout: Duration) -> Option<Phase> {
        let cell = &self.shared.phase;
        let guard = cell.state.lock().unwrap_or_else(|e| e.into_inner());
        let (guard, _) = cell
            .changed
            .wait_timeout_while(guard, timeout, |(_, seq)| *seq == self.seen)
            .unwrap_or_else(|e| e.into_inner());
        if guard.1 == self.seen {
            return None;
        }
        self.seen = guard.1;
        Some(guard.0)
    }

    /// Waits until the phase satisfies `want`, for at most `timeout` (`Duration::MAX`: no
    /// limit).
    pub fn wait_for(&mut self, timeout: Duration, want: impl Fn(Phase) -> bool) -> Option<Phase> {
        // No deadline where `now + timeout` is past what an `Instant` holds.
        let deadline = std::time::Instant::now().checked_add(timeout);
        let (now, seq) = self.shared.phase.get();
        self.seen = seq;
        if want(now) {
            return Some(now);
        }
        loop {
            let left = deadline.map_or(Duration::MAX, |d| {
                d.saturating_duration_since(std::time::Instant::now())
            });
            match self.changed(left) {
                Some(p) if want(p) => return Some(p),
                Some(_) => {}
                None => return None,
            }
        }
    }
}
