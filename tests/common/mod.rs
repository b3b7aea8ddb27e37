//! Shared helpers for the process-level upgrade tests (`tests/upgrade.rs`).
//!
//! * process hygiene: the test process becomes a child subreaper, every pid it learns is tracked
//!   (with its start time, so a recycled pid is never signalled), and a guard SIGKILLs and reaps
//!   whatever is still alive when a server handle is dropped;
//! * [`EchoServer`]: runs a private copy of `target/debug/examples/echo` in a temp dir and drives
//!   upgrades, rollbacks and shutdown;
//! * [`Load`] and [`Burst`]: client load that counts every failure by kind.
//!
//! Only std + libc. Environment knobs:
//! * `RINGFLIP_ECHO_BIN=/path` overrides the echo binary (used to check the harness itself);
//! * `RINGFLIP_KEEP_TEMP=1` keeps the temp dirs (server log, scripts) for inspection.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::fs;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex, Once, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// How often the waiting loops poll.
pub const POLL: Duration = Duration::from_millis(5);
/// Bound for a server to write its pid file (start or upgrade).
pub const READY_BOUND: Duration = Duration::from_secs(10);
/// Bound for processes to exit once asked to.
pub const EXIT_BOUND: Duration = Duration::from_secs(15);
/// Hard cap for any load loop, whatever the stop flag says.
pub const LOAD_HARD_CAP: Duration = Duration::from_secs(120);

// ------------------------------------------------------------------------------------------------
// Process hygiene
// ------------------------------------------------------------------------------------------------

static SUBREAPER: Once = Once::new();

/// Makes the test process a child subreaper (idempotent). Orphaned descendants (old server
/// generations, their children) re-parent to the test process, which reaps them.
pub fn ensure_subreaper() {
    SUBREAPER.call_once(|| {
        // SAFETY: prctl with integer arguments only; no memory is passed.
        let r = unsafe {
            libc::prctl(
                libc::PR_SET_CHILD_SUBREAPER,
                1 as libc::c_ulong,
                0 as libc::c_ulong,
                0 as libc::c_ulong,
                0 as libc::c_ulong,
            )
        };
        assert_eq!(
            r,
            0,
            "prctl(PR_SET_CHILD_SUBREAPER): {}",
            io::Error::last_os_error()
        );
    });
}

/// The fields of `/proc/PID/stat` the tests care about.
#[derive(Clone, Debug)]
pub struct Stat {
    pub pid: i32,
    pub comm: String,
    pub state: char,
    pub ppid: i32,
    pub pgid: i32,
    /// Start time in clock ticks since boot: with the pid, identifies a process uniquely.
    pub start: u64,
}

/// Reads `/proc/PID/stat`; `None` if the process does not exist (any more).
pub fn proc_stat(pid: i32) -> Option<Stat> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text[open + 1..close].to_string();
    // After ") ": field 3 (state) is index 0, so field N is index N - 3.
    let rest: Vec<&str> = text[close + 1..].split_whitespace().collect();
    Some(Stat {
        pid,
        comm,
        state: rest.first()?.chars().next()?,
        ppid: rest.get(1)?.parse().ok()?,
        pgid: rest.get(2)?.parse().ok()?,
        start: rest.get(19)?.parse().ok()?,
    })
}

/// Every process on the machine (a snapshot of `/proc/*/stat`).
pub fn all_procs() -> Vec<Stat> {
    let mut out = Vec::new();
    if let Ok(rd) = fs::read_dir("/proc") {
        for e in rd.flatten() {
            if let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) {
                if let Some(st) = proc_stat(pid) {
                    out.push(st);
                }
            }
        }
    }
    out
}

/// The processes whose parent is `pid` (any state, zombies included).
pub fn children_of(pid: i32) -> Vec<Stat> {
    all_procs().into_iter().filter(|s| s.ppid == pid).collect()
}

/// Every thread of `pid`: tid, name, state, wait channel and kernel stack (root can read
/// it), for the message of a test that found the process stuck.
pub fn thread_dump(pid: i32) -> String {
    let mut out = String::new();
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return format!("{pid}: gone\n");
    };
    let mut tids: Vec<i32> = tasks
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    tids.sort();
    for tid in tids {
        let dir = format!("/proc/{pid}/task/{tid}");
        let read = |f: &str| fs::read_to_string(format!("{dir}/{f}")).unwrap_or_default();
        let state = read("stat")
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next().map(str::to_string))
            .unwrap_or_default();
        out += &format!(
            "thread {tid} {:?} state {state} wchan {}\n",
            read("comm").trim(),
            read("wchan").trim()
        );
        for line in read("stack").lines() {
            out += &format!("    {line}\n");
        }
    }
    // The rings' state: SQ/CQ heads and tails, pending completions, armed polls.
    if let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) {
        for e in fds.flatten() {
            let is_ring =
                fs::read_link(e.path()).is_ok_and(|l| l.to_string_lossy().contains("io_uring"));
            if is_ring {
                let fd = e.file_name().to_string_lossy().into_owned();
                let info = fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}"));
                out += &format!("io_uring fd {fd}:\n");
                for line in info.unwrap_or_default().lines().take(60) {
                    out += &format!("    {line}\n");
                }
            }
        }
    }
    out
}

/// The command line of a process, for messages.
pub fn cmdline(pid: i32) -> String {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            b.split(|&c| c == 0)
                .filter(|s| !s.is_empty())
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}

/// True if `pid` is a zombie (`Z`/`X`) or does not exist at all.
pub fn zombie_or_gone(pid: i32) -> bool {
    match proc_stat(pid) {
        None => true,
        Some(st) => matches!(st.state, 'Z' | 'X'),
    }
}

/// True if `pid` exists and is not a zombie.
pub fn pid_alive(pid: i32) -> bool {
    !zombie_or_gone(pid)
}

