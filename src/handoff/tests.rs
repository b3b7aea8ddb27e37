use super::*;
use proptest::prelude::*;

fn hello() -> Message {
    Message::Hello {
        version: 1,
        upgrade: UpgradeId(0xdead_beef_0000_0001),
        parent_pid: 4242,
        generation: 7,
        fds: 3,
        state_len: 11,
        records: vec![ListenerRecord {
            name: "main".into(),
            kind: SocketKind::Tcp,
            address: "127.0.0.1:8080".into(),
        }],
        state: b"ticket".to_vec(),
        extensions: vec![],
    }
}

fn fds() -> Message {
    Message::Fds {
        version: 1,
        records: vec![
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
            ListenerRecord {
                name: String::new(),
                kind: SocketKind::Elder,
                address: String::new(),
            },
        ],
    }
}

/// The largest message the bounds allow: an OFFER carrying a HELLO with every record at its
/// longest and a whole state chunk.
pub(crate) fn largest_message() -> Message {
    let hello = Message::Hello {
        version: u8::MAX,
        upgrade: UpgradeId(1),
        parent_pid: 1,
        generation: u32::MAX,
        fds: MAX_LISTENERS as u32,
        state_len: u64::MAX,
        records: largest_records(),
        state: vec![1; STATE_CHUNK],
        extensions: vec![],
    };
    Message::Offer {
        versions: ProtocolVersions { min: 1, max: 255 },
        hello: hello.encode().unwrap(),
    }
}

fn largest_records() -> Vec<ListenerRecord> {
    vec![
        ListenerRecord {
            name: "n".repeat(MAX_NAME_LEN),
            kind: SocketKind::Tcp,
            address: "a".repeat(MAX_ADDR_LEN),
        };
        MAX_FDS_PER_MESSAGE
    ]
}

fn offer(min: u8, max: u8) -> Message {
    Message::Offer {
        versions: ProtocolVersions { min, max },
        hello: vec![],
    }
}

#[test]
fn every_message_round_trips() {
    for m in [
        offer(1, 3),
        Message::Offer {
            versions: ProtocolVersions { min: 1, max: 1 },
            hello: hello().encode().unwrap(),
        },
        Message::Accept(2),
        Message::Refuse(ProtocolVersions { min: 4, max: 9 }),
        hello(),
        fds(),
        Message::State {
            version: 1,
            chunk: b"ticket keys".to_vec(),
        },
        Message::Ready(UpgradeId(7)),
        Message::Retiring(UpgradeId(u64::MAX)),
        Message::Released(UpgradeId(3)),
        Message::Serving(UpgradeId(9)),
    ] {
        assert_eq!(Message::decode(&m.encode().unwrap()).unwrap(), m);
    }
}

/// The preamble's layout is fixed for every future version: `RFLP`, 0, kind, then the range.
/// What follows an OFFER's range is its HELLO in the newest version, opaque to a receiver that
/// does not speak it.
#[test]
fn the_preamble_is_fixed_and_an_offers_hello_is_opaque() {
    assert_eq!(offer(1, 2).encode().unwrap(), b"RFLP\x00\x01\x01\x02");
    assert_eq!(Message::Accept(2).encode().unwrap(), b"RFLP\x00\x02\x02");
    assert_eq!(
        Message::Refuse(ProtocolVersions { min: 3, max: 3 })
            .encode()
            .unwrap(),
        b"RFLP\x00\x03\x03\x03"
    );
    let mut from_the_future = b"RFLP\x00\x01\x02\x07".to_vec();
    from_the_future.extend_from_slice(b"RFLP\x07 a HELLO of version 7");
    let Message::Offer { versions, hello } = Message::decode(&from_the_future).unwrap() else {
        panic!("not an OFFER")
    };
    assert_eq!(versions, ProtocolVersions { min: 2, max: 7 });
    assert!(Message::decode(&hello).is_err(), "version 7 is not ours");
}

#[test]
fn a_hello_with_unknown_extensions_decodes() {
    let Message::Hello {
        version,
        upgrade,
        parent_pid,
        generation,
        fds,
        state_len,
        records,
        state,
        ..
    } = hello()
    else {
        unreachable!()
    };
    let m = Message::Hello {
        version,
        upgrade,
        parent_pid,
        generation,
        fds,
        state_len,
        records,
        state,
        extensions: vec![
            Extension {
                kind: 250,
                value: b"a field of a later release".to_vec(),
            },
            Extension {
                kind: 1,
                value: vec![],
            },
        ],
    };
    assert_eq!(Message::decode(&m.encode().unwrap()).unwrap(), m);
}

