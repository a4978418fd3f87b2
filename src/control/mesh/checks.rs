//! Coordinated active health checking: one probe per endpoint for the whole fleet, not one per
//! sidecar (the N × M problem of envoy#10498).
//!
//! Every sidecar with a `coordinated` cluster names it in its share refresh. The leader keeps,
//! per cluster, the sidecars that check it (those heard from within [`CHECKER_TTL`]) and the
//! latest verdict on each endpoint, and hands both out on the same long poll. Each sidecar picks
//! the owner of an endpoint by rendezvous hashing over that roster — a member that leaves moves
//! only its own endpoints — probes only the endpoints it owns, publishes its verdicts, and takes
//! the others' into its cluster as if its own checker had decided them. The leader keeps all of
//! this in memory: after a leader change, owners publish their verdicts again.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use http::uri::Authority;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch, Notify};
use tokio::time::Instant;

use crate::control::health::{Health, Verdict};

/// A sidecar not heard from for this long no longer checks: its endpoints go to the others.
pub const CHECKER_TTL: Duration = Duration::from_millis(2_500);

/// One endpoint's health as its owner decided it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckVerdict {
    /// The cluster's name.
    pub cluster: String,
    /// The endpoint, `host:port`.
    pub endpoint: String,
    /// Whether it passes its checks.
    pub healthy: bool,
}

#[derive(Debug, Default)]
struct Inner {
    /// By cluster: the sidecars checking it, with when each was last heard from.
    checkers: HashMap<String, HashMap<String, Instant>>,
    /// By (cluster, endpoint): the latest verdict and the version that set it.
    verdicts: HashMap<(String, String), (bool, u64)>,
}

/// The leader's rosters and verdicts, with a version watchers wait on.
#[derive(Debug)]
pub struct CheckBoard {
    inner: Mutex<Inner>,
    version: watch::Sender<u64>,
}

impl Default for CheckBoard {
    fn default() -> Self {
        CheckBoard {
            inner: Mutex::new(Inner::default()),
            version: watch::channel(0).0,
        }
    }
}

/// What a sidecar is told about its coordinated clusters.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checks {
    /// By cluster: the sidecars that check it now (itself included), sorted.
    pub checkers: BTreeMap<String, Vec<String>>,
    /// Verdicts on the clusters' endpoints set after the version it had seen.
    pub verdicts: Vec<CheckVerdict>,
}

impl CheckBoard {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Nothing panics while holding this lock; a poisoned board is still whole.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Empties the board for a new leadership.
    pub fn reset(&self) {
        *self.lock() = Inner::default();
    }

    fn bump(&self) {
        self.version.send_modify(|v| *v += 1);
    }

    /// Records that `client` checks `clusters` and decided `verdicts`, at `now`.
    pub fn refresh(
        &self,
        client: &str,
        clusters: &[String],
        verdicts: &[CheckVerdict],
        now: Instant,
    ) {
        if clusters.is_empty() && verdicts.is_empty() {
            return;
        }
        let mut inner = self.lock();
        let mut changed = false;
        for c in clusters {
            let roster = inner.checkers.entry(c.clone()).or_default();
            changed |= roster.insert(client.to_owned(), now).is_none();
        }
        let next = *self.version.borrow() + 1;
        for v in verdicts {
            let key = (v.cluster.clone(), v.endpoint.clone());
            if inner.verdicts.get(&key).map(|(h, _)| *h) != Some(v.healthy) {
                inner.verdicts.insert(key, (v.healthy, next));
                changed = true;
            }
        }
        drop(inner);
        if changed {
            self.bump();
        }
    }

    /// Drops the checkers not heard from within [`CHECKER_TTL`] of `now`; wakes the watchers
    /// if a roster changed.
    pub fn sweep(&self, now: Instant) {
        let mut inner = self.lock();
        let mut changed = false;
        for roster in inner.checkers.values_mut() {
            let before = roster.len();
            roster.retain(|_, at| now.saturating_duration_since(*at) < CHECKER_TTL);
            changed |= roster.len() != before;
        }
        inner.checkers.retain(|_, r| !r.is_empty());
        drop(inner);
        if changed {
            self.bump();
        }
    }

    /// The rosters of `clusters` and the verdicts on them newer than `seen`, with the version.
    pub fn answer(&self, clusters: &[String], seen: u64) -> (Checks, u64) {
        let inner = self.lock();
        let version = *self.version.borrow();
        let mut out = Checks::default();
        for c in clusters {
            let mut roster: Vec<String> = inner
                .checkers
                .get(c)
                .map(|r| r.keys().cloned().collect())
                .unwrap_or_default();
            roster.sort_unstable();
            out.checkers.insert(c.clone(), roster);
        }
        out.verdicts = inner
            .verdicts
            .iter()
            .filter(|((c, _), (_, v))| *v > seen && clusters.contains(c))
            .map(|((c, e), (h, _))| CheckVerdict {
                cluster: c.clone(),
                endpoint: e.clone(),
                healthy: *h,
            })
            .collect();
        (out, version)
    }

