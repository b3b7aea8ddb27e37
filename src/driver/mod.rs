//! The driver: the one owner of the ring. It turns completions into [`Event`]s for the
//! [`Machine`] and the machine's [`Action`](crate::machine::Action)s into ring operations.
//!
//! In the ring, at once: a multishot accept per listener, a signalfd read (the upgrade signal,
//! SIGTERM, SIGINT), a multishot poll on the wake eventfd (API requests, the last connection closing,
//! fds freed, a worker's report), the HELLO SendMsg and the successor's messages (Recv), the
//! successor's exit (PollAdd on a pidfd), the predecessor's messages (Recv, EOF when it exits)
//! and one Timeout for the earliest deadline. Nothing in an upgrade blocks the accept loop: the
//! new binary is started on a thread of its own (`start_spawn`). A new process whose
//! predecessor is slow to let go also polls the listeners (`start_takeover`). With
//! `Builder::workers`, each worker thread runs a driver of its own with only its accepts and
//! its own wake eventfd (see `workers.rs`).
//!
//! This file holds the [`Driver`] itself: its making (`prepare`), its start, and its turn,
//! which hands each completion to the part it concerns:
//! - `ring.rs`: the op table, arming, cancelling, submitting and reaping, the final wait;
//! - `accept.rs`: the accepts, delivering connections, stopping and resuming;
//! - `takeover.rs`: the successor's side (taking the queues over from a slow predecessor, its
//!   RELEASED, deferred listens) and a worker following its coordinator;
//! - `upgrade.rs`: the predecessor's side (the machine's actions, the HELLO, replies, systemd,
//!   the pid file);
//! - `child.rs`: the new process it started (the spawn, its messages, its exit);
//! - `runtime.rs`: waiting in an async runtime (the wake set, the tokio adapter).
//!
//! Rules the driver relies on (measured on this kernel, see `IO_URING_FACTS.md`):
//! - a multishot accept CQE with `res >= 0` is a connection whatever its flags; the multishot
//!   ended when `IORING_CQE_F_MORE` is missing (an error, a full CQ, a cancel): re-arm unless the
//!   machine said stop;
//! - `-EMFILE`/`-ENFILE` end the multishot and leave the connection in the backlog: re-arm after
//!   a backoff, or as soon as a connection closes;
//! - stopping: `AsyncCancel`, then reap until the accept's own terminal CQE (`-ECANCELED`),
//!   serving every fd on the way. `close()` does not stop an armed accept, and `shutdown()` of a
//!   shared listener would destroy it for every process, so neither is used;
//! - the ring is `SINGLE_ISSUER | DEFER_TASKRUN`: connections the kernel has not handed to us yet
//!   stay in the listen backlog if this process dies, for a successor to take; no completion is
//!   visible until this thread enters the ring with GETEVENTS;
//! - the ring is `dontfork`, and spawning never forks the address space anyway;
//! - every op owns its memory (buffers, msghdr, fds) in the op table until its final CQE, and
//!   the ring is dropped only after every op reached it;
//! - a thread waiting in `io_uring_enter(GETEVENTS, min_complete=1)` (`Waiting::InRing`) is
//!   woken by the kernel directly when a completion's task work is queued
//!   (`io_req_local_work_add` wakes the submitter once `cq_wait_nr` is reached);
//! - a runtime that sleeps in epoll (`Waiting::InRuntime`) is woken by the fds the ring's ops
//!   wait on, never by an eventfd registered with the ring, whose signal the kernel may defer by
//!   an RCU grace period (see `wake_set.rs` and `docs/WAKEUPS.md`); a non-blocking enter runs
//!   only a batch of deferred work, so the runtime turns again while the ring fd polls readable
//!   (`has_pending_work`), and every SQE is submitted before it sleeps — or, when the kernel
//!   took fewer (EAGAIN, EBUSY, EINTR), the wake set's timer wakes it to submit the rest
//!   within `SUBMIT_RETRY`.

