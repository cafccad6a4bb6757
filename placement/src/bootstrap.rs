//! Cluster bootstrap: the initial ranges, where their replicas go, and split keys that
//! cut YCSB's key space evenly.

use rangekv_rpc::proto::{Peer, PeerRole, RangeEpoch};
use rangekv_rpc::validate::Invalid;
use rangekv_rpc::RangeDescriptor;
use rangekv_types::{limits, StoreId};

/// Most ranges a cluster may be bootstrapped with.
pub const INITIAL_RANGES_MAX: usize = 65_536;
/// Most replicas per range.
pub const REPLICAS_MAX: usize = 7;
/// The epoch of every range created at bootstrap.
pub const BOOTSTRAP_EPOCH: RangeEpoch = RangeEpoch {
    conf_ver: 1,
    version: 1,
};

/// Split keys checked for bootstrap: non-empty, each at most
/// [`limits::KEY_BYTES_MAX`] bytes, strictly increasing, fewer than
/// [`INITIAL_RANGES_MAX`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SplitKeys(Vec<Vec<u8>>);

impl SplitKeys {
    pub fn new(keys: Vec<Vec<u8>>) -> Result<Self, Invalid> {
        if keys.len() >= INITIAL_RANGES_MAX {
            return Err(Invalid {
                limit: format!("initial_ranges_max={INITIAL_RANGES_MAX}"),
                message: format!("{} split keys make {} ranges", keys.len(), keys.len() + 1),
            });
        }
        for (index, key) in keys.iter().enumerate() {
            if key.is_empty() {
                return Err(Invalid {
                    limit: "split_key_bytes_min=1".into(),
                    message: format!("split key {index} is empty"),
                });
            }
            if key.len() > limits::KEY_BYTES_MAX {
                return Err(Invalid {
                    limit: format!("key_bytes_max={}", limits::KEY_BYTES_MAX),
                    message: format!("split key {index} has {} bytes", key.len()),
                });
            }
        }
        if let Some(index) = keys.windows(2).position(|pair| pair[0] >= pair[1]) {
            return Err(Invalid {
                limit: "split keys strictly increasing".into(),
                message: format!(
                    "split key {} ({}) is not above split key {index} ({})",
                    index + 1,
                    printable(&keys[index + 1]),
                    printable(&keys[index]),
                ),
            });
        }
        Ok(SplitKeys(keys))
    }

    pub fn keys(&self) -> &[Vec<u8>] {
        &self.0
    }

    /// How many ranges bootstrap creates.
    pub fn range_count(&self) -> usize {
        self.0.len() + 1
    }
}

/// Checks the replica count: 1 to [`REPLICAS_MAX`].
pub fn check_replicas(replicas: usize) -> Result<(), Invalid> {
    if replicas == 0 || replicas > REPLICAS_MAX {
        return Err(Invalid {
            limit: format!("replicas in 1..={REPLICAS_MAX}"),
            message: format!("replicas is {replicas}"),
        });
    }
    Ok(())
}

/// How many ids [`plan`] consumes: one per range and one per replica.
pub fn ids_needed(split_keys: &SplitKeys, replicas: usize) -> u64 {
    (split_keys.range_count() * (1 + replicas)) as u64
}

/// The bootstrap ranges: one per gap between split keys, covering `["", +inf)`, each
/// with a voter on every store of `stores`, ids taken in order from `first_id`
/// (a range's id, then its peers' ids).
pub fn plan(split_keys: &SplitKeys, stores: &[StoreId], first_id: u64) -> Vec<RangeDescriptor> {
    assert!(
        first_id != 0,
        "bootstrap ids come from a reserved, non-zero block"
    );
    let mut next = first_id;
    let mut next_id = || {
        let id = next;
        next += 1;
        id
    };
    let bounds: Vec<&[u8]> = std::iter::once(&[][..])
        .chain(split_keys.keys().iter().map(Vec::as_slice))
        .chain(std::iter::once(&[][..]))
        .collect();
    bounds
        .windows(2)
        .map(|span| RangeDescriptor {
            range_id: next_id(),
            start_key: span[0].to_vec().into(),
            end_key: span[1].to_vec().into(),
            epoch: Some(BOOTSTRAP_EPOCH),
            replicas: stores
                .iter()
                .map(|store| Peer {
                    peer_id: next_id(),
                    store_id: store.get(),
                    role: PeerRole::Voter as i32,
                })
                .collect(),
        })
        .collect()
}

