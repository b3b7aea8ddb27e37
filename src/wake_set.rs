//! How a driver that runs inside an async runtime is woken: one epoll instance of its own (the
//! *wake set*) holding the fds whose readiness means "a completion is coming", plus a timerfd
//! for its deadlines. The runtime polls the wake set's fd alone (see `Server::run_async`).
//!
//! # Why not the ring's registered eventfd
//! A `SINGLE_ISSUER | DEFER_TASKRUN` ring makes a completion visible only when its thread
//! enters it with `GETEVENTS`; a thread asleep elsewhere (a runtime's `epoll_wait`) must be
//! woken by something else. The kernel's way is an eventfd registered with the ring, signalled
//! when the ring's deferred work list goes from empty to non-empty (`io_req_local_work_add`).
//! On the kernel measured here (Linux 6.18, a 2-vCPU VM) that signal is *not* delivered from
//! the context that queues the work (a connecting client's softirq): it goes through
//! `io_eventfd_do_signal`, an RCU callback (`call_rcu_hurry`), so the runtime woke one RCU
//! grace period later, 10–20 ms here, for every connection of an idle server. (perf, kernel
//! call chains of `sched:sched_wakeup`: every wake-up of the server thread came from
//! `rcu_do_batch → io_eventfd_do_signal → eventfd_signal_mask → ep_poll_callback`; see
//! `docs/WAKEUPS.md`.) Other kernels signal directly; a user cannot know which one they have.
//!
//! # What wakes the runtime instead
//! Every op of the ring that waits for something outside this process is armed on an fd that
//! is also in the wake set, and that fd's own wait queue wakes the epoll directly, in the
//! context of whoever made it ready (a signal, a write, a connect, an exit, an hrtimer):
//! - the listeners, while accepting (the multishot accepts, the takeover polls);
//! - the wake eventfd (API requests, the last connection closing, a worker's report);
//! - the signalfd, the predecessor's and the successor's channels, the successor's pidfd;
//! - a timerfd set to the earliest deadline (instead of a ring `Timeout`: the driver checks
//!   every deadline against the clock on each turn, so the wake-up is all it needs).
//!
//! The successor's channel is also watched for writability while the handoff is sent (see
//! [`WakeSet::watch_writable`]): a send that finds it full waits for room.
//!
//! Ops that complete inline during the submit (a non-waiting accept, a cancel and the
//! terminal completion it causes, a handoff message with room in the channel) need no wake-up: the driver
//! turns again while the ring's fd polls readable (`Driver::has_pending_work`). An `UNLINKAT`
//! completes on io-wq and wakes nothing; it is reaped at the next turn, whatever wakes it.
//!
//! # The order of wake-ups on one fd (the invariant this relies on)
//! When an fd becomes ready, the kernel calls the waiters on its wait queue one after the
//! other, in list order, in the same context (`__wake_up_common`). The ring's waiter queues
//! the completion's task work; ours wakes this thread. If ours ran first, this thread could
//! enter the ring before the task work is queued, find nothing, and sleep again with the
//! completion waiting for the next wake-up. So:
//! - a non-exclusive waiter is added at the *head* of the queue (`add_wait_queue`), and both
//!   the ring's polls on one-shot and multishot reads, receives and polls and epoll's entries
//!   are non-exclusive. Every fd is added here *before* the ring arms its first op on it, so the
//!   ring's waiter (newer) is always ahead of ours and its task work is queued before this thread
//!   is woken;
//! - an accept's waiter is *exclusive* and goes to the tail (`add_wait_queue_exclusive`), behind
//!   ours, so for listeners the race is possible (it needs the connecting CPU to stall between two
//!   callbacks of one wake-up). The driver closes it: a listener that woke the runtime but
//!   delivered nothing in that turn is swept with a non-waiting accept, issued inline
//!   (`Driver::sweep_missed`).
//!
//! Entries are edge-triggered: a turn starts by draining the ready list (`drain`), so anything
//! that becomes ready after that is a new edge and a new wake-up of the runtime. An fd closed by
//! the driver leaves the set by itself (epoll drops an entry when its file is released).

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::time::{Duration, Instant};

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};

