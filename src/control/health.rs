//! Active health checking: every endpoint of a cluster is probed on its own schedule (HTTP, TCP
//! connect, or the gRPC health protocol), and its health decided by a failure detector.
//!
//! The `threshold` detector marks an endpoint unhealthy after `unhealthy_threshold` failed checks
//! in a row and healthy after `healthy_threshold` passes. The `phi` detector (Hayashibara et al.,
//! "The φ accrual failure detector", 2004; as Cassandra and Akka use it) treats passed checks as
//! heartbeats and computes the suspicion φ = −log10(P(no heartbeat for this long)) from the
//! distribution of past heartbeat intervals: it adapts to how regular an endpoint's answers are,
//! trading detection time against false positives through one threshold.
//!
//! Health is published, not applied: each endpoint's checker sends a [`Verdict`] when its health
//! changes, on a channel the data path's cluster consumes (an unhealthy endpoint leaves the
//! balancer; when too many are unhealthy the cluster panics and balances over all of them). The
//! endpoints to check come from the same discovery subscription the cluster follows. Checks run
//! on supervised tasks: one supervisor per cluster, one task per endpoint, each ended when its
//! endpoint leaves the set, when the cluster goes (its verdict channel closes) or at shutdown.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes};
use http::uri::Authority;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::control::config::upstream::{CheckKind, Detector, HealthCheckConfig};
use crate::control::discovery::Subscription;
use crate::control::mesh::checks::Owner;
use crate::rng::Rng;
use crate::tasks::{Scope, Tasks};
use crate::telemetry::metrics::HealthMetrics;
use crate::tls::{ClientTls, UpstreamConnector};

/// Heartbeat intervals the phi detector remembers.
const PHI_WINDOW: usize = 100;

/// Active health of an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// No active check configured, or none has finished yet.
    Unchecked = 0,
    /// Passing its checks.
    Healthy = 1,
    /// Failing its checks; out of the balancer (unless the cluster panics).
    Unhealthy = 2,
}

impl Health {
    /// The name shown on `/clusters`.
    pub fn name(self) -> &'static str {
        match self {
            Health::Unchecked => "unchecked",
            Health::Healthy => "healthy",
            Health::Unhealthy => "unhealthy",
        }
    }
}

/// A change of one endpoint's health, as its checker decided it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// The endpoint.
    pub authority: Authority,
    /// Its health now.
    pub health: Health,
    /// The checks saw it fail, then pass `healthy_threshold` times in a row: it is back, and an
    /// outlier ejection (which its failures may have caused) is lifted.
    pub recovered: bool,
}

/// What a cluster's checker needs besides its settings.
pub struct Target {
    /// The cluster's name, for logs.
    pub cluster: Arc<str>,
    /// The endpoint sets to check.
    pub endpoints: Subscription,
    /// With coordinated checking, which endpoints this sidecar probes (and where its verdicts
    /// are shared); `None` probes every endpoint.
    pub owner: Option<Owner>,
    /// Where verdicts go.
    pub verdicts: mpsc::Sender<Verdict>,
    /// TLS to the endpoints, if the cluster speaks it.
    pub tls: Option<Arc<ClientTls>>,
    /// Check counters.
    pub metrics: HealthMetrics,
    /// Jitter source.
    pub rng: Rng,
}

/// Starts checking the endpoints of `target` on `tasks`, as `cfg` says.
pub fn start(cfg: HealthCheckConfig, target: Target, tasks: &Tasks) {
    let checker = Arc::new(Checker::new(cfg, target.tls.clone()));
    let group = tasks.clone();
    tasks.spawn("health_supervisor", supervise(target, checker, group));
}

