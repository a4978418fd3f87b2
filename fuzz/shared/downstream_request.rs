//! The downstream HTTP/1.1 server fuzz target's code, shared with `tests/fuzz_regressions.rs` so
//! that a replayed input runs exactly what the fuzzer ran. The server runs as it does in the
//! proxy, behind the framing check, over an in-memory pipe.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::BodyExt;
use outrigger::proxy::body::ProxyBody;
use outrigger::proxy::downstream::{Connection, RequestBody};
use outrigger::proxy::framing::Guarded;
use outrigger::telemetry::metrics::GuardMetrics;
use prometheus::IntCounter;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The most bytes of a request head, as a listener's `max_header_bytes` at its floor.
const MAX_HEAD: usize = 8192;

/// What serving an input gave: each request the handler saw (method, target, and its body or
/// why the body failed), and every byte written back.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Served {
    pub requests: Vec<String>,
    /// Body bytes handed on, over all requests.
    pub body_bytes: usize,
    pub out: Vec<u8>,
}

/// Checks one input: the first byte picks where the rest is split into two writes; what the
/// server makes of the two writes must be what it makes of the whole, and no body handed on can
/// hold more bytes than came in. Panics if not. Returns whether there was anything to check.
pub fn run(data: &[u8]) -> bool {
    let Some((&split, bytes)) = data.split_first() else {
        return false;
    };
    check_split(bytes, usize::from(split) % (bytes.len() + 1));
    true
}

/// Serving `bytes` whole equals serving them in two writes split at `at`.
pub fn check_split(bytes: &[u8], at: usize) {
    let whole = serve(&[bytes]);
    assert!(
        whole.body_bytes <= bytes.len(),
        "bodies longer than the input"
    );
    let parts = serve(&[&bytes[..at], &bytes[at..]]);
    assert_eq!(whole, parts, "split at {at}");
}

/// Serves the bytes of `writes`, written one after the other and then the sending side shut,
/// with a handler that reads each request's body and answers with what it saw (`/switch`
/// answers `101`, which ends the HTTP part of the connection).
pub fn serve(writes: &[&[u8]]) -> Served {
    RUNTIME.with(|rt| rt.block_on(served(writes)))
}

thread_local! {
    /// One runtime per thread, made once: making one per input would cost more than serving it.
    static RUNTIME: tokio::runtime::Runtime = match tokio::runtime::Builder::new_current_thread().build() {
        Ok(rt) => rt,
        Err(e) => panic!("no runtime: {e}"),
    };
}

async fn served(writes: &[&[u8]]) -> Served {
    {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let handler = move |req: Request<RequestBody>| {
            let log = log.clone();
            async move {
                let (parts, body) = req.into_parts();
                let switch = parts.uri.path() == "/switch";
                let (body, len) = match body.collect().await {
                    Ok(c) => {
                        let trailers = c.trailers().map(|t| t.len()).unwrap_or(0);
                        let data = c.to_bytes();
                        (format!("{data:?} trailers={trailers}"), data.len())
                    }
                    Err(e) => (format!("failed: {e}"), 0),
                };
                let line = format!("{} {} {body}", parts.method, parts.uri);
                let mut resp = Response::new(ProxyBody::full(Bytes::from(line.clone())));
                if let Ok(mut log) = log.lock() {
                    log.push((line, len));
                }
                // A fixed date, so that two runs write the same bytes.
                resp.headers_mut().insert(
                    "date",
                    HeaderValue::from_static("Thu, 01 Jan 1970 00:00:00 GMT"),
                );
                if switch {
                    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
                }
                resp
            }
        };
        let metrics = GuardMetrics {
            malformed: counter(),
            header_timeouts: counter(),
        };
        let io = Guarded::new(server, false, None, MAX_HEAD, metrics);
        let conn = Connection::new(io, handler, MAX_HEAD, 100);
        let client_side = async {
            for w in writes {
                // The server may close early (after a refusal): later writes then fail.
                if client.write_all(w).await.is_err() {
                    break;
                }
                tokio::task::yield_now().await;
            }
            let _ = client.shutdown().await;
            let mut out = Vec::new();
            let _ = client.read_to_end(&mut out).await;
            out
        };
        let (_, out) = tokio::join!(
            async {
                let mut conn = conn;
                let _ = (&mut conn).await;
                // After a `101` the connection is the tunnel's: dropping it ends the stream.
                drop(conn.take_switched());
            },
            client_side
        );
        let seen = seen.lock().map(|s| s.clone()).unwrap_or_default();
        Served {
            body_bytes: seen.iter().map(|(_, n)| n).sum(),
            requests: seen.into_iter().map(|(line, _)| line).collect(),
            out,
        }
    }
}

fn counter() -> IntCounter {
    match IntCounter::new("fuzz", "fuzz") {
        Ok(c) => c,
        Err(e) => panic!("{e}"),
    }
}
