//! The upstream part of the config: where a cluster's endpoints come from (static list or DNS),
//! how one is picked (load balancer and hash key), how their health is watched (active checks,
//! outlier ejection, panic mode) and how connections to them are pooled.

use std::net::SocketAddr;
use std::time::Duration;

use http::uri::Authority;
use http::{HeaderName, Method};
use serde::{Deserialize, Serialize};

use super::validate::{nearest, Validator};

/// One static endpoint: `host:port`, or a map with an address and a weight.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum RawEndpoint {
    /// `host:port`, weight 1.
    Address(String),
    /// `{address: host:port, weight: N}`.
    Weighted {
        /// `host:port`.
        address: String,
        /// Relative weight, at least 1.
        weight: u32,
    },
}

/// The `registry:` block of a cluster.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawRegistry {
    /// The service whose registered instances are the cluster's endpoints.
    pub service: String,
}

/// The `dns:` block of a cluster.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawDns {
    /// A name to resolve: `api.example.internal` (A/AAAA, needs `port`) or
    /// `_http._tcp.api.example.internal` (SRV: ports, weights and priorities from the records).
    pub name: String,
    /// Port for A/AAAA names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// DNS server `ip:port`; the system's resolv.conf when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolver: Option<String>,
    /// Shortest time between lookups, whatever the TTL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_refresh: Option<String>,
    /// Longest time between lookups, whatever the TTL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_refresh: Option<String>,
}

/// The `health_check:` block of a cluster.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawHealthCheck {
    /// `http` (default), `tcp` or `grpc`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    /// HTTP path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// HTTP method.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// HTTP `Host` header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Healthy status codes or ranges, e.g. `["200-299", "304"]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_statuses: Option<Vec<String>>,
    /// gRPC service name asked about (empty: the server as a whole).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc_service: Option<String>,
    /// Time between checks of a healthy endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<String>,
    /// Time between checks of an unhealthy endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unhealthy_interval: Option<String>,
    /// Time one check may take.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    /// Random extra wait added to each interval, up to this much.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jitter: Option<String>,
    /// Passed checks in a row that make an endpoint healthy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthy_threshold: Option<u32>,
    /// Failed checks in a row that make an endpoint unhealthy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unhealthy_threshold: Option<u32>,
    /// `threshold` (consecutive failures, default) or `phi` (phi-accrual suspicion).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detector: Option<String>,
    /// Suspicion level at which the phi detector declares an endpoint down.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phi_threshold: Option<f64>,
    /// One sidecar of the fleet probes each endpoint and shares its verdicts through the mesh.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub coordinated: Option<bool>,
}

/// The `outlier_detection:` block of a cluster.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawOutlier {
    /// `false` turns passive ejection off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// Consecutive 5xx answers (or failed tries) that eject; `0` disables.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_5xx: Option<u32>,
    /// Consecutive 502/503/504 answers, resets and timeouts that eject; `0` disables.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_gateway_errors: Option<u32>,
    /// Consecutive connection failures that eject; `0` disables.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_connect_failures: Option<u32>,
    /// Ejection time, multiplied by the number of times the endpoint was ejected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_ejection_time: Option<String>,
    /// Cap on one ejection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ejection_time: Option<String>,
    /// Most of the cluster, in percent, that may be ejected at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ejection_percent: Option<u32>,
}

/// The `pool:` block of a cluster.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawPool {
    /// Idle keep-alive connections kept per endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_idle_per_endpoint: Option<usize>,
    /// How long an idle connection is kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<String>,
}

/// A typed endpoint of a static cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticEndpoint {
    /// `host:port`.
    pub authority: Authority,
    /// Relative weight.
    pub weight: u32,
}

/// Where a cluster's endpoints come from.
#[derive(Debug, Clone, PartialEq)]
pub enum Discovery {
    /// Listed in the config.
    Static(Vec<StaticEndpoint>),
    /// Resolved through DNS.
    Dns(DnsConfig),
    /// The instances of a service in the mesh group's registry.
    Registry {
        /// The service.
        service: String,
    },
}

