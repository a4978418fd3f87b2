//! The upstream client of a cluster (plain or TLS), and [`Upstream`], the innermost service,
//! which sends one try to one endpoint the cluster picks and classifies what comes back.
//!
//! HTTP/1.1 tries take an idle connection kept on the endpoint itself ([`pool`]) or open one;
//! HTTP/2 tries go through hyper-util's client, which multiplexes one connection per endpoint.
//! Each cluster owns its own connections, so a slow dependency cannot use up connections meant
//! for another. The one [`classify::outcome`] of a try feeds the endpoint's breaker and
//! outlier detection alike; the cluster breaker and load shedding compute it from the same
//! function higher in the stack.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use http::uri::{PathAndQuery, Scheme};
use http::{Method, Request, StatusCode, Uri, Version};
use http_body::{Body as _, Frame};
use http_body_util::BodyExt;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::time::Instant;
use tower::Service;

use crate::control::config::upstream::{Discovery, DnsQuery};
use crate::control::config::{ClusterConfig, UpstreamProtocol};
use crate::error::{BoxError, ProxyError};
use crate::proxy::balance::{self, PickRequest};
use crate::proxy::body::{
    BodyTooLarge, ClientBodyError, ProxyBody, ReqBody, SupersededTry, UpstreamBody,
};
use crate::proxy::clock;
use crate::proxy::cluster::Cluster;
use crate::proxy::endpoint::{Endpoint, InFlight};
use crate::proxy::h1;
use crate::proxy::http::strip_hop_by_hop;
use crate::proxy::pool::{self, Loan};
use crate::proxy::resilience::breaker::Permit;
use crate::proxy::resilience::classify::{self, Outcome, TrailerStatus};
use crate::proxy::resilience::{self, timeout, Call, CallCtx, Response, ResponseFuture};
use crate::proxy::values;
use crate::proxy::workers;
use crate::tasks::Tasks;
use crate::telemetry::metrics::Metrics;
use crate::tls::{ClientTls, LoadError, UpstreamConnector};

/// hyper-util's pooled client, used by HTTP/2 clusters for its one multiplexed connection per
/// endpoint.
pub type UpstreamClient = hyper_util::client::legacy::Client<UpstreamConnector, ReqBody>;

/// How a cluster's tries reach its endpoints: the pools, TLS, scheme and protocol.
pub struct Client {
    conns: Conns,
    /// TLS to the endpoints, if configured (the health checker connects with it too).
    pub tls: Option<Arc<ClientTls>>,
    scheme: Scheme,
    /// How many workers the pools are kept for.
    workers: usize,
}

/// Where a cluster's connections come from.
enum Conns {
    /// HTTP/1.1: a connection per exchange, idle ones kept on each endpoint ([`pool`]), spoken
    /// by the request's own task ([`h1`]).
    Http1 {
        connector: UpstreamConnector,
        settings: pool::Settings,
    },
    /// HTTP/2: one hyper-util client per worker (at its position, [`workers::current`]), so a
    /// try and the connection task that carries it run on the same thread.
    Http2(Box<[UpstreamClient]>),
}

/// Why a try got no response.
#[derive(Debug, thiserror::Error)]
enum TryError {
    /// No connection could be made (TCP or TLS).
    #[error("{0}")]
    Connect(BoxError),
    /// The exchange on an HTTP/1.1 connection failed.
    #[error("{0}")]
    Http1(h1::Error),
    /// The HTTP/2 client failed (to connect, or in the exchange).
    #[error("{0}")]
    Http2(hyper_util::client::legacy::Error),
}

impl TryError {
    fn is_connect(&self) -> bool {
        match self {
            TryError::Connect(_) => true,
            TryError::Http1(_) => false,
            TryError::Http2(e) => e.is_connect(),
        }
    }

