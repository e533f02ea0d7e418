//! Reading a Kafka sink back: the progress topic (on `open`, and for
//! `kvfeed verify`) and the rows, always with `read_committed`.

use super::*;
use crate::verify::SinkItem;

/// A consumer that sees committed transactions only.
pub(super) fn committed_consumer(
    uri: &KafkaUri,
    timeout: Duration,
) -> Result<BaseConsumer, SinkError> {
    client_config(uri, timeout)
        .set("isolation.level", "read_committed")
        .set("enable.partition.eof", "true")
        .set("enable.auto.commit", "false")
        .set("group.id", "kvfeed-reader")
        .create()
        .map_err(|e| refused(uri, format!("creating a consumer: {e}")))
}

/// Reads `topic` from the beginning up to each partition's high watermark
/// as it was at the start, with `read_committed` (skipping aborted
/// records), calling `f` on every record. Waits for pending transactions
/// to settle; fails when nothing moves for `timeout`.
pub(super) fn read_topic(
    uri: &KafkaUri,
    topic: &str,
    timeout: Duration,
    mut f: impl FnMut(&BorrowedMessage<'_>) -> Result<(), SinkError>,
) -> Result<(), SinkError> {
    let consumer = committed_consumer(uri, timeout)?;
    let Some(partitions) = topic_partitions(consumer.client(), uri, topic, timeout)? else {
        return Err(refused(uri, format!("topic {topic} does not exist")));
    };
    let mut left = BTreeMap::new();
    let mut list = TopicPartitionList::new();
    for p in 0..partitions {
        let (low, high) = consumer
            .fetch_watermarks(topic, p, timeout)
            .map_err(|e| broker(uri, &format!("reading the offsets of {topic}"), e))?;
        if high > low {
            left.insert(p, high);
            list.add_partition_offset(topic, p, Offset::Offset(low))
                .map_err(|e| broker(uri, "assigning partitions", e))?;
        }
    }
    if left.is_empty() {
        return Ok(());
    }
    consumer
        .assign(&list)
        .map_err(|e| broker(uri, "assigning partitions", e))?;
    let mut moved = Instant::now();
    while !left.is_empty() {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                moved = Instant::now();
                f(&m)?;
                if left
                    .get(&m.partition())
                    .is_some_and(|h| m.offset() + 1 >= *h)
                {
                    left.remove(&m.partition());
                }
            }
            Some(Err(KafkaError::PartitionEOF(p))) => {
                // At the end of what read_committed may see; done when
                // that is past the high watermark read at the start.
                let position = consumer
                    .position()
                    .ok()
                    .and_then(|l| l.find_partition(topic, p).map(|e| e.offset()));
                if let (Some(Offset::Offset(o)), Some(h)) = (position, left.get(&p))
                    && o >= *h
                {
                    left.remove(&p);
                }
            }
            Some(Err(e)) => return Err(broker(uri, &format!("reading topic {topic}"), e)),
            None if moved.elapsed() > timeout => {
                return Err(broker(
                    uri,
                    &format!(
                        "reading topic {topic}: partitions {:?} made no progress",
                        left.keys()
                    ),
                    KafkaError::MessageConsumption(RDKafkaErrorCode::OperationTimedOut),
                ));
            }
            None => {}
        }
    }
    Ok(())
}

/// Every changefeed's last record in the progress topic.
pub(super) fn read_progress(
    uri: &KafkaUri,
    timeout: Duration,
) -> Result<BTreeMap<String, Progress>, SinkError> {
    let mut all = BTreeMap::new();
    read_topic(uri, &uri.progress_topic, timeout, |m| {
        let (Some(key), Some(value)) = (m.key(), m.payload()) else {
            return Ok(());
        };
        let key = String::from_utf8_lossy(key).into_owned();
        let progress: Progress = serde_json::from_slice(value).map_err(|e| {
            refused(
                uri,
                format!(
                    "record {key:?} at {} partition {} offset {} is not a kvfeed checkpoint: {e}",
                    uri.progress_topic,
                    m.partition(),
                    m.offset()
                ),
            )
        })?;
        all.insert(key, progress);
        Ok(())
    })?;
    Ok(all)
}

