//! `systemctl reload` under a real systemd, with `examples/systemd/echo.service` (`Type=notify`,
//! `NotifyAccess=all`, `ExecReload=ringflip-ctl … upgrade`).
//!
//! Each test boots its own systemd as PID 1 of new PID, mount, UTS and cgroup namespaces
//! (`unshare --pid --fork --mount --uts --cgroup --propagation private --mount-proc`), with
//! `container=ringflip-test` in its environment, a tmpfs on its /run, a cgroup2 mounted on its
//! /sys/fs/cgroup whose root is a fresh child of the test's own cgroup, /dev/console bound to a
//! file, and `--unit=ringflip-test.target` (an empty target: nothing of the host's units is
//! started; the echo unit gets `DefaultDependencies=no`, so starting it pulls in nothing else).
//! The network namespace is the host's: the test connects to the service on loopback. The
//! unit file is written to that systemd's /run/systemd/system (through /proc/PID/root) and
//! `systemctl` runs inside with `nsenter -t PID -m -p`. The test ends the namespace with SIGKILL
//! to its PID 1 (every process in it dies with it) and removes the cgroup.
//!
//! What systemd (252) does, as these tests pin it down:
//! - a reload whose upgrade succeeds exits 0 and MainPID is the new process;
//! - a reload whose upgrade fails exits 1 (`ReloadResult=exit-code`); MainPID and the service
//!   stay;
//! - a reload refused as busy (too many generations still draining) exits 1 at once;
//! - a reload while an upgrade started otherwise (SIGHUP) is in flight does *not* reach
//!   ringflip's busy answer: the service said `RELOADING=1`, the unit is "reloading", and systemd
//!   holds the reload job until `READY=1` ends that upgrade, then runs `ExecReload=`, which starts
//!   an upgrade of its own. Two `systemctl reload`s at once are merged the same way: the second
//!   joins the running job, which runs `ExecReload=` once more, and both wait for that. Bounded
//!   by the service's ready timeout per upgrade, never a hang;
//! - `TimeoutStartSec=` bounds the `ExecReload=` process (killed at the timeout,
//!   `ReloadResult=timeout`), but not `systemctl reload` itself: the unit stays "reloading" (the
//!   service said `RELOADING=1`) until the service's `READY=1`, which ringflip sends when the new
//!   process is ready or the upgrade failed (its ready timeout); the reload then fails, even
//!   when the upgrade succeeded.
//!
//! Skipped (with a message) without root or without the tools (systemd, systemctl, unshare,
//! nsenter, a cgroup2 mount); under `CI` that is a failure instead. `RINGFLIP_CTL_BIN=/path`
//! replaces `ringflip-ctl` in `ExecReload=` (to check that these tests fail with a client that
//! always exits 0).

mod common;

use std::fs;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::{
    clean_command, connect, echo_binary, echo_once, example_binary, exchange, file_tail, free_port,
    replace_file, Load, TempDir,
};

/// Bound for any one `systemctl` call: past it the test fails as "hung".
const SYSTEMCTL_BOUND: Duration = Duration::from_secs(60);
/// What "at once" means for a reload that fails or is refused (each takes well under 100 ms).
const PROMPT: Duration = Duration::from_secs(5);
/// Bound for systemd to boot, and for the namespace to go away.
const BOOT_BOUND: Duration = Duration::from_secs(20);

const UNIT: &str = "echo.service";

// ---------------------------------------------------------------------------------------------
// Tools

struct Tools {
    systemd: PathBuf,
    systemctl: PathBuf,
    unshare: PathBuf,
    nsenter: PathBuf,
    /// Where the new cgroup goes: the test's own cgroup in the cgroup2 hierarchy.
    cgroup_parent: PathBuf,
}

fn in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/bin", "/bin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// The cgroup2 mount point joined with this process's cgroup2 path.
fn cgroup2_parent() -> Option<PathBuf> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").ok()?;
    let mount = mountinfo.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        (right.split_whitespace().next()? == "cgroup2")
            .then(|| left.split_whitespace().nth(4).map(PathBuf::from))?
    })?;
    let own = fs::read_to_string("/proc/self/cgroup").ok()?;
    let rel = own.lines().find_map(|l| l.strip_prefix("0::"))?;
    Some(mount.join(rel.trim_start_matches('/')))
}

