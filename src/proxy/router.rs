//! Matches a request against a listener's route table.
//!
//! A table is compiled once per config version with its clusters and metric handles resolved, so
//! matching a request only compares strings: first matching route wins, in file order.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use http::{header, HeaderMap, Method, Request};

use crate::control::config::{HeaderValueMatch, PathMatch, RouteConfig, RouteMatch};
use std::net::SocketAddr;

use crate::control::config::validate::{PartitionConfig, PartitionMode};
use crate::control::mesh::allowance::Allowances;
use crate::proxy::balance::{self, Weighted};
use crate::proxy::cluster::Cluster;
use crate::proxy::resilience::load_shed::Limiter;
use crate::proxy::stack::{self, RouteShared, RouteStack};
use crate::proxy::values;
use crate::rng::Rng;
use crate::telemetry::metrics::http::NONE;
use crate::telemetry::metrics::{Metrics, RouteMetrics};
use crate::tls::{allowed, IdentityPattern};

/// A listener's compiled routes.
pub struct RouteTable {
    routes: Vec<Route>,
    index: PrefixIndex,
}

/// A byte trie over the routes' literal path prefixes (the prefix, or the exact path; empty for
/// regex and path-less routes). A lookup walks the request path once and tests only the routes
/// whose literal could match, in file order, so a table of 10,000 routes costs about as much as
/// one of ten.
struct PrefixIndex {
    nodes: Vec<Node>,
}

#[derive(Default)]
struct Node {
    /// Children by next byte, sorted.
    edges: Vec<(u8, u32)>,
    /// Routes whose literal ends here, ascending.
    routes: Vec<u32>,
}

impl PrefixIndex {
    fn build(routes: &[Route]) -> Self {
        let mut nodes = vec![Node::default()];
        for (i, r) in routes.iter().enumerate() {
            let literal = match &r.matcher.path {
                PathMatch::Prefix(p) => p.as_str(),
                PathMatch::Exact(e) => e.as_str(),
                PathMatch::Any | PathMatch::Regex(_) => "",
            };
            let mut at = 0usize;
            for b in literal.bytes() {
                at = match nodes[at].edges.binary_search_by_key(&b, |e| e.0) {
                    Ok(k) => nodes[at].edges[k].1 as usize,
                    Err(k) => {
                        let id = nodes.len();
                        nodes.push(Node::default());
                        nodes[at].edges.insert(k, (b, id as u32));
                        id
                    }
                };
            }
            nodes[at].routes.push(i as u32);
        }
        Self { nodes }
    }

    /// The first route, in file order, whose literal prefixes `path` and for which `test` holds.
    fn first(&self, path: &str, test: impl Fn(usize) -> bool) -> Option<usize> {
        let mut best: Option<usize> = None;
        let visit = |node: &Node, best: &mut Option<usize>| {
            for &i in &node.routes {
                let i = i as usize;
                if best.is_some_and(|b| b <= i) {
                    break;
                }
                if test(i) {
                    *best = Some(i);
                    break;
                }
            }
        };
        let mut at = 0usize;
        visit(&self.nodes[0], &mut best);
        for b in path.bytes() {
            let node = &self.nodes[at];
            match node.edges.binary_search_by_key(&b, |e| e.0) {
                Ok(k) => at = node.edges[k].1 as usize,
                Err(_) => break,
            }
            visit(&self.nodes[at], &mut best);
        }
        best
    }
}

/// One compiled route.
pub struct Route {
    /// Route name, as in the config.
    pub name: Arc<str>,
    matcher: RouteMatch,
    /// Where matching requests go.
    pub targets: Vec<Target>,
    picker: Weighted,
    /// Time allowed until response headers, retries included.
    pub timeout: Option<Duration>,
    /// Largest request body kept for a retry.
    pub max_retry_body: u64,
    /// Largest request body accepted.
    pub max_request_body: Option<u64>,
    /// Client identities allowed on the route; `None` allows all.
    pub allowed_identities: Option<Vec<IdentityPattern>>,
    /// Longest silence of a response stream, and of an upgraded connection.
    pub idle_timeout: Option<Duration>,
    /// Protocols an HTTP/1.1 request may switch to, lowercase.
    pub upgrades: Vec<String>,
    /// For a partitioned route: how a key picks one of `targets`.
    partition: Option<PartitionConfig>,
    /// Metrics for answers given before a cluster was chosen (refused, or no shard key),
    /// created on the first such answer: most routes never give one, and creating six series
    /// per route at compile time made a 10,000-route reload 40% slower.
    unrouted: OnceLock<RouteMetrics>,
    /// What creating `unrouted` needs, shared by the table's routes.
    families: Arc<(crate::telemetry::metrics::http::Families, Arc<str>)>,
    /// Rate limiter, route bulkhead and faults, kept across reloads while their config holds.
    shared: Arc<RouteShared>,
    /// The config `shared` was built from.
    shared_config: RouteConfig,
}

