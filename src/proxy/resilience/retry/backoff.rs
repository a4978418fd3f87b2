//! Exponential backoff with full jitter: the wait before retry `n` is uniform in
//! `[0, min(max, base × 2^(n-1))]` (AWS Architecture Blog, "Exponential Backoff And Jitter"), so
//! that clients who failed together do not retry together.

use std::time::Duration;

/// Backoff settings, checked when built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    base: Duration,
    max: Duration,
}

impl Backoff {
    /// A backoff from `base` doubling up to `max`; `None` if `max < base`.
    pub fn new(base: Duration, max: Duration) -> Option<Self> {
        (max >= base).then_some(Self { base, max })
    }

    /// A backoff from `base` doubling up to `max`, raising `max` to `base` if it is below.
    pub fn clamped(base: Duration, max: Duration) -> Self {
        Self {
            base,
            max: max.max(base),
        }
    }

    /// The wait before retry number `retry` (1 for the first retry), given a uniform `unit` in
    /// [0, 1) — randomness is passed in so that tests are exact.
    pub fn delay(&self, retry: u32, unit: f64) -> Duration {
        let cap = self
            .base
            .saturating_mul(1u32 << retry.saturating_sub(1).min(20))
            .min(self.max);
        cap.mul_f64(unit.clamp(0.0, 1.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_double_then_stop_at_max() {
        let b = Backoff::new(Duration::from_millis(25), Duration::from_millis(250)).unwrap();
        let top = 0.999_999;
        assert!(b.delay(1, top) <= Duration::from_millis(25));
        assert!(b.delay(2, top) > Duration::from_millis(49));
        assert!(b.delay(3, top) > Duration::from_millis(99));
        assert!(b.delay(5, top) <= Duration::from_millis(250));
        assert!(b.delay(30, top) <= Duration::from_millis(250));
        assert_eq!(b.delay(4, 0.0), Duration::ZERO);
        assert_eq!(b.delay(2, 0.5), Duration::from_millis(25));
        assert!(Backoff::new(Duration::from_secs(2), Duration::from_secs(1)).is_none());
    }
}