mod accept;
mod child;
mod pid_file;
mod ring;
pub(crate) mod runtime;
mod takeover;
#[cfg(test)]
mod tests;
mod upgrade;

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::Ordering::SeqCst;
use std::sync::{mpsc, Arc};
use std::time::Instant;

use io_uring::IoUring;

use crate::connection::Connection;
use crate::error::Error;
use crate::handoff::ListenerRecord;
use crate::inherit::PredecessorLink;
use crate::listener::{Listener, Listening, UdpSocketEntry};
use crate::machine::successor::{Succession, SuccessionEvent};
use crate::machine::{Event, ExitReason, Machine, Requester};
use crate::pidfile::write_pid_file;
use crate::shared::{Config, Request, RequestsOpen, Shared, UpgradeReply};
use crate::signals::StopSignal;
use crate::wake_set::WakeSet;
use crate::workers::{Coordinator, WorkerGone, WorkerSet};
use crate::{signals, sys};

use self::accept::Accepts;
use self::child::{SpawnResult, Successor, Terminating};
use self::ring::{errno, new_ring, retry_next_turn, Op, Ops, Token, SUBMIT_RETRY};
use self::upgrade::Timeline;

/// A driver's place among the rings of a process (thread-per-core: `workers.rs`).
enum Role {
    /// The process's only ring.
    Alone,
    /// Worker 0, which runs the machine; its guard tells the workers to quit once this driver
    /// is gone, however it ends.
    Coordinator(Coordinator),
    /// Worker `index`; its guard reports it stopped for good once this driver is gone.
    Worker(WorkerGone),
}

impl Role {
    /// The state shared with the other rings, if there are any.
    fn workers(&self) -> Option<&Arc<WorkerSet>> {
        match self {
            Role::Alone => None,
            Role::Coordinator(Coordinator(set)) => Some(set),
            Role::Worker(w) => Some(&w.set),
        }
    }

    /// 0 for the coordinator (or a lone ring), `1..n` for a worker.
    fn index(&self) -> usize {
        match self {
            Role::Worker(w) => w.index,
            _ => 0,
        }
    }
}

/// Where the thread that drives the ring sleeps between turns, which decides what wakes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Waiting {
    /// In `io_uring_enter(GETEVENTS)` (`Server::run`, `Worker::run`): the kernel wakes the
    /// thread itself when a completion is queued; deadlines are a ring `Timeout`.
    InRing,
    /// In an async runtime's reactor, on the driver's wake set (`Server::run_async`): see
    /// `wake_set.rs`.
    InRuntime,
}

