//! A strict HTTP/1.1 framing check that runs on the bytes of a downstream connection before hyper
//! parses them, and the header-read timeout that answers slow clients with 408.
//!
//! hyper is lenient where RFC 9112 allows it (a bare LF ends a line; duplicate identical
//! `Content-Length` headers are merged), and lenient is how requests get smuggled past the
//! proxy in front of us or the service behind us. [`Framing`] follows the message boundaries
//! itself (head, then a `Content-Length` or chunked body) and stops at the first byte that makes a
//! message ambiguous or malformed: a bare CR or LF, obs-fold, a control byte in a header, a space
//! before a colon, `Content-Length` twice or together with `Transfer-Encoding`, a transfer coding
//! other than `chunked`, a bad chunk size, HTTP/0.9, or a version other than 1.0 and 1.1.
//!
//! [`Guarded`] wraps the connection: it hands hyper every byte up to the offending one and then a
//! NUL, which no HTTP/1 parser accepts at any position, so hyper itself answers `400` once the
//! responses already owed are written, and closes. Nothing of the bad message reaches an upstream
//! as a request; a bad chunk inside a body fails that body, and the request with it.
//!
//! HTTP/2 connections (ALPN `h2` or the prior-knowledge preface) pass through unchecked: h2 frames
//! carry their own lengths and hyper's h2 codec validates them.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use prometheus::IntCounter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

/// The answer to a client that did not finish sending its request head in time.
const TIMEOUT_REPLY: &[u8] = b"HTTP/1.1 408 Request Timeout\r\nconnection: close\r\n\
content-length: 0\r\nx-outrigger-error: header_read_timeout\r\n\r\n";

/// Longest header name or value kept for inspection (only `Content-Length` and
/// `Transfer-Encoding` values are kept); longer values of those two are malformed anyway.
const KEPT: usize = 32;

/// Where the check is in the byte stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Before a request line; empty lines are skipped (RFC 9112 §2.2).
    Start,
    StartLf,
    Method,
    Target,
    Version,
    RequestLineLf,
    /// At the start of a header (or trailer) line.
    LineStart,
    Name,
    Value,
    ValueLf,
    EndLf,
    /// `n` body bytes still to come.
    Fixed(u64),
    ChunkSize,
    ChunkSizeWs,
    ChunkExt,
    ChunkSizeLf,
    ChunkData(u64),
    ChunkDataCr,
    ChunkDataLf,
    /// HTTP/2 (or a violation already reported): nothing more is checked.
    Passthrough,
}

/// What a header line is about, as far as framing cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    Other,
    ContentLength,
    TransferEncoding,
}

/// Why a message was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Violation {
    /// A CR not followed by LF, or an LF not preceded by CR.
    BareLineEnd,
    /// A header line starting with whitespace (obs-fold), or whitespace before the colon.
    Folding,
    /// A byte not allowed where it appeared.
    InvalidByte,
    /// A request line without a version (HTTP/0.9) or with a version other than 1.0 and 1.1.
    Version,
    /// `Content-Length` more than once, or not a decimal number.
    ContentLength,
    /// `Transfer-Encoding` with `Content-Length`, more than once, on HTTP/1.0, or not `chunked`.
    TransferEncoding,
    /// A chunk size that is not hex, too long, or not followed by CRLF.
    ChunkSize,
}

/// The incremental framing check of one connection.
#[derive(Debug, Clone)]
pub struct Framing {
    state: State,
    /// The first bytes of the current method, target, version or header name.
    word: [u8; 17],
    word_len: usize,
    pri: bool,
    star: bool,
    http10: bool,
    first: bool,
    field: Field,
    value: [u8; KEPT],
    value_len: usize,
    content_length: Option<u64>,
    lengths: u32,
    chunked: bool,
    encodings: u32,
    trailers: bool,
    chunk: u64,
    digits: u32,
    head_bytes: bool,
}

impl Default for Framing {
    fn default() -> Self {
        Self::new()
    }
}

/// Token characters of RFC 9110 §5.6.2.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Field-value bytes: visible ASCII, space, tab and obs-text.
fn is_value_byte(b: u8) -> bool {
    b == b'\t' || b == b' ' || (0x21..=0x7e).contains(&b) || b >= 0x80
}

