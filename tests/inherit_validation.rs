//! A process started with the handoff variables validates what it inherited before trusting
//! it: the fd must be an open Unix SEQPACKET socket, the upgrade id a number, the HELLO well
//! formed and for this upgrade. Anything else is a clear error and a non-zero exit (so the
//! parent rolls back), never a silent fresh bind.

mod common;

use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{echo_binary, free_port};

/// Runs the echo binary as a would-be successor with `fd` placed at fd 3 (or nothing there).
fn run_with(fd3: Option<OwnedFd>, upgrade_id: &str, feed: impl FnOnce()) -> Output {
    let mut cmd = Command::new(echo_binary());
    cmd.args(["--listen", &free_port().to_string()])
        .env("RINGFLIP_HANDOFF_FD", "3")
        .env("RINGFLIP_UPGRADE_ID", upgrade_id)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let raw = fd3.as_ref().map(|f| f.as_raw_fd());
    // SAFETY: only async-signal-safe calls (dup2, close) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            match raw {
                // dup2(3, 3) would keep FD_CLOEXEC: clear it instead.
                Some(3) => {
                    if libc::fcntl(3, libc::F_SETFD, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Some(fd) => {
                    if libc::dup2(fd, 3) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                None => {
                    libc::close(3);
                }
            }
            Ok(())
        });
    }
    let child = common::spawn(&mut cmd).expect("spawn echo");
    drop(fd3);
    feed();
    let deadline = Instant::now() + Duration::from_secs(15);
    let pid = child.id();
    let waiter = std::thread::spawn(move || child.wait_with_output().expect("wait"));
    while !waiter.is_finished() {
        if Instant::now() > deadline {
            // SAFETY: plain syscall on the pid we started.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            panic!("the would-be successor did not give up within 15 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    waiter.join().unwrap()
}

fn assert_refused(out: &Output, needle: &str) {
    assert!(!out.status.success(), "must exit non-zero: {out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(needle),
        "stderr should say {needle:?}:\n{stderr}"
    );
    assert!(
        !stderr.contains("serving pid"),
        "it must not have started serving:\n{stderr}"
    );
}

#[test]
fn nothing_at_fd_3() {
    let out = run_with(None, "1", || {});
    assert_refused(&out, "RINGFLIP_HANDOFF_FD: fd 3 is not open");
}

#[test]
fn a_regular_file_at_fd_3() {
    let file = std::fs::File::open("/proc/self/exe").unwrap();
    let out = run_with(Some(file.into()), "1", || {});
    assert_refused(&out, "is not a socket");
}

#[test]
fn a_datagram_socket_at_fd_3() {
    let (a, _b) = UnixDatagram::pair().unwrap();
    let out = run_with(Some(a.into()), "1", || {});
    assert_refused(&out, "not SEQPACKET");
}

#[test]
fn a_bad_upgrade_id() {
    let (a, _b) = UnixDatagram::pair().unwrap();
    let out = run_with(Some(a.into()), "not-a-number", || {});
    assert_refused(&out, "RINGFLIP_UPGRADE_ID is missing or not a number");
}

fn seqpacket_pair() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two fds.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    assert_eq!(r, 0);
    // SAFETY: both fds are new and ours.
    unsafe {
        use std::os::fd::FromRawFd;
        (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1]))
    }
}

#[test]
fn garbage_instead_of_hello() {
    let (ours, theirs) = seqpacket_pair();
    let out = run_with(Some(theirs), "1", || {
        let mut s = std::fs::File::from(ours);
        let _ = s.write_all(b"definitely not a ringflip message");
    });
    assert_refused(&out, "bad magic");
}

#[test]
fn the_parent_closes_before_hello() {
    let (ours, theirs) = seqpacket_pair();
    let out = run_with(Some(theirs), "1", move || drop(ours));
    assert_refused(&out, "closed the channel before HELLO");
}
