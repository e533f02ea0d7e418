//! `kvfeed verify`: proves that a sink holds every change of its range
//! exactly once, in commit order, whole transactions together.
//!
//! It reads what the sink holds up to its checkpoint, checks the order
//! rules row by row, replays the rows over the range's state at the start
//! ts, and compares the result with a snapshot scan at the checkpoint:
//! - order: `(commit_ts, start_ts, key)` strictly increases through the
//!   sink, so commit order holds, each transaction's rows are adjacent and
//!   no row appears twice;
//! - windows: every row lies in its window `(from, to]` and above the start
//!   ts, so no transaction is split across windows and none leaks past the
//!   checkpoint;
//! - content: every key's value after the replay equals the store's at the
//!   checkpoint, and no key is missing or extra — a lost or torn
//!   transaction shows up here.
//!
//! Raw keys have no snapshots at a past ts: a raw changefeed is compared
//! with the store as it is now, which matches only while nothing has been
//! written to the range since the checkpoint; with a start ts above 0 only
//! the keys the sink holds are compared (the earlier state is unknown).

use std::collections::BTreeMap;

use kvfeed_client::feed::{Op, Row};
use kvfeed_client::text::escape;
use kvfeed_client::{ClientError, Cluster};
use kvfeed_types::TimeStamp;

use crate::def::{ChangefeedDef, Mode};
use crate::sink::file::FileSinkReader;
use crate::sink::kafka::KafkaReader;
use crate::sink::nats::NatsReader;
use crate::sink::{SinkError, SinkUri};

/// Mismatches listed in full; the rest are only counted.
pub const MAX_LISTED: usize = 50;

/// What `verify` found.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Report {
    /// The changefeed the sink holds.
    pub id: String,
    /// The sink's checkpoint (0 when it has none yet).
    pub checkpoint_ts: u64,
    /// Rows read.
    pub rows: u64,
    /// Transactions read (distinct `(commit_ts, start_ts)`).
    pub transactions: u64,
    /// Keys compared with the store.
    pub keys_compared: u64,
    /// Rows the sink holds without their value (larger than its
    /// `max-message-bytes`); their keys' values are not compared.
    pub values_omitted: u64,
    /// Rows a Kafka sink holds twice because the broker shows the rows of
    /// aborted transactions (replays after a restart), dropped by their
    /// partition's order as a consumer would drop them; 0 for other sinks
    /// and for brokers that hide aborted transactions.
    pub replayed_rows: u64,
    /// Problems found, at most [`MAX_LISTED`].
    pub problems: Vec<String>,
    /// Problems found in all.
    pub problem_count: u64,
}

impl Report {
    /// Whether the sink is exactly the store's history.
    pub fn is_clean(&self) -> bool {
        self.problem_count == 0
    }

    fn problem(&mut self, text: String) {
        self.problem_count += 1;
        if self.problems.len() < MAX_LISTED {
            self.problems.push(text);
        }
    }
}

/// Why `verify` could not check.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The sink cannot be read.
    #[error(transparent)]
    Sink(#[from] SinkError),
    /// A webhook cannot be read back.
    #[error(
        "{uri}: a webhook sink cannot be read back; verify the receiver's copy, or use a file:// sink"
    )]
    Unreadable {
        /// The URI given.
        uri: String,
    },
    /// The snapshot scan failed.
    #[error("scanning the store")]
    Scan(#[from] ClientError),
}

/// Reads the sink at `uri` and compares it with `cluster`.
pub async fn verify(cluster: &Cluster, uri: &str) -> Result<Report, VerifyError> {
    match SinkUri::parse(uri)? {
        SinkUri::File(dir) => {
            let reader = FileSinkReader::open(&dir)?;
            let def = reader.def().clone();
            let checkpoint = reader.checkpoint().unwrap_or(def.start_ts);
            let mut check = Check::new(&def, checkpoint);
            for item in reader.rows() {
                let item = item?;
                let place = format!("{} line {}", item.file, item.line);
                check.row(&item.row, false, &place);
            }
            check.finish(cluster).await
        }
        SinkUri::Nats(nats) => {
            let mut reader = NatsReader::open(&nats).await?;
            let def = reader.def().clone();
            let mut check = Check::new(&def, reader.checkpoint());
            while let Some(item) = reader.next().await? {
                check.item(item);
            }
            check.finish(cluster).await
        }
        SinkUri::Kafka(kafka) => {
            let mut reader = KafkaReader::open(&kafka).await?;
            let def = reader.def().clone();
            let mut check = Check::new(&def, reader.checkpoint());
            check.report.replayed_rows = reader.replayed();
            while let Some(item) = reader.next().await? {
                check.item(item);
            }
            check.finish(cluster).await
        }
        SinkUri::Webhook(_) => Err(VerifyError::Unreadable {
            uri: uri.to_owned(),
        }),
    }
}

