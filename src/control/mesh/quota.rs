//! Mesh-wide rate limits: R requests per second shared by every sidecar that serves a limit, as
//! leased shares each sidecar enforces locally.
//!
//! Sidecars report their recent demand to the leader; once per [`TICK`] the leader computes
//! max-min fair shares and commits every change in one entry, for all limits and sidecars at once,
//! so the log's write rate does not grow with the fleet. Shares are replicated state: a new leader
//! continues from them. Nothing here does I/O or reads a clock; the leader's bookkeeping takes the
//! time as an argument, so its safety rule is tested with paused time.
//!
//! The invariant: the shares a sidecar may still be enforcing, summed over sidecars, never exceed
//! R. A sidecar enforces a share for [`GRANT`] from the moment it *asked* for it, and only the
//! newest it received. So a decrease takes effect at once, while the room it frees is handed to
//! others only after the decreased sidecar acknowledged it (its next refresh names the state it
//! holds) or its old grant ran out. A new leader, which cannot know what was acknowledged before
//! it, grants no increase for [`GRANT`] after it takes over: decreases go on, shares stay.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::checks::{CheckVerdict, Checks};
use super::hints::{Hint, Report};

/// How often a sidecar refreshes its shares (a long poll: a change is sent to it at once).
pub const REFRESH: Duration = Duration::from_secs(1);
/// How long a sidecar enforces a share after it asked for it: two refreshes, so one lost refresh
/// changes nothing, and a cut-off sidecar falls back within one refresh of noticing.
pub const GRANT: Duration = Duration::from_secs(2);
/// How often the leader reallocates.
pub const TICK: Duration = Duration::from_millis(250);
/// A sidecar silent this long has left: its shares go back to the others.
pub const CLIENT_TTL: Duration = Duration::from_secs(10);

/// Rates are integers in thousandths of a request per second: the sums the invariant is about
/// are exact, and the state is `Eq`.
pub const MILLI: f64 = 1000.0;

/// A sidecar's id in the allocation (random per process: a restarted sidecar is a new one).
pub type ClientId = String;

/// One sidecar's share of a limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Share {
    /// Requests per second, in thousandths.
    pub rate: u64,
    /// Log index of the allocation that last changed it.
    pub modified: u64,
}

/// One mesh-wide limit as the group holds it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limit {
    /// The capacity R, in thousandths of a request per second.
    pub rate: u64,
    /// Shares by sidecar.
    pub shares: BTreeMap<ClientId, Share>,
}

impl Limit {
    /// The sum of the shares.
    pub fn allocated(&self) -> u64 {
        self.shares.values().map(|s| s.rate).sum()
    }
}

/// Every mesh-wide limit, by name. Each limit is shared until it changes, so publishing the
/// state after an apply copies only the limits that changed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quotas {
    limits: BTreeMap<String, Arc<Limit>>,
}

/// One allocation tick's changes, for every limit that changed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allocation {
    /// The limits that changed.
    pub limits: Vec<LimitChange>,
}

/// The changes to one limit in an allocation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimitChange {
    /// The limit's name.
    pub name: String,
    /// Its capacity, in thousandths of a request per second.
    pub rate: u64,
    /// New shares, by sidecar.
    pub shares: Vec<(ClientId, u64)>,
    /// Sidecars that left.
    pub dropped: Vec<ClientId>,
}

impl Quotas {
    /// Applies an allocation committed at log `index`.
    pub fn apply(&mut self, index: u64, allocation: &Allocation) -> usize {
        let mut changed = 0;
        for change in &allocation.limits {
            let limit = Arc::make_mut(self.limits.entry(change.name.clone()).or_default());
            limit.rate = change.rate;
            for (client, rate) in &change.shares {
                limit.shares.insert(
                    client.clone(),
                    Share {
                        rate: *rate,
                        modified: index,
                    },
                );
                changed += 1;
            }
            for client in &change.dropped {
                changed += usize::from(limit.shares.remove(client).is_some());
            }
            if limit.shares.is_empty() {
                self.limits.remove(&change.name);
            }
        }
        changed
    }

