//! Rate limiting and throttling with GCRA (the generic cell rate algorithm), per route, keyed by
//! nothing, the client IP or a header value.
//!
//! GCRA keeps one "theoretical arrival time" per key, so a bucket is a single number updated with
//! one compare-and-swap (unkeyed) or under a sharded lock (keyed). In `reject` mode a request over
//! the limit gets 429 with `Retry-After` and `RateLimit-*` headers; in `throttle` mode it reserves
//! the next free slot and is delayed until then, if that is within `max_delay`. Written here rather
//! than taken from `governor` because throttling needs that reservation, which governor's check
//! API does not offer.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::HeaderValue;
use tokio::time::Instant;

use crate::control::config::resilience::{RateKey, RateLimitConfig};
use crate::control::mesh::allowance::Allowance;
use crate::error::{ProxyError, RATELIMIT_LIMIT, RATELIMIT_REMAINING, RATELIMIT_RESET};
use crate::proxy::clock;
use crate::proxy::resilience::{Apply, ApplyLayer, Call, Inner, Mechanism, ResponseFuture};
use crate::telemetry::metrics::RateLimitMetrics;

const SHARDS: usize = 16;

/// One shard of the keyed buckets: key bytes to theoretical arrival time.
type Shard = Mutex<Buckets>;

/// One shard's buckets, keyed by a seeded hash of the key (a collision merely shares a bucket).
#[derive(Default)]
struct Buckets {
    tat: HashMap<u64, u64>,
    /// Size at which the next prune runs: twice the size left by the last one, so pruning
    /// costs O(1) amortised per new key whatever keys a client invents.
    prune_at: usize,
}

/// Keys one shard holds at most; past it, after pruning, the oldest half is dropped (they are
/// the fullest buckets, so forgetting them admits little).
const MAX_KEYS_PER_SHARD: usize = 65_536;
/// Keys kept per shard before idle ones (whose bucket is full again) are dropped.
const PRUNE_AT: usize = 4096;

/// The verdict on one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Go ahead; `remaining` more would pass right now.
    Admit {
        /// Requests that would still be admitted at once.
        remaining: u32,
    },
    /// Go ahead after this delay (its slot is reserved).
    Delay(Duration),
    /// Refused; a request would be admitted after this long.
    Reject(Duration),
}

/// One route's rate limiter.
pub struct RateLimiter {
    interval: u64,
    tolerance: u64,
    burst: u32,
    /// `RateLimit-Limit` and `RateLimit-Reset` never change: built once, not per response.
    limit_header: HeaderValue,
    reset_header: HeaderValue,
    max_delay: Option<u64>,
    key: RateKey,
    epoch: Instant,
    single: AtomicU64,
    shards: Box<[Shard]>,
    seed: u64,
    metrics: Option<RateLimitMetrics>,
    /// A mesh-wide limit's share, re-sized in the background; `None` for a local limit.
    mesh: Option<Arc<Allowance>>,
}

impl RateLimiter {
    /// A limiter for `cfg`; a mesh-wide one (`cfg.mesh`) admits what `mesh` allows.
    pub fn new(
        cfg: &RateLimitConfig,
        metrics: Option<RateLimitMetrics>,
        seed: u64,
        mesh: Option<Arc<Allowance>>,
    ) -> Self {
        let interval = (1e9 / cfg.rate).max(1.0) as u64;
        Self {
            interval,
            tolerance: interval.saturating_mul(u64::from(cfg.burst)),
            burst: cfg.burst,
            limit_header: HeaderValue::from(cfg.burst),
            reset_header: HeaderValue::from(tolerance_secs(interval, cfg.burst)),
            max_delay: cfg.max_delay.map(|d| d.as_nanos() as u64),
            key: cfg.key.clone(),
            epoch: Instant::now(),
            // Start one interval in so that "now" is never before the epoch's first slot.
            single: AtomicU64::new(0),
            shards: (0..SHARDS)
                .map(|_| Mutex::new(Buckets::default()))
                .collect(),
            seed,
            metrics,
            mesh,
        }
    }

    fn now(&self) -> u64 {
        (clock::now() - self.epoch).as_nanos() as u64
    }

    /// GCRA on one bucket with the given emission interval and tolerance: `tat` in, the new
    /// `tat` (if it changes) and the decision out.
    fn gcra(
        &self,
        tat: u64,
        now: u64,
        (interval, tolerance): (u64, u64),
    ) -> (Option<u64>, Decision) {
        if interval == 0 {
            // A mesh-wide limit failing open.
            return (
                None,
                Decision::Admit {
                    remaining: self.burst,
                },
            );
        }
        let new = tat.max(now).saturating_add(interval);
        let ahead = new - now;
        if ahead <= tolerance {
            let remaining = ((tolerance - ahead) / interval) as u32;
            return (Some(new), Decision::Admit { remaining });
        }
        let wait = ahead - tolerance;
        match self.max_delay {
            Some(max) if wait <= max => (Some(new), Decision::Delay(Duration::from_nanos(wait))),
            _ => (None, Decision::Reject(Duration::from_nanos(wait))),
        }
    }

