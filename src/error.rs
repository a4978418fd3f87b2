//! The one error type of the data path and the one place errors become HTTP responses.
//!
//! Every local reply the proxy makes is a [`ProxyError`]; its [`ErrorKind`] decides the status code,
//! the `x-outrigger-error` reason header and the metric label, so the three never disagree.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};

use crate::proxy::body::ProxyBody;

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
    /// The upstream closed or reset the exchange after the request was (perhaps partly) sent.
    #[error("the upstream reset the request: {0}")]
    UpstreamReset(#[source] BoxError),
    /// The upstream did not answer in time.
    #[error("the upstream did not answer in time")]
    Timeout,
    /// The proxy refused the request to protect itself or the upstream.
    #[error("overloaded")]
    Overloaded,
}

/// The classes of local reply; each has a status, a reason and a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// See [`ProxyError::NoRoute`].
    NoRoute,
    /// See [`ProxyError::UpstreamConnect`].
    UpstreamConnect,
    /// See [`ProxyError::UpstreamReset`].
    UpstreamReset,
    /// See [`ProxyError::Timeout`].
    Timeout,
    /// See [`ProxyError::Overloaded`].
    Overloaded,
}

impl ErrorKind {
    /// Every kind, in the order of their `index`.
    pub const ALL: [ErrorKind; 5] = [
        ErrorKind::NoRoute,
        ErrorKind::UpstreamConnect,
        ErrorKind::UpstreamReset,
        ErrorKind::Timeout,
        ErrorKind::Overloaded,
    ];

    /// The reason string used in the response header, logs and metric labels.
    pub const fn reason(self) -> &'static str {
        match self {
            ErrorKind::NoRoute => "no_route",
            ErrorKind::UpstreamConnect => "upstream_connect",
            ErrorKind::UpstreamReset => "upstream_reset",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Overloaded => "overloaded",
        }
    }

    /// The status code of the local reply.
    pub const fn status(self) -> StatusCode {
        match self {
            ErrorKind::NoRoute => StatusCode::NOT_FOUND,
            ErrorKind::UpstreamConnect | ErrorKind::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::UpstreamReset => StatusCode::BAD_GATEWAY,
            ErrorKind::Timeout => StatusCode::GATEWAY_TIMEOUT,
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
            ProxyError::UpstreamReset(_) => ErrorKind::UpstreamReset,
            ProxyError::Timeout => ErrorKind::Timeout,
            ProxyError::Overloaded => ErrorKind::Overloaded,
        }
    }

    /// Whether the request certainly never reached the upstream, so sending it again is safe.
    pub fn nothing_sent(&self) -> bool {
        matches!(self, ProxyError::UpstreamConnect(_) | ProxyError::NoRoute)
    }

    /// The well-formed local reply for this error.
    pub fn into_response(self) -> Response<ProxyBody> {
        local_reply(self.kind())
    }
}

/// Builds the response for `kind`: its status, the reason header, and the reason as a text body.
pub fn local_reply(kind: ErrorKind) -> Response<ProxyBody> {
    let body = Bytes::from_static(match kind {
        ErrorKind::NoRoute => b"no_route\n",
        ErrorKind::UpstreamConnect => b"upstream_connect\n",
        ErrorKind::UpstreamReset => b"upstream_reset\n",
        ErrorKind::Timeout => b"timeout\n",
        ErrorKind::Overloaded => b"overloaded\n",
    });
    let mut resp = Response::new(ProxyBody::full(body));
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
    fn local_reply_carries_status_and_reason() {
        let r = local_reply(ErrorKind::Timeout);
        assert_eq!(r.status(), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(r.headers()[REASON_HEADER], "timeout");
    }
}
