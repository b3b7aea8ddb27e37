//! The control socket: a Unix stream socket (mode 0600, handed over across upgrades like any
//! listener) where a deploy script or `systemctl reload` asks for an upgrade and learns whether
//! it worked.
//!
//! Protocol: one line in, one line out, then the server closes.
//! - `upgrade` → `ok <new pid>` once the new process is READY, or `failed: <code>: <reason>`
//!   / `busy: <code>: <reason>` (this process keeps serving; the codes are
//!   `UpgradeFailure::code` and `Refusal::code`);
//! - `status` → `phase=<Phase> pid=<pid> generation=<n> live=<connections>`;
//! - anything else → `error: unknown command`.
//!
//! Peers are checked with `SO_PEERCRED` (and `SO_PEERGROUPS`): the service's own uid, root and
//! the uids and gids the application allows are served (`access.rs`), anyone else gets
//! `refused: …` (after what it sent is read, so the answer always reaches it). Each connection
//! is served on a short-lived thread of its own: an upgrade answer waits for READY, which must
//! not block the ring. At most [`MAX_SERVING`] at once: any peer that can connect (the
//! refusal is a thread too) could otherwise start threads without bound, each waiting up to
//! 10 s for its line; one more is answered `busy: control-busy: …` on the ring and closed.

use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering::SeqCst;
use std::time::{Duration, Instant};

use nix::sys::socket::{getsockopt, recv, send, sockopt::PeerCredentials, MsgFlags};

use crate::access::{ControlAccess, Peer};
use crate::connection::DrainGuard;
use crate::error::UpgradeError;
use crate::handle::Handle;

/// The listener name the control socket is registered under.
pub(crate) const CONTROL_LISTENER: &str = "ringflip.control";

/// A command line longer than this is refused.
const MAX_LINE: usize = 256;

/// Control connections served at once, in this process (see the module docs).
pub(crate) const MAX_SERVING: usize = 16;

/// Control connections being served now, in this process.
static SERVING: AtomicUsize = AtomicUsize::new(0);

/// One of the [`MAX_SERVING`] places, given back when dropped (also by a thread that could not
/// be started).
struct Place;

impl Place {
    fn take() -> Option<Place> {
        SERVING
            .fetch_update(SeqCst, SeqCst, |n| (n < MAX_SERVING).then_some(n + 1))
            .ok()
            .map(|_| Place)
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        SERVING.fetch_sub(1, SeqCst);
    }
}

/// Reads one request line, up to [`MAX_LINE`] bytes, within `limit` overall however the peer
/// trickles it: what came by then, by EOF or by an error, without its newline.
fn read_line_within(mut stream: &UnixStream, limit: Duration) -> String {
    let deadline = Instant::now() + limit;
    let mut line = Vec::new();
    let mut buf = [0u8; MAX_LINE];
    while line.len() < MAX_LINE && !line.contains(&b'\n') {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            break;
        }
        match stream.read(&mut buf[..MAX_LINE - line.len()]) {
            Ok(0) | Err(_) => break,
            Ok(n) => line.extend_from_slice(&buf[..n]),
        }
    }
    let end = line.iter().position(|&b| b == b'\n').unwrap_or(line.len());
    String::from_utf8_lossy(&line[..end]).into_owned()
}

/// Serves one control connection on its own thread. The guard keeps a draining process alive
/// until the answer is written.
pub(crate) fn serve(fd: OwnedFd, handle: Handle, guard: DrainGuard) {
    let Some(place) = Place::take() else {
        return turn_away(fd);
    };
    let spawned = std::thread::Builder::new()
        .name("ringflip-control".into())
        .spawn(move || {
            let stream = UnixStream::from(fd);
            if let Err(e) = answer(stream, &handle) {
                tracing::debug!(error = %e, "control connection ended early");
            }
            drop(guard);
            drop(place);
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start a control thread");
    }
}

/// Answers a connection beyond [`MAX_SERVING`] without waiting, on the ring's thread: what the
/// peer already sent is taken in first (closing a Unix socket with unread data resets the
/// peer, which may then not read the answer), the answer fits an empty socket buffer.
fn turn_away(fd: OwnedFd) {
    // Logged at the 1st, 2nd, 4th, 8th… time: a flood of connections is no flood of logs.
    static TURNED_AWAY: AtomicUsize = AtomicUsize::new(0);
    let n = TURNED_AWAY.fetch_add(1, SeqCst) + 1;
    if n.is_power_of_two() {
        tracing::warn!(
            max = MAX_SERVING,
            turned_away = n,
            "control connection turned away: as many are being served already"
        );
    }
    let mut sent = [0u8; MAX_LINE];
    let _ = recv(fd.as_raw_fd(), &mut sent, MsgFlags::MSG_DONTWAIT);
    let reply =
        format!("busy: control-busy: {MAX_SERVING} control connections are being served already\n");
    let _ = send(
        fd.as_raw_fd(),
        reply.as_bytes(),
        MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
    );
}

fn answer(stream: UnixStream, handle: &Handle) -> std::io::Result<()> {
    let mut out = stream.try_clone()?;
    let cred = getsockopt(&stream.as_fd(), PeerCredentials)?;
    let own = crate::sys::euid();
    let access = &handle.shared().control_access;
    let peer = Peer {
        uid: cred.uid(),
        gid: cred.gid(),
    };
    let admitted = access.admits(own, &peer, || {
        crate::sys::peer_groups(stream.as_fd()).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "SO_PEERGROUPS of a control peer");
            Vec::new()
        })
    });
    if !admitted {
        tracing::warn!(
            peer.uid = cred.uid(),
            peer.gid = cred.gid(),
            peer.pid = cred.pid(),
            "control peer refused"
        );
        // Take in its line (at most 1 s, never acted on) before answering: a reply written and
        // the socket closed before the peer has written its line fails that write (EPIPE), and
        // a client that gives up on it never reads the refusal (seen: `echo ctl` printed
        // nothing, 14 times in 60 beside two CPU hogs).
        let _ = read_line_within(&stream, Duration::from_secs(1));
        if *access == ControlAccess::default() {
            return writeln!(
                out,
                "refused: uid {} is not the service's uid {own}",
                cred.uid()
            );
        }
        return writeln!(
            out,
            "refused: uid {} (gid {}) is not the service's uid {own}, root, nor an allowed \
             uid or gid",
            cred.uid(),
            cred.gid()
        );
    }
    let line = read_line_within(&stream, Duration::from_secs(10));
    let reply = match line.trim() {
        "upgrade" => {
            tracing::info!(
                peer.pid = cred.pid(),
                "upgrade requested on the control socket"
            );
            match handle.upgrade() {
                Ok(pid) => format!("ok {pid}"),
                Err(UpgradeError::Busy(why)) => format!("busy: {}: {why}", why.code()),
                Err(UpgradeError::Failed(why)) => format!("failed: {}: {why}", why.code()),
                Err(e) => format!("failed: {e}"),
            }
        }
        "status" => {
            let shared = handle.shared();
            format!(
                "phase={} pid={} generation={} live={}",
                handle.phase(),
                std::process::id(),
                shared.generation,
                // Not counting this control connection itself.
                shared.live.load(SeqCst).saturating_sub(1)
            )
        }
        _ => "error: unknown command".to_string(),
    };
    writeln!(out, "{reply}")
}
