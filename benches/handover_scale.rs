//! How the cost of one upgrade grows (issue 16 §2, "the curves"): one thing grows, the rest is
//! held small, one upgrade at a time of the echo example's server (`examples/echo.rs`, this
//! same binary re-executed as `--serve ringflip`: real processes, SIGHUP).
//!
//! ```text
//! cargo bench --bench handover_scale                         # every curve (a few min)
//! cargo bench --bench handover_scale -- --curve listeners    # one curve (repeatable, or a,b)
//! cargo bench --bench handover_scale -- --big-rss            # also 4 and 16 GiB resident
//! cargo bench --bench handover_scale -- --json target/bench/scale.json
//! cargo bench --bench handover_scale -- --test               # CI: one small point per curve
//! ```
//!
//! Curves (`--curve NAME`):
//! - `listeners`: 1, 10, 100, 1,000 and 10,000 listeners (TCP, 127.0.0.1; the bench raises its
//!   fd limit, and so its servers', to what 10,000 need);
//! - `connections`: 0, 1k, 10k, 100k idle connections held by the old process during the
//!   upgrade (each checked with an echo before the trigger), and the old process's RSS per held
//!   connection (its VmRSS before and after the client opened them). Once: the same RSS per
//!   connection at the largest point for ringflip's echo server on tokio (`--runtime tokio`)
//!   and for a plain tokio echo server without ringflip (`benches/peers/plain_echo.rs`), the
//!   baseline for "no more than the connections themselves". The bench raises its fd limit
//!   (and so its servers') to what the point needs, past the hard limit only with
//!   CAP_SYS_RESOURCE: a point it cannot reach is skipped, and said. It connects from
//!   127.0.0.2 to .51 in turn so that no source address runs out of ports;
//! - `active`: the same, 1k, 3k and 10k connections, pinged in turn (a line, its echo) by a
//!   thread of the bench's from the trigger until the client closes them, 1,000 pings in flight
//!   (written, then their echoes read): a ping that fails fails the bench; reports the pings
//!   answered meanwhile. The load is the same at every point (1,000 in flight), so the curve
//!   shows what the count costs; an idle server (the `connections` curve's 0) is the other
//!   baseline, of the load itself;
//! - `rss`: the old process 5 MiB (no ballast), 1 GiB resident (`--ballast-mib`, only in the
//!   first generation: `--ballast-once`), and with `--big-rss` 4 and 16 GiB; against the time
//!   of a plain `fork()` (the parent's side: until `fork` returns) of this bench process grown
//!   to the same size, measured right after each point's upgrades (not both at once: 16 GiB
//!   twice does not fit in 24). A point that does not fit in `MemAvailable` is skipped, said;
//! - `state`: 0, 64 KiB, 1 MiB, 100 MiB and 1 GiB handed over (`--handoff-state-bytes N
//!   --handoff-state-once`: generation 0 sets it, its successor reads it whole before its
//!   READY, a stream above 64 KiB, and sets none), as MB/s: the state's bytes over trigger →
//!   READY (all of it, spawn included), and over the growth of trigger → READY from the 0
//!   point (the marginal rate);
//! - `interval`: back-to-back upgrades every 250, 100, 50 ms through the control socket, with
//!   `--max-draining` (default 2) bounding the generations draining at once, while an
//!   open-loop load (`--rate`, default 500 conn/s) runs; before each upgrade the bench opens
//!   `HOLD_CONNS` idle connections on the serving generation and closes them `--hold-ms`
//!   (default 300) after it was replaced, so each old generation drains that long. Reports
//!   upgrades done, refused (`busy`), failed, failed connections and failed pings of the held
//!   ones, and where refusals start.
//!
//! Per upgrade, from the old process's `upgrade timeline` and the new one's `READY sent` (log
//! target `ringflip::timeline`, monotonic clock): trigger → READY (received by the old process),
//! READY sent → the old process stopped accepting, and the drain: from the client's first close
//! of the held connections (50 ms after the new pid file appeared) to the old process's last
//! connection ended (without held connections: accepting stopped → drained). The old process's
//! CPU (user + system, every thread) from its process CPU clock at the trigger and at that
//! first close, and from `wait4`'s rusage once it exited: the handover's share and the drain's.
//! (Not /proc/PID/stat's utime + stime: its 10 ms ticks are coarser than what is measured.)
//! The new process's CPU from its start to READY (`new CPU`: the `cpu_us` of its `READY sent`,
//! exec included): a trigger → READY that grows while this stays flat is time the new
//! process waited for a CPU, not work it did.
//! Medians over `--rounds` upgrades (default 5; 3 for `connections`, `rss` and states of
//! 100 MiB and more), each of a fresh server.
//!
//! Each curve prints a table and whether its target holds, computed from the figures ("met" or
//! "not met", with the reason). `--json PATH` writes them (`examples/support/json.rs`'s
//! conventions: `format`, `meta`, `config`, times in ms unless the key says otherwise) for
//! `benches/analysis/plot.py`, which draws `curve-<name>.svg` per curve.
//!
//! `--test` (CI): listeners 1 and 100, 1,000 held connections, 5 MiB and 64 MiB resident, 1 MiB
//! of state, 4 upgrades 250 ms apart; one upgrade a point (three for listeners). It fails on an
//! upgrade that does not complete, on a failure of the interval curve (in any mode), and if the
//! 100-listener trigger → READY is above 10× the 1-listener one: generous ratios only, no times.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

mod peers;
#[path = "../examples/support/mod.rs"]
mod support;

use serde_json::{json, Value};
use support::scenario::{self, alive, rss_mib, signal, wait_for_pid};

const CURVES: [&str; 6] = [
    "listeners",
    "connections",
    "active",
    "rss",
    "state",
    "interval",
];

/// Idle connections held on each generation by the interval curve.
const HOLD_CONNS: usize = 4;
/// Source addresses of held connections, in turn (127.0.0.2 and on): each has its own ~28k
/// ports here, so 100k connections to one listener fit (2,000 from each).
const SOURCES: usize = 50;
/// Held connections opened (then checked with an echo) at a time: under the listen backlog.
const BATCH: usize = 1000;
/// The growth that counts as "grows" for the flat targets (trigger → READY against RSS and
/// against held connections): the listener target's scale, 1 ms.
const FLAT_MS: f64 = 1.0;
/// The connections target: ringflip's RSS per held connection at most this times the plain
/// server's (page granularity and allocator noise).
const CONN_RSS_RATIO: f64 = 1.1;

