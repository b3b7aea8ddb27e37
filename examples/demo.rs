//! The headline demo: an echo server under open-loop load, upgraded again and again.
//!
//! ```text
//! cargo run --release --example demo
//! cargo run --release --example demo -- --upgrades 100 --rate 5000 --interval-ms 1000
//! ```
//!
//! It starts this same binary as the server (`demo --serve …`, the echo server of
//! `examples/echo.rs`), drives it with new connections at `--rate` per second (latency measured
//! from each connection's scheduled start) plus `--long-lived` connections pinging every 100 ms,
//! and every `--interval-ms` sends the serving process SIGHUP together with a burst of
//! `--burst` simultaneous connects. Then it prints, per upgrade: old pid → new pid, the handover
//! time (SIGHUP sent → the new process's pid file appears, written right after its READY), the
//! failed connections in the 500 ms after the trigger, and in-window p99 against steady p99;
//! then totals, failures by kind and server CPU. Exits non-zero if any connection failed.

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

mod support;
use support::load::{cpus, Load, LoadConfig};

const WINDOW: Duration = Duration::from_millis(500);

struct Opts {
    upgrades: usize,
    rate: u32,
    interval: Duration,
    long_lived: usize,
    burst: usize,
}

fn parse() -> Result<Opts, String> {
    let mut o = Opts {
        upgrades: 10,
        rate: 5000,
        interval: Duration::from_millis(1000),
        long_lived: 16,
        burst: 512,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let v = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let n: u64 = v.parse().map_err(|e| format!("{flag} {v}: {e}"))?;
        match flag.as_str() {
            "--upgrades" => o.upgrades = n as usize,
            "--rate" => o.rate = n as u32,
            "--interval-ms" => o.interval = Duration::from_millis(n),
            "--long-lived" => o.long_lived = n as usize,
            "--burst" => o.burst = n as usize,
            other => return Err(format!("unknown option {other}")),
        }
    }
    Ok(o)
}

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1).peekable();
    if args.peek().map(String::as_str) == Some("--serve") {
        return support::echo_server::main(args.skip(1));
    }
    let opts = match parse() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("demo: {e}");
            return ExitCode::from(2);
        }
    };
    match run(&opts) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("demo: {e}");
            ExitCode::FAILURE
        }
    }
}

struct UpgradeRow {
    old: u32,
    new: u32,
    at: Instant,
    handover: Duration,
}

