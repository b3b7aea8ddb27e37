//! The headline demo: an echo server under open-loop load, upgraded again and again.
//!
//! ```text
//! cargo run --release --example demo
//! cargo run --release --example demo -- --upgrades 100 --rate 5000 --interval-ms 1000
//! cargo run --release --example demo -- --ballast-mib 2048 --long-lived 0 --upgrades 10
//! cargo run --release --example demo -- --upgrades 100 --json target/demo.json
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
//! `--json PATH` also writes the run in the upgrade bench's JSON shape (one server,
//! `ringflip (demo)`; see examples/support/json.rs).

use std::process::ExitCode;
use std::time::Duration;

mod support;
use support::scenario::{self, ms, Scenario, Strategy, WINDOW};

struct Opts {
    upgrades: usize,
    rate: u32,
    interval: Duration,
    long_lived: usize,
    burst: usize,
    ballast_mib: u64,
    json: Option<std::path::PathBuf>,
}

fn parse() -> Result<Opts, String> {
    let mut o = Opts {
        upgrades: 10,
        rate: 5000,
        interval: Duration::from_millis(1000),
        long_lived: 16,
        burst: 512,
        ballast_mib: 0,
        json: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let v = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        if flag == "--json" {
            o.json = Some(v.into());
            continue;
        }
        let n: u64 = v.parse().map_err(|e| format!("{flag} {v}: {e}"))?;
        match flag.as_str() {
            "--upgrades" => o.upgrades = n as usize,
            "--rate" => o.rate = n as u32,
            "--interval-ms" => o.interval = Duration::from_millis(n),
            "--long-lived" => o.long_lived = n as usize,
            "--burst" => o.burst = n as usize,
            "--ballast-mib" => o.ballast_mib = n,
            other => return Err(format!("unknown option {other}")),
        }
    }
    Ok(o)
}

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1).peekable();
    if args.peek().map(String::as_str) == Some("--serve") {
        return support::echo_server::main(args.skip(1), support::echo_server::Runtime::TokioUring);
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

fn run(opts: &Opts) -> Result<bool, String> {
    println!(
        "ringflip demo: echo server, {} conn/s open loop + {} long-lived, {} upgrades every {} ms with a {}-connection burst each",
        opts.rate,
        opts.long_lived,
        opts.upgrades,
        opts.interval.as_millis(),
        opts.burst
    );
    let out = scenario::run(&Scenario {
        pin_server: true,
        server_cpu: None,
        serve_args: vec!["--serve".into()],
        strategy: Strategy::Signal,
        upgrades: opts.upgrades,
        rate: opts.rate,
        interval: opts.interval,
        long_lived: opts.long_lived,
        burst: opts.burst,
        // Longer than the run: the long-lived connections stay on the first process throughout,
        // and a drain deadline would (correctly) cut them.
        drain_timeout: opts.interval * (opts.upgrades as u32 + 10) + Duration::from_secs(60),
        server_args: if opts.ballast_mib > 0 {
            vec!["--ballast-mib".into(), opts.ballast_mib.to_string()]
        } else {
            Vec::new()
        },
        // Let the first process grow to its ballast before the first upgrade: it starts after
        // 1 s and takes up to 3 s per GiB here.
        warmup: Duration::from_millis(if opts.ballast_mib > 0 {
            1000 + opts.ballast_mib * 3
        } else {
            0
        }),
    })?;
    if let Some(path) = &opts.json {
        let record = serde_json::json!({
            "format": 1,
            "bench": "demo",
            "meta": support::json::meta(&std::env::args().skip(1).collect::<Vec<_>>()),
            "config": {
                "rate": opts.rate, "upgrades": opts.upgrades,
                "interval_ms": opts.interval.as_millis() as u64, "long_lived": opts.long_lived,
                "burst": opts.burst, "pinned_server": true, "quick": false,
                "ballast_mib": opts.ballast_mib, "window_ms": WINDOW.as_millis() as u64,
            },
            "servers": [support::json::server("ringflip (demo)", opts.rate, opts.upgrades, &out)],
            "overload": null,
        });
        support::json::write(path, &record)?;
    }
    let report = &out.report;
    let steady = out.steady();
    println!();
    println!(
        "{:>3}  {:>8} → {:<8} {:>8} {:>10} {:>8} {:>12} {:>12}",
        "#", "old pid", "new pid", "old RSS", "handover", "failed", "window p99", "steady p99"
    );
    for (i, r) in out.rows.iter().enumerate() {
        let (a, b) = (r.at, r.at + WINDOW);
        let w = report.stats(|t| t >= a && t < b);
        println!(
            "{:>3}  {:>8} → {:<8} {:>5}MiB {:>8.2}ms {:>8} {:>10.3}ms {:>10.3}ms",
            i + 1,
            r.old,
            r.new,
            r.old_rss_mib,
            ms(r.handover),
            report.failures_in(|t| t >= a && t < b),
            ms(w.p99),
            ms(steady.p99)
        );
    }
    let window = out.window();
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
    for (name, st) in [("steady:   ", steady), ("in window:", window)] {
        println!(
            "accept+echo latency {name} p50 {:.3} ms  p99 {:.3} ms  p99.9 {:.3} ms  max {:.3} ms  ({} conns)",
            ms(st.p50),
            ms(st.p99),
            ms(st.p999),
            ms(st.max),
            st.count
        );
    }
    println!(
        "handover (SIGHUP → new pid file) median {:.2} ms; {} of {} upgrades done",
        ms(out.median_handover()),
        out.rows.len(),
        opts.upgrades
    );
    if let (Some(spawned), Some(ready), Some((let_go, let_go_max))) = (
        scenario::median_us(&out.timelines, scenario::SPAWNED),
        scenario::median_us(&out.timelines, scenario::READY),
        scenario::gap_us(
            &out.timelines,
            scenario::READY_SENT,
            scenario::ACCEPT_STOPPED,
        ),
    ) {
        println!(
            "old process, median over {} upgrades: new process spawned {spawned} µs after SIGHUP, READY after {:.2} ms, accepting stopped {let_go} µs after the new process sent READY (max {let_go_max} µs)",
            out.timelines.len(),
            ready as f64 / 1e3,
        );
    }
    println!(
        "server CPU (all generations, incl. start-up): {:.2} s over {:.1} s = {:.1}% of one core",
        out.server_cpu.as_secs_f64(),
        out.wall.as_secs_f64(),
        100.0 * out.server_cpu.as_secs_f64() / out.wall.as_secs_f64()
    );
    for e in &report.first_errors {
        println!("  first errors: {e}");
    }
    if !out.all_gone {
        println!("some server processes were still running and were killed");
    }
    if out.ok() {
        let _ = std::fs::remove_dir_all(&out.dir);
    } else {
        println!("server log: {}", out.log.display());
    }
    Ok(out.ok())
}
