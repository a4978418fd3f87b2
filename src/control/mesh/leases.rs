//! The leader's lease clock: renewals are kept in the leader's memory, never in the log.
//!
//! Only registration, deregistration and expiry are log entries. Renewals (the bulk of the
//! traffic: every instance, every few seconds) touch nothing but this table, so they cost no disk
//! and no replication (etcd#9911). Three rules keep expiry safe:
//!
//! - A new leader grants every live lease a fresh TTL ([`Leases::reset`]), so a failover never
//!   expires a lease early, whatever the old leader knew (etcd#9395; Consul does the same).
//! - A leader whose clock stalled (a long pause, a stuck disk, CPU starvation: etcd#15247) may have
//!   missed renewals sent meanwhile, so a gap between two ticks longer than
//!   [`Leases::STALL`] pushes every deadline out by the gap before anything is expired.
//! - An expiry names the revision of the registration it expires, so one decided about an old
//!   registration never removes a newer one, and a deposed leader's expiry cannot commit without
//!   a quorum that has not moved on to a newer term (Raft's own guarantee).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::registry::{Lease, Registry};

/// What a renewal found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Renewal {
    /// The lease is live and its deadline moved to now + TTL.
    Renewed,
    /// No such lease (it expired, was deregistered, or this member is not the leader yet): the
    /// instance must register again.
    Unknown,
}

#[derive(Clone, Debug)]
struct Tracked {
    revision: u64,
    ttl: Duration,
    deadline: Instant,
    proposed: bool,
}

/// The leases a leader tracks, by service and instance id.
#[derive(Debug, Default)]
pub struct Leases {
    /// By service, then instance id: both lookups borrow a `&str`, so a renewal builds no key.
    tracked: HashMap<String, HashMap<String, Tracked>>,
    /// The registry as of the last sync, to tell which services changed since.
    synced: Registry,
    last_tick: Option<Instant>,
}

impl Tracked {
    fn fresh(revision: u64, ttl: Duration, now: Instant) -> Self {
        Tracked {
            revision,
            ttl,
            deadline: now + ttl,
            proposed: false,
        }
    }
}

impl Leases {
    /// A gap between ticks longer than this means the leader stalled: deadlines move out by the
    /// gap rather than expire leases whose renewals the leader could not hear.
    pub const STALL: Duration = Duration::from_secs(1);

    /// Starts tracking every live lease of `registry` with a fresh TTL from `now` (on becoming
    /// leader).
    pub fn reset(&mut self, registry: &Registry, now: Instant) {
        self.tracked.clear();
        self.synced = Registry::default();
        self.last_tick = Some(now);
        self.sync(registry, now);
    }

    /// Brings the table in line with `registry` after changes were applied: new registrations
    /// start with a full TTL from `now`, removed instances are dropped, the rest keep their
    /// deadlines. Only services that changed since the last sync are looked at (an unchanged
    /// service is the same shared value), so a batch costs what it changed, not the registry.
    pub fn sync(&mut self, registry: &Registry, now: Instant) {
        for (name, service) in registry.services() {
            if self
                .synced
                .service(name)
                .is_some_and(|s| Arc::ptr_eq(s, service))
            {
                continue;
            }
            let old = self.tracked.remove(name).unwrap_or_default();
            let live = service
                .instances
                .iter()
                .map(|(id, i)| {
                    let kept = old.get(id).filter(|t| t.revision == i.revision).cloned();
                    let ttl = Duration::from_millis(i.registration.ttl_ms);
                    (
                        id.clone(),
                        kept.unwrap_or_else(|| Tracked::fresh(i.revision, ttl, now)),
                    )
                })
                .collect();
            self.tracked.insert(name.to_owned(), live);
        }
        self.synced = registry.clone();
    }

