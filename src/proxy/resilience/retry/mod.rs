//! Retries and hedging under a budget.
//!
//! A failed try is repeated when [`classify::retry_reason`] says so: by default connect failures
//! and refused streams for any method (nothing was sent), resets and 502/503/504 for idempotent
//! methods, and the gRPC codes the route lists for any call. A wanted retry that is not sent is
//! counted with its reason (`method`, `attempts`, `budget`…). Each retry waits a fully jittered exponential backoff (or the upstream's
//! `Retry-After`, up to a cap), goes to a different endpoint when there is one, must fit before
//! the request's deadline, and takes a token from the cluster's [`budget::RetryBudget`].
//! A request body is replayable up to `max_body` bytes (see [`ReqBody`](crate::proxy::body::ReqBody)).
//!
//! Hedging (opt-in, idempotent requests only) sends another try when the first has not answered
//! after a fixed delay or a latency percentile of the cluster; the first good answer wins and the
//! others are cancelled. Hedges take from the same budget.

pub mod backoff;
pub mod budget;

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::future::Either;
use futures_util::stream::{FuturesUnordered, StreamExt};
use http::StatusCode;
use tokio::time::Instant;
use tower::{Layer, Service};

use crate::control::config::resilience::{HedgeAfter, RetryConfig};
use crate::error::ProxyError;
use crate::proxy::body::ReqBody;
use crate::proxy::resilience::classify::{self, RetryReason};
use crate::proxy::resilience::latency::LatencyWindow;
use crate::proxy::resilience::{Call, Inner, Response, ResponseFuture};
use crate::rng::Rng;
use crate::telemetry::metrics::{RetryMetrics, Skip};
use backoff::Backoff;
use budget::RetryBudget;

/// Everything a route target's retries need, built when the config is compiled.
pub struct RetryPolicy {
    cfg: RetryConfig,
    backoff: Backoff,
    budget: Arc<RetryBudget>,
    latency: Arc<LatencyWindow>,
    metrics: Option<RetryMetrics>,
    next_base: AtomicUsize,
    /// Backoff jitter.
    rng: Rng,
}

impl RetryPolicy {
    /// The policy `cfg` drawing from the cluster's `budget` and `latency`.
    pub fn new(
        cfg: RetryConfig,
        budget: Arc<RetryBudget>,
        latency: Arc<LatencyWindow>,
        metrics: Option<RetryMetrics>,
        rng: Rng,
    ) -> Self {
        // Validation rejects max < base; clamping keeps this constructor total anyway.
        let backoff = Backoff::clamped(cfg.backoff_base, cfg.backoff_max);
        Self {
            cfg,
            backoff,
            budget,
            latency,
            metrics,
            next_base: AtomicUsize::new(rng.below(1024) as usize),
            rng,
        }
    }

    fn skip(&self, why: Skip) {
        if let Some(m) = &self.metrics {
            m.skipped(why);
        }
    }

    fn hedge_delay(&self) -> Option<Duration> {
        let h = self.cfg.hedge.as_ref()?;
        match h.after {
            HedgeAfter::Delay(d) => Some(d),
            HedgeAfter::Percentile(p) => self.latency.percentile(p),
        }
    }
}

/// Adds retries (and hedging) to the inner service.
#[derive(Clone)]
pub struct RetryLayer {
    policy: Arc<RetryPolicy>,
}

/// What follows a try: its result is the answer, or the next try goes after a wait.
enum Next {
    Done(Result<Response, ProxyError>),
    Retry(Call, Duration),
}