fn header_value(m: &BorrowedMessage<'_>, name: &str) -> Option<String> {
    let headers = m.headers()?;
    headers
        .iter()
        .filter(|h| h.key == name)
        .last()
        .and_then(|h| h.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

fn ts_header(m: &BorrowedMessage<'_>, name: &str) -> Option<TimeStamp> {
    header_value(m, name)?.parse().ok().map(TimeStamp::new)
}

/// Reads what a Kafka sink holds up to its checkpoint, for `kvfeed verify`.
pub struct KafkaReader {
    def: ChangefeedDef,
    checkpoint: TimeStamp,
    items: std::vec::IntoIter<SinkItem>,
    replayed: u64,
}

impl KafkaReader {
    /// Reads the changefeed writing the URI's topic, with `read_committed`.
    /// Rows are checked partition by partition (increasing
    /// `(commit_ts, start_ts, key)`, nothing at or below a watermark after
    /// it; violations become [`SinkItem::Problem`]s; rows not above the
    /// partition's last are dropped as replays, see
    /// [`KafkaReader::replayed`]), then merged in
    /// commit order: keys keep to one partition, so that is the order the
    /// sink wrote them in.
    pub async fn open(uri: &KafkaUri) -> Result<KafkaReader, SinkError> {
        Self::open_with_timeout(uri, DEFAULT_TIMEOUT).await
    }

    /// [`KafkaReader::open`] with a timeout for each broker request.
    pub async fn open_with_timeout(
        uri: &KafkaUri,
        timeout: Duration,
    ) -> Result<KafkaReader, SinkError> {
        let uri = uri.clone();
        blocking(move || read_sink(&uri, timeout)).await
    }

    /// The changefeed's definition.
    pub fn def(&self) -> &ChangefeedDef {
        &self.def
    }

    /// Its checkpoint (its start ts before the first window).
    pub fn checkpoint(&self) -> TimeStamp {
        self.checkpoint
    }

    /// Rows dropped as replays: a row not above the last one read in its
    /// partition can only be a window written again after a restart that
    /// the broker shows although its transaction was aborted (see the
    /// sink's module comment); a consumer drops it by the same rule, so
    /// this is the at-least-once delivery such a broker gives, made exact
    /// by the reader. Always 0 on a broker that hides aborted transactions
    /// from `read_committed` readers.
    pub fn replayed(&self) -> u64 {
        self.replayed
    }

    /// The next item, in commit order.
    pub async fn next(&mut self) -> Result<Option<SinkItem>, SinkError> {
        Ok(self.items.next())
    }
}

fn read_sink(uri: &KafkaUri, timeout: Duration) -> Result<KafkaReader, SinkError> {
    let all = read_progress(uri, timeout)?;
    let ids: Vec<&String> = all
        .iter()
        .filter(|(_, p)| p.topic == uri.topic)
        .map(|(k, _)| k)
        .collect();
    let [id] = ids.as_slice() else {
        return Err(refused(
            uri,
            format!(
                "progress topic {} holds {} changefeeds writing to {}: {ids:?}; verify needs exactly one",
                uri.progress_topic,
                ids.len(),
                uri.topic
            ),
        ));
    };
    let progress = all[*id].clone();
    let def = progress.def;
    let checkpoint = progress.checkpoint_ts.map_or(def.start_ts, TimeStamp::new);
    // Per partition: the last row's order key and the last watermark.
    type Order = (TimeStamp, TimeStamp, Bytes);
    let mut last: HashMap<i32, (Option<Order>, Option<TimeStamp>)> = HashMap::new();
    let mut problems = Vec::new();
    let mut replayed = 0u64;
    let mut rows: Vec<(Order, SinkItem)> = Vec::new();
    let mut watermarks: BTreeMap<TimeStamp, String> = BTreeMap::new();
    let id = id.to_string();
    read_topic(uri, &uri.topic, timeout, |m| {
        if header_value(m, H_CHANGEFEED).as_deref() != Some(id.as_str()) {
            return Ok(());
        }
        let place = format!(
            "topic {} partition {} offset {}",
            uri.topic,
            m.partition(),
            m.offset()
        );
        let (last_row, last_mark) = last.entry(m.partition()).or_default();
        if let Some(ts) = ts_header(m, H_RESOLVED_TS) {
            if ts <= checkpoint {
                watermarks.entry(ts).or_insert(place);
            }
            *last_mark = Some(last_mark.map_or(ts, |w| w.max(ts)));
            return Ok(());
        }
        let row = format::decode(def.format, m.payload().unwrap_or_default())
            .map_err(|e| refused(uri, format!("{place}: {e}")))?;
        let order = (row.commit_ts, row.start_ts, row.key.clone());
        if let Some(before) = last_row
            && *before >= order
        {
            // A replay (see `replayed`). A row that is really out of order
            // would be missing from where it belongs: the state comparison
            // of `verify` still finds it.
            replayed += 1;
            return Ok(());
        }
        if let Some(w) = last_mark
            && row.commit_ts <= *w
        {
            problems.push(format!(
                "{place}: commit_ts {} comes after the watermark {w} in the same partition",
                row.commit_ts
            ));
        }
        *last_row = Some(order.clone());
        if row.commit_ts <= checkpoint {
            let value_omitted = header_value(m, H_VALUE_OMITTED).as_deref() == Some("true");
            rows.push((
                order,
                SinkItem::Row {
                    row,
                    value_omitted,
                    place,
                },
            ));
        }
        Ok(())
    })?;
    // Equal rows stay two rows: `Check` reports the duplicate.
    rows.sort_by(|a, b| a.0.cmp(&b.0));
    let mut items: Vec<SinkItem> = problems.into_iter().map(SinkItem::Problem).collect();
    let mut marks = watermarks.into_iter().peekable();
    for (order, item) in rows {
        while let Some((ts, _)) = marks.peek()
            && *ts < order.0
        {
            if let Some((ts, place)) = marks.next() {
                items.push(SinkItem::Watermark { ts, place });
            }
        }
        items.push(item);
    }
    items.extend(marks.map(|(ts, place)| SinkItem::Watermark { ts, place }));
    Ok(KafkaReader {
        def,
        checkpoint,
        items: items.into_iter(),
        replayed,
    })
}