/// The prefix of every YCSB key.
pub const YCSB_KEY_PREFIX: &str = "user";

/// `ranges - 1` split keys that cut YCSB's key space into `ranges` parts of nearly equal
/// size. A YCSB key is `"user"` followed by the decimal form of a 63-bit FNV-1a hash
/// (uniform over `[0, 2^63)`); keys sort by bytes, so `"user2"` sorts above
/// `"user19..."`. Split key `i` is the key of the `i * 2^63 / ranges`-th number in that
/// byte order, so each part holds `2^63 / ranges` numbers, give or take one.
pub fn ycsb_split_keys(ranges: usize) -> Vec<Vec<u8>> {
    let numbers: u128 = 1 << 63;
    let ranges = ranges.max(1) as u128;
    (1..ranges)
        .map(|part| {
            let rank = part * numbers / ranges;
            let mut key = YCSB_KEY_PREFIX.as_bytes().to_vec();
            key.extend_from_slice(nth_in_byte_order(rank, numbers - 1).to_string().as_bytes());
            key
        })
        .collect()
}

/// The `rank`-th (from 0) number of `0..=max` when the numbers are ordered by their
/// decimal strings.
fn nth_in_byte_order(rank: u128, max: u128) -> u128 {
    assert!(rank <= max, "rank {rank} lies within 0..={max}");
    // "0" sorts first; the rest is a walk of the decimal trie of 1..=max.
    if rank == 0 {
        return 0;
    }
    let mut remaining = rank - 1;
    let mut current: u128 = 1;
    while remaining > 0 {
        let below = numbers_with_prefix(current, max);
        if below <= remaining {
            // Skip `current` and all its extensions.
            remaining -= below;
            current += 1;
        } else {
            // Descend: the next number in byte order is `current` followed by a 0.
            remaining -= 1;
            current *= 10;
        }
    }
    current
}

/// How many numbers of `1..=max` have a decimal form starting with that of `prefix`.
fn numbers_with_prefix(prefix: u128, max: u128) -> u128 {
    let mut count = 0;
    let (mut first, mut last) = (prefix, prefix);
    while first <= max {
        count += last.min(max) - first + 1;
        first *= 10;
        last = last * 10 + 9;
    }
    count
}

