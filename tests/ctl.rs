//! The `ringflip-ctl` binary against the echo example's control socket: its exit status says
//! whether the upgrade happened (0 and the new pid), failed (1), was refused as busy (2) or could
//! not be asked (3: no server, timeout), within its `--timeout`.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{example_binary, EchoOpts, EchoServer};

fn ctl_command(socket: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ringflip-ctl"));
    cmd.arg("--socket").arg(socket).args(args);
    cmd
}

/// Runs `ringflip-ctl --socket SOCKET ARGS…`, with how long it took.
fn ctl(socket: &Path, args: &[&str]) -> (Output, Duration) {
    let t0 = Instant::now();
    let out = common::output(&mut ctl_command(socket, args)).expect("running ringflip-ctl");
    (out, t0.elapsed())
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).trim_end().to_string()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).trim_end().to_string()
}

/// An echo server with a control socket in a temp dir of its own (kept as long as the test).
fn server_with_control(ready_timeout_ms: Option<u64>) -> (EchoServer, PathBuf, common::TempDir) {
    let dir = common::TempDir::new("ctl-sock");
    let socket = dir.path().join("control.sock");
    let server = EchoServer::start(EchoOpts {
        ready_timeout_ms,
        extra_args: vec!["--control".into(), socket.display().to_string()],
        ..EchoOpts::default()
    });
    (server, socket, dir)
}

/// Replaces the server's binary with the misbehave example in mode `hang` (never READY).
fn make_successor_hang(server: &EchoServer) {
    server.replace_binary_with_script(&format!(
        "#!/bin/sh\nexec {} hang\n",
        example_binary("misbehave").display()
    ));
}

/// Polls `status` until the phase is `phase`.
fn wait_for_phase(server: &EchoServer, socket: &Path, phase: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (out, _) = ctl(socket, &["status"]);
        if stdout(&out).starts_with(&format!("phase={phase} ")) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "phase never {phase}: {out:?}\n{}",
            server.log_tail()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn ctl_upgrade_exits_0_with_the_new_pid() {
    let (server, socket, _dir) = server_with_control(None);
    let first = server.pid();
    let (out, _) = ctl(&socket, &["status"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(
        stdout(&out).starts_with(&format!("phase=Serving pid={first} generation=0 live=")),
        "{out:?}"
    );

    let (out, _) = ctl(&socket, &["upgrade"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}\n{}", server.log_tail());
    let new: i32 = stdout(&out)
        .strip_prefix("ok ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("{out:?}"));
    assert_ne!(new, first);
    // The pid printed is the one now serving, at the control socket too.
    let (out, _) = ctl(&socket, &["status", "--timeout", "10"]);
    assert!(
        stdout(&out).starts_with(&format!("phase=Serving pid={new} generation=1 ")),
        "{out:?}"
    );
    server.current();
    server.stop();
}

#[test]
fn ctl_failed_upgrade_exits_1_with_the_reason() {
    let (server, socket, _dir) = server_with_control(None);
    let first = server.pid();
    server.remove_binary();
    let (out, _) = ctl(&socket, &["upgrade"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}\n{}", server.log_tail());
    assert_eq!(stdout(&out), "", "nothing on stdout when it failed");
    assert!(
        stderr(&out).contains(": failed: spawn: could not start the new binary"),
        "{out:?}"
    );
    // The old process still serves and answers.
    let (out, _) = ctl(&socket, &["status"]);
    assert!(
        stdout(&out).starts_with(&format!("phase=Serving pid={first} generation=0 ")),
        "{out:?}"
    );
    server.restore_binary();
    server.stop();
}

#[test]
fn ctl_busy_exits_2_at_once() {
    // The successor hangs: the first request waits for it until the 4 s ready timeout.
    let (server, socket, _dir) = server_with_control(Some(4_000));
    make_successor_hang(&server);
    let first: Child = common::spawn(
        ctl_command(&socket, &["upgrade"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    )
    .expect("spawn ringflip-ctl");
    wait_for_phase(&server, &socket, "HandingOver");

    let (out, took) = ctl(&socket, &["upgrade"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}\n{}", server.log_tail());
    assert!(
        stderr(&out).contains(": busy: in-flight: an upgrade is already in flight"),
        "{out:?}"
    );
    assert!(took < Duration::from_secs(3), "busy took {took:?}");

    // The first client learns, at the ready timeout, that the upgrade failed (waited for before
    // the server stops: stopping it reaps every child of the test).
    let out = first.wait_with_output().expect("first ringflip-ctl");
    assert_eq!(out.status.code(), Some(1), "{out:?}\n{}", server.log_tail());
    assert!(
        stderr(&out).contains(": failed: ready-timeout: "),
        "{out:?}"
    );
    server.restore_binary();
    server.stop();
}

#[test]
fn ctl_timeout_exits_3_within_the_bound() {
    let (server, socket, _dir) = server_with_control(Some(20_000));
    make_successor_hang(&server);
    let (out, took) = ctl(&socket, &["upgrade", "--timeout", "1"]);
    assert_eq!(out.status.code(), Some(3), "{out:?}\n{}", server.log_tail());
    assert!(stderr(&out).contains("no answer within 1 s"), "{out:?}");
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(4),
        "took {took:?} for --timeout 1"
    );
    // Giving up did not cancel the upgrade: it is still in flight.
    wait_for_phase(&server, &socket, "HandingOver");
    server.restore_binary();
    server.stop();
}

#[test]
fn ctl_without_a_server_exits_3() {
    let dir = common::TempDir::new("ctl-none");
    // No file at all.
    let (out, took) = ctl(&dir.path().join("missing.sock"), &["upgrade"]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(stderr(&out).contains("cannot connect"), "{out:?}");
    assert!(took < Duration::from_secs(5), "took {took:?}");
    // A socket file nobody listens on any more (a service that died).
    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    let (out, _) = ctl(&stale, &["status"]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(stderr(&out).contains("Connection refused"), "{out:?}");
    // Bad arguments are neither.
    let (out, _) = ctl(&stale, &["reload"]);
    assert_eq!(out.status.code(), Some(64), "{out:?}");
}
