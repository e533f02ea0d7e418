//! Register / Deregister handling: every validation error as an error event
//! (never a crash), the order of checks, duplicates, deregistration by
//! region and by request id, unsupported requests, and scale.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test fails by panicking

mod common;

use common::{CLUSTER_ID, Item, deregister, env, env_with, register, register_raw};
use kvfeed_cdc::{FeedConfig, FeedError, SubscriptionState};
use kvfeed_proto::cdcpb::change_data_request::{self, KvApi, NotifyTxnStatus};
use kvfeed_proto::cdcpb::{ChangeDataRequest, Header};
use kvfeed_proto::metapb;
use kvfeed_storage::mvcc::encode_bytes;
use kvfeed_storage::region::STORE_ID;

#[tokio::test(start_paused = true)]
async fn register_is_answered_with_one_initialized_row() {
    let env = env();
    let (mut conn, mut events) = env.connect();
    let region = env.region_a();
    conn.handle(register(1, &region)).await.expect("handle");
    events.expect_initialized(1, region.id.0).await;
    env.settle().await;
    events.assert_quiet();

    let snap = env.feed.debug_snapshot().await.expect("snapshot");
    assert_eq!(snap.connections.len(), 1);
    let c = &snap.connections[0];
    assert_eq!(c.version.as_deref(), Some("8.5.0"));
    assert_eq!(c.subscriptions.len(), 1);
    let s = &c.subscriptions[0];
    assert_eq!((s.request_id, s.region_id), (1, region.id.0));
    assert_eq!(s.state, SubscriptionState::Normal);
    assert_eq!(s.end_key, hex(&region.end_key));
    let json = serde_json::to_string(&snap).expect("serializable");
    assert!(json.contains("\"kv_api\":\"TiDB\""), "{json}");
    assert!(json.contains("\"state\":\"normal\""), "{json}");
}

#[tokio::test(start_paused = true)]
async fn a_request_without_a_kind_is_a_register() {
    let env = env();
    let (mut conn, mut events) = env.connect();
    let region = env.region_a();
    let req = ChangeDataRequest {
        request: None,
        ..register(4, &region)
    };
    conn.handle(req).await.expect("handle");
    events.expect_initialized(4, region.id.0).await;
}

#[tokio::test(start_paused = true)]
async fn cluster_id_is_checked_for_clients_from_5_3_0() {
    let env = env();
    let region = env.region_a();
    let wrong = |version: &str| ChangeDataRequest {
        header: Some(Header {
            cluster_id: CLUSTER_ID + 1,
            ticdc_version: version.to_owned(),
        }),
        ..register(1, &region)
    };

    let (mut new_client, mut events) = env.connect();
    new_client.handle(wrong("5.3.0")).await.expect("handle");
    let item = events.expect().await;
    assert_eq!(item.ids(), (1, region.id.0));
    let mismatch = item.error().cluster_id_mismatch.expect("mismatch");
    assert_eq!(
        (mismatch.current, mismatch.request),
        (CLUSTER_ID, CLUSTER_ID + 1)
    );

    let (mut old_client, mut events) = env.connect();
    old_client.handle(wrong("5.2.9")).await.expect("handle");
    events.expect_initialized(1, region.id.0).await;

    // The first request fixes the version: a later, newer header changes
    // nothing, so the old client is still not checked.
    let mut later = wrong("8.5.0");
    later.request_id = 2;
    old_client.handle(later).await.expect("handle");
    events.expect_initialized(2, region.id.0).await;
    assert_eq!(
        old_client.version().map(|v| v.to_string()).as_deref(),
        Some("5.2.9")
    );
}