impl Framing {
    /// A check at the start of a connection.
    pub fn new() -> Self {
        Self {
            state: State::Start,
            word: [0; 17],
            word_len: 0,
            pri: false,
            star: false,
            http10: false,
            first: true,
            field: Field::Other,
            value: [0; KEPT],
            value_len: 0,
            content_length: None,
            lengths: 0,
            chunked: false,
            encodings: 0,
            trailers: false,
            chunk: 0,
            digits: 0,
            head_bytes: false,
        }
    }

    /// A check that lets everything through (a connection that negotiated HTTP/2).
    pub fn passthrough() -> Self {
        Self {
            state: State::Passthrough,
            ..Self::new()
        }
    }

    /// Whether the connection is waiting for (the rest of) a request head: the first request
    /// before any byte, or any request once its first byte arrived.
    pub fn in_head(&self) -> bool {
        match self.state {
            State::Start | State::StartLf => self.first || self.head_bytes,
            State::Method
            | State::Target
            | State::Version
            | State::RequestLineLf
            | State::EndLf => true,
            State::LineStart | State::Name | State::Value | State::ValueLf => !self.trailers,
            _ => false,
        }
    }

    /// Checks `data`, the next bytes of the stream. Returns the number of leading bytes that are
    /// fine, and the violation found right after them, if any. After a violation, everything
    /// passes: the connection is being closed.
    pub fn feed(&mut self, data: &[u8]) -> (usize, Option<Violation>) {
        let mut i = 0;
        while i < data.len() {
            match self.state {
                State::Passthrough => return (data.len(), None),
                State::Fixed(n) => {
                    let take = n.min((data.len() - i) as u64);
                    i += take as usize;
                    self.state = if take == n {
                        self.message_done()
                    } else {
                        State::Fixed(n - take)
                    };
                    continue;
                }
                State::ChunkData(n) => {
                    let take = n.min((data.len() - i) as u64);
                    i += take as usize;
                    self.state = if take == n {
                        State::ChunkDataCr
                    } else {
                        State::ChunkData(n - take)
                    };
                    continue;
                }
                _ => {}
            }
            if let Err(v) = self.byte(data[i]) {
                self.state = State::Passthrough;
                return (i, Some(v));
            }
            i += 1;
        }
        (data.len(), None)
    }

    fn message_done(&mut self) -> State {
        self.first = false;
        self.head_bytes = false;
        self.trailers = false;
        self.content_length = None;
        self.lengths = 0;
        self.chunked = false;
        self.encodings = 0;
        State::Start
    }

    fn keep_word(&mut self, b: u8) {
        if self.word_len < self.word.len() {
            self.word[self.word_len] = b;
        }
        self.word_len += 1;
    }

    fn word(&self) -> &[u8] {
        &self.word[..self.word_len.min(self.word.len())]
    }

