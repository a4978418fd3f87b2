//! Outlier detection: passive ejection of endpoints that keep failing real requests.
//!
//! Every try's [`Outcome`] (from [`classify`](crate::proxy::resilience::classify), the same one
//! the breakers get) extends or resets three streaks per endpoint: server errors, gateway errors
//! (502–504, resets, timeouts, gRPC `unavailable` and `deadline-exceeded`) and connect failures.
//! An endpoint whose streak reaches its threshold is ejected for `base_ejection_time × n` (its
//! n-th ejection, capped at `max_ejection_time`), unless the cluster already lost its share: as
//! Envoy, one endpoint may always be ejected, more only within `max_ejection_percent`. An ejected
//! endpoint is out of the balancer until its time is up (or the cluster panics).
//!
//! [`Detector::hint`] is the entry for evidence from elsewhere (a failure hint another sidecar
//! published through the mesh): it ejects an endpoint for one base period under the same cap,
//! and counts it apart, since a hint is advice and the endpoint's own streaks decide after it.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::uri::Authority;
use prometheus::IntCounter;

use crate::control::config::upstream::OutlierConfig;
use crate::proxy::endpoint::Endpoint;
use crate::proxy::resilience::classify::Outcome;

/// One endpoint's streaks and ejection state; updated with atomics on the request path.
#[derive(Debug, Default)]
pub struct Outlier {
    consecutive_5xx: AtomicU32,
    consecutive_gateway: AtomicU32,
    consecutive_connect: AtomicU32,
    /// Endpoint-clock nanoseconds until which the endpoint is ejected.
    ejected_until: AtomicU64,
    /// Times the endpoint was ejected.
    pub ejections: AtomicU32,
    /// Endpoint-clock nanoseconds until which a failure hint from another sidecar holds.
    hinted_until: AtomicU64,
    /// Successes while hinted: at [`HINT_OVERRIDE`] this sidecar's evidence lifts the hint.
    hint_ok: AtomicU32,
    /// Endpoint-clock nanoseconds until which a refused connection published needs no repeat.
    refusal_published_until: AtomicU64,
}

/// Successes of a hinted endpoint (probes, or requests when nothing else is left) that lift
/// the hint: this sidecar's own evidence disagrees.
pub const HINT_OVERRIDE: u32 = 3;

impl Outlier {
    /// Counts a try's outcome; returns true when the endpoint crossed an ejection threshold.
    pub fn record(&self, outcome: Outcome, cfg: &OutlierConfig) -> bool {
        let bump =
            |c: &AtomicU32, limit: u32| limit > 0 && c.fetch_add(1, Ordering::AcqRel) + 1 >= limit;
        match outcome {
            Outcome::Ignore => false,
            Outcome::Success => {
                self.consecutive_5xx.store(0, Ordering::Relaxed);
                self.consecutive_gateway.store(0, Ordering::Relaxed);
                self.consecutive_connect.store(0, Ordering::Relaxed);
                false
            }
            Outcome::ServerError => {
                self.consecutive_gateway.store(0, Ordering::Relaxed);
                self.consecutive_connect.store(0, Ordering::Relaxed);
                bump(&self.consecutive_5xx, cfg.consecutive_5xx)
            }
            Outcome::GatewayError => {
                self.consecutive_connect.store(0, Ordering::Relaxed);
                let a = bump(&self.consecutive_5xx, cfg.consecutive_5xx);
                bump(&self.consecutive_gateway, cfg.consecutive_gateway_errors) || a
            }
            Outcome::ConnectFailure => {
                let a = bump(&self.consecutive_5xx, cfg.consecutive_5xx);
                let b = bump(&self.consecutive_gateway, cfg.consecutive_gateway_errors);
                bump(&self.consecutive_connect, cfg.consecutive_connect_failures) || a || b
            }
        }
    }

    /// Whether the balancer may pick the endpoint while others are left: not while a hint
    /// holds (probes ask it instead). The clock (`now`) is read only while a hint is set, so
    /// the common case costs one relaxed load.
    #[inline]
    pub fn lets_through(&self, now: impl FnOnce() -> u64) -> bool {
        let until = self.hinted_until.load(Ordering::Relaxed);
        if until == 0 {
            return true;
        }
        if until <= now() {
            // Expired: forget it, so the next picks skip the clock again.
            let _ =
                self.hinted_until
                    .compare_exchange(until, 0, Ordering::Relaxed, Ordering::Relaxed);
            return true;
        }
        false
    }

