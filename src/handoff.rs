//! The handoff protocol between a serving process and its successor.
//!
//! One `SOCK_SEQPACKET` socketpair; the child's end is fd 3, named in `RINGFLIP_HANDOFF_FD`
//! together with the upgrade id in `RINGFLIP_UPGRADE_ID`. Messages keep their boundaries:
//!
//! - parent → child: `HELLO` (upgrade id, parent pid, listener records, elder count, state
//!   blob) with every listener fd in one `SCM_RIGHTS` control message, in record order, followed
//!   by `elders` pidfds: the parent's own and those of its older generations still draining, so
//!   the child can count them (race-free: pidfds do not suffer pid reuse);
//! - child → parent: `READY(upgrade id)` once its accepts are armed;
//! - child → parent: `RETIRING(upgrade id)` when the child itself starts draining (it upgraded
//!   again or shuts down), so that its later exit is not mistaken for a crash (the parent reads
//!   it when the child exits, before it judges the exit);
//! - child → parent: `SERVING(upgrade id)` when the child serves again after a RETIRING (its own
//!   successor died during its drain and it took the service back): the RETIRING is withdrawn,
//!   its exit would be a crash again. A parent of an earlier version refuses it as an unknown
//!   kind, which it ignores while draining;
//! - parent → child: `RELEASED(upgrade id)` once the parent's accepts have all stopped: the
//!   child stops its takeover polls (see the driver). A child that never gets it (a parent of an
//!   earlier version) stops them at the channel's EOF instead; a child of an earlier version
//!   ignores it (it reads nothing from its parent but EOF).
//! - EOF either way when a side exits.
//!
//! Every message starts with the magic `RFLP` and a version byte. The decoder is total: any byte
//! string decodes to a message or a [`WireError`], and every length is checked against the input
//! and against a fixed bound before it is used.

use std::fmt;

use crate::machine::UpgradeId;

/// Environment variable naming the child's end of the handoff socketpair.
pub(crate) const ENV_FD: &str = "RINGFLIP_HANDOFF_FD";
/// Environment variable carrying the upgrade id the child was started for.
pub(crate) const ENV_UPGRADE_ID: &str = "RINGFLIP_UPGRADE_ID";
/// The fd number the child's end of the socketpair gets.
pub(crate) const CHILD_FD: i32 = 3;

const MAGIC: &[u8; 4] = b"RFLP";
/// Protocol version; a peer speaking another version is refused.
pub(crate) const VERSION: u8 = 1;

/// At most this many listeners: `SCM_MAX_FD` (253) fds fit in one `SCM_RIGHTS` message.
pub const MAX_LISTENERS: usize = 253;
/// Longest listener name in bytes.
pub(crate) const MAX_NAME_LEN: usize = 255;
/// Longest listener address in bytes.
const MAX_ADDR_LEN: usize = 1024;
/// Largest application state blob handed to the child, in bytes.
pub const MAX_STATE_LEN: usize = 64 * 1024;
/// Largest message on the wire: header (magic, version, kind, id, pid, generation, count: 24
/// bytes), every
/// listener record at its largest, the elder count, the blob length and the blob.
pub(crate) const MAX_MESSAGE_LEN: usize =
    24 + MAX_LISTENERS * (5 + MAX_NAME_LEN + MAX_ADDR_LEN) + 2 + 4 + MAX_STATE_LEN;

const KIND_HELLO: u8 = 1;
const KIND_READY: u8 = 2;
const KIND_RETIRING: u8 = 3;
const KIND_RELEASED: u8 = 4;
const KIND_SERVING: u8 = 5;

/// What kind of socket a listener record describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SocketKind {
    /// A TCP listening socket (IPv4 or IPv6).
    Tcp = 1,
    /// A Unix stream listening socket (path or abstract name).
    Unix = 2,
    /// A UDP socket: handed over, never accepted on.
    Udp = 3,
    /// Any fd the application hands over (a memfd, a pipe, a device…), passed as it is.
    Raw = 4,
}

impl SocketKind {
    fn from_u8(v: u8) -> Option<SocketKind> {
        match v {
            1 => Some(SocketKind::Tcp),
            2 => Some(SocketKind::Unix),
            3 => Some(SocketKind::Udp),
            4 => Some(SocketKind::Raw),
            _ => None,
        }
    }
}

