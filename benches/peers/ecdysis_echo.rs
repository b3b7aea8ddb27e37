//! The echo server, upgraded with cloudflare's `ecdysis` (1.x, feature `tokio_ecdysis`).
//!
//! How ecdysis is used, following its crate docs and its `tokio_echo` example:
//!
//! - Trigger: `TokioEcdysisBuilder::new(SignalKind::hangup())` makes SIGHUP the upgrade signal;
//!   `stop_on_signal(SignalKind::terminate())` makes SIGTERM a graceful stop. On SIGHUP ecdysis
//!   fork/execs `argv[0]` with the same arguments from a thread of its own, passing the
//!   listening sockets it registered (inherited fds, listed over a pipe).
//! - Sockets: `build_listen_tcp` creates the listener (SO_REUSEADDR, backlog [`BACKLOG`]) or, in
//!   an upgraded process, returns the one inherited for the same address. It comes back as a
//!   `StoppableStream` of connections that ecdysis ends on upgrade or stop.
//! - Readiness: `TokioEcdysisBuilder::ready()` writes the pid file (ecdysis's own
//!   `set_pid_file`: temp file + rename, the pid *without* a trailing newline) and then tells the
//!   old process over the readiness pipe. The old process waits up to 5 s (fixed in ecdysis) for
//!   that; a new process that exits or does not become ready in time is killed, the old one
//!   rewrites the pid file with its own pid and keeps serving.
//! - Drain: when the upgrade (or stop) completes, ecdysis ends the connection streams; this
//!   process then drops its listeners and waits for its connections (counted by us, as the
//!   example does with a wait group) up to `--drain-timeout-ms`, then exits 0. The old process
//!   learns that the upgrade succeeded only after ecdysis's child watcher wakes (it polls every
//!   500 ms), so it may accept for up to ~0.5 s after the new process is ready; both accept
//!   from the same inherited socket meanwhile, so nothing is lost.
//!
//! Runtime: current-thread, as in the `tokio_echo` example (`#[tokio::main(flavor =
//! "current_thread")]`); the upgrade itself runs on a thread ecdysis spawns.
//!
//! [`BACKLOG`]: super::BACKLOG

use std::io;
use std::process::ExitCode;
use std::time::Duration;

use ecdysis::tokio_ecdysis::{ExitMode, SignalKind, StopOnShutdown, TokioEcdysisBuilder};
use futures::{Stream, StreamExt};
use tokio::net::TcpStream;

use super::{Args, Conns};

/// Runs the ecdysis echo server with command-line arguments `argv` (without the program name).
/// Upgrades re-execute `argv[0]` of this process with the same arguments.
pub fn main(argv: impl Iterator<Item = String>) -> ExitCode {
    super::run_peer(
        "ecdysis_echo",
        argv,
        false,
        tokio::runtime::Builder::new_current_thread(),
        serve,
    )
}

/// Accepts from `stream` until ecdysis ends it, then drops it (closing this process's
/// listener).
async fn accept_all(mut stream: impl Stream<Item = io::Result<TcpStream>> + Unpin, conns: Conns) {
    while let Some(r) = stream.next().await {
        match r {
            Ok(s) => conns.spawn_echo(s),
            Err(e) => {
                // EMFILE and the like: the connection waits in the backlog; back off.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    drop(stream);
}

async fn serve(args: Args) -> ExitCode {
    let mut builder = match TokioEcdysisBuilder::new(SignalKind::hangup()) {
        Ok(b) => b,
        Err(e) => {
            tracing::error!(error = %e, "cannot set up ecdysis");
            return ExitCode::from(1);
        }
    };
    if let Err(e) = builder.stop_on_signal(SignalKind::terminate()) {
        tracing::error!(error = %e, "cannot handle SIGTERM");
        return ExitCode::from(1);
    }
    if let Some(path) = &args.pid_file {
        builder.set_pid_file(path);
    }
    let (conns, drain) = super::conns();
    let mut accepting = Vec::new();
    for addr in &args.listen {
        let stream = builder.build_listen_tcp(StopOnShutdown::Yes, *addr, |sock, addr| {
            sock.set_reuse_address(true)?;
            sock.bind(&addr.into())?;
            sock.listen(super::BACKLOG as i32)?;
            Ok(sock.into())
        });
        match stream {
            Ok(s) => accepting.push(tokio::spawn(accept_all(s, conns.clone()))),
            Err(e) => {
                tracing::error!(%addr, error = %e, "cannot listen");
                return ExitCode::from(1);
            }
        }
    }
    drop(conns);

    // Writes the pid file, then tells the old process (if any) to stop accepting.
    let (_ecdysis, exit) = match builder.ready() {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "cannot signal readiness");
            return ExitCode::from(1);
        }
    };
    tracing::info!(pid = std::process::id(), listen = ?args.listen, "serving");

    let code = match exit.await {
        Ok((mode, reason)) => {
            match mode {
                ExitMode::Upgrade => tracing::info!(?reason, "upgraded: draining"),
                _ => tracing::info!(?mode, ?reason, "stopping: draining"),
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            // ecdysis gave up (its upgrade thread or a trigger failed); stop as for SIGTERM.
            tracing::error!(error = %e, "ecdysis failed: draining");
            for task in &accepting {
                task.abort();
            }
            ExitCode::from(1)
        }
    };
    // The streams have ended: wait for the loops to drop them (stop accepting).
    for task in accepting {
        let _ = task.await;
    }
    match drain.wait(args.drain_timeout).await {
        Ok(()) => tracing::info!("drained, exiting"),
        Err(live) => tracing::warn!(live, "drain timeout, exiting"),
    }
    code
}
