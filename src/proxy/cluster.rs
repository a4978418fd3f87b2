//! A cluster's endpoint state: the current endpoint set with its balancer, panic mode, and the
//! cluster-wide resilience handles (breaker, bulkhead, retry budget, latency window, outlier
//! detection) that every route sending here shares.
//!
//! The set is immutable and swapped whole ([`ArcSwap`]) when discovery publishes a new one;
//! endpoints whose address and weight stay keep their state (latency, health, ejections,
//! breaker). Health verdicts arrive on a channel from the health checker. Both are applied by one
//! task per cluster ([`Cluster::follow`]), so requests only ever read. A cluster's runtime object
//! survives a reload when its config is unchanged, keeping its warm connections, its breaker
//! state and its retry budget; when it is dropped, its [`Scope`] ends every task it owned
//! (discovery, health checks, certificate watch).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use http::uri::Authority;
use serde_json::json;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::control::config::resilience::DEFAULT_ENDPOINT_CONSECUTIVE_FAILURES;
use crate::control::config::upstream::Discovery;
use crate::control::config::{ClusterConfig, UpstreamProtocol};
use crate::control::discovery::{self, Endpoints, Subscription};
use crate::control::health::{Health, Verdict};
use crate::control::mesh::hints::{Exchange, Report};
use crate::error::ProxyError;
use crate::proxy::balance::{self, PickRequest, Picker, RoundRobin};
use crate::proxy::clock;
use crate::proxy::connect::Client;
use crate::proxy::endpoint::Endpoint;
use crate::proxy::outlier;
use crate::proxy::resilience::breaker::{CircuitBreaker, Permit, State};
use crate::proxy::resilience::bulkhead::Bulkhead;
use crate::proxy::resilience::classify::Outcome;
use crate::proxy::resilience::latency::LatencyWindow;
use crate::proxy::resilience::retry::budget::RetryBudget;
use crate::rng::Rng;
use crate::tasks::{Scope, Tasks};
use crate::telemetry::metrics::{ClusterMetrics, Metrics};
use crate::tls::LoadError;

/// How often, at most, a cluster recounts its available endpoints to decide on panic mode.
const AVAILABILITY_REFRESH: Duration = Duration::from_millis(100);

/// A cluster's endpoints with the balancer's precomputed state; swapped whole on change.
pub struct EndpointSet {
    /// The endpoints.
    pub endpoints: Vec<Arc<Endpoint>>,
    picker: Picker,
    /// Whether too few endpoints are available, so health is ignored (panic mode).
    panic: AtomicBool,
    /// When `panic` was last computed, in milliseconds since the cluster started (0: never).
    checked_at: AtomicU64,
}

/// The runtime side of a configured cluster.
pub struct Cluster {
    /// The config it was built from; an equal config on reload reuses this object.
    pub config: ClusterConfig,
    /// The pooled client that reaches the endpoints (unused by TCP listeners).
    pub client: Client,
    /// Current endpoints; the follower swaps in new sets without touching the pool.
    set: ArcSwap<EndpointSet>,
    cursor: RoundRobin,
    epoch: Instant,
    /// Resolved metric handles.
    pub metrics: ClusterMetrics,
    /// Retry budget shared by every route sending here.
    pub budget: Arc<RetryBudget>,
    /// The cluster-wide breaker, unless breakers are off.
    pub breaker: Option<Arc<CircuitBreaker>>,
    /// The cluster's concurrency cap.
    pub bulkhead: Arc<Bulkhead>,
    /// Recent try latencies, for percentile hedging.
    pub latency: Arc<LatencyWindow>,
    /// Passive outlier detection.
    pub outlier: outlier::Detector,
    /// Where failure hints go out, and what counts them; `None` when hints are off.
    hints: Option<Arc<Exchange>>,
    rng: Arc<Rng>,
    scope: Scope,
}

/// Whether an endpoint's breaker (if any) would admit a call now.
fn admits(e: &Endpoint) -> bool {
    match &e.breaker {
        Some(b) => b.would_admit(),
        None => true,
    }
}

