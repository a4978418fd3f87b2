//! The upstream connection pool of HTTP/1.1 clusters, seen from a real origin: connections are
//! reused, kept up to `max_idle_per_endpoint`, closed after `idle_timeout`, and one the origin
//! closed while it sat idle never fails a request.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// One listener `in` whose first route sends everything to cluster `app` at `origin` with no
/// retries (so that nothing but the pool itself can save a request), and `pool` as the cluster's
/// pool settings.
fn config(origin: std::net::SocketAddr, pool: &str) -> String {
    let once = "      - name: once\n        cluster: app\n        retry: { attempts: 1 }\n";
    format!("{}    pool: {pool}\n", one_listener("", once, origin))
}

#[tokio::test]
async fn idle_connections_are_reused_then_closed_after_the_idle_timeout() {
    let origin = Origin::start("o").await;
    let proxy = Proxy::start(&config(
        origin.addr,
        "{ max_idle_per_endpoint: 8, idle_timeout: 300ms }",
    ))
    .await;
    let client = h1_client();
    for _ in 0..20 {
        let (status, _, _) = get(&client, &proxy.url("in", "/")).await.unwrap();
        assert_eq!(status, 200);
    }
    assert_eq!(
        origin.conns.accepted.load(Ordering::SeqCst),
        1,
        "20 requests one after another take one connection"
    );
    let closed = eventually(Duration::from_secs(3), || async {
        origin.conns.open.load(Ordering::SeqCst) == 0
    })
    .await;
    assert!(closed, "the idle connection is closed after idle_timeout");
    let (status, _, _) = get(&client, &proxy.url("in", "/")).await.unwrap();
    assert_eq!(
        status, 200,
        "a request after the close gets a new connection"
    );
    assert_eq!(origin.conns.accepted.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_burst_leaves_at_most_max_idle_per_endpoint_open() {
    let origin = Origin::start("o").await;
    let proxy = Proxy::start(&config(
        origin.addr,
        "{ max_idle_per_endpoint: 2, idle_timeout: 60s }",
    ))
    .await;
    let client = h1_client();
    // Six at once, each held 100 ms at the origin: more connections than the pool keeps.
    let burst: Vec<_> = (0..6)
        .map(|_| {
            let (client, url) = (client.clone(), proxy.url("in", "/delay/100"));
            tokio::spawn(async move { get(&client, &url).await.unwrap().0 })
        })
        .collect();
    for b in burst {
        assert_eq!(b.await.unwrap(), 200);
    }
    let accepted = origin.conns.accepted.load(Ordering::SeqCst);
    assert!(accepted > 2, "six concurrent requests opened {accepted}");
    let trimmed = eventually(Duration::from_secs(3), || async {
        origin.conns.open.load(Ordering::SeqCst) == 2
    })
    .await;
    assert!(
        trimmed,
        "{} open after the burst, 2 expected",
        origin.conns.open.load(Ordering::SeqCst)
    );
    for _ in 0..4 {
        let (status, _, _) = get(&client, &proxy.url("in", "/")).await.unwrap();
        assert_eq!(status, 200);
    }
    assert_eq!(
        origin.conns.accepted.load(Ordering::SeqCst),
        accepted,
        "the two kept connections serve what follows"
    );
}

/// An origin that answers one request per connection and then closes it, without saying so
/// (`connection: close` would tell the proxy not to keep it): the closing races the proxy's
/// next use of the connection.
async fn one_answer_per_connection() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let served = Arc::new(AtomicUsize::new(0));
    let count = served.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                continue;
            };
            let count = count.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await;
                count.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    (addr, served)
}

#[tokio::test]
async fn a_connection_the_origin_closed_while_idle_never_fails_a_request() {
    let (origin, served) = one_answer_per_connection().await;
    let proxy = Proxy::start(&config(
        origin,
        "{ max_idle_per_endpoint: 8, idle_timeout: 60s }",
    ))
    .await;
    let client = h1_client();
    for i in 0..50 {
        let (status, headers, body) = get(&client, &proxy.url("in", "/")).await.unwrap();
        assert_eq!(status, 200, "request {i}: {} {body}", reason(&headers));
        assert_eq!(body, "ok");
    }
    assert_eq!(served.load(Ordering::SeqCst), 50);
}

#[tokio::test]
async fn an_http10_request_without_host_reaches_the_origin_with_one() {
    let origin = Origin::start("o").await;
    let proxy = Proxy::start(&config(
        origin.addr,
        "{ max_idle_per_endpoint: 8, idle_timeout: 60s }",
    ))
    .await;
    let mut s = tokio::net::TcpStream::connect(proxy.addr("in"))
        .await
        .unwrap();
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).await.unwrap();
    assert!(
        answer.starts_with("HTTP/1.") && answer.contains(" 200 "),
        "{answer}"
    );
    assert_eq!(
        origin.control.last_header("host").as_deref(),
        Some(origin.addr.to_string().as_str()),
        "HTTP/1.1 to the origin needs a Host: the endpoint's address"
    );
}
