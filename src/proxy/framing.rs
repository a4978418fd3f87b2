//! A strict HTTP/1.1 framing check that runs on the bytes of a downstream connection before the
//! HTTP/1 server ([`downstream`](crate::proxy::downstream), or hyper's over TLS without ALPN)
//! parses them, and the header-read timeout that answers slow clients with 408.
//!
//! Parsers are lenient where RFC 9112 allows it (a bare LF ends a line; hyper merges duplicate
//! identical `Content-Length` headers), and lenient is how requests get smuggled past the
//! proxy in front of us or the service behind us. [`Framing`] follows the message boundaries
//! itself (head, then a `Content-Length` or chunked body) and stops at the first byte that makes a
//! message ambiguous or malformed: a bare CR or LF, obs-fold, a control byte in a header, a space
//! before a colon, `Content-Length` twice or together with `Transfer-Encoding`, a transfer coding
//! other than `chunked`, `Host` twice or missing from an HTTP/1.1 request, a bad chunk size,
//! HTTP/0.9, or a version other than 1.0 and 1.1.
//!
//! [`Guarded`] wraps the connection: it hands the server every byte up to the offending one and
//! then a NUL, which no HTTP/1 parser accepts at any position, so the server answers `400` once the
//! responses already owed are written, and closes. Nothing of the bad message reaches an upstream
//! as a request; a bad chunk inside a body fails that body, and the request with it.
//!
//! HTTP/2 connections (ALPN `h2` or the prior-knowledge preface) pass through unchecked: h2 frames
//! carry their own lengths and hyper's h2 codec validates them.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

use crate::telemetry::metrics::GuardMetrics;

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
    Host,
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
    /// `Host` more than once, so which one names the server is ambiguous, or missing from an
    /// HTTP/1.1 request (RFC 9112 §3.2 requires a 400 for both).
    Host,
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
    hosts: u32,
    trailers: bool,
    chunk: u64,
    digits: u32,
    head_bytes: bool,
    /// Bytes fed so far.
    offset: u64,
    /// Where the head being read began (its first byte after the previous message).
    head_pos: Option<u64>,
}

impl Default for Framing {
    fn default() -> Self {
        Self::new()
    }
}

/// Token characters of RFC 9110 §5.6.2, as a table.
const TCHAR: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        t[b] = c.is_ascii_alphanumeric()
            || matches!(
                c,
                b'!' | b'#'
                    | b'$'
                    | b'%'
                    | b'&'
                    | b'\''
                    | b'*'
                    | b'+'
                    | b'-'
                    | b'.'
                    | b'^'
                    | b'_'
                    | b'`'
                    | b'|'
                    | b'~'
            );
        b += 1;
    }
    t
};

fn is_tchar(b: u8) -> bool {
    TCHAR[usize::from(b)]
}

/// The index of the first byte of `bytes` that may not appear in a field value (a control byte
/// other than tab, or DEL). Eight bytes at a time: heads are mostly values.
fn first_ctl(bytes: &[u8]) -> Option<usize> {
    const ONES: u64 = u64::from_ne_bytes([1; 8]);
    const HIGH: u64 = ONES * 0x80;
    let mut i = 0;
    while let Some(chunk) = bytes.get(i..i + 8) {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let x = u64::from_ne_bytes(word);
        // Some byte is below 0x20 (high bytes, obs-text, are excluded by `!x`)...
        let below = x.wrapping_sub(ONES * 0x20) & !x & HIGH;
        // ...or is 0x7f.
        let del = x ^ (ONES * 0x7f);
        let del = del.wrapping_sub(ONES) & !del & HIGH;
        if below | del != 0 {
            break;
        }
        i += 8;
    }
    bytes[i..]
        .iter()
        .position(|&b| !is_value_byte(b))
        .map(|p| i + p)
}

