//! Accept-loop benchmark: ringflip's io_uring multishot accept loop, in its three modes, against
//! the plain accept loop of each mode's runtime (tokio's `TcpListener::accept` on a
//! current-thread runtime, tokio-uring's, and a blocking `std::net::TcpListener`), all on
//! loopback, in one run, under the same conditions.
//!
//! The six loops (`<loop>` in the benchmark ids):
//! - `ringflip`: `Server::run`, blocking, the ring on the server thread;
//! - `ringflip-tokio`: `Server::run_async` on a current-thread tokio runtime, in a `LocalSet`
//!   (the driver's wake set, an epoll of the fds its ring waits on, polled by tokio's reactor);
//! - `ringflip-tokio-uring`: `Server::run_async` inside `tokio_uring::start` (the same, on
//!   tokio-uring's runtime, which has its own ring besides ringflip's);
//! - `tokio`: a `tokio::net::TcpListener::accept` loop on a current-thread runtime;
//! - `tokio-uring`: a `tokio_uring::net::TcpListener::accept` loop in `tokio_uring::start`;
//! - `std`: a blocking `std::net::TcpListener::accept` loop.
//!
//! Run it with `cargo bench --bench accept_latency` (about a minute and a half), or
//! `cargo bench --bench accept_latency -- --test` to run every benchmark once (a few seconds).
//! Run it on an otherwise idle machine: the numbers are wall-clock and CPU times.
//!
//! # Set-up
//! Each loop runs on its own server thread, pinned to CPU 0; the client is the benchmark's main
//! thread, pinned to CPU 1 (pinning is skipped silently with fewer than 2 CPUs or if it fails).
//! All five listeners have the same backlog: ringflip listens with `somaxconn`, the std and tokio
//! listeners are re-`listen()`ed with 4096 (the kernel caps it at `somaxconn`). Each ringflip
//! server (and its runtime, in the async modes) is built on its own server thread (`build()`
//! blocks SIGHUP/SIGTERM/SIGINT in the calling thread).
//!
//! The five servers run the same per-connection code the moment their accept returns: read
//! `Instant::now()` (t1), publish t1 and the raw fd in a preallocated slot array indexed by
//! arrival order, bump an atomic counter (no allocation, no lock, no syscall). In all three
//! ringflip modes that is the connection callback itself (no task is spawned per connection):
//! the `Connection` is split with `into_parts()` and its `DrainGuard` dropped at once. tokio's
//! stream is turned back into a std one with `into_std()` (which deregisters it from the
//! reactor: part of tokio's per-connection cost, counted in its CPU time, not in its latency).
//!
//! **Who closes what.** The server does not close accepted fds: the client thread closes them
//! after each measurement (first its own end, with `SO_LINGER` 0 so that an RST is sent and no
//! side enters TIME_WAIT, then the server's fd). Closing therefore counts neither in the latency
//! nor in the server's CPU time.
//!
//! # Benchmarks
//! - `accept_latency/<loop>`: per connection, from just before the client's `connect()` (t0, on
//!   the client thread) to the moment the server's code holds the accepted fd (t1, on the server
//!   thread). Both are `Instant`s (CLOCK_MONOTONIC, one clock for every CPU), so t1 - t0 needs no
//!   cross-thread clock correction. One connection in flight at a time: the server is idle
//!   (asleep in `io_uring_enter`, `epoll_wait` or `accept`; the async ringflip modes sleep in
//!   their runtime's `epoll_wait` on ringflip's eventfd) when each connection arrives, so this
//!   includes its wake-up. Criterion's "time" is the mean latency per connection.
//! - `server_cpu_per_conn/<loop>`: the server thread's CPU time (user + sys, from
//!   `getrusage(RUSAGE_THREAD)`, read on the server thread itself) per accepted connection, in
//!   the same one-at-a-time pattern, so it includes going to sleep and waking up once per
//!   connection. Criterion's "time" is CPU time per connection (getrusage has 1 µs resolution,
//!   spread over many connections per sample).
//! - `server_cpu_per_conn_batch32/<loop>`: the same CPU time per connection, with the client
//!   connecting 32 at a time, back to back, before waiting for the server: closer to a busy
//!   server, where a wake-up finds several connections queued. An accept loop that takes
//!   several connections per wake-up (multishot accept) pays one sleep/wake for all of them;
//!   one that goes back to `accept()`/`epoll_wait` per connection does not.
//! - `drain_backlog_4000/<loop>`: the server is stopped inside its per-connection code (on a
//!   condvar, after one connection), the client completes 4,000 connections into the kernel's
//!   accept queue, then releases the server. The time is from the moment the server thread runs
//!   again (recorded by the server itself, so the condvar wake-up is not counted) to the moment
//!   its code holds the 4,000th fd. For ringflip the thread is blocked inside the `run` (or
//!   `run_async`) callback; its ring is `DEFER_TASKRUN`, so the connections stay in the backlog
//!   until it enters the ring again. In the async modes the callback runs synchronously inside
//!   the driver's turn, on the runtime's only thread: blocking it blocks the whole runtime, which
//!   is exactly the pause wanted. For tokio and std, "blocked in the per-connection code" is "not
//!   calling accept".
//!
//! - `accept_latency_ratio` (not a criterion group; printed on stdout, checked): the accept
//!   latency of one connection at a time, as in `accept_latency`, in rounds that take every
//!   loop in turn (the order rotating), `RATIO_SAMPLES` connections per loop in all (300 with
//!   `--test`); per loop the median and p99, and each ringflip mode's ratio to its plain
//!   counterpart (`ringflip` to `std`, `ringflip-tokio` to `tokio`, `ringflip-tokio-uring` to
//!   `tokio-uring`). **The benchmark fails** (exits non-zero) when a median ratio exceeds
//!   `MAX_MEDIAN_RATIO` (3×): a ringflip mode that waits for a late wake-up (an eventfd whose
//!   signal the kernel defers by an RCU grace period measured 15–400× here) is caught on any
//!   machine that defers it, while 3× leaves room for a noisy VM. `.ci/run` runs it.
//! - `server_cpu_interleaved` (not a criterion group; printed on stdout at the end): the same
//!   two CPU-per-connection figures, measured in 60 short rounds that take every loop in turn
//!   (the order rotating), with each loop's ratio to tokio and to std taken *within* a round:
//!   median over the rounds and quartiles. On a VM whose speed drifts over seconds, the ratio of
//!   two criterion figures measured a minute apart carries the drift. 2 rounds with `--test`;
//!   `RINGFLIP_CPU_ROUNDS=N` sets the count; a benchmark filter that the name does not contain
//!   skips it.
//!
//! Also printed once per ringflip mode, on stderr, when a benchmark of that mode first runs: the
//! heap allocations per accepted connection on that mode's server thread in steady state (a
//! counting global allocator, with a thread-local flag set on ringflip's server threads only and
//! a per-thread count; 1,000 connections after 1,000 warm-up connections). In the async modes
//! the flag is set before the runtime is built, so the runtime's set-up shows in the "before"
//! figure, and anything the runtime allocates per wake-up counts per connection.
//!
//! Every wait is bounded (10 s): a stuck loop panics with a message instead of hanging; every
//! server is stopped at the end (ringflip's with `Handle::shutdown`), its thread joined within
//! 10 s.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::net::{Ipv4Addr, SocketAddr, TcpListener as StdListener};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicU8, Ordering::*};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use criterion::{Criterion, SamplingMode};

