//! The NATS JetStream sink: one message per row, in commit order, with a
//! deterministic message id, and the checkpoint in a key-value bucket.
//!
//! Messages (all in one stream, so a consumer of `PREFIX.>` reads them in
//! the order they were published):
//! - a row goes to `PREFIX.<n>`, `n` = a stable hash of the key ([`super::key_bucket`]) modulo
//!   `subject-buckets` (so a consumer of one subject still sees each key's
//!   changes in order); its body is the row [`format::encode`]d;
//! - at the end of every window a watermark goes to `PREFIX.resolved`,
//!   body `{"resolved":"<to>"}`: every row committed at or below `to` came
//!   before it.
//!
//! Headers: `Nats-Msg-Id` — `<id>-<commit_ts>-<start_ts>-<key hex>` for a
//! row, `<id>-resolved-<to>` for a watermark — plus `Kvfeed-Changefeed`,
//! `Kvfeed-Commit-Ts`, `Kvfeed-Start-Ts` (rows) or `Kvfeed-Resolved-Ts`
//! (watermarks), and `Kvfeed-Value-Omitted: true` on a row whose message
//! would exceed `max-message-bytes`: it is sent with an empty value and no
//! old value instead of halting the changefeed.
//!
//! Exactly once:
//! 1. Publishes are pipelined (up to [`MAX_PENDING`] unacknowledged) on one
//!    connection, so JetStream stores them in order. A window's watermark
//!    is published after every row of the window is acknowledged, and the
//!    checkpoint — `{def, checkpoint_ts, stream_seq}` under the changefeed
//!    id in the key-value bucket — after the watermark is.
//! 2. On `open`, the sink reads the stream past the checkpoint's
//!    `stream_seq` (the tail an interrupted run left): a watermark there
//!    moves the checkpoint forward to it (everything below it is stored),
//!    and the ids of rows after the last one are remembered, so the replay
//!    skips them. This does not depend on JetStream's duplicate window;
//!    the message ids make JetStream drop repeats as a second line of
//!    defence (a stream the sink creates keeps them for `duplicate-window`).
//! 3. The checkpoint is written with the entry's last revision as a
//!    condition, and `open` rewrites the entry: the process that opened
//!    the sink last owns the changefeed, and one still running it stops at
//!    its next checkpoint with an error. Rows it publishes meanwhile carry
//!    the ids the new owner gives them too, so the duplicate window drops
//!    the second copy.
//!
//! After any error or a cancelled call the sink must be reopened.

use std::collections::HashSet;
use std::collections::VecDeque;
use std::time::Duration;

use async_nats::jetstream::context::{GetStreamErrorKind, PublishErrorKind};
use async_nats::jetstream::kv::{self, UpdateErrorKind};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::stream::{self, StorageType};
use async_nats::jetstream::{self, consumer};
use async_nats::{HeaderMap, jetstream::context::PublishAckFuture};
use bytes::Bytes;
use futures_util::StreamExt;
use kvfeed_client::feed::Row;
use kvfeed_client::text::hex;
use kvfeed_types::TimeStamp;
use serde::{Deserialize, Serialize};

use super::state::{check_window, not_open};
use super::{BoxError, Sink, SinkError, SinkUri, key_bucket};
use crate::def::ChangefeedDef;
use crate::format;
use crate::sink::uri::NatsUri;

#[path = "nats_read.rs"]
mod read;
pub use read::{NatsCheckpoints, NatsReader, read_checkpoint};

/// Unacknowledged publishes at most; past it `write` waits for the oldest.
pub const MAX_PENDING: usize = 4096;

/// Room left for headers when the server's `max_payload` limits a row.
const HEADER_ROOM: usize = 4096;

/// How long connecting and each JetStream request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Header names.
const H_CHANGEFEED: &str = "Kvfeed-Changefeed";
const H_COMMIT_TS: &str = "Kvfeed-Commit-Ts";
const H_START_TS: &str = "Kvfeed-Start-Ts";
const H_RESOLVED_TS: &str = "Kvfeed-Resolved-Ts";
const H_VALUE_OMITTED: &str = "Kvfeed-Value-Omitted";

