//! Automatic region split and merge: TiKV's split checker and PD's merge
//! checker in one task.
//!
//! Every `split-region-check-tick-interval` one pass, on the blocking pool:
//!
//! 1. **What changed.** A store observer ([`WriteTracker`]) counted the
//!    bytes and versions written to each region since the last pass (client
//!    writes and GC) and which regions a split made. Nothing else is read to
//!    find candidates: an idle server with 10,000 regions costs a walk over
//!    the in-memory layout per pass, no I/O.
//! 2. **Split.** A region written to by at least 1/16 of a split part
//!    (TiKV's `region-split-check-diff`) whose size, last measured plus
//!    written since, may have reached `region-max-size` / `region-max-keys`
//!    is scanned ([`check_split`], which stops after 10 split points,
//!    TiKV's `batch-split-limit`) and split at the points found, with its
//!    epoch as measured, so a region changed meanwhile is left for the next
//!    pass. At most [`SPLIT_CHECKS_PER_TICK`] regions are scanned
//!    per pass, the most written first; the others keep their counts.
//! 3. **Merge** (unless `max-merge-region-size` is 0). A region is small if
//!    it was measured at most `max-merge-region-size` and
//!    `max-merge-region-keys` and is still so counting every byte written
//!    since. Regions never measured, and measured big but written to since
//!    (deletes and GC shrink), are measured lazily: at most
//!    [`MERGE_MEASURES_PER_TICK`] per pass, round-robin in key order, each
//!    scan stopping once above the threshold. Two adjacent small regions
//!    are merged (the left into the right) when together they stay below
//!    the split thresholds (so they would not split again), neither was
//!    made by a split this pass or within `split-merge-interval`, and their
//!    boundary is not one the server keeps (the default boundary and
//!    `server.split-keys`). At most [`MERGES_PER_TICK`] merges per pass
//!    (PD's `merge-schedule-limit`). As in PD, nothing merges within
//!    `split-merge-interval` of the start: splits from before a restart
//!    are not remembered.
//!
//! Splits and merges go through [`Regions`], exactly as admin requests do:
//! persisted with the change, seen by the feed in the store's order.
//! What is known of a region's size is kept per region id and epoch and
//! forgotten when either changes; it lives in memory only, so after a
//! restart a region is measured again once it is written to (or, for merging,
//! when the round-robin reaches it).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvfeed_storage::region::{
    Region, RegionEpoch, RegionId, RegionMap, RegionSize, Regions, RegionsError, SplitLimits,
    WriteTracker, check_split, measure,
};
use kvfeed_storage::store::{ObserverId, Store};
use tracing::Instrument;

use prometheus::IntCounter;

use crate::config::{Config, ConfigError};
use crate::metrics::{Metrics, MetricsError};
use crate::node::{Node, NodeError};
use crate::shutdown::ShutdownSignal;

/// Regions scanned for a split per pass.
pub const SPLIT_CHECKS_PER_TICK: usize = 16;
/// Regions measured for a merge per pass.
pub const MERGE_MEASURES_PER_TICK: usize = 32;
/// Merges per pass (PD's default `merge-schedule-limit`).
pub const MERGES_PER_TICK: usize = 8;

/// What the checker needs of the configuration.
#[derive(Clone, Debug)]
pub struct CheckConfig {
    limits: SplitLimits,
    interval: Duration,
    merge: Option<RegionSize>,
    split_merge_interval: Duration,
    /// Boundaries the server keeps: never merged away.
    kept: BTreeSet<Vec<u8>>,
}

impl CheckConfig {
    /// From a validated configuration.
    pub fn from_config(config: &Config) -> Result<CheckConfig, ConfigError> {
        Ok(CheckConfig {
            limits: config.coprocessor.split_limits(),
            interval: config
                .raftstore
                .split_region_check_tick_interval
                .as_duration(),
            merge: config.schedule.merge_limit(),
            split_merge_interval: config.schedule.split_merge_interval.as_duration(),
            kept: config.split_keys()?.into_iter().collect(),
        })
    }

    /// Writes that make a region worth checking again: 1/16 of a part.
    fn diff(&self) -> RegionSize {
        RegionSize::new(
            (self.limits.split.bytes / 16).max(1),
            (self.limits.split.keys / 16).max(1),
        )
    }
}

/// A region's size as last measured, valid while its epoch is.
#[derive(Clone, Copy, Debug)]
struct Known {
    epoch: RegionEpoch,
    size: RegionSize,
    /// Whether `size` is the whole region (else a lower bound).
    complete: bool,
}

