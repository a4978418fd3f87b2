//! Circuit breakers: closed → open → half-open → closed, per cluster and per endpoint.
//!
//! A breaker trips on a failure rate or a slow-call rate over a sliding window (the last N calls,
//! or the calls of the last T), once the window holds a minimum number of calls, or on N
//! consecutive failures. While open, calls fail at once with 503 `circuit_open`. The open period
//! starts at `open_duration` and doubles with each reopening, with ±20% jitter, up to
//! `max_open_duration`. Then the breaker half-opens and admits `half_open_probes` calls: if all
//! succeed it closes; one failure reopens it.
//!
//! Recording is lock-free (atomics); only state transitions take a lock, and they are rare.

use std::future::{Future, Ready};
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::future::Either;
use pin_project_lite::pin_project;
use tokio::time::Instant;

use crate::control::config::resilience::{BreakerConfig, Window};
use crate::error::ProxyError;
use crate::proxy::clock;
use crate::proxy::resilience::classify::{self, Outcome};
use crate::proxy::resilience::{Apply, ApplyLayer, Call, Inner, Mechanism, Response};
use crate::telemetry::metrics::BreakerMetrics;

/// Breaker states; the gauge label and the `/clusters` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Calls pass.
    Closed = 0,
    /// Calls fail fast.
    Open = 1,
    /// A few probe calls pass.
    HalfOpen = 2,
}

impl State {
    /// Every state, in gauge order.
    pub const ALL: [State; 3] = [State::Closed, State::Open, State::HalfOpen];

    /// The label of the state.
    pub fn name(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::Open => "open",
            State::HalfOpen => "half_open",
        }
    }

    fn from_u8(v: u8) -> Self {
        match v {
            1 => State::Open,
            2 => State::HalfOpen,
            _ => State::Closed,
        }
    }
}

/// One circuit breaker.
pub struct CircuitBreaker {
    cfg: BreakerConfig,
    consecutive_threshold: u32,
    epoch: Instant,
    state: AtomicU8,
    /// Nanoseconds since `epoch` at which an open breaker may half-open.
    open_until: AtomicU64,
    consecutive: AtomicU32,
    probes_left: AtomicU32,
    probes_ok: AtomicU32,
    reopenings: AtomicU32,
    /// Counts half-open periods; a probe from an earlier one is ignored.
    period: AtomicU32,
    window: Calls,
    transition: Mutex<()>,
    jitter: AtomicU64,
    metrics: Option<BreakerMetrics>,
}

impl std::fmt::Debug for CircuitBreaker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CircuitBreaker")
            .field("state", &self.state())
            .finish_non_exhaustive()
    }
}

/// Admission to call through a breaker; report how the call went with [`Permit::record`]. A permit
/// dropped unrecorded (a cancelled call) gives its probe slot back.
pub struct Permit {
    breaker: Arc<CircuitBreaker>,
    probe: bool,
    period: u32,
    start: Instant,
    done: bool,
}

impl CircuitBreaker {
    /// A closed breaker. `consecutive_threshold` overrides the config's consecutive-failure trigger
    /// (endpoints use a default one when the cluster sets none).
    pub fn new(
        cfg: BreakerConfig,
        consecutive_threshold: u32,
        metrics: Option<BreakerMetrics>,
    ) -> Self {
        let window = Calls::new(cfg.window);
        let b = Self {
            consecutive_threshold,
            epoch: Instant::now(),
            state: AtomicU8::new(State::Closed as u8),
            open_until: AtomicU64::new(0),
            consecutive: AtomicU32::new(0),
            probes_left: AtomicU32::new(0),
            probes_ok: AtomicU32::new(0),
            reopenings: AtomicU32::new(0),
            period: AtomicU32::new(0),
            window,
            transition: Mutex::new(()),
            jitter: AtomicU64::new(0x9E37_79B9_7F4A_7C15),
            metrics,
            cfg,
        };
        b.publish(State::Closed);
        b
    }

    /// The current state.
    pub fn state(&self) -> State {
        State::from_u8(self.state.load(Ordering::Acquire))
    }

    /// Time left until an open breaker half-opens.
    pub fn open_for(&self) -> Option<Duration> {
        (self.state() == State::Open).then(|| {
            let until = self.open_until.load(Ordering::Acquire);
            Duration::from_nanos(until.saturating_sub(self.now()))
        })
    }

