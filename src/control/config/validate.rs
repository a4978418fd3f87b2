//! Turns a [`RawConfig`] into a typed [`Config`], collecting every semantic error with its path.
//!
//! Nothing here fails fast: each problem is recorded and checking goes on, so a user sees all of
//! them in one `outrigger check`. A typed `Config` exists only if the list ends up empty, which is
//! what keeps an invalid reload from ever reaching the live snapshot.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::{HeaderName, Method};
use regex::Regex;

use super::mesh::MeshConfig;
use super::model::{
    ListenerProtocol, RawCluster, RawConfig, RawHeaderMatch, RawListener, RawMatch, RawPartition,
    RawRoute, RequestIdMode, UpstreamProtocol,
};
use super::resilience::{
    BreakerConfig, BudgetConfig, BulkheadConfig, FaultConfig, LoadShedConfig, RateLimitConfig,
    RetryConfig,
};
use super::tls::{ClientTlsConfig, IdentityPattern, ServerTlsConfig};
use super::upstream::HashOn;
use super::upstream::UpstreamConfig;

/// Admin address when the config names none.
pub const DEFAULT_ADMIN_ADDRESS: &str = "127.0.0.1:9901";
/// Shutdown drain time when the config names none.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Upstream connect timeout when a cluster names none.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// The longest duration any setting accepts.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);
/// Stream idle timeout when a route names none.
pub const DEFAULT_STREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// Downstream connection idle timeout when a listener names none.
pub const DEFAULT_CONNECTION_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
/// Time a client gets to send request headers when a listener names none.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections a listener keeps open at once when it names no `max_connections`.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 10_000;
/// Largest request head when a listener names no `max_header_bytes` (hyper cannot go below 8 KiB).
pub const DEFAULT_MAX_HEADER_BYTES: u32 = 64 * 1024;
/// Most request header lines when a listener names no `max_headers`.
pub const DEFAULT_MAX_HEADERS: u32 = 100;
/// HTTP/2 concurrent streams per connection when a listener names none.
pub const DEFAULT_H2_MAX_CONCURRENT_STREAMS: u32 = 256;
/// HTTP/2 streams reset before being accepted, per connection, before GOAWAY.
pub const DEFAULT_H2_MAX_PENDING_RESETS: u32 = 20;
/// Time to response headers when a route names none.
pub const DEFAULT_ROUTE_TIMEOUT: Duration = Duration::from_secs(15);

/// A problem found in the config: where (a document path), what, and perhaps how to fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Path in the document, e.g. `listeners[0].routes[1].cluster`.
    pub path: String,
    /// What is wrong.
    pub message: String,
    /// A suggestion, such as the nearest valid name.
    pub hint: Option<String>,
}

/// A validated configuration, ready to be compiled into the running proxy.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Admin server address.
    pub admin_address: SocketAddr,
    /// Time in-flight work gets to finish on shutdown.
    pub drain_timeout: Duration,
    /// Whether each request and connection is logged.
    pub access_log: bool,
    /// Listeners in file order.
    pub listeners: Vec<ListenerConfig>,
    /// Clusters in file order.
    pub clusters: Vec<ClusterConfig>,
    /// The embedded Raft group, if this sidecar takes part.
    pub mesh: Option<MeshConfig>,
}

/// A validated listener.
#[derive(Debug, Clone, PartialEq)]
pub struct ListenerConfig {
    /// Unique name.
    pub name: String,
    /// Address to bind.
    pub address: SocketAddr,
    /// What the listener does with a connection.
    pub kind: ListenerKind,
    /// Time a client gets to send request headers; `None` when disabled.
    pub header_read_timeout: Option<Duration>,
    /// Idle connections close after this long; `None` when disabled.
    pub idle_timeout: Option<Duration>,
    /// Adaptive concurrency limit, if on.
    pub load_shed: Option<LoadShedConfig>,
    /// TLS termination, if on.
    pub tls: Option<ServerTlsConfig>,
    /// Connection, header and HTTP/2 limits.
    pub limits: Limits,
    /// Whether a caller's `x-request-id` is kept or replaced.
    pub request_id: RequestIdMode,
}

/// A listener's limits on what clients may open and send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections open at once.
    pub max_connections: u32,
    /// Largest request head (HTTP/1.1) or header list (HTTP/2), in bytes.
    pub max_header_bytes: u32,
    /// Most header lines of an HTTP/1.1 request.
    pub max_headers: u32,
    /// HTTP/2 concurrent streams per connection.
    pub h2_max_concurrent_streams: u32,
    /// HTTP/2 streams reset before being accepted, per connection.
    pub h2_max_pending_resets: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
            max_headers: DEFAULT_MAX_HEADERS,
            h2_max_concurrent_streams: DEFAULT_H2_MAX_CONCURRENT_STREAMS,
            h2_max_pending_resets: DEFAULT_H2_MAX_PENDING_RESETS,
        }
    }
}

