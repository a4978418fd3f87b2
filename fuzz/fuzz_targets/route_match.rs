//! Route matching on arbitrary requests (method, target, host, headers from the input) against
//! a table with every kind of match: no panic, and a match is always a real route.
#![no_main]

use std::sync::OnceLock;

use outrigger::control::config;
use outrigger::proxy::router::RouteTable;
use outrigger::rng::Rng;
use outrigger::telemetry::metrics::Metrics;

const CONFIG: &str = include_str!("../seeds/route_table.yaml");

fn table() -> &'static RouteTable {
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
        RouteTable::build("fuzz", routes, &clusters, None, None, &metrics, &Rng::with_seed(1)).expect("table")
    })
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
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
    if let Ok(req) = req.body(()) {
        if let Some(route) = table().find(&req, &identity) {
            assert!(!route.name.is_empty());
        }
    }
});
