//! The resilience part of the config: retries, hedging, budgets, breakers, bulkheads, rate limits,
//! load shedding and fault injection — their YAML shape, their typed form and their checks.
//!
//! Defaults are chosen so that a route with no policy written still gets a bounded retry under a
//! budget, a timeout and a circuit breaker; every default is listed in `config/README.md`.

use std::time::Duration;

use http::HeaderName;
use serde::{Deserialize, Serialize};

use super::validate::Validator;

/// Attempts per request (first try included) when a route names none.
pub const DEFAULT_ATTEMPTS: u32 = 3;
/// Base of the exponential backoff between tries.
pub const DEFAULT_BACKOFF_BASE: Duration = Duration::from_millis(25);
/// Cap of the exponential backoff between tries.
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_millis(250);
/// Longest `Retry-After` the proxy waits for before retrying; longer answers are returned as is.
pub const DEFAULT_RETRY_AFTER_MAX: Duration = Duration::from_secs(1);
/// Request bodies up to this size are kept for a retry; larger ones stream and are not retried.
pub const DEFAULT_MAX_RETRY_BODY: u64 = 64 * 1024;

/// The `retry:` block of a route.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawRetry {
    /// Total tries including the first; `1` turns retries off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempts: Option<u32>,
    /// Conditions that make a try worth repeating.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_on: Option<Vec<String>>,
    /// Extra status codes that are retried.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub statuses: Vec<u16>,
    /// gRPC status names (e.g. `unavailable`) that are retried, read from headers and trailers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub grpc_codes: Vec<String>,
    /// Time allowed for one try to produce response headers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_try_timeout: Option<String>,
    /// First backoff cap; doubles per retry, with full jitter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff_base: Option<String>,
    /// Largest backoff cap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff_max: Option<String>,
    /// Longest `Retry-After` honoured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_max: Option<String>,
    /// Largest request body kept for a retry, in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_body_bytes: Option<u64>,
    /// Also retry methods that are not idempotent once they were sent.
    #[serde(default)]
    pub non_idempotent: bool,
}

/// The `hedge:` block of a route.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawHedge {
    /// A delay such as `50ms`, or a latency percentile of the cluster such as `p95`.
    pub after: String,
    /// Extra tries sent while the first is outstanding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<u32>,
}

/// The `retry_budget:` block of a cluster.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawBudget {
    /// Retries allowed as a percentage of requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<f32>,
    /// Retries always allowed per second, whatever the request rate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_per_sec: Option<u32>,
    /// How long a request counts towards the budget.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<String>,
}

/// The `circuit_breaker:` block of a cluster.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawBreaker {
    /// `false` turns the breakers off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// Failure percentage over the window that opens the circuit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_rate: Option<u32>,
    /// Consecutive failures that open the circuit; `0` disables this trigger.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_failures: Option<u32>,
    /// Percentage of calls slower than `slow_call_duration` that opens the circuit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slow_call_rate: Option<u32>,
    /// What counts as a slow call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slow_call_duration: Option<String>,
    /// Count-based window: the last N calls.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_calls: Option<u32>,
    /// Time-based window: calls of the last duration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_duration: Option<String>,
    /// Calls the window must hold before rates are judged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minimum_calls: Option<u32>,
    /// First open period; doubles on each reopening, with jitter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub open_duration: Option<String>,
    /// Cap on the open period.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_open_duration: Option<String>,
    /// Probe requests admitted while half-open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub half_open_probes: Option<u32>,
    /// Also keep one breaker per endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_endpoint: Option<bool>,
}

/// The `bulkhead:` block of a cluster or route.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawBulkhead {
    /// Requests in flight at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent: Option<u32>,
    /// Requests waiting for a slot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_pending: Option<u32>,
    /// Longest wait for a slot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_timeout: Option<String>,
}

/// The `rate_limit:` block of a route.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawRateLimit {
    /// Sustained rate.
    pub requests_per_second: f64,
    /// Requests allowed at once above the sustained rate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
    /// `none` (one bucket), `client_ip`, or `header:NAME`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// `reject` (429 at once) or `throttle` (delay up to `max_delay`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// Longest delay in throttle mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_delay: Option<String>,
    /// `local` (this sidecar alone, the default) or `mesh` (shared by every sidecar serving it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    /// The mesh-wide limit's name in the group (default: the route's name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// With `scope: mesh`: `local_share` (default), `fail_open` or `fail_closed` while the group
    /// cannot be reached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_partition: Option<String>,
}

