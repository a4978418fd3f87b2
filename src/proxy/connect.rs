//! The upstream client: a pooled HTTP client per cluster (plain or TLS), and [`Upstream`], the
//! innermost service, which sends one try to one endpoint the cluster picks and classifies what
//! comes back.
//!
//! Each cluster owns its own connection pool, so a slow dependency cannot use up connections
//! meant for another. The one [`classify::outcome`] of a try feeds the endpoint's breaker and
//! outlier detection alike; the cluster breaker and load shedding compute it from the same
//! function higher in the stack.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::uri::{PathAndQuery, Scheme};
use http::{Request, StatusCode, Uri, Version};
use http_body::Body as _;
use http_body_util::BodyExt;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::time::Instant;
use tower::Service;

use crate::control::config::upstream::{Discovery, DnsQuery};
use crate::control::config::{ClusterConfig, UpstreamProtocol};
use crate::error::ProxyError;
use crate::proxy::balance::PickRequest;
use crate::proxy::body::{BodyTooLarge, ClientBodyError, ProxyBody, ReqBody, SupersededTry};
use crate::proxy::cluster::Cluster;
use crate::proxy::http::strip_hop_by_hop;
use crate::proxy::resilience::classify::{self, Outcome, TrailerStatus};
use crate::proxy::resilience::{timeout, Call, Response, ResponseFuture};
use crate::proxy::workers;
use crate::tasks::Tasks;
use crate::telemetry::metrics::Metrics;
use crate::tls::{ClientTls, LoadError, UpstreamConnector};

/// The pooled hyper client of a cluster.
pub type UpstreamClient = hyper_util::client::legacy::Client<UpstreamConnector, ReqBody>;

/// How a cluster's tries reach its endpoints: the pools, TLS, scheme and protocol.
pub struct Client {
    /// One pool per worker (at its position, [`workers::current`]), so a try and the
    /// connection task that carries it run on the same thread.
    pools: Box<[UpstreamClient]>,
    /// TLS to the endpoints, if configured (the health checker connects with it too).
    pub tls: Option<Arc<ClientTls>>,
    scheme: Scheme,
    version: Version,
}

impl Client {
    /// Builds the client of the cluster `config` with `pools` connection pools (one per
    /// worker); its certificate files are watched on `tasks`.
    pub fn new(
        config: &ClusterConfig,
        metrics: &Metrics,
        tasks: &Tasks,
        pools: usize,
    ) -> Result<Self, LoadError> {
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
                    metrics.control.cluster_cert(&config.name),
                    tasks,
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
        let mut builder = hyper_util::client::legacy::Client::builder(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(pool.idle_timeout)
            .pool_max_idle_per_host(pool.max_idle_per_endpoint)
            .http2_only(config.protocol == UpstreamProtocol::Http2);
        let pools = (0..pools.max(1))
            .map(|_| builder.build(connector.clone()))
            .collect();
        Ok(Self {
            pools,
            tls,
            scheme,
            version: match config.protocol {
                UpstreamProtocol::Http1 => Version::HTTP_11,
                UpstreamProtocol::Http2 => Version::HTTP_2,
            },
        })
    }
}

/// Sends one try to one endpoint of `cluster` and classifies what comes back.
async fn send(cluster: Arc<Cluster>, call: Call) -> Result<Response, ProxyError> {
    let req = PickRequest {
        key: cluster.hash_key(&call.head, call.ctx.peer),
        tried: call
            .ctx
            .tried
            .as_ref()
            .map_or(0, |t| t.load(Ordering::Relaxed)),
        seed: (call.ctx.base as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
            ^ u64::from(call.ctx.attempt),
    };
    let (endpoint, index, permit) = cluster.choose(req)?;
    if let Some(t) = &call.ctx.tried {
        t.fetch_or(1 << (index % 64), Ordering::Relaxed);
    }
    let Call {
        mut head,
        body,
        ctx,
    } = call;
    let client = &cluster.client;
    let grpc = classify::is_grpc(&head.headers);
    let mut uri = http::uri::Parts::default();
    uri.scheme = Some(client.scheme.clone());
    uri.authority = Some(endpoint.authority.clone());
    uri.path_and_query = Some(
        head.uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/")),
    );
    head.uri = Uri::from_parts(uri).map_err(|e| ProxyError::UpstreamConnect(Box::new(e)))?;
    head.version = client.version;
    // The next hop gets the time this try has left, which is never more than the request's.
    if let Some(deadline) = ctx.try_deadline.or(ctx.deadline) {
        timeout::propagate(&mut head.headers, deadline, grpc);
    }
    cluster.metrics.attempts.inc();
    let in_flight = endpoint.start();
    let started = Instant::now();
    // Never empty (`Client::new` builds at least one); a thread that is not a worker's uses the
    // first.
    let at = workers::current().unwrap_or(0);
    let pool = client.pools.get(at).unwrap_or(&client.pools[0]);
    let pending = pool.request(Request::from_parts(head, body));
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
            cluster.latency.record(started.elapsed());
            endpoint.observe_latency(started.elapsed());
            let (mut parts, body) = resp.into_parts();
            // A `101` names the protocol switched to: that hop-by-hop pair is relayed, since
            // the proxy relays the switch itself (the route allowed the upgrade).
            let switched = (parts.status == StatusCode::SWITCHING_PROTOCOLS)
                .then(|| parts.headers.get(http::header::UPGRADE).cloned())
                .flatten();
            strip_hop_by_hop(&mut parts.headers);
            if let Some(protocol) = switched {
                parts.headers.insert(http::header::UPGRADE, protocol);
                parts.headers.insert(
                    http::header::CONNECTION,
                    http::HeaderValue::from_static("upgrade"),
                );
            }
            // Each side gets the proxy's own protocol version: an HTTP/1.0 upstream's version
            // would otherwise end the client's keep-alive.
            parts.version = Version::default();
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
            cluster.connect_failed(&endpoint, refused(&e));
            Err(ProxyError::UpstreamConnect(Box::new(e)))
        }
        Ok(Err(e)) if refused_stream(&e) => Err(ProxyError::RefusedStream(Box::new(e))),
        Ok(Err(e)) => Err(ProxyError::UpstreamReset(Box::new(e))),
    };
    drop(in_flight);
    let outcome = classify::outcome(&result);
    match outcome {
        Outcome::ConnectFailure => endpoint.connected(false),
        Outcome::Ignore => {}
        _ => endpoint.connected(true),
    }
    cluster.observe(&endpoint, outcome);
    if let Some(p) = permit {
        let before = endpoint.breaker.as_ref().map(|b| b.state());
        p.record(outcome);
        cluster.after_breaker(&endpoint, before);
    }
    result
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
        Box::pin(send(self.cluster.clone(), call))
    }
}

/// Whether a connect error is a refusal: nothing listens on the endpoint's port.
fn refused(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(e);
    while let Some(err) = source {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            return io.kind() == std::io::ErrorKind::ConnectionRefused;
        }
        source = err.source();
    }
    false
}