impl Cluster {
    /// Builds the cluster and its client with `pools` connection pools (one per worker); its
    /// tasks (certificate watch, and later discovery and health, started by the composition
    /// root) run in `scope`. Fails when its TLS files can no longer be used.
    pub fn new(
        config: ClusterConfig,
        metrics: &Metrics,
        rng: Rng,
        scope: Scope,
        pools: usize,
    ) -> Result<Self, LoadError> {
        let client = Client::new(&config, metrics, scope.tasks(), pools)?;
        let m = metrics.upstream.cluster(&config.name);
        let breaker = config.breaker.as_ref().map(|b| {
            Arc::new(CircuitBreaker::new(
                b.clone(),
                b.consecutive_failures,
                Some(m.breaker.clone()),
            ))
        });
        Ok(Self {
            budget: Arc::new(RetryBudget::new(&config.budget)),
            bulkhead: Arc::new(Bulkhead::new(&config.bulkhead, Some(m.bulkhead.clone()))),
            latency: Arc::new(LatencyWindow::new()),
            outlier: outlier::Detector::new(config.upstream.outlier.clone(), m.ejections.clone()),
            breaker,
            metrics: m,
            set: ArcSwap::from_pointee(EndpointSet {
                endpoints: Vec::new(),
                picker: Picker::build(config.upstream.balancer, &[]),
                panic: AtomicBool::new(false),
                checked_at: AtomicU64::new(0),
            }),
            config,
            client,
            cursor: RoundRobin::default(),
            epoch: Instant::now(),
            hints: None,
            rng: Arc::new(rng),
            scope,
        })
    }

    /// Publishes this cluster's ejections and opened endpoint breakers as failure hints, and
    /// counts the hints it takes, through `hints`.
    pub fn with_hints(mut self, hints: Option<Arc<Exchange>>) -> Self {
        self.hints = hints;
        self
    }

    /// A cluster with its static endpoints and no background task, for tools that compile
    /// route tables without running the proxy (benchmarks, the fuzzer, unit tests).
    pub fn offline(config: ClusterConfig, metrics: &Metrics) -> Result<Arc<Self>, LoadError> {
        let list = match &config.upstream.discovery {
            Discovery::Static(list) => list
                .iter()
                .map(|e| (e.authority.clone(), e.weight))
                .collect(),
            Discovery::Dns(_) | Discovery::Registry { .. } => Vec::new(),
        };
        let endpoints = discovery::once(&config.name, discovery::Static::new(list), metrics);
        let tasks = Tasks::new();
        tasks.cancel();
        let cluster = Arc::new(Self::new(
            config,
            metrics,
            Rng::with_seed(0),
            tasks.child(),
            1,
        )?);
        cluster.apply(&endpoints.borrow(), &HashMap::new());
        Ok(cluster)
    }

    /// The cluster's name.
    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// Where the cluster's own tasks run; they end when the cluster is dropped.
    pub fn tasks(&self) -> &Tasks {
        self.scope.tasks()
    }

    /// Applies `endpoints`' current set now, then follows it and `verdicts` on a task of the
    /// cluster's own until the cluster is dropped.
    pub fn follow(
        self: &Arc<Self>,
        mut endpoints: Subscription,
        verdicts: mpsc::Receiver<Verdict>,
    ) {
        let mut health = HashMap::new();
        self.apply(&endpoints.borrow_and_update(), &health);
        let weak = Arc::downgrade(self);
        self.tasks().spawn("cluster_follow", async move {
            follow(weak, endpoints, verdicts, &mut health).await;
        });
    }

    /// Swaps in `e`'s list; new endpoints take their last known health from `health`.
    fn apply(&self, e: &Endpoints, health: &HashMap<Authority, Health>) {
        if self.set_endpoints(&e.list, e.source) {
            for ep in self.set.load().endpoints.iter() {
                if let Some(h) = health.get(&ep.authority) {
                    ep.set_health(*h);
                }
            }
            self.recount();
        }
    }

