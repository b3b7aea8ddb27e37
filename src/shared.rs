//! The state shared between the public face ([`Handle`](crate::handle::Handle), the
//! [`DrainGuard`](crate::connection::DrainGuard)s) and the driver: [`Shared`], its request
//! queue, the phase cell, and the [`Config`] the builder fixed.

use std::ffi::OsString;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};
use std::sync::{mpsc, Arc, Condvar, Mutex};

use bytes::Bytes;
use nix::sys::signal::SigSet;

use crate::access::ControlAccess;
use crate::error::UpgradeError;
use crate::launch::EnvOverrides;
use crate::machine::{Phase, Timeouts};
use crate::protocol::ProtocolVersions;
use crate::signals::{StopHook, UpgradeSignal};
use crate::sys;

#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub timeouts: Timeouts,
    pub max_draining: u32,
    pub workers: usize,
    pub pid_file: Option<PathBuf>,
    pub exe: PathBuf,
    pub args: Vec<OsString>,
    /// How the new process's environment differs from this one's.
    pub env: EnvOverrides,
    pub signals: SigSet,
    /// `listen()`'s backlog for the sockets this process makes (`Builder::listen_backlog`);
    /// `None`: `net.core.somaxconn`.
    pub listen_backlog: Option<u32>,
    /// The signal in `signals` that upgrades; the others stop.
    pub upgrade_signal: UpgradeSignal,
    /// Told of a stop signal before the drain (`Builder::on_stop_signal`).
    pub on_stop_signal: Option<StopHook>,
    /// Where systemd notifications go (`NOTIFY_SOCKET` at `build`), if anywhere.
    pub notify_socket: Option<OsString>,
    /// The handoff protocol versions this process speaks ([`crate::protocol::this_process`] at
    /// `build`; a field so that the driver's tests can speak others).
    pub protocol: ProtocolVersions,
}

/// State shared between the driver, its [`Handle`]s and the live connections' guards.
///
/// [`Handle`]: crate::Handle
#[derive(Debug)]
pub(crate) struct Shared {
    /// Wakes the driver: requests queued, the last connection closed, fds freed.
    pub wake: OwnedFd,
    pub live: AtomicUsize,
    pub draining: AtomicBool,
    pub accept_paused: AtomicBool,
    pub phase: PhaseCell,
    /// The number of the drain the phase's last `Draining` began (`Machine::drains_started`),
    /// stored before that phase is published.
    pub drain_seq: AtomicU64,
    /// Requests for the driver; `None` once no driver will take them (see [`RequestsOpen`]).
    pub requests: Mutex<Option<Vec<Request>>>,
    /// What the next HELLO carries as the application's state.
    pub handoff_state: Mutex<Bytes>,
    /// 0 for a process started by hand, its parent's plus one after an upgrade.
    pub generation: u32,
    /// Named fds the next HELLO hands over as they are.
    pub handoff_fds: Mutex<Arc<Vec<(String, OwnedFd)>>>,
    /// Who the control socket serves besides the service's uid and root.
    pub control_access: ControlAccess,
    /// The threads running a ring now, where a blocking upgrade would deadlock.
    pub ring_threads: RingThreads,
}

impl Config {
    /// The backlog a socket this process makes listens with: also a member bound in `build`
    /// whose listen was deferred (`Driver::listen_deferred`).
    pub(crate) fn backlog(&self) -> i32 {
        self.listen_backlog
            .map_or_else(sys::somaxconn, |b| i32::try_from(b).unwrap_or(i32::MAX))
    }
}

impl Shared {
    pub(crate) fn wake(&self) {
        sys::eventfd_signal(self.wake.as_fd());
    }

    /// Queues `request` for the driver, or drops it (and with it its reply channel, whose
    /// receiver then reads `NotRunning`) when no driver will take it.
    pub(crate) fn request(&self, request: Request) {
        if let Some(queue) = &mut *self.requests.lock().unwrap_or_else(|e| e.into_inner()) {
            queue.push(request);
        }
        self.wake();
    }

    /// The requests queued so far, taken (none once closed).
    pub(crate) fn take_requests(&self) -> Vec<Request> {
        self.requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }
}

