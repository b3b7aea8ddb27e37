//! The predecessor's side of an upgrade: carrying out the machine's [`Action`]s, the HELLO
//! that hands the listeners over, the answers to upgrade requests, systemd's notifications,
//! the upgrade's timeline (the pid file's moves are in `pid_file.rs`).

use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::sync::atomic::Ordering::SeqCst;
use std::time::Instant;

use io_uring::{opcode, types};

use crate::error::{UpgradeError, UpgradeFailure};
use std::sync::Arc;

use bytes::Bytes;

use crate::handoff::{
    state_header, ListenerRecord, Message, SocketKind, MAX_FDS_PER_MESSAGE, MAX_LISTENERS,
    STATE_CHUNK,
};
use crate::machine::successor::SuccessionEvent;
use crate::machine::{Action, Event, ExitReason, Outcome, Phase, Requester, Stop, UpgradeId};
use crate::protocol::ProtocolVersions;
use crate::{sys, systemd};

use super::child::Terminating;
use super::ring::{errno, Op, SendMsgBufs, Token};
use super::Driver;

/// Where an fd of the handoff comes from, resolved when its `FDS` message is built.
#[derive(Clone, Copy)]
enum Source {
    Accept(usize),
    Worker(usize),
    Udp(usize),
    App(usize),
    Elder(usize),
}

/// What is left of a handoff once the version is agreed: its messages go out one at a time,
/// each built when the previous one's send has completed, so this process holds at most one
/// message (≤ 253 duplicated fds, or a slice of the application's state) beyond what it
/// already had.
pub(super) struct Transfer {
    version: u8,
    records: Vec<ListenerRecord>,
    sources: Vec<Source>,
    /// The application's fds as set when the handoff started.
    app: Arc<Vec<(String, std::os::fd::OwnedFd)>>,
    /// This process's pidfd, then its elders' still alive.
    elders: Vec<std::os::fd::OwnedFd>,
    sent_fds: usize,
    /// The application's state, held by reference.
    state: Bytes,
    sent_state: usize,
}

/// Where the sending of the upgrade in flight stands (reset with its [`Timeline`]).
#[derive(Clone, Copy, Default)]
struct HandoffProgress {
    /// The version the successor accepted.
    agreed: Option<u8>,
    /// The version of the transfer whose messages are in flight (one op at a time).
    sending: Option<u8>,
    /// The version of the transfer sent whole, if one was.
    sent: Option<u8>,
}

/// When each step of the current upgrade happened, for the log (target `ringflip::timeline`)
/// and the benchmarks.
#[derive(Clone, Copy, Default)]
pub(super) struct Timeline {
    upgrade: Option<UpgradeId>,
    trigger: Option<Instant>,
    pub(super) spawned: Option<Instant>,
    /// The successor's ACCEPT: the protocol version agreed (at most once per upgrade).
    agreed: Option<Instant>,
    /// Where the handoff's sending stands.
    handoff: HandoffProgress,
    /// The whole handoff sent (HELLO, every fd, the state).
    pub(super) hello_sent: Option<Instant>,
    pub(super) ready: Option<Instant>,
    pub(super) accept_stopped: Option<Instant>,
    pub(super) drained: Option<Instant>,
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
            agreed_us = us(self.agreed),
            hello_sent_us = us(self.hello_sent),
            ready_us = us(self.ready),
            accept_stopped_us = us(self.accept_stopped),
            drained_us = us(self.drained),
            exited_us = us(Some(exited)),
            "upgrade timeline (from the trigger)"
        );
    }
}

impl Driver {
    /// Counts the older generations still draining, then asks the machine.
    pub(super) fn request_upgrade(&mut self, by: Requester) {
        self.count_elders();
        self.feed(Event::UpgradeRequested(by));
    }

    /// Tells the machine how many older generations still drain (pruning those gone): before
    /// an upgrade request, and before one that waited for the predecessor's let-go starts.
    pub(super) fn count_elders(&mut self) {
        self.elders.retain(|fd| !sys::poll_readable(fd.as_fd()));
        self.feed(Event::EldersDraining(self.elders.len() as u32));
    }