/// The tools, or `None` (skipped) where they are missing outside CI; panics in CI.
fn tools() -> Option<Tools> {
    let systemd = ["/usr/lib/systemd/systemd", "/lib/systemd/systemd"]
        .map(PathBuf::from)
        .into_iter()
        .find(|p| p.is_file());
    let (systemctl, unshare, nsenter) =
        (in_path("systemctl"), in_path("unshare"), in_path("nsenter"));
    let cgroup_parent = cgroup2_parent();
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let mut missing = Vec::new();
    for (what, found) in [
        ("/usr/lib/systemd/systemd", systemd.is_some()),
        ("systemctl", systemctl.is_some()),
        ("unshare (util-linux)", unshare.is_some()),
        ("nsenter (util-linux)", nsenter.is_some()),
        ("a cgroup2 mount", cgroup_parent.is_some()),
        ("root (namespaces, mounts, cgroups)", root),
    ] {
        if !found {
            missing.push(what);
        }
    }
    if !missing.is_empty() {
        // As in tests/systemd.rs: the README's test command must work where only Rust is
        // installed; in CI (root, Debian package `systemd` installed by .ci/run) it is a failure.
        assert!(
            std::env::var_os("CI").is_none(),
            "needed in CI to boot a systemd: {missing:?} (Debian packages `systemd`, \
             `util-linux`; .ci/run installs systemd)"
        );
        eprintln!("skipped: cannot boot a systemd here: missing {missing:?}");
        return None;
    }
    Some(Tools {
        systemd: systemd?,
        systemctl: systemctl?,
        unshare: unshare?,
        nsenter: nsenter?,
        cgroup_parent: cgroup_parent?,
    })
}

// ---------------------------------------------------------------------------------------------
// Processes

/// Runs `cmd` with its output captured; fails the test if it has not returned within `bound`.
fn run_bounded(mut cmd: Command, bound: Duration) -> (Output, Duration) {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let what = format!("{cmd:?}");
    let t0 = Instant::now();
    let child = common::spawn(&mut cmd).unwrap_or_else(|e| panic!("spawn {what}: {e}"));
    let pid = child.id() as i32;
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(bound) {
        Ok(out) => (
            out.unwrap_or_else(|e| panic!("wait {what}: {e}")),
            t0.elapsed(),
        ),
        Err(_) => {
            // SAFETY: kill(2) on our own child, not reaped yet (its waiter has not returned).
            unsafe { libc::kill(pid, libc::SIGKILL) };
            panic!("{what} did not return within {bound:?}: hung");
        }
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).trim_end().to_string()
}

fn show_out(o: &Output) -> String {
    format!(
        "status {:?}, stdout {:?}, stderr {:?}",
        o.status.code(),
        text(&o.stdout),
        text(&o.stderr)
    )
}

// ---------------------------------------------------------------------------------------------
// A systemd in namespaces of its own

/// A systemd booted as PID 1 of its own namespaces; killed (and its cgroup removed) on drop.
struct Systemd {
    tools: Tools,
    /// `sh` that moved itself into the cgroup and exec'd `unshare`, which waits for its child.
    launcher: Child,
    /// systemd's pid in the test's PID namespace (1 inside).
    init: i32,
    cgroup: PathBuf,
    dir: TempDir,
}

