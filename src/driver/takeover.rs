//! The successor's side of an upgrade: taking the accept queues over from a predecessor that
//! is slow to let go (takeover polls and sweeps), its RELEASED, new members of a per-worker
//! group that listen only once it let go, and a worker following its coordinator.

use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::Ordering::SeqCst;
use std::time::Instant;

use io_uring::{opcode, types};

use crate::handoff::Message;
use crate::machine::successor::{Notice, SuccessionAction, SuccessionEvent, TAKEOVER_AFTER};
use crate::machine::{Event, ExitReason};
use crate::workers::{Coordinator, WorkerGone, WorkerSet};
use crate::{fault, sys, systemd};

use super::ring::{with_ioprio, Op, Token, CHANNEL_BUF};
use super::{Driver, Role};

/// `IORING_ACCEPT_DONTWAIT` (Linux 6.10): fail with -EAGAIN instead of waiting.
const IORING_ACCEPT_DONTWAIT: u16 = 1 << 1;

impl Driver {
    /// Whether the predecessor abandoned this process: it closed the handoff channel while it
    /// is still alive (its pidfd, the first of the elders the HELLO carried, not readable), or
    /// a SIGTERM is pending here. An abandoning predecessor sends SIGTERM (`Stop::Terminate`)
    /// before it closes the channel, so the signal is pending even if it has exited since;
    /// without that second test, a successor abandoned by a predecessor that then exited took
    /// itself for the survivor and announced itself as the main process (found by the
    /// explorer, `machine/explore_tests.rs`). An operator's SIGTERM at that moment stops it
    /// too, as it asked.
    pub(super) fn predecessor_gave_up(&self) -> bool {
        let Some(link) = &self.predecessor else {
            return false;
        };
        sys::peer_closed(link.channel.as_fd())
            && (self.predecessor_alive() || sys::signal_pending(libc::SIGTERM))
    }

    /// Whether the predecessor still runs: its pidfd (the first of the elders the HELLO
    /// carried) is not readable.
    fn predecessor_alive(&self) -> bool {
        self.elders
            .first()
            .is_some_and(|parent| !sys::poll_readable(parent.as_fd()))
    }

    /// Makes this driver's new members listen, and accept if it accepts. Called once the
    /// predecessor has let go (or, for a process without one, at start).
    ///
    /// Why deferred: a successor running more workers than its predecessor binds new
    /// SO_REUSEPORT members in `build`. A member that listens takes its share of new
    /// connections at once (the kernel hashes each SYN onto a listening member), and if this
    /// process then fails (before READY, or rolled back), they are reset with it; measured:
    /// 56 of ~25,000 connections failed over 10 failing 2 → 4 worker upgrades
    /// (`tests/workers.rs`). A bound socket that does not listen is no member of the group:
    /// nothing is queued on it until `listen`.
    pub(super) fn listen_deferred(&mut self) {
        for i in 0..self.accepts.len() {
            if self.listening(i) {
                continue;
            }
            let slot = &self.accepts[i];
            if let Err(e) = sys::listen(slot.listener.fd.as_fd(), self.config.backlog()) {
                tracing::error!(listener = %slot.listener.name, error = %e, "listen on a new member");
                continue;
            }
            tracing::info!(listener = %slot.listener.name, "new member of the group listening");
        }
        // Every listener not armed yet: those just made to listen, and one a handoff made
        // listen before the release (`send_hello`), which no accept was armed on then.
        if self.accepts.wanted {
            for i in 0..self.accepts.len() {
                if !self.accepts[i].retrying() {
                    self.arm_accept(i);
                }
            }
        }
    }

