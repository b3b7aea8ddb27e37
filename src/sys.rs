//! Thin, documented wrappers over the few syscalls the crate needs beyond `io-uring`. Every fd
//! made here is `O_CLOEXEC`: the only fd that crosses exec is the handoff socket the spawner
//! places at fd 3 on purpose.
//!
//! Each wrapper calls `nix` (or `socket2`, already a dependency for `Builder::listen_tcp_with`)
//! where that crate has a safe call with the same semantics; what no kept crate offers stays
//! by hand, with its `// SAFETY:` comment (issue 15 §3):
//!
//! | function | by | why |
//! |---|---|---|
//! | `eventfd`, `eventfd_signal`, `eventfd_drain` | nix | `EventFd::from_flags`, `unistd::write`/`read` on a `BorrowedFd` |
//! | `signalfd` | nix | `SignalFd::with_flags`, into an `OwnedFd` |
//! | `pidfd_open`, `pidfd_signal` | hand | nix 0.32 has neither (nor does std on stable) |
//! | `poll_readable`, `readable_within` | nix | `poll::poll` with a `PollFd` on a `BorrowedFd` |
//! | `dup_cloexec_at_least` | nix + hand | nix's `fcntl(F_DUPFD_CLOEXEC(min))` returns a raw int: adopting it as `OwnedFd` stays unsafe |
//! | `set_cloexec`, `is_cloexec` | nix | `fcntl(F_SETFD)`, `fcntl(F_GETFD)` |
//! | `socket_type`, `socket_domain` | socket2 | nix has no `SO_DOMAIN`, and its `SO_TYPE` is an enum that turns a type it does not name into `EINVAL` |
//! | `is_listening` | nix | `getsockopt(sockopt::AcceptConn)` |
//! | `local_inet_addr` | nix | `getsockname::<SockaddrStorage>` and its `SocketAddrV4`/`V6` conversions |
//! | `listen` | socket2 | nix's `Backlog` refuses more than `SOMAXCONN` (4096), but `net.core.somaxconn` may be higher and the kernel clamps any backlog itself |
//! | `kill` | nix | `signal::kill`; 0 is `None` |
//! | `try_reap_pidfd` | hand | nix's `waitid(Id::PIDFd)` turns a death by a real-time signal into `EINVAL` after the child was reaped, losing its status for good |
//! | `send_nonblocking`, `recv_nonblocking`, `peer_closed` | nix | `socket::send`/`recv` with `MsgFlags` |
//! | `signal_pending` | hand | nix 0.32 has no `sigpending` |
//! | `set_recv_timeout` | nix | `setsockopt(sockopt::ReceiveTimeout)` |
//! | `parent_pid`, `euid` | nix | `unistd::getppid`, `unistd::geteuid` |
//! | `peer_groups` | hand | neither nix nor socket2 has `SO_PEERGROUPS` (a variable-length option) |
//! | `process_cpu_time` | nix | `resource::getrusage(RUSAGE_SELF)` |
//! | `monotonic_us` | nix | `time::clock_gettime(CLOCK_MONOTONIC)` |
//!
//! The wire format (`handoff`) and the ring (`io-uring`) are the crate's own; no crate offers them.
#![allow(unsafe_code)]

use std::io;
use std::mem;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{self, sockopt, MsgFlags, SockaddrLike, SockaddrStorage};
use socket2::SockRef;

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// `eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)`.
pub(crate) fn eventfd() -> io::Result<OwnedFd> {
    use nix::sys::eventfd::{EfdFlags, EventFd};
    let fd = EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)?;
    Ok(fd.into())
}

/// Adds 1 to an eventfd. Never blocks (the counter would have to reach 2^64-1).
pub(crate) fn eventfd_signal(fd: BorrowedFd<'_>) {
    let _ = nix::unistd::write(fd, &1u64.to_ne_bytes());
}

/// Reads (and so resets) a non-blocking eventfd's counter; nothing to read is fine.
pub(crate) fn eventfd_drain(fd: BorrowedFd<'_>) {
    let _ = nix::unistd::read(fd, &mut [0u8; 8]);
}

/// A signalfd for `signals`, `CLOEXEC | NONBLOCK`. The caller blocks the signals.
pub(crate) fn signalfd(signals: &nix::sys::signal::SigSet) -> io::Result<OwnedFd> {
    use nix::sys::signalfd::{SfdFlags, SignalFd};
    let fd = SignalFd::with_flags(signals, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)?;
    Ok(fd.into())
}

