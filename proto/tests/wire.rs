//! Pins the wire encoding of the messages kvfeed exchanges with real clients.
//!
//! Every expected byte string below is written out by hand from the field
//! numbers in the `.proto` files, not produced by the encoder under test: a
//! renumbered field, a changed type or a misplaced oneof fails here even if
//! encode and decode still agree with each other.
//!
//! Reading the vectors: each field starts with a tag byte (or two), tag =
//! (field_number << 3) | wire_type, wire type 0 = varint, 2 = length
//! delimited. Varints carry 7 bits per byte, least significant group first,
//! with the high bit set on every byte but the last. Fields holding their
//! default value (0, empty, first enum value) are not written.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test fails by panicking

use std::fmt::Debug;

use kvfeed_proto::{cdcpb, errorpb, kvrpcpb, metapb, pdpb};
use prost::Message;

/// Timestamps used below: physical 1 ms, logical 1, 2 and 5, that is
/// (1 << 18) | logical. 262_149 = 0x4_0005 splits into the 7-bit groups
/// 0x05, 0x00, 0x10, so its varint is 85 80 10.
const TS_START: u64 = (1 << 18) | 1; // varint 81 80 10
const TS_COMMIT: u64 = (1 << 18) | 2; // varint 82 80 10
const TS_CHECKPOINT: u64 = (1 << 18) | 5; // varint 85 80 10

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
fn change_data_request_register() -> Result<(), prost::DecodeError> {
    let request = cdcpb::ChangeDataRequest {
        header: Some(cdcpb::Header {
            cluster_id: 7,
            ticdc_version: "8.1.0".to_owned(),
        }),
        region_id: 3,
        region_epoch: Some(metapb::RegionEpoch {
            conf_ver: 1,
            version: 5,
        }),
        checkpoint_ts: TS_CHECKPOINT,
        start_key: b"a".to_vec(),
        end_key: b"z".to_vec(),
        request_id: 9,
        extra_op: kvrpcpb::ExtraOp::ReadOldValue.into(),
        request: Some(cdcpb::change_data_request::Request::Register(
            cdcpb::change_data_request::Register {},
        )),
        kv_api: cdcpb::change_data_request::KvApi::TxnKv.into(),
        filter_loop: true,
        scan_priority: cdcpb::ScanPriority::High.into(),
    };
    #[rustfmt::skip]
    let expected: &[u8] = &[
        // 1 header, (1 << 3) | 2 = 0x0a, 9 bytes:
        0x0a, 0x09,
        //   1 cluster_id = 7: (1 << 3) | 0 = 0x08
        0x08, 0x07,
        //   2 ticdc_version = "8.1.0": (2 << 3) | 2 = 0x12, 5 bytes
        0x12, 0x05, b'8', b'.', b'1', b'.', b'0',
        // 2 region_id = 3: (2 << 3) | 0 = 0x10
        0x10, 0x03,
        // 3 region_epoch, (3 << 3) | 2 = 0x1a, 4 bytes:
        0x1a, 0x04,
        //   1 conf_ver = 1, 2 version = 5
        0x08, 0x01, 0x10, 0x05,
        // 4 checkpoint_ts: (4 << 3) | 0 = 0x20
        0x20, 0x85, 0x80, 0x10,
        // 5 start_key = "a": (5 << 3) | 2 = 0x2a
        0x2a, 0x01, b'a',
        // 6 end_key = "z": (6 << 3) | 2 = 0x32
        0x32, 0x01, b'z',
        // 7 request_id = 9: (7 << 3) | 0 = 0x38
        0x38, 0x09,
        // 8 extra_op = ReadOldValue (1): (8 << 3) | 0 = 0x40
        0x40, 0x01,
        // 9 register = {} (oneof request): (9 << 3) | 2 = 0x4a, 0 bytes
        0x4a, 0x00,
        // 11 kv_api = TxnKV (2): (11 << 3) | 0 = 0x58
        0x58, 0x02,
        // 12 filter_loop = true: (12 << 3) | 0 = 0x60
        0x60, 0x01,
        // 14 scan_priority = HIGH (2): (14 << 3) | 0 = 0x70
        0x70, 0x02,
    ];
    assert_wire(&request, expected)
}

#[test]
fn change_data_request_deregister() -> Result<(), prost::DecodeError> {
    let request = cdcpb::ChangeDataRequest {
        request_id: 9,
        request: Some(cdcpb::change_data_request::Request::Deregister(
            cdcpb::change_data_request::Deregister {},
        )),
        ..Default::default()
    };
    #[rustfmt::skip]
    let expected: &[u8] = &[
        // 7 request_id = 9
        0x38, 0x09,
        // 13 deregister = {} (oneof request): (13 << 3) | 2 = 0x6a, 0 bytes
        0x6a, 0x00,
    ];
    assert_wire(&request, expected)
}

