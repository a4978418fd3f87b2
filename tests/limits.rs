//! Connection limits against a real proxy process: 10,000 idle connections opened against a
//! listener capped at 1,000.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod support;

use std::time::Duration;

use tokio::time::Instant;

use support::*;
use tokio::net::TcpStream;

/// Sends one GET on `stream` and reads its response; returns the status.
async fn exchange(stream: &mut TcpStream, path: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let req = format!("GET {path} HTTP/1.1\r\nHost: app\r\n\r\n");
    stream.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream.read(&mut chunk).await.unwrap();
        assert!(
            n > 0,
            "the proxy closed the connection: {}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        if buf.len() >= end + 4 + len {
            return head[9..12].parse().unwrap();
        }
    }
}

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
        with_test_admin(&one_listener(
            "    max_connections: 1000\n    header_read_timeout: 60s\n",
            "",
            origin.addr,
        )),
    )
    .unwrap();
    let proc = Process::start(&path);
    let addr = proc.listener("in").await.unwrap();
    let pid = proc.child.id();

    // One keep-alive connection opened before the flood, used again during it. Raw HTTP/1.1,
    // so that what is measured is the proxy's connection, not a client library's.
    let mut kept = TcpStream::connect(addr).await.unwrap();
    assert_eq!(exchange(&mut kept, "/before").await, 200);
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
        assert_eq!(exchange(&mut kept, "/during").await, 200);
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

/// HTTP/2 limits: the stream cap is advertised, and a client that opens streams and resets them
/// at once (rapid reset, CVE-2023-44487) loses its connection while others keep working.
#[tokio::test]
async fn http2_stream_cap_and_rapid_reset_protection() {
    let origin = Origin::start("app").await;
    let proxy = Proxy::start(&one_listener(
        "    http2_max_concurrent_streams: 8\n    http2_max_pending_resets: 20\n",
        "",
        origin.addr,
    ))
    .await;
    let addr = proxy.addr("in");
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (client, mut connection) = h2::client::handshake(tcp).await.unwrap();
    // SETTINGS arrive with the first exchange; drive the connection until the client saw them.
    let mut client = client.ready().await.unwrap();
    let (resp, _) = client
        .send_request(
            http::Request::get(format!("http://{addr}/x"))
                .body(())
                .unwrap(),
            true,
        )
        .unwrap();
    let resp = tokio::select! {
        r = resp => r.unwrap(),
        _ = &mut connection => panic!("connection ended early"),
    };
    assert_eq!(resp.status(), 200);
    assert_eq!(
        client.current_max_send_streams(),
        8,
        "the stream cap is advertised"
    );

    // Rapid reset: open and cancel streams as fast as the client can write them.
    let mut sent = 0;
    let outcome = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            tokio::select! {
                ended = &mut connection => break ended,
                ready = client.clone().ready() => {
                    let Ok(mut c) = ready else { break (&mut connection).await };
                    let req = http::Request::get(format!("http://{addr}/slow")).body(()).unwrap();
                    match c.send_request(req, false) {
                        Ok((_, mut stream)) => {
                            stream.send_reset(h2::Reason::CANCEL);
                            sent += 1;
                        }
                        Err(_) => break (&mut connection).await,
                    }
                }
            }
        }
    })
    .await
    .expect("the proxy must end a rapid-reset connection");
    let err = outcome.expect_err("GOAWAY, not a clean end");
    println!("rapid reset: connection ended after {sent} reset streams: {err}");
    assert!(
        err.reason() == Some(h2::Reason::ENHANCE_YOUR_CALM) || err.is_go_away(),
        "expected GOAWAY ENHANCE_YOUR_CALM, got {err}"
    );
    // Everyone else is served.
    let (status, _, _) = get(&h2_client(), &proxy.url("in", "/after")).await.unwrap();
    assert_eq!(status, 200);
}

/// The admin server binds loopback unless told otherwise, and has nothing that changes state:
/// every method but GET and HEAD is refused.
#[tokio::test]
async fn the_admin_server_is_loopback_and_read_only() {
    let loaded = outrigger::control::config::parse("t.yaml", "listeners: []\n").unwrap();
    assert!(loaded.config.admin_address.ip().is_loopback());
    let proxy = Proxy::start("listeners: []\n").await;
    for method in ["POST", "PUT", "DELETE", "PATCH"] {
        for path in ["/", "/config", "/clusters", "/ready", "/metrics"] {
            let req = http::Request::builder()
                .method(method)
                .uri(proxy.admin_url(path))
                .body(empty())
                .unwrap();
            let resp = h1_client().request(req).await.unwrap();
            assert_eq!(resp.status(), 405, "{method} {path}");
        }
    }
}