/// `pidfd_open(pid, 0)`: the fd is always close-on-exec.
pub(crate) fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall with integer arguments.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is new and ours.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// `pidfd_send_signal(fd, sig)`: reaches the process the pidfd was opened for and no other,
/// even after its pid was reused. `Ok(false)` once it has exited (`ESRCH`), an error if `fd`
/// is not a pidfd. Signal 0 only checks that the process still runs.
pub(crate) fn pidfd_signal(fd: BorrowedFd<'_>, sig: libc::c_int) -> io::Result<bool> {
    // SAFETY: plain syscall on a borrowed fd; no siginfo.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd.as_raw_fd(),
            sig,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if ret == 0 {
        return Ok(true);
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::ESRCH) => Ok(false),
        _ => Err(err),
    }
}

/// Whether `fd` polls readable right now (zero-timeout `poll`). A pidfd is readable once its
/// process has exited (zombie or reaped; signal 0 still reaches a zombie, so `pidfd_signal(fd, 0)`
/// cannot tell); a ring fd is readable while completions or deferred work are pending.
pub(crate) fn poll_readable(fd: BorrowedFd<'_>) -> bool {
    readable_within(fd, 0)
}

/// Which of `fds` poll readable right now (one zero-timeout `poll` for all), by index. On an
/// error (ENOMEM), all of them: the caller then looks at each.
pub(crate) fn readable_among(fds: &[BorrowedFd<'_>]) -> Vec<usize> {
    let mut polled: Vec<PollFd<'_>> = fds
        .iter()
        .map(|fd| PollFd::new(*fd, PollFlags::POLLIN))
        .collect();
    match nix::poll::poll(&mut polled, PollTimeout::ZERO) {
        Ok(0) => Vec::new(),
        Ok(_) => polled
            .iter()
            .enumerate()
            .filter(|(_, p)| p.revents().is_some_and(|r| !r.is_empty()))
            .map(|(i, _)| i)
            .collect(),
        Err(_) => (0..fds.len()).collect(),
    }
}

/// Whether `fd` polls readable within `timeout_ms` milliseconds (`poll`; negative: no limit).
pub(crate) fn readable_within(fd: BorrowedFd<'_>, timeout_ms: i32) -> bool {
    let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
    let timeout = PollTimeout::try_from(timeout_ms).unwrap_or(PollTimeout::NONE);
    // The kernel reports only the events asked for plus ERR/HUP/NVAL, all of which nix names.
    matches!(nix::poll::poll(&mut fds, timeout), Ok(n) if n > 0)
        && fds[0].revents().is_some_and(|r| {
            r.intersects(
                PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR | PollFlags::POLLNVAL,
            )
        })
}

/// `fcntl(F_DUPFD_CLOEXEC, min)`.
pub(crate) fn dup_cloexec_at_least(fd: BorrowedFd<'_>, min: RawFd) -> io::Result<OwnedFd> {
    let new = fcntl(fd, FcntlArg::F_DUPFD_CLOEXEC(min))?;
    // SAFETY: `new` was just returned by F_DUPFD_CLOEXEC: a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

/// Sets `FD_CLOEXEC` on an fd that was inherited without it.
pub(crate) fn set_cloexec(fd: BorrowedFd<'_>) -> io::Result<()> {
    fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))?;
    Ok(())
}

/// Whether `fd` has `FD_CLOEXEC`.
pub(crate) fn is_cloexec(fd: BorrowedFd<'_>) -> io::Result<bool> {
    let flags = fcntl(fd, FcntlArg::F_GETFD)?;
    Ok(FdFlag::from_bits_truncate(flags).contains(FdFlag::FD_CLOEXEC))
}

/// `SO_TYPE`; fails with `ENOTSOCK` for a non-socket.
pub(crate) fn socket_type(fd: BorrowedFd<'_>) -> io::Result<i32> {
    SockRef::from(&fd).r#type().map(i32::from)
}

/// `SO_ACCEPTCONN`: whether the socket is listening.
pub(crate) fn is_listening(fd: BorrowedFd<'_>) -> io::Result<bool> {
    Ok(socket::getsockopt(&fd, sockopt::AcceptConn)?)
}

