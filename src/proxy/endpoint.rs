//! Upstream endpoints and what the proxy knows about each: load, latency, health, ejection and
//! reconnect backoff.
//!
//! An endpoint's object lives as long as discovery keeps returning its address, so its counters,
//! latency estimate, health and ejection history survive endpoint-set changes and config reloads
//! that leave the cluster unchanged. Everything here is updated with atomics on the request path.

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::uri::Authority;
use tokio::time::Instant;

use crate::control::health::Health;
use crate::proxy::clock;
use crate::proxy::outlier::Outlier;
use crate::proxy::pool::Idle;
use crate::proxy::resilience::breaker::CircuitBreaker;
use crate::rng::Rng;

/// How quickly the latency estimate forgets a peak.
const EWMA_DECAY: Duration = Duration::from_secs(2);
/// First wait before reconnecting to an endpoint that refused a connection; doubles per
/// failure in a row, with jitter, up to [`RECONNECT_MAX`].
const RECONNECT_BASE: Duration = Duration::from_millis(100);
/// Longest reconnect backoff.
const RECONNECT_MAX: Duration = Duration::from_secs(10);

/// One upstream endpoint and its live state.
#[derive(Debug)]
pub struct Endpoint {
    /// `host:port` used to connect and as the request authority.
    pub authority: Authority,
    /// Where the endpoint came from: `static` or `dns`.
    pub source: &'static str,
    /// Relative weight.
    pub weight: u32,
    /// Requests sent to this endpoint.
    pub requests: AtomicU64,
    /// Requests on the way now.
    pub in_flight: AtomicU64,
    /// Connection attempts that failed.
    pub connect_failures: AtomicU64,
    /// The endpoint's own circuit breaker, if the cluster keeps them.
    pub breaker: Option<Arc<CircuitBreaker>>,
    epoch: Instant,
    /// Peak-EWMA latency in nanoseconds (f64 bits); 0 until the first sample.
    ewma: AtomicU64,
    /// When `ewma` was last updated, nanoseconds since `epoch`.
    ewma_at: AtomicU64,
    health: AtomicU8,
    /// Outlier detection's streaks and ejection.
    pub outlier: Outlier,
    /// Jitter for the reconnect backoff, shared by the cluster's endpoints.
    rng: Arc<Rng>,
    /// Failed connection attempts in a row.
    connect_streak: AtomicU32,
    /// Nanoseconds since `epoch` before which new connections are not tried while other
    /// endpoints are ready.
    reconnect_at: AtomicU64,
    /// Idle HTTP/1.1 connections to it, per worker.
    pub idle: Idle,
}

impl Endpoint {
    /// A fresh endpoint, with an idle-connection list for each of `workers` workers.
    pub fn new(
        authority: Authority,
        source: &'static str,
        weight: u32,
        breaker: Option<Arc<CircuitBreaker>>,
        rng: Arc<Rng>,
        workers: usize,
    ) -> Self {
        Self {
            authority,
            source,
            weight: weight.max(1),
            requests: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            connect_failures: AtomicU64::new(0),
            breaker,
            epoch: Instant::now(),
            ewma: AtomicU64::new(0),
            ewma_at: AtomicU64::new(0),
            health: AtomicU8::new(Health::Unchecked as u8),
            outlier: Outlier::default(),
            rng,
            connect_streak: AtomicU32::new(0),
            reconnect_at: AtomicU64::new(0),
            idle: Idle::new(workers),
        }
    }

    /// Nanoseconds since the endpoint was created: the clock of its atomics.
    pub fn now(&self) -> u64 {
        (clock::now() - self.epoch).as_nanos() as u64
    }