/// A process identified by pid and start time, so that a recycled pid is never mistaken for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Proc {
    pub pid: i32,
    pub start: u64,
}

impl Proc {
    /// Identifies the process currently running as `pid`, if there is one.
    pub fn of(pid: i32) -> Option<Proc> {
        proc_stat(pid).map(|st| Proc {
            pid,
            start: st.start,
        })
    }

    /// Our identified process, as it is now (`None` if gone or the pid was recycled).
    pub fn stat(&self) -> Option<Stat> {
        proc_stat(self.pid).filter(|st| st.start == self.start)
    }

    /// Exists and is not a zombie.
    pub fn alive(&self) -> bool {
        self.stat().is_some_and(|st| !matches!(st.state, 'Z' | 'X'))
    }

    /// Exists only as a zombie.
    pub fn zombie(&self) -> bool {
        self.stat().is_some_and(|st| matches!(st.state, 'Z' | 'X'))
    }

    /// Fully gone (reaped by someone).
    pub fn gone(&self) -> bool {
        self.stat().is_none()
    }

    /// The wait status, if this test process reaped it (see [`reap_zombies`]).
    pub fn exit_status(&self) -> Option<i32> {
        reaped_statuses().lock().unwrap().get(self).copied()
    }

    /// One-line description for messages.
    pub fn describe(&self) -> String {
        match self.stat() {
            None => match self.exit_status() {
                Some(s) => format!("{} (gone, reaped by the test: {})", self.pid, status_str(s)),
                None => format!("{} (gone)", self.pid),
            },
            Some(st) => format!(
                "{} (state {}, ppid {}, comm {:?}, cmdline {:?})",
                self.pid,
                st.state,
                st.ppid,
                st.comm,
                cmdline(self.pid)
            ),
        }
    }
}

fn reaped_statuses() -> &'static Mutex<HashMap<Proc, i32>> {
    static M: OnceLock<Mutex<HashMap<Proc, i32>>> = OnceLock::new();
    M.get_or_init(Default::default)
}

/// Renders a wait status.
pub fn status_str(status: i32) -> String {
    if libc::WIFEXITED(status) {
        format!("exit code {}", libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        format!("killed by signal {}", libc::WTERMSIG(status))
    } else {
        format!("wait status {status:#x}")
    }
}

/// Reaps every exited child of the test process (`waitpid(-1, WNOHANG)` in a loop) and records
/// each status under the child's identity (pid + start time, read before reaping).
/// Returns what it reaped.
pub fn reap_zombies() -> Vec<(Proc, i32)> {
    let mut out = Vec::new();
    loop {
        // Peek first (WNOWAIT) so the zombie's /proc entry still tells its start time.
        // SAFETY: a zeroed siginfo_t is a valid out-parameter for waitid.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: `info` is a valid, writable siginfo_t.
        let r = unsafe {
            libc::waitid(
                libc::P_ALL,
                0,
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            )
        };
        if r != 0 {
            break; // ECHILD: no children at all
        }
        // SAFETY: waitid filled in a SIGCHLD siginfo (or left it zeroed: pid 0).
        let pid = unsafe { info.si_pid() };
        if pid == 0 {
            break; // children exist, none has exited
        }
        let start = proc_stat(pid).map(|s| s.start).unwrap_or(0);
        let mut status = 0;
        // SAFETY: plain waitpid on a pid we were just told is our exited child.
        let got = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if got == pid {
            let p = Proc { pid, start };
            reaped_statuses().lock().unwrap().insert(p, status);
            out.push((p, status));
        } else {
            // Someone else (another thread) reaped it between the peek and here.
            thread::sleep(Duration::from_millis(1));
        }
    }
    out
}

/// Sends `sig` to `p` if (and only if) it is still that very process. Returns whether sent.
pub fn signal(p: Proc, sig: libc::c_int) -> bool {
    if p.stat().is_none() {
        return false;
    }
    // SAFETY: kill(2) with a positive pid: only the process we identified (start time checked
    // just above; the window for recycling is a few microseconds).
    unsafe { libc::kill(p.pid, sig) == 0 }
}

/// Tracks every pid a test learns; on drop, SIGKILLs what is still alive and reaps it.
#[derive(Debug, Default)]
pub struct ProcGuard {
    procs: Mutex<Vec<Proc>>,
    /// Process group of the initial server (it is started as a group leader): catches
    /// descendants the test never learned about (a stuck `sleep` from a rollback script...).
    pgid: Mutex<Option<i32>>,
}

impl ProcGuard {
    /// Starts tracking `pid` (identified by its current start time). Returns its identity.
    pub fn track(&self, pid: i32) -> Option<Proc> {
        let p = Proc::of(pid)?;
        let mut v = self.procs.lock().unwrap();
        if !v.contains(&p) {
            v.push(p);
        }
        Some(p)
    }

    /// Tracks an already identified process.
    pub fn track_proc(&self, p: Proc) {
        let mut v = self.procs.lock().unwrap();
        if !v.contains(&p) {
            v.push(p);
        }
    }

    pub fn set_pgid(&self, pgid: i32) {
        *self.pgid.lock().unwrap() = Some(pgid);
    }

    pub fn pgid(&self) -> Option<i32> {
        *self.pgid.lock().unwrap()
    }

    /// Every process tracked so far, in the order learned.
    pub fn tracked(&self) -> Vec<Proc> {
        self.procs.lock().unwrap().clone()
    }

    /// Finds the tracked identity of `pid`.
    pub fn find(&self, pid: i32) -> Option<Proc> {
        self.procs
            .lock()
            .unwrap()
            .iter()
            .rev()
            .find(|p| p.pid == pid)
            .copied()
    }

    /// Members of our process group that the guard does not track (still existing).
    pub fn strays(&self) -> Vec<Stat> {
        let Some(pgid) = self.pgid() else {
            return Vec::new();
        };
        let tracked = self.tracked();
        all_procs()
            .into_iter()
            .filter(|s| s.pgid == pgid)
            .filter(|s| !tracked.iter().any(|p| p.pid == s.pid && p.start == s.start))
            .collect()
    }

    /// SIGKILLs every tracked process still alive (and the server's process group), then reaps,
    /// bounded. Never signals anything by name, and never a recycled pid.
    pub fn kill_all(&self) {
        for p in self.tracked() {
            if p.alive() {
                signal(p, libc::SIGKILL);
            }
        }
        if let Some(pgid) = self.pgid() {
            // SAFETY: getpgrp has no preconditions.
            let own = unsafe { libc::getpgrp() };
            if pgid > 1 && pgid != own && all_procs().iter().any(|s| s.pgid == pgid) {
                // SAFETY: kill(2) on the process group the initial server leads (created by us
                // with setpgid; members checked to exist just above).
                unsafe { libc::kill(-pgid, libc::SIGKILL) };
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            reap_zombies();
            if self.tracked().iter().all(|p| p.gone()) {
                break;
            }
            thread::sleep(POLL);
        }
    }
}

impl Drop for ProcGuard {
    fn drop(&mut self) {
        self.kill_all();
    }
}

// ------------------------------------------------------------------------------------------------
// Temp dirs, ports, the binary
// ------------------------------------------------------------------------------------------------

/// A fresh directory under the system temp dir; removed on drop (unless `RINGFLIP_KEEP_TEMP`).
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let path = std::env::temp_dir().join(format!(
            "ringflip-{tag}-{}-{}-{nanos}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("RINGFLIP_KEEP_TEMP").is_some() {
            eprintln!("keeping {}", self.0.display());
        } else {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
}

/// A loopback address with a port that was free a moment ago (bind :0, read, drop).
pub fn free_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().unwrap()
}

/// `target/debug/examples/echo`, found from the test executable (`target/debug/deps/upgrade-*`),
/// or `$RINGFLIP_ECHO_BIN`.
pub fn echo_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("RINGFLIP_ECHO_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current_exe");
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("examples").join("echo"))
        .expect("test executable is not under target/<profile>/deps");
    if !bin.is_file() {
        panic!(
            "echo example binary not found at {}: run `cargo build --example echo` \
             (or `cargo test`, which builds examples)",
            bin.display()
        );
    }
    bin
}

