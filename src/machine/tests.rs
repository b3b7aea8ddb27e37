//! Transition tests for the restart state machine.
//!
//! Three layers:
//! 1. `every_phase_event_pair` — a table over every (phase, event) pair: start phase, event,
//!    expected phase, expected `accepting()`, exact expected action list.
//! 2. Named scenarios for the important paths (upgrade, every rollback, drain, shutdown, stale
//!    events).
//! 3. Property tests over random event sequences with a virtual clock.
//!
//! Time is virtual everywhere: a base `Instant::now()` plus offsets; nothing sleeps.
use super::*;
use proptest::prelude::*;
use std::collections::HashMap;
use std::time::Duration;

use Phase as P;

const TIMEOUTS: Timeouts = Timeouts {
    ready: Duration::from_secs(5),
    drain: Duration::from_secs(30),
};
const SEED: u64 = 0x5eed_0000_0000_0000;
/// The id of the first upgrade a machine built with `SEED` issues.
const ID1: UpgradeId = UpgradeId(SEED + 1);
const ID2: UpgradeId = UpgradeId(SEED + 2);
const BOGUS: UpgradeId = UpgradeId(0xdead_beef);
/// The child spawned by the first upgrade.
const CHILD: u32 = 4242;
/// Some unrelated pid (an abandoned child, a grandchild, …).
const OTHER: u32 = 777;
/// The requester of the upgrade in flight in the built phases.
const REQ: Requester = Requester::Api(1);
/// The requester of the extra upgrade requests the table sends.
const LATE: Requester = Requester::Api(7);

const MS: Duration = Duration::from_millis(1);

// ------------------------------------------------------------------------------------------
// Harness

/// A machine plus a virtual clock.
#[derive(Clone)]
struct H {
    m: Machine,
    now: Instant,
}

impl H {
    fn new() -> H {
        H::with_seed(SEED)
    }

    fn with_seed(seed: u64) -> H {
        H {
            m: Machine::new(TIMEOUTS, seed),
            now: Instant::now(),
        }
    }

    fn drain(&mut self) -> Vec<Action> {
        answering(&mut self.m, self.now)
    }

    /// Feeds `event` at the current virtual time and returns the actions it produced.
    fn ev(&mut self, event: Event) -> Vec<Action> {
        self.m.handle(event, self.now);
        self.drain()
    }

    /// Advances the virtual clock.
    fn wait(&mut self, d: Duration) -> &mut H {
        self.now += d;
        self
    }

    /// `handle_timeout` at the current virtual time.
    fn tick(&mut self) -> Vec<Action> {
        self.m.handle_timeout(self.now);
        self.drain()
    }

    /// Moves the clock just past the pending deadline (or far ahead when there is none) and
    /// calls `handle_timeout`.
    fn expire(&mut self) -> Vec<Action> {
        self.now = match self.m.poll_timeout() {
            Some(at) => at.max(self.now) + MS,
            None => self.now + Duration::from_secs(24 * 3600),
        };
        self.tick()
    }

    fn phase(&self) -> Phase {
        self.m.phase()
    }
}

/// The machine's actions, with `ReadSuccessor` answered as a driver does when nothing is
/// waiting on the channel (`SuccessorRead` at once).
fn answering(m: &mut Machine, now: Instant) -> Vec<Action> {
    let mut actions = Vec::new();
    while let Some(action) = m.poll_action() {
        if action == Action::ReadSuccessor {
            m.handle(Event::SuccessorRead, now);
        }
        actions.push(action);
    }
    actions
}

// Event shorthands.
fn upgrade(by: Requester) -> Event {
    Event::UpgradeRequested(by)
}
fn spawned(pid: u32) -> Event {
    Event::SuccessorSpawned { pid }
}
fn spawn_failed() -> Event {
    Event::SpawnFailed("no such file".into())
}
fn handoff_failed() -> Event {
    Event::HandoffFailed("broken pipe".into())
}
fn ready(id: UpgradeId) -> Event {
    Event::SuccessorReady(id)
}
fn invalid() -> Event {
    Event::SuccessorMessageInvalid("garbage".into())
}
fn exited(pid: u32) -> Event {
    Event::SuccessorExited {
        pid,
        status: "signal 9".into(),
    }
}

// Action shorthands.
fn alive(pid: u32) -> Event {
    Event::SuccessorChecked { pid, alive: true }
}
fn pc(p: Phase) -> Action {
    Action::PhaseChanged(p)
}
/// A child that has the listeners (HELLO sent), abandoned: SIGTERM, so it drains.
fn abandon(pid: u32) -> Action {
    Action::AbandonSuccessor {
        pid,
        stop: Stop::Terminate,
    }
}
/// A child that never got the listeners, abandoned: SIGKILL.
fn kill(pid: u32) -> Action {
    Action::AbandonSuccessor {
        pid,
        stop: Stop::Kill,
    }
}
fn failed(by: Requester, why: UpgradeFailure) -> Action {
    Action::Reply(by, Outcome::Failed(why))
}
fn busy(by: Requester, why: Refusal) -> Action {
    Action::Reply(by, Outcome::Busy(why))
}
fn upgraded(by: Requester, pid: u32) -> Action {
    Action::Reply(by, Outcome::Upgraded { pid })
}
fn exit_upgraded(successor: u32) -> Action {
    Action::Exit(ExitReason::Upgraded { successor })
}
fn exit_shutdown() -> Action {
    Action::Exit(ExitReason::Shutdown)
}
use Action::{
    CheckSuccessor, ReadSuccessor, ResumeAccepting, SendListeners, SpawnSuccessor, StopAccepting,
    StopDrain,
};

/// `StartDrain` for a shutdown.
fn drain_shutdown() -> Action {
    Action::StartDrain(DrainCause::Shutdown)
}
/// `StartDrain` after the upgrade `ID1` to `CHILD`.
fn drain_upgraded() -> Action {
    Action::StartDrain(DrainCause::Upgraded {
        child: CHILD,
        upgrade: ID1,
    })
}

// The failures and refusals of the table (their texts reach API callers: checked below).
fn f_spawn() -> UpgradeFailure {
    UpgradeFailure::Spawn("no such file".into())
}
fn f_start() -> UpgradeFailure {
    UpgradeFailure::StartTimeout { timeout_ms: 5000 }
}
fn f_handoff() -> UpgradeFailure {
    UpgradeFailure::Handoff("broken pipe".into())
}
fn f_invalid() -> UpgradeFailure {
    UpgradeFailure::InvalidMessage {
        pid: CHILD,
        why: "garbage".into(),
    }
}
fn f_exit() -> UpgradeFailure {
    UpgradeFailure::ExitedBeforeReady {
        pid: CHILD,
        status: "signal 9".into(),
    }
}
fn f_deadline() -> UpgradeFailure {
    UpgradeFailure::ReadyTimeout {
        pid: CHILD,
        timeout_ms: 5000,
    }
}
fn f_shutdown() -> UpgradeFailure {
    UpgradeFailure::Shutdown
}
fn f_wrong_id() -> UpgradeFailure {
    UpgradeFailure::WrongUpgrade {
        got: BOGUS.0,
        expected: ID1.0,
    }
}
const B_IN_FLIGHT: Refusal = Refusal::InFlight;
const B_UPGRADED: Refusal = Refusal::Upgraded;
const B_SHUTTING: Refusal = Refusal::ShuttingDown;
const B_EXITED: Refusal = Refusal::Exited;

#[test]
fn failure_and_refusal_texts_are_what_callers_read() {
    let texts = [
        (
            f_spawn().to_string(),
            "could not start the new binary: no such file",
        ),
        (
            f_start().to_string(),
            "the new binary did not start within 5000 ms",
        ),
        (
            f_handoff().to_string(),
            "could not hand the listeners over: broken pipe",
        ),
        (f_invalid().to_string(), "new process 4242: garbage"),
        (
            f_exit().to_string(),
            "new process 4242 exited before READY: signal 9",
        ),
        (
            f_deadline().to_string(),
            "new process 4242 was not ready within 5000 ms",
        ),
        (f_shutdown().to_string(), "shutdown requested"),
        (B_IN_FLIGHT.to_string(), "an upgrade is already in flight"),
        (
            B_UPGRADED.to_string(),
            "this process was upgraded and is draining",
        ),
        (B_SHUTTING.to_string(), "this process is shutting down"),
        (B_EXITED.to_string(), "this process has exited"),
    ];
    for (got, want) in texts {
        assert_eq!(got, want);
    }
    assert_eq!(
        f_wrong_id().to_string(),
        format!("new process answered READY for upgrade {BOGUS}, expected {ID1}")
    );
    assert_eq!(f_deadline().code(), "ready-timeout");
    assert_eq!(Refusal::TooManyDraining.code(), "too-many-draining");
}

// ------------------------------------------------------------------------------------------
// Building a machine in each phase through the public-in-crate API

/// Start points of the table. Draining is split by cause and by its sub-state flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum S {
    Serving,
    /// `REQ` asked for upgrade `ID1`; no child yet.
    Forking,
    /// Child `CHILD` spawned for `ID1`, listeners sent, waiting for READY.
    HandingOver,
    /// `CHILD` answered READY(`ID1`): draining after an upgrade.
    DrainingUpgrade,
    /// As `DrainingUpgrade`, then the successor announced its retirement (`SuccessorRetired`).
    DrainingUpgradeRetired,
    /// As `DrainingUpgrade`, then a shutdown was requested (finish the drain, never resume).
    DrainingUpgradeShutdown,
    /// As `DrainingUpgrade`, drained: the successor's life is being checked before the exit.
    DrainingUpgradeChecking,
    /// Draining after a shutdown request from Serving.
    DrainingShutdown,
    /// Exited after a shutdown and a complete drain.
    Exited,
}

const STARTS: [S; 9] = [
    S::Serving,
    S::Forking,
    S::HandingOver,
    S::DrainingUpgrade,
    S::DrainingUpgradeRetired,
    S::DrainingUpgradeShutdown,
    S::DrainingUpgradeChecking,
    S::DrainingShutdown,
    S::Exited,
];

/// Builds a machine in `start`, checking every step on the way, with its actions drained.
fn build(start: S) -> H {
    let mut h = H::new();
    assert_eq!(h.phase(), P::Serving);
    assert!(h.m.accepting());
    match start {
        S::Serving => {}
        S::Forking => {
            assert_eq!(
                h.ev(upgrade(REQ)),
                vec![pc(P::Forking), SpawnSuccessor(ID1)]
            );
        }
        S::HandingOver => {
            h = build(S::Forking);
            h.wait(10 * MS);
            assert_eq!(
                h.ev(spawned(CHILD)),
                vec![pc(P::HandingOver), SendListeners(ID1)]
            );
            h.wait(MS);
            assert_eq!(h.ev(Event::ListenersSent), vec![]);
        }
        S::DrainingUpgrade => {
            h = build(S::HandingOver);
            h.wait(100 * MS);
            assert_eq!(
                h.ev(ready(ID1)),
                vec![
                    upgraded(REQ, CHILD),
                    pc(P::Draining),
                    StopAccepting,
                    drain_upgraded()
                ]
            );
        }
        S::DrainingUpgradeRetired => {
            h = build(S::DrainingUpgrade);
            h.wait(MS);
            assert_eq!(h.ev(Event::SuccessorRetired), vec![]);
        }
        S::DrainingUpgradeShutdown => {
            h = build(S::DrainingUpgrade);
            h.wait(MS);
            assert_eq!(h.ev(Event::ShutdownRequested), vec![]);
        }
        S::DrainingUpgradeChecking => {
            h = build(S::DrainingUpgrade);
            assert_eq!(h.ev(Event::AcceptStopped), vec![]);
            assert_eq!(h.ev(Event::ConnectionsDrained), vec![CheckSuccessor(CHILD)]);
        }
        S::DrainingShutdown => {
            assert_eq!(
                h.ev(Event::ShutdownRequested),
                vec![pc(P::Draining), StopAccepting, drain_shutdown()]
            );
        }
        S::Exited => {
            h = build(S::DrainingShutdown);
            h.wait(MS);
            assert_eq!(h.ev(Event::AcceptStopped), vec![]);
            assert_eq!(
                h.ev(Event::ConnectionsDrained),
                vec![pc(P::Exited), exit_shutdown()]
            );
        }
    }
    h.wait(MS);
    h
}

