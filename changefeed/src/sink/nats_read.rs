//! Reading a NATS sink back: its messages up to the checkpoint for
//! `kvfeed verify`, and changefeeds' checkpoints for status and waiting.

use async_nats::jetstream::kv;
use futures_util::StreamExt;
use kvfeed_types::TimeStamp;

use super::{
    Cursor, H_RESOLVED_TS, H_VALUE_OMITTED, broker, connect, header, read_entry, refused, ts_header,
};
use crate::def::ChangefeedDef;
use crate::format;
use crate::sink::SinkError;
use crate::sink::uri::NatsUri;
use crate::verify::SinkItem;

/// Reads what a NATS sink holds up to its checkpoint, for `kvfeed verify`,
/// one message at a time.
pub struct NatsReader {
    uri: NatsUri,
    def: ChangefeedDef,
    checkpoint: TimeStamp,
    cursor: Cursor,
}

impl NatsReader {
    /// Opens the changefeed the URI's bucket holds for the URI's stream and
    /// prefix (there must be exactly one).
    pub async fn open(uri: &NatsUri) -> Result<NatsReader, SinkError> {
        let (js, _) = connect(uri, "kvfeed verify").await?;
        let store = js
            .get_key_value(&uri.kv_bucket)
            .await
            .map_err(|e| broker(uri, "opening the key-value bucket")(e.into()))?;
        let ids = read_ids(&store, uri).await?;
        let [id] = ids.as_slice() else {
            return Err(refused(
                uri,
                format!(
                    "bucket {} holds {} changefeeds writing to {}.>: {ids:?}; verify needs exactly one",
                    uri.kv_bucket,
                    ids.len(),
                    uri.subject_prefix
                ),
            ));
        };
        let Some((entry, _)) = read_entry(&store, uri, id).await? else {
            return Err(refused(uri, format!("changefeed {id} has no checkpoint")));
        };
        let checkpoint = entry
            .checkpoint_ts
            .map_or(entry.def.start_ts, TimeStamp::new);
        // Before the first window there is nothing to read: stop at 0.
        let to_seq = if entry.checkpoint_ts.is_some() {
            entry.stream_seq
        } else {
            0
        };
        let cursor = Cursor::open(&js, uri, id, 1, Some(to_seq)).await?;
        Ok(NatsReader {
            uri: uri.clone(),
            def: entry.def,
            checkpoint,
            cursor,
        })
    }

    /// The changefeed's definition.
    pub fn def(&self) -> &ChangefeedDef {
        &self.def
    }

    /// Its checkpoint (its start ts before the first window).
    pub fn checkpoint(&self) -> TimeStamp {
        self.checkpoint
    }

    /// The next message up to the checkpoint, in stream order.
    pub async fn next(&mut self) -> Result<Option<SinkItem>, SinkError> {
        let Some((seq, headers, body)) = self.cursor.next(&self.uri).await? else {
            return Ok(None);
        };
        let place = format!("stream {} seq {seq}", self.uri.stream);
        if let Some(ts) = ts_header(&headers, H_RESOLVED_TS) {
            return Ok(Some(SinkItem::Watermark { ts, place }));
        }
        let row = format::decode(self.def.format, &body)
            .map_err(|e| refused(&self.uri, format!("{place}: {e}")))?;
        let value_omitted = header(&headers, H_VALUE_OMITTED).as_deref() == Some("true");
        Ok(Some(SinkItem::Row {
            row,
            value_omitted,
            place,
        }))
    }
}

/// Reads changefeeds' checkpoints from a NATS sink's bucket over one
/// connection: for status displays and for waiting until a changefeed
/// passes a timestamp.
pub struct NatsCheckpoints {
    uri: NatsUri,
    store: kv::Store,
}

impl NatsCheckpoints {
    /// Connects to the URI's servers and opens its bucket.
    pub async fn connect(uri: &NatsUri) -> Result<NatsCheckpoints, SinkError> {
        let (js, _) = connect(uri, "kvfeed checkpoint").await?;
        let store = js
            .get_key_value(&uri.kv_bucket)
            .await
            .map_err(|e| broker(uri, "opening the key-value bucket")(e.into()))?;
        Ok(NatsCheckpoints {
            uri: uri.clone(),
            store,
        })
    }

    /// Changefeed `id`'s checkpoint; `None` before its first window.
    pub async fn get(&self, id: &str) -> Result<Option<TimeStamp>, SinkError> {
        Ok(read_entry(&self.store, &self.uri, id)
            .await?
            .and_then(|(entry, _)| entry.checkpoint_ts.map(TimeStamp::new)))
    }
}

/// The checkpoint changefeed `id` holds in the URI's bucket (`None` before
/// its first window), without reading the stream: for status displays and
/// tests that wait for a changefeed to pass a timestamp.
pub async fn read_checkpoint(uri: &NatsUri, id: &str) -> Result<Option<TimeStamp>, SinkError> {
    NatsCheckpoints::connect(uri).await?.get(id).await
}

/// The ids of the changefeeds in the bucket that write to the URI's
/// stream and prefix.
async fn read_ids(store: &kv::Store, uri: &NatsUri) -> Result<Vec<String>, SinkError> {
    let mut keys = store
        .keys()
        .await
        .map_err(|e| broker(uri, "listing the key-value bucket")(e.into()))?;
    let mut ids = Vec::new();
    while let Some(key) = keys.next().await {
        let key = key.map_err(|e| broker(uri, "listing the key-value bucket")(e.into()))?;
        if let Some((entry, _)) = read_entry(store, uri, &key).await?
            && entry.stream == uri.stream
            && entry.subject_prefix == uri.subject_prefix
        {
            ids.push(key);
        }
    }
    Ok(ids)
}
