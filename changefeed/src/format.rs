//! How a row is written into a sink, and read back by `kvfeed verify`.
//!
//! Keys and values are arbitrary bytes, but JSON holds text. A byte string
//! that is valid UTF-8 is written as that text (JSON escapes what it must),
//! which keeps the common case small and readable. Any other byte string is
//! written as its [`escape`]d form (readable, lossless but not meant for
//! machines) together with a `<field>_hex` field holding the exact bytes in
//! lower-case hex. So the exact bytes are always recoverable: [`decode`]
//! prefers a `_hex` field when one is present, and otherwise takes the text.
//!
//! An empty old value means "no previous value" (TiKV sends nothing for a
//! key that did not exist), so it is written as `null`.
//!
//! Encoding is deterministic — the same row always gives the same bytes —
//! which is what lets a replayed webhook batch carry the same body as the
//! first attempt. For that reason the Debezium envelope's top-level `ts_ms`
//! is the commit's physical time, not the time the row was processed as
//! Debezium's own connectors do.
//!
//! # `json`
//!
//! `{"op":"put"|"delete","key":K,"value":V|null,"start_ts":N,"commit_ts":N}`
//! plus `"old_value":O|null` when the changefeed asks for old values, and
//! `key_hex` / `value_hex` / `old_value_hex` for non-UTF-8 fields.
//!
//! # `debezium`
//!
//! The payload of Debezium's change-event envelope, as its JSON converter
//! writes it with schemas disabled:
//!
//! ```text
//! {"before":{"key":K,"value":V|null}|null,
//!  "after":{"key":K,"value":V}|null,
//!  "op":"c"|"u"|"d",
//!  "source":{"version":"kvfeed X.Y.Z","connector":"kvfeed","name":ID,
//!            "ts_ms":MS,"commit_ts":N,"start_ts":N,"snapshot":"false"},
//!  "ts_ms":MS}
//! ```
//!
//! - a put without an old value is a create: `op` `c`, `before` null;
//! - a put with an old value is an update: `op` `u`, `before` holds it;
//! - a delete is `op` `d` with `after` null and `before` always an object,
//!   so the deleted key is always there; its `value` is the old value, or
//!   null when the server sent none.
//!
//! `MS` is the physical part of the commit ts, in milliseconds since the
//! Unix epoch.

use std::borrow::Cow;

use bytes::Bytes;
use kvfeed_client::feed::{Op, Row};
use kvfeed_client::text::{escape, hex};
use kvfeed_types::TimeStamp;
use serde::{Deserialize, Serialize};

use crate::def::{ChangefeedDef, Format, parse_hex};

/// A line that is not a row of the expected format.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// Not JSON, or JSON of the wrong shape.
    #[error("not a kvfeed {format} row: {source}")]
    Json {
        /// The format expected.
        format: &'static str,
        /// What the parser said.
        #[source]
        source: serde_json::Error,
    },
    /// Well-formed JSON whose fields contradict each other.
    #[error("invalid kvfeed {format} row: {reason}")]
    Invalid {
        /// The format expected.
        format: &'static str,
        /// What is wrong.
        reason: String,
    },
}

/// A byte string as JSON text, with its hex only when it is not UTF-8.
struct Text<'a> {
    text: Cow<'a, str>,
    hex: Option<String>,
}

fn text(bytes: &[u8]) -> Text<'_> {
    match std::str::from_utf8(bytes) {
        Ok(s) => Text {
            text: Cow::Borrowed(s),
            hex: None,
        },
        Err(_) => Text {
            text: Cow::Owned(escape(bytes)),
            hex: Some(hex(bytes)),
        },
    }
}

/// `Some(text)` for a non-empty byte string, `None` (JSON null) otherwise.
fn nonempty_text(bytes: &[u8]) -> Option<Text<'_>> {
    (!bytes.is_empty()).then(|| text(bytes))
}

#[derive(Serialize)]
struct JsonOut<'a> {
    op: &'static str,
    key: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    key_hex: Option<&'a str>,
    value: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    value_hex: Option<&'a str>,
    /// Absent unless the changefeed carries old values; then null or text.
    #[serde(skip_serializing_if = "Option::is_none")]
    old_value: Option<Option<&'a str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    old_value_hex: Option<&'a str>,
    start_ts: u64,
    commit_ts: u64,
}