// ------------------------------------------------------------------------------------------
// 1. The table

/// Every kind of input, as the table applies it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Ev {
    /// `UpgradeRequested(Signal)`
    UpSignal,
    /// `UpgradeRequested(Api(7))`
    UpApi,
    /// `SuccessorSpawned { pid: CHILD }`
    Spawned,
    SpawnFailed,
    ListenersSent,
    HandoffFailed,
    /// `SuccessorReady(ID1)`: the id of the (first) upgrade
    ReadyRight,
    /// `SuccessorReady(BOGUS)`
    ReadyWrong,
    Invalid,
    Retired,
    /// `SuccessorResumed` (the successor's SERVING)
    Resumed,
    /// `SuccessorExited { pid: CHILD }`
    SuccessorExited,
    /// `SuccessorExited { pid: OTHER }`
    ExitedOther,
    AcceptStopped,
    Drained,
    Shutdown,
    /// `SuccessorChecked { pid: CHILD, alive: true }`
    CheckedAlive,
    /// `SuccessorChecked { pid: CHILD, alive: false }`
    CheckedDead,
    /// `PredecessorGaveUp`
    GaveUp,
    /// `DrainCommitted`
    Committed,
    /// The clock moves past `poll_timeout()` (or a day ahead when there is none), then
    /// `handle_timeout`.
    Deadline,
}

const EVS: [Ev; 21] = [
    Ev::UpSignal,
    Ev::UpApi,
    Ev::Spawned,
    Ev::SpawnFailed,
    Ev::ListenersSent,
    Ev::HandoffFailed,
    Ev::ReadyRight,
    Ev::ReadyWrong,
    Ev::Invalid,
    Ev::Retired,
    Ev::Resumed,
    Ev::SuccessorExited,
    Ev::ExitedOther,
    Ev::AcceptStopped,
    Ev::Drained,
    Ev::Shutdown,
    Ev::CheckedAlive,
    Ev::CheckedDead,
    Ev::GaveUp,
    Ev::Committed,
    Ev::Deadline,
];

fn apply(h: &mut H, ev: Ev) -> Vec<Action> {
    match ev {
        Ev::UpSignal => h.ev(upgrade(Requester::Signal)),
        Ev::UpApi => h.ev(upgrade(LATE)),
        Ev::Spawned => h.ev(spawned(CHILD)),
        Ev::SpawnFailed => h.ev(spawn_failed()),
        Ev::ListenersSent => h.ev(Event::ListenersSent),
        Ev::HandoffFailed => h.ev(handoff_failed()),
        Ev::ReadyRight => h.ev(ready(ID1)),
        Ev::ReadyWrong => h.ev(ready(BOGUS)),
        Ev::Invalid => h.ev(invalid()),
        Ev::Retired => h.ev(Event::SuccessorRetired),
        Ev::Resumed => h.ev(Event::SuccessorResumed),
        Ev::SuccessorExited => h.ev(exited(CHILD)),
        Ev::ExitedOther => h.ev(exited(OTHER)),
        Ev::AcceptStopped => h.ev(Event::AcceptStopped),
        Ev::Drained => h.ev(Event::ConnectionsDrained),
        Ev::Shutdown => h.ev(Event::ShutdownRequested),
        Ev::CheckedAlive => h.ev(Event::SuccessorChecked {
            pid: CHILD,
            alive: true,
        }),
        Ev::CheckedDead => h.ev(Event::SuccessorChecked {
            pid: CHILD,
            alive: false,
        }),
        Ev::GaveUp => h.ev(Event::PredecessorGaveUp),
        Ev::Committed => {
            let current = h.m.drains_started();
            h.ev(Event::DrainCommitted(current))
        }
        Ev::Deadline => h.expire(),
    }
}

struct Row {
    from: S,
    event: Ev,
    to: Phase,
    accepting: bool,
    actions: Vec<Action>,
}

/// `row!(From, Event => ToPhase, accepting, [actions…])`
macro_rules! row {
    ($from:ident, $ev:ident => $to:ident, $acc:literal, [$($a:expr),* $(,)?]) => {
        Row {
            from: S::$from,
            event: Ev::$ev,
            to: P::$to,
            accepting: $acc,
            actions: vec![$($a),*],
        }
    };
}

