//! One upgrade-under-load run: start a server (this same binary re-executed with `serve_args`),
//! load it open-loop, upgrade it on a schedule with a connection burst at each upgrade, stop it,
//! and collect what happened. Used by the demo and by the upgrade bench.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::load::{cpus, pin_to_cpu, Load, LoadConfig, LoadReport, Stats};

/// The window after each upgrade trigger whose latency is reported separately.
pub const WINDOW: Duration = Duration::from_millis(500);

/// The first part of each window, which holds the handover itself (trigger → READY → the old
/// process let go, a few ms) and the burst: what is slow here is the upgrade's doing, while
/// later in the window this VM's own stalls dominate (seen with `RINGFLIP_DUMP_SAMPLES`).
pub const HANDOVER_WINDOW: Duration = Duration::from_millis(50);

/// How a new version replaces the running one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Strategy {
    /// SIGHUP the serving process; it starts its successor (ringflip, shellflip, ecdysis).
    Signal,
    /// SIGTERM the serving process, wait for it to exit, start a new one.
    Naive,
    /// Start a new process with SO_REUSEPORT on the same port, wait until it serves, SIGTERM the
    /// old one.
    ReusePort,
    /// No upgrade at all: only the burst. The baseline that shows what the burst alone costs.
    BurstOnly,
    /// nginx's binary upgrade: SIGUSR2 to the master, wait for the new master's pid file,
    /// SIGQUIT to the old master.
    NginxUsr2,
    /// HAProxy's seamless reload in master-worker mode: SIGUSR2 to the master (its pid does not
    /// change); done when a new worker process appears under it.
    HaproxyReload,
}

#[derive(Clone, Debug)]
pub struct Scenario {
    /// Arguments that make this binary a server (e.g. `["--serve", "ringflip"]`); the listen
    /// address, pid file and drain timeout are appended.
    pub serve_args: Vec<String>,
    pub strategy: Strategy,
    pub upgrades: usize,
    pub rate: u32,
    pub interval: Duration,
    pub long_lived: usize,
    pub burst: usize,
    pub drain_timeout: Duration,
    /// More server arguments (e.g. `--ballast-mib 2048`).
    pub server_args: Vec<String>,
    /// Wait this long after the server starts before loading it (e.g. for its ballast).
    pub warmup: Duration,
    /// Pin the server (and so every generation it starts) to CPU 0, the load generator being on
    /// CPU 1. Off: the server's processes run wherever the scheduler puts them, as in a
    /// deployment without pinning (they then share CPU 1 with the load generator at times).
    pub pin_server: bool,
    /// Hold every server process (all generations) to this share of one core, with a cgroup
    /// CPU quota ([`CpuCap`]): a server that saturates before the load generator does. `None`:
    /// no cap.
    pub server_cpu: Option<f64>,
}

pub struct UpgradeRow {
    pub old: u32,
    pub new: u32,
    pub at: Instant,
    /// Trigger → the new process's pid file (written once it serves).
    pub handover: Duration,
    /// Resident memory of the process being replaced, read just before the trigger.
    pub old_rss_mib: u64,
}

pub struct Outcome {
    pub rows: Vec<UpgradeRow>,
    pub report: LoadReport,
    /// CPU time of every server process (all generations), reaped.
    pub server_cpu: Duration,
    pub wall: Duration,
    /// Time the hypervisor ran something else on the server's CPU (0) during the run:
    /// `steal` of `/proc/stat`, 10 ms ticks. Zero where the kernel does not count it.
    pub steal_cpu0: Duration,
    /// The same for CPU 1, the load generator's: a client that loses its CPU falls behind its
    /// schedule, and the delay counts in the latencies too.
    pub steal_cpu1: Duration,
    /// Steal time of CPUs 0 and 1 as sampled every 10 ms through the run: (when, totals so far).
    pub steal_samples: Vec<StealSample>,
    pub failed_upgrades: usize,
    pub all_gone: bool,
    /// Connection requests the kernel dropped during the run because a listen queue was full
    /// (`TcpExtListenDrops` of `/proc/net/netstat`, machine-wide; `None` where unreadable): a
    /// dropped SYN is resent by the client after 1 s, then 3 s.
    pub listen_drops: Option<u64>,
    pub log: PathBuf,
    pub dir: PathBuf,
    /// ringflip's per-upgrade timelines from the server log (µs from the trigger), in the order
    /// of [`PHASES`]; empty for servers that do not log one.
    pub timelines: Vec<TimelineRow>,
}

