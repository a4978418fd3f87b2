//! `outrigger explain`: what every route does once the defaults are applied, the figures that
//! follow from its policies (the worst latency a caller can see, how much load a request can
//! become upstream, how long a dead endpoint keeps traffic), and warnings for combinations that
//! are known to surprise operators, each with a one-line fix.
//!
//! Everything here is derived from a validated [`Config`]: no socket is opened. The JSON form is
//! described by `config/explain.schema.json`.

use std::time::Duration;

use serde::Serialize;

use super::resilience::{BreakerConfig, HedgeAfter, RetryConfig, Window};
use super::upstream::{CheckKind, Detector, Discovery, DnsQuery};
use super::validate::{
    ClusterConfig, Config, HeaderValueMatch, ListenerKind, PathMatch, RouteConfig, RouteMatch,
};

/// The whole report: one entry per HTTP route, then every warning.
#[derive(Debug, Serialize)]
pub struct Explanation {
    /// The routes, in listener and match order.
    pub routes: Vec<RouteReport>,
    /// The traps found, in route order.
    pub warnings: Vec<Warning>,
}

/// One route's effective policy and derived figures.
#[derive(Debug, Serialize)]
pub struct RouteReport {
    /// Listener the route belongs to.
    pub listener: String,
    /// Route name.
    pub route: String,
    /// Route timeout (all tries, to response headers), milliseconds; null when off.
    pub timeout_ms: Option<u64>,
    /// Retry policy as it runs.
    pub retry: RetryReport,
    /// Hedging, when on.
    pub hedge: Option<HedgeReport>,
    /// The route's rate limit, when set.
    pub rate_limit: Option<RateLimitReport>,
    /// The route's own bulkhead, when set.
    pub bulkhead: Option<BulkheadReport>,
    /// The listener's load shedding, when on.
    pub load_shed: Option<LoadShedReport>,
    /// The clusters the route sends to, with their share.
    pub clusters: Vec<ClusterReport>,
    /// The figures that follow from the above.
    pub derived: RouteFigures,
}

/// A retry policy.
#[derive(Debug, Serialize)]
pub struct RetryReport {
    /// Total tries, the first included.
    pub attempts: u32,
    /// Conditions retried (`retry_on` names, extra statuses, gRPC codes).
    pub on: Vec<String>,
    /// Time one try has, milliseconds; null for none (only the route timeout).
    pub per_try_timeout_ms: Option<u64>,
    /// Cap of the first backoff, milliseconds.
    pub backoff_base_ms: u64,
    /// Largest backoff cap, milliseconds.
    pub backoff_max_ms: u64,
    /// Longest `Retry-After` waited for, milliseconds.
    pub retry_after_max_ms: u64,
    /// Whether non-idempotent methods are resent after reaching the upstream.
    pub non_idempotent: bool,
}

/// Hedging settings.
#[derive(Debug, Serialize)]
pub struct HedgeReport {
    /// `50ms` or `p95`.
    pub after: String,
    /// Extra tries at most.
    pub max: u32,
}

/// A rate limit.
#[derive(Debug, Serialize)]
pub struct RateLimitReport {
    /// Requests per second.
    pub requests_per_second: f64,
    /// Burst.
    pub burst: u32,
    /// `local` (this sidecar) or `mesh` (shared by every sidecar serving it).
    pub scope: &'static str,
}

/// A bulkhead.
#[derive(Debug, Serialize)]
pub struct BulkheadReport {
    /// Requests in flight at once.
    pub max_concurrent: u32,
    /// Requests waiting for a slot.
    pub max_pending: u32,
    /// Longest wait for a slot, milliseconds.
    pub queue_timeout_ms: u64,
}

/// Load shedding.
#[derive(Debug, Serialize)]
pub struct LoadShedReport {
    /// `gradient` or `aimd`.
    pub algorithm: &'static str,
    /// Starting concurrency limit.
    pub initial_limit: u32,
    /// Floor.
    pub min_limit: u32,
    /// Ceiling.
    pub max_limit: u32,
}

