//! The ring: the op table (every op's memory, by [`Token`], until its final CQE), arming,
//! cancelling, submitting and reaping, the ring's setup and probe, and the bounded final wait
//! of [`Driver::finish`].
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use io_uring::{cqueue, opcode, squeue, types, IoUring};

use crate::connection::Connection;
use crate::error::Error;
use crate::sys;

use super::{Driver, Role};

/// Submission queue size: only a handful of ops are ever queued at once.
const SQ_ENTRIES: u32 = 256;

/// Completion queue size: well above any accept burst between two reaps (a 10k burst never
/// ended the multishot with 16k entries; when it does end, it is re-armed at once).
const CQ_ENTRIES: u32 = 16 * 1024;

/// How long the exit path waits for cancelled ops to complete.
pub(super) const FINAL_REAP: Duration = Duration::from_secs(2);

/// How soon a runtime's driver tries again to submit what the kernel did not take at the end
/// of a turn (see `Driver::turn`): soon, as those SQEs may be the accepts, and not at once, as
/// the kernel refused for want of memory.
pub(super) const SUBMIT_RETRY: Duration = Duration::from_millis(1);

/// READY and RETIRING are 14 bytes, ACCEPT 7 and REFUSE 8; a larger message is garbage and
/// fails to decode.
pub(super) const CHANNEL_BUF: usize = 64;

/// `IORING_ENTER_GETEVENTS`: with DEFER_TASKRUN, deferred completions are only run (and become
/// visible) when the issuer enters with this flag.
pub(super) const ENTER_GETEVENTS: u32 = 1;

/// An op's key in the table ([`Ops`]); its SQE carries it as `user_data`, and so do its CQEs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Token(u64);

impl Token {
    /// As an SQE's `user_data`.
    pub(super) fn user_data(self) -> u64 {
        self.0
    }
}

/// What an in-flight op is and the memory it owns until its final CQE.
// Some buffers are only ever written by the kernel: owning them is their whole purpose.
#[allow(dead_code)]
pub(super) enum Op {
    Accept(usize),
    /// A takeover poll on listener `i` (see `start_takeover`).
    TakeoverPoll(usize),
    /// A one-shot, non-waiting accept on listener `i` (see `sweep`).
    SweepAccept(usize),
    ReadSignal(Box<libc::signalfd_siginfo>),
    PollWake,
    Timer(Box<types::Timespec>),
    /// A message of the handoff (the OFFER with its HELLO, an FDS or a STATE message: see
    /// `Transfer`); the name is from when HELLO was the only one.
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
/// slot. Closed by `finish`, after its final cancel: from then on it takes no op, so none can
/// be armed that the cancel does not cover.
#[derive(Default)]
pub(super) struct Ops {
    slots: Vec<(u32, Option<Op>)>,
    free: Vec<u32>,
    pub(super) live: usize,
    closed: bool,
}

impl Ops {
    fn insert(&mut self, op: Op) -> Option<Token> {
        if self.closed {
            return None;
        }
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
        Some(Token(((slot.0 as u64) << 32) | index as u64))
    }

    pub(super) fn get(&self, token: Token) -> Option<&Op> {
        let (gen, index) = ((token.0 >> 32) as u32, token.0 as u32);
        match self.slots.get(index as usize) {
            Some((g, Some(op))) if *g == gen => Some(op),
            _ => None,
        }
    }

