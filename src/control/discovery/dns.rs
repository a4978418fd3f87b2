//! DNS discovery with hickory-resolver: A/AAAA names on a configured port, or SRV names whose
//! records give each target's port, weight and priority (Envoy cannot follow SRV, envoy#125).
//!
//! The next lookup is due when the answer's TTL expires, clamped to `[min_refresh, max_refresh]`
//! and jittered by ±10% so that a fleet does not refresh in lockstep. After a failure or an empty
//! answer the cluster keeps its last endpoints and the lookup is retried after `min_refresh`.
//! Only the SRV records of the lowest priority value are used; the others are backups for when
//! those are gone.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hickory_resolver::config::{NameServerConfig, ResolveHosts, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::RData;
use hickory_resolver::TokioResolver;
use http::uri::Authority;
use tokio::time::Instant;

use super::{Discovery, Update};
use crate::control::config::upstream::{DnsConfig, DnsQuery};
use crate::rng::Rng;
use crate::telemetry::metrics::{DnsMetrics, Lookup};

/// Time allowed for one DNS query.
const QUERY_TIMEOUT: Duration = Duration::from_secs(1);

/// Follows one DNS name.
pub struct DnsDiscovery {
    cfg: DnsConfig,
    resolver: Result<TokioResolver, String>,
    due: Instant,
    rng: Rng,
    metrics: DnsMetrics,
}

impl DnsDiscovery {
    /// A source for `cfg`, jittering its refreshes with `rng` and counting its lookups in
    /// `metrics`; the first lookup is due at once.
    pub fn new(cfg: DnsConfig, rng: Rng, metrics: DnsMetrics) -> Self {
        let resolver = build_resolver(cfg.resolver);
        Self {
            cfg,
            resolver,
            due: Instant::now(),
            rng,
            metrics,
        }
    }

    async fn lookup(&self, resolver: &TokioResolver) -> (Update, Option<Duration>) {
        match &self.cfg.query {
            DnsQuery::Address { name, port } => match resolver.lookup_ip(name.as_str()).await {
                Ok(ips) => {
                    let ttl = ips
                        .as_lookup()
                        .answers()
                        .iter()
                        .map(|r| r.ttl)
                        .min()
                        .map(|t| Duration::from_secs(u64::from(t)));
                    let list = ips
                        .iter()
                        .filter_map(|ip| authority(ip, *port))
                        .map(|a| (a, 1))
                        .collect();
                    (endpoints(list), ttl)
                }
                Err(e) => (Update::Failed(e.to_string()), None),
            },
            DnsQuery::Srv { name } => match resolver.srv_lookup(name.as_str()).await {
                Ok(srv) => {
                    let mut ttl = srv.answers().iter().map(|r| r.ttl).min();
                    let records: Vec<_> = srv
                        .answers()
                        .iter()
                        .filter_map(|r| match &r.data {
                            RData::SRV(s) => Some((s.priority, s.weight, s.port, s.target.clone())),
                            _ => None,
                        })
                        .collect();
                    let Some(best) = records.iter().map(|r| r.0).min() else {
                        return (
                            Update::Empty,
                            ttl.map(|t| Duration::from_secs(u64::from(t))),
                        );
                    };
                    let mut list = Vec::new();
                    for (_, weight, port, target) in records.iter().filter(|r| r.0 == best) {
                        match resolver.lookup_ip(target.clone()).await {
                            Ok(ips) => {
                                if let Some(t) =
                                    ips.as_lookup().answers().iter().map(|r| r.ttl).min()
                                {
                                    ttl = Some(ttl.map_or(t, |x| x.min(t)));
                                }
                                for ip in ips.iter() {
                                    if let Some(a) = authority(ip, *port) {
                                        // SRV weight 0 means "rarely"; it still gets a share.
                                        list.push((a, u32::from(*weight).max(1)));
                                    }
                                }
                            }
                            Err(e) => {
                                tracing::debug!(target = %target, error = %e, "SRV target did not resolve")
                            }
                        }
                    }
                    (
                        endpoints(list),
                        ttl.map(|t| Duration::from_secs(u64::from(t))),
                    )
                }
                Err(e) => (Update::Failed(e.to_string()), None),
            },
        }
    }

    fn next_due(&self, ttl: Option<Duration>, ok: bool) -> Instant {
        let base = match (ok, ttl) {
            (true, Some(t)) => t.clamp(self.cfg.min_refresh, self.cfg.max_refresh),
            (true, None) => self.cfg.max_refresh,
            (false, _) => self.cfg.min_refresh,
        };
        Instant::now() + base.mul_f64(0.9 + 0.2 * self.rng.f64())
    }
}