async fn supervise(mut target: Target, checker: Arc<Checker>, tasks: Tasks) {
    let shared = Arc::new(Shared {
        cluster: target.cluster.clone(),
        verdicts: target.verdicts.clone(),
        metrics: target.metrics.clone(),
        rng: target.rng.fork(),
        owner: target.owner.take(),
    });
    let mut checks: HashMap<Authority, Scope> = HashMap::new();
    loop {
        let list = target.endpoints.borrow_and_update().list.clone();
        checks.retain(|a, _| list.iter().any(|(b, _)| a == b));
        for (authority, _) in list.iter() {
            checks.entry(authority.clone()).or_insert_with(|| {
                let scope = tasks.child();
                scope.tasks().spawn(
                    "health_check",
                    watch(authority.clone(), checker.clone(), shared.clone()),
                );
                scope
            });
        }
        tokio::select! {
            changed = target.endpoints.changed() => if changed.is_err() {
                // The source is gone: keep checking what it last gave until the cluster goes.
                target.verdicts.closed().await;
                return;
            },
            () = target.verdicts.closed() => return,
        }
    }
}

/// What every endpoint task of one cluster shares.
struct Shared {
    cluster: Arc<str>,
    verdicts: mpsc::Sender<Verdict>,
    metrics: HealthMetrics,
    rng: Rng,
    owner: Option<Owner>,
}

/// What a cluster's checks share: settings and clients.
struct Checker {
    cfg: HealthCheckConfig,
    http: Client<UpstreamConnector, Full<Bytes>>,
    h2: Client<UpstreamConnector, Full<Bytes>>,
    /// `https` when the cluster's endpoints speak TLS.
    scheme: &'static str,
}

impl Checker {
    fn new(cfg: HealthCheckConfig, tls: Option<Arc<ClientTls>>) -> Self {
        let scheme = if tls.is_some() { "https" } else { "http" };
        let connector = || {
            let mut c = HttpConnector::new();
            c.set_connect_timeout(Some(cfg.timeout));
            c.set_nodelay(true);
            UpstreamConnector::new(c, tls.clone())
        };
        Self {
            // Checks open a fresh connection each time: a check must see whether the endpoint
            // still accepts connections, not reuse one that outlived it.
            http: Client::builder(TokioExecutor::new())
                .pool_max_idle_per_host(0)
                .build(connector()),
            h2: Client::builder(TokioExecutor::new())
                .pool_max_idle_per_host(0)
                .http2_only(true)
                .build(connector()),
            cfg,
            scheme,
        }
    }

    /// One check of `endpoint`: true if it passed within the timeout.
    async fn check(&self, authority: &Authority) -> bool {
        let run = async {
            match &self.cfg.kind {
                CheckKind::Tcp => tokio::net::TcpStream::connect(authority.as_str())
                    .await
                    .is_ok(),
                CheckKind::Http {
                    path,
                    method,
                    host,
                    statuses,
                } => {
                    let mut req = Request::builder()
                        .method(method.clone())
                        .uri(format!("{}://{}{}", self.scheme, authority, path));
                    if let Some(h) = host {
                        req = req.header(http::header::HOST, h.as_str());
                    }
                    let Ok(req) = req.body(Full::new(Bytes::new())) else {
                        return false;
                    };
                    match self.http.request(req).await {
                        Ok(resp) => {
                            let s = resp.status().as_u16();
                            // Drain so the connection closes cleanly.
                            let _ = resp.into_body().collect().await;
                            statuses.iter().any(|(lo, hi)| (*lo..=*hi).contains(&s))
                        }
                        Err(_) => false,
                    }
                }
                CheckKind::Grpc { service } => self.grpc(authority, service).await,
            }
        };
        tokio::time::timeout(self.cfg.timeout, run)
            .await
            .unwrap_or(false)
    }