    /// Marks a request as started; the guard marks it finished when dropped.
    pub fn start(self: &Arc<Self>) -> InFlight {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// Feeds one latency sample (time to response headers) to the peak-EWMA estimate: a sample
    /// above the estimate replaces it at once; lower ones pull it down as time passes.
    pub fn observe_latency(&self, rtt: Duration) {
        let now = self.now();
        let sample = rtt.as_nanos() as f64;
        let prev = f64::from_bits(self.ewma.load(Ordering::Relaxed));
        let next = if prev == 0.0 || sample > prev {
            sample
        } else {
            let elapsed = now.saturating_sub(self.ewma_at.load(Ordering::Relaxed)) as f64;
            let w = (-elapsed / EWMA_DECAY.as_nanos() as f64).exp();
            prev * w + sample * (1.0 - w)
        };
        // Racing updates may lose a sample; the estimate stays a fair one.
        self.ewma.store(next.to_bits(), Ordering::Relaxed);
        self.ewma_at.store(now, Ordering::Relaxed);
    }

    /// The latency estimate, if there has been a sample.
    pub fn latency(&self) -> Option<Duration> {
        let v = f64::from_bits(self.ewma.load(Ordering::Relaxed));
        (v > 0.0).then(|| Duration::from_nanos(v as u64))
    }

    /// The peak-EWMA balancer's cost at `now`: latency × (1 + in-flight ÷ weight). The latency
    /// estimate decays toward zero while no sample arrives, so an endpoint that stopped being
    /// picked after a slow answer gets tried again rather than starved. In-flight counts per
    /// unit of weight: at a split proportional to weight every endpoint costs the same, so the
    /// balancer keeps that split. An endpoint never measured costs as if it were as fast as
    /// `unmeasured` (nanoseconds) so that it gets a first try.
    pub fn cost(&self, now: Instant, unmeasured: f64) -> f64 {
        let ewma = f64::from_bits(self.ewma.load(Ordering::Relaxed));
        let rtt = if ewma > 0.0 {
            let at = self.epoch + Duration::from_nanos(self.ewma_at.load(Ordering::Relaxed));
            let idle = now.saturating_duration_since(at).as_nanos() as f64;
            ewma * (-idle / EWMA_DECAY.as_nanos() as f64).exp()
        } else {
            unmeasured
        };
        rtt * (1.0 + self.in_flight.load(Ordering::Relaxed) as f64 / f64::from(self.weight))
    }

    /// The load balancer's view of the endpoint's load: in-flight per weight.
    pub fn load(&self) -> f64 {
        self.in_flight.load(Ordering::Relaxed) as f64 / f64::from(self.weight)
    }

    /// The active health.
    pub fn health(&self) -> Health {
        match self.health.load(Ordering::Relaxed) {
            1 => Health::Healthy,
            2 => Health::Unhealthy,
            _ => Health::Unchecked,
        }
    }

    /// Sets the active health; returns the previous one.
    pub fn set_health(&self, h: Health) -> Health {
        match self.health.swap(h as u8, Ordering::AcqRel) {
            1 => Health::Healthy,
            2 => Health::Unhealthy,
            _ => Health::Unchecked,
        }
    }

    /// Time left in the current ejection.
    pub fn ejected_for(&self) -> Option<Duration> {
        self.outlier.ejected_for(self.now())
    }

    /// Whether the balancer may pick the endpoint (breakers are asked separately). The clock
    /// is read only while an ejection is recorded.
    pub fn available(&self) -> bool {
        self.health() != Health::Unhealthy && !self.outlier.is_ejected(|| self.now())
    }

    /// Whether the endpoint is available and not waiting out a reconnect backoff. The clock is
    /// read only while an ejection or a backoff is recorded.
    pub fn ready(&self) -> bool {
        if !self.available() {
            return false;
        }
        let at = self.reconnect_at.load(Ordering::Relaxed);
        at == 0 || self.now() >= at
    }

    /// Time left in the reconnect backoff.
    pub fn reconnect_in(&self) -> Option<Duration> {
        let at = self.reconnect_at.load(Ordering::Relaxed);
        let now = self.now();
        (at > now).then(|| Duration::from_nanos(at - now))
    }

    /// Notes whether a connection could be made: failures in a row push the next attempt back
    /// by a jittered exponential backoff (50–100% of 100 ms × 2^(n−1), at most 10 s).
    pub fn connected(&self, ok: bool) {
        if ok {
            if self.connect_streak.swap(0, Ordering::Relaxed) != 0 {
                self.reconnect_at.store(0, Ordering::Relaxed);
            }
            return;
        }
        let n = self.connect_streak.fetch_add(1, Ordering::Relaxed).min(16);
        let cap = RECONNECT_BASE.saturating_mul(1 << n).min(RECONNECT_MAX);
        let wait = cap.mul_f64(0.5 + 0.5 * self.rng.f64());
        self.reconnect_at
            .store(self.now() + wait.as_nanos() as u64, Ordering::Relaxed);
    }
}

/// Decrements an endpoint's in-flight count when dropped.
#[derive(Debug)]
pub struct InFlight(Arc<Endpoint>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep() -> Endpoint {
        Endpoint::new(
            "127.0.0.1:1".parse().unwrap(),
            "static",
            1,
            None,
            Arc::new(Rng::with_seed(1)),
            1,
        )
    }

    #[tokio::test(start_paused = true)]
    async fn peak_ewma_jumps_to_peaks_and_decays_slowly() {
        let e = ep();
        e.observe_latency(Duration::from_millis(10));
        assert_eq!(e.latency(), Some(Duration::from_millis(10)));
        e.observe_latency(Duration::from_millis(100));
        assert_eq!(
            e.latency(),
            Some(Duration::from_millis(100)),
            "peaks count at once"
        );
        tokio::time::advance(EWMA_DECAY).await;
        e.observe_latency(Duration::from_millis(10));
        let l = e.latency().unwrap();
        // One decay period keeps e^-1 of the peak.
        assert!(
            l > Duration::from_millis(40) && l < Duration::from_millis(45),
            "{l:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn refused_connections_back_off_exponentially_with_jitter() {
        let e = ep();
        e.connected(false);
        assert!(e.available() && !e.ready());
        let first = e.reconnect_in().unwrap();
        assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
        e.connected(false);
        let second = e.reconnect_in().unwrap();
        assert!(second >= Duration::from_millis(100) && second <= Duration::from_millis(200));
        tokio::time::advance(Duration::from_millis(200)).await;
        assert!(e.ready());
        e.connected(false);
        e.connected(true);
        assert!(e.ready(), "a connection resets the backoff");
    }
}
