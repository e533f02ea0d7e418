//! Counting for benchmarks: a latency histogram with bounded error and
//! memory, exact sets of seen puts, and a seeded random generator.
//!
//! Why a log-bucket histogram: a benchmark may record millions of
//! latencies; keeping them all would make memory grow with the run, and
//! sampling would lose the tail, which is the point. Buckets of 1/64 of a
//! power of two keep every quantile within 1.6 % of the truth at a fixed
//! 30 KiB, and histograms of several watchers merge exactly. The maximum
//! is kept exactly.
//!
//! Why bitmaps for loss and duplicates: "nothing lost, nothing repeated"
//! must be exact, not estimated. Each writer numbers its puts 0, 1, 2, …,
//! so a set of puts is one bitmap per writer (one bit per put), and loss is
//! `acknowledged AND NOT seen`, counted word by word.

/// Values below this are kept in buckets of width 1.
const LINEAR: u64 = 64;
/// Sub-buckets per power of two (64: relative error ≤ 1/64).
const SUB_BITS: u32 = 6;
/// Enough buckets for every `u64`.
const BUCKETS: usize = ((64 - SUB_BITS as usize) + 1) * (1 << SUB_BITS);

/// A histogram of `u64` values (nanoseconds, milliseconds...).
#[derive(Clone)]
pub struct Histogram {
    counts: Vec<u64>,
    total: u64,
    max: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: vec![0; BUCKETS],
            total: 0,
            max: 0,
        }
    }
}

impl std::fmt::Debug for Histogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Histogram")
            .field("total", &self.total)
            .field("max", &self.max)
            .finish_non_exhaustive()
    }
}

fn bucket_of(value: u64) -> usize {
    if value < LINEAR {
        return value as usize;
    }
    let exponent = 63 - value.leading_zeros(); // ≥ SUB_BITS
    let shift = exponent - SUB_BITS;
    let mantissa = (value >> shift) & (LINEAR - 1);
    ((exponent - SUB_BITS + 1) as usize) * (LINEAR as usize) + mantissa as usize
}

/// The largest value that falls in bucket `index`.
fn bucket_high(index: usize) -> u64 {
    let linear = LINEAR as usize;
    if index < linear {
        return index as u64;
    }
    let shift = (index / linear - 1) as u32;
    let mantissa = (index % linear) as u64;
    let low = (LINEAR + mantissa) << shift;
    low.saturating_add((1u64 << shift) - 1)
}

impl Histogram {
    pub fn record(&mut self, value: u64) {
        self.counts[bucket_of(value)] += 1;
        self.total += 1;
        self.max = self.max.max(value);
    }

    pub fn merge(&mut self, other: &Histogram) {
        for (mine, theirs) in self.counts.iter_mut().zip(&other.counts) {
            *mine += theirs;
        }
        self.total += other.total;
        self.max = self.max.max(other.max);
    }

    pub fn count(&self) -> u64 {
        self.total
    }

    pub fn max(&self) -> Option<u64> {
        (self.total > 0).then_some(self.max)
    }

    /// The value at quantile `q` (0..=1): the upper end of the bucket
    /// holding the `ceil(q·n)`-th smallest value, never above the maximum.
    /// `None` when nothing was recorded.
    pub fn quantile(&self, q: f64) -> Option<u64> {
        if self.total == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (index, count) in self.counts.iter().enumerate() {
            seen += count;
            if seen >= rank {
                return Some(bucket_high(index).min(self.max));
            }
        }
        Some(self.max)
    }
}

/// Largest sequence number a [`SeqSet`] accepts per writer: a value read
/// from the wire cannot make it allocate more than 8 MiB per writer.
pub const MAX_SEQ: u64 = 1 << 26;

/// What [`SeqSet::insert`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Insert {
    New,
    Duplicate,
    /// Writer or sequence number out of range: not one of ours.
    Foreign,
}

/// A set of (writer, seq) pairs: one bitmap per writer.
#[derive(Debug, Clone, Default)]
pub struct SeqSet {
    writers: Vec<Vec<u64>>,
    len: u64,
}

impl SeqSet {
    /// A set for writers `0..writers`.
    pub fn new(writers: usize) -> SeqSet {
        SeqSet {
            writers: vec![Vec::new(); writers],
            len: 0,
        }
    }

    pub fn insert(&mut self, writer: u32, seq: u64) -> Insert {
        let Some(words) = self.writers.get_mut(writer as usize) else {
            return Insert::Foreign;
        };
        if seq >= MAX_SEQ {
            return Insert::Foreign;
        }
        let (word, bit) = ((seq / 64) as usize, seq % 64);
        if words.len() <= word {
            words.resize(word + 1, 0);
        }
        let mask = 1u64 << bit;
        if words[word] & mask != 0 {
            return Insert::Duplicate;
        }
        words[word] |= mask;
        self.len += 1;
        Insert::New
    }

