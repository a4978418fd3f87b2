//! DNS discovery against a real DNS server (hickory-server, in process, on a loopback port):
//! record changes are followed, A and AAAA records both become endpoints, SRV ports, weights and
//! priorities are used (backups only once every record of a lower priority value is gone), a
//! cluster answers `upstream_connect` until its first answer, and it keeps serving from its last
//! endpoints while the DNS server is down. How soon a change is followed (TTL, clamping, jitter)
//! is the refresh schedule's timing, covered with paused time in src/control/discovery/dns.rs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::future::Future;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::rr::rdata::{A, AAAA, NS, SOA, SRV};
use hickory_proto::rr::{LowerName, Name, RData, Record, RecordSet, RecordType, RrKey};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_server::net::runtime::Time;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::store::in_memory::InMemoryZoneHandler;
use hickory_server::zone_handler::{AxfrPolicy, Catalog, ZoneHandler, ZoneType};
use hickory_server::Server;
use support::*;
use tokio::sync::watch;

/// A generous deadline for an event the test waits for: CI runs on a loaded 2-core machine.
const WAIT: Duration = Duration::from_secs(30);

type Zone = InMemoryZoneHandler<TokioRuntimeProvider>;

fn name(s: &str) -> Name {
    Name::from_ascii(s).unwrap()
}

/// An authoritative server for `svc.test.` whose records the test rewrites. It can hold its
/// answers until the test releases them, and counts the queries it received.
struct Dns {
    zone: Arc<Zone>,
    server: Option<Server<Gated>>,
    port: u16,
    open: watch::Sender<bool>,
    queries: Arc<AtomicUsize>,
}

impl Dns {
    async fn start() -> Dns {
        Self::start_gated(true).await
    }

    /// A server that holds every answer until [`Dns::release`].
    async fn start_held() -> Dns {
        Self::start_gated(false).await
    }

    async fn start_gated(open: bool) -> Dns {
        let origin = name("svc.test.");
        let mut zone = Zone::empty(origin.clone(), ZoneType::Primary, AxfrPolicy::Deny);
        zone.upsert_mut(
            Record::from_rdata(
                origin.clone(),
                3600,
                RData::SOA(SOA::new(
                    name("ns.svc.test."),
                    name("admin.svc.test."),
                    1,
                    3600,
                    600,
                    86400,
                    1,
                )),
            ),
            1,
        );
        zone.upsert_mut(
            Record::from_rdata(origin, 3600, RData::NS(NS(name("ns.svc.test.")))),
            1,
        );
        let mut dns = Dns {
            zone: Arc::new(zone),
            server: None,
            port: 0,
            open: watch::channel(open).0,
            queries: Arc::new(AtomicUsize::new(0)),
        };
        dns.serve().await;
        dns
    }

    async fn serve(&mut self) {
        // UDP and TCP on one port: pick a free TCP port, then take the same UDP port; retry
        // on the rare clash with another test's socket. A restart reuses the port it had.
        let mut tries = 0;
        let (udp, tcp) = loop {
            tries += 1;
            assert!(tries < 200, "no port for the DNS server");
            let tcp = match tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, self.port)).await {
                Ok(t) => t,
                Err(_) if self.port != 0 => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
                Err(e) => panic!("{e}"),
            };
            let port = tcp.local_addr().unwrap().port();
            if let Ok(udp) = tokio::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, port)).await {
                self.port = port;
                break (udp, tcp);
            }
        };
        let mut catalog = Catalog::new();
        catalog.upsert(
            self.zone.origin().clone(),
            vec![self.zone.clone() as Arc<dyn ZoneHandler>],
        );
        let mut server = Server::new(Gated {
            catalog,
            open: self.open.subscribe(),
            queries: self.queries.clone(),
        });
        server.register_socket(udp);
        server.register_listener(tcp, Duration::from_secs(5), 64);
        self.server = Some(server);
    }

    async fn stop(&mut self) {
        if let Some(mut s) = self.server.take() {
            s.shutdown_gracefully().await.unwrap();
        }
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// Lets the held answers (and all later ones) go.
    fn release(&self) {
        self.open.send_replace(true);
    }

    /// Queries received so far, answered or held.
    fn queries(&self) -> usize {
        self.queries.load(Ordering::SeqCst)
    }

    async fn set(&self, owner: &str, rtype: RecordType, ttl: u32, data: Vec<RData>) {
        let owner = name(owner);
        let key = RrKey::new(LowerName::from(&owner), rtype);
        let mut records = self.zone.records_mut().await;
        let mut set = RecordSet::with_ttl(owner, rtype, ttl);
        for d in data {
            set.add_rdata(d);
        }
        records.insert(key, Arc::new(set));
    }
}

