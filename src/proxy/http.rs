//! The L7 server: HTTP/1.1 and HTTP/2 (prior knowledge) on one port, each request routed and relayed.
//!
//! Bodies stream in both directions and are never buffered; trailers (gRPC status) pass through as
//! frames. Every failure becomes a local reply built by [`crate::error`], never a dropped connection,
//! and every answer, relayed or local (`no_route` and `forbidden` included), is counted in
//! `outrigger_requests_total` and written to the access log in one place ([`finish`]).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll, Wake, Waker};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::BytesMut;
use futures_util::future::{Either, FutureExt as _};
use futures_util::task::AtomicWaker;
use http::header::{self, HeaderName};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body::Body as _;
use hyper::body::Incoming;
use hyper::server::conn::http2;
use hyper::service::service_fn;
use hyper::service::Service as HyperService;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use tower::Service;

use crate::control::config::model::RequestIdMode;
use crate::control::config::{Limits, UpstreamProtocol};
use crate::error::{ProxyError, REASON_HEADER};
use crate::proxy::body::{ClientBody, ProxyBody, ReqBody};
use crate::proxy::clock;
use crate::proxy::framing::Peek;
use crate::proxy::listener::{ListenerKind, ListenerState};
use crate::proxy::resilience::classify::is_grpc;
use crate::proxy::resilience::{Call, CallCtx};
use crate::proxy::router::{Route, Target};
use crate::proxy::stack::RouteStack;
use crate::proxy::{downstream, h1, streams, tunnel, values};
use crate::rng::Rng;
use crate::telemetry::metrics::http::NONE;
use crate::telemetry::metrics::RouteMetrics;
use crate::tls::allowed;

/// How long busy HTTP/1 connections get, once draining starts, to receive a response carrying
/// `connection: close` before idle ones are closed. Closing an idle keep-alive connection at the
/// instant its client sends a request would fail that request.
const DRAIN_GRACE: Duration = Duration::from_millis(500);

/// The HTTP servers shared by every connection of a listener: the proxy's own HTTP/1.1 server
/// and hyper's HTTP/2 one for connections whose protocol is known before the first read, and
/// hyper-util's reading one for the rest.
pub struct Server {
    /// Request heads of the proxy's own HTTP/1.1 server: most bytes, most fields.
    max_head: usize,
    max_headers: usize,
    h2: http2::Builder<streams::InTask>,
    either: auto::Builder<TokioExecutor>,
}

/// The HTTP/2 connection preface (RFC 9113, section 3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Settings both HTTP/2 builders take alike.
macro_rules! h2_settings {
    ($b:expr, $limits:expr) => {
        $b.timer(TokioTimer::new())
            .max_concurrent_streams($limits.h2_max_concurrent_streams)
            .max_pending_accept_reset_streams($limits.h2_max_pending_resets as usize)
            .max_header_list_size($limits.max_header_bytes)
    };
}

/// Builds the HTTP/1.1 + HTTP/2 servers used by HTTP listeners. The header-read timeout is not
/// hyper's: [`Guarded`](crate::proxy::framing::Guarded) enforces it so that it can answer 408.
pub fn server(limits: &Limits) -> Server {
    let mut h2 = http2::Builder::new(streams::InTask);
    h2_settings!(h2, limits);
    let mut either = auto::Builder::new(TokioExecutor::new());
    // HTTP/1 on a connection whose protocol only its first read tells (TLS without ALPN).
    either
        .http1()
        .timer(TokioTimer::new())
        .keep_alive(true)
        // A client may shut its sending side once its request is out (`nc -N`, some load
        // balancers' health checks): it still gets its answer, then the connection closes.
        .half_close(true)
        .header_read_timeout(None)
        .max_headers(limits.max_headers as usize)
        .max_buf_size(limits.max_header_bytes as usize);
    h2_settings!(either.http2(), limits);
    Server {
        max_head: limits.max_header_bytes as usize,
        max_headers: limits.max_headers as usize,
        h2,
        either,
    }
}

/// What is known of a downstream connection's protocol before its first read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Proto {
    /// HTTP/1.x (ALPN `http/1.1`).
    H1,
    /// HTTP/2 (ALPN `h2`).
    H2,
    /// Unknown, and the stream can be peeked at (plain TCP): its first bytes tell.
    #[default]
    Peek,
    /// Unknown, and the stream cannot be peeked at (TLS without ALPN): its first read tells.
    Read,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A downstream connection, served by the server its protocol chose. Each server's state is
