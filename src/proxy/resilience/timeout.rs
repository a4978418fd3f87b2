//! Timeouts: the route timeout (the whole request, retries included) and the per-try timeout,
//! both answered with 504 `timeout`, and deadline propagation.
//!
//! The route timeout becomes a deadline that every layer below sees. A caller may shorten it by
//! sending `x-outrigger-deadline-ms` (set by an upstream Outrigger) or `grpc-timeout`; the upstream
//! layer sends the time left onward in the same headers, so the next hop stops working when the
//! caller has given up.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::Either;
use http::{HeaderMap, HeaderName};
use tokio::time::Instant;

use crate::proxy::clock;
use crate::proxy::h1::TryHeaders;
use crate::proxy::resilience::{Apply, ApplyLayer, Call, Deadline, Inner, Mechanism};
use crate::proxy::values;

/// The header carrying the time a caller still waits, in milliseconds.
pub static DEADLINE_HEADER: HeaderName = HeaderName::from_static("x-outrigger-deadline-ms");
/// gRPC's own deadline header.
pub static GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");

/// The route timeout: computes the request's deadline (the route's, or a shorter one the caller
/// sent) and answers 504 when it passes. Always in the stack, since a caller's deadline applies
/// even to routes without a timeout.
#[derive(Debug, Clone)]
pub struct RouteDeadline {
    timeout: Option<Duration>,
}

impl RouteDeadline {
    /// A route timeout of `timeout` (`None`: only a caller's deadline applies).
    pub fn new(timeout: Option<Duration>) -> Self {
        Self { timeout }
    }
}

impl Mechanism for RouteDeadline {
    type Future<S: Inner> = Either<S::Future, Deadline<S::Future>>;

    fn apply<S: Inner>(self: &Arc<Self>, inner: &mut S, mut call: Call) -> Self::Future<S> {
        // Both clocks run from the request's arrival, so time spent in the layers above (a
        // throttle delay, a queue) counts.
        let start = call.ctx.start;
        let ours = self.timeout.map(|t| start + t);
        let theirs = caller_budget(&call.head.headers).map(|t| start + t);
        let (deadline, caller) = match (ours, theirs) {
            (Some(a), Some(b)) => (Some(a.min(b)), b < a),
            (None, Some(b)) => (Some(b), true),
            (a, None) => (a, false),
        };
        call.ctx.deadline = deadline;
        call.ctx.caller_deadline = caller;
        let fut = inner.call(call);
        match deadline {
            None => Either::Left(fut),
            Some(at) => Either::Right(Deadline::new(fut, at, caller)),
        }
    }
}

/// Puts the [`RouteDeadline`] in front of a service.
pub type RouteTimeoutLayer = ApplyLayer<RouteDeadline>;
/// See [`RouteTimeoutLayer`].
pub type RouteTimeout<S> = Apply<RouteDeadline, S>;

/// The per-try timeout: limits each try, never beyond the request's deadline. Always in the
/// stack, since it also hands the request's deadline to the upstream layer as the try's.
#[derive(Debug, Clone)]
pub struct TryDeadline {
    timeout: Option<Duration>,
}

impl TryDeadline {
    /// A per-try timeout of `timeout` (`None`: off).
    pub fn new(timeout: Option<Duration>) -> Self {
        Self { timeout }
    }
}

impl Mechanism for TryDeadline {
    type Future<S: Inner> = Either<S::Future, Deadline<S::Future>>;

