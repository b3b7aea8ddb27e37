//! The new process an upgrade starts, seen from this (old) one: the spawn on a thread of its
//! own, the exit watch, its messages until READY (and those left at its exit), and the
//! children abandoned with SIGTERM until they exit or are SIGKILLed.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::Ordering::SeqCst;
use std::time::{Duration, Instant};

use io_uring::{opcode, types};

use crate::handoff::Message;
use crate::machine::{Event, UpgradeId};
use crate::{spawn, sys};

use super::ring::{errno, Op, Token, CHANNEL_BUF, FINAL_REAP};
use super::{Driver, Role};

/// The new process while it starts and after it took over.
pub(super) struct Successor {
    pub(super) pid: u32,
    pub(super) upgrade: UpgradeId,
    pub(super) channel: OwnedFd,
    /// A duplicate of the exit watch's pidfd: signals reach this process and no other, even
    /// after it was reaped and its pid reused.
    pub(super) pidfd: OwnedFd,
}

/// A child abandoned with `Stop::Terminate` (SIGTERM): SIGKILLed at `kill_at` if it has not
/// exited by then (see `escalate`).
pub(super) struct Terminating {
    pub(super) pid: u32,
    pub(super) pidfd: OwnedFd,
    pub(super) kill_at: Instant,
}

/// What a spawn thread needs: the binary, its arguments, the signals to reset, the upgrade.
struct SpawnJob {
    exe: std::path::PathBuf,
    args: Vec<std::ffi::OsString>,
    env: crate::launch::EnvOverrides,
    signals: nix::sys::signal::SigSet,
    upgrade: UpgradeId,
}

/// What a spawn thread reports.
pub(super) struct SpawnResult {
    upgrade: UpgradeId,
    result: io::Result<spawn::Spawned>,
    took: Duration,
}

impl SpawnJob {
    fn run(self) -> SpawnResult {
        let started = Instant::now();
        let result = spawn::spawn(
            &self.exe,
            &self.args,
            &self.env,
            self.upgrade,
            &self.signals,
        );
        SpawnResult {
            upgrade: self.upgrade,
            result,
            took: started.elapsed(),
        }
    }
}