#[tokio::test(start_paused = true)]
async fn txnkv_and_unknown_kv_apis_are_incompatible() {
    let env = env();
    let (mut conn, mut events) = env.connect();
    let region = env.region_a();
    for (request_id, kv_api) in [(1, KvApi::TxnKv as i32), (2, 77)] {
        let req = ChangeDataRequest {
            kv_api,
            ..register(request_id, &region)
        };
        conn.handle(req).await.expect("handle");
        let item = events.expect().await;
        assert_eq!(item.ids(), (request_id, region.id.0));
        assert!(item.error().compatibility.is_some(), "{item:?}");
    }
    assert_eq!(env.settle().await.subscriptions, 0);
}

#[tokio::test(start_paused = true)]
async fn an_unknown_region_is_not_found() {
    let env = env();
    let (mut conn, mut events) = env.connect();
    let req = ChangeDataRequest {
        region_id: 999,
        ..register(1, &env.region_a())
    };
    conn.handle(req).await.expect("handle");
    let item = events.expect().await;
    assert_eq!(item.ids(), (1, 999));
    let not_found = item.error().region_not_found.expect("not found");
    assert_eq!(not_found.region_id, 999);
}

#[tokio::test(start_paused = true)]
async fn a_stale_epoch_is_answered_with_the_current_region() {
    let env = env();
    let (mut conn, mut events) = env.connect();
    let region = env.region_b();
    for epoch in [
        Some(metapb::RegionEpoch {
            conf_ver: region.epoch.conf_ver,
            version: region.epoch.version + 1,
        }),
        None,
    ] {
        let req = ChangeDataRequest {
            region_epoch: epoch,
            ..register(1, &region)
        };
        conn.handle(req).await.expect("handle");
        let item = events.expect().await;
        let current = item.error().epoch_not_match.clone().expect("epoch");
        assert_eq!(current.current_regions.len(), 1);
        let r = &current.current_regions[0];
        assert_eq!(r.id, region.id.0);
        assert_eq!(
            (&r.start_key, &r.end_key),
            (&region.start_key, &region.end_key)
        );
        let epoch = r.region_epoch.expect("epoch");
        assert_eq!(
            (epoch.conf_ver, epoch.version),
            (region.epoch.conf_ver, region.epoch.version)
        );
        assert_eq!(r.peers.len(), 1);
        assert_eq!(
            (r.peers[0].id, r.peers[0].store_id),
            (region.leader().id, STORE_ID)
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_range_outside_the_region_is_a_stale_view() {
    let env = env();
    let (mut conn, mut events) = env.connect();
    let region = env.region_b();
    let req = ChangeDataRequest {
        start_key: encode_bytes(b"a"),
        end_key: encode_bytes(b"b"),
        ..register(1, &region)
    };
    conn.handle(req).await.expect("handle");
    assert!(events.expect().await.error().epoch_not_match.is_some());
    // The same range on the region that holds it is fine.
    let ok = ChangeDataRequest {
        start_key: encode_bytes(b"a"),
        end_key: encode_bytes(b"b"),
        ..register(2, &env.region_a())
    };
    conn.handle(ok).await.expect("handle");
    events.expect_initialized(2, env.region_a().id.0).await;
}

#[tokio::test(start_paused = true)]
async fn checks_run_in_a_fixed_order() {
    let env = env();
    let (mut conn, mut events) = env.connect();
    let region = env.region_a();
    conn.handle(register(1, &region)).await.expect("handle");
    events.expect_initialized(1, region.id.0).await;

    // Each request fails every check from its position on; the answer names
    // the first one.
    let everything_wrong = ChangeDataRequest {
        header: Some(Header {
            cluster_id: 0,
            ticdc_version: "8.5.0".to_owned(),
        }),
        kv_api: KvApi::TxnKv as i32,
        region_id: 999,
        ..register(1, &region)
    };
    let stale = ChangeDataRequest {
        region_epoch: None,
        start_key: vec![0xff; 30],
        ..register(1, &region)
    };
    let duplicate_and_outside = ChangeDataRequest {
        start_key: vec![0xff; 30],
        ..register(1, &region)
    };
    let mut req = everything_wrong.clone();
    let expectations: [(ChangeDataRequest, &str); 5] = [
        (everything_wrong, "cluster_id_mismatch"),
        (
            {
                req.header = Some(Header {
                    cluster_id: CLUSTER_ID,
                    ticdc_version: "8.5.0".to_owned(),
                });
                req.clone()
            },
            "compatibility",
        ),
        (
            ChangeDataRequest {
                kv_api: KvApi::TiDb as i32,
                ..req
            },
            "region_not_found",
        ),
        (stale, "epoch_not_match"),
        (duplicate_and_outside, "duplicate_request"),
    ];
    for (req, want) in expectations {
        conn.handle(req).await.expect("handle");
        let error = events.expect().await.error().clone();
        let got = if error.cluster_id_mismatch.is_some() {
            "cluster_id_mismatch"
        } else if error.compatibility.is_some() {
            "compatibility"
        } else if error.region_not_found.is_some() {
            "region_not_found"
        } else if error.epoch_not_match.is_some() {
            "epoch_not_match"
        } else if error.duplicate_request.is_some() {
            "duplicate_request"
        } else {
            "other"
        };
        assert_eq!(got, want);
    }
}

#[tokio::test(start_paused = true)]
async fn a_duplicate_is_refused_and_the_original_keeps_working() {
    let env = env();
    let (mut conn, mut events) = env.connect();
    let region = env.region_a();
    conn.handle(register(1, &region)).await.expect("handle");
    events.expect_initialized(1, region.id.0).await;
    conn.handle(register(1, &region)).await.expect("handle");
    let item = events.expect().await;
    assert_eq!(
        item.error().duplicate_request.map(|d| d.region_id),
        Some(region.id.0)
    );
    assert_eq!(env.settle().await.subscriptions, 1);

    env.put(b"k", b"v");
    let prewrite = events.expect().await;
    let commit = events.expect().await;
    assert_eq!(
        (prewrite.ids(), commit.ids()),
        ((1, region.id.0), (1, region.id.0))
    );
    env.settle().await;
    events.assert_quiet();
}

#[tokio::test(start_paused = true)]
async fn deregister_by_region_and_by_request_id() {
    let env = env();
    let (mut conn, mut events) = env.connect();
    let (a, b) = (env.region_a(), env.region_b());
    for (request_id, region) in [(1, &a), (1, &b), (2, &a)] {
        conn.handle(register(request_id, region))
            .await
            .expect("handle");
        events.expect_initialized(request_id, region.id.0).await;
    }
    assert_eq!(env.settle().await.subscriptions, 3);

    conn.handle(deregister(1, a.id.0)).await.expect("handle");
    assert_eq!(env.settle().await.subscriptions, 2);
    events.assert_quiet(); // nothing is sent for an explicit deregister

    // Only request 2 still covers region A.
    env.put(b"k", b"v");
    for _ in 0..2 {
        assert_eq!(events.expect().await.ids(), (2, a.id.0));
    }
    env.settle().await;
    events.assert_quiet();

    // Region 0 means every region of the request id.
    conn.handle(deregister(1, 0)).await.expect("handle");
    let snap = env.feed.debug_snapshot().await.expect("snapshot");
    let subs: Vec<(u64, u64)> = snap.connections[0]
        .subscriptions
        .iter()
        .map(|s| (s.request_id, s.region_id))
        .collect();
    assert_eq!(subs, vec![(2, a.id.0)]);

    // Deregistering what does not exist is harmless.
    conn.handle(deregister(9, 0)).await.expect("handle");
    conn.handle(deregister(1, a.id.0)).await.expect("handle");
    assert_eq!(env.settle().await.subscriptions, 1);
    events.assert_quiet();

    // A deregistered (request, region) may be registered again; its
    // catch-up scan (from checkpoint 0) reports k first.
    conn.handle(register(1, &a)).await.expect("handle");
    let scanned = events.expect().await;
    assert_eq!(
        (scanned.ids(), &scanned.row().key[..]),
        ((1, a.id.0), &b"k"[..])
    );
    events.expect_initialized(1, a.id.0).await;
}

#[tokio::test(start_paused = true)]
async fn notify_txn_status_is_unsupported() {
    let env = env();
    let (mut conn, mut events) = env.connect();
    let req = ChangeDataRequest {
        request: Some(change_data_request::Request::NotifyTxnStatus(
            NotifyTxnStatus::default(),
        )),
        ..register(1, &env.region_a())
    };
    match conn.handle(req).await {
        Err(FeedError::Unsupported(what)) => assert!(what.contains("NotifyTxnStatus"), "{what}"),
        other => panic!("expected Unsupported, got {other:?}"),
    }
    drop(conn);
    assert!(events.drain_to_end().await.is_empty());
    env.assert_clean().await;
    assert_eq!(env.feed.metrics().aborted("bad_request"), 1);
}

#[tokio::test(start_paused = true)]
async fn the_subscription_cap_answers_server_is_busy() {
    let env = env_with(FeedConfig {
        max_subscriptions_per_conn: 3,
        ..FeedConfig::default()
    });
    let (mut conn, mut events) = env.connect();
    let region = env.region_a();
    for request_id in 1..=3 {
        conn.handle(register(request_id, &region))
            .await
            .expect("handle");
        events.expect_initialized(request_id, region.id.0).await;
    }
    conn.handle(register(4, &region)).await.expect("handle");
    let item = events.expect().await;
    assert_eq!(item.ids(), (4, region.id.0));
    assert!(item.error().server_is_busy.is_some());

    // The cap is per connection.
    let (mut other, mut other_events) = env.connect();
    other.handle(register(4, &region)).await.expect("handle");
    other_events.expect_initialized(4, region.id.0).await;

    conn.handle(deregister(2, 0)).await.expect("handle");
    conn.handle(register(4, &region)).await.expect("handle");
    events.expect_initialized(4, region.id.0).await;
}

#[tokio::test(start_paused = true)]
async fn raw_subscriptions_use_raw_keys() {
    let env = env();
    let (mut conn, mut events) = env.connect();
    let region = env.region_a();
    conn.handle(register_raw(1, &region, b"a", b"m"))
        .await
        .expect("handle");
    events.expect_initialized(1, region.id.0).await;
    let snap = env.feed.debug_snapshot().await.expect("snapshot");
    let s = &snap.connections[0].subscriptions[0];
    assert_eq!((s.start_key.as_str(), s.end_key.as_str()), ("61", "6d"));
    // Raw keys above the split key belong to region B.
    conn.handle(register_raw(2, &region, &[0xff; 12], b""))
        .await
        .expect("handle");
    assert!(events.expect().await.error().epoch_not_match.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_registers_on_one_connection() {
    const N: u64 = 10_000;
    let env = env();
    let (mut conn, mut events) = env.connect();
    let region = env.region_a();
    let reader = tokio::spawn(async move {
        let mut initialized = 0;
        let mut rows = 0;
        while initialized + rows < 2 * N {
            match events.expect().await {
                item @ Item::Row { .. } if item.is_initialized() => initialized += 1,
                Item::Row { .. } => rows += 1,
                item @ Item::Error { .. } => panic!("unexpected {item:?}"),
            }
        }
        (initialized, rows, events)
    });
    for request_id in 1..=N {
        conn.handle(register(request_id, &region))
            .await
            .expect("handle");
    }
    assert_eq!(env.settle().await.subscriptions, N as usize);
    // One 1PC write reaches every subscription.
    let start_ts = env.ts();
    env.prewrite_at(start_ts, vec![common::put(b"k", b"v")], |req| {
        req.try_one_pc = true;
    });
    let (initialized, rows, _events) = reader.await.expect("reader");
    assert_eq!((initialized, rows), (N, N));
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