/// The key-value entry of a changefeed.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Entry {
    def: ChangefeedDef,
    stream: String,
    subject_prefix: String,
    /// `None` until the first window.
    checkpoint_ts: Option<u64>,
    /// The stream sequence of the checkpoint's watermark (or of the
    /// stream's last message when the entry was made).
    stream_seq: u64,
}

/// Publishes to NATS JetStream; see the module comment.
#[derive(Debug)]
pub struct NatsSink {
    uri: NatsUri,
    /// Taken out during every call, so a cancelled call leaves it closed.
    open: Option<Box<Open>>,
}

struct Open {
    js: jetstream::Context,
    kv: kv::Store,
    entry: Entry,
    revision: u64,
    max_message_bytes: usize,
    window: Option<(TimeStamp, TimeStamp)>,
    pending: VecDeque<PublishAckFuture>,
    /// Ids of rows the stream already holds past the checkpoint, and the
    /// highest commit ts among them (the set is dropped once the
    /// checkpoint passes it).
    present: HashSet<String>,
    present_until: TimeStamp,
}

impl std::fmt::Debug for Open {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Open")
            .field("stream", &self.entry.stream)
            .field("checkpoint_ts", &self.entry.checkpoint_ts)
            .field("window", &self.window)
            .field("pending", &self.pending.len())
            .finish_non_exhaustive()
    }
}

impl NatsSink {
    /// A sink for `uri`; nothing is connected until `open`.
    pub fn new(uri: NatsUri) -> NatsSink {
        NatsSink { uri, open: None }
    }
}

fn broker(uri: &NatsUri, what: &str) -> impl FnOnce(BoxError) -> SinkError {
    let uri = uri.uri.clone();
    let what = what.to_owned();
    move |source| SinkError::Broker { uri, what, source }
}

fn refused(uri: &NatsUri, reason: String) -> SinkError {
    SinkError::BrokerRefused {
        uri: uri.uri.clone(),
        reason,
    }
}

/// Connects and returns the JetStream context and the server's payload limit.
async fn connect(uri: &NatsUri, name: &str) -> Result<(jetstream::Context, usize), SinkError> {
    let client = async_nats::ConnectOptions::new()
        .name(name)
        .connection_timeout(REQUEST_TIMEOUT)
        .request_timeout(Some(REQUEST_TIMEOUT))
        .connect(uri.servers.as_str())
        .await
        .map_err(|e| broker(uri, "connecting")(e.into()))?;
    let max_payload = client.server_info().max_payload;
    let js = jetstream::ContextBuilder::new()
        .timeout(REQUEST_TIMEOUT)
        .max_ack_inflight(MAX_PENDING)
        .backpressure_on_inflight(true)
        .build(client);
    Ok((js, max_payload))
}

/// Whether NATS subject `pattern` (with `*` and `>`) matches `subject`.
fn subject_matches(pattern: &str, subject: &str) -> bool {
    let mut want = subject.split('.');
    for token in pattern.split('.') {
        match (token, want.next()) {
            (">", Some(_)) => return true,
            ("*", Some(_)) => {}
            (t, Some(s)) if t == s => {}
            _ => return false,
        }
    }
    want.next().is_none()
}

/// The stream, created over `PREFIX.>` when missing; an existing stream
/// must take the sink's subjects. Answers the sequence of its last message.
async fn ensure_stream(js: &jetstream::Context, uri: &NatsUri) -> Result<u64, SinkError> {
    let probe = [
        format!("{}.resolved", uri.subject_prefix),
        format!("{}.0", uri.subject_prefix),
    ];
    match js.get_stream(&uri.stream).await {
        Ok(mut stream) => {
            let info = stream
                .info()
                .await
                .map_err(|e| broker(uri, "reading the stream's config")(e.into()))?;
            let takes = |s: &String| info.config.subjects.iter().any(|p| subject_matches(p, s));
            if !probe.iter().all(takes) {
                return Err(refused(
                    uri,
                    format!(
                        "stream {} does not take the subjects {}.> (it takes {:?}): add them, or name another stream with ?stream=",
                        uri.stream, uri.subject_prefix, info.config.subjects
                    ),
                ));
            }
            Ok(info.state.last_sequence)
        }
        Err(e)
            if matches!(
                e.kind(),
                GetStreamErrorKind::JetStream(j)
                    if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
            ) =>
        {
            let config = stream::Config {
                name: uri.stream.clone(),
                subjects: vec![format!("{}.>", uri.subject_prefix)],
                storage: StorageType::File,
                duplicate_window: uri.duplicate_window,
                ..Default::default()
            };
            js.create_stream(config)
                .await
                .map(|created| created.cached_info().state.last_sequence)
                .map_err(|e| broker(uri, "creating the stream")(e.into()))
        }
        Err(e) => Err(broker(uri, "looking up the stream")(e.into())),
    }
}

