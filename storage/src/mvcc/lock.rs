//! Lock records: the lock column family, one record per locked user key.
//!
//! A lock says "transaction `start_ts` is writing this key"; its `primary`
//! names the key whose fate decides the whole transaction. Values of at most
//! [`SHORT_VALUE_MAX_LEN`] bytes travel inside the lock (and later inside the
//! write record), larger ones are written to the default family at
//! `(key, start_ts)` during prewrite.
//!
//! On-disk format (version 1), all integers LEB128:
//! `version=1 · type · flags · start_ts · ttl · for_update_ts · min_commit_ts ·
//! txn_size · txn_source · primary · [short_value] · [secondaries]`, where
//! `flags` bit 0 marks a short value and bit 1 async commit (which is followed
//! by the count and bytes of the secondary keys). Unknown versions, types or
//! flag bits are reported as corruption rather than guessed at.

use super::codec::{Decoder, put_bytes, put_varint};
use crate::{Result, TimeStamp};

/// Values up to this many bytes are stored inline in lock and write records.
pub const SHORT_VALUE_MAX_LEN: usize = 255;

const FORMAT_VERSION: u8 = 1;
const FLAG_SHORT_VALUE: u8 = 1;
const FLAG_ASYNC_COMMIT: u8 = 2;
const KNOWN_FLAGS: u8 = FLAG_SHORT_VALUE | FLAG_ASYNC_COMMIT;
const CF: &str = "lock";

/// Whether a value is stored inline rather than in the default family.
pub fn is_short_value(value: &[u8]) -> bool {
    value.len() <= SHORT_VALUE_MAX_LEN
}

/// What the locking transaction will do to the key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LockType {
    /// The transaction writes a new value.
    Put,
    /// The transaction deletes the key.
    Delete,
    /// Read lock of an optimistic `Lock` mutation: commits as a `Lock` write.
    Lock,
    /// A pessimistic lock taken before prewrite; carries no value and never
    /// blocks readers.
    Pessimistic,
}

impl LockType {
    fn to_byte(self) -> u8 {
        match self {
            LockType::Put => 1,
            LockType::Delete => 2,
            LockType::Lock => 3,
            LockType::Pessimistic => 4,
        }
    }

    fn from_byte(b: u8) -> Option<Self> {
        Some(match b {
            1 => LockType::Put,
            2 => LockType::Delete,
            3 => LockType::Lock,
            4 => LockType::Pessimistic,
            _ => return None,
        })
    }
}

/// A decoded lock record. Keys inside (`primary`, `secondaries`) are raw user
/// keys, as the protocol carries them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lock {
    /// What the transaction will do to the key.
    pub lock_type: LockType,
    /// The transaction's primary key, whose commit or rollback decides the
    /// fate of this lock.
    pub primary: Vec<u8>,
    /// The locking transaction's start timestamp (its identity).
    pub start_ts: TimeStamp,
    /// Milliseconds after `start_ts.physical()` at which the lock may be
    /// considered abandoned.
    pub ttl: u64,
    /// The value to commit when short enough to inline; `None` for a long
    /// value (already in the default family) or for non-`Put` locks.
    pub short_value: Option<Vec<u8>>,
    /// Non-zero iff the transaction is pessimistic.
    pub for_update_ts: TimeStamp,
    /// The transaction may not commit below this; readers below it are not
    /// blocked.
    pub min_commit_ts: TimeStamp,
    /// How many keys the transaction writes, as its client reported; it is
    /// passed back to clients in `LockInfo`.
    pub txn_size: u64,
    /// The transaction's source tag, copied into its write records; 0 for
    /// ordinary clients.
    pub txn_source: u64,
    /// Whether the transaction uses async commit: it counts as committed once
    /// every lock is written, at a commit ts derived from the `min_commit_ts`s.
    pub use_async_commit: bool,
    /// Async commit: every other key of the transaction (on the primary lock).
    pub secondaries: Vec<Vec<u8>>,
}

impl Lock {
    /// A lock with the given identity and every optional field empty.
    pub fn new(lock_type: LockType, primary: Vec<u8>, start_ts: TimeStamp, ttl: u64) -> Lock {
        Lock {
            lock_type,
            primary,
            start_ts,
            ttl,
            short_value: None,
            for_update_ts: TimeStamp::ZERO,
            min_commit_ts: TimeStamp::ZERO,
            txn_size: 0,
            txn_source: 0,
            use_async_commit: false,
            secondaries: Vec::new(),
        }
    }

    /// Whether this lock belongs to a pessimistic transaction.
    pub fn is_pessimistic_txn(&self) -> bool {
        !self.for_update_ts.is_zero()
    }

    /// Whether the TTL has run out at `current_ts` (physical milliseconds).
    pub fn is_expired(&self, current_ts: TimeStamp) -> bool {
        self.start_ts.physical().saturating_add(self.ttl) < current_ts.physical()
    }

