//! The application's state, as the successor reads it: `STATE` messages on the handoff
//! channel, after the fds, before READY. Read whole at `build` when it is at most
//! [`MAX_STATE_LEN`] bytes, else by the application through a [`StateReader`]; either way
//! this process holds one chunk at a time beyond what the application keeps.

use std::io::{self, Read};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::Duration;

use bytes::Bytes;
use nix::sys::socket::{recv, MsgFlags};

use crate::error::Error;
use crate::handoff::{Message, MAX_STATE_LEN, STATE_CHUNK, STATE_HEADER};
use crate::sys;

/// The state stream's progress.
#[derive(Debug)]
pub(crate) struct StateStream {
    version: u8,
    len: u64,
    /// Bytes taken off the channel.
    received: u64,
    /// The current chunk, and how far the application has read it.
    chunk: Vec<u8>,
    at: usize,
    /// The whole state, when it was read at `build`, and how far a reader has read it.
    whole: Option<Bytes>,
    whole_at: usize,
}

impl StateStream {
    /// The stream of `len` bytes in `version`, whose first chunk came with HELLO.
    pub(crate) fn new(version: u8, len: u64, first: Vec<u8>) -> io::Result<StateStream> {
        if first.len() as u64 > len {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("a first state chunk of {} bytes, of {len}", first.len()),
            ));
        }
        Ok(StateStream {
            version,
            len,
            received: first.len() as u64,
            chunk: first,
            at: 0,
            whole: None,
            whole_at: 0,
        })
    }

    /// The whole state, if it was read at `build` (at most [`MAX_STATE_LEN`] bytes).
    pub(crate) fn whole(&self) -> Option<&Bytes> {
        self.whole.as_ref()
    }

    /// Bytes handed to the application.
    fn read(&self) -> u64 {
        match self.whole {
            Some(_) => self.whole_at as u64,
            None => self.received - (self.chunk.len() - self.at) as u64,
        }
    }

    /// Reads the whole state into memory (at `build`, for a small one).
    pub(crate) fn read_whole(&mut self, channel: BorrowedFd<'_>) -> Result<(), Error> {
        debug_assert!(self.len <= MAX_STATE_LEN as u64);
        let mut all = Vec::with_capacity(self.len as usize);
        all.extend_from_slice(&self.chunk[self.at..]);
        while self.received < self.len {
            self.next_chunk(channel)
                .map_err(|e| Error::Handoff(format!("receiving the state: {e}")))?;
            all.extend_from_slice(&self.chunk);
            self.at = self.chunk.len();
        }
        self.chunk = Vec::new();
        self.at = 0;
        self.whole = Some(Bytes::from(all));
        Ok(())
    }

    /// Takes the next `STATE` message off the channel.
    fn next_chunk(&mut self, channel: BorrowedFd<'_>) -> io::Result<()> {
        let mut buf = vec![0u8; STATE_HEADER + STATE_CHUNK];
        // MSG_TRUNC: recv returns the datagram's real length even when it was longer than
        // the buffer (unix(7) sequenced-packet sockets, since Linux 3.4), so an oversized
        // message is seen, not silently cut.
        let n = loop {
            match recv(channel.as_raw_fd(), &mut buf, MsgFlags::MSG_TRUNC) {
                Err(nix::errno::Errno::EINTR) => continue,
                Err(nix::errno::Errno::EAGAIN) => {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the previous process sent no state for 10 s",
                    ))
                }
                other => break other?,
            }
        };
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "the previous process closed the channel after {} of {} state bytes",
                    self.received, self.len
                ),
            ));
        }
        if n > buf.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("a state message of {n} bytes"),
            ));
        }
        let chunk = match Message::decode(&buf[..n]) {
            Ok(Message::State { version, chunk }) if version == self.version => chunk,
            Ok(other) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("expected state, got {other:?}"),
                ))
            }
            Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e.to_string())),
        };
        if self.received + chunk.len() as u64 > self.len {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("more than the {} state bytes announced", self.len),
            ));
        }
        self.received += chunk.len() as u64;
        self.chunk = chunk;
        self.at = 0;
        Ok(())
    }

    /// Before READY: the whole state must have been read. A state read at `build` counts as
    /// read; a streamed one that the application did not read to its end fails the upgrade
    /// ([`Error::StateNotRead`]): what it skipped would be lost without a word.
    pub(crate) fn finish(&mut self, channel: BorrowedFd<'_>) -> Result<(), Error> {
        if self.whole.is_none() && self.read() < self.len {
            return Err(Error::StateNotRead {
                read: self.read(),
                len: self.len,
            });
        }
        sys::set_recv_timeout(channel, Duration::ZERO).map_err(|e| Error::Handoff(e.to_string()))
    }
}

/// The state the previous process handed over with
/// [`Handle::set_handoff_state`](crate::Handle::set_handoff_state), as a stream: made by
/// [`Server::inherited_state_reader`](crate::Server::inherited_state_reader). Each `read`
/// takes it off the handoff channel in chunks of at most 64 KiB, as the previous process
/// (still serving) sends them. Read it to its end before
/// [`Server::run`](crate::Server::run), or the upgrade fails.
#[derive(Debug)]
pub struct StateReader<'a> {
    stream: &'a mut StateStream,
    channel: BorrowedFd<'a>,
}

