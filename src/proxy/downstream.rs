//! HTTP/1.1 downstream connections, served by the connection's own task with the proxy's codec.
//!
//! Why not hyper's server here (HTTP/2 and TLS without ALPN still use it): every request head
//! was parsed twice, once by the framing check and once by hyper; hyper keeps two 8 KiB buffers
//! and a boxed handler future for a connection's whole life, so an idle keep-alive connection
//! cost about 17 KB; and its dispatcher is a large share of the proxy's own work per request.
//! Here the framing check ([`Guarded`](crate::proxy::framing::Guarded)) still sees every byte
//! first and turns a violation into a NUL no parser accepts; this module parses the checked head
//! once, runs the handler, and writes the response, head and a small body in one write. The
//! read buffer goes back to a per-thread spare list while the connection waits for its next
//! request, so an idle connection holds no buffer at all.
//!
//! Behaviour kept from hyper's server, and pinned by the suites: `400` and a close for a head
//! that does not parse, `431` for one too large or with too many fields; pipelined requests
//! answered in order; `Expect: 100-continue` answered when the body is first wanted; HEAD,
//! `1xx`, `204` and `304` answers without a body; a `date` header; chunked responses (with
//! trailers) when the length is unknown, close-delimited ones to HTTP/1.0 clients; a client that
//! shuts its sending side still gets its answer; a `101` hands the connection, with any bytes
//! read past the head, to the tunnel. A request body the handler did not read to its end, or a
//! response that failed midway, closes the connection: what follows cannot be trusted to be
//! framed.

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::io::Write as _;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll, Waker};
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderName};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::error::BoxError;
use crate::proxy::body::ProxyBody;
use crate::proxy::clock;
use crate::proxy::h1::{self, Chunk, Framing, Rewound};
use crate::proxy::values;

/// Bytes asked of each read: a whole small request in one.
const READ_SIZE: usize = 4096;
/// Encoded response bytes gathered before they are written, however ready the body is.
const WRITE_HIGH: usize = 64 * 1024;
/// Read buffers each thread keeps for connections between requests.
const SPARES: usize = 256;
/// Header slots on the stack; a listener allowing more uses a vector.
const STACK_HEADERS: usize = 100;

const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";
const BAD_REQUEST: &[u8] = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\
connection: close\r\nx-outrigger-error: malformed_request\r\n\r\n";
const TOO_LARGE: &[u8] = b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\n\
connection: close\r\nx-outrigger-error: request_header_too_large\r\n\r\n";

thread_local! {
    /// Read buffers of connections waiting for a request, kept for the next read.
    static SPARE: RefCell<Vec<BytesMut>> = const { RefCell::new(Vec::new()) };
    /// Write buffers of connections waiting for a request, kept for the next response.
    static SPARE_OUT: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
    /// Where a request head's fields lie, noted while it is parsed: kept, so that no request
    /// zeroes or allocates room for them.
    static SPANS: RefCell<Vec<[u32; 4]>> = const { RefCell::new(Vec::new()) };
    /// The `date` header value of the current second.
    static DATE: RefCell<Date> = const { RefCell::new(Date { until: None, text: [0; 29] }) };
}

/// A read buffer: a spare one of this thread, or a new one.
fn take_buffer() -> BytesMut {
    SPARE
        .with(|s| s.borrow_mut().pop())
        .unwrap_or_else(|| BytesMut::with_capacity(READ_SIZE))
}

/// Keeps an empty read buffer for another connection, when no body chunk still shares it.
fn give_buffer(mut buf: BytesMut) {
    buf.clear();
    if buf.try_reclaim(READ_SIZE) {
        SPARE.with(|s| {
            let mut spare = s.borrow_mut();
            if spare.len() < SPARES {
                spare.push(buf);
            }
        });
    }
}

/// A write buffer: a spare one of this thread, or a new one.
fn take_out() -> Vec<u8> {
    SPARE_OUT
        .with(|s| s.borrow_mut().pop())
        .unwrap_or_else(|| Vec::with_capacity(READ_SIZE))
}

/// Keeps an empty write buffer for another connection; one grown by a large body is let go.
fn give_out(mut buf: Vec<u8>) {
    buf.clear();
    if buf.capacity() <= WRITE_HIGH {
        SPARE_OUT.with(|s| {
            let mut spare = s.borrow_mut();
            if spare.len() < SPARES {
                spare.push(buf);
            }
        });
    }
}

/// The `date` value of this thread's answers, and until when it is right.
struct Date {
    /// The end of the second `text` names, on the request path's clock; `None` before the
    /// first answer.
    until: Option<tokio::time::Instant>,
    /// The IMF-fixdate form.
    text: [u8; 29],
}