/// The key-value bucket, created when missing. It is created as the
/// stream behind it (`KV_<bucket>` over `$KV.<bucket>.>`, the layout every
/// NATS client uses), since the client's own `create_key_value` first
/// asks for account details that nats-server 2.9 answers in a form it
/// does not parse.
async fn ensure_bucket(js: &jetstream::Context, uri: &NatsUri) -> Result<kv::Store, SinkError> {
    if let Ok(store) = js.get_key_value(&uri.kv_bucket).await {
        return Ok(store);
    }
    let config = stream::Config {
        name: format!("KV_{}", uri.kv_bucket),
        description: Some("kvfeed changefeed checkpoints".to_owned()),
        subjects: vec![format!("$KV.{}.>", uri.kv_bucket)],
        max_messages_per_subject: 1,
        storage: StorageType::File,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        discard: stream::DiscardPolicy::New,
        num_replicas: 1,
        ..Default::default()
    };
    // Another process may create it meanwhile: an error here is only
    // reported when the bucket still cannot be opened.
    let created = js.get_or_create_stream(config).await;
    js.get_key_value(&uri.kv_bucket)
        .await
        .map_err(|e| match created {
            Err(c) => broker(uri, "creating the key-value bucket")(c.into()),
            Ok(_) => broker(uri, "opening the key-value bucket")(e.into()),
        })
}

/// The changefeed's entry and its revision, if it has one.
async fn read_entry(
    store: &kv::Store,
    uri: &NatsUri,
    id: &str,
) -> Result<Option<(Entry, u64)>, SinkError> {
    let Some(found) = store
        .entry(id)
        .await
        .map_err(|e| broker(uri, "reading the checkpoint")(e.into()))?
    else {
        return Ok(None);
    };
    if found.operation != kv::Operation::Put {
        return Ok(None);
    }
    let entry: Entry = serde_json::from_slice(&found.value).map_err(|e| {
        refused(
            uri,
            format!(
                "the entry {id:?} of bucket {} is not a kvfeed checkpoint: {e}",
                uri.kv_bucket
            ),
        )
    })?;
    Ok(Some((entry, found.revision)))
}

fn header(headers: &HeaderMap, name: &str) -> Option<String> {
    headers.get(name).map(|v| v.as_str().to_owned())
}

/// The sink's stream and the sequence of its last message.
async fn stream_and_last(
    js: &jetstream::Context,
    uri: &NatsUri,
) -> Result<(stream::Stream, u64), SinkError> {
    let mut stream = js
        .get_stream(&uri.stream)
        .await
        .map_err(|e| broker(uri, "opening the stream")(e.into()))?;
    let last = stream
        .info()
        .await
        .map_err(|e| broker(uri, "reading the stream's state")(e.into()))?
        .state
        .last_sequence;
    Ok((stream, last))
}

/// The stream's messages of one changefeed, read in order from a start
/// sequence up to the last message there was when reading began.
struct Cursor {
    id: String,
    last: u64,
    done: bool,
    messages: Option<consumer::pull::Ordered>,
}

/// A message the cursor read: stream sequence, headers, body.
type Read = (u64, HeaderMap, Bytes);

