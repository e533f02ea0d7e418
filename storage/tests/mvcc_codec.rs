//! Property tests of the MVCC codecs: the memcomparable key encoding and the
//! lock / write record formats.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test fails by panicking

use kvfeed_storage::engine::{Cf, Mutation, Op};
use kvfeed_storage::mvcc::{
    Key, Lock, LockType, MvccChange, Write, WriteType, decode_bytes, decode_change, encode_bytes,
    key::split_versioned,
};
use kvfeed_storage::{Error, TimeStamp};
use proptest::prelude::*;

fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    // Bias toward the bytes that matter to the encoding (0x00 padding, 0xFF
    // markers) so that boundary cases are common.
    prop::collection::vec(
        prop_oneof![Just(0u8), Just(0xFFu8), Just(0xF7u8), any::<u8>()],
        0..max,
    )
}

fn lock_type() -> impl Strategy<Value = LockType> {
    prop_oneof![
        Just(LockType::Put),
        Just(LockType::Delete),
        Just(LockType::Lock),
        Just(LockType::Pessimistic),
    ]
}

fn write_type() -> impl Strategy<Value = WriteType> {
    prop_oneof![
        Just(WriteType::Put),
        Just(WriteType::Delete),
        Just(WriteType::Lock),
        Just(WriteType::Rollback),
    ]
}

fn lock() -> impl Strategy<Value = Lock> {
    (
        (lock_type(), bytes(40), any::<u64>(), any::<u64>()),
        (proptest::option::of(bytes(300)), any::<u64>(), any::<u64>()),
        (any::<u64>(), any::<u64>(), any::<bool>()),
        prop::collection::vec(bytes(20), 0..4),
    )
        .prop_map(
            |((t, primary, start, ttl), (sv, fu, mc), (size, source, is_async), secs)| {
                let mut l = Lock::new(t, primary, TimeStamp::new(start), ttl);
                l.short_value = sv;
                l.for_update_ts = TimeStamp::new(fu);
                l.min_commit_ts = TimeStamp::new(mc);
                l.txn_size = size;
                l.txn_source = source;
                l.use_async_commit = is_async;
                // Secondaries are only stored for async-commit locks.
                l.secondaries = if is_async { secs } else { Vec::new() };
                l
            },
        )
}

