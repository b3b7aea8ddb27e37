//! Accepting: one multishot accept per listener ([`AcceptSlot`]), handing each connection to
//! the application (or the control socket), re-arming with a backoff after a resource error,
//! and stopping and resuming (the coordinator's workers follow), reported once every accept
//! has ended.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::Ordering::SeqCst;
use std::time::{Duration, Instant};

use io_uring::{opcode, types};

use crate::connection::{Connection, DrainGuard};
use crate::control;
use crate::handle::Handle;
use crate::listener::{Endpoint, Listener, Listening};
use crate::machine::successor::SuccessionEvent;
use crate::machine::Event;
use crate::workers::WorkerSet;

use super::ring::{with_ioprio, Op, Token};
use super::{Driver, Role};

/// First and largest pause before re-arming an accept that failed for lack of fds or memory.
const BACKOFF_MIN: Duration = Duration::from_millis(1);

const BACKOFF_MAX: Duration = Duration::from_millis(200);

/// `IORING_ACCEPT_MULTISHOT`, as `opcode::AcceptMulti` sets it.
const IORING_ACCEPT_MULTISHOT: u16 = 1 << 0;
/// `IORING_ACCEPT_POLL_FIRST` (Linux 6.10): arm the poll without trying an accept first.
const IORING_ACCEPT_POLL_FIRST: u16 = 1 << 2;

pub(super) struct AcceptSlot {
    pub(super) listener: Listener,
    /// The control socket: its connections are served by ringflip, not the application.
    pub(super) control: bool,
    /// The armed multishot accept, until its terminal CQE.
    pub(super) op: Option<Token>,
    /// `op` was armed with `IORING_ACCEPT_POLL_FIRST` (an EINVAL ending it is that flag's
    /// refusal by the kernel, however many were armed before the first refusal was seen).
    armed_poll_first: bool,
    pub(super) cancel_sent: bool,
    /// Set while re-arming is paused after a resource error (through `Accepts`, which keeps
    /// the list of such slots).
    retry_at: Option<Instant>,
    backoff: Duration,
    /// The error that paused this listener, logged once per episode.
    paused_by: Option<i32>,
    /// The takeover poll, while armed, and whether its cancel was sent.
    pub(super) takeover: Option<Token>,
    pub(super) takeover_cancel_sent: bool,
    /// The sweeping accept in flight (at most one per listener; see `sweep`).
    pub(super) sweep_accept: Option<Token>,
    /// Connections delivered from this listener so far.
    pub(super) delivered: u64,
    /// `delivered` when this listener last woke the runtime (see `sweep_missed`).
    woke_at: Option<u64>,
    /// Whether the listener listens (see `Driver::listening`).
    pub(super) listening: Listening,
    /// In the wake set (see `Driver::watch_listener`).
    pub(super) watched: std::cell::Cell<bool>,
}

/// Every accept of this driver: a slot per listener, and what it was last told to do.
///
/// Nothing here is a decision. Whether to accept is ordered from outside: by the upgrade
/// machine (`StopAccepting`/`ResumeAccepting`), for a worker by its coordinator
/// (`WorkerSet`), and ended by `finish`. `wanted` records the last order, so that an accept
/// ending on its own (a full CQ, a backoff) is re-armed only while accepting is wanted; the
/// rest is bookkeeping of carrying the order out.
pub(super) struct Accepts {
    slots: Vec<AcceptSlot>,
    /// The last order was to accept.
    pub(super) wanted: bool,
    /// The end of the last stop was reported (to the machine, or by a worker to the
    /// coordinator): once per stop, so the timeline keeps the first moment.
    pub(super) stop_reported: bool,
    /// The kernel refused `IORING_ACCEPT_DONTWAIT` (see `sweep`): a fact about the kernel,
    /// learnt once.
    pub(super) no_dontwait: bool,
    /// The kernel refused `IORING_ACCEPT_POLL_FIRST` (see `arm_accept`): learnt once.
    pub(super) no_poll_first: bool,
    /// The flag itself: the tests put a bit no kernel knows here, to take the path of a
    /// kernel that does not know this one.
    pub(super) poll_first_flag: u16,
    /// Connections accepted (logged at exit).
    pub(super) accepted: u64,
    /// Where [`Accepts::any_armed`] last found an armed slot: it looks there first.
    armed_hint: std::cell::Cell<usize>,
    /// The slots whose re-arming is paused (`retry_at` set), and those whose listener woke the
    /// runtime since the last look (`woke_at` set). Every turn looks at these, never at every
    /// slot: with 10,000 listeners the per-turn scans (the next deadline, the due retries, the
    /// missed wake-ups) took half of the old process's CPU from READY to its accepts stopped
    /// (`perf`, `benches/handover_scale.rs --curve listeners`).
    retrying: Vec<usize>,
    woken: Vec<usize>,
}

