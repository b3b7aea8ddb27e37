//! Back-to-back upgrades: a new upgrade may start while older generations still drain, up to
//! the configured number of draining generations; beyond it the answer is "busy" and nothing
//! else changes.

mod common;

use std::time::Duration;

use common::{EchoOpts, EchoServer, Load};

#[test]
fn three_upgrades_in_quick_succession_lose_nothing() {
    let server = EchoServer::start(EchoOpts {
        drain_timeout_ms: Some(30_000),
        ..EchoOpts::default()
    });
    let load = Load::start(server.addr(), 4, 8);
    // Each generation keeps a connection, so all of them are still draining when the next
    // upgrade starts.
    let mut held = vec![server.open_conn(server.addr(), "gen0\n")];
    let mut pids = vec![server.pid()];
    for i in 1..=3 {
        pids.push(server.upgrade());
        // The new process writes the pid file just before its READY; the old one accepts until
        // it has processed READY (tens of µs). Give it ample time, so the held connection lands
        // on the new generation.
        std::thread::sleep(Duration::from_millis(100));
        held.push(server.open_conn(server.addr(), &format!("gen{i}\n")));
    }
    for p in &pids {
        assert!(
            common::pid_alive(*p),
            "generation {p} should still be alive"
        );
    }
    load.stop().assert_clean();
    drop(held);
    server.assert_gone(&pids[..3], Duration::from_secs(10));
    server.stop();
}

#[test]
fn upgrade_is_refused_beyond_the_draining_limit_then_allowed_again() {
    let server = EchoServer::start(EchoOpts {
        drain_timeout_ms: Some(30_000),
        extra_args: vec!["--max-draining".into(), "2".into()],
        ..EchoOpts::default()
    });
    // No long-lived load connections: they would keep gen0 draining for the whole test.
    let load = Load::start(server.addr(), 4, 0);
    let gen0 = server.pid();
    let c0 = server.open_conn(server.addr(), "gen0\n");
    let gen1 = server.upgrade();
    // As above: let gen0 process READY before the connection that must land on gen1.
    std::thread::sleep(Duration::from_millis(100));
    let c1 = server.open_conn(server.addr(), "gen1\n");
    let gen2 = server.upgrade();
    // gen0 and gen1 both drain: a third upgrade is refused, gen2 keeps serving.
    server.upgrade_expect_rollback(Duration::from_millis(500));
    assert_eq!(server.pid(), gen2);
    assert!(
        server
            .log_tail()
            .contains("too many older generations are still draining"),
        "{}",
        server.log_tail()
    );
    // Once gen0 has drained and exited, one elder is left: the upgrade goes through.
    drop(c0);
    server.assert_gone(&[gen0], Duration::from_secs(10));
    let gen3 = server.upgrade();
    assert_ne!(gen3, gen2);
    load.stop().assert_clean();
    drop(c1);
    server.assert_gone(&[gen1, gen2], Duration::from_secs(10));
    server.stop();
}
