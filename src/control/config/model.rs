//! The raw configuration document exactly as users write it in YAML.
//!
//! These structs only describe shape: every field is optional where a default exists and unknown fields
//! are rejected. Meaning (addresses, durations, references between sections) is checked in
//! [`super::validate`], which turns a [`RawConfig`] into a typed [`super::Config`].

use serde::{Deserialize, Serialize};

use super::mesh::RawMesh;
use super::resilience::{
    RawBreaker, RawBudget, RawBulkhead, RawFault, RawHedge, RawLoadShed, RawRateLimit, RawRetry,
};
use super::tls::{RawClientTls, RawServerTls};
use super::upstream::{RawDns, RawEndpoint, RawHealthCheck, RawOutlier, RawPool, RawRegistry};

/// The whole configuration file.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// The admin server (health, metrics, config, clusters).
    #[serde(default)]
    pub admin: RawAdmin,
    /// How long in-flight requests may take to finish on shutdown, e.g. `10s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain_timeout: Option<String>,
    /// Log one line per proxied request or connection.
    #[serde(default)]
    pub access_log: bool,
    /// Addresses the proxy accepts traffic on.
    #[serde(default)]
    pub listeners: Vec<RawListener>,
    /// Named groups of upstream endpoints.
    #[serde(default)]
    pub clusters: Vec<RawCluster>,
    /// This sidecar's place in the embedded Raft group, if it takes part.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh: Option<RawMesh>,
}

/// The admin server section.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    /// Socket address of the admin server; loopback by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
}

/// Which protocol a listener speaks to its clients.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ListenerProtocol {
    /// HTTP/1.1 and HTTP/2 (prior knowledge) on the same port, routed per request.
    #[default]
    Http,
    /// Raw TCP: bytes are spliced to one cluster.
    Tcp,
}

/// One listening socket.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawListener {
    /// Unique name, used in metrics and logs.
    pub name: String,
    /// Socket address to bind, e.g. `0.0.0.0:15006`.
    pub address: String,
    /// `http` (default) or `tcp`.
    #[serde(default)]
    pub protocol: ListenerProtocol,
    /// For `http` listeners: routes tried in order, first match wins.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<RawRoute>,
    /// For `tcp` listeners: the cluster connections are spliced to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    /// Idle downstream connections are closed after this long; `0s` disables.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<String>,
    /// Time a client gets to send a request's headers (HTTP/1.1), e.g. `10s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header_read_timeout: Option<String>,
    /// Adaptive concurrency limit for the listener's requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_shed: Option<RawLoadShed>,
    /// TLS termination, and client certificates for mutual TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<RawServerTls>,
    /// Connections open at once; more are closed as soon as they are accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    /// Largest request head in bytes (HTTP/1.1) or header list (HTTP/2); larger gets 431.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_header_bytes: Option<u32>,
    /// Most header lines in a request (HTTP/1.1); more gets 431.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_headers: Option<u32>,
    /// HTTP/2 streams a client may have open at once on one connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http2_max_concurrent_streams: Option<u32>,
    /// HTTP/2 streams a client may reset before the proxy accepted them (rapid-reset
    /// protection); past it the connection gets GOAWAY.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http2_max_pending_resets: Option<u32>,
    /// Whether a caller's `x-request-id` is kept (`keep`) or replaced (`replace`, for edge
    /// listeners whose callers are not trusted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<RequestIdMode>,
}

/// What an HTTP listener does with the `x-request-id` a request arrives with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RequestIdMode {
    /// Keep the caller's id; generate one only when there is none.
    #[default]
    Keep,
    /// Always generate a new id (an edge listener: callers could reuse or forge ids).
    Replace,
}

