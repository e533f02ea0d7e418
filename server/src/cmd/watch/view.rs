//! What a watch prints for each item of the feed, free of I/O: the driver
//! in the parent module pulls items from [`kvfeed_client::feed::Feed`] and
//! writes the lines produced here.
//!
//! Invariants: the `watching` line (and, with `--from-ts`, the catch-up
//! summary before it) is printed once, when every range of the watch is
//! initialized; catch-up progress is shown only before it; `--progress`
//! prints the resolved ts at most once per [`PROGRESS_INTERVAL`].

use kvfeed_client::KeyMode;
use kvfeed_client::feed::{FeedEvent, Op, Row};

use super::progress::CatchUp;
use super::render::{Change, wall_time};
use super::{PROGRESS_INTERVAL, WatchSpec};

/// Lines produced by one item.
#[derive(Debug, Default)]
pub(super) struct Lines {
    pub(super) out: Vec<String>,
    pub(super) notices: Vec<String>,
    /// Catch-up progress, when due: transient, shown in place on a terminal.
    pub(super) status: Option<String>,
}

/// The watch's view of its feed.
#[derive(Debug)]
pub(super) struct View {
    spec: WatchSpec,
    checkpoint: u64,
    announced: bool,
    last_progress: Option<tokio::time::Instant>,
    /// Counts the catch-up of `--from-ts` until every region is initialized.
    catch_up: Option<CatchUp>,
}

impl View {
    pub(super) fn new(spec: WatchSpec, checkpoint: u64) -> View {
        let catch_up = spec
            .from_ts
            .map(|_| CatchUp::new(tokio::time::Instant::now(), spec.progress_tty));
        View {
            catch_up,
            spec,
            checkpoint,
            announced: false,
            last_progress: None,
        }
    }

    pub(super) fn on_event(&mut self, event: FeedEvent) -> Lines {
        let mut lines = Lines::default();
        match event {
            FeedEvent::Row(row) => lines.out.push(self.line(&row)),
            FeedEvent::CatchUp { rows, bytes } => {
                if let Some(catch_up) = &mut self.catch_up {
                    lines.status = catch_up.add(rows, bytes, tokio::time::Instant::now());
                }
            }
            FeedEvent::Initialized {
                regions_done,
                regions_total,
            } => {
                if regions_done == regions_total {
                    self.announce(regions_total, &mut lines);
                }
            }
            FeedEvent::RegionRetry { region, reason } => lines
                .notices
                .push(format!("region {region}: {reason}; subscribing again")),
            FeedEvent::StreamLost { reason, .. } => {
                lines.notices.push(format!("{reason}; reconnecting"));
            }
            FeedEvent::ResolvedTs(ts) => self.progress(ts.into_inner(), &mut lines),
        }
        lines
    }

    fn line(&self, row: &Row) -> String {
        let change = Change {
            delete: row.op == Op::Delete,
            key: &row.key,
            value: &row.value,
            start_ts: row.start_ts.into_inner(),
            commit_ts: row.commit_ts.into_inner(),
        };
        change.line(self.spec.style, self.spec.json)
    }

    fn announce(&mut self, regions: usize, lines: &mut Lines) {
        if self.announced {
            return;
        }
        self.announced = true;
        if let Some(catch_up) = self.catch_up.take() {
            lines.status = None;
            lines
                .notices
                .push(catch_up.summary(tokio::time::Instant::now()));
        }
        let kind = match self.spec.mode {
            KeyMode::Txn => "transactional",
            KeyMode::Raw => "raw",
        };
        let plural = if regions == 1 { "" } else { "s" };
        lines.notices.push(format!(
            "watching {} ({kind} keys, {regions} region{plural}) for changes after ts={} ({})",
            self.spec.description,
            self.checkpoint,
            wall_time(self.checkpoint)
        ));
    }

    fn progress(&mut self, resolved: u64, lines: &mut Lines) {
        if !self.spec.progress {
            return;
        }
        let now = tokio::time::Instant::now();
        if self
            .last_progress
            .is_none_or(|last| now.duration_since(last) >= PROGRESS_INTERVAL)
        {
            self.last_progress = Some(now);
            lines
                .notices
                .push(format!("resolved ts={resolved} ({})", wall_time(resolved)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cmd::format::Style;
    use bytes::Bytes;
    use kvfeed_storage::TimeStamp;

    fn view(json: bool) -> View {
        let spec = WatchSpec {
            mode: KeyMode::Raw,
            start: b"p".to_vec(),
            end: b"q".to_vec(),
            description: "prefix p".to_owned(),
            from_ts: None,
            style: Style::Text,
            json,
            progress: false,
            progress_tty: false,
        };
        View::new(spec, 100)
    }

    fn row(op: Op, key: &[u8], value: &[u8], start: u64, commit: u64) -> FeedEvent {
        FeedEvent::Row(Row {
            start_ts: TimeStamp::new(start),
            commit_ts: TimeStamp::new(commit),
            op,
            key: Bytes::copy_from_slice(key),
            value: Bytes::copy_from_slice(value),
            old_value: Bytes::new(),
        })
    }

    #[test]
    fn rows_print_as_puts_and_deletes() {
        let mut view = view(false);
        let put = view.on_event(row(Op::Put, b"pk", b"big", 10, 12));
        let delete = view.on_event(row(Op::Delete, b"pd", b"", 13, 13));
        assert_eq!(
            [put.out, delete.out].concat(),
            vec![
                format!("PUT pk big  ts=12 ({})", wall_time(12)),
                format!("DELETE pd  ts=13 ({})", wall_time(13)),
            ]
        );
    }

    #[test]
    fn json_lines_carry_every_field() {
        let lines = view(true).on_event(row(Op::Put, b"k", &[0xff], 5, 6 << 18));
        let json: serde_json::Value = serde_json::from_str(&lines.out[0]).expect("json");
        assert_eq!(
            json,
            serde_json::json!({
                "op": "PUT", "key": "k", "value": "\\xff", "key_hex": "6b", "value_hex": "ff",
                "commit_ts": 6 << 18, "start_ts": 5, "wall_time": "1970-01-01T00:00:00.006Z",
            })
        );
    }

    #[test]
    fn watching_is_announced_once_every_region_is_initialized() {
        let mut view = view(false);
        let initialized = |done| FeedEvent::Initialized {
            regions_done: done,
            regions_total: 2,
        };
        assert!(view.on_event(initialized(1)).notices.is_empty());
        let lines = view.on_event(initialized(2));
        assert_eq!(lines.notices.len(), 1, "{:?}", lines.notices);
        assert!(lines.notices[0].starts_with("watching prefix p (raw keys, 2 regions)"));
        assert!(view.on_event(initialized(2)).notices.is_empty());
    }

    #[test]
    fn recovery_is_reported() {
        let mut view = view(false);
        let retry = view.on_event(FeedEvent::RegionRetry {
            region: 2,
            reason: "not_leader".to_owned(),
        });
        assert_eq!(retry.notices, ["region 2: not_leader; subscribing again"]);
        let lost = view.on_event(FeedEvent::StreamLost {
            store: 1,
            reason: "the server ended the stream".to_owned(),
        });
        assert_eq!(lost.notices, ["the server ended the stream; reconnecting"]);
    }
}