#[rustfmt::skip]
fn table() -> Vec<Row> {
    vec![
        // ---- Serving: only an upgrade request or a shutdown does anything.
        row!(Serving, UpSignal      => Forking,     true,  [pc(P::Forking), SpawnSuccessor(ID1)]),
        row!(Serving, UpApi         => Forking,     true,  [pc(P::Forking), SpawnSuccessor(ID1)]),
        row!(Serving, Spawned       => Serving,     true,  []),
        row!(Serving, SpawnFailed   => Serving,     true,  []),
        row!(Serving, ListenersSent => Serving,     true,  []),
        row!(Serving, HandoffFailed => Serving,     true,  []),
        row!(Serving, ReadyRight    => Serving,     true,  []),
        row!(Serving, ReadyWrong    => Serving,     true,  []),
        row!(Serving, Invalid       => Serving,     true,  []),
        row!(Serving, Retired       => Serving,     true,  []),
        row!(Serving, Committed     => Serving,     true,  []),
        row!(Serving, Resumed       => Serving,     true,  []),
        row!(Serving, SuccessorExited   => Serving,     true,  []),
        row!(Serving, ExitedOther   => Serving,     true,  []),
        row!(Serving, AcceptStopped => Serving,     true,  []),
        row!(Serving, Drained       => Serving,     true,  []),
        row!(Serving, Shutdown      => Draining,    false, [pc(P::Draining), StopAccepting, drain_shutdown()]),
        row!(Serving, Deadline      => Serving,     true,  []),
        row!(Serving, CheckedAlive  => Serving, true, []),
        row!(Serving, CheckedDead   => Serving, true, []),
        row!(Serving, GaveUp        => Draining,    false, [pc(P::Draining), StopAccepting, drain_shutdown()]),

        // ---- Forking (REQ's upgrade ID1; the spawn runs on another thread: no child yet).
        row!(Forking, UpSignal      => Forking,     true,  [busy(Requester::Signal, B_IN_FLIGHT)]),
        row!(Forking, UpApi         => Forking,     true,  [busy(LATE, B_IN_FLIGHT)]),
        row!(Forking, Spawned       => HandingOver, true,  [pc(P::HandingOver), SendListeners(ID1)]),
        row!(Forking, SpawnFailed   => Serving,     true,  [pc(P::Serving), failed(REQ, f_spawn())]),
        row!(Forking, ListenersSent => Forking,     true,  []),
        row!(Forking, HandoffFailed => Forking,     true,  []),
        row!(Forking, ReadyRight    => Forking,     true,  []),
        row!(Forking, ReadyWrong    => Forking,     true,  []),
        row!(Forking, Invalid       => Forking,     true,  []),
        row!(Forking, Retired       => Forking,     true,  []),
        row!(Forking, Committed     => Forking,     true,  []),
        row!(Forking, Resumed       => Forking,     true,  []),
        row!(Forking, SuccessorExited   => Forking,     true,  []),
        row!(Forking, ExitedOther   => Forking,     true,  []),
        row!(Forking, AcceptStopped => Forking,     true,  []),
        row!(Forking, Drained       => Forking,     true,  []),
        row!(Forking, Shutdown      => Draining,    false, [failed(REQ, f_shutdown()), pc(P::Draining), StopAccepting, drain_shutdown()]),
        row!(Forking, Deadline      => Serving,     true,  [pc(P::Serving), failed(REQ, f_start())]),
        row!(Forking, CheckedAlive  => Forking, true, []),
        row!(Forking, CheckedDead   => Forking, true, []),
        row!(Forking, GaveUp        => Draining,    false, [failed(REQ, f_shutdown()), pc(P::Draining), StopAccepting, drain_shutdown()]),

        // ---- HandingOver (child CHILD for ID1, still accepting).
        row!(HandingOver, UpSignal      => HandingOver, true,  [busy(Requester::Signal, B_IN_FLIGHT)]),
        row!(HandingOver, UpApi         => HandingOver, true,  [busy(LATE, B_IN_FLIGHT)]),
        row!(HandingOver, Spawned       => HandingOver, true,  []),
        row!(HandingOver, SpawnFailed   => HandingOver, true,  []),
        row!(HandingOver, ListenersSent => HandingOver, true,  []),
        row!(HandingOver, HandoffFailed => Serving,     true,  [kill(CHILD), pc(P::Serving), failed(REQ, f_handoff())]),
        row!(HandingOver, ReadyRight    => Draining,    false, [upgraded(REQ, CHILD), pc(P::Draining), StopAccepting, drain_upgraded()]),
        row!(HandingOver, ReadyWrong    => Serving,     true,  [abandon(CHILD), pc(P::Serving), failed(REQ, f_wrong_id())]),
        row!(HandingOver, Invalid       => Serving,     true,  [abandon(CHILD), pc(P::Serving), failed(REQ, f_invalid())]),
        row!(HandingOver, Retired       => HandingOver, true,  []),
        row!(HandingOver, Committed     => HandingOver, true,  []),
        row!(HandingOver, Resumed       => HandingOver, true,  []),
        row!(HandingOver, SuccessorExited   => Serving,     true,  [abandon(CHILD), pc(P::Serving), failed(REQ, f_exit())]),
        row!(HandingOver, ExitedOther   => HandingOver, true,  []),
        row!(HandingOver, AcceptStopped => HandingOver, true,  []),
        row!(HandingOver, Drained       => HandingOver, true,  []),
        row!(HandingOver, Shutdown      => Draining,    false, [ReadSuccessor, abandon(CHILD), failed(REQ, f_shutdown()), pc(P::Draining), StopAccepting, drain_shutdown()]),
        row!(HandingOver, Deadline      => Serving,     true,  [ReadSuccessor, abandon(CHILD), pc(P::Serving), failed(REQ, f_deadline())]),
        row!(HandingOver, CheckedAlive  => HandingOver, true, []),
        row!(HandingOver, CheckedDead   => HandingOver, true, []),
        row!(HandingOver, GaveUp        => Draining,    false, [ReadSuccessor, abandon(CHILD), failed(REQ, f_shutdown()), pc(P::Draining), StopAccepting, drain_shutdown()]),

        // ---- Draining after the upgrade to CHILD.
        row!(DrainingUpgrade, UpSignal      => Draining, false, [busy(Requester::Signal, B_UPGRADED)]),
        row!(DrainingUpgrade, UpApi         => Draining, false, [busy(LATE, B_UPGRADED)]),
        row!(DrainingUpgrade, Spawned       => Draining, false, []),
        row!(DrainingUpgrade, SpawnFailed   => Draining, false, []),
        row!(DrainingUpgrade, ListenersSent => Draining, false, []),
        row!(DrainingUpgrade, HandoffFailed => Draining, false, []),
        row!(DrainingUpgrade, ReadyRight    => Draining, false, []),
        row!(DrainingUpgrade, ReadyWrong    => Draining, false, []),
        row!(DrainingUpgrade, Invalid       => Draining, false, []),
        row!(DrainingUpgrade, Retired       => Draining, false, []),
        row!(DrainingUpgrade, Committed     => Draining, false, []),
        row!(DrainingUpgrade, Resumed       => Draining, false, []),
        row!(DrainingUpgrade, SuccessorExited   => Serving,  true,  [pc(P::Serving), StopDrain, ResumeAccepting]),
        row!(DrainingUpgrade, ExitedOther   => Draining, false, []),
        row!(DrainingUpgrade, AcceptStopped => Draining, false, []),
        row!(DrainingUpgrade, Drained       => Draining, false, []),
        row!(DrainingUpgrade, Shutdown      => Draining, false, []),
        row!(DrainingUpgrade, Deadline      => Draining, false, [CheckSuccessor(CHILD)]),
        row!(DrainingUpgrade, CheckedAlive  => Draining, false, []),
        row!(DrainingUpgrade, CheckedDead   => Draining, false, []),
        row!(DrainingUpgrade, GaveUp        => Draining, false, []),

        // ---- Draining after the upgrade, the successor has retired: its exit is planned.
        row!(DrainingUpgradeRetired, UpSignal      => Draining, false, [busy(Requester::Signal, B_UPGRADED)]),
        row!(DrainingUpgradeRetired, UpApi         => Draining, false, [busy(LATE, B_UPGRADED)]),
        row!(DrainingUpgradeRetired, Spawned       => Draining, false, []),
        row!(DrainingUpgradeRetired, SpawnFailed   => Draining, false, []),
        row!(DrainingUpgradeRetired, ListenersSent => Draining, false, []),
        row!(DrainingUpgradeRetired, HandoffFailed => Draining, false, []),
        row!(DrainingUpgradeRetired, ReadyRight    => Draining, false, []),
        row!(DrainingUpgradeRetired, ReadyWrong    => Draining, false, []),
        row!(DrainingUpgradeRetired, Invalid       => Draining, false, []),
        row!(DrainingUpgradeRetired, Retired       => Draining, false, []),
        row!(DrainingUpgradeRetired, Committed     => Draining, false, []),
        row!(DrainingUpgradeRetired, Resumed       => Draining, false, []),
        row!(DrainingUpgradeRetired, SuccessorExited   => Draining, false, []),
        row!(DrainingUpgradeRetired, ExitedOther   => Draining, false, []),
        row!(DrainingUpgradeRetired, AcceptStopped => Draining, false, []),
        row!(DrainingUpgradeRetired, Drained       => Draining, false, []),
        row!(DrainingUpgradeRetired, Shutdown      => Draining, false, []),
        row!(DrainingUpgradeRetired, Deadline      => Exited,   false, [pc(P::Exited), exit_upgraded(CHILD)]),
        row!(DrainingUpgradeRetired, CheckedAlive  => Draining, false, []),
        row!(DrainingUpgradeRetired, CheckedDead   => Draining, false, []),
        row!(DrainingUpgradeRetired, GaveUp        => Draining, false, []),

        // ---- Draining after the upgrade, a shutdown was requested: never resume; a second
        // shutdown stops waiting.
        row!(DrainingUpgradeShutdown, UpSignal      => Draining, false, [busy(Requester::Signal, B_UPGRADED)]),
        row!(DrainingUpgradeShutdown, UpApi         => Draining, false, [busy(LATE, B_UPGRADED)]),
        row!(DrainingUpgradeShutdown, Spawned       => Draining, false, []),
        row!(DrainingUpgradeShutdown, SpawnFailed   => Draining, false, []),
        row!(DrainingUpgradeShutdown, ListenersSent => Draining, false, []),
        row!(DrainingUpgradeShutdown, HandoffFailed => Draining, false, []),
        row!(DrainingUpgradeShutdown, ReadyRight    => Draining, false, []),
        row!(DrainingUpgradeShutdown, ReadyWrong    => Draining, false, []),
        row!(DrainingUpgradeShutdown, Invalid       => Draining, false, []),
        row!(DrainingUpgradeShutdown, Retired       => Draining, false, []),
        row!(DrainingUpgradeShutdown, Committed     => Draining, false, []),
        row!(DrainingUpgradeShutdown, Resumed       => Draining, false, []),
        row!(DrainingUpgradeShutdown, SuccessorExited   => Draining, false, []),
        row!(DrainingUpgradeShutdown, ExitedOther   => Draining, false, []),
        row!(DrainingUpgradeShutdown, AcceptStopped => Draining, false, []),
        row!(DrainingUpgradeShutdown, Drained       => Draining, false, []),
        row!(DrainingUpgradeShutdown, Shutdown      => Exited,   false, [pc(P::Exited), exit_upgraded(CHILD)]),
        row!(DrainingUpgradeShutdown, Deadline      => Exited,   false, [pc(P::Exited), exit_upgraded(CHILD)]),
        row!(DrainingUpgradeShutdown, CheckedAlive  => Draining, false, []),
        row!(DrainingUpgradeShutdown, CheckedDead   => Draining, false, []),
        row!(DrainingUpgradeShutdown, GaveUp        => Draining, false, []),

        // ---- Drained after the upgrade, checking that the successor still runs before the exit.
        row!(DrainingUpgradeChecking, UpSignal      => Draining, false, [busy(Requester::Signal, B_UPGRADED)]),
        row!(DrainingUpgradeChecking, UpApi         => Draining, false, [busy(LATE, B_UPGRADED)]),
        row!(DrainingUpgradeChecking, Spawned       => Draining, false, []),
        row!(DrainingUpgradeChecking, SpawnFailed   => Draining, false, []),
        row!(DrainingUpgradeChecking, ListenersSent => Draining, false, []),
        row!(DrainingUpgradeChecking, HandoffFailed => Draining, false, []),
        row!(DrainingUpgradeChecking, ReadyRight    => Draining, false, []),
        row!(DrainingUpgradeChecking, ReadyWrong    => Draining, false, []),
        row!(DrainingUpgradeChecking, Invalid       => Draining, false, []),
        row!(DrainingUpgradeChecking, Retired       => Exited,   false, [pc(P::Exited), exit_upgraded(CHILD)]),
        // Waits for the check's answer (a dead successor leaves nobody: logged), then exits.
        row!(DrainingUpgradeChecking, Committed     => Draining, false, []),
        row!(DrainingUpgradeChecking, Resumed       => Draining, false, []),
        row!(DrainingUpgradeChecking, SuccessorExited   => Serving,  true,  [pc(P::Serving), StopDrain, ResumeAccepting]),
        row!(DrainingUpgradeChecking, ExitedOther   => Draining, false, []),
        row!(DrainingUpgradeChecking, AcceptStopped => Draining, false, []),
        row!(DrainingUpgradeChecking, Drained       => Draining, false, []),
        row!(DrainingUpgradeChecking, Shutdown      => Exited,   false, [pc(P::Exited), exit_upgraded(CHILD)]),
        row!(DrainingUpgradeChecking, Deadline      => Draining, false, []),
        row!(DrainingUpgradeChecking, CheckedAlive  => Exited,   false, [pc(P::Exited), exit_upgraded(CHILD)]),
        row!(DrainingUpgradeChecking, CheckedDead   => Serving,  true,  [pc(P::Serving), StopDrain, ResumeAccepting]),
        row!(DrainingUpgradeChecking, GaveUp        => Exited,   false, [pc(P::Exited), exit_upgraded(CHILD)]),

        // ---- Draining after a shutdown: no successor, so child events are all stale.
        row!(DrainingShutdown, UpSignal      => Draining, false, [busy(Requester::Signal, B_SHUTTING)]),
        row!(DrainingShutdown, UpApi         => Draining, false, [busy(LATE, B_SHUTTING)]),
        row!(DrainingShutdown, Spawned       => Draining, false, []),
        row!(DrainingShutdown, SpawnFailed   => Draining, false, []),
        row!(DrainingShutdown, ListenersSent => Draining, false, []),
        row!(DrainingShutdown, HandoffFailed => Draining, false, []),
        row!(DrainingShutdown, ReadyRight    => Draining, false, []),
        row!(DrainingShutdown, ReadyWrong    => Draining, false, []),
        row!(DrainingShutdown, Invalid       => Draining, false, []),
        row!(DrainingShutdown, Retired       => Draining, false, []),
        row!(DrainingShutdown, Committed     => Draining, false, []),
        row!(DrainingShutdown, Resumed       => Draining, false, []),
        row!(DrainingShutdown, SuccessorExited   => Draining, false, []),
        row!(DrainingShutdown, ExitedOther   => Draining, false, []),
        row!(DrainingShutdown, AcceptStopped => Draining, false, []),
        row!(DrainingShutdown, Drained       => Draining, false, []),
        row!(DrainingShutdown, Shutdown      => Exited,   false, [pc(P::Exited), exit_shutdown()]),
        row!(DrainingShutdown, Deadline      => Exited,   false, [pc(P::Exited), exit_shutdown()]),
        row!(DrainingShutdown, CheckedAlive  => Draining, false, []),
        row!(DrainingShutdown, CheckedDead   => Draining, false, []),
        row!(DrainingShutdown, GaveUp        => Draining, false, []),

        // ---- Exited: terminal; upgrade requests are refused, everything else is ignored.
        row!(Exited, UpSignal      => Exited, false, [busy(Requester::Signal, B_EXITED)]),
        row!(Exited, UpApi         => Exited, false, [busy(LATE, B_EXITED)]),
        row!(Exited, Spawned       => Exited, false, []),
        row!(Exited, SpawnFailed   => Exited, false, []),
        row!(Exited, ListenersSent => Exited, false, []),
        row!(Exited, HandoffFailed => Exited, false, []),
        row!(Exited, ReadyRight    => Exited, false, []),
        row!(Exited, ReadyWrong    => Exited, false, []),
        row!(Exited, Invalid       => Exited, false, []),
        row!(Exited, Retired       => Exited, false, []),
        row!(Exited, Committed     => Exited, false, []),
        row!(Exited, Resumed       => Exited, false, []),
        row!(Exited, SuccessorExited   => Exited, false, []),
        row!(Exited, ExitedOther   => Exited, false, []),
        row!(Exited, AcceptStopped => Exited, false, []),
        row!(Exited, Drained       => Exited, false, []),
        row!(Exited, Shutdown      => Exited, false, []),
        row!(Exited, Deadline      => Exited, false, []),
        row!(Exited, CheckedAlive  => Exited, false, []),
        row!(Exited, CheckedDead   => Exited, false, []),
        row!(Exited, GaveUp        => Exited, false, []),
    ]
}

#[test]
fn table_covers_every_phase_event_pair_once() {
    let rows = table();
    let mut seen = HashMap::new();
    for r in &rows {
        *seen.entry((r.from, r.event)).or_insert(0) += 1;
    }
    for s in STARTS {
        for e in EVS {
            assert_eq!(seen.get(&(s, e)), Some(&1), "row for ({s:?}, {e:?})");
        }
    }
    assert_eq!(rows.len(), STARTS.len() * EVS.len());
}

