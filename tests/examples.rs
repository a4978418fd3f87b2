//! Each file in `examples/` runs as its comments describe, with its listeners moved to ephemeral
//! ports and its endpoint names pointed at live test servers.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod support;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use hickory_proto::rr::rdata::{A, NS, SOA, SRV};
use hickory_proto::rr::{LowerName, Name, RData, Record, RecordSet, RecordType, RrKey};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_server::store::in_memory::InMemoryZoneHandler;
use hickory_server::zone_handler::{AxfrPolicy, Catalog, ZoneHandler, ZoneType};
use hickory_server::Server;
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body_util::{BodyExt, Channel};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::*;

#[path = "support/staged.rs"]
mod staged;

/// The example's text with every `address:` on port 0 and the named endpoints replaced.
fn localize(example: &str, endpoints: &[(&str, SocketAddr)]) -> String {
    let replacements: Vec<(&str, String)> = endpoints
        .iter()
        .map(|(name, addr)| (*name, addr.to_string()))
        .collect();
    localize_text(example, &replacements)
}

/// The example's text with each `(from, to)` replaced, then every `address:` that holds a socket
/// address on port 0, but those a replacement put there (a port the test chose).
fn localize_text(example: &str, replacements: &[(&str, String)]) -> String {
    let mut text = std::fs::read_to_string(examples().join(example)).unwrap();
    for (from, to) in replacements {
        assert!(text.contains(from), "{example} names {from}");
        text = text.replace(from, to);
    }
    text.lines()
        .map(|l| match l.split_once("address: ") {
            Some((indent, value))
                if (indent.trim().is_empty() || indent.trim() == "-")
                    && socket_address(value).is_some_and(|a| {
                        !replacements.iter().any(|(_, to)| *to == a.to_string())
                    }) =>
            {
                format!("{indent}address: 127.0.0.1:0")
            }
            _ => l.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The socket address a YAML value holds, comment aside (`127.0.0.1` alone is not one).
fn socket_address(value: &str) -> Option<SocketAddr> {
    value.split('#').next()?.trim().parse().ok()
}

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples")
}

/// A generous deadline for an event a test waits for: CI runs on a loaded 2-core machine.
const WAIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_sends_flagged_requests_to_v2_and_splits_the_rest() {
    let (v1, v2) = (Origin::start("v1").await, Origin::start("v2").await);
    let proxy = Proxy::start(&localize(
        "canary.yaml",
        &[
            ("reviews-v1.internal:8080", v1.addr),
            ("reviews-v2.internal:8080", v2.addr),
        ],
    ))
    .await;
    let client = h1_client();
    let url = proxy.url("outbound", "/api/reviews/1");
    let request = |canary: bool| {
        let mut b = Request::get(&url).header("host", "reviews");
        if canary {
            b = b.header("x-canary", "1");
        }
        b.body(empty()).unwrap()
    };
    for _ in 0..5 {
        let (_, headers, _) = send(&client, request(true)).await.unwrap();
        assert_eq!(headers["x-origin"], "v2");
    }
    let mut to_v2 = 0;
    for _ in 0..100 {
        let (_, headers, _) = send(&client, request(false)).await.unwrap();
        to_v2 += usize::from(headers["x-origin"] == "v2");
    }
    assert_eq!(to_v2, 10, "90/10 split");
    let other_host = Request::get(&url)
        .header("host", "ratings")
        .body(empty())
        .unwrap();
    let (status, headers, _) = send(&client, other_host).await.unwrap();
    assert_eq!((status.as_u16(), reason(&headers)), (404, "no_route"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_example_passes_unary_calls_with_their_trailers() {
    let payments = PaymentsServer::start().await;
    let proxy = Proxy::start(&localize(
        "grpc.yaml",
        &[("payments.internal:50051", payments.addr)],
    ))
    .await;
    let url = |method: &str| proxy.url("inbound-grpc", &format!("/payments.v1.Payments/{method}"));
    let call = |method: &str, msg: &str| {
        Request::post(url(method))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(body(grpc_frame(msg.as_bytes())))
            .unwrap()
    };
    // A call that succeeds: its message and its OK status, which travels in the trailers.
    let resp = h2_client()
        .request(call("Charge", "order-7"))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/grpc");
    assert!(
        resp.headers().get("grpc-status").is_none(),
        "the status is not in the headers"
    );
    let all = resp.into_body().collect().await.unwrap();
    let trailers = all
        .trailers()
        .cloned()
        .expect("the trailers reach the client");
    assert_eq!(grpc_messages(&all.to_bytes()), ["charged order-7"]);
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(trailers["grpc-message"], "ok");
    // A call that fails: no message, and the error's status and message in the trailers.
    let resp = h2_client()
        .request(call("Refund", "order-8"))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "gRPC errors travel in a 200 response");
    let all = resp.into_body().collect().await.unwrap();
    let trailers = all
        .trailers()
        .cloned()
        .expect("the trailers reach the client");
    assert!(grpc_messages(&all.to_bytes()).is_empty());
    assert_eq!(trailers["grpc-status"], "5");
    assert_eq!(trailers["grpc-message"], "no charge order-8");
    assert_eq!(payments.calls(), ["Charge order-7", "Refund order-8"]);

    // The content-type condition keeps non-gRPC requests out.
    let not_grpc = Request::post(url("Charge")).body(empty()).unwrap();
    let (status, headers, _) = send(&h2_client(), not_grpc).await.unwrap();
    assert_eq!((status.as_u16(), reason(&headers)), (404, "no_route"));
    assert_eq!(payments.calls().len(), 2, "nothing reached the service");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_example_splices_bytes() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (echo, _task) = tcp_echo().await;
    let proxy = Proxy::start(&localize("tcp.yaml", &[("db.internal:5432", echo)])).await;
    let mut s = tokio::net::TcpStream::connect(proxy.addr("postgres"))
        .await
        .unwrap();
    s.write_all(b"SELECT 1").await.unwrap();
    s.shutdown().await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    assert_eq!(out, b"SELECT 1bye");
}

/// `examples/resilient.yaml` in front of three catalog replicas and a search service.
async fn resilient_example() -> ([Origin; 3], Origin, Proxy) {
    let replicas = [
        Origin::start("c1").await,
        Origin::start("c2").await,
        Origin::start("c3").await,
    ];
    let search = Origin::start("search").await;
    let proxy = Proxy::start(&localize(
        "resilient.yaml",
        &[
            ("catalog-1.internal:8080", replicas[0].addr),
            ("catalog-2.internal:8080", replicas[1].addr),
            ("catalog-3.internal:8080", replicas[2].addr),
            ("search.internal:8080", search.addr),
        ],
    ))
    .await;
    (replicas, search, proxy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resilient_example_hides_a_failing_replica_and_limits_search() {
    let (replicas, _search, proxy) = resilient_example().await;
    replicas[1].control.set_status(503);
    let client = h1_client();
    for i in 0..60 {
        let (status, _, _) = get(
            &client,
            &proxy.url("outbound", &format!("/catalog/items/{i}")),
        )
        .await
        .unwrap();
        assert_eq!(status.as_u16(), 200, "request {i}");
    }
    // Sixty at once against a burst of 20: most are refused whatever the machine's speed.
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..60 {
        let (client, url) = (client.clone(), proxy.url("outbound", "/search?q=boat"));
        tasks.spawn(async move { get(&client, &url).await.unwrap() });
    }
    let mut limited = None;
    while let Some(r) = tasks.join_next().await {
        let (status, headers, _) = r.unwrap();
        if status.as_u16() == 429 {
            limited = Some(headers);
        }
    }
    let headers = limited.expect("the burst of 20 runs out");
    assert_eq!(reason(&headers), "rate_limited");
    assert!(headers.contains_key("retry-after"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sharded_example_pins_tenants_and_sessions() {
    let shards = [
        Origin::start("orders-0").await,
        Origin::start("orders-1").await,
        Origin::start("orders-2").await,
    ];
    let web = [
        Origin::start("web-1").await,
        Origin::start("web-2").await,
        Origin::start("web-3").await,
    ];
    let proxy = Proxy::start(&localize(
        "sharded.yaml",
        &[
            ("orders-0.internal:8080", shards[0].addr),
            ("orders-1.internal:8080", shards[1].addr),
            ("orders-2.internal:8080", shards[2].addr),
            ("web-1.internal:8080", web[0].addr),
            ("web-2.internal:8080", web[1].addr),
            ("web-3.internal:8080", web[2].addr),
        ],
    ))
    .await;
    let client = h1_client();
    let served = |header: &'static str, value: String, path: &'static str| {
        let (client, url) = (client.clone(), proxy.url("outbound", path));
        async move {
            let req = Request::get(url)
                .header(header, value)
                .body(empty())
                .unwrap();
            let (status, headers, _) = send(&client, req).await.unwrap();
            assert_eq!(status.as_u16(), 200);
            headers["x-origin"].to_str().unwrap().to_owned()
        }
    };
    for tenant in ["acme", "globex", "initech", "umbrella"] {
        let first = served("x-tenant", tenant.into(), "/orders/1").await;
        assert!(first.starts_with("orders-"));
        for _ in 0..3 {
            assert_eq!(served("x-tenant", tenant.into(), "/orders/2").await, first);
        }
    }
    for s in 0..10 {
        let cookie = format!("session=s{s}");
        let first = served("cookie", cookie.clone(), "/app/cart").await;
        assert!(first.starts_with("web-"));
        assert_eq!(served("cookie", cookie, "/app/cart").await, first);
    }
}

/// A request to `url` with a Host header: status, headers and body.
async fn get_host(url: &str, host: &str) -> (http::StatusCode, HeaderMap, String) {
    let req = Request::get(url)
        .header("host", host)
        .body(empty())
        .unwrap();
    send(&h1_client(), req).await.unwrap()
}

/// The `x-origin` of a 200 answer, or `None`.
fn served_by((status, headers, _): &(http::StatusCode, HeaderMap, String)) -> Option<String> {
    (*status == 200).then(|| headers["x-origin"].to_str().unwrap().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quickstart_serves_inbound_and_routes_outbound_by_host() {
    let (app, users) = (Origin::start("app").await, Origin::start("users").await);
    let proxy = Proxy::start(&localize(
        "quickstart.yaml",
        &[
            ("127.0.0.1:8080", app.addr),
            ("users.internal:8080", users.addr),
        ],
    ))
    .await;
    // Inbound: whatever the Host, the application beside the sidecar answers.
    let (status, _, body) = get_host(&proxy.url("inbound", "/"), "orders").await;
    assert_eq!((status.as_u16(), body.as_str()), (200, "app GET /"));
    // Outbound: the Host picks the service.
    let (status, _, body) = get_host(&proxy.url("outbound", "/users/7"), "users").await;
    assert_eq!(
        (status.as_u16(), body.as_str()),
        (200, "users GET /users/7")
    );
    // A Host no route names: 404 no_route, and nothing reached either service.
    let (status, headers, _) = get_host(&proxy.url("outbound", "/users/7"), "billing").await;
    assert_eq!((status.as_u16(), reason(&headers)), (404, "no_route"));
    assert_eq!((app.hits(), users.hits()), (1, 1));
}

/// The catalog replicas fail one request in five: retries on another replica hide it. A hung
/// try is cut off after 300 ms and retried. When catalog fails everything, the breaker opens
/// and answers `circuit_open` at once, sending catalog nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resilient_example_retries_a_flaky_catalog_and_opens_its_breaker_when_it_is_down() {
    use std::sync::atomic::Ordering;
    let (replicas, _search, proxy) = resilient_example().await;
    let client = h1_client();
    let catalog = |i: usize| proxy.url("outbound", &format!("/catalog/items/{i}"));
    let series = |name: &str| {
        format!("{name}{{cluster=\"catalog\",listener=\"outbound\",route=\"catalog\"}}")
    };
    let attempts = "outrigger_upstream_attempts_total{cluster=\"catalog\"}";

    // Flaky: a request fails only if its three tries all do (1 in 125).
    for r in &replicas {
        r.control.fail_permille.store(200, Ordering::SeqCst);
    }
    let mut ok = 0;
    for i in 0..100 {
        let (status, _, _) = get(&client, &catalog(i)).await.unwrap();
        ok += usize::from(status == 200);
    }
    let m = scrape(&proxy).await;
    let retried = metric(&m, &series("outrigger_retries_total"))
        + metric(&m, &series("outrigger_hedges_total"));
    println!("flaky catalog: {ok} of 100 answered 200 with {retried} retries and hedges");
    assert!(ok >= 95, "only {ok} of 100 answered 200");
    assert!(retried >= 5.0, "the failures were retried: {retried}");

    // Hung: every try is cut off after 300 ms and retried, three tries in all, within the 2 s.
    for r in &replicas {
        r.control.fail_permille.store(0, Ordering::SeqCst);
        r.control.set_delay(1000);
    }
    let before = metric(&scrape(&proxy).await, attempts);
    let (status, headers, _) = get(&client, &catalog(0)).await.unwrap();
    assert_eq!((status.as_u16(), reason(&headers)), (504, "timeout"));
    assert_eq!(metric(&scrape(&proxy).await, attempts) - before, 3.0);

    // Down: every try fails until half of the window's tries have; then the breaker opens.
    for r in &replicas {
        r.control.set_delay(0);
        r.control.set_status(503);
    }
    let mut open = None;
    for i in 0..300 {
        let (status, headers, _) = get(&client, &catalog(i)).await.unwrap();
        assert_eq!(status, 503, "request {i}");
        if reason(&headers) == "circuit_open" {
            open = Some(i);
            break;
        }
    }
    let opened_after = open.expect("the breaker never opened");
    println!("catalog down: the breaker opened at request {opened_after}");
    let m = scrape(&proxy).await;
    assert_eq!(
        metric(
            &m,
            "outrigger_circuit_state{cluster=\"catalog\",state=\"open\"}"
        ),
        1.0
    );
    // While it is open, callers get their answer at once and catalog gets nothing.
    let before = metric(&m, attempts);
    for i in 0..10 {
        let (status, headers, _) = get(&client, &catalog(i)).await.unwrap();
        assert_eq!((status.as_u16(), reason(&headers)), (503, "circuit_open"));
    }
    assert_eq!(metric(&scrape(&proxy).await, attempts), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_cqrs_sends_reads_and_writes_of_one_path_to_their_sides() {
    let read = [Origin::start("read-1").await, Origin::start("read-2").await];
    let write = Origin::start("write").await;
    let proxy = Proxy::start(&localize(
        "gateway-cqrs.yaml",
        &[
            ("orders-read-1.internal:8080", read[0].addr),
            ("orders-read-2.internal:8080", read[1].addr),
            ("orders-write.internal:8080", write.addr),
        ],
    ))
    .await;
    let client = h1_client();
    let call = |method: &str| {
        let req = Request::builder()
            .method(method)
            .uri(proxy.url("gateway", "/orders/42"))
            .body(empty())
            .unwrap();
        send(&client, req)
    };
    for method in ["GET", "HEAD", "GET", "HEAD"] {
        let (status, headers, _) = call(method).await.unwrap();
        assert_eq!(status, 200, "{method}");
        let side = headers["x-origin"].to_str().unwrap();
        assert!(side.starts_with("read-"), "{method} went to {side}");
    }
    for method in ["POST", "PUT", "PATCH", "DELETE"] {
        let (status, headers, body) = call(method).await.unwrap();
        assert_eq!(status, 200, "{method}");
        assert_eq!(headers["x-origin"], "write", "{method}");
        assert_eq!(body, format!("write {method} /orders/42"));
    }
    assert_eq!(read[0].hits() + read[1].hits(), 4);
    assert_eq!(write.hits(), 4);
    // A method neither side takes.
    let (status, headers, _) = call("OPTIONS").await.unwrap();
    assert_eq!((status.as_u16(), reason(&headers)), (404, "no_route"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_srv_example_spreads_by_weight_and_falls_back_to_the_backup() {
    let dns = Dns::start().await;
    let replicas = [
        Origin::start("search-1").await,
        Origin::start("search-2").await,
        Origin::start("search-backup").await,
    ];
    for r in &replicas {
        let host = format!("{}.example.internal.", r.name);
        dns.set(&host, RecordType::A, vec![RData::A(A::new(127, 0, 0, 1))])
            .await;
    }
    let srv = |priority: u16, weight: u16, r: &Origin| {
        let target = dns_name(&format!("{}.example.internal.", r.name));
        RData::SRV(SRV::new(priority, weight, r.addr.port(), target))
    };
    let [heavy, light, backup] = &replicas;
    let all = vec![srv(10, 3, heavy), srv(10, 1, light), srv(20, 1, backup)];
    dns.set(SRV_NAME, RecordType::SRV, all).await;
    let proxy = Proxy::start(&localize("dns-srv.yaml", &[("10.0.0.2:53", dns.addr)])).await;
    let url = proxy.url("outbound", "/search?q=boat");
    assert!(
        eventually(WAIT, || async {
            served_by(&get_host(&url, "search").await).is_some()
        })
        .await,
        "the SRV records never gave an endpoint"
    );
    // Weights 3 and 1 between the priority-10 records; the priority-20 one is a backup.
    let mut counts = std::collections::BTreeMap::new();
    for _ in 0..40 {
        let by = served_by(&get_host(&url, "search").await).expect("served");
        *counts.entry(by).or_insert(0) += 1;
    }
    println!("dns-srv: 40 requests over weights 3:1 and a backup: {counts:?}");
    assert_eq!(
        counts.into_iter().collect::<Vec<_>>(),
        [("search-1".to_owned(), 30), ("search-2".to_owned(), 10)]
    );
    assert_eq!(backup.hits(), 0);
    // Every priority-10 record gone: the backup takes the traffic.
    dns.set(SRV_NAME, RecordType::SRV, vec![srv(20, 1, backup)])
        .await;
    assert!(
        eventually(WAIT, || async {
            served_by(&get_host(&url, "search").await).as_deref() == Some("search-backup")
        })
        .await,
        "the backup never got traffic"
    );
    let before = heavy.hits() + light.hits();
    for _ in 0..10 {
        let by = served_by(&get_host(&url, "search").await);
        assert_eq!(by.as_deref(), Some("search-backup"));
    }
    assert_eq!(heavy.hits() + light.hits(), before);
}

const SRV_NAME: &str = "_http._tcp.search.example.internal.";

/// Mutual TLS between two sidecars, both run on the example (each uses its own half): web's
/// outbound listener → TLS with web's certificate → payments' inbound listener → the app.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_example_carries_a_request_between_two_sidecars_and_refuses_strangers() {
    let app = Origin::start("payments-app").await;
    // The certificates the example's script makes, beside both sidecars' configs.
    let dir = tempfile::tempdir().unwrap();
    staged::make_pki(
        &examples().join("mtls-pki.sh"),
        &dir.path().join("mtls-pki"),
    );
    let payments = start_beside(
        dir.path(),
        "payments.yaml",
        &localize("mtls.yaml", &[("127.0.0.1:8080", app.addr)]),
    )
    .await;
    let inbound = payments.listener_addr("inbound").unwrap();
    let web = start_beside(
        dir.path(),
        "web.yaml",
        &localize("mtls.yaml", &[("127.0.0.1:15443", inbound)]),
    )
    .await;
    let outbound = web.listener_addr("outbound").unwrap();

    let (status, _, body) = get_host(&format!("http://{outbound}/charges"), "payments").await;
    assert_eq!(
        (status.as_u16(), body.as_str()),
        (200, "payments-app GET /charges")
    );
    // The application learns who called, from the verified certificate.
    assert_eq!(
        app.control
            .last_header("x-forwarded-client-cert")
            .as_deref(),
        Some("URI=spiffe://example.org/ns/shop/sa/web")
    );

    // Straight to the inbound listener, as the example's last command: no client certificate,
    // refused. A certificate of the mesh CA with an identity not allowed: refused too.
    let pki = dir.path().join("mtls-pki");
    let curl = |args: Vec<String>| async move {
        tokio::process::Command::new("curl")
            .args(["-sS", "-k", "--max-time", "30"])
            .args(args)
            .arg(format!("https://{inbound}/"))
            .output()
            .await
            .expect("curl is installed")
            .status
            .success()
    };
    assert!(!curl(vec![]).await, "no client certificate must be refused");
    let as_payments = vec![
        "--cert".to_owned(),
        pki.join("payments.crt").display().to_string(),
        "--key".to_owned(),
        pki.join("payments.key").display().to_string(),
    ];
    assert!(
        !curl(as_payments).await,
        "an identity not allowed must be refused"
    );
    let handshakes = |result: &str| {
        let result = result.to_owned();
        let admin = payments.admin_addr();
        async move {
            let text = get(&h1_client(), &format!("http://{admin}/metrics"))
                .await
                .unwrap()
                .2;
            metric(
                &text,
                &format!(
                    "outrigger_tls_handshakes_total{{listener=\"inbound\",result=\"{result}\"}}"
                ),
            )
        }
    };
    assert!(eventually(WAIT, || async { handshakes("no_client_cert").await == 1.0 }).await);
    assert!(
        eventually(WAIT, || async {
            handshakes("identity_denied").await == 1.0
        })
        .await
    );
    assert_eq!(app.hits(), 1, "only web's request reached the application");
}

/// Starts the proxy on `yaml` written as `dir/name`, beside the files it names.
async fn start_beside(dir: &Path, name: &str, yaml: &str) -> outrigger::app::App {
    let path = dir.join(name);
    std::fs::write(&path, with_test_admin(yaml)).unwrap();
    let loaded = outrigger::control::config::load_file(&path)
        .unwrap_or_else(|e| panic!("{name} is invalid:\n{e}"));
    outrigger::app::App::start(loaded, Some(path))
        .await
        .unwrap()
}

/// The example, a single voter, with its mesh port on one the test chose and its store in
/// `data`, and `more` replaced; returns it with the mesh address.
fn mesh_member(example: &str, data: &Path, more: &[(&str, String)]) -> (String, SocketAddr) {
    let mesh = SocketAddr::from((Ipv4Addr::LOCALHOST, ReservedPort::for_the_run("127.0.0.1")));
    let store = format!(
        "/tmp/outrigger-example-{}",
        example.trim_end_matches(".yaml")
    );
    let mut all = more.to_vec();
    all.push(("127.0.0.1:7946", mesh.to_string()));
    all.push((&store, data.display().to_string()));
    (localize_text(example, &all), mesh)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_example_registers_its_app_and_routes_to_registered_instances() {
    let (orders, inventory) = (
        Origin::start("orders").await,
        Origin::start("inventory").await,
    );
    let data = tempfile::tempdir().unwrap();
    // The inbound port is the one registered: the test picks it.
    let inbound = ReservedPort::for_the_run("127.0.0.1");
    let (config, mesh) = mesh_member(
        "registry.yaml",
        data.path(),
        &[
            ("127.0.0.1:8080", orders.addr.to_string()),
            ("127.0.0.1:15006", format!("127.0.0.1:{inbound}")),
            ("port: 15006", format!("port: {inbound}")),
        ],
    );
    let proxy = Proxy::start(&config).await;

    // The application is registered at the inbound listener once its check passed through it,
    // and a caller that reads the registry reaches it there.
    let at = format!("127.0.0.1:{inbound}");
    assert!(
        eventually(WAIT, || async {
            instances(&proxy, "orders").await.contains(&at)
        })
        .await,
        "orders was never registered at {at}"
    );
    let (status, _, text) = get(&h1_client(), &format!("http://{at}/orders/1"))
        .await
        .unwrap();
    assert_eq!(
        (status.as_u16(), text.as_str()),
        (200, "orders GET /orders/1")
    );

    // No instance of inventory yet: nowhere to send its calls.
    let url = proxy.url("outbound", "/stock/7");
    let (status, _, _) = get_host(&url, "inventory").await;
    assert!(status.is_server_error(), "{status}");
    assert_eq!(inventory.hits(), 0);
    // An instance registers (as the example's curl does): its calls reach it.
    let registration = format!(
        r#"{{"service":"inventory","id":"inventory-1","address":"127.0.0.1","port":{},"ttl_ms":60000}}"#,
        inventory.addr.port()
    );
    let register = || async {
        let req = Request::post(format!("http://{mesh}/v1/registry/register"))
            .body(body(registration.clone()))
            .unwrap();
        matches!(send(&h2_client(), req).await, Ok((s, _, _)) if s == 200)
    };
    assert!(
        eventually(WAIT, register).await,
        "the registration was refused"
    );
    assert!(
        eventually(WAIT, || async {
            served_by(&get_host(&url, "inventory").await).as_deref() == Some("inventory")
        })
        .await,
        "the registry cluster never routed to the registered instance"
    );
    let (_, _, text) = get_host(&url, "inventory").await;
    assert_eq!(text, "inventory GET /stock/7");
}

/// The `address:port` of every instance of `service` in the registry the member holds.
async fn instances(proxy: &Proxy, service: &str) -> Vec<String> {
    let Ok((_, _, text)) = get(&h1_client(), &proxy.admin_url("/registry")).await else {
        return Vec::new();
    };
    let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    v["services"][service]["instances"]
        .as_array()
        .map(|list| {
            list.iter()
                .map(|i| format!("{}:{}", i["address"].as_str().unwrap_or("?"), i["port"]))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_rate_limit_example_admits_its_rate_and_refuses_the_excess() {
    let app = Origin::start("app").await;
    let data = tempfile::tempdir().unwrap();
    let (config, _) = mesh_member(
        "mesh-rate-limit.yaml",
        data.path(),
        &[("127.0.0.1:8080", app.addr.to_string())],
    );
    let proxy = Proxy::start(&config).await;
    // The group granted the sidecar, alone in it, the whole 20/s: it enforces a leased share,
    // not its `on_partition` fallback.
    let granted = eventually(WAIT, || async {
        let m = scrape(&proxy).await;
        let share = metric(&m, "outrigger_mesh_rate_limit_share{limit=\"checkout\"}");
        let fallback = metric(&m, "outrigger_mesh_rate_limit_fallback{limit=\"checkout\"}");
        (share - 20.0).abs() < 0.01 && fallback == 0.0
    })
    .await;
    assert!(granted, "no mesh share: {}", scrape(&proxy).await);

    // Sixty requests at once against 20/s (burst 20): about 20 pass, the rest get 429.
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..60 {
        let url = proxy.url("inbound", "/checkout");
        tasks.spawn(async move { get(&h1_client(), &url).await.unwrap() });
    }
    let (mut admitted, mut refused) = (0, 0);
    while let Some(r) = tasks.join_next().await {
        let (status, headers, _) = r.unwrap();
        match status.as_u16() {
            200 => {
                admitted += 1;
                assert_eq!(headers["ratelimit-limit"], "20");
            }
            429 => {
                refused += 1;
                assert_eq!(reason(&headers), "rate_limited");
                assert!(headers.contains_key("retry-after"));
            }
            other => panic!("unexpected {other}"),
        }
    }
    println!("mesh rate limit: {admitted} admitted, {refused} refused");
    assert!(
        (20..=40).contains(&admitted),
        "{admitted} admitted: the burst of 20, and at most a second's refill"
    );
    assert_eq!(admitted + refused, 60);
    assert_eq!(app.hits(), admitted);
    // Other routes are not limited.
    let (status, _, _) = get(&h1_client(), &proxy.url("inbound", "/")).await.unwrap();
    assert_eq!(status, 200);
}

/// An authoritative DNS server (hickory-server, on a loopback port) for `example.internal.`,
/// whose records the test sets (TTL 1 s).
struct Dns {
    zone: Arc<Zone>,
    addr: SocketAddr,
    _server: Server<Catalog>,
}

type Zone = InMemoryZoneHandler<TokioRuntimeProvider>;

fn dns_name(s: &str) -> Name {
    Name::from_ascii(s).unwrap()
}

impl Dns {
    async fn start() -> Dns {
        let origin = dns_name("example.internal.");
        let mut zone = Zone::empty(origin.clone(), ZoneType::Primary, AxfrPolicy::Deny);
        let soa = SOA::new(
            dns_name("ns.example.internal."),
            dns_name("admin.example.internal."),
            1,
            3600,
            600,
            86400,
            1,
        );
        zone.upsert_mut(Record::from_rdata(origin.clone(), 3600, RData::SOA(soa)), 1);
        let ns = RData::NS(NS(dns_name("ns.example.internal.")));
        zone.upsert_mut(Record::from_rdata(origin, 3600, ns), 1);
        let zone = Arc::new(zone);
        let mut catalog = Catalog::new();
        catalog.upsert(
            zone.origin().clone(),
            vec![zone.clone() as Arc<dyn ZoneHandler>],
        );
        // UDP and TCP on one port (a long answer is asked again over TCP): a free TCP port,
        // then the same UDP port, again on the rare clash with another socket.
        let (udp, tcp) = loop {
            let tcp = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
                .await
                .unwrap();
            let port = tcp.local_addr().unwrap().port();
            if let Ok(udp) = tokio::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, port)).await {
                break (udp, tcp);
            }
        };
        let addr = udp.local_addr().unwrap();
        let mut server = Server::new(catalog);
        server.register_socket(udp);
        server.register_listener(tcp, Duration::from_secs(5), 64);
        Dns {
            zone,
            addr,
            _server: server,
        }
    }

    async fn set(&self, owner: &str, rtype: RecordType, data: Vec<RData>) {
        let owner = dns_name(owner);
        let key = RrKey::new(LowerName::from(&owner), rtype);
        let mut set = RecordSet::with_ttl(owner, rtype, 1);
        for d in data {
            set.add_rdata(d);
        }
        self.zone.records_mut().await.insert(key, Arc::new(set));
    }
}

/// A `payments.v1.Payments` gRPC service over h2c: `Charge` answers `charged MSG` with
/// `grpc-status: 0` and `grpc-message: ok` in the trailers; any other method answers no message
/// and `grpc-status: 5` (NOT_FOUND), `grpc-message: no charge MSG`. It records each call as
/// `METHOD MSG`.
struct PaymentsServer {
    addr: SocketAddr,
    calls: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl PaymentsServer {
    async fn start() -> PaymentsServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let calls = Arc::new(Mutex::new(Vec::new()));
        let log = calls.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let log = log.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let log = log.clone();
                        async move { Ok::<_, std::convert::Infallible>(payments(req, &log).await) }
                    });
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        PaymentsServer { addr, calls, task }
    }

    fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }
}

impl Drop for PaymentsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn payments(req: Request<Incoming>, log: &Mutex<Vec<String>>) -> Response<Body> {
    let method = req
        .uri()
        .path()
        .rsplit('/')
        .next()
        .unwrap_or_default()
        .to_owned();
    let body = req.into_body().collect().await.unwrap().to_bytes();
    let msg = grpc_messages(&body).join(",");
    log.lock().unwrap().push(format!("{method} {msg}"));
    let (mut tx, out) = Channel::<Bytes, hyper::Error>::new(4);
    let mut trailers = HeaderMap::new();
    if method == "Charge" {
        tx.send_data(grpc_frame(format!("charged {msg}").as_bytes()))
            .await
            .unwrap();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        trailers.insert("grpc-message", HeaderValue::from_static("ok"));
    } else {
        trailers.insert("grpc-status", HeaderValue::from_static("5"));
        trailers.insert(
            "grpc-message",
            HeaderValue::from_str(&format!("no charge {msg}")).unwrap(),
        );
    }
    tx.send_trailers(trailers).await.unwrap();
    let mut r = Response::new(out.boxed());
    r.headers_mut()
        .insert("content-type", HeaderValue::from_static("application/grpc"));
    r
}