/// boxed on its own, so that a connection carries the size of its own protocol's state only.
/// HTTP/1.1 is served by the proxy's own codec ([`downstream`]); hyper serves HTTP/2, and both
/// on a TLS connection whose handshake named no protocol.
enum Serving<'a, IO, S, H, F>
where
    S: HyperService<Request<Incoming>, Response = Response<ProxyBody>, Error = Infallible>,
{
    /// Waiting for the first bytes, to tell the HTTP/2 preface from an HTTP/1 request.
    Peeking(Option<(IO, S, H)>, &'a Server),
    H1(Pin<Box<downstream::Connection<IO, H, F>>>),
    H2(Pin<Box<H2Served<IO, S>>>),
    Either(Pin<Box<auto::UpgradeableConnection<'a, TokioIo<IO>, S, TokioExecutor>>>),
}

/// hyper's HTTP/2 connection, whose streams run in its own task.
type H2Served<IO, S> =
    streams::Served<http2::Connection<TokioIo<IO>, S, streams::InTask>, hyper::Result<()>>;

impl Server {
    fn start<IO, S, H, F>(&self, proto: Proto, io: IO, svc: S, own: H) -> Serving<'_, IO, S, H, F>
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        S: HyperService<Request<Incoming>, Response = Response<ProxyBody>, Error = Infallible>
            + Unpin,
        S::Future: Send + 'static,
        H: FnMut(Request<downstream::RequestBody>) -> F + Unpin,
        F: Future<Output = Response<ProxyBody>>,
    {
        match proto {
            Proto::H1 => Serving::H1(Box::pin(downstream::Connection::new(
                io,
                own,
                self.max_head,
                self.max_headers,
            ))),
            Proto::H2 => Serving::H2(Box::pin(streams::Served::new(
                self.h2.serve_connection(TokioIo::new(io), svc),
            ))),
            Proto::Peek => Serving::Peeking(Some((io, svc, own)), self),
            Proto::Read => Serving::Either(Box::pin(
                self.either
                    .serve_connection_with_upgrades(TokioIo::new(io), svc),
            )),
        }
    }
}

impl<IO, S, H, F> Serving<'_, IO, S, H, F>
where
    IO: AsyncRead + AsyncWrite + Peek + Unpin + Send + 'static,
    S: HyperService<Request<Incoming>, Response = Response<ProxyBody>, Error = Infallible> + Unpin,
    S::Future: Send + 'static,
    H: FnMut(Request<downstream::RequestBody>) -> F + Unpin,
    F: Future<Output = Response<ProxyBody>>,
{
    /// The connection after a `101` the proxy's own server wrote, once it ended.
    fn take_switched(&mut self) -> Option<h1::Rewound<IO>> {
        match self {
            Serving::H1(c) => c.as_mut().get_mut().take_switched(),
            _ => None,
        }
    }

    /// Lets the requests under way finish, then ends the connection (HTTP/2: `GOAWAY`). One
    /// still waiting for its first bytes ends at once, as an idle HTTP/1 connection does.
    fn graceful_shutdown(&mut self) {
        match self {
            Serving::Peeking(waiting, _) => *waiting = None,
            Serving::H1(c) => c.as_mut().get_mut().graceful_shutdown(),
            Serving::H2(c) => c.as_mut().conn().graceful_shutdown(),
            Serving::Either(c) => c.as_mut().graceful_shutdown(),
        }
    }
}

/// The protocol the bytes waiting on a peeked stream show: HTTP/2 once the whole preface is
/// there; HTTP/1 as soon as a byte differs (or on an error or the end, for hyper's HTTP/1
/// side to answer). A preface cut short is left to hyper-util's reader.
fn peek(io: &mut impl Peek, cx: &mut Context<'_>) -> Poll<Proto> {
    let mut raw = [0u8; PREFACE.len()];
    let mut buf = ReadBuf::new(&mut raw);
    match io.poll_peek(cx, &mut buf) {
        None => Poll::Ready(Proto::Read),
        Some(Poll::Pending) => Poll::Pending,
        Some(Poll::Ready(Err(_))) => Poll::Ready(Proto::H1),
        Some(Poll::Ready(Ok(_))) => {
            let seen = buf.filled();
            Poll::Ready(if seen.is_empty() || !PREFACE.starts_with(seen) {
                Proto::H1
            } else if seen.len() == PREFACE.len() {
                Proto::H2
            } else {
                Proto::Read
            })
        }
    }
}

impl<IO, S, H, F> Future for Serving<'_, IO, S, H, F>
where
    IO: AsyncRead + AsyncWrite + Peek + Unpin + Send + 'static,
    S: HyperService<Request<Incoming>, Response = Response<ProxyBody>, Error = Infallible> + Unpin,
    S::Future: Send + 'static,
    H: FnMut(Request<downstream::RequestBody>) -> F + Unpin,
    F: Future<Output = Response<ProxyBody>>,
{
    type Output = Result<(), BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // Every timestamp of this wake-up (requests handled, answers relayed) shares one
        // reading of the clock.
        let _turn = clock::Turn::start();
        let this = self.get_mut();
        loop {
            match this {
                Serving::Peeking(waiting, server) => {
                    let Some((io, _, _)) = waiting.as_mut() else {
                        return Poll::Ready(Ok(()));
                    };
                    let proto = ready!(peek(io, cx));
                    let server = *server;
                    let Some((io, svc, own)) = waiting.take() else {
                        return Poll::Ready(Ok(()));
                    };
                    *this = server.start(proto, io, svc, own);
                }
                Serving::H1(c) => return c.as_mut().poll(cx).map_err(Into::into),
                Serving::H2(c) => return c.as_mut().poll(cx).map_err(Into::into),
                Serving::Either(c) => return c.as_mut().poll(cx),
            }
        }
    }
}

/// Who is on the other end of a downstream connection.
#[derive(Clone, Default)]
pub struct Peer {
    /// The verified identities (SAN URIs and DNS names) of its TLS client certificate.
    pub identity: Option<Arc<[String]>>,
    /// Whether the connection is TLS.
    pub tls: bool,
    /// What its TLS handshake said of the protocol it speaks ([`Proto::Peek`] when plain).
    pub proto: Proto,
}

/// What a connection's requests need: the listener's live state and who the client is.
struct Conn {
    state: Arc<ArcSwap<ListenerState>>,
    peer: SocketAddr,
    who: Peer,
    /// The `x-forwarded-client-cert` value describing `who`, built once per connection.
    xfcc: Option<HeaderValue>,
    /// The client's IP for `x-forwarded-for`, built once per connection.
    ip: HeaderValue,
    /// Request ids: a generator of the connection's own, so no request waits on another
    /// connection's draw.
    ids: Rng,
    drain: CancellationToken,
    /// Set once the connection has seen `drain` fire: later responses close it. A flag, since
    /// asking the token takes its lock.
    draining: AtomicBool,
    /// Requests being handled now (until their response headers).
    active: AtomicUsize,
    /// When the connection last had a request, in milliseconds since `opened`.
    last_request: AtomicU64,
    opened: Instant,
    /// Turns the framing check off once a `101` is relayed.
    switch: Arc<AtomicBool>,
    /// The tunnel a relayed `101` started, run once the HTTP server hands the connection over.
    /// Boxed: it holds an upstream connection, and every downstream connection carries the slot.
    tunnel: Mutex<Option<Box<tunnel::Pending>>>,
}

impl Conn {
    fn touch(&self) {
        let ms = (clock::now() - self.opened).as_millis() as u64;
        self.last_request.store(ms, Ordering::Relaxed);
    }

    /// Time since the connection last had a request in progress, if it has none now.
    fn idle_for(&self) -> Option<Duration> {
        if self.active.load(Ordering::Acquire) > 0 {
            return None;
        }
        let last = Duration::from_millis(self.last_request.load(Ordering::Relaxed));
        Some(self.opened.elapsed().saturating_sub(last))
    }
}

/// Counts a request as active on its connection while it lives.
struct Active(Arc<Conn>);

impl Active {
    fn new(conn: Arc<Conn>) -> Self {
        conn.active.fetch_add(1, Ordering::AcqRel);
        Self(conn)
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.touch();
        self.0.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Why a connection is wound down before it ends by itself.
enum Stop {
    /// No request for the listener's idle timeout.
    Idle,
    /// The listener drains (shutdown, or a reload that removed it).
    Drain,
}

pin_project! {
    /// Runs `main` until it ends or `watch` fires, polling `watch` only when its own waker was
    /// woken: a connection's task wakes a few times per request, and its idle timer and drain
    /// token (whose poll takes a lock) need no look on each of those wakes.
    struct Overseen<M, W> {
        #[pin]
        main: M,
        #[pin]
        watch: W,
        flag: Arc<WakeFlag>,
    }
}

impl<M, W> Overseen<M, W> {
    fn new(main: M, watch: W) -> Self {
        let flag = Arc::new(WakeFlag {
            // The first poll looks at `watch`, so that it registers its wakers.
            woken: AtomicBool::new(true),
            task: AtomicWaker::new(),
        });
        Self { main, watch, flag }
    }
}

impl<M: Future, W: Future> Future for Overseen<M, W> {
    type Output = Either<M::Output, W::Output>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        this.flag.task.register(cx.waker());
        if this.flag.woken.swap(false, Ordering::AcqRel) {
            let waker = Waker::from(this.flag.clone());
            if let Poll::Ready(w) = this.watch.poll(&mut Context::from_waker(&waker)) {
                return Poll::Ready(Either::Right(w));
            }
        }
        this.main.poll(cx).map(Either::Left)
    }
}

/// The waker [`Overseen`] gives its watch: it notes the wake, then wakes the task.
struct WakeFlag {
    woken: AtomicBool,
    task: AtomicWaker,
}

impl Wake for WakeFlag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

/// Resolves once `conn` has been idle for `limit`; never if `limit` is `None`.
async fn idle(conn: &Conn, limit: Option<Duration>) {
    let Some(limit) = limit else {
        return std::future::pending().await;
    };
    let mut wait = limit;
    loop {
        tokio::time::sleep(wait).await;
        match conn.idle_for() {
            Some(idle) if idle >= limit => return,
            Some(idle) => wait = limit - idle,
            None => wait = limit,
        }
    }
}

/// Serves one downstream connection until it closes, or until `drain` fires and it winds down.
pub async fn serve<IO>(
    stream: IO,
    switch: Arc<AtomicBool>,
    peer: SocketAddr,
    who: Peer,
    state: Arc<ArcSwap<ListenerState>>,
    drain: CancellationToken,
    server: Arc<Server>,
) where
    IO: AsyncRead + AsyncWrite + Peek + Unpin + Send + 'static,
{
    let (idle_timeout, ids) = {
        let s = state.load();
        (s.idle_timeout, s.rng.fork())
    };
    let xfcc = who.identity.as_deref().and_then(client_cert_header);
    let conn = Arc::new(Conn {
        state,
        peer,
        who,
        xfcc,
        ip: ip_value(peer),
        ids,
        drain: drain.clone(),
        draining: AtomicBool::new(false),
        active: AtomicUsize::new(0),
        last_request: AtomicU64::new(0),
        opened: Instant::now(),
        switch,
        tunnel: Mutex::new(None),
    });
    let watched = conn.clone();
    let theirs = conn.clone();
    let svc = service_fn(move |req: Request<Incoming>| {
        // Not boxed: at half a kilobyte, the handler's future costs less moved with the
        // stream's state (which the in-task executor boxes once) than in a box of its own.
        clock::Turned::new(
            handle(theirs.clone(), req.map(ClientBody::Hyper)).map(Ok::<_, Infallible>),
        )
    });
    let own =
        move |req: Request<downstream::RequestBody>| handle(conn.clone(), req.map(ClientBody::H1));
    let mut connection = server.start(watched.who.proto, stream, svc, own);
    let stop = async {
        tokio::select! {
            () = idle(&watched, idle_timeout) => Stop::Idle,
            () = drain.cancelled() => Stop::Drain,
        }
    };
    let result = match Overseen::new(&mut connection, stop).await {
        Either::Left(res) => res,
        Either::Right(Stop::Idle) => {
            // Graceful: an h1 response still streaming finishes; h2 gets GOAWAY.
            connection.graceful_shutdown();
            (&mut connection).await
        }
        Either::Right(Stop::Drain) => {
            watched.draining.store(true, Ordering::Release);
            tokio::select! {
                res = &mut connection => res,
                () = tokio::time::sleep(DRAIN_GRACE) => {
                    connection.graceful_shutdown();
                    (&mut connection).await
                }
            }
        }
    };
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "downstream connection ended with an error");
    }
    // A relayed `101` ends the HTTP part: the connection is now a tunnel, still counted as an
    // open connection of the listener until it closes.
    let switched = connection.take_switched();
    let pending = watched.tunnel.lock().ok().and_then(|mut t| t.take());
    match (pending, switched) {
        // Boxed: a connection's task is as large as its largest state, and most connections
        // never become a tunnel.
        (Some(pending), Some(client)) => Box::pin(tunnel::run_over(*pending, client)).await,
        (Some(pending), None) => Box::pin(tunnel::run(*pending)).await,
        (None, _) => {}
    }
}

