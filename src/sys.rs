//! Thin, documented wrappers over the few syscalls the crate needs beyond `io-uring` and `nix`.
//! Every fd made here is `O_CLOEXEC`: the only fd that crosses exec is the handoff socket the
//! spawner places at fd 3 on purpose.
#![allow(unsafe_code)]

use std::io;
use std::mem;
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// `eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)`.
pub(crate) fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; on success the fd is new and owned by nobody else.
    let fd = cvt(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) })?;
    // SAFETY: `fd` was just returned by the kernel and is owned by us alone.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Adds 1 to an eventfd. Never blocks (the counter would have to reach 2^64-1).
pub(crate) fn eventfd_signal(fd: BorrowedFd<'_>) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a live u64 to an fd we borrow.
    unsafe { libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
}

/// Reads (and so resets) a non-blocking eventfd's counter; nothing to read is fine.
pub(crate) fn eventfd_drain(fd: BorrowedFd<'_>) {
    let mut value: u64 = 0;
    // SAFETY: reads 8 bytes into a live u64.
    unsafe { libc::read(fd.as_raw_fd(), (&mut value as *mut u64).cast(), 8) };
}

/// A signalfd for `signals`, `CLOEXEC | NONBLOCK`. The caller blocks the signals.
pub(crate) fn signalfd(signals: &nix::sys::signal::SigSet) -> io::Result<OwnedFd> {
    // SAFETY: `signals` is a valid sigset; -1 asks for a new fd.
    let fd = cvt(unsafe {
        libc::signalfd(-1, signals.as_ref(), libc::SFD_CLOEXEC | libc::SFD_NONBLOCK)
    })?;
    // SAFETY: `fd` is new and ours.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
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

/// Whether `fd` polls readable within `timeout_ms` milliseconds (`poll`).
pub(crate) fn readable_within(fd: BorrowedFd<'_>, timeout_ms: i32) -> bool {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one live pollfd.
    let n = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
    n > 0 && pfd.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0
}

/// `fcntl(F_DUPFD_CLOEXEC, min)`.
pub(crate) fn dup_cloexec_at_least(fd: BorrowedFd<'_>, min: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: duplicating an fd we borrow; the new fd is ours.
    let new = cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, min) })?;
    // SAFETY: `new` is new and ours.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

/// Sets `FD_CLOEXEC` on an fd that was inherited without it.
pub(crate) fn set_cloexec(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: fcntl on a borrowed fd.
    cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) })?;
    Ok(())
}

/// Whether `fd` has `FD_CLOEXEC`.
pub(crate) fn is_cloexec(fd: BorrowedFd<'_>) -> io::Result<bool> {
    // SAFETY: fcntl on a borrowed fd.
    let flags = cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFD) })?;
    Ok(flags & libc::FD_CLOEXEC != 0)
}

fn getsockopt_int(fd: BorrowedFd<'_>, level: libc::c_int, name: libc::c_int) -> io::Result<i32> {
    let mut value: libc::c_int = 0;
    let mut len = mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `value` and `len` are live and sized for an int option.
    cvt(unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    })?;
    Ok(value)
}

/// `SO_TYPE`; fails with `ENOTSOCK` for a non-socket.
pub(crate) fn socket_type(fd: BorrowedFd<'_>) -> io::Result<i32> {
    getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_TYPE)
}

/// `SO_ACCEPTCONN`: whether the socket is listening.
pub(crate) fn is_listening(fd: BorrowedFd<'_>) -> io::Result<bool> {
    Ok(getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_ACCEPTCONN)? != 0)
}

/// `SO_DOMAIN`.
pub(crate) fn socket_domain(fd: BorrowedFd<'_>) -> io::Result<i32> {
    getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_DOMAIN)
}

