//! The one error type of the data path and the one place errors become HTTP responses.
//!
//! Every local reply the proxy makes is a [`ProxyError`]; its [`ErrorKind`] decides the status code,
//! the `x-outrigger-error` reason header and the metric label, so the three never disagree. The
//! response is generic over its body (anything made from bytes), so this module depends on no
//! other module of the crate and every layer can use it.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};

/// Boxed error from a library we call.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Name of the header that carries the reason of a local reply.
pub const REASON_HEADER: &str = "x-outrigger-error";

/// Why the proxy answered a request itself instead of relaying the upstream's answer.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// No route of the listener matched the request.
    #[error("no route matched the request")]
    NoRoute,
    /// No connection to any endpoint could be made; nothing was sent, so a retry is safe.
    #[error("connecting to the upstream failed: {0}")]
    UpstreamConnect(#[source] BoxError),
    /// The HTTP/2 upstream refused the stream before processing it; a retry is safe.
    #[error("the upstream refused the stream: {0}")]
    RefusedStream(#[source] BoxError),
    /// The upstream closed or reset the exchange after the request was (perhaps partly) sent.
    #[error("the upstream reset the request: {0}")]
    UpstreamReset(#[source] BoxError),
    /// The upstream did not answer in time (a per-try or the route timeout).
    #[error("the upstream did not answer in time")]
    Timeout,
    /// The proxy refused the request to protect itself (load shedding).
    #[error("overloaded")]
    Overloaded,
    /// The circuit breaker of the cluster (or of every endpoint) is open.
    #[error("the circuit to the upstream is open")]
    CircuitOpen,
    /// The cluster's or route's concurrency cap and queue are full.
    #[error("the bulkhead is full")]
    BulkheadFull,
    /// The route's rate limit refused the request.
    #[error("rate limited; retry after {retry_after:?}")]
    RateLimited {
        /// When a request with the same key would be admitted.
        retry_after: std::time::Duration,
        /// The limit's burst size, for `ratelimit-limit`.
        limit: u32,
    },
    /// Fault injection aborted the request with this status.
    #[error("fault injected: {0}")]
    Fault(StatusCode),
    /// The deadline the caller sent (`x-outrigger-deadline-ms`, `grpc-timeout`) passed; says
    /// nothing about the upstream's health.
    #[error("the caller's deadline passed")]
    DeadlineExceeded,
    /// The client's request body failed while it was being sent upstream.
    #[error("the client's request body failed: {0}")]
    ClientAbort(#[source] BoxError),
    /// The request body is larger than the route allows.
    #[error("the request body is larger than {0} bytes")]
    BodyTooLarge(u64),
    /// The client's verified identity is not allowed on this route.
    #[error("the client's identity is not allowed here")]
    Forbidden,
    /// The request is well-formed but asks for something this proxy never does (absolute-form
    /// target, CONNECT): it is not an open proxy.
    #[error("the request form is not accepted: {0}")]
    NotAccepted(&'static str),
}

/// The classes of local reply; each has a status, a reason and a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// See [`ProxyError::NoRoute`].
    NoRoute,
    /// See [`ProxyError::UpstreamConnect`].
    UpstreamConnect,
    /// See [`ProxyError::UpstreamReset`] and [`ProxyError::RefusedStream`].
    UpstreamReset,
    /// See [`ProxyError::Timeout`].
    Timeout,
    /// See [`ProxyError::Overloaded`].
    Overloaded,
    /// See [`ProxyError::CircuitOpen`].
    CircuitOpen,
    /// See [`ProxyError::BulkheadFull`].
    BulkheadFull,
    /// See [`ProxyError::RateLimited`].
    RateLimited,
    /// See [`ProxyError::Fault`].
    FaultInjected,
    /// See [`ProxyError::DeadlineExceeded`].
    DeadlineExceeded,
    /// See [`ProxyError::ClientAbort`].
    ClientAbort,
    /// See [`ProxyError::BodyTooLarge`].
    BodyTooLarge,
    /// See [`ProxyError::Forbidden`].
    Forbidden,
    /// See [`ProxyError::NotAccepted`].
    NotAccepted,
}

impl ErrorKind {
    /// Every kind, in the order of their `index`.
    pub const ALL: [ErrorKind; 14] = [
        ErrorKind::NoRoute,
        ErrorKind::UpstreamConnect,
        ErrorKind::UpstreamReset,
        ErrorKind::Timeout,
        ErrorKind::Overloaded,
        ErrorKind::CircuitOpen,
        ErrorKind::BulkheadFull,
        ErrorKind::RateLimited,
        ErrorKind::FaultInjected,
        ErrorKind::DeadlineExceeded,
        ErrorKind::ClientAbort,
        ErrorKind::BodyTooLarge,
        ErrorKind::Forbidden,
        ErrorKind::NotAccepted,
    ];

    /// The reason string used in the response header, logs and metric labels.
    pub const fn reason(self) -> &'static str {
        match self {
            ErrorKind::NoRoute => "no_route",
            ErrorKind::UpstreamConnect => "upstream_connect",
            ErrorKind::UpstreamReset => "upstream_reset",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Overloaded => "overloaded",
            ErrorKind::CircuitOpen => "circuit_open",
            ErrorKind::BulkheadFull => "bulkhead_full",
            ErrorKind::RateLimited => "rate_limited",
            ErrorKind::FaultInjected => "fault_injected",
            ErrorKind::DeadlineExceeded => "deadline_exceeded",
            ErrorKind::ClientAbort => "client_abort",
            ErrorKind::BodyTooLarge => "body_too_large",
            ErrorKind::Forbidden => "forbidden",
            ErrorKind::NotAccepted => "not_accepted",
        }
    }

    /// The `grpc-message` of the reply to a gRPC call: what happened, in words (no byte that
    /// gRPC's percent-encoding would have to escape).
    pub const fn grpc_message(self) -> &'static str {
        match self {
            ErrorKind::NoRoute => "outrigger: no route matched the call",
            ErrorKind::UpstreamConnect => "outrigger: connecting to the upstream failed",
            ErrorKind::UpstreamReset => "outrigger: the upstream reset the call",
            ErrorKind::Timeout => "outrigger: the upstream did not answer in time",
            ErrorKind::Overloaded => "outrigger: overloaded",
            ErrorKind::CircuitOpen => "outrigger: the circuit to the upstream is open",
            ErrorKind::BulkheadFull => "outrigger: the bulkhead is full",
            ErrorKind::RateLimited => "outrigger: rate limited",
            ErrorKind::FaultInjected => "outrigger: fault injected",
            ErrorKind::DeadlineExceeded => "outrigger: the caller's deadline passed",
            ErrorKind::ClientAbort => "outrigger: the request body failed",
            ErrorKind::BodyTooLarge => "outrigger: the request body is too large",
            ErrorKind::Forbidden => "outrigger: the caller's identity is not allowed here",
            ErrorKind::NotAccepted => "outrigger: the request form is not accepted",
        }
    }

    /// The status code of the local reply (an injected fault may choose another).
    pub const fn status(self) -> StatusCode {
        match self {
            ErrorKind::NoRoute => StatusCode::NOT_FOUND,
            ErrorKind::UpstreamConnect
            | ErrorKind::Overloaded
            | ErrorKind::CircuitOpen
            | ErrorKind::BulkheadFull
            | ErrorKind::FaultInjected => StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::UpstreamReset => StatusCode::BAD_GATEWAY,
            ErrorKind::Timeout | ErrorKind::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
            ErrorKind::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            ErrorKind::ClientAbort | ErrorKind::NotAccepted => StatusCode::BAD_REQUEST,
            ErrorKind::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorKind::Forbidden => StatusCode::FORBIDDEN,
        }
    }

    /// The gRPC status of the reply to a gRPC call, as gRPC clients expect it: a timeout is
    /// `DEADLINE_EXCEEDED` (not the `UNAVAILABLE` an HTTP 504 becomes, which invites a retry),
    /// the proxy's own refusals for capacity are `UNAVAILABLE` or `RESOURCE_EXHAUSTED`.
    pub const fn grpc_code(self) -> u32 {
        match self {
            ErrorKind::Timeout | ErrorKind::DeadlineExceeded => GRPC_DEADLINE_EXCEEDED,
            ErrorKind::RateLimited | ErrorKind::BodyTooLarge => GRPC_RESOURCE_EXHAUSTED,
            ErrorKind::UpstreamConnect
            | ErrorKind::UpstreamReset
            | ErrorKind::Overloaded
            | ErrorKind::CircuitOpen
            | ErrorKind::BulkheadFull => GRPC_UNAVAILABLE,
            ErrorKind::NoRoute => GRPC_UNIMPLEMENTED,
            ErrorKind::Forbidden => GRPC_PERMISSION_DENIED,
            ErrorKind::ClientAbort => GRPC_CANCELLED,
            ErrorKind::NotAccepted => GRPC_INTERNAL,
            ErrorKind::FaultInjected => grpc_code_of_status(StatusCode::SERVICE_UNAVAILABLE),
        }
    }

    /// Position in [`ErrorKind::ALL`], for arrays of pre-resolved metric handles.
    pub const fn index(self) -> usize {
        self as usize
    }
}

impl ProxyError {
    /// The class of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            ProxyError::NoRoute => ErrorKind::NoRoute,
            ProxyError::UpstreamConnect(_) => ErrorKind::UpstreamConnect,
            ProxyError::UpstreamReset(_) | ProxyError::RefusedStream(_) => ErrorKind::UpstreamReset,
            ProxyError::Timeout => ErrorKind::Timeout,
            ProxyError::Overloaded => ErrorKind::Overloaded,
            ProxyError::CircuitOpen => ErrorKind::CircuitOpen,
            ProxyError::BulkheadFull => ErrorKind::BulkheadFull,
            ProxyError::RateLimited { .. } => ErrorKind::RateLimited,
            ProxyError::Fault(_) => ErrorKind::FaultInjected,
            ProxyError::DeadlineExceeded => ErrorKind::DeadlineExceeded,
            ProxyError::ClientAbort(_) => ErrorKind::ClientAbort,
            ProxyError::BodyTooLarge(_) => ErrorKind::BodyTooLarge,
            ProxyError::Forbidden => ErrorKind::Forbidden,
            ProxyError::NotAccepted(_) => ErrorKind::NotAccepted,
        }
    }

    /// The local reply to a gRPC call: trailers-only (HTTP 200 with `grpc-status` and
    /// `grpc-message` in the headers and no body), which is what gRPC clients read a status
    /// from. `x-outrigger-error` and the rate-limit headers are kept.
    pub fn into_grpc_response<B: From<Bytes>>(self) -> Response<B> {
        let kind = self.kind();
        let code = match &self {
            ProxyError::Fault(status) => grpc_code_of_status(*status),
            _ => kind.grpc_code(),
        };
        let mut resp = self.into_response::<B>();
        *resp.status_mut() = StatusCode::OK;
        *resp.body_mut() = B::from(Bytes::new());
        let headers = resp.headers_mut();
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        headers.insert(GRPC_STATUS, HeaderValue::from(code));
        headers.insert(GRPC_MESSAGE, HeaderValue::from_static(kind.grpc_message()));
        resp
    }

    /// The well-formed local reply for this error.
    pub fn into_response<B: From<Bytes>>(self) -> Response<B> {
        let mut resp = local_reply(self.kind());
        match self {
            ProxyError::Fault(status) => *resp.status_mut() = status,
            ProxyError::RateLimited { retry_after, limit } => {
                let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
                let h = resp.headers_mut();
                h.insert(http::header::RETRY_AFTER, HeaderValue::from(secs));
                h.insert(RATELIMIT_LIMIT, HeaderValue::from(limit));
                h.insert(RATELIMIT_REMAINING, HeaderValue::from(0u32));
                h.insert(RATELIMIT_RESET, HeaderValue::from(secs));
            }
            _ => {}
        }
        resp
    }
}