/// Starts serving one request of `conn`: routes it and hands it to its route's stack, or
/// answers it at once.
fn handle(conn: Arc<Conn>, req: Request<ClientBody>) -> Handled {
    // A guard, because a request's future is dropped when an HTTP/2 client resets the stream.
    let active = Active::new(conn);
    let conn = &*active.0;
    let start = clock::now();
    let state = conn.state.load_full();
    let (index, route, req, form) = match route(&state, conn, req, start) {
        Routed::Forward(index, route, req, form) => (index, route, req, form),
        Routed::Answered(resp, form) => return Handled::answered(form, resp, active),
    };
    let (call, target, sent) = match outbound(&state, route, conn, req, form, start) {
        Outbound::Send(call, target, sent) => (call, target, sent),
        Outbound::Answered(resp) => return Handled::answered(form, resp, active),
    };
    let pending = sent.target.stack.clone().call(call);
    let Sent { switch, logged, .. } = sent;
    Handled::Forwarded {
        pending,
        rest: Some(Forwarded {
            active,
            state,
            route: index,
            target,
            switch,
            logged,
            form,
            start,
        }),
    }
}

/// What a routed request waits on: its route stack's future.
type Pending = <RouteStack as Service<Call>>::Future;

pin_project! {
    /// One request, from its route's stack to its answer: the future of both protocols'
    /// handlers. Written out rather than `async`: an async body keeps its arguments, and every
    /// local it borrows, for its whole life, so the request was held twice beside the stack's
    /// future, and that state was copied into its box (too large for the allocator's
    /// per-thread cache) on every request.
    #[project = HandledProj]
    enum Handled {
        /// Waiting on the stack.
        Forwarded {
            #[pin]
            pending: Pending,
            rest: Option<Forwarded>,
        },
        /// Answered without the stack.
        Answered {
            resp: Option<Response<ProxyBody>>,
            active: Option<Active>,
        },
    }
}

