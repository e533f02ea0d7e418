use super::*;
use crate::region::STORE_ID;

fn map() -> RegionMap {
    RegionMap::new(RegionMap::default_split_keys(), &[STORE_ID]).expect("default layout is valid")
}

fn enc(k: &[u8]) -> Vec<u8> {
    encode_bytes(k)
}

/// Contiguous, covering, sorted, index consistent, ids unique.
fn assert_well_formed(m: &RegionMap) {
    let r = m.regions();
    assert!(r[0].start_key.is_empty());
    assert!(r[r.len() - 1].end_key.is_empty());
    for w in r.windows(2) {
        assert_eq!(w[0].end_key, w[1].start_key);
        assert!(w[0].start_key < w[1].start_key || w[0].start_key.is_empty());
    }
    for (i, region) in r.iter().enumerate() {
        assert_eq!(m.get(region.id), Some(&r[i]));
        assert!(region.id.0 < m.next_id());
        for p in &region.peers {
            assert!(p.id < m.next_id());
        }
        assert!(region.peer_on(region.leader_store).is_some());
    }
    let mut ids: Vec<u64> = r
        .iter()
        .flat_map(|x| std::iter::once(x.id.0).chain(x.peers.iter().map(|p| p.id)))
        .collect();
    let n = ids.len();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), n, "ids are unique across regions and peers");
}

#[test]
fn default_layout_has_two_contiguous_regions() {
    let m = map();
    let r = m.regions();
    assert_eq!(r.len(), 2);
    assert_well_formed(&m);
    assert_eq!(
        r[0].end_key,
        vec![
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0, 0xf7
        ]
    );
    assert_ne!(r[0].id.0, STORE_ID);
    // The layout earlier versions handed out, so existing clients' ids hold.
    assert_eq!((r[0].id.0, r[0].leader().id), (2, 1002));
    assert_eq!((r[1].id.0, r[1].leader().id), (3, 1003));
    assert_eq!(
        r[0].epoch,
        RegionEpoch {
            conf_ver: 1,
            version: 2
        }
    );
}

#[test]
fn locate_and_contains_agree() {
    let m = map();
    for key in [&b""[..], b"a", &[0xff; 8], &[0xff; 20], &enc(b"zzz")] {
        let r = m.locate(key);
        assert!(r.contains(key), "{key:?} not in its region");
        assert_eq!(m.regions().iter().filter(|r| r.contains(key)).count(), 1);
    }
    assert_eq!(m.locate(&[0xff; 20]).id, m.regions()[1].id);
    assert_eq!(m.locate(b"ordinary raw key").id, m.regions()[0].id);
}

#[test]
fn invalid_split_keys_are_refused() {
    let s = [STORE_ID];
    assert!(RegionMap::new(vec![Vec::new()], &s).is_err());
    assert!(RegionMap::new(vec![b"abc".to_vec()], &s).is_err());
    let mut trailing = enc(b"k");
    trailing.push(1);
    assert!(RegionMap::new(vec![trailing], &s).is_err());
    assert!(RegionMap::new(vec![enc(b"k"), enc(b"k")], &s).is_err());
    assert!(RegionMap::new(vec![], &[]).is_err());
}

#[test]
fn split_keys_are_sorted_and_ids_stable() {
    let a = enc(b"a");
    let m = RegionMap::new(vec![enc(b"m"), a.clone()], &[STORE_ID]).expect("valid");
    assert_eq!(m.regions().len(), 3);
    assert_eq!(m.regions()[0].end_key, a);
    let again = RegionMap::new(vec![a, enc(b"m")], &[STORE_ID]).expect("valid");
    assert_eq!(m.regions(), again.regions());
}

#[test]
fn checks_map_to_region_errors() {
    let m = map();
    let r = m.regions()[0].clone();
    assert!(m.check(r.id, r.epoch).is_ok());
    assert_eq!(
        m.check(RegionId(999), r.epoch),
        Err(RegionError::NotFound(RegionId(999)))
    );
    let stale = RegionEpoch {
        conf_ver: 1,
        version: 0,
    };
    assert!(matches!(
        m.check(r.id, stale),
        Err(RegionError::EpochNotMatch { .. })
    ));
    assert!(matches!(
        m.check_key(r.id, r.epoch, &[0xff; 20]),
        Err(RegionError::KeyNotInRegion { .. })
    ));
}