struct Opts {
    quick: bool,
    curves: Vec<String>,
    rounds: Option<usize>,
    big_rss: bool,
    json: Option<PathBuf>,
    max_draining: u32,
    hold: Duration,
    rate: u32,
    upgrades: usize,
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    if let Some(exit) = peers::serve_if_asked(&argv) {
        return exit;
    }
    let o = match parse(&argv) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    // Every generation re-parents to us as its parent exits: reaped here, its rusage read.
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    let dir = std::env::temp_dir().join(format!("ringflip-scale-{}", std::process::id()));
    if let Err(e) = std::fs::create_dir_all(&dir) {
        eprintln!("creating {}: {e}", dir.display());
        return ExitCode::FAILURE;
    }
    println!(
        "handover_scale: one upgrade at a time of the echo example's server; medians over the \
         rounds (each a fresh server){}",
        if o.quick {
            " — quick mode: not a measurement"
        } else {
            ""
        }
    );
    let mut ok = true;
    let mut curves = Vec::new();
    for name in &o.curves {
        let r = match name.as_str() {
            "listeners" => listeners(&o, &dir),
            "connections" => connections(&o, &dir, false),
            "active" => connections(&o, &dir, true),
            "rss" => rss(&o, &dir),
            "state" => state(&o, &dir),
            _ => interval(&o, &dir),
        };
        match r {
            Ok(c) => {
                c.print(o.quick);
                ok &= c.check(o.quick);
                curves.push(c.to_json());
            }
            Err(e) => {
                println!("\n{name}: could not run: {e}");
                ok = false;
            }
        }
    }
    if let Some(path) = &o.json {
        let record = json!({
            "format": 1,
            "bench": "handover_scale",
            "meta": support::json::meta(&argv),
            "config": {
                "quick": o.quick, "rounds": o.rounds, "big_rss": o.big_rss,
                "max_draining": o.max_draining, "hold_ms": o.hold.as_millis() as u64,
                "rate": o.rate, "upgrades": o.upgrades,
            },
            "curves": curves,
        });
        if let Err(e) = support::json::write(path, &record) {
            eprintln!("{e}");
            ok = false;
        }
    }
    if ok {
        let _ = std::fs::remove_dir_all(&dir);
        ExitCode::SUCCESS
    } else {
        println!("logs kept in {}", dir.display());
        ExitCode::FAILURE
    }
}

fn parse(argv: &[String]) -> Result<Opts, String> {
    let mut o = Opts {
        quick: false,
        curves: Vec::new(),
        rounds: None,
        big_rss: false,
        json: None,
        max_draining: 2,
        hold: Duration::from_millis(300),
        rate: 500,
        upgrades: 20,
    };
    let mut it = argv.iter();
    while let Some(flag) = it.next() {
        match flag.as_str() {
            "--bench" => {}
            "--test" => o.quick = true,
            "--big-rss" => o.big_rss = true,
            "--json" => o.json = Some(it.next().ok_or("--json needs a path")?.into()),
            "--curve" => {
                for c in it.next().ok_or("--curve needs a name")?.split(',') {
                    if !CURVES.contains(&c) {
                        return Err(format!("--curve {c}: one of {}", CURVES.join(", ")));
                    }
                    o.curves.push(c.to_owned());
                }
            }
            "--rounds" | "--max-draining" | "--hold-ms" | "--rate" | "--upgrades" => {
                let v: u64 = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .ok_or(format!("{flag} needs a number"))?;
                match flag.as_str() {
                    "--rounds" if v > 0 => o.rounds = Some(v as usize),
                    "--rounds" => return Err("--rounds must be at least 1".into()),
                    "--max-draining" => o.max_draining = v as u32,
                    "--hold-ms" => o.hold = Duration::from_millis(v),
                    "--rate" => o.rate = v as u32,
                    _ => o.upgrades = v as usize,
                }
            }
            _ => {} // criterion-style filters and flags
        }
    }
    if o.curves.is_empty() {
        o.curves = CURVES.iter().map(|c| c.to_string()).collect();
    }
    if o.quick {
        o.upgrades = o.upgrades.min(4);
        o.rate = o.rate.min(200);
    }
    Ok(o)
}

impl Opts {
    fn rounds(&self, full: usize) -> usize {
        self.rounds_or(full, 1)
    }
    fn rounds_or(&self, full: usize, quick: usize) -> usize {
        self.rounds.unwrap_or(if self.quick { quick } else { full })
    }
}

// ---------------------------------------------------------------------------------------------
// One upgrade of a fresh server.

/// A running echo server, as first started (generation 0, our direct child).
struct Server {
    pid: u32,
    pid_file: PathBuf,
    log: PathBuf,
    addrs: Vec<SocketAddr>,
}

/// `n` free TCP ports of 127.0.0.1 (bound, read, released: the server binds them next).
fn free_addrs(n: usize) -> Result<Vec<SocketAddr>, String> {
    let held: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("finding {n} free ports: {e}"))?;
    held.iter()
        .map(|l| l.local_addr().map_err(|e| e.to_string()))
        .collect()
}

/// Starts server `kind` (a `--serve` kind) on `listeners` fresh ports with `extra` arguments,
/// logging to `<dir>/<tag>.log`, and waits for its pid file.
fn start_server(
    dir: &Path,
    tag: &str,
    kind: &str,
    listeners: usize,
    extra: &[String],
) -> Result<Server, String> {
    let pid_file = dir.join(format!("{tag}.pid"));
    let log = dir.join(format!("{tag}.log"));
    let _ = std::fs::remove_file(&pid_file);
    let logf = std::fs::File::create(&log).map_err(|e| e.to_string())?;
    let addrs = free_addrs(listeners)?;
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    // ringflip's servers read their addresses from a file, as a service with thousands of
    // listeners reads its configuration: as 20,000 arguments, 10,000 listeners cost each
    // generation 20-30 ms of exec and parsing (measured, BENCHMARKS-LAB.md §8, §9), the example's
    // cost and not the handover's.
    let listen_file = if kind.starts_with("ringflip") {
        let path = dir.join(format!("{tag}.listen"));
        let lines: String = addrs.iter().map(|a| format!("{a}\n")).collect();
        std::fs::write(&path, lines).map_err(|e| e.to_string())?;
        Some(path)
    } else {
        None
    };
    let mut cmd =
        scenario::server_command(&exe, &pid_file, Duration::from_secs(120), &logf, |cmd| {
            cmd.args(["--serve", kind]);
            match &listen_file {
                Some(path) => {
                    cmd.arg("--listen-file").arg(path);
                }
                None => {
                    for a in &addrs {
                        cmd.args(["--listen", &a.to_string()]);
                    }
                }
            }
        })?;
    cmd.args(extra);
    if kind.starts_with("ringflip") {
        cmd.args(["--ready-timeout-ms", "60000"]);
    }
    let pid = cmd
        .spawn()
        .map_err(|e| format!("starting the server: {e}"))?
        .id();
    match wait_for_pid(&pid_file, None, Duration::from_secs(30)) {
        Some(p) if p == pid => Ok(Server {
            pid,
            pid_file,
            log,
            addrs,
        }),
        _ => {
            signal(pid, libc::SIGKILL);
            let _ = reap(pid, Duration::from_secs(10));
            Err(format!("the server did not start; see {}", log.display()))
        }
    }
}