impl Systemd {
    /// Boots a systemd, or `None` when it cannot be done here (see [`tools`]).
    fn boot() -> Option<Systemd> {
        let tools = tools()?;
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let dir = TempDir::new("systemd-pid1");
        assert!(
            !dir.path().starts_with("/run"),
            "the temp dir {} must not be under /run, which is private to the systemd",
            dir.path().display()
        );
        let cgroup = tools.cgroup_parent.join(format!(
            "ringflip-test-systemd-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir(&cgroup)
            .unwrap_or_else(|e| panic!("create cgroup {}: {e}", cgroup.display()));
        let console = dir.path().join("console");
        fs::write(&console, "").unwrap();
        let init_script = dir.path().join("init.sh");
        // Runs as PID 1 of the new namespaces, then becomes systemd. Nothing here reaches the
        // host's mounts: the mount namespace's propagation is private.
        fs::write(
            &init_script,
            format!(
                "set -e\n\
                 if [ -e /dev/console ]; then mount --bind '{console}' /dev/console; fi\n\
                 mount -t tmpfs -o mode=0755 ringflip-run /run\n\
                 mount -t cgroup2 cgroup2 /sys/fs/cgroup\n\
                 mkdir -p /run/systemd/system\n\
                 printf '[Unit]\\nDescription=ringflip test target\\nDefaultDependencies=no\\n' \
                   > /run/systemd/system/ringflip-test.target\n\
                 exec env -i container=ringflip-test PATH=/usr/sbin:/usr/bin:/sbin:/bin \
                   '{systemd}' --system --unit=ringflip-test.target --show-status=no \
                   --log-target=console\n",
                console = console.display(),
                systemd = tools.systemd.display(),
            ),
        )
        .unwrap();
        let log = fs::File::create(dir.path().join("boot.log")).unwrap();
        // The cgroup move happens before `unshare --cgroup`, so the new cgroup is the
        // namespace's root, which systemd takes as its own.
        let mut cmd = clean_command(Path::new("/bin/sh"));
        cmd.arg("-c")
            .arg(
                r#"echo $$ > "$1/cgroup.procs" && exec "$2" --pid --fork --mount --uts --cgroup \
                   --propagation private --mount-proc /bin/sh "$3""#,
            )
            .arg("sh")
            .arg(&cgroup)
            .arg(&tools.unshare)
            .arg(&init_script)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        let launcher = common::spawn(&mut cmd).expect("spawn the systemd launcher");
        let mut sd = Systemd {
            tools,
            launcher,
            init: 0,
            cgroup,
            dir,
        };
        let lpid = sd.launcher.id();
        let deadline = Instant::now() + BOOT_BOUND;
        while sd.init == 0 {
            let children = fs::read_to_string(format!("/proc/{lpid}/task/{lpid}/children"))
                .unwrap_or_default();
            if let Some(p) = children.split_whitespace().next() {
                sd.init = p.parse().unwrap();
                break;
            }
            if let Ok(Some(s)) = sd.launcher.try_wait() {
                panic!(
                    "unshare exited ({s}) before starting systemd:\n{}",
                    sd.boot_log()
                );
            }
            assert!(Instant::now() < deadline, "unshare started nothing");
            thread::sleep(Duration::from_millis(10));
        }
        // systemd answers on /run/systemd/private once it runs.
        loop {
            let (out, _) = sd.try_systemctl(&["is-system-running"], SYSTEMCTL_BOUND);
            let state = text(&out.stdout);
            if state == "running" || state == "degraded" {
                break;
            }
            if let Ok(Some(s)) = sd.launcher.try_wait() {
                panic!("systemd exited ({s}) while booting:\n{}", sd.boot_log());
            }
            assert!(
                Instant::now() < deadline,
                "systemd did not come up: {}\n{}",
                show_out(&out),
                sd.boot_log()
            );
            thread::sleep(Duration::from_millis(20));
        }
        Some(sd)
    }

    fn boot_log(&self) -> String {
        format!(
            "--- unshare/boot log ---\n{}\n--- console ---\n{}",
            file_tail(&self.dir.path().join("boot.log"), 4000),
            file_tail(&self.dir.path().join("console"), 4000)
        )
    }

    /// `systemctl ARGS…` inside, bounded (fails the test as hung past `bound`).
    fn try_systemctl(&self, args: &[&str], bound: Duration) -> (Output, Duration) {
        let mut cmd = Command::new(&self.tools.nsenter);
        cmd.args(["-t", &self.init.to_string(), "-m", "-p", "--"])
            .arg(&self.tools.systemctl)
            .args(args)
            .env("SYSTEMD_COLORS", "0")
            .env("SYSTEMD_PAGER", "");
        run_bounded(cmd, bound)
    }

    /// `systemctl ARGS…` that must succeed.
    fn systemctl(&self, args: &[&str]) -> String {
        let (out, _) = self.try_systemctl(args, SYSTEMCTL_BOUND);
        assert!(
            out.status.success(),
            "systemctl {args:?}: {}\n{}",
            show_out(&out),
            self.boot_log()
        );
        text(&out.stdout)
    }

    /// A unit property (`systemctl show -p PROP --value UNIT`).
    fn prop(&self, unit: &str, prop: &str) -> String {
        self.systemctl(&["show", "-p", prop, "--value", unit])
    }

    /// Where the systemd's /run/systemd/system is, seen from here.
    fn unit_dir(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root/run/systemd/system", self.init))
    }
}

impl Drop for Systemd {
    fn drop(&mut self) {
        // SIGKILL to PID 1 of a PID namespace kills every process in it. `init` is unshare's
        // only child and unshare has not been reaped, so the pid is still systemd's (or an
        // unreaped zombie's).
        if self.init > 0 && matches!(self.launcher.try_wait(), Ok(None)) {
            // SAFETY: kill(2) on the pid described above.
            unsafe { libc::kill(self.init, libc::SIGKILL) };
        }
        let deadline = Instant::now() + BOOT_BOUND;
        loop {
            match self.launcher.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() >= deadline => {
                    let _ = self.launcher.kill();
                    let _ = self.launcher.wait();
                    break;
                }
                Ok(None) => thread::sleep(Duration::from_millis(10)),
            }
        }
        // The cgroup tree empties once the processes are gone; then its directories go, the
        // deepest first.
        let events = self.cgroup.join("cgroup.events");
        while fs::read_to_string(&events).is_ok_and(|e| e.contains("populated 1"))
            && Instant::now() < deadline
        {
            thread::sleep(Duration::from_millis(10));
        }
        if let Err(e) = remove_cgroup(&self.cgroup) {
            eprintln!("removing cgroup {}: {e}", self.cgroup.display());
        }
    }
}

fn remove_cgroup(dir: &Path) -> std::io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            remove_cgroup(&entry.path())?;
        }
    }
    fs::remove_dir(dir)
}

