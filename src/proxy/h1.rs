//! HTTP/1.1 to upstream endpoints, spoken by the task of the request that uses the connection.
//!
//! Why not hyper's client connection (HTTP/2 clusters still use hyper): hyper gives every
//! upstream connection a task of its own, so each exchange crosses tasks four times (the
//! request into a channel, the head back through a oneshot, each body chunk through another
//! channel, and the connection's readiness back to its sender), and it allocates a fresh read
//! buffer for every response. Here the request's own future writes the head and the body and
//! reads the answer, and the response body reads its frames from the socket when the client's
//! side asks for them; the connection's buffer is kept from one exchange to the next.
//!
//! What is checked, and what a failure becomes: a response head that is malformed, too large,
//! or frames its body ambiguously (two lengths, a bad chunk size) fails the exchange, and the
//! connection is closed, never reused. A connection is reused only when the response said it
//! may be (HTTP/1.1 without `connection: close`, or HTTP/1.0 with `keep-alive`), its body was
//! read to its end, the whole request went out, and nothing more was sent. A reused connection
//! that the upstream closes before a byte of the answer gives the request back to be sent on
//! a new one, when it is idempotent and has no body (RFC 9112, section 9.3.1).

use std::io::{self, Write as _};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderName};
use http::{HeaderMap, HeaderValue, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::error::BoxError;
use crate::proxy::body::ReqBody;
use crate::proxy::pool::Loan;
use crate::proxy::values;
use crate::tls::UpstreamStream;

/// The longest response head (status line and headers) accepted.
const MAX_HEAD: usize = 64 * 1024;
/// The most headers a response head may carry (hyper's client default).
const MAX_HEADERS: usize = 100;
/// Read size: a whole small answer in one read.
const READ_SIZE: usize = 8 * 1024;
/// The longest chunk-size line, extensions included.
const MAX_CHUNK_LINE: usize = 4 * 1024;

/// Why an exchange with an upstream failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing the connection failed.
    #[error("upstream connection: {0}")]
    Io(#[from] io::Error),
    /// The upstream closed the connection before the whole response head arrived.
    #[error("the upstream closed the connection before answering")]
    Closed,
    /// The upstream closed the connection before the end of the response body.
    #[error("the upstream closed the connection before the end of the response body")]
    Incomplete,
    /// The response is not valid HTTP/1.1.
    #[error("malformed response from the upstream: {0}")]
    Malformed(&'static str),
    /// The request's body failed (the client's side, or a newer try took it over).
    #[error("the request body failed: {0}")]
    Body(#[source] BoxError),
}

/// An open HTTP/1.1 connection to one endpoint, between exchanges or in one.
#[derive(Debug)]
pub struct Conn {
    io: UpstreamStream,
    /// Bytes read and not yet consumed; its allocation is reused by the next exchange once the
    /// body chunks handed out of it are dropped.
    rd: BytesMut,
    /// Encoded bytes waiting to be written.
    wr: Vec<u8>,
    /// Whether it already carried an exchange.
    reused: bool,
}

impl Conn {
    /// A new connection over `io`.
    pub fn new(io: UpstreamStream) -> Self {
        Self {
            io,
            rd: BytesMut::new(),
            wr: Vec::new(),
            reused: false,
        }
    }

    /// Whether this idle connection can no longer carry a request: the upstream closed it, or
    /// sent bytes nobody asked for. Costs a syscall only when the socket has something to read.
    pub fn is_closed(&mut self) -> bool {
        let tcp = match &self.io {
            UpstreamStream::Plain(s) => s,
            UpstreamStream::Tls(s) => s.get_ref().0,
        };
        let mut cx = Context::from_waker(futures_util::task::noop_waker_ref());
        match tcp.poll_read_ready(&mut cx) {
            Poll::Pending => false,
            Poll::Ready(Err(_)) => true,
            // Readable: an end, stray bytes, or (TLS) a record with no data, such as a session
            // ticket, which leaves the connection usable.
            Poll::Ready(Ok(())) => {
                self.rd.clear();
                !matches!(self.poll_fill(&mut cx), Poll::Pending)
            }
        }
    }

    /// Reads more bytes into the buffer; `Ok(0)` at the end of the stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.rd.capacity() - self.rd.len() < READ_SIZE / 2 {
            self.rd.reserve(READ_SIZE);
        }
        tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.rd)
    }

    /// Writes what is waiting in `wr`, then flushes.
    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        poll_write_all(&mut self.io, &mut self.wr, cx)
    }

    /// Encodes the head of a request with `parts`, the headers of `set` in place of any of the
    /// same names, and a body of `body`, and returns how the body is to be sent. The target is
    /// written in origin form, as HTTP/1.1 asks of a request to an origin server.
    pub fn encode(
        &mut self,
        parts: &http::request::Parts,
        set: &TryHeaders,
        body: ReqBody,
    ) -> Result<Outgoing, Error> {
        let wr = &mut self.wr;
        wr.clear();
        wr.extend_from_slice(parts.method.as_str().as_bytes());
        wr.push(b' ');
        wr.extend_from_slice(
            parts
                .uri
                .path_and_query()
                .map_or("/", |p| p.as_str())
                .as_bytes(),
        );
        wr.extend_from_slice(b" HTTP/1.1\r\n");
        let mut length = None;
        for (name, value) in &parts.headers {
            if name == header::TRANSFER_ENCODING || set.sets(name) {
                continue;
            }
            if name == header::CONTENT_LENGTH {
                let n = parse_length(value.as_bytes())
                    .ok_or(Error::Malformed("a request with an invalid content-length"))?;
                if length.is_some_and(|l| l != n) {
                    return Err(Error::Malformed("a request with two content-lengths"));
                }
                length = Some(n);
            }
            put_field(wr, name, value);
        }
        for (name, value) in set.iter() {
            put_field(wr, name, value);
        }
        let outgoing = match body {
            ReqBody::Empty => Outgoing::Done,
            body => match length.or(body.size_hint().exact()) {
                Some(n) => {
                    if length.is_none() {
                        // Writing into a `Vec` cannot fail.
                        let _ = write!(wr, "content-length: {n}\r\n");
                    }
                    Outgoing::Length { body, left: n }
                }
                None => {
                    wr.extend_from_slice(b"transfer-encoding: chunked\r\n");
                    Outgoing::Chunked { body }
                }
            },
        };
        wr.extend_from_slice(b"\r\n");
        Ok(outgoing)
    }

    /// Writes the head and as much of the body as is ready; `Ready(Ok)` once all of it is out.
    pub fn poll_send(
        &mut self,
        cx: &mut Context<'_>,
        out: &mut Outgoing,
    ) -> Poll<Result<(), Error>> {
        loop {
            // What is encoded goes out before more of the body is taken, so that a slow
            // upstream holds back the client instead of filling our memory.
            ready!(self.poll_flush(cx))?;
            let frame = match out {
                Outgoing::Done => return Poll::Ready(Ok(())),
                Outgoing::Length { body, .. } | Outgoing::Chunked { body } => {
                    ready!(Pin::new(body).poll_frame(cx))
                }
            };
            let wr = &mut self.wr;
            match (frame, &mut *out) {
                (Some(Err(e)), _) => return Poll::Ready(Err(Error::Body(e))),
                (Some(Ok(frame)), Outgoing::Length { left, .. }) => {
                    if let Some(data) = frame.data_ref() {
                        let n = data.len() as u64;
                        if n > *left {
                            return Poll::Ready(Err(Error::Body(
                                "the request body is longer than its content-length".into(),
                            )));
                        }
                        *left -= n;
                        wr.extend_from_slice(data);
                    }
                }
                (Some(Ok(frame)), Outgoing::Chunked { .. }) => {
                    if put_chunk(wr, frame) {
                        *out = Outgoing::Done;
                    }
                }
                (None, Outgoing::Length { left, .. }) => {
                    if *left != 0 {
                        return Poll::Ready(Err(Error::Body(
                            "the request body is shorter than its content-length".into(),
                        )));
                    }
                    *out = Outgoing::Done;
                }
                (None, Outgoing::Chunked { .. }) => {
                    wr.extend_from_slice(b"0\r\n\r\n");
                    *out = Outgoing::Done;
                }
                (_, Outgoing::Done) => {}
            }
        }
    }

    /// Reads the response head to a request (`head`: the request was `HEAD`), passing over
    /// interim `1xx` answers other than `101`.
    pub fn poll_head(&mut self, cx: &mut Context<'_>, head: bool) -> Poll<Result<Head, Error>> {
        loop {
            if let Some(parsed) = read_head(&mut self.rd, head)? {
                return Poll::Ready(Ok(parsed));
            }
            let was_empty = self.rd.is_empty();
            if ready!(self.poll_fill(cx))? == 0 {
                return Poll::Ready(Err(if was_empty {
                    Error::Closed
                } else {
                    Error::Incomplete
                }));
            }
        }
    }

    /// Reads the next frame of a response body framed by `framing`.
    pub fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
        framing: &mut Framing,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        loop {
            match read_frame(&mut self.rd, framing) {
                Ok(Some(frame)) => return Poll::Ready(Some(Ok(frame))),
                Ok(None) if framing.ended() => return Poll::Ready(None),
                Ok(None) => {}
                Err(e) => return Poll::Ready(Some(Err(e))),
            }
            match ready!(self.poll_fill(cx)) {
                Ok(0) if matches!(framing, Framing::Close) => {
                    *framing = Framing::Length(0);
                    return Poll::Ready(None);
                }
                Ok(0) => return Poll::Ready(Some(Err(Error::Incomplete))),
                Ok(_) => {}
                Err(e) => return Poll::Ready(Some(Err(Error::Io(e)))),
            }
        }
    }

    /// Whether the last exchange left the connection fit for another: nothing stray buffered.
    fn clean(&self) -> bool {
        self.rd.is_empty() && self.wr.is_empty()
    }
}