/// What a `dns` cluster resolves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DnsQuery {
    /// A and AAAA records of the name, all on `port`.
    Address {
        /// The name (fully qualified).
        name: String,
        /// The port.
        port: u16,
    },
    /// SRV records of the name; their targets are resolved in turn.
    Srv {
        /// The name (fully qualified).
        name: String,
    },
}

/// A `dns` cluster's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsConfig {
    /// The query.
    pub query: DnsQuery,
    /// The DNS server; `None` for the system's.
    pub resolver: Option<SocketAddr>,
    /// Floor of the refresh period.
    pub min_refresh: Duration,
    /// Ceiling of the refresh period.
    pub max_refresh: Duration,
}

/// How an endpoint is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Balancer {
    /// Weighted round robin.
    RoundRobin,
    /// Power of two choices on in-flight requests per weight.
    LeastRequest,
    /// Power of two choices on a peak-sensitive moving average of latency (the default).
    PeakEwma,
    /// Weighted random.
    Random,
    /// Consistent hashing on a ring.
    RingHash,
    /// Consistent hashing with Google's Maglev table.
    Maglev,
}

impl Balancer {
    /// The name used in the config and on `/clusters`.
    pub fn name(self) -> &'static str {
        match self {
            Balancer::RoundRobin => "round_robin",
            Balancer::LeastRequest => "least_request",
            Balancer::PeakEwma => "peak_ewma",
            Balancer::Random => "random",
            Balancer::RingHash => "ring_hash",
            Balancer::Maglev => "maglev",
        }
    }
}

/// Names accepted in `load_balancer`.
pub const BALANCER_NAMES: &[&str] = &[
    "peak_ewma",
    "round_robin",
    "least_request",
    "random",
    "ring_hash",
    "maglev",
];

/// What a consistent-hash balancer hashes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashOn {
    /// A request header's value.
    Header(HeaderName),
    /// A cookie's value.
    Cookie(String),
    /// The client's IP address.
    SourceIp,
    /// The request path.
    Path,
}

/// How active checks talk to an endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckKind {
    /// An HTTP request whose status must be expected.
    Http {
        /// Path.
        path: String,
        /// Method.
        method: Method,
        /// `Host` header, if set.
        host: Option<String>,
        /// Healthy status ranges, inclusive.
        statuses: Vec<(u16, u16)>,
    },
    /// A TCP connection that must be accepted.
    Tcp,
    /// `grpc.health.v1.Health/Check`, which must answer SERVING.
    Grpc {
        /// Service asked about.
        service: String,
    },
}

/// How a failing endpoint is recognised from its checks.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Detector {
    /// `unhealthy_threshold` failed checks in a row.
    Threshold,
    /// Phi-accrual suspicion over the history of check arrivals exceeds this.
    Phi(f64),
}

/// Active health checking settings.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthCheckConfig {
    /// What a check is.
    pub kind: CheckKind,
    /// Interval while healthy.
    pub interval: Duration,
    /// Interval while unhealthy.
    pub unhealthy_interval: Duration,
    /// Time a check may take.
    pub timeout: Duration,
    /// Largest random extra wait per interval.
    pub jitter: Duration,
    /// Passes in a row to become healthy.
    pub healthy_threshold: u32,
    /// Failures in a row to become unhealthy (threshold detector).
    pub unhealthy_threshold: u32,
    /// Failure detector.
    pub detector: Detector,
    /// Whether one sidecar of the fleet probes each endpoint for all (`coordinated: true`).
    pub coordinated: bool,
}

/// Passive ejection settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutlierConfig {
    /// Consecutive 5xx or failed tries; 0 disables.
    pub consecutive_5xx: u32,
    /// Consecutive gateway errors; 0 disables.
    pub consecutive_gateway_errors: u32,
    /// Consecutive connect failures; 0 disables.
    pub consecutive_connect_failures: u32,
    /// Base ejection time.
    pub base_ejection_time: Duration,
    /// Ejection cap.
    pub max_ejection_time: Duration,
    /// Most of the cluster ejected at once, percent.
    pub max_ejection_percent: u32,
}

