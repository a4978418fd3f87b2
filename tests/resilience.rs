//! Resilience end to end: real origins that fail, slow down and recover on command, the proxy in
//! between, real HTTP clients. Load phases are bounded in time; set `OUTRIGGER_RESILIENCE_SECS`
//! to lengthen them to the acceptance durations (the figures print with `--nocapture`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use http::{Request, StatusCode};
use support::*;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// Length of the load phases, in seconds.
fn phase(default: f64) -> Duration {
    let secs = std::env::var("OUTRIGGER_RESILIENCE_SECS")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(default);
    Duration::from_secs_f64(secs)
}

/// One finished request: status, reason header, latency.
type Outcome = (StatusCode, String, Duration);

/// Sends GETs to `url` at `rate` per second for `length`, open loop.
async fn open_loop(url: String, rate: u32, length: Duration) -> Vec<Outcome> {
    let client = h1_client();
    let mut tasks = JoinSet::new();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate)));
    let end = Instant::now() + length;
    while Instant::now() < end {
        tick.tick().await;
        let (client, url) = (client.clone(), url.clone());
        tasks.spawn(async move {
            let start = Instant::now();
            match get(&client, &url).await {
                Ok((status, headers, _)) => (status, reason(&headers).to_owned(), start.elapsed()),
                Err(e) => (StatusCode::IM_A_TEAPOT, e, start.elapsed()),
            }
        });
    }
    let mut out = Vec::new();
    while let Some(r) = tasks.join_next().await {
        out.push(r.unwrap());
    }
    out
}