    /// Whether a refused connection should be published now (not within `period` of the last).
    pub fn publish_refusal(&self, now: u64, period: Duration) -> bool {
        let until = self.refusal_published_until.load(Ordering::Relaxed);
        until <= now
            && self
                .refusal_published_until
                .compare_exchange(
                    until,
                    now + period.as_nanos() as u64,
                    Ordering::AcqRel,
                    Ordering::Relaxed,
                )
                .is_ok()
    }

    /// Whether a hint holds at endpoint-clock `now`.
    pub fn hinted(&self, now: u64) -> bool {
        self.hinted_until.load(Ordering::Relaxed) > now
    }

    fn hint_for(&self, now: u64, period: Duration) {
        self.hint_ok.store(0, Ordering::Relaxed);
        self.hinted_until
            .store(now + period.as_nanos() as u64, Ordering::Relaxed);
    }

    fn lift_hint(&self) {
        self.hinted_until.store(0, Ordering::Relaxed);
    }

    /// Counts a success against the hint; true when that lifted it.
    pub fn ok_against_hint(&self) -> bool {
        if self.hint_ok.fetch_add(1, Ordering::Relaxed) + 1 >= HINT_OVERRIDE {
            self.lift_hint();
            return true;
        }
        false
    }

    /// Ends an ejection and a failure hint early (the endpoint's active checks pass again);
    /// true if either held at endpoint-clock `now`. The ejection count stays, so a relapse
    /// is ejected for longer.
    pub fn lift(&self, now: u64) -> bool {
        let ejected = self.ejected_until.swap(0, Ordering::Relaxed) > now;
        let hinted = self.hinted(now);
        self.lift_hint();
        ejected || hinted
    }

    /// Time left in the current ejection at endpoint-clock `now`.
    pub fn ejected_for(&self, now: u64) -> Option<Duration> {
        let until = self.ejected_until.load(Ordering::Relaxed);
        (until > now).then(|| Duration::from_nanos(until - now))
    }

    /// Whether an ejection is in force, reading the clock (`now`) only if one was ever set:
    /// the balancer asks this of every candidate on every pick.
    pub fn is_ejected(&self, now: impl FnOnce() -> u64) -> bool {
        let until = self.ejected_until.load(Ordering::Relaxed);
        until != 0 && until > now()
    }

    /// Ejects for `base × ejections` (capped) from `now` and clears the streaks.
    fn eject(&self, now: u64, cfg: &OutlierConfig) -> Duration {
        let n = self.ejections.fetch_add(1, Ordering::AcqRel) + 1;
        let period = cfg
            .base_ejection_time
            .saturating_mul(n)
            .min(cfg.max_ejection_time);
        self.eject_for(now, period);
        period
    }

    fn eject_for(&self, now: u64, period: Duration) {
        self.ejected_until
            .store(now + period.as_nanos() as u64, Ordering::Relaxed);
        self.consecutive_5xx.store(0, Ordering::Relaxed);
        self.consecutive_gateway.store(0, Ordering::Relaxed);
        self.consecutive_connect.store(0, Ordering::Relaxed);
    }
}

/// A cluster's outlier detection: its settings and ejection counter.
pub struct Detector {
    cfg: Option<OutlierConfig>,
    ejections: IntCounter,
}

impl Detector {
    /// Detection as `cfg` says (`None`: off), counting ejections in `ejections`.
    pub fn new(cfg: Option<OutlierConfig>, ejections: IntCounter) -> Self {
        Self { cfg, ejections }
    }

    /// Counts `outcome` for `endpoint`, one of `endpoints`; returns true if it was ejected now.
    pub fn observe(
        &self,
        endpoints: &[Arc<Endpoint>],
        endpoint: &Endpoint,
        outcome: Outcome,
    ) -> bool {
        let Some(cfg) = &self.cfg else {
            return false;
        };
        if !endpoint.outlier.record(outcome, cfg) || endpoint.ejected_for().is_some() {
            return false;
        }
        if !may_eject(endpoints, cfg) {
            return false;
        }
        let period = endpoint.outlier.eject(endpoint.now(), cfg);
        self.ejections.inc();
        tracing::warn!(endpoint = %endpoint.authority, ejected_for = ?period, "outlier ejected");
        true
    }