    /// The error whose causes tell what failed.
    fn cause(&self) -> &(dyn std::error::Error + 'static) {
        match self {
            TryError::Connect(e) => e.as_ref(),
            TryError::Http1(e) => e,
            TryError::Http2(e) => e,
        }
    }
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
        let workers = pools.max(1);
        let conns = match config.protocol {
            UpstreamProtocol::Http1 => Conns::Http1 {
                connector,
                settings: pool::Settings {
                    max_idle: pool.max_idle_per_endpoint,
                    idle_timeout: pool.idle_timeout,
                },
            },
            UpstreamProtocol::Http2 => {
                let mut builder = hyper_util::client::legacy::Client::builder(TokioExecutor::new());
                builder
                    .timer(TokioTimer::new())
                    .pool_timer(TokioTimer::new())
                    .pool_idle_timeout(pool.idle_timeout)
                    .pool_max_idle_per_host(pool.max_idle_per_endpoint)
                    .http2_only(true);
                Conns::Http2(
                    (0..workers)
                        .map(|_| builder.build(connector.clone()))
                        .collect(),
                )
            }
        };
        Ok(Self {
            conns,
            tls,
            scheme,
            workers,
        })
    }

    /// How many workers' idle lists each endpoint keeps.
    pub fn workers(&self) -> usize {
        self.workers
    }

    /// Sends `req` to `endpoint`: on HTTP/1.1 over one of its idle connections, or a new one.
    /// An idempotent request without a body that a reused connection closed on before a byte
    /// of the answer goes out again, on another connection.
    async fn request(
        &self,
        endpoint: &Arc<Endpoint>,
        head: Arc<http::request::Parts>,
        set: &mut h1::TryHeaders,
        body: ReqBody,
    ) -> Result<http::Response<UpstreamBody>, TryError> {
        let (connector, settings) = match &self.conns {
            Conns::Http1 {
                connector,
                settings,
            } => (connector, *settings),
            Conns::Http2(clients) => {
                // Made by a plain function: the head it rewrites would otherwise be kept in
                // this future beside hyper's.
                let req = self.h2_request(endpoint, head, std::mem::take(set), body)?;
                // Never empty (`Client::new` builds at least one); a thread that is not a
                // worker's uses the first.
                let at = workers::current().unwrap_or(0);
                let client = clients.get(at).unwrap_or(&clients[0]);
                let resp = client.request(req).await.map_err(TryError::Http2)?;
                return Ok(resp.map(UpstreamBody::H2));
            }
        };
        // HTTP/1.1 requires `Host`; an HTTP/1.0 client may have sent none.
        if values::find(&head.headers, &http::header::HOST).is_none() {
            if let Ok(host) = http::HeaderValue::from_str(endpoint.authority.as_str()) {
                set.set(&HOST, host);
            }
        }
        let head_only = head.method == Method::HEAD;
        let mut body = body;
        loop {
            let mut conn = match endpoint.idle.take(settings.idle_timeout) {
                Some(conn) => conn,
                // Boxed: a new connection is rare, and its handshake would otherwise make
                // every request's future (moved on each call) as large as its own.
                None => Box::pin(self.connect(endpoint, connector.clone())).await?,
            };
            let empty = matches!(body, ReqBody::Empty);
            let mut out = conn.encode(&head, set, body).map_err(TryError::Http1)?;
            match h1::exchange(&mut conn, &mut out, head_only).await {
                Ok(head) => {
                    let h1::Head {
                        mut parts,
                        framing,
                        keep,
                    } = head;
                    if parts.status == StatusCode::SWITCHING_PROTOCOLS {
                        // After a `101` the connection belongs to the upgrade.
                        parts
                            .extensions
                            .insert(h1::Switched::new(h1::Upgraded::from_conn(conn)));
                        let body = UpstreamBody::H1(h1::ResponseBody::ended());
                        return Ok(http::Response::from_parts(parts, body));
                    }
                    let loan = Box::new(Loan {
                        endpoint: endpoint.clone(),
                        conn,
                        settings,
                    });
                    let body = h1::ResponseBody::new(loan, framing, out, keep);
                    return Ok(http::Response::from_parts(parts, UpstreamBody::H1(body)));
                }
                Err(h1::Error::Closed)
                    if conn.reused() && empty && classify::idempotent(&head.method) =>
                {
                    body = ReqBody::Empty;
                }
                Err(e) => return Err(TryError::Http1(e)),
            }
        }
    }

    /// The request hyper's HTTP/2 client sends to `endpoint`.
    fn h2_request(
        &self,
        endpoint: &Endpoint,
        head: Arc<http::request::Parts>,
        set: h1::TryHeaders,
        body: ReqBody,
    ) -> Result<Request<ReqBody>, TryError> {
        // hyper's client takes the head itself: a copy, unless no retry keeps one.
        let mut parts = Arc::unwrap_or_clone(head);
        set.apply(&mut parts.headers);
        parts.uri = self.uri(endpoint, path_of(&parts.uri))?;
        parts.version = Version::HTTP_2;
        Ok(Request::from_parts(parts, body))
    }

    /// The absolute URI of `path` on `endpoint`, as the connector and hyper-util's client take it.
    fn uri(&self, endpoint: &Endpoint, path: PathAndQuery) -> Result<Uri, TryError> {
        let mut uri = http::uri::Parts::default();
        uri.scheme = Some(self.scheme.clone());
        uri.authority = Some(endpoint.authority.clone());
        uri.path_and_query = Some(path);
        Uri::from_parts(uri).map_err(|e| TryError::Connect(Box::new(e)))
    }

    /// A new HTTP/1.1 connection to `endpoint`.
    async fn connect(
        &self,
        endpoint: &Endpoint,
        mut connector: UpstreamConnector,
    ) -> Result<h1::Conn, TryError> {
        let uri = self.uri(endpoint, PathAndQuery::from_static("/"))?;
        let io = connector.call(uri).await.map_err(TryError::Connect)?;
        Ok(h1::Conn::new(io.into_inner()))
    }
}