    /// Renews the lease of `service`/`id` as of `revision` (the one its registration returned).
    pub fn renew(&mut self, service: &str, id: &str, revision: u64, now: Instant) -> Renewal {
        match self.tracked.get_mut(service).and_then(|s| s.get_mut(id)) {
            Some(t) if t.revision == revision => {
                t.deadline = now + t.ttl;
                t.proposed = false;
                Renewal::Renewed
            }
            _ => Renewal::Unknown,
        }
    }

    /// The leases whose deadline has passed at `now` and that are not already being expired,
    /// marked as proposed. A tick after a stall moves every deadline out by the gap first.
    pub fn lapsed(&mut self, now: Instant) -> Vec<Lease> {
        if let Some(last) = self.last_tick {
            let gap = now.saturating_duration_since(last);
            if gap > Self::STALL {
                for t in self.tracked.values_mut().flat_map(|s| s.values_mut()) {
                    t.deadline += gap;
                }
            }
        }
        self.last_tick = Some(now);
        let mut out = Vec::new();
        for (service, instances) in &mut self.tracked {
            for (id, t) in instances {
                if !t.proposed && t.deadline <= now {
                    t.proposed = true;
                    out.push(Lease {
                        service: service.clone(),
                        id: id.clone(),
                        revision: t.revision,
                    });
                }
            }
        }
        out.sort();
        out
    }

    /// Starts tracking `lease` with a full TTL from `now` (a registration applied before the
    /// table caught up with it).
    pub fn track(&mut self, lease: &Lease, ttl: Duration, now: Instant) {
        self.tracked
            .entry(lease.service.clone())
            .or_default()
            .insert(lease.id.clone(), Tracked::fresh(lease.revision, ttl, now));
    }

    /// Lets `leases` be proposed again (their expiry did not commit).
    pub fn retry(&mut self, leases: &[Lease]) {
        for l in leases {
            if let Some(t) = self
                .tracked
                .get_mut(&l.service)
                .and_then(|s| s.get_mut(&l.id))
            {
                if t.revision == l.revision {
                    t.proposed = false;
                }
            }
        }
    }

    /// Number of leases tracked.
    pub fn len(&self) -> usize {
        self.tracked.values().map(HashMap::len).sum()
    }