// ---------------------------------------------------------------------------------------------
// The echo service

/// `text` with `from` replaced by `to`; `from` must be there (the example unit is what is
/// tested, so a change to it that these substitutions miss fails here).
fn subst(text: &str, from: &str, to: &str) -> String {
    assert!(
        text.contains(from),
        "examples/systemd/echo.service no longer contains {from:?}"
    );
    text.replacen(from, to, 1)
}

/// The echo example as the unit `echo.service`, started.
struct EchoUnit<'a> {
    sd: &'a Systemd,
    addr: SocketAddr,
    /// The binary `ExecStart=` names (a copy of the echo example, replaced by the tests).
    bin: PathBuf,
    log: PathBuf,
}

impl<'a> EchoUnit<'a> {
    /// Installs examples/systemd/echo.service with this test's paths and port, `echo_args`
    /// appended to `ExecStart=`, and `TimeoutStartSec=` if given; starts it.
    fn start(sd: &'a Systemd, echo_args: &str, timeout_start_sec: Option<u32>) -> EchoUnit<'a> {
        let addr = free_port();
        let bin = sd.dir.path().join("echo");
        let log = sd.dir.path().join("echo.log");
        replace_file(&bin, &fs::read(echo_binary()).unwrap(), 0o755);
        let ctl = std::env::var_os("RINGFLIP_CTL_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_ringflip-ctl")));
        let mut unit = include_str!("../examples/systemd/echo.service").to_string();
        unit = subst(
            &unit,
            "ExecStart=/usr/local/bin/echo --listen 127.0.0.1:7000 ",
            &format!("ExecStart={} --listen {addr} ", bin.display()),
        );
        unit = subst(
            &unit,
            "--control /run/echo/control.sock\n",
            &format!("--control /run/echo/control.sock {echo_args}\n"),
        );
        unit = subst(
            &unit,
            "ExecReload=/usr/local/bin/ringflip-ctl ",
            &format!("ExecReload={} ", ctl.display()),
        );
        if let Some(secs) = timeout_start_sec {
            unit = subst(
                &unit,
                "TimeoutStartSec=90\n",
                &format!("TimeoutStartSec={secs}\n"),
            );
        }
        // Only the unit itself: no sysinit.target, basic.target and the rest of a boot.
        unit = subst(&unit, "[Unit]\n", "[Unit]\nDefaultDependencies=no\n");
        // No journald in there: the service's output (and ExecReload's) goes to a file.
        unit = subst(
            &unit,
            "[Service]\n",
            &format!(
                "[Service]\nStandardOutput=append:{}\nStandardError=inherit\n\
                 Environment=NO_COLOR=1\n",
                log.display()
            ),
        );
        fs::write(sd.unit_dir().join(UNIT), unit).unwrap();
        sd.systemctl(&["daemon-reload"]);
        sd.systemctl(&["start", UNIT]);
        let u = EchoUnit { sd, addr, bin, log };
        u.assert_serving("started", "hello\n");
        u
    }

    fn context(&self) -> String {
        let (status, _) = self.sd.try_systemctl(
            &["status", "--no-pager", "--lines=0", UNIT],
            SYSTEMCTL_BOUND,
        );
        format!(
            "--- systemctl status ---\n{}\n--- service log ---\n{}",
            text(&status.stdout),
            file_tail(&self.log, 6000)
        )
    }

    fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn main_pid(&self) -> i32 {
        let p = self.sd.prop(UNIT, "MainPID");
        p.parse()
            .unwrap_or_else(|_| panic!("MainPID {p:?}\n{}", self.context()))
    }

    fn prop(&self, prop: &str) -> String {
        self.sd.prop(UNIT, prop)
    }

    /// `systemctl reload echo.service`, bounded; its output and how long it took.
    fn reload(&self) -> (Output, Duration) {
        self.sd.try_systemctl(&["reload", UNIT], SYSTEMCTL_BOUND)
    }

    /// Active and running (not reloading, not failed), with `main` as MainPID, and serving.
    fn assert_running(&self, main: i32, what: &str) {
        let state = (self.prop("ActiveState"), self.prop("SubState"));
        assert_eq!(
            (state.0.as_str(), state.1.as_str()),
            ("active", "running"),
            "{what}\n{}",
            self.context()
        );
        assert_eq!(self.main_pid(), main, "{what}\n{}", self.context());
        self.assert_serving(what, "after\n");
    }

    fn assert_serving(&self, what: &str, line: &str) {
        if let Err(e) = echo_once(
            self.addr,
            line,
            Duration::from_secs(5),
            Duration::from_secs(5),
        ) {
            panic!("{what}: not serving: {e:?}\n{}", self.context());
        }
    }

    /// Replaces the binary `ExecStart=` names (what the next upgrade starts).
    fn set_binary(&self, contents: &[u8]) {
        replace_file(&self.bin, contents, 0o755);
    }

    fn set_good_binary(&self) {
        self.set_binary(&fs::read(echo_binary()).unwrap());
    }

    /// A successor that never gets READY (the misbehave example in mode `hang`).
    fn set_hanging_binary(&self) {
        self.set_binary(
            format!(
                "#!/bin/sh\nexec {} hang\n",
                example_binary("misbehave").display()
            )
            .as_bytes(),
        );
    }

    /// Polls a property until it is `want`; how long that took.
    fn wait_prop(&self, prop: &str, want: &str, bound: Duration) -> Duration {
        let t0 = Instant::now();
        loop {
            if self.prop(prop) == want {
                return t0.elapsed();
            }
            assert!(
                t0.elapsed() < bound,
                "{prop} never {want:?} within {bound:?}\n{}",
                self.context()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }
}

fn assert_failed(out: &Output, u: &EchoUnit, what: &str) {
    assert!(
        !out.status.success() && out.status.code().is_some(),
        "{what}: systemctl reload should exit non-zero: {}\n{}",
        show_out(out),
        u.context()
    );
}

// ---------------------------------------------------------------------------------------------
// Tests

/// (a) A good binary: `systemctl reload` exits 0, MainPID is the new process (the pid
/// ringflip-ctl printed), the unit stays active and running, and connections made throughout
/// (closed-loop and long-lived) all succeed. Twice, so the new process upgrades too.
#[test]
fn reload_with_a_good_binary_exits_0_and_moves_main_pid() {
    let Some(sd) = Systemd::boot() else { return };
    let u = EchoUnit::start(&sd, "", None);
    let mut main = u.main_pid();
    let load = Load::start(u.addr, 2, 2);
    for round in 1..=2 {
        thread::sleep(Duration::from_millis(100));
        let (out, took) = u.reload();
        assert!(
            out.status.success(),
            "reload {round}: {}\n{}",
            show_out(&out),
            u.context()
        );
        let new = u.main_pid();
        assert_ne!(
            new,
            main,
            "reload {round}: MainPID unchanged\n{}",
            u.context()
        );
        assert!(
            u.log_text().contains(&format!("\nok {new}\n")),
            "reload {round}: ringflip-ctl did not print `ok {new}`\n{}",
            u.context()
        );
        assert_eq!(u.prop("ReloadResult"), "success");
        u.assert_running(new, &format!("after reload {round} ({took:?})"));
        main = new;
    }
    thread::sleep(Duration::from_millis(100));
    let report = load.stop();
    report.assert_clean();
    assert!(report.connections_ok > 0 && report.pings_ok > 0, "{report}");
}

/// (b) A binary that exits 1: `systemctl reload` exits non-zero at once (`ReloadResult=exit-code`,
/// ringflip-ctl's "failed" in the log, the service's status line says why), MainPID is the same
/// process, the unit stays active and serving. With the good binary back, the next reload works.
#[test]
fn reload_with_a_failing_binary_exits_non_zero_and_keeps_serving() {
    let Some(sd) = Systemd::boot() else { return };
    let u = EchoUnit::start(&sd, "", None);
    let main = u.main_pid();
    u.set_binary(b"#!/bin/sh\nexit 1\n");
    let (out, took) = u.reload();
    assert_failed(&out, &u, "a binary that exits 1");
    assert!(took < PROMPT, "the failed reload took {took:?}");
    assert_eq!(u.prop("ReloadResult"), "exit-code", "{}", u.context());
    assert!(
        u.prop("StatusText").starts_with("upgrade failed: "),
        "{}",
        u.context()
    );
    assert!(
        u.log_text()
            .contains("ringflip-ctl: /run/echo/control.sock: failed: "),
        "{}",
        u.context()
    );
    u.assert_running(main, "after the failed reload");

    u.set_good_binary();
    let (out, _) = u.reload();
    assert!(out.status.success(), "{}\n{}", show_out(&out), u.context());
    let new = u.main_pid();
    assert_ne!(new, main);
    u.assert_running(new, "after the good reload that followed");
}

/// (c) A reload refused as busy (`--max-draining 1` and the first generation still draining a
/// connection): `systemctl reload` exits non-zero at once, MainPID stays, the unit stays active,
/// the draining connection is still served. Once it closes, the next reload works.
#[test]
fn reload_refused_as_busy_exits_non_zero_at_once() {
    let Some(sd) = Systemd::boot() else { return };
    let u = EchoUnit::start(&sd, "--max-draining 1", None);
    let first = u.main_pid();
    let mut held = connect(u.addr, Duration::from_secs(5), Duration::from_secs(5)).unwrap();
    exchange(&mut held, "held\n").unwrap();
    let (out, _) = u.reload();
    assert!(out.status.success(), "{}\n{}", show_out(&out), u.context());
    let second = u.main_pid();
    assert_ne!(second, first);

    let (out, took) = u.reload();
    assert_failed(&out, &u, "refused as busy");
    assert!(took < PROMPT, "the refused reload took {took:?}");
    assert_eq!(u.prop("ReloadResult"), "exit-code", "{}", u.context());
    assert!(
        u.log_text()
            .contains("ringflip-ctl: /run/echo/control.sock: busy: too-many-draining"),
        "{}",
        u.context()
    );
    u.assert_running(second, "after the refused reload");
    exchange(&mut held, "still served while draining\n").unwrap();

    drop::<TcpStream>(held);
    // The first generation exits once its connection is gone; until then, refusals.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (out, took) = u.reload();
        assert!(took < PROMPT, "a reload took {took:?}");
        if out.status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "reload still refused after the drain: {}\n{}",
            show_out(&out),
            u.context()
        );
        thread::sleep(Duration::from_millis(100));
    }
    let third = u.main_pid();
    assert_ne!(third, second);
    u.assert_running(third, "after the drain");
}