    fn now(&self) -> u64 {
        (clock::now() - self.epoch).as_nanos() as u64
    }

    /// Asks to make a call; `None` means the circuit is open.
    pub fn try_acquire(self: &Arc<Self>) -> Option<Permit> {
        let permit = |probe| Permit {
            breaker: self.clone(),
            probe,
            period: self.period.load(Ordering::Acquire),
            start: clock::now(),
            done: false,
        };
        match self.state() {
            State::Closed => Some(permit(false)),
            State::Open => {
                if self.now() < self.open_until.load(Ordering::Acquire) {
                    return None;
                }
                self.half_open();
                self.take_probe().then(|| permit(true))
            }
            State::HalfOpen => self.take_probe().then(|| permit(true)),
        }
    }

    /// Whether `try_acquire` would admit a call now (without taking a probe slot).
    pub fn would_admit(&self) -> bool {
        match self.state() {
            State::Closed => true,
            State::Open => self.now() >= self.open_until.load(Ordering::Acquire),
            State::HalfOpen => self.probes_left.load(Ordering::Acquire) > 0,
        }
    }

    fn take_probe(&self) -> bool {
        self.probes_left
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_ok()
    }

    fn half_open(&self) {
        let Ok(_guard) = self.transition.lock() else {
            return;
        };
        if self.state() != State::Open || self.now() < self.open_until.load(Ordering::Acquire) {
            return;
        }
        self.probes_ok.store(0, Ordering::Release);
        self.probes_left
            .store(self.cfg.half_open_probes, Ordering::Release);
        self.set(State::HalfOpen);
    }

    fn set(&self, s: State) {
        self.state.store(s as u8, Ordering::Release);
        self.publish(s);
    }

    fn publish(&self, s: State) {
        if let Some(m) = &self.metrics {
            for (g, state) in m.states.iter().flatten().zip(State::ALL) {
                g.set(i64::from(state == s));
            }
            if s == State::Open {
                m.opened.inc();
            }
        }
    }

    fn open(&self) {
        let Ok(_guard) = self.transition.lock() else {
            return;
        };
        if self.state() == State::Open {
            return;
        }
        let n = self.reopenings.fetch_add(1, Ordering::AcqRel).min(16);
        let base = self
            .cfg
            .open_duration
            .saturating_mul(1 << n)
            .min(self.cfg.max_open_duration);
        // ±20% jitter so that a fleet's breakers do not probe in lockstep.
        let factor = 0.8 + 0.4 * self.next_unit();
        let period = base.mul_f64(factor).min(self.cfg.max_open_duration);
        self.open_until
            .store(self.now() + period.as_nanos() as u64, Ordering::Release);
        self.probes_left.store(0, Ordering::Release);
        self.set(State::Open);
    }

    fn close(&self) {
        let Ok(_guard) = self.transition.lock() else {
            return;
        };
        if self.state() != State::HalfOpen {
            return;
        }
        self.window.clear();
        self.consecutive.store(0, Ordering::Release);
        self.reopenings.store(0, Ordering::Release);
        self.set(State::Closed);
    }

    /// A number in [0, 1) from a xorshift sequence: jitter only, no need for quality.
    fn next_unit(&self) -> f64 {
        let mut x = self.jitter.load(Ordering::Relaxed);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.jitter.store(x, Ordering::Relaxed);
        (x >> 11) as f64 / (1u64 << 53) as f64
    }

    fn record(&self, probe: bool, period: u32, outcome: Outcome, elapsed: Duration) {
        // A probe of an earlier half-open period no longer speaks for the endpoint.
        let current = probe
            && period == self.period.load(Ordering::Acquire)
            && self.state() == State::HalfOpen;
        if probe && !current {
            return;
        }
        if outcome == Outcome::Ignore {
            if probe {
                self.probes_left.fetch_add(1, Ordering::AcqRel);
            }
            return;
        }
        let slow = self.cfg.slow_call_rate > 0 && elapsed >= self.cfg.slow_call_duration;
        let failed = outcome.is_failure();
        if probe {
            if failed || slow {
                self.open();
            } else if self.probes_ok.fetch_add(1, Ordering::AcqRel) + 1 >= self.cfg.half_open_probes
            {
                self.close();
            }
            return;
        }
        if self.state() != State::Closed {
            return;
        }
        let consecutive = if failed {
            self.consecutive.fetch_add(1, Ordering::AcqRel) + 1
        } else {
            self.consecutive.store(0, Ordering::Release);
            0
        };
        let (total, failures, slows) = self.window.record(self.now(), failed, slow);
        let trip = (self.consecutive_threshold > 0 && consecutive >= self.consecutive_threshold)
            || (total >= u64::from(self.cfg.minimum_calls)
                && ((self.cfg.failure_rate > 0
                    && failures * 100 >= u64::from(self.cfg.failure_rate) * total)
                    || (self.cfg.slow_call_rate > 0
                        && slows * 100 >= u64::from(self.cfg.slow_call_rate) * total)));
        if trip {
            self.open();
        }
    }
}