/// What a listener does with its connections.
#[derive(Debug, Clone, PartialEq)]
pub enum ListenerKind {
    /// Serve HTTP and route each request.
    Http {
        /// Routes in match order.
        routes: Vec<RouteConfig>,
    },
    /// Splice bytes to one cluster.
    Tcp {
        /// Target cluster name (known to exist).
        cluster: String,
    },
}

/// A validated route.
#[derive(Debug, Clone)]
pub struct RouteConfig {
    /// Unique name.
    pub name: String,
    /// Conditions.
    pub matcher: RouteMatch,
    /// Target clusters with weights (one entry for a plain `cluster:`); weights sum to more than 0.
    pub targets: Vec<(String, u32)>,
    /// Time for the whole request, retries included, to response headers; `None` when disabled.
    pub timeout: Option<Duration>,
    /// Longest silence of a response stream; `None` when disabled.
    pub idle_timeout: Option<Duration>,
    /// How a partitioned route maps a key to one of `targets`.
    pub partition: Option<PartitionConfig>,
    /// Retry and hedging policy.
    pub retry: RetryConfig,
    /// Rate limit, if any.
    pub rate_limit: Option<RateLimitConfig>,
    /// Route-level bulkhead, if any.
    pub bulkhead: Option<BulkheadConfig>,
    /// Fault injection, if any.
    pub fault: Option<FaultConfig>,
    /// Largest request body; `None` for no limit.
    pub max_request_body: Option<u64>,
    /// Client identities allowed; `None` allows everyone.
    pub allowed_identities: Option<Vec<IdentityPattern>>,
    /// Protocols a request may switch to, lowercase.
    pub upgrades: Vec<String>,
}

impl PartialEq for RouteConfig {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
            && self.matcher == other.matcher
            && self.targets == other.targets
            && self.timeout == other.timeout
            && self.idle_timeout == other.idle_timeout
            && self.partition == other.partition
            && self.retry == other.retry
            && self.rate_limit == other.rate_limit
            && self.bulkhead == other.bulkhead
            && self.fault == other.fault
            && self.max_request_body == other.max_request_body
            && self.allowed_identities == other.allowed_identities
            && self.upgrades == other.upgrades
    }
}

/// Request conditions of a route.
#[derive(Debug, Clone, Default)]
pub struct RouteMatch {
    /// Path condition.
    pub path: PathMatch,
    /// Host condition, lowercase; a leading `*.` matches any subdomain.
    pub host: Option<String>,
    /// Allowed methods; `None` allows all.
    pub methods: Option<Vec<Method>>,
    /// Header conditions.
    pub headers: Vec<HeaderMatch>,
    /// The client's TLS identity must match one of these.
    pub identities: Option<Vec<IdentityPattern>>,
}

impl PartialEq for RouteMatch {
    fn eq(&self, other: &Self) -> bool {
        self.path == other.path
            && self.host == other.host
            && self.methods == other.methods
            && self.headers == other.headers
            && self.identities == other.identities
    }
}

/// How a route matches the request path.
#[derive(Debug, Clone, Default)]
pub enum PathMatch {
    /// Every path.
    #[default]
    Any,
    /// Paths starting with this prefix.
    Prefix(String),
    /// This exact path.
    Exact(String),
    /// Paths matching this anchored regex.
    Regex(Regex),
}

impl PartialEq for PathMatch {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Any, Self::Any) => true,
            (Self::Prefix(a), Self::Prefix(b)) | (Self::Exact(a), Self::Exact(b)) => a == b,
            (Self::Regex(a), Self::Regex(b)) => a.as_str() == b.as_str(),
            _ => false,
        }
    }
}

/// A header condition.
#[derive(Debug, Clone)]
pub struct HeaderMatch {
    /// Header name.
    pub name: HeaderName,
    /// What its value must be.
    pub value: HeaderValueMatch,
}

impl PartialEq for HeaderMatch {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name && self.value == other.value
    }
}

/// What a header's value must be.
#[derive(Debug, Clone)]
pub enum HeaderValueMatch {
    /// Equal to this.
    Exact(String),
    /// Matching this anchored regex.
    Regex(Regex),
    /// Present (`true`) or absent (`false`).
    Present(bool),
}

impl PartialEq for HeaderValueMatch {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Exact(a), Self::Exact(b)) => a == b,
            (Self::Regex(a), Self::Regex(b)) => a.as_str() == b.as_str(),
            (Self::Present(a), Self::Present(b)) => a == b,
            _ => false,
        }
    }
}

