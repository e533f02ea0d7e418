//! On-disk layout of raw key-value versions, and its decoder for the feed.
//!
//! Engine key in [`Cf::Raw`]: `encode_bytes(user_key) ++ (!ts).to_be_bytes()`.
//! The memcomparable encoding keeps user keys in order and is prefix-free (no
//! encoded key is a prefix of another), so all versions of one user key are
//! contiguous and sort between those of its neighbours; inverting the ts puts
//! the newest version first.
//!
//! Engine value, a versioned record:
//!
//! ```text
//! [format = 1] [kind: 1 = put, 2 = delete] [flags: bit 0 = has expiry]
//! [expire_ts: u64 big-endian unix seconds, only if bit 0]
//! [value bytes: put only; a delete carries none]
//! ```
//!
//! Every byte that does not fit this shape is reported as
//! [`Error::Corrupt`]: the decoder runs on whatever the disk returns and on
//! every mutation the feed sees, so it must never panic.

use crate::engine::{Cf, Mutation, Op};
use crate::mvcc::encode_bytes;
use crate::{Error, Result, TimeStamp, versioned};

const FORMAT_V1: u8 = 1;
const KIND_PUT: u8 = 1;
const KIND_DELETE: u8 = 2;
const FLAG_EXPIRY: u8 = 1;
const HEADER_LEN: usize = 3;

fn corrupt(reason: impl std::fmt::Display) -> Error {
    Error::corrupt(Cf::Raw.name(), reason)
}

/// The engine key of `user_key` at version `ts`.
pub(crate) fn encode_key(user_key: &[u8], ts: TimeStamp) -> Vec<u8> {
    let mut key = encode_bytes(user_key);
    versioned::push_version(&mut key, ts);
    key
}

/// Splits an engine key into its encoded user key and its version.
pub(crate) fn split_key(engine_key: &[u8]) -> Result<(&[u8], TimeStamp)> {
    versioned::split(engine_key, Cf::Raw)
}

/// Decodes the encoded user key part of an engine key, which must be exactly
/// one complete encoding.
pub(crate) fn decode_user_key(encoded: &[u8]) -> Result<Vec<u8>> {
    versioned::user_key(encoded, Cf::Raw)
}

/// Whether a record is a value or a tombstone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Put,
    Delete,
}

/// A decoded record, borrowing its value from the engine's bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Record<'a> {
    pub(crate) kind: Kind,
    /// Unix seconds at which a put stops being visible.
    pub(crate) expire_ts: Option<u64>,
    pub(crate) value: &'a [u8],
}

impl<'a> Record<'a> {
    pub(crate) fn encode_put(value: &[u8], expire_ts: Option<u64>) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + 8 + value.len());
        out.extend_from_slice(&[FORMAT_V1, KIND_PUT]);
        match expire_ts {
            Some(expire) => {
                out.push(FLAG_EXPIRY);
                out.extend_from_slice(&expire.to_be_bytes());
            }
            None => out.push(0),
        }
        out.extend_from_slice(value);
        out
    }

    pub(crate) fn encode_delete() -> Vec<u8> {
        vec![FORMAT_V1, KIND_DELETE, 0]
    }

    pub(crate) fn decode(bytes: &'a [u8]) -> Result<Record<'a>> {
        let Some((header, rest)) = bytes.split_first_chunk::<HEADER_LEN>() else {
            return Err(corrupt(format!(
                "raw record of {} bytes is shorter than its header",
                bytes.len()
            )));
        };
        let [format, kind, flags] = *header;
        if format != FORMAT_V1 {
            return Err(corrupt(format!("unknown raw record format {format}")));
        }
        let kind = match kind {
            KIND_PUT => Kind::Put,
            KIND_DELETE => Kind::Delete,
            other => return Err(corrupt(format!("unknown raw record kind {other}"))),
        };
        if flags & !FLAG_EXPIRY != 0 {
            return Err(corrupt(format!("unknown raw record flags {flags:#04x}")));
        }
        let (expire_ts, value) = if flags & FLAG_EXPIRY != 0 {
            let Some((expire, value)) = rest.split_first_chunk::<8>() else {
                return Err(corrupt("raw record expiry is truncated"));
            };
            (Some(u64::from_be_bytes(*expire)), value)
        } else {
            (None, rest)
        };
        if kind == Kind::Delete && (expire_ts.is_some() || !value.is_empty()) {
            return Err(corrupt("raw tombstone carries an expiry or a value"));
        }
        Ok(Record {
            kind,
            expire_ts,
            value,
        })
    }

    /// Whether the record makes its key visible at `now_secs`.
    pub(crate) fn is_live(&self, now_secs: u64) -> bool {
        self.kind == Kind::Put && self.expire_ts.is_none_or(|expire| expire > now_secs)
    }
}

/// What a raw write did to its key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RawOp {
    /// Set the key to this value.
    Put(Vec<u8>),
    /// Deleted the key.
    Delete,
}

