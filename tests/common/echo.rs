//! [`EchoServer`]: a private copy of `target/<profile>/examples/echo` in a temp dir, started as
//! its own process group, upgraded with SIGHUP, stopped with SIGTERM, with its log at hand.

use std::fs;
use std::io;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::thread;
use std::time::{Duration, Instant};

use super::client::{connect, exchange, free_port};
use super::fs::{echo_binary, file_tail, replace_file, TempDir};
use super::proc::{
    all_procs, children_of, cmdline, ensure_subreaper, reap_zombies, signal, status_str,
    thread_dump, Proc, ProcGuard, Stat, POLL,
};
use super::spawn::{clean_command, spawn, writing_executable};

/// Bound for a server to write its pid file (start or upgrade).
pub const READY_BOUND: Duration = Duration::from_secs(10);
/// Bound for processes to exit once asked to.
pub const EXIT_BOUND: Duration = Duration::from_secs(15);

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
    /// Another server binary with the echo example's command-line contract (`--listen`,
    /// `--pid-file`, `--ready-timeout-ms`, `--drain-timeout-ms`, SIGHUP, SIGTERM), e.g.
    /// `example_binary("http")`; `None`: the echo example.
    pub binary: Option<PathBuf>,
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
            binary: None,
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
        let original = opts.binary.clone().unwrap_or_else(echo_binary);
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
        self.upgrade_with(libc::SIGHUP)
    }

    /// As [`EchoServer::upgrade`], triggered by `sig` (the server's `--upgrade-signal`).
    pub fn upgrade_with(&self, sig: libc::c_int) -> i32 {
        let old = self.current();
        assert!(
            old.alive(),
            "current generation {} is not alive before upgrade\n{}",
            old.describe(),
            self.log_tail()
        );
        let t0 = Instant::now();
        signal(old, sig);
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

    /// SIGTERMs the current generation; waits (bounded) for every tracked process to be gone;
    /// asserts exit code 0 for generation 0 (and for every other generation the test reaped).
    pub fn stop(mut self) {
        // Without a pid file the service was stopped already (by the test's own signal), and
        // removed it: wait for the processes below all the same.
        let cur = self.read_pid_file().map(|_| self.current());
        if let Some(cur) = cur {
            signal(cur, libc::SIGTERM);
        }
        let cur = cur.map_or(-1, |p| p.pid);
        let deadline = Instant::now() + EXIT_BOUND;
        loop {
            reap_zombies();
            if self.tracked().iter().all(|p| p.gone()) {
                break;
            }
            if Instant::now() >= deadline {
                panic!(
                    "after SIGTERM to {cur}, processes still exist after {EXIT_BOUND:?}: {}\n--- server log ---\n{}",
                    self.tracked().iter().filter(|p| !p.gone()).map(|p| p.describe()).collect::<Vec<_>>().join("; "),
                    self.log_tail()
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
        let mut bad = Vec::new();
        // The service stopped: no pid file is left to name a pid the kernel may reuse.
        if let Some(pid) = self.read_pid_file() {
            bad.push(format!("the pid file still names {pid} after the stop"));
        }
        match self.direct.exit_status_within(Duration::from_secs(2)) {
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
