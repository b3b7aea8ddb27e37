//! The restart state machine: pure, no I/O, no clock, no fds.
//!
//! ```text
//!             upgrade requested
//!  Serving ───────────────────────► Forking ──spawned──► HandingOver ──child READY──► Draining ──drained or deadline──► Exited
//!     ▲                                │                     │                          │
//!     └──────── spawn failed ──────────┘                     │                          │
//!     └──── child exited / bad message / ready deadline ─────┘                          │
//!     └──── successor died during the drain without having retired (re-arm accepts) ────┘
//! ```
//!
//! Inputs are [`Machine::handle`] (events the driver observed) and [`Machine::handle_timeout`]
//! (time passed); outputs are [`Machine::poll_action`] (what the driver must do next) and
//! [`Machine::poll_timeout`] (when to call `handle_timeout` next). Time is always an argument.
//! The driver turns completions into events and actions into ring operations; nothing here can
//! block, fail or allocate per connection.

mod interface;
pub(crate) mod successor;

pub(crate) use interface::{
    Action, DrainCause, Event, Outcome, Requester, Stop, Timeouts, UpgradeId,
};
pub use interface::{ExitReason, Phase};

use std::collections::VecDeque;

use crate::error::{Refusal, UpgradeFailure};
use std::time::Instant;

#[derive(Clone, Debug, PartialEq, Eq)]
enum State {
    Serving,
    Forking {
        upgrade: UpgradeId,
        by: Requester,
        /// The new binary must be started (and READY) by then: a spawn that hangs (an exec
        /// stuck on a dead network filesystem) must not block upgrades forever.
        deadline: Instant,
    },
    HandingOver {
        upgrade: UpgradeId,
        by: Requester,
        child: u32,
        ready_deadline: Instant,
    },
    Draining(Drain),
    Exited(ExitReason),
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Drain {
    cause: DrainCause,
    deadline: Instant,
    /// Every accept reached its terminal completion.
    accept_stopped: bool,
    /// The live connection count reached zero.
    drained: bool,
    /// The successor announced that its exit is planned (it upgraded again or shut down).
    successor_retired: bool,
    /// The operator asked for a shutdown (SIGTERM, SIGINT, the API): an upgrade's drain never
    /// resumes, and the next request stops waiting for connections.
    shutdown_requested: bool,
    /// The drain is over and the successor's life is being checked (`CheckSuccessor`).
    checking: bool,
    /// The predecessor gave up on this process (`PredecessorGaveUp`) and serves again itself.
    abandoned: bool,
    /// The application can take no more connections (it shut its server down for the drain:
    /// `DrainCommitted`).
    committed: bool,
    /// Which drain of this process this is (1 for the first): a commit names the drain it was
    /// meant for, and a later drain's is refused.
    seq: u64,
    /// The successor's exit was seen (`SuccessorExited`) and did not end this drain (it never
    /// resumes).
    successor_gone: bool,
}

/// The restart state machine. See the module docs.
#[derive(Clone, Debug)]
pub(crate) struct Machine {
    state: State,
    timeouts: Timeouts,
    /// Upgrade ids are `seed + n`; the seed makes them unlikely to repeat across generations.
    id_seed: u64,
    next_id: u64,
    accepting: bool,
    actions: VecDeque<Action>,
    /// Older generations still draining, as last reported.
    elders_draining: u32,
    /// An upgrade is refused while this many older generations still drain (at least 1).
    max_draining: u32,
    /// This process has a predecessor that has not let go of the accept queues yet (see
    /// `Event::PredecessorLetGo`).
    predecessor_holds: bool,
    /// An upgrade asked for while `predecessor_holds`: started at the let-go (see
    /// `UpgradeRequested` in Serving), or refused at its deadline (the ready timeout).
    deferred_upgrade: Option<(Requester, Instant)>,
    /// Decisions waiting for `SuccessorRead` (see `Action::ReadSuccessor`), in the order they
    /// came: a shutdown and the ready deadline can both land in one driver turn.
    waiting_read: Vec<AfterRead>,
    /// `SuccessorRead` is being handled: the decision is taken now, not asked again.
    read_done: bool,
    /// How many drains have started.
    drains: u64,
}

/// What was held back for `ReadSuccessor`.
#[derive(Clone, Debug, PartialEq, Eq)]
enum AfterRead {
    Event(Event),
    Deadline,
}

impl Machine {
    pub(crate) fn new(timeouts: Timeouts, id_seed: u64) -> Machine {
        Machine {
            state: State::Serving,
            timeouts,
            id_seed,
            next_id: 0,
            accepting: true,
            actions: VecDeque::new(),
            elders_draining: 0,
            max_draining: u32::MAX,
            predecessor_holds: false,
            deferred_upgrade: None,
            waiting_read: Vec::new(),
            drains: 0,
            read_done: false,
        }
    }

