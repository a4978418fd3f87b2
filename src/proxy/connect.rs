//! Upstream clusters: their endpoints, a pooled HTTP client per cluster, the cluster-wide
//! resilience state, and [`Upstream`], the innermost service that sends one try to one endpoint.
//!
//! Each cluster owns its own connection pool, so a slow dependency cannot use up connections
//! meant for another. A cluster's runtime object survives a reload when its config is unchanged,
//! keeping its warm connections, its breaker state and its retry budget.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Uri, Version};
use http_body::Body as _;
use http_body_util::BodyExt;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::time::Instant;
use tower::Service;

use crate::control::config::resilience::DEFAULT_ENDPOINT_CONSECUTIVE_FAILURES;
use crate::control::config::upstream::{Discovery, DnsQuery, OutlierConfig};
use crate::control::config::{ClusterConfig, UpstreamProtocol};
use crate::error::ProxyError;
use crate::proxy::balance::{self, PickRequest, Picker, RoundRobin};
use crate::proxy::body::{BodyTooLarge, ClientBodyError, ProxyBody, ReqBody, SupersededTry};
use crate::proxy::endpoint::{Endpoint, Health, Signal};
use crate::proxy::http::strip_hop_by_hop;
use crate::proxy::resilience::breaker::CircuitBreaker;
use crate::proxy::resilience::breaker::Permit;
use crate::proxy::resilience::bulkhead::Bulkhead;
use crate::proxy::resilience::classify::{self, TrailerStatus};
use crate::proxy::resilience::latency::LatencyWindow;
use crate::proxy::resilience::retry::budget::RetryBudget;
use crate::proxy::resilience::{timeout, Call, Response, ResponseFuture};
use crate::proxy::tls::{ClientTls, LoadError, UpstreamConnector};
use crate::telemetry::metrics::{ClusterMetrics, Metrics};

/// The pooled HTTP client used to reach a cluster.
pub type UpstreamClient = Client<UpstreamConnector, ReqBody>;

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
    /// Pooled HTTP client (unused by TCP listeners).
    pub client: UpstreamClient,
    /// Current endpoints; discovery swaps in new sets without touching the pool.
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
    /// TLS to the endpoints, if configured.
    pub tls: Option<Arc<ClientTls>>,
    scheme: Scheme,
}

/// Whether an endpoint's breaker (if any) would admit a call now.
fn admits(e: &Endpoint) -> bool {
    match &e.breaker {
        Some(b) => b.would_admit(),
        None => true,
    }
}

