//! The successor's side of the handoff: find and validate the inherited channel, agree on a
//! protocol version (OFFER, then ACCEPT or REFUSE), receive HELLO and every fd (all of them
//! before anything is adopted). The state that follows is read by [`state`].
#![allow(unsafe_code)]

pub(crate) mod state;

use std::io::IoSliceMut;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, UnixAddr};

use crate::error::Error;
use crate::handoff::{
    ListenerRecord, Message, SocketKind, ENV_FD, ENV_UPGRADE_ID, MAX_FDS_PER_MESSAGE,
    MAX_MESSAGE_LEN, MAX_STATE_LEN,
};
use crate::machine::UpgradeId;
use crate::protocol::{self, ProtocolVersions};
use crate::sys;

pub use state::StateReader;
use state::StateStream;

/// The link to the previous generation, as the successor holds it.
#[derive(Debug)]
pub(crate) struct PredecessorLink {
    pub channel: OwnedFd,
    pub upgrade: UpgradeId,
    pub predecessor_pid: u32,
}

/// What the parent handed over.
#[derive(Debug)]
pub(crate) struct Inherited {
    pub link: PredecessorLink,
    /// This process's generation (the parent's plus one).
    pub generation: u32,
    pub listeners: Vec<(ListenerRecord, OwnedFd)>,
    /// Pidfds of the older generations still alive (the parent first).
    pub elders: Vec<OwnedFd>,
    /// The application's state: read whole when it is at most `MAX_STATE_LEN` bytes, else
    /// still on the channel, read by the application.
    pub state: StateStream,
    /// The protocol version agreed with the parent.
    pub version: u8,
}

/// How long a successor waits for any message of the handoff before giving up (the parent
/// sends OFFER right after spawning and the rest without pause, so this only guards against a
/// parent that is stuck).
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// `Ok(None)` when this process was not started by ringflip as a successor.
pub(crate) fn from_environment() -> Result<Option<Inherited>, Error> {
    // Every process settles its versions at start, before it could spawn a child.
    let ours = protocol::this_process();
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
    // Kept until the state is read (`StateStream::finish`): the parent sends without pause,
    // so a wait this long means it is stuck.
    sys::set_recv_timeout(channel.as_fd(), HELLO_TIMEOUT)
        .map_err(|e| Error::Handoff(e.to_string()))?;
    let mut buf = vec![0u8; MAX_MESSAGE_LEN];
    let (version, message, fds) = negotiate(channel.as_fd(), &mut buf, ours)?;
    let Message::Hello {
        version: _, // checked by `negotiate`
        upgrade: hello_upgrade,
        predecessor_pid,
        generation,
        fds: fd_count,
        state_len,
        records: first_records,
        state: first_chunk,
        extensions: _, // none known yet: skipped
    } = message
    else {
        return Err(Error::Handoff(format!("expected HELLO, got {message}")));
    };
    if fds.len() != first_records.len() || fds.len() > fd_count as usize {
        return Err(Error::Handoff(format!(
            "HELLO describes {} of {fd_count} fds and carried {}",
            first_records.len(),
            fds.len()
        )));
    }
    if hello_upgrade != upgrade {
        return Err(Error::Handoff(format!(
            "HELLO is for upgrade {hello_upgrade}, this process was started for {upgrade}"
        )));
    }
    if predecessor_pid != parent {
        return Err(Error::Handoff(format!(
            "HELLO comes from pid {predecessor_pid}, but the parent is {parent}"
        )));
    }
    make_room_for(fd_count as usize)?;
    // All or nothing: every fd is owned here until all have arrived; an error drops (closes)
    // them, and nothing was adopted.
    let mut records = Vec::with_capacity(fd_count as usize);
    let mut owned = Vec::with_capacity(fd_count as usize);
    records.extend(first_records);
    owned.extend(fds);
    while owned.len() < fd_count as usize {
        let (message, fds) = receive(channel.as_fd(), &mut buf, "the handed-over fds")?;
        let Message::Fds {
            version: v,
            records: batch,
        } = message
        else {
            return Err(Error::Handoff(format!(
                "expected fds ({} of {fd_count} received), got {message}",
                owned.len()
            )));
        };
        if v != version
            || batch.is_empty()
            || fds.len() != batch.len()
            || owned.len() + fds.len() > fd_count as usize
        {
            return Err(Error::Handoff(format!(
                "an fd message (version {v}) describes {} fds and carried {}, with {} of \
                 {fd_count} received",
                batch.len(),
                fds.len(),
                owned.len()
            )));
        }
        records.extend(batch);
        owned.extend(fds);
    }
    let mut listeners = Vec::new();
    let mut elders = Vec::new();
    for (record, fd) in records.into_iter().zip(owned) {
        if record.kind == SocketKind::Elder {
            if let Err(e) = sys::pidfd_signal(fd.as_fd(), 0) {
                return Err(Error::Handoff(format!("an elder fd is not a pidfd: {e}")));
            }
            elders.push(fd);
        } else {
            listeners.push((record, fd));
        }
    }
    let mut state = StateStream::new(version, state_len, first_chunk)
        .map_err(|e| Error::Handoff(e.to_string()))?;
    if state_len <= MAX_STATE_LEN as u64 {
        state.read_whole(channel.as_fd())?;
    }
    tracing::debug!(
        protocol.version = version,
        fds = fd_count,
        state_len,
        "handoff received"
    );
    Ok(Some(Inherited {
        link: PredecessorLink {
            channel,
            upgrade,
            predecessor_pid,
        },
        generation,
        listeners,
        elders,
        state,
        version,
    }))
}