    /// Whether no lease is tracked.
    pub fn is_empty(&self) -> bool {
        self.tracked.values().all(HashMap::is_empty)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::control::mesh::registry::{Change, Registration};

    fn registry(ids: &[(&str, u64, u64)]) -> Registry {
        let mut r = Registry::default();
        for (id, index, ttl_ms) in ids {
            r.apply(
                *index,
                &Change::Register(Registration {
                    service: "api".into(),
                    id: (*id).into(),
                    address: "10.0.0.1".into(),
                    port: 80,
                    weight: 1,
                    metadata: BTreeMap::new(),
                    ttl_ms: *ttl_ms,
                }),
            );
        }
        r
    }

    fn ids(leases: &[Lease]) -> Vec<&str> {
        leases.iter().map(|l| l.id.as_str()).collect()
    }

    const S: Duration = Duration::from_millis(1000);
    const TICK: Duration = Duration::from_millis(100);

    /// Advances in ticks from `from` for `span`, collecting what lapses.
    fn run(leases: &mut Leases, from: Instant, span: Duration) -> Vec<Lease> {
        let mut out = Vec::new();
        let mut now = from;
        while now < from + span {
            now += TICK;
            out.extend(leases.lapsed(now));
        }
        out
    }

    #[tokio::test(start_paused = true)]
    async fn a_lease_lapses_at_its_ttl_unless_renewed() {
        let t0 = Instant::now();
        let mut l = Leases::default();
        l.reset(&registry(&[("a", 1, 3000), ("b", 2, 3000)]), t0);
        let early = run(&mut l, t0, 2 * S);
        assert!(early.is_empty());
        assert_eq!(l.renew("api", "a", 1, t0 + 2 * S), Renewal::Renewed);
        let lapsed = run(&mut l, t0 + 2 * S, 2 * S);
        assert_eq!(ids(&lapsed), ["b"], "a was renewed at 2 s, b lapses at 3 s");
        assert_eq!(lapsed[0].revision, 2);
        // Proposed once: the next ticks do not propose it again while the expiry commits.
        assert!(l.lapsed(t0 + 4 * S + TICK).is_empty());
        let lapsed = run(&mut l, t0 + 4 * S, 2 * S);
        assert_eq!(ids(&lapsed), ["a"], "a lapses 3 s after its renewal");
    }

    #[tokio::test(start_paused = true)]
    async fn a_renewal_of_an_older_registration_is_unknown() {
        let t0 = Instant::now();
        let mut l = Leases::default();
        l.reset(&registry(&[("a", 5, 3000)]), t0);
        assert_eq!(l.renew("api", "a", 4, t0), Renewal::Unknown);
        assert_eq!(l.renew("api", "zz", 5, t0), Renewal::Unknown);
        assert_eq!(l.renew("web", "a", 5, t0), Renewal::Unknown);
        assert_eq!(l.renew("api", "a", 5, t0), Renewal::Renewed);
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_leader_grants_every_lease_a_fresh_ttl() {
        let t0 = Instant::now();
        // The old leader last heard from these long ago; the new leader does not know that.
        let r = registry(&[("a", 1, 3000), ("b", 2, 3000)]);
        let mut l = Leases::default();
        let elected = t0 + 10 * S;
        l.reset(&r, elected);
        assert!(run(&mut l, elected, 2900 * Duration::from_millis(1)).is_empty());
        assert_eq!(
            ids(&run(&mut l, elected + 2900 * Duration::from_millis(1), S)),
            ["a", "b"]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_leader_moves_deadlines_out_instead_of_expiring_everything() {
        let t0 = Instant::now();
        let mut l = Leases::default();
        l.reset(&registry(&[("a", 1, 3000)]), t0);
        assert!(l.lapsed(t0 + S).is_empty());
        // No tick for 10 s: renewals sent meanwhile could not be heard.
        assert!(l.lapsed(t0 + 11 * S).is_empty());
        // The lease kept the 2 s it had left when the stall began.
        assert!(run(&mut l, t0 + 11 * S, S + 800 * Duration::from_millis(1)).is_empty());
        assert_eq!(
            ids(&run(&mut l, t0 + 12800 * Duration::from_millis(1), S)),
            ["a"]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn sync_tracks_new_registrations_and_drops_removed_ones() {
        let t0 = Instant::now();
        let mut r = registry(&[("a", 1, 3000), ("b", 2, 3000)]);
        let mut l = Leases::default();
        l.reset(&r, t0);
        r.apply(
            3,
            &Change::Deregister {
                service: "api".into(),
                id: "b".into(),
            },
        );
        assert!(run(&mut l, t0, 2 * S).is_empty());
        // "a" registers again (a restart) at 2 s: a new lease with a full TTL.
        let mut again = registry(&[("a", 4, 3000)]);
        std::mem::swap(&mut r, &mut again);
        l.sync(&r, t0 + 2 * S);
        assert_eq!(l.len(), 1);
        assert_eq!(l.renew("api", "a", 1, t0 + 2 * S), Renewal::Unknown);
        assert!(run(&mut l, t0 + 2 * S, 2900 * Duration::from_millis(1)).is_empty());
        assert_eq!(
            ids(&run(&mut l, t0 + 4900 * Duration::from_millis(1), S)),
            ["a"]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_expiry_that_did_not_commit_is_proposed_again() {
        let t0 = Instant::now();
        let mut l = Leases::default();
        l.reset(&registry(&[("a", 1, 1000)]), t0);
        let first = l.lapsed(t0 + S);
        assert_eq!(ids(&first), ["a"]);
        assert!(l.lapsed(t0 + S + TICK).is_empty());
        l.retry(&first);
        assert_eq!(ids(&l.lapsed(t0 + S + 2 * TICK)), ["a"]);
    }
}
