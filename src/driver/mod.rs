//! The driver: the one owner of the ring. It turns completions into [`Event`]s for the
//! [`Machine`] and the machine's [`Action`]s into ring operations.
//!
//! In the ring, at once: a multishot accept per listener, a signalfd read (SIGHUP, SIGTERM,
//! SIGINT), a multishot poll on the wake eventfd (API requests, the last connection closing,
//! fds freed, a worker's report), the HELLO SendMsg and the successor's messages (Recv), the
//! successor's exit (PollAdd on a pidfd), the predecessor's messages (Recv, EOF when it exits)
//! and one Timeout for the earliest deadline. Nothing in an upgrade blocks the accept loop: the
//! new binary is started on a thread of its own (`start_spawn`). A new process whose
//! predecessor is slow to let go also polls the listeners (`start_takeover`). With
//! `Builder::workers`, each worker thread runs a driver of its own with only its accepts and
//! its own wake eventfd (see `workers.rs`).
//!
//! Rules this file relies on (measured on this kernel, see `IO_URING_FACTS.md`):
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
//!   (`has_pending_work`), and every SQE is submitted before it sleeps.
#![allow(unsafe_code)]

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use io_uring::{cqueue, opcode, squeue, types, IoUring};

use crate::connection::{Connection, DrainGuard};
use crate::handle::Handle;
use crate::handoff::{ListenerRecord, Message, SocketKind, MAX_LISTENERS};
use crate::inherit::ParentLink;
use crate::listener::{Endpoint, Listener, UdpSocketEntry};
use crate::machine::{
    Action, DrainCause, Event, ExitReason, Machine, Outcome, Phase, Requester, Stop, UpgradeId,
};
use crate::pidfile::write_pid_file;
use crate::server::{Server, Worker};
use crate::shared::{Config, Request, Shared};
use crate::wake_set::{Source, WakeSet};
use crate::workers::{Coordinator, WorkerGone, WorkerSet};
use crate::{control, spawn, sys, systemd, Error, UpgradeError};

/// Submission queue size: only a handful of ops are ever queued at once.
const SQ_ENTRIES: u32 = 256;
/// Completion queue size: well above any accept burst between two reaps (a 10k burst never
/// ended the multishot with 16k entries; when it does end, it is re-armed at once).
const CQ_ENTRIES: u32 = 16 * 1024;
/// First and largest pause before re-arming an accept that failed for lack of fds or memory.
const BACKOFF_MIN: Duration = Duration::from_millis(1);
const BACKOFF_MAX: Duration = Duration::from_millis(200);
/// How long the exit path waits for cancelled ops to complete.
const FINAL_REAP: Duration = Duration::from_secs(2);
/// READY and RETIRING are 14 bytes; a larger message is garbage and fails to decode.
const CHANNEL_BUF: usize = 64;

/// `IORING_ENTER_GETEVENTS`: with DEFER_TASKRUN, deferred completions are only run (and become
/// visible) when the issuer enters with this flag.
const ENTER_GETEVENTS: u32 = 1;

type Token = u64;

/// What an in-flight op is and the memory it owns until its final CQE.
// Some buffers are only ever written by the kernel: owning them is their whole purpose.
#[allow(dead_code)]
enum Op {
    Accept(usize),
    /// A takeover poll on listener `i` (see `start_takeover`).
    TakeoverPoll(usize),
    /// A one-shot, non-waiting accept on listener `i` (see `sweep`).
    SweepAccept(usize),
    ReadSignal(Box<libc::signalfd_siginfo>),
    PollWake,
    Timer(Box<types::Timespec>),
    SendHello(Box<SendMsgBufs>),
    RecvSuccessor {
        pid: u32,
        buf: Box<[u8; CHANNEL_BUF]>,
    },
    RecvPredecessor(Box<[u8; CHANNEL_BUF]>),
    SuccessorExit {
        pid: u32,
        _pidfd: OwnedFd,
    },
    /// Removing a file off the serving path (see `unlink_later`).
    Unlink(std::ffi::CString),
    Cancel,
}

/// The op table: a slab whose keys carry a generation, so a stale token never matches a reused
/// slot.
#[derive(Default)]
struct Ops {
    slots: Vec<(u32, Option<Op>)>,
    free: Vec<u32>,
    live: usize,
}

impl Ops {
    fn insert(&mut self, op: Op) -> Token {
        let index = match self.free.pop() {
            Some(i) => i,
            None => {
                self.slots.push((0, None));
                (self.slots.len() - 1) as u32
            }
        };
        let slot = &mut self.slots[index as usize];
        slot.0 = slot.0.wrapping_add(1);
        slot.1 = Some(op);
        self.live += 1;
        ((slot.0 as u64) << 32) | index as u64
    }

    fn get(&self, token: Token) -> Option<&Op> {
        let (gen, index) = ((token >> 32) as u32, token as u32);
        match self.slots.get(index as usize) {
            Some((g, Some(op))) if *g == gen => Some(op),
            _ => None,
        }
    }

    fn remove(&mut self, token: Token) -> Option<Op> {
        let (gen, index) = ((token >> 32) as u32, token as u32);
        match self.slots.get_mut(index as usize) {
            Some((g, op @ Some(_))) if *g == gen => {
                self.free.push(index);
                self.live -= 1;
                op.take()
            }
            _ => None,
        }
    }
}

/// The HELLO message in flight: msghdr, iovec, payload and control buffer stay put until the
/// SendMsg completes (the box never moves; the Vecs' heap buffers never move).
struct SendMsgBufs {
    msg: libc::msghdr,
    iov: libc::iovec,
    payload: Vec<u8>,
    control: Vec<u64>,
    /// Fds sent that nothing else keeps open (this process's own pidfd).
    _keep: Vec<OwnedFd>,
}

impl SendMsgBufs {
    fn new(payload: Vec<u8>, fds: &[RawFd], keep: Vec<OwnedFd>) -> Box<SendMsgBufs> {
        let fd_bytes = std::mem::size_of_val(fds) as u32;
        // SAFETY: CMSG_SPACE is a pure size computation.
        let space = unsafe { libc::CMSG_SPACE(fd_bytes) } as usize;
        let mut bufs = Box::new(SendMsgBufs {
            // SAFETY: msghdr is plain data; all-zero is valid.
            msg: unsafe { std::mem::zeroed() },
            iov: libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            },
            payload,
            control: vec![0u64; space.div_ceil(8)],
            _keep: keep,
        });
        bufs.iov.iov_base = bufs.payload.as_mut_ptr().cast();
        bufs.iov.iov_len = bufs.payload.len();
        bufs.msg.msg_iov = &mut bufs.iov;
        bufs.msg.msg_iovlen = 1;
        if !fds.is_empty() {
            bufs.msg.msg_control = bufs.control.as_mut_ptr().cast();
            bufs.msg.msg_controllen = space;
            // SAFETY: msg_control points at `space` zeroed, 8-aligned bytes, room for one cmsghdr
            // followed by `fds`.
            unsafe {
                let cmsg = libc::CMSG_FIRSTHDR(&bufs.msg);
                (*cmsg).cmsg_level = libc::SOL_SOCKET;
                (*cmsg).cmsg_type = libc::SCM_RIGHTS;
                (*cmsg).cmsg_len = libc::CMSG_LEN(fd_bytes) as usize;
                std::ptr::copy_nonoverlapping(
                    fds.as_ptr(),
                    libc::CMSG_DATA(cmsg).cast::<RawFd>(),
                    fds.len(),
                );
            }
        }
        bufs
    }
}

struct AcceptSlot {
    listener: Listener,
    /// The control socket: its connections are served by ringflip, not the application.
    control: bool,
    /// The armed multishot accept, until its terminal CQE.
    op: Option<Token>,
    cancel_sent: bool,
    /// Set while re-arming is paused after a resource error.
    retry_at: Option<Instant>,
    backoff: Duration,
    /// The error that paused this listener, logged once per episode.
    paused_by: Option<i32>,
    /// The takeover poll, while armed, and whether its cancel was sent.
    takeover: Option<Token>,
    takeover_cancel_sent: bool,
    /// The sweeping accept in flight (at most one per listener; see `sweep`).
    sweep_accept: Option<Token>,
    /// Connections delivered from this listener so far.
    delivered: u64,
    /// `delivered` when this listener last woke the runtime (see `sweep_missed`).
    woke_at: Option<u64>,
    /// Seen listening (see `Driver::listening`). A socket that listens never stops here, so
    /// once true this is the answer; while false the kernel is asked again.
    seen_listening: std::cell::Cell<bool>,
}

impl AcceptSlot {
    fn new(listener: Listener) -> AcceptSlot {
        AcceptSlot {
            control: &*listener.name == control::CONTROL_LISTENER,
            listener,
            op: None,
            cancel_sent: false,
            retry_at: None,
            backoff: BACKOFF_MIN,
            paused_by: None,
            takeover: None,
            takeover_cancel_sent: false,
            sweep_accept: None,
            delivered: 0,
            woke_at: None,
            seen_listening: std::cell::Cell::new(false),
        }
    }

    /// Whether any accepting op of this listener is still in flight.
    fn armed(&self) -> bool {
        self.op.is_some() || self.takeover.is_some() || self.sweep_accept.is_some()
    }
}

/// The new process while it starts and after it took over.
struct Successor {
    pid: u32,
    upgrade: UpgradeId,
    channel: OwnedFd,
    /// A duplicate of the exit watch's pidfd: signals reach this process and no other, even
    /// after it was reaped and its pid reused.
    pidfd: OwnedFd,
}

/// A child abandoned with `Stop::Terminate` (SIGTERM): SIGKILLed at `kill_at` if it has not
/// exited by then (see `escalate`).
struct Terminating {
    pid: u32,
    pidfd: OwnedFd,
    kill_at: Instant,
}