/// A report being filled in.
struct Check<'a> {
    report: Report,
    replay: Replay<'a>,
    /// The last watermark read from a broker sink.
    watermark: Option<TimeStamp>,
}

impl<'a> Check<'a> {
    fn new(def: &'a ChangefeedDef, checkpoint: TimeStamp) -> Self {
        Check {
            report: Report {
                id: def.id.to_string(),
                checkpoint_ts: checkpoint.into_inner(),
                ..Report::default()
            },
            replay: Replay::new(def, checkpoint),
            watermark: None,
        }
    }

    fn row(&mut self, row: &Row, value_omitted: bool, place: &str) {
        if let Some(w) = self.watermark
            && row.commit_ts <= w
        {
            self.report.problem(format!(
                "{place}: key {} at commit_ts {} comes after the watermark {w}",
                escape(&row.key),
                row.commit_ts
            ));
        }
        self.replay.row(row, value_omitted, place, &mut self.report);
    }

    /// One message of a broker sink.
    fn item(&mut self, item: SinkItem) {
        match item {
            SinkItem::Row {
                row,
                value_omitted,
                place,
            } => self.row(&row, value_omitted, &place),
            SinkItem::Problem(text) => self.report.problem(text),
            SinkItem::Watermark { ts, place } => {
                if let Some(w) = self.watermark
                    && ts < w
                {
                    self.report.problem(format!(
                        "{place}: watermark {ts} is below the one before, {w}"
                    ));
                }
                if let Some((commit_ts, _, key)) = &self.replay.last
                    && *commit_ts > ts
                {
                    self.report.problem(format!(
                        "{place}: watermark {ts} comes after key {} at commit_ts {commit_ts}",
                        escape(key)
                    ));
                }
                self.watermark = Some(self.watermark.map_or(ts, |w| w.max(ts)));
            }
        }
    }

    async fn finish(mut self, cluster: &Cluster) -> Result<Report, VerifyError> {
        let def = self.replay.def;
        let checkpoint = self.replay.checkpoint;
        let (expected, complete) = self.replay.expected(cluster).await?;
        let actual = snapshot(cluster, def, checkpoint).await?;
        compare(expected, actual, complete, &mut self.report);
        Ok(self.report)
    }
}

/// What a broker sink's reader yields, in the order the sink holds it.
#[derive(Debug)]
pub enum SinkItem {
    /// A row; `value_omitted` when it was too large and sent key-only.
    Row {
        /// The row (its value empty when omitted).
        row: Row,
        /// Whether the sink left the value out.
        value_omitted: bool,
        /// Where it was read, for problems.
        place: String,
    },
    /// "Every row committed at or below `ts` comes before this."
    Watermark {
        /// The watermark.
        ts: TimeStamp,
        /// Where it was read.
        place: String,
    },
    /// Something wrong the reader found itself (a Kafka partition out of
    /// order, which the merged order no longer shows), for the report.
    Problem(String),
}

/// The rows' effect, and the order checks.
struct Replay<'a> {
    def: &'a ChangefeedDef,
    checkpoint: TimeStamp,
    last: Option<(TimeStamp, TimeStamp, bytes::Bytes)>,
    /// Key → what the rows so far say of it.
    state: Expected,
}

impl<'a> Replay<'a> {
    fn new(def: &'a ChangefeedDef, checkpoint: TimeStamp) -> Self {
        Replay {
            def,
            checkpoint,
            last: None,
            state: BTreeMap::new(),
        }
    }