    /// Waits for a version newer than `seen`.
    pub async fn newer_than(&self, seen: u64) {
        let mut rx = self.version.subscribe();
        let _ = rx.wait_for(|v| *v > seen).await;
    }
}

/// The owner of `endpoint` among `roster`: the highest rendezvous hash of (sidecar, endpoint).
pub fn owner<'a>(roster: &'a [String], endpoint: &str) -> Option<&'a str> {
    roster
        .iter()
        .max_by_key(|c| {
            let mut key = Vec::with_capacity(c.len() + endpoint.len() + 1);
            key.extend_from_slice(c.as_bytes());
            key.push(0);
            key.extend_from_slice(endpoint.as_bytes());
            xxhash_rust::xxh3::xxh3_64(&key)
        })
        .map(String::as_str)
}

/// One cluster's registration with the coordination: its roster and where remote verdicts go.
#[derive(Debug)]
struct Joined {
    roster: watch::Sender<Arc<Vec<String>>>,
    /// The verdict channels of the running clusters of this name (two during a reload).
    sinks: Vec<(u64, mpsc::Sender<Verdict>)>,
}

/// A sidecar's side of coordinated checking, shared by its health checkers and the refresh task.
#[derive(Debug)]
pub struct Coordination {
    me: String,
    joined: Mutex<BTreeMap<String, Joined>>,
    outbox: Mutex<Vec<CheckVerdict>>,
    /// This sidecar's latest verdict per owned endpoint, sent again to a new leader.
    owned: Mutex<HashMap<(String, String), bool>>,
    wake: Notify,
    next: AtomicU64,
}

impl Coordination {
    /// The coordination of sidecar `me` (its id in the refreshes).
    pub fn new(me: String) -> Arc<Self> {
        Arc::new(Coordination {
            me,
            joined: Mutex::new(BTreeMap::new()),
            outbox: Mutex::new(Vec::new()),
            owned: Mutex::new(HashMap::new()),
            wake: Notify::new(),
            next: AtomicU64::new(1),
        })
    }

    fn joined(&self) -> MutexGuard<'_, BTreeMap<String, Joined>> {
        // Nothing panics while holding these locks; a poisoned map is still whole.
        self.joined.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn outbox(&self) -> MutexGuard<'_, Vec<CheckVerdict>> {
        self.outbox.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn owned(&self) -> MutexGuard<'_, HashMap<(String, String), bool>> {
        self.owned.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Joins the checking of `cluster`, whose verdicts the running cluster takes on `sink`.
    /// The returned handle leaves when dropped.
    pub fn join(self: &Arc<Self>, cluster: &str, sink: mpsc::Sender<Verdict>) -> Owner {
        let token = self.next.fetch_add(1, Ordering::Relaxed);
        let mut joined = self.joined();
        let j = joined.entry(cluster.to_owned()).or_insert_with(|| Joined {
            roster: watch::channel(Arc::new(Vec::new())).0,
            sinks: Vec::new(),
        });
        j.sinks.push((token, sink));
        let roster = j.roster.subscribe();
        drop(joined);
        self.wake.notify_one();
        Owner {
            coordination: self.clone(),
            cluster: cluster.to_owned(),
            token,
            roster,
        }
    }

    /// The clusters this sidecar checks.
    pub fn clusters(&self) -> Vec<String> {
        self.joined().keys().cloned().collect()
    }

    /// Takes the verdicts waiting to be sent; with `all`, every owned verdict (a new leader).
    pub fn take(&self, all: bool) -> Vec<CheckVerdict> {
        let mut out = std::mem::take(&mut *self.outbox());
        if all {
            out = self
                .owned()
                .iter()
                .map(|((c, e), h)| CheckVerdict {
                    cluster: c.clone(),
                    endpoint: e.clone(),
                    healthy: *h,
                })
                .collect();
        }
        out
    }

    /// Puts back verdicts whose sending failed.
    pub fn unsent(&self, mut verdicts: Vec<CheckVerdict>) {
        let mut out = self.outbox();
        verdicts.append(&mut out);
        *out = verdicts;
    }

    /// Waits until a verdict is published or a cluster joins.
    pub async fn changed(&self) {
        self.wake.notified().await
    }

    /// Applies the leader's answer: new rosters, and the others' verdicts into the clusters
    /// (not those of endpoints this sidecar owns: its own checks decide them).
    pub fn apply(&self, checks: Checks) {
        let joined = self.joined();
        for (cluster, roster) in checks.checkers {
            if let Some(j) = joined.get(&cluster) {
                if **j.roster.borrow() != roster {
                    j.roster.send_replace(Arc::new(roster));
                }
            }
        }
        for v in checks.verdicts {
            let Some(j) = joined.get(&v.cluster) else {
                continue;
            };
            if owner(&j.roster.borrow(), &v.endpoint) == Some(self.me.as_str()) {
                continue;
            }
            let Ok(authority) = v.endpoint.parse::<Authority>() else {
                continue;
            };
            let health = if v.healthy {
                Health::Healthy
            } else {
                Health::Unhealthy
            };
            for (_, sink) in &j.sinks {
                // A prober's recovery shows here as unhealthy → healthy, which lifts ejections.
                let _ = sink.try_send(Verdict {
                    authority: authority.clone(),
                    health,
                    recovered: false,
                });
            }
        }
    }
}