/// Appends `date: <now>` in the IMF-fixdate form, formatted once a second per thread. The wall
/// clock is read only when the second of the last reading has ended on the request path's
/// clock, so a step of the wall clock shows within a second.
fn put_date(wr: &mut Vec<u8>) {
    DATE.with(|d| {
        let mut d = d.borrow_mut();
        let now = clock::now();
        if d.until.map_or(true, |until| now >= until) {
            let wall = SystemTime::now();
            let into = wall
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos());
            let text = httpdate::fmt_http_date(wall);
            if text.len() == d.text.len() {
                d.text.copy_from_slice(text.as_bytes());
                d.until = Some(now + Duration::from_nanos(u64::from(1_000_000_000 - into)));
            }
        }
        wr.extend_from_slice(b"date: ");
        wr.extend_from_slice(&d.text);
        wr.extend_from_slice(b"\r\n");
    });
}

/// A request head that could not be taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    /// It does not parse (the framing check's NUL included): `400`.
    Malformed,
    /// Too large, or too many fields: `431`.
    TooLarge,
}

/// A parsed request head and what the connection must know of it.
struct Parsed {
    parts: http::request::Parts,
    /// How its body is framed.
    body: Framing,
    /// Whether the client lets the connection carry another request.
    keep: bool,
    /// Whether the client waits for `100 Continue` before sending its body.
    expect: bool,
}

/// Where the parts of a request head lie in its bytes.
struct Scan {
    len: usize,
    method: (usize, usize),
    target: (usize, usize),
    version: Version,
}

/// Finds the parts of the request head at the start of `buf`; `None` if it is not all there.
fn scan<'b>(
    buf: &'b [u8],
    max_head: usize,
    slots: &mut [MaybeUninit<httparse::Header<'b>>],
    spans: &mut Vec<[u32; 4]>,
) -> Result<Option<Scan>, Refusal> {
    let mut req = httparse::Request::new(&mut []);
    let len = match req.parse_with_uninit_headers(buf, slots) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() > max_head => return Err(Refusal::TooLarge),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(Refusal::TooLarge),
        Err(_) => return Err(Refusal::Malformed),
    };
    if len > max_head {
        return Err(Refusal::TooLarge);
    }
    let (Some(method), Some(target)) = (req.method, req.path) else {
        return Err(Refusal::Malformed);
    };
    // Everything httparse hands back points into `buf`.
    let base = buf.as_ptr() as usize;
    let at = |s: &str| (s.as_ptr() as usize - base, s.len());
    let (method, target) = (at(method), at(target));
    for h in req.headers.iter() {
        let name = h.name.as_ptr() as usize - base;
        let value = h.value.as_ptr() as usize - base;
        spans.push([name, h.name.len(), value, h.value.len()].map(|n| n as u32));
    }
    Ok(Some(Scan {
        len,
        method,
        target,
        version: match req.version {
            Some(0) => Version::HTTP_10,
            _ => Version::HTTP_11,
        },
    }))
}

/// The next request head in `rd`, consumed; `None` until a whole one is there.
fn parse_request(
    rd: &mut BytesMut,
    max_head: usize,
    max_headers: usize,
) -> Result<Option<Parsed>, Refusal> {
    SPANS.with(|spans| match spans.try_borrow_mut() {
        Ok(mut spans) => parse_into(rd, max_head, max_headers, &mut spans),
        Err(_) => parse_into(rd, max_head, max_headers, &mut Vec::new()),
    })
}