/// (c') A reload while an upgrade started by SIGHUP is in flight (a successor that never gets
/// READY, ready timeout 2 s): systemd does not run `ExecReload=` while the unit is "reloading"
/// (the service said RELOADING=1), so ringflip never answers "busy". The reload job waits for
/// the service's READY=1 (the first upgrade failed, 2 s), then runs ringflip-ctl, whose upgrade
/// of the same bad binary fails after 2 s more: non-zero, bounded by the ready timeouts.
#[test]
fn reload_during_a_signalled_upgrade_waits_for_it_then_upgrades() {
    let Some(sd) = Systemd::boot() else { return };
    let u = EchoUnit::start(&sd, "--ready-timeout-ms 2000", None);
    let main = u.main_pid();
    u.set_hanging_binary();
    let t0 = Instant::now();
    sd.systemctl(&["kill", "--kill-whom=main", "--signal=SIGHUP", UNIT]);
    u.wait_prop("SubState", "reload", Duration::from_secs(5));
    let (out, took) = u.reload();
    let since_hup = t0.elapsed();
    assert_failed(
        &out,
        &u,
        "a reload during a signalled upgrade of a hanging binary",
    );
    // Not a busy refusal: it waited for the first upgrade (2 s from SIGHUP), then ran one of
    // its own (2 s more).
    assert!(
        since_hup >= Duration::from_millis(3800) && took < Duration::from_secs(20),
        "reload took {took:?} ({since_hup:?} from SIGHUP)\n{}",
        u.context()
    );
    let log = u.log_text();
    assert!(!log.contains("busy:"), "{}", u.context());
    assert_eq!(
        log.matches("upgrade requested on the control socket")
            .count(),
        1,
        "{}",
        u.context()
    );
    assert!(
        log.matches("was not ready within 2000 ms").count() >= 2,
        "two failed upgrades expected\n{}",
        u.context()
    );
    assert_eq!(u.prop("ReloadResult"), "exit-code", "{}", u.context());
    u.assert_running(main, "after the reload");
}