impl Permit {
    /// Reports the call's outcome.
    pub fn record(mut self, outcome: Outcome) {
        self.done = true;
        self.breaker
            .record(self.probe, self.period, outcome, clock::now() - self.start);
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let b = &self.breaker;
        if !self.done
            && self.probe
            && self.period == b.period.load(Ordering::Acquire)
            && b.state() == State::HalfOpen
        {
            b.probes_left.fetch_add(1, Ordering::AcqRel);
        }
    }
}

/// The sliding window of recent calls.
enum Calls {
    /// A ring of the last N outcomes (0 empty, 1 success, 2 failure; +4 slow) with running sums.
    Count {
        slots: Box<[AtomicU8]>,
        next: AtomicU64,
        // Signed: two records racing on one slot may subtract before they add.
        total: AtomicI64,
        failures: AtomicI64,
        slows: AtomicI64,
    },
    /// Ten buckets covering the window's duration.
    Time { width: u64, buckets: Box<[Bucket]> },
}

struct Bucket {
    index: AtomicU64,
    total: AtomicU64,
    failures: AtomicU64,
    slows: AtomicU64,
}

const TIME_BUCKETS: u64 = 10;

impl Calls {
    fn new(w: Window) -> Self {
        match w {
            Window::Calls(n) => Calls::Count {
                slots: (0..n.max(1)).map(|_| AtomicU8::new(0)).collect(),
                next: AtomicU64::new(0),
                total: AtomicI64::new(0),
                failures: AtomicI64::new(0),
                slows: AtomicI64::new(0),
            },
            Window::Time(d) => Calls::Time {
                width: (d.as_nanos() as u64 / TIME_BUCKETS).max(1),
                buckets: (0..TIME_BUCKETS)
                    .map(|_| Bucket {
                        index: AtomicU64::new(u64::MAX),
                        total: AtomicU64::new(0),
                        failures: AtomicU64::new(0),
                        slows: AtomicU64::new(0),
                    })
                    .collect(),
            },
        }
    }

    /// Adds a call and returns the window's (total, failures, slow calls).
    fn record(&self, now: u64, failed: bool, slow: bool) -> (u64, u64, u64) {
        match self {
            Calls::Count {
                slots,
                next,
                total,
                failures,
                slows,
            } => {
                let code = if failed { 2 } else { 1 } | if slow { 4 } else { 0 };
                let i = (next.fetch_add(1, Ordering::AcqRel) % slots.len() as u64) as usize;
                let old = slots[i].swap(code, Ordering::AcqRel);
                if old == 0 {
                    total.fetch_add(1, Ordering::AcqRel);
                }
                adjust(failures, old & 3 == 2, failed);
                adjust(slows, old & 4 != 0, slow);
                let read = |c: &AtomicI64| c.load(Ordering::Acquire).max(0) as u64;
                (read(total), read(failures), read(slows))
            }
            Calls::Time { width, buckets } => {
                let idx = now / width;
                let b = &buckets[(idx % TIME_BUCKETS) as usize];
                let seen = b.index.load(Ordering::Acquire);
                if seen != idx
                    && b.index
                        .compare_exchange(seen, idx, Ordering::AcqRel, Ordering::Acquire)
                        .is_ok()
                {
                    b.total.store(0, Ordering::Release);
                    b.failures.store(0, Ordering::Release);
                    b.slows.store(0, Ordering::Release);
                }
                b.total.fetch_add(1, Ordering::AcqRel);
                if failed {
                    b.failures.fetch_add(1, Ordering::AcqRel);
                }
                if slow {
                    b.slows.fetch_add(1, Ordering::AcqRel);
                }
                let mut sums = (0, 0, 0);
                for b in buckets.iter() {
                    let bi = b.index.load(Ordering::Acquire);
                    if bi <= idx && idx - bi < TIME_BUCKETS {
                        sums.0 += b.total.load(Ordering::Acquire);
                        sums.1 += b.failures.load(Ordering::Acquire);
                        sums.2 += b.slows.load(Ordering::Acquire);
                    }
                }
                sums
            }
        }
    }