#[test]
fn every_phase_event_pair() {
    let mut failures = Vec::new();
    for r in table() {
        let mut h = build(r.from);
        let actions = apply(&mut h, r.event);
        let got = (h.phase(), h.m.accepting(), &actions);
        let want = (r.to, r.accepting, &r.actions);
        if got != want {
            failures.push(format!(
                "({:?}, {:?}):\n   want phase {:?}, accepting {}, actions {:?}\n    got phase {:?}, accepting {}, actions {:?}",
                r.from, r.event, want.0, want.1, want.2, got.0, got.1, got.2
            ));
        }
        // Whatever happened, the queue is empty once drained.
        assert_eq!(h.m.poll_action(), None);
    }
    assert!(
        failures.is_empty(),
        "{} rows failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn poll_timeout_per_phase() {
    for s in STARTS {
        let h = build(s);
        let t = h.m.poll_timeout();
        match h.phase() {
            P::Forking | P::HandingOver | P::Draining => assert!(t.is_some(), "{s:?}"),
            P::Serving | P::Exited => assert_eq!(t, None, "{s:?}"),
        }
    }
}

#[test]
fn current_upgrade_per_phase() {
    let want = [
        (S::Serving, None),
        (S::Forking, Some(ID1)),
        (S::HandingOver, Some(ID1)),
        (S::DrainingUpgrade, Some(ID1)),
        (S::DrainingUpgradeRetired, Some(ID1)),
        (S::DrainingUpgradeShutdown, Some(ID1)),
        (S::DrainingShutdown, None),
        (S::Exited, None),
    ];
    for (s, id) in want {
        assert_eq!(build(s).m.current_upgrade(), id, "{s:?}");
    }
}

#[test]
fn awaits_spawn_and_ready_per_phase() {
    let want = [
        (S::Serving, false, false),
        (S::Forking, true, false),
        (S::HandingOver, false, true),
        (S::DrainingUpgrade, false, false),
        (S::DrainingUpgradeRetired, false, false),
        (S::DrainingUpgradeShutdown, false, false),
        (S::DrainingUpgradeChecking, false, false),
        (S::DrainingShutdown, false, false),
        (S::Exited, false, false),
    ];
    for (s, spawn, ready) in want {
        let h = build(s);
        assert_eq!(h.m.awaits_spawn(ID1), spawn, "{s:?}");
        assert!(!h.m.awaits_spawn(UpgradeId(ID1.0 + 1)), "{s:?}");
        assert_eq!(h.m.awaits_ready(), ready, "{s:?}");
    }
    // Given up before the spawn came back: a late child is not wanted.
    let mut h = build(S::Forking);
    h.expire();
    assert_eq!(h.phase(), P::Serving);
    assert!(!h.m.awaits_spawn(ID1));
}

// ------------------------------------------------------------------------------------------
// 2. Scenarios

#[test]
fn full_successful_upgrade() {
    let mut h = H::new();
    let t0 = h.now;
    assert_eq!(
        h.ev(upgrade(REQ)),
        vec![pc(P::Forking), SpawnSuccessor(ID1)]
    );
    assert_eq!(h.m.current_upgrade(), Some(ID1));
    h.wait(3 * MS);
    assert_eq!(
        h.ev(spawned(CHILD)),
        vec![pc(P::HandingOver), SendListeners(ID1)]
    );
    // The READY deadline counts from the request: the time the spawn took counts.
    assert_eq!(h.m.poll_timeout(), Some(t0 + TIMEOUTS.ready));
    assert!(h.m.accepting());
    assert_eq!(h.ev(Event::ListenersSent), vec![]);
    h.wait(Duration::from_secs(1));
    assert_eq!(h.tick(), vec![], "an early handle_timeout is harmless");
    assert_eq!(
        h.ev(ready(ID1)),
        vec![
            upgraded(REQ, CHILD),
            pc(P::Draining),
            StopAccepting,
            drain_upgraded()
        ]
    );
    assert!(!h.m.accepting());
    let drain_start = h.now;
    // The drain deadline counts from the start of the drain.
    assert_eq!(h.m.poll_timeout(), Some(drain_start + TIMEOUTS.drain));
    assert_eq!(h.ev(Event::AcceptStopped), vec![]);
    h.wait(Duration::from_secs(2));
    // Drained: first make sure the successor still runs, then exit.
    assert_eq!(h.ev(Event::ConnectionsDrained), vec![CheckSuccessor(CHILD)]);
    assert_eq!(
        h.ev(alive(CHILD)),
        vec![pc(P::Exited), exit_upgraded(CHILD)]
    );
    assert_eq!(h.phase(), P::Exited);
    assert_eq!(h.m.poll_timeout(), None);
    assert_eq!(h.m.current_upgrade(), None);
}

/// Drives a fresh machine to HandingOver with `REQ`'s upgrade `ID1` and child `CHILD`.
fn handing_over() -> H {
    build(S::HandingOver)
}

/// The common end of every rollback: serving, accepting, nothing in flight, no deadline, and a
/// new upgrade starts normally with a fresh id.
fn assert_rolled_back(h: &mut H) {
    assert_eq!(h.phase(), P::Serving);
    assert!(h.m.accepting());
    assert_eq!(h.m.current_upgrade(), None);
    assert_eq!(h.m.poll_timeout(), None);
    assert_eq!(
        h.ev(upgrade(Requester::Api(2))),
        vec![pc(P::Forking), SpawnSuccessor(ID2)]
    );
}

#[test]
fn rollback_on_spawn_failure() {
    let mut h = build(S::Forking);
    assert_eq!(
        h.ev(spawn_failed()),
        vec![pc(P::Serving), failed(REQ, f_spawn())]
    );
    assert_rolled_back(&mut h);
}

#[test]
fn rollback_on_child_exit_before_ready() {
    let mut h = handing_over();
    assert_eq!(
        h.ev(exited(CHILD)),
        vec![abandon(CHILD), pc(P::Serving), failed(REQ, f_exit())]
    );
    assert_rolled_back(&mut h);
}

#[test]
fn rollback_on_ready_deadline() {
    let mut h = H::new();
    h.ev(upgrade(REQ));
    h.ev(spawned(CHILD));
    let deadline = h.now + TIMEOUTS.ready;
    assert_eq!(h.m.poll_timeout(), Some(deadline));
    h.now = deadline - MS;
    assert_eq!(h.tick(), vec![], "not yet");
    assert_eq!(h.phase(), P::HandingOver);
    h.now = deadline;
    assert_eq!(
        h.tick(),
        vec![
            ReadSuccessor,
            abandon(CHILD),
            pc(P::Serving),
            failed(REQ, f_deadline())
        ],
        "fires at the deadline itself, once what the child sent is read"
    );
    assert_rolled_back(&mut h);
}

/// A child in HandingOver may have the listeners (they were sent on entering it, and may reach
/// it before this process sees its own send complete) and taken connections before its READY:
/// abandoned, it gets SIGTERM (it drains them), never a SIGKILL that resets them. Only a child
/// that cannot have them (the send failed; or it started past the deadline and was never sent
/// them) is killed.
#[test]
fn an_abandoned_child_that_may_have_the_listeners_is_terminated_not_killed() {
    let mut h = H::new();
    h.ev(upgrade(REQ));
    h.ev(spawned(CHILD));
    h.now += TIMEOUTS.ready;
    assert_eq!(
        h.tick()[..2],
        [ReadSuccessor, abandon(CHILD)],
        "the ready deadline"
    );

    let mut h = H::new();
    h.ev(upgrade(REQ));
    h.ev(spawned(CHILD));
    assert_eq!(
        h.ev(Event::ShutdownRequested)[1],
        abandon(CHILD),
        "a shutdown"
    );

    let mut h = H::new();
    h.ev(upgrade(REQ));
    h.ev(spawned(CHILD));
    assert_eq!(h.ev(handoff_failed())[0], kill(CHILD), "the send failed");
}

#[test]
fn rollback_on_bad_message() {
    let mut h = handing_over();
    assert_eq!(
        h.ev(invalid()),
        vec![abandon(CHILD), pc(P::Serving), failed(REQ, f_invalid())]
    );
    assert_rolled_back(&mut h);
}

#[test]
fn rollback_on_wrong_upgrade_id() {
    let mut h = handing_over();
    assert_eq!(
        h.ev(ready(BOGUS)),
        vec![abandon(CHILD), pc(P::Serving), failed(REQ, f_wrong_id())]
    );
    assert_rolled_back(&mut h);
}

#[test]
fn rollback_on_handoff_failed() {
    let mut h = handing_over();
    assert_eq!(
        h.ev(handoff_failed()),
        vec![kill(CHILD), pc(P::Serving), failed(REQ, f_handoff())]
    );
    assert_rolled_back(&mut h);
}

#[test]
fn rollback_replies_to_a_signal_requester_too() {
    let mut h = H::new();
    h.ev(upgrade(Requester::Signal));
    h.ev(spawned(CHILD));
    assert_eq!(
        h.ev(invalid()),
        vec![
            abandon(CHILD),
            pc(P::Serving),
            failed(Requester::Signal, f_invalid())
        ]
    );
}

#[test]
fn second_upgrade_request_while_in_flight_is_busy() {
    let mut h = H::new();
    assert_eq!(
        h.ev(upgrade(Requester::Api(1))),
        vec![pc(P::Forking), SpawnSuccessor(ID1)]
    );
    assert_eq!(
        h.ev(upgrade(Requester::Api(2))),
        vec![busy(Requester::Api(2), B_IN_FLIGHT)]
    );
    assert_eq!(
        h.ev(upgrade(Requester::Signal)),
        vec![busy(Requester::Signal, B_IN_FLIGHT)]
    );
    assert_eq!(
        h.ev(spawned(CHILD)),
        vec![pc(P::HandingOver), SendListeners(ID1)]
    );
    assert_eq!(
        h.ev(upgrade(Requester::Api(3))),
        vec![busy(Requester::Api(3), B_IN_FLIGHT)]
    );
    // The original requester, and only it, gets the outcome.
    assert_eq!(
        h.ev(ready(ID1)),
        vec![
            upgraded(Requester::Api(1), CHILD),
            pc(P::Draining),
            StopAccepting,
            drain_upgraded()
        ]
    );
    assert_eq!(
        h.ev(upgrade(Requester::Api(4))),
        vec![busy(Requester::Api(4), B_UPGRADED)]
    );
}

#[test]
fn drain_exits_after_accept_stopped_then_drained() {
    let mut h = build(S::DrainingUpgrade);
    assert_eq!(h.ev(Event::AcceptStopped), vec![]);
    assert_eq!(
        h.ev(Event::AcceptStopped),
        vec![],
        "a second stop notice changes nothing"
    );
    assert_eq!(h.phase(), P::Draining);
    assert_eq!(h.ev(Event::ConnectionsDrained), vec![CheckSuccessor(CHILD)]);
    assert_eq!(
        h.ev(alive(CHILD)),
        vec![pc(P::Exited), exit_upgraded(CHILD)]
    );
}

#[test]
fn drain_exits_after_drained_then_accept_stopped() {
    let mut h = build(S::DrainingUpgrade);
    assert_eq!(h.ev(Event::ConnectionsDrained), vec![]);
    assert_eq!(h.ev(Event::ConnectionsDrained), vec![]);
    assert_eq!(h.phase(), P::Draining);
    assert_eq!(h.ev(Event::AcceptStopped), vec![CheckSuccessor(CHILD)]);
    assert_eq!(
        h.ev(alive(CHILD)),
        vec![pc(P::Exited), exit_upgraded(CHILD)]
    );
}

#[test]
fn a_successor_found_dead_when_the_drain_ends_is_a_rollback_after_handover() {
    // Its exit watch has not been reaped yet (the explorer's path: READY, the successor
    // dies, this process drains what little it had and would exit with nobody serving).
    let mut h = build(S::DrainingUpgradeChecking);
    assert_eq!(
        h.ev(Event::SuccessorChecked {
            pid: CHILD,
            alive: false
        }),
        vec![pc(P::Serving), StopDrain, ResumeAccepting]
    );
    assert!(h.m.accepting());
    assert_eq!(
        h.ev(exited(CHILD)),
        vec![],
        "its exit, reaped later, is stale"
    );
    assert_eq!(h.ev(alive(CHILD)), vec![], "so is a late answer");
}

#[test]
fn a_stop_from_the_predecessor_never_cuts_a_drain_short() {
    // systemd's SIGTERM and the predecessor's (it gave up on this process) can both come.
    let mut h = build(S::DrainingShutdown);
    assert_eq!(h.ev(Event::PredecessorGaveUp), vec![]);
    assert_eq!(h.phase(), P::Draining);
    assert_eq!(
        h.ev(Event::ShutdownRequested),
        vec![pc(P::Exited), exit_shutdown()],
        "a second signal from anyone else still does"
    );
}

#[test]
fn shutdown_drain_needs_both_notices_in_either_order() {
    for first_accept in [true, false] {
        let mut h = build(S::DrainingShutdown);
        let (a, b) = if first_accept {
            (Event::AcceptStopped, Event::ConnectionsDrained)
        } else {
            (Event::ConnectionsDrained, Event::AcceptStopped)
        };
        assert_eq!(h.ev(a), vec![]);
        assert_eq!(h.phase(), P::Draining);
        assert_eq!(h.ev(b), vec![pc(P::Exited), exit_shutdown()]);
    }
}

#[test]
fn drain_exits_at_the_drain_deadline() {
    for start in [S::DrainingUpgrade, S::DrainingShutdown] {
        let mut h = build(start);
        let deadline = h.m.poll_timeout().unwrap();
        h.ev(Event::AcceptStopped); // connections never drain
        h.now = deadline - MS;
        assert_eq!(h.tick(), vec![]);
        assert_eq!(h.phase(), P::Draining);
        h.now = deadline;
        if start == S::DrainingUpgrade {
            assert_eq!(h.tick(), vec![CheckSuccessor(CHILD)]);
            assert_eq!(h.tick(), vec![], "fires once");
            assert_eq!(
                h.ev(alive(CHILD)),
                vec![pc(P::Exited), exit_upgraded(CHILD)]
            );
        } else {
            assert_eq!(h.tick(), vec![pc(P::Exited), exit_shutdown()]);
            assert_eq!(h.tick(), vec![], "fires once");
        }
    }
}

#[test]
fn drain_deadline_counts_from_the_start_of_the_drain() {
    let mut h = H::new();
    h.ev(upgrade(REQ));
    h.ev(spawned(CHILD));
    h.wait(Duration::from_secs(4)); // READY near the end of its window
    h.ev(ready(ID1));
    assert_eq!(h.m.poll_timeout(), Some(h.now + TIMEOUTS.drain));
    // Past the READY deadline, well before the drain deadline: nothing.
    h.wait(Duration::from_secs(10));
    assert_eq!(h.tick(), vec![]);
    assert_eq!(h.phase(), P::Draining);
}

#[test]
fn successor_dying_during_the_drain_resumes_serving() {
    let mut h = build(S::DrainingUpgrade);
    h.ev(Event::AcceptStopped);
    assert_eq!(
        h.ev(exited(CHILD)),
        vec![pc(P::Serving), StopDrain, ResumeAccepting]
    );
    assert!(h.m.accepting());
    assert_eq!(h.m.current_upgrade(), None);
    assert_eq!(h.m.poll_timeout(), None);
    // The drain is over: its notices and deadline no longer matter.
    assert_eq!(h.ev(Event::ConnectionsDrained), vec![]);
    assert_eq!(h.expire(), vec![]);
    assert_eq!(h.phase(), P::Serving);
    // And the next upgrade gets a fresh id.
    assert_eq!(
        h.ev(upgrade(Requester::Api(2))),
        vec![pc(P::Forking), SpawnSuccessor(ID2)]
    );
}

#[test]
fn successor_retired_then_dying_keeps_draining_and_exits_normally() {
    let mut h = build(S::DrainingUpgrade);
    assert_eq!(h.ev(Event::SuccessorRetired), vec![]);
    assert_eq!(h.ev(exited(CHILD)), vec![]);
    assert_eq!(h.phase(), P::Draining);
    assert!(!h.m.accepting());
    assert_eq!(h.ev(Event::ConnectionsDrained), vec![]);
    assert_eq!(
        h.ev(Event::AcceptStopped),
        vec![pc(P::Exited), exit_upgraded(CHILD)]
    );
}

#[test]
fn shutdown_during_handing_over_abandons_the_child_and_drains() {
    let mut h = handing_over();
    assert_eq!(
        h.ev(Event::ShutdownRequested),
        vec![
            ReadSuccessor,
            abandon(CHILD),
            failed(REQ, f_shutdown()),
            pc(P::Draining),
            StopAccepting,
            drain_shutdown(),
        ]
    );
    assert_eq!(h.phase(), P::Draining);
    assert!(!h.m.accepting());
    assert_eq!(h.m.current_upgrade(), None);
    // The abandoned child's exit and late READY change nothing.
    assert_eq!(h.ev(exited(CHILD)), vec![]);
    assert_eq!(h.ev(ready(ID1)), vec![]);
    assert_eq!(h.ev(upgrade(REQ)), vec![busy(REQ, B_SHUTTING)]);
    h.ev(Event::AcceptStopped);
    assert_eq!(
        h.ev(Event::ConnectionsDrained),
        vec![pc(P::Exited), exit_shutdown()]
    );
}

#[test]
fn shutdown_during_forking_replies_failed_and_drains() {
    let mut h = build(S::Forking);
    let actions = h.ev(Event::ShutdownRequested);
    assert!(actions.contains(&failed(REQ, f_shutdown())));
    assert!(!actions
        .iter()
        .any(|a| matches!(a, Action::AbandonSuccessor { .. })));
    assert_eq!(
        actions[actions.len() - 3..],
        [pc(P::Draining), StopAccepting, drain_shutdown()]
    );
    assert_eq!(h.phase(), P::Draining);
    // A SuccessorSpawned that raced the shutdown is stale.
    assert_eq!(h.ev(spawned(CHILD)), vec![]);
    assert_eq!(h.phase(), P::Draining);
}

#[test]
fn a_spawn_that_never_completes_is_given_up_at_the_deadline() {
    let mut h = build(S::Forking);
    // (`build` ends 1 ms after the request.)
    let requested = h.now - MS;
    assert_eq!(h.m.poll_timeout(), Some(requested + TIMEOUTS.ready));
    h.wait(TIMEOUTS.ready - 2 * MS);
    assert_eq!(h.tick(), vec![], "not yet");
    h.wait(MS);
    assert_eq!(h.tick(), vec![pc(P::Serving), failed(REQ, f_start())]);
    assert!(h.m.accepting());
    assert_eq!(h.m.current_upgrade(), None);
    // The late child's spawn is stale (the driver kills it); a new upgrade starts afresh.
    assert_eq!(h.ev(spawned(CHILD)), vec![]);
    assert_eq!(
        h.ev(upgrade(LATE)),
        vec![pc(P::Forking), SpawnSuccessor(ID2)]
    );
}

#[test]
fn a_spawn_completing_past_the_deadline_is_abandoned_not_handed_over() {
    let mut h = build(S::Forking);
    // The deadline passed, but the spawn's report arrives before the timer fires.
    h.wait(TIMEOUTS.ready);
    assert_eq!(
        h.ev(spawned(CHILD)),
        vec![kill(CHILD), pc(P::Serving), failed(REQ, f_start())]
    );
    assert!(h.m.accepting());
    assert_eq!(h.m.poll_timeout(), None);
}

#[test]
fn second_shutdown_while_draining_from_a_shutdown_exits_immediately() {
    let mut h = build(S::Serving);
    h.ev(Event::ShutdownRequested);
    assert_eq!(
        h.ev(Event::ShutdownRequested),
        vec![pc(P::Exited), exit_shutdown()]
    );
    assert_eq!(h.ev(Event::ShutdownRequested), vec![]);
}

/// An application that shut its server down for the drain (axum's one-shot graceful
/// shutdown) commits it: its successor's death no longer makes this process serve again,
/// which would accept connections nobody takes. The commit is answered once the accepts have
/// stopped; refused when not draining (a drain that resumed first).
#[test]
fn a_committed_drain_never_resumes_and_is_answered_once_accepts_stopped() {
    let mut h = build(S::Serving);
    assert_eq!(h.m.drains_started(), 0);
    assert_eq!(h.ev(Event::DrainCommitted(0)), vec![]);
    assert_eq!(h.m.drain_commit(0), Some(false));

    let mut h = build(S::DrainingUpgrade);
    let seq = h.m.drains_started();
    assert_eq!(seq, 1);
    assert_eq!(h.ev(Event::DrainCommitted(seq)), vec![]);
    assert_eq!(
        h.m.drain_commit(seq),
        None,
        "answered before the accepts stopped"
    );
    assert_eq!(h.ev(exited(CHILD)), vec![]);
    assert_eq!(h.phase(), P::Draining);
    assert!(!h.m.accepting());
    assert_eq!(h.ev(Event::AcceptStopped), vec![]);
    assert_eq!(h.m.drain_commit(seq), Some(true));
    assert_eq!(
        h.ev(Event::ConnectionsDrained),
        vec![pc(P::Exited), exit_upgraded(CHILD)]
    );
    assert_eq!(h.m.drain_commit(seq), Some(true));
}

/// The successor of a committed drain that dies unannounced leaves the service to nobody (the
/// driver logs it); not once the drain is uncommitted, nor when its exit was announced or the
/// operator stopped the service, nor for another process.
#[test]
fn only_a_committed_drains_successor_dying_unplanned_leaves_nobody() {
    // A harness in `start`, its drain committed.
    let committed = |start| {
        let mut h = build(start);
        let seq = h.m.drains_started();
        h.ev(Event::DrainCommitted(seq));
        h
    };
    assert!(
        !build(S::DrainingUpgrade).m.exit_leaves_nobody(CHILD),
        "not committed: it resumes"
    );
    let h = committed(S::DrainingUpgrade);
    assert!(h.m.exit_leaves_nobody(CHILD));
    assert!(!h.m.exit_leaves_nobody(OTHER));
    assert!(
        !committed(S::DrainingUpgradeRetired)
            .m
            .exit_leaves_nobody(CHILD),
        "its exit was announced"
    );
    assert!(
        !committed(S::DrainingUpgradeShutdown)
            .m
            .exit_leaves_nobody(CHILD),
        "the operator stops it"
    );
    assert!(!build(S::Serving).m.exit_leaves_nobody(CHILD));

    // A committed drain that ends looks at its successor first: found dead, that is the
    // moment to say nobody serves (and then it exits all the same); its exit seen before
    // makes the look needless.
    let mut h = committed(S::DrainingUpgrade);
    h.ev(Event::AcceptStopped);
    assert_eq!(
        h.ev(Event::ConnectionsDrained),
        vec![Action::CheckSuccessor(CHILD)]
    );
    assert!(h.m.exit_leaves_nobody(CHILD));
    assert_eq!(
        h.ev(Event::SuccessorChecked {
            pid: CHILD,
            alive: false
        }),
        vec![pc(P::Exited), exit_upgraded(CHILD)]
    );
    let mut h = committed(S::DrainingUpgrade);
    assert_eq!(h.ev(exited(CHILD)), vec![]);
    assert!(!h.m.exit_leaves_nobody(CHILD), "said once, at its exit");
    h.ev(Event::AcceptStopped);
    assert_eq!(
        h.ev(Event::ConnectionsDrained),
        vec![pc(P::Exited), exit_upgraded(CHILD)]
    );
}

/// A commit meant for a drain that resumed is refused, also once a later drain has begun: the
/// later drain keeps its own idle grace and can still roll back.
#[test]
fn a_commit_for_an_earlier_drain_does_not_commit_a_later_one() {
    let mut h = build(S::DrainingUpgrade);
    let first = h.m.drains_started();
    h.ev(Event::AcceptStopped);
    h.ev(exited(CHILD));
    assert_eq!(h.phase(), P::Serving);
    // A second upgrade reaches its drain.
    h.ev(upgrade(REQ));
    h.ev(spawned(OTHER));
    h.ev(Event::ListenersSent);
    let actions = h.ev(ready(ID2));
    assert!(actions.contains(&pc(P::Draining)), "{actions:?}");
    assert_eq!(h.m.drains_started(), first + 1);
    assert_eq!(h.ev(Event::DrainCommitted(first)), vec![]);
    assert_eq!(h.m.drain_commit(first), Some(false));
    // And once the later drain is committed, the earlier one's number still answers no.
    let mut committed = h.clone();
    committed.ev(Event::DrainCommitted(first + 1));
    committed.ev(Event::AcceptStopped);
    assert_eq!(committed.m.drain_commit(first + 1), Some(true));
    assert_eq!(committed.m.drain_commit(first), Some(false));
    // Not committed: its successor's death is a rollback.
    h.ev(Event::AcceptStopped);
    assert_eq!(
        h.ev(exited(OTHER)),
        vec![pc(P::Serving), StopDrain, ResumeAccepting]
    );
}

#[test]
fn shutdown_while_draining_after_an_upgrade_never_resumes() {
    let mut h = build(S::DrainingUpgrade);
    assert_eq!(h.ev(Event::ShutdownRequested), vec![]);
    assert_eq!(h.phase(), P::Draining);
    // The successor dies unplanned: we would normally take the service back, but not now.
    assert_eq!(h.ev(exited(CHILD)), vec![]);
    assert_eq!(h.phase(), P::Draining);
    assert!(!h.m.accepting());
    h.ev(Event::AcceptStopped);
    assert_eq!(
        h.ev(Event::ConnectionsDrained),
        vec![pc(P::Exited), exit_upgraded(CHILD)]
    );
}

#[test]
fn second_shutdown_while_draining_after_an_upgrade_exits_immediately() {
    let mut h = build(S::DrainingUpgradeShutdown);
    assert_eq!(
        h.ev(Event::ShutdownRequested),
        vec![pc(P::Exited), exit_upgraded(CHILD)]
    );
}

#[test]
fn upgrade_ids_differ_across_successive_upgrades() {
    let mut h = H::new();
    let mut ids = Vec::new();
    let mut pid = 100;
    // Failed, successful-then-resumed, failed, failed: each attempt gets its own id.
    for round in 0..6 {
        let actions = h.ev(upgrade(Requester::Api(round)));
        let Some(&SpawnSuccessor(id)) = actions.last() else {
            panic!("no SpawnSuccessor: {actions:?}")
        };
        assert_eq!(h.m.current_upgrade(), Some(id));
        ids.push(id);
        pid += 1;
        match round % 3 {
            0 => {
                h.ev(spawn_failed());
            }
            1 => {
                h.ev(spawned(pid));
                h.ev(ready(id));
                h.ev(exited(pid)); // successor died: resume
            }
            _ => {
                h.ev(spawned(pid));
                h.expire();
            }
        }
        assert_eq!(h.phase(), P::Serving, "round {round}");
    }
    let mut unique = ids.clone();
    unique.sort_by_key(|id| id.0);
    unique.dedup();
    assert_eq!(unique.len(), ids.len(), "{ids:?}");
    assert_eq!(ids[0], ID1);
    assert_eq!(ids[1], ID2);

    // The seed makes ids differ across generations.
    let mut other = H::with_seed(SEED ^ 0xffff_0000);
    let Some(SpawnSuccessor(id)) = other.ev(upgrade(REQ)).pop() else {
        panic!()
    };
    assert_ne!(id, ID1);
}

#[test]
fn upgrade_ids_wrap_instead_of_overflowing() {
    let mut h = H::with_seed(u64::MAX);
    assert_eq!(h.ev(upgrade(REQ)).pop(), Some(SpawnSuccessor(UpgradeId(0))));
}

#[test]
fn stale_exit_of_an_abandoned_child_changes_nothing() {
    let mut h = handing_over();
    h.ev(invalid()); // abandons CHILD
    assert_eq!(h.ev(exited(CHILD)), vec![], "in Serving");
    // A new upgrade with another child: the old pid's exit is still stale.
    h.ev(upgrade(Requester::Api(2)));
    assert_eq!(h.ev(exited(CHILD)), vec![], "in Forking");
    h.ev(spawned(OTHER));
    assert_eq!(h.ev(exited(CHILD)), vec![], "in HandingOver");
    assert_eq!(h.phase(), P::HandingOver);
    h.ev(ready(ID2));
    assert_eq!(h.ev(exited(CHILD)), vec![], "in Draining");
    assert_eq!(h.phase(), P::Draining);
    // Whereas the real successor's exit resumes service.
    assert_eq!(
        h.ev(exited(OTHER)),
        vec![pc(P::Serving), StopDrain, ResumeAccepting]
    );
}

#[test]
fn late_ready_after_rollback_changes_nothing() {
    let mut h = handing_over();
    h.expire(); // READY deadline: abandon CHILD
    assert_eq!(h.phase(), P::Serving);
    assert_eq!(h.ev(ready(ID1)), vec![]);
    assert_eq!(h.ev(Event::ListenersSent), vec![]);
    assert_eq!(h.ev(handoff_failed()), vec![]);
    assert_eq!(h.ev(invalid()), vec![]);
    assert_eq!(h.phase(), P::Serving);
    assert!(h.m.accepting());
}

#[test]
fn late_events_after_a_successful_upgrade_change_nothing() {
    let mut h = build(S::DrainingUpgrade);
    for e in [
        ready(ID1),
        ready(BOGUS),
        Event::ListenersSent,
        handoff_failed(),
        invalid(),
        spawned(CHILD),
        spawn_failed(),
        exited(OTHER),
    ] {
        assert_eq!(h.ev(e.clone()), vec![], "{e:?}");
        assert_eq!(h.phase(), P::Draining);
    }
}

#[test]
fn exited_is_terminal() {
    let mut h = build(S::DrainingUpgradeChecking);
    h.ev(alive(CHILD));
    assert_eq!(h.phase(), P::Exited);
    for e in [
        Event::ShutdownRequested,
        exited(CHILD),
        Event::AcceptStopped,
        Event::ConnectionsDrained,
        spawned(CHILD),
        ready(ID1),
    ] {
        assert_eq!(h.ev(e), vec![]);
    }
    assert_eq!(h.expire(), vec![]);
    assert_eq!(h.ev(upgrade(REQ)), vec![busy(REQ, B_EXITED)]);
    assert_eq!(h.phase(), P::Exited);
}

/// A shutdown during an upgrade goes straight to Draining: no transient `PhaseChanged(Serving)`
/// that `Handle::phase()` observers or the log could see.
#[test]
fn shutdown_during_upgrade_reports_no_transient_serving_phase() {
    for start in [S::Forking, S::HandingOver] {
        let mut h = build(start);
        let actions = h.ev(Event::ShutdownRequested);
        assert!(!actions.contains(&pc(P::Serving)), "{start:?}: {actions:?}");
    }
}

// ------------------------------------------------------------------------------------------
// 3. Properties over random event sequences

/// Pids the random events use; the real child is whichever of them `SuccessorSpawned` carried.
const PIDS: [u32; 3] = [101, 102, 103];

#[derive(Clone, Copy, Debug)]
enum IdPick {
    /// The upgrade in flight (or the last one issued, if none is in flight).
    Current,
    /// The upgrade before the last one issued (a stale READY).
    Previous,
    Bogus,
}

#[derive(Clone, Debug)]
enum Step {
    UpSignal,
    /// An API upgrade request with a fresh ticket.
    UpApi,
    Spawned(u32),
    SpawnFailed,
    ListenersSent,
    HandoffFailed,
    Ready(IdPick),
    Invalid,
    Retired,
    Resumed,
    Exited(u32),
    AcceptStopped,
    Drained,
    Shutdown,
    /// Advance the clock by this many ms and call `handle_timeout`.
    Advance(u64),
    /// Move the clock exactly to `poll_timeout()` (if any) and call `handle_timeout`.
    ToDeadline,
}

fn step() -> impl Strategy<Value = Step> {
    let pid = proptest::sample::select(PIDS.to_vec());
    let id = prop_oneof![
        3 => Just(IdPick::Current),
        1 => Just(IdPick::Previous),
        1 => Just(IdPick::Bogus),
    ];
    prop_oneof![
        3 => Just(Step::UpSignal),
        3 => Just(Step::UpApi),
        3 => pid.clone().prop_map(Step::Spawned),
        1 => Just(Step::SpawnFailed),
        2 => Just(Step::ListenersSent),
        1 => Just(Step::HandoffFailed),
        3 => id.prop_map(Step::Ready),
        1 => Just(Step::Invalid),
        1 => Just(Step::Retired),
        1 => Just(Step::Resumed),
        2 => pid.prop_map(Step::Exited),
        2 => Just(Step::AcceptStopped),
        2 => Just(Step::Drained),
        1 => Just(Step::Shutdown),
        2 => (0u64..8_000).prop_map(Step::Advance),
        1 => Just(Step::ToDeadline),
    ]
}

/// One recorded step: the phase before, the input, the actions and the observable state after.
#[derive(Clone, Debug, PartialEq)]
struct Record {
    before: Phase,
    input: Input,
    actions: Vec<Action>,
    after: Phase,
    accepting: bool,
    upgrade: Option<UpgradeId>,
    timeout: Option<Instant>,
}

#[derive(Clone, Debug, PartialEq)]
enum Input {
    Event(Event),
    Timeout(Instant),
}

/// Runs `steps` on a fresh machine from the virtual time `t0`, resolving ids, tickets and
/// pids deterministically.
fn run(steps: &[Step], seed: u64, t0: Instant) -> Vec<Record> {
    let mut m = Machine::new(TIMEOUTS, seed);
    let mut now = t0;
    let mut ticket = 0u64;
    let mut issued: Vec<UpgradeId> = Vec::new();
    let mut out = Vec::new();
    for s in steps {
        let before = m.phase();
        let input = match *s {
            Step::UpSignal => Input::Event(Event::UpgradeRequested(Requester::Signal)),
            Step::UpApi => {
                ticket += 1;
                Input::Event(Event::UpgradeRequested(Requester::Api(ticket)))
            }
            Step::Spawned(pid) => Input::Event(spawned(pid)),
            Step::SpawnFailed => Input::Event(spawn_failed()),
            Step::ListenersSent => Input::Event(Event::ListenersSent),
            Step::HandoffFailed => Input::Event(handoff_failed()),
            Step::Ready(pick) => {
                let id = match pick {
                    IdPick::Current => m
                        .current_upgrade()
                        .or(issued.last().copied())
                        .unwrap_or(UpgradeId(seed.wrapping_add(1))),
                    IdPick::Previous if issued.len() >= 2 => issued[issued.len() - 2],
                    IdPick::Previous | IdPick::Bogus => BOGUS,
                };
                Input::Event(ready(id))
            }
            Step::Invalid => Input::Event(invalid()),
            Step::Retired => Input::Event(Event::SuccessorRetired),
            Step::Resumed => Input::Event(Event::SuccessorResumed),
            Step::Exited(pid) => Input::Event(exited(pid)),
            Step::AcceptStopped => Input::Event(Event::AcceptStopped),
            Step::Drained => Input::Event(Event::ConnectionsDrained),
            Step::Shutdown => Input::Event(Event::ShutdownRequested),
            Step::Advance(ms) => {
                now += Duration::from_millis(ms);
                Input::Timeout(now)
            }
            Step::ToDeadline => {
                if let Some(at) = m.poll_timeout() {
                    now = now.max(at);
                }
                Input::Timeout(now)
            }
        };
        match &input {
            Input::Event(e) => m.handle(e.clone(), now),
            Input::Timeout(t) => m.handle_timeout(*t),
        }
        let actions = answering(&mut m, now);
        for a in &actions {
            if let SpawnSuccessor(id) = a {
                issued.push(*id);
            }
        }
        out.push(Record {
            before,
            input,
            actions,
            after: m.phase(),
            accepting: m.accepting(),
            upgrade: m.current_upgrade(),
            timeout: m.poll_timeout(),
        });
    }
    out
}

fn is_shutdown(i: &Input) -> bool {
    matches!(i, Input::Event(Event::ShutdownRequested))
}

/// Checks properties (a)–(e) and (g) over one run; returns the first violation.
fn check(records: &[Record]) -> Result<(), String> {
    // The model: what the machine should have in flight.
    let mut open_upgrade: Option<UpgradeId> = None; // (a)
    let mut pending: Option<Requester> = None; // the requester awaiting the outcome
    let mut child: Option<u32> = None; // the child of the upgrade in flight
    let mut replies: HashMap<u64, u32> = HashMap::new(); // (g): Api ticket -> replies
    let mut prev_upgrade: Option<UpgradeId> = None;

    for (i, r) in records.iter().enumerate() {
        let ctx = || format!("step {i}: {r:?}");
        let ensure = |ok: bool, what: &str| {
            if ok {
                Ok(())
            } else {
                Err(format!("{what} — {}", ctx()))
            }
        };
        // Tickets are issued when requested, whatever the phase.
        if let Input::Event(Event::UpgradeRequested(Requester::Api(n))) = r.input {
            replies.entry(n).or_insert(0);
        }

        // (e) Exited is terminal: only refusals of upgrade requests come out.
        if r.before == P::Exited {
            ensure(r.after == P::Exited, "(e) left Exited")?;
            let all_busy = r
                .actions
                .iter()
                .all(|a| matches!(a, Action::Reply(_, Outcome::Busy(_))));
            ensure(all_busy, "(e) non-Busy action after Exited")?;
            let upgrade_req = matches!(r.input, Input::Event(Event::UpgradeRequested(_)));
            ensure(
                r.actions.len() == usize::from(upgrade_req),
                "(e) exactly one Busy per request",
            )?;
        }

        // (a) at most one upgrade in flight; SpawnSuccessor only from Serving.
        let spawns: Vec<UpgradeId> = r
            .actions
            .iter()
            .filter_map(|a| match a {
                SpawnSuccessor(id) => Some(*id),
                _ => None,
            })
            .collect();
        ensure(spawns.len() <= 1, "(a) two SpawnSuccessor in one step")?;
        if let Some(&id) = spawns.first() {
            ensure(
                r.before == P::Serving,
                "(a) SpawnSuccessor not from Serving",
            )?;
            ensure(
                open_upgrade.is_none(),
                "(a) SpawnSuccessor while an upgrade is in flight",
            )?;
            ensure(r.after == P::Forking, "(a) SpawnSuccessor without Forking")?;
            ensure(
                r.upgrade == Some(id),
                "(a) SpawnSuccessor id is not the current upgrade",
            )?;
            let Input::Event(Event::UpgradeRequested(by)) = r.input else {
                return Err(format!("(a) SpawnSuccessor without a request — {}", ctx()));
            };
            open_upgrade = Some(id);
            pending = Some(by);
            child = None;
        }
        if let Input::Event(Event::SuccessorSpawned { pid }) = r.input {
            if r.before == P::Forking {
                child = Some(pid);
            }
        }

        // (b) Draining-by-upgrade only right after a READY with the current upgrade's id.
        let draining_upgrade = r.after == P::Draining && r.upgrade.is_some();
        if draining_upgrade && r.before != P::Draining {
            ensure(
                r.before == P::HandingOver,
                "(b) Draining-by-upgrade not from HandingOver",
            )?;
            ensure(
                open_upgrade.map(|id| Input::Event(Event::SuccessorReady(id)))
                    == Some(r.input.clone()),
                "(b) Draining-by-upgrade without the right READY",
            )?;
            ensure(
                r.upgrade == open_upgrade,
                "(b) draining for another upgrade",
            )?;
            let want = pending.zip(child).map(|(by, pid)| upgraded(by, pid));
            ensure(
                want.is_some() && r.actions.first() == want.as_ref(),
                "(b) no Upgraded reply to the requester",
            )?;
        }
        if r.before == P::Draining && r.after == P::Draining {
            ensure(r.upgrade == prev_upgrade, "(b) drain cause changed")?;
        }
        let upgraded_replies = r
            .actions
            .iter()
            .filter(|a| matches!(a, Action::Reply(_, Outcome::Upgraded { .. })))
            .count();
        ensure(
            upgraded_replies == usize::from(draining_upgrade && r.before == P::HandingOver),
            "(b) Upgraded reply without the transition",
        )?;

        // (c) every rollback leaves the machine serving (or draining for a shutdown).
        let in_flight_before = matches!(r.before, P::Forking | P::HandingOver);
        let abandons: Vec<u32> = r
            .actions
            .iter()
            .filter_map(|a| match a {
                Action::AbandonSuccessor { pid, .. } => Some(*pid),
                _ => None,
            })
            .collect();
        let failed_replies: Vec<Requester> = r
            .actions
            .iter()
            .filter_map(|a| match a {
                Action::Reply(by, Outcome::Failed(_)) => Some(*by),
                _ => None,
            })
            .collect();
        ensure(
            abandons.len() <= 1 && failed_replies.len() <= 1,
            "(c) more than one rollback",
        )?;
        if !abandons.is_empty() {
            ensure(
                r.before == P::HandingOver,
                "(c) AbandonSuccessor outside HandingOver",
            )?;
            ensure(Some(abandons[0]) == child, "(c) abandoned the wrong pid")?;
            ensure(
                failed_replies.len() == 1,
                "(c) AbandonSuccessor without a Failed reply",
            )?;
        }
        if !failed_replies.is_empty() {
            ensure(
                in_flight_before,
                "(c) Failed reply with no upgrade in flight",
            )?;
            ensure(
                Some(failed_replies[0]) == pending,
                "(c) Failed reply to the wrong requester",
            )?;
            ensure(
                (r.before == P::HandingOver) != abandons.is_empty(),
                "(c) rollback after the spawn without AbandonSuccessor",
            )?;
            if is_shutdown(&r.input) {
                ensure(
                    r.after == P::Draining && r.upgrade.is_none(),
                    "(c) shutdown rollback",
                )?;
            } else {
                ensure(
                    r.after == P::Serving && r.accepting,
                    "(c) rollback not serving",
                )?;
            }
        }
        // Leaving an upgrade phase: either READY (Upgraded) or a rollback (Failed).
        if in_flight_before && !matches!(r.after, P::Forking | P::HandingOver) {
            ensure(
                upgraded_replies + failed_replies.len() == 1,
                "(c) left the upgrade without an outcome",
            )?;
        }

        // (d) accepting exactly while not draining/exited; deadlines only where they exist.
        let should_accept = matches!(r.after, P::Serving | P::Forking | P::HandingOver);
        ensure(
            r.accepting == should_accept,
            "(d) accepting() does not match the phase",
        )?;
        ensure(
            r.timeout.is_some() == matches!(r.after, P::Forking | P::HandingOver | P::Draining),
            "poll_timeout() does not match the phase",
        )?;
        ensure(
            r.upgrade.is_some()
                == (matches!(r.after, P::Forking | P::HandingOver) || draining_upgrade),
            "current_upgrade() does not match the phase",
        )?;

        // (g) replies per Api ticket.
        for a in &r.actions {
            if let Action::Reply(by, outcome) = a {
                if let Requester::Api(n) = by {
                    let Some(count) = replies.get_mut(n) else {
                        return Err(format!("(g) reply to an unknown ticket {n} — {}", ctx()));
                    };
                    *count += 1;
                }
                if Some(*by) == pending && !matches!(outcome, Outcome::Busy(_)) {
                    pending = None;
                }
            }
        }
        if !matches!(r.after, P::Forking | P::HandingOver) {
            ensure(pending.is_none(), "(g) requester left without an outcome")?;
        }
        for (&n, &count) in &replies {
            let want = if pending == Some(Requester::Api(n)) {
                0
            } else {
                1
            };
            if count != want {
                return Err(format!(
                    "(g) ticket {n} got {count} replies, want {want} — {}",
                    ctx()
                ));
            }
        }

        // Model bookkeeping for (a).
        if matches!(r.after, P::Serving | P::Exited)
            || (r.after == P::Draining && r.upgrade.is_none())
        {
            open_upgrade = None;
            child = None;
        }
        prev_upgrade = r.upgrade;
    }
    Ok(())
}

proptest! {
    #[test]
    fn random_sequences_keep_the_invariants(
        steps in proptest::collection::vec(step(), 1..120),
        seed in any::<u64>(),
    ) {
        let records = run(&steps, seed, Instant::now());
        if let Err(e) = check(&records) {
            prop_assert!(false, "{}", e);
        }
    }

    /// (f) Same seed, same events, same virtual times: identical outputs. The base instant may
    /// differ: only offsets matter.
    #[test]
    fn random_sequences_are_deterministic(
        steps in proptest::collection::vec(step(), 1..120),
        seed in any::<u64>(),
    ) {
        let t0 = Instant::now();
        let a = run(&steps, seed, t0);
        let b = run(&steps, seed, t0);
        prop_assert_eq!(&a, &b);
        let later = t0 + Duration::from_secs(1000);
        let c = run(&steps, seed, later);
        type Stripped = (Phase, Vec<Action>, Phase, bool, Option<UpgradeId>);
        let strip = |rs: &[Record]| -> Vec<Stripped> {
            rs.iter()
                .map(|r| (r.before, r.actions.clone(), r.after, r.accepting, r.upgrade))
                .collect()
        };
        prop_assert_eq!(strip(&a), strip(&c));
    }
}

/// The generator does reach every phase and the interesting transitions; otherwise the
/// properties would pass vacuously.
#[test]
fn random_sequences_reach_every_phase() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::{Config, TestRunner};
    let mut runner = TestRunner::new_with_rng(
        Config::default(),
        proptest::test_runner::TestRng::deterministic_rng(
            proptest::test_runner::RngAlgorithm::ChaCha,
        ),
    );
    let strategy = proptest::collection::vec(step(), 60..120);
    let mut seen_phases = std::collections::HashSet::new();
    let (mut upgrades, mut rollbacks, mut resumes) = (0, 0, 0);
    for _ in 0..256 {
        let steps = strategy.new_tree(&mut runner).unwrap().current();
        for r in run(&steps, SEED, Instant::now()) {
            seen_phases.insert(r.after);
            for a in &r.actions {
                match a {
                    Action::Reply(_, Outcome::Upgraded { .. }) => upgrades += 1,
                    Action::AbandonSuccessor { .. } => rollbacks += 1,
                    ResumeAccepting => resumes += 1,
                    _ => {}
                }
            }
        }
    }
    assert_eq!(seen_phases.len(), 5, "{seen_phases:?}");
    assert!(
        upgrades > 20 && rollbacks > 20 && resumes > 5,
        "{upgrades} {rollbacks} {resumes}"
    );
}