/// Every wait in this benchmark gives up (with a panic naming what it waited for) after this.
const TIMEOUT: Duration = Duration::from_secs(10);
/// Connections queued in the backlog for the drain benchmark.
const DRAIN_N: usize = 4_000;
/// Backlog asked for on the std and tokio listeners (ringflip asks for `somaxconn`).
const BACKLOG: i32 = 4096;
/// Arrival slots: more than the connections ever outstanding at once (DRAIN_N + 1).
const SLOTS: usize = 8192;
/// Connections per client batch in `server_cpu_per_conn_batched`.
const BATCH: u64 = 32;
/// Connections in the allocation count (after as many warm-up connections).
const ALLOC_BATCH: u64 = 1_000;
const SERVER_CPU: usize = 0;
const CLIENT_CPU: usize = 1;

// ---------------------------------------------------------------------------------------------
// Counting allocator: counts allocations made on threads that set `COUNT_ALLOCS` (only
// ringflip's server threads do), each thread in its own counter: the ringflip servers run side by
// side (the idle ones asleep), and one's count must not include another's.

struct CountingAlloc;

thread_local! {
    // const-initialised, no destructor: using them never allocates, even inside the allocator.
    static COUNT_ALLOCS: Cell<bool> = const { Cell::new(false) };
    /// Allocations made by this thread while `COUNT_ALLOCS` was set.
    static THREAD_ALLOCS: Cell<u64> = const { Cell::new(0) };
}

#[inline]
fn note_alloc() {
    if COUNT_ALLOCS.try_with(Cell::get).unwrap_or(false) {
        let _ = THREAD_ALLOCS.try_with(|n| n.set(n.get() + 1));
    }
}

// SAFETY: every method forwards to `System` unchanged; counting has no effect on the memory.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note_alloc();
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note_alloc();
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note_alloc();
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

// ---------------------------------------------------------------------------------------------
// Small OS helpers.

