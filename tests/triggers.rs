//! What the signals do, as an application configures it: another upgrade signal than SIGHUP
//! (`Builder::upgrade_signal`), SIGHUP then left to the application, and a stop signal heard
//! by the application (`Builder::on_stop_signal`). Real processes: `examples/echo.rs`.

mod common;

use common::*;
use std::fs;
use std::thread;
use std::time::Duration;

fn log_text(server: &EchoServer) -> String {
    fs::read_to_string(server.log_path()).unwrap_or_default()
}

/// With `--upgrade-signal usr2`, SIGUSR2 upgrades and SIGHUP does not: ringflip leaves SIGHUP to
/// the application (the example ignores it, where a service would reload its configuration).
#[test]
fn another_upgrade_signal_upgrades_and_leaves_sighup_to_the_application() {
    let server = EchoServer::start(EchoOpts {
        extra_args: vec!["--upgrade-signal".into(), "usr2".into()],
        ..Default::default()
    });
    let old = server.current();
    let load = Load::start(server.addr(), 2, 4);
    assert!(signal(old, libc::SIGHUP));
    thread::sleep(Duration::from_millis(300));
    assert!(
        old.alive(),
        "SIGHUP ended the process\n{}",
        server.log_tail()
    );
    assert_eq!(server.read_pid_file(), Some(old.pid), "SIGHUP upgraded");
    assert!(
        !log_text(&server).contains("phase=Forking"),
        "{}",
        server.log_tail()
    );
    drop(server.open_conn(server.addr(), "after SIGHUP\n"));

    let new = server.upgrade_with(libc::SIGUSR2);
    assert_ne!(new, old.pid);
    drop(server.open_conn(server.addr(), "after SIGUSR2\n"));
    // The new generation reads SIGUSR2 too (the option is passed on with the arguments).
    let newer = server.upgrade_with(libc::SIGUSR2);
    assert_ne!(newer, new);
    let report = load.stop();
    eprintln!("RESULT upgrade signal usr2: SIGHUP ignored, 2 upgrades by SIGUSR2; load: {report}");
    report.assert_clean();
    server.stop();
}

/// SIGTERM stops the server as always, and the application's hook hears it first.
#[test]
fn the_application_hears_the_stop_signal() {
    let server = EchoServer::start(EchoOpts::default());
    assert!(signal(server.current(), libc::SIGTERM));
    server.wait_for_log(
        "the application heard a stop signal signal=Term",
        Duration::from_secs(5),
        "the stop hook was not run",
    );
    let log = log_text(&server);
    let heard = log.find("the application heard a stop signal").unwrap();
    let stopping = log
        .find("shutdown requested")
        .expect("the shutdown in the log");
    assert!(
        heard < stopping,
        "the hook ran after the shutdown began\n{log}"
    );
    server.stop();
}
