//! The resilience layers, one mechanism per module, each a tower [`Layer`](tower::Layer).
//!
//! Every layer is a `Service<Call>` answering `Result<Response, ProxyError>`: a refusal is a
//! [`ProxyError`] that [`crate::error`] turns into the one well-formed local reply. Layers are
//! always ready: waiting (a bulkhead queue, a throttle delay, a backoff) happens inside the call,
//! bounded by that layer's own limit and, below the route timeout, by the request's deadline.
//! [`crate::proxy::stack`] decides their order; [`classify`] decides, once for all of them, what
//! counts as success, failure and retryable.

pub mod breaker;
pub mod bulkhead;
pub mod classify;
pub mod fault;
pub mod latency;
pub mod load_shed;
pub mod rate_limit;
pub mod retry;
pub mod timeout;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::future::Either;
use pin_project_lite::pin_project;
use tokio::time::Instant;
use tower::{Layer, Service};

use crate::error::ProxyError;
use crate::proxy::body::{ProxyBody, ReqBody};
use crate::proxy::clock;

/// What every layer answers.
pub type Response = http::Response<ProxyBody>;
/// The future every layer returns.
pub type ResponseFuture = Pin<Box<dyn Future<Output = Result<Response, ProxyError>> + Send>>;

/// One request on its way through the stack: the head as it will be sent (minus the endpoint's
/// address), a body that retries can replay, and what the layers tell each other.
#[derive(Debug)]
pub struct Call {
    /// Method, path, headers (hop-by-hop removed, forwarding headers added). Shared by the
    /// request's tries, each of which sets its own headers on top (`h1::TryHeaders`): a retry
    /// keeps a copy of the request without copying its header map.
    pub head: Arc<http::request::Parts>,
    /// The request body.
    pub body: ReqBody,
    /// Per-request facts shared between layers.
    pub ctx: CallCtx,
}

/// Per-request facts the layers pass down.
#[derive(Debug, Clone)]
pub struct CallCtx {
    /// The client's address.
    pub peer: SocketAddr,
    /// When the request arrived.
    pub start: Instant,
    /// When the caller gives up: the route timeout or a smaller deadline the caller sent.
    pub deadline: Option<Instant>,
    /// Whether `deadline` is the caller's own (so its expiry says nothing of the upstream).
    pub caller_deadline: bool,
    /// When this try gives up: the per-try timeout, never past `deadline`.
    pub try_deadline: Option<Instant>,
    /// Endpoint offset of this request; try `n` goes to `base + n - 1`, so tries land on
    /// different endpoints when there are several.
    pub base: usize,
    /// 1 for the first try.
    pub attempt: u32,
    /// Endpoints this request has tried (bit `i % 64` for endpoint index `i`), shared by its
    /// tries; set by the retry layer when a request may be tried more than once.
    pub tried: Option<std::sync::Arc<std::sync::atomic::AtomicU64>>,
    /// gRPC codes (a bit set) whose presence in trailers makes the try retryable; when set, the
    /// upstream layer reads a gRPC response up to `hold_limit` bytes to see its trailers.
    pub grpc_retry_codes: u32,
    /// Whether a small response (known length up to `hold_limit`) is read whole before it is
    /// answered, so that a body cut short (the upstream died mid-answer) can still be retried.
    pub hold_small: bool,
    /// How much of a response may be held back to read its trailers.
    pub hold_limit: u64,
    /// The route's stream idle timeout, applied to the response body.
    pub idle_timeout: Option<std::time::Duration>,
    /// The client's verified TLS identities (certificate URI and DNS SANs), if it sent one.
    pub identity: Option<std::sync::Arc<[String]>>,
}

impl CallCtx {
    /// The context of a fresh request from `peer`.
    pub fn new(peer: SocketAddr) -> Self {
        Self {
            peer,
            start: clock::now(),
            deadline: None,
            caller_deadline: false,
            try_deadline: None,
            base: 0,
            attempt: 1,
            tried: None,
            grpc_retry_codes: 0,
            hold_small: false,
            hold_limit: 0,
            idle_timeout: None,
            identity: None,
        }
    }
}

impl CallCtx {
    /// Whether this try's deadline is the caller's own, so that its passing says nothing of the
    /// upstream.
    pub fn try_deadline_is_callers(&self) -> bool {
        self.caller_deadline && self.try_deadline == self.deadline
    }

    /// The error for this try's deadline passing: the caller's, or an upstream timeout.
    pub fn expired(&self) -> ProxyError {
        expiry(self.try_deadline_is_callers())
    }
}

