//! HAProxy as a peer: a TCP proxy in front of an echo backend, reloaded the way HAProxy
//! documents a seamless reload in master-worker mode — SIGUSR2 to the master, which re-executes
//! itself (same pid) and starts a new worker that takes the listening sockets from the old one
//! over the stats socket (`expose-fd listeners`); the old worker stops accepting and finishes
//! its connections. The orchestrator sends the signal and waits for the new worker
//! (`Strategy::HaproxyReload` in `examples/support/scenario.rs`).
//!
//! `--serve haproxy` starts the backend (see [`super::start_backend`]), writes haproxy.cfg next
//! to the pid file and execs `haproxy -W` in the foreground, so the process the orchestrator
//! started is the master, which writes the pid file (its pid does not change on reload).
//!
//! As with nginx, the proxy hop makes the absolute latency and CPU not comparable with the
//! echo servers'; failures, and the window against HAProxy's own steady state, are.

use std::path::Path;

use super::ProxySetup;
use std::process::{Command, ExitCode};

/// Where Debian's haproxy lives.
pub const HAPROXY: &str = "/usr/sbin/haproxy";

/// Whether this machine can run the HAProxy peer.
pub fn available() -> bool {
    Path::new(HAPROXY).exists()
}

pub fn main(argv: impl Iterator<Item = String>) -> ExitCode {
    let ProxySetup {
        listen,
        pid_file,
        dir,
        backend: backend_addr,
    } = match super::proxy_setup(argv, "haproxy") {
        Ok(setup) => setup,
        Err(code) => return code,
    };
    let conf = dir.join("haproxy.cfg");
    let text = format!(
        "global\n\
         \x20   master-worker\n\
         \x20   nbthread 1\n\
         \x20   maxconn 9000\n\
         \x20   stats socket {dir}/haproxy.sock mode 600 level admin expose-fd listeners\n\
         defaults\n\
         \x20   mode tcp\n\
         \x20   timeout connect 5s\n\
         \x20   timeout client 120s\n\
         \x20   timeout server 120s\n\
         listen echo\n\
         \x20   bind {listen} backlog {backlog}\n\
         \x20   server backend {backend_addr}\n",
        dir = dir.display(),
        backlog = super::BACKLOG,
    );
    super::exec_with_config("haproxy", &conf, &text, &mut haproxy(&conf, &pid_file))
}

/// `--serve haproxy-http`: HAProxy in `mode http` answering `GET /` itself (`http-request
/// return`, HAProxy ≥ 2.2; no backend, so no proxy hop), for benches/http_upgrade.rs; reloaded
/// the same way (SIGUSR2 to the master, the listeners passed to the new worker; the old worker
/// closes its idle keep-alive connections, answers what is in flight and exits, bounded by
/// `--drain-timeout-ms` as `hard-stop-after`). The first `--listen` serves HTTP/1.1 (and
/// HTTP/2 with prior knowledge, which HAProxy detects), the second (if given) HTTP/2 only
/// (`proto h2`).
pub fn main_http(argv: impl Iterator<Item = String>) -> ExitCode {
    let super::HttpSetup {
        listen,
        listen_h2,
        pid_file,
        dir,
        drain_timeout,
    } = match super::http_setup(argv, "haproxy") {
        Ok(setup) => setup,
        Err(code) => return code,
    };
    let conf = dir.join("haproxy.cfg");
    let backlog = super::BACKLOG;
    let h2 = listen_h2
        .map(|a| format!("    bind {a} backlog {backlog} proto h2\n"))
        .unwrap_or_default();
    let text = format!(
        "global\n\
         \x20   master-worker\n\
         \x20   nbthread 1\n\
         \x20   maxconn 9000\n\
         \x20   hard-stop-after {drain}ms\n\
         \x20   stats socket {dir}/haproxy.sock mode 600 level admin expose-fd listeners\n\
         defaults\n\
         \x20   mode http\n\
         \x20   timeout connect 5s\n\
         \x20   timeout client 120s\n\
         \x20   timeout server 120s\n\
         \x20   timeout http-keep-alive 120s\n\
         frontend hello\n\
         \x20   bind {listen} backlog {backlog}\n\
         {h2}\
         \x20   http-request return status 200 content-type text/plain string \"hello from haproxy\"\n",
        drain = drain_timeout.as_millis(),
        dir = dir.display(),
    );
    super::exec_with_config("haproxy", &conf, &text, &mut haproxy(&conf, &pid_file))
}

/// HAProxy in master-worker mode (`-W`) on `conf`, its master's pid in `pid_file`.
fn haproxy(conf: &Path, pid_file: &Path) -> Command {
    let mut cmd = Command::new(HAPROXY);
    cmd.arg("-W").arg("-f").arg(conf).arg("-p").arg(pid_file);
    cmd
}