    /// `grpc.health.v1.Health/Check`: passes when the answer is SERVING with status OK.
    async fn grpc(&self, authority: &Authority, service: &str) -> bool {
        // HealthCheckRequest { string service = 1; } in a gRPC frame.
        let mut msg = Vec::with_capacity(service.len() + 2);
        if !service.is_empty() {
            msg.push(0x0a);
            msg.push(service.len().min(127) as u8);
            msg.extend_from_slice(&service.as_bytes()[..service.len().min(127)]);
        }
        let mut frame = Vec::with_capacity(msg.len() + 5);
        frame.push(0);
        frame.extend_from_slice(&(msg.len() as u32).to_be_bytes());
        frame.extend_from_slice(&msg);
        let req = Request::post(format!(
            "{}://{}/grpc.health.v1.Health/Check",
            self.scheme, authority
        ))
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header(http::header::TE, "trailers")
        .body(Full::new(Bytes::from(frame)));
        let Ok(req) = req else { return false };
        let Ok(resp) = self.h2.request(req).await else {
            return false;
        };
        if resp.status() != StatusCode::OK {
            return false;
        }
        let headers_status = resp.headers().get("grpc-status").cloned();
        let Ok(body) = resp.into_body().collect().await else {
            return false;
        };
        let status = body
            .trailers()
            .and_then(|t| t.get("grpc-status").cloned())
            .or(headers_status);
        if status.as_ref().map(|v| v.as_bytes()) != Some(b"0") {
            return false;
        }
        // HealthCheckResponse { ServingStatus status = 1; } — SERVING is 1.
        let mut bytes = body.to_bytes();
        if bytes.len() < 5 {
            return false;
        }
        bytes.advance(5);
        serving(&bytes)
    }
}

/// Whether a HealthCheckResponse message says SERVING.
fn serving(mut msg: &[u8]) -> bool {
    while msg.len() >= 2 {
        let (key, value) = (msg[0], msg[1]);
        if key == 0x08 {
            return value == 1;
        }
        // Skip fields we do not know: only varints of one byte are expected here.
        msg = &msg[2..];
    }
    false
}

/// Checks one endpoint until it leaves the set or its cluster goes, publishing each change.
async fn watch(authority: Authority, checker: Arc<Checker>, shared: Arc<Shared>) {
    let cfg = &checker.cfg;
    let mut state = Detection::new(cfg.detector, cfg.timeout);
    let mut health = Health::Unchecked;
    let publish = |health: Health, recovered: bool| {
        shared.verdicts.send(Verdict {
            authority: authority.clone(),
            health,
            recovered,
        })
    };
    let mut roster = shared.owner.as_ref().map(Owner::roster);
    // Spread the first checks of a fleet over one jitter period.
    tokio::time::sleep(jitter(cfg.jitter, &shared.rng)).await;
    loop {
        if let (Some(owner), Some(roster)) = (&shared.owner, roster.as_mut()) {
            if !owner.mine(&authority) {
                // Another sidecar probes it and its verdicts come in through the group. When
                // the endpoint comes back to this one, its checks start from nothing.
                owner.release(&authority);
                (state, health) = (Detection::new(cfg.detector, cfg.timeout), Health::Unchecked);
                // A roster change (its prober left) hands the endpoint over at once.
                let next = cfg.interval + jitter(cfg.jitter, &shared.rng);
                if let Ok(Err(_)) = tokio::time::timeout(next, roster.changed()).await {
                    // The roster is gone (the cluster is going): no change will wake this.
                    tokio::time::sleep(next).await;
                }
                continue;
            }
        }
        let passed = checker.check(&authority).await;
        shared.metrics.count(passed);
        let after = state.observe(passed, Instant::now(), health, cfg);
        let recovered = passed && state.recovered(cfg);
        if after != health || recovered {
            if after != health {
                tracing::info!(cluster = %shared.cluster, endpoint = %authority, health = after.name(), "health changed");
                if let Some(owner) = &shared.owner {
                    owner.publish(&authority, after);
                }
            }
            health = after;
            if publish(health, recovered).await.is_err() {
                return;
            }
        }
        let base = if health == Health::Unhealthy {
            cfg.unhealthy_interval
        } else {
            cfg.interval
        };
        // The phi detector also wakes between checks, so suspicion that grows while a check
        // hangs is noticed before the timeout.
        let wake = Instant::now() + base + jitter(cfg.jitter, &shared.rng);
        while let Detector::Phi(_) = cfg.detector {
            let step = (base / 4).max(Duration::from_millis(5));
            let next = (Instant::now() + step).min(wake);
            tokio::time::sleep_until(next).await;
            if next >= wake {
                break;
            }
            if health != Health::Unhealthy && state.suspect(Instant::now()) {
                health = Health::Unhealthy;
                tracing::info!(cluster = %shared.cluster, endpoint = %authority, "health changed (phi)");
                if let Some(owner) = &shared.owner {
                    owner.publish(&authority, health);
                }
                if publish(health, false).await.is_err() {
                    return;
                }
            }
        }
        tokio::time::sleep_until(wake).await;
    }
}

