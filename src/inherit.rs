//! The successor's side of the handoff: find and validate the inherited channel, receive HELLO
//! and the listener fds.
#![allow(unsafe_code)]

use std::io::IoSliceMut;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, UnixAddr};

use crate::error::Error;
use crate::handoff::{
    ListenerRecord, Message, ENV_FD, ENV_UPGRADE_ID, MAX_LISTENERS, MAX_MESSAGE_LEN,
};
use crate::machine::UpgradeId;
use crate::sys;

/// The link to the previous generation, as the successor holds it.
#[derive(Debug)]
pub(crate) struct ParentLink {
    pub channel: OwnedFd,
    pub upgrade: UpgradeId,
    pub parent_pid: u32,
}

/// What the parent handed over.
#[derive(Debug)]
pub(crate) struct Inherited {
    pub link: ParentLink,
    /// This process's generation (the parent's plus one).
    pub generation: u32,
    pub listeners: Vec<(ListenerRecord, OwnedFd)>,
    /// Pidfds of the older generations still alive (the parent first).
    pub elders: Vec<OwnedFd>,
    /// The application's state blob.
    pub state: Vec<u8>,
}

/// How long a successor waits for HELLO before giving up (the parent sends it right after
/// spawning, so this only guards against a parent that died in between).
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// `Ok(None)` when this process was not started by ringflip as a successor.
pub(crate) fn from_environment() -> Result<Option<Inherited>, Error> {
    let Some(fd_var) = std::env::var_os(ENV_FD) else {
        return Ok(None);
    };
    let bad_env = |why: String| Error::Handoff(format!("{ENV_FD}: {why}"));
    let fd: RawFd = fd_var
        .to_str()
        .and_then(|s| s.parse().ok())
        .filter(|fd| *fd > 2)
        .ok_or_else(|| bad_env(format!("{fd_var:?} is not an fd number above 2")))?;
    let upgrade = std::env::var(ENV_UPGRADE_ID)
        .ok()
        .and_then(|s| s.parse().ok())
        .map(UpgradeId)
        .ok_or_else(|| Error::Handoff(format!("{ENV_UPGRADE_ID} is missing or not a number")))?;
    // Variables are consumed: a process this one starts must not mistake itself for a successor.
    std::env::remove_var(ENV_FD);
    std::env::remove_var(ENV_UPGRADE_ID);

    // Validate before taking ownership: the variable might name an fd that is something else.
    // SAFETY: borrowed only for the duration of these checks; `fcntl` fails cleanly with
    // EBADF if `fd` is not open.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    if let Err(e) = sys::is_cloexec(borrowed) {
        return Err(bad_env(format!("fd {fd} is not open: {e}")));
    }
    match sys::socket_type(borrowed) {
        Ok(t) if t == libc::SOCK_SEQPACKET => {}
        Ok(t) => {
            return Err(bad_env(format!(
                "fd {fd} is a socket of type {t}, not SEQPACKET"
            )))
        }
        Err(e) => return Err(bad_env(format!("fd {fd} is not a socket: {e}"))),
    }
    if sys::socket_domain(borrowed).ok() != Some(libc::AF_UNIX) {
        return Err(bad_env(format!("fd {fd} is not a Unix socket")));
    }
    // SAFETY: the fd is open, is the socket the parent placed there, and nothing else in this
    // process owns it (it was inherited, and the variables naming it are now removed).
    let channel = unsafe { OwnedFd::from_raw_fd(fd) };
    sys::set_cloexec(channel.as_fd()).map_err(|e| Error::Handoff(format!("FD_CLOEXEC: {e}")))?;

    let parent = sys::parent_pid();
    if parent == 1 {
        return Err(Error::Handoff(
            "started as a successor, but the parent process is already gone".into(),
        ));
    }
    sys::set_recv_timeout(channel.as_fd(), HELLO_TIMEOUT)
        .map_err(|e| Error::Handoff(e.to_string()))?;
    let (message, fds) = receive(channel.as_fd())?;
    sys::set_recv_timeout(channel.as_fd(), Duration::ZERO)
        .map_err(|e| Error::Handoff(e.to_string()))?;

    let Message::Hello {
        upgrade: hello_upgrade,
        parent_pid,
        generation,
        listeners,
        elders,
        state,
    } = message
    else {
        return Err(Error::Handoff(format!("expected HELLO, got {message:?}")));
    };
    if hello_upgrade != upgrade {
        return Err(Error::Handoff(format!(
            "HELLO is for upgrade {hello_upgrade}, this process was started for {upgrade}"
        )));
    }
    if parent_pid != parent {
        return Err(Error::Handoff(format!(
            "HELLO comes from pid {parent_pid}, but the parent is {parent}"
        )));
    }
    if fds.len() != listeners.len() + elders as usize {
        return Err(Error::Handoff(format!(
            "HELLO describes {} listeners and {elders} elder pidfds but carried {} fds",
            listeners.len(),
            fds.len()
        )));
    }
    let mut fds = fds;
    let elders = fds.split_off(listeners.len());
    for fd in &elders {
        if let Err(e) = sys::pidfd_signal(fd.as_fd(), 0) {
            return Err(Error::Handoff(format!("an elder fd is not a pidfd: {e}")));
        }
    }
    Ok(Some(Inherited {
        link: ParentLink {
            channel,
            upgrade,
            parent_pid,
        },
        generation,
        listeners: listeners.into_iter().zip(fds).collect(),
        elders,
        state,
    }))
}

/// Receives one message and its fds. Every received fd is owned at once, so any error closes it.
fn receive(channel: BorrowedFd<'_>) -> Result<(Message, Vec<OwnedFd>), Error> {
    let mut buf = vec![0u8; MAX_MESSAGE_LEN];
    let mut cmsg = nix::cmsg_space!([RawFd; MAX_LISTENERS]);
    let mut iov = [IoSliceMut::new(&mut buf)];
    let msg = recvmsg::<UnixAddr>(
        channel.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(|e| Error::Handoff(format!("receiving HELLO: {e}")))?;
    let mut fds = Vec::new();
    // nix refuses to iterate a truncated control buffer; the fds that did arrive then stay
    // unowned, and this process exits on the error anyway.
    let cmsgs = msg.cmsgs().map_err(|_| {
        Error::Handoff("HELLO's fds did not fit (MSG_CTRUNC); the kernel dropped some".into())
    })?;
    for c in cmsgs {
        if let ControlMessageOwned::ScmRights(raw) = c {
            // SAFETY: SCM_RIGHTS installed these fds in this process just now; nobody else
            // owns them.
            fds.extend(
                raw.into_iter()
                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
            );
        }
    }
    if msg.flags.contains(MsgFlags::MSG_CTRUNC) {
        return Err(Error::Handoff(
            "HELLO's fds did not fit (MSG_CTRUNC); the kernel dropped some".into(),
        ));
    }
    if msg.flags.contains(MsgFlags::MSG_TRUNC) {
        return Err(Error::Handoff("HELLO was truncated".into()));
    }
    let len = msg.bytes;
    if len == 0 {
        return Err(Error::Handoff(
            "the parent closed the channel before HELLO".into(),
        ));
    }
    let message =
        Message::decode(&buf[..len]).map_err(|e| Error::Handoff(format!("HELLO: {e}")))?;
    Ok((message, fds))
}