    pub(super) fn remove(&mut self, token: Token) -> Option<Op> {
        let (gen, index) = ((token.0 >> 32) as u32, token.0 as u32);
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

/// A handoff message in flight (see `Transfer`): msghdr, iovecs, payload and control buffer
/// stay put until the SendMsg completes (the box never moves; the Vecs' heap buffers never
/// move, nor does the memory of `tail`, a `Bytes` held here).
pub(super) struct SendMsgBufs {
    pub(super) msg: libc::msghdr,
    iov: [libc::iovec; 2],
    payload: Vec<u8>,
    /// Sent after `payload` without a copy: a chunk of the application's state.
    tail: bytes::Bytes,
    control: Vec<u64>,
    /// Fds sent that nothing else keeps open (this process's own pidfd, duplicates).
    _keep: Vec<OwnedFd>,
    /// The upgrade this message belongs to.
    pub(super) upgrade: crate::machine::UpgradeId,
    /// What is left to send after this message; `None` after the OFFER, whose answer the
    /// successor gives.
    pub(super) transfer: Option<super::upgrade::Transfer>,
}

impl SendMsgBufs {
    /// `payload` then `tail` as one message, with `fds` (at most `SCM_MAX_FD`) in one
    /// `SCM_RIGHTS` control message.
    pub(super) fn new(
        upgrade: crate::machine::UpgradeId,
        payload: Vec<u8>,
        tail: bytes::Bytes,
        fds: &[RawFd],
        keep: Vec<OwnedFd>,
    ) -> Box<SendMsgBufs> {
        let fd_bytes = std::mem::size_of_val(fds) as u32;
        // SAFETY: CMSG_SPACE is a pure size computation.
        let space = unsafe { libc::CMSG_SPACE(fd_bytes) } as usize;
        let empty = libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        };
        let mut bufs = Box::new(SendMsgBufs {
            // SAFETY: msghdr is plain data; all-zero is valid.
            msg: unsafe { std::mem::zeroed() },
            iov: [empty, empty],
            payload,
            tail,
            control: vec![0u64; space.div_ceil(8)],
            _keep: keep,
            upgrade,
            transfer: None,
        });
        bufs.iov[0].iov_base = bufs.payload.as_mut_ptr().cast();
        bufs.iov[0].iov_len = bufs.payload.len();
        // The kernel only reads from the iovecs of a send.
        bufs.iov[1].iov_base = bufs.tail.as_ptr().cast_mut().cast();
        bufs.iov[1].iov_len = bufs.tail.len();
        bufs.msg.msg_iov = bufs.iov.as_mut_ptr();
        bufs.msg.msg_iovlen = if bufs.tail.is_empty() { 1 } else { 2 };
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

    /// The message's length in bytes.
    pub(super) fn len(&self) -> usize {
        self.payload.len() + self.tail.len()
    }
}

impl Driver {
    /// The eventfd that wakes this driver: the shared one for the coordinator, its own for a
    /// worker.
    fn own_wake_fd(&self) -> RawFd {
        match &self.role {
            Role::Worker(w) => w.set.wake_of(w.index).as_raw_fd(),
            _ => self.shared.wake.as_raw_fd(),
        }
    }

    /// The wake eventfd (`own_wake_fd`), borrowed.
    pub(super) fn wake_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        // SAFETY: the wake eventfd outlives this driver (owned by `shared` or `workers`).
        unsafe { std::os::fd::BorrowedFd::borrow_raw(self.own_wake_fd()) }
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

    pub(super) fn enter(&mut self, wait: bool) -> Result<(), Error> {
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

    pub(super) fn reap(&mut self, sink: &mut dyn FnMut(Connection)) {
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
                self.complete(Token(token), res, flags, sink);
            }
        }
        self.cqes = cqes;
    }

    /// Hands a CQE to the handler of its op. An accept's result becomes the connection's
    /// `OwnedFd` here, so the handlers need no `unsafe`.
    pub(super) fn complete(
        &mut self,
        token: Token,
        res: i32,
        flags: u32,
        sink: &mut dyn FnMut(Connection),
    ) {
        let more = cqueue::more(flags);
        let Some(op) = self.ops.get(token) else {
            return;
        };
        match op {
            Op::Accept(i) => {
                let i = *i;
                self.on_accept(token, i, accepted(res), res, more, sink);
            }
            Op::TakeoverPoll(i) => {
                let i = *i;
                self.on_takeover_poll(token, i, res, more);
            }
            Op::SweepAccept(i) => {
                let i = *i;
                self.on_sweep_accept(token, i, accepted(res), res, sink);
            }
            Op::ReadSignal(_) => self.on_signal(token, res),
            Op::PollWake => {
                if !more {
                    self.ops.remove(token);
                }
                if res == -libc::ECANCELED {
                    return;
                }
                sys::eventfd_drain(self.wake_fd());
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
            Op::SendHello(_) => self.on_hello_sent(token, res),
            Op::RecvSuccessor { .. } => self.on_successor_recv(token, res),
            Op::RecvPredecessor(_) => self.on_predecessor_recv(token, res),
            Op::SuccessorExit { .. } => self.on_successor_exit(token, res),
            Op::Unlink(_) => self.on_unlinked(token, res),
            Op::Cancel => {
                self.ops.remove(token);
            }
        }
    }

    pub(super) fn arm_signal_read(&mut self) {
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
    pub(super) fn arm_wake_read(&mut self) {
        let fd = self.own_wake_fd();
        let entry = opcode::PollAdd::new(types::Fd(fd), libc::POLLIN as u32)
            .multi(true)
            .build();
        self.arm(Op::PollWake, entry);
    }

    /// Keeps one Timeout armed for the earliest of the machine's deadline and the accept
    /// retries. A timer armed for a later time than needed is superseded by an earlier one; a
    /// timer that fires early is harmless (deadlines are checked against the clock).
    pub(super) fn arm_timer(&mut self) {
        let next = self
            .accepts
            .next_retry()
            .into_iter()
            .chain(self.machine.poll_timeout())
            .chain(self.succession.poll_timeout())
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

    /// Puts `op` in the table and queues `entry` for it (with the op's token): every op starts
    /// here. Nothing once `finish` has closed the table (`None`). `entry` may point into
    /// `op`'s boxed memory, which does not move when `op` does.
    pub(super) fn arm(&mut self, op: Op, entry: squeue::Entry) -> Option<Token> {
        let token = self.ops.insert(op)?;
        self.push(entry.user_data(token.0));
        Some(token)
    }

    /// Queues a cancel of the ops `what` matches; its own completion is an `Op::Cancel`.
    pub(super) fn cancel(&mut self, what: types::CancelBuilder) {
        self.arm(Op::Cancel, opcode::AsyncCancel2::new(what).build());
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
    pub(super) fn finish(&mut self) {
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
            accepted = self.accepts.accepted,
            "accept loop done"
        );
        // Whatever ends now must not re-arm (an accept's terminal completion would otherwise
        // re-arm it if this driver exits while still accepting, e.g. a worker told to quit
        // after the coordinator failed).
        self.accepts.wanted = false;
        self.cancel(types::CancelBuilder::any());
        // Nothing is armed from here on (see `Ops`): an op whose completion comes after the
        // cancel (a signal read that found a signal pending as it was submitted) would
        // otherwise re-arm, and no cancel would cover it.
        self.ops.closed = true;
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
            self.ops.closed = true; // the fresh table takes nothing either
        }
    }
}

const _: () = assert!(std::mem::size_of::<squeue::Entry>() == 64);

/// Sets an SQE's `ioprio`, which carries the IORING_ACCEPT_* flags and which
/// `opcode::Accept` has no setter for.
pub(super) fn with_ioprio(entry: squeue::Entry, ioprio: u16) -> squeue::Entry {
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
pub(super) fn retry_next_turn(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINTR | libc::EBUSY | libc::EAGAIN)
    )
}

pub(super) fn errno(res: i32) -> io::Error {
    io::Error::from_raw_os_error(-res)
}

/// The ring every driver uses: SINGLE_ISSUER|DEFER_TASKRUN (connections not yet reaped stay in
/// the kernel backlog if the process dies), dontfork, a CQ well above any burst.
pub(super) fn new_ring() -> Result<IoUring, Error> {
    let ring = IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .setup_cqsize(CQ_ENTRIES)
        .dontfork()
        .build(SQ_ENTRIES)
        .map_err(|e| crate::kernel::ring_setup_error(&e))?;
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

/// The connection an accept's CQE carries: a non-negative result is a new fd, installed in
/// this process's table for it alone (`IORING_OP_ACCEPT`, not a fixed file).
fn accepted(res: i32) -> Option<OwnedFd> {
    // SAFETY: only called with the result of an accept op of this ring; the fd is new and
    // nothing else owns it.
    (res >= 0).then(|| unsafe { OwnedFd::from_raw_fd(res) })
}