/// The steps of ringflip's upgrade timeline, in µs from the trigger: the old process's own
/// (logged when it exits), then the moment the new process sent READY (from its own log; the
/// same monotonic clock).
pub const PHASES: [&str; 7] = [
    "spawned_us",
    "hello_sent_us",
    "ready_us",
    "accept_stopped_us",
    "drained_us",
    "exited_us",
    "ready_sent_us",
];
/// Indices into [`PHASES`].
pub const SPAWNED: usize = 0;
pub const READY: usize = 2;
pub const ACCEPT_STOPPED: usize = 3;
pub const READY_SENT: usize = 6;

/// One upgrade's timeline: µs from the trigger per [`PHASES`] entry, -1 where not reached.
pub type TimelineRow = [i64; 7];

/// `key=value` pairs of a log line, span fields (`upgrade{upgrade.id=…}:`) included.
fn fields(line: &str) -> impl Iterator<Item = (&str, &str)> {
    line.split(|c: char| c.is_whitespace() || c == '{')
        .filter_map(|t| t.split_once('='))
        .map(|(k, v)| (k, v.trim_end_matches(['}', ':'])))
}

/// Reads every upgrade timeline of a server log: the old processes' `upgrade timeline` lines,
/// matched by upgrade id with the new processes' `READY sent` lines.
pub fn parse_timelines(log: &str) -> Vec<TimelineRow> {
    let mut ready_sent = std::collections::HashMap::new();
    for line in log.lines().filter(|l| l.contains("READY sent")) {
        let id = fields(line)
            .find(|(k, _)| *k == "upgrade.id")
            .map(|(_, v)| v);
        let at = fields(line)
            .find(|(k, _)| *k == "sent_mono_us")
            .and_then(|(_, v)| v.parse::<i64>().ok());
        if let (Some(id), Some(at)) = (id, at) {
            ready_sent.insert(id.to_owned(), at);
        }
    }
    log.lines()
        .filter(|l| l.contains("upgrade timeline"))
        .filter_map(|l| {
            let mut row = [-1i64; 7];
            let (mut id, mut trigger) = (None, None);
            for (k, v) in fields(l) {
                match k {
                    "upgrade.id" => id = Some(v),
                    "trigger_mono_us" => trigger = v.parse::<i64>().ok(),
                    _ => {
                        if let Some(i) = PHASES.iter().position(|p| *p == k) {
                            row[i] = v.parse().ok()?;
                        }
                    }
                }
            }
            if let (Some(id), Some(trigger)) = (id, trigger) {
                if let Some(sent) = ready_sent.get(id) {
                    row[READY_SENT] = sent - trigger;
                }
            }
            Some(row)
        })
        .collect()
}

/// The median of column `i` over the rows where it was reached.
pub fn median_us(rows: &[TimelineRow], i: usize) -> Option<i64> {
    let mut v: Vec<i64> = rows.iter().map(|r| r[i]).filter(|x| *x >= 0).collect();
    v.sort_unstable();
    v.get(v.len() / 2).copied()
}

/// Median and max of `to - from` over the rows where both were reached.
pub fn gap_us(rows: &[TimelineRow], from: usize, to: usize) -> Option<(i64, i64)> {
    let mut v: Vec<i64> = rows
        .iter()
        .filter(|r| r[from] >= 0 && r[to] >= 0)
        .map(|r| r[to] - r[from])
        .collect();
    v.sort_unstable();
    Some((*v.get(v.len() / 2)?, *v.last()?))
}