    fn byte(&mut self, b: u8) -> Result<(), Violation> {
        use Violation as V;
        self.state = match self.state {
            State::Start => match b {
                b'\r' => State::StartLf,
                b'\n' => return Err(V::BareLineEnd),
                b if is_tchar(b) => {
                    self.head_bytes = true;
                    self.word_len = 0;
                    self.keep_word(b);
                    State::Method
                }
                _ => return Err(V::InvalidByte),
            },
            State::StartLf => match b {
                b'\n' => State::Start,
                _ => return Err(V::BareLineEnd),
            },
            State::Method => match b {
                b' ' => {
                    self.pri = self.word_len == 3 && self.word() == b"PRI";
                    self.word_len = 0;
                    State::Target
                }
                b if is_tchar(b) => {
                    self.keep_word(b);
                    State::Method
                }
                _ => return Err(V::InvalidByte),
            },
            State::Target => match b {
                b' ' if self.word_len > 0 => {
                    self.star = self.word_len == 1 && self.word() == b"*";
                    self.word_len = 0;
                    State::Version
                }
                b'\r' | b'\n' => return Err(V::Version),
                0x21..=0x7e => {
                    self.keep_word(b);
                    State::Target
                }
                _ => return Err(V::InvalidByte),
            },
            State::Version => match b {
                b'\r' => {
                    match self.word() {
                        b"HTTP/1.1" => self.http10 = false,
                        b"HTTP/1.0" => self.http10 = true,
                        b"HTTP/2.0" if self.first && self.pri && self.star => {
                            self.state = State::Passthrough;
                            return Ok(());
                        }
                        _ => return Err(V::Version),
                    }
                    State::RequestLineLf
                }
                b'\n' => return Err(V::BareLineEnd),
                0x21..=0x7e if self.word_len < 8 => {
                    self.keep_word(b);
                    State::Version
                }
                _ => return Err(V::Version),
            },
            State::RequestLineLf => match b {
                b'\n' => State::LineStart,
                _ => return Err(V::BareLineEnd),
            },
            State::LineStart => match b {
                b'\r' => State::EndLf,
                b'\n' => return Err(V::BareLineEnd),
                b' ' | b'\t' => return Err(V::Folding),
                b if is_tchar(b) => {
                    self.word_len = 0;
                    self.keep_word(b.to_ascii_lowercase());
                    State::Name
                }
                _ => return Err(V::InvalidByte),
            },
            State::Name => match b {
                b':' => {
                    self.field = self.classify();
                    self.value_len = 0;
                    State::Value
                }
                b' ' | b'\t' => return Err(V::Folding),
                b if is_tchar(b) => {
                    self.keep_word(b.to_ascii_lowercase());
                    State::Name
                }
                _ => return Err(V::InvalidByte),
            },
            State::Value => match b {
                b'\r' => State::ValueLf,
                b'\n' => return Err(V::BareLineEnd),
                b if is_value_byte(b) => {
                    if self.field != Field::Other
                        && !(self.value_len == 0 && (b == b' ' || b == b'\t'))
                    {
                        if self.value_len == KEPT {
                            return Err(match self.field {
                                Field::ContentLength => V::ContentLength,
                                _ => V::TransferEncoding,
                            });
                        }
                        self.value[self.value_len] = b;
                        self.value_len += 1;
                    }
                    State::Value
                }
                _ => return Err(V::InvalidByte),
            },
            State::ValueLf => match b {
                b'\n' => {
                    if !self.trailers {
                        self.header_done()?;
                    }
                    State::LineStart
                }
                _ => return Err(V::BareLineEnd),
            },
            State::EndLf => match b {
                b'\n' if self.trailers => self.message_done(),
                b'\n' => self.head_done()?,
                _ => return Err(V::BareLineEnd),
            },
            State::ChunkSize => match b {
                b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                    let d = (b as char).to_digit(16).unwrap_or(0);
                    self.digits += 1;
                    if self.digits > 15 {
                        return Err(V::ChunkSize);
                    }
                    self.chunk = self.chunk * 16 + u64::from(d);
                    State::ChunkSize
                }
                _ if self.digits == 0 => return Err(V::ChunkSize),
                b' ' | b'\t' => State::ChunkSizeWs,
                b';' => State::ChunkExt,
                b'\r' => State::ChunkSizeLf,
                b'\n' => return Err(V::BareLineEnd),
                _ => return Err(V::ChunkSize),
            },
            State::ChunkSizeWs => match b {
                b' ' | b'\t' => State::ChunkSizeWs,
                b';' => State::ChunkExt,
                b'\r' => State::ChunkSizeLf,
                b'\n' => return Err(V::BareLineEnd),
                _ => return Err(V::ChunkSize),
            },
            State::ChunkExt => match b {
                b'\r' => State::ChunkSizeLf,
                b'\n' => return Err(V::BareLineEnd),
                b if is_value_byte(b) => State::ChunkExt,
                _ => return Err(V::InvalidByte),
            },
            State::ChunkSizeLf => match b {
                b'\n' if self.chunk == 0 => {
                    self.trailers = true;
                    State::LineStart
                }
                b'\n' => State::ChunkData(self.chunk),
                _ => return Err(V::BareLineEnd),
            },
            State::ChunkDataCr => match b {
                b'\r' => State::ChunkDataLf,
                _ => return Err(V::ChunkSize),
            },
            State::ChunkDataLf => match b {
                b'\n' => {
                    self.chunk = 0;
                    self.digits = 0;
                    State::ChunkSize
                }
                _ => return Err(V::BareLineEnd),
            },
            // Handled in `feed` without a per-byte step.
            s @ (State::Fixed(_) | State::ChunkData(_) | State::Passthrough) => s,
        };
        Ok(())
    }

    fn classify(&self) -> Field {
        // `word` keeps 17 bytes: a longer name never equals these.
        match (self.word_len, self.word()) {
            (14, b"content-length") => Field::ContentLength,
            (17, b"transfer-encoding") => Field::TransferEncoding,
            _ => Field::Other,
        }
    }

    fn header_done(&mut self) -> Result<(), Violation> {
        let value = trim(&self.value[..self.value_len]);
        match self.field {
            Field::Other => {}
            Field::ContentLength => {
                self.lengths += 1;
                if self.lengths > 1 || value.is_empty() || value.len() > 18 {
                    return Err(Violation::ContentLength);
                }
                let mut n: u64 = 0;
                for &d in value {
                    if !d.is_ascii_digit() {
                        return Err(Violation::ContentLength);
                    }
                    n = n * 10 + u64::from(d - b'0');
                }
                self.content_length = Some(n);
            }
            Field::TransferEncoding => {
                self.encodings += 1;
                if self.encodings > 1 || !value.eq_ignore_ascii_case(b"chunked") {
                    return Err(Violation::TransferEncoding);
                }
                self.chunked = true;
            }
        }
        Ok(())
    }

    fn head_done(&mut self) -> Result<State, Violation> {
        if self.chunked && (self.content_length.is_some() || self.http10) {
            return Err(Violation::TransferEncoding);
        }
        Ok(if self.chunked {
            self.chunk = 0;
            self.digits = 0;
            State::ChunkSize
        } else {
            match self.content_length {
                Some(n) if n > 0 => State::Fixed(n),
                _ => self.message_done(),
            }
        })
    }
}