/// The property checker itself catches corrupted runs (so the properties cannot pass
/// vacuously): a real upgrade/rollback/upgrade run with one fault injected at a time.
#[test]
fn property_checker_rejects_corrupted_runs() {
    let steps = [
        Step::UpApi,
        Step::Spawned(101),
        Step::Invalid,
        Step::UpApi,
        Step::Spawned(102),
        Step::Ready(IdPick::Current),
        Step::Exited(102),
        Step::UpSignal,
        Step::SpawnFailed,
        Step::Shutdown,
        Step::UpApi,
        Step::ToDeadline,
        Step::UpApi,
    ];
    let good = run(&steps, SEED, Instant::now());
    check(&good).expect("the real run passes");
    assert_eq!(good.last().unwrap().after, P::Exited);

    type Fault = fn(&mut Vec<Record>);
    let faults: [(&str, Fault); 8] = [
        ("(a) second SpawnSuccessor", |rs| {
            rs[1].actions.push(SpawnSuccessor(ID2))
        }),
        ("(b) Draining without READY", |rs| {
            rs[4].input = Input::Event(Event::SuccessorReady(BOGUS))
        }),
        ("(c) rollback left not accepting", |rs| {
            rs[2].accepting = false
        }),
        ("(c) abandoned the wrong child", |rs| {
            rs[2].actions[0] = abandon(OTHER)
        }),
        ("(d) accepting while draining", |rs| rs[5].accepting = true),
        ("(e) action after Exited", |rs| {
            rs[12].actions.push(StopAccepting)
        }),
        ("(g) reply lost", |rs| {
            rs[2].actions.retain(|a| !matches!(a, Action::Reply(..)))
        }),
        ("(g) reply twice", |rs| {
            let extra = rs[3].actions.last().unwrap().clone();
            rs[3].actions.push(extra)
        }),
    ];
    for (what, fault) in faults {
        let mut bad = good.clone();
        fault(&mut bad);
        assert!(check(&bad).is_err(), "not caught: {what}");
    }
}