    /// Replaces the endpoint set. Endpoints whose address and weight are unchanged keep their
    /// state (latency, health, ejections, breaker); returns whether anything changed.
    pub fn set_endpoints(&self, list: &[(Authority, u32)], source: &'static str) -> bool {
        let old = self.set.load_full();
        let same = old.endpoints.len() == list.len()
            && old
                .endpoints
                .iter()
                .zip(list)
                .all(|(e, (a, w))| e.authority == *a && e.weight == *w);
        if same {
            return false;
        }
        let endpoints: Vec<Arc<Endpoint>> = list
            .iter()
            .map(|(a, w)| {
                old.endpoints
                    .iter()
                    .find(|e| e.authority == *a && e.weight == *w)
                    .cloned()
                    .unwrap_or_else(|| {
                        Arc::new(Endpoint::new(
                            a.clone(),
                            source,
                            *w,
                            self.endpoint_breaker(),
                            self.rng.clone(),
                            self.client.workers(),
                        ))
                    })
            })
            .collect();
        let picker = Picker::build(self.config.upstream.balancer, &endpoints);
        let set = Arc::new(EndpointSet {
            endpoints,
            picker,
            panic: AtomicBool::new(false),
            checked_at: AtomicU64::new(0),
        });
        self.set.store(set.clone());
        self.refresh_availability(&set);
        true
    }

    /// Sets the health of the endpoint at `authority`, if the cluster has it; returns whether
    /// it changed. An endpoint the checks saw come back (`recovered`, or unhealthy → healthy)
    /// leaves any outlier ejection and failure hint at once, as in Envoy: a restarted endpoint
    /// gets traffic again within `interval × healthy_threshold`, not after its ejection time.
    pub fn set_health(&self, authority: &Authority, health: Health, recovered: bool) -> bool {
        let set = self.set.load();
        let Some(e) = set.endpoints.iter().find(|e| e.authority == *authority) else {
            return false;
        };
        let before = e.set_health(health);
        let changed = before != health;
        let back = recovered || (before == Health::Unhealthy && health == Health::Healthy);
        if back && e.outlier.lift(e.now()) {
            tracing::info!(cluster = %self.name(), endpoint = %authority,
                "active checks pass again: ejection lifted");
        }
        if changed || back {
            self.refresh_availability(&set);
        }
        changed
    }

    fn endpoint_breaker(&self) -> Option<Arc<CircuitBreaker>> {
        let b = self.config.breaker.as_ref().filter(|b| b.per_endpoint)?;
        let consecutive = match b.consecutive_failures {
            0 => DEFAULT_ENDPOINT_CONSECUTIVE_FAILURES,
            n => n,
        };
        Some(Arc::new(CircuitBreaker::new(
            b.clone(),
            consecutive,
            Some(self.metrics.endpoint_breaker.clone()),
        )))
    }

    /// A snapshot of the current endpoints.
    pub fn endpoints(&self) -> Vec<Arc<Endpoint>> {
        self.set.load().endpoints.clone()
    }

    /// Whether the cluster is in panic mode (too few endpoints available).
    pub fn panicking(&self) -> bool {
        self.set.load().panic.load(Ordering::Relaxed)
    }

    /// Recounts the current endpoints' availability (after a health change, say).
    pub fn recount(&self) -> bool {
        self.refresh_availability(&self.set.load())
    }

    /// Recounts available endpoints: publishes the gauges and decides on panic mode.
    fn refresh_availability(&self, set: &EndpointSet) -> bool {
        let now = (clock::now() - self.epoch).as_millis() as u64;
        set.checked_at.store(now.max(1), Ordering::Relaxed);
        let (mut unhealthy, mut ejected) = (0i64, 0i64);
        for e in &set.endpoints {
            if e.health() == Health::Unhealthy {
                unhealthy += 1;
            } else if e.ejected_for().is_some() {
                ejected += 1;
            }
        }
        let total = set.endpoints.len() as i64;
        let available = total - unhealthy - ejected;
        let m = &self.metrics.endpoints;
        m.available.set(available);
        m.unhealthy.set(unhealthy);
        m.ejected.set(ejected);
        let panic = total > 0
            && (available * 100) < i64::from(self.config.upstream.panic_threshold) * total;
        if set.panic.swap(panic, Ordering::Relaxed) != panic {
            if panic {
                tracing::warn!(cluster = %self.name(), available, total,
                    "panic mode: too few endpoints available, balancing over all of them");
            } else {
                tracing::info!(cluster = %self.name(), available, total, "panic mode over");
            }
        }
        self.metrics.panic.set(i64::from(panic));
        panic
    }