/// A health checker's membership in the coordinated checking of one cluster.
#[derive(Debug)]
pub struct Owner {
    coordination: Arc<Coordination>,
    cluster: String,
    token: u64,
    roster: watch::Receiver<Arc<Vec<String>>>,
}

impl Owner {
    /// Whether this sidecar probes `endpoint` now: it owns it, or no roster is known yet (the
    /// group has not answered: every sidecar checks, as without coordination).
    pub fn mine(&self, endpoint: &Authority) -> bool {
        let roster = self.roster.borrow();
        roster.is_empty()
            || owner(&roster, endpoint.as_str()) == Some(self.coordination.me.as_str())
    }

    /// A receiver of the roster, for a checker task to wait on its changes (an endpoint may
    /// have become this sidecar's).
    pub fn roster(&self) -> watch::Receiver<Arc<Vec<String>>> {
        let mut roster = self.roster.clone();
        roster.mark_unchanged();
        roster
    }

    /// Publishes this sidecar's verdict on an endpoint it owns.
    pub fn publish(&self, endpoint: &Authority, health: Health) {
        let healthy = match health {
            Health::Healthy => true,
            Health::Unhealthy => false,
            Health::Unchecked => return,
        };
        let v = CheckVerdict {
            cluster: self.cluster.clone(),
            endpoint: endpoint.to_string(),
            healthy,
        };
        self.coordination
            .owned()
            .insert((v.cluster.clone(), v.endpoint.clone()), healthy);
        self.coordination.outbox().push(v);
        self.coordination.wake.notify_one();
    }

    /// Stops owning `endpoint` (it left the set, or another sidecar owns it now).
    pub fn release(&self, endpoint: &Authority) {
        self.coordination
            .owned()
            .remove(&(self.cluster.clone(), endpoint.to_string()));
    }
}

impl Drop for Owner {
    fn drop(&mut self) {
        let mut joined = self.coordination.joined();
        if let Some(j) = joined.get_mut(&self.cluster) {
            j.sinks.retain(|(t, _)| *t != self.token);
            if j.sinks.is_empty() {
                joined.remove(&self.cluster);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roster(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("s{i}")).collect()
    }

    #[test]
    fn every_endpoint_has_one_owner_and_a_leaving_member_moves_only_its_own() {
        let five = roster(5);
        let endpoints: Vec<String> = (0..20).map(|i| format!("10.0.0.{i}:80")).collect();
        let before: Vec<&str> = endpoints.iter().map(|e| owner(&five, e).unwrap()).collect();
        let mut per: BTreeMap<&str, usize> = BTreeMap::new();
        for o in &before {
            *per.entry(o).or_default() += 1;
        }
        assert!(
            per.len() >= 4,
            "the endpoints spread over the members: {per:?}"
        );
        let four: Vec<String> = five.iter().filter(|s| *s != "s2").cloned().collect();
        for (e, was) in endpoints.iter().zip(&before) {
            let now = owner(&four, e).unwrap();
            if *was != "s2" {
                assert_eq!(now, *was, "{e} stayed with its owner");
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn rosters_follow_refreshes_and_verdicts_reach_the_others_once() {
        let b = CheckBoard::default();
        let t0 = Instant::now();
        let app = vec!["app".to_owned()];
        b.refresh("a", &app, &[], t0);
        b.refresh("b", &app, &[], t0);
        let (checks, v1) = b.answer(&app, 0);
        assert_eq!(checks.checkers["app"], vec!["a", "b"]);
        let down = CheckVerdict {
            cluster: "app".into(),
            endpoint: "10.0.0.1:80".into(),
            healthy: false,
        };
        b.refresh("a", &app, std::slice::from_ref(&down), t0);
        let (checks, v2) = b.answer(&app, v1);
        assert_eq!(checks.verdicts, vec![down.clone()]);
        assert!(b.answer(&app, v2).0.verdicts.is_empty(), "nothing newer");
        // The same verdict again changes nothing.
        b.refresh("a", &app, &[down], t0);
        assert_eq!(b.answer(&app, v2).1, v2);
        // b stops refreshing: after the TTL only a checks.
        b.refresh("a", &app, &[], t0 + CHECKER_TTL);
        b.sweep(t0 + CHECKER_TTL);
        let (checks, v3) = b.answer(&app, v2);
        assert_eq!(checks.checkers["app"], vec!["a"]);
        assert!(v3 > v2, "a roster change wakes the watchers");
    }
}