    fn clear(&self) {
        match self {
            Calls::Count {
                slots,
                total,
                failures,
                slows,
                ..
            } => {
                for s in slots.iter() {
                    s.store(0, Ordering::Release);
                }
                for c in [total, failures, slows] {
                    c.store(0, Ordering::Release);
                }
            }
            Calls::Time { buckets, .. } => {
                for b in buckets.iter() {
                    b.index.store(u64::MAX, Ordering::Release);
                }
            }
        }
    }
}

fn adjust(counter: &AtomicI64, was: bool, is: bool) {
    match (was, is) {
        (false, true) => {
            counter.fetch_add(1, Ordering::AcqRel);
        }
        (true, false) => {
            counter.fetch_sub(1, Ordering::AcqRel);
        }
        _ => {}
    }
}

/// Wraps a cluster's tries in its breaker.
pub type BreakerLayer = ApplyLayer<CircuitBreaker>;
/// See [`BreakerLayer`].
pub type Breaker<S> = Apply<CircuitBreaker, S>;

impl Mechanism for CircuitBreaker {
    type Future<S: Inner> = Either<Recorded<S::Future>, Ready<Result<Response, ProxyError>>>;

    fn apply<S: Inner>(self: &Arc<Self>, inner: &mut S, call: Call) -> Self::Future<S> {
        let Some(permit) = self.try_acquire() else {
            return Either::Right(std::future::ready(Err(ProxyError::CircuitOpen)));
        };
        Either::Left(Recorded {
            inner: inner.call(call),
            permit: Some(permit),
        })
    }
}

pin_project! {
    /// A call through the breaker: its outcome is recorded when it ends. Dropped before that
    /// (the caller gave up), it records nothing.
    pub struct Recorded<F> {
        #[pin]
        inner: F,
        permit: Option<Permit>,
    }
}

