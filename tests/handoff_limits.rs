//! More than the old limits of one handoff: 10,000 fds (the old limit was 253, one
//! `SCM_RIGHTS` message) and 64 MiB of state (the old limit was 64 KiB), across two
//! upgrades, each generation checking what it inherited (`--handoff-report`). A 1 GiB state
//! is the `#[ignore]`d variant.

mod common;

use std::time::Instant;

use common::{EchoOpts, EchoServer};

/// Starts an echo server that hands `fds` fds and `state` bytes of state to each successor,
/// upgrades it `upgrades` times and checks each successor's report.
fn hand_over(fds: usize, state: u64, upgrades: usize) {
    let report = std::env::temp_dir().join(format!(
        "ringflip-limits-{}-{fds}-{state}",
        std::process::id()
    ));
    let _ = std::fs::remove_file(&report);
    let server = EchoServer::start(EchoOpts {
        ready_timeout_ms: Some(120_000),
        // Each process holds `fds` (the limit is per process), plus at most 253 duplicates
        // in flight on the old side and the rest of what a server has open.
        nofile: Some(fds as u64 + 1024),
        extra_args: vec![
            "--handoff-fds".into(),
            fds.to_string(),
            "--handoff-state-bytes".into(),
            state.to_string(),
            "--handoff-report".into(),
            report.display().to_string(),
        ],
        ..EchoOpts::default()
    });
    for _ in 0..upgrades {
        let _ = std::fs::remove_file(&report);
        let t0 = Instant::now();
        server.upgrade();
        eprintln!(
            "upgrade with {fds} fds and {state} state bytes: {:?}",
            t0.elapsed()
        );
        let got = std::fs::read_to_string(&report).expect("the successor wrote its report");
        assert_eq!(got.trim(), format!("fds={fds} state={state} ok=true"));
        drop(server.open_conn(server.addr(), "after the handoff\n"));
    }
    server.stop();
    let _ = std::fs::remove_file(&report);
}

#[test]
fn ten_thousand_fds_and_64_mib_of_state_cross_two_upgrades() {
    hand_over(10_000, 64 << 20, 2);
}

/// 1 GiB of state: 5–8 s for the upgrade here (the successor checks every byte as it reads),
/// too close to the upgrade helper's 10 s bound on a loaded machine, hence ignored in CI.
#[test]
#[ignore = "1 GiB of state: run by hand (cargo test --test handoff_limits -- --ignored)"]
fn one_gib_of_state() {
    hand_over(16, 1 << 30, 1);
}
