//! Versioned engine keys: the one definition of how a version is written
//! into a key.
//!
//! The write and default families (keyed by commit_ts and start_ts) and the
//! raw family (keyed by the write's ts) all store a version of user key `k`
//! under `encode(k) ++ (!ts).to_be_bytes()`. Because the encoding is
//! self-delimiting and the timestamp is inverted, a forward walk meets one
//! user key's versions together and newest first, and a reverse walk meets
//! them oldest first. Everything that builds or takes apart such a key —
//! the MVCC reader, raw KV, the delta scan — goes through this module.

use crate::engine::Cf;
use crate::mvcc::key::{TS_SUFFIX_LEN, decode_bytes};
use crate::{Error, Result, TimeStamp};

/// Versions a forward walk steps over, once it needs no more of a key's
/// history, before it seeks to the next key instead: a seek costs a search
/// in every memtable and table of the LSM tree, a step almost nothing
/// (TiKV's scanners have the same rule).
pub const STEPS_BEFORE_SEEK: usize = 32;

/// The engine key of version `ts` of the user key encoded as `encoded`.
pub fn with_version(encoded: &[u8], ts: TimeStamp) -> Vec<u8> {
    let mut key = Vec::with_capacity(encoded.len() + TS_SUFFIX_LEN);
    key.extend_from_slice(encoded);
    push_version(&mut key, ts);
    key
}

/// Appends version `ts` to an encoded user key, making it an engine key.
pub fn push_version(encoded: &mut Vec<u8>, ts: TimeStamp) {
    encoded.extend_from_slice(&(!ts.into_inner()).to_be_bytes());
}

/// The last possible version key of `encoded` (that of `TimeStamp::ZERO`,
/// whose inverted timestamp is all ones): as an exclusive lower bound it
/// moves past every version of the key, and no other key sorts between.
pub fn after_versions(encoded: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(encoded.len() + TS_SUFFIX_LEN);
    key.extend_from_slice(encoded);
    key.extend_from_slice(&[0xFF; TS_SUFFIX_LEN]);
    key
}

/// Whether engine key `versioned` is a version of the user key encoded as
/// `encoded`.
pub fn is_version_of(versioned: &[u8], encoded: &[u8]) -> bool {
    versioned.len() == encoded.len() + TS_SUFFIX_LEN && versioned.starts_with(encoded)
}

/// Splits a versioned key read from `cf` into its encoded user key and its
/// version. A key too short to hold a version is corrupt.
pub fn split(versioned: &[u8], cf: Cf) -> Result<(&[u8], TimeStamp)> {
    let corrupt = || {
        Error::corrupt(
            cf.name(),
            format!(
                "versioned key of {} bytes is shorter than its timestamp",
                versioned.len()
            ),
        )
    };
    let at = versioned
        .len()
        .checked_sub(TS_SUFFIX_LEN)
        .ok_or_else(corrupt)?;
    let (encoded, suffix) = versioned.split_at(at);
    let suffix = <[u8; TS_SUFFIX_LEN]>::try_from(suffix).map_err(|_| corrupt())?;
    Ok((encoded, TimeStamp::new(!u64::from_be_bytes(suffix))))
}

/// The user key encoded as `encoded`, read from `cf`, which must be exactly
/// one complete encoding.
pub fn user_key(encoded: &[u8], cf: Cf) -> Result<Vec<u8>> {
    let (key, used) = decode_bytes(encoded)
        .map_err(|e| Error::corrupt(cf.name(), format!("key encoding: {e}")))?;
    if used != encoded.len() {
        return Err(Error::corrupt(
            cf.name(),
            format!(
                "{} trailing bytes after an encoded key",
                encoded.len().saturating_sub(used)
            ),
        ));
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mvcc::key::encode_bytes;

    #[test]
    fn versions_sort_newest_first_and_split_back() {
        let encoded = encode_bytes(b"k");
        let newer = with_version(&encoded, TimeStamp::new(20));
        let older = with_version(&encoded, TimeStamp::new(10));
        assert!(newer < older);
        assert!(older < after_versions(&encoded));
        assert_eq!(
            with_version(&encoded, TimeStamp::ZERO),
            after_versions(&encoded)
        );
        assert!(after_versions(&encoded) < encode_bytes(b"k\0"));
        assert!(is_version_of(&newer, &encoded));
        assert!(!is_version_of(&encoded, &encoded));
        assert_eq!(
            split(&newer, Cf::Write).expect("split"),
            (encoded.as_slice(), TimeStamp::new(20))
        );
        assert!(split(b"short", Cf::Raw).is_err());
        assert_eq!(user_key(&encoded, Cf::Write).expect("decode"), b"k");
        let mut trailing = encoded.clone();
        trailing.push(0);
        assert!(user_key(&trailing, Cf::Write).is_err());
    }
}
