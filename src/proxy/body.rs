//! Body types of the proxy: requests that can be replayed for a retry, and responses relayed as a
//! stream, partly held back (to read gRPC trailers), or made locally.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};

use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

use crate::error::BoxError;
use crate::proxy::{downstream, h1};

/// A response body: streamed from the upstream frame by frame (trailers included), or local bytes.
#[derive(Debug)]
pub enum ProxyBody {
    /// The upstream's body, never buffered.
    Upstream(UpstreamBody),
    /// Frames already read from the upstream (to look at its trailers), then the rest of it.
    Held {
        /// Frames read ahead, sent first.
        frames: VecDeque<Frame<Bytes>>,
        /// The remaining stream, if it had not ended.
        rest: Option<UpstreamBody>,
    },
    /// A body the proxy made itself; `None` once sent.
    Full(Option<Bytes>),
    /// A body that fails when no frame arrives within its idle timeout.
    Watched(Box<Watched>),
}

/// An upstream body under a stream idle timeout.
#[derive(Debug)]
pub struct Watched {
    inner: ProxyBody,
    idle: Duration,
    timer: Pin<Box<Sleep>>,
}

/// The upstream sent nothing for longer than the stream idle timeout.
#[derive(Debug, thiserror::Error)]
#[error("the upstream stream was idle for longer than {0:?}")]
pub struct StreamIdle(pub Duration);

impl ProxyBody {
    /// A body of fixed bytes.
    pub fn full(bytes: Bytes) -> Self {
        ProxyBody::Full(Some(bytes))
    }

    /// Whether anything of the body is still to come from the network, where it could stall.
    fn waits_on_upstream(&self) -> bool {
        match self {
            ProxyBody::Upstream(inner) => !inner.is_end_stream(),
            ProxyBody::Held { rest, .. } => rest.as_ref().is_some_and(|r| !r.is_end_stream()),
            ProxyBody::Full(_) => false,
            ProxyBody::Watched(w) => w.inner.waits_on_upstream(),
        }
    }

    /// Puts `self` under an idle timeout, unless nothing of it is left to wait for (it ended,
    /// or was read ahead whole, as a small answer is) or there is none.
    pub fn watch(self, idle: Option<Duration>) -> Self {
        match idle {
            Some(idle) if self.waits_on_upstream() => ProxyBody::Watched(Box::new(Watched {
                inner: self,
                idle,
                timer: Box::pin(tokio::time::sleep(idle)),
            })),
            _ => self,
        }
    }
}

impl From<Bytes> for ProxyBody {
    fn from(bytes: Bytes) -> Self {
        ProxyBody::full(bytes)
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ProxyBody::Upstream(inner) => Pin::new(inner).poll_frame(cx),
            ProxyBody::Held { frames, rest } => match frames.pop_front() {
                Some(f) => Poll::Ready(Some(Ok(f))),
                None => match rest {
                    Some(inner) => Pin::new(inner).poll_frame(cx),
                    None => Poll::Ready(None),
                },
            },
            ProxyBody::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            ProxyBody::Watched(w) => match Pin::new(&mut w.inner).poll_frame(cx) {
                Poll::Ready(frame) => {
                    let idle = w.idle;
                    w.timer.as_mut().reset(Instant::now() + idle);
                    Poll::Ready(frame)
                }
                Poll::Pending => match w.timer.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(StreamIdle(w.idle))))),
                    Poll::Pending => Poll::Pending,
                },
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Watched(w) => w.inner.is_end_stream(),
            ProxyBody::Upstream(inner) => inner.is_end_stream(),
            ProxyBody::Held { frames, rest } => {
                frames.is_empty() && rest.as_ref().map_or(true, |r| r.is_end_stream())
            }
            ProxyBody::Full(bytes) => bytes.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Watched(w) => w.inner.size_hint(),
            ProxyBody::Upstream(inner) => inner.size_hint(),
            ProxyBody::Held { frames, rest } => {
                let held: u64 = frames
                    .iter()
                    .filter_map(|f| f.data_ref().map(|d| d.len() as u64))
                    .sum();
                let rest = rest
                    .as_ref()
                    .map_or_else(|| SizeHint::with_exact(0), |r| r.size_hint());
                // Upper first: a lower bound above the current upper one would panic.
                let mut hint = SizeHint::new();
                if let Some(upper) = rest.upper() {
                    hint.set_upper(upper.saturating_add(held));
                }
                hint.set_lower(rest.lower().saturating_add(held));
                hint
            }
            ProxyBody::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            ProxyBody::Full(None) => SizeHint::with_exact(0),
        }
    }
}

