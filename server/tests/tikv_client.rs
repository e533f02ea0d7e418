//! Proves that the official `tikv-client` crate (0.4), unmodified, runs raw
//! and transactional workloads against a real `kvfeed serve`: raw CRUD,
//! batches, scans across both regions and in reverse, range deletes and
//! compare-and-swap; optimistic commits, write conflicts and rollbacks;
//! pessimistic transactions; lock resolution of a crashed writer (rolled
//! back after its TTL) and of an unfinished commit (rolled forward); GC
//! through the client's `gc()`; an exact counter under concurrent
//! read-modify-write; and a restart on the same port that the same client
//! objects ride through.
//!
//! Every test starts its own server and is bounded by a timeout, so a hang
//! fails it instead of stalling the suite.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test fails by panicking

#[path = "tikv_client/by_hand.rs"]
mod by_hand;
mod common;

use std::future::Future;
use std::time::{Duration, Instant};

use by_hand::ByHand;
use common::TestServer;
use common::nemesis::{self, Nemesis};
use tikv_client::{
    Error, Key, KvPair, ProtoKeyError, RawClient, TimestampExt, TransactionClient,
    TransactionOptions,
};

/// Upper bound for one test's client work.
const TEST_TIMEOUT: Duration = Duration::from_secs(60);

/// tikv-client 0.4 reconnects to PD at most this often.
const CLIENT_RECONNECT_INTERVAL: Duration = Duration::from_secs(1);

/// The server a test runs against: a plain one, or, with `KVFEED_NEMESIS`
/// set, three stores and a nemesis that splits, merges and moves leaders
/// for as long as the test runs (CI runs this suite both ways). Bind the
/// nemesis after the server so it stops first.
fn start() -> (TestServer, Option<Nemesis>) {
    start_as(TestServer::start_with)
}

/// [`start`] for a test that restarts the server on the same ports.
fn start_restartable() -> (TestServer, Option<Nemesis>) {
    start_as(TestServer::start_restartable)
}

fn start_as(start: fn(&[&str]) -> TestServer) -> (TestServer, Option<Nemesis>) {
    if std::env::var_os("KVFEED_NEMESIS").is_none() {
        return (start(&[]), None);
    }
    let server = start(&["--stores", "3"]);
    let nemesis = Nemesis::start(server.status_addr(), nemesis::seed(3), 3);
    (server, Some(nemesis))
}

/// Runs `body` with the [`TEST_TIMEOUT`] bound.
async fn bounded<T>(body: impl Future<Output = T>) -> T {
    bounded_by(TEST_TIMEOUT, body).await
}

async fn bounded_by<T>(limit: Duration, body: impl Future<Output = T>) -> T {
    tokio::time::timeout(limit, body)
        .await
        .unwrap_or_else(|_| panic!("the test did not finish within {limit:?}"))
}

fn key(text: &str) -> Vec<u8> {
    text.as_bytes().to_vec()
}

/// A raw key in the second region: raw keys are compared with the region
/// boundaries as they are, and the boundary is the encoding of eight `0xFF`
/// bytes, which every key starting with ten `0xFF` bytes sorts above.
fn raw_high(suffix: &str) -> Vec<u8> {
    let mut key = vec![0xFF; 10];
    key.extend_from_slice(suffix.as_bytes());
    key
}

/// A raw upper bound above every [`raw_high`] key.
fn raw_top() -> Vec<u8> {
    vec![0xFF; 11]
}

/// A transactional key in the second region: transactional keys are
/// encoded before the region lookup, and any key that starts with eight
/// `0xFF` bytes and goes on encodes above the boundary.
fn txn_high(suffix: &str) -> Vec<u8> {
    let mut key = vec![0xFF; 8];
    key.extend_from_slice(suffix.as_bytes());
    key
}

async fn txn_client(server: &TestServer) -> TransactionClient {
    TransactionClient::new(vec![server.pd_endpoint()])
        .await
        .expect("TransactionClient connects to kvfeed's PD endpoint")
}

async fn raw_client(server: &TestServer) -> RawClient {
    RawClient::new(vec![server.pd_endpoint()])
        .await
        .expect("RawClient connects to kvfeed's PD endpoint")
}