/// One listener as described in HELLO; its fd travels at the same index in `SCM_RIGHTS`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ListenerRecord {
    pub name: String,
    pub kind: SocketKind,
    /// The socket's local address as text (`127.0.0.1:8080`, `[::1]:8080`, `/run/app.sock`,
    /// `@abstract`).
    pub address: String,
}

/// A protocol message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Message {
    Hello {
        upgrade: UpgradeId,
        parent_pid: u32,
        /// The child's generation: 0 is the first process started by hand.
        generation: u32,
        listeners: Vec<ListenerRecord>,
        /// How many pidfds follow the listener fds.
        elders: u16,
        state: Vec<u8>,
    },
    Ready(UpgradeId),
    Retiring(UpgradeId),
    Released(UpgradeId),
    Serving(UpgradeId),
}

/// The largest HELLO the protocol's bounds allow: every listener record at its longest, the
/// largest state blob. For the tests of the buffers that must hold it.
#[cfg(test)]
pub(crate) fn largest_hello() -> Message {
    Message::Hello {
        upgrade: UpgradeId(1),
        parent_pid: 1,
        generation: u32::MAX,
        listeners: vec![
            ListenerRecord {
                name: "n".repeat(MAX_NAME_LEN),
                kind: SocketKind::Tcp,
                address: "a".repeat(MAX_ADDR_LEN),
            };
            MAX_LISTENERS
        ],
        elders: 0,
        state: vec![1; MAX_STATE_LEN],
    }
}

/// Why bytes on the handoff channel were refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum WireError {
    /// The message is shorter than its header or a field says.
    Truncated,
    /// The message does not start with the protocol magic.
    BadMagic,
    /// The peer speaks another protocol version.
    Version(u8),
    /// An unknown message kind.
    Kind(u8),
    /// A count or length exceeds the protocol's bounds.
    TooLarge(&'static str),
    /// A listener name or address is not UTF-8.
    NotUtf8,
    /// An unknown socket kind in a listener record.
    SocketKind(u8),
    /// Bytes left over after the message.
    Trailing(usize),
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WireError::Truncated => write!(f, "truncated message"),
            WireError::BadMagic => write!(f, "not a ringflip message (bad magic)"),
            WireError::Version(v) => {
                write!(f, "protocol version {v}, this build speaks {VERSION}")
            }
            WireError::Kind(k) => write!(f, "unknown message kind {k}"),
            WireError::TooLarge(what) => write!(f, "{what} exceeds the protocol limit"),
            WireError::NotUtf8 => write!(f, "listener name or address is not UTF-8"),
            WireError::SocketKind(k) => write!(f, "unknown socket kind {k}"),
            WireError::Trailing(n) => write!(f, "{n} unexpected bytes after the message"),
        }
    }
}

impl std::error::Error for WireError {}

impl Message {
    /// Encodes the message. Fails only when a bound is exceeded, so a bad configuration is
    /// reported before anything is sent.
    pub(crate) fn encode(&self) -> Result<Vec<u8>, WireError> {
        let mut out = Vec::with_capacity(64);
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        match self {
            Message::Hello {
                upgrade,
                parent_pid,
                generation,
                listeners,
                elders,
                state,
            } => {
                out.push(KIND_HELLO);
                out.extend_from_slice(&upgrade.0.to_le_bytes());
                out.extend_from_slice(&parent_pid.to_le_bytes());
                out.extend_from_slice(&generation.to_le_bytes());
                if listeners.len() > MAX_LISTENERS {
                    return Err(WireError::TooLarge("listener count"));
                }
                out.extend_from_slice(&(listeners.len() as u16).to_le_bytes());
                for l in listeners {
                    put_str(&mut out, &l.name, MAX_NAME_LEN, "listener name")?;
                    out.push(l.kind as u8);
                    put_str(&mut out, &l.address, MAX_ADDR_LEN, "listener address")?;
                }
                if listeners.len() + *elders as usize > MAX_LISTENERS {
                    return Err(WireError::TooLarge("fd count"));
                }
                out.extend_from_slice(&elders.to_le_bytes());
                if state.len() > MAX_STATE_LEN {
                    return Err(WireError::TooLarge("state blob"));
                }
                out.extend_from_slice(&(state.len() as u32).to_le_bytes());
                out.extend_from_slice(state);
            }
            Message::Ready(id) => {
                out.push(KIND_READY);
                out.extend_from_slice(&id.0.to_le_bytes());
            }
            Message::Retiring(id) => {
                out.push(KIND_RETIRING);
                out.extend_from_slice(&id.0.to_le_bytes());
            }
            Message::Released(id) => {
                out.push(KIND_RELEASED);
                out.extend_from_slice(&id.0.to_le_bytes());
            }
            Message::Serving(id) => {
                out.push(KIND_SERVING);
                out.extend_from_slice(&id.0.to_le_bytes());
            }
        }
        Ok(out)
    }