impl Handled {
    fn answered(form: Form, resp: Response<ProxyBody>, active: Active) -> Self {
        Handled::Answered {
            resp: Some(closing(&active.0, form, resp)),
            active: Some(active),
        }
    }
}

impl Future for Handled {
    type Output = Response<ProxyBody>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Response<ProxyBody>> {
        match self.project() {
            HandledProj::Forwarded { pending, rest } => {
                let result = ready!(pending.poll(cx));
                // Taken once: a finished future is not polled again.
                match rest.take() {
                    Some(rest) => Poll::Ready(rest.answer(result)),
                    None => Poll::Pending,
                }
            }
            HandledProj::Answered { resp, active } => {
                let resp = resp.take();
                drop(active.take());
                resp.map_or(Poll::Pending, Poll::Ready)
            }
        }
    }
}

/// What a forwarded request's answer needs, kept while its stack works: the listener's state
/// it was routed with, and where its route and target are in it.
struct Forwarded {
    active: Active,
    state: Arc<ListenerState>,
    route: usize,
    target: usize,
    switch: Option<(OnUpgrade, HeaderValue)>,
    logged: Option<Box<Logged>>,
    form: Form,
    start: Instant,
}

impl Forwarded {
    fn answer(self, result: Result<Response<ProxyBody>, ProxyError>) -> Response<ProxyBody> {
        let Forwarded {
            active,
            state,
            route,
            target,
            switch,
            logged,
            form,
            start,
        } = self;
        let conn = &*active.0;
        let routed = match &state.kind {
            ListenerKind::Http(table) => table
                .route(route)
                .and_then(|r| r.targets.get(target).map(|t| (r, t))),
            ListenerKind::Tcp(_) => None,
        };
        // The state is the one the request was routed with: its route and target are there.
        let resp = match routed {
            Some((route, target)) => {
                let sent = Sent {
                    target,
                    switch,
                    logged,
                };
                relay(&state, route, conn, sent, result, form, start)
            }
            None => local(&state, ProxyError::NoRoute, form).resp,
        };
        let resp = closing(conn, form, resp);
        drop(active);
        resp
    }
}