fn a(ip: [u8; 4]) -> RData {
    RData::A(A::new(ip[0], ip[1], ip[2], ip[3]))
}

/// Binds an origin on `ip` with the given port (0: any).
async fn origin_on(ip: [u8; 4], port: u16, name: &str) -> Origin {
    let l = tokio::net::TcpListener::bind((Ipv4Addr::from(ip), port))
        .await
        .unwrap();
    Origin::serve(l, name)
}

fn config(dns: &Dns, query: &str, extra: &str) -> String {
    format!(
        "listeners:
  - name: in
    address: 127.0.0.1:0
    routes:
      - name: all
        cluster: svc
clusters:
  - name: svc
    dns: {{ {query}, resolver: \"{}\", min_refresh: 200ms, max_refresh: 10s }}
{extra}",
        dns.addr()
    )
}

async fn served_by(url: &str) -> Option<String> {
    let (status, headers, _) = get(&h1_client(), url).await.ok()?;
    (status == 200).then(|| headers["x-origin"].to_str().unwrap().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_records_are_followed_and_kept_while_dns_is_down() {
    let mut dns = Dns::start().await;
    let first = origin_on([127, 0, 0, 2], 0, "first").await;
    let port = first.addr.port();
    let second = origin_on([127, 0, 0, 3], port, "second").await;
    dns.set("api.svc.test.", RecordType::A, 1, vec![a([127, 0, 0, 2])])
        .await;
    let proxy = Proxy::start(&config(
        &dns,
        &format!("name: api.svc.test, port: {port}"),
        "",
    ))
    .await;
    let url = proxy.url("in", "/");
    assert!(
        eventually(WAIT, || async {
            served_by(&url).await.as_deref() == Some("first")
        })
        .await
    );

    // The record moves: the next refresh (TTL 1 s) picks it up and the traffic follows.
    dns.set("api.svc.test.", RecordType::A, 1, vec![a([127, 0, 0, 3])])
        .await;
    assert!(
        eventually(WAIT, || async {
            served_by(&url).await.as_deref() == Some("second")
        })
        .await,
        "the traffic follows the record"
    );

    // The DNS server goes away: lookups fail, the cluster keeps its endpoints. Every request
    // is served from them until two failed lookups have been counted.
    dns.stop().await;
    let served = AtomicUsize::new(0);
    let failed_twice = eventually(WAIT, || async {
        assert_eq!(
            served_by(&url).await.as_deref(),
            Some("second"),
            "served from the last endpoints while DNS is down"
        );
        served.fetch_add(1, Ordering::Relaxed);
        lookups(&proxy, "failed").await >= 2.0
    })
    .await;
    let served = served.load(Ordering::Relaxed);
    println!("dns: {served} requests served while DNS was down");
    assert!(failed_twice, "failed lookups are counted");
    let m = scrape(&proxy).await;
    assert!(
        metric(
            &m,
            "outrigger_discovery_updates_total{cluster=\"svc\",result=\"failed\",source=\"dns\"}"
        ) >= 2.0,
        "and counted as failed discovery updates"
    );

    // And it comes back.
    dns.serve().await;
    dns.set("api.svc.test.", RecordType::A, 1, vec![a([127, 0, 0, 2])])
        .await;
    assert!(
        eventually(WAIT, || async {
            served_by(&url).await.as_deref() == Some("first")
        })
        .await
    );
    drop(second);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn srv_records_give_ports_weights_and_priorities() {
    let dns = Dns::start().await;
    let (heavy, light, backup) = (
        Origin::start("heavy").await,
        Origin::start("light").await,
        Origin::start("backup").await,
    );
    dns.set("web1.svc.test.", RecordType::A, 60, vec![a([127, 0, 0, 1])])
        .await;
    dns.set("web2.svc.test.", RecordType::A, 60, vec![a([127, 0, 0, 1])])
        .await;
    dns.set("web3.svc.test.", RecordType::A, 60, vec![a([127, 0, 0, 1])])
        .await;
    dns.set(
        "_http._tcp.api.svc.test.",
        RecordType::SRV,
        60,
        vec![
            RData::SRV(SRV::new(10, 3, heavy.addr.port(), name("web1.svc.test."))),
            RData::SRV(SRV::new(10, 1, light.addr.port(), name("web2.svc.test."))),
            RData::SRV(SRV::new(20, 5, backup.addr.port(), name("web3.svc.test."))),
        ],
    )
    .await;
    let proxy = Proxy::start(&config(
        &dns,
        "name: _http._tcp.api.svc.test",
        "    load_balancer: round_robin\n",
    ))
    .await;
    let url = proxy.url("in", "/");
    assert!(eventually(WAIT, || async { served_by(&url).await.is_some() }).await);
    let mut counts = std::collections::HashMap::new();
    for _ in 0..400 {
        *counts.entry(served_by(&url).await.unwrap()).or_insert(0) += 1;
    }
    println!(
        "srv: 400 requests over weights 3:1 (priority 10) and a priority-20 backup: {counts:?}"
    );
    assert_eq!(counts.get("heavy"), Some(&300));
    assert_eq!(counts.get("light"), Some(&100));
    assert_eq!(
        counts.get("backup"),
        None,
        "a higher priority value is only a backup"
    );
    let clusters = get(&h1_client(), &proxy.admin_url("/clusters"))
        .await
        .unwrap()
        .2;
    assert!(clusters.contains("\"source\": \"dns\"") || clusters.contains("\"source\":\"dns\""));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn srv_backups_serve_only_once_every_lower_priority_record_is_gone() {
    let dns = Dns::start().await;
    let (heavy, light, backup) = (
        Origin::start("heavy").await,
        Origin::start("light").await,
        Origin::start("backup").await,
    );
    for host in ["web1", "web2", "web3"] {
        dns.set(
            &format!("{host}.svc.test."),
            RecordType::A,
            1,
            vec![a([127, 0, 0, 1])],
        )
        .await;
    }
    let srv = |priority: u16, weight: u16, origin: &Origin, target: &str| {
        RData::SRV(SRV::new(
            priority,
            weight,
            origin.addr.port(),
            name(&format!("{target}.svc.test.")),
        ))
    };
    let all = vec![
        srv(10, 3, &heavy, "web1"),
        srv(10, 1, &light, "web2"),
        srv(20, 5, &backup, "web3"),
    ];
    dns.set(SRV_NAME, RecordType::SRV, 1, all.clone()).await;
    let proxy = Proxy::start(&config(
        &dns,
        "name: _http._tcp.api.svc.test",
        "    load_balancer: round_robin\n",
    ))
    .await;
    srv_step(&dns, &proxy, all.clone(), &[&heavy, &light]).await;
    // One priority-10 record left: it takes everything, the backup still nothing.
    let one_left = vec![srv(10, 1, &light, "web2"), srv(20, 5, &backup, "web3")];
    srv_step(&dns, &proxy, one_left, &[&light]).await;
    assert_eq!(
        backup.hits(),
        0,
        "the backup is idle while a primary is left"
    );
    // Every priority-10 record gone: now the backup serves.
    srv_step(&dns, &proxy, vec![srv(20, 5, &backup, "web3")], &[&backup]).await;
    // The primaries return and the backup is idle again.
    let before = backup.hits();
    srv_step(&dns, &proxy, all, &[&heavy, &light]).await;
    assert_eq!(backup.hits(), before, "no request reached the backup");
}

const SRV_NAME: &str = "_http._tcp.api.svc.test.";

/// Publishes `records` as the SRV set, waits until `/clusters` shows exactly the endpoints of
/// `expect`, then checks that 20 requests reach those origins and no other.
async fn srv_step(dns: &Dns, proxy: &Proxy, records: Vec<RData>, expect: &[&Origin]) {
    dns.set(SRV_NAME, RecordType::SRV, 1, records).await;
    let mut want: Vec<String> = expect.iter().map(|o| o.addr.to_string()).collect();
    want.sort();
    assert!(
        eventually(WAIT, || async { endpoints(proxy, "svc").await == want }).await,
        "endpoints {want:?}, have {:?}",
        endpoints(proxy, "svc").await
    );
    let url = proxy.url("in", "/");
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..20 {
        seen.insert(served_by(&url).await.expect("served"));
    }
    let mut names: Vec<String> = expect.iter().map(|o| o.name.clone()).collect();
    names.sort();
    assert_eq!(seen.into_iter().collect::<Vec<_>>(), names);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aaaa_records_become_ipv6_endpoints_next_to_a_records() {
    let dns = Dns::start().await;
    let v6 = tokio::net::TcpListener::bind((Ipv6Addr::LOCALHOST, 0))
        .await
        .expect("this test needs the IPv6 loopback address ::1");
    let v6 = Origin::serve(v6, "v6");
    let port = v6.addr.port();
    let v4 = origin_on([127, 0, 0, 2], port, "v4").await;
    dns.set(
        "v6.svc.test.",
        RecordType::AAAA,
        60,
        vec![aaaa(Ipv6Addr::LOCALHOST)],
    )
    .await;
    dns.set("dual.svc.test.", RecordType::A, 60, vec![a([127, 0, 0, 2])])
        .await;
    dns.set(
        "dual.svc.test.",
        RecordType::AAAA,
        60,
        vec![aaaa(Ipv6Addr::LOCALHOST)],
    )
    .await;
    let proxy = Proxy::start(&format!(
        "listeners:
  - name: in
    address: 127.0.0.1:0
    routes:
      - name: v6
        match: {{ prefix: /v6 }}
        cluster: v6only
      - name: dual
        cluster: dual
clusters:
  - name: v6only
    dns: {{ name: v6.svc.test, port: {port}, resolver: \"{r}\" }}
  - name: dual
    dns: {{ name: dual.svc.test, port: {port}, resolver: \"{r}\" }}
    load_balancer: round_robin
",
        r = dns.addr()
    ))
    .await;
    let v6_endpoint = format!("[::1]:{port}");
    assert!(
        eventually(WAIT, || async {
            endpoints(&proxy, "v6only").await == [v6_endpoint.clone()]
        })
        .await,
        "an AAAA record is an endpoint: {:?}",
        endpoints(&proxy, "v6only").await
    );
    for _ in 0..5 {
        assert_eq!(
            served_by(&proxy.url("in", "/v6")).await.as_deref(),
            Some("v6")
        );
    }
    // A name with both: every address is an endpoint, and round robin alternates over them.
    let mut want = vec![format!("127.0.0.2:{port}"), v6_endpoint];
    want.sort();
    assert!(
        eventually(WAIT, || async { endpoints(&proxy, "dual").await == want }).await,
        "A and AAAA addresses are both endpoints: {:?}",
        endpoints(&proxy, "dual").await
    );
    let (v4_before, v6_before) = (v4.hits(), v6.hits());
    for _ in 0..20 {
        assert!(served_by(&proxy.url("in", "/dual")).await.is_some());
    }
    assert_eq!(
        (v4.hits() - v4_before, v6.hits() - v6_before),
        (10, 10),
        "round robin over the IPv4 and the IPv6 endpoint"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn before_the_first_dns_answer_requests_get_upstream_connect() {
    let dns = Dns::start_held().await;
    let origin = origin_on([127, 0, 0, 2], 0, "first").await;
    dns.set("api.svc.test.", RecordType::A, 60, vec![a([127, 0, 0, 2])])
        .await;
    let proxy = Proxy::start(&config(
        &dns,
        &format!("name: api.svc.test, port: {}", origin.addr.port()),
        "",
    ))
    .await;
    // The proxy has asked; the server holds the answer.
    assert!(
        eventually(WAIT, || async { dns.queries() >= 1 }).await,
        "the first lookup reaches the DNS server"
    );
    let url = proxy.url("in", "/");
    let (status, headers, body) = get(&h1_client(), &url).await.unwrap();
    assert_eq!(
        (status.as_u16(), reason(&headers)),
        (503, "upstream_connect"),
        "no endpoints yet: {body}"
    );
    assert_eq!(origin.hits(), 0);
    assert_eq!(lookups(&proxy, "ok").await, 0.0, "no answer has arrived");
    assert!(endpoints(&proxy, "svc").await.is_empty());
    let m = scrape(&proxy).await;
    assert_eq!(
        metric(
            &m,
            "outrigger_local_replies_total{listener=\"in\",reason=\"upstream_connect\"}"
        ),
        1.0
    );

    dns.release();
    assert!(
        eventually(WAIT, || async {
            served_by(&url).await.as_deref() == Some("first")
        })
        .await,
        "once the answer arrives, requests reach the endpoint"
    );
    assert!(lookups(&proxy, "ok").await >= 1.0);
}

fn aaaa(ip: Ipv6Addr) -> RData {
    RData::AAAA(AAAA::from(ip))
}

/// `outrigger_dns_lookups_total` of cluster `svc` with `result`.
async fn lookups(proxy: &Proxy, result: &str) -> f64 {
    metric(
        &scrape(proxy).await,
        &format!("outrigger_dns_lookups_total{{cluster=\"svc\",result=\"{result}\"}}"),
    )
}

/// The endpoint addresses of `cluster` on `/clusters`, sorted.
async fn endpoints(proxy: &Proxy, cluster: &str) -> Vec<String> {
    let body = get(&h1_client(), &proxy.admin_url("/clusters"))
        .await
        .unwrap()
        .2;
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let c = v["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == cluster)
        .unwrap_or_else(|| panic!("no cluster {cluster}: {v}"));
    let mut list: Vec<String> = c["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            assert_eq!(e["source"], "dns", "{e}");
            e["address"].as_str().unwrap().to_owned()
        })
        .collect();
    list.sort();
    list
}

/// The catalog behind a gate: each query is counted, then waits until the gate is open.
struct Gated {
    catalog: Catalog,
    open: watch::Receiver<bool>,
    queries: Arc<AtomicUsize>,
}

// `RequestHandler` is an `async_trait`; this is its expansion, written out because the test
// crate does not depend on `async-trait`.
impl RequestHandler for Gated {
    fn handle_request<'life0, 'life1, 'async_trait, R, T>(
        &'life0 self,
        request: &'life1 Request,
        response_handle: R,
    ) -> Pin<Box<dyn Future<Output = ResponseInfo> + Send + 'async_trait>>
    where
        R: 'async_trait + ResponseHandler,
        T: 'async_trait + Time,
        'life0: 'async_trait,
        'life1: 'async_trait,
        Self: 'async_trait,
    {
        Box::pin(async move {
            self.queries.fetch_add(1, Ordering::SeqCst);
            let mut open = self.open.clone();
            let _ = open.wait_for(|open| *open).await;
            self.catalog
                .handle_request::<R, T>(request, response_handle)
                .await
        })
    }
}
