//! Upgrade under load, side by side: the same open-loop load and the same upgrade schedule
//! against ringflip and the ways users restart servers today.
//!
//! ```text
//! cargo bench --bench upgrade_under_load                       # 20 upgrades per server
//! cargo bench --bench upgrade_under_load -- --upgrades 100 --rate 5000
//! cargo bench --bench upgrade_under_load -- --only ringflip,ecdysis
//! cargo bench --bench upgrade_under_load -- --test             # CI: 2 upgrades each, quick
//! cargo bench --bench upgrade_under_load -- --unpinned-server  # servers not pinned to CPU 0
//! cargo bench --bench upgrade_under_load -- --json target/uul.json   # also write the run as JSON
//! cargo bench --bench upgrade_under_load -- --overload         # at 1, 1.25, 1.5, 1.75 and 2× the saturation rate
//! cargo bench --bench upgrade_under_load -- --overload --server-cpu 30   # servers capped at 30 %
//! cargo bench --bench upgrade_under_load -- --pause-ms 65000   # a pause before each row
//! ```
//!
//! `--server-cpu PCT` holds every server process (all generations) to PCT % of one core with a
//! cgroup CPU quota (10 ms period; needs root). On this 2-core VM the load generator saturates
//! first (~15,000 conn/s with the server at ~43 % of its core), so `--overload` alone measures
//! the client's limit; with a cap the servers saturate first, as on a machine whose server is the
//! bottleneck.
//!
//! `--json PATH` writes the run (every row's summary figures and its latency around the
//! upgrades in buckets of 1 and 10 ms; `examples/support/json.rs` has the shape) for
//! `benches/analysis/table.py` (BENCHMARKS.md's table rows) and `benches/analysis/plot.py` (its
//! plots).
//!
//! `--overload` (issue 16 §3) first finds the rate where this machine saturates: a bounded sweep
//! of ringflip's echo server with no upgrade, from 2,000 conn/s up by 1.5× a step (at most 8
//! steps of 2 s), stopping at the first rate where the load generator's own lag (each
//! connection's `connect()` after its scheduled start; `Sample::client_lag`) reaches 1 ms at its
//! p90, or grows by 1 ms over the step (`ClientLag`), or the server takes 95 % of its core (of
//! its quota with `--server-cpu`; down by 1.5× a step if the first rate saturates already). Then
//! it halves the gap between the highest rate that kept up and the lowest that saturated until
//! it is within 5 % (at most 5 times), and takes the latter as the saturation rate, instead of a
//! rate up to 1.5× past it. It runs the upgrade scenario at 1, 1.25 and 1.5× that rate (the
//! issue's targets) and at 1.75 and 2× (where servers start to fail), for burst-only (no
//! upgrade), ringflip, ecdysis and shellflip (`--only` picks others), all in this one run.
//! `--test` runs a short form of it too (sweep steps of 250 ms from 500 conn/s: 500 and 800,
//! and one halving if 800 saturates; ringflip only, 1 upgrade per rate), so CI
//! keeps it working; `--test --overload` runs only that.
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

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

mod peers;
#[path = "../examples/support/mod.rs"]
mod support;

use serde_json::{json, Value};
use support::scenario::{self, ms, Outcome, Scenario, Strategy};

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

/// The rows of `--overload` unless `--only` names others: `burst-only` (ringflip's server
/// with the bursts and no upgrade) tells what the overload costs without any upgrade.
const OVERLOAD: [&str; 4] = ["burst-only", "ringflip", "ecdysis", "shellflip"];

/// Accept rings of the `ringflip-workers` row (`Builder::workers`, thread-per-core).
const WORKERS: usize = 2;
/// The issue's bound on a window's slowest connection; windows at or above it are attributed.
const SLOW: Duration = Duration::from_millis(10);

