//! nginx as a peer: its stream (TCP) proxy in front of an echo backend, upgraded the way nginx
//! documents a binary upgrade — SIGUSR2 to the master (it starts a new master from the binary
//! with the listening sockets inherited), then SIGQUIT to the old master (its workers stop
//! accepting, finish their connections and exit). The orchestrator sends both
//! (`Strategy::NginxUsr2` in `examples/support/scenario.rs`).
//!
//! `--serve nginx` starts the backend (this binary as `--serve plain` on a free loopback port;
//! its pid goes to `<pid file>.extra`, which the orchestrator stops at the end), writes an
//! nginx.conf next to the pid file and execs `nginx` (one worker). nginx must daemonize: a
//! master whose parent is still the one it started with ignores SIGUSR2 ("the changing binary
//! signal is ignored"), which with `daemon off` is always the case. The daemon is re-parented to
//! the orchestrator (a child subreaper). nginx writes its pid file itself; the new master
//! writes it during the upgrade.
//!
//! The backend adds a proxy hop: nginx's latency is not comparable to the echo servers' own;
//! failures, and the tail in the window against nginx's own steady state, are.

use std::path::Path;

use super::ProxySetup;
use std::process::{Command, ExitCode};

/// Where Debian's nginx keeps its binary and its dynamic stream module.
pub const NGINX: &str = "/usr/sbin/nginx";
const STREAM_MODULE: &str = "/usr/lib/nginx/modules/ngx_stream_module.so";

/// Whether this machine can run the nginx peer.
pub fn available() -> bool {
    Path::new(NGINX).exists() && Path::new(STREAM_MODULE).exists()
}

pub fn main(argv: impl Iterator<Item = String>) -> ExitCode {
    let ProxySetup {
        listen,
        pid_file,
        dir,
        backend: backend_addr,
    } = match super::proxy_setup(argv, "nginx") {
        Ok(setup) => setup,
        Err(code) => return code,
    };
    let conf = dir.join("nginx.conf");
    let text = format!(
        "load_module {STREAM_MODULE};\n\
         daemon on;\n\
         master_process on;\n\
         worker_processes 1;\n\
         pid {pid};\n\
         error_log {dir}/nginx-error.log warn;\n\
         events {{ worker_connections 20000; }}\n\
         stream {{\n\
         \x20   upstream echo {{ server {backend_addr}; }}\n\
         \x20   server {{ listen {listen} backlog={backlog}; proxy_pass echo; }}\n\
         }}\n",
        pid = pid_file.display(),
        dir = dir.display(),
        backlog = super::BACKLOG,
    );
    super::exec_with_config(
        "nginx",
        &conf,
        &text,
        Command::new(NGINX)
            .arg("-c")
            .arg(&conf)
            .arg("-e")
            .arg(dir.join("nginx-error.log")),
    )
}

/// `--serve nginx-http`: nginx serving HTTP itself (`return 200` on `GET /`, no backend), for
/// benches/http_upgrade.rs; upgraded the same way (SIGUSR2, then SIGQUIT to the old master,
/// whose workers close their idle keep-alive connections, finish the requests in flight and
/// exit). The first `--listen` serves HTTP/1.1, the second (if given) HTTP/2 with prior
/// knowledge (`listen … http2`: nginx 1.22 serves such a port as HTTP/2 only). No keep-alive
/// limit gets in the way (`keepalive_requests`, `keepalive_timeout`), and the old workers are
/// bounded by `--drain-timeout-ms` (`worker_shutdown_timeout`).
pub fn main_http(argv: impl Iterator<Item = String>) -> ExitCode {
    let super::HttpSetup {
        listen,
        listen_h2,
        pid_file,
        dir,
        drain_timeout,
    } = match super::http_setup(argv, "nginx") {
        Ok(setup) => setup,
        Err(code) => return code,
    };
    let conf = dir.join("nginx.conf");
    let backlog = super::BACKLOG;
    let h2 = listen_h2
        .map(|a| format!("        listen {a} backlog={backlog} http2;\n"))
        .unwrap_or_default();
    let text = format!(
        "daemon on;\n\
         master_process on;\n\
         worker_processes 1;\n\
         worker_shutdown_timeout {drain}ms;\n\
         pid {pid};\n\
         error_log {dir}/nginx-error.log warn;\n\
         events {{ worker_connections 20000; }}\n\
         http {{\n\
         \x20   access_log off;\n\
         \x20   keepalive_timeout 120s;\n\
         \x20   keepalive_requests 1000000;\n\
         \x20   client_body_temp_path {dir}/body;\n\
         \x20   proxy_temp_path {dir}/proxy;\n\
         \x20   fastcgi_temp_path {dir}/fastcgi;\n\
         \x20   uwsgi_temp_path {dir}/uwsgi;\n\
         \x20   scgi_temp_path {dir}/scgi;\n\
         \x20   server {{\n\
         \x20       listen {listen} backlog={backlog};\n\
         {h2}\
         \x20       location = / {{ default_type text/plain; return 200 \"hello from nginx\\n\"; }}\n\
         \x20   }}\n\
         }}\n",
        drain = drain_timeout.as_millis(),
        pid = pid_file.display(),
        dir = dir.display(),
    );
    super::exec_with_config(
        "nginx",
        &conf,
        &text,
        Command::new(NGINX)
            .arg("-c")
            .arg(&conf)
            .arg("-e")
            .arg(dir.join("nginx-error.log")),
    )
}

/// Whether this machine can run the HTTP nginx peer (no module needed).
pub fn available_http() -> bool {
    Path::new(NGINX).exists()
}