/// `target/<profile>/examples/<name>`, found from the test executable like [`echo_binary`].
pub fn example_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("examples").join(name))
        .expect("test executable is not under target/<profile>/deps");
    if !bin.is_file() {
        panic!(
            "example binary not found at {}: run `cargo build --examples` first",
            bin.display()
        );
    }
    bin
}

/// Taken shared around every fork of the test process and exclusively while an executable is
/// open for writing. A child forked while another thread has a file open for writing holds
/// that fd until its own exec (close-on-exec acts only then), and exec of the file meanwhile
/// fails with ETXTBSY: seen as a failed spawn in one test while another wrote its binary.
static EXEC_WRITE: RwLock<()> = RwLock::new(());

/// Hold while spawning a child of the test process (see [`EXEC_WRITE`]).
pub fn forking() -> RwLockReadGuard<'static, ()> {
    EXEC_WRITE.read().unwrap_or_else(|e| e.into_inner())
}

/// Hold while an executable is open for writing (see [`EXEC_WRITE`]).
fn writing_executable() -> RwLockWriteGuard<'static, ()> {
    EXEC_WRITE.write().unwrap_or_else(|e| e.into_inner())
}

/// `cmd.spawn()` under [`forking`].
pub fn spawn(cmd: &mut Command) -> io::Result<std::process::Child> {
    let _forking = forking();
    cmd.spawn()
}

/// `cmd.output()`, spawned under [`forking`] (held only for the spawn, not the run).
pub fn output(cmd: &mut Command) -> io::Result<std::process::Output> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    spawn(cmd)?.wait_with_output()
}

/// Writes `contents` to `path` atomically: a new file beside it, then `rename` over `path`
/// (a running binary is never written into).
pub fn replace_file(path: &Path, contents: &[u8], mode: u32) {
    let tmp = path.with_extension("new");
    {
        let _no_fork = writing_executable();
        let mut f =
            fs::File::create(&tmp).unwrap_or_else(|e| panic!("create {}: {e}", tmp.display()));
        f.write_all(contents).unwrap();
        f.sync_all().ok();
    }
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode)).unwrap();
    fs::rename(&tmp, path).unwrap_or_else(|e| panic!("rename over {}: {e}", path.display()));
}

/// A `Command` that starts the child with only fds 0, 1 and 2: every other fd the test process
/// might have inherited is marked close-on-exec in the child before exec (close_range), so
/// nothing of the harness leaks into the server (std's own fds are all O_CLOEXEC already).
pub fn clean_command(program: &Path) -> Command {
    let mut cmd = Command::new(program);
    // SAFETY: the closure only makes one async-signal-safe syscall and ignores its result.
    unsafe {
        cmd.pre_exec(|| {
            libc::syscall(
                libc::SYS_close_range,
                3 as libc::c_uint,
                libc::c_uint::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            );
            Ok(())
        });
    }
    cmd
}

