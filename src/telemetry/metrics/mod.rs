//! Prometheus metrics: one registry per process, handed down, never global.
//!
//! Each subsystem has its own families in its own module ([`http`], [`listener`], [`upstream`],
//! [`resilience`], [`control`]) and resolves its handles into small named structs when a config is
//! compiled, never per request: routes, clusters and listeners keep the counters and histograms
//! they need (see [`http::RouteMetrics`]). Label values that are a closed set are typed enums
//! ([`listener::Handshake`], [`resilience::Skip`], [`control::Lookup`]), so a handle is picked by
//! name, not by index.
//!
//! This module sits at the bottom of the crate: it imports nothing of the proxy or the control
//! side; they import the handle types from here.

pub mod control;
pub mod http;
pub mod listener;
pub mod mesh;
pub mod resilience;
pub mod upstream;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use prometheus::core::{Collector, MetricVec, MetricVecBuilder};
use prometheus::proto::LabelPair;
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};

pub use control::{
    CertMetrics, ConfigMetrics, DiscoveryMetrics, DnsMetrics, HealthMetrics, Lookup,
};
pub use http::{LocalReplies, RouteMetrics};
pub use listener::{GuardMetrics, Handshake, ListenerMetrics, UpgradeMetrics};
pub use resilience::{
    BulkheadMetrics, FaultMetrics, RateLimitMetrics, RetryMetrics, ShedMetrics, Skip,
};
pub use upstream::{BreakerMetrics, ClusterMetrics, EndpointGauges, CIRCUIT_STATES};

/// Every metric family of the proxy, grouped by subsystem, registered in one registry.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// Requests, their durations and local replies.
    pub http: http::Families,
    /// Connections, TLS handshakes and refusals of each listener.
    pub listener: listener::Families,
    /// Upstream clusters: attempts, endpoints, breakers and outlier ejections.
    pub upstream: upstream::Families,
    /// Retries, hedges, rate limits, faults, bulkheads and load shedding.
    pub resilience: resilience::Families,
    /// Config reloads, discovery, DNS, health checks and certificate files.
    pub control: control::Families,
    /// The embedded Raft group.
    pub mesh: mesh::Families,
    /// Every labelled family, for dropping the series of what a reload removed.
    vecs: Arc<[Arc<dyn Prune>]>,
}

/// The listeners, routes and clusters a config has: series naming anything else are stale.
#[derive(Debug, Default)]
pub struct Live {
    /// Listener names.
    pub listeners: HashSet<String>,
    /// (listener, route) names.
    pub routes: HashSet<(String, String)>,
    /// Cluster names.
    pub clusters: HashSet<String>,
}

impl Live {
    /// Whether a series with these labels names a listener, route or cluster that is gone.
    /// `-` (an answer before a route or cluster was chosen) is never stale by itself.
    fn stale(&self, labels: &[LabelPair]) -> bool {
        let get = |name: &str| {
            labels
                .iter()
                .find(|p| p.name() == name)
                .map(LabelPair::value)
        };
        let listener = get("listener");
        if listener.is_some_and(|l| !self.listeners.contains(l)) {
            return true;
        }
        if let (Some(l), Some(r)) = (listener, get("route")) {
            if r != http::NONE && !self.routes.contains(&(l.to_owned(), r.to_owned())) {
                return true;
            }
        }
        if get("cluster").is_some_and(|c| c != http::NONE && !self.clusters.contains(c)) {
            return true;
        }
        // Bulkheads are labelled by scope and name.
        match (get("scope"), get("name")) {
            (Some("cluster"), Some(n)) => !self.clusters.contains(n),
            (Some("route"), Some(n)) => !self.routes.iter().any(|(_, r)| r == n),
            _ => false,
        }
    }
}

/// A labelled family whose stale series can be dropped.
trait Prune: Send + Sync {
    /// Removes the series `stale` picks; returns how many.
    fn prune(&self, stale: &dyn Fn(&[LabelPair]) -> bool) -> usize;
}

