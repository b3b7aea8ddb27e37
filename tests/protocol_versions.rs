//! Upgrades between builds that speak different handoff protocol versions (see
//! `docs/PROTOCOL.md`): they use the highest version both speak, in either direction (an
//! upgrade to a newer build, a rollback to an older one), and a pair with no common version
//! is refused with a clear reason while the old process keeps serving.
//!
//! A build is made to speak other versions by `RINGFLIP_TEST_PROTOCOL_VERSIONS` (honoured in
//! debug builds only, consumed at start): the server re-executes a script that sets it and
//! execs the echo binary, as a deploy would swap the binary.

mod common;

use std::time::Duration;

use common::{echo_binary, EchoOpts, EchoServer};

const ENV: &str = "RINGFLIP_TEST_PROTOCOL_VERSIONS";

/// The binary the next upgrade starts speaks `versions` (`None`: this build's own, version 1).
fn next_speaks(server: &EchoServer, versions: Option<&str>) {
    match versions {
        None => server.restore_binary(),
        // `exec -a "$0"`: the new process keeps the script's path as its argv[0], so that its
        // own upgrades start the script again.
        Some(v) => server.replace_binary_with_script(&format!(
            "#!/bin/bash\nexport {ENV}={v}\nexec -a \"$0\" {} \"$@\"\n",
            echo_binary().display()
        )),
    }
}

fn log(server: &EchoServer) -> String {
    std::fs::read_to_string(server.log_path()).unwrap()
}

fn agreed(server: &EchoServer) -> Vec<String> {
    log(server)
        .lines()
        .filter(|l| l.contains("handoff protocol version agreed"))
        .map(|l| l.to_string())
        .collect()
}

fn assert_echoes(server: &EchoServer) {
    drop(server.open_conn(server.addr(), "still there\n"));
}

#[test]
fn upgrade_to_a_newer_version_and_roll_back() {
    // Generation 0 speaks version 1 only (a release of the past).
    let server = EchoServer::start(EchoOpts::default());

    // Old → new: the new build speaks 1..=2, the old one 1: version 1.
    next_speaks(&server, Some("1-2"));
    server.upgrade();
    assert_echoes(&server);
    let lines = agreed(&server);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains("protocol.version=1"), "{lines:?}");

    // New → new: both speak 2, the highest common version.
    server.upgrade();
    assert_echoes(&server);
    let lines = agreed(&server);
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(lines[1].contains("protocol.version=2"), "{lines:?}");

    // New → old (the rollback of a bad release): version 1 again. The OFFER carried a
    // version 2 handoff, which the old build drops; the new process sends it again in 1.
    assert!(!log(&server).contains("handoff sent again"));
    next_speaks(&server, None);
    server.upgrade();
    assert_echoes(&server);
    let lines = agreed(&server);
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert!(lines[2].contains("protocol.version=1"), "{lines:?}");
    assert!(
        log(&server).contains("handoff sent again in the version agreed"),
        "{}",
        log(&server)
    );
    server.stop();
}

#[test]
fn no_common_version_is_refused_and_the_old_process_serves_on() {
    let server = EchoServer::start(EchoOpts::default());
    // A build that dropped version 1.
    next_speaks(&server, Some("2-3"));
    server.upgrade_expect_rollback(Duration::from_secs(2));
    assert_echoes(&server);
    let text = log(&server);
    assert!(
        text.contains(
            "the new binary speaks handoff protocol versions 2..=3, this process speaks 1: \
             no common version"
        ),
        "the old process must say why:\n{text}"
    );
    assert!(
        text.contains(
            "the previous process speaks handoff protocol versions 1, this build speaks 2..=3"
        ),
        "the refusing process must say why:\n{text}"
    );
    // A build that speaks 1 again is taken.
    next_speaks(&server, None);
    server.upgrade();
    assert_echoes(&server);
    server.stop();
}

/// The other direction: the serving process is the newer one (it speaks 2..=3), the binary
/// it starts speaks 1 only: the old build refuses, the newer process keeps serving.
#[test]
fn an_older_binary_that_cannot_follow_refuses() {
    let server = EchoServer::start(EchoOpts {
        env: vec![(ENV.into(), "2-3".into())],
        ..EchoOpts::default()
    });
    server.upgrade_expect_rollback(Duration::from_secs(2));
    assert_echoes(&server);
    let text = log(&server);
    assert!(
        text.contains(
            "the new binary speaks handoff protocol versions 1, this process speaks 2..=3: \
             no common version"
        ),
        "{text}"
    );
    server.stop();
}
