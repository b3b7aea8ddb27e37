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
use std::sync::Arc;

use crate::error::Error;
use crate::shared::Shared;
use crate::sys;

/// `WorkerSet::acked` of a worker that has ended for good.
const GONE: u64 = u64::MAX;

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
    /// The coordinator has a child that may hold accept wake-ups (`Driver::children_alive`):
    /// an accept a worker arms meanwhile gets a guard poll (see `Driver::arm_accept`).
    pub children_alive: AtomicBool,
    pub quit: AtomicBool,
    /// Bumped by the coordinator at each stop: a worker's acknowledgement names the stop it
    /// answers, and only one of the current stop counts (see `all_stopped`).
    stop_epoch: AtomicU64,
    /// Per worker: the stop it last acknowledged having fully stopped for, 0 while it accepts,
    /// `GONE` once it has ended for good.
    acked: Vec<AtomicU64>,
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
            children_alive: AtomicBool::new(false),
            quit: AtomicBool::new(false),
            stop_epoch: AtomicU64::new(0),
            acked: (0..n).map(|_| AtomicU64::new(0)).collect(),
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

    /// The coordinator stops the workers: a new stop, which every worker must acknowledge
    /// anew. The epoch is bumped before `accepting` is cleared, so a worker that sees the
    /// stop also sees its epoch.
    pub(crate) fn begin_stop(&self) {
        self.stop_epoch.fetch_add(1, SeqCst);
        self.accepting.store(false, SeqCst);
    }

    /// The stop now in force (what a worker acknowledges).
    pub(crate) fn current_stop(&self) -> u64 {
        self.stop_epoch.load(SeqCst)
    }

    /// Worker `i` (`i >= 1`) has fully stopped (every accept ended) for stop `epoch`.
    pub(crate) fn ack_stop(&self, i: usize, epoch: u64) {
        self.acked[i - 1].store(epoch, SeqCst);
    }

    /// Worker `i` accepts again: its acknowledgement is withdrawn.
    pub(crate) fn withdraw_stop(&self, i: usize) {
        self.acked[i - 1].store(0, SeqCst);
    }

    /// Worker `i` has ended for good: it counts as stopped for every stop to come.
    pub(crate) fn gone(&self, i: usize) {
        self.acked[i - 1].store(GONE, SeqCst);
    }

    /// Whether a worker should accept now: the coordinator wants it and has started.
    pub(crate) fn wants_accepting(&self) -> bool {
        self.accepting.load(SeqCst) && self.coordinator_started.load(SeqCst)
    }

    /// Every worker has acknowledged the current stop (or is gone). An acknowledgement of an
    /// earlier stop does not count: between the two a resume may have made it accept again.
    pub(crate) fn all_stopped(&self) -> bool {
        let epoch = self.current_stop();
        self.acked.iter().all(|a| {
            let a = a.load(SeqCst);
            a == GONE || (a == epoch && epoch != 0)
        })
    }
}

/// Tells the workers to quit when dropped: held by the coordinator (its server, then its
/// driver), so that workers never outlive a coordinator that failed or was never run.
#[derive(Debug)]
pub(crate) struct Coordinator(pub Arc<WorkerSet>);

impl Drop for Coordinator {
    fn drop(&mut self) {
        self.0.quit.store(true, SeqCst);
        self.0.signal_all();
    }
}

/// Marks worker `index` stopped for good when dropped: held by a [`Worker`], then by its driver,
/// so that a worker that was never run, failed or panicked does not keep its coordinator
/// waiting, at every READY and at shutdown, for a stop that would never be reported (the drain
/// would then last its whole deadline).
///
/// [`Worker`]: crate::Worker
#[derive(Debug)]
pub(crate) struct WorkerGone {
    pub index: usize,
    pub set: Arc<WorkerSet>,
    pub shared: Arc<Shared>,
}

impl Drop for WorkerGone {
    fn drop(&mut self) {
        if !self.set.quit.load(SeqCst) {
            tracing::error!(
                worker = self.index,
                "worker gone while its coordinator serves: the connections queued on its \
                 listeners wait for the next process"
            );
        }
        self.set.gone(self.index);
        self.shared.wake();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A worker's acknowledgement answers one stop: stopped for the first, it does not count
    /// for a second one that came after a resume (it may have accepted again in between, and
    /// the coordinator would let go while it still holds an accept). A worker gone for good
    /// counts for every stop.
    #[test]
    fn an_acknowledgement_answers_one_stop() {
        let set = WorkerSet::new(2, false).unwrap();
        assert!(!set.all_stopped(), "nothing stopped yet");
        set.begin_stop();
        let first = set.current_stop();
        set.ack_stop(1, first);
        set.gone(2);
        assert!(set.all_stopped());
        set.accepting.store(true, SeqCst); // the coordinator resumes...
        set.begin_stop(); // ...and stops again before worker 1 followed the resume
        assert!(
            !set.all_stopped(),
            "worker 1's acknowledgement of the first stop counted for the second"
        );
        set.ack_stop(1, set.current_stop());
        assert!(set.all_stopped());
    }
}