/// What an entry of the wake set stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Source {
    /// The listener at this index of the driver's accept slots.
    Listener(usize),
    /// Anything else: the driver turns, and the ring's completions say what happened.
    Other,
}

impl Source {
    fn data(self) -> u64 {
        match self {
            Source::Listener(i) => i as u64 + 1,
            Source::Other => 0,
        }
    }

    fn from_data(data: u64) -> Source {
        match data {
            0 => Source::Other,
            n => Source::Listener((n - 1) as usize),
        }
    }
}

/// The wake set of one driver: an epoll instance and the timerfd in it.
pub(crate) struct WakeSet {
    epoll: Epoll,
    timer: TimerFd,
    /// The deadline the timerfd is set for, if it has not passed.
    timer_at: Option<Instant>,
    /// Reused buffer for `drain`.
    events: Vec<EpollEvent>,
}

impl WakeSet {
    pub(crate) fn new() -> io::Result<WakeSet> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        let timer = TimerFd::new(
            ClockId::CLOCK_MONOTONIC,
            TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC,
        )?;
        let set = WakeSet {
            epoll,
            timer,
            timer_at: None,
            events: vec![EpollEvent::empty(); 64],
        };
        set.add(set.timer.as_fd(), Source::Other)?;
        Ok(set)
    }

    /// The fd the runtime polls for readability.
    pub(crate) fn fd(&self) -> RawFd {
        self.epoll.0.as_raw_fd()
    }

    /// Watches `fd` for readability. Call it before the ring arms its first op on `fd` (see
    /// the module doc). Adding an fd twice is harmless (`EEXIST` is ignored).
    pub(crate) fn add(&self, fd: BorrowedFd<'_>, source: Source) -> io::Result<()> {
        let event = EpollEvent::new(EpollFlags::EPOLLIN | EpollFlags::EPOLLET, source.data());
        match self.epoll.add(fd, event) {
            Err(nix::errno::Errno::EEXIST) => Ok(()),
            other => other.map_err(io::Error::from),
        }
    }

    /// Watches `fd`, added with [`WakeSet::add`] already, for writability too: for the
    /// successor's channel while the handoff's messages go out. A SendMsg that finds the
    /// channel full is retried by the ring when the socket's wait queue reports `EPOLLOUT`
    /// (for a unix socket, `unix_write_space` when the reader has freed enough of the
    /// sender's buffer); that retry is deferred work, which this wake-up makes the driver
    /// run. `EPOLL_CTL_MOD` keeps the entry's place in the wait queue (only its events
    /// change), so the ring's waiter stays ahead of it.
    pub(crate) fn watch_writable(&self, fd: BorrowedFd<'_>) -> io::Result<()> {
        let mut event = EpollEvent::new(
            EpollFlags::EPOLLIN | EpollFlags::EPOLLOUT | EpollFlags::EPOLLET,
            Source::Other.data(),
        );
        self.epoll.modify(fd, &mut event).map_err(io::Error::from)
    }

    /// Stops watching `fd` (a listener this driver no longer accepts on). Not needed before
    /// closing an fd: epoll drops the entry when the file is released.
    pub(crate) fn remove(&self, fd: BorrowedFd<'_>) {
        // ENOENT (never added) is fine; nothing else can fail for an open fd.
        let _ = self.epoll.delete(fd);
    }

    /// Takes every ready entry off the list (so the next readiness is a new edge) and calls
    /// `fired` with each listener among them.
    pub(crate) fn drain(&mut self, mut fired: impl FnMut(usize)) {
        loop {
            let n = match self.epoll.wait(&mut self.events, EpollTimeout::ZERO) {
                Ok(n) => n,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(_) => return,
            };
            for event in &self.events[..n] {
                if let Source::Listener(i) = Source::from_data(event.data()) {
                    fired(i);
                }
            }
            if n < self.events.len() {
                return;
            }
        }
    }

    /// Sets the timerfd to fire at `at`, unless it is set for that moment or earlier already.
    pub(crate) fn set_timer(&mut self, at: Instant, now: Instant) {
        // Set for `at` already: it fires, or it fired and its edge wakes (or woke) the runtime.
        // Set for an earlier moment still to come: that wake-up comes first, and the turn it
        // starts sets the timer again.
        if self
            .timer_at
            .is_some_and(|armed| armed == at || (armed < at && armed > now))
        {
            return;
        }
        // Relative: `Instant` has no public epoch. A zero time would disarm the timer.
        let wait = at
            .saturating_duration_since(now)
            .max(Duration::from_nanos(1));
        let spec = TimeSpec::from_duration(wait);
        match self
            .timer
            .set(Expiration::OneShot(spec), TimerSetTimeFlags::empty())
        {
            Ok(()) => self.timer_at = Some(at),
            Err(e) => tracing::error!(error = %e, "setting the deadline timer"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_timer_wakes_the_set_and_a_listener_is_named() {
        let mut set = WakeSet::new().unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        set.add(listener.as_fd(), Source::Listener(3)).unwrap();
        let now = Instant::now();
        set.set_timer(now + Duration::from_millis(5), now);
        let readable =
            |set: &WakeSet, ms: i32| crate::sys::readable_within(set.epoll.0.as_fd(), ms);
        assert!(readable(&set, 2_000), "the timerfd did not wake the set");
        let mut fired = Vec::new();
        set.drain(|i| fired.push(i));
        assert!(fired.is_empty(), "{fired:?}");
        assert!(!readable(&set, 0), "drained, yet still readable");

        let _client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        assert!(readable(&set, 2_000), "a connection did not wake the set");
        set.drain(|i| fired.push(i));
        assert_eq!(fired, vec![3]);
        // Edge-triggered: the queued connection alone does not keep the set readable.
        assert!(!readable(&set, 0));
        set.remove(listener.as_fd());
        let _second = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        assert!(!readable(&set, 50), "a removed listener still woke the set");
    }

    /// Why the wake set watches each fd and not the ring's own fd (docs/WAKEUPS.md): a
    /// `DEFER_TASKRUN` ring's fd is not woken when an accept's task work is queued. A probe of
    /// the kernel, not of this crate (a newer kernel may change it), so run by hand:
    /// `cargo test --all-features --lib -- --ignored a_defer_taskrun`. Linux 6.18.44 here: the fd
    /// polls readable once the accept's task work is queued, but a waiter on it (`poll`, or an
    /// epoll holding it: 200 of 200 waits of 100 ms timed out in a probe) is never woken, while
    /// a `COOP_TASKRUN` ring's fd woke its epoll waiter after 0.24 ms (median of 200).
    #[test]
    #[ignore = "a probe of the kernel's behaviour, run by hand"]
    #[allow(unsafe_code)]
    fn a_defer_taskrun_rings_fd_is_not_woken_by_an_accept() {
        use io_uring::{opcode, types, IoUring};
        use std::os::fd::AsRawFd;
        let mut ring: IoUring = IoUring::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .build(8)
            .unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let accept = opcode::AcceptMulti::new(types::Fd(listener.as_raw_fd())).build();
        // SAFETY: the entry refers to no memory.
        unsafe { ring.submission().push(&accept).unwrap() };
        ring.submit().unwrap();
        let client = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            std::net::TcpStream::connect(addr).unwrap()
        });
        // SAFETY: the ring's fd stays open for the borrow's duration.
        let ring_fd = unsafe { BorrowedFd::borrow_raw(ring.as_raw_fd()) };
        // `poll` checks every fd once more when it times out, and this one is readable by
        // then (the task work is queued): only a return well before the timeout is a wake-up.
        let t = Instant::now();
        let readable = crate::sys::readable_within(ring_fd, 200);
        let woken = readable && t.elapsed() < Duration::from_millis(150);
        let _client = client.join().unwrap();
        // Entering to wait runs the deferred work: the accept completed all along.
        ring.submit_and_wait(1).unwrap();
        assert!(ring.completion().next().is_some(), "no connection accepted");
        assert!(
            readable,
            "the queued accept does not even make the ring's fd readable"
        );
        assert!(
            !woken,
            "this kernel wakes the ring's fd: the wake set could watch it alone"
        );
    }
}
