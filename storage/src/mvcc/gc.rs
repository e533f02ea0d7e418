//! MVCC garbage collection below a safe point.
//!
//! The safe point promises that no reader will ever ask for a timestamp below
//! it and that every transaction that started below it has finished. So for
//! each key only the version a read *at* the safe point would see needs to
//! survive below it:
//! - versions committed above the safe point are untouched;
//! - below it, the newest `Put` is kept and everything older is dropped;
//! - a newest `Delete` is dropped together with everything older (the key
//!   simply reads as absent);
//! - `Lock` and `Rollback` records below the safe point are dropped (no
//!   transaction old enough to need their protection is alive);
//! - a dropped `Put` whose value lives in the default family takes that value
//!   with it.
//!
//! Locks are never touched: they belong to live transactions and are cleaned
//! up by lock resolution. GC batches are applied with `BatchSource::Gc` so
//! the change feed does not report them.

use std::ops::Bound;

use super::error::TxnResult;
use super::key::{Key, split_versioned};
use super::reader::MvccReader;
use super::txn::MvccTxn;
use super::write::{Write, WriteType};
use crate::TimeStamp;
use crate::engine::{Cf, EngineSnapshot, WriteBatch};

/// Keys examined per GC batch: bounds the size of one batch and the time its
/// latches are held.
pub const GC_BATCH_KEYS: usize = 256;

/// Counters of one GC run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GcStats {
    /// User keys examined.
    pub keys: u64,
    /// Write records deleted.
    pub deleted_writes: u64,
    /// Default-family values deleted.
    pub deleted_values: u64,
}

impl GcStats {
    /// Adds `other`'s counters to these, e.g. to total the batches of a run.
    pub fn add(&mut self, other: GcStats) {
        self.keys += other.keys;
        self.deleted_writes += other.deleted_writes;
        self.deleted_values += other.deleted_values;
    }
}

/// Computes the GC of `keys` below `safe_point`.
pub fn gc_keys(
    reader: &MvccReader<'_>,
    keys: &[Key],
    safe_point: TimeStamp,
) -> TxnResult<(WriteBatch, GcStats)> {
    let snap = reader.snapshot();
    let mut txn = MvccTxn::new();
    let mut stats = GcStats::default();
    for key in keys {
        stats.keys += 1;
        gc_key(&mut txn, snap, key, safe_point, &mut stats)?;
    }
    Ok((txn.into_batch(), stats))
}

fn gc_key(
    txn: &mut MvccTxn,
    snap: &dyn EngineSnapshot,
    key: &Key,
    safe_point: TimeStamp,
    stats: &mut GcStats,
) -> TxnResult<()> {
    let lower = key.append_ts(safe_point);
    let upper = key.append_ts(TimeStamp::ZERO);
    let mut remove_older = false;
    for item in snap.iter(
        Cf::Write,
        Bound::Included(&lower),
        Bound::Included(&upper),
        false,
    ) {
        let (k, v) = item?;
        let (_, commit_ts) = split_versioned(&k, Cf::Write)?;
        let write = Write::from_bytes(&v)?;
        let drop = if remove_older {
            true
        } else {
            match write.write_type {
                WriteType::Put => {
                    remove_older = true;
                    false
                }
                WriteType::Delete => {
                    remove_older = true;
                    true
                }
                WriteType::Lock | WriteType::Rollback => true,
            }
        };
        if drop {
            txn.delete_write(key, commit_ts);
            stats.deleted_writes += 1;
            if write.write_type == WriteType::Put && write.short_value.is_none() {
                txn.delete_value(key, write.start_ts);
                stats.deleted_values += 1;
            }
        }
    }
    Ok(())
}