#[test]
fn every_prefix_of_a_message_is_truncated() {
    for m in [hello(), fds(), offer(1, 1), Message::Ready(UpgradeId(1))] {
        let bytes = m.encode().unwrap();
        for n in 0..bytes.len() {
            // A prefix of a HELLO that ends between extensions is a shorter valid HELLO only
            // if it has extensions; these have none, so every prefix is refused.
            let err = Message::decode(&bytes[..n]).unwrap_err();
            assert!(
                matches!(err, WireError::Truncated | WireError::BadMagic),
                "{m:?} prefix {n}: {err:?}"
            );
        }
    }
}

#[test]
fn header_errors_are_named() {
    let mut bytes = Message::Ready(UpgradeId(1)).encode().unwrap();
    bytes[4] = 9;
    assert_eq!(Message::decode(&bytes), Err(WireError::Version(9)));
    // Version 0 is the preamble's: READY's kind number is ACCEPT's there (and takes one byte).
    bytes[4] = 0;
    assert_eq!(Message::decode(&bytes), Err(WireError::Trailing(7)));
    bytes[4] = 1;
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
    let m = Message::State {
        version: 1,
        chunk: vec![0; STATE_CHUNK + 1],
    };
    assert_eq!(m.encode(), Err(WireError::TooLarge("state chunk")));
    let records = largest_records();
    let mut more = records.clone();
    more.push(records[0].clone());
    assert_eq!(
        Message::Fds {
            version: 1,
            records: more
        }
        .encode(),
        Err(WireError::TooLarge("fds in one message"))
    );
    // A forged record count above the limit is refused before any allocation.
    let mut bytes = fds().encode().unwrap();
    bytes[6..8].copy_from_slice(&1000u16.to_le_bytes());
    assert_eq!(
        Message::decode(&bytes),
        Err(WireError::TooLarge("fds in one message"))
    );
    // The largest message the bounds allow fits the receive buffer.
    assert!(largest_message().encode().unwrap().len() <= MAX_MESSAGE_LEN);
}

#[test]
fn the_state_header_is_a_state_message_header() {
    let mut bytes = state_header(3).to_vec();
    bytes.extend_from_slice(b"abc");
    assert_eq!(
        Message::decode(&bytes).unwrap(),
        Message::State {
            version: 3,
            chunk: b"abc".to_vec()
        }
    );
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
        (1u8..4, any::<u64>(), any::<u32>(), any::<u64>()).prop_map(|(v, id, pid, len)| {
            Message::Hello {
                version: v,
                upgrade: UpgradeId(id),
                parent_pid: pid,
                generation: pid.rotate_left(7),
                fds: pid % 20_000,
                state_len: len,
                records: vec![],
                state: vec![v; v as usize * 3],
                extensions: vec![Extension {
                    kind: v,
                    value: vec![v; v as usize],
                }],
            }
        }),
        proptest::collection::vec(record(), 0..8).prop_map(|records| Message::Fds {
            version: 1,
            records
        }),
        proptest::collection::vec(any::<u8>(), 0..256)
            .prop_map(|chunk| Message::State { version: 2, chunk }),
        (1u8..9, 1u8..9).prop_map(|(a, b)| offer(a.min(b), a.max(b))),
        proptest::collection::vec(record(), 0..4).prop_map(|records| Message::Offer {
            versions: ProtocolVersions { min: 1, max: 1 },
            hello: Message::Fds {
                version: 1,
                records
            }
            .encode()
            .unwrap(),
        }),
        any::<u8>().prop_map(Message::Accept),
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
        version in 0u8..3,
        kind in 0u8..9,
        body in proptest::collection::vec(any::<u8>(), 0..512),
    ) {
        let mut bytes = MAGIC.to_vec();
        bytes.push(version);
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
}

/// A record of a kind a later release added decodes (its fd is then closed by `boot`, like a
/// listener this binary does not use), and encodes back to the same bytes.
#[test]
fn a_record_of_an_unknown_kind_is_kept_not_refused() {
    let m = Message::Fds {
        version: 1,
        records: vec![ListenerRecord {
            name: "from-the-future".into(),
            kind: SocketKind::Unknown(200),
            address: "sctp://x".into(),
        }],
    };
    let bytes = m.encode().unwrap();
    assert_eq!(Message::decode(&bytes).unwrap(), m);
}