impl Default for OutlierConfig {
    fn default() -> Self {
        Self {
            consecutive_5xx: 5,
            consecutive_gateway_errors: 5,
            consecutive_connect_failures: 5,
            base_ejection_time: Duration::from_secs(30),
            max_ejection_time: Duration::from_secs(300),
            max_ejection_percent: 10,
        }
    }
}

/// Connection pool settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolConfig {
    /// Idle connections kept per endpoint.
    pub max_idle_per_endpoint: usize,
    /// Idle connection lifetime.
    pub idle_timeout: Duration,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            max_idle_per_endpoint: 1024,
            idle_timeout: Duration::from_secs(90),
        }
    }
}

/// Everything about a cluster's endpoints.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamConfig {
    /// Where endpoints come from.
    pub discovery: Discovery,
    /// How one is picked.
    pub balancer: Balancer,
    /// What consistent hashing hashes (ring_hash and maglev).
    pub hash_on: Option<HashOn>,
    /// Active checks, if any.
    pub health_check: Option<HealthCheckConfig>,
    /// Passive ejection, if on.
    pub outlier: Option<OutlierConfig>,
    /// Below this share of available endpoints (percent), balance over all of them.
    pub panic_threshold: u32,
    /// Pooling.
    pub pool: PoolConfig,
}

impl Validator {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn upstream(
        &mut self,
        path: &str,
        endpoints: &[RawEndpoint],
        dns: Option<&RawDns>,
        registry: Option<&RawRegistry>,
        balancer: Option<&str>,
        hash_on: Option<&str>,
        health: Option<&RawHealthCheck>,
        outlier: Option<&RawOutlier>,
        panic_threshold: Option<u32>,
        pool: Option<&RawPool>,
    ) -> UpstreamConfig {
        let sources = usize::from(!endpoints.is_empty())
            + usize::from(dns.is_some())
            + usize::from(registry.is_some());
        let discovery = match (endpoints.is_empty(), dns, registry) {
            _ if sources > 1 => {
                let field = if registry.is_some() {
                    "registry"
                } else {
                    "dns"
                };
                self.problem(
                    format!("{path}.{field}"),
                    "give one of `endpoints`, `dns` or `registry`".into(),
                );
                Discovery::Static(Vec::new())
            }
            (true, None, None) => {
                self.problem_with_hint(
                    format!("{path}.endpoints"),
                    "the cluster has no endpoints".into(),
                    Some("list `endpoints:`, or add a `dns:` or `registry:` block".into()),
                );
                Discovery::Static(Vec::new())
            }
            (false, _, _) => Discovery::Static(self.static_endpoints(path, endpoints)),
            (true, Some(d), _) => Discovery::Dns(self.dns(&format!("{path}.dns"), d)),
            (true, None, Some(r)) => {
                if r.service.is_empty() {
                    self.problem(
                        format!("{path}.registry.service"),
                        "the service name is empty".into(),
                    );
                }
                Discovery::Registry {
                    service: r.service.clone(),
                }
            }
        };
        let balancer = match balancer {
            None => Balancer::PeakEwma,
            Some("peak_ewma") => Balancer::PeakEwma,
            Some("round_robin") => Balancer::RoundRobin,
            Some("least_request") => Balancer::LeastRequest,
            Some("random") => Balancer::Random,
            Some("ring_hash") => Balancer::RingHash,
            Some("maglev") => Balancer::Maglev,
            Some(other) => {
                let hint = nearest(other, BALANCER_NAMES.iter().copied())
                    .map(|n| format!("did you mean `{n}`?"))
                    .unwrap_or_else(|| format!("one of: {}", BALANCER_NAMES.join(", ")));
                self.problem_with_hint(
                    format!("{path}.load_balancer"),
                    format!("unknown load balancer `{other}`"),
                    Some(hint),
                );
                Balancer::PeakEwma
            }
        };
        let hash_on = hash_on.and_then(|h| self.hash_on(&format!("{path}.hash_on"), h));
        let hashing = matches!(balancer, Balancer::RingHash | Balancer::Maglev);
        if hashing && hash_on.is_none() {
            self.problem_with_hint(
                format!("{path}.load_balancer"),
                "a consistent-hash balancer needs `hash_on`".into(),
                Some(
                    "e.g. `hash_on: header:x-user-id`, `cookie:session`, `source_ip` or `path`"
                        .into(),
                ),
            );
        }
        if !hashing && hash_on.is_some() {
            self.problem_with_hint(
                format!("{path}.hash_on"),
                "`hash_on` only applies to `ring_hash` and `maglev`".into(),
                None,
            );
        }
        let health_check =
            health.and_then(|h| self.health_check(&format!("{path}.health_check"), h));
        let outlier = self.outlier(&format!("{path}.outlier_detection"), outlier);
        let panic_threshold = panic_threshold.unwrap_or(50);
        if panic_threshold > 100 {
            self.problem(
                format!("{path}.panic_threshold"),
                "panic_threshold is a percentage, at most 100".into(),
            );
        }
        let mut pool_cfg = PoolConfig::default();
        if let Some(p) = pool {
            if let Some(n) = p.max_idle_per_endpoint {
                pool_cfg.max_idle_per_endpoint = n;
            }
            if let Some(d) = self.duration(
                &format!("{path}.pool.idle_timeout"),
                p.idle_timeout.as_deref(),
            ) {
                pool_cfg.idle_timeout = d;
            }
        }
        UpstreamConfig {
            discovery,
            balancer,
            hash_on,
            health_check,
            outlier,
            panic_threshold,
            pool: pool_cfg,
        }
    }