impl Accepts {
    pub(super) fn new(listeners: Vec<Listener>, wanted: bool) -> Accepts {
        Accepts {
            slots: listeners.into_iter().map(AcceptSlot::new).collect(),
            wanted,
            stop_reported: false,
            no_dontwait: false,
            no_poll_first: false,
            poll_first_flag: IORING_ACCEPT_POLL_FIRST,
            accepted: 0,
            armed_hint: std::cell::Cell::new(0),
            retrying: Vec::new(),
            woken: Vec::new(),
        }
    }

    /// Pauses the re-arming of slot `i` until `at`.
    fn retry_later(&mut self, i: usize, at: Instant) {
        if self.slots[i].retry_at.replace(at).is_none() {
            self.retrying.push(i);
        }
    }

    /// The paused slots due by `now` (all of them with `None`), no longer paused.
    pub(super) fn take_retries(&mut self, now: Option<Instant>) -> Vec<usize> {
        let slots = &mut self.slots;
        let mut due = Vec::new();
        self.retrying.retain(|&i| {
            let ready = slots[i]
                .retry_at
                .is_some_and(|t| now.is_none_or(|now| t <= now));
            if ready {
                slots[i].retry_at = None;
                due.push(i);
            }
            !ready
        });
        due
    }

    /// The earliest moment a paused slot is due.
    pub(super) fn next_retry(&self) -> Option<Instant> {
        self.retrying
            .iter()
            .filter_map(|&i| self.slots[i].retry_at)
            .min()
    }

    /// Notes that slot `i`'s listener woke the runtime (see `Driver::sweep_missed`).
    pub(super) fn note_woken(&mut self, i: usize) {
        let Some(slot) = self.slots.get_mut(i) else {
            return;
        };
        if slot.woke_at.is_none() {
            slot.woke_at = Some(slot.delivered);
            self.woken.push(i);
        }
    }

    /// The slots noted woken since the last call, with `delivered` as it was then; forgotten.
    pub(super) fn take_woken(&mut self) -> Vec<(usize, u64)> {
        let slots = &mut self.slots;
        self.woken
            .drain(..)
            .filter_map(|i| slots[i].woke_at.take().map(|seen| (i, seen)))
            .collect()
    }

    /// Whether any accepting op of any slot is still in flight.
    ///
    /// Asked at every terminal completion while a stop is under way, so a plain scan would be
    /// quadratic in the listeners: with 10,000 listeners the old process spent 166 ms from
    /// READY to its last accept cancelled (`benches/handover_scale.rs`, `perf` showed this
    /// scan on top). It starts where it last found an armed slot, which stays armed until its
    /// own completion: whatever order the cancels complete in, a stop costs O(n) in total.
    pub(super) fn any_armed(&self) -> bool {
        let n = self.slots.len();
        let start = self.armed_hint.get().min(n);
        let found = (start..n).chain(0..start).find(|&i| self.slots[i].armed());
        if let Some(i) = found {
            self.armed_hint.set(i);
        }
        found.is_some()
    }

    pub(super) fn len(&self) -> usize {
        self.slots.len()
    }

    pub(super) fn iter(&self) -> std::slice::Iter<'_, AcceptSlot> {
        self.slots.iter()
    }

    pub(super) fn get(&self, i: usize) -> Option<&AcceptSlot> {
        self.slots.get(i)
    }
}