impl Cluster {
    /// Builds the cluster's client and, for a static cluster, its endpoints; fails when its
    /// TLS files can no longer be used.
    pub fn new(config: ClusterConfig, metrics: &Metrics) -> Result<Self, LoadError> {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(config.connect_timeout));
        connector.set_nodelay(true);
        let tls = match &config.tls {
            Some(t) => {
                // A `dns:` cluster's endpoints are addresses; the name they were found under is
                // the one their certificates carry.
                let dns_name = match &config.upstream.discovery {
                    Discovery::Dns(d) => match &d.query {
                        DnsQuery::Address { name, .. } | DnsQuery::Srv { name } => {
                            Some(name.trim_end_matches('.').to_owned())
                        }
                    },
                    _ => None,
                };
                Some(Arc::new(ClientTls::new(
                    t,
                    dns_name.as_deref(),
                    config.protocol == UpstreamProtocol::Http2,
                    &config.name,
                    metrics.cert_reloads(&config.name),
                )?))
            }
            None => None,
        };
        let scheme = if tls.is_some() {
            Scheme::HTTPS
        } else {
            Scheme::HTTP
        };
        let connector = UpstreamConnector::new(connector, tls.clone());
        let pool = &config.upstream.pool;
        let client = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(pool.idle_timeout)
            .pool_max_idle_per_host(pool.max_idle_per_endpoint)
            .http2_only(config.protocol == UpstreamProtocol::Http2)
            .build(connector);
        let m = metrics.cluster(&config.name);
        let breaker = config.breaker.as_ref().map(|b| {
            Arc::new(CircuitBreaker::new(
                b.clone(),
                b.consecutive_failures,
                Some(m.breaker.clone()),
            ))
        });
        let cluster = Self {
            budget: Arc::new(RetryBudget::new(&config.budget)),
            bulkhead: Arc::new(Bulkhead::new(&config.bulkhead, Some(m.bulkhead.clone()))),
            latency: Arc::new(LatencyWindow::new()),
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
            tls,
            scheme,
        };
        if let Discovery::Static(list) = &cluster.config.upstream.discovery {
            let list: Vec<_> = list
                .iter()
                .map(|e| (e.authority.clone(), e.weight))
                .collect();
            cluster.set_endpoints(&list, "static");
        }
        Ok(cluster)
    }

    /// The cluster's name.
    pub fn name(&self) -> &str {
        &self.config.name
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
        let now = self.epoch.elapsed().as_millis() as u64;
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
        let m = &self.metrics;
        m.endpoints[0].set(available);
        m.endpoints[1].set(unhealthy);
        m.endpoints[2].set(ejected);
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
        m.panic.set(i64::from(panic));
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
    fn hash_key(&self, head: &http::request::Parts, peer: std::net::SocketAddr) -> Option<u64> {
        let on = self.config.upstream.hash_on.as_ref()?;
        balance::with_key(on, &head.headers, head.uri.path(), peer, balance::hash)
    }

    /// Picks the endpoint for a try: available (unless the cluster panics), admitted by its
    /// breaker, and not yet tried by this request when another one is left.
    fn choose(
        &self,
        req: PickRequest,
    ) -> Result<(Arc<Endpoint>, usize, Option<Permit>), ProxyError> {
        let set = self.set.load();
        if set.endpoints.is_empty() {
            return Err(ProxyError::UpstreamConnect(
                "the cluster has no endpoints".into(),
            ));
        }
        let now = self.epoch.elapsed().as_millis() as u64;
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
                .pick(&set.endpoints, req, |e| e.ready() && admits(e))
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

    /// Counts a try's result for outlier detection, ejecting the endpoint if it crossed a
    /// threshold and the cluster may lose it.
    fn observe(&self, endpoint: &Endpoint, result: &Result<Response, ProxyError>) {
        let Some(cfg) = &self.config.upstream.outlier else {
            return;
        };
        if !endpoint.record(Signal::of(result), cfg) || endpoint.ejected_for().is_some() {
            return;
        }
        self.eject(endpoint, cfg);
    }

    /// Ejects `endpoint` unless the cluster has already lost its share.
    fn eject(&self, endpoint: &Endpoint, cfg: &OutlierConfig) {
        let set = self.set.load();
        let total = set.endpoints.len() as u64;
        let ejected = set
            .endpoints
            .iter()
            .filter(|e| e.ejected_for().is_some())
            .count() as u64;
        // As Envoy: one endpoint may always be ejected; more only within the percentage.
        if ejected > 0 && (ejected + 1) * 100 > u64::from(cfg.max_ejection_percent) * total {
            return;
        }
        let period = endpoint.eject(cfg);
        self.metrics.ejections.inc();
        tracing::warn!(cluster = %self.name(), endpoint = %endpoint.authority, ejected_for = ?period,
            "outlier ejected");
        self.refresh_availability(&set);
    }

    /// Sends one try to one endpoint and classifies what comes back.
    async fn send(self: Arc<Self>, call: Call) -> Result<Response, ProxyError> {
        let req = PickRequest {
            key: self.hash_key(&call.head, call.ctx.peer),
            tried: call
                .ctx
                .tried
                .as_ref()
                .map_or(0, |t| t.load(Ordering::Relaxed)),
            seed: (call.ctx.base as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
                ^ u64::from(call.ctx.attempt),
        };
        let (endpoint, index, permit) = self.choose(req)?;
        if let Some(t) = &call.ctx.tried {
            t.fetch_or(1 << (index % 64), Ordering::Relaxed);
        }
        let Call {
            mut head,
            body,
            ctx,
        } = call;
        let grpc = classify::is_grpc(&head.headers);
        let mut uri = http::uri::Parts::default();
        uri.scheme = Some(self.scheme.clone());
        uri.authority = Some(endpoint.authority.clone());
        uri.path_and_query = Some(
            head.uri
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| PathAndQuery::from_static("/")),
        );
        head.uri = Uri::from_parts(uri).map_err(|e| ProxyError::UpstreamConnect(Box::new(e)))?;
        head.version = match self.config.protocol {
            UpstreamProtocol::Http1 => Version::HTTP_11,
            UpstreamProtocol::Http2 => Version::HTTP_2,
        };
        // The next hop gets the time this try has left, which is never more than the request's.
        if let Some(deadline) = ctx.try_deadline.or(ctx.deadline) {
            timeout::propagate(&mut head.headers, deadline, grpc);
        }
        self.metrics.attempts.inc();
        let in_flight = endpoint.start();
        let started = Instant::now();
        let pending = self.client.request(Request::from_parts(head, body));
        let answer = match ctx.try_deadline {
            Some(at) => tokio::time::timeout_at(at, pending).await,
            None => Ok(pending.await),
        };
        let result = match answer {
            Err(_) => {
                // A try cut off by its deadline took at least this long: a latency sample too.
                endpoint.observe_latency(started.elapsed());
                Err(ctx.expired())
            }
            Ok(Ok(resp)) => {
                self.latency.record(started.elapsed());
                endpoint.observe_latency(started.elapsed());
                let (mut parts, body) = resp.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                let resp = Response::from_parts(parts, ProxyBody::Upstream(body));
                let grpc_hold = ctx.grpc_retry_codes != 0
                    && classify::is_grpc(resp.headers())
                    && classify::header_grpc_code(resp.headers()).is_none();
                // A small answer usually arrives whole with its headers: reading it before
                // answering costs nothing, and a body cut short becomes a retryable reset.
                let small_hold = ctx.hold_small
                    && !resp.body().is_end_stream()
                    && resp
                        .body()
                        .size_hint()
                        .exact()
                        .is_some_and(|n| n <= ctx.hold_limit);
                let held = if grpc_hold || small_hold {
                    let until = ctx.try_deadline.map_or(Instant::now() + HOLD_MAX, |d| {
                        d.min(Instant::now() + HOLD_MAX)
                    });
                    hold_for_trailers(resp, ctx.hold_limit, until).await
                } else {
                    Ok(resp)
                };
                held.map(|resp| {
                    let (parts, body) = resp.into_parts();
                    Response::from_parts(parts, body.watch(ctx.idle_timeout))
                })
            }
            Ok(Err(e)) if client_side(&e) => Err(match too_large(&e) {
                Some(limit) => ProxyError::BodyTooLarge(limit),
                None => ProxyError::ClientAbort(Box::new(e)),
            }),
            Ok(Err(e)) if e.is_connect() => {
                self.connect_failed(&endpoint);
                Err(ProxyError::UpstreamConnect(Box::new(e)))
            }
            Ok(Err(e)) if refused_stream(&e) => Err(ProxyError::RefusedStream(Box::new(e))),
            Ok(Err(e)) => Err(ProxyError::UpstreamReset(Box::new(e))),
        };
        drop(in_flight);
        match &result {
            Err(ProxyError::UpstreamConnect(_)) => endpoint.connected(false),
            Err(ProxyError::ClientAbort(_) | ProxyError::DeadlineExceeded) => {}
            _ => endpoint.connected(true),
        }
        self.observe(&endpoint, &result);
        if let Some(p) = permit {
            p.record(classify::outcome(&result));
        }
        result
    }

    /// Counts a failed connection attempt to `endpoint`.
    pub fn connect_failed(&self, endpoint: &Endpoint) {
        endpoint.connect_failures.fetch_add(1, Ordering::Relaxed);
        self.metrics.connect_errors.inc();
    }

    /// Notes a TCP connection attempt's result: reconnect backoff and outlier detection.
    pub fn tcp_connected(&self, endpoint: &Endpoint, ok: bool) {
        endpoint.connected(ok);
        if let Some(cfg) = &self.config.upstream.outlier {
            let signal = if ok {
                Signal::Success
            } else {
                Signal::ConnectFailure
            };
            if endpoint.record(signal, cfg) && endpoint.ejected_for().is_none() {
                self.eject(endpoint, cfg);
            }
        }
    }
}

/// Longest a gRPC response is held back to read its trailers: long enough for a unary answer,
/// short enough that a streaming one is barely delayed.
const HOLD_MAX: Duration = Duration::from_millis(250);

/// Reads a gRPC response ahead, up to `limit` bytes or until `until`, to find the status in its
/// trailers; the frames read are sent on unchanged, and the rest streams after them.
async fn hold_for_trailers(
    resp: Response,
    limit: u64,
    until: Instant,
) -> Result<Response, ProxyError> {
    let (mut parts, body) = resp.into_parts();
    let ProxyBody::Upstream(mut body) = body else {
        return Ok(Response::from_parts(parts, body));
    };
    let mut frames = VecDeque::new();
    let mut held = 0u64;
    loop {
        let Ok(next) = tokio::time::timeout_at(until, body.frame()).await else {
            let rest = Some(body);
            return Ok(Response::from_parts(
                parts,
                ProxyBody::Held { frames, rest },
            ));
        };
        match next {
            None => {
                return Ok(Response::from_parts(
                    parts,
                    ProxyBody::Held { frames, rest: None },
                ));
            }
            Some(Err(e)) => return Err(ProxyError::UpstreamReset(Box::new(e))),
            Some(Ok(frame)) => {
                if let Some(t) = frame.trailers_ref() {
                    if let Some(code) = classify::header_grpc_code(t) {
                        parts.extensions.insert(TrailerStatus(code));
                    }
                }
                held += frame.data_ref().map_or(0, |d| d.len() as u64);
                frames.push_back(frame);
                if held > limit {
                    let rest = Some(body);
                    return Ok(Response::from_parts(
                        parts,
                        ProxyBody::Held { frames, rest },
                    ));
                }
            }
        }
    }
}

/// Whether a client error came from our side of the request body: the client's body failed,
/// or a newer try took it over. Neither says anything about the upstream.
fn client_side(e: &hyper_util::client::legacy::Error) -> bool {
    let mut source = std::error::Error::source(e);
    while let Some(err) = source {
        if err.is::<ClientBodyError>() || err.is::<SupersededTry>() || err.is::<BodyTooLarge>() {
            return true;
        }
        source = err.source();
    }
    false
}

/// The limit, if the client's body failed for being larger than the route allows.
fn too_large(e: &hyper_util::client::legacy::Error) -> Option<u64> {
    let mut source = std::error::Error::source(e);
    while let Some(err) = source {
        if let Some(t) = err.downcast_ref::<BodyTooLarge>() {
            return Some(t.0);
        }
        source = err.source();
    }
    None
}

/// Whether an HTTP/2 upstream refused the stream (`REFUSED_STREAM`): it did not process it.
fn refused_stream(e: &hyper_util::client::legacy::Error) -> bool {
    let mut source = std::error::Error::source(e);
    while let Some(err) = source {
        if let Some(h2) = err.downcast_ref::<h2::Error>() {
            return h2.reason() == Some(h2::Reason::REFUSED_STREAM);
        }
        source = err.source();
    }
    false
}

/// The innermost service: sends a try to one of the cluster's endpoints.
#[derive(Clone)]
pub struct Upstream {
    cluster: Arc<Cluster>,
}

impl Upstream {
    /// The service for `cluster`.
    pub fn new(cluster: Arc<Cluster>) -> Self {
        Self { cluster }
    }
}

impl Service<Call> for Upstream {
    type Response = Response;
    type Error = ProxyError;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, call: Call) -> ResponseFuture {
        Box::pin(self.cluster.clone().send(call))
    }
}