#[test]
fn event_with_one_committed_row() -> Result<(), prost::DecodeError> {
    let row = cdcpb::event::Row {
        start_ts: TS_START,
        commit_ts: TS_COMMIT,
        r#type: cdcpb::event::LogType::Commit.into(),
        op_type: cdcpb::event::row::OpType::Put.into(),
        key: prost::bytes::Bytes::from_static(b"k1"),
        value: prost::bytes::Bytes::from_static(b"v1"),
        ..Default::default()
    };
    let event = cdcpb::Event {
        region_id: 3,
        index: 0,
        request_id: 9,
        event: Some(cdcpb::event::Event::Entries(cdcpb::event::Entries {
            entries: vec![row],
        })),
    };
    #[rustfmt::skip]
    let expected: &[u8] = &[
        // 1 region_id = 3: (1 << 3) | 0 = 0x08
        0x08, 0x03,
        // (2 index = 0 is not written)
        // 3 entries (oneof event): (3 << 3) | 2 = 0x1a, 22 bytes:
        0x1a, 0x16,
        //   1 entries, one Row: 0x0a, 20 bytes:
        0x0a, 0x14,
        //     1 start_ts: 0x08
        0x08, 0x81, 0x80, 0x10,
        //     2 commit_ts: 0x10
        0x10, 0x82, 0x80, 0x10,
        //     3 type = COMMIT (2): (3 << 3) | 0 = 0x18
        0x18, 0x02,
        //     4 op_type = PUT (1): (4 << 3) | 0 = 0x20
        0x20, 0x01,
        //     5 key = "k1": (5 << 3) | 2 = 0x2a
        0x2a, 0x02, b'k', b'1',
        //     6 value = "v1": (6 << 3) | 2 = 0x32
        0x32, 0x02, b'v', b'1',
        // 7 request_id = 9: (7 << 3) | 0 = 0x38, after the oneof because
        // fields are written in field-number order.
        0x38, 0x09,
    ];
    assert_wire(&event, expected)
}

#[test]
fn change_data_event_with_batched_resolved_ts() -> Result<(), prost::DecodeError> {
    let event = cdcpb::ChangeDataEvent {
        events: Vec::new(),
        resolved_ts: Some(cdcpb::ResolvedTs {
            regions: vec![3, 4],
            ts: TS_CHECKPOINT,
            request_id: 9,
        }),
    };
    #[rustfmt::skip]
    let expected: &[u8] = &[
        // (1 events is empty and not written)
        // 2 resolved_ts: (2 << 3) | 2 = 0x12, 10 bytes:
        0x12, 0x0a,
        //   1 regions = [3, 4], packed (proto3 default for repeated
        //   scalars): 0x0a, 2 bytes of varints
        0x0a, 0x02, 0x03, 0x04,
        //   2 ts: 0x10
        0x10, 0x85, 0x80, 0x10,
        //   3 request_id = 9: 0x18
        0x18, 0x09,
    ];
    assert_wire(&event, expected)
}

/// Decoders must also accept repeated scalars written one tag per element
/// (the proto2 layout), which some encoders still produce.
#[test]
fn resolved_ts_regions_decode_unpacked() -> Result<(), prost::DecodeError> {
    #[rustfmt::skip]
    let unpacked: &[u8] = &[
        // 1 regions = 3, 1 regions = 4: (1 << 3) | 0 = 0x08 each
        0x08, 0x03, 0x08, 0x04,
        // 2 ts
        0x10, 0x85, 0x80, 0x10,
    ];
    let decoded = cdcpb::ResolvedTs::decode(unpacked)?;
    assert_eq!(decoded.regions, vec![3, 4]);
    assert_eq!(decoded.ts, TS_CHECKPOINT);
    Ok(())
}

#[test]
fn tso_response() -> Result<(), prost::DecodeError> {
    let response = pdpb::TsoResponse {
        header: Some(pdpb::ResponseHeader {
            cluster_id: 7,
            error: None,
        }),
        count: 3,
        timestamp: Some(pdpb::Timestamp {
            physical: 1_700_000_000_000,
            logical: 5,
            suffix_bits: 0,
        }),
    };
    #[rustfmt::skip]
    let expected: &[u8] = &[
        // 1 header: 0x0a, 2 bytes: 1 cluster_id = 7
        0x0a, 0x02, 0x08, 0x07,
        // 2 count = 3: 0x10
        0x10, 0x03,
        // 3 timestamp: (3 << 3) | 2 = 0x1a, 9 bytes:
        0x1a, 0x09,
        //   1 physical = 1_700_000_000_000 = 0x18b_cfe5_6800; 7-bit groups
        //   from the low end: 0x00 0x50 0x15 0x7f 0x3c 0x31
        0x08, 0x80, 0xd0, 0x95, 0xff, 0xbc, 0x31,
        //   2 logical = 5
        0x10, 0x05,
    ];
    assert_wire(&response, expected)
}

