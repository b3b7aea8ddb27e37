//! A deliberately bad successor, for the fault-injection tests (`tests/faults.rs`).
//!
//! Started by a serving ringflip process as its "new binary" (through a one-line shell script
//! that `exec`s it, so fd 3 and `RINGFLIP_HANDOFF_FD` / `RINGFLIP_UPGRADE_ID` are in place), it
//! speaks the handoff protocol by hand (`docs/PROTOCOL.md`: magic `RFLP`; the preamble OFFER,
//! carrying HELLO=1, answered with ACCEPT of version 1; then the FDS=6 messages; READY=2
//! RETIRING=3, little-endian fields) and misbehaves in the way its first argument names
//! ("receive HELLO" is the whole exchange up to the last fd):
//!
//! - `garbage`: receive HELLO, send bytes that are not a protocol message, sleep 30 s;
//! - `bad-version`: receive HELLO, send a READY with protocol version 9, sleep 30 s;
//! - `wrong-id`: receive HELLO, send a well-formed READY for another upgrade id, sleep 30 s;
//! - `close-early`: receive HELLO, close fd 3, keep running (sleep 30 s);
//! - `exit-before-ready`: receive HELLO, exit 3;
//! - `hang`: receive HELLO, never answer (sleep 30 s);
//! - `ready-then-die`: receive HELLO, send a correct READY, accept nothing, SIGKILL itself
//!   300 ms later.
//!
//! Every step is logged to stderr (the server's log in the tests), prefixed `misbehave[PID]`.

use std::io::IoSliceMut;
use std::os::fd::RawFd;
use std::process::ExitCode;
use std::time::Duration;

use nix::sys::socket::{recvmsg, send, ControlMessageOwned, MsgFlags, UnixAddr};

const MAGIC: &[u8; 4] = b"RFLP";
const VERSION: u8 = 1;
const KIND_HELLO: u8 = 1;
const KIND_READY: u8 = 2;
const KIND_FDS: u8 = 6;
/// The preamble's version byte, and its kinds.
const PREAMBLE: u8 = 0;
const KIND_OFFER: u8 = 1;
const KIND_ACCEPT: u8 = 2;
const CHANNEL_FD: RawFd = 3;

fn log(msg: &str) {
    // One write for the whole line: the server logs into the same file, and `eprintln!` writes
    // its pieces one by one, so a server line could land inside this one (seen in CI:
    // "misbehave[<server line>27304]: got HELLO", and the test did not find its line).
    use std::io::Write;
    let line = format!("misbehave[{}]: {msg}\n", std::process::id());
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

fn ready(version: u8, id: u64) -> Vec<u8> {
    let mut m = MAGIC.to_vec();
    m.push(version);
    m.push(KIND_READY);
    m.extend_from_slice(&id.to_le_bytes());
    m
}

/// Bytes that are not a ringflip message (never start with the magic), from the clock and pid.
fn garbage(n: usize) -> Vec<u8> {
    let mut x = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
        ^ ((std::process::id() as u64) << 32)
        | 1;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        // xorshift64
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.push(x as u8);
    }
    if out.starts_with(b"R") {
        out[0] = b'X';
    }
    out
}