/// The path and query of `uri`; `/` when it has none (an authority-form target).
fn path_of(uri: &Uri) -> PathAndQuery {
    uri.path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"))
}

/// One try on its way: the endpoint chosen for it, what is sent there, and what its answer
/// needs. `send`'s future keeps it in place: an async function keeps a copy of each argument
/// beside its own locals, and every local it borrows for its whole life, which made each try's
/// future (boxed per request) more than twice its size.
struct Try {
    cluster: Arc<Cluster>,
    endpoint: Arc<Endpoint>,
    permit: Option<Permit>,
    in_flight: InFlight,
    /// Headers of this try only (the deadline it propagates; `Host` for an HTTP/1.0 client).
    set: h1::TryHeaders,
    ctx: TryCtx,
}

/// What a try's answer needs of its request's context.
struct TryCtx {
    /// When the try gives up.
    deadline: Option<Instant>,
    /// Whether that deadline is the caller's own.
    callers: bool,
    /// The route's stream idle timeout, applied to the response body.
    idle_timeout: Option<Duration>,
    /// See [`CallCtx::hold_limit`].
    hold_limit: u64,
    /// See [`CallCtx::grpc_retry_codes`].
    grpc_retry_codes: u32,
    /// See [`CallCtx::hold_small`].
    hold_small: bool,
}

impl TryCtx {
    fn of(ctx: &CallCtx) -> Self {
        Self {
            deadline: ctx.try_deadline,
            callers: ctx.try_deadline_is_callers(),
            idle_timeout: ctx.idle_timeout,
            hold_limit: ctx.hold_limit,
            grpc_retry_codes: ctx.grpc_retry_codes,
            hold_small: ctx.hold_small,
        }
    }
}