/// `resp`, told to close an HTTP/1 connection that drains.
fn closing(conn: &Conn, form: Form, mut resp: Response<ProxyBody>) -> Response<ProxyBody> {
    if form.h1
        && conn.draining.load(Ordering::Acquire)
        && resp.status() != StatusCode::SWITCHING_PROTOCOLS
    {
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

/// Where a request goes: a route's cluster, or an answer given here.
enum Routed<'s> {
    Forward(usize, &'s Route, Request<ClientBody>, Form),
    Answered(Response<ProxyBody>, Form),
}

/// Finds the route of `req`, or answers it (a `CONNECT`, an absolute-form target, no route).
fn route<'s>(
    state: &'s ListenerState,
    conn: &Conn,
    req: Request<ClientBody>,
    start: Instant,
) -> Routed<'s> {
    let form = Form::of(&req);
    let identity = conn.who.identity.as_deref().unwrap_or(&[]);
    let unmatched = Counted {
        metrics: &state.unmatched,
        route: NONE,
        cluster: NONE,
    };
    let refusal = match &state.kind {
        // Not an open proxy: a target naming another server, or a tunnel, is never followed.
        ListenerKind::Http(_) if req.method() == Method::CONNECT => {
            ProxyError::NotAccepted("CONNECT")
        }
        ListenerKind::Http(_) if form.h1 && req.uri().scheme().is_some() => {
            ProxyError::NotAccepted("absolute-form target")
        }
        ListenerKind::Http(table) => match table
            .find_index(&req, identity)
            .and_then(|i| table.route(i).map(|r| (i, r)))
        {
            Some((index, route)) => return Routed::Forward(index, route, req, form),
            None => ProxyError::NoRoute,
        },
        // The listener became a TCP listener by reload while this connection was open.
        ListenerKind::Tcp(_) => ProxyError::NoRoute,
    };
    let answer = local(state, refusal, form);
    let resp = finish(state, conn, &unmatched, || Logged::of(&req), answer, start);
    Routed::Answered(resp, form)
}

/// Where an answer is counted and logged: its request metrics and the route and cluster names
/// of its access-log line ([`NONE`] before one was chosen).
struct Counted<'a> {
    metrics: &'a RouteMetrics,
    route: &'a str,
    cluster: &'a str,
}

/// What a local reply must look like for the request it answers.
#[derive(Clone, Copy)]
struct Form {
    /// HTTP/1.x: a refusal of the request's form closes the connection.
    h1: bool,
    /// A gRPC call (`application/grpc*`): the reply is trailers-only with a `grpc-status`.
    grpc: bool,
}

impl Form {
    fn of<B>(req: &Request<B>) -> Self {
        Self {
            h1: req.version() <= Version::HTTP_11,
            grpc: is_grpc(req.headers()),
        }
    }
}

/// An answer, and the status it is counted and logged with: its own, or for a local reply to a
/// gRPC call (always 200 on the wire) the status the same reply has over plain HTTP, so that a
/// timeout answered to a gRPC caller still counts as a 5xx.
struct Answer {
    resp: Response<ProxyBody>,
    status: StatusCode,
}

/// The one way the proxy answers by itself: the error's well-formed reply, counted in
/// `outrigger_local_replies_total`. A refusal of the request's form also closes an HTTP/1
/// connection: what follows such a request cannot be trusted to be framed the way the client
/// meant (HTTP/2 frames each stream itself).
fn local(state: &ListenerState, e: ProxyError, form: Form) -> Answer {
    let kind = e.kind();
    state.metrics.local_replies.count(kind);
    let close = form.h1 && matches!(e, ProxyError::NotAccepted(_) | ProxyError::BodyTooLarge(_));
    let mut resp = if form.grpc {
        e.into_grpc_response()
    } else {
        e.into_response()
    };
    if close {
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    let status = if form.grpc {
        kind.status()
    } else {
        resp.status()
    };
    Answer { resp, status }
}

/// What the access log says of a request: taken before the request is consumed, and only when
/// the log is on (the header values are reference-counted, not copied).
struct Logged {
    method: Method,
    uri: http::Uri,
    request_id: Option<HeaderValue>,
    traceparent: Option<HeaderValue>,
}

impl Logged {
    fn of<B>(req: &Request<B>) -> Self {
        Self::from_head(req.method(), req.uri(), req.headers())
    }

    fn from_head(method: &Method, uri: &http::Uri, headers: &HeaderMap) -> Self {
        Self {
            method: method.clone(),
            uri: uri.clone(),
            request_id: headers.get(X_REQUEST_ID).cloned(),
            traceparent: headers.get(TRACEPARENT).cloned(),
        }
    }
}

/// A header value for the log, `-` when absent or not text.
fn shown(v: &Option<HeaderValue>) -> &str {
    v.as_ref().and_then(|v| v.to_str().ok()).unwrap_or("-")
}

/// Counts and logs one answer, relayed or local: every answer a listener gives passes here once.
fn finish(
    state: &ListenerState,
    conn: &Conn,
    at: &Counted<'_>,
    req: impl FnOnce() -> Logged,
    answer: Answer,
    start: Instant,
) -> Response<ProxyBody> {
    let Answer { resp, status } = answer;
    let elapsed = clock::now() - start;
    at.metrics.observe(status, elapsed);
    if state.access_log {
        let req = req();
        let identity = conn
            .who
            .identity
            .as_deref()
            .and_then(|ids| ids.first())
            .map_or("-", String::as_str);
        tracing::info!(target: "access", listener = %state.name, route = at.route,
            cluster = at.cluster, method = %req.method, uri = %req.uri, peer_identity = identity,
            request_id = shown(&req.request_id), traceparent = shown(&req.traceparent),
            status = status.as_u16(),
            reason = resp.headers().get(REASON_HEADER).and_then(|v| v.to_str().ok()).unwrap_or("-"),
            duration_ms = elapsed.as_secs_f64() * 1000.0);
    }
    resp
}

/// `x-forwarded-client-cert` in Envoy's format: `URI=…` for URI SANs and `DNS=…` for DNS names.
fn client_cert_header(ids: &[String]) -> Option<HeaderValue> {
    let value = ids
        .iter()
        .map(|id| {
            if id.contains("://") {
                format!("URI={id}")
            } else {
                format!("DNS={id}")
            }
        })
        .collect::<Vec<_>>()
        .join(";");
    HeaderValue::from_str(&value).ok()
}

/// What the answer to a request sent through a route's stack needs.
struct Sent<'s> {
    target: &'s Target,
    /// The client's side of an upgrade the route allows, and the protocol asked for.
    switch: Option<(OnUpgrade, HeaderValue)>,
    /// What the access log says of the request, when the log is on.
    logged: Option<Box<Logged>>,
}

