//! The client side of the control socket ([`Builder::control_socket`](crate::Builder::control_socket)):
//! what the `ringflip-ctl` binary (and the echo example's `echo ctl`) use to ask a running
//! service for an upgrade or its status, with one bound on the whole exchange, and an exit
//! status that tells a deploy script or `systemctl reload` what happened.
//!
//! ```no_run
//! use std::time::Duration;
//! use ringflip::control_client::{request, Command, Reply};
//!
//! match request("/run/app/control.sock".as_ref(), Command::Upgrade, Duration::from_secs(120)) {
//!     Ok(Reply::Upgraded(pid)) => println!("now served by {pid}"),
//!     Ok(other) => eprintln!("{other}"),
//!     Err(e) => eprintln!("could not ask: {e}"),
//! }
//! ```
//!
//! Exit statuses ([`exit_code`]): [`EXIT_OK`] (0) the upgrade succeeded or the status was read;
//! [`EXIT_FAILED`] (1) the upgrade was tried and failed, the old process still serves;
//! [`EXIT_REFUSED`] (2) nothing was tried: busy (an upgrade in flight, too many generations
//! draining, shutting down) or this peer is not allowed; [`EXIT_NO_ANSWER`] (3) the service
//! could not be asked: nothing listens at the socket, no permission to connect, no answer
//! within the timeout, or an answer that is not one of the above. After a timeout the upgrade
//! may still be under way (or may still succeed): ask `status`. [`EXIT_USAGE`] (64) bad
//! arguments.

use std::fmt;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The upgrade succeeded (the new pid is printed), or the status line was read.
pub const EXIT_OK: u8 = 0;
/// The upgrade was tried and failed; the old process still serves.
pub const EXIT_FAILED: u8 = 1;
/// The request was refused and nothing was started: busy, or this peer is not allowed.
pub const EXIT_REFUSED: u8 = 2;
/// The service could not be asked: no server, no permission, timeout, or an unexpected answer.
pub const EXIT_NO_ANSWER: u8 = 3;
/// Bad command-line arguments (`EX_USAGE`).
pub const EXIT_USAGE: u8 = 64;

/// The default bound on a whole exchange. An upgrade is answered once the new process is READY
/// or the upgrade failed, which the server bounds itself (its ready timeout, 30 s by default,
/// plus spawning and the handoff); this bound is only a backstop against a server that never
/// answers, and must stay above the server's ready timeout, or a slow but good upgrade would be
/// reported as unanswered.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);

/// Longest answer line read.
const MAX_ANSWER: usize = 4096;

/// A control command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    /// `upgrade`: start the new binary and answer once it is READY or the upgrade failed.
    Upgrade,
    /// `status`: phase, pid, generation and live connections.
    Status,
}

impl Command {
    /// The command's word on the wire.
    pub fn word(self) -> &'static str {
        match self {
            Command::Upgrade => "upgrade",
            Command::Status => "status",
        }
    }

    /// Parses `upgrade` or `status`.
    pub fn parse(word: &str) -> Option<Command> {
        match word {
            "upgrade" => Some(Command::Upgrade),
            "status" => Some(Command::Status),
            _ => None,
        }
    }
}

/// What the service answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// `ok <pid>`: the new process is READY and serves.
    Upgraded(u32),
    /// `failed: <code>: <reason>` (the text after `failed: `): the old process still serves.
    Failed(String),
    /// `busy: <code>: <reason>` (the text after `busy: `): nothing was started.
    Busy(String),
    /// `refused: <why>`: this peer is not allowed to use the control socket.
    Refused(String),
    /// The status line, `phase=… pid=… generation=… live=…`.
    Status(String),
}

impl Reply {
    fn parse(line: &str) -> Option<Reply> {
        if let Some(pid) = line.strip_prefix("ok ") {
            return pid.parse().ok().map(Reply::Upgraded);
        }
        if let Some(why) = line.strip_prefix("failed: ") {
            return Some(Reply::Failed(why.to_string()));
        }
        if let Some(why) = line.strip_prefix("busy: ") {
            return Some(Reply::Busy(why.to_string()));
        }
        if let Some(why) = line.strip_prefix("refused: ") {
            return Some(Reply::Refused(why.to_string()));
        }
        if line.starts_with("phase=") {
            return Some(Reply::Status(line.to_string()));
        }
        None
    }
}

impl fmt::Display for Reply {
    /// The answer line as the server sent it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reply::Upgraded(pid) => write!(f, "ok {pid}"),
            Reply::Failed(why) => write!(f, "failed: {why}"),
            Reply::Busy(why) => write!(f, "busy: {why}"),
            Reply::Refused(why) => write!(f, "refused: {why}"),
            Reply::Status(line) => f.write_str(line),
        }
    }
}

/// Why the service could not be asked.
#[derive(Debug)]
#[non_exhaustive]
pub enum AskError {
    /// Connecting failed (nothing listens, no such file, permission denied).
    Connect(io::Error),
    /// No complete answer within the timeout.
    Timeout(Duration),
    /// Writing the request or reading the answer failed.
    Io(io::Error),
    /// The answer is not one this client knows (or the server closed without one).
    BadAnswer(String),
}

impl fmt::Display for AskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AskError::Connect(e) => write!(f, "cannot connect: {e}"),
            AskError::Timeout(t) => write!(
                f,
                "no answer within {} s (an upgrade may still be under way: ask `status`)",
                t.as_secs_f64()
            ),
            AskError::Io(e) => write!(f, "{e}"),
            AskError::BadAnswer(a) if a.is_empty() => f.write_str("closed without an answer"),
            AskError::BadAnswer(a) => write!(f, "unexpected answer {a:?}"),
        }
    }
}

