//! Process inspection and hygiene: `/proc/PID/stat`, children and zombies, reaping as a child
//! subreaper, signals to identified processes only, and [`ProcGuard`], which kills and reaps
//! whatever a test leaves alive.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::sync::{Mutex, Once, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

/// How often the waiting loops poll.
pub const POLL: Duration = Duration::from_millis(5);

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

    /// Fully gone (reaped by someone).
    pub fn gone(&self) -> bool {
        self.stat().is_none()
    }

    /// The wait status, if this test process reaped it (see [`reap_zombies`]).
    pub fn exit_status(&self) -> Option<i32> {
        reaped_statuses().lock().unwrap().get(self).copied()
    }

    /// The wait status, waiting up to `bound` for it to be recorded: another thread's
    /// [`reap_zombies`] may have reaped it (gone from /proc) and not recorded it yet. A record
    /// without a start time (its /proc entry was unreadable) counts for this pid.
    pub fn exit_status_within(&self, bound: Duration) -> Option<i32> {
        recorded_status(bound, |p| {
            p.pid == self.pid && (p.start == self.start || p.start == 0)
        })
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

/// The wait status of `pid`, a child of this process that [`reap_zombies`] (in any thread)
/// reaped, waiting up to `bound` for it to be recorded.
pub fn reaped_status_of(pid: i32, bound: Duration) -> Option<i32> {
    recorded_status(bound, |p| p.pid == pid)
}

/// The status [`reap_zombies`] recorded for a process that `matches`, waiting up to `bound`
/// for the record.
fn recorded_status(bound: Duration, matches: impl Fn(&Proc) -> bool) -> Option<i32> {
    let deadline = std::time::Instant::now() + bound;
    loop {
        let found = reaped_statuses()
            .lock()
            .unwrap()
            .iter()
            .find(|(p, _)| matches(p))
            .map(|(_, status)| *status);
        if found.is_some() || std::time::Instant::now() >= deadline {
            return found;
        }
        thread::sleep(Duration::from_millis(1));
    }
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