/// How a partitioned route picks its shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionConfig {
    /// Where the key is.
    pub key: HashOn,
    /// Hash or ranges.
    pub mode: PartitionMode,
}

/// The mapping from key to shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PartitionMode {
    /// Jump consistent hash of the key over the shards, in order.
    Hash,
    /// Upper bounds (exclusive) of every shard but the last.
    Ranges(Vec<String>),
}

/// A validated cluster.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterConfig {
    /// Unique name.
    pub name: String,
    /// Where endpoints come from, how they are picked and watched.
    pub upstream: UpstreamConfig,
    /// TCP connect timeout.
    pub connect_timeout: Duration,
    /// Protocol spoken upstream.
    pub protocol: UpstreamProtocol,
    /// Retry budget shared by every route sending here.
    pub budget: BudgetConfig,
    /// Circuit breaker; `None` when turned off.
    pub breaker: Option<BreakerConfig>,
    /// Concurrency cap and queue.
    pub bulkhead: BulkheadConfig,
    /// TLS to the endpoints, if on.
    pub tls: Option<ClientTlsConfig>,
}

/// Checks `raw` and builds a [`Config`], or returns every problem found.
pub fn validate(raw: &RawConfig) -> Result<Config, Vec<Problem>> {
    validate_in(raw, None)
}

/// As [`validate`], with relative file paths (TLS material, `mesh.data_dir`) taken from `dir`,
/// the config file's folder, as Prometheus does: the config means the same wherever the proxy
/// is started from. `None` takes them from the working directory.
pub fn validate_in(raw: &RawConfig, dir: Option<&Path>) -> Result<Config, Vec<Problem>> {
    let mut v = Validator {
        dir: dir.map(Path::to_path_buf),
        ..Validator::default()
    };
    let admin_address = raw
        .admin
        .address
        .as_deref()
        .map(|a| v.socket_addr("admin.address", a))
        .unwrap_or_else(|| DEFAULT_ADMIN_ADDRESS.parse().ok());
    let drain_timeout = v
        .duration("drain_timeout", raw.drain_timeout.as_deref())
        .unwrap_or(DEFAULT_DRAIN_TIMEOUT);

    let cluster_names: Vec<&str> = raw.clusters.iter().map(|c| c.name.as_str()).collect();
    let mut seen = HashSet::new();
    let mut clusters = Vec::with_capacity(raw.clusters.len());
    for (i, c) in raw.clusters.iter().enumerate() {
        let path = format!("clusters[{i}]");
        if !seen.insert(c.name.as_str()) {
            v.problem(
                format!("{path}.name"),
                format!("duplicate cluster name `{}`", c.name),
            );
        }
        if let Some(c) = v.cluster(&path, c) {
            clusters.push(c);
        }
    }

    let mut listeners = Vec::with_capacity(raw.listeners.len());
    let mut listener_names = HashSet::new();
    let mut route_names = HashSet::new();
    let mesh = raw.mesh.as_ref().and_then(|m| v.mesh(m));
    if raw.mesh.is_none() {
        for (i, c) in raw.clusters.iter().enumerate() {
            if c.health_check.as_ref().and_then(|h| h.coordinated) == Some(true) {
                v.problem_with_hint(
                    format!("clusters[{i}].health_check.coordinated"),
                    "coordinated health checks need a `mesh:` section".into(),
                    Some("add `mesh:` with the group's `members`, or drop `coordinated`".into()),
                );
            }
            if c.registry.is_some() {
                v.problem_with_hint(
                    format!("clusters[{i}].registry"),
                    "a `registry` cluster needs a `mesh:` section".into(),
                    Some(
                        "add `mesh:` with the group's `members` (`role: client` is enough)".into(),
                    ),
                );
            }
        }
    }
    let mut bound: Vec<(SocketAddr, String)> = admin_address
        .map(|a| vec![(a, "the admin server".to_owned())])
        .unwrap_or_default();
    if let Some(listen) = mesh.as_ref().and_then(|m| m.listen) {
        if bound.iter().any(|(b, _)| overlaps(*b, listen)) {
            v.problem(
                "mesh.listen".into(),
                format!("address {listen} overlaps with the admin server"),
            );
        }
        bound.push((listen, "the mesh port".to_owned()));
    }
    for (i, l) in raw.listeners.iter().enumerate() {
        let path = format!("listeners[{i}]");
        if !listener_names.insert(l.name.as_str()) {
            v.problem(
                format!("{path}.name"),
                format!("duplicate listener name `{}`", l.name),
            );
        }
        let address = v.socket_addr(&format!("{path}.address"), &l.address);
        if let Some(addr) = address {
            if let Some((_, other)) = bound.iter().find(|(b, _)| overlaps(*b, addr)) {
                v.problem(
                    format!("{path}.address"),
                    format!("address {addr} overlaps with {other}"),
                );
            }
            bound.push((addr, format!("listener `{}`", l.name)));
        }
        let kind = v.listener_kind(&path, l, &cluster_names, &mut route_names);
        let header_read_timeout = v.optional_timeout(
            &format!("{path}.header_read_timeout"),
            l.header_read_timeout.as_deref(),
            DEFAULT_HEADER_READ_TIMEOUT,
        );
        if l.protocol == ListenerProtocol::Tcp {
            for (field, set) in [
                ("header_read_timeout", l.header_read_timeout.is_some()),
                ("load_shed", l.load_shed.is_some()),
                ("request_id", l.request_id.is_some()),
            ] {
                if set {
                    v.problem_with_hint(
                        format!("{path}.{field}"),
                        format!("`{field}` applies to http listeners only"),
                        Some("remove it, or make the listener `protocol: http`".into()),
                    );
                }
            }
        }
        let load_shed = l.load_shed.as_ref().and_then(|s| v.load_shed(&path, s));
        let idle_timeout = v.optional_timeout(
            &format!("{path}.idle_timeout"),
            l.idle_timeout.as_deref(),
            DEFAULT_CONNECTION_IDLE_TIMEOUT,
        );
        let tls = l
            .tls
            .as_ref()
            .and_then(|t| v.server_tls(&format!("{path}.tls"), t));
        let limits = v.limits(&path, l);
        if let (Some(address), Some(kind)) = (address, kind) {
            listeners.push(ListenerConfig {
                name: l.name.clone(),
                address,
                kind,
                header_read_timeout,
                idle_timeout,
                load_shed,
                tls,
                limits,
                request_id: l.request_id.unwrap_or_default(),
            });
        }
    }

    // Each mesh-wide limit belongs to one route of a sidecar: two routes sharing a name would
    // each enforce the sidecar's whole share.
    let mut mesh_limits: HashMap<String, String> = HashMap::new();
    for (i, l) in raw.listeners.iter().enumerate() {
        for (j, r) in l.routes.iter().enumerate() {
            let Some(limit) = r.rate_limit.as_ref() else {
                continue;
            };
            if limit.scope.as_deref() != Some("mesh") {
                continue;
            }
            let path = format!("listeners[{i}].routes[{j}].rate_limit.scope");
            if raw.mesh.is_none() {
                v.problem_with_hint(
                    path.clone(),
                    "a mesh-wide rate limit needs a `mesh:` section".into(),
                    Some(
                        "add `mesh:` with the group's `members` (`role: client` is enough)".into(),
                    ),
                );
            }
            let name = limit.name.clone().unwrap_or_else(|| r.name.clone());
            if let Some(other) = mesh_limits.insert(name.clone(), r.name.clone()) {
                v.problem_with_hint(
                    format!("listeners[{i}].routes[{j}].rate_limit.name"),
                    format!("mesh-wide limit `{name}` is already used by route `{other}`"),
                    Some("give each route's mesh-wide limit its own `name`".into()),
                );
            }
        }
    }

    match (v.problems.is_empty(), admin_address) {
        (true, Some(admin_address)) => Ok(Config {
            admin_address,
            drain_timeout,
            access_log: raw.access_log,
            listeners,
            clusters,
            mesh,
        }),
        _ => Err(v.problems),
    }
}