/// The `load_shed:` block of a listener.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawLoadShed {
    /// `gradient` (default) or `aimd`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub algorithm: Option<String>,
    /// Concurrency limit at start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_limit: Option<u32>,
    /// Lowest the limit may go.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_limit: Option<u32>,
    /// Highest the limit may go.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_limit: Option<u32>,
    /// Longest a request may queue for a slot before it is shed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_timeout: Option<String>,
    /// Requests that may queue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_queue: Option<u32>,
    /// Header carrying a request's priority (`0` highest .. `9` lowest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_header: Option<String>,
    /// Latency inflation over the minimum RTT tolerated before the limit shrinks (gradient).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerance: Option<f64>,
}

/// The `fault:` block of a route.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawFault {
    /// Delay some requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<RawFaultDelay>,
    /// Answer some requests with an error at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort: Option<RawFaultAbort>,
}

/// Fault delay settings.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawFaultDelay {
    /// Share of requests delayed, 0–100.
    pub percent: f64,
    /// The delay.
    pub duration: String,
}

/// Fault abort settings.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawFaultAbort {
    /// Share of requests aborted, 0–100.
    pub percent: f64,
    /// Status of the injected answer.
    pub status: u16,
}

/// Which failures a retry repeats.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetryOn {
    /// No connection could be made (nothing was sent).
    pub connect_failure: bool,
    /// The HTTP/2 peer refused the stream (nothing was processed).
    pub refused_stream: bool,
    /// The connection was reset or closed before a response.
    pub reset: bool,
    /// A try ran out of its per-try timeout.
    pub timeout: bool,
    /// Any 5xx answer.
    pub status_5xx: bool,
    /// 502, 503 and 504.
    pub gateway_error: bool,
    /// 429 (honouring `Retry-After`).
    pub too_many_requests: bool,
    /// Further status codes.
    pub statuses: Vec<u16>,
    /// gRPC codes, as a bit set indexed by code.
    pub grpc_codes: u32,
}

/// Names accepted in `retry_on`.
pub const RETRY_ON_NAMES: &[&str] = &[
    "connect-failure",
    "refused-stream",
    "reset",
    "timeout",
    "5xx",
    "gateway-error",
    "429",
];

/// gRPC status names in code order (0 = ok .. 16 = unauthenticated).
pub const GRPC_CODE_NAMES: [&str; 17] = [
    "ok",
    "cancelled",
    "unknown",
    "invalid-argument",
    "deadline-exceeded",
    "not-found",
    "already-exists",
    "permission-denied",
    "resource-exhausted",
    "failed-precondition",
    "aborted",
    "out-of-range",
    "unimplemented",
    "internal",
    "unavailable",
    "data-loss",
    "unauthenticated",
];

/// When a hedge is sent.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum HedgeAfter {
    /// After this long without a response.
    Delay(Duration),
    /// After the cluster's latency percentile (0–100) has passed.
    Percentile(f64),
}

/// Hedging settings of a route.
#[derive(Debug, Clone, PartialEq)]
pub struct HedgeConfig {
    /// When to send the hedge.
    pub after: HedgeAfter,
    /// Extra tries at most.
    pub max: u32,
}

/// A route's retry policy.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryConfig {
    /// Total tries including the first.
    pub attempts: u32,
    /// What is retried.
    pub on: RetryOn,
    /// Time allowed per try, to response headers.
    pub per_try_timeout: Option<Duration>,
    /// First backoff cap.
    pub backoff_base: Duration,
    /// Largest backoff cap.
    pub backoff_max: Duration,
    /// Longest `Retry-After` honoured.
    pub retry_after_max: Duration,
    /// Largest body kept for a retry.
    pub max_body: u64,
    /// Retry non-idempotent methods after they were sent.
    pub non_idempotent: bool,
    /// Hedging, when enabled.
    pub hedge: Option<HedgeConfig>,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            attempts: DEFAULT_ATTEMPTS,
            on: RetryOn {
                connect_failure: true,
                refused_stream: true,
                reset: true,
                gateway_error: true,
                ..RetryOn::default()
            },
            per_try_timeout: None,
            backoff_base: DEFAULT_BACKOFF_BASE,
            backoff_max: DEFAULT_BACKOFF_MAX,
            retry_after_max: DEFAULT_RETRY_AFTER_MAX,
            max_body: DEFAULT_MAX_RETRY_BODY,
            non_idempotent: false,
            hedge: None,
        }
    }
}