/// A routed request, checked against its route: what to send, or the answer.
enum Outbound<'s> {
    /// The call, where its target is in the route's targets, and what its answer needs.
    Send(Call, usize, Sent<'s>),
    Answered(Response<ProxyBody>),
}

/// Checks a routed request against its route, picks its target and turns the request into the
/// [`Call`] its stack takes; a refusal is the answer.
fn outbound<'s>(
    state: &ListenerState,
    route: &'s Route,
    conn: &Conn,
    mut req: Request<ClientBody>,
    form: Form,
    start: Instant,
) -> Outbound<'s> {
    let peer = conn.peer;
    // An answer given before a cluster is chosen: its series appear then.
    let refuse = |e: ProxyError, req: &Request<ClientBody>| {
        let unrouted = Counted {
            metrics: route.unrouted(),
            route: &route.name,
            cluster: NONE,
        };
        let answer = local(state, e, form);
        Outbound::Answered(finish(
            state,
            conn,
            &unrouted,
            || Logged::of(req),
            answer,
            start,
        ))
    };
    if let Some(patterns) = &route.allowed_identities {
        let ids = conn.who.identity.as_deref().unwrap_or(&[]);
        if !allowed(patterns, ids) {
            return refuse(ProxyError::Forbidden, &req);
        }
    }
    if let Some(limit) = route.max_request_body {
        if req.body().size_hint().lower() > limit {
            return refuse(ProxyError::BodyTooLarge(limit), &req);
        }
    }
    let Some((index, target)) = route.pick_for(req.headers(), req.uri().path(), peer) else {
        return refuse(ProxyError::NoRoute, &req);
    };
    // A switch of protocols the route allows, through a cluster that speaks HTTP/1.1.
    let mut switch = None;
    if let Some(protocol) = form.h1.then(|| upgrade_asked(req.headers())).flatten() {
        let name = protocol_name(&protocol);
        // `Upgrade: h2c` never switches: the request is served as the HTTP/1.1 it also is.
        if !name.eq_ignore_ascii_case(b"h2c") {
            let refusal = if !route.allows_upgrade(name) {
                Some("an upgrade this route does not allow")
            } else if target.cluster.config.protocol != UpstreamProtocol::Http1 {
                Some("an upgrade through an http2 cluster")
            } else {
                None
            };
            if let Some(why) = refusal {
                let answer = local(state, ProxyError::NotAccepted(why), form);
                return Outbound::Answered(finish(
                    state,
                    conn,
                    &Counted {
                        metrics: &target.metrics,
                        route: &route.name,
                        cluster: target.cluster.name(),
                    },
                    || Logged::of(&req),
                    answer,
                    start,
                ));
            }
            switch = Some((hyper::upgrade::on(&mut req), protocol));
        }
    }
    let (mut head, body) = req.into_parts();
    prepare(&mut head, &conn.ip, conn.who.tls);
    if let Some((_, protocol)) = &switch {
        head.headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        head.headers.insert(header::UPGRADE, protocol.clone());
    }
    request_id(&mut head.headers, state.request_id, &conn.ids);
    // The request is consumed by the stack; what the log needs of it is kept first.
    let logged = state
        .access_log
        .then(|| Box::new(Logged::from_head(&head.method, &head.uri, &head.headers)));
    // A client could claim any identity in this header; only ours is passed on (`insert`
    // replaces every value). Looked for first: clients rarely send it, and a scan of the names
    // costs less than a hashed removal.
    match &conn.xfcc {
        Some(v) => {
            head.headers.insert(X_FORWARDED_CLIENT_CERT, v.clone());
        }
        None if values::find(&head.headers, &X_FORWARDED_CLIENT_CERT).is_some() => {
            head.headers.remove(X_FORWARDED_CLIENT_CERT);
        }
        None => {}
    }
    let mut ctx = CallCtx::new(peer);
    ctx.idle_timeout = route.idle_timeout;
    ctx.identity = conn.who.identity.clone();
    let call = Call {
        head: Arc::new(head),
        body: ReqBody::new(body, route.max_retry_body, route.max_request_body),
        ctx,
    };
    Outbound::Send(
        call,
        index,
        Sent {
            target,
            switch,
            logged,
        },
    )
}

