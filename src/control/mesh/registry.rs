//! The service registry: the first state the mesh group agrees on, as a pure state machine.
//!
//! Nothing here does I/O or reads a clock: applying the same commands in the same order gives the
//! same registry on every member, which is what Raft needs from it. Leases are not timed here
//! either: the leader tracks renewals in memory ([`super::leases`]) and writes only their expiry to
//! the log, naming the revision it expires so that a newer registration of the same instance is
//! never removed by an expiry decided about an older one.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// What an instance tells the registry about itself when it registers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registration {
    /// The service the instance belongs to (the name `discovery: { registry: { service } }` follows).
    pub service: String,
    /// The instance's id, unique within its service; registering the same id again replaces it.
    pub id: String,
    /// IP address or host name callers connect to.
    pub address: String,
    /// Port callers connect to.
    pub port: u16,
    /// Load-balancing weight (1 when the registrant does not say).
    #[serde(default = "one")]
    pub weight: u32,
    /// Free-form labels (zone, version, ...), returned with the instance.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// How long the lease lasts without a renewal, in milliseconds.
    pub ttl_ms: u64,
}

fn one() -> u32 {
    1
}

impl Registration {
    /// `address:port` as callers dial it, an IPv6 address in brackets.
    pub fn host_port(&self) -> String {
        host_port(&self.address, self.port)
    }
}

/// `address:port`, bracketing a bare IPv6 address.
pub fn host_port(address: &str, port: u16) -> String {
    if address.contains(':') && !address.starts_with('[') {
        format!("[{address}]:{port}")
    } else {
        format!("{address}:{port}")
    }
}

/// A registered instance as the registry holds it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    /// What the instance registered.
    #[serde(flatten)]
    pub registration: Registration,
    /// The log index of the registration that created this lease: the lease's identity.
    pub revision: u64,
}

/// The lease an expiry removes: an instance as of one registration.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Lease {
    /// Service of the instance.
    pub service: String,
    /// Instance id.
    pub id: String,
    /// Revision of the registration the lease belongs to.
    pub revision: u64,
}

/// One registry change carried by the mesh log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Change {
    /// Adds an instance, or replaces the one with the same service and id (with a new lease).
    Register(Registration),
    /// Removes an instance, whatever its lease.
    Deregister {
        /// Service of the instance.
        service: String,
        /// Instance id.
        id: String,
    },
    /// Removes the instances whose leases the leader saw lapse, batched into one entry.
    Expire {
        /// The lapsed leases; one whose instance has since registered again is skipped.
        leases: Vec<Lease>,
    },
}

/// What applying a [`Change`] did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Outcome {
    /// The instance is registered under this revision (its lease id).
    Registered {
        /// Log index of the registration.
        revision: u64,
    },
    /// The instance was removed, or was not there.
    Deregistered {
        /// Whether there was an instance to remove.
        existed: bool,
    },
    /// The leases that still matched were removed.
    Expired {
        /// The leases removed (a subset of those named, in the same order).
        removed: Vec<Lease>,
    },
}

/// One service's instances and the index of its last change.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    /// Instances by id.
    pub instances: BTreeMap<String, Instance>,
    /// Log index of the last change to this service: a watch waits for it to pass the index it
    /// has seen, as Consul's blocking index or etcd's revision.
    pub modified: u64,
}

/// The registry: services by name. Cheap to clone (each service is shared until it changes), so
/// every applied batch can publish an immutable copy for the data path to read without a lock.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registry {
    services: BTreeMap<String, Arc<Service>>,
}

impl Registry {
    /// Applies one change committed at log `index`. Never fails: a change that no longer
    /// applies (an unknown instance, an expiry overtaken by a new registration) is a no-op
    /// reported in the outcome, because an error here would stop the Raft node.
    pub fn apply(&mut self, index: u64, change: &Change) -> Outcome {
        match change {
            Change::Register(reg) => {
                let service = self.service_mut(&reg.service, index);
                service.instances.insert(
                    reg.id.clone(),
                    Instance {
                        registration: reg.clone(),
                        revision: index,
                    },
                );
                Outcome::Registered { revision: index }
            }
            Change::Deregister { service, id } => {
                let existed = self
                    .services
                    .get(service)
                    .is_some_and(|s| s.instances.contains_key(id));
                if existed {
                    let s = self.service_mut(service, index);
                    s.instances.remove(id);
                }
                Outcome::Deregistered { existed }
            }
            Change::Expire { leases } => {
                let mut removed = Vec::new();
                for lease in leases {
                    let current = self
                        .services
                        .get(&lease.service)
                        .and_then(|s| s.instances.get(&lease.id))
                        .map(|i| i.revision);
                    if current == Some(lease.revision) {
                        self.service_mut(&lease.service, index)
                            .instances
                            .remove(&lease.id);
                        removed.push(lease.clone());
                    }
                }
                Outcome::Expired { removed }
            }
        }
    }

