//! The handoff protocol between a serving process and its successor: the wire format. The
//! full description, with the version rule, is `docs/PROTOCOL.md`.
//!
//! One `SOCK_SEQPACKET` socketpair; the child's end is fd 3, named in `RINGFLIP_HANDOFF_FD`
//! together with the upgrade id in `RINGFLIP_UPGRADE_ID`. Messages keep their boundaries.
//! Every message starts with the magic `RFLP`, a version byte and a kind byte.
//!
//! **Version negotiation (the preamble, version byte 0, a layout that never changes):**
//! - parent → child: `OFFER(min, max)`, the range of protocol versions the parent speaks,
//!   followed in the same message by its HELLO in version `max` (a whole message, its first
//!   fds in the OFFER's `SCM_RIGHTS`): the parent does not wait for the answer;
//! - child → parent: `ACCEPT(v)`, the highest version both speak, or `REFUSE(min, max)`, the
//!   child's own range when there is none (the child then exits with
//!   [`Error::IncompatibleProtocol`](crate::Error); the parent rolls back with
//!   [`UpgradeFailure::IncompatibleProtocol`](crate::UpgradeFailure)).
//!
//! When `v` is the parent's `max` (the same release, or a later one that still speaks it), the
//! child takes the HELLO the OFFER carried and what follows it: no round trip. Otherwise it
//! drops that HELLO and every message not in version `v` (closing their fds) until the parent,
//! once it has read the ACCEPT, starts the handoff again in version `v`. A handoff that fits
//! one message (≤ 253 fds, ≤ 64 KiB of state) thus reaches a child of the same version even
//! if the parent's thread stalls right after sending it (see `tests/takeover.rs`).
//!
//! **The handoff, in one version (its number in each message's version byte):**
//! - `HELLO` (upgrade id, parent pid, generation, how many fds and state bytes the handoff
//!   has in all, the first records, with their fds, the first chunk of state, extensions);
//! - `FDS` messages, each with at most [`MAX_FDS_PER_MESSAGE`] records (listeners, UDP
//!   sockets, the application's fds, then the pidfds of the parent and its older generations
//!   still draining) and their fds in one `SCM_RIGHTS` control message, in record order,
//!   until HELLO's count is reached;
//! - `STATE` messages, chunks of the application's state, at most [`STATE_CHUNK`] bytes
//!   each, until HELLO's length is reached.
//!
//! The child adopts nothing before every fd has arrived (all or nothing), and sends READY
//! only after the whole state was received.
//!
//! **Afterwards (version byte 1 in every protocol version: these layouts are frozen):**
//! - child → parent: `READY(upgrade id)` once its accepts are armed;
//! - child → parent: `RETIRING(upgrade id)` when the child itself starts draining (it upgraded
//!   again or shuts down), so that its later exit is not mistaken for a crash (the parent reads
//!   it when the child exits, before it judges the exit);
//! - child → parent: `SERVING(upgrade id)` when the child serves again after a RETIRING (its own
//!   successor died during its drain and it took the service back): the RETIRING is withdrawn,
//!   its exit would be a crash again. A parent that does not know it ignores it while draining;
//! - parent → child: `RELEASED(upgrade id)` once the parent's accepts have all stopped: the
//!   child stops its takeover polls (see the driver). A child that never gets it stops them
//!   at the channel's EOF instead;
//! - EOF either way when a side exits.
//!
//! Extensions (HELLO ends with them): `kind u8, length u16, value`; a receiver skips the kinds
//! it does not know, so a later release can add fields without a new version.
//!
//! The decoder is total: any byte string decodes to a message or a [`WireError`], and every
//! length is checked against the input and against a fixed bound before it is used.

use std::fmt;

use crate::machine::UpgradeId;
use crate::protocol::ProtocolVersions;

/// Environment variable naming the child's end of the handoff socketpair.
pub(crate) const ENV_FD: &str = "RINGFLIP_HANDOFF_FD";
/// Environment variable carrying the upgrade id the child was started for.
pub(crate) const ENV_UPGRADE_ID: &str = "RINGFLIP_UPGRADE_ID";
/// The fd number the child's end of the socketpair gets.
pub(crate) const CHILD_FD: i32 = 3;

const MAGIC: &[u8; 4] = b"RFLP";
/// The version byte of the preamble (OFFER, ACCEPT, REFUSE): never negotiated, never changed.
const PREAMBLE: u8 = 0;
/// The version byte of READY, RETIRING, RELEASED and SERVING, in every protocol version.
const FROZEN: u8 = 1;

