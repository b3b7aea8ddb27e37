//! Starting the new binary.
//!
//! `posix_spawn` (glibc: `clone(CLONE_VM | CLONE_VFORK)`), never `fork`: copying the page tables
//! of a 2 GiB process took 40 ms here, posix_spawn 0.2 ms. No `pre_exec` either, since that
//! forces std into a real fork. What the child needs is set through spawn attributes:
//! - the signal mask is emptied (this process blocks the upgrade signal, SIGTERM and SIGINT for its signalfd and
//!   exec keeps the mask), and those signals get their default disposition;
//! - the child's end of the handoff socketpair is dup2'ed to fd 3, the one fd without
//!   `FD_CLOEXEC`; every other fd this crate makes is close-on-exec;
//! - the child's fd table is grown to this process's size before exec (see
//!   [`presize_slot`]).

use std::ffi::{CString, OsString};
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::spawn::{PosixSpawnAttr, PosixSpawnFileActions, PosixSpawnFlags};
use nix::sys::signal::SigSet;
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};

use crate::handoff::{CHILD_FD, ENV_FD, ENV_UPGRADE_ID};
use crate::launch::EnvOverrides;
use crate::machine::UpgradeId;
use crate::sys;

/// A started successor.
#[derive(Debug)]
pub(crate) struct Spawned {
    pub pid: u32,
    /// Watches the child's exit without reaping it.
    pub pidfd: OwnedFd,
    /// This process's end of the handoff socketpair.
    pub channel: OwnedFd,
}

/// The handoff socketpair (this process's end, the child's end), sized for the largest HELLO.
///
/// A `SOCK_SEQPACKET` message must fit the sender's send buffer whole (`EMSGSIZE` otherwise:
/// the kernel refuses a unix datagram longer than `sk_sndbuf - 32`). The largest HELLO the
/// protocol allows (`MAX_MESSAGE_LEN`, ~390 KB: an OFFER carrying a HELLO with 253 records at
/// their longest and a 64 KiB state chunk) is larger than the default buffer (`net.core.wmem_default`, 208 KiB on
/// most systems), so both ends ask for room for it; the kernel grants up to twice
/// `net.core.wmem_max` (so at least 416 KiB with the usual 208 KiB maximum, enough). The child
/// sends only short messages, but its end gets the same size: one rule for the channel.
pub(crate) fn handoff_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    use nix::sys::socket::{setsockopt, sockopt::SndBuf};
    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )?;
    let room = crate::handoff::MAX_MESSAGE_LEN + 4096;
    for end in [&ours, &theirs] {
        setsockopt(end, SndBuf, &room)?;
    }
    Ok((ours, theirs))
}

/// Starts `exe` with `args` (argv[0] included), this process's environment as `env` changes
/// it, and the handoff socket at fd 3.
pub(crate) fn spawn(
    exe: &Path,
    args: &[OsString],
    env: &EnvOverrides,
    upgrade: UpgradeId,
    handled_signals: &SigSet,
) -> io::Result<Spawned> {
    let (channel, child_end) = handoff_pair()?;
    // dup2(fd, fd) would leave FD_CLOEXEC set, so make sure the source is not fd 3 (nor stdio,
    // in case this process runs with 0-2 closed).
    let child_end = sys::dup_cloexec_at_least(child_end.as_fd(), 10)?;

    let presize = presize_slot();
    let actions = file_actions(child_end.as_raw_fd(), presize)?;
    let mut attr = PosixSpawnAttr::init()?;
    attr.set_flags(
        PosixSpawnFlags::POSIX_SPAWN_SETSIGMASK | PosixSpawnFlags::POSIX_SPAWN_SETSIGDEF,
    )?;
    attr.set_sigmask(&SigSet::empty())?;
    attr.set_sigdefault(handled_signals)?;

    let argv = args
        .iter()
        .map(|a| cstring(a.as_bytes()))
        .collect::<io::Result<Vec<_>>>()?;
    let mut envp = Vec::new();
    // Our own variables are set below; the overrides keep any out of what they give.
    for (key, value) in env.apply(std::env::vars_os())? {
        let mut kv = key.as_bytes().to_vec();
        kv.push(b'=');
        kv.extend_from_slice(value.as_bytes());
        envp.push(cstring(&kv)?);
    }
    envp.push(cstring(format!("{ENV_FD}={CHILD_FD}").as_bytes())?);
    envp.push(cstring(
        format!("{ENV_UPGRADE_ID}={}", upgrade.0).as_bytes(),
    )?);

    // glibc reports exec failures (ENOENT, EACCES, ENOEXEC…) as posix_spawn's own error.
    let pid = match nix::spawn::posix_spawn(exe, &actions, &attr, &argv, &envp) {
        // The pre-sizing dup2 refused (an fd limit lowered since we looked, or no memory for
        // the table): start the child without it rather than fail the upgrade.
        Err(nix::errno::Errno::EBADF | nix::errno::Errno::EMFILE | nix::errno::Errno::ENOMEM)
            if presize.is_some() =>
        {
            let actions = file_actions(child_end.as_raw_fd(), None)?;
            nix::spawn::posix_spawn(exe, &actions, &attr, &argv, &envp)?
        }
        other => other?,
    };
    let pid = pid.as_raw() as u32;
    // The child is not reaped until we reap it, so its pid cannot be reused before this.
    let pidfd = match sys::pidfd_open(pid) {
        Ok(fd) => fd,
        Err(e) => {
            let _ = sys::kill(pid, libc::SIGKILL);
            // Reaping the child we just started, blocking only until SIGKILL lands.
            let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid as i32), None);
            return Err(e);
        }
    };
    drop(child_end);
    Ok(Spawned {
        pid,
        pidfd,
        channel,
    })
}