/// A key for messages: as text when it is printable ASCII, else hex.
pub(crate) fn printable(key: &[u8]) -> String {
    if key.iter().all(|byte| byte.is_ascii_graphic()) {
        format!("{:?}", String::from_utf8_lossy(key))
    } else {
        let hex: String = key.iter().map(|byte| format!("{byte:02x}")).collect();
        format!("0x{hex}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(keys: &[&str]) -> Vec<Vec<u8>> {
        keys.iter().map(|key| key.as_bytes().to_vec()).collect()
    }

    #[test]
    fn split_keys_must_be_non_empty_bounded_and_strictly_increasing() {
        assert_eq!(SplitKeys::new(keys(&["b", "m"])).unwrap().range_count(), 3);
        assert_eq!(SplitKeys::new(Vec::new()).unwrap().range_count(), 1);
        let empty = SplitKeys::new(keys(&["b", ""])).unwrap_err();
        assert!(empty.message.contains("split key 1 is empty"), "{empty}");
        let unsorted = SplitKeys::new(keys(&["m", "b"])).unwrap_err();
        assert!(
            unsorted.to_string().contains("strictly increasing"),
            "{unsorted}"
        );
        let duplicate = SplitKeys::new(keys(&["b", "b"])).unwrap_err();
        assert!(duplicate.message.contains("\"b\""), "{duplicate}");
        let long = SplitKeys::new(vec![vec![b'k'; limits::KEY_BYTES_MAX + 1]]).unwrap_err();
        assert!(long.limit.starts_with("key_bytes_max="), "{long}");
        let many = SplitKeys::new(vec![b"k".to_vec(); INITIAL_RANGES_MAX]).unwrap_err();
        assert!(many.limit.starts_with("initial_ranges_max="), "{many}");
        assert!(check_replicas(0).is_err() && check_replicas(REPLICAS_MAX + 1).is_err());
        assert!(check_replicas(3).is_ok());
    }

    #[test]
    fn plan_covers_the_keyspace_with_fresh_ids() {
        let split = SplitKeys::new(keys(&["g", "p"])).unwrap();
        let stores = [StoreId(1), StoreId(2), StoreId(3)];
        let ranges = plan(&split, &stores, 10);
        assert_eq!(ranges.len(), 3);
        assert_eq!(
            ranges
                .iter()
                .map(|r| (&r.start_key[..], &r.end_key[..]))
                .collect::<Vec<_>>(),
            [(&b""[..], &b"g"[..]), (b"g", b"p"), (b"p", b"")]
        );
        let mut ids: Vec<u64> = ranges
            .iter()
            .flat_map(|r| std::iter::once(r.range_id).chain(r.replicas.iter().map(|p| p.peer_id)))
            .collect();
        assert_eq!(ids.len() as u64, ids_needed(&split, 3));
        ids.sort_unstable();
        assert_eq!(ids, (10..22).collect::<Vec<_>>());
        for range in &ranges {
            assert_eq!(range.epoch, Some(BOOTSTRAP_EPOCH));
            let on: Vec<u64> = range.replicas.iter().map(|p| p.store_id).collect();
            assert_eq!(on, [1, 2, 3]);
        }
    }

    #[test]
    fn nth_in_byte_order_matches_sorting_the_strings() {
        for max in [0u128, 1, 9, 10, 11, 99, 100, 101, 345, 1000] {
            let mut strings: Vec<String> = (0..=max).map(|n| n.to_string()).collect();
            strings.sort();
            for (rank, string) in strings.iter().enumerate() {
                assert_eq!(nth_in_byte_order(rank as u128, max).to_string(), *string);
            }
        }
    }

    /// YCSB's FNV-1a over the 8 bytes of the key number, made non-negative.
    fn ycsb_hash(number: u64) -> u64 {
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for byte in number.to_le_bytes() {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
        (hash as i64).unsigned_abs() & (u64::MAX >> 1)
    }

    fn splitmix64(state: &mut u64) -> u64 {
        *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = *state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn assert_even(split: &[Vec<u8>], ranges: usize, numbers: impl Iterator<Item = u64>) {
        let mut counts = vec![0usize; ranges];
        let mut total = 0;
        for number in numbers {
            let key = format!("{YCSB_KEY_PREFIX}{number}").into_bytes();
            counts[split.partition_point(|split_key| *split_key <= key)] += 1;
            total += 1;
        }
        let expected = total as f64 / ranges as f64;
        for (part, &count) in counts.iter().enumerate() {
            let deviation = (count as f64 - expected).abs() / expected;
            assert!(
                deviation < 0.1,
                "part {part} holds {count} keys, expected about {expected} ({counts:?})"
            );
        }
    }

    #[test]
    fn ycsb_split_keys_cut_random_keys_evenly() {
        for ranges in [2, 3, 7, 16, 64] {
            let split = ycsb_split_keys(ranges);
            assert_eq!(split.len(), ranges - 1);
            SplitKeys::new(split.clone()).expect("split keys are valid");
            assert!(split.iter().all(|key| key.starts_with(b"user")));
            let mut seed = ranges as u64;
            let uniform = (0..200_000).map(|_| splitmix64(&mut seed) >> 1);
            assert_even(&split, ranges, uniform);
            assert_even(&split, ranges, (0..200_000).map(ycsb_hash));
        }
        assert!(ycsb_split_keys(1).is_empty() && ycsb_split_keys(0).is_empty());
    }

    #[test]
    fn ycsb_split_keys_are_mostly_19_digit_numbers() {
        // 2^63 ≈ 9.22e18: about 89% of hashes have 19 digits, so a 2-way cut lands
        // inside the 19-digit numbers starting with "5".
        let split = ycsb_split_keys(2);
        let digits = std::str::from_utf8(&split[0][4..]).unwrap();
        assert!(digits.starts_with('5') && digits.len() == 19, "{digits}");
    }
}