/// Reads `key` in a fresh snapshot at the current timestamp, resolving any
/// lock in the way.
async fn read(client: &TransactionClient, key: &[u8]) -> Option<Vec<u8>> {
    let ts = client
        .current_timestamp()
        .await
        .expect("a timestamp for the reader");
    let mut snapshot = client.snapshot(ts, TransactionOptions::new_optimistic());
    snapshot
        .get(key.to_vec())
        .await
        .unwrap_or_else(|e| panic!("snapshot get of {key:?} failed: {e:?}"))
}

/// Commits `pairs` in one optimistic transaction; returns the commit ts.
async fn write<K: AsRef<[u8]>>(client: &TransactionClient, pairs: &[(K, &str)]) -> u64 {
    let mut txn = client
        .begin_optimistic()
        .await
        .expect("begin an optimistic transaction");
    for (k, v) in pairs {
        txn.put(k.as_ref().to_vec(), key(v))
            .await
            .expect("buffer a put");
    }
    txn.commit()
        .await
        .unwrap_or_else(|e| panic!("commit failed: {e:?}"))
        .expect("a transaction with writes has a commit ts")
        .version()
}

/// Whether the client reported a per-key error for which `matches` holds,
/// however deep it wrapped it.
fn has_key_error(error: &Error, matches: &dyn Fn(&ProtoKeyError) -> bool) -> bool {
    match error {
        Error::KeyError(key_error) => matches(key_error),
        Error::ExtractedErrors(errors) | Error::MultipleKeyErrors(errors) => {
            errors.iter().any(|e| has_key_error(e, matches))
        }
        Error::UndeterminedError(inner) | Error::PessimisticLockError { inner, .. } => {
            has_key_error(inner, matches)
        }
        _ => false,
    }
}

/// Whether the client gave up on a lock it found (no lock resolution
/// allowed, or the owner stayed alive through every backoff).
fn is_lock_error(error: &Error) -> bool {
    match error {
        Error::ResolveLockError(_) => true,
        Error::ExtractedErrors(errors) | Error::MultipleKeyErrors(errors) => {
            errors.iter().any(is_lock_error)
        }
        Error::UndeterminedError(inner) | Error::PessimisticLockError { inner, .. } => {
            is_lock_error(inner)
        }
        _ => has_key_error(error, &|e| e.locked.is_some()),
    }
}

/// Errors a read-modify-write loop retries: another transaction won
/// (write conflict) or still holds the key (lock).
fn is_contention(error: &Error) -> bool {
    is_lock_error(error)
        || has_key_error(error, &|e| e.conflict.is_some() || !e.retryable.is_empty())
}

/// Sorted `(key, value)` pairs, for comparing results given in any order.
fn pairs(kvs: Vec<KvPair>) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut out: Vec<_> = kvs
        .into_iter()
        .map(|pair| {
            let (k, v): (Key, Vec<u8>) = pair.into();
            (Vec::from(k), v)
        })
        .collect();
    out.sort();
    out
}

/// The keys of `kvs`, in the order the client returned them.
fn keys_of(kvs: Vec<KvPair>) -> Vec<Vec<u8>> {
    kvs.into_iter()
        .map(|pair| Vec::from(pair.into_key()))
        .collect()
}

/// Sorted `(key, value)` pairs from keys and text values.
fn expected(items: &[(&Vec<u8>, &str)]) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut out: Vec<_> = items.iter().map(|(k, v)| (k.to_vec(), key(v))).collect();
    out.sort();
    out
}