    /// The limit named `name`.
    pub fn limit(&self, name: &str) -> Option<&Arc<Limit>> {
        self.limits.get(name)
    }

    /// Every limit, by name.
    pub fn limits(&self) -> impl Iterator<Item = (&str, &Arc<Limit>)> {
        self.limits.iter().map(|(k, v)| (k.as_str(), v))
    }
}

/// Max-min fair shares of `capacity` for `demands`: a demand at or below the level is met in
/// full and the rest is split evenly among the larger ones. When the demands leave capacity
/// over, it is split evenly on top of every demand, so a sidecar whose traffic grows has room
/// before the next allocation. The result sums to `capacity` (or 0 without demands).
pub fn fair_shares(capacity: u64, demands: &[u64]) -> Vec<u64> {
    let n = demands.len() as u64;
    if n == 0 {
        return Vec::new();
    }
    let total: u64 = demands.iter().sum();
    let mut shares = vec![0; demands.len()];
    if total <= capacity {
        let spare = capacity - total;
        for (i, d) in demands.iter().enumerate() {
            shares[i] = d + spare / n + u64::from((i as u64) < spare % n);
        }
        return shares;
    }
    // Water-filling: serve the smallest demands first, each at most an even split of what is
    // left among those not yet served; the units integer division leaves go one at a time to
    // the sidecars still short of their demand.
    let mut order: Vec<usize> = (0..demands.len()).collect();
    order.sort_by_key(|&i| (demands[i], i));
    let mut left = capacity;
    for (k, &i) in order.iter().enumerate() {
        let share = demands[i].min(left / (n - k as u64));
        shares[i] = share;
        left -= share;
    }
    while left > 0 {
        for &i in order.iter().rev() {
            if left > 0 && shares[i] < demands[i] {
                shares[i] += 1;
                left -= 1;
            }
        }
    }
    shares
}

/// What a sidecar said about one limit in its last refresh.
#[derive(Clone, Debug, PartialEq)]
pub struct Demand {
    /// The capacity it is configured with, in thousandths of a request per second.
    pub rate: u64,
    /// Requests per second offered to it lately (admitted or not), in thousandths.
    pub offered: u64,
}

#[derive(Debug)]
struct Seen {
    at: Instant,
    /// The state index of the last answer it holds: it enforces nothing older.
    holding: u64,
    demands: HashMap<String, Demand>,
}

/// A share that was decreased but may still be enforced by its sidecar.
#[derive(Clone, Debug)]
struct Superseded {
    rate: u64,
    /// Index of the allocation that decreased it (`None` until it commits): once the sidecar
    /// holds a state at or past it, it no longer enforces the old share.
    by: Option<u64>,
    /// When the sidecar's grant of the old share ran out at the latest.
    until: Option<Instant>,
}

/// The leader's allocation bookkeeping: demands and acknowledgements as refreshes arrive, and
/// the decreased shares still in force. Kept in memory only, like the lease table.
#[derive(Debug)]
pub struct Allocator {
    seen: HashMap<ClientId, Seen>,
    /// By limit, then sidecar.
    superseded: HashMap<String, HashMap<ClientId, Vec<Superseded>>>,
    /// No increase before this (a new leader cannot know what is still in force).
    frozen_until: Instant,
}

impl Allocator {
    /// A leader's allocator, elected at `now`.
    pub fn new(now: Instant) -> Self {
        Allocator {
            seen: HashMap::new(),
            superseded: HashMap::new(),
            frozen_until: now + GRANT,
        }
    }

    /// Records a refresh from `client`, which holds the state as of `holding`.
    pub fn refresh(
        &mut self,
        client: &str,
        holding: u64,
        demands: HashMap<String, Demand>,
        now: Instant,
    ) {
        for per_client in self.superseded.values_mut() {
            if let Some(old) = per_client.get_mut(client) {
                old.retain(|s| s.by.map_or(true, |by| holding < by));
            }
        }
        match self.seen.get_mut(client) {
            Some(s) => {
                s.at = now;
                s.holding = s.holding.max(holding);
                s.demands = demands;
            }
            None => {
                self.seen.insert(
                    client.to_owned(),
                    Seen {
                        at: now,
                        holding,
                        demands,
                    },
                );
            }
        }
    }