impl RetryPolicy {
    /// Whether `result`, after `tries` tries, is retried: with `sent`, the copy taken before the
    /// try, after the wait the backoff or the upstream's `Retry-After` asks for.
    fn next_try(
        &self,
        result: Result<Response, ProxyError>,
        sent: Option<Call>,
        tries: u32,
        resendable: bool,
        deadline: Option<Instant>,
    ) -> Next {
        let cfg = &self.cfg;
        let Some(reason): Option<RetryReason> = classify::retry_reason(&cfg.on, &result) else {
            return Next::Done(result);
        };
        if reason.needs_resend() && !resendable {
            self.skip(Skip::Method);
            return Next::Done(result);
        }
        if tries >= cfg.attempts {
            self.skip(Skip::Attempts);
            return Next::Done(result);
        }
        // The copy was taken before the try; a body that outgrew the cap while it was being
        // sent can no longer be replayed whole.
        let Some(next) = sent.filter(|c| c.body.replayable()) else {
            self.skip(Skip::Body);
            return Next::Done(result);
        };
        let wait = match retry_after(&result) {
            Some(ra) if ra > cfg.retry_after_max => {
                self.skip(Skip::RetryAfter);
                return Next::Done(result);
            }
            Some(ra) => ra,
            None => self.backoff.delay(tries, self.rng.f64()),
        };
        if deadline.is_some_and(|d| Instant::now() + wait >= d) {
            self.skip(Skip::Deadline);
            return Next::Done(result);
        }
        if !self.budget.withdraw() {
            self.skip(Skip::Budget);
            return Next::Done(result);
        }
        if let Some(m) = &self.metrics {
            m.retries.inc();
        }
        // The failed try's connection is freed before the wait.
        Next::Retry(next, wait)
    }
}

impl RetryLayer {
    /// A layer applying `policy`.
    pub fn new(policy: Arc<RetryPolicy>) -> Self {
        Self { policy }
    }
}

impl<S> Layer<S> for RetryLayer {
    type Service = Retry<S>;
    fn layer(&self, inner: S) -> Retry<S> {
        Retry {
            inner,
            policy: self.policy.clone(),
        }
    }
}

/// See [`RetryLayer`].
#[derive(Clone)]
pub struct Retry<S> {
    inner: S,
    policy: Arc<RetryPolicy>,
}

impl<S: Inner> Service<Call> for Retry<S> {
    type Response = Response;
    type Error = ProxyError;
    type Future = Either<S::Future, ResponseFuture>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut call: Call) -> Self::Future {
        let policy = &self.policy;
        policy.budget.deposit();
        call.ctx.base = policy.next_base.fetch_add(1, Ordering::Relaxed);
        if policy.cfg.attempts <= 1 && policy.cfg.hedge.is_none() {
            return Either::Left(self.inner.call(call));
        }
        // Tries share what they tried, so that each goes to an endpoint not tried yet.
        call.ctx.tried = Some(Arc::new(std::sync::atomic::AtomicU64::new(0)));
        let inner = self.inner.clone();
        Either::Right(Box::pin(run(policy.clone(), inner, call)))
    }
}

/// Sends `call` through `inner` until a result is final. Not an `async fn`: its arguments (the
/// request among them) are kept once in the future, which is boxed per request.
#[allow(clippy::manual_async_fn)]
fn run<S: Inner>(
    policy: Arc<RetryPolicy>,
    mut inner: S,
    mut call: Call,
) -> impl Future<Output = Result<Response, ProxyError>> + Send + 'static {
    async move {
        let cfg = &policy.cfg;
        let idempotent = classify::idempotent(&call.head.method);
        let resendable = idempotent || cfg.non_idempotent;
        let deadline = call.ctx.deadline;
        let mut tries = 0u32;
        loop {
            let more = tries + 1 < cfg.attempts;
            call.ctx.attempt = tries + 1;
            // Read gRPC trailers ahead only while another try could follow.
            if more && call.body.replayable() {
                call.ctx.grpc_retry_codes = cfg.on.grpc_codes;
                call.ctx.hold_limit = cfg.max_body;
                call.ctx.hold_small = resendable && cfg.on.reset;
            } else {
                call.ctx.grpc_retry_codes = 0;
                call.ctx.hold_small = false;
            }
            let spare = if more || cfg.hedge.is_some() {
                call.try_clone()
            } else {
                None
            };
            // Tries of a hedge run at once; only a request without a body can be sent twice
            // concurrently.
            let hedge = cfg.hedge.is_some()
                && tries == 0
                && idempotent
                && matches!(call.body, ReqBody::Empty);
            let ((result, sent_tries), sent) = if hedge {
                match spare {
                    // Boxed: hedging is rare, and its state would otherwise be part of (and be
                    // moved with) every request's future.
                    Some(spare) => Box::pin(hedged(&policy, &mut inner, call, spare)).await,
                    None => ((inner.call(call).await, 1), None),
                }
            } else {
                ((inner.call(call).await, 1), spare)
            };
            tries += sent_tries;
            // Decided by a plain method: the result it looks at would otherwise be kept in this
            // future through the wait before the next try.
            let (next, wait) = match policy.next_try(result, sent, tries, resendable, deadline) {
                Next::Done(result) => return result,
                Next::Retry(next, wait) => (next, wait),
            };
            tokio::time::sleep(wait).await;
            call = next;
            call.body.claim();
            call.ctx.attempt = tries + 1;
        }
    }
}

