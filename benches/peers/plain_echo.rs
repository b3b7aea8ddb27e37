//! A plain tokio echo server with no upgrade library: the baseline for "naive restart" (SIGTERM
//! the old process, then start a new one) and "reuseport restart" (start a new one with
//! `--reuseport` on the same port, wait for its pid file, then SIGTERM the old one).
//!
//! - `--reuseport` sets SO_REUSEPORT before bind. For the reuseport strategy *every* generation,
//!   the first one included, must be started with it: the kernel lets a second socket bind the
//!   port only if all of them have the option set (and the same uid).
//! - SIGHUP is ignored (SIG_IGN): this server cannot upgrade itself.
//! - SIGTERM closes the listener, waits for live connections (or `--drain-timeout-ms`), exits 0.
//!   With SO_REUSEPORT, connections that the kernel already queued on the closed listener's own
//!   accept queue are reset: that is the known cost of this strategy, left as is on purpose.
//!
//! Runtime: current-thread. There is no library example to follow; one thread is what our own
//! echo server (tokio-uring, one thread) and the ecdysis peer use, so the baseline is not given
//! a second core the others do not use.

use std::process::ExitCode;

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

use super::Args;

/// Runs the plain echo server with command-line arguments `argv` (without the program name).
pub fn main(argv: impl Iterator<Item = String>) -> ExitCode {
    // SAFETY: setting a signal's disposition to SIG_IGN, before any other thread exists.
    unsafe { libc::signal(libc::SIGHUP, libc::SIG_IGN) };
    super::run_peer(
        "plain_echo",
        argv,
        true,
        tokio::runtime::Builder::new_current_thread(),
        serve,
    )
}

async fn serve(args: Args) -> ExitCode {
    let mut listeners = Vec::new();
    for addr in &args.listen {
        match super::bind(*addr, args.reuseport) {
            Ok(l) => listeners.push(l),
            Err(e) => {
                tracing::error!(%addr, error = %e, "cannot listen");
                return ExitCode::from(1);
            }
        }
    }
    let mut sigterm = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot handle SIGTERM");
            return ExitCode::from(1);
        }
    };

    let (conns, drain) = super::conns();
    let (stop_tx, stop_rx) = watch::channel(false);
    let accepting: Vec<_> = listeners
        .into_iter()
        .map(|l| {
            let conns = conns.clone();
            tokio::spawn(super::accept_until(l, stop_rx.clone(), move |s| {
                conns.spawn_echo(s)
            }))
        })
        .collect();
    drop(conns);

    // Ready: listening, signal handlers in place.
    if let Some(path) = &args.pid_file {
        if let Err(e) = super::write_pid_file(path) {
            tracing::error!(path = %path.display(), error = %e, "cannot write the pid file");
            return ExitCode::from(1);
        }
    }
    tracing::info!(pid = std::process::id(), listen = ?args.listen, "serving");

    sigterm.recv().await;
    tracing::info!("SIGTERM: closing the listeners, draining");
    let _ = stop_tx.send(true);
    for task in accepting {
        let _ = task.await;
    }
    match drain.wait(args.drain_timeout).await {
        Ok(()) => tracing::info!("drained, exiting"),
        Err(live) => tracing::warn!(live, "drain timeout, exiting"),
    }
    ExitCode::SUCCESS
}