impl Outcome {
    pub fn in_window(&self, t: Instant) -> bool {
        self.within(t, WINDOW)
    }
    fn within(&self, t: Instant, window: Duration) -> bool {
        self.rows.iter().any(|r| t >= r.at && t < r.at + window)
    }
    /// Connections started in the first [`HANDOVER_WINDOW`] after a trigger.
    pub fn handover_window(&self) -> Stats {
        self.report.stats(|t| self.within(t, HANDOVER_WINDOW))
    }
    /// Each upgrade window's slowest successful connection, with what this VM did to it: how
    /// late the client was to start it, and how much time the host took from CPU 0 (the
    /// server's) and CPU 1 (the client's) while it was open. In upgrade order. Their median
    /// says what a typical upgrade costs; a row's window p99.9 can come from one or two
    /// upgrades that met a stall of this VM's host.
    pub fn window_worst(&self) -> Vec<WorstConn> {
        self.rows
            .iter()
            .filter_map(|r| {
                let worst = self
                    .report
                    .samples
                    .iter()
                    .filter(|s| s.scheduled >= r.at && s.scheduled < r.at + WINDOW)
                    .filter_map(|s| Some((s, s.result.ok()?)))
                    .max_by_key(|(_, latency)| *latency)?;
                let (sample, latency) = worst;
                let stolen = self.steal_between(sample.scheduled, sample.scheduled + latency);
                Some(WorstConn {
                    latency,
                    client_lag: sample.client_lag(),
                    stolen,
                })
            })
            .collect()
    }
    /// Steal time of CPUs 0 and 1 between two instants, from the 10 ms samples: from the last
    /// sample at or before `from` to the first at or after `to`, so it may count up to one
    /// sampling period more on either side, never less. `/proc/stat` counts in 10 ms ticks, so a
    /// zero means "under 10 ms", not "nothing".
    fn steal_between(&self, from: Instant, to: Instant) -> [Duration; 2] {
        let s = &self.steal_samples;
        if s.is_empty() {
            return [Duration::ZERO; 2];
        }
        let first = s.partition_point(|x| x.0 <= from).saturating_sub(1);
        let last = s.partition_point(|x| x.0 < to).min(s.len() - 1);
        let (a, b) = (s[first].1, s[last].1);
        [b[0].saturating_sub(a[0]), b[1].saturating_sub(a[1])]
    }
    /// CPU 0's steal time inside the upgrade windows and outside them. At the default 1 s
    /// interval the windows are half of each interval; outside also covers the first interval
    /// and the last 500 ms, about 1.5 s more in a 20-upgrade row. Each 10 ms sample's increase
    /// counts where the sample was taken.
    pub fn steal_in_and_out_of_windows(&self) -> (Duration, Duration) {
        let (mut inside, mut outside) = (Duration::ZERO, Duration::ZERO);
        for pair in self.steal_samples.windows(2) {
            let delta = pair[1].1[0].saturating_sub(pair[0].1[0]);
            if self.in_window(pair[1].0) {
                inside += delta;
            } else {
                outside += delta;
            }
        }
        (inside, outside)
    }
    pub fn steady(&self) -> Stats {
        self.report.stats(|t| !self.in_window(t))
    }
    pub fn window(&self) -> Stats {
        self.report.stats(|t| self.in_window(t))
    }
    pub fn ok(&self) -> bool {
        self.report.failures.total() == 0
            && self.report.pings_failed == 0
            && self.failed_upgrades == 0
            && self.all_gone
    }
    pub fn median_handover(&self) -> Duration {
        let mut v: Vec<Duration> = self.rows.iter().map(|r| r.handover).collect();
        v.sort_unstable();
        v.get(v.len() / 2).copied().unwrap_or_default()
    }
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

pub fn run(s: &Scenario) -> Result<Outcome, String> {
    // Orphaned old generations re-parent to us, so we can reap them and count their CPU.
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    reap();
    let dir = std::env::temp_dir().join(format!(
        "ringflip-run-{}-{}",
        std::process::id(),
        s.serve_args.join("-").replace('/', "_")
    ));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let pid_file = dir.join("pid");
    let _ = std::fs::remove_file(&pid_file);
    let log = dir.join("server.log");
    let logf = std::fs::File::create(&log).map_err(|e| e.to_string())?;
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| e.to_string())?
        .port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let ncpu = cpus();
    let two_cores = ncpu >= 2;
    // Whatever this run pins this thread to, the next run starts from the CPUs it had.
    let _restore_affinity = AffinityRestore::save();
    let cap = s.server_cpu.map(CpuCap::new).transpose()?;
    let start_server = |reuseport: bool| -> Result<u32, String> {
        let mut cmd = server_command(&exe, &pid_file, s.drain_timeout, &logf, |cmd| {
            cmd.args(&s.serve_args)
                .args(&s.server_args)
                .args(["--listen", &addr.to_string()]);
        })?;
        if let Some(cap) = &cap {
            cap.apply(&mut cmd);
        }
        if reuseport {
            cmd.arg("--reuseport");
        }
        let pin = two_cores && s.pin_server;
        if pin {
            // Server on CPU 0, load on CPU 1: they do not measure each other. The server
            // inherits the affinity from this thread, its successors from it.
            pin_to_cpu(0);
        }
        let child = cmd.spawn().map_err(|e| format!("starting the server: {e}"));
        if pin {
            // This thread too stays off the server's CPU: it polls for the new pid every
            // 100 µs during each handover, which on CPU 0 took 15-20 % of the core from the
            // processes being measured (seen with `perf sched timehist`).
            pin_to_cpu(1);
        }
        Ok(child?.id())
    };
    let mut pids = vec![start_server(s.strategy == Strategy::ReusePort)?];
    let Some(mut current) = wait_for_pid(&pid_file, None, Duration::from_secs(10)) else {
        // Whatever did start (a proxy peer's backend) must not outlive the run.
        stop_helper(&pid_file, &mut pids);
        wait_all_gone(&pids, Duration::from_secs(10));
        return Err(format!("the server did not start; see {}", log.display()));
    };
    // A server that daemonizes (nginx) serves from another pid than the one started.
    if !pids.contains(&current) {
        pids.push(current);
    }
    std::thread::sleep(s.warmup);
    let meter = RunMeter::start(two_cores.then_some(1));
    let load = Load::start(LoadConfig {
        addr,
        rate: s.rate,
        long_lived: s.long_lived,
        ping_interval: Duration::from_millis(100),
        timeout: Duration::from_secs(3),
        max_duration: s.interval * (s.upgrades as u32 + 4) + Duration::from_secs(60),
        cpu: two_cores.then_some(1),
    });
    std::thread::sleep(s.interval);
    let mut rows = Vec::new();
    let mut failed_upgrades = 0;
    for _ in 0..s.upgrades {
        let old = current;
        let old_rss_mib = rss_mib(old);
        let at = Instant::now();
        load.burst(s.burst);
        // HAProxy's master keeps its pid: its reload is done when a new worker appears.
        let workers_before = (s.strategy == Strategy::HaproxyReload).then(|| children_of(old));
        match s.strategy {
            Strategy::BurstOnly => {
                rows.push(UpgradeRow {
                    old,
                    new: old,
                    at,
                    handover: Duration::ZERO,
                    old_rss_mib,
                });
                std::thread::sleep(s.interval.saturating_sub(at.elapsed()));
                continue;
            }
            Strategy::Signal => signal(old, libc::SIGHUP),
            Strategy::NginxUsr2 | Strategy::HaproxyReload => signal(old, libc::SIGUSR2),
            Strategy::Naive => {
                signal(old, libc::SIGTERM);
                let deadline = Instant::now() + s.drain_timeout + Duration::from_secs(5);
                while alive(old) && Instant::now() < deadline {
                    reap();
                    std::thread::sleep(Duration::from_micros(200));
                }
                pids.push(start_server(false)?);
            }
            Strategy::ReusePort => pids.push(start_server(true)?),
        }
        // A refused upgrade (nginx while an older master still drains) is given up on at the
        // next upgrade's time, so it does not shift the schedule.
        let timeout = s.interval.max(Duration::from_secs(1));
        let done = match &workers_before {
            Some(before) => wait_for_new_child(old, before, timeout).then_some(old),
            None => wait_for_pid(&pid_file, Some(old), timeout),
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
                match s.strategy {
                    Strategy::ReusePort => signal(old, libc::SIGTERM),
                    Strategy::NginxUsr2 => signal(old, libc::SIGQUIT),
                    _ => {}
                }
                if new != old {
                    pids.push(new);
                    current = new;
                }
            }
            None => failed_upgrades += 1,
        }
        reap();
        std::thread::sleep(s.interval.saturating_sub(at.elapsed()));
    }
    std::thread::sleep(Duration::from_millis(500));
    let report = load.stop();
    signal(current, libc::SIGTERM);
    stop_helper(&pid_file, &mut pids);
    pids.sort_unstable();
    pids.dedup();
    let all_gone = wait_all_gone(
        &pids,
        s.drain_timeout.min(Duration::from_secs(30)) + Duration::from_secs(10),
    );
    let m = meter.stop();
    let timelines = parse_timelines(&std::fs::read_to_string(&log).unwrap_or_default());
    if let Some(prefix) = std::env::var_os("RINGFLIP_DUMP_SAMPLES") {
        let mut path = prefix;
        path.push(format!("{:?}{}", s.strategy, s.serve_args.join("")));
        let path = PathBuf::from(path);
        dump_samples(&path.with_extension("csv"), &rows, &report);
        let _ = std::fs::copy(&log, path.with_extension("log"));
    }
    Ok(Outcome {
        timelines,
        rows,
        report,
        server_cpu: m.server_cpu,
        wall: m.wall,
        steal_cpu0: m.steal_cpu0,
        steal_cpu1: m.steal_cpu1,
        listen_drops: m.listen_drops,
        steal_samples: m.steal_samples,
        failed_upgrades,
        all_gone,
        log,
        dir,
    })
}

