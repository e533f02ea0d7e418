//! GC safe points: how far back MVCC history must be kept.
//!
//! Two kinds of bound decide which old versions garbage collection may
//! remove, as in PD:
//!
//! - the **GC safe point**, raised by a client that has resolved every lock
//!   below it (`tikv-client`'s `gc()` ends with `UpdateGCSafePoint`). It never
//!   decreases;
//! - **service safe points**, one per service (a changefeed, a backup), each
//!   with a time to live. While unexpired, a service's safe point holds GC
//!   back so the service can still read the snapshot it needs.
//!
//! The *effective* safe point is the minimum of the GC safe point and every
//! unexpired service safe point; GC never removes a version still visible at
//! it.
//!
//! # Invariants
//!
//! - The store is the only source of truth: every read takes a fresh snapshot
//!   of [`Cf::Meta`], and every change is written with
//!   [`BatchSource::Internal`] before the call returns. Any number of
//!   instances over one store therefore read the same state (the GC worker
//!   reads through its own). Read-modify-write is serialised by a mutex inside
//!   one instance, so **one instance per store may write** (the PD service's).
//! - A service safe point is accepted only if it is at least the current
//!   effective safe point. GC may already have collected up to that point, so
//!   a lower one would promise a snapshot that is gone. (PD refuses a service
//!   safe point below its minimum service safe point for the same reason; its
//!   minimum includes the GC worker's entry, which follows the GC safe point.)
//! - Expired entries are ignored by every read and deleted by the next write,
//!   so after a clock step back an entry that was once treated as expired
//!   could only come back until that write; it never lowers a safe point that
//!   GC already acted on, because the GC worker only moves forward.
//! - The number of services is bounded by [`MAX_SERVICES`] and ids by
//!   [`MAX_SERVICE_ID_LEN`], so a misbehaving client cannot grow the state
//!   without limit.
//!
//! Layout in [`Cf::Meta`]: [`GC_SAFE_POINT_KEY`] → 8 bytes big-endian;
//! [`SERVICE_KEY_PREFIX`] + id → safe point and expiry (milliseconds since the
//! epoch, `u64::MAX` for never), 8 bytes big-endian each.

use std::fmt;
use std::ops::Bound;
use std::sync::Arc;

use parking_lot::Mutex;

use crate::engine::{Cf, WriteBatch};
use crate::store::{BatchSource, Store};
use crate::tso::Clock;
use crate::{Error, TimeStamp};

/// Key of the GC safe point in [`Cf::Meta`].
pub const GC_SAFE_POINT_KEY: &[u8] = b"gc/safe_point";
/// Prefix of the service safe point keys in [`Cf::Meta`].
pub const SERVICE_KEY_PREFIX: &[u8] = b"gc/service/";
/// Most unexpired services that may hold a safe point at once.
pub const MAX_SERVICES: usize = 1024;
/// Longest accepted service id, in bytes.
pub const MAX_SERVICE_ID_LEN: usize = 256;
/// The id reported as the holder of the minimum when the GC safe point
/// itself is the minimum. PD names the GC worker's entry the same way.
pub const GC_WORKER_SERVICE_ID: &[u8] = b"gc_worker";

/// A service's identifier (PD's `service_id`: arbitrary bytes, non-empty).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceId(Vec<u8>);

impl ServiceId {
    /// Wraps `id` as is; emptiness and length are checked when the id is
    /// used, not here.
    pub fn new(id: impl Into<Vec<u8>>) -> Self {
        ServiceId(id.into())
    }

    /// The id's bytes, as PD carries them.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Takes the id's bytes out.
    pub fn into_bytes(self) -> Vec<u8> {
        self.0
    }
}

impl fmt::Display for ServiceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", String::from_utf8_lossy(&self.0).escape_debug())
    }
}

/// Why a safe point operation was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum SafePointError {
    /// An update named the empty service id.
    #[error("a service id must not be empty")]
    EmptyServiceId,
    /// An update named a service id longer than [`MAX_SERVICE_ID_LEN`].
    #[error("service id is {len} bytes; at most {MAX_SERVICE_ID_LEN} are allowed")]
    ServiceIdTooLong {
        /// The id's length in bytes.
        len: usize,
    },
    /// A service without an entry tried to add one while [`MAX_SERVICES`]
    /// services already hold a safe point.
    #[error(
        "{MAX_SERVICES} services already hold a GC safe point; service {service_id} cannot be added"
    )]
    TooManyServices {
        /// The service that was refused.
        service_id: ServiceId,
    },
    /// Reading or writing the stored safe points failed.
    #[error(transparent)]
    Storage(#[from] Error),
}