// ------------------------------------------------------------------------------------------
// 4. The draining-generations limit

#[test]
fn upgrade_is_refused_while_too_many_elders_drain() {
    let mut h = H {
        m: Machine::new(TIMEOUTS, SEED).with_generation_limit(2),
        now: Instant::now(),
    };
    // The count is an input like any other; it changes nothing by itself, in any phase.
    assert_eq!(h.ev(Event::EldersDraining(2)), vec![]);
    assert_eq!(h.phase(), Phase::Serving);
    assert_eq!(
        h.ev(Event::UpgradeRequested(REQ)),
        vec![Action::Reply(REQ, Outcome::Busy(Refusal::TooManyDraining))]
    );
    assert_eq!(h.phase(), Phase::Serving);
    assert!(h.m.accepting());
    // One elder exited: below the limit, the upgrade starts.
    assert_eq!(h.ev(Event::EldersDraining(1)), vec![]);
    assert_eq!(
        h.ev(Event::UpgradeRequested(REQ)),
        vec![
            Action::PhaseChanged(Phase::Forking),
            Action::SpawnSuccessor(ID1)
        ]
    );
}

#[test]
fn a_limit_of_one_means_upgrade_only_once_every_elder_is_gone() {
    let mut h = H {
        m: Machine::new(TIMEOUTS, SEED).with_generation_limit(1),
        now: Instant::now(),
    };
    h.ev(Event::EldersDraining(1));
    assert_eq!(
        h.ev(Event::UpgradeRequested(REQ)),
        vec![Action::Reply(REQ, Outcome::Busy(Refusal::TooManyDraining))]
    );
    h.ev(Event::EldersDraining(0));
    assert_eq!(
        h.ev(Event::UpgradeRequested(REQ)),
        vec![
            Action::PhaseChanged(Phase::Forking),
            Action::SpawnSuccessor(ID1)
        ]
    );
}

