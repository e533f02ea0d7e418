//! Region administration on the status server: the live layout
//! (`GET /debug/regions`) and the changes `kvfeed admin` asks for.
//!
//! - `POST /admin/split?key=HEX[&key=HEX…][&raw=true]`: split at user keys
//!   (memcomparable-encoded first unless `raw`), given in strictly ascending
//!   order; each key splits the region that holds it. A key that is already
//!   a boundary is refused, as is a repeated or out-of-order one.
//! - `POST /admin/merge?region=ID[&target=ID]`: merge a region into a
//!   neighbour (the right one by default, the left one for the last region).
//! - `POST /admin/transfer-leader?region=ID&store=ID`.
//!
//! Every refusal is a `400` with the reason, and nothing changed; a storage
//! failure is a `500`. A change is durable when the answer is sent. The
//! changes run on the blocking pool (each is an fsynced write).
//!
//! The status port has no authentication (like TiKV's); it should listen on
//! a private address (its default is loopback).

use std::sync::Arc;

use hyper::StatusCode;
use serde::Serialize;

use kvfeed_storage::mvcc::encode_bytes;
use kvfeed_storage::region::{
    ChangeError, Region, RegionId, RegionMap, Regions, RegionsError, SplitGroup,
};

use crate::cmd::format::parse_hex;
use crate::kv::errors::hex;
use crate::node::Node;
use crate::status::{Reply, StatusRoutes};

/// Adds the region endpoints to `routes`.
pub fn routes(routes: StatusRoutes, node: &Arc<Node>) -> StatusRoutes {
    let layout = Arc::clone(node.regions());
    let split = Arc::clone(node.regions());
    let merge = Arc::clone(node.regions());
    let transfer = Arc::clone(node.regions());
    routes
        .get("/debug/regions", move |_| {
            Reply::json(&LayoutView::new(&layout))
        })
        .post_async("/admin/split", move |request| {
            let query = Query::parse(request.query);
            let regions = Arc::clone(&split);
            Box::pin(async move { run(move || split_at(&regions, query?)).await })
        })
        .post_async("/admin/merge", move |request| {
            let query = Query::parse(request.query);
            let regions = Arc::clone(&merge);
            Box::pin(async move {
                run(move || {
                    let query = query?;
                    query.only(&["region", "target"])?;
                    let source = RegionId(query.number("region")?);
                    let target = query.optional_number("target")?.map(RegionId);
                    let region = regions.merge(source, target).map_err(refused)?;
                    Ok(Reply::json(&RegionView::from(&region)))
                })
                .await
            })
        })
        .post_async("/admin/transfer-leader", move |request| {
            let query = Query::parse(request.query);
            let regions = Arc::clone(&transfer);
            Box::pin(async move {
                run(move || {
                    let query = query?;
                    query.only(&["region", "store"])?;
                    let id = RegionId(query.number("region")?);
                    let store = query.number("store")?;
                    let region = regions.transfer_leader(id, store).map_err(refused)?;
                    Ok(Reply::json(&RegionView::from(&region)))
                })
                .await
            })
        })
}

/// Runs a change on the blocking pool; `Err` is the reply to send instead.
async fn run(op: impl FnOnce() -> Result<Reply, Reply> + Send + 'static) -> Reply {
    match tokio::task::spawn_blocking(op).await {
        Ok(Ok(reply) | Err(reply)) => reply,
        Err(err) => Reply::text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("the region change failed inside the server: {err}\n"),
        ),
    }
}

