//! The in-flight write tracker.
//!
//! [`InFlight`] records the timestamps of raw writes that have (or are
//! about to have) a timestamp but are not applied yet, so the change feed
//! can keep its resolved ts below them.

use std::collections::BTreeMap;

use parking_lot::Mutex;

use crate::TimeStamp;

/// A multiset of the timestamps of writes in flight.
#[derive(Default)]
pub(crate) struct InFlight {
    ts: Mutex<BTreeMap<TimeStamp, usize>>,
}

/// Keeps one timestamp registered in an [`InFlight`] until dropped, so that an
/// error or an unwind between registration and apply still unregisters it.
pub(crate) struct InFlightGuard<'a> {
    tracker: &'a InFlight,
    ts: TimeStamp,
}

impl InFlight {
    pub(crate) fn register(&self, ts: TimeStamp) -> InFlightGuard<'_> {
        *self.ts.lock().entry(ts).or_insert(0) += 1;
        InFlightGuard { tracker: self, ts }
    }

    pub(crate) fn min(&self) -> Option<TimeStamp> {
        self.ts.lock().keys().next().copied()
    }

    fn remove(map: &mut BTreeMap<TimeStamp, usize>, ts: TimeStamp) {
        if let Some(count) = map.get_mut(&ts) {
            *count -= 1;
            if *count == 0 {
                map.remove(&ts);
            }
        }
    }
}

impl InFlightGuard<'_> {
    /// Replaces the registered timestamp with `ts`, atomically for readers of
    /// [`InFlight::min`]. Used to swap a lower-bound placeholder for the real
    /// timestamp once it is allocated; `ts` must not be lower than what is
    /// registered, or a reader could have resolved past it.
    pub(crate) fn update(&mut self, ts: TimeStamp) {
        let mut map = self.tracker.ts.lock();
        InFlight::remove(&mut map, self.ts);
        *map.entry(ts).or_insert(0) += 1;
        self.ts = ts;
    }
}

impl Drop for InFlightGuard<'_> {
    fn drop(&mut self) {
        InFlight::remove(&mut self.tracker.ts.lock(), self.ts);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_flight_is_a_multiset() {
        let t = InFlight::default();
        assert_eq!(t.min(), None);
        let a = t.register(TimeStamp::new(5));
        let mut b = t.register(TimeStamp::new(5));
        let c = t.register(TimeStamp::new(9));
        assert_eq!(t.min(), Some(TimeStamp::new(5)));
        drop(a);
        assert_eq!(t.min(), Some(TimeStamp::new(5)));
        b.update(TimeStamp::new(7));
        assert_eq!(t.min(), Some(TimeStamp::new(7)));
        drop(b);
        assert_eq!(t.min(), Some(TimeStamp::new(9)));
        drop(c);
        assert_eq!(t.min(), None);
    }
}
