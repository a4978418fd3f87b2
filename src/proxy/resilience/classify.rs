//! The one place that decides what an upstream answer means: success or which kind of failure
//! (one [`Outcome`], computed once per try and fed to the circuit breakers, outlier detection and
//! load shedding alike) and whether a try is worth repeating (for retries and hedges).
//!
//! Failures are connect errors, resets, timeouts, 5xx answers and the gRPC codes that signal a
//! sick server, read from headers or from trailers the upstream layer read ahead. A gateway-like
//! failure (502/503/504, a reset, a timeout, gRPC `unavailable` or `deadline-exceeded`) is told
//! apart from other server errors (500, gRPC `unknown`, `internal`, `data-loss`) because outlier
//! detection counts the two in separate streaks. The proxy's own refusals (open circuit, full
//! bulkhead, rate limit, shedding) say nothing about the upstream's health and are ignored.

use http::{HeaderMap, HeaderName, Method, StatusCode};

use crate::control::config::resilience::RetryOn;
use crate::error::ProxyError;
use crate::proxy::resilience::Response;
use crate::proxy::values;

/// What one try tells about the upstream's health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The upstream answered well.
    Success,
    /// A server error that is not a gateway error: 5xx other than 502–504, gRPC `unknown`,
    /// `internal` or `data-loss`.
    ServerError,
    /// 502, 503, 504, a reset, a refused stream, a timeout, gRPC `unavailable` or
    /// `deadline-exceeded`: the endpoint could not serve.
    GatewayError,
    /// No connection could be made.
    ConnectFailure,
    /// Nothing was learnt (the proxy itself refused, or the try was cancelled).
    Ignore,
}

impl Outcome {
    /// Whether the try failed because of the upstream.
    pub fn is_failure(self) -> bool {
        matches!(
            self,
            Outcome::ServerError | Outcome::GatewayError | Outcome::ConnectFailure
        )
    }
}

/// gRPC codes that count as server errors (`unknown`, `internal`, `data-loss`).
const GRPC_SERVER_ERRORS: u32 = 1 << 2 | 1 << 13 | 1 << 15;
/// gRPC codes that count as gateway errors (`deadline-exceeded`, `unavailable`).
const GRPC_GATEWAY_ERRORS: u32 = 1 << 4 | 1 << 14;

/// A gRPC status read from trailers by the upstream layer, kept on the response.
#[derive(Debug, Clone, Copy)]
pub struct TrailerStatus(pub u32);

/// Why a try is repeated; the label of the retry metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryReason {
    /// No connection could be made.
    ConnectFailure,
    /// The HTTP/2 stream was refused.
    RefusedStream,
    /// The exchange was reset.
    Reset,
    /// The per-try timeout fired.
    Timeout,
    /// A retryable status code.
    Status,
    /// A retryable gRPC code.
    Grpc,
}

/// The health signal of a try's result.
pub fn outcome(result: &Result<Response, ProxyError>) -> Outcome {
    match result {
        Ok(resp) => match resp.status().as_u16() {
            502..=504 => Outcome::GatewayError,
            500..=599 => Outcome::ServerError,
            _ => match grpc_code(resp) {
                Some(c) if c < 32 && GRPC_GATEWAY_ERRORS & (1 << c) != 0 => Outcome::GatewayError,
                Some(c) if c < 32 && GRPC_SERVER_ERRORS & (1 << c) != 0 => Outcome::ServerError,
                _ => Outcome::Success,
            },
        },
        Err(ProxyError::UpstreamConnect(_)) => Outcome::ConnectFailure,
        Err(ProxyError::RefusedStream(_) | ProxyError::UpstreamReset(_) | ProxyError::Timeout) => {
            Outcome::GatewayError
        }
        Err(_) => Outcome::Ignore,
    }
}

/// Whether `method` may be sent twice without changing the outcome (RFC 9110 §9.2.2).
pub fn idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// Why `result` should be tried again under `on`, if it should. Whether the request may be sent
/// again is the caller's question: see [`RetryReason::needs_resend`].
pub fn retry_reason(on: &RetryOn, result: &Result<Response, ProxyError>) -> Option<RetryReason> {
    match result {
        Err(ProxyError::UpstreamConnect(_)) => {
            on.connect_failure.then_some(RetryReason::ConnectFailure)
        }
        Err(ProxyError::RefusedStream(_)) => {
            on.refused_stream.then_some(RetryReason::RefusedStream)
        }
        Err(ProxyError::UpstreamReset(_)) => on.reset.then_some(RetryReason::Reset),
        Err(ProxyError::Timeout) => on.timeout.then_some(RetryReason::Timeout),
        Err(_) => None,
        Ok(resp) => {
            let s = resp.status();
            let by_status = (on.status_5xx && s.is_server_error())
                || (on.gateway_error
                    && matches!(
                        s,
                        StatusCode::BAD_GATEWAY
                            | StatusCode::SERVICE_UNAVAILABLE
                            | StatusCode::GATEWAY_TIMEOUT
                    ))
                || (on.too_many_requests && s == StatusCode::TOO_MANY_REQUESTS)
                || on.statuses.contains(&s.as_u16());
            if by_status {
                return Some(RetryReason::Status);
            }
            match grpc_code(resp) {
                Some(c) if c < 32 && on.grpc_codes & (1 << c) != 0 => Some(RetryReason::Grpc),
                _ => None,
            }
        }
    }
}

