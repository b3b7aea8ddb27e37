//! Peer echo servers for the side-by-side upgrade benchmark.
//!
//! Each peer implements the contract of our own echo server (`examples/support/echo_server.rs`)
//! with another upgrade mechanism, so the orchestrator can drive them all with the same load and
//! the same upgrade schedule:
//!
//! - `--listen ADDR` (repeatable; one is enough), `--pid-file PATH`, `--drain-timeout-ms N`
//!   (default 60000). `--ready-timeout-ms N` is accepted for command-line compatibility and
//!   ignored: neither library lets it be set (see each peer).
//! - Each connection: bytes read are written back verbatim until the client closes.
//! - SIGHUP: upgrade to a new copy of the binary at `argv[0]` (not for `plain`, which ignores
//!   it). The old process then stops accepting, waits for its live connections to finish (or
//!   the drain timeout) and exits 0. A failed upgrade leaves the old process serving.
//! - SIGTERM: stop accepting (close the listener), drain, exit 0.
//!
//! The upgrading peers re-execute `argv[0]` with the same arguments, so start them with an
//! absolute program path (as `Command::new(current_exe())` does).
//!
//! The HTTP bench (`benches/http_upgrade.rs`) has HTTP servers here too, with the same options
//! but answering `GET /` instead of echoing: `axum-reuseport` (axum, SO_REUSEPORT restart with
//! graceful shutdown), `nginx-http` and `haproxy-http` (nginx and HAProxy answering by
//! themselves, no backend).
//!
//! Listeners are bound with SO_REUSEADDR and a backlog of [`BACKLOG`] (the default
//! `net.core.somaxconn`, which is what ringflip asks for), so a connection burst measures the
//! upgrade mechanism, not a 128-entry default backlog.
#![allow(dead_code)]

pub mod axum_reuseport;
pub mod ecdysis_echo;
pub mod haproxy_reload;
pub mod nginx_usr2;
pub mod plain_echo;
pub mod shellflip_echo;
pub mod tableflip_echo;

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{mpsc, watch};

/// Runs the peer named `kind` ("shellflip", "ecdysis" or "plain") with command-line arguments
/// `argv` (without the program name and without the kind); `None` for an unknown kind.
pub fn dispatch(kind: &str, argv: impl Iterator<Item = String>) -> Option<ExitCode> {
    match kind {
        "shellflip" => Some(shellflip_echo::main(argv)),
        "ecdysis" => Some(ecdysis_echo::main(argv)),
        "plain" => Some(plain_echo::main(argv)),
        "nginx" => Some(nginx_usr2::main(argv)),
        "haproxy" => Some(haproxy_reload::main(argv)),
        "tableflip" => Some(tableflip_echo::main(argv)),
        // The HTTP servers of benches/http_upgrade.rs.
        "axum-reuseport" => Some(axum_reuseport::main(argv)),
        "nginx-http" => Some(nginx_usr2::main_http(argv)),
        "haproxy-http" => Some(haproxy_reload::main_http(argv)),
        _ => None,
    }
}

/// `--serve KIND ARGS…` as the benches' first arguments: runs server KIND (`ringflip` and
/// `ringflip-tokio`, ringflip's echo server on tokio-uring or tokio, which also takes
/// `--runtime blocking`; or a peer of [`dispatch`]) and returns its exit code. `None` when
/// `argv` (without the program name) does not start with `--serve`.
pub fn serve_if_asked(argv: &[String]) -> Option<ExitCode> {
    use crate::support::echo_server::{main as echo, Runtime};
    if argv.first().map(String::as_str) != Some("--serve") {
        return None;
    }
    let kind = argv.get(1).cloned().unwrap_or_default();
    let rest = argv.iter().skip(2).cloned();
    Some(match kind.as_str() {
        "ringflip" => echo(rest, Runtime::TokioUring),
        "ringflip-tokio" => echo(rest, Runtime::Tokio),
        other => dispatch(other, rest).unwrap_or_else(|| {
            eprintln!("unknown server kind {other:?}");
            ExitCode::from(2)
        }),
    })
}