impl Cursor {
    /// Starts reading changefeed `id`'s messages from `from_seq` up to
    /// `to_seq` (or the stream's last message).
    async fn open(
        js: &jetstream::Context,
        uri: &NatsUri,
        id: &str,
        from_seq: u64,
        to_seq: Option<u64>,
    ) -> Result<Cursor, SinkError> {
        let (stream, last) = stream_and_last(js, uri).await?;
        let last = to_seq.map_or(last, |t| t.min(last));
        let mut cursor = Cursor {
            id: id.to_owned(),
            last,
            done: last < from_seq.max(1),
            messages: None,
        };
        if cursor.done {
            return Ok(cursor);
        }
        let consumer = stream
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: format!("{}.>", uri.subject_prefix),
                deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: from_seq.max(1),
                },
                ..Default::default()
            })
            .await
            .map_err(|e| broker(uri, "reading the stream")(e.into()))?;
        cursor.messages = Some(
            consumer
                .messages()
                .await
                .map_err(|e| broker(uri, "reading the stream")(e.into()))?,
        );
        Ok(cursor)
    }

    /// The changefeed's next message; `None` at the end.
    async fn next(&mut self, uri: &NatsUri) -> Result<Option<Read>, SinkError> {
        while !self.done {
            let Some(messages) = self.messages.as_mut() else {
                break;
            };
            let next = tokio::time::timeout(REQUEST_TIMEOUT, messages.next())
                .await
                .map_err(|e| broker(uri, "reading the stream")(e.into()))?;
            let Some(message) = next else { break };
            let message = message.map_err(|e| broker(uri, "reading the stream")(e.into()))?;
            let info = message
                .info()
                .map_err(|e| broker(uri, "reading the stream")(e))?;
            let (seq, pending) = (info.stream_sequence, info.pending);
            if seq > self.last {
                break;
            }
            self.done = seq >= self.last || pending == 0;
            let headers = message.headers.clone().unwrap_or_default();
            if header(&headers, H_CHANGEFEED).as_deref() == Some(self.id.as_str()) {
                return Ok(Some((seq, headers, message.payload.clone())));
            }
        }
        self.done = true;
        self.messages = None;
        Ok(None)
    }
}

fn ts_header(headers: &HeaderMap, name: &str) -> Option<TimeStamp> {
    header(headers, name)?.parse().ok().map(TimeStamp::new)
}

impl Sink for NatsSink {
    async fn open(&mut self, def: &ChangefeedDef) -> Result<Option<TimeStamp>, SinkError> {
        self.open = None;
        let uri = &self.uri;
        let id = def.id.as_str();
        let (js, max_payload) = connect(uri, &format!("kvfeed changefeed {id}")).await?;
        let last = ensure_stream(&js, uri).await?;
        let store = ensure_bucket(&js, uri).await?;
        let (mut entry, mut revision, fresh) = match read_entry(&store, uri, id).await? {
            Some((entry, revision)) => {
                if !def.same_feed(&entry.def) {
                    return Err(refused(
                        uri,
                        format!(
                            "bucket {} holds changefeed {id} with another definition: a changefeed's range, mode and format cannot change",
                            uri.kv_bucket
                        ),
                    ));
                }
                if (entry.stream.as_str(), entry.subject_prefix.as_str())
                    != (uri.stream.as_str(), uri.subject_prefix.as_str())
                {
                    return Err(refused(
                        uri,
                        format!(
                            "changefeed {id} writes to stream {} under {}.>, not to {} under {}.>",
                            entry.stream, entry.subject_prefix, uri.stream, uri.subject_prefix
                        ),
                    ));
                }
                // Rewriting the entry takes the changefeed over: a process
                // still running it fails at its next checkpoint.
                let revision = write_entry(&store, uri, &entry, revision).await?;
                (entry, revision, false)
            }
            None => {
                let entry = Entry {
                    def: def.clone(),
                    stream: uri.stream.clone(),
                    subject_prefix: uri.subject_prefix.clone(),
                    checkpoint_ts: None,
                    stream_seq: last,
                };
                let value = Bytes::from(serde_json::to_vec(&entry).unwrap_or_default());
                let revision = store.create(id, value).await.map_err(|e| {
                    refused(
                        uri,
                        format!(
                            "creating the checkpoint of {id} (does another process run it?): {e}"
                        ),
                    )
                })?;
                (entry, revision, true)
            }
        };
        // The tail an interrupted run left past the checkpoint.
        let mut present = HashSet::new();
        let mut present_until = TimeStamp::new(0);
        let mut rolled: Option<(TimeStamp, u64)> = None;
        let mut tail = Cursor::open(&js, uri, id, entry.stream_seq + 1, None).await?;
        while let Some((seq, headers, _)) = tail.next(uri).await? {
            if let Some(to) = ts_header(&headers, H_RESOLVED_TS) {
                rolled = Some((to, seq));
                present.clear();
            } else if let Some(msg_id) = header(&headers, "Nats-Msg-Id") {
                present.insert(msg_id);
                if let Some(ts) = ts_header(&headers, H_COMMIT_TS) {
                    present_until = present_until.max(ts);
                }
            }
        }
        if let Some((to, seq)) = rolled
            && entry.checkpoint_ts.is_none_or(|c| c < to.into_inner())
        {
            entry.checkpoint_ts = Some(to.into_inner());
            entry.stream_seq = seq;
            revision = write_entry(&store, uri, &entry, revision).await?;
        }
        let checkpoint = entry.checkpoint_ts.map(TimeStamp::new);
        let answer = match (fresh, checkpoint) {
            (true, None) => None,
            (_, Some(c)) => Some(c),
            (false, None) => Some(entry.def.start_ts),
        };
        let max_message_bytes = uri
            .max_message_bytes
            .unwrap_or_else(|| max_payload.saturating_sub(HEADER_ROOM).max(1024));
        self.open = Some(Box::new(Open {
            js,
            kv: store,
            entry,
            revision,
            max_message_bytes,
            window: None,
            pending: VecDeque::new(),
            present,
            present_until,
        }));
        Ok(answer)
    }

