//! Zero-downtime binary upgrades for Linux network services, on io_uring.
//!
//! A service names its listeners and serves the connections ringflip accepts. On SIGHUP (or
//! the signal [`Builder::upgrade_signal`] names, or [`Handle::upgrade`]) the running process
//! starts its new binary, hands it the listening sockets, keeps accepting until the new
//! process says it is READY, then stops accepting, drains its live connections and returns
//! from [`Server::run`], so the service can exit.
//!
//! # Guarantees
//! - **No connection is refused, reset or lost by an upgrade.** Both processes accept on the
//!   *same* sockets; the old one accepts until the new one is READY, then cancels its accepts
//!   and serves every connection that completed before the cancel. Connections not yet accepted
//!   wait in the kernel's backlog for the new process; if the old process has not let go 1 ms
//!   after READY (a busy runtime thread), the new one takes connections alongside it.
//! - **A failed upgrade changes nothing.** If the new binary is missing, crashes, says something
//!   unexpected or is not READY in time, the old process stops and reaps it (SIGTERM once it
//!   may hold connections, so it drains them) and keeps serving; it never stopped accepting.
//!   If the new process dies while the old one still drains, the old one re-arms its accepts
//!   and serves again.
//! - **Nothing blocks the accept loop.** One io_uring carries the accepts, the handoff, the
//!   READY handshake, the child's exit, the deadlines and the triggers; the new binary starts
//!   with a vfork, not `fork`, so a large process does not stall while its page tables are
//!   copied, nor while its fd table is (the child keeps only a few low fds), and on a thread of
//!   its own (a vfork suspends its caller until the exec).
//! - **Nothing leaks into the new process**: it starts with stdin, stdout, stderr and the one
//!   handoff socket, nothing else, whatever the old process holds.
//!
//! # Lifecycle
//! ```text
//!             upgrade requested
//!  Serving ───────────────────────► Forking ──spawned──► HandingOver ──child READY──► Draining ──drained or deadline──► Exited
//!     ▲                                │                     │                          │
//!     └──────── spawn failed ──────────┘                     │                          │
//!     └──── child exited / bad message / ready deadline ─────┘                          │
//!     └──── successor died during the drain (re-arm the accepts) ───────────────────────┘
//! ```
//! SIGTERM or SIGINT (or [`Handle::shutdown`]) goes from any phase to `Draining`, then `Exited`.
//!
//! # Kernel
//! Linux 6.1 or later: multishot accept (5.19) and a `SINGLE_ISSUER | DEFER_TASKRUN` ring (6.1),
//! with which connections the process has not reaped yet stay in the kernel backlog if it dies.
//! Where io_uring is refused (a container's default seccomp profile, the sysctl
//! `kernel.io_uring_disabled`, an older kernel), [`Builder::build`] fails with
//! [`Error::Unsupported`] naming the likely cause; nothing is bound.
//!
//! # Example
//! ```no_run
//! use std::io::{BufRead, BufReader, Write};
//!
//! fn main() -> Result<(), ringflip::Error> {
//!     let server = ringflip::Server::builder()
//!         .listen_tcp("echo", "127.0.0.1:7000".parse().unwrap())
//!         .pid_file("/tmp/echo.pid")
//!         .build()?; // inherits the socket after an upgrade, binds it on first start
//!     let exit = server.run(|conn| {
//!         std::thread::spawn(move || {
//!             let stream = conn.into_std(); // owns the guard that keeps the drain waiting
//!             let mut reader = BufReader::new(stream.try_clone().unwrap());
//!             let mut writer = stream;
//!             let mut line = String::new();
//!             while reader.read_line(&mut line).map_or(false, |n| n > 0) {
//!                 if writer.write_all(line.as_bytes()).is_err() { break; }
//!                 line.clear();
//!             }
//!         });
//!     })?;
//!     eprintln!("done: {exit:?}");
//!     Ok(())
//! }
//! ```
// `unsafe` is opted back in per file, only where the kernel's interface needs it: the ring
// (`driver/ring.rs`: SQEs and CQEs), fds that come from outside (`inherit.rs`: SCM_RIGHTS;
// `systemd.rs`: LISTEN_FDS), plain syscalls (`sys.rs`), the signal handler (`signals.rs`), the
// runtime's registration of a borrowed fd (`driver/runtime.rs`), and tests.
#![deny(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]
// Inside the crate, `pub` means the public API: everything else is `pub(crate)` or narrower.
#![warn(unreachable_pub)]

// Everything here is Linux's: io_uring, pidfd, signalfd, SO_PEERCRED, abstract Unix sockets.
#[cfg(not(target_os = "linux"))]
compile_error!(
    "ringflip supports Linux only (kernel 6.1 or later): it hands sockets over with io_uring, \
     pidfd and signalfd, which other systems do not have"
);

mod access;
mod boot;
mod connection;
mod control;
pub mod control_client;
mod driver;
mod error;
mod fault;
mod handle;
mod handoff;
#[cfg(feature = "http")]
#[cfg_attr(docsrs, doc(cfg(feature = "http")))]
pub mod http;
mod inherit;
mod kernel;
mod launch;
mod listener;
mod machine;
mod pidfile;
mod protocol;
mod server;
mod shared;
mod signals;
mod spawn;
mod stream;
mod sys;
mod systemd;
mod wake_set;
mod workers;

pub use connection::{Connection, DrainGuard, Guarded};
pub use error::{Error, Refusal, UpgradeError, UpgradeFailure};
pub use handle::{Handle, PhaseWatch};
pub use handoff::{MAX_LISTENERS, MAX_STATE_LEN};
pub use inherit::StateReader;
pub use machine::{ExitReason, Phase};
pub use protocol::ProtocolVersions;
#[cfg(feature = "tokio")]
#[cfg_attr(docsrs, doc(cfg(feature = "tokio")))]
pub use server::Ring;
pub use server::{Builder, Server, Worker};
pub use signals::{StopSignal, UpgradeSignal};
/// The socket crate of [`Builder::listen_tcp_with`], re-exported so the versions match.
pub use socket2;
pub use stream::Socket;
#[cfg(feature = "tokio")]
#[cfg_attr(docsrs, doc(cfg(feature = "tokio")))]
pub use stream::TokioStream;

// The snippets of docs/ADOPTING.md compile (`cargo test --doc`).
#[cfg(doctest)]
#[doc = include_str!("../docs/ADOPTING.md")]
struct AdoptingDoctests;

/// Entry points for the fuzz targets in `fuzz/`; not part of the API.
#[doc(hidden)]
pub mod __fuzz {
    /// Decodes `bytes` as a handoff message; if that succeeds, checks that encoding the result
    /// gives `bytes` back (the decoder accepts exactly one encoding per message).
    pub fn decode_and_reencode(bytes: &[u8]) {
        if let Ok(message) = crate::handoff::Message::decode(bytes) {
            let again = message
                .encode()
                .expect("a decoded message is within bounds");
            assert_eq!(again, bytes, "decode then encode changed the bytes");
        }
    }
}

/// The README's code blocks, compiled as doctests so they cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