/// The checker's memory between passes.
#[derive(Debug, Default)]
pub struct State {
    known: HashMap<RegionId, Known>,
    /// Written since the region was last measured.
    since: HashMap<RegionId, RegionSize>,
    /// When a split made the region.
    split_at: HashMap<RegionId, Instant>,
    /// Where the round-robin of merge measurements continues.
    cursor: Vec<u8>,
    /// The first pass: as PD, nothing merges within `split-merge-interval`
    /// of the start (when splits made before it happened is not known).
    started: Option<Instant>,
}

/// What one pass did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Pass {
    /// Regions split, with the number of regions each became.
    pub splits: Vec<(RegionId, usize)>,
    /// Merges: (source, surviving target).
    pub merges: Vec<(RegionId, RegionId)>,
    /// Regions scanned.
    pub scanned: usize,
}

/// What the checker did, for `/metrics` (the layout's own counters count
/// every split and merge, automatic or not).
#[derive(Clone)]
pub struct CheckMetrics {
    splits: IntCounter,
    merges: IntCounter,
    scanned: IntCounter,
}

impl CheckMetrics {
    /// Creates the counters and registers them with `metrics`.
    pub fn register(metrics: &Metrics) -> Result<CheckMetrics, MetricsError> {
        let check = CheckMetrics::unregistered()?;
        for counter in [&check.splits, &check.merges, &check.scanned] {
            metrics.register(Box::new(counter.clone()))?;
        }
        Ok(check)
    }

    /// Counters not attached to any registry (for tests).
    pub fn unregistered() -> Result<CheckMetrics, MetricsError> {
        let counter =
            |name: &str, help: &str| IntCounter::new(name, help).map_err(MetricsError::Register);
        Ok(CheckMetrics {
            splits: counter(
                "kvfeed_region_auto_splits_total",
                "Regions split automatically for reaching region-max-size or region-max-keys.",
            )?,
            merges: counter(
                "kvfeed_region_auto_merges_total",
                "Small adjacent regions merged automatically.",
            )?,
            scanned: counter(
                "kvfeed_region_split_check_scans_total",
                "Regions scanned by the split and merge checker.",
            )?,
        })
    }

    fn record(&self, pass: &Pass) {
        self.splits
            .inc_by(u64::try_from(pass.splits.len()).unwrap_or(u64::MAX));
        self.merges
            .inc_by(u64::try_from(pass.merges.len()).unwrap_or(u64::MAX));
        self.scanned
            .inc_by(u64::try_from(pass.scanned).unwrap_or(u64::MAX));
    }
}

/// Runs the passes over one store's layout.
pub struct SplitChecker {
    store: Arc<Store>,
    regions: Arc<Regions>,
    tracker: Arc<WriteTracker>,
    config: CheckConfig,
    metrics: CheckMetrics,
}

impl SplitChecker {
    /// A checker over `store` and its `regions`. Writes are counted from
    /// [`SplitChecker::spawn`] on.
    pub fn new(
        store: Arc<Store>,
        regions: Arc<Regions>,
        config: CheckConfig,
        metrics: CheckMetrics,
    ) -> SplitChecker {
        let tracker = Arc::new(WriteTracker::new(regions.current()));
        SplitChecker {
            store,
            regions,
            tracker,
            config,
            metrics,
        }
    }

    /// The node's checker, with its metrics in the node's registry.
    pub fn for_node(node: &Node) -> Result<SplitChecker, NodeError> {
        Ok(SplitChecker::new(
            Arc::clone(node.store()),
            Arc::clone(node.regions()),
            CheckConfig::from_config(node.config())?,
            CheckMetrics::register(node.metrics())?,
        ))
    }

    /// Starts counting writes and runs a pass every interval until
    /// `shutdown` fires; a pass in flight is finished first.
    pub fn spawn(self, shutdown: ShutdownSignal) -> tokio::task::JoinHandle<()> {
        let observer = self.start_tracking();
        let span = tracing::info_span!("split_check");
        tokio::spawn(Arc::new(self).run(observer, shutdown).instrument(span))
    }

    fn start_tracking(&self) -> ObserverId {
        let observer = self.store.add_observer(self.tracker.clone());
        // A change between creating the tracker and registering it.
        self.tracker.catch_up(self.regions.current());
        observer
    }

