//! Timestamps as TiKV and PD define them: `physical_ms << 18 | logical`.
//!
//! The high 46 bits are wall-clock milliseconds since the Unix epoch, the
//! low [`LOGICAL_BITS`] a counter that orders the timestamps handed out
//! within one millisecond. Comparing two timestamps as plain `u64`s
//! therefore compares them in time first, then in issue order, which is
//! what every `start_ts` / `commit_ts` / resolved-ts comparison relies on.
//! The oracle (PD, or kvfeed's own) is what makes them unique and
//! increasing; this module only composes and splits them.

use std::fmt;

/// Bits of a timestamp that hold the logical counter.
pub const LOGICAL_BITS: u32 = 18;
/// Largest logical value in one millisecond.
pub const MAX_LOGICAL: u64 = (1 << LOGICAL_BITS) - 1;

/// A hybrid timestamp from the oracle. `TimeStamp::ZERO` means "none" where
/// the protocol uses 0 that way (e.g. a rollback's commit_ts).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TimeStamp(u64);

impl TimeStamp {
    /// No timestamp: below every timestamp the oracle hands out, so a
    /// checkpoint of zero means "from the beginning".
    pub const ZERO: TimeStamp = TimeStamp(0);
    /// Above every timestamp the oracle can hand out; a bound that
    /// includes every version (e.g. a read at "latest").
    pub const MAX: TimeStamp = TimeStamp(u64::MAX);

    /// Wraps a timestamp as it travels on the wire (the protocol's `u64`).
    pub const fn new(ts: u64) -> Self {
        TimeStamp(ts)
    }

    /// Builds a timestamp from wall-clock milliseconds since the Unix epoch
    /// and a logical counter. Bits of `logical` above [`MAX_LOGICAL`] are
    /// dropped (they would spill into the physical part), as are the top
    /// [`LOGICAL_BITS`] bits of `physical_ms`.
    pub const fn compose(physical_ms: u64, logical: u64) -> Self {
        TimeStamp((physical_ms << LOGICAL_BITS) | (logical & MAX_LOGICAL))
    }

    /// The timestamp as the protocol's `u64`, for messages and for
    /// encoding into keys.
    pub const fn into_inner(self) -> u64 {
        self.0
    }

    /// The wall-clock part: milliseconds since the Unix epoch at which the
    /// oracle issued it (what a human-readable time is made from).
    pub const fn physical(self) -> u64 {
        self.0 >> LOGICAL_BITS
    }

    /// The logical part, `0..=MAX_LOGICAL`: the order of issue within one
    /// millisecond.
    pub const fn logical(self) -> u64 {
        self.0 & MAX_LOGICAL
    }

    /// Whether this is [`TimeStamp::ZERO`], the protocol's "none" (e.g. the
    /// commit_ts of a rollback).
    pub const fn is_zero(self) -> bool {
        self.0 == 0
    }

    /// The next timestamp (saturating).
    pub const fn next(self) -> Self {
        TimeStamp(self.0.saturating_add(1))
    }

    /// The previous timestamp (saturating at zero).
    pub const fn prev(self) -> Self {
        TimeStamp(self.0.saturating_sub(1))
    }
}

impl From<u64> for TimeStamp {
    fn from(ts: u64) -> Self {
        TimeStamp(ts)
    }
}

impl fmt::Display for TimeStamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compose_and_split() {
        let ts = TimeStamp::compose(1_700_000_000_000, 42);
        assert_eq!(ts.physical(), 1_700_000_000_000);
        assert_eq!(ts.logical(), 42);
        assert_eq!(ts.into_inner(), (1_700_000_000_000 << 18) | 42);
        assert!(TimeStamp::compose(1, 0) > TimeStamp::compose(0, MAX_LOGICAL));
    }
}
