//! A one-item lookahead over an [`EngineIter`].
//!
//! Merging walks (a lock family beside a write family, a user key's
//! versions after its first one) need to look at the next entry before
//! deciding whether it belongs to the current step. A [`Cursor`] holds that
//! entry, the *head*, until the caller takes it or moves past it.
//!
//! Invariants:
//! - The head is always the next entry the iterator has not yet yielded to
//!   the caller; `None` once the iterator is exhausted.
//! - An engine error ends the walk: it is returned by the call that met it
//!   and the cursor must not be used further (the head is then `None`).
//! - [`Cursor::take`] hands the head over by value, so a walk that keeps an
//!   entry costs no copy beyond the one the engine made to return it.

use crate::engine::{Cf, EngineIter, KvPair};
use crate::{Error, Result};

/// A one-item lookahead over an engine iterator; see the module docs.
pub struct Cursor<'a> {
    iter: EngineIter<'a>,
    head: Option<KvPair>,
}

impl<'a> Cursor<'a> {
    /// Reads the first entry of `iter`.
    pub fn new(mut iter: EngineIter<'a>) -> Result<Self> {
        let head = iter.next().transpose()?;
        Ok(Cursor { iter, head })
    }

    /// The next entry, not yet consumed.
    pub fn head(&self) -> Option<(&[u8], &[u8])> {
        self.head
            .as_ref()
            .map(|(k, v)| (k.as_slice(), v.as_slice()))
    }

    /// The key of the head.
    pub fn head_key(&self) -> Option<&[u8]> {
        self.head.as_ref().map(|(k, _)| k.as_slice())
    }

    /// The head key without its last `suffix_len` bytes: the user key of a
    /// versioned key read from `cf`. A key shorter than the suffix is
    /// corrupt.
    pub fn head_key_prefix(&self, suffix_len: usize, cf: Cf) -> Result<Option<&[u8]>> {
        match &self.head {
            None => Ok(None),
            Some((k, _)) => match k.len().checked_sub(suffix_len) {
                Some(n) => Ok(k.get(..n)),
                None => Err(Error::corrupt(
                    cf.name(),
                    "versioned key shorter than its timestamp",
                )),
            },
        }
    }

    /// Moves past the head.
    pub fn advance(&mut self) -> Result<()> {
        self.head = None;
        self.head = self.iter.next().transpose()?;
        Ok(())
    }

    /// Takes the head by value and moves past it.
    pub fn take(&mut self) -> Result<Option<KvPair>> {
        let head = self.head.take();
        self.head = self.iter.next().transpose()?;
        Ok(head)
    }
}

#[cfg(test)]
mod tests {
    use std::ops::Bound;

    use super::*;
    use crate::engine::memory::MemoryEngine;
    use crate::engine::{Engine, WriteBatch};

    #[test]
    fn looks_ahead_takes_and_strips_suffixes() {
        let engine = MemoryEngine::new();
        let mut batch = WriteBatch::new();
        batch.put(Cf::Write, b"a-ts1".to_vec(), b"1".to_vec());
        batch.put(Cf::Write, b"b-ts2".to_vec(), b"2".to_vec());
        batch.put(Cf::Write, b"c".to_vec(), b"3".to_vec());
        engine.write(&batch).expect("write");
        let snap = engine.snapshot();
        let mut cursor =
            Cursor::new(snap.iter(Cf::Write, Bound::Unbounded, Bound::Unbounded, false))
                .expect("cursor");
        assert_eq!(cursor.head(), Some((&b"a-ts1"[..], &b"1"[..])));
        assert_eq!(
            cursor.head_key_prefix(4, Cf::Write).expect("prefix"),
            Some(&b"a"[..])
        );
        cursor.advance().expect("advance");
        assert_eq!(
            cursor.take().expect("take"),
            Some((b"b-ts2".to_vec(), b"2".to_vec()))
        );
        assert_eq!(cursor.head_key(), Some(&b"c"[..]));
        assert!(
            cursor.head_key_prefix(4, Cf::Write).is_err(),
            "shorter than its suffix"
        );
        cursor.advance().expect("advance");
        assert_eq!(cursor.head(), None);
        assert_eq!(cursor.take().expect("take"), None);
    }
}