/// The next response head in `rd`, consumed, interim `1xx` answers other than `101` passed
/// over (`head`: the request was `HEAD`); `None` until a whole one is there.
pub fn read_head(rd: &mut BytesMut, head: bool) -> Result<Option<Head>, Error> {
    while !rd.is_empty() {
        let Some(parsed) = parse_head(rd, head)? else {
            if rd.len() > MAX_HEAD {
                return Err(Error::Malformed("a response head too large"));
            }
            return Ok(None);
        };
        let interim = parsed.parts.status.is_informational()
            && parsed.parts.status != StatusCode::SWITCHING_PROTOCOLS;
        if !interim {
            return Ok(Some(parsed));
        }
    }
    Ok(None)
}

/// The next frame of a body framed by `framing` that the bytes in `rd` hold, consumed; `None`
/// when more bytes are needed or the body ended (`framing` then says it ended). A body framed
/// by the connection's close never ends here: only its reader sees the close.
pub fn read_frame(rd: &mut BytesMut, framing: &mut Framing) -> Result<Option<Frame<Bytes>>, Error> {
    match framing {
        Framing::Length(0) => Ok(None),
        Framing::Length(left) => {
            if rd.is_empty() {
                return Ok(None);
            }
            let n = (*left).min(rd.len() as u64) as usize;
            *left -= n as u64;
            Ok(Some(Frame::data(rd.split_to(n).freeze())))
        }
        Framing::Close if rd.is_empty() => Ok(None),
        Framing::Close => Ok(Some(Frame::data(rd.split().freeze()))),
        Framing::Chunked(chunk) => next_chunk(rd, chunk),
    }
}

