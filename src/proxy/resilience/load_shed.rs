//! Load shedding on the inbound side: an adaptive concurrency limit plus queue-time shedding, so
//! that under overload the service keeps its goodput and latency instead of collapsing.
//!
//! The limit follows the latency of the requests it admits, against the minimum round-trip time
//! seen over a recent window (the latency without queueing; as Envoy's adaptive concurrency and
//! TCP Vegas use it — an average would drift up with the queue it should detect). `gradient`
//! compares that minimum times `tolerance` (default 1.2) to the recent average: while latency
//! stays within it the limit grows by about its square root; beyond it the limit shrinks in
//! proportion. `aimd`
//! adds one per limit's worth of fast answers and cuts by 10% when an answer takes more than twice
//! the minimum. Requests over the limit wait in a queue ordered by priority (header, `0`
//! highest, `9` lowest, `5` when absent) for at most `queue_timeout`; a full queue makes room by
//! dropping its lowest-priority waiter. Shed requests get 503 `overloaded`.
//!
//! Admission is lock-free; limit updates skip a sample rather than wait for a lock.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::control::config::resilience::{LoadShedConfig, ShedAlgorithm};
use crate::error::ProxyError;
use crate::proxy::clock;
use crate::proxy::resilience::classify::{self, Outcome};
use crate::proxy::resilience::{Apply, ApplyLayer, Call, Inner, Mechanism, ResponseFuture};
use crate::telemetry::metrics::ShedMetrics;

/// Priority of a request without the header.
const DEFAULT_PRIORITY: usize = 5;
const PRIORITIES: usize = 10;

/// The adaptive limiter of a listener.
pub struct Limiter {
    cfg: LoadShedConfig,
    limit: AtomicU32,
    in_flight: AtomicU32,
    /// Entries in the queue, live or not.
    queued: AtomicU32,
    /// Requests waiting in the queue now.
    waiting: AtomicU32,
    queue: Mutex<[VecDeque<oneshot::Sender<()>>; PRIORITIES]>,
    estimate: Mutex<Estimate>,
    metrics: Option<ShedMetrics>,
}

struct Estimate {
    limit: f64,
    /// Minimum RTT of the previous window (or of this one, if lower).
    min_rtt: f64,
    /// Minimum RTT of the current window.
    window_min: f64,
    window_start: Instant,
    /// Recent average RTT.
    short_rtt: f64,
    samples: u64,
}

/// How often the minimum RTT is measured afresh, so that a lasting change of the service's own
/// latency is learnt.
const MIN_RTT_WINDOW: Duration = Duration::from_secs(5);

impl Limiter {
    /// A limiter starting at `cfg.initial_limit`.
    pub fn new(cfg: LoadShedConfig, metrics: Option<ShedMetrics>) -> Self {
        if let Some(m) = &metrics {
            m.limit.set(i64::from(cfg.initial_limit));
        }
        Self {
            limit: AtomicU32::new(cfg.initial_limit),
            in_flight: AtomicU32::new(0),
            queued: AtomicU32::new(0),
            waiting: AtomicU32::new(0),
            queue: Mutex::new(std::array::from_fn(|_| VecDeque::new())),
            estimate: Mutex::new(Estimate {
                limit: f64::from(cfg.initial_limit),
                min_rtt: f64::MAX,
                window_min: f64::MAX,
                window_start: Instant::now(),
                short_rtt: 0.0,
                samples: 0,
            }),
            metrics,
            cfg,
        }
    }

    /// The current limit.
    pub fn limit(&self) -> u32 {
        self.limit.load(Ordering::Acquire)
    }