    /// The endpoint for a new TCP connection: the next available one in turn.
    pub fn pick(&self) -> Option<Arc<Endpoint>> {
        let set = self.set.load();
        let n = set.endpoints.len();
        let mut fallback = None;
        for _ in 0..n {
            let e = self.cursor.pick(&set.endpoints)?;
            if e.ready() {
                return Some(e.clone());
            }
            fallback.get_or_insert_with(|| e.clone());
        }
        fallback
    }

    /// The hash key of a request for consistent-hash balancers.
    pub fn hash_key(&self, head: &http::request::Parts, peer: std::net::SocketAddr) -> Option<u64> {
        let on = self.config.upstream.hash_on.as_ref()?;
        balance::with_key(on, &head.headers, head.uri.path(), peer, balance::hash)
    }

    /// Picks the endpoint for a try: available (unless the cluster panics), admitted by its
    /// breaker, and not yet tried by this request when another one is left.
    pub fn choose(
        &self,
        req: PickRequest,
    ) -> Result<(Arc<Endpoint>, usize, Option<Permit>), ProxyError> {
        let set = self.set.load();
        if set.endpoints.is_empty() {
            return Err(ProxyError::UpstreamConnect(
                "the cluster has no endpoints".into(),
            ));
        }
        let now = (clock::now() - self.epoch).as_millis() as u64;
        let stale = now.saturating_sub(set.checked_at.load(Ordering::Relaxed))
            >= AVAILABILITY_REFRESH.as_millis() as u64;
        let panic = if stale {
            self.refresh_availability(&set)
        } else {
            set.panic.load(Ordering::Relaxed)
        };
        let picked = if panic {
            set.picker.pick(&set.endpoints, req, admits)
        } else {
            set.picker
                .pick(&set.endpoints, req, |e| {
                    e.ready() && admits(e) && e.outlier.lets_through(|| e.now())
                })
                // Endpoints waiting out a reconnect backoff are used when nothing else is.
                .or_else(|| {
                    set.picker
                        .pick(&set.endpoints, req, |e| e.available() && admits(e))
                })
                .or_else(|| {
                    // Nothing available although the last count said enough were: recount,
                    // and balance over everything if that means panic.
                    self.refresh_availability(&set)
                        .then(|| set.picker.pick(&set.endpoints, req, admits))
                        .flatten()
                })
        };
        let Some(i) = picked else {
            let any_admits = set.endpoints.iter().any(|e| admits(e));
            return Err(if any_admits {
                ProxyError::UpstreamConnect("no endpoint is available".into())
            } else {
                ProxyError::CircuitOpen
            });
        };
        let ep = set.endpoints[i].clone();
        let permit = match &ep.breaker {
            None => None,
            Some(b) => match b.try_acquire() {
                Some(p) => Some(p),
                // Another request took the last probe slot since the pick: try the others.
                None if req.tried & (1 << (i % 64)) == 0 => {
                    drop(set);
                    let mut again = req;
                    again.tried |= 1 << (i % 64);
                    return self.choose(again);
                }
                None => return Err(ProxyError::CircuitOpen),
            },
        };
        Ok((ep, i, permit))
    }