/// At most this many fds in one handoff: listeners, UDP sockets, the fds of
/// [`Handle::set_handoff_fds`](crate::Handle::set_handoff_fds) and the elders' pidfds
/// together. They travel in as many messages as needed; the real bound is the file
/// descriptor limit (`RLIMIT_NOFILE`) of both processes. This one is the kernel's default
/// `fs.nr_open` (1,048,576), the most fds any process can have.
pub const MAX_LISTENERS: usize = 1 << 20;
/// Fds per `FDS` message: `SCM_MAX_FD` is 253 in `include/net/scm.h` (see `unix(7)`: "the
/// kernel constant SCM_MAX_FD defines a limit on the number of file descriptors in the
/// array"); `sendmsg` fails with `EINVAL` above it.
pub(crate) const MAX_FDS_PER_MESSAGE: usize = 253;
/// Longest listener name in bytes.
pub(crate) const MAX_NAME_LEN: usize = 255;
/// Longest listener address in bytes.
const MAX_ADDR_LEN: usize = 1024;
/// The largest state [`Server::inherited_state`](crate::Server::inherited_state) returns
/// whole; a larger one is read as a stream with
/// [`Server::inherited_state_reader`](crate::Server::inherited_state_reader). The state itself
/// may be of any size.
pub const MAX_STATE_LEN: usize = 64 * 1024;
/// State bytes per `STATE` message. A unix datagram's linear part is kmalloc'ed: above
/// `SKB_MAX_ALLOC` (~16 KiB) `unix_dgram_sendmsg` puts up to `MAX_SKB_FRAGS` (17) pages in
/// page fragments, so a 64 KiB chunk needs no allocation above order 2.
pub(crate) const STATE_CHUNK: usize = 64 * 1024;
/// Header of a `STATE` message (magic, version, kind).
pub(crate) const STATE_HEADER: usize = 6;
/// Largest message on the wire: an OFFER carrying a HELLO with every record at its largest
/// and a whole state chunk (~390 KB), with room for extensions. The encoder refuses longer.
pub(crate) const MAX_MESSAGE_LEN: usize =
    8 + 64 + MAX_FDS_PER_MESSAGE * (5 + MAX_NAME_LEN + MAX_ADDR_LEN) + STATE_CHUNK + 1024;

const KIND_HELLO: u8 = 1;
const KIND_READY: u8 = 2;
const KIND_RETIRING: u8 = 3;
const KIND_RELEASED: u8 = 4;
const KIND_SERVING: u8 = 5;
const KIND_FDS: u8 = 6;
const KIND_STATE: u8 = 7;
const KIND_OFFER: u8 = 1;
const KIND_ACCEPT: u8 = 2;
const KIND_REFUSE: u8 = 3;

/// What kind of fd a record describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SocketKind {
    /// A TCP listening socket (IPv4 or IPv6).
    Tcp,
    /// A Unix stream listening socket (path or abstract name).
    Unix,
    /// A UDP socket: handed over, never accepted on.
    Udp,
    /// Any fd the application hands over (a memfd, a pipe, a device…), passed as it is.
    Raw,
    /// A pidfd of the parent or of an older generation still draining (the parent first).
    Elder,
    /// A kind a later release added: its fd is received (it travels in the same message as
    /// the others) and closed, with a warning, like a listener this binary does not use.
    Unknown(u8),
}

impl SocketKind {
    fn from_u8(v: u8) -> SocketKind {
        match v {
            1 => SocketKind::Tcp,
            2 => SocketKind::Unix,
            3 => SocketKind::Udp,
            4 => SocketKind::Raw,
            5 => SocketKind::Elder,
            other => SocketKind::Unknown(other),
        }
    }

    fn to_u8(self) -> u8 {
        match self {
            SocketKind::Tcp => 1,
            SocketKind::Unix => 2,
            SocketKind::Udp => 3,
            SocketKind::Raw => 4,
            SocketKind::Elder => 5,
            SocketKind::Unknown(v) => v,
        }
    }
}

/// One fd as described in an `FDS` message; the fd travels at the same index in its
/// `SCM_RIGHTS`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ListenerRecord {
    pub name: String,
    pub kind: SocketKind,
    /// The socket's local address as text (`127.0.0.1:8080`, `[::1]:8080`, `/run/app.sock`,
    /// `@abstract`); empty for raw fds and pidfds.
    pub address: String,
}