    fn try_admit(&self) -> bool {
        self.in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.limit.load(Ordering::Acquire)).then_some(n + 1)
            })
            .is_ok()
    }

    /// Waits for admission; `Err(Overloaded)` when shed.
    pub async fn acquire(self: &Arc<Self>, priority: usize) -> Result<Admitted, ProxyError> {
        if self.waiting.load(Ordering::Acquire) == 0 && self.try_admit() {
            return Ok(self.admitted());
        }
        if self.cfg.queue_timeout.is_zero() || self.cfg.max_queue == 0 {
            return Err(self.shed());
        }
        let rx = {
            let Ok(mut q) = self.queue.lock() else {
                return Err(self.shed());
            };
            if self.waiting.load(Ordering::Acquire) >= self.cfg.max_queue
                && !self.evict(&mut q, priority)
            {
                drop(q);
                return Err(self.shed());
            }
            let (tx, rx) = oneshot::channel();
            q[priority].push_back(tx);
            self.queued.fetch_add(1, Ordering::AcqRel);
            self.waiting.fetch_add(1, Ordering::AcqRel);
            rx
        };
        let mut waiter = Waiter {
            limiter: self,
            rx,
            admitted: false,
        };
        self.publish_queue();
        // A slot may have freed between the failed admission and queueing.
        self.dispatch();
        match tokio::time::timeout(self.cfg.queue_timeout, &mut waiter.rx).await {
            Ok(Ok(())) => {
                waiter.admitted = true;
                Ok(self.admitted())
            }
            // Timed out or evicted; dropping the waiter returns a slot handed over meanwhile.
            _ => Err(self.shed()),
        }
    }

    /// Drops the newest live waiter of the lowest priority below `priority` to make room;
    /// dead entries met on the way are cleared. False if there is none.
    fn evict(&self, q: &mut [VecDeque<oneshot::Sender<()>>; PRIORITIES], priority: usize) -> bool {
        for level in (priority + 1..PRIORITIES).rev() {
            while let Some(tx) = q[level].pop_back() {
                self.queued.fetch_sub(1, Ordering::AcqRel);
                if !tx.is_closed() {
                    // Dropping the sender wakes the waiter with an error: it is shed.
                    return true;
                }
            }
        }
        false
    }

    fn admitted(self: &Arc<Self>) -> Admitted {
        if let Some(m) = &self.metrics {
            m.in_flight.inc();
        }
        Admitted {
            limiter: self.clone(),
            start: clock::now(),
            done: false,
        }
    }

    fn shed(&self) -> ProxyError {
        if let Some(m) = &self.metrics {
            m.shed.inc();
        }
        ProxyError::Overloaded
    }

    fn publish_queue(&self) {
        if let Some(m) = &self.metrics {
            m.queued
                .set(i64::from(self.waiting.load(Ordering::Acquire)));
        }
    }

    /// Hands free slots to waiters, highest priority first.
    fn dispatch(&self) {
        if self.queued.load(Ordering::Acquire) == 0 {
            return;
        }
        let Ok(mut q) = self.queue.lock() else { return };
        while self.queued.load(Ordering::Acquire) > 0 && self.try_admit() {
            let Some(tx) = q.iter_mut().find_map(|level| level.pop_front()) else {
                self.in_flight.fetch_sub(1, Ordering::AcqRel);
                break;
            };
            self.queued.fetch_sub(1, Ordering::AcqRel);
            if tx.send(()).is_err() {
                // The waiter gave up (timed out); its slot goes to the next one.
                self.in_flight.fetch_sub(1, Ordering::AcqRel);
            }
        }
        drop(q);
        self.publish_queue();
    }
    fn release(&self, sample: Option<Duration>, dropped: bool) {
        let in_flight = self.in_flight.fetch_sub(1, Ordering::AcqRel);
        if let Some(m) = &self.metrics {
            m.in_flight.dec();
        }
        if let Some(rtt) = sample {
            self.update(rtt.as_secs_f64(), in_flight, dropped);
        }
        self.dispatch();
    }

    fn update(&self, rtt: f64, in_flight: u32, dropped: bool) {
        let Ok(mut e) = self.estimate.try_lock() else {
            return;
        };
        e.samples += 1;
        if e.samples == 1 {
            e.short_rtt = rtt;
        }
        if !rtt.is_finite() {
            return;
        }
        e.short_rtt += (rtt - e.short_rtt) * (2.0 / 11.0);
        e.window_min = e.window_min.min(rtt);
        e.min_rtt = e.min_rtt.min(rtt);
        if e.window_start.elapsed() >= MIN_RTT_WINDOW {
            e.min_rtt = e.window_min;
            e.window_min = f64::MAX;
            e.window_start = Instant::now();
        }
        let limit = e.limit;
        let app_limited = f64::from(in_flight) < limit / 2.0;
        let next = match self.cfg.algorithm {
            ShedAlgorithm::Gradient => {
                // A clock too coarse to see the latency gives zeros: treat those as no queueing.
                let ratio = self.cfg.tolerance * e.min_rtt.max(1e-6) / e.short_rtt.max(1e-6);
                let gradient = if ratio.is_finite() {
                    ratio.clamp(0.5, 1.0)
                } else {
                    1.0
                };
                let headroom = if app_limited { 0.0 } else { limit.sqrt() };
                let target = limit * gradient + headroom;
                limit * 0.8 + target * 0.2
            }
            ShedAlgorithm::Aimd => {
                if dropped || rtt > 2.0 * e.min_rtt {
                    limit * 0.9
                } else if app_limited {
                    limit
                } else {
                    limit + 1.0 / limit
                }
            }
        };
        if !next.is_finite() {
            return;
        }
        e.limit = next.clamp(f64::from(self.cfg.min_limit), f64::from(self.cfg.max_limit));
        let rounded = e.limit as u32;
        self.limit.store(rounded, Ordering::Release);
        if let Some(m) = &self.metrics {
            m.limit.set(i64::from(rounded));
        }
    }

    fn priority(&self, call: &Call) -> usize {
        call.head
            .headers
            .get(&self.cfg.priority_header)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<usize>().ok())
            .map_or(DEFAULT_PRIORITY, |p| p.min(PRIORITIES - 1))
    }
}