    /// Feeds a try's outcome to outlier detection; recounts availability after an ejection and
    /// publishes it as a failure hint. A hint on the endpoint is weighed against the outcome.
    pub fn observe(&self, endpoint: &Endpoint, outcome: Outcome) {
        let set = self.set.load();
        let ejected = self.outlier.observe(&set.endpoints, endpoint, outcome);
        if let Some(h) = &self.hints {
            if self.outlier.weigh_hint(endpoint, outcome, ejected) {
                h.counters.overridden.inc();
            }
        }
        if ejected {
            tracing::warn!(cluster = %self.name(), endpoint = %endpoint.authority, "endpoint ejected");
            self.refresh_availability(&set);
            self.publish_hint(endpoint, "ejected", endpoint.ejected_for());
        }
    }

    /// After a try's outcome reached the endpoint's breaker (in state `before`): if that
    /// opened it, says so to the fleet.
    pub fn after_breaker(&self, endpoint: &Endpoint, before: Option<State>) {
        if let Some(b) = &endpoint.breaker {
            if before != Some(State::Open) && b.state() == State::Open {
                self.publish_hint(endpoint, "breaker_open", b.open_for());
            }
        }
    }

    fn publish_hint(&self, endpoint: &Endpoint, reason: &str, period: Option<std::time::Duration>) {
        let (Some(h), Some(period)) = (&self.hints, period) else {
            return;
        };
        h.publish(Report {
            endpoint: endpoint.authority.to_string(),
            reason: reason.to_owned(),
            ttl_ms: period.as_millis() as u64,
        });
    }

    /// Takes a failure hint about `authority` from another sidecar, held for `period` (see
    /// [`outlier::Detector::hint`]): the endpoint gets no requests while this sidecar probes it
    /// with TCP connections, and the probes decide. Returns whether it named one of this
    /// cluster's endpoints.
    pub fn hint(self: &Arc<Self>, authority: &Authority, period: std::time::Duration) -> bool {
        let set = self.set.load();
        let Some(endpoint) = self.outlier.hint(&set.endpoints, authority, period) else {
            return false;
        };
        if let Some(h) = &self.hints {
            h.counters.acted_on.inc();
        }
        self.scope
            .tasks()
            .spawn("hint_probe", probe(Arc::downgrade(self), endpoint));
        true
    }

    /// Counts a failed connection attempt to `endpoint`; a refused one (nothing listens) is
    /// published as a failure hint at once, at most once per base ejection time.
    pub fn connect_failed(&self, endpoint: &Endpoint, refused: bool) {
        endpoint.connect_failures.fetch_add(1, Ordering::Relaxed);
        self.metrics.connect_errors.inc();
        if let (true, Some(_), Some(cfg)) = (refused, &self.hints, &self.config.upstream.outlier) {
            let period = cfg.base_ejection_time;
            if endpoint.outlier.publish_refusal(endpoint.now(), period) {
                self.publish_hint(endpoint, "refused", Some(period));
            }
        }
    }

    /// Notes a TCP connection attempt's result: reconnect backoff and outlier detection.
    pub fn tcp_connected(&self, endpoint: &Endpoint, ok: bool) {
        endpoint.connected(ok);
        self.observe(
            endpoint,
            if ok {
                Outcome::Success
            } else {
                Outcome::ConnectFailure
            },
        );
    }