    /// A worker looks at the coordinator's wishes: quit, stop or resume accepting.
    pub(super) fn follow(&mut self) {
        let Role::Worker(WorkerGone { set, index, .. }) = &self.role else {
            return;
        };
        let (set, index) = (set.clone(), *index);
        self.end_guard_polls_if_alone();
        if set.quit.load(SeqCst) {
            self.exit = Some(ExitReason::Shutdown);
            return;
        }
        let want = set.wants_accepting();
        if want && !self.accepts.wanted {
            set.withdraw_stop(index);
            self.resume_accepting();
        } else if !want && (self.accepts.wanted || self.stop_seen != set.current_stop()) {
            // A new stop (also one that came while this worker had not followed the resume
            // before it): acknowledge that one, once every accept has ended.
            self.stop_seen = set.current_stop();
            self.accepts.stop_reported = false;
            if self.accepts.wanted {
                self.stop_accepting();
            } else {
                self.report_if_stopped();
            }
        }
        let sweeps = set.sweeps.load(SeqCst);
        if sweeps != self.sweeps_seen {
            self.sweeps_seen = sweeps;
            // The predecessor let go: new members may listen now.
            if !self.predecessor_holds_queue() {
                self.listen_deferred();
            }
            self.sweep_queues();
        }
    }

    /// The coordinator changes the workers' shared state with `change`, then wakes them to
    /// look at it; nothing for a worker or a lone ring.
    pub(super) fn tell_workers(&self, change: impl FnOnce(&WorkerSet)) {
        if let Role::Coordinator(Coordinator(set)) = &self.role {
            change(set);
            set.signal_all();
        }
    }

    pub(super) fn arm_predecessor_recv(&mut self) {
        let Some(link) = &self.predecessor else {
            return;
        };
        let fd = link.channel.as_raw_fd();
        let mut buf = Box::new([0u8; CHANNEL_BUF]);
        let ptr = buf.as_mut_ptr();
        let entry = opcode::Recv::new(types::Fd(fd), ptr, CHANNEL_BUF as u32).build();
        self.arm(Op::RecvPredecessor(buf), entry);
    }

    /// A message from the predecessor (RELEASED), or its exit.
    pub(super) fn on_predecessor_recv(&mut self, token: Token, res: i32) {
        let Some(Op::RecvPredecessor(buf)) = self.ops.remove(token) else {
            unreachable!()
        };
        match res {
            n if n > 0 => {
                let ours = self.predecessor.as_ref().map(|link| link.upgrade);
                if let Ok(Message::Released(id)) = Message::decode(&buf[..n as usize]) {
                    if Some(id) == ours {
                        // Its SIGTERM from now on is anyone's (its pid may even be reused).
                        self.predecessor_pid = None;
                        self.feed_succession(SuccessionEvent::Released);
                    }
                }
                self.arm_predecessor_recv();
            }
            e if e == -libc::ECANCELED => {}
            // EOF, or an error (ECONNRESET when it exited with data unread): the previous
            // process exited, or gave up on this one. It signals before it closes, so with a
            // SIGTERM pending here it gave up — our READY may have landed after its last read,
            // at its ready deadline (helper-30's review) — and the signal, read next, is its:
            // its pid is kept.
            _ => {
                if sys::signal_pending(libc::SIGTERM) {
                    tracing::info!(
                        predecessor = ?self.predecessor_pid,
                        "the previous process gave up on this one (channel closed, its SIGTERM pending)"
                    );
                    self.feed_succession(SuccessionEvent::GaveUp);
                } else {
                    tracing::info!(predecessor = ?self.predecessor_pid, "previous process exited");
                    self.predecessor_pid = None;
                    self.feed_succession(SuccessionEvent::PredecessorGone);
                }
            }
        }
    }

    /// A new process takes connections from `TAKEOVER_AFTER` past its READY on, however long
    /// its predecessor takes to notice the READY and stop accepting.
    ///
    /// Why it is needed: accept wake-ups are exclusive and go to the waiter armed first — the
    /// predecessor's multishot accept (IO_URING_FACTS.md: the acceptor armed first takes
    /// everything, even while it does not reap). With DEFER_TASKRUN the predecessor's accepts
    /// run only when its thread enters its ring; a predecessor busy in its runtime (a burst of
    /// connections to serve) noticed READY 0.1–3 ms late here, and connections waited in the
    /// queue that long while this process idled.
    ///
    /// How: besides the multishot accept, each listener gets a multishot `PollAdd` (POLLIN),
    /// which is a *non*-exclusive waiter: woken on every new connection whoever else is. On
    /// each poll completion one `Accept` with `IORING_ACCEPT_DONTWAIT` (never waits: -EAGAIN
    /// when the queue is empty) takes what is queued; the first process to run takes the
    /// connection, the other finds the queue empty. It ends when the predecessor sends
    /// RELEASED (its accepts all stopped) or its channel closes, because from then on the
    /// multishot accept alone is cheaper; if that comes within `TAKEOVER_AFTER`, it never
    /// starts.
    pub(super) fn start_takeover(&mut self) {
        if !self.accepts.wanted {
            return; // armed when accepting resumes (`resume_accepting`)
        }
        for i in 0..self.accepts.len() {
            if !self.accepts[i].control {
                self.arm_takeover(i);
            }
        }
    }