    /// The service named `name`, if it was ever registered (an emptied service stays, with its
    /// last change index, so watchers see the removal of its last instance).
    pub fn service(&self, name: &str) -> Option<&Arc<Service>> {
        self.services.get(name)
    }

    /// Every service, by name.
    pub fn services(&self) -> impl Iterator<Item = (&str, &Arc<Service>)> {
        self.services.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// Every live lease: what a new leader starts tracking, each with a fresh TTL.
    pub fn leases(&self) -> impl Iterator<Item = (Lease, u64)> + '_ {
        self.services.iter().flat_map(|(name, s)| {
            s.instances.values().map(move |i| {
                (
                    Lease {
                        service: name.clone(),
                        id: i.registration.id.clone(),
                        revision: i.revision,
                    },
                    i.registration.ttl_ms,
                )
            })
        })
    }

    /// Number of registered instances across all services.
    pub fn instance_count(&self) -> usize {
        self.services.values().map(|s| s.instances.len()).sum()
    }

    fn service_mut(&mut self, name: &str, index: u64) -> &mut Service {
        let entry = self.services.entry(name.to_owned()).or_default();
        let s = Arc::make_mut(entry);
        s.modified = index;
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(service: &str, id: &str, port: u16) -> Registration {
        Registration {
            service: service.into(),
            id: id.into(),
            address: "10.0.0.1".into(),
            port,
            weight: 1,
            metadata: BTreeMap::new(),
            ttl_ms: 10_000,
        }
    }

    fn lease(service: &str, id: &str, revision: u64) -> Lease {
        Lease {
            service: service.into(),
            id: id.into(),
            revision,
        }
    }

    #[test]
    fn an_expiry_for_an_older_registration_leaves_the_newer_one() {
        let mut r = Registry::default();
        assert_eq!(
            r.apply(3, &Change::Register(reg("api", "a", 80))),
            Outcome::Registered { revision: 3 }
        );
        // The instance restarts and registers again before the leader's expiry commits.
        r.apply(7, &Change::Register(reg("api", "a", 81)));
        let out = r.apply(
            9,
            &Change::Expire {
                leases: vec![lease("api", "a", 3)],
            },
        );
        assert_eq!(out, Outcome::Expired { removed: vec![] });
        let api = r.service("api").unwrap();
        assert_eq!(api.instances["a"].registration.port, 81);
        assert_eq!(api.modified, 7, "a no-op expiry is not a change");

        let out = r.apply(
            12,
            &Change::Expire {
                leases: vec![lease("api", "a", 7), lease("api", "gone", 1)],
            },
        );
        assert_eq!(
            out,
            Outcome::Expired {
                removed: vec![lease("api", "a", 7)]
            }
        );
        let api = r.service("api").unwrap();
        assert!(api.instances.is_empty());
        assert_eq!(
            api.modified, 12,
            "the emptied service keeps its change index"
        );
    }

    #[test]
    fn deregister_reports_whether_there_was_an_instance_and_only_then_changes_the_index() {
        let mut r = Registry::default();
        r.apply(1, &Change::Register(reg("api", "a", 80)));
        let gone = Change::Deregister {
            service: "api".into(),
            id: "b".into(),
        };
        assert_eq!(r.apply(2, &gone), Outcome::Deregistered { existed: false });
        assert_eq!(r.service("api").unwrap().modified, 1);
        let a = Change::Deregister {
            service: "api".into(),
            id: "a".into(),
        };
        assert_eq!(r.apply(3, &a), Outcome::Deregistered { existed: true });
        assert_eq!(r.service("api").unwrap().modified, 3);
        assert_eq!(r.instance_count(), 0);
    }

    #[test]
    fn a_published_copy_does_not_see_later_changes() {
        let mut r = Registry::default();
        r.apply(1, &Change::Register(reg("api", "a", 80)));
        r.apply(2, &Change::Register(reg("web", "w", 80)));
        let published = r.clone();
        r.apply(3, &Change::Register(reg("api", "b", 80)));
        assert_eq!(published.service("api").unwrap().instances.len(), 1);
        assert_eq!(r.service("api").unwrap().instances.len(), 2);
        // The untouched service is still shared, not copied.
        assert!(Arc::ptr_eq(
            published.service("web").unwrap(),
            r.service("web").unwrap()
        ));
    }

    #[test]
    fn leases_list_every_instance_with_its_revision_and_ttl() {
        let mut r = Registry::default();
        r.apply(4, &Change::Register(reg("api", "a", 80)));
        r.apply(5, &Change::Register(reg("web", "w", 80)));
        let all: Vec<_> = r.leases().collect();
        assert_eq!(
            all,
            vec![
                (lease("api", "a", 4), 10_000),
                (lease("web", "w", 5), 10_000)
            ]
        );
    }

    #[test]
    fn the_registry_round_trips_through_its_snapshot_form() {
        let mut r = Registry::default();
        r.apply(4, &Change::Register(reg("api", "a", 80)));
        let text = serde_json::to_vec(&r).unwrap();
        let back: Registry = serde_json::from_slice(&text).unwrap();
        assert_eq!(back, r);
    }
}