/// `SO_DOMAIN`.
pub(crate) fn socket_domain(fd: BorrowedFd<'_>) -> io::Result<i32> {
    SockRef::from(&fd).domain().map(i32::from)
}

/// The local address of an IPv4 or IPv6 socket.
pub(crate) fn local_inet_addr(fd: BorrowedFd<'_>) -> io::Result<SocketAddr> {
    let addr: SockaddrStorage = socket::getsockname(fd.as_raw_fd())?;
    if let Some(v4) = addr.as_sockaddr_in() {
        Ok(SocketAddr::V4((*v4).into()))
    } else if let Some(v6) = addr.as_sockaddr_in6() {
        Ok(SocketAddr::V6((*v6).into()))
    } else {
        let family = addr.family().map_or(-1, |f| f as i32);
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("address family {family} is not IPv4 or IPv6"),
        ))
    }
}

/// `listen(fd, backlog)`. Calling it again on a listening socket only changes the backlog.
pub(crate) fn listen(fd: BorrowedFd<'_>, backlog: i32) -> io::Result<()> {
    SockRef::from(&fd).listen(backlog)
}

/// The kernel's cap on listen backlogs (`net.core.somaxconn`), 4096 if unreadable.
pub(crate) fn somaxconn() -> i32 {
    std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(4096)
}

/// The fd whose `dup` grows a table to at least `slots` slots: kernels size fd tables in powers
/// of two (from 64, then in 128-slot steps under the older rule), and growing to cover fd N
/// makes `roundup_pow_of_two(N + 1)` slots, so half the power of two at or above `slots` gives
/// exactly that power of two under both rules.
pub(crate) fn table_growth_slot(slots: u64) -> u64 {
    slots.max(128).next_power_of_two() / 2
}

/// Grows this process's fd table, once, to hold a full accept queue: at least
/// `min(somaxconn, RLIMIT_NOFILE)` slots. A burst of connections grows a 64-slot table
/// 64 → 128 → … as accepts fill it, and in a multi-threaded process each growth waits for an
/// RCU grace period on the accepting thread (`expand_files`; traced at ~19 ms each on this VM
/// under a 512-connection burst). Here it costs that wait once, before serving. A successor's
/// table is already this size or bigger (the spawn grows it before exec, see
/// `spawn::presize_slot`), so for it this is one `fcntl` and one `close`.
///
/// `F_DUPFD_CLOEXEC` takes the lowest *free* fd at or above the slot, so no open fd is
/// touched. Best effort: with a limit too low for the slot, the table stays as it is.
pub(crate) fn grow_fd_table(probe: BorrowedFd<'_>) {
    let Ok((soft, _)) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
    else {
        return;
    };
    let want = (somaxconn().max(0) as u64).min(soft);
    let slot = table_growth_slot(want);
    if slot >= soft {
        return; // dup cannot reach the slot under this limit
    }
    let Ok(slot) = RawFd::try_from(slot) else {
        return;
    };
    // Dropped at once: only the table's growth is wanted.
    let _ = dup_cloexec_at_least(probe, slot);
}