/// The error for a deadline passing: the caller's own (`caller`), or an upstream timeout.
pub(crate) fn expiry(caller: bool) -> ProxyError {
    if caller {
        ProxyError::DeadlineExceeded
    } else {
        ProxyError::Timeout
    }
}

impl Call {
    /// A copy for another try, if its body can be sent again.
    pub fn try_clone(&self) -> Option<Call> {
        Some(Call {
            head: self.head.clone(),
            body: self.body.try_clone()?,
            ctx: self.ctx.clone(),
        })
    }
}

/// The services every resilience layer wraps.
pub trait Inner:
    Service<Call, Response = Response, Error = ProxyError, Future: Send + 'static>
    + Clone
    + Send
    + 'static
{
}

impl<S> Inner for S
where
    S: Service<Call, Response = Response, Error = ProxyError> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
}

/// A mechanism that an [`Apply`] layer puts in front of a service: a bulkhead, a breaker, a
/// rate limiter, a load-shedding limiter or a set of faults. Its shared state lives in `Self`.
pub trait Mechanism: Send + Sync + 'static {
    /// What a call through the mechanism answers with. A concrete type, not a boxed one, where
    /// the usual case allows: the layers' futures then nest in one allocation.
    type Future<S: Inner>: Future<Output = Result<Response, ProxyError>> + Send + 'static;

    /// Sends `call` to `inner` through the mechanism.
    fn apply<S: Inner>(self: &Arc<Self>, inner: &mut S, call: Call) -> Self::Future<S>;
}

/// Puts an optional [`Mechanism`] in front of the inner service; `None` passes calls through
/// untouched, so a disabled mechanism costs nothing.
pub struct ApplyLayer<M> {
    mechanism: Option<Arc<M>>,
}

impl<M> ApplyLayer<M> {
    /// A layer over `mechanism` (`None`: off).
    pub fn new(mechanism: Option<Arc<M>>) -> Self {
        Self { mechanism }
    }
}

impl<M> Clone for ApplyLayer<M> {
    fn clone(&self) -> Self {
        Self {
            mechanism: self.mechanism.clone(),
        }
    }
}

impl<M, S> Layer<S> for ApplyLayer<M> {
    type Service = Apply<M, S>;
    fn layer(&self, inner: S) -> Apply<M, S> {
        Apply {
            inner,
            mechanism: self.mechanism.clone(),
        }
    }
}

/// See [`ApplyLayer`].
pub struct Apply<M, S> {
    inner: S,
    mechanism: Option<Arc<M>>,
}

impl<M, S: Clone> Clone for Apply<M, S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            mechanism: self.mechanism.clone(),
        }
    }
}

impl<M: Mechanism, S: Inner> Service<Call> for Apply<M, S> {
    type Response = Response;
    type Error = ProxyError;
    type Future = Either<S::Future, M::Future<S>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, call: Call) -> Self::Future {
        match &self.mechanism {
            None => Either::Left(self.inner.call(call)),
            Some(m) => Either::Right(m.apply(&mut self.inner, call)),
        }
    }
}

pin_project! {
    /// The inner service's future, with the error its deadline passing gives: what the timeout
    /// layers answer without a box.
    pub struct Deadline<F> {
        #[pin]
        inner: tokio::time::Timeout<F>,
        caller: bool,
    }
}

impl<F: Future> Deadline<F> {
    /// `inner`, given up at `at`; `caller`: the deadline is the caller's own.
    pub fn new(inner: F, at: Instant, caller: bool) -> Self {
        Self {
            inner: tokio::time::timeout_at(at, inner),
            caller,
        }
    }
}

impl<F: Future<Output = Result<Response, ProxyError>>> Future for Deadline<F> {
    type Output = Result<Response, ProxyError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        this.inner
            .poll(cx)
            .map(|r| r.unwrap_or_else(|_| Err(expiry(*this.caller))))
    }
}

#[cfg(test)]
mod tests {
    //! Helpers shared by the layers' paused-time tests (a request as the layers see it, and a
    //! scripted inner service that notes when each try reached it), and the fault layer's tests.

    use super::*;
    use std::sync::Mutex;
    use std::time::Duration;

    use http::{Method, StatusCode};

    use crate::control::config::resilience::FaultConfig;
    use crate::proxy::body::ProxyBody;
    use crate::proxy::resilience::fault::Faults;
    use crate::rng::Rng;