/// The overload sweep: its first rate, the factor between steps, its most steps, each step's
/// load, and the client lag that marks saturation (at the p90, or as the growth of the lag over
/// the step; see [`ClientLag`]). The same 1 ms as "client late" in the attribution of slow
/// windows.
const SWEEP_FROM: u32 = 2000;
const SWEEP_FACTOR: f64 = 1.5;
const SWEEP_STEPS: usize = 8;
const SWEEP_STEP: Duration = Duration::from_secs(2);
/// Then the gap between the highest rate that kept up and the lowest that saturated is halved
/// until it is at most this fraction of the former (at most this many times).
const BISECT_MAX_STEPS: usize = 5;
const BISECT_RESOLUTION: f64 = 0.05;
const LAG_BOUND: Duration = Duration::from_millis(1);
/// Server CPU (share of its one core) that also marks saturation: the server saturates first.
const CPU_BOUND: f64 = 0.95;
/// The rates of the upgrade rows, as multiples of the saturation rate.
const OVERLOAD_FACTORS: [f64; 5] = [1.0, 1.25, 1.5, 1.75, 2.0];

struct Opts {
    upgrades: usize,
    rate: u32,
    interval: Duration,
    long_lived: usize,
    burst: usize,
    only: Option<Vec<String>>,
    pin_server: bool,
    quick: bool,
    overload: bool,
    json: Option<PathBuf>,
    /// `--server-cpu PCT`: every server held to PCT % of one core (`scenario::CpuCap`).
    server_cpu: Option<f64>,
    /// `--pause-ms N`: a pause before each row, so that what a row leaves behind (its client's
    /// sockets in TIME_WAIT, …) is gone before the next (lab §7: the order effect at overload).
    pause: Duration,
}

