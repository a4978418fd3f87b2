//! Overload: an origin of fixed capacity offered twice that load for a while, through Outrigger
//! with load shedding on and then off. Prints goodput (as a share of capacity) and the p99 latency
//! of admitted requests against the unloaded p99.
//!
//! ```sh
//! cargo bench --bench overload                              # 20 s per phase
//! OUTRIGGER_OVERLOAD_SECS=5 cargo bench --bench overload    # shorter
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use outrigger::app::App;
use outrigger::control::config;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// Requests the origin serves at once.
const CONCURRENCY: usize = 8;
/// Time the origin takes per request.
const SERVICE: Duration = Duration::from_millis(10);

/// The origin's real capacity: requests per second answered by 4× its concurrency of clients
/// sending back to back, straight to it (timer overhead makes it a little under the nominal).
async fn measure_capacity(origin: SocketAddr) -> f64 {
    let client = client();
    let url = format!("http://{origin}/");
    let end = Instant::now() + Duration::from_secs(2);
    let mut tasks = JoinSet::new();
    for _ in 0..CONCURRENCY * 4 {
        let (client, url) = (client.clone(), url.clone());
        tasks.spawn(async move {
            let mut n = 0u64;
            while Instant::now() < end {
                if one(&client, &url).await.0 == StatusCode::OK {
                    n += 1;
                }
            }
            n
        });
    }
    let mut total = 0;
    while let Some(n) = tasks.join_next().await {
        total += n.unwrap();
    }
    total as f64 / 2.0
}

async fn origin() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let slots = Arc::new(Semaphore::new(CONCURRENCY));
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let slots = slots.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |_req| {
                    let slots = slots.clone();
                    async move {
                        let _slot = slots.acquire().await;
                        tokio::time::sleep(SERVICE).await;
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                    }
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

async fn proxy(origin: SocketAddr, shed: bool) -> (App, tempfile::TempDir, SocketAddr) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outrigger.yaml");
    let shed = if shed { "    load_shed: {}\n" } else { "" };
    std::fs::write(
        &path,
        format!(
            "admin: {{ address: 127.0.0.1:0 }}
listeners:
  - name: in
    address: 127.0.0.1:0
{shed}    routes:
      - name: all
        cluster: origin
        timeout: 0s
        retry: {{ attempts: 1 }}
clusters:
  - name: origin
    endpoints: [{origin}]
    protocol: http2
    circuit_breaker: {{ enabled: false }}
    bulkhead: {{ max_concurrent: 100000, max_pending: 0 }}
"
        ),
    )
    .unwrap();
    let app = App::start(config::load_file(&path).unwrap(), Some(path))
        .await
        .unwrap();
    let addr = app.listener_addr("in").unwrap();
    (app, dir, addr)
}

type H2 = Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>;

fn client() -> H2 {
    let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build(connector)
}

/// One request: its status, latency, and when it finished.
async fn one(client: &H2, url: &str) -> (StatusCode, Duration, Instant) {
    let start = Instant::now();
    let req = Request::get(url).body(Empty::new()).unwrap();
    match client.request(req).await {
        Ok(resp) => {
            let status = resp.status();
            let _ = resp.into_body().collect().await;
            (status, start.elapsed(), Instant::now())
        }
        Err(_) => (StatusCode::BAD_GATEWAY, start.elapsed(), Instant::now()),
    }
}

fn p99(mut v: Vec<Duration>) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    v.sort();
    v[((v.len() as f64 * 0.99).ceil() as usize).clamp(1, v.len()) - 1]
}

/// Offers `rate` requests per second for `length`, open loop.
async fn offer(
    client: &H2,
    url: &str,
    rate: f64,
    length: Duration,
) -> Vec<(StatusCode, Duration, Instant)> {
    let mut tasks = JoinSet::new();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let end = Instant::now() + length;
    while Instant::now() < end {
        tick.tick().await;
        let (client, url) = (client.clone(), url.to_owned());
        tasks.spawn(async move { one(&client, &url).await });
    }
    let mut out = Vec::new();
    while let Some(r) = tasks.join_next().await {
        out.push(r.unwrap());
    }
    out
}

async fn phase(shed: bool, capacity: f64, length: Duration, unloaded_p99: Duration) -> String {
    let origin = origin().await;
    let (app, _dir, addr) = proxy(origin, shed).await;
    let client = client();
    let url = format!("http://{addr}/");
    // Warm up so that the limiter has a baseline.
    offer(&client, &url, capacity * 0.5, Duration::from_secs(1)).await;
    let start = Instant::now();
    let results = offer(&client, &url, capacity * 2.0, length).await;
    let end = start + length;
    let ok: Vec<Duration> = results
        .iter()
        .filter(|r| r.0 == StatusCode::OK)
        .map(|r| r.1)
        .collect();
    // Goodput counts what was answered while the load lasted, not the backlog drained after it.
    let in_time = results
        .iter()
        .filter(|r| r.0 == StatusCode::OK && r.2 <= end)
        .count();
    let shed_count = results
        .iter()
        .filter(|r| r.0 == StatusCode::SERVICE_UNAVAILABLE)
        .count();
    let goodput = in_time as f64 / length.as_secs_f64();
    let p = p99(ok);
    app.shutdown().await;
    format!(
        "| {:<8} | {:>9.0} | {:>17.3} | {:>8} | {:>17.1} | {:>12.2} |\n\
         overload shed={} goodput_share {:.3} p99_ratio {:.2}",
        if shed { "on" } else { "off" },
        goodput,
        goodput / capacity,
        shed_count,
        p.as_secs_f64() * 1000.0,
        p.as_secs_f64() / unloaded_p99.as_secs_f64(),
        if shed { "on" } else { "off" },
        goodput / capacity,
        p.as_secs_f64() / unloaded_p99.as_secs_f64(),
    )
}

fn main() {
    let secs: f64 = std::env::var("OUTRIGGER_OVERLOAD_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20.0);
    let length = Duration::from_secs_f64(secs);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let origin = origin().await;
        let capacity = measure_capacity(origin).await;
        // Unloaded: a quarter of capacity, through the proxy without shedding.
        let (app, _dir, addr) = proxy(origin, false).await;
        let client = client();
        let url = format!("http://{addr}/");
        let base = offer(&client, &url, capacity * 0.25, Duration::from_secs(3)).await;
        let unloaded = p99(base.into_iter().map(|r| r.1).collect());
        app.shutdown().await;
        println!(
            "origin: {CONCURRENCY} at once, {SERVICE:?} each, measured capacity {capacity:.0} req/s; \
             offered {:.0} req/s for {length:?}; unloaded p99 {:.1} ms\n",
            capacity * 2.0,
            unloaded.as_secs_f64() * 1000.0
        );
        println!("| shedding | goodput/s | share of capacity | shed 503 | p99 admitted (ms) | p99/unloaded |");
        println!("|----------|-----------|-------------------|----------|-------------------|--------------|");
        let on = phase(true, capacity, length, unloaded).await;
        let off = phase(false, capacity, length, unloaded).await;
        for table_and_line in [on, off] {
            let (row, line) = table_and_line.split_once('\n').unwrap();
            println!("{row}");
            println!("{line}");
        }
    });
}