    async fn begin_window(&mut self, from: TimeStamp, to: TimeStamp) -> Result<(), SinkError> {
        let mut open = self.open.take().ok_or_else(not_open)?;
        let expected = open
            .entry
            .checkpoint_ts
            .map_or(open.entry.def.start_ts, TimeStamp::new);
        check_window(expected, from, to, open.window.is_some())?;
        open.window = Some((from, to));
        self.open = Some(open);
        Ok(())
    }

    async fn write(&mut self, rows: &[Row]) -> Result<(), SinkError> {
        let mut open = self.open.take().ok_or_else(not_open)?;
        open.write(&self.uri, rows).await?;
        self.open = Some(open);
        Ok(())
    }

    async fn commit_window(&mut self) -> Result<(), SinkError> {
        let mut open = self.open.take().ok_or_else(not_open)?;
        open.commit(&self.uri).await?;
        self.open = Some(open);
        Ok(())
    }
}

impl Open {
    async fn write(&mut self, uri: &NatsUri, rows: &[Row]) -> Result<(), SinkError> {
        let Some((from, to)) = self.window else {
            return Err(SinkError::Protocol {
                reason: "write without begin_window".to_owned(),
            });
        };
        let id = self.entry.def.id.to_string();
        let mut body = Vec::new();
        for row in rows {
            if row.commit_ts <= from || row.commit_ts > to {
                return Err(SinkError::Protocol {
                    reason: format!(
                        "a row at commit_ts {} lies outside the window ({from}, {to}]",
                        row.commit_ts
                    ),
                });
            }
            let msg_id = format!("{id}-{}-{}-{}", row.commit_ts, row.start_ts, hex(&row.key));
            if self.present.contains(&msg_id) {
                continue;
            }
            body.clear();
            format::encode(&self.entry.def, row, &mut body);
            let mut omitted = false;
            if body.len() + msg_id.len() > self.max_message_bytes {
                let key_only = Row {
                    value: Bytes::new(),
                    old_value: Bytes::new(),
                    ..row.clone()
                };
                body.clear();
                format::encode(&self.entry.def, &key_only, &mut body);
                omitted = true;
            }
            let mut publish = PublishMessage::build()
                .payload(Bytes::copy_from_slice(&body))
                .header(H_CHANGEFEED, id.as_str())
                .header(H_COMMIT_TS, row.commit_ts.to_string())
                .header(H_START_TS, row.start_ts.to_string());
            if omitted {
                publish = publish.header(H_VALUE_OMITTED, "true");
            }
            let subject = format!(
                "{}.{}",
                uri.subject_prefix,
                key_bucket(&row.key, uri.subject_buckets)
            );
            self.publish(uri, subject, publish.message_id(msg_id))
                .await?;
        }
        Ok(())
    }

    async fn publish(
        &mut self,
        uri: &NatsUri,
        subject: String,
        message: PublishMessage,
    ) -> Result<(), SinkError> {
        while self.pending.len() >= MAX_PENDING {
            self.ack_one(uri).await?;
        }
        let ack = self
            .js
            .send_publish(subject, message)
            .await
            .map_err(|e| publish_error(uri, e))?;
        self.pending.push_back(ack);
        Ok(())
    }

