//! HTTP upgrade under load (issue 15 §1): keep-alive HTTP/1.1 and HTTP/2 clients send requests
//! at a fixed rate through the upgrades of each HTTP server, side by side with the way users
//! upgrade HTTP servers today.
//!
//! ```text
//! cargo build --release --features axum --example http     # ringflip's row runs this binary
//! cargo bench --bench http_upgrade                          # 20 upgrades per server
//! cargo bench --bench http_upgrade -- --json target/bench/http.json
//! cargo bench --bench http_upgrade -- --only ringflip,nginx --rate 2000 --upgrades 50
//! cargo bench --bench http_upgrade -- --test                # CI: 2 upgrades each, quick
//! ```
//!
//! Servers (each answers `GET /` with a short `hello …` body; pinned to CPU 0, clients on CPU 1,
//! unless `--unpinned-server`):
//! - `ringflip`: `examples/http.rs` as built by `cargo build --release --features axum --example
//!   http` (`ringflip::http::serve`, axum on a multi-thread tokio runtime), upgraded by SIGHUP.
//!   The bench refuses to run a binary older than the sources (build it first);
//! - `nginx`: nginx serving HTTP itself (`return 200`), binary upgrade: SIGUSR2, then SIGQUIT
//!   to the old master once the new one's pid file is written (benches/peers/nginx_usr2.rs);
//! - `haproxy`: HAProxy in `mode http` answering itself (`http-request return`), seamless
//!   reload in master-worker mode: SIGUSR2 to the master, done when a new worker appears
//!   (benches/peers/haproxy_reload.rs);
//! - `axum-reuseport`: a plain axum server on a SO_REUSEPORT socket: start a new one beside the
//!   old one, wait for its pid file, SIGTERM the old one, which runs axum's graceful shutdown
//!   (benches/peers/axum_reuseport.rs).
//!
//! nginx and HAProxy are skipped, with a message, when not installed.
//!
//! Why a bench of its own rather than a mode of `upgrade_under_load`: that bench's load is one
//! epoll thread of short echo connections (connect, one line, close) with bursts and pings,
//! and its orchestrator starts this binary as every server; here the load is hyper's client on
//! long keep-alive connections, the ringflip row runs the example binary, and what counts is
//! each request and how long the old processes live. The process handling, the JSON shape
//! (`examples/support/json.rs`) and the servers' strategies are shared.
//!
//! Load: `--http1` keep-alive HTTP/1.1 clients (default 64) and `--http2` HTTP/2 clients
//! (prior knowledge, default 8), each one connection of hyper-util's client (pool of one, as
//! tests/http.rs), share `--rate` requests per second (default 5,000) round robin, open loop: a
//! pacing thread schedules request `j` at `j / rate` and hands it to client `j mod clients`,
//! whose requests go one after another on its connection; latency is from the *scheduled*
//! start, so a stalled connection's queued requests count their wait (no coordinated
//! omission). A request not answered within `--timeout-ms` (3,000) of its schedule is a
//! timeout. A client whose connection is closed opens a new one at its next request (hyper's
//! client retries a request only if it was never written to the connection). HTTP/1.1 goes to
//! the server's first address, HTTP/2 to its second (nginx 1.22 serves `listen … http2` as
//! HTTP/2 only; the others serve both on both).
//!
//! Per server: requests, failed by kind (refused, reset, eof: the connection closed before the
//! whole response, timeout, wrong reply: a status other than 200 or another body, other) and
//! the commonest error messages, upgrades done, handover (trigger → the new process serves:
//! its pid file, or HAProxy's new worker), latency p50/p99/p99.9 steady and in the 500 ms after
//! each trigger, how long each old process lives (its exit − the trigger; median and max, and
//! how many were still alive when the load stopped), server CPU (every process of every
//! generation) as a share of one core, and steal on CPUs 0 and 1 (see upgrade_under_load).
//! `--json PATH` writes the run in the upgrade bench's shape (`examples/support/json.rs`, a
//! "connection" there is a request here) plus `old_lived_ms`, `errors` and `by_protocol` per
//! server; `benches/analysis/table.py` prints its table.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime};

mod peers;
#[path = "../examples/support/mod.rs"]
mod support;

