//! Prometheus metrics: one registry per process, handed down, never global.
//!
//! Label lookups happen when a config is compiled, not per request: routes, clusters and listeners
//! keep the resolved counter and histogram handles they need (see [`RouteMetrics`]).

use std::time::Duration;

use http::StatusCode;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::error::ErrorKind;
use crate::proxy::resilience::breaker::{BreakerMetrics, State};
use crate::proxy::resilience::bulkhead::BulkheadMetrics;
use crate::proxy::resilience::fault::FaultMetrics;
use crate::proxy::resilience::load_shed::ShedMetrics;
use crate::proxy::resilience::rate_limit::RateLimitMetrics;
use crate::proxy::resilience::retry::{RetryMetrics, Skip};

/// Request duration buckets in seconds, from 0.5 ms to 30 s.
const DURATION_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Every metric family of the proxy, registered in one registry.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    duration: HistogramVec,
    local_replies: IntCounterVec,
    connect_errors: IntCounterVec,
    open_connections: IntGaugeVec,
    connections: IntCounterVec,
    tcp_bytes: IntCounterVec,
    reloads: IntCounterVec,
    config_version: IntGauge,
    attempts: IntCounterVec,
    retries: IntCounterVec,
    hedges: IntCounterVec,
    retries_skipped: IntCounterVec,
    circuit_state: IntGaugeVec,
    circuit_opened: IntCounterVec,
    bulkhead_active: IntGaugeVec,
    bulkhead_queued: IntGaugeVec,
    rate_limited: IntCounterVec,
    faults: IntCounterVec,
    shed_limit: IntGaugeVec,
    shed_in_flight: IntGaugeVec,
    shed_queued: IntGaugeVec,
    shed: IntCounterVec,
    endpoints: IntGaugeVec,
    panic: IntGaugeVec,
    ejections: IntCounterVec,
    checks: IntCounterVec,
    dns: IntCounterVec,
    handshakes: IntCounterVec,
    cert_reloads: IntCounterVec,
    cert_expiry: IntGaugeVec,
    rejected: IntCounterVec,
    refused: IntCounterVec,
}

/// Results of a TLS handshake, the `result` label of `outrigger_tls_handshakes_total`.
pub const HANDSHAKE_RESULTS: [&str; 7] = [
    "ok",
    "no_client_cert",
    "untrusted_cert",
    "expired_cert",
    "identity_denied",
    "timeout",
    "failed",
];

/// Handles for one (listener, route, cluster) triple.
#[derive(Clone)]
pub struct RouteMetrics {
    by_class: [IntCounter; 5],
    duration: Histogram,
}

/// Handles for one listener.
#[derive(Clone)]
pub struct ListenerMetrics {
    local_replies: [IntCounter; ErrorKind::ALL.len()],
    /// Connections open right now.
    pub open_connections: IntGauge,
    /// Connections accepted.
    pub connections: IntCounter,
    /// TCP bytes from the client to the upstream.
    pub bytes_upstream: IntCounter,
    /// TCP bytes from the upstream to the client.
    pub bytes_downstream: IntCounter,
    /// TLS handshakes by result, indexed like [`HANDSHAKE_RESULTS`].
    pub handshakes: [IntCounter; HANDSHAKE_RESULTS.len()],
    /// Connections closed at once because the listener had `max_connections` open.
    pub rejected: IntCounter,
    /// Certificate reloads: applied, failed.
    pub cert_reloads: [IntCounter; 2],
    /// The listener certificate's expiry, as a Unix timestamp.
    pub cert_expiry: IntGauge,
    /// Requests refused by the HTTP/1 framing check.
    pub malformed: IntCounter,
    /// Request heads not received within the header-read timeout.
    pub header_timeouts: IntCounter,
}

