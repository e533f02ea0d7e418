//! The writers of the model test and what they record: a seeded sequence
//! of operations per writer through the official `tikv-client` (and a
//! Percolator client by hand for the orphaned prewrites), over a small set
//! of keys on both sides of the default region boundary.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use kvfeed_client::KeyMode;
use rand::RngExt;
use rand::rngs::StdRng;
use tikv_client::{
    CheckLevel, RawClient, TimestampExt, Transaction, TransactionClient, TransactionOptions,
};

use super::by_hand::ByHand;
use super::consumer::tick;

/// Writers running at once.
pub const WRITERS: usize = 6;
/// Operations per writer at scale 1.
pub const OPS_PER_WRITER: usize = 80;
/// Transactional keys per region.
pub const TXN_KEYS: usize = 5;
/// Raw keys per writer per region.
pub const RAW_KEYS: usize = 2;
/// Short, so readers resolve an orphan soon after it is left.
pub const ORPHAN_TTL_MS: u64 = 100;

/// A transactional key: `i` below `TXN_KEYS` in the low region, the rest
/// in the high one (eight `0xFF` bytes first encode above the boundary).
pub fn txn_key(i: usize) -> Vec<u8> {
    let mut key = if i < TXN_KEYS { vec![] } else { vec![0xFF; 8] };
    key.extend_from_slice(format!("m/{i}").as_bytes());
    key
}

/// The key of the orphan left at step `seq`: odd steps in the high region.
pub fn orphan_key(seq: usize) -> Vec<u8> {
    let mut key = if seq % 2 == 1 { vec![0xFF; 8] } else { vec![] };
    key.extend_from_slice(format!("m/o{seq}").as_bytes());
    key
}

/// A raw key of `writer`: low region for even `i`, high for odd (raw keys
/// are compared as they are; ten `0xFF` bytes sort above the boundary).
pub fn raw_key(writer: usize, i: usize) -> Vec<u8> {
    let mut key = if i.is_multiple_of(2) {
        vec![]
    } else {
        vec![0xFF; 10]
    };
    key.extend_from_slice(format!("r/{writer}/{i}").as_bytes());
    key
}

/// The user-key range holding every key written in `mode`: its ends lie
/// inside the first and the last region, so a feed over it subscribes
/// them only in part.
pub fn written_range(mode: KeyMode) -> (Vec<u8>, Vec<u8>) {
    let (prefix, high) = match mode {
        KeyMode::Txn => (&b"m"[..], 8),
        KeyMode::Raw => (&b"r"[..], 10),
    };
    let end = [&vec![0xFF; high][..], prefix, b"0"].concat();
    ([prefix, b"/"].concat(), end)
}

/// User keys for a nemesis to split at, so that boundaries fall between
/// the keys written and not only around them (split keys are encoded
/// first): each transactional and orphan key (its encoding starts a
/// region), each low raw key (its encoding sorts just above it), and for
/// each high raw key the user key with one `0xFF` fewer (its encoding,
/// eight `0xFF`, the group marker `0xFF`, then the rest, sorts just above
/// the raw key too).
pub fn split_points(ops: usize) -> Vec<Vec<u8>> {
    let mut points: Vec<Vec<u8>> = (0..2 * TXN_KEYS).map(txn_key).collect();
    points.extend([orphan_key(5), orphan_key(ops / 2)]);
    for writer in 0..WRITERS {
        for i in 0..2 * RAW_KEYS {
            let mut key = raw_key(writer, i);
            if !i.is_multiple_of(2) {
                key.remove(0);
            }
            points.push(key);
        }
    }
    points
}

#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Committed(u64),
    RolledBack,
    Unknown,
}

#[derive(Debug, Clone)]
pub struct Txn {
    pub writes: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    pub outcome: Outcome,
}

/// What the writers did.
#[derive(Debug, Default)]
pub struct Model {
    pub txns: HashMap<u64, Txn>,
    /// value → (key, logical instant before the put was sent).
    pub raw: HashMap<Vec<u8>, (Vec<u8>, u64)>,
    /// Last acknowledged raw value per key.
    pub raw_final: BTreeMap<Vec<u8>, Vec<u8>>,
}

pub fn optimistic() -> TransactionOptions {
    TransactionOptions::new_optimistic().drop_check(CheckLevel::Warn)
}

pub fn pessimistic() -> TransactionOptions {
    TransactionOptions::new_pessimistic().drop_check(CheckLevel::Warn)
}

pub struct Writer {
    pub id: usize,
    pub rng: StdRng,
    /// Operations it makes: its orphans are left at step 5 and half-way.
    pub ops: usize,
    pub txn: TransactionClient,
    pub raw: RawClient,
    pub by_hand: ByHand,
    pub model: Arc<Mutex<Model>>,
    /// An orphan's key and the step that left it, until a reader resolves it.
    pub orphaned: Option<(Vec<u8>, usize)>,
}

impl Writer {
    fn value(&self, seq: usize, key: usize) -> Vec<u8> {
        format!("w{}s{seq}k{key}", self.id).into_bytes()
    }

    fn record(&self, start_ts: u64, txn: Txn) {
        self.model.lock().expect("model").txns.insert(start_ts, txn);
    }