fn split_at(regions: &Regions, query: Query) -> Result<Reply, Reply> {
    query.only(&["key", "raw"])?;
    let raw = match query.values("raw").as_slice() {
        [] => false,
        ["true" | "1"] => true,
        ["false" | "0"] => false,
        other => return Err(bad(format!("raw must be true or false, not {other:?}"))),
    };
    let keys = query
        .values("key")
        .into_iter()
        .map(|k| {
            parse_hex(k)
                .map(|key| if raw { key } else { encode_bytes(&key) })
                .map_err(|e| bad(format!("key {k:?}: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if keys.is_empty() {
        return Err(bad("give at least one key=HEX".into()));
    }
    let groups = group_by_region(&regions.current(), &keys)?;
    let mut made = Vec::new();
    for (region, keys) in groups {
        made.extend(regions.split(region, None, keys).map_err(refused)?);
    }
    Ok(Reply::json(
        &made.iter().map(RegionView::from).collect::<Vec<_>>(),
    ))
}

/// Checks the keys (strictly ascending, none already a boundary) and groups
/// them by the region that holds each, in key order.
fn group_by_region(map: &RegionMap, keys: &[Vec<u8>]) -> Result<Vec<SplitGroup>, Reply> {
    if let Some(w) = keys.windows(2).find(|w| w[0] >= w[1]) {
        let what = if w[0] == w[1] {
            "repeated"
        } else {
            "not in ascending order"
        };
        return Err(bad(format!(
            "split keys must be strictly ascending: {} is {what}",
            hex(&w[1])
        )));
    }
    let (groups, boundaries) = map.group_by_region(keys);
    if let Some(key) = boundaries.first() {
        return Err(bad(format!(
            "{} is already the start of region {}",
            hex(key),
            map.locate(key).id
        )));
    }
    Ok(groups)
}

fn refused(err: RegionsError) -> Reply {
    match err {
        RegionsError::Change(ChangeError::Region(e)) => {
            Reply::text(StatusCode::NOT_FOUND, format!("{e}\n"))
        }
        RegionsError::Change(e) => bad(e.to_string()),
        RegionsError::Storage(e) => Reply::text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("{}\n", kvfeed_client::error::error_chain(&e)),
        ),
    }
}

fn bad(message: String) -> Reply {
    Reply::text(StatusCode::BAD_REQUEST, format!("{message}\n"))
}

/// A query string as `name=value` pairs (no percent-decoding: every value
/// here is a number, a hex string or a boolean).
struct Query(Vec<(String, String)>);

impl Query {
    fn parse(query: Option<&str>) -> Result<Query, Reply> {
        let mut pairs = Vec::new();
        for pair in query
            .unwrap_or_default()
            .split('&')
            .filter(|p| !p.is_empty())
        {
            let (name, value) = pair
                .split_once('=')
                .ok_or_else(|| bad(format!("{pair:?} is not name=value")))?;
            pairs.push((name.to_owned(), value.to_owned()));
        }
        Ok(Query(pairs))
    }

    /// Refuses parameters other than `names`: a typo must not be ignored.
    fn only(&self, names: &[&str]) -> Result<(), Reply> {
        match self.0.iter().find(|(n, _)| !names.contains(&n.as_str())) {
            Some((n, _)) => Err(bad(format!("unknown parameter {n:?} (expected {names:?})"))),
            None => Ok(()),
        }
    }

    fn values(&self, name: &str) -> Vec<&str> {
        self.0
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    fn optional_number(&self, name: &str) -> Result<Option<u64>, Reply> {
        match self.values(name).as_slice() {
            [] => Ok(None),
            [v] => v
                .parse()
                .map(Some)
                .map_err(|_| bad(format!("{name} must be a number, not {v:?}"))),
            _ => Err(bad(format!("{name} is given more than once"))),
        }
    }

    fn number(&self, name: &str) -> Result<u64, Reply> {
        self.optional_number(name)?
            .ok_or_else(|| bad(format!("missing {name}=NUMBER")))
    }
}

/// The body of `/debug/regions`.
#[derive(Serialize)]
struct LayoutView {
    /// How many changes led to this layout (since the data directory was
    /// created).
    generation: u64,
    stores: Vec<u64>,
    splits: u64,
    merges: u64,
    leader_transfers: u64,
    regions: Vec<RegionView>,
}

impl LayoutView {
    fn new(regions: &Regions) -> LayoutView {
        let map = regions.current();
        let counts = regions.counts();
        LayoutView {
            generation: map.generation(),
            stores: map.stores().to_vec(),
            splits: counts.splits,
            merges: counts.merges,
            leader_transfers: counts.leader_transfers,
            regions: map.regions().iter().map(RegionView::from).collect(),
        }
    }
}

/// One region as JSON: boundaries as hex of the encoded keys.
#[derive(Serialize)]
struct RegionView {
    id: u64,
    start_key: String,
    end_key: String,
    conf_ver: u64,
    version: u64,
    leader_store: u64,
    peers: Vec<PeerView>,
}

#[derive(Serialize)]
struct PeerView {
    id: u64,
    store_id: u64,
}

impl From<&Region> for RegionView {
    fn from(r: &Region) -> RegionView {
        RegionView {
            id: r.id.0,
            start_key: hex(&r.start_key),
            end_key: hex(&r.end_key),
            conf_ver: r.epoch.conf_ver,
            version: r.epoch.version,
            leader_store: r.leader_store,
            peers: r
                .peers
                .iter()
                .map(|p| PeerView {
                    id: p.id,
                    store_id: p.store_id,
                })
                .collect(),
        }
    }
}

/// The layout's metrics, read from [`Regions`] at scrape time:
/// `kvfeed_regions` and the change counters since the process started.
pub struct RegionMetrics {
    regions: Arc<Regions>,
    count: prometheus::IntGauge,
    splits: prometheus::IntCounter,
    merges: prometheus::IntCounter,
    transfers: prometheus::IntCounter,
}

impl RegionMetrics {
    pub fn new(regions: Arc<Regions>) -> Result<RegionMetrics, prometheus::Error> {
        Ok(RegionMetrics {
            regions,
            count: prometheus::IntGauge::new("kvfeed_regions", "Regions in the layout.")?,
            splits: prometheus::IntCounter::new(
                "kvfeed_region_splits_total",
                "Region splits (each may create several regions).",
            )?,
            merges: prometheus::IntCounter::new("kvfeed_region_merges_total", "Region merges.")?,
            transfers: prometheus::IntCounter::new(
                "kvfeed_region_leader_transfers_total",
                "Region leader transfers.",
            )?,
        })
    }
}

impl prometheus::core::Collector for RegionMetrics {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        [
            self.count.desc(),
            self.splits.desc(),
            self.merges.desc(),
            self.transfers.desc(),
        ]
        .concat()
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        let counts = self.regions.counts();
        let regions = self.regions.current().regions().len();
        self.count.set(i64::try_from(regions).unwrap_or(i64::MAX));
        // Counters only move forward; catch them up with the layout's counts.
        for (counter, total) in [
            (&self.splits, counts.splits),
            (&self.merges, counts.merges),
            (&self.transfers, counts.leader_transfers),
        ] {
            counter.inc_by(total.saturating_sub(counter.get()));
        }
        [
            self.count.collect(),
            self.splits.collect(),
            self.merges.collect(),
            self.transfers.collect(),
        ]
        .concat()
    }
}