/// Waits (polling) for child `pid` to exit and reaps it; its CPU time (user + system, from
/// `wait4`'s rusage). SIGKILLs it at the deadline.
fn reap(pid: u32, timeout: Duration) -> Result<Duration, String> {
    let deadline = Instant::now() + timeout;
    loop {
        // SAFETY: rusage is plain data filled by the kernel; waiting for our own child.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        let mut status = 0;
        // SAFETY: as above; both pointers are live.
        let r = unsafe { libc::wait4(pid as i32, &mut status, libc::WNOHANG, &mut ru) };
        if r == pid as i32 {
            let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
            return Ok(tv(ru.ru_utime) + tv(ru.ru_stime));
        }
        if r < 0 {
            return Err(format!(
                "waiting for {pid}: {}",
                std::io::Error::last_os_error()
            ));
        }
        if Instant::now() >= deadline {
            signal(pid, libc::SIGKILL);
            std::thread::sleep(Duration::from_millis(100));
            // SAFETY: reaping our own child after the kill.
            unsafe { libc::waitpid(pid as i32, std::ptr::null_mut(), libc::WNOHANG) };
            return Err(format!("{pid} did not exit within {timeout:?}: killed"));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Reaps any exited child, never blocking.
fn reap_any() {
    // SAFETY: reaping exited children (we are their subreaper), never blocking.
    while unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) } > 0 {}
}

/// SIGTERMs `pid` and waits for it and every pid of `others` to be gone (SIGKILL at 30 s).
fn stop_all(pid: u32, others: &[u32]) {
    signal(pid, libc::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        reap_any();
        let left: Vec<u32> = others
            .iter()
            .chain([&pid])
            .copied()
            .filter(|p| alive(*p))
            .collect();
        if left.is_empty() {
            return;
        }
        if Instant::now() >= deadline {
            for p in left {
                signal(p, libc::SIGKILL);
            }
            std::thread::sleep(Duration::from_millis(100));
            reap_any();
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Process `pid`'s CPU time so far (every thread, the exited ones too), from its process CPU
/// clock (ns resolution).
fn process_cpu(pid: u32) -> Option<Duration> {
    // MAKE_PROCESS_CPUCLOCK(pid, CPUCLOCK_SCHED) of the kernel's posix-timers.h.
    let clock = ((!(pid as libc::clockid_t)) << 3) | 2;
    // SAFETY: timespec is plain data filled by the kernel.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: `ts` is live.
    (unsafe { libc::clock_gettime(clock, &mut ts) } == 0)
        .then(|| Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32))
}

/// CLOCK_MONOTONIC in µs: the clock of the servers' timeline lines.
fn mono_us() -> i64 {
    // SAFETY: timespec is plain data filled by the kernel.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: `ts` is live.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec * 1_000_000 + ts.tv_nsec / 1000
}

/// `pid`'s VmRSS in KiB; 0 if it cannot be read.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// A connection to `dst` from `src` (any port: IP_BIND_ADDRESS_NO_PORT leaves the choice to
/// `connect`, by the whole 4-tuple).
fn connect_from(src: Ipv4Addr, dst: SocketAddr) -> std::io::Result<TcpStream> {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    let one: libc::c_int = 1;
    // SAFETY: a valid socket, and a pointer to an int of the size passed.
    unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&s),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    s.bind(&SocketAddr::from((src, 0)).into())?;
    s.connect(&dst.into())?;
    Ok(s.into())
}

/// Writes a line on each connection and reads its echo: each is served. The first error.
fn ping_all(conns: &mut [TcpStream]) -> Result<(), String> {
    for c in conns.iter_mut() {
        c.write_all(b"h\n").map_err(|e| format!("ping: {e}"))?;
    }
    for c in conns.iter_mut() {
        c.set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| e.to_string())?;
        let mut buf = [0u8; 2];
        c.read_exact(&mut buf)
            .map_err(|e| format!("ping's echo: {e}"))?;
        if &buf != b"h\n" {
            return Err(format!("ping's echo: {buf:?}"));
        }
    }
    Ok(())
}

/// Opens `n` connections to `addr`, each checked with an echo (so the server has accepted it).
fn hold(addr: SocketAddr, n: usize) -> Result<Vec<TcpStream>, String> {
    let mut held = Vec::with_capacity(n);
    while held.len() < n {
        let start = held.len();
        for i in start..(start + BATCH).min(n) {
            let src = Ipv4Addr::new(127, 0, 0, (2 + i % SOURCES) as u8);
            held.push(
                connect_from(src, addr)
                    .map_err(|e| format!("held connection {i} from {src}: {e}"))?,
            );
        }
        ping_all(&mut held[start..])?;
    }
    Ok(held)
}

/// One upgrade, as measured.
#[derive(Clone, Copy, Debug, Default)]
struct Round {
    /// Trigger → READY received by the old process.
    ready: f64,
    /// READY sent (new process) → the old process stopped accepting.
    let_go: f64,
    /// The drain: the client's first close → the old process's last connection ended; without
    /// held connections, accepting stopped → drained.
    drain: f64,
    /// Drained → exited.
    exit: f64,
    /// The old process's CPU from the trigger to the first close, and from there to its exit.
    cpu_handover: f64,
    cpu_drain: f64,
    /// The new process's CPU from its start to READY (`cpu_us` of its `READY sent`): what the
    /// handover costs the new process, whatever CPU it had to share.
    new_cpu: f64,
    /// The old process's VmRSS just before the trigger, MiB.
    rss_mib: f64,
    /// Its VmRSS growth while the client opened the held connections, bytes per connection.
    rss_per_conn: Option<f64>,
    /// Trigger → the new pid file, as this bench saw it.
    pid_file: f64,
    /// Pings answered from the trigger to the first close ([`Held::active`]).
    pings: Option<u64>,
}

/// The fields of a log line (`key=value`, span fields too).
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split(|c: char| c.is_whitespace() || c == '{')
        .filter_map(|t| t.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v.trim_end_matches(['}', ':']))
}

/// Upgrades `srv` once (SIGHUP) with `conns` idle connections held by it, stops both
/// generations, and returns what the upgrade took.
/// The connections the old process holds during an upgrade.
#[derive(Clone, Copy, Debug)]
struct Held {
    conns: usize,
    /// Each pinged in turn (a line written, its echo read) from the trigger to the client's
    /// first close, on a thread of the bench's; idle otherwise.
    active: bool,
}

impl Held {
    fn idle(conns: usize) -> Held {
        Held {
            conns,
            active: false,
        }
    }
}

/// Pings held connections in turn on a thread until stopped: [`Held::active`].
struct Pinger {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<(Vec<TcpStream>, u64, Result<(), String>)>,
}

impl Pinger {
    fn start(mut held: Vec<TcpStream>) -> Pinger {
        use std::sync::atomic::Ordering::Relaxed;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut pings = 0u64;
            while !flag.load(Relaxed) && !held.is_empty() {
                for chunk in held.chunks_mut(BATCH) {
                    if flag.load(Relaxed) {
                        break;
                    }
                    if let Err(e) = ping_all(chunk) {
                        return (held, pings, Err(e));
                    }
                    pings += chunk.len() as u64;
                }
            }
            (held, pings, Ok(()))
        });
        Pinger { stop, thread }
    }

    /// Stops it: the connections, the pings answered, the first failure.
    fn stop(self) -> (Vec<TcpStream>, u64, Result<(), String>) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread
            .join()
            .unwrap_or_else(|_| (Vec::new(), 0, Err("the pinger panicked".into())))
    }
}

