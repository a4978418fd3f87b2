//! Randomness handed down, never drawn from a global: jitter, hedging bases, fault injection and
//! rate-limit hashing all draw from an [`Rng`] they were given.
//!
//! The generator is SplitMix64 over one atomic word: lock-free, shareable between threads, cheap
//! enough for the request path (one `fetch_add` and a few multiplications), and seedable, so a
//! test or a simulation that seeds the root gets the same draws in the same order. It is not for
//! secrets.

use std::sync::atomic::{AtomicU64, Ordering};

/// SplitMix64's increment (the golden ratio in 64 bits).
const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// A seedable, thread-safe source of random numbers.
#[derive(Debug)]
pub struct Rng {
    state: AtomicU64,
}

impl Rng {
    /// A generator whose draws follow from `seed`.
    pub fn with_seed(seed: u64) -> Self {
        Self {
            state: AtomicU64::new(seed),
        }
    }

    /// A generator seeded from the operating system's entropy (through the standard library's
    /// randomly keyed hasher), for production use.
    pub fn from_entropy() -> Self {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(std::process::id().into());
        Self::with_seed(h.finish())
    }

    /// A new generator seeded from this one: components get their own stream, so the draws of
    /// one do not shift those of another.
    pub fn fork(&self) -> Self {
        Self::with_seed(self.u64())
    }

    /// A uniformly distributed 64-bit number.
    pub fn u64(&self) -> u64 {
        let mut z = self
            .state
            .fetch_add(GAMMA, Ordering::Relaxed)
            .wrapping_add(GAMMA);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `[0, 1)`.
    pub fn f64(&self) -> f64 {
        (self.u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// A number in `[0, n)` (0 when `n` is 0).
    pub fn below(&self, n: u64) -> u64 {
        if n == 0 {
            return 0;
        }
        // Lemire's multiply-shift: unbiased enough for jitter and shares.
        ((u128::from(self.u64()) * u128::from(n)) >> 64) as u64
    }
}

/// A generator with the fixed seed 0: reproducible, for tests and tools.
impl Default for Rng {
    fn default() -> Self {
        Self::with_seed(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_draws_and_floats_stay_in_range() {
        let (a, b) = (Rng::with_seed(7), Rng::with_seed(7));
        for _ in 0..1000 {
            assert_eq!(a.u64(), b.u64());
            let f = a.f64();
            b.f64();
            assert!((0.0..1.0).contains(&f));
            assert!(a.below(10) < 10);
            b.below(10);
        }
        assert_ne!(Rng::with_seed(1).u64(), Rng::with_seed(2).u64());
        let forked = a.fork();
        assert_ne!(forked.u64(), a.u64());
    }

    #[test]
    fn draws_spread_over_the_range() {
        let r = Rng::with_seed(42);
        let mut buckets = [0u32; 10];
        for _ in 0..10_000 {
            buckets[r.below(10) as usize] += 1;
        }
        assert!(
            buckets.iter().all(|&n| (800..1200).contains(&n)),
            "{buckets:?}"
        );
    }
}