impl std::ops::Index<usize> for Accepts {
    type Output = AcceptSlot;
    fn index(&self, i: usize) -> &AcceptSlot {
        &self.slots[i]
    }
}

impl std::ops::IndexMut<usize> for Accepts {
    fn index_mut(&mut self, i: usize) -> &mut AcceptSlot {
        &mut self.slots[i]
    }
}

impl<'a> IntoIterator for &'a Accepts {
    type Item = &'a AcceptSlot;
    type IntoIter = std::slice::Iter<'a, AcceptSlot>;
    fn into_iter(self) -> Self::IntoIter {
        self.slots.iter()
    }
}

impl AcceptSlot {
    /// Whether re-arming is paused after a resource error.
    pub(super) fn retrying(&self) -> bool {
        self.retry_at.is_some()
    }

    fn new(listener: Listener) -> AcceptSlot {
        AcceptSlot {
            control: &*listener.name == control::CONTROL_LISTENER,
            listening: Listening::new(listener.listens),
            listener,
            op: None,
            armed_poll_first: false,
            cancel_sent: false,
            retry_at: None,
            backoff: BACKOFF_MIN,
            paused_by: None,
            takeover: None,
            takeover_cancel_sent: false,
            sweep_accept: None,
            delivered: 0,
            woke_at: None,
            watched: std::cell::Cell::new(false),
        }
    }

    /// Whether any accepting op of this listener is still in flight.
    pub(super) fn armed(&self) -> bool {
        self.op.is_some() || self.takeover.is_some() || self.sweep_accept.is_some()
    }
}

impl Driver {
    /// Whether listener `i` listens: not yet for a new member of a per-worker group in a
    /// successor (bound in `build`, see `Driver::listen_deferred`).
    pub(super) fn listening(&self, i: usize) -> bool {
        let slot = &self.accepts[i];
        slot.listening.check(slot.listener.fd.as_fd())
    }

    pub(super) fn arm_accept(&mut self, i: usize) {
        if self.accepts[i].op.is_some() || !self.listening(i) {
            // Armed already (one multishot accept per listener: a second would stay armed
            // past the cancel of the first), or a new member not listening yet.
            return;
        }
        self.watch_listener(i);
        let fd = self.accepts[i].listener.fd.as_raw_fd();
        let mut entry = opcode::AcceptMulti::new(types::Fd(fd))
            .flags(libc::SOCK_CLOEXEC)
            .build();
        // Poll first: an accept tried on an empty queue allocates a socket and a file, fails
        // with EAGAIN and frees them (through task work and RCU). A successor arms one per
        // listener while the queues are still its predecessor's, mostly empty: with 10,000
        // listeners those failed tries were ~45 % of its CPU from the handoff to READY (`perf`,
        // `benches/handover_scale.rs --curve listeners`). The poll armed instead reports a
        // queue that is not empty at once (`vfs_poll` at arming), so nothing queued waits, and
        // it waits in the listener's queue exactly as the poll armed after a failed try would.
        let poll_first = !self.accepts.no_poll_first;
        if poll_first {
            entry = with_ioprio(
                entry,
                IORING_ACCEPT_MULTISHOT | self.accepts.poll_first_flag,
            );
        }
        self.accepts[i].armed_poll_first = poll_first;
        self.accepts[i].op = self.arm(Op::Accept(i), entry);
        self.accepts[i].cancel_sent = false;
        // A child armed its accepts before this one (a successor starting, or one abandoned
        // and draining): they wait ahead of ours in the listener's queue, and a wake-up is
        // exclusive. One that does not run its ring (hung before READY, or killed before it
        // does) leaves the connections it was woken for queued, with nobody else woken: for
        // up to its ready deadline plus its drain. A poll beside the accept is woken
        // whatever the order (a non-exclusive waiter) and sweeps: the takeover's mechanism
        // (`start_takeover`), here until no child is left (`end_guard_polls_if_alone`). Only
        // for an accept armed while a child lives, which is rare: the first ones are armed
        // before any child, and a multishot accept ends only on a full CQ, a few errors or
        // a backoff; for every connection the polls would wake two processes. The control
        // listener too: this process answers it. Workers too: they ask their coordinator.
        if self.children_alive() && !self.guard_polls_off() {
            self.guarding = true;
            self.arm_takeover(i);
        }
    }