    fn static_endpoints(&mut self, path: &str, endpoints: &[RawEndpoint]) -> Vec<StaticEndpoint> {
        let mut out = Vec::with_capacity(endpoints.len());
        for (j, e) in endpoints.iter().enumerate() {
            let (text, weight, epath) = match e {
                RawEndpoint::Address(a) => (a, 1, format!("{path}.endpoints[{j}]")),
                RawEndpoint::Weighted { address, weight } => {
                    (address, *weight, format!("{path}.endpoints[{j}].address"))
                }
            };
            if weight == 0 {
                self.problem_with_hint(
                    format!("{path}.endpoints[{j}].weight"),
                    "weight must be at least 1".into(),
                    Some("remove the endpoint to send it nothing".into()),
                );
            }
            match text.parse::<Authority>() {
                Ok(a) if a.port_u16().is_some_and(|p| p != 0) && !a.as_str().contains('@') => out
                    .push(StaticEndpoint {
                        authority: a,
                        weight: weight.max(1),
                    }),
                _ => self.problem_with_hint(
                    epath,
                    format!("invalid endpoint `{text}`"),
                    Some("write `host:port`, e.g. `127.0.0.1:8080` or `app.internal:80`".into()),
                ),
            }
        }
        out
    }

    fn dns(&mut self, path: &str, d: &RawDns) -> DnsConfig {
        let name = if d.name.ends_with('.') {
            d.name.clone()
        } else {
            format!("{}.", d.name)
        };
        let query = if d.name.starts_with('_') {
            if d.port.is_some() {
                self.problem_with_hint(
                    format!("{path}.port"),
                    "an SRV name takes its ports from the records".into(),
                    Some("remove `port`".into()),
                );
            }
            DnsQuery::Srv { name }
        } else {
            match d.port {
                Some(port) if port != 0 => DnsQuery::Address { name, port },
                _ => {
                    self.problem_with_hint(
                        format!("{path}.port"),
                        format!("`{}` needs a port", d.name),
                        Some("add `port: 8080`, or use an SRV name like `_http._tcp.NAME`".into()),
                    );
                    DnsQuery::Address { name, port: 0 }
                }
            }
        };
        let resolver = d
            .resolver
            .as_deref()
            .and_then(|r| match r.parse::<SocketAddr>() {
                Ok(a) => Some(a),
                Err(_) => {
                    self.problem_with_hint(
                        format!("{path}.resolver"),
                        format!("invalid resolver address `{r}`"),
                        Some("write an IP and a port, e.g. `10.0.0.2:53`".into()),
                    );
                    None
                }
            });
        let min_refresh = self
            .duration(&format!("{path}.min_refresh"), d.min_refresh.as_deref())
            .unwrap_or(Duration::from_secs(1));
        let max_refresh = self
            .duration(&format!("{path}.max_refresh"), d.max_refresh.as_deref())
            .unwrap_or(Duration::from_secs(300));
        if max_refresh < min_refresh || min_refresh.is_zero() {
            self.problem(
                format!("{path}.max_refresh"),
                "need 0 < min_refresh <= max_refresh".into(),
            );
        }
        DnsConfig {
            query,
            resolver,
            min_refresh,
            max_refresh,
        }
    }