// ---------------------------------------------------------------------------
// Raw API.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_put_get_delete_and_batches_in_both_regions() {
    let (server, _nemesis) = start();
    bounded(async {
        let raw = raw_client(&server).await;
        let (low, high) = (key("k1"), raw_high("k1"));

        assert_eq!(raw.get(low.clone()).await.expect("get"), None);
        raw.put(low.clone(), key("v1")).await.expect("put");
        raw.put(high.clone(), key("hv1")).await.expect("put high");
        assert_eq!(raw.get(low.clone()).await.expect("get"), Some(key("v1")));
        assert_eq!(raw.get(high.clone()).await.expect("get"), Some(key("hv1")));
        raw.put(low.clone(), key("v2")).await.expect("overwrite");
        assert_eq!(raw.get(low.clone()).await.expect("get"), Some(key("v2")));
        raw.delete(low.clone()).await.expect("delete");
        assert_eq!(raw.get(low.clone()).await.expect("get"), None);
        assert_eq!(raw.get(high.clone()).await.expect("get"), Some(key("hv1")));
        raw.delete(high.clone()).await.expect("delete high");
        assert_eq!(raw.get(high.clone()).await.expect("get"), None);

        let (a, b, c) = (key("a"), key("b"), key("c"));
        let (x, y) = (raw_high("x"), raw_high("y"));
        raw.batch_put(vec![
            (a.clone(), key("va")),
            (b.clone(), key("vb")),
            (c.clone(), key("vc")),
            (x.clone(), key("vx")),
            (y.clone(), key("vy")),
        ])
        .await
        .expect("batch_put across both regions");
        let all = [a.clone(), b.clone(), c.clone(), x.clone(), y.clone()];
        let got = raw
            .batch_get(vec![a.clone(), key("missing"), c.clone(), y.clone()])
            .await
            .expect("batch_get");
        assert_eq!(
            pairs(got),
            expected(&[(&a, "va"), (&c, "vc"), (&y, "vy")]),
            "batch_get returns present keys only"
        );

        raw.batch_delete(vec![b.clone(), x.clone()])
            .await
            .expect("batch_delete across both regions");
        let got = raw.batch_get(all.to_vec()).await.expect("batch_get");
        assert_eq!(pairs(got), expected(&[(&a, "va"), (&c, "vc"), (&y, "vy")]));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_scans_with_limits_cross_regions_and_run_in_reverse() {
    let (server, _nemesis) = start();
    bounded(async {
        let raw = raw_client(&server).await;
        let low: Vec<Vec<u8>> = (0..5).map(|i| key(&format!("s{i}"))).collect();
        let high: Vec<Vec<u8>> = (0..5).map(|i| raw_high(&format!("{i}"))).collect();
        let mut puts: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        for k in low.iter().chain(&high) {
            let mut value = k.clone();
            value.extend_from_slice(b"-value");
            puts.push((k.clone(), value));
        }
        raw.batch_put(puts.clone()).await.expect("batch_put");

        // Inside the first region: the limit cuts, a large limit returns all.
        let got = raw.scan(key("s0")..key("s9"), 3).await.expect("scan");
        assert_eq!(keys_of(got), low[..3].to_vec());
        let got = raw.scan(key("s0")..key("s9"), 100).await.expect("scan");
        assert_eq!(pairs(got), puts[..5].to_vec(), "values come back too");

        // Across the boundary: the scan continues in the second region, in
        // key order, and stops at the limit there. (tikv-client 0.4 restarts
        // from the lowest key once it leaves the last, unbounded region, so
        // limits are chosen that the keys in range can fill.)
        let got = raw.scan(key("s2")..raw_top(), 5).await.expect("scan");
        let want: Vec<_> = low[2..].iter().chain(&high[..2]).cloned().collect();
        assert_eq!(keys_of(got), want);
        let got = raw.scan(key("s2")..raw_top(), 8).await.expect("scan");
        let want: Vec<_> = low[2..].iter().chain(&high).cloned().collect();
        assert_eq!(keys_of(got), want);
        let got = raw
            .scan_keys(high[1].clone()..raw_top(), 2)
            .await
            .expect("scan_keys");
        let got: Vec<Vec<u8>> = got.into_iter().map(Vec::from).collect();
        assert_eq!(
            got,
            high[1..3].to_vec(),
            "key-only scan in the second region"
        );

        // Reverse: descending from the (exclusive) upper bound.
        let got = raw
            .scan_reverse(key("s0")..key("s9"), 2)
            .await
            .expect("scan_reverse");
        assert_eq!(keys_of(got), vec![low[4].clone(), low[3].clone()]);
        let got = raw
            .scan_reverse(key("s1")..key("s4"), 10)
            .await
            .expect("scan_reverse");
        assert_eq!(
            keys_of(got),
            vec![low[3].clone(), low[2].clone(), low[1].clone()],
            "the upper bound is exclusive, the lower inclusive"
        );
        let got = raw
            .scan_reverse(high[0].clone()..raw_top(), 2)
            .await
            .expect("scan_reverse in the second region");
        assert_eq!(keys_of(got), vec![high[4].clone(), high[3].clone()]);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_delete_range_spans_both_regions() {
    let (server, _nemesis) = start();
    bounded(async {
        let raw = raw_client(&server).await;
        let low: Vec<Vec<u8>> = (0..5).map(|i| key(&format!("d{i}"))).collect();
        let high: Vec<Vec<u8>> = (0..5).map(|i| raw_high(&format!("{i}"))).collect();
        let all: Vec<Vec<u8>> = low.iter().chain(&high).cloned().collect();
        raw.batch_put(all.iter().map(|k| (k.clone(), key("v"))))
            .await
            .expect("batch_put");

        raw.delete_range(low[1].clone()..high[3].clone())
            .await
            .expect("delete_range across the boundary");
        let left =
            |kvs: Vec<KvPair>| -> Vec<Vec<u8>> { pairs(kvs).into_iter().map(|(k, _)| k).collect() };
        let got = raw.batch_get(all.clone()).await.expect("batch_get");
        assert_eq!(
            left(got),
            vec![low[0].clone(), high[3].clone(), high[4].clone()],
            "the range's start is deleted, its end is kept"
        );

        raw.delete_range(high[3].clone()..raw_top())
            .await
            .expect("delete_range in the second region");
        let got = raw.batch_get(all.clone()).await.expect("batch_get");
        assert_eq!(left(got), vec![low[0].clone()]);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_compare_and_swap_in_atomic_mode() {
    let (server, _nemesis) = start();
    bounded(async {
        let raw = raw_client(&server).await.with_atomic_for_cas();
        for k in [key("cas"), raw_high("cas")] {
            let swap = |expect: Option<&str>, new: &str| {
                raw.compare_and_swap(k.clone(), expect.map(key), key(new))
            };
            assert_eq!(
                swap(None, "one").await.expect("cas on an absent key"),
                (None, true),
                "absent as expected: swapped"
            );
            assert_eq!(raw.get(k.clone()).await.expect("get"), Some(key("one")));
            assert_eq!(
                swap(Some("wrong"), "two").await.expect("cas"),
                (Some(key("one")), false),
                "a mismatch reports the current value and writes nothing"
            );
            assert_eq!(
                swap(None, "two").await.expect("cas"),
                (Some(key("one")), false),
                "expecting absence fails on a present key"
            );
            assert_eq!(raw.get(k.clone()).await.expect("get"), Some(key("one")));
            assert_eq!(
                swap(Some("one"), "two").await.expect("cas"),
                (Some(key("one")), true),
                "a match swaps and reports the previous value"
            );
            assert_eq!(raw.get(k.clone()).await.expect("get"), Some(key("two")));
        }
    })
    .await;
}

// ---------------------------------------------------------------------------
// Transactions.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn optimistic_transaction_commits_across_both_regions() {
    let (server, _nemesis) = start();
    bounded(async {
        let client = txn_client(&server).await;
        let mut by_hand = ByHand::connect(server.channel().await).await;
        let (t1, t2, high) = (key("t1"), key("t2"), txn_high("t3"));
        assert_ne!(
            by_hand.context(&t1).await.region_id,
            by_hand.context(&high).await.region_id,
            "the keys lie in different regions"
        );

        let mut txn = client.begin_optimistic().await.expect("begin");
        let start_ts = txn.start_timestamp().version();
        txn.put(t1.clone(), key("one")).await.expect("put");
        txn.put(high.clone(), key("three")).await.expect("put");
        txn.put(t2.clone(), key("two")).await.expect("put");
        assert_eq!(
            txn.get(t1.clone()).await.expect("get"),
            Some(key("one")),
            "a transaction reads its own writes"
        );
        let commit_ts = txn
            .commit()
            .await
            .expect("commit")
            .expect("a commit ts")
            .version();
        assert!(
            commit_ts > start_ts,
            "commit ts {commit_ts} > start ts {start_ts}"
        );

        assert_eq!(read(&client, &t1).await, Some(key("one")));
        assert_eq!(read(&client, &t2).await, Some(key("two")));
        assert_eq!(read(&client, &high).await, Some(key("three")));

        // A snapshot before the commit sees nothing; scans cross regions.
        let mut before = client.snapshot(
            tikv_client::Timestamp::from_version(start_ts),
            TransactionOptions::new_optimistic(),
        );
        assert_eq!(before.get(t1.clone()).await.expect("get"), None);
        let now = client.current_timestamp().await.expect("timestamp");
        let mut snapshot = client.snapshot(now, TransactionOptions::new_optimistic());
        let got = snapshot
            .scan(key("t")..vec![0xFF; 9], 10)
            .await
            .expect("transactional scan");
        assert_eq!(
            keys_of(got.collect()),
            vec![t1.clone(), t2.clone(), high.clone()]
        );
        let got = snapshot
            .scan_reverse(key("t")..vec![0xFF; 9], 2)
            .await
            .expect("transactional reverse scan");
        assert_eq!(keys_of(got.collect()), vec![high.clone(), t2.clone()]);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn optimistic_write_conflict_fails_the_second_commit() {
    let (server, _nemesis) = start();
    bounded(async {
        let client = txn_client(&server).await;
        let k = key("contended");
        let mut first = client.begin_optimistic().await.expect("begin");
        let mut second = client.begin_optimistic().await.expect("begin");
        first.put(k.clone(), key("first")).await.expect("put");
        second.put(k.clone(), key("second")).await.expect("put");
        first.commit().await.expect("the first commit wins");

        let err = second
            .commit()
            .await
            .expect_err("the second commit must fail: its key changed after it started");
        assert!(
            has_key_error(&err, &|e| e.conflict.as_ref().is_some_and(|c| c.key == k)),
            "expected a write conflict on {k:?}, got {err:?}"
        );
        second.rollback().await.expect("roll back the loser");
        assert_eq!(read(&client, &k).await, Some(key("first")));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn optimistic_rollback_discards_writes() {
    let (server, _nemesis) = start();
    bounded(async {
        let client = txn_client(&server).await;
        let (kept, fresh) = (key("kept"), txn_high("fresh"));
        write(&client, &[(&kept, "original")]).await;

        let mut txn = client.begin_optimistic().await.expect("begin");
        txn.put(kept.clone(), key("overwritten"))
            .await
            .expect("put");
        txn.put(fresh.clone(), key("new")).await.expect("put");
        txn.rollback().await.expect("rollback");
        assert!(
            matches!(txn.commit().await, Err(Error::OperationAfterCommitError)),
            "a rolled back transaction cannot commit"
        );

        assert_eq!(read(&client, &kept).await, Some(key("original")));
        assert_eq!(read(&client, &fresh).await, None);
        // The key is still writable by others.
        write(&client, &[(&kept, "later")]).await;
        assert_eq!(read(&client, &kept).await, Some(key("later")));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pessimistic_transaction_locks_writes_deletes_and_commits() {
    let (server, _nemesis) = start();
    bounded(async {
        let client = txn_client(&server).await;
        let (counter, doomed, added) = (key("p-counter"), key("p-doomed"), key("p-added"));
        write(&client, &[(&counter, "1"), (&doomed, "here")]).await;

        let mut txn = client.begin_pessimistic().await.expect("begin_pessimistic");
        assert_eq!(
            txn.get_for_update(counter.clone())
                .await
                .expect("get_for_update"),
            Some(key("1"))
        );

        // The lock is real: a writer that may not wait for locks fails on it.
        let mut intruder = client
            .begin_with_options(TransactionOptions::new_optimistic().no_resolve_locks())
            .await
            .expect("begin");
        intruder
            .put(counter.clone(), key("intruder"))
            .await
            .expect("put");
        let err = intruder
            .commit()
            .await
            .expect_err("the pessimistic lock must stop another writer");
        assert!(is_lock_error(&err), "expected a lock error, got {err:?}");
        intruder.rollback().await.expect("roll back the intruder");

        txn.put(counter.clone(), key("2")).await.expect("put");
        txn.delete(doomed.clone()).await.expect("delete");
        txn.put(added.clone(), key("new")).await.expect("put");
        txn.commit()
            .await
            .expect("pessimistic commit")
            .expect("a commit ts");

        assert_eq!(read(&client, &counter).await, Some(key("2")));
        assert_eq!(read(&client, &doomed).await, None);
        assert_eq!(read(&client, &added).await, Some(key("new")));
    })
    .await;
}

/// tikv-client 0.4 sends a pessimistic prewrite's whole `pessimistic_actions`
/// list (one `DoPessimisticCheck` per mutation of the transaction) with every
/// region's share of the mutations; TiKV pairs actions with mutations by
/// position and ignores the surplus, so the server must accept it too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pessimistic_transaction_commits_across_both_regions() {
    let (server, _nemesis) = start();
    bounded(async {
        let client = txn_client(&server).await;
        let (low, doomed, high) = (key("pr-low"), key("pr-doomed"), txn_high("pr-high"));
        write(&client, &[(&low, "1"), (&doomed, "here")]).await;

        let mut txn = client.begin_pessimistic().await.expect("begin_pessimistic");
        assert_eq!(
            txn.get_for_update(low.clone())
                .await
                .expect("get_for_update"),
            Some(key("1"))
        );
        assert_eq!(
            txn.get_for_update(high.clone())
                .await
                .expect("get_for_update"),
            None
        );
        txn.put(low.clone(), key("2")).await.expect("put");
        txn.delete(doomed.clone()).await.expect("delete");
        txn.put(high.clone(), key("new")).await.expect("put");
        txn.commit()
            .await
            .expect("pessimistic commit across regions")
            .expect("a commit ts");

        assert_eq!(read(&client, &low).await, Some(key("2")));
        assert_eq!(read(&client, &doomed).await, None);
        assert_eq!(read(&client, &high).await, Some(key("new")));
    })
    .await;
}

// ---------------------------------------------------------------------------
// Lock resolution, with the lock left behind by hand.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orphaned_prewrite_is_rolled_back_after_its_ttl() {
    /// Short, so the reader's own lock backoff outlasts it.
    const LOCK_TTL_MS: u64 = 100;
    let (server, _nemesis) = start();
    bounded(async {
        let client = txn_client(&server).await;
        let mut crashed = ByHand::connect(server.channel().await).await;
        let (primary, secondary) = (key("orphan-primary"), key("orphan-secondary"));
        write(&client, &[(&primary, "old")]).await;

        // A writer prewrites both keys, then dies before committing.
        let start_ts = crashed.timestamp().await;
        crashed
            .prewrite(&primary, b"new", &primary, start_ts, LOCK_TTL_MS)
            .await;
        crashed
            .prewrite(&secondary, b"new", &primary, start_ts, LOCK_TTL_MS)
            .await;

        // The locks are there: a reader that may not resolve them trips on
        // the secondary's lock, naming the dead transaction.
        let now = client.current_timestamp().await.expect("timestamp");
        let mut blocked =
            client.snapshot(now, TransactionOptions::new_optimistic().no_resolve_locks());
        match blocked.get(secondary.clone()).await {
            Err(Error::ResolveLockError(locks)) => assert!(
                locks
                    .iter()
                    .any(|l| l.lock_version == start_ts && l.primary_lock == primary),
                "the lock names the orphan: {locks:?}"
            ),
            other => panic!("expected the orphan's lock, got {other:?}"),
        }

        // An ordinary reader waits out the TTL (its lock backoff is longer)
        // and rolls the orphan back: the old value, and nothing new.
        let started = Instant::now();
        assert_eq!(read(&client, &secondary).await, None);
        assert_eq!(read(&client, &primary).await, Some(key("old")));
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "resolution took {:?}",
            started.elapsed()
        );

        // Rolled back for good: the crashed writer cannot commit late.
        let commit_ts = crashed.timestamp().await;
        let late = crashed
            .commit(&[primary.as_slice()], start_ts, commit_ts)
            .await;
        assert!(
            late.error.is_some(),
            "a commit after the rollback must fail: {late:?}"
        );
        assert_eq!(read(&client, &primary).await, Some(key("old")));
        assert_eq!(read(&client, &secondary).await, None);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secondary_lock_of_a_committed_transaction_is_rolled_forward() {
    /// Long, so only the primary's commit can explain what the reader sees.
    const LOCK_TTL_MS: u64 = 20_000;
    let (server, _nemesis) = start();
    bounded(async {
        let client = txn_client(&server).await;
        let mut writer = ByHand::connect(server.channel().await).await;
        let (primary, secondary) = (key("rf-primary"), txn_high("rf-secondary"));

        let start_ts = writer.timestamp().await;
        writer
            .prewrite(&primary, b"p-value", &primary, start_ts, LOCK_TTL_MS)
            .await;
        writer
            .prewrite(&secondary, b"s-value", &primary, start_ts, LOCK_TTL_MS)
            .await;
        let commit_ts = writer.timestamp().await;
        let committed = writer
            .commit(&[primary.as_slice()], start_ts, commit_ts)
            .await;
        assert!(committed.error.is_none(), "primary commit: {committed:?}");
        // The secondary is never committed by its writer.

        assert_eq!(read(&client, &secondary).await, Some(key("s-value")));
        assert_eq!(read(&client, &primary).await, Some(key("p-value")));

        // The roll-forward removed the lock and wrote the value at exactly
        // the primary's commit ts: visible there, absent just below.
        let at_commit = writer.get(&secondary, commit_ts).await;
        assert!(at_commit.error.is_none(), "{at_commit:?}");
        assert_eq!(at_commit.value, b"s-value");
        let before_commit = writer.get(&secondary, commit_ts - 1).await;
        assert!(
            before_commit.error.is_none() && before_commit.not_found,
            "below its commit ts the secondary is absent and unlocked: {before_commit:?}"
        );
    })
    .await;
}

// ---------------------------------------------------------------------------
// GC.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_drops_versions_below_the_safe_point_and_keeps_the_newest() {
    /// How long the server may take to apply the safe point.
    const GC_DEADLINE: Duration = Duration::from_secs(20);
    let (server, _nemesis) = start();
    bounded(async {
        let client = txn_client(&server).await;
        let mut by_hand = ByHand::connect(server.channel().await).await;
        let (versioned, deleted) = (key("gc-versioned"), txn_high("gc-deleted"));

        let first = write(&client, &[(&versioned, "v1"), (&deleted, "x")]).await;
        let second = write(&client, &[(&versioned, "v2")]).await;
        let mut txn = client.begin_optimistic().await.expect("begin");
        txn.delete(deleted.clone()).await.expect("delete");
        txn.commit().await.expect("commit the delete");

        // Before GC, history is readable at the old version.
        let old = by_hand.get(&versioned, first).await;
        assert_eq!((old.value.as_slice(), old.not_found), (&b"v1"[..], false));
        let old = by_hand.get(&deleted, first).await;
        assert_eq!((old.value.as_slice(), old.not_found), (&b"x"[..], false));

        let safe_point = client.current_timestamp().await.expect("timestamp");
        let accepted = client.gc(safe_point.clone()).await.expect("gc");
        assert!(accepted, "PD accepts the new safe point");
        assert_eq!(by_hand.gc_safe_point().await, safe_point.version());

        // The old versions go (GC may run in the background: poll).
        let deadline = Instant::now() + GC_DEADLINE;
        loop {
            let versioned_old = by_hand.get(&versioned, first).await;
            let deleted_old = by_hand.get(&deleted, first).await;
            let gone = |r: &kvfeed_proto::kvrpcpb::GetResponse| {
                r.error.is_none() && r.not_found && r.value.is_empty()
            };
            if gone(&versioned_old) && gone(&deleted_old) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "old versions still readable {GC_DEADLINE:?} after gc(): \
                 {versioned_old:?} / {deleted_old:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        // The newest version below the safe point stays.
        let newest = by_hand.get(&versioned, second).await;
        assert_eq!(newest.value, b"v2");
        assert_eq!(read(&client, &versioned).await, Some(key("v2")));
        assert_eq!(read(&client, &deleted).await, None);
    })
    .await;
}

// ---------------------------------------------------------------------------
// Concurrency.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_increments_of_one_counter_are_exact() {
    const TASKS: u64 = 8;
    const INCREMENTS: u64 = 50;
    /// Attempts per increment before a task gives up (a livelock guard).
    const MAX_ATTEMPTS: u32 = 1_000;
    let (server, _nemesis) = start();
    bounded_by(Duration::from_secs(180), async {
        let client = txn_client(&server).await;
        let counter = key("counter");
        write(&client, &[(&counter, "0")]).await;

        let mut tasks = Vec::new();
        for task in 0..TASKS {
            let client = client.clone();
            let counter = counter.clone();
            tasks.push(tokio::spawn(async move {
                let mut retries = 0u64;
                for _ in 0..INCREMENTS {
                    let mut attempts = 0;
                    loop {
                        attempts += 1;
                        assert!(attempts <= MAX_ATTEMPTS, "task {task} starved");
                        match increment(&client, &counter).await {
                            Ok(()) => break,
                            Err(e) if is_contention(&e) => retries += 1,
                            Err(e) => panic!("task {task}: increment failed: {e:?}"),
                        }
                    }
                }
                retries
            }));
        }
        let mut retries = 0;
        for task in tasks {
            retries += task.await.expect("an increment task panicked");
        }

        let total = read(&client, &counter).await.expect("the counter exists");
        let total: u64 = String::from_utf8(total)
            .expect("the counter is text")
            .parse()
            .expect("the counter is a number");
        assert_eq!(
            total,
            TASKS * INCREMENTS,
            "every increment counted exactly once ({retries} retries)"
        );
    })
    .await;
}

/// One optimistic read-modify-write of a decimal counter. On failure the
/// transaction is rolled back and the error returned.
async fn increment(client: &TransactionClient, counter: &[u8]) -> Result<(), Error> {
    let mut txn = client.begin_optimistic().await?;
    let attempt = async {
        let value = txn
            .get(counter.to_vec())
            .await?
            .expect("the counter was written before the tasks started");
        let value: u64 = String::from_utf8(value)
            .expect("the counter is text")
            .parse()
            .expect("the counter is a number");
        txn.put(counter.to_vec(), (value + 1).to_string().into_bytes())
            .await?;
        txn.commit().await.map(|_| ())
    }
    .await;
    if attempt.is_err() {
        txn.rollback().await.expect("a failed increment rolls back");
    }
    attempt
}

// ---------------------------------------------------------------------------
// Restart.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_ride_through_a_restart_on_the_same_port() {
    let (mut server, _nemesis) = start_restartable();
    bounded(async {
        let client = txn_client(&server).await;
        let raw = raw_client(&server).await;
        let connected_at = Instant::now();
        let (txn_key, high_key, raw_key) = (key("r-txn"), txn_high("r-txn"), key("r-raw"));

        write(&client, &[(&txn_key, "before"), (&high_key, "high")]).await;
        raw.put(raw_key.clone(), key("raw-before"))
            .await
            .expect("raw put");
        let mut txn = client.begin_pessimistic().await.expect("begin");
        txn.get_for_update(txn_key.clone())
            .await
            .expect("get_for_update");
        txn.put(txn_key.clone(), key("pessimistic"))
            .await
            .expect("put");
        txn.commit().await.expect("pessimistic commit");
        let last_before = client
            .current_timestamp()
            .await
            .expect("timestamp")
            .version();

        tokio::task::block_in_place(|| server.restart_same_port());
        // The restart killed the clients' timestamp stream. tikv-client 0.4
        // replaces it by reconnecting to PD, but at most once per
        // `RECONNECT_INTERVAL_SEC` (1 s) after its last connection: a call
        // failing inside that window is returned without reconnecting. A
        // client connected for longer never sees that, so the window is let
        // pass; the first call after it must then succeed.
        let window = CLIENT_RECONNECT_INTERVAL + Duration::from_millis(100);
        tokio::time::sleep_until((connected_at + window).into()).await;

        // The same client objects reconnect on their own.
        let mut txn = client
            .begin_optimistic()
            .await
            .expect("begin after restart");
        let first_after = txn.start_timestamp().version();
        assert!(
            first_after > last_before,
            "timestamps keep increasing across the restart: {last_before} -> {first_after}"
        );
        assert_eq!(
            txn.get(txn_key.clone()).await.expect("get after restart"),
            Some(key("pessimistic")),
            "committed data persisted"
        );
        assert_eq!(
            txn.get(high_key.clone()).await.expect("get after restart"),
            Some(key("high"))
        );
        txn.put(txn_key.clone(), key("after")).await.expect("put");
        txn.commit().await.expect("commit after restart");
        assert_eq!(read(&client, &txn_key).await, Some(key("after")));

        assert_eq!(
            raw.get(raw_key.clone())
                .await
                .expect("raw get after restart"),
            Some(key("raw-before"))
        );
        raw.put(raw_key.clone(), key("raw-after"))
            .await
            .expect("raw put after restart");
        assert_eq!(
            raw.get(raw_key.clone()).await.expect("raw get"),
            Some(key("raw-after"))
        );
    })
    .await;
}