/// One destination of a route with its metric handles.
pub struct Target {
    /// The cluster.
    pub cluster: Arc<Cluster>,
    /// Metrics for (listener, route, cluster).
    pub metrics: RouteMetrics,
    /// The resilience stack in front of the cluster.
    pub stack: RouteStack,
}

/// A route referred to a cluster that is not in the compiled set; validation prevents this.
#[derive(Debug, thiserror::Error)]
#[error("route `{route}` refers to unknown cluster `{cluster}`")]
pub struct UnknownCluster {
    route: String,
    cluster: String,
}

impl UnknownCluster {
    /// The error for `route` (or listener) naming `cluster`.
    pub fn new(route: &str, cluster: &str) -> Self {
        Self {
            route: route.to_owned(),
            cluster: cluster.to_owned(),
        }
    }
}

impl RouteTable {
    /// Compiles `routes` of `listener` against the running `clusters`; mesh-wide rate limits
    /// take their share from `allowances`.
    // Each argument is a different part of the running proxy; bundling them would only rename.
    #[allow(clippy::too_many_arguments)]
    pub fn build(
        listener: &str,
        routes: &[RouteConfig],
        clusters: &HashMap<String, Arc<Cluster>>,
        shed: Option<&Arc<Limiter>>,
        previous: Option<&RouteTable>,
        metrics: &Metrics,
        rng: &Rng,
        allowances: Option<&Allowances>,
    ) -> Result<Self, UnknownCluster> {
        let families = Arc::new((metrics.http.clone(), Arc::<str>::from(listener)));
        let routes = routes
            .iter()
            .map(|r| {
                // A reload keeps a route's limiter buckets and bulkhead when they did not change.
                let kept = previous.and_then(|t| {
                    t.routes
                        .iter()
                        .find(|p| {
                            p.name.as_ref() == r.name && RouteShared::same(&p.shared_config, r)
                        })
                        .map(|p| p.shared.clone())
                });
                let shared = kept.unwrap_or_else(|| {
                    Arc::new(RouteShared::new(listener, r, metrics, rng, allowances))
                });
                let targets = r
                    .targets
                    .iter()
                    .map(|(name, _)| {
                        let cluster = clusters
                            .get(name)
                            .cloned()
                            .ok_or_else(|| UnknownCluster::new(&r.name, name))?;
                        Ok(Target {
                            metrics: metrics.http.route(listener, &r.name, name),
                            stack: stack::build(
                                listener,
                                r,
                                &shared,
                                &cluster,
                                shed.cloned(),
                                metrics,
                                rng,
                            ),
                            cluster,
                        })
                    })
                    .collect::<Result<Vec<_>, UnknownCluster>>()?;
                Ok(Route {
                    name: r.name.as_str().into(),
                    matcher: r.matcher.clone(),
                    picker: Weighted::new(r.targets.iter().map(|(_, w)| *w)),
                    targets,
                    timeout: r.timeout,
                    max_retry_body: r.retry.max_body,
                    max_request_body: r.max_request_body,
                    allowed_identities: r.allowed_identities.clone(),
                    idle_timeout: r.idle_timeout,
                    upgrades: r.upgrades.clone(),
                    partition: r.partition.clone(),
                    unrouted: OnceLock::new(),
                    families: families.clone(),
                    shared,
                    shared_config: r.clone(),
                })
            })
            .collect::<Result<Vec<_>, UnknownCluster>>()?;
        let index = PrefixIndex::build(&routes);
        Ok(Self { routes, index })
    }

    /// The first route matching `req` from a client with the verified TLS `identity` (its SANs).
    pub fn find<B>(&self, req: &Request<B>, identity: &[String]) -> Option<&Route> {
        self.find_index(req, identity)
            .and_then(|i| self.routes.get(i))
    }

    /// Where in the table [`find`](Self::find)'s route is: what a request's future keeps
    /// instead of a borrow of the table.
    pub fn find_index<B>(&self, req: &Request<B>, identity: &[String]) -> Option<usize> {
        let host = request_host(req);
        let path = req.uri().path();
        self.index.first(path, |i| {
            matches(
                &self.routes[i].matcher,
                req.method(),
                path,
                host,
                req.headers(),
                identity,
            )
        })
    }