    /// Takes a failure hint about `authority` from another sidecar, to hold for `period`: the
    /// endpoint, if it is one of `endpoints` and not ejected already, gets no requests while
    /// others are left, until the hint runs out or this sidecar's own evidence decides (see
    /// [`Detector::probed`]). Returns the endpoint it acted on. Its ejection count is not
    /// raised: a hint is not evidence.
    pub fn hint(
        &self,
        endpoints: &[Arc<Endpoint>],
        authority: &Authority,
        period: Duration,
    ) -> Option<Arc<Endpoint>> {
        self.cfg.as_ref()?;
        let endpoint = endpoints.iter().find(|e| e.authority == *authority)?;
        let now = endpoint.now();
        if endpoint.ejected_for().is_some() || endpoint.outlier.hinted(now) {
            return None;
        }
        endpoint.outlier.hint_for(now, period);
        tracing::info!(endpoint = %authority, ?period, "failure hint: the endpoint is probed before it gets requests again");
        Some(endpoint.clone())
    }

    /// This sidecar's own probe of a hinted endpoint: a failure agrees with the hint and ejects
    /// the endpoint as its own evidence would (within `max_ejection_percent`); returns whether
    /// it did. A success counts towards lifting the hint; returns false.
    pub fn probed(&self, endpoints: &[Arc<Endpoint>], endpoint: &Endpoint, alive: bool) -> bool {
        let Some(cfg) = &self.cfg else {
            return false;
        };
        if alive {
            return false;
        }
        endpoint.outlier.lift_hint();
        if endpoint.ejected_for().is_some() || !may_eject(endpoints, cfg) {
            return false;
        }
        let period = endpoint.outlier.eject(endpoint.now(), cfg);
        self.ejections.inc();
        tracing::warn!(endpoint = %endpoint.authority, ejected_for = ?period, "outlier ejected: a hinted endpoint failed its probe");
        true
    }

    /// Counts a try's outcome against a hint on `endpoint`; true when the hint was lifted by
    /// this sidecar's own successes. An ejection (own evidence agreeing) lifts it too.
    pub fn weigh_hint(&self, endpoint: &Endpoint, outcome: Outcome, ejected: bool) -> bool {
        let o = &endpoint.outlier;
        if !o.hinted(endpoint.now()) {
            return false;
        }
        if ejected {
            o.lift_hint();
            return false;
        }
        if outcome == Outcome::Success && o.ok_against_hint() {
            o.lift_hint();
            tracing::info!(endpoint = %endpoint.authority, "failure hint lifted: the endpoint answers this sidecar");
            return true;
        }
        false
    }
}

