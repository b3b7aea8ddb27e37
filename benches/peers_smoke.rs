//! Self-check of the benchmark's peer echo servers (`benches/peers/`).
//!
//! ```text
//! cargo bench --bench peers_smoke                  # check every peer
//! cargo bench --bench peers_smoke -- --test        # the same (criterion-style quick mode)
//! cargo bench --bench peers_smoke -- ecdysis       # check only the peers named
//! peers_smoke --serve KIND --listen ADDR …         # run peer KIND as a server
//! ```
//!
//! For each peer it starts this binary as the server (`--serve KIND`) on a free loopback port,
//! with its pid file in a temporary directory, and checks, with every wait bounded:
//!
//! - shellflip, ecdysis: lines echo; a SIGHUP upgrade to a broken binary (the server runs as a
//!   symlink, pointed at a script that exits 1) fails and leaves the old process serving, its
//!   pid still in the pid file; then two SIGHUP upgrades, each naming a new live pid in the pid
//!   file, while a long-lived connection to the first process keeps echoing and new connections
//!   work; each old process releases the listening socket; closing the long-lived connection
//!   lets the first process exit; then SIGTERM to the newest closes its listener (connections
//!   refused), its live connection still echoes, and it exits once that closes.
//! - plain: started with `--reuseport`; SIGHUP is ignored; a second instance on the same port
//!   with `--reuseport`, then SIGTERM to the first (the "reuseport restart"): it releases the
//!   socket, keeps echoing on its live connection, exits once that closes; then SIGTERM the
//!   second as above.
//!
//! Every process must exit with status 0. Processes are stopped by pid only; this process is a
//! child subreaper, so upgraded generations (orphaned when their parent exits) are reaped here.
//! It ends with a line `peers_smoke: N passed, N failed`. A failed check prints the end of the
//! servers' log (stderr, `RUST_LOG`, default `info`); `PEERS_SMOKE_KEEP=1` keeps it on success too.

use std::collections::{HashMap, HashSet};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

mod peers;
#[path = "../examples/support/mod.rs"]
mod support;

use support::scenario::{self, alive, read_pid, signal};

const WAIT: Duration = Duration::from_secs(10);

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    if let Some(exit) = peers::serve_if_asked(&argv) {
        return exit;
    }
    // `--test`, `--bench` (added by cargo bench) and other flags: nothing to change, the check
    // is quick. Other words name the peers to check.
    let wanted: Vec<String> = argv.into_iter().filter(|a| !a.starts_with('-')).collect();
    if let Some(bad) = wanted.iter().find(|w| !peers::KINDS.contains(&w.as_str())) {
        eprintln!(
            "peers_smoke: unknown peer {bad:?}; one of {:?}",
            peers::KINDS
        );
        return ExitCode::from(2);
    }
    // Orphaned old generations re-parent to us, so we can reap them and read their status.
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };

    let (mut passed, mut failed) = (0, 0);
    for kind in peers::KINDS {
        if !wanted.is_empty() && !wanted.iter().any(|w| w == kind) {
            continue;
        }
        let t0 = Instant::now();
        match check(kind) {
            Ok(()) => {
                passed += 1;
                println!(
                    "peers_smoke: {kind} ... ok ({:.1} s)",
                    t0.elapsed().as_secs_f64()
                );
            }
            Err(e) => {
                failed += 1;
                println!("peers_smoke: {kind} ... FAILED: {e}");
            }
        }
    }
    println!("peers_smoke: {passed} passed, {failed} failed");
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// The processes of one check: every pid seen, and the exit statuses reaped.
#[derive(Default)]
struct Procs {
    pids: Vec<u32>,
    statuses: HashMap<u32, i32>,
}

