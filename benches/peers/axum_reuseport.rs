//! A plain axum HTTP server with no upgrade library, restarted the usual naive zero-downtime
//! way: start a new process beside the old one on a SO_REUSEPORT socket of the same port, wait
//! until it serves (its pid file), then SIGTERM the old one, which runs axum's graceful shutdown
//! (`axum::serve(..).with_graceful_shutdown(..)`: it stops accepting, closes idle keep-alive
//! connections, lets requests in flight finish, sends HTTP/2 GOAWAY) and exits once its
//! connections are gone (or at `--drain-timeout-ms`). The HTTP rows' baseline in
//! `benches/http_upgrade.rs` (`Strategy::ReusePort` of `examples/support/scenario.rs`).
//!
//! Routes as `examples/http.rs`: `GET /` (`hello from <pid>`) and `POST /echo`. Multi-thread
//! tokio runtime, as ringflip's HTTP example (`Runtime::new()`), so each gets the same threads
//! (one worker when pinned to one CPU). Every `--listen` address is bound with SO_REUSEPORT
//! (always: the first generation too, or the second could not bind), SO_REUSEADDR and a
//! backlog of [`super::BACKLOG`]. Connections the kernel already queued on the old process's
//! listener when it closes are reset: the known cost of this approach, left as is.

use std::process::ExitCode;

use axum::body::Bytes;
use axum::routing::{get, post};
use axum::Router;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

use super::Args;

/// `--serve axum-reuseport ARGS…`.
pub fn main(argv: impl Iterator<Item = String>) -> ExitCode {
    // SAFETY: setting a signal's disposition to SIG_IGN, before any other thread exists.
    unsafe { libc::signal(libc::SIGHUP, libc::SIG_IGN) };
    // Every generation must set SO_REUSEPORT, so the option is implied.
    let argv = argv.chain(std::iter::once("--reuseport".to_owned()));
    super::run_peer(
        "axum_reuseport",
        argv,
        true,
        tokio::runtime::Builder::new_multi_thread(),
        serve,
    )
}

fn app() -> Router {
    Router::new()
        .route(
            "/",
            get(|| async { format!("hello from {}\n", std::process::id()) }),
        )
        .route("/echo", post(|body: Bytes| async move { body }))
}

async fn serve(args: Args) -> ExitCode {
    let mut sigterm = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot handle SIGTERM");
            return ExitCode::from(1);
        }
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut servers = Vec::new();
    for addr in &args.listen {
        let listener = match super::bind(*addr, args.reuseport) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(%addr, error = %e, "cannot listen");
                return ExitCode::from(1);
            }
        };
        let mut stop = stop_rx.clone();
        let shutdown = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        let server = axum::serve(listener, app()).with_graceful_shutdown(shutdown);
        servers.push(tokio::spawn(async move { server.await }));
    }
    // Ready: listening, the SIGTERM handler in place.
    if let Some(path) = &args.pid_file {
        if let Err(e) = super::write_pid_file(path) {
            tracing::error!(path = %path.display(), error = %e, "cannot write the pid file");
            return ExitCode::from(1);
        }
    }
    tracing::info!(pid = std::process::id(), listen = ?args.listen, "serving");
    sigterm.recv().await;
    tracing::info!("SIGTERM: graceful shutdown");
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(args.drain_timeout, async {
        for server in servers {
            let _ = server.await;
        }
    })
    .await;
    match drained {
        Ok(()) => tracing::info!("drained, exiting"),
        Err(_) => tracing::warn!("drain timeout, exiting"),
    }
    ExitCode::SUCCESS
}