/// Sends `call`, and hedges while it is outstanding. Returns the chosen result with the number of
/// tries sent, and a spare copy for a later retry if one can still be made.
async fn hedged<S: Inner>(
    policy: &RetryPolicy,
    inner: &mut S,
    call: Call,
    spare: Call,
) -> ((Result<Response, ProxyError>, u32), Option<Call>) {
    let cfg = &policy.cfg;
    let max_hedges = cfg.hedge.as_ref().map_or(0, |h| h.max);
    let mut pending: FuturesUnordered<S::Future> = FuturesUnordered::new();
    pending.push(inner.call(call));
    let mut sent = 1u32;
    let mut spare = Some(spare);
    let mut next_hedge = policy.hedge_delay().map(|d| Instant::now() + d);
    let mut last = None;
    loop {
        let can_hedge = sent <= max_hedges && next_hedge.is_some() && spare.is_some();
        let at = next_hedge.unwrap_or_else(Instant::now);
        tokio::select! {
            biased;
            done = pending.next() => {
                let Some(result) = done else {
                    break;
                };
                let retryable = classify::retry_reason(&cfg.on, &result).is_some();
                if !retryable || pending.is_empty() {
                    let copy = spare.as_ref().and_then(Call::try_clone);
                    return ((result, sent), copy);
                }
                last = Some(result);
            }
            () = tokio::time::sleep_until(at), if can_hedge => {
                let Some(mut hedge) = spare.take() else { continue };
                spare = hedge.try_clone();
                if !policy.budget.withdraw() {
                    policy.skip(Skip::Budget);
                    next_hedge = None;
                    spare = Some(hedge);
                    continue;
                }
                if let Some(m) = &policy.metrics {
                    m.hedges.inc();
                }
                sent += 1;
                hedge.ctx.attempt = sent;
                pending.push(inner.call(hedge));
                next_hedge = policy.hedge_delay().map(|d| Instant::now() + d);
            }
        }
    }
    let result = last.unwrap_or(Err(ProxyError::Timeout));
    ((result, sent), spare)
}

