//! Failure detectors compared on real checks: fixed thresholds versus phi accrual.
//!
//! A real HTTP origin answers health checks with jittery latency (mostly 5–20 ms, 3% spikes of
//! 150–300 ms past the 100 ms check timeout), then is killed. Every detector sees the same stream
//! of checks (every 100 ms, as `health_check.interval: 100ms`); phi is also evaluated between
//! checks, as the proxy does. The table gives false "unhealthy" verdicts per minute of healthy
//! jitter and the time from the kill to the verdict (median of several kills).
//!
//! ```sh
//! cargo bench --bench detectors                              # 30 s of jitter, 5 kills
//! OUTRIGGER_DETECTOR_SECS=10 cargo bench --bench detectors   # shorter
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Empty, Full};
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use outrigger::control::config::upstream::{CheckKind, Detector, HealthCheckConfig};
use outrigger::control::health::{Detection, Health};
use outrigger::rng::Rng;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio::time::Instant;

const INTERVAL: Duration = Duration::from_millis(100);
const TIMEOUT: Duration = Duration::from_millis(100);
const TICK: Duration = Duration::from_millis(10);

/// A health endpoint with jittery latency; aborting the task kills it.
async fn origin(port: u16) -> (SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    // Seeded, so that both detectors face the same latencies run after run.
    let rng = Arc::new(Rng::with_seed(u64::from(port)));
    let task = tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let rng = rng.clone();
            conns.spawn(async move {
                let svc = service_fn(move |_req| {
                    let ms = if rng.below(100) < 3 {
                        150 + rng.below(150)
                    } else {
                        5 + rng.below(15)
                    };
                    async move {
                        tokio::time::sleep(Duration::from_millis(ms)).await;
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                    }
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, task)
}

type Http = Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>;

async fn check(client: &Http, addr: SocketAddr) -> bool {
    let run = async {
        let req = Request::get(format!("http://{addr}/healthz"))
            .body(Empty::new())
            .unwrap();
        match client.request(req).await {
            Ok(resp) => {
                let ok = resp.status().is_success();
                let _ = resp.into_body().collect().await;
                ok
            }
            Err(_) => false,
        }
    };
    tokio::time::timeout(TIMEOUT, run).await.unwrap_or(false)
}

fn cfg(detector: Detector, unhealthy_threshold: u32) -> HealthCheckConfig {
    HealthCheckConfig {
        coordinated: false,
        kind: CheckKind::Tcp,
        interval: INTERVAL,
        unhealthy_interval: INTERVAL,
        timeout: TIMEOUT,
        jitter: Duration::ZERO,
        healthy_threshold: 1,
        unhealthy_threshold,
        detector,
    }
}

struct Contender {
    name: String,
    cfg: HealthCheckConfig,
    state: Detection,
    health: Health,
    false_downs: u32,
    /// Detection time in the current kill trial.
    trial: Option<Duration>,
    detected: Vec<Duration>,
}

impl Contender {
    fn new(name: &str, detector: Detector, threshold: u32) -> Self {
        Self {
            name: name.to_owned(),
            cfg: cfg(detector, threshold),
            state: Detection::new(detector, TIMEOUT),
            health: Health::Healthy,
            false_downs: 0,
            trial: None,
            detected: Vec::new(),
        }
    }

    fn reset(&mut self) {
        self.state = Detection::new(self.cfg.detector, TIMEOUT);
        self.health = Health::Healthy;
    }
}

/// Runs checks against `addr` until `until`; calls `verdict` for every detector that turns
/// unhealthy, with the time it did.
async fn run(
    client: &Http,
    addr: SocketAddr,
    contenders: &mut [Contender],
    until: Instant,
    mut verdict: impl FnMut(&mut Contender, Instant),
) {
    let mut next_check = Instant::now();
    while Instant::now() < until {
        let now = Instant::now();
        if now >= next_check {
            next_check = now + INTERVAL;
            let passed = check(client, addr).await;
            let at = Instant::now();
            for c in contenders.iter_mut() {
                let h = c.state.observe(passed, at, c.health, &c.cfg);
                if h == Health::Unhealthy && c.health != Health::Unhealthy {
                    verdict(c, at);
                }
                c.health = h;
            }
        }
        let at = Instant::now();
        for c in contenders.iter_mut() {
            if c.health != Health::Unhealthy && c.state.suspect(at) {
                c.health = Health::Unhealthy;
                verdict(c, at);
            }
        }
        tokio::time::sleep(TICK.min(next_check.saturating_duration_since(Instant::now()))).await;
    }
}

fn main() {
    let secs: f64 = std::env::var("OUTRIGGER_DETECTOR_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30.0);
    let kills = 5;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let client: Http = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(0)
            .build_http();
        let mut contenders = vec![
            Contender::new("threshold, 1 failure", Detector::Threshold, 1),
            Contender::new("threshold, 3 failures", Detector::Threshold, 3),
            Contender::new("phi >= 3", Detector::Phi(3.0), 3),
            Contender::new("phi >= 8", Detector::Phi(8.0), 3),
        ];
        // Healthy but jittery: every verdict is a false one.
        let (addr, task) = origin(0).await;
        let port = addr.port();
        run(&client, addr, &mut contenders, Instant::now() + Duration::from_secs_f64(secs), |c, _| {
            c.false_downs += 1;
        })
        .await;
        task.abort();
        // Kills: warm up on the jittery endpoint, kill it, time the verdicts.
        let mut current = Some(task);
        for _ in 0..kills {
            if let Some(t) = current.take() {
                t.abort();
                let _ = t.await;
            }
            let (addr, task) = loop {
                if let Ok(l) = tokio::time::timeout(Duration::from_secs(1), origin(port)).await {
                    break l;
                }
            };
            for c in contenders.iter_mut() {
                c.reset();
            }
            run(&client, addr, &mut contenders, Instant::now() + Duration::from_secs(3), |_, _| {})
                .await;
            for c in contenders.iter_mut() {
                c.health = Health::Healthy;
                c.trial = None;
            }
            task.abort();
            let _ = task.await;
            let killed = Instant::now();
            run(&client, addr, &mut contenders, killed + Duration::from_secs(3), |c, at| {
                c.trial.get_or_insert(at - killed);
            })
            .await;
            for c in contenders.iter_mut() {
                let t = c.trial.take().unwrap_or(Duration::from_secs(3));
                c.detected.push(t);
            }
            current = None;
        }
        println!(
            "checks every {INTERVAL:?} with a {TIMEOUT:?} timeout; {secs:.0} s of healthy jitter (3% of answers past the timeout), then {kills} kills\n"
        );
        println!("| detector | false unhealthy verdicts per minute | detection after a kill (median, ms) | worst (ms) |");
        println!("|---|---|---|---|");
        for c in &mut contenders {
            c.detected.sort();
            let median = c.detected.get(c.detected.len() / 2).copied().unwrap_or_default();
            let worst = c.detected.last().copied().unwrap_or_default();
            let per_minute = f64::from(c.false_downs) * 60.0 / secs;
            println!(
                "| {} | {:.1} | {:.0} | {:.0} |",
                c.name,
                per_minute,
                median.as_secs_f64() * 1000.0,
                worst.as_secs_f64() * 1000.0
            );
        }
        println!();
        for c in &contenders {
            let median = c.detected.get(c.detected.len() / 2).copied().unwrap_or_default();
            println!(
                "detector {:?} false_per_min {:.1} detect_ms {:.0}",
                c.name,
                f64::from(c.false_downs) * 60.0 / secs,
                median.as_secs_f64() * 1000.0
            );
        }
    });
}