    async fn run(self: Arc<Self>, observer: ObserverId, mut shutdown: ShutdownSignal) {
        let mut state = State::default();
        loop {
            tokio::select! {
                () = shutdown.recv() => break,
                () = tokio::time::sleep(self.config.interval) => {}
            }
            let checker = Arc::clone(&self);
            let outcome = tokio::task::spawn_blocking(move || {
                let pass = checker.pass(&mut state, Instant::now());
                (state, pass)
            })
            .await;
            state = match outcome {
                Ok((state, pass)) => {
                    if !pass.splits.is_empty() || !pass.merges.is_empty() {
                        tracing::debug!(?pass, "split check pass");
                    }
                    state
                }
                Err(err) => {
                    tracing::error!(%err, "split check pass failed; starting afresh");
                    State::default()
                }
            };
        }
        self.store.remove_observer(observer);
        tracing::debug!("split checker stopped");
    }

    /// One pass (blocking: scans and fsynced layout changes).
    pub fn pass(&self, state: &mut State, now: Instant) -> Pass {
        let mut pass = Pass::default();
        let written = self.tracker.take();
        for (id, size) in written.regions {
            let since = state.since.entry(id).or_default();
            *since = since.plus(size);
        }
        let mut just_split: HashSet<RegionId> = written.split.iter().copied().collect();
        for id in written.split {
            state.split_at.insert(id, now);
        }
        let map = self.regions.current();
        forget_stale(state, &map, now, self.config.split_merge_interval);

        self.split_grown(state, &map, now, &mut pass, &mut just_split);
        let started = *state.started.get_or_insert(now);
        let settled = now.saturating_duration_since(started) >= self.config.split_merge_interval;
        if let Some(limit) = self.config.merge
            && settled
        {
            // Splits above changed the layout; merge against the new one.
            let map = self.regions.current();
            self.merge_small(state, &map, limit, now, &mut pass, &just_split);
        }
        self.metrics.record(&pass);
        pass
    }

    fn split_grown(
        &self,
        state: &mut State,
        map: &RegionMap,
        now: Instant,
        pass: &mut Pass,
        just_split: &mut HashSet<RegionId>,
    ) {
        let limits = &self.config.limits;
        let diff = self.config.diff();
        let mut candidates: Vec<(&Region, RegionSize)> = map
            .regions()
            .iter()
            .filter_map(|r| {
                let since = *state.since.get(&r.id)?;
                let may_have_grown = match state.known.get(&r.id) {
                    Some(known) if known.complete => known.size.plus(since).reaches(limits.max),
                    _ => true,
                };
                (since.reaches(diff) && may_have_grown).then_some((r, since))
            })
            .collect();
        candidates.sort_by_key(|(_, since)| std::cmp::Reverse(since.bytes));
        for (region, _) in candidates.into_iter().take(SPLIT_CHECKS_PER_TICK) {
            pass.scanned += 1;
            let check = match check_split(&*self.store.snapshot(), region, limits) {
                Ok(check) => check,
                Err(err) => {
                    tracing::error!(region = %region.id, %err, "cannot measure the region");
                    continue;
                }
            };
            if check.split_keys.is_empty() {
                state.since.remove(&region.id);
                state.known.insert(
                    region.id,
                    Known {
                        epoch: region.epoch,
                        size: check.size,
                        complete: check.complete,
                    },
                );
                continue;
            }
            let keys = check.split_keys.clone();
            match self.regions.split(region.id, Some(region.epoch), keys) {
                Ok(parts) => {
                    tracing::info!(
                        region = %region.id,
                        into = ?parts.iter().map(|r| r.id.0).collect::<Vec<_>>(),
                        bytes = check.size.bytes,
                        keys = check.size.keys,
                        whole = check.complete,
                        "split a region that reached region-max-size / region-max-keys"
                    );
                    pass.splits.push((region.id, parts.len()));
                    let last = parts.last().map(|r| r.id);
                    for (part, size) in parts.iter().zip(&check.parts) {
                        just_split.insert(part.id);
                        state.split_at.insert(part.id, now);
                        state.since.remove(&part.id);
                        let complete = check.complete || Some(part.id) != last;
                        state.known.insert(
                            part.id,
                            Known {
                                epoch: part.epoch,
                                size: *size,
                                complete,
                            },
                        );
                        if !complete {
                            // The scan stopped before the end: look again.
                            state.since.insert(part.id, diff);
                        }
                    }
                }
                // Changed since it was measured: the counts stay, so the
                // next pass looks again.
                Err(RegionsError::Change(err)) => {
                    tracing::debug!(region = %region.id, %err, "split skipped");
                }
                Err(err) => tracing::error!(region = %region.id, %err, "automatic split failed"),
            }
        }
    }

