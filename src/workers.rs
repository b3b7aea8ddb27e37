//! Thread-per-core: worker threads, each with its own accept ring on its own SO_REUSEPORT
//! member of every TCP listener, following the coordinator (the thread that runs the state
//! machine) through one shared state.
//!
//! The coordinator flips `accepting` and signals every worker's eventfd; a worker that has
//! reaped the terminal completion of each of its accepts marks itself `stopped` and signals the
//! coordinator's wake eventfd. The coordinator reports `AcceptStopped` to its machine only once
//! its own accepts and every worker have stopped, so every connection accepted anywhere before
//! the cancel is served and counted before the drain can end. On exit it sets `quit`.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};

use crate::{sys, Error};

/// State shared by the coordinator and its workers (worker `i` is at index `i - 1`).
#[derive(Debug)]
pub(crate) struct WorkerSet {
    pub accepting: AtomicBool,
    /// The coordinator has started (everything that can fail in it is behind it): workers
    /// accept only from then on. A worker that accepted before a coordinator that then failed
    /// to start would close what it took when the process exits.
    pub coordinator_started: AtomicBool,
    /// The process's predecessor still holds the accept queues (this process is a successor
    /// whose predecessor has not let go yet): a worker must not take connections outside its
    /// own multishot accepts (see `Driver::sweep_missed`). Cleared by the coordinator when the
    /// predecessor lets go, before it bumps `sweeps`.
    pub predecessor_holds_queue: AtomicBool,
    /// Bumped by the coordinator when every worker must sweep its accept queues (the
    /// predecessor let go: see `Driver::sweep_queues`).
    pub sweeps: AtomicU64,
    pub quit: AtomicBool,
    stopped: Vec<AtomicBool>,
    wakes: Vec<OwnedFd>,
}

impl WorkerSet {
    /// Shared state for `n` workers besides the coordinator.
    pub(crate) fn new(n: usize, successor: bool) -> Result<WorkerSet, Error> {
        Ok(WorkerSet {
            accepting: AtomicBool::new(true),
            coordinator_started: AtomicBool::new(false),
            predecessor_holds_queue: AtomicBool::new(successor),
            sweeps: AtomicU64::new(0),
            quit: AtomicBool::new(false),
            stopped: (0..n).map(|_| AtomicBool::new(false)).collect(),
            wakes: (0..n)
                .map(|_| sys::eventfd().map_err(Error::io("eventfd")))
                .collect::<Result<_, _>>()?,
        })
    }

    /// Wakes every worker to look at `accepting` and `quit` again.
    pub(crate) fn signal_all(&self) {
        for fd in &self.wakes {
            sys::eventfd_signal(fd.as_fd());
        }
    }

    /// The eventfd that wakes worker `i` (`i >= 1`).
    pub(crate) fn wake_of(&self, i: usize) -> &OwnedFd {
        &self.wakes[i - 1]
    }

    pub(crate) fn set_stopped(&self, i: usize, stopped: bool) {
        self.stopped[i - 1].store(stopped, SeqCst);
    }

    /// Whether a worker should accept now: the coordinator wants it and has started.
    pub(crate) fn wants_accepting(&self) -> bool {
        self.accepting.load(SeqCst) && self.coordinator_started.load(SeqCst)
    }

    pub(crate) fn all_stopped(&self) -> bool {
        self.stopped.iter().all(|s| s.load(SeqCst))
    }
}
