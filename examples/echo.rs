//! An echo server that upgrades itself without dropping a connection.
//!
//! Each line a client sends is written back. Connections are served with tokio-uring; the
//! upgrade ring runs as a task of the same runtime thread (no thread hop per connection).
//!
//! ```text
//! cargo build --release --example echo
//! target/release/examples/echo --listen 127.0.0.1:7000 --pid-file /tmp/echo.pid &
//! kill -HUP $(cat /tmp/echo.pid)     # upgrade to the binary now at that path
//! kill -TERM $(cat /tmp/echo.pid)    # stop accepting, drain, exit 0
//! ```
//!
//! Options: `--runtime tokio-uring|tokio|blocking` (default tokio-uring; see also
//! `examples/echo_tokio.rs` and `examples/echo_blocking.rs`), `--listen ADDR` (repeatable; `IP:PORT`, `[IPv6]:PORT`, `unix:PATH`, `unix:@NAME`),
//! `--listen-file PATH` (one such address per line, read by each generation, as a service
//! reads its configuration),
//! `--pid-file PATH` (written atomically once the process serves), `--ready-timeout-ms N`
//! (default 30000), `--drain-timeout-ms N` (default 60000), `--handoff-state TEXT` (hand
//! "TEXT from PID" to the next generation), `--state-out PATH` (write the inherited state there),
//! `--handoff-state-bytes N` and `--handoff-fds N` (hand an N-byte state, N fds of /dev/null to
//! the next generation; with `--handoff-report PATH` each generation checks what it inherited
//! and writes `fds=N state=M ok=…` there), `--handoff-state-once` (only generation 0 sets that
//! state: its successors read theirs and hand nothing on),
//! `--workers N` (thread-per-core: N accept rings on SO_REUSEPORT groups, each with its own
//! tokio-uring runtime serving what it accepts, also for `--runtime tokio`; with
//! `--runtime blocking`, a thread per connection), `--max-draining N` (at most N generations draining at once: refuse an upgrade while N older
//! ones still drain; default 4), `--control PATH` (a control socket, mode 0600), `--udp ADDR`
//! (a UDP echo socket, handed over at each upgrade), `--pass-file PATH` (an open file handed
//! over as a raw fd; each generation appends a line to it through the inherited fd),
//! `--ballast-mib N` (N MiB resident, faulted in 1 s after start) and `--ballast-once` (only in
//! generation 0, not in its successors), `--stall-on-handover-ms N` (fault injection: block the serving thread N ms when an upgrade
//! reaches HandingOver, tokio-uring runtime only), `--successor-env KEY=VALUE` (repeatable:
//! set in the next generation's environment, `Builder::env`), `--successor-env-file PATH`
//! (`KEY=VALUE` lines read at each upgrade into the next generation's environment,
//! `Builder::env_refresh`), `--v6only` (IPV6_V6ONLY on IPv6 TCP listeners) and
//! `--tcp-defer-accept SECS` (TCP_DEFER_ACCEPT), both set with `Builder::listen_tcp_with` on
//! first start and inherited as they are, `--control-allow-uid N` and `--control-allow-gid N`
//! (repeatable: who else the control socket serves), `--upgrade-signal hup|usr1|usr2` (which
//! signal upgrades; with `usr1`/`usr2` SIGHUP is ignored, where a service would reload its
//! configuration), `--listen-backlog N` (`listen()`'s backlog for the sockets it makes).
//!
//! `echo ctl PATH upgrade` asks the server on control socket PATH to upgrade with the client of
//! `ringflip-ctl` (`ringflip::control_client`): prints `ok <new pid>`, or the reason on stderr
//! and exits 1 (failed), 2 (busy, refused) or 3 (could not ask); `echo ctl PATH status` prints
//! phase, pid, generation and live connections.
//! Logs go to stderr; `RUST_LOG` filters them (default `info`).

use std::process::ExitCode;

mod support;

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1).peekable();
    if args.peek().map(String::as_str) == Some("ctl") {
        return support::echo_server::ctl(args.skip(1));
    }
    support::echo_server::main(args, support::echo_server::Runtime::TokioUring)
}