/// While this lives, a driver will take the requests of [`Handle`]s: held by the [`Server`],
/// then by its driver. Dropped (the server dropped unrun, the driver gone however it ended), it
/// closes the queue: the requests in it and every later one are dropped, and their callers get
/// `NotRunning` at once instead of waiting for an answer that will never come.
///
/// [`Handle`]: crate::Handle
/// [`Server`]: crate::Server
#[derive(Debug)]
pub(crate) struct RequestsOpen(pub Arc<Shared>);

impl Drop for RequestsOpen {
    fn drop(&mut self) {
        let pending = self
            .0
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        drop(pending); // outside the lock: dropping a reply sender wakes its caller
    }
}

#[derive(Debug)]
pub(crate) enum Request {
    Upgrade(UpgradeReply),
    Shutdown,
    /// `Event::DrainCommitted` of this drain; answered with `Machine::drain_commit` once it
    /// is `Some`.
    #[cfg(feature = "axum")]
    CommitDrain(u64, tokio::sync::oneshot::Sender<bool>),
}

/// Where the outcome of an upgrade requested through a [`Handle`](crate::Handle) goes: a
/// thread blocked in `upgrade`, or a task awaiting `upgrade_async`.
#[derive(Debug)]
pub(crate) enum UpgradeReply {
    Blocking(mpsc::Sender<Result<u32, UpgradeError>>),
    #[cfg(feature = "tokio")]
    Async(tokio::sync::oneshot::Sender<Result<u32, UpgradeError>>),
}

impl UpgradeReply {
    /// Sends the outcome; `Err` if the caller has stopped waiting.
    pub(crate) fn send(self, outcome: Result<u32, UpgradeError>) -> Result<(), ()> {
        match self {
            UpgradeReply::Blocking(tx) => tx.send(outcome).map_err(drop),
            #[cfg(feature = "tokio")]
            UpgradeReply::Async(tx) => tx.send(outcome).map_err(drop),
        }
    }
}

/// The threads that run one of this process's rings now (a `run`, or the runtime thread that
/// polls a `run_async`): a blocking `Handle::upgrade` there would wait on itself.
#[derive(Debug, Default)]
pub(crate) struct RingThreads(Mutex<Vec<std::thread::ThreadId>>);

impl RingThreads {
    /// Registers the calling thread until the returned value is dropped.
    pub(crate) fn enter(shared: &Arc<Shared>) -> OnRingThread {
        let id = std::thread::current().id();
        shared
            .ring_threads
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(id);
        OnRingThread {
            shared: shared.clone(),
            id,
        }
    }

    /// Whether the calling thread runs one of the rings.
    pub(crate) fn current_is_one(&self) -> bool {
        let id = std::thread::current().id();
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&id)
    }
}

/// A ring thread's registration in [`RingThreads`]; removed on drop.
#[derive(Debug)]
pub(crate) struct OnRingThread {
    shared: Arc<Shared>,
    id: std::thread::ThreadId,
}

impl Drop for OnRingThread {
    fn drop(&mut self) {
        let mut ids = self
            .shared
            .ring_threads
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(i) = ids.iter().position(|id| *id == self.id) {
            ids.swap_remove(i);
        }
    }
}

/// The phase and a change counter, with a condvar for blocking watchers and a tokio watch
/// channel for async ones.
#[derive(Debug)]
pub(crate) struct PhaseCell {
    pub state: Mutex<(Phase, u64)>,
    pub changed: Condvar,
    #[cfg(feature = "tokio")]
    pub sender: tokio::sync::watch::Sender<Phase>,
}

impl PhaseCell {
    pub(crate) fn new() -> PhaseCell {
        PhaseCell {
            state: Mutex::new((Phase::Serving, 0)),
            changed: Condvar::new(),
            #[cfg(feature = "tokio")]
            sender: tokio::sync::watch::Sender::new(Phase::Serving),
        }
    }

    pub(crate) fn get(&self) -> (Phase, u64) {
        *self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn set(&self, phase: Phase) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        *state = (phase, state.1 + 1);
        drop(state);
        self.changed.notify_all();
        #[cfg(feature = "tokio")]
        self.sender.send_replace(phase);
    }
}
