//! gRPC passes through intact: HTTP/2 to an HTTP/2 cluster, trailers kept, streams both ways.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Channel};
use support::*;

async fn proxy_for(origin: &Origin) -> Proxy {
    Proxy::start(&format!(
        "listeners:\n  - name: in\n    address: 127.0.0.1:0\n    routes:\n      - name: grpc\n        match: {{ prefix: /test.Echo/ }}\n        cluster: grpc\nclusters:\n  - name: grpc\n    endpoints: [{}]\n    protocol: http2\n",
        origin.addr
    ))
    .await
}

fn grpc_request(url: String, body: Body) -> Request<Body> {
    Request::post(url)
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(body)
        .unwrap()
}

/// Reads the whole response: messages and trailers.
async fn finish(body: hyper::body::Incoming) -> (Vec<String>, http::HeaderMap) {
    let collected = body.collect().await.unwrap();
    let trailers = collected.trailers().cloned().expect("gRPC trailers arrive");
    (grpc_messages(&collected.to_bytes()), trailers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unary_call_keeps_message_and_trailers() {
    let origin = Origin::start("grpc").await;
    let proxy = proxy_for(&origin).await;
    let req = grpc_request(
        proxy.url("in", "/test.Echo/Unary"),
        body(grpc_frame(b"hello")),
    );
    let resp = h2_client().request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/grpc");
    let (msgs, trailers) = finish(resp.into_body()).await;
    assert_eq!(msgs, ["echo:hello"]);
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(trailers["grpc-message"], "done");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_streaming_call_delivers_every_message() {
    let origin = Origin::start("grpc").await;
    let proxy = proxy_for(&origin).await;
    let req = grpc_request(
        proxy.url("in", "/test.Echo/ServerStream"),
        body(grpc_frame(b"go")),
    );
    let resp = h2_client().request(req).await.unwrap();
    let (msgs, trailers) = finish(resp.into_body()).await;
    assert_eq!(msgs, ["msg-0", "msg-1", "msg-2"]);
    assert_eq!(trailers["grpc-status"], "0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bidirectional_stream_interleaves() {
    let origin = Origin::start("grpc").await;
    let proxy = proxy_for(&origin).await;
    let (mut tx, req_body) = Channel::<Bytes, hyper::Error>::new(1);
    let req = grpc_request(proxy.url("in", "/test.Echo/Bidi"), req_body.boxed());
    let client = h2_client();
    let pending = tokio::spawn(async move { client.request(req).await });
    tx.send_data(grpc_frame(b"m0")).await.unwrap();
    let mut body = pending.await.unwrap().unwrap().into_body();
    // Each echo comes back before the next message is sent: the stream is live both ways.
    for i in 0..3 {
        if i > 0 {
            tx.send_data(grpc_frame(format!("m{i}").as_bytes()))
                .await
                .unwrap();
        }
        let frame = tokio::time::timeout(Duration::from_secs(5), body.frame())
            .await
            .expect("echo arrives while the request is still open")
            .unwrap()
            .unwrap();
        let data = frame.into_data().unwrap();
        assert_eq!(grpc_messages(&data), [format!("echo:m{i}")]);
    }
    drop(tx);
    let (rest, trailers) = finish(body).await;
    assert!(rest.is_empty());
    assert_eq!(trailers["grpc-status"], "0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_error_status_in_trailers_only_response_passes() {
    let origin = Origin::start("grpc").await;
    let proxy = proxy_for(&origin).await;
    let req = grpc_request(
        proxy.url("in", "/test.Echo/Missing"),
        body(grpc_frame(b"x")),
    );
    let resp = h2_client().request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let (msgs, trailers) = finish(resp.into_body()).await;
    assert!(msgs.is_empty());
    assert_eq!(trailers["grpc-status"], "12");
}

/// An endpoint that answers every call with 200 and `grpc-status: 14` (UNAVAILABLE) in its
/// trailers is ejected by outlier detection, as one answering 503 would be: the same
/// classification feeds the breakers and the ejection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_answering_unavailable_in_trailers_is_ejected() {
    let sick = Origin::start("sick").await;
    sick.control
        .grpc_status
        .store(14, std::sync::atomic::Ordering::SeqCst);
    let well = Origin::start("well").await;
    let proxy = Proxy::start(&format!(
        "listeners:\n  - name: in\n    address: 127.0.0.1:0\n    routes:\n      - name: grpc\n        match: {{ prefix: /test.Echo/ }}\n        cluster: grpc\n        retry: {{ grpc_codes: [unavailable], attempts: 2 }}\nclusters:\n  - name: grpc\n    endpoints: [{}, {}]\n    protocol: http2\n    load_balancer: round_robin\n    outlier_detection: {{ consecutive_gateway_errors: 3, consecutive_5xx: 0, max_ejection_percent: 50 }}\n    circuit_breaker: {{ enabled: false }}\n",
        sick.addr, well.addr
    ))
    .await;
    let client = h2_client();
    let mut ok = 0;
    for _ in 0..12 {
        let req = grpc_request(proxy.url("in", "/test.Echo/Unary"), body(grpc_frame(b"hi")));
        let resp = client.request(req).await.unwrap();
        let (_, trailers) = finish(resp.into_body()).await;
        if trailers["grpc-status"] == "0" {
            ok += 1;
        }
    }
    // A listed gRPC code is retried whatever the method (gRPC calls are POSTs): each try the
    // sick endpoint fails is retried on the well one, so every call succeeds, and the sick
    // endpoint's streak of three ejects it.
    assert_eq!(ok, 12, "every call succeeds");
    assert_eq!(sick.hits(), 3, "three failed tries, then it is out");
    let (_, _, clusters) = get(&h1_client(), &proxy.admin_url("/clusters"))
        .await
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&clusters).unwrap();
    let endpoints = v["clusters"][0]["endpoints"].as_array().unwrap();
    let by_addr = |a: std::net::SocketAddr| {
        endpoints
            .iter()
            .find(|e| e["address"] == a.to_string())
            .unwrap()
            .clone()
    };
    assert_eq!(by_addr(sick.addr)["ejected"], true, "{clusters}");
    assert_eq!(by_addr(well.addr)["ejected"], false, "{clusters}");
    let m = scrape(&proxy).await;
    assert_eq!(
        metric(&m, "outrigger_outlier_ejections_total{cluster=\"grpc\"}"),
        1.0
    );
    let sick_hits = sick.hits();
    for _ in 0..6 {
        let req = grpc_request(proxy.url("in", "/test.Echo/Unary"), body(grpc_frame(b"hi")));
        let resp = client.request(req).await.unwrap();
        finish(resp.into_body()).await;
    }
    assert_eq!(sick.hits(), sick_hits, "an ejected endpoint gets no tries");
}