use serde_json::{json, Value};
use support::load::{cpus, pin_to_cpu};
use support::scenario::{self, ms, Outcome, Strategy, UpgradeRow};

const ALL: [&str; 4] = ["ringflip", "nginx", "haproxy", "axum-reuseport"];

struct Opts {
    upgrades: usize,
    rate: u32,
    interval: Duration,
    http1: usize,
    http2: usize,
    timeout: Duration,
    drain_timeout: Duration,
    only: Option<Vec<String>>,
    pin_server: bool,
    quick: bool,
    json: Option<PathBuf>,
}

/// One row: its server and what happened.
struct Row {
    kind: &'static str,
    out: Outcome,
    /// Per upgrade done (in the order of `out.rows`): its old process's exit − the trigger;
    /// `None` if it was still alive when the load stopped.
    old_lived: Vec<Option<Duration>>,
    load: load::Extra,
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
        "HTTP upgrade under load: {} req/s open loop over {} keep-alive HTTP/1.1 and {} HTTP/2 \
         clients; {} upgrades every {} ms; server {}",
        o.rate,
        o.http1,
        o.http2,
        o.upgrades,
        o.interval.as_millis(),
        if o.pin_server {
            "pinned to CPU 0"
        } else {
            "not pinned"
        }
    );
    print_header();
    let only = o
        .only
        .clone()
        .unwrap_or_else(|| ALL.iter().map(|s| s.to_string()).collect());
    let mut all_ok = true;
    let mut rows = Vec::new();
    for &kind in ALL.iter().filter(|k| only.iter().any(|x| x == *k)) {
        if let Err(why) = prepare(kind) {
            // ringflip's row is the one that must run; a peer that is not installed is skipped.
            if kind == "ringflip" {
                println!("{kind:<16} cannot run: {why}");
                all_ok = false;
            } else {
                println!("{kind:<16} skipped: {why}");
            }
            continue;
        }
        match run(kind, &o) {
            Ok(row) => {
                print_row(&row);
                if kind == "ringflip" && !row_ok(&row) {
                    println!("  ringflip failed: see above and {}", row.out.log.display());
                    all_ok = false;
                }
                if row_ok(&row) {
                    let _ = std::fs::remove_dir_all(&row.out.dir);
                }
                rows.push(row);
            }
            Err(e) => {
                println!("{kind:<16} could not run: {e}");
                all_ok &= kind != "ringflip";
            }
        }
    }
    if let Some(path) = &o.json {
        let servers: Vec<Value> = rows.iter().map(|r| server_json(r, &o)).collect();
        let record = json!({
            "format": 1,
            "bench": "http_upgrade",
            "meta": support::json::meta(&argv),
            "config": {
                "rate": o.rate, "upgrades": o.upgrades, "interval_ms": o.interval.as_millis() as u64,
                "http1_clients": o.http1, "http2_clients": o.http2,
                "timeout_ms": o.timeout.as_millis() as u64,
                "drain_timeout_ms": o.drain_timeout.as_millis() as u64,
                // The upgrade bench's keys, for the scripts that read both: no bursts, no pings.
                "long_lived": 0, "burst": 0,
                "pinned_server": o.pin_server, "quick": o.quick,
                "window_ms": scenario::WINDOW.as_millis() as u64,
            },
            "servers": servers,
            "overload": Value::Null,
        });
        if let Err(e) = support::json::write(path, &record) {
            eprintln!("{e}");
            all_ok = false;
        }
    }
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
        http1: 64,
        http2: 8,
        timeout: Duration::from_secs(3),
        drain_timeout: Duration::from_secs(30),
        only: None,
        pin_server: true,
        quick: false,
        json: None,
    };
    let mut it = argv.iter();
    while let Some(flag) = it.next() {
        match flag.as_str() {
            // `cargo bench` passes --bench; `cargo test --benches` and CI's quick run pass --test.
            "--bench" => {}
            "--unpinned-server" => o.pin_server = false,
            "--test" => {
                o.quick = true;
                o.upgrades = 2;
                o.rate = 1000;
                o.interval = Duration::from_millis(500);
                o.http1 = 8;
                o.http2 = 2;
                o.drain_timeout = Duration::from_secs(10);
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
            "--upgrades" | "--rate" | "--interval-ms" | "--http1" | "--http2" | "--timeout-ms"
            | "--drain-timeout-ms" => {
                let v: u64 = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .ok_or(format!("{flag} needs a number"))?;
                match flag.as_str() {
                    "--upgrades" => o.upgrades = v as usize,
                    "--rate" => o.rate = v as u32,
                    "--interval-ms" => o.interval = Duration::from_millis(v),
                    "--http1" => o.http1 = v as usize,
                    "--http2" => o.http2 = v as usize,
                    "--timeout-ms" => o.timeout = Duration::from_millis(v),
                    _ => o.drain_timeout = Duration::from_millis(v),
                }
            }
            _ => {} // criterion-style filters and flags: ignored
        }
    }
    if o.rate == 0 || o.http1 + o.http2 == 0 {
        return Err("--rate and the number of clients must be above 0".into());
    }
    Ok(o)
}

