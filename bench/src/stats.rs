//! Counting for benchmarks: a latency histogram with bounded error and
//! memory, exact sets of seen puts, and a seeded random generator.
//!
//! Why an HDR histogram: a benchmark may record millions of latencies;
//! keeping them all would make memory grow with the run, and sampling would
//! lose the tail, which is the point. Two significant digits keep every
//! quantile within 1 % of the truth in bounded memory, histograms of several
//! watchers merge exactly, and the maximum is kept exactly.
//!
//! Why bitmaps for loss and duplicates: "nothing lost, nothing repeated"
//! must be exact, not estimated. Each writer numbers its puts 0, 1, 2, …,
//! so a set of puts is one bitmap per writer (one bit per put), and loss is
//! `acknowledged AND NOT seen`, counted word by word.

/// Significant decimal digits the histogram keeps: every quantile within
/// 1 % of the truth.
const SIGNIFICANT_DIGITS: u8 = 2;

/// A histogram of `u64` values (nanoseconds, milliseconds...), over
/// [`hdrhistogram`] with the few operations the benchmarks use. Empty until
/// the first value, so an unused one costs nothing. The maximum is kept
/// exactly beside it (the histogram's own is rounded up to its precision).
#[derive(Clone, Default)]
pub struct Histogram(Option<hdrhistogram::Histogram<u64>>, u64);

impl std::fmt::Debug for Histogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Histogram")
            .field("total", &self.count())
            .field("max", &self.max())
            .finish_non_exhaustive()
    }
}

impl Histogram {
    /// The histogram to record into. `new` auto-resizes, so memory follows
    /// the largest value and merging never runs out of range; it fails only
    /// for more than five significant digits, which the constant rules out.
    fn inner(&mut self) -> Option<&mut hdrhistogram::Histogram<u64>> {
        if self.0.is_none() {
            self.0 = hdrhistogram::Histogram::new(SIGNIFICANT_DIGITS).ok();
        }
        self.0.as_mut()
    }

    /// Records one value (a latency in nanoseconds, in the benchmarks).
    /// A value beyond the histogram's reach is clamped to its top, but the
    /// exact maximum still sees it.
    pub fn record(&mut self, value: u64) {
        self.1 = self.1.max(value);
        if let Some(h) = self.inner()
            && h.record(value).is_err()
        {
            // Beyond what the histogram can grow to: keep it at the top.
            h.saturating_record(value);
        }
    }

    /// Adds every value of `other` (e.g. one watcher's into the total), so
    /// quantiles are over both sets, not an average of two.
    pub fn merge(&mut self, other: &Histogram) {
        let Some(theirs) = &other.0 else {
            return;
        };
        self.1 = self.1.max(other.1);
        if let Some(mine) = self.inner()
            && mine.add(theirs).is_err()
        {
            // Only a histogram without auto-resize can refuse; keep every
            // value anyway, clamped to the range.
            for v in theirs.iter_recorded() {
                mine.saturating_record_n(v.value_iterated_to(), v.count_at_value());
            }
        }
    }

    /// Values recorded.
    pub fn count(&self) -> u64 {
        self.0.as_ref().map_or(0, |h| h.len())
    }

    /// The largest value recorded, exactly (not rounded to the
    /// histogram's precision); `None` when nothing was recorded.
    pub fn max(&self) -> Option<u64> {
        (self.count() > 0).then_some(self.1)
    }

    /// The value at quantile `q` (0..=1): the highest value equivalent to
    /// the `ceil(q·n)`-th smallest within the precision, never above the
    /// maximum. `None` when nothing was recorded.
    pub fn quantile(&self, q: f64) -> Option<u64> {
        let h = self.0.as_ref().filter(|h| !h.is_empty())?;
        let value = h.value_at_quantile(q.clamp(0.0, 1.0));
        Some(h.highest_equivalent(value).min(self.1))
    }
}

/// Largest sequence number a [`SeqSet`] accepts per writer: a value read
/// from the wire cannot make it allocate more than 8 MiB per writer.
pub const MAX_SEQ: u64 = 1 << 26;

/// What [`SeqSet::insert`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Insert {
    /// The pair was not in the set and now is.
    New,
    /// The pair was already in the set: the same put arrived again.
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

    /// Adds (writer, seq) and says whether it is new. Pairs outside the
    /// writers the set was made for, or with `seq ≥` [`MAX_SEQ`], are
    /// refused as [`Insert::Foreign`] and not stored, so a stray value
    /// cannot grow the set.
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

    /// Whether (writer, seq) is in the set.
    pub fn contains(&self, writer: u32, seq: u64) -> bool {
        let Some(words) = self.writers.get(writer as usize) else {
            return false;
        };
        words
            .get((seq / 64) as usize)
            .is_some_and(|w| w & (1 << (seq % 64)) != 0)
    }

    /// Pairs in the set.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the set holds no pair.
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

/// The benchmarks' random generator: reproducible from `--seed`, not
/// cryptographic.
pub type Rng = rand::rngs::SmallRng;

/// A generator seeded with `seed`.
pub fn rng(seed: u64) -> Rng {
    rand::SeedableRng::seed_from_u64(seed)
}

/// `count / seconds`, 0 for an empty interval.
pub fn per_second(count: f64, seconds: f64) -> f64 {
    if seconds > 0.0 { count / seconds } else { 0.0 }
}

#[cfg(test)]
mod tests {
    use super::*;

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
                got >= exact && got <= exact * 1.01,
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
        use rand::RngExt;
        let draw = |seed| -> Vec<u64> {
            let mut g = rng(seed);
            (0..5).map(|_| g.random_range(0..5)).collect()
        };
        assert_eq!(draw(7), draw(7));
        let mut g = rng(7);
        let mut counts = [0u32; 5];
        for _ in 0..5000 {
            counts[g.random_range(0..5usize)] += 1;
        }
        assert!(counts.iter().all(|c| *c > 800), "{counts:?}");
    }
}