impl ListenerMetrics {
    /// Counts a TLS handshake with `result`, one of [`HANDSHAKE_RESULTS`].
    pub fn handshake(&self, result: &str) {
        let i = HANDSHAKE_RESULTS
            .iter()
            .position(|r| *r == result)
            .unwrap_or(HANDSHAKE_RESULTS.len() - 1);
        self.handshakes[i].inc();
    }

    /// The counters a connection's framing check updates.
    pub fn guard(&self) -> crate::proxy::framing::GuardMetrics {
        crate::proxy::framing::GuardMetrics {
            malformed: self.malformed.clone(),
            header_timeouts: self.header_timeouts.clone(),
        }
    }
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
    /// Endpoints available, unhealthy and ejected.
    pub endpoints: [IntGauge; 3],
    /// 1 while the cluster is in panic mode.
    pub panic: IntGauge,
    /// Outlier ejections.
    pub ejections: IntCounter,
    /// Active health check results: passed, failed.
    pub checks: [IntCounter; 2],
    /// DNS lookups: ok, failed, empty.
    pub dns: [IntCounter; 3],
}

impl Metrics {
    /// Creates the registry and registers every family.
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "outrigger_requests_total",
                "HTTP requests proxied, by listener, route, cluster and status class.",
            ),
            &["listener", "route", "cluster", "class"],
        )?;
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "outrigger_request_duration_seconds",
                "Time from receiving a request to sending its response headers.",
            )
            .buckets(DURATION_BUCKETS.to_vec()),
            &["listener", "route", "cluster"],
        )?;
        let local_replies = IntCounterVec::new(
            Opts::new(
                "outrigger_local_replies_total",
                "Responses the proxy made itself, by listener and reason.",
            ),
            &["listener", "reason"],
        )?;
        let connect_errors = IntCounterVec::new(
            Opts::new(
                "outrigger_upstream_connect_errors_total",
                "Failed connection attempts to upstream endpoints.",
            ),
            &["cluster"],
        )?;
        let open_connections = IntGaugeVec::new(
            Opts::new(
                "outrigger_open_connections",
                "Downstream connections open now.",
            ),
            &["listener"],
        )?;
        let connections = IntCounterVec::new(
            Opts::new(
                "outrigger_connections_total",
                "Downstream connections accepted.",
            ),
            &["listener"],
        )?;
        let tcp_bytes = IntCounterVec::new(
            Opts::new(
                "outrigger_tcp_bytes_total",
                "Bytes spliced by TCP listeners, by direction.",
            ),
            &["listener", "direction"],
        )?;
        let reloads = IntCounterVec::new(
            Opts::new(
                "outrigger_config_reloads_total",
                "Config reload attempts, by result.",
            ),
            &["result"],
        )?;
        let config_version = IntGauge::new(
            "outrigger_config_version",
            "Version number of the active config; grows by one per applied reload.",
        )?;
        let counter = |name: &str, help: &str, labels: &[&str]| {
            IntCounterVec::new(Opts::new(name, help), labels)
        };
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            IntGaugeVec::new(Opts::new(name, help), labels)
        };
        let attempts = counter(
            "outrigger_upstream_attempts_total",
            "Tries sent to a cluster: first tries, retries and hedges.",
            &["cluster"],
        )?;
        let retries = counter(
            "outrigger_retries_total",
            "Retries sent, by listener, route and cluster.",
            &["listener", "route", "cluster"],
        )?;
        let hedges = counter(
            "outrigger_hedges_total",
            "Hedged tries sent, by listener, route and cluster.",
            &["listener", "route", "cluster"],
        )?;
        let retries_skipped = counter(
            "outrigger_retries_skipped_total",
            "Retries wanted but not sent, by reason (budget, attempts, body, deadline, retry_after).",
            &["listener", "route", "cluster", "reason"],
        )?;
        let circuit_state = gauge(
            "outrigger_circuit_state",
            "1 for the current state of a cluster's circuit breaker (closed, open, half_open).",
            &["cluster", "state"],
        )?;
        let circuit_opened = counter(
            "outrigger_circuit_opened_total",
            "Times a circuit breaker opened, by cluster and scope (cluster or endpoint).",
            &["cluster", "scope"],
        )?;
        let bulkhead_active = gauge(
            "outrigger_bulkhead_active",
            "Requests holding a bulkhead slot, by scope (cluster or route) and name.",
            &["scope", "name"],
        )?;
        let bulkhead_queued = gauge(
            "outrigger_bulkhead_queued",
            "Requests waiting for a bulkhead slot, by scope and name.",
            &["scope", "name"],
        )?;
        let rate_limited = counter(
            "outrigger_rate_limited_total",
            "Requests over a route's rate limit, by action (rejected or delayed).",
            &["listener", "route", "action"],
        )?;
        let faults = counter(
            "outrigger_faults_injected_total",
            "Faults injected, by kind (delay or abort).",
            &["listener", "route", "kind"],
        )?;
        let shed_limit = gauge(
            "outrigger_load_shed_limit",
            "The adaptive concurrency limit of a listener.",
            &["listener"],
        )?;
        let shed_in_flight = gauge(
            "outrigger_load_shed_in_flight",
            "Requests admitted by a listener's limiter and not yet answered.",
            &["listener"],
        )?;
        let shed_queued = gauge(
            "outrigger_load_shed_queued",
            "Requests waiting for admission by a listener's limiter.",
            &["listener"],
        )?;
        let shed = counter(
            "outrigger_load_shed_total",
            "Requests shed by a listener's limiter.",
            &["listener"],
        )?;
        let endpoints = gauge(
            "outrigger_endpoints",
            "A cluster's endpoints by state (available, unhealthy, ejected).",
            &["cluster", "state"],
        )?;
        let panic = gauge(
            "outrigger_cluster_panic",
            "1 while a cluster balances over every endpoint because too few are available.",
            &["cluster"],
        )?;
        let ejections = counter(
            "outrigger_outlier_ejections_total",
            "Endpoints ejected by outlier detection.",
            &["cluster"],
        )?;
        let checks = counter(
            "outrigger_health_checks_total",
            "Active health checks, by result (passed or failed).",
            &["cluster", "result"],
        )?;
        let dns = counter(
            "outrigger_dns_lookups_total",
            "DNS lookups of a cluster, by result (ok, failed, empty); failed and empty keep the last endpoints.",
            &["cluster", "result"],
        )?;
        let handshakes = counter(
            "outrigger_tls_handshakes_total",
            "TLS handshakes on a listener, by result (ok, no_client_cert, untrusted_cert, expired_cert, identity_denied, timeout, failed).",
            &["listener", "result"],
        )?;
        let cert_reloads = counter(
            "outrigger_tls_cert_reloads_total",
            "Certificate files re-read after a change, by listener or cluster and result (applied, failed; failed keeps the old material).",
            &["owner", "result"],
        )?;
        let cert_expiry = gauge(
            "outrigger_tls_cert_expiry_timestamp_seconds",
            "When a listener's serving certificate expires, as a Unix timestamp.",
            &["listener"],
        )?;
        let rejected = counter(
            "outrigger_connections_rejected_total",
            "Connections closed on accept, by listener and reason (max_connections).",
            &["listener", "reason"],
        )?;
        let refused = counter(
            "outrigger_requests_refused_total",
            "HTTP/1 requests refused before routing, by listener and reason (malformed: the framing check answered 400; header_timeout: 408).",
            &["listener", "reason"],
        )?;
        let build_info = IntGaugeVec::new(
            Opts::new("outrigger_build_info", "Build information; always 1."),
            &["version"],
        )?;
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        for c in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(duration.clone()),
            Box::new(local_replies.clone()),
            Box::new(connect_errors.clone()),
            Box::new(open_connections.clone()),
            Box::new(connections.clone()),
            Box::new(tcp_bytes.clone()),
            Box::new(reloads.clone()),
            Box::new(config_version.clone()),
            Box::new(build_info),
            Box::new(attempts.clone()),
            Box::new(retries.clone()),
            Box::new(hedges.clone()),
            Box::new(retries_skipped.clone()),
            Box::new(circuit_state.clone()),
            Box::new(circuit_opened.clone()),
            Box::new(bulkhead_active.clone()),
            Box::new(bulkhead_queued.clone()),
            Box::new(rate_limited.clone()),
            Box::new(faults.clone()),
            Box::new(handshakes.clone()),
            Box::new(cert_reloads.clone()),
            Box::new(cert_expiry.clone()),
            Box::new(rejected.clone()),
            Box::new(refused.clone()),
            Box::new(shed_limit.clone()),
            Box::new(shed_in_flight.clone()),
            Box::new(shed_queued.clone()),
            Box::new(shed.clone()),
            Box::new(endpoints.clone()),
            Box::new(panic.clone()),
            Box::new(ejections.clone()),
            Box::new(checks.clone()),
            Box::new(dns.clone()),
        ] {
            registry.register(c)?;
        }
        for result in ["success", "failure"] {
            reloads.with_label_values(&[result]);
        }
        Ok(Self {
            registry,
            requests,
            duration,
            local_replies,
            connect_errors,
            open_connections,
            connections,
            tcp_bytes,
            reloads,
            config_version,
            attempts,
            retries,
            hedges,
            retries_skipped,
            circuit_state,
            circuit_opened,
            bulkhead_active,
            bulkhead_queued,
            rate_limited,
            faults,
            shed_limit,
            shed_in_flight,
            shed_queued,
            shed,
            endpoints,
            panic,
            ejections,
            checks,
            dns,
            handshakes,
            cert_reloads,
            cert_expiry,
            rejected,
            refused,
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

    /// Resolves the bulkhead gauges of `scope` (`cluster` or `route`) `name`.
    pub fn bulkhead(&self, scope: &str, name: &str) -> BulkheadMetrics {
        BulkheadMetrics {
            active: self.bulkhead_active.with_label_values(&[scope, name]),
            queued: self.bulkhead_queued.with_label_values(&[scope, name]),
        }
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

    /// Resolves the handles of one route target.
    pub fn route(&self, listener: &str, route: &str, cluster: &str) -> RouteMetrics {
        let class = |c: &str| {
            self.requests
                .with_label_values(&[listener, route, cluster, c])
        };
        RouteMetrics {
            by_class: [
                class("1xx"),
                class("2xx"),
                class("3xx"),
                class("4xx"),
                class("5xx"),
            ],
            duration: self.duration.with_label_values(&[listener, route, cluster]),
        }
    }

    /// Resolves the handles of one listener.
    pub fn listener(&self, listener: &str) -> ListenerMetrics {
        ListenerMetrics {
            local_replies: ErrorKind::ALL.map(|k| {
                self.local_replies
                    .with_label_values(&[listener, k.reason()])
            }),
            open_connections: self.open_connections.with_label_values(&[listener]),
            connections: self.connections.with_label_values(&[listener]),
            bytes_upstream: self.tcp_bytes.with_label_values(&[listener, "upstream"]),
            bytes_downstream: self.tcp_bytes.with_label_values(&[listener, "downstream"]),
            handshakes: HANDSHAKE_RESULTS
                .map(|r| self.handshakes.with_label_values(&[listener, r])),
            rejected: self
                .rejected
                .with_label_values(&[listener, "max_connections"]),
            cert_reloads: self.cert_reloads(listener),
            cert_expiry: self.cert_expiry.with_label_values(&[listener]),
            malformed: self.refused.with_label_values(&[listener, "malformed"]),
            header_timeouts: self
                .refused
                .with_label_values(&[listener, "header_timeout"]),
        }
    }

    /// Counters of certificate reloads (applied, failed) for the listener or cluster `owner`.
    pub fn cert_reloads(&self, owner: &str) -> [IntCounter; 2] {
        ["applied", "failed"].map(|r| self.cert_reloads.with_label_values(&[owner, r]))
    }

    /// Resolves the handles of one cluster.
    pub fn cluster(&self, cluster: &str) -> ClusterMetrics {
        ClusterMetrics {
            connect_errors: self.connect_errors.with_label_values(&[cluster]),
            attempts: self.attempts.with_label_values(&[cluster]),
            breaker: BreakerMetrics {
                states: Some(
                    State::ALL.map(|s| self.circuit_state.with_label_values(&[cluster, s.name()])),
                ),
                opened: self.circuit_opened.with_label_values(&[cluster, "cluster"]),
            },
            endpoint_breaker: BreakerMetrics {
                states: None,
                opened: self
                    .circuit_opened
                    .with_label_values(&[cluster, "endpoint"]),
            },
            bulkhead: self.bulkhead("cluster", cluster),
            endpoints: ["available", "unhealthy", "ejected"]
                .map(|s| self.endpoints.with_label_values(&[cluster, s])),
            panic: self.panic.with_label_values(&[cluster]),
            ejections: self.ejections.with_label_values(&[cluster]),
            checks: ["passed", "failed"].map(|r| self.checks.with_label_values(&[cluster, r])),
            dns: ["ok", "failed", "empty"].map(|r| self.dns.with_label_values(&[cluster, r])),
        }
    }

    /// Counts a reload attempt and, on success, publishes the new config version.
    /// Counts a file change that left the config's text as it was.
    pub fn reload_unchanged(&self) {
        self.reloads.with_label_values(&["unchanged"]).inc();
    }

    /// Counts a reload attempt; a successful one also publishes `version`.
    pub fn reload(&self, ok: bool, version: u64) {
        self.reloads
            .with_label_values(&[if ok { "success" } else { "failure" }])
            .inc();
        if ok {
            self.config_version
                .set(i64::try_from(version).unwrap_or(i64::MAX));
        }
    }

    /// Publishes the version of the config loaded at start.
    pub fn set_config_version(&self, version: u64) {
        self.config_version
            .set(i64::try_from(version).unwrap_or(i64::MAX));
    }

    /// Renders every metric in the Prometheus text format.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 * 1024);
        // Encoding into a Vec cannot fail on I/O; a failure would mean a malformed family, which
        // we never register, so an empty scrape is an acceptable fallback.
        if TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .is_err()
        {
            out.clear();
        }
        out
    }
}

impl RouteMetrics {
    /// Counts one response with `status`, `elapsed` after the request arrived.
    pub fn observe(&self, status: StatusCode, elapsed: Duration) {
        let class = (status.as_u16() / 100).clamp(1, 5) as usize - 1;
        self.by_class[class].inc();
        self.duration.observe(elapsed.as_secs_f64());
    }
}

impl ListenerMetrics {
    /// Counts a local reply of `kind`.
    pub fn local_reply(&self, kind: ErrorKind) {
        self.local_replies[kind.index()].inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_handles_count_by_class() {
        let m = Metrics::new().unwrap();
        let r = m.route("in", "r", "c");
        r.observe(StatusCode::OK, Duration::from_millis(3));
        r.observe(StatusCode::BAD_GATEWAY, Duration::from_millis(3));
        let text = String::from_utf8(m.encode()).unwrap();
        assert!(text.contains(
            "outrigger_requests_total{class=\"2xx\",cluster=\"c\",listener=\"in\",route=\"r\"} 1"
        ));
        assert!(text.contains(
            "outrigger_requests_total{class=\"5xx\",cluster=\"c\",listener=\"in\",route=\"r\"} 1"
        ));
        assert!(text.contains("outrigger_build_info{version=\""));
    }
}
