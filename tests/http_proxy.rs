//! End-to-end HTTP proxying over real sockets: HTTP/1.1 and HTTP/2 clients, curl, header
//! handling, streaming, local replies.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod support;

use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Channel};
use support::*;

fn config(origin_a: &Origin, origin_b: &Origin, extra_routes: &str) -> String {
    format!(
        "listeners:
  - name: in
    address: 127.0.0.1:0
    routes:
{extra_routes}      - name: split
        match: {{ prefix: /split }}
        weighted_clusters: [{{cluster: a, weight: 1}}, {{cluster: b, weight: 1}}]
      - name: slow
        match: {{ prefix: /delay }}
        cluster: a
        timeout: 150ms
      - name: default
        match: {{ prefix: / }}
        cluster: a
clusters:
  - name: a
    endpoints: [{}]
  - name: b
    endpoints: [{}]
  - name: dead
    endpoints: [{}]
    connect_timeout: 200ms
",
        origin_a.addr,
        origin_b.addr,
        dead_addr()
    )
}

/// An address nothing listens on: bound, then released.
fn dead_addr() -> std::net::SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_and_http2_clients_reach_the_upstream() {
    let (a, b) = (Origin::start("a").await, Origin::start("b").await);
    let proxy = Proxy::start(&config(&a, &b, "")).await;
    for client in [h1_client(), h2_client()] {
        let (status, headers, body) = get(&client, &proxy.url("in", "/hello?x=1")).await.unwrap();
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, "a GET /hello");
        assert_eq!(headers["x-origin"], "a");
        let (status, _, body) = get(&client, &proxy.url("in", "/status/418")).await.unwrap();
        assert_eq!(
            status,
            StatusCode::IM_A_TEAPOT,
            "upstream status passes through"
        );
        assert_eq!(body, "a status 418");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_http1_and_prior_knowledge_http2() {
    let (a, b) = (Origin::start("a").await, Origin::start("b").await);
    let proxy = Proxy::start(&config(&a, &b, "")).await;
    let url = proxy.url("in", "/status/201");
    let run = move |args: &[&str]| {
        let out = Command::new("curl")
            .args(["-sS", "-o", "-", "-w", "\n%{http_code} %{http_version}"])
            .args(args)
            .arg(&url)
            .output()
            .expect("curl is installed");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let (h1, h2) = tokio::task::spawn_blocking(move || {
        (run(&["--http1.1"]), run(&["--http2-prior-knowledge"]))
    })
    .await
    .unwrap();
    assert_eq!(h1, "a status 201\n201 1.1");
    assert_eq!(h2, "a status 201\n201 2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_headers_are_added_and_hop_by_hop_removed() {
    let (a, b) = (Origin::start("a").await, Origin::start("b").await);
    let proxy = Proxy::start(&config(&a, &b, "")).await;
    let req = Request::get(proxy.url("in", "/headers"))
        .header("host", "svc.example")
        .header("x-forwarded-for", "203.0.113.7")
        .header("x-forwarded-proto", "https")
        .header("connection", "x-private")
        .header("x-private", "secret")
        .header("keep-alive", "timeout=5")
        .header("x-app", "kept")
        .header("x-forwarded-client-cert", "URI=spiffe://forged")
        .body(empty())
        .unwrap();
    let (status, _, seen) = send(&h1_client(), req).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert!(
        seen.contains("x-forwarded-for: 203.0.113.7, 127.0.0.1\n"),
        "{seen}"
    );
    // A plain connection has no client certificate: a claimed one is dropped.
    assert!(!seen.contains("x-forwarded-client-cert"), "{seen}");
    // The client's claim of `https` over a plain connection is replaced, not passed on.
    assert!(seen.contains("x-forwarded-proto: http\n"), "{seen}");
    assert_eq!(seen.matches("x-forwarded-proto").count(), 1, "{seen}");
    assert!(seen.contains("host: svc.example\n"), "{seen}");
    assert!(seen.contains("x-app: kept\n"), "{seen}");
    assert!(!seen.contains("x-private"), "{seen}");
    assert!(!seen.contains("keep-alive"), "{seen}");

    // HTTP/2 clients send :authority instead of Host; the upstream still sees a Host.
    let (_, _, seen) = get(&h2_client(), &proxy.url("in", "/headers"))
        .await
        .unwrap();
    let expected = format!("host: {}\n", proxy.addr("in"));
    assert!(seen.contains(&expected), "{seen}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http10_upstream_does_not_end_the_clients_keep_alive() {
    // Python's `http.server` answers `HTTP/1.0` and closes after each response.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("index.html"), "from python\n").unwrap();
    let port = ReservedPort::on("127.0.0.1");
    let _python = Children(vec![python_origin(port.port, dir.path())]);
    wait_listening(port.port).await;
    let yaml = format!(
        "listeners:\n  - name: in\n    address: 127.0.0.1:0\n    routes:\n      - name: all\n        match: {{ prefix: / }}\n        cluster: py\nclusters:\n  - name: py\n    endpoints: [\"127.0.0.1:{}\"]\n",
        port.port
    );
    let proxy = Proxy::start(&yaml).await;
    let url = proxy.url("in", "/index.html");
    // One curl, two transfers: the second reuses the first's connection only if the answer
    // was HTTP/1.1 and kept it alive.
    let out = tokio::task::spawn_blocking(move || {
        Command::new("curl")
            .args(["-sS", "--http1.1", "-o", "/dev/null", "-o", "/dev/null"])
            .args(["-w", "%{http_code} %{http_version} %{num_connects}\n"])
            .args([&url, &url])
            .output()
            .expect("curl is installed")
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "200 1.1 1\n200 1.1 0\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_replies_are_well_formed_with_a_reason() {
    let (a, b) = (Origin::start("a").await, Origin::start("b").await);
    let extra = "      - name: to-dead\n        match: { prefix: /dead }\n        cluster: dead\n      - name: only-get\n        match: { exact: /nothing, methods: [GET] }\n        cluster: a\n";
    let yaml = config(&a, &b, extra).replace(
        "      - name: default\n        match: { prefix: / }\n        cluster: a\n",
        "",
    );
    let proxy = Proxy::start(&yaml).await;
    let client = h1_client();

    let (status, headers, body) = get(&client, &proxy.url("in", "/unrouted")).await.unwrap();
    assert_eq!(
        (status, reason(&headers), body.as_str()),
        (StatusCode::NOT_FOUND, "no_route", "no_route\n")
    );

    let (status, headers, _) = get(&client, &proxy.url("in", "/dead")).await.unwrap();
    assert_eq!(
        (status, reason(&headers)),
        (StatusCode::SERVICE_UNAVAILABLE, "upstream_connect")
    );

    let (status, headers, _) = get(&client, &proxy.url("in", "/delay/2000")).await.unwrap();
    assert_eq!(
        (status, reason(&headers)),
        (StatusCode::GATEWAY_TIMEOUT, "timeout")
    );

    let post = Request::post(proxy.url("in", "/nothing"))
        .body(empty())
        .unwrap();
    let (status, _, _) = send(&client, post).await.unwrap();
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "method condition excludes POST"
    );

    let metrics = get(&client, &proxy.admin_url("/metrics")).await.unwrap().2;
    assert!(
        metrics.contains("outrigger_local_replies_total{listener=\"in\",reason=\"no_route\"} 2"),
        "{metrics}"
    );
    assert!(metrics.contains("outrigger_local_replies_total{listener=\"in\",reason=\"timeout\"} 1"));
    // The default retry policy tries a refused connection three times before answering.
    assert!(metrics.contains("outrigger_upstream_connect_errors_total{cluster=\"dead\"} 3"));
    assert!(metrics.contains("outrigger_upstream_attempts_total{cluster=\"dead\"} 3"));
    assert!(metrics.contains("outrigger_requests_total{class=\"5xx\",cluster=\"dead\",listener=\"in\",route=\"to-dead\"} 1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_resets_gives_502() {
    // Accepts, reads the request, closes without answering.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        use tokio::io::AsyncReadExt;
        while let Ok((mut s, _)) = listener.accept().await {
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
        }
    });
    let yaml = format!("listeners:\n  - name: in\n    address: 127.0.0.1:0\n    routes:\n      - name: r\n        cluster: rude\nclusters:\n  - name: rude\n    endpoints: [{addr}]\n");
    let proxy = Proxy::start(&yaml).await;
    let (status, headers, _) = get(&h1_client(), &proxy.url("in", "/")).await.unwrap();
    assert_eq!(
        (status, reason(&headers)),
        (StatusCode::BAD_GATEWAY, "upstream_reset")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_clusters_split_traffic() {
    let (a, b) = (Origin::start("a").await, Origin::start("b").await);
    let proxy = Proxy::start(&config(&a, &b, "")).await;
    let client = h1_client();
    let mut from_b = 0;
    for _ in 0..20 {
        let (_, headers, _) = get(&client, &proxy.url("in", "/split")).await.unwrap();
        if headers["x-origin"] == "b" {
            from_b += 1;
        }
    }
    assert_eq!(from_b, 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_stream_without_buffering() {
    let (a, b) = (Origin::start("a").await, Origin::start("b").await);
    let proxy = Proxy::start(&config(&a, &b, "")).await;
    for client in [h1_client(), h2_client()] {
        // Response: the first chunk arrives while the origin is still holding the second.
        let resp = client
            .request(
                Request::get(proxy.url("in", "/stream"))
                    .body(empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        let mut body = resp.into_body();
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(first, Bytes::from_static(b"first;"));
        a.release.notify_one();
        let rest = body.collect().await.unwrap().to_bytes();
        assert_eq!(rest, Bytes::from_static(b"second"));

        // Request: the origin echoes a chunk before the client has sent the next one.
        let (mut tx, req_body) = Channel::<Bytes, hyper::Error>::new(1);
        let req = Request::post(proxy.url("in", "/echo"))
            .body(req_body.boxed())
            .unwrap();
        let pending = tokio::spawn({
            let client = client.clone();
            async move { client.request(req).await }
        });
        tx.send_data(Bytes::from_static(b"ping-1")).await.unwrap();
        let mut echoed = pending.await.unwrap().unwrap().into_body();
        let got = tokio::time::timeout(Duration::from_secs(5), echoed.frame())
            .await
            .expect("echo of the first chunk arrives before the request ends")
            .unwrap()
            .unwrap()
            .into_data()
            .unwrap();
        assert_eq!(got, Bytes::from_static(b"ping-1"));
        tx.send_data(Bytes::from_static(b"ping-2")).await.unwrap();
        drop(tx);
        let rest = echoed.collect().await.unwrap().to_bytes();
        assert_eq!(rest, Bytes::from_static(b"ping-2"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_a_4xx_and_the_proxy_stays_up() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (a, b) = (Origin::start("a").await, Origin::start("b").await);
    let proxy = Proxy::start(&config(&a, &b, "")).await;
    for raw in [
        &b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab"[..],
        b"GARBAGE\r\n\r\n",
        b"GET / HTTP/1.1\r\nBad Header\r\n\r\n",
    ] {
        let mut s = tokio::net::TcpStream::connect(proxy.addr("in"))
            .await
            .unwrap();
        s.write_all(raw).await.unwrap();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
        let text = String::from_utf8_lossy(&out);
        assert!(
            text.starts_with("HTTP/1.1 4"),
            "{:?} -> {text:?}",
            String::from_utf8_lossy(raw)
        );
    }
    let (status, _, _) = get(&h1_client(), &proxy.url("in", "/")).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(a.hits(), 1, "no malformed request reached the upstream");
}

/// A client stream that sends its first `first` bytes, then holds the rest back for a moment,
/// so that they reach the proxy as two segments.
struct Staggered {
    io: tokio::net::TcpStream,
    first: usize,
    pause: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl tokio::io::AsyncRead for Staggered {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Staggered {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        use std::future::Future;
        let this = &mut *self;
        if this.first > 0 {
            let n = buf.len().min(this.first);
            let sent =
                std::task::ready!(std::pin::Pin::new(&mut this.io).poll_write(cx, &buf[..n]))?;
            this.first -= sent;
            if this.first == 0 {
                this.pause = Some(Box::pin(tokio::time::sleep(Duration::from_millis(30))));
            }
            return std::task::Poll::Ready(Ok(sent));
        }
        if let Some(p) = this.pause.as_mut() {
            std::task::ready!(p.as_mut().poll(cx));
            this.pause = None;
        }
        std::pin::Pin::new(&mut this.io).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// The proxy tells HTTP/2 from HTTP/1 by the first bytes of a plain connection: an HTTP/2
/// client whose preface arrives cut in two is still served over HTTP/2, and HTTP/1 requests
/// whose method shares the preface's first letter (`POST`, `PRI`-like) are still HTTP/1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preface_cut_in_two_is_still_http2_and_p_methods_are_still_http1() {
    let (a, b) = (Origin::start("a").await, Origin::start("b").await);
    let proxy = Proxy::start(&config(&a, &b, "")).await;
    let addr = proxy.addr("in");
    for first in [1, 5, 23] {
        let io = Staggered {
            io: tokio::net::TcpStream::connect(addr).await.unwrap(),
            first,
            pause: None,
        };
        let (mut send, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(io),
        )
        .await
        .unwrap();
        tokio::spawn(conn);
        let req = Request::get(format!("http://{addr}/status/202"))
            .body(empty())
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        assert_eq!(
            resp.status(),
            StatusCode::ACCEPTED,
            "preface cut after {first}"
        );
        assert_eq!(resp.version(), http::Version::HTTP_2);
    }
    let client = h1_client();
    let req = Request::post(proxy.url("in", "/echo"))
        .body(body("p"))
        .unwrap();
    let resp = client.request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.version(), http::Version::HTTP_11);
    // A made-up method that starts like the preface, then differs.
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(b"PRIX / HTTP/1.1\r\nhost: a\r\ncontent-length: 0\r\n\r\n")
        .await
        .unwrap();
    let mut head = [0u8; 12];
    s.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 200", "{}", String::from_utf8_lossy(&head));
}
