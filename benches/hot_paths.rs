//! Criterion benchmarks of the per-request hot paths and of config handling.
//!
//! ```sh
//! cargo bench --bench hot_paths                 # everything
//! cargo bench --bench hot_paths -- route_match  # one group
//! ```
//!
//! - `route_match`: the first and the last of 10, 1,000 and 10,000 prefix routes (the last is
//!   the worst case of a first-match scan).
//! - `balancer_pick`: peak-EWMA P2C and ring hash over 10 and 1,000 endpoints.
//! - `stack`: one request through the resilience stack with every layer on (defaults plus rate
//!   limit, bulkheads, load shedding) versus every layer off, over an upstream that answers at
//!   once, so only the layers' own cost is measured.
//! - `config`: parsing and validating a 10,000-route file, and compiling and swapping in its
//!   route table.
//! - `framing`: the HTTP/1.1 framing check on a 9-header request head and a 16 KiB chunked body.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use http::Request;
use outrigger::control::config::resilience::{
    BreakerConfig, BudgetConfig, BulkheadConfig, LoadShedConfig, MeshScope, OnPartition, RateKey,
    RateLimitConfig, RetryConfig, ShedAlgorithm,
};
use outrigger::control::config::upstream::Balancer;
use outrigger::control::config::{self, ListenerKind};
use outrigger::control::mesh::allowance::Allowances;
use outrigger::error::ProxyError;
use outrigger::proxy::balance::{hash, PickRequest, Picker};
use outrigger::proxy::body::{ProxyBody, ReqBody};
use outrigger::proxy::cluster::Cluster;
use outrigger::proxy::endpoint::Endpoint;
use outrigger::proxy::framing::Framing;
use outrigger::proxy::resilience::breaker::{BreakerLayer, CircuitBreaker};
use outrigger::proxy::resilience::bulkhead::{Bulkhead, BulkheadLayer};
use outrigger::proxy::resilience::fault::FaultLayer;
use outrigger::proxy::resilience::latency::LatencyWindow;
use outrigger::proxy::resilience::load_shed::{Limiter, LoadShedLayer};
use outrigger::proxy::resilience::rate_limit::{RateLimitLayer, RateLimiter};
use outrigger::proxy::resilience::retry::budget::RetryBudget;
use outrigger::proxy::resilience::retry::{RetryLayer, RetryPolicy};
use outrigger::proxy::resilience::timeout::{
    PerTryTimeoutLayer, RouteDeadline, RouteTimeoutLayer, TryDeadline,
};
use outrigger::proxy::resilience::{Call, CallCtx, Response, ResponseFuture};
use outrigger::proxy::router::RouteTable;
use outrigger::rng::Rng;
use outrigger::telemetry::metrics::Metrics;
use tower::{Service, ServiceBuilder};

fn routes_yaml(n: usize) -> String {
    let mut y = String::from("listeners:\n  - name: in\n    address: 127.0.0.1:0\n    routes:\n");
    for i in 0..n {
        y.push_str(&format!(
            "      - name: r{i}\n        match: {{ prefix: /svc{i}/ }}\n        cluster: c\n"
        ));
    }
    y.push_str("clusters:\n  - name: c\n    endpoints: [127.0.0.1:1]\n");
    y
}

fn table(n: usize, metrics: &Metrics) -> RouteTable {
    let loaded = config::parse("bench.yaml", &routes_yaml(n)).unwrap();
    let clusters: HashMap<String, Arc<Cluster>> = loaded
        .config
        .clusters
        .iter()
        .map(|c| {
            (
                c.name.clone(),
                Cluster::offline(c.clone(), metrics).expect("cluster"),
            )
        })
        .collect();
    let ListenerKind::Http { routes } = &loaded.config.listeners[0].kind else {
        unreachable!()
    };
    RouteTable::build(
        "in",
        routes,
        &clusters,
        None,
        None,
        metrics,
        &Rng::with_seed(1),
        None,
    )
    .unwrap()
}

fn route_match(c: &mut Criterion) {
    let metrics = Metrics::new().unwrap();
    let mut g = c.benchmark_group("route_match");
    for n in [10, 1_000, 10_000] {
        let t = table(n, &metrics);
        let first = Request::get("/svc0/items").body(()).unwrap();
        let last = Request::get(format!("/svc{}/items", n - 1))
            .body(())
            .unwrap();
        g.bench_with_input(BenchmarkId::new("first", n), &n, |b, _| {
            b.iter(|| t.find(std::hint::black_box(&first), &[]).is_some())
        });
        g.bench_with_input(BenchmarkId::new("last", n), &n, |b, _| {
            b.iter(|| t.find(std::hint::black_box(&last), &[]).is_some())
        });
    }
    g.finish();
}