/// A successor that retired (RETIRING) and then serves again (SERVING: its own successor died
/// and it took the service back) withdraws the retirement: its exit is a crash again, and this
/// process, still draining, takes the service back. Without the SERVING, the exit is planned.
#[test]
fn a_successor_that_serves_again_after_retiring_is_a_crash_when_it_exits() {
    let mut h = build(S::DrainingUpgradeRetired);
    assert_eq!(h.ev(Event::SuccessorResumed), vec![]);
    assert_eq!(
        h.ev(exited(CHILD)),
        vec![pc(P::Serving), StopDrain, ResumeAccepting]
    );
    let mut h = build(S::DrainingUpgradeRetired);
    assert_eq!(h.ev(exited(CHILD)), vec![]);
    assert_eq!(h.phase(), P::Draining);
}

/// A process whose predecessor has not let go yet (it has not read this process's READY, or
/// not stopped accepting) is not upgraded yet: the upgrade that started it is still in
/// flight. Were it upgraded, the predecessor's late MAINPID=<this process> could reach systemd
/// after this process's MAINPID=<its successor>, and systemd would stop the unit when this
/// process, draining, exits (helper-27's review; the explorer finds it once an upgrade may be
/// asked of any serving process). One request waits for the let-go (a SIGHUP sent as soon as
/// the pid file names this process is not lost: `tests/deploy.rs` lost one when it was
/// refused); a second is busy.
#[test]
fn an_upgrade_asked_before_the_predecessor_lets_go_starts_at_the_let_go() {
    let mut h = H {
        m: Machine::new(TIMEOUTS, SEED).with_predecessor(),
        now: Instant::now(),
    };
    assert_eq!(h.ev(upgrade(Requester::Signal)), vec![]);
    assert_eq!(
        h.ev(upgrade(REQ)),
        vec![Action::Reply(REQ, Outcome::Busy(Refusal::InFlight))]
    );
    assert_eq!(h.phase(), P::Serving);
    assert_eq!(
        h.ev(Event::PredecessorLetGo),
        vec![pc(P::Forking), SpawnSuccessor(ID1)]
    );
}