    /// Number of sidecars heard from within [`CLIENT_TTL`].
    pub fn clients(&self) -> usize {
        self.seen.len()
    }

    /// The next allocation from the current `state`, or `None` when nothing changes. Its
    /// decreases are recorded as still in force until [`Allocator::committed`] names the index
    /// they committed at (or [`Allocator::abandoned`] says they did not).
    pub fn tick(&mut self, state: &Quotas, now: Instant) -> Option<Allocation> {
        self.seen
            .retain(|_, s| now.saturating_duration_since(s.at) < CLIENT_TTL);
        for per_client in self.superseded.values_mut() {
            for old in per_client.values_mut() {
                old.retain(|s| s.until.map_or(true, |u| u > now));
            }
            per_client.retain(|_, v| !v.is_empty());
        }
        self.superseded.retain(|_, v| !v.is_empty());

        // Every limit someone asks about, and every limit that still has shares.
        let mut names: Vec<&str> = self
            .seen
            .values()
            .flat_map(|s| s.demands.keys().map(String::as_str))
            .chain(state.limits().map(|(n, _)| n))
            .collect();
        names.sort_unstable();
        names.dedup();
        let names: Vec<String> = names.into_iter().map(str::to_owned).collect();

        let frozen = now < self.frozen_until;
        let mut limits = Vec::new();
        for name in names {
            if let Some(change) = self.allocate(&name, state.limit(&name), frozen) {
                limits.push(change);
            }
        }
        (!limits.is_empty()).then_some(Allocation { limits })
    }

    fn allocate(
        &mut self,
        name: &str,
        current: Option<&Arc<Limit>>,
        frozen: bool,
    ) -> Option<LimitChange> {
        let empty = Limit::default();
        let current = current.map_or(&empty, |l| l.as_ref());
        // The sidecars asking, in a stable order; the capacity is the smallest any of them is
        // configured with (during a rollout that changes R, the stricter one holds).
        let mut live: Vec<(&str, &Demand)> = self
            .seen
            .iter()
            .filter_map(|(c, s)| s.demands.get(name).map(|d| (c.as_str(), d)))
            .collect();
        live.sort_unstable_by_key(|(c, _)| *c);
        let rate = live
            .iter()
            .map(|(_, d)| d.rate)
            .min()
            .unwrap_or(current.rate);
        let demands: Vec<u64> = live.iter().map(|(_, d)| d.offered).collect();
        let targets = fair_shares(rate, &demands);

        let dropped: Vec<ClientId> = current
            .shares
            .keys()
            .filter(|c| !live.iter().any(|(l, _)| l == c))
            .cloned()
            .collect();
        let superseded = self.superseded.entry(name.to_owned()).or_default();
        let held = |c: &str, now_share: u64| {
            superseded
                .get(c)
                .into_iter()
                .flatten()
                .map(|s| s.rate)
                .fold(now_share, u64::max)
        };
        // What each sidecar may be enforcing once this allocation commits, before increases.
        let mut bound: u64 = 0;
        let mut changes = Vec::new();
        let mut increases = Vec::new();
        let mut decreased = Vec::new();
        // A share moves only by 2% of itself or more: measured demand wobbles, and a fleet of
        // thousands must not rewrite every share on every tick.
        let step = |a: u64, b: u64| (a.max(b) / 50).max(1);
        for ((client, _), target) in live.iter().zip(&targets) {
            let now_share = current.shares.get(*client).map_or(0, |s| s.rate);
            if *target < now_share && now_share - target >= step(now_share, *target) {
                changes.push(((*client).to_owned(), *target));
                decreased.push(((*client).to_owned(), now_share));
                bound += held(client, now_share);
            } else if *target > now_share
                && (target - now_share >= step(now_share, *target) || now_share == 0)
            {
                increases.push(((*client).to_owned(), now_share, *target));
                bound += held(client, now_share);
            } else {
                bound += held(client, now_share);
            }
        }
        // A departed sidecar adds nothing: it was silent for CLIENT_TTL, past any grant.
        if !frozen && !increases.is_empty() {
            let room = rate.saturating_sub(bound);
            let wanted: u64 = increases.iter().map(|(_, now, target)| target - now).sum();
            for (client, now_share, target) in increases {
                let deficit = target - now_share;
                let given = if wanted <= room {
                    deficit
                } else {
                    // u128: room × deficit can pass u64 for very large rates.
                    (u128::from(room) * u128::from(deficit) / u128::from(wanted)) as u64
                };
                if given >= step(now_share, target) || (given > 0 && given == deficit) {
                    changes.push((client, now_share + given));
                }
            }
        }
        for (client, old) in decreased {
            superseded.entry(client).or_default().push(Superseded {
                rate: old,
                by: None,
                until: None,
            });
        }
        if changes.is_empty() && dropped.is_empty() && rate == current.rate {
            return None;
        }
        Some(LimitChange {
            name: name.to_owned(),
            rate,
            shares: changes,
            dropped,
        })
    }