    fn merge_small(
        &self,
        state: &mut State,
        map: &RegionMap,
        limit: RegionSize,
        now: Instant,
        pass: &mut Pass,
        just_split: &HashSet<RegionId>,
    ) {
        let interval = self.config.split_merge_interval;
        let young = |state: &State, id: RegionId| {
            just_split.contains(&id)
                || state
                    .split_at
                    .get(&id)
                    .is_some_and(|at| now.saturating_duration_since(*at) < interval)
        };
        self.measure_lazily(state, map, limit, pass, &young);

        let small = |state: &State, r: &Region| -> Option<RegionSize> {
            let known = state.known.get(&r.id).filter(|k| k.complete)?;
            let size = known
                .size
                .plus(state.since.get(&r.id).copied().unwrap_or_default());
            (!size.exceeds(limit) && !young(state, r.id)).then_some(size)
        };
        let mut merged_now: HashSet<RegionId> = HashSet::new();
        for pair in map.regions().windows(2) {
            if pass.merges.len() >= MERGES_PER_TICK {
                break;
            }
            let [left, right] = pair else { continue };
            if merged_now.contains(&left.id)
                || merged_now.contains(&right.id)
                || self.config.kept.contains(&right.start_key)
            {
                continue;
            }
            let (Some(a), Some(b)) = (small(state, left), small(state, right)) else {
                continue;
            };
            let together = a.plus(b);
            if together.reaches(self.config.limits.split) {
                continue;
            }
            match self
                .regions
                .merge_if_unchanged((left.id, left.epoch), (right.id, right.epoch))
            {
                Ok(survivor) => {
                    tracing::info!(
                        source = %left.id,
                        target = %right.id,
                        bytes = together.bytes,
                        keys = together.keys,
                        "merged small adjacent regions"
                    );
                    pass.merges.push((left.id, right.id));
                    merged_now.extend([left.id, right.id]);
                    for id in [left.id, right.id] {
                        state.known.remove(&id);
                        state.since.remove(&id);
                    }
                    state.known.insert(
                        survivor.id,
                        Known {
                            epoch: survivor.epoch,
                            size: together,
                            complete: true,
                        },
                    );
                }
                Err(RegionsError::Change(err)) => {
                    tracing::debug!(source = %left.id, %err, "merge skipped");
                }
                Err(err) => tracing::error!(source = %left.id, %err, "automatic merge failed"),
            }
        }
    }

    /// Measures up to [`MERGE_MEASURES_PER_TICK`] regions whose smallness
    /// is unknown, continuing round-robin from the last pass.
    fn measure_lazily(
        &self,
        state: &mut State,
        map: &RegionMap,
        limit: RegionSize,
        pass: &mut Pass,
        young: &dyn Fn(&State, RegionId) -> bool,
    ) {
        let regions = map.regions();
        let from = regions.partition_point(|r| r.start_key < state.cursor);
        let order = regions[from..].iter().chain(&regions[..from]);
        let mut measured = 0;
        let mut next_cursor = None;
        for region in order {
            if measured >= MERGE_MEASURES_PER_TICK {
                next_cursor = Some(region.start_key.clone());
                break;
            }
            let since = state.since.get(&region.id).copied().unwrap_or_default();
            let unknown = match state.known.get(&region.id) {
                None => true,
                Some(k) => {
                    since != RegionSize::default()
                        && (!k.complete || k.size.plus(since).exceeds(limit))
                }
            };
            if !unknown || young(state, region.id) {
                continue;
            }
            measured += 1;
            pass.scanned += 1;
            match measure(&*self.store.snapshot(), region, limit) {
                Ok((size, complete)) => {
                    state.since.remove(&region.id);
                    state.known.insert(
                        region.id,
                        Known {
                            epoch: region.epoch,
                            size,
                            complete,
                        },
                    );
                }
                Err(err) => tracing::error!(region = %region.id, %err, "cannot measure the region"),
            }
        }
        state.cursor = next_cursor.unwrap_or_default();
    }
}

/// Drops what is known of regions that are gone or changed, and split
/// times older than the interval.
fn forget_stale(state: &mut State, map: &RegionMap, now: Instant, interval: Duration) {
    let current = |id: &RegionId| map.get(*id).map(|r| r.epoch);
    state
        .known
        .retain(|id, known| current(id) == Some(known.epoch));
    state.since.retain(|id, _| current(id).is_some());
    state
        .split_at
        .retain(|id, at| current(id).is_some() && now.saturating_duration_since(*at) < interval);
}

#[cfg(test)]
#[path = "split_check_tests.rs"]
mod tests;
