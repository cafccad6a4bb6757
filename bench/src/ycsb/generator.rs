//! YCSB's number generators, as its Java code defines them (`site.ycsb.generator`):
//! FNV-1a-64 hashing, Zipfian (with the precomputed zeta of 10^10 items at θ 0.99),
//! ScrambledZipfian, SkewedLatest over an acknowledged-insert counter, uniform and
//! discrete choices. Randomness comes from a seeded `SmallRng` per client thread.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use rand::rngs::SmallRng;
use rand::Rng;

const FNV_OFFSET_BASIS_64: u64 = 0xCBF2_9CE4_8422_2325;
const FNV_PRIME_64: u64 = 1_099_511_628_211;

/// `Utils.fnvhash64`: FNV over the 8 bytes of `value` (low byte first), as a
/// non-negative Java long (`Math.abs`, which leaves `Long.MIN_VALUE` negative).
pub fn fnv_hash64(value: i64) -> i64 {
    let mut hash = FNV_OFFSET_BASIS_64;
    let mut value = value;
    for _ in 0..8 {
        let octet = (value & 0xff) as u64;
        value >>= 8;
        hash ^= octet;
        hash = hash.wrapping_mul(FNV_PRIME_64);
    }
    (hash as i64).wrapping_abs()
}

/// `CoreWorkload.buildKeyName` with `insertorder=hashed` and `zeropadding=1`.
pub fn key_name(keynum: i64, hashed: bool) -> String {
    let keynum = if hashed { fnv_hash64(keynum) } else { keynum };
    format!("user{keynum}")
}

/// YCSB's Zipfian constant and the zeta of its 10^10 items (`ZipfianGenerator`).
pub const ZIPFIAN_CONSTANT: f64 = 0.99;
pub const ZETAN_10E10: f64 = 26.469_028_201_783_02;
pub const SCRAMBLED_ITEM_COUNT: i64 = 10_000_000_000;

/// ζ(n, θ) = Σ_{i=1..n} 1/i^θ, continued from `st` items already summed into `initial`.
fn zeta(st: i64, n: i64, theta: f64, initial: f64) -> f64 {
    let mut sum = initial;
    for i in st..n {
        sum += 1.0 / ((i + 1) as f64).powf(theta);
    }
    sum
}

/// `ZipfianGenerator`: popular items first, item `min` the most popular.
#[derive(Debug, Clone)]
pub struct Zipfian {
    base: i64,
    items: i64,
    theta: f64,
    zeta2theta: f64,
    alpha: f64,
    zetan: f64,
    eta: f64,
    count_for_zeta: i64,
}

impl Zipfian {
    /// Items `min..=max`; `zetan` when known (it is costly for many items).
    pub fn new(min: i64, max: i64, theta: f64, zetan: Option<f64>) -> Self {
        let items = max - min + 1;
        let zeta2theta = zeta(0, 2, theta, 0.0);
        let zetan = zetan.unwrap_or_else(|| zeta(0, items, theta, 0.0));
        let mut zipfian = Zipfian {
            base: min,
            items,
            theta,
            zeta2theta,
            alpha: 1.0 / (1.0 - theta),
            zetan,
            eta: 0.0,
            count_for_zeta: items,
        };
        zipfian.eta = zipfian.eta_for(items);
        zipfian
    }

    fn eta_for(&self, items: i64) -> f64 {
        (1.0 - (2.0 / items as f64).powf(1.0 - self.theta)) / (1.0 - self.zeta2theta / self.zetan)
    }

    /// `nextLong(itemcount)` for a uniform draw `u` in [0, 1). The item count may
    /// grow (SkewedLatest): zeta is then extended incrementally, as YCSB does.
    pub fn next_with(&mut self, item_count: i64, u: f64) -> i64 {
        if item_count > self.count_for_zeta {
            self.zetan = zeta(self.count_for_zeta, item_count, self.theta, self.zetan);
            self.count_for_zeta = item_count;
            self.eta = self.eta_for(item_count);
        }
        let uz = u * self.zetan;
        if uz < 1.0 {
            return self.base;
        }
        if uz < 1.0 + 0.5f64.powf(self.theta) {
            return self.base + 1;
        }
        self.base + (item_count as f64 * (self.eta * u - self.eta + 1.0).powf(self.alpha)) as i64
    }

