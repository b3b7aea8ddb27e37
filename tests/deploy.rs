//! Deploys as they are done: a symlink flipped to a new release, then SIGHUP; the new
//! process's environment refreshed at the upgrade. Against `examples/echo.rs`.

mod common;

use common::*;
use std::fs;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::thread;
use std::time::Duration;

/// The file a process runs (`/proc/PID/exe`, symlinks resolved by the kernel).
fn exe_of(pid: i32) -> PathBuf {
    fs::read_link(format!("/proc/{pid}/exe")).unwrap()
}

/// `KEY=VALUE` entries of `/proc/PID/environ`.
fn environ(pid: i32) -> Vec<String> {
    fs::read(format!("/proc/{pid}/environ"))
        .unwrap()
        .split(|&b| b == 0)
        .map(|e| String::from_utf8_lossy(e).into_owned())
        .collect()
}

/// `current -> releases/v1`, started as `./current/echo`; `current` flipped to `releases/v2`,
/// SIGHUP: v2 runs (before, the upgrade re-executed `current_exe()`, v1's resolved path). Then
/// back to v1 (a rollback is a deploy too). Under light load, nothing fails.
#[test]
fn a_symlink_flip_then_sighup_starts_the_new_release() {
    let server = EchoServer::start(EchoOpts {
        symlink_deploy: true,
        ..Default::default()
    });
    let dir = fs::canonicalize(server.dir()).unwrap();
    let v1 = dir.join("releases/v1/echo");
    let v2 = dir.join("releases/v2/echo");
    assert_eq!(exe_of(server.pid()), v1);
    let load = Load::start(server.addr(), 2, 4);
    thread::sleep(Duration::from_millis(200));

    server.flip_current("v2");
    let new = server.upgrade();
    assert_eq!(
        exe_of(new),
        v2,
        "the upgrade after the flip did not start the new release\n{}",
        server.log_tail()
    );

    server.flip_current("v1");
    let back = server.upgrade();
    assert_eq!(exe_of(back), v1, "{}", server.log_tail());

    thread::sleep(Duration::from_millis(200));
    let report = load.stop();
    eprintln!("{report}");
    report.assert_clean();
    server.stop();
}

/// `Builder::env` and `Builder::env_refresh`: the new process gets the variable set, and what
/// the env file says at the upgrade (not at start); ringflip's own variables are not left to
/// the hook.
#[test]
fn the_successors_environment_is_set_and_refreshed() {
    let dir = TempDir::new("deploy-env");
    let env_file = dir.path().join("env");
    fs::write(&env_file, "DEPLOY_VERSION=v1\nRINGFLIP_UPGRADE_ID=forged\n").unwrap();
    let server = EchoServer::start(EchoOpts {
        extra_args: vec![
            "--successor-env".into(),
            "FIXED=yes".into(),
            "--successor-env-file".into(),
            env_file.display().to_string(),
        ],
        ..Default::default()
    });
    let first = environ(server.pid());
    assert!(!first.iter().any(|e| e.starts_with("FIXED=")), "{first:?}");

    fs::write(&env_file, "DEPLOY_VERSION=v2\nRINGFLIP_UPGRADE_ID=forged\n").unwrap();
    let new = server.upgrade();
    let env = environ(new);
    assert!(env.contains(&"FIXED=yes".to_string()), "{env:?}");
    assert!(env.contains(&"DEPLOY_VERSION=v2".to_string()), "{env:?}");
    let ids: Vec<_> = env
        .iter()
        .filter(|e| e.starts_with("RINGFLIP_UPGRADE_ID="))
        .collect();
    assert_eq!(ids.len(), 1, "{env:?}");
    assert_ne!(ids[0], "RINGFLIP_UPGRADE_ID=forged");
    server.stop();
}

/// An int socket option of `fd`.
fn int_opt(fd: &OwnedFd, level: libc::c_int, name: libc::c_int) -> libc::c_int {
    try_int_opt(fd, level, name).unwrap_or_else(|e| panic!("getsockopt({level}, {name}): {e}"))
}

fn try_int_opt(
    fd: &OwnedFd,
    level: libc::c_int,
    name: libc::c_int,
) -> std::io::Result<libc::c_int> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt into an int of the size passed.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(v)
}