    pub(super) fn arm_takeover(&mut self, i: usize) {
        if self.accepts[i].takeover.is_some() || !self.listening(i) {
            // Armed already (the slot keeps one token: a second poll would outlive the
            // takeover's end), or a new member not listening yet.
            return;
        }
        self.watch_listener(i);
        let fd = self.accepts[i].listener.fd.as_raw_fd();
        let entry = opcode::PollAdd::new(types::Fd(fd), libc::POLLIN as u32)
            .multi(true)
            .build();
        self.accepts[i].takeover = self.arm(Op::TakeoverPoll(i), entry);
        self.accepts[i].takeover_cancel_sent = false;
    }

    /// A completion of listener `i`'s takeover poll (see `start_takeover`).
    pub(super) fn on_takeover_poll(&mut self, token: Token, i: usize, res: i32, more: bool) {
        if !more {
            self.ops.remove(token);
            self.accepts[i].takeover = None;
            self.accepts[i].takeover_cancel_sent = false;
        }
        if res > 0 {
            self.sweep(i);
        }
        if !more {
            // A cancel comes from end_takeover or stop_accepting, which cleared one of
            // the two flags; with both still set it was a stop then a resume.
            if (self.succession.taking_over() || self.children_alive()) && self.accepts.wanted {
                self.arm_takeover(i);
            }
            self.report_if_stopped();
        }
    }

    /// Takes what is queued on listener `i` now, beside the multishot accept: one
    /// non-waiting accept (`IORING_ACCEPT_DONTWAIT`), again after each success, until the
    /// queue is empty (-EAGAIN). Unless one is in flight already. Used by the takeover polls
    /// and by `sweep_queues`. Without DONTWAIT (Linux < 6.10) it cancels the multishot accept
    /// instead, which re-arms itself at its terminal completion and, as any fresh accept,
    /// takes what is queued before it waits (one driver turn later than a sweep would).
    pub(super) fn sweep(&mut self, i: usize) {
        if !self.accepts.wanted || self.accepts[i].sweep_accept.is_some() || !self.listening(i) {
            return;
        }
        if self.accepts.no_dontwait {
            let slot = &mut self.accepts[i];
            if let (Some(op), false) = (slot.op, slot.cancel_sent) {
                slot.cancel_sent = true;
                self.cancel(types::CancelBuilder::user_data(op.user_data()));
            }
            return;
        }
        let fd = self.accepts[i].listener.fd.as_raw_fd();
        let entry = opcode::Accept::new(types::Fd(fd), std::ptr::null_mut(), std::ptr::null_mut())
            .flags(libc::SOCK_CLOEXEC)
            .build();
        let entry = with_ioprio(entry, IORING_ACCEPT_DONTWAIT);
        self.accepts[i].sweep_accept = self.arm(Op::SweepAccept(i), entry);
    }

    /// A listener that woke the runtime but delivered nothing in the turn that followed is swept
    /// (`sweep`): the connection's wake-up may have reached the wake set before the ring's
    /// exclusive accept waiter queued its task work (`wake_set.rs`), and nothing else would wake
    /// the runtime for it. Not while the predecessor holds the queue (`takeover_at`): its
    /// accept gets the connections, and the takeover decides when to take them alongside it.
    pub(super) fn sweep_missed(&mut self) {
        for (i, seen) in self.accepts.take_woken() {
            let slot = &self.accepts[i];
            let missed = slot.delivered == seen
                && slot.op.is_some()
                // Queued still: the common case (a connection already taken in the turn
                // before this edge was drained) costs one poll, not a sweep and a turn.
                && sys::poll_readable(slot.listener.fd.as_fd());
            if missed && !self.predecessor_holds_queue() {
                self.sweep(i);
            }
        }
    }