fn one_upgrade(srv: &Server, held: Held) -> Result<Round, String> {
    let old = srv.pid;
    let before = rss_kib(old);
    let conns = hold(srv.addrs[0], held.conns);
    let result = conns.and_then(|conns| upgrade_holding(srv, conns, before, held));
    if alive(old) {
        stop_all(old, &[]);
    }
    result
}

fn upgrade_holding(
    srv: &Server,
    conns: Vec<TcpStream>,
    rss_before_conns: u64,
    held: Held,
) -> Result<Round, String> {
    let old = srv.pid;
    let rss = rss_kib(old);
    let cpu0 = process_cpu(old).ok_or("reading the old process's CPU clock")?;
    let (mut idle, pinger) = if held.active {
        (Vec::new(), Some(Pinger::start(conns)))
    } else {
        (conns, None)
    };
    let t0 = Instant::now();
    signal(old, libc::SIGHUP);
    let new = wait_for_pid(&srv.pid_file, Some(old), Duration::from_secs(90))
        .ok_or("no new process within 90 s")?;
    let pid_file = t0.elapsed();
    std::thread::sleep(Duration::from_millis(50));
    // None if it cannot be read (it can for a zombie not yet reaped): then all of the old
    // process's CPU counts as the handover's.
    let cpu1 = process_cpu(old);
    let mut pings = None;
    let mut ping_failure = Ok(());
    if let Some(p) = pinger {
        let (conns, n, r) = p.stop();
        (idle, pings, ping_failure) = (conns, Some(n), r);
    }
    let close_mono = mono_us();
    drop(idle);
    let cpu = reap(old, Duration::from_secs(180));
    stop_all(new, &[]);
    let cpu = cpu?;
    ping_failure.map_err(|e| format!("an active connection failed during the upgrade: {e}"))?;
    let conns = held.conns;
    let log = std::fs::read_to_string(&srv.log).map_err(|e| e.to_string())?;
    // The old process's timeline and the new one's READY: the last line of each.
    let last = |what: &str| {
        log.lines()
            .rfind(|l| l.contains(what))
            .ok_or(format!("no {what} in the log"))
    };
    let num = |line: &str, k: &str| -> Result<i64, String> {
        field(line, k)
            .and_then(|v| v.parse().ok())
            .filter(|v: &i64| *v >= 0)
            .ok_or(format!("{k} missing from: {line}"))
    };
    let (timeline, ready_sent) = (last("upgrade timeline")?, last("READY sent")?);
    let trigger = num(timeline, "trigger_mono_us")?;
    let ready = num(timeline, "ready_us")?;
    let stopped = num(timeline, "accept_stopped_us")?;
    let drained = num(timeline, "drained_us")?;
    let exited = num(timeline, "exited_us")?;
    let sent = num(ready_sent, "sent_mono_us")? - trigger;
    let new_cpu = num(ready_sent, "cpu_us")?;
    let drain = if conns > 0 {
        (trigger + drained - close_mono).max(0)
    } else {
        drained - stopped
    };
    let us = |v: i64| v as f64 / 1e3;
    Ok(Round {
        ready: us(ready),
        let_go: us(stopped - sent),
        drain: us(drain),
        exit: us(exited - drained),
        cpu_handover: ms(cpu1.unwrap_or(cpu).saturating_sub(cpu0)),
        cpu_drain: ms(cpu1.map_or(Duration::ZERO, |c1| cpu.saturating_sub(c1))),
        new_cpu: us(new_cpu),
        rss_mib: rss as f64 / 1024.0,
        rss_per_conn: (conns > 0)
            .then(|| rss.saturating_sub(rss_before_conns) as f64 * 1024.0 / conns as f64),
        pid_file: ms(pid_file),
        pings,
    })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// `rounds` upgrades, each of a fresh server of `kind` with `listeners` and `extra` arguments,
/// holding `conns`; `prepare` runs on each server before its upgrade (waits for its ballast).
fn rounds_of(
    dir: &Path,
    tag: &str,
    rounds: usize,
    listeners: usize,
    held: Held,
    extra: &[String],
    prepare: &dyn Fn(&Server) -> Result<(), String>,
) -> Result<Vec<Round>, String> {
    (0..rounds)
        .map(|i| {
            let srv = start_server(dir, &format!("{tag}-{i}"), "ringflip", listeners, extra)?;
            let r = prepare(&srv).and_then(|()| one_upgrade(&srv, held));
            if alive(srv.pid) {
                stop_all(srv.pid, &[]);
            }
            if r.is_ok() {
                let _ = std::fs::remove_file(&srv.log);
            }
            r.map_err(|e| format!("{e} (log {})", srv.log.display()))
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Curves.

/// A point of a curve: its x, label, upgrades (none for the interval curve) and extra figures.
struct Point {
    x: f64,
    label: String,
    rounds: Vec<Round>,
    /// Extra columns: (header, text) for the table.
    cols: Vec<(&'static str, String)>,
    /// Extra JSON fields.
    extra: Value,
}

struct Target {
    what: String,
    met: bool,
    reason: String,
}

struct Curve {
    name: &'static str,
    title: String,
    axis: (&'static str, &'static str),
    points: Vec<Point>,
    targets: Vec<Target>,
    capped: Option<String>,
    notes: Vec<String>,
    /// Quick-mode checks that failed (generous ratios only).
    failed_checks: Vec<String>,
    /// What fails the bench in any mode: ringflip failing something.
    failures: Vec<String>,
    /// Whether the table has the per-upgrade columns (not the interval curve's).
    upgrades: bool,
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::NAN, f64::max)
}

impl Point {
    fn med(&self, f: impl Fn(&Round) -> f64) -> f64 {
        median(self.rounds.iter().map(f).collect())
    }
    fn max(&self, f: impl Fn(&Round) -> f64) -> f64 {
        max(&self.rounds.iter().map(f).collect::<Vec<_>>())
    }
    fn ready(&self) -> f64 {
        self.med(|r| r.ready)
    }
}

fn r3(x: f64) -> Value {
    if x.is_finite() {
        json!((x * 1e3).round() / 1e3)
    } else {
        Value::Null
    }
}

impl Curve {
    fn new(name: &'static str, title: String, axis: (&'static str, &'static str)) -> Curve {
        Curve {
            name,
            title,
            axis,
            points: Vec::new(),
            targets: Vec::new(),
            capped: None,
            notes: Vec::new(),
            failed_checks: Vec::new(),
            failures: Vec::new(),
            upgrades: true,
        }
    }

    fn print(&self, quick: bool) {
        println!();
        println!("{}: {}", self.name, self.title);
        if let Some(c) = &self.capped {
            println!("  capped: {c}");
        }
        let extra: Vec<&str> = self
            .points
            .first()
            .map(|p| p.cols.iter().map(|c| c.0).collect())
            .unwrap_or_default();
        let mut head = format!("  {:>12}", self.axis.0);
        if self.upgrades {
            head += &format!(
                " {:>6} {:>19} {:>12} {:>14} {:>12} {:>14} {:>12} {:>9}",
                "rounds",
                "trigger→READY (max)",
                "new CPU",
                "READY→stopped",
                "drain",
                "old CPU hand.",
                "old CPU drain",
                "old RSS"
            );
        }
        for h in &extra {
            head += &format!(" {h:>16}");
        }
        println!("{head}");
        for p in &self.points {
            let mut row = format!("  {:>12}", p.label);
            if self.upgrades {
                row += &format!(
                    " {:>6} {:>9.3}ms ({:>6.2}) {:>10.3}ms {:>12.3}ms {:>10.3}ms {:>12.3}ms {:>10.3}ms {:>6.0}MiB",
                    p.rounds.len(),
                    p.ready(),
                    p.max(|r| r.ready),
                    p.med(|r| r.new_cpu),
                    p.med(|r| r.let_go),
                    p.med(|r| r.drain),
                    p.med(|r| r.cpu_handover),
                    p.med(|r| r.cpu_drain),
                    p.med(|r| r.rss_mib),
                );
            }
            for (_, v) in &p.cols {
                row += &format!(" {v:>16}");
            }
            println!("{row}");
        }
        for n in &self.notes {
            println!("  {n}");
        }
        for t in &self.targets {
            println!(
                "  target: {}: {} ({}){}",
                t.what,
                if t.met { "met" } else { "not met" },
                t.reason,
                if quick {
                    " [quick mode: not a measurement]"
                } else {
                    ""
                }
            );
        }
    }

    /// Ringflip's failures, and the quick mode's checks; prints what failed.
    fn check(&self, quick: bool) -> bool {
        let checks = if quick { &self.failed_checks[..] } else { &[] };
        for f in self.failures.iter().chain(checks) {
            println!("  CHECK FAILED: {f}");
        }
        self.failures.is_empty() && checks.is_empty()
    }

    fn to_json(&self) -> Value {
        let points: Vec<Value> = self
            .points
            .iter()
            .map(|p| {
                let mut v = json!({"x": p.x, "label": p.label});
                if self.upgrades {
                    let stat = |f: &dyn Fn(&Round) -> f64| {
                        json!({"median": r3(p.med(f)), "max": r3(p.max(f))})
                    };
                    v["rounds"] = json!(p.rounds.len());
                    v["trigger_to_ready"] = stat(&|r| r.ready);
                    v["ready_to_stopped_accepting"] = stat(&|r| r.let_go);
                    v["drain"] = stat(&|r| r.drain);
                    v["drained_to_exit"] = stat(&|r| r.exit);
                    v["old_cpu_handover"] = stat(&|r| r.cpu_handover);
                    v["old_cpu_drain"] = stat(&|r| r.cpu_drain);
                    v["new_cpu_to_ready"] = stat(&|r| r.new_cpu);
                    v["trigger_to_pid_file"] = stat(&|r| r.pid_file);
                    v["old_rss_mib"] = r3(p.med(|r| r.rss_mib));
                    let per_conn: Vec<f64> =
                        p.rounds.iter().filter_map(|r| r.rss_per_conn).collect();
                    v["rss_bytes_per_conn"] = if per_conn.is_empty() {
                        Value::Null
                    } else {
                        r3(median(per_conn))
                    };
                }
                if let (Value::Object(into), Value::Object(from)) = (&mut v, &p.extra) {
                    into.extend(from.clone());
                }
                v
            })
            .collect();
        json!({
            "name": self.name,
            "title": self.title,
            "axis": {"name": self.axis.0, "unit": self.axis.1},
            "capped": self.capped,
            "notes": self.notes,
            "points": points,
            "targets": self.targets.iter().map(|t| json!({
                "what": t.what, "met": t.met, "reason": t.reason,
            })).collect::<Vec<_>>(),
        })
    }
}

/// Least-squares slope of `y` against `x`.
fn slope(pts: &[(f64, f64)]) -> f64 {
    let n = pts.len() as f64;
    let (mx, my) = (
        pts.iter().map(|p| p.0).sum::<f64>() / n,
        pts.iter().map(|p| p.1).sum::<f64>() / n,
    );
    let sxy: f64 = pts.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    let sxx: f64 = pts.iter().map(|p| (p.0 - mx) * (p.0 - mx)).sum();
    if sxx > 0.0 {
        sxy / sxx
    } else {
        0.0
    }
}

/// "Does not grow": the last point's median trigger → READY within [`FLAT_MS`] of the first's.
fn flat_target(what: &str, c: &Curve) -> Option<Target> {
    let (first, last) = (c.points.first()?, c.points.last()?);
    if c.points.len() < 2 {
        return None;
    }
    let growth = last.ready() - first.ready();
    Some(Target {
        what: what.to_owned(),
        met: growth < FLAT_MS,
        reason: format!(
            "median trigger → READY {:.3} ms at {} against {:.3} ms at {}: {:+.3} ms (the bound: \
             {FLAT_MS} ms)",
            last.ready(),
            last.label,
            first.ready(),
            first.label,
            growth
        ),
    })
}

fn listeners(o: &Opts, dir: &Path) -> Result<Curve, String> {
    let wanted: &[usize] = if o.quick {
        &[1, 100]
    } else {
        &[1, 10, 100, 1000, 10_000]
    };
    let mut c = Curve::new(
        "listeners",
        "trigger → READY and the rest against the listeners handed over (TCP), no connections"
            .into(),
        ("listeners", "count"),
    );
    let xs = wanted.to_vec();
    // Per process: the old one's listeners, and the new one's (less what it closes).
    scenario::raise_nofile(*xs.last().unwrap_or(&1) as u64 + 1024);
    for &n in &xs {
        let rounds = rounds_of(
            dir,
            &format!("listeners-{n}"),
            // Three in the quick mode too: its check compares two medians.
            o.rounds_or(5, 3),
            n,
            Held::idle(0),
            &[],
            &|_| Ok(()),
        )?;
        c.points.push(Point {
            x: n as f64,
            label: n.to_string(),
            rounds,
            cols: Vec::new(),
            extra: json!({}),
        });
    }
    let pts: Vec<(f64, f64)> = c.points.iter().map(|p| (p.x, p.ready())).collect();
    if pts.len() >= 2 {
        let per_1000 = slope(&pts) * 1000.0;
        c.targets.push(Target {
            what: "trigger → READY grows by < 1 ms per 1,000 listeners".into(),
            met: per_1000 < 1.0,
            reason: format!(
                "{per_1000:.3} ms per 1,000 listeners (least squares of the medians, {} to {} \
                 listeners)",
                xs[0],
                xs[xs.len() - 1],
            ),
        });
    }
    if o.quick {
        if let (Some(a), Some(b)) = (c.points.first(), c.points.last()) {
            if b.ready() > 10.0 * a.ready() {
                c.failed_checks.push(format!(
                    "trigger → READY with {} listeners is {:.1}× that with {} (bound 10×)",
                    b.label,
                    b.ready() / a.ready(),
                    a.label
                ));
            }
        }
    }
    Ok(c)
}

/// RSS per connection of a server of `kind` holding `n` connections (no upgrade).
fn rss_per_conn_of(dir: &Path, kind: &str, n: usize) -> Result<f64, String> {
    let srv = start_server(dir, &format!("baseline-{kind}"), kind, 1, &[])?;
    let before = rss_kib(srv.pid);
    let r = hold(srv.addrs[0], n).map(|held| {
        let after = rss_kib(srv.pid);
        drop(held);
        after.saturating_sub(before) as f64 * 1024.0 / n as f64
    });
    stop_all(srv.pid, &[]);
    r
}

/// The connections curve, idle or `active` (each connection pinged in turn through the upgrade).
fn connections(o: &Opts, dir: &Path, active: bool) -> Result<Curve, String> {
    let wanted: &[usize] = match (o.quick, active) {
        (true, false) => &[1000],
        (true, true) => &[100],
        (false, false) => &[0, 1000, 10_000, 100_000],
        // From `BATCH` connections: the pinger keeps `BATCH` pings in flight (fewer with fewer
        // connections), so these points differ in the connections held, not in the load.
        (false, true) => &[BATCH, 3000, 10_000],
    };
    let mut c = Curve::new(
        if active { "active" } else { "connections" },
        if active {
            "against the connections the old process holds, each pinged in turn by the client \
             from the trigger until it closes them after READY (the drain), 1 listener; the old \
             process's CPU includes the echoes"
        } else {
            "against the idle connections the old process holds (closed by the client after \
             READY: the drain), 1 listener"
        }
        .into(),
        ("connections", "count"),
    );
    let limit = scenario::raise_nofile(*wanted.last().unwrap_or(&0) as u64 + 4096);
    let reachable: Vec<usize> = wanted
        .iter()
        .copied()
        .filter(|&n| n as u64 + 2048 <= limit)
        .collect();
    if reachable.len() < wanted.len() {
        c.capped = Some(format!(
            "the fd limit is {limit} and could not be raised (the hard limit needs \
             CAP_SYS_RESOURCE; the old process itself holds every connection): points above {} \
             connections skipped",
            limit.saturating_sub(2048)
        ));
    }
    for &n in &reachable {
        let tag = format!("{}-{n}", c.name);
        let held = Held { conns: n, active };
        let rounds = rounds_of(dir, &tag, o.rounds(3), 1, held, &[], &|_| Ok(()))?;
        let mut p = Point {
            x: n as f64,
            label: n.to_string(),
            rounds,
            cols: Vec::new(),
            extra: json!({}),
        };
        let per_conn: Vec<f64> = p.rounds.iter().filter_map(|r| r.rss_per_conn).collect();
        let cpu_per_conn = (n > 0).then(|| p.med(|r| r.cpu_drain) * 1e3 / n as f64);
        p.cols.push((
            "RSS/conn",
            if per_conn.is_empty() {
                "–".into()
            } else {
                format!("{:.0} B", median(per_conn))
            },
        ));
        p.cols.push((
            "drain CPU/conn",
            cpu_per_conn.map_or("–".into(), |v| format!("{v:.2} µs")),
        ));
        let pings = median(
            p.rounds
                .iter()
                .filter_map(|r| r.pings.map(|n| n as f64))
                .collect(),
        );
        if active {
            p.cols.push((
                "pings answered",
                if pings.is_finite() {
                    format!("{pings:.0}")
                } else {
                    "–".into()
                },
            ));
        }
        p.extra = json!({
            "old_cpu_drain_us_per_conn": cpu_per_conn.map(r3),
            "pings_during_upgrade": active.then(|| r3(pings)),
        });
        c.points.push(p);
    }
    if let Some(t) = flat_target(
        "trigger → READY does not grow with the old process's connections",
        &c,
    ) {
        c.targets.push(t);
    }
    // The baseline: the same connections on ringflip's server on tokio and on a plain tokio
    // server without ringflip (once: the idle curve's).
    if let Some(&n) = reachable.iter().rfind(|&&n| n > 0).filter(|_| !active) {
        let ours = rss_per_conn_of(dir, "ringflip-tokio", n)?;
        let plain = rss_per_conn_of(dir, "plain", n)?;
        c.notes.push(format!(
            "RSS per held connection at {n}, both on a current-thread tokio runtime: ringflip's \
             echo server {ours:.0} B, a plain tokio echo server {plain:.0} B ({:.2}×)",
            ours / plain
        ));
        c.targets.push(Target {
            what: format!(
                "{n} held connections cost the old process no more than the connections \
                 themselves"
            ),
            met: ours <= CONN_RSS_RATIO * plain,
            reason: format!(
                "RSS per connection {ours:.0} B with ringflip against {plain:.0} B without, on \
                 the same runtime (the bound: {CONN_RSS_RATIO}×){}",
                if n < 100_000 {
                    format!("; measured at {n}, not 100k")
                } else {
                    String::new()
                }
            ),
        });
        if let Some(Value::Object(m)) = c.points.last_mut().map(|p| &mut p.extra) {
            m.insert(
                "baseline_rss_bytes_per_conn".into(),
                json!({"ringflip_tokio": r3(ours), "plain_tokio": r3(plain)}),
            );
        }
    }
    Ok(c)
}

/// MemAvailable, MiB.
fn mem_available_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |k| k / 1024)
}

/// Times `rounds` plain `fork()`s of this process with `mib` MiB more of it resident (mapped,
/// faulted in, unmapped afterwards): the parent's side, until `fork` returns. Also this
/// process's VmRSS then, MiB.
fn forks(mib: usize, rounds: usize) -> Result<(Vec<f64>, f64), String> {
    let bytes = mib << 20;
    let base = if bytes > 0 {
        // SAFETY: a fresh anonymous private mapping, unmapped below; no Rust object refers to it.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(format!(
                "mapping {mib} MiB: {}",
                std::io::Error::last_os_error()
            ));
        }
        for off in (0..bytes).step_by(4 << 20) {
            // SAFETY: a range inside the mapping made above.
            let rc = unsafe {
                libc::madvise(
                    base.cast::<u8>().add(off).cast(),
                    (4 << 20).min(bytes - off),
                    libc::MADV_POPULATE_WRITE,
                )
            };
            if rc != 0 {
                let e = std::io::Error::last_os_error();
                // SAFETY: the mapping made above, unmapped once.
                unsafe { libc::munmap(base, bytes) };
                return Err(format!("faulting {mib} MiB in: {e}"));
            }
        }
        Some(base)
    } else {
        None
    };
    let rss = rss_kib(std::process::id()) as f64 / 1024.0;
    let times = (0..rounds)
        .map(|_| {
            let t0 = Instant::now();
            // SAFETY: the child only calls _exit, which is async-signal-safe.
            let pid = unsafe { libc::fork() };
            if pid == 0 {
                // SAFETY: in the child of fork: leave at once.
                unsafe { libc::_exit(0) };
            }
            let took = t0.elapsed();
            if pid > 0 {
                // SAFETY: waiting for our own child.
                unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
            }
            ms(took)
        })
        .collect();
    if let Some(base) = base {
        // SAFETY: the mapping made above, unmapped once.
        unsafe { libc::munmap(base, bytes) };
    }
    Ok((times, rss))
}

