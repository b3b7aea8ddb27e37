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
/// the application, whose handler runs (the example logs where a service would reload its
/// configuration), in the first generation and in its successors.
#[test]
fn another_upgrade_signal_upgrades_and_leaves_sighup_to_the_application() {
    let server = EchoServer::start(EchoOpts {
        extra_args: vec!["--upgrade-signal".into(), "usr2".into()],
        ..Default::default()
    });
    let old = server.current();
    let load = Load::start(server.addr(), 2, 4);
    const RELOAD: &str = "SIGHUP: the application reloads its configuration";
    assert!(signal(old, libc::SIGHUP));
    server.wait_for_log(
        RELOAD,
        Duration::from_secs(5),
        "the application's SIGHUP handler",
    );
    thread::sleep(Duration::from_millis(100));
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
    // The successor handles SIGHUP as its predecessor did, and stays.
    assert!(signal(server.current(), libc::SIGHUP));
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while log_text(&server).matches(RELOAD).count() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "{}",
            server.log_tail()
        );
        thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(server.pid(), new);
    drop(server.open_conn(server.addr(), "after SIGHUP to the successor\n"));
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