    /// Decides on a request with the given key bytes (`None`: the unkeyed bucket).
    pub fn check(&self, key: Option<&[u8]>) -> Decision {
        let now = self.now();
        let limits = match &self.mesh {
            Some(share) => {
                share.offer();
                share.limits()
            }
            None => (self.interval, self.tolerance),
        };
        let Some(key) = key else {
            let mut tat = self.single.load(Ordering::Acquire);
            loop {
                let (new, decision) = self.gcra(tat, now, limits);
                let Some(new) = new else { return decision };
                match self.single.compare_exchange_weak(
                    tat,
                    new,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                ) {
                    Ok(_) => return decision,
                    Err(seen) => tat = seen,
                }
            }
        };
        let h = xxhash_rust::xxh3::xxh3_64_with_seed(key, self.seed);
        let shard = &self.shards[(h % SHARDS as u64) as usize];
        let Ok(mut b) = shard.lock() else {
            // A poisoned shard only loses its limits; admitting is the safe failure for traffic.
            return Decision::Admit { remaining: 0 };
        };
        let tat = b.tat.get(&h).copied().unwrap_or(0);
        let (new, decision) = self.gcra(tat, now, limits);
        if let Some(new) = new {
            if let Some(t) = b.tat.get_mut(&h) {
                *t = new;
            } else {
                if b.tat.len() >= b.prune_at.max(PRUNE_AT) {
                    // A bucket whose arrival time has passed is full again: forgetting it
                    // changes nothing.
                    b.tat.retain(|_, t| *t > now);
                    if b.tat.len() >= MAX_KEYS_PER_SHARD {
                        let mut times: Vec<u64> = b.tat.values().copied().collect();
                        let mid = times.len() / 2;
                        let (_, median, _) = times.select_nth_unstable(mid);
                        let cut = *median;
                        b.tat.retain(|_, t| *t > cut);
                    }
                    b.prune_at = b.tat.len() * 2;
                }
                b.tat.insert(h, new);
            }
        }
        decision
    }

    /// Decides on `call`, reading its key.
    pub fn check_call(&self, call: &Call) -> Decision {
        match &self.key {
            RateKey::None => self.check(None),
            RateKey::ClientIp => match call.ctx.peer.ip() {
                IpAddr::V4(ip) => self.check(Some(&ip.octets())),
                IpAddr::V6(ip) => self.check(Some(&ip.octets())),
            },
            RateKey::PeerIdentity => {
                let id = call.ctx.identity.as_deref().and_then(|ids| ids.first());
                self.check(Some(id.map_or(&b""[..], |i| i.as_bytes())))
            }
            RateKey::Header(name) => {
                let v = call
                    .head
                    .headers
                    .get(name)
                    .map_or(&b""[..], |v| v.as_bytes());
                self.check(Some(v))
            }
        }
    }
}

/// Seconds until a bucket drained now is full again, for `RateLimit-Reset`.
fn tolerance_secs(interval: u64, burst: u32) -> u64 {
    interval
        .saturating_mul(u64::from(burst))
        .div_ceil(1_000_000_000)
}

/// Applies a route's rate limit.
pub type RateLimitLayer = ApplyLayer<RateLimiter>;
/// See [`RateLimitLayer`].
pub type RateLimit<S> = Apply<RateLimiter, S>;

impl Mechanism for RateLimiter {
    type Future<S: Inner> = ResponseFuture;