/// What a spawn thread needs: the binary, its arguments, the signals to reset, the upgrade.
struct SpawnJob {
    exe: std::path::PathBuf,
    args: Vec<std::ffi::OsString>,
    signals: nix::sys::signal::SigSet,
    upgrade: UpgradeId,
}

/// What a spawn thread reports.
struct SpawnResult {
    upgrade: UpgradeId,
    result: io::Result<spawn::Spawned>,
    took: Duration,
}

impl SpawnJob {
    fn run(self) -> SpawnResult {
        let started = Instant::now();
        let result = spawn::spawn(&self.exe, &self.args, self.upgrade, &self.signals);
        SpawnResult {
            upgrade: self.upgrade,
            result,
            took: started.elapsed(),
        }
    }
}

/// When each step of the current upgrade happened, for the log (target `ringflip::timeline`)
/// and the benchmarks.
#[derive(Clone, Copy, Default)]
struct Timeline {
    upgrade: Option<UpgradeId>,
    trigger: Option<Instant>,
    spawned: Option<Instant>,
    hello_sent: Option<Instant>,
    ready: Option<Instant>,
    accept_stopped: Option<Instant>,
    drained: Option<Instant>,
}

impl Timeline {
    fn log(&self, exited: Instant) {
        let Some(t0) = self.trigger else { return };
        let us = |t: Option<Instant>| {
            t.map(|t| t.saturating_duration_since(t0).as_micros() as i64)
                .unwrap_or(-1)
        };
        let trigger_mono_us = sys::monotonic_us().saturating_sub(t0.elapsed().as_micros() as u64);
        let upgrade = self.upgrade.map(|id| id.to_string()).unwrap_or_default();
        tracing::info!(
            target: "ringflip::timeline",
            trigger_mono_us,
            // Also in the span, but spans may be filtered out.
            upgrade.id = %upgrade,
            spawned_us = us(self.spawned),
            hello_sent_us = us(self.hello_sent),
            ready_us = us(self.ready),
            accept_stopped_us = us(self.accept_stopped),
            drained_us = us(self.drained),
            exited_us = us(Some(exited)),
            "upgrade timeline (from the trigger)"
        );
    }
}

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
    accepts: Vec<AcceptSlot>,
    accepting: bool,
    machine: Machine,
    shared: Arc<Shared>,
    config: Config,
    /// None for a worker: only the coordinator reads signals.
    signalfd: Option<OwnedFd>,
    /// Thread-per-core: this driver's place among the process's rings (see `workers.rs`).
    role: Role,
    /// Connections this driver accepted (logged at exit).
    accepted: u64,
    /// Stopping was reported (to the machine, or by a worker to the coordinator) since the
    /// last stop: once per stop, so the timeline keeps the first moment.
    stop_reported: bool,
    successor: Option<Successor>,
    predecessor: Option<ParentLink>,
    /// Pidfds of the older generations that were alive when this one started; counted (and
    /// pruned) at each upgrade request against the generation limit.
    elders: Vec<OwnedFd>,
    /// UDP sockets, handed over with the listeners.
    udp: Vec<UdpSocketEntry>,
    /// Listeners the workers accept on, handed over by the coordinator.
    worker_listeners: Vec<(ListenerRecord, OwnedFd)>,
    timer: Option<(Instant, Token)>,
    drain_active: bool,
    drained_reported: bool,
    replies: HashMap<u64, mpsc::Sender<Result<u32, UpgradeError>>>,
    /// The coordinator's (or a lone ring's): requests are taken while this driver lives.
    requests_open: Option<crate::shared::RequestsOpen>,
    /// The coordinator's (or a lone ring's): signals other threads get come to this thread.
    signal_reader: Option<crate::signals::Reader>,
    next_ticket: u64,
    exit: Option<ExitReason>,
    /// Reused buffer of (user_data, result, flags), so reaping allocates nothing.
    cqes: Vec<(u64, i32, u32)>,
    timeline: Timeline,
    /// Takeover polls are wanted: from this (new) process's READY until its predecessor says it
    /// stopped accepting (or exits). See `start_takeover`.
    takeover: bool,
    /// When to start the takeover polls unless the predecessor has let go by then.
    takeover_at: Option<Instant>,
    /// A worker: the coordinator's `sweeps` count last acted on.
    sweeps_seen: u64,
    /// A worker: the coordinator's stop (`WorkerSet::current_stop`) it is stopping for.
    stop_seen: u64,
    /// The kernel refused `IORING_ACCEPT_DONTWAIT` (see `sweep`).
    no_dontwait: bool,
    /// Set by `finish`: from then on nothing is armed (see `arm`).
    finishing: bool,
    /// The pid file's previous content, moved aside by `prepare`, removed once started.
    pid_file_leftover: Option<std::path::PathBuf>,
    /// Children abandoned with SIGTERM, until they exit or are SIGKILLed (see `escalate`).
    terminating: Vec<Terminating>,
    /// systemd knows this process as the service's main one: it started it (no predecessor),
    /// or the predecessor announced it (`MAINPID=`, before its RELEASED), or it took the
    /// service back (`ResumeAccepting`). Only the main process says `STOPPING=1`: a successor
    /// abandoned before that, stopping, must not stop the whole unit (`NotifyAccess=all`).
    is_main: bool,
    /// Spawns in flight on their own threads (see `start_spawn`), and where they report.
    spawning: Vec<std::thread::JoinHandle<()>>,
    spawn_results: (mpsc::Sender<SpawnResult>, mpsc::Receiver<SpawnResult>),
    /// The current upgrade's span (`upgrade.id`, `child.pid`, `generation`): every log line of
    /// the upgrade is inside it.
    span: tracing::Span,
}

impl Driver {
    /// A started driver: [`Driver::prepare`], then [`Driver::start`].
    #[cfg(test)]
    pub(crate) fn new(server: Server, waiting: Waiting) -> Result<Driver, Error> {
        let mut driver = Driver::prepare(server, waiting)?;
        driver.start()?;
        Ok(driver)
    }

