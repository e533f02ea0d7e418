//! How the client tools read keys from the command line and print keys and
//! values: escaping, hex, JSON lines, and key-range helpers.
//!
//! Keys and values are arbitrary bytes, but a terminal shows text. The rules:
//! - [`escape`] is lossless and unambiguous: valid UTF-8 that is printable
//!   stays as it is, a backslash becomes `\\`, every other byte becomes
//!   `\xNN` (control characters are escaped per byte of their UTF-8
//!   encoding). So `key = value` lines never break across lines, and two
//!   different byte strings never print the same way.
//! - [`hex`] / [`parse_hex`] are the exact form (`--hex`, and the `key_hex` /
//!   `value_hex` JSON fields), so scripts never have to undo escaping.
//! - A JSON line holds `key` and `value` as text (the UTF-8 string when valid,
//!   else the escaped form) plus their hex, so it is both readable and exact.

use serde::Serialize;

pub use kvfeed_client::region::prefix_successor;
pub use kvfeed_client::text::{escape, hex};

/// Why a `--hex` argument could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HexError {
    #[error("odd number of hex digits in {0:?}")]
    OddLength(String),
    #[error("{found:?} is not a hex digit (in {text:?})")]
    BadDigit { text: String, found: char },
}

/// Parses hex (either case, an optional `0x` prefix) into bytes.
pub fn parse_hex(text: &str) -> Result<Vec<u8>, HexError> {
    let digits = text
        .strip_prefix("0x")
        .or_else(|| text.strip_prefix("0X"))
        .unwrap_or(text);
    if !digits.len().is_multiple_of(2) {
        return Err(HexError::OddLength(text.to_owned()));
    }
    let nibble = |c: char| {
        c.to_digit(16)
            .and_then(|d| u8::try_from(d).ok())
            .ok_or_else(|| HexError::BadDigit {
                text: text.to_owned(),
                found: c,
            })
    };
    let chars: Vec<char> = digits.chars().collect();
    chars
        .chunks(2)
        .map(|pair| match pair {
            [hi, lo] => Ok(nibble(*hi)? << 4 | nibble(*lo)?),
            // `digits.len()` is even and hex digits are ASCII, so a chunk of
            // one char only happens with multi-byte characters.
            _ => Err(HexError::OddLength(text.to_owned())),
        })
        .collect()
}

/// How the tools show keys and values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// Escaped text ([`escape`]).
    Text,
    /// Lower-case hex (`--hex`).
    Hex,
}

impl Style {
    /// Reads a key or value typed on the command line.
    pub fn parse(self, arg: &str) -> Result<Vec<u8>, HexError> {
        match self {
            Style::Text => Ok(arg.as_bytes().to_vec()),
            Style::Hex => parse_hex(arg),
        }
    }

    /// Shows bytes inside a line of output (never spans lines).
    pub fn show(self, bytes: &[u8]) -> String {
        match self {
            Style::Text => escape(bytes),
            Style::Hex => hex(bytes),
        }
    }

    /// Shows a value on its own (`get`): valid UTF-8 text as it is, since
    /// it is alone on its line(s), else escaped; hex in hex mode.
    pub fn show_value(self, value: &[u8]) -> String {
        match (self, std::str::from_utf8(value)) {
            (Style::Text, Ok(text)) => text.to_owned(),
            _ => self.show(value),
        }
    }
}

/// Text form for JSON: the string itself when valid UTF-8, else escaped.
pub fn json_text(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(text) => text.to_owned(),
        Err(_) => escape(bytes),
    }
}

/// One JSON output line for a key (and its value, when there is one).
#[derive(Debug, Serialize)]
pub struct JsonEntry {
    pub key: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    pub key_hex: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value_hex: Option<String>,
    /// Start ts of the transaction that wrote (txn `put`/`delete` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub start_ts: Option<u64>,
    /// Commit ts of the write (txn `put`/`delete` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub commit_ts: Option<u64>,
}

impl JsonEntry {
    /// An entry for `key` with `value`.
    pub fn pair(key: &[u8], value: &[u8]) -> JsonEntry {
        JsonEntry {
            value: Some(json_text(value)),
            value_hex: Some(hex(value)),
            ..JsonEntry::key(key)
        }
    }

    /// An entry for `key` alone.
    pub fn key(key: &[u8]) -> JsonEntry {
        JsonEntry {
            key: json_text(key),
            value: None,
            key_hex: hex(key),
            value_hex: None,
            start_ts: None,
            commit_ts: None,
        }
    }

    /// The entry as one line of JSON (no trailing newline).
    pub fn to_line(&self) -> String {
        // Serialising a struct of strings and integers cannot fail; fall back
        // to an empty object rather than aborting if it ever did.
        serde_json::to_string(self).unwrap_or_else(|_| "{}".to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips() {
        let bytes: Vec<u8> = (0..=255).collect();
        let text = hex(&bytes);
        assert_eq!(text.len(), 512);
        assert_eq!(&text[..6], "000102");
        assert_eq!(parse_hex(&text), Ok(bytes.clone()));
        assert_eq!(parse_hex(&text.to_uppercase()), Ok(bytes));
        assert_eq!(parse_hex("0xFF01"), Ok(vec![0xff, 0x01]));
        assert_eq!(parse_hex(""), Ok(vec![]));
    }

    #[test]
    fn bad_hex_is_refused() {
        assert!(matches!(parse_hex("abc"), Err(HexError::OddLength(_))));
        assert!(matches!(
            parse_hex("zz"),
            Err(HexError::BadDigit { found: 'z', .. })
        ));
        assert!(parse_hex("éé").is_err());
    }

    #[test]
    fn styles_parse_and_show() {
        assert_eq!(Style::Text.parse("k1"), Ok(b"k1".to_vec()));
        assert_eq!(Style::Hex.parse("6b31"), Ok(b"k1".to_vec()));
        assert_eq!(Style::Text.show(b"a\nb"), "a\\x0ab");
        assert_eq!(Style::Text.show_value(b"a\nb"), "a\nb");
        assert_eq!(Style::Text.show_value(&[0xff, b'a']), "\\xffa");
        assert_eq!(Style::Hex.show_value(b"a\nb"), "610a62");
    }

    #[test]
    fn json_lines_carry_text_and_hex() {
        let line = JsonEntry::pair(b"k", &[0xff, b'v']).to_line();
        let parsed: serde_json::Value = serde_json::from_str(&line).expect("json");
        assert_eq!(parsed["key"], "k");
        assert_eq!(parsed["value"], "\\xffv");
        assert_eq!(parsed["key_hex"], "6b");
        assert_eq!(parsed["value_hex"], "ff76");
        assert!(parsed.get("commit_ts").is_none());
        let key_only = JsonEntry::key(b"k").to_line();
        assert_eq!(key_only, r#"{"key":"k","key_hex":"6b"}"#);
    }
}
