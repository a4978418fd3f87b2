//! Timeouts: the route timeout (the whole request, retries included) and the per-try timeout,
//! both answered with 504 `timeout`, and deadline propagation.
//!
//! The route timeout becomes a deadline that every layer below sees. A caller may shorten it by
//! sending `x-outrigger-deadline-ms` (set by an upstream Outrigger) or `grpc-timeout`; the upstream
//! layer sends the time left onward in the same headers, so the next hop stops working when the
//! caller has given up.

use std::sync::Arc;
use std::time::Duration;

use crate::error::ProxyError;
use crate::proxy::resilience::{Apply, ApplyLayer, Call, Inner, Mechanism, ResponseFuture};
use http::{HeaderMap, HeaderName, HeaderValue};
use tokio::time::Instant;

/// The header carrying the time a caller still waits, in milliseconds.
pub const DEADLINE_HEADER: HeaderName = HeaderName::from_static("x-outrigger-deadline-ms");
/// gRPC's own deadline header.
pub const GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");

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
    fn apply<S: Inner>(self: &Arc<Self>, inner: &mut S, mut call: Call) -> ResponseFuture {
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
        let expired = if caller {
            ProxyError::DeadlineExceeded
        } else {
            ProxyError::Timeout
        };
        match deadline {
            None => fut,
            Some(at) => Box::pin(async move {
                match tokio::time::timeout_at(at, fut).await {
                    Ok(result) => result,
                    Err(_) => Err(expired),
                }
            }),
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
    fn apply<S: Inner>(self: &Arc<Self>, inner: &mut S, mut call: Call) -> ResponseFuture {
        let at = match (self.timeout.map(|t| Instant::now() + t), call.ctx.deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        call.ctx.try_deadline = at;
        let expired = call.ctx.expired();
        let fut = inner.call(call);
        match (self.timeout, at) {
            (Some(_), Some(at)) => Box::pin(async move {
                // The upstream layer enforces the same instant itself so that the endpoint's
                // breaker sees the timeout; this covers waiting in the bulkhead's queue.
                match tokio::time::timeout_at(at, fut).await {
                    Ok(result) => result,
                    Err(_) => Err(expired),
                }
            }),
            _ => fut,
        }
    }
}

/// Puts the [`TryDeadline`] in front of a service.
pub type PerTryTimeoutLayer = ApplyLayer<TryDeadline>;
/// See [`PerTryTimeoutLayer`].
pub type PerTryTimeout<S> = Apply<TryDeadline, S>;

/// The time the caller still waits, from `x-outrigger-deadline-ms` or `grpc-timeout`.
pub fn caller_budget(headers: &HeaderMap) -> Option<Duration> {
    let ours = headers
        .get(DEADLINE_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_millis);
    let grpc = headers
        .get(GRPC_TIMEOUT)
        .and_then(|v| parse_grpc_timeout(v.as_bytes()));
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

/// Writes the time left before `deadline` into the outgoing headers.
pub fn propagate(headers: &mut HeaderMap, deadline: Instant, grpc: bool) {
    let left = deadline.saturating_duration_since(Instant::now());
    // Round up so that a short but live budget never reads as "already expired".
    let ms = left.as_millis().max(1) as u64;
    headers.insert(DEADLINE_HEADER, HeaderValue::from(ms));
    if grpc {
        if let Ok(v) = HeaderValue::from_str(&format!("{}m", ms.min(99_999_999))) {
            headers.insert(GRPC_TIMEOUT, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        h.insert(DEADLINE_HEADER, HeaderValue::from_static("300"));
        h.insert(GRPC_TIMEOUT, HeaderValue::from_static("200m"));
        assert_eq!(caller_budget(&h), Some(Duration::from_millis(200)));
    }

    #[tokio::test(start_paused = true)]
    async fn propagated_deadline_is_the_time_left() {
        let deadline = Instant::now() + Duration::from_millis(500);
        tokio::time::advance(Duration::from_millis(120)).await;
        let mut h = HeaderMap::new();
        propagate(&mut h, deadline, true);
        assert_eq!(h[DEADLINE_HEADER], "380");
        assert_eq!(h[GRPC_TIMEOUT], "380m");
    }
}