/// The answer to a forwarded request: the upstream's, the tunnel it switched to, or a local
/// reply; counted, and logged when the log is on.
fn relay(
    state: &ListenerState,
    route: &Route,
    conn: &Conn,
    sent: Sent<'_>,
    result: Result<Response<ProxyBody>, ProxyError>,
    form: Form,
    start: Instant,
) -> Response<ProxyBody> {
    let Sent {
        target,
        switch,
        logged,
    } = sent;
    let peer = conn.peer;
    let answer = match result {
        Ok(mut resp) if resp.status() == StatusCode::SWITCHING_PROTOCOLS => match (
            switch,
            resp.extensions_mut()
                .remove::<h1::Switched>()
                .and_then(|s| s.take()),
        ) {
            (Some((client, protocol)), Some(upstream)) => {
                // The client sends the new protocol's bytes only after this 101.
                conn.switch.store(true, Ordering::Relaxed);
                state.metrics.upgrades.switched.inc();
                let pending = tunnel::Pending {
                    client,
                    upstream,
                    protocol,
                    idle: route.idle_timeout,
                    metrics: state.metrics.upgrades.clone(),
                    log: state
                        .access_log
                        .then(|| (state.name.clone(), route.name.clone(), peer)),
                    drain: conn.drain.clone(),
                };
                if let Ok(mut slot) = conn.tunnel.lock() {
                    *slot = Some(Box::new(pending));
                }
                Answer {
                    status: resp.status(),
                    resp,
                }
            }
            // The upstream switched without being asked: relaying that would hand the client
            // a connection it cannot read. (An upgrade goes through HTTP/1.1 clusters only,
            // whose `101` always carries its connection.)
            _ => local(
                state,
                ProxyError::UpstreamReset("a 101 without an upgrade request".into()),
                form,
            ),
        },
        Ok(resp) => Answer {
            status: resp.status(),
            resp,
        },
        Err(e) => {
            tracing::debug!(listener = %state.name, route = %route.name, cluster = %target.cluster.name(),
                error = %e, "local reply");
            local(state, e, form)
        }
    };
    let at = Counted {
        metrics: &target.metrics,
        route: &route.name,
        cluster: target.cluster.name(),
    };
    match logged {
        Some(logged) => finish(state, conn, &at, || *logged, answer, start),
        // Without an access log only the metrics are wanted; no method or URI is cloned.
        None => {
            at.metrics.observe(answer.status, clock::now() - start);
            answer.resp
        }
    }
}

/// Rewrites a downstream request head for the upstream: hop-by-hop headers out, forwarding
/// headers in. The endpoint's address and the version are set per try by the upstream layer.
fn prepare(parts: &mut http::request::Parts, ip: &HeaderValue, tls: bool) {
    // Room, in one step, for what the proxy adds (forwarding, request id, deadline, host): a map
    // sized for the client's few headers would otherwise grow, and rehash, once or twice.
    parts.headers.reserve(5);
    strip_hop_by_hop(&mut parts.headers);
    if values::find(&parts.headers, &header::HOST).is_none() {
        if let Some(a) = parts.uri.authority() {
            if let Ok(v) = HeaderValue::from_str(a.as_str()) {
                parts.headers.insert(header::HOST, v);
            }
        }
    }
    append_forwarded_for(&mut parts.headers, ip);
    // What the client claims is not evidence: an upstream trusting `https` from a plain
    // connection would treat it as secure. Only the listener knows.
    parts.headers.insert(
        X_FORWARDED_PROTO,
        HeaderValue::from_static(if tls { "https" } else { "http" }),
    );
}

const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_CLIENT_CERT: HeaderName = HeaderName::from_static("x-forwarded-client-cert");
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Gives a request its `x-request-id`: the caller's is kept (unless the listener replaces
/// them), otherwise a new random UUID (version 4). `traceparent` and `tracestate` pass through
/// untouched: the proxy is not a span of its own.
fn request_id(headers: &mut HeaderMap, mode: RequestIdMode, rng: &Rng) {
    if mode == RequestIdMode::Keep
        && values::find(headers, &X_REQUEST_ID).is_some_and(|v| !v.is_empty() && v.len() <= 128)
    {
        return;
    }
    headers.insert(X_REQUEST_ID, new_request_id(rng));
}

/// A random UUID (version 4) as a header value. The root generator is seeded from the OS in
/// production, so ids differ across processes and runs.
fn new_request_id(rng: &Rng) -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&rng.u64().to_be_bytes());
    bytes[8..].copy_from_slice(&rng.u64().to_be_bytes());
    // Version 4 and the RFC 9562 variant.
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    // Byte by byte: a 128-bit shift per hex digit costs more than the rest of the id.
    let mut out = [b'-'; 36];
    let mut at = 0;
    for (i, b) in bytes.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            at += 1;
        }
        out[at] = HEX[usize::from(b >> 4)];
        out[at + 1] = HEX[usize::from(b & 0xf)];
        at += 2;
    }
    values::cut(&out).unwrap_or_else(|| HeaderValue::from_static("-"))
}

/// The protocol an HTTP/1.1 request asks to switch to: its `Upgrade` value, when `Connection`
/// names `upgrade` too (RFC 9110 §7.8).
fn upgrade_asked(headers: &HeaderMap) -> Option<HeaderValue> {
    let protocol = headers.get(header::UPGRADE)?;
    let named = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    named.then(|| protocol.clone())
}

