//! A sidecar's side of mesh-wide rate limits: the share each limit admits now, refreshed in the
//! background, never waited for on the request path.
//!
//! The data path reads an [`Allowance`] (two relaxed atomic loads) and counts what it is offered
//! (one relaxed add). One task per sidecar reports those counts to the leader as demand and
//! re-sizes the allowances from the shares it answers with. The call is a long poll: the leader
//! answers at once when this sidecar's shares change, and at least every [`REFRESH`] otherwise.
//! A share is enforced for [`GRANT`] from the moment it was asked for; when that passes with no
//! newer answer (the group is cut off, or has no leader), each limit falls back to its
//! `on_partition` setting until the group answers again.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::checks::{CheckVerdict, Coordination};
use super::client::MeshClient;
use super::hints::{Exchange, Report};
use super::quota::{Granted, LimitDemand, Refresh, GRANT, REFRESH};
use crate::control::config::resilience::{OnPartition, RateLimitConfig};
use crate::rng::Rng;
use crate::tasks::Tasks;
use crate::telemetry::metrics::mesh::Families as MeshMetrics;

/// The GCRA interval that admits nothing (`fail_closed`, a zero share).
pub const CLOSED: u64 = u64::MAX / 4;

/// What one mesh-wide limit admits on this sidecar now, as the rate limiter reads it.
#[derive(Debug)]
pub struct Allowance {
    name: String,
    rate: f64,
    burst: u32,
    on_partition: OnPartition,
    /// Nanoseconds between admitted requests (0: admit everything; [`CLOSED`]: nothing).
    interval: AtomicU64,
    /// How far ahead of now the bucket may run: the burst, in nanoseconds.
    tolerance: AtomicU64,
    /// Requests offered (admitted or not) since start: the demand reported to the leader.
    offered: AtomicU64,
    /// Sidecars sharing the limit as of the last answer (the `local_share` divisor).
    sidecars: AtomicUsize,
    share: prometheus::Gauge,
    fallback: prometheus::IntGauge,
}

impl Allowance {
    fn new(name: &str, cfg: &RateLimitConfig, on_partition: OnPartition, m: &MeshMetrics) -> Self {
        let (share, fallback) = m.rate_limit(name);
        let a = Allowance {
            name: name.to_owned(),
            rate: cfg.rate,
            burst: cfg.burst,
            on_partition,
            interval: AtomicU64::new(CLOSED),
            tolerance: AtomicU64::new(0),
            offered: AtomicU64::new(0),
            sidecars: AtomicUsize::new(1),
            share,
            fallback,
        };
        // Until the group first answers, the sidecar is as good as cut off.
        a.fall_back();
        a
    }

    /// The interval and tolerance to run GCRA with, in nanoseconds.
    #[inline]
    pub fn limits(&self) -> (u64, u64) {
        (
            self.interval.load(Ordering::Relaxed),
            self.tolerance.load(Ordering::Relaxed),
        )
    }

    /// Counts a request offered to the limit.
    #[inline]
    pub fn offer(&self) {
        self.offered.fetch_add(1, Ordering::Relaxed);
    }

    /// Admits `per_second` from now on, with the burst scaled to the share of the whole rate.
    fn set(&self, per_second: f64) {
        self.share.set(per_second);
        if !(per_second.is_finite() && per_second > 0.0) {
            self.interval.store(CLOSED, Ordering::Relaxed);
            self.tolerance.store(0, Ordering::Relaxed);
            return;
        }
        let interval = (1e9 / per_second).max(1.0) as u64;
        let burst = (f64::from(self.burst) * per_second / self.rate)
            .round()
            .max(1.0) as u64;
        self.interval.store(interval, Ordering::Relaxed);
        self.tolerance
            .store(interval.saturating_mul(burst), Ordering::Relaxed);
    }

    /// Applies `on_partition`: no unexpired share is held.
    fn fall_back(&self) {
        self.fallback.set(1);
        match self.on_partition {
            OnPartition::LocalShare => {
                let n = self.sidecars.load(Ordering::Relaxed).max(1);
                self.set(self.rate / n as f64);
            }
            OnPartition::FailOpen => {
                self.share.set(f64::INFINITY);
                self.interval.store(0, Ordering::Relaxed);
                self.tolerance.store(0, Ordering::Relaxed);
            }
            OnPartition::FailClosed => self.set(0.0),
        }
    }

    /// Admits `share` requests per second, one of `sidecars` sharing the limit (what the
    /// refresh task does with the group's answer).
    pub fn grant(&self, share: f64, sidecars: usize) {
        self.fallback.set(0);
        self.sidecars.store(sidecars.max(1), Ordering::Relaxed);
        self.set(share);
    }
}

/// This sidecar's mesh-wide limits by name, handed to the rate limiters as configs are built
/// and refreshed by one background task.
#[derive(Debug)]
pub struct Allowances {
    limits: Mutex<HashMap<String, Weak<Allowance>>>,
    added: Notify,
    metrics: MeshMetrics,
    /// Failure hints sent and received on the same refreshes, when they are on.
    hints: Option<Arc<Exchange>>,
    /// Coordinated health checking's rosters and verdicts, on the same refreshes.
    coordination: Option<Arc<Coordination>>,
}