/// One raw write as the change feed reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawChange {
    /// The user key (decoded).
    pub key: Vec<u8>,
    /// The write's timestamp (its commit ts on the feed).
    pub ts: TimeStamp,
    /// What the write did.
    pub op: RawOp,
    /// Unix seconds after which the value expires, for puts with a TTL.
    pub expire_ts: Option<u64>,
}

/// Decodes a mutation taken from an applied batch into a raw change.
///
/// Returns `Ok(None)` for mutations that are not raw writes: other column
/// families, and engine deletes (only garbage collection removes raw engine
/// keys; a user delete is a tombstone *put*).
pub fn decode_change(mutation: &Mutation) -> Result<Option<RawChange>> {
    if mutation.cf != Cf::Raw {
        return Ok(None);
    }
    let Op::Put(bytes) = &mutation.op else {
        return Ok(None);
    };
    let (encoded, ts) = split_key(&mutation.key)?;
    let key = decode_user_key(encoded)?;
    let record = Record::decode(bytes)?;
    let op = match record.kind {
        Kind::Put => RawOp::Put(record.value.to_vec()),
        Kind::Delete => RawOp::Delete,
    };
    Ok(Some(RawChange {
        key,
        ts,
        op,
        expire_ts: record.expire_ts,
    }))
}

/// Decodes one stored version of `key` at `ts` (its engine value, as a scan
/// reads it) into the change it made. The value keeps the record's
/// allocation: a scan reads every version once and builds one row from it,
/// so copying each value again would be pure overhead.
pub fn decode_version(key: Vec<u8>, ts: TimeStamp, mut record: Vec<u8>) -> Result<RawChange> {
    let decoded = Record::decode(&record)?;
    let (kind, expire_ts) = (decoded.kind, decoded.expire_ts);
    // The value is the record's tail, after the header (and expiry).
    let header = record.len() - decoded.value.len();
    let op = match kind {
        Kind::Put => {
            record.drain(..header);
            RawOp::Put(record)
        }
        Kind::Delete => RawOp::Delete,
    };
    Ok(RawChange {
        key,
        ts,
        op,
        expire_ts,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_round_trip_orders_newest_first() {
        let old = encode_key(b"k", TimeStamp::new(5));
        let new = encode_key(b"k", TimeStamp::new(9));
        assert!(new < old);
        let (encoded, ts) = split_key(&new).expect("split");
        assert_eq!(ts, TimeStamp::new(9));
        assert_eq!(decode_user_key(encoded).expect("decode"), b"k".to_vec());
    }

    #[test]
    fn decode_version_keeps_the_value_and_expiry() {
        let ts = TimeStamp::new(7);
        let put =
            decode_version(b"k".to_vec(), ts, Record::encode_put(b"value", Some(99))).expect("put");
        assert_eq!(put.op, RawOp::Put(b"value".to_vec()));
        assert_eq!(
            (put.key.as_slice(), put.ts, put.expire_ts),
            (&b"k"[..], ts, Some(99))
        );
        let delete = decode_version(b"k".to_vec(), ts, Record::encode_delete()).expect("delete");
        assert_eq!((delete.op, delete.expire_ts), (RawOp::Delete, None));
        assert!(decode_version(b"k".to_vec(), ts, vec![9, 1, 0]).is_err());
    }

    #[test]
    fn record_round_trip() {
        type Case = (Vec<u8>, Kind, Option<u64>, &'static [u8]);
        let cases: [Case; 4] = [
            (Record::encode_put(b"v", None), Kind::Put, None, b"v"),
            (Record::encode_put(b"", Some(7)), Kind::Put, Some(7), b""),
            (
                Record::encode_put(b"xyz", Some(u64::MAX)),
                Kind::Put,
                Some(u64::MAX),
                b"xyz",
            ),
            (Record::encode_delete(), Kind::Delete, None, b""),
        ];
        for (bytes, kind, expire_ts, value) in cases {
            let rec = Record::decode(&bytes).expect("decode");
            assert_eq!(
                (rec.kind, rec.expire_ts, rec.value),
                (kind, expire_ts, value)
            );
        }
    }

    #[test]
    fn malformed_records_are_corrupt() {
        let cases: [&[u8]; 7] = [
            b"",
            &[1, 1],
            &[2, 1, 0],
            &[1, 3, 0],
            &[1, 1, 2],
            &[1, 1, 1, 0, 0],
            &[1, 2, 0, b'x'],
        ];
        for bytes in cases {
            assert!(
                matches!(Record::decode(bytes), Err(Error::Corrupt { .. })),
                "{bytes:?}"
            );
        }
    }

    #[test]
    fn liveness() {
        let now = 100;
        let cases = [
            (Record::encode_put(b"v", None), true),
            (Record::encode_put(b"v", Some(101)), true),
            (Record::encode_put(b"v", Some(100)), false),
            (Record::encode_delete(), false),
        ];
        for (bytes, live) in cases {
            let rec = Record::decode(&bytes).expect("decode");
            assert_eq!(rec.is_live(now), live, "{rec:?}");
        }
    }
}