    pub(super) fn act(&mut self, action: Action) {
        match action {
            Action::SpawnSuccessor(upgrade) => {
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
            Action::SendListeners(upgrade) => self.send_offer(upgrade),
            Action::StopAccepting => self.stop_accepting(),
            Action::ResumeAccepting => {
                tracing::warn!("the new process died during the drain; serving again");
                self.reclaim_pid_file();
                // The main process again (MAINPID=, unless the predecessor gave up on this
                // one); a RETIRING told to our own predecessor is withdrawn.
                self.feed_succession(SuccessionEvent::Resumed);
                self.resume_accepting();
            }
            Action::StartDrain(cause) => {
                self.shared.draining.store(true, SeqCst);
                // STOPPING=1 if this is the main process and it shuts down (the cause travels
                // in the action: READY and the successor's exit can come in one batch); RETIRING
                // to our own predecessor if it still drains.
                self.feed_succession(SuccessionEvent::Draining(cause));
            }
            Action::StopDrain => self.shared.draining.store(false, SeqCst),
            Action::AbandonSuccessor { pid, stop } => {
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
                    tracing::info!(child.pid = pid, upgrade.id = %child.upgrade, "child abandoned");
                    self.close_channel(child.channel);
                }
            }
            Action::ReadSuccessor => {
                self.take_successor_messages();
                self.feed(Event::SuccessorRead);
            }
            Action::CheckSuccessor(pid) => {
                // First what it said and this driver has not read (after READY, a RETIRING is
                // read only at its exit): a planned exit must not pass for a crash.
                self.take_successor_messages();
                // A readable pidfd means exited (its exit watch reports it soon after).
                let alive = self
                    .successor
                    .as_ref()
                    .is_some_and(|s| s.pid == pid && !sys::poll_readable(s.pidfd.as_fd()));
                if !alive {
                    self.log_if_nobody_left(pid, "exited (found at the drain's end)");
                    // Gone: its channel closes now rather than at its exit watch's completion
                    // (which still reaps it), so no later spawn finds this one still set.
                    if let Some(child) = self.successor.take_if(|s| s.pid == pid) {
                        self.close_channel(child.channel);
                    }
                }
                self.feed(Event::SuccessorChecked { pid, alive });
            }
            Action::Reply(by, outcome) => self.reply(by, outcome),
            Action::PhaseChanged(phase) => {
                if phase == Phase::Draining {
                    // Before the phase is published: whoever sees Draining reads this drain's
                    // number or a later one's, never an earlier one's (the machine may have
                    // started another drain since it queued this action; that one began
                    // before this store too).
                    let seq = self.machine.drains_started();
                    self.shared.drain_seq.store(seq, SeqCst);
                }
                self.shared.phase.set(phase);
                tracing::info!(%phase, "phase");
                if phase == Phase::Serving {
                    self.span = tracing::Span::none();
                }
            }
            Action::Exit(reason) => {
                self.tell_workers(|set| set.quit.store(true, SeqCst));
                match reason {
                    ExitReason::Upgraded { .. } => self.timeline.log(Instant::now()),
                    // The service stops: a pid file left behind would name a pid the kernel
                    // may give to any process (a successor's, after an upgrade, stays).
                    ExitReason::Shutdown => self.remove_pid_file(),
                }
                self.exit = Some(reason);
            }
        }
    }

    /// The handoff: OFFER, the versions this process speaks, carrying the HELLO in the newest
    /// of them, then the rest of that handoff without waiting for the answer (see
    /// `on_version_accepted` for an answer of another version).
    fn send_offer(&mut self, upgrade: UpgradeId) {
        // In a runtime, room in a full channel must wake this driver (see `watch_writable`).
        if let (Some(set), Some(child)) = (&self.wake_set, &self.successor) {
            if let Err(e) = set.watch_writable(child.channel.as_fd()) {
                return self.feed(Event::HandoffFailed(format!("watching the channel: {e}")));
            }
        }
        let versions = self.config.protocol;
        self.start_transfer(upgrade, versions.max, Some(versions));
    }