    /// The cluster, its endpoints and their state, as `/clusters` shows them.
    pub fn status(&self) -> serde_json::Value {
        let endpoints: Vec<_> = self
            .endpoints()
            .iter()
            .map(|e| {
                json!({
                    "address": e.authority.as_str(),
                    "source": e.source,
                    "weight": e.weight,
                    "health": e.health().name(),
                    "ejected": e.ejected_for().is_some(),
                    "ejected_ms": e.ejected_for().map(|d| d.as_millis() as u64),
                    "ejections": e.outlier.ejections.load(Ordering::Relaxed),
                    "hinted": e.outlier.hinted(e.now()),
                    "reconnect_in_ms": e.reconnect_in().map(|d| d.as_millis() as u64),
                    "latency_ewma_ms": e.latency().map(|d| d.as_secs_f64() * 1000.0),
                    "requests": e.requests.load(Ordering::Relaxed),
                    "in_flight": e.in_flight.load(Ordering::Relaxed),
                    "connect_failures": e.connect_failures.load(Ordering::Relaxed),
                    "circuit": e.breaker.as_ref().map(|b| b.state().name()),
                    "circuit_open_ms": e.breaker.as_ref().and_then(|b| b.open_for()).map(|d| d.as_millis() as u64),
                })
            })
            .collect();
        json!({
            "name": self.name(),
            "protocol": match self.config.protocol {
                UpstreamProtocol::Http1 => "http1",
                UpstreamProtocol::Http2 => "http2",
            },
            "connect_timeout_ms": self.config.connect_timeout.as_millis() as u64,
            "discovery": match &self.config.upstream.discovery {
                Discovery::Static(_) => "static",
                Discovery::Dns(_) => "dns",
                Discovery::Registry { .. } => "registry",
            },
            "load_balancer": self.config.upstream.balancer.name(),
            "panic": self.panicking(),
            "circuit": self.breaker.as_ref().map(|b| b.state().name()),
            "circuit_open_ms": self.breaker.as_ref().and_then(|b| b.open_for()).map(|d| d.as_millis() as u64),
            "bulkhead": {
                "max_concurrent": self.config.bulkhead.max_concurrent,
                "max_pending": self.config.bulkhead.max_pending,
            },
            "endpoints": endpoints,
        })
    }
}

/// Probes between two TCP connections to a hinted endpoint.
const PROBE_GAP: std::time::Duration = std::time::Duration::from_millis(200);

/// Probes a hinted endpoint with TCP connections until this sidecar's evidence decides: the
/// first failure ejects it (the hint was right), [`outlier::HINT_OVERRIDE`] successes lift the
/// hint (it was wrong for this sidecar). Ends early if the cluster goes or the hint runs out.
async fn probe(cluster: std::sync::Weak<Cluster>, endpoint: Arc<Endpoint>) {
    loop {
        let Some(timeout) = cluster.upgrade().map(|c| c.config.connect_timeout) else {
            return;
        };
        if !endpoint.outlier.hinted(endpoint.now()) {
            return;
        }
        let alive = matches!(
            tokio::time::timeout(
                timeout,
                tokio::net::TcpStream::connect(endpoint.authority.as_str())
            )
            .await,
            Ok(Ok(_))
        );
        let Some(c) = cluster.upgrade() else {
            return;
        };
        let set = c.set.load();
        if !alive {
            if c.outlier.probed(&set.endpoints, &endpoint, false) {
                c.refresh_availability(&set);
            }
            return;
        }
        if endpoint.outlier.ok_against_hint() {
            if let Some(h) = &c.hints {
                h.counters.overridden.inc();
            }
            tracing::info!(endpoint = %endpoint.authority, "failure hint lifted: the endpoint answers this sidecar's probes");
            return;
        }
        drop((set, c));
        tokio::time::sleep(PROBE_GAP).await;
    }
}

/// Applies published endpoint sets and health verdicts to the cluster until it is dropped.
async fn follow(
    cluster: Weak<Cluster>,
    mut endpoints: Subscription,
    mut verdicts: mpsc::Receiver<Verdict>,
    health: &mut HashMap<Authority, Health>,
) {
    let (mut discovering, mut checking) = (true, true);
    while discovering || checking {
        tokio::select! {
            changed = endpoints.changed(), if discovering => {
                if changed.is_err() {
                    // The source ended; its last set stays.
                    discovering = false;
                    continue;
                }
                let Some(c) = cluster.upgrade() else { return };
                let current = endpoints.borrow_and_update().clone();
                // Verdicts of endpoints that left are forgotten; one that comes back is checked anew.
                health.retain(|a, _| current.list.iter().any(|(b, _)| a == b));
                c.apply(&current, health);
            }
            verdict = verdicts.recv(), if checking => {
                let Some(v) = verdict else {
                    checking = false;
                    continue;
                };
                let Some(c) = cluster.upgrade() else { return };
                health.insert(v.authority.clone(), v.health);
                c.set_health(&v.authority, v.health, v.recovered);
            }
        }
    }
}