/// Readies peer `kind` to run here (builds the tableflip server), or says why it cannot: a
/// package that is not installed, a failed build. The Rust peers always can.
pub fn prepare(kind: &str) -> Result<(), String> {
    match kind {
        "haproxy" if !haproxy_reload::available() => Err(format!(
            "{} is not installed (apt-get install haproxy)",
            haproxy_reload::HAPROXY
        )),
        "nginx" if !nginx_usr2::available() => Err(format!(
            "{} or its stream module is not installed (apt-get install nginx-core \
             libnginx-mod-stream)",
            nginx_usr2::NGINX
        )),
        "tableflip" if !tableflip_echo::available() => Err(format!(
            "{} or Debian's tableflip sources are not installed (apt-get install golang-go \
             golang-github-cloudflare-tableflip-dev)",
            tableflip_echo::GO
        )),
        "tableflip" => tableflip_echo::build().map_err(|e| format!("could not be built: {e}")),
        _ => Ok(()),
    }
}

/// The peers' names, as [`dispatch`] takes them.
pub const KINDS: [&str; 3] = ["shellflip", "ecdysis", "plain"];

/// Listen backlog of every peer's listener.
pub const BACKLOG: u32 = 4096;

/// Parsed command line.
#[derive(Debug)]
pub(crate) struct Args {
    pub listen: Vec<SocketAddr>,
    pub pid_file: Option<PathBuf>,
    pub drain_timeout: Duration,
    /// `--reuseport` (only the plain peer accepts it).
    pub reuseport: bool,
}

/// Parses the common options; `--reuseport` only if `allow_reuseport`.
pub(crate) fn parse_args(
    argv: impl Iterator<Item = String>,
    allow_reuseport: bool,
) -> Result<Args, String> {
    let mut args = Args {
        listen: Vec::new(),
        pid_file: None,
        drain_timeout: Duration::from_secs(60),
        reuseport: false,
    };
    let mut it = argv;
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--listen" => {
                let v = value()?;
                args.listen
                    .push(v.parse().map_err(|e| format!("--listen {v}: {e}"))?);
            }
            "--pid-file" => args.pid_file = Some(value()?.into()),
            "--drain-timeout-ms" => args.drain_timeout = millis(&flag, &value()?)?,
            // Accepted so one command line fits every server; no peer library can take it.
            "--ready-timeout-ms" => {
                millis(&flag, &value()?)?;
            }
            "--reuseport" if allow_reuseport => args.reuseport = true,
            other => return Err(format!("unknown option {other}")),
        }
    }
    if args.listen.is_empty() {
        return Err("at least one --listen ADDR is needed".into());
    }
    Ok(args)
}

use crate::support::echo_server::millis;

