//! Upstream cluster metrics: tries and connect errors, endpoint states and panic mode, outlier
//! ejections, circuit breakers and the cluster bulkhead.

use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec};

use super::resilience::BulkheadFamilies;
use super::{BulkheadMetrics, Register};

/// The `state` label values of `outrigger_circuit_state`, in the order of
/// [`BreakerMetrics::states`].
pub const CIRCUIT_STATES: [&str; 3] = ["closed", "open", "half_open"];

/// The cluster families.
#[derive(Clone)]
pub struct Families {
    connect_errors: IntCounterVec,
    attempts: IntCounterVec,
    circuit_state: IntGaugeVec,
    circuit_opened: IntCounterVec,
    endpoints: IntGaugeVec,
    panic: IntGaugeVec,
    ejections: IntCounterVec,
    bulkhead: BulkheadFamilies,
}

/// A breaker's state gauges and open counter.
#[derive(Clone)]
pub struct BreakerMetrics {
    /// Gauges for closed, open and half-open, as [`CIRCUIT_STATES`] (cluster breakers only).
    pub states: Option<[IntGauge; 3]>,
    /// Times the breaker opened.
    pub opened: IntCounter,
}

/// How many of a cluster's endpoints are in each state.
#[derive(Clone)]
pub struct EndpointGauges {
    /// Neither unhealthy nor ejected.
    pub available: IntGauge,
    /// Failing active health checks.
    pub unhealthy: IntGauge,
    /// Ejected by outlier detection.
    pub ejected: IntGauge,
}

/// Handles for one cluster.
#[derive(Clone)]
pub struct ClusterMetrics {
    /// Failed connection attempts to the cluster's endpoints.
    pub connect_errors: IntCounter,
    /// Tries sent to the cluster (first tries, retries and hedges).
    pub attempts: IntCounter,
    /// The cluster breaker's state gauges and open counter.
    pub breaker: BreakerMetrics,
    /// The endpoint breakers' open counter.
    pub endpoint_breaker: BreakerMetrics,
    /// The cluster bulkhead's gauges.
    pub bulkhead: BulkheadMetrics,
    /// Endpoints by state.
    pub endpoints: EndpointGauges,
    /// 1 while the cluster is in panic mode.
    pub panic: IntGauge,
    /// Outlier ejections.
    pub ejections: IntCounter,
}

impl Families {
    pub(super) fn new(
        r: &mut Register<'_>,
        bulkhead: BulkheadFamilies,
    ) -> Result<Self, prometheus::Error> {
        Ok(Self {
            connect_errors: r.counter(
                "outrigger_upstream_connect_errors_total",
                "Failed connection attempts to upstream endpoints.",
                &["cluster"],
            )?,
            attempts: r.counter(
                "outrigger_upstream_attempts_total",
                "Tries sent to a cluster: first tries, retries and hedges.",
                &["cluster"],
            )?,
            circuit_state: r.gauge(
                "outrigger_circuit_state",
                "1 for the current state of a cluster's circuit breaker (closed, open, half_open).",
                &["cluster", "state"],
            )?,
            circuit_opened: r.counter(
                "outrigger_circuit_opened_total",
                "Times a circuit breaker opened, by cluster and scope (cluster or endpoint).",
                &["cluster", "scope"],
            )?,
            endpoints: r.gauge(
                "outrigger_endpoints",
                "A cluster's endpoints by state (available, unhealthy, ejected).",
                &["cluster", "state"],
            )?,
            panic: r.gauge(
                "outrigger_cluster_panic",
                "1 while a cluster balances over every endpoint because too few are available.",
                &["cluster"],
            )?,
            ejections: r.counter(
                "outrigger_outlier_ejections_total",
                "Endpoints ejected by outlier detection.",
                &["cluster"],
            )?,
            bulkhead,
        })
    }

    /// Resolves the handles of one cluster.
    pub fn cluster(&self, cluster: &str) -> ClusterMetrics {
        let endpoints = |s: &str| self.endpoints.with_label_values(&[cluster, s]);
        ClusterMetrics {
            connect_errors: self.connect_errors.with_label_values(&[cluster]),
            attempts: self.attempts.with_label_values(&[cluster]),
            breaker: BreakerMetrics {
                states: Some(
                    CIRCUIT_STATES.map(|s| self.circuit_state.with_label_values(&[cluster, s])),
                ),
                opened: self.circuit_opened.with_label_values(&[cluster, "cluster"]),
            },
            endpoint_breaker: BreakerMetrics {
                states: None,
                opened: self
                    .circuit_opened
                    .with_label_values(&[cluster, "endpoint"]),
            },
            bulkhead: self.bulkhead.resolve("cluster", cluster),
            endpoints: EndpointGauges {
                available: endpoints("available"),
                unhealthy: endpoints("unhealthy"),
                ejected: endpoints("ejected"),
            },
            panic: self.panic.with_label_values(&[cluster]),
            ejections: self.ejections.with_label_values(&[cluster]),
        }
    }
}