fn run(opts: &Opts) -> Result<bool, String> {
    // Orphaned old generations re-parent to us, so we can reap them and count their CPU.
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    let dir = std::env::temp_dir().join(format!("ringflip-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let pid_file = dir.join("pid");
    let log = dir.join("server.log");
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| e.to_string())?
        .port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let ncpu = cpus();
    let two_cores = ncpu >= 2;

    let mut cmd = Command::new(&exe);
    cmd.arg("--serve")
        .args(["--listen", &addr.to_string()])
        .arg("--pid-file")
        .arg(&pid_file)
        .args(["--drain-timeout-ms", "30000"])
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or("warn".into()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).map_err(|e| e.to_string())?);
    if two_cores {
        // Server on CPU 0, load on CPU 1: they do not measure each other. The server inherits
        // the affinity from this thread at spawn, and its upgraded processes from it.
        support::load::pin_to_cpu(0);
    }
    let first = cmd
        .spawn()
        .map_err(|e| format!("starting the server: {e}"))?;
    if two_cores {
        // Back to any CPU for ourselves; the load thread pins itself to CPU 1.
        unpin(ncpu);
    }
    let mut pids = vec![first.id()];
    let mut current = wait_for_pid(&pid_file, None, Duration::from_secs(10))
        .ok_or_else(|| format!("the server did not start; see {}", log.display()))?;
    let cpu_before = children_cpu();
    let t0 = Instant::now();

    println!(
        "ringflip demo: echo server {addr}, {} conn/s open loop + {} long-lived, {} upgrades every {} ms with a {}-connection burst each",
        opts.rate,
        opts.long_lived,
        opts.upgrades,
        opts.interval.as_millis(),
        opts.burst
    );
    let load = Load::start(LoadConfig {
        addr,
        rate: opts.rate,
        long_lived: opts.long_lived,
        ping_interval: Duration::from_millis(100),
        timeout: Duration::from_secs(3),
        max_duration: opts.interval * (opts.upgrades as u32 + 4) + Duration::from_secs(30),
        cpu: two_cores.then_some(1),
    });
    std::thread::sleep(opts.interval);
    let mut rows = Vec::new();
    let mut failed_upgrades = 0;
    for _ in 0..opts.upgrades {
        let old = current;
        let at = Instant::now();
        load.burst(opts.burst);
        // SAFETY: plain syscall.
        unsafe { libc::kill(old as i32, libc::SIGHUP) };
        match wait_for_pid(&pid_file, Some(old), Duration::from_secs(10)) {
            Some(new) => {
                rows.push(UpgradeRow {
                    old,
                    new,
                    at,
                    handover: at.elapsed(),
                });
                pids.push(new);
                current = new;
            }
            None => failed_upgrades += 1,
        }
        reap();
        std::thread::sleep(opts.interval.saturating_sub(at.elapsed()));
    }
    std::thread::sleep(Duration::from_millis(500));
    let report = load.stop();

    // Stop the newest; the old ones exit as their long-lived connections are now closed.
    // SAFETY: plain syscall.
    unsafe { libc::kill(current as i32, libc::SIGTERM) };
    let all_gone = wait_all_gone(&pids, Duration::from_secs(40));
    let wall = t0.elapsed();
    let cpu = children_cpu().saturating_sub(cpu_before);

    let windows: Vec<(Instant, Instant)> = rows.iter().map(|r| (r.at, r.at + WINDOW)).collect();
    let in_window = |t: Instant| windows.iter().any(|(a, b)| t >= *a && t < *b);
    let steady = report.stats(|t| !in_window(t));
    println!();
    println!(
        "{:>3}  {:>8} → {:<8} {:>10} {:>8} {:>12} {:>12}",
        "#", "old pid", "new pid", "handover", "failed", "window p99", "steady p99"
    );
    for (i, r) in rows.iter().enumerate() {
        let (a, b) = (r.at, r.at + WINDOW);
        let w = report.stats(|t| t >= a && t < b);
        println!(
            "{:>3}  {:>8} → {:<8} {:>8.2}ms {:>8} {:>10.3}ms {:>10.3}ms",
            i + 1,
            r.old,
            r.new,
            ms(r.handover),
            report.failures_in(|t| t >= a && t < b),
            ms(w.p99),
            ms(steady.p99)
        );
    }
    let window = report.stats(in_window);
    let f = &report.failures;
    println!();
    println!(
        "connections: {} ok, {} failed (refused {}, reset {}, eof {}, timeout {}, wrong reply {}, other {})",
        report.ok(),
        f.total(),
        f.refused,
        f.reset,
        f.eof,
        f.timeout,
        f.wrong_reply,
        f.other
    );
    println!(
        "long-lived pings: {} ok, {} failed",
        report.pings_ok, report.pings_failed
    );
    println!(
        "accept+echo latency steady:    p50 {:.3} ms  p99 {:.3} ms  p99.9 {:.3} ms  max {:.3} ms  ({} conns)",
        ms(steady.p50),
        ms(steady.p99),
        ms(steady.p999),
        ms(steady.max),
        steady.count
    );
    println!(
        "accept+echo latency in window: p50 {:.3} ms  p99 {:.3} ms  p99.9 {:.3} ms  max {:.3} ms  ({} conns, 500 ms after each upgrade)",
        ms(window.p50),
        ms(window.p99),
        ms(window.p999),
        ms(window.max),
        window.count
    );
    let mut handovers: Vec<Duration> = rows.iter().map(|r| r.handover).collect();
    handovers.sort_unstable();
    if let Some(median) = handovers.get(handovers.len() / 2) {
        println!(
            "handover (SIGHUP → new pid file) median {:.2} ms, max {:.2} ms; {} of {} upgrades done",
            ms(*median),
            ms(*handovers.last().unwrap()),
            rows.len(),
            opts.upgrades
        );
    }
    println!(
        "server CPU (all generations, incl. the new processes' start-up): {:.2} s over {:.1} s = {:.1}% of one core",
        cpu.as_secs_f64(),
        wall.as_secs_f64(),
        100.0 * cpu.as_secs_f64() / wall.as_secs_f64()
    );
    for e in &report.first_errors {
        println!("  first errors: {e}");
    }
    if !all_gone {
        println!(
            "some server processes were still running and were killed; see {}",
            log.display()
        );
    }
    let ok = f.total() == 0 && report.pings_failed == 0 && failed_upgrades == 0 && all_gone;
    if ok {
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        println!("server log: {}", log.display());
    }
    Ok(ok)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn read_pid(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Polls the pid file until it names a live process other than `old`.
fn wait_for_pid(path: &Path, old: Option<u32>, timeout: Duration) -> Option<u32> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Some(pid) = read_pid(path) {
            if Some(pid) != old && alive(pid) {
                return Some(pid);
            }
        }
        std::thread::sleep(Duration::from_micros(100));
    }
    None
}

fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !matches!(
            s.rsplit(')')
                .next()
                .and_then(|r| r.split_whitespace().next()),
            Some("Z")
        ),
        Err(_) => false,
    }
}

fn reap() {
    // SAFETY: reaping any exited child (we are their subreaper), never blocking.
    while unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) } > 0 {}
}

/// Waits for every pid to exit (reaping as we go); SIGKILLs stragglers at the deadline.
fn wait_all_gone(pids: &[u32], timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        reap();
        if pids.iter().all(|p| !alive(*p)) {
            reap();
            return true;
        }
        if Instant::now() >= deadline {
            for p in pids {
                if alive(*p) {
                    // SAFETY: plain syscall on a pid we started (directly or by upgrade).
                    unsafe { libc::kill(*p as i32, libc::SIGKILL) };
                }
            }
            std::thread::sleep(Duration::from_millis(100));
            reap();
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// CPU time (user + system) of every reaped descendant.
fn children_cpu() -> Duration {
    // SAFETY: rusage is plain data, filled by the kernel.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is live.
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn unpin(ncpu: usize) {
    // SAFETY: cpu_set_t is plain data; CPU_SET writes within it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for c in 0..ncpu.max(1) {
            libc::CPU_SET(c, &mut set);
        }
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}
