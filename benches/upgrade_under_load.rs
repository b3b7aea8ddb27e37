//! Upgrade under load, side by side: the same open-loop load and the same upgrade schedule
//! against ringflip and the ways users restart servers today.
//!
//! ```text
//! cargo bench --bench upgrade_under_load                       # 20 upgrades per server
//! cargo bench --bench upgrade_under_load -- --upgrades 100 --rate 5000
//! cargo bench --bench upgrade_under_load -- --only ringflip,ecdysis
//! cargo bench --bench upgrade_under_load -- --test             # CI: 2 upgrades each, quick
//! cargo bench --bench upgrade_under_load -- --unpinned-server  # servers not pinned to CPU 0
//! ```
//!
//! Servers (each this same binary re-executed as `--serve KIND`, all echo servers):
//! - `burst-only`: ringflip's echo server with the same bursts and no upgrade at all: the
//!   baseline that shows what the bursts alone cost, so the others' in-window numbers can be
//!   read as "burst + upgrade";
//! - `ecdysis-burst-only`: the same for the ecdysis server, so that how a server copes with a
//!   burst can be told apart from what its upgrade costs (only with `--only`);
//! - `ringflip-tokio`: the same server serving on a plain tokio runtime (`run_async` on a
//!   `LocalSet`), like the tokio-based peers, so the upgrade libraries are compared on the same
//!   runtime;
//! - `ringflip`: examples/echo.rs's server (tokio-uring, ringflip's io_uring upgrade ring), SIGHUP;
//! - `ringflip-workers`: the same server thread-per-core (`--workers 2`: two accept rings, each
//!   on its own SO_REUSEPORT member of the listener, one coordinator), SIGHUP;
//! - `shellflip`, `ecdysis`: Cloudflare's Rust graceful-restart crates, each used as its docs
//!   intend, on tokio, SIGHUP (see benches/peers/);
//! - `naive`: a plain tokio server, SIGTERM then start a new one;
//! - `reuseport`: a plain tokio server with SO_REUSEPORT, start the new one, then SIGTERM the old;
//! - `nginx`: nginx's stream proxy in front of a plain echo backend, binary upgrade with SIGUSR2
//!   then SIGQUIT to the old master (skipped when nginx is not installed; see
//!   benches/peers/nginx_usr2.rs). It has a proxy hop the others do not;
//! - `haproxy`: HAProxy in master-worker mode in front of the same backend, seamless reload
//!   with SIGUSR2 to the master (skipped when HAProxy is not installed; see
//!   benches/peers/haproxy_reload.rs). Same proxy hop;
//! - `tableflip`: Cloudflare's tableflip (Go) echo server, SIGHUP (skipped when Debian's Go and
//!   tableflip packages are not installed; see benches/peers/tableflip_echo.rs).
//!
//! Per server: failures by kind, long-lived pings failed, latency (from each connection's
//! *scheduled* start, so stalls count) p50/p99/p99.9/max steady and in the 500 ms after each
//! upgrade, median handover (trigger → new process's pid file), and server CPU (all
//! generations) as a share of one core, and `steal0`: the time the hypervisor took CPU 0
//! away during the row (`/proc/stat`, 10 ms ticks), which is how this VM's host stalls show,
//! and `steal1` the same for CPU 1, the load generator's (a client that loses its CPU starts
//! its connections late, which counts as latency too).
//! After the rows: the slowest connection of each upgrade's window, as a median over the
//! upgrades (a row's p99.9 often comes from one or two stalled upgrades), and those slowest
//! connections sorted by what the VM did to them while they were open: CPU 0 or CPU 1 taken by
//! the host, or the client late to start them (`Outcome::window_worst`). Server on CPU 0
//! (unless `--unpinned-server`), load generator on CPU 1.

use std::process::ExitCode;
use std::time::Duration;

mod peers;
#[path = "../examples/support/mod.rs"]
mod support;

use support::scenario::{self, ms, Scenario, Strategy};

const ALL: [&str; 11] = [
    "burst-only",
    "ringflip",
    "ringflip-tokio",
    "ringflip-workers",
    "ecdysis",
    "shellflip",
    "reuseport",
    "naive",
    "nginx",
    "haproxy",
    "tableflip",
];