    /// Whether this process's predecessor still holds the accept queues and may take their
    /// connections (it has not let go, and the takeover has not started): the coordinator
    /// asks its successor's side, a worker its worker set.
    pub(super) fn predecessor_holds_queue(&self) -> bool {
        match &self.role {
            Role::Worker(w) => w.set.predecessor_holds_queue.load(SeqCst),
            _ => self.succession.predecessor_holds_queue(),
        }
    }

    /// An event for the successor's side; its actions run with the upgrade machine's
    /// (`run_actions`).
    pub(super) fn feed_succession(&mut self, event: SuccessionEvent) {
        self.succession.handle(event, Instant::now());
    }

    /// Carries out one action of the successor's side.
    pub(super) fn act_succession(&mut self, action: SuccessionAction) {
        use SuccessionAction as A;
        match action {
            A::SendReady => self.send_ready(),
            A::AnnounceReady => {
                systemd::notify(self.config.notify_socket.as_deref(), "READY=1");
            }
            A::AnnounceMain => {
                systemd::notify(
                    self.config.notify_socket.as_deref(),
                    &format!("MAINPID={}\nREADY=1", std::process::id()),
                );
            }
            A::AnnounceStopping => {
                systemd::notify(self.config.notify_socket.as_deref(), "STOPPING=1");
            }
            A::TellPredecessor(notice) => {
                if let Some(link) = &self.predecessor {
                    let msg = match notice {
                        Notice::Retiring => Message::Retiring(link.upgrade),
                        Notice::Serving => Message::Serving(link.upgrade),
                    };
                    let msg = msg.encode().expect("fits");
                    let _ = sys::send_nonblocking(link.channel.as_fd(), &msg);
                }
            }
            A::ForgetPredecessor => {
                if let Some(link) = self.predecessor.take() {
                    tracing::debug!(
                        predecessor = link.predecessor_pid,
                        "forgetting the previous process"
                    );
                }
            }
            A::DiscardOldPidFile => {
                if let Some(leftover) = self.pid_file_leftover.take() {
                    self.unlink_later(leftover);
                    // In the kernel's hands now rather than at the next turn. (A process
                    // killed before io-wq runs it leaves that one small file behind.)
                    let _ = self.ring.submit();
                }
            }
            A::RestorePidFile => {
                // Only for a predecessor that still runs: one gone since (its SIGTERM came
                // before it crashed or exited) must not be named again.
                if self.predecessor_alive() {
                    self.restore_pid_file();
                } else if let Some(leftover) = self.pid_file_leftover.take() {
                    self.unlink_later(leftover);
                }
            }
            A::ListenDeferred => self.listen_deferred(),
            A::StartTakeover => {
                tracing::info!(
                    after = ?TAKEOVER_AFTER,
                    "the previous process still holds the accept queue; taking connections alongside it"
                );
                self.start_takeover();
            }
            A::EndTakeover => {
                tracing::info!("takeover polls stopped");
                self.cancel_takeover_polls();
            }
            A::QueuesFree => {
                self.tell_workers(|set| set.predecessor_holds_queue.store(false, SeqCst));
                self.listen_deferred();
                self.sweep_queues();
                // Upgrades are taken from now on; one that waited starts now, counting the
                // elders as they are now (the predecessor may be gone).
                self.count_elders();
                self.feed(Event::PredecessorLetGo);
            }
        }
    }

