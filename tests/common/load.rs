//! The one client load generator, [`Load`]: closed-loop connections and long-lived pingers, every
//! failure counted by kind. Its options make the variants the tests need: a burst (many
//! connections released at one moment, [`LoadOpts::burst`]), a bounded number of connections
//! per thread, and a record of each connection's start, end and result
//! ([`LoadOpts::record_samples`]).

use std::collections::BTreeMap;
use std::fmt;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use super::client::{
    connect, echo_once, exchange, kind_index, recv_line, send_line, FailKind, Failure, KINDS,
};

/// Hard cap for any load loop, whatever the stop flag says.
pub const LOAD_HARD_CAP: Duration = Duration::from_secs(120);

static LOAD_IDS: AtomicU64 = AtomicU64::new(0);
const MAX_KEPT_ERRORS: usize = 10;

/// One closed-loop connection: when it started, when it ended, how it went.
pub type Sample = (Instant, Instant, Result<(), Failure>);

#[derive(Debug, Default)]
struct Counters {
    ok: AtomicU64,
    fails: [AtomicU64; 6],
    pings_ok: AtomicU64,
    pings_failed: AtomicU64,
    first_errors: Mutex<Vec<String>>,
    /// Filled by each closed-loop thread as it ends (with [`LoadOpts::record_samples`]).
    samples: Mutex<Vec<Sample>>,
}

impl Counters {
    fn fail(&self, who: &str, (kind, msg): Failure) {
        self.fails[kind_index(kind)].fetch_add(1, Ordering::Relaxed);
        self.note(who, kind, &msg);
    }

    fn note(&self, who: &str, kind: FailKind, msg: &str) {
        let mut v = self.first_errors.lock().unwrap();
        if v.len() < MAX_KEPT_ERRORS {
            v.push(format!("{who}: {kind:?}: {msg}"));
        }
    }

    fn by_kind(&self) -> BTreeMap<FailKind, u64> {
        KINDS
            .iter()
            .map(|&k| (k, self.fails[kind_index(k)].load(Ordering::Relaxed)))
            .filter(|&(_, n)| n > 0)
            .collect()
    }
}

/// Result of a [`Load`] run.
#[derive(Clone, Debug, Default)]
pub struct LoadReport {
    /// Closed-loop connections that echoed correctly.
    pub connections_ok: u64,
    /// Closed-loop connection failures, by kind (kinds with 0 omitted).
    pub failures_by_kind: BTreeMap<FailKind, u64>,
    /// Long-lived connection pings that echoed correctly.
    pub pings_ok: u64,
    /// Long-lived pings that failed (any error or wrong reply), incl. failing to open one.
    pub pings_failed: u64,
    /// The first few error messages, for the report.
    pub first_errors: Vec<String>,
    /// Every closed-loop connection, with [`LoadOpts::record_samples`] (complete once the
    /// load is stopped; empty otherwise).
    pub samples: Vec<Sample>,
    /// From the start (for a held load: from [`Load::release`]) to the report.
    pub elapsed: Duration,
}

impl LoadReport {
    pub fn failures(&self) -> u64 {
        self.failures_by_kind.values().sum()
    }

    /// Panics with the report if anything failed.
    pub fn assert_clean(&self) {
        assert!(
            self.failures() == 0 && self.pings_failed == 0,
            "load saw failures:\n{self}"
        );
    }
}

impl fmt::Display for LoadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "connections ok {}, failed {} {:?}; pings ok {}, failed {}; over {:?}",
            self.connections_ok,
            self.failures(),
            self.failures_by_kind,
            self.pings_ok,
            self.pings_failed,
            self.elapsed
        )?;
        for e in &self.first_errors {
            writeln!(f, "  {e}")?;
        }
        Ok(())
    }
}

/// Background client load: closed-loop connect/echo/close threads plus long-lived connections
/// that ping every 100 ms.
#[derive(Debug)]
pub struct Load {
    stop: Arc<AtomicBool>,
    counters: Arc<Counters>,
    threads: Vec<JoinHandle<()>>,
    /// With [`LoadOpts::held`]: the closed-loop threads wait here until [`Load::release`].
    barrier: Option<Arc<Barrier>>,
    started: Instant,
    /// Whether [`Load::wait`] can end: every thread stops on its own.
    bounded: bool,
}

/// Knobs for [`Load::start_with`].
#[derive(Clone, Debug)]
pub struct LoadOpts {
    pub closed_loop_threads: usize,
    pub long_lived: usize,
    /// Threads sharing the long-lived connections.
    pub ping_threads: usize,
    pub ping_interval: Duration,
    pub connect_timeout: Duration,
    pub io_timeout: Duration,
    /// Pause after each closed-loop connection (0 = none); keeps a 2-core machine breathing.
    pub pause: Duration,
    /// Further pause after a failed closed-loop connection: don't spin on a dead server.
    pub pause_after_failure: Duration,
    /// Connections each closed-loop thread makes before it ends (`None`: until stopped).
    pub connections_per_thread: Option<u64>,
    /// The closed-loop threads wait at a barrier until [`Load::release`].
    pub held: bool,
    /// Keep every closed-loop connection's start, end and result ([`LoadReport::samples`]).
    pub record_samples: bool,
    /// Stack size of the closed-loop threads (`None`: std's default).
    pub stack_size: Option<usize>,
}