/// CPUs available to this process, read once before any thread is pinned.
fn cpu_count() -> usize {
    static CPUS: OnceLock<usize> = OnceLock::new();
    *CPUS.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Pins the calling thread to `cpu`; silently does nothing with fewer than 2 CPUs or on error.
fn pin_to(cpu: usize) {
    if cpu_count() < 2 {
        return;
    }
    // SAFETY: cpu_set_t is plain data (all-zero is the empty set); CPU_SET writes inside it;
    // sched_setaffinity(0, ..) only reads the set and affects the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        let _ = libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// User + system CPU time of the calling thread, in nanoseconds (1 µs resolution).
fn thread_cpu_ns() -> u64 {
    // SAFETY: rusage is plain data; getrusage fills it.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        let rc = libc::getrusage(libc::RUSAGE_THREAD, &mut ru);
        assert_eq!(rc, 0, "getrusage(RUSAGE_THREAD)");
        ru
    };
    let tv = |t: libc::timeval| t.tv_sec as u64 * 1_000_000_000 + t.tv_usec as u64 * 1_000;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Raises a listening socket's backlog (a second `listen()` only changes the backlog).
fn raise_backlog(fd: RawFd) {
    // SAFETY: listen on a valid socket fd has no memory effects.
    let rc = unsafe { libc::listen(fd, BACKLOG) };
    assert_eq!(
        rc,
        0,
        "listen({BACKLOG}): {}",
        std::io::Error::last_os_error()
    );
}

fn close_fd(fd: RawFd) {
    // SAFETY: `fd` was published by a server loop, which gave up its ownership; it is closed
    // exactly once, here.
    drop(unsafe { OwnedFd::from_raw_fd(fd) });
}

fn somaxconn() -> Option<u32> {
    std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()?
        .trim()
        .parse()
        .ok()
}

// ---------------------------------------------------------------------------------------------
// State shared by one server loop and the client.

const CMD_NONE: u8 = 0;
/// After the next connection: record the server thread's CPU time and allocation count.
const CMD_MARK: u8 = 1;
/// After the next connection: block until released (the drain benchmark).
const CMD_PAUSE: u8 = 2;
/// After the next connection: leave the accept loop (std and tokio; ringflip uses its Handle).
const CMD_STOP: u8 = 3;

struct Shared {
    name: &'static str,
    /// The zero of every timestamp below (t0 and t1 are nanoseconds since `base`).
    base: Instant,
    /// Connections handled by the server so far (written by the server thread only).
    handled: AtomicU64,
    /// Per arrival, indexed by arrival number % SLOTS: when the server's code got the fd...
    arrival_ns: Box<[AtomicU64]>,
    /// ...and the fd, for the client to close.
    fds: Box<[AtomicI32]>,
    /// A `CMD_*` the server carries out after its next connection. The client stores it
    /// before its connect(); the server loads it after its accept() returned that connection
    /// (the kernel's socket locks between the two order them in practice).
    command: AtomicU8,
    mark_seq: AtomicU64,
    mark_cpu_ns: AtomicU64,
    mark_allocs: AtomicU64,
    paused: AtomicBool,
    released: Mutex<bool>,
    release_cv: Condvar,
    resumed_ns: AtomicU64,
}

impl Shared {
    fn new(name: &'static str) -> Shared {
        Shared {
            name,
            base: Instant::now(),
            handled: AtomicU64::new(0),
            arrival_ns: (0..SLOTS).map(|_| AtomicU64::new(0)).collect(),
            fds: (0..SLOTS).map(|_| AtomicI32::new(-1)).collect(),
            command: AtomicU8::new(CMD_NONE),
            mark_seq: AtomicU64::new(0),
            mark_cpu_ns: AtomicU64::new(0),
            mark_allocs: AtomicU64::new(0),
            paused: AtomicBool::new(false),
            released: Mutex::new(false),
            release_cv: Condvar::new(),
            resumed_ns: AtomicU64::new(0),
        }
    }

    fn nanos(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.base).as_nanos() as u64
    }

    /// The server side, once per connection: `t1` is when the loop's code got `fd`. No
    /// allocation, lock or syscall unless a command is pending. Returns false to stop the loop.
    #[inline]
    fn on_accept(&self, fd: RawFd, t1: Instant) -> bool {
        let seq = self.handled.load(Relaxed);
        let slot = seq as usize % SLOTS;
        self.arrival_ns[slot].store(self.nanos(t1), Relaxed);
        self.fds[slot].store(fd, Relaxed);
        self.handled.store(seq + 1, Release);
        if self.command.load(Acquire) == CMD_NONE {
            true
        } else {
            self.on_command()
        }
    }

    #[cold]
    #[inline(never)]
    fn on_command(&self) -> bool {
        match self.command.swap(CMD_NONE, AcqRel) {
            CMD_MARK => {
                self.mark_cpu_ns.store(thread_cpu_ns(), Relaxed);
                // On the server thread: its own count.
                self.mark_allocs
                    .store(THREAD_ALLOCS.with(Cell::get), Relaxed);
                self.mark_seq.fetch_add(1, Release);
                true
            }
            CMD_PAUSE => {
                let mut released = self.released.lock().unwrap();
                self.paused.store(true, Release);
                // Longer than the client's own timeouts, so the client reports the failure.
                let deadline = Instant::now() + 3 * TIMEOUT;
                while !*released {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        eprintln!("{}: server paused for too long; resuming", self.name);
                        break;
                    }
                    released = self.release_cv.wait_timeout(released, left).unwrap().0;
                }
                *released = false;
                drop(released);
                // The drain is timed from here: the condvar wake-up is not counted.
                self.resumed_ns.store(self.nanos(Instant::now()), Relaxed);
                self.paused.store(false, Release);
                true
            }
            CMD_STOP => false,
            _ => true,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The server loops.

#[derive(Clone, Copy, Debug)]
enum Kind {
    /// `Server::run` (blocking).
    Ringflip,
    /// `Server::run_async` on a current-thread tokio runtime, in a `LocalSet`.
    RingflipTokio,
    /// `Server::run_async` inside `tokio_uring::start`.
    RingflipTokioUring,
    Tokio,
    /// `tokio_uring::net::TcpListener::accept` inside `tokio_uring::start`.
    TokioUring,
    Std,
}

/// In the order the benchmarks run (and `servers` is indexed by `Kind as usize`).
const KINDS: [Kind; 6] = [
    Kind::Ringflip,
    Kind::RingflipTokio,
    Kind::RingflipTokioUring,
    Kind::Tokio,
    Kind::TokioUring,
    Kind::Std,
];

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Ringflip => "ringflip",
            Kind::RingflipTokio => "ringflip-tokio",
            Kind::RingflipTokioUring => "ringflip-tokio-uring",
            Kind::Tokio => "tokio",
            Kind::TokioUring => "tokio-uring",
            Kind::Std => "std",
        }
    }

    /// The plain loop of the same runtime, which a ringflip mode is measured against.
    fn counterpart(self) -> Option<Kind> {
        match self {
            Kind::Ringflip => Some(Kind::Std),
            Kind::RingflipTokio => Some(Kind::Tokio),
            Kind::RingflipTokioUring => Some(Kind::TokioUring),
            Kind::Tokio | Kind::TokioUring | Kind::Std => None,
        }
    }

    /// One of ringflip's modes: stopped with its `Handle`, allocations reported.
    fn is_ringflip(self) -> bool {
        matches!(
            self,
            Kind::Ringflip | Kind::RingflipTokio | Kind::RingflipTokioUring
        )
    }
}