/// A VM's free page reporting (virtio-balloon): its order (free blocks of at least this order
/// are handed back to the host; above the largest block order, 10 on x86-64, none is) and, where
/// the kernel counts it, the KiB handed back so far (`reported_kib`, not in every kernel);
/// `None` without it.
fn page_reporting() -> Option<(u32, Option<u64>)> {
    let read = |name: &str| {
        std::fs::read_to_string(format!("/sys/module/page_reporting/parameters/{name}"))
            .ok()?
            .trim()
            .parse::<u64>()
            .ok()
    };
    Some((read("page_reporting_order")? as u32, read("reported_kib")))
}

/// What the rss curve ran under. With free page reporting, memory freed in the guest goes back
/// to the host, and a page the new process touches first may be faulted in by the host: with
/// 16 GiB held by the old process, most free memory was (measured: BENCHMARKS-LAB.md §9).
fn page_reporting_note(
    before: Option<(u32, Option<u64>)>,
    after: Option<(u32, Option<u64>)>,
) -> String {
    // x86-64's largest free block order (`MAX_PAGE_ORDER`); other page sizes differ.
    const LARGEST_ORDER: u32 = 10;
    match (before, after) {
        (Some((order, kib0)), after) if order <= LARGEST_ORDER => {
            let handed_back = match (kib0, after.and_then(|(_, kib)| kib)) {
                (Some(k0), Some(k1)) => format!(
                    "{} MiB of freed memory handed back to the host during the curve",
                    k1.saturating_sub(k0) >> 10
                ),
                _ => "this kernel does not count what it handed back".into(),
            };
            format!(
                "free page reporting on (virtio-balloon, order {order}): {handed_back}; the new \
                 process's first touches of such pages are faulted in by the host. Off (root, \
                 until reboot): echo 11 > /sys/module/page_reporting/parameters/page_reporting_order"
            )
        }
        (Some((order, _)), _) => {
            format!("free page reporting off (order {order}, above the largest block)")
        }
        _ => "no free page reporting (not a VM with virtio-balloon's, or not readable)".into(),
    }
}