/// OFFER in, ACCEPT (or REFUSE) out: the version both speak, the highest; then the HELLO of
/// that version, with its fds. The OFFER carries the parent's HELLO in its newest version:
/// taken when that is the version agreed; else dropped, with every message of another
/// version after it (their fds closed), until the parent's HELLO in the version agreed.
fn negotiate(
    channel: BorrowedFd<'_>,
    buf: &mut [u8],
    ours: ProtocolVersions,
) -> Result<(u8, Message, Vec<OwnedFd>), Error> {
    let (message, fds) = receive(channel, buf, "HELLO (its OFFER)")?;
    let Message::Offer {
        versions: theirs,
        hello,
    } = message
    else {
        return Err(Error::Handoff(format!(
            "expected the parent's OFFER, got {message}"
        )));
    };
    let answer = match ours.highest_common(theirs) {
        Some(v) => Message::Accept(v),
        None => Message::Refuse(ours),
    };
    let bytes = answer.encode().map_err(|e| Error::Handoff(e.to_string()))?;
    if let Message::Refuse(_) = answer {
        let e = Error::IncompatibleProtocol { ours, theirs };
        // Logged before the answer: the parent, told by REFUSE, may SIGKILL this process (it
        // holds nothing of the service's) before the application could log the error.
        tracing::error!(error = %e, "refusing the handoff");
    }
    // The channel is empty in this direction: a short message fits its buffer at once.
    sys::send_nonblocking(channel, &bytes)
        .map_err(|e| Error::Handoff(format!("answering OFFER: {e}")))?;
    let Message::Accept(version) = answer else {
        return Err(Error::IncompatibleProtocol { ours, theirs });
    };
    if version == theirs.max && !hello.is_empty() {
        let message = Message::decode(&hello).map_err(|e| Error::Handoff(format!("HELLO: {e}")))?;
        if message.version() != version {
            return Err(Error::Handoff(format!(
                "the OFFER of {theirs} carried a HELLO in version {}",
                message.version()
            )));
        }
        return Ok((version, message, fds));
    }
    drop(fds);
    loop {
        let (len, fds) = receive_bytes(channel, buf, "HELLO")?;
        // Magic, then the version byte: fixed in every version.
        if len < 6 || buf[4] != version {
            continue; // sent before the parent read our ACCEPT: `fds` are closed here
        }
        let message =
            Message::decode(&buf[..len]).map_err(|e| Error::Handoff(format!("HELLO: {e}")))?;
        return Ok((version, message, fds));
    }
}

/// Makes sure this process may hold `count` more fds: raises the soft `RLIMIT_NOFILE` up to
/// the hard one if needed (the parent's limits are inherited, and it held them all). Fds
/// received over the limit would be lost: the kernel's `scm_detach_fds` stops at the first
/// `EMFILE` and sets `MSG_CTRUNC`.
fn make_room_for(count: usize) -> Result<(), Error> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    // What the receive itself needs: the fds take the lowest free numbers, each below the
    // limit (`alloc_fd` refuses a number at or above `RLIMIT_NOFILE`). What the process opens
    // next (its ring, its eventfds) is its own business, as in any process. (`read_dir`'s own
    // fd is counted: one to spare.)
    let open = std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0);
    let need = (open + count) as u64;
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)
        .map_err(|e| Error::Handoff(format!("getrlimit: {e}")))?;
    if need <= soft {
        return Ok(());
    }
    if need <= hard && setrlimit(Resource::RLIMIT_NOFILE, need, hard).is_ok() {
        return Ok(());
    }
    Err(Error::Handoff(format!(
        "the previous process hands over {count} fds; with {open} open, this process may \
         hold {soft} (RLIMIT_NOFILE, hard limit {hard})"
    )))
}

