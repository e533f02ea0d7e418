//! Key codec: TiKV's memcomparable byte encoding and timestamped MVCC keys.
//!
//! Why memcomparable: user keys of any length must sort, after encoding,
//! exactly as they sorted before, *and* an encoded key followed by an 8-byte
//! timestamp suffix must still sort by user key first. Plain concatenation
//! breaks the second property (`"a" ++ ts` vs `"a\x00"`); the group encoding
//! below is self-delimiting, so no encoding is a proper prefix of another and
//! appending a suffix never reorders two different user keys.
//!
//! Encoding: the key is cut into groups of [`GROUP_SIZE`] bytes. Each full
//! group is written followed by the marker `0xFF`. The last group (possibly
//! empty) is zero-padded to eight bytes and followed by `0xFF - pad`, where
//! `pad` (1..=8) is the number of padding bytes. The empty key therefore
//! encodes to eight zeros and `0xF7`.
//!
//! Invariants:
//! - `decode_bytes(&encode_bytes(k)) == Ok((k, encode_bytes(k).len()))`.
//! - `a < b` ⇔ `encode_bytes(a) < encode_bytes(b)` (bytewise).
//! - [`decode_bytes`] accepts only canonical encodings (padding bytes must be
//!   zero, markers in range) and reports anything else as
//!   [`Error::InvalidInput`]; it never panics, whatever the input.
//! - MVCC keys in the write and default families are `encode(key) ++
//!   (!ts).to_be_bytes()`, so for one user key newer versions sort first.

use std::fmt;

use crate::engine::Cf;
use crate::{Error, Result, TimeStamp};

/// Largest user key accepted by transactional and raw writes: 8 KiB. TiKV's
/// default `max-key-size` (8 KiB) is the same; keeping the bound protects
/// region boundaries and lock records from unbounded growth.
pub const MAX_KEY_SIZE: usize = 8 * 1024;

/// Largest value accepted by a single put: 8 MiB. Above this a single gRPC
/// message (and a single write batch) would become unreasonably large.
pub const MAX_VALUE_SIZE: usize = 8 * 1024 * 1024;

/// Bytes per encoding group.
pub const GROUP_SIZE: usize = 8;
/// Marker following a full group.
const MARKER: u8 = 0xFF;
/// Width of the timestamp suffix of write/default family keys.
pub const TS_SUFFIX_LEN: usize = 8;

/// Memcomparable-encodes `key` (TiKV `codec::bytes::encode_bytes`).
pub fn encode_bytes(key: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(encoded_len(key.len()));
    encode_bytes_into(key, &mut out);
    out
}

/// Length of the encoding of a key of `len` bytes.
pub fn encoded_len(len: usize) -> usize {
    (len / GROUP_SIZE + 1) * (GROUP_SIZE + 1)
}

fn encode_bytes_into(key: &[u8], out: &mut Vec<u8>) {
    let mut chunks = key.chunks_exact(GROUP_SIZE);
    for chunk in &mut chunks {
        out.extend_from_slice(chunk);
        out.push(MARKER);
    }
    let rest = chunks.remainder();
    let pad = GROUP_SIZE - rest.len();
    out.extend_from_slice(rest);
    out.extend(std::iter::repeat_n(0u8, pad));
    // `pad` is in 1..=8, so the subtraction cannot underflow.
    out.push(MARKER - pad as u8);
}

/// Decodes one memcomparable-encoded key from the front of `input`.
///
/// Returns the user key and the number of bytes of `input` it occupied, so a
/// caller can decode a key that is followed by more data (a timestamp).
/// Invalid or truncated input is an [`Error::InvalidInput`].
pub fn decode_bytes(input: &[u8]) -> Result<(Vec<u8>, usize)> {
    let mut key = Vec::with_capacity(input.len() / (GROUP_SIZE + 1) * GROUP_SIZE);
    let mut offset = 0;
    loop {
        let Some(group) = input.get(offset..offset + GROUP_SIZE + 1) else {
            return Err(Error::InvalidInput(format!(
                "memcomparable key truncated at byte {offset} of {}",
                input.len()
            )));
        };
        offset += GROUP_SIZE + 1;
        let marker = group[GROUP_SIZE];
        let pad = usize::from(MARKER - marker);
        if pad == 0 {
            key.extend_from_slice(&group[..GROUP_SIZE]);
            continue;
        }
        if pad > GROUP_SIZE {
            return Err(Error::InvalidInput(format!(
                "memcomparable key has invalid marker {marker:#04x} at byte {}",
                offset - 1
            )));
        }
        let (data, padding) = group[..GROUP_SIZE].split_at(GROUP_SIZE - pad);
        if padding.iter().any(|&b| b != 0) {
            return Err(Error::InvalidInput(format!(
                "memcomparable key has non-zero padding before byte {}",
                offset - 1
            )));
        }
        key.extend_from_slice(data);
        return Ok((key, offset));
    }
}

/// Rejects keys the store refuses: empty or longer than [`MAX_KEY_SIZE`].
pub fn check_key(key: &[u8]) -> Result<()> {
    if key.is_empty() {
        return Err(Error::InvalidInput("key is empty".into()));
    }
    if key.len() > MAX_KEY_SIZE {
        return Err(Error::InvalidInput(format!(
            "key of {} bytes exceeds the limit of {MAX_KEY_SIZE} bytes",
            key.len()
        )));
    }
    Ok(())
}