    /// The allocation proposed last committed at `index`: its decreases stop counting once
    /// their sidecars hold `index`, or [`GRANT`] after `now` at the latest.
    pub fn committed(&mut self, index: u64, now: Instant) {
        for per_client in self.superseded.values_mut() {
            for s in per_client.values_mut().flatten() {
                if s.by.is_none() && s.until.is_none() {
                    s.by = Some(index);
                    s.until = Some(now + GRANT);
                }
            }
        }
    }

    /// The allocation proposed last may or may not commit: its decreases count for a whole
    /// commit timeout and grant more.
    pub fn abandoned(&mut self, now: Instant, commit_timeout: Duration) {
        for per_client in self.superseded.values_mut() {
            for s in per_client.values_mut().flatten() {
                if s.until.is_none() {
                    s.until = Some(now + commit_timeout + GRANT);
                }
            }
        }
    }

    /// What `client` may be enforcing of `limit` at most, given `current` shares: the
    /// invariant's term for one sidecar (for the simulation's check).
    pub fn in_force(&self, limit: &str, client: &str, current: u64) -> u64 {
        self.superseded
            .get(limit)
            .and_then(|m| m.get(client))
            .into_iter()
            .flatten()
            .map(|s| s.rate)
            .fold(current, u64::max)
    }
}

/// A sidecar's refresh: its demand for every mesh-wide limit it serves.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Refresh {
    /// The sidecar.
    pub client: ClientId,
    /// The state index of the last answer it holds (0 at first).
    pub holding: u64,
    /// Its limits.
    pub limits: Vec<LimitDemand>,
    /// How long the leader may hold the call for a change, in milliseconds.
    #[serde(default)]
    pub wait_ms: u64,
    /// Failure hints this sidecar publishes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hints: Vec<Report>,
    /// The hint version of the last answer it holds (with `hints_epoch`).
    #[serde(default)]
    pub hints_seen: u64,
    /// The hint epoch of the last answer it holds.
    #[serde(default)]
    pub hints_epoch: u64,
    /// The `coordinated` clusters this sidecar checks.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub checks: Vec<String>,
    /// Verdicts on endpoints it owns, decided since its last refresh.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub verdicts: Vec<CheckVerdict>,
    /// The check version of the last answer it holds (in the same epoch as the hints).
    #[serde(default)]
    pub checks_seen: u64,
}

/// One limit in a refresh.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LimitDemand {
    /// The limit's name.
    pub name: String,
    /// Its configured capacity, in requests per second.
    pub rate: f64,
    /// Requests per second offered to it lately.
    pub offered: f64,
}

