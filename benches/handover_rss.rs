//! Does the old process's size change the handover? ringflip starts the new binary with a
//! vfork (`src/spawn.rs`: no page tables copied), so it should not; a `fork` copies them.
//!
//! ```text
//! cargo bench --bench handover_rss            # 20 handovers per size: 0 and 2048 MiB
//! cargo bench --bench handover_rss -- --test  # CI: 3 handovers per size, 0 and 64 MiB
//! ```
//!
//! In one run, side by side, for this process at its own size and then with a ballast of
//! `--ballast-mib` resident (every page faulted in): the time of a real ringflip handover —
//! `Handle::upgrade()` on a server in this process, to this same binary as the new process,
//! until the new process's READY — and, for comparison, the time a `fork` takes
//! (`std::process::Command` with a `pre_exec` hook, which forces a fork; returns once the
//! child exists). No load runs: this isolates what the old process's size costs. The new
//! process does nothing but adopt the listener, send READY and wait for a SIGTERM, sent once the
//! old server has exited.

use std::os::unix::process::CommandExt;
use std::time::{Duration, Instant};

#[path = "../examples/support/mod.rs"]
mod support;

/// Set by ringflip in the new process (the handoff socket's fd number).
const HANDOFF_ENV: &str = "RINGFLIP_HANDOFF_FD";

fn main() {
    if std::env::var_os(HANDOFF_ENV).is_some() {
        return new_process();
    }
    let quick = std::env::args().any(|a| a == "--test");
    let mut rounds = if quick { 3 } else { 20 };
    let mut ballast_mib: usize = if quick { 64 } else { 2048 };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || -> usize {
            args.next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{flag} needs a number"))
        };
        match flag.as_str() {
            "--rounds" => rounds = value(),
            "--ballast-mib" => ballast_mib = value(),
            _ => {} // --bench, --test, criterion-style filters
        }
    }
    assert!(rounds > 0, "--rounds must be at least 1");
    assert!(ballast_mib > 0, "--ballast-mib must be at least 1");
    println!("handover vs the old process's size: {rounds} handovers and {rounds} forks per size");
    println!(
        "{:>10} {:>18} {:>18} {:>14} {:>14}",
        "RSS", "handover median", "handover max", "fork median", "fork max"
    );
    let mut rows = Vec::new();
    for (i, mib) in [0, ballast_mib].into_iter().enumerate() {
        if i == 1 {
            support::echo_server::populate(mib << 20).expect("faulting in the ballast");
        }
        let rss = support::scenario::rss_mib(std::process::id());
        let handovers = stats((0..rounds).map(|_| handover()).collect());
        let forks = stats((0..rounds).map(|_| fork()).collect());
        println!(
            "{:>7}MiB {:>16.2}ms {:>16.2}ms {:>12.2}ms {:>12.2}ms",
            rss,
            ms(handovers.0),
            ms(handovers.1),
            ms(forks.0),
            ms(forks.1)
        );
        rows.push((handovers, forks));
    }
    let (small, big) = (&rows[0], &rows[1]);
    println!(
        "big / small: handover {:.2}x, fork {:.1}x",
        ms(big.0 .0) / ms(small.0 .0),
        ms(big.1 .0) / ms(small.1 .0)
    );
}

/// One real handover from a fresh server in this process: `upgrade()` returns at READY.
fn handover() -> Duration {
    let server = ringflip::Server::builder()
        .listen_tcp("h", "127.0.0.1:0".parse().unwrap())
        .ready_timeout(Duration::from_secs(10))
        .drain_timeout(Duration::from_secs(5))
        .build()
        .expect("building the server");
    let handle = server.handle();
    let serving = std::thread::spawn(move || server.run(drop).expect("serving"));
    let t0 = Instant::now();
    let new_pid = handle.upgrade().expect("the handover");
    let took = t0.elapsed();
    serving.join().expect("the old server");
    // Only now: a new process that died while the old server still drained would (rightly)
    // make the old one serve again, and this join would never return (seen once in CI, when
    // the new process stopped by itself right after READY).
    // SAFETY: plain syscall on our own child, not reaped yet.
    unsafe { libc::kill(new_pid as libc::pid_t, libc::SIGTERM) };
    wait(new_pid);
    took
}

/// The new process: adopt the listener, say READY (`run` does, first thing), serve until the
/// SIGTERM that follows the old server's exit.
fn new_process() {
    let server = ringflip::Server::builder()
        .listen_tcp("h", "127.0.0.1:0".parse().unwrap())
        .drain_timeout(Duration::from_secs(5))
        .build()
        .expect("adopting the listener");
    server.run(drop).expect("serving");
}

/// The time a fork takes in this process, to `Command::spawn`'s return (std waits there until
/// the child has exec'ed, so /bin/true's exec is in it too).
fn fork() -> Duration {
    let mut cmd = std::process::Command::new("/bin/true");
    // SAFETY: the hook does nothing; its presence makes std fork instead of posix_spawn.
    unsafe { cmd.pre_exec(|| Ok(())) };
    let t0 = Instant::now();
    let mut child = cmd.spawn().expect("fork");
    let took = t0.elapsed();
    child.wait().expect("reaping");
    took
}

fn wait(pid: u32) {
    // SAFETY: waiting for our own child, blocking.
    unsafe { libc::waitpid(pid as libc::pid_t, std::ptr::null_mut(), 0) };
}

/// (median, max)
fn stats(mut v: Vec<Duration>) -> (Duration, Duration) {
    v.sort_unstable();
    (v[v.len() / 2], v[v.len() - 1])
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
