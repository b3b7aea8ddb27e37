//! systemd integration: the exact `NOTIFY_SOCKET` message sequence across a good upgrade, a
//! failed one and a shutdown; and socket activation with `systemd-socket-activate`.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{echo_binary, ensure_subreaper, free_port, reap_zombies, EchoOpts, EchoServer};

const QUIET: Duration = Duration::from_millis(300);

struct Notifications {
    sock: UnixDatagram,
}

impl Notifications {
    fn next(&self, bound: Duration) -> Option<String> {
        self.sock.set_read_timeout(Some(bound)).unwrap();
        let mut buf = [0u8; 4096];
        match self.sock.recv(&mut buf) {
            Ok(n) => Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
            Err(_) => None,
        }
    }

    fn expect(&self, what: &str) -> String {
        self.next(Duration::from_secs(10))
            .unwrap_or_else(|| panic!("no notification; expected {what}"))
    }

    fn expect_silence(&self) {
        if let Some(m) = self.next(QUIET) {
            panic!("unexpected notification {m:?}");
        }
    }
}

fn assert_reloading(msg: &str) {
    let mut lines = msg.lines();
    assert_eq!(lines.next(), Some("RELOADING=1"), "{msg:?}");
    let usec = lines
        .next()
        .and_then(|l| l.strip_prefix("MONOTONIC_USEC="))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no MONOTONIC_USEC in {msg:?}"));
    assert!(usec > 0);
    assert_eq!(lines.next(), None, "{msg:?}");
}