fn jitter(max: Duration, rng: &Rng) -> Duration {
    if max.is_zero() {
        return Duration::ZERO;
    }
    max.mul_f64(rng.f64())
}

/// The failure detector's memory for one endpoint.
#[derive(Debug)]
pub struct Detection {
    detector: Detector,
    passes: u32,
    failures: u32,
    /// A check failed since the last recovery was reported.
    failed: bool,
    phi: PhiAccrual,
}

impl Detection {
    /// A detector with no history; `pause` is how late a heartbeat may normally be (the check
    /// timeout: a check can take that long and still pass).
    pub fn new(detector: Detector, pause: Duration) -> Self {
        Self {
            detector,
            passes: 0,
            failures: 0,
            failed: false,
            phi: PhiAccrual::new(PHI_WINDOW, pause),
        }
    }

    /// Takes one check result at `now`; returns the health it implies.
    pub fn observe(
        &mut self,
        passed: bool,
        now: Instant,
        current: Health,
        cfg: &HealthCheckConfig,
    ) -> Health {
        if passed {
            self.passes += 1;
            self.failures = 0;
            self.phi.heartbeat(now);
            let healthy = current == Health::Unchecked || self.passes >= cfg.healthy_threshold;
            if healthy {
                return Health::Healthy;
            }
            return current;
        }
        self.failures += 1;
        self.passes = 0;
        self.failed = true;
        let down = match self.detector {
            // Without two heartbeats there is no history to judge by: fall back to the count.
            Detector::Phi(t) if self.phi.has_history() => self.phi.phi(now) >= t,
            _ => self.failures >= cfg.unhealthy_threshold,
        };
        if down {
            Health::Unhealthy
        } else {
            current
        }
    }

    /// Whether the checks just saw the endpoint come back: `healthy_threshold` passes in a row
    /// after a failure. True once per recovery.
    pub fn recovered(&mut self, cfg: &HealthCheckConfig) -> bool {
        if self.failed && self.passes >= cfg.healthy_threshold {
            self.failed = false;
            return true;
        }
        false
    }

    /// Whether the phi detector suspects the endpoint at `now` (always false for thresholds).
    pub fn suspect(&self, now: Instant) -> bool {
        match self.detector {
            Detector::Threshold => false,
            Detector::Phi(t) => self.phi.phi(now) >= t,
        }
    }
}

/// The φ accrual failure detector over heartbeat arrival times.
#[derive(Debug)]
pub struct PhiAccrual {
    intervals: VecDeque<f64>,
    capacity: usize,
    last: Option<Instant>,
    pause: f64,
}

impl PhiAccrual {
    /// A detector remembering `capacity` intervals, tolerating heartbeats `pause` late (as
    /// Akka's acceptable-heartbeat-pause).
    pub fn new(capacity: usize, pause: Duration) -> Self {
        Self {
            intervals: VecDeque::with_capacity(capacity),
            capacity,
            last: None,
            pause: pause.as_secs_f64(),
        }
    }

    /// Whether there is an interval to judge by.
    pub fn has_history(&self) -> bool {
        !self.intervals.is_empty()
    }

    /// Records a heartbeat.
    pub fn heartbeat(&mut self, now: Instant) {
        if let Some(last) = self.last {
            if self.intervals.len() == self.capacity {
                self.intervals.pop_front();
            }
            self.intervals
                .push_back(now.saturating_duration_since(last).as_secs_f64());
        }
        self.last = Some(now);
    }

