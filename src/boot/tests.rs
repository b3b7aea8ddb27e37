//! Socket acquisition, through `Builder::build`.

use std::os::fd::AsFd;

use crate::server::Server;
use crate::sys;

/// Port 0 with workers: every member of the group on the one port member 0 got (they
/// used to get a port each, so connections to `local_addr` reached member 0 only).
#[test]
fn workers_asked_for_port_0_share_one_port() {
    let mut server = Server::builder()
        .listen_tcp("web", "127.0.0.1:0".parse().unwrap())
        .workers(3)
        .build()
        .unwrap();
    let port = server.local_addr("web").unwrap().port();
    assert_ne!(port, 0);
    let workers = server.take_workers().unwrap();
    assert_eq!(workers.len(), 2);
    for w in &workers {
        let addr = sys::local_inet_addr(w.listeners[0].fd.as_fd()).unwrap();
        assert_eq!(addr.port(), port, "worker {}", w.index());
    }
}