fn balancer_pick(c: &mut Criterion) {
    let mut g = c.benchmark_group("balancer_pick");
    let rng = Arc::new(Rng::with_seed(1));
    for n in [10, 1_000] {
        let eps: Vec<Arc<Endpoint>> = (0..n)
            .map(|i| {
                let a = format!("10.{}.{}.{}:80", i / 65536, (i / 256) % 256, i % 256);
                let e = Endpoint::new(a.parse().unwrap(), "static", 1, None, rng.clone(), 1);
                e.observe_latency(Duration::from_micros(500 + (i as u64 % 7) * 100));
                Arc::new(e)
            })
            .collect();
        for kind in [Balancer::PeakEwma, Balancer::RingHash] {
            let p = Picker::build(kind, &eps);
            let mut k = 0u64;
            g.bench_function(BenchmarkId::new(kind.name(), n), |b| {
                b.iter(|| {
                    k = k.wrapping_add(1);
                    let req = PickRequest {
                        key: Some(hash(&k.to_le_bytes())),
                        tried: 0,
                        seed: k,
                    };
                    p.pick(&eps, req, |e| e.available())
                })
            });
        }
    }
    g.finish();
}

/// An upstream that answers at once.
#[derive(Clone)]
struct Instant200;

impl Service<Call> for Instant200 {
    type Response = Response;
    type Error = ProxyError;
    type Future = ResponseFuture;
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, _: Call) -> ResponseFuture {
        Box::pin(std::future::ready(Ok(http::Response::new(
            ProxyBody::Full(None),
        ))))
    }
}

fn call() -> Call {
    let (head, ()) = Request::get("http://app/items/1")
        .body(())
        .unwrap()
        .into_parts();
    Call {
        head: std::sync::Arc::new(head),
        body: ReqBody::Empty,
        ctx: CallCtx::new(SocketAddr::from(([127, 0, 0, 1], 40000))),
    }
}

fn stack(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let policy = |cfg: RetryConfig| {
        Arc::new(RetryPolicy::new(
            cfg,
            Arc::new(RetryBudget::new(&BudgetConfig::default())),
            Arc::new(LatencyWindow::new()),
            None,
            Rng::with_seed(1),
        ))
    };
    let bulkhead = || Some(Arc::new(Bulkhead::new(&BulkheadConfig::default(), None)));
    // A local limit, and a mesh-wide one of the same rate (its allowance on its local_share
    // fallback: the same rate, read through the allowance's atomics, each request counted).
    let limit = |mesh: Option<MeshScope>| RateLimitConfig {
        rate: 1e9,
        burst: 1_000_000,
        key: RateKey::None,
        max_delay: None,
        mesh,
    };
    let local = Arc::new(RateLimiter::new(&limit(None), None, 1, None));
    let mesh_cfg = limit(Some(MeshScope {
        name: "bench".into(),
        on_partition: OnPartition::LocalShare,
    }));
    let allowances = Allowances::new(Metrics::new().unwrap().mesh, None, None);
    let shared = Arc::new(RateLimiter::new(
        &mesh_cfg,
        None,
        1,
        allowances.get(&mesh_cfg),
    ));
    let on_with = |limiter: Arc<RateLimiter>| {
        ServiceBuilder::new()
            .layer(FaultLayer::new(None))
            .layer(RateLimitLayer::new(Some(limiter)))
            .layer(LoadShedLayer::new(Some(Arc::new(Limiter::new(
                LoadShedConfig {
                    algorithm: ShedAlgorithm::Gradient,
                    initial_limit: 1000,
                    min_limit: 1000,
                    max_limit: 1000,
                    queue_timeout: Duration::from_millis(2),
                    max_queue: 1000,
                    priority_header: http::HeaderName::from_static("x-outrigger-priority"),
                    tolerance: 1.2,
                },
                None,
            )))))
            .layer(BulkheadLayer::new(bulkhead()))
            .layer(RouteTimeoutLayer::new(Some(Arc::new(RouteDeadline::new(
                Some(Duration::from_secs(15)),
            )))))
            .layer(RetryLayer::new(policy(RetryConfig::default())))
            .layer(BreakerLayer::new(Some(Arc::new(CircuitBreaker::new(
                BreakerConfig::default(),
                0,
                None,
            )))))
            .layer(PerTryTimeoutLayer::new(Some(Arc::new(TryDeadline::new(
                Some(Duration::from_secs(5)),
            )))))
            .layer(BulkheadLayer::new(bulkhead()))
            .service(Instant200)
    };
    let on = on_with(local);
    let on_mesh = on_with(shared);
    let off = ServiceBuilder::new()
        .layer(FaultLayer::new(None))
        .layer(RateLimitLayer::new(None))
        .layer(LoadShedLayer::new(None))
        .layer(BulkheadLayer::new(None))
        .layer(RouteTimeoutLayer::new(Some(Arc::new(RouteDeadline::new(
            None,
        )))))
        .layer(RetryLayer::new(policy(RetryConfig {
            attempts: 1,
            ..RetryConfig::default()
        })))
        .layer(BreakerLayer::new(None))
        .layer(PerTryTimeoutLayer::new(Some(Arc::new(TryDeadline::new(
            None,
        )))))
        .layer(BulkheadLayer::new(None))
        .service(Instant200);
    let mut g = c.benchmark_group("stack");
    g.bench_function("all_layers_on", |b| {
        b.iter(|| rt.block_on(on.clone().call(call())).is_ok())
    });
    g.bench_function("all_layers_on_mesh_limit", |b| {
        b.iter(|| rt.block_on(on_mesh.clone().call(call())).is_ok())
    });
    g.bench_function("all_layers_off", |b| {
        b.iter(|| rt.block_on(off.clone().call(call())).is_ok())
    });
    g.bench_function("upstream_only", |b| {
        b.iter(|| rt.block_on(Instant200.call(call())).is_ok())
    });
    g.finish();
}

