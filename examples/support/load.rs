//! An open-loop load generator for an echo server, on one thread with epoll.
//!
//! New connections start on a fixed schedule (`rate` per second), whatever happened to earlier
//! ones, and each connection's latency is measured from its *scheduled* start, so a stall shows
//! in the numbers instead of silently slowing the load (no coordinated omission). Each
//! connection connects, writes one line, reads the echo, checks it and closes. Long-lived
//! connections stay open and ping on their own schedule. A burst opens many connections at once.
//! Every failure is classified.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io;
use std::mem;
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Connects of a burst opened per turn of the load loop (see `run`).
const BURST_CHUNK: usize = 32;

/// What to send.
#[derive(Clone, Debug)]
pub struct LoadConfig {
    pub addr: SocketAddr,
    /// New connections per second (open loop); 0 for none.
    pub rate: u32,
    /// Connections kept open for the whole run, each pinging every `ping_interval`.
    pub long_lived: usize,
    pub ping_interval: Duration,
    /// A connection (or a ping) not answered within this is a timeout.
    pub timeout: Duration,
    /// Hard cap on the run, whatever the caller does.
    pub max_duration: Duration,
    /// CPU to pin the load thread to, if any.
    pub cpu: Option<usize>,
}

/// Failures by kind.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Failures {
    pub refused: u64,
    pub reset: u64,
    pub eof: u64,
    pub timeout: u64,
    pub wrong_reply: u64,
    pub other: u64,
}