    pub fn next(&mut self, rng: &mut SmallRng) -> i64 {
        let u: f64 = rng.gen();
        self.next_with(self.items, u)
    }
}

/// `ScrambledZipfianGenerator(min, max)`: Zipfian over 10^10 items, hashed into
/// `min..=max`, so popular items are spread over the key space.
#[derive(Debug, Clone)]
pub struct ScrambledZipfian {
    min: i64,
    item_count: i64,
    zipfian: Zipfian,
}

impl ScrambledZipfian {
    pub fn new(min: i64, max: i64) -> Self {
        ScrambledZipfian {
            min,
            item_count: max - min + 1,
            zipfian: Zipfian::new(0, SCRAMBLED_ITEM_COUNT, ZIPFIAN_CONSTANT, Some(ZETAN_10E10)),
        }
    }

    pub fn next_with(&mut self, u: f64) -> i64 {
        let raw = self.zipfian.next_with(self.zipfian.items, u);
        self.min + fnv_hash64(raw) % self.item_count
    }

    pub fn next(&mut self, rng: &mut SmallRng) -> i64 {
        let u: f64 = rng.gen();
        self.next_with(u)
    }
}

/// `AcknowledgedCounterGenerator`: hands out insert key numbers; `last` is the
/// highest number below which every insert was acknowledged, so readers never
/// choose a key whose insert has not completed.
#[derive(Debug)]
pub struct AcknowledgedCounter {
    next: AtomicU64,
    state: Mutex<(u64, BTreeSet<u64>)>,
}

impl AcknowledgedCounter {
    /// Numbers `start..` are handed out; `start - 1` is the first `last`.
    pub fn new(start: u64) -> Self {
        AcknowledgedCounter {
            next: AtomicU64::new(start),
            state: Mutex::new((start.saturating_sub(1), BTreeSet::new())),
        }
    }

    pub fn next(&self) -> u64 {
        self.next.fetch_add(1, Ordering::Relaxed)
    }

    pub fn acknowledge(&self, value: u64) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (limit, pending) = &mut *state;
        pending.insert(value);
        while pending.remove(&(*limit + 1)) {
            *limit += 1;
        }
    }

    pub fn last(&self) -> u64 {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).0
    }
}

/// `SkewedLatestGenerator`: the most recently inserted keys are the most popular.
#[derive(Debug, Clone)]
pub struct SkewedLatest {
    zipfian: Zipfian,
}

impl SkewedLatest {
    pub fn new(last: i64) -> Self {
        SkewedLatest {
            zipfian: Zipfian::new(0, last.max(1) - 1, ZIPFIAN_CONSTANT, None),
        }
    }

    pub fn next_with(&mut self, last: i64, u: f64) -> i64 {
        last - self.zipfian.next_with(last.max(1), u)
    }
}

/// `DiscreteGenerator`: one of the values, with probability proportional to its weight.
#[derive(Debug, Clone)]
pub struct Discrete<T: Copy> {
    choices: Vec<(f64, T)>,
    total: f64,
}

impl<T: Copy> Discrete<T> {
    pub fn new(choices: Vec<(f64, T)>) -> Self {
        let choices: Vec<(f64, T)> = choices.into_iter().filter(|(w, _)| *w > 0.0).collect();
        let total = choices.iter().map(|(w, _)| w).sum();
        Discrete { choices, total }
    }

    pub fn is_empty(&self) -> bool {
        self.choices.is_empty()
    }