/// One service's safe point.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceSafePoint {
    /// The service holding the entry.
    pub service_id: ServiceId,
    /// Versions at or above this must survive GC for the service.
    pub safe_point: TimeStamp,
    /// Milliseconds since the epoch at which the entry expires; `u64::MAX`
    /// means never.
    pub expires_at_ms: u64,
}

impl ServiceSafePoint {
    fn is_expired(&self, now_ms: u64) -> bool {
        now_ms >= self.expires_at_ms
    }
}

/// The lowest bound holding GC back, and who holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MinSafePoint {
    /// The service holding the minimum, or [`GC_WORKER_SERVICE_ID`] when the
    /// GC safe point is (or ties with) the minimum.
    pub service_id: ServiceId,
    /// The effective safe point.
    pub safe_point: TimeStamp,
    /// Whole seconds (rounded up) until the holder expires; `i64::MAX` for
    /// never.
    pub ttl_secs: i64,
}

/// The outcome of [`SafePoints::update_service`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceUpdate {
    /// Whether the service's entry was stored (false for a removal, and for
    /// a safe point below the effective one).
    pub updated: bool,
    /// The minimum after the call.
    pub min: MinSafePoint,
}

/// Everything stored, as read from one snapshot.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SafePointState {
    /// The GC safe point: versions below it may already be gone.
    pub gc_safe_point: TimeStamp,
    /// Every stored service entry, expired or not, ordered by id.
    pub services: Vec<ServiceSafePoint>,
}

impl SafePointState {
    /// The minimum of the GC safe point and the services unexpired at `now_ms`.
    pub fn min(&self, now_ms: u64) -> MinSafePoint {
        let lowest = self
            .services
            .iter()
            .filter(|s| !s.is_expired(now_ms))
            .min_by_key(|s| s.safe_point);
        match lowest {
            Some(s) if s.safe_point < self.gc_safe_point => MinSafePoint {
                service_id: s.service_id.clone(),
                safe_point: s.safe_point,
                ttl_secs: remaining_secs(s.expires_at_ms, now_ms),
            },
            _ => MinSafePoint {
                service_id: ServiceId::new(GC_WORKER_SERVICE_ID),
                safe_point: self.gc_safe_point,
                ttl_secs: i64::MAX,
            },
        }
    }
}

/// The GC safe point and service safe points of one store.
pub struct SafePoints {
    store: Arc<Store>,
    clock: Arc<dyn Clock>,
    /// Serialises read-modify-write; held across the (fsyncing) write.
    write: Mutex<()>,
}

impl fmt::Debug for SafePoints {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SafePoints").finish_non_exhaustive()
    }
}

impl SafePoints {
    /// Safe points of `store`; service TTLs follow `clock`.
    pub fn new(store: Arc<Store>, clock: Arc<dyn Clock>) -> Self {
        SafePoints {
            store,
            clock,
            write: Mutex::new(()),
        }
    }

    /// Everything stored, from a fresh snapshot.
    pub fn state(&self) -> Result<SafePointState, SafePointError> {
        let snap = self.store.snapshot();
        let gc_safe_point = match snap.get(Cf::Meta, GC_SAFE_POINT_KEY)? {
            None => TimeStamp::ZERO,
            Some(raw) => TimeStamp::new(decode_u64(&raw, "GC safe point")?),
        };
        let upper = prefix_end(SERVICE_KEY_PREFIX);
        let mut services = Vec::new();
        for item in snap.iter(
            Cf::Meta,
            Bound::Included(SERVICE_KEY_PREFIX),
            Bound::Excluded(&upper),
            false,
        ) {
            let (key, value) = item?;
            let id = key.get(SERVICE_KEY_PREFIX.len()..).unwrap_or_default();
            services.push(decode_service(id, &value)?);
        }
        Ok(SafePointState {
            gc_safe_point,
            services,
        })
    }

    /// The GC safe point (zero until first raised).
    pub fn gc_safe_point(&self) -> Result<TimeStamp, SafePointError> {
        Ok(self.state()?.gc_safe_point)
    }

    /// The minimum of the GC safe point and every unexpired service safe
    /// point, with its holder.
    pub fn min_safe_point(&self) -> Result<MinSafePoint, SafePointError> {
        Ok(self.state()?.min(self.clock.now_ms()))
    }

    /// The bound below which GC may remove versions.
    pub fn effective_safe_point(&self) -> Result<TimeStamp, SafePointError> {
        Ok(self.min_safe_point()?.safe_point)
    }