    /// The suspicion level at `now`: 0 without history; about 1 means a 10% chance that a
    /// heartbeat this late is normal, 2 a 1% chance, and so on.
    pub fn phi(&self, now: Instant) -> f64 {
        let Some(last) = self.last else { return 0.0 };
        if self.intervals.is_empty() {
            return 0.0;
        }
        let n = self.intervals.len() as f64;
        let observed = self.intervals.iter().sum::<f64>() / n;
        let var = self
            .intervals
            .iter()
            .map(|x| (x - observed).powi(2))
            .sum::<f64>()
            / n;
        // A floor on the deviation (a quarter of the mean, as Akka's min-std-deviation) keeps a
        // very regular history from making any delay look infinitely suspicious.
        let std = var.sqrt().max(observed / 4.0).max(1e-3);
        let mean = observed + self.pause;
        let t = now.saturating_duration_since(last).as_secs_f64();
        // Logistic approximation of the normal CDF's tail, as in Akka.
        let y = (t - mean) / std;
        let e = (-y * (1.5976 + 0.070566 * y * y)).exp();
        let p_later = if t > mean {
            e / (1.0 + e)
        } else {
            1.0 - 1.0 / (1.0 + e)
        };
        -(p_later.max(1e-300)).log10()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> HealthCheckConfig {
        HealthCheckConfig {
            coordinated: false,
            kind: CheckKind::Tcp,
            interval: Duration::from_secs(1),
            unhealthy_interval: Duration::from_secs(1),
            timeout: Duration::from_millis(500),
            jitter: Duration::ZERO,
            healthy_threshold: 2,
            unhealthy_threshold: 3,
            detector: Detector::Threshold,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_recovery_is_reported_once_after_a_failure() {
        let c = cfg();
        let mut d = Detection::new(Detector::Threshold, Duration::ZERO);
        let now = Instant::now();
        let mut h = Health::Unchecked;
        let mut events = Vec::new();
        // Passes from the start are no recovery; one failure (healthy still) and two passes
        // are; further passes are not again.
        for passed in [true, true, true, false, true, true, true, true] {
            h = d.observe(passed, now, h, &c);
            events.push(passed && d.recovered(&c));
        }
        assert_eq!(
            events,
            [false, false, false, false, false, true, false, false]
        );
        assert_eq!(h, Health::Healthy);
    }

    #[tokio::test(start_paused = true)]
    async fn thresholds_need_consecutive_results() {
        let c = cfg();
        let mut d = Detection::new(Detector::Threshold, Duration::ZERO);
        let now = Instant::now();
        let mut h = d.observe(true, now, Health::Unchecked, &c);
        assert_eq!(
            h,
            Health::Healthy,
            "the first pass is enough for an unchecked endpoint"
        );
        for (passed, expect) in [
            (false, Health::Healthy),
            (false, Health::Healthy),
            (true, Health::Healthy),
            (false, Health::Healthy),
            (false, Health::Healthy),
            (false, Health::Unhealthy),
            (true, Health::Unhealthy),
            (true, Health::Healthy),
        ] {
            h = d.observe(passed, now, h, &c);
            assert_eq!(h, expect);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn phi_grows_with_silence_and_adapts_to_irregular_heartbeats() {
        let mut regular = PhiAccrual::new(100, Duration::ZERO);
        let mut irregular = PhiAccrual::new(100, Duration::ZERO);
        let start = Instant::now();
        let mut t = start;
        for i in 0..50 {
            regular.heartbeat(start + Duration::from_secs(i));
            t += Duration::from_millis(if i % 2 == 0 { 500 } else { 1500 });
            irregular.heartbeat(t);
        }
        let last_regular = start + Duration::from_secs(49);
        assert!(regular.phi(last_regular + Duration::from_millis(900)) < 1.0);
        assert!(regular.phi(last_regular + Duration::from_secs(3)) > 8.0);
        // The same silence is less suspicious for an endpoint known to be irregular.
        let gap = Duration::from_secs(2);
        assert!(irregular.phi(t + gap) < regular.phi(last_regular + gap));
    }

    /// Runs the checker of the endpoint at `addr` on a task; returns its verdicts, its counters
    /// and the task.
    fn watching(
        cfg: HealthCheckConfig,
        addr: std::net::SocketAddr,
    ) -> (
        mpsc::Receiver<Verdict>,
        HealthMetrics,
        tokio::task::JoinHandle<()>,
    ) {
        let metrics = crate::telemetry::metrics::Metrics::new()
            .unwrap()
            .control
            .health("c");
        let (tx, rx) = mpsc::channel(8);
        let shared = Arc::new(Shared {
            cluster: "c".into(),
            verdicts: tx,
            metrics: metrics.clone(),
            rng: Rng::with_seed(1),
            owner: None,
        });
        let checker = Arc::new(Checker::new(cfg, None));
        let authority: Authority = addr.to_string().parse().unwrap();
        let task = tokio::spawn(watch(authority, checker, shared));
        (rx, metrics, task)
    }

    /// The next verdict, and when it came (time since `start`).
    async fn next(rx: &mut mpsc::Receiver<Verdict>, start: Instant) -> (Health, Duration) {
        let v = rx.recv().await.unwrap();
        (v.health, start.elapsed())
    }

    // Checks connect to a real socket on loopback; the clock is paused, so every check takes no
    // time and verdicts come at exact multiples of the intervals.
    #[tokio::test(start_paused = true)]
    async fn checks_run_on_their_intervals_and_verdicts_follow_the_thresholds() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut c = cfg();
        c.unhealthy_interval = Duration::from_secs(3);
        let start = Instant::now();
        let (mut rx, m, task) = watching(c, addr);
        let secs = Duration::from_secs;
        assert_eq!(
            next(&mut rx, start).await,
            (Health::Healthy, secs(0)),
            "the first check runs at once (no jitter) and one pass is enough"
        );
        drop(listener);
        // Refused at 1 s, 2 s and 3 s: three failures in a row.
        assert_eq!(next(&mut rx, start).await, (Health::Unhealthy, secs(3)));
        assert_eq!((m.passed.get(), m.failed.get()), (1, 3));
        let _back = tokio::net::TcpListener::bind(addr).await.unwrap();
        // Unhealthy endpoints are checked every 3 s: passes at 6 s and 9 s.
        assert_eq!(next(&mut rx, start).await, (Health::Healthy, secs(9)));
        assert_eq!((m.passed.get(), m.failed.get()), (3, 3));
        task.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn phi_declares_an_endpoint_down_between_checks() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut c = cfg();
        c.detector = Detector::Phi(8.0);
        c.timeout = Duration::from_millis(100);
        let start = Instant::now();
        let (mut rx, m, task) = watching(c, addr);
        let ms = Duration::from_millis;
        assert_eq!(next(&mut rx, start).await, (Health::Healthy, ms(0)));
        // Heartbeats at 0, 1, …, 5 s; then the endpoint goes away.
        tokio::time::sleep_until(start + ms(5_500)).await;
        assert_eq!((m.passed.get(), m.failed.get()), (6, 0));
        drop(listener);
        // Mean interval 1 s plus the 100 ms pause, deviation floored at 250 ms. Failed checks at
        // 6 s and 7 s leave φ below 8 (3.9 at 7 s); re-evaluated every 250 ms, φ is 6.2 at
        // 7.25 s and 9.3 at 7.5 s: unhealthy then, between two checks, with two failures (the
        // threshold detector would wait for the third, at 8 s).
        assert_eq!(next(&mut rx, start).await, (Health::Unhealthy, ms(7_500)));
        assert_eq!((m.passed.get(), m.failed.get()), (6, 2));
        task.abort();
    }

    #[test]
    fn serving_is_read_from_the_response_message() {
        assert!(serving(&[0x08, 0x01]));
        assert!(!serving(&[0x08, 0x02]));
        assert!(!serving(&[]));
    }
}
