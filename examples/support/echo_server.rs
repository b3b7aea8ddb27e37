//! The echo server behind `examples/echo.rs` and the demo's server processes.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use ringflip::{Connection, Server, Socket};
use tokio_uring::buf::BoundedBuf;

enum Listen {
    Tcp(SocketAddr),
    /// `unix:/path` or `unix:@abstract`.
    Unix(String),
}

/// How connections are served (`--runtime`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Runtime {
    /// tokio-uring; `Server::run_async` on its thread.
    TokioUring,
    /// A current-thread tokio runtime; `Server::run_async` on a `LocalSet`.
    Tokio,
    /// `Server::run` on the main thread, a thread per connection.
    Blocking,
}

struct Args {
    runtime: Runtime,
    listen: Vec<Listen>,
    pid_file: Option<PathBuf>,
    ready_timeout: Duration,
    drain_timeout: Duration,
    handoff_state: Option<String>,
    state_out: Option<PathBuf>,
    max_draining: Option<u32>,
    control: Option<PathBuf>,
    udp: Vec<SocketAddr>,
    pass_file: Option<PathBuf>,
    ballast_mib: usize,
    /// `--ballast-once`: only generation 0 faults its ballast in; its successors (started with
    /// the same arguments) stay small.
    ballast_once: bool,
    /// Fault injection: block the serving thread this long when an upgrade reaches
    /// HandingOver, so this process notices its successor's READY late.
    stall_on_handover: Option<Duration>,
    workers: usize,
    /// `--successor-env KEY=VALUE`: set in the next generation's environment.
    successor_env: Vec<(String, String)>,
    /// `--successor-env-file PATH`: `KEY=VALUE` lines read at each upgrade into the next
    /// generation's environment (`Builder::env_refresh`).
    successor_env_file: Option<PathBuf>,
    /// `--v6only`: IPV6_V6ONLY on the IPv6 TCP listeners (`Builder::listen_tcp_with`).
    v6only: bool,
    /// `--tcp-defer-accept SECS`: TCP_DEFER_ACCEPT on the TCP listeners.
    defer_accept: Option<i32>,
    /// `--control-allow-uid N`, `--control-allow-gid N` (repeatable).
    control_uids: Vec<u32>,
    control_gids: Vec<u32>,
    /// `--upgrade-signal hup|usr1|usr2` (`Builder::upgrade_signal`); with another than `hup`,
    /// SIGHUP is this application's, and it ignores it (a service would reload its config).
    upgrade_signal: ringflip::UpgradeSignal,
    /// `--listen-backlog N` (`Builder::listen_backlog`).
    listen_backlog: Option<u32>,
    /// `--handoff-fds N`: hand N fds (duplicates of /dev/null) to the next generation, or
    /// on the ones inherited.
    handoff_fds: usize,
    /// `--handoff-state-bytes N`: hand an N-byte state (byte i is `i % 251`) to the next
    /// generation; the inherited one is read as a stream and checked.
    state_bytes: u64,
    /// `--handoff-report PATH`: where each generation writes what it inherited.
    handoff_report: Option<PathBuf>,
    /// `--handoff-state-once`: only generation 0 sets the `--handoff-state-bytes` state; its
    /// successors read what they inherit and hand nothing on (a bench of one handoff).
    state_once: bool,
}