#[derive(Deserialize)]
struct JsonIn {
    op: String,
    key: String,
    key_hex: Option<String>,
    value: Option<String>,
    value_hex: Option<String>,
    old_value: Option<String>,
    old_value_hex: Option<String>,
    start_ts: u64,
    commit_ts: u64,
}

#[derive(Serialize)]
struct DbzImage<'a> {
    key: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    key_hex: Option<&'a str>,
    value: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    value_hex: Option<&'a str>,
}

#[derive(Serialize)]
struct DbzSource<'a> {
    version: &'static str,
    connector: &'static str,
    name: &'a str,
    ts_ms: u64,
    commit_ts: u64,
    start_ts: u64,
    snapshot: &'static str,
}

#[derive(Serialize)]
struct DbzOut<'a> {
    before: Option<DbzImage<'a>>,
    after: Option<DbzImage<'a>>,
    op: &'static str,
    source: DbzSource<'a>,
    ts_ms: u64,
}

#[derive(Deserialize)]
struct DbzImageIn {
    key: String,
    key_hex: Option<String>,
    value: Option<String>,
    value_hex: Option<String>,
}

#[derive(Deserialize)]
struct DbzSourceIn {
    commit_ts: u64,
    start_ts: u64,
}

#[derive(Deserialize)]
struct DbzIn {
    before: Option<DbzImageIn>,
    after: Option<DbzImageIn>,
    op: String,
    source: DbzSourceIn,
}

/// A Debezium `before` / `after` image of `key` holding `value`.
fn image<'a>(key: &'a Text<'a>, value: Option<&'a Text<'a>>) -> DbzImage<'a> {
    DbzImage {
        key: &key.text,
        key_hex: key.hex.as_deref(),
        value: value.map(|v| &*v.text),
        value_hex: value.and_then(|v| v.hex.as_deref()),
    }
}

/// The `source.version` of Debezium rows.
const VERSION: &str = concat!("kvfeed ", env!("CARGO_PKG_VERSION"));

/// Appends `row` to `out` as one JSON object in `def.format` (no newline).
pub fn encode(def: &ChangefeedDef, row: &Row, out: &mut Vec<u8>) {
    let key = text(&row.key);
    let delete = row.op == Op::Delete;
    let value = (!delete).then(|| text(&row.value));
    let old = nonempty_text(&row.old_value);
    let result = match def.format {
        Format::Json => serde_json::to_writer(
            &mut *out,
            &JsonOut {
                op: if delete { "delete" } else { "put" },
                key: &key.text,
                key_hex: key.hex.as_deref(),
                value: value.as_ref().map(|v| &*v.text),
                value_hex: value.as_ref().and_then(|v| v.hex.as_deref()),
                old_value: def.old_value.then(|| old.as_ref().map(|o| &*o.text)),
                old_value_hex: old
                    .as_ref()
                    .filter(|_| def.old_value)
                    .and_then(|o| o.hex.as_deref()),
                start_ts: row.start_ts.into_inner(),
                commit_ts: row.commit_ts.into_inner(),
            },
        ),
        Format::Debezium => {
            let image = |value| image(&key, value);
            let (op, before, after) = match (&value, &old) {
                (None, _) => ("d", Some(image(old.as_ref())), None),
                (Some(new), None) => ("c", None, Some(image(Some(new)))),
                (Some(new), Some(old)) => ("u", Some(image(Some(old))), Some(image(Some(new)))),
            };
            let ms = row.commit_ts.physical();
            serde_json::to_writer(
                &mut *out,
                &DbzOut {
                    before,
                    after,
                    op,
                    source: DbzSource {
                        version: VERSION,
                        connector: "kvfeed",
                        name: def.id.as_str(),
                        ts_ms: ms,
                        commit_ts: row.commit_ts.into_inner(),
                        start_ts: row.start_ts.into_inner(),
                        snapshot: "false",
                    },
                    ts_ms: ms,
                },
            )
        }
    };
    // Serialising borrowed strings and integers into a Vec cannot fail.
    debug_assert!(result.is_ok());
}