    /// A whole handoff in `version`: its HELLO, inside an OFFER of `offer` if given, then the
    /// rest, one message at a time (see `send_next`).
    fn start_transfer(&mut self, upgrade: UpgradeId, version: u8, offer: Option<ProtocolVersions>) {
        let mut transfer = match self.plan_transfer(version) {
            Ok(t) => t,
            Err(why) => return self.feed(Event::HandoffFailed(why)),
        };
        let first = transfer.records.len().min(MAX_FDS_PER_MESSAGE);
        let dups = match self.dup_batch(&transfer, 0..first) {
            Ok(d) => d,
            Err(why) => return self.feed(Event::HandoffFailed(why)),
        };
        // The first chunk of the state rides in HELLO (copied: at most 64 KiB).
        let chunk = transfer.state.len().min(STATE_CHUNK);
        let hello = Message::Hello {
            version,
            upgrade,
            predecessor_pid: std::process::id(),
            generation: self.shared.generation.wrapping_add(1),
            fds: transfer.records.len() as u32,
            state_len: transfer.state.len() as u64,
            records: transfer.records[..first].to_vec(),
            state: transfer.state[..chunk].to_vec(),
            extensions: Vec::new(),
        };
        let encoded = hello.encode().and_then(|hello| match offer {
            Some(versions) => Message::Offer { versions, hello }.encode(),
            None => Ok(hello),
        });
        let payload = match encoded {
            Ok(p) => p,
            Err(e) => return self.feed(Event::HandoffFailed(e.to_string())),
        };
        transfer.sent_fds = first;
        transfer.sent_state = chunk;
        let raw: Vec<RawFd> = dups.iter().map(|d| d.as_raw_fd()).collect();
        let mut bufs = SendMsgBufs::new(upgrade, payload, Bytes::new(), &raw, dups);
        bufs.transfer = Some(transfer);
        self.timeline.handoff.sending = Some(version);
        self.send_handoff(bufs);
    }

    /// The successor refused every version this process offered.
    pub(super) fn on_version_refused(&mut self, theirs: ProtocolVersions) {
        if self.timeline.agreed.is_some() {
            return self.feed(Event::SuccessorMessageInvalid(
                "REFUSE after its ACCEPT".into(),
            ));
        }
        self.feed(Event::HandoffRefused {
            ours: self.config.protocol,
            theirs,
        });
    }

    /// The successor picked `version`. The OFFER's own handoff (in this process's newest
    /// version) goes on if that is the one; else it stops at its next message and the
    /// handoff starts again in `version` (the successor drops what came in another version).
    pub(super) fn on_version_accepted(&mut self, version: u8) {
        let Some(child) = &self.successor else {
            return;
        };
        let upgrade = child.upgrade;
        // Read at its exit (`take_successor_messages`): nobody to send the handoff to.
        if sys::poll_readable(child.pidfd.as_fd()) {
            return;
        }
        // One answer per upgrade: a second ACCEPT would start a second handoff beside it.
        if self.timeline.agreed.replace(Instant::now()).is_some() {
            return self.feed(Event::SuccessorMessageInvalid("a second ACCEPT".into()));
        }
        if !self.config.protocol.contains(version) {
            return self.feed(Event::HandoffFailed(format!(
                "the new process picked protocol version {version}, which was not offered"
            )));
        }
        tracing::info!(
            protocol.version = version,
            "handoff protocol version agreed"
        );
        let progress = &mut self.timeline.handoff;
        progress.agreed = Some(version);
        match (progress.sending, progress.sent) {
            // In flight: `send_next` goes on, or starts again in `version`.
            (Some(_), _) => {}
            (None, Some(sent)) if sent == version => self.feed(Event::ListenersSent),
            (None, sent) => {
                tracing::info!(
                    from = sent,
                    to = version,
                    "handoff sent again in the version agreed"
                );
                self.start_transfer(upgrade, version, None)
            }
        }
    }