    fn row(&mut self, row: &Row, value_omitted: bool, place: &str, report: &mut Report) {
        report.rows += 1;
        let order = (row.commit_ts, row.start_ts, row.key.clone());
        match &self.last {
            Some(last) if *last >= order => {
                let what = if *last == order {
                    "a duplicate of the row before"
                } else {
                    "out of order"
                };
                report.problem(format!(
                    "{place}: key {} at commit_ts {} is {what}",
                    escape(&row.key),
                    row.commit_ts
                ));
            }
            Some(last) if (last.0, last.1) == (order.0, order.1) => {}
            _ => report.transactions += 1,
        }
        self.last = Some(order);
        if row.commit_ts <= self.def.start_ts || row.commit_ts > self.checkpoint {
            report.problem(format!(
                "{place}: key {} at commit_ts {} lies outside (start ts {}, checkpoint {}]",
                escape(&row.key),
                row.commit_ts,
                self.def.start_ts,
                self.checkpoint
            ));
        }
        let key = row.key.as_ref();
        if key < self.def.start.as_slice() || (!self.def.end.is_empty() && key >= &self.def.end[..])
        {
            report.problem(format!(
                "{place}: key {} lies outside the changefeed's range",
                escape(key)
            ));
        }
        let value = match row.op {
            _ if value_omitted => {
                report.values_omitted += 1;
                Known::Omitted
            }
            Op::Put => Known::Value(row.value.to_vec()),
            Op::Delete => Known::Absent,
        };
        self.state.insert(row.key.to_vec(), value);
    }

    /// The range's state at the checkpoint as the sink tells it (key →
    /// value, `None` = no value): the state at the start ts with the rows
    /// applied, and whether it covers the whole range (it does not for a
    /// raw changefeed that started above 0: only the keys it touched).
    async fn expected(self, cluster: &Cluster) -> Result<(Expected, bool), ClientError> {
        let complete = self.def.start_ts.is_zero() || self.def.mode == Mode::Txn;
        let mut base: Expected = if self.def.start_ts.is_zero() || !complete {
            BTreeMap::new()
        } else {
            snapshot(cluster, self.def, self.def.start_ts)
                .await?
                .into_iter()
                .map(|(k, v)| (k, Known::Value(v)))
                .collect()
        };
        base.extend(self.state);
        Ok((base, complete))
    }
}

/// What the sink says of a key.
#[derive(Debug, PartialEq, Eq)]
enum Known {
    /// It has this value.
    Value(Vec<u8>),
    /// It has no value (deleted, or never written).
    Absent,
    /// Its last row was too large and sent without its value.
    Omitted,
}

/// Key → what the sink says of it.
type Expected = BTreeMap<Vec<u8>, Known>;

/// Every pair of the range at `ts` (raw: as it is now).
async fn snapshot(
    cluster: &Cluster,
    def: &ChangefeedDef,
    ts: TimeStamp,
) -> Result<BTreeMap<Vec<u8>, Vec<u8>>, ClientError> {
    let mut scanner = cluster.scan_at(def.mode.into(), &def.start, &def.end, None, ts);
    let mut out = BTreeMap::new();
    while let Some(page) = scanner.next_page().await? {
        out.extend(page.into_iter().map(|p| (p.key, p.value)));
    }
    Ok(out)
}

/// Lists keys whose value differs between what the sink says and the
/// store; when `complete`, keys the sink never mentioned must not exist.
fn compare(
    expected: Expected,
    mut actual: BTreeMap<Vec<u8>, Vec<u8>>,
    complete: bool,
    report: &mut Report,
) {
    let show = |v: &Known| match v {
        Known::Value(v) => format!("{:?}", escape(v)),
        Known::Absent | Known::Omitted => "no value".to_owned(),
    };
    for (key, want) in expected {
        let have = match actual.remove(&key) {
            Some(v) => Known::Value(v),
            None => Known::Absent,
        };
        if want == Known::Omitted {
            // Too large to send: the sink cannot tell, and the report
            // counts it in `values_omitted`.
            continue;
        }
        report.keys_compared += 1;
        if have != want {
            report.problem(format!(
                "key {}: the sink says {}, the store has {}",
                escape(&key),
                show(&want),
                show(&have)
            ));
        }
    }
    if !complete {
        return;
    }
    for (key, have) in actual {
        report.keys_compared += 1;
        report.problem(format!(
            "key {}: the store has {:?}, the sink has no value (a change is missing)",
            escape(&key),
            escape(&have)
        ));
    }
}
