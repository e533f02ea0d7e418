//! Range scans across regions, in key order, in pages.
//!
//! A [`Scanner`] keeps a cursor (the next user key to read) and walks the
//! regions from there: it looks up the region holding the cursor, clips the
//! requested range to the region's bounds (decoded for transactional keys,
//! see [`KeyMode`]), asks for one page, and moves the cursor either past the
//! last key returned (the page was full, the region may hold more) or to the
//! region's end (the page was short, the region is done).
//!
//! Invariants:
//! - The cursor only moves forward and every key is returned at most once:
//!   a retried page (region error, resolved lock) restarts at the same
//!   cursor.
//! - Transactional scans read one snapshot: every page uses the scan's `ts`.
//! - At most `limit` pairs in total; memory is one page, whatever the range.

use kvfeed_types::TimeStamp;

use super::region::clip;
use super::{ClientError, Cluster, KeyMode, Result};

/// Pairs asked for per request.
pub const PAGE_SIZE: u32 = 256;

/// A key and its value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pair {
    /// The user key (never the encoded form, in either key space).
    pub key: Vec<u8>,
    /// The value stored under it.
    pub value: Vec<u8>,
}

/// A scan in progress; see the module comment.
pub struct Scanner {
    cluster: Cluster,
    mode: KeyMode,
    /// Next user key to read; `None` once the range is exhausted.
    cursor: Option<Vec<u8>>,
    /// Exclusive upper bound (user key); empty means unbounded.
    end: Vec<u8>,
    /// Pairs still allowed; `None` means no limit.
    remaining: Option<u64>,
    /// Snapshot of a transactional scan (unused for raw scans).
    ts: TimeStamp,
}

impl Cluster {
    /// A scan of `[start, end)` (user keys of `mode`, empty `end` =
    /// unbounded) returning at most `limit` pairs (`None` = all).
    /// Transactional scans read at a fresh timestamp.
    pub async fn scan(
        &self,
        mode: KeyMode,
        start: &[u8],
        end: &[u8],
        limit: Option<u64>,
    ) -> Result<Scanner> {
        let ts = match mode {
            KeyMode::Txn => self.tso().await?,
            KeyMode::Raw => TimeStamp::ZERO,
        };
        Ok(self.scan_at(mode, start, end, limit, ts))
    }

    /// Like [`Cluster::scan`], reading a transactional scan at `ts`.
    pub fn scan_at(
        &self,
        mode: KeyMode,
        start: &[u8],
        end: &[u8],
        limit: Option<u64>,
        ts: TimeStamp,
    ) -> Scanner {
        Scanner {
            cluster: self.clone(),
            mode,
            cursor: Some(start.to_vec()),
            end: end.to_vec(),
            remaining: limit,
            ts,
        }
    }
}

/// What one page read did.
struct Page {
    pairs: Vec<Pair>,
    /// The upper bound the page was clipped to (user key, empty =
    /// unbounded); `None` when the region holds nothing of the range.
    clipped_end: Option<Vec<u8>>,
}

impl Scanner {
    /// The next pairs in key order, or `None` when the scan is complete.
    /// Never returns an empty page.
    pub async fn next_page(&mut self) -> Result<Option<Vec<Pair>>> {
        loop {
            let Some(cursor) = self.cursor.clone() else {
                return Ok(None);
            };
            if self.remaining == Some(0) {
                self.cursor = None;
                return Ok(None);
            }
            let want = match self.remaining {
                Some(r) => u32::try_from(r).map_or(PAGE_SIZE, |r| r.min(PAGE_SIZE)),
                None => PAGE_SIZE,
            };
            let page = self
                .cluster
                .resolving(async || self.read_page(&cursor, want).await)
                .await?;
            let full = page.pairs.len() >= want as usize;
            self.cursor = match (&page.clipped_end, page.pairs.last()) {
                // A full page: the region may hold more after the last key.
                (_, Some(last)) if full => Some(key_successor(&last.key)),
                // The region is done; the range too when the clipped end
                // is the range's end (or unbounded).
                (Some(to), _) if to.is_empty() || *to == self.end => None,
                (Some(to), _) => Some(to.clone()),
                (None, _) => None,
            };
            if let Some(r) = self.remaining.as_mut() {
                *r = r.saturating_sub(page.pairs.len() as u64);
            }
            if !page.pairs.is_empty() {
                return Ok(Some(page.pairs));
            }
        }
    }

    /// Reads up to `want` pairs from `cursor` in the region that holds it.
    async fn read_page(&self, cursor: &[u8], want: u32) -> Result<Page> {
        let mode = self.mode;
        self.cluster
            .with_region(mode, cursor, "scan", async |region, store| {
                let (lo, hi) = region.user_range(mode)?;
                let Some((from, to)) = clip(cursor, &self.end, &lo, &hi) else {
                    return Ok(Page {
                        pairs: Vec::new(),
                        clipped_end: None,
                    });
                };
                let pairs = match mode {
                    KeyMode::Raw => {
                        self.cluster
                            .raw_scan_region(region, store, &from, &to, want)
                            .await?
                    }
                    KeyMode::Txn => {
                        self.cluster
                            .kv_scan_region(region, store, (&from, &to), want, self.ts)
                            .await?
                    }
                };
                check_order(&pairs, &from, &to)?;
                Ok(Page {
                    pairs,
                    clipped_end: Some(to),
                })
            })
            .await
    }
}

/// The smallest key after `key`.
fn key_successor(key: &[u8]) -> Vec<u8> {
    let mut next = Vec::with_capacity(key.len() + 1);
    next.extend_from_slice(key);
    next.push(0);
    next
}

/// Refuses a page that is out of order or outside the range asked for: the
/// cursor logic depends on both, and a wrong server must not make a scan
/// repeat or loop.
fn check_order(pairs: &[Pair], from: &[u8], to: &[u8]) -> Result<()> {
    let in_range = |k: &[u8]| k >= from && (to.is_empty() || k < to);
    let sorted = pairs.windows(2).all(|w| w[0].key < w[1].key);
    if sorted && pairs.iter().all(|p| in_range(&p.key)) {
        Ok(())
    } else {
        Err(ClientError::bad(
            "scan",
            "keys out of order or outside the requested range",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(key: &[u8]) -> Pair {
        Pair {
            key: key.to_vec(),
            value: Vec::new(),
        }
    }

    #[test]
    fn successor_is_the_next_key() {
        assert_eq!(key_successor(b"a"), b"a\0".to_vec());
        assert!(key_successor(b"a").as_slice() > b"a".as_slice());
        assert!(key_successor(b"a").as_slice() < b"a\0\0".as_slice());
    }

    #[test]
    fn pages_must_be_sorted_and_in_range() {
        assert!(check_order(&[pair(b"b"), pair(b"c")], b"b", b"d").is_ok());
        assert!(check_order(&[pair(b"b"), pair(b"c")], b"a", b"").is_ok());
        assert!(check_order(&[pair(b"c"), pair(b"b")], b"a", b"").is_err());
        assert!(check_order(&[pair(b"b"), pair(b"b")], b"a", b"").is_err());
        assert!(check_order(&[pair(b"a")], b"b", b"").is_err());
        assert!(check_order(&[pair(b"d")], b"a", b"d").is_err());
    }
}