impl std::error::Error for AskError {}

/// The longest wait `request` honours: `Instant + Duration::MAX` would panic.
const LONGEST_WAIT: Duration = Duration::from_secs(365 * 24 * 3600);

/// Sends `command` to the control socket at `socket` and reads the answer, all within `timeout`.
///
/// The connect runs on a helper thread so that it is bounded too (a Unix connect blocks while
/// the listener's backlog is full); if it never returns, that thread is left behind. A
/// timeout longer than a year (`Duration::MAX` for "none") waits a year.
pub fn request(socket: &Path, command: Command, timeout: Duration) -> Result<Reply, AskError> {
    let timeout = timeout.min(LONGEST_WAIT);
    let deadline = Instant::now() + timeout;
    let left = || deadline.saturating_duration_since(Instant::now());
    let (tx, rx) = mpsc::channel();
    let path: PathBuf = socket.to_path_buf();
    std::thread::Builder::new()
        .name("ringflip-ctl-connect".into())
        .spawn(move || {
            let _ = tx.send(UnixStream::connect(path));
        })
        .map_err(AskError::Io)?;
    let mut stream = match rx.recv_timeout(timeout) {
        Ok(connected) => connected.map_err(AskError::Connect)?,
        Err(_) => return Err(AskError::Timeout(timeout)),
    };
    let timed_out = |e: io::Error| match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => AskError::Timeout(timeout),
        _ => AskError::Io(e),
    };
    // A zero timeout means "none" to set_*_timeout: treat an expired deadline as a timeout.
    let remaining = || match left() {
        t if t.is_zero() => Err(AskError::Timeout(timeout)),
        t => Ok(t),
    };
    stream
        .set_write_timeout(Some(remaining()?))
        .map_err(AskError::Io)?;
    // One write: a line in pieces could meet a server that answered after the first.
    match stream.write_all(format!("{}\n", command.word()).as_bytes()) {
        Ok(()) => {}
        // A server that answers without reading (`busy: control-busy`, when as many control
        // connections are served already) may have closed before the line arrived: its
        // answer is still there to read.
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
            ) => {}
        Err(e) => return Err(timed_out(e)),
    }
    let mut answer = Vec::new();
    let mut buf = [0u8; 512];
    while !answer.contains(&b'\n') && answer.len() < MAX_ANSWER {
        stream
            .set_read_timeout(Some(remaining()?))
            .map_err(AskError::Io)?;
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(timed_out(e)),
        }
    }
    let end = answer.iter().position(|&b| b == b'\n');
    let line = String::from_utf8_lossy(&answer[..end.unwrap_or(answer.len())]).into_owned();
    let reply = end.and_then(|_| Reply::parse(&line));
    match (command, reply) {
        (Command::Upgrade, Some(r)) if !matches!(r, Reply::Status(_)) => Ok(r),
        (Command::Status, Some(r @ (Reply::Status(_) | Reply::Refused(_) | Reply::Busy(_)))) => {
            Ok(r)
        }
        _ => Err(AskError::BadAnswer(line)),
    }
}

/// The exit status for an outcome of [`request`]: see the module documentation.
pub fn exit_code(outcome: &Result<Reply, AskError>) -> u8 {
    match outcome {
        Ok(Reply::Upgraded(_) | Reply::Status(_)) => EXIT_OK,
        Ok(Reply::Failed(_)) => EXIT_FAILED,
        Ok(Reply::Busy(_) | Reply::Refused(_)) => EXIT_REFUSED,
        Err(_) => EXIT_NO_ANSWER,
    }
}

/// [`request`], then reports as the command-line client does: the answer on stdout when it is
/// a success (`ok <pid>`, the status line), `<prog>: <socket>: <answer or error>` on stderr
/// otherwise; returns the exit status of [`exit_code`].
pub fn run(prog: &str, socket: &Path, command: Command, timeout: Duration) -> ExitCode {
    let outcome = request(socket, command, timeout);
    match &outcome {
        Ok(reply @ (Reply::Upgraded(_) | Reply::Status(_))) => println!("{reply}"),
        Ok(reply) => eprintln!("{prog}: {}: {reply}", socket.display()),
        Err(e) => eprintln!("{prog}: {}: {e}", socket.display()),
    }
    ExitCode::from(exit_code(&outcome))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_timeout_is_a_long_one_not_a_panic() {
        // `Instant::now() + Duration::MAX` panicked before the connect was tried.
        let missing = std::path::Path::new("/nonexistent/ringflip-control.sock");
        assert!(matches!(
            request(missing, Command::Status, Duration::MAX),
            Err(AskError::Connect(_))
        ));
    }

    #[test]
    fn answers_parse_to_their_exit_codes() {
        let code =
            |line: &str| exit_code(&Reply::parse(line).ok_or(AskError::BadAnswer(line.into())));
        assert_eq!(code("ok 42"), EXIT_OK);
        assert_eq!(code("phase=Serving pid=1 generation=0 live=0"), EXIT_OK);
        assert_eq!(code("failed: spawn: could not start"), EXIT_FAILED);
        assert_eq!(
            code("busy: in-flight: an upgrade is already in flight"),
            EXIT_REFUSED
        );
        assert_eq!(
            code("refused: uid 1 is not the service's uid 0"),
            EXIT_REFUSED
        );
        assert_eq!(code("ok notapid"), EXIT_NO_ANSWER);
        assert_eq!(code("error: unknown command"), EXIT_NO_ANSWER);
        assert_eq!(code(""), EXIT_NO_ANSWER);
    }
}