/// `kill(pid, sig)` on a pid this binary started (directly or by upgrade).
pub fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: plain syscall on a pid this run started (directly or by upgrade).
    unsafe { libc::kill(pid as i32, sig) };
}

/// The pid a pid file names, if it names one.
pub fn read_pid(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Polls the pid file until it names a live process other than `old`.
pub fn wait_for_pid(path: &Path, old: Option<u32>, timeout: Duration) -> Option<u32> {
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

/// Polls until `pid` has a child process not in `before`.
pub fn wait_for_new_child(pid: u32, before: &[u32], timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if children_of(pid).iter().any(|p| !before.contains(p)) {
            return true;
        }
        std::thread::sleep(Duration::from_micros(100));
    }
    false
}

/// `pid`'s resident memory (VmRSS) in MiB; 0 if it cannot be read.
pub fn rss_mib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kib| kib / 1024)
}

/// Whether `pid` exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
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

/// SIGTERMs the helper process a server started, if it named one in `<pid file>.extra` (a
/// proxy peer's backend), and adds it to the pids to wait for.
pub fn stop_helper(pid_file: &Path, pids: &mut Vec<u32>) {
    let mut extra = pid_file.as_os_str().to_owned();
    extra.push(".extra");
    if let Some(helper) = read_pid(Path::new(&extra)) {
        signal(helper, libc::SIGTERM);
        pids.push(helper);
    }
}

