//! Resilience metrics: retries and hedges, rate limits, injected faults, bulkheads and adaptive
//! load shedding.

use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec};

use super::Register;

/// Why a wanted retry was not sent: the `reason` label of `outrigger_retries_skipped_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    /// The cluster's retry budget was spent.
    Budget,
    /// The request used all its attempts.
    Attempts,
    /// The body was too large to keep.
    Body,
    /// The wait would pass the request's deadline.
    Deadline,
    /// The upstream asked to wait longer than `retry_after_max`.
    RetryAfter,
    /// The request's method is not idempotent, and the try may have reached the upstream.
    Method,
}

impl Skip {
    /// Every reason, in metric-handle order.
    pub const ALL: [Skip; 6] = [
        Skip::Budget,
        Skip::Attempts,
        Skip::Body,
        Skip::Deadline,
        Skip::RetryAfter,
        Skip::Method,
    ];

    /// The metric label.
    pub const fn name(self) -> &'static str {
        match self {
            Skip::Budget => "budget",
            Skip::Attempts => "attempts",
            Skip::Body => "body",
            Skip::Deadline => "deadline",
            Skip::RetryAfter => "retry_after",
            Skip::Method => "method",
        }
    }
}

/// The resilience families.
#[derive(Clone)]
pub struct Families {
    retries: IntCounterVec,
    hedges: IntCounterVec,
    retries_skipped: IntCounterVec,
    rate_limited: IntCounterVec,
    faults: IntCounterVec,
    pub(super) bulkhead: BulkheadFamilies,
    shed_limit: IntGaugeVec,
    shed_in_flight: IntGaugeVec,
    shed_queued: IntGaugeVec,
    shed: IntCounterVec,
}

/// The bulkhead gauges, shared by route and cluster bulkheads.
#[derive(Clone)]
pub struct BulkheadFamilies {
    active: IntGaugeVec,
    queued: IntGaugeVec,
}

/// Metric handles of one route target's retries.
#[derive(Clone)]
pub struct RetryMetrics {
    /// Retries sent.
    pub retries: IntCounter,
    /// Hedges sent.
    pub hedges: IntCounter,
    skipped: [IntCounter; Skip::ALL.len()],
}

/// Counters of one route's rate limit.
#[derive(Clone)]
pub struct RateLimitMetrics {
    /// Requests refused.
    pub rejected: IntCounter,
    /// Requests delayed (throttle mode).
    pub delayed: IntCounter,
}

/// Counters of one route's injected faults.
#[derive(Clone)]
pub struct FaultMetrics {
    /// Requests delayed.
    pub delayed: IntCounter,
    /// Requests aborted.
    pub aborted: IntCounter,
}

/// Gauges of one bulkhead.
#[derive(Clone)]
pub struct BulkheadMetrics {
    /// Requests holding a slot.
    pub active: IntGauge,
    /// Requests waiting for one.
    pub queued: IntGauge,
}

/// Handles of one listener's adaptive limiter.
#[derive(Clone)]
pub struct ShedMetrics {
    /// The current concurrency limit.
    pub limit: IntGauge,
    /// Requests admitted and not yet answered.
    pub in_flight: IntGauge,
    /// Requests waiting.
    pub queued: IntGauge,
    /// Requests shed.
    pub shed: IntCounter,
}