/// The local address of an IPv4 or IPv6 socket.
pub(crate) fn local_inet_addr(fd: BorrowedFd<'_>) -> io::Result<SocketAddr> {
    // SAFETY: sockaddr_storage is plain data; all-zero is a valid value.
    let mut storage: libc::sockaddr_storage = unsafe { mem::zeroed() };
    let mut len = mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: `storage` is large enough for any address; `len` says how large.
    cvt(unsafe {
        libc::getsockname(
            fd.as_raw_fd(),
            (&mut storage as *mut libc::sockaddr_storage).cast(),
            &mut len,
        )
    })?;
    match storage.ss_family as i32 {
        libc::AF_INET => {
            // SAFETY: the kernel said the storage holds a sockaddr_in.
            let a: libc::sockaddr_in =
                unsafe { *(&storage as *const _ as *const libc::sockaddr_in) };
            Ok(SocketAddr::V4(SocketAddrV4::new(
                u32::from_be(a.sin_addr.s_addr).into(),
                u16::from_be(a.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the kernel said the storage holds a sockaddr_in6.
            let a: libc::sockaddr_in6 =
                unsafe { *(&storage as *const _ as *const libc::sockaddr_in6) };
            Ok(SocketAddr::V6(SocketAddrV6::new(
                a.sin6_addr.s6_addr.into(),
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            )))
        }
        family => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("address family {family} is not IPv4 or IPv6"),
        )),
    }
}

/// `listen(fd, backlog)`. Calling it again on a listening socket only changes the backlog.
pub(crate) fn listen(fd: BorrowedFd<'_>, backlog: i32) -> io::Result<()> {
    // SAFETY: listen on a borrowed fd.
    cvt(unsafe { libc::listen(fd.as_raw_fd(), backlog) })?;
    Ok(())
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
    // SAFETY: plain syscall.
    if unsafe { libc::kill(pid as libc::pid_t, sig) } < 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::ESRCH) {
            return Err(err);
        }
    }
    Ok(())
}

/// `waitid(P_PIDFD, fd, WEXITED | WNOHANG)`: `Some(description)` ("exit status 1", "killed by
/// signal 9") once the child the pidfd was opened for was reaped here; `None` while it runs (or
/// is not yet a zombie). Unlike `waitpid(pid)`, never about another process that took a reused
/// pid.
pub(crate) fn try_reap_pidfd(fd: BorrowedFd<'_>) -> io::Result<Option<String>> {
    // SAFETY: siginfo_t is plain data that waitid fills; all-zero is valid.
    let mut info: libc::siginfo_t = unsafe { mem::zeroed() };
    // SAFETY: a live siginfo_t; the pidfd is borrowed.
    let ret = unsafe {
        libc::waitid(
            libc::P_PIDFD,
            fd.as_raw_fd() as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOHANG,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
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
    // SAFETY: sends from a live slice.
    let n = unsafe {
        libc::send(
            fd.as_raw_fd(),
            bytes.as_ptr().cast(),
            bytes.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A non-blocking `recv` of one datagram into `buf`: its length, 0 at EOF.
pub(crate) fn recv_nonblocking(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: receives into a live, writable slice of the given length.
    let n = unsafe {
        libc::recv(
            fd.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
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
    let mut byte = 0u8;
    // SAFETY: peeks at most one byte into a live u8.
    let n = unsafe {
        libc::recv(
            fd.as_raw_fd(),
            (&mut byte as *mut u8).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    n == 0
}

/// Sets `SO_RCVTIMEO` on a socket.
pub(crate) fn set_recv_timeout(fd: BorrowedFd<'_>, timeout: std::time::Duration) -> io::Result<()> {
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: `tv` is a live timeval and the length matches.
    cvt(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    })?;
    Ok(())
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
    // SAFETY: always succeeds.
    unsafe { libc::getppid() as u32 }
}

/// `geteuid()`.
pub(crate) fn euid() -> u32 {
    // SAFETY: always succeeds.
    unsafe { libc::geteuid() }
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
    // SAFETY: rusage is plain data that getrusage fills; RUSAGE_SELF cannot fail.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
        ru
    };
    let tv = |t: libc::timeval| {
        std::time::Duration::from_secs(t.tv_sec as u64)
            + std::time::Duration::from_micros(t.tv_usec as u64)
    };
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// CLOCK_MONOTONIC in microseconds: the same clock in every process of the machine, so an
/// upgrade's timeline can relate the old process's events to the new one's.
pub(crate) fn monotonic_us() -> u64 {
    // SAFETY: clock_gettime fills the timespec; CLOCK_MONOTONIC always exists on Linux.
    let ts = unsafe {
        let mut ts: libc::timespec = std::mem::zeroed();
        libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts);
        ts
    };
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000
}