    pub(super) fn hash_on(&mut self, path: &str, h: &str) -> Option<HashOn> {
        let parsed = match h {
            "source_ip" => Some(HashOn::SourceIp),
            "path" => Some(HashOn::Path),
            _ => {
                if let Some(name) = h.strip_prefix("header:") {
                    HeaderName::from_bytes(name.trim().as_bytes())
                        .ok()
                        .map(HashOn::Header)
                } else {
                    h.strip_prefix("cookie:")
                        .map(str::trim)
                        .filter(|c| !c.is_empty())
                        .map(|c| HashOn::Cookie(c.to_owned()))
                }
            }
        };
        if parsed.is_none() {
            self.problem_with_hint(
                path.to_owned(),
                format!("invalid hash key `{h}`"),
                Some("one of `header:NAME`, `cookie:NAME`, `source_ip`, `path`".into()),
            );
        }
        parsed
    }

    pub(super) fn health_check(
        &mut self,
        path: &str,
        h: &RawHealthCheck,
    ) -> Option<HealthCheckConfig> {
        let before = self.problems.len();
        let p = |f: &str| format!("{path}.{f}");
        let kind = match h.protocol.as_deref().unwrap_or("http") {
            "http" => {
                let hpath = h.path.clone().unwrap_or_else(|| "/healthz".into());
                if !hpath.starts_with('/') {
                    self.problem(p("path"), format!("path `{hpath}` must start with `/`"));
                }
                let method =
                    match Method::from_bytes(h.method.as_deref().unwrap_or("GET").as_bytes()) {
                        Ok(m) => m,
                        Err(_) => {
                            self.problem(p("method"), "invalid method".into());
                            Method::GET
                        }
                    };
                let mut statuses = Vec::new();
                for (k, s) in h
                    .expected_statuses
                    .clone()
                    .unwrap_or_else(|| vec!["200-399".into()])
                    .iter()
                    .enumerate()
                {
                    let range = match s.split_once('-') {
                        Some((a, b)) => a.trim().parse().ok().zip(b.trim().parse().ok()),
                        None => s.trim().parse().ok().map(|v| (v, v)),
                    };
                    match range {
                        Some((a, b)) if (100..=599).contains(&a) && a <= b && b <= 599 => {
                            statuses.push((a, b))
                        }
                        _ => self.problem_with_hint(
                            format!("{path}.expected_statuses[{k}]"),
                            format!("invalid status or range `{s}`"),
                            Some("write e.g. `200`, or `200-299`".into()),
                        ),
                    }
                }
                CheckKind::Http {
                    path: hpath,
                    method,
                    host: h.host.clone(),
                    statuses,
                }
            }
            "tcp" => CheckKind::Tcp,
            "grpc" => CheckKind::Grpc {
                service: h.grpc_service.clone().unwrap_or_default(),
            },
            other => {
                self.problem_with_hint(
                    p("protocol"),
                    format!("unknown health check protocol `{other}`"),
                    Some("`http`, `tcp` or `grpc`".into()),
                );
                CheckKind::Tcp
            }
        };
        let positive = |v: &mut Self, f: &str, text: Option<&str>, default: Duration| match v
            .duration(&p(f), text)
        {
            Some(d) if d.is_zero() => {
                v.problem(p(f), format!("{f} must be greater than 0"));
                default
            }
            Some(d) => d,
            None => default,
        };
        let interval = positive(
            self,
            "interval",
            h.interval.as_deref(),
            Duration::from_secs(5),
        );
        let unhealthy_interval = positive(
            self,
            "unhealthy_interval",
            h.unhealthy_interval.as_deref(),
            interval,
        );
        let timeout = positive(
            self,
            "timeout",
            h.timeout.as_deref(),
            Duration::from_secs(1),
        );
        let jitter = self
            .duration(&p("jitter"), h.jitter.as_deref())
            .unwrap_or(interval / 10);
        let healthy_threshold = h.healthy_threshold.unwrap_or(2).max(1);
        let unhealthy_threshold = h.unhealthy_threshold.unwrap_or(3).max(1);
        let detector = match h.detector.as_deref() {
            None | Some("threshold") => {
                if h.phi_threshold.is_some() {
                    self.problem_with_hint(
                        p("phi_threshold"),
                        "phi_threshold applies to the phi detector".into(),
                        Some("add `detector: phi`".into()),
                    );
                }
                Detector::Threshold
            }
            Some("phi") => {
                let t = h.phi_threshold.unwrap_or(8.0);
                if !(t > 0.0 && t.is_finite()) {
                    self.problem(
                        p("phi_threshold"),
                        "phi_threshold must be greater than 0".into(),
                    );
                }
                Detector::Phi(t)
            }
            Some(other) => {
                self.problem_with_hint(
                    p("detector"),
                    format!("unknown detector `{other}`"),
                    Some("`threshold` or `phi`".into()),
                );
                Detector::Threshold
            }
        };
        (self.problems.len() == before).then_some(HealthCheckConfig {
            kind,
            interval,
            unhealthy_interval,
            timeout,
            jitter,
            healthy_threshold,
            unhealthy_threshold,
            detector,
            coordinated: h.coordinated.unwrap_or(false),
        })
    }