/// Rows run only when `--only` names them.
const EXTRA: [&str; 1] = ["ecdysis-burst-only"];

/// Accept rings of the `ringflip-workers` row (`Builder::workers`, thread-per-core).
const WORKERS: usize = 2;
/// The issue's bound on a window's slowest connection; windows at or above it are attributed.
const SLOW: Duration = Duration::from_millis(10);

struct Opts {
    upgrades: usize,
    rate: u32,
    interval: Duration,
    long_lived: usize,
    burst: usize,
    only: Vec<String>,
    pin_server: bool,
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    if let Some(exit) = peers::serve_if_asked(&argv) {
        return exit;
    }
    let mut o = Opts {
        upgrades: 20,
        rate: 5000,
        interval: Duration::from_millis(1000),
        long_lived: 16,
        burst: 512,
        only: ALL.iter().map(|s| s.to_string()).collect(),
        pin_server: true,
    };
    let mut it = argv.into_iter();
    while let Some(flag) = it.next() {
        match flag.as_str() {
            // `cargo bench` passes --bench; `cargo test --benches` and CI's quick run pass --test.
            "--bench" => {}
            "--unpinned-server" => o.pin_server = false,
            "--test" => {
                o.upgrades = 2;
                o.rate = 1000;
                o.interval = Duration::from_millis(500);
                o.burst = 64;
                o.long_lived = 4;
            }
            "--only" => {
                o.only = it
                    .next()
                    .unwrap_or_default()
                    .split(',')
                    .map(str::to_owned)
                    .collect()
            }
            "--upgrades" | "--rate" | "--interval-ms" | "--long-lived" | "--burst" => {
                let v: u64 = match it.next().and_then(|v| v.parse().ok()) {
                    Some(v) => v,
                    None => {
                        eprintln!("{flag} needs a number");
                        return ExitCode::from(2);
                    }
                };
                match flag.as_str() {
                    "--upgrades" => o.upgrades = v as usize,
                    "--rate" => o.rate = v as u32,
                    "--interval-ms" => o.interval = Duration::from_millis(v),
                    "--long-lived" => o.long_lived = v as usize,
                    _ => o.burst = v as usize,
                }
            }
            _ => {} // criterion-style filters and flags: ignored
        }
    }
    println!(
        "upgrade under load: {} conn/s open loop + {} long-lived pinging every 100 ms; {} upgrades \
         every {} ms, each with a burst of {} connects; server {}",
        o.rate,
        o.long_lived,
        o.upgrades,
        o.interval.as_millis(),
        o.burst,
        if o.pin_server {
            "pinned to CPU 0"
        } else {
            "not pinned"
        }
    );
    println!(
        "{:<16} {:>8} {:>7} {:>7} {:>6} {:>7} {:>6} {:>6} {:>6} {:>6} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>7} {:>7} {:>7}",
        "server", "conns", "failed", "refused", "reset", "eof", "tmout", "wrong", "other", "pings✗",
        "handover", "p50", "p99", "p99.9", "win p99", "win p99.9", "win max", "cpu%", "steal0", "steal1"
    );
    let mut all_ok = true;
    let mut timelines = Vec::new();
    let mut handover_windows = Vec::new();
    for kind in ALL
        .iter()
        .chain(EXTRA.iter())
        .filter(|k| o.only.iter().any(|x| x == *k))
    {
        if let Err(why) = peers::prepare(kind) {
            println!("{kind:<16} skipped: {why}");
            continue;
        }
        let (serve, strategy) = match *kind {
            "burst-only" => ("ringflip", Strategy::BurstOnly),
            "ecdysis-burst-only" => ("ecdysis", Strategy::BurstOnly),
            "ringflip" => ("ringflip", Strategy::Signal),
            "ringflip-tokio" => ("ringflip-tokio", Strategy::Signal),
            "ringflip-workers" => ("ringflip", Strategy::Signal),
            "ecdysis" => ("ecdysis", Strategy::Signal),
            "shellflip" => ("shellflip", Strategy::Signal),
            "reuseport" => ("plain", Strategy::ReusePort),
            "nginx" => ("nginx", Strategy::NginxUsr2),
            "haproxy" => ("haproxy", Strategy::HaproxyReload),
            "tableflip" => ("tableflip", Strategy::Signal),
            _ => ("plain", Strategy::Naive),
        };
        let s = Scenario {
            serve_args: vec!["--serve".into(), serve.into()],
            strategy,
            upgrades: o.upgrades,
            rate: o.rate,
            interval: o.interval,
            long_lived: o.long_lived,
            burst: o.burst,
            server_args: if *kind == "ringflip-workers" {
                vec!["--workers".into(), WORKERS.to_string()]
            } else {
                Vec::new()
            },
            warmup: Duration::ZERO,
            pin_server: o.pin_server,
            // The restart strategies without a handoff cannot keep long-lived connections;
            // give them a short drain so each restart completes within the interval.
            drain_timeout: match strategy {
                // Longer than the run, so the long-lived connections are never cut.
                Strategy::Signal | Strategy::BurstOnly => {
                    o.interval * (o.upgrades as u32 + 10) + Duration::from_secs(60)
                }
                _ => Duration::from_millis(300),
            },
        };
        let out = match scenario::run(&s) {
            Ok(out) => out,
            Err(e) => {
                println!("{kind:<16} could not run: {e}");
                // Only ringflip's own rows fail the bench; a peer that cannot run is reported.
                if kind.starts_with("ringflip") || *kind == "burst-only" {
                    all_ok = false;
                }
                continue;
            }
        };
        let r = &out.report;
        let f = &r.failures;
        let (st, w) = (out.steady(), out.window());
        println!(
            "{:<16} {:>8} {:>7} {:>7} {:>6} {:>7} {:>6} {:>6} {:>6} {:>6} {:>6.2}ms {:>7.3}ms {:>7.3}ms {:>7.3}ms {:>7.3}ms {:>7.3}ms {:>7.3}ms {:>6.1}% {:>5}ms {:>5}ms",
            kind,
            r.ok() + f.total() as usize,
            f.total(),
            f.refused,
            f.reset,
            f.eof,
            f.timeout,
            f.wrong_reply,
            f.other,
            r.pings_failed,
            ms(out.median_handover()),
            ms(st.p50),
            ms(st.p99),
            ms(st.p999),
            ms(w.p99),
            ms(w.p999),
            ms(w.max),
            100.0 * out.server_cpu.as_secs_f64() / out.wall.as_secs_f64(),
            out.steal_cpu0.as_millis(),
            out.steal_cpu1.as_millis()
        );
        if out.failed_upgrades > 0 || !out.all_gone {
            println!(
                "           {} upgrades did not complete; processes left over: {}; log {}",
                out.failed_upgrades,
                !out.all_gone,
                out.log.display()
            );
        }
        if *kind == "burst-only" {
            all_ok &= out.ok();
        }
        if kind.starts_with("ringflip") {
            all_ok &= out.ok();
        }
        if !out.timelines.is_empty() {
            timelines.push((*kind, out.timelines.clone()));
        }
        let worst = out.window_worst();
        let mut maxima: Vec<Duration> = worst.iter().map(|w| w.latency).collect();
        maxima.sort_unstable();
        handover_windows.push((
            *kind,
            out.handover_window(),
            maxima,
            out.steal_in_and_out_of_windows(),
            worst,
        ));
        if out.ok() {
            let _ = std::fs::remove_dir_all(&out.dir);
        }
    }
    println!();
    println!(
        "first {} ms after each trigger (the handover and the burst; later in the window this \
         VM's own stalls dominate):",
        scenario::HANDOVER_WINDOW.as_millis()
    );
    for (kind, st, _, _, _) in &handover_windows {
        println!(
            "  {kind:<16} p99 {:>7.3}ms  p99.9 {:>7.3}ms  max {:>7.3}ms  ({} conns)",
            ms(st.p99),
            ms(st.p999),
            ms(st.max),
            st.count
        );
    }
    println!();
    println!(
        "slowest connection of each upgrade's {} ms window, over the upgrades (one stall of \
         this VM's host moves a row's p99.9, not the median):",
        scenario::WINDOW.as_millis()
    );
    for (kind, _, maxima, (steal_in, steal_out), _) in &handover_windows {
        let at = |i: usize| maxima.get(i).copied().unwrap_or_default();
        let n = maxima.len();
        println!(
            "  {kind:<16} median {:>7.3}ms  fastest {:>7.3}ms  second slowest {:>7.3}ms  slowest \
             {:>7.3}ms  CPU 0 stolen in windows {:>5}ms, outside {:>5}ms",
            ms(at(n / 2)),
            ms(at(0)),
            ms(at(n.saturating_sub(2))),
            ms(at(n.saturating_sub(1))),
            steal_in.as_millis(),
            steal_out.as_millis(),
        );
    }
    println!();
    println!(
        "the same slowest connections, by what this VM did to them: a tick of the host's steal on \
         CPU 0 (server) or CPU 1 (client) while they were open (10 ms ticks, from samples ~10 ms \
         apart, so a tick may stand for a few µs and fall up to a sample before or after), or \
         the client late (≥ 1 ms) to call connect(); 'undisturbed' is none of these (the \
         client's delays after connect() are not seen). The windows under the bound, with a \
         CPU 0 tick too, say how often a tick lands by chance:"
    );
    for (kind, _, _, _, worst) in &handover_windows {
        let slow: Vec<_> = worst.iter().filter(|w| w.latency >= SLOW).collect();
        let by = |f: &dyn Fn(&scenario::WorstConn) -> bool| slow.iter().filter(|w| f(w)).count();
        let cpu0 = by(&|w| !w.stolen[0].is_zero());
        let cpu1 = by(&|w| w.stolen[0].is_zero() && !w.stolen[1].is_zero());
        let late = by(&|w| w.stolen == [Duration::ZERO; 2] && w.disturbed());
        let mut quiet: Vec<Duration> = worst
            .iter()
            .filter(|w| !w.disturbed())
            .map(|w| w.latency)
            .collect();
        quiet.sort_unstable();
        let fast: Vec<_> = worst.iter().filter(|w| w.latency < SLOW).collect();
        let fast_cpu0 = fast.iter().filter(|w| !w.stolen[0].is_zero()).count();
        let unexplained: Vec<String> = slow
            .iter()
            .filter(|w| !w.disturbed())
            .map(|w| format!("{:.1}", ms(w.latency)))
            .collect();
        println!(
            "  {kind:<16} ≥ {} ms: {} of {} (CPU 0 tick {cpu0}, only CPU 1 {cpu1}, only client \
             late {late}, undisturbed {}{}); under it, with a CPU 0 tick: {fast_cpu0} of {}; \
             undisturbed windows {}: median {:.3}ms, slowest {:.3}ms",
            SLOW.as_millis(),
            slow.len(),
            worst.len(),
            unexplained.len(),
            if unexplained.is_empty() {
                String::new()
            } else {
                format!(": {} ms", unexplained.join(", "))
            },
            fast.len(),
            quiet.len(),
            ms(quiet.get(quiet.len() / 2).copied().unwrap_or_default()),
            ms(quiet.last().copied().unwrap_or_default()),
        );
    }
    for (kind, timelines) in &timelines {
        println!();
        println!(
            "{kind} upgrade timeline, median µs from the trigger over {} upgrades:",
            timelines.len()
        );
        for (i, phase) in scenario::PHASES.iter().enumerate() {
            if let Some(m) = scenario::median_us(timelines, i) {
                println!("  {:<18} {m:>9}", phase.trim_end_matches("_us"));
            }
        }
        if let Some((m, max)) =
            scenario::gap_us(timelines, scenario::READY, scenario::ACCEPT_STOPPED)
        {
            println!("  READY received → accepting stopped: median {m} µs, max {max} µs");
        }
        if let Some((m, max)) =
            scenario::gap_us(timelines, scenario::READY_SENT, scenario::ACCEPT_STOPPED)
        {
            println!(
                "  READY sent by the new process → old one's accepting stopped (old side lets go): \
                 median {m} µs, max {max} µs"
            );
        }
    }
    // Only ringflip is held to "nothing fails": the peers' failures are the measurement.
    if all_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
