//! The echo server without a runtime: `Server::run` drives the upgrade ring on the main thread
//! and hands each connection (a std socket that owns its drain guard) to a thread of its own. Same options and
//! signals as `examples/echo.rs`.
//!
//! ```text
//! cargo run --release --example echo_blocking -- --listen 127.0.0.1:7000 --pid-file /tmp/echo.pid
//! ```
//!
//! The serving code is `echo_blocking` in `examples/support/echo_server.rs`; in short:
//!
//! ```ignore
//! let server = ringflip::Server::builder().listen_tcp("echo", addr).build()?;
//! server.run(|conn| {
//!     std::thread::spawn(move || {
//!         let stream = conn.into_std(); // a `Guarded<Socket>`: it owns the drain guard
//!         // serve `stream` (Read + Write); the drain waits until it is dropped
//!     });
//! })?;
//! ```

use std::process::ExitCode;

mod support;

fn main() -> ExitCode {
    support::echo_server::main(
        std::env::args().skip(1),
        support::echo_server::Runtime::Blocking,
    )
}