/// A cluster's retry budget.
#[derive(Debug, Clone, PartialEq)]
pub struct BudgetConfig {
    /// Retries as a share of requests, 0.0–1.0.
    pub ratio: f32,
    /// Retries always allowed per second.
    pub min_per_sec: u32,
    /// How long a request counts.
    pub ttl: Duration,
}

impl Default for BudgetConfig {
    fn default() -> Self {
        Self {
            ratio: 0.2,
            min_per_sec: 10,
            ttl: Duration::from_secs(10),
        }
    }
}

/// How a breaker's window is measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    /// The last N calls.
    Calls(u32),
    /// The calls of the last duration.
    Time(Duration),
}

/// A cluster's circuit-breaker settings (applied per cluster and, if set, per endpoint).
#[derive(Debug, Clone, PartialEq)]
pub struct BreakerConfig {
    /// Failure percentage that opens; 0 disables.
    pub failure_rate: u32,
    /// Consecutive failures that open; 0 disables.
    pub consecutive_failures: u32,
    /// Slow-call percentage that opens; 0 disables.
    pub slow_call_rate: u32,
    /// What is slow.
    pub slow_call_duration: Duration,
    /// The window.
    pub window: Window,
    /// Calls needed before rates count.
    pub minimum_calls: u32,
    /// First open period.
    pub open_duration: Duration,
    /// Open period cap.
    pub max_open_duration: Duration,
    /// Probes while half-open.
    pub half_open_probes: u32,
    /// One breaker per endpoint as well.
    pub per_endpoint: bool,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            failure_rate: 50,
            consecutive_failures: 0,
            slow_call_rate: 0,
            slow_call_duration: Duration::from_secs(1),
            window: Window::Time(Duration::from_secs(10)),
            minimum_calls: 20,
            open_duration: Duration::from_secs(5),
            max_open_duration: Duration::from_secs(60),
            half_open_probes: 3,
            per_endpoint: false,
        }
    }
}

/// Consecutive failures that open an endpoint's own breaker when the cluster's setting is 0.
pub const DEFAULT_ENDPOINT_CONSECUTIVE_FAILURES: u32 = 5;

/// Bulkhead settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BulkheadConfig {
    /// Requests in flight at once.
    pub max_concurrent: u32,
    /// Requests waiting.
    pub max_pending: u32,
    /// Longest wait.
    pub queue_timeout: Duration,
}

impl Default for BulkheadConfig {
    fn default() -> Self {
        Self {
            max_concurrent: 1024,
            max_pending: 1024,
            queue_timeout: Duration::from_secs(1),
        }
    }
}

/// What a rate limit counts requests by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RateKey {
    /// One bucket for the route.
    None,
    /// One bucket per client IP.
    ClientIp,
    /// One bucket per value of this header (requests without it share one bucket).
    Header(HeaderName),
    /// One bucket per verified client TLS identity (its first SAN); clients without one share one.
    PeerIdentity,
}

/// A route's rate limit.
#[derive(Debug, Clone, PartialEq)]
pub struct RateLimitConfig {
    /// Sustained rate.
    pub rate: f64,
    /// Burst size.
    pub burst: u32,
    /// Bucket key.
    pub key: RateKey,
    /// `None` rejects at once; `Some(d)` throttles up to `d`.
    pub max_delay: Option<Duration>,
    /// Set when the limit is shared by every sidecar that serves it (`scope: mesh`).
    pub mesh: Option<MeshScope>,
}

/// A rate limit shared by the mesh: its name in the group and its behaviour when cut off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshScope {
    /// The limit's name in the group (every sidecar naming it shares its rate).
    pub name: String,
    /// What the sidecar admits while it holds no unexpired share.
    pub on_partition: OnPartition,
}

/// What a sidecar admits under a mesh-wide limit while it cannot reach the group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnPartition {
    /// The rate divided by the sidecars it last knew shared the limit (the default).
    LocalShare,
    /// Everything: the limit is off until the group answers again.
    FailOpen,
    /// Nothing: every request is refused until the group answers again.
    FailClosed,
}