/// A whole response head from the buffer, consumed; `None` if it is not all there yet.
fn parse_head(rd: &mut BytesMut, head: bool) -> Result<Option<Head>, Error> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut slots);
    let len = match resp.parse(rd) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Error::Malformed("too many response headers"))
        }
        Err(_) => return Err(Error::Malformed("an invalid response head")),
    };
    let status = resp
        .code
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or(Error::Malformed("an invalid status code"))?;
    let version = match resp.version {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    // Offsets, so that the values can share the frozen head's bytes.
    let base = rd.as_ptr() as usize;
    // Compact (a head is at most `MAX_HEAD` plus one read long), so that zeroing it is cheap.
    let mut spans = [[0u32; 4]; MAX_HEADERS];
    let count = resp.headers.len();
    for (span, h) in spans.iter_mut().zip(resp.headers.iter()) {
        let name = h.name.as_ptr() as usize - base;
        let value = h.value.as_ptr() as usize - base;
        *span = [name, h.name.len(), value, h.value.len()].map(|n| n as u32);
    }
    let bytes = rd.split_to(len).freeze();
    // Room for the two headers an HTTP/2 server adds to an answer (`date`, `content-length`):
    // hyper's HTTP/2 server reserves a slot for each, and a full map would be rehashed twice.
    let mut headers = values::take_map(count + 2);
    let mut length: Option<u64> = None;
    let mut chunked = false;
    let mut close = version == Version::HTTP_10;
    for &span in &spans[..count] {
        let [n, nl, v, vl] = span.map(|n| n as usize);
        let name = HeaderName::from_bytes(&bytes[n..n + nl])
            .map_err(|_| Error::Malformed("an invalid header name"))?;
        let value = HeaderValue::from_maybe_shared(bytes.slice(v..v + vl))
            .map_err(|_| Error::Malformed("an invalid header value"))?;
        if name == header::CONTENT_LENGTH {
            let n = parse_length(value.as_bytes())
                .ok_or(Error::Malformed("an invalid content-length"))?;
            if length.is_some_and(|l| l != n) {
                return Err(Error::Malformed("two different content-lengths"));
            }
            length = Some(n);
        } else if name == header::TRANSFER_ENCODING {
            // Only the last coding tells whether the body is chunked.
            chunked = value
                .as_bytes()
                .rsplit(|b| *b == b',')
                .next()
                .is_some_and(|c| c.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if name == header::CONNECTION {
            for token in value.as_bytes().split(|b| *b == b',') {
                let token = token.trim_ascii();
                if token.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    close = false;
                }
            }
        }
        headers.append(name, value);
    }
    let coded = headers.contains_key(header::TRANSFER_ENCODING);
    let no_body = head
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
        || status.is_informational();
    let framing = if no_body {
        Framing::Length(0)
    } else if chunked {
        Framing::Chunked(Chunk::Size)
    } else if coded {
        Framing::Close
    } else {
        match length {
            Some(n) => Framing::Length(n),
            None => Framing::Close,
        }
    };
    // A length next to a transfer coding is a smuggling attempt's shape: the coding wins
    // and the connection is not trusted again.
    let keep = !(close || coded && length.is_some() || matches!(framing, Framing::Close));
    let mut parts = http::Response::new(()).into_parts().0;
    parts.status = status;
    parts.version = version;
    parts.headers = headers;
    Ok(Some(Head {
        parts,
        framing,
        keep,
    }))
}

/// Steps a chunked body through the bytes buffered: a frame when one is there, `None` when
/// more bytes are needed or the body ended (`chunk` is then [`Chunk::Done`]).
fn next_chunk(rd: &mut BytesMut, chunk: &mut Chunk) -> Result<Option<Frame<Bytes>>, Error> {
    loop {
        match chunk {
            Chunk::Done => return Ok(None),
            Chunk::Size => {
                let Some(end) = find(rd, b"\r\n") else {
                    if rd.len() > MAX_CHUNK_LINE {
                        return Err(Error::Malformed("a chunk size line too long"));
                    }
                    return Ok(None);
                };
                let size = parse_chunk_size(&rd[..end])
                    .ok_or(Error::Malformed("an invalid chunk size"))?;
                rd.advance(end + 2);
                *chunk = if size == 0 {
                    Chunk::Trailers
                } else {
                    Chunk::Data(size)
                };
            }
            Chunk::Data(left) => {
                if rd.is_empty() {
                    return Ok(None);
                }
                let n = (*left).min(rd.len() as u64) as usize;
                *left -= n as u64;
                if *left == 0 {
                    *chunk = Chunk::DataEnd;
                }
                return Ok(Some(Frame::data(rd.split_to(n).freeze())));
            }
            Chunk::DataEnd => {
                if rd.len() < 2 {
                    return Ok(None);
                }
                if &rd[..2] != b"\r\n" {
                    return Err(Error::Malformed("a chunk without its line end"));
                }
                rd.advance(2);
                *chunk = Chunk::Size;
            }
            Chunk::Trailers => {
                if rd.starts_with(b"\r\n") {
                    rd.advance(2);
                    *chunk = Chunk::Done;
                    return Ok(None);
                }
                let Some(end) = find(rd, b"\r\n\r\n") else {
                    if rd.len() > MAX_HEAD {
                        return Err(Error::Malformed("trailers too large"));
                    }
                    return Ok(None);
                };
                let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
                let trailers = match httparse::parse_headers(&rd[..end + 4], &mut slots) {
                    Ok(httparse::Status::Complete((_, parsed))) => {
                        let mut map = HeaderMap::with_capacity(parsed.len());
                        for h in parsed {
                            let name = HeaderName::from_bytes(h.name.as_bytes())
                                .map_err(|_| Error::Malformed("an invalid trailer name"))?;
                            let value = HeaderValue::from_bytes(h.value)
                                .map_err(|_| Error::Malformed("an invalid trailer value"))?;
                            map.append(name, value);
                        }
                        map
                    }
                    _ => return Err(Error::Malformed("invalid trailers")),
                };
                rd.advance(end + 4);
                *chunk = Chunk::Done;
                return Ok(Some(Frame::trailers(trailers)));
            }
        }
    }
}

/// How the rest of a request body is to be sent.
#[derive(Debug)]
pub enum Outgoing {
    /// All of it is out (or there was none).
    Done,
    /// A body of a declared length, `left` bytes of it still to send.
    Length {
        /// The body.
        body: ReqBody,
        /// Bytes still to come.
        left: u64,
    },
    /// A body of unknown length, sent in chunks.
    Chunked {
        /// The body.
        body: ReqBody,
    },
}

/// A response head, and how its body is framed.
#[derive(Debug)]
pub struct Head {
    /// Status, version and headers.
    pub parts: http::response::Parts,
    /// How the body ends.
    pub framing: Framing,
    /// Whether the response lets the connection be reused.
    pub keep: bool,
}

/// How a response body ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// After this many more bytes.
    Length(u64),
    /// In chunks, at a zero-size one and its trailers.
    Chunked(Chunk),
    /// When the upstream closes the connection.
    Close,
}

