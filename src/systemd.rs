//! systemd integration without libsystemd: socket activation (`LISTEN_FDS`) on first boot and
//! `sd_notify`-style status messages over `NOTIFY_SOCKET`.
//!
//! Across an upgrade the serving process sends `RELOADING=1` with `MONOTONIC_USEC`, then, once
//! the new process is READY, `MAINPID=<new pid>` and `READY=1` (so `Type=notify` and
//! `Type=notify-reload` units follow the main process); a failed upgrade ends the reload with
//! `READY=1` and a `STATUS=` line; a shutdown sends `STOPPING=1`.
//!
//! # Why not the `sd-notify` crate
//!
//! Weighed against sd-notify (0.4.5's source; 0.5's docs show the same `notify` signature) in
//! issue 15 §3 and kept by hand, because adopting it would lose properties the crate relies on
//! and save only the few lines that remain here:
//! - `sd_notify::notify(unset_env, states)` takes no target: it reads `NOTIFY_SOCKET` at every
//!   send. Ours sends to the target `Builder::build` captured (`Config::notify_socket`), so
//!   servers in one process (the tests) each have their own, and nothing reads the environment
//!   while another thread may write it; a process-wide variable read at send time was a real
//!   source of flaky tests.
//! - 0.4.5 hands the value to `UnixDatagram::connect` as a file name, so an abstract
//!   `NOTIFY_SOCKET=@name` (containers, `systemd-nspawn`) is not reached; ours sends to the
//!   abstract name.
//! - `NotifyState::Status` writes the text verbatim: a newline in it starts a field of its own.
//!   We would still need `status_text`.
//! - `listen_fds_with_names` yields `RawFd`s: adopting them as `OwnedFd` stays `unsafe` here,
//!   and it checks neither that each fd is a socket nor a sane count, so the validation below
//!   would stay too; it also refuses a `LISTEN_FDNAMES` whose count differs instead of leaving
//!   the extra fds unnamed. It would replace the parsing of two integers and one `fcntl`.
//!
//! The fd checks themselves (`is_cloexec`, `socket_type`, `set_cloexec`) go through `nix` and
//! `socket2` in `sys`; what stays by hand here is the adoption of fds 3.. as systemd's.
#![allow(unsafe_code)]

use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::UnixDatagram;

use crate::error::Error;
use crate::sys;

/// The variables systemd sets for socket activation; a successor must never see them.
pub(crate) const LISTEN_VARS: [&str; 3] = ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"];

/// First fd passed by socket activation (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: RawFd = 3;

/// `NOTIFY_SOCKET`, read once by `Builder::build` (not at each message: the environment is
/// the process's, and reading it while another thread may write it is unsound).
pub(crate) fn notify_target() -> Option<std::ffi::OsString> {
    std::env::var_os("NOTIFY_SOCKET")
}

/// `text` as one `STATUS=` value: a newline in it (a child's error, a path) would start a
/// field of its own in the notification (`MAINPID=…`), so control characters become spaces.
pub(crate) fn status_text(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// Sends one notification to `target` (the service manager's `NOTIFY_SOCKET`), if any;
/// failures are logged, never fatal.
pub(crate) fn notify(target: Option<&std::ffi::OsStr>, message: &str) {
    let Some(target) = target else {
        return;
    };
    let result = UnixDatagram::unbound().and_then(|sock| {
        let bytes = target.as_encoded_bytes();
        if let Some(name) = bytes.strip_prefix(b"@") {
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            sock.send_to_addr(message.as_bytes(), &addr)
        } else {
            sock.send_to(message.as_bytes(), target)
        }
    });
    match result {
        Ok(_) => tracing::debug!(message, "notified systemd"),
        Err(e) => tracing::warn!(error = %e, message, "NOTIFY_SOCKET message failed"),
    }
}

/// `MONOTONIC_USEC` for `RELOADING=1`.
pub(crate) fn monotonic_usec() -> u64 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .expect("CLOCK_MONOTONIC is always there");
    ts.tv_sec() as u64 * 1_000_000 + ts.tv_nsec() as u64 / 1_000
}

/// An fd handed over by socket activation, with its `LISTEN_FDNAMES` name if any.
#[derive(Debug)]
pub(crate) struct ActivatedFd {
    pub name: Option<String>,
    pub fd: OwnedFd,
}

/// Takes the sockets systemd passed (`LISTEN_PID` must be this process), marks them
/// close-on-exec and removes the variables, as `sd_listen_fds(1)` does. Empty when not
/// socket-activated.
pub(crate) fn take_listen_fds() -> Result<Vec<ActivatedFd>, Error> {
    let (Some(pid), Some(count)) = (
        std::env::var_os("LISTEN_PID"),
        std::env::var_os("LISTEN_FDS"),
    ) else {
        return Ok(Vec::new());
    };
    let bad = |why: String| Error::Config(format!("socket activation: {why}"));
    let pid: u32 = pid
        .to_str()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad(format!("LISTEN_PID={pid:?} is not a pid")))?;
    if pid != std::process::id() {
        // Meant for another process (e.g. inherited through a shell): not ours to take.
        return Ok(Vec::new());
    }
    let count: i32 = count
        .to_str()
        .and_then(|s| s.parse().ok())
        .filter(|n| (0..=4096).contains(n))
        .ok_or_else(|| bad(format!("LISTEN_FDS={count:?} is not a count")))?;
    let names: Vec<String> = std::env::var("LISTEN_FDNAMES")
        .map(|s| s.split(':').map(str::to_owned).collect())
        .unwrap_or_default();
    for var in LISTEN_VARS {
        std::env::remove_var(var);
    }
    let mut fds = Vec::with_capacity(count as usize);
    for i in 0..count {
        let raw = LISTEN_FDS_START + i;
        // SAFETY: borrowed only to validate; fcntl fails cleanly on a closed fd.
        let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(raw) };
        sys::is_cloexec(borrowed).map_err(|e| bad(format!("fd {raw} is not open: {e}")))?;
        sys::socket_type(borrowed).map_err(|e| bad(format!("fd {raw} is not a socket: {e}")))?;
        // SAFETY: systemd passed this fd to this process (LISTEN_PID matched) and nothing else
        // owns it; the variables that named it are now gone.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        sys::set_cloexec(borrowed).map_err(|e| bad(format!("FD_CLOEXEC on fd {raw}: {e}")))?;
        let name = names.get(i as usize).filter(|n| !n.is_empty()).cloned();
        fds.push(ActivatedFd { name, fd });
    }
    Ok(fds)
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_status_text_cannot_add_a_field() {
        let text = super::status_text("upgrade failed: new process 7: bad\nMAINPID=1\r\n");
        assert_eq!(text, "upgrade failed: new process 7: bad MAINPID=1  ");
        assert!(!text.contains('\n'));
    }
}
