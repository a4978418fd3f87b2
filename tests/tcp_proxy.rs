//! L4 listeners splice bytes both ways and keep half-close.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod support;

use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_listener_echoes_and_respects_half_close() {
    let (echo, _task) = tcp_echo().await;
    let proxy = Proxy::start(&format!(
        "listeners:\n  - name: tcp\n    address: 127.0.0.1:0\n    protocol: tcp\n    cluster: echo\nclusters:\n  - name: echo\n    endpoints: [{echo}]\n"
    ))
    .await;
    let mut s = TcpStream::connect(proxy.addr("tcp")).await.unwrap();
    // A larger payload than one socket buffer, to see it stream both ways.
    let payload: Vec<u8> = (0..256 * 1024).map(|i| (i % 251) as u8).collect();
    let (mut r, mut w) = s.split();
    let write = async {
        w.write_all(&payload).await.unwrap();
        // Half-close: we are done sending but still want the answer.
        w.shutdown().await.unwrap();
    };
    let mut received = Vec::new();
    let read = async {
        tokio::time::timeout(Duration::from_secs(10), r.read_to_end(&mut received))
            .await
            .expect("upstream closes after our half-close reaches it")
            .unwrap();
    };
    tokio::join!(write, read);
    assert_eq!(received.len(), payload.len() + 3);
    assert_eq!(&received[..payload.len()], &payload[..]);
    assert_eq!(
        &received[payload.len()..],
        b"bye",
        "data after our FIN still arrives"
    );

    // The bytes are added when the proxy finishes the connection, which can be just after the
    // client has read its end of it.
    let series = "outrigger_tcp_bytes_total{direction=\"upstream\",listener=\"tcp\"}";
    let expected = payload.len() as f64;
    assert_eq!(metric_reaching(&proxy, series, expected).await, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_connect_failure_closes_the_client_and_is_counted() {
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let proxy = Proxy::start(&format!(
        "listeners:\n  - name: tcp\n    address: 127.0.0.1:0\n    protocol: tcp\n    cluster: dead\nclusters:\n  - name: dead\n    endpoints: [{dead}]\n"
    ))
    .await;
    let mut s = TcpStream::connect(proxy.addr("tcp")).await.unwrap();
    let mut buf = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0);
    let metrics = get(&h1_client(), &proxy.admin_url("/metrics"))
        .await
        .unwrap()
        .2;
    assert!(
        metrics.contains("outrigger_upstream_connect_errors_total{cluster=\"dead\"} 1"),
        "{metrics}"
    );
}
