//! Upstream clusters: their endpoints, a pooled HTTP client per cluster, the cluster-wide
//! resilience state, and [`Upstream`], the innermost service that sends one try to one endpoint.
//!
//! Each cluster owns its own connection pool, so a slow dependency cannot use up connections
//! meant for another. A cluster's runtime object survives a reload when its config is unchanged,
//! keeping its warm connections, its breaker state and its retry budget.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Uri, Version};
use http_body_util::BodyExt;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::time::Instant;
use tower::Service;

use crate::control::config::resilience::DEFAULT_ENDPOINT_CONSECUTIVE_FAILURES;
use crate::control::config::{ClusterConfig, UpstreamProtocol};
use crate::error::ProxyError;
use crate::proxy::balance::RoundRobin;
use crate::proxy::body::{ProxyBody, ReqBody};
use crate::proxy::http::strip_hop_by_hop;
use crate::proxy::resilience::breaker::CircuitBreaker;
use crate::proxy::resilience::bulkhead::Bulkhead;
use crate::proxy::resilience::classify::{self, TrailerStatus};
use crate::proxy::resilience::latency::LatencyWindow;
use crate::proxy::resilience::retry::budget::RetryBudget;
use crate::proxy::resilience::{timeout, Call, Response, ResponseFuture};
use crate::telemetry::metrics::{ClusterMetrics, Metrics};

/// How long an idle pooled upstream connection is kept.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// The pooled HTTP client used to reach a cluster.
pub type UpstreamClient = Client<HttpConnector, ReqBody>;

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
    /// The endpoint's own circuit breaker, if the cluster keeps them.
    pub breaker: Option<Arc<CircuitBreaker>>,
}

impl Endpoint {
    fn new(
        authority: Authority,
        source: &'static str,
        breaker: Option<Arc<CircuitBreaker>>,
    ) -> Self {
        Self {
            authority,
            source,
            requests: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            connect_failures: AtomicU64::new(0),
            breaker,
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
    /// Retry budget shared by every route sending here.
    pub budget: Arc<RetryBudget>,
    /// The cluster-wide breaker, unless breakers are off.
    pub breaker: Option<Arc<CircuitBreaker>>,
    /// The cluster's concurrency cap.
    pub bulkhead: Arc<Bulkhead>,
    /// Recent try latencies, for percentile hedging.
    pub latency: Arc<LatencyWindow>,
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
        let m = metrics.cluster(&config.name);
        let endpoint_breaker = |cfg: &ClusterConfig| {
            let b = cfg.breaker.as_ref().filter(|b| b.per_endpoint)?;
            let consecutive = match b.consecutive_failures {
                0 => DEFAULT_ENDPOINT_CONSECUTIVE_FAILURES,
                n => n,
            };
            Some(Arc::new(CircuitBreaker::new(
                b.clone(),
                consecutive,
                Some(m.endpoint_breaker.clone()),
            )))
        };
        let endpoints = config
            .endpoints
            .iter()
            .map(|a| {
                Arc::new(Endpoint::new(
                    a.clone(),
                    "static",
                    endpoint_breaker(&config),
                ))
            })
            .collect();
        let breaker = config.breaker.as_ref().map(|b| {
            Arc::new(CircuitBreaker::new(
                b.clone(),
                b.consecutive_failures,
                Some(m.breaker.clone()),
            ))
        });
        Self {
            budget: Arc::new(RetryBudget::new(&config.budget)),
            bulkhead: Arc::new(Bulkhead::new(&config.bulkhead, Some(m.bulkhead.clone()))),
            latency: Arc::new(LatencyWindow::new()),
            breaker,
            metrics: m,
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

    /// The next endpoint for a TCP connection, or `None` if the cluster has none.
    pub fn pick(&self) -> Option<Arc<Endpoint>> {
        let endpoints = self.endpoints.load();
        self.cursor.pick(&endpoints).cloned()
    }

    /// The endpoint for try `attempt` of a request with offset `base`: the first from
    /// `base + attempt - 1` on whose breaker admits it. Consecutive tries land on different
    /// endpoints when there are several.
    fn choose(
        &self,
        base: usize,
        attempt: u32,
    ) -> Result<
        (
            Arc<Endpoint>,
            Option<crate::proxy::resilience::breaker::Permit>,
        ),
        ProxyError,
    > {
        let endpoints = self.endpoints.load();
        let n = endpoints.len();
        if n == 0 {
            return Err(ProxyError::UpstreamConnect(
                "the cluster has no endpoints".into(),
            ));
        }
        let start = base.wrapping_add(attempt.saturating_sub(1) as usize);
        for i in 0..n {
            let ep = &endpoints[start.wrapping_add(i) % n];
            match &ep.breaker {
                None => return Ok((ep.clone(), None)),
                Some(b) => {
                    if let Some(permit) = b.try_acquire() {
                        return Ok((ep.clone(), Some(permit)));
                    }
                }
            }
        }
        Err(ProxyError::CircuitOpen)
    }

    /// Sends one try to one endpoint and classifies what comes back.
    async fn send(self: Arc<Self>, call: Call) -> Result<Response, ProxyError> {
        let (endpoint, permit) = self.choose(call.ctx.base, call.ctx.attempt)?;
        let Call {
            mut head,
            body,
            ctx,
        } = call;
        let grpc = classify::is_grpc(&head.headers);
        let mut uri = http::uri::Parts::default();
        uri.scheme = Some(Scheme::HTTP);
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
        if let Some(deadline) = ctx.deadline {
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
            Err(_) => Err(ProxyError::Timeout),
            Ok(answer) => match answer {
                Ok(resp) => {
                    self.latency.record(started.elapsed());
                    let (mut parts, body) = resp.into_parts();
                    strip_hop_by_hop(&mut parts.headers);
                    let mut resp = Response::from_parts(parts, ProxyBody::Upstream(body));
                    if ctx.grpc_retry_codes != 0
                        && classify::is_grpc(resp.headers())
                        && classify::header_grpc_code(resp.headers()).is_none()
                    {
                        resp = hold_for_trailers(resp, ctx.hold_limit).await?;
                    }
                    let (parts, body) = resp.into_parts();
                    Ok(Response::from_parts(parts, body.watch(ctx.idle_timeout)))
                }
                Err(e) if e.is_connect() => {
                    self.connect_failed(&endpoint);
                    Err(ProxyError::UpstreamConnect(Box::new(e)))
                }
                Err(e) if refused_stream(&e) => Err(ProxyError::RefusedStream(Box::new(e))),
                Err(e) => Err(ProxyError::UpstreamReset(Box::new(e))),
            },
        };
        drop(in_flight);
        if let Some(p) = permit {
            p.record(classify::outcome(&result));
        }
        result
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

/// Reads a gRPC response ahead, up to `limit` bytes, to find the status in its trailers; the
/// frames read are sent on unchanged.
async fn hold_for_trailers(resp: Response, limit: u64) -> Result<Response, ProxyError> {
    let (mut parts, body) = resp.into_parts();
    let ProxyBody::Upstream(mut body) = body else {
        return Ok(Response::from_parts(parts, body));
    };
    let mut frames = VecDeque::new();
    let mut held = 0u64;
    loop {
        match body.frame().await {
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