    /// Everything that can fail before the first accept: the ring, the signalfd, the wake
    /// set, the pid file. Nothing is armed yet (see [`Driver::start`]), so a failure here
    /// loses no connection: none has been taken.
    pub(crate) fn prepare(server: Server, waiting: Waiting) -> Result<Driver, Error> {
        let Server {
            listeners,
            parent,
            elders,
            udp,
            worker_listeners,
            shared,
            config,
            requests_open,
            signal_reader,
            ..
        } = server;
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
        driver.machine = Machine::new(driver.config.timeouts, id_seed)
            .with_generation_limit(driver.config.max_draining);
        driver.signalfd = Some(signalfd);
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
        if self.accepting {
            for i in 0..self.accepts.len() {
                self.arm_accept(i);
            }
        }
        if self.predecessor.is_some() {
            // READY goes out below; give the predecessor a moment to let go by itself.
            self.takeover_at = Some(Instant::now() + TAKEOVER_AFTER);
        }
        self.arm_signal_read();
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
                accepting = self.accepting,
                "worker started"
            );
            // Started after the coordinator stopped accepting: nothing to stop, and nothing
            // else would make it say so (its report comes from accepts ending).
            self.stop_seen = w.set.current_stop();
            self.report_if_stopped();
            return Ok(());
        }
        if let Some(link) = &self.predecessor {
            let ready = Message::Ready(link.upgrade).encode().expect("READY fits");
            // Read before the send: on a shared core the predecessor may run (and act on the
            // READY) before this thread gets the CPU back.
            let sent_mono_us = sys::monotonic_us();
            match sys::send_nonblocking(link.channel.as_fd(), &ready) {
                Ok(()) => {
                    // On the timeline target, with the monotonic clock: the benchmarks measure
                    // from this moment to the old process's "accepting stopped".
                    tracing::info!(
                        target: "ringflip::timeline",
                        predecessor = link.parent_pid,
                        upgrade.id = %link.upgrade,
                        sent_mono_us,
                        "READY sent"
                    );
                    self.arm_predecessor_recv();
                }
                Err(e) if self.predecessor_gave_up() => {
                    // It abandoned this process (its SIGTERM is pending and drains what the
                    // accepts took): not the main process, not serving alone. The pid file
                    // goes back to what it was.
                    tracing::warn!(
                        predecessor = link.parent_pid,
                        error = %e,
                        "the previous process gave up on this upgrade; stopping"
                    );
                    self.restore_pid_file();
                    self.predecessor = None;
                    return Ok(());
                }
                Err(e) => {
                    tracing::warn!(
                        predecessor = link.parent_pid,
                        error = %e,
                        "READY could not be sent (the previous process is gone); serving alone"
                    );
                    self.predecessor = None;
                    self.end_takeover(true);
                }
            }
        }
        if let Some(leftover) = self.pid_file_leftover.take() {
            self.unlink_later(leftover);
            // In the kernel's hands now rather than at the first turn. (A process killed
            // before io-wq runs it leaves that one small file behind.)
            let _ = self.ring.submit();
        }
        if self.predecessor.is_none() {
            // A successor does not: its predecessor announces it with MAINPID= on READY.
            self.is_main = true;
            systemd::notify(self.config.notify_socket.as_deref(), "READY=1");
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
            accepts: listeners.into_iter().map(AcceptSlot::new).collect(),
            accepting: true,
            machine: Machine::new(config.timeouts, 0),
            shared,
            config,
            signalfd: None,
            role: Role::Alone,
            accepted: 0,
            stop_reported: false,
            successor: None,
            predecessor: None,
            elders: Vec::new(),
            udp: Vec::new(),
            worker_listeners: Vec::new(),
            timer: None,
            drain_active: false,
            drained_reported: false,
            replies: HashMap::new(),
            requests_open: None,
            signal_reader: None,
            next_ticket: 0,
            exit: None,
            cqes: Vec::with_capacity(1024),
            timeline: Timeline::default(),
            takeover: false,
            takeover_at: None,
            sweeps_seen: 0,
            stop_seen: 0,
            no_dontwait: false,
            finishing: false,
            pid_file_leftover: None,
            terminating: Vec::new(),
            is_main: false,
            spawning: Vec::new(),
            spawn_results: mpsc::channel(),
            span: tracing::Span::none(),
        })
    }

    /// Puts into the wake set (if any) every fd the ring is about to wait on: before the ring
    /// arms its first op on them, as `wake_set.rs` requires.
    fn watch_initial(&self) -> Result<(), Error> {
        let Some(set) = &self.wake_set else {
            return Ok(());
        };
        let watch = |fd: std::os::fd::BorrowedFd<'_>, source| {
            set.add(fd, source)
                .map_err(Error::io("adding to the wake set"))
        };
        // SAFETY: the wake eventfd outlives this driver (owned by `shared` or `workers`).
        let wake = unsafe { std::os::fd::BorrowedFd::borrow_raw(self.own_wake_fd()) };
        watch(wake, Source::Other)?;
        if let Some(fd) = &self.signalfd {
            watch(fd.as_fd(), Source::Other)?;
        }
        if let Some(link) = &self.predecessor {
            watch(link.channel.as_fd(), Source::Other)?;
        }
        if self.accepting {
            self.watch_listeners();
        }
        Ok(())
    }

    /// Adds `fd` to the wake set, if any; a failure (no memory, the user's epoll watch limit)
    /// is logged: the fd's events are then seen at the next wake-up of another kind, at the
    /// latest at the next deadline.
    fn watch(&self, fd: std::os::fd::BorrowedFd<'_>) {
        if let Some(set) = &self.wake_set {
            if let Err(e) = set.add(fd, Source::Other) {
                tracing::error!(error = %e, "adding an fd to the wake set");
            }
        }
    }

    /// Listeners wake the runtime while this driver accepts, and only then: a draining process
    /// is not woken for connections its successor takes.
    fn watch_listeners(&self) {
        let Some(set) = &self.wake_set else { return };
        for (i, slot) in self.accepts.iter().enumerate() {
            if !self.listening(i) {
                continue; // watched once it listens (`listen_deferred`)
            }
            if let Err(e) = set.add(slot.listener.fd.as_fd(), Source::Listener(i)) {
                tracing::error!(listener = %slot.listener.name, error = %e, "adding a listener to the wake set");
            }
        }
    }

    fn unwatch_listeners(&self) {
        let Some(set) = &self.wake_set else { return };
        for slot in &self.accepts {
            set.remove(slot.listener.fd.as_fd());
        }
    }

    /// Makes this (coordinating) driver lead the workers of `set`.
    pub(crate) fn with_workers(mut self, coordinator: Coordinator) -> Driver {
        self.role = Role::Coordinator(coordinator);
        self
    }

    /// A worker: an accept ring on its listeners, on the calling thread, following the
    /// coordinator through its worker set. Its connections go to the sink of its own `turn`s.
    /// A started worker: [`Driver::prepare_worker`], then [`Driver::start`].
    #[cfg(test)]
    pub(crate) fn new_worker(worker: Worker, waiting: Waiting) -> Result<Driver, Error> {
        let mut driver = Driver::prepare_worker(worker, waiting)?;
        driver.start()?;
        Ok(driver)
    }

    /// A worker's [`Driver::prepare`].
    pub(crate) fn prepare_worker(worker: Worker, waiting: Waiting) -> Result<Driver, Error> {
        let Worker {
            listeners,
            config,
            gone,
        } = worker;
        let (set, shared) = (gone.set.clone(), gone.shared.clone());
        let ring = new_ring()?;
        let mut driver = Driver::base(ring, listeners, shared, config, waiting)?;
        driver.role = Role::Worker(gone);
        driver.accepting = set.wants_accepting();
        driver.watch_initial()?;
        // Accepts armed from here on take what is queued anyway (see `sweep_queues`).
        driver.sweeps_seen = set.sweeps.load(SeqCst);
        Ok(driver)
    }

    /// Whether the predecessor abandoned this process: it closed the handoff channel while it
    /// is still alive (its pidfd, the first of the elders the HELLO carried, not readable).
    /// It then also sent SIGTERM (`Stop::Terminate`), which is pending here.
    fn predecessor_gave_up(&self) -> bool {
        let Some(link) = &self.predecessor else {
            return false;
        };
        sys::peer_closed(link.channel.as_fd())
            && self
                .elders
                .first()
                .is_some_and(|parent| !sys::poll_readable(parent.as_fd()))
    }

    /// Puts the pid file's previous content back (`prepare` exchanged it with this process's
    /// pid): for a start that turned out to be abandoned.
    fn restore_pid_file(&mut self) {
        let (Some(path), Some(leftover)) = (&self.config.pid_file, self.pid_file_leftover.take())
        else {
            return;
        };
        use nix::fcntl::{renameat2, RenameFlags, AT_FDCWD};
        match renameat2(
            AT_FDCWD,
            &leftover,
            AT_FDCWD,
            path,
            RenameFlags::RENAME_EXCHANGE,
        ) {
            Ok(()) => self.unlink_later(leftover),
            Err(e) => tracing::warn!(error = %e, "restoring the pid file"),
        }
    }

    /// Whether listener `i` listens: not yet for a new member of a per-worker group in a
    /// successor (bound in `build`, see `Driver::listen_deferred`). Asked of the kernel
    /// (`SO_ACCEPTCONN`) until it says yes, since the coordinator's handoff may make a worker's
    /// member listen meanwhile; then remembered, so the accept and sweep paths pay no syscall.
    fn listening(&self, i: usize) -> bool {
        let slot = &self.accepts[i];
        if !slot.seen_listening.get() {
            let listens = sys::is_listening(slot.listener.fd.as_fd()).unwrap_or(true);
            slot.seen_listening.set(listens);
        }
        slot.seen_listening.get()
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
    fn listen_deferred(&mut self) {
        for i in 0..self.accepts.len() {
            if self.listening(i) {
                continue;
            }
            let slot = &self.accepts[i];
            if let Err(e) = sys::listen(slot.listener.fd.as_fd(), sys::somaxconn()) {
                tracing::error!(listener = %slot.listener.name, error = %e, "listen on a new member");
                continue;
            }
            tracing::info!(listener = %slot.listener.name, "new member of the group listening");
        }
        // Every listener not armed yet: those just made to listen, and one a handoff made
        // listen before the release (`send_hello`), which no accept was armed on then.
        if self.accepting {
            self.watch_listeners();
            for i in 0..self.accepts.len() {
                if self.accepts[i].retry_at.is_none() {
                    self.arm_accept(i);
                }
            }
        }
    }

    /// A worker looks at the coordinator's wishes: quit, stop or resume accepting.
    fn follow(&mut self) {
        let Role::Worker(WorkerGone { set, index, .. }) = &self.role else {
            return;
        };
        let (set, index) = (set.clone(), *index);
        if set.quit.load(SeqCst) {
            self.exit = Some(ExitReason::Shutdown);
            return;
        }
        let want = set.wants_accepting();
        if want && !self.accepting {
            set.withdraw_stop(index);
            self.resume_accepting();
        } else if !want && (self.accepting || self.stop_seen != set.current_stop()) {
            // A new stop (also one that came while this worker had not followed the resume
            // before it): acknowledge that one, once every accept has ended.
            self.stop_seen = set.current_stop();
            self.stop_reported = false;
            if self.accepting {
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

    /// The fd a runtime polls for readability to know when to turn (the wake set's epoll fd);
    /// `None` for a driver made to wait in the ring.
    pub(crate) fn readiness_fd(&self) -> Option<RawFd> {
        self.wake_set.as_ref().map(WakeSet::fd)
    }

    /// Whether the ring has completions or deferred work pending (a poll of the ring fd: the
    /// kernel reports POLLIN for either). Each non-blocking turn runs only a bounded batch of
    /// deferred work (20 items on this kernel), and completions posted by the turn's own submit
    /// (a sweep, a cancel's terminal completion) make no fd of the wake set ready, so after a
    /// turn the runtime must turn again while this says so, or the rest would wait for
    /// unrelated new work.
    pub(crate) fn has_pending_work(&self) -> bool {
        // SAFETY: the ring fd is open for as long as `self.ring` lives.
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(self.ring.as_raw_fd()) };
        sys::poll_readable(fd)
    }

    /// The eventfd that wakes this driver: the shared one for the coordinator, its own for a
    /// worker.
    fn own_wake_fd(&self) -> RawFd {
        match &self.role {
            Role::Worker(w) => w.set.wake_of(w.index).as_raw_fd(),
            _ => self.shared.wake.as_raw_fd(),
        }
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
            set.drain(|i| {
                if let Some(slot) = accepts.get_mut(i) {
                    slot.woke_at.get_or_insert(slot.delivered);
                }
            });
        }
        self.enter(wait)?;
        self.reap(sink);
        self.sweep_missed();
        self.on_time(Instant::now());
        self.run_actions();
        self.check_drained();
        self.run_actions();
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
        if !self.ring.submission().is_empty() {
            if let Err(e) = self.ring.submit() {
                if !retry_next_turn(&e) {
                    return Err(Error::io("io_uring_enter")(e));
                }
            }
        }
        Ok(None)
    }

    fn enter(&mut self, wait: bool) -> Result<(), Error> {
        let result = if wait {
            self.ring.submit_and_wait(1)
        } else {
            let pending = self.ring.submission().len() as u32;
            // SAFETY: no argument pointer; flags ask only to run deferred completions.
            unsafe {
                self.ring
                    .submitter()
                    .enter::<libc::sigset_t>(pending, 0, ENTER_GETEVENTS, None)
            }
        };
        match result {
            Ok(_) => Ok(()),
            Err(e) if retry_next_turn(&e) => Ok(()),
            Err(e) => Err(Error::io("io_uring_enter")(e)),
        }
    }

    fn reap(&mut self, sink: &mut dyn FnMut(Connection)) {
        let mut cqes = std::mem::take(&mut self.cqes);
        loop {
            cqes.clear();
            cqes.extend(
                self.ring
                    .completion()
                    .map(|c| (c.user_data(), c.result(), c.flags())),
            );
            if cqes.is_empty() {
                break;
            }
            for &(token, res, flags) in &cqes {
                self.complete(token, res, flags, sink);
            }
        }
        self.cqes = cqes;
    }

    fn complete(&mut self, token: Token, res: i32, flags: u32, sink: &mut dyn FnMut(Connection)) {
        let more = cqueue::more(flags);
        let Some(op) = self.ops.get(token) else {
            return;
        };
        match op {
            Op::Accept(i) => {
                let i = *i;
                if res >= 0 {
                    // SAFETY: a non-negative accept result is a new fd installed for us.
                    let fd = unsafe { OwnedFd::from_raw_fd(res) };
                    self.deliver(i, fd, sink);
                }
                if !more {
                    self.ops.remove(token);
                    self.accept_ended(i, res);
                }
            }
            Op::TakeoverPoll(i) => {
                let i = *i;
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
                    if self.takeover && self.accepting {
                        self.arm_takeover(i);
                    }
                    self.report_if_stopped();
                }
            }
            Op::SweepAccept(i) => {
                let i = *i;
                self.ops.remove(token);
                self.accepts[i].sweep_accept = None;
                if res >= 0 {
                    // SAFETY: a non-negative accept result is a new fd installed for us.
                    let fd = unsafe { OwnedFd::from_raw_fd(res) };
                    self.deliver(i, fd, sink);
                    // More may be queued: take them until EAGAIN.
                    self.sweep(i);
                } else if res == -libc::EINVAL && !self.no_dontwait {
                    // This kernel has no IORING_ACCEPT_DONTWAIT (Linux < 6.10): no takeover
                    // (the predecessor's accept stop ends the overlap as before), and sweeps
                    // re-arm the multishot accept instead (see `sweep`), starting with this one.
                    tracing::info!(
                        "no IORING_ACCEPT_DONTWAIT on this kernel: no takeover; the previous \
                         process keeps the accept queue until it lets go"
                    );
                    self.no_dontwait = true;
                    self.end_takeover(false);
                    self.sweep(i);
                }
                // EAGAIN: the queue was empty (the predecessor or our own multishot accept took
                // the connection). Other errors: the multishot accept meets them too and backs
                // off; nothing to do here.
                self.report_if_stopped();
            }
            Op::ReadSignal(_) => {
                let Some(Op::ReadSignal(info)) = self.ops.remove(token) else {
                    unreachable!()
                };
                if res == std::mem::size_of::<libc::signalfd_siginfo>() as i32 {
                    match info.ssi_signo as i32 {
                        libc::SIGHUP => self.request_upgrade(Requester::Signal),
                        signo => {
                            tracing::info!(signal = signo, "shutdown requested");
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
            Op::PollWake => {
                if !more {
                    self.ops.remove(token);
                }
                if res == -libc::ECANCELED {
                    return;
                }
                // SAFETY: the wake eventfd outlives this driver (owned by `shared` or `workers`).
                sys::eventfd_drain(unsafe {
                    std::os::fd::BorrowedFd::borrow_raw(self.own_wake_fd())
                });
                if matches!(self.role, Role::Worker(_)) {
                    self.follow();
                } else {
                    self.on_wake();
                }
                if !more {
                    self.arm_wake_read();
                }
            }
            Op::Timer(_) => {
                self.ops.remove(token);
                if self.timer.is_some_and(|(_, t)| t == token) {
                    self.timer = None;
                }
            }
            Op::SendHello(_) => {
                let Some(Op::SendHello(bufs)) = self.ops.remove(token) else {
                    unreachable!()
                };
                let event = if res == bufs.payload.len() as i32 {
                    Event::ListenersSent
                } else if res < 0 {
                    Event::HandoffFailed(errno(res).to_string())
                } else {
                    Event::HandoffFailed(format!("sent {res} of {} bytes", bufs.payload.len()))
                };
                self.feed(event);
            }
            Op::RecvSuccessor { .. } => {
                let Some(Op::RecvSuccessor { pid, buf }) = self.ops.remove(token) else {
                    unreachable!()
                };
                if self.successor.as_ref().map(|s| s.pid) != Some(pid) {
                    return; // an abandoned child's channel
                }
                match res {
                    n if n > 0 => {
                        self.on_successor_message(&buf[..n as usize]);
                        // The ring reads the channel until READY. After it the child sends
                        // at most RETIRING, which matters only at its exit, and is read
                        // then (`take_successor_messages`): no `Recv` is ever left queued
                        // on a channel that the exit closes.
                        if self.successor.is_some() && self.machine.phase() == Phase::HandingOver {
                            self.arm_successor_recv();
                        }
                    }
                    0 => {
                        if self.machine.phase() == Phase::HandingOver {
                            self.feed(Event::ChildMessageInvalid(
                                "closed the handoff channel before READY".into(),
                            ));
                        }
                    }
                    e if e == -libc::ECANCELED => {}
                    e => self.feed(Event::ChildMessageInvalid(format!(
                        "handoff channel: {}",
                        errno(e)
                    ))),
                }
            }
            Op::RecvPredecessor(_) => {
                let Some(Op::RecvPredecessor(buf)) = self.ops.remove(token) else {
                    unreachable!()
                };
                match res {
                    n if n > 0 => {
                        let ours = self.predecessor.as_ref().map(|link| link.upgrade);
                        if let Ok(Message::Released(id)) = Message::decode(&buf[..n as usize]) {
                            if Some(id) == ours {
                                // Sent after its MAINPID=<this process>.
                                self.is_main = true;
                                self.end_takeover(true);
                            }
                        }
                        self.arm_predecessor_recv();
                    }
                    e if e == -libc::ECANCELED => {}
                    // EOF, or an error (ECONNRESET when it exited with data unread): either way
                    // the previous process is gone.
                    _ => {
                        self.end_takeover(true);
                        if let Some(link) = self.predecessor.take() {
                            tracing::info!(
                                predecessor = link.parent_pid,
                                "previous process exited"
                            );
                        }
                    }
                }
            }
            Op::SuccessorExit { .. } => {
                let Some(Op::SuccessorExit { pid, _pidfd }) = self.ops.remove(token) else {
                    unreachable!()
                };
                if res == -libc::ECANCELED {
                    return;
                }
                // The pidfd polled readable: the process has exited. `waitpid` only adds its
                // status, and cannot when someone else reaped it first (an application's
                // `waitpid(-1)`, or SIGCHLD set to SIG_IGN: ECHILD); the exit counts anyway.
                let status = match sys::try_reap_pidfd(_pidfd.as_fd()) {
                    Ok(Some(status)) => status,
                    // Woken before the zombie was visible to waitpid: watch again (the
                    // pidfd stays readable, so this completes at once).
                    Ok(None) => return self.arm_successor_exit(pid, _pidfd),
                    Err(e) => {
                        tracing::warn!(child = pid, error = %e, "the child exited and was reaped elsewhere");
                        format!("exited, status unknown (reaped elsewhere: {e})")
                    }
                };
                tracing::info!(child = pid, %status, "child reaped");
                if self.successor.as_ref().is_some_and(|s| s.pid == pid) {
                    self.take_successor_messages();
                    self.successor = None;
                }
                self.feed(Event::ChildExited { pid, status });
            }
            Op::Unlink(_) => {
                let Some(Op::Unlink(path)) = self.ops.remove(token) else {
                    unreachable!()
                };
                // Cancelled: this driver is finishing (see `finish`), so blocking is fine now.
                let res = if res == -libc::ECANCELED {
                    let path = std::path::Path::new(std::ffi::OsStr::from_bytes(path.as_bytes()));
                    match std::fs::remove_file(path) {
                        Ok(()) => 0,
                        Err(e) => -e.raw_os_error().unwrap_or(libc::EIO),
                    }
                } else {
                    res
                };
                if res < 0 && res != -libc::ENOENT {
                    tracing::warn!(path = ?path, error = %errno(res), "removing a leftover file");
                }
            }
            Op::Cancel => {
                self.ops.remove(token);
            }
        }
    }

    /// One message from the successor, as the machine's event.
    fn on_successor_message(&mut self, bytes: &[u8]) {
        match Message::decode(bytes) {
            Ok(Message::Ready(id)) => self.feed(Event::ChildReady(id)),
            Ok(Message::Retiring(_)) => self.feed(Event::ChildRetired),
            Ok(Message::Serving(_)) => self.feed(Event::ChildResumed),
            Ok(other) => self.feed(Event::ChildMessageInvalid(format!(
                "unexpected message {other:?}"
            ))),
            Err(e) => self.feed(Event::ChildMessageInvalid(e.to_string())),
        }
    }

    /// Feeds what the successor sent and this driver has not read yet. Called at its exit,
    /// before the exit is fed, so that the exit is judged with everything it said; and in
    /// HandingOver before a shutdown or the ready deadline is acted on, so that a READY already
    /// on the channel counts (the ring's `Recv` armed beside it then takes whatever comes next,
    /// or ends with the channel).
    ///
    /// Why: a successor told to stop right after READY sends RETIRING and exits. Its READY
    /// and its exit can reach this driver in one batch of CQEs; fed as they came, without the
    /// RETIRING, the exit looked unplanned and this process took the service back (seen: a
    /// test's SIGTERM to the new process 0.5 ms after its READY left the old one serving).
    ///
    /// Invariants relied on:
    /// - a dead process's messages stay queued on our end of the SEQPACKET pair, in order,
    ///   until read;
    /// - from READY on, no `Recv` is armed on the channel (see `Op::RecvSuccessor`), so
    ///   nothing else takes a message, and none is queued to run on the fd that clearing
    ///   the successor closes;
    /// - before READY, the one armed `Recv` was submitted in the turn that started the child,
    ///   before the child could send anything. A message it took has its CQE ahead of the
    ///   exit's: both are task work on this ring, run in the order queued, and the message
    ///   came first. What it has not taken is read here, and it then ends with EOF, ignored
    ///   once the successor is cleared.
    fn take_successor_messages(&mut self) {
        let mut buf = [0u8; CHANNEL_BUF];
        // Bounded: a child sends READY, then RETIRING and SERVING by turns (one pair per
        // successor of its own that died during its drain); past this, garbage.
        for _ in 0..64 {
            let Some(child) = &self.successor else { return };
            match sys::recv_nonblocking(child.channel.as_fd(), &mut buf) {
                Ok(n) if n > 0 => self.on_successor_message(&buf[..n]),
                // Reported once, before the queued messages, when the child died with some of
                // ours unread (a RELEASED it never read).
                Err(e) if matches!(e.raw_os_error(), Some(libc::ECONNRESET | libc::EINTR)) => {}
                // EOF, nothing queued, or another error: nothing more it said.
                _ => return,
            }
        }
    }

    /// Hands a freshly accepted connection of listener `i` to the application.
    fn deliver(&mut self, i: usize, fd: OwnedFd, sink: &mut dyn FnMut(Connection)) {
        let slot = &mut self.accepts[i];
        if slot.paused_by.take().is_some() {
            tracing::info!(listener = %slot.listener.name, "accepting again");
            slot.backoff = BACKOFF_MIN;
            self.update_paused_flag();
        }
        self.accepted += 1;
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
    fn start_takeover(&mut self) {
        self.takeover = true;
        for i in 0..self.accepts.len() {
            if !self.accepts[i].control {
                self.arm_takeover(i);
            }
        }
    }

    fn arm_takeover(&mut self, i: usize) {
        if !self.listening(i) {
            return;
        }
        let fd = self.accepts[i].listener.fd.as_raw_fd();
        let entry = opcode::PollAdd::new(types::Fd(fd), libc::POLLIN as u32)
            .multi(true)
            .build();
        self.accepts[i].takeover = self.arm(Op::TakeoverPoll(i), entry);
        self.accepts[i].takeover_cancel_sent = false;
    }

    /// Takes what is queued on listener `i` now, beside the multishot accept: one
    /// non-waiting accept (`IORING_ACCEPT_DONTWAIT`), again after each success, until the
    /// queue is empty (-EAGAIN). Unless one is in flight already. Used by the takeover polls
    /// and by `sweep_queues`. Without DONTWAIT (Linux < 6.10) it cancels the multishot accept
    /// instead, which re-arms itself at its terminal completion and, as any fresh accept,
    /// takes what is queued before it waits (one driver turn later than a sweep would).
    fn sweep(&mut self, i: usize) {
        if !self.accepting || self.accepts[i].sweep_accept.is_some() || !self.listening(i) {
            return;
        }
        if self.no_dontwait {
            let slot = &mut self.accepts[i];
            if let (Some(op), false) = (slot.op, slot.cancel_sent) {
                slot.cancel_sent = true;
                self.cancel(types::CancelBuilder::user_data(op));
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
    fn sweep_missed(&mut self) {
        for i in 0..self.accepts.len() {
            let slot = &mut self.accepts[i];
            let Some(seen) = slot.woke_at.take() else {
                continue;
            };
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
    /// knows it from `takeover_at`, a worker from its worker set.
    fn predecessor_holds_queue(&self) -> bool {
        match &self.role {
            Role::Worker(w) => w.set.predecessor_holds_queue.load(SeqCst),
            _ => self.takeover_at.is_some(),
        }
    }

    /// Stops the takeover polls (the in-flight accept finishes by itself: it never waits).
    /// `released`: the predecessor let go (RELEASED, or its channel closed).
    fn end_takeover(&mut self, released: bool) {
        self.takeover_at = None;
        if released {
            self.tell_workers(|set| set.predecessor_holds_queue.store(false, SeqCst));
            self.listen_deferred();
            self.sweep_queues();
            self.forward_release();
        }
        if !self.takeover {
            return;
        }
        self.takeover = false;
        if released {
            tracing::info!("the previous process let go; takeover polls stopped");
        }
        self.cancel_takeover_polls();
    }

    /// Sweeps every listener's queue (`sweep`), the workers' too. Done whenever the
    /// predecessor (or an older generation, see `forward_release`) has let go.
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
    fn sweep_queues(&mut self) {
        if !self.accepting {
            return;
        }
        self.tell_workers(|set| {
            set.sweeps.fetch_add(1, SeqCst);
        });
        for i in 0..self.accepts.len() {
            self.sweep(i);
        }
    }

    /// Our predecessor let go while we have a successor and have let go ourselves (an
    /// upgrade came before the older process noticed our READY): the older process's accepts
    /// were still ahead of our successor's in the queue, so tell the successor to sweep too
    /// (a RELEASED again). Before we let go ourselves it must not: our own RELEASED follows.
    fn forward_release(&self) {
        if self.stop_reported {
            self.send_released();
        }
    }

    /// Tells the successor, if any, that this process has let go (RELEASED).
    fn send_released(&self) {
        if let Some(successor) = &self.successor {
            let msg = Message::Released(successor.upgrade).encode().expect("fits");
            let _ = sys::send_nonblocking(successor.channel.as_fd(), &msg);
        }
    }

    /// The coordinator changes the workers' shared state with `change`, then wakes them to
    /// look at it; nothing for a worker or a lone ring.
    fn tell_workers(&self, change: impl FnOnce(&WorkerSet)) {
        if let Role::Coordinator(Coordinator(set)) = &self.role {
            change(set);
            set.signal_all();
        }
    }

    fn cancel_takeover_polls(&mut self) {
        for i in 0..self.accepts.len() {
            let slot = &mut self.accepts[i];
            if let (Some(op), false) = (slot.takeover, slot.takeover_cancel_sent) {
                slot.takeover_cancel_sent = true;
                self.cancel(types::CancelBuilder::user_data(op));
            }
        }
    }

    /// A multishot accept reached its terminal CQE.
    fn accept_ended(&mut self, i: usize, res: i32) {
        let slot = &mut self.accepts[i];
        slot.op = None;
        slot.cancel_sent = false;
        if !self.accepting {
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
                slot.retry_at = Some(Instant::now() + slot.backoff);
                slot.backoff = (slot.backoff * 2).min(BACKOFF_MAX);
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
            }
        }
        // A connection closed: fds may be free again, retry paused accepts now.
        if self.accepting {
            for i in 0..self.accepts.len() {
                if self.accepts[i].retry_at.take().is_some() {
                    self.arm_accept(i);
                }
            }
        }
    }

    fn on_time(&mut self, now: Instant) {
        if self.machine.phase() == Phase::HandingOver
            && self.machine.poll_timeout().is_some_and(|t| t <= now)
        {
            // The ready deadline passed: a READY already on the channel is a READY in time.
            self.take_successor_messages();
        }
        self.machine.handle_timeout(now);
        self.escalate(now);
        if self.takeover_at.is_some_and(|t| t <= now) {
            self.takeover_at = None;
            if self.accepting {
                tracing::info!(
                    after = ?TAKEOVER_AFTER,
                    "the previous process still holds the accept queue; taking connections alongside it"
                );
                self.start_takeover();
            }
        }
        if self.accepting {
            for i in 0..self.accepts.len() {
                if self.accepts[i].retry_at.is_some_and(|t| t <= now) {
                    self.accepts[i].retry_at = None;
                    self.arm_accept(i);
                }
            }
        }
    }

    /// Cancels every accept (the terminal completions arrive later; see `report_if_stopped`).
    /// The coordinator also tells its workers.
    fn stop_accepting(&mut self) {
        self.accepting = false;
        self.tell_workers(WorkerSet::begin_stop);
        for i in 0..self.accepts.len() {
            let slot = &mut self.accepts[i];
            slot.retry_at = None;
            if let (Some(op), false) = (slot.op, slot.cancel_sent) {
                slot.cancel_sent = true;
                self.cancel(types::CancelBuilder::user_data(op));
            }
        }
        self.cancel_takeover_polls();
        self.unwatch_listeners();
        self.update_paused_flag();
        self.report_if_stopped();
    }

    /// Re-arms every accept that is not armed (one whose cancel is still in flight re-arms
    /// itself at its terminal completion). The coordinator also tells its workers.
    fn resume_accepting(&mut self) {
        self.accepting = true;
        self.stop_reported = false;
        self.tell_workers(|set| set.accepting.store(true, SeqCst));
        self.watch_listeners();
        for i in 0..self.accepts.len() {
            if self.accepts[i].op.is_none() {
                self.arm_accept(i);
            }
            if self.takeover && self.accepts[i].takeover.is_none() && !self.accepts[i].control {
                self.arm_takeover(i);
            }
        }
    }

    /// Once no accept of this driver is armed any more: a worker tells the coordinator; the
    /// coordinator tells its machine when every worker has stopped too.
    fn report_if_stopped(&mut self) {
        if self.accepting || self.stop_reported || self.accepts.iter().any(AcceptSlot::armed) {
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
                    accepted = self.accepted,
                    "every accept stopped; connections not accepted yet wait for the successor"
                );
                self.feed(Event::AcceptStopped);
                // The successor may stop its takeover polls: connections reach it alone now.
                self.send_released();
            }
        }
        self.stop_reported = true;
    }

    /// Every accept of this process (all workers) has reached its terminal completion.
    fn all_accepts_stopped(&self) -> bool {
        self.accepts.iter().all(|s| !s.armed())
            && self.role.workers().is_none_or(|set| set.all_stopped())
    }

    /// Reports the drain as complete once accepting has fully stopped (every fd accepted on
    /// the way is counted) and no connection is live.
    fn check_drained(&mut self) {
        if self.drain_active
            && !self.drained_reported
            && self.all_accepts_stopped()
            && self.shared.live.load(SeqCst) == 0
        {
            self.drained_reported = true;
            self.feed(Event::ConnectionsDrained);
        }
    }

    /// SIGKILLs the children abandoned with SIGTERM that are still running at their
    /// `kill_at`, and forgets those that have exited (their exit watch reaps them).
    fn escalate(&mut self, now: Instant) {
        self.terminating.retain(|t| {
            if sys::poll_readable(t.pidfd.as_fd()) {
                return false; // exited
            }
            if t.kill_at > now {
                return true;
            }
            tracing::warn!(
                child.pid = t.pid,
                "the abandoned child did not exit after SIGTERM; SIGKILL"
            );
            let _ = sys::pidfd_signal(t.pidfd.as_fd(), libc::SIGKILL);
            false
        });
    }

    /// Counts the older generations still draining (pruning those gone), then asks the machine.
    fn request_upgrade(&mut self, by: Requester) {
        self.elders.retain(|fd| !sys::poll_readable(fd.as_fd()));
        self.feed(Event::EldersDraining(self.elders.len() as u32));
        self.feed(Event::UpgradeRequested(by));
    }

    fn feed(&mut self, event: Event) {
        if matches!(event, Event::ShutdownRequested) && self.machine.phase() == Phase::HandingOver {
            // A READY already on the channel is a READY: the successor then keeps serving
            // while this process drains, instead of being stopped with what it took.
            self.take_successor_messages();
        }
        let now = Instant::now();
        let t = &mut self.timeline;
        match &event {
            Event::ChildSpawned { .. } => t.spawned = Some(now),
            Event::ListenersSent => t.hello_sent = Some(now),
            Event::ChildReady(_) => t.ready = Some(now),
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

    fn run_actions(&mut self) {
        while let Some(action) = self.machine.poll_action() {
            let span = self.span.clone();
            let _in_upgrade = span.enter();
            self.act(action);
        }
    }

    fn act(&mut self, action: Action) {
        match action {
            Action::SpawnChild(upgrade) => {
                self.span = tracing::info_span!(
                    "upgrade",
                    upgrade.id = %upgrade,
                    child.pid = tracing::field::Empty,
                    generation = self.shared.generation.wrapping_add(1),
                );
                let _in_upgrade = self.span.clone().entered();
                self.timeline = Timeline {
                    upgrade: Some(upgrade),
                    trigger: Some(Instant::now()),
                    ..Timeline::default()
                };
                systemd::notify(
                    self.config.notify_socket.as_deref(),
                    &format!("RELOADING=1\nMONOTONIC_USEC={}", systemd::monotonic_usec()),
                );
                self.start_spawn(upgrade);
            }
            Action::SendListeners(upgrade) => self.send_hello(upgrade),
            Action::StopAccepting => self.stop_accepting(),
            Action::ResumeAccepting => {
                tracing::warn!("the new process died during the drain; serving again");
                self.is_main = true;
                self.reclaim_pid_file();
                systemd::notify(
                    self.config.notify_socket.as_deref(),
                    &format!("MAINPID={}\nREADY=1", std::process::id()),
                );
                // Our own predecessor, if it still drains, was told RETIRING: withdraw it, or
                // our later exit would pass for planned and nobody would take the service back.
                if let Some(link) = &self.predecessor {
                    let msg = Message::Serving(link.upgrade).encode().expect("fits");
                    let _ = sys::send_nonblocking(link.channel.as_fd(), &msg);
                }
                self.resume_accepting();
            }
            Action::StartDrain(cause) => {
                if cause == DrainCause::Shutdown && self.is_main {
                    // After an upgrade the successor is the main process now and this one has
                    // nothing to tell systemd. (Not guessed from `self.successor`: READY and the
                    // successor's exit can come in one batch, and the exit clears it first.)
                    systemd::notify(self.config.notify_socket.as_deref(), "STOPPING=1");
                }
                self.drain_active = true;
                self.drained_reported = false;
                self.shared.draining.store(true, SeqCst);
                // Tell our own predecessor (if it still drains) that our exit is planned.
                if let Some(link) = &self.predecessor {
                    let msg = Message::Retiring(link.upgrade).encode().expect("fits");
                    let _ = sys::send_nonblocking(link.channel.as_fd(), &msg);
                }
            }
            Action::StopDrain => {
                self.drain_active = false;
                self.shared.draining.store(false, SeqCst);
            }
            Action::AbandonChild { pid, stop } => {
                if let Some(child) = self.successor.take() {
                    debug_assert_eq!(child.pid, pid);
                    // The exit watch stays armed and reaps it; its Recv ends with the channel.
                    match stop {
                        Stop::Kill => {
                            let _ = sys::pidfd_signal(child.pidfd.as_fd(), libc::SIGKILL);
                        }
                        Stop::Terminate => {
                            let _ = sys::pidfd_signal(child.pidfd.as_fd(), libc::SIGTERM);
                            let grace = self.config.timeouts.drain;
                            tracing::info!(
                                child.pid = pid,
                                ?grace,
                                "the abandoned child may hold connections: SIGTERM, so it drains them"
                            );
                            // From the SIGTERM, the child may still be starting (the ready
                            // deadline's case) before its own drain begins.
                            self.terminating.push(Terminating {
                                pid,
                                pidfd: child.pidfd,
                                kill_at: Instant::now() + self.config.timeouts.ready + grace,
                            });
                        }
                    }
                    self.cancel(
                        types::CancelBuilder::fd(types::Fd(child.channel.as_raw_fd())).all(),
                    );
                    // Submit before `child.channel` closes: SQEs queued in this turn (the HELLO,
                    // the Recv, this cancel) name its fd number, which another thread could
                    // reuse once it is closed.
                    if let Err(e) = self.ring.submit() {
                        tracing::warn!(error = %e, "submitting before abandoning the child");
                    }
                    tracing::info!(child.pid = pid, upgrade.id = %child.upgrade, "child abandoned");
                }
            }
            Action::Reply(by, outcome) => self.reply(by, outcome),
            Action::PhaseChanged(phase) => {
                self.shared.phase.set(phase);
                tracing::info!(%phase, "phase");
                if phase == Phase::Serving {
                    self.span = tracing::Span::none();
                }
            }
            Action::Exit(reason) => {
                self.tell_workers(|set| set.quit.store(true, SeqCst));
                if matches!(reason, ExitReason::Upgraded { .. }) {
                    self.timeline.log(Instant::now());
                }
                self.exit = Some(reason);
            }
        }
    }

    /// Starts the new binary on a thread of its own. `posix_spawn` is a vfork: the calling
    /// thread is suspended until the child has exec'ed, which took 0.2 ms idle and up to 1.6 ms
    /// with the core busy serving (measured here); on the ring thread that would stall accepting
    /// and serving for as long. The thread reports through `spawn_results` and the wake
    /// eventfd; `collect_spawns` turns the report into the machine's event. The thread inherits
    /// this thread's signal mask (SIGHUP/SIGTERM/SIGINT blocked), so no signal meant for the
    /// signalfd is delivered to it.
    fn start_spawn(&mut self, upgrade: UpgradeId) {
        let job = self.spawn_job(upgrade);
        let tx = self.spawn_results.0.clone();
        let shared = self.shared.clone();
        let thread = std::thread::Builder::new()
            .name("ringflip-spawn".into())
            .spawn(move || {
                let _ = tx.send(job.run());
                shared.wake();
            });
        match thread {
            Ok(handle) => self.spawning.push(handle),
            Err(e) => {
                // No thread to be had (EAGAIN): spawn here rather than fail the upgrade.
                tracing::warn!(error = %e, "no thread for the spawn; spawning on the ring thread");
                let _ = self.spawn_results.0.send(self.spawn_job(upgrade).run());
                self.collect_spawns();
            }
        }
    }

    fn spawn_job(&self, upgrade: UpgradeId) -> SpawnJob {
        SpawnJob {
            exe: self.config.exe.clone(),
            args: self.config.args.clone(),
            signals: self.config.signals,
            upgrade,
        }
    }

    /// Hands finished spawns to the machine, if their upgrade is still the one in flight; a
    /// child whose upgrade was given up meanwhile (a shutdown, the start deadline) is killed
    /// and reaped by its exit watch.
    fn collect_spawns(&mut self) {
        while let Ok(done) = self.spawn_results.1.try_recv() {
            let current = self.machine.phase() == Phase::Forking
                && self.machine.current_upgrade() == Some(done.upgrade);
            let upgrade = done.upgrade;
            match done.result {
                Ok(child) if current => {
                    tracing::info!(
                        upgrade.id = %upgrade,
                        child.pid = child.pid,
                        binary = %self.config.exe.display(),
                        spawn_us = done.took.as_micros() as u64,
                        "new process started"
                    );
                    let pid = child.pid;
                    self.span.record("child.pid", pid);
                    self.watch(child.channel.as_fd());
                    self.watch(child.pidfd.as_fd());
                    let pidfd = match sys::dup_cloexec_at_least(child.pidfd.as_fd(), 3) {
                        Ok(fd) => fd,
                        Err(e) => {
                            // No fd to spare: it cannot be watched safely; give it up at once.
                            let _ = sys::kill(pid, libc::SIGKILL);
                            self.arm_successor_exit(pid, child.pidfd);
                            self.feed(Event::SpawnFailed(format!("duplicating a pidfd: {e}")));
                            continue;
                        }
                    };
                    self.successor = Some(Successor {
                        pid,
                        upgrade,
                        channel: child.channel,
                        pidfd,
                    });
                    self.arm_successor_exit(pid, child.pidfd);
                    self.arm_successor_recv();
                    self.feed(Event::ChildSpawned { pid });
                }
                Ok(child) => {
                    tracing::warn!(
                        upgrade.id = %upgrade,
                        child.pid = child.pid,
                        "new process started after its upgrade was given up; killing it"
                    );
                    let _ = sys::kill(child.pid, libc::SIGKILL);
                    self.watch(child.pidfd.as_fd());
                    self.arm_successor_exit(child.pid, child.pidfd);
                }
                Err(e) if current => self.feed(Event::SpawnFailed(format!(
                    "{}: {e}",
                    self.config.exe.display()
                ))),
                Err(_) => {}
            }
        }
        self.spawning.retain(|t| !t.is_finished());
    }

    /// Waits for the spawns still in flight (at exit) and kills what they started: nothing is
    /// left behind unreaped. A spawn stuck in exec (the case the start deadline exists for) is not waited for beyond
    /// `FINAL_REAP`: its thread is left behind, and a child it still starts gets EOF on its
    /// channel (this end closes with the process) and exits.
    fn abandon_spawns(&mut self) {
        let deadline = Instant::now() + FINAL_REAP;
        while self.spawning.iter().any(|t| !t.is_finished()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        for thread in self.spawning.drain(..) {
            if thread.is_finished() {
                let _ = thread.join();
            } else {
                tracing::error!("a spawn is still stuck in exec at exit; leaving it behind");
            }
        }
        while let Ok(done) = self.spawn_results.1.try_recv() {
            if let Ok(child) = done.result {
                tracing::warn!(
                    child.pid = child.pid,
                    "killing a new process started during the exit"
                );
                let _ = sys::kill(child.pid, libc::SIGKILL);
                // SAFETY: reaping our own child, which SIGKILL ends promptly.
                unsafe { libc::waitpid(child.pid as libc::pid_t, std::ptr::null_mut(), 0) };
            }
        }
    }

    fn reply(&mut self, by: Requester, outcome: Outcome) {
        match &outcome {
            Outcome::Upgraded { pid } => {
                tracing::info!(child.pid = pid, "upgrade complete");
                self.is_main = false;
                systemd::notify(
                    self.config.notify_socket.as_deref(),
                    &format!("MAINPID={pid}\nREADY=1"),
                );
            }
            Outcome::Failed(why) => {
                // The child may have written the pid file before it failed.
                self.reclaim_pid_file();
                if self.machine.phase() == Phase::Serving {
                    tracing::warn!(reason = %why, "upgrade failed; still serving");
                    systemd::notify(
                        self.config.notify_socket.as_deref(),
                        &format!("READY=1\nSTATUS=upgrade failed: {why}"),
                    );
                } else {
                    // A shutdown cut the upgrade short; this process is stopping.
                    tracing::warn!(reason = %why, "upgrade abandoned");
                }
            }
            Outcome::Busy(why) => tracing::warn!(reason = %why, "upgrade refused"),
        }
        if let Requester::Api(ticket) = by {
            if let Some(tx) = self.replies.remove(&ticket) {
                let _ = tx.send(match outcome {
                    Outcome::Upgraded { pid } => Ok(pid),
                    Outcome::Failed(why) => Err(UpgradeError::Failed(why)),
                    Outcome::Busy(why) => Err(UpgradeError::Busy(why.into())),
                });
            }
        }
    }

    /// After a failed upgrade the child may already have written its pid: this process serves,
    /// so the pid file names it again.
    fn reclaim_pid_file(&mut self) {
        let Some(path) = &self.config.pid_file else {
            return;
        };
        match write_pid_file(path, std::process::id()) {
            Ok(Some(leftover)) => self.unlink_later(leftover),
            Ok(None) => {}
            Err(e) => tracing::error!(error = %e, "rewriting the pid file"),
        }
    }

    /// Removes `path` through the ring. Unlinking can wait for the disk (see
    /// `write_pid_file`); io_uring always runs UNLINKAT in its io-wq worker threads, never
    /// inline in the submitting thread, so this never blocks the accept loop. The kernel
    /// copies the path when the SQE is issued; the op keeps it until the completion anyway.
    fn unlink_later(&mut self, path: std::path::PathBuf) {
        use std::os::unix::ffi::OsStringExt;
        let Ok(path) = std::ffi::CString::new(path.into_os_string().into_vec()) else {
            return;
        };
        let entry = opcode::UnlinkAt::new(types::Fd(libc::AT_FDCWD), path.as_ptr()).build();
        self.arm(Op::Unlink(path), entry);
    }

    fn send_hello(&mut self, upgrade: UpgradeId) {
        let Some(child) = &self.successor else {
            return;
        };
        // This process and its elders still alive, newest first, as many as fit beside the
        // listeners in one SCM_RIGHTS message.
        let own = match sys::pidfd_open(std::process::id()) {
            Ok(fd) => fd,
            Err(e) => return self.feed(Event::HandoffFailed(format!("pidfd_open(self): {e}"))),
        };
        // UDP sockets and the application's raw fds travel after the listeners, as records of
        // their own kind. Raw fds are sent as duplicates held until the send completes, so the
        // application may replace its set at any time.
        // A member whose listen was deferred (its predecessor has not let go yet, see
        // `listen_deferred`) listens now: the successor adopts only listening sockets. Its
        // worker arms its accepts at the release, as before.
        for fd in self
            .accepts
            .iter()
            .map(|s| s.listener.fd.as_fd())
            .chain(self.worker_listeners.iter().map(|(_, fd)| fd.as_fd()))
        {
            if !sys::is_listening(fd).unwrap_or(true) {
                if let Err(e) = sys::listen(fd, sys::somaxconn()) {
                    return self.feed(Event::HandoffFailed(format!("listen on a new member: {e}")));
                }
            }
        }
        let mut records: Vec<ListenerRecord> =
            self.accepts.iter().map(|s| s.listener.record()).collect();
        let mut fds: Vec<RawFd> = self
            .accepts
            .iter()
            .map(|s| s.listener.fd.as_raw_fd())
            .collect();
        for (record, fd) in &self.worker_listeners {
            records.push(record.clone());
            fds.push(fd.as_raw_fd());
        }
        for u in &self.udp {
            records.push(u.record());
            fds.push(u.socket.as_raw_fd());
        }
        let mut keep = Vec::new();
        for (name, fd) in self
            .shared
            .handoff_fds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            match sys::dup_cloexec_at_least(fd.as_fd(), 3) {
                Ok(dup) => {
                    records.push(ListenerRecord {
                        name: name.clone(),
                        kind: SocketKind::Raw,
                        address: String::new(),
                    });
                    fds.push(dup.as_raw_fd());
                    keep.push(dup);
                }
                Err(e) => tracing::warn!(fd = %name, error = %e, "cannot hand this fd over"),
            }
        }
        if fds.len() >= MAX_LISTENERS {
            return self.feed(Event::HandoffFailed(format!(
                "{} fds to hand over, at most {} fit",
                fds.len() + 1,
                MAX_LISTENERS
            )));
        }
        let room = MAX_LISTENERS - fds.len();
        let mut elder_fds = vec![own.as_raw_fd()];
        elder_fds.extend(
            self.elders
                .iter()
                .filter(|fd| !sys::poll_readable(fd.as_fd()))
                .map(|fd| fd.as_raw_fd())
                .take(room.saturating_sub(1)),
        );
        elder_fds.truncate(room);
        let hello = Message::Hello {
            upgrade,
            parent_pid: std::process::id(),
            generation: self.shared.generation.wrapping_add(1),
            elders: elder_fds.len() as u16,
            listeners: records,
            state: self
                .shared
                .handoff_state
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .to_vec(),
        };
        let payload = match hello.encode() {
            Ok(p) => p,
            Err(e) => return self.feed(Event::HandoffFailed(e.to_string())),
        };
        fds.extend(elder_fds);
        keep.push(own);
        let bufs = SendMsgBufs::new(payload, &fds, keep);
        let msg: *const libc::msghdr = &bufs.msg;
        let channel = child.channel.as_raw_fd();
        let entry = opcode::SendMsg::new(types::Fd(channel), msg)
            .flags(libc::MSG_NOSIGNAL as u32)
            .build();
        self.arm(Op::SendHello(bufs), entry);
    }

    fn arm_accept(&mut self, i: usize) {
        if self.accepts[i].op.is_some() || !self.listening(i) {
            // Armed already (one multishot accept per listener: a second would stay armed
            // past the cancel of the first), or a new member not listening yet.
            return;
        }
        let fd = self.accepts[i].listener.fd.as_raw_fd();
        let entry = opcode::AcceptMulti::new(types::Fd(fd))
            .flags(libc::SOCK_CLOEXEC)
            .build();
        self.accepts[i].op = self.arm(Op::Accept(i), entry);
        self.accepts[i].cancel_sent = false;
    }

    fn arm_signal_read(&mut self) {
        // SAFETY: signalfd_siginfo is plain data; all-zero is valid.
        let mut info: Box<libc::signalfd_siginfo> = Box::new(unsafe { std::mem::zeroed() });
        let ptr: *mut u8 = (&mut *info as *mut libc::signalfd_siginfo).cast();
        let len = std::mem::size_of::<libc::signalfd_siginfo>() as u32;
        let Some(fd) = self.signalfd.as_ref().map(|fd| fd.as_raw_fd()) else {
            return;
        };
        let entry = opcode::Read::new(types::Fd(fd), ptr, len).build();
        self.arm(Op::ReadSignal(info), entry);
    }

    /// A multishot poll on the wake eventfd; the counter is reset with read(2) on each
    /// wake-up (see `Op::PollWake`).
    fn arm_wake_read(&mut self) {
        let fd = self.own_wake_fd();
        let entry = opcode::PollAdd::new(types::Fd(fd), libc::POLLIN as u32)
            .multi(true)
            .build();
        self.arm(Op::PollWake, entry);
    }

    fn arm_successor_recv(&mut self) {
        let Some(child) = &self.successor else {
            return;
        };
        let (pid, fd) = (child.pid, child.channel.as_raw_fd());
        let mut buf = Box::new([0u8; CHANNEL_BUF]);
        let ptr = buf.as_mut_ptr();
        let entry = opcode::Recv::new(types::Fd(fd), ptr, CHANNEL_BUF as u32).build();
        self.arm(Op::RecvSuccessor { pid, buf }, entry);
    }

    fn arm_successor_exit(&mut self, pid: u32, pidfd: OwnedFd) {
        let entry = opcode::PollAdd::new(types::Fd(pidfd.as_raw_fd()), libc::POLLIN as u32).build();
        self.arm(Op::SuccessorExit { pid, _pidfd: pidfd }, entry);
    }

    fn arm_predecessor_recv(&mut self) {
        let Some(link) = &self.predecessor else {
            return;
        };
        let fd = link.channel.as_raw_fd();
        let mut buf = Box::new([0u8; CHANNEL_BUF]);
        let ptr = buf.as_mut_ptr();
        let entry = opcode::Recv::new(types::Fd(fd), ptr, CHANNEL_BUF as u32).build();
        self.arm(Op::RecvPredecessor(buf), entry);
    }

    /// Keeps one Timeout armed for the earliest of the machine's deadline and the accept
    /// retries. A timer armed for a later time than needed is superseded by an earlier one; a
    /// timer that fires early is harmless (deadlines are checked against the clock).
    fn arm_timer(&mut self) {
        let next = self
            .accepts
            .iter()
            .filter_map(|s| s.retry_at)
            .chain(self.machine.poll_timeout())
            .chain(self.takeover_at)
            .chain(self.terminating.iter().map(|t| t.kill_at))
            .min();
        let Some(at) = next else {
            return;
        };
        if let Some(set) = &mut self.wake_set {
            // The timerfd wakes the runtime directly; the turn checks deadlines on the clock.
            return set.set_timer(at, Instant::now());
        }
        if self.timer.is_some_and(|(armed, _)| armed <= at) {
            return;
        }
        let wait = at.saturating_duration_since(Instant::now());
        let ts = Box::new(
            types::Timespec::new()
                .sec(wait.as_secs())
                .nsec(wait.subsec_nanos()),
        );
        let entry = opcode::Timeout::new(&*ts).build();
        if let Some(token) = self.arm(Op::Timer(ts), entry) {
            self.timer = Some((at, token));
        }
    }

    /// Puts `op` in the table and queues `entry` for it (with the op's token): every op but a
    /// cancel starts here. Nothing once `finish` has begun: an op armed after the final cancel
    /// would not be covered by it. `entry` may point into `op`'s boxed memory, which does not
    /// move when `op` does.
    fn arm(&mut self, op: Op, entry: squeue::Entry) -> Option<Token> {
        if self.finishing {
            return None;
        }
        let token = self.ops.insert(op);
        self.push(entry.user_data(token));
        Some(token)
    }

    /// Queues a cancel of the ops `what` matches; its own completion is an `Op::Cancel`.
    fn cancel(&mut self, what: types::CancelBuilder) {
        let token = self.ops.insert(Op::Cancel);
        self.push(opcode::AsyncCancel2::new(what).build().user_data(token));
    }

    /// Queues an SQE, submitting first if the queue is full.
    fn push(&mut self, entry: squeue::Entry) {
        loop {
            // SAFETY: every pointer in the entries this driver builds points into memory owned
            // by the op table entry of the same token, which lives until the final CQE.
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                return;
            }
            if let Err(e) = self.ring.submit() {
                tracing::error!(error = %e, "submitting to the ring failed");
                std::thread::yield_now();
            }
        }
    }

    /// Cancels every op still in flight and reaps until the table is empty, so no op outlives
    /// the memory it points to. Any connection accepted on the way is closed: this process is
    /// done serving (accepts were stopped before the exit, so there should be none).
    fn finish(&mut self) {
        self.abandon_spawns();
        if !self.terminating.is_empty() {
            // Not SIGKILLed: each was sent SIGTERM and may still be draining connections it
            // took; a ringflip process finishes and exits by itself. One that ignores SIGTERM
            // outlives this process (reparented), which this log names.
            let pids: Vec<u32> = self.terminating.iter().map(|t| t.pid).collect();
            tracing::warn!(
                ?pids,
                "abandoned new processes still running at exit (sent SIGTERM); left to finish"
            );
        }
        tracing::info!(
            worker = self.role.index(),
            accepted = self.accepted,
            "accept loop done"
        );
        // Whatever ends now must not re-arm (an accept's terminal completion would otherwise
        // re-arm it if this driver exits while still accepting, e.g. a worker told to quit
        // after the coordinator failed).
        self.accepting = false;
        // Nothing is armed from here on (see `arm`): an op whose completion comes after the
        // cancel below (a signal read that found a signal pending as it was submitted) would
        // otherwise re-arm, and no cancel would cover it.
        self.finishing = true;
        self.cancel(types::CancelBuilder::any());
        let deadline = Instant::now() + FINAL_REAP;
        let mut late = 0usize;
        while self.ops.live > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let ts = types::Timespec::new()
                .sec(left.as_secs())
                .nsec(left.subsec_nanos());
            // A bounded wait (ETIME when it ends empty-handed), so no op that never
            // completes can hold the exit.
            match self
                .ring
                .submitter()
                .submit_with_args(1, &types::SubmitArgs::new().timespec(&ts))
            {
                Ok(_) => {}
                // ETIME: the wait ended empty-handed; the loop checks the deadline.
                Err(e) if retry_next_turn(&e) || e.raw_os_error() == Some(libc::ETIME) => {}
                Err(e) => {
                    tracing::error!(error = %e, "waiting for the last completions");
                    break;
                }
            }
            self.reap(&mut |_conn| late += 1);
        }
        if late > 0 {
            tracing::error!(
                connections = late,
                "connections accepted after the drain were closed"
            );
        }
        if self.ops.live > 0 {
            tracing::error!(
                ops = self.ops.live,
                "ops still in flight at exit; leaking their memory"
            );
            // Keep their buffers alive for as long as the ring might write into them.
            std::mem::forget(std::mem::take(&mut self.ops));
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

/// How long a new process leaves its predecessor to stop accepting by itself before it starts
/// its takeover polls (see `start_takeover`). Usually the predecessor lets go well within it
/// and the polls never run: on one busy core, two processes taking turns at every connection
/// cost more than they gain (measured: window p99.9 up by ~1.5x with the polls from READY on).
const TAKEOVER_AFTER: Duration = Duration::from_millis(1);

/// `IORING_ACCEPT_DONTWAIT` (Linux 6.10): fail with -EAGAIN instead of waiting.
const IORING_ACCEPT_DONTWAIT: u16 = 1 << 1;

const _: () = assert!(std::mem::size_of::<squeue::Entry>() == 64);

/// Sets an SQE's `ioprio`, which carries the IORING_ACCEPT_* flags and which
/// `opcode::Accept` has no setter for.
fn with_ioprio(entry: squeue::Entry, ioprio: u16) -> squeue::Entry {
    // SAFETY: `squeue::Entry` is `#[repr(C)]` around the kernel's 64-byte `io_uring_sqe`
    // (checked above), whose `u16 ioprio` sits at byte offset 2 (uapi layout, a stable ABI).
    // Every bit pattern of those bytes is a valid Entry.
    let mut bytes: [u8; 64] = unsafe { std::mem::transmute(entry) };
    bytes[2..4].copy_from_slice(&ioprio.to_ne_bytes());
    // SAFETY: as above.
    unsafe { std::mem::transmute::<[u8; 64], squeue::Entry>(bytes) }
}

/// An `io_uring_enter` error that only means "reap and try again": EINTR (a signal this
/// driver does not read arrived), EBUSY/EAGAIN (the CQ is full and overflow entries wait in
/// the kernel; reaping frees room).
fn retry_next_turn(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINTR | libc::EBUSY | libc::EAGAIN)
    )
}

fn errno(res: i32) -> io::Error {
    io::Error::from_raw_os_error(-res)
}

/// The ring every driver uses: SINGLE_ISSUER|DEFER_TASKRUN (connections not yet reaped stay in
/// the kernel backlog if the process dies), dontfork, a CQ well above any burst.
fn new_ring() -> Result<IoUring, Error> {
    let ring = IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .setup_cqsize(CQ_ENTRIES)
        .dontfork()
        .build(SQ_ENTRIES)
        .map_err(|e| {
            Error::Unsupported(format!(
                "io_uring with SINGLE_ISSUER|DEFER_TASKRUN (Linux 6.1+): {e}"
            ))
        })?;
    probe(&ring)?;
    Ok(ring)
}

fn probe(ring: &IoUring) -> Result<(), Error> {
    let mut probe = io_uring::Probe::new();
    ring.submitter()
        .register_probe(&mut probe)
        .map_err(|e| Error::Unsupported(format!("io_uring probe: {e}")))?;
    let needed = [
        ("ACCEPT", opcode::AcceptMulti::CODE),
        ("ASYNC_CANCEL", opcode::AsyncCancel::CODE),
        ("READ", opcode::Read::CODE),
        ("RECV", opcode::Recv::CODE),
        ("SENDMSG", opcode::SendMsg::CODE),
        ("POLL_ADD", opcode::PollAdd::CODE),
        ("TIMEOUT", opcode::Timeout::CODE),
        ("UNLINKAT", opcode::UnlinkAt::CODE),
    ];
    for (name, code) in needed {
        if !probe.is_supported(code) {
            return Err(Error::Unsupported(format!("io_uring opcode {name}")));
        }
    }
    Ok(())
}

pub(crate) mod runtime;
#[cfg(test)]
mod tests;