impl Try {
    /// Chooses an endpoint of `cluster` for `call` (an error when none may be tried); the try,
    /// and the request's head and body to send.
    #[allow(clippy::type_complexity)]
    fn begin(
        cluster: &Arc<Cluster>,
        call: Call,
    ) -> Result<(Self, Arc<http::request::Parts>, ReqBody), ProxyError> {
        let req = PickRequest {
            key: cluster.hash_key(&call.head, call.ctx.peer),
            tried: call
                .ctx
                .tried
                .as_ref()
                .map_or(0, |t| t.load(Ordering::Relaxed)),
            seed: balance::try_seed(call.ctx.base, call.ctx.attempt),
        };
        let (endpoint, index, permit) = cluster.choose(req)?;
        if let Some(t) = &call.ctx.tried {
            t.fetch_or(1 << (index % 64), Ordering::Relaxed);
        }
        let Call { head, body, ctx } = call;
        let mut set = h1::TryHeaders::default();
        // The next hop gets the time this try has left, which is never more than the request's.
        if let Some(deadline) = ctx.try_deadline.or(ctx.deadline) {
            timeout::propagate(&mut set, deadline, classify::is_grpc(&head.headers));
        }
        cluster.metrics.attempts.inc();
        let in_flight = endpoint.start();
        let t = Self {
            cluster: cluster.clone(),
            endpoint,
            permit,
            in_flight,
            set,
            ctx: TryCtx::of(&ctx),
        };
        Ok((t, head, body))
    }

    /// The upstream's answer made the client's: hop-by-hop headers out, the proxy's version.
    fn relayed(resp: http::Response<UpstreamBody>) -> Response {
        let (mut parts, body) = resp.into_parts();
        // A `101` names the protocol switched to: that hop-by-hop pair is relayed, since the
        // proxy relays the switch itself (the route allowed the upgrade).
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
        Response::from_parts(parts, ProxyBody::Upstream(body))
    }

    /// Until when `resp` is read ahead before it is answered, if it is.
    fn hold_until(&self, resp: &Response, started: Instant, rtt: Duration) -> Option<Instant> {
        let ctx = &self.ctx;
        let grpc_hold = ctx.grpc_retry_codes != 0
            && classify::is_grpc(resp.headers())
            && classify::header_grpc_code(resp.headers()).is_none();
        // A small answer usually arrives whole with its headers: reading it before answering
        // costs nothing, and a body cut short becomes a retryable reset.
        let small_hold = ctx.hold_small
            && !resp.body().is_end_stream()
            && resp
                .body()
                .size_hint()
                .exact()
                .is_some_and(|n| n <= ctx.hold_limit);
        (grpc_hold || small_hold).then(|| {
            let latest = started + rtt + HOLD_MAX;
            ctx.deadline.map_or(latest, |d| d.min(latest))
        })
    }

    /// What came back, counted, and read ahead as far as it is there when it is held.
    fn received(
        &self,
        answer: Result<Result<http::Response<UpstreamBody>, TryError>, tokio::time::error::Elapsed>,
        started: Instant,
    ) -> Hold {
        match answer {
            Err(_) => {
                // A try cut off by its deadline took at least this long: a latency sample too.
                self.endpoint.observe_latency(clock::now() - started);
                Hold::Done(Err(resilience::expiry(self.ctx.callers)))
            }
            Ok(Ok(resp)) => {
                let rtt = clock::now() - started;
                self.cluster.latency.record(rtt);
                self.endpoint.observe_latency(rtt);
                let resp = Try::relayed(resp);
                match self.hold_until(&resp, started, rtt) {
                    Some(until) => hold_ready(resp, self.ctx.hold_limit, until),
                    None => Hold::Done(Ok(resp)),
                }
            }
            Ok(Err(e)) => Hold::Done(Err(self.failed(e))),
        }
    }

    /// What a failed exchange means for the client.
    fn failed(&self, e: TryError) -> ProxyError {
        if client_side(e.cause()) {
            return match too_large(e.cause()) {
                Some(limit) => ProxyError::BodyTooLarge(limit),
                None => ProxyError::ClientAbort(Box::new(e)),
            };
        }
        if e.is_connect() {
            self.cluster
                .connect_failed(&self.endpoint, refused(e.cause()));
            return ProxyError::UpstreamConnect(Box::new(e));
        }
        if refused_stream(e.cause()) {
            return ProxyError::RefusedStream(Box::new(e));
        }
        ProxyError::UpstreamReset(Box::new(e))
    }

