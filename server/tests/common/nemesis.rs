//! A nemesis: a background thread that splits and merges regions and moves
//! their leaders on a running server, through its admin endpoints, until it
//! is dropped. Seeded, so a failure can be replayed with the same seed.
//!
//! It never removes the default boundary (the encoding of eight `0xFF`
//! bytes): `tikv-client` 0.4's raw scans need ordinary keys kept out of the
//! last region (see the README). Split keys are encodings of user keys
//! (short ones, or ones the test names), valid boundaries for both key
//! modes.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use super::WAIT;

/// What the nemesis did, when it stops.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Done {
    pub splits: u32,
    pub merges: u32,
    pub transfers: u32,
    /// Changes the server refused (a split at an existing boundary).
    pub refused: u32,
}

/// Stops (and joins) the thread when dropped.
pub struct Nemesis {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Done>>,
}

impl Nemesis {
    /// Starts changing the layout of the server at `status_addr`, which
    /// serves `stores` stores, one change every few milliseconds.
    pub fn start(status_addr: &str, seed: u64, stores: u32) -> Nemesis {
        Nemesis::spawn(status_addr, seed, stores, Vec::new(), Vec::new())
    }

    /// Like [`Nemesis::start`], splitting only at keys under `prefix`.
    pub fn start_in(status_addr: &str, seed: u64, stores: u32, prefix: &[u8]) -> Nemesis {
        Nemesis::spawn(status_addr, seed, stores, prefix.to_vec(), Vec::new())
    }

    /// Like [`Nemesis::start`], but half of the splits are at one of the
    /// user keys `points` (encoded by the server), so that boundaries fall
    /// among the keys a test writes, not only around them.
    pub fn start_among(status_addr: &str, seed: u64, stores: u32, points: Vec<Vec<u8>>) -> Nemesis {
        Nemesis::spawn(status_addr, seed, stores, Vec::new(), points)
    }

    fn spawn(
        status_addr: &str,
        seed: u64,
        stores: u32,
        prefix: Vec<u8>,
        points: Vec<Vec<u8>>,
    ) -> Nemesis {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let addr = status_addr.to_owned();
        let thread = std::thread::spawn(move || run(&addr, seed, stores, &prefix, &points, &flag));
        Nemesis {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops the thread and says what it did.
    pub fn stop(mut self) -> Done {
        self.halt()
    }

    fn halt(&mut self) -> Done {
        self.stop.store(true, Ordering::Release);
        self.thread
            .take()
            .map(|t| t.join().expect("the nemesis thread panicked"))
            .unwrap_or_default()
    }
}

impl Drop for Nemesis {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.stop.store(true, Ordering::Release);
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }
}

/// The seed from `KVFEED_NEMESIS_SEED`, or `default`.
pub fn seed(default: u64) -> u64 {
    std::env::var("KVFEED_NEMESIS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn run(
    addr: &str,
    seed: u64,
    stores: u32,
    prefix: &[u8],
    points: &[Vec<u8>],
    stop: &AtomicBool,
) -> Done {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut done = Done::default();
    let default_boundary = hex(&kvfeed_storage::region::RegionMap::default_split_keys()[0]);
    while !stop.load(Ordering::Acquire) {
        let Ok((200, body)) = kvfeed_bench::scrape::http_get(addr, "/debug/regions", WAIT) else {
            // The server is restarting (a test may stop it): try again.
            std::thread::sleep(Duration::from_millis(20));
            continue;
        };
        let view: serde_json::Value = serde_json::from_str(&body).expect("JSON layout");
        let regions = view["regions"].as_array().cloned().unwrap_or_default();
        let pick = |rng: &mut StdRng| regions[rng.random_range(0..regions.len())].clone();
        let roll = rng.random_range(0..10);
        let (path, kind) = if stores > 1 && roll < 3 {
            let region = pick(&mut rng);
            let store = rng.random_range(1..=stores);
            (
                format!(
                    "/admin/transfer-leader?region={}&store={store}",
                    region["id"]
                ),
                2,
            )
        } else if roll < 7 || regions.len() < 4 {
            // The generator is only drawn from for `points` when there are
            // some, so a seed replays the same changes as before for the
            // tests that give none.
            let key: Vec<u8> =
                if !points.is_empty() && rng.random_bool(0.5) {
                    points[rng.random_range(0..points.len())].clone()
                } else {
                    // A short user key of lower-case letters and digits (under
                    // `prefix`): inside the ordinary key range tests write to.
                    let len = rng.random_range(1..=3);
                    prefix
                        .iter()
                        .copied()
                        .chain((0..len).map(|_| {
                            b"abcdefghijklmnopqrstuvwxyz0123456789"[rng.random_range(0..36)]
                        }))
                        .collect()
                };
            (format!("/admin/split?key={}", hex(&key)), 0)
        } else {
            // Merge a region into its right neighbour, unless that would
            // remove the default boundary (or it is the last region).
            let region = pick(&mut rng);
            let end = region["end_key"].as_str().unwrap_or_default();
            if end.is_empty() || end == default_boundary {
                continue;
            }
            (format!("/admin/merge?region={}", region["id"]), 1)
        };
        match kvfeed_bench::scrape::http_post(addr, &path, WAIT) {
            Ok((200, _)) => match kind {
                0 => done.splits += 1,
                1 => done.merges += 1,
                _ => done.transfers += 1,
            },
            Ok((400 | 404, _)) => done.refused += 1,
            Ok((code, body)) => panic!("{path}: HTTP {code}: {body}"),
            // The server is stopped for a restart.
            Err(_) => {}
        }
        std::thread::sleep(Duration::from_millis(rng.random_range(2..20)));
    }
    done
}