    /// Waits for the oldest publish's acknowledgement; answers its sequence.
    async fn ack_one(&mut self, uri: &NatsUri) -> Result<Option<u64>, SinkError> {
        let Some(ack) = self.pending.pop_front() else {
            return Ok(None);
        };
        let ack = ack.await.map_err(|e| publish_error(uri, e))?;
        if ack.stream != uri.stream {
            return Err(refused(
                uri,
                format!(
                    "a message went to stream {} instead of {}: another stream takes the same subjects",
                    ack.stream, uri.stream
                ),
            ));
        }
        Ok(Some(ack.sequence))
    }

    async fn commit(&mut self, uri: &NatsUri) -> Result<(), SinkError> {
        let Some((_, to)) = self.window else {
            return Err(SinkError::Protocol {
                reason: "commit_window without begin_window".to_owned(),
            });
        };
        while self.ack_one(uri).await?.is_some() {}
        let id = self.entry.def.id.to_string();
        let body = format!("{{\"resolved\":\"{to}\"}}");
        let watermark = PublishMessage::build()
            .payload(Bytes::from(body))
            .header(H_CHANGEFEED, id.as_str())
            .header(H_RESOLVED_TS, to.to_string())
            .message_id(format!("{id}-resolved-{to}"));
        self.publish(uri, format!("{}.resolved", uri.subject_prefix), watermark)
            .await?;
        let seq = self.ack_one(uri).await?.unwrap_or(self.entry.stream_seq);
        let mut entry = self.entry.clone();
        entry.checkpoint_ts = Some(to.into_inner());
        entry.stream_seq = seq;
        self.revision = write_entry(&self.kv, uri, &entry, self.revision).await?;
        self.entry = entry;
        self.window = None;
        if to >= self.present_until {
            self.present = HashSet::new();
        }
        Ok(())
    }
}

/// Writes the changefeed's entry if its revision is still `revision`.
async fn write_entry(
    store: &kv::Store,
    uri: &NatsUri,
    entry: &Entry,
    revision: u64,
) -> Result<u64, SinkError> {
    let value = Bytes::from(serde_json::to_vec(entry).unwrap_or_default());
    store
        .update(entry.def.id.as_str(), value, revision)
        .await
        .map_err(|e| match e.kind() {
            UpdateErrorKind::WrongLastRevision => refused(
                uri,
                format!(
                    "the checkpoint of {} was written by another process: it runs this changefeed now",
                    entry.def.id
                ),
            ),
            _ => broker(uri, "writing the checkpoint")(e.into()),
        })
}

fn publish_error(uri: &NatsUri, e: jetstream::context::PublishError) -> SinkError {
    match e.kind() {
        PublishErrorKind::StreamNotFound => refused(
            uri,
            format!(
                "no stream takes {}.> any more (stream {} was deleted?)",
                uri.subject_prefix, uri.stream
            ),
        ),
        _ => broker(uri, "publishing")(e.into()),
    }
}

impl From<NatsUri> for SinkUri {
    fn from(uri: NatsUri) -> SinkUri {
        SinkUri::Nats(uri)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_match_like_nats() {
        assert!(subject_matches("a.>", "a.b"));
        assert!(subject_matches("a.>", "a.b.c"));
        assert!(!subject_matches("a.>", "a"));
        assert!(subject_matches(">", "a"));
        assert!(subject_matches("a.*", "a.b"));
        assert!(!subject_matches("a.*", "a.b.c"));
        assert!(subject_matches("a.b", "a.b"));
        assert!(!subject_matches("a.b", "a.c"));
        assert!(!subject_matches("a.b.c", "a.b"));
    }

    #[test]
    fn buckets_are_stable_and_in_range() {
        // FNV-1a of "" is the offset basis; of "a" a known constant.
        assert_eq!(
            key_bucket(b"", 1 << 16),
            (0xcbf2_9ce4_8422_2325u64 % 65536) as u32
        );
        assert_eq!(
            key_bucket(b"a", u32::MAX),
            (0xaf63_dc4c_8601_ec8cu64 % u64::from(u32::MAX)) as u32
        );
        for n in 1..50u32 {
            assert!(key_bucket(&n.to_be_bytes(), 7) < 7);
        }
    }
}