fn parse_args(argv: impl Iterator<Item = String>, runtime: Runtime) -> Result<Args, String> {
    let mut args = Args {
        runtime,
        listen: Vec::new(),
        pid_file: None,
        ready_timeout: Duration::from_secs(30),
        drain_timeout: Duration::from_secs(60),
        handoff_state: None,
        state_out: None,
        max_draining: None,
        control: None,
        udp: Vec::new(),
        pass_file: None,
        ballast_mib: 0,
        ballast_once: false,
        stall_on_handover: None,
        workers: 1,
        successor_env: Vec::new(),
        successor_env_file: None,
        v6only: false,
        defer_accept: None,
        control_uids: Vec::new(),
        control_gids: Vec::new(),
        upgrade_signal: ringflip::UpgradeSignal::Hup,
        listen_backlog: None,
        handoff_fds: 0,
        state_bytes: 0,
        handoff_report: None,
        state_once: false,
    };
    let mut it = argv;
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--listen" => args.listen.push(parse_listen(&value()?)?),
            "--listen-file" => {
                let path = value()?;
                let text = std::fs::read_to_string(&path)
                    .map_err(|e| format!("--listen-file {path}: {e}"))?;
                for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
                    args.listen.push(parse_listen(line)?);
                }
            }
            "--pid-file" => args.pid_file = Some(value()?.into()),
            "--ready-timeout-ms" => args.ready_timeout = millis(&flag, &value()?)?,
            "--drain-timeout-ms" => args.drain_timeout = millis(&flag, &value()?)?,
            "--handoff-state" => args.handoff_state = Some(value()?),
            "--state-out" => args.state_out = Some(value()?.into()),
            "--control" => args.control = Some(value()?.into()),
            "--udp" => {
                let v = value()?;
                args.udp
                    .push(v.parse().map_err(|e| format!("--udp {v}: {e}"))?);
            }
            "--successor-env" => {
                let v = value()?;
                let (k, v) = v
                    .split_once('=')
                    .ok_or_else(|| format!("--successor-env {v}: KEY=VALUE"))?;
                args.successor_env.push((k.into(), v.into()));
            }
            "--successor-env-file" => args.successor_env_file = Some(value()?.into()),
            "--control-allow-uid" | "--control-allow-gid" => {
                let v = value()?;
                let id: u32 = v.parse().map_err(|e| format!("{flag} {v}: {e}"))?;
                if flag == "--control-allow-uid" {
                    args.control_uids.push(id);
                } else {
                    args.control_gids.push(id);
                }
            }
            "--v6only" => args.v6only = true,
            "--tcp-defer-accept" => {
                let v = value()?;
                args.defer_accept = Some(
                    v.parse()
                        .map_err(|e| format!("--tcp-defer-accept {v}: {e}"))?,
                );
            }
            "--pass-file" => args.pass_file = Some(value()?.into()),
            "--handoff-fds" => {
                let v = value()?;
                args.handoff_fds = v.parse().map_err(|e| format!("--handoff-fds {v}: {e}"))?;
            }
            "--handoff-state-bytes" => {
                let v = value()?;
                args.state_bytes = v
                    .parse()
                    .map_err(|e| format!("--handoff-state-bytes {v}: {e}"))?;
            }
            "--handoff-report" => args.handoff_report = Some(value()?.into()),
            "--handoff-state-once" => args.state_once = true,
            "--workers" => {
                let v = value()?;
                args.workers = v.parse().map_err(|e| format!("--workers {v}: {e}"))?;
            }
            "--stall-on-handover-ms" => {
                let v = value()?;
                let ms: u64 = v
                    .parse()
                    .map_err(|e| format!("--stall-on-handover-ms {v}: {e}"))?;
                args.stall_on_handover = Some(Duration::from_millis(ms));
            }
            "--ballast-mib" => {
                let v = value()?;
                args.ballast_mib = v.parse().map_err(|e| format!("--ballast-mib {v}: {e}"))?;
            }
            "--ballast-once" => args.ballast_once = true,
            "--runtime" => {
                args.runtime = match value()?.as_str() {
                    "tokio-uring" => Runtime::TokioUring,
                    "tokio" => Runtime::Tokio,
                    "blocking" => Runtime::Blocking,
                    other => {
                        return Err(format!("--runtime {other}: tokio-uring, tokio or blocking"))
                    }
                }
            }
            "--upgrade-signal" => {
                args.upgrade_signal = match value()?.as_str() {
                    "hup" => ringflip::UpgradeSignal::Hup,
                    "usr1" => ringflip::UpgradeSignal::Usr1,
                    "usr2" => ringflip::UpgradeSignal::Usr2,
                    other => return Err(format!("--upgrade-signal {other}: hup, usr1 or usr2")),
                }
            }
            "--listen-backlog" => {
                let v = value()?;
                args.listen_backlog = Some(
                    v.parse()
                        .map_err(|e| format!("--listen-backlog {v}: {e}"))?,
                );
            }
            "--max-draining" => {
                let v = value()?;
                args.max_draining =
                    Some(v.parse().map_err(|e| format!("--max-draining {v}: {e}"))?);
            }
            other => return Err(format!("unknown option {other}")),
        }
    }
    if args.listen.is_empty() {
        return Err("at least one --listen ADDR is needed".into());
    }
    Ok(args)
}