    fn apply<S: Inner>(self: &Arc<Self>, inner: &mut S, call: Call) -> ResponseFuture {
        let limiter = self.clone();
        match limiter.check_call(&call) {
            Decision::Admit { remaining } => {
                let fut = inner.call(call);
                Box::pin(async move {
                    let mut resp = fut.await?;
                    let h = resp.headers_mut();
                    h.insert(RATELIMIT_LIMIT, limiter.limit_header.clone());
                    h.insert(RATELIMIT_REMAINING, HeaderValue::from(remaining));
                    h.insert(RATELIMIT_RESET, limiter.reset_header.clone());
                    Ok(resp)
                })
            }
            Decision::Delay(wait) => {
                if let Some(m) = &limiter.metrics {
                    m.delayed.inc();
                }
                let mut inner = inner.clone();
                Box::pin(async move {
                    tokio::time::sleep(wait).await;
                    inner.call(call).await
                })
            }
            Decision::Reject(retry_after) => {
                if let Some(m) = &limiter.metrics {
                    m.rejected.inc();
                }
                Box::pin(std::future::ready(Err(ProxyError::RateLimited {
                    retry_after,
                    limit: limiter.burst,
                })))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(rate: f64, burst: u32, max_delay: Option<Duration>) -> RateLimiter {
        RateLimiter::new(
            &RateLimitConfig {
                rate,
                burst,
                key: RateKey::None,
                max_delay,
                mesh: None,
            },
            None,
            7,
            None,
        )
    }

    #[tokio::test(start_paused = true)]
    async fn admits_the_burst_then_the_rate() {
        let l = limiter(10.0, 3, None);
        let admitted = (0..10)
            .filter(|_| matches!(l.check(None), Decision::Admit { .. }))
            .count();
        assert_eq!(admitted, 3, "the burst");
        let Decision::Reject(wait) = l.check(None) else {
            panic!("over the limit")
        };
        assert!(wait <= Duration::from_millis(100));
        // Over 10 s at 10/s, exactly 100 more get in when offered 30/s.
        let mut ok = 0;
        for _ in 0..300 {
            tokio::time::advance(Duration::from_nanos(33_333_333)).await;
            if matches!(l.check(None), Decision::Admit { .. }) {
                ok += 1;
            }
        }
        assert!((99..=101).contains(&ok), "{ok}");
    }

    #[tokio::test(start_paused = true)]
    async fn throttle_reserves_slots_up_to_max_delay() {
        let l = limiter(10.0, 1, Some(Duration::from_millis(250)));
        assert!(matches!(l.check(None), Decision::Admit { .. }));
        assert_eq!(l.check(None), Decision::Delay(Duration::from_millis(100)));
        assert_eq!(l.check(None), Decision::Delay(Duration::from_millis(200)));
        assert!(
            matches!(l.check(None), Decision::Reject(_)),
            "300 ms is past max_delay"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_throttled_call_reaches_the_upstream_when_its_slot_comes() {
        use crate::proxy::resilience::tests::{answer, call, Script};
        use tower::{Layer, Service};
        let l = Arc::new(limiter(20.0, 1, Some(Duration::from_secs(1))));
        let inner = Script::new(|_, _| answer(200, &[]));
        let svc = RateLimitLayer::new(Some(l)).layer(inner.clone());
        let start = Instant::now();
        // Ten at once at 20/s: the first at once, then one every 50 ms; the last after 450 ms.
        let answers = futures_util::future::join_all((0..10).map(|_| {
            let mut svc = svc.clone();
            async move { svc.call(call(http::Method::GET, &[])).await }
        }))
        .await;
        assert!(answers
            .iter()
            .all(|r| r.as_ref().is_ok_and(|r| r.status() == 200)));
        let at: Vec<Duration> = inner.seen().iter().map(|t| t.at - start).collect();
        assert_eq!(
            at,
            (0..10)
                .map(|i| Duration::from_millis(50 * i))
                .collect::<Vec<_>>()
        );
        // The 11th would wait 500 ms more: still within max_delay, it waits its turn too.
        let mut svc = svc.clone();
        svc.call(call(http::Method::GET, &[])).await.unwrap();
        assert_eq!(inner.seen()[10].at - start, Duration::from_millis(500));
    }

    #[tokio::test(start_paused = true)]
    async fn keys_have_their_own_buckets() {
        let l = limiter(1.0, 1, None);
        assert!(matches!(l.check(Some(b"a")), Decision::Admit { .. }));
        assert!(matches!(l.check(Some(b"b")), Decision::Admit { .. }));
        assert!(matches!(l.check(Some(b"a")), Decision::Reject(_)));
    }

    /// More sidecars than requests per second: each gets a fraction of one, never nothing, and
    /// the fleet still admits R.
    #[tokio::test(start_paused = true)]
    async fn a_fractional_mesh_share_admits_one_request_per_its_interval() {
        use crate::control::config::resilience::{MeshScope, OnPartition};
        use crate::control::mesh::allowance::Allowances;
        let cfg = RateLimitConfig {
            rate: 2.0,
            burst: 2,
            key: RateKey::None,
            max_delay: None,
            mesh: Some(MeshScope {
                name: "api".into(),
                on_partition: OnPartition::LocalShare,
            }),
        };
        let metrics = crate::telemetry::metrics::Metrics::new().unwrap().mesh;
        let allowances = Allowances::new(metrics, None, None);
        let share = allowances.get(&cfg).unwrap();
        // Five sidecars share 2 requests/s: 0.4/s each.
        share.grant(0.4, 5);
        let l = RateLimiter::new(&cfg, None, 7, Some(share));
        let mut admitted = 0;
        // 10 requests/s offered for 25 s.
        for _ in 0..250 {
            if matches!(l.check(None), Decision::Admit { .. }) {
                admitted += 1;
            }
            tokio::time::advance(Duration::from_millis(100)).await;
        }
        // 0.4/s for 25 s, plus the burst of one (2 × 0.4 / 2, at least 1).
        assert!((10..=11).contains(&admitted), "{admitted}");
    }
}
