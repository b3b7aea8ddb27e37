//! Deploys as they are done: a symlink flipped to a new release, then SIGHUP; the new
//! process's environment refreshed at the upgrade. Against `examples/echo.rs`.

mod common;

use common::*;
use std::fs;
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