fn write() -> impl Strategy<Value = Write> {
    (
        write_type(),
        any::<u64>(),
        proptest::option::of(bytes(300)),
        any::<u64>(),
        any::<bool>(),
    )
        .prop_map(|(t, start, sv, source, overlapped)| {
            let mut w = Write::new(t, TimeStamp::new(start), sv);
            w.txn_source = source;
            w.has_overlapped_rollback = overlapped;
            w
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn key_round_trips(k in bytes(64)) {
        let enc = encode_bytes(&k);
        prop_assert_eq!(decode_bytes(&enc).ok(), Some((k.clone(), enc.len())));
        prop_assert_eq!(enc.len() % 9, 0);
        prop_assert_eq!(Key::from_encoded(enc).and_then(|key| key.to_raw()).ok(), Some(k));
    }

    #[test]
    fn key_order_preserved(a in bytes(40), b in bytes(40)) {
        prop_assert_eq!(a.cmp(&b), encode_bytes(&a).cmp(&encode_bytes(&b)));
    }

    #[test]
    fn versioned_keys_order_by_user_key_then_newest(
        a in bytes(24), b in bytes(24), ta in any::<u64>(), tb in any::<u64>()
    ) {
        let va = Key::from_raw(&a).append_ts(TimeStamp::new(ta));
        let vb = Key::from_raw(&b).append_ts(TimeStamp::new(tb));
        let expected = a.cmp(&b).then(tb.cmp(&ta));
        prop_assert_eq!(va.cmp(&vb), expected);
        let (k, ts) = split_versioned(&va, kvfeed_storage::engine::Cf::Write).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(k, Key::from_raw(&a));
        prop_assert_eq!(ts, TimeStamp::new(ta));
    }

    #[test]
    fn decode_arbitrary_bytes_never_panics(input in bytes(64)) {
        match decode_bytes(&input) {
            // Whatever decodes must be the canonical encoding of its result.
            Ok((k, used)) => prop_assert_eq!(&encode_bytes(&k)[..], &input[..used]),
            Err(e) => prop_assert!(matches!(e, Error::InvalidInput(_))),
        }
    }

    #[test]
    fn lock_round_trips(l in lock()) {
        prop_assert_eq!(Lock::from_bytes(&l.to_bytes()).ok(), Some(l));
    }

    #[test]
    fn write_round_trips(w in write()) {
        prop_assert_eq!(Write::from_bytes(&w.to_bytes()).ok(), Some(w));
    }

    #[test]
    fn record_decoders_never_panic(input in bytes(80)) {
        if let Err(e) = Lock::from_bytes(&input) {
            prop_assert!(matches!(e, Error::Corrupt { .. }), "unexpected error {}", e);
        }
        if let Err(e) = Write::from_bytes(&input) {
            prop_assert!(matches!(e, Error::Corrupt { .. }), "unexpected error {}", e);
        }
    }

    #[test]
    fn mangled_records_never_panic(l in lock(), w in write(), pos in any::<usize>(), byte in any::<u8>(), cut in any::<usize>()) {
        for mut enc in [l.to_bytes(), w.to_bytes()] {
            let i = pos % enc.len();
            enc[i] = byte;
            let _ = Lock::from_bytes(&enc);
            let _ = Write::from_bytes(&enc);
            enc.truncate(cut % (enc.len() + 1));
            let _ = Lock::from_bytes(&enc);
            let _ = Write::from_bytes(&enc);
        }
    }

    #[test]
    fn decode_change_never_panics(key in bytes(40), value in bytes(40), cf in 0usize..5, delete in any::<bool>()) {
        let cf = Cf::ALL[cf];
        let op = if delete { Op::Delete } else { Op::Put(value) };
        let _ = decode_change(&Mutation { cf, key, op });
    }
}

#[test]
fn decode_change_decodes_each_family() -> Result<(), Error> {
    let key = Key::from_raw(b"user");
    let lock = Lock::new(LockType::Put, b"user".to_vec(), TimeStamp::new(5), 10);
    let write = Write::new(WriteType::Put, TimeStamp::new(5), Some(b"v".to_vec()));
    let cases = [
        (
            Mutation {
                cf: Cf::Lock,
                key: key.as_encoded().to_vec(),
                op: Op::Put(lock.to_bytes()),
            },
            Some(MvccChange::LockPut {
                key: b"user".to_vec(),
                lock: lock.clone(),
            }),
        ),
        (
            Mutation {
                cf: Cf::Lock,
                key: key.as_encoded().to_vec(),
                op: Op::Delete,
            },
            Some(MvccChange::LockDeleted {
                key: b"user".to_vec(),
            }),
        ),
        (
            Mutation {
                cf: Cf::Write,
                key: key.append_ts(TimeStamp::new(9)),
                op: Op::Put(write.to_bytes()),
            },
            Some(MvccChange::WritePut {
                key: b"user".to_vec(),
                commit_ts: TimeStamp::new(9),
                write: write.clone(),
            }),
        ),
        (
            Mutation {
                cf: Cf::Write,
                key: key.append_ts(TimeStamp::new(9)),
                op: Op::Delete,
            },
            Some(MvccChange::WriteDeleted {
                key: b"user".to_vec(),
                commit_ts: TimeStamp::new(9),
            }),
        ),
        (
            Mutation {
                cf: Cf::Default,
                key: key.append_ts(TimeStamp::new(5)),
                op: Op::Put(b"big".to_vec()),
            },
            Some(MvccChange::DefaultPut {
                key: b"user".to_vec(),
                start_ts: TimeStamp::new(5),
                value: b"big".to_vec(),
            }),
        ),
        (
            Mutation {
                cf: Cf::Default,
                key: key.append_ts(TimeStamp::new(5)),
                op: Op::Delete,
            },
            Some(MvccChange::DefaultDeleted {
                key: b"user".to_vec(),
                start_ts: TimeStamp::new(5),
            }),
        ),
        (
            Mutation {
                cf: Cf::Raw,
                key: b"raw".to_vec(),
                op: Op::Delete,
            },
            None,
        ),
    ];
    for (m, expected) in cases {
        assert_eq!(decode_change(&m)?, expected, "{m:?}");
    }
    // Garbage in a transactional family is corruption, not a panic or a skip.
    let bad = Mutation {
        cf: Cf::Lock,
        key: b"not encoded".to_vec(),
        op: Op::Delete,
    };
    assert!(matches!(decode_change(&bad), Err(Error::Corrupt { .. })));
    let bad = Mutation {
        cf: Cf::Write,
        key: key.append_ts(TimeStamp::new(1)),
        op: Op::Put(vec![9, 9]),
    };
    assert!(matches!(decode_change(&bad), Err(Error::Corrupt { .. })));
    Ok(())
}