/// Two bind addresses conflict when their ports match (port 0 never does) and either is the
/// wildcard of the same family or they are equal.
fn overlaps(a: SocketAddr, b: SocketAddr) -> bool {
    if a.port() == 0 || a.port() != b.port() || a.is_ipv4() != b.is_ipv4() {
        return false;
    }
    a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified()
}

/// The nearest of `candidates` to `word`, if close enough to be a likely typo.
pub fn nearest<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    candidates
        .into_iter()
        .map(|c| (strsim::damerau_levenshtein(word, c), c))
        .filter(|(d, c)| *d <= 2.max(c.len() / 3))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

#[derive(Default)]
pub(super) struct Validator {
    pub(super) problems: Vec<Problem>,
    /// The config file's folder, for relative paths.
    dir: Option<PathBuf>,
}

impl Validator {
    /// A path from the config: relative ones are taken from the config file's folder.
    pub(super) fn path(&self, p: &str) -> PathBuf {
        match &self.dir {
            Some(dir) if Path::new(p).is_relative() => dir.join(p),
            _ => PathBuf::from(p),
        }
    }

    pub(super) fn problem(&mut self, path: String, message: String) {
        self.problems.push(Problem {
            path,
            message,
            hint: None,
        });
    }

    pub(super) fn problem_with_hint(
        &mut self,
        path: String,
        message: String,
        hint: Option<String>,
    ) {
        self.problems.push(Problem {
            path,
            message,
            hint,
        });
    }