    /// Raises the GC safe point to `new` if that is higher, and returns the
    /// stored value (`max(old, new)`; a lower `new` is not an error, as in PD).
    pub fn update_gc_safe_point(&self, new: TimeStamp) -> Result<TimeStamp, SafePointError> {
        let _write = self.write.lock();
        let old = self.state()?.gc_safe_point;
        if new <= old {
            return Ok(old);
        }
        let mut batch = WriteBatch::new();
        batch.put(Cf::Meta, GC_SAFE_POINT_KEY, new.into_inner().to_be_bytes());
        self.store.apply(batch, BatchSource::Internal)?;
        tracing::info!(old = %old, new = %new, "GC safe point raised");
        Ok(new)
    }

    /// PD's `UpdateServiceGCSafePoint`: `ttl_secs <= 0` removes the service;
    /// otherwise the service's safe point is set to `safe_point`, expiring
    /// `ttl_secs` from now, unless `safe_point` is below the current minimum
    /// (then nothing is stored and the caller learns the minimum). Expired
    /// entries are deleted in the same write.
    pub fn update_service(
        &self,
        service_id: &ServiceId,
        ttl_secs: i64,
        safe_point: TimeStamp,
    ) -> Result<ServiceUpdate, SafePointError> {
        let id = service_id.as_bytes();
        if id.is_empty() {
            return Err(SafePointError::EmptyServiceId);
        }
        if id.len() > MAX_SERVICE_ID_LEN {
            return Err(SafePointError::ServiceIdTooLong { len: id.len() });
        }
        let _write = self.write.lock();
        let now = self.clock.now_ms();
        let mut state = self.state()?;
        let mut batch = WriteBatch::new();
        state.services.retain(|s| {
            let expired = s.is_expired(now);
            if expired {
                batch.delete(Cf::Meta, service_key(s.service_id.as_bytes()));
            }
            !expired
        });

        let exists = state.services.iter().any(|s| s.service_id == *service_id);
        let updated = if ttl_secs <= 0 {
            if exists {
                batch.delete(Cf::Meta, service_key(id));
                state.services.retain(|s| s.service_id != *service_id);
            }
            false
        } else if safe_point < state.min(now).safe_point {
            false
        } else {
            if !exists && state.services.len() >= MAX_SERVICES {
                return Err(SafePointError::TooManyServices {
                    service_id: service_id.clone(),
                });
            }
            let entry = ServiceSafePoint {
                service_id: service_id.clone(),
                safe_point,
                expires_at_ms: expiry(now, ttl_secs),
            };
            batch.put(Cf::Meta, service_key(id), encode_service(&entry));
            state.services.retain(|s| s.service_id != *service_id);
            state.services.push(entry);
            true
        };
        self.store.apply(batch, BatchSource::Internal)?;
        Ok(ServiceUpdate {
            updated,
            min: state.min(now),
        })
    }
}

fn service_key(id: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(SERVICE_KEY_PREFIX.len() + id.len());
    key.extend_from_slice(SERVICE_KEY_PREFIX);
    key.extend_from_slice(id);
    key
}

/// The smallest key above every key starting with `prefix` (whose last byte
/// is not 0xFF, as for the constant prefixes here).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    if let Some(last) = end.last_mut() {
        *last = last.saturating_add(1);
    }
    end
}

/// `now + ttl` seconds in milliseconds, saturating at "never".
fn expiry(now_ms: u64, ttl_secs: i64) -> u64 {
    let ttl_ms = u64::try_from(ttl_secs).unwrap_or(0).saturating_mul(1_000);
    now_ms.saturating_add(ttl_ms)
}

/// Seconds left until `expires_at_ms`, rounded up.
fn remaining_secs(expires_at_ms: u64, now_ms: u64) -> i64 {
    if expires_at_ms == u64::MAX {
        return i64::MAX;
    }
    let secs = expires_at_ms.saturating_sub(now_ms).div_ceil(1_000);
    i64::try_from(secs).unwrap_or(i64::MAX)
}

fn encode_service(entry: &ServiceSafePoint) -> Vec<u8> {
    let mut value = Vec::with_capacity(16);
    value.extend_from_slice(&entry.safe_point.into_inner().to_be_bytes());
    value.extend_from_slice(&entry.expires_at_ms.to_be_bytes());
    value
}