impl<'a> StateReader<'a> {
    pub(crate) fn new(stream: &'a mut StateStream, channel: BorrowedFd<'a>) -> StateReader<'a> {
        StateReader { stream, channel }
    }

    /// The state's length in bytes, as the previous process announced it.
    pub fn len(&self) -> u64 {
        self.stream.len
    }

    /// Whether the state is empty.
    pub fn is_empty(&self) -> bool {
        self.stream.len == 0
    }

    /// Bytes not read yet.
    pub fn remaining(&self) -> u64 {
        self.stream.len - self.stream.read()
    }
}

impl Read for StateReader<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let s = &mut *self.stream;
        if let Some(whole) = &s.whole {
            // Read at `build`: served from memory.
            let at = s.whole_at;
            let n = out.len().min(whole.len() - at);
            out[..n].copy_from_slice(&whole[at..at + n]);
            s.whole_at = at + n;
            return Ok(n);
        }
        if s.at == s.chunk.len() {
            if s.received == s.len || out.is_empty() {
                return Ok(0);
            }
            s.next_chunk(self.channel)?;
        }
        let n = out.len().min(s.chunk.len() - s.at);
        out[..n].copy_from_slice(&s.chunk[s.at..s.at + n]);
        s.at += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::{AsFd, OwnedFd};

    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};

    use super::*;
    use crate::handoff::state_header;

    fn pair() -> (OwnedFd, OwnedFd) {
        let (a, b) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap();
        sys::set_recv_timeout(b.as_fd(), Duration::from_secs(5)).unwrap();
        (a, b)
    }

    fn send_chunk(to: &OwnedFd, bytes: &[u8]) {
        let mut m = state_header(1).to_vec();
        m.extend_from_slice(bytes);
        sys::send_nonblocking(to.as_fd(), &m).unwrap();
    }

    #[test]
    fn the_state_is_read_in_order_across_chunks() {
        let (parent, child) = pair();
        send_chunk(&parent, b"hello ");
        send_chunk(&parent, b"state");
        let mut stream = StateStream::new(1, 11, Vec::new()).unwrap();
        let mut got = Vec::new();
        let mut reader = StateReader::new(&mut stream, child.as_fd());
        assert_eq!(reader.len(), 11);
        reader.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"hello state");
        stream.finish(child.as_fd()).unwrap();
    }

    /// What the application did not read would be lost: `run` fails (the upgrade rolls back).
    #[test]
    fn a_state_read_in_part_fails_the_upgrade() {
        let (parent, child) = pair();
        send_chunk(&parent, &[7; 100]);
        let mut stream = StateStream::new(1, 100, Vec::new()).unwrap();
        let mut four = [0; 4];
        StateReader::new(&mut stream, child.as_fd())
            .read_exact(&mut four)
            .unwrap();
        match stream.finish(child.as_fd()) {
            Err(Error::StateNotRead { read: 4, len: 100 }) => {}
            other => panic!("{other:?}"),
        }
        // Not read at all: the same.
        let mut untouched = StateStream::new(1, 100, Vec::new()).unwrap();
        assert!(matches!(
            untouched.finish(child.as_fd()),
            Err(Error::StateNotRead { read: 0, len: 100 })
        ));
    }

    #[test]
    fn a_state_cut_short_is_an_error_not_an_end() {
        let (parent, child) = pair();
        send_chunk(&parent, &[1; 50]);
        drop(parent);
        let mut stream = StateStream::new(1, 100, Vec::new()).unwrap();
        let mut got = Vec::new();
        let e = StateReader::new(&mut stream, child.as_fd())
            .read_to_end(&mut got)
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}");
        assert!(e.to_string().contains("after 50 of 100"), "{e}");
    }

    #[test]
    fn more_than_announced_or_another_version_is_refused() {
        let (parent, child) = pair();
        send_chunk(&parent, &[1; 10]);
        let mut stream = StateStream::new(1, 5, Vec::new()).unwrap();
        let e = StateReader::new(&mut stream, child.as_fd())
            .read(&mut [0; 64])
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
        send_chunk(&parent, &[1; 10]);
        let mut stream = StateStream::new(2, 10, Vec::new()).unwrap();
        let e = StateReader::new(&mut stream, child.as_fd())
            .read(&mut [0; 64])
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
    }

    #[test]
    fn the_first_chunk_comes_with_hello() {
        let (parent, child) = pair();
        send_chunk(&parent, b" you");
        let mut stream = StateStream::new(1, 9, b"hello".to_vec()).unwrap();
        let mut got = String::new();
        StateReader::new(&mut stream, child.as_fd())
            .read_to_string(&mut got)
            .unwrap();
        assert_eq!(got, "hello you");
        stream.finish(child.as_fd()).unwrap();
        assert!(StateStream::new(1, 2, b"abc".to_vec()).is_err());
    }

    #[test]
    fn a_small_state_is_read_whole_and_served_from_memory() {
        let (parent, child) = pair();
        send_chunk(&parent, b"keys");
        let mut stream = StateStream::new(1, 4, Vec::new()).unwrap();
        stream.read_whole(child.as_fd()).unwrap();
        assert_eq!(stream.whole().unwrap().as_ref(), b"keys");
        let mut got = String::new();
        StateReader::new(&mut stream, child.as_fd())
            .read_to_string(&mut got)
            .unwrap();
        assert_eq!(got, "keys");
        stream.finish(child.as_fd()).unwrap();
    }
}