/// A request waiting in the queue. Dropped unadmitted (timed out, evicted, or its client gone),
/// it leaves the queue count and hands back a slot that was given to it in the meantime.
struct Waiter<'a> {
    limiter: &'a Limiter,
    rx: oneshot::Receiver<()>,
    admitted: bool,
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        self.limiter.waiting.fetch_sub(1, Ordering::AcqRel);
        if !self.admitted {
            self.rx.close();
            if self.rx.try_recv().is_ok() {
                self.limiter.release(None, false);
            }
        }
        self.limiter.publish_queue();
    }
}

/// An admitted request; dropping it frees its slot.
pub struct Admitted {
    limiter: Arc<Limiter>,
    start: Instant,
    done: bool,
}

impl Admitted {
    /// Frees the slot and feeds the request's latency to the limit.
    pub fn finish(mut self, outcome: Outcome) {
        self.done = true;
        let rtt = clock::now() - self.start;
        let dropped = outcome.is_failure();
        self.limiter.release(Some(rtt), dropped);
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        if !self.done {
            self.limiter.release(None, false);
        }
    }
}

/// Sheds load in front of the inner service.
pub type LoadShedLayer = ApplyLayer<Limiter>;
/// See [`LoadShedLayer`].
pub type LoadShed<S> = Apply<Limiter, S>;

impl Mechanism for Limiter {
    type Future<S: Inner> = ResponseFuture;