impl Failures {
    pub fn total(&self) -> u64 {
        self.refused + self.reset + self.eof + self.timeout + self.wrong_reply + self.other
    }
    fn add(&mut self, kind: Kind) {
        match kind {
            Kind::Refused => self.refused += 1,
            Kind::Reset => self.reset += 1,
            Kind::Eof => self.eof += 1,
            Kind::Timeout => self.timeout += 1,
            Kind::WrongReply => self.wrong_reply += 1,
            Kind::Other => self.other += 1,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Refused,
    Reset,
    Eof,
    Timeout,
    WrongReply,
    Other,
}

/// One finished short connection: when it was scheduled, when its `connect()` began, how long it
/// took from the schedule, or how it failed.
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    pub scheduled: Instant,
    /// When this client called `connect()`: later than `scheduled` by the client's own lateness
    /// (its CPU taken by the host, or the loop busy with other connections), which no server
    /// can be blamed for but which counts in the latency all the same.
    pub connect_at: Instant,
    pub result: Result<Duration, Kind>,
}

impl Sample {
    /// How late the client was to start this connection.
    pub fn client_lag(&self) -> Duration {
        self.connect_at.saturating_duration_since(self.scheduled)
    }
}

/// Everything a run measured.
#[derive(Debug, Default)]
pub struct LoadReport {
    pub samples: Vec<Sample>,
    pub failures: Failures,
    pub pings_ok: u64,
    pub pings_failed: u64,
    pub first_errors: Vec<String>,
    pub started: Option<Instant>,
    pub stopped: Option<Instant>,
}

/// Latency percentiles of a set of samples.
#[derive(Clone, Copy, Debug, Default)]
pub struct Stats {
    pub count: usize,
    pub p50: Duration,
    pub p99: Duration,
    pub p999: Duration,
    pub max: Duration,
}

impl LoadReport {
    /// Latency stats of the successful samples scheduled in a window for which `keep` is true.
    pub fn stats(&self, keep: impl Fn(Instant) -> bool) -> Stats {
        let mut v: Vec<Duration> = self
            .samples
            .iter()
            .filter(|s| keep(s.scheduled))
            .filter_map(|s| s.result.ok())
            .collect();
        v.sort_unstable();
        if v.is_empty() {
            return Stats::default();
        }
        let q = |p: f64| v[((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1];
        Stats {
            count: v.len(),
            p50: q(0.50),
            p99: q(0.99),
            p999: q(0.999),
            max: *v.last().unwrap(),
        }
    }

    /// Failures among samples scheduled in a window.
    pub fn failures_in(&self, keep: impl Fn(Instant) -> bool) -> u64 {
        self.samples
            .iter()
            .filter(|s| keep(s.scheduled) && s.result.is_err())
            .count() as u64
    }

    /// Total successful short connections.
    pub fn ok(&self) -> usize {
        self.samples.iter().filter(|s| s.result.is_ok()).count()
    }
}

/// A running load.
pub struct Load {
    stop: Arc<AtomicBool>,
    burst: Arc<AtomicUsize>,
    thread: Option<JoinHandle<LoadReport>>,
}

impl Load {
    pub fn start(config: LoadConfig) -> Load {
        grow_fd_table(4096);
        let stop = Arc::new(AtomicBool::new(false));
        let burst = Arc::new(AtomicUsize::new(0));
        let (s, b) = (stop.clone(), burst.clone());
        let thread = std::thread::Builder::new()
            .name("load".into())
            .spawn(move || run(config, &s, &b))
            .expect("spawning the load thread");
        Load {
            stop,
            burst,
            thread: Some(thread),
        }
    }

    /// Opens `n` connections at once, at the next turn of the loop.
    pub fn burst(&self, n: usize) {
        self.burst.fetch_add(n, Ordering::SeqCst);
    }

    /// Stops starting connections, lets those in flight finish (bounded by the timeout), closes
    /// the long-lived ones and returns the report.
    pub fn stop(mut self) -> LoadReport {
        self.stop.store(true, Ordering::SeqCst);
        self.thread
            .take()
            .unwrap()
            .join()
            .expect("load thread panicked")
    }
}

/// Grows this process's fd table to `slots` (at most the fd limit) before the load starts: a
/// multi-threaded process that grows its table waits an RCU grace period (10-20 ms on this VM,
/// seen in the load thread's `socket()` at the first burst), which would count as the servers'
/// latency. A dup2 to the last slot, then a close, grows it once.
fn grow_fd_table(slots: u64) {
    let Ok((soft, _)) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
    else {
        return;
    };
    let slot = slots.min(soft).saturating_sub(1) as libc::c_int;
    // SAFETY: F_GETFD only reads flags; dup2 onto a slot just seen closed, then closing it,
    // touches no fd anyone else holds.
    unsafe {
        if slot > 2 && libc::fcntl(slot, libc::F_GETFD) < 0 && libc::dup2(0, slot) == slot {
            libc::close(slot);
        }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    Connecting,
    AwaitingReply,
    /// A long-lived connection between pings.
    Idle,
}

struct Conn {
    fd: RawFd,
    state: State,
    /// When the current exchange was scheduled (latency is measured from here).
    scheduled: Instant,
    /// When its `connect()` began.
    connect_at: Instant,
    deadline: Instant,
    expect: Vec<u8>,
    got: Vec<u8>,
    long_lived: bool,
    next_ping: Instant,
    seq: u64,
}

fn run(config: LoadConfig, stop: &AtomicBool, burst: &AtomicUsize) -> LoadReport {
    if let Some(cpu) = config.cpu {
        pin_to_cpu(cpu);
    }
    // SAFETY: plain syscall.
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    assert!(ep >= 0, "epoll_create1: {}", io::Error::last_os_error());
    let mut report = LoadReport {
        samples: Vec::with_capacity(1 << 20),
        ..Default::default()
    };
    let mut conns: HashMap<RawFd, Conn> = HashMap::new();
    let mut seq: u64 = 0;
    let start = Instant::now();
    report.started = Some(start);
    let hard_stop = start + config.max_duration;
    let interval = if config.rate > 0 {
        Some(Duration::from_secs_f64(1.0 / config.rate as f64))
    } else {
        None
    };
    let mut next_start = start;
    let mut n_started: u64 = 0;
    let mut burst_pending = 0usize;

    for _ in 0..config.long_lived {
        seq += 1;
        match open(ep, &config, start, seq, true) {
            Ok(c) => {
                conns.insert(c.fd, c);
            }
            Err(e) => {
                report.pings_failed += 1;
                note(&mut report, format!("long-lived connect: {e}"));
            }
        }
    }

    let mut events: Vec<libc::epoll_event> = vec![libc::epoll_event { events: 0, u64: 0 }; 1024];
    let mut stopping_since: Option<Instant> = None;
    loop {
        let now = Instant::now();
        let stopping = stop.load(Ordering::SeqCst) || now >= hard_stop;
        if stopping && stopping_since.is_none() {
            stopping_since = Some(now);
        }
        if !stopping {
            if let Some(iv) = interval {
                while next_start <= now {
                    seq += 1;
                    start_short(ep, &config, next_start, seq, &mut conns, &mut report);
                    n_started += 1;
                    next_start = start + iv * (n_started as u32);
                }
            }
            // A burst is opened BURST_CHUNK connects per turn of this loop, so that the
            // scheduled load keeps running between chunks: opening all 512 in one go took this
            // single client thread ~10 ms of handshakes, which showed up as latency of every
            // connection scheduled meanwhile (a client artefact, not the server's). Each burst
            // connection's latency counts from its own connect().
            burst_pending += burst.swap(0, Ordering::SeqCst);
            let chunk = burst_pending.min(BURST_CHUNK);
            burst_pending -= chunk;
            for _ in 0..chunk {
                seq += 1;
                start_short(ep, &config, Instant::now(), seq, &mut conns, &mut report);
            }
        }
        // Long-lived pings, deadlines.
        let mut dead: Vec<(RawFd, Kind, String)> = Vec::new();
        for c in conns.values_mut() {
            if c.long_lived && c.state == State::Idle && c.next_ping <= now && !stopping {
                c.seq += 1;
                c.expect = format!("ping-{}-{}\n", c.fd, c.seq).into_bytes();
                c.got.clear();
                c.scheduled = c.next_ping;
                c.deadline = now + config.timeout;
                c.next_ping += config.ping_interval;
                if let Err(e) = send_all(c.fd, &c.expect) {
                    dead.push((c.fd, classify(&e), format!("ping write: {e}")));
                    continue;
                }
                c.state = State::AwaitingReply;
            }
            if c.state != State::Idle && c.deadline <= now {
                dead.push((c.fd, Kind::Timeout, "timed out".into()));
            }
        }
        for (fd, kind, why) in dead {
            fail(ep, &mut conns, fd, kind, why, &mut report);
        }
        let busy = conns.values().any(|c| c.state != State::Idle);
        if let Some(since) = stopping_since {
            if !busy || now >= since + config.timeout {
                break;
            }
        }

        // Wait: until the next scheduled start, spinning below a millisecond.
        // Chunks of a burst still to open: do not sleep.
        let mut wait_ms = if burst_pending > 0 { 0 } else { 10i32 };
        if !stopping && interval.is_some() {
            let until = next_start.saturating_duration_since(Instant::now());
            wait_ms = wait_ms.min(until.as_millis() as i32);
        }
        // SAFETY: `events` is a live buffer of the given length.
        let n = unsafe { libc::epoll_wait(ep, events.as_mut_ptr(), events.len() as i32, wait_ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            assert_eq!(e.raw_os_error(), Some(libc::EINTR), "epoll_wait: {e}");
            continue;
        }
        let now = Instant::now();
        for ev in &events[..n as usize] {
            let fd = ev.u64 as RawFd;
            let Some(c) = conns.get_mut(&fd) else {
                continue;
            };
            match c.state {
                State::Connecting => {
                    let err = socket_error(fd);
                    if err != 0 {
                        let e = io::Error::from_raw_os_error(err);
                        fail(
                            ep,
                            &mut conns,
                            fd,
                            classify(&e),
                            format!("connect: {e}"),
                            &mut report,
                        );
                        continue;
                    }
                    if c.long_lived {
                        c.state = State::Idle;
                        modify(ep, fd, libc::EPOLLIN as u32);
                        continue;
                    }
                    if let Err(e) = send_all(fd, &c.expect) {
                        fail(
                            ep,
                            &mut conns,
                            fd,
                            classify(&e),
                            format!("write: {e}"),
                            &mut report,
                        );
                        continue;
                    }
                    c.state = State::AwaitingReply;
                    modify(ep, fd, libc::EPOLLIN as u32);
                }
                State::AwaitingReply | State::Idle => {
                    let mut buf = [0u8; 256];
                    // SAFETY: reading into a live stack buffer.
                    let r = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
                    if r < 0 {
                        let e = io::Error::last_os_error();
                        if e.kind() == io::ErrorKind::WouldBlock {
                            continue;
                        }
                        fail(
                            ep,
                            &mut conns,
                            fd,
                            classify(&e),
                            format!("read: {e}"),
                            &mut report,
                        );
                        continue;
                    }
                    if r == 0 {
                        fail(
                            ep,
                            &mut conns,
                            fd,
                            Kind::Eof,
                            "EOF before the reply".into(),
                            &mut report,
                        );
                        continue;
                    }
                    if c.state == State::Idle {
                        fail(
                            ep,
                            &mut conns,
                            fd,
                            Kind::WrongReply,
                            "unsolicited data".into(),
                            &mut report,
                        );
                        continue;
                    }
                    c.got.extend_from_slice(&buf[..r as usize]);
                    if c.got.len() < c.expect.len() {
                        continue;
                    }
                    if c.got != c.expect {
                        let why = format!(
                            "expected {:?}, got {:?}",
                            String::from_utf8_lossy(&c.expect),
                            String::from_utf8_lossy(&c.got)
                        );
                        fail(ep, &mut conns, fd, Kind::WrongReply, why, &mut report);
                        continue;
                    }
                    let latency = now.saturating_duration_since(c.scheduled);
                    if c.long_lived {
                        report.pings_ok += 1;
                        c.state = State::Idle;
                    } else {
                        report.samples.push(Sample {
                            scheduled: c.scheduled,
                            connect_at: c.connect_at,
                            result: Ok(latency),
                        });
                        close(ep, &mut conns, fd);
                    }
                }
            }
        }
    }
    for fd in conns.keys().copied().collect::<Vec<_>>() {
        close(ep, &mut conns, fd);
    }
    // SAFETY: closing our epoll fd.
    unsafe { libc::close(ep) };
    report.stopped = Some(Instant::now());
    report
}

fn start_short(
    ep: RawFd,
    config: &LoadConfig,
    scheduled: Instant,
    seq: u64,
    conns: &mut HashMap<RawFd, Conn>,
    report: &mut LoadReport,
) {
    match open(ep, config, scheduled, seq, false) {
        Ok(c) => {
            conns.insert(c.fd, c);
        }
        Err(e) => {
            let kind = classify(&e);
            report.failures.add(kind);
            report.samples.push(Sample {
                scheduled,
                connect_at: Instant::now(),
                result: Err(kind),
            });
            note(report, format!("connect: {e}"));
        }
    }
}

fn open(
    ep: RawFd,
    config: &LoadConfig,
    scheduled: Instant,
    seq: u64,
    long_lived: bool,
) -> io::Result<Conn> {
    let (domain, addr, len) = sockaddr(config.addr);
    let connect_at = Instant::now();
    // SAFETY: plain syscall.
    let fd = unsafe {
        libc::socket(
            domain,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `addr` holds a valid sockaddr of `len` bytes.
    let r = unsafe { libc::connect(fd, (&addr as *const libc::sockaddr_storage).cast(), len) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINPROGRESS) {
            // SAFETY: closing the socket we just made.
            unsafe { libc::close(fd) };
            return Err(e);
        }
    }
    let mut ev = libc::epoll_event {
        events: libc::EPOLLOUT as u32,
        u64: fd as u64,
    };
    // SAFETY: registering our own fd with our own epoll.
    unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd, &mut ev) };
    let now = Instant::now();
    Ok(Conn {
        fd,
        state: State::Connecting,
        scheduled,
        connect_at,
        deadline: now.max(scheduled) + config.timeout,
        expect: format!("conn-{seq}\n").into_bytes(),
        got: Vec::new(),
        long_lived,
        next_ping: now + config.ping_interval,
        seq: 0,
    })
}

fn fail(
    ep: RawFd,
    conns: &mut HashMap<RawFd, Conn>,
    fd: RawFd,
    kind: Kind,
    why: String,
    report: &mut LoadReport,
) {
    let Some(c) = conns.get(&fd) else { return };
    if c.long_lived {
        report.pings_failed += 1;
        note(report, format!("long-lived: {why}"));
    } else {
        report.failures.add(kind);
        report.samples.push(Sample {
            scheduled: c.scheduled,
            connect_at: c.connect_at,
            result: Err(kind),
        });
        note(report, why);
    }
    close(ep, conns, fd);
}

fn note(report: &mut LoadReport, why: String) {
    if report.first_errors.len() < 10 {
        report.first_errors.push(why);
    }
}

fn close(ep: RawFd, conns: &mut HashMap<RawFd, Conn>, fd: RawFd) {
    conns.remove(&fd);
    // SAFETY: the fd is ours; removing it from epoll then closing it.
    unsafe {
        libc::epoll_ctl(ep, libc::EPOLL_CTL_DEL, fd, std::ptr::null_mut());
        libc::close(fd);
    }
}

fn modify(ep: RawFd, fd: RawFd, events: u32) {
    let mut ev = libc::epoll_event {
        events,
        u64: fd as u64,
    };
    // SAFETY: modifying our own registration.
    unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_MOD, fd, &mut ev) };
}

fn send_all(fd: RawFd, bytes: &[u8]) -> io::Result<()> {
    // Lines are tiny: one send fits the empty socket buffer.
    // SAFETY: sending from a live slice.
    let n = unsafe { libc::send(fd, bytes.as_ptr().cast(), bytes.len(), libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if n as usize != bytes.len() {
        return Err(io::Error::other("short write"));
    }
    Ok(())
}

fn socket_error(fd: RawFd) -> i32 {
    let mut err: libc::c_int = 0;
    let mut len = mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `err` and `len` are live and sized for an int.
    unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            (&mut err as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    err
}

fn classify(e: &io::Error) -> Kind {
    match e.raw_os_error() {
        Some(libc::ECONNREFUSED) => Kind::Refused,
        Some(libc::ECONNRESET) | Some(libc::EPIPE) | Some(libc::ECONNABORTED) => Kind::Reset,
        Some(libc::ETIMEDOUT) => Kind::Timeout,
        _ => Kind::Other,
    }
}

fn sockaddr(addr: SocketAddr) -> (libc::c_int, libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain data; all-zero is valid.
    let mut storage: libc::sockaddr_storage = unsafe { mem::zeroed() };
    match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from(*a.ip()).to_be(),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_in fits in sockaddr_storage.
            unsafe { *(&mut storage as *mut _ as *mut libc::sockaddr_in) = sin };
            (
                libc::AF_INET,
                storage,
                mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: sockaddr_in6 fits in sockaddr_storage.
            unsafe { *(&mut storage as *mut _ as *mut libc::sockaddr_in6) = sin6 };
            (
                libc::AF_INET6,
                storage,
                mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
            )
        }
    }
}

/// Pins the calling thread to one CPU; does nothing if that fails.
pub fn pin_to_cpu(cpu: usize) {
    // SAFETY: cpu_set_t is plain data; CPU_SET writes within it.
    unsafe {
        let mut set: libc::cpu_set_t = mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// Number of CPUs this process may run on.
pub fn cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}