/// The child processes of `pid` (its main thread's children, from /proc).
pub fn children_of(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

pub fn reap() {
    // SAFETY: reaping any exited child (we are their subreaper), never blocking.
    while unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) } > 0 {}
}

/// Waits for every pid to exit (reaping as we go); SIGKILLs stragglers at the deadline.
pub fn wait_all_gone(pids: &[u32], timeout: Duration) -> bool {
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
                    signal(*p, libc::SIGKILL);
                }
            }
            std::thread::sleep(Duration::from_millis(100));
            reap();
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// An upgrade window's slowest connection and what this VM did to it ([`Outcome::window_worst`]).
#[derive(Clone, Copy, Debug)]
pub struct WorstConn {
    /// From its scheduled start to the checked reply.
    pub latency: Duration,
    /// How late the client was to call `connect()`.
    pub client_lag: Duration,
    /// Steal time of CPUs 0 (server) and 1 (client) while it was open, in 10 ms ticks: a
    /// tick may stand for a few µs of steal, and fall up to one sample before or after.
    pub stolen: [Duration; 2],
}

impl WorstConn {
    /// Whether the host took either CPU while it was open, or the client started it late by a
    /// millisecond or more: a slow connection this VM can account for.
    pub fn disturbed(&self) -> bool {
        self.stolen.iter().any(|d| !d.is_zero()) || self.client_lag >= Duration::from_millis(1)
    }
}