    fn apply<S: Inner>(self: &Arc<Self>, inner: &mut S, call: Call) -> ResponseFuture {
        let (limiter, mut inner) = (self.clone(), inner.clone());
        Box::pin(async move {
            let admitted = limiter.acquire(limiter.priority(&call)).await?;
            let result = inner.call(call).await;
            admitted.finish(classify::outcome(&result));
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderName;

    fn cfg(algorithm: ShedAlgorithm) -> LoadShedConfig {
        LoadShedConfig {
            algorithm,
            initial_limit: 10,
            min_limit: 2,
            max_limit: 100,
            queue_timeout: Duration::from_millis(10),
            max_queue: 2,
            tolerance: 1.2,
            priority_header: HeaderName::from_static("x-outrigger-priority"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn rising_latency_lowers_the_limit_and_steady_latency_raises_it() {
        for algorithm in [ShedAlgorithm::Gradient, ShedAlgorithm::Aimd] {
            let l = Arc::new(Limiter::new(cfg(algorithm), None));
            // Saturated at a steady 10 ms: the limit grows.
            for _ in 0..200 {
                let held: Vec<_> =
                    futures_util::future::join_all((0..l.limit()).map(|_| l.acquire(5))).await;
                tokio::time::advance(Duration::from_millis(10)).await;
                for a in held.into_iter().flatten() {
                    a.finish(Outcome::Success);
                }
            }
            let grown = l.limit();
            assert!(grown > 10, "{algorithm:?}: {grown}");
            // Latency quadruples: the limit falls (before the long-term baseline drifts up to it).
            for _ in 0..5 {
                let held: Vec<_> =
                    futures_util::future::join_all((0..l.limit()).map(|_| l.acquire(5))).await;
                tokio::time::advance(Duration::from_millis(40)).await;
                for a in held.into_iter().flatten() {
                    a.finish(Outcome::Success);
                }
            }
            assert!(l.limit() < grown, "{algorithm:?}: {} !< {grown}", l.limit());
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_slot_handed_to_a_waiter_that_left_is_not_lost() {
        let l = Arc::new(Limiter::new(
            LoadShedConfig {
                initial_limit: 1,
                min_limit: 1,
                max_limit: 1,
                queue_timeout: Duration::from_secs(1),
                ..cfg(ShedAlgorithm::Aimd)
            },
            None,
        ));
        let held = l.acquire(5).await.unwrap();
        let l2 = l.clone();
        let waiter = tokio::spawn(async move { l2.acquire(5).await.map(drop) });
        tokio::task::yield_now().await;
        // The slot goes to the waiter, whose client leaves before it runs again.
        drop(held);
        waiter.abort();
        let _ = waiter.await;
        let again = tokio::time::timeout(Duration::from_millis(10), l.acquire(5)).await;
        assert!(matches!(again, Ok(Ok(_))), "the slot came back");
    }

    #[tokio::test(start_paused = true)]
    async fn queue_serves_high_priority_first_and_evicts_low() {
        let l = Arc::new(Limiter::new(
            LoadShedConfig {
                initial_limit: 2,
                min_limit: 2,
                ..cfg(ShedAlgorithm::Gradient)
            },
            None,
        ));
        let a = l.acquire(5).await.unwrap();
        let _b = l.acquire(5).await.unwrap();
        let (low, high, low2, top) = tokio::join!(
            l.acquire(9),
            async {
                tokio::task::yield_now().await;
                l.acquire(1).await
            },
            async {
                for _ in 0..2 {
                    tokio::task::yield_now().await;
                }
                // Queue full (low, high) and nothing lower than 9 to evict.
                l.acquire(9).await
            },
            async {
                for _ in 0..3 {
                    tokio::task::yield_now().await;
                }
                // Queue full: evicts the low waiter; then a slot frees and goes to priority 0.
                let got = l.acquire(0);
                tokio::pin!(got);
                tokio::select! {
                    r = &mut got => r,
                    () = async { tokio::task::yield_now().await; drop(a); std::future::pending::<()>().await } => unreachable!(),
                }
            },
        );
        assert!(matches!(low, Err(ProxyError::Overloaded)), "evicted");
        assert!(matches!(low2, Err(ProxyError::Overloaded)), "queue full");
        assert!(top.is_ok(), "highest priority got the slot");
        assert!(
            matches!(high, Err(ProxyError::Overloaded)),
            "timed out behind the top one"
        );
    }
}
