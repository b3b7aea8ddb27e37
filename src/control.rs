//! The control socket: a Unix stream socket (mode 0600, handed over across upgrades like any
//! listener) where a deploy script or `systemctl reload` asks for an upgrade and learns whether
//! it worked.
//!
//! Protocol: one line in, one line out, then the server closes.
//! - `upgrade` → `ok <new pid>` once the new process is READY, or `failed: <reason>` /
//!   `busy: <reason>` (this process keeps serving);
//! - `status` → `phase=<Phase> pid=<pid> generation=<n> live=<connections>`;
//! - anything else → `error: unknown command`.
//!
//! Peers are checked with `SO_PEERCRED`: only the service's own uid is served, anyone else gets
//! `refused: …` (after its line is read, like everyone's). Each connection is served on a short-lived thread of its own: an upgrade answer
//! waits for READY, which must not block the ring.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering::SeqCst;
use std::time::Duration;

use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};

use crate::server::{DrainGuard, Handle};
use crate::UpgradeError;

/// The listener name the control socket is registered under.
pub(crate) const CONTROL_LISTENER: &str = "ringflip.control";

/// A command line longer than this is refused.
const MAX_LINE: u64 = 256;

/// Serves one control connection on its own thread. The guard keeps a draining process alive
/// until the answer is written.
pub(crate) fn serve(fd: OwnedFd, handle: Handle, guard: DrainGuard) {
    let spawned = std::thread::Builder::new()
        .name("ringflip-control".into())
        .spawn(move || {
            let stream = UnixStream::from(fd);
            if let Err(e) = answer(stream, &handle) {
                tracing::debug!(error = %e, "control connection ended early");
            }
            drop(guard);
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start a control thread");
    }
}

fn answer(stream: UnixStream, handle: &Handle) -> std::io::Result<()> {
    let mut out = stream.try_clone()?;
    let cred = getsockopt(&stream.as_fd(), PeerCredentials)?;
    // The line is read before the peer is judged, a refused one's too: a reply written and the
    // socket closed before the peer has written its line fails that write (EPIPE), and a
    // client that gives up on it never reads the refusal (seen: `echo ctl` printed nothing, 14
    // times in 60 beside two CPU hogs). Nothing a refused peer sends is acted on.
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut line = String::new();
    BufReader::new(Read::take(&stream, MAX_LINE)).read_line(&mut line)?;
    let own = crate::sys::euid();
    if cred.uid() != own {
        tracing::warn!(
            peer.uid = cred.uid(),
            peer.pid = cred.pid(),
            "control peer refused"
        );
        return writeln!(
            out,
            "refused: uid {} is not the service's uid {own}",
            cred.uid()
        );
    }
    let reply = match line.trim() {
        "upgrade" => {
            tracing::info!(
                peer.pid = cred.pid(),
                "upgrade requested on the control socket"
            );
            match handle.upgrade() {
                Ok(pid) => format!("ok {pid}"),
                Err(UpgradeError::Busy(why)) => format!("busy: {why}"),
                Err(UpgradeError::Failed(why)) => format!("failed: {why}"),
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