/// gRPC's `CANCELLED`.
pub const GRPC_CANCELLED: u32 = 1;
/// gRPC's `DEADLINE_EXCEEDED`.
pub const GRPC_DEADLINE_EXCEEDED: u32 = 4;
/// gRPC's `PERMISSION_DENIED`.
pub const GRPC_PERMISSION_DENIED: u32 = 7;
/// gRPC's `RESOURCE_EXHAUSTED`.
pub const GRPC_RESOURCE_EXHAUSTED: u32 = 8;
/// gRPC's `UNIMPLEMENTED`.
pub const GRPC_UNIMPLEMENTED: u32 = 12;
/// gRPC's `INTERNAL`.
pub const GRPC_INTERNAL: u32 = 13;
/// gRPC's `UNAVAILABLE`.
pub const GRPC_UNAVAILABLE: u32 = 14;
/// gRPC's `UNKNOWN`.
pub const GRPC_UNKNOWN: u32 = 2;
/// gRPC's `UNAUTHENTICATED`.
pub const GRPC_UNAUTHENTICATED: u32 = 16;

const GRPC_STATUS: http::HeaderName = http::HeaderName::from_static("grpc-status");
const GRPC_MESSAGE: http::HeaderName = http::HeaderName::from_static("grpc-message");

/// The gRPC status for an HTTP status, as gRPC's own HTTP-to-gRPC mapping has it (used for an
/// injected abort, whose status the operator chose).
pub const fn grpc_code_of_status(status: StatusCode) -> u32 {
    match status.as_u16() {
        400 => GRPC_INTERNAL,
        401 => GRPC_UNAUTHENTICATED,
        403 => GRPC_PERMISSION_DENIED,
        404 => GRPC_UNIMPLEMENTED,
        429 | 502 | 503 | 504 => GRPC_UNAVAILABLE,
        _ => GRPC_UNKNOWN,
    }
}

