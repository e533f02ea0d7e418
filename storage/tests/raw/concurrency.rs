//! Concurrency: the in-flight tracker, the resolved-ts bound it gives the
//! feed, and per-key apply order.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Barrier, Mutex};
use std::thread;

use kvfeed_storage::TimeStamp;
use kvfeed_storage::raw::decode_change;
use kvfeed_storage::store::{ChangeBatch, Observer};

use super::{Recorder, b, env};

/// Blocks the first raw client batch inside the observer until released.
struct Gate {
    entered: Mutex<Option<mpsc::Sender<TimeStamp>>>,
    release: Mutex<mpsc::Receiver<()>>,
}

impl Observer for Gate {
    fn on_apply(&self, batch: &Arc<ChangeBatch>) {
        let Some(change) = batch
            .mutations
            .iter()
            .find_map(|m| decode_change(m).ok().flatten())
        else {
            return;
        };
        let sender = self.entered.lock().ok().and_then(|mut s| s.take());
        if let Some(sender) = sender {
            let _ = sender.send(change.ts);
            if let Ok(release) = self.release.lock() {
                let _ = release.recv();
            }
        }
    }
}

#[test]
fn in_flight_tracker_covers_a_write_until_it_is_applied() {
    let env = env();
    assert_eq!(env.raw.min_in_flight_ts(), None);
    let (entered_tx, entered_rx) = mpsc::channel();
    let (release_tx, release_rx) = mpsc::channel();
    env.store.add_observer(Arc::new(Gate {
        entered: Mutex::new(Some(entered_tx)),
        release: Mutex::new(release_rx),
    }));
    let raw = Arc::clone(&env.raw);
    let writer = thread::spawn(move || raw.put(b"k", b"v", None));
    let ts = entered_rx.recv().expect("entered");
    assert_eq!(env.raw.min_in_flight_ts(), Some(ts));
    // The oracle has already moved past the write: a feed reading it now
    // must be held back by the tracker.
    assert!(env.tso.current() >= ts);
    release_tx.send(()).expect("release");
    assert_eq!(writer.join().expect("join").expect("put"), ts);
    assert_eq!(env.raw.min_in_flight_ts(), None);
}

#[test]
fn in_flight_tracker_is_cleared_on_failure() {
    let env = env();
    env.engine.fail_next_write();
    assert!(env.raw.put(b"k", b"v", None).is_err());
    assert_eq!(env.raw.min_in_flight_ts(), None);
}

#[test]
fn resolved_bound_never_passes_an_unobserved_write() {
    const WRITERS: usize = 4;
    const WRITES: usize = 200;
    let env = env();
    let observed = Arc::new(Recorder::default());
    env.store
        .add_observer(Arc::clone(&observed) as Arc<dyn Observer>);
    let done = Arc::new(AtomicBool::new(false));
    let barrier = Arc::new(Barrier::new(WRITERS + 1));

    let checker = {
        let (raw, tso, observed, done, barrier) = (
            Arc::clone(&env.raw),
            Arc::clone(&env.tso),
            Arc::clone(&observed),
            Arc::clone(&done),
            Arc::clone(&barrier),
        );
        thread::spawn(move || {
            barrier.wait();
            let mut checks = Vec::new();
            while !done.load(Ordering::SeqCst) {
                // The feed's order: oracle first, then the tracker.
                let candidate = tso.current();
                let resolved = match raw.min_in_flight_ts() {
                    Some(min) => candidate.min(min.prev()),
                    None => candidate,
                };
                let delivered = observed
                    .changes()
                    .iter()
                    .filter(|c| c.ts <= resolved)
                    .count();
                checks.push((resolved, delivered));
            }
            checks
        })
    };
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (raw, barrier) = (Arc::clone(&env.raw), Arc::clone(&barrier));
            thread::spawn(move || {
                barrier.wait();
                (0..WRITES)
                    .map(|i| {
                        let key = format!("k{}", (w + i) % 5);
                        raw.put(key.as_bytes(), b"v", None).expect("put")
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut all: Vec<TimeStamp> = writers
        .into_iter()
        .flat_map(|h| h.join().expect("writer"))
        .collect();
    done.store(true, Ordering::SeqCst);
    let checks = checker.join().expect("checker");
    all.sort_unstable();
    assert!(!checks.is_empty());
    for (resolved, delivered) in checks {
        let due = all.iter().filter(|ts| **ts <= resolved).count();
        assert_eq!(
            due, delivered,
            "resolved {resolved} passed an unobserved write"
        );
    }
}

#[test]
fn per_key_apply_order_is_timestamp_order() {
    const THREADS: usize = 4;
    const WRITES: usize = 300;
    let env = env();
    let observed = Arc::new(Recorder::default());
    env.store
        .add_observer(Arc::clone(&observed) as Arc<dyn Observer>);
    let barrier = Arc::new(Barrier::new(THREADS));
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let (raw, barrier) = (Arc::clone(&env.raw), Arc::clone(&barrier));
            thread::spawn(move || {
                barrier.wait();
                for i in 0..WRITES {
                    let key = [b'k', b'0' + u8::try_from(i % 3).expect("small")];
                    if (i + t) % 4 == 0 {
                        raw.batch_put(&[(key.to_vec(), b("b")), (b("shared"), b("s"))], &[])
                            .expect("batch");
                    } else {
                        raw.put(&key, b"v", None).expect("put");
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("thread");
    }
    let mut last: BTreeMap<Vec<u8>, TimeStamp> = BTreeMap::new();
    let changes = observed.changes();
    assert_eq!(changes.len(), THREADS * WRITES + THREADS * WRITES / 4);
    for change in changes {
        if let Some(prev) = last.insert(change.key.clone(), change.ts) {
            assert!(
                prev < change.ts,
                "{:?}: {prev} then {}",
                change.key,
                change.ts
            );
        }
    }
}