/// A field added after a version was fixed: a receiver skips the kinds it does not know.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Extension {
    pub kind: u8,
    pub value: Vec<u8>,
}

/// A protocol message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Message {
    /// Preamble, parent → child: the versions the parent speaks, and its HELLO in version
    /// `versions.max`, encoded (empty if none).
    Offer {
        versions: ProtocolVersions,
        hello: Vec<u8>,
    },
    /// Preamble, child → parent: the version picked.
    Accept(u8),
    /// Preamble, child → parent: no common version; the child's own range.
    Refuse(ProtocolVersions),
    Hello {
        /// The negotiated version.
        version: u8,
        upgrade: UpgradeId,
        predecessor_pid: u32,
        /// The child's generation: 0 is the first process started by hand.
        generation: u32,
        /// How many fds the handoff has in all (this message's and the `FDS` messages').
        fds: u32,
        /// How many state bytes the handoff has in all (this message's first chunk and the
        /// `STATE` messages').
        state_len: u64,
        /// The first records (at most [`MAX_FDS_PER_MESSAGE`]); their fds travel with this
        /// message.
        records: Vec<ListenerRecord>,
        /// The first chunk of the state (at most [`STATE_CHUNK`] bytes).
        state: Vec<u8>,
        extensions: Vec<Extension>,
    },
    Fds {
        version: u8,
        records: Vec<ListenerRecord>,
    },
    State {
        version: u8,
        chunk: Vec<u8>,
    },
    Ready(UpgradeId),
    Retiring(UpgradeId),
    Released(UpgradeId),
    Serving(UpgradeId),
}

/// Why bytes on the handoff channel were refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum WireError {
    /// The message is shorter than its header or a field says.
    Truncated,
    /// The message does not start with the protocol magic.
    BadMagic,
    /// A message kind that does not exist with this version byte.
    Version(u8),
    /// An unknown message kind.
    Kind(u8),
    /// A count or length exceeds the protocol's bounds.
    TooLarge(&'static str),
    /// A listener name or address is not UTF-8.
    NotUtf8,
    /// Bytes left over after the message.
    Trailing(usize),
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WireError::Truncated => write!(f, "truncated message"),
            WireError::BadMagic => write!(f, "not a ringflip message (bad magic)"),
            WireError::Version(v) => {
                write!(f, "protocol version {v} is not valid for this message kind")
            }
            WireError::Kind(k) => write!(f, "unknown message kind {k}"),
            WireError::TooLarge(what) => write!(f, "{what} exceeds the protocol limit"),
            WireError::NotUtf8 => write!(f, "listener name or address is not UTF-8"),
            WireError::Trailing(n) => write!(f, "{n} unexpected bytes after the message"),
        }
    }
}

impl std::error::Error for WireError {}

/// The header of a `STATE` message in `version`; its payload follows (sent from the
/// application's buffer, not copied).
pub(crate) fn state_header(version: u8) -> [u8; STATE_HEADER] {
    let mut h = [0; STATE_HEADER];
    h[..4].copy_from_slice(MAGIC);
    h[4] = version;
    h[5] = KIND_STATE;
    h
}

/// What a message is, in a few words: its kind and counts, never its bytes (an unexpected
/// STATE in an error line must not print 64 KiB).
impl fmt::Display for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Message::Offer { versions, .. } => {
                write!(f, "OFFER (versions {}–{})", versions.min, versions.max)
            }
            Message::Accept(v) => write!(f, "ACCEPT (version {v})"),
            Message::Refuse(v) => write!(f, "REFUSE (speaks {}–{})", v.min, v.max),
            Message::Hello {
                version,
                upgrade,
                fds,
                state_len,
                ..
            } => write!(
                f,
                "HELLO (version {version}, upgrade {upgrade}, {fds} fds, {state_len} bytes of state)"
            ),
            Message::Fds { version, records } => {
                write!(f, "FDS (version {version}, {} records)", records.len())
            }
            Message::State { version, chunk } => {
                write!(f, "STATE (version {version}, {} bytes)", chunk.len())
            }
            Message::Ready(id) => write!(f, "READY (upgrade {id})"),
            Message::Retiring(id) => write!(f, "RETIRING (upgrade {id})"),
            Message::Released(id) => write!(f, "RELEASED (upgrade {id})"),
            Message::Serving(id) => write!(f, "SERVING (upgrade {id})"),
        }
    }
}

