//! Sequential echo latency: one client connects, sends a line, reads the echo and closes, one
//! connection at a time, against each of ringflip's echo servers and the peers', in one run.
//! Every connection of an idle server includes the server's wake-up, so a server that waits for
//! a late wake-up shows it here at once (issue: a DEFER_TASKRUN ring's eventfd signal deferred
//! by an RCU grace period made every connection of `--runtime tokio` wait 15 ms).
//!
//! ```text
//! cargo bench --bench echo_sequential              # 1,000 connections per server
//! cargo bench --bench echo_sequential -- --test    # CI: 150 per server, checked
//! ```
//!
//! Servers (each this binary re-executed as `--serve KIND`, pinned to CPU 0; the client on
//! CPU 1): `ringflip` (examples/echo.rs's server, tokio-uring), `ringflip-tokio` (`run_async` on
//! a current-thread tokio runtime), `ringflip-blocking` (`Server::run`, a thread per
//! connection), `ecdysis` (Cloudflare's ecdysis on tokio; benches/peers/) and `plain` (a tokio
//! accept loop without any upgrade mechanism). The connections are taken in rounds of 50 per
//! server, the order rotating, so a drift of the VM's speed spreads over every server alike.
//!
//! Printed per server: median and p99 latency (connect() to the echo read), and the ratio of
//! the medians and p99s to ecdysis's. **Fails** (exits 1) when a ringflip server's median is
//! more than 3× ecdysis's: a gross regression, not a noisy VM.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

mod peers;
#[path = "../examples/support/mod.rs"]
mod support;

use support::load::{cpus, pin_to_cpu};
use support::scenario::{signal, wait_for_pid};

const SERVERS: [&str; 5] = [
    "ringflip",
    "ringflip-tokio",
    "ringflip-blocking",
    "ecdysis",
    "plain",
];
const BASELINE: &str = "ecdysis";
const ROUND: usize = 50;
const FULL: usize = 1_000;
const QUICK: usize = 150;
const MAX_MEDIAN_RATIO: f64 = 3.0;
const WAIT: Duration = Duration::from_secs(10);

struct Running {
    kind: &'static str,
    addr: SocketAddr,
    child: Child,
    pid: u32,
    micros: Vec<f64>,
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    if let Some(exit) = peers::serve_if_asked(&argv) {
        return exit;
    }
    // `cargo bench -- FILTER` passes the filter to every bench: run only when it names this one.
    let filtered_out = argv
        .iter()
        .any(|a| !a.starts_with('-') && !"echo_sequential".contains(a.as_str()));
    if filtered_out || argv.iter().any(|a| a == "--list") {
        return ExitCode::SUCCESS;
    }
    let quick = argv.iter().any(|a| a == "--test") || !argv.iter().any(|a| a == "--bench");
    let per_server = if quick { QUICK } else { FULL };
    let two_cores = cpus() >= 2;
    let dir = std::env::temp_dir().join(format!("ringflip-echo-seq-{}", std::process::id()));
    if let Err(e) = std::fs::create_dir_all(&dir) {
        eprintln!("{}: {e}", dir.display());
        return ExitCode::FAILURE;
    }

    let mut servers = Vec::new();
    for kind in SERVERS {
        match start(kind, &dir, two_cores) {
            Ok(s) => servers.push(s),
            Err(e) => {
                eprintln!("{kind}: {e}");
                stop_all(servers);
                return ExitCode::FAILURE;
            }
        }
    }
    if two_cores {
        pin_to_cpu(1);
    }
    let rounds = per_server.div_ceil(ROUND);
    for round in 0..rounds {
        for k in 0..servers.len() {
            let s = &mut servers[(k + round) % SERVERS.len()];
            for _ in 0..ROUND {
                match one(s.addr) {
                    Ok(d) => s.micros.push(d.as_nanos() as f64 / 1e3),
                    Err(e) => {
                        eprintln!("{}: a connection failed: {e}", s.kind);
                        stop_all(servers);
                        return ExitCode::FAILURE;
                    }
                }
            }
        }
    }

