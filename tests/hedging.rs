//! Hedging end to end: an origin whose first try of each request never answers, so that only a
//! hedge can answer it, and the proxy in between. The hedge delays themselves (fixed and
//! percentile) are checked to the millisecond in paused time in `src/proxy/resilience/retry`;
//! here the outcomes and the counts: who answered, how many hedges went out, what the budget
//! refused. Latency figures (how much of the tail hedging cuts) belong to the benchmarks.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use support::*;
use tokio::task::JoinSet;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_whose_first_try_hangs_is_answered_by_its_hedge() {
    let origin = FirstTryHangs::start().await;
    let proxy = Proxy::start(&format!(
        "listeners:
  - name: in
    address: 127.0.0.1:0
    routes:
      - name: plain
        match: {{ prefix: /plain }}
        cluster: app
        timeout: 1s
      - name: hedged
        cluster: app
        timeout: 20s
        hedge: {{ after: 50ms }}
clusters:
  - name: app
    endpoints: [{}]
    outlier_detection: {{ enabled: false }}
    circuit_breaker: {{ enabled: false }}
",
        origin.addr
    ))
    .await;
    let client = h1_client();

    // Without a hedge, such a request gets nothing until its route timeout.
    let (status, headers, _) = send(
        &client,
        with_id(&proxy.url("in", "/plain"), "p", Method::GET),
    )
    .await
    .unwrap();
    assert_eq!(
        (status, reason(&headers)),
        (StatusCode::GATEWAY_TIMEOUT, "timeout")
    );

    for i in 0..10 {
        let (status, _, body) = send(
            &client,
            with_id(&proxy.url("in", "/h"), &format!("h{i}"), Method::GET),
        )
        .await
        .unwrap();
        assert_eq!((status, body.as_str()), (StatusCode::OK, "second try"));
        assert_eq!(origin.tries_of(&format!("h{i}")), 2);
    }
    let m = scrape(&proxy).await;
    assert_eq!(
        metric(
            &m,
            "outrigger_hedges_total{cluster=\"app\",listener=\"in\",route=\"hedged\"}"
        ),
        10.0
    );
    assert_eq!(
        metric(
            &m,
            "outrigger_retries_total{cluster=\"app\",listener=\"in\",route=\"hedged\"}"
        ),
        0.0
    );
    assert_eq!(
        metric(&m, "outrigger_upstream_attempts_total{cluster=\"app\"}"),
        21.0,
        "one try for the plain request, two for each hedged one"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_percentile_hedge_waits_for_twenty_samples_of_the_cluster() {
    let origin = FirstTryHangs::start().await;
    let proxy = Proxy::start(&format!(
        "listeners:
  - name: in
    address: 127.0.0.1:0
    routes:
      - name: plain
        match: {{ prefix: /plain }}
        cluster: app
        retry: {{ attempts: 1 }}
      - name: hedged
        cluster: app
        timeout: 1s
        hedge: {{ after: p50 }}
clusters:
  - name: app
    endpoints: [{}]
    outlier_detection: {{ enabled: false }}
    circuit_breaker: {{ enabled: false }}
",
        origin.addr
    ))
    .await;
    let client = h1_client();
    let hedges = || async {
        metric(
            &scrape(&proxy).await,
            "outrigger_hedges_total{cluster=\"app\",listener=\"in\",route=\"hedged\"}",
        )
    };
    let hedged = |id: &str| send(&client, with_id(&proxy.url("in", "/h"), id, Method::GET));
    let warm = |n: usize| {
        let (client, url) = (client.clone(), proxy.url("in", "/plain"));
        async move {
            for _ in 0..n {
                let (status, _, body) = get(&client, &url).await.unwrap();
                assert_eq!((status, body.as_str()), (StatusCode::OK, "ok"));
            }
        }
    };

    // No sample yet: no percentile, no hedge; the first try hangs until the route timeout.
    let (status, headers, _) = hedged("a").await.unwrap();
    assert_eq!(
        (status, reason(&headers)),
        (StatusCode::GATEWAY_TIMEOUT, "timeout")
    );
    // 19 answered tries are still one short.
    warm(19).await;
    let (status, headers, _) = hedged("b").await.unwrap();
    assert_eq!(
        (status, reason(&headers)),
        (StatusCode::GATEWAY_TIMEOUT, "timeout"),
        "19 samples: no hedge yet"
    );
    assert_eq!(hedges().await, 0.0);
    assert_eq!((origin.tries_of("a"), origin.tries_of("b")), (1, 1));

    // The 20th sample makes the percentile known: from now on every hanging try is hedged.
    warm(1).await;
    for i in 0..5 {
        let id = format!("c{i}");
        let (status, _, body) = hedged(&id).await.unwrap();
        assert_eq!(
            (status, body.as_str()),
            (StatusCode::OK, "second try"),
            "{id}"
        );
        assert_eq!(origin.tries_of(&id), 2);
    }
    assert_eq!(hedges().await, 5.0);
    assert_eq!(
        metric(
            &scrape(&proxy).await,
            "outrigger_upstream_attempts_total{cluster=\"app\"}"
        ),
        (1 + 19 + 1 + 1 + 5 * 2) as f64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hedges_draw_on_the_clusters_retry_budget() {
    let origin = FirstTryHangs::start().await;
    // 20% of requests and no floor: one token per five requests.
    let proxy = Proxy::start(&format!(
        "listeners:
  - name: in
    address: 127.0.0.1:0
    routes:
      - name: hedged
        cluster: app
        timeout: 2s
        hedge: {{ after: 20ms }}
clusters:
  - name: app
    endpoints: [{}]
    outlier_detection: {{ enabled: false }}
    circuit_breaker: {{ enabled: false }}
    retry_budget: {{ percent: 20, min_per_sec: 0, ttl: 60s }}
",
        origin.addr
    ))
    .await;
    let client = h1_client();
    // Ten at once: whatever the order of their deposits and withdrawals, ten requests buy
    // exactly two hedges.
    let mut tasks = JoinSet::new();
    for i in 0..10 {
        let req = with_id(&proxy.url("in", "/h"), &format!("r{i}"), Method::GET);
        let client = client.clone();
        tasks.spawn(async move {
            let (status, headers, body) = send(&client, req).await.unwrap();
            (status, reason(&headers).to_owned(), body)
        });
    }
    let mut answers = Vec::new();
    while let Some(r) = tasks.join_next().await {
        answers.push(r.unwrap());
    }
    let hedged = answers
        .iter()
        .filter(|(s, _, b)| *s == StatusCode::OK && b == "second try")
        .count();
    let timed_out = answers
        .iter()
        .filter(|(s, r, _)| *s == StatusCode::GATEWAY_TIMEOUT && r == "timeout")
        .count();
    assert_eq!((hedged, timed_out), (2, 8), "{answers:?}");
    let m = scrape(&proxy).await;
    assert_eq!(
        metric(
            &m,
            "outrigger_hedges_total{cluster=\"app\",listener=\"in\",route=\"hedged\"}"
        ),
        2.0
    );
    assert_eq!(
        metric(
            &m,
            "outrigger_retries_skipped_total{cluster=\"app\",listener=\"in\",reason=\"budget\",route=\"hedged\"}"
        ),
        8.0,
        "the other eight found no token"
    );
    assert_eq!(origin.tries(), 12);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_idempotent_requests_are_hedged() {
    let origin = FirstTryHangs::start().await;
    let proxy = Proxy::start(&format!(
        "listeners:
  - name: in
    address: 127.0.0.1:0
    routes:
      - name: hedged
        cluster: app
        timeout: 1s
        retry: {{ non_idempotent: true }}
        hedge: {{ after: 20ms }}
clusters:
  - name: app
    endpoints: [{}]
    outlier_detection: {{ enabled: false }}
    circuit_breaker: {{ enabled: false }}
",
        origin.addr
    ))
    .await;
    let client = h1_client();
    // `non_idempotent: true` allows retrying a POST, never hedging it.
    for (id, method) in [("post", Method::POST), ("patch", Method::PATCH)] {
        let (status, headers, _) = send(&client, with_id(&proxy.url("in", "/h"), id, method))
            .await
            .unwrap();
        assert_eq!(
            (status, reason(&headers)),
            (StatusCode::GATEWAY_TIMEOUT, "timeout"),
            "{id}"
        );
        assert_eq!(origin.tries_of(id), 1, "{id} was sent once");
    }
    for (id, method) in [("get", Method::GET), ("delete", Method::DELETE)] {
        let (status, _, body) = send(&client, with_id(&proxy.url("in", "/h"), id, method))
            .await
            .unwrap();
        assert_eq!(
            (status, body.as_str()),
            (StatusCode::OK, "second try"),
            "{id}"
        );
        assert_eq!(origin.tries_of(id), 2);
    }
    assert_eq!(
        metric(
            &scrape(&proxy).await,
            "outrigger_hedges_total{cluster=\"app\",listener=\"in\",route=\"hedged\"}"
        ),
        2.0
    );
}

/// A request to `url` with `method`, no body, and `x-test-id: id`.
fn with_id(url: &str, id: &str, method: Method) -> Request<support::Body> {
    Request::builder()
        .method(method)
        .uri(url)
        .header("x-test-id", id)
        .body(empty())
        .unwrap()
}

/// An origin where a request carrying `x-test-id` gets no answer the first time its id is seen
/// (that try hangs until the proxy gives up on it) and `200 second try` every later time; a
/// request without the header gets `200 ok` at once.
struct FirstTryHangs {
    addr: SocketAddr,
    seen: Arc<Mutex<HashMap<String, usize>>>,
    tries: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FirstTryHangs {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FirstTryHangs {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
        let tries = Arc::new(AtomicUsize::new(0));
        let (s, t) = (seen.clone(), tries.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (s, t) = (s.clone(), t.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                        let (s, t) = (s.clone(), t.clone());
                        async move {
                            t.fetch_add(1, Ordering::SeqCst);
                            let id = req
                                .headers()
                                .get("x-test-id")
                                .map(|v| v.to_str().unwrap().to_owned());
                            let text = match id {
                                None => "ok",
                                Some(id) => {
                                    let n = {
                                        let mut seen = s.lock().unwrap();
                                        let n = seen.entry(id).or_default();
                                        *n += 1;
                                        *n
                                    };
                                    if n == 1 {
                                        std::future::pending::<()>().await;
                                    }
                                    "second try"
                                }
                            };
                            Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from_static(
                                text.as_bytes(),
                            ))))
                        }
                    });
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Self {
            addr,
            seen,
            tries,
            task,
        }
    }

    /// Tries that carried `x-test-id: id`.
    fn tries_of(&self, id: &str) -> usize {
        self.seen.lock().unwrap().get(id).copied().unwrap_or(0)
    }

    /// Every try the origin saw.
    fn tries(&self) -> usize {
        self.tries.load(Ordering::SeqCst)
    }
}