fn rss(o: &Opts, dir: &Path) -> Result<Curve, String> {
    let mut sizes: Vec<usize> = if o.quick { vec![0, 64] } else { vec![0, 1024] };
    if o.big_rss && !o.quick {
        sizes.extend([4096, 16_384]);
    }
    let mut c = Curve::new(
        "rss",
        "against the old process's resident memory (--ballast-mib, generation 0 only), and a \
         plain fork() of this bench grown as big"
            .into(),
        ("resident", "MiB"),
    );
    if !o.big_rss && !o.quick {
        c.notes
            .push("4 and 16 GiB with --big-rss (opt-in: ~1-3 s per GiB to fault in)".into());
    }
    let rounds = o.rounds(3);
    let reported_before = page_reporting();
    for &mib in &sizes {
        // The server's ballast, then (once it is gone) the bench's own, one at a time.
        let avail = mem_available_mib();
        if mib as u64 + 2048 > avail {
            c.notes.push(format!(
                "{mib} MiB skipped: MemAvailable is {avail} MiB (2 GiB kept free)"
            ));
            continue;
        }
        let extra: Vec<String> = if mib > 0 {
            vec![
                "--ballast-mib".into(),
                mib.to_string(),
                "--ballast-once".into(),
            ]
        } else {
            Vec::new()
        };
        // Until the ballast is resident and the thread faulting it in is done (RSS steady for
        // 200 ms): its faults must not be measured as the upgrade's.
        let wait = move |srv: &Server| -> Result<(), String> {
            let deadline = Instant::now() + Duration::from_secs(30 + 10 * (mib as u64 >> 10));
            let mut last = (0, Instant::now());
            loop {
                let now = rss_mib(srv.pid);
                if now >= mib as u64 && now <= last.0 + 1 {
                    if last.1.elapsed() >= Duration::from_millis(200) {
                        return Ok(());
                    }
                } else {
                    last = (now, Instant::now());
                }
                if Instant::now() > deadline {
                    return Err(format!("the ballast of {mib} MiB was not resident in time"));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        };
        let ups = rounds_of(
            dir,
            &format!("rss-{mib}"),
            rounds,
            1,
            Held::idle(0),
            &extra,
            &wait,
        )?;
        let (fork_ms, fork_rss) = forks(mib, rounds.max(3))?;
        let mut p = Point {
            x: mib as f64,
            label: if mib == 0 {
                "no ballast".into()
            } else {
                format!("{mib} MiB")
            },
            rounds: ups,
            cols: Vec::new(),
            extra: json!({}),
        };
        let fork_med = median(fork_ms.clone());
        p.cols.push(("fork median", format!("{fork_med:.3}ms")));
        p.cols.push(("fork max", format!("{:.3}ms", max(&fork_ms))));
        p.cols.push(("forked RSS", format!("{fork_rss:.0}MiB")));
        p.extra = json!({
            "fork": {"median": r3(fork_med), "max": r3(max(&fork_ms))},
            "forked_rss_mib": r3(fork_rss),
        });
        c.points.push(p);
    }
    if let Some(t) = flat_target(
        "trigger → READY does not grow with the old process's RSS",
        &c,
    ) {
        c.targets.push(t);
    }
    c.notes
        .push(page_reporting_note(reported_before, page_reporting()));
    if let (Some(a), Some(b)) = (c.points.first(), c.points.last()) {
        if c.points.len() >= 2 {
            let fork = |p: &Point| p.extra["fork"]["median"].as_f64().unwrap_or(f64::NAN);
            c.notes.push(format!(
                "{} against {}: trigger → READY {:.2}×, a fork {:.1}×",
                b.label,
                a.label,
                b.ready() / a.ready(),
                fork(b) / fork(a)
            ));
        }
    }
    Ok(c)
}

fn state(o: &Opts, dir: &Path) -> Result<Curve, String> {
    let wanted: &[usize] = if o.quick {
        &[1 << 20]
    } else {
        &[0, 64 << 10, 1 << 20, 100 << 20, 1 << 30]
    };
    let mut c = Curve::new(
        "state",
        "against the state handed over (--handoff-state-bytes, read by the successor before \
         its READY), 1 listener, no connections"
            .into(),
        ("state", "bytes"),
    );
    let mut base = None;
    for &bytes in wanted {
        // Set by generation 0 only: its successor reads it (as a stream above 64 KiB) before
        // its READY, and builds none for the next generation.
        let extra: Vec<String> = if bytes > 0 {
            vec![
                "--handoff-state-bytes".into(),
                bytes.to_string(),
                "--handoff-state-once".into(),
            ]
        } else {
            Vec::new()
        };
        let rounds = rounds_of(
            dir,
            &format!("state-{bytes}"),
            // 1 GiB takes seconds a handoff (and to build in generation 0).
            o.rounds(if bytes >= 100 << 20 { 3 } else { 5 }),
            1,
            Held::idle(0),
            &extra,
            &|_| Ok(()),
        )?;
        let mut p = Point {
            x: bytes as f64,
            label: if bytes >= 1 << 20 {
                format!("{} MiB", bytes >> 20)
            } else if bytes >= 1 << 10 {
                format!("{} KiB", bytes >> 10)
            } else {
                bytes.to_string()
            },
            rounds,
            cols: Vec::new(),
            extra: json!({}),
        };
        let t = p.ready();
        if bytes == 0 {
            base = Some(t);
        }
        let mb = bytes as f64 / 1e6;
        let all = (bytes > 0).then(|| mb / (t / 1e3));
        let marginal = base
            .filter(|&b| bytes > 0 && t > b)
            .map(|b| mb / ((t - b) / 1e3));
        p.cols
            .push(("MB/s (all)", all.map_or("–".into(), |v| format!("{v:.1}"))));
        p.cols.push((
            "MB/s (marginal)",
            match (bytes, base, marginal) {
                (0, _, _) | (_, None, _) => "–".into(),
                (_, Some(_), None) => "within noise".into(),
                (_, _, Some(v)) => format!("{v:.1}"),
            },
        ));
        p.extra = json!({"mb_per_s": all.map(r3), "mb_per_s_marginal": marginal.map(r3)});
        c.points.push(p);
    }
    c.notes.push(
        "no target in the issue for this curve: MB/s reported. \"all\": the state's bytes over \
         trigger → READY; \"marginal\": over its growth from the 0 point"
            .into(),
    );
    Ok(c)
}

fn interval(o: &Opts, dir: &Path) -> Result<Curve, String> {
    let intervals: &[u64] = if o.quick { &[250] } else { &[250, 100, 50] };
    let mut c = Curve::new(
        "interval",
        format!(
            "back-to-back upgrades (control socket), {} each, --max-draining {}, each old \
             generation holding {HOLD_CONNS} idle connections for {} ms after it is replaced, \
             {} conn/s open-loop load",
            o.upgrades,
            o.max_draining,
            o.hold.as_millis(),
            o.rate
        ),
        ("interval", "ms"),
    );
    c.upgrades = false;
    let mut total_failed = 0u64;
    let mut refusals_from = None;
    for &iv in intervals {
        let ctl = dir.join(format!("ctl-{iv}.sock"));
        let srv = start_server(
            dir,
            &format!("interval-{iv}"),
            "ringflip",
            1,
            &[
                "--control".into(),
                ctl.display().to_string(),
                "--max-draining".into(),
                o.max_draining.to_string(),
            ],
        )?;
        let addr = srv.addrs[0];
        let load = support::load::Load::start(support::load::LoadConfig {
            addr,
            rate: o.rate,
            long_lived: 0,
            ping_interval: Duration::from_millis(100),
            timeout: Duration::from_secs(3),
            max_duration: Duration::from_millis(iv) * (o.upgrades as u32 + 4)
                + Duration::from_secs(60),
            cpu: None,
        });
        let (mut done, mut busy, mut failed, mut held_failed) = (0usize, 0usize, 0usize, 0u64);
        let mut answers = Vec::new();
        let mut pids = vec![srv.pid];
        let mut current = srv.pid;
        let mut pending: VecDeque<(Instant, Vec<TcpStream>)> = VecDeque::new();
        let release = |pending: &mut VecDeque<(Instant, Vec<TcpStream>)>, all: bool| -> u64 {
            let mut failed = 0;
            while pending
                .front()
                .is_some_and(|(at, _)| all || *at <= Instant::now())
            {
                let (_, mut conns) = pending.pop_front().expect("checked");
                if ping_all(&mut conns).is_err() {
                    failed += conns.len() as u64;
                }
            }
            failed
        };
        let interval = Duration::from_millis(iv);
        std::thread::sleep(interval);
        for _ in 0..o.upgrades {
            let at = Instant::now();
            held_failed += release(&mut pending, false);
            let held = hold(addr, HOLD_CONNS).unwrap_or_else(|e| {
                eprintln!("interval {iv} ms: holding: {e}");
                held_failed += HOLD_CONNS as u64;
                Vec::new()
            });
            let t0 = Instant::now();
            let reply = ringflip::control_client::request(
                &ctl,
                ringflip::control_client::Command::Upgrade,
                Duration::from_secs(30),
            );
            let took = ms(t0.elapsed());
            use ringflip::control_client::Reply;
            match reply {
                Ok(Reply::Upgraded(pid)) => {
                    done += 1;
                    answers.push(took);
                    pids.push(pid);
                    current = pid;
                }
                Ok(Reply::Busy(_)) => busy += 1,
                Ok(other) => {
                    eprintln!("interval {iv} ms: upgrade: {other}");
                    failed += 1;
                }
                Err(e) => {
                    eprintln!("interval {iv} ms: upgrade: {e}");
                    failed += 1;
                }
            }
            pending.push_back((Instant::now() + o.hold, held));
            reap_any();
            // Until the next upgrade, each hold released when due (not at the next turn).
            while at.elapsed() < interval {
                held_failed += release(&mut pending, false);
                let next = pending.front().map_or(at + interval, |(due, _)| *due);
                let until = next.min(at + interval);
                std::thread::sleep(until.saturating_duration_since(Instant::now()));
            }
        }
        held_failed += release(&mut pending, true);
        std::thread::sleep(Duration::from_millis(200));
        let report = load.stop();
        stop_all(current, &pids);
        let conns_failed = report.failures.total();
        total_failed += failed as u64 + conns_failed + held_failed;
        if busy > 0 {
            refusals_from = Some(iv);
        }
        let (m, mx) = (median(answers.clone()), max(&answers));
        c.points.push(Point {
            x: iv as f64,
            label: format!("{iv} ms"),
            rounds: Vec::new(),
            cols: vec![
                ("done / asked", format!("{done} / {}", o.upgrades)),
                ("refused (busy)", busy.to_string()),
                ("failed upgrades", failed.to_string()),
                (
                    "failed conns",
                    format!("{conns_failed} of {}", report.samples.len()),
                ),
                ("held pings failed", held_failed.to_string()),
                ("ctl→ok median", format!("{m:.3}ms")),
                ("ctl→ok max", format!("{mx:.3}ms")),
            ],
            extra: json!({
                "upgrades_asked": o.upgrades, "done": done, "busy": busy, "failed": failed,
                "connections": report.samples.len(), "connections_failed": conns_failed,
                "held_failed": held_failed,
                "request_to_ok": {"median": r3(m), "max": r3(mx)},
            }),
        });
        if failed == 0 && conns_failed == 0 && held_failed == 0 {
            let _ = std::fs::remove_file(&srv.log);
        }
    }
    c.notes.push(match refusals_from {
        Some(iv) => format!(
            "refusals (busy: {} older generations still draining) start at {iv} ms",
            o.max_draining
        ),
        None => format!(
            "no refusal down to {} ms",
            intervals.last().copied().unwrap_or(0)
        ),
    });
    c.targets.push(Target {
        what: "back-to-back upgrades fail nothing".into(),
        met: total_failed == 0,
        reason: format!(
            "{total_failed} failed (upgrades, connections of the load, held connections' pings)"
        ),
    });
    if total_failed > 0 {
        c.failures
            .push(format!("{total_failed} failures in back-to-back upgrades"));
    }
    Ok(c)
}