/// The wait an upstream asked for in `Retry-After` (delay-seconds form) on a 429 or 503.
fn retry_after(result: &Result<Response, ProxyError>) -> Option<Duration> {
    let resp = result.as_ref().ok()?;
    if !matches!(
        resp.status(),
        StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE
    ) {
        return None;
    }
    let v = resp
        .headers()
        .get(http::header::RETRY_AFTER)?
        .to_str()
        .ok()?;
    v.trim().parse::<u64>().ok().map(Duration::from_secs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::config::resilience::{BudgetConfig, HedgeConfig, RetryOn};
    use crate::proxy::resilience::tests::{answer, call, hang, Script};
    use crate::proxy::resilience::timeout::{
        PerTryTimeoutLayer, RouteDeadline, RouteTimeoutLayer, TryDeadline,
    };
    use crate::telemetry::metrics::Metrics;
    use http::Method;

    /// A policy for route `r` of listener `in` to cluster `c`, with its own metrics.
    struct Setup {
        metrics: Metrics,
        latency: Arc<LatencyWindow>,
        policy: Arc<RetryPolicy>,
    }

    impl Setup {
        fn new(cfg: RetryConfig, budget: BudgetConfig) -> Self {
            let metrics = Metrics::new().unwrap();
            let latency = Arc::new(LatencyWindow::new());
            let policy = Arc::new(RetryPolicy::new(
                cfg,
                Arc::new(RetryBudget::new(&budget)),
                latency.clone(),
                Some(metrics.resilience.retry("in", "r", "c")),
                Rng::with_seed(7),
            ));
            Self {
                metrics,
                latency,
                policy,
            }
        }

        fn retry(&self, inner: Script) -> Retry<Script> {
            RetryLayer::new(self.policy.clone()).layer(inner)
        }

        /// A counter of this route target: `retries`, `hedges` or a skip reason.
        fn count(&self, what: &str) -> u64 {
            let series = match what {
                "retries" | "hedges" => format!(
                    "outrigger_{what}_total{{cluster=\"c\",listener=\"in\",route=\"r\"}} "
                ),
                reason => format!(
                    "outrigger_retries_skipped_total{{cluster=\"c\",listener=\"in\",reason=\"{reason}\",route=\"r\"}} "
                ),
            };
            let text = String::from_utf8(self.metrics.encode()).unwrap();
            text.lines()
                .find_map(|l| l.strip_prefix(&series))
                .map_or(0, |v| v.trim().parse().unwrap())
        }
    }

    /// A budget that never runs out during a test.
    fn plenty() -> BudgetConfig {
        BudgetConfig {
            ratio: 10.0,
            min_per_sec: 1000,
            ttl: Duration::from_secs(60),
        }
    }

    fn hedge(after: HedgeAfter, max: u32) -> RetryConfig {
        RetryConfig {
            hedge: Some(HedgeConfig { after, max }),
            ..RetryConfig::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_waits_for_the_retry_after_it_was_asked_for() {
        let s = Setup::new(RetryConfig::default(), plenty());
        let inner = Script::new(|n, _| match n {
            0 => answer(503, &[("retry-after", "1")]),
            _ => answer(200, &[]),
        });
        let start = Instant::now();
        let resp = s.retry(inner.clone()).call(call(Method::GET, &[])).await;
        assert_eq!(resp.unwrap().status(), StatusCode::OK);
        let seen = inner.seen();
        assert_eq!(seen.len(), 2);
        assert_eq!(seen[0].at, start);
        assert_eq!(seen[1].at - seen[0].at, Duration::from_secs(1));
        assert_eq!((seen[0].attempt, seen[1].attempt), (1, 2));
        assert_eq!(s.count("retries"), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_after_beyond_the_cap_is_answered_at_once() {
        let s = Setup::new(
            RetryConfig {
                retry_after_max: Duration::from_millis(500),
                ..RetryConfig::default()
            },
            plenty(),
        );
        let inner = Script::new(|_, _| answer(503, &[("retry-after", "1")]));
        let start = Instant::now();
        let resp = s.retry(inner.clone()).call(call(Method::GET, &[])).await;
        assert_eq!(resp.unwrap().status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(start.elapsed(), Duration::ZERO);
        assert_eq!(inner.seen().len(), 1);
        assert_eq!((s.count("retry_after"), s.count("retries")), (1, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_whose_wait_ends_at_the_deadline_is_not_sent() {
        for (deadline_ms, retried) in [(1000, false), (1001, true)] {
            let s = Setup::new(RetryConfig::default(), plenty());
            let inner = Script::new(|n, _| match n {
                0 => answer(503, &[("retry-after", "1")]),
                _ => answer(200, &[]),
            });
            let mut c = call(Method::GET, &[]);
            let start = Instant::now();
            c.ctx.deadline = Some(start + Duration::from_millis(deadline_ms));
            let resp = s.retry(inner.clone()).call(c).await.unwrap();
            if retried {
                assert_eq!(resp.status(), StatusCode::OK);
                assert_eq!(start.elapsed(), Duration::from_secs(1));
                assert_eq!((s.count("deadline"), s.count("retries")), (0, 1));
            } else {
                assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
                assert_eq!(start.elapsed(), Duration::ZERO, "answered at once");
                assert_eq!((s.count("deadline"), s.count("retries")), (1, 0));
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_waits_are_jittered_under_a_doubling_cap_until_the_attempts_run_out() {
        let s = Setup::new(
            RetryConfig {
                attempts: 4,
                backoff_base: Duration::from_millis(100),
                backoff_max: Duration::from_millis(150),
                ..RetryConfig::default()
            },
            plenty(),
        );
        let inner = Script::new(|_, _| answer(503, &[]));
        let resp = s.retry(inner.clone()).call(call(Method::GET, &[])).await;
        assert_eq!(resp.unwrap().status(), StatusCode::SERVICE_UNAVAILABLE);
        let seen = inner.seen();
        assert_eq!(seen.len(), 4);
        let gaps: Vec<Duration> = seen.windows(2).map(|w| w[1].at - w[0].at).collect();
        assert!(gaps[0] <= Duration::from_millis(100), "{gaps:?}");
        assert!(gaps[1] <= Duration::from_millis(150), "{gaps:?}");
        assert!(gaps[2] <= Duration::from_millis(150), "{gaps:?}");
        assert!(gaps.iter().any(|g| !g.is_zero()), "jitter draws: {gaps:?}");
        assert_eq!((s.count("retries"), s.count("attempts")), (3, 1));
    }

    #[tokio::test(start_paused = true)]
    async fn per_try_timeouts_are_retried_within_the_route_timeout() {
        let cfg = RetryConfig {
            attempts: 2,
            on: RetryOn {
                timeout: true,
                ..RetryOn::default()
            },
            per_try_timeout: Some(Duration::from_millis(150)),
            backoff_base: Duration::from_millis(1),
            backoff_max: Duration::from_millis(1),
            ..RetryConfig::default()
        };
        for (route_ms, tries_end_ms) in [(1000, None), (200, Some(200))] {
            let s = Setup::new(cfg.clone(), plenty());
            let inner = Script::new(|_, _| hang());
            let mut svc = RouteTimeoutLayer::new(Some(Arc::new(RouteDeadline::new(Some(
                Duration::from_millis(route_ms),
            )))))
            .layer(
                RetryLayer::new(s.policy.clone()).layer(
                    PerTryTimeoutLayer::new(Some(Arc::new(TryDeadline::new(cfg.per_try_timeout))))
                        .layer(inner.clone()),
                ),
            );
            let start = Instant::now();
            let result = svc.call(call(Method::GET, &[])).await;
            assert!(matches!(result, Err(ProxyError::Timeout)), "{result:?}");
            let seen = inner.seen();
            assert_eq!(seen.len(), 2, "two tries");
            let second = seen[1].at - start;
            assert!(
                second >= Duration::from_millis(150) && second <= Duration::from_millis(151),
                "the retry follows the first try's timeout and a backoff of at most 1 ms: {second:?}"
            );
            assert_eq!(s.count("retries"), 1);
            match tries_end_ms {
                // Both tries ran out: 150 ms, a backoff, 150 ms.
                None => {
                    assert_eq!(start.elapsed(), second + Duration::from_millis(150));
                    assert_eq!(s.count("attempts"), 1);
                }
                // The route timeout ends the second try early, and is not retried.
                Some(end) => {
                    assert_eq!(
                        seen[1].try_deadline,
                        Some(start + Duration::from_millis(end)),
                        "a try never outlives the request"
                    );
                    assert_eq!(start.elapsed(), Duration::from_millis(end));
                }
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn hedges_go_out_one_delay_apart_and_the_first_good_answer_wins() {
        let s = Setup::new(
            hedge(HedgeAfter::Delay(Duration::from_millis(50)), 2),
            plenty(),
        );
        let inner = Script::new(|n, _| if n < 2 { hang() } else { answer(200, &[]) });
        let start = Instant::now();
        let resp = s.retry(inner.clone()).call(call(Method::GET, &[])).await;
        assert_eq!(resp.unwrap().status(), StatusCode::OK);
        let at: Vec<Duration> = inner.seen().iter().map(|t| t.at - start).collect();
        assert_eq!(
            at,
            [0, 50, 100].map(Duration::from_millis),
            "each hedge one delay after the previous try"
        );
        assert_eq!(start.elapsed(), Duration::from_millis(100));
        assert_eq!((s.count("hedges"), s.count("retries")), (2, 0));

        // With attempts: 1 too, and never more than `max` hedges.
        let s = Setup::new(
            RetryConfig {
                attempts: 1,
                ..hedge(HedgeAfter::Delay(Duration::from_millis(50)), 1)
            },
            plenty(),
        );
        let inner = Script::new(|_, _| hang());
        let waited = tokio::time::timeout(
            Duration::from_secs(10),
            s.retry(inner.clone()).call(call(Method::GET, &[])),
        )
        .await;
        assert!(waited.is_err());
        let at: Vec<Duration> = inner.seen().iter().map(|t| t.at - start).collect();
        assert_eq!(at.len(), 2, "one hedge at most: {at:?}");
        assert_eq!(at[1] - at[0], Duration::from_millis(50));
        assert_eq!(s.count("hedges"), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_percentile_hedge_waits_for_twenty_samples_then_uses_the_percentile() {
        let s = Setup::new(hedge(HedgeAfter::Percentile(50.0), 1), plenty());
        let first_hangs = || {
            Script::new(|_, c: &Call| {
                if c.ctx.attempt == 1 {
                    hang()
                } else {
                    answer(200, &[])
                }
            })
        };
        for _ in 0..19 {
            s.latency.record(Duration::from_millis(10));
        }
        let inner = first_hangs();
        let waited = tokio::time::timeout(
            Duration::from_secs(10),
            s.retry(inner.clone()).call(call(Method::GET, &[])),
        )
        .await;
        assert!(waited.is_err(), "19 samples: no hedge");
        assert_eq!(inner.seen().len(), 1);
        assert_eq!(s.count("hedges"), 0);

        s.latency.record(Duration::from_millis(10));
        let p50 = s.latency.percentile(50.0).unwrap();
        assert!(
            p50 >= Duration::from_millis(10) && p50 < Duration::from_millis(13),
            "{p50:?}"
        );
        let inner = first_hangs();
        let resp = s.retry(inner.clone()).call(call(Method::GET, &[])).await;
        assert_eq!(resp.unwrap().status(), StatusCode::OK);
        let seen = inner.seen();
        assert_eq!(seen.len(), 2);
        // Tokio's timers tick in whole milliseconds.
        let gap = seen[1].at - seen[0].at;
        assert!(
            gap >= p50 && gap <= p50 + Duration::from_millis(1),
            "hedged after the cluster's p50 ({p50:?}): {gap:?}"
        );
        assert_eq!(s.count("hedges"), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn hedges_take_tokens_from_the_retry_budget() {
        // 20% and no floor: one token per five requests.
        let s = Setup::new(
            hedge(HedgeAfter::Delay(Duration::from_millis(20)), 1),
            BudgetConfig {
                ratio: 0.2,
                min_per_sec: 0,
                ttl: Duration::from_secs(60),
            },
        );
        let inner = Script::new(|_, c: &Call| {
            if c.ctx.attempt == 1 {
                hang()
            } else {
                answer(200, &[])
            }
        });
        let mut answered = Vec::new();
        for _ in 0..10 {
            let r = tokio::time::timeout(
                Duration::from_secs(1),
                s.retry(inner.clone()).call(call(Method::GET, &[])),
            )
            .await;
            answered.push(r.is_ok());
        }
        let hedged: Vec<usize> = (0..10).filter(|&i| answered[i]).map(|i| i + 1).collect();
        assert_eq!(hedged, [5, 10], "the 5th and 10th requests found a token");
        assert_eq!((s.count("hedges"), s.count("budget")), (2, 8));
    }

    #[tokio::test(start_paused = true)]
    async fn only_idempotent_requests_are_hedged() {
        let s = Setup::new(
            RetryConfig {
                non_idempotent: true,
                ..hedge(HedgeAfter::Delay(Duration::from_millis(20)), 1)
            },
            plenty(),
        );
        let inner = Script::new(|_, c: &Call| {
            if c.ctx.attempt == 1 {
                hang()
            } else {
                answer(200, &[])
            }
        });
        for method in [Method::POST, Method::PATCH] {
            let waited = tokio::time::timeout(
                Duration::from_secs(1),
                s.retry(inner.clone()).call(call(method.clone(), &[])),
            )
            .await;
            assert!(waited.is_err(), "{method} is not hedged");
        }
        assert_eq!(s.count("hedges"), 0);
        for method in [Method::GET, Method::PUT, Method::DELETE] {
            let resp = s
                .retry(inner.clone())
                .call(call(method.clone(), &[]))
                .await
                .unwrap();
            assert_eq!(resp.status(), StatusCode::OK, "{method}");
        }
        assert_eq!(s.count("hedges"), 3);
        let methods: Vec<Method> = inner.seen().into_iter().map(|t| t.method).collect();
        assert_eq!(
            methods,
            [
                Method::POST,
                Method::PATCH,
                Method::GET,
                Method::GET,
                Method::PUT,
                Method::PUT,
                Method::DELETE,
                Method::DELETE
            ]
        );
    }
}