impl Default for LoadOpts {
    fn default() -> Self {
        LoadOpts {
            closed_loop_threads: 8,
            long_lived: 16,
            ping_threads: 4,
            ping_interval: Duration::from_millis(100),
            connect_timeout: Duration::from_secs(2),
            io_timeout: Duration::from_secs(2),
            pause: Duration::ZERO,
            pause_after_failure: Duration::from_millis(10),
            connections_per_thread: None,
            held: false,
            record_samples: false,
            stack_size: None,
        }
    }
}

impl LoadOpts {
    /// Timeouts of a burst: with hundreds of simultaneous SYNs a dropped SYN is retransmitted
    /// after 1 s, which is slow but not a lost connection.
    pub const BURST_TIMEOUT: Duration = Duration::from_secs(5);

    /// A burst: `n` threads that connect at the same moment ([`Load::release`]), echo one line
    /// each, and close; [`Load::wait`] for the report.
    pub fn burst(n: usize) -> LoadOpts {
        LoadOpts {
            closed_loop_threads: n,
            long_lived: 0,
            connect_timeout: LoadOpts::BURST_TIMEOUT,
            io_timeout: LoadOpts::BURST_TIMEOUT,
            pause_after_failure: Duration::ZERO,
            connections_per_thread: Some(1),
            held: true,
            stack_size: Some(64 * 1024),
            ..LoadOpts::default()
        }
    }
}

impl Load {
    /// `closed_loop_threads` connect/echo/close loops and `long_lived` persistent connections
    /// (opened now, before returning).
    pub fn start(addr: SocketAddr, closed_loop_threads: usize, long_lived: usize) -> Load {
        Load::start_with(
            addr,
            LoadOpts {
                closed_loop_threads,
                long_lived,
                ..LoadOpts::default()
            },
        )
    }

