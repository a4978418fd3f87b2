//! Resilience end to end: real origins that fail, hang and recover on command, the proxy in
//! between, real HTTP clients. These tests assert outcomes, orders and counts (statuses, the
//! `x-outrigger-error` reason, which origin answered, the retry, hedge, breaker and budget
//! metrics); how long things take is checked to the millisecond in paused time by the unit tests
//! of `src/proxy/resilience/`, and latency figures belong to the benchmarks. Hedging has its own
//! file, `tests/hedging.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use support::*;
use tokio::task::JoinSet;

/// A generous deadline for an event a test waits for: CI runs on a loaded 2-core machine.
const WAIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_always_failing_endpoint_of_three_is_hidden_by_retries_then_ejected() {
    let (a, b, bad) = (
        Origin::start("a").await,
        Origin::start("b").await,
        Origin::start("bad").await,
    );
    bad.control.set_status(503);
    let proxy = Proxy::start(&format!(
        "listeners:
  - name: in
    address: 127.0.0.1:0
    routes:
      - name: api
        cluster: app
clusters:
  - name: app
    endpoints: [{}, {}, {}]
",
        a.addr, b.addr, bad.addr
    ))
    .await;
    let requests = 600;
    let results = closed_loop(&proxy.url("in", "/"), 16, requests).await;
    assert!(
        results
            .iter()
            .all(|r| r.status == StatusCode::OK && r.origin != "bad"),
        "every request answered by a healthy endpoint"
    );
    assert_eq!(results.len(), requests);
    let m = scrape(&proxy).await;
    let retries = metric(
        &m,
        "outrigger_retries_total{cluster=\"app\",listener=\"in\",route=\"api\"}",
    );
    assert_eq!(
        retries,
        bad.hits() as f64,
        "each failed try was retried once, and nothing else was"
    );
    assert!(bad.hits() >= 5, "ejection takes 5 failures in a row");
    assert_eq!(
        metric(&m, "outrigger_upstream_attempts_total{cluster=\"app\"}"),
        requests as f64 + retries
    );
    assert_eq!(
        metric(
            &m,
            "outrigger_retries_skipped_total{cluster=\"app\",listener=\"in\",reason=\"budget\",route=\"api\"}"
        ),
        0.0
    );
    assert_eq!(
        metric(&m, "outrigger_outlier_ejections_total{cluster=\"app\"}"),
        1.0
    );
    let status = clusters(&proxy).await;
    assert_eq!(endpoint(&status, bad.addr)["ejected"], true, "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_retry_budget_caps_retries_at_its_share_of_requests() {
    // Both endpoints fail and nothing else (ejection, breaker) steps in: only the budget stands
    // between an outage and three tries per request. 20% with no floor and a 60 s memory: the
    // retries of the test's requests may not exceed 20% of them, exactly.
    let (a, b) = (Origin::start("a").await, Origin::start("b").await);
    a.control.set_status(503);
    b.control.set_status(503);
    let proxy = Proxy::start(&format!(
        "listeners:
  - name: in
    address: 127.0.0.1:0
    routes:
      - name: api
        cluster: app
clusters:
  - name: app
    endpoints: [{}, {}]
    outlier_detection: {{ enabled: false }}
    circuit_breaker: {{ enabled: false }}
    retry_budget: {{ percent: 20, min_per_sec: 0, ttl: 60s }}
",
        a.addr, b.addr
    ))
    .await;
    let results = sequential(&proxy.url("in", "/"), 100).await;
    assert!(
        results
            .iter()
            .all(|r| r.status == StatusCode::SERVICE_UNAVAILABLE && r.reason.is_empty()),
        "every request gets the upstream's own 503"
    );
    let m = scrape(&proxy).await;
    let count = |what: &str| {
        metric(
            &m,
            &format!(
                "outrigger_retries_skipped_total{{cluster=\"app\",listener=\"in\",reason=\"{what}\",route=\"api\"}}"
            ),
        )
    };
    // Request n deposits before its retry asks: every fifth request finds a token, once.
    assert_eq!(
        metric(
            &m,
            "outrigger_retries_total{cluster=\"app\",listener=\"in\",route=\"api\"}"
        ),
        20.0
    );
    assert_eq!(
        count("budget"),
        100.0,
        "80 first retries and 20 second ones refused"
    );
    assert_eq!(count("attempts"), 0.0);
    assert_eq!(
        metric(&m, "outrigger_upstream_attempts_total{cluster=\"app\"}"),
        120.0
    );
    assert_eq!(a.hits() + b.hits(), 120);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_opens_the_breaker_which_then_fails_fast_without_reaching_the_origin() {
    let (a, b) = (Origin::start("a").await, Origin::start("b").await);
    a.control.set_status(503);
    b.control.set_status(503);
    let proxy = Proxy::start(&format!(
        "listeners:
  - name: in
    address: 127.0.0.1:0
    routes:
      - name: api
        cluster: app
clusters:
  - name: app
    endpoints: [{}, {}]
    outlier_detection: {{ enabled: false }}
    circuit_breaker:
      window_calls: 20
      minimum_calls: 20
      open_duration: 60s
      max_open_duration: 60s
",
        a.addr, b.addr
    ))
    .await;
    let results = sequential(&proxy.url("in", "/"), 100).await;
    // Three tries per request until the 20th try fails and opens the breaker: six requests get
    // the upstream's 503; the seventh's third try, and every request after it, the breaker's.
    let upstream = results
        .iter()
        .take_while(|r| r.reason.is_empty() && !r.origin.is_empty())
        .count();
    assert_eq!(upstream, 6, "{:?}", &results[..8]);
    assert!(
        results[upstream..]
            .iter()
            .all(|r| r.status == StatusCode::SERVICE_UNAVAILABLE
                && r.reason == "circuit_open"
                && r.origin.is_empty()),
        "after it opens, every answer is the breaker's own"
    );
    // No retry storm: a hundred requests cost the upstream the twenty tries that opened it.
    assert_eq!(a.hits() + b.hits(), 20);
    let m = scrape(&proxy).await;
    assert_eq!(
        metric(&m, "outrigger_upstream_attempts_total{cluster=\"app\"}"),
        20.0
    );
    assert_eq!(
        metric(
            &m,
            "outrigger_local_replies_total{listener=\"in\",reason=\"circuit_open\"}"
        ),
        94.0
    );
    assert_eq!(
        metric(
            &m,
            "outrigger_circuit_opened_total{cluster=\"app\",scope=\"cluster\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(
            &m,
            "outrigger_circuit_state{cluster=\"app\",state=\"open\"}"
        ),
        1.0
    );
    let status = clusters(&proxy).await;
    assert_eq!(status["circuit"], "open", "{status}");
    let left = status["circuit_open_ms"].as_u64().unwrap();
    assert!(left > 0 && left <= 60_000, "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healed_upstream_closes_the_breaker_through_its_half_open_probes() {
    let origin = Origin::start("o").await;
    origin.control.set_status(503);
    let proxy = Proxy::start(&format!(
        "listeners:
  - name: in
    address: 127.0.0.1:0
    routes:
      - name: api
        cluster: app
        retry: {{ attempts: 1 }}
clusters:
  - name: app
    endpoints: [{}]
    outlier_detection: {{ enabled: false }}
    circuit_breaker:
      window_calls: 4
      minimum_calls: 4
      open_duration: 200ms
      max_open_duration: 200ms
      half_open_probes: 2
",
        origin.addr
    ))
    .await;
    let url = proxy.url("in", "/");
    let results = sequential(&url, 4).await;
    assert!(results
        .iter()
        .all(|r| r.status == StatusCode::SERVICE_UNAVAILABLE && r.origin == "o"));
    let state = |m: &str, s: &str| {
        metric(
            m,
            &format!("outrigger_circuit_state{{cluster=\"app\",state=\"{s}\"}}"),
        )
    };
    let m = scrape(&proxy).await;
    assert_eq!(state(&m, "open"), 1.0, "four failures of four opened it");

    origin.control.set_status(0);
    let healed_hits = origin.hits();
    let client = h1_client();
    let answers = std::cell::RefCell::new(Vec::new());
    let (client, url, proxy_ref, answers_ref) = (&client, &url, &proxy, &answers);
    let closed = eventually(WAIT, || async move {
        let r = fetch(client, Request::get(url).body(empty()).unwrap()).await;
        let ok = r.status == StatusCode::OK;
        answers_ref.borrow_mut().push(r);
        ok && state(&scrape(proxy_ref).await, "closed") == 1.0
    })
    .await;
    let answers = answers.into_inner();
    assert!(closed, "the breaker closed: {answers:?}");
    // While open, answers are the breaker's own and reach nobody; then two probes pass, and
    // their success closes it.
    let ok = answers
        .iter()
        .filter(|r| r.status == StatusCode::OK)
        .count();
    assert!(answers
        .iter()
        .all(|r| r.status == StatusCode::OK || r.reason == "circuit_open"));
    assert_eq!(ok, 2, "{answers:?}");
    assert_eq!(origin.hits() - healed_hits, 2, "only the probes reached it");
    let m = scrape(&proxy).await;
    assert_eq!(
        metric(
            &m,
            "outrigger_circuit_opened_total{cluster=\"app\",scope=\"cluster\"}"
        ),
        1.0,
        "it never reopened"
    );
    assert_eq!(clusters(&proxy).await["circuit"], "closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_answer_504_and_the_deadline_travels_upstream() {
    let slow = Origin::start("slow").await;
    slow.control.set_delay(30_000);
    let fast = Origin::start("fast").await;
    let proxy = Proxy::start(&format!(
        "listeners:
  - name: in
    address: 127.0.0.1:0
    routes:
      - name: per-try
        match: {{ prefix: /per-try }}
        cluster: slow
        timeout: 20s
        retry:
          attempts: 2
          retry_on: [timeout]
          per_try_timeout: 200ms
          backoff_base: 1ms
          backoff_max: 1ms
      - name: whole
        match: {{ prefix: /whole }}
        cluster: slow
        timeout: 300ms
      - name: deadline
        cluster: fast
        timeout: 800ms
clusters:
  - name: slow
    endpoints: [{}]
    circuit_breaker: {{ enabled: false }}
  - name: fast
    endpoints: [{}]
",
        slow.addr, fast.addr
    ))
    .await;
    let client = h1_client();
    let route_metric = |m: &str, name: &str, route: &str| {
        metric(
            m,
            &format!("outrigger_{name}{{cluster=\"slow\",listener=\"in\",route=\"{route}\"}}"),
        )
    };
    let skipped = |m: &str, route: &str| {
        metric(
            m,
            &format!(
                "outrigger_retries_skipped_total{{cluster=\"slow\",listener=\"in\",reason=\"attempts\",route=\"{route}\"}}"
            ),
        )
    };

    // The route timeout ends the request, and is never retried.
    let (status, headers, _) = get(&client, &proxy.url("in", "/whole")).await.unwrap();
    assert_eq!(
        (status, reason(&headers)),
        (StatusCode::GATEWAY_TIMEOUT, "timeout")
    );
    let m = scrape(&proxy).await;
    assert_eq!(route_metric(&m, "retries_total", "whole"), 0.0);
    assert_eq!(
        metric(&m, "outrigger_upstream_attempts_total{cluster=\"slow\"}"),
        1.0
    );

    // Per-try timeouts are retried (here once), and the last one is the answer.
    let (status, headers, _) = get(&client, &proxy.url("in", "/per-try")).await.unwrap();
    assert_eq!(
        (status, reason(&headers)),
        (StatusCode::GATEWAY_TIMEOUT, "timeout")
    );
    let m = scrape(&proxy).await;
    assert_eq!(route_metric(&m, "retries_total", "per-try"), 1.0);
    assert_eq!(skipped(&m, "per-try"), 1.0, "no try was left");
    assert_eq!(
        metric(&m, "outrigger_upstream_attempts_total{cluster=\"slow\"}"),
        3.0
    );

    // The route's budget travels upstream (never more than it), and a caller's smaller deadline
    // wins; gRPC requests get the same time as `grpc-timeout`.
    let sent = |name: &str| -> u64 {
        fast.control
            .last_header(name)
            .unwrap_or_else(|| panic!("{name} sent upstream"))
            .trim_end_matches('m')
            .parse()
            .unwrap()
    };
    get(&client, &proxy.url("in", "/headers")).await.unwrap();
    let ms = sent("x-outrigger-deadline-ms");
    assert!((1..=800).contains(&ms), "{ms}");
    assert!(fast.control.last_header("grpc-timeout").is_none());
    let req = Request::get(proxy.url("in", "/headers"))
        .header("x-outrigger-deadline-ms", "200")
        .body(empty())
        .unwrap();
    send(&client, req).await.unwrap();
    let ms = sent("x-outrigger-deadline-ms");
    assert!((1..=200).contains(&ms), "{ms}");
    let req = Request::post(proxy.url("in", "/test.Echo/Unary"))
        .header("content-type", "application/grpc")
        .header("grpc-timeout", "100m")
        .body(body(grpc_frame(b"x")))
        .unwrap();
    send(&client, req).await.unwrap();
    let ms = sent("x-outrigger-deadline-ms");
    assert!((1..=100).contains(&ms), "{ms}");
    assert_eq!(
        fast.control.last_header("grpc-timeout").unwrap(),
        format!("{ms}m"),
        "both headers carry the same time"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_is_retried_after_a_connect_failure_only() {
    let good = Origin::start("good").await;
    let failing = Origin::start("failing").await;
    failing.control.set_status(503);
    // A port with nothing listening: bind, note, close.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let proxy = Proxy::start(&format!(
        "listeners:
  - name: in
    address: 127.0.0.1:0
    routes:
      - name: flaky
        match: {{ prefix: /echo }}
        cluster: half-dead
      - name: failing
        cluster: failing
clusters:
  - name: half-dead
    endpoints: [{dead}, {}]
    load_balancer: round_robin
  - name: failing
    endpoints: [{}]
",
        good.addr, failing.addr
    ))
    .await;
    let client = h1_client();
    for i in 0..10 {
        let payload = format!("order {i}: {}", "x".repeat(1000));
        let req = Request::post(proxy.url("in", "/echo"))
            .body(body(payload.clone()))
            .unwrap();
        let (status, _, text) = send(&client, req).await.unwrap();
        assert_eq!(status, StatusCode::OK);
        assert_eq!(text, payload, "the replayed body arrives whole");
    }
    let m = scrape(&proxy).await;
    let connect_errors = metric(
        &m,
        "outrigger_upstream_connect_errors_total{cluster=\"half-dead\"}",
    );
    assert!(
        connect_errors >= 1.0,
        "the first POST went to the dead endpoint first"
    );
    assert_eq!(
        metric(
            &m,
            "outrigger_retries_total{cluster=\"half-dead\",listener=\"in\",route=\"flaky\"}"
        ),
        connect_errors,
        "every connect failure was retried"
    );

    let req = Request::post(proxy.url("in", "/order"))
        .body(body("once"))
        .unwrap();
    let (status, _, _) = send(&client, req).await.unwrap();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        failing.hits(),
        1,
        "a POST that reached the upstream is not sent again"
    );
    let (status, _, _) = get(&client, &proxy.url("in", "/order")).await.unwrap();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(failing.hits(), 4, "a GET is: three tries");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_status_in_trailers_is_retried() {
    let a = Origin::start("a").await;
    a.control.grpc_status.store(14, Ordering::SeqCst);
    let b = Origin::start("b").await;
    let proxy = Proxy::start(&format!(
        "listeners:
  - name: in
    address: 127.0.0.1:0
    routes:
      - name: grpc
        cluster: echo
        retry:
          retry_on: []
          grpc_codes: [unavailable]
          non_idempotent: true
clusters:
  - name: echo
    endpoints: [{}, {}]
    load_balancer: round_robin
    protocol: http2
    circuit_breaker: {{ enabled: false }}
",
        a.addr, b.addr
    ))
    .await;
    let client = h2_client();
    for _ in 0..6 {
        let req = Request::post(proxy.url("in", "/test.Echo/Unary"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(body(grpc_frame(b"hi")))
            .unwrap();
        let resp = client.request(req).await.unwrap();
        let collected = http_body_util::BodyExt::collect(resp.into_body())
            .await
            .unwrap();
        let trailers = collected.trailers().cloned().unwrap();
        assert_eq!(
            trailers["grpc-status"], "0",
            "the retry reached the healthy endpoint"
        );
        assert_eq!(grpc_messages(&collected.to_bytes()), ["echo:hi"]);
    }
    // Round robin sends each call's first try to `a` (its retry takes the next turn, `b`) until
    // five UNAVAILABLEs in a row eject `a`; the sixth call goes straight to `b`.
    assert_eq!((a.hits(), b.hits()), (5, 6));
    let m = scrape(&proxy).await;
    assert_eq!(
        metric(
            &m,
            "outrigger_retries_total{cluster=\"echo\",listener=\"in\",route=\"grpc\"}"
        ),
        5.0
    );
    assert_eq!(
        metric(&m, "outrigger_outlier_ejections_total{cluster=\"echo\"}"),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_admits_its_burst_then_answers_429_and_throttle_delays_instead() {
    let origin = Origin::start("o").await;
    let proxy = Proxy::start(&format!(
        "listeners:
  - name: in
    address: 127.0.0.1:0
    routes:
      - name: limited
        match: {{ prefix: /limited }}
        cluster: o
        rate_limit: {{ requests_per_second: 0.01, burst: 5 }}
      - name: throttled
        cluster: o
        rate_limit: {{ requests_per_second: 0.5, burst: 1, mode: throttle, max_delay: 2500ms }}
clusters:
  - name: o
    endpoints: [{}]
",
        origin.addr
    ))
    .await;
    let client = h1_client();
    // One request per 100 s refills nothing during the test: the burst of five passes, then
    // every request is refused.
    let mut statuses = Vec::new();
    for i in 0..8 {
        let (status, headers, _) = get(&client, &proxy.url("in", "/limited")).await.unwrap();
        statuses.push(status.as_u16());
        assert_eq!(headers["ratelimit-limit"], "5");
        if i < 5 {
            assert_eq!(
                headers["ratelimit-remaining"],
                (4 - i).to_string(),
                "request {i}"
            );
            assert_eq!(headers["x-origin"], "o");
        } else {
            assert_eq!(reason(&headers), "rate_limited");
            assert_eq!(headers["ratelimit-remaining"], "0");
            let retry_after: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
            assert!((1..=100).contains(&retry_after), "{retry_after}");
            assert_eq!(headers["ratelimit-reset"], headers["retry-after"]);
        }
    }
    assert_eq!(statuses, [200, 200, 200, 200, 200, 429, 429, 429]);
    assert_eq!(origin.hits(), 5);
    let m = scrape(&proxy).await;
    let limited = |action: &str, route: &str| {
        metric(
            &m,
            &format!(
                "outrigger_rate_limited_total{{action=\"{action}\",listener=\"in\",route=\"{route}\"}}"
            ),
        )
    };
    assert_eq!(limited("rejected", "limited"), 3.0);
    assert_eq!(limited("delayed", "limited"), 0.0);

    // Throttle at one per 2 s with up to 2.5 s of delay: the first passes, the second waits for
    // its slot (2 s away), the third (4 s away, unless it comes 1.5 s after the first) is refused.
    let url = proxy.url("in", "/t");
    let (status, _, _) = get(&client, &url).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    let delayed = {
        let (client, url) = (client.clone(), url.clone());
        tokio::spawn(async move { get(&client, &url).await.unwrap() })
    };
    let throttled = |action: &'static str| {
        let proxy = &proxy;
        async move {
            metric(
                &scrape(proxy).await,
                &format!(
                    "outrigger_rate_limited_total{{action=\"{action}\",listener=\"in\",route=\"throttled\"}}"
                ),
            )
        }
    };
    assert!(eventually(WAIT, || async { throttled("delayed").await == 1.0 }).await);
    let (status, headers, _) = get(&client, &url).await.unwrap();
    assert_eq!(
        (status, reason(&headers)),
        (StatusCode::TOO_MANY_REQUESTS, "rate_limited")
    );
    let (status, headers, _) = delayed.await.unwrap();
    assert_eq!(
        (status, reason(&headers)),
        (StatusCode::OK, ""),
        "the delayed request was served"
    );
    assert_eq!(
        (throttled("delayed").await, throttled("rejected").await),
        (1.0, 1.0)
    );
    assert_eq!(origin.hits(), 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_bulkhead_refuses_its_own_cluster_while_the_other_keeps_answering() {
    let stuck = HoldOrigin::start().await;
    let healthy = Origin::start("healthy").await;
    let proxy = Proxy::start(&format!(
        "listeners:
  - name: in
    address: 127.0.0.1:0
    routes:
      - name: stuck
        match: {{ prefix: /stuck }}
        cluster: stuck
        timeout: 60s
      - name: healthy
        cluster: healthy
clusters:
  - name: stuck
    endpoints: [{}]
    bulkhead: {{ max_concurrent: 4, max_pending: 2, queue_timeout: 60s }}
    circuit_breaker: {{ enabled: false }}
  - name: healthy
    endpoints: [{}]
",
        stuck.addr, healthy.addr
    ))
    .await;
    let client = h1_client();
    // Six requests to the stuck cluster: four take its slots, two wait in its queue.
    let mut waiting = JoinSet::new();
    for _ in 0..6 {
        let (client, url) = (client.clone(), proxy.url("in", "/stuck"));
        waiting.spawn(async move { get(&client, &url).await.unwrap().0 });
    }
    let gauge = |name: &str, cluster: &str, m: &str| {
        metric(
            m,
            &format!("outrigger_bulkhead_{name}{{name=\"{cluster}\",scope=\"cluster\"}}"),
        )
    };
    let full = eventually(WAIT, || async {
        let m = scrape(&proxy).await;
        gauge("active", "stuck", &m) == 4.0
            && gauge("queued", "stuck", &m) == 2.0
            && stuck.arrived() == 4
    })
    .await;
    assert!(full, "{}", scrape(&proxy).await);

    // A seventh finds the queue full and is refused at once by the stuck cluster's bulkhead
    // (a queued request would wait its 60 s queue timeout, longer than this test waits).
    let (status, headers, _) = tokio::time::timeout(WAIT, get(&client, &proxy.url("in", "/stuck")))
        .await
        .expect("refused without queueing")
        .unwrap();
    assert_eq!(
        (status, reason(&headers)),
        (StatusCode::SERVICE_UNAVAILABLE, "bulkhead_full")
    );
    // Meanwhile the healthy cluster answers everything.
    let healthy_results = closed_loop(&proxy.url("in", "/fast"), 4, 200).await;
    assert_eq!(healthy_results.len(), 200);
    assert!(healthy_results
        .iter()
        .all(|r| r.status == StatusCode::OK && r.origin == "healthy"));
    let m = scrape(&proxy).await;
    assert_eq!(
        (gauge("active", "stuck", &m), gauge("queued", "stuck", &m)),
        (4.0, 2.0),
        "the stuck cluster's bulkhead stayed full throughout"
    );
    assert_eq!(gauge("active", "healthy", &m), 0.0);
    assert_eq!(
        metric(
            &m,
            "outrigger_local_replies_total{listener=\"in\",reason=\"bulkhead_full\"}"
        ),
        1.0
    );

    // Once the stuck origin answers, the six held requests all complete.
    stuck.release(6);
    let mut done = Vec::new();
    while let Some(r) = waiting.join_next().await {
        done.push(r.unwrap());
    }
    assert_eq!(done, [StatusCode::OK; 6]);
    assert_eq!(stuck.arrived(), 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_shedding_answers_overloaded_and_serves_high_priority_first() {
    let origin = HoldOrigin::start().await;
    let proxy = Proxy::start(&format!(
        "listeners:
  - name: in
    address: 127.0.0.1:0
    load_shed: {{ initial_limit: 2, min_limit: 2, max_limit: 2, queue_timeout: 60s, max_queue: 4 }}
    routes:
      - name: all
        cluster: o
        timeout: 60s
clusters:
  - name: o
    endpoints: [{}]
",
        origin.addr
    ))
    .await;
    let client = h1_client();
    let request = |priority: &'static str| {
        let (client, url) = (client.clone(), proxy.url("in", "/"));
        async move {
            let req = Request::get(url)
                .header("x-outrigger-priority", priority)
                .body(empty())
                .unwrap();
            fetch(&client, req).await
        }
    };
    let shed_metric =
        |m: &str, name: &str| metric(m, &format!("outrigger_load_shed_{name}{{listener=\"in\"}}"));
    // Ten low-priority requests: two admitted, four queued, four shed at once.
    let mut low = JoinSet::new();
    for _ in 0..10 {
        low.spawn(request("9"));
    }
    let settled = eventually(WAIT, || async {
        let m = scrape(&proxy).await;
        shed_metric(&m, "in_flight") == 2.0
            && shed_metric(&m, "queued") == 4.0
            && shed_metric(&m, "total") == 4.0
            && origin.arrived() == 2
    })
    .await;
    assert!(settled, "{}", scrape(&proxy).await);
    // Three high-priority ones: each takes the place of the newest low-priority waiter.
    let mut high = JoinSet::new();
    for _ in 0..3 {
        high.spawn(request("0"));
    }
    let evicted = eventually(WAIT, || async {
        let m = scrape(&proxy).await;
        shed_metric(&m, "total") == 7.0 && shed_metric(&m, "queued") == 4.0
    })
    .await;
    assert!(evicted, "{}", scrape(&proxy).await);
    assert_eq!(origin.arrived(), 2, "nothing more was admitted");

    // Free one slot at a time, so that each admission shows in the order of arrival.
    for arrived in 3..=6 {
        origin.release(1);
        assert!(
            eventually(WAIT, || async { origin.arrived() == arrived }).await,
            "{:?}",
            origin.priorities()
        );
    }
    origin.release(2);
    let mut high_results = Vec::new();
    while let Some(r) = high.join_next().await {
        high_results.push(r.unwrap());
    }
    let mut low_results = Vec::new();
    while let Some(r) = low.join_next().await {
        low_results.push(r.unwrap());
    }
    assert!(
        high_results.iter().all(|r| r.status == StatusCode::OK),
        "{high_results:?}"
    );
    let shed = low_results
        .iter()
        .filter(|r| r.status == StatusCode::SERVICE_UNAVAILABLE && r.reason == "overloaded")
        .count();
    let low_ok = low_results
        .iter()
        .filter(|r| r.status == StatusCode::OK)
        .count();
    assert_eq!((shed, low_ok), (7, 3), "{low_results:?}");
    // As slots freed up, the queue was served in priority order.
    assert_eq!(origin.priorities(), ["9", "9", "0", "0", "0", "9"]);
    assert_eq!(shed_metric(&scrape(&proxy).await, "total"), 7.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_abort_and_delay_on_command() {
    let origin = Origin::start("o").await;
    let proxy = Proxy::start(&format!(
        "listeners:
  - name: in
    address: 127.0.0.1:0
    routes:
      - name: abort
        match: {{ prefix: /abort }}
        cluster: o
        fault: {{ abort: {{ percent: 100, status: 500 }} }}
      - name: delay
        cluster: o
        fault: {{ delay: {{ percent: 100, duration: 20ms }} }}
clusters:
  - name: o
    endpoints: [{}]
",
        origin.addr
    ))
    .await;
    let client = h1_client();
    let (status, headers, body) = get(&client, &proxy.url("in", "/abort")).await.unwrap();
    assert_eq!(
        (status, reason(&headers), body.as_str()),
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            "fault_injected",
            "fault_injected\n"
        )
    );
    assert_eq!(
        origin.hits(),
        0,
        "an aborted request never reaches the upstream"
    );
    // A delayed request still reaches the upstream and is answered (the delay itself is timed
    // in paused time by the fault layer's unit test).
    let (status, headers, _) = get(&client, &proxy.url("in", "/slow")).await.unwrap();
    assert_eq!((status, origin_of(&headers)), (StatusCode::OK, "o"));
    assert_eq!(origin.hits(), 1);
    let m = scrape(&proxy).await;
    let faults = |kind: &str, route: &str| {
        metric(
            &m,
            &format!(
                "outrigger_faults_injected_total{{kind=\"{kind}\",listener=\"in\",route=\"{route}\"}}"
            ),
        )
    };
    assert_eq!(faults("abort", "abort"), 1.0);
    assert_eq!(faults("delay", "delay"), 1.0);
    assert_eq!(faults("abort", "delay"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_streams_connections_and_slow_headers_are_cut() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let origin = Origin::start("o").await;
    let proxy = Proxy::start(&format!(
        "listeners:
  - name: in
    address: 127.0.0.1:0
    idle_timeout: 300ms
    routes:
      - name: all
        cluster: o
        idle_timeout: 200ms
  - name: strict
    address: 127.0.0.1:0
    header_read_timeout: 300ms
    routes:
      - name: strict-all
        cluster: o
clusters:
  - name: o
    endpoints: [{}]
",
        origin.addr
    ))
    .await;

    // A response stream that stalls after its first chunk (the origin never sends the second)
    // is aborted by the route's idle timeout instead of hanging.
    let client = h1_client();
    let resp = client
        .request(
            Request::get(proxy.url("in", "/stream"))
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    let mut body = resp.into_body();
    let first = http_body_util::BodyExt::frame(&mut body)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.into_data().unwrap(), "first;");
    let next = tokio::time::timeout(WAIT, http_body_util::BodyExt::frame(&mut body)).await;
    assert!(
        matches!(next, Ok(Some(Err(_)))),
        "the stalled stream ends in an error: {next:?}"
    );

    // A keep-alive connection with no request is closed by the listener's idle timeout.
    let mut s = tokio::net::TcpStream::connect(proxy.addr("in"))
        .await
        .unwrap();
    s.write_all(b"GET /x HTTP/1.1\r\nhost: t\r\n\r\n")
        .await
        .unwrap();
    let answer = read_response(&mut s).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let mut buf = vec![0u8; 4096];
    let closed = tokio::time::timeout(WAIT, s.read(&mut buf)).await;
    assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "{closed:?}");

    // A client that never finishes its headers gets 408 and the connection is closed.
    let mut s = tokio::net::TcpStream::connect(proxy.addr("strict"))
        .await
        .unwrap();
    s.write_all(b"GET /x HTTP/1.1\r\nhost: t\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let cut = tokio::time::timeout(WAIT, s.read_to_end(&mut answer)).await;
    assert!(cut.is_ok(), "the slow client was cut off");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("header_read_timeout"), "{answer}");
    assert_eq!(origin.hits(), 2, "the slow head never reached the origin");
    assert_eq!(
        metric(
            &scrape(&proxy).await,
            "outrigger_requests_refused_total{listener=\"strict\",reason=\"header_timeout\"}"
        ),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_try_timeouts_eject_the_slow_endpoint() {
    let (fast, slow) = (Origin::start("fast").await, Origin::start("slow").await);
    slow.control.set_delay(30_000);
    let proxy = Proxy::start(&format!(
        "listeners:
  - name: in
    address: 127.0.0.1:0
    routes:
      - name: all
        cluster: app
        timeout: 20s
        retry:
          retry_on: [timeout, connect-failure]
          per_try_timeout: 1s
          backoff_base: 1ms
          backoff_max: 1ms
clusters:
  - name: app
    load_balancer: round_robin
    endpoints: [{}, {}]
    outlier_detection: {{ base_ejection_time: 300s }}
",
        fast.addr, slow.addr
    ))
    .await;
    let url = proxy.url("in", "/");
    let client = h1_client();
    let retries = || async {
        metric(
            &scrape(&proxy).await,
            "outrigger_retries_total{cluster=\"app\",listener=\"in\",route=\"all\"}",
        )
    };
    let ejected = || async { endpoint(&clusters(&proxy).await, slow.addr)["ejected"] == true };
    // Round robin gives the slow endpoint the first try of every request after the first; each
    // such try runs out of its per-try timeout and is retried on the fast one. Five timeouts in
    // a row eject it.
    let mut answers = Vec::new();
    for _ in 0..20 {
        answers.push(fetch(&client, Request::get(&url).body(empty()).unwrap()).await);
        if ejected().await {
            break;
        }
    }
    assert!(
        answers
            .iter()
            .all(|r| r.status == StatusCode::OK && r.origin == "fast"),
        "every request succeeds on the fast endpoint: {answers:?}"
    );
    assert_eq!(answers.len(), 6, "ejected after the fifth timeout");
    assert_eq!(retries().await, 5.0);
    assert_eq!(
        metric(
            &scrape(&proxy).await,
            "outrigger_outlier_ejections_total{cluster=\"app\"}"
        ),
        1.0
    );

    // Once ejected, it gets no more tries: every request takes one try, on the fast endpoint.
    let attempts = || async {
        metric(
            &scrape(&proxy).await,
            "outrigger_upstream_attempts_total{cluster=\"app\"}",
        )
    };
    let before = attempts().await;
    let after = sequential(&url, 20).await;
    assert!(after
        .iter()
        .all(|r| r.status == StatusCode::OK && r.origin == "fast"));
    assert_eq!(attempts().await - before, 20.0);
    assert_eq!(retries().await, 5.0);
    assert!(ejected().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_keeps_rate_limit_buckets_that_did_not_change() {
    let origin = Origin::start("o").await;
    let config = |timeout: &str| {
        format!(
            "listeners:
  - name: in
    address: 127.0.0.1:0
    routes:
      - name: limited
        cluster: o
        timeout: {timeout}
        rate_limit: {{ requests_per_second: 0.01, burst: 3 }}
clusters:
  - name: o
    endpoints: [{}]
",
            origin.addr
        )
    };
    let proxy = Proxy::start(&config("5s")).await;
    let client = h1_client();
    let mut statuses = Vec::new();
    for _ in 0..4 {
        statuses.push(
            get(&client, &proxy.url("in", "/"))
                .await
                .unwrap()
                .0
                .as_u16(),
        );
    }
    assert_eq!(statuses, [200, 200, 200, 429]);
    proxy.write_config(&config("6s"));
    let reloaded = eventually(WAIT, || async {
        metric(&scrape(&proxy).await, "outrigger_config_version") >= 2.0
    })
    .await;
    assert!(reloaded);
    let (status, _, _) = get(&client, &proxy.url("in", "/")).await.unwrap();
    assert_eq!(
        status.as_u16(),
        429,
        "the drained bucket survived a reload of the same limit"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_is_honoured_up_to_its_cap() {
    let origin = Origin::start("o").await;
    origin.control.set_status(503);
    origin.control.retry_after.store(1, Ordering::SeqCst);
    let proxy = Proxy::start(&format!(
        "listeners:
  - name: in
    address: 127.0.0.1:0
    routes:
      - name: patient
        match: {{ prefix: /patient }}
        cluster: o
        retry: {{ attempts: 2, retry_after_max: 1s }}
      - name: hasty
        cluster: o
        retry: {{ attempts: 2, retry_after_max: 500ms }}
clusters:
  - name: o
    endpoints: [{}]
    circuit_breaker: {{ enabled: false }}
",
        origin.addr
    ))
    .await;
    let client = h1_client();
    // The wait itself (exactly the asked-for second) is timed by the retry layer's unit tests.
    let (status, headers, _) = get(&client, &proxy.url("in", "/patient")).await.unwrap();
    assert_eq!(
        (status, reason(&headers)),
        (StatusCode::SERVICE_UNAVAILABLE, "")
    );
    assert_eq!(origin.hits(), 2, "retried once, after the asked-for second");

    let (status, headers, _) = get(&client, &proxy.url("in", "/hasty")).await.unwrap();
    assert_eq!(
        (status, reason(&headers)),
        (StatusCode::SERVICE_UNAVAILABLE, "")
    );
    assert_eq!(
        origin.hits(),
        3,
        "a Retry-After beyond the cap is answered at once"
    );
    let m = scrape(&proxy).await;
    let count = |name: &str, route: &str| {
        metric(
            &m,
            &format!("outrigger_{name}{{cluster=\"o\",listener=\"in\",route=\"{route}\"}}"),
        )
    };
    assert_eq!(count("retries_total", "patient"), 1.0);
    assert_eq!(count("retries_total", "hasty"), 0.0);
    assert_eq!(
        metric(&m, "outrigger_retries_skipped_total{cluster=\"o\",listener=\"in\",reason=\"retry_after\",route=\"hasty\"}"),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callers_short_deadline_is_its_own_error_and_harms_no_endpoint() {
    let slow = Origin::start("slow").await;
    let proxy = Proxy::start(&format!(
        "listeners:
  - name: in
    address: 127.0.0.1:0
    routes:
      - name: all
        cluster: o
        timeout: 5s
clusters:
  - name: o
    endpoints: [{}]
    outlier_detection: {{ consecutive_gateway_errors: 2 }}
    circuit_breaker: {{ consecutive_failures: 2 }}
",
        slow.addr
    ))
    .await;
    let client = h1_client();
    // The origin would take 30 s; the caller gives 50 ms, well before the route's 5 s.
    for _ in 0..5 {
        let req = Request::get(proxy.url("in", "/delay/30000"))
            .header("x-outrigger-deadline-ms", "50")
            .body(empty())
            .unwrap();
        let (status, headers, _) = send(&client, req).await.unwrap();
        assert_eq!(
            (status, reason(&headers)),
            (StatusCode::GATEWAY_TIMEOUT, "deadline_exceeded")
        );
    }
    let m = scrape(&proxy).await;
    assert_eq!(
        metric(&m, "outrigger_outlier_ejections_total{cluster=\"o\"}"),
        0.0
    );
    assert_eq!(
        metric(
            &m,
            "outrigger_circuit_state{cluster=\"o\",state=\"closed\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(
            &m,
            "outrigger_retries_total{cluster=\"o\",listener=\"in\",route=\"all\"}"
        ),
        0.0,
        "deadline_exceeded is never retried"
    );
    assert_eq!(
        metric(&m, "outrigger_upstream_attempts_total{cluster=\"o\"}"),
        5.0
    );
    assert_eq!(
        metric(
            &m,
            "outrigger_local_replies_total{listener=\"in\",reason=\"deadline_exceeded\"}"
        ),
        5.0
    );
    // Without the caller's deadline the same endpoint answers.
    let (status, headers, _) = get(&client, &proxy.url("in", "/")).await.unwrap();
    assert_eq!((status, origin_of(&headers)), (StatusCode::OK, "slow"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_answer_cut_short_is_retried_not_relayed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // Answers headers and half of the promised body, then closes.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let broken = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let mut buf = [0u8; 2048];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhalf_")
                    .await;
            });
        }
    });
    let good = Origin::start("good").await;
    let proxy = Proxy::start(&format!(
        "listeners:
  - name: in
    address: 127.0.0.1:0
    routes:
      - name: all
        cluster: app
clusters:
  - name: app
    endpoints: [{broken}, {}]
    load_balancer: round_robin
    outlier_detection: {{ enabled: false }}
",
        good.addr
    ))
    .await;
    let client = h1_client();
    for _ in 0..6 {
        let (status, headers, body) = get(&client, &proxy.url("in", "/x")).await.unwrap();
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers["x-origin"], "good", "{body}");
    }
    // Round robin gives the broken endpoint every first try; each is retried on the good one.
    assert_eq!(good.hits(), 6);
    let m = scrape(&proxy).await;
    assert_eq!(
        metric(
            &m,
            "outrigger_retries_total{cluster=\"app\",listener=\"in\",route=\"all\"}"
        ),
        6.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_breakers_take_a_failing_endpoint_out_while_the_cluster_stays_closed() {
    let (bad, good) = (Origin::start("bad").await, Origin::start("good").await);
    bad.control.set_status(503);
    // Outlier ejection off and the cluster breaker's triggers off, so that only the endpoint
    // breakers (5 failures in a row, by default) can act.
    let proxy = Proxy::start(&format!(
        "listeners:
  - name: in
    address: 127.0.0.1:0
    routes:
      - name: api
        cluster: app
clusters:
  - name: app
    endpoints: [{}, {}]
    load_balancer: round_robin
    outlier_detection: {{ enabled: false }}
    circuit_breaker:
      failure_rate: 0
      per_endpoint: true
      open_duration: 60s
      max_open_duration: 60s
",
        bad.addr, good.addr
    ))
    .await;
    let client = h1_client();
    let url = proxy.url("in", "/");
    let opened = |scope: &'static str| {
        let proxy = &proxy;
        async move {
            metric(
                &scrape(proxy).await,
                &format!("outrigger_circuit_opened_total{{cluster=\"app\",scope=\"{scope}\"}}"),
            )
        }
    };
    // Round robin gives `bad` each request's first try (retried on `good`) until its breaker
    // opens after five failures in a row.
    let mut answers = Vec::new();
    for _ in 0..20 {
        answers.push(fetch(&client, Request::get(&url).body(empty()).unwrap()).await);
        if opened("endpoint").await == 1.0 {
            break;
        }
    }
    assert_eq!(answers.len(), 5, "{answers:?}");
    assert!(answers
        .iter()
        .all(|r| r.status == StatusCode::OK && r.origin == "good"));
    assert_eq!(bad.hits(), 5);

    // Open: every try skips `bad`, without a failure to retry.
    let after = sequential(&url, 20).await;
    assert!(after
        .iter()
        .all(|r| r.status == StatusCode::OK && r.origin == "good"));
    assert_eq!(bad.hits(), 5, "no try reached the open endpoint");
    assert_eq!(
        metric(
            &scrape(&proxy).await,
            "outrigger_retries_total{cluster=\"app\",listener=\"in\",route=\"api\"}"
        ),
        5.0
    );
    assert_eq!(opened("cluster").await, 0.0);
    let status = clusters(&proxy).await;
    assert_eq!(status["circuit"], "closed", "{status}");
    let bad_ep = endpoint(&status, bad.addr);
    assert_eq!(bad_ep["circuit"], "open", "{status}");
    assert!(bad_ep["circuit_open_ms"].as_u64().unwrap() > 0);
    assert_eq!(bad_ep["ejected"], false);
    assert_eq!(endpoint(&status, good.addr)["circuit"], "closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_stream_is_retried_for_any_method() {
    let origin = H2Refuser::start().await;
    let proxy = Proxy::start(&format!(
        "listeners:
  - name: in
    address: 127.0.0.1:0
    routes:
      - name: api
        cluster: h2
clusters:
  - name: h2
    endpoints: [{}]
    protocol: http2
    outlier_detection: {{ enabled: false }}
    circuit_breaker: {{ enabled: false }}
",
        origin.addr
    ))
    .await;
    let client = h1_client();
    let retries = || async {
        metric(
            &scrape(&proxy).await,
            "outrigger_retries_total{cluster=\"h2\",listener=\"in\",route=\"api\"}",
        )
    };
    // The first stream of each id is refused (RST_STREAM REFUSED_STREAM): nothing was
    // processed, so even a POST is sent again, body and all.
    for (i, method) in [Method::POST, Method::PATCH, Method::GET]
        .into_iter()
        .enumerate()
    {
        let id = format!("r{i}");
        let req = Request::builder()
            .method(method.clone())
            .uri(proxy.url("in", "/echo"))
            .header("x-test-id", &id)
            .body(body(format!("order {i}")))
            .unwrap();
        let (status, headers, text) = send(&client, req).await.unwrap();
        assert_eq!(
            (status, reason(&headers), text.as_str()),
            (StatusCode::OK, "", format!("order {i}").as_str()),
            "{method}"
        );
        assert_eq!(origin.streams_of(&id), 2, "{method}: refused, then served");
    }
    assert_eq!(retries().await, 3.0);

    // Any other reset of a POST that reached the upstream is not retried.
    let req = Request::post(proxy.url("in", "/reset"))
        .header("x-test-id", "reset")
        .body(body("once"))
        .unwrap();
    let (status, headers, _) = send(&client, req).await.unwrap();
    assert_eq!(
        (status, reason(&headers)),
        (StatusCode::BAD_GATEWAY, "upstream_reset")
    );
    assert_eq!(origin.streams_of("reset"), 1);
    assert_eq!(retries().await, 3.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_skipped_retry_is_counted_by_reason_and_the_last_answer_returned() {
    let (attempts, body_o, deadline) = (
        Origin::start("attempts").await,
        Origin::start("body").await,
        Origin::start("deadline").await,
    );
    for o in [&attempts, &body_o, &deadline] {
        o.control.set_status(503);
    }
    deadline.control.retry_after.store(10, Ordering::SeqCst);
    // The whole body must reach the upstream for its replay cap to be what stops the retry: an
    // answer before the body, with the connection reset, is a retryable reset of a PUT whose
    // body is still replayable (which is right, and is not what this test is about).
    body_o
        .control
        .read_before_forced
        .store(true, Ordering::SeqCst);
    let cluster = |name: &str, addr: SocketAddr| {
        format!(
            "  - name: {name}
    endpoints: [{addr}]
    outlier_detection: {{ enabled: false }}
    circuit_breaker: {{ enabled: false }}
"
        )
    };
    let proxy = Proxy::start(&format!(
        "listeners:
  - name: in
    address: 127.0.0.1:0
    routes:
      - name: attempts
        match: {{ prefix: /attempts }}
        cluster: attempts
        retry: {{ attempts: 2 }}
      - name: body
        match: {{ prefix: /body }}
        cluster: body
        retry: {{ max_body_bytes: 1024 }}
      - name: deadline
        match: {{ prefix: /deadline }}
        cluster: deadline
        timeout: 5s
        retry: {{ retry_after_max: 30s }}
clusters:
{}{}{}",
        cluster("attempts", attempts.addr),
        cluster("body", body_o.addr),
        cluster("deadline", deadline.addr)
    ))
    .await;
    let client = h1_client();
    let skipped = |m: &str, name: &str| -> Vec<f64> {
        ["attempts", "body", "deadline", "budget", "retry_after"]
            .iter()
            .map(|reason| {
                metric(
                    m,
                    &format!(
                        "outrigger_retries_skipped_total{{cluster=\"{name}\",listener=\"in\",reason=\"{reason}\",route=\"{name}\"}}"
                    ),
                )
            })
            .collect()
    };
    let retries = |m: &str, name: &str| {
        metric(
            m,
            &format!(
                "outrigger_retries_total{{cluster=\"{name}\",listener=\"in\",route=\"{name}\"}}"
            ),
        )
    };

    // `attempts`: both tries failed; the second's answer is returned.
    let (status, headers, _) = get(&client, &proxy.url("in", "/attempts")).await.unwrap();
    assert_eq!(
        (status, reason(&headers), origin_of(&headers)),
        (StatusCode::SERVICE_UNAVAILABLE, "", "attempts")
    );
    let m = scrape(&proxy).await;
    assert_eq!(skipped(&m, "attempts"), [1.0, 0.0, 0.0, 0.0, 0.0]);
    assert_eq!(retries(&m, "attempts"), 1.0);
    assert_eq!(attempts.hits(), 2);

    // `body`: a 4 KiB PUT over a 1 KiB replay cap was sent, so it cannot be sent again.
    let req = Request::put(proxy.url("in", "/body"))
        .body(body(vec![b'x'; 4096]))
        .unwrap();
    let (status, headers, _) = send(&client, req).await.unwrap();
    assert_eq!(
        (status, reason(&headers), origin_of(&headers)),
        (StatusCode::SERVICE_UNAVAILABLE, "", "body")
    );
    let m = scrape(&proxy).await;
    assert_eq!(skipped(&m, "body"), [0.0, 1.0, 0.0, 0.0, 0.0]);
    assert_eq!(retries(&m, "body"), 0.0);
    assert_eq!(body_o.hits(), 1);

    // `deadline`: the upstream asks for 10 s (within `retry_after_max`), past the 5 s route
    // timeout: its 503 comes back at once rather than a 504 later.
    let (status, headers, _) = get(&client, &proxy.url("in", "/deadline")).await.unwrap();
    assert_eq!(
        (status, reason(&headers), origin_of(&headers)),
        (StatusCode::SERVICE_UNAVAILABLE, "", "deadline")
    );
    assert_eq!(headers["retry-after"], "10");
    let m = scrape(&proxy).await;
    assert_eq!(skipped(&m, "deadline"), [0.0, 0.0, 1.0, 0.0, 0.0]);
    assert_eq!(retries(&m, "deadline"), 0.0);
    assert_eq!(deadline.hits(), 1);
}

/// One answer as a client saw it.
#[derive(Debug, Clone, PartialEq)]
struct Answer {
    status: StatusCode,
    /// `x-outrigger-error`, or "".
    reason: String,
    /// `x-origin` (which test origin answered), or "".
    origin: String,
}

/// The `x-origin` of a response (which test origin answered), or "".
fn origin_of(headers: &http::HeaderMap) -> &str {
    headers
        .get("x-origin")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

async fn fetch(client: &HttpClient, req: Request<support::Body>) -> Answer {
    match send(client, req).await {
        Ok((status, headers, _)) => Answer {
            status,
            reason: reason(&headers).to_owned(),
            origin: origin_of(&headers).to_owned(),
        },
        Err(e) => panic!("request failed: {e}"),
    }
}

/// `n` GETs of `url`, one after the other on one connection.
async fn sequential(url: &str, n: usize) -> Vec<Answer> {
    let client = h1_client();
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(fetch(&client, Request::get(url).body(empty()).unwrap()).await);
    }
    out
}

/// `workers` clients each sending GETs back to back until `count` are done in all.
async fn closed_loop(url: &str, workers: usize, count: usize) -> Vec<Answer> {
    let client = h1_client();
    let left = Arc::new(AtomicUsize::new(count));
    let mut tasks = JoinSet::new();
    for _ in 0..workers {
        let (client, url, left) = (client.clone(), url.to_owned(), left.clone());
        tasks.spawn(async move {
            let mut out = Vec::new();
            while left
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                out.push(fetch(&client, Request::get(&url).body(empty()).unwrap()).await);
            }
            out
        });
    }
    let mut out = Vec::new();
    while let Some(r) = tasks.join_next().await {
        out.extend(r.unwrap());
    }
    out
}

/// The first cluster of `/clusters`.
async fn clusters(proxy: &Proxy) -> serde_json::Value {
    let text = get(&h1_client(), &proxy.admin_url("/clusters"))
        .await
        .unwrap()
        .2;
    serde_json::from_str::<serde_json::Value>(&text).unwrap()["clusters"][0].clone()
}

/// The endpoint at `addr` in a cluster of `/clusters`.
fn endpoint(cluster: &serde_json::Value, addr: SocketAddr) -> serde_json::Value {
    cluster["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["address"] == addr.to_string())
        .cloned()
        .unwrap_or_else(|| panic!("no endpoint {addr} in {cluster}"))
}

/// Reads one HTTP/1.1 response with a `content-length` from `s`.
async fn read_response(s: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&got).into_owned();
        if let Some((head, rest)) = text.split_once("\r\n\r\n") {
            let len: usize = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .unwrap_or(0);
            if rest.len() >= len {
                return text;
            }
        }
        let n = tokio::time::timeout(WAIT, s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "closed before a whole response: {text}");
        got.extend_from_slice(&buf[..n]);
    }
}

/// An origin that holds every request until the test releases it: it counts arrivals, notes
/// their `x-outrigger-priority`, and answers `200` once a permit is released for it.
struct HoldOrigin {
    addr: SocketAddr,
    permits: Arc<tokio::sync::Semaphore>,
    arrivals: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for HoldOrigin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl HoldOrigin {
    async fn start() -> Self {
        use hyper_util::rt::{TokioExecutor, TokioIo};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let permits = Arc::new(tokio::sync::Semaphore::new(0));
        let arrivals: Arc<Mutex<Vec<String>>> = Arc::default();
        let (p, a) = (permits.clone(), arrivals.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (p, a) = (p.clone(), a.clone());
                tokio::spawn(async move {
                    let svc =
                        hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                            let (p, a) = (p.clone(), a.clone());
                            async move {
                                let priority = req
                                    .headers()
                                    .get("x-outrigger-priority")
                                    .and_then(|v| v.to_str().ok())
                                    .unwrap_or("")
                                    .to_owned();
                                a.lock().unwrap().push(priority);
                                p.acquire().await.unwrap().forget();
                                Ok::<_, Infallible>(http::Response::new(http_body_util::Full::new(
                                    Bytes::from_static(b"released"),
                                )))
                            }
                        });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Self {
            addr,
            permits,
            arrivals,
            task,
        }
    }

    /// Lets `n` held (or future) requests be answered.
    fn release(&self, n: usize) {
        self.permits.add_permits(n);
    }

    /// Requests that reached the origin.
    fn arrived(&self) -> usize {
        self.arrivals.lock().unwrap().len()
    }

    /// The `x-outrigger-priority` of each request, in order of arrival.
    fn priorities(&self) -> Vec<String> {
        self.arrivals.lock().unwrap().clone()
    }
}

/// An HTTP/2 (h2c) origin built on `h2::server`. A stream carrying `x-test-id` is refused with
/// `RST_STREAM(REFUSED_STREAM)` the first time its id is seen and answered the next time with
/// its own request body; a stream to `/reset` is reset with `INTERNAL_ERROR`.
struct H2Refuser {
    addr: SocketAddr,
    streams: Arc<Mutex<std::collections::HashMap<String, usize>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for H2Refuser {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl H2Refuser {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let streams: Arc<Mutex<std::collections::HashMap<String, usize>>> = Arc::default();
        let seen = streams.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((socket, _)) = listener.accept().await else {
                    continue;
                };
                let seen = seen.clone();
                tokio::spawn(async move {
                    let Ok(mut conn) = h2::server::handshake(socket).await else {
                        return;
                    };
                    while let Some(Ok((req, respond))) = conn.accept().await {
                        let seen = seen.clone();
                        tokio::spawn(h2_answer(req, respond, seen));
                    }
                });
            }
        });
        Self {
            addr,
            streams,
            task,
        }
    }

    /// Streams that carried `x-test-id: id`.
    fn streams_of(&self, id: &str) -> usize {
        self.streams.lock().unwrap().get(id).copied().unwrap_or(0)
    }
}

async fn h2_answer(
    req: Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    seen: Arc<Mutex<std::collections::HashMap<String, usize>>>,
) {
    let id = req
        .headers()
        .get("x-test-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let n = {
        let mut seen = seen.lock().unwrap();
        let n = seen.entry(id).or_default();
        *n += 1;
        *n
    };
    if req.uri().path() == "/reset" {
        respond.send_reset(h2::Reason::INTERNAL_ERROR);
        return;
    }
    if n == 1 {
        respond.send_reset(h2::Reason::REFUSED_STREAM);
        return;
    }
    let mut body = req.into_body();
    let mut got = Vec::new();
    while let Some(chunk) = body.data().await {
        let Ok(chunk) = chunk else { return };
        let _ = body.flow_control().release_capacity(chunk.len());
        got.extend_from_slice(&chunk);
    }
    let Ok(mut send) = respond.send_response(http::Response::new(()), false) else {
        return;
    };
    let _ = send.send_data(Bytes::from(got), true);
}