    /// At most `max` generations draining at once: an upgrade (which makes this process one
    /// more) is refused while `max` older ones still drain. `max` is at least 1.
    /// A process handed the listeners by a predecessor, which still holds the accept queues
    /// until it lets go (`Event::PredecessorLetGo`).
    pub(crate) fn with_predecessor(mut self) -> Machine {
        self.predecessor_holds = true;
        self
    }

    pub(crate) fn with_generation_limit(mut self, max: u32) -> Machine {
        self.max_draining = max;
        self
    }

    pub(crate) fn phase(&self) -> Phase {
        match self.state {
            State::Serving => Phase::Serving,
            State::Forking { .. } => Phase::Forking,
            State::HandingOver { .. } => Phase::HandingOver,
            State::Draining(_) => Phase::Draining,
            State::Exited(_) => Phase::Exited,
        }
    }

    /// Whether the machine waits for `ConnectionsDrained`: it drains and has not been told
    /// yet that the last connection closed.
    pub(crate) fn awaits_drained(&self) -> bool {
        matches!(&self.state, State::Draining(d) if !d.drained)
    }

    /// Where a `DrainCommitted(seq)` stands: `Some(true)` once drain `seq` is committed and
    /// no connection is handed to the application any more (every accept stopped), or the
    /// process exited; `Some(false)` when drain `seq` is not the current one (the commit was
    /// refused: that drain resumed before it came); `None` while committed and the accepts
    /// are still stopping.
    // Asked only by `ringflip::http::Incoming` (feature `axum`).
    #[cfg_attr(not(feature = "axum"), allow(dead_code))]
    pub(crate) fn drain_commit(&self, seq: u64) -> Option<bool> {
        match &self.state {
            State::Exited(_) => Some(true),
            State::Draining(d) if d.committed && d.seq == seq => d.accept_stopped.then_some(true),
            _ => Some(false),
        }
    }

    /// Whether the exit of `pid` now leaves the service to nobody: `pid` is the successor of a
    /// drain the application committed to (it stopped taking connections, `DrainCommitted`),
    /// and nothing else planned this exit (the successor did not announce it, the operator did
    /// not stop the service, no predecessor serves again). Such a drain never resumes, so
    /// once this process has drained and exited, nobody listens. For the driver's log.
    pub(crate) fn exit_leaves_nobody(&self, pid: u32) -> bool {
        matches!(&self.state, State::Draining(d)
            if d.successor() == Some(pid) && d.lost_if_successor_dead())
    }

    /// How many drains have started: the current drain's number while draining.
    pub(crate) fn drains_started(&self) -> u64 {
        self.drains
    }

    /// Whether the driver should have its accepts armed (as the machine last told it).
    pub(crate) fn accepting(&self) -> bool {
        self.accepting
    }

    /// Whether a child started for `upgrade` is still wanted: that upgrade is in flight and
    /// waits for its new binary (`Forking`). A child that comes later (the upgrade was given
    /// up: a shutdown, the start deadline) must be killed; it never got the listeners.
    pub(crate) fn awaits_spawn(&self, upgrade: UpgradeId) -> bool {
        matches!(self.state, State::Forking { upgrade: u, .. } if u == upgrade)
    }

    /// Whether a message from the successor can still change the upgrade's course: it was
    /// handed the listeners and its READY has not come (`HandingOver`). After READY the
    /// successor sends at most RETIRING/SERVING, which matter only at its exit and are read
    /// then (`Action::CheckSuccessor`, the exit), so the driver reads its channel only while
    /// this holds.
    pub(crate) fn awaits_ready(&self) -> bool {
        matches!(self.state, State::HandingOver { .. })
    }

