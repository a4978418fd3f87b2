//! gRPC through the proxy with a real gRPC client and server (tonic on both ends): local replies
//! are trailers-only with the status gRPC clients expect, and `grpc_codes` retries work for gRPC
//! calls (all POSTs) without `non_idempotent`.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::{Buf, BufMut, Bytes};
use http::uri::PathAndQuery;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::*;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::{Code, Status};

/// Messages are raw bytes: no protobuf schema or code generation is needed to speak gRPC.
#[derive(Clone, Copy, Default)]
struct Raw;

impl Codec for Raw {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl Encoder for Raw {
    type Item = Bytes;
    type Error = Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Bytes;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

/// How the server answers `/<any service>/Unary`: the first `fail_first` calls end with
/// `fail_code`, the rest echo their message, once `release` is notified if `hold` is set.
#[derive(Default)]
struct Behaviour {
    fail_first: AtomicUsize,
    fail_code: AtomicU32,
    hold: AtomicBool,
    release: tokio::sync::Notify,
    calls: AtomicUsize,
}

#[derive(Clone)]
struct Echo(Arc<Behaviour>);

impl tonic::server::UnaryService<Bytes> for Echo {
    type Response = Bytes;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<tonic::Response<Bytes>, Status>> + Send>,
    >;
    fn call(&mut self, req: tonic::Request<Bytes>) -> Self::Future {
        let b = self.0.clone();
        Box::pin(async move {
            let n = b.calls.fetch_add(1, Ordering::SeqCst);
            if n < b.fail_first.load(Ordering::SeqCst) {
                let code = Code::from_i32(b.fail_code.load(Ordering::SeqCst) as i32);
                return Err(Status::new(code, "told to fail"));
            }
            if b.hold.load(Ordering::SeqCst) {
                b.release.notified().await;
            }
            let mut out = b"echo:".to_vec();
            out.extend_from_slice(req.get_ref());
            Ok(tonic::Response::new(Bytes::from(out)))
        })
    }
}

/// A gRPC server built on tonic's server codec, served by hyper over HTTP/2.
async fn grpc_server() -> (SocketAddr, Arc<Behaviour>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let behaviour = Arc::new(Behaviour::default());
    let b = behaviour.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let b = b.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let b = b.clone();
                    async move {
                        let mut grpc = tonic::server::Grpc::new(Raw);
                        let resp = if req.uri().path().ends_with("/Unary") {
                            grpc.unary(Echo(b), req).await
                        } else {
                            Status::unimplemented("no such method").into_http()
                        };
                        Ok::<_, Infallible>(resp)
                    }
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, behaviour)
}

/// One unary call with tonic's client over its own HTTP/2 channel.
async fn call(addr: SocketAddr, path: &'static str) -> Result<Bytes, Status> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = tonic::client::Grpc::new(channel);
    client.ready().await.unwrap();
    client
        .unary(
            tonic::Request::new(Bytes::from_static(b"hi")),
            PathAndQuery::from_static(path),
            Raw,
        )
        .await
        .map(tonic::Response::into_inner)
}

fn config(server: SocketAddr, dead: SocketAddr) -> String {
    format!(
        "listeners:
  - name: in
    address: 127.0.0.1:0
    routes:
      - name: slow
        match: {{ prefix: /test.Slow/ }}
        cluster: grpc
        timeout: 100ms
      - name: limited
        match: {{ prefix: /test.Limited/ }}
        cluster: grpc
        rate_limit: {{ requests_per_second: 1, burst: 1 }}
      - name: dead
        match: {{ prefix: /test.Dead/ }}
        cluster: dead
      - name: retried
        match: {{ prefix: /test.Echo/ }}
        cluster: grpc
        retry: {{ attempts: 3, retry_on: [], grpc_codes: [unavailable] }}
      - name: plain
        match: {{ prefix: /plain }}
        cluster: grpc
        retry: {{ attempts: 3, retry_on: [gateway-error] }}
clusters:
  - name: grpc
    protocol: http2
    endpoints: [\"{server}\"]
  - name: dead
    protocol: http2
    endpoints: [\"{dead}\"]
    connect_timeout: 200ms
    circuit_breaker: {{ enabled: false }}
"
    )
}

fn dead_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_replies_reach_grpc_clients_as_the_status_they_expect() {
    let (server, behaviour) = grpc_server().await;
    let proxy = Proxy::start(&config(server, dead_addr())).await;
    let addr = proxy.addr("in");

    // A route timeout: DEADLINE_EXCEEDED, not the UNAVAILABLE an HTTP 504 becomes.
    behaviour.hold.store(true, Ordering::SeqCst);
    let e = call(addr, "/test.Slow/Unary").await.unwrap_err();
    assert_eq!(e.code(), Code::DeadlineExceeded, "{e:?}");
    assert_eq!(e.metadata().get("x-outrigger-error").unwrap(), "timeout");
    behaviour.hold.store(false, Ordering::SeqCst);
    behaviour.release.notify_waiters();

    // The rate limit admits one call, then RESOURCE_EXHAUSTED.
    let mut codes = Vec::new();
    for _ in 0..3 {
        codes.push(match call(addr, "/test.Limited/Unary").await {
            Ok(_) => Code::Ok,
            Err(e) => e.code(),
        });
    }
    assert_eq!(
        codes,
        [Code::Ok, Code::ResourceExhausted, Code::ResourceExhausted]
    );

    // Nothing listens: UNAVAILABLE. No route: UNIMPLEMENTED.
    let e = call(addr, "/test.Dead/Unary").await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert_eq!(
        e.metadata().get("x-outrigger-error").unwrap(),
        "upstream_connect"
    );
    let e = call(addr, "/nowhere.Service/Method").await.unwrap_err();
    assert_eq!(e.code(), Code::Unimplemented, "{e:?}");
    assert_eq!(e.metadata().get("x-outrigger-error").unwrap(), "no_route");

    // Counted as the failures they are, not as the 200 on the wire.
    let text = scrape(&proxy).await;
    assert_eq!(
        metric(
            &text,
            "outrigger_requests_total{class=\"5xx\",cluster=\"grpc\",listener=\"in\",route=\"slow\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(
            &text,
            "outrigger_requests_total{class=\"4xx\",cluster=\"grpc\",listener=\"in\",route=\"limited\"}"
        ),
        2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listed_grpc_codes_are_retried_without_non_idempotent() {
    let (server, behaviour) = grpc_server().await;
    let origin = Origin::start("plain").await;
    origin.control.set_status(503);
    let yaml = config(server, dead_addr()).replace(
        "  - name: dead\n    protocol: http2\n",
        &format!(
            "  - name: plain\n    endpoints: [\"{}\"]\n  - name: dead\n    protocol: http2\n",
            origin.addr
        ),
    );
    let yaml = yaml.replace(
        "        match: { prefix: /plain }\n        cluster: grpc",
        "        match: { prefix: /plain }\n        cluster: plain",
    );
    let proxy = Proxy::start(&yaml).await;
    let addr = proxy.addr("in");

    // Two UNAVAILABLE answers, then the echo: the caller sees only the success.
    behaviour.fail_first.store(2, Ordering::SeqCst);
    behaviour.fail_code.store(14, Ordering::SeqCst);
    let got = call(addr, "/test.Echo/Unary").await.unwrap();
    assert_eq!(got, "echo:hi");
    assert_eq!(behaviour.calls.load(Ordering::SeqCst), 3);

    // A code that is not listed is not retried.
    behaviour.calls.store(0, Ordering::SeqCst);
    behaviour.fail_first.store(1, Ordering::SeqCst);
    behaviour.fail_code.store(5, Ordering::SeqCst);
    let e = call(addr, "/test.Echo/Unary").await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert_eq!(behaviour.calls.load(Ordering::SeqCst), 1);

    // A plain POST answered 503 on a route retrying gateway errors is not resent, and the
    // skipped retry says why.
    let req = http::Request::post(proxy.url("in", "/plain"))
        .body(body("x"))
        .unwrap();
    let (status, _, _) = send(&h1_client(), req).await.unwrap();
    assert_eq!(status, 503);
    assert_eq!(origin.hits(), 1);
    let text = scrape(&proxy).await;
    let series = |route: &str, cluster: &str, reason: &str| {
        format!(
            "outrigger_retries_skipped_total{{cluster=\"{cluster}\",listener=\"in\",reason=\"{reason}\",route=\"{route}\"}}"
        )
    };
    assert_eq!(metric(&text, &series("plain", "plain", "method")), 1.0);
    assert_eq!(
        metric(
            &text,
            "outrigger_retries_total{cluster=\"grpc\",listener=\"in\",route=\"retried\"}"
        ),
        2.0
    );
    assert_eq!(metric(&text, &series("retried", "grpc", "method")), 0.0);
}
