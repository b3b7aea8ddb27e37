//! Thread-per-core: two workers, each with its own ring on its own SO_REUSEPORT member of the
//! listener, share the load and upgrade together with nothing lost; with a tokio-uring runtime
//! per ring (`Server::take_workers`, `Worker::run_async`) and blocking (`Server::run_workers`).
//! And the API's rules: the coordinator needs its workers taken, a coordinator that is never
//! run (or fails) lets its workers go.

mod common;

use std::sync::mpsc;
use std::time::Duration;

use common::{EchoOpts, EchoServer, Load};
use ringflip::Server;

#[test]
fn two_workers_share_the_load_and_upgrade_together() {
    two_workers(&[]);
}

#[test]
fn two_blocking_workers_share_the_load_and_upgrade_together() {
    two_workers(&["--runtime", "blocking"]);
}

fn two_workers(runtime: &[&str]) {
    let mut extra_args = vec!["--workers".to_string(), "2".to_string()];
    extra_args.extend(runtime.iter().map(|a| a.to_string()));
    let server = EchoServer::start(EchoOpts {
        extra_args,
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

fn workers_server() -> Server {
    Server::builder()
        .listen_tcp("w", "127.0.0.1:0".parse().unwrap())
        .workers(2)
        .build()
        .expect("build")
}

#[test]
fn a_coordinator_needs_its_workers_taken_once() {
    let server = workers_server();
    match server.run(drop) {
        Err(ringflip::Error::Config(msg)) => assert!(msg.contains("take_workers"), "{msg}"),
        other => panic!("run without take_workers: {other:?}"),
    }
    let mut server = workers_server();
    let workers = server.take_workers().expect("take_workers");
    assert_eq!(
        workers.iter().map(|w| w.index()).collect::<Vec<_>>(),
        vec![1]
    );
    assert!(matches!(
        server.take_workers(),
        Err(ringflip::Error::Config(_))
    ));
    // Without workers(n) there is nothing to take, and run works as ever.
    let mut single = Server::builder()
        .listen_tcp("s", "127.0.0.1:0".parse().unwrap())
        .build()
        .expect("build");
    assert!(single.take_workers().expect("take_workers").is_empty());
}

#[test]
fn workers_of_a_coordinator_dropped_unrun_stop() {
    let mut server = workers_server();
    let mut workers = server.take_workers().expect("take_workers");
    let worker = workers.pop().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || tx.send(worker.run(drop)).unwrap());
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        rx.try_recv().is_err(),
        "the worker serves while its coordinator lives"
    );
    drop(server);
    let result = rx
        .recv_timeout(Duration::from_secs(5))
        .expect("the worker stops once its coordinator is gone");
    assert!(result.is_ok(), "{result:?}");
}

#[test]
fn a_worker_dropped_unrun_does_not_hold_up_the_coordinator() {
    let mut server = Server::builder()
        .listen_tcp("w", "127.0.0.1:0".parse().unwrap())
        .workers(2)
        .drain_timeout(Duration::from_secs(30))
        .build()
        .expect("build");
    drop(server.take_workers().expect("take_workers"));
    let handle = server.handle();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || tx.send(server.run(drop)).unwrap());
    std::thread::sleep(Duration::from_millis(100));
    handle.shutdown();
    // The shutdown stops accepting everywhere, then drains: with a worker that never reports
    // its stop, the drain would run to its 30 s deadline.
    let result = rx
        .recv_timeout(Duration::from_secs(5))
        .expect("the coordinator finishes without waiting for the missing worker");
    assert!(result.is_ok(), "{result:?}");
}

/// A successor that runs more workers than its predecessor binds new members of the
/// SO_REUSEPORT group. If it then fails (here after `build()`: its pid file cannot be
/// written), connections the kernel hashed onto its new members would die with them (reset).
/// A new member must not listen before the predecessor has let go, and no worker may accept
/// before its coordinator has started. 2 → 4 workers, closed-loop load, the failing upgrade 10
/// times: 0 failed connections (before: 56 with the new members listening at once, 1–5 with
/// only the workers accepting early); then a good upgrade to 4 workers.
#[test]
fn a_failing_successor_with_more_workers_resets_nothing() {
    let server = EchoServer::start(EchoOpts {
        extra_args: vec!["--workers".into(), "2".into()],
        drain_timeout_ms: Some(30_000),
        ..EchoOpts::default()
    });
    let load = Load::start(server.addr(), 8, 0);
    std::thread::sleep(Duration::from_millis(200));
    let missing = server.dir().join("no-such-dir").join("echo.pid");
    server.replace_binary_with_script(&format!(
        "#!/bin/sh\nexec {} \"$@\" --workers 4 --pid-file {}\n",
        common::echo_binary().display(),
        missing.display()
    ));
    for _ in 0..10 {
        server.upgrade_expect_rollback(Duration::from_millis(150));
    }
    // A good upgrade to 4 workers: the two new members listen once the old process let go.
    server.replace_binary_with_script(&format!(
        "#!/bin/sh\nexec {} \"$@\" --workers 4\n",
        common::echo_binary().display()
    ));
    let old = server.pid();
    server.upgrade();
    server.wait_for_log(
        "new member of the group listening",
        Duration::from_secs(10),
        "the new members never listened",
    );
    std::thread::sleep(Duration::from_millis(300));
    let report = load.stop();
    eprintln!("RESULT failing-successor-more-workers: {report}");
    report.assert_clean();
    server.assert_gone(&[old], Duration::from_secs(10));
    let log = std::fs::read_to_string(server.log_path()).unwrap();
    assert_eq!(
        log.matches("new member of the group listening").count(),
        2,
        "members #2 and #3 of the 4-worker process"
    );
    server.stop();
}

/// The `listen()` backlog of every listening socket on `port`, as `ss` shows it (`Send-Q` of a
/// listening socket is its backlog).
fn listen_backlogs(port: u16) -> Vec<u32> {
    let out = std::process::Command::new("ss")
        .args(["-Hltn", &format!("sport = :{port}")])
        .output()
        .expect("ss (iproute2)");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().nth(2)?.parse().ok())
        .collect()
}

/// A member a successor adds (2 → 3 workers) listens with the application's backlog
/// (`Builder::listen_backlog`), like the sockets made on first start, not `somaxconn`.
#[test]
fn a_member_added_at_an_upgrade_listens_with_the_configured_backlog() {
    let server = EchoServer::start(EchoOpts {
        extra_args: vec![
            "--workers".into(),
            "2".into(),
            "--listen-backlog".into(),
            "17".into(),
        ],
        ..EchoOpts::default()
    });
    let port = server.addr().port();
    assert_eq!(listen_backlogs(port), vec![17, 17]);
    server.replace_binary_with_script(&format!(
        "#!/bin/sh\nexec {} \"$@\" --workers 3\n",
        common::echo_binary().display()
    ));
    let old = server.pid();
    server.upgrade();
    server.wait_for_log(
        "new member of the group listening",
        Duration::from_secs(10),
        "the new member never listened",
    );
    server.assert_gone(&[old], Duration::from_secs(10));
    let backlogs = listen_backlogs(port);
    eprintln!("RESULT member backlog: {backlogs:?}");
    assert_eq!(backlogs, vec![17, 17, 17], "{}", server.log_tail());
    server.stop();
}