/// One HTTP route: a match and where matching requests go.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    /// Unique name, used in metrics and logs.
    pub name: String,
    /// Conditions a request must meet; an empty match takes every request.
    #[serde(default, rename = "match")]
    pub matcher: RawMatch,
    /// Send matching requests to this cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    /// Or split them between clusters by weight.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weighted_clusters: Option<Vec<RawWeightedCluster>>,
    /// Or send each to the shard cluster its key maps to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition: Option<RawPartition>,
    /// Time allowed for the whole request, retries included, until response headers; `0s` disables.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    /// Longest silence of a response stream before it is aborted; `0s` disables.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<String>,
    /// Retry policy; a default policy applies when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RawRetry>,
    /// Hedged requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hedge: Option<RawHedge>,
    /// Request rate limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RawRateLimit>,
    /// A concurrency cap for this route alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bulkhead: Option<RawBulkhead>,
    /// Injected delays and errors.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<RawFault>,
    /// Largest request body in bytes; larger gets 413.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_request_body_bytes: Option<u64>,
    /// Client identities (from their TLS certificates) allowed to use this route; others get 403.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_identities: Option<Vec<String>>,
    /// Protocols an HTTP/1.1 request may switch to (`Upgrade:`); `[websocket]` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upgrades: Option<Vec<String>>,
}

/// Request conditions of a route; all given conditions must hold.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawMatch {
    /// Path starts with this prefix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// Path equals this string exactly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exact: Option<String>,
    /// Path matches this regular expression (anchored at both ends).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regex: Option<String>,
    /// Host (without port), exact or `*.suffix`, case-insensitive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Allowed request methods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub methods: Option<Vec<String>>,
    /// Header conditions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<RawHeaderMatch>,
    /// The client's verified TLS identity is one of these (a trailing `*` matches a prefix).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identities: Option<Vec<String>>,
}

/// One header condition: exactly one of `exact`, `regex`, `present`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawHeaderMatch {
    /// Header name, case-insensitive.
    pub name: String,
    /// The value equals this string.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exact: Option<String>,
    /// The value matches this regular expression (anchored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regex: Option<String>,
    /// The header is present (`true`) or absent (`false`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub present: Option<bool>,
}

/// Partition-aware routing: a request's key picks one shard cluster.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawPartition {
    /// Where the key is: `header:NAME`, `cookie:NAME`, `source_ip` or `path`.
    pub key: String,
    /// Shards chosen by a consistent hash of the key (jump hash: adding a shard at the end moves
    /// only the keys it takes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clusters: Option<Vec<String>>,
    /// Or shards chosen by the key's range, in ascending order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ranges: Option<Vec<RawRange>>,
}

/// One range of a range-partitioned route: keys below `below` (and not below an earlier bound).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawRange {
    /// Exclusive upper bound, compared byte-wise; absent on the last range, which takes the rest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub below: Option<String>,
    /// The shard cluster.
    pub cluster: String,
}

/// One target of a weighted split.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawWeightedCluster {
    /// Cluster name.
    pub cluster: String,
    /// Relative weight; `0` sends nothing.
    pub weight: u32,
}

/// Which protocol is spoken to a cluster's endpoints.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamProtocol {
    /// HTTP/1.1 with keep-alive pooling.
    #[default]
    Http1,
    /// HTTP/2 with prior knowledge (h2c), one multiplexed connection per endpoint.
    Http2,
}

/// A named group of upstream endpoints.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawCluster {
    /// Unique name, used by routes and in metrics.
    pub name: String,
    /// Static endpoints: `host:port` or `{address, weight}`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<RawEndpoint>,
    /// Or endpoints resolved through DNS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<RawDns>,
    /// Or the instances of a service in the mesh group's registry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry: Option<RawRegistry>,
    /// `peak_ewma` (default), `round_robin`, `least_request`, `random`, `ring_hash`, `maglev`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<String>,
    /// What `ring_hash` and `maglev` hash: `header:NAME`, `cookie:NAME`, `source_ip` or `path`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash_on: Option<String>,
    /// Active health checks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<RawHealthCheck>,
    /// Passive ejection of failing endpoints (on by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<RawOutlier>,
    /// Below this percentage of available endpoints, balance over all of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub panic_threshold: Option<u32>,
    /// Connection pool settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<RawPool>,
    /// Time allowed to establish a TCP connection to an endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_timeout: Option<String>,
    /// `http1` (default) or `http2`.
    #[serde(default)]
    pub protocol: UpstreamProtocol,
    /// Circuit breaker settings (on by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circuit_breaker: Option<RawBreaker>,
    /// Concurrency cap and queue for the cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bulkhead: Option<RawBulkhead>,
    /// How many retries the cluster may receive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_budget: Option<RawBudget>,
    /// TLS to the endpoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<RawClientTls>,
}