/// Field-value bytes: visible ASCII, space, tab and obs-text.
fn is_value_byte(b: u8) -> bool {
    (b >= 0x20 && b != 0x7f) || b == b'\t'
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
            hosts: 0,
            trailers: false,
            chunk: 0,
            digits: 0,
            head_bytes: false,
            offset: 0,
            head_pos: None,
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
        let fed = self.feed_inner(data);
        self.offset += data.len() as u64;
        fed
    }

    /// Where the request head now being read began, as an offset into everything fed: the
    /// start of an incomplete head, or of the head a violation was found in. `None` inside a
    /// body or between requests.
    pub fn head_start(&self) -> Option<u64> {
        self.head_pos
    }

    fn feed_inner(&mut self, data: &[u8]) -> (usize, Option<Violation>) {
        let base = self.offset;
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
                // A whole ordinary header line in this chunk is checked as a slice; anything
                // unusual (the framing headers, an error) takes the byte-wise path, which is
                // what decides the exact offset of a violation.
                State::LineStart => match plain_header_line(&data[i..]) {
                    Some((len, Field::Other)) => {
                        i += len;
                        continue;
                    }
                    // The first `Host` of a head counts; a trailer's is not looked at. A
                    // second one is refused where the byte-wise path finds it.
                    Some((len, Field::Host)) if self.trailers || self.hosts == 0 => {
                        if !self.trailers {
                            self.hosts = 1;
                        }
                        i += len;
                        continue;
                    }
                    _ => {}
                },
                // A whole ordinary request line (every request has one) is checked as a slice.
                State::Start => {
                    if let Some(len) = self.request_line(&data[i..]) {
                        if self.head_pos.is_none() {
                            self.head_pos = Some(base + i as u64);
                        }
                        i += len;
                        continue;
                    }
                }
                // Header values and targets are most of a head: skip their ordinary bytes in bulk.
                State::Value if self.field == Field::Other => {
                    let skip = first_ctl(&data[i..]).unwrap_or(data.len() - i);
                    if skip > 0 {
                        i += skip;
                        continue;
                    }
                }
                State::Target if self.word_len > 0 => {
                    let skip = data[i..]
                        .iter()
                        .position(|&b| !(0x21..=0x7e).contains(&b))
                        .unwrap_or(data.len() - i);
                    if skip > 0 {
                        // Only the length matters past the first byte (the `*` check).
                        self.word_len = self.word_len.saturating_add(skip);
                        i += skip;
                        continue;
                    }
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
            if self.state == State::Start && self.head_pos.is_none() {
                self.head_pos = Some(base + i as u64);
            }
            if let Err(v) = self.byte(data[i]) {
                self.state = State::Passthrough;
                return (i, Some(v));
            }
            i += 1;
        }
        (data.len(), None)
    }

    /// The length of the request line at the start of `rest`, if it is whole and ordinary: a
    /// token method, a target of visible bytes, `HTTP/1.1` or `HTTP/1.0`, CRLF. The state is
    /// then what the byte-wise path leaves after that line; anything else takes that path.
    fn request_line(&mut self, rest: &[u8]) -> Option<usize> {
        let sp = rest.iter().position(|&b| !is_tchar(b))?;
        if sp == 0 || rest[sp] != b' ' {
            return None;
        }
        let at = sp + 1;
        let len = rest[at..]
            .iter()
            .position(|&b| !(0x21..=0x7e).contains(&b))?;
        if len == 0 || rest[at + len] != b' ' {
            return None;
        }
        let version = at + len + 1;
        self.http10 = match rest.get(version..version + 10)? {
            b"HTTP/1.1\r\n" => false,
            b"HTTP/1.0\r\n" => true,
            _ => return None,
        };
        self.head_bytes = true;
        self.pri = &rest[..sp] == b"PRI";
        self.star = &rest[at..at + len] == b"*";
        self.word_len = 0;
        self.state = State::LineStart;
        Some(version + 10)
    }

    fn message_done(&mut self) -> State {
        self.head_pos = None;
        self.first = false;
        self.head_bytes = false;
        self.trailers = false;
        self.content_length = None;
        self.lengths = 0;
        self.chunked = false;
        self.encodings = 0;
        self.hosts = 0;
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
                            self.head_pos = None;
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
                    if matches!(self.field, Field::ContentLength | Field::TransferEncoding)
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
            (4, b"host") => Field::Host,
            _ => Field::Other,
        }
    }

    fn header_done(&mut self) -> Result<(), Violation> {
        let value = trim(&self.value[..self.value_len]);
        match self.field {
            Field::Other => {}
            Field::Host => {
                self.hosts += 1;
                if self.hosts > 1 {
                    return Err(Violation::Host);
                }
            }
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
        if self.hosts == 0 && !self.http10 {
            return Err(Violation::Host);
        }
        self.head_pos = None;
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

/// The length (LF included) of the header line at the start of `rest` and what it is about, if
/// it is whole, ends in CRLF, and is a well-formed field: a token name, a colon, and value
/// bytes, with a name other than `Content-Length` and `Transfer-Encoding` (whose values the
/// byte-wise path reads).
fn plain_header_line(rest: &[u8]) -> Option<(usize, Field)> {
    let colon = rest.iter().position(|&b| !is_tchar(b))?;
    if colon == 0 || rest[colon] != b':' {
        return None;
    }
    let name = &rest[..colon];
    let field = if name.eq_ignore_ascii_case(b"host") {
        Field::Host
    } else if name.eq_ignore_ascii_case(b"content-length")
        || name.eq_ignore_ascii_case(b"transfer-encoding")
    {
        return None;
    } else {
        Field::Other
    };
    let end = colon + 1 + first_ctl(&rest[colon + 1..])?;
    (rest.get(end..end + 2) == Some(b"\r\n")).then_some((end + 2, field))
}

fn trim(v: &[u8]) -> &[u8] {
    let end = v
        .iter()
        .rposition(|b| *b != b' ' && *b != b'\t')
        .map_or(0, |p| p + 1);
    &v[..end]
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
    /// An incomplete request head, held back until it is whole and checked, so that the
    /// server never sees part of a head that turns out to be bad.
    held: Vec<u8>,
    /// Stream offset of `held[0]`.
    held_at: u64,
    /// Bytes at the front of `held` that are checked and may be handed on.
    ready: usize,
    /// A violation was found: after the bytes before it, the server gets a NUL.
    reject: bool,
    /// The most head bytes held; past it they go to the server, whose own limit answers 431.
    max_head: usize,
    done: bool,
    metrics: GuardMetrics,
    /// Set once the proxy relayed a `101`: what follows is another protocol's bytes, which
    /// the check must pass untouched.
    switched: Arc<AtomicBool>,
}

impl<IO> Guarded<IO> {
    /// Wraps `io`; `h2` skips the check (ALPN chose HTTP/2).
    pub fn new(
        io: IO,
        h2: bool,
        timeout: Option<Duration>,
        max_head: usize,
        metrics: GuardMetrics,
    ) -> Self {
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
            held: Vec::new(),
            held_at: 0,
            ready: 0,
            reject: false,
            max_head,
            done: false,
            metrics,
            switched: Arc::new(AtomicBool::new(false)),
        }
    }

    /// The flag that turns the check off for good once the connection switched protocols.
    pub fn switch(&self) -> Arc<AtomicBool> {
        self.switched.clone()
    }
}

/// A downstream stream whose waiting bytes can be looked at without taking them, so that the
/// HTTP/2 preface can be told from an HTTP/1 request before a server is chosen (taking them and
/// handing them back would cost every connection a second read and a larger read buffer).
pub trait Peek {
    /// Copies the bytes waiting to be read into `buf` and leaves them to be read; `None` when
    /// this kind of stream cannot (TLS: the bytes are only known once decrypted).
    fn poll_peek(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Option<Poll<io::Result<usize>>>;
}

impl Peek for tokio::net::TcpStream {
    fn poll_peek(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Option<Poll<io::Result<usize>>> {
        Some(tokio::net::TcpStream::poll_peek(self, cx, buf))
    }
}

impl<IO> Peek for tokio_rustls::server::TlsStream<IO> {
    fn poll_peek(
        &mut self,
        _: &mut Context<'_>,
        _: &mut ReadBuf<'_>,
    ) -> Option<Poll<io::Result<usize>>> {
        None
    }
}

impl<IO: Peek> Peek for Guarded<IO> {
    /// Also keeps the header-read timeout: once it fires, the peek reports the end of the
    /// stream, so that the HTTP/1 server reads and this wrapper answers it with `408`.
    fn poll_peek(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Option<Poll<io::Result<usize>>> {
        let peeked = self.io.poll_peek(cx, buf)?;
        let fired = peeked.is_pending()
            && self
                .timer
                .as_mut()
                .is_some_and(|t| t.as_mut().poll(cx).is_ready());
        Some(if fired { Poll::Ready(Ok(0)) } else { peeked })
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

impl<IO: AsyncRead + AsyncWrite + Unpin> Guarded<IO> {
    /// After `n` new bytes were fed (the last `n` of a stream now `framing.offset` long):
    /// whether a violation was found, and from which stream offset bytes must be held back
    /// (an incomplete head) or dropped (the head a violation is in).
    fn cut(&mut self, violation: Option<(usize, Violation)>, chunk_at: u64) -> Option<u64> {
        match violation {
            Some((at, _)) => {
                self.metrics.malformed.inc();
                self.reject = true;
                self.timer = None;
                Some(self.framing.head_start().unwrap_or(chunk_at + at as u64))
            }
            None => {
                let hold = self.framing.head_start();
                match (hold, &self.timer, self.timeout) {
                    (Some(_), None, Some(t)) if self.framing.in_head() => {
                        self.wrote = false;
                        self.timer = Some(Box::pin(tokio::time::sleep(t)));
                    }
                    (None, Some(_), _) => self.timer = None,
                    _ => {}
                }
                hold
            }
        }
    }

    fn poll_timeout(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let fired = self
            .timer
            .as_mut()
            .is_some_and(|t| t.as_mut().poll(cx).is_ready());
        if !fired {
            return Poll::Pending;
        }
        self.timer = None;
        self.metrics.header_timeouts.inc();
        if self.wrote {
            self.done = true;
            return Poll::Ready(Ok(()));
        }
        self.poll_reply(cx, 0)
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncRead for Guarded<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.framing.state != State::Passthrough && this.switched.load(Ordering::Relaxed) {
            this.framing = Framing::passthrough();
            this.timer = None;
        }
        loop {
            if let Some(sent) = this.reply {
                return this.poll_reply(cx, sent);
            }
            if this.ready > 0 {
                let n = this.ready.min(buf.remaining());
                buf.put_slice(&this.held[..n]);
                this.held.drain(..n);
                this.held_at += n as u64;
                this.ready -= n;
                return Poll::Ready(Ok(()));
            }
            if this.reject {
                // Whatever follows the bytes handed on so far, the server now sees a NUL where a
                // message must begin or continue, answers 400 and closes.
                this.reject = false;
                this.done = true;
                this.held.clear();
                if buf.remaining() > 0 {
                    buf.put_slice(b"\0");
                }
                return Poll::Ready(Ok(()));
            }
            if this.done {
                // End of stream for the server: the connection is over.
                return Poll::Ready(Ok(()));
            }
            if this.held.is_empty() {
                // The fast path: read straight into the server's buffer.
                let before = buf.filled().len();
                match Pin::new(&mut this.io).poll_read(cx, buf) {
                    Poll::Ready(Ok(())) => {
                        let n = buf.filled().len() - before;
                        if n == 0 {
                            return Poll::Ready(Ok(()));
                        }
                        let chunk_at = this.framing.offset;
                        let (fine, v) = this.framing.feed(&buf.filled()[before..]);
                        let Some(from) = this.cut(v.map(|v| (fine, v)), chunk_at) else {
                            return Poll::Ready(Ok(()));
                        };
                        let keep = (from.saturating_sub(chunk_at) as usize).min(n);
                        if !this.reject {
                            this.held.extend_from_slice(&buf.filled()[before + keep..]);
                            this.held_at = chunk_at + keep as u64;
                        }
                        buf.set_filled(before + keep);
                        if keep > 0 {
                            return Poll::Ready(Ok(()));
                        }
                        continue;
                    }
                    Poll::Pending => return this.poll_timeout(cx),
                    other => return other,
                }
            }
            // A head is incomplete: read more of it beside the held bytes.
            let mut scratch = [0u8; 4096];
            let mut more = ReadBuf::new(&mut scratch);
            match Pin::new(&mut this.io).poll_read(cx, &mut more) {
                Poll::Ready(Ok(())) => {
                    let data = more.filled();
                    if data.is_empty() {
                        // EOF mid-head: hand on what there is; the server reports the cut message.
                        this.ready = this.held.len();
                        this.done = this.ready == 0;
                        continue;
                    }
                    let chunk_at = this.framing.offset;
                    let (fine, v) = this.framing.feed(data);
                    this.held.extend_from_slice(data);
                    let from = this.cut(v.map(|v| (fine, v)), chunk_at);
                    let end = this.held_at + this.held.len() as u64;
                    let upto = from.unwrap_or(end).max(this.held_at);
                    if this.reject {
                        this.held.truncate((upto - this.held_at) as usize);
                    }
                    this.ready = (upto - this.held_at) as usize;
                    if this.held.len() > this.max_head {
                        // Too big to be a head we would accept: the server sees it and answers 431.
                        this.framing = Framing::passthrough();
                        this.ready = this.held.len();
                    }
                }
                Poll::Pending => return this.poll_timeout(cx),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            }
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
POST /y HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n0\r\nx-t: 1\r\n\r\n\
GET /z HTTP/1.0\r\n\r\n";
        for split in 0..stream.len() {
            let mut f = Framing::new();
            assert_eq!(f.feed(&stream[..split]), (split, None), "split {split}");
            assert_eq!(f.feed(&stream[split..]), (stream.len() - split, None));
            assert!(!f.in_head(), "idle between requests");
        }
    }

    /// The verdict on `input` fed one byte at a time, which never takes the whole-line paths.
    fn byte_wise(input: &[u8]) -> (usize, Option<Violation>) {
        let mut f = Framing::new();
        for (i, b) in input.iter().enumerate() {
            if let (_, Some(v)) = f.feed(std::slice::from_ref(b)) {
                return (i, Some(v));
            }
        }
        (input.len(), None)
    }

    #[test]
    fn whole_request_and_host_lines_are_judged_as_byte_by_byte() {
        let methods: [&[u8]; 4] = [b"GET", b"PRI", b"G(T", b""];
        let targets: [&[u8]; 5] = [b"/", b"*", b"/a b", b"", b"/\x7f"];
        let versions: [&[u8]; 5] = [
            b"HTTP/1.1",
            b"HTTP/1.0",
            b"HTTP/2.0",
            b"HTTP/1.1x",
            b"HTTP/1.",
        ];
        let ends: [&[u8]; 3] = [b"\r\n", b"\n", b"\r"];
        let hosts: [&[u8]; 6] = [
            b"Host: a\r\n",
            b"hOsT:\r\n",
            b"Host: a\x01\r\n",
            b"Host: a\r\nHOST: b\r\n",
            b"Hosts: a\r\n",
            b"",
        ];
        let mut cases = 0;
        for m in methods {
            for t in targets {
                for v in versions {
                    for e in ends {
                        for h in hosts {
                            let mut input = Vec::new();
                            for part in [
                                m,
                                b" ",
                                t,
                                b" ",
                                v,
                                e,
                                h,
                                b"\r\n",
                                b"GET / HTTP/1.0\r\n\r\n",
                            ] {
                                input.extend_from_slice(part);
                            }
                            let mut f = Framing::new();
                            assert_eq!(
                                f.feed(&input),
                                byte_wise(&input),
                                "{}",
                                String::from_utf8_lossy(&input)
                            );
                            cases += 1;
                        }
                    }
                }
            }
        }
        assert_eq!(cases, 4 * 5 * 5 * 3 * 6);
        // A host line in a chunked body's trailers is not counted as the head's.
        let chunked = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n\
0\r\nHost: b\r\n\r\nGET / HTTP/1.1\r\nHost: c\r\n\r\n";
        assert_eq!(Framing::new().feed(chunked), (chunked.len(), None));
        assert_eq!(byte_wise(chunked), (chunked.len(), None));
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
                b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
                Violation::ChunkSize,
                56,
            ),
            (b"GET / HTTP/1.1\r\nX: a\r\n\r\n", Violation::Host, 23),
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
            check(b"GET / HTTP/1.1\r\nHost: a\r\n\r\nPRI * HTTP/2.0\r\n"),
            Some(Violation::Version)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_head_gets_408_and_the_connection_ends() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (client, server) = tokio::io::duplex(1024);
        let metrics = GuardMetrics {
            malformed: prometheus::IntCounter::new("m", "m").unwrap(),
            header_timeouts: prometheus::IntCounter::new("t", "t").unwrap(),
        };
        let mut guarded = Guarded::new(
            server,
            false,
            Some(Duration::from_secs(10)),
            65536,
            metrics.clone(),
        );
        let (mut read, mut write) = tokio::io::split(client);
        write.write_all(b"GET / HTTP/1.1\r\nHost:").await.unwrap();
        // An incomplete head is held back, so hyper sees nothing of it before the timeout.
        let mut buf = [0u8; 64];
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