/// What the child does before exec: `child_end` to fd 3, and, with a `presize` slot, a dup2
/// to it then a close, which grows its fd table (see [`presize_slot`]).
fn file_actions(child_end: RawFd, presize: Option<RawFd>) -> io::Result<PosixSpawnFileActions> {
    let mut actions = PosixSpawnFileActions::init()?;
    actions.add_dup2(child_end, CHILD_FD)?;
    if let Some(slot) = presize {
        actions.add_dup2(child_end, slot)?;
        actions.add_close(slot)?;
    }
    Ok(actions)
}

/// The fd slot whose dup2 (then close) in the child, before exec, grows the child's fd table
/// to the size of this process's, or `None` when there is nothing to gain or no safe slot.
///
/// Why: a multi-threaded process that grows its fd table waits for an RCU grace period in
/// `expand_fdtable` (so that no lockless `fd_install` still writes to the old table), and
/// `accept` grows it when it is full. A new process starts with a 64-slot table, so under a
/// burst its accepts grew it 64 → 128 → 256 → 512, each time with the serving thread in D
/// state inside `io_accept`: 4-20 ms each on this VM (median 11.8 ms; `perf record -e
/// sched:sched_switch -g`), while the old process, whose table had grown long ago, had just
/// stopped accepting. In the child the table is not shared yet, so growing it there needs no
/// grace period, and exec keeps an unshared table whatever its size.
///
/// The slot is half this process's table size, [`sys::table_growth_slot`] (and below
/// `RLIMIT_NOFILE`, or the dup2 would fail): a dup2 to slot S/2 gives exactly S slots, so the
/// table keeps its size from generation to generation. The slot must be closed or close-on-exec here: the child's copy of a
/// close-on-exec fd is closed at exec anyway, while an fd meant to be inherited must not be
/// replaced.
fn presize_slot() -> Option<RawFd> {
    const DEFAULT_TABLE: u64 = 64; // NR_OPEN_DEFAULT on 64-bit kernels: no growth below it
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let slots = fd_table_slots(&status)? as u64;
    let limit = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .ok()?
        .0;
    if slots <= DEFAULT_TABLE {
        return None;
    }
    let slot = sys::table_growth_slot(slots).min(limit.checked_sub(1)?);
    if slot < DEFAULT_TABLE {
        return None; // the limit leaves no room to grow
    }
    let slot = RawFd::try_from(slot).ok()?;
    sys::slot_free_or_cloexec(slot).then_some(slot)
}

/// The `FDSize:` line of a `/proc/PID/status`: how many slots the fd table has.
fn fd_table_slots(status: &str) -> Option<usize> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("FDSize:"))
        .and_then(|v| v.trim().parse().ok())
}

fn cstring(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "argument or environment variable contains a NUL byte",
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The largest message the protocol allows (an OFFER carrying a HELLO with every record at
    /// its longest and a 64 KiB state chunk) goes through the handoff channel whole (before the channel was sized for it,
    /// the send failed with EMSGSIZE and the upgrade rolled back).
    #[test]
    fn the_largest_message_fits_the_channel() {
        use crate::handoff::{tests::largest_message, MAX_MESSAGE_LEN};
        let big = largest_message().encode().unwrap();
        assert!(big.len() > 300_000, "{}", big.len());
        let (ours, theirs) = handoff_pair().unwrap();
        sys::send_nonblocking(ours.as_fd(), &big).expect("the largest HELLO does not fit");
        let mut buf = vec![0u8; MAX_MESSAGE_LEN];
        let n = sys::recv_nonblocking(theirs.as_fd(), &mut buf).unwrap();
        assert_eq!(&buf[..n], &big[..]);
    }

    #[test]
    fn fd_table_slots_reads_fdsize() {
        let status = "Name:\tx\nUmask:\t0022\nFDSize:\t512\nGroups:\t\n";
        assert_eq!(fd_table_slots(status), Some(512));
        assert_eq!(fd_table_slots("Name:\tx\n"), None);
        assert_eq!(fd_table_slots("FDSize:\tmany\n"), None);
    }

    #[test]
    fn this_process_has_an_fd_table_size() {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        assert!(fd_table_slots(&status).unwrap() >= 64);
    }
}
