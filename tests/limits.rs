//! Connection limits against a real proxy process: 10,000 idle connections opened against a
//! listener capped at 1,000.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod support;

use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use support::*;
use tokio::net::TcpStream;

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_idle_connections_cannot_pass_a_cap_of_one_thousand() {
    // 10,000 client sockets plus the proxy's 1,000 need more than the usual 1,024 descriptors.
    rlimit::increase_nofile_limit(40_000).unwrap();
    let origin = Origin::start("app").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("limits.yaml");
    std::fs::write(
        &path,
        format!(
            "admin:
  address: 127.0.0.1:0
listeners:
  - name: in
    address: 127.0.0.1:0
    max_connections: 1000
    header_read_timeout: 60s
    routes:
      - name: all
        cluster: app
clusters:
  - name: app
    endpoints: [\"{}\"]
",
            origin.addr
        ),
    )
    .unwrap();
    let proc = Process::start(&path);
    let addr = proc.listener("in").await.unwrap();
    let pid = proc.child.id();

    // One keep-alive connection opened before the flood, used again during it.
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(
        TcpStream::connect(addr).await.unwrap(),
    ))
    .await
    .unwrap();
    tokio::spawn(conn);
    let ask = |path: &str| {
        http::Request::get(path)
            .header("host", "app")
            .body(Empty::<bytes::Bytes>::new())
            .unwrap()
    };
    let resp = sender.send_request(ask("/before")).await.unwrap();
    assert_eq!(resp.status(), 200);
    resp.into_body().collect().await.unwrap();
    let rss_before = rss_kib(pid);

    let opened = Instant::now();
    let mut idle = Vec::with_capacity(10_000);
    for _ in 0..10_000 {
        idle.push(TcpStream::connect(addr).await.unwrap());
    }
    let opening = opened.elapsed();
    let metrics_url = proc.admin_url("/metrics");
    let scrape = || async { get(&h1_client(), &metrics_url).await.unwrap().2 };
    let rejected_series =
        "outrigger_connections_rejected_total{listener=\"in\",reason=\"max_connections\"}";
    assert!(
        eventually(Duration::from_secs(10), || async {
            metric(&scrape().await, rejected_series) >= 9_000.0
        })
        .await,
        "the proxy must turn away what is over the cap"
    );
    let metrics = scrape().await;
    let open = metric(&metrics, "outrigger_open_connections{listener=\"in\"}");
    let rejected = metric(&metrics, rejected_series);
    assert!(open <= 1000.0, "open connections {open} over the cap");
    assert_eq!(
        open + rejected,
        10_001.0,
        "every connection was either held or refused"
    );

    // The existing connection still gets answers, quickly, while 10,000 sockets sit on the port.
    let started = Instant::now();
    for _ in 0..20 {
        let resp = sender.send_request(ask("/during")).await.unwrap();
        assert_eq!(resp.status(), 200);
        resp.into_body().collect().await.unwrap();
    }
    let per_request = started.elapsed() / 20;
    let rss_after = rss_kib(pid);
    println!(
        "limits: opened 10,000 connections in {} ms; open {open}, rejected {rejected}; \
         existing connection answered 20 requests at {} µs each; RSS {} KiB -> {} KiB (+{} KiB, {} B per held connection)",
        opening.as_millis(),
        per_request.as_micros(),
        rss_before,
        rss_after,
        rss_after.saturating_sub(rss_before),
        rss_after.saturating_sub(rss_before) * 1024 / 1000
    );
    assert!(
        rss_after < rss_before + 64 * 1024,
        "memory must stay bounded: {rss_before} KiB -> {rss_after} KiB"
    );
    drop(idle);
}
