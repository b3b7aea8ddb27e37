//! One client connection to the echo server: connect, send a line, read it back, and classify
//! every failure by kind.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

/// A loopback address with a port that was free a moment ago (bind :0, read, drop).
pub fn free_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().unwrap()
}

/// How a client exchange failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FailKind {
    /// Connection refused.
    Refused,
    /// Reset / broken pipe / aborted.
    Reset,
    /// The server closed before the whole reply arrived.
    EofBeforeReply,
    /// Connect, write or read timed out.
    Timeout,
    /// The reply was not the line sent.
    WrongReply,
    /// Anything else (e.g. EADDRNOTAVAIL).
    Other,
}

pub(crate) const KINDS: [FailKind; 6] = [
    FailKind::Refused,
    FailKind::Reset,
    FailKind::EofBeforeReply,
    FailKind::Timeout,
    FailKind::WrongReply,
    FailKind::Other,
];

pub(crate) fn kind_index(k: FailKind) -> usize {
    KINDS.iter().position(|&x| x == k).unwrap()
}

/// Maps an io error to a failure kind.
pub fn classify(e: &io::Error) -> FailKind {
    use io::ErrorKind::*;
    match e.kind() {
        ConnectionRefused => FailKind::Refused,
        ConnectionReset | ConnectionAborted | BrokenPipe => FailKind::Reset,
        TimedOut | WouldBlock => FailKind::Timeout,
        UnexpectedEof => FailKind::EofBeforeReply,
        _ => FailKind::Other,
    }
}

/// A failed exchange: kind and message.
pub type Failure = (FailKind, String);

/// Connects (bounded), then does one [`exchange`].
pub fn connect(
    addr: SocketAddr,
    connect_timeout: Duration,
    io_timeout: Duration,
) -> Result<TcpStream, Failure> {
    let s = TcpStream::connect_timeout(&addr, connect_timeout)
        .map_err(|e| (classify(&e), format!("connect: {e}")))?;
    s.set_read_timeout(Some(io_timeout))
        .map_err(|e| (FailKind::Other, format!("set_read_timeout: {e}")))?;
    s.set_write_timeout(Some(io_timeout))
        .map_err(|e| (FailKind::Other, format!("set_write_timeout: {e}")))?;
    s.set_nodelay(true).ok();
    Ok(s)
}

/// Writes `line` (which ends in `\n`) and reads until the echoed line is back; checks it.
pub fn exchange(s: &mut TcpStream, line: &str) -> Result<(), Failure> {
    send_line(s, line)?;
    recv_line(s, line)
}

/// Writes `line` whole.
pub fn send_line(s: &mut TcpStream, line: &str) -> Result<(), Failure> {
    s.write_all(line.as_bytes())
        .map_err(|e| (classify(&e), format!("write {line:?}: {e}")))
}

/// Reads one reply line and checks it is exactly `line` (nothing more, nothing less).
pub fn recv_line(s: &mut TcpStream, line: &str) -> Result<(), Failure> {
    let want = line.as_bytes();
    let mut got: Vec<u8> = Vec::with_capacity(want.len());
    let mut buf = [0u8; 512];
    while got.len() < want.len() && !got.contains(&b'\n') {
        match s.read(&mut buf) {
            Ok(0) => {
                return Err((
                    FailKind::EofBeforeReply,
                    format!(
                        "EOF after {} of {} reply bytes for {line:?}",
                        got.len(),
                        want.len()
                    ),
                ))
            }
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Err((
                    classify(&e),
                    format!("read reply to {line:?} (got {} bytes): {e}", got.len()),
                ))
            }
        }
    }
    if got != want {
        return Err((
            FailKind::WrongReply,
            format!("sent {line:?}, got {:?}", String::from_utf8_lossy(&got)),
        ));
    }
    Ok(())
}

/// Connect + one line + close.
pub fn echo_once(
    addr: SocketAddr,
    line: &str,
    connect_timeout: Duration,
    io_timeout: Duration,
) -> Result<(), Failure> {
    let mut s = connect(addr, connect_timeout, io_timeout)?;
    exchange(&mut s, line)
}