impl Message {
    /// The version byte this message is sent with.
    pub(crate) fn version(&self) -> u8 {
        match self {
            Message::Offer { .. } | Message::Accept(_) | Message::Refuse(_) => PREAMBLE,
            Message::Hello { version, .. }
            | Message::Fds { version, .. }
            | Message::State { version, .. } => *version,
            _ => FROZEN,
        }
    }

    /// Encodes the message. Fails only when a bound is exceeded, so a bad configuration is
    /// reported before anything is sent.
    pub(crate) fn encode(&self) -> Result<Vec<u8>, WireError> {
        let mut out = Vec::with_capacity(64);
        out.extend_from_slice(MAGIC);
        let version = self.version();
        if version == PREAMBLE
            && !matches!(
                self,
                Message::Offer { .. } | Message::Accept(_) | Message::Refuse(_)
            )
        {
            return Err(WireError::Version(version));
        }
        out.push(version);
        match self {
            Message::Offer { versions, hello } => {
                out.extend_from_slice(&[KIND_OFFER, versions.min, versions.max]);
                out.extend_from_slice(hello);
            }
            Message::Accept(v) => out.extend_from_slice(&[KIND_ACCEPT, *v]),
            Message::Refuse(r) => out.extend_from_slice(&[KIND_REFUSE, r.min, r.max]),
            Message::Hello {
                version: _,
                upgrade,
                predecessor_pid,
                generation,
                fds,
                state_len,
                records,
                state,
                extensions,
            } => {
                out.push(KIND_HELLO);
                out.extend_from_slice(&upgrade.0.to_le_bytes());
                out.extend_from_slice(&predecessor_pid.to_le_bytes());
                out.extend_from_slice(&generation.to_le_bytes());
                if *fds as usize > MAX_LISTENERS {
                    return Err(WireError::TooLarge("fd count"));
                }
                out.extend_from_slice(&fds.to_le_bytes());
                out.extend_from_slice(&state_len.to_le_bytes());
                put_records(&mut out, records)?;
                if state.len() > STATE_CHUNK {
                    return Err(WireError::TooLarge("state chunk"));
                }
                out.extend_from_slice(&(state.len() as u32).to_le_bytes());
                out.extend_from_slice(state);
                put_extensions(&mut out, extensions)?;
            }
            Message::Fds {
                version: _,
                records,
            } => {
                out.push(KIND_FDS);
                put_records(&mut out, records)?;
            }
            Message::State { version: _, chunk } => {
                out.push(KIND_STATE);
                if chunk.len() > STATE_CHUNK {
                    return Err(WireError::TooLarge("state chunk"));
                }
                out.extend_from_slice(chunk);
            }
            Message::Ready(id) => put_id(&mut out, KIND_READY, *id),
            Message::Retiring(id) => put_id(&mut out, KIND_RETIRING, *id),
            Message::Released(id) => put_id(&mut out, KIND_RELEASED, *id),
            Message::Serving(id) => put_id(&mut out, KIND_SERVING, *id),
        }
        if out.len() > MAX_MESSAGE_LEN {
            return Err(WireError::TooLarge("message"));
        }
        Ok(out)
    }

