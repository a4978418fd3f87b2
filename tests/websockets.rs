//! HTTP/1.1 upgrades through the proxy: a real WebSocket client and server (tungstenite) on
//! plain and TLS listeners, half-close and the idle timeout on the upgraded connection, routes
//! that refuse upgrades, and `Upgrade: h2c`, which never switches.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use support::pki::{write, write_leaf, Ca};
use support::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;

/// A WebSocket echo server: every text or binary message comes back prefixed with `echo:`.
async fn ws_echo() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                while let Some(Ok(msg)) = ws.next().await {
                    let reply = match msg {
                        Message::Text(t) => Message::text(format!("echo:{t}")),
                        Message::Binary(b) => {
                            let mut v = b"echo:".to_vec();
                            v.extend_from_slice(&b);
                            Message::binary(v)
                        }
                        Message::Close(_) => break,
                        _ => continue,
                    };
                    if ws.send(reply).await.is_err() {
                        return;
                    }
                }
                let _ = ws.close(None).await;
            });
        }
    });
    addr
}

/// An upstream that accepts any upgrade with a bare `101`, then echoes bytes until the client
/// finishes sending, writes `bye` and closes: it shows half-close through the tunnel.
async fn raw_upgrade_echo() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                read_head(&mut s).await;
                let _ = s
                    .write_all(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n")
                    .await;
                echo_then_bye(&mut s).await;
            });
        }
    });
    addr
}

/// Reads up to the end of an HTTP head; returns it.
async fn read_head<S: AsyncRead + Unpin>(s: &mut S) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte).await.unwrap_or(0) == 0 {
            break;
        }
        head.push(byte[0]);
    }
    String::from_utf8_lossy(&head).into_owned()
}