/// Two `systemctl reload`s at once (a successor that never gets READY, ready timeout 2 s): the
/// second joins the running reload job, which runs `ExecReload=` again once the first run is
/// done; both wait for that second run and both exit non-zero. Never a busy refusal, never a hang.
#[test]
fn concurrent_reloads_are_merged_and_run_one_after_the_other() {
    let Some(sd) = Systemd::boot() else { return };
    let u = EchoUnit::start(&sd, "--ready-timeout-ms 2000", None);
    let main = u.main_pid();
    u.set_hanging_binary();
    let t0 = Instant::now();
    let (a, b) = thread::scope(|s| {
        let a = s.spawn(|| u.reload());
        u.wait_prop("SubState", "reload", Duration::from_secs(5));
        thread::sleep(Duration::from_millis(300));
        let b = s.spawn(|| u.reload());
        (a.join().unwrap(), b.join().unwrap())
    });
    let total = t0.elapsed();
    assert_failed(&a.0, &u, "the first reload");
    assert_failed(&b.0, &u, "the second reload");
    let log = u.log_text();
    assert_eq!(
        log.matches("upgrade requested on the control socket")
            .count(),
        2,
        "ExecReload= should have run twice\n{}",
        u.context()
    );
    assert!(!log.contains("busy:"), "{}", u.context());
    // Both returned after the second run: 2 s + 2 s.
    assert!(
        a.1 >= Duration::from_millis(3800) && b.1 >= Duration::from_millis(3400),
        "first took {:?}, second {:?}\n{}",
        a.1,
        b.1,
        u.context()
    );
    assert!(total < Duration::from_secs(20), "{total:?}");
    u.assert_running(main, "after both reloads");
}

