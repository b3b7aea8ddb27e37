use std::io;

use crate::protocol::ProtocolVersions;

/// Errors from setting up or running a [`Server`](crate::Server).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A listener could not be bound on first start.
    #[error("listener {name:?}: cannot bind {addr}: {source}")]
    Bind {
        /// The listener's name.
        name: String,
        /// The address asked for (`127.0.0.1:80`, `/run/app.sock`, `@abstract-name`).
        addr: String,
        /// What the kernel said.
        source: io::Error,
    },
    /// This process was started as a successor, but the handoff from the parent failed. The
    /// process must exit: the parent sees that and keeps serving.
    #[error("handoff from the previous process failed: {0}")]
    Handoff(String),
    /// Started as a successor, but the previous process gave up on this upgrade before it had
    /// handed everything over (it was told to stop, or its ready timeout passed: it closed
    /// the channel and asked this process to stop). Nothing was adopted; the previous process
    /// serves on or is stopping. This process should exit; this is not a fault of its own.
    #[error(
        "the previous process gave up on this upgrade before the handoff was complete, and \
         asked this process to stop"
    )]
    Abandoned,
    /// Started as a successor of a process that speaks no handoff protocol version this one
    /// speaks: this process refused the handoff (the parent was told, and keeps serving) and
    /// must exit.
    #[error(
        "the previous process speaks handoff protocol versions {theirs}, this build speaks \
         {ours}: no common version"
    )]
    IncompatibleProtocol {
        /// The versions this process speaks.
        ours: ProtocolVersions,
        /// The versions the previous process speaks.
        theirs: ProtocolVersions,
    },
    /// The previous process handed over `len` bytes of state and the application read only
    /// `read` of them before [`Server::run`](crate::Server::run): what it did not read would be
    /// lost, so the upgrade fails (this process must exit, the previous one keeps serving).
    #[error(
        "the previous process handed over {len} bytes of state; {read} were read before run \
         (read all of it with Server::inherited_state_reader)"
    )]
    StateNotRead {
        /// Bytes the application read.
        read: u64,
        /// Bytes the previous process sent.
        len: u64,
    },
    /// A listener expected from the parent is missing (never silently re-bound).
    #[error("listener {name:?} was not handed over by the previous process")]
    MissingListener {
        /// The listener's name.
        name: String,
    },
    /// A socket handed over by the parent is not what it should be.
    #[error("listener {name:?}: {why}")]
    InvalidListener {
        /// The listener's name.
        name: String,
        /// What is wrong with it.
        why: String,
    },
    /// The configuration is unusable (duplicate names, too many listeners, …).
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The kernel lacks something ringflip needs (io_uring, an opcode, a ring flag).
    #[error("unsupported kernel: {0}")]
    Unsupported(String),
    /// An I/O error in the driver.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: &'static str,
        /// What the kernel said.
        source: io::Error,
    },
}

/// For `main` functions and callers that speak `std::io::Error` (`fn main() ->
/// std::io::Result<()>` with `?` on `build()` and `run()`): the kind of an I/O error is kept,
/// the rest is `Other`, with this error as the source.
impl From<Error> for io::Error {
    fn from(e: Error) -> io::Error {
        let kind = match &e {
            Error::Io { source, .. } | Error::Bind { source, .. } => source.kind(),
            _ => io::ErrorKind::Other,
        };
        io::Error::new(kind, e)
    }
}