    fn limits(&mut self, path: &str, l: &RawListener) -> Limits {
        let d = Limits::default();
        let mut at_least = |field: &str, value: Option<u32>, min: u32, default: u32| match value {
            Some(v) if v < min => {
                self.problem(
                    format!("{path}.{field}"),
                    format!("`{field}` must be at least {min}"),
                );
                default
            }
            Some(v) => v,
            None => default,
        };
        Limits {
            max_connections: at_least("max_connections", l.max_connections, 1, d.max_connections),
            max_header_bytes: at_least(
                "max_header_bytes",
                l.max_header_bytes,
                8192,
                d.max_header_bytes,
            ),
            max_headers: at_least("max_headers", l.max_headers, 1, d.max_headers),
            h2_max_concurrent_streams: at_least(
                "http2_max_concurrent_streams",
                l.http2_max_concurrent_streams,
                1,
                d.h2_max_concurrent_streams,
            ),
            h2_max_pending_resets: at_least(
                "http2_max_pending_resets",
                l.http2_max_pending_resets,
                1,
                d.h2_max_pending_resets,
            ),
        }
    }

    fn socket_addr(&mut self, path: &str, text: &str) -> Option<SocketAddr> {
        match text.parse() {
            Ok(a) => Some(a),
            Err(_) => {
                self.problem_with_hint(
                    path.to_owned(),
                    format!("invalid socket address `{text}`"),
                    Some("write an IP and a port, e.g. `127.0.0.1:8080` or `[::1]:8080`".into()),
                );
                None
            }
        }
    }

    pub(super) fn duration(&mut self, path: &str, text: Option<&str>) -> Option<Duration> {
        let text = text?;
        match humantime::parse_duration(text) {
            // Far beyond any useful setting, and small enough that clock arithmetic never
            // overflows.
            Ok(d) if d > MAX_DURATION => {
                self.problem(
                    path.to_owned(),
                    format!("duration `{text}` is longer than the limit of 365 days"),
                );
                None
            }
            Ok(d) => Some(d),
            Err(e) => {
                self.problem_with_hint(
                    path.to_owned(),
                    format!("invalid duration `{text}`: {e}"),
                    Some("write a number and a unit, e.g. `250ms`, `2s` or `1m`".into()),
                );
                None
            }
        }
    }

    fn partition(
        &mut self,
        path: &str,
        p: Option<&RawPartition>,
        clusters: &[&str],
    ) -> (Option<PartitionConfig>, Vec<(String, u32)>) {
        let Some(p) = p else {
            return (None, Vec::new());
        };
        let ppath = format!("{path}.partition");
        let key = self.hash_on(&format!("{ppath}.key"), &p.key);
        let (mode, names): (PartitionMode, Vec<String>) = match (&p.clusters, &p.ranges) {
            (Some(cs), None) if !cs.is_empty() => (PartitionMode::Hash, cs.clone()),
            (None, Some(rs)) if !rs.is_empty() => {
                let mut bounds = Vec::with_capacity(rs.len());
                for (k, r) in rs.iter().enumerate() {
                    let last = k + 1 == rs.len();
                    match (&r.below, last) {
                        (None, false) => self.problem(
                            format!("{ppath}.ranges[{k}]"),
                            "only the last range may leave out `below`".into(),
                        ),
                        (Some(_), true) => self.problem_with_hint(
                            format!("{ppath}.ranges[{k}].below"),
                            "the last range takes the rest: it has no `below`".into(),
                            Some("remove `below`, or add a last range without it".into()),
                        ),
                        _ => {}
                    }
                    if let (Some(b), Some(Some(prev))) = (&r.below, bounds.last()) {
                        if b <= prev {
                            self.problem(
                                format!("{ppath}.ranges[{k}].below"),
                                format!("bounds must ascend: `{b}` is not above `{prev}`"),
                            );
                        }
                    }
                    bounds.push(r.below.clone());
                }
                (
                    PartitionMode::Ranges(bounds.into_iter().flatten().collect()),
                    rs.iter().map(|r| r.cluster.clone()).collect(),
                )
            }
            _ => {
                self.problem(
                    ppath.clone(),
                    "give a non-empty `clusters` (hash) or `ranges`, not both".into(),
                );
                (PartitionMode::Hash, Vec::new())
            }
        };
        for (k, name) in names.iter().enumerate() {
            let field = if matches!(mode, PartitionMode::Hash) {
                format!("{ppath}.clusters[{k}]")
            } else {
                format!("{ppath}.ranges[{k}].cluster")
            };
            self.cluster_ref(field, name, clusters);
        }
        let targets = names.into_iter().map(|n| (n, 1)).collect();
        (key.map(|key| PartitionConfig { key, mode }), targets)
    }

