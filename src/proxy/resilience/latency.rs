//! A cluster's recent latency distribution, for hedging after a percentile (`hedge.after: p95`).
//!
//! Lock-free: samples land in logarithmic buckets of two alternating windows; a percentile reads
//! the previous full window and the current one, so it reflects roughly the last two periods.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use crate::proxy::clock;

/// Buckets grow by 2^(1/4) from 100 µs: 64 buckets reach about 6.5 s.
const BUCKETS: usize = 64;
const FIRST_MICROS: f64 = 100.0;
const GROWTH: f64 = 1.189_207_115; // 2^(1/4)
/// Length of one window.
const PERIOD: Duration = Duration::from_secs(10);
/// Samples needed before a percentile is trusted; below it, no hedge delay is known.
const MIN_SAMPLES: u64 = 20;

/// Recent latencies of a cluster's tries (time to response headers).
#[derive(Debug)]
pub struct LatencyWindow {
    epoch: Instant,
    windows: [Window; 2],
}

#[derive(Debug)]
struct Window {
    /// Index of the period this window holds.
    period: AtomicU64,
    counts: [AtomicU64; BUCKETS],
}

impl Default for LatencyWindow {
    fn default() -> Self {
        Self::new()
    }
}

impl LatencyWindow {
    /// An empty window.
    pub fn new() -> Self {
        Self {
            epoch: Instant::now(),
            windows: [Window::new(0), Window::new(u64::MAX)],
        }
    }

    fn period(&self) -> u64 {
        ((clock::now() - self.epoch).as_millis() / PERIOD.as_millis()) as u64
    }

    /// Records one sample.
    pub fn record(&self, d: Duration) {
        let p = self.period();
        let w = &self.windows[(p % 2) as usize];
        let seen = w.period.load(Ordering::Acquire);
        if seen != p
            && w.period
                .compare_exchange(seen, p, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            for c in &w.counts {
                c.store(0, Ordering::Relaxed);
            }
        }
        w.counts[bucket(d)].fetch_add(1, Ordering::Relaxed);
    }

    /// The `pct` percentile (0–100) of recent samples, if there are enough.
    pub fn percentile(&self, pct: f64) -> Option<Duration> {
        let p = self.period();
        let mut counts = [0u64; BUCKETS];
        for w in &self.windows {
            let wp = w.period.load(Ordering::Acquire);
            if wp == p || wp.wrapping_add(1) == p {
                for (i, c) in w.counts.iter().enumerate() {
                    counts[i] += c.load(Ordering::Relaxed);
                }
            }
        }
        let total: u64 = counts.iter().sum();
        if total < MIN_SAMPLES {
            return None;
        }
        let rank = ((pct / 100.0) * total as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some(upper_bound(i));
            }
        }
        Some(upper_bound(BUCKETS - 1))
    }
}

impl Window {
    fn new(period: u64) -> Self {
        Self {
            period: AtomicU64::new(period),
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

fn bucket(d: Duration) -> usize {
    let us = d.as_secs_f64() * 1e6;
    if us <= FIRST_MICROS {
        return 0;
    }
    let i = ((us / FIRST_MICROS).ln() / GROWTH.ln()).ceil() as usize;
    i.min(BUCKETS - 1)
}

fn upper_bound(i: usize) -> Duration {
    Duration::from_secs_f64(FIRST_MICROS * GROWTH.powi(i as i32) / 1e6)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn percentile_tracks_the_tail_within_a_bucket() {
        let w = LatencyWindow::new();
        assert_eq!(w.percentile(95.0), None);
        for i in 0..100u64 {
            let d = if i < 95 {
                Duration::from_millis(10)
            } else {
                Duration::from_secs(1)
            };
            w.record(d);
        }
        let p90 = w.percentile(90.0).unwrap();
        assert!(
            p90 >= Duration::from_millis(10) && p90 < Duration::from_millis(13),
            "{p90:?}"
        );
        let p99 = w.percentile(99.0).unwrap();
        assert!(
            p99 >= Duration::from_secs(1) && p99 < Duration::from_millis(1200),
            "{p99:?}"
        );
        // Two periods later the old samples are gone.
        tokio::time::advance(PERIOD * 2).await;
        assert_eq!(w.percentile(95.0), None);
    }

    #[tokio::test(start_paused = true)]
    async fn no_percentile_before_twenty_samples_and_the_previous_period_still_counts() {
        let w = LatencyWindow::new();
        for _ in 0..19 {
            w.record(Duration::from_millis(5));
        }
        assert_eq!(w.percentile(50.0), None, "19 samples");
        // One period later the earlier samples still count, with the new one they are 20.
        tokio::time::advance(PERIOD).await;
        w.record(Duration::from_millis(5));
        let p50 = w.percentile(50.0).unwrap();
        assert!(
            p50 >= Duration::from_millis(5) && p50 < Duration::from_millis(6),
            "{p50:?}"
        );
    }
}