struct Running {
    kind: Kind,
    shared: Arc<Shared>,
    addr: SocketAddr,
    ringflip: Option<ringflip::Handle>,
    thread: JoinHandle<()>,
    /// Disconnected when the server thread ends (its sender is dropped), however it ends.
    done: mpsc::Receiver<()>,
}

type Started = Result<(SocketAddr, Option<ringflip::Handle>), String>;

fn start(kind: Kind) -> Running {
    let shared = Arc::new(Shared::new(kind.name()));
    let (ready_tx, ready_rx) = mpsc::channel::<Started>();
    let (done_tx, done) = mpsc::channel::<()>();
    let s = shared.clone();
    let thread = std::thread::Builder::new()
        .name(format!("{}-server", kind.name()))
        .spawn(move || {
            let _done = done_tx;
            pin_to(SERVER_CPU);
            match kind {
                Kind::Ringflip | Kind::RingflipTokio | Kind::RingflipTokioUring => {
                    ringflip_loop(kind, &s, ready_tx)
                }
                Kind::Tokio => tokio_loop(&s, ready_tx),
                Kind::TokioUring => tokio_uring_loop(&s, ready_tx),
                Kind::Std => std_loop(&s, ready_tx),
            }
        })
        .expect("spawning a server thread");
    let (addr, ringflip) = match ready_rx.recv_timeout(TIMEOUT) {
        Ok(Ok(started)) => started,
        Ok(Err(e)) => panic!("{}: server failed to start: {e}", kind.name()),
        Err(e) => panic!(
            "{}: server did not start within {TIMEOUT:?}: {e}",
            kind.name()
        ),
    };
    Running {
        kind,
        shared,
        addr,
        ringflip,
        thread,
        done,
    }
}

/// ringflip in one of its three modes; the per-connection code is the same in all three.
fn ringflip_loop(kind: Kind, s: &Shared, ready: mpsc::Sender<Started>) {
    // build() blocks SIGHUP/SIGTERM/SIGINT in the calling thread: this thread (built before any
    // runtime, so a thread a runtime might start inherits the mask).
    let server = match ringflip::Server::builder()
        .listen_tcp("bench", (Ipv4Addr::LOCALHOST, 0).into())
        .drain_timeout(TIMEOUT)
        .build()
    {
        Ok(server) => server,
        Err(e) => return drop(ready.send(Err(e.to_string()))),
    };
    let addr = server
        .local_addr("bench")
        .expect("the listener named \"bench\"");
    let started: Started = Ok((addr, Some(server.handle())));
    // In the async modes this runs inside the driver's turn, on the runtime's thread: a pause
    // (CMD_PAUSE) blocks the whole runtime, and with it the ring, as in the blocking mode.
    let on_connection = |conn: ringflip::Connection| {
        let t1 = Instant::now();
        let (fd, guard) = conn.into_parts();
        drop(guard);
        s.on_accept(fd.into_raw_fd(), t1);
    };
    // Counted from here: the runtimes' set-up is in the "before" count, not per connection.
    COUNT_ALLOCS.with(|c| c.set(true));
    let result = match kind {
        Kind::RingflipTokio => {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    COUNT_ALLOCS.with(|c| c.set(false));
                    return drop(ready.send(Err(e.to_string())));
                }
            };
            tokio::task::LocalSet::new().block_on(&rt, async move {
                // Ready once inside the runtime (a runtime that fails to start reports it).
                let _ = ready.send(started);
                server.run_async(on_connection).await
            })
        }
        // tokio_uring::start panics if it cannot make its ring: the thread then ends before
        // `ready` is sent, and the client reports it.
        Kind::RingflipTokioUring => tokio_uring::start(async move {
            let _ = ready.send(started);
            server.run_async(on_connection).await
        }),
        Kind::Ringflip => {
            let _ = ready.send(started);
            server.run(on_connection)
        }
        Kind::Tokio | Kind::TokioUring | Kind::Std => {
            unreachable!("{} is not a ringflip mode", kind.name())
        }
    };
    COUNT_ALLOCS.with(|c| c.set(false));
    if let Err(e) = result {
        eprintln!("{}: server failed: {e}", kind.name());
    }
}