    /// Whether a test switched the guard polls off (see `arm_accept`).
    fn guard_polls_off(&self) -> bool {
        #[cfg(test)]
        return self.no_guard_polls;
        #[cfg(not(test))]
        false
    }

    /// A completion of listener `i`'s multishot accept: a connection, or its end.
    pub(super) fn on_accept(
        &mut self,
        token: Token,
        i: usize,
        conn: Option<OwnedFd>,
        res: i32,
        more: bool,
        sink: &mut dyn FnMut(Connection),
    ) {
        if let Some(fd) = conn {
            self.deliver(i, fd, sink);
        }
        if !more {
            self.ops.remove(token);
            self.accept_ended(i, res);
        }
    }

    /// The completion of listener `i`'s sweeping accept (see `sweep`).
    pub(super) fn on_sweep_accept(
        &mut self,
        token: Token,
        i: usize,
        conn: Option<OwnedFd>,
        res: i32,
        sink: &mut dyn FnMut(Connection),
    ) {
        self.ops.remove(token);
        self.accepts[i].sweep_accept = None;
        if let Some(fd) = conn {
            self.deliver(i, fd, sink);
            // More may be queued: take them until EAGAIN.
            self.sweep(i);
        } else if res == -libc::EINVAL {
            // This kernel has no IORING_ACCEPT_DONTWAIT (Linux < 6.10): no takeover
            // (the predecessor's accept stop ends the overlap as before), and sweeps
            // re-arm the multishot accept instead (see `sweep`). Every sweep sent before
            // the first refusal was seen fails the same way (several listeners swept in one
            // turn): each re-arms its own listener, not only the first.
            if !self.accepts.no_dontwait {
                tracing::info!(
                    "no IORING_ACCEPT_DONTWAIT on this kernel: no takeover; the previous \
                     process keeps the accept queue until it lets go"
                );
                self.accepts.no_dontwait = true;
                self.feed_succession(SuccessionEvent::NoDontwait);
            }
            self.sweep(i);
        }
        // EAGAIN: the queue was empty (the predecessor or our own multishot accept took
        // the connection). Other errors: the multishot accept meets them too and backs
        // off; nothing to do here.
        self.report_if_stopped();
    }

    /// Hands a freshly accepted connection of listener `i` to the application.
    fn deliver(&mut self, i: usize, fd: OwnedFd, sink: &mut dyn FnMut(Connection)) {
        let slot = &mut self.accepts[i];
        if slot.paused_by.take().is_some() {
            tracing::info!(listener = %slot.listener.name, "accepting again");
            slot.backoff = BACKOFF_MIN;
            self.update_paused_flag();
        }
        self.accepts.accepted += 1;
        self.accepts[i].delivered += 1;
        let guard = DrainGuard::new(&self.shared);
        let slot = &self.accepts[i];
        if slot.control {
            control::serve(fd, Handle::from_shared(self.shared.clone()), guard);
        } else {
            sink(Connection::new(
                fd,
                slot.listener.name.clone(),
                !matches!(slot.listener.endpoint, Endpoint::Tcp(_)),
                guard,
            ));
        }
    }