fn decode_service(id: &[u8], value: &[u8]) -> Result<ServiceSafePoint, Error> {
    let corrupt = || {
        Error::corrupt(
            Cf::Meta.name(),
            format!(
                "service safe point {} has {} bytes, expected 16",
                ServiceId::new(id),
                value.len()
            ),
        )
    };
    let (sp, exp) = value.split_at_checked(8).ok_or_else(corrupt)?;
    let sp: [u8; 8] = sp.try_into().map_err(|_| corrupt())?;
    let exp: [u8; 8] = exp.try_into().map_err(|_| corrupt())?;
    Ok(ServiceSafePoint {
        service_id: ServiceId::new(id),
        safe_point: TimeStamp::new(u64::from_be_bytes(sp)),
        expires_at_ms: u64::from_be_bytes(exp),
    })
}

fn decode_u64(raw: &[u8], what: &str) -> Result<u64, Error> {
    let bytes: [u8; 8] = raw.try_into().map_err(|_| {
        Error::corrupt(
            Cf::Meta.name(),
            format!("{what} has {} bytes, expected 8", raw.len()),
        )
    })?;
    Ok(u64::from_be_bytes(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Engine;
    use crate::engine::memory::MemoryEngine;
    use crate::store::Durability;
    use crate::tso::ManualClock;

    const NOW: u64 = 1_700_000_000_000;

    struct Fixture {
        engine: Arc<MemoryEngine>,
        clock: Arc<ManualClock>,
        sp: SafePoints,
    }

    fn open(engine: Arc<MemoryEngine>, clock: Arc<ManualClock>) -> SafePoints {
        let store =
            Store::open(engine as Arc<dyn Engine>, Durability::SyncOnCommit).expect("open store");
        SafePoints::new(Arc::new(store), clock)
    }

    fn fixture() -> Fixture {
        let engine = Arc::new(MemoryEngine::new());
        let clock = Arc::new(ManualClock::new(NOW));
        let sp = open(Arc::clone(&engine), Arc::clone(&clock));
        Fixture { engine, clock, sp }
    }

    fn ts(v: u64) -> TimeStamp {
        TimeStamp::new(v)
    }

    fn id(s: &str) -> ServiceId {
        ServiceId::new(s)
    }

    #[test]
    fn gc_safe_point_only_rises() {
        let f = fixture();
        assert_eq!(f.sp.gc_safe_point().expect("read"), TimeStamp::ZERO);
        assert_eq!(f.sp.update_gc_safe_point(ts(100)).expect("raise"), ts(100));
        assert_eq!(f.sp.update_gc_safe_point(ts(50)).expect("lower"), ts(100));
        assert_eq!(f.sp.gc_safe_point().expect("read"), ts(100));
        assert_eq!(f.sp.update_gc_safe_point(ts(101)).expect("raise"), ts(101));
        assert_eq!(f.sp.effective_safe_point().expect("read"), ts(101));
    }

    #[test]
    fn services_hold_the_effective_safe_point_back_until_they_expire() {
        let f = fixture();
        f.sp.update_gc_safe_point(ts(100)).expect("raise");
        // Below the current minimum: refused, minimum reported.
        let refused = f.sp.update_service(&id("cdc"), 10, ts(90)).expect("update");
        assert!(!refused.updated);
        assert_eq!(refused.min.safe_point, ts(100));
        assert_eq!(refused.min.service_id, ServiceId::new(GC_WORKER_SERVICE_ID));

        let a = f.sp.update_service(&id("a"), 10, ts(120)).expect("a");
        assert!(a.updated);
        f.sp.update_gc_safe_point(ts(200)).expect("raise");
        assert_eq!(f.sp.effective_safe_point().expect("read"), ts(120));
        let b = f.sp.update_service(&id("b"), 30, ts(150)).expect("b");
        assert!(b.updated);
        assert_eq!(b.min.service_id, id("a"));
        assert_eq!(b.min.safe_point, ts(120));
        assert_eq!(b.min.ttl_secs, 10);

        // A service may not move below the minimum, even its own.
        let back = f.sp.update_service(&id("b"), 30, ts(110)).expect("b");
        assert!(!back.updated);

        f.clock.advance(9_500);
        assert_eq!(f.sp.min_safe_point().expect("read").ttl_secs, 1);
        f.clock.advance(500);
        // "a" expired exactly now; "b" remains.
        let min = f.sp.min_safe_point().expect("read");
        assert_eq!((min.service_id, min.safe_point), (id("b"), ts(150)));
        assert_eq!(min.ttl_secs, 20);
        f.clock.advance(20_000);
        assert_eq!(f.sp.effective_safe_point().expect("read"), ts(200));
    }

    #[test]
    fn zero_ttl_removes_and_writes_purge_expired_entries() {
        let f = fixture();
        f.sp.update_service(&id("a"), 5, ts(10)).expect("a");
        f.sp.update_service(&id("b"), 100, ts(20)).expect("b");
        f.sp.update_service(&id("c"), 100, ts(30)).expect("c");
        assert_eq!(f.sp.state().expect("state").services.len(), 3);

        let removed = f.sp.update_service(&id("b"), 0, ts(0)).expect("remove");
        assert!(!removed.updated);
        assert_eq!(removed.min.service_id, ServiceId::new(GC_WORKER_SERVICE_ID));
        f.clock.advance(5_000);
        // "a" is expired: ignored by reads, kept on disk until a write.
        assert_eq!(f.sp.state().expect("state").services.len(), 2);
        f.sp.update_service(&id("c"), -1, ts(0)).expect("remove");
        assert!(f.sp.state().expect("state").services.is_empty());
        // Removing an unknown service is not an error.
        f.sp.update_service(&id("zzz"), 0, ts(0)).expect("remove");
    }

    #[test]
    fn minimum_over_services_and_saturating_ttl() {
        let f = fixture();
        f.sp.update_gc_safe_point(ts(1_000)).expect("raise");
        f.sp.update_service(&id("x"), i64::MAX, ts(1_500))
            .expect("x");
        f.sp.update_service(&id("y"), 60, ts(1_200)).expect("y");
        let state = f.sp.state().expect("state");
        let x = state
            .services
            .iter()
            .find(|s| s.service_id == id("x"))
            .expect("x stored");
        assert_eq!(x.expires_at_ms, u64::MAX);
        // The GC safe point is lowest; services above it do not change that.
        assert_eq!(f.sp.effective_safe_point().expect("read"), ts(1_000));
        f.sp.update_gc_safe_point(ts(5_000)).expect("raise");
        let min = f.sp.min_safe_point().expect("read");
        assert_eq!((min.service_id, min.safe_point), (id("y"), ts(1_200)));
        f.clock.advance(60_000);
        let min = f.sp.min_safe_point().expect("read");
        assert_eq!((min.service_id, min.safe_point), (id("x"), ts(1_500)));
        assert_eq!(min.ttl_secs, i64::MAX);
    }

    #[test]
    fn bounds_on_ids_and_service_count() {
        let f = fixture();
        assert!(matches!(
            f.sp.update_service(&id(""), 10, ts(1)),
            Err(SafePointError::EmptyServiceId)
        ));
        let long = ServiceId::new(vec![b'x'; MAX_SERVICE_ID_LEN + 1]);
        assert!(matches!(
            f.sp.update_service(&long, 10, ts(1)),
            Err(SafePointError::ServiceIdTooLong { .. })
        ));
        for i in 0..MAX_SERVICES {
            f.sp.update_service(&id(&format!("s{i:04}")), 10, ts(1))
                .expect("within the bound");
        }
        let err =
            f.sp.update_service(&id("one-too-many"), 10, ts(1))
                .expect_err("over the bound");
        assert!(
            matches!(err, SafePointError::TooManyServices { .. }),
            "{err}"
        );
        assert!(err.to_string().contains("one-too-many"), "{err}");
        // An existing service may still update, and expiry frees room.
        f.sp.update_service(&id("s0000"), 10, ts(2))
            .expect("existing");
        f.clock.advance(10_000);
        f.sp.update_service(&id("one-too-many"), 10, ts(3))
            .expect("room after expiry");
        assert_eq!(f.sp.state().expect("state").services.len(), 1);
    }

    #[test]
    fn state_survives_reopening_the_store() {
        let f = fixture();
        f.sp.update_gc_safe_point(ts(77)).expect("raise");
        f.sp.update_service(&id("cdc"), 60, ts(80)).expect("cdc");
        let before = f.sp.state().expect("state");
        drop(f.sp);

        let reopened = open(Arc::clone(&f.engine), Arc::clone(&f.clock));
        assert_eq!(reopened.state().expect("state"), before);
        assert_eq!(reopened.gc_safe_point().expect("read"), ts(77));
        reopened.update_gc_safe_point(ts(100)).expect("raise");
        assert_eq!(reopened.effective_safe_point().expect("read"), ts(80));
    }

    #[test]
    fn corrupt_entries_are_reported() {
        let f = fixture();
        let mut batch = WriteBatch::new();
        batch.put(Cf::Meta, service_key(b"bad"), vec![1, 2, 3]);
        f.engine.write(&batch).expect("write");
        let err = f.sp.state().expect_err("corrupt");
        assert!(err.to_string().contains("bad"), "{err}");
        assert!(err.to_string().contains("3 bytes"), "{err}");
    }
}