/// An upgrade waiting for the predecessor's let-go is refused when a shutdown comes first.
#[test]
fn an_upgrade_waiting_for_the_let_go_is_refused_at_a_shutdown() {
    let mut h = H {
        m: Machine::new(TIMEOUTS, SEED).with_predecessor(),
        now: Instant::now(),
    };
    assert_eq!(h.ev(upgrade(REQ)), vec![]);
    let actions = h.ev(Event::ShutdownRequested);
    assert_eq!(
        actions.first(),
        Some(&Action::Reply(REQ, Outcome::Busy(Refusal::ShuttingDown))),
        "{actions:?}"
    );
    assert_eq!(h.phase(), P::Draining);
    assert_eq!(
        h.ev(Event::PredecessorLetGo),
        vec![],
        "no upgrade after the shutdown"
    );
}

/// A predecessor that never lets go within the ready timeout (stuck in its stop): the waiting
/// upgrade is refused then, and its requester hears it (helper-31's review).
#[test]
fn an_upgrade_waiting_for_the_let_go_is_refused_after_the_ready_timeout() {
    let mut h = H {
        m: Machine::new(TIMEOUTS, SEED).with_predecessor(),
        now: Instant::now(),
    };
    assert_eq!(h.ev(upgrade(REQ)), vec![]);
    let at =
        h.m.poll_timeout()
            .expect("a deadline for the waiting upgrade");
    assert_eq!(at, h.now + TIMEOUTS.ready);
    h.m.handle_timeout(at - Duration::from_millis(1));
    assert_eq!(h.m.poll_action(), None);
    h.m.handle_timeout(at);
    assert_eq!(
        h.m.poll_action(),
        Some(Action::Reply(REQ, Outcome::Busy(Refusal::InFlight)))
    );
    assert_eq!(h.m.poll_timeout(), None);
    assert_eq!(
        h.ev(Event::PredecessorLetGo),
        vec![],
        "nothing waits any more"
    );
}

#[test]
fn awaits_drained_only_while_draining_and_until_told() {
    for s in STARTS {
        let h = build(s);
        let want = h.phase() == P::Draining && s != S::DrainingUpgradeChecking;
        assert_eq!(h.m.awaits_drained(), want, "{s:?}");
    }
    let mut h = build(S::DrainingShutdown);
    h.ev(Event::ConnectionsDrained);
    assert!(!h.m.awaits_drained());
}

#[test]
fn a_ready_read_before_a_shutdown_in_handing_over_counts() {
    // The driver answers ReadSuccessor with what is on the channel: here READY.
    let mut h = handing_over();
    h.m.handle(Event::ShutdownRequested, h.now);
    assert_eq!(h.m.poll_action(), Some(ReadSuccessor));
    assert_eq!(h.m.poll_action(), None, "nothing decided before the read");
    h.m.handle(ready(ID1), h.now);
    h.m.handle(Event::SuccessorRead, h.now);
    let actions: Vec<Action> = std::iter::from_fn(|| h.m.poll_action()).collect();
    assert_eq!(
        actions,
        vec![
            upgraded(REQ, CHILD),
            pc(P::Draining),
            StopAccepting,
            drain_upgraded()
        ],
        "the upgrade succeeded; the shutdown then finishes its drain without resuming"
    );
    assert_eq!(
        h.ev(exited(CHILD)),
        vec![],
        "never resumes after the shutdown"
    );
}

#[test]
fn a_shutdown_and_the_ready_deadline_in_one_turn_both_count() {
    // The driver handles every completion of a turn (here a SIGTERM), then the deadlines, and
    // only then carries out the actions: the deadline must not replace the held shutdown.
    let mut h = handing_over();
    h.m.handle(Event::ShutdownRequested, h.now);
    h.now += TIMEOUTS.ready;
    h.m.handle_timeout(h.now);
    assert_eq!(h.m.poll_action(), Some(ReadSuccessor));
    assert_eq!(h.m.poll_action(), None);
    h.m.handle(Event::SuccessorRead, h.now);
    let actions: Vec<Action> = std::iter::from_fn(|| h.m.poll_action()).collect();
    assert_eq!(
        actions,
        vec![
            abandon(CHILD),
            failed(REQ, f_shutdown()),
            pc(P::Draining),
            StopAccepting,
            drain_shutdown()
        ],
        "the shutdown, not a rollback to Serving"
    );
    // Two stops in one turn: the second still cuts the drain short.
    let mut h = handing_over();
    h.m.handle(Event::ShutdownRequested, h.now);
    h.m.handle(Event::ShutdownRequested, h.now);
    assert_eq!(h.m.poll_action(), Some(ReadSuccessor));
    h.m.handle(Event::SuccessorRead, h.now);
    assert_eq!(h.drain().last(), Some(&exit_shutdown()));
}