    /// Sends READY to the predecessor (the accepts are armed) and feeds the outcome.
    fn send_ready(&mut self) {
        let Some(link) = &self.predecessor else {
            return self.feed_succession(SuccessionEvent::ReadyUnsent {
                predecessor_gave_up: false,
            });
        };
        if fault::injected("never-ready") {
            // Serves without a word: the predecessor's ready deadline decides.
            tracing::warn!("fault injected: READY withheld");
            return;
        }
        let ready = Message::Ready(link.upgrade).encode().expect("READY fits");
        // Read before the send: on a shared core the predecessor may run (and act on the
        // READY) before this thread gets the CPU back.
        let sent_mono_us = sys::monotonic_us();
        match sys::send_nonblocking(link.channel.as_fd(), &ready) {
            Ok(()) => {
                // On the timeline target, with the monotonic clock: the benchmarks measure
                // from this moment to the old process's "accepting stopped", and read what
                // starting up cost this process (its CPU so far, exec included).
                tracing::info!(
                    target: "ringflip::timeline",
                    predecessor = link.predecessor_pid,
                    upgrade.id = %link.upgrade,
                    sent_mono_us,
                    cpu_us = sys::process_cpu_time().as_micros() as u64,
                    "READY sent"
                );
                self.arm_predecessor_recv();
                self.feed_succession(SuccessionEvent::ReadySent);
            }
            Err(e) => {
                // Gave up: it abandoned this process (its SIGTERM is pending and drains what
                // the accepts took). Otherwise it is gone, and this process serves alone.
                let predecessor_gave_up = self.predecessor_gave_up();
                tracing::warn!(
                    predecessor = link.predecessor_pid,
                    error = %e,
                    predecessor_gave_up,
                    "READY could not be sent"
                );
                self.feed_succession(SuccessionEvent::ReadyUnsent {
                    predecessor_gave_up,
                });
            }
        }
    }

    /// Sweeps every listener's queue (`sweep`), the workers' too. Done whenever the
    /// predecessor has let go (or is gone), and when a child exits while this process accepts
    /// (`on_successor_exit`).
    ///
    /// Why: accept wake-ups are exclusive, and the predecessor's accept, armed first, gets
    /// them all. A connection that arrives after the predecessor last entered its ring and
    /// before its cancel takes effect has its wake-up spent on that accept, which then ends
    /// with -ECANCELED without accepting it (with DEFER_TASKRUN the accept runs only when its
    /// owner enters the ring). No other waiter is woken for it: it waits in the queue until
    /// the next connection wakes our accept — for ever, if none comes (RELIABILITY.md, "A
    /// connection stranded at the let-go"; the regression tests are in `driver/tests.rs`).
    /// A sweep rather than a cancel and re-arm of the multishot accepts: between those two
    /// this process would accept nothing for a driver turn, which in a busy runtime is one
    /// whole tick (measured: the first 50 ms after a trigger with a 512-burst went from
    /// 14–26 to 36–190 ms p99.9).
    pub(super) fn sweep_queues(&mut self) {
        if !self.accepts.wanted {
            return;
        }
        self.tell_workers(|set| {
            set.sweeps.fetch_add(1, SeqCst);
        });
        // One `poll` finds the queues with a connection: a sweep of an empty queue is an accept
        // that allocates a socket and a file and frees them (with 10,000 listeners, ~30 % of a
        // successor's CPU through an upgrade). A connection queued after this poll wakes the
        // multishot accept as usual; the sweep is for those whose wake-up was already spent.
        let fds: Vec<_> = self.accepts.iter().map(|s| s.listener.fd.as_fd()).collect();
        for i in sys::readable_among(&fds) {
            self.sweep(i);
        }
    }

    /// Tells the successor, if any, that this process has let go (RELEASED).
    pub(super) fn send_released(&self) {
        if let Some(successor) = &self.successor {
            let msg = Message::Released(successor.upgrade).encode().expect("fits");
            let _ = sys::send_nonblocking(successor.channel.as_fd(), &msg);
        }
    }

    pub(super) fn cancel_takeover_polls(&mut self) {
        for i in 0..self.accepts.len() {
            let slot = &mut self.accepts[i];
            if let (Some(op), false) = (slot.takeover, slot.takeover_cancel_sent) {
                slot.takeover_cancel_sent = true;
                self.cancel(types::CancelBuilder::user_data(op.user_data()));
            }
        }
    }
}