/// The release build of `examples/http.rs`, beside this bench's binary (`target/release/deps/…`
/// → `target/release/examples/http`).
fn ringflip_binary() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("examples").join("http"))
        .ok_or("this bench is not under target/<profile>/deps")?;
    let build = "cargo build --release --features axum --example http";
    let built = std::fs::metadata(&bin)
        .and_then(|m| m.modified())
        .map_err(|_| format!("{} is missing: run `{build}` first", bin.display()))?;
    // A binary older than the sources would measure another commit.
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut newest = SystemTime::UNIX_EPOCH;
    let mut newest_path = PathBuf::new();
    let mut visit = vec![root.join("src"), root.join("examples/http.rs")];
    while let Some(p) = visit.pop() {
        if p.is_dir() {
            if let Ok(entries) = std::fs::read_dir(&p) {
                visit.extend(entries.filter_map(|e| e.ok().map(|e| e.path())));
            }
        } else if let Ok(t) = std::fs::metadata(&p).and_then(|m| m.modified()) {
            if t > newest {
                newest = t;
                newest_path = p;
            }
        }
    }
    if built < newest {
        return Err(format!(
            "{} is older than {}: run `{build}` first",
            bin.display(),
            newest_path.display()
        ));
    }
    Ok(bin)
}

/// Whether server `kind` can run here.
fn prepare(kind: &str) -> Result<(), String> {
    match kind {
        "ringflip" => ringflip_binary().map(drop),
        "nginx" if !peers::nginx_usr2::available_http() => Err(format!(
            "{} is not installed (apt-get install nginx-core)",
            peers::nginx_usr2::NGINX
        )),
        "haproxy" if !peers::haproxy_reload::available() => Err(format!(
            "{} is not installed (apt-get install haproxy)",
            peers::haproxy_reload::HAPROXY
        )),
        _ => Ok(()),
    }
}

/// The program and arguments that start server `kind`, and how it is upgraded.
fn server_of(kind: &str) -> Result<(PathBuf, Vec<String>, Strategy), String> {
    let exe = || std::env::current_exe().map_err(|e| e.to_string());
    let serve = |name: &str| vec!["--serve".to_owned(), name.to_owned()];
    Ok(match kind {
        "ringflip" => (ringflip_binary()?, Vec::new(), Strategy::Signal),
        "nginx" => (exe()?, serve("nginx-http"), Strategy::NginxUsr2),
        "haproxy" => (exe()?, serve("haproxy-http"), Strategy::HaproxyReload),
        _ => (exe()?, serve("axum-reuseport"), Strategy::ReusePort),
    })
}

fn free_port() -> Result<u16, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| e.to_string())
}

/// An old generation being watched: the trigger that replaced it and its processes.
struct Watch {
    at: Instant,
    pids: Vec<u32>,
    gone: Option<Duration>,
}

impl Watch {
    fn poll(watches: &mut [Watch]) {
        scenario::reap();
        for w in watches.iter_mut().filter(|w| w.gone.is_none()) {
            if w.pids.iter().all(|p| !scenario::alive(*p)) {
                w.gone = Some(w.at.elapsed());
            }
        }
    }
}

/// Sleeps until `until`, watching the old generations every millisecond.
fn watch_until(until: Instant, watches: &mut [Watch]) {
    loop {
        Watch::poll(watches);
        let now = Instant::now();
        if now >= until {
            return;
        }
        std::thread::sleep((until - now).min(Duration::from_millis(1)));
    }
}