/// When, and CPUs 0 and 1's steal time so far.
pub type StealSample = (Instant, [Duration; 2]);

/// CPUs 0 and 1's `steal` time from `/proc/stat` (the eighth value of their `cpuN` lines, in
/// USER_HZ ticks, 100 per second on Linux); `None` if it cannot be read (say, with every fd in
/// use while a peer times out thousands of connections). A missing CPU 1 counts 0.
fn steal_of_cpus() -> Option<[Duration; 2]> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let steal = |prefix: &str| -> Option<Duration> {
        let ticks: u64 = stat
            .lines()
            .find_map(|l| l.strip_prefix(prefix))
            .and_then(|rest| rest.split_whitespace().nth(7))
            .and_then(|v| v.parse().ok())?;
        Some(Duration::from_millis(ticks * 10))
    };
    Some([steal("cpu0 ")?, steal("cpu1 ").unwrap_or_default()])
}

/// What every run measures around its load, started before the load and stopped once every
/// server process is gone: see [`Metered`].
pub struct RunMeter {
    cpu_before: Duration,
    drops_before: Option<u64>,
    steal: StealSampler,
    t0: Instant,
}

/// A run's measures: the servers' CPU (every process of every generation, reaped), the wall
/// time, the hypervisor's steal on CPUs 0 and 1 (and its samples), the kernel's listen drops.
pub struct Metered {
    pub server_cpu: Duration,
    pub wall: Duration,
    pub steal_cpu0: Duration,
    pub steal_cpu1: Duration,
    pub steal_samples: Vec<StealSample>,
    pub listen_drops: Option<u64>,
}

impl RunMeter {
    /// Starts measuring; the steal sampler's thread runs on `sampler_cpu`.
    pub fn start(sampler_cpu: Option<usize>) -> RunMeter {
        RunMeter {
            cpu_before: children_cpu(),
            drops_before: listen_drops(),
            steal: StealSampler::start(sampler_cpu),
            t0: Instant::now(),
        }
    }

    pub fn stop(self) -> Metered {
        let wall = self.t0.elapsed();
        let server_cpu = children_cpu().saturating_sub(self.cpu_before);
        let steal_samples = self.steal.stop();
        // From the samples: a read of /proc/stat can fail, and a failed read must not count as 0.
        let stolen = |cpu: usize| match (steal_samples.first(), steal_samples.last()) {
            (Some(first), Some(last)) => last.1[cpu].saturating_sub(first.1[cpu]),
            _ => Duration::ZERO,
        };
        Metered {
            server_cpu,
            wall,
            steal_cpu0: stolen(0),
            steal_cpu1: stolen(1),
            listen_drops: listen_drops()
                .zip(self.drops_before)
                .map(|(after, before)| after.saturating_sub(before)),
            steal_samples,
        }
    }
}