/// Receives HELLO (and its fds, which are kept open until this process ends). Returns the
/// upgrade id and parent pid it carries, after checking them against the environment.
fn receive_hello(expected: u64) -> Result<(u64, u32, usize), String> {
    let tv = libc::timeval {
        tv_sec: 10,
        tv_usec: 0,
    };
    // SAFETY: setsockopt with a pointer to a live timeval of the size passed.
    let r = unsafe {
        libc::setsockopt(
            CHANNEL_FD,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(format!(
            "SO_RCVTIMEO on fd 3: {}",
            std::io::Error::last_os_error()
        ));
    }
    let mut buf = vec![0u8; 512 * 1024];
    // OFFER of a range whose newest version is 1, carrying HELLO; answered with ACCEPT(1).
    let (len, mut fds) = receive(&mut buf)?;
    let b = &buf[..len];
    if len < 8 || &b[..4] != MAGIC || b[4] != PREAMBLE || b[5] != KIND_OFFER || b[7] != VERSION {
        return Err(format!(
            "not an OFFER of version 1: {len} bytes {:02x?}",
            &b[..len.min(16)]
        ));
    }
    let mut accept = MAGIC.to_vec();
    accept.extend_from_slice(&[PREAMBLE, KIND_ACCEPT, VERSION]);
    send_msg(&accept)?;
    let b = &buf[8..len];
    if b.len() < 34 || &b[..4] != MAGIC || b[4] != VERSION || b[5] != KIND_HELLO {
        return Err(format!(
            "not a HELLO: {} bytes {:02x?}",
            b.len(),
            &b[..b.len().min(16)]
        ));
    }
    let id = u64::from_le_bytes(b[6..14].try_into().expect("8 bytes"));
    let parent = u32::from_le_bytes(b[14..18].try_into().expect("4 bytes"));
    let count = u32::from_le_bytes(b[22..26].try_into().expect("4 bytes")) as usize;
    if id != expected {
        return Err(format!(
            "HELLO for upgrade {id}, RINGFLIP_UPGRADE_ID says {expected}"
        ));
    }
    // The FDS messages, until HELLO's count (the state, if any, is left on the channel).
    while fds < count {
        let (len, n) = receive(&mut buf)?;
        if len < 8 || buf[5] != KIND_FDS {
            return Err(format!("not an FDS message: {len} bytes"));
        }
        fds += n;
    }
    Ok((id, parent, fds))
}

/// One message into `buf`: its length and how many fds came with it (deliberately left open,
/// leaked until exit).
fn receive(buf: &mut [u8]) -> Result<(usize, usize), String> {
    let mut cmsg = nix::cmsg_space!([RawFd; 253]);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = recvmsg::<UnixAddr>(CHANNEL_FD, &mut iov, Some(&mut cmsg), MsgFlags::empty())
        .map_err(|e| format!("recvmsg on fd 3: {e}"))?;
    let mut fds = 0;
    if let Ok(cmsgs) = msg.cmsgs() {
        for c in cmsgs {
            if let ControlMessageOwned::ScmRights(raw) = c {
                fds += raw.len();
            }
        }
    }
    Ok((msg.bytes, fds))
}

fn send_msg(bytes: &[u8]) -> Result<(), String> {
    send(CHANNEL_FD, bytes, MsgFlags::MSG_NOSIGNAL)
        .map(|_| ())
        .map_err(|e| format!("send on fd 3: {e}"))
}

fn main() -> ExitCode {
    let mode = std::env::args().nth(1).unwrap_or_default();
    let fd_var = std::env::var("RINGFLIP_HANDOFF_FD").unwrap_or_default();
    let id: u64 = match std::env::var("RINGFLIP_UPGRADE_ID")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        Some(id) => id,
        None => {
            log("RINGFLIP_UPGRADE_ID missing or not a number");
            return ExitCode::from(2);
        }
    };
    if fd_var != "3" {
        log(&format!("RINGFLIP_HANDOFF_FD is {fd_var:?}, expected 3"));
        return ExitCode::from(2);
    }
    log(&format!("mode {mode:?}, upgrade {id}"));
    let (id, parent, fds) = match receive_hello(id) {
        Ok(h) => h,
        Err(e) => {
            log(&e);
            return ExitCode::from(2);
        }
    };
    log(&format!("got HELLO from {parent} with {fds} fds"));
    let sleep30 = || std::thread::sleep(Duration::from_secs(30));
    let result = match mode.as_str() {
        "garbage" => send_msg(&garbage(40)).map(|_| sleep30()),
        "bad-version" => send_msg(&ready(9, id)).map(|_| sleep30()),
        "wrong-id" => send_msg(&ready(VERSION, id ^ 0x5a5a_0000_0000_0001)).map(|_| sleep30()),
        "close-early" => {
            // SAFETY: closing fd 3, which this process owns and never uses again.
            unsafe { libc::close(CHANNEL_FD) };
            log("closed fd 3");
            sleep30();
            Ok(())
        }
        "exit-before-ready" => {
            log("exiting with 3");
            return ExitCode::from(3);
        }
        "hang" => {
            sleep30();
            Ok(())
        }
        "ready-then-die" => send_msg(&ready(VERSION, id)).map(|_| {
            log("READY sent; SIGKILL to self in 300 ms");
            std::thread::sleep(Duration::from_millis(300));
            // SAFETY: kill(2) on this very process.
            unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
            sleep30();
        }),
        other => Err(format!("unknown mode {other:?}")),
    };
    match result {
        Ok(()) => {
            log("done sleeping; exiting 0");
            ExitCode::SUCCESS
        }
        Err(e) => {
            log(&e);
            ExitCode::from(2)
        }
    }
}