/// Where a chunked body's reader is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chunk {
    /// At a chunk-size line.
    Size,
    /// Inside a chunk, this many bytes from its end.
    Data(u64),
    /// At the line end after a chunk's data.
    DataEnd,
    /// After the last chunk, at the trailers.
    Trailers,
    /// Past the end.
    Done,
}

impl Framing {
    fn size_hint(&self) -> SizeHint {
        match self {
            Framing::Length(n) => SizeHint::with_exact(*n),
            Framing::Chunked(Chunk::Done) => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }

    /// Whether the body has no more bytes to come.
    pub fn ended(&self) -> bool {
        matches!(self, Framing::Length(0) | Framing::Chunked(Chunk::Done))
    }
}

/// Writes `name: value` and its line end.
fn put_field(wr: &mut Vec<u8>, name: &HeaderName, value: &HeaderValue) {
    wr.extend_from_slice(name.as_str().as_bytes());
    wr.extend_from_slice(b": ");
    wr.extend_from_slice(value.as_bytes());
    wr.extend_from_slice(b"\r\n");
}

/// The headers one try sets on the request it sends (the time left, a `Host` the client did not
/// send), in place of the request's own of the same names. The request's head is shared by its
/// tries, so that keeping it for a retry copies no header map. The names are `static`s: a
/// reference is a quarter of a name's size, and a try's future carries these.
#[derive(Debug, Default)]
pub struct TryHeaders {
    fields: [Option<(&'static HeaderName, HeaderValue)>; 3],
}

impl TryHeaders {
    /// Sets `name` to `value`; a name set before is replaced. A fourth name is dropped, which
    /// the three callers cannot reach.
    pub fn set(&mut self, name: &'static HeaderName, value: HeaderValue) {
        let at = self
            .fields
            .iter()
            .position(|f| f.as_ref().map_or(true, |(n, _)| *n == name));
        if let Some(at) = at {
            self.fields[at] = Some((name, value));
        }
    }

    /// Whether `name` is one this try sets.
    pub fn sets(&self, name: &HeaderName) -> bool {
        self.iter().any(|(n, _)| n == name)
    }

    /// The headers set, in the order they were first set.
    pub fn iter(&self) -> impl Iterator<Item = (&HeaderName, &HeaderValue)> {
        self.fields.iter().flatten().map(|(n, v)| (*n, v))
    }

    /// Puts the headers set into `headers`, replacing those of the same names.
    pub fn apply(self, headers: &mut HeaderMap) {
        for (name, value) in self.fields.into_iter().flatten() {
            headers.insert(name.clone(), value);
        }
    }
}

/// Sends the request encoded on `conn` and reads its response head, writing the body as the
/// client sends it (an answer may come before the whole body, which then keeps going out while
/// the response body is read).
///
/// An upstream may answer before taking the whole body and then close the connection (RFC 9112,
/// section 9.6), so that writing the rest fails: the answer stands when it arrives, and only when
/// none does is the write's failure the exchange's.
pub async fn exchange(conn: &mut Conn, out: &mut Outgoing, head: bool) -> Result<Head, Error> {
    let mut unsent = None;
    std::future::poll_fn(|cx| {
        if unsent.is_none() {
            match conn.poll_send(cx, out) {
                // The connection broke: what it already carried back may still be read.
                Poll::Ready(Err(Error::Io(e))) => {
                    *out = Outgoing::Done;
                    unsent = Some(e);
                }
                // The request's own body failed: no answer is coming.
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                _ => {}
            }
        }
        match ready!(conn.poll_head(cx, head)) {
            Ok(mut answer) => {
                // Part of the request never went out: the connection cannot be reused.
                answer.keep &= unsent.is_none();
                Poll::Ready(Ok(answer))
            }
            Err(e) => Poll::Ready(Err(unsent.take().map_or(e, Error::Io))),
        }
    })
    .await
}

impl Conn {
    /// Whether the connection carried an exchange before this one.
    pub fn reused(&self) -> bool {
        self.reused
    }
}

/// A response body read from an HTTP/1.1 connection, which the body holds until its end.
#[derive(Debug)]
pub struct ResponseBody {
    loan: Option<Box<Loan>>,
    framing: Framing,
    out: Outgoing,
    keep: bool,
}

impl ResponseBody {
    /// The body framed by `framing` on `loan`'s connection; `out` is what is left of the
    /// request's body to send. A body with nothing to read gives the connection back at once.
    pub fn new(loan: Box<Loan>, framing: Framing, out: Outgoing, keep: bool) -> Self {
        let mut body = Self {
            loan: Some(loan),
            framing,
            out,
            keep,
        };
        if body.framing.ended() {
            body.end();
        }
        body
    }

    /// A body with nothing in it, holding no connection (that of a `101`).
    pub fn ended() -> Self {
        Self {
            loan: None,
            framing: Framing::Length(0),
            out: Outgoing::Done,
            keep: false,
        }
    }

    fn end(&mut self) {
        let Some(mut loan) = self.loan.take() else {
            return;
        };
        if self.keep && matches!(self.out, Outgoing::Done) && loan.conn.clean() {
            loan.conn.reused = true;
            loan.give_back();
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let this = self.get_mut();
        let Some(loan) = this.loan.as_mut() else {
            return Poll::Ready(None);
        };
        let conn = &mut loan.conn;
        if !matches!(this.out, Outgoing::Done) {
            if let Poll::Ready(Err(e)) = conn.poll_send(cx, &mut this.out) {
                // The upstream chose to answer before taking the whole request: the answer
                // stands, but the connection is in the middle of a message and is not reused.
                tracing::debug!(error = %e, "the rest of a request body could not be sent");
                this.out = Outgoing::Done;
                this.keep = false;
            }
        }
        let polled = ready!(conn.poll_frame(cx, &mut this.framing));
        match &polled {
            None => this.end(),
            Some(Ok(_)) if this.framing.ended() => this.end(),
            Some(Ok(_)) => {}
            // The connection is broken: it closes with the loan.
            Some(Err(_)) => this.loan = None,
        }
        Poll::Ready(polled)
    }

    fn is_end_stream(&self) -> bool {
        self.loan.is_none() || self.framing.ended()
    }

    fn size_hint(&self) -> SizeHint {
        if self.loan.is_none() {
            return SizeHint::with_exact(0);
        }
        self.framing.size_hint()
    }
}

/// A connection switched to another protocol by a `101`: the bytes already read past the head
/// come first. Both sides of a tunnel are one: the upstream's, and the client's when the proxy's
/// own HTTP/1.1 server wrote the `101`.
#[derive(Debug)]
pub struct Rewound<IO> {
    rd: BytesMut,
    io: IO,
}

impl<IO> Rewound<IO> {
    /// `io`, with `rd` read from it already.
    pub fn new(rd: BytesMut, io: IO) -> Self {
        Self { rd, io }
    }

    /// The bytes read already and not yet handed on.
    pub fn buffered(&self) -> &[u8] {
        &self.rd
    }
}

/// An upstream connection after its `101`.
pub type Upgraded = Rewound<UpstreamStream>;

impl Upgraded {
    /// The connection after its `101`.
    pub fn from_conn(conn: Conn) -> Self {
        Rewound::new(conn.rd, conn.io)
    }
}

/// The connection of a `101`, carried in the response's extensions (which must be `Clone`)
/// until the tunnel takes it.
#[derive(Debug, Clone)]
pub struct Switched(Arc<Mutex<Option<Upgraded>>>);

impl Switched {
    /// Carries `upgraded`.
    pub fn new(upgraded: Upgraded) -> Self {
        Self(Arc::new(Mutex::new(Some(upgraded))))
    }

    /// The connection, to the first caller.
    pub fn take(&self) -> Option<Upgraded> {
        self.0.lock().ok()?.take()
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Rewound<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.rd.is_empty() {
            let n = this.rd.len().min(buf.remaining());
            buf.put_slice(&this.rd[..n]);
            this.rd.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Rewound<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// A content-length value: digits only, as RFC 9110 section 8.6 has it.
pub fn parse_length(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    v.iter().try_fold(0u64, |n, d| {
        n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

/// A chunk-size line's size; extensions after `;` are ignored.
fn parse_chunk_size(line: &[u8]) -> Option<u64> {
    let digits = line
        .split(|b| *b == b';')
        .next()
        .unwrap_or_default()
        .trim_ascii();
    if digits.is_empty() || digits.len() > 15 {
        return None;
    }
    digits.iter().try_fold(0u64, |n, d| {
        let v = (*d as char).to_digit(16)?;
        Some(n * 16 + u64::from(v))
    })
}

/// Where `what` first occurs in `buf`.
fn find(buf: &[u8], what: &[u8]) -> Option<usize> {
    buf.windows(what.len()).position(|w| w == what)
}

/// Writes the bytes waiting in `wr` to `io` (keeping what could not be written yet), then
/// flushes: TLS keeps records back until then.
pub fn poll_write_all<IO: AsyncWrite + Unpin>(
    io: &mut IO,
    wr: &mut Vec<u8>,
    cx: &mut Context<'_>,
) -> Poll<io::Result<()>> {
    let mut at = 0;
    while at < wr.len() {
        match Pin::new(&mut *io).poll_write(cx, &wr[at..]) {
            Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
            Poll::Ready(Ok(n)) => at += n,
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => {
                wr.drain(..at);
                return Poll::Pending;
            }
        }
    }
    wr.clear();
    Pin::new(io).poll_flush(cx)
}

/// Appends `frame` to `wr` in the chunked coding: data as one chunk (none when empty), trailers
/// as the last chunk and its trailer fields. Returns whether that ended the body.
pub fn put_chunk(wr: &mut Vec<u8>, frame: Frame<Bytes>) -> bool {
    match frame.into_data() {
        Ok(data) if data.is_empty() => false,
        Ok(data) => {
            let mut size = [0u8; 16];
            wr.extend_from_slice(hex(data.len(), &mut size));
            wr.extend_from_slice(b"\r\n");
            wr.extend_from_slice(&data);
            wr.extend_from_slice(b"\r\n");
            false
        }
        Err(frame) => {
            wr.extend_from_slice(b"0\r\n");
            if let Ok(trailers) = frame.into_trailers() {
                for (name, value) in &trailers {
                    wr.extend_from_slice(name.as_str().as_bytes());
                    wr.extend_from_slice(b": ");
                    wr.extend_from_slice(value.as_bytes());
                    wr.extend_from_slice(b"\r\n");
                }
            }
            wr.extend_from_slice(b"\r\n");
            true
        }
    }
}

/// `n` in lowercase hexadecimal, written into `buf`.
pub fn hex(n: usize, buf: &mut [u8; 16]) -> &[u8] {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut at = buf.len();
    let mut n = n;
    loop {
        at -= 1;
        buf[at] = DIGITS[n & 0xf];
        n >>= 4;
        if n == 0 {
            return &buf[at..];
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::{TcpListener, TcpStream};

    /// A connection to a loopback peer, and the peer's end of it.
    async fn pair() -> (Conn, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (peer, _) = listener.accept().await.unwrap();
        (Conn::new(UpstreamStream::Plain(client)), peer)
    }

    async fn head(conn: &mut Conn, head: bool) -> Result<Head, Error> {
        std::future::poll_fn(|cx| conn.poll_head(cx, head)).await
    }

    /// The body's data and trailers, read to the end.
    async fn body(
        conn: &mut Conn,
        framing: &mut Framing,
    ) -> Result<(Vec<u8>, Option<HeaderMap>), Error> {
        let mut data = Vec::new();
        let mut trailers = None;
        while let Some(frame) = std::future::poll_fn(|cx| conn.poll_frame(cx, framing)).await {
            match frame?.into_data() {
                Ok(d) => data.extend_from_slice(&d),
                Err(f) => trailers = f.into_trailers().ok(),
            }
        }
        Ok((data, trailers))
    }

    /// Writes `bytes` one at a time, so that every parser state meets a cut.
    async fn dribble(peer: &mut TcpStream, bytes: &[u8]) {
        for b in bytes {
            peer.write_all(&[*b]).await.unwrap();
            peer.flush().await.unwrap();
        }
    }

    #[tokio::test]
    async fn a_response_with_a_length_leaves_the_connection_clean_for_the_next() {
        let (mut conn, mut peer) = pair().await;
        peer.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nx-a: 1\r\n\r\nhello")
            .await
            .unwrap();
        let mut h = head(&mut conn, false).await.unwrap();
        assert_eq!(h.parts.status, 200);
        assert_eq!(h.parts.headers["x-a"], "1");
        assert!(h.keep);
        assert_eq!(h.framing, Framing::Length(5));
        let (data, trailers) = body(&mut conn, &mut h.framing).await.unwrap();
        assert_eq!(data, b"hello");
        assert!(trailers.is_none());
        assert!(conn.clean());
        assert!(!conn.is_closed());
        drop(peer);
        if let UpstreamStream::Plain(s) = &conn.io {
            s.readable().await.unwrap();
        }
        assert!(
            conn.is_closed(),
            "a connection the upstream closed is seen as closed"
        );
    }

    #[tokio::test]
    async fn a_chunked_body_cut_anywhere_gives_its_data_and_trailers() {
        let (mut conn, mut peer) = pair().await;
        let task = tokio::spawn(async move {
            dribble(
                &mut peer,
                b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n\
                  5;ext=1\r\nhello\r\nA\r\n, chunked!\r\n0\r\ngrpc-status: 0\r\nx-t: y\r\n\r\n",
            )
            .await;
            peer
        });
        let mut h = head(&mut conn, false).await.unwrap();
        assert_eq!(h.parts.status, 200, "the interim 100 is passed over");
        assert_eq!(h.framing, Framing::Chunked(Chunk::Size));
        assert!(h.keep);
        let (data, trailers) = body(&mut conn, &mut h.framing).await.unwrap();
        assert_eq!(data, b"hello, chunked!");
        let trailers = trailers.unwrap();
        assert_eq!(trailers["grpc-status"], "0");
        assert_eq!(trailers["x-t"], "y");
        assert!(conn.clean());
        drop(task.await.unwrap());
    }

    #[tokio::test]
    async fn a_chunked_body_without_trailers_ends_at_its_last_chunk() {
        let (mut conn, mut peer) = pair().await;
        peer.write_all(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        )
        .await
        .unwrap();
        let mut h = head(&mut conn, false).await.unwrap();
        let (data, trailers) = body(&mut conn, &mut h.framing).await.unwrap();
        assert_eq!(data, b"abc");
        assert!(trailers.is_none());
        assert!(conn.clean());
    }

    #[tokio::test]
    async fn a_body_without_a_length_lasts_until_the_upstream_closes() {
        let (mut conn, mut peer) = pair().await;
        peer.write_all(b"HTTP/1.0 200 OK\r\n\r\nuntil the end")
            .await
            .unwrap();
        drop(peer);
        let mut h = head(&mut conn, false).await.unwrap();
        assert_eq!(h.framing, Framing::Close);
        assert!(!h.keep);
        let (data, _) = body(&mut conn, &mut h.framing).await.unwrap();
        assert_eq!(data, b"until the end");
    }

    #[tokio::test]
    async fn keep_alive_follows_the_version_and_the_connection_header() {
        for (response, keep) in [
            (&b"HTTP/1.1 204 No Content\r\n\r\n"[..], true),
            (
                b"HTTP/1.1 204 No Content\r\nconnection: close\r\n\r\n",
                false,
            ),
            (b"HTTP/1.0 204 No Content\r\n\r\n", false),
            (
                b"HTTP/1.0 204 No Content\r\nconnection: Keep-Alive\r\n\r\n",
                true,
            ),
            // Both framings: the coding wins, and the connection is not trusted again.
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n",
                false,
            ),
        ] {
            let (mut conn, mut peer) = pair().await;
            peer.write_all(response).await.unwrap();
            let h = head(&mut conn, false).await.unwrap();
            assert_eq!(h.keep, keep, "{}", String::from_utf8_lossy(response));
        }
    }

    #[tokio::test]
    async fn heads_and_bodiless_statuses_have_no_body_whatever_their_length_says() {
        for (response, is_head) in [
            (&b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n"[..], true),
            (
                b"HTTP/1.1 304 Not Modified\r\ncontent-length: 10\r\n\r\n",
                false,
            ),
            (
                b"HTTP/1.1 204 No Content\r\ntransfer-encoding: chunked\r\n\r\n",
                false,
            ),
        ] {
            let (mut conn, mut peer) = pair().await;
            peer.write_all(response).await.unwrap();
            let h = head(&mut conn, is_head).await.unwrap();
            assert_eq!(h.framing, Framing::Length(0));
            assert!(conn.clean());
        }
    }

    #[tokio::test]
    async fn ambiguous_or_broken_responses_fail_the_exchange() {
        for response in [
            &b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ncontent-length: 4\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\ncontent-length: +3\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 3, 3\r\n\r\n",
            b"HTTP/1.1 2000 OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nbad header\r\n\r\n",
            b"SSH-2.0-OpenSSH\r\n\r\n",
        ] {
            let (mut conn, mut peer) = pair().await;
            peer.write_all(response).await.unwrap();
            let got = head(&mut conn, false).await;
            assert!(
                matches!(got, Err(Error::Malformed(_))),
                "{}: {got:?}",
                String::from_utf8_lossy(response)
            );
        }
        let (mut conn, mut peer) = pair().await;
        peer.write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n")
            .await
            .unwrap();
        let mut h = head(&mut conn, false).await.unwrap();
        assert!(matches!(
            body(&mut conn, &mut h.framing).await,
            Err(Error::Malformed(_))
        ));
    }

    #[tokio::test]
    async fn an_end_before_the_answer_or_inside_the_body_is_told_apart() {
        let (mut conn, peer) = pair().await;
        drop(peer);
        assert!(matches!(head(&mut conn, false).await, Err(Error::Closed)));

        let (mut conn, mut peer) = pair().await;
        peer.write_all(b"HTTP/1.1 200 OK\r\ncontent-")
            .await
            .unwrap();
        drop(peer);
        assert!(matches!(
            head(&mut conn, false).await,
            Err(Error::Incomplete)
        ));

        let (mut conn, mut peer) = pair().await;
        peer.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort")
            .await
            .unwrap();
        drop(peer);
        let mut h = head(&mut conn, false).await.unwrap();
        assert!(matches!(
            body(&mut conn, &mut h.framing).await,
            Err(Error::Incomplete)
        ));
    }

    #[tokio::test]
    async fn a_request_head_is_written_in_origin_form_with_its_headers_and_the_trys() {
        let (mut conn, mut peer) = pair().await;
        let req = http::Request::builder()
            .method(http::Method::DELETE)
            .uri("http://example.test/a/b?c=d")
            .header("host", "example.test")
            .header("x-multi", "1")
            .header("x-multi", "2")
            .body(())
            .unwrap();
        let (parts, ()) = req.into_parts();
        static X_MULTI: HeaderName = HeaderName::from_static("x-multi");
        static X_DEADLINE: HeaderName = HeaderName::from_static("x-deadline");
        let mut set = TryHeaders::default();
        set.set(&X_MULTI, HeaderValue::from_static("3"));
        set.set(&X_DEADLINE, HeaderValue::from_static("10"));
        set.set(&X_DEADLINE, HeaderValue::from_static("9"));
        let mut out = conn.encode(&parts, &set, ReqBody::Empty).unwrap();
        assert!(matches!(out, Outgoing::Done));
        std::future::poll_fn(|cx| conn.poll_send(cx, &mut out))
            .await
            .unwrap();
        let mut got = vec![0u8; 1024];
        let n = tokio::io::AsyncReadExt::read(&mut peer, &mut got)
            .await
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&got[..n]),
            "DELETE /a/b?c=d HTTP/1.1\r\nhost: example.test\r\nx-multi: 3\r\nx-deadline: 9\r\n\r\n",
            "a header the try sets replaces all of the request's values of it"
        );
    }

    #[test]
    fn chunk_sizes_and_lengths_parse_strictly() {
        assert_eq!(parse_chunk_size(b"1f"), Some(31));
        assert_eq!(parse_chunk_size(b"A ; name=value"), Some(10));
        assert_eq!(parse_chunk_size(b""), None);
        assert_eq!(parse_chunk_size(b"-1"), None);
        assert_eq!(parse_chunk_size(b"1234567890abcdef0"), None);
        assert_eq!(parse_length(b"0"), Some(0));
        assert_eq!(parse_length(b"18446744073709551616"), None);
        assert_eq!(parse_length(b" 1"), None);
        let mut buf = [0u8; 16];
        assert_eq!(hex(0, &mut buf), b"0");
        assert_eq!(hex(0xabc12, &mut buf), b"abc12");
    }
}
