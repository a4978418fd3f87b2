//! Active health checks end to end: TCP connect checks, the gRPC health protocol against a real
//! gRPC health server, and the phi accrual detector, each seen on `/clusters`, in the metrics
//! and in where traffic goes. How soon checks notice (intervals, thresholds, when phi crosses its
//! threshold) is the checker's timing, covered with paused time in src/control/health.rs; here
//! only orders and counts are asserted.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body_util::{BodyExt, Channel};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A generous deadline for an event the test waits for: CI runs on a loaded 2-core machine.
const WAIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_checks_pass_on_an_accepted_connection_and_keep_traffic_off_a_dead_port() {
    let echo = Echo::start(None).await;
    let echo_addr = echo.addr;
    let dead = dead_port();
    // Accepts connections and never says a word: an HTTP check of it would time out.
    let silent = Silent::start().await;
    let proxy = Proxy::start(&format!(
        "listeners:
  - name: db-in
    address: 127.0.0.1:0
    protocol: tcp
    cluster: db
clusters:
  - name: db
    endpoints: [\"{echo_addr}\", \"{dead}\"]
    health_check: {{ protocol: tcp, interval: 100ms, timeout: 5s, jitter: 0s, unhealthy_threshold: 2, healthy_threshold: 1 }}
  - name: quiet
    endpoints: [\"{}\"]
    health_check: {{ protocol: tcp, interval: 100ms, timeout: 1s, jitter: 0s, unhealthy_threshold: 1 }}
",
        silent.addr
    ))
    .await;
    assert!(health_is(&proxy, "db", echo_addr, "healthy").await);
    assert!(health_is(&proxy, "db", dead, "unhealthy").await);
    // The silent endpoint passes check after check: a TCP check asks for nothing but the
    // connection (a 1 s timeout and one failure would be enough to fail it otherwise).
    assert!(
        eventually(WAIT, || async {
            checks(&proxy, "quiet", "passed").await >= 5.0
        })
        .await
    );
    assert_eq!(checks(&proxy, "quiet", "failed").await, 0.0);
    assert_eq!(health(&proxy, "quiet", silent.addr).await, "healthy");
    assert!(silent.accepted() >= 5, "each check opened a connection");

    // The dead endpoint was found by the checks, not by traffic: every connection goes to the
    // echo server and none tries the dead port.
    for i in 0..10 {
        let said = format!("ping {i}");
        assert_eq!(
            splice(proxy.addr("db-in"), &said).await,
            said,
            "connection {i}"
        );
    }
    assert_eq!(
        endpoint(&proxy, "db", dead, "connect_failures").await,
        0,
        "no connection attempt to the unhealthy endpoint"
    );
    let m = scrape(&proxy).await;
    assert_eq!(
        metric(
            &m,
            "outrigger_upstream_connect_errors_total{cluster=\"db\"}"
        ),
        0.0
    );
    assert!(checks(&proxy, "db", "failed").await >= 2.0);

    // The echo server goes away, and comes back on its port.
    drop(echo);
    assert!(
        health_is(&proxy, "db", echo_addr, "unhealthy").await,
        "a refused connection fails the check"
    );
    let _echo = Echo::start(Some(echo_addr)).await;
    assert!(health_is(&proxy, "db", echo_addr, "healthy").await);
    assert_eq!(splice(proxy.addr("db-in"), "back").await, "back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_checks_ask_the_health_service_and_need_serving() {
    let a = GrpcServer::start("a").await;
    let b = GrpcServer::start("b").await;
    let service = "payments.v1.Payments";
    a.set(service, Some(SERVING));
    b.set(service, Some(NOT_SERVING));
    let proxy = Proxy::start(&format!(
        "listeners:
  - name: in
    address: 127.0.0.1:0
    routes:
      - name: all
        cluster: payments
clusters:
  - name: payments
    endpoints: [\"{}\", \"{}\"]
    protocol: http2
    load_balancer: round_robin
    health_check: {{ protocol: grpc, grpc_service: {service}, interval: 100ms, timeout: 5s, jitter: 0s, unhealthy_threshold: 1, healthy_threshold: 1 }}
",
        a.addr, b.addr
    ))
    .await;
    assert!(health_is(&proxy, "payments", a.addr, "healthy").await);
    assert!(
        health_is(&proxy, "payments", b.addr, "unhealthy").await,
        "NOT_SERVING fails the check"
    );
    for s in [&a, &b] {
        let asked = s.asked();
        assert!(!asked.is_empty());
        assert!(
            asked.iter().all(|x| x == service),
            "the check names grpc_service: {asked:?}"
        );
    }
    // Calls go to the serving endpoint only.
    for i in 0..10 {
        assert_eq!(call(&proxy, &format!("c{i}")).await, format!("a:c{i}"));
    }
    assert_eq!(b.calls(), 0);

    // `a` still says SERVING, but ends the call with grpc-status 13 (INTERNAL); `b` serves.
    a.fail_with(13);
    b.set(service, Some(SERVING));
    assert!(
        health_is(&proxy, "payments", a.addr, "unhealthy").await,
        "SERVING with a non-zero grpc-status fails the check"
    );
    assert!(health_is(&proxy, "payments", b.addr, "healthy").await);
    let a_calls = a.calls();
    for i in 0..10 {
        assert_eq!(call(&proxy, &format!("d{i}")).await, format!("b:d{i}"));
    }
    assert_eq!(a.calls(), a_calls);
    // `a` recovers; then it no longer knows the service (NOT_FOUND, and no message).
    a.fail_with(0);
    assert!(health_is(&proxy, "payments", a.addr, "healthy").await);
    a.set(service, None);
    assert!(
        health_is(&proxy, "payments", a.addr, "unhealthy").await,
        "an unknown service fails the check"
    );
    let m = scrape(&proxy).await;
    let series = |r: &str| {
        metric(
            &m,
            &format!("outrigger_health_checks_total{{cluster=\"payments\",result=\"{r}\"}}"),
        )
    };
    assert!(series("passed") >= 2.0 && series("failed") >= 2.0, "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_phi_detector_declares_an_endpoint_down_long_before_the_failure_count() {
    let origin = Origin::start("app").await;
    let dead = dead_port();
    // `unhealthy_threshold` is 100 for `flaky`: counting failures, it would take 100 failed
    // checks. Phi judges by the silence since the last passed check instead, relative to the
    // usual interval between passes (plus the check timeout), and crosses 8 a few intervals
    // into the silence. The long `unhealthy_interval` freezes the count once it is unhealthy.
    let proxy = Proxy::start(&format!(
        "clusters:
  - name: flaky
    endpoints: [\"{}\"]
    health_check: {{ path: /health, interval: 100ms, unhealthy_interval: 3s, timeout: 200ms, jitter: 0s, unhealthy_threshold: 100, detector: phi, phi_threshold: 8 }}
  - name: cold
    endpoints: [\"{dead}\"]
    health_check: {{ path: /health, interval: 100ms, unhealthy_interval: 600s, timeout: 200ms, jitter: 0s, unhealthy_threshold: 3, detector: phi }}
",
        origin.addr
    ))
    .await;
    // A history of passed checks (heartbeats).
    assert!(
        eventually(WAIT, || async {
            checks(&proxy, "flaky", "passed").await >= 10.0
                && health(&proxy, "flaky", origin.addr).await == "healthy"
        })
        .await
    );
    let failed_before = checks(&proxy, "flaky", "failed").await;
    origin.control.set_status(503);
    assert!(
        health_is(&proxy, "flaky", origin.addr, "unhealthy").await,
        "phi notices the silence"
    );
    let failed = checks(&proxy, "flaky", "failed").await - failed_before;
    println!("phi: unhealthy after {failed} failed checks (unhealthy_threshold 100)");
    assert!(failed >= 1.0, "{failed}");
    assert!(
        failed <= 40.0,
        "phi, not the count of 100, decided: {failed} failed checks"
    );

    // Without a history (no passed check yet) phi falls back to `unhealthy_threshold` failed
    // checks in a row: exactly 3, and then no check for 600 s.
    assert!(health_is(&proxy, "cold", dead, "unhealthy").await);
    assert_eq!(checks(&proxy, "cold", "failed").await, 3.0);
    assert_eq!(checks(&proxy, "cold", "passed").await, 0.0);
}

// ---- helpers -------------------------------------------------------------------------------

/// `field` of endpoint `addr` of `cluster` on `/clusters` (Null if absent).
async fn endpoint_value(
    proxy: &Proxy,
    cluster: &str,
    addr: SocketAddr,
    field: &str,
) -> serde_json::Value {
    let body = get(&h1_client(), &proxy.admin_url("/clusters"))
        .await
        .unwrap()
        .2;
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == cluster)
        .and_then(|c| {
            c["endpoints"]
                .as_array()
                .unwrap()
                .iter()
                .find(|e| e["address"] == addr.to_string())
        })
        .map(|e| e[field].clone())
        .unwrap_or(serde_json::Value::Null)
}

async fn endpoint(proxy: &Proxy, cluster: &str, addr: SocketAddr, field: &str) -> u64 {
    endpoint_value(proxy, cluster, addr, field)
        .await
        .as_u64()
        .unwrap()
}

async fn health(proxy: &Proxy, cluster: &str, addr: SocketAddr) -> String {
    endpoint_value(proxy, cluster, addr, "health")
        .await
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// Waits until `/clusters` shows `want` as the endpoint's health.
async fn health_is(proxy: &Proxy, cluster: &str, addr: SocketAddr, want: &str) -> bool {
    eventually(WAIT, || async {
        health(proxy, cluster, addr).await == want
    })
    .await
}

/// `outrigger_health_checks_total` of `cluster` with `result`.
async fn checks(proxy: &Proxy, cluster: &str, result: &str) -> f64 {
    metric(
        &scrape(proxy).await,
        &format!("outrigger_health_checks_total{{cluster=\"{cluster}\",result=\"{result}\"}}"),
    )
}

/// A loopback port nothing listens on.
fn dead_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Sends `text` through a TCP listener, half-closes, and returns what came back (or the error).
async fn splice(listener: SocketAddr, text: &str) -> String {
    let mut s = TcpStream::connect(listener).await.unwrap();
    let mut out = Vec::new();
    let sent = async {
        s.write_all(text.as_bytes()).await?;
        s.shutdown().await?;
        s.read_to_end(&mut out).await
    };
    match sent.await {
        Ok(_) => String::from_utf8(out).unwrap(),
        Err(e) => format!("error: {e}"),
    }
}

/// A TCP echo server; dropping it closes its listening socket.
struct Echo {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Echo {
    /// Listens on `addr` (or any port): a restarted server takes its old port back.
    async fn start(addr: Option<SocketAddr>) -> Echo {
        let listener = TcpListener::bind(addr.unwrap_or(([127, 0, 0, 1], 0).into()))
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    while let Ok(n @ 1..) = s.read(&mut buf).await {
                        if s.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                    let _ = s.shutdown().await;
                });
            }
        });
        Echo { addr, task }
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A TCP server that accepts connections, keeps them, and never writes.
struct Silent {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Silent {
    async fn start() -> Silent {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        let task = tokio::spawn(async move {
            let mut open = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                open.push(s);
            }
        });
        Silent {
            addr,
            accepted,
            task,
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for Silent {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// `grpc.health.v1.HealthCheckResponse.ServingStatus` values.
const SERVING: u8 = 1;
const NOT_SERVING: u8 = 2;

/// A gRPC server over h2c. `grpc.health.v1.Health/Check` answers the status set for the
/// service asked about (`HealthCheckResponse { status }` with `grpc-status: 0`, or the status
/// set by `fail_with`), or `grpc-status: 5` (NOT_FOUND) with no message for a service it does
/// not know, as the reference health service does. Any other method answers one message, `NAME:REQUEST`.
struct GrpcServer {
    addr: SocketAddr,
    state: Arc<GrpcState>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Default)]
struct GrpcState {
    name: String,
    statuses: Mutex<HashMap<String, u8>>,
    asked: Mutex<Vec<String>>,
    calls: AtomicUsize,
    /// The grpc-status health checks end with when they find the service (0: OK).
    check_status: AtomicU32,
}

impl GrpcServer {
    async fn start(name: &str) -> GrpcServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(GrpcState {
            name: name.to_owned(),
            ..GrpcState::default()
        });
        let shared = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let state = shared.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let state = state.clone();
                        async move { Ok::<_, std::convert::Infallible>(state.answer(req).await) }
                    });
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        GrpcServer { addr, state, task }
    }

    /// Sets the status of `service`; `None` forgets it.
    fn set(&self, service: &str, status: Option<u8>) {
        let mut m = self.state.statuses.lock().unwrap();
        match status {
            Some(s) => m.insert(service.to_owned(), s),
            None => m.remove(service),
        };
    }

    /// Ends the health checks of a known service with `status` (their message unchanged).
    fn fail_with(&self, status: u32) {
        self.state.check_status.store(status, Ordering::SeqCst);
    }

    fn asked(&self) -> Vec<String> {
        self.state.asked.lock().unwrap().clone()
    }

    fn calls(&self) -> usize {
        self.state.calls.load(Ordering::SeqCst)
    }
}

impl Drop for GrpcServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl GrpcState {
    async fn answer(&self, req: Request<Incoming>) -> Response<Body> {
        let path = req.uri().path().to_owned();
        let body = req
            .into_body()
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        // The first message's payload (after the flag and the length).
        let msg = body.get(5..).unwrap_or_default();
        let (data, status) = if path == "/grpc.health.v1.Health/Check" {
            // HealthCheckRequest { string service = 1; }
            let service = match msg {
                [0x0a, len, rest @ ..] => {
                    String::from_utf8_lossy(&rest[..*len as usize]).into_owned()
                }
                _ => String::new(),
            };
            self.asked.lock().unwrap().push(service.clone());
            match self.statuses.lock().unwrap().get(&service) {
                // HealthCheckResponse { ServingStatus status = 1; }
                Some(s) => (
                    Some(grpc_frame(&[0x08, *s])),
                    self.check_status.load(Ordering::SeqCst),
                ),
                None => (None, 5),
            }
        } else {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let text = format!("{}:{}", self.name, String::from_utf8_lossy(msg));
            (Some(grpc_frame(text.as_bytes())), 0)
        };
        let (mut tx, out) = Channel::<Bytes, hyper::Error>::new(4);
        if let Some(d) = data {
            tx.send_data(d).await.unwrap();
        }
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from(status));
        tx.send_trailers(trailers).await.unwrap();
        let mut r = Response::new(out.boxed());
        r.headers_mut()
            .insert("content-type", HeaderValue::from_static("application/grpc"));
        r
    }
}

/// A unary gRPC call through the proxy: returns the answer's message, after checking that the
/// call ended with `grpc-status: 0`.
async fn call(proxy: &Proxy, text: &str) -> String {
    let req = Request::post(proxy.url("in", "/payments.v1.Payments/Charge"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(body(grpc_frame(text.as_bytes())))
        .unwrap();
    let resp = h2_client().request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let all = resp.into_body().collect().await.unwrap();
    let trailers = all.trailers().cloned().expect("trailers");
    assert_eq!(trailers["grpc-status"], "0");
    let msgs = grpc_messages(&all.to_bytes());
    assert_eq!(msgs.len(), 1, "{msgs:?}");
    msgs[0].clone()
}