    /// Decodes one whole message.
    pub(crate) fn decode(bytes: &[u8]) -> Result<Message, WireError> {
        if bytes.len() > MAX_MESSAGE_LEN {
            return Err(WireError::TooLarge("message"));
        }
        let mut r = Reader(bytes);
        if r.take(4)? != MAGIC {
            return Err(WireError::BadMagic);
        }
        let version = r.u8()?;
        let kind = r.u8()?;
        let msg = match (version, kind) {
            (PREAMBLE, KIND_OFFER) => {
                let versions = ProtocolVersions {
                    min: r.u8()?,
                    max: r.u8()?,
                };
                Message::Offer {
                    versions,
                    hello: r.take(r.0.len())?.to_vec(),
                }
            }
            (PREAMBLE, KIND_ACCEPT) => Message::Accept(r.u8()?),
            (PREAMBLE, KIND_REFUSE) => Message::Refuse(ProtocolVersions {
                min: r.u8()?,
                max: r.u8()?,
            }),
            (PREAMBLE, _) => return Err(WireError::Kind(kind)),
            (_, KIND_HELLO) => {
                let upgrade = UpgradeId(r.u64()?);
                let predecessor_pid = r.u32()?;
                let generation = r.u32()?;
                let fds = r.u32()?;
                if fds as usize > MAX_LISTENERS {
                    return Err(WireError::TooLarge("fd count"));
                }
                let state_len = r.u64()?;
                let records = r.records()?;
                let chunk = r.u32()? as usize;
                if chunk > STATE_CHUNK {
                    return Err(WireError::TooLarge("state chunk"));
                }
                let state = r.take(chunk)?.to_vec();
                Message::Hello {
                    version,
                    upgrade,
                    predecessor_pid,
                    generation,
                    fds,
                    state_len,
                    records,
                    state,
                    extensions: r.extensions()?,
                }
            }
            (_, KIND_FDS) => Message::Fds {
                version,
                records: r.records()?,
            },
            (_, KIND_STATE) => {
                if r.0.len() > STATE_CHUNK {
                    return Err(WireError::TooLarge("state chunk"));
                }
                Message::State {
                    version,
                    chunk: r.take(r.0.len())?.to_vec(),
                }
            }
            (FROZEN, KIND_READY) => Message::Ready(UpgradeId(r.u64()?)),
            (FROZEN, KIND_RETIRING) => Message::Retiring(UpgradeId(r.u64()?)),
            (FROZEN, KIND_RELEASED) => Message::Released(UpgradeId(r.u64()?)),
            (FROZEN, KIND_SERVING) => Message::Serving(UpgradeId(r.u64()?)),
            (_, KIND_READY | KIND_RETIRING | KIND_RELEASED | KIND_SERVING) => {
                return Err(WireError::Version(version))
            }
            (_, other) => return Err(WireError::Kind(other)),
        };
        if !r.0.is_empty() {
            return Err(WireError::Trailing(r.0.len()));
        }
        Ok(msg)
    }
}

fn put_id(out: &mut Vec<u8>, kind: u8, id: UpgradeId) {
    out.push(kind);
    out.extend_from_slice(&id.0.to_le_bytes());
}

fn put_records(out: &mut Vec<u8>, records: &[ListenerRecord]) -> Result<(), WireError> {
    if records.len() > MAX_FDS_PER_MESSAGE {
        return Err(WireError::TooLarge("fds in one message"));
    }
    out.extend_from_slice(&(records.len() as u16).to_le_bytes());
    for l in records {
        put_str(out, &l.name, MAX_NAME_LEN, "listener name")?;
        out.push(l.kind.to_u8());
        put_str(out, &l.address, MAX_ADDR_LEN, "listener address")?;
    }
    Ok(())
}

fn put_extensions(out: &mut Vec<u8>, extensions: &[Extension]) -> Result<(), WireError> {
    for e in extensions {
        let len = u16::try_from(e.value.len()).map_err(|_| WireError::TooLarge("extension"))?;
        out.push(e.kind);
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&e.value);
    }
    Ok(())
}

fn put_str(out: &mut Vec<u8>, s: &str, max: usize, what: &'static str) -> Result<(), WireError> {
    if s.len() > max {
        return Err(WireError::TooLarge(what));
    }
    out.extend_from_slice(&(s.len() as u16).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
    Ok(())
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.0.len() < n {
            return Err(WireError::Truncated);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let mut a = [0; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.array::<1>()?[0])
    }
    fn u16(&mut self) -> Result<u16, WireError> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    fn str(&mut self, max: usize, what: &'static str) -> Result<String, WireError> {
        let len = self.u16()? as usize;
        if len > max {
            return Err(WireError::TooLarge(what));
        }
        let bytes = self.take(len)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| WireError::NotUtf8)
    }
    /// A record count, then the records.
    fn records(&mut self) -> Result<Vec<ListenerRecord>, WireError> {
        let count = self.u16()? as usize;
        if count > MAX_FDS_PER_MESSAGE {
            return Err(WireError::TooLarge("fds in one message"));
        }
        let mut records = Vec::with_capacity(count);
        for _ in 0..count {
            let name = self.str(MAX_NAME_LEN, "listener name")?;
            let kind = self.u8()?;
            let kind = SocketKind::from_u8(kind);
            let address = self.str(MAX_ADDR_LEN, "listener address")?;
            records.push(ListenerRecord {
                name,
                kind,
                address,
            });
        }
        Ok(records)
    }
    /// Extensions up to the end of the message.
    fn extensions(&mut self) -> Result<Vec<Extension>, WireError> {
        let mut out = Vec::new();
        while !self.0.is_empty() {
            let kind = self.u8()?;
            let len = self.u16()? as usize;
            out.push(Extension {
                kind,
                value: self.take(len)?.to_vec(),
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
pub(crate) mod tests;
