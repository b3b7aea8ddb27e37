//! The driver as a successor, with the test playing its predecessor in the same process: the
//! predecessor's side is a bare ring and the handoff channel, so each step happens exactly when
//! the test says. In the last tests the driver also has a successor, a real process whose end
//! of the channel the test answers on.
// Raw fds of the test's own rings and channels, as the driver's code does.
#![allow(unsafe_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use io_uring::{opcode, types, IoUring};
use nix::sys::socket::{socketpair, AddressFamily, MsgFlags, SockFlag, SockType};

use crate::connection::{Connection, DrainGuard};
use crate::error::Error;
use crate::handoff::Message;
use crate::inherit::PredecessorLink;
use crate::machine::UpgradeId;
use crate::server::{Server, Worker};

use super::{Driver, Waiting};

impl Driver {
    /// A started driver: [`Driver::prepare`], then [`Driver::start`].
    fn new(server: Server, waiting: Waiting) -> Result<Driver, Error> {
        let mut driver = Driver::prepare(server.parts, waiting)?;
        driver.start()?;
        Ok(driver)
    }

    /// A started worker: [`Driver::prepare_worker`], then [`Driver::start`].
    fn new_worker(worker: Worker, waiting: Waiting) -> Result<Driver, Error> {
        let mut driver = worker.into_driver(waiting)?;
        driver.start()?;
        Ok(driver)
    }
}

const UPGRADE: UpgradeId = UpgradeId(0x5eed);
const BOUND: Duration = Duration::from_secs(2);

/// Another process's accepts, stood in for by a ring of this test process made by the
/// driver's own `new_ring` (SINGLE_ISSUER|DEFER_TASKRUN, so its accepts run only when this
/// thread enters it), with a multishot accept on each listener.
struct StandInAccepts {
    ring: IoUring,
    /// One multishot accept per listener, user_data `1..=n`.
    accepts: u64,
}

impl StandInAccepts {
    /// Arms the accepts: they wait behind every accept already armed on `listeners`, ahead of
    /// every one armed later.
    fn arm(listeners: &[RawFd]) -> StandInAccepts {
        let mut ring = super::ring::new_ring().unwrap();
        for (i, fd) in listeners.iter().enumerate() {
            let accept = opcode::AcceptMulti::new(types::Fd(*fd))
                .build()
                .user_data(i as u64 + 1);
            // SAFETY: the entry points at nothing of ours; the listeners outlive the ring.
            unsafe { ring.submission().push(&accept).unwrap() };
        }
        ring.submit().unwrap();
        StandInAccepts {
            ring,
            accepts: listeners.len() as u64,
        }
    }

    /// Cancels the accepts as a driver does (submitted on their own, so no deferred work runs
    /// first), reaps until each has ended, and checks each ended cancelled without having
    /// accepted anything — the situation under test (if this kernel accepted the connections
    /// here, the test would prove nothing).
    fn cancel_unaccepted(&mut self) {
        for ud in 1..=self.accepts {
            let cancel = opcode::AsyncCancel::new(ud).build().user_data(100 + ud);
            // SAFETY: a cancel carries no pointer.
            unsafe { self.ring.submission().push(&cancel).unwrap() };
        }
        self.ring.submit().unwrap();
        let mut seen = Vec::new();
        let deadline = Instant::now() + BOUND;
        let ended = |seen: &Vec<(u64, i32)>| seen.iter().filter(|&&(ud, _)| ud <= 100).count();
        while ended(&seen) < self.accepts as usize && Instant::now() < deadline {
            // SAFETY: no argument pointer; GETEVENTS only runs deferred completions.
            unsafe {
                self.ring
                    .submitter()
                    .enter::<libc::sigset_t>(0, 0, super::ring::ENTER_GETEVENTS, None)
                    .unwrap();
            }
            seen.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
        }
        let accepts: Vec<_> = seen.iter().filter(|&&(ud, _)| ud <= 100).collect();
        assert!(
            accepts.len() == self.accepts as usize
                && accepts.iter().all(|&&(_, res)| res == -libc::ECANCELED),
            "the stand-in's accepts should end cancelled, not take connections: {seen:?}"
        );
    }
}

/// The test's stand-in for the old process: its accepts and its end of the handoff channel.
struct Predecessor {
    accepts: StandInAccepts,
    channel: OwnedFd,
}