    /// A duration where `0s` means "off", with a default when absent.
    fn optional_timeout(
        &mut self,
        path: &str,
        text: Option<&str>,
        default: Duration,
    ) -> Option<Duration> {
        match self.duration(path, text) {
            Some(d) if d.is_zero() => None,
            Some(d) => Some(d),
            None => Some(default),
        }
    }

    fn regex(&mut self, path: String, pattern: &str) -> Option<Regex> {
        match Regex::new(&format!("^(?:{pattern})$")) {
            Ok(r) => Some(r),
            Err(e) => {
                let detail = e.to_string();
                let last = detail.lines().last().unwrap_or_default().trim();
                let last = last.strip_prefix("error: ").unwrap_or(last);
                self.problem(path, format!("invalid regex `{pattern}`: {last}"));
                None
            }
        }
    }

    fn cluster_ref(&mut self, path: String, name: &str, known: &[&str]) -> bool {
        if known.contains(&name) {
            return true;
        }
        let hint = nearest(name, known.iter().copied()).map(|n| format!("did you mean `{n}`?"));
        self.problem_with_hint(path, format!("unknown cluster `{name}`"), hint);
        false
    }

    fn cluster(&mut self, path: &str, c: &RawCluster) -> Option<ClusterConfig> {
        let before = self.problems.len();
        if c.name.is_empty() {
            self.problem(format!("{path}.name"), "cluster name is empty".into());
        }
        let upstream = self.upstream(
            path,
            &c.endpoints,
            c.dns.as_ref(),
            c.registry.as_ref(),
            c.load_balancer.as_deref(),
            c.hash_on.as_deref(),
            c.health_check.as_ref(),
            c.outlier_detection.as_ref(),
            c.panic_threshold,
            c.pool.as_ref(),
        );
        let connect_timeout = self
            .duration(
                &format!("{path}.connect_timeout"),
                c.connect_timeout.as_deref(),
            )
            .unwrap_or(DEFAULT_CONNECT_TIMEOUT);
        if connect_timeout.is_zero() {
            self.problem(
                format!("{path}.connect_timeout"),
                "connect_timeout must be greater than 0".into(),
            );
        }
        let budget = self.budget(path, c.retry_budget.as_ref());
        let breaker = self.breaker(path, c.circuit_breaker.as_ref());
        let bulkhead = self.bulkhead(path, &c.bulkhead.clone().unwrap_or_default());
        let tls = c
            .tls
            .as_ref()
            .and_then(|t| self.client_tls(&format!("{path}.tls"), t));
        (self.problems.len() == before).then(|| ClusterConfig {
            name: c.name.clone(),
            upstream,
            connect_timeout,
            protocol: c.protocol,
            budget,
            breaker,
            bulkhead,
            tls,
        })
    }