/// `workers` clients each sending GETs back to back until `count` are done in all.
async fn closed_loop(url: &str, workers: usize, count: usize) -> Vec<Outcome> {
    let client = h1_client();
    let left = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(count));
    let mut tasks = JoinSet::new();
    for _ in 0..workers {
        let (client, url, left) = (client.clone(), url.to_owned(), left.clone());
        tasks.spawn(async move {
            let mut out = Vec::new();
            while left
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                let start = Instant::now();
                let r = match get(&client, &url).await {
                    Ok((s, h, _)) => (s, reason(&h).to_owned(), start.elapsed()),
                    Err(e) => (StatusCode::IM_A_TEAPOT, e, start.elapsed()),
                };
                out.push(r);
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

fn latencies(outcomes: &[Outcome], keep: impl Fn(&Outcome) -> bool) -> Vec<Duration> {
    let mut v: Vec<Duration> = outcomes.iter().filter(|o| keep(o)).map(|o| o.2).collect();
    v.sort();
    v
}

fn ok_count(outcomes: &[Outcome]) -> usize {
    outcomes.iter().filter(|o| o.0 == StatusCode::OK).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_always_failing_endpoint_of_three_is_hidden_by_retries_within_budget() {
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
    let requests = (phase(1.0).as_secs_f64() * 3000.0) as usize;
    let start = Instant::now();
    let results = closed_loop(&proxy.url("in", "/"), 16, requests).await;
    let took = start.elapsed();
    let ok = ok_count(&results);
    let m = scrape(&proxy).await;
    let retries = metric(
        &m,
        "outrigger_retries_total{cluster=\"app\",listener=\"in\",route=\"api\"}",
    );
    let attempts = metric(&m, "outrigger_upstream_attempts_total{cluster=\"app\"}");
    let budget_skips = metric(
        &m,
        "outrigger_retries_skipped_total{cluster=\"app\",listener=\"in\",reason=\"budget\",route=\"api\"}",
    );
    let success = ok as f64 / requests as f64;
    println!(
        "one bad of three: {ok}/{requests} ok ({:.3}%), {retries} retries ({:.1}% of requests), \
         {attempts} attempts, {budget_skips} budget skips, bad endpoint hit {} times",
        success * 100.0,
        retries / requests as f64 * 100.0,
        bad.hits()
    );
    assert!(success >= 0.999, "success {success}");
    // The budget: 20% of requests plus the floor of 10/s over the run and a 10 s reserve.
    let floor = 10.0 * (took.as_secs_f64() + 10.0);
    assert!(
        retries <= 0.2 * requests as f64 + floor,
        "retries {retries}"
    );
    assert_eq!(attempts, requests as f64 + retries);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_opens_the_breaker_without_a_retry_storm_then_probes_close_it() {
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
    circuit_breaker:
      open_duration: 300ms
      max_open_duration: 300ms
      half_open_probes: 2
",
        a.addr, b.addr
    ))
    .await;
    let length = phase(2.0);
    let results = open_loop(proxy.url("in", "/"), 200, length).await;
    let m = scrape(&proxy).await;
    let attempts = metric(&m, "outrigger_upstream_attempts_total{cluster=\"app\"}");
    let requests = results.len() as f64;
    let open = latencies(&results, |o| o.1 == "circuit_open");
    println!(
        "outage: {requests} requests in {length:?}, {attempts} upstream attempts ({:.3}x), \
         {} answered circuit_open, their p50 {:?} p99 {:?}",
        attempts / requests,
        open.len(),
        percentile(&open, 50.0),
        percentile(&open, 99.0)
    );
    assert!(
        attempts <= 1.25 * requests,
        "retry storm: {attempts} attempts for {requests}"
    );
    assert!(open.len() as f64 > 0.5 * requests, "the breaker opened");
    // Fail-fast latency on one keep-alive connection, and as the proxy itself measures it.
    let sequential = closed_loop(&proxy.url("in", "/"), 1, 1000).await;
    let fast = latencies(&sequential, |o| o.1 == "circuit_open");
    let m = scrape(&proxy).await;
    let series = "outrigger_request_duration_seconds_bucket{cluster=\"app\",listener=\"in\",route=\"api\",le=";
    let within_1ms = metric(&m, &format!("{series}\"0.001\"}}"));
    let all = metric(&m, &format!("{series}\"+Inf\"}}"));
    println!(
        "fail fast: {} of 1000 sequential requests answered circuit_open, client-side p50 {:?} p99 {:?}; \
         proxy-measured: {:.2}% of all answers within 1 ms",
        fast.len(),
        percentile(&fast, 50.0),
        percentile(&fast, 99.0),
        within_1ms / all * 100.0
    );
    assert!(fast.len() >= 900);
    assert!(results
        .iter()
        .all(|o| o.0 == StatusCode::SERVICE_UNAVAILABLE || o.0 == StatusCode::OK));

    // Recovery: once the origins are healthy, the next probe round closes the breaker.
    a.control.set_status(0);
    b.control.set_status(0);
    let healed = Instant::now();
    let client = h1_client();
    let mut first_ok = None;
    while healed.elapsed() < Duration::from_secs(3) {
        if let Ok((StatusCode::OK, _, _)) = get(&client, &proxy.url("in", "/")).await {
            first_ok.get_or_insert(healed.elapsed());
            let m = scrape(&proxy).await;
            if metric(
                &m,
                "outrigger_circuit_state{cluster=\"app\",state=\"closed\"}",
            ) == 1.0
            {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let closed_after = healed.elapsed();
    println!("recovery: first success after {first_ok:?}, breaker closed after {closed_after:?}");
    let m = scrape(&proxy).await;
    assert_eq!(
        metric(
            &m,
            "outrigger_circuit_state{cluster=\"app\",state=\"closed\"}"
        ),
        1.0
    );
    // Open period 300 ms (jitter is capped by max_open_duration) plus one probe round.
    assert!(closed_after < Duration::from_secs(1), "{closed_after:?}");
    let clusters = get(&client, &proxy.admin_url("/clusters")).await.unwrap().2;
    let clusters: serde_json::Value = serde_json::from_str(&clusters).unwrap();
    assert_eq!(clusters["clusters"][0]["circuit"], "closed", "{clusters}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_fire_on_time_and_the_deadline_travels_upstream() {
    let slow = Origin::start("slow").await;
    slow.control.set_delay(2000);
    let fast = Origin::start("fast").await;
    let proxy = Proxy::start(&format!(
        "listeners:
  - name: in
    address: 127.0.0.1:0
    routes:
      - name: per-try
        match: {{ prefix: /per-try }}
        cluster: slow
        timeout: 1s
        retry:
          attempts: 2
          retry_on: [timeout]
          per_try_timeout: 150ms
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

    let start = Instant::now();
    let (status, headers, _) = get(&client, &proxy.url("in", "/whole")).await.unwrap();
    let whole = start.elapsed();
    assert_eq!(
        (status, reason(&headers)),
        (StatusCode::GATEWAY_TIMEOUT, "timeout")
    );

    let hits = slow.hits();
    let start = Instant::now();
    let (status, headers, _) = get(&client, &proxy.url("in", "/per-try")).await.unwrap();
    let per_try = start.elapsed();
    assert_eq!(
        (status, reason(&headers)),
        (StatusCode::GATEWAY_TIMEOUT, "timeout")
    );
    // Hits are counted after the delay; count tries from the proxy's side instead.
    let m = scrape(&proxy).await;
    assert_eq!(
        metric(
            &m,
            "outrigger_retries_total{cluster=\"slow\",listener=\"in\",route=\"per-try\"}"
        ),
        1.0
    );
    println!(
        "timeouts: route timeout 300ms answered after {whole:?}; two 150ms tries answered after {per_try:?}; slow origin finished {} requests",
        slow.hits() - hits
    );
    assert!(
        whole >= Duration::from_millis(300) && whole < Duration::from_millis(320),
        "{whole:?}"
    );
    assert!(
        per_try >= Duration::from_millis(300) && per_try < Duration::from_millis(340),
        "{per_try:?}"
    );

    // The route's budget travels upstream, and a caller's smaller deadline wins.
    get(&client, &proxy.url("in", "/headers")).await.unwrap();
    let sent: u64 = fast
        .control
        .last_header("x-outrigger-deadline-ms")
        .unwrap()
        .parse()
        .unwrap();
    assert!((700..=800).contains(&sent), "{sent}");
    let req = Request::get(proxy.url("in", "/headers"))
        .header("x-outrigger-deadline-ms", "200")
        .body(empty())
        .unwrap();
    send(&client, req).await.unwrap();
    let sent: u64 = fast
        .control
        .last_header("x-outrigger-deadline-ms")
        .unwrap()
        .parse()
        .unwrap();
    assert!((150..=200).contains(&sent), "{sent}");
    let req = Request::post(proxy.url("in", "/test.Echo/Unary"))
        .header("content-type", "application/grpc")
        .header("grpc-timeout", "100m")
        .body(body(grpc_frame(b"x")))
        .unwrap();
    send(&client, req).await.unwrap();
    let grpc_timeout = fast.control.last_header("grpc-timeout").unwrap();
    let ms: u64 = grpc_timeout.trim_end_matches('m').parse().unwrap();
    assert!((50..=100).contains(&ms), "{grpc_timeout}");
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
        "some POSTs hit the dead endpoint first and were retried"
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
    println!(
        "post: 10 POSTs ok over a half-dead cluster with {connect_errors} connect failures retried"
    );
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
    assert!(
        a.hits() >= 1,
        "some calls went to the failing endpoint first"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_admits_the_rate_and_throttle_delays_instead() {
    let origin = Origin::start("o").await;
    let proxy = Proxy::start(&format!(
        "listeners:
  - name: in
    address: 127.0.0.1:0
    routes:
      - name: limited
        match: {{ prefix: /limited }}
        cluster: o
        rate_limit: {{ requests_per_second: 50, burst: 5 }}
      - name: throttled
        cluster: o
        rate_limit: {{ requests_per_second: 20, burst: 1, mode: throttle, max_delay: 1s }}
clusters:
  - name: o
    endpoints: [{}]
",
        origin.addr
    ))
    .await;
    let length = phase(2.0);
    let results = open_loop(proxy.url("in", "/limited"), 150, length).await;
    let admitted = ok_count(&results);
    // The rate over the phase, plus the burst admitted at once at the start.
    let expected = 50.0 * length.as_secs_f64() + 5.0;
    let limited: Vec<_> = results
        .iter()
        .filter(|o| o.0 == StatusCode::TOO_MANY_REQUESTS)
        .collect();
    println!(
        "rate limit 50/s offered 150/s for {length:?}: {admitted} admitted (expected {expected}), {} refused",
        limited.len()
    );
    assert!(
        (admitted as f64 - expected).abs() <= 0.05 * expected,
        "{admitted}"
    );
    assert!(limited.iter().all(|o| o.1 == "rate_limited"));
    let client = h1_client();
    let (status, headers, _) = loop {
        let r = get(&client, &proxy.url("in", "/limited")).await.unwrap();
        if r.0 == StatusCode::TOO_MANY_REQUESTS {
            break r;
        }
    };
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(headers["retry-after"], "1");
    assert_eq!(headers["ratelimit-limit"], "5");
    assert_eq!(headers["ratelimit-remaining"], "0");

    // Throttle: ten requests at once at 20/s all pass, spread over about half a second.
    let start = Instant::now();
    let mut tasks = JoinSet::new();
    for _ in 0..10 {
        let (client, url) = (client.clone(), proxy.url("in", "/t"));
        tasks.spawn(async move { (get(&client, &url).await.unwrap().0, Instant::now()) });
    }
    let mut done = Vec::new();
    while let Some(r) = tasks.join_next().await {
        done.push(r.unwrap());
    }
    assert!(done.iter().all(|(s, _)| *s == StatusCode::OK));
    let spread = done.iter().map(|(_, t)| *t).max().unwrap() - start;
    println!("throttle: 10 concurrent requests at 20/s all admitted, last after {spread:?}");
    assert!(spread >= Duration::from_millis(400), "{spread:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulkhead_on_a_slow_cluster_keeps_the_healthy_one_whole() {
    let slow = Origin::start("slow").await;
    slow.control.set_delay(400);
    let healthy = Origin::start("healthy").await;
    let proxy = Proxy::start(&format!(
        "listeners:
  - name: in
    address: 127.0.0.1:0
    routes:
      - name: slow
        match: {{ prefix: /slow }}
        cluster: slow
      - name: healthy
        cluster: healthy
clusters:
  - name: slow
    endpoints: [{}]
    bulkhead: {{ max_concurrent: 4, max_pending: 2, queue_timeout: 50ms }}
    circuit_breaker: {{ enabled: false }}
  - name: healthy
    endpoints: [{}]
",
        slow.addr, healthy.addr
    ))
    .await;
    let url = proxy.url("in", "/fast");
    let unloaded = closed_loop(&url, 4, 400).await;
    let unloaded_p99 = percentile(&latencies(&unloaded, |_| true), 99.0);

    let slow_url = proxy.url("in", "/slow");
    let flood = tokio::spawn(async move { closed_loop(&slow_url, 40, 200).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let loaded = closed_loop(&url, 4, 400).await;
    let slow_results = flood.await.unwrap();
    let loaded_p99 = percentile(&latencies(&loaded, |_| true), 99.0);
    let full = slow_results
        .iter()
        .filter(|o| o.1 == "bulkhead_full")
        .count();
    println!(
        "bulkhead: healthy cluster {}/{} ok, p99 {unloaded_p99:?} unloaded vs {loaded_p99:?} beside a flooded slow cluster; slow cluster: {} ok, {full} bulkhead_full",
        ok_count(&loaded),
        loaded.len(),
        ok_count(&slow_results)
    );
    assert_eq!(ok_count(&loaded), loaded.len());
    assert!(full > 0);
    assert!(slow_results
        .iter()
        .all(|o| o.0 == StatusCode::OK || o.1 == "bulkhead_full"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hedging_cuts_the_tail() {
    let origins = [
        Origin::start("a").await,
        Origin::start("b").await,
        Origin::start("c").await,
    ];
    for o in &origins {
        o.control.slow_permille.store(50, Ordering::SeqCst);
        o.control.slow_ms.store(1000, Ordering::SeqCst);
    }
    let eps: Vec<String> = origins.iter().map(|o| o.addr.to_string()).collect();
    let proxy = Proxy::start(&format!(
        "listeners:
  - name: in
    address: 127.0.0.1:0
    routes:
      - name: hedged
        match: {{ prefix: /hedged }}
        cluster: app
        hedge: {{ after: 50ms }}
      - name: plain
        cluster: app
clusters:
  - name: app
    endpoints: [{}]
    circuit_breaker: {{ enabled: false }}
",
        eps.join(", ")
    ))
    .await;
    let n = (phase(1.0).as_secs_f64() * 400.0) as usize;
    let plain = closed_loop(&proxy.url("in", "/plain"), 20, n).await;
    let hedged = closed_loop(&proxy.url("in", "/hedged"), 20, n).await;
    let (p99_plain, p99_hedged) = (
        percentile(&latencies(&plain, |_| true), 99.0),
        percentile(&latencies(&hedged, |_| true), 99.0),
    );
    let m = scrape(&proxy).await;
    let hedges = metric(
        &m,
        "outrigger_hedges_total{cluster=\"app\",listener=\"in\",route=\"hedged\"}",
    );
    println!("hedging: {n} requests, 5% take 1 s: p99 {p99_plain:?} plain, {p99_hedged:?} hedged after 50ms ({hedges} hedges)");
    assert_eq!(ok_count(&hedged), n);
    assert!(p99_hedged < Duration::from_millis(200), "{p99_hedged:?}");
    assert!(p99_plain >= Duration::from_secs(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_shedding_answers_overloaded_and_serves_high_priority_first() {
    let origin = Origin::start("o").await;
    let _ = origin.control.capacity.set(tokio::sync::Semaphore::new(2));
    origin.control.set_delay(50);
    let proxy = Proxy::start(&format!(
        "listeners:
  - name: in
    address: 127.0.0.1:0
    load_shed: {{ initial_limit: 2, min_limit: 2, max_limit: 2, queue_timeout: 300ms, max_queue: 4 }}
    routes:
      - name: all
        cluster: o
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
            let (status, headers, _) = send(&client, req).await.unwrap();
            (status, reason(&headers).to_owned())
        }
    };
    let mut low = JoinSet::new();
    for _ in 0..10 {
        low.spawn(request("9"));
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    let mut high = JoinSet::new();
    for _ in 0..3 {
        high.spawn(request("0"));
    }
    let mut high_ok = 0;
    while let Some(r) = high.join_next().await {
        let (status, _) = r.unwrap();
        high_ok += usize::from(status == StatusCode::OK);
    }
    let mut low_results = Vec::new();
    while let Some(r) = low.join_next().await {
        low_results.push(r.unwrap());
    }
    let shed = low_results
        .iter()
        .filter(|(s, r)| *s == StatusCode::SERVICE_UNAVAILABLE && r == "overloaded")
        .count();
    println!(
        "shedding: high priority {high_ok}/3 ok; low priority {} ok, {shed} shed",
        low_results.len() - shed
    );
    assert_eq!(
        high_ok, 3,
        "high priority goes first, evicting low-priority waiters"
    );
    assert!(shed >= 4, "{low_results:?}");
    let m = scrape(&proxy).await;
    assert_eq!(
        metric(&m, "outrigger_load_shed_total{listener=\"in\"}") as usize,
        shed
    );
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
        fault: {{ delay: {{ percent: 100, duration: 120ms }} }}
clusters:
  - name: o
    endpoints: [{}]
",
        origin.addr
    ))
    .await;
    let client = h1_client();
    let (status, headers, _) = get(&client, &proxy.url("in", "/abort")).await.unwrap();
    assert_eq!(
        (status, reason(&headers)),
        (StatusCode::INTERNAL_SERVER_ERROR, "fault_injected")
    );
    assert_eq!(
        origin.hits(),
        0,
        "an aborted request never reaches the upstream"
    );
    let start = Instant::now();
    let (status, _, _) = get(&client, &proxy.url("in", "/slow")).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert!(start.elapsed() >= Duration::from_millis(120));
    let m = scrape(&proxy).await;
    assert_eq!(
        metric(
            &m,
            "outrigger_faults_injected_total{kind=\"abort\",listener=\"in\",route=\"abort\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(
            &m,
            "outrigger_faults_injected_total{kind=\"delay\",listener=\"in\",route=\"delay\"}"
        ),
        1.0
    );
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
    header_read_timeout: 300ms
    routes:
      - name: all
        cluster: o
        idle_timeout: 200ms
clusters:
  - name: o
    endpoints: [{}]
",
        origin.addr
    ))
    .await;

    // A response stream that stalls after its first chunk is aborted after the idle timeout.
    let client = h1_client();
    let resp = client
        .request(
            Request::get(proxy.url("in", "/stream"))
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    let start = Instant::now();
    let mut body = resp.into_body();
    let first = http_body_util::BodyExt::frame(&mut body)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.into_data().unwrap(), "first;");
    let next = http_body_util::BodyExt::frame(&mut body).await;
    let stalled = start.elapsed();
    assert!(
        !matches!(next, Some(Ok(_))),
        "the stalled stream ends in an error"
    );
    assert!(stalled >= Duration::from_millis(200), "{stalled:?}");

    // A keep-alive connection with no request is closed after the listener's idle timeout.
    let mut s = tokio::net::TcpStream::connect(proxy.addr("in"))
        .await
        .unwrap();
    s.write_all(b"GET /x HTTP/1.1\r\nhost: t\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    let start = Instant::now();
    let closed = tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf)).await;
    let idle = start.elapsed();
    assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "{closed:?}");
    assert!(idle >= Duration::from_millis(250), "{idle:?}");

    // A client that never finishes its headers is cut off.
    let mut s = tokio::net::TcpStream::connect(proxy.addr("in"))
        .await
        .unwrap();
    s.write_all(b"GET /x HTTP/1.1\r\nhost: t\r\n")
        .await
        .unwrap();
    let start = Instant::now();
    let cut = tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf)).await;
    assert!(cut.is_ok(), "the slow client was cut off");
    println!(
        "idle: stalled stream cut after {stalled:?}, idle connection after {idle:?}, slow headers after {:?}",
        start.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_try_timeouts_eject_the_slow_endpoint() {
    let (fast, slow) = (Origin::start("fast").await, Origin::start("slow").await);
    slow.control.set_delay(2000);
    let proxy = Proxy::start(&format!(
        "listeners:
  - name: in
    address: 127.0.0.1:0
    routes:
      - name: all
        cluster: app
        retry:
          retry_on: [timeout, connect-failure]
          per_try_timeout: 100ms
          backoff_base: 1ms
          backoff_max: 1ms
clusters:
  - name: app
    load_balancer: round_robin
    endpoints: [{}, {}]
",
        fast.addr, slow.addr
    ))
    .await;
    let results = closed_loop(&proxy.url("in", "/"), 2, 40).await;
    assert_eq!(
        ok_count(&results),
        40,
        "every request succeeds on the fast endpoint"
    );
    let clusters = get(&h1_client(), &proxy.admin_url("/clusters"))
        .await
        .unwrap()
        .2;
    let v: serde_json::Value = serde_json::from_str(&clusters).unwrap();
    let slow_ep = v["clusters"][0]["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["address"] == slow.addr.to_string())
        .unwrap()
        .clone();
    assert_eq!(slow_ep["ejected"], true, "{slow_ep}");
    // Once ejected, requests stop paying the 100 ms per-try timeout.
    let after = closed_loop(&proxy.url("in", "/"), 1, 20).await;
    let p99 = percentile(&latencies(&after, |_| true), 99.0);
    println!("slow endpoint: ejected after timeouts; p99 afterwards {p99:?}");
    assert!(p99 < Duration::from_millis(100), "{p99:?}");
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
        rate_limit: {{ requests_per_second: 0.1, burst: 3 }}
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
    let reloaded = eventually(Duration::from_secs(5), || async {
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
    let start = Instant::now();
    let (status, _, _) = get(&client, &proxy.url("in", "/patient")).await.unwrap();
    let waited = start.elapsed();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(origin.hits(), 2, "retried once, after the asked-for second");
    assert!(waited >= Duration::from_secs(1), "{waited:?}");

    let (status, _, _) = get(&client, &proxy.url("in", "/hasty")).await.unwrap();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        origin.hits(),
        3,
        "a Retry-After beyond the cap is answered at once"
    );
    let m = scrape(&proxy).await;
    assert_eq!(
        metric(&m, "outrigger_retries_skipped_total{cluster=\"o\",listener=\"in\",reason=\"retry_after\",route=\"hasty\"}"),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_retry_budget_alone_prevents_a_retry_storm() {
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
    circuit_breaker: {{ enabled: false }}
    retry_budget: {{ percent: 20, min_per_sec: 5, ttl: 2s }}
",
        a.addr, b.addr
    ))
    .await;
    let length = phase(2.0);
    let results = open_loop(proxy.url("in", "/"), 200, length).await;
    let m = scrape(&proxy).await;
    let requests = results.len() as f64;
    let retries = metric(
        &m,
        "outrigger_retries_total{cluster=\"app\",listener=\"in\",route=\"api\"}",
    );
    let attempts = metric(&m, "outrigger_upstream_attempts_total{cluster=\"app\"}");
    let skipped = metric(
        &m,
        "outrigger_retries_skipped_total{cluster=\"app\",listener=\"in\",reason=\"budget\",route=\"api\"}",
    );
    println!(
        "budget, no breaker: {requests} requests, {retries} retries ({:.1}%), {attempts} attempts ({:.3}x), {skipped} retries refused by the budget",
        retries / requests * 100.0,
        attempts / requests
    );
    // 20% of requests plus the floor: 5/s over the phase and a full reserve (5/s × 2 s ttl) at
    // the start. tower's TpsBudget expires in tenths of the ttl, which lets the floor run up to
    // about twice that; the share itself is exact.
    let floor = 5.0 * (length.as_secs_f64() + 2.0);
    assert!(retries <= 0.2 * requests + 2.0 * floor, "{retries}");
    assert!(attempts <= 1.25 * requests, "{attempts}");
    assert!(
        skipped > 0.0,
        "without the budget every request would have retried twice"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callers_short_deadline_is_its_own_error_and_harms_no_endpoint() {
    let slow = Origin::start("slow").await;
    slow.control.set_delay(300);
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
    for _ in 0..5 {
        let req = Request::get(proxy.url("in", "/"))
            .header("x-outrigger-deadline-ms", "50")
            .body(empty())
            .unwrap();
        let start = Instant::now();
        let (status, headers, _) = send(&client, req).await.unwrap();
        assert_eq!(
            (status, reason(&headers)),
            (StatusCode::GATEWAY_TIMEOUT, "deadline_exceeded")
        );
        assert!(start.elapsed() < Duration::from_millis(250));
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
    // Without the caller's deadline the same origin answers.
    let (status, _, _) = get(&client, &proxy.url("in", "/")).await.unwrap();
    assert_eq!(status, StatusCode::OK);
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
    let m = scrape(&proxy).await;
    assert!(
        metric(
            &m,
            "outrigger_retries_total{cluster=\"app\",listener=\"in\",route=\"all\"}"
        ) >= 3.0
    );
}
