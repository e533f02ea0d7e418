//! Types that kvfeed's storage and its clients share, without the storage
//! engine: a program built on the client compiles this crate, never
//! `kvfeed-storage`.
//!
//! - [`timestamp`]: TiKV/PD hybrid timestamps (`physical_ms << 18 | logical`).
//! - [`codec`]: TiKV's memcomparable byte encoding of keys, the form region
//!   boundaries of the transactional key space are written in.
//! - [`units`]: human-readable sizes and durations (TiKV's formats), for
//!   the configuration file and the command line.
//! - [`RegionId`]: a region's identifier.
//!
//! Invariant: nothing here does I/O or depends on another kvfeed crate, so
//! every other crate may depend on this one.

#![warn(missing_docs)]

pub mod codec;
pub mod timestamp;
pub mod units;

use std::fmt;

pub use codec::{CodecError, decode_bytes, encode_bytes};
pub use timestamp::TimeStamp;

/// A region's identifier, as PD hands it out and every KV and feed request
/// names it. It names a region, not a layout: the region's epoch says which
/// version of its bounds a request was routed by.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RegionId(pub u64);

impl fmt::Display for RegionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}
