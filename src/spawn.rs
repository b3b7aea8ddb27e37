//! Starting the new binary.
//!
//! `posix_spawn` (glibc: `clone(CLONE_VM | CLONE_VFORK)`), never `fork`: copying the page tables
//! of a 2 GiB process took 40 ms here, posix_spawn 0.2 ms. No `pre_exec` either, since that
//! forces std into a real fork. What the child needs is set through spawn attributes:
//! - the signal mask is emptied (this process blocks SIGHUP/SIGTERM/SIGINT for its signalfd and
//!   exec keeps the mask), and those signals get their default disposition;
//! - the child's end of the handoff socketpair is dup2'ed to fd 3, the one fd without
//!   `FD_CLOEXEC`; every other fd this crate makes is close-on-exec.
#![allow(unsafe_code)]

use std::ffi::{CString, OsString};
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::spawn::{PosixSpawnAttr, PosixSpawnFileActions, PosixSpawnFlags};
use nix::sys::signal::SigSet;
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};

use crate::handoff::{CHILD_FD, ENV_FD, ENV_UPGRADE_ID};
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

/// Starts `exe` with `args` (argv[0] included) and the handoff socket at fd 3.
pub(crate) fn spawn(
    exe: &Path,
    args: &[OsString],
    upgrade: UpgradeId,
    handled_signals: &SigSet,
) -> io::Result<Spawned> {
    let (channel, child_end) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )?;
    // dup2(fd, fd) would leave FD_CLOEXEC set, so make sure the source is not fd 3 (nor stdio,
    // in case this process runs with 0-2 closed).
    let child_end = sys::dup_cloexec_at_least(child_end.as_fd(), 10)?;

    let mut actions = PosixSpawnFileActions::init()?;
    actions.add_dup2(child_end.as_raw_fd(), CHILD_FD)?;
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
    for (key, value) in std::env::vars_os() {
        // Our own variables are set below; socket activation's are for the first boot only.
        if key.as_bytes().starts_with(b"RINGFLIP_")
            || crate::systemd::LISTEN_VARS.iter().any(|v| key == *v)
        {
            continue;
        }
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
    let pid = nix::spawn::posix_spawn(exe, &actions, &attr, &argv, &envp)?;
    let pid = pid.as_raw() as u32;
    // The child is not reaped until we reap it, so its pid cannot be reused before this.
    let pidfd = match sys::pidfd_open(pid) {
        Ok(fd) => fd,
        Err(e) => {
            let _ = sys::kill(pid, libc::SIGKILL);
            // SAFETY: reaping the child we just started, blocking only until SIGKILL lands.
            unsafe { libc::waitpid(pid as libc::pid_t, std::ptr::null_mut(), 0) };
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

fn cstring(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "argument or environment variable contains a NUL byte",
        )
    })
}