    /// Counts the try's outcome for its endpoint, its cluster and its breaker.
    fn end(self, result: &Result<Response, ProxyError>) {
        let Try {
            cluster,
            endpoint,
            permit,
            in_flight,
            ..
        } = self;
        drop(in_flight);
        let outcome = classify::outcome(result);
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
    }
}

/// `Host`, as a try's own header names are: a `static`.
static HOST: http::HeaderName = http::header::HOST;

/// Sends one try to one endpoint of `cluster` and classifies what comes back.
fn send(cluster: &Arc<Cluster>, call: Call) -> ResponseFuture {
    match Try::begin(cluster, call) {
        Ok((t, head, body)) => Box::pin(exchange(t, head, body)),
        Err(e) => Box::pin(std::future::ready(Err(e))),
    }
}

/// The exchange of a try, and the try counted. Not an `async fn`: its arguments are kept once.
#[allow(clippy::manual_async_fn)]
fn exchange(
    mut t: Try,
    head: Arc<http::request::Parts>,
    body: ReqBody,
) -> impl Future<Output = Result<Response, ProxyError>> + Send + 'static {
    async move {
        let started = clock::now();
        let pending = t
            .cluster
            .client
            .request(&t.endpoint, head, &mut t.set, body);
        let answer = match t.ctx.deadline {
            Some(at) => tokio::time::timeout_at(at, pending).await,
            None => Ok(pending.await),
        };
        // Sorted out by a plain method, and only a box awaited: what it handles would
        // otherwise be kept in this future, beside the request's.
        let hold = t.received(answer, started);
        let result = if hold.waits() {
            hold.wait().await
        } else {
            hold.done()
        };
        let result = result.map(|resp| {
            let (parts, body) = resp.into_parts();
            Response::from_parts(parts, body.watch(t.ctx.idle_timeout))
        });
        t.end(&result);
        result
    }
}

/// Longest a gRPC response is held back to read its trailers: long enough for a unary answer,
/// short enough that a streaming one is barely delayed.
const HOLD_MAX: Duration = Duration::from_millis(250);

/// A response being read ahead.
enum Hold {
    /// Read as far as it is held: the response to answer with.
    Done(Result<Response, ProxyError>),
    /// The rest is still to come, until the instant given.
    Wait(Held, Instant),
}

impl Hold {
    /// Whether the rest is still to come.
    fn waits(&self) -> bool {
        matches!(self, Hold::Wait(..))
    }

    /// The answer once the rest has come. Boxed: a small answer is nearly always whole already.
    fn wait(self) -> ResponseFuture {
        match self {
            Hold::Wait(held, until) => Box::pin(held.rest(until)),
            Hold::Done(result) => Box::pin(std::future::ready(result)),
        }
    }

    /// The answer, when nothing is still to come.
    fn done(self) -> Result<Response, ProxyError> {
        match self {
            Hold::Done(result) => result,
            Hold::Wait(mut held, _) => Ok(held.response(true)),
        }
    }
}

/// Reads a response ahead, up to `limit` bytes, as far as its frames are already there.
fn hold_ready(resp: Response, limit: u64, until: Instant) -> Hold {
    let (parts, body) = resp.into_parts();
    let ProxyBody::Upstream(body) = body else {
        return Hold::Done(Ok(Response::from_parts(parts, body)));
    };
    let mut held = Held {
        parts,
        body,
        frames: Frames::default(),
        held: 0,
        limit,
    };
    loop {
        match held.body.frame().now_or_never() {
            Some(next) => {
                if let Some(done) = held.take(next) {
                    return Hold::Done(done);
                }
            }
            None => return Hold::Wait(held, until),
        }
    }
}

