//! Region boundaries that are not memcomparable encodings, seen from the
//! transactional key space.
//!
//! TiKV uses the split keys of a raw split (`is_raw_kv`) as they are, so a
//! boundary may be any byte string, while a transactional request's keys are
//! compared with boundaries in their encoding. To bound a transactional scan
//! by such a region the server needs the boundary in raw-key terms:
//! [`raw_lower_bound`] gives the smallest raw key whose encoding is at or
//! above it. Because encoding preserves order, `encode(k) >= b` exactly when
//! `k >= raw_lower_bound(b)`, so an inclusive start and an exclusive end both
//! translate without loss.

use kvfeed_types::codec::GROUP_SIZE;

/// Marker after a full group.
const FULL: u8 = 0xFF;
/// Marker after a final group holding no data bytes (`0xFF - 8`); a final
/// group holding `l` bytes (0..=7) has marker `EMPTY_FINAL + l`.
const EMPTY_FINAL: u8 = 0xF7;

/// The smallest raw key whose memcomparable encoding is `>= boundary`. For
/// a complete encoding `encode(k)` this is `k` itself.
pub fn raw_lower_bound(boundary: &[u8]) -> Vec<u8> {
    let mut key = Vec::new();
    let mut rest = boundary;
    loop {
        if rest.is_empty() {
            // The boundary is a prefix of `key`'s encoding.
            return key;
        }
        let (group, after) = rest.split_at(rest.len().min(GROUP_SIZE + 1));
        if group.len() == GROUP_SIZE + 1 && group[GROUP_SIZE] == FULL {
            // Keys with a smaller group here sort below the boundary, keys
            // with a larger one above it; the answer continues this group.
            key.extend_from_slice(&group[..GROUP_SIZE]);
            rest = after;
            continue;
        }
        // A final group equal to this one would end the encoding before the
        // boundary does, i.e. below it.
        let strict = !after.is_empty();
        match least_group_from(group, strict) {
            Some(Group::Final(bytes)) | Some(Group::Full(bytes)) => {
                key.extend_from_slice(&bytes);
                return key;
            }
            // Only a group above every encodable group could get here, and
            // `FF..FF FF` is the largest group of all (handled above).
            None => {
                key.extend_from_slice(&[0xFF; GROUP_SIZE]);
                return key;
            }
        }
    }
}

/// A group of an encoding, by the raw bytes it contributes: a final group
/// ends the key, a full one (8 bytes) is followed by more (here: by the
/// empty final group, the least continuation).
enum Group {
    Final(Vec<u8>),
    Full(Vec<u8>),
}

/// The least valid group `>= group` (`> group` if `strict`), comparing a
/// partial `group` as a prefix. `group` is 1..=9 bytes and not a full group.
fn least_group_from(group: &[u8], strict: bool) -> Option<Group> {
    if group.len() <= GROUP_SIZE {
        // Every group starting with these bytes sorts above the partial
        // group; the least pads with zeros and takes the least marker.
        let mut data = [0u8; GROUP_SIZE];
        data[..group.len()].copy_from_slice(group);
        return Some(least_with_data(data));
    }
    let mut data = [0u8; GROUP_SIZE];
    data.copy_from_slice(&group[..GROUP_SIZE]);
    let marker = group[GROUP_SIZE];
    let used = used_len(&data);
    // Valid markers for these data bytes, ascending: final groups holding
    // `used..=7` bytes, then the full-group marker.
    for len in used..GROUP_SIZE {
        let m = EMPTY_FINAL + len as u8;
        if m > marker || (m == marker && !strict) {
            return Some(Group::Final(data[..len].to_vec()));
        }
    }
    if FULL > marker {
        return Some(Group::Full(data.to_vec()));
    }
    increment(&mut data).then(|| least_with_data(data))
}

/// The least valid group with exactly these data bytes.
fn least_with_data(data: [u8; GROUP_SIZE]) -> Group {
    let used = used_len(&data);
    if used < GROUP_SIZE {
        Group::Final(data[..used].to_vec())
    } else {
        Group::Full(data.to_vec())
    }
}

/// Length of `data` without its trailing zero bytes.
fn used_len(data: &[u8; GROUP_SIZE]) -> usize {
    data.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1)
}

/// Adds one to `data` as a big-endian number; false on overflow.
fn increment(data: &mut [u8; GROUP_SIZE]) -> bool {
    for b in data.iter_mut().rev() {
        if *b == 0xFF {
            *b = 0;
        } else {
            *b += 1;
            return true;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvfeed_types::codec::encode_bytes;
    use rand::rngs::StdRng;
    use rand::{RngExt, SeedableRng};

    #[test]
    fn encodings_map_back_to_their_key() {
        for key in [
            &b""[..],
            b"a",
            b"abcdefgh",
            b"abcdefghi",
            &[0xFF; 8],
            &[0, 0, 0],
            &[0xFF; 17],
        ] {
            assert_eq!(raw_lower_bound(&encode_bytes(key)), key, "{key:?}");
        }
    }

    #[test]
    fn raw_boundaries_land_where_they_sort() {
        // "m" sorts after every key starting with a byte below 'm' and
        // before encode("m") = 6d 00.. f8: the least key at or above it is "m".
        assert_eq!(raw_lower_bound(b"m"), b"m");
        assert_eq!(raw_lower_bound(b""), b"");
        // One byte above the empty key's encoding.
        assert_eq!(raw_lower_bound(&[0, 0, 0, 0, 0, 0, 0, 0, 0xF8]), [0]);
    }

    fn random_bytes(rng: &mut StdRng, max: usize) -> Vec<u8> {
        let len = rng.random_range(0..=max);
        (0..len)
            .map(|_| match rng.random_range(0..4) {
                0 => 0,
                1 => 0xFF,
                2 => rng.random_range(0xF6..=0xFF),
                _ => rng.random(),
            })
            .collect()
    }

    /// The defining property, against keys near the boundary and random ones.
    #[test]
    fn order_is_preserved_across_the_bound() {
        let mut rng = StdRng::seed_from_u64(7);
        for _ in 0..3_000 {
            let boundary = match rng.random_range(0..3) {
                0 => random_bytes(&mut rng, 30),
                _ => {
                    let mut b = encode_bytes(&random_bytes(&mut rng, 20));
                    let cut = rng.random_range(0..=b.len());
                    b.truncate(cut);
                    b.extend(random_bytes(&mut rng, 4));
                    b
                }
            };
            let bound = raw_lower_bound(&boundary);
            assert!(encode_bytes(&bound) >= boundary, "{boundary:?} → {bound:?}");
            let mut probes = vec![bound.clone()];
            for _ in 0..40 {
                probes.push(random_bytes(&mut rng, 24));
                let mut near = bound.clone();
                match rng.random_range(0..3) {
                    0 => {
                        near.pop();
                    }
                    1 => near.push(rng.random()),
                    _ => {
                        if let Some(last) = near.last_mut() {
                            *last = last.wrapping_sub(1);
                        }
                    }
                }
                probes.push(near);
            }
            for k in probes {
                assert_eq!(
                    encode_bytes(&k) >= boundary,
                    k >= bound,
                    "boundary {boundary:?}, bound {bound:?}, key {k:?}"
                );
            }
        }
    }
}
