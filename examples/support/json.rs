//! The JSON record of upgrade-under-load runs (`--json PATH` of the upgrade bench and the demo):
//! what the machine and the build were, and per server the summary figures of BENCHMARKS.md's
//! table plus the latency around the upgrades, in buckets of the offset from each trigger (1 ms
//! through the handover, 10 ms elsewhere).
//! `benches/analysis/table.py` prints the table's rows from it, `benches/analysis/plot.py` draws
//! the plots.
//!
//! Shape (times in ms unless the key says otherwise; `null` where a server has no such figure):
//!
//! ```text
//! { "format": 1, "meta": {date, commit, machine{cpu, cpus, mem_gib, kernel}, rustc, command},
//!   "config": {rate, upgrades, interval_ms, long_lived, burst, pinned_server, quick},
//!   "servers": [ { name, rate, upgrades_requested, upgrades_done, failed_upgrades,
//!                  connections, failed, failures{refused, reset, eof, timeout, wrong_reply,
//!                  other}, pings_ok, pings_failed,
//!                  steady{count, p50, p99, p999, max}, window{…}, first_50ms{…},
//!                  window_p999_over_steady, handover_median, let_go_us{median, max},
//!                  timeline_median_us{spawned, …}, server_cpu_s, wall_s, cpu_share,
//!                  cpu_us_per_conn, client_lag{p50, p99, max}, steal_ms{cpu0, cpu1},
//!                  per_upgrade[{handover, count, failed, p999, max}],
//!                  series{from_ms, to_ms, columns, rows[[start_ms, width_ms, count, failed,
//!                         p50, p99, max]]} } ],
//!   "overload": null | {lag_bound_ms, sweep[…], saturation_rate, saturated, rates[…]} }
//! ```

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::load::Stats;
use super::scenario::{self, ms, Outcome, PHASES, WINDOW};

/// The series around each trigger starts this long before it...
pub const SERIES_BEFORE: Duration = Duration::from_millis(100);
/// ...and ends this long after it (the window of the table's in-window figures).
pub const SERIES_AFTER: Duration = WINDOW;

/// Three decimals: µs resolution for figures in ms, and files that stay small.
fn r3(x: f64) -> f64 {
    (x * 1e3).round() / 1e3
}

fn d(x: Duration) -> f64 {
    r3(ms(x))
}

/// A percentile set as JSON.
pub fn stats(s: &Stats) -> Value {
    json!({"count": s.count, "p50": d(s.p50), "p99": d(s.p99), "p999": d(s.p999), "max": d(s.max)})
}

/// The output of a command, trimmed; `None` if it did not run or failed.
fn output(cmd: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(cmd)
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// When, where and what was measured: UTC date, the commit (with `+dirty` when tracked files
/// differ from it), the machine and the command line.
pub fn meta(command: &[String]) -> Value {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpuinfo = read("/proc/cpuinfo");
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned());
    let mem_kib: Option<u64> = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok());
    let commit = output("git", &["rev-parse", "--short", "HEAD"]).map(|c| {
        let dirty = output("git", &["status", "--porcelain", "--untracked-files=no"])
            .is_some_and(|s| !s.is_empty());
        if dirty {
            c + "+dirty"
        } else {
            c
        }
    });
    json!({
        "date": output("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]),
        "commit": commit,
        "machine": {
            "cpu": cpu,
            "cpus": super::load::cpus(),
            "mem_gib": mem_kib.map(|k| r3(k as f64 / 1024.0 / 1024.0)),
            "kernel": read("/proc/sys/kernel/osrelease").trim(),
        },
        "rustc": output("rustc", &["-V"]),
        "command": command,
    })
}

