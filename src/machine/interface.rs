//! What goes into and out of the upgrade machine: the phases, the events the driver observes,
//! the actions it must carry out, and the values they carry.

use std::fmt;
use std::time::Duration;

use crate::error::{Refusal, UpgradeFailure};

/// The phase of a serving process in its upgrade lifecycle.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Phase {
    /// Accepting connections; no upgrade in flight.
    Serving,
    /// An upgrade was requested and the new binary is being started.
    Forking,
    /// The new process runs and has (or is being sent) the listeners; waiting for its READY.
    /// This process still accepts.
    HandingOver,
    /// This process stopped accepting and waits for its live connections to finish.
    Draining,
    /// Done: the caller should let the process exit.
    Exited,
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// Identifies one upgrade attempt; the child must echo it in its READY.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct UpgradeId(pub u64);

impl fmt::Display for UpgradeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// Who asked for an upgrade, so the outcome reaches them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Requester {
    /// SIGHUP: nobody to answer but the log.
    Signal,
    /// An API call waiting on a reply; the number is the driver's ticket.
    Api(u64),
}

/// How an upgrade request ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The new process is READY and serves; this one drains.
    Upgraded { pid: u32 },
    /// The upgrade failed; this process keeps serving.
    Failed(UpgradeFailure),
    /// Refused: another upgrade is in flight, or this process is no longer the one serving.
    Busy(Refusal),
}

/// Why the process is draining.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum DrainCause {
    /// A successor is READY and serving.
    Upgraded { child: u32, upgrade: UpgradeId },
    /// SIGTERM/SIGINT or an API shutdown.
    Shutdown,
}

/// Why the run loop ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ExitReason {
    /// A new process took over and this one finished draining.
    Upgraded {
        /// The pid of the process that now serves.
        successor: u32,
    },
    /// Shut down on request.
    Shutdown,
}

/// What the driver observed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Event {
    UpgradeRequested(Requester),
    /// The new binary of the upgrade in flight runs. The driver spawns on another thread and
    /// feeds this (or `SpawnFailed`) only if that upgrade is still the one in flight (in
    /// `Forking`); a child started for an upgrade given up meanwhile is killed by the driver.
    SuccessorSpawned {
        pid: u32,
    },
    SpawnFailed(String),
    ListenersSent,
    /// The handoff message could not be sent (the child closed the channel, …).
    HandoffFailed(String),
    /// The child refused the handoff: it speaks no protocol version this process speaks.
    HandoffRefused {
        ours: crate::protocol::ProtocolVersions,
        theirs: crate::protocol::ProtocolVersions,
    },
    SuccessorReady(UpgradeId),
    /// The child said something that is not a valid message, or closed the channel early.
    SuccessorMessageInvalid(String),
    /// The successor is handing over to its own successor or shutting down: its exit is planned.
    SuccessorRetired,
    /// The successor serves again after its own successor died (`SERVING`): it withdraws its
    /// RETIRING, so its exit would again be a crash.
    SuccessorResumed,
    SuccessorExited {
        pid: u32,
        status: String,
    },
    /// How many older generations are still alive (draining), as counted just now.
    EldersDraining(u32),
    /// Every accept reached its terminal completion; every fd it produced was served.
    AcceptStopped,
    /// The application will take no more connections: it shut its server down for the drain
    /// (axum's graceful shutdown is one-shot). Commits the drain with this number
    /// (`Machine::drains_started` when it began): it never resumes, so no connection is
    /// accepted for an application that no longer takes them. Ignored for another drain.
    #[cfg_attr(not(feature = "axum"), allow(dead_code))]
    DrainCommitted(u64),
    /// The predecessor let go of the accept queues (its RELEASED, or its exit).
    PredecessorLetGo,
    /// The answer to `ReadSuccessor`: everything the successor had sent was fed.
    SuccessorRead,
    /// The answer to `CheckSuccessor`: whether that process still runs.
    SuccessorChecked {
        pid: u32,
        alive: bool,
    },
    /// The live connection count reached zero while draining.
    ConnectionsDrained,
    ShutdownRequested,
    /// The predecessor stopped this process before it saw its READY (a SIGTERM sent by the
    /// predecessor: its ready deadline, its own shutdown). A shutdown, but never a second one:
    /// a process already draining (say, told to stop by systemd at the same moment) keeps
    /// draining instead of taking it for an impatient operator's second signal.
    PredecessorGaveUp,
}

/// What the driver must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Action {
    /// Start the new binary for this upgrade; answer with `SuccessorSpawned` or `SpawnFailed`.
    SpawnSuccessor(UpgradeId),
    /// Hand everything over to the child (the version negotiation, HELLO, every fd, the
    /// state); answer with `ListenersSent` once all of it is sent, or `HandoffFailed` or
    /// `HandoffRefused`.
    SendListeners(UpgradeId),
    /// Cancel every accept and reap until their terminal completions; answer with `AcceptStopped`.
    StopAccepting,
    /// Re-arm every accept (a rollback after handover).
    ResumeAccepting,
    /// Count live connections from now on; answer with `ConnectionsDrained` at zero. The cause
    /// says what to tell the others: a shutdown is announced to systemd (`STOPPING=1`), an
    /// upgrade is not (the successor is the main process now).
    StartDrain(DrainCause),
    /// Stop counting: connections are served normally again.
    StopDrain,
    /// Stop the child (if it still runs) as `stop` says, close its channel; the driver reaps
    /// it.
    AbandonSuccessor { pid: u32, stop: Stop },
    /// Look whether the successor still runs (its pidfd); answer with `SuccessorChecked`.
    CheckSuccessor(u32),
    /// Feed what the successor sent and was not read yet, then answer `SuccessorRead`. Asked
    /// before a decision in HandingOver that a READY on the channel would change (a shutdown,
    /// the ready deadline): a READY already sent is a READY in time, and the successor then
    /// keeps serving instead of being stopped with what it took.
    ReadSuccessor,
    /// Tell the requester how its upgrade ended.
    Reply(Requester, Outcome),
    /// Phase changed; for observers and logs.
    PhaseChanged(Phase),
    /// The run loop should end.
    Exit(ExitReason),
}

/// How an abandoned child is stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Stop {
    /// It never got the listeners (they were never sent, or the send failed): nothing of the
    /// service's is in its hands, SIGKILL.
    Kill,
    /// The listeners were sent (from HandingOver on: the HELLO may reach it before this
    /// process has seen its own send complete), so it may have armed its accepts: its first
    /// accept takes what is queued, before it sends READY. A SIGKILL would reset those
    /// connections, so SIGTERM: a ringflip process drains them and exits. SIGKILL only if it
    /// has not exited after the drain deadline (the driver's escalation).
    Terminate,
}

/// Tunables the machine needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Timeouts {
    /// From the upgrade request to READY (starting the binary included).
    pub ready: Duration,
    /// From the start of the drain to exit.
    pub drain: Duration,
}
