//! The echo server, upgraded with cloudflare's `shellflip` (2.x).
//!
//! How shellflip is used, following its crate docs and its `restarter` example:
//!
//! - Trigger: `RestartConfig::restart_signal` is set to SIGHUP (the library's default is
//!   SIGUSR1); the coordination socket (`enabled`) is off, the signal is the only trigger. The
//!   restart task from `try_into_restart_task` is polled in the main `select!` next to SIGTERM,
//!   as in the example (accept loops run as their own tasks). `exit_on_error` is off so a
//!   failed restart leaves this process serving (with it on, the task resolves to `Err` and the
//!   example's process shuts down).
//! - New process: shellflip's restart thread (which builds a fresh tokio runtime for each
//!   restart) spawns `argv[0]` with the same arguments and waits for it to call
//!   `startup_complete()` (readiness pipe). There is no timeout on that wait: a new process that
//!   hangs before readiness leaves the old one serving but unable to upgrade again.
//! - Sockets: shellflip does not hand listening sockets over ("this library does not provide
//!   for socket inheritance or rebinding", says its example). Its mechanism for state is the
//!   `LifecycleHandler`: before the spawn this process duplicates its listeners without
//!   CLOEXEC (so the new process inherits them), and `send_to_new_process` writes their fd
//!   numbers to the handover pipe. The new process reads them with `receive_from_old_process`,
//!   checks they are bound to the `--listen` addresses, and serves the same sockets, so
//!   no connection waits on a closed queue. (Rebinding with SO_REUSEPORT instead would reset
//!   the connections queued on the old listener when it closes.)
//! - Readiness: the new process calls `shellflip::startup_complete()` once it listens, then writes
//!   the pid file. The old process's restart task then resolves with the child.
//! - Drain: connection tasks hold `ShutdownCoordinator` handles; the old process closes its
//!   listeners and awaits `shutdown()` under `--drain-timeout-ms`, then exits 0. SIGTERM does
//!   the same without a new process.
//!
//! Runtime: multi-thread (`#[tokio::main]` in the restarter example). shellflip also runs its own
//! restart thread, with its own runtime for each restart.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::process::ExitCode;

use async_trait::async_trait;
use shellflip::lifecycle::{receive_from_old_process, LifecycleHandler, PipeWriter};
use shellflip::{RestartConfig, ShutdownCoordinator};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

use super::Args;

/// Runs the shellflip echo server with command-line arguments `argv` (without the program
/// name). Upgrades re-execute `argv[0]` of this process with the same arguments.
pub fn main(argv: impl Iterator<Item = String>) -> ExitCode {
    super::run_peer(
        "shellflip_echo",
        argv,
        false,
        tokio::runtime::Builder::new_multi_thread(),
        serve,
    )
}

/// Hands the listening sockets to the new process.
struct Handover {
    /// This process's listeners. They stay open while a restart can run: restarts are only
    /// requested while the restart task is polled, which stops before the listeners close.
    listeners: Vec<RawFd>,
    /// Inheritable duplicates for the process being spawned.
    dups: Vec<OwnedFd>,
}

#[async_trait]
impl LifecycleHandler for Handover {
    async fn pre_new_process(&mut self) {
        self.dups.clear();
        for &fd in &self.listeners {
            // F_DUPFD, unlike F_DUPFD_CLOEXEC, leaves the copy inheritable across exec.
            // SAFETY: `fd` is an open listener of this process (see `listeners`).
            let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD, 3) };
            if dup < 0 {
                tracing::error!(error = %io::Error::last_os_error(), "cannot dup a listener");
                return;
            }
            // SAFETY: `dup` is a new descriptor that nothing else owns.
            self.dups.push(unsafe { OwnedFd::from_raw_fd(dup) });
        }
    }

    async fn send_to_new_process(&mut self, mut pipe: PipeWriter) -> io::Result<()> {
        if self.dups.len() != self.listeners.len() {
            return Err(io::Error::other("listeners were not duplicated"));
        }
        pipe.write_u32(self.dups.len() as u32).await?;
        for fd in &self.dups {
            pipe.write_i32(fd.as_raw_fd()).await?;
        }
        pipe.flush().await?;
        // The new process was spawned before this call: it has its copies, ours can go.
        self.dups.clear();
        Ok(())
    }

    async fn new_process_failed(&mut self) {
        self.dups.clear();
    }
}

