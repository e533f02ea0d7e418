//! TiKV's memcomparable byte encoding (`codec::bytes::encode_bytes`).
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
//!   zero, markers in range) and reports anything else as a [`CodecError`];
//!   it never panics, whatever the input.

/// Bytes per encoding group.
pub const GROUP_SIZE: usize = 8;
/// Marker following a full group.
const MARKER: u8 = 0xFF;

/// Why a byte string is not a canonical memcomparable encoding.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// The input ended inside a group: fewer than nine bytes (eight data
    /// bytes and a marker) were left, and no earlier group ended the key.
    #[error("memcomparable key truncated at byte {offset} of {len}")]
    Truncated {
        /// Where the incomplete group starts in the input.
        offset: usize,
        /// The input's whole length in bytes.
        len: usize,
    },
    /// A marker byte below `0xF7`: it would claim more than eight padding
    /// bytes, which no encoder writes.
    #[error("memcomparable key has invalid marker {marker:#04x} at byte {offset}")]
    InvalidMarker {
        /// The marker byte found.
        marker: u8,
        /// Where the marker sits in the input.
        offset: usize,
    },
    /// The last group's padding is not all zeros, so the input is not the
    /// canonical encoding of any key (two inputs would decode alike).
    #[error("memcomparable key has non-zero padding before byte {offset}")]
    NonZeroPadding {
        /// Where the group's marker sits; the padding is just before it.
        offset: usize,
    },
}

/// Memcomparable-encodes `key`.
pub fn encode_bytes(key: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(encoded_len(key.len()));
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
    out
}

/// Length of the encoding of a key of `len` bytes.
pub fn encoded_len(len: usize) -> usize {
    (len / GROUP_SIZE + 1) * (GROUP_SIZE + 1)
}

/// Decodes one memcomparable-encoded key from the front of `input`.
///
/// Returns the user key and the number of bytes of `input` it occupied, so a
/// caller can decode a key that is followed by more data (a timestamp).
pub fn decode_bytes(input: &[u8]) -> Result<(Vec<u8>, usize), CodecError> {
    let mut key = Vec::with_capacity(input.len() / (GROUP_SIZE + 1) * GROUP_SIZE);
    let mut offset = 0;
    loop {
        let Some(group) = input.get(offset..offset + GROUP_SIZE + 1) else {
            return Err(CodecError::Truncated {
                offset,
                len: input.len(),
            });
        };
        offset += GROUP_SIZE + 1;
        let (data, marker) = group.split_at(GROUP_SIZE);
        let marker = marker.first().copied().unwrap_or(MARKER);
        let pad = usize::from(MARKER - marker);
        if pad == 0 {
            key.extend_from_slice(data);
            continue;
        }
        if pad > GROUP_SIZE {
            return Err(CodecError::InvalidMarker {
                marker,
                offset: offset - 1,
            });
        }
        let (data, padding) = data.split_at(GROUP_SIZE - pad);
        if padding.iter().any(|&b| b != 0) {
            return Err(CodecError::NonZeroPadding { offset: offset - 1 });
        }
        key.extend_from_slice(data);
        return Ok((key, offset));
    }
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
        assert_eq!(encode_bytes(b"abcdefgh").len(), encoded_len(8));
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
        assert!(matches!(
            decode_bytes(&[0, 0, 0]),
            Err(CodecError::Truncated { .. })
        ));
        assert!(matches!(
            decode_bytes(&[0, 0, 0, 0, 0, 0, 0, 0, 0xF6]),
            Err(CodecError::InvalidMarker { .. })
        ));
        assert!(matches!(
            decode_bytes(&[1, 0, 0, 0, 0, 0, 0, 1, 0xF8]),
            Err(CodecError::NonZeroPadding { .. })
        ));
    }
}