/// Samples [`steal_of_cpus`] every 10 ms on a thread of its own (on `cpu`, the load generator's,
/// so it does not run beside the server) until stopped.
pub struct StealSampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<Vec<StealSample>>>,
}

impl StealSampler {
    pub fn start(cpu: Option<usize>) -> StealSampler {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            if let Some(cpu) = cpu {
                pin_to_cpu(cpu);
            }
            let mut samples = Vec::new();
            // Bounded: 20 minutes of samples at most, whatever the caller does.
            for _ in 0..120_000 {
                if flag.load(Ordering::Relaxed) {
                    break;
                }
                if let Some(steal) = steal_of_cpus() {
                    samples.push((Instant::now(), steal));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            samples
        });
        StealSampler {
            stop,
            thread: Some(thread),
        }
    }

    pub fn stop(mut self) -> Vec<StealSample> {
        self.halt()
    }

    /// Stops the thread (once) and returns its samples.
    fn halt(&mut self) -> Vec<StealSample> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default()
    }
}

/// A row that ends early (a server that does not start) stops its sampler too.
impl Drop for StealSampler {
    fn drop(&mut self) {
        self.halt();
    }
}

/// CPU time (user + system) of every reaped descendant.
pub fn children_cpu() -> Duration {
    // SAFETY: rusage is plain data, filled by the kernel.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is live.
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// A server process of the benches: `program`, its leading arguments (`args`: which server,
/// its listeners), then the pid file and the drain timeout every server takes, the log filter
/// the benches read (`ringflip::timeline`), no colour, and its output in `log`.
pub fn server_command(
    program: &Path,
    pid_file: &Path,
    drain_timeout: Duration,
    log: &std::fs::File,
    args: impl FnOnce(&mut Command),
) -> Result<Command, String> {
    let mut cmd = Command::new(program);
    args(&mut cmd);
    cmd.arg("--pid-file")
        .arg(pid_file)
        .args(["--drain-timeout-ms", &drain_timeout.as_millis().to_string()])
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or("warn,ringflip::timeline=info".into()),
        )
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log.try_clone().map_err(|e| e.to_string())?);
    Ok(cmd)
}

/// A cgroup that holds the processes started in it (and every process they start) to a share
/// of one core: the `cpu` controller's CFS quota (cgroup v1 `cpu.cfs_quota_us`, or v2
/// `cpu.max`), with a 10 ms period so that a throttled server stalls at most ~10 ms at a time
/// (the default 100 ms period makes every throttle a 100 ms stall). Needs root. Removed when
/// dropped (after its processes are gone; one still there keeps it, and the next run gets a
/// cgroup of its own).
pub struct CpuCap {
    dir: PathBuf,
    /// `cgroup.procs` of `dir`, as a C string: written in the child between fork and exec.
    procs: std::ffi::CString,
}

impl CpuCap {
    pub fn new(share: f64) -> Result<CpuCap, String> {
        const PERIOD_US: u64 = 10_000;
        let quota = ((share * PERIOD_US as f64) as u64).max(1000);
        // One cgroup per run: a straggler of an earlier run (a generation still draining)
        // must not spend this run's quota.
        static RUNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let run = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("ringflip-bench-{}-{run}", std::process::id());
        let v1 = Path::new("/sys/fs/cgroup/cpu");
        let (dir, settings) = if v1.join("cpu.cfs_quota_us").exists() {
            let dir = v1.join(&name);
            (
                dir,
                vec![
                    ("cpu.cfs_period_us", PERIOD_US.to_string()),
                    ("cpu.cfs_quota_us", quota.to_string()),
                ],
            )
        } else {
            (
                Path::new("/sys/fs/cgroup").join(&name),
                vec![("cpu.max", format!("{quota} {PERIOD_US}"))],
            )
        };
        let _ = std::fs::create_dir(&dir);
        for (file, value) in settings {
            std::fs::write(dir.join(file), &value).map_err(|e| {
                format!(
                    "capping the server's CPU: {}: {e} (needs root and the cpu controller)",
                    dir.join(file).display()
                )
            })?;
        }
        let procs = std::ffi::CString::new(
            dir.join("cgroup.procs")
                .into_os_string()
                .into_encoded_bytes(),
        )
        .map_err(|e| e.to_string())?;
        Ok(CpuCap { dir, procs })
    }

