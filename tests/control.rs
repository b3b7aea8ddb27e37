//! The control socket: `upgrade` answers with the outcome, `status` with the state, the socket is
//! 0600 and peers of another uid are refused, and it follows the service across upgrades.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use common::{echo_binary, EchoOpts, EchoServer, Load};

fn ctl(socket: &Path, command: &str) -> Output {
    common::output(
        Command::new(echo_binary())
            .arg("ctl")
            .arg(socket)
            .arg(command),
    )
    .expect("running echo ctl")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).trim_end().to_string()
}

/// One line to the control socket and its whole answer, without any client.
fn raw_exchange(socket: &Path, line: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(socket).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(format!("{line}\n").as_bytes()).unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).expect("read the answer");
    answer
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).trim_end().to_string()
}

#[test]
fn control_socket_answers_upgrade_and_status() {
    let dir = std::env::temp_dir().join(format!("ringflip-control-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("control.sock");
    let server = EchoServer::start(EchoOpts {
        extra_args: vec!["--control".into(), socket.display().to_string()],
        ..EchoOpts::default()
    });
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "control socket mode");
    let load = Load::start(server.addr(), 4, 4);

    let first = server.pid();
    let out = ctl(&socket, "status");
    assert!(out.status.success(), "{out:?}");
    let status = stdout(&out);
    let live: usize = status
        .strip_prefix(&format!("phase=Serving pid={first} generation=0 live="))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("status {status:?}"));
    // The 4 long-lived connections, plus whatever closed-loop connections the server has not
    // finished with yet.
    assert!(live >= 4, "{status:?}");

    // A good upgrade answers with the new pid, which is then the one serving.
    let out = ctl(&socket, "upgrade");
    assert!(out.status.success(), "{out:?}\n{}", server.log_tail());
    let reply = stdout(&out);
    let new: i32 = reply
        .strip_prefix("ok ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("reply {reply:?}"));
    assert_ne!(new, first);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while server.read_pid_file() != Some(new) {
        assert!(
            std::time::Instant::now() < deadline,
            "pid file never named {new}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    server.current();
    // The control socket moved with the listeners: the new process answers.
    let out = ctl(&socket, "status");
    assert!(
        stdout(&out).starts_with(&format!("phase=Serving pid={new} generation=1 ")),
        "{out:?}"
    );

    // A failing upgrade says why and exits non-zero; the service keeps serving.
    server.remove_binary();
    let out = ctl(&socket, "upgrade");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let reply = stderr(&out);
    assert!(
        reply.contains(": failed: spawn: could not start the new binary"),
        "{reply:?}"
    );
    assert_eq!(server.pid(), new);
    server.restore_binary();

    // The client only sends commands it knows; the server answers others with an error.
    let out = ctl(&socket, "bogus");
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    assert_eq!(raw_exchange(&socket, "bogus"), "error: unknown command\n");
    load.stop().assert_clean();
    server.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn control_socket_refuses_other_uids() {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: dropping to nobody needs root");
        return;
    }
    let dir = std::env::temp_dir().join(format!("ringflip-control-uid-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let socket = dir.join("control.sock");
    let server = EchoServer::start(EchoOpts {
        extra_args: vec!["--control".into(), socket.display().to_string()],
        ..EchoOpts::default()
    });
    // The test binary must be reachable for nobody, as the echo binary is (under target/).
    let as_nobody = || {
        common::output(
            Command::new(echo_binary())
                .arg("ctl")
                .arg(&socket)
                .arg("upgrade")
                .uid(65534)
                .gid(65534),
        )
        .expect("running echo ctl as nobody")
    };
    // Mode 0600: nobody cannot even connect.
    let out = as_nobody();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Permission denied"),
        "{out:?}"
    );
    // Even with the file opened up, SO_PEERCRED refuses the other uid and nothing happens.
    let before = server.pid();
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = as_nobody();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        stderr(&out).ends_with(": refused: uid 65534 is not the service's uid 0"),
        "{out:?}"
    );
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        server.pid(),
        before,
        "a refused peer must not trigger an upgrade"
    );
    server.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

/// `control_socket_allow_uid` / `_gid`: an allowed uid is served (the file is 0666, the peer
/// check decides), another uid is refused; an allowed gid is served through a 0660 file of
/// that group, which a peer of another group cannot even connect to. Needs root (setuid in the
/// child).
#[test]
fn control_socket_admits_allowed_uids_and_gids() {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: running as other uids needs root");
        return;
    }
    let dir = std::env::temp_dir().join(format!("ringflip-control-allow-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let as_user = |socket: &Path, uid: u32, gid: u32| {
        common::output(
            Command::new(echo_binary())
                .arg("ctl")
                .arg(socket)
                .arg("status")
                .uid(uid)
                .gid(gid),
        )
        .expect("running echo ctl as another user")
    };

    let by_uid = dir.join("by-uid.sock");
    let server = EchoServer::start(EchoOpts {
        extra_args: vec![
            "--control".into(),
            by_uid.display().to_string(),
            "--control-allow-uid".into(),
            "65534".into(),
        ],
        ..EchoOpts::default()
    });
    let out = as_user(&by_uid, 65534, 65534);
    assert!(out.status.success(), "{out:?}");
    assert!(stdout(&out).starts_with("phase=Serving pid="), "{out:?}");
    let out = as_user(&by_uid, 65533, 65533);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        stderr(&out).ends_with(
            ": refused: uid 65533 (gid 65533) is not the service's uid 0, root, nor an \
             allowed uid or gid"
        ),
        "{out:?}"
    );
    // The successor, with the same configuration, serves the allowed uid too.
    server.upgrade();
    let out = as_user(&by_uid, 65534, 65534);
    assert!(out.status.success(), "{out:?}\n{}", server.log_tail());
    server.stop();

    let by_gid = dir.join("by-gid.sock");
    let server = EchoServer::start(EchoOpts {
        extra_args: vec![
            "--control".into(),
            by_gid.display().to_string(),
            "--control-allow-gid".into(),
            "65534".into(),
        ],
        ..EchoOpts::default()
    });
    let meta = std::fs::metadata(&by_gid).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    assert_eq!(std::os::unix::fs::MetadataExt::gid(&meta), 65534);
    let out = as_user(&by_gid, 65533, 65534);
    assert!(out.status.success(), "{out:?}");
    let out = as_user(&by_gid, 65533, 65533);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Permission denied"),
        "{out:?}"
    );
    server.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Each control connection is served on a thread of its own, so their number is capped: one
/// beyond 16 idle ones is answered `busy: control-busy` at once (before the cap, a 17th thread
/// started and the answer was the status), and a place given back serves again. Asked with
/// the real client: the server answers without reading, and the client's write may meet a
/// closed socket (it still reads the answer; it said "could not ask" before).
#[test]
fn control_connections_beyond_the_cap_are_turned_away() {
    use ringflip::control_client::{exit_code, request, Command, Reply};
    use std::os::unix::net::UnixStream;
    let dir = std::env::temp_dir().join(format!("ringflip-control-cap-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("control.sock");
    let server = EchoServer::start(EchoOpts {
        extra_args: vec!["--control".into(), socket.display().to_string()],
        ..EchoOpts::default()
    });
    // Idle peers: each holds a serving thread waiting for its line (up to 10 s).
    let idle: Vec<UnixStream> = (0..16)
        .map(|_| UnixStream::connect(&socket).expect("connect"))
        .collect();
    for _ in 0..5 {
        let answer = request(&socket, Command::Status, Duration::from_secs(10));
        assert!(
            matches!(&answer, Ok(Reply::Busy(why)) if why.starts_with("control-busy: 16 control connections")),
            "{answer:?}\n{}",
            server.log_tail()
        );
        assert_eq!(exit_code(&answer), 2, "busy: nothing was tried");
    }
    drop(idle);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let answer = request(&socket, Command::Status, Duration::from_secs(10));
        if matches!(&answer, Ok(Reply::Status(s)) if s.starts_with("phase=Serving ")) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still turned away 5 s after the idle peers left: {answer:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    server.stop();
    let _ = std::fs::remove_dir_all(&dir);
}
