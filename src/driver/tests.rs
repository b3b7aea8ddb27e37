//! The driver as a successor, with the test playing its predecessor in the same process: the
//! predecessor's side is a bare ring and the handoff channel, so each step happens exactly when
//! the test says.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use io_uring::{opcode, types, IoUring};
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};

use crate::handoff::Message;
use crate::inherit::ParentLink;
use crate::machine::UpgradeId;
use crate::server::Server;

use super::Driver;

const UPGRADE: UpgradeId = UpgradeId(0x5eed);

/// A predecessor's ring as the driver makes it: SINGLE_ISSUER|DEFER_TASKRUN, so its accept
/// runs only when this thread enters it.
fn predecessor_ring() -> IoUring {
    IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .build(8)
        .unwrap()
}

/// Every CQE the ring has for us, after running its deferred work.
fn reap(ring: &mut IoUring) -> Vec<(u64, i32)> {
    // SAFETY: no argument pointer; GETEVENTS only runs deferred completions.
    unsafe {
        ring.submitter()
            .enter::<libc::sigset_t>(0, 0, super::ENTER_GETEVENTS, None)
            .unwrap();
    }
    ring.completion()
        .map(|c| (c.user_data(), c.result()))
        .collect()
}

/// A driver for a successor of this very process, on its own listener, with the predecessor's
/// accept armed on that listener first (so it gets every wake-up, as a real predecessor does).
/// Returns the driver (READY already sent), the predecessor's ring and channel end, and the
/// listener's address.
fn successor_with_predecessor() -> (Driver, IoUring, OwnedFd, std::net::SocketAddr) {
    let mut server = Server::builder()
        .listen_tcp("t", "127.0.0.1:0".parse().unwrap())
        .build()
        .unwrap();
    let addr = server.local_addr("t").unwrap();
    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .unwrap();
    server.parent = Some(ParentLink {
        channel: theirs,
        upgrade: UPGRADE,
        parent_pid: std::process::id(),
    });
    let mut old = predecessor_ring();
    let listener = server.listeners[0].fd.as_raw_fd();
    // SAFETY: the entry points at nothing of ours; the listener outlives the ring's use of it.
    unsafe {
        old.submission()
            .push(
                &opcode::AcceptMulti::new(types::Fd(listener))
                    .build()
                    .user_data(1),
            )
            .unwrap();
    }
    old.submit().unwrap();
    let mut driver = Driver::new(server).unwrap();
    // No takeover polls: they would also take the stranded connection, and the test is about
    // what happens when the predecessor lets go within TAKEOVER_AFTER (the usual case).
    driver.takeover_at = None;
    let mut buf = [0u8; 64];
    crate::sys::set_recv_timeout(ours.as_fd(), Duration::from_secs(5)).unwrap();
    let n = nix::sys::socket::recv(
        ours.as_raw_fd(),
        &mut buf,
        nix::sys::socket::MsgFlags::empty(),
    )
    .unwrap();
    assert_eq!(Message::decode(&buf[..n]).unwrap(), Message::Ready(UPGRADE));
    (driver, old, ours, addr)
}