    pub fn start_with(addr: SocketAddr, o: LoadOpts) -> Load {
        let id = LOAD_IDS.fetch_add(1, Ordering::Relaxed);
        let stop = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(Counters::default());
        let started = Instant::now();
        let mut threads = Vec::new();
        start_long_lived(addr, &o, id, &stop, &counters, started, &mut threads);

        let barrier = o
            .held
            .then(|| Arc::new(Barrier::new(o.closed_loop_threads + 1)));
        for t in 0..o.closed_loop_threads {
            let stop = stop.clone();
            let c = counters.clone();
            let o = o.clone();
            let barrier = barrier.clone();
            let mut builder = thread::Builder::new().name(format!("closed-loop-{t}"));
            if let Some(size) = o.stack_size {
                builder = builder.stack_size(size);
            }
            let thread = builder.spawn(move || {
                if let Some(b) = barrier {
                    b.wait();
                }
                let mut samples = Vec::new();
                let mut seq = 0u64;
                while !stop.load(Ordering::Relaxed)
                    && started.elapsed() < LOAD_HARD_CAP
                    && o.connections_per_thread.is_none_or(|n| seq < n)
                {
                    seq += 1;
                    let line = format!("L{id}-t{t}-{seq}\n");
                    let t0 = Instant::now();
                    let r = echo_once(addr, &line, o.connect_timeout, o.io_timeout);
                    if o.record_samples {
                        samples.push((t0, Instant::now(), r.clone()));
                    }
                    let failed = r.is_err();
                    match r {
                        Ok(()) => {
                            c.ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(f) => c.fail(&format!("closed-loop t{t} #{seq}"), f),
                    }
                    if o.connections_per_thread == Some(seq) {
                        break; // done: no pause after the last one
                    }
                    if failed && !o.pause_after_failure.is_zero() {
                        thread::sleep(o.pause_after_failure);
                    }
                    if !o.pause.is_zero() {
                        thread::sleep(o.pause);
                    }
                }
                c.samples.lock().unwrap().extend(samples);
            });
            threads.push(thread.expect("spawn closed-loop thread"));
        }
        Load {
            stop,
            counters,
            threads,
            barrier,
            started,
            bounded: o.long_lived == 0
                && (o.closed_loop_threads == 0 || o.connections_per_thread.is_some()),
        }
    }

    /// Lets the closed-loop threads of a held load ([`LoadOpts::held`]) go, all at once
    /// (returns once they all are at the barrier); the report's time counts from here.
    pub fn release(&mut self) {
        if let Some(b) = self.barrier.take() {
            b.wait();
            self.started = Instant::now();
        }
    }

    /// Progress so far (without stopping).
    pub fn snapshot(&self) -> LoadReport {
        LoadReport {
            connections_ok: self.counters.ok.load(Ordering::Relaxed),
            failures_by_kind: self.counters.by_kind(),
            pings_ok: self.counters.pings_ok.load(Ordering::Relaxed),
            pings_failed: self.counters.pings_failed.load(Ordering::Relaxed),
            first_errors: self.counters.first_errors.lock().unwrap().clone(),
            samples: self.counters.samples.lock().unwrap().clone(),
            elapsed: self.started.elapsed(),
        }
    }

    /// Stops every thread (bounded: each op has a timeout), closes the long-lived connections,
    /// and returns the report.
    pub fn stop(mut self) -> LoadReport {
        self.stop.store(true, Ordering::Relaxed);
        self.release();
        for t in self.threads.drain(..) {
            t.join().expect("load thread panicked");
        }
        self.snapshot()
    }

    /// Releases a held load, then waits for every thread to end on its own (each connection is
    /// bounded by its timeouts): for a load with [`LoadOpts::connections_per_thread`] and no
    /// long-lived connections, such as a burst.
    pub fn wait(mut self) -> LoadReport {
        assert!(
            self.bounded,
            "Load::wait on a load that runs until stopped: use stop"
        );
        self.release();
        for t in self.threads.drain(..) {
            t.join().expect("load thread panicked");
        }
        self.snapshot()
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.release();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Long-lived connections: opened (and checked with one ping) before returning, then pinged by
/// `o.ping_threads` threads every `o.ping_interval`. Pipelined (all connect, all write, then all
/// read) so a hung server costs one timeout, not 16.
fn start_long_lived(
    addr: SocketAddr,
    o: &LoadOpts,
    id: u64,
    stop: &Arc<AtomicBool>,
    counters: &Arc<Counters>,
    started: Instant,
    threads: &mut Vec<JoinHandle<()>>,
) {
    let mut conns: Vec<Vec<(usize, TcpStream)>> =
        (0..o.ping_threads.max(1)).map(|_| Vec::new()).collect();
    let mut opening: Vec<(usize, TcpStream, String)> = Vec::new();
    for i in 0..o.long_lived {
        let line = format!("L{id}-c{i}-open\n");
        match connect(addr, o.connect_timeout, o.io_timeout)
            .and_then(|mut s| send_line(&mut s, &line).map(|_| s))
        {
            Ok(s) => opening.push((i, s, line)),
            Err((k, m)) => {
                counters.pings_failed.fetch_add(1, Ordering::Relaxed);
                counters.note(&format!("long-lived #{i}"), k, &format!("opening: {m}"));
            }
        }
    }
    let deadline = Instant::now() + o.io_timeout;
    for (i, mut s, line) in opening {
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(10));
        s.set_read_timeout(Some(left)).ok();
        let r = recv_line(&mut s, &line);
        s.set_read_timeout(Some(o.io_timeout)).ok();
        match r {
            Ok(()) => {
                counters.pings_ok.fetch_add(1, Ordering::Relaxed);
                let n = conns.len();
                conns[i % n].push((i, s));
            }
            Err((k, m)) => {
                counters.pings_failed.fetch_add(1, Ordering::Relaxed);
                counters.note(&format!("long-lived #{i}"), k, &format!("opening: {m}"));
            }
        }
    }
    for (t, mut mine) in conns.into_iter().enumerate() {
        if mine.is_empty() {
            continue;
        }
        let stop = stop.clone();
        let c = counters.clone();
        let interval = o.ping_interval;
        threads.push(
            thread::Builder::new()
                .name(format!("pinger-{t}"))
                .spawn(move || {
                    let mut seq = 0u64;
                    let mut next = Instant::now() + interval;
                    while !stop.load(Ordering::Relaxed)
                        && started.elapsed() < LOAD_HARD_CAP
                        && !mine.is_empty()
                    {
                        // Sleep until the next tick, watching the stop flag.
                        while Instant::now() < next && !stop.load(Ordering::Relaxed) {
                            thread::sleep(
                                Duration::from_millis(5)
                                    .min(next.saturating_duration_since(Instant::now())),
                            );
                        }
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        next += interval;
                        seq += 1;
                        mine.retain_mut(|(i, s)| {
                            match exchange(s, &format!("L{id}-c{i}-{seq}\n")) {
                                Ok(()) => {
                                    c.pings_ok.fetch_add(1, Ordering::Relaxed);
                                    true
                                }
                                Err((k, m)) => {
                                    c.pings_failed.fetch_add(1, Ordering::Relaxed);
                                    c.note(&format!("long-lived #{i} ping {seq}"), k, &m);
                                    false // dead: drop it
                                }
                            }
                        });
                    }
                    // Dropping `mine` closes the connections.
                })
                .expect("spawn pinger"),
        );
    }
}

/// `n` simultaneous connect+echo+close ([`LoadOpts::burst`]); returns the report.
pub fn burst(addr: SocketAddr, n: usize) -> LoadReport {
    let mut b = Load::start_with(addr, LoadOpts::burst(n));
    b.release();
    b.wait()
}
