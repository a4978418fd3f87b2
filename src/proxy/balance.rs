//! Picks an endpoint among a cluster's endpoints.
//!
//! [`Picker`] holds what each algorithm precomputes when the endpoint set changes (a weighted
//! round-robin schedule, cumulative weights, a hash ring, a Maglev table), so a pick takes no
//! lock and allocates nothing. Every algorithm skips endpoints that are unavailable (failing their
//! checks, ejected) or already tried by this request, and says so when none is left. [`RoundRobin`]
//! and [`Weighted`] also serve TCP listeners and weighted route splits.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::control::config::upstream::{Balancer, HashOn};
use crate::proxy::clock;
use crate::proxy::endpoint::Endpoint;

/// Points per unit of weight on the hash ring (as ketama): enough for an even spread.
const RING_POINTS_PER_WEIGHT: usize = 160;
/// Maglev table size: a prime well above 100 × the endpoints of a typical cluster.
const MAGLEV_SIZE: usize = 65_537;
/// Largest weighted round-robin schedule precomputed; larger weight sums use blocks.
const MAX_SCHEDULE: u64 = 16_384;
/// How much cheaper the second peak-EWMA candidate must be to win over the first. Latency
/// estimates hold their peaks, so two equal endpoints' costs differ by their noise; the first
/// candidate is drawn by weight, and keeping it unless the other is clearly better is what keeps
/// the split proportional to weight between otherwise equal endpoints.
const PEAK_EWMA_MARGIN: f64 = 2.0;
/// The cost of an endpoint not measured yet, in nanoseconds: as fast as 1 ms.
const UNMEASURED_NANOS: f64 = 1_000_000.0;

/// A stable 64-bit hash (XXH3): the same key hashes alike in every sidecar and every version.
pub fn hash(bytes: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(bytes)
}

/// Calls `f` with the bytes of a request's key, if the request has one.
pub fn with_key<R>(
    on: &HashOn,
    headers: &http::HeaderMap,
    path: &str,
    peer: std::net::SocketAddr,
    f: impl FnOnce(&[u8]) -> R,
) -> Option<R> {
    match on {
        HashOn::Header(name) => headers.get(name).map(|v| f(v.as_bytes())),
        HashOn::Cookie(name) => headers
            .get_all(http::header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|kv| kv.trim().split_once('='))
            .find(|(k, _)| k == name)
            .map(|(_, v)| f(v.as_bytes())),
        HashOn::SourceIp => Some(match peer.ip() {
            std::net::IpAddr::V4(ip) => f(&ip.octets()),
            std::net::IpAddr::V6(ip) => f(&ip.octets()),
        }),
        HashOn::Path => Some(f(path.as_bytes())),
    }
}

/// Jump consistent hash (Lamping and Veach, 2014): a bucket in `0..buckets` for `key`; growing
/// the number of buckets moves only the keys the new buckets take.
pub fn jump_hash(mut key: u64, buckets: usize) -> usize {
    let (mut b, mut j) = (-1i64, 0i64);
    while j < buckets as i64 {
        b = j;
        key = key.wrapping_mul(2_862_933_555_777_941_757).wrapping_add(1);
        j = ((b + 1) as f64 * ((1u64 << 31) as f64 / ((key >> 33) + 1) as f64)) as i64;
    }
    b.max(0) as usize
}

/// The precomputed state of a balancing algorithm over one endpoint set.
#[derive(Debug)]
pub enum Picker {
    /// Smooth weighted round robin, as a schedule of indices.
    RoundRobin {
        /// Endpoint indices in visiting order.
        schedule: Vec<u32>,
        /// Shared cursor.
        next: AtomicUsize,
    },
    /// Power of two choices on load per weight, candidates drawn by weight.
    LeastRequest(Cumulative),
    /// Power of two choices on peak-EWMA cost, candidates drawn by weight.
    PeakEwma(Cumulative),
    /// Weighted random.
    Random(Cumulative),
    /// A hash ring: sorted points with the endpoint each belongs to.
    RingHash(Vec<(u64, u32)>),
    /// A Maglev lookup table of endpoint indices.
    Maglev(Vec<u32>),
}