    /// The route at `index`.
    pub fn route(&self, index: usize) -> Option<&Route> {
        self.routes.get(index)
    }

    /// Number of routes.
    pub fn len(&self) -> usize {
        self.routes.len()
    }

    /// Whether the table has no routes.
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }
}

impl Route {
    /// Whether a request may switch to `protocol` (the first token of its `Upgrade`).
    pub fn allows_upgrade(&self, protocol: &[u8]) -> bool {
        self.upgrades
            .iter()
            .any(|p| p.as_bytes().eq_ignore_ascii_case(protocol))
    }

    /// The metrics of this route's answers given before a cluster was chosen.
    pub fn unrouted(&self) -> &RouteMetrics {
        self.unrouted.get_or_init(|| {
            let (families, listener) = &*self.families;
            families.route(listener, &self.name, NONE)
        })
    }

    /// The target for the next request, following the weights.
    pub fn pick(&self) -> Option<&Target> {
        self.targets.get(self.picker.pick())
    }

    /// The target for a request: by its partition key on a partitioned route (`None` when the
    /// request has no key), by weight otherwise; with its index in [`targets`](Self::targets).
    pub fn pick_for(
        &self,
        headers: &HeaderMap,
        path: &str,
        peer: SocketAddr,
    ) -> Option<(usize, &Target)> {
        let index = match &self.partition {
            None => self.picker.pick(),
            Some(_) => self.partition_index(headers, path, peer)?,
        };
        self.targets.get(index).map(|t| (index, t))
    }

    /// The target index a partitioned route's key gives.
    fn partition_index(&self, headers: &HeaderMap, path: &str, peer: SocketAddr) -> Option<usize> {
        let p = self.partition.as_ref()?;
        balance::with_key(&p.key, headers, path, peer, |key| match &p.mode {
            PartitionMode::Hash => balance::jump_hash(balance::hash(key), self.targets.len()),
            PartitionMode::Ranges(bounds) => bounds
                .iter()
                .position(|b| key < b.as_bytes())
                .unwrap_or(bounds.len()),
        })
    }
}

/// The request's host without port: from the URI (HTTP/2, absolute form) or the Host header.
pub fn request_host<B>(req: &Request<B>) -> Option<&str> {
    if let Some(h) = req.uri().host() {
        return Some(h);
    }
    let value = values::find(req.headers(), &header::HOST)?.to_str().ok()?;
    Some(strip_port(value))
}

fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host.find(']').map_or(host, |i| &host[..=i]);
    }
    host.rsplit_once(':').map_or(host, |(h, _)| h)
}