/// The issue's open question: does `TimeoutStartSec=` bound `ExecReload=`? With
/// `TimeoutStartSec=2` and a successor that never gets READY (ready timeout 5 s, ringflip-ctl
/// `--timeout 60`): at 2 s systemd kills ringflip-ctl and records `ReloadResult=timeout`, but the
/// unit stays "reloading" and `systemctl reload` returns only at the service's READY=1, when
/// ringflip gives the upgrade up (5 s); it exits non-zero. MainPID and the service stay. And a
/// successor that gets READY after 3 s is an upgrade done (MainPID is the new process) that
/// `systemctl reload` still reports as failed (`ReloadResult=timeout`).
#[test]
fn timeout_start_sec_bounds_exec_reload_but_the_reload_lasts_until_ready() {
    let Some(sd) = Systemd::boot() else { return };
    let u = EchoUnit::start(&sd, "--ready-timeout-ms 5000", Some(2));
    let main = u.main_pid();
    u.set_hanging_binary();
    thread::scope(|s| {
        let t0 = Instant::now();
        let reload = s.spawn(|| u.reload());
        u.wait_prop("ReloadResult", "timeout", Duration::from_secs(10));
        let at = t0.elapsed();
        assert!(
            at >= Duration::from_millis(1800) && at < Duration::from_millis(4500),
            "ReloadResult=timeout at {at:?}, expected about TimeoutStartSec=2"
        );
        assert_eq!(u.prop("SubState"), "reload", "{}", u.context());
        assert!(
            !reload.is_finished(),
            "systemctl reload returned at the timeout"
        );
        let (out, took) = reload.join().unwrap();
        assert_failed(&out, &u, "a reload past TimeoutStartSec");
        assert!(
            took >= Duration::from_millis(4500) && took < Duration::from_secs(15),
            "systemctl reload took {took:?}, expected about the ready timeout (5 s)\n{}",
            u.context()
        );
    });
    assert_eq!(u.prop("ReloadResult"), "timeout", "{}", u.context());
    let log = u.log_text();
    // ringflip-ctl was killed before the answer came, so it printed nothing.
    assert!(!log.contains("ringflip-ctl:"), "{}", u.context());
    assert!(
        log.contains("was not ready within 5000 ms"),
        "{}",
        u.context()
    );
    u.assert_running(main, "after the timed-out reload");

    // A successor READY after 3 s: past TimeoutStartSec=2, within the ready timeout. The upgrade
    // succeeds (MainPID is the new process), and still `systemctl reload` fails, at READY=1.
    u.set_binary(
        format!(
            "#!/bin/sh\nsleep 3\nexec {} \"$@\"\n",
            echo_binary().display()
        )
        .as_bytes(),
    );
    let (out, took) = u.reload();
    assert_failed(&out, &u, "a slow good upgrade past TimeoutStartSec");
    assert!(
        took >= Duration::from_millis(2900) && took < Duration::from_secs(15),
        "systemctl reload took {took:?}, expected about 3 s\n{}",
        u.context()
    );
    assert_eq!(u.prop("ReloadResult"), "timeout", "{}", u.context());
    let new = u.main_pid();
    assert_ne!(
        new,
        main,
        "the slow upgrade did not happen\n{}",
        u.context()
    );
    u.assert_running(new, "after the slow upgrade");
}
