//! Thread-per-core: two workers, each with its own ring on its own SO_REUSEPORT member of the
//! listener, share the load and upgrade together with nothing lost.

mod common;

use std::time::Duration;

use common::{EchoOpts, EchoServer, Load};

#[test]
fn two_workers_share_the_load_and_upgrade_together() {
    let server = EchoServer::start(EchoOpts {
        extra_args: vec!["--workers".into(), "2".into()],
        drain_timeout_ms: Some(30_000),
        ..EchoOpts::default()
    });
    let load = Load::start(server.addr(), 8, 8);
    std::thread::sleep(Duration::from_millis(300));
    let mut pids = vec![server.pid()];
    for _ in 0..5 {
        pids.push(server.upgrade());
        std::thread::sleep(Duration::from_millis(200));
    }
    load.stop().assert_clean();
    server.assert_gone(&pids[..pids.len() - 1], Duration::from_secs(10));

    // Every generation logs at exit, per accept loop, how many connections it took: both
    // workers of the replaced generations must have taken a share (the kernel spreads a
    // SO_REUSEPORT group).
    let log = std::fs::read_to_string(server.log_path()).unwrap();
    server.stop();
    let mut per_worker = [0u64; 2];
    let mut loops = 0;
    for line in log.lines().filter(|l| l.contains("accept loop done")) {
        let field = |name: &str| -> Option<u64> {
            line.split_whitespace()
                .find_map(|t| t.strip_prefix(&format!("{name}=")))
                .and_then(|v| v.parse().ok())
        };
        let (Some(worker), Some(accepted)) = (field("worker"), field("accepted")) else {
            continue;
        };
        per_worker[worker as usize] += accepted;
        loops += 1;
    }
    assert_eq!(
        loops,
        2 * (pids.len() - 1),
        "two accept loops per replaced generation:\n{log}"
    );
    assert!(
        per_worker.iter().all(|n| *n > 100),
        "both workers should have accepted a share: {per_worker:?}"
    );
}
