//! Scans against a model, and delete_range.

use std::collections::BTreeMap;

use super::{Env, b, env};

/// Keys chosen to exercise the encoding: prefixes of each other, zero bytes,
/// 0xFF bytes and lengths around the 8-byte group size.
fn scan_keys() -> Vec<Vec<u8>> {
    vec![
        b("a"),
        b("a\0"),
        b("ab"),
        b("abc"),
        b("abcdefgh"),
        b("abcdefghi"),
        b("b"),
        vec![0x00],
        vec![0xFF],
        vec![0xFF, 0x00],
        vec![0xFF, 0xFF],
        vec![0xFF; 8],
        vec![0xFF; 9],
    ]
}

/// Builds a store with the scan keys plus dead keys (deleted, expired) and
/// overwritten versions; returns the live model.
fn scan_fixture(env: &Env) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let mut model = BTreeMap::new();
    for (i, key) in scan_keys().into_iter().enumerate() {
        let old = format!("old{i}").into_bytes();
        env.raw.put(&key, &old, None).expect("put");
        let value = format!("v{i}").into_bytes();
        env.raw.put(&key, &value, None).expect("put");
        model.insert(key, value);
    }
    env.raw.put(b"aa", b"dead", None).expect("put");
    env.raw.delete(b"aa").expect("delete");
    env.raw.put(b"ac", b"expiring", Some(1)).expect("put");
    env.raw.put(&[0xFF, 0x01], b"dead", None).expect("put");
    env.raw.delete(&[0xFF, 0x01]).expect("delete");
    env.advance_secs(1);
    model
}

fn model_scan(
    model: &BTreeMap<Vec<u8>, Vec<u8>>,
    start: &[u8],
    end: &[u8],
    limit: usize,
    key_only: bool,
    reverse: bool,
) -> Vec<(Vec<u8>, Vec<u8>)> {
    let (low, high) = if reverse { (end, start) } else { (start, end) };
    let in_range = |k: &Vec<u8>| k.as_slice() >= low && (high.is_empty() || k.as_slice() < high);
    let pairs = model.iter().filter(|(k, _)| in_range(k));
    let pairs: Vec<_> = if reverse {
        pairs.rev().collect()
    } else {
        pairs.collect()
    };
    pairs
        .into_iter()
        .take(limit)
        .map(|(k, v)| (k.clone(), if key_only { Vec::new() } else { v.clone() }))
        .collect()
}

#[test]
fn scan_table() {
    let env = env();
    let model = scan_fixture(&env);
    type Case = (
        &'static [u8],
        &'static [u8],
        usize,
        bool,
        &'static [&'static [u8]],
    );
    // (start, end, limit, reverse, expected keys)
    let cases: &[Case] = &[
        (
            b"a",
            b"b",
            100,
            false,
            &[b"a", b"a\0", b"ab", b"abc", b"abcdefgh", b"abcdefghi"],
        ),
        (b"a", b"ab", 100, false, &[b"a", b"a\0"]),
        (b"a\0", b"abc", 100, false, &[b"a\0", b"ab"]),
        (b"a", b"b", 2, false, &[b"a", b"a\0"]),
        (b"a", b"b", 0, false, &[]),
        (b"b", b"a", 10, false, &[]),
        (
            b"\xFF",
            b"",
            100,
            false,
            &[
                b"\xFF",
                b"\xFF\x00",
                b"\xFF\xFF",
                b"\xFF\xFF\xFF\xFF\xFF\xFF\xFF\xFF",
                b"\xFF\xFF\xFF\xFF\xFF\xFF\xFF\xFF\xFF",
            ],
        ),
        (
            b"\xFF\xFF\xFF\xFF\xFF\xFF\xFF\xFF",
            b"\xFF\xFF\xFF\xFF\xFF\xFF\xFF\xFF\xFF",
            100,
            false,
            &[b"\xFF\xFF\xFF\xFF\xFF\xFF\xFF\xFF"],
        ),
        (b"", b"a", 100, false, &[b"\x00"]),
        // Reverse: start is the exclusive upper bound, end the inclusive lower.
        (b"ab", b"a", 100, true, &[b"a\0", b"a"]),
        (b"b", b"abc", 3, true, &[b"abcdefghi", b"abcdefgh", b"abc"]),
        (
            b"",
            b"\xFF\xFF",
            100,
            true,
            &[
                b"\xFF\xFF\xFF\xFF\xFF\xFF\xFF\xFF\xFF",
                b"\xFF\xFF\xFF\xFF\xFF\xFF\xFF\xFF",
                b"\xFF\xFF",
            ],
        ),
        (b"a", b"", 100, true, &[b"\x00"]),
        (b"a", b"b", 100, true, &[]),
        (b"a", b"a", 100, true, &[]),
    ];
    for &(start, end, limit, reverse, want) in cases {
        let got = env
            .raw
            .scan(start, end, limit, false, reverse)
            .expect("scan");
        let keys: Vec<&[u8]> = got.iter().map(|(k, _)| k.as_slice()).collect();
        assert_eq!(
            keys, want,
            "scan({start:?}, {end:?}, {limit}, reverse={reverse})"
        );
        for (k, v) in &got {
            assert_eq!(Some(v), model.get(k), "value of {k:?}");
        }
    }
}