    /// Encodes the lock in the on-disk format of the module docs.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(
            32 + self.primary.len() + self.short_value.as_ref().map_or(0, Vec::len),
        );
        out.push(FORMAT_VERSION);
        out.push(self.lock_type.to_byte());
        let mut flags = 0;
        if self.short_value.is_some() {
            flags |= FLAG_SHORT_VALUE;
        }
        if self.use_async_commit {
            flags |= FLAG_ASYNC_COMMIT;
        }
        out.push(flags);
        for v in [
            self.start_ts.into_inner(),
            self.ttl,
            self.for_update_ts.into_inner(),
            self.min_commit_ts.into_inner(),
            self.txn_size,
            self.txn_source,
        ] {
            put_varint(&mut out, v);
        }
        put_bytes(&mut out, &self.primary);
        if let Some(v) = &self.short_value {
            put_bytes(&mut out, v);
        }
        if self.use_async_commit {
            put_varint(&mut out, self.secondaries.len() as u64);
            for s in &self.secondaries {
                put_bytes(&mut out, s);
            }
        }
        out
    }

    /// Decodes a lock record; malformed input is `Error::Corrupt`.
    pub fn from_bytes(bytes: &[u8]) -> Result<Lock> {
        let mut d = Decoder::new(bytes, CF);
        let version = d.u8()?;
        if version != FORMAT_VERSION {
            return Err(d.corrupt(format!("unknown lock format version {version}")));
        }
        let type_byte = d.u8()?;
        let lock_type = LockType::from_byte(type_byte)
            .ok_or_else(|| d.corrupt(format!("unknown lock type {type_byte}")))?;
        let flags = d.u8()?;
        if flags & !KNOWN_FLAGS != 0 {
            return Err(d.corrupt(format!("unknown lock flags {flags:#04x}")));
        }
        let start_ts = TimeStamp::new(d.varint()?);
        let ttl = d.varint()?;
        let for_update_ts = TimeStamp::new(d.varint()?);
        let min_commit_ts = TimeStamp::new(d.varint()?);
        let txn_size = d.varint()?;
        let txn_source = d.varint()?;
        let primary = d.bytes()?;
        let short_value = if flags & FLAG_SHORT_VALUE != 0 {
            Some(d.bytes()?)
        } else {
            None
        };
        let use_async_commit = flags & FLAG_ASYNC_COMMIT != 0;
        let mut secondaries = Vec::new();
        if use_async_commit {
            let count = d.varint()?;
            // Each entry takes at least one byte: bound the allocation by the
            // input so a forged count cannot exhaust memory.
            if count > d.remaining() as u64 {
                return Err(d.corrupt(format!("{count} secondaries exceed record")));
            }
            for _ in 0..count {
                secondaries.push(d.bytes()?);
            }
        }
        d.finish()?;
        Ok(Lock {
            lock_type,
            primary,
            start_ts,
            ttl,
            short_value,
            for_update_ts,
            min_commit_ts,
            txn_size,
            txn_source,
            use_async_commit,
            secondaries,
        })
    }

    /// The protocol's view of this lock on user key `key`.
    pub fn to_lock_info(&self, key: Vec<u8>) -> LockInfo {
        LockInfo {
            key,
            primary: self.primary.clone(),
            start_ts: self.start_ts,
            ttl: self.ttl,
            lock_type: self.lock_type,
            txn_size: self.txn_size,
            for_update_ts: self.for_update_ts,
            min_commit_ts: self.min_commit_ts,
            use_async_commit: self.use_async_commit,
            secondaries: self.secondaries.clone(),
        }
    }
}

/// A lock as reported to clients (kvrpcpb `LockInfo`): everything a client
/// needs to resolve it. `key` and `primary` are raw user keys.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LockInfo {
    /// The locked key.
    pub key: Vec<u8>,
    /// The transaction's primary key, to check its status against.
    pub primary: Vec<u8>,
    /// `lock_version` on the wire.
    pub start_ts: TimeStamp,
    /// Milliseconds after `start_ts.physical()` at which the lock may be
    /// considered abandoned.
    pub ttl: u64,
    /// What the transaction will do to the key.
    pub lock_type: LockType,
    /// How many keys the transaction writes, as its client reported.
    pub txn_size: u64,
    /// Non-zero iff the transaction is pessimistic.
    pub for_update_ts: TimeStamp,
    /// The transaction may not commit below this.
    pub min_commit_ts: TimeStamp,
    /// Whether the transaction uses async commit.
    pub use_async_commit: bool,
    /// Async commit: every other key of the transaction (on the primary lock).
    pub secondaries: Vec<Vec<u8>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_full_lock() {
        let mut lock = Lock::new(LockType::Put, b"pk".to_vec(), TimeStamp::new(10), 3000);
        lock.short_value = Some(b"v".to_vec());
        lock.for_update_ts = TimeStamp::new(12);
        lock.min_commit_ts = TimeStamp::new(13);
        lock.txn_size = 4;
        lock.txn_source = 1;
        lock.use_async_commit = true;
        lock.secondaries = vec![b"a".to_vec(), Vec::new()];
        assert_eq!(Lock::from_bytes(&lock.to_bytes()).ok(), Some(lock));
    }

    #[test]
    fn rejects_unknown_version_type_and_flags() {
        let lock = Lock::new(LockType::Lock, b"p".to_vec(), TimeStamp::new(1), 1);
        let good = lock.to_bytes();
        for (i, b) in [(0, 2u8), (1, 9), (2, 0x80)] {
            let mut bad = good.clone();
            bad[i] = b;
            assert!(Lock::from_bytes(&bad).is_err());
        }
        let mut trailing = good;
        trailing.push(0);
        assert!(Lock::from_bytes(&trailing).is_err());
    }

    #[test]
    fn expiry_uses_physical_milliseconds() {
        let lock = Lock::new(LockType::Put, b"p".to_vec(), TimeStamp::compose(100, 5), 10);
        assert!(!lock.is_expired(TimeStamp::compose(110, 0)));
        assert!(lock.is_expired(TimeStamp::compose(111, 0)));
    }
}