/// A connection that arrives after the predecessor last entered its ring and before it
/// cancels its accept: the predecessor's accept spends the (exclusive) wake-up and ends with
/// -ECANCELED, the connection stays queued, and nobody else is woken for it. The successor
/// must take it once the predecessor has let go, without waiting for another connection.
#[test]
fn a_connection_whose_wake_up_the_predecessor_spent_is_served_after_release() {
    let (mut driver, mut old, channel, addr) = successor_with_predecessor();

    let mut client = TcpStream::connect(addr).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    client.write_all(b"x").unwrap();
    // Give the wake-up time to reach the predecessor's accept (it is queued as deferred work).
    std::thread::sleep(Duration::from_millis(20));
    // The predecessor lets go: cancel (submitted on its own, so no deferred work runs first),
    // then reap. Its accept must end cancelled with the connection left in the queue: that is
    // the situation under test (if this kernel accepted it here, the test proves nothing).
    // SAFETY: a cancel carries no pointer.
    unsafe {
        old.submission()
            .push(&opcode::AsyncCancel::new(1).build().user_data(2))
            .unwrap();
    }
    old.submit().unwrap();
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(2);
    while !seen.iter().any(|&(ud, _)| ud == 1) && Instant::now() < deadline {
        seen.extend(reap(&mut old));
    }
    assert!(
        seen.contains(&(1, -libc::ECANCELED)) && !seen.iter().any(|&(ud, res)| ud == 1 && res >= 0),
        "the predecessor's accept should end cancelled, not take the connection: {seen:?}"
    );
    let released = Message::Released(UPGRADE).encode().unwrap();
    crate::sys::send_nonblocking(channel.as_fd(), &released).unwrap();

    // The successor's turns: the stranded connection must reach its code, with no other
    // connection arriving to wake its accept.
    let mut delivered = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(2);
    while delivered.is_empty() && Instant::now() < deadline {
        driver
            .turn(false, &mut |conn| delivered.push(conn.into_parts()))
            .unwrap();
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(
        delivered.len(),
        1,
        "the connection queued while the predecessor let go was not taken within 2 s"
    );
    let (fd, _guard) = delivered.pop().unwrap();
    let mut accepted = TcpStream::from(fd);
    let mut byte = [0u8; 1];
    accepted.read_exact(&mut byte).unwrap();
    assert_eq!(&byte, b"x");
}

/// The same with thread-per-core: each worker's listener is a member of a SO_REUSEPORT group,
/// so a connection may be stranded on any member, the workers' included. The predecessor
/// (armed first on every member) spends the wake-ups of 16 connections and cancels; after
/// RELEASED to the coordinator, the coordinator and its worker between them must take all 16.
/// (Without the workers' re-arm, those that landed on the worker's member stay queued; with
/// 16 connections over two members, that is all but certain.)
#[test]
fn connections_stranded_on_a_workers_listener_are_served_after_release() {
    const CONNS: usize = 16;
    let mut server = Server::builder()
        .listen_tcp("t", "127.0.0.1:0".parse().unwrap())
        .workers(2)
        .build()
        .unwrap();
    let addr = server.local_addr("t").unwrap();
    let mut workers = server.take_workers().unwrap();
    let worker = workers.pop().unwrap();
    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .unwrap();
    server.parent = Some(ParentLink {
        channel: theirs,
        upgrade: UPGRADE,
        parent_pid: std::process::id(),
    });
    let mut old = predecessor_ring();
    let members = [
        server.listeners[0].fd.as_raw_fd(),
        worker.listeners[0].fd.as_raw_fd(),
    ];
    for (i, fd) in members.iter().enumerate() {
        // SAFETY: as in `successor_with_predecessor`.
        unsafe {
            old.submission()
                .push(
                    &opcode::AcceptMulti::new(types::Fd(*fd))
                        .build()
                        .user_data(i as u64 + 1),
                )
                .unwrap();
        }
    }
    old.submit().unwrap();
    let mut coordinator = server.into_driver("test").unwrap();
    coordinator.takeover_at = None; // as in `successor_with_predecessor`
    let mut worker = Driver::new_worker(worker).unwrap();
    let mut buf = [0u8; 64];
    crate::sys::set_recv_timeout(ours.as_fd(), Duration::from_secs(5)).unwrap();
    let n = nix::sys::socket::recv(
        ours.as_raw_fd(),
        &mut buf,
        nix::sys::socket::MsgFlags::empty(),
    )
    .unwrap();
    assert_eq!(Message::decode(&buf[..n]).unwrap(), Message::Ready(UPGRADE));

    let clients: Vec<TcpStream> = (0..CONNS)
        .map(|_| TcpStream::connect(addr).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(20));
    for ud in [1u64, 2] {
        // SAFETY: a cancel carries no pointer.
        unsafe {
            old.submission()
                .push(&opcode::AsyncCancel::new(ud).build().user_data(10 + ud))
                .unwrap();
        }
    }
    old.submit().unwrap();
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(2);
    while seen.iter().filter(|&&(ud, _)| ud <= 2).count() < 2 && Instant::now() < deadline {
        seen.extend(reap(&mut old));
    }
    let taken_by_old = seen
        .iter()
        .filter(|&&(ud, res)| ud <= 2 && res >= 0)
        .count();
    assert_eq!(taken_by_old, 0, "the predecessor accepted some: {seen:?}");
    let released = Message::Released(UPGRADE).encode().unwrap();
    crate::sys::send_nonblocking(ours.as_fd(), &released).unwrap();

    let mut delivered = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(2);
    while delivered.len() < CONNS && Instant::now() < deadline {
        coordinator
            .turn(false, &mut |conn| delivered.push(conn.into_parts()))
            .unwrap();
        worker
            .turn(false, &mut |conn| delivered.push(conn.into_parts()))
            .unwrap();
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(
        delivered.len(),
        CONNS,
        "connections queued while the predecessor let go, not taken within 2 s"
    );
    drop(clients);
}