fn matches(
    m: &RouteMatch,
    method: &Method,
    path: &str,
    host: Option<&str>,
    headers: &HeaderMap,
    identity: &[String],
) -> bool {
    if let Some(patterns) = &m.identities {
        if !allowed(patterns, identity) {
            return false;
        }
    }
    let path_ok = match &m.path {
        PathMatch::Any => true,
        PathMatch::Prefix(p) => path.starts_with(p.as_str()),
        PathMatch::Exact(e) => path == e,
        PathMatch::Regex(r) => r.is_match(path),
    };
    if !path_ok {
        return false;
    }
    if let Some(want) = &m.host {
        let Some(host) = host else { return false };
        let ok = match want.strip_prefix("*.") {
            Some(suffix) => {
                host.len() > suffix.len() + 1
                    && host.as_bytes()[host.len() - suffix.len() - 1] == b'.'
                    && host[host.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
            }
            None => host.eq_ignore_ascii_case(want),
        };
        if !ok {
            return false;
        }
    }
    if let Some(methods) = &m.methods {
        if !methods.contains(method) {
            return false;
        }
    }
    m.headers.iter().all(|h| {
        let value = headers.get(&h.name);
        match &h.value {
            HeaderValueMatch::Present(p) => value.is_some() == *p,
            HeaderValueMatch::Exact(e) => value.is_some_and(|v| v.as_bytes() == e.as_bytes()),
            HeaderValueMatch::Regex(r) => value
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| r.is_match(v)),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::config;

    fn table(yaml_routes: &str) -> (RouteTable, Metrics) {
        let text = format!(
            "listeners:\n  - name: l\n    address: 127.0.0.1:0\n    routes:\n{yaml_routes}\nclusters:\n  - name: a\n    endpoints: [127.0.0.1:1]\n  - name: b\n    endpoints: [127.0.0.1:2]\n"
        );
        let loaded = config::parse("t.yaml", &text).unwrap();
        let metrics = Metrics::new().unwrap();
        let clusters = loaded
            .config
            .clusters
            .iter()
            .map(|c| {
                (
                    c.name.clone(),
                    Cluster::offline(c.clone(), &metrics).unwrap(),
                )
            })
            .collect();
        let config::ListenerKind::Http { routes } = &loaded.config.listeners[0].kind else {
            panic!("http listener expected")
        };
        (
            RouteTable::build(
                "l",
                routes,
                &clusters,
                None,
                None,
                &metrics,
                &Rng::with_seed(1),
                None,
            )
            .unwrap(),
            metrics,
        )
    }

    fn route_of(t: &RouteTable, req: Request<()>) -> Option<String> {
        t.find(&req, &[]).map(|r| r.name.to_string())
    }

    #[test]
    fn the_prefix_index_finds_what_a_linear_scan_finds() {
        let (t, _m) = table(
            "      - { name: api-get, match: { prefix: /api, methods: [GET] }, cluster: a }
      - { name: api-users-exact, match: { exact: /api/users }, cluster: a }
      - { name: api-users, match: { prefix: /api/users/ }, cluster: b }
      - { name: host-only, match: { host: example.com }, cluster: a }
      - { name: regex, match: { regex: '/v[0-9]+/.*' }, cluster: b }
      - { name: apix, match: { prefix: /apix }, cluster: a }
      - { name: root, match: { prefix: / }, cluster: b }
      - { name: never, match: { exact: /api }, cluster: a }",
        );
        let paths = [
            "/",
            "/api",
            "/api/",
            "/api/users",
            "/api/users/7",
            "/apix/1",
            "/ap",
            "/v2/x",
            "/v/x",
            "/other",
            "/api/usersx",
        ];
        for path in paths {
            for method in [Method::GET, Method::POST] {
                for host in ["example.com", "other.org"] {
                    let req = Request::builder()
                        .method(method.clone())
                        .uri(path)
                        .header("host", host)
                        .body(())
                        .unwrap();
                    let linear = t
                        .routes
                        .iter()
                        .find(|r| {
                            matches(
                                &r.matcher,
                                req.method(),
                                path,
                                request_host(&req),
                                req.headers(),
                                &[],
                            )
                        })
                        .map(|r| r.name.to_string());
                    assert_eq!(route_of(&t, req), linear, "{method} {host}{path}");
                }
            }
        }
    }

    #[test]
    fn first_match_wins_and_conditions_combine() {
        let (t, _m) = table(
            "      - name: api-get\n        match: { prefix: /api, methods: [GET], host: '*.example.com' }\n        cluster: a\n      - name: exact\n        match: { exact: /health }\n        cluster: b\n      - name: canary\n        match: { regex: '/v[0-9]+/.*', headers: [{name: x-canary, exact: '1'}] }\n        cluster: b\n",
        );
        let req = |m: &str, uri: &str, host: &str| {
            Request::builder()
                .method(m)
                .uri(uri)
                .header("host", host)
                .body(())
                .unwrap()
        };
        assert_eq!(
            route_of(&t, req("GET", "/api/x", "svc.Example.com:80")).as_deref(),
            Some("api-get")
        );
        assert_eq!(route_of(&t, req("POST", "/api/x", "svc.example.com")), None);
        assert_eq!(route_of(&t, req("GET", "/api/x", "example.com")), None);
        assert_eq!(
            route_of(&t, req("GET", "/health", "h")).as_deref(),
            Some("exact")
        );
        assert_eq!(route_of(&t, req("GET", "/health/", "h")), None);
        let mut canary = req("GET", "/v2/users", "h");
        assert_eq!(route_of(&t, canary), None);
        canary = Request::builder()
            .uri("/v2/users")
            .header("x-canary", "1")
            .body(())
            .unwrap();
        assert_eq!(route_of(&t, canary).as_deref(), Some("canary"));
    }

    #[test]
    fn h2_authority_is_the_host() {
        let (t, _m) =
            table("      - name: r\n        match: { host: api.local }\n        cluster: a\n");
        let req = Request::builder()
            .uri("http://api.local:8080/x")
            .body(())
            .unwrap();
        assert_eq!(route_of(&t, req).as_deref(), Some("r"));
    }

    #[test]
    fn weighted_targets_split() {
        let (t, _m) = table(
            "      - name: split\n        weighted_clusters: [{cluster: a, weight: 3}, {cluster: b, weight: 1}]\n",
        );
        let route = t.find(&Request::new(()), &[]).unwrap();
        let picks: Vec<&str> = (0..8)
            .map(|_| route.pick().unwrap().cluster.name())
            .collect();
        assert_eq!(picks.iter().filter(|n| **n == "a").count(), 6);
    }
}
