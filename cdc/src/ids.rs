//! Identifier newtypes, so a request id is never passed where a region or a
//! connection id is expected.
//!
//! - [`ConnId`] is allocated by the feed, strictly increasing and never
//!   reused within a process: a late message about an ended connection can
//!   therefore never touch a newer one, which is what lets the owner ignore
//!   unknown ids safely.
//! - [`RequestId`] is chosen by the client; the same value may appear on
//!   many connections and, on one connection, for many regions.
//! - [`RegionId`] is the storage layer's.

use std::fmt;

use serde::Serialize;

pub use kvfeed_storage::region::RegionId;

/// A feed connection (one client stream).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ConnId(pub u64);

impl fmt::Display for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The client-chosen id grouping subscriptions (`ChangeDataRequest.request_id`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct RequestId(pub u64);

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Which kind of writes a subscription captures. Only the kinds the feed
/// supports exist here; a request for anything else (TxnKV) is refused with
/// a `compatibility` error before a subscription is made.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum KvApi {
    /// Transactional (Percolator) writes; ranges are encoded keys.
    #[serde(rename = "TiDB")]
    TiDb,
    /// Raw writes; ranges are raw keys.
    #[serde(rename = "RawKV")]
    RawKv,
}

impl fmt::Display for KvApi {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KvApi::TiDb => "TiDB",
            KvApi::RawKv => "RawKV",
        })
    }
}
