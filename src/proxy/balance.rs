//! Picks an endpoint among a cluster's endpoints.
//!
//! Round robin over a shared atomic cursor: no lock and no allocation per pick. Health-aware and
//! latency-aware balancers replace this when discovery and health checking arrive.

use std::sync::atomic::{AtomicUsize, Ordering};

/// Lock-free round-robin cursor.
#[derive(Debug, Default)]
pub struct RoundRobin {
    next: AtomicUsize,
}

impl RoundRobin {
    /// The next item of `items`, or `None` when there are none.
    pub fn pick<'a, T>(&self, items: &'a [T]) -> Option<&'a T> {
        if items.is_empty() {
            return None;
        }
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        items.get(n % items.len())
    }
}

/// Picks among weighted choices in exact proportion to their weights, lock-free.
#[derive(Debug)]
pub struct Weighted {
    /// Running sums of the weights; the choice `i` owns `[cumulative[i-1], cumulative[i])`.
    cumulative: Vec<u64>,
    next: AtomicUsize,
}

impl Weighted {
    /// Builds the picker; `weights` must not all be zero (config validation ensures it).
    pub fn new(weights: impl IntoIterator<Item = u32>) -> Self {
        let mut sum = 0u64;
        let cumulative = weights
            .into_iter()
            .map(|w| {
                sum += u64::from(w);
                sum
            })
            .collect();
        Self {
            cumulative,
            next: AtomicUsize::new(0),
        }
    }

    /// Index of the next choice.
    pub fn pick(&self) -> usize {
        let total = self.cumulative.last().copied().unwrap_or(0);
        if total == 0 || self.cumulative.len() == 1 {
            return 0;
        }
        let n = self.next.fetch_add(1, Ordering::Relaxed) as u64 % total;
        self.cumulative.partition_point(|&c| c <= n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_robin_cycles() {
        let rr = RoundRobin::default();
        let items = [1, 2, 3];
        let picks: Vec<i32> = (0..6).map(|_| *rr.pick(&items).unwrap()).collect();
        assert_eq!(picks, [1, 2, 3, 1, 2, 3]);
        assert!(rr.pick::<i32>(&[]).is_none());
    }

    #[test]
    fn weighted_follows_weights_and_skips_zero() {
        let w = Weighted::new([3, 0, 1]);
        let mut counts = [0; 3];
        for _ in 0..400 {
            counts[w.pick()] += 1;
        }
        assert_eq!(counts, [300, 0, 100]);
    }
}
