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

/// `listen_tcp_with`: the setup runs before the bind (SO_RCVBUF read back), and an error from
/// it fails `build` as a bind error naming the listener.
#[test]
fn listen_tcp_with_runs_the_setup_before_the_bind() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let ran_unbound = Arc::new(AtomicBool::new(false));
    let seen = ran_unbound.clone();
    let server = Server::builder()
        .listen_tcp_with("web", "127.0.0.1:0".parse().unwrap(), move |socket| {
            // Not bound yet: the local address is still the wildcard, port 0.
            let local = socket.local_addr()?.as_socket().unwrap();
            seen.store(local.port() == 0, Ordering::SeqCst);
            socket.set_recv_buffer_size(65536)
        })
        .build()
        .unwrap();
    assert!(
        ran_unbound.load(Ordering::SeqCst),
        "setup ran after the bind"
    );
    let fd = server.parts.listeners[0].fd.as_fd();
    // The kernel doubles what was asked for.
    assert_eq!(
        socket2::SockRef::from(&fd).recv_buffer_size().unwrap(),
        131072
    );

    let err = Server::builder()
        .listen_tcp_with("web", "127.0.0.1:0".parse().unwrap(), |_| {
            Err(std::io::Error::other("no such device"))
        })
        .build()
        .unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(err, crate::error::Error::Bind { .. }) && text.contains("no such device"),
        "{text}"
    );
}

/// `listen_backlog(1)`: the accept queue holds two connections, a third waits for a SYN
/// retransmit (connect times out); with the default backlog the third is accepted.
#[test]
fn listen_backlog_sets_the_accept_queue() {
    use std::net::TcpStream;
    use std::time::Duration;
    let connects = |server: &Server| {
        let addr = server.local_addr("web").unwrap();
        let mut ok = 0;
        let mut held = Vec::new();
        for _ in 0..4 {
            if let Ok(s) = TcpStream::connect_timeout(&addr, Duration::from_millis(300)) {
                ok += 1;
                held.push(s);
            }
        }
        ok
    };
    let small = Server::builder()
        .listen_tcp("web", "127.0.0.1:0".parse().unwrap())
        .listen_backlog(1)
        .build()
        .unwrap();
    assert_eq!(connects(&small), 2);
    let default = Server::builder()
        .listen_tcp("web", "127.0.0.1:0".parse().unwrap())
        .build()
        .unwrap();
    assert_eq!(connects(&default), 4);
}

/// A successor adopting a TCP listener `x` and an application fd its predecessor handed over
/// as `x#1` (`set_handoff_fds`): the fd is the application's, not a per-worker member of `x`
/// (it was taken for one, and adopting it as TCP failed every upgrade).
#[test]
fn an_application_fd_named_like_a_worker_member_stays_the_applications() {
    use std::os::fd::OwnedFd;

    use crate::handoff::{ListenerRecord, SocketKind};
    use crate::inherit::state::StateStream;
    use crate::inherit::{Inherited, PredecessorLink};
    use crate::listener::{Endpoint, ListenSpec};
    use crate::machine::UpgradeId;

    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = tcp.local_addr().unwrap();
    let (channel, _peer) = std::os::unix::net::UnixStream::pair().unwrap();
    let (app_fd, _) = std::os::unix::net::UnixStream::pair().unwrap();
    let record = |name: &str, kind, address: String| ListenerRecord {
        name: name.into(),
        kind,
        address,
    };
    let inherited = Inherited {
        link: PredecessorLink {
            channel: OwnedFd::from(channel),
            upgrade: UpgradeId(1),
            predecessor_pid: 1,
        },
        generation: 1,
        listeners: vec![
            (
                record("x", SocketKind::Tcp, addr.to_string()),
                OwnedFd::from(tcp),
            ),
            (
                record("x#1", SocketKind::Raw, String::new()),
                OwnedFd::from(app_fd),
            ),
        ],
        elders: Vec::new(),
        state: StateStream::new(crate::protocol::SUPPORTED.max, 0, Vec::new()).unwrap(),
        version: crate::protocol::SUPPORTED.max,
    };
    let spec = ListenSpec {
        name: "x".into(),
        endpoint: Endpoint::Tcp(addr),
        mode: None,
        reuseport: false,
        setup: None,
        backlog: None,
    };
    let sockets = super::adopt(inherited, &[spec], &[]).expect("adopt");
    assert_eq!(sockets.listeners.len(), 1);
    let names: Vec<_> = sockets
        .inherited_fds
        .iter()
        .map(|(n, _)| n.as_str())
        .collect();
    assert_eq!(names, ["x#1"]);
}