/// A cluster as a route uses it.
#[derive(Debug, Serialize)]
pub struct ClusterReport {
    /// Cluster name.
    pub name: String,
    /// The route's weight for it.
    pub weight: u32,
    /// `static (N endpoints)`, `dns NAME` or `registry SERVICE`.
    pub discovery: String,
    /// Balancer name.
    pub load_balancer: &'static str,
    /// Connect timeout, milliseconds.
    pub connect_timeout_ms: u64,
    /// The circuit breaker, in one sentence; null when off.
    pub circuit_breaker: Option<String>,
    /// The cluster's bulkhead.
    pub bulkhead: BulkheadReport,
    /// Retries and hedges allowed, as a percentage of requests.
    pub retry_budget_percent: f64,
    /// Retries always allowed per second.
    pub retry_budget_min_per_sec: u32,
    /// Active health checks, in one sentence; null when off.
    pub health_check: Option<String>,
    /// Outlier ejection, in one sentence; null when off.
    pub outlier_detection: Option<String>,
    /// Below this percentage of available endpoints, all are used.
    pub panic_threshold: u32,
    /// How long a dead endpoint keeps receiving traffic.
    pub dead_endpoint: DeadEndpoint,
}

/// How a dead endpoint leaves rotation.
#[derive(Debug, Serialize)]
pub struct DeadEndpoint {
    /// Longest time until active checks mark it unhealthy, milliseconds; null without
    /// threshold checks.
    pub detected_by_checks_within_ms: Option<u64>,
    /// Failed tries in a row that eject it; null without outlier detection.
    pub ejected_after_failures: Option<u32>,
    /// How long its first ejection lasts, milliseconds; null without outlier detection.
    pub first_ejection_ms: Option<u64>,
    /// The same, in one sentence.
    pub summary: String,
}

/// Figures derived from a route's policies.
#[derive(Debug, Serialize)]
pub struct RouteFigures {
    /// Most tries one request can make (retries and hedges).
    pub max_tries: u32,
    /// Longest a caller can wait for response headers, milliseconds; null when nothing bounds
    /// it (no route timeout and no per-try timeout).
    pub worst_case_latency_ms: Option<u64>,
    /// How that bound arises.
    pub worst_case_latency: String,
    /// Upstream requests one request can become, with no budget in the way.
    pub max_amplification: f64,
    /// The same over a sustained outage, with the cluster's retry budget (the worst of the
    /// route's clusters), plus `budget_floor_per_sec` retries per second.
    pub budget_amplification: f64,
    /// Retries per second the budget always allows (the largest of the route's clusters).
    pub budget_floor_per_sec: u32,
}

/// A trap found in the config.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct Warning {
    /// Which trap: a stable identifier.
    pub trap: &'static str,
    /// Where: `listener/route`, `cluster NAME` or both.
    pub at: String,
    /// What will happen.
    pub message: String,
    /// The one-line fix.
    pub fix: String,
}

/// The identifiers of every trap `explain` knows, for documentation and tests.
pub const TRAPS: &[&str] = &[
    "per_try_timeout_not_below_timeout",
    "retries_non_idempotent",
    "breaker_minimum_calls_unreachable",
    "bulkhead_exceeds_pool",
    "hedge_without_budget",
    "checks_slower_than_ejection",
    "route_shadowed",
];

/// Rounded to hundredths: the config's percentages are f32, and 0.2 is not exact.
fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

