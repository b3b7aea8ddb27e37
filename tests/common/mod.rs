//! Shared helpers for the process-level integration tests, one module per job:
//!
//! * [`proc`]: process hygiene: the test process becomes a child subreaper, every pid it learns
//!   is tracked (with its start time, so a recycled pid is never signalled), and a guard
//!   SIGKILLs and reaps whatever is still alive when a server handle is dropped;
//! * [`spawn`]: children started with only fds 0-2, never while an executable is being written;
//! * [`fs`]: temp dirs, the example binaries, replacing a binary, a log's tail;
//! * [`fds`]: a process's fd table from /proc;
//! * [`echo`]: [`EchoServer`] runs a private copy of `target/debug/examples/echo` (or of another
//!   example with its command-line contract, `EchoOpts::binary`: `examples/http.rs`) in a temp
//!   dir and drives upgrades, rollbacks and shutdown;
//! * [`client`]: one connection: connect, echo a line, classify a failure ([`FailKind`]);
//! * [`load`]: [`Load`], the one client load generator (closed loop, long-lived pingers, bursts,
//!   recorded samples), every failure counted by kind.
//!
//! Only std + libc. Environment knobs:
//! * `RINGFLIP_ECHO_BIN=/path` overrides the echo binary (used to check the harness itself);
//! * `RINGFLIP_KEEP_TEMP=1` keeps the temp dirs (server log, scripts) for inspection.

// Every integration test is a crate of its own that compiles this harness whole and uses a
// different part of it (13 tests, and each item is unused by at least one of them), so
// dead_code and the re-exports' unused_imports are allowed here, at the module declarations.
// Nothing is dead for all of them: compile the tests without these allows and intersect the
// dead_code warnings over the test crates to check.
#[allow(dead_code)]
mod client;
#[allow(dead_code)]
mod echo;
#[allow(dead_code)]
mod fds;
#[allow(dead_code)]
mod fs;
#[allow(dead_code)]
mod load;
#[allow(dead_code)]
mod proc;
#[allow(dead_code)]
mod spawn;

#[allow(unused_imports)]
pub use client::*;
#[allow(unused_imports)]
pub use echo::*;
#[allow(unused_imports)]
pub use fds::*;
#[allow(unused_imports)]
pub use fs::*;
#[allow(unused_imports)]
pub use load::*;
#[allow(unused_imports)]
pub use proc::*;
#[allow(unused_imports)]
pub use spawn::*;