/// The adaptive limiter's algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShedAlgorithm {
    /// Gradient of minimum over recent latency (Netflix concurrency-limits' Gradient2).
    Gradient,
    /// Additive increase, multiplicative decrease on latency above the baseline or on drops.
    Aimd,
}

/// A listener's load shedding.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadShedConfig {
    /// Algorithm.
    pub algorithm: ShedAlgorithm,
    /// Starting limit.
    pub initial_limit: u32,
    /// Floor.
    pub min_limit: u32,
    /// Ceiling.
    pub max_limit: u32,
    /// Queue wait before shedding.
    pub queue_timeout: Duration,
    /// Queue length.
    pub max_queue: u32,
    /// Priority header.
    pub priority_header: HeaderName,
    /// Tolerated latency inflation (≥ 1).
    pub tolerance: f64,
}

/// A route's fault injection.
#[derive(Debug, Clone, PartialEq)]
pub struct FaultConfig {
    /// Share delayed (0–1) and the delay.
    pub delay: Option<(f64, Duration)>,
    /// Share aborted (0–1) and the status.
    pub abort: Option<(f64, http::StatusCode)>,
}

impl Validator {
    pub(super) fn retry(
        &mut self,
        path: &str,
        raw: Option<&RawRetry>,
        hedge: Option<&RawHedge>,
    ) -> RetryConfig {
        let mut c = RetryConfig::default();
        if let Some(r) = raw {
            if let Some(a) = r.attempts {
                if a == 0 {
                    self.problem_with_hint(
                        format!("{path}.retry.attempts"),
                        "attempts counts the first try too, so it must be at least 1".into(),
                        Some("`attempts: 1` turns retries off".into()),
                    );
                }
                c.attempts = a.max(1);
            }
            if let Some(names) = &r.retry_on {
                c.on = RetryOn::default();
                for (k, name) in names.iter().enumerate() {
                    match name.as_str() {
                        "connect-failure" => c.on.connect_failure = true,
                        "refused-stream" => c.on.refused_stream = true,
                        "reset" => c.on.reset = true,
                        "timeout" => c.on.timeout = true,
                        "5xx" => c.on.status_5xx = true,
                        "gateway-error" => c.on.gateway_error = true,
                        "429" => c.on.too_many_requests = true,
                        other => {
                            let hint =
                                super::validate::nearest(other, RETRY_ON_NAMES.iter().copied())
                                    .map(|n| format!("did you mean `{n}`?"))
                                    .or_else(|| {
                                        Some(format!("one of: {}", RETRY_ON_NAMES.join(", ")))
                                    });
                            self.problem_with_hint(
                                format!("{path}.retry.retry_on[{k}]"),
                                format!("unknown retry condition `{other}`"),
                                hint,
                            );
                        }
                    }
                }
            }
            for (k, s) in r.statuses.iter().enumerate() {
                if !(100..=599).contains(s) {
                    self.problem(
                        format!("{path}.retry.statuses[{k}]"),
                        format!("`{s}` is not an HTTP status code"),
                    );
                }
            }
            c.on.statuses.clone_from(&r.statuses);
            for (k, name) in r.grpc_codes.iter().enumerate() {
                let normal = name.to_ascii_lowercase().replace('_', "-");
                match GRPC_CODE_NAMES.iter().position(|n| *n == normal) {
                    Some(0) | None => {
                        let hint =
                            super::validate::nearest(&normal, GRPC_CODE_NAMES[1..].iter().copied())
                                .map(|n| format!("did you mean `{n}`?"));
                        self.problem_with_hint(
                            format!("{path}.retry.grpc_codes[{k}]"),
                            format!("`{name}` is not a retryable gRPC status"),
                            hint,
                        );
                    }
                    Some(code) => c.on.grpc_codes |= 1 << code,
                }
            }
            c.per_try_timeout = self.positive(
                &format!("{path}.retry.per_try_timeout"),
                r.per_try_timeout.as_deref(),
            );
            if let Some(d) = self.positive(
                &format!("{path}.retry.backoff_base"),
                r.backoff_base.as_deref(),
            ) {
                c.backoff_base = d;
            }
            if let Some(d) = self.positive(
                &format!("{path}.retry.backoff_max"),
                r.backoff_max.as_deref(),
            ) {
                c.backoff_max = d;
            }
            if c.backoff_max < c.backoff_base {
                self.problem(
                    format!("{path}.retry.backoff_max"),
                    "backoff_max is below backoff_base".into(),
                );
            }
            if let Some(d) = self.duration(
                &format!("{path}.retry.retry_after_max"),
                r.retry_after_max.as_deref(),
            ) {
                c.retry_after_max = d;
            }
            if let Some(b) = r.max_body_bytes {
                c.max_body = b;
            }
            c.non_idempotent = r.non_idempotent;
        }
        if let Some(h) = hedge {
            let hpath = format!("{path}.hedge.after");
            let after = if let Some(p) = h.after.strip_prefix('p') {
                match p.parse::<f64>() {
                    Ok(p) if p > 0.0 && p < 100.0 => Some(HedgeAfter::Percentile(p)),
                    _ => {
                        self.problem_with_hint(
                            hpath,
                            format!("invalid percentile `{}`", h.after),
                            Some("write e.g. `p95` or `p99.9`".into()),
                        );
                        None
                    }
                }
            } else {
                self.positive(&hpath, Some(&h.after)).map(HedgeAfter::Delay)
            };
            let max = h.max.unwrap_or(1);
            if max == 0 {
                self.problem(
                    format!("{path}.hedge.max"),
                    "max must be at least 1; remove `hedge:` to turn hedging off".into(),
                );
            }
            c.hedge = after.map(|after| HedgeConfig { after, max });
        }
        c
    }