/// Running sums of endpoint weights, for weighted random draws.
#[derive(Debug)]
pub struct Cumulative(Vec<u64>);

impl Cumulative {
    fn new(endpoints: &[Arc<Endpoint>]) -> Self {
        let mut sum = 0;
        Self(
            endpoints
                .iter()
                .map(|e| {
                    sum += u64::from(e.weight);
                    sum
                })
                .collect(),
        )
    }

    fn draw(&self, rng: &mut fastrand::Rng) -> usize {
        let total = self.0.last().copied().unwrap_or(0);
        if total == 0 {
            return 0;
        }
        let n = rng.u64(..total);
        self.0.partition_point(|&c| c <= n)
    }
}

/// The seed of a try: the request's number on its route (`base`, consecutive) and the try's
/// attempt, mixed so that consecutive requests draw independent-looking seeds. Unmixed, the
/// seeds of consecutive requests are a lattice, and reduced modulo a Maglev table's size some
/// runs of them miss the weights: 400 keyless requests in a row put 61% on an endpoint of
/// weight 3 against 1 in one test run, where 75% ± 4% is what independent draws give.
pub fn try_seed(base: usize, attempt: u32) -> u64 {
    // splitmix64's finaliser.
    let mut z = (base as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ u64::from(attempt);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// What a pick needs from the request.
#[derive(Debug, Clone, Copy)]
pub struct PickRequest {
    /// The request's hash key, for consistent hashing.
    pub key: Option<u64>,
    /// Bit `i % 64` set: endpoint `i` was already tried by this request.
    pub tried: u64,
    /// A per-request random seed.
    pub seed: u64,
}

impl Picker {
    /// Precomputes `kind` over `endpoints`.
    pub fn build(kind: Balancer, endpoints: &[Arc<Endpoint>]) -> Self {
        match kind {
            Balancer::RoundRobin => Picker::RoundRobin {
                schedule: schedule(endpoints),
                next: AtomicUsize::new(0),
            },
            Balancer::LeastRequest => Picker::LeastRequest(Cumulative::new(endpoints)),
            Balancer::PeakEwma => Picker::PeakEwma(Cumulative::new(endpoints)),
            Balancer::Random => Picker::Random(Cumulative::new(endpoints)),
            Balancer::RingHash => Picker::RingHash(ring(endpoints)),
            Balancer::Maglev => Picker::Maglev(maglev(endpoints, MAGLEV_SIZE)),
        }
    }

    /// Picks an endpoint index for which `usable` holds and that this request has not tried,
    /// falling back to a tried one; `None` if no endpoint is usable.
    pub fn pick(
        &self,
        endpoints: &[Arc<Endpoint>],
        req: PickRequest,
        usable: impl Fn(&Endpoint) -> bool,
    ) -> Option<usize> {
        let n = endpoints.len();
        if n == 0 {
            return None;
        }
        if n == 1 {
            // Nothing to choose between: draws would only ask the same endpoint again.
            return usable(&endpoints[0]).then_some(0);
        }
        let fresh = |i: usize| req.tried & (1u64 << (i % 64)) == 0;
        let ok = |i: usize| usable(&endpoints[i]);
        let first = match self {
            Picker::RoundRobin { schedule, next } => {
                let start = next.fetch_add(1, Ordering::Relaxed);
                (0..schedule.len())
                    .map(|k| schedule[(start + k) % schedule.len()] as usize)
                    .find(|&i| ok(i) && fresh(i))
            }
            Picker::Random(c) => {
                let mut rng = fastrand::Rng::with_seed(req.seed);
                (0..8)
                    .map(|_| c.draw(&mut rng))
                    .find(|&i| ok(i) && fresh(i))
            }
            Picker::LeastRequest(c) | Picker::PeakEwma(c) => {
                let mut rng = fastrand::Rng::with_seed(req.seed);
                let mut candidates = (0..16)
                    .map(|_| c.draw(&mut rng))
                    .filter(|&i| ok(i) && fresh(i));
                let first = candidates.next();
                // The second choice must be another endpoint, or P2C degenerates into a random
                // pick whenever both draws land on the same (perhaps slow) one.
                let second = first.and_then(|a| candidates.find(|&b| b != a));
                match (first, second) {
                    (Some(a), Some(b)) => Some(self.better(endpoints, a, b)),
                    (one, _) => one,
                }
            }
            Picker::RingHash(points) => {
                let key = req.key.unwrap_or(req.seed);
                let start = points.partition_point(|&(h, _)| h < key);
                (0..points.len())
                    .map(|k| points[(start + k) % points.len()].1 as usize)
                    .find(|&i| ok(i) && fresh(i))
            }
            Picker::Maglev(table) => {
                let key = req.key.unwrap_or(req.seed);
                let first = table[(key % table.len() as u64) as usize] as usize;
                if ok(first) && fresh(first) {
                    Some(first)
                } else {
                    // Walk the table with a stride co-prime to its size: a stable, spread-out
                    // sequence of fallbacks for this key.
                    (1..table.len())
                        .map(|k| table[((key as usize) + k * 7919) % table.len()] as usize)
                        .find(|&i| ok(i) && fresh(i))
                }
            }
        };
        // Random draws can miss the few usable endpoints: scan from a random start, preferring
        // one not tried yet.
        let start = (req.seed % n as u64) as usize;
        let scan = |want_fresh: bool| {
            (0..n)
                .map(|k| (start + k) % n)
                .find(|&i| ok(i) && (!want_fresh || fresh(i)))
        };
        first
            .or_else(|| scan(true))
            .or_else(|| scan(false))
            .filter(|&i| i < n)
    }

    /// Of two candidates, `a` drawn first by weight: `b` if it is less loaded (least-request) or
    /// clearly cheaper (peak-EWMA), else `a`. Ties going to the weight-drawn `a` make the split
    /// proportional to weight among equal endpoints, for one request at a time as for many.
    fn better(&self, endpoints: &[Arc<Endpoint>], a: usize, b: usize) -> usize {
        let b_wins = match self {
            Picker::PeakEwma(_) => {
                let now = clock::now();
                let cost = |i: usize| endpoints[i].cost(now, UNMEASURED_NANOS);
                cost(b) * PEAK_EWMA_MARGIN < cost(a)
            }
            _ => endpoints[b].load() < endpoints[a].load(),
        };
        if b_wins {
            b
        } else {
            a
        }
    }
}

/// A smooth weighted round-robin order (as nginx): weights 5,1,1 give a,a,b,a,c,a,a rather than
/// five a's in a row.
fn schedule(endpoints: &[Arc<Endpoint>]) -> Vec<u32> {
    let total: u64 = endpoints.iter().map(|e| u64::from(e.weight)).sum();
    if total == 0 {
        return Vec::new();
    }
    let scale = total.div_ceil(MAX_SCHEDULE).max(1);
    let weights: Vec<i64> = endpoints
        .iter()
        .map(|e| (u64::from(e.weight) / scale).max(1) as i64)
        .collect();
    let sum: i64 = weights.iter().sum();
    let mut current = vec![0i64; weights.len()];
    let mut out = Vec::with_capacity(sum as usize);
    for _ in 0..sum {
        for (c, w) in current.iter_mut().zip(&weights) {
            *c += w;
        }
        let best = (0..current.len())
            .max_by_key(|&i| (current[i], -(i as i64)))
            .unwrap_or(0);
        current[best] -= sum;
        out.push(best as u32);
    }
    out
}

fn ring(endpoints: &[Arc<Endpoint>]) -> Vec<(u64, u32)> {
    let mut points = Vec::new();
    for (i, e) in endpoints.iter().enumerate() {
        for k in 0..RING_POINTS_PER_WEIGHT * e.weight as usize {
            points.push((hash(format!("{}#{k}", e.authority).as_bytes()), i as u32));
        }
    }
    points.sort_unstable();
    points
}

/// Builds a Maglev table (Eisenbud et al., NSDI 2016) with weights as in Envoy: each endpoint
/// takes turns in proportion to its weight.
fn maglev(endpoints: &[Arc<Endpoint>], size: usize) -> Vec<u32> {
    if endpoints.is_empty() {
        return Vec::new();
    }
    let m = size as u64;
    let perms: Vec<(u64, u64)> = endpoints
        .iter()
        .map(|e| {
            let name = e.authority.as_str().as_bytes();
            let offset = hash(name) % m;
            let skip = xxhash_rust::xxh3::xxh3_64_with_seed(name, 0x5bd1_e995) % (m - 1) + 1;
            (offset, skip)
        })
        .collect();
    let max_weight = endpoints.iter().map(|e| e.weight).max().unwrap_or(1) as f64;
    let mut next = vec![0u64; endpoints.len()];
    let mut credit = vec![0f64; endpoints.len()];
    let mut table = vec![u32::MAX; size];
    let mut filled = 0;
    while filled < size {
        for i in 0..endpoints.len() {
            credit[i] += f64::from(endpoints[i].weight) / max_weight;
            if credit[i] < 1.0 {
                continue;
            }
            credit[i] -= 1.0;
            let (offset, skip) = perms[i];
            loop {
                let c = ((offset + next[i] * skip) % m) as usize;
                next[i] += 1;
                if table[c] == u32::MAX {
                    table[c] = i as u32;
                    filled += 1;
                    break;
                }
            }
            if filled == size {
                break;
            }
        }
    }
    table
}

/// Lock-free round-robin cursor.
#[derive(Debug, Default)]
pub struct RoundRobin {
    next: AtomicUsize,
}

impl RoundRobin {
    /// The next item of `items`, or `None` when there are none.
    pub fn pick<'a, T>(&self, items: &'a [T]) -> Option<&'a T> {
        if items.is_empty() {
            return None;
        }
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        items.get(n % items.len())
    }
}

