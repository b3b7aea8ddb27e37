//! Every embedding mode upgrades under load without losing a connection: tokio-uring and plain
//! tokio (`Server::run_async` as a task of the runtime) and blocking (`Server::run`).

mod common;

use std::time::Duration;

use common::{EchoOpts, EchoServer, Load};

fn upgrades_under_load(runtime: &str) {
    let server = EchoServer::start(EchoOpts {
        extra_args: vec!["--runtime".into(), runtime.into()],
        drain_timeout_ms: Some(30_000),
        ..EchoOpts::default()
    });
    let load = Load::start(server.addr(), 8, 8);
    let mut pids = vec![server.pid()];
    for _ in 0..5 {
        pids.push(server.upgrade());
        std::thread::sleep(Duration::from_millis(50));
    }
    load.stop().assert_clean();
    server.assert_gone(&pids[..pids.len() - 1], Duration::from_secs(10));
    server.stop();
}

#[test]
fn tokio_uring_runtime() {
    upgrades_under_load("tokio-uring");
}

#[test]
fn tokio_runtime() {
    upgrades_under_load("tokio");
}

#[test]
fn blocking_run_loop() {
    upgrades_under_load("blocking");
}