    pub(super) fn budget(&mut self, path: &str, raw: Option<&RawBudget>) -> BudgetConfig {
        let mut c = BudgetConfig::default();
        let Some(b) = raw else { return c };
        if let Some(p) = b.percent {
            if !(0.0..=1000.0).contains(&p) {
                self.problem(
                    format!("{path}.retry_budget.percent"),
                    format!("percent `{p}` is outside 0..=1000"),
                );
            }
            c.ratio = p.clamp(0.0, 1000.0) / 100.0;
        }
        if let Some(m) = b.min_per_sec {
            if m > 1_000_000 {
                self.problem(
                    format!("{path}.retry_budget.min_per_sec"),
                    "min_per_sec is at most 1000000".into(),
                );
            }
            c.min_per_sec = m.min(1_000_000);
        }
        let ttl_path = format!("{path}.retry_budget.ttl");
        if let Some(t) = self.duration(&ttl_path, b.ttl.as_deref()) {
            if !(Duration::from_secs(1)..=Duration::from_secs(60)).contains(&t) {
                self.problem(ttl_path, "ttl must be between 1s and 60s".into());
            } else {
                c.ttl = t;
            }
        }
        c
    }

    pub(super) fn breaker(
        &mut self,
        path: &str,
        raw: Option<&RawBreaker>,
    ) -> Option<BreakerConfig> {
        let mut c = BreakerConfig::default();
        let Some(b) = raw else { return Some(c) };
        let p = |f: &str| format!("{path}.circuit_breaker.{f}");
        for (name, v) in [
            ("failure_rate", b.failure_rate),
            ("slow_call_rate", b.slow_call_rate),
        ] {
            if v.is_some_and(|v| v > 100) {
                self.problem(p(name), format!("{name} is a percentage, at most 100"));
            }
        }
        if let Some(v) = b.failure_rate {
            c.failure_rate = v;
        }
        if let Some(v) = b.slow_call_rate {
            c.slow_call_rate = v;
        }
        if let Some(v) = b.consecutive_failures {
            c.consecutive_failures = v;
        }
        if let Some(d) = self.positive(&p("slow_call_duration"), b.slow_call_duration.as_deref()) {
            c.slow_call_duration = d;
        }
        match (b.window_calls, b.window_duration.as_deref()) {
            (Some(_), Some(_)) => self.problem(
                p("window_calls"),
                "give either `window_calls` or `window_duration`, not both".into(),
            ),
            (Some(0), None) => {
                self.problem(p("window_calls"), "window_calls must be at least 1".into())
            }
            (Some(n), None) => c.window = Window::Calls(n),
            (None, Some(d)) => {
                if let Some(d) = self.positive(&p("window_duration"), Some(d)) {
                    c.window = Window::Time(d);
                }
            }
            (None, None) => {}
        }
        if let Some(m) = b.minimum_calls {
            c.minimum_calls = m.max(1);
        }
        if let Some(d) = self.positive(&p("open_duration"), b.open_duration.as_deref()) {
            c.open_duration = d;
        }
        if let Some(d) = self.positive(&p("max_open_duration"), b.max_open_duration.as_deref()) {
            c.max_open_duration = d;
        }
        if c.max_open_duration < c.open_duration {
            self.problem(
                p("max_open_duration"),
                "max_open_duration is below open_duration".into(),
            );
        }
        if let Some(n) = b.half_open_probes {
            if n == 0 {
                self.problem(
                    p("half_open_probes"),
                    "half_open_probes must be at least 1".into(),
                );
            }
            c.half_open_probes = n.max(1);
        }
        if let Some(e) = b.per_endpoint {
            c.per_endpoint = e;
        }
        (b.enabled != Some(false)).then_some(c)
    }

