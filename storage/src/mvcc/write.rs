//! Write records: the write column family at `(key, commit_ts)`.
//!
//! A write record is the commit (or rollback) of one transaction's change to
//! one key. `Put`/`Delete` records are data versions; `Lock` records commit a
//! read lock and `Rollback` records sit at `(key, start_ts)` so that a late
//! prewrite of a rolled-back transaction is refused. Readers skip `Lock` and
//! `Rollback` records.
//!
//! `has_overlapped_rollback` covers the one collision the layout allows:
//! transaction B's rollback record lives at `(key, B.start_ts)`, which can be
//! the very key of transaction A's commit record when `A.commit_ts ==
//! B.start_ts`. The commit record is kept and flagged instead, so both facts
//! survive.
//!
//! On-disk format (version 1): `version=1 · type · flags · start_ts ·
//! txn_source · [short_value]`, integers LEB128, `flags` bit 0 a short value,
//! bit 1 an overlapped rollback. Malformed input is `Error::Corrupt`.

use super::codec::{Decoder, put_bytes, put_varint};
use super::lock::LockType;
use crate::{Result, TimeStamp};

const FORMAT_VERSION: u8 = 1;
const FLAG_SHORT_VALUE: u8 = 1;
const FLAG_OVERLAPPED_ROLLBACK: u8 = 2;
const KNOWN_FLAGS: u8 = FLAG_SHORT_VALUE | FLAG_OVERLAPPED_ROLLBACK;
const CF: &str = "write";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
/// The kind of a write record; see the module docs.
pub enum WriteType {
    /// Committed a new value of the key.
    Put,
    /// Committed the removal of the key.
    Delete,
    /// Committed a read lock; not a data version, readers skip it.
    Lock,
    /// Marks transaction `start_ts` rolled back so its late prewrite is refused.
    Rollback,
}

impl WriteType {
    /// The write a committed lock of `lock_type` leaves behind. A pessimistic
    /// lock that survives to commit (its prewrite was never needed) commits
    /// as a `Lock` record, as TiKV does.
    pub fn from_lock_type(lock_type: LockType) -> WriteType {
        match lock_type {
            LockType::Put => WriteType::Put,
            LockType::Delete => WriteType::Delete,
            LockType::Lock | LockType::Pessimistic => WriteType::Lock,
        }
    }

    /// Whether the record is a data version (visible to readers).
    pub fn is_data(self) -> bool {
        matches!(self, WriteType::Put | WriteType::Delete)
    }

    fn to_byte(self) -> u8 {
        match self {
            WriteType::Put => 1,
            WriteType::Delete => 2,
            WriteType::Lock => 3,
            WriteType::Rollback => 4,
        }
    }

    fn from_byte(b: u8) -> Option<Self> {
        Some(match b {
            1 => WriteType::Put,
            2 => WriteType::Delete,
            3 => WriteType::Lock,
            4 => WriteType::Rollback,
            _ => return None,
        })
    }
}

/// A decoded write record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Write {
    /// What the record commits or rolls back.
    pub write_type: WriteType,
    /// The transaction's start timestamp: where its value sits in the default
    /// column family, and its identity for lock resolution.
    pub start_ts: TimeStamp,
    /// The value itself when it was short enough to inline (TiKV's short value);
    /// `None` means it lives in the default column family at `(key, start_ts)`
    /// (or there is none, for non-`Put` records).
    pub short_value: Option<Vec<u8>>,
    /// The transaction's source tag (TiCDC uses it to filter its own writes);
    /// 0 for ordinary clients.
    pub txn_source: u64,
    /// Whether another transaction's rollback record collided with this commit
    /// record's key and was folded into it; see the module docs.
    pub has_overlapped_rollback: bool,
}

impl Write {
    /// A record with source 0 and no overlapped rollback.
    pub fn new(write_type: WriteType, start_ts: TimeStamp, short_value: Option<Vec<u8>>) -> Write {
        Write {
            write_type,
            start_ts,
            short_value,
            txn_source: 0,
            has_overlapped_rollback: false,
        }
    }

    /// The rollback record of transaction `start_ts`.
    pub fn rollback(start_ts: TimeStamp) -> Write {
        Write::new(WriteType::Rollback, start_ts, None)
    }

    /// Encodes the record in the on-disk format of the module docs.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 + self.short_value.as_ref().map_or(0, Vec::len));
        out.push(FORMAT_VERSION);
        out.push(self.write_type.to_byte());
        let mut flags = 0;
        if self.short_value.is_some() {
            flags |= FLAG_SHORT_VALUE;
        }
        if self.has_overlapped_rollback {
            flags |= FLAG_OVERLAPPED_ROLLBACK;
        }
        out.push(flags);
        put_varint(&mut out, self.start_ts.into_inner());
        put_varint(&mut out, self.txn_source);
        if let Some(v) = &self.short_value {
            put_bytes(&mut out, v);
        }
        out
    }

    /// Decodes a write record; malformed input is `Error::Corrupt`.
    pub fn from_bytes(bytes: &[u8]) -> Result<Write> {
        let mut d = Decoder::new(bytes, CF);
        let version = d.u8()?;
        if version != FORMAT_VERSION {
            return Err(d.corrupt(format!("unknown write format version {version}")));
        }
        let type_byte = d.u8()?;
        let write_type = WriteType::from_byte(type_byte)
            .ok_or_else(|| d.corrupt(format!("unknown write type {type_byte}")))?;
        let flags = d.u8()?;
        if flags & !KNOWN_FLAGS != 0 {
            return Err(d.corrupt(format!("unknown write flags {flags:#04x}")));
        }
        let start_ts = TimeStamp::new(d.varint()?);
        let txn_source = d.varint()?;
        let short_value = if flags & FLAG_SHORT_VALUE != 0 {
            Some(d.bytes()?)
        } else {
            None
        };
        d.finish()?;
        Ok(Write {
            write_type,
            start_ts,
            short_value,
            txn_source,
            has_overlapped_rollback: flags & FLAG_OVERLAPPED_ROLLBACK != 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let mut w = Write::new(WriteType::Put, TimeStamp::new(5), Some(b"v".to_vec()));
        w.txn_source = 7;
        w.has_overlapped_rollback = true;
        assert_eq!(Write::from_bytes(&w.to_bytes()).ok(), Some(w));
        let r = Write::rollback(TimeStamp::new(9));
        assert_eq!(Write::from_bytes(&r.to_bytes()).ok(), Some(r));
    }

    #[test]
    fn rejects_garbage() {
        assert!(Write::from_bytes(&[]).is_err());
        assert!(Write::from_bytes(&[1, 0, 0, 0, 0]).is_err());
        assert!(Write::from_bytes(&[1, 1, 4, 0, 0]).is_err());
        assert!(Write::from_bytes(&[1, 1, 1, 0, 0]).is_err());
    }
}