    /// Decodes one whole message.
    pub(crate) fn decode(bytes: &[u8]) -> Result<Message, WireError> {
        let mut r = Reader(bytes);
        if r.take(4)? != MAGIC {
            return Err(WireError::BadMagic);
        }
        let version = r.u8()?;
        if version != VERSION {
            return Err(WireError::Version(version));
        }
        let msg = match r.u8()? {
            KIND_HELLO => {
                let upgrade = UpgradeId(r.u64()?);
                let parent_pid = r.u32()?;
                let generation = r.u32()?;
                let count = r.u16()? as usize;
                if count > MAX_LISTENERS {
                    return Err(WireError::TooLarge("listener count"));
                }
                let mut listeners = Vec::with_capacity(count);
                for _ in 0..count {
                    let name = r.str(MAX_NAME_LEN, "listener name")?;
                    let kind = r.u8()?;
                    let kind = SocketKind::from_u8(kind).ok_or(WireError::SocketKind(kind))?;
                    let address = r.str(MAX_ADDR_LEN, "listener address")?;
                    listeners.push(ListenerRecord {
                        name,
                        kind,
                        address,
                    });
                }
                let elders = r.u16()?;
                if count + elders as usize > MAX_LISTENERS {
                    return Err(WireError::TooLarge("fd count"));
                }
                let state_len = r.u32()? as usize;
                if state_len > MAX_STATE_LEN {
                    return Err(WireError::TooLarge("state blob"));
                }
                let state = r.take(state_len)?.to_vec();
                Message::Hello {
                    upgrade,
                    parent_pid,
                    generation,
                    listeners,
                    elders,
                    state,
                }
            }
            KIND_READY => Message::Ready(UpgradeId(r.u64()?)),
            KIND_RETIRING => Message::Retiring(UpgradeId(r.u64()?)),
            KIND_RELEASED => Message::Released(UpgradeId(r.u64()?)),
            KIND_SERVING => Message::Serving(UpgradeId(r.u64()?)),
            other => return Err(WireError::Kind(other)),
        };
        if !r.0.is_empty() {
            return Err(WireError::Trailing(r.0.len()));
        }
        Ok(msg)
    }
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn hello() -> Message {
        Message::Hello {
            upgrade: UpgradeId(0xdead_beef_0000_0001),
            parent_pid: 4242,
            generation: 7,
            listeners: vec![
                ListenerRecord {
                    name: "main".into(),
                    kind: SocketKind::Tcp,
                    address: "127.0.0.1:8080".into(),
                },
                ListenerRecord {
                    name: "admin".into(),
                    kind: SocketKind::Tcp,
                    address: "[::1]:9090".into(),
                },
            ],
            elders: 2,
            state: b"ticket keys".to_vec(),
        }
    }

    #[test]
    fn every_message_round_trips() {
        for m in [
            hello(),
            Message::Ready(UpgradeId(7)),
            Message::Retiring(UpgradeId(u64::MAX)),
            Message::Released(UpgradeId(3)),
            Message::Serving(UpgradeId(9)),
        ] {
            assert_eq!(Message::decode(&m.encode().unwrap()).unwrap(), m);
        }
    }

    #[test]
    fn every_prefix_of_a_message_is_truncated() {
        let bytes = hello().encode().unwrap();
        for n in 0..bytes.len() {
            let err = Message::decode(&bytes[..n]).unwrap_err();
            assert!(
                matches!(err, WireError::Truncated | WireError::BadMagic),
                "prefix {n}: {err:?}"
            );
        }
    }