/// The answer to a refresh: the sidecar's shares as of a state index.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Granted {
    /// The state index the shares reflect (the next refresh's `holding`).
    pub index: u64,
    /// One entry per limit of the refresh, in the same order.
    pub limits: Vec<LimitGrant>,
    /// Live failure hints from the other sidecars, newer than the refresh's `hints_seen`.
    #[serde(default)]
    pub hints: Vec<Hint>,
    /// The hint version this answer reflects.
    #[serde(default)]
    pub hints_seen: u64,
    /// The leader's hint epoch (its term): versions of another epoch are not comparable.
    #[serde(default)]
    pub hints_epoch: u64,
    /// Rosters and verdicts of the sidecar's coordinated clusters.
    #[serde(default)]
    pub checks: Checks,
    /// The check version this answer reflects.
    #[serde(default)]
    pub checks_seen: u64,
}

/// A sidecar's share of one limit.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LimitGrant {
    /// The limit's name.
    pub name: String,
    /// The share, in requests per second; `None` until an allocation includes the sidecar.
    pub share: Option<f64>,
    /// The capacity the shares add up to.
    pub rate: f64,
    /// Sidecars sharing it: R / this is the `local_share` fallback.
    pub sidecars: usize,
}

impl Quotas {
    /// `client`'s grants for the limits it named, as of state `index`.
    pub fn granted(&self, client: &str, names: &[LimitDemand], index: u64) -> Granted {
        Granted {
            index,
            hints: Vec::new(),
            hints_seen: 0,
            hints_epoch: 0,
            checks: Checks::default(),
            checks_seen: 0,
            limits: names
                .iter()
                .map(|d| {
                    let limit = self.limit(&d.name);
                    LimitGrant {
                        name: d.name.clone(),
                        share: limit
                            .and_then(|l| l.shares.get(client))
                            .map(|s| s.rate as f64 / MILLI),
                        rate: limit.map_or(d.rate, |l| l.rate as f64 / MILLI),
                        sidecars: limit.map_or(0, |l| l.shares.len()),
                    }
                })
                .collect(),
        }
    }

    /// Whether any of `client`'s shares of `names` changed after `holding`.
    pub fn changed_for(&self, client: &str, names: &[LimitDemand], holding: u64) -> bool {
        names.iter().any(|d| {
            self.limit(&d.name)
                .and_then(|l| l.shares.get(client))
                .is_some_and(|s| s.modified > holding)
        })
    }
}