impl RetryReason {
    /// Whether repeating the try sends the request a second time to an upstream that may have
    /// acted on it, which only idempotent methods (or `non_idempotent: true`) allow. A connect
    /// failure or a refused stream sent nothing; a gRPC code the operator listed is the
    /// service's own statement that the call may be repeated, as in gRPC's retry design (every
    /// gRPC call is a POST).
    pub fn needs_resend(self) -> bool {
        matches!(
            self,
            RetryReason::Reset | RetryReason::Timeout | RetryReason::Status
        )
    }
}

/// The gRPC status of a response, from its headers (trailers-only answers) or from trailers the
/// upstream layer read ahead.
pub fn grpc_code(resp: &Response) -> Option<u32> {
    header_grpc_code(resp.headers())
        .or_else(|| resp.extensions().get::<TrailerStatus>().map(|t| t.0))
}

/// The name, made once: a lookup by string parses and lower-cases it every time, and this one
/// runs several times for every answer (each layer classifies it).
const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");

/// The `grpc-status` in a header map.
pub fn header_grpc_code(headers: &HeaderMap) -> Option<u32> {
    values::find(headers, &GRPC_STATUS)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

/// Whether a message is gRPC, by its content type.
pub fn is_grpc(headers: &HeaderMap) -> bool {
    values::find(headers, &http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::config::resilience::RetryConfig;
    use crate::proxy::body::ProxyBody;

    fn resp(status: u16, grpc: Option<&str>) -> Result<Response, ProxyError> {
        let mut r = http::Response::new(ProxyBody::Full(None));
        *r.status_mut() = StatusCode::from_u16(status).unwrap();
        if let Some(g) = grpc {
            r.headers_mut().insert("grpc-status", g.parse().unwrap());
        }
        Ok(r)
    }

    fn r_trailer_unavailable() -> Response {
        let mut r = resp(200, None).unwrap();
        r.extensions_mut().insert(TrailerStatus(14));
        r
    }

    #[test]
    fn default_policy_retries_gateway_errors_and_says_which_need_a_resend() {
        let on = RetryConfig::default().on;
        let status = retry_reason(&on, &resp(503, None));
        assert_eq!(status, Some(RetryReason::Status));
        assert!(status.is_some_and(RetryReason::needs_resend));
        assert_eq!(retry_reason(&on, &resp(500, None)), None);
        assert_eq!(retry_reason(&on, &resp(200, None)), None);
        let refused: Result<Response, ProxyError> = Err(ProxyError::UpstreamConnect("x".into()));
        let connect = retry_reason(&on, &refused);
        assert_eq!(connect, Some(RetryReason::ConnectFailure));
        assert!(!connect.is_some_and(RetryReason::needs_resend));
        let reset: Result<Response, ProxyError> = Err(ProxyError::UpstreamReset("x".into()));
        let reset = retry_reason(&on, &reset);
        assert_eq!(reset, Some(RetryReason::Reset));
        assert!(reset.is_some_and(RetryReason::needs_resend));
    }

    #[test]
    fn grpc_codes_come_from_headers_or_read_trailers() {
        let on = RetryOn {
            grpc_codes: 1 << 14,
            ..RetryOn::default()
        };
        let grpc = retry_reason(&on, &resp(200, Some("14")));
        assert_eq!(grpc, Some(RetryReason::Grpc));
        assert!(
            !grpc.is_some_and(RetryReason::needs_resend),
            "a listed gRPC code is retried whatever the method"
        );
        assert_eq!(retry_reason(&on, &resp(200, Some("5"))), None);
        let mut r = resp(200, None).unwrap();
        r.extensions_mut().insert(TrailerStatus(14));
        assert_eq!(retry_reason(&on, &Ok(r)), Some(RetryReason::Grpc));
        assert_eq!(outcome(&resp(200, Some("14"))), Outcome::GatewayError);
        assert_eq!(outcome(&Ok(r_trailer_unavailable())), Outcome::GatewayError);
        assert_eq!(outcome(&resp(200, Some("13"))), Outcome::ServerError);
        assert_eq!(outcome(&resp(200, Some("5"))), Outcome::Success);
        assert_eq!(outcome(&resp(503, None)), Outcome::GatewayError);
        assert_eq!(outcome(&resp(500, None)), Outcome::ServerError);
        assert_eq!(
            outcome(&Err(ProxyError::UpstreamConnect("x".into()))),
            Outcome::ConnectFailure
        );
        assert_eq!(outcome(&Err(ProxyError::CircuitOpen)), Outcome::Ignore);
    }
}