#[test]
fn overlapping_and_intersect() {
    let m = RegionMap::new(vec![enc(b"b"), enc(b"d")], &[STORE_ID]).expect("valid");
    assert_eq!(m.overlapping(b"", b"", 0).len(), 3);
    let mid = m.overlapping(&enc(b"c"), &enc(b"c1"), 0);
    assert_eq!(mid.len(), 1);
    assert_eq!(mid[0].id, m.regions()[1].id);
    assert_eq!(m.overlapping(b"", b"", 2).len(), 2);
    let r = &m.regions()[1];
    assert_eq!(
        r.intersect(b"", b""),
        Some((r.start_key.clone(), r.end_key.clone()))
    );
    assert_eq!(r.intersect(&enc(b"x"), b""), None);
    assert_eq!(r.intersect(b"", &enc(b"a")), None);
    assert_eq!(m.before(&enc(b"d")).map(|r| r.id), Some(m.regions()[1].id));
    assert_eq!(m.before(&enc(b"b")).map(|r| r.id), Some(m.regions()[0].id));
    assert_eq!(m.before(b"").map(|r| r.id), Some(m.regions()[2].id));
}

#[test]
fn split_derives_right_and_raises_versions() {
    let m = map();
    let parent = m.regions()[0].clone();
    let keys = vec![enc(b"b"), enc(b"m")];
    let (next, kind) = m
        .split(parent.id, Some(parent.epoch), &keys)
        .expect("split");
    assert_well_formed(&next);
    assert_eq!(next.regions().len(), 4);
    let ChangeKind::Split { parent: p, regions } = kind else {
        panic!("not a split")
    };
    assert_eq!(p, parent.id);
    assert_eq!(regions.len(), 3);
    assert_eq!(regions[2].id, parent.id, "the right part keeps the id");
    assert_eq!(regions[2].peers, parent.peers);
    assert!(regions[0].id.0 >= m.next_id() && regions[1].id > regions[0].id);
    for r in &regions {
        assert_eq!(r.epoch.version, parent.epoch.version + 2);
        assert_eq!(r.epoch.conf_ver, parent.epoch.conf_ver);
        assert_eq!(next.get(r.id), Some(r));
    }
    assert_eq!(regions[0].start_key, parent.start_key);
    assert_eq!(regions[0].end_key, keys[0]);
    assert_eq!(regions[2].end_key, parent.end_key);
    assert_eq!(next.generation(), m.generation() + 1);
    // The untouched region is unchanged.
    assert_eq!(next.get(m.regions()[1].id), Some(&m.regions()[1]));
}

#[test]
fn bad_splits_change_nothing() {
    let m = map();
    let r = m.regions()[0].clone();
    let id = r.id;
    let e = Some(r.epoch);
    assert_eq!(m.split(id, e, &[]), Err(ChangeError::NoSplitKeys));
    assert_eq!(
        m.split(id, e, &[Vec::new()]),
        Err(ChangeError::EmptySplitKey)
    );
    assert!(matches!(
        m.split(id, e, &[enc(b"a"), enc(b"a")]),
        Err(ChangeError::DuplicateSplitKey(_))
    ));
    assert!(matches!(
        m.split(id, e, &[enc(b"b"), enc(b"a")]),
        Err(ChangeError::UnsortedSplitKeys { .. })
    ));
    // At the region's end, beyond it.
    for key in [r.end_key.clone(), vec![0xff; 30]] {
        assert!(matches!(
            m.split(id, e, &[key]),
            Err(ChangeError::SplitKeyNotInRegion { .. })
        ));
    }
    let second = m.regions()[1].clone();
    assert!(matches!(
        m.split(
            second.id,
            Some(second.epoch),
            std::slice::from_ref(&second.start_key)
        ),
        Err(ChangeError::SplitKeyNotInRegion { .. })
    ));
    let stale = RegionEpoch {
        conf_ver: 1,
        version: 1,
    };
    assert!(matches!(
        m.split(id, Some(stale), &[enc(b"a")]),
        Err(ChangeError::Region(RegionError::EpochNotMatch { .. }))
    ));
    assert!(matches!(
        m.split(RegionId(77), None, &[enc(b"a")]),
        Err(ChangeError::Region(RegionError::NotFound(_)))
    ));
    let many: Vec<Vec<u8>> = (0..=MAX_SPLIT_KEYS as u32)
        .map(|i| enc(&i.to_be_bytes()))
        .collect();
    assert!(matches!(
        m.split(id, e, &many),
        Err(ChangeError::TooManySplitKeys { .. })
    ));
}