/// Waits, bounded, for a direct child of the test process to exit; reaps it. Returns its status.
pub fn wait_exit(p: Proc, bound: Duration) -> Option<i32> {
    let deadline = Instant::now() + bound;
    loop {
        reap_zombies();
        if let Some(s) = p.exit_status() {
            return Some(s);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(POLL);
    }
}

/// Last `max_bytes` of a file, as text.
pub fn file_tail(path: &Path, max_bytes: usize) -> String {
    match fs::read(path) {
        Err(e) => format!("<cannot read {}: {e}>", path.display()),
        Ok(b) => {
            let from = b.len().saturating_sub(max_bytes);
            let mut s = String::from_utf8_lossy(&b[from..]).into_owned();
            if from > 0 {
                if let Some(nl) = s.find('\n') {
                    s.drain(..=nl);
                }
                s.insert_str(0, "[...]\n");
            }
            s
        }
    }
}

// ------------------------------------------------------------------------------------------------
// The echo server
// ------------------------------------------------------------------------------------------------

/// Options for [`EchoServer::start`].
#[derive(Clone, Debug)]
pub struct EchoOpts {
    /// Number of `--listen` addresses (each a fresh loopback port).
    pub listeners: usize,
    pub ready_timeout_ms: Option<u64>,
    pub drain_timeout_ms: Option<u64>,
    pub extra_args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// `RLIMIT_NOFILE` (soft and hard) for generation 0, set in the child before exec (its
    /// successors inherit it). `None`: inherit the test process's limit.
    pub nofile: Option<u64>,
    /// Deploy by symlink: two copies of the echo binary, `releases/v1/echo` and
    /// `releases/v2/echo`, and `current -> releases/v1`; the server is started as
    /// `./current/echo` (relative `argv[0]`, working directory the temp dir). Flip with
    /// [`EchoServer::flip_current`].
    pub symlink_deploy: bool,
}

impl Default for EchoOpts {
    fn default() -> Self {
        EchoOpts {
            listeners: 1,
            ready_timeout_ms: None,
            drain_timeout_ms: None,
            extra_args: Vec::new(),
            env: Vec::new(),
            nofile: None,
            symlink_deploy: false,
        }
    }
}

/// A running echo server (all its generations), with its private temp dir.
///
/// Field order matters for drop: the guard kills processes before the temp dir goes.
#[derive(Debug)]
pub struct EchoServer {
    guard: ProcGuard,
    /// The process the test spawned (generation 0): the only one whose status is guaranteed to
    /// reach the test.
    direct: Proc,
    addrs: Vec<SocketAddr>,
    /// Copy of the echo binary that the server is started from (and re-executes).
    bin: PathBuf,
    original: PathBuf,
    pid_file: PathBuf,
    log: PathBuf,
    stopped: bool,
    dir: TempDir,
}

impl EchoServer {
    pub fn start(opts: EchoOpts) -> EchoServer {
        ensure_subreaper();
        let original = echo_binary();
        let dir = TempDir::new("echo");
        let bin = if opts.symlink_deploy {
            for release in ["v1", "v2"] {
                fs::create_dir_all(dir.path().join("releases").join(release)).unwrap();
            }
            std::os::unix::fs::symlink("releases/v1", dir.path().join("current")).unwrap();
            dir.path().join("releases/v1/echo")
        } else {
            dir.path().join("echo")
        };
        {
            let _no_fork = writing_executable();
            let mut copies = vec![bin.clone()];
            if opts.symlink_deploy {
                copies.push(dir.path().join("releases/v2/echo"));
            }
            for copy in copies {
                fs::copy(&original, &copy).unwrap_or_else(|e| {
                    panic!("copy {} -> {}: {e}", original.display(), copy.display())
                });
            }
        }
        let pid_file = dir.path().join("echo.pid");
        let log = dir.path().join("server.log");
        let addrs: Vec<SocketAddr> = (0..opts.listeners.max(1)).map(|_| free_port()).collect();

        let mut cmd = if opts.symlink_deploy {
            let mut cmd = clean_command(&dir.path().join("current/echo"));
            cmd.arg0("./current/echo");
            cmd
        } else {
            clean_command(&bin)
        };
        for a in &addrs {
            cmd.arg("--listen").arg(a.to_string());
        }
        cmd.arg("--pid-file").arg(&pid_file);
        if let Some(ms) = opts.ready_timeout_ms {
            cmd.arg("--ready-timeout-ms").arg(ms.to_string());
        }
        if let Some(ms) = opts.drain_timeout_ms {
            cmd.arg("--drain-timeout-ms").arg(ms.to_string());
        }
        cmd.args(&opts.extra_args);
        // Plain-text logs in the log file (tracing-subscriber colours by default).
        cmd.env("NO_COLOR", "1");
        for (k, v) in &opts.env {
            cmd.env(k, v);
        }
        if let Some(n) = opts.nofile {
            let lim = libc::rlimit {
                rlim_cur: n as libc::rlim_t,
                rlim_max: n as libc::rlim_t,
            };
            // SAFETY: the closure makes one async-signal-safe syscall on a copied struct.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                        return Err(io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let logf = fs::File::create(&log).expect("create server log");
        cmd.stdin(Stdio::null())
            .stdout(logf.try_clone().expect("dup log fd"))
            .stderr(logf)
            .current_dir(dir.path())
            .process_group(0);
        let child = spawn(&mut cmd).unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
        let pid = child.id() as i32;
        drop(child); // std's Child neither kills nor waits on drop; we reap ourselves.

        let guard = ProcGuard::default();
        guard.set_pgid(pid);
        let direct = match guard.track(pid) {
            Some(p) => p,
            None => {
                // Exited (and not yet reaped) before we could read its start time: impossible,
                // an unreaped zombie still has /proc/PID/stat.
                panic!("server pid {pid} vanished right after spawn");
            }
        };
        let server = EchoServer {
            guard,
            direct,
            addrs,
            bin,
            original,
            pid_file,
            log,
            stopped: false,
            dir,
        };

        let deadline = Instant::now() + READY_BOUND;
        loop {
            if let Some(p) = server.read_pid_file() {
                assert_eq!(
                    p,
                    pid,
                    "pid file names {p}, but the process started is {pid}\n{}",
                    server.log_tail()
                );
                break;
            }
            if let Some(s) = {
                reap_zombies();
                direct.exit_status()
            } {
                panic!(
                    "echo server exited before writing its pid file: {}\n--- server log ---\n{}",
                    status_str(s),
                    server.log_tail()
                );
            }
            if Instant::now() >= deadline {
                panic!(
                    "echo server (pid {pid}) wrote no pid file within {READY_BOUND:?}\n--- server log ---\n{}",
                    server.log_tail()
                );
            }
            thread::sleep(POLL);
        }
        server
    }

    /// The first listen address.
    pub fn addr(&self) -> SocketAddr {
        self.addrs[0]
    }

    pub fn addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn bin_path(&self) -> &Path {
        &self.bin
    }

    pub fn guard(&self) -> &ProcGuard {
        &self.guard
    }

    /// Generation 0, the process the test spawned.
    pub fn initial(&self) -> Proc {
        self.direct
    }

    /// The pid file's content, if present and parseable.
    pub fn read_pid_file(&self) -> Option<i32> {
        fs::read_to_string(&self.pid_file).ok()?.trim().parse().ok()
    }

    /// The current generation's pid (from the pid file).
    pub fn pid(&self) -> i32 {
        self.read_pid_file()
            .unwrap_or_else(|| panic!("pid file {} missing or unreadable", self.pid_file.display()))
    }

    /// The current generation, identified (tracked).
    pub fn current(&self) -> Proc {
        let pid = self.pid();
        self.guard
            .find(pid)
            .or_else(|| self.guard.track(pid))
            .unwrap_or_else(|| panic!("current pid {pid} does not exist\n{}", self.log_tail()))
    }

    /// Every process learned so far (initial + each pid read from the pid file).
    pub fn tracked(&self) -> Vec<Proc> {
        self.guard.tracked()
    }

    /// SIGHUPs the current generation; waits (bounded) for the pid file to name a different,
    /// live pid; tracks and returns it.
    pub fn upgrade(&self) -> i32 {
        let old = self.current();
        assert!(
            old.alive(),
            "current generation {} is not alive before upgrade\n{}",
            old.describe(),
            self.log_tail()
        );
        let t0 = Instant::now();
        signal(old, libc::SIGHUP);
        let deadline = t0 + READY_BOUND;
        loop {
            reap_zombies();
            let old_alive = old.alive();
            if let Some(p) = self.read_pid_file() {
                if p != old.pid {
                    if let Some(newp) = Proc::of(p) {
                        if newp.alive() {
                            self.guard.track_proc(newp);
                            return p;
                        }
                    }
                }
            }
            if !old_alive && self.read_pid_file() == Some(old.pid) {
                panic!(
                    "old generation {} died during upgrade without a successor\n--- server log ---\n{}",
                    old.describe(),
                    self.log_tail()
                );
            }
            if Instant::now() >= deadline {
                panic!(
                    "upgrade of {} did not complete within {READY_BOUND:?} (pid file: {:?}); \
                     children of old: {:?}\n--- threads of the old process ---\n{}\
                     --- server log ---\n{}",
                    old.describe(),
                    self.read_pid_file(),
                    children_of(old.pid)
                        .iter()
                        .map(|s| (s.pid, s.state, s.comm.clone()))
                        .collect::<Vec<_>>(),
                    thread_dump(old.pid),
                    self.log_tail()
                );
            }
            thread::sleep(POLL);
        }
    }

    /// SIGHUPs the current generation, waits `wait`, and asserts the upgrade was rolled back:
    /// the pid file never changed and the old process is alive.
    pub fn upgrade_expect_rollback(&self, wait: Duration) {
        let old = self.current();
        signal(old, libc::SIGHUP);
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline {
            reap_zombies();
            let now = self.read_pid_file();
            if now != Some(old.pid) {
                if let Some(p) = now {
                    self.guard.track(p);
                }
                panic!(
                    "expected a rollback, but the pid file changed from {} to {now:?}\n--- server log ---\n{}",
                    old.pid,
                    self.log_tail()
                );
            }
            assert!(
                old.alive(),
                "expected a rollback, but the old generation {} died\n--- server log ---\n{}",
                old.describe(),
                self.log_tail()
            );
            thread::sleep(POLL);
        }
        assert_eq!(
            self.read_pid_file(),
            Some(old.pid),
            "pid file changed\n{}",
            self.log_tail()
        );
        assert!(
            old.alive(),
            "old generation {} died\n{}",
            old.describe(),
            self.log_tail()
        );
    }

    /// Waits (bounded) until the current generation has no child processes at all (no failed
    /// upgrade child left running, no zombie). Panics listing them otherwise.
    pub fn assert_no_children(&self, bound: Duration) {
        let cur = self.current();
        let deadline = Instant::now() + bound;
        loop {
            reap_zombies();
            let kids = children_of(cur.pid);
            if kids.is_empty() {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "server {} still has children after {bound:?}: {}\n--- server log ---\n{}",
                    cur.pid,
                    kids.iter()
                        .map(|s| format!(
                            "pid {} state {} comm {:?} cmdline {:?}",
                            s.pid,
                            s.state,
                            s.comm,
                            cmdline(s.pid)
                        ))
                        .collect::<Vec<_>>()
                        .join("; "),
                    self.log_tail()
                );
            }
            thread::sleep(POLL);
        }
    }

    /// Asserts that no process of the server's process group exists besides the tracked server
    /// generations, and that no zombie is left among the children of the test process or of
    /// any live tracked generation (reaping first).
    pub fn assert_no_strays(&self, bound: Duration) {
        let deadline = Instant::now() + bound;
        loop {
            reap_zombies();
            let strays = self.guard.strays();
            let mut zombies: Vec<Stat> = Vec::new();
            let me = std::process::id() as i32;
            for s in all_procs() {
                if matches!(s.state, 'Z' | 'X')
                    && (s.ppid == me || self.tracked().iter().any(|p| p.pid == s.ppid && p.alive()))
                {
                    zombies.push(s);
                }
            }
            if strays.is_empty() && zombies.is_empty() {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "stray processes: {:?}\nzombies: {:?}\n--- server log ---\n{}",
                    strays
                        .iter()
                        .map(|s| (s.pid, s.state, s.ppid, s.comm.clone(), cmdline(s.pid)))
                        .collect::<Vec<_>>(),
                    zombies
                        .iter()
                        .map(|s| (s.pid, s.ppid, s.comm.clone()))
                        .collect::<Vec<_>>(),
                    self.log_tail()
                );
            }
            thread::sleep(POLL);
        }
    }

    /// Waits (bounded), reaping as subreaper, until every listed pid is fully gone.
    pub fn assert_gone(&self, pids: &[i32], bound: Duration) {
        let procs: Vec<Proc> = pids
            .iter()
            .map(|&pid| {
                self.guard
                    .find(pid)
                    .unwrap_or_else(|| panic!("pid {pid} was never tracked"))
            })
            .collect();
        let deadline = Instant::now() + bound;
        loop {
            reap_zombies();
            let left: Vec<&Proc> = procs.iter().filter(|p| !p.gone()).collect();
            if left.is_empty() {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "old generations still exist after {bound:?}: {}\n--- server log ---\n{}",
                    left.iter()
                        .map(|p| p.describe())
                        .collect::<Vec<_>>()
                        .join("; "),
                    self.log_tail()
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Replaces the binary on disk (new file + rename) with a script.
    pub fn replace_binary_with_script(&self, text: &str) {
        replace_file(&self.bin, text.as_bytes(), 0o755);
    }

    /// Puts the real echo binary back (new file + rename).
    pub fn restore_binary(&self) {
        let data = fs::read(&self.original)
            .unwrap_or_else(|e| panic!("read {}: {e}", self.original.display()));
        replace_file(&self.bin, &data, 0o755);
    }

    /// Symlink deploy ([`EchoOpts::symlink_deploy`]): points `current` at `releases/<release>`
    /// (a new symlink renamed over the old one, as deploy tools do).
    pub fn flip_current(&self, release: &str) {
        let tmp = self.dir().join("current.new");
        let _ = fs::remove_file(&tmp);
        std::os::unix::fs::symlink(format!("releases/{release}"), &tmp).unwrap();
        fs::rename(&tmp, self.dir().join("current")).unwrap();
    }

    /// Removes the binary the server re-executes.
    pub fn remove_binary(&self) {
        fs::remove_file(&self.bin).unwrap_or_else(|e| panic!("remove {}: {e}", self.bin.display()));
    }

    /// Opens a connection to `addr` and checks one echoed line; panics with the log tail if not.
    pub fn open_conn(&self, addr: SocketAddr, line: &str) -> TcpStream {
        let t = Duration::from_secs(2);
        connect(addr, t, t)
            .and_then(|mut s| exchange(&mut s, line).map(|_| s))
            .unwrap_or_else(|f| {
                panic!(
                    "echo via {addr} failed: {f:?}\n--- server log ---\n{}",
                    self.log_tail()
                )
            })
    }

    /// `(fd, flags)` for every fd of `pid`, from `/proc/PID/fdinfo/FD` (`flags:` is octal).
    pub fn fds_of(&self, pid: i32) -> Vec<(i32, u32)> {
        fds_of(pid)
    }

    /// SIGTERMs the current generation; waits (bounded) for every tracked process to be gone;
    /// asserts exit code 0 for generation 0 (and for every other generation the test reaped).
    pub fn stop(mut self) {
        let cur = self.current();
        signal(cur, libc::SIGTERM);
        let deadline = Instant::now() + EXIT_BOUND;
        loop {
            reap_zombies();
            if self.tracked().iter().all(|p| p.gone()) {
                break;
            }
            if Instant::now() >= deadline {
                panic!(
                    "after SIGTERM to {}, processes still exist after {EXIT_BOUND:?}: {}\n--- server log ---\n{}",
                    cur.pid,
                    self.tracked().iter().filter(|p| !p.gone()).map(|p| p.describe()).collect::<Vec<_>>().join("; "),
                    self.log_tail()
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
        let mut bad = Vec::new();
        match self.direct.exit_status() {
            None => bad.push(format!(
                "generation 0 (pid {}): status never observed",
                self.direct.pid
            )),
            Some(s) if libc::WIFEXITED(s) && libc::WEXITSTATUS(s) == 0 => {}
            Some(s) => bad.push(format!(
                "generation 0 (pid {}): {}",
                self.direct.pid,
                status_str(s)
            )),
        }
        for p in self.tracked() {
            if p == self.direct {
                continue;
            }
            if let Some(s) = p.exit_status() {
                if !(libc::WIFEXITED(s) && libc::WEXITSTATUS(s) == 0) {
                    bad.push(format!("pid {}: {}", p.pid, status_str(s)));
                }
            }
        }
        self.stopped = true;
        assert!(
            bad.is_empty(),
            "bad exit statuses: {bad:?}\n--- server log ---\n{}",
            self.log_tail()
        );
    }

    /// The last ~8 KiB of the server's log (stdout + stderr of every generation).
    pub fn log_tail(&self) -> String {
        file_tail(&self.log, 8192)
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Waits (polling every 10 ms, at most `bound`) until the server's log contains `needle`;
    /// panics with `what` and the log's tail otherwise. For events that another process logs
    /// at its own pace: a test waits for the event, never for a guessed delay.
    pub fn wait_for_log(&self, needle: &str, bound: Duration, what: &str) {
        let deadline = Instant::now() + bound;
        loop {
            if std::fs::read_to_string(&self.log).is_ok_and(|log| log.contains(needle)) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: no \"{needle}\" in the log within {bound:?}\n--- server log ---\n{}",
                self.log_tail()
            );
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!(
                "--- echo server {} (dir {}) ---\ntracked: {}\n--- server log tail ---\n{}",
                self.addrs[0],
                self.dir.path().display(),
                self.tracked()
                    .iter()
                    .map(|p| p.describe())
                    .collect::<Vec<_>>()
                    .join("; "),
                self.log_tail()
            );
        }
        // Before the temp dir goes (fields drop after this body): kill what is left.
        self.guard.kill_all();
        let _ = self.stopped;
    }
}

/// `(fd, flags)` for every fd of `pid`, from `/proc/PID/fdinfo/FD`, sorted by fd.
pub fn fds_of(pid: i32) -> Vec<(i32, u32)> {
    let mut out = Vec::new();
    let rd = fs::read_dir(format!("/proc/{pid}/fdinfo"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/fdinfo: {e}"));
    for e in rd.flatten() {
        let Some(fd) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(text) = fs::read_to_string(e.path()) else {
            continue;
        }; // closed meanwhile
        let flags = text
            .lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
            .unwrap_or_else(|| panic!("no flags: line in /proc/{pid}/fdinfo/{fd}: {text:?}"));
        out.push((fd, flags));
    }
    out.sort();
    out
}

/// What fd `fd` of `pid` refers to (`readlink /proc/PID/fd/FD`).
pub fn fd_target(pid: i32, fd: i32) -> String {
    fs::read_link(format!("/proc/{pid}/fd/{fd}"))
        .map(|p| p.display().to_string())
        .unwrap_or_else(|e| format!("<{e}>"))
}

// ------------------------------------------------------------------------------------------------
// Client load
// ------------------------------------------------------------------------------------------------

/// How a client exchange failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FailKind {
    /// Connection refused.
    Refused,
    /// Reset / broken pipe / aborted.
    Reset,
    /// The server closed before the whole reply arrived.
    EofBeforeReply,
    /// Connect, write or read timed out.
    Timeout,
    /// The reply was not the line sent.
    WrongReply,
    /// Anything else (e.g. EADDRNOTAVAIL).
    Other,
}

const KINDS: [FailKind; 6] = [
    FailKind::Refused,
    FailKind::Reset,
    FailKind::EofBeforeReply,
    FailKind::Timeout,
    FailKind::WrongReply,
    FailKind::Other,
];

fn kind_index(k: FailKind) -> usize {
    KINDS.iter().position(|&x| x == k).unwrap()
}

/// Maps an io error to a failure kind.
pub fn classify(e: &io::Error) -> FailKind {
    use io::ErrorKind::*;
    match e.kind() {
        ConnectionRefused => FailKind::Refused,
        ConnectionReset | ConnectionAborted | BrokenPipe => FailKind::Reset,
        TimedOut | WouldBlock => FailKind::Timeout,
        UnexpectedEof => FailKind::EofBeforeReply,
        _ => FailKind::Other,
    }
}

/// A failed exchange: kind and message.
pub type Failure = (FailKind, String);

/// Connects (bounded), then does one [`exchange`].
pub fn connect(
    addr: SocketAddr,
    connect_timeout: Duration,
    io_timeout: Duration,
) -> Result<TcpStream, Failure> {
    let s = TcpStream::connect_timeout(&addr, connect_timeout)
        .map_err(|e| (classify(&e), format!("connect: {e}")))?;
    s.set_read_timeout(Some(io_timeout))
        .map_err(|e| (FailKind::Other, format!("set_read_timeout: {e}")))?;
    s.set_write_timeout(Some(io_timeout))
        .map_err(|e| (FailKind::Other, format!("set_write_timeout: {e}")))?;
    s.set_nodelay(true).ok();
    Ok(s)
}

/// Writes `line` (which ends in `\n`) and reads until the echoed line is back; checks it.
pub fn exchange(s: &mut TcpStream, line: &str) -> Result<(), Failure> {
    send_line(s, line)?;
    recv_line(s, line)
}

/// Writes `line` whole.
pub fn send_line(s: &mut TcpStream, line: &str) -> Result<(), Failure> {
    s.write_all(line.as_bytes())
        .map_err(|e| (classify(&e), format!("write {line:?}: {e}")))
}

/// Reads one reply line and checks it is exactly `line` (nothing more, nothing less).
pub fn recv_line(s: &mut TcpStream, line: &str) -> Result<(), Failure> {
    let want = line.as_bytes();
    let mut got: Vec<u8> = Vec::with_capacity(want.len());
    let mut buf = [0u8; 512];
    while got.len() < want.len() && !got.contains(&b'\n') {
        match s.read(&mut buf) {
            Ok(0) => {
                return Err((
                    FailKind::EofBeforeReply,
                    format!(
                        "EOF after {} of {} reply bytes for {line:?}",
                        got.len(),
                        want.len()
                    ),
                ))
            }
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Err((
                    classify(&e),
                    format!("read reply to {line:?} (got {} bytes): {e}", got.len()),
                ))
            }
        }
    }
    if got != want {
        return Err((
            FailKind::WrongReply,
            format!("sent {line:?}, got {:?}", String::from_utf8_lossy(&got)),
        ));
    }
    Ok(())
}

/// Connect + one line + close.
pub fn echo_once(
    addr: SocketAddr,
    line: &str,
    connect_timeout: Duration,
    io_timeout: Duration,
) -> Result<(), Failure> {
    let mut s = connect(addr, connect_timeout, io_timeout)?;
    exchange(&mut s, line)
}

static LOAD_IDS: AtomicU64 = AtomicU64::new(0);
const MAX_KEPT_ERRORS: usize = 10;

#[derive(Debug, Default)]
struct Counters {
    ok: AtomicU64,
    fails: [AtomicU64; 6],
    pings_ok: AtomicU64,
    pings_failed: AtomicU64,
    first_errors: Mutex<Vec<String>>,
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
    pub elapsed: Duration,
}

impl LoadReport {
    pub fn failures(&self) -> u64 {
        self.failures_by_kind.values().sum()
    }

    /// Panics with the report if anything failed, or if nothing was exercised at all.
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
    started: Instant,
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

        // Long-lived connections: opened (and checked with one ping) before returning. Pipelined
        // (all connect, all write, then all read) so a hung server costs one timeout, not 16.
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

        for t in 0..o.closed_loop_threads {
            let stop = stop.clone();
            let c = counters.clone();
            let o = o.clone();
            threads.push(
                thread::Builder::new()
                    .name(format!("closed-loop-{t}"))
                    .spawn(move || {
                        let mut seq = 0u64;
                        while !stop.load(Ordering::Relaxed) && started.elapsed() < LOAD_HARD_CAP {
                            seq += 1;
                            let line = format!("L{id}-t{t}-{seq}\n");
                            match echo_once(addr, &line, o.connect_timeout, o.io_timeout) {
                                Ok(()) => {
                                    c.ok.fetch_add(1, Ordering::Relaxed);
                                }
                                Err(f) => {
                                    c.fail(&format!("closed-loop t{t} #{seq}"), f);
                                    // Don't spin on a dead server.
                                    thread::sleep(Duration::from_millis(10));
                                }
                            }
                            if !o.pause.is_zero() {
                                thread::sleep(o.pause);
                            }
                        }
                    })
                    .expect("spawn closed-loop thread"),
            );
        }
        Load {
            stop,
            counters,
            threads,
            started,
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
            elapsed: self.started.elapsed(),
        }
    }

    /// Stops every thread (bounded: each op has a timeout), closes the long-lived connections,
    /// and returns the report.
    pub fn stop(mut self) -> LoadReport {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            t.join().expect("load thread panicked");
        }
        self.snapshot()
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Result of a [`Burst`].
#[derive(Clone, Debug, Default)]
pub struct BurstReport {
    pub ok: u64,
    pub failures_by_kind: BTreeMap<FailKind, u64>,
    pub first_errors: Vec<String>,
    /// From release to the last thread done.
    pub elapsed: Duration,
}

impl BurstReport {
    pub fn failures(&self) -> u64 {
        self.failures_by_kind.values().sum()
    }

    pub fn assert_clean(&self) {
        assert!(self.failures() == 0, "burst saw failures:\n{self}");
    }
}

impl fmt::Display for BurstReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "burst: ok {}, failed {} {:?} in {:?}",
            self.ok,
            self.failures(),
            self.failures_by_kind,
            self.elapsed
        )?;
        for e in &self.first_errors {
            writeln!(f, "  {e}")?;
        }
        Ok(())
    }
}

/// `n` threads that connect at the same moment (a barrier), echo one line each, and close.
/// Timeouts are 5 s: with hundreds of simultaneous SYNs a dropped SYN is retransmitted after
/// 1 s, which is slow but not a lost connection.
#[derive(Debug)]
pub struct Burst {
    barrier: Arc<Barrier>,
    counters: Arc<Counters>,
    threads: Vec<JoinHandle<()>>,
    released: Option<Instant>,
}

impl Burst {
    pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
    pub const IO_TIMEOUT: Duration = Duration::from_secs(5);

    /// Spawns the `n` threads; they wait on the barrier until [`Burst::release`].
    pub fn prepare(addr: SocketAddr, n: usize) -> Burst {
        let id = LOAD_IDS.fetch_add(1, Ordering::Relaxed);
        let barrier = Arc::new(Barrier::new(n + 1));
        let counters = Arc::new(Counters::default());
        let threads = (0..n)
            .map(|i| {
                let b = barrier.clone();
                let c = counters.clone();
                thread::Builder::new()
                    .name(format!("burst-{i}"))
                    .stack_size(64 * 1024)
                    .spawn(move || {
                        b.wait();
                        match echo_once(
                            addr,
                            &format!("B{id}-{i}\n"),
                            Burst::CONNECT_TIMEOUT,
                            Burst::IO_TIMEOUT,
                        ) {
                            Ok(()) => {
                                c.ok.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(f) => c.fail(&format!("burst #{i}"), f),
                        }
                    })
                    .expect("spawn burst thread")
            })
            .collect();
        Burst {
            barrier,
            counters,
            threads,
            released: None,
        }
    }

    /// Lets every thread go (returns once they all are at the barrier).
    pub fn release(&mut self) {
        self.barrier.wait();
        self.released = Some(Instant::now());
    }

    /// Waits for every thread (each bounded by its timeouts).
    pub fn join(mut self) -> BurstReport {
        if self.released.is_none() {
            self.release();
        }
        for t in self.threads.drain(..) {
            t.join().expect("burst thread panicked");
        }
        BurstReport {
            ok: self.counters.ok.load(Ordering::Relaxed),
            failures_by_kind: self.counters.by_kind(),
            first_errors: self.counters.first_errors.lock().unwrap().clone(),
            elapsed: self.released.map(|t| t.elapsed()).unwrap_or_default(),
        }
    }
}

/// `n` simultaneous connect+echo+close; returns the report.
pub fn burst(addr: SocketAddr, n: usize) -> BurstReport {
    let mut b = Burst::prepare(addr, n);
    b.release();
    b.join()
}

/// Distinct fds as a set, for messages and comparisons.
pub fn fd_set(fds: &[(i32, u32)]) -> BTreeSet<i32> {
    fds.iter().map(|&(fd, _)| fd).collect()
}