fn tokio_loop(s: &Shared, ready: mpsc::Sender<Started>) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return drop(ready.send(Err(e.to_string()))),
    };
    rt.block_on(async {
        let listener = match tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await {
            Ok(l) => l,
            Err(e) => return drop(ready.send(Err(e.to_string()))),
        };
        raise_backlog(listener.as_raw_fd()); // tokio binds with 1024
        let _ = ready.send(Ok((listener.local_addr().unwrap(), None)));
        loop {
            match listener.accept().await {
                Ok((stream, _peer)) => {
                    let t1 = Instant::now();
                    let fd = stream.into_std().expect("into_std").into_raw_fd();
                    if !s.on_accept(fd, t1) {
                        return;
                    }
                }
                Err(e) => {
                    eprintln!("tokio: accept failed: {e}");
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
    });
}

/// tokio-uring's own accept loop (one `IORING_OP_ACCEPT` per connection on its ring). The
/// stream is forgotten, not dropped: the client closes the fd (as for every loop), and dropping
/// it would close it a second time.
fn tokio_uring_loop(s: &Shared, ready: mpsc::Sender<Started>) {
    // tokio_uring::start panics if it cannot make its ring: the thread then ends before
    // `ready` is sent, and the client reports it.
    tokio_uring::start(async {
        let listener = match tokio_uring::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0).into()) {
            Ok(l) => l,
            Err(e) => return drop(ready.send(Err(e.to_string()))),
        };
        raise_backlog(listener.as_raw_fd());
        let _ = ready.send(Ok((listener.local_addr().unwrap(), None)));
        loop {
            match listener.accept().await {
                Ok((stream, _peer)) => {
                    let t1 = Instant::now();
                    let fd = stream.as_raw_fd();
                    std::mem::forget(stream);
                    if !s.on_accept(fd, t1) {
                        return;
                    }
                }
                Err(e) => {
                    eprintln!("tokio-uring: accept failed: {e}");
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
    });
}

fn std_loop(s: &Shared, ready: mpsc::Sender<Started>) {
    let listener = match StdListener::bind((Ipv4Addr::LOCALHOST, 0)) {
        Ok(l) => l,
        Err(e) => return drop(ready.send(Err(e.to_string()))),
    };
    raise_backlog(listener.as_raw_fd()); // std binds with 128
    let _ = ready.send(Ok((listener.local_addr().unwrap(), None)));
    loop {
        match listener.accept() {
            Ok((stream, _peer)) => {
                let t1 = Instant::now();
                if !s.on_accept(stream.into_raw_fd(), t1) {
                    return;
                }
            }
            Err(e) => {
                eprintln!("std: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The client (the benchmark's main thread).

struct Harness {
    server: Running,
    sockaddr: libc::sockaddr_in,
    /// Arrival number of the next connection the server will handle.
    next: u64,
    /// Client ends held during a drain (allocated once).
    held: Vec<OwnedFd>,
}

impl Harness {
    fn start(kind: Kind) -> Harness {
        let server = start(kind);
        let SocketAddr::V4(v4) = server.addr else {
            panic!(
                "{}: expected an IPv4 listener, got {}",
                kind.name(),
                server.addr
            )
        };
        // SAFETY: sockaddr_in is plain data; all-zero is valid.
        let mut sockaddr: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        sockaddr.sin_family = libc::AF_INET as libc::sa_family_t;
        sockaddr.sin_port = v4.port().to_be();
        sockaddr.sin_addr.s_addr = u32::from(*v4.ip()).to_be();
        let mut h = Harness {
            next: server.shared.handled.load(Acquire),
            server,
            sockaddr,
            held: Vec::with_capacity(DRAIN_N),
        };
        if kind.is_ringflip() {
            h.report_allocations();
        }
        h
    }

    fn name(&self) -> &'static str {
        self.server.kind.name()
    }

    /// Spins (then yields) until `done`, for at most TIMEOUT.
    fn wait(&self, what: impl Fn() -> String, done: impl Fn() -> bool) {
        let start = Instant::now();
        let mut spins = 0u32;
        while !done() {
            spins = spins.wrapping_add(1);
            if spins < 4096 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
                if spins % 64 == 0 && start.elapsed() > TIMEOUT {
                    panic!(
                        "{}: timed out after {TIMEOUT:?} waiting for {}",
                        self.name(),
                        what()
                    );
                }
            }
        }
    }

    fn wait_handled(&self, n: u64) {
        let shared = &self.server.shared;
        self.wait(
            || {
                format!(
                    "the server to accept connection #{n} (it has accepted {})",
                    shared.handled.load(Acquire)
                )
            },
            || shared.handled.load(Acquire) >= n,
        );
    }

    /// A new client socket (RST on close, bounded connect) and t0, read just before connect().
    fn connect(&self) -> (OwnedFd, Instant) {
        // SAFETY: plain socket calls on an fd this function owns; option values are plain data
        // that outlive the calls; the address is a valid sockaddr_in of the given length.
        unsafe {
            let raw = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
            assert!(raw >= 0, "socket(): {}", std::io::Error::last_os_error());
            let fd = OwnedFd::from_raw_fd(raw);
            let linger = libc::linger {
                l_onoff: 1,
                l_linger: 0,
            };
            libc::setsockopt(
                raw,
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&linger as *const libc::linger).cast(),
                std::mem::size_of::<libc::linger>() as libc::socklen_t,
            );
            // A blocking connect() gives up after SO_SNDTIMEO (a full backlog would otherwise
            // make it retry SYNs for minutes).
            let timeout = libc::timeval {
                tv_sec: TIMEOUT.as_secs() as libc::time_t,
                tv_usec: 0,
            };
            libc::setsockopt(
                raw,
                libc::SOL_SOCKET,
                libc::SO_SNDTIMEO,
                (&timeout as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            );
            let t0 = Instant::now();
            let rc = libc::connect(
                raw,
                (&self.sockaddr as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            );
            if rc != 0 {
                panic!(
                    "{}: connect() to {} failed: {} (EINPROGRESS here means it timed out: is \
                     the backlog full? somaxconn = {:?})",
                    self.name(),
                    self.server.addr,
                    std::io::Error::last_os_error(),
                    somaxconn()
                );
            }
            (fd, t0)
        }
    }

    /// Closes the server's end of connection `seq` (the client's end must be closed first).
    fn close_server_end(&self, seq: u64) {
        let fd = self.server.shared.fds[seq as usize % SLOTS].swap(-1, Relaxed);
        assert!(fd >= 0, "{}: no fd published for #{seq}", self.name());
        close_fd(fd);
    }

    /// One connection, alone in flight: its accept latency (t1 - t0). Both ends are closed
    /// afterwards, outside the interval.
    fn one(&mut self) -> Duration {
        let seq = self.next;
        let (client, t0) = self.connect();
        self.wait_handled(seq + 1);
        self.next += 1;
        let shared = &self.server.shared;
        let t1_ns = shared.arrival_ns[seq as usize % SLOTS].load(Relaxed);
        drop(client); // RST: no TIME_WAIT, so 100k+ connections do not exhaust ports
        self.close_server_end(seq);
        Duration::from_nanos(t1_ns.saturating_sub(shared.nanos(t0)))
    }

    /// One connection after which the server records its CPU time and allocation count:
    /// returns (cpu ns, allocations) as of the end of that connection's handling.
    fn mark(&mut self) -> (u64, u64) {
        let shared = self.server.shared.clone();
        let before = shared.mark_seq.load(Acquire);
        shared.command.store(CMD_MARK, Release);
        self.one();
        self.wait(
            || "the server to record its CPU time".into(),
            || shared.mark_seq.load(Acquire) > before,
        );
        (
            shared.mark_cpu_ns.load(Relaxed),
            shared.mark_allocs.load(Relaxed),
        )
    }

    fn latency(&mut self, iters: u64) -> Duration {
        (0..iters).map(|_| self.one()).sum()
    }

    /// Server CPU time for `iters` connections (handled between two marks).
    fn cpu(&mut self, iters: u64) -> Duration {
        let (before, _) = self.mark();
        for _ in 1..iters {
            self.one();
        }
        let (after, _) = self.mark(); // the last of the `iters` connections
        Duration::from_nanos(after.saturating_sub(before))
    }

    /// Server CPU time for `iters` connections, the client connecting them `BATCH` at a time
    /// (each `connect()` returns once the handshake is done, so the connections of a batch
    /// reach the server as fast as one client thread can make them).
    fn cpu_batched(&mut self, iters: u64) -> Duration {
        let (before, _) = self.mark();
        let mut left = iters.saturating_sub(1);
        while left > 0 {
            let n = left.min(BATCH);
            self.batch(n);
            left -= n;
        }
        let (after, _) = self.mark(); // the last of the `iters` connections
        Duration::from_nanos(after.saturating_sub(before))
    }

    /// `n` connections back to back, then wait until the server holds them all; both ends are
    /// closed afterwards.
    fn batch(&mut self, n: u64) {
        let first = self.next;
        for _ in 0..n {
            let (client, _) = self.connect();
            self.held.push(client);
        }
        self.wait_handled(first + n);
        self.next += n;
        let mut held = std::mem::take(&mut self.held);
        for (seq, client) in (first..).zip(held.drain(..)) {
            drop(client); // RST first, as in `one`
            self.close_server_end(seq);
        }
        self.held = held;
    }

    /// One drain of DRAIN_N queued connections; see the crate docs.
    fn drain_once(&mut self) -> Duration {
        let shared = self.server.shared.clone();
        // Connection #first is accepted, then the server blocks.
        let first = self.next;
        shared.command.store(CMD_PAUSE, Release);
        let (client, _) = self.connect();
        self.wait_handled(first + 1);
        self.wait(
            || "the server to pause".into(),
            || shared.paused.load(Acquire),
        );
        self.held.push(client);
        // These complete in the kernel's accept queue.
        for _ in 0..DRAIN_N {
            let (client, _) = self.connect();
            self.held.push(client);
        }
        *shared.released.lock().unwrap() = true;
        shared.release_cv.notify_one();
        let last = first + DRAIN_N as u64;
        self.wait_handled(last + 1);
        self.next = last + 1;
        let done_ns = shared.arrival_ns[last as usize % SLOTS].load(Relaxed);
        let resumed_ns = shared.resumed_ns.load(Relaxed);
        self.held.clear(); // RSTs
        for seq in first..=last {
            self.close_server_end(seq);
        }
        Duration::from_nanos(done_ns.saturating_sub(resumed_ns))
    }

    fn drain(&mut self, iters: u64) -> Duration {
        (0..iters).map(|_| self.drain_once()).sum()
    }

    fn report_allocations(&mut self) {
        for _ in 0..ALLOC_BATCH {
            self.one(); // warm-up: let every buffer reach its steady size
        }
        let (_, before) = self.mark();
        for _ in 1..ALLOC_BATCH {
            self.one();
        }
        let (_, after) = self.mark();
        // `before` is non-zero (the driver's set-up allocates on that thread): the counter works.
        eprintln!(
            "{}: heap allocations per accepted connection (server thread): {:.2} \
             ({} in {ALLOC_BATCH} connections; {before} on that thread before them)",
            self.name(),
            (after - before) as f64 / ALLOC_BATCH as f64,
            after - before,
        );
    }

    fn stop(mut self) {
        let name = self.name();
        match self.server.ringflip.take() {
            Some(handle) => handle.shutdown(),
            None => {
                self.server.shared.command.store(CMD_STOP, Release);
                self.one();
            }
        }
        match self.server.done.recv_timeout(TIMEOUT) {
            Err(RecvTimeoutError::Timeout) => {
                panic!("{name}: server thread did not stop within {TIMEOUT:?}")
            }
            _ => {
                if self.server.thread.join().is_err() {
                    panic!("{name}: server thread panicked");
                }
            }
        }
    }
}

fn harness(servers: &mut [Option<Harness>; KINDS.len()], kind: Kind) -> &mut Harness {
    servers[kind as usize].get_or_insert_with(|| Harness::start(kind))
}

fn main() {
    cpu_count(); // before pinning: it reads this thread's affinity
    pin_to(CLIENT_CPU);
    if somaxconn().is_some_and(|n| (n as usize) <= DRAIN_N) {
        eprintln!(
            "warning: net.core.somaxconn = {:?} < {}: drain_backlog_4000 will fail",
            somaxconn(),
            DRAIN_N + 1
        );
    }

    let mut c = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    // Servers start when a benchmark first needs them and run until the end, so a filtered run
    // starts only what it measures. Idle servers sleep in the kernel.
    let mut servers: [Option<Harness>; KINDS.len()] = std::array::from_fn(|_| None);

    {
        let mut group = c.benchmark_group("accept_latency");
        for kind in KINDS {
            group.bench_function(kind.name(), |b| {
                let h = harness(&mut servers, kind);
                b.iter_custom(|iters| h.latency(iters));
            });
        }
        group.finish();
    }
    {
        let mut group = c.benchmark_group("server_cpu_per_conn");
        for kind in KINDS {
            group.bench_function(kind.name(), |b| {
                let h = harness(&mut servers, kind);
                b.iter_custom(|iters| h.cpu(iters));
            });
        }
        group.finish();
    }
    {
        let mut group = c.benchmark_group(format!("server_cpu_per_conn_batch{BATCH}"));
        for kind in KINDS {
            group.bench_function(kind.name(), |b| {
                let h = harness(&mut servers, kind);
                b.iter_custom(|iters| h.cpu_batched(iters));
            });
        }
        group.finish();
    }
    {
        // ~0.1-0.2 s of wall time per iteration (mostly the 4,000 connects, not measured):
        // few, flat samples.
        let mut group = c.benchmark_group(format!("drain_backlog_{DRAIN_N}"));
        group
            .sample_size(10)
            .sampling_mode(SamplingMode::Flat)
            .warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(2));
        for kind in KINDS {
            group.bench_function(kind.name(), |b| {
                let h = harness(&mut servers, kind);
                b.iter_custom(|iters| h.drain(iters));
            });
        }
        group.finish();
    }

    let ratio_rounds = rounds_for(
        "accept_latency_ratio",
        RATIO_SAMPLES / RATIO_ROUND,
        RATIO_SAMPLES_TEST / RATIO_ROUND,
    );
    let ratio_failures = match ratio_rounds {
        Some(rounds) => latency_ratios(&mut servers, rounds),
        None => Vec::new(),
    };
    if let Some(rounds) = rounds_for("server_cpu_interleaved", ROUNDS, 2) {
        interleaved_cpu(&mut servers, rounds);
    }

    for h in servers.into_iter().flatten() {
        h.stop();
    }
    c.final_summary();
    if !ratio_failures.is_empty() {
        eprintln!("accept_latency_ratio FAILED:");
        for failure in &ratio_failures {
            eprintln!("  {failure}");
        }
        std::process::exit(1);
    }
}

// ---------------------------------------------------------------------------------------------
// Latency ratios, checked.

/// Connections per loop in `accept_latency_ratio` in a full run...
const RATIO_SAMPLES: usize = 2_000;
/// ...taken this many per loop and round.
const RATIO_ROUND: usize = 50;
/// ...and in test mode (`--test`).
const RATIO_SAMPLES_TEST: usize = 300;
/// The largest median accept latency a ringflip mode may have, as a multiple of its plain
/// counterpart's in the same run, before the benchmark fails.
const MAX_MEDIAN_RATIO: f64 = 3.0;

/// Per loop, the latency of one connection at a time (as `accept_latency`), in rounds that take
/// the loops in turn, the order rotating; prints medians, p99 and each ringflip mode's ratios
/// to its counterpart. Returns the ratios over `MAX_MEDIAN_RATIO`, described.
fn latency_ratios(servers: &mut [Option<Harness>; KINDS.len()], rounds: usize) -> Vec<String> {
    for kind in KINDS {
        harness(servers, kind);
    }
    let mut us: Vec<Vec<f64>> = vec![Vec::with_capacity(rounds * RATIO_ROUND); KINDS.len()];
    for round in 0..rounds {
        for k in 0..KINDS.len() {
            let kind = KINDS[(k + round) % KINDS.len()];
            let h = harness(servers, kind);
            for _ in 0..RATIO_ROUND {
                us[kind as usize].push(h.one().as_nanos() as f64 / 1e3);
            }
        }
    }
    println!(
        "accept_latency_ratio: {} connections per loop, one at a time, in {rounds} rounds that \
         take every loop in turn (rotating order); accept latency median and p99",
        rounds * RATIO_ROUND
    );
    let mut failures = Vec::new();
    for kind in KINDS {
        let mine = &us[kind as usize];
        let (median, p99) = (quantile(mine, 0.5), quantile(mine, 0.99));
        let vs = match kind.counterpart() {
            Some(other) => {
                let theirs = &us[other as usize];
                let (m_ratio, p_ratio) =
                    (median / quantile(theirs, 0.5), p99 / quantile(theirs, 0.99));
                if m_ratio.is_nan() || m_ratio > MAX_MEDIAN_RATIO {
                    failures.push(format!(
                        "{}: median accept latency {median:.1} µs is {m_ratio:.2}x {}'s \
                         (at most {MAX_MEDIAN_RATIO}x allowed)",
                        kind.name(),
                        other.name()
                    ));
                }
                format!(
                    "   to {:<12} median {m_ratio:.2}x   p99 {p_ratio:.2}x",
                    other.name()
                )
            }
            None => String::new(),
        };
        println!(
            "    {:<22} median {median:>8.1} µs   p99 {p99:>8.1} µs{vs}",
            kind.name()
        );
    }
    failures
}

// ---------------------------------------------------------------------------------------------
// Interleaved CPU ratios.

/// Connections per loop and round in `server_cpu_interleaved` (one at a time, then as many in
/// batches of `BATCH`).
const ROUND_CONNS: u64 = 192;
/// Rounds of `server_cpu_interleaved` in a full run (`RINGFLIP_CPU_ROUNDS` overrides it).
const ROUNDS: usize = 60;

/// How many rounds the section `name` (`server_cpu_interleaved`, `accept_latency_ratio`) runs:
/// `test` in criterion's test mode (`--test`, or no `--bench`, as under `cargo test
/// --benches`), else `full` (`RINGFLIP_CPU_ROUNDS` overrides it for `server_cpu_interleaved`);
/// none with `--list` or `--ignored`, or when a benchmark filter is given that is neither part
/// of `name` nor mentions its last word (criterion's filters are regexes; this is the
/// plain-text subset).
fn rounds_for(name: &str, full: usize, test: usize) -> Option<usize> {
    // Criterion's options that take a value: their value is not a filter.
    const WITH_VALUE: &[&str] = &[
        "-s",
        "-b",
        "-c",
        "--save-baseline",
        "--baseline",
        "--baseline-lenient",
        "--load-baseline",
        "--measurement-time",
        "--warm-up-time",
        "--sample-size",
        "--nresamples",
        "--noise-threshold",
        "--confidence-level",
        "--significance-level",
        "--profile-time",
        "--output-format",
        "--plotting-backend",
        "--color",
        "--format",
    ];
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut filter = None;
    let mut i = 0;
    while i < args.len() {
        let a = &args[i];
        if WITH_VALUE.contains(&a.as_str()) {
            i += 1;
        } else if !a.starts_with('-') && filter.is_none() {
            filter = Some(a.clone());
        }
        i += 1;
    }
    let has = |flag: &str| args.iter().any(|a| a == flag);
    if has("--list") || has("--ignored") {
        return None;
    }
    let last_word = name.rsplit('_').next().unwrap_or(name);
    if filter.is_some_and(|f| !name.contains(f.as_str()) && !f.contains(last_word)) {
        return None;
    }
    if has("--test") || !has("--bench") {
        return Some(test);
    }
    let rounds = match name {
        "server_cpu_interleaved" => std::env::var("RINGFLIP_CPU_ROUNDS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(full),
        _ => full,
    };
    Some(rounds.max(1))
}

/// `q` (0..=1) of `v` (not empty, need not be sorted): the element at rank `round(q·(n−1))`
/// of the sorted values (for an even count the median is the upper of the middle two).
fn quantile(v: &[f64], q: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * q).round() as usize]
}

/// Server CPU per connection of every loop, measured in short rounds that take the loops in
/// turn (the order rotating from round to round), and each loop's ratio to tokio's and std's
/// *within each round*: on a VM whose speed drifts over seconds (steal, the host's other
/// guests), a ratio of two figures taken a minute apart measures the drift as much as the
/// loops. Printed on stdout as the median over the rounds with the quartiles.
fn interleaved_cpu(servers: &mut [Option<Harness>; KINDS.len()], rounds: usize) {
    for kind in KINDS {
        harness(servers, kind);
    }
    // [pattern][kind][round]: CPU ns per connection.
    let mut per_conn = vec![vec![Vec::with_capacity(rounds); KINDS.len()]; 2];
    for round in 0..rounds {
        for k in 0..KINDS.len() {
            let kind = KINDS[(k + round) % KINDS.len()];
            let h = harness(servers, kind);
            let one = h.cpu(ROUND_CONNS);
            let batched = h.cpu_batched(ROUND_CONNS);
            per_conn[0][kind as usize].push(one.as_nanos() as f64 / ROUND_CONNS as f64);
            per_conn[1][kind as usize].push(batched.as_nanos() as f64 / ROUND_CONNS as f64);
        }
    }
    println!(
        "server_cpu_interleaved: {rounds} rounds; in each, every loop in turn (rotating order) \
         takes {ROUND_CONNS} connections one at a time, then {ROUND_CONNS} in batches of \
         {BATCH}; server CPU per connection, median over the rounds [quartiles], and the \
         ratios of the same round"
    );
    for (pattern, name) in [
        (0, "one at a time".to_string()),
        (1, format!("batches of {BATCH}")),
    ] {
        println!("  {name}:");
        let rows = &per_conn[pattern];
        for kind in KINDS {
            let mine = &rows[kind as usize];
            let ratio_to = |other: Kind| -> Vec<f64> {
                mine.iter()
                    .zip(&rows[other as usize])
                    .map(|(a, b)| a / b)
                    .collect()
            };
            let (to_tokio, to_std) = (ratio_to(Kind::Tokio), ratio_to(Kind::Std));
            println!(
                "    {:<22} {:>6.2} µs [{:.2}, {:.2}]   to tokio {:.2} [{:.2}, {:.2}]   to std \
                 {:.2} [{:.2}, {:.2}]",
                kind.name(),
                quantile(mine, 0.5) / 1e3,
                quantile(mine, 0.25) / 1e3,
                quantile(mine, 0.75) / 1e3,
                quantile(&to_tokio, 0.5),
                quantile(&to_tokio, 0.25),
                quantile(&to_tokio, 0.75),
                quantile(&to_std, 0.5),
                quantile(&to_std, 0.25),
                quantile(&to_std, 0.75),
            );
        }
    }
}