    /// What the successor gets: every fd with its record, and the application's state.
    fn plan_transfer(&mut self, version: u8) -> Result<Transfer, String> {
        // UDP sockets and the application's raw fds travel after the listeners, as records of
        // their own kind, then this process's pidfd and its elders' still alive, newest first.
        // A member whose listen was deferred (its predecessor has not let go yet, see
        // `listen_deferred`) listens now: the successor adopts only listening sockets. Its
        // worker arms its accepts at the release, as before.
        let backlog = self.config.backlog();
        for (listening, fd) in self
            .accepts
            .iter()
            .map(|s| (&s.listening, s.listener.fd.as_fd()))
            .chain(
                self.worker_listeners
                    .iter()
                    .map(|m| (&m.listening, m.fd.as_fd())),
            )
        {
            if !listening.check(fd) {
                if let Err(e) = sys::listen(fd, backlog) {
                    return Err(format!("listen on a new member: {e}"));
                }
            }
        }
        // Every fd is duplicated when its message is built and the duplicate held until that
        // send completes (a ring op may run after this turn, when the original could be gone);
        // the application's set is held as it was (`Arc`), so it may replace it meanwhile.
        let mut records = Vec::new();
        let mut sources = Vec::new();
        for s in &self.accepts {
            records.push(s.listener.record());
            sources.push(Source::Accept(records.len() - 1));
        }
        for (i, member) in self.worker_listeners.iter().enumerate() {
            records.push(member.record.clone());
            sources.push(Source::Worker(i));
        }
        for (i, u) in self.udp.iter().enumerate() {
            records.push(u.record());
            sources.push(Source::Udp(i));
        }
        let app = self
            .shared
            .handoff_fds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for (i, (name, _)) in app.iter().enumerate() {
            records.push(ListenerRecord {
                name: name.clone(),
                kind: SocketKind::Raw,
                address: String::new(),
            });
            sources.push(Source::App(i));
        }
        let own =
            sys::pidfd_open(std::process::id()).map_err(|e| format!("pidfd_open(self): {e}"))?;
        let mut elders = vec![own];
        for fd in self
            .elders
            .iter()
            .filter(|fd| !sys::poll_readable(fd.as_fd()))
        {
            elders.push(sys::dup_cloexec_at_least(fd.as_fd(), 3).map_err(|e| format!("dup: {e}"))?);
        }
        for i in 0..elders.len() {
            records.push(ListenerRecord {
                name: String::new(),
                kind: SocketKind::Elder,
                address: String::new(),
            });
            sources.push(Source::Elder(i));
        }
        if records.len() > MAX_LISTENERS {
            return Err(format!(
                "{} fds to hand over, at most {MAX_LISTENERS}",
                records.len()
            ));
        }
        let state = self
            .shared
            .handoff_state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        Ok(Transfer {
            version,
            records,
            sources,
            app,
            elders,
            sent_fds: 0,
            state,
            sent_state: 0,
        })
    }

    /// Duplicates of the fds of `transfer`'s records in `range`, held until their message's
    /// send completes (a ring op may run after this turn, when an original could be gone).
    fn dup_batch(
        &self,
        transfer: &Transfer,
        range: std::ops::Range<usize>,
    ) -> Result<Vec<std::os::fd::OwnedFd>, String> {
        let mut dups = Vec::with_capacity(range.len());
        for i in range {
            let fd = match transfer.sources[i] {
                Source::Accept(j) => self.accepts.get(j).map(|s| s.listener.fd.as_fd()),
                Source::Worker(j) => self.worker_listeners.get(j).map(|m| m.fd.as_fd()),
                Source::Udp(j) => self.udp.get(j).map(|u| u.socket.as_fd()),
                Source::App(j) => transfer.app.get(j).map(|(_, fd)| fd.as_fd()),
                Source::Elder(j) => transfer.elders.get(j).map(|fd| fd.as_fd()),
            };
            let fd = fd.ok_or("a socket went away during the handoff")?;
            dups.push(sys::dup_cloexec_at_least(fd, 3).map_err(|e| {
                format!(
                    "duplicating fd {i} of {} to send: {e}",
                    transfer.records.len()
                )
            })?);
        }
        Ok(dups)
    }