#[test]
fn scan_matches_model_for_all_bounds() {
    let env = env();
    let model = scan_fixture(&env);
    let mut bounds = scan_keys();
    bounds.extend([Vec::new(), b("aa"), b("ac"), vec![0xFF, 0x01], b("zzz")]);
    for start in &bounds {
        for end in &bounds {
            for (limit, key_only, reverse) in [
                (usize::MAX, false, false),
                (3, true, false),
                (usize::MAX, false, true),
                (2, true, true),
            ] {
                let got = env
                    .raw
                    .scan(start, end, limit, key_only, reverse)
                    .expect("scan");
                let want = model_scan(&model, start, end, limit, key_only, reverse);
                assert_eq!(
                    got, want,
                    "scan({start:?}, {end:?}, {limit}, key_only={key_only}, reverse={reverse})"
                );
            }
        }
    }
}

#[test]
fn delete_range_table() {
    // (start, end, deleted count, keys left)
    type Case = (
        &'static [u8],
        &'static [u8],
        usize,
        &'static [&'static [u8]],
    );
    let cases: &[Case] = &[
        (b"a", b"b", 3, &[b"b", b"c"]),
        (b"ab", b"c", 3, &[b"a", b"c"]),
        (b"a", b"", 5, &[]),
        (b"b", b"b", 0, &[b"a", b"ab", b"abc", b"b", b"c"]),
        (b"c", b"a", 0, &[b"a", b"ab", b"abc", b"b", b"c"]),
        (b"abd", b"az", 0, &[b"a", b"ab", b"abc", b"b", b"c"]),
    ];
    for &(start, end, count, left) in cases {
        let env = env();
        for key in ["a", "ab", "abc", "b", "c"] {
            env.raw.put(key.as_bytes(), b"v", None).expect("put");
        }
        // Dead keys in the range are not deleted again.
        env.raw.put(b"aa", b"v", None).expect("put");
        env.raw.delete(b"aa").expect("delete");
        assert_eq!(
            env.raw.delete_range(start, end).expect("delete_range"),
            count,
            "delete_range({start:?}, {end:?})"
        );
        let keys: Vec<Vec<u8>> = env
            .raw
            .scan(b"", b"", usize::MAX, true, false)
            .expect("scan")
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        let left: Vec<Vec<u8>> = left.iter().map(|k| k.to_vec()).collect();
        assert_eq!(keys, left, "delete_range({start:?}, {end:?})");
    }
}

#[test]
fn delete_range_larger_than_one_batch() {
    let env = env();
    let pairs: Vec<_> = (0..2_500u32)
        .map(|i| (format!("k{i:05}").into_bytes(), b("v")))
        .collect();
    env.raw.batch_put(&pairs, &[]).expect("put");
    env.raw.put(b"z", b"v", None).expect("put");
    assert_eq!(env.raw.delete_range(b"k", b"l").expect("dr"), 2_500);
    let left = env
        .raw
        .scan(b"", b"", usize::MAX, true, false)
        .expect("scan");
    assert_eq!(left, vec![(b("z"), Vec::new())]);
}
