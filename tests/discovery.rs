//! DNS discovery against a real DNS server (hickory-server, in process, on a loopback port):
//! record changes are followed within TTL + refresh, SRV ports and weights are used, and a cluster
//! keeps serving from its last endpoints while the DNS server is down.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::rr::rdata::{A, NS, SOA, SRV};
use hickory_proto::rr::{LowerName, Name, RData, Record, RecordSet, RecordType, RrKey};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_server::store::in_memory::InMemoryZoneHandler;
use hickory_server::zone_handler::{AxfrPolicy, Catalog, ZoneHandler, ZoneType};
use hickory_server::Server;
use support::*;
use tokio::time::Instant;

type Zone = InMemoryZoneHandler<TokioRuntimeProvider>;

fn name(s: &str) -> Name {
    Name::from_ascii(s).unwrap()
}

/// An authoritative server for `svc.test.` whose records the test rewrites.
struct Dns {
    zone: Arc<Zone>,
    server: Option<Server<Catalog>>,
    port: u16,
}

impl Dns {
    async fn start() -> Dns {
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
        let mut server = Server::new(catalog);
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
        eventually(Duration::from_secs(3), || async {
            served_by(&url).await.as_deref() == Some("first")
        })
        .await
    );

    // The record moves: within TTL (1 s) + refresh the traffic follows.
    dns.set("api.svc.test.", RecordType::A, 1, vec![a([127, 0, 0, 3])])
        .await;
    let changed = Instant::now();
    assert!(
        eventually(Duration::from_secs(4), || async {
            served_by(&url).await.as_deref() == Some("second")
        })
        .await
    );
    let followed = changed.elapsed();

    // The DNS server goes away: lookups fail, the cluster keeps its endpoints.
    dns.stop().await;
    let down = Instant::now();
    let mut served = 0;
    let mut failed = 0.0;
    // Serve until a couple of lookups have failed (each takes two 1 s query timeouts).
    while failed < 2.0 && down.elapsed() < Duration::from_secs(10) {
        assert_eq!(served_by(&url).await.as_deref(), Some("second"));
        served += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
        let m = scrape(&proxy).await;
        failed = metric(
            &m,
            "outrigger_dns_lookups_total{cluster=\"svc\",result=\"failed\"}",
        );
    }
    println!(
        "dns: A record change followed after {followed:?} (TTL 1 s); {served} requests served while DNS was down, {failed} failed lookups counted"
    );
    assert!(failed >= 1.0);
    assert!(followed < Duration::from_millis(2500), "{followed:?}");

    // And it comes back.
    dns.serve().await;
    dns.set("api.svc.test.", RecordType::A, 1, vec![a([127, 0, 0, 2])])
        .await;
    assert!(
        eventually(Duration::from_secs(5), || async {
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
    assert!(
        eventually(Duration::from_secs(3), || async {
            served_by(&url).await.is_some()
        })
        .await
    );
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