/// A response read ahead, to find a gRPC status in its trailers or to have a small body whole;
/// the frames read are sent on unchanged, and the rest streams after them.
struct Held {
    parts: http::response::Parts,
    body: UpstreamBody,
    frames: Frames,
    held: u64,
    limit: u64,
}

impl Held {
    /// Takes the next frame; the response, once nothing more is held.
    fn take(
        &mut self,
        next: Option<Result<Frame<Bytes>, BoxError>>,
    ) -> Option<Result<Response, ProxyError>> {
        match next {
            None => Some(Ok(self.response(false))),
            Some(Err(e)) => Some(Err(ProxyError::UpstreamReset(e))),
            Some(Ok(frame)) => {
                if let Some(t) = frame.trailers_ref() {
                    if let Some(code) = classify::header_grpc_code(t) {
                        self.parts.extensions.insert(TrailerStatus(code));
                    }
                }
                self.held += frame.data_ref().map_or(0, |d| d.len() as u64);
                self.frames.push(frame);
                (self.held > self.limit).then(|| Ok(self.response(true)))
            }
        }
    }

    /// The response: the frames held, then the rest of the body if `more` may follow.
    fn response(&mut self, more: bool) -> Response {
        let parts = std::mem::replace(&mut self.parts, http::Response::new(()).into_parts().0);
        let frames = std::mem::take(&mut self.frames);
        let rest = more.then(|| {
            let ended = UpstreamBody::H1(h1::ResponseBody::ended());
            std::mem::replace(&mut self.body, ended)
        });
        Response::from_parts(parts, frames.body(rest))
    }

    /// Reads on until the whole is held or `until`.
    async fn rest(mut self, until: Instant) -> Result<Response, ProxyError> {
        loop {
            match tokio::time::timeout_at(until, self.body.frame()).await {
                Ok(next) => {
                    if let Some(done) = self.take(next) {
                        return done;
                    }
                }
                Err(_) => return Ok(self.response(true)),
            }
        }
    }
}

/// Frames read ahead. The first is kept apart: a small answer is usually one data frame, which
/// then needs no queue.
#[derive(Default)]
struct Frames {
    first: Option<Frame<Bytes>>,
    more: VecDeque<Frame<Bytes>>,
}

impl Frames {
    fn push(&mut self, frame: Frame<Bytes>) {
        match self.first {
            None => self.first = Some(frame),
            Some(_) => self.more.push_back(frame),
        }
    }

    /// The response body: these frames, then `rest` if the stream had not ended.
    fn body(self, rest: Option<UpstreamBody>) -> ProxyBody {
        let Frames { first, mut more } = self;
        match first.map(Frame::into_data) {
            Some(Ok(data)) if more.is_empty() && rest.is_none() => ProxyBody::full(data),
            first => {
                if let Some(frame) = first {
                    more.push_front(frame.map_or_else(|f| f, Frame::data));
                }
                ProxyBody::Held { frames: more, rest }
            }
        }
    }
}

/// Whether a client error came from our side of the request body: the client's body failed,
/// or a newer try took it over. Neither says anything about the upstream.
fn client_side(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(e);
    while let Some(err) = source {
        if err.is::<ClientBodyError>() || err.is::<SupersededTry>() || err.is::<BodyTooLarge>() {
            return true;
        }
        source = err.source();
    }
    false
}

/// The limit, if the client's body failed for being larger than the route allows.
fn too_large(e: &(dyn std::error::Error + 'static)) -> Option<u64> {
    let mut source = Some(e);
    while let Some(err) = source {
        if let Some(t) = err.downcast_ref::<BodyTooLarge>() {
            return Some(t.0);
        }
        source = err.source();
    }
    None
}

/// Whether an HTTP/2 upstream refused the stream (`REFUSED_STREAM`): it did not process it.
fn refused_stream(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(e);
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
        send(&self.cluster, call)
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