/// A duplicate (pidfd_getfd) of the listening socket of process `pid` bound to `addr`.
fn listener_of(pid: i32, addr: SocketAddr) -> OwnedFd {
    // SAFETY: a plain syscall.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    assert!(
        pidfd >= 0,
        "pidfd_open: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: a new fd, owned by nothing else.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as i32) };
    for (fd, _) in fds_of(pid) {
        // SAFETY: a plain syscall.
        let got = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
        if got < 0 {
            continue;
        }
        // SAFETY: a new fd, owned by nothing else.
        let dup = unsafe { OwnedFd::from_raw_fd(got as i32) };
        let listening =
            try_int_opt(&dup, libc::SOL_SOCKET, libc::SO_ACCEPTCONN).is_ok_and(|v| v == 1);
        let socket = socket2::SockRef::from(&dup);
        if listening && socket.local_addr().ok().and_then(|a| a.as_socket()) == Some(addr) {
            return dup;
        }
    }
    panic!("process {pid} has no socket listening on {addr}");
}

/// `Builder::listen_tcp_with`: IPV6_V6ONLY and TCP_DEFER_ACCEPT set before the bind of
/// `[::1]:PORT`, read back in the first process and, unchanged, in the process an upgrade
/// started (it inherits the socket; its setup does not run again).
#[test]
fn socket_options_set_at_bind_time_survive_the_upgrade() {
    let v6 = {
        let l = TcpListener::bind("[::1]:0").expect("bind [::1]:0");
        l.local_addr().unwrap()
    };
    let server = EchoServer::start(EchoOpts {
        extra_args: vec![
            "--listen".into(),
            v6.to_string(),
            "--v6only".into(),
            "--tcp-defer-accept".into(),
            "5".into(),
        ],
        ..Default::default()
    });
    let read = |pid: i32| {
        let fd = listener_of(pid, v6);
        (
            int_opt(&fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY),
            int_opt(&fd, libc::IPPROTO_TCP, libc::TCP_DEFER_ACCEPT),
        )
    };
    let first = read(server.pid());
    // The kernel sets IPV6_V6ONLY itself on a socket bound to a specific IPv6 address (::1),
    // so it is 1 with or without the setup; TCP_DEFER_ACCEPT is what shows the setup ran.
    assert_eq!(first.0, 1, "IPV6_V6ONLY not set");
    assert!(first.1 > 0, "TCP_DEFER_ACCEPT not set: {first:?}");
    // A client that speaks first is served (defer-accept holds it until its data).
    drop(server.open_conn(v6, "v6\n"));
    // The v4 listener was left alone (IPV6_V6ONLY does not apply to it).
    drop(server.open_conn(server.addr(), "v4\n"));

    let new = server.upgrade();
    assert_eq!(read(new), first, "{}", server.log_tail());
    drop(server.open_conn(v6, "v6 again\n"));
    server.stop();
}

/// Where io_uring is refused (a container runtime's default seccomp profile), `build` fails
/// with an error that names the cause, and the example exits 1 saying so. The filter is
/// installed in the child before exec: `io_uring_setup` answers EPERM, as under Docker.
/// (The log also shows that the examples write no colour codes into a file.)
#[cfg(target_arch = "x86_64")]
#[test]
fn without_io_uring_build_names_the_cause() {
    use std::os::unix::process::CommandExt;
    use std::process::Stdio;
    const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
    const NR_IO_URING_SETUP: u32 = 425;
    let stmt = |code: u16, k: u32| libc::sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    };
    let jeq = |k: u32, jt: u8, jf: u8| libc::sock_filter {
        code: 0x15, // BPF_JMP | BPF_JEQ | BPF_K
        jt,
        jf,
        k,
    };
    // BPF_LD | BPF_W | BPF_ABS = 0x20, BPF_RET | BPF_K = 0x06; seccomp_data: nr at 0, arch at 4.
    let program = [
        stmt(0x20, 4),
        jeq(AUDIT_ARCH_X86_64, 0, 3),
        stmt(0x20, 0),
        jeq(NR_IO_URING_SETUP, 0, 1),
        stmt(0x06, 0x0005_0000 | libc::EPERM as u32), // SECCOMP_RET_ERRNO | EPERM
        stmt(0x06, 0x7fff_0000),                      // SECCOMP_RET_ALLOW
    ];
    let mut cmd = clean_command(&echo_binary());
    cmd.arg("--listen")
        .arg(free_port().to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: two prctl calls on memory the closure owns; async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            let prog = libc::sock_fprog {
                len: program.len() as u16,
                filter: program.as_ptr() as *mut libc::sock_filter,
            };
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                || libc::prctl(
                    libc::PR_SET_SECCOMP,
                    libc::SECCOMP_MODE_FILTER,
                    &prog as *const libc::sock_fprog,
                ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = spawn(&mut cmd).expect("spawn echo under seccomp");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "echo kept running without io_uring\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        thread::sleep(Duration::from_millis(10));
    }
    let out = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{log}");
    assert!(
        log.contains("unsupported kernel: io_uring_setup is refused, most likely by a seccomp"),
        "{log}"
    );
    assert!(
        !log.contains('\u{1b}'),
        "colour codes in a log file: {log:?}"
    );
}