/// Reads back one line written by [`encode`] in `format` (the exact
/// inverse; `_hex` fields win over text).
pub fn decode(format: Format, line: &[u8]) -> Result<Row, FormatError> {
    let name = format.name();
    let invalid = |reason: String| FormatError::Invalid {
        format: name,
        reason,
    };
    let bytes = |field: &str, text: String, hex: Option<String>| -> Result<Bytes, FormatError> {
        match hex {
            Some(h) => parse_hex(&h)
                .map(Bytes::from)
                .ok_or_else(|| invalid(format!("{field}_hex {h:?} is not hex"))),
            None => Ok(Bytes::from(text)),
        }
    };
    let optional = |field: &str, text: Option<String>, hex: Option<String>| match text {
        None if hex.is_some() => Err(invalid(format!("{field} is null but {field}_hex is set"))),
        None => Ok(Bytes::new()),
        Some(t) => bytes(field, t, hex),
    };
    let json = |source| FormatError::Json {
        format: name,
        source,
    };
    match format {
        Format::Json => {
            let r: JsonIn = serde_json::from_slice(line).map_err(json)?;
            let op = match r.op.as_str() {
                "put" => Op::Put,
                "delete" => Op::Delete,
                other => return Err(invalid(format!("unknown op {other:?}"))),
            };
            let value = optional("value", r.value, r.value_hex)?;
            if op == Op::Delete && !value.is_empty() {
                return Err(invalid("a delete with a value".to_owned()));
            }
            Ok(Row {
                start_ts: TimeStamp::new(r.start_ts),
                commit_ts: TimeStamp::new(r.commit_ts),
                op,
                key: bytes("key", r.key, r.key_hex)?,
                value,
                old_value: optional("old_value", r.old_value, r.old_value_hex)?,
            })
        }
        Format::Debezium => {
            let r: DbzIn = serde_json::from_slice(line).map_err(json)?;
            let (op, new, old) = match (r.op.as_str(), r.before, r.after) {
                ("c", None, Some(after)) => (Op::Put, Some(after), None),
                ("u", Some(before), Some(after)) => (Op::Put, Some(after), Some(before)),
                ("d", Some(before), None) => (Op::Delete, None, Some(before)),
                (op, ..) => {
                    return Err(invalid(format!(
                        "op {op:?} with the wrong before/after images"
                    )));
                }
            };
            let (key, value) = match new {
                Some(after) => (
                    bytes("after.key", after.key, after.key_hex)?,
                    optional("after.value", after.value, after.value_hex)?,
                ),
                None => (Bytes::new(), Bytes::new()),
            };
            let (key, old_value) = match old {
                Some(before) => {
                    let before_key = bytes("before.key", before.key, before.key_hex)?;
                    if op == Op::Put && before_key != key {
                        return Err(invalid("before and after differ in key".to_owned()));
                    }
                    let old = optional("before.value", before.value, before.value_hex)?;
                    (before_key, old)
                }
                None => (key, Bytes::new()),
            };
            Ok(Row {
                start_ts: TimeStamp::new(r.source.start_ts),
                commit_ts: TimeStamp::new(r.source.commit_ts),
                op,
                key,
                value,
                old_value,
            })
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::def::{ChangefeedId, Mode};

    fn def(format: Format, old_value: bool) -> ChangefeedDef {
        ChangefeedDef {
            id: ChangefeedId::new("orders-1").unwrap(),
            mode: Mode::Txn,
            start: Vec::new(),
            end: Vec::new(),
            format,
            old_value,
            start_ts: TimeStamp::new(1),
        }
    }

    fn row(op: Op, key: &[u8], value: &[u8], old: &[u8]) -> Row {
        Row {
            start_ts: TimeStamp::compose(1_700_000_000_000, 3),
            commit_ts: TimeStamp::compose(1_700_000_000_123, 4),
            op,
            key: Bytes::copy_from_slice(key),
            value: Bytes::copy_from_slice(value),
            old_value: Bytes::copy_from_slice(old),
        }
    }

    fn enc(def: &ChangefeedDef, row: &Row) -> String {
        let mut out = Vec::new();
        encode(def, row, &mut out);
        String::from_utf8(out).unwrap()
    }

    fn rows() -> Vec<Row> {
        vec![
            row(Op::Put, b"k1", b"v1", b""),
            row(Op::Put, b"k1", b"v2", b"v1"),
            row(Op::Put, b"k1", b"", b"v2"),
            row(Op::Delete, b"k1", b"", b""),
            row(Op::Delete, b"k1", b"", b"old"),
            row(Op::Put, &[0xff, 0x00, b'a'], &[0x80, b'\n'], &[0xc3]),
            row(Op::Delete, &[0xfe], b"", &[0x00, 0xff]),
            row(Op::Put, b"quote\"back\\slash\n", "héllo ✓".as_bytes(), b""),
            row(Op::Put, b"", b"empty key", b""),
        ]
    }

    #[test]
    fn json_rows_are_utf8_text_with_hex_only_when_needed() {
        let plain = enc(&def(Format::Json, false), &row(Op::Put, b"k", b"v", b"x"));
        let ts = |ms, l| TimeStamp::compose(ms, l).into_inner();
        assert_eq!(
            plain,
            format!(
                r#"{{"op":"put","key":"k","value":"v","start_ts":{},"commit_ts":{}}}"#,
                ts(1_700_000_000_000, 3),
                ts(1_700_000_000_123, 4)
            )
        );
        let with_old = def(Format::Json, true);
        let del = enc(&with_old, &row(Op::Delete, b"k", b"", b""));
        assert!(del.contains(r#""value":null"#), "{del}");
        assert!(del.contains(r#""old_value":null"#), "{del}");
        assert!(!del.contains("_hex"), "{del}");
        let bin = enc(&with_old, &row(Op::Put, &[0xff], b"ok", &[0xfe]));
        assert!(bin.contains(r#""key":"\\xff","key_hex":"ff""#), "{bin}");
        assert!(!bin.contains("value_hex\":\"6f6b"), "{bin}");
        assert!(bin.contains(r#""old_value_hex":"fe""#), "{bin}");
    }

    #[test]
    fn debezium_envelopes_have_the_standard_fields() {
        let d = def(Format::Debezium, true);
        let v: serde_json::Value =
            serde_json::from_str(&enc(&d, &row(Op::Put, b"k", b"v2", b"v1"))).unwrap();
        assert_eq!(v["op"], "u");
        assert_eq!(v["before"]["value"], "v1");
        assert_eq!(v["after"]["key"], "k");
        assert_eq!(v["after"]["value"], "v2");
        assert_eq!(v["ts_ms"], 1_700_000_000_123u64);
        assert_eq!(v["source"]["ts_ms"], 1_700_000_000_123u64);
        assert_eq!(v["source"]["connector"], "kvfeed");
        assert_eq!(v["source"]["name"], "orders-1");
        assert_eq!(v["source"]["snapshot"], "false");
        assert!(
            v["source"]["version"]
                .as_str()
                .unwrap()
                .starts_with("kvfeed ")
        );
        let c: serde_json::Value =
            serde_json::from_str(&enc(&d, &row(Op::Put, b"k", b"v", b""))).unwrap();
        assert_eq!(c["op"], "c");
        assert!(c["before"].is_null());
        let del: serde_json::Value =
            serde_json::from_str(&enc(&d, &row(Op::Delete, b"k", b"", b""))).unwrap();
        assert_eq!(del["op"], "d");
        assert!(del["after"].is_null());
        assert_eq!(del["before"]["key"], "k");
        assert!(del["before"]["value"].is_null());
    }

    #[test]
    fn rows_round_trip_in_every_format() {
        for (format, old_value) in [
            (Format::Json, true),
            (Format::Json, false),
            (Format::Debezium, true),
        ] {
            let d = def(format, old_value);
            for r in rows() {
                let line = enc(&d, &r);
                assert!(!line.contains('\n'), "{line}");
                let back = decode(format, line.as_bytes()).unwrap();
                let expected = Row {
                    old_value: if old_value {
                        r.old_value.clone()
                    } else {
                        Bytes::new()
                    },
                    ..r.clone()
                };
                assert_eq!(back, expected, "{format:?} {line}");
            }
        }
    }

    #[test]
    fn bad_lines_are_refused_with_a_reason() {
        let err = decode(Format::Json, b"{\"op\":\"put\"").unwrap_err();
        assert!(
            err.to_string().starts_with("not a kvfeed json row"),
            "{err}"
        );
        let err = decode(
            Format::Json,
            br#"{"op":"upsert","key":"k","value":"v","start_ts":1,"commit_ts":2}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("unknown op"), "{err}");
        let err = decode(
            Format::Json,
            br#"{"op":"put","key":"k","key_hex":"zz","value":"v","start_ts":1,"commit_ts":2}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("key_hex"), "{err}");
        let line = enc(&def(Format::Debezium, true), &row(Op::Put, b"k", b"v", b""));
        let broken = line.replace(r#""op":"c""#, r#""op":"d""#);
        assert!(decode(Format::Debezium, broken.as_bytes()).is_err());
    }
}