#[test]
fn notify_sequence_across_upgrades_and_shutdown() {
    let dir = std::env::temp_dir().join(format!("ringflip-notify-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("notify.sock");
    let _ = std::fs::remove_file(&path);
    let n = Notifications {
        sock: UnixDatagram::bind(&path).unwrap(),
    };
    let server = EchoServer::start(EchoOpts {
        env: vec![("NOTIFY_SOCKET".into(), path.display().to_string())],
        ..EchoOpts::default()
    });
    assert_eq!(n.expect("READY=1 at start"), "READY=1");
    n.expect_silence();

    // A good upgrade: RELOADING, then the new main pid with READY. The new process itself says
    // nothing (it is not the main process until its predecessor says so).
    let new = server.upgrade();
    assert_reloading(&n.expect("RELOADING=1"));
    assert_eq!(n.expect("MAINPID"), format!("MAINPID={new}\nREADY=1"));
    n.expect_silence();

    // A failed upgrade: the reload ends with READY=1 and a status saying why.
    server.remove_binary();
    server.upgrade_expect_rollback(Duration::from_millis(500));
    assert_reloading(&n.expect("RELOADING=1"));
    let done = n.expect("READY=1 after a failed upgrade");
    assert!(
        done.starts_with("READY=1\nSTATUS=upgrade failed: "),
        "{done:?}"
    );
    n.expect_silence();
    server.restore_binary();

    // Shutdown.
    server.stop();
    assert_eq!(n.expect("STOPPING=1"), "STOPPING=1");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
// The server is reaped by `reap_zombies` (this process is a child subreaper), not by `Child`.
#[allow(clippy::zombie_processes)]
fn socket_activation_adopts_the_systemd_socket() {
    ensure_subreaper();
    let activate = "/usr/bin/systemd-socket-activate";
    if !std::path::Path::new(activate).exists() {
        // The README's test command must work where only Rust is installed; CI installs the
        // tool (.ci/run), and there its absence is a failure, not a skip.
        assert!(
            std::env::var_os("CI").is_none(),
            "{activate} is needed in CI (Debian package `systemd`; .ci/run installs it)"
        );
        eprintln!("skipped: {activate} is not installed (Debian package `systemd`)");
        return;
    }
    let dir = std::env::temp_dir().join(format!("ringflip-activate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let pid_file = dir.join("pid");
    let log = dir.join("server.log");
    let addr = free_port();
    let guard = common::ProcGuard::default();
    // systemd-socket-activate binds the address and execs the server with LISTEN_FDS=1 and
    // LISTEN_FDNAMES=echo0: if the server bound the port itself, it would fail (in use).
    let forking = common::forking();
    let child = Command::new(activate)
        .arg("-l")
        .arg(addr.to_string())
        .arg("--fdname=echo0")
        .arg("-E")
        .arg("NO_COLOR=1")
        .arg(echo_binary())
        .args(["--listen", &addr.to_string(), "--pid-file"])
        .arg(&pid_file)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    drop(forking);
    guard.track(child.id() as i32);
    let wait_pid = |not: Option<i32>| wait_for_pid_file(&pid_file, not, &log);
    let echo = move |line: &str| {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(line.as_bytes()).unwrap();
        let mut reply = String::new();
        BufReader::new(s).read_line(&mut reply).unwrap();
        assert_eq!(reply, line);
    };
    // systemd-socket-activate starts the server on the first connection, which then waits in
    // the backlog of the socket the server adopts.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("Listening on")
    {
        assert!(
            Instant::now() < deadline,
            "systemd-socket-activate did not listen"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let first_conn = std::thread::spawn(move || echo("activated\n"));
    let first = wait_pid(None);
    guard.track(first);
    first_conn.join().expect("the first connection was served");
    let log_text = std::fs::read_to_string(&log).unwrap();
    assert!(
        log_text.contains("adopted the socket from systemd"),
        "log:\n{log_text}"
    );

    // The adopted socket is handed over like any other.
    // SAFETY: plain syscall on a pid this test started.
    unsafe { libc::kill(first, libc::SIGHUP) };
    let second = wait_pid(Some(first));
    guard.track(second);
    echo("upgraded\n");
    // SAFETY: as above.
    unsafe { libc::kill(second, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while common::pid_alive(first) || common::pid_alive(second) {
        reap_zombies();
        assert!(Instant::now() < deadline, "server processes did not exit");
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Starts the echo server as systemd would with socket activation: `sockets` at fds 3, 4, …
/// (named in `LISTEN_FDNAMES`), `LISTEN_PID` its own pid (a shell sets it, then `exec`s the
/// server, which keeps the pid). Returns its pid.
// Reaped by `reap_zombies` (this process is a child subreaper), not by `Child`.
#[allow(clippy::zombie_processes)]
fn start_activated(
    sockets: &[(&str, &socket2::Socket)],
    args: &[String],
    log: &std::path::Path,
) -> i32 {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let names: Vec<&str> = sockets.iter().map(|(n, _)| *n).collect();
    // Far above 3 + n, so that no dup2 below overwrites a source still to be moved.
    let sources: Vec<std::os::fd::OwnedFd> = sockets
        .iter()
        .map(|(_, s)| {
            let fd = nix::fcntl::fcntl(s, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(100)).unwrap();
            // SAFETY: F_DUPFD_CLOEXEC made this fd, which nothing else owns.
            unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) }
        })
        .collect();
    let raw: Vec<i32> = sources.iter().map(|f| f.as_raw_fd()).collect();
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c")
        .arg("LISTEN_PID=$$ exec \"$0\" \"$@\"")
        .arg(echo_binary())
        .args(args)
        .env("LISTEN_FDS", sockets.len().to_string())
        .env("LISTEN_FDNAMES", names.join(":"))
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap());
    // SAFETY: only async-signal-safe syscalls (close_range, dup2) on fds this process owns.
    unsafe {
        cmd.pre_exec(move || {
            libc::syscall(
                libc::SYS_close_range,
                3 as libc::c_uint,
                libc::c_uint::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            );
            for (i, fd) in raw.iter().enumerate() {
                // dup2 leaves the new fd without FD_CLOEXEC: it survives the exec.
                if libc::dup2(*fd, 3 + i as i32) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let forking = common::forking();
    let child = cmd.spawn().unwrap();
    drop(forking);
    drop(sources);
    child.id() as i32
}

fn reuseport_listener(addr: std::net::SocketAddr, reuseport: bool) -> socket2::Socket {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.set_reuse_address(true).unwrap();
    s.set_reuse_port(reuseport).unwrap();
    s.bind(&addr.into()).unwrap();
    s.listen(128).unwrap();
    s
}

/// Thread-per-core under socket activation: systemd passes one SO_REUSEPORT socket per worker
/// (one `.socket` unit each, `ReusePort=yes`, `FileDescriptorName=echo0`, `echo0#1`); each
/// worker adopts its own, both serve, and an upgrade hands them over. With more sockets than
/// workers (a unit left from a larger setup), the extra member is served too: systemd keeps
/// its copy open, so one closed here would stay in the group with no one accepting on it. The
/// test keeps its copies open for the same reason, as systemd does.
#[test]
fn thread_per_core_adopts_one_socket_per_worker_from_systemd() {
    for sockets in [2, 3] {
        activated_workers(sockets);
    }
}

fn activated_workers(sockets: usize) {
    ensure_subreaper();
    let dir = std::env::temp_dir().join(format!(
        "ringflip-activate-w{sockets}-{}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let (pid_file, log) = (dir.join("pid"), dir.join("server.log"));
    let addr = free_port();
    let members: Vec<socket2::Socket> = (0..sockets)
        .map(|_| reuseport_listener(addr, true))
        .collect();
    let names: Vec<String> = (0..sockets)
        .map(|i| {
            if i == 0 {
                "echo0".to_string()
            } else {
                format!("echo0#{i}")
            }
        })
        .collect();
    let passed: Vec<(&str, &socket2::Socket)> = names
        .iter()
        .map(String::as_str)
        .zip(members.iter())
        .collect();
    let guard = common::ProcGuard::default();
    let args: Vec<String> = vec![
        "--listen".into(),
        addr.to_string(),
        "--workers".into(),
        "2".into(),
        "--pid-file".into(),
        pid_file.display().to_string(),
    ];
    let first = start_activated(&passed, &args, &log);
    guard.track(first);
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    let wait_pid = |not: Option<i32>| wait_for_pid_file(&pid_file, not, &log);
    assert_eq!(wait_pid(None), first);
    let adopted = log_text()
        .matches("adopted the socket from systemd")
        .count()
        + log_text()
            .matches("adopted an extra member from systemd")
            .count();
    assert_eq!(adopted, sockets, "{}", log_text());
    let load = common::Load::start(addr, 4, 4);
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: plain syscall on a pid this test started.
    unsafe { libc::kill(first, libc::SIGHUP) };
    let second = wait_pid(Some(first));
    guard.track(second);
    std::thread::sleep(Duration::from_millis(300));
    let report = load.stop();
    eprintln!("RESULT activated workers, {sockets} sockets: {report}");
    report.assert_clean();
    // SAFETY: as above.
    unsafe { libc::kill(second, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while common::pid_alive(first) || common::pid_alive(second) {
        reap_zombies();
        assert!(Instant::now() < deadline, "server processes did not exit");
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(members); // systemd's copies, held to the end
    let _ = std::fs::remove_dir_all(&dir);
}

/// Workers with what one socket unit gives (one socket, with or without `ReusePort=yes`):
/// `build()` fails at once and says which `.socket` settings it needs.
#[test]
fn workers_with_one_activated_socket_fail_with_what_the_units_need() {
    ensure_subreaper();
    let dir = std::env::temp_dir().join(format!("ringflip-activate-w1-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("server.log");
    let guard = common::ProcGuard::default();
    for (reuseport, want) in [
        (
            false,
            "one member per worker needs SO_REUSEPORT: set ReusePort=yes",
        ),
        (true, "give each worker a socket of its own"),
    ] {
        let addr = free_port();
        let only = reuseport_listener(addr, reuseport);
        let args: Vec<String> = vec![
            "--listen".into(),
            addr.to_string(),
            "--workers".into(),
            "2".into(),
        ];
        let pid = start_activated(&[("echo0", &only)], &args, &log);
        let p = guard.track(pid);
        let deadline = Instant::now() + Duration::from_secs(10);
        while common::pid_alive(pid) {
            reap_zombies();
            assert!(Instant::now() < deadline, "the server did not exit");
            std::thread::sleep(Duration::from_millis(10));
        }
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        assert!(text.contains(want), "ReusePort {reuseport}: {text}");
        if let Some(status) = p.and_then(|p| p.exit_status()) {
            assert!(
                !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0),
                "exit 0"
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The pid in `pid_file` once it names another process than `not`, within 10 s; else fails
/// with `log`.
fn wait_for_pid_file(pid_file: &std::path::Path, not: Option<i32>, log: &std::path::Path) -> i32 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let pid = std::fs::read_to_string(pid_file)
            .ok()
            .and_then(|text| text.trim().parse().ok());
        if let Some(p) = pid.filter(|p| Some(*p) != not) {
            return p;
        }
        assert!(
            Instant::now() < deadline,
            "no (new) pid file; log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}