    println!(
        "echo_sequential: {} connections per server, one at a time (connect, one line, echo, \
         close), in rounds of {ROUND} taking the servers in turn; server on CPU 0, client on \
         CPU 1",
        rounds * ROUND
    );
    let base = &servers
        .iter()
        .find(|s| s.kind == BASELINE)
        .expect("the baseline runs")
        .micros;
    let (base_median, base_p99) = (quantile(base, 0.5), quantile(base, 0.99));
    let mut failed = Vec::new();
    for s in &servers {
        let (median, p99) = (quantile(&s.micros, 0.5), quantile(&s.micros, 0.99));
        let ratio = median / base_median;
        println!(
            "    {:<18} median {median:>8.1} µs   p99 {p99:>8.1} µs   to {BASELINE}: median \
             {ratio:.2}x   p99 {:.2}x",
            s.kind,
            p99 / base_p99
        );
        if s.kind.starts_with("ringflip") && (ratio.is_nan() || ratio > MAX_MEDIAN_RATIO) {
            failed.push(format!(
                "{}: median {median:.1} µs is {ratio:.2}x {BASELINE}'s (at most \
                 {MAX_MEDIAN_RATIO}x allowed)",
                s.kind
            ));
        }
    }
    stop_all(servers);
    let _ = std::fs::remove_dir_all(&dir);
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        for f in failed {
            eprintln!("echo_sequential FAILED: {f}");
        }
        ExitCode::FAILURE
    }
}

/// Starts `kind` on a free loopback port and waits (bounded) until it serves.
fn start(kind: &'static str, dir: &std::path::Path, pin: bool) -> Result<Running, String> {
    let addr: SocketAddr = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| e.to_string())?;
    let pid_file = dir.join(format!("{kind}.pid"));
    let log = std::fs::File::create(dir.join(format!("{kind}.log"))).map_err(|e| e.to_string())?;
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    if pin {
        pin_to_cpu(0); // the server inherits this thread's affinity
    }
    let serve: &[&str] = match kind {
        "ringflip-blocking" => &["--serve", "ringflip", "--runtime", "blocking"],
        _ => &["--serve", kind],
    };
    let child = Command::new(exe)
        .args(serve)
        .args(["--listen", &addr.to_string(), "--pid-file"])
        .arg(&pid_file)
        .args(["--drain-timeout-ms", "2000"])
        .env("RUST_LOG", "warn")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| format!("starting: {e}"))?;
    let pid = child.id();
    let mut running = Running {
        kind,
        addr,
        child,
        pid,
        micros: Vec::new(),
    };
    if wait_for_pid(&pid_file, None, WAIT).is_none() {
        stop(&mut running);
        return Err(format!("no pid file within {WAIT:?}"));
    }
    // Serving once a line echoes (the pid file may come before the listener for some peers).
    let deadline = Instant::now() + WAIT;
    while one(addr).is_err() {
        if Instant::now() > deadline {
            stop(&mut running);
            return Err(format!("not serving within {WAIT:?}"));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(running)
}

/// One connection: connect, send a line, read its echo, close. The time from before connect()
/// to the echo read.
fn one(addr: SocketAddr) -> std::io::Result<Duration> {
    let t0 = Instant::now();
    let mut s = TcpStream::connect_timeout(&addr, WAIT)?;
    s.set_read_timeout(Some(WAIT))?;
    s.set_nodelay(true)?;
    s.write_all(b"ping\n")?;
    let mut buf = [0u8; 5];
    s.read_exact(&mut buf)?;
    let took = t0.elapsed();
    if &buf != b"ping\n" {
        return Err(std::io::Error::other(format!("wrong echo {buf:?}")));
    }
    Ok(took)
}

/// SIGTERM, then (bounded) wait; SIGKILL if it does not exit. By pid, never by name.
fn stop(s: &mut Running) {
    signal(s.pid, libc::SIGTERM);
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = s.child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    eprintln!("{}: did not exit after SIGTERM; killing it", s.kind);
    let _ = s.child.kill();
    let _ = s.child.wait();
}

fn stop_all(servers: Vec<Running>) {
    for mut s in servers {
        stop(&mut s);
    }
}

/// `q` (0..=1) of `v` (not empty): the element at rank `round(q·(n−1))` of the sorted values.
fn quantile(v: &[f64], q: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * q).round() as usize]
}