    fn apply<S: Inner>(self: &Arc<Self>, inner: &mut S, mut call: Call) -> Self::Future<S> {
        let at = match (self.timeout.map(|t| clock::now() + t), call.ctx.deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        call.ctx.try_deadline = at;
        let caller = call.ctx.try_deadline_is_callers();
        let fut = inner.call(call);
        match (self.timeout, at) {
            // The upstream layer enforces the same instant itself so that the endpoint's
            // breaker sees the timeout; this covers waiting in the bulkhead's queue.
            (Some(_), Some(at)) => Either::Right(Deadline::new(fut, at, caller)),
            _ => Either::Left(fut),
        }
    }
}

/// Puts the [`TryDeadline`] in front of a service.
pub type PerTryTimeoutLayer = ApplyLayer<TryDeadline>;
/// See [`PerTryTimeoutLayer`].
pub type PerTryTimeout<S> = Apply<TryDeadline, S>;

/// The time the caller still waits, from `x-outrigger-deadline-ms` or `grpc-timeout`.
pub fn caller_budget(headers: &HeaderMap) -> Option<Duration> {
    let ours = values::find(headers, &DEADLINE_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_millis);
    let grpc = values::find(headers, &GRPC_TIMEOUT).and_then(|v| parse_grpc_timeout(v.as_bytes()));
    match (ours, grpc) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Parses a `grpc-timeout` value: up to 8 digits and a unit (`H M S m u n`).
pub fn parse_grpc_timeout(v: &[u8]) -> Option<Duration> {
    let (unit, digits) = v.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Sets the time left before `deadline` on the headers a try sends.
pub fn propagate(headers: &mut TryHeaders, deadline: Instant, grpc: bool) {
    let left = deadline.saturating_duration_since(clock::now());
    // Round up so that a short but live budget never reads as "already expired".
    let ms = left.as_millis().max(1) as u64;
    if let Some(v) = values::decimal(ms, b"") {
        headers.set(&DEADLINE_HEADER, v);
    }
    if grpc {
        if let Some(v) = values::decimal(ms.min(99_999_999), b"m") {
            headers.set(&GRPC_TIMEOUT, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ProxyError;
    use http::HeaderValue;

    #[test]
    fn grpc_timeouts_parse() {
        assert_eq!(
            parse_grpc_timeout(b"100m"),
            Some(Duration::from_millis(100))
        );
        assert_eq!(parse_grpc_timeout(b"2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout(b"1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout(b"123456789m"), None);
        assert_eq!(parse_grpc_timeout(b"m"), None);
        assert_eq!(parse_grpc_timeout(b"10x"), None);
    }

    #[test]
    fn smallest_caller_budget_wins() {
        let mut h = HeaderMap::new();
        h.insert(DEADLINE_HEADER.clone(), HeaderValue::from_static("300"));
        h.insert(GRPC_TIMEOUT.clone(), HeaderValue::from_static("200m"));
        assert_eq!(caller_budget(&h), Some(Duration::from_millis(200)));
    }

    use crate::proxy::resilience::tests::{call, hang, Script};
    use crate::proxy::resilience::Call;
    use http::Method;
    use tower::{Layer, Service};

    /// Sends `c` through a route timeout of `route` to an upstream that never answers; returns
    /// the result and the time from the request's arrival to it (paused time: exact).
    async fn through_route_timeout(
        route: Option<Duration>,
        c: Call,
    ) -> (
        Result<crate::proxy::resilience::Response, ProxyError>,
        Duration,
    ) {
        let start = c.ctx.start;
        let mut svc = RouteTimeoutLayer::new(Some(Arc::new(RouteDeadline::new(route))))
            .layer(Script::new(|_, _| hang()));
        let result = svc.call(c).await;
        (result, start.elapsed())
    }

    #[tokio::test(start_paused = true)]
    async fn the_route_timeout_answers_timeout_at_its_deadline() {
        let (result, took) =
            through_route_timeout(Some(Duration::from_millis(300)), call(Method::GET, &[])).await;
        assert!(matches!(result, Err(ProxyError::Timeout)), "{result:?}");
        assert_eq!(took, Duration::from_millis(300));
    }

    #[tokio::test(start_paused = true)]
    async fn the_clock_starts_when_the_request_arrived() {
        let c = call(Method::GET, &[]);
        // Time spent above the route timeout (a throttle delay, a queue) counts.
        tokio::time::advance(Duration::from_millis(100)).await;
        let (result, took) = through_route_timeout(Some(Duration::from_millis(300)), c).await;
        assert!(matches!(result, Err(ProxyError::Timeout)));
        assert_eq!(took, Duration::from_millis(300));
    }

    #[tokio::test(start_paused = true)]
    async fn a_callers_shorter_deadline_wins_and_is_its_own_error() {
        let route = Some(Duration::from_millis(300));
        for (headers, at) in [
            (&[("x-outrigger-deadline-ms", "100")][..], 100),
            (&[("grpc-timeout", "50m")][..], 50),
            (
                &[("x-outrigger-deadline-ms", "200"), ("grpc-timeout", "80m")][..],
                80,
            ),
        ] {
            let (result, took) = through_route_timeout(route, call(Method::GET, headers)).await;
            assert!(
                matches!(result, Err(ProxyError::DeadlineExceeded)),
                "{headers:?}: {result:?}"
            );
            assert_eq!(took, Duration::from_millis(at), "{headers:?}");
        }
        // A longer one cannot lengthen the route's.
        let (result, took) = through_route_timeout(
            route,
            call(Method::GET, &[("x-outrigger-deadline-ms", "500")]),
        )
        .await;
        assert!(matches!(result, Err(ProxyError::Timeout)));
        assert_eq!(took, Duration::from_millis(300));
        // With the route timeout off, only the caller's applies.
        let (result, took) =
            through_route_timeout(None, call(Method::GET, &[("grpc-timeout", "2S")])).await;
        assert!(matches!(result, Err(ProxyError::DeadlineExceeded)));
        assert_eq!(took, Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn a_per_try_timeout_cuts_the_try_and_never_outlives_the_deadline() {
        let per_try = |t: Option<u64>| {
            PerTryTimeoutLayer::new(Some(Arc::new(TryDeadline::new(
                t.map(Duration::from_millis),
            ))))
        };
        // The try ends after its own timeout, well before the request's deadline.
        let inner = Script::new(|_, _| hang());
        let mut svc = per_try(Some(150)).layer(inner.clone());
        let mut c = call(Method::GET, &[]);
        let start = Instant::now();
        c.ctx.deadline = Some(start + Duration::from_secs(1));
        let result = svc.call(c).await;
        assert!(matches!(result, Err(ProxyError::Timeout)), "{result:?}");
        assert_eq!(start.elapsed(), Duration::from_millis(150));
        assert_eq!(
            inner.seen()[0].try_deadline,
            Some(start + Duration::from_millis(150)),
            "the upstream layer gets the same instant"
        );

        // A caller's deadline sooner than the per-try timeout ends the try as the caller's.
        let inner = Script::new(|_, _| hang());
        let mut svc = per_try(Some(150)).layer(inner.clone());
        let mut c = call(Method::GET, &[]);
        let start = Instant::now();
        c.ctx.deadline = Some(start + Duration::from_millis(100));
        c.ctx.caller_deadline = true;
        let result = svc.call(c).await;
        assert!(
            matches!(result, Err(ProxyError::DeadlineExceeded)),
            "{result:?}"
        );
        assert_eq!(start.elapsed(), Duration::from_millis(100));
        assert_eq!(
            inner.seen()[0].try_deadline,
            Some(start + Duration::from_millis(100))
        );

        // Without a per-try timeout the try carries the request's deadline and no timer of its own.
        let inner = Script::new(|_, _| hang());
        let mut svc = per_try(None).layer(inner.clone());
        let mut c = call(Method::GET, &[]);
        let deadline = Instant::now() + Duration::from_millis(700);
        c.ctx.deadline = Some(deadline);
        let waited = tokio::time::timeout(Duration::from_secs(10), svc.call(c)).await;
        assert!(waited.is_err(), "only the route timeout above ends it");
        assert_eq!(inner.seen()[0].try_deadline, Some(deadline));
    }

    #[tokio::test(start_paused = true)]
    async fn propagated_deadline_is_the_time_left() {
        let deadline = Instant::now() + Duration::from_millis(500);
        tokio::time::advance(Duration::from_millis(120)).await;
        let mut set = TryHeaders::default();
        propagate(&mut set, deadline, true);
        let mut h = HeaderMap::new();
        h.insert(DEADLINE_HEADER.clone(), HeaderValue::from_static("9000"));
        set.apply(&mut h);
        assert_eq!(h[&DEADLINE_HEADER], "380");
        assert_eq!(h[&GRPC_TIMEOUT], "380m");
        assert_eq!(h.len(), 2);
    }
}