/// One `--listen` address: `IP:PORT`, `[IPv6]:PORT`, `unix:PATH` or `unix:@NAME`.
fn parse_listen(v: &str) -> Result<Listen, String> {
    Ok(match v.strip_prefix("unix:") {
        Some(path) => Listen::Unix(path.to_string()),
        None => Listen::Tcp(v.parse().map_err(|e| format!("--listen {v}: {e}"))?),
    })
}

/// TCP_DEFER_ACCEPT, which socket2 has no setter for.
fn set_defer_accept(socket: &ringflip::socket2::Socket, secs: i32) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: a valid socket, and a pointer to an int of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_DEFER_ACCEPT,
            (&secs as *const i32).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Parses a `--…-ms` option value.
pub fn millis(flag: &str, v: &str) -> Result<Duration, String> {
    v.parse()
        .map(Duration::from_millis)
        .map_err(|e| format!("{flag} {v}: {e}"))
}

/// Runs the echo server with command-line arguments `argv` (without the program name), serving
/// connections with `runtime` unless `--runtime` says otherwise.
pub fn main(argv: impl Iterator<Item = String>, runtime: Runtime) -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // No colour codes in a log file or a journal: only on a terminal.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = match parse_args(argv, runtime) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("echo: {e}");
            return ExitCode::from(2);
        }
    };
    let mut builder = Server::builder()
        .ready_timeout(args.ready_timeout)
        .drain_timeout(args.drain_timeout)
        .upgrade_signal(args.upgrade_signal)
        .on_stop_signal(|signal| tracing::info!(?signal, "the application heard a stop signal"));
    if args.upgrade_signal != ringflip::UpgradeSignal::Hup {
        // SIGHUP is the application's now, handled before `build()` (its default action would
        // end the process): a real service would reload its configuration here.
        extern "C" fn on_sighup(_: libc::c_int) {
            const MSG: &[u8] = b"echo: SIGHUP: the application reloads its configuration\n";
            // SAFETY: write(2) is async-signal-safe; MSG is a static buffer.
            unsafe { libc::write(2, MSG.as_ptr().cast(), MSG.len()) };
        }
        // SAFETY: the handler only calls write(2), which is async-signal-safe.
        let _ = unsafe {
            nix::sys::signal::signal(
                nix::sys::signal::Signal::SIGHUP,
                nix::sys::signal::SigHandler::Handler(on_sighup),
            )
        };
    }
    if let Some(path) = args.control {
        builder = builder.control_socket(path);
    }
    for uid in &args.control_uids {
        builder = builder.control_socket_allow_uid(*uid);
    }
    for gid in &args.control_gids {
        builder = builder.control_socket_allow_gid(*gid);
    }
    for (i, addr) in args.udp.iter().enumerate() {
        builder = builder.bind_udp(format!("udp{i}"), *addr);
    }
    if args.workers > 1 {
        builder = builder.workers(args.workers);
    }
    if let Some(n) = args.listen_backlog {
        builder = builder.listen_backlog(n);
    }
    if let Some(max) = args.max_draining {
        builder = builder.max_draining_generations(max);
    }
    if let Some(path) = args.pid_file {
        builder = builder.pid_file(path);
    }
    for (k, v) in &args.successor_env {
        builder = builder.env(k, v);
    }
    if let Some(path) = args.successor_env_file {
        builder = builder.env_refresh(move |env| {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            for line in text.lines() {
                if let Some((k, v)) = line.split_once('=') {
                    env.insert(k.into(), v.into());
                }
            }
        });
    }
    for (i, listen) in args.listen.iter().enumerate() {
        let name = format!("echo{i}");
        builder = match listen {
            Listen::Tcp(addr) if args.v6only || args.defer_accept.is_some() => {
                let (v6only, defer) = (args.v6only && addr.is_ipv6(), args.defer_accept);
                builder.listen_tcp_with(name, *addr, move |socket| {
                    if v6only {
                        socket.set_only_v6(true)?;
                    }
                    if let Some(secs) = defer {
                        set_defer_accept(socket, secs)?;
                    }
                    Ok(())
                })
            }
            Listen::Tcp(addr) => builder.listen_tcp(name, *addr),
            Listen::Unix(path) => match path.strip_prefix('@') {
                Some(abstract_name) => builder.listen_unix_abstract(name, abstract_name),
                None => builder.listen_unix(name, path, None),
            },
        };
    }
    // Before the runtime starts: build() blocks the upgrade signals, and the runtime's threads
    // inherit the mask.
    let mut server = match builder.build() {
        Ok(s) => s,
        // Started by an upgrade its predecessor gave up on: nothing to do but leave.
        Err(e @ ringflip::Error::Abandoned) => {
            tracing::info!(error = %e, "not starting");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot start");
            return ExitCode::from(1);
        }
    };
    // --ballast-mib: make this process big (resident, every page mapped), as a service with a
    // large heap would be, to show that starting the next generation does not copy it. Done on
    // a thread, and only once the 500 ms window after the upgrade that started this process is
    // over: faulting memory in costs 0.6-3 s of CPU per GiB on this VM, which would otherwise
    // be measured as the upgrade's latency. It is faulted in 4 MiB at a time: one MAP_POPULATE
    // of the whole ballast held the memory-map lock for seconds, and the serving thread's own
    // allocations waited behind it (26,396 timed-out connections). The demo's interval must
    // leave time for it.
    // --ballast-once: a bench measuring one upgrade of a big process (handover_scale) must not
    // have the successor grow as big beside it.
    if args.ballast_mib > 0 && !(args.ballast_once && server.handle().generation() > 0) {
        let bytes = args.ballast_mib << 20;
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(1000));
            if let Err(e) = populate(bytes) {
                tracing::error!(error = %e, "ballast");
            }
        });
    }
    // UDP: echo each datagram back, on a thread of its own. The socket is shared with the
    // next generation, so until this process exits both read from it: a datagram this one has
    // read must still be answered, so the thread is stopped and joined before the exit (it
    // wakes every 50 ms to look), not killed with the process between its read and its reply.
    let udp_stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut udp_threads = Vec::new();
    for i in 0..args.udp.len() {
        if let Some(Ok(sock)) = server.udp_socket(&format!("udp{i}")) {
            let stop = udp_stop.clone();
            udp_threads.push(std::thread::spawn(move || {
                if let Err(e) = sock.set_read_timeout(Some(Duration::from_millis(50))) {
                    tracing::error!(error = %e, "UDP socket timeout");
                    return;
                }
                let mut buf = [0u8; 2048];
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    match sock.recv_from(&mut buf) {
                        Ok((n, from)) => {
                            let _ = sock.send_to(&buf[..n], from);
                        }
                        Err(e)
                            if matches!(
                                e.kind(),
                                std::io::ErrorKind::WouldBlock
                                    | std::io::ErrorKind::TimedOut
                                    | std::io::ErrorKind::Interrupted
                            ) => {}
                        Err(_) => break,
                    }
                }
            }));
        }
    }
    // --pass-file: an open file handed from generation to generation as a raw fd; each
    // generation appends a line through the inherited fd (not by reopening the path).
    if let Some(path) = &args.pass_file {
        let inherited = server
            .take_inherited_fds()
            .into_iter()
            .find(|(n, _)| n == "file");
        let file = match inherited {
            Some((_, fd)) => std::fs::File::from(fd),
            None => match std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
            {
                Ok(f) => f,
                Err(e) => {
                    tracing::error!(error = %e, "--pass-file");
                    return ExitCode::from(1);
                }
            },
        };
        use std::io::Write;
        let _ = writeln!(
            &file,
            "generation {} pid {}",
            server.handle().generation(),
            std::process::id()
        );
        let handoff = std::os::fd::OwnedFd::from(file);
        if let Err(e) = server
            .handle()
            .set_handoff_fds(vec![("file".into(), handoff)])
        {
            tracing::error!(error = %e, "handing the file over");
            return ExitCode::from(1);
        }
    }
    if args.handoff_fds > 0 || args.state_bytes > 0 {
        // --handoff-state-once: a successor does not build a state for the next generation
        // before its READY (1 GiB took seconds), which a bench would measure as the handoff's.
        let state_bytes = if args.state_once && server.handle().generation() > 0 {
            0
        } else {
            args.state_bytes
        };
        if let Err(e) = bulk_handoff(
            &mut server,
            args.handoff_fds,
            state_bytes,
            args.handoff_report.as_deref(),
        ) {
            tracing::error!(error = %e, "bulk handoff");
            return ExitCode::from(1);
        }
    }
    // The state blob: what the previous generation handed over, and what we hand on.
    if let (Some(state), Some(path)) = (server.inherited_state(), &args.state_out) {
        if let Err(e) = std::fs::write(path, state) {
            tracing::error!(error = %e, "writing --state-out");
        }
    }
    if let Some(text) = &args.handoff_state {
        let blob = format!("{text} from {}", std::process::id());
        if let Err(e) = server.handle().set_handoff_state(blob.into()) {
            tracing::error!(error = %e, "setting the handoff state");
            return ExitCode::from(1);
        }
    }
    let result = match args.runtime {
        // Thread-per-core, blocking: every worker accepts on its own ring and serves its
        // connections on threads of their own.
        Runtime::Blocking if args.workers > 1 => {
            let threads = ThreadCache::default();
            server.run_workers(move |_worker| {
                let threads = threads.clone();
                move |conn| threads.serve(conn)
            })
        }
        // Thread-per-core with a runtime per ring: every worker thread runs its own tokio-uring
        // runtime, which serves the connections its ring accepts, with no thread hop.
        _ if args.workers > 1 => server.run_workers_async(|ring| {
            start_uring(ring.run_async(|conn| {
                tokio_uring::spawn(echo(conn));
            }))
        }),
        // The upgrade ring runs as a task of the runtime's own thread: no thread hop.
        Runtime::TokioUring => {
            let phases = server.handle().phase_receiver();
            start_uring(async move {
                if let Some(stall) = args.stall_on_handover {
                    tokio_uring::spawn(stall_on_handover(phases, stall));
                }
                server
                    .run_async(|conn| {
                        tokio_uring::spawn(echo(conn));
                    })
                    .await
            })
        }
        Runtime::Tokio => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a tokio runtime");
            tokio::task::LocalSet::new().block_on(
                &rt,
                server.run_async(|conn| {
                    tokio::task::spawn_local(echo_tokio(conn));
                }),
            )
        }
        // The ring on this thread, a thread per connection (reused: see ThreadCache).
        Runtime::Blocking => {
            let threads = ThreadCache::default();
            server.run(|conn| threads.serve(conn))
        }
    };
    udp_stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for thread in udp_threads {
        let _ = thread.join();
    }
    match result {
        Ok(exit) => {
            tracing::info!(?exit, "exiting");
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!(error = %e, "server failed");
            ExitCode::from(1)
        }
    }
}