    pub(super) fn bulkhead(&mut self, path: &str, raw: &RawBulkhead) -> BulkheadConfig {
        let mut c = BulkheadConfig::default();
        if let Some(n) = raw.max_concurrent {
            if n == 0 {
                self.problem(
                    format!("{path}.bulkhead.max_concurrent"),
                    "max_concurrent must be at least 1".into(),
                );
            }
            c.max_concurrent = n.max(1);
        }
        if let Some(n) = raw.max_pending {
            c.max_pending = n;
        }
        if let Some(d) = self.duration(
            &format!("{path}.bulkhead.queue_timeout"),
            raw.queue_timeout.as_deref(),
        ) {
            c.queue_timeout = d;
        }
        c
    }

    pub(super) fn rate_limit(
        &mut self,
        path: &str,
        route_name: &str,
        r: &RawRateLimit,
    ) -> Option<RateLimitConfig> {
        let before = self.problems.len();
        let p = |f: &str| format!("{path}.rate_limit.{f}");
        if !(r.requests_per_second.is_finite() && r.requests_per_second > 0.0) {
            self.problem(
                p("requests_per_second"),
                "requests_per_second must be greater than 0".into(),
            );
        } else if !(0.001..=1e9).contains(&r.requests_per_second) {
            self.problem(
                p("requests_per_second"),
                "requests_per_second must be between 0.001 and 1000000000".into(),
            );
        }
        let burst = r
            .burst
            .unwrap_or_else(|| (r.requests_per_second.ceil() as u32).max(1));
        if burst == 0 {
            self.problem(p("burst"), "burst must be at least 1".into());
        }
        let key = match r.key.as_deref() {
            None | Some("none") => RateKey::None,
            Some("client_ip") => RateKey::ClientIp,
            Some("peer_identity") => RateKey::PeerIdentity,
            Some(k) => match k
                .strip_prefix("header:")
                .map(|h| HeaderName::from_bytes(h.trim().as_bytes()))
            {
                Some(Ok(h)) => RateKey::Header(h),
                _ => {
                    self.problem_with_hint(
                        p("key"),
                        format!("invalid key `{k}`"),
                        Some("one of `none`, `client_ip`, `peer_identity`, `header:NAME`".into()),
                    );
                    RateKey::None
                }
            },
        };
        let max_delay = self.duration(&p("max_delay"), r.max_delay.as_deref());
        let max_delay = match r.mode.as_deref() {
            None | Some("reject") => {
                if max_delay.is_some() {
                    self.problem_with_hint(
                        p("max_delay"),
                        "max_delay only applies in throttle mode".into(),
                        Some("add `mode: throttle`".into()),
                    );
                }
                None
            }
            Some("throttle") => Some(max_delay.unwrap_or(Duration::from_secs(1))),
            Some(m) => {
                self.problem_with_hint(
                    p("mode"),
                    format!("unknown mode `{m}`"),
                    Some("`reject` or `throttle`".into()),
                );
                None
            }
        };
        let on_partition = match r.on_partition.as_deref() {
            None | Some("local_share") => OnPartition::LocalShare,
            Some("fail_open") => OnPartition::FailOpen,
            Some("fail_closed") => OnPartition::FailClosed,
            Some(o) => {
                self.problem_with_hint(
                    p("on_partition"),
                    format!("unknown on_partition `{o}`"),
                    Some("`local_share`, `fail_open` or `fail_closed`".into()),
                );
                OnPartition::LocalShare
            }
        };
        let mesh = match r.scope.as_deref() {
            None | Some("local") => {
                for (field, set) in [
                    ("name", r.name.is_some()),
                    ("on_partition", r.on_partition.is_some()),
                ] {
                    if set {
                        self.problem_with_hint(
                            p(field),
                            format!("`{field}` only applies to a mesh-wide limit"),
                            Some("add `scope: mesh`".into()),
                        );
                    }
                }
                None
            }
            Some("mesh") => Some(MeshScope {
                name: r.name.clone().unwrap_or_else(|| route_name.to_owned()),
                on_partition,
            }),
            Some(s) => {
                self.problem_with_hint(
                    p("scope"),
                    format!("unknown scope `{s}`"),
                    Some("`local` or `mesh`".into()),
                );
                None
            }
        };
        (self.problems.len() == before).then(|| RateLimitConfig {
            rate: r.requests_per_second,
            burst,
            key,
            max_delay,
            mesh,
        })
    }