/// Picks among weighted choices in exact proportion to their weights, lock-free.
#[derive(Debug)]
pub struct Weighted {
    /// Running sums of the weights; the choice `i` owns `[cumulative[i-1], cumulative[i])`.
    cumulative: Vec<u64>,
    next: AtomicUsize,
}

impl Weighted {
    /// Builds the picker; `weights` must not all be zero (config validation ensures it).
    pub fn new(weights: impl IntoIterator<Item = u32>) -> Self {
        let mut sum = 0u64;
        let cumulative = weights
            .into_iter()
            .map(|w| {
                sum += u64::from(w);
                sum
            })
            .collect();
        Self {
            cumulative,
            next: AtomicUsize::new(0),
        }
    }

    /// Index of the next choice.
    pub fn pick(&self) -> usize {
        let total = self.cumulative.last().copied().unwrap_or(0);
        if total == 0 || self.cumulative.len() == 1 {
            return 0;
        }
        let n = self.next.fetch_add(1, Ordering::Relaxed) as u64 % total;
        self.cumulative.partition_point(|&c| c <= n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn round_robin_cycles() {
        let rr = RoundRobin::default();
        let items = [1, 2, 3];
        let picks: Vec<i32> = (0..6).map(|_| *rr.pick(&items).unwrap()).collect();
        assert_eq!(picks, [1, 2, 3, 1, 2, 3]);
        assert!(rr.pick::<i32>(&[]).is_none());
    }

    fn endpoints(n: usize) -> Vec<Arc<Endpoint>> {
        weighted(&vec![1; n])
    }

    fn req(key: u64) -> PickRequest {
        PickRequest {
            key: Some(key),
            tried: 0,
            seed: key,
        }
    }

    #[test]
    fn consistent_hashing_moves_few_keys_when_an_endpoint_joins() {
        for kind in [Balancer::RingHash, Balancer::Maglev] {
            let ten = endpoints(10);
            let mut eleven = ten.clone();
            eleven.push(endpoints(11).pop().unwrap());
            let (a, b) = (Picker::build(kind, &ten), Picker::build(kind, &eleven));
            let keys = 20_000u64;
            let mut moved = 0;
            let mut counts = [0usize; 11];
            for k in 0..keys {
                let key = hash(format!("user-{k}").as_bytes());
                let before = a.pick(&ten, req(key), |_| true).unwrap();
                assert_eq!(before, a.pick(&ten, req(key), |_| true).unwrap(), "stable");
                let after = b.pick(&eleven, req(key), |_| true).unwrap();
                counts[after] += 1;
                // An index below 10 is the same endpoint in both sets.
                if after != before {
                    moved += 1;
                }
            }
            let share = moved as f64 / keys as f64;
            println!("{kind:?}: adding an 11th endpoint to 10 moved {moved} of {keys} keys ({:.1}%); spread {counts:?}", share * 100.0);
            assert!(share <= 0.15, "{kind:?} moved {share}");
            assert!(
                counts.iter().all(|&c| c > 1000 && c < 2700),
                "{kind:?} spread {counts:?}"
            );
        }
    }

    #[test]
    fn picks_skip_unusable_and_tried_endpoints() {
        let eps = endpoints(3);
        for kind in [
            Balancer::RoundRobin,
            Balancer::LeastRequest,
            Balancer::PeakEwma,
            Balancer::Random,
            Balancer::RingHash,
            Balancer::Maglev,
        ] {
            let p = Picker::build(kind, &eps);
            for seed in 0..50 {
                let r = PickRequest {
                    key: Some(seed),
                    tried: 0b001,
                    seed,
                };
                let i = p
                    .pick(&eps, r, |e| e.authority.as_str() != "10.0.0.1:80")
                    .unwrap();
                assert_eq!(i, 2, "{kind:?}");
            }
            assert!(p.pick(&eps, req(1), |_| false).is_none());
        }
    }

    #[test]
    fn jump_hash_moves_only_what_a_new_bucket_takes() {
        let keys = 10_000u64;
        let moved = (0..keys)
            .filter(|k| {
                let h = hash(&k.to_le_bytes());
                let (a, b) = (jump_hash(h, 4), jump_hash(h, 5));
                assert!(a < 4 && b < 5);
                a != b && b != 4
            })
            .count();
        assert_eq!(moved, 0, "keys move only to the new shard");
    }

    #[test]
    fn smooth_round_robin_interleaves_by_weight() {
        assert_eq!(schedule(&weighted(&[5, 1, 1])), [0, 0, 1, 0, 2, 0, 0]);
    }

    #[tokio::test(start_paused = true)]
    async fn peak_ewma_picks_by_latency_times_load() {
        let eps = endpoints(4);
        eps[0].observe_latency(Duration::from_millis(10));
        eps[1].observe_latency(Duration::from_millis(10));
        eps[2].observe_latency(Duration::from_millis(100));
        // eps[3] has no sample: it costs as if it answered in 1 ms, so it gets tried.
        let p = Picker::build(Balancer::PeakEwma, &eps);
        let picks = |p: &Picker| {
            let mut counts = [0usize; 4];
            for seed in 0..1000 {
                let r = PickRequest {
                    key: None,
                    tried: 0,
                    seed,
                };
                counts[p.pick(&eps, r, |_| true).unwrap()] += 1;
            }
            counts
        };
        let idle = picks(&p);
        assert_eq!(
            idle[2], 0,
            "an idle slow endpoint loses every pair: {idle:?}"
        );
        assert!(
            idle[3] > idle[0] && idle[3] > idle[1],
            "the unmeasured one wins its pairs: {idle:?}"
        );
        // Load counts too: thirty requests in flight on each fast endpoint (cost 10 ms × 31)
        // make the idle slow one (100 ms × 1) clearly cheaper than the fast ones.
        for e in [&eps[0], &eps[1], &eps[3]] {
            e.in_flight.store(30, Ordering::Relaxed);
        }
        let busy = picks(&p);
        assert!(
            busy[2] > busy[0] && busy[2] > busy[1],
            "the idle slow endpoint now wins against the busy fast ones: {busy:?}"
        );
        assert!(busy[2] > 0 && busy[0] > 0 && busy[3] > 0, "{busy:?}");
    }

    fn weighted(weights: &[u32]) -> Vec<Arc<Endpoint>> {
        weights
            .iter()
            .enumerate()
            .map(|(i, w)| {
                Arc::new(Endpoint::new(
                    format!("10.0.0.{i}:80").parse().unwrap(),
                    "static",
                    *w,
                    None,
                    Arc::new(crate::rng::Rng::with_seed(1)),
                    1,
                ))
            })
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn every_balancer_splits_equal_endpoints_by_weight() {
        for weights in [&[3, 1][..], &[3, 1, 1, 1], &[1, 2, 5]] {
            let total: u32 = weights.iter().sum();
            for kind in [
                Balancer::RoundRobin,
                Balancer::LeastRequest,
                Balancer::PeakEwma,
                Balancer::Random,
                Balancer::RingHash,
                Balancer::Maglev,
            ] {
                let eps = weighted(weights);
                // Equal latency, with noise under the margin.
                for (i, e) in eps.iter().enumerate() {
                    e.observe_latency(Duration::from_micros(500 + 100 * i as u64));
                }
                let p = Picker::build(kind, &eps);
                let n = 8_000;
                let mut counts = vec![0usize; eps.len()];
                for seed in 0..n as u64 {
                    let r = PickRequest {
                        key: None,
                        tried: 0,
                        seed: hash(&seed.to_le_bytes()),
                    };
                    counts[p.pick(&eps, r, |_| true).unwrap()] += 1;
                }
                for (i, w) in weights.iter().enumerate() {
                    let want = f64::from(*w) / f64::from(total);
                    let got = counts[i] as f64 / n as f64;
                    assert!(
                        (got - want).abs() < 0.04,
                        "{kind:?} {weights:?}: {counts:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn keyless_maglev_picks_follow_the_weights_over_any_run_of_consecutive_requests() {
        // A route numbers its requests from a random start; any 400 in a row must split 3:1,
        // whatever the endpoints' addresses (they lay out the tables).
        for port in 0..40u16 {
            let eps: Vec<_> = [3, 1]
                .iter()
                .enumerate()
                .map(|(i, w)| {
                    Arc::new(Endpoint::new(
                        format!("127.0.0.1:{}", 40_000 + port * 2 + i as u16)
                            .parse()
                            .unwrap(),
                        "static",
                        *w,
                        None,
                        Arc::new(crate::rng::Rng::with_seed(1)),
                        1,
                    ))
                })
                .collect();
            keyless_runs_follow_the_weights(Balancer::Maglev, &eps);
        }
    }

    fn keyless_runs_follow_the_weights(kind: Balancer, eps: &[Arc<Endpoint>]) {
        let p = Picker::build(kind, eps);
        for start in (0..1024usize).step_by(8) {
            let heavy = (start..start + 400)
                .filter(|&base| {
                    let r = PickRequest {
                        key: None,
                        tried: 0,
                        seed: try_seed(base, 1),
                    };
                    p.pick(eps, r, |_| true) == Some(0)
                })
                .count();
            assert!(
                (heavy as f64 / 400.0 - 0.75).abs() <= 0.08,
                "{kind:?} from request {start}: {heavy} of 400 on the heavy endpoint"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn peak_ewma_steers_a_heavy_endpoint_s_share_away_when_it_is_slow() {
        let eps = weighted(&[3, 1]);
        eps[0].observe_latency(Duration::from_millis(50));
        eps[1].observe_latency(Duration::from_millis(5));
        let p = Picker::build(Balancer::PeakEwma, &eps);
        let heavy = (0..1000u64)
            .filter(|s| {
                let r = PickRequest {
                    key: None,
                    tried: 0,
                    seed: hash(&s.to_le_bytes()),
                };
                p.pick(&eps, r, |_| true) == Some(0)
            })
            .count();
        // Ten times slower loses every pair it is in; only when all sixteen draws land on it
        // (0.75^16, about 1%) is there no pair to lose.
        assert!(heavy <= 20, "{heavy} of 1000");
        // Without new samples its estimate decays while the other's is refreshed by its
        // answers, and it is tried again.
        tokio::time::advance(Duration::from_secs(6)).await;
        eps[1].observe_latency(Duration::from_millis(5));
        let r = PickRequest {
            key: None,
            tried: 0,
            seed: 7,
        };
        assert!((0..200u64)
            .map(|s| PickRequest {
                seed: hash(&s.to_le_bytes()),
                ..r
            })
            .any(|r| p.pick(&eps, r, |_| true) == Some(0)));
    }

    #[test]
    fn weighted_follows_weights_and_skips_zero() {
        let w = Weighted::new([3, 0, 1]);
        let mut counts = [0; 3];
        for _ in 0..400 {
            counts[w.pick()] += 1;
        }
        assert_eq!(counts, [300, 0, 100]);
    }
}