/// One row of the run: what it is called in the output, and what happened.
struct Row {
    label: String,
    kind: &'static str,
    rate: u32,
    /// Upgrades asked for (0 for a no-upgrade baseline).
    upgrades: usize,
    out: Outcome,
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
    println!(
        "upgrade under load: {} conn/s open loop + {} long-lived pinging every 100 ms; {} upgrades \
         every {} ms, each with a burst of {} connects; server {}",
        if o.overload {
            "the sweep's".to_owned()
        } else {
            o.rate.to_string()
        },
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
    let mut all_ok = true;
    let mut rows = Vec::new();
    let mut overload_json = Value::Null;
    // `--test` alone runs the rows and the short overload; `--overload` runs only the overload.
    if !o.overload {
        print_header();
        let only = o
            .only
            .clone()
            .unwrap_or_else(|| ALL.iter().map(|s| s.to_string()).collect());
        for kind in ALL
            .iter()
            .chain(EXTRA.iter())
            .filter(|k| only.iter().any(|x| x == *k))
        {
            all_ok &= run_row(kind, kind, o.rate, o.upgrades, &o, &mut rows);
        }
    }
    if o.overload || o.quick {
        overload_json = overload(&o, &mut rows, &mut all_ok);
    }
    summaries(&rows);
    if let Some(path) = &o.json {
        let servers: Vec<Value> = rows
            .iter()
            .map(|r| {
                let mut v = support::json::server(&r.label, r.rate, r.upgrades, &r.out);
                v["kind"] = json!(r.kind);
                v
            })
            .collect();
        let record = json!({
            "format": 1,
            "bench": "upgrade_under_load",
            "meta": support::json::meta(&argv),
            "config": {
                "rate": o.rate, "upgrades": o.upgrades, "interval_ms": o.interval.as_millis() as u64,
                "long_lived": o.long_lived, "burst": o.burst, "pinned_server": o.pin_server,
                "quick": o.quick, "window_ms": scenario::WINDOW.as_millis() as u64,
                "server_cpu_share": o.server_cpu,
                "pause_ms": o.pause.as_millis() as u64,
            },
            "servers": servers,
            "overload": overload_json,
        });
        if let Err(e) = support::json::write(path, &record) {
            eprintln!("{e}");
            all_ok = false;
        }
    }
    // Only ringflip is held to "nothing fails": the peers' failures are the measurement.
    if all_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn parse(argv: &[String]) -> Result<Opts, String> {
    let mut o = Opts {
        upgrades: 20,
        rate: 5000,
        interval: Duration::from_millis(1000),
        long_lived: 16,
        burst: 512,
        only: None,
        pin_server: true,
        quick: false,
        overload: false,
        json: None,
        server_cpu: None,
        pause: Duration::ZERO,
    };
    let mut it = argv.iter();
    while let Some(flag) = it.next() {
        match flag.as_str() {
            // `cargo bench` passes --bench; `cargo test --benches` and CI's quick run pass --test.
            "--bench" => {}
            "--unpinned-server" => o.pin_server = false,
            "--overload" => o.overload = true,
            "--test" => {
                o.quick = true;
                o.upgrades = 2;
                o.rate = 1000;
                o.interval = Duration::from_millis(500);
                o.burst = 64;
                o.long_lived = 4;
            }
            "--only" => {
                o.only = Some(
                    it.next()
                        .cloned()
                        .unwrap_or_default()
                        .split(',')
                        .map(str::to_owned)
                        .collect(),
                )
            }
            "--json" => o.json = Some(it.next().ok_or("--json needs a path")?.into()),
            "--server-cpu" => {
                let pct: f64 = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .filter(|p| (1.0..=100.0).contains(p))
                    .ok_or("--server-cpu needs a percentage of one core, 1 to 100")?;
                o.server_cpu = Some(pct / 100.0);
            }
            "--upgrades" | "--rate" | "--interval-ms" | "--long-lived" | "--burst"
            | "--pause-ms" => {
                let v: u64 = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .ok_or(format!("{flag} needs a number"))?;
                match flag.as_str() {
                    "--upgrades" => o.upgrades = v as usize,
                    "--rate" => o.rate = v as u32,
                    "--interval-ms" => o.interval = Duration::from_millis(v),
                    "--long-lived" => o.long_lived = v as usize,
                    "--pause-ms" => o.pause = Duration::from_millis(v),
                    _ => o.burst = v as usize,
                }
            }
            _ => {} // criterion-style filters and flags: ignored
        }
    }
    Ok(o)
}

fn print_header() {
    println!(
        "{:<16} {:>8} {:>7} {:>7} {:>6} {:>7} {:>6} {:>6} {:>6} {:>6} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>7} {:>7} {:>7}",
        "server", "conns", "failed", "refused", "reset", "eof", "tmout", "wrong", "other", "pings✗",
        "handover", "p50", "p99", "p99.9", "win p99", "win p99.9", "win max", "cpu%", "steal0", "steal1"
    );
}

/// What `kind` runs (`--serve` argument) and how it is upgraded.
fn server_of(kind: &str) -> (&'static str, Strategy) {
    match kind {
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
    }
}

/// Runs server `kind` at `rate` under the upgrade schedule, prints its row as `label` and keeps
/// it in `rows`. False if it is one of ringflip's rows (or the baseline) and it failed.
fn run_row(
    kind: &'static str,
    label: &str,
    rate: u32,
    upgrades: usize,
    o: &Opts,
    rows: &mut Vec<Row>,
) -> bool {
    if let Err(why) = peers::prepare(kind) {
        println!("{label:<16} skipped: {why}");
        return true;
    }
    std::thread::sleep(o.pause);
    let ours = kind.starts_with("ringflip") || kind == "burst-only";
    let (serve, strategy) = server_of(kind);
    let s = Scenario {
        serve_args: vec!["--serve".into(), serve.into()],
        strategy,
        upgrades,
        rate,
        interval: o.interval,
        long_lived: o.long_lived,
        burst: o.burst,
        server_args: if kind == "ringflip-workers" {
            vec!["--workers".into(), WORKERS.to_string()]
        } else {
            Vec::new()
        },
        warmup: Duration::ZERO,
        pin_server: o.pin_server,
        server_cpu: o.server_cpu,
        // The restart strategies without a handoff cannot keep long-lived connections;
        // give them a short drain so each restart completes within the interval.
        drain_timeout: match strategy {
            // Longer than the run, so the long-lived connections are never cut.
            Strategy::Signal | Strategy::BurstOnly => {
                o.interval * (upgrades as u32 + 10) + Duration::from_secs(60)
            }
            _ => Duration::from_millis(300),
        },
    };
    let out = match scenario::run(&s) {
        Ok(out) => out,
        Err(e) => {
            println!("{label:<16} could not run: {e}");
            // Only ringflip's own rows fail the bench; a peer that cannot run is reported.
            return !ours;
        }
    };
    print_row(label, &out);
    let ok = !ours || out.ok();
    if out.ok() {
        let _ = std::fs::remove_dir_all(&out.dir);
    }
    rows.push(Row {
        label: label.to_owned(),
        kind,
        rate,
        upgrades: if strategy == Strategy::BurstOnly {
            0
        } else {
            upgrades
        },
        out,
    });
    ok
}

fn print_row(label: &str, out: &Outcome) {
    let r = &out.report;
    let f = &r.failures;
    let (st, w) = (out.steady(), out.window());
    println!(
        "{:<16} {:>8} {:>7} {:>7} {:>6} {:>7} {:>6} {:>6} {:>6} {:>6} {:>6.2}ms {:>7.3}ms {:>7.3}ms {:>7.3}ms {:>7.3}ms {:>7.3}ms {:>7.3}ms {:>6.1}% {:>5}ms {:>5}ms",
        label,
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
    if let Some(drops) = out.listen_drops.filter(|&n| n > 0) {
        println!("           {drops} connection requests dropped by a full listen queue (TcpExtListenDrops)");
    }
    if out.failed_upgrades > 0 || !out.all_gone {
        println!(
            "           {} upgrades did not complete; processes left over: {}; log {}",
            out.failed_upgrades,
            !out.all_gone,
            out.log.display()
        );
    }
}

/// `--overload`: the sweep for the saturation rate, then the upgrade rows at each of
/// `OVERLOAD_FACTORS` times it.
/// Returns the sweep's record for the JSON.
fn overload(o: &Opts, rows: &mut Vec<Row>, all_ok: &mut bool) -> Value {
    let (from, steps, step) = if o.quick {
        (500, 2, Duration::from_millis(250))
    } else {
        (SWEEP_FROM, SWEEP_STEPS, SWEEP_STEP)
    };
    println!();
    println!(
        "overload: sweep of ringflip's echo server, no upgrade, {} ms per step from {from} conn/s \
         up by {SWEEP_FACTOR}× (at most {steps} steps) until the client's lag p90 or its growth over \
         the step reaches {} ms, or the server's CPU {:.0}% of its {}; then the gap between the \
         last rate that kept up and the first that did not halved to within {:.0} %:",
        step.as_millis(),
        ms(LAG_BOUND),
        100.0 * CPU_BOUND,
        o.server_cpu
            .map_or("core".into(), |c| format!("cap ({:.0}% of a core, a cgroup quota)", 100.0 * c)),
        100.0 * BISECT_RESOLUTION,
    );
    let mut sweep = Vec::new();
    // As measured so far: the highest rate that kept up and the lowest that saturated.
    let mut kept_up = None;
    let mut saturated = None;
    // The climb: up by SWEEP_FACTOR until a step saturates.
    let mut rate = from as f64;
    for _ in 0..steps {
        let r = round_rate(rate);
        match sweep_step(o, r, step, &mut sweep) {
            Err(()) => {
                *all_ok = false;
                break;
            }
            Ok(true) => {
                saturated = Some(r);
                break;
            }
            Ok(false) => kept_up = Some(r),
        }
        rate *= SWEEP_FACTOR;
    }
    // Saturated at the first step: down by SWEEP_FACTOR until a step keeps up.
    if let (None, Some(mut r)) = (kept_up, saturated) {
        for _ in 0..steps {
            let down = round_rate(r as f64 / SWEEP_FACTOR);
            if down == 0 || down >= r {
                break;
            }
            match sweep_step(o, down, step, &mut sweep) {
                Err(()) => {
                    *all_ok = false;
                    break;
                }
                Ok(true) => {
                    saturated = Some(down);
                    r = down;
                }
                Ok(false) => {
                    kept_up = Some(down);
                    break;
                }
            }
        }
    }
    // The climb's steps are SWEEP_FACTOR apart, so its first saturated rate may lie up to that
    // far past the last rate that kept up (2026-12-05, uncapped: 10,100 conn/s kept up, 15,200
    // had every server fail a quarter of a million connections at "1.0×"). Halve the gap until
    // it is within BISECT_RESOLUTION of the rate that kept up (four halvings of a 1.5× gap:
    // 3.1 %). This narrows the gap between the rates tried, not the noise of a 2 s step.
    if let (Some(mut lo), Some(mut hi)) = (kept_up, saturated) {
        for _ in 0..if o.quick { 1 } else { BISECT_MAX_STEPS } {
            let mid = round_rate((lo + hi) as f64 / 2.0);
            if (hi - lo) as f64 <= BISECT_RESOLUTION * lo as f64 || mid <= lo || mid >= hi {
                break;
            }
            match sweep_step(o, mid, step, &mut sweep) {
                Err(()) => {
                    *all_ok = false;
                    break;
                }
                Ok(true) => hi = mid,
                Ok(false) => lo = mid,
            }
        }
        (kept_up, saturated) = (Some(lo), Some(hi));
    }
    sweep.sort_by_key(|s| s["rate"].as_u64());
    let sat = saturated.or(kept_up).unwrap_or(from);
    match (saturated, kept_up) {
        (Some(_), Some(lo)) => println!(
            "  saturation: {sat} conn/s (the highest rate that kept up: {lo}, {:.1} % below)",
            100.0 * (sat - lo) as f64 / sat as f64
        ),
        (Some(_), None) => {
            println!("  saturation: at most {sat} conn/s (no rate tried kept up)")
        }
        (None, _) => {
            println!("  saturation: {sat} conn/s (not reached within the sweep: its last rate)")
        }
    }
    let only: Vec<String> = match &o.only {
        Some(only) => only.clone(),
        None if o.quick => vec!["ringflip".into()],
        None => OVERLOAD.iter().map(|s| s.to_string()).collect(),
    };
    let mut rates: Vec<u32> = OVERLOAD_FACTORS
        .iter()
        .map(|f| round_rate(sat as f64 * f))
        .collect();
    // At low rates two factors can round to one rate: one row each.
    rates.dedup();
    // The short form's rows: one upgrade each.
    let upgrades = if o.quick { 1 } else { o.upgrades };
    // Past saturation a server's connections pile up in the client, up to the rate times the
    // 3 s timeout: the client must not run out of fds first (that would count as the servers'
    // failures). Raise the soft limit to the hard one and say if even that is short.
    let needed = rates.iter().max().copied().unwrap_or(0) as u64 * 3 + 1000;
    let fd_limit = scenario::raise_nofile(needed);
    if fd_limit < needed {
        println!(
            "  note: the fd limit is {fd_limit}, and at {} conn/s a stalled server can leave up to \
             {needed} connections open in the client; past it the client's connects fail \
             ('other'). Raise it (ulimit -Hn / -n) before measuring.",
            rates.iter().max().copied().unwrap_or(0)
        );
    }
    println!();
    print_header();
    for &rate in &rates {
        for kind in ALL
            .iter()
            .chain(EXTRA.iter())
            .filter(|k| only.iter().any(|x| x == *k))
        {
            let ok = run_row(kind, &format!("{kind}@{rate}"), rate, upgrades, o, rows);
            // Past saturation the baseline itself may lose pings (each waits behind the
            // backlog): it shows what the overload costs, and gates nothing.
            if *kind != "burst-only" {
                *all_ok &= ok;
            }
        }
    }
    json!({
        "lag_bound_ms": ms(LAG_BOUND),
        "cpu_bound": CPU_BOUND,
        "step_ms": step.as_millis() as u64,
        "sweep": sweep,
        "saturation_rate": sat,
        "saturated": saturated.is_some(),
        "kept_up_rate": kept_up,
        "rates": rates,
        "upgrades_per_row": upgrades,
        "fd_limit": fd_limit,
    })
}

/// A rate rounded to 100 conn/s.
fn round_rate(rate: f64) -> u32 {
    (rate / 100.0).round() as u32 * 100
}

/// One step of the overload sweep: ringflip's echo server without upgrades at `rate` for
/// `step`, printed and recorded in `sweep` (with its index in the order run). `Ok(true)` when it saturated (client lag, or the
/// server's CPU), `Err` when it could not run.
fn sweep_step(o: &Opts, rate: u32, step: Duration, sweep: &mut Vec<Value>) -> Result<bool, ()> {
    let s = Scenario {
        serve_args: vec!["--serve".into(), "ringflip".into()],
        strategy: Strategy::BurstOnly,
        upgrades: 0,
        rate,
        interval: step,
        long_lived: 0,
        burst: 0,
        server_args: Vec::new(),
        warmup: Duration::ZERO,
        pin_server: o.pin_server,
        server_cpu: o.server_cpu,
        drain_timeout: Duration::from_secs(1),
    };
    let out = scenario::run(&s).map_err(|e| println!("  {rate:>7} conn/s  could not run: {e}"))?;
    let lag = ClientLag::of(&out);
    let conns = out.report.samples.len();
    let cpu = out.server_cpu.as_secs_f64();
    let share = cpu / out.wall.as_secs_f64();
    let st = out.steady();
    let reason = if lag.p90 >= LAG_BOUND {
        Some("client lag p90")
    } else if lag.growth >= LAG_BOUND {
        Some("client lag growing")
    } else if share >= CPU_BOUND * o.server_cpu.unwrap_or(1.0) {
        Some("server CPU")
    } else {
        None
    };
    println!(
        "  {rate:>7} conn/s  client lag p50 {:>7.3}ms p90 {:>7.3}ms p99 {:>7.3}ms growth \
         {:>7.3}ms  latency p99 {:>7.3}ms  failed {:>5}  server CPU {:>5.1}% ({:.1} µs/conn){}",
        ms(lag.p50),
        ms(lag.p90),
        ms(lag.p99),
        ms(lag.growth),
        ms(st.p99),
        out.report.failures.total(),
        100.0 * share,
        cpu * 1e6 / conns.max(1) as f64,
        reason
            .map(|r| format!("  saturated: {r}"))
            .unwrap_or_default(),
    );
    sweep.push(json!({
        "step": sweep.len(),
        "rate": rate, "connections": conns, "failed": out.report.failures.total(),
        "client_lag": {"p50": ms(lag.p50), "p90": ms(lag.p90), "p99": ms(lag.p99),
                       "max": ms(lag.max), "growth": ms(lag.growth)},
        "latency": support::json::stats(&st),
        "cpu_share": share,
        "cpu_us_per_conn": cpu * 1e6 / conns.max(1) as f64,
        "saturated": reason,
    }));
    if out.ok() {
        let _ = std::fs::remove_dir_all(&out.dir);
    }
    Ok(reason.is_some())
}

/// How late the load generator started its connections in a sweep step (`connect()` after the
/// scheduled start): percentiles, and `growth`, the median lag of the step's last quarter of
/// connections (by schedule) less that of its first quarter. A client that cannot keep up falls
/// further behind its schedule as the step goes on; a stall of the host's moves the p99 but not
/// the growth. The p90, not the p99, so that one 10 ms stall in a step does not count as
/// saturation.
struct ClientLag {
    p50: Duration,
    p90: Duration,
    p99: Duration,
    max: Duration,
    growth: Duration,
}

impl ClientLag {
    fn of(out: &Outcome) -> ClientLag {
        let mut by_schedule: Vec<_> = out.report.samples.iter().collect();
        by_schedule.sort_unstable_by_key(|s| s.scheduled);
        let median = |part: &[&support::load::Sample]| {
            let mut v: Vec<Duration> = part.iter().map(|s| s.client_lag()).collect();
            v.sort_unstable();
            v.get(v.len() / 2).copied().unwrap_or_default()
        };
        let q = by_schedule.len() / 4;
        let growth =
            median(&by_schedule[by_schedule.len() - q..]).saturating_sub(median(&by_schedule[..q]));
        let mut lags: Vec<Duration> = by_schedule.iter().map(|s| s.client_lag()).collect();
        lags.sort_unstable();
        let at = |p: f64| {
            lags.get(((lags.len() as f64 * p).ceil() as usize).clamp(1, lags.len().max(1)) - 1)
                .copied()
                .unwrap_or_default()
        };
        ClientLag {
            p50: at(0.5),
            p90: at(0.9),
            p99: at(0.99),
            max: at(1.0),
            growth,
        }
    }
}

/// The sections after the rows: the first 50 ms, each window's slowest connection and what the
/// VM did to it, and ringflip's upgrade timelines.
fn summaries(rows: &[Row]) {
    struct Derived<'a> {
        label: &'a str,
        first: support::load::Stats,
        maxima: Vec<Duration>,
        steal: (Duration, Duration),
        worst: Vec<scenario::WorstConn>,
    }
    let derived: Vec<Derived> = rows
        .iter()
        .map(|r| {
            let worst = r.out.window_worst();
            let mut maxima: Vec<Duration> = worst.iter().map(|w| w.latency).collect();
            maxima.sort_unstable();
            Derived {
                label: &r.label,
                first: r.out.handover_window(),
                maxima,
                steal: r.out.steal_in_and_out_of_windows(),
                worst,
            }
        })
        .collect();
    println!();
    println!(
        "first {} ms after each trigger (the handover and the burst; later in the window this \
         VM's own stalls dominate):",
        scenario::HANDOVER_WINDOW.as_millis()
    );
    for d in &derived {
        let st = &d.first;
        println!(
            "  {:<16} p99 {:>7.3}ms  p99.9 {:>7.3}ms  max {:>7.3}ms  ({} conns)",
            d.label,
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
    for d in &derived {
        let maxima = &d.maxima;
        let (steal_in, steal_out) = d.steal;
        let at = |i: usize| maxima.get(i).copied().unwrap_or_default();
        let n = maxima.len();
        println!(
            "  {:<16} median {:>7.3}ms  fastest {:>7.3}ms  second slowest {:>7.3}ms  slowest \
             {:>7.3}ms  CPU 0 stolen in windows {:>5}ms, outside {:>5}ms",
            d.label,
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
    for d in &derived {
        let worst = &d.worst;
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
            "  {:<16} ≥ {} ms: {} of {} (CPU 0 tick {cpu0}, only CPU 1 {cpu1}, only client \
             late {late}, undisturbed {}{}); under it, with a CPU 0 tick: {fast_cpu0} of {}; \
             undisturbed windows {}: median {:.3}ms, slowest {:.3}ms",
            d.label,
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
    for r in rows.iter().filter(|r| !r.out.timelines.is_empty()) {
        let timelines = &r.out.timelines;
        println!();
        println!(
            "{} upgrade timeline, median µs from the trigger over {} upgrades:",
            r.label,
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
}