impl Predecessor {
    /// Makes `server` a successor of this predecessor, and arms the predecessor's accepts on
    /// `listeners` *before* the successor's driver exists, so that they get every wake-up, as
    /// a real predecessor's do.
    fn adopt(server: &mut Server, listeners: &[RawFd]) -> Predecessor {
        let (channel, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap();
        server.parts.parent = Some(PredecessorLink {
            channel: theirs,
            upgrade: UPGRADE,
            predecessor_pid: std::process::id(),
        });
        Predecessor {
            accepts: StandInAccepts::arm(listeners),
            channel,
        }
    }

    fn expect_ready(&self) {
        assert_eq!(recv_message(&self.channel), Message::Ready(UPGRADE));
    }

    /// Lets go as the driver does: its accepts cancelled without accepting anything, then
    /// RELEASED.
    fn let_go(&mut self) {
        self.accepts.cancel_unaccepted();
        let released = Message::Released(UPGRADE).encode().unwrap();
        crate::sys::send_nonblocking(self.channel.as_fd(), &released).unwrap();
    }
}

/// Turns `drivers` (without waiting) until they have delivered `n` connections or `BOUND` has
/// passed; returns what they delivered.
fn serve(drivers: &mut [&mut Driver], n: usize) -> Vec<(OwnedFd, DrainGuard)> {
    serve_within(drivers, n, BOUND)
}

/// [`serve`] for at most `bound`.
fn serve_within(
    drivers: &mut [&mut Driver],
    n: usize,
    bound: Duration,
) -> Vec<(OwnedFd, DrainGuard)> {
    let mut delivered = Vec::new();
    let deadline = Instant::now() + bound;
    while delivered.len() < n && Instant::now() < deadline {
        for driver in drivers.iter_mut() {
            let mut sink = |conn: Connection| delivered.push(conn.into_parts());
            driver.turn(false, &mut sink).unwrap();
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    delivered
}

fn tcp_server(workers: usize) -> Server {
    Server::builder()
        .listen_tcp("t", "127.0.0.1:0".parse().unwrap())
        .workers(workers)
        .build()
        .unwrap()
}

/// The driver without its takeover polls: they would also take a stranded connection, and
/// the tests are about a predecessor that lets go within TAKEOVER_AFTER (the usual case).
fn without_takeover(mut driver: Driver) -> Driver {
    // As on a kernel without IORING_ACCEPT_DONTWAIT: no takeover, nothing held back.
    driver.succession.handle(
        crate::machine::successor::SuccessionEvent::NoDontwait,
        Instant::now(),
    );
    driver
}

/// A connection that arrives after the predecessor last entered its ring and before it
/// cancels its accept: the predecessor's accept spends the (exclusive) wake-up and ends with
/// -ECANCELED, the connection stays queued, and nobody else is woken for it. The successor
/// must take it once the predecessor has let go, without waiting for another connection.
#[test]
fn a_connection_whose_wake_up_the_predecessor_spent_is_served_after_release() {
    let mut server = tcp_server(1);
    let addr = server.local_addr("t").unwrap();
    let listener = server.parts.listeners[0].fd.as_raw_fd();
    let mut old = Predecessor::adopt(&mut server, &[listener]);
    let mut driver = without_takeover(Driver::new(server, super::Waiting::InRing).unwrap());
    old.expect_ready();

    let mut client = TcpStream::connect(addr).unwrap();
    client.write_all(b"x").unwrap();
    // Give the wake-up time to reach the predecessor's accept (it is queued as deferred work).
    std::thread::sleep(Duration::from_millis(20));
    old.let_go();

    let delivered = serve(&mut [&mut driver], 1);
    expect_the_x(
        delivered,
        "the connection queued while the predecessor let go",
    );
}

/// `delivered` is the one connection whose client wrote "x", taken within `BOUND`.
fn expect_the_x(mut delivered: Vec<(OwnedFd, DrainGuard)>, what: &str) {
    assert_eq!(delivered.len(), 1, "{what} was not taken within {BOUND:?}");
    let (fd, _guard) = delivered.pop().unwrap();
    let mut byte = [0u8; 1];
    TcpStream::from(fd).read_exact(&mut byte).unwrap();
    assert_eq!(&byte, b"x");
}

/// The same with thread-per-core: each worker's listener is a member of a SO_REUSEPORT group,
/// so a connection may be stranded on any member, the workers' included. The predecessor
/// (armed first on every member) spends the wake-ups of 16 connections and cancels; after
/// RELEASED to the coordinator, the coordinator and its worker between them must take all 16.
/// (Without the workers' sweep, those that landed on the worker's member stay queued; with
/// 16 connections over two members, that is all but certain.)
#[test]
fn connections_stranded_on_a_workers_listener_are_served_after_release() {
    successor_with_a_worker(super::Waiting::InRing, Duration::from_millis(20));
}

/// The two SO_REUSEPORT members of a two-worker server's listener (see `tcp_server`).
fn members_of(server: &Server) -> Vec<RawFd> {
    let members: Vec<RawFd> = server
        .parts
        .listeners
        .iter()
        .map(|l| l.fd.as_raw_fd())
        .collect();
    assert_eq!(members.len(), 2, "one listener per worker");
    members
}

/// A two-worker server's drivers, started: the coordinator's (its ring waiting in the ring)
/// and its worker's (waiting as `waiting`).
fn coordinator_and_worker(mut server: Server, waiting: super::Waiting) -> (Driver, Driver) {
    let worker = server.take_workers().unwrap().pop().unwrap();
    let mut coordinator = server.into_driver("test", super::Waiting::InRing).unwrap();
    coordinator.start().unwrap();
    let worker = Driver::new_worker(worker, waiting).unwrap();
    (coordinator, worker)
}

/// A successor with one worker waiting as `waiting`, and a predecessor stand-in armed first on
/// both SO_REUSEPORT members: 16 connections are made; for `hold`, the drivers turn and must
/// take none of them (the predecessor holds them); then the predecessor lets go, and the
/// coordinator and its worker between them must take all 16 within `BOUND`.
fn successor_with_a_worker(waiting: super::Waiting, hold: Duration) {
    const CONNS: usize = 16;
    let mut server = tcp_server(2);
    let addr = server.local_addr("t").unwrap();
    let members = members_of(&server);
    let mut old = Predecessor::adopt(&mut server, &members);
    let (coordinator, mut worker) = coordinator_and_worker(server, waiting);
    let mut coordinator = without_takeover(coordinator);
    old.expect_ready();

    let _clients: Vec<TcpStream> = (0..CONNS)
        .map(|_| TcpStream::connect(addr).unwrap())
        .collect();
    let early = serve_within(&mut [&mut coordinator, &mut worker], CONNS, hold);
    assert_eq!(
        early.len(),
        0,
        "connections the predecessor holds were taken before it let go"
    );
    old.let_go();
    let delivered = serve(&mut [&mut coordinator, &mut worker], CONNS);
    assert_eq!(
        delivered.len(),
        CONNS,
        "connections queued while the predecessor let go, not taken within {BOUND:?}"
    );
}

/// A successor's end of the handoff channel, taken from the real process the driver spawned
/// (`pidfd_getfd` of its fd 3), so that the test can answer for it.
fn successor_channel(pid: u32) -> OwnedFd {
    let pidfd = crate::sys::pidfd_open(pid).unwrap();
    // SAFETY: plain syscall with integer arguments; on success the fd is new and ours.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), 3, 0) };
    assert!(fd >= 0, "pidfd_getfd: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` was just returned by the kernel and is owned by nobody else.
    unsafe { std::os::fd::FromRawFd::from_raw_fd(fd as RawFd) }
}

/// SIGKILLs and reaps a child of this process when dropped (also when the test fails),
/// through a pidfd: if the driver reaped it first, its pid may name another process by then.
struct KillOnDrop(OwnedFd);

impl KillOnDrop {
    fn new(pid: u32) -> KillOnDrop {
        KillOnDrop(crate::sys::pidfd_open(pid).expect("pidfd_open of a live child"))
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        // Already gone, or already reaped by the driver (ECHILD): fine.
        let _ = crate::sys::pidfd_signal(self.0.as_fd(), libc::SIGKILL);
        let fd = self.0.as_raw_fd();
        // SAFETY: a blocking waitid on a pidfd we own (SIGKILL ends the child promptly).
        unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            libc::waitid(libc::P_PIDFD, fd as libc::id_t, &mut info, libc::WEXITED);
        }
    }
}

/// Receives one message on `channel` (bounded), dropping any fds it carries.
fn recv_message(channel: &OwnedFd) -> Message {
    crate::sys::set_recv_timeout(channel.as_fd(), Duration::from_secs(5)).unwrap();
    let mut buf = vec![0u8; crate::handoff::MAX_MESSAGE_LEN];
    let n = nix::sys::socket::recv(channel.as_raw_fd(), &mut buf, MsgFlags::empty()).unwrap();
    Message::decode(&buf[..n]).unwrap()
}

/// A process whose predecessor (the test's stand-in) has not let go yet is not upgraded yet:
/// the upgrade that started it is still in flight. The request waits, and once the
/// predecessor lets go (RELEASED), the upgrade starts by itself. Before, it upgraded at once,
/// and the predecessor's late MAINPID could name it main after it had named its successor
/// (helper-27's review); then for a while such a request was refused, and a SIGHUP sent as soon
/// as the pid file named the new process was lost (`tests/deploy.rs`).
#[test]
fn an_upgrade_waits_for_the_predecessors_let_go() {
    let mut server = tcp_server(1);
    let listener = server.parts.listeners[0].fd.as_raw_fd();
    let mut elder = Predecessor::adopt(&mut server, &[listener]);
    upgrade_to_a_stand_in(&mut server);
    let mut driver = without_takeover(Driver::new(server, super::Waiting::InRing).unwrap());
    elder.expect_ready();

    driver.request_upgrade(crate::machine::Requester::Signal);
    for _ in 0..20 {
        driver.turn(false, &mut |_| {}).unwrap();
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(
        driver.successor.is_none(),
        "upgraded before the predecessor let go"
    );
    assert_eq!(driver.machine.phase(), crate::machine::Phase::Serving);

    elder.let_go();
    let deadline = Instant::now() + BOUND;
    while driver.successor.is_none() && Instant::now() < deadline {
        driver.turn(false, &mut |_| {}).unwrap();
        std::thread::sleep(Duration::from_millis(1));
    }
    let pid = driver.successor.as_ref().map(|s| s.pid);
    let _successor = pid.map(KillOnDrop::new);
    assert!(
        pid.is_some(),
        "the waiting upgrade did not start at the let-go"
    );
}

/// Makes `/bin/sleep 30` the binary `server` upgrades to: a real process (so that its exit
/// watch and pid are real) that only holds its end of the channel, which the test answers on.
fn upgrade_to_a_stand_in(server: &mut Server) {
    server.parts.config.exe = "/bin/sleep".into();
    server.parts.config.args = vec!["sleep".into(), "30".into()];
}

/// Counts one live connection, which keeps the driver draining (alive) after it lets go,
/// until [`end_the_drain`].
fn hold_the_drain(driver: &Driver) {
    driver
        .shared
        .live
        .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
}

fn end_the_drain(driver: &Driver) {
    driver
        .shared
        .live
        .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
}

/// Starts the driver's upgrade to a real stand-in process (`/bin/sleep`) and takes that
/// process's end of the channel; returns the successor's pid, the channel and the upgrade id
/// its HELLO carried.
fn start_successor(driver: &mut Driver) -> (u32, OwnedFd, UpgradeId) {
    let (pid, channel) = spawn_successor(driver);
    let deadline = Instant::now() + BOUND;
    // OFFER, carrying HELLO in this build's version: accepted.
    let (upgrade, total_fds, total_state, mut fds, mut state) = take_offer(&channel);
    let accept = Message::Accept(crate::protocol::SUPPORTED.max);
    crate::sys::send_nonblocking(channel.as_fd(), &accept.encode().unwrap()).unwrap();
    // Then every fd and the state: the whole handoff is taken off the channel.
    let mut buf = vec![0u8; crate::handoff::MAX_MESSAGE_LEN];
    let mut hello = Some((upgrade, total_fds, total_state));
    if fds == total_fds && state == total_state {
        return (pid, channel, upgrade);
    }
    while Instant::now() < deadline {
        driver.turn(false, &mut |_| {}).unwrap();
        match crate::sys::recv_nonblocking(channel.as_fd(), &mut buf) {
            Ok(n) => {
                match Message::decode(&buf[..n]).unwrap() {
                    Message::Hello { .. } => hello = None,
                    Message::Fds { records, .. } => fds += records.len(),
                    Message::State { chunk, .. } => state += chunk.len() as u64,
                    other => panic!("expected the handoff, got {other:?}"),
                }
                if let Some((upgrade, f, s)) = hello {
                    if fds == f && state == s {
                        return (pid, channel, upgrade);
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(1))
            }
            Err(e) => panic!("{e}"),
        }
    }
    panic!("no whole handoff within {BOUND:?}");
}

/// Starts the driver's upgrade to a real stand-in process (`/bin/sleep`) and takes that
/// process's end of the channel, answering nothing yet.
fn spawn_successor(driver: &mut Driver) -> (u32, OwnedFd) {
    driver.request_upgrade(crate::machine::Requester::Signal);
    let deadline = Instant::now() + BOUND;
    while driver.successor.is_none() && Instant::now() < deadline {
        driver.turn(false, &mut |_| {}).unwrap();
        std::thread::sleep(Duration::from_millis(1));
    }
    let pid = driver.successor.as_ref().expect("no successor started").pid;
    (pid, successor_channel(pid))
}

/// SIGKILLs the child `pid` and waits (bounded) until its exit is visible, without reaping
/// it: the driver reaps.
fn kill_and_wait_visible(pid: u32) {
    let pidfd = crate::sys::pidfd_open(pid).unwrap();
    crate::sys::kill(pid, libc::SIGKILL).unwrap();
    let deadline = Instant::now() + BOUND;
    while !crate::sys::poll_readable(pidfd.as_fd()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(
        crate::sys::poll_readable(pidfd.as_fd()),
        "the stand-in successor did not exit"
    );
    // The exit's wake-up of the driver's own pidfd poll follows the exit's visibility.
    std::thread::sleep(Duration::from_millis(20));
}

/// A successor that answers the OFFER with an older version and dies at once. In the turn
/// that sees its ACCEPT and its exit in one batch, the ACCEPT queues the handoff again (in the
/// older version) and re-arms the channel's Recv, and the exit closes the channel. Those SQEs
/// must be submitted before the close: else they run on a closed fd number, which another
/// thread of the process may have reused by then (a Recv would eat bytes of someone else's
/// connection, a SendMsg write the HELLO into it). An op finding the channel closed (EBADF)
/// fails the test (`check_channel_op`).
#[test]
fn a_successor_that_dies_right_after_its_accept_leaves_no_op_on_its_closed_channel() {
    let mut server = tcp_server(1);
    upgrade_to_a_stand_in(&mut server);
    server.parts.config.protocol = crate::protocol::ProtocolVersions { min: 1, max: 2 };
    let mut driver = Driver::new(server, super::Waiting::InRing).unwrap();
    let (pid, channel) = spawn_successor(&mut driver);
    let _successor = KillOnDrop::new(pid);
    match recv_message(&channel) {
        Message::Offer { versions, .. } => assert_eq!(versions.max, 2),
        other => panic!("expected OFFER, got {other:?}"),
    }
    send_out_the_offer(&mut driver);
    answer(&channel, Message::Accept(1));
    drop(channel);
    kill_and_wait_visible(pid);

    driver.turn(false, &mut |_| {}).unwrap();
    assert!(
        driver.successor.is_none(),
        "the ACCEPT and the exit came in different turns"
    );
    // The completions of whatever that turn submitted.
    let deadline = Instant::now() + Duration::from_millis(200);
    while Instant::now() < deadline {
        driver.turn(false, &mut |_| {}).unwrap();
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(driver.machine.phase(), crate::machine::Phase::Serving);
}

/// Ends the driver's multishot accept (as a full CQ or some errors do) and turns until it is
/// armed again: behind every waiter armed on the listener meanwhile.
fn re_arm_the_accept(driver: &mut Driver) {
    let first = driver.accepts[0].op.expect("the accept is armed");
    driver.cancel(types::CancelBuilder::user_data(first.user_data()));
    let deadline = Instant::now() + BOUND;
    while driver.accepts[0].op.is_none_or(|op| op == first) && Instant::now() < deadline {
        driver.turn(false, &mut |_| {}).unwrap();
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(
        driver.accepts[0].op.is_some_and(|op| op != first),
        "not re-armed"
    );
}

/// A rollback from HandingOver after the driver's accept was re-armed behind the successor's
/// (a multishot accept ends on a full CQ, on some errors, after a backoff; a re-armed one waits
/// behind every waiter already there): the wake-up of a connection that came then went to the
/// successor's accept, which died without accepting it. The driver must take that connection
/// without waiting for another one. The poll armed beside a re-armed accept would take it
/// while the successor lives (the next test); switched off here, the sweep at the successor's
/// exit must (needed where no such poll was armed: a child being killed is no longer counted
/// as alive). Without it, 0 of 1 within 2 s (helper-29's review).
#[test]
fn a_connection_whose_wake_up_a_dead_successor_spent_is_served_after_the_rollback() {
    let mut server = tcp_server(1);
    upgrade_to_a_stand_in(&mut server);
    let addr = server.local_addr("t").unwrap();
    let listener = server.parts.listeners[0].fd.as_raw_fd();
    let mut driver = Driver::new(server, super::Waiting::InRing).unwrap();
    driver.no_guard_polls = true;
    let (pid, _channel) = spawn_successor(&mut driver);
    let _successor = KillOnDrop::new(pid);
    // The successor's accepts, armed behind the driver's.
    let mut successors = StandInAccepts::arm(&[listener]);
    // The driver's accept ends and is re-armed: behind the successor's now.
    re_arm_the_accept(&mut driver);

    let mut client = TcpStream::connect(addr).unwrap();
    client.write_all(b"x").unwrap();
    // Give the wake-up time to reach the successor's accept (queued as its deferred work).
    std::thread::sleep(Duration::from_millis(20));
    successors.cancel_unaccepted();
    let mut delivered = serve_within(&mut [&mut driver], 1, Duration::from_millis(200));
    assert_eq!(delivered.len(), 0, "not stranded: the test proves nothing");
    assert_ne!(driver.machine.phase(), crate::machine::Phase::Serving);

    kill_and_wait_visible(pid);
    let deadline = Instant::now() + BOUND;
    while (delivered.is_empty() || driver.machine.phase() != crate::machine::Phase::Serving)
        && Instant::now() < deadline
    {
        delivered.extend(serve_within(
            &mut [&mut driver],
            1,
            Duration::from_millis(1),
        ));
    }
    assert_eq!(driver.machine.phase(), crate::machine::Phase::Serving);
    expect_the_x(
        delivered,
        "the connection whose wake-up the dead successor spent",
    );
}

/// The same re-arm behind a starting successor's accepts, with the successor alive and not
/// running its ring (hung before READY): the connections its accept is woken for wait, and
/// without the poll armed beside our re-armed accept nobody else is woken for them until it
/// dies — its ready deadline plus its drain. The driver must take them meanwhile (before the
/// fix: 0 of 4 within 2 s; helper-29's review).
#[test]
fn connections_a_hung_successors_accept_was_woken_for_are_taken_while_it_lives() {
    let mut server = tcp_server(1);
    upgrade_to_a_stand_in(&mut server);
    let addr = server.local_addr("t").unwrap();
    let listener = server.parts.listeners[0].fd.as_raw_fd();
    let mut driver = Driver::new(server, super::Waiting::InRing).unwrap();
    let (pid, _channel) = spawn_successor(&mut driver);
    let _successor = KillOnDrop::new(pid);
    // The successor's accepts, armed behind the driver's; they never run (a hung process).
    let _successors = StandInAccepts::arm(&[listener]);
    re_arm_the_accept(&mut driver);

    let _clients: Vec<TcpStream> = (0..4).map(|_| TcpStream::connect(addr).unwrap()).collect();
    let delivered = serve(&mut [&mut driver], 4);
    assert_ne!(
        driver.machine.phase(),
        crate::machine::Phase::Serving,
        "still upgrading"
    );
    assert_eq!(
        delivered.len(),
        4,
        "connections held by a hung successor's accept were not taken within {BOUND:?}"
    );
    // The successor's exit ends the polls beside the accept.
    kill_and_wait_visible(pid);
    let deadline = Instant::now() + BOUND;
    while driver.accepts[0].takeover.is_some() && Instant::now() < deadline {
        driver.turn(false, &mut |_| {}).unwrap();
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(
        driver.accepts[0].takeover.is_none(),
        "the poll outlived the child"
    );
    assert!(driver.accepts[0].op.is_some(), "the accept is armed");
}

/// The same with thread-per-core: a worker's accept re-armed behind a hung successor's
/// (on the worker's SO_REUSEPORT member) gets its guard poll too — a worker knows of the
/// coordinator's children through the worker set. Of 16 connections over the two members,
/// each must be taken while the successor lives (before: those on the worker's member waited
/// for the successor's end; helper-31's review).
#[test]
fn a_workers_accept_re_armed_behind_a_hung_successors_is_guarded_too() {
    const CONNS: usize = 16;
    let mut server = tcp_server(2);
    upgrade_to_a_stand_in(&mut server);
    let addr = server.local_addr("t").unwrap();
    let members = members_of(&server);
    let (mut coordinator, mut worker) = coordinator_and_worker(server, super::Waiting::InRing);
    assert!(serve_within(
        &mut [&mut coordinator, &mut worker],
        1,
        Duration::from_millis(20)
    )
    .is_empty());
    let (pid, _channel) = spawn_successor(&mut coordinator);
    let _successor = KillOnDrop::new(pid);
    // The successor's accepts on both members, armed behind ours; they never run.
    let _hung = StandInAccepts::arm(&members);
    re_arm_the_accept(&mut coordinator);
    re_arm_the_accept(&mut worker);
    let _clients: Vec<TcpStream> = (0..CONNS)
        .map(|_| TcpStream::connect(addr).unwrap())
        .collect();
    let delivered = serve(&mut [&mut coordinator, &mut worker], CONNS);
    assert_eq!(
        delivered.len(),
        CONNS,
        "connections held by a hung successor's accepts were not taken within {BOUND:?}"
    );
}

/// A driver that speaks protocol versions 1 and 2 (offering its handoff in 2), with `state`
/// bytes of application state to hand over, upgrading to a stand-in; the handoff's OFFER has
/// been read off the stand-in's channel (and checked to offer 2).
fn upgrade_speaking_1_and_2(state: usize) -> (Driver, u32, OwnedFd) {
    let mut server = tcp_server(1);
    upgrade_to_a_stand_in(&mut server);
    server.parts.config.protocol = crate::protocol::ProtocolVersions { min: 1, max: 2 };
    *server.parts.shared.handoff_state.lock().unwrap() = bytes::Bytes::from(vec![7u8; state]);
    let mut driver = Driver::new(server, super::Waiting::InRing).unwrap();
    let (pid, channel) = spawn_successor(&mut driver);
    match recv_message(&channel) {
        Message::Offer { versions, hello } => {
            assert_eq!(versions.max, 2);
            assert!(matches!(
                Message::decode(&hello).unwrap(),
                Message::Hello { version: 2, .. }
            ));
        }
        other => panic!("expected OFFER, got {other:?}"),
    }
    (driver, pid, channel)
}

/// Turns `driver` until an OFFER's handoff of one message has been sent whole (its send's
/// completion handled), before any answer.
fn send_out_the_offer(driver: &mut Driver) {
    for _ in 0..10 {
        driver.turn(false, &mut |_| {}).unwrap();
    }
}

/// Sends `message` on the stand-in successor's end of the channel.
fn answer(channel: &OwnedFd, message: Message) {
    crate::sys::send_nonblocking(channel.as_fd(), &message.encode().unwrap()).unwrap();
}

/// Turns `driver` and takes what it sends on `channel` until it has reported the handoff sent
/// (`ListenersSent`) and nothing more comes for 50 ms (bounded by `BOUND`).
fn rest_of_handoff(driver: &mut Driver, channel: &OwnedFd) -> Vec<Message> {
    let mut taken = Vec::new();
    let mut buf = vec![0u8; crate::handoff::MAX_MESSAGE_LEN];
    let deadline = Instant::now() + BOUND;
    let mut quiet_since = Instant::now();
    while Instant::now() < deadline {
        driver.turn(false, &mut |_| {}).unwrap();
        match crate::sys::recv_nonblocking(channel.as_fd(), &mut buf) {
            Ok(n) => {
                taken.push(Message::decode(&buf[..n]).unwrap());
                quiet_since = Instant::now();
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if driver.timeline.hello_sent.is_some()
                    && quiet_since.elapsed() > Duration::from_millis(50)
                {
                    return taken;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => panic!("{e}"),
        }
    }
    panic!("the handoff was not reported sent within {BOUND:?}; took {taken:?}");
}

/// Of `messages`, those from the last HELLO on; checks that they are a whole handoff in
/// `version` (every fd and state byte the HELLO announced, nothing in another version).
fn assert_whole_handoff_in(messages: &[Message], version: u8) {
    let start = messages
        .iter()
        .rposition(|m| matches!(m, Message::Hello { .. }))
        .expect("no HELLO after the OFFER");
    let Message::Hello {
        version: v,
        fds,
        state_len,
        records,
        state,
        ..
    } = &messages[start]
    else {
        unreachable!()
    };
    assert_eq!(*v, version, "the handoff was sent again in another version");
    let (mut got_fds, mut got_state) = (records.len(), state.len() as u64);
    for m in &messages[start + 1..] {
        match m {
            Message::Fds {
                version: v,
                records,
            } if *v == version => got_fds += records.len(),
            Message::State { version: v, chunk } if *v == version => {
                got_state += chunk.len() as u64
            }
            other => panic!("after the HELLO in version {version}: {other:?}"),
        }
    }
    assert_eq!((got_fds, got_state), (*fds as usize, *state_len));
}

/// The successor accepts the version offered after the whole handoff (one message) is out:
/// the handoff is complete, nothing is sent again.
#[test]
fn an_accept_of_the_version_offered_completes_the_handoff_already_sent() {
    let (mut driver, pid, channel) = upgrade_speaking_1_and_2(0);
    let _successor = KillOnDrop::new(pid);
    send_out_the_offer(&mut driver);
    assert!(
        driver.timeline.hello_sent.is_none(),
        "sent before the ACCEPT"
    );
    answer(&channel, Message::Accept(2));
    let rest = rest_of_handoff(&mut driver, &channel);
    assert!(rest.is_empty(), "sent again: {rest:?}");
}

/// The successor accepts an older version after the whole handoff in the newer one is out:
/// the handoff is sent again, whole, in the older one.
#[test]
fn an_older_version_accepted_after_the_handoff_sends_it_again_in_that_version() {
    let (mut driver, pid, channel) = upgrade_speaking_1_and_2(0);
    let _successor = KillOnDrop::new(pid);
    send_out_the_offer(&mut driver);
    answer(&channel, Message::Accept(1));
    assert_whole_handoff_in(&rest_of_handoff(&mut driver, &channel), 1);
}

/// The successor accepts an older version while the newer handoff (the HELLO, then 16 state
/// messages, one op at a time) is in flight: it stops at its next message and is sent again,
/// whole, in the older version.
#[test]
fn an_older_version_accepted_mid_handoff_restarts_it_in_that_version() {
    let (mut driver, pid, channel) = upgrade_speaking_1_and_2(16 * crate::handoff::STATE_CHUNK);
    let _successor = KillOnDrop::new(pid);
    answer(&channel, Message::Accept(1));
    let rest = rest_of_handoff(&mut driver, &channel);
    let newer = rest
        .iter()
        .take_while(|m| !matches!(m, Message::Hello { .. }))
        .count();
    assert!(
        newer < 16,
        "the newer handoff went on to its end ({newer} state messages)"
    );
    assert_whole_handoff_in(&rest, 1);
}

/// Receives the OFFER and the HELLO it carries: the upgrade id, the handoff's fd count and
/// state length, and how much of each the HELLO had.
fn take_offer(channel: &OwnedFd) -> (UpgradeId, usize, u64, usize, u64) {
    match recv_message(channel) {
        Message::Offer { hello, .. } => match Message::decode(&hello).unwrap() {
            Message::Hello {
                upgrade,
                fds,
                state_len,
                records,
                state,
                ..
            } => (
                upgrade,
                fds as usize,
                state_len,
                records.len(),
                state.len() as u64,
            ),
            other => panic!("expected HELLO in the OFFER, got {other:?}"),
        },
        other => panic!("expected OFFER, got {other:?}"),
    }
}

/// A successor told to stop right after its READY sends RETIRING and exits before this
/// process has even read the READY. Its exit is planned: this process must finish its drain,
/// not take the service back. The test sends READY and RETIRING and ends the successor
/// between two turns, so the driver's next turn sees READY's CQE and the exit's in one batch,
/// with RETIRING still queued on the channel (the order a loaded machine produced).
#[test]
fn a_successor_that_retires_right_after_ready_is_not_taken_for_a_crash() {
    let mut server = tcp_server(1);
    upgrade_to_a_stand_in(&mut server);
    let mut driver = Driver::new(server, super::Waiting::InRing).unwrap();
    hold_the_drain(&driver);
    let (pid, channel, upgrade) = start_successor(&mut driver);
    let _successor = KillOnDrop::new(pid);

    for message in [Message::Ready(upgrade), Message::Retiring(upgrade)] {
        crate::sys::send_nonblocking(channel.as_fd(), &message.encode().unwrap()).unwrap();
    }
    drop(channel);
    kill_and_wait_visible(pid);

    // One turn: READY's CQE and the exit's in one batch, the case under test. (Should the
    // exit come a turn later, the driver is held to the same outcome below.)
    driver.turn(false, &mut |_| {}).unwrap();
    let one_batch = driver.successor.is_none();
    let deadline = Instant::now() + BOUND;
    while driver.successor.is_some() && Instant::now() < deadline {
        driver.turn(false, &mut |_| {}).unwrap();
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(
        driver.successor.is_none(),
        "the successor's exit was not seen"
    );
    assert!(one_batch, "READY and the exit came in different turns");
    let phase = driver.machine.phase();
    end_the_drain(&driver);
    assert_eq!(
        phase,
        crate::machine::Phase::Draining,
        "a successor that retired and exited was taken for a crash"
    );
}

/// An empty directory of this test process's own, for files a test makes.
fn fresh_dir(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("ringflip-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir(&dir).unwrap();
    dir
}

/// A stand-in for systemd's notify socket in `dir`: its path, for `Config::notify_socket`,
/// and the socket.
fn notify_socket(dir: &std::path::Path) -> (std::path::PathBuf, std::os::unix::net::UnixDatagram) {
    let path = dir.join("notify");
    let socket = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    socket.set_nonblocking(true).unwrap();
    (path, socket)
}

/// Every notification queued on `socket`, in order.
fn notifications(socket: &std::os::unix::net::UnixDatagram) -> Vec<String> {
    let mut said = Vec::new();
    let mut buf = [0u8; 512];
    while let Ok(n) = socket.recv(&mut buf) {
        said.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    said
}

/// Whether `fd` (a driver's wake set) polls readable within `ms` milliseconds.
fn readable_within(fd: RawFd, ms: i32) -> bool {
    // SAFETY: the driver that owns the wake set outlives each call.
    crate::sys::readable_within(unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) }, ms)
}

/// Turns as `serve_async` does after a wake-up: once, then again while the ring has work
/// pending (bounded). Returns the connections delivered.
fn turn_as_a_runtime(driver: &mut Driver) -> Vec<(OwnedFd, DrainGuard)> {
    let mut delivered = Vec::new();
    let mut sink = |conn: Connection| delivered.push(conn.into_parts());
    driver.turn(false, &mut sink).unwrap();
    for _ in 0..100 {
        if !driver.has_pending_work() {
            break;
        }
        driver.turn(false, &mut sink).unwrap();
    }
    delivered
}

/// `rounds` times: one connection to `addr`, which must make the driver's wake set readable,
/// and be delivered by the turns that follow (as a runtime turns after a wake-up).
fn connect_and_expect_one_turn(driver: &mut Driver, addr: std::net::SocketAddr, rounds: usize) {
    let fd = driver.readiness_fd().expect("a wake set");
    for round in 0..rounds {
        let _client = TcpStream::connect(addr).unwrap();
        assert!(
            readable_within(fd, 2_000),
            "round {round}: a connection did not wake the wake set"
        );
        let delivered = turn_as_a_runtime(driver);
        assert_eq!(
            delivered.len(),
            1,
            "round {round}: the turn after the wake-up did not deliver the connection"
        );
    }
}

/// In a runtime, a turn whose final submit the kernel refuses (EAGAIN: no memory for
/// requests) leaves SQEs queued that nothing the runtime waits on will announce — here the
/// re-arm of an accept that ended. The driver must have the runtime woken to submit them, and
/// then take a connection; before the fix, the wake set stayed quiet (the runtime would sleep
/// until some unrelated fd or deadline woke it) and the accept stayed unarmed (helper-29).
#[test]
fn in_a_runtime_sqes_a_refused_submit_left_queued_are_submitted_without_outside_help() {
    let server = tcp_server(1);
    let addr = server.local_addr("t").unwrap();
    let mut driver = Driver::new(server, super::Waiting::InRuntime).unwrap();
    let fd = driver.readiness_fd().expect("a wake set");
    turn_as_a_runtime(&mut driver);
    // The accept ends (as on a full CQ); the turn that re-arms it cannot submit.
    let first = driver.accepts[0].op.expect("the accept is armed");
    driver.cancel(types::CancelBuilder::user_data(first.user_data()));
    driver.refuse_submits = 1;
    turn_as_a_runtime(&mut driver);
    assert_eq!(driver.refuse_submits, 0, "no submit was refused");
    assert!(
        !driver.ring.submission().is_empty(),
        "the refused submit left nothing queued: the test proves nothing"
    );
    assert!(
        readable_within(fd, 500),
        "the runtime was not woken to submit what the kernel refused"
    );
    turn_as_a_runtime(&mut driver);
    assert!(driver.ring.submission().is_empty(), "still queued");
    connect_and_expect_one_turn(&mut driver, addr, 1);
}

/// A driver made for a runtime (`Waiting::InRuntime`) is woken through its wake set, by the
/// fds its ring waits on and never by an eventfd registered with the ring (whose signal the
/// kernel may defer by an RCU grace period: `wake_set.rs`). Each of a connection, a request
/// from another thread (the wake eventfd), a signal and a deadline must make the wake set
/// readable, and the turn that follows must complete what it announced: the connection is
/// delivered in that turn (the ring's task work was queued before the wake-up, or the sweep
/// took it), the request and the signal are handled.
#[test]
fn in_a_runtime_every_source_wakes_the_wake_set_and_one_turn_handles_it() {
    let server = tcp_server(1);
    let addr = server.local_addr("t").unwrap();
    let handle = server.handle();
    let mut driver = Driver::new(server, super::Waiting::InRuntime).unwrap();
    let fd = driver.readiness_fd().expect("a wake set");
    turn_as_a_runtime(&mut driver);
    connect_and_expect_one_turn(&mut driver, addr, 50);

    // A request from another thread: the wake eventfd. (The upgrade fails at once: the
    // binary is missing; what matters is that the driver handled the request.)
    let mut server_exe = driver.config.exe.clone();
    server_exe.set_file_name("no-such-binary-for-this-test");
    driver.config.exe = server_exe;
    let requester = std::thread::spawn(move || handle.upgrade());
    assert!(
        readable_within(fd, 2_000),
        "a request did not wake the wake set"
    );
    let deadline = Instant::now() + BOUND;
    while !requester.is_finished() && Instant::now() < deadline {
        if readable_within(fd, 100) {
            turn_as_a_runtime(&mut driver);
        }
    }
    assert!(
        requester.is_finished(),
        "the upgrade request was not answered within {BOUND:?}"
    );
    let outcome = requester.join().unwrap();
    assert!(
        outcome.is_err(),
        "upgrading to a missing binary: {outcome:?}"
    );

    // A signal: the signalfd (build() blocked SIGTERM on this thread, so it stays queued for
    // the signalfd; `raise` signals the calling thread).
    // SAFETY: raising a signal that is blocked and read by this driver's signalfd.
    assert_eq!(unsafe { libc::raise(libc::SIGTERM) }, 0);
    assert!(
        readable_within(fd, 2_000),
        "a signal did not wake the wake set"
    );
    turn_as_a_runtime(&mut driver);
    assert_ne!(
        driver.machine.phase(),
        crate::machine::Phase::Serving,
        "SIGTERM not handled"
    );
    // Draining with nothing live: done in the same turn or at the next wake-up.
    let deadline = Instant::now() + BOUND;
    while driver.exit.is_none() && Instant::now() < deadline {
        if readable_within(fd, 100) {
            turn_as_a_runtime(&mut driver);
        }
    }
    assert_eq!(
        driver.exit,
        Some(crate::machine::ExitReason::Shutdown),
        "the drain did not end"
    );
}

/// A listener joins the wake set by the call that arms an op on it, whichever path that is.
/// (Seen in review: a member of a per-worker group made to listen by the handoff was never
/// added when the takeover armed its poll on it, so its connections woke nobody.) Here a
/// bound member that did not listen at the start, then listens, then gets a takeover poll.
#[test]
fn in_a_runtime_a_listener_joins_the_wake_set_when_an_op_is_armed_on_it() {
    let mut server = tcp_server(1);
    let bound = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    bound
        .bind(
            &"127.0.0.1:0"
                .parse::<std::net::SocketAddr>()
                .unwrap()
                .into(),
        )
        .unwrap();
    let addr = bound.local_addr().unwrap().as_socket().unwrap();
    let member = &mut server.parts.listeners[0];
    member.fd = bound.into();
    member.endpoint = crate::listener::Endpoint::Tcp(addr);
    member.listens = false;
    // A successor whose predecessor has not let go: its new member stays unarmed.
    let old = Predecessor::adopt(&mut server, &[]);
    let mut driver = Driver::new(server, super::Waiting::InRuntime).unwrap();
    let fd = driver.readiness_fd().expect("a wake set");
    driver.start().unwrap();
    old.expect_ready();
    turn_as_a_runtime(&mut driver);
    assert!(
        driver.accepts[0].op.is_none(),
        "an accept armed on a socket not listening"
    );
    crate::sys::listen(driver.accepts[0].listener.fd.as_fd(), 16).unwrap();
    driver.arm_takeover(0);
    // Until the takeover's own deadline has passed: the next wake-up is the connection's.
    let deadline = Instant::now() + BOUND;
    while readable_within(fd, 100) && Instant::now() < deadline {
        turn_as_a_runtime(&mut driver);
    }
    let _client = TcpStream::connect(addr).unwrap();
    assert!(
        readable_within(fd, 2_000),
        "a connection to a listener with a takeover poll did not wake the wake set"
    );
    let mut woken_by = Vec::new();
    driver
        .wake_set
        .as_mut()
        .unwrap()
        .drain(|i| woken_by.push(i));
    assert_eq!(woken_by, vec![0], "not woken by the listener");
}

/// The deadline timer of a driver in a runtime is the wake set's timerfd: a deadline wakes the
/// runtime, and the turn acts on it. Here the start deadline of an upgrade whose binary never
/// says READY (a stand-in that sleeps): the wake set becomes readable once the deadline has
/// passed, and the turn rolls the upgrade back.
#[test]
fn in_a_runtime_a_deadline_wakes_the_wake_set() {
    let mut server = tcp_server(1);
    upgrade_to_a_stand_in(&mut server);
    server.parts.config.timeouts.ready = Duration::from_millis(200);
    let mut driver = Driver::new(server, super::Waiting::InRuntime).unwrap();
    let fd = driver.readiness_fd().expect("a wake set");
    let (pid, _channel, _upgrade) = start_successor(&mut driver);
    let _successor = KillOnDrop::new(pid);
    assert_eq!(driver.machine.phase(), crate::machine::Phase::HandingOver);
    let deadline = Instant::now() + BOUND;
    while driver.machine.phase() != crate::machine::Phase::Serving && Instant::now() < deadline {
        // Sleep in poll as a runtime would: only the wake set can end the wait early.
        if readable_within(fd, 1_000) {
            turn_as_a_runtime(&mut driver);
        }
    }
    assert_eq!(
        driver.machine.phase(),
        crate::machine::Phase::Serving,
        "the ready deadline did not wake the runtime and roll the upgrade back"
    );
}

/// The sweep that closes the one race of the wake set (`Driver::sweep_missed`): a listener
/// that woke the runtime while the ring's accept got no task work. Made deterministic here with
/// the predecessor stand-in: its multishot accept, armed first, takes the connection's
/// (exclusive) wake-up and never runs, so the driver's own accept gets nothing, while the
/// driver's wake set (a non-exclusive waiter) is woken. With the takeover under way (here:
/// `takeover_at` cleared), the turn after that wake-up must take the connection itself.
#[test]
fn in_a_runtime_a_listener_that_woke_but_delivered_nothing_is_swept() {
    let mut server = tcp_server(1);
    let addr = server.local_addr("t").unwrap();
    let listener = server.parts.listeners[0].fd.as_raw_fd();
    let old = Predecessor::adopt(&mut server, &[listener]);
    let mut driver = without_takeover(Driver::new(server, super::Waiting::InRuntime).unwrap());
    old.expect_ready();
    turn_as_a_runtime(&mut driver);
    // Without the sweep, none of these would be delivered: the predecessor's accept took
    // every wake-up and never runs.
    connect_and_expect_one_turn(&mut driver, addr, 10);
    drop(old);
}

/// A worker of a new process, in a runtime, must leave the connections queued on its listener
/// to the predecessor until the predecessor lets go: its wake set sees every connection, but
/// the sweep of `sweep_missed` would take them from under a predecessor that may still roll the
/// upgrade back (killing this process and resetting what it took). After RELEASED the worker
/// sweeps and takes its share (as `connections_stranded_on_a_workers_listener_...`).
#[test]
fn in_a_runtime_a_worker_takes_nothing_its_predecessor_holds() {
    successor_with_a_worker(super::Waiting::InRuntime, Duration::from_millis(300));
}

/// A successor reaped by someone else (an application that reaps with `waitpid(-1)`, or
/// SIGCHLD set to SIG_IGN, where the kernel reaps) is still gone: its readable pidfd says so,
/// whatever `waitpid` answers (ECHILD). The upgrade must roll back at once, not wait for the
/// ready deadline (30 s here) with a dead successor, nor, during a drain, never resume.
#[test]
fn a_successor_reaped_elsewhere_is_seen_to_exit() {
    let mut server = tcp_server(1);
    upgrade_to_a_stand_in(&mut server);
    let mut driver = Driver::new(server, super::Waiting::InRing).unwrap();
    let (pid, _channel, _upgrade) = start_successor(&mut driver);
    assert_eq!(driver.machine.phase(), crate::machine::Phase::HandingOver);
    // Reaped here, as an application's own `waitpid(-1)` loop would.
    crate::sys::kill(pid, libc::SIGKILL).unwrap();
    // SAFETY: reaping our own child (the stand-in successor), which SIGKILL ends promptly.
    let reaped = unsafe { libc::waitpid(pid as libc::pid_t, std::ptr::null_mut(), 0) };
    assert_eq!(reaped, pid as libc::pid_t);
    let deadline = Instant::now() + BOUND;
    while driver.machine.phase() != crate::machine::Phase::Serving && Instant::now() < deadline {
        driver.turn(false, &mut |_| {}).unwrap();
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(
        driver.machine.phase(),
        crate::machine::Phase::Serving,
        "the exit of a successor reaped elsewhere was not seen within {BOUND:?}"
    );
}

/// Ends the process with a message if `done` is not set within `bound`: for a test whose
/// failure is a wait that never returns.
fn watchdog(what: &'static str, bound: Duration) -> std::sync::Arc<std::sync::atomic::AtomicBool> {
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = done.clone();
    std::thread::spawn(move || {
        let deadline = Instant::now() + bound;
        while Instant::now() < deadline {
            if flag.load(std::sync::atomic::Ordering::SeqCst) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        eprintln!("{what}: still waiting after {bound:?}; ending the test process");
        std::process::exit(101);
    });
    done
}

/// The teardown re-arms nothing and waits a bounded time. SIGINT and SIGTERM arrive together
/// as the drain ends: the turn that ends it reads one of them and re-arms the signal read,
/// which the final cancel is queued behind; submitted together, the re-armed read finds the
/// other signal pending and completes at once, before the cancel can reach it. Before, handling
/// that completion re-armed the read again, no cancel covered it, and the last wait for the
/// ops to end blocked until a third signal: for ever.
#[test]
fn finishing_rearms_nothing_when_two_signals_land_at_the_end_of_the_drain() {
    let server = tcp_server(1);
    let mut driver = Driver::new(server, super::Waiting::InRing).unwrap();
    hold_the_drain(&driver);
    driver.feed(crate::machine::Event::ShutdownRequested);
    let deadline = Instant::now() + BOUND;
    while !driver.all_accepts_stopped() && Instant::now() < deadline {
        driver.turn(false, &mut |_| {}).unwrap();
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(driver.all_accepts_stopped(), "the accepts did not stop");
    assert_eq!(driver.machine.phase(), crate::machine::Phase::Draining);

    let done = watchdog("the turn that finishes", Duration::from_secs(20));
    // SAFETY: both are blocked on this thread (build()) and read by the driver's signalfd.
    unsafe {
        assert_eq!(libc::raise(libc::SIGINT), 0);
        assert_eq!(libc::raise(libc::SIGTERM), 0);
    }
    end_the_drain(&driver);
    let started = Instant::now();
    let mut exit = None;
    while exit.is_none() && Instant::now() < deadline {
        exit = driver.turn(true, &mut |_| {}).unwrap();
    }
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(exit, Some(crate::machine::ExitReason::Shutdown));
    assert_eq!(driver.ops.live, 0, "ops left in flight after the teardown");
    assert!(
        started.elapsed() < super::ring::FINAL_REAP,
        "the teardown took {:?}",
        started.elapsed()
    );
}

/// A new process that fails to start (here: its pid file cannot be written) must not have
/// taken any connection: its first accept runs inline when it is submitted and takes every
/// queued connection, which a failing start then closed. Every fallible step now comes before
/// the accepts are armed. The connection, queued before, must still be in the backlog after
/// the failed start, with its first byte, for the predecessor (here: the test) to serve.
#[test]
fn a_successor_that_fails_to_start_takes_no_connection() {
    let mut server = tcp_server(1);
    let addr = server.local_addr("t").unwrap();
    let listener = server.parts.listeners[0].fd.as_raw_fd();
    let backlog = std::net::TcpListener::from(
        crate::sys::dup_cloexec_at_least(server.parts.listeners[0].fd.as_fd(), 3).unwrap(),
    );
    let old = Predecessor::adopt(&mut server, &[listener]);
    server.parts.config.pid_file = Some(
        std::env::temp_dir()
            .join(format!("ringflip-missing-{}", std::process::id()))
            .join("x.pid"),
    );
    let mut client = TcpStream::connect(addr).unwrap();
    client.write_all(b"x").unwrap();
    std::thread::sleep(Duration::from_millis(20));

    let started = Driver::new(server, super::Waiting::InRing);
    assert!(
        started.is_err(),
        "the pid file cannot be written, yet it started"
    );
    drop(started);
    drop(old);

    backlog.set_nonblocking(true).unwrap();
    let (mut stream, _) = backlog
        .accept()
        .expect("the queued connection was taken by the failed start");
    stream.set_nonblocking(false).unwrap();
    stream.set_read_timeout(Some(BOUND)).unwrap();
    let mut byte = [0u8; 1];
    stream.read_exact(&mut byte).unwrap();
    assert_eq!(&byte, b"x");
}

/// A stand-in successor (a shell) that, on SIGTERM, writes "term" to `mark` and exits 0: the
/// test can tell a SIGTERM (the mark) from a SIGKILL (none). Once its trap is set it writes
/// "up" to `mark` + ".up" (see `wait_until_up`).
fn upgrade_to_a_terminable_stand_in(server: &mut Server, mark: &std::path::Path) {
    server.parts.config.exe = "/bin/sh".into();
    server.parts.config.args = vec![
        "sh".into(),
        "-c".into(),
        format!(
            "trap 'echo term > {m}; kill $! 2>/dev/null; exit 0' TERM; echo up > {m}.up; \
             sleep 30 3>&- & wait",
            m = mark.display()
        )
        .into(),
    ];
}

/// Waits (bounded) until the terminable stand-in has set its trap: a SIGTERM before that would
/// end the shell without a mark, whatever sent it.
fn wait_until_up(mark: &std::path::Path) {
    let up = std::path::PathBuf::from(format!("{}.up", mark.display()));
    let deadline = Instant::now() + BOUND;
    while !up.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(up.exists(), "the stand-in never set its trap");
    let _ = std::fs::remove_file(up);
}

/// SIGTERM to the old process while the new one has its listeners but the old one has not
/// read its READY yet (in the channel, unread): a READY there is a READY. The upgrade
/// completes (this process drains for an upgrade, the new one serves on) instead of the new
/// process being stopped with the connections it already took.
#[test]
fn a_ready_waiting_on_the_channel_counts_when_a_shutdown_comes() {
    let mark = std::env::temp_dir().join(format!("ringflip-term-a-{}", std::process::id()));
    let _ = std::fs::remove_file(&mark);
    let mut server = tcp_server(1);
    upgrade_to_a_terminable_stand_in(&mut server, &mark);
    let mut driver = Driver::new(server, super::Waiting::InRing).unwrap();
    hold_the_drain(&driver);
    let (pid, channel, upgrade) = start_successor(&mut driver);
    let _successor = KillOnDrop::new(pid);
    wait_until_up(&mark);
    crate::sys::send_nonblocking(channel.as_fd(), &Message::Ready(upgrade).encode().unwrap())
        .unwrap();
    // The shutdown reaches the driver before its ring has read the READY.
    driver.feed(crate::machine::Event::ShutdownRequested);
    driver.run_actions();
    assert_eq!(driver.machine.phase(), crate::machine::Phase::Draining);
    assert!(
        driver.successor.is_some(),
        "the new process was abandoned although its READY was waiting"
    );
    std::thread::sleep(Duration::from_millis(200));
    assert!(!mark.exists(), "the new process was sent SIGTERM");
    end_the_drain(&driver);
}

/// SIGTERM to the old process while the new one has its listeners and no READY has come: the
/// new one may have armed its accepts and taken connections (its first accept runs before its
/// READY). It must get SIGTERM, so that it drains them, not a SIGKILL that resets them.
#[test]
fn a_successor_with_the_listeners_is_terminated_not_killed_at_a_shutdown() {
    let mark = std::env::temp_dir().join(format!("ringflip-term-b-{}", std::process::id()));
    let _ = std::fs::remove_file(&mark);
    let mut server = tcp_server(1);
    upgrade_to_a_terminable_stand_in(&mut server, &mark);
    let mut driver = Driver::new(server, super::Waiting::InRing).unwrap();
    let (pid, _channel, _upgrade) = start_successor(&mut driver);
    let _successor = KillOnDrop::new(pid);
    // The HELLO's completion (ListenersSent) is reaped in the next turn.
    driver.turn(false, &mut |_| {}).unwrap();
    wait_until_up(&mark);
    driver.feed(crate::machine::Event::ShutdownRequested);
    driver.run_actions();
    let deadline = Instant::now() + BOUND;
    while !mark.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let said = std::fs::read_to_string(&mark).unwrap_or_default();
    let _ = std::fs::remove_file(&mark);
    assert_eq!(
        said, "term\n",
        "the new process was not sent SIGTERM (SIGKILLed?)"
    );
}

/// READY and the successor's unplanned exit in one batch of completions: this process starts
/// the drain of an upgrade and, in the same turn, takes the service back. The drain's cause
/// travels in the action, so it is not taken for a shutdown (which would tell systemd
/// `STOPPING=1`); and the RETIRING this process told its own predecessor is withdrawn
/// (`SERVING`) once it serves again, or its later exit would pass for planned.
#[test]
fn a_rollback_right_after_ready_is_not_a_shutdown_and_withdraws_retiring() {
    let dir = fresh_dir("notify");
    let (notify_path, notify) = notify_socket(&dir);
    let mut server = tcp_server(1);
    // This driver's target only (the environment is the whole test process's).
    server.parts.config.notify_socket = Some(notify_path.clone().into());
    let listener = server.parts.listeners[0].fd.as_raw_fd();
    let mut elder = Predecessor::adopt(&mut server, &[listener]);
    upgrade_to_a_stand_in(&mut server);
    let mut driver = without_takeover(Driver::new(server, super::Waiting::InRing).unwrap());
    elder.expect_ready();
    // The elder lets go (RELEASED): this process is the main one now, whose shutdown would
    // be announced.
    elder.let_go();
    let deadline = Instant::now() + BOUND;
    while !driver.succession.is_main() && Instant::now() < deadline {
        driver.turn(false, &mut |_| {}).unwrap();
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(
        driver.succession.is_main(),
        "RELEASED did not make this process the main one"
    );
    hold_the_drain(&driver);
    let (pid, channel, upgrade) = start_successor(&mut driver);
    let pidfd = crate::sys::pidfd_open(pid).unwrap();
    crate::sys::send_nonblocking(channel.as_fd(), &Message::Ready(upgrade).encode().unwrap())
        .unwrap();
    crate::sys::kill(pid, libc::SIGKILL).unwrap();
    let deadline = Instant::now() + BOUND;
    while !crate::sys::poll_readable(pidfd.as_fd()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    std::thread::sleep(Duration::from_millis(20));
    let deadline = Instant::now() + BOUND;
    while (driver.successor.is_some() || driver.machine.phase() != crate::machine::Phase::Serving)
        && Instant::now() < deadline
    {
        driver.turn(false, &mut |_| {}).unwrap();
        std::thread::sleep(Duration::from_millis(1));
    }
    end_the_drain(&driver);
    assert_eq!(
        driver.machine.phase(),
        crate::machine::Phase::Serving,
        "the successor died unplanned: this process serves again"
    );

    let said = notifications(&notify);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        !said.iter().any(|m| m.contains("STOPPING=1")),
        "an upgrade's drain was announced as a shutdown: {said:?}"
    );
    let me = format!("MAINPID={}", std::process::id());
    assert!(
        said.last().is_some_and(|m| m.contains(&me)),
        "the process that serves again is not the main process again: {said:?}"
    );

    // What the elder was told after READY, in order: the last word must not be RETIRING.
    crate::sys::set_recv_timeout(elder.channel.as_fd(), Duration::from_millis(50)).unwrap();
    let mut told = Vec::new();
    let mut buf = [0u8; 512];
    while let Ok(n) = nix::sys::socket::recv(elder.channel.as_raw_fd(), &mut buf, MsgFlags::empty())
    {
        told.push(Message::decode(&buf[..n]).unwrap());
    }
    assert!(
        !matches!(told.last(), Some(Message::Retiring(_))),
        "RETIRING was not withdrawn after serving again: {told:?}"
    );
}

/// A worker whose thread starts only after the coordinator stopped accepting (a shutdown right
/// at start-up) has nothing to stop, and must say so at once: the coordinator's drain waits
/// for every worker's report, and would otherwise last its whole deadline (60 s by default).
#[test]
fn a_worker_started_after_the_stop_reports_stopped_at_once() {
    let mut server = tcp_server(2);
    let worker = server.take_workers().unwrap().pop().unwrap();
    let mut coordinator = server.into_driver("test", super::Waiting::InRing).unwrap();
    coordinator.start().unwrap();
    coordinator.feed(crate::machine::Event::ShutdownRequested);
    coordinator.run_actions();
    let deadline = Instant::now() + BOUND;
    while !coordinator.accepts.iter().all(|s| !s.armed()) && Instant::now() < deadline {
        coordinator.turn(false, &mut |_| {}).unwrap();
        std::thread::sleep(Duration::from_millis(1));
    }
    // Only now does the worker start.
    let mut worker = Driver::new_worker(worker, super::Waiting::InRing).unwrap();
    let mut exit = None;
    while exit.is_none() && Instant::now() < deadline {
        worker.turn(false, &mut |_| {}).unwrap();
        exit = coordinator.turn(false, &mut |_| {}).unwrap();
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(
        exit,
        Some(crate::machine::ExitReason::Shutdown),
        "the coordinator's drain waited for a late worker that had nothing to stop"
    );
}

/// One multishot accept per listener, however often arming is asked for: a second one would
/// not be covered by the cancel at the stop (the slot keeps one token), and would go on taking
/// connections in a process that said it let go. (Seen in review: a late worker armed its new
/// members twice, once at the release and once at its start.)
#[test]
fn arming_an_armed_listener_again_arms_nothing() {
    let server = tcp_server(1);
    let addr = server.local_addr("t").unwrap();
    let mut driver = Driver::new(server, super::Waiting::InRing).unwrap();
    driver.arm_accept(0);
    driver.turn(false, &mut |_| {}).unwrap();
    hold_the_drain(&driver);
    driver.feed(crate::machine::Event::ShutdownRequested);
    driver.run_actions();
    let deadline = Instant::now() + BOUND;
    while !driver.all_accepts_stopped() && Instant::now() < deadline {
        driver.turn(false, &mut |_| {}).unwrap();
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(driver.all_accepts_stopped());
    let _client = TcpStream::connect(addr).unwrap();
    let taken = serve_within(&mut [&mut driver], 1, Duration::from_millis(200));
    end_the_drain(&driver);
    assert_eq!(taken.len(), 0, "an accept outlived the stop");
}

/// The same for the takeover's poll: a second one would be orphaned by the slot's one token,
/// outlive the end of the takeover and keep waking a draining process. (Seen in review: a
/// takeover poll armed by hand before the takeover's deadline was armed again at it.)
#[test]
fn a_listener_gets_one_takeover_poll_however_often_asked() {
    let mut driver = Driver::new(tcp_server(1), super::Waiting::InRing).unwrap();
    driver.start().unwrap();
    driver.arm_takeover(0);
    let one = driver.ops.live;
    driver.arm_takeover(0);
    assert_eq!(driver.ops.live, one, "a second takeover poll was armed");
}

/// A successor that is stopped before it became the main process (its predecessor abandoned
/// it, or has not let go yet) must not tell systemd `STOPPING=1`: with `NotifyAccess=all` the
/// manager would take it for the main process stopping and stop the whole unit, the serving
/// predecessor included.
#[test]
fn a_successor_stopped_before_it_is_the_main_process_says_nothing_to_systemd() {
    let dir = fresh_dir("notify2");
    let (notify_path, notify) = notify_socket(&dir);
    let mut server = tcp_server(1);
    server.parts.config.notify_socket = Some(notify_path.clone().into());
    let listener = server.parts.listeners[0].fd.as_raw_fd();
    let elder = Predecessor::adopt(&mut server, &[listener]);
    let mut driver = without_takeover(Driver::new(server, super::Waiting::InRing).unwrap());
    elder.expect_ready();
    driver.feed(crate::machine::Event::ShutdownRequested);
    driver.run_actions();
    let said = notifications(&notify);
    let _ = std::fs::remove_dir_all(&dir);
    drop(elder);
    assert!(
        !said.iter().any(|m| m.contains("STOPPING=1")),
        "a successor that never became the main process announced its stop: {said:?}"
    );
}

/// A new process whose predecessor gave up on it while it was starting (it closed the channel
/// and, alive, sent SIGTERM) must not start: it would take the pid file from the serving
/// predecessor and connections from the queue, only to drain and exit. It fails before the
/// pid file, which keeps the predecessor's pid.
#[test]
fn a_successor_abandoned_while_starting_leaves_the_pid_file_alone() {
    let dir = fresh_dir("abandoned");
    let pid_file = dir.join("x.pid");
    std::fs::write(&pid_file, "4242\n").unwrap();
    let mut server = tcp_server(1);
    let listener = server.parts.listeners[0].fd.as_raw_fd();
    let old = Predecessor::adopt(&mut server, &[listener]);
    // The predecessor stand-in is this (live) process.
    server.parts.elders = vec![crate::sys::pidfd_open(std::process::id()).unwrap()];
    server.parts.config.pid_file = Some(pid_file.clone());
    drop(old); // gives up: closes its end of the channel
    let started = Driver::new(server, super::Waiting::InRing);
    let content = std::fs::read_to_string(&pid_file).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(started.is_err(), "an abandoned successor started");
    assert_eq!(
        content, "4242\n",
        "the abandoned successor took the pid file"
    );
}

/// In a runtime, a handoff send that found the channel full is retried by the ring when the
/// channel has room again, as deferred work that runs only when the driver turns: room in the
/// channel must wake the wake set (its `EPOLLOUT`, see `WakeSet::watch_writable`). 4 MiB of
/// state is 64 chunks, several times what the channel holds. Without the watch the handoff
/// stalled after the first ten chunks (as `handoff_limits` saw: the successor gave up).
#[test]
fn in_a_runtime_room_in_the_channel_wakes_the_wake_set() {
    let mut server = tcp_server(1);
    upgrade_to_a_stand_in(&mut server);
    let len = 4 << 20;
    *server
        .parts
        .shared
        .handoff_state
        .lock()
        .unwrap_or_else(|e| e.into_inner()) = bytes::Bytes::from(vec![5u8; len]);
    let mut driver = Driver::new(server, super::Waiting::InRuntime).unwrap();
    let fd = driver.readiness_fd().expect("a wake set");
    driver.request_upgrade(crate::machine::Requester::Signal);
    let deadline = Instant::now() + BOUND;
    while driver.successor.is_none() && Instant::now() < deadline {
        turn_as_a_runtime(&mut driver);
        std::thread::sleep(Duration::from_millis(1));
    }
    let pid = driver.successor.as_ref().expect("no successor started").pid;
    let _successor = KillOnDrop::new(pid);
    let channel = successor_channel(pid);
    let (_, _, _, _, first) = take_offer(&channel);
    let accept = Message::Accept(crate::protocol::SUPPORTED.max);
    crate::sys::send_nonblocking(channel.as_fd(), &accept.encode().unwrap()).unwrap();
    let mut buf = vec![0u8; crate::handoff::MAX_MESSAGE_LEN];
    let mut state = first as usize;
    // From here, turn only when the wake set says so, as a runtime would.
    while state < len && Instant::now() < deadline {
        if readable_within(fd, 100) {
            turn_as_a_runtime(&mut driver);
        }
        // The successor's side: take whatever is queued.
        while let Ok(n) = crate::sys::recv_nonblocking(channel.as_fd(), &mut buf) {
            if let Message::State { chunk, .. } = Message::decode(&buf[..n]).unwrap() {
                state += chunk.len();
            }
        }
    }
    assert_eq!(
        state, len,
        "the handoff stalled: room in the channel did not wake the runtime"
    );
}

/// One handoff per upgrade: a successor that answers ACCEPT twice would have a second handoff
/// sent beside the first; it is an invalid message instead, and the upgrade rolls back.
#[test]
fn a_second_accept_rolls_the_upgrade_back() {
    let mut server = tcp_server(1);
    upgrade_to_a_stand_in(&mut server);
    let mut driver = Driver::new(server, super::Waiting::InRing).unwrap();
    let (pid, channel, _upgrade) = start_successor(&mut driver);
    let _successor = KillOnDrop::new(pid);
    let accept = Message::Accept(crate::protocol::SUPPORTED.max);
    crate::sys::send_nonblocking(channel.as_fd(), &accept.encode().unwrap()).unwrap();
    let deadline = Instant::now() + BOUND;
    while driver.machine.phase() != crate::machine::Phase::Serving && Instant::now() < deadline {
        driver.turn(false, &mut |_| {}).unwrap();
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(driver.machine.phase(), crate::machine::Phase::Serving);
}

/// On a kernel without `IORING_ACCEPT_POLL_FIRST` (before 6.10) the first accept ends at once
/// with EINVAL: the driver must learn that and accept as before, losing no connection. Taken
/// here with a flag bit that no kernel knows in its place.
#[test]
fn a_kernel_without_poll_first_accepts_as_before() {
    let server = tcp_server(1);
    let addr = server.local_addr("t").unwrap();
    let mut driver = Driver::prepare(server.parts, Waiting::InRing).unwrap();
    driver.accepts.poll_first_flag = 1 << 15;
    driver.start().unwrap();
    let clients: Vec<TcpStream> = (0..4).map(|_| TcpStream::connect(addr).unwrap()).collect();
    let taken = serve(&mut [&mut driver], clients.len());
    assert!(driver.accepts.no_poll_first, "the refusal was not learnt");
    assert_eq!(taken.len(), clients.len(), "connections lost");
}

/// The same with two listeners (helper-25's review): every accept armed at the start is
/// refused, not only the first. Each must re-arm at once; the second was paused with a
/// backoff ("accept paused"), and `accept_paused` stayed set until it delivered.
#[test]
fn a_kernel_without_poll_first_re_arms_every_listener_at_once() {
    let server = Server::builder()
        .listen_tcp("a", "127.0.0.1:0".parse().unwrap())
        .listen_tcp("b", "127.0.0.1:0".parse().unwrap())
        .build()
        .unwrap();
    let mut driver = Driver::prepare(server.parts, Waiting::InRing).unwrap();
    driver.accepts.poll_first_flag = 1 << 15;
    driver.start().unwrap();
    let deadline = Instant::now() + BOUND;
    while !driver.accepts.no_poll_first && Instant::now() < deadline {
        driver.turn(false, &mut |_| {}).unwrap();
    }
    assert!(driver.accepts.no_poll_first, "the refusal was not learnt");
    for i in 0..2 {
        assert!(driver.accepts[i].op.is_some(), "listener {i} left unarmed");
    }
    assert!(
        !driver
            .shared
            .accept_paused
            .load(std::sync::atomic::Ordering::SeqCst),
        "a listener was paused"
    );
}

/// On a kernel without `IORING_ACCEPT_DONTWAIT` (before 6.10) sweeps of two listeners sent
/// in one turn both fail with EINVAL. The first refusal teaches the driver to sweep by
/// re-arming the multishot accept; the second must do so too (its listener was left alone,
/// a connection stranded in its queue until another came).
#[test]
fn every_sweep_refused_for_dontwait_re_arms_its_listener() {
    let server = Server::builder()
        .listen_tcp("a", "127.0.0.1:0".parse().unwrap())
        .listen_tcp("b", "127.0.0.1:0".parse().unwrap())
        .build()
        .unwrap();
    let mut driver = Driver::new(server, Waiting::InRing).unwrap();
    driver.sweep(0);
    driver.sweep(1);
    let tokens: Vec<_> = (0..2)
        .map(|i| driver.accepts[i].sweep_accept.expect("a sweep in flight"))
        .collect();
    for (i, token) in tokens.into_iter().enumerate() {
        driver.on_sweep_accept(token, i, None, -libc::EINVAL, &mut |_| {});
    }
    assert!(driver.accepts.no_dontwait);
    for i in 0..2 {
        assert!(
            driver.accepts[i].cancel_sent,
            "listener {i}'s accept was not re-armed to sweep it"
        );
    }
}

/// With `IORING_ACCEPT_POLL_FIRST`, connections already queued when the accept is armed are
/// taken at once (the poll finds the queue readable as it is armed), and later ones too.
#[test]
fn an_accept_armed_poll_first_takes_what_is_queued_and_what_comes() {
    let server = tcp_server(1);
    let addr = server.local_addr("t").unwrap();
    let before: Vec<TcpStream> = (0..4).map(|_| TcpStream::connect(addr).unwrap()).collect();
    let mut driver = Driver::new(server, Waiting::InRing).unwrap();
    assert_eq!(serve(&mut [&mut driver], before.len()).len(), before.len());
    let after: Vec<TcpStream> = (0..4).map(|_| TcpStream::connect(addr).unwrap()).collect();
    assert_eq!(serve(&mut [&mut driver], after.len()).len(), after.len());
    let release = nix::sys::utsname::uname().unwrap();
    let release = release.release().to_string_lossy().into_owned();
    let mut version = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|n| n.parse::<u32>());
    if let (Some(Ok(major)), Some(Ok(minor))) = (version.next(), version.next()) {
        if (major, minor) >= (6, 10) {
            assert!(
                !driver.accepts.no_poll_first,
                "Linux {release} refused POLL_FIRST"
            );
        }
    }
}