/// Runs server `kind` under the load and the upgrade schedule.
fn run(kind: &'static str, o: &Opts) -> Result<Row, String> {
    let (program, serve_args, strategy) = server_of(kind)?;
    // Orphaned old generations re-parent to us, so we can reap them and count their CPU.
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    scenario::reap();
    let dir = std::env::temp_dir().join(format!("ringflip-http-{}-{kind}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let pid_file = dir.join("pid");
    let log = dir.join("server.log");
    let logf = std::fs::File::create(&log).map_err(|e| e.to_string())?;
    let h1: std::net::SocketAddr = ([127, 0, 0, 1], free_port()?).into();
    let h2: std::net::SocketAddr = ([127, 0, 0, 1], free_port()?).into();
    let two_cores = cpus() >= 2;
    let pin = two_cores && o.pin_server;
    let _restore_affinity = scenario::AffinityRestore::save();
    let start_server = || -> Result<u32, String> {
        let mut cmd =
            scenario::server_command(&program, &pid_file, o.drain_timeout, &logf, |cmd| {
                cmd.args(&serve_args).args([
                    "--listen",
                    &h1.to_string(),
                    "--listen",
                    &h2.to_string(),
                ]);
            })?;
        if pin {
            // The server (and every generation it starts) inherits CPU 0 from this thread.
            pin_to_cpu(0);
        }
        let child = cmd.spawn().map_err(|e| format!("starting the server: {e}"));
        if pin {
            // This thread polls pid files and old processes: on the clients' CPU.
            pin_to_cpu(1);
        }
        Ok(child?.id())
    };
    let mut pids = vec![start_server()?];
    let Some(mut current) = scenario::wait_for_pid(&pid_file, None, Duration::from_secs(10)) else {
        scenario::wait_all_gone(&pids, Duration::from_secs(10));
        return Err(format!("the server did not start; see {}", log.display()));
    };
    if !pids.contains(&current) {
        pids.push(current);
    }
    let meter = scenario::RunMeter::start(two_cores.then_some(1));
    let load = load::Load::start(load::Config {
        http1_addr: h1,
        http2_addr: h2,
        http1: o.http1,
        http2: o.http2,
        rate: o.rate,
        timeout: o.timeout,
        max_duration: o.interval * (o.upgrades as u32 + 4) + Duration::from_secs(60),
        cpu: two_cores.then_some(1),
    });
    let mut watches: Vec<Watch> = Vec::new();
    watch_until(Instant::now() + o.interval, &mut watches);
    let mut rows = Vec::new();
    let mut failed_upgrades = 0;
    for _ in 0..o.upgrades {
        let old = current;
        let old_rss_mib = scenario::rss_mib(old);
        // The processes that serve now and are to go: HAProxy's master stays (its pid does not
        // change, and its reload is done when a new worker appears), its worker goes; nginx's
        // old master goes with its workers.
        let children_before = scenario::children_of(old);
        let old_pids = match strategy {
            // Not the workers of earlier reloads that still drain: they have their own watch.
            Strategy::HaproxyReload => children_before
                .iter()
                .copied()
                .filter(|p| !watches.iter().any(|w| w.pids.contains(p)))
                .collect(),
            Strategy::NginxUsr2 => {
                let mut v = vec![old];
                v.extend(&children_before);
                v
            }
            _ => vec![old],
        };
        let at = Instant::now();
        match strategy {
            Strategy::Signal => scenario::signal(old, libc::SIGHUP),
            Strategy::NginxUsr2 | Strategy::HaproxyReload => scenario::signal(old, libc::SIGUSR2),
            Strategy::ReusePort => match start_server() {
                Ok(pid) => pids.push(pid),
                // Counted as a failed upgrade below (no new pid file).
                Err(e) => eprintln!("{kind}: {e}"),
            },
            _ => unreachable!("no HTTP server restarts this way"),
        }
        let timeout = o.interval.max(Duration::from_secs(1));
        let done = match strategy {
            Strategy::HaproxyReload => {
                scenario::wait_for_new_child(old, &children_before, timeout).then_some(old)
            }
            _ => scenario::wait_for_pid(&pid_file, Some(old), timeout),
        };
        match done {
            Some(new) => {
                rows.push(UpgradeRow {
                    old,
                    new,
                    at,
                    handover: at.elapsed(),
                    old_rss_mib,
                });
                match strategy {
                    Strategy::ReusePort => scenario::signal(old, libc::SIGTERM),
                    Strategy::NginxUsr2 => scenario::signal(old, libc::SIGQUIT),
                    _ => {}
                }
                if new != old {
                    pids.push(new);
                    current = new;
                }
                watches.push(Watch {
                    at,
                    pids: old_pids,
                    gone: None,
                });
            }
            None => failed_upgrades += 1,
        }
        watch_until(at + o.interval, &mut watches);
    }
    watch_until(Instant::now() + Duration::from_millis(500), &mut watches);
    let (report, extra) = load.stop();
    Watch::poll(&mut watches);
    let old_lived: Vec<Option<Duration>> = watches.iter().map(|w| w.gone).collect();
    scenario::signal(current, libc::SIGTERM);
    pids.extend(watches.iter().flat_map(|w| w.pids.iter().copied()));
    pids.sort_unstable();
    pids.dedup();
    let all_gone = scenario::wait_all_gone(
        &pids,
        o.drain_timeout.min(Duration::from_secs(30)) + Duration::from_secs(10),
    );
    let m = meter.stop();
    let timelines = scenario::parse_timelines(&std::fs::read_to_string(&log).unwrap_or_default());
    Ok(Row {
        kind,
        out: Outcome {
            rows,
            report,
            server_cpu: m.server_cpu,
            wall: m.wall,
            steal_cpu0: m.steal_cpu0,
            steal_cpu1: m.steal_cpu1,
            steal_samples: m.steal_samples,
            failed_upgrades,
            all_gone,
            listen_drops: m.listen_drops,
            log,
            dir,
            timelines,
        },
        old_lived,
        load: extra,
    })
}

/// ringflip's bar: every request answered, every upgrade done, every old process gone while
/// the load ran, nothing left over.
fn row_ok(r: &Row) -> bool {
    r.out.report.failures.total() == 0
        && r.out.failed_upgrades == 0
        && r.out.all_gone
        && r.old_lived.iter().all(Option::is_some)
}

/// Median and max of the old processes' lifetimes that ended, and how many had not.
fn old_lived_stats(r: &Row) -> (Option<Duration>, Option<Duration>, usize) {
    let mut v: Vec<Duration> = r.old_lived.iter().flatten().copied().collect();
    v.sort_unstable();
    let alive = r.old_lived.iter().filter(|x| x.is_none()).count();
    (v.get(v.len() / 2).copied(), v.last().copied(), alive)
}

fn print_header() {
    println!(
        "{:<16} {:>8} {:>7} {:>7} {:>6} {:>6} {:>6} {:>6} {:>6} {:>6} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>6} {:>7} {:>7}",
        "server", "requests", "failed", "refused", "reset", "eof", "tmout", "wrong", "other",
        "upgr", "handover", "p50", "p99", "p99.9", "win p99", "win p99.9", "win max",
        "old lived", "old max", "alive", "cpu%", "steal0"
    );
}

fn print_row(r: &Row) {
    let out = &r.out;
    let rep = &out.report;
    let f = &rep.failures;
    let (st, w) = (out.steady(), out.window());
    let (lived, lived_max, alive) = old_lived_stats(r);
    let opt_ms = |d: Option<Duration>| d.map_or("-".to_owned(), |d| format!("{:.1}ms", ms(d)));
    println!(
        "{:<16} {:>8} {:>7} {:>7} {:>6} {:>6} {:>6} {:>6} {:>6} {:>6} {:>6.2}ms {:>7.3}ms {:>7.3}ms {:>7.3}ms {:>7.3}ms {:>7.3}ms {:>7.3}ms {:>9} {:>9} {:>6} {:>6.1}% {:>5}ms",
        r.kind,
        rep.samples.len(),
        f.total(),
        f.refused,
        f.reset,
        f.eof,
        f.timeout,
        f.wrong_reply,
        f.other,
        format!("{}/{}", out.rows.len(), out.rows.len() + out.failed_upgrades),
        ms(out.median_handover()),
        ms(st.p50),
        ms(st.p99),
        ms(st.p999),
        ms(w.p99),
        ms(w.p999),
        ms(w.max),
        opt_ms(lived),
        opt_ms(lived_max),
        alive,
        100.0 * out.server_cpu.as_secs_f64() / out.wall.as_secs_f64(),
        out.steal_cpu0.as_millis(),
    );
    for (what, n) in r.load.errors.iter().take(5) {
        println!("    {n:>6} × {what}");
    }
    if out.failed_upgrades > 0 || !out.all_gone {
        println!(
            "    {} upgrades did not complete; processes left over: {}; log {}",
            out.failed_upgrades,
            !out.all_gone,
            out.log.display()
        );
    }
}

/// A row as JSON: the upgrade bench's server record plus the HTTP bench's own figures.
fn server_json(r: &Row, o: &Opts) -> Value {
    let mut v = support::json::server(r.kind, o.rate, o.upgrades, &r.out);
    let (lived, lived_max, alive) = old_lived_stats(r);
    let d = |x: Duration| (ms(x) * 1e3).round() / 1e3;
    v["kind"] = json!(r.kind);
    v["requests"] = json!(r.out.report.samples.len());
    v["old_lived_ms"] = json!({
        "median": lived.map(d),
        "max": lived_max.map(d),
        "alive_when_load_stopped": alive,
        "per_upgrade": r.old_lived.iter().map(|x| x.map(d)).collect::<Vec<_>>(),
    });
    v["errors"] = r
        .load
        .errors
        .iter()
        .map(|(what, n)| json!({"what": what, "count": n}))
        .collect();
    v["by_protocol"] = json!({
        "http1": {"requests": r.load.http1.0, "failed": r.load.http1.1},
        "http2": {"requests": r.load.http2.0, "failed": r.load.http2.1},
    });
    v
}

/// The load: keep-alive HTTP/1.1 and HTTP/2 clients (hyper-util's client) on a current-thread
/// tokio runtime, paced open loop by a thread of their own.
mod load {
    use std::collections::HashMap;
    use std::error::Error as StdError;
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::thread::JoinHandle;
    use std::time::{Duration, Instant};

    use http_body_util::{BodyExt, Empty};
    use hyper::body::Bytes;
    use hyper::{Request, StatusCode, Uri};
    use hyper_util::client::legacy::connect::HttpConnector;
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;
    use tokio::sync::mpsc;

    use crate::support::load::{pin_to_cpu, Failures, Kind, LoadReport, Sample};

    pub struct Config {
        pub http1_addr: SocketAddr,
        pub http2_addr: SocketAddr,
        pub http1: usize,
        pub http2: usize,
        /// Requests per second, all clients together.
        pub rate: u32,
        /// From a request's schedule to its whole response.
        pub timeout: Duration,
        /// Hard cap on the run, whatever the caller does.
        pub max_duration: Duration,
        pub cpu: Option<usize>,
    }

    /// What the load saw beyond the upgrade bench's report.
    #[derive(Default)]
    pub struct Extra {
        /// Error messages (the error and its sources) with their counts, commonest first.
        pub errors: Vec<(String, u64)>,
        /// (requests, failed) per protocol.
        pub http1: (u64, u64),
        pub http2: (u64, u64),
    }

    pub struct Load {
        stop: Arc<AtomicBool>,
        pacer: Option<JoinHandle<()>>,
        runner: Option<JoinHandle<(LoadReport, Extra)>>,
    }

    /// One client's results.
    struct ClientOut {
        http2: bool,
        samples: Vec<Sample>,
        failures: Failures,
        errors: HashMap<String, u64>,
    }

    impl Load {
        pub fn start(c: Config) -> Load {
            let stop = Arc::new(AtomicBool::new(false));
            let n = c.http1 + c.http2;
            let (senders, receivers): (Vec<_>, Vec<_>) =
                (0..n).map(|_| mpsc::unbounded_channel::<Instant>()).unzip();
            let (cpu, rate, max_duration) = (c.cpu, c.rate, c.max_duration);
            let flag = stop.clone();
            let pacer = std::thread::Builder::new()
                .name("pacer".into())
                .spawn(move || pace(senders, rate, max_duration, cpu, &flag))
                .expect("spawning the pacer");
            let runner = std::thread::Builder::new()
                .name("clients".into())
                .spawn(move || run_clients(c, receivers))
                .expect("spawning the clients");
            Load {
                stop,
                pacer: Some(pacer),
                runner: Some(runner),
            }
        }

        /// Stops scheduling requests, lets the scheduled ones finish (each bounded by the
        /// timeout from its schedule) and returns what happened.
        pub fn stop(mut self) -> (LoadReport, Extra) {
            self.stop.store(true, Ordering::SeqCst);
            if let Some(p) = self.pacer.take() {
                let _ = p.join();
            }
            self.runner
                .take()
                .unwrap()
                .join()
                .expect("the client thread panicked")
        }
    }

    /// Schedules request `j` at `start + j / rate` and hands it to client `j mod n`, until
    /// stopped; then drops the senders, which ends the clients once they have caught up.
    fn pace(
        senders: Vec<mpsc::UnboundedSender<Instant>>,
        rate: u32,
        max_duration: Duration,
        cpu: Option<usize>,
        stop: &AtomicBool,
    ) {
        if let Some(cpu) = cpu {
            pin_to_cpu(cpu);
        }
        // Sleeps end within a few µs of their deadline, not the default 50 µs of slack.
        // SAFETY: prctl with integer arguments, on this thread.
        unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1, 0, 0, 0) };
        let start = Instant::now() + Duration::from_millis(5);
        let mut j: u64 = 0;
        while !stop.load(Ordering::Relaxed) {
            let at =
                start + Duration::from_nanos((j as u128 * 1_000_000_000 / rate as u128) as u64);
            let now = Instant::now();
            if at > now {
                std::thread::sleep((at - now).min(Duration::from_millis(5)));
                continue;
            }
            if now - start > max_duration {
                break;
            }
            let _ = senders[(j % senders.len() as u64) as usize].send(at);
            j += 1;
        }
    }

    fn run_clients(
        c: Config,
        receivers: Vec<mpsc::UnboundedReceiver<Instant>>,
    ) -> (LoadReport, Extra) {
        if let Some(cpu) = c.cpu {
            pin_to_cpu(cpu);
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("the clients' runtime");
        let started = Instant::now();
        let outs: Vec<ClientOut> = runtime.block_on(async {
            let tasks: Vec<_> = receivers
                .into_iter()
                .enumerate()
                .map(|(i, rx)| {
                    let http2 = i >= c.http1;
                    let addr = if http2 { c.http2_addr } else { c.http1_addr };
                    tokio::spawn(client(addr, http2, rx, c.timeout))
                })
                .collect();
            let mut outs = Vec::new();
            for t in tasks {
                outs.push(t.await.expect("a client panicked"));
            }
            outs
        });
        let mut report = LoadReport {
            started: Some(started),
            stopped: Some(Instant::now()),
            ..LoadReport::default()
        };
        let mut extra = Extra::default();
        let mut errors: HashMap<String, u64> = HashMap::new();
        for out in outs {
            let f = &out.failures;
            let proto = if out.http2 {
                &mut extra.http2
            } else {
                &mut extra.http1
            };
            proto.0 += out.samples.len() as u64;
            proto.1 += f.total();
            let r = &mut report.failures;
            r.refused += f.refused;
            r.reset += f.reset;
            r.eof += f.eof;
            r.timeout += f.timeout;
            r.wrong_reply += f.wrong_reply;
            r.other += f.other;
            report.samples.extend(out.samples);
            for (what, n) in out.errors {
                *errors.entry(what).or_default() += n;
            }
        }
        report.samples.sort_unstable_by_key(|s| s.scheduled);
        let mut errors: Vec<(String, u64)> = errors.into_iter().collect();
        errors.sort_unstable_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        report.first_errors = errors.iter().take(10).map(|(w, _)| w.clone()).collect();
        extra.errors = errors;
        (report, extra)
    }

    /// One client: its requests one after another on its connection, each when scheduled or
    /// as soon as the one before is answered.
    async fn client(
        addr: SocketAddr,
        http2: bool,
        mut schedule: mpsc::UnboundedReceiver<Instant>,
        timeout: Duration,
    ) -> ClientOut {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let mut builder = Client::builder(TokioExecutor::new());
        builder.pool_max_idle_per_host(1);
        if http2 {
            builder.http2_only(true);
        }
        let client = builder.build::<_, Empty<Bytes>>(connector);
        let uri: Uri = format!("http://{addr}/").parse().expect("a URI");
        let mut out = ClientOut {
            http2,
            samples: Vec::new(),
            failures: Failures::default(),
            errors: HashMap::new(),
        };
        while let Some(scheduled) = schedule.recv().await {
            let sent = Instant::now();
            let deadline = scheduled + timeout;
            let result = if sent >= deadline {
                Err((
                    Kind::Timeout,
                    "not sent: already past its timeout".to_owned(),
                ))
            } else {
                match tokio::time::timeout_at(deadline.into(), exchange(&client, &uri)).await {
                    Err(_) => Err((Kind::Timeout, format!("no response within {timeout:?}"))),
                    Ok(Err(e)) => Err(e),
                    Ok(Ok(())) => Ok(scheduled.elapsed()),
                }
            };
            let result = result.map_err(|(kind, what)| {
                let f = &mut out.failures;
                match kind {
                    Kind::Refused => f.refused += 1,
                    Kind::Reset => f.reset += 1,
                    Kind::Eof => f.eof += 1,
                    Kind::Timeout => f.timeout += 1,
                    Kind::WrongReply => f.wrong_reply += 1,
                    Kind::Other => f.other += 1,
                }
                let proto = if http2 { "HTTP/2" } else { "HTTP/1.1" };
                *out.errors
                    .entry(format!("{proto} {kind:?}: {what}"))
                    .or_default() += 1;
                kind
            });
            out.samples.push(Sample {
                scheduled,
                connect_at: sent,
                result,
            });
        }
        out
    }

    /// `GET /`: the whole response, checked (200 and a `hello` body).
    async fn exchange(
        client: &Client<HttpConnector, Empty<Bytes>>,
        uri: &Uri,
    ) -> Result<(), (Kind, String)> {
        let request = Request::get(uri.clone())
            .body(Empty::new())
            .expect("a request");
        let response = client
            .request(request)
            .await
            .map_err(|e| (classify(&e), chain(&e)))?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| (classify(&e), format!("body: {}", chain(&e))))?
            .to_bytes();
        if status != StatusCode::OK || !body.starts_with(b"hello") {
            return Err((
                Kind::WrongReply,
                format!(
                    "status {status}, body {:?}",
                    String::from_utf8_lossy(&body[..body.len().min(60)])
                ),
            ));
        }
        Ok(())
    }

    /// The error and its sources, as one line.
    fn chain(e: &(dyn StdError + 'static)) -> String {
        let mut parts = vec![e.to_string()];
        let mut cur = e.source();
        while let Some(s) = cur {
            let text = s.to_string();
            if parts.last() != Some(&text) {
                parts.push(text);
            }
            cur = s.source();
        }
        parts.join(": ")
    }

    /// The kind of a failed exchange: the first I/O error in the chain decides (refused, reset,
    /// EOF, timeout), else hyper's "connection closed before the message completed" is an EOF,
    /// anything else (an HTTP/2 stream refused or reset, say) is other.
    fn classify(e: &(dyn StdError + 'static)) -> Kind {
        use std::io::ErrorKind as Io;
        let mut eof = false;
        let mut cur = Some(e);
        while let Some(err) = cur {
            if let Some(io) = err.downcast_ref::<std::io::Error>() {
                match io.kind() {
                    Io::ConnectionRefused => return Kind::Refused,
                    Io::ConnectionReset | Io::ConnectionAborted | Io::BrokenPipe => {
                        return Kind::Reset
                    }
                    Io::UnexpectedEof => return Kind::Eof,
                    Io::TimedOut => return Kind::Timeout,
                    _ => {}
                }
            }
            if let Some(h) = err.downcast_ref::<hyper::Error>() {
                eof |= h.is_incomplete_message() || h.is_closed();
            }
            cur = err.source();
        }
        if eof {
            Kind::Eof
        } else {
            Kind::Other
        }
    }
}
