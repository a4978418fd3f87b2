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
}

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

    /// Time left in the current ejection at endpoint-clock `now`.
    pub fn ejected_for(&self, now: u64) -> Option<Duration> {
        let until = self.ejected_until.load(Ordering::Relaxed);
        (until > now).then(|| Duration::from_nanos(until - now))
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

    /// Takes a failure hint about `authority` from elsewhere: ejects it for one base period, if
    /// it is one of `endpoints`, not ejected already, and the cluster may lose it. Returns whether
    /// it was ejected. The endpoint's own ejection count is not raised: a hint is not evidence.
    pub fn hint(&self, endpoints: &[Arc<Endpoint>], authority: &Authority) -> bool {
        let Some(cfg) = &self.cfg else {
            return false;
        };
        let Some(endpoint) = endpoints.iter().find(|e| e.authority == *authority) else {
            return false;
        };
        if endpoint.ejected_for().is_some() || !may_eject(endpoints, cfg) {
            return false;
        }
        endpoint
            .outlier
            .eject_for(endpoint.now(), cfg.base_ejection_time);
        tracing::info!(endpoint = %authority, "ejected on a failure hint");
        true
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
    async fn ejections_and_hints_stay_within_the_percentage() {
        let eps = endpoints(4);
        let d = Detector::new(Some(cfg()), IntCounter::new("e", "e").unwrap());
        assert!(d.hint(&eps, &eps[1].authority));
        assert_eq!(eps[1].outlier.ejections.load(Ordering::Relaxed), 0);
        assert!(!d.hint(&eps, &eps[1].authority), "already ejected");
        assert!(d.hint(&eps, &eps[2].authority), "2 of 4 is within 50%");
        assert!(!d.hint(&eps, &eps[3].authority), "3 of 4 is not");
        for _ in 0..5 {
            d.observe(&eps, &eps[0], Outcome::GatewayError);
        }
        assert!(
            eps[0].ejected_for().is_none(),
            "the cap holds for evidence too"
        );
        let unknown: Authority = "127.0.0.1:99".parse().unwrap();
        assert!(!d.hint(&eps, &unknown));
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(
            eps[1].ejected_for().is_none(),
            "a hint lasts one base period"
        );
    }
}
