//! Upstream clusters: their endpoints and a pooled HTTP client per cluster.
//!
//! Each cluster owns its own connection pool, so a slow dependency cannot use up connections
//! meant for another. A cluster's runtime object survives a reload when its config is unchanged,
//! keeping its warm connections.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use http::uri::Authority;
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::control::config::{ClusterConfig, UpstreamProtocol};
use crate::proxy::balance::RoundRobin;
use crate::telemetry::metrics::{ClusterMetrics, Metrics};

/// How long an idle pooled upstream connection is kept.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// The pooled HTTP client used to reach a cluster.
pub type UpstreamClient = Client<HttpConnector, Incoming>;

/// One upstream endpoint and its live counters.
#[derive(Debug)]
pub struct Endpoint {
    /// `host:port` used to connect and as the request authority.
    pub authority: Authority,
    /// Where the endpoint came from (`static` for config-listed endpoints).
    pub source: &'static str,
    /// Requests sent to this endpoint.
    pub requests: AtomicU64,
    /// Requests on the way now.
    pub in_flight: AtomicU64,
    /// Connection attempts that failed.
    pub connect_failures: AtomicU64,
}

impl Endpoint {
    fn new(authority: Authority, source: &'static str) -> Self {
        Self {
            authority,
            source,
            requests: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            connect_failures: AtomicU64::new(0),
        }
    }

    /// Marks a request as started; the guard marks it finished when dropped.
    pub fn start(self: &Arc<Self>) -> InFlight {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }
}

/// Decrements an endpoint's in-flight count when dropped.
#[derive(Debug)]
pub struct InFlight(Arc<Endpoint>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The runtime side of a configured cluster.
pub struct Cluster {
    /// The config it was built from; an equal config on reload reuses this object.
    pub config: ClusterConfig,
    /// Pooled HTTP client (unused by TCP listeners).
    pub client: UpstreamClient,
    /// Current endpoints; discovery swaps in new sets without touching the pool.
    endpoints: ArcSwap<Vec<Arc<Endpoint>>>,
    cursor: RoundRobin,
    /// Resolved metric handles.
    pub metrics: ClusterMetrics,
}

impl Cluster {
    /// Builds the cluster's endpoints and its client.
    pub fn new(config: ClusterConfig, metrics: &Metrics) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(config.connect_timeout));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .http2_only(config.protocol == UpstreamProtocol::Http2)
            .build(connector);
        let endpoints = config
            .endpoints
            .iter()
            .map(|a| Arc::new(Endpoint::new(a.clone(), "static")))
            .collect();
        Self {
            metrics: metrics.cluster(&config.name),
            config,
            client,
            endpoints: ArcSwap::from_pointee(endpoints),
            cursor: RoundRobin::default(),
        }
    }

    /// The cluster's name.
    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// The next endpoint to use, or `None` if the cluster has none.
    pub fn pick(&self) -> Option<Arc<Endpoint>> {
        let endpoints = self.endpoints.load();
        self.cursor.pick(&endpoints).cloned()
    }

    /// A snapshot of the current endpoints.
    pub fn endpoints(&self) -> Arc<Vec<Arc<Endpoint>>> {
        self.endpoints.load_full()
    }

    /// Counts a failed connection attempt to `endpoint`.
    pub fn connect_failed(&self, endpoint: &Endpoint) {
        endpoint.connect_failures.fetch_add(1, Ordering::Relaxed);
        self.metrics.connect_errors.inc();
    }
}