/// Renders a duration as the config would write it.
fn human(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        "0s".into()
    } else if ms % 60_000 == 0 {
        format!("{}m", ms / 60_000)
    } else if ms % 1000 == 0 {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// Explains every HTTP route of `cfg` (or only `only`, a route name).
pub fn explain(cfg: &Config, only: Option<&str>) -> Explanation {
    let mut routes = Vec::new();
    let mut warnings = Vec::new();
    for l in &cfg.listeners {
        let ListenerKind::Http { routes: table } = &l.kind else {
            continue;
        };
        for (i, r) in table.iter().enumerate() {
            if only.is_some_and(|name| name != r.name) {
                continue;
            }
            let at = format!("{}/{}", l.name, r.name);
            let clusters: Vec<&ClusterConfig> = r
                .targets
                .iter()
                .filter_map(|(name, _)| cfg.clusters.iter().find(|c| &c.name == name))
                .collect();
            if let Some(earlier) = table[..i].iter().find(|e| covers(&e.matcher, &r.matcher)) {
                warnings.push(Warning {
                    trap: "route_shadowed",
                    at: at.clone(),
                    message: format!(
                        "route `{}` never matches: the earlier route `{}` matches every request it would",
                        r.name, earlier.name
                    ),
                    fix: format!(
                        "move `{}` above `{}`, or narrow `{}`'s match",
                        r.name, earlier.name, earlier.name
                    ),
                });
            }
            route_warnings(&at, r, &clusters, &mut warnings);
            let report = route_report(&l.name, r, &clusters, l.load_shed.as_ref());
            routes.push(report);
        }
    }
    for c in &cfg.clusters {
        cluster_warnings(c, &mut warnings);
    }
    Explanation { routes, warnings }
}

fn route_report(
    listener: &str,
    r: &RouteConfig,
    clusters: &[&ClusterConfig],
    shed: Option<&super::resilience::LoadShedConfig>,
) -> RouteReport {
    let retry = &r.retry;
    let max_tries = max_tries(retry);
    let (worst, how) = worst_case(r.timeout, retry, max_tries);
    let (budget_amplification, floor) = clusters.iter().fold((1.0f64, 0u32), |(a, f), c| {
        let allowed = round2(1.0 + f64::from(c.budget.ratio));
        (
            a.max(allowed.min(f64::from(max_tries))),
            f.max(c.budget.min_per_sec),
        )
    });
    RouteReport {
        listener: listener.to_owned(),
        route: r.name.clone(),
        timeout_ms: r.timeout.map(ms),
        retry: RetryReport {
            attempts: retry.attempts,
            on: retry_on_names(retry),
            per_try_timeout_ms: retry.per_try_timeout.map(ms),
            backoff_base_ms: ms(retry.backoff_base),
            backoff_max_ms: ms(retry.backoff_max),
            retry_after_max_ms: ms(retry.retry_after_max),
            non_idempotent: retry.non_idempotent,
        },
        hedge: retry.hedge.as_ref().map(|h| HedgeReport {
            after: match h.after {
                HedgeAfter::Delay(d) => human(d),
                HedgeAfter::Percentile(p) => format!("p{p}"),
            },
            max: h.max,
        }),
        rate_limit: r.rate_limit.as_ref().map(|l| RateLimitReport {
            requests_per_second: l.rate,
            burst: l.burst,
            scope: if l.mesh.is_some() { "mesh" } else { "local" },
        }),
        bulkhead: r.bulkhead.as_ref().map(bulkhead),
        load_shed: shed.map(|s| LoadShedReport {
            algorithm: match s.algorithm {
                super::resilience::ShedAlgorithm::Gradient => "gradient",
                super::resilience::ShedAlgorithm::Aimd => "aimd",
            },
            initial_limit: s.initial_limit,
            min_limit: s.min_limit,
            max_limit: s.max_limit,
        }),
        clusters: r
            .targets
            .iter()
            .filter_map(|(name, weight)| {
                let c = clusters.iter().find(|c| &c.name == name)?;
                Some(cluster_report(c, *weight))
            })
            .collect(),
        derived: RouteFigures {
            max_tries,
            worst_case_latency_ms: worst.map(ms),
            worst_case_latency: how,
            max_amplification: f64::from(max_tries),
            budget_amplification,
            budget_floor_per_sec: floor,
        },
    }
}

fn bulkhead(b: &super::resilience::BulkheadConfig) -> BulkheadReport {
    BulkheadReport {
        max_concurrent: b.max_concurrent,
        max_pending: b.max_pending,
        queue_timeout_ms: ms(b.queue_timeout),
    }
}

/// Most tries of one request: hedges count toward `attempts`, and hedging works with one.
fn max_tries(retry: &RetryConfig) -> u32 {
    let hedged = retry.hedge.as_ref().map_or(0, |h| 1 + h.max);
    retry.attempts.max(hedged).max(1)
}

/// The retry conditions by their config names.
fn retry_on_names(retry: &RetryConfig) -> Vec<String> {
    let on = &retry.on;
    let mut names: Vec<String> = [
        (on.connect_failure, "connect-failure"),
        (on.refused_stream, "refused-stream"),
        (on.reset, "reset"),
        (on.timeout, "timeout"),
        (on.status_5xx, "5xx"),
        (on.gateway_error, "gateway-error"),
        (on.too_many_requests, "429"),
    ]
    .into_iter()
    .filter(|(set, _)| *set)
    .map(|(_, n)| n.to_owned())
    .collect();
    names.extend(on.statuses.iter().map(|s| format!("status {s}")));
    for (code, name) in super::resilience::GRPC_CODE_NAMES.iter().enumerate() {
        if on.grpc_codes & (1 << code) != 0 {
            names.push(format!("grpc {name}"));
        }
    }
    names
}

/// The longest wait before retry `n` (1-based): the backoff cap, or a `Retry-After` up to
/// `retry_after_max` when an answer that may carry one (429, 503) is retried.
fn wait_before(retry: &RetryConfig, n: u32) -> Duration {
    let cap = retry
        .backoff_base
        .saturating_mul(1u32 << (n - 1).min(30))
        .min(retry.backoff_max);
    let on = &retry.on;
    let retry_after = on.too_many_requests
        || on.gateway_error
        || on.status_5xx
        || on.statuses.iter().any(|s| *s == 429 || *s == 503);
    if retry_after {
        cap.max(retry.retry_after_max)
    } else {
        cap
    }
}

/// The longest a caller can wait, and why.
fn worst_case(
    timeout: Option<Duration>,
    retry: &RetryConfig,
    tries: u32,
) -> (Option<Duration>, String) {
    let waits: Duration = (1..tries).map(|n| wait_before(retry, n)).sum();
    let all_tries = retry.per_try_timeout.map(|t| t * tries + waits);
    match (timeout, all_tries) {
        (Some(t), Some(a)) if a <= t => (
            Some(a),
            format!(
                "{tries} tries × per-try timeout {} + waits up to {} (within the route timeout {})",
                human(retry.per_try_timeout.unwrap_or_default()),
                human(waits),
                human(t)
            ),
        ),
        (Some(t), Some(a)) => (
            Some(t),
            format!(
                "the route timeout {}: {tries} tries × per-try timeout {} + waits up to {} would take {}",
                human(t),
                human(retry.per_try_timeout.unwrap_or_default()),
                human(waits),
                human(a)
            ),
        ),
        (Some(t), None) => (
            Some(t),
            format!("the route timeout {} (no per-try timeout)", human(t)),
        ),
        (None, Some(a)) => (
            Some(a),
            format!(
                "{tries} tries × per-try timeout {} + waits up to {} (no route timeout)",
                human(retry.per_try_timeout.unwrap_or_default()),
                human(waits)
            ),
        ),
        (None, None) => (
            None,
            "unbounded: neither a route timeout nor a per-try timeout".to_owned(),
        ),
    }
}

fn cluster_report(c: &ClusterConfig, weight: u32) -> ClusterReport {
    let u = &c.upstream;
    let discovery = match &u.discovery {
        Discovery::Static(list) => format!(
            "static ({} endpoint{})",
            list.len(),
            if list.len() == 1 { "" } else { "s" }
        ),
        Discovery::Dns(d) => match &d.query {
            DnsQuery::Address { name, port } => format!("dns {name}:{port}"),
            DnsQuery::Srv { name } => format!("dns SRV {name}"),
        },
        Discovery::Registry { service } => format!("registry {service}"),
    };
    let health_check = u.health_check.as_ref().map(|h| {
        let what = match &h.kind {
            CheckKind::Http { path, .. } => format!("HTTP {path}"),
            CheckKind::Tcp => "TCP connect".to_owned(),
            CheckKind::Grpc { .. } => "gRPC health".to_owned(),
        };
        let detector = match h.detector {
            Detector::Threshold => format!(
                "unhealthy after {} failures, healthy after {} passes",
                h.unhealthy_threshold, h.healthy_threshold
            ),
            Detector::Phi(phi) => format!("phi accrual above {phi}"),
        };
        format!(
            "{what} every {} (timeout {}), {detector}",
            human(h.interval),
            human(h.timeout)
        )
    });
    let outlier = u.outlier.as_ref().map(|o| {
        format!(
            "ejected after {} in a row, for {} (growing to {}), at most {}% of the cluster",
            ejection_trigger(o),
            human(o.base_ejection_time),
            human(o.max_ejection_time),
            o.max_ejection_percent
        )
    });
    ClusterReport {
        name: c.name.clone(),
        weight,
        discovery,
        load_balancer: u.balancer.name(),
        connect_timeout_ms: ms(c.connect_timeout),
        circuit_breaker: c.breaker.as_ref().map(breaker_sentence),
        bulkhead: bulkhead(&c.bulkhead),
        retry_budget_percent: round2(f64::from(c.budget.ratio) * 100.0),
        retry_budget_min_per_sec: c.budget.min_per_sec,
        health_check,
        outlier_detection: outlier,
        panic_threshold: u.panic_threshold,
        dead_endpoint: dead_endpoint(c),
    }
}

fn ejection_trigger(o: &super::upstream::OutlierConfig) -> String {
    let mut parts = Vec::new();
    if o.consecutive_connect_failures > 0 {
        parts.push(format!(
            "{} connect failures",
            o.consecutive_connect_failures
        ));
    }
    if o.consecutive_gateway_errors > 0 {
        parts.push(format!("{} gateway errors", o.consecutive_gateway_errors));
    }
    if o.consecutive_5xx > 0 {
        parts.push(format!("{} failed tries", o.consecutive_5xx));
    }
    if parts.is_empty() {
        "nothing (every trigger is 0)".to_owned()
    } else {
        parts.join(" or ")
    }
}

fn breaker_sentence(b: &BreakerConfig) -> String {
    let mut opens = Vec::new();
    if b.failure_rate > 0 {
        opens.push(format!("{}% failures", b.failure_rate));
    }
    if b.slow_call_rate > 0 {
        opens.push(format!(
            "{}% calls slower than {}",
            b.slow_call_rate,
            human(b.slow_call_duration)
        ));
    }
    if b.consecutive_failures > 0 {
        opens.push(format!("{} failures in a row", b.consecutive_failures));
    }
    let window = match b.window {
        Window::Calls(n) => format!("the last {n} calls"),
        Window::Time(d) => human(d),
    };
    format!(
        "opens at {} over {window} (once {} calls were seen), stays open {} (doubling to {}), half-opens with {} probes{}",
        if opens.is_empty() { "nothing".to_owned() } else { opens.join(" or ") },
        b.minimum_calls,
        human(b.open_duration),
        human(b.max_open_duration),
        b.half_open_probes,
        if b.per_endpoint { "; one per endpoint too" } else { "" }
    )
}

/// Longest time active threshold checks take to mark a dead endpoint: up to one interval
/// before the first failing check, then `unhealthy_threshold` checks of `timeout` each, the
/// later ones one interval (plus jitter) apart.
fn check_detection(c: &ClusterConfig) -> Option<Duration> {
    let h = c.upstream.health_check.as_ref()?;
    if !matches!(h.detector, Detector::Threshold) {
        return None;
    }
    let n = h.unhealthy_threshold.max(1);
    Some((h.interval + h.jitter) * n + h.timeout * n)
}

fn dead_endpoint(c: &ClusterConfig) -> DeadEndpoint {
    let checks = check_detection(c);
    let outlier = c.upstream.outlier.as_ref();
    let failures = outlier.and_then(|o| {
        [
            o.consecutive_connect_failures,
            o.consecutive_gateway_errors,
            o.consecutive_5xx,
        ]
        .into_iter()
        .filter(|n| *n > 0)
        .min()
    });
    let first = outlier.map(|o| o.base_ejection_time);
    let summary = match (checks, failures, first) {
        (Some(d), Some(n), Some(e)) => format!(
            "out after {n} failed tries in a row (ejected for {}), or within {} by the checks, whichever comes first",
            human(e),
            human(d)
        ),
        (Some(d), _, _) => format!("out within {} by the checks", human(d)),
        (None, Some(n), Some(e)) => format!(
            "out after {n} failed tries in a row, for {}; with no checks, it is tried again when that ends",
            human(e)
        ),
        _ => "never taken out: no checks and no outlier detection; only retries and the breaker protect callers".to_owned(),
    };
    DeadEndpoint {
        detected_by_checks_within_ms: checks.map(ms),
        ejected_after_failures: failures,
        first_ejection_ms: first.map(ms),
        summary,
    }
}

fn route_warnings(at: &str, r: &RouteConfig, clusters: &[&ClusterConfig], out: &mut Vec<Warning>) {
    let retry = &r.retry;
    if let (Some(per_try), Some(timeout)) = (retry.per_try_timeout, r.timeout) {
        if retry.attempts > 1 && per_try >= timeout {
            out.push(Warning {
                trap: "per_try_timeout_not_below_timeout",
                at: at.to_owned(),
                message: format!(
                    "per_try_timeout {} is not below the route timeout {}: the first try uses the whole deadline and no retry ever runs",
                    human(per_try),
                    human(timeout)
                ),
                fix: format!(
                    "set retry.per_try_timeout to about {} (a third of the timeout)",
                    human(timeout / 3)
                ),
            });
        }
    }
    if retry.non_idempotent && retry.attempts > 1 {
        let resends = retry.on.reset
            || retry.on.timeout
            || retry.on.status_5xx
            || retry.on.gateway_error
            || retry.on.too_many_requests
            || !retry.on.statuses.is_empty();
        if resends {
            out.push(Warning {
                trap: "retries_non_idempotent",
                at: at.to_owned(),
                message: "non_idempotent: true resends POST and PATCH requests the upstream may already have acted on: a payment can be taken twice".to_owned(),
                fix: "remove non_idempotent, or make the upstream idempotent (an idempotency key) first".to_owned(),
            });
        }
    }
    for c in clusters {
        if let (Some(b), Some(limit)) = (&c.breaker, &r.rate_limit) {
            let most = match b.window {
                Window::Calls(n) => f64::from(n),
                Window::Time(w) => limit.rate * w.as_secs_f64() + f64::from(limit.burst),
            };
            if (b.failure_rate > 0 || b.slow_call_rate > 0) && most < f64::from(b.minimum_calls) {
                out.push(Warning {
                    trap: "breaker_minimum_calls_unreachable",
                    at: format!("{at}, cluster {}", c.name),
                    message: format!(
                        "the breaker needs {} calls in its window, but this route's rate limit lets at most {most:.0} through: it can never open on failure rate",
                        b.minimum_calls
                    ),
                    fix: format!(
                        "lower circuit_breaker.minimum_calls to {} or less, or widen its window",
                        (most.floor() as u32).max(1)
                    ),
                });
            }
        }
        if let Some(hedge) = &retry.hedge {
            let unbounded = c.budget.ratio >= 1.0;
            let none = c.budget.ratio == 0.0 && c.budget.min_per_sec == 0;
            if unbounded || none {
                out.push(Warning {
                    trap: "hedge_without_budget",
                    at: format!("{at}, cluster {}", c.name),
                    message: if none {
                        "hedging is on but the cluster's retry budget is zero: no hedge is ever sent".to_owned()
                    } else {
                        format!(
                            "hedging is on and the retry budget allows {:.0}% extra requests: hedges can multiply the load by {} exactly when the cluster is slow",
                            c.budget.ratio * 100.0,
                            1 + hedge.max
                        )
                    },
                    fix: "set retry_budget.percent to 5–20 for a cluster that is hedged".to_owned(),
                });
            }
        }
    }
    if let Some(b) = &r.bulkhead {
        for c in clusters {
            bulkhead_pool(
                &format!("{at}, cluster {}", c.name),
                b.max_concurrent,
                c,
                out,
            );
        }
    }
}

fn bulkhead_pool(at: &str, concurrent: u32, c: &ClusterConfig, out: &mut Vec<Warning>) {
    let Discovery::Static(list) = &c.upstream.discovery else {
        return;
    };
    if c.protocol == super::model::UpstreamProtocol::Http2 {
        return;
    }
    let pool = c.upstream.pool.max_idle_per_endpoint as u64 * list.len() as u64;
    if u64::from(concurrent) > pool {
        out.push(Warning {
            trap: "bulkhead_exceeds_pool",
            at: at.to_owned(),
            message: format!(
                "the bulkhead admits {concurrent} requests at once but the pool keeps {pool} connections ({} per endpoint × {}): under full load, connections beyond it are opened and closed for every request",
                c.upstream.pool.max_idle_per_endpoint,
                list.len()
            ),
            fix: format!(
                "raise pool.max_idle_per_endpoint to {}, or lower the bulkhead to {pool}",
                (u64::from(concurrent)).div_ceil(list.len().max(1) as u64)
            ),
        });
    }
}

fn cluster_warnings(c: &ClusterConfig, out: &mut Vec<Warning>) {
    let at = format!("cluster {}", c.name);
    bulkhead_pool(&at, c.bulkhead.max_concurrent, c, out);
    if let (Some(detect), Some(o)) = (check_detection(c), &c.upstream.outlier) {
        if detect > o.base_ejection_time {
            out.push(Warning {
                trap: "checks_slower_than_ejection",
                at,
                message: format!(
                    "the health checks take up to {} to mark a dead endpoint, longer than its first ejection ({}): it comes back into rotation before the checks notice, and callers fail on it again",
                    human(detect),
                    human(o.base_ejection_time)
                ),
                fix: format!(
                    "shorten health_check.interval, or set outlier_detection.base_ejection_time to {} or more",
                    human(detect)
                ),
            });
        }
    }
}

/// Whether every request `later` matches is matched by `earlier` too.
fn covers(earlier: &RouteMatch, later: &RouteMatch) -> bool {
    let path = match (&earlier.path, &later.path) {
        (PathMatch::Any, _) => true,
        (PathMatch::Prefix(p), PathMatch::Prefix(q) | PathMatch::Exact(q)) => q.starts_with(p),
        (PathMatch::Exact(a), PathMatch::Exact(b)) => a == b,
        (PathMatch::Regex(a), PathMatch::Regex(b)) => a.as_str() == b.as_str(),
        _ => false,
    };
    let host = match (&earlier.host, &later.host) {
        (None, _) => true,
        (Some(a), Some(b)) if a == b => true,
        (Some(a), Some(b)) => a
            .strip_prefix('*')
            .is_some_and(|suffix| b.ends_with(suffix) && !b.starts_with('*')),
        (Some(_), None) => false,
    };
    let methods = match (&earlier.methods, &later.methods) {
        (None, _) => true,
        (Some(a), Some(b)) => b.iter().all(|m| a.contains(m)),
        (Some(_), None) => false,
    };
    let headers = earlier.headers.iter().all(|h| {
        later.headers.iter().any(|l| {
            l.name == h.name
                && match (&h.value, &l.value) {
                    (HeaderValueMatch::Present(true), HeaderValueMatch::Present(false)) => false,
                    (HeaderValueMatch::Present(true), _) => true,
                    (a, b) => a == b,
                }
        })
    });
    let identities = match (&earlier.identities, &later.identities) {
        (None, _) => true,
        (Some(a), Some(b)) => a == b,
        (Some(_), None) => false,
    };
    path && host && methods && headers && identities
}

impl Explanation {
    /// The report as text, for a terminal.
    pub fn text(&self) -> String {
        let mut s = String::new();
        for r in &self.routes {
            let d = &r.derived;
            s += &format!("route {}/{}\n", r.listener, r.route);
            let targets: Vec<String> = r
                .clusters
                .iter()
                .map(|c| {
                    if r.clusters.len() > 1 {
                        format!("{} (weight {})", c.name, c.weight)
                    } else {
                        c.name.clone()
                    }
                })
                .collect();
            s += &format!("  to            {}\n", targets.join(", "));
            s += &format!(
                "  timeout       {}\n",
                r.timeout_ms
                    .map_or("off".into(), |t| human(Duration::from_millis(t)))
            );
            let per_try = r
                .retry
                .per_try_timeout_ms
                .map_or("none".into(), |t| human(Duration::from_millis(t)));
            s += &format!(
                "  retries       {} tries on {}; per try {per_try}; backoff up to {} doubling to {}{}\n",
                r.retry.attempts,
                if r.retry.on.is_empty() { "nothing".to_owned() } else { r.retry.on.join(", ") },
                human(Duration::from_millis(r.retry.backoff_base_ms)),
                human(Duration::from_millis(r.retry.backoff_max_ms)),
                if r.retry.non_idempotent { "; non-idempotent methods too" } else { "" }
            );
            if let Some(h) = &r.hedge {
                s += &format!("  hedging       after {}, up to {} more\n", h.after, h.max);
            }
            if let Some(l) = &r.rate_limit {
                s += &format!(
                    "  rate limit    {}/s, burst {} ({})\n",
                    l.requests_per_second, l.burst, l.scope
                );
            }
            if let Some(b) = &r.bulkhead {
                s += &format!(
                    "  bulkhead      {} at once, {} waiting\n",
                    b.max_concurrent, b.max_pending
                );
            }
            if let Some(l) = &r.load_shed {
                s += &format!(
                    "  load shedding {} from {} (between {} and {})\n",
                    l.algorithm, l.initial_limit, l.min_limit, l.max_limit
                );
            }
            s += &format!(
                "  worst latency {} — {}\n",
                d.worst_case_latency_ms
                    .map_or("unbounded".into(), |t| human(Duration::from_millis(t))),
                d.worst_case_latency
            );
            s += &format!(
                "  amplification up to {}× per request; over an outage, with the retry budget, {:.2}× plus {} retries/s\n",
                d.max_amplification, d.budget_amplification, d.budget_floor_per_sec
            );
            for c in &r.clusters {
                s += &format!(
                    "  cluster {}: {}, {}, connect timeout {}\n",
                    c.name,
                    c.discovery,
                    c.load_balancer,
                    human(Duration::from_millis(c.connect_timeout_ms))
                );
                s += &format!(
                    "    breaker     {}\n",
                    c.circuit_breaker.as_deref().unwrap_or("off")
                );
                s += &format!(
                    "    bulkhead    {} at once, {} waiting; retry budget {}% + {}/s\n",
                    c.bulkhead.max_concurrent,
                    c.bulkhead.max_pending,
                    c.retry_budget_percent,
                    c.retry_budget_min_per_sec
                );
                s += &format!(
                    "    checks      {}\n",
                    c.health_check.as_deref().unwrap_or("off")
                );
                s += &format!(
                    "    outliers    {}\n",
                    c.outlier_detection.as_deref().unwrap_or("off")
                );
                s += &format!("    dead endpoint {}\n", c.dead_endpoint.summary);
            }
            s.push('\n');
        }
        if self.warnings.is_empty() {
            s += "no warnings\n";
        } else {
            s += &format!("{} warnings\n", self.warnings.len());
            for w in &self.warnings {
                s += &format!(
                    "  {} [{}]: {}\n    fix: {}\n",
                    w.at, w.trap, w.message, w.fix
                );
            }
        }
        s
    }
}
