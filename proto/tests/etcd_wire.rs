//! Pins the wire encoding of the etcd messages kvfeed serves (PD's
//! embedded etcd range reads) and the benchmarks exchange with a real etcd.
//!
//! As in `wire.rs`, every expected byte string is written out by hand from
//! etcd's field numbers, not produced by the encoder under test: tag =
//! (field_number << 3) | wire_type, wire type 0 = varint, 2 = length
//! delimited; fields holding their default value are not written.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test fails by panicking

use std::fmt::Debug;

use kvfeed_proto::etcdserverpb::watch_request::RequestUnion;
use kvfeed_proto::{etcdserverpb, mvccpb};
use prost::Message;

/// Asserts that `msg` encodes to exactly `expected` and that `expected`
/// decodes back to `msg`.
fn assert_wire<M>(msg: &M, expected: &[u8]) -> Result<(), prost::DecodeError>
where
    M: Message + Default + PartialEq + Debug,
{
    assert_eq!(msg.encode_to_vec(), expected, "encoding of {msg:?}");
    assert_eq!(msg.encoded_len(), expected.len(), "encoded_len of {msg:?}");
    assert_eq!(&M::decode(expected)?, msg, "decoding of {expected:02x?}");
    Ok(())
}

#[test]
fn watch_create_request() -> Result<(), prost::DecodeError> {
    let request = etcdserverpb::WatchRequest {
        request_union: Some(RequestUnion::CreateRequest(
            etcdserverpb::WatchCreateRequest {
                key: b"a/".to_vec(),
                range_end: b"a0".to_vec(),
                start_revision: 300,
                progress_notify: true,
                prev_kv: true,
                watch_id: 5,
            },
        )),
    };
    #[rustfmt::skip]
    let expected: &[u8] = &[
        // 1 create_request, (1 << 3) | 2 = 0x0a, 17 bytes:
        0x0a, 0x11,
        //   1 key = "a/": 0x0a
        0x0a, 0x02, b'a', b'/',
        //   2 range_end = "a0": (2 << 3) | 2 = 0x12
        0x12, 0x02, b'a', b'0',
        //   3 start_revision = 300 = 0b10_0101100: (3 << 3) | 0 = 0x18,
        //     varint 0x2c | 0x80, 0x02
        0x18, 0xac, 0x02,
        //   4 progress_notify = true: 0x20
        0x20, 0x01,
        //   6 prev_kv = true: (6 << 3) | 0 = 0x30
        0x30, 0x01,
        //   7 watch_id = 5: (7 << 3) | 0 = 0x38
        0x38, 0x05,
    ];
    assert_wire(&request, expected)
}

#[test]
fn watch_cancel_and_progress_requests() -> Result<(), prost::DecodeError> {
    let cancel = etcdserverpb::WatchRequest {
        request_union: Some(RequestUnion::CancelRequest(
            etcdserverpb::WatchCancelRequest { watch_id: 2 },
        )),
    };
    // 2 cancel_request, (2 << 3) | 2 = 0x12, 2 bytes: 1 watch_id = 2.
    assert_wire(&cancel, &[0x12, 0x02, 0x08, 0x02])?;
    let progress = etcdserverpb::WatchRequest {
        request_union: Some(RequestUnion::ProgressRequest(
            etcdserverpb::WatchProgressRequest {},
        )),
    };
    // 3 progress_request, (3 << 3) | 2 = 0x1a, empty.
    assert_wire(&progress, &[0x1a, 0x00])
}

#[test]
fn watch_response_with_events() -> Result<(), prost::DecodeError> {
    let kv = |key: &[u8], value: &[u8]| mvccpb::KeyValue {
        key: key.to_vec(),
        create_revision: 7,
        mod_revision: 7,
        version: 1,
        value: value.to_vec(),
        lease: 0,
    };
    let response = etcdserverpb::WatchResponse {
        header: Some(etcdserverpb::ResponseHeader {
            cluster_id: 1,
            member_id: 2,
            revision: 7,
            raft_term: 3,
        }),
        watch_id: 0,
        created: false,
        canceled: false,
        compact_revision: 0,
        cancel_reason: String::new(),
        events: vec![
            mvccpb::Event {
                r#type: mvccpb::event::EventType::Put.into(),
                kv: Some(kv(b"k", b"v")),
                prev_kv: None,
            },
            mvccpb::Event {
                r#type: mvccpb::event::EventType::Delete.into(),
                kv: Some(kv(b"k", b"")),
                prev_kv: None,
            },
        ],
    };
    #[rustfmt::skip]
    let expected: &[u8] = &[
        // 1 header, 8 bytes: cluster_id 1, member_id 2, revision 7, raft_term 3
        0x0a, 0x08, 0x08, 0x01, 0x10, 0x02, 0x18, 0x07, 0x20, 0x03,
        // (watch_id 0, created and canceled false: not written)
        // 11 events, (11 << 3) | 2 = 0x5a, 14 bytes:
        0x5a, 0x0e,
        //   (1 type = PUT, the default: not written)
        //   2 kv, 0x12, 12 bytes:
        0x12, 0x0c,
        //     1 key "k", 2 create_revision 7, 3 mod_revision 7, 4 version 1,
        //     5 value "v": (5 << 3) | 2 = 0x2a
        0x0a, 0x01, b'k', 0x10, 0x07, 0x18, 0x07, 0x20, 0x01, 0x2a, 0x01, b'v',
        // 11 events, the DELETE, 13 bytes:
        0x5a, 0x0d,
        //   1 type = DELETE (1): 0x08
        0x08, 0x01,
        //   2 kv, 9 bytes (no value)
        0x12, 0x09,
        0x0a, 0x01, b'k', 0x10, 0x07, 0x18, 0x07, 0x20, 0x01,
    ];
    assert_wire(&response, expected)
}