impl Driver {
    /// Starts the new binary on a thread of its own. The spawn is a vfork (`spawn.rs`): the calling
    /// thread is suspended until the child has exec'ed, which took 0.2 ms idle and up to 1.6 ms
    /// with the core busy serving (measured here); on the ring thread that would stall accepting
    /// and serving for as long. The thread reports through `spawn_results` and the wake
    /// eventfd; `collect_spawns` turns the report into the machine's event. The thread inherits
    /// this thread's signal mask (the upgrade signal, SIGTERM and SIGINT blocked), so no signal meant for the
    /// signalfd is delivered to it.
    pub(super) fn start_spawn(&mut self, upgrade: UpgradeId) {
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
            env: self.config.env.clone(),
            signals: self.config.signals,
            upgrade,
        }
    }

    /// Hands finished spawns to the machine, if their upgrade is still the one in flight; a
    /// child whose upgrade was given up meanwhile (a shutdown, the start deadline) is killed
    /// and reaped by its exit watch.
    pub(super) fn collect_spawns(&mut self) {
        while let Ok(done) = self.spawn_results.1.try_recv() {
            let current = self.machine.awaits_spawn(done.upgrade);
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
                    // Only in Forking, entered from Serving, where no successor is set.
                    debug_assert!(self.successor.is_none(), "a successor overwritten");
                    self.successor = Some(Successor {
                        pid,
                        upgrade,
                        channel: child.channel,
                        pidfd,
                    });
                    self.arm_successor_exit(pid, child.pidfd);
                    self.arm_successor_recv();
                    self.feed(Event::SuccessorSpawned { pid });
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
    pub(super) fn abandon_spawns(&mut self) {
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
                // Reaping our own child, which SIGKILL ends promptly.
                let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(child.pid as i32), None);
            }
        }
    }

    fn arm_successor_exit(&mut self, pid: u32, pidfd: OwnedFd) {
        let entry = opcode::PollAdd::new(types::Fd(pidfd.as_raw_fd()), libc::POLLIN as u32).build();
        self.arm(Op::SuccessorExit { pid, _pidfd: pidfd }, entry);
    }

    /// A child's pidfd polled readable: it has exited.
    pub(super) fn on_successor_exit(&mut self, token: Token, res: i32) {
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
            if let Some(child) = self.successor.take() {
                self.close_channel(child.channel);
            }
        }
        self.log_if_nobody_left(pid, &status);
        self.feed(Event::SuccessorExited { pid, status });
        // The child's accepts may have been ahead of ours in the queue: ours were re-armed
        // during the handover (a multishot accept ends on a full CQ, on some errors, after a
        // backoff), and a re-armed accept waits behind every waiter already there. The
        // wake-up of a connection that came then went to the child's accept, which died (or
        // was cancelled) without accepting it; nobody else was woken, and without this sweep
        // the connection would wait for the next one (RELIABILITY.md, "A connection stranded
        // at the let-go", with the roles swapped). A rollback from HandingOver re-arms
        // nothing, so this is the only moment. The poll beside an accept armed while a child
        // lives (`arm_accept`) usually took such a connection already; this covers an accept
        // armed once the child no longer counted as alive (being killed).
        if self.machine.accepting() {
            self.sweep_queues();
        }
        self.end_guard_polls_if_alone();
    }

    /// Whether a child lives that may hold accept wake-ups: the successor, or one abandoned
    /// with SIGTERM that has not exited yet (see `arm_accept`). A worker asks its coordinator,
    /// which publishes it at the end of each turn (`publish_children`): a child arms its
    /// accepts only after its exec and build, long after the turn that spawned it.
    pub(super) fn children_alive(&self) -> bool {
        match &self.role {
            Role::Worker(w) => w.set.children_alive.load(SeqCst),
            _ => self.own_children_alive(),
        }
    }

    /// This driver's own children: the successor, and those abandoned still running.
    fn own_children_alive(&self) -> bool {
        self.successor.is_some() || !self.terminating.is_empty()
    }

    /// The coordinator tells its workers whether a child lives (see `children_alive`).
    pub(super) fn publish_children(&self) {
        if let Role::Coordinator(c) = &self.role {
            c.0.children_alive.store(self.own_children_alive(), SeqCst);
        }
    }

    /// Cancels the polls `arm_accept` armed beside accepts behind a child's once no child is
    /// left (a takeover of this process's own keeps them). Cheap when none is armed.
    pub(super) fn end_guard_polls_if_alone(&mut self) {
        if self.guarding && !self.children_alive() && !self.succession.taking_over() {
            self.guarding = false;
            self.cancel_takeover_polls();
        }
    }

    /// Logs that the death of `pid`, about to be fed, leaves the service to nobody (see
    /// `Machine::exit_leaves_nobody`): from its exit watch or from a drain's last check,
    /// whichever comes first (the machine has exited by the other).
    pub(super) fn log_if_nobody_left(&self, pid: u32, status: &str) {
        if self.machine.exit_leaves_nobody(pid) {
            tracing::error!(
                child = pid,
                status,
                "the new process died unannounced after the application stopped taking \
                 connections for the drain (its idle grace was over): this process will not \
                 take the service back; unless that process had handed it on, nobody will \
                 serve once this process has drained and exited"
            );
        }
    }

    /// Closes a successor's handoff channel, the one way it is closed. Ops queued in this turn
    /// may name its fd number (the HELLO's next message, a re-armed Recv): they are cancelled
    /// and submitted first, so each resolves the fd while it is still this channel. Closed
    /// before the submit, the number could be reused by another thread in between, and a Recv
    /// would eat bytes of someone else's connection, a SendMsg write the handoff into it
    /// (`check_channel_op` catches the EBADF of the harmless case).
    pub(super) fn close_channel(&mut self, channel: OwnedFd) {
        self.cancel(types::CancelBuilder::fd(types::Fd(channel.as_raw_fd())).all());
        // A submit can also stop short of the queue's end (an SQE the kernel refused, no
        // memory for a request), leaving the last SQEs (these) queued: only an empty queue
        // means every SQE naming the channel was issued.
        if let Err(e) = self.ring.submit() {
            tracing::warn!(error = %e, "submitting before closing a handoff channel");
        }
        if self.ring.submission().is_empty() {
            drop(channel);
        } else {
            // Kept open until a turn's submit empties the queue.
            self.closing_channels.push(channel);
        }
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

    /// A message from the successor (or the channel's end) before its READY.
    pub(super) fn on_successor_recv(&mut self, token: Token, res: i32) {
        let Some(Op::RecvSuccessor { pid, buf }) = self.ops.remove(token) else {
            unreachable!()
        };
        check_channel_op("Recv", res);
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
                if self.successor.is_some() && self.machine.awaits_ready() {
                    self.arm_successor_recv();
                }
            }
            // The machine judges it only before READY (HandingOver); later it is the exit
            // that matters, seen through the pidfd.
            0 => self.feed(Event::SuccessorMessageInvalid(
                "closed the handoff channel before READY".into(),
            )),
            e if e == -libc::ECANCELED => {}
            e => self.feed(Event::SuccessorMessageInvalid(format!(
                "handoff channel: {}",
                errno(e)
            ))),
        }
    }

    /// One message from the successor, as the machine's event.
    fn on_successor_message(&mut self, bytes: &[u8]) {
        match Message::decode(bytes) {
            Ok(Message::Ready(id)) => self.feed(Event::SuccessorReady(id)),
            Ok(Message::Retiring(_)) => self.feed(Event::SuccessorRetired),
            Ok(Message::Serving(_)) => self.feed(Event::SuccessorResumed),
            Ok(Message::Accept(version)) => self.on_version_accepted(version),
            Ok(Message::Refuse(theirs)) => self.on_version_refused(theirs),
            Ok(other) => self.feed(Event::SuccessorMessageInvalid(format!(
                "unexpected message {other:?}"
            ))),
            Err(e) => self.feed(Event::SuccessorMessageInvalid(e.to_string())),
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
    /// - from READY on, the ring does not re-arm its `Recv` on the channel (see
    ///   `on_successor_recv`). The one exception: a READY read here (the `ReadSuccessor`
    ///   case) leaves the `Recv` armed beside it. That `Recv` takes at most the next message,
    ///   fed in order like any (its CQE comes before the exit's, as below), or ends with the
    ///   channel (EOF, ignored once the successor is cleared). It was submitted turns ago,
    ///   so the kernel holds the file: closing our fd when the successor is cleared cannot
    ///   point it at another file;
    /// - before READY, the one armed `Recv` was submitted in the turn that started the child,
    ///   before the child could send anything. A message it took has its CQE ahead of the
    ///   exit's: both are task work on this ring, run in the order queued, and the message
    ///   came first. What it has not taken is read here, and it then ends with EOF, ignored
    ///   once the successor is cleared.
    pub(super) fn take_successor_messages(&mut self) {
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

    /// SIGKILLs the children abandoned with SIGTERM that are still running at their
    /// `kill_at`, and forgets those that have exited (their exit watch reaps them).
    pub(super) fn escalate(&mut self, now: Instant) {
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
        self.end_guard_polls_if_alone();
    }
}

/// An op on a handoff channel must never find its fd closed: the channel is closed only after
/// every SQE naming it has been submitted (`close_channel`), and a submitted op holds the file.
/// EBADF means an SQE was submitted after the close, when the fd number could already have
/// named another file of this process (another thread's connection, say).
pub(super) fn check_channel_op(op: &str, res: i32) {
    if res == -libc::EBADF {
        tracing::error!(
            op,
            "an op on the handoff channel ran after the channel was closed"
        );
        debug_assert!(
            false,
            "a {op} on the handoff channel ran after it was closed"
        );
    }
}