/// Converts a rate in requests per second to thousandths (saturating, never negative).
pub fn milli(rate: f64) -> u64 {
    if rate.is_finite() && rate > 0.0 {
        (rate * MILLI).round() as u64
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn demand(rate: u64, offered: u64) -> HashMap<String, Demand> {
        HashMap::from([("api".to_owned(), Demand { rate, offered })])
    }

    fn shares(q: &Quotas) -> BTreeMap<String, u64> {
        q.limit("api")
            .map(|l| l.shares.iter().map(|(c, s)| (c.clone(), s.rate)).collect())
            .unwrap_or_default()
    }

    #[test]
    fn fair_shares_meet_small_demands_and_split_the_rest() {
        // 70/20/10 of 3R with R = 100: the 10% sidecar (30) is under its fair third.
        assert_eq!(fair_shares(100, &[210, 60, 30]), vec![35, 35, 30]);
        assert_eq!(fair_shares(100, &[10, 20, 30]), vec![24, 33, 43]);
        assert_eq!(fair_shares(100, &[]), Vec::<u64>::new());
        // More sidecars than units of capacity: fractional shares, never all zero.
        let s = fair_shares(2, &[5, 5, 5, 5, 5]);
        assert_eq!(s.iter().sum::<u64>(), 2);
        for (cap, d) in [(1000, vec![1, 999, 5000, 7]), (7, vec![3, 3, 3])] {
            let s = fair_shares(cap, &d);
            assert_eq!(s.iter().sum::<u64>(), cap, "{d:?}");
        }
    }

    /// Drives an allocator against a state the way the leader does, committing each allocation
    /// at the next index; returns that index.
    fn commit(a: &mut Allocator, q: &mut Quotas, index: &mut u64, now: Instant) -> bool {
        match a.tick(q, now) {
            Some(alloc) => {
                *index += 1;
                q.apply(*index, &alloc);
                a.committed(*index, now);
                true
            }
            None => false,
        }
    }

    /// The invariant: what every sidecar may still enforce, summed, is within R.
    fn in_force(a: &Allocator, q: &Quotas) -> u64 {
        q.limit("api").map_or(0, |l| {
            l.shares
                .iter()
                .map(|(c, s)| a.in_force("api", c, s.rate))
                .sum()
        })
    }

    #[tokio::test(start_paused = true)]
    async fn an_increase_waits_for_the_decrease_to_be_acknowledged() {
        let t0 = Instant::now();
        let mut a = Allocator::new(t0);
        let (mut q, mut index) = (Quotas::default(), 10);
        let later = t0 + GRANT;
        a.refresh("a", 0, demand(100_000, 90_000), later);
        a.refresh("b", 0, demand(100_000, 10_000), later);
        assert!(commit(&mut a, &mut q, &mut index, later));
        assert_eq!(
            shares(&q),
            BTreeMap::from([("a".into(), 90_000), ("b".into(), 10_000)])
        );

        // The skew flips: b now wants 90, a 10. a's decrease commits at once; b's increase
        // waits, since a may not have heard yet.
        let t1 = later + Duration::from_secs(1);
        a.refresh("a", index, demand(100_000, 10_000), t1);
        a.refresh("b", index, demand(100_000, 90_000), t1);
        assert!(commit(&mut a, &mut q, &mut index, t1));
        assert_eq!(shares(&q)["a"], 10_000);
        assert_eq!(
            shares(&q)["b"],
            10_000,
            "no room until a holds its decrease"
        );
        assert!(in_force(&a, &q) <= 100_000);
        assert!(!commit(&mut a, &mut q, &mut index, t1 + TICK));

        // a's next refresh holds the decrease: the room goes to b on the next tick.
        a.refresh("a", index, demand(100_000, 10_000), t1 + TICK);
        assert!(commit(&mut a, &mut q, &mut index, t1 + 2 * TICK));
        assert_eq!(shares(&q)["b"], 90_000);
        assert!(in_force(&a, &q) <= 100_000);
    }

    #[tokio::test(start_paused = true)]
    async fn a_decrease_never_acknowledged_frees_its_room_after_the_grant() {
        let t0 = Instant::now() + GRANT;
        let mut a = Allocator::new(Instant::now());
        let (mut q, mut index) = (Quotas::default(), 1);
        a.refresh("a", 0, demand(100_000, 90_000), t0);
        a.refresh("b", 0, demand(100_000, 10_000), t0);
        commit(&mut a, &mut q, &mut index, t0);
        a.refresh("a", index, demand(100_000, 10_000), t0);
        a.refresh("b", index, demand(100_000, 90_000), t0);
        commit(&mut a, &mut q, &mut index, t0);
        // a goes silent (cut off) holding the old share: b waits out a's grant, not longer.
        let mut now = t0;
        while now < t0 + GRANT - TICK {
            now += TICK;
            a.refresh("b", index, demand(100_000, 90_000), now);
            commit(&mut a, &mut q, &mut index, now);
            assert_eq!(shares(&q)["b"], 10_000, "at {:?}", now - t0);
        }
        now += TICK;
        a.refresh("b", index, demand(100_000, 90_000), now);
        commit(&mut a, &mut q, &mut index, now);
        assert_eq!(shares(&q)["b"], 90_000);
        assert!(in_force(&a, &q) <= 100_000);
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_leader_keeps_the_shares_and_grants_no_increase_for_a_grant() {
        let t0 = Instant::now();
        let mut q = Quotas::default();
        q.apply(
            5,
            &Allocation {
                limits: vec![LimitChange {
                    name: "api".into(),
                    rate: 100_000,
                    shares: vec![("a".into(), 50_000), ("b".into(), 50_000)],
                    dropped: vec![],
                }],
            },
        );
        let mut a = Allocator::new(t0);
        let mut index = 5;
        a.refresh("a", 5, demand(100_000, 90_000), t0);
        a.refresh("b", 5, demand(100_000, 10_000), t0);
        assert!(commit(&mut a, &mut q, &mut index, t0), "b's decrease");
        assert_eq!(shares(&q)["a"], 50_000, "no increase while frozen");
        assert_eq!(shares(&q)["b"], 10_000);
        a.refresh("b", index, demand(100_000, 10_000), t0 + TICK);
        commit(&mut a, &mut q, &mut index, t0 + TICK);
        assert_eq!(shares(&q)["a"], 50_000, "still frozen, acknowledged or not");
        let thawed = t0 + GRANT;
        a.refresh("a", index, demand(100_000, 90_000), thawed);
        a.refresh("b", index, demand(100_000, 10_000), thawed);
        commit(&mut a, &mut q, &mut index, thawed);
        assert_eq!(shares(&q)["a"], 90_000);
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_sidecar_is_dropped_after_the_client_ttl() {
        let t0 = Instant::now() + GRANT;
        let mut a = Allocator::new(Instant::now());
        let (mut q, mut index) = (Quotas::default(), 1);
        a.refresh("a", 0, demand(100_000, 50_000), t0);
        a.refresh("b", 0, demand(100_000, 50_000), t0);
        commit(&mut a, &mut q, &mut index, t0);
        let mut now = t0;
        while now < t0 + CLIENT_TTL - TICK {
            now += TICK;
            a.refresh("a", index, demand(100_000, 100_000), now);
            commit(&mut a, &mut q, &mut index, now);
            assert_eq!(
                shares(&q)["b"],
                50_000,
                "b keeps its share while it may be alive"
            );
        }
        // Dropped, and its share goes to a in the same allocation: b's grant ran out long ago.
        now += 2 * TICK;
        a.refresh("a", index, demand(100_000, 100_000), now);
        commit(&mut a, &mut q, &mut index, now);
        assert_eq!(shares(&q), BTreeMap::from([("a".into(), 100_000)]));
    }

    #[tokio::test(start_paused = true)]
    async fn random_demands_never_put_more_than_the_capacity_in_force() {
        let mut rng = fastrand::Rng::with_seed(7);
        let t0 = Instant::now();
        let mut a = Allocator::new(t0);
        let (mut q, mut index) = (Quotas::default(), 1);
        let clients = ["a", "b", "c", "d", "e"];
        let mut holding: HashMap<&str, u64> = HashMap::new();
        let mut now = t0;
        let mut used = 0;
        for step in 0..2000 {
            now += Duration::from_millis(rng.u64(10..300));
            for c in clients {
                // Refreshes are lost or late at random; answers are held at random.
                if rng.u8(..4) == 0 {
                    continue;
                }
                if rng.bool() {
                    holding.insert(c, index);
                }
                let h = holding.get(c).copied().unwrap_or(0);
                a.refresh(c, h, demand(100_000, rng.u64(0..150_000)), now);
            }
            if rng.u8(..10) == 0 {
                // An allocation of unknown outcome: it commits anyway.
                if let Some(alloc) = a.tick(&q, now) {
                    index += 1;
                    q.apply(index, &alloc);
                    a.abandoned(now, Duration::from_secs(5));
                }
            } else {
                commit(&mut a, &mut q, &mut index, now);
            }
            let force = in_force(&a, &q);
            assert!(force <= 100_000, "step {step}: {force} in force");
            used += q.limit("api").map_or(0, |l| l.allocated());
        }
        let used = used as f64 / 2000.0 / 100_000.0;
        println!("capacity allocated on average: {:.1}%", used * 100.0);
        // Under this much loss a tenth of the capacity waits on unknown outcomes at any time.
        assert!(used > 0.7, "and the room is used: {used}");
    }
}