/// Logs to stderr, filtered by `RUST_LOG` (default `info`), like our echo server. The
/// libraries log through the `log` crate, which tracing-subscriber picks up.
pub(crate) fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // No colour codes in a log file or a journal: only on a terminal.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// Writes "PID\n" to `path` atomically: a temporary file in the same directory, then rename.
pub(crate) fn write_pid_file(path: &Path) -> io::Result<()> {
    let pid = std::process::id();
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp.{pid}"));
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, format!("{pid}\n"))?;
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// Binds a TCP listener: SO_REUSEADDR, SO_REUSEPORT if asked, backlog [`BACKLOG`].
///
/// tokio's `TcpSocket` is socket2 underneath; it needs no dependency beyond tokio itself.
/// Must run inside a tokio runtime (the listener registers with its reactor).
pub(crate) fn bind(addr: SocketAddr, reuseport: bool) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    if reuseport {
        socket.set_reuseport(true)?;
    }
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// Echoes everything read back to the peer until it closes (or an error).
pub(crate) async fn echo(mut stream: TcpStream) {
    let mut buf = vec![0u8; 4096];
    loop {
        let n = match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        // Bytes are written back as they came, so every line is echoed verbatim.
        if stream.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// Accepts on `listener` until `stop` turns true (or its sender is gone), handing each
/// connection to `on_conn`; then closes the listener (this process stops accepting).
pub(crate) async fn accept_until(
    listener: TcpListener,
    mut stop: watch::Receiver<bool>,
    mut on_conn: impl FnMut(TcpStream),
) {
    loop {
        let accepted = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => break,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, _)) => on_conn(stream),
            Err(e) => {
                // EMFILE and the like: the connection waits in the backlog; back off.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    drop(listener);
}

/// Counts live connections so a process can wait for them to finish (for the peers whose
/// library has no such helper; shellflip has `ShutdownCoordinator`).
#[derive(Clone, Debug)]
pub(crate) struct Conns {
    // Every live connection holds a clone; the drain side sees `None` once all are gone.
    tx: mpsc::Sender<()>,
    live: Arc<AtomicUsize>,
}

/// Held by a connection's task for its lifetime.
#[derive(Debug)]
pub(crate) struct ConnGuard {
    _tx: mpsc::Sender<()>,
    live: Arc<AtomicUsize>,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.live.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The waiting side of [`Conns`].
#[derive(Debug)]
pub(crate) struct Drain {
    rx: mpsc::Receiver<()>,
    live: Arc<AtomicUsize>,
}

/// A connection counter and its drain side.
pub(crate) fn conns() -> (Conns, Drain) {
    let (tx, rx) = mpsc::channel(1);
    let live = Arc::new(AtomicUsize::new(0));
    (
        Conns {
            tx,
            live: live.clone(),
        },
        Drain { rx, live },
    )
}

impl Conns {
    /// A guard for one new connection.
    pub(crate) fn guard(&self) -> ConnGuard {
        self.live.fetch_add(1, Ordering::Relaxed);
        ConnGuard {
            _tx: self.tx.clone(),
            live: self.live.clone(),
        }
    }

    /// Spawns the echo task for `stream`, counted until it ends.
    pub(crate) fn spawn_echo(&self, stream: TcpStream) {
        let guard = self.guard();
        tokio::spawn(async move {
            echo(stream).await;
            drop(guard);
        });
    }
}

impl Drain {
    /// Waits until every connection has ended (`Ok`) or `timeout` passed (`Err(live)`). Every
    /// [`Conns`] clone must be dropped first (the accept loops' included), or this waits for
    /// the whole timeout.
    pub(crate) async fn wait(mut self, timeout: Duration) -> Result<(), usize> {
        match tokio::time::timeout(timeout, self.rx.recv()).await {
            Ok(_) => Ok(()),
            Err(_) => Err(self.live.load(Ordering::Relaxed)),
        }
    }
}

/// Starts a plain echo backend for a proxy peer (this binary as `--serve plain` on a free
/// loopback port), names its pid in `<pid file>.extra` for the orchestrator to stop at the end,
/// and waits (bounded) until it listens. Returns its address.
pub(crate) fn start_backend(pid_file: &Path) -> Result<SocketAddr, String> {
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| format!("no free port for the backend: {e}"))?;
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let backend = std::process::Command::new(&exe)
        .args(["--serve", "plain", "--listen", &addr.to_string()])
        .stdin(std::process::Stdio::null())
        .spawn()
        .map_err(|e| format!("starting the backend: {e}"))?;
    let mut extra = pid_file.as_os_str().to_owned();
    extra.push(".extra");
    std::fs::write(PathBuf::from(extra), format!("{}\n", backend.id()))
        .map_err(|e| format!("writing the backend's pid: {e}"))?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(addr).is_err() {
        if std::time::Instant::now() > deadline {
            return Err("the backend did not start listening".into());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(addr)
}

/// What a proxy peer (nginx, HAProxy) needs before it writes its configuration.
pub(crate) struct ProxySetup {
    pub listen: SocketAddr,
    pub pid_file: PathBuf,
    /// The pid file's directory: the configuration and logs go there.
    pub dir: PathBuf,
    /// The echo backend, started and listening.
    pub backend: SocketAddr,
}

/// Parses a proxy peer's arguments and starts its backend; on failure, prints why (prefixed
/// with `name`) and returns the exit code.
pub(crate) fn proxy_setup(
    argv: impl Iterator<Item = String>,
    name: &str,
) -> Result<ProxySetup, ExitCode> {
    let HttpSetup {
        listen,
        pid_file,
        dir,
        ..
    } = http_setup(argv, name)?;
    let backend = start_backend(&pid_file).map_err(|e| {
        eprintln!("{name} peer: {e}");
        ExitCode::from(1)
    })?;
    Ok(ProxySetup {
        listen,
        pid_file,
        dir,
        backend,
    })
}

/// What an HTTP peer that serves by itself (nginx's `return`, HAProxy's `http-request return`)
/// needs before it writes its configuration: no backend.
pub(crate) struct HttpSetup {
    /// Plain HTTP/1.1 (and HTTP/2 with prior knowledge where the server tells them apart).
    pub listen: SocketAddr,
    /// A second address for HTTP/2 with prior knowledge (nginx 1.22 serves `listen … http2` as
    /// HTTP/2 only), if given (`--listen` a second time).
    pub listen_h2: Option<SocketAddr>,
    pub pid_file: PathBuf,
    /// The pid file's directory: the configuration and logs go there.
    pub dir: PathBuf,
    pub drain_timeout: Duration,
}

/// Parses an HTTP peer's arguments; on failure, prints why (prefixed with `name`) and returns
/// the exit code.
pub(crate) fn http_setup(
    argv: impl Iterator<Item = String>,
    name: &str,
) -> Result<HttpSetup, ExitCode> {
    let args = parse_args(argv, false).map_err(|e| {
        eprintln!("{name} peer: {e}");
        ExitCode::from(2)
    })?;
    let (Some(&listen), Some(pid_file)) = (args.listen.first(), args.pid_file) else {
        eprintln!("{name} peer: --listen and --pid-file are needed");
        return Err(ExitCode::from(2));
    };
    let dir = pid_file
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    Ok(HttpSetup {
        listen,
        listen_h2: args.listen.get(1).copied(),
        pid_file,
        dir,
        drain_timeout: args.drain_timeout,
    })
}

/// Writes a proxy peer's configuration `text` to `conf` and replaces this process with
/// `command`; returns only on failure, having printed why (prefixed with `name`).
pub(crate) fn exec_with_config(
    name: &str,
    conf: &Path,
    text: &str,
    command: &mut std::process::Command,
) -> ExitCode {
    use std::os::unix::process::CommandExt;
    if let Err(e) = std::fs::write(conf, text) {
        eprintln!("{name} peer: writing {}: {e}", conf.display());
        return ExitCode::from(1);
    }
    let err = command.exec();
    eprintln!("{name} peer: exec {:?}: {err}", command.get_program());
    ExitCode::from(1)
}

/// A peer's `main`: logging, the common options (`--reuseport` only if `allow_reuseport`), a
/// tokio runtime from `runtime`, and `serve` on it. Connections still open when `serve` returns
/// (cut by the drain timeout) are dropped without waiting on them.
pub(crate) fn run_peer<Fut: std::future::Future<Output = ExitCode>>(
    name: &str,
    argv: impl Iterator<Item = String>,
    allow_reuseport: bool,
    mut runtime: tokio::runtime::Builder,
    serve: impl FnOnce(Args) -> Fut,
) -> ExitCode {
    init_logging();
    let args = match parse_args(argv, allow_reuseport) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{name}: {e}");
            return ExitCode::from(2);
        }
    };
    let rt = match runtime.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the runtime");
            return ExitCode::from(1);
        }
    };
    let code = rt.block_on(serve(args));
    rt.shutdown_timeout(Duration::from_millis(100));
    code
}