/// [`parse_request`], with `spans` to note where the fields are.
fn parse_into(
    rd: &mut BytesMut,
    max_head: usize,
    max_headers: usize,
    spans: &mut Vec<[u32; 4]>,
) -> Result<Option<Parsed>, Refusal> {
    spans.clear();
    let found = if max_headers <= STACK_HEADERS {
        let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; STACK_HEADERS];
        scan(rd, max_head, &mut slots[..max_headers], spans)?
    } else {
        let mut slots = Vec::with_capacity(max_headers);
        slots.resize_with(max_headers, MaybeUninit::uninit);
        scan(rd, max_head, &mut slots, spans)?
    };
    let Some(found) = found else {
        return Ok(None);
    };
    let bytes = rd.split_to(found.len).freeze();
    let (m, ml) = found.method;
    let method = Method::from_bytes(&bytes[m..m + ml]).map_err(|_| Refusal::Malformed)?;
    let (t, tl) = found.target;
    let uri = Uri::from_maybe_shared(bytes.slice(t..t + tl)).map_err(|_| Refusal::Malformed)?;
    let version = found.version;
    // Room for what the proxy adds before forwarding (`http::prepare` reserves as much), so
    // that the map is not grown, and rehashed, a moment after it is built.
    let mut headers = HeaderMap::with_capacity(spans.len() + 5);
    let mut length = 0;
    let mut chunked = false;
    let mut keep = version == Version::HTTP_11;
    let mut expect = false;
    for &span in spans.iter() {
        let [n, nl, v, vl] = span.map(|n| n as usize);
        let name = HeaderName::from_bytes(&bytes[n..n + nl]).map_err(|_| Refusal::Malformed)?;
        let value = HeaderValue::from_maybe_shared(bytes.slice(v..v + vl))
            .map_err(|_| Refusal::Malformed)?;
        // The framing check already refused every ambiguous framing: one length, or chunked.
        if name == header::CONTENT_LENGTH {
            length = h1::parse_length(value.as_bytes()).ok_or(Refusal::Malformed)?;
        } else if name == header::TRANSFER_ENCODING {
            chunked = true;
        } else if name == header::CONNECTION {
            for token in value.as_bytes().split(|b| *b == b',') {
                let token = token.trim_ascii();
                if token.eq_ignore_ascii_case(b"close") {
                    keep = false;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    keep = true;
                }
            }
        } else if name == header::EXPECT {
            expect = version == Version::HTTP_11
                && value.as_bytes().eq_ignore_ascii_case(b"100-continue");
        }
        headers.append(name, value);
    }
    let body = if chunked {
        Framing::Chunked(Chunk::Size)
    } else {
        Framing::Length(length)
    };
    let mut parts = Request::new(()).into_parts().0;
    parts.method = method;
    parts.uri = uri;
    parts.version = version;
    parts.headers = headers;
    Ok(Some(Parsed {
        parts,
        body,
        keep,
        expect: expect && !body.ended(),
    }))
}

/// What a request body and its connection share: the next frame, handed over by the
/// connection's task when the body asks for one.
#[derive(Debug, Default)]
struct Slot {
    frame: Option<Result<Frame<Bytes>, String>>,
    ended: bool,
    /// The body is waiting for a frame.
    wanted: bool,
    /// Set when the body is dropped: nobody reads what is left.
    dropped: bool,
    body: Option<Waker>,
    conn: Option<Waker>,
}

/// Keeps `waker` in `slot`, cloning only when it would not wake the same task.
fn keep_waker(slot: &mut Option<Waker>, waker: &Waker) {
    if !slot.as_ref().is_some_and(|w| w.will_wake(waker)) {
        *slot = Some(waker.clone());
    }
}

/// The body of a request read by this module: frames the connection reads when asked.
#[derive(Debug)]
pub struct RequestBody {
    /// Shared with the connection; `None` for a request without a body.
    slot: Option<Arc<Mutex<Slot>>>,
    hint: SizeHint,
    ended: bool,
}

/// Reading the client's request body failed: it closed the connection or broke the framing.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BodyError(String);

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let Some(slot) = this.slot.as_ref().filter(|_| !this.ended) else {
            return Poll::Ready(None);
        };
        let Ok(mut slot) = slot.lock() else {
            return Poll::Ready(Some(Err("the request body's connection failed".into())));
        };
        if let Some(frame) = slot.frame.take() {
            if frame.is_err() || slot.ended {
                this.ended = true;
            }
            return Poll::Ready(Some(frame.map_err(|e| BoxError::from(BodyError(e)))));
        }
        if slot.ended {
            this.ended = true;
            return Poll::Ready(None);
        }
        slot.wanted = true;
        keep_waker(&mut slot.body, cx.waker());
        if let Some(w) = &slot.conn {
            w.wake_by_ref();
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.ended
    }

    fn size_hint(&self) -> SizeHint {
        self.hint
    }
}

impl Drop for RequestBody {
    fn drop(&mut self) {
        if let Some(Ok(mut slot)) = self.slot.as_ref().map(|s| s.lock()) {
            slot.dropped = true;
        }
    }
}

/// A request body still coming from the client.
struct Inbound {
    framing: Framing,
    slot: Arc<Mutex<Slot>>,
    /// `100 Continue` is owed before the first read.
    expect: bool,
}

/// How the rest of a response body is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Out {
    /// Nothing more (no body, or all of it written).
    Done,
    /// This many bytes still to come.
    Length(u64),
    /// In chunks.
    Chunked,
    /// Until the connection closes (an HTTP/1.0 client, length unknown).
    Close,
}