/// Whether one more endpoint of `endpoints` may be ejected under `max_ejection_percent`.
fn may_eject(endpoints: &[Arc<Endpoint>], cfg: &OutlierConfig) -> bool {
    let total = endpoints.len() as u64;
    let ejected = endpoints
        .iter()
        .filter(|e| e.ejected_for().is_some())
        .count() as u64;
    ejected == 0 || (ejected + 1) * 100 <= u64::from(cfg.max_ejection_percent) * total
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn cfg() -> OutlierConfig {
        OutlierConfig {
            consecutive_5xx: 3,
            consecutive_gateway_errors: 2,
            consecutive_connect_failures: 0,
            base_ejection_time: Duration::from_secs(10),
            max_ejection_time: Duration::from_secs(25),
            max_ejection_percent: 50,
        }
    }

    fn endpoints(n: u16) -> Vec<Arc<Endpoint>> {
        let rng = Arc::new(Rng::with_seed(1));
        (0..n)
            .map(|i| {
                Arc::new(Endpoint::new(
                    format!("127.0.0.1:{}", i + 1).parse().unwrap(),
                    "static",
                    1,
                    None,
                    rng.clone(),
                    1,
                ))
            })
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn consecutive_failures_trigger_ejection_that_grows() {
        let o = Outlier::default();
        let c = cfg();
        assert!(!o.record(Outcome::ServerError, &c));
        assert!(
            !o.record(Outcome::Success, &c),
            "a success resets the count"
        );
        assert!(!o.record(Outcome::ServerError, &c));
        assert!(
            !o.record(Outcome::Ignore, &c),
            "the proxy's own refusals say nothing"
        );
        assert!(!o.record(Outcome::ServerError, &c));
        assert!(
            o.record(Outcome::GatewayError, &c),
            "a gateway error is a server error too"
        );
        assert_eq!(o.eject(0, &c), Duration::from_secs(10));
        assert!(o.ejected_for(0).is_some());
        let ten = Duration::from_secs(10).as_nanos() as u64;
        assert!(o.ejected_for(ten).is_none());
        assert_eq!(o.eject(ten, &c), Duration::from_secs(20));
        assert_eq!(o.eject(ten, &c), Duration::from_secs(25), "capped");
    }

    #[tokio::test(start_paused = true)]
    async fn a_grpc_unavailable_streak_ejects_like_a_gateway_error_streak() {
        let eps = endpoints(4);
        let d = Detector::new(Some(cfg()), IntCounter::new("e", "e").unwrap());
        assert!(!d.observe(&eps, &eps[0], Outcome::GatewayError));
        assert!(d.observe(&eps, &eps[0], Outcome::GatewayError));
        assert!(eps[0].ejected_for().is_some());
        assert_eq!(d.ejections.get(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn an_ejected_endpoint_returns_when_its_time_is_up_and_each_relapse_lasts_longer() {
        let eps = endpoints(4);
        let d = Detector::new(Some(cfg()), IntCounter::new("e", "e").unwrap());
        let ms = Duration::from_millis;
        // base 10 s, then 20 s, then capped at 25 s.
        for (n, period) in [(1, ms(10_000)), (2, ms(20_000)), (3, ms(25_000))] {
            assert!(!d.observe(&eps, &eps[0], Outcome::GatewayError));
            assert!(
                d.observe(&eps, &eps[0], Outcome::GatewayError),
                "ejection {n}"
            );
            assert_eq!(eps[0].ejected_for(), Some(period), "ejection {n}");
            assert!(!eps[0].available());
            tokio::time::advance(period - ms(1)).await;
            assert_eq!(eps[0].ejected_for(), Some(ms(1)), "ejection {n}");
            assert!(
                !d.observe(&eps, &eps[0], Outcome::GatewayError)
                    && !d.observe(&eps, &eps[0], Outcome::GatewayError),
                "an ejected endpoint is not ejected again"
            );
            tokio::time::advance(ms(1)).await;
            assert!(eps[0].available(), "back after {period:?}");
            // A success ends the streak the failures above (during the ejection) built.
            assert!(!d.observe(&eps, &eps[0], Outcome::Success));
        }
        assert_eq!(d.ejections.get(), 3);
        assert_eq!(eps[0].outlier.ejections.load(Ordering::Relaxed), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_hint_holds_requests_back_until_it_runs_out() {
        let eps = endpoints(4);
        let d = Detector::new(Some(cfg()), IntCounter::new("e", "e").unwrap());
        let ten = Duration::from_secs(10);
        assert!(d.hint(&eps, &eps[1].authority, ten).is_some());
        assert_eq!(eps[1].outlier.ejections.load(Ordering::Relaxed), 0);
        assert!(
            d.hint(&eps, &eps[1].authority, ten).is_none(),
            "already hinted"
        );
        assert!(eps[1].ejected_for().is_none(), "a hint ejects nothing");
        assert!(!eps[1].outlier.lets_through(|| eps[1].now()));
        let unknown: Authority = "127.0.0.1:99".parse().unwrap();
        assert!(d.hint(&eps, &unknown, ten).is_none());
        tokio::time::advance(ten).await;
        assert!(
            eps[1].outlier.lets_through(|| eps[1].now()),
            "a hint lasts its period"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn own_evidence_decides_on_a_hint_either_way() {
        let eps = endpoints(4);
        let d = Detector::new(Some(cfg()), IntCounter::new("e", "e").unwrap());
        let ten = Duration::from_secs(10);
        assert!(d.hint(&eps, &eps[0].authority, ten).is_some());
        assert!(!d.probed(&eps, &eps[0], true));
        assert!(!eps[0].outlier.ok_against_hint());
        assert!(!eps[0].outlier.ok_against_hint());
        assert!(
            eps[0].outlier.ok_against_hint(),
            "three successes disagree with the hint"
        );
        assert!(eps[0].outlier.lets_through(|| eps[0].now()));
        assert!(d.hint(&eps, &eps[1].authority, ten).is_some());
        assert!(d.probed(&eps, &eps[1], false), "a failed probe agrees");
        assert_eq!(eps[1].ejected_for(), Some(Duration::from_secs(10)));
        assert_eq!(d.ejections.get(), 1, "and it counts as its own ejection");
        assert!(
            !d.weigh_hint(&eps[2], Outcome::Success, false),
            "no hint, no weighing"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_refusal_is_published_once_per_period() {
        let o = Outlier::default();
        let ten = Duration::from_secs(10);
        assert!(o.publish_refusal(0, ten));
        assert!(!o.publish_refusal(1, ten));
        assert!(o.publish_refusal(ten.as_nanos() as u64, ten));
    }
}