impl<F: Future<Output = Result<Response, ProxyError>>> Future for Recorded<F> {
    type Output = Result<Response, ProxyError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = std::task::ready!(this.inner.poll(cx));
        if let Some(permit) = this.permit.take() {
            permit.record(classify::outcome(&result));
        }
        Poll::Ready(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> BreakerConfig {
        BreakerConfig {
            failure_rate: 50,
            minimum_calls: 4,
            window: Window::Calls(10),
            open_duration: Duration::from_secs(1),
            max_open_duration: Duration::from_secs(8),
            half_open_probes: 2,
            ..BreakerConfig::default()
        }
    }

    fn call(b: &Arc<CircuitBreaker>, outcome: Outcome) -> bool {
        match b.try_acquire() {
            Some(p) => {
                p.record(outcome);
                true
            }
            None => false,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn opens_on_failure_rate_then_probes_and_closes() {
        let b = Arc::new(CircuitBreaker::new(cfg(), 0, None));
        assert!(call(&b, Outcome::Success));
        assert!(call(&b, Outcome::ServerError));
        assert!(call(&b, Outcome::Success));
        assert_eq!(b.state(), State::Closed, "2 of 3 is below minimum_calls");
        assert!(call(&b, Outcome::ServerError));
        assert_eq!(b.state(), State::Open, "2 of 4 failed: 50%");
        assert!(!call(&b, Outcome::Success), "open fails fast");
        tokio::time::advance(Duration::from_millis(1250)).await;
        // Half-open: two probes pass, a third waits for them.
        let p1 = b.try_acquire().unwrap();
        let p2 = b.try_acquire().unwrap();
        assert_eq!(b.state(), State::HalfOpen);
        assert!(b.try_acquire().is_none());
        p1.record(Outcome::Success);
        p2.record(Outcome::Success);
        assert_eq!(b.state(), State::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn failed_probe_reopens_for_longer_with_jitter() {
        let b = Arc::new(CircuitBreaker::new(cfg(), 3, None));
        for _ in 0..3 {
            call(&b, Outcome::ServerError);
        }
        assert_eq!(b.state(), State::Open, "3 consecutive failures");
        let first = b.open_for().unwrap();
        assert!(first >= Duration::from_millis(800) && first <= Duration::from_millis(1200));
        tokio::time::advance(first).await;
        assert!(call(&b, Outcome::ServerError), "probe admitted");
        let second = b.open_for().unwrap();
        assert!(
            second >= Duration::from_millis(1600) && second <= Duration::from_millis(2400),
            "{second:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn cancelled_probe_returns_its_slot_and_ignored_outcomes_do_not_count() {
        let b = Arc::new(CircuitBreaker::new(cfg(), 1, None));
        call(&b, Outcome::ServerError);
        tokio::time::advance(Duration::from_secs(2)).await;
        drop(b.try_acquire().unwrap());
        drop(b.try_acquire().unwrap());
        let p = b.try_acquire().unwrap();
        p.record(Outcome::Ignore);
        assert!(call(&b, Outcome::Success));
        assert!(call(&b, Outcome::Success));
        assert_eq!(b.state(), State::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn time_window_forgets_old_failures() {
        let mut c = cfg();
        c.window = Window::Time(Duration::from_secs(10));
        let b = Arc::new(CircuitBreaker::new(c, 0, None));
        call(&b, Outcome::ServerError);
        call(&b, Outcome::ServerError);
        tokio::time::advance(Duration::from_secs(11)).await;
        call(&b, Outcome::Success);
        call(&b, Outcome::Success);
        call(&b, Outcome::ServerError);
        assert_eq!(b.state(), State::Closed, "old failures left the window");
        call(&b, Outcome::ServerError);
        assert_eq!(b.state(), State::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn the_jittered_open_period_never_exceeds_max_open_duration() {
        let mut c = cfg();
        c.open_duration = Duration::from_millis(300);
        c.max_open_duration = Duration::from_millis(300);
        let b = Arc::new(CircuitBreaker::new(c, 1, None));
        // Ten openings in a row: every period is jittered, then capped (and never doubled past it).
        for round in 0..10 {
            // Round 0: closed, one failure opens it; later: the half-open probe fails.
            assert!(call(&b, Outcome::GatewayError), "round {round}: admitted");
            assert_eq!(b.state(), State::Open, "round {round}");
            let period = b.open_for().unwrap();
            assert!(
                period >= Duration::from_millis(240) && period <= Duration::from_millis(300),
                "round {round}: {period:?}"
            );
            tokio::time::advance(period - Duration::from_millis(1)).await;
            assert!(b.try_acquire().is_none(), "still open 1 ms before its end");
            tokio::time::advance(Duration::from_millis(1)).await;
        }
        // Then the probes succeed and it closes.
        assert!(call(&b, Outcome::Success));
        assert!(call(&b, Outcome::Success));
        assert_eq!(b.state(), State::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn an_open_breaker_answers_at_once_without_calling_the_upstream() {
        use crate::proxy::resilience::tests::{answer, call, Script};
        use tower::{Layer, Service};
        let b = Arc::new(CircuitBreaker::new(cfg(), 2, None));
        let inner = Script::new(|_, _| answer(503, &[]));
        let mut svc = BreakerLayer::new(Some(b.clone())).layer(inner.clone());
        for _ in 0..2 {
            let resp = svc.call(call(http::Method::GET, &[])).await.unwrap();
            assert_eq!(resp.status(), http::StatusCode::SERVICE_UNAVAILABLE);
        }
        assert_eq!(b.state(), State::Open, "two 503s in a row");
        let start = Instant::now();
        for _ in 0..100 {
            let result = svc.call(call(http::Method::GET, &[])).await;
            assert!(matches!(result, Err(ProxyError::CircuitOpen)));
        }
        assert_eq!(start.elapsed(), Duration::ZERO);
        assert_eq!(inner.seen().len(), 2, "no call passed the open breaker");
    }

    #[tokio::test(start_paused = true)]
    async fn slow_calls_trip_the_breaker() {
        let mut c = cfg();
        c.failure_rate = 0;
        c.slow_call_rate = 50;
        c.slow_call_duration = Duration::from_millis(100);
        let b = Arc::new(CircuitBreaker::new(c, 0, None));
        for _ in 0..4 {
            let p = b.try_acquire().unwrap();
            tokio::time::advance(Duration::from_millis(150)).await;
            p.record(Outcome::Success);
        }
        assert_eq!(b.state(), State::Open);
    }
}