impl<T: MetricVecBuilder> Prune for MetricVec<T> {
    fn prune(&self, stale: &dyn Fn(&[LabelPair]) -> bool) -> usize {
        let mut removed = 0;
        for family in self.collect() {
            for m in family.get_metric() {
                let pairs = m.get_label();
                if !stale(pairs) {
                    continue;
                }
                let labels: HashMap<&str, &str> =
                    pairs.iter().map(|p| (p.name(), p.value())).collect();
                if self.remove(&labels).is_ok() {
                    removed += 1;
                }
            }
        }
        removed
    }
}

impl Metrics {
    /// Creates the registry and registers every family.
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let mut r = Register {
            registry: &registry,
            vecs: Vec::new(),
        };
        let build_info = r.gauge(
            "outrigger_build_info",
            "Build information; always 1.",
            &["version"],
        )?;
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        let resilience = resilience::Families::new(&mut r)?;
        let http = http::Families::new(&mut r)?;
        let listener = listener::Families::new(&mut r)?;
        let upstream = upstream::Families::new(&mut r, resilience.bulkhead.clone())?;
        let control = control::Families::new(&mut r)?;
        let mesh = mesh::Families::new(&mut r)?;
        let vecs = r.vecs.into();
        Ok(Self {
            http,
            listener,
            upstream,
            resilience,
            control,
            mesh,
            vecs,
            registry,
        })
    }

    /// Drops every series that names a listener, route or cluster not in `live` (the config
    /// just committed): without it, each route renamed by a reload would leave its series
    /// behind, and `/metrics` would grow without bound. Returns how many were dropped.
    pub fn forget_all_but(&self, live: &Live) -> usize {
        let stale = |labels: &[LabelPair]| live.stale(labels);
        self.vecs.iter().map(|v| v.prune(&stale)).sum()
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

/// Creates families and registers them as it goes, keeping the labelled ones for pruning.
struct Register<'a> {
    registry: &'a Registry,
    vecs: Vec<Arc<dyn Prune>>,
}

impl Register<'_> {
    fn add<C: Collector + Clone + 'static>(&mut self, c: C) -> Result<C, prometheus::Error> {
        self.registry.register(Box::new(c.clone()))?;
        Ok(c)
    }

    fn add_vec<T: MetricVecBuilder + 'static>(
        &mut self,
        c: MetricVec<T>,
    ) -> Result<MetricVec<T>, prometheus::Error> {
        let c = self.add(c)?;
        self.vecs.push(Arc::new(c.clone()));
        Ok(c)
    }

    fn counter(
        &mut self,
        name: &str,
        help: &str,
        labels: &[&str],
    ) -> Result<IntCounterVec, prometheus::Error> {
        self.add_vec(IntCounterVec::new(Opts::new(name, help), labels)?)
    }

    fn gauge(
        &mut self,
        name: &str,
        help: &str,
        labels: &[&str],
    ) -> Result<IntGaugeVec, prometheus::Error> {
        self.add_vec(IntGaugeVec::new(Opts::new(name, help), labels)?)
    }

    fn histogram(
        &mut self,
        name: &str,
        help: &str,
        buckets: &[f64],
        labels: &[&str],
    ) -> Result<HistogramVec, prometheus::Error> {
        self.add_vec(HistogramVec::new(
            HistogramOpts::new(name, help).buckets(buckets.to_vec()),
            labels,
        )?)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use ::http::StatusCode;

    use super::*;

    #[test]
    fn route_handles_count_by_class() {
        let m = Metrics::new().unwrap();
        let r = m.http.route("in", "r", "c");
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

    #[test]
    fn discovery_updates_are_counted_apart_from_dns_lookups() {
        let m = Metrics::new().unwrap();
        m.control.discovery("c", "static").ok.inc();
        m.control.dns("d").count(Lookup::Empty);
        let text = String::from_utf8(m.encode()).unwrap();
        assert!(text.contains(
            "outrigger_discovery_updates_total{cluster=\"c\",result=\"ok\",source=\"static\"} 1"
        ));
        assert!(text.contains("outrigger_dns_lookups_total{cluster=\"d\",result=\"empty\"} 1"));
        assert!(!text.contains("outrigger_dns_lookups_total{cluster=\"c\""));
    }
}