impl Families {
    pub(super) fn new(r: &mut Register<'_>) -> Result<Self, prometheus::Error> {
        Ok(Self {
            retries: r.counter(
                "outrigger_retries_total",
                "Retries sent, by listener, route and cluster.",
                &["listener", "route", "cluster"],
            )?,
            hedges: r.counter(
                "outrigger_hedges_total",
                "Hedged tries sent, by listener, route and cluster.",
                &["listener", "route", "cluster"],
            )?,
            retries_skipped: r.counter(
                "outrigger_retries_skipped_total",
                "Retries wanted but not sent, by reason (budget, attempts, body, deadline, retry_after).",
                &["listener", "route", "cluster", "reason"],
            )?,
            rate_limited: r.counter(
                "outrigger_rate_limited_total",
                "Requests over a route's rate limit, by action (rejected or delayed).",
                &["listener", "route", "action"],
            )?,
            faults: r.counter(
                "outrigger_faults_injected_total",
                "Faults injected, by kind (delay or abort).",
                &["listener", "route", "kind"],
            )?,
            bulkhead: BulkheadFamilies {
                active: r.gauge(
                    "outrigger_bulkhead_active",
                    "Requests holding a bulkhead slot, by scope (cluster or route) and name.",
                    &["scope", "name"],
                )?,
                queued: r.gauge(
                    "outrigger_bulkhead_queued",
                    "Requests waiting for a bulkhead slot, by scope and name.",
                    &["scope", "name"],
                )?,
            },
            shed_limit: r.gauge(
                "outrigger_load_shed_limit",
                "The adaptive concurrency limit of a listener.",
                &["listener"],
            )?,
            shed_in_flight: r.gauge(
                "outrigger_load_shed_in_flight",
                "Requests admitted by a listener's limiter and not yet answered.",
                &["listener"],
            )?,
            shed_queued: r.gauge(
                "outrigger_load_shed_queued",
                "Requests waiting for admission by a listener's limiter.",
                &["listener"],
            )?,
            shed: r.counter(
                "outrigger_load_shed_total",
                "Requests shed by a listener's limiter.",
                &["listener"],
            )?,
        })
    }

    /// Resolves the retry handles of one route target.
    pub fn retry(&self, listener: &str, route: &str, cluster: &str) -> RetryMetrics {
        let labels = [listener, route, cluster];
        RetryMetrics {
            retries: self.retries.with_label_values(&labels),
            hedges: self.hedges.with_label_values(&labels),
            skipped: Skip::ALL.map(|s| {
                self.retries_skipped
                    .with_label_values(&[listener, route, cluster, s.name()])
            }),
        }
    }

    /// Resolves the rate-limit counters of one route.
    pub fn rate_limit(&self, listener: &str, route: &str) -> RateLimitMetrics {
        RateLimitMetrics {
            rejected: self
                .rate_limited
                .with_label_values(&[listener, route, "rejected"]),
            delayed: self
                .rate_limited
                .with_label_values(&[listener, route, "delayed"]),
        }
    }

    /// Resolves the fault counters of one route.
    pub fn fault(&self, listener: &str, route: &str) -> FaultMetrics {
        FaultMetrics {
            delayed: self.faults.with_label_values(&[listener, route, "delay"]),
            aborted: self.faults.with_label_values(&[listener, route, "abort"]),
        }
    }

    /// Resolves the gauges of a route bulkhead.
    pub fn route_bulkhead(&self, route: &str) -> BulkheadMetrics {
        self.bulkhead.resolve("route", route)
    }

    /// Resolves the load-shedding handles of one listener.
    pub fn load_shed(&self, listener: &str) -> ShedMetrics {
        ShedMetrics {
            limit: self.shed_limit.with_label_values(&[listener]),
            in_flight: self.shed_in_flight.with_label_values(&[listener]),
            queued: self.shed_queued.with_label_values(&[listener]),
            shed: self.shed.with_label_values(&[listener]),
        }
    }
}

impl BulkheadFamilies {
    /// Resolves the gauges of bulkhead `name` in `scope` (`cluster` or `route`).
    pub(super) fn resolve(&self, scope: &str, name: &str) -> BulkheadMetrics {
        BulkheadMetrics {
            active: self.active.with_label_values(&[scope, name]),
            queued: self.queued.with_label_values(&[scope, name]),
        }
    }
}

impl RetryMetrics {
    /// Counts a retry not sent, and why.
    pub fn skipped(&self, why: Skip) {
        self.skipped[why as usize].inc();
    }
}