    pub(super) fn load_shed(&mut self, path: &str, r: &RawLoadShed) -> Option<LoadShedConfig> {
        let before = self.problems.len();
        let p = |f: &str| format!("{path}.load_shed.{f}");
        let algorithm = match r.algorithm.as_deref() {
            None | Some("gradient") => ShedAlgorithm::Gradient,
            Some("aimd") => ShedAlgorithm::Aimd,
            Some(a) => {
                self.problem_with_hint(
                    p("algorithm"),
                    format!("unknown algorithm `{a}`"),
                    Some("`gradient` or `aimd`".into()),
                );
                ShedAlgorithm::Gradient
            }
        };
        let min_limit = r.min_limit.unwrap_or(4).max(1);
        let max_limit = r.max_limit.unwrap_or(1000);
        let initial_limit = r.initial_limit.unwrap_or(20);
        if !(min_limit <= initial_limit && initial_limit <= max_limit) {
            self.problem(
                p("initial_limit"),
                format!("need min_limit ({min_limit}) <= initial_limit ({initial_limit}) <= max_limit ({max_limit})"),
            );
        }
        let queue_timeout = self
            .duration(&p("queue_timeout"), r.queue_timeout.as_deref())
            .unwrap_or(Duration::from_millis(2));
        let tolerance = r.tolerance.unwrap_or(1.2);
        if !(1.0..=10.0).contains(&tolerance) {
            self.problem(
                p("tolerance"),
                format!("tolerance `{tolerance}` is outside 1.0..=10.0"),
            );
        }
        let header = r
            .priority_header
            .as_deref()
            .unwrap_or("x-outrigger-priority");
        let priority_header = match HeaderName::from_bytes(header.as_bytes()) {
            Ok(h) => Some(h),
            Err(_) => {
                self.problem(
                    p("priority_header"),
                    format!("invalid header name `{header}`"),
                );
                None
            }
        };
        let max_queue = r.max_queue.unwrap_or(max_limit);
        (self.problems.len() == before).then(|| LoadShedConfig {
            algorithm,
            initial_limit,
            min_limit,
            max_limit,
            queue_timeout,
            max_queue,
            priority_header: priority_header
                .unwrap_or_else(|| HeaderName::from_static("x-outrigger-priority")),
            tolerance,
        })
    }

    pub(super) fn fault(&mut self, path: &str, f: &RawFault) -> FaultConfig {
        let mut c = FaultConfig {
            delay: None,
            abort: None,
        };
        let pct = |v: &mut Self, field: &str, x: f64| {
            if !(0.0..=100.0).contains(&x) {
                v.problem(
                    format!("{path}.fault.{field}.percent"),
                    format!("percent `{x}` is outside 0..=100"),
                );
            }
            x.clamp(0.0, 100.0) / 100.0
        };
        if let Some(d) = &f.delay {
            let share = pct(self, "delay", d.percent);
            if let Some(dur) =
                self.duration(&format!("{path}.fault.delay.duration"), Some(&d.duration))
            {
                c.delay = Some((share, dur));
            }
        }
        if let Some(a) = &f.abort {
            let share = pct(self, "abort", a.percent);
            match http::StatusCode::from_u16(a.status) {
                Ok(s) if s.as_u16() >= 200 => c.abort = Some((share, s)),
                _ => self.problem(
                    format!("{path}.fault.abort.status"),
                    format!("`{}` is not a final HTTP status", a.status),
                ),
            }
        }
        c
    }

    fn positive(&mut self, path: &str, text: Option<&str>) -> Option<Duration> {
        let d = self.duration(path, text)?;
        if d.is_zero() {
            self.problem(path.to_owned(), "must be greater than 0".into());
            return None;
        }
        Some(d)
    }
}