/// Why an upgrade failed. This process never stopped accepting and still serves; the new
/// process, if it ran, was stopped and reaped. [`UpgradeFailure::code`] names the case in a
/// word that scripts can match (the control socket answers `failed: <code>: <reason>`).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum UpgradeFailure {
    /// The new binary could not be started (missing, not executable, or the spawn failed).
    #[error("could not start the new binary: {0}")]
    Spawn(String),
    /// Starting the new binary took longer than the ready timeout.
    #[error("the new binary did not start within {timeout_ms} ms")]
    StartTimeout {
        /// The ready timeout.
        timeout_ms: u64,
    },
    /// The listeners could not be sent to the new process.
    #[error("could not hand the listeners over: {0}")]
    Handoff(String),
    /// The new binary speaks no handoff protocol version this process speaks (it refused the
    /// handoff and exits).
    #[error(
        "the new binary speaks handoff protocol versions {theirs}, this process speaks {ours}: \
         no common version"
    )]
    IncompatibleProtocol {
        /// The versions this process speaks.
        ours: ProtocolVersions,
        /// The versions the new binary speaks.
        theirs: ProtocolVersions,
    },
    /// The new process was not READY within the ready timeout.
    #[error("new process {pid} was not ready within {timeout_ms} ms")]
    ReadyTimeout {
        /// The new process.
        pid: u32,
        /// The ready timeout.
        timeout_ms: u64,
    },
    /// The new process answered READY for another upgrade (another generation's binary, or
    /// a confused one).
    #[error("new process answered READY for upgrade {got:016x}, expected {expected:016x}")]
    WrongUpgrade {
        /// The upgrade id it sent (the logs print ids in hex).
        got: u64,
        /// The upgrade id of this upgrade.
        expected: u64,
    },
    /// The new process sent something that is not a valid message, or closed the channel.
    #[error("new process {pid}: {why}")]
    InvalidMessage {
        /// The new process.
        pid: u32,
        /// What was wrong.
        why: String,
    },
    /// The new process exited before READY.
    #[error("new process {pid} exited before READY: {status}")]
    ExitedBeforeReady {
        /// The new process.
        pid: u32,
        /// How it ended (`exit status 1`, `signal 9`, …).
        status: String,
    },
    /// A shutdown was requested while the upgrade was in flight.
    #[error("shutdown requested")]
    Shutdown,
}

impl UpgradeFailure {
    /// A stable word for the case: `spawn`, `start-timeout`, `handoff`, `ready-timeout`,
    /// `wrong-upgrade`, `invalid-message`, `exited`, `shutdown`.
    pub fn code(&self) -> &'static str {
        match self {
            UpgradeFailure::Spawn(_) => "spawn",
            UpgradeFailure::StartTimeout { .. } => "start-timeout",
            UpgradeFailure::Handoff(_) => "handoff",
            UpgradeFailure::IncompatibleProtocol { .. } => "incompatible-protocol",
            UpgradeFailure::ReadyTimeout { .. } => "ready-timeout",
            UpgradeFailure::WrongUpgrade { .. } => "wrong-upgrade",
            UpgradeFailure::InvalidMessage { .. } => "invalid-message",
            UpgradeFailure::ExitedBeforeReady { .. } => "exited",
            UpgradeFailure::Shutdown => "shutdown",
        }
    }
}

/// Why an upgrade request was refused; nothing was started.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    /// Another upgrade is in flight.
    #[error("an upgrade is already in flight")]
    InFlight,
    /// As many older generations as `Builder::max_draining_generations` allows still drain.
    #[error("too many older generations are still draining")]
    TooManyDraining,
    /// This process was upgraded already and drains: ask the new one.
    #[error("this process was upgraded and is draining")]
    Upgraded,
    /// This process is shutting down.
    #[error("this process is shutting down")]
    ShuttingDown,
    /// This process's server has exited.
    #[error("this process has exited")]
    Exited,
}

impl Refusal {
    /// A stable word for the case: `in-flight`, `too-many-draining`, `upgraded`,
    /// `shutting-down`, `exited`.
    pub fn code(&self) -> &'static str {
        match self {
            Refusal::InFlight => "in-flight",
            Refusal::TooManyDraining => "too-many-draining",
            Refusal::Upgraded => "upgraded",
            Refusal::ShuttingDown => "shutting-down",
            Refusal::Exited => "exited",
        }
    }
}

impl Error {
    pub(crate) fn io(context: &'static str) -> impl FnOnce(io::Error) -> Error {
        move |source| Error::Io { context, source }
    }
}

/// Why an upgrade requested through a [`Handle`](crate::Handle) did not happen.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum UpgradeError {
    /// The new process did not start, failed, or was not ready in time. This process still
    /// serves.
    #[error("upgrade failed: {0}")]
    Failed(UpgradeFailure),
    /// Another upgrade is in flight, or this process is no longer the one serving.
    #[error("upgrade refused: {0}")]
    Busy(Refusal),
    /// The server stopped before answering.
    #[error("the server is not running")]
    NotRunning,
    /// The blocking [`Handle::upgrade`](crate::Handle::upgrade) was called on a thread that
    /// runs one of this server's rings (the thread of `run`, or of the runtime that awaits
    /// `run_async`): it would wait for an answer that only this thread can give. Nothing was
    /// requested; from inside the runtime, use `Handle::upgrade_async`.
    #[error(
        "upgrade() called on the server's own thread, which it would deadlock; use upgrade_async"
    )]
    OnServerThread,
}