fn config_handling(c: &mut Criterion) {
    let text = routes_yaml(10_000);
    let metrics = Metrics::new().unwrap();
    let mut g = c.benchmark_group("config");
    g.sample_size(10);
    g.bench_function("parse_validate_10k_routes", |b| {
        b.iter(|| config::parse("bench.yaml", std::hint::black_box(&text)).unwrap())
    });
    let live = ArcSwap::from_pointee(table(10, &metrics));
    let loaded = config::parse("bench.yaml", &text).unwrap();
    let clusters: HashMap<String, Arc<Cluster>> = loaded
        .config
        .clusters
        .iter()
        .map(|c| {
            (
                c.name.clone(),
                Cluster::offline(c.clone(), &metrics).expect("cluster"),
            )
        })
        .collect();
    let ListenerKind::Http { routes } = &loaded.config.listeners[0].kind else {
        unreachable!()
    };
    g.bench_function("compile_and_swap_10k_routes", |b| {
        b.iter(|| {
            let t = RouteTable::build(
                "in",
                routes,
                &clusters,
                None,
                None,
                &metrics,
                &Rng::with_seed(1),
                None,
            )
            .unwrap();
            live.store(Arc::new(t));
        })
    });
    g.finish();
}

/// The HTTP/1.1 framing check on a typical request head (curl-like, 9 headers) and on a
/// 16 KiB chunked body, per message.
fn framing(c: &mut Criterion) {
    let head = b"GET /api/v1/orders/12345?expand=items HTTP/1.1\r\nHost: orders.internal:8080\r\n\
User-Agent: curl/8.5.0\r\nAccept: application/json\r\nAccept-Encoding: gzip, deflate\r\n\
X-Request-Id: 5f0c6b1e-3c1a-4b7e-9a7e-2d9f1c0b8e11\r\nX-B3-TraceId: 80f198ee56343ba864fe8b2a57d3eff7\r\n\
Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.e30.ZRrHA1JJJW8opsbCGfG_HACGpVUMN_a9IV7pAx_Zmeo\r\n\
Cookie: session=0123456789abcdef0123456789abcdef\r\n\r\n";
    let mut group = c.benchmark_group("framing");
    group.bench_function("request_head", |b| {
        b.iter(|| {
            let mut f = Framing::new();
            std::hint::black_box(f.feed(std::hint::black_box(&head[..])))
        })
    });
    let mut chunked =
        b"POST /upload HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..4 {
        chunked.extend_from_slice(b"1000\r\n");
        chunked.extend_from_slice(&[b'x'; 4096]);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    group.bench_function("chunked_16k", |b| {
        b.iter(|| {
            let mut f = Framing::new();
            std::hint::black_box(f.feed(std::hint::black_box(&chunked[..])))
        })
    });
    group.finish();
}

criterion_group!(
    benches,
    route_match,
    balancer_pick,
    stack,
    config_handling,
    framing
);
criterion_main!(benches);