    /// A new transaction and its start ts.
    async fn begin(&self, options: TransactionOptions) -> (Transaction, u64) {
        let txn = self.txn.begin_with_options(options).await.expect("begin");
        let start_ts = txn.start_timestamp().version();
        (txn, start_ts)
    }

    fn pick_keys(&mut self, max: usize) -> Vec<usize> {
        let n = 1 + self.rng.random_range(0..max);
        let mut keys: Vec<usize> = (0..n)
            .map(|_| self.rng.random_range(0..2 * TXN_KEYS))
            .collect();
        keys.sort_unstable();
        keys.dedup();
        keys
    }

    pub async fn step(&mut self, seq: usize) {
        let roll = self.rng.random_range(0..100);
        if self.id == 0 && (seq == 5 || seq == self.ops / 2) {
            return self.orphan(seq).await;
        }
        if let Some((key, left)) = self.orphaned.take_if(|(_, left)| seq >= *left + 3) {
            // A reader meets the lock, waits out its TTL and rolls it back.
            let mut reader = self
                .txn
                .begin_with_options(optimistic())
                .await
                .expect("begin");
            let value = reader
                .get(key.clone())
                .await
                .expect("read resolves the orphan");
            reader.rollback().await.expect("end the reader");
            assert_eq!(
                value, None,
                "the orphan left at step {left} was rolled back"
            );
        }
        match roll {
            0..35 => self.optimistic(seq).await,
            35..55 => self.pessimistic(seq).await,
            55..65 => self.rollback(seq).await,
            _ => self.raw_put(seq).await,
        }
    }

    async fn optimistic(&mut self, seq: usize) {
        let keys = self.pick_keys(3);
        let (mut txn, start_ts) = self.begin(optimistic()).await;
        let mut writes = Vec::new();
        for k in keys {
            let key = txn_key(k);
            if self.rng.random_range(0..100) < 15 {
                txn.delete(key.clone()).await.expect("buffered delete");
                writes.push((key, None));
            } else {
                let value = self.value(seq, k);
                txn.put(key.clone(), value.clone())
                    .await
                    .expect("buffered put");
                writes.push((key, Some(value)));
            }
        }
        let outcome = commit_or_roll_back(&mut txn).await;
        self.record(start_ts, Txn { writes, outcome });
    }

    async fn pessimistic(&mut self, seq: usize) {
        let keys = self.pick_keys(2);
        let (mut txn, start_ts) = self.begin(pessimistic()).await;
        let mut writes = Vec::new();
        let mut failed = false;
        for k in keys {
            let (key, value) = (txn_key(k), self.value(seq, k));
            if txn.put(key.clone(), value.clone()).await.is_err() {
                failed = true;
                break;
            }
            writes.push((key, Some(value)));
        }
        let outcome = if failed {
            let _ = txn.rollback().await;
            Outcome::Unknown
        } else {
            commit_or_roll_back(&mut txn).await
        };
        self.record(start_ts, Txn { writes, outcome });
    }

    async fn rollback(&mut self, seq: usize) {
        let k = self.rng.random_range(0..2 * TXN_KEYS);
        let (mut txn, start_ts) = self.begin(pessimistic()).await;
        let (key, value) = (txn_key(k), self.value(seq, k));
        // A failed lock is fine: either way nothing may be delivered.
        let _ = txn.put(key.clone(), value.clone()).await;
        txn.rollback().await.expect("rollback");
        let writes = vec![(key, Some(value))];
        let outcome = Outcome::RolledBack;
        self.record(start_ts, Txn { writes, outcome });
    }

    async fn orphan(&mut self, seq: usize) {
        // A key of its own: a prewrite by hand does not wait for locks.
        let key = orphan_key(seq);
        let value = self.value(seq, 0);
        let start_ts = self.by_hand.timestamp().await;
        // Recorded first: the lock is visible as soon as it is taken.
        let writes = vec![(key.clone(), Some(value.clone()))];
        let outcome = Outcome::RolledBack;
        self.record(start_ts, Txn { writes, outcome });
        self.by_hand
            .prewrite(&key, &value, &key, start_ts, ORPHAN_TTL_MS)
            .await;
        self.orphaned = Some((key, seq));
    }

    async fn raw_put(&mut self, seq: usize) {
        let i = self.rng.random_range(0..2 * RAW_KEYS);
        let (key, value) = (raw_key(self.id, i), self.value(seq, 100 + i));
        let begun = tick();
        self.model
            .lock()
            .expect("model")
            .raw
            .insert(value.clone(), (key.clone(), begun));
        self.raw
            .put(key.clone(), value.clone())
            .await
            .expect("raw put");
        self.model
            .lock()
            .expect("model")
            .raw_final
            .insert(key, value);
    }
}

/// Commits `txn`; if that fails or commits nothing, rolls it back. A failed
/// commit may still have committed (the primary may have landed), so the
/// outcome is then unknown rather than rolled back.
pub async fn commit_or_roll_back(txn: &mut Transaction) -> Outcome {
    match txn.commit().await {
        Ok(Some(ts)) => Outcome::Committed(ts.version()),
        Ok(None) | Err(_) => {
            let _ = txn.rollback().await;
            Outcome::Unknown
        }
    }
}
