//! A seeded PRNG (splitmix64) and a small hash: everything random in the simulation
//! comes from here, so a seed replays exactly.

#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix64(self.0)
    }

    /// Uniform in `0..n` (`n > 0`; the modulo bias is irrelevant here).
    pub fn below(&mut self, n: u64) -> u64 {
        debug_assert!(n > 0);
        self.next_u64() % n
    }

    /// Uniform in `lo..hi` (`lo < hi`).
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo)
    }

    /// True with probability `per_mille / 1000`.
    pub fn chance(&mut self, per_mille: u64) -> bool {
        self.below(1000) < per_mille
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }

    /// An independent stream, so that one concern (say the network) drawing more or
    /// fewer numbers does not shift another's (say the fault schedule).
    pub fn fork(&mut self, salt: u64) -> Rng {
        Rng(self.next_u64() ^ mix64(salt))
    }
}

/// splitmix64's finalizer: a good 64-bit mixing function.
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// An order-sensitive running hash of `u64`s and bytes (deterministic across runs and
/// platforms, unlike `std`'s `RandomState`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Hash(pub u64);

impl Hash {
    pub fn u64(&mut self, value: u64) -> &mut Self {
        self.0 = mix64(self.0 ^ value).wrapping_add(0x9E37_79B9_7F4A_7C15);
        self
    }

    /// The length, then each 8 bytes as a little-endian word (the last one padded
    /// with zeros). Words are taken with `split_first_chunk`, the cheapest way in an
    /// unoptimized build (tests are one, and the simulation hashes every entry and
    /// every state applied).
    pub fn bytes(&mut self, bytes: &[u8]) -> &mut Self {
        self.u64(bytes.len() as u64);
        let mut rest = bytes;
        while let Some((word, tail)) = rest.split_first_chunk::<8>() {
            self.u64(u64::from_le_bytes(*word));
            rest = tail;
        }
        if !rest.is_empty() {
            let mut word = [0u8; 8];
            word[..rest.len()].copy_from_slice(rest);
            self.u64(u64::from_le_bytes(word));
        }
        self
    }
}

pub fn hash_bytes(bytes: &[u8]) -> u64 {
    Hash::default().bytes(bytes).0
}