/// Where a connection is.
enum State<F> {
    /// Waiting for (or reading) a request head.
    Head,
    /// The handler works on a request.
    Handling {
        fut: Pin<Box<F>>,
        head: bool,
        version: Version,
    },
    /// A response is being written.
    Body {
        body: ProxyBody,
        out: Out,
    },
    /// The last bytes go out; then the write side is shut, unless the connection switched
    /// protocols.
    Closing {
        switched: bool,
    },
    Done,
    /// Over after a `101`: the connection is the tunnel's.
    Switched,
}

/// One downstream HTTP/1.1 connection, served until it closes or switches protocols.
pub struct Connection<IO, H, F> {
    io: Option<IO>,
    rd: BytesMut,
    wr: Vec<u8>,
    handler: H,
    state: State<F>,
    inbound: Option<Inbound>,
    /// Whether the connection may carry another request after the current one.
    keep: bool,
    /// Asked to end once the current exchange is done.
    closing: bool,
    max_head: usize,
    max_headers: usize,
}

impl<IO, H, F> Connection<IO, H, F>
where
    IO: AsyncRead + AsyncWrite + Unpin,
    H: FnMut(Request<RequestBody>) -> F,
    F: Future<Output = Response<ProxyBody>>,
{
    /// Serves `io`, each request answered by `handler`; heads are limited to `max_head` bytes
    /// and `max_headers` fields.
    pub fn new(io: IO, handler: H, max_head: usize, max_headers: usize) -> Self {
        Self {
            io: Some(io),
            rd: BytesMut::new(),
            wr: Vec::new(),
            handler,
            state: State::Head,
            inbound: None,
            keep: true,
            closing: false,
            max_head,
            max_headers,
        }
    }

    /// Ends the connection once the exchange under way is done (at once when it waits for a
    /// request); its last response says `connection: close`.
    pub fn graceful_shutdown(&mut self) {
        self.closing = true;
    }

    /// The connection, once it has written a `101` and ended.
    pub fn take_switched(&mut self) -> Option<Rewound<IO>> {
        if !matches!(self.state, State::Switched) {
            return None;
        }
        let io = self.io.take()?;
        Some(Rewound::new(std::mem::take(&mut self.rd), io))
    }

    /// Reads more bytes; `Ok(0)` at the end of the stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let Some(io) = self.io.as_mut() else {
            return Poll::Ready(Ok(0));
        };
        if self.rd.capacity() == 0 {
            self.rd = take_buffer();
        } else if self.rd.capacity() - self.rd.len() < READ_SIZE / 2 {
            self.rd.reserve(READ_SIZE);
        }
        tokio_util::io::poll_read_buf(Pin::new(io), cx, &mut self.rd)
    }

    /// Writes what is waiting in `wr`, then flushes.
    fn poll_write_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.io.as_mut() {
            Some(io) => h1::poll_write_all(io, &mut self.wr, cx),
            None => Poll::Ready(Err(io::ErrorKind::NotConnected.into())),
        }
    }

    /// Hands the request body the frames it asks for, reading them from the client.
    fn pump(&mut self, cx: &mut Context<'_>) {
        loop {
            let Some(inbound) = self.inbound.as_mut() else {
                return;
            };
            {
                let Ok(mut slot) = inbound.slot.lock() else {
                    self.inbound = None;
                    self.keep = false;
                    return;
                };
                if slot.dropped {
                    // Nobody reads the rest: the connection cannot carry another request.
                    drop(slot);
                    self.inbound = None;
                    self.keep = false;
                    return;
                }
                keep_waker(&mut slot.conn, cx.waker());
                if !slot.wanted || slot.frame.is_some() {
                    return;
                }
            }
            if inbound.expect {
                inbound.expect = false;
                self.wr.extend_from_slice(CONTINUE);
            }
            if !self.wr.is_empty() {
                match self.poll_write_out(cx) {
                    Poll::Ready(Ok(())) => {}
                    Poll::Pending => return,
                    Poll::Ready(Err(e)) => {
                        self.fail_body(e.to_string());
                        return;
                    }
                }
            }
            let Some(inbound) = self.inbound.as_mut() else {
                return;
            };
            let read = h1::read_frame(&mut self.rd, &mut inbound.framing);
            let delivered = match read {
                Ok(Some(frame)) => Some(Ok(frame)),
                Ok(None) if inbound.framing.ended() => None,
                Ok(None) => match self.poll_fill(cx) {
                    Poll::Pending => return,
                    Poll::Ready(Ok(0)) => {
                        Some(Err("the client closed the connection mid-body".to_owned()))
                    }
                    Poll::Ready(Ok(_)) => continue,
                    Poll::Ready(Err(e)) => Some(Err(e.to_string())),
                },
                Err(e) => Some(Err(e.to_string())),
            };
            match delivered {
                Some(Ok(frame)) => self.deliver(Some(Ok(frame))),
                Some(Err(e)) => self.fail_body(e),
                None => self.deliver(None),
            }
        }
    }

    /// Gives the body its next frame, or its end (`None`).
    fn deliver(&mut self, frame: Option<Result<Frame<Bytes>, String>>) {
        let Some(inbound) = self.inbound.as_mut() else {
            return;
        };
        // A body of known length ends with its last byte, without being asked again.
        let ended = frame.is_none() || inbound.framing == Framing::Length(0);
        if let Ok(mut slot) = inbound.slot.lock() {
            slot.wanted = false;
            slot.ended = ended;
            if let Some(f) = frame {
                slot.frame = Some(f);
            }
            if let Some(w) = slot.body.take() {
                w.wake();
            }
        }
        if ended {
            self.inbound = None;
        }
    }

    /// Fails the request body: the connection carries no more requests.
    fn fail_body(&mut self, why: String) {
        self.deliver(Some(Err(why)));
        self.inbound = None;
        self.keep = false;
    }

    /// Starts the handler on the next request head in the buffer; `Ready(false)` at the end
    /// of the connection.
    fn poll_head(&mut self, cx: &mut Context<'_>) -> Poll<bool> {
        loop {
            if !self.rd.is_empty() {
                match parse_request(&mut self.rd, self.max_head, self.max_headers) {
                    Ok(Some(parsed)) => {
                        self.start(parsed);
                        return Poll::Ready(true);
                    }
                    Ok(None) => {}
                    Err(refusal) => {
                        self.wr.clear();
                        self.wr.extend_from_slice(match refusal {
                            Refusal::Malformed => BAD_REQUEST,
                            Refusal::TooLarge => TOO_LARGE,
                        });
                        self.rd.clear();
                        self.state = State::Closing { switched: false };
                        return Poll::Ready(true);
                    }
                }
            } else if self.closing {
                return Poll::Ready(false);
            }
            match self.poll_fill(cx) {
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => {
                    // The client is gone, or shut its side between requests; a head cut short
                    // by the end of the stream gets no answer (as hyper's server).
                    return Poll::Ready(false);
                }
                Poll::Ready(Ok(_)) => {}
                Poll::Pending => {
                    // Nothing in flight: the buffers serve other connections meanwhile.
                    if self.rd.is_empty() {
                        give_buffer(std::mem::take(&mut self.rd));
                    }
                    if self.wr.capacity() > 0 && self.wr.is_empty() {
                        give_out(std::mem::take(&mut self.wr));
                    }
                    return Poll::Pending;
                }
            }
        }
    }

    fn start(&mut self, parsed: Parsed) {
        let Parsed {
            parts,
            body,
            keep,
            expect,
        } = parsed;
        self.keep = keep;
        let head = parts.method == Method::HEAD;
        let version = parts.version;
        let ended = body.ended();
        let hint = match body {
            Framing::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        };
        let slot = (!ended).then(|| Arc::new(Mutex::new(Slot::default())));
        self.inbound = slot.clone().map(|slot| Inbound {
            framing: body,
            slot,
            expect,
        });
        let req_body = RequestBody { slot, hint, ended };
        let fut = (self.handler)(Request::from_parts(parts, req_body));
        self.state = State::Handling {
            fut: Box::pin(fut),
            head,
            version,
        };
    }

    /// Encodes the head of `resp` and returns how its body is written.
    fn encode(
        &mut self,
        parts: &http::response::Parts,
        body: &ProxyBody,
        head: bool,
        version: Version,
    ) -> Out {
        let status = parts.status;
        if self.wr.capacity() == 0 {
            self.wr = take_out();
        }
        let wr = &mut self.wr;
        wr.extend_from_slice(b"HTTP/1.1 ");
        wr.extend_from_slice(status.as_str().as_bytes());
        wr.push(b' ');
        wr.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
        wr.extend_from_slice(b"\r\n");
        // No body may follow these; 304 and HEAD answers keep the length they describe.
        let bodiless = status.is_informational() || status == StatusCode::NO_CONTENT;
        let no_body = bodiless || head || status == StatusCode::NOT_MODIFIED;
        if self.closing {
            self.keep = false;
        }
        let mut length = None;
        let mut said_close = false;
        let mut has_date = false;
        for (name, value) in &parts.headers {
            if name == header::TRANSFER_ENCODING {
                continue;
            }
            if name == header::CONTENT_LENGTH {
                if bodiless {
                    continue;
                }
                length = h1::parse_length(value.as_bytes());
            } else if name == header::CONNECTION {
                if value
                    .as_bytes()
                    .split(|b| *b == b',')
                    .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"))
                {
                    said_close = true;
                    self.keep = false;
                }
            } else if name == header::DATE {
                has_date = true;
            }
            wr.extend_from_slice(name.as_str().as_bytes());
            wr.extend_from_slice(b": ");
            wr.extend_from_slice(value.as_bytes());
            wr.extend_from_slice(b"\r\n");
        }
        if !has_date {
            put_date(wr);
        }
        let out = if status == StatusCode::SWITCHING_PROTOCOLS {
            Out::Done
        } else if no_body {
            if length.is_none() && head && !bodiless {
                if let Some(n) = body.size_hint().exact() {
                    let _ = write!(wr, "content-length: {n}\r\n");
                }
            }
            Out::Done
        } else if let Some(n) = length {
            Out::Length(n)
        } else if body.is_end_stream() {
            wr.extend_from_slice(b"content-length: 0\r\n");
            Out::Done
        } else if let Some(n) = body.size_hint().exact() {
            let _ = write!(wr, "content-length: {n}\r\n");
            Out::Length(n)
        } else if version == Version::HTTP_11 {
            wr.extend_from_slice(b"transfer-encoding: chunked\r\n");
            Out::Chunked
        } else {
            self.keep = false;
            Out::Close
        };
        if status != StatusCode::SWITCHING_PROTOCOLS {
            if !self.keep && !said_close {
                wr.extend_from_slice(b"connection: close\r\n");
            } else if self.keep && version == Version::HTTP_10 {
                wr.extend_from_slice(b"connection: keep-alive\r\n");
            }
        }
        wr.extend_from_slice(b"\r\n");
        out
    }

    /// Encodes as much of the response body as is ready, up to [`WRITE_HIGH`] bytes;
    /// `Ready(Ok)` once the body is all encoded, `Pending` when it has no frame ready.
    fn poll_encode(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        let State::Body { body, out } = &mut self.state else {
            return Poll::Ready(Ok(()));
        };
        let wr = &mut self.wr;
        while wr.len() < WRITE_HIGH {
            if *out == Out::Done {
                return Poll::Ready(Ok(()));
            }
            let frame = ready!(Pin::new(&mut *body).poll_frame(cx));
            match frame {
                Some(Err(e)) => return Poll::Ready(Err(e)),
                Some(Ok(frame)) => match out {
                    Out::Length(left) => {
                        if let Some(data) = frame.data_ref() {
                            let n = data.len() as u64;
                            if n > *left {
                                return Poll::Ready(Err(
                                    "the response body is longer than its content-length".into(),
                                ));
                            }
                            *left -= n;
                            wr.extend_from_slice(data);
                            if *left == 0 {
                                *out = Out::Done;
                            }
                        }
                    }
                    Out::Close => {
                        if let Some(data) = frame.data_ref() {
                            wr.extend_from_slice(data);
                        }
                    }
                    Out::Chunked => {
                        if h1::put_chunk(wr, frame) {
                            *out = Out::Done;
                        }
                    }
                    Out::Done => {}
                },
                None => {
                    match out {
                        Out::Length(left) if *left > 0 => {
                            return Poll::Ready(Err(
                                "the response body is shorter than its content-length".into(),
                            ));
                        }
                        Out::Chunked => wr.extend_from_slice(b"0\r\n\r\n"),
                        _ => {}
                    }
                    *out = Out::Done;
                }
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Drives the connection; `Ready` when it is over.
    pub fn poll_serve(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            match &mut self.state {
                State::Head => {
                    if !ready!(self.poll_head(cx)) {
                        self.state = State::Closing { switched: false };
                        self.wr.clear();
                    }
                }
                State::Handling { fut, head, version } => {
                    let (head, version) = (*head, *version);
                    let polled = fut.as_mut().poll(cx);
                    let Poll::Ready(resp) = polled else {
                        self.pump(cx);
                        return Poll::Pending;
                    };
                    if let Some(inbound) = self.inbound.as_mut() {
                        // Answered before the body was asked for: the client must not send it
                        // now, and the rest of the connection is not a request.
                        if inbound.expect {
                            self.inbound = None;
                            self.keep = false;
                        }
                    }
                    let (parts, body) = resp.into_parts();
                    let out = self.encode(&parts, &body, head, version);
                    let switched = parts.status == StatusCode::SWITCHING_PROTOCOLS;
                    // The head is written: its map serves the next answer read on this thread.
                    values::give_map(parts.headers);
                    if switched {
                        self.state = State::Closing { switched: true };
                    } else {
                        self.state = State::Body { body, out };
                    }
                }
                State::Body { .. } => {
                    self.pump(cx);
                    let encoded = self.poll_encode(cx);
                    if let Poll::Ready(Err(e)) = &encoded {
                        // The response cannot be finished: the client sees it cut short.
                        tracing::debug!(error = %e, "a response body failed midway");
                        self.keep = false;
                        self.state = State::Closing { switched: false };
                        continue;
                    }
                    if !self.wr.is_empty() {
                        ready!(self.poll_write_out(cx))?;
                    }
                    if encoded.is_pending() {
                        return Poll::Pending;
                    }
                    let State::Body { out, .. } = &self.state else {
                        continue;
                    };
                    if *out != Out::Done {
                        continue;
                    }
                    if self.inbound.is_some() {
                        // The handler did not read the request body to its end.
                        self.inbound = None;
                        self.keep = false;
                    }
                    self.state = if self.keep && !self.closing {
                        State::Head
                    } else {
                        State::Closing { switched: false }
                    };
                }
                State::Closing { switched } => {
                    let switched = *switched;
                    if !self.wr.is_empty() {
                        ready!(self.poll_write_out(cx))?;
                    }
                    if switched {
                        self.state = State::Switched;
                        continue;
                    }
                    if let Some(io) = self.io.as_mut() {
                        // Errors here change nothing: the connection is over either way.
                        let _ = ready!(Pin::new(io).poll_shutdown(cx));
                    }
                    self.state = State::Done;
                }
                State::Done | State::Switched => return Poll::Ready(Ok(())),
            }
        }
    }
}

impl<IO, H, F> Future for Connection<IO, H, F>
where
    IO: AsyncRead + AsyncWrite + Unpin,
    H: FnMut(Request<RequestBody>) -> F + Unpin,
    F: Future<Output = Response<ProxyBody>>,
{
    type Output = io::Result<()>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.get_mut().poll_serve(cx)
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    use super::*;

    /// Answers each request with `<method> <target> <body> <trailers>`; a HEAD with `xyz`, and
    /// a request for `/switch` with a `101`.
    async fn echo(req: Request<RequestBody>) -> Response<ProxyBody> {
        let (parts, body) = req.into_parts();
        if parts.uri.path() == "/switch" {
            let mut resp = Response::new(ProxyBody::full(Bytes::new()));
            *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            return resp;
        }
        if parts.method == Method::HEAD {
            return Response::new(ProxyBody::full(Bytes::from_static(b"xyz")));
        }
        if parts.uri.path() == "/count" {
            let last = parts.headers.get("x-40").cloned();
            let text = format!("{} headers, x-40: {last:?}", parts.headers.len());
            return Response::new(ProxyBody::full(Bytes::from(text)));
        }
        let text = match body.collect().await {
            Ok(c) => {
                let trailers = c.trailers().map_or(String::new(), |t| format!("{t:?}"));
                let body = String::from_utf8_lossy(&c.to_bytes()).into_owned();
                format!("{} {} {body} {trailers}", parts.method, parts.uri)
            }
            Err(e) => format!("failed: {e}"),
        };
        Response::new(ProxyBody::full(Bytes::from(text)))
    }

    /// Serves one end of a pipe with [`echo`]; the task gives the connection back after a `101`.
    fn serve(max_headers: usize) -> (DuplexStream, tokio::task::JoinHandle<Option<Vec<u8>>>) {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let task = tokio::spawn(async move {
            let mut conn = Connection::new(server, echo, 8192, max_headers);
            (&mut conn).await.ok();
            conn.take_switched().map(|s| s.buffered().to_vec())
        });
        (client, task)
    }

    async fn read_all(client: &mut DuplexStream) -> String {
        let mut out = Vec::new();
        client.read_to_end(&mut out).await.unwrap();
        String::from_utf8(out).unwrap()
    }

    #[tokio::test]
    async fn pipelined_requests_are_answered_in_order_with_their_bodies() {
        let (mut client, task) = serve(20);
        client
            .write_all(
                b"GET /a HTTP/1.1\r\nhost: x\r\n\r\n\
                  HEAD /h HTTP/1.1\r\nhost: x\r\n\r\n\
                  POST /b HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n\r\nhello\
                  POST /c HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\
                  connection: close\r\n\r\n3;ext=1\r\nabc\r\n0\r\nx-t: 1\r\n\r\n",
            )
            .await
            .unwrap();
        let out = read_all(&mut client).await;
        let statuses = out.matches("HTTP/1.1 200 OK\r\n").count();
        assert_eq!(statuses, 4, "{out}");
        let a = out.find("GET /a  ").unwrap();
        let h = out.find("content-length: 3\r\n").unwrap();
        let b = out.find("POST /b hello ").unwrap();
        let c = out.find("POST /c abc {\"x-t\": \"1\"}").unwrap();
        assert!(a < h && h < b && b < c, "{out}");
        assert!(!out.contains("xyz"), "a HEAD answer has no body: {out}");
        assert!(out.contains("connection: close\r\n"), "{out}");
        assert!(out.contains("date: "), "{out}");
        assert!(task.await.unwrap().is_none());
    }

    #[tokio::test]
    async fn expect_continue_is_answered_when_the_body_is_wanted() {
        let (mut client, _task) = serve(20);
        client
            .write_all(
                b"PUT /e HTTP/1.1\r\nhost: x\r\nexpect: 100-continue\r\ncontent-length: 3\r\n\r\n",
            )
            .await
            .unwrap();
        let mut buf = [0u8; 25];
        client.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf[..], CONTINUE);
        client.write_all(b"abc").await.unwrap();
        client.shutdown().await.unwrap();
        let out = read_all(&mut client).await;
        assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
        assert!(out.ends_with("PUT /e abc "), "{out}");
    }

    #[tokio::test]
    async fn malformed_and_oversized_heads_are_refused_and_the_connection_closed() {
        let (mut client, _task) = serve(20);
        client
            .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\0\r\n\r\nGET /next HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        let out = read_all(&mut client).await;
        assert!(out.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{out}");
        assert_eq!(out.matches("HTTP/1.1").count(), 1, "{out}");

        let (mut client, _task) = serve(3);
        client
            .write_all(b"GET / HTTP/1.1\r\nhost: x\r\na: 1\r\nb: 2\r\nc: 3\r\n\r\n")
            .await
            .unwrap();
        let out = read_all(&mut client).await;
        assert!(out.starts_with("HTTP/1.1 431 "), "{out}");

        let (mut client, _task) = serve(20);
        let long = format!(
            "GET / HTTP/1.1\r\nhost: x\r\nx-big: {}\r\n\r\n",
            "a".repeat(9000)
        );
        client.write_all(long.as_bytes()).await.unwrap();
        let out = read_all(&mut client).await;
        assert!(out.starts_with("HTTP/1.1 431 "), "{out}");
    }

    /// A head with more fields than most still arrives whole.
    #[tokio::test]
    async fn a_head_with_many_fields_arrives_whole() {
        let (mut client, _task) = serve(60);
        let mut head = String::from("GET /count HTTP/1.1\r\nhost: x\r\nconnection: close\r\n");
        for i in 1..=40 {
            head.push_str(&format!("x-{i}: v{i}\r\n"));
        }
        head.push_str("\r\n");
        client.write_all(head.as_bytes()).await.unwrap();
        let out = read_all(&mut client).await;
        assert!(out.ends_with("42 headers, x-40: Some(\"v40\")"), "{out}");
    }

    #[tokio::test]
    async fn a_cut_body_fails_the_request_and_closes_the_connection() {
        let (mut client, _task) = serve(20);
        client
            .write_all(b"POST /b HTTP/1.1\r\nhost: x\r\ncontent-length: 10\r\n\r\nabc")
            .await
            .unwrap();
        client.shutdown().await.unwrap();
        let out = read_all(&mut client).await;
        assert!(out.contains("failed: the client closed"), "{out}");
        assert!(out.contains("connection: close\r\n"), "{out}");
    }

    #[tokio::test]
    async fn a_101_hands_over_the_connection_with_the_bytes_read_past_its_head() {
        let (mut client, task) = serve(20);
        client
            .write_all(b"GET /switch HTTP/1.1\r\nhost: x\r\nupgrade: ws\r\nconnection: upgrade\r\n\r\nEXTRA")
            .await
            .unwrap();
        let rest = task.await.unwrap();
        assert_eq!(rest.as_deref(), Some(&b"EXTRA"[..]));
        let mut head = [0u8; 34];
        client.read_exact(&mut head).await.unwrap();
        assert!(head.starts_with(b"HTTP/1.1 101 Switching Protocols\r\n"));
    }
}