fn config(ws: SocketAddr, raw: SocketAddr, origin: SocketAddr, tls: &str) -> String {
    format!(
        "access_log: true
listeners:
  - name: in
    address: 127.0.0.1:0
{tls}    routes:
      - name: no-upgrades
        match: {{ prefix: /closed }}
        cluster: ws
        upgrades: []
      - name: raw
        match: {{ prefix: /raw }}
        cluster: raw
        idle_timeout: 300ms
      - name: h2c
        match: {{ prefix: /headers }}
        cluster: app
      - name: ws
        match: {{ prefix: / }}
        cluster: ws
clusters:
  - name: ws
    endpoints: [\"{ws}\"]
  - name: raw
    endpoints: [\"{raw}\"]
  - name: app
    endpoints: [\"{origin}\"]
"
    )
}

/// A chat over `stream`: three messages out, three echoes back, then a clean close.
async fn chat<S: AsyncRead + AsyncWrite + Unpin>(stream: S, url: &str) {
    let (mut ws, resp) = tokio_tungstenite::client_async(url, stream).await.unwrap();
    assert_eq!(resp.status(), 101);
    for i in 0..3 {
        ws.send(Message::text(format!("hello {i}"))).await.unwrap();
        let got = ws.next().await.unwrap().unwrap();
        assert_eq!(got, Message::text(format!("echo:hello {i}")));
    }
    ws.send(Message::binary(vec![0u8, 1, 2, 255]))
        .await
        .unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        Message::binary(b"echo:\x00\x01\x02\xff".to_vec())
    );
    ws.close(None).await.unwrap();
    // The server's close frame comes back, then the connection ends.
    while let Some(Ok(_)) = ws.next().await {}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websockets_pass_through_a_plain_listener() {
    let (ws, raw) = (ws_echo().await, raw_upgrade_echo().await);
    let origin = Origin::start("app").await;
    let proxy = Proxy::start(&config(ws, raw, origin.addr, "")).await;
    let addr = proxy.addr("in");
    chat(
        TcpStream::connect(addr).await.unwrap(),
        &format!("ws://{addr}/chat"),
    )
    .await;

    let text = scrape(&proxy).await;
    assert_eq!(
        metric(&text, "outrigger_upgrades_total{listener=\"in\"}"),
        1.0
    );
    assert_eq!(
        metric(
            &text,
            "outrigger_requests_total{class=\"1xx\",cluster=\"ws\",listener=\"in\",route=\"ws\"}"
        ),
        1.0
    );
    // Counted when the tunnel ends, which follows the close by a moment.
    assert!(
        eventually(Duration::from_secs(10), || async {
            let text = scrape(&proxy).await;
            metric(&text, "outrigger_upgrades_active{listener=\"in\"}") == 0.0
                && metric(
                    &text,
                    "outrigger_upgrade_bytes_total{direction=\"downstream\",listener=\"in\"}",
                ) > 0.0
                && metric(
                    &text,
                    "outrigger_upgrade_bytes_total{direction=\"upstream\",listener=\"in\"}",
                ) > 0.0
        })
        .await,
        "{}",
        scrape(&proxy).await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websockets_pass_through_a_tls_listener() {
    let (ws, raw) = (ws_echo().await, raw_upgrade_echo().await);
    let origin = Origin::start("app").await;
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test ca");
    let (cert, key) = write_leaf(dir.path(), "server", &ca.leaf(&["localhost"]));
    let _ = write(dir.path(), "ca.pem", &ca.pem);
    let tls = format!(
        "    tls: {{ cert: {}, key: {} }}\n",
        cert.display(),
        key.display()
    );
    let proxy = Proxy::start(&config(ws, raw, origin.addr, &tls)).await;
    let addr = proxy.addr("in");
    let mut roots = rustls::RootCertStore::empty();
    use rustls::pki_types::pem::PemObject;
    roots
        .add(rustls::pki_types::CertificateDer::from_pem_slice(ca.pem.as_bytes()).unwrap())
        .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let stream = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .unwrap();
    chat(stream, &format!("wss://localhost:{}/chat", addr.port())).await;
    assert_eq!(
        metric(
            &scrape(&proxy).await,
            "outrigger_upgrades_total{listener=\"in\"}"
        ),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgraded_connection_keeps_half_close_and_its_idle_timeout() {
    let (ws, raw) = (ws_echo().await, raw_upgrade_echo().await);
    let origin = Origin::start("app").await;
    let proxy = Proxy::start(&config(ws, raw, origin.addr, "")).await;
    let addr = proxy.addr("in");
    let upgrade =
        b"GET /raw HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n";

    // Half-close: the client stops sending; the upstream's echo and its goodbye still arrive.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(upgrade).await.unwrap();
    let head = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("upgrade: websocket"),
        "{head}"
    );
    s.write_all(b"not http at all \x00\xff\r\n\r\n")
        .await
        .unwrap();
    s.shutdown().await.unwrap();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).await.unwrap();
    assert_eq!(rest, b"not http at all \x00\xff\r\n\r\nbye");

    // Idle: nobody sends, and the route's 300 ms idle timeout closes the tunnel.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(upgrade).await.unwrap();
    assert!(read_head(&mut s).await.starts_with("HTTP/1.1 101"));
    s.write_all(b"ping").await.unwrap();
    let mut echo = [0u8; 4];
    s.read_exact(&mut echo).await.unwrap();
    assert_eq!(&echo, b"ping");
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut rest)).await;
    assert!(matches!(ended, Ok(Ok(_))), "the idle tunnel is closed");
    assert!(rest.is_empty(), "{rest:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_may_refuse_upgrades_and_h2c_never_switches() {
    let (ws, raw) = (ws_echo().await, raw_upgrade_echo().await);
    let origin = Origin::start("app").await;
    let proxy = Proxy::start(&config(ws, raw, origin.addr, "")).await;
    let addr = proxy.addr("in");

    // A route with `upgrades: []`: the WebSocket client is refused, not switched.
    let err = tokio_tungstenite::connect_async(format!("ws://{addr}/closed"))
        .await
        .unwrap_err();
    match err {
        tokio_tungstenite::tungstenite::Error::Http(resp) => {
            assert_eq!(resp.status(), 400);
            assert_eq!(resp.headers()["x-outrigger-error"], "not_accepted");
        }
        other => panic!("{other:?}"),
    }

    // `Upgrade: h2c` is served as the plain HTTP/1.1 request it also is: the upstream never
    // sees the upgrade, and the connection keeps speaking HTTP/1.1.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /headers HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n")
        .await
        .unwrap();
    let head = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let seen = origin.control.last_headers.lock().unwrap().clone().unwrap();
    assert!(!seen.contains_key("upgrade"), "{seen:?}");
    assert!(!seen.contains_key("http2-settings"), "{seen:?}");
    assert_eq!(
        metric(
            &scrape(&proxy).await,
            "outrigger_upgrades_total{listener=\"in\"}"
        ),
        0.0
    );
}