/// The single owner of the ring. Driven by [`Driver::turn`].
pub(crate) struct Driver {
    ring: IoUring,
    /// With `Waiting::InRuntime`: the fds that wake the runtime (see `wake_set.rs`).
    wake_set: Option<WakeSet>,
    ops: Ops,
    accepts: Accepts,
    machine: Machine,
    shared: Arc<Shared>,
    config: Config,
    /// None for a worker: only the coordinator reads signals.
    signalfd: Option<OwnedFd>,
    /// Thread-per-core: this driver's place among the process's rings (see `workers.rs`).
    role: Role,
    successor: Option<Successor>,
    /// Handoff channels given up in a turn whose submit failed: kept open until the SQEs that
    /// may name them are submitted (see `close_channel`).
    closing_channels: Vec<OwnedFd>,
    /// Guard polls were armed beside accepts armed while a child lived (see `arm_accept`),
    /// and not ended yet (`end_guard_polls_if_alone`).
    guarding: bool,
    /// The end-of-turn submits still to refuse with EAGAIN, as a kernel out of memory for
    /// requests does (tests only).
    #[cfg(test)]
    refuse_submits: u32,
    /// No guard polls beside accepts armed while a child lives (see `arm_accept`), so that a
    /// test sees what else takes a stranded connection (tests only).
    #[cfg(test)]
    no_guard_polls: bool,
    /// Who waits for the answer to a `DrainCommitted` (see `answer_commits`).
    #[cfg(feature = "axum")]
    commits: Vec<(u64, tokio::sync::oneshot::Sender<bool>)>,
    predecessor: Option<PredecessorLink>,
    /// The predecessor's pid, kept after its link is gone: a SIGTERM from it means it gave up
    /// on this process (`Event::PredecessorGaveUp`), not an operator's stop.
    predecessor_pid: Option<u32>,
    /// Pidfds of the older generations that were alive when this one started; counted (and
    /// pruned) at each upgrade request against the generation limit.
    elders: Vec<OwnedFd>,
    /// UDP sockets, handed over with the listeners.
    udp: Vec<UdpSocketEntry>,
    /// Listeners the workers accept on, handed over by the coordinator.
    worker_listeners: Vec<WorkerMember>,
    timer: Option<(Instant, Token)>,
    replies: HashMap<u64, UpgradeReply>,
    /// The coordinator's (or a lone ring's): requests are taken while this driver lives.
    requests_open: Option<RequestsOpen>,
    /// The coordinator's (or a lone ring's): signals other threads get come to this thread.
    signal_reader: Option<crate::signals::Reader>,
    next_ticket: u64,
    exit: Option<ExitReason>,
    /// Reused buffer of (user_data, result, flags), so reaping allocates nothing.
    cqes: Vec<(u64, i32, u32)>,
    timeline: Timeline,
    /// The successor's side: READY, the takeover, the predecessor's let-go, whether systemd
    /// knows this process as the main one (see `machine/successor.rs`).
    succession: Succession,
    /// A worker: the coordinator's `sweeps` count last acted on.
    sweeps_seen: u64,
    /// A worker: the coordinator's stop (`WorkerSet::current_stop`) it is stopping for.
    stop_seen: u64,
    /// The pid file's previous content, moved aside by `prepare`, removed once started.
    pid_file_leftover: Option<std::path::PathBuf>,
    /// Children abandoned with SIGTERM, until they exit or are SIGKILLed (see `escalate`).
    terminating: Vec<Terminating>,
    /// Spawns in flight on their own threads (see `start_spawn`), and where they report.
    spawning: Vec<std::thread::JoinHandle<()>>,
    spawn_results: (mpsc::Sender<SpawnResult>, mpsc::Receiver<SpawnResult>),
    /// The current upgrade's span (`upgrade.id`, `child.pid`, `generation`): every log line of
    /// the upgrade is inside it.
    span: tracing::Span,
}

/// A worker's listener as the coordinator holds it, to hand it over: a duplicate of the fd.
pub(crate) struct WorkerMember {
    pub record: ListenerRecord,
    pub fd: OwnedFd,
    /// Whether it listens: a member bound by a successor listens only from its predecessor's
    /// release or the next handoff on (`Driver::listen_deferred`).
    pub listening: Listening,
}

/// What a coordinating (or lone) driver is made from: a built server's sockets, state and
/// configuration, taken apart by `Server::into_driver`.
pub(crate) struct ServerParts {
    pub listeners: Vec<Listener>,
    pub parent: Option<PredecessorLink>,
    pub elders: Vec<OwnedFd>,
    pub udp: Vec<UdpSocketEntry>,
    pub worker_listeners: Vec<WorkerMember>,
    pub shared: Arc<Shared>,
    pub config: Config,
    pub requests_open: RequestsOpen,
    pub signal_reader: signals::Reader,
}