impl Allowances {
    /// An empty set reporting to `metrics`; with `hints`, the refreshes also carry failure
    /// hints both ways, and with `coordination`, coordinated checking's rosters and verdicts.
    pub fn new(
        metrics: MeshMetrics,
        hints: Option<Arc<Exchange>>,
        coordination: Option<Arc<Coordination>>,
    ) -> Arc<Self> {
        Arc::new(Allowances {
            limits: Mutex::new(HashMap::new()),
            added: Notify::new(),
            metrics,
            hints,
            coordination,
        })
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Weak<Allowance>>> {
        // Nothing panics while holding this lock; a poisoned map is still whole.
        self.limits.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The allowance of the mesh-wide limit `cfg` (its name is `cfg.mesh`'s): the one a
    /// previous config built while its settings are unchanged, so a reload keeps the share.
    pub fn get(&self, cfg: &RateLimitConfig) -> Option<Arc<Allowance>> {
        let scope = cfg.mesh.as_ref()?;
        let mut limits = self.lock();
        if let Some(a) = limits.get(&scope.name).and_then(Weak::upgrade) {
            if a.rate == cfg.rate && a.burst == cfg.burst && a.on_partition == scope.on_partition {
                return Some(a);
            }
        }
        let a = Arc::new(Allowance::new(
            &scope.name,
            cfg,
            scope.on_partition,
            &self.metrics,
        ));
        limits.insert(scope.name.clone(), Arc::downgrade(&a));
        drop(limits);
        self.added.notify_one();
        Some(a)
    }

    /// The live allowances (those a running config still uses), pruning the rest.
    fn live(&self) -> Vec<Arc<Allowance>> {
        let mut limits = self.lock();
        limits.retain(|_, w| w.strong_count() > 0);
        let mut live: Vec<_> = limits.values().filter_map(Weak::upgrade).collect();
        live.sort_by(|a, b| a.name.cmp(&b.name));
        live
    }

    /// Starts refreshing the shares through `client` as sidecar `id` until the tasks are
    /// cancelled.
    pub fn start(self: &Arc<Self>, client: MeshClient, id: String, rng: Rng, tasks: &Tasks) {
        tasks.spawn("mesh_refresh", refresh(self.clone(), client, id, rng));
    }
}

/// How much sooner than `REFRESH` the leader is asked to answer a long poll when nothing
/// changed. A grant runs `GRANT` (two refreshes) from its asking, and in a steady state each
/// refresh is asked as the previous answer arrives: held for the whole `REFRESH`, the second
/// answer would arrive two round trips after the first grant ran out, and every sidecar would
/// drop to its `on_partition` setting for those round trips every other second.
const POLL_SLACK: Duration = Duration::from_millis(250);

/// How often the offered counts are sampled for the demand.
const SAMPLE: Duration = Duration::from_millis(250);
/// Samples kept: the demand is the rate over the last second.
const SAMPLES: usize = 5;

/// Offered counts sampled over the last second, per limit.
#[derive(Default)]
struct Demand {
    samples: HashMap<String, VecDeque<(Instant, u64)>>,
}

impl Demand {
    fn sample(&mut self, live: &[Arc<Allowance>], now: Instant) {
        self.samples
            .retain(|name, _| live.iter().any(|a| &a.name == name));
        for a in live {
            let s = self.samples.entry(a.name.clone()).or_default();
            s.push_back((now, a.offered.load(Ordering::Relaxed)));
            if s.len() > SAMPLES {
                s.pop_front();
            }
        }
    }

    fn per_second(&self, name: &str) -> f64 {
        let Some(s) = self.samples.get(name) else {
            return 0.0;
        };
        match (s.front(), s.back()) {
            (Some((t0, c0)), Some((t1, c1))) if t1 > t0 => {
                (c1 - c0) as f64 / t1.duration_since(*t0).as_secs_f64()
            }
            _ => 0.0,
        }
    }
}

/// Sleeps until `t`, or forever without one.
async fn until(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

fn fall_back(live: &[Arc<Allowance>], why: &str) {
    if live.is_empty() {
        // Only hints or coordinated checks ride on the refresh: no limit falls back.
        return;
    }
    tracing::warn!(
        why,
        "no share of the mesh-wide rate limits is in force: they run on their on_partition setting"
    );
    for a in live {
        a.fall_back();
    }
}

async fn refresh(allowances: Arc<Allowances>, client: MeshClient, id: String, rng: Rng) {
    let metrics = allowances.metrics.clone();
    let mut demand = Demand::default();
    let mut sample = tokio::time::interval(SAMPLE);
    sample.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut holding = 0;
    let (mut hints_seen, mut hints_epoch) = (0, 0);
    // When the shares last answered stop being enforceable (their grant, from the asking).
    let mut valid_until: Option<Instant> = None;
    let hints = allowances.hints.clone();
    let coordination = allowances.coordination.clone();
    let (mut checks_seen, mut resend_verdicts) = (0, false);
    loop {
        let live = allowances.live();
        demand.sample(&live, Instant::now());
        let checks = coordination
            .as_ref()
            .map(|c| c.clusters())
            .unwrap_or_default();
        if live.is_empty() && hints.is_none() && checks.is_empty() {
            // No mesh-wide limit, no hints and no coordinated check: nothing to refresh yet.
            tokio::select! {
                () = allowances.added.notified() => {}
                () = async {
                    match &coordination {
                        Some(c) => c.changed().await,
                        None => std::future::pending().await,
                    }
                } => {}
            }
            continue;
        }
        let reports = hints.as_ref().map(|h| h.take()).unwrap_or_default();
        let verdicts = coordination
            .as_ref()
            .map(|c| c.take(resend_verdicts))
            .unwrap_or_default();
        let body = Refresh {
            checks,
            verdicts: verdicts.clone(),
            checks_seen,
            hints: reports.clone(),
            hints_seen,
            hints_epoch,
            client: id.clone(),
            holding,
            limits: live
                .iter()
                .map(|a| LimitDemand {
                    name: a.name.clone(),
                    rate: a.rate,
                    offered: demand.per_second(&a.name),
                })
                .collect(),
            wait_ms: (REFRESH - POLL_SLACK).as_millis() as u64,
        };
        let Ok(bytes) = serde_json::to_vec(&body) else {
            return;
        };
        let asked = Instant::now();
        let call = client.call(
            Method::POST,
            "/v1/quota/refresh",
            Bytes::from(bytes),
            REFRESH + Duration::from_secs(1),
        );
        tokio::pin!(call);
        let answer = loop {
            tokio::select! {
                answer = &mut call => break Some(answer),
                _ = sample.tick() => demand.sample(&live, Instant::now()),
                () = until(valid_until) => {
                    fall_back(&live, "no answer from the group within the grant");
                    valid_until = None;
                }
                // A reload added a limit: ask again now, with it.
                () = allowances.added.notified() => break None,
                // A hint to publish goes out now, not with the next refresh.
                () = async {
                    match &hints {
                        Some(h) => h.published().await,
                        None => std::future::pending().await,
                    }
                } => break None,
                // So does a verdict, and a cluster that starts coordinated checking.
                () = async {
                    match &coordination {
                        Some(c) => c.changed().await,
                        None => std::future::pending().await,
                    }
                } => break None,
            }
        };
        let unsent = |reports: Vec<Report>, verdicts: Vec<CheckVerdict>| {
            if let Some(h) = &hints {
                h.unsent(reports);
            }
            if let Some(c) = &coordination {
                c.unsent(verdicts);
            }
        };
        let granted = match answer {
            None => {
                unsent(reports, verdicts);
                continue;
            }
            Some(Ok((StatusCode::OK, text))) => serde_json::from_slice::<Granted>(&text)
                .map_err(|e| format!("unreadable answer: {e}")),
            Some(Ok((status, text))) => Err(format!(
                "{status}: {}",
                String::from_utf8_lossy(&text).trim()
            )),
            Some(Err(e)) => Err(e.to_string()),
        };
        match granted {
            Ok(g) => {
                metrics.refreshed(true);
                holding = g.index;
                // A new leader starts with empty boards: send it every owned verdict again.
                resend_verdicts = g.hints_epoch != hints_epoch;
                (hints_seen, hints_epoch, checks_seen) =
                    (g.hints_seen, g.hints_epoch, g.checks_seen);
                if let Some(h) = &hints {
                    h.deliver(g.hints);
                }
                if let Some(c) = &coordination {
                    c.apply(g.checks);
                }
                valid_until = Some(asked + GRANT);
                for (a, l) in live.iter().zip(&g.limits) {
                    match l.share {
                        Some(share) if a.name == l.name => a.grant(share, l.sidecars),
                        // Not allocated yet (a new sidecar, or a leader in its first grant):
                        // counting itself among those the group knows.
                        _ => {
                            a.sidecars.store(l.sidecars + 1, Ordering::Relaxed);
                            a.fall_back();
                        }
                    }
                }
            }
            Err(e) => {
                metrics.refreshed(false);
                unsent(reports, verdicts);
                tracing::debug!(error = %e, "mesh rate-limit refresh failed; will retry");
                // Not in a tight loop when every member refuses at once.
                let retry_at = Instant::now() + SAMPLE + Duration::from_millis(rng.below(100));
                loop {
                    tokio::select! {
                        () = tokio::time::sleep_until(retry_at) => break,
                        _ = sample.tick() => demand.sample(&live, Instant::now()),
                        () = until(valid_until) => {
                            fall_back(&live, "the group did not answer");
                            valid_until = None;
                        }
                    }
                }
            }
        }
    }
}