/// Runs `future` on a tokio-uring runtime whose ring is set up with `IORING_SETUP_COOP_TASKRUN`.
///
/// Why: by default the kernel posts a completion whose data arrived from another CPU (a read
/// that waited, the peer's FIN) by interrupting this thread with an IPI, even while it is busy
/// serving. With COOP_TASKRUN it runs that work at this thread's next syscall instead, and
/// tokio-uring makes one on every turn of its loop. Under a 512-connection burst the default
/// ring took ten times the rescheduling IPIs of an epoll server on the serving CPU (19,007
/// against 1,909 in a 20 s bench run). A sleeping thread is still woken at once. The flag came
/// in Linux 5.19; ringflip needs 6.1.
pub fn start_uring<F: std::future::Future>(future: F) -> F::Output {
    tokio_uring::builder()
        .uring_builder(tokio_uring::uring_builder().setup_coop_taskrun())
        .start(future)
}

/// Maps `bytes` of anonymous memory and faults every page in, 4 MiB at a time (one call for
/// all of it held the memory-map lock for seconds); the mapping lives as long as the process.
pub fn populate(bytes: usize) -> std::io::Result<()> {
    // SAFETY: a fresh anonymous private mapping, never unmapped; no Rust object refers to it.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            bytes,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    const CHUNK: usize = 4 << 20;
    for off in (0..bytes).step_by(CHUNK) {
        // SAFETY: a range inside the mapping made above.
        let rc = unsafe {
            libc::madvise(
                base.cast::<u8>().add(off).cast(),
                CHUNK.min(bytes - off),
                libc::MADV_POPULATE_WRITE,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Reads and writes back until the peer closes; bytes go back as they came, so every line is
/// echoed verbatim.
macro_rules! echo_loop {
    ($stream:expr) => {{
        let stream = $stream;
        let mut buf = vec![0u8; 4096];
        loop {
            let (res, b) = stream.read(buf).await;
            buf = b;
            let n = match res {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let (res, slice) = stream.write_all(buf.slice(..n)).await;
            buf = slice.into_inner();
            if res.is_err() {
                break;
            }
        }
    }};
}

/// A tokio-uring stream of either kind.
enum UringStream {
    Tcp(tokio_uring::net::TcpStream),
    Unix(tokio_uring::net::UnixStream),
}

async fn echo(conn: Connection) {
    // A runtime ringflip has no stream type for: the std socket, typed by its listener, mapped
    // to the runtime's inside the `Guarded`, which keeps the drain guard until the loop ends.
    let stream = conn.into_std().map(|socket| match socket {
        Socket::Tcp(s) => UringStream::Tcp(tokio_uring::net::TcpStream::from_std(s)),
        Socket::Unix(s) => UringStream::Unix(tokio_uring::net::UnixStream::from_std(s)),
    });
    match &*stream {
        UringStream::Tcp(s) => echo_loop!(s),
        UringStream::Unix(s) => echo_loop!(s),
    }
}

async fn echo_tokio(conn: Connection) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut stream) = conn.into_tokio() else {
        return;
    };
    let mut buf = vec![0u8; 4096];
    while let Ok(n) = stream.read(&mut buf).await {
        if n == 0 || stream.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// An idle thread of a [`ThreadCache`]: its id and where to send it a connection.
type IdleThread = (u64, std::sync::mpsc::Sender<Connection>);

/// Serves each connection on a thread of its own, reusing the threads whose connection has
/// ended: starting a thread cost ~55 µs here, more than the accept and the echo together
/// (the sequential echo bench, 2026-12-04). Idle threads exit after `IDLE`.
#[derive(Clone, Default)]
struct ThreadCache {
    /// Idle threads, each by an id and the sender of its channel.
    idle: std::sync::Arc<std::sync::Mutex<Vec<IdleThread>>>,
    next_id: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl ThreadCache {
    const IDLE: Duration = Duration::from_secs(10);

    fn serve(&self, mut conn: Connection) {
        // Popped and sent under the lock, so that an idle thread that times out (and takes
        // the lock to leave) either is still listed or has the connection in its channel.
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        while let Some((_, tx)) = idle.pop() {
            match tx.send(conn) {
                Ok(()) => return,
                Err(std::sync::mpsc::SendError(back)) => conn = back,
            }
        }
        drop(idle);
        let idle = self.idle.clone();
        let id = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        std::thread::spawn(move || {
            let (tx, rx) = std::sync::mpsc::channel();
            loop {
                echo_blocking(conn);
                idle.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((id, tx.clone()));
                conn = match rx.recv_timeout(Self::IDLE) {
                    Ok(next) => next,
                    Err(_) => {
                        let mut list = idle.lock().unwrap_or_else(|e| e.into_inner());
                        list.retain(|(i, _)| *i != id);
                        match rx.try_recv() {
                            Ok(next) => next, // sent just before this thread left the list
                            Err(_) => return,
                        }
                    }
                };
            }
        });
    }
}

fn echo_blocking(conn: Connection) {
    use std::io::{Read, Write};
    let mut stream = conn.into_std();
    let mut buf = vec![0u8; 4096];
    while let Ok(n) = stream.read(&mut buf) {
        if n == 0 || stream.write_all(&buf[..n]).is_err() {
            return;
        }
    }
}

/// `ctl SOCKET COMMAND`: sends one control command (`upgrade`, `status`) with the same client
/// as the `ringflip-ctl` binary (`ringflip::control_client`), with the same output and exit
/// statuses: 0 for `ok <pid>` or a status line, 1 failed, 2 busy or refused, 3 could not ask.
pub fn ctl(mut argv: impl Iterator<Item = String>) -> ExitCode {
    use ringflip::control_client::{run, Command, DEFAULT_TIMEOUT, EXIT_USAGE};
    let (Some(socket), Some(command)) =
        (argv.next(), argv.next().as_deref().and_then(Command::parse))
    else {
        eprintln!("usage: echo ctl SOCKET upgrade|status");
        return ExitCode::from(EXIT_USAGE);
    };
    run("echo ctl", socket.as_ref(), command, DEFAULT_TIMEOUT)
}

/// Blocks this (runtime) thread for `stall` each time the phase becomes HandingOver.
async fn stall_on_handover(
    mut phases: tokio::sync::watch::Receiver<ringflip::Phase>,
    stall: Duration,
) {
    while phases.changed().await.is_ok() {
        let phase = *phases.borrow_and_update();
        if phase == ringflip::Phase::HandingOver {
            tracing::warn!(
                ?stall,
                "stalling the serving thread (--stall-on-handover-ms)"
            );
            std::thread::sleep(stall);
        }
    }
}

/// `--handoff-fds` and `--handoff-state-bytes`: reads what the previous generation handed
/// over, checks it if there is a `--handoff-report` to write `fds=N state=M ok` to (the check
/// reads every byte: without a report a bench measures the handoff, not the check), and sets
/// what the next one gets.
fn bulk_handoff(
    server: &mut Server,
    handoff_fds: usize,
    state_bytes: u64,
    report: Option<&std::path::Path>,
) -> Result<(), String> {
    use std::io::Read;
    let inherited: Vec<_> = server
        .take_inherited_fds()
        .into_iter()
        .filter(|(n, _)| n.starts_with("bulk"))
        .collect();
    let mut state_len = 0u64;
    let mut state_ok = true;
    if let Some(mut reader) = server.inherited_state_reader() {
        // Bounded memory: 1 MiB at a time, checked as it comes.
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = reader
                .read(&mut buf)
                .map_err(|e| format!("reading the state: {e}"))?;
            if n == 0 {
                break;
            }
            if report.is_some() {
                for (i, b) in buf[..n].iter().enumerate() {
                    if *b != ((state_len + i as u64) % 251) as u8 {
                        state_ok = false;
                    }
                }
            }
            state_len += n as u64;
        }
    }
    if let Some(path) = report {
        let report = format!("fds={} state={state_len} ok={state_ok}\n", inherited.len());
        std::fs::write(path, report).map_err(|e| format!("--handoff-report: {e}"))?;
    }
    if handoff_fds > 0 {
        let fds = if inherited.len() == handoff_fds {
            inherited
        } else {
            let null = std::fs::File::open("/dev/null").map_err(|e| e.to_string())?;
            (0..handoff_fds)
                .map(|i| {
                    std::os::fd::AsFd::as_fd(&null)
                        .try_clone_to_owned()
                        .map(|fd| (format!("bulk{i}"), fd))
                })
                .collect::<Result<_, _>>()
                .map_err(|e| format!("making the fds to hand over: {e}"))?
        };
        server
            .handle()
            .set_handoff_fds(fds)
            .map_err(|e| e.to_string())?;
    }
    if state_bytes > 0 {
        let state: Vec<u8> = (0..state_bytes).map(|i| (i % 251) as u8).collect();
        server
            .handle()
            .set_handoff_state(state.into())
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}