/// Rejects values longer than [`MAX_VALUE_SIZE`].
pub fn check_value(value: &[u8]) -> Result<()> {
    if value.len() > MAX_VALUE_SIZE {
        return Err(Error::InvalidInput(format!(
            "value of {} bytes exceeds the limit of {MAX_VALUE_SIZE} bytes",
            value.len()
        )));
    }
    Ok(())
}

/// A memcomparable-encoded user key, without timestamp: the lock family's key
/// and the common prefix of every version in the write and default families.
///
/// Invariant: the bytes are a canonical encoding (constructed by
/// [`Key::from_raw`] or validated by [`Key::from_encoded`]), so
/// [`Key::to_raw`] cannot fail on a `Key` built through this API.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key(Vec<u8>);

impl Key {
    /// Encodes a user key.
    pub fn from_raw(raw: &[u8]) -> Key {
        Key(encode_bytes(raw))
    }

    /// Wraps already-encoded bytes after checking they are exactly one
    /// canonical encoding (no trailing bytes).
    pub fn from_encoded(encoded: Vec<u8>) -> Result<Key> {
        let (_, used) = decode_bytes(&encoded)?;
        if used != encoded.len() {
            return Err(Error::InvalidInput(format!(
                "encoded key has {} trailing bytes",
                encoded.len() - used
            )));
        }
        Ok(Key(encoded))
    }

    /// The encoded bytes (the lock family key).
    pub fn as_encoded(&self) -> &[u8] {
        &self.0
    }

    pub fn into_encoded(self) -> Vec<u8> {
        self.0
    }

    /// The user key.
    pub fn to_raw(&self) -> Result<Vec<u8>> {
        decode_bytes(&self.0).map(|(raw, _)| raw)
    }

    /// The key of version `ts` in the write or default family.
    pub fn append_ts(&self, ts: TimeStamp) -> Vec<u8> {
        crate::versioned::with_version(&self.0, ts)
    }

    /// Whether `versioned` (a write/default family key) is a version of this
    /// key.
    pub fn is_prefix_of(&self, versioned: &[u8]) -> bool {
        crate::versioned::is_version_of(versioned, &self.0)
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.to_raw() {
            Ok(raw) => write!(f, "Key({})", escape(&raw)),
            Err(_) => write!(f, "Key(<invalid {}>)", escape(&self.0)),
        }
    }
}

/// Splits a write/default family key into its encoded user key and version.
/// The caller states which family the key came from for error reporting.
pub fn split_versioned(versioned: &[u8], cf: Cf) -> Result<(Key, TimeStamp)> {
    let (encoded, ts) = crate::versioned::split(versioned, cf)?;
    let key = Key::from_encoded(encoded.to_vec())
        .map_err(|e| Error::corrupt(cf.name(), format!("versioned key: {e}")))?;
    Ok((key, ts))
}

/// Printable form of a byte string for logs and errors.
pub(crate) fn escape(bytes: &[u8]) -> String {
    bytes.escape_ascii().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_encodings() {
        assert_eq!(encode_bytes(b""), [0, 0, 0, 0, 0, 0, 0, 0, 0xF7]);
        assert_eq!(encode_bytes(b"a"), [b'a', 0, 0, 0, 0, 0, 0, 0, 0xF8]);
        assert_eq!(
            encode_bytes(&[0xFF; 8]),
            [
                0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0, 0, 0, 0, 0, 0, 0xF7
            ]
        );
        assert_eq!(encode_bytes(b"abcdefg").len(), 9);
        assert_eq!(encode_bytes(b"abcdefgh").len(), 18);
    }

    #[test]
    fn decode_reports_consumed_prefix() {
        let mut buf = encode_bytes(b"hello world");
        let len = buf.len();
        buf.extend_from_slice(&[1, 2, 3]);
        assert_eq!(
            decode_bytes(&buf).ok(),
            Some((b"hello world".to_vec(), len))
        );
    }

    #[test]
    fn decode_rejects_bad_input() {
        for bad in [
            &[][..],
            &[0, 0, 0][..],
            &[0, 0, 0, 0, 0, 0, 0, 0, 0xF6][..],
            &[1, 0, 0, 0, 0, 0, 0, 1, 0xF8][..],
            &[1, 2, 3, 4, 5, 6, 7, 8, 0xFF][..],
        ] {
            assert!(
                matches!(decode_bytes(bad), Err(Error::InvalidInput(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn versioned_keys_sort_newest_first() {
        let k = Key::from_raw(b"k");
        assert!(k.append_ts(TimeStamp::new(20)) < k.append_ts(TimeStamp::new(10)));
        let (back, ts) = split_versioned(&k.append_ts(TimeStamp::new(7)), Cf::Write)
            .ok()
            .unzip();
        assert_eq!(back, Some(k.clone()));
        assert_eq!(ts, Some(TimeStamp::new(7)));
        assert!(k.is_prefix_of(&k.append_ts(TimeStamp::MAX)));
        assert!(split_versioned(b"short", Cf::Write).is_err());
    }

    #[test]
    fn limits() {
        assert!(check_key(b"").is_err());
        assert!(check_key(&vec![1; MAX_KEY_SIZE]).is_ok());
        assert!(check_key(&vec![1; MAX_KEY_SIZE + 1]).is_err());
        assert!(check_value(&vec![1; MAX_VALUE_SIZE + 1]).is_err());
        assert!(check_value(b"").is_ok());
    }
}