    /// A request without a body, with these headers, as the layers see it.
    pub(crate) fn call(method: Method, headers: &[(&str, &str)]) -> Call {
        let mut req = http::Request::builder().method(method).uri("/x");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let (head, ()) = req.body(()).unwrap().into_parts();
        Call {
            head: Arc::new(head),
            body: ReqBody::Empty,
            ctx: CallCtx::new(SocketAddr::from(([127, 0, 0, 1], 1))),
        }
    }

    /// An answer with `status` and these headers, at once.
    pub(crate) fn answer(status: u16, headers: &[(&str, &str)]) -> ResponseFuture {
        let mut r = http::Response::new(ProxyBody::full(bytes::Bytes::from_static(b"ok")));
        *r.status_mut() = StatusCode::from_u16(status).unwrap();
        for (k, v) in headers {
            r.headers_mut().insert(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                http::HeaderValue::from_str(v).unwrap(),
            );
        }
        Box::pin(std::future::ready(Ok(r)))
    }

    /// A try that never answers.
    pub(crate) fn hang() -> ResponseFuture {
        Box::pin(std::future::pending())
    }

    /// One try as the scripted service saw it.
    #[derive(Debug, Clone)]
    pub(crate) struct Seen {
        /// When it arrived.
        pub at: Instant,
        /// Its method.
        pub method: Method,
        /// The try's number (1 for the first), as the retry layer set it.
        pub attempt: u32,
        /// The try's deadline, as the layers above set it.
        pub try_deadline: Option<Instant>,
    }

    type Answer = dyn Fn(usize, &Call) -> ResponseFuture + Send + Sync;

    /// An inner service that answers the n-th try it sees (from 0) with `answer(n, try)` and
    /// notes each try.
    #[derive(Clone)]
    pub(crate) struct Script {
        seen: Arc<Mutex<Vec<Seen>>>,
        answer: Arc<Answer>,
    }

    impl Script {
        pub(crate) fn new(
            answer: impl Fn(usize, &Call) -> ResponseFuture + Send + Sync + 'static,
        ) -> Self {
            Self {
                seen: Arc::default(),
                answer: Arc::new(answer),
            }
        }

        /// The tries so far.
        pub(crate) fn seen(&self) -> Vec<Seen> {
            self.seen.lock().unwrap().clone()
        }
    }

    impl Service<Call> for Script {
        type Response = Response;
        type Error = ProxyError;
        type Future = ResponseFuture;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, call: Call) -> ResponseFuture {
            let n = {
                let mut seen = self.seen.lock().unwrap();
                seen.push(Seen {
                    at: Instant::now(),
                    method: call.head.method.clone(),
                    attempt: call.ctx.attempt,
                    try_deadline: call.ctx.try_deadline,
                });
                seen.len() - 1
            };
            (self.answer)(n, &call)
        }
    }

    fn faults(cfg: FaultConfig) -> ApplyLayer<Faults> {
        ApplyLayer::new(Some(Arc::new(Faults::new(cfg, None, Rng::with_seed(1)))))
    }

    #[tokio::test(start_paused = true)]
    async fn a_fault_delay_holds_the_call_back_for_exactly_its_duration() {
        let inner = Script::new(|_, _| answer(200, &[]));
        let mut svc = faults(FaultConfig {
            delay: Some((1.0, Duration::from_millis(120))),
            abort: None,
        })
        .layer(inner.clone());
        let start = Instant::now();
        let fut = svc.call(call(Method::GET, &[]));
        tokio::pin!(fut);
        // Nothing reaches the upstream before the delay is over.
        assert!(tokio::time::timeout(Duration::from_millis(119), &mut fut)
            .await
            .is_err());
        assert!(inner.seen().is_empty());
        let resp = fut.await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let seen = inner.seen();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].at - start, Duration::from_millis(120));
    }

    #[tokio::test(start_paused = true)]
    async fn an_aborted_call_never_reaches_the_upstream_and_takes_no_time() {
        let inner = Script::new(|_, _| answer(200, &[]));
        let mut svc = faults(FaultConfig {
            delay: Some((1.0, Duration::from_secs(5))),
            abort: Some((1.0, StatusCode::IM_A_TEAPOT)),
        })
        .layer(inner.clone());
        let start = Instant::now();
        let result = svc.call(call(Method::GET, &[])).await;
        assert!(matches!(result, Err(ProxyError::Fault(s)) if s == StatusCode::IM_A_TEAPOT));
        assert_eq!(start.elapsed(), Duration::ZERO, "abort is decided first");
        assert!(inner.seen().is_empty());
    }
}