    pub fn contains(&self, writer: u32, seq: u64) -> bool {
        let Some(words) = self.writers.get(writer as usize) else {
            return false;
        };
        words
            .get((seq / 64) as usize)
            .is_some_and(|w| w & (1 << (seq % 64)) != 0)
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds every pair of `other`.
    pub fn union_with(&mut self, other: &SeqSet) {
        if self.writers.len() < other.writers.len() {
            self.writers.resize(other.writers.len(), Vec::new());
        }
        for (mine, theirs) in self.writers.iter_mut().zip(&other.writers) {
            if mine.len() < theirs.len() {
                mine.resize(theirs.len(), 0);
            }
            for (m, t) in mine.iter_mut().zip(theirs) {
                self.len += u64::from((t & !*m).count_ones());
                *m |= t;
            }
        }
    }

    /// Pairs in `self` that are not in `other`.
    pub fn missing_from(&self, other: &SeqSet) -> u64 {
        let empty = Vec::new();
        self.writers
            .iter()
            .enumerate()
            .map(|(writer, words)| {
                let theirs = other.writers.get(writer).unwrap_or(&empty);
                words
                    .iter()
                    .enumerate()
                    .map(|(i, word)| {
                        let seen = theirs.get(i).copied().unwrap_or(0);
                        u64::from((word & !seen).count_ones())
                    })
                    .sum::<u64>()
            })
            .sum()
    }
}

/// splitmix64: a tiny, seedable generator. Benchmarks need reproducible
/// choices (`--seed`), not cryptographic ones.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> SplitMix64 {
        SplitMix64(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A value in `0..n` (`n > 0`; the bias is below 2⁻³² for small `n`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

/// `count / seconds`, 0 for an empty interval.
pub fn per_second(count: f64, seconds: f64) -> f64 {
    if seconds > 0.0 { count / seconds } else { 0.0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_ordered_and_bounded() {
        let mut previous = 0;
        for value in (0..5000u64).chain([u64::MAX / 2, u64::MAX - 1, u64::MAX]) {
            let index = bucket_of(value);
            assert!(index < BUCKETS, "{value}");
            assert!(index >= previous, "{value}");
            previous = index;
            let high = bucket_high(index);
            assert!(high >= value, "{value} > {high}");
            // Relative error of the reported value ≤ 1/64.
            assert!(
                (high - value) as f64 <= value as f64 / 64.0 + 1.0,
                "{value}"
            );
        }
    }

    #[test]
    fn quantiles_are_within_the_bucket_error() {
        let mut h = Histogram::default();
        assert_eq!(h.quantile(0.5), None);
        for micros in 1..=10_000u64 {
            h.record(micros * 1000);
        }
        assert_eq!(h.count(), 10_000);
        for (q, exact) in [
            (0.5, 5_000_000.0),
            (0.99, 9_900_000.0),
            (0.999, 9_990_000.0),
        ] {
            let got = h.quantile(q).expect("recorded") as f64;
            assert!(
                got >= exact && got <= exact * (1.0 + 1.0 / 64.0),
                "q{q}: {got} vs {exact}"
            );
        }
        assert_eq!(h.quantile(1.0), Some(10_000_000));
        assert_eq!(h.max(), Some(10_000_000));
    }

    #[test]
    fn merged_histograms_count_everything() {
        let mut a = Histogram::default();
        let mut b = Histogram::default();
        for v in 0..100 {
            a.record(v);
            b.record(v + 1000);
        }
        a.merge(&b);
        assert_eq!(a.count(), 200);
        assert_eq!(a.max(), Some(1099));
        assert_eq!(a.quantile(0.5), Some(99));
    }

    #[test]
    fn seq_sets_find_losses_and_duplicates() {
        let mut acked = SeqSet::new(2);
        let mut seen = SeqSet::new(2);
        for seq in 0..200 {
            assert_eq!(acked.insert(0, seq), Insert::New);
            assert_eq!(acked.insert(1, seq), Insert::New);
        }
        for seq in (0..200).filter(|s| s % 50 != 7) {
            seen.insert(0, seq);
            seen.insert(1, seq);
        }
        assert_eq!(seen.insert(1, 3), Insert::Duplicate);
        assert_eq!(seen.insert(2, 0), Insert::Foreign);
        assert_eq!(seen.insert(0, MAX_SEQ), Insert::Foreign);
        assert_eq!(acked.missing_from(&seen), 8);
        assert_eq!(seen.missing_from(&acked), 0);
        assert!(acked.contains(1, 199) && !seen.contains(0, 57));
        assert_eq!(acked.len(), 400);
        let mut union = seen.clone();
        union.union_with(&acked);
        assert_eq!(union.len(), 400);
        assert_eq!(acked.missing_from(&union), 0);
    }

    #[test]
    fn the_generator_is_reproducible() {
        let a: Vec<u64> = {
            let mut g = SplitMix64::new(7);
            (0..5).map(|_| g.below(5)).collect()
        };
        let b: Vec<u64> = {
            let mut g = SplitMix64::new(7);
            (0..5).map(|_| g.below(5)).collect()
        };
        assert_eq!(a, b);
        let mut g = SplitMix64::new(7);
        let mut counts = [0u32; 5];
        for _ in 0..5000 {
            counts[g.below(5) as usize] += 1;
        }
        assert!(counts.iter().all(|c| *c > 800), "{counts:?}");
    }
}
