//! Each file in `examples/` runs as its comments describe, with its listeners moved to ephemeral
//! ports and its endpoint names pointed at live test servers.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body_util::{BodyExt, Channel};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::*;

/// The example's text with every `address:` on port 0 and the named endpoints replaced.
fn localize(example: &str, endpoints: &[(&str, SocketAddr)]) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join(example);
    let mut text = std::fs::read_to_string(path).unwrap();
    for (name, addr) in endpoints {
        assert!(text.contains(name), "{example} names {name}");
        text = text.replace(name, &addr.to_string());
    }
    text.lines()
        .map(|l| match l.split_once("address: ") {
            Some((indent, _)) if indent.trim().is_empty() || indent.trim() == "-" => {
                format!("{indent}address: 127.0.0.1:0")
            }
            _ => l.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_sends_flagged_requests_to_v2_and_splits_the_rest() {
    let (v1, v2) = (Origin::start("v1").await, Origin::start("v2").await);
    let proxy = Proxy::start(&localize(
        "canary.yaml",
        &[
            ("reviews-v1.internal:8080", v1.addr),
            ("reviews-v2.internal:8080", v2.addr),
        ],
    ))
    .await;
    let client = h1_client();
    let url = proxy.url("outbound", "/api/reviews/1");
    let request = |canary: bool| {
        let mut b = Request::get(&url).header("host", "reviews");
        if canary {
            b = b.header("x-canary", "1");
        }
        b.body(empty()).unwrap()
    };
    for _ in 0..5 {
        let (_, headers, _) = send(&client, request(true)).await.unwrap();
        assert_eq!(headers["x-origin"], "v2");
    }
    let mut to_v2 = 0;
    for _ in 0..100 {
        let (_, headers, _) = send(&client, request(false)).await.unwrap();
        to_v2 += usize::from(headers["x-origin"] == "v2");
    }
    assert_eq!(to_v2, 10, "90/10 split");
    let other_host = Request::get(&url)
        .header("host", "ratings")
        .body(empty())
        .unwrap();
    let (status, headers, _) = send(&client, other_host).await.unwrap();
    assert_eq!((status.as_u16(), reason(&headers)), (404, "no_route"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_example_passes_unary_calls_with_their_trailers() {
    let payments = PaymentsServer::start().await;
    let proxy = Proxy::start(&localize(
        "grpc.yaml",
        &[("payments.internal:50051", payments.addr)],
    ))
    .await;
    let url = |method: &str| proxy.url("inbound-grpc", &format!("/payments.v1.Payments/{method}"));
    let call = |method: &str, msg: &str| {
        Request::post(url(method))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(body(grpc_frame(msg.as_bytes())))
            .unwrap()
    };
    // A call that succeeds: its message and its OK status, which travels in the trailers.
    let resp = h2_client()
        .request(call("Charge", "order-7"))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/grpc");
    assert!(
        resp.headers().get("grpc-status").is_none(),
        "the status is not in the headers"
    );
    let all = resp.into_body().collect().await.unwrap();
    let trailers = all
        .trailers()
        .cloned()
        .expect("the trailers reach the client");
    assert_eq!(grpc_messages(&all.to_bytes()), ["charged order-7"]);
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(trailers["grpc-message"], "ok");
    // A call that fails: no message, and the error's status and message in the trailers.
    let resp = h2_client()
        .request(call("Refund", "order-8"))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "gRPC errors travel in a 200 response");
    let all = resp.into_body().collect().await.unwrap();
    let trailers = all
        .trailers()
        .cloned()
        .expect("the trailers reach the client");
    assert!(grpc_messages(&all.to_bytes()).is_empty());
    assert_eq!(trailers["grpc-status"], "5");
    assert_eq!(trailers["grpc-message"], "no charge order-8");
    assert_eq!(payments.calls(), ["Charge order-7", "Refund order-8"]);

    // The content-type condition keeps non-gRPC requests out.
    let not_grpc = Request::post(url("Charge")).body(empty()).unwrap();
    let (status, headers, _) = send(&h2_client(), not_grpc).await.unwrap();
    assert_eq!((status.as_u16(), reason(&headers)), (404, "no_route"));
    assert_eq!(payments.calls().len(), 2, "nothing reached the service");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_example_splices_bytes() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (echo, _task) = tcp_echo().await;
    let proxy = Proxy::start(&localize("tcp.yaml", &[("db.internal:5432", echo)])).await;
    let mut s = tokio::net::TcpStream::connect(proxy.addr("postgres"))
        .await
        .unwrap();
    s.write_all(b"SELECT 1").await.unwrap();
    s.shutdown().await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    assert_eq!(out, b"SELECT 1bye");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resilient_example_hides_a_failing_replica_and_limits_search() {
    let replicas = [
        Origin::start("c1").await,
        Origin::start("c2").await,
        Origin::start("c3").await,
    ];
    replicas[1].control.set_status(503);
    let search = Origin::start("search").await;
    let proxy = Proxy::start(&localize(
        "resilient.yaml",
        &[
            ("catalog-1.internal:8080", replicas[0].addr),
            ("catalog-2.internal:8080", replicas[1].addr),
            ("catalog-3.internal:8080", replicas[2].addr),
            ("search.internal:8080", search.addr),
        ],
    ))
    .await;
    let client = h1_client();
    for i in 0..60 {
        let (status, _, _) = get(
            &client,
            &proxy.url("outbound", &format!("/catalog/items/{i}")),
        )
        .await
        .unwrap();
        assert_eq!(status.as_u16(), 200, "request {i}");
    }
    // Sixty at once against a burst of 20: most are refused whatever the machine's speed.
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..60 {
        let (client, url) = (client.clone(), proxy.url("outbound", "/search?q=boat"));
        tasks.spawn(async move { get(&client, &url).await.unwrap() });
    }
    let mut limited = None;
    while let Some(r) = tasks.join_next().await {
        let (status, headers, _) = r.unwrap();
        if status.as_u16() == 429 {
            limited = Some(headers);
        }
    }
    let headers = limited.expect("the burst of 20 runs out");
    assert_eq!(reason(&headers), "rate_limited");
    assert!(headers.contains_key("retry-after"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sharded_example_pins_tenants_and_sessions() {
    let shards = [
        Origin::start("orders-0").await,
        Origin::start("orders-1").await,
        Origin::start("orders-2").await,
    ];
    let web = [
        Origin::start("web-1").await,
        Origin::start("web-2").await,
        Origin::start("web-3").await,
    ];
    let proxy = Proxy::start(&localize(
        "sharded.yaml",
        &[
            ("orders-0.internal:8080", shards[0].addr),
            ("orders-1.internal:8080", shards[1].addr),
            ("orders-2.internal:8080", shards[2].addr),
            ("web-1.internal:8080", web[0].addr),
            ("web-2.internal:8080", web[1].addr),
            ("web-3.internal:8080", web[2].addr),
        ],
    ))
    .await;
    let client = h1_client();
    let served = |header: &'static str, value: String, path: &'static str| {
        let (client, url) = (client.clone(), proxy.url("outbound", path));
        async move {
            let req = Request::get(url)
                .header(header, value)
                .body(empty())
                .unwrap();
            let (status, headers, _) = send(&client, req).await.unwrap();
            assert_eq!(status.as_u16(), 200);
            headers["x-origin"].to_str().unwrap().to_owned()
        }
    };
    for tenant in ["acme", "globex", "initech", "umbrella"] {
        let first = served("x-tenant", tenant.into(), "/orders/1").await;
        assert!(first.starts_with("orders-"));
        for _ in 0..3 {
            assert_eq!(served("x-tenant", tenant.into(), "/orders/2").await, first);
        }
    }
    for s in 0..10 {
        let cookie = format!("session=s{s}");
        let first = served("cookie", cookie.clone(), "/app/cart").await;
        assert!(first.starts_with("web-"));
        assert_eq!(served("cookie", cookie, "/app/cart").await, first);
    }
}

/// A `payments.v1.Payments` gRPC service over h2c: `Charge` answers `charged MSG` with
/// `grpc-status: 0` and `grpc-message: ok` in the trailers; any other method answers no message
/// and `grpc-status: 5` (NOT_FOUND), `grpc-message: no charge MSG`. It records each call as
/// `METHOD MSG`.
struct PaymentsServer {
    addr: SocketAddr,
    calls: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl PaymentsServer {
    async fn start() -> PaymentsServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let calls = Arc::new(Mutex::new(Vec::new()));
        let log = calls.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let log = log.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let log = log.clone();
                        async move { Ok::<_, std::convert::Infallible>(payments(req, &log).await) }
                    });
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        PaymentsServer { addr, calls, task }
    }

    fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }
}

impl Drop for PaymentsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn payments(req: Request<Incoming>, log: &Mutex<Vec<String>>) -> Response<Body> {
    let method = req
        .uri()
        .path()
        .rsplit('/')
        .next()
        .unwrap_or_default()
        .to_owned();
    let body = req.into_body().collect().await.unwrap().to_bytes();
    let msg = grpc_messages(&body).join(",");
    log.lock().unwrap().push(format!("{method} {msg}"));
    let (mut tx, out) = Channel::<Bytes, hyper::Error>::new(4);
    let mut trailers = HeaderMap::new();
    if method == "Charge" {
        tx.send_data(grpc_frame(format!("charged {msg}").as_bytes()))
            .await
            .unwrap();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        trailers.insert("grpc-message", HeaderValue::from_static("ok"));
    } else {
        trailers.insert("grpc-status", HeaderValue::from_static("5"));
        trailers.insert(
            "grpc-message",
            HeaderValue::from_str(&format!("no charge {msg}")).unwrap(),
        );
    }
    tx.send_trailers(trailers).await.unwrap();
    let mut r = Response::new(out.boxed());
    r.headers_mut()
        .insert("content-type", HeaderValue::from_static("application/grpc"));
    r
}