fn trim(v: &[u8]) -> &[u8] {
    let end = v
        .iter()
        .rposition(|b| *b != b' ' && *b != b'\t')
        .map_or(0, |p| p + 1);
    &v[..end]
}

/// Counters of refused downstream requests.
#[derive(Clone)]
pub struct GuardMetrics {
    /// Requests refused by the framing check.
    pub malformed: IntCounter,
    /// Request heads not finished within the header-read timeout.
    pub header_timeouts: IntCounter,
}

/// A downstream connection under the framing check and the header-read timeout.
pub struct Guarded<IO> {
    io: IO,
    framing: Framing,
    timeout: Option<Duration>,
    timer: Option<Pin<Box<Sleep>>>,
    /// Whether anything was written since the current head began (then no 408 is injected,
    /// since a response may still be streaming).
    wrote: bool,
    /// Bytes of the 408 reply still to write, once the timeout fired.
    reply: Option<usize>,
    done: bool,
    metrics: GuardMetrics,
}

impl<IO> Guarded<IO> {
    /// Wraps `io`; `h2` skips the check (ALPN chose HTTP/2).
    pub fn new(io: IO, h2: bool, timeout: Option<Duration>, metrics: GuardMetrics) -> Self {
        let framing = if h2 {
            Framing::passthrough()
        } else {
            Framing::new()
        };
        let timer = timeout
            .filter(|_| framing.in_head())
            .map(|t| Box::pin(tokio::time::sleep(t)));
        Self {
            io,
            framing,
            timeout,
            timer,
            wrote: false,
            reply: None,
            done: false,
            metrics,
        }
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> Guarded<IO> {
    fn poll_reply(&mut self, cx: &mut Context<'_>, mut sent: usize) -> Poll<io::Result<()>> {
        while sent < TIMEOUT_REPLY.len() {
            match Pin::new(&mut self.io).poll_write(cx, &TIMEOUT_REPLY[sent..]) {
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => break,
                Poll::Ready(Ok(n)) => sent += n,
                Poll::Pending => {
                    self.reply = Some(sent);
                    return Poll::Pending;
                }
            }
        }
        self.reply = None;
        self.done = true;
        let _ = Pin::new(&mut self.io).poll_flush(cx);
        Poll::Ready(Ok(()))
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncRead for Guarded<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(sent) = this.reply {
            return this.poll_reply(cx, sent);
        }
        if this.done {
            // End of stream for hyper: the connection is over.
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let (fine, violation) = this.framing.feed(&buf.filled()[before..]);
                if violation.is_some() {
                    this.metrics.malformed.inc();
                    buf.set_filled(before + fine);
                    buf.put_slice(b"\0");
                    this.timer = None;
                    return Poll::Ready(Ok(()));
                }
                match (this.framing.in_head(), &this.timer, this.timeout) {
                    (true, None, Some(t)) => {
                        this.wrote = false;
                        this.timer = Some(Box::pin(tokio::time::sleep(t)));
                    }
                    (false, Some(_), _) => this.timer = None,
                    _ => {}
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                let fired = this
                    .timer
                    .as_mut()
                    .is_some_and(|t| t.as_mut().poll(cx).is_ready());
                if !fired {
                    return Poll::Pending;
                }
                this.timer = None;
                this.metrics.header_timeouts.inc();
                if this.wrote {
                    this.done = true;
                    return Poll::Ready(Ok(()));
                }
                this.poll_reply(cx, 0)
            }
            other => other,
        }
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Guarded<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.wrote = true;
        Pin::new(&mut this.io).poll_write(cx, data)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.wrote = true;
        Pin::new(&mut this.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

use std::future::Future as _;

#[cfg(test)]
mod tests {
    use super::*;

    fn check(input: &[u8]) -> Option<Violation> {
        let mut f = Framing::new();
        f.feed(input).1
    }

    #[test]
    fn well_formed_messages_pass_however_they_are_split() {
        let stream = b"\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n\
POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello\
POST /y HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n0\r\nx-t: 1\r\n\r\n\
GET /z HTTP/1.0\r\n\r\n";
        for split in 0..stream.len() {
            let mut f = Framing::new();
            assert_eq!(f.feed(&stream[..split]), (split, None), "split {split}");
            assert_eq!(f.feed(&stream[split..]), (stream.len() - split, None));
            assert!(!f.in_head(), "idle between requests");
        }
    }

    #[test]
    fn violations_stop_at_the_offending_byte() {
        let cases: &[(&[u8], Violation, usize)] = &[
            (
                b"GET / HTTP/1.1\nHost: a\r\n\r\n",
                Violation::BareLineEnd,
                14,
            ),
            (
                b"GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n",
                Violation::Folding,
                25,
            ),
            (
                b"GET / HTTP/1.1\r\nHost : a\r\n\r\n",
                Violation::Folding,
                20,
            ),
            (b"GET /\r\n", Violation::Version, 5),
            (b"GET / HTTP/2.0\r\n", Violation::Version, 14),
            (
                b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n",
                Violation::ContentLength,
                53,
            ),
            (
                b"GET / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
                Violation::TransferEncoding,
                64,
            ),
            (
                b"GET / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
                Violation::TransferEncoding,
                49,
            ),
            (
                b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
                Violation::ChunkSize,
                47,
            ),
            (
                b"GET / HTTP/1.1\r\nX: a\x01b\r\n\r\n",
                Violation::InvalidByte,
                20,
            ),
        ];
        for (input, violation, at) in cases {
            let mut f = Framing::new();
            assert_eq!(
                f.feed(input),
                (*at, Some(*violation)),
                "{}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn the_http2_preface_turns_the_check_off() {
        let mut f = Framing::new();
        let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\x12\x04";
        assert_eq!(f.feed(preface), (preface.len(), None));
        assert_eq!(
            check(b"GET / HTTP/1.1\r\n\r\nPRI * HTTP/2.0\r\n"),
            Some(Violation::Version)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_head_gets_408_and_the_connection_ends() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (client, server) = tokio::io::duplex(1024);
        let metrics = GuardMetrics {
            malformed: IntCounter::new("m", "m").unwrap(),
            header_timeouts: IntCounter::new("t", "t").unwrap(),
        };
        let mut guarded = Guarded::new(
            server,
            false,
            Some(Duration::from_secs(10)),
            metrics.clone(),
        );
        let (mut read, mut write) = tokio::io::split(client);
        write.write_all(b"GET / HTTP/1.1\r\nHost:").await.unwrap();
        let mut buf = [0u8; 64];
        let n = guarded.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"GET / HTTP/1.1\r\nHost:");
        let start = tokio::time::Instant::now();
        assert_eq!(guarded.read(&mut buf).await.unwrap(), 0);
        assert_eq!(start.elapsed(), Duration::from_secs(10));
        assert_eq!(metrics.header_timeouts.get(), 1);
        drop(guarded);
        let mut answer = Vec::new();
        read.read_to_end(&mut answer).await.unwrap();
        assert!(
            answer.starts_with(b"HTTP/1.1 408 "),
            "{}",
            String::from_utf8_lossy(&answer)
        );
    }
}