/// A response body as it comes from an upstream. An HTTP/1.1 body holds its connection and
/// gives it back to its endpoint's idle list as soon as the last frame has been read: not when
/// the body is dropped, since a body dropped early leaves the connection in the middle of a
/// message.
#[derive(Debug)]
pub enum UpstreamBody {
    /// Read from an HTTP/1.1 connection by the request's own task.
    H1(h1::ResponseBody),
    /// A stream of an HTTP/2 connection.
    H2(Incoming),
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = match self.get_mut() {
            UpstreamBody::H1(b) => {
                ready!(Pin::new(b).poll_frame(cx)).map(|f| f.map_err(BoxError::from))
            }
            UpstreamBody::H2(b) => {
                ready!(Pin::new(b).poll_frame(cx)).map(|f| f.map_err(BoxError::from))
            }
        };
        Poll::Ready(polled)
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::H1(b) => b.is_end_stream(),
            UpstreamBody::H2(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::H1(b) => b.size_hint(),
            UpstreamBody::H2(b) => b.size_hint(),
        }
    }
}

/// A request body as the client sends it.
#[derive(Debug)]
pub enum ClientBody {
    /// Read by hyper's server (HTTP/2, or TLS without ALPN).
    Hyper(Incoming),
    /// Read by the proxy's own HTTP/1.1 server.
    H1(downstream::RequestBody),
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ClientBody::Hyper(b) => {
                let polled = ready!(Pin::new(b).poll_frame(cx));
                Poll::Ready(polled.map(|f| f.map_err(BoxError::from)))
            }
            ClientBody::H1(b) => Pin::new(b).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ClientBody::Hyper(b) => b.is_end_stream(),
            ClientBody::H1(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ClientBody::Hyper(b) => b.size_hint(),
            ClientBody::H1(b) => b.size_hint(),
        }
    }
}

/// Copies a frame; data is reference-counted, so this does not copy bytes.
pub fn copy_frame(f: &Frame<Bytes>) -> Option<Frame<Bytes>> {
    if let Some(d) = f.data_ref() {
        return Some(Frame::data(d.clone()));
    }
    f.trailers_ref().map(|t| Frame::trailers(t.clone()))
}

/// A request body on its way upstream, which a retry can send again.
///
/// Requests without a body cost nothing. Other bodies stream to the upstream as they arrive while
/// a copy is kept, up to a cap; a retry replays the copy and then goes on reading from the client.
/// Past the cap the copy is dropped and the request can be retried only if the upstream never
/// read any of it (a failed connection).
#[derive(Debug)]
pub enum ReqBody {
    /// No body at all.
    Empty,
    /// A body shared between the tries of one request.
    Replay(ReplayBody),
}

/// One try's view of a shared, recorded request body.
#[derive(Debug)]
pub struct ReplayBody {
    shared: Arc<Mutex<Recording>>,
    /// Index of the next recorded frame this try sends.
    pos: usize,
    /// The try generation this view belongs to; an older view is cut off.
    generation: u64,
    hint: SizeHint,
}

#[derive(Debug)]
struct Recording {
    source: ClientBody,
    frames: Vec<Frame<Bytes>>,
    recorded: u64,
    cap: u64,
    /// The copy outgrew the cap and was dropped.
    overflow: bool,
    /// Some of the body was handed to an upstream.
    read: bool,
    done: bool,
    /// The client's side of the body failed: it can never be sent whole.
    errored: bool,
    /// The generation of the try allowed to read; earlier tries get an error.
    generation: u64,
    /// Body bytes read from the client so far.
    total: u64,
    /// The most the route accepts.
    limit: u64,
}

/// The client's body outgrew the route's `max_request_body_bytes`.
#[derive(Debug, thiserror::Error)]
#[error("the request body is larger than {0} bytes")]
pub struct BodyTooLarge(pub u64);

/// Reading the client's request body failed (the client went away or sent a broken body).
#[derive(Debug, thiserror::Error)]
#[error("the client's request body failed: {0}")]
pub struct ClientBodyError(String);

/// A newer try of the same request took over the body; this one must stop sending it.
#[derive(Debug, thiserror::Error)]
#[error("a newer try took over the request body")]
pub struct SupersededTry;

impl ReqBody {
    /// Wraps a client's body, keeping up to `cap` bytes of it for retries and failing it once
    /// it exceeds `limit` bytes.
    pub fn new(body: ClientBody, cap: u64, limit: Option<u64>) -> Self {
        if body.is_end_stream() {
            return ReqBody::Empty;
        }
        let hint = body.size_hint();
        // A body known to be larger than the cap is never copied.
        let overflow = hint.lower() > cap;
        ReqBody::Replay(ReplayBody {
            shared: Arc::new(Mutex::new(Recording {
                source: body,
                frames: Vec::new(),
                recorded: 0,
                cap,
                overflow,
                read: false,
                done: false,
                errored: false,
                generation: 0,
                total: 0,
                limit: limit.unwrap_or(u64::MAX),
            })),
            pos: 0,
            generation: 0,
            hint,
        })
    }

