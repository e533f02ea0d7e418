//! Timestamps as TiKV and PD define them: `physical_ms << 18 | logical`.

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
    pub const ZERO: TimeStamp = TimeStamp(0);
    pub const MAX: TimeStamp = TimeStamp(u64::MAX);

    pub const fn new(ts: u64) -> Self {
        TimeStamp(ts)
    }

    pub const fn compose(physical_ms: u64, logical: u64) -> Self {
        TimeStamp((physical_ms << LOGICAL_BITS) | (logical & MAX_LOGICAL))
    }

    pub const fn into_inner(self) -> u64 {
        self.0
    }

    pub const fn physical(self) -> u64 {
        self.0 >> LOGICAL_BITS
    }

    pub const fn logical(self) -> u64 {
        self.0 & MAX_LOGICAL
    }

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
