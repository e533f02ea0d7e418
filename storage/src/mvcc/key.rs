//! Key codec: TiKV's memcomparable byte encoding (defined in
//! [`kvfeed_types::codec`], which clients share) and timestamped MVCC keys.
//!
//! The encoding and its ordering invariants are documented there. Here:
//! - [`decode_bytes`] reports a non-canonical encoding as
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

/// Width of the timestamp suffix of write/default family keys.
pub const TS_SUFFIX_LEN: usize = 8;

pub use kvfeed_types::codec::{GROUP_SIZE, encode_bytes, encoded_len};

/// Decodes one memcomparable-encoded key from the front of `input`
/// ([`kvfeed_types::codec::decode_bytes`]), reporting invalid or truncated
/// input as the store's [`Error::InvalidInput`].
pub fn decode_bytes(input: &[u8]) -> Result<(Vec<u8>, usize)> {
    kvfeed_types::codec::decode_bytes(input).map_err(|e| Error::InvalidInput(e.to_string()))
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

    /// The encoded bytes, by value (no copy).
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