    /// Whether the whole body can still be sent again: it was kept (or none of it was read),
    /// and the client's side did not fail.
    pub fn replayable(&self) -> bool {
        match self {
            ReqBody::Empty => true,
            ReqBody::Replay(r) => r
                .shared
                .lock()
                .map(|rec| !rec.errored && (!rec.overflow || !rec.read))
                .unwrap_or(false),
        }
    }

    /// A body for another try, if the whole body can still be sent again.
    pub fn try_clone(&self) -> Option<Self> {
        if !self.replayable() {
            return None;
        }
        Some(match self {
            ReqBody::Empty => ReqBody::Empty,
            ReqBody::Replay(r) => ReqBody::Replay(ReplayBody {
                shared: r.shared.clone(),
                pos: 0,
                generation: r.generation,
                hint: r.hint,
            }),
        })
    }

    /// Makes this copy the only one that may read the body: an earlier try that is still
    /// sending it (an upstream that answered early while the body streamed) gets an error and
    /// stops, so two tries never read the client's stream at once.
    pub fn claim(&mut self) {
        if let ReqBody::Replay(r) = self {
            if let Ok(mut rec) = r.shared.lock() {
                rec.generation += 1;
                r.generation = rec.generation;
                r.pos = 0;
            }
        }
    }
}

impl Body for ReqBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let ReqBody::Replay(r) = self.get_mut() else {
            return Poll::Ready(None);
        };
        // A poisoned lock means another try panicked mid-frame: fail rather than end the body
        // early, which would send a truncated body as if it were whole.
        let Ok(mut rec) = r.shared.lock() else {
            return Poll::Ready(Some(Err(Box::new(ClientBodyError("poisoned".into())))));
        };
        if rec.generation != r.generation {
            return Poll::Ready(Some(Err(Box::new(SupersededTry))));
        }
        if rec.errored {
            return Poll::Ready(Some(Err(Box::new(ClientBodyError(
                "failed earlier".into(),
            )))));
        }
        if let Some(f) = rec.frames.get(r.pos).and_then(copy_frame) {
            r.pos += 1;
            return Poll::Ready(Some(Ok(f)));
        }
        if rec.done {
            return Poll::Ready(None);
        }
        match Pin::new(&mut rec.source).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                rec.read = true;
                rec.total += frame.data_ref().map_or(0, |d| d.len() as u64);
                if rec.total > rec.limit {
                    rec.errored = true;
                    return Poll::Ready(Some(Err(Box::new(BodyTooLarge(rec.limit)))));
                }
                if !rec.overflow {
                    rec.recorded += frame.data_ref().map_or(0, |d| d.len() as u64);
                    if rec.recorded > rec.cap {
                        rec.overflow = true;
                        rec.frames = Vec::new();
                    } else if let Some(copy) = copy_frame(&frame) {
                        rec.frames.push(copy);
                        r.pos += 1;
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                rec.errored = true;
                Poll::Ready(Some(Err(Box::new(ClientBodyError(e.to_string())))))
            }
            Poll::Ready(None) => {
                rec.done = true;
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ReqBody::Empty => true,
            ReqBody::Replay(r) => r
                .shared
                .lock()
                .map(|rec| {
                    rec.generation == r.generation
                        && !rec.errored
                        && rec.done
                        && r.pos >= rec.frames.len()
                })
                .unwrap_or(false),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ReqBody::Empty => SizeHint::with_exact(0),
            ReqBody::Replay(r) => r.hint,
        }
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;

    use super::*;

    /// A body read ahead whole (a small answer) or made locally has nothing left to stall on:
    /// it gets no idle timer, and is relayed as it is.
    #[tokio::test]
    async fn a_body_with_nothing_left_to_wait_for_is_not_watched() {
        let idle = Some(Duration::from_secs(1));
        let held = ProxyBody::Held {
            frames: VecDeque::from([Frame::data(Bytes::from_static(b"ok"))]),
            rest: None,
        };
        let held = held.watch(idle);
        assert!(matches!(held, ProxyBody::Held { .. }), "{held:?}");
        assert_eq!(held.collect().await.unwrap().to_bytes(), "ok");
        let local = ProxyBody::full(Bytes::from_static(b"x")).watch(idle);
        assert!(matches!(local, ProxyBody::Full(_)), "{local:?}");
    }
}
