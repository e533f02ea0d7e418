//! What the feed client says on the wire, and what the server's errors mean
//! to it: the one place a Register `ChangeDataRequest` is built.
//!
//! Invariants: every request carries the cluster id PD reported and
//! [`TICDC_VERSION`] (which makes the server send batched resolved ts and
//! check the cluster id); the key range is in PD's key space (encoded for
//! transactions), clipped to the region it is sent for.

use kvfeed_proto::cdcpb::change_data_request::{self, KvApi, Register};
use kvfeed_proto::cdcpb::{self, ChangeDataRequest, Header};
use kvfeed_proto::kvrpcpb::ExtraOp;

use crate::{KeyMode, RegionInfo};

/// The client version announced: current enough for batched resolved ts
/// and cluster-id checks.
pub const TICDC_VERSION: &str = "8.5.0";

/// The gRPC metadata key of `EventFeedV2`'s feature list.
pub const FEATURES_METADATA: &str = "features";
/// The feature asked for on `EventFeedV2`: many request ids on one stream.
pub const STREAM_MULTIPLEXING: &str = "stream-multiplexing";

/// The feed's name for a key mode.
pub fn kv_api(mode: KeyMode) -> KvApi {
    match mode {
        KeyMode::Txn => KvApi::TiDb,
        KeyMode::Raw => KvApi::RawKv,
    }
}

/// One subscription to register: a region and the part of the watched
/// range inside it.
#[derive(Debug, Clone)]
pub struct Registration<'a> {
    /// The cluster id PD reported; the server checks it because the
    /// request announces [`TICDC_VERSION`].
    pub cluster_id: u64,
    /// Names the subscription on its stream: events and errors come back
    /// tagged with it. Must be unique per (stream, region); a repeat is
    /// refused with `duplicate_request`.
    pub request_id: u64,
    /// The region subscribed: its id and epoch go into the request.
    pub region: &'a RegionInfo,
    /// Inclusive start of the subscribed range in PD's key space, inside
    /// the region.
    pub start: &'a [u8],
    /// Exclusive end of the subscribed range in PD's key space; empty =
    /// unbounded, which only a range in the last region can be.
    pub end: &'a [u8],
    /// Changes committed after it are delivered.
    pub checkpoint_ts: u64,
    /// The key space, sent as the request's `kv_api`.
    pub mode: KeyMode,
    /// Ask for old values (`extra_op = ReadOldValue`).
    pub old_value: bool,
}

impl Registration<'_> {
    /// The Register request for this subscription.
    pub fn request(&self) -> ChangeDataRequest {
        ChangeDataRequest {
            header: Some(Header {
                cluster_id: self.cluster_id,
                ticdc_version: TICDC_VERSION.to_owned(),
            }),
            region_id: self.region.id.0,
            region_epoch: Some(self.region.epoch),
            checkpoint_ts: self.checkpoint_ts,
            start_key: self.start.to_vec(),
            end_key: self.end.to_vec(),
            request_id: self.request_id,
            request: Some(change_data_request::Request::Register(Register {})),
            kv_api: kv_api(self.mode).into(),
            extra_op: if self.old_value {
                ExtraOp::ReadOldValue.into()
            } else {
                ExtraOp::Noop.into()
            },
            ..ChangeDataRequest::default()
        }
    }
}

/// A feed error in words, and whether subscribing again (after looking the
/// range up in PD) can help — as TiCDC's kv client decides.
pub fn describe(error: &cdcpb::Error) -> (String, bool) {
    if let Some(e) = &error.epoch_not_match {
        let regions = e.current_regions.len();
        return (format!("epoch_not_match ({regions} current regions)"), true);
    }
    if error.region_not_found.is_some() {
        return ("region_not_found".to_owned(), true);
    }
    if error.not_leader.is_some() {
        return ("not_leader".to_owned(), true);
    }
    if let Some(e) = &error.server_is_busy {
        return (format!("server_is_busy: {}", e.reason), true);
    }
    if error.congested.is_some() {
        return ("congested (output read too slowly)".to_owned(), true);
    }
    if let Some(e) = &error.cluster_id_mismatch {
        return (
            format!(
                "cluster_id_mismatch: the server's cluster is {}, this watch asked for {}",
                e.current, e.request
            ),
            false,
        );
    }
    if let Some(e) = &error.compatibility {
        return (
            format!("compatibility: requires {}", e.required_version),
            false,
        );
    }
    if error.duplicate_request.is_some() {
        return ("duplicate_request".to_owned(), false);
    }
    ("an unknown error".to_owned(), false)
}