/// The parent closed the channel before `what`: [`Error::Abandoned`] when this process was
/// also told to stop (the parent gives a successor up with SIGTERM, then closes the channel;
/// the signal is blocked here, so it is pending), else a broken handoff. A close with our
/// ACCEPT unread on the parent's side reads as `ECONNRESET`, a plain close as EOF.
fn parent_gone(what: &str) -> Error {
    if sys::stop_signal_pending() {
        return Error::Abandoned;
    }
    Error::Handoff(format!("the parent closed the channel before {what}"))
}

/// Receives one message and its fds (`what` names it in errors), decoded.
fn receive(
    channel: BorrowedFd<'_>,
    buf: &mut [u8],
    what: &str,
) -> Result<(Message, Vec<OwnedFd>), Error> {
    let (len, fds) = receive_bytes(channel, buf, what)?;
    let message =
        Message::decode(&buf[..len]).map_err(|e| Error::Handoff(format!("{what}: {e}")))?;
    Ok((message, fds))
}

/// Receives one message into `buf` and its fds: its length and the fds. Every received fd is
/// owned at once, so any error closes it.
fn receive_bytes(
    channel: BorrowedFd<'_>,
    buf: &mut [u8],
    what: &str,
) -> Result<(usize, Vec<OwnedFd>), Error> {
    let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS_PER_MESSAGE]);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = loop {
        // A signal handled in this process (the forwarding handler `build` installs) ends a
        // blocking recvmsg with EINTR before anything is received: try again.
        match recvmsg::<UnixAddr>(
            channel.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Err(nix::errno::Errno::EINTR) => continue,
            Err(nix::errno::Errno::ECONNRESET) => return Err(parent_gone(what)),
            // SO_RCVTIMEO (HELLO_TIMEOUT, set before the first receive) ran out.
            Err(nix::errno::Errno::EAGAIN) => {
                return Err(Error::Handoff(format!(
                    "the parent sent nothing for {HELLO_TIMEOUT:?} while this process waited \
                     for {what}: it is stuck"
                )))
            }
            other => break other,
        }
    }
    .map_err(|e| Error::Handoff(format!("receiving {what}: {e}")))?;
    let mut fds = Vec::new();
    // nix refuses to iterate a truncated control buffer; the fds that did arrive then stay
    // unowned, and this process exits on the error anyway.
    let cmsgs = msg.cmsgs().map_err(|_| {
        Error::Handoff(format!(
            "{what}: fds did not fit (MSG_CTRUNC); the kernel dropped some"
        ))
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
        return Err(Error::Handoff(format!(
            "{what}: fds did not fit (MSG_CTRUNC); the kernel dropped some"
        )));
    }
    if msg.flags.contains(MsgFlags::MSG_TRUNC) {
        return Err(Error::Handoff(format!("{what} was truncated")));
    }
    let len = msg.bytes;
    if len == 0 {
        return Err(parent_gone(what));
    }
    Ok((len, fds))
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use super::*;

    /// A parent that sends nothing: the error says so (it read "EAGAIN: Try again").
    #[test]
    fn a_parent_that_sends_nothing_is_said_to_be_stuck() {
        let (child, _parent) = nix::sys::socket::socketpair(
            nix::sys::socket::AddressFamily::Unix,
            nix::sys::socket::SockType::SeqPacket,
            None,
            nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        )
        .unwrap();
        sys::set_recv_timeout(child.as_fd(), Duration::from_millis(20)).unwrap();
        let mut buf = vec![0u8; 64];
        let err = receive_bytes(child.as_fd(), &mut buf, "the handed-over fds").unwrap_err();
        assert!(
            err.to_string().contains(
                "the parent sent nothing for 10s while this process waited for the handed-over fds"
            ),
            "{err}"
        );
    }

    /// An unexpected message is named by its kind and counts, not dumped.
    #[test]
    fn an_unexpected_message_is_named_not_dumped() {
        let state = Message::State {
            version: 1,
            chunk: vec![7; 65536],
        };
        assert_eq!(state.to_string(), "STATE (version 1, 65536 bytes)");
    }
}
