use std::io;

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
    Failed(String),
    /// Another upgrade is in flight, or this process is no longer the one serving.
    #[error("upgrade refused: {0}")]
    Busy(String),
    /// The server stopped before answering.
    #[error("the server is not running")]
    NotRunning,
}