    /// Makes `cmd`'s process join this cgroup before it execs.
    pub fn apply(&self, cmd: &mut Command) {
        use std::os::unix::process::CommandExt;
        let procs = self.procs.clone();
        // SAFETY: between fork and exec only async-signal-safe calls (open, write, close) on
        // memory allocated before the fork.
        unsafe {
            cmd.pre_exec(move || {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let written = libc::write(fd, b"0".as_ptr().cast(), 1);
                libc::close(fd);
                if written != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
}

impl Drop for CpuCap {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// `TcpExtListenDrops` from `/proc/net/netstat` (a line of names, then a line of values).
pub fn listen_drops() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/net/netstat").ok()?;
    let mut lines = text.lines();
    while let (Some(names), Some(values)) = (lines.next(), lines.next()) {
        if !names.starts_with("TcpExt:") {
            continue;
        }
        let i = names.split_whitespace().position(|n| n == "ListenDrops")?;
        return values.split_whitespace().nth(i)?.parse().ok();
    }
    None
}

/// This thread's CPU affinity as it was when saved, set again when dropped.
pub struct AffinityRestore(libc::cpu_set_t);

impl AffinityRestore {
    pub fn save() -> AffinityRestore {
        // SAFETY: cpu_set_t is plain data, filled by the kernel.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set);
            AffinityRestore(set)
        }
    }
}

impl Drop for AffinityRestore {
    fn drop(&mut self) {
        // SAFETY: a mask the kernel gave this thread before.
        unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &self.0) };
    }
}

/// Writes every sample as `upgrade,offset_us,latency_us,client_lag_us` (offset of its scheduled start from the
/// latest trigger before it; upgrade -1 before the first; latency -1 when it failed), for
/// looking at where in a window the slow connections were. `RINGFLIP_DUMP_SAMPLES=PREFIX` writes
/// `PREFIX<strategy><serve args>.csv` per server, and a copy of its log beside it (`.log`).
fn dump_samples(path: &Path, rows: &[UpgradeRow], report: &LoadReport) {
    use std::fmt::Write as _;
    let mut out = String::from("upgrade,offset_us,latency_us,client_lag_us\n");
    for s in &report.samples {
        let i = rows.partition_point(|r| r.at <= s.scheduled);
        let (upgrade, offset) = match i.checked_sub(1) {
            Some(k) => (k as i64, (s.scheduled - rows[k].at).as_micros() as i64),
            None => (-1, 0),
        };
        let latency = s.result.map_or(-1, |d| d.as_micros() as i64);
        let lag = s.client_lag().as_micros();
        let _ = writeln!(out, "{upgrade},{offset},{latency},{lag}");
    }
    if let Err(e) = std::fs::write(path, out) {
        eprintln!("writing {}: {e}", path.display());
    }
}

/// Raises this process's fd limit (its servers inherit it) to at least `need` if it can (past
/// the hard limit only with CAP_SYS_RESOURCE, up to fs.nr_open; else to the hard limit);
/// returns the soft limit it has then.
pub fn raise_nofile(need: u64) -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 0;
    };
    if soft >= need {
        return soft;
    }
    if hard < need && setrlimit(Resource::RLIMIT_NOFILE, need, need).is_ok() {
        return need;
    }
    let to = hard.min(need.max(soft));
    if setrlimit(Resource::RLIMIT_NOFILE, to, hard).is_ok() {
        return to;
    }
    soft
}