#[test]
fn watch_response_created_and_canceled() -> Result<(), prost::DecodeError> {
    let created = etcdserverpb::WatchResponse {
        watch_id: 4,
        created: true,
        ..Default::default()
    };
    // 2 watch_id = 4: 0x10; 3 created = true: 0x18.
    assert_wire(&created, &[0x10, 0x04, 0x18, 0x01])?;
    let canceled = etcdserverpb::WatchResponse {
        watch_id: 3,
        canceled: true,
        compact_revision: 2,
        cancel_reason: "x".to_owned(),
        ..Default::default()
    };
    #[rustfmt::skip]
    let expected: &[u8] = &[
        // 2 watch_id 3, 4 canceled (0x20), 5 compact_revision 2 (0x28),
        // 6 cancel_reason "x": (6 << 3) | 2 = 0x32
        0x10, 0x03, 0x20, 0x01, 0x28, 0x02, 0x32, 0x01, b'x',
    ];
    assert_wire(&canceled, expected)
}

#[test]
fn put_request_and_response() -> Result<(), prost::DecodeError> {
    let request = etcdserverpb::PutRequest {
        key: b"k".to_vec(),
        value: b"v".to_vec(),
    };
    // 1 key "k", 2 value "v".
    assert_wire(&request, &[0x0a, 0x01, b'k', 0x12, 0x01, b'v'])?;
    let response = etcdserverpb::PutResponse {
        header: Some(etcdserverpb::ResponseHeader {
            revision: 9,
            ..Default::default()
        }),
        prev_kv: None,
    };
    // 1 header, 2 bytes: 3 revision = 9.
    assert_wire(&response, &[0x0a, 0x02, 0x18, 0x09])
}

#[test]
fn range_request_and_response() -> Result<(), prost::DecodeError> {
    let request = etcdserverpb::RangeRequest {
        key: b"a".to_vec(),
        range_end: b"b".to_vec(),
        limit: 2,
        keys_only: true,
        count_only: true,
    };
    #[rustfmt::skip]
    let expected: &[u8] = &[
        // 1 key "a", 2 range_end "b"
        0x0a, 0x01, b'a', 0x12, 0x01, b'b',
        // 3 limit = 2: (3 << 3) | 0 = 0x18
        0x18, 0x02,
        // 8 keys_only: (8 << 3) | 0 = 0x40; 9 count_only: 0x48
        0x40, 0x01, 0x48, 0x01,
    ];
    assert_wire(&request, expected)?;
    let response = etcdserverpb::RangeResponse {
        header: Some(etcdserverpb::ResponseHeader {
            cluster_id: 1,
            member_id: 2,
            revision: 3,
            raft_term: 4,
        }),
        kvs: vec![mvccpb::KeyValue {
            key: b"k".to_vec(),
            value: b"7".to_vec(),
            ..Default::default()
        }],
        more: true,
        count: 5,
    };
    #[rustfmt::skip]
    let expected: &[u8] = &[
        // 1 header, 8 bytes: 1 cluster_id 1, 2 member_id 2, 3 revision 3,
        // 4 raft_term 4
        0x0a, 0x08, 0x08, 0x01, 0x10, 0x02, 0x18, 0x03, 0x20, 0x04,
        // 2 kvs, 6 bytes: 1 key "k", 5 value "7" ((5 << 3) | 2 = 0x2a)
        0x12, 0x06, 0x0a, 0x01, b'k', 0x2a, 0x01, b'7',
        // 3 more: 0x18; 4 count = 5: 0x20
        0x18, 0x01, 0x20, 0x05,
    ];
    assert_wire(&response, expected)
}
