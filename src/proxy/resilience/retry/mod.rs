//! Retries and hedging under a budget.
//!
//! A failed try is repeated when [`classify::retry_reason`] says so: by default connect failures
//! and refused streams for any method (nothing was sent), resets and 502/503/504 for idempotent
//! methods. Each retry waits a fully jittered exponential backoff (or the upstream's
//! `Retry-After`, up to a cap), goes to a different endpoint when there is one, must fit before
//! the request's deadline, and takes a token from the cluster's [`budget::RetryBudget`].
//! A request body is replayable up to `max_body` bytes (see [`ReqBody`](crate::proxy::body::ReqBody)).
//!
//! Hedging (opt-in, idempotent requests only) sends another try when the first has not answered
//! after a fixed delay or a latency percentile of the cluster; the first good answer wins and the
//! others are cancelled. Hedges take from the same budget.

pub mod backoff;
pub mod budget;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::stream::{FuturesUnordered, StreamExt};
use http::StatusCode;
use tokio::time::Instant;
use tower::{Layer, Service};

use crate::control::config::resilience::{HedgeAfter, RetryConfig};
use crate::error::ProxyError;
use crate::proxy::body::ReqBody;
use crate::proxy::resilience::classify::{self, RetryReason};
use crate::proxy::resilience::latency::LatencyWindow;
use crate::proxy::resilience::{Call, Response, ResponseFuture};
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

impl<S> Service<Call> for Retry<S>
where
    S: Service<Call, Response = Response, Error = ProxyError, Future = ResponseFuture>
        + Clone
        + Send
        + 'static,
{
    type Response = Response;
    type Error = ProxyError;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut call: Call) -> ResponseFuture {
        let policy = self.policy.clone();
        policy.budget.deposit();
        call.ctx.base = policy.next_base.fetch_add(1, Ordering::Relaxed);
        if policy.cfg.attempts <= 1 && policy.cfg.hedge.is_none() {
            return self.inner.call(call);
        }
        // Tries share what they tried, so that each goes to an endpoint not tried yet.
        call.ctx.tried = Some(Arc::new(std::sync::atomic::AtomicU64::new(0)));
        let inner = self.inner.clone();
        Box::pin(run(policy, inner, call))
    }
}

async fn run<S>(
    policy: Arc<RetryPolicy>,
    mut inner: S,
    mut call: Call,
) -> Result<Response, ProxyError>
where
    S: Service<Call, Response = Response, Error = ProxyError, Future = ResponseFuture> + Clone,
{
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
        let ((result, sent_tries), sent) = match (&cfg.hedge, spare) {
            // Tries of a hedge run at once; only a request without a body can be sent twice
            // concurrently.
            (Some(_), Some(spare))
                if tries == 0 && idempotent && matches!(call.body, ReqBody::Empty) =>
            {
                hedged(&policy, &mut inner, call, spare).await
            }
            (_, spare) => ((inner.call(call).await, 1), spare),
        };
        tries += sent_tries;
        let Some(_reason): Option<RetryReason> =
            classify::retry_reason(&cfg.on, &result, resendable)
        else {
            return result;
        };
        if tries >= cfg.attempts {
            policy.skip(Skip::Attempts);
            return result;
        }
        // The copy was taken before the try; a body that outgrew the cap while it was being
        // sent can no longer be replayed whole.
        let Some(next) = sent.filter(|c| c.body.replayable()) else {
            policy.skip(Skip::Body);
            return result;
        };
        let wait = match retry_after(&result) {
            Some(ra) if ra > cfg.retry_after_max => {
                policy.skip(Skip::RetryAfter);
                return result;
            }
            Some(ra) => ra,
            None => policy.backoff.delay(tries, policy.rng.f64()),
        };
        if deadline.is_some_and(|d| Instant::now() + wait >= d) {
            policy.skip(Skip::Deadline);
            return result;
        }
        if !policy.budget.withdraw() {
            policy.skip(Skip::Budget);
            return result;
        }
        if let Some(m) = &policy.metrics {
            m.retries.inc();
        }
        // Free the failed try's connection before waiting.
        drop(result);
        tokio::time::sleep(wait).await;
        call = next;
        call.body.claim();
        call.ctx.attempt = tries + 1;
    }
}

/// Sends `call`, and hedges while it is outstanding. Returns the chosen result with the number of
/// tries sent, and a spare copy for a later retry if one can still be made.
async fn hedged<S>(
    policy: &RetryPolicy,
    inner: &mut S,
    call: Call,
    spare: Call,
) -> ((Result<Response, ProxyError>, u32), Option<Call>)
where
    S: Service<Call, Response = Response, Error = ProxyError, Future = ResponseFuture> + Clone,
{
    let cfg = &policy.cfg;
    let max_hedges = cfg.hedge.as_ref().map_or(0, |h| h.max);
    let mut pending: FuturesUnordered<ResponseFuture> = FuturesUnordered::new();
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
                let retryable = classify::retry_reason(&cfg.on, &result, true).is_some();
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