    pub fn next_with(&self, u: f64) -> Option<T> {
        let mut point = u * self.total;
        for (weight, value) in &self.choices {
            if point < *weight {
                return Some(*value);
            }
            point -= weight;
        }
        self.choices.last().map(|(_, v)| *v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv_matches_ycsb_and_builds_its_keys() {
        // Values of YCSB's Utils.fnvhash64, computed with Java long arithmetic.
        assert_eq!(fnv_hash64(0), 6_284_781_860_667_377_211);
        assert_eq!(fnv_hash64(1), 8_517_097_267_634_966_620);
        assert_eq!(fnv_hash64(2), 1_820_151_046_732_198_393);
        assert_eq!(fnv_hash64(1000), 5_952_875_239_596_136_740);
        assert_eq!(fnv_hash64(99_999), 7_592_201_923_306_675_823);
        assert_eq!(key_name(0, true), "user6284781860667377211");
        assert_eq!(key_name(7, false), "user7");
    }

    #[test]
    fn zipfian_draws_match_the_formula_for_fixed_draws() {
        // ZipfianGenerator(0, 10^10, 0.99, ZETAN) at fixed u, computed from YCSB's
        // nextLong: u·ζn < 1 → 0; < 1 + 0.5^θ → 1; else n·(ηu − η + 1)^α.
        let mut zipfian =
            Zipfian::new(0, SCRAMBLED_ITEM_COUNT, ZIPFIAN_CONSTANT, Some(ZETAN_10E10));
        let n = SCRAMBLED_ITEM_COUNT + 1;
        let expected = [
            (0.01, 0),
            (0.03, 0),
            (0.05, 1),
            (0.2, 83),
            (0.5, 134_552),
            (0.9, 1_170_869_537),
            (0.999, 9_790_013_524),
        ];
        for (u, value) in expected {
            assert_eq!(zipfian.next_with(n, u), value, "u = {u}");
        }
    }

    #[test]
    fn zeta_is_computed_and_extended_incrementally() {
        let direct: f64 = (1..=1000).map(|i| 1.0 / (i as f64).powf(0.99)).sum();
        let zipfian = Zipfian::new(0, 999, 0.99, None);
        assert!((zipfian.zetan - direct).abs() < 1e-9);
        assert!((zipfian.zetan - 7.728_953_217_284_729).abs() < 1e-9);
        let mut latest = SkewedLatest::new(1000);
        assert_eq!(latest.next_with(1000, 0.1), 1000);
        assert_eq!(latest.next_with(1000, 0.5), 1000 - 22);
        assert_eq!(latest.next_with(1000, 0.9), 1000 - 471);
        assert_eq!(latest.next_with(1000, 0.99), 1000 - 927);
        // More items: zeta grows by the new terms only.
        latest.next_with(2000, 0.5);
        let direct: f64 = (1..=2000).map(|i| 1.0 / (i as f64).powf(0.99)).sum();
        assert!((latest.zipfian.zetan - direct).abs() < 1e-9);
    }

    #[test]
    fn scrambled_zipfian_stays_in_range_and_is_skewed() {
        use rand::SeedableRng;
        let mut rng = SmallRng::seed_from_u64(7);
        let mut gen = ScrambledZipfian::new(0, 999);
        let mut counts = vec![0u32; 1000];
        for _ in 0..100_000 {
            let k = gen.next(&mut rng);
            assert!((0..1000).contains(&k));
            counts[k as usize] += 1;
        }
        // The hottest item is fnv(0) % 1000 and takes about 1/ζ(10^10) ≈ 3.8 %.
        let hottest = (fnv_hash64(0) % 1000) as usize;
        let share = counts[hottest] as f64 / 100_000.0;
        assert!((0.03..0.05).contains(&share), "share {share}");
        assert_eq!(gen.next_with(0.01), fnv_hash64(0) % 1000);
    }

    #[test]
    fn acknowledged_counter_advances_only_over_contiguous_acks() {
        let counter = AcknowledgedCounter::new(100);
        assert_eq!(counter.last(), 99);
        let (a, b, c) = (counter.next(), counter.next(), counter.next());
        assert_eq!((a, b, c), (100, 101, 102));
        counter.acknowledge(b);
        assert_eq!(counter.last(), 99, "100 not acknowledged yet");
        counter.acknowledge(a);
        assert_eq!(counter.last(), 101);
        counter.acknowledge(c);
        assert_eq!(counter.last(), 102);
    }

    #[test]
    fn discrete_follows_its_weights() {
        let choice = Discrete::new(vec![(0.5, 'r'), (0.0, 'x'), (0.5, 'u')]);
        assert_eq!(choice.next_with(0.1), Some('r'));
        assert_eq!(choice.next_with(0.6), Some('u'));
        assert_eq!(choice.next_with(0.999_999), Some('u'));
        assert!(Discrete::<char>::new(vec![(0.0, 'x')]).is_empty());
    }
}