/// The name of the first protocol in an `Upgrade` value (`websocket` of `WebSocket/13, foo`).
fn protocol_name(value: &HeaderValue) -> &[u8] {
    let first = value.as_bytes().split(|b| *b == b',').next().unwrap_or(&[]);
    let name = first.split(|b| *b == b'/').next().unwrap_or(&[]);
    name.trim_ascii()
}

/// The client's IP as a header value, made once per connection.
fn ip_value(peer: SocketAddr) -> HeaderValue {
    HeaderValue::from_str(&peer.ip().to_string())
        .unwrap_or_else(|_| HeaderValue::from_static("unknown"))
}

fn append_forwarded_for(headers: &mut HeaderMap, ip: &HeaderValue) {
    // Most requests come without one: a scan of the names tells so without hashing.
    if values::find(headers, &X_FORWARDED_FOR).is_none() {
        headers.insert(X_FORWARDED_FOR, ip.clone());
        return;
    }
    let mut previous = headers.get_all(X_FORWARDED_FOR).iter().peekable();
    let value = if previous.peek().is_none() {
        Ok(ip.clone())
    } else {
        // Several header lines are one comma-separated list (RFC 9110 §5.3); keep them all.
        let mut buf = BytesMut::with_capacity(64);
        for v in previous {
            buf.extend_from_slice(v.as_bytes());
            buf.extend_from_slice(b", ");
        }
        buf.extend_from_slice(ip.as_bytes());
        HeaderValue::from_maybe_shared(buf.freeze())
    };
    if let Ok(v) = value {
        headers.insert(X_FORWARDED_FOR, v);
    }
}

/// Removes headers that describe one connection rather than the message (RFC 9110 §7.6.1),
/// including those named in `Connection`. `te: trailers` stays: gRPC needs it end to end.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none of them: one pass over the names costs less than a hashed
    // lookup of each.
    let any = headers.keys().any(|k| {
        k == header::CONNECTION
            || k == header::TE
            || k == header::TRANSFER_ENCODING
            || k == header::UPGRADE
            || k == header::TRAILER
            || k == KEEP_ALIVE
            || k == PROXY_CONNECTION
    });
    if !any {
        return;
    }
    if headers.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
            .filter(|n| n != header::TE)
            .collect();
        for name in named {
            headers.remove(name);
        }
        headers.remove(header::CONNECTION);
    }
    for name in [
        KEEP_ALIVE,
        PROXY_CONNECTION,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::TRAILER,
    ] {
        headers.remove(name);
    }
    if let Some(te) = headers.get(header::TE) {
        let asks_trailers = te.to_str().is_ok_and(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
        });
        if asks_trailers {
            headers.insert(header::TE, HeaderValue::from_static("trailers"));
        } else {
            headers.remove(header::TE);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_go_and_named_ones_too() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        let mut names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        names.sort();
        assert_eq!(names, ["te", "x-kept"]);
        h.insert("te", HeaderValue::from_static("gzip"));
        strip_hop_by_hop(&mut h);
        assert!(!h.contains_key("te"));
        h.insert("te", HeaderValue::from_static("gzip, trailers"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h["te"], "trailers");
    }

    #[test]
    fn request_ids_are_kept_or_made_as_uuids() {
        let mut h = HeaderMap::new();
        let rng = Rng::with_seed(7);
        request_id(&mut h, RequestIdMode::Keep, &rng);
        let made = h[X_REQUEST_ID].to_str().unwrap().to_owned();
        assert_eq!(made.len(), 36);
        assert_eq!(made.as_bytes()[14], b'4', "version 4: {made}");
        assert!(b"89ab".contains(&made.as_bytes()[19]), "variant: {made}");
        assert_eq!(made.matches('-').count(), 4);
        for (i, c) in made.bytes().enumerate() {
            if matches!(i, 8 | 13 | 18 | 23) {
                assert_eq!(c, b'-', "{made}");
            } else {
                assert!(c.is_ascii_hexdigit() && !c.is_ascii_uppercase(), "{made}");
            }
        }
        // Its bits are the generator's next two draws, in order.
        let again = Rng::with_seed(7);
        let hex = format!("{:016x}{:016x}", again.u64(), again.u64());
        let digits: String = made.chars().filter(|c| *c != '-').collect();
        for (i, (a, b)) in hex.chars().zip(digits.chars()).enumerate() {
            if i != 12 && i != 16 {
                assert_eq!(a, b, "digit {i} of {made}");
            }
        }
        request_id(&mut h, RequestIdMode::Keep, &rng);
        assert_eq!(h[X_REQUEST_ID], made.as_str(), "the caller's is kept");
        request_id(&mut h, RequestIdMode::Replace, &rng);
        assert_ne!(
            h[X_REQUEST_ID],
            made.as_str(),
            "an edge listener replaces it"
        );
    }

    #[test]
    fn forwarded_for_appends() {
        let mut h = HeaderMap::new();
        let peer: SocketAddr = "10.0.0.9:1234".parse().unwrap();
        append_forwarded_for(&mut h, &ip_value(peer));
        assert_eq!(h[X_FORWARDED_FOR], "10.0.0.9");
        append_forwarded_for(&mut h, &ip_value("[::1]:9".parse().unwrap()));
        assert_eq!(h[X_FORWARDED_FOR], "10.0.0.9, ::1");
        h.append(X_FORWARDED_FOR, HeaderValue::from_static("10.1.1.1"));
        append_forwarded_for(&mut h, &ip_value(peer));
        assert_eq!(h[X_FORWARDED_FOR], "10.0.0.9, ::1, 10.1.1.1, 10.0.0.9");
    }
}