    /// A multishot accept reached its terminal CQE.
    fn accept_ended(&mut self, i: usize, res: i32) {
        let slot = &mut self.accepts[i];
        slot.op = None;
        slot.cancel_sent = false;
        // Linux before 6.10 refuses the flag with EINVAL (a listening socket gives no other
        // reason to): accept as before, on every slot from now on. Every accept armed with
        // it fails so (all of them at the start): each re-arms at once, not only the first
        // (the others were paused with a backoff).
        if res == -libc::EINVAL && slot.armed_poll_first && self.listening(i) {
            if !self.accepts.no_poll_first {
                tracing::info!("no IORING_ACCEPT_POLL_FIRST on this kernel: accepts try first");
                self.accepts.no_poll_first = true;
            }
            if self.accepts.wanted {
                return self.arm_accept(i);
            }
        }
        if !self.accepts.wanted {
            self.report_if_stopped();
            return;
        }
        let slot = &mut self.accepts[i];
        match -res {
            // A full CQ or a connection: nothing wrong, re-arm at once.
            e if e <= 0 => self.arm_accept(i),
            libc::ECONNABORTED | libc::EPROTO | libc::EINTR | libc::EAGAIN => self.arm_accept(i),
            libc::ECANCELED => self.arm_accept(i),
            e => {
                // EMFILE, ENFILE, ENOBUFS, ENOMEM: the connection waits in the backlog; retry
                // after a pause (doubling up to BACKOFF_MAX) or as soon as a connection closes.
                // Anything else (the socket was shut down, …) would fail again at once: same
                // pause, so no error loop can spin.
                if slot.paused_by != Some(e) {
                    tracing::warn!(
                        listener = %slot.listener.name,
                        error = %io::Error::from_raw_os_error(e),
                        "accept paused; retrying with backoff"
                    );
                    slot.paused_by = Some(e);
                }
                let at = Instant::now() + slot.backoff;
                slot.backoff = (slot.backoff * 2).min(BACKOFF_MAX);
                self.accepts.retry_later(i, at);
                self.update_paused_flag();
            }
        }
    }

    fn update_paused_flag(&self) {
        let paused = self
            .accepts
            .iter()
            .any(|s| s.retry_at.is_some() || s.paused_by.is_some());
        self.shared.accept_paused.store(paused, SeqCst);
    }

    /// Cancels every accept (the terminal completions arrive later; see `report_if_stopped`).
    /// The coordinator also tells its workers.
    pub(super) fn stop_accepting(&mut self) {
        self.accepts.wanted = false;
        self.tell_workers(WorkerSet::begin_stop);
        self.accepts.take_retries(None);
        for i in 0..self.accepts.len() {
            let slot = &mut self.accepts[i];
            if let (Some(op), false) = (slot.op, slot.cancel_sent) {
                slot.cancel_sent = true;
                self.cancel(types::CancelBuilder::user_data(op.user_data()));
            }
        }
        self.cancel_takeover_polls();
        self.unwatch_listeners();
        self.update_paused_flag();
        self.report_if_stopped();
    }

    /// Re-arms every accept that is not armed (one whose cancel is still in flight re-arms
    /// itself at its terminal completion). The coordinator also tells its workers.
    pub(super) fn resume_accepting(&mut self) {
        self.accepts.wanted = true;
        self.accepts.stop_reported = false;
        self.tell_workers(|set| set.accepting.store(true, SeqCst));
        for i in 0..self.accepts.len() {
            if self.accepts[i].op.is_none() {
                self.arm_accept(i);
            }
            if self.succession.taking_over() && !self.accepts[i].control {
                self.arm_takeover(i);
            }
        }
    }

    /// Once no accept of this driver is armed any more: a worker tells the coordinator; the
    /// coordinator tells its machine when every worker has stopped too.
    pub(super) fn report_if_stopped(&mut self) {
        if self.accepts.wanted || self.accepts.stop_reported || self.accepts.any_armed() {
            return;
        }
        match &self.role {
            Role::Worker(w) => {
                w.set.ack_stop(w.index, self.stop_seen);
                self.shared.wake();
            }
            Role::Coordinator(c) if !c.0.all_stopped() => return,
            _ => {
                tracing::info!(
                    accepted = self.accepts.accepted,
                    "every accept stopped; connections not accepted yet wait for the successor"
                );
                self.feed(Event::AcceptStopped);
                // The successor may stop its takeover polls: connections reach it alone now.
                self.send_released();
            }
        }
        self.accepts.stop_reported = true;
    }

    /// Every accept of this process (all workers) has reached its terminal completion.
    pub(super) fn all_accepts_stopped(&self) -> bool {
        !self.accepts.any_armed() && self.role.workers().is_none_or(|set| set.all_stopped())
    }
}