#[test]
fn merge_joins_neighbours_and_removes_the_source() {
    let m = RegionMap::new(vec![enc(b"b"), enc(b"d")], &[STORE_ID]).expect("valid");
    let [a, b, c] = [0, 1, 2].map(|i| m.regions()[i].clone());
    // Default target: the right neighbour.
    let (next, kind) = m.merge(a.id, None).expect("merge");
    assert_well_formed(&next);
    assert_eq!(next.regions().len(), 2);
    assert!(next.get(a.id).is_none());
    let merged = next.get(b.id).expect("target survives").clone();
    assert_eq!(merged.start_key, a.start_key);
    assert_eq!(merged.end_key, b.end_key);
    assert_eq!(
        merged.epoch.version,
        a.epoch.version.max(b.epoch.version) + 1
    );
    assert_eq!(
        kind,
        ChangeKind::Merge {
            source: a.id,
            target: merged
        }
    );
    // The last region merges into its left neighbour.
    let (next, _) = m.merge(c.id, None).expect("merge");
    assert_eq!(next.get(b.id).map(|r| r.end_key.clone()), Some(Vec::new()));
    // Errors.
    assert_eq!(
        m.merge(a.id, Some(c.id)),
        Err(ChangeError::NotAdjacent {
            region: a.id,
            target: c.id
        })
    );
    assert_eq!(
        m.merge(a.id, Some(a.id)),
        Err(ChangeError::MergeWithItself(a.id))
    );
    assert!(m.merge(RegionId(99), None).is_err());
    assert!(m.merge(a.id, Some(RegionId(99))).is_err());
    let single = RegionMap::new(vec![], &[STORE_ID]).expect("valid");
    let only = single.regions()[0].id;
    assert_eq!(
        single.merge(only, None),
        Err(ChangeError::NoNeighbour(only))
    );
}

#[test]
fn ids_are_never_reused_after_merge_and_split() {
    let m = map();
    let first = m.regions()[0].clone();
    let (m1, kind) = m.split(first.id, None, &[enc(b"k")]).expect("split");
    let ChangeKind::Split { regions, .. } = kind else {
        panic!("not a split")
    };
    let new_id = regions[0].id;
    let (m2, _) = m1.merge(new_id, None).expect("merge");
    let (m3, kind) = m2.split(first.id, None, &[enc(b"k")]).expect("split again");
    let ChangeKind::Split { regions, .. } = kind else {
        panic!("not a split")
    };
    assert!(regions[0].id > new_id);
    assert_well_formed(&m3);
}

#[test]
fn leader_transfer_keeps_epochs() {
    let m = RegionMap::new(RegionMap::default_split_keys(), &[1, 2, 3]).expect("valid");
    assert_well_formed(&m);
    let r = m.regions()[0].clone();
    assert_eq!(r.peers.len(), 3);
    // Leaders are spread round robin.
    assert_eq!(r.leader_store, 1);
    assert_eq!(m.regions()[1].leader_store, 2);
    assert_eq!(m.transfer_leader(r.id, 1), Ok(None));
    let (next, kind) = m.transfer_leader(r.id, 3).expect("ok").expect("a change");
    let moved = next.get(r.id).expect("still there");
    assert_eq!(moved.leader_store, 3);
    assert_eq!(moved.epoch, r.epoch);
    assert_eq!(
        kind,
        ChangeKind::LeaderTransfer {
            region: moved.clone(),
            from_store: 1
        }
    );
    assert!(matches!(
        m.transfer_leader(r.id, 9),
        Err(ChangeError::UnknownStore { store: 9, .. })
    ));
    // New regions get a peer on every store.
    let (split, _) = next.split(r.id, None, &[enc(b"q")]).expect("split");
    assert_well_formed(&split);
    assert!(split.regions().iter().all(|x| x.peers.len() == 3));
}