    fn outlier(&mut self, path: &str, raw: Option<&RawOutlier>) -> Option<OutlierConfig> {
        let mut c = OutlierConfig::default();
        let Some(o) = raw else { return Some(c) };
        if let Some(n) = o.consecutive_5xx {
            c.consecutive_5xx = n;
        }
        if let Some(n) = o.consecutive_gateway_errors {
            c.consecutive_gateway_errors = n;
        }
        if let Some(n) = o.consecutive_connect_failures {
            c.consecutive_connect_failures = n;
        }
        if let Some(d) = self.duration(
            &format!("{path}.base_ejection_time"),
            o.base_ejection_time.as_deref(),
        ) {
            c.base_ejection_time = d;
        }
        if let Some(d) = self.duration(
            &format!("{path}.max_ejection_time"),
            o.max_ejection_time.as_deref(),
        ) {
            c.max_ejection_time = d;
        }
        if c.max_ejection_time < c.base_ejection_time {
            self.problem(
                format!("{path}.max_ejection_time"),
                "max_ejection_time is below base_ejection_time".into(),
            );
        }
        if let Some(p) = o.max_ejection_percent {
            if p > 100 {
                self.problem(
                    format!("{path}.max_ejection_percent"),
                    "max_ejection_percent is a percentage, at most 100".into(),
                );
            }
            c.max_ejection_percent = p.min(100);
        }
        (o.enabled != Some(false)).then_some(c)
    }
}