    fn listener_kind<'a>(
        &mut self,
        path: &str,
        l: &'a RawListener,
        clusters: &[&str],
        route_names: &mut HashSet<&'a str>,
    ) -> Option<ListenerKind> {
        match l.protocol {
            ListenerProtocol::Tcp => {
                if !l.routes.is_empty() {
                    self.problem_with_hint(
                        format!("{path}.routes"),
                        "a tcp listener has no routes".into(),
                        Some("use `cluster:` to name where connections go".into()),
                    );
                }
                let Some(cluster) = &l.cluster else {
                    self.problem_with_hint(
                        path.to_owned(),
                        format!("tcp listener `{}` needs a `cluster`", l.name),
                        None,
                    );
                    return None;
                };
                self.cluster_ref(format!("{path}.cluster"), cluster, clusters)
                    .then(|| ListenerKind::Tcp {
                        cluster: cluster.clone(),
                    })
            }
            ListenerProtocol::Http => {
                if l.cluster.is_some() {
                    self.problem_with_hint(
                        format!("{path}.cluster"),
                        "an http listener sends requests through `routes`, not `cluster`".into(),
                        Some("add a route with `cluster:` and no `match:` to catch all".into()),
                    );
                }
                let mut routes = Vec::with_capacity(l.routes.len());
                for (j, r) in l.routes.iter().enumerate() {
                    let rpath = format!("{path}.routes[{j}]");
                    if !route_names.insert(r.name.as_str()) {
                        self.problem(
                            format!("{rpath}.name"),
                            format!("duplicate route name `{}`", r.name),
                        );
                    }
                    if let Some(route) = self.route(&rpath, r, clusters) {
                        routes.push(route);
                    }
                }
                Some(ListenerKind::Http { routes })
            }
        }
    }

    fn route(&mut self, path: &str, r: &RawRoute, clusters: &[&str]) -> Option<RouteConfig> {
        let before = self.problems.len();
        let matcher = self.route_match(&format!("{path}.match"), &r.matcher);
        let mut partition = None;
        let targets = match (&r.cluster, &r.weighted_clusters) {
            (None, None) if r.partition.is_some() => {
                let (p, targets) = self.partition(path, r.partition.as_ref(), clusters);
                partition = p;
                targets
            }
            (Some(c), None) => {
                self.cluster_ref(format!("{path}.cluster"), c, clusters);
                vec![(c.clone(), 1)]
            }
            (None, Some(ws)) => {
                for (k, w) in ws.iter().enumerate() {
                    self.cluster_ref(
                        format!("{path}.weighted_clusters[{k}].cluster"),
                        &w.cluster,
                        clusters,
                    );
                }
                if ws.iter().map(|w| u64::from(w.weight)).sum::<u64>() == 0 {
                    self.problem(
                        format!("{path}.weighted_clusters"),
                        "weights sum to zero: no request could be sent anywhere".into(),
                    );
                }
                ws.iter().map(|w| (w.cluster.clone(), w.weight)).collect()
            }
            (Some(_), Some(_)) => {
                self.problem(
                    format!("{path}.weighted_clusters"),
                    "give either `cluster` or `weighted_clusters`, not both".into(),
                );
                Vec::new()
            }
            (None, None) => {
                self.problem_with_hint(
                    path.to_owned(),
                    format!("route `{}` has no destination", r.name),
                    Some("add `cluster: NAME`, `weighted_clusters:` or `partition:`".into()),
                );
                Vec::new()
            }
        };
        if r.partition.is_some() && (r.cluster.is_some() || r.weighted_clusters.is_some()) {
            self.problem(
                format!("{path}.partition"),
                "give one of `cluster`, `weighted_clusters` and `partition`".into(),
            );
        }
        let timeout = match self.duration(&format!("{path}.timeout"), r.timeout.as_deref()) {
            Some(d) if d.is_zero() => None,
            Some(d) => Some(d),
            None => Some(DEFAULT_ROUTE_TIMEOUT),
        };
        let retry = self.retry(path, r.retry.as_ref(), r.hedge.as_ref());
        if let (Some(per_try), Some(total)) = (retry.per_try_timeout, timeout) {
            if per_try > total {
                self.problem_with_hint(
                    format!("{path}.retry.per_try_timeout"),
                    format!(
                        "per_try_timeout ({}) is longer than the route timeout ({})",
                        humantime::format_duration(per_try),
                        humantime::format_duration(total)
                    ),
                    Some(
                        "the route timeout covers all tries; raise `timeout` or lower this".into(),
                    ),
                );
            }
        }
        let idle_timeout = self.optional_timeout(
            &format!("{path}.idle_timeout"),
            r.idle_timeout.as_deref(),
            DEFAULT_STREAM_IDLE_TIMEOUT,
        );
        let rate_limit = r
            .rate_limit
            .as_ref()
            .and_then(|l| self.rate_limit(path, &r.name, l));
        let bulkhead = r.bulkhead.as_ref().map(|b| self.bulkhead(path, b));
        let fault = r.fault.as_ref().map(|f| self.fault(path, f));
        let allowed_identities = r
            .allowed_identities
            .as_ref()
            .map(|ids| self.identities(&format!("{path}.allowed_identities"), ids));
        let upgrades = self.upgrades(path, r.upgrades.as_deref());
        if r.max_request_body_bytes == Some(0) {
            self.problem_with_hint(
                format!("{path}.max_request_body_bytes"),
                "0 would refuse every request with a body".into(),
                Some("leave it out for no limit".into()),
            );
        }
        (self.problems.len() == before).then(|| RouteConfig {
            name: r.name.clone(),
            matcher: matcher.unwrap_or_default(),
            targets,
            timeout,
            idle_timeout,
            partition,
            retry,
            rate_limit,
            bulkhead,
            fault,
            max_request_body: r.max_request_body_bytes,
            allowed_identities,
            upgrades,
        })
    }

    /// The protocols a route lets requests switch to: `[websocket]` by default. `h2c` is never
    /// one: the proxy speaks HTTP/2 to clients itself, and an `Upgrade: h2c` that reached an
    /// upstream would hand it a connection the proxy can no longer read.
    fn upgrades(&mut self, path: &str, raw: Option<&[String]>) -> Vec<String> {
        let Some(raw) = raw else {
            return vec!["websocket".to_owned()];
        };
        let mut out = Vec::with_capacity(raw.len());
        for (i, p) in raw.iter().enumerate() {
            let token = p.to_ascii_lowercase();
            if token == "h2c" {
                self.problem_with_hint(
                    format!("{path}.upgrades[{i}]"),
                    "`h2c` cannot be proxied as an upgrade".into(),
                    Some(
                        "clients speak HTTP/2 to the proxy directly (prior knowledge or ALPN)"
                            .into(),
                    ),
                );
            } else if token.is_empty()
                || !token
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~/".contains(&b))
            {
                self.problem(
                    format!("{path}.upgrades[{i}]"),
                    format!("`{p}` is not a protocol name (a token such as `websocket`)"),
                );
            } else {
                out.push(token);
            }
        }
        out
    }

    fn route_match(&mut self, path: &str, m: &RawMatch) -> Option<RouteMatch> {
        let before = self.problems.len();
        let path_match = match (&m.prefix, &m.exact, &m.regex) {
            (None, None, None) => PathMatch::Any,
            (Some(p), None, None) => {
                self.slash(&format!("{path}.prefix"), p);
                PathMatch::Prefix(p.clone())
            }
            (None, Some(e), None) => {
                self.slash(&format!("{path}.exact"), e);
                PathMatch::Exact(e.clone())
            }
            (None, None, Some(r)) => self
                .regex(format!("{path}.regex"), r)
                .map(PathMatch::Regex)
                .unwrap_or_default(),
            _ => {
                self.problem(
                    path.to_owned(),
                    "give at most one of `prefix`, `exact` and `regex`".into(),
                );
                PathMatch::Any
            }
        };
        let host = m.host.as_ref().map(|h| h.to_ascii_lowercase());
        let methods = m.methods.as_ref().map(|ms| {
            ms.iter()
                .enumerate()
                .filter_map(|(k, name)| {
                    let upper = name.to_ascii_uppercase();
                    let standard = [
                        "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE",
                        "PATCH",
                    ];
                    if *name != upper && standard.contains(&upper.as_str()) {
                        // Methods are case-sensitive: `get` would never match a real GET.
                        self.problem_with_hint(
                            format!("{path}.methods[{k}]"),
                            format!("method `{name}` never matches: methods are case-sensitive"),
                            Some(format!("did you mean `{upper}`?")),
                        );
                        return None;
                    }
                    match Method::from_bytes(name.as_bytes()) {
                        Ok(method) => Some(method),
                        Err(_) => {
                            self.problem(
                                format!("{path}.methods[{k}]"),
                                format!("invalid method `{name}`"),
                            );
                            None
                        }
                    }
                })
                .collect()
        });
        let headers = m
            .headers
            .iter()
            .enumerate()
            .filter_map(|(k, h)| self.header_match(&format!("{path}.headers[{k}]"), h))
            .collect();
        let identities = m
            .identities
            .as_ref()
            .map(|ids| self.identities(&format!("{path}.identities"), ids));
        (self.problems.len() == before).then_some(RouteMatch {
            path: path_match,
            host,
            methods,
            headers,
            identities,
        })
    }

    fn slash(&mut self, path: &str, value: &str) {
        if !value.starts_with('/') {
            self.problem(
                path.to_owned(),
                format!("path `{value}` must start with `/`"),
            );
        }
    }

    fn header_match(&mut self, path: &str, h: &RawHeaderMatch) -> Option<HeaderMatch> {
        let name = match HeaderName::from_bytes(h.name.as_bytes()) {
            Ok(n) => Some(n),
            Err(_) => {
                self.problem(
                    format!("{path}.name"),
                    format!("invalid header name `{}`", h.name),
                );
                None
            }
        };
        let value = match (&h.exact, &h.regex, h.present) {
            (Some(e), None, None) => Some(HeaderValueMatch::Exact(e.clone())),
            (None, Some(r), None) => self
                .regex(format!("{path}.regex"), r)
                .map(HeaderValueMatch::Regex),
            (None, None, Some(p)) => Some(HeaderValueMatch::Present(p)),
            _ => {
                self.problem(
                    path.to_owned(),
                    "give exactly one of `exact`, `regex` and `present`".into(),
                );
                None
            }
        };
        Some(HeaderMatch {
            name: name?,
            value: value?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlap_rules() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert!(overlaps(a("0.0.0.0:80"), a("127.0.0.1:80")));
        assert!(overlaps(a("127.0.0.1:80"), a("127.0.0.1:80")));
        assert!(!overlaps(a("127.0.0.1:80"), a("127.0.0.2:80")));
        assert!(!overlaps(a("127.0.0.1:0"), a("127.0.0.1:0")));
        assert!(!overlaps(a("[::]:80"), a("127.0.0.1:80")));
    }

    #[test]
    fn nearest_suggests_close_names_only() {
        assert_eq!(nearest("timout", ["timeout", "name"]), Some("timeout"));
        assert_eq!(nearest("backend", ["api", "web"]), None);
    }
}