/// The buckets of [`series`]: `(start, width)` in ms from the trigger. 1 ms through the
/// handover and the burst (the first [`FINE_UNTIL`] ms, and [`FINE_FROM`] before), 10 ms
/// elsewhere, so each bucket holds enough connections for a p99.
fn buckets() -> Vec<(i64, i64)> {
    let (before, after) = (
        SERIES_BEFORE.as_millis() as i64,
        SERIES_AFTER.as_millis() as i64,
    );
    let mut v = Vec::new();
    let mut t = -before;
    while t < after {
        let w = if (FINE_FROM..FINE_UNTIL).contains(&t) {
            1
        } else {
            10
        };
        v.push((t, w));
        t += w;
    }
    v
}

/// Where [`series`] uses 1 ms buckets: from this many ms before the trigger...
pub const FINE_FROM: i64 = -10;
/// ...to this many after it.
pub const FINE_UNTIL: i64 = 50;

/// Every connection scheduled from [`SERIES_BEFORE`] before a trigger to [`SERIES_AFTER`] after
/// it, over all the upgrades of a row, in the buckets of [`buckets`]: `[start_ms, width_ms,
/// count, failed, p50, p99, max]` (latencies in ms of the successful ones; a bucket with only
/// failures has 0s). Empty buckets are left out. A connection between two triggers counts after
/// the earlier one while within [`SERIES_AFTER`] of it, else before the later one.
fn series(o: &Outcome) -> Value {
    let buckets = buckets();
    let mut lat: Vec<Vec<Duration>> = vec![Vec::new(); buckets.len()];
    let mut failed = vec![0u64; buckets.len()];
    for s in &o.report.samples {
        let Some(offset) = offset_ms(o, s.scheduled) else {
            continue;
        };
        let i = buckets.partition_point(|b| b.0 <= offset).saturating_sub(1);
        match s.result {
            Ok(l) => lat[i].push(l),
            Err(_) => failed[i] += 1,
        }
    }
    let rows: Vec<Value> = lat
        .iter_mut()
        .zip(&failed)
        .zip(&buckets)
        .filter(|((l, f), _)| !l.is_empty() || **f > 0)
        .map(|((l, f), (start, width))| {
            l.sort_unstable();
            let q = |p: f64| {
                l.get(((l.len() as f64 * p).ceil() as usize).clamp(1, l.len().max(1)) - 1)
                    .map_or(0.0, |x| d(*x))
            };
            json!([
                start,
                width,
                l.len() + *f as usize,
                f,
                q(0.5),
                q(0.99),
                q(1.0)
            ])
        })
        .collect();
    json!({
        "from_ms": -(SERIES_BEFORE.as_millis() as i64),
        "to_ms": SERIES_AFTER.as_millis() as u64,
        "columns": ["start_ms", "width_ms", "count", "failed", "p50", "p99", "max"],
        "rows": rows,
    })
}

/// Whole ms from the trigger a connection scheduled at `t` belongs to (see [`series`]); `None`
/// outside every trigger's span.
fn offset_ms(o: &Outcome, t: Instant) -> Option<i64> {
    let i = o.rows.partition_point(|r| r.at <= t);
    if let Some(prev) = i.checked_sub(1).map(|k| &o.rows[k]) {
        let since = t - prev.at;
        if since < SERIES_AFTER {
            return Some(since.as_millis() as i64);
        }
    }
    let next = o.rows.get(i)?;
    let until = next.at - t;
    (until <= SERIES_BEFORE).then(|| -(until.as_nanos().div_ceil(1_000_000) as i64))
}

/// One upgrade's window: handover, connections, failures, p99.9, slowest.
fn per_upgrade(o: &Outcome) -> Value {
    let mut lat: Vec<Vec<Duration>> = vec![Vec::new(); o.rows.len()];
    let mut failed = vec![0u64; o.rows.len()];
    for s in &o.report.samples {
        let i = o.rows.partition_point(|r| r.at <= s.scheduled);
        let Some(k) = i.checked_sub(1) else { continue };
        if s.scheduled - o.rows[k].at >= WINDOW {
            continue;
        }
        match s.result {
            Ok(l) => lat[k].push(l),
            Err(_) => failed[k] += 1,
        }
    }
    let ups: Vec<Value> = o
        .rows
        .iter()
        .zip(lat.iter_mut().zip(&failed))
        .map(|(r, (l, f))| {
            l.sort_unstable();
            let p999 = l
                .get(((l.len() as f64 * 0.999).ceil() as usize).clamp(1, l.len().max(1)) - 1)
                .copied()
                .unwrap_or_default();
            json!({
                "handover": d(r.handover), "count": l.len() as u64 + f, "failed": f,
                "p999": d(p999), "max": d(l.last().copied().unwrap_or_default()),
                "old_rss_mib": r.old_rss_mib,
            })
        })
        .collect();
    Value::Array(ups)
}