impl Driver {
    /// Everything that can fail before the first accept: the ring, the signalfd, the wake
    /// set, the pid file. Nothing is armed yet (see [`Driver::start`]), so a failure here
    /// loses no connection: none has been taken.
    pub(crate) fn prepare(parts: ServerParts, waiting: Waiting) -> Result<Driver, Error> {
        let ServerParts {
            listeners,
            parent,
            elders,
            udp,
            worker_listeners,
            shared,
            config,
            requests_open,
            signal_reader,
        } = parts;
        let ring = new_ring()?;
        // The signalfd sees only signals blocked in the thread that reads it: this one, which
        // may not be the one that called `build`. And signals delivered to other threads are
        // forwarded here from now on (`signals.rs`).
        config
            .signals
            .thread_block()
            .map_err(|e| Error::io("blocking signals")(e.into()))?;
        let signal_reader = crate::signals::Reader::claim().replacing(signal_reader);
        let signalfd = sys::signalfd(&config.signals).map_err(Error::io("signalfd"))?;
        let id_seed = (std::process::id() as u64) << 32
            ^ std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0);
        let mut driver = Driver::base(ring, listeners, shared, config, waiting)?;
        let machine = Machine::new(driver.config.timeouts, id_seed)
            .with_generation_limit(driver.config.max_draining);
        driver.machine = match parent {
            Some(_) => machine.with_predecessor(),
            None => machine,
        };
        driver.signalfd = Some(signalfd);
        driver.predecessor_pid = parent.as_ref().map(|link| link.predecessor_pid);
        if parent.is_some() {
            driver.succession = Succession::handed_over();
        }
        driver.predecessor = parent;
        driver.elders = elders;
        driver.udp = udp;
        driver.worker_listeners = worker_listeners;
        driver.requests_open = Some(requests_open);
        driver.signal_reader = Some(signal_reader);
        driver.watch_initial()?;
        // Before the first accept: a burst must not find the table full (see the function).
        sys::grow_fd_table(driver.shared.wake.as_fd());
        if driver.predecessor_gave_up() {
            // Abandoned (ready deadline, shutdown) while starting: its SIGTERM is pending.
            // Nothing is taken yet and the pid file is the predecessor's: leave now.
            return Err(Error::Handoff(
                "the previous process gave up on this upgrade before it was ready".into(),
            ));
        }
        // The pid file before the first accept (the last step that can fail), and before READY:
        // the predecessor may exit within microseconds of READY, and the pid file must never
        // name a process that is gone. (If this upgrade is rolled back instead, the predecessor
        // writes its own pid back.)
        driver.pid_file_leftover = match &driver.config.pid_file {
            Some(path) => write_pid_file(path, std::process::id())
                .map_err(Error::io("writing the pid file"))?,
            None => None,
        };
        Ok(driver)
    }

    /// Arms the accepts and the other waits, and (a successor) tells the predecessor READY.
    ///
    /// The first accept runs inline when it is submitted and takes every connection already
    /// queued, so from here on this driver owns connections: nothing after the submit may
    /// fail the start. Everything that can fail comes before, in [`Driver::prepare`] and, for a
    /// runtime, the registration of the wake set (`serve_async`). A READY that cannot be sent
    /// (the predecessor closed the channel: it exited or gave up) does not stop this process:
    /// it serves on alone what it has taken.
    pub(crate) fn start(&mut self) -> Result<(), Error> {
        if !self.predecessor_holds_queue() && self.predecessor.is_none() {
            // No predecessor (or a worker started after it let go): nothing to wait for.
            self.listen_deferred();
        }
        if self.predecessor.is_some() && crate::fault::injected("slow-start") {
            tracing::warn!("fault injected: a slow start (300 ms before the first accept)");
            std::thread::sleep(std::time::Duration::from_millis(300));
        }
        if self.accepts.wanted {
            for i in 0..self.accepts.len() {
                self.arm_accept(i);
            }
        }
        self.arm_wake_read();
        // Accepts are armed in the kernel once submitted. Only then tell the predecessor we are
        // ready: it stops accepting on READY, and from that moment our accepts take the queue.
        // (A failed submit armed nothing: no connection was taken.)
        self.ring.submit().map_err(Error::io("arming accepts"))?;
        // The workers accept from now on (see `WorkerSet::coordinator_started`).
        self.tell_workers(|set| set.coordinator_started.store(true, SeqCst));
        if let Role::Worker(w) = &self.role {
            tracing::debug!(
                worker = w.index,
                listeners = self.accepts.len(),
                accepting = self.accepts.wanted,
                "worker started"
            );
            // Started after the coordinator stopped accepting: nothing to stop, and nothing
            // else would make it say so (its report comes from accepts ending).
            self.stop_seen = w.set.current_stop();
            self.report_if_stopped();
            return Ok(());
        }
        // The successor's side decides the rest: READY, the pid file, systemd.
        self.feed_succession(SuccessionEvent::Started);
        self.run_actions();
        // The signal read only now: READY's outcome depends on whether the predecessor's
        // SIGTERM is pending (`predecessor_gave_up`), and an armed read could take it first.
        self.arm_signal_read();
        // What the actions queued (accepts on members that listen only now, the unlink, the
        // signal read).
        if let Err(e) = self.ring.submit() {
            if !ring::retry_next_turn(&e) {
                tracing::warn!(error = %e, "submitting after the start");
            }
        }
        tracing::info!(
            pid = std::process::id(),
            listeners = self.accepts.len(),
            // What starting up cost, exec included: under load it competes with the serving.
            startup_cpu_us = sys::process_cpu_time().as_micros() as u64,
            "serving"
        );
        Ok(())
    }

    /// A driver with its accepts (not armed yet) and nothing else: no signals, no machine
    /// limits, no predecessor; the constructors fill in their part.
    fn base(
        ring: IoUring,
        listeners: Vec<Listener>,
        shared: Arc<Shared>,
        config: Config,
        waiting: Waiting,
    ) -> Result<Driver, Error> {
        let wake_set = match waiting {
            Waiting::InRing => None,
            Waiting::InRuntime => Some(WakeSet::new().map_err(Error::io("the wake set"))?),
        };
        Ok(Driver {
            ring,
            wake_set,
            ops: Ops::default(),
            accepts: Accepts::new(listeners, true),
            machine: Machine::new(config.timeouts, 0),
            shared,
            config,
            signalfd: None,
            role: Role::Alone,
            successor: None,
            predecessor: None,
            predecessor_pid: None,
            elders: Vec::new(),
            udp: Vec::new(),
            worker_listeners: Vec::new(),
            timer: None,
            replies: HashMap::new(),
            requests_open: None,
            signal_reader: None,
            next_ticket: 0,
            exit: None,
            cqes: Vec::with_capacity(1024),
            timeline: Timeline::default(),
            succession: Succession::alone(),
            sweeps_seen: 0,
            stop_seen: 0,
            pid_file_leftover: None,
            terminating: Vec::new(),
            closing_channels: Vec::new(),
            guarding: false,
            #[cfg(test)]
            refuse_submits: 0,
            #[cfg(test)]
            no_guard_polls: false,
            #[cfg(feature = "axum")]
            commits: Vec::new(),
            spawning: Vec::new(),
            spawn_results: mpsc::channel(),
            span: tracing::Span::none(),
        })
    }

    /// Makes this (coordinating) driver lead the workers of `set`.
    pub(crate) fn with_workers(mut self, coordinator: Coordinator) -> Driver {
        self.role = Role::Coordinator(coordinator);
        self
    }

    /// A worker's [`Driver::prepare`]: an accept ring on its listeners, on the calling thread,
    /// following the coordinator through its worker set. Its connections go to the sink of its
    /// own `turn`s.
    pub(crate) fn prepare_worker(
        listeners: Vec<Listener>,
        config: Config,
        gone: WorkerGone,
        waiting: Waiting,
    ) -> Result<Driver, Error> {
        let (set, shared) = (gone.set.clone(), gone.shared.clone());
        let ring = new_ring()?;
        let mut driver = Driver::base(ring, listeners, shared, config, waiting)?;
        driver.role = Role::Worker(gone);
        driver.accepts.wanted = set.wants_accepting();
        driver.watch_initial()?;
        // Accepts armed from here on take what is queued anyway (see `sweep_queues`).
        driver.sweeps_seen = set.sweeps.load(SeqCst);
        Ok(driver)
    }

    /// One turn: submit, wait for at least one completion if `wait`, handle every completion,
    /// fire due deadlines, carry out the machine's actions. `Some` once the server is done.
    pub(crate) fn turn(
        &mut self,
        wait: bool,
        sink: &mut dyn FnMut(Connection),
    ) -> Result<Option<ExitReason>, Error> {
        if self.exit.is_some() {
            return Ok(self.exit);
        }
        self.arm_timer();
        if let Some(set) = &mut self.wake_set {
            // Before entering: what becomes ready from here on is a new edge, a new wake-up.
            let accepts = &mut self.accepts;
            set.drain(|i| accepts.note_woken(i));
        }
        self.enter(wait)?;
        self.reap(sink);
        self.sweep_missed();
        self.on_time(Instant::now());
        self.run_actions();
        self.check_drained();
        self.run_actions();
        self.answer_commits();
        if self.exit.is_some() {
            self.finish();
            return Ok(self.exit);
        }
        // Handling completions queued new SQEs (re-armed reads, cancels, the HELLO…) and may
        // have moved the next deadline (a new phase, a timer that fired for a deadline since
        // replaced). Arm it and submit now: a runtime that sleeps on the wake set after this
        // turn would otherwise sleep with, say, the wake eventfd's read or the start deadline
        // not armed, and miss the wake-up.
        self.arm_timer();
        self.publish_children();
        if !self.ring.submission().is_empty() {
            if let Err(e) = self.submit_queued() {
                if !retry_next_turn(&e) {
                    return Err(Error::io("io_uring_enter")(e));
                }
            }
        }
        if self.ring.submission().is_empty() {
            // Every SQE issued: the channels kept for them can close.
            self.closing_channels.clear();
        } else if let Some(set) = &mut self.wake_set {
            // The kernel took fewer than queued (EAGAIN or EBUSY: no memory for requests; or
            // EINTR). Nothing the runtime waits on becomes ready for SQEs the kernel never
            // saw — an accept re-armed, the cancels of a stop — so it would sleep with them
            // queued: its timer brings it back to submit them. (A blocking `run` submits
            // them at its next enter, which does not wait while any is left.)
            let now = Instant::now();
            set.set_timer(now + SUBMIT_RETRY, now);
        }
        Ok(None)
    }

    /// Submits the queued SQEs (see `turn`).
    fn submit_queued(&mut self) -> std::io::Result<usize> {
        #[cfg(test)]
        if self.refuse_submits > 0 {
            self.refuse_submits -= 1;
            return Err(std::io::Error::from_raw_os_error(libc::EAGAIN));
        }
        self.ring.submit()
    }

    /// The signalfd's read completed: the upgrade signal upgrades; SIGTERM/SIGINT stop (the
    /// application's hook hears it first), the predecessor's SIGTERM as `PredecessorGaveUp`
    /// (it gave up on this process).
    fn on_signal(&mut self, token: Token, res: i32) {
        let Some(Op::ReadSignal(info)) = self.ops.remove(token) else {
            unreachable!()
        };
        if res == std::mem::size_of::<libc::signalfd_siginfo>() as i32 {
            let signo = info.ssi_signo as i32;
            if signo == self.config.upgrade_signal.signal() as i32 {
                self.request_upgrade(Requester::Signal);
            } else if let Some(stop) = StopSignal::from_raw(signo) {
                if let Some(hook) = &self.config.on_stop_signal {
                    hook.call(stop);
                }
                if self.predecessor_pid == Some(info.ssi_pid) {
                    tracing::info!("the previous process gave up on this one; stopping");
                    self.feed_succession(SuccessionEvent::GaveUp);
                    self.feed(Event::PredecessorGaveUp);
                } else {
                    tracing::info!(signal = signo, sender = info.ssi_pid, "shutdown requested");
                    self.feed(Event::ShutdownRequested);
                }
            }
        } else if res < 0 && res != -libc::ECANCELED {
            tracing::error!(error = %errno(res), "reading the signalfd failed");
        }
        if res != -libc::ECANCELED {
            self.arm_signal_read();
        }
    }

    fn on_wake(&mut self) {
        self.collect_spawns();
        // A worker may have reported that it stopped accepting.
        self.report_if_stopped();
        for request in self.shared.take_requests() {
            match request {
                Request::Upgrade(reply) => {
                    self.next_ticket += 1;
                    self.replies.insert(self.next_ticket, reply);
                    self.request_upgrade(Requester::Api(self.next_ticket));
                }
                Request::Shutdown => self.feed(Event::ShutdownRequested),
                #[cfg(feature = "axum")]
                Request::CommitDrain(seq, reply) => {
                    self.feed(Event::DrainCommitted(seq));
                    self.commits.push((seq, reply));
                }
            }
        }
        // A connection closed: fds may be free again, retry paused accepts now.
        if self.accepts.wanted {
            for i in self.accepts.take_retries(None) {
                self.arm_accept(i);
            }
        }
    }

    /// Answers the `DrainCommitted` requests the machine has decided: committed (and no
    /// connection is handed over any more), or refused because the drain resumed first.
    fn answer_commits(&mut self) {
        #[cfg(feature = "axum")]
        for (seq, reply) in std::mem::take(&mut self.commits) {
            match self.machine.drain_commit(seq) {
                Some(committed) => {
                    let _ = reply.send(committed);
                }
                None => self.commits.push((seq, reply)),
            }
        }
    }

    fn on_time(&mut self, now: Instant) {
        // At the ready deadline the machine first asks for what the successor sent
        // (`ReadSuccessor`): a READY already on the channel is a READY in time.
        self.machine.handle_timeout(now);
        self.escalate(now);
        self.succession
            .handle_timeout(now, self.machine.accepting());
        if self.accepts.wanted {
            for i in self.accepts.take_retries(Some(now)) {
                self.arm_accept(i);
            }
        }
    }

    /// Reports the drain as complete once accepting has fully stopped (every fd accepted on
    /// the way is counted) and no connection is live.
    fn check_drained(&mut self) {
        if self.machine.awaits_drained()
            && self.all_accepts_stopped()
            && self.shared.live.load(SeqCst) == 0
        {
            self.feed(Event::ConnectionsDrained);
        }
    }

    fn feed(&mut self, event: Event) {
        let now = Instant::now();
        let t = &mut self.timeline;
        match &event {
            Event::SuccessorSpawned { .. } => t.spawned = Some(now),
            Event::ListenersSent => t.hello_sent = Some(now),
            Event::SuccessorReady(_) => t.ready = Some(now),
            Event::AcceptStopped => {
                t.accept_stopped = Some(now);
                if let Some(ready) = t.ready {
                    tracing::debug!(
                        let_go_us = now.saturating_duration_since(ready).as_micros() as u64,
                        "accepting stopped after READY"
                    );
                }
            }
            Event::ConnectionsDrained => t.drained = Some(now),
            _ => {}
        }
        self.machine.handle(event, now);
    }

    /// Carries out both machines' actions until neither has one left (an action may feed
    /// either machine again).
    fn run_actions(&mut self) {
        loop {
            if let Some(action) = self.succession.poll_action() {
                self.act_succession(action);
            } else if let Some(action) = self.machine.poll_action() {
                let span = self.span.clone();
                let _in_upgrade = span.enter();
                self.act(action);
            } else {
                return;
            }
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        if self.ops.live > 0 {
            self.finish();
        } else {
            self.abandon_spawns();
        }
    }
}