    /// The upgrade in flight, if any.
    #[cfg(test)]
    pub(crate) fn current_upgrade(&self) -> Option<UpgradeId> {
        match self.state {
            State::Forking { upgrade, .. } | State::HandingOver { upgrade, .. } => Some(upgrade),
            State::Draining(Drain {
                cause: DrainCause::Upgraded { upgrade, .. },
                ..
            }) => Some(upgrade),
            _ => None,
        }
    }

    /// The next action for the driver, in order.
    pub(crate) fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// When [`Machine::handle_timeout`] must be called next.
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            State::Forking { deadline, .. } => Some(deadline),
            State::HandingOver { ready_deadline, .. } => Some(ready_deadline),
            // Also while checking the successor: the driver answers within the same turn.
            State::Draining(Drain { deadline, .. }) => Some(deadline),
            State::Serving => self.deferred_upgrade.map(|(_, deadline)| deadline),
            _ => None,
        }
    }

    /// Time passed; fires any deadline at or before `now`. Calling it early is harmless.
    pub(crate) fn handle_timeout(&mut self, now: Instant) {
        match self.state {
            // A predecessor that has not let go within the ready timeout (stuck in its stop,
            // a worker that does not acknowledge it): the waiting upgrade is refused, and its
            // requester hears it rather than waiting with it.
            State::Serving if self.deferred_upgrade.is_some_and(|(_, at)| now >= at) => {
                if let Some((by, _)) = self.deferred_upgrade.take() {
                    self.reply(by, Outcome::Busy(Refusal::InFlight));
                }
            }
            State::Forking { deadline, by, .. } if now >= deadline => {
                let ms = self.timeouts.ready.as_millis() as u64;
                self.set(State::Serving);
                self.reply(
                    by,
                    Outcome::Failed(UpgradeFailure::StartTimeout { timeout_ms: ms }),
                );
            }
            State::HandingOver { ready_deadline, .. }
                if now >= ready_deadline && !self.read_done =>
            {
                self.read_first(AfterRead::Deadline);
            }
            State::HandingOver {
                ready_deadline,
                child,
                by,
                ..
            } if now >= ready_deadline => {
                let ms = self.timeouts.ready.as_millis() as u64;
                self.rollback(
                    by,
                    child,
                    Stop::Terminate,
                    UpgradeFailure::ReadyTimeout {
                        pid: child,
                        timeout_ms: ms,
                    },
                );
            }
            State::Draining(Drain { deadline, .. }) if now >= deadline => self.finish_drain(),
            _ => {}
        }
    }

    /// An event the driver observed at `now`.
    pub(crate) fn handle(&mut self, event: Event, now: Instant) {
        use Event as E;
        match (self.state.clone(), event) {
            (State::Exited(_), E::UpgradeRequested(by)) => {
                self.reply(by, Outcome::Busy(Refusal::Exited))
            }
            (State::Exited(_), _) => {}
            (_, E::SuccessorRead) => {
                self.read_done = true;
                for after in std::mem::take(&mut self.waiting_read) {
                    match after {
                        AfterRead::Event(event) => self.handle(event, now),
                        AfterRead::Deadline => self.handle_timeout(now),
                    }
                }
                self.read_done = false;
            }
            (State::HandingOver { .. }, e @ (E::ShutdownRequested | E::PredecessorGaveUp))
                if !self.read_done =>
            {
                self.read_first(AfterRead::Event(e));
            }
            (_, E::PredecessorLetGo) => {
                self.predecessor_holds = false;
                self.update_drain(|_| {});
                if let Some((by, _)) = self.deferred_upgrade.take() {
                    self.handle(E::UpgradeRequested(by), now);
                }
            }
            (_, E::EldersDraining(n)) => self.elders_draining = n,

            // ---- Serving
            // The upgrade that started this process is still in flight until its predecessor
            // lets go: that one has not read our READY yet, or has not stopped accepting. Were
            // this process upgraded now, the predecessor's MAINPID=<this process>, sent when it
            // reads our READY, could reach systemd after our own MAINPID=<our successor>, and
            // systemd would take this process, draining, for the main one (and stop the unit
            // when it exits). Its let-go comes after its MAINPID, so from then on ours is last:
            // the upgrade waits for it (usually well under a millisecond; a SIGHUP sent as soon
            // as the pid file names this process must not be lost). One waits; more are busy.
            (State::Serving, E::UpgradeRequested(by)) if self.predecessor_holds => {
                if self.deferred_upgrade.is_none() {
                    self.deferred_upgrade = Some((by, now + self.timeouts.ready));
                } else {
                    self.reply(by, Outcome::Busy(Refusal::InFlight))
                }
            }
            (State::Serving, E::UpgradeRequested(by))
                if self.elders_draining >= self.max_draining =>
            {
                self.reply(by, Outcome::Busy(Refusal::TooManyDraining))
            }
            (State::Serving, E::UpgradeRequested(by)) => {
                self.next_id += 1;
                let upgrade = UpgradeId(self.id_seed.wrapping_add(self.next_id));
                self.set(State::Forking {
                    upgrade,
                    by,
                    deadline: now + self.timeouts.ready,
                });
                self.push(Action::SpawnSuccessor(upgrade));
            }
            (State::Serving, E::ShutdownRequested) => self.start_drain(DrainCause::Shutdown, now),

            // ---- Forking
            (State::Forking { .. }, E::UpgradeRequested(by)) => {
                self.reply(by, Outcome::Busy(Refusal::InFlight))
            }
            (State::Forking { by, deadline, .. }, E::SuccessorSpawned { pid })
                if now >= deadline =>
            {
                // Started, but too late to hand over: never send it the listeners.
                let ms = self.timeouts.ready.as_millis() as u64;
                self.rollback(
                    by,
                    pid,
                    Stop::Kill,
                    UpgradeFailure::StartTimeout { timeout_ms: ms },
                );
            }
            (
                State::Forking {
                    upgrade,
                    by,
                    deadline,
                },
                E::SuccessorSpawned { pid },
            ) => {
                // One deadline from the request to READY: the time the spawn took counts.
                self.set(State::HandingOver {
                    upgrade,
                    by,
                    child: pid,
                    ready_deadline: deadline,
                });
                self.push(Action::SendListeners(upgrade));
            }
            (State::Forking { by, .. }, E::SpawnFailed(why)) => {
                self.set(State::Serving);
                self.reply(by, Outcome::Failed(UpgradeFailure::Spawn(why)));
            }
            (State::Forking { by, .. }, E::ShutdownRequested) => {
                // The driver kills the child if its spawn completes after this.
                self.reply(by, Outcome::Failed(UpgradeFailure::Shutdown));
                self.start_drain(DrainCause::Shutdown, now);
            }

            // ---- HandingOver
            (State::HandingOver { .. }, E::UpgradeRequested(by)) => {
                self.reply(by, Outcome::Busy(Refusal::InFlight))
            }
            (State::HandingOver { .. }, E::ListenersSent) => {}
            (State::HandingOver { by, child, .. }, E::HandoffFailed(why)) => {
                self.rollback(by, child, Stop::Kill, UpgradeFailure::Handoff(why))
            }
            (State::HandingOver { by, child, .. }, E::HandoffRefused { ours, theirs }) => self
                .rollback(
                    by,
                    child,
                    Stop::Kill,
                    UpgradeFailure::IncompatibleProtocol { ours, theirs },
                ),
            (
                State::HandingOver {
                    upgrade, by, child, ..
                },
                E::SuccessorReady(id),
            ) => {
                if id == upgrade {
                    self.reply(by, Outcome::Upgraded { pid: child });
                    self.start_drain(DrainCause::Upgraded { child, upgrade }, now);
                } else {
                    self.rollback(
                        by,
                        child,
                        Stop::Terminate,
                        UpgradeFailure::WrongUpgrade {
                            got: id.0,
                            expected: upgrade.0,
                        },
                    );
                }
            }
            (State::HandingOver { by, child, .. }, E::SuccessorMessageInvalid(why)) => self
                .rollback(
                    by,
                    child,
                    Stop::Terminate,
                    UpgradeFailure::InvalidMessage { pid: child, why },
                ),
            (State::HandingOver { by, child, .. }, E::SuccessorExited { pid, status })
                if pid == child =>
            {
                self.rollback(
                    by,
                    child,
                    Stop::Terminate,
                    UpgradeFailure::ExitedBeforeReady { pid, status },
                )
            }
            (State::HandingOver { by, child, .. }, E::ShutdownRequested) => {
                // Straight to Draining: no transient Serving phase for observers.
                self.push(Action::AbandonSuccessor {
                    pid: child,
                    stop: Stop::Terminate,
                });
                self.reply(by, Outcome::Failed(UpgradeFailure::Shutdown));
                self.start_drain(DrainCause::Shutdown, now);
            }

            // ---- Draining
            (State::Draining(d), E::UpgradeRequested(by)) => self.reply(
                by,
                Outcome::Busy(match d.cause {
                    DrainCause::Upgraded { .. } => Refusal::Upgraded,
                    DrainCause::Shutdown => Refusal::ShuttingDown,
                }),
            ),
            (State::Draining(d), E::DrainCommitted(seq)) if d.seq == seq => {
                self.update_drain(|d| d.committed = true)
            }
            (State::Draining(_), E::AcceptStopped) => {
                self.update_drain(|d| d.accept_stopped = true)
            }
            (State::Draining(_), E::ConnectionsDrained) => self.update_drain(|d| d.drained = true),
            (State::Draining(d), E::SuccessorRetired) if d.has_successor() => {
                self.update_drain(|d| d.successor_retired = true)
            }
            (State::Draining(d), E::SuccessorResumed) if d.has_successor() => {
                self.update_drain(|d| d.successor_retired = false)
            }
            (State::Draining(d), E::SuccessorExited { pid, .. }) if d.successor() == Some(pid) => {
                if !d.never_resume() {
                    // The successor died unplanned while this process still holds the
                    // listeners: take the service back (rollback after handover).
                    self.resume();
                } else if d.checking {
                    // Its exit was planned (or nobody serves: a committed drain), and the
                    // drain is over.
                    self.exit(d.cause);
                } else {
                    self.update_drain(|d| d.successor_gone = true);
                }
            }
            (State::Draining(d), E::SuccessorChecked { pid, alive })
                if d.checking && d.successor() == Some(pid) =>
            {
                if alive || d.never_resume() {
                    self.exit(d.cause);
                } else {
                    self.resume();
                }
            }
            // Already draining (after its own upgrade): its predecessor rolled back and serves
            // again, so this process must never take the service back.
            (State::Draining(_), E::PredecessorGaveUp) => self.update_drain(|d| d.abandoned = true),
            (_, E::PredecessorGaveUp) => {
                self.handle(E::ShutdownRequested, now);
                if let State::Draining(drain) = &mut self.state {
                    // Not the operator's stop: their first signal must not cut this drain
                    // short as a second one would.
                    drain.shutdown_requested = false;
                }
            }
            (State::Draining(d), E::ShutdownRequested) => {
                if !d.shutdown_requested {
                    // Draining after an upgrade (or one the predecessor asked for): finish
                    // the drain, but never resume.
                    self.update_drain(|d| d.shutdown_requested = true)
                } else {
                    // Asked to stop while already stopping: stop waiting for connections.
                    self.exit(d.cause)
                }
            }

            // Everything else is stale or irrelevant in this phase: an exit of an abandoned
            // child, a late READY, a second stop notice, ….
            (_, _) => {}
        }
    }

    fn set(&mut self, state: State) {
        let before = self.phase();
        self.state = state;
        let after = self.phase();
        if before != after {
            self.push(Action::PhaseChanged(after));
        }
    }

    fn push(&mut self, action: Action) {
        self.actions.push_back(action);
    }

    fn reply(&mut self, by: Requester, outcome: Outcome) {
        self.push(Action::Reply(by, outcome));
    }

    /// Give up on the child: stop it, tell the requester, keep serving. Accepting never stopped.
    fn rollback(&mut self, by: Requester, child: u32, stop: Stop, why: UpgradeFailure) {
        self.push(Action::AbandonSuccessor { pid: child, stop });
        self.set(State::Serving);
        self.reply(by, Outcome::Failed(why));
    }

    fn start_drain(&mut self, cause: DrainCause, now: Instant) {
        if let Some((by, _)) = self.deferred_upgrade.take() {
            // Only a shutdown starts a drain while an upgrade waits (an upgrade cannot start).
            self.reply(by, Outcome::Busy(Refusal::ShuttingDown));
        }
        self.drains += 1;
        self.set(State::Draining(Drain {
            cause,
            deadline: now + self.timeouts.drain,
            accept_stopped: false,
            drained: false,
            successor_retired: false,
            shutdown_requested: cause == DrainCause::Shutdown,
            checking: false,
            abandoned: false,
            committed: false,
            successor_gone: false,
            seq: self.drains,
        }));
        self.accepting = false;
        self.push(Action::StopAccepting);
        self.push(Action::StartDrain(cause));
    }

    fn update_drain(&mut self, update: impl FnOnce(&mut Drain)) {
        if let State::Draining(drain) = &mut self.state {
            update(drain);
            // No wait for a predecessor's let-go to forward: this process was upgraded only
            // after it (`UpgradeRequested` waits while `predecessor_holds`).
            if drain.accept_stopped && drain.drained {
                self.finish_drain();
            }
        }
    }

    /// The drain is over (or its deadline passed). After an upgrade whose successor has not
    /// announced its exit, first make sure it still runs: its exit may be on the way (its
    /// exit watch not reaped yet) while this process, with nothing left to drain, is about to
    /// exit too — and then no process would serve. A successor found dead is a rollback
    /// after handover, like its exit seen while draining.
    fn finish_drain(&mut self) {
        let State::Draining(drain) = &mut self.state else {
            return;
        };
        match drain.cause {
            // A committed drain does not resume, but looks too: a successor found dead then
            // leaves nobody serving, which the driver logs (`exit_leaves_nobody`).
            DrainCause::Upgraded { child, .. }
                if !drain.never_resume() || drain.lost_if_successor_dead() =>
            {
                if !drain.checking {
                    drain.checking = true;
                    self.push(Action::CheckSuccessor(child));
                }
            }
            cause => self.exit(cause),
        }
    }

    /// Holds `after` back until the successor's unread messages are fed (`ReadSuccessor`).
    fn read_first(&mut self, after: AfterRead) {
        if self.waiting_read.is_empty() {
            self.push(Action::ReadSuccessor);
        }
        if !self.waiting_read.contains(&after) || after != AfterRead::Deadline {
            self.waiting_read.push(after);
        }
    }

    /// The successor died during the drain without having announced it: take the service
    /// back (rollback after handover).
    fn resume(&mut self) {
        self.set(State::Serving);
        self.accepting = true;
        self.push(Action::StopDrain);
        self.push(Action::ResumeAccepting);
    }

    fn exit(&mut self, cause: DrainCause) {
        let reason = match cause {
            DrainCause::Upgraded { child, .. } => ExitReason::Upgraded { successor: child },
            DrainCause::Shutdown => ExitReason::Shutdown,
        };
        self.set(State::Exited(reason));
        self.push(Action::Exit(reason));
    }
}

impl Drain {
    fn successor(&self) -> Option<u32> {
        match self.cause {
            DrainCause::Upgraded { child, .. } => Some(child),
            DrainCause::Shutdown => None,
        }
    }
    fn has_successor(&self) -> bool {
        self.successor().is_some()
    }
    /// Whether this drain must end in an exit whatever the successor does: its exit was
    /// announced, the operator asked for a shutdown, the predecessor serves again, or the
    /// application can take no more connections.
    fn never_resume(&self) -> bool {
        self.exit_planned() || self.committed
    }
    /// Whether the exit is planned whatever the successor does: it announced its own, the
    /// operator asked for a shutdown, or the predecessor serves again.
    fn exit_planned(&self) -> bool {
        self.successor_retired || self.shutdown_requested || self.abandoned
    }
    /// Whether the successor's death, not seen yet, would leave the service to nobody: the
    /// drain never resumes only because the application committed to it.
    fn lost_if_successor_dead(&self) -> bool {
        self.committed && !self.exit_planned() && !self.successor_gone
    }
}

#[cfg(test)]
mod explore_tests;
#[cfg(test)]
mod tests;