impl Discovery for DnsDiscovery {
    fn kind(&self) -> &'static str {
        "dns"
    }

    async fn next(&mut self) -> Option<Update> {
        tokio::time::sleep_until(self.due).await;
        let resolver = match &self.resolver {
            Ok(r) => r,
            Err(e) => {
                self.due = self.next_due(None, false);
                self.metrics.count(Lookup::Failed);
                return Some(Update::Failed(e.clone()));
            }
        };
        let (update, ttl) = self.lookup(resolver).await;
        self.metrics.count(match &update {
            Update::Endpoints(_) => Lookup::Ok,
            Update::Empty => Lookup::Empty,
            Update::Failed(_) => Lookup::Failed,
        });
        self.due = self.next_due(ttl, matches!(update, Update::Endpoints(_)));
        Some(update)
    }
}

fn endpoints(mut list: Vec<(Authority, u32)>) -> Update {
    if list.is_empty() {
        return Update::Empty;
    }
    list.sort_by(|a, b| a.0.as_str().cmp(b.0.as_str()));
    list.dedup_by(|a, b| a.0 == b.0);
    Update::Endpoints(list)
}

fn authority(ip: IpAddr, port: u16) -> Option<Authority> {
    SocketAddr::new(ip, port).to_string().parse().ok()
}

/// A resolver for `server`, or the system's (resolv.conf) when `None`. Caching is off: lookups
/// are scheduled by TTL here, and a cached answer would hide a change until its own expiry.
fn build_resolver(server: Option<SocketAddr>) -> Result<TokioResolver, String> {
    let mut builder = match server {
        Some(addr) => {
            let mut ns = NameServerConfig::udp_and_tcp(addr.ip());
            for c in ns.connections.iter_mut() {
                c.port = addr.port();
            }
            TokioResolver::builder_with_config(
                ResolverConfig::from_name_servers(vec![ns]),
                TokioRuntimeProvider::default(),
            )
        }
        None => TokioResolver::builder_tokio()
            .map_err(|e| format!("reading the system DNS configuration: {e}"))?,
    };
    let o = builder.options_mut();
    o.timeout = QUERY_TIMEOUT;
    o.attempts = 1;
    o.cache_size = 0;
    if server.is_some() {
        o.use_hosts_file = ResolveHosts::Never;
    }
    builder.build().map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::metrics::Metrics;

    fn source(min_refresh: Duration, max_refresh: Duration) -> DnsDiscovery {
        let metrics = Metrics::new().unwrap();
        let cfg = DnsConfig {
            query: DnsQuery::Address {
                name: "api.example.internal".into(),
                port: 80,
            },
            resolver: Some("127.0.0.1:53".parse().unwrap()),
            min_refresh,
            max_refresh,
        };
        DnsDiscovery::new(cfg, Rng::with_seed(3), metrics.control.dns("c"))
    }

    /// The shortest and the longest of many draws of the wait before the next lookup.
    fn waits(d: &DnsDiscovery, ttl: Option<Duration>, ok: bool) -> (Duration, Duration) {
        let now = Instant::now();
        let all: Vec<Duration> = (0..2000).map(|_| d.next_due(ttl, ok) - now).collect();
        (*all.iter().min().unwrap(), *all.iter().max().unwrap())
    }

    #[tokio::test(start_paused = true)]
    async fn the_next_lookup_follows_the_ttl_clamped_and_jittered_by_ten_percent() {
        let secs = Duration::from_secs;
        let d = source(secs(5), secs(60));
        assert_eq!(d.due, Instant::now(), "the first lookup is due at once");
        // Each wait is the base ±10%, and the jitter spreads over (nearly) all of it.
        let jittered = |(lo, hi): (Duration, Duration), base: Duration| {
            lo >= base.mul_f64(0.9)
                && hi <= base.mul_f64(1.1)
                && lo < base.mul_f64(0.91)
                && hi > base.mul_f64(1.09)
        };
        for (ttl, ok, base, what) in [
            (Some(secs(30)), true, secs(30), "the TTL"),
            (
                Some(secs(1)),
                true,
                secs(5),
                "a short TTL is raised to min_refresh",
            ),
            (
                Some(secs(3600)),
                true,
                secs(60),
                "a long TTL is cut to max_refresh",
            ),
            (None, true, secs(60), "no TTL: max_refresh"),
            (
                Some(secs(30)),
                false,
                secs(5),
                "after a failure: min_refresh",
            ),
            (None, false, secs(5), "after a failure: min_refresh"),
        ] {
            let w = waits(&d, ttl, ok);
            assert!(jittered(w, base), "{what}: {w:?} around {base:?}");
        }
    }
}