/// `RateLimit-Limit` (IETF draft-ietf-httpapi-ratelimit-headers): the burst size of the limit.
pub const RATELIMIT_LIMIT: http::HeaderName = http::HeaderName::from_static("ratelimit-limit");
/// `RateLimit-Remaining`: requests that would be admitted right now.
pub const RATELIMIT_REMAINING: http::HeaderName =
    http::HeaderName::from_static("ratelimit-remaining");
/// `RateLimit-Reset`: seconds until the limit is fully replenished.
pub const RATELIMIT_RESET: http::HeaderName = http::HeaderName::from_static("ratelimit-reset");

/// Builds the response for `kind`: its status, the reason header, and the reason as a text body.
pub fn local_reply<B: From<Bytes>>(kind: ErrorKind) -> Response<B> {
    let body = Bytes::from_static(match kind {
        ErrorKind::NoRoute => b"no_route\n",
        ErrorKind::UpstreamConnect => b"upstream_connect\n",
        ErrorKind::UpstreamReset => b"upstream_reset\n",
        ErrorKind::Timeout => b"timeout\n",
        ErrorKind::Overloaded => b"overloaded\n",
        ErrorKind::CircuitOpen => b"circuit_open\n",
        ErrorKind::BulkheadFull => b"bulkhead_full\n",
        ErrorKind::RateLimited => b"rate_limited\n",
        ErrorKind::FaultInjected => b"fault_injected\n",
        ErrorKind::DeadlineExceeded => b"deadline_exceeded\n",
        ErrorKind::ClientAbort => b"client_abort\n",
        ErrorKind::BodyTooLarge => b"body_too_large\n",
        ErrorKind::Forbidden => b"forbidden\n",
        ErrorKind::NotAccepted => b"not_accepted\n",
    });
    let mut resp = Response::new(B::from(body));
    *resp.status_mut() = kind.status();
    let headers = resp.headers_mut();
    headers.insert(REASON_HEADER, HeaderValue::from_static(kind.reason()));
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_index_their_own_position() {
        for (i, k) in ErrorKind::ALL.iter().enumerate() {
            assert_eq!(k.index(), i);
        }
    }

    #[test]
    fn grpc_replies_are_trailers_only_with_the_mapped_code() {
        let cases = [
            (ProxyError::Timeout, 4),
            (ProxyError::DeadlineExceeded, 4),
            (
                ProxyError::RateLimited {
                    retry_after: std::time::Duration::from_millis(1500),
                    limit: 5,
                },
                8,
            ),
            (ProxyError::CircuitOpen, 14),
            (ProxyError::BulkheadFull, 14),
            (ProxyError::Overloaded, 14),
            (ProxyError::UpstreamConnect("refused".into()), 14),
            (ProxyError::UpstreamReset("reset".into()), 14),
            (ProxyError::NoRoute, 12),
            (ProxyError::Forbidden, 7),
            (ProxyError::Fault(StatusCode::NOT_FOUND), 12),
            (ProxyError::Fault(StatusCode::INTERNAL_SERVER_ERROR), 2),
        ];
        for (e, code) in cases {
            let reason = e.kind().reason();
            let r: Response<Bytes> = e.into_grpc_response();
            assert_eq!(r.status(), StatusCode::OK);
            assert!(r.body().is_empty(), "trailers-only: no body");
            assert_eq!(r.headers()["content-type"], "application/grpc");
            assert_eq!(r.headers()["grpc-status"], code.to_string().as_str());
            assert_eq!(r.headers()[REASON_HEADER], reason);
            let msg = r.headers()["grpc-message"].to_str().unwrap();
            assert!(msg.bytes().all(|b| (0x20..0x7f).contains(&b) && b != b'%'));
        }
    }

    #[test]
    fn local_reply_carries_status_and_reason() {
        let r: Response<Bytes> = local_reply(ErrorKind::Timeout);
        assert_eq!(r.status(), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(r.headers()[REASON_HEADER], "timeout");
    }
}