/// One server's row of a run: `name` as the table shows it, `upgrades_requested` as asked for
/// (0 for a no-upgrade baseline).
pub fn server(name: &str, rate: u32, upgrades_requested: usize, o: &Outcome) -> Value {
    let r = &o.report;
    let f = &r.failures;
    let (steady, window) = (o.steady(), o.window());
    let connections = r.samples.len();
    let mut lags: Vec<Duration> = r.samples.iter().map(|s| s.client_lag()).collect();
    lags.sort_unstable();
    let lag = |p: f64| {
        lags.get(((lags.len() as f64 * p).ceil() as usize).clamp(1, lags.len().max(1)) - 1)
            .map_or(0.0, |x| d(*x))
    };
    let timeline: serde_json::Map<String, Value> = PHASES
        .iter()
        .enumerate()
        .filter_map(|(i, p)| {
            let m = scenario::median_us(&o.timelines, i)?;
            Some((p.trim_end_matches("_us").to_owned(), json!(m)))
        })
        .collect();
    let let_go = scenario::gap_us(&o.timelines, scenario::READY_SENT, scenario::ACCEPT_STOPPED)
        .map(|(m, max)| json!({"median": m, "max": max}));
    let cpu = o.server_cpu.as_secs_f64();
    let wall = o.wall.as_secs_f64();
    let upgrades = upgrades_requested > 0;
    json!({
        "name": name,
        "rate": rate,
        "upgrades_requested": upgrades_requested,
        "upgrades_done": upgrades.then_some(o.rows.len()),
        "failed_upgrades": o.failed_upgrades,
        "processes_left_over": !o.all_gone,
        "connections": connections,
        "failed": f.total(),
        "failures": {"refused": f.refused, "reset": f.reset, "eof": f.eof,
                     "timeout": f.timeout, "wrong_reply": f.wrong_reply, "other": f.other},
        "pings_ok": r.pings_ok,
        "pings_failed": r.pings_failed,
        "steady": stats(&steady),
        "window": stats(&window),
        "first_50ms": stats(&o.handover_window()),
        "window_p999_over_steady": (steady.p999 > Duration::ZERO)
            .then(|| r3(window.p999.as_secs_f64() / steady.p999.as_secs_f64())),
        "handover_median": upgrades.then(|| d(o.median_handover())),
        "let_go_us": let_go,
        "timeline_median_us": timeline,
        "server_cpu_s": r3(cpu),
        "wall_s": r3(wall),
        "cpu_share": (wall > 0.0).then(|| r3(cpu / wall)),
        "cpu_us_per_conn": (connections > 0).then(|| r3(cpu * 1e6 / connections as f64)),
        "client_lag": {"p50": lag(0.5), "p99": lag(0.99), "max": lag(1.0)},
        "steal_ms": {"cpu0": o.steal_cpu0.as_millis() as u64,
                     "cpu1": o.steal_cpu1.as_millis() as u64},
        "listen_drops": o.listen_drops,
        "per_upgrade": per_upgrade(o),
        "series": series(o),
    })
}

/// Writes `value` to `path` (compact; its directory made if need be); says where on stdout.
pub fn write(path: &std::path::Path, value: &Value) -> Result<(), String> {
    let text = serde_json::to_string(value).map_err(|e| e.to_string())?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    }
    std::fs::write(path, text + "\n").map_err(|e| format!("writing {}: {e}", path.display()))?;
    println!("JSON written to {}", path.display());
    Ok(())
}