impl Procs {
    /// Reaps every exited child (we are their subreaper), never blocking.
    fn reap(&mut self) {
        loop {
            let mut status = 0;
            // SAFETY: waitpid with a live out-pointer.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid <= 0 {
                return;
            }
            self.statuses.insert(pid as u32, status);
        }
    }

    /// Waits until `pid` has exited; then, if we reaped it, checks it exited 0.
    fn wait_gone(&mut self, pid: u32, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            self.reap();
            if !alive(pid) {
                self.reap();
                return self.exit_ok(pid);
            }
            if Instant::now() >= deadline {
                return Err(format!("pid {pid} still running after {timeout:?}"));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn exit_ok(&self, pid: u32) -> Result<(), String> {
        match self.statuses.get(&pid) {
            // Reaped by its own parent (an older generation): status unknown here.
            None => Ok(()),
            Some(&s) if libc::WIFEXITED(s) && libc::WEXITSTATUS(s) == 0 => Ok(()),
            Some(&s) if libc::WIFEXITED(s) => {
                Err(format!("pid {pid} exited with {}", libc::WEXITSTATUS(s)))
            }
            Some(&s) => Err(format!("pid {pid} killed by signal {}", libc::WTERMSIG(s))),
        }
    }

    /// SIGKILLs whatever is left (by pid) and reaps it.
    fn kill_all(&mut self) {
        for &p in &self.pids {
            if alive(p) {
                // SAFETY: plain syscall on a pid we started (directly or by upgrade).
                unsafe { libc::kill(p as i32, libc::SIGKILL) };
            }
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline && self.pids.iter().any(|p| alive(*p)) {
            self.reap();
            std::thread::sleep(Duration::from_millis(10));
        }
        self.reap();
    }
}

fn check(kind: &str) -> Result<(), String> {
    let dir = std::env::temp_dir().join(format!("peers-smoke-{}-{kind}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let log = dir.join("server.log");
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| e.to_string())?
        .port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let mut procs = Procs::default();
    let res = if kind == "plain" {
        check_plain(&dir, &log, addr, &mut procs)
    } else {
        check_upgrading(kind, &dir, &log, addr, &mut procs)
    };
    procs.kill_all();
    match &res {
        Ok(()) if std::env::var_os("PEERS_SMOKE_KEEP").is_none() => {
            let _ = std::fs::remove_dir_all(&dir);
        }
        Ok(()) => println!("--- {kind}: server log kept in {}", log.display()),
        Err(_) => {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(30).collect();
            println!("--- {kind}: last lines of {}", log.display());
            for l in tail.iter().rev() {
                println!("  {l}");
            }
        }
    }
    res
}

/// Starts `--serve kind --listen addr --pid-file pid_file extra…`; its stderr goes to `log`.
fn spawn_server(
    exe: &Path,
    kind: &str,
    addr: SocketAddr,
    pid_file: &Path,
    log: &Path,
    extra: &[&str],
    procs: &mut Procs,
) -> Result<u32, String> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| e.to_string())?;
    let child = Command::new(exe)
        .args(["--serve", kind, "--listen", &addr.to_string()])
        .arg("--pid-file")
        .arg(pid_file)
        .args(["--drain-timeout-ms", "30000"])
        .args(extra)
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or("info".into()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| format!("starting the {kind} server: {e}"))?;
    // Reaped by `Procs::reap`, not through `child`.
    procs.pids.push(child.id());
    Ok(child.id())
}

fn check_upgrading(
    kind: &str,
    dir: &Path,
    log: &Path,
    addr: SocketAddr,
    procs: &mut Procs,
) -> Result<(), String> {
    let pid_file = dir.join("pid");
    // The server runs as `dir/server`, a symlink to this binary, so that an upgrade can be
    // pointed at a broken binary (the libraries re-execute argv[0]).
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let link = dir.join("server");
    point(&link, &exe)?;
    let first = spawn_server(&link, kind, addr, &pid_file, log, &[], procs)?;
    let got = wait_for_pid(&pid_file, None)?;
    if got != first {
        return Err(format!("pid file names {got}, the server is {first}"));
    }
    let mut long = Client::connect(addr)?;
    long.echo("long-lived, first generation")?;
    short_echoes(addr, 5)?;

    // A failed upgrade: the new binary exits at once. The old process must go on serving, keep
    // its pid in the pid file, and upgrade fine on the next SIGHUP.
    let ran = dir.join("broken.ran");
    let broken = dir.join("broken.sh");
    std::fs::write(
        &broken,
        format!("#!/bin/sh\n: > '{}'\nexit 1\n", ran.display()),
    )
    .map_err(|e| e.to_string())?;
    std::fs::set_permissions(
        &broken,
        <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o755),
    )
    .map_err(|e| e.to_string())?;
    point(&link, &broken)?;
    signal(first, libc::SIGHUP);
    let deadline = Instant::now() + WAIT;
    while !ran.exists() {
        if Instant::now() >= deadline {
            return Err("the broken upgrade never ran".into());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    // Its exec is done: the link can point back. Give the old process time to see the failure.
    point(&link, &exe)?;
    std::thread::sleep(Duration::from_millis(700));
    if !alive(first) {
        return Err("a failed upgrade stopped the server".into());
    }
    if read_pid(&pid_file) != Some(first) {
        return Err(format!(
            "after a failed upgrade the pid file says {:?}, not {first}",
            read_pid(&pid_file)
        ));
    }
    long.echo("long-lived after a failed upgrade")?;
    short_echoes(addr, 5)?;

    let mut gens = vec![first];
    for round in 1..=2 {
        let old = *gens.last().unwrap();
        signal(old, libc::SIGHUP);
        let new = wait_for_pid(&pid_file, Some(old))
            .map_err(|e| format!("upgrade {round} of pid {old}: {e}"))?;
        procs.pids.push(new);
        gens.push(new);
        long.echo(&format!("long-lived after upgrade {round}"))?;
        short_echoes(addr, 10)?;
        // The old process stops accepting: it lets go of the listening socket.
        wait_released(old, addr.port()).map_err(|e| format!("after upgrade {round}: {e}"))?;
        if !alive(first) {
            return Err(format!(
                "pid {first} exited with a live connection (upgrade {round})"
            ));
        }
    }
    long.echo("long-lived, last line")?;
    drop(long);
    // The first generation drains and exits; the middle one had no connection left.
    procs.wait_gone(first, WAIT)?;
    procs.wait_gone(gens[1], WAIT)?;

    let newest = gens[2];
    stop_and_drain(newest, addr, procs)
}

fn check_plain(dir: &Path, log: &Path, addr: SocketAddr, procs: &mut Procs) -> Result<(), String> {
    let pid_file = dir.join("pid");
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let first = spawn_server(&exe, "plain", addr, &pid_file, log, &["--reuseport"], procs)?;
    let got = wait_for_pid(&pid_file, None)?;
    if got != first {
        return Err(format!("pid file names {got}, the server is {first}"));
    }
    let mut long = Client::connect(addr)?;
    long.echo("long-lived, first instance")?;
    short_echoes(addr, 5)?;

    // SIGHUP does nothing.
    signal(first, libc::SIGHUP);
    std::thread::sleep(Duration::from_millis(100));
    if !alive(first) {
        return Err("SIGHUP stopped the plain server".into());
    }
    long.echo("long-lived after SIGHUP")?;

    // Reuseport restart: a second instance on the same port, then SIGTERM the first.
    let pid_file2 = dir.join("pid2");
    let second = spawn_server(
        &exe,
        "plain",
        addr,
        &pid_file2,
        log,
        &["--reuseport"],
        procs,
    )?;
    let got = wait_for_pid(&pid_file2, None)?;
    if got != second {
        return Err(format!(
            "pid file names {got}, the second server is {second}"
        ));
    }
    signal(first, libc::SIGTERM);
    wait_released(first, addr.port())?;
    long.echo("long-lived while draining")?;
    short_echoes(addr, 10)?;
    if !alive(first) {
        return Err(format!("pid {first} exited with a live connection"));
    }
    drop(long);
    procs.wait_gone(first, WAIT)?;

    stop_and_drain(second, addr, procs)
}

/// SIGTERM `pid`, the only server left on `addr`, with a live connection: new connections must
/// be refused, the live one must keep echoing, and `pid` must exit 0 once it is closed.
fn stop_and_drain(pid: u32, addr: SocketAddr, procs: &mut Procs) -> Result<(), String> {
    let mut conn = Client::connect(addr)?;
    conn.echo("last connection")?;
    signal(pid, libc::SIGTERM);
    wait_refused(addr)?;
    conn.echo("last connection, draining")?;
    if !alive(pid) {
        return Err(format!("pid {pid} exited with a live connection"));
    }
    drop(conn);
    procs.wait_gone(pid, WAIT)
}

/// Points the symlink `link` at `target`, atomically (a new link renamed over it).
fn point(link: &Path, target: &Path) -> Result<(), String> {
    let tmp = link.with_extension("new");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp)
        .and_then(|_| std::fs::rename(&tmp, link))
        .map_err(|e| format!("symlink {}: {e}", link.display()))
}

/// A client connection with bounded reads and writes.
struct Client(TcpStream);

impl Client {
    fn connect(addr: SocketAddr) -> Result<Client, String> {
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .map_err(|e| format!("connect {addr}: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .and_then(|_| s.set_write_timeout(Some(Duration::from_secs(5))))
            .map_err(|e| e.to_string())?;
        Ok(Client(s))
    }

    /// Sends `text` and a newline; expects exactly that back.
    fn echo(&mut self, text: &str) -> Result<(), String> {
        let line = format!("{text}\n");
        self.0
            .write_all(line.as_bytes())
            .map_err(|e| format!("write {text:?}: {e}"))?;
        let mut got = vec![0u8; line.len()];
        self.0
            .read_exact(&mut got)
            .map_err(|e| format!("echo of {text:?}: {e}"))?;
        if got != line.as_bytes() {
            return Err(format!(
                "sent {line:?}, got {:?}",
                String::from_utf8_lossy(&got)
            ));
        }
        Ok(())
    }
}

/// `n` new connections, each echoing two lines.
fn short_echoes(addr: SocketAddr, n: usize) -> Result<(), String> {
    for i in 0..n {
        let mut c = Client::connect(addr)?;
        c.echo(&format!("short {i}, first line"))?;
        c.echo(&format!("short {i}, second line"))?;
    }
    Ok(())
}

/// Polls the pid file until it names a live process other than `old`.
fn wait_for_pid(path: &Path, old: Option<u32>) -> Result<u32, String> {
    scenario::wait_for_pid(path, old, WAIT).ok_or_else(|| {
        format!(
            "{} did not name a new live pid within {WAIT:?} (it says {:?})",
            path.display(),
            read_pid(path)
        )
    })
}

/// Inodes of the TCP sockets listening on `port` (any address).
fn listening_inodes(port: u16) -> HashSet<u64> {
    let mut out = HashSet::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // sl local rem st tx:rx tr:when retrnsmt uid timeout inode
            if f.len() < 10 || f[3] != "0A" {
                continue;
            }
            let local_port = f[1]
                .rsplit(':')
                .next()
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            if local_port == Some(port) {
                if let Ok(inode) = f[9].parse() {
                    out.insert(inode);
                }
            }
        }
    }
    out
}

/// Socket inodes among `pid`'s open descriptors.
fn socket_inodes(pid: u32) -> io::Result<HashSet<u64>> {
    let mut out = HashSet::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        let Ok(target) = std::fs::read_link(entry?.path()) else {
            continue;
        };
        let t = target.to_string_lossy();
        if let Some(n) = t.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']')) {
            if let Ok(n) = n.parse() {
                out.insert(n);
            }
        }
    }
    Ok(out)
}

/// Waits until `pid` holds no listening socket on `port` (it stopped accepting), or is gone.
fn wait_released(pid: u32, port: u16) -> Result<(), String> {
    let deadline = Instant::now() + WAIT;
    loop {
        let held = match socket_inodes(pid) {
            Ok(s) => s,
            Err(_) => return Ok(()),
        };
        if held.is_disjoint(&listening_inodes(port)) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "pid {pid} still holds the listener on port {port} after {WAIT:?}"
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits until connecting to `addr` is refused (nobody listens any more).
fn wait_refused(addr: SocketAddr) -> Result<(), String> {
    let deadline = Instant::now() + WAIT;
    loop {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => return Ok(()),
            // Still listening (or a transient error): close and retry.
            _ => {}
        }
        if Instant::now() >= deadline {
            return Err(format!("{addr} still accepts connections after {WAIT:?}"));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
