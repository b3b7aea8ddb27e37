//! The echo server on a plain tokio runtime: `Server::run_async` runs the upgrade ring as a task
//! of a current-thread runtime (on a `LocalSet`), and each connection becomes a
//! `ringflip::TokioStream` (owning its drain guard) on the same thread. Same options and signals as `examples/echo.rs`.
//!
//! ```text
//! cargo run --release --example echo_tokio -- --listen 127.0.0.1:7000 --pid-file /tmp/echo.pid
//! ```
//!
//! The serving code is `echo_tokio` in `examples/support/echo_server.rs`; in short:
//!
//! ```ignore
//! let server = ringflip::Server::builder().listen_tcp("echo", addr).build()?;
//! let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
//! tokio::task::LocalSet::new().block_on(&rt, server.run_async(|conn| {
//!     tokio::task::spawn_local(async move {
//!         let stream = conn.into_tokio().unwrap(); // owns the drain guard
//!         // serve `stream` (AsyncRead + AsyncWrite); the drain waits until it is dropped
//!     });
//! }))?;
//! ```

use std::process::ExitCode;

mod support;

fn main() -> ExitCode {
    support::echo_server::main(
        std::env::args().skip(1),
        support::echo_server::Runtime::Tokio,
    )
}