    /// The next message of `transfer`; when all of it is out, `ListenersSent` if the successor
    /// accepted its version (else that waits for the ACCEPT). A transfer in another version
    /// than the one accepted stops here, and one in that version starts.
    fn send_next(&mut self, upgrade: UpgradeId, mut transfer: Transfer) {
        let version = transfer.version;
        let agreed = self.timeline.handoff.agreed;
        if let Some(v) = agreed.filter(|v| *v != version) {
            tracing::info!(
                from = version,
                to = v,
                "handoff sent again in the version agreed"
            );
            return self.start_transfer(upgrade, v, None);
        }
        let bufs = if transfer.sent_fds < transfer.records.len() {
            let range = transfer.sent_fds
                ..(transfer.sent_fds + MAX_FDS_PER_MESSAGE).min(transfer.records.len());
            let dups = match self.dup_batch(&transfer, range.clone()) {
                Ok(d) => d,
                Err(why) => return self.feed(Event::HandoffFailed(why)),
            };
            let message = Message::Fds {
                version,
                records: transfer.records[range.clone()].to_vec(),
            };
            let payload = match message.encode() {
                Ok(p) => p,
                Err(e) => return self.feed(Event::HandoffFailed(e.to_string())),
            };
            transfer.sent_fds = range.end;
            let raw: Vec<RawFd> = dups.iter().map(|d| d.as_raw_fd()).collect();
            SendMsgBufs::new(upgrade, payload, Bytes::new(), &raw, dups)
        } else if transfer.sent_state < transfer.state.len() {
            let end = (transfer.sent_state + STATE_CHUNK).min(transfer.state.len());
            // A slice of the application's `Bytes`: no copy.
            let chunk = transfer.state.slice(transfer.sent_state..end);
            transfer.sent_state = end;
            SendMsgBufs::new(
                upgrade,
                state_header(version).to_vec(),
                chunk,
                &[],
                Vec::new(),
            )
        } else {
            let progress = &mut self.timeline.handoff;
            progress.sending = None;
            progress.sent = Some(version);
            if agreed == Some(version) {
                self.feed(Event::ListenersSent);
            }
            return;
        };
        let mut bufs = bufs;
        bufs.transfer = Some(transfer);
        self.send_handoff(bufs);
    }

    /// One handoff message, as a ring op. A SendMsg on a socket is first tried without
    /// blocking; when the channel's send buffer is full, io_uring arms a poll on the socket
    /// and retries when it is writable (`io_arm_poll_handler`): it never blocks this thread,
    /// nor takes an io-wq worker. Messages go one at a time, each after the previous one's
    /// completion, so they arrive in order (a SEQPACKET send is all or nothing).
    fn send_handoff(&mut self, bufs: Box<SendMsgBufs>) {
        let Some(child) = &self.successor else {
            return;
        };
        let msg: *const libc::msghdr = &bufs.msg;
        let channel = child.channel.as_raw_fd();
        let entry = opcode::SendMsg::new(types::Fd(channel), msg)
            .flags(libc::MSG_NOSIGNAL as u32)
            .build();
        self.arm(Op::SendHello(bufs), entry);
    }

    /// A handoff message's SendMsg completed: send the next one, or report the failure.
    pub(super) fn on_hello_sent(&mut self, token: Token, res: i32) {
        let Some(Op::SendHello(mut bufs)) = self.ops.remove(token) else {
            unreachable!()
        };
        super::child::check_channel_op("SendMsg", res);
        if self.successor.as_ref().map(|s| s.upgrade) != Some(bufs.upgrade) {
            return; // the upgrade was given up meanwhile (its channel's ops are cancelled)
        }
        if res < 0 {
            return self.feed(Event::HandoffFailed(errno(res).to_string()));
        }
        if res as usize != bufs.len() {
            return self.feed(Event::HandoffFailed(format!(
                "sent {res} of {} bytes",
                bufs.len()
            )));
        }
        if let Some(transfer) = bufs.transfer.take() {
            let upgrade = bufs.upgrade;
            drop(bufs); // the fds of this message are in the successor's queue now
            self.send_next(upgrade, transfer);
        }
    }

    fn reply(&mut self, by: Requester, outcome: Outcome) {
        match &outcome {
            Outcome::Upgraded { pid } => {
                tracing::info!(child.pid = pid, "upgrade complete");
                systemd::notify(
                    self.config.notify_socket.as_deref(),
                    &format!("MAINPID={pid}\nREADY=1"),
                );
            }
            Outcome::Failed(why) => {
                // The child may have written the pid file before it failed.
                self.reclaim_pid_file();
                // Every failure but a shutdown's is a rollback: this process serves on.
                if why != &UpgradeFailure::Shutdown {
                    tracing::warn!(reason = %why, "upgrade failed; still serving");
                    systemd::notify(
                        self.config.notify_socket.as_deref(),
                        &format!(
                            "READY=1\nSTATUS={}",
                            systemd::status_text(&format!("upgrade failed: {why}"))
                        ),
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
                    Outcome::Busy(why) => Err(UpgradeError::Busy(why)),
                });
            }
        }
    }
}
