//! Region splits and merges while subscribed: the subscription ends with
//! TiKV's error and nothing after it, and a re-registration on the new
//! layout from the consumer's checkpoint misses nothing.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test fails by panicking

mod common;

use common::{Item, env, register};
use kvfeed_proto::cdcpb::ChangeDataRequest;
use kvfeed_storage::mvcc::encode_bytes;
use kvfeed_storage::region::Region;

fn from(request_id: u64, region: &Region, checkpoint: u64) -> ChangeDataRequest {
    ChangeDataRequest {
        checkpoint_ts: checkpoint,
        ..register(request_id, region)
    }
}

/// Rows of one (request, region) until its INITIALIZED, committed keys only.
async fn catch_up(events: &mut common::Events, request_id: u64, region_id: u64) -> Vec<Vec<u8>> {
    let mut keys = Vec::new();
    loop {
        let item = events.expect().await;
        assert_eq!(item.ids(), (request_id, region_id), "{item:?}");
        if item.is_initialized() {
            return keys;
        }
        let row = item.row();
        if row.r#type == kvfeed_proto::cdcpb::event::LogType::Committed as i32 {
            keys.push(row.key.to_vec());
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_split_ends_the_subscription_with_the_new_regions() {
    let env = env();
    let (mut conn, mut events) = env.connect();
    let parent = env.region_a();
    conn.handle(register(1, &parent)).await.expect("handle");
    events.expect_initialized(1, parent.id.0).await;

    let (_, before) = env.put(b"a1", b"v");
    for _ in 0..2 {
        // Its PREWRITE and COMMIT.
        let item = events.expect().await;
        assert_eq!(&item.row().key[..], b"a1");
    }
    let checkpoint = before.into_inner();

    let parts = env
        .regions
        .split(parent.id, Some(parent.epoch), vec![encode_bytes(b"m")])
        .expect("split");
    assert_eq!(parts.len(), 2);
    // Written after the split: not for the old subscription.
    env.put(b"b1", b"v");
    env.put(b"z1", b"v");

    let item = events.expect().await;
    assert_eq!(item.ids(), (1, parent.id.0));
    let current = item
        .error()
        .epoch_not_match
        .clone()
        .expect("epoch_not_match")
        .current_regions;
    assert_eq!(
        current.iter().map(|r| r.id).collect::<Vec<_>>(),
        parts.iter().map(|r| r.id.0).collect::<Vec<_>>()
    );
    assert_eq!(current[0].end_key, encode_bytes(b"m"));
    assert_eq!(
        current[1].region_epoch.as_ref().map(|e| e.version),
        Some(parent.epoch.version + 1)
    );
    env.settle().await;
    events.assert_quiet();
    assert_eq!(
        env.feed
            .debug_snapshot()
            .await
            .expect("snapshot")
            .connections[0]
            .subscriptions
            .len(),
        0
    );

    // The old epoch is refused now; the new regions from the checkpoint
    // deliver exactly what came after it.
    conn.handle(register(2, &parent)).await.expect("handle");
    let item = events.expect().await;
    assert!(item.error().epoch_not_match.is_some(), "{item:?}");
    conn.handle(from(3, &parts[0], checkpoint))
        .await
        .expect("handle");
    assert_eq!(
        catch_up(&mut events, 3, parts[0].id.0).await,
        vec![b"b1".to_vec()]
    );
    conn.handle(from(3, &parts[1], checkpoint))
        .await
        .expect("handle");
    assert_eq!(
        catch_up(&mut events, 3, parts[1].id.0).await,
        vec![b"z1".to_vec()]
    );
    // Live rows go to the region now holding the key.
    env.put(b"c1", b"v");
    for _ in 0..2 {
        let item = events.expect().await;
        assert_eq!(item.ids(), (3, parts[0].id.0));
        assert_eq!(&item.row().key[..], b"c1");
    }
    env.settle().await;
    events.assert_quiet();
}

#[tokio::test(start_paused = true)]
async fn a_merge_ends_both_regions_subscriptions() {
    let env = env();
    let parent = env.region_a();
    let parts = env
        .regions
        .split(parent.id, None, vec![encode_bytes(b"m")])
        .expect("split");
    let (mut conn, mut events) = env.connect();
    for r in &parts {
        conn.handle(register(1, r)).await.expect("handle");
        events.expect_initialized(1, r.id.0).await;
    }
    let other = env
        .regions
        .current()
        .regions()
        .last()
        .cloned()
        .expect("a region");
    conn.handle(register(1, &other)).await.expect("handle");
    events.expect_initialized(1, other.id.0).await;

    let survivor = env.regions.merge(parts[0].id, None).expect("merge");
    assert_eq!(survivor.id, parts[1].id);
    let mut ended = Vec::new();
    for _ in 0..2 {
        match events.expect().await {
            Item::Error {
                region_id, error, ..
            } => {
                let e = error.epoch_not_match.expect("epoch_not_match");
                assert!(e.current_regions.is_empty());
                ended.push(region_id);
            }
            other => panic!("expected an error, got {other:?}"),
        }
    }
    ended.sort_unstable();
    let mut want = vec![parts[0].id.0, parts[1].id.0];
    want.sort_unstable();
    assert_eq!(ended, want);
    env.put(b"a2", b"v");
    env.settle().await;
    events.assert_quiet();
    // The merged-away region is gone, the survivor serves the whole range.
    conn.handle(register(2, &parts[0])).await.expect("handle");
    assert!(events.expect().await.error().region_not_found.is_some());
    conn.handle(register(2, &survivor)).await.expect("handle");
    assert_eq!(
        catch_up(&mut events, 2, survivor.id.0).await,
        vec![b"a2".to_vec()]
    );
}