/// `kill(pid, sig)`; `ESRCH` (already gone) is not an error.
pub(crate) fn kill(pid: u32, sig: libc::c_int) -> io::Result<()> {
    let signal = match sig {
        0 => None,
        sig => Some(nix::sys::signal::Signal::try_from(sig)?),
    };
    let pid = nix::unistd::Pid::from_raw(pid as libc::pid_t);
    match nix::sys::signal::kill(pid, signal) {
        Ok(()) | Err(Errno::ESRCH) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// `waitid(P_PIDFD, fd, WEXITED | WNOHANG)`: `Some(description)` ("exit status 1", "killed by
/// signal 9") once the child the pidfd was opened for was reaped here; `None` while it runs (or
/// is not yet a zombie). Unlike `waitpid(pid)`, never about another process that took a reused
/// pid.
pub(crate) fn try_reap_pidfd(fd: BorrowedFd<'_>) -> io::Result<Option<String>> {
    // SAFETY: siginfo_t is plain data that waitid fills; all-zero is valid.
    let mut info: libc::siginfo_t = unsafe { mem::zeroed() };
    // SAFETY: a live siginfo_t; the pidfd is borrowed.
    cvt(unsafe {
        libc::waitid(
            libc::P_PIDFD,
            fd.as_raw_fd() as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOHANG,
        )
    })?;
    // SAFETY: waitid filled `info` for a child (or left si_pid 0: nothing to report yet).
    let (pid, status) = unsafe { (info.si_pid(), info.si_status()) };
    if pid == 0 {
        return Ok(None);
    }
    Ok(Some(match info.si_code {
        libc::CLD_EXITED => format!("exit status {status}"),
        _ => format!("killed by signal {status}"),
    }))
}

/// A non-blocking `send` of one whole datagram.
pub(crate) fn send_nonblocking(fd: BorrowedFd<'_>, bytes: &[u8]) -> io::Result<()> {
    let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL;
    socket::send(fd.as_raw_fd(), bytes, flags)?;
    Ok(())
}

/// A non-blocking `recv` of one datagram into `buf`: its length, 0 at EOF.
pub(crate) fn recv_nonblocking(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    Ok(socket::recv(fd.as_raw_fd(), buf, MsgFlags::MSG_DONTWAIT)?)
}

/// Whether `signal` is pending for the calling thread or the process (`sigpending`): for a
/// blocked signal, sent but not read yet.
pub(crate) fn signal_pending(signal: libc::c_int) -> bool {
    // SAFETY: sigset_t is plain data; sigpending fills it, sigismember reads it.
    unsafe {
        let mut set: libc::sigset_t = mem::zeroed();
        libc::sigpending(&mut set) == 0 && libc::sigismember(&set, signal) == 1
    }
}

/// Whether the peer of a connected socket has closed its end with nothing left to read
/// (a non-blocking `MSG_PEEK` reads EOF).
pub(crate) fn peer_closed(fd: BorrowedFd<'_>) -> bool {
    let flags = MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT;
    matches!(socket::recv(fd.as_raw_fd(), &mut [0u8; 1], flags), Ok(0))
}

/// Sets `SO_RCVTIMEO` on a socket.
pub(crate) fn set_recv_timeout(fd: BorrowedFd<'_>, timeout: std::time::Duration) -> io::Result<()> {
    let tv = nix::sys::time::TimeVal::new(
        timeout.as_secs() as libc::time_t,
        timeout.subsec_micros() as libc::suseconds_t,
    );
    Ok(socket::setsockopt(&fd, sockopt::ReceiveTimeout, &tv)?)
}

/// Whether SIGTERM or SIGINT is pending for the calling thread (directed at it or at the
/// process: `sigpending` returns the union): a stop was asked for while those are blocked.
pub(crate) fn stop_signal_pending() -> bool {
    // SAFETY: sigpending fills the set it is given; sigismember reads it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigpending(&mut set) == 0
            && (libc::sigismember(&set, libc::SIGTERM) == 1
                || libc::sigismember(&set, libc::SIGINT) == 1)
    }
}

/// `getppid()`.
pub(crate) fn parent_pid() -> u32 {
    nix::unistd::getppid().as_raw() as u32
}

/// `geteuid()`.
pub(crate) fn euid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

/// The supplementary groups of a Unix socket's peer, as they were at its `connect`
/// (`SO_PEERGROUPS`, Linux 4.13).
pub(crate) fn peer_groups(fd: BorrowedFd<'_>) -> io::Result<Vec<u32>> {
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    loop {
        let mut len = (groups.len() * std::mem::size_of::<libc::gid_t>()) as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `groups`, which has that room.
        let rc = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let n = len as usize / std::mem::size_of::<libc::gid_t>();
        if rc == 0 {
            groups.truncate(n);
            return Ok(groups);
        }
        let e = io::Error::last_os_error();
        // ERANGE: too small; `len` says how much is needed.
        if e.raw_os_error() != Some(libc::ERANGE) || n <= groups.len() {
            return Err(e);
        }
        groups.resize(n, 0);
    }
}

/// User + system CPU time this process has used so far (all threads).
pub(crate) fn process_cpu_time() -> std::time::Duration {
    use nix::sys::resource::{getrusage, UsageWho};
    // RUSAGE_SELF cannot fail.
    let Ok(usage) = getrusage(UsageWho::RUSAGE_SELF) else {
        return std::time::Duration::ZERO;
    };
    let tv = |t: nix::sys::time::TimeVal| {
        std::time::Duration::from_secs(t.tv_sec() as u64)
            + std::time::Duration::from_micros(t.tv_usec() as u64)
    };
    tv(usage.user_time()) + tv(usage.system_time())
}

/// CLOCK_MONOTONIC in microseconds: the same clock in every process of the machine, so an
/// upgrade's timeline can relate the old process's events to the new one's.
pub(crate) fn monotonic_us() -> u64 {
    use nix::time::{clock_gettime, ClockId};
    // CLOCK_MONOTONIC always exists on Linux.
    clock_gettime(ClockId::CLOCK_MONOTONIC).map_or(0, |ts| {
        ts.tv_sec() as u64 * 1_000_000 + ts.tv_nsec() as u64 / 1_000
    })
}

#[cfg(test)]
mod tests {
    use std::net::{TcpListener, UdpSocket};
    use std::os::fd::AsFd;

    #[test]
    fn an_eventfd_polls_readable_until_drained() {
        let fd = super::eventfd().unwrap();
        assert!(super::is_cloexec(fd.as_fd()).unwrap());
        assert!(!super::poll_readable(fd.as_fd()));
        super::eventfd_signal(fd.as_fd());
        super::eventfd_signal(fd.as_fd());
        assert!(super::readable_within(fd.as_fd(), 1_000));
        super::eventfd_drain(fd.as_fd());
        assert!(!super::poll_readable(fd.as_fd()));
    }

    #[test]
    fn cloexec_is_read_and_set() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let plain = nix::unistd::dup(listener.as_fd()).unwrap();
        assert!(!super::is_cloexec(plain.as_fd()).unwrap());
        super::set_cloexec(plain.as_fd()).unwrap();
        assert!(super::is_cloexec(plain.as_fd()).unwrap());
        let high = super::dup_cloexec_at_least(plain.as_fd(), 100).unwrap();
        assert!(std::os::fd::AsRawFd::as_raw_fd(&high) >= 100);
        assert!(super::is_cloexec(high.as_fd()).unwrap());
    }

    #[test]
    fn socket_queries_match_the_socket() {
        let tcp = TcpListener::bind("[::1]:0").unwrap();
        let fd = tcp.as_fd();
        assert_eq!(super::socket_type(fd).unwrap(), libc::SOCK_STREAM);
        assert_eq!(super::socket_domain(fd).unwrap(), libc::AF_INET6);
        assert!(super::is_listening(fd).unwrap());
        assert_eq!(
            super::local_inet_addr(fd).unwrap(),
            tcp.local_addr().unwrap()
        );
        // Above SOMAXCONN (4096), where nix's `Backlog` would refuse: the kernel clamps it.
        super::listen(fd, 65_535).unwrap();

        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        assert_eq!(super::socket_type(udp.as_fd()).unwrap(), libc::SOCK_DGRAM);
        assert!(!super::is_listening(udp.as_fd()).unwrap());
        assert_eq!(
            super::local_inet_addr(udp.as_fd()).unwrap(),
            udp.local_addr().unwrap()
        );

        let (unix, _peer) = std::os::unix::net::UnixStream::pair().unwrap();
        let err = super::local_inet_addr(unix.as_fd()).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
        let file = std::fs::File::open("/proc/self/status").unwrap();
        let err = super::socket_type(file.as_fd()).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOTSOCK));
    }

    #[test]
    fn datagrams_go_through_without_blocking() {
        let (a, b) = std::os::unix::net::UnixDatagram::pair().unwrap();
        let mut buf = [0u8; 16];
        let err = super::recv_nonblocking(b.as_fd(), &mut buf).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::WouldBlock);
        super::send_nonblocking(a.as_fd(), b"hello").unwrap();
        assert_eq!(super::recv_nonblocking(b.as_fd(), &mut buf).unwrap(), 5);
        assert_eq!(&buf[..5], b"hello");

        let (c, d) = std::os::unix::net::UnixStream::pair().unwrap();
        super::set_recv_timeout(d.as_fd(), std::time::Duration::from_millis(1500)).unwrap();
        assert_eq!(
            d.read_timeout().unwrap(),
            Some(std::time::Duration::from_millis(1500))
        );
        assert!(!super::peer_closed(d.as_fd()));
        drop(c);
        assert!(super::peer_closed(d.as_fd()));
    }

    #[test]
    fn process_queries_answer() {
        assert_eq!(super::parent_pid(), std::os::unix::process::parent_id());
        super::kill(std::process::id(), 0).unwrap();
        assert!(super::monotonic_us() > 0);
        assert!(super::process_cpu_time() > std::time::Duration::ZERO);
    }
}