    #[test]
    fn header_errors_are_named() {
        let mut bytes = Message::Ready(UpgradeId(1)).encode().unwrap();
        bytes[4] = 9;
        assert_eq!(Message::decode(&bytes), Err(WireError::Version(9)));
        bytes[4] = VERSION;
        bytes[5] = 77;
        assert_eq!(Message::decode(&bytes), Err(WireError::Kind(77)));
        bytes[0] = b'X';
        assert_eq!(Message::decode(&bytes), Err(WireError::BadMagic));
        let mut long = Message::Ready(UpgradeId(1)).encode().unwrap();
        long.push(0);
        assert_eq!(Message::decode(&long), Err(WireError::Trailing(1)));
    }

    #[test]
    fn bounds_are_enforced_on_both_sides() {
        let mut m = hello();
        if let Message::Hello { state, .. } = &mut m {
            *state = vec![0; MAX_STATE_LEN + 1];
        }
        assert_eq!(m.encode(), Err(WireError::TooLarge("state blob")));
        // A forged listener count above the limit is refused before any allocation.
        let mut bytes = hello().encode().unwrap();
        bytes[22..24].copy_from_slice(&1000u16.to_le_bytes());
        assert_eq!(
            Message::decode(&bytes),
            Err(WireError::TooLarge("listener count"))
        );
        // The largest HELLO the bounds allow fits the receive buffer.
        assert!(largest_hello().encode().unwrap().len() <= MAX_MESSAGE_LEN);
    }

    fn record() -> impl Strategy<Value = ListenerRecord> {
        ("[a-z0-9_.-]{0,40}", "[ -~]{0,80}").prop_map(|(name, address)| ListenerRecord {
            name,
            kind: SocketKind::Tcp,
            address,
        })
    }

    fn message() -> impl Strategy<Value = Message> {
        prop_oneof![
            (
                any::<u64>(),
                any::<u32>(),
                proptest::collection::vec(record(), 0..8),
                proptest::collection::vec(any::<u8>(), 0..256)
            )
                .prop_map(|(id, pid, listeners, state)| Message::Hello {
                    upgrade: UpgradeId(id),
                    parent_pid: pid,
                    generation: pid.rotate_left(7),
                    elders: listeners.len() as u16 % 3,
                    listeners,
                    state
                }),
            any::<u64>().prop_map(|id| Message::Ready(UpgradeId(id))),
            any::<u64>().prop_map(|id| Message::Retiring(UpgradeId(id))),
            any::<u64>().prop_map(|id| Message::Released(UpgradeId(id))),
            any::<u64>().prop_map(|id| Message::Serving(UpgradeId(id))),
        ]
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = Message::decode(&bytes);
        }

        #[test]
        fn arbitrary_bytes_after_a_valid_header_never_panic(
            kind in 0u8..5,
            body in proptest::collection::vec(any::<u8>(), 0..512),
        ) {
            let mut bytes = MAGIC.to_vec();
            bytes.push(VERSION);
            bytes.push(kind);
            bytes.extend_from_slice(&body);
            let _ = Message::decode(&bytes);
        }

        #[test]
        fn whatever_decodes_reencodes_to_the_same_bytes(
            m in message(),
            at in any::<prop::sample::Index>(),
            to in any::<u8>(),
        ) {
            // Mutations of valid messages reach far more of the decoder than random bytes.
            let mut bytes = m.encode().unwrap();
            let i = at.index(bytes.len());
            bytes[i] = to;
            crate::__fuzz::decode_and_reencode(&bytes);
        }

        #[test]
        fn encode_then_decode_is_identity(m in message()) {
            prop_assert_eq!(Message::decode(&m.encode().unwrap()).unwrap(), m);
        }

        #[test]
        fn flipping_a_byte_never_panics(m in message(), at in any::<prop::sample::Index>(), to in any::<u8>()) {
            let mut bytes = m.encode().unwrap();
            let i = at.index(bytes.len());
            bytes[i] = to;
            let _ = Message::decode(&bytes);
        }
    }
}
