//! The new process takes connections from its READY on, even while the old one has not yet
//! noticed the READY (a busy runtime thread): see `start_takeover` in src/driver/takeover.rs.
//!
//! Needs the example binaries: `cargo build --examples && cargo test --test takeover`.

mod common;

use common::*;
use std::thread;
use std::time::{Duration, Instant};

const STALL: Duration = Duration::from_millis(3000);

/// The old process blocks its serving thread for 3 s as soon as the upgrade reaches
/// HandingOver (`--stall-on-handover-ms`), so it cannot notice READY, stop accepting or serve
/// anything for that long. Connections made after the new process is READY must still be
/// served at once — by the new process — and none may fail; the old one then finishes its
/// stall, lets go and exits.
#[test]
fn new_process_serves_while_the_old_one_is_stalled() {
    let server = EchoServer::start(EchoOpts {
        extra_args: vec![
            "--stall-on-handover-ms".into(),
            STALL.as_millis().to_string(),
        ],
        ..Default::default()
    });
    let addr = server.addr();
    echo_once(
        addr,
        "before",
        Duration::from_secs(2),
        Duration::from_secs(2),
    )
    .expect("served before the upgrade");
    let old = server.current();
    let t0 = Instant::now();
    let new = server.upgrade();
    assert_ne!(new, old.pid);
    // READY is sent right after the pid file is written.
    thread::sleep(Duration::from_millis(20));

    // 20 connections one after the other, each timed.
    let during_stall = Load::start_with(
        addr,
        LoadOpts {
            closed_loop_threads: 1,
            long_lived: 0,
            connections_per_thread: Some(20),
            connect_timeout: Duration::from_secs(5),
            io_timeout: Duration::from_secs(5),
            record_samples: true,
            ..LoadOpts::default()
        },
    )
    .wait();
    assert!(
        during_stall.failures() == 0 && during_stall.connections_ok == 20,
        "connections failed: {during_stall}\n--- server log ---\n{}",
        server.log_tail()
    );
    let worst = during_stall
        .samples
        .iter()
        .map(|&(start, end, _)| end - start)
        .max()
        .unwrap_or_default();
    let during = t0.elapsed();
    // Meaningful only if all of it happened while the old process was still stalled.
    assert!(
        during < STALL - Duration::from_millis(500),
        "the connections took until {during:?} after SIGHUP: not within the {STALL:?} stall"
    );
    assert!(
        worst < Duration::from_millis(500),
        "a connection waited {worst:?} while the old process was stalled: the new process did \
         not take it\n--- server log ---\n{}",
        server.log_tail()
    );
    assert!(old.alive(), "the old process should still be stalled");

    // After the stall the old process notices READY, stops accepting, says RELEASED, drains and
    // exits; the new one stops its takeover polls.
    server.assert_gone(&[old.pid], STALL + Duration::from_secs(10));
    let log = std::fs::read_to_string(server.log_path()).unwrap_or_default();
    assert!(
        log.contains("taking connections alongside it"),
        "no takeover logged\n{}",
        server.log_tail()
    );
    // The new process logs it when it reads RELEASED or EOF, at its own pace: wait for it.
    server.wait_for_log(
        "takeover polls stopped",
        Duration::from_secs(10),
        "the takeover did not end",
    );
    echo_once(
        addr,
        "after",
        Duration::from_secs(2),
        Duration::from_secs(2),
    )
    .expect("served after the old process left");
    println!(
        "RESULT new_process_serves_while_the_old_one_is_stalled: 20 connections during a {} ms \
         stall of the old process, worst {:.1} ms, 0 failed",
        STALL.as_millis(),
        worst.as_secs_f64() * 1e3
    );
    server.stop();
}

/// The takeover ends when the old process says RELEASED (its accepts have all stopped), not
/// only when it exits: here a held connection keeps the old process draining long after it let
/// go, and the new one must stop its takeover polls while the old one is still alive.
#[test]
fn takeover_ends_on_released_while_the_old_one_drains() {
    let server = EchoServer::start(EchoOpts {
        extra_args: vec!["--stall-on-handover-ms".into(), "300".into()],
        drain_timeout_ms: Some(30_000),
        ..Default::default()
    });
    let addr = server.addr();
    // Held open across the upgrade: the old process drains until it is closed.
    let held = server.open_conn(addr, "held");
    let old = server.current();
    server.upgrade();
    server.wait_for_log(
        "takeover polls stopped",
        Duration::from_secs(10),
        "the takeover never ended",
    );
    let log = || std::fs::read_to_string(server.log_path()).unwrap_or_default();
    assert!(
        log().contains("taking connections alongside it"),
        "the 300 ms stall should have started a takeover\n{}",
        server.log_tail()
    );
    assert!(
        old.alive(),
        "the old process exited: the takeover may have ended at its EOF, not at RELEASED"
    );
    drop(held);
    server.assert_gone(&[old.pid], Duration::from_secs(10));
    server.stop();
}
