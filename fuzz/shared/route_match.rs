//! The route-matching fuzz target's code, shared with `tests/fuzz_regressions.rs` so that a
//! replayed input runs exactly what the fuzzer ran.
//!
//! An input is lines: the method, the request target, the client's TLS identity (none when the
//! input has no third line), then `name:value` headers. Lines that do not make a valid method, URI or header are
//! left out of the request, as a client library would refuse them.

use std::sync::OnceLock;

use outrigger::control::config;
use outrigger::proxy::router::RouteTable;
use outrigger::rng::Rng;
use outrigger::telemetry::metrics::Metrics;

/// The table every input is matched against: one route of each kind of match, then a catch-all.
pub const CONFIG: &str = include_str!("../seeds/route_table.yaml");

/// The compiled table, built once.
pub fn table() -> &'static RouteTable {
    static TABLE: OnceLock<RouteTable> = OnceLock::new();
    TABLE.get_or_init(|| {
        let loaded = config::parse("routes.yaml", CONFIG).expect("valid fuzz config");
        let metrics = Metrics::new().expect("metrics");
        let clusters = loaded
            .config
            .clusters
            .iter()
            .map(|c| {
                let cluster = outrigger::proxy::cluster::Cluster::offline(c.clone(), &metrics);
                (c.name.clone(), cluster.expect("cluster"))
            })
            .collect();
        let config::ListenerKind::Http { routes } = &loaded.config.listeners[0].kind else {
            panic!("http listener expected")
        };
        RouteTable::build(
            "fuzz",
            routes,
            &clusters,
            None,
            None,
            &metrics,
            &Rng::with_seed(1),
            None,
        )
        .expect("table")
    })
}

/// The request and client identities an input describes, or `None` if no request can be built.
pub fn request(data: &[u8]) -> Option<(http::Request<()>, Vec<String>)> {
    let mut fields = data.split(|b| *b == b'\n');
    let method = fields.next().unwrap_or_default();
    let target = fields.next().unwrap_or_default();
    let mut req = http::Request::builder();
    if let Ok(m) = http::Method::from_bytes(method) {
        req = req.method(m);
    }
    if let Ok(uri) = http::Uri::try_from(target) {
        req = req.uri(uri);
    }
    let identity: Vec<String> = fields
        .next()
        .map(|id| vec![String::from_utf8_lossy(id).into_owned()])
        .unwrap_or_default();
    for line in fields {
        if let Some(colon) = line.iter().position(|b| *b == b':') {
            let (name, value) = (&line[..colon], &line[colon + 1..]);
            if let (Ok(n), Ok(v)) = (
                http::HeaderName::from_bytes(name),
                http::HeaderValue::from_bytes(value),
            ) {
                req = req.header(n, v);
            }
        }
    }
    let req = req.body(()).ok()?;
    Some((req, identity))
}

/// Matches one input; returns the name of the route it reached (`None` if no request could be
/// built). Panics if a built request matches nothing: the table ends in a catch-all.
pub fn run(data: &[u8]) -> Option<String> {
    let (req, identity) = request(data)?;
    let route = table()
        .find(&req, &identity)
        .expect("the catch-all route matches every request");
    assert!(!route.name.is_empty());
    Some(route.name.to_string())
}