/// The context the transactional client attaches to every KV request.
#[test]
fn kv_request_context() -> Result<(), prost::DecodeError> {
    let context = kvrpcpb::Context {
        region_id: 3,
        region_epoch: Some(metapb::RegionEpoch {
            conf_ver: 1,
            version: 5,
        }),
        peer: Some(metapb::Peer {
            id: 4,
            store_id: 1,
            ..Default::default()
        }),
        api_version: kvrpcpb::ApiVersion::V2.into(),
        ..Default::default()
    };
    #[rustfmt::skip]
    let expected: &[u8] = &[
        // 1 region_id = 3
        0x08, 0x03,
        // 2 region_epoch: 0x12, 4 bytes: conf_ver = 1, version = 5
        0x12, 0x04, 0x08, 0x01, 0x10, 0x05,
        // 3 peer: 0x1a, 4 bytes: 1 id = 4, 2 store_id = 1
        0x1a, 0x04, 0x08, 0x04, 0x10, 0x01,
        // 21 api_version = V2 (2): tag (21 << 3) | 0 = 168 needs two varint
        // bytes, 168 = 0b1_0101000 -> 0xa8 0x01
        0xa8, 0x01, 0x02,
    ];
    assert_wire(&context, expected)
}

/// A field's tag bytes: the varint of (number << 3) | wire type 2.
fn len_tag(number: u64) -> Vec<u8> {
    let mut v = (number << 3) | 2;
    let mut out = Vec::new();
    while v >= 0x80 {
        out.push((v as u8 & 0x7f) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
    out
}

#[test]
fn batch_commands_oneof_tags_match_upstream() -> Result<(), prost::DecodeError> {
    use kvfeed_proto::tikvpb::batch_commands_request::Request;
    use kvfeed_proto::tikvpb::batch_commands_request::request::Cmd as Q;
    use kvfeed_proto::tikvpb::batch_commands_response::Response;
    use kvfeed_proto::tikvpb::batch_commands_response::response::Cmd as R;
    use kvfeed_proto::tikvpb::{BatchCommandsEmptyRequest, BatchCommandsEmptyResponse};

    // Upstream kvproto's numbers, written out by hand.
    let table: Vec<(u64, Q, R)> = vec![
        (1, Q::Get(Default::default()), R::Get(Default::default())),
        (2, Q::Scan(Default::default()), R::Scan(Default::default())),
        (
            3,
            Q::Prewrite(Default::default()),
            R::Prewrite(Default::default()),
        ),
        (
            4,
            Q::Commit(Default::default()),
            R::Commit(Default::default()),
        ),
        (
            6,
            Q::Cleanup(Default::default()),
            R::Cleanup(Default::default()),
        ),
        (
            7,
            Q::BatchGet(Default::default()),
            R::BatchGet(Default::default()),
        ),
        (
            8,
            Q::BatchRollback(Default::default()),
            R::BatchRollback(Default::default()),
        ),
        (
            9,
            Q::ScanLock(Default::default()),
            R::ScanLock(Default::default()),
        ),
        (
            10,
            Q::ResolveLock(Default::default()),
            R::ResolveLock(Default::default()),
        ),
        (11, Q::Gc(Default::default()), R::Gc(Default::default())),
        (
            12,
            Q::DeleteRange(Default::default()),
            R::DeleteRange(Default::default()),
        ),
        (
            13,
            Q::RawGet(Default::default()),
            R::RawGet(Default::default()),
        ),
        (
            14,
            Q::RawBatchGet(Default::default()),
            R::RawBatchGet(Default::default()),
        ),
        (
            15,
            Q::RawPut(Default::default()),
            R::RawPut(Default::default()),
        ),
        (
            16,
            Q::RawBatchPut(Default::default()),
            R::RawBatchPut(Default::default()),
        ),
        (
            17,
            Q::RawDelete(Default::default()),
            R::RawDelete(Default::default()),
        ),
        (
            18,
            Q::RawBatchDelete(Default::default()),
            R::RawBatchDelete(Default::default()),
        ),
        (
            19,
            Q::RawScan(Default::default()),
            R::RawScan(Default::default()),
        ),
        (
            20,
            Q::RawDeleteRange(Default::default()),
            R::RawDeleteRange(Default::default()),
        ),
        (
            21,
            Q::RawBatchScan(Default::default()),
            R::RawBatchScan(Default::default()),
        ),
        (
            23,
            Q::PessimisticLock(Default::default()),
            R::PessimisticLock(Default::default()),
        ),
        (
            24,
            Q::PessimisticRollback(Default::default()),
            R::PessimisticRollback(Default::default()),
        ),
        (
            25,
            Q::CheckTxnStatus(Default::default()),
            R::CheckTxnStatus(Default::default()),
        ),
        (
            26,
            Q::TxnHeartBeat(Default::default()),
            R::TxnHeartBeat(Default::default()),
        ),
        (
            33,
            Q::CheckSecondaryLocks(Default::default()),
            R::CheckSecondaryLocks(Default::default()),
        ),
        (
            255,
            Q::Empty(Default::default()),
            R::Empty(Default::default()),
        ),
    ];
    for (number, q, r) in table {
        let mut expected = len_tag(number);
        expected.push(0); // an empty message
        assert_wire(&Request { cmd: Some(q) }, &expected)?;
        assert_wire(&Response { cmd: Some(r) }, &expected)?;
    }
    assert_eq!(len_tag(255), [0xfa, 0x0f]);

    // requests = 1, request_ids = 2 (packed); test_id = 1, delay_time = 2.
    let request = kvfeed_proto::tikvpb::BatchCommandsRequest {
        requests: vec![Request {
            cmd: Some(Q::Empty(BatchCommandsEmptyRequest {
                test_id: 5,
                delay_time: 6,
            })),
        }],
        request_ids: vec![7, 8],
    };
    let expected = [
        0x0a, 0x07, 0xfa, 0x0f, 0x04, 0x08, 0x05, 0x10, 0x06, 0x12, 0x02, 0x07, 0x08,
    ];
    assert_wire(&request, &expected)?;
    // responses = 1, request_ids = 2, transport_layer_load = 3.
    let response = kvfeed_proto::tikvpb::BatchCommandsResponse {
        responses: vec![Response {
            cmd: Some(R::Empty(BatchCommandsEmptyResponse { test_id: 5 })),
        }],
        request_ids: vec![7],
        transport_layer_load: 9,
    };
    let expected = [
        0x0a, 0x05, 0xfa, 0x0f, 0x02, 0x08, 0x05, 0x12, 0x01, 0x07, 0x18, 0x09,
    ];
    assert_wire(&response, &expected)
}

#[test]
fn store_safe_ts_and_data_is_not_ready() -> Result<(), prost::DecodeError> {
    let request = kvrpcpb::StoreSafeTsRequest {
        key_range: Some(kvrpcpb::KeyRange {
            start_key: b"a".to_vec(),
            end_key: b"b".to_vec(),
        }),
    };
    // 1 key_range, 6 bytes: 1 start_key "a", 2 end_key "b".
    assert_wire(&request, &[0x0a, 0x06, 0x0a, 0x01, b'a', 0x12, 0x01, b'b'])?;
    let response = kvrpcpb::StoreSafeTsResponse { safe_ts: TS_START };
    // 1 safe_ts.
    assert_wire(&response, &[0x08, 0x81, 0x80, 0x10])?;
    let error = errorpb::Error {
        data_is_not_ready: Some(errorpb::DataIsNotReady {
            region_id: 2,
            peer_id: 3,
            safe_ts: TS_START,
        }),
        ..Default::default()
    };
    #[rustfmt::skip]
    let expected: &[u8] = &[
        // 13 data_is_not_ready: (13 << 3) | 2 = 0x6a, 8 bytes:
        // 1 region_id 2, 2 peer_id 3, 3 safe_ts
        0x6a, 0x08, 0x08, 0x02, 0x10, 0x03, 0x18, 0x81, 0x80, 0x10,
    ];
    assert_wire(&error, expected)?;
    let context = kvrpcpb::Context {
        stale_read: true,
        ..Default::default()
    };
    // 17 stale_read: (17 << 3) | 0 = 136 = varint 88 01.
    assert_wire(&context, &[0x88, 0x01, 0x01])
}

#[test]
fn batch_scan_regions_request() -> Result<(), prost::DecodeError> {
    let request = pdpb::BatchScanRegionsRequest {
        header: Some(pdpb::RequestHeader {
            cluster_id: 1,
            ..Default::default()
        }),
        ranges: vec![pdpb::KeyRange {
            start_key: b"a".to_vec(),
            end_key: b"b".to_vec(),
        }],
        limit: 2,
        contain_all_key_range: true,
    };
    #[rustfmt::skip]
    let expected: &[u8] = &[
        // 1 header, 2 bytes: 1 cluster_id 1
        0x0a, 0x02, 0x08, 0x01,
        // 3 ranges: (3 << 3) | 2 = 0x1a, 6 bytes: 1 start_key "a", 2 end_key "b"
        0x1a, 0x06, 0x0a, 0x01, b'a', 0x12, 0x01, b'b',
        // 4 limit 2: 0x20; 5 contain_all_key_range: 0x28
        0x20, 0x02, 0x28, 0x01,
    ];
    assert_wire(&request, expected)
}