/// In a process spawned by a shellflip restart: the listeners the old process handed over.
async fn inherit_listeners(want: &[SocketAddr]) -> io::Result<Option<Vec<TcpListener>>> {
    let Some(mut pipe) = receive_from_old_process() else {
        return Ok(None);
    };
    let n = pipe.read_u32().await? as usize;
    let mut fds = Vec::with_capacity(n);
    for _ in 0..n {
        let fd = pipe.read_i32().await?;
        // SAFETY: the old process duplicated this listener for us, inheritable, before
        // spawning this process; nothing else in this process owns it.
        fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
    }
    if fds.len() != want.len() {
        return Err(io::Error::other(format!(
            "handed {} listeners, want {}",
            fds.len(),
            want.len()
        )));
    }
    let mut listeners = Vec::with_capacity(n);
    for (fd, addr) in fds.into_iter().zip(want) {
        // Back to CLOEXEC: only an explicit handover passes it on.
        // SAFETY: fcntl on an fd we own.
        if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) } < 0 {
            return Err(io::Error::last_os_error());
        }
        let std = std::net::TcpListener::from(fd);
        let local = std.local_addr()?;
        if local != *addr && !(addr.port() == 0 && local.ip() == addr.ip()) {
            return Err(io::Error::other(format!(
                "handed a listener on {local}, want {addr}"
            )));
        }
        std.set_nonblocking(true)?;
        listeners.push(TcpListener::from_std(std)?);
    }
    Ok(Some(listeners))
}

async fn serve(args: Args) -> ExitCode {
    let listeners = match inherit_listeners(&args.listen).await {
        Ok(Some(l)) => {
            tracing::info!("took over the old process's listeners");
            l
        }
        Ok(None) => {
            let mut v = Vec::new();
            for addr in &args.listen {
                match super::bind(*addr, false) {
                    Ok(l) => v.push(l),
                    Err(e) => {
                        tracing::error!(%addr, error = %e, "cannot listen");
                        return ExitCode::from(1);
                    }
                }
            }
            v
        }
        Err(e) => {
            // The old process sees the readiness pipe close and keeps serving.
            tracing::error!(error = %e, "cannot take over the listeners");
            return ExitCode::from(1);
        }
    };

    let restart_conf = RestartConfig {
        enabled: false,
        restart_signal: SignalKind::hangup(),
        exit_on_error: false,
        lifecycle_handler: Box::new(Handover {
            listeners: listeners.iter().map(|l| l.as_raw_fd()).collect(),
            dups: Vec::new(),
        }),
        ..Default::default()
    };
    // Installs the SIGHUP handler and starts shellflip's restart thread.
    let mut restart_task = match restart_conf.try_into_restart_task() {
        Ok(t) => Box::pin(t),
        Err(e) => {
            tracing::error!(error = %e, "cannot set up restarts");
            return ExitCode::from(1);
        }
    };
    let mut sigterm = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot handle SIGTERM");
            return ExitCode::from(1);
        }
    };

    let coordinator = ShutdownCoordinator::new();
    let (stop_tx, stop_rx) = watch::channel(false);
    let accepting: Vec<_> = listeners
        .into_iter()
        .map(|l| {
            // Weak: the accept loop is not waited on, the connections it spawns are.
            let weak = coordinator.handle_weak();
            tokio::spawn(super::accept_until(l, stop_rx.clone(), move |stream| {
                if let Some(handle) = weak.upgrade() {
                    tokio::spawn(async move {
                        super::echo(stream).await;
                        drop(handle);
                    });
                }
            }))
        })
        .collect();

    // Ready. Tell the old process, if any (the restart task would do it on its first poll; the
    // docs allow calling it first), then publish our pid.
    if let Err(e) = shellflip::startup_complete() {
        tracing::error!(error = %e, "cannot notify the old process");
        return ExitCode::from(1);
    }
    if let Some(path) = &args.pid_file {
        if let Err(e) = super::write_pid_file(path) {
            tracing::error!(path = %path.display(), error = %e, "cannot write the pid file");
            return ExitCode::from(1);
        }
    }
    tracing::info!(pid = std::process::id(), listen = ?args.listen, "serving");

    let mut restarts_gone = false;
    loop {
        tokio::select! {
            res = &mut restart_task, if !restarts_gone => {
                match res {
                    Ok(child) => {
                        tracing::info!(new_pid = child.id(), "upgraded: closing the listeners, draining");
                        // The child outlives us; it is never waited on here.
                        drop(child);
                        break;
                    }
                    Err(e) => {
                        // Only if the restart machinery itself is gone (failed restarts are
                        // logged by shellflip and retried on the next signal).
                        tracing::error!(error = %e, "restarts no longer possible; serving on");
                        restarts_gone = true;
                    }
                }
            }
            _ = sigterm.recv() => {
                tracing::info!("SIGTERM: closing the listeners, draining");
                break;
            }
        }
    }
    // No more restarts: ends shellflip's restart thread.
    drop(restart_task);
    let _ = stop_tx.send(true);
    for task in accepting {
        let _ = task.await;
    }
    match tokio::time::timeout(args.drain_timeout, coordinator.shutdown()).await {
        Ok(()) => tracing::info!("drained, exiting"),
        Err(_) => tracing::warn!("drain timeout, exiting"),
    }
    ExitCode::SUCCESS
}
