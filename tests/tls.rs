//! TLS end to end: termination checked with curl over HTTP/1.1 and HTTP/2 (ALPN), origination to
//! an upstream over TLS, mutual TLS between two sidecars with identity authorization, and
//! certificate rotation under load.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, ServerName};
use support::pki::{write, write_leaf, Ca};
use support::*;

/// Deadline of every wait: far above what any step takes, even on a loaded machine.
const WAIT: Duration = Duration::from_secs(30);

/// Runs curl against `url` on `localhost` resolved to the proxy; returns (exit ok, stdout).
async fn curl(addr: SocketAddr, path: &str, args: &[&str]) -> (bool, String) {
    let url = format!("https://localhost:{}{path}", addr.port());
    let resolve = format!("localhost:{}:127.0.0.1", addr.port());
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--max-time", "30", "--resolve", &resolve])
        .args(args)
        .arg(&url)
        .output()
        .await
        .expect("curl is installed");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// curl with a client certificate: `(exit ok, body then status code)`.
async fn curl_as(
    addr: SocketAddr,
    path: &str,
    ca: &str,
    (cert, key): (&str, &str),
) -> (bool, String) {
    curl(
        addr,
        path,
        &[
            "--cacert",
            ca,
            "--cert",
            cert,
            "--key",
            key,
            "-w",
            "%{http_code}",
        ],
    )
    .await
}

fn tls_listener(dir: &Path, ca: &Ca, extra: &str) -> String {
    let (cert, key) = write_leaf(dir, "server", &ca.leaf(&["localhost", "127.0.0.1"]));
    format!(
        "    tls:\n      cert: {}\n      key: {}\n{extra}",
        cert.display(),
        key.display()
    )
}

#[tokio::test]
async fn curl_reaches_a_tls_listener_over_http1_and_http2() {
    let origin = Origin::start("app").await;
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test root");
    let ca_file = write(dir.path(), "ca.pem", &ca.pem);
    let proxy = Proxy::start(&one_listener(
        &tls_listener(dir.path(), &ca, ""),
        "",
        origin.addr,
    ))
    .await;
    let ca_arg = ca_file.to_str().unwrap();
    // Without ALPN the proxy reads the first bytes to tell the protocol.
    for (flag, version) in [("--http1.1", "1.1"), ("--http2", "2"), ("--no-alpn", "1.1")] {
        let (ok, out) = curl(
            proxy.addr("in"),
            "/hello",
            &[
                "--cacert",
                ca_arg,
                flag,
                "-w",
                "\n%{http_version} %{http_code}",
            ],
        )
        .await;
        assert!(ok, "curl {flag} failed: {out}");
        assert!(out.starts_with("app GET /hello"), "{out}");
        assert!(out.ends_with(&format!("{version} 200")), "{flag}: {out}");
        assert_eq!(
            origin.control.last_header("x-forwarded-proto").as_deref(),
            Some("https")
        );
    }
    // A client that does not trust the CA refuses the proxy's certificate.
    let (ok, _) = curl(proxy.addr("in"), "/", &[]).await;
    assert!(!ok, "curl without --cacert must fail verification");
    let metrics = scrape(&proxy).await;
    assert_eq!(
        metric(
            &metrics,
            "outrigger_tls_handshakes_total{listener=\"in\",result=\"ok\"}"
        ),
        3.0
    );
    assert!(
        metric(
            &metrics,
            "outrigger_tls_cert_expiry_timestamp_seconds{listener=\"in\"}"
        ) > 1.7e9
    );
}

/// Two sidecars: `edge` originates mTLS with its workload certificate to `mesh`, which requires
/// client certificates from the mesh CA, allows `spiffe://mesh/ns/prod/*`, and guards one route
/// further. Direct clients with the wrong CA, an unlisted identity or no certificate are refused.
#[tokio::test]
async fn mutual_tls_between_sidecars_authorizes_by_identity() {
    let origin = Origin::start("app").await;
    let dir = tempfile::tempdir().unwrap();
    let mesh_ca = Ca::new("mesh root");
    let rogue_ca = Ca::new("rogue root");
    let ca_file = write(dir.path(), "mesh-ca.pem", &mesh_ca.pem);
    let mesh = Proxy::start(&format!(
        "listeners:
  - name: inbound
    address: 127.0.0.1:0
{}    routes:
      - name: admin-only
        match: {{ prefix: /admin }}
        allowed_identities: [\"spiffe://mesh/ns/prod/sa/ops\"]
        cluster: app
      - name: per-identity-limit
        match: {{ prefix: /limited }}
        rate_limit: {{ requests_per_second: 0.1, burst: 1, key: peer_identity }}
        cluster: app
      - name: by-identity
        match: {{ identities: [\"spiffe://mesh/ns/prod/sa/batch\"] }}
        cluster: app
        fault: {{ abort: {{ percent: 100, status: 418 }} }}
      - name: all
        cluster: app
clusters:
  - name: app
    endpoints: [\"{}\"]
",
        tls_listener(
            dir.path(),
            &mesh_ca,
            &format!(
                "      client_ca: {}\n      allowed_identities: [\"spiffe://mesh/ns/prod/*\"]\n",
                ca_file.display()
            )
        ),
        origin.addr
    ))
    .await;

    let web = write_leaf(
        dir.path(),
        "web",
        &mesh_ca.leaf(&["spiffe://mesh/ns/prod/sa/web"]),
    );
    let edge = Proxy::start(&format!(
        "listeners:
  - name: outbound
    address: 127.0.0.1:0
    routes:
      - name: to-mesh
        cluster: mesh
clusters:
  - name: mesh
    endpoints: [\"{}\"]
    tls:
      ca: {}
      server_name: localhost
      cert: {}
      key: {}
",
        mesh.addr("inbound"),
        ca_file.display(),
        web.0.display(),
        web.1.display()
    ))
    .await;

    // The allowed identity passes, and the upstream learns who called.
    let (status, _, body) = get(&h1_client(), &edge.url("outbound", "/orders"))
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, "app GET /orders");
    assert_eq!(
        origin
            .control
            .last_header("x-forwarded-client-cert")
            .as_deref(),
        Some("URI=spiffe://mesh/ns/prod/sa/web")
    );
    // An allowed identity is still refused by a route that names others.
    let (status, headers, _) = get(&h1_client(), &edge.url("outbound", "/admin/x"))
        .await
        .unwrap();
    assert_eq!(status, 403);
    assert_eq!(reason(&headers), "forbidden");

    let mesh_addr = mesh.addr("inbound");
    let ca_arg = ca_file.to_str().unwrap();
    let client = |name: &str, ca: &Ca, id: &str| {
        let (c, k) = write_leaf(dir.path(), name, &ca.leaf(&[id]));
        (
            c.to_str().unwrap().to_owned(),
            k.to_str().unwrap().to_owned(),
        )
    };
    // Routing by identity: the batch identity takes its own route.
    let (c, k) = client("batch", &mesh_ca, "spiffe://mesh/ns/prod/sa/batch");
    let (ok, out) = curl_as(mesh_addr, "/x", ca_arg, (&c, &k)).await;
    assert!(ok && out.ends_with("418"), "{out}");
    // Rate-limit buckets are per identity: web (through edge) and api each get their one request.
    let (status, _, _) = get(&h1_client(), &edge.url("outbound", "/limited"))
        .await
        .unwrap();
    assert_eq!(status, 200);
    let (status, _, _) = get(&h1_client(), &edge.url("outbound", "/limited"))
        .await
        .unwrap();
    assert_eq!(status, 429, "web's bucket is empty");
    let (c2, k2) = client("api", &mesh_ca, "spiffe://mesh/ns/prod/sa/api");
    let (ok, out) = curl_as(mesh_addr, "/limited", ca_arg, (&c2, &k2)).await;
    assert!(ok && out.ends_with("200"), "api has its own bucket: {out}");
    // A forged XFCC header from a client is replaced, not passed on.
    let out = tokio::process::Command::new("curl")
        .args([
            "-sS",
            "-H",
            "x-forwarded-client-cert: URI=spiffe://mesh/ns/prod/sa/ops",
        ])
        .arg(edge.url("outbound", "/forged"))
        .output()
        .await
        .unwrap();
    assert!(out.status.success());
    assert_eq!(
        origin
            .control
            .last_header("x-forwarded-client-cert")
            .as_deref(),
        Some("URI=spiffe://mesh/ns/prod/sa/web")
    );

    let refusals = [
        (
            "rogue",
            client("rogue", &rogue_ca, "spiffe://mesh/ns/prod/sa/web"),
            "untrusted_cert",
        ),
        (
            "dev",
            client("dev", &mesh_ca, "spiffe://mesh/ns/dev/sa/web"),
            "identity_denied",
        ),
    ];
    for (what, (c, k), _) in &refusals {
        let (ok, out) = curl_as(mesh_addr, "/", ca_arg, (c, k)).await;
        assert!(!ok, "{what} must be refused, got {out}");
    }
    let (ok, out) = curl(mesh_addr, "/", &["--cacert", ca_arg]).await;
    assert!(!ok, "no client certificate must be refused, got {out}");

    let metrics = scrape(&mesh).await;
    let count = |result: &str| {
        metric(
            &metrics,
            &format!("outrigger_tls_handshakes_total{{listener=\"inbound\",result=\"{result}\"}}"),
        )
    };
    assert_eq!(count("untrusted_cert"), 1.0);
    assert_eq!(count("identity_denied"), 1.0);
    assert_eq!(count("no_client_cert"), 1.0);
    assert!(count("ok") >= 2.0);
}

/// A TLS client that trusts `roots`, opens a new connection per request, and reports the
/// certificate the server showed.
async fn tls_get(addr: SocketAddr, config: Arc<rustls::ClientConfig>) -> Result<Vec<u8>, String> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let name = ServerName::try_from("localhost").unwrap();
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let shown = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = http::Request::get("/")
        .header("host", "localhost")
        .body(Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status();
    resp.into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?;
    if status != 200 {
        return Err(format!("status {status}"));
    }
    Ok(shown)
}

fn client_config(ca_pem: &str) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    use rustls::pki_types::pem::PemObject;
    roots
        .add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap())
        .unwrap();
    Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth(),
    )
}

fn der(pem: &str) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .to_vec()
}

#[tokio::test]
async fn rotating_the_certificate_under_load_fails_no_request() {
    let origin = Origin::start("app").await;
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("rotation root");
    let old = ca.leaf(&["localhost"]);
    let (cert, key) = write_leaf(dir.path(), "server", &old);
    let proxy = Proxy::start(&one_listener(
        &format!(
            "    tls: {{ cert: {}, key: {} }}\n",
            cert.display(),
            key.display()
        ),
        "",
        origin.addr,
    ))
    .await;
    let addr = proxy.addr("in");
    let config = client_config(&ca.pem);
    // A keep-alive connection from before the rotation, used again after it.
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(config.clone())
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let (mut kept, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let ask = || {
        http::Request::get("/kept")
            .header("host", "localhost")
            .body(Empty::<bytes::Bytes>::new())
            .unwrap()
    };
    assert_eq!(kept.send_request(ask()).await.unwrap().status(), 200);
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let new = ca.leaf(&["localhost"]);
    let new_der = der(&new.cert);
    let seen_new = Arc::new(AtomicUsize::new(0));
    let stop = tokio_util::sync::CancellationToken::new();
    let mut workers = Vec::new();
    for _ in 0..4 {
        let (config, ok, failed, seen_new, stop, new_der) = (
            config.clone(),
            ok.clone(),
            failed.clone(),
            seen_new.clone(),
            stop.clone(),
            new_der.clone(),
        );
        workers.push(tokio::spawn(async move {
            while !stop.is_cancelled() {
                match tls_get(addr, config.clone()).await {
                    Ok(shown) => {
                        ok.fetch_add(1, Ordering::Relaxed);
                        if shown == new_der {
                            seen_new.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Err(e) => {
                        eprintln!("request failed: {e}");
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    // The load is running before anything changes.
    assert!(
        eventually(WAIT, || async { ok.load(Ordering::Relaxed) >= 50 }).await,
        "the load runs"
    );
    // A broken certificate file is refused and the old one keeps serving.
    write_atomically(
        &cert,
        "-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n",
    );
    assert!(
        eventually(WAIT, || async {
            metric(
                &scrape(&proxy).await,
                "outrigger_tls_cert_reloads_total{owner=\"in\",result=\"failed\"}",
            ) >= 1.0
        })
        .await,
        "a broken certificate must be reported"
    );
    let before = ok.load(Ordering::Relaxed);
    // The real rotation: key first, then certificate, as a secret update might land.
    write_atomically(&key, &new.key);
    write_atomically(&cert, &new.cert);
    assert!(
        eventually(WAIT, || async { seen_new.load(Ordering::Relaxed) > 20 }).await,
        "new handshakes must show the new certificate"
    );
    // The load goes on after the rotation.
    let rotated = ok.load(Ordering::Relaxed);
    assert!(
        eventually(WAIT, || async {
            ok.load(Ordering::Relaxed) >= rotated + 50
        })
        .await,
        "the load runs after the rotation"
    );
    stop.cancel();
    for w in workers {
        w.await.unwrap();
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    eprintln!(
        "rotation: {ok} requests ok, {failed} failed; {} showed the new certificate; {before} before rotating",
        seen_new.load(Ordering::Relaxed)
    );
    assert_eq!(failed, 0);
    assert!(ok > 100, "the load must be real: {ok}");
    let metrics = scrape(&proxy).await;
    assert!(
        metric(
            &metrics,
            "outrigger_tls_cert_reloads_total{owner=\"in\",result=\"applied\"}"
        ) >= 1.0
    );
    // The last handshake shows the new certificate, and the old connection still works.
    assert_eq!(tls_get(addr, config).await.unwrap(), new_der);
    let resp = kept.send_request(ask()).await.unwrap();
    assert_eq!(
        resp.status(),
        200,
        "a connection from before the rotation continues"
    );
}

#[tokio::test]
async fn a_missing_or_mismatched_key_is_a_config_error_with_its_position() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("root");
    let (cert, _) = write_leaf(dir.path(), "a", &ca.leaf(&["localhost"]));
    let (_, other_key) = write_leaf(dir.path(), "b", &ca.leaf(&["localhost"]));
    let text = format!(
        "listeners:\n  - name: in\n    address: 127.0.0.1:0\n    tls:\n      cert: {}\n      key: {}\n    routes: [{{ name: r, cluster: c }}]\nclusters:\n  - name: c\n    endpoints: [\"127.0.0.1:1\"]\n",
        cert.display(),
        other_key.display()
    );
    let err = outrigger::control::config::parse("t.yaml", &text)
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("t.yaml:6:7: cannot use"), "{err}");
    assert!(err.contains("does not fit the certificate"), "{err}");
    let missing = text.replace(other_key.to_str().unwrap(), "/nonexistent/key.pem");
    let err = outrigger::control::config::parse("t.yaml", &missing)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("t.yaml:6:7: cannot use `/nonexistent/key.pem`"),
        "{err}"
    );
}

/// The framing check and the header-read timeout run inside TLS too: a slow head gets 408 over
/// the encrypted connection, a smuggling attempt gets 400.
#[tokio::test]
async fn malformed_and_slow_requests_over_tls_get_their_answers() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let origin = Origin::start("app").await;
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("root");
    let (cert, key) = write_leaf(dir.path(), "server", &ca.leaf(&["localhost"]));
    let proxy = Proxy::start(&one_listener(
        &format!(
            "    header_read_timeout: 300ms\n    tls: {{ cert: {}, key: {} }}\n",
            cert.display(),
            key.display()
        ),
        "",
        origin.addr,
    ))
    .await;
    let config = client_config(&ca.pem);
    for (request, expect) in [
        (&b"GET / HTTP/1.1\r\nHost: a\r\nX-Slow: "[..], "HTTP/1.1 408 "),
        (
            &b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"[..],
            "HTTP/1.1 400 ",
        ),
    ] {
        let tcp = tokio::net::TcpStream::connect(proxy.addr("in")).await.unwrap();
        let mut tls = tokio_rustls::TlsConnector::from(config.clone())
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap();
        tls.write_all(request).await.unwrap();
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(WAIT, tls.read_to_end(&mut answer)).await;
        let text = String::from_utf8_lossy(&answer);
        assert!(text.starts_with(expect), "expected {expect}, got {text:?}");
    }
    assert_eq!(origin.hits(), 0);
}

/// A cluster's client certificate is rotated like a listener's: new upstream connections present
/// the new certificate, as the upstream sidecar's `x-forwarded-client-cert` shows.
#[tokio::test]
async fn a_clusters_client_certificate_rotates() {
    let origin = Origin::start("app").await;
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("mesh root");
    let ca_file = write(dir.path(), "ca.pem", &ca.pem);
    let mesh = Proxy::start(&one_listener(
        &tls_listener(
            dir.path(),
            &ca,
            &format!("      client_ca: {}\n", ca_file.display()),
        ),
        "",
        origin.addr,
    ))
    .await;
    let (cert, key) = write_leaf(dir.path(), "client", &ca.leaf(&["spiffe://mesh/sa/old"]));
    // No idle pooling, so every request opens a connection and shows the current certificate.
    let edge = Proxy::start(&format!(
        "listeners:
  - name: out
    address: 127.0.0.1:0
    routes: [{{ name: all, cluster: mesh }}]
clusters:
  - name: mesh
    endpoints: [\"{}\"]
    pool: {{ max_idle_per_endpoint: 0 }}
    tls: {{ ca: {}, server_name: localhost, cert: {}, key: {} }}
",
        mesh.addr("in"),
        ca_file.display(),
        cert.display(),
        key.display()
    ))
    .await;
    let url = edge.url("out", "/x");
    let seen = || origin.control.last_header("x-forwarded-client-cert");
    assert_eq!(get(&h1_client(), &url).await.unwrap().0, 200);
    assert_eq!(seen().as_deref(), Some("URI=spiffe://mesh/sa/old"));
    let new = ca.leaf(&["spiffe://mesh/sa/new"]);
    write_atomically(&key, &new.key);
    write_atomically(&cert, &new.cert);
    assert!(
        eventually(WAIT, || async {
            get(&h1_client(), &url)
                .await
                .is_ok_and(|(s, _, _)| s == 200)
                && seen().as_deref() == Some("URI=spiffe://mesh/sa/new")
        })
        .await,
        "new upstream connections present the new client certificate"
    );
    let metrics = scrape(&edge).await;
    assert!(
        metric(
            &metrics,
            "outrigger_tls_cert_reloads_total{owner=\"mesh\",result=\"applied\"}"
        ) >= 1.0
    );
}

/// `outrigger_tls_handshakes_total` of listener `in` for `result`.
fn handshakes(metrics: &str, result: &str) -> f64 {
    metric(
        metrics,
        &format!("outrigger_tls_handshakes_total{{listener=\"in\",result=\"{result}\"}}"),
    )
}

/// Rewriting the `client_ca` file rotates the CAs whose clients are accepted: after the change,
/// a certificate from the new CA gets in and one from the old CA is refused as untrusted.
#[tokio::test]
async fn client_ca_rotation_changes_which_clients_get_in() {
    let origin = Origin::start("app").await;
    let dir = tempfile::tempdir().unwrap();
    let server_ca = Ca::new("server root");
    let server_ca_file = write(dir.path(), "server-ca.pem", &server_ca.pem);
    let (old_ca, new_ca) = (Ca::new("old client root"), Ca::new("new client root"));
    let client_ca = write(dir.path(), "client-ca.pem", &old_ca.pem);
    let proxy = Proxy::start(&one_listener(
        &tls_listener(
            dir.path(),
            &server_ca,
            &format!("      client_ca: {}\n", client_ca.display()),
        ),
        "",
        origin.addr,
    ))
    .await;
    let addr = proxy.addr("in");
    let ca_arg = server_ca_file.to_str().unwrap();
    let as_client = |name: &str, ca: &Ca| {
        let (c, k) = write_leaf(dir.path(), name, &ca.leaf(&[&format!("{name}.internal")]));
        (
            c.to_str().unwrap().to_owned(),
            k.to_str().unwrap().to_owned(),
        )
    };
    let (old_client, new_client) = (as_client("old", &old_ca), as_client("new", &new_ca));
    let try_as = |(c, k): &(String, String)| {
        let (c, k) = (c.clone(), k.clone());
        async move { curl_as(addr, "/x", ca_arg, (&c, &k)).await }
    };

    let (ok, out) = try_as(&old_client).await;
    assert!(ok && out.ends_with("200"), "the old CA's client: {out}");
    let (ok, out) = try_as(&new_client).await;
    assert!(!ok, "the new CA's client before the rotation: {out}");
    let m = scrape(&proxy).await;
    assert_eq!(
        (handshakes(&m, "ok"), handshakes(&m, "untrusted_cert")),
        (1.0, 1.0)
    );

    write_atomically(&client_ca, &new_ca.pem);
    assert!(
        eventually(WAIT, || async {
            metric(
                &scrape(&proxy).await,
                "outrigger_tls_cert_reloads_total{owner=\"in\",result=\"applied\"}",
            ) == 1.0
        })
        .await,
        "the CA file change is applied"
    );
    let (ok, out) = try_as(&new_client).await;
    assert!(ok && out.ends_with("200"), "the new CA's client: {out}");
    let (ok, out) = try_as(&old_client).await;
    assert!(!ok, "the old CA's client after the rotation: {out}");
    let m = scrape(&proxy).await;
    assert_eq!(
        (handshakes(&m, "ok"), handshakes(&m, "untrusted_cert")),
        (2.0, 2.0)
    );
}

/// A client certificate signed by the trusted CA but past its validity is refused, and counted
/// as `expired_cert` (not as untrusted).
#[tokio::test]
async fn an_expired_client_certificate_is_refused_as_expired() {
    let origin = Origin::start("app").await;
    let dir = tempfile::tempdir().unwrap();
    let server_ca = Ca::new("server root");
    let server_ca_file = write(dir.path(), "server-ca.pem", &server_ca.pem);
    let clients = ExpiringCa::new();
    let client_ca = write(dir.path(), "client-ca.pem", &clients.pem);
    let proxy = Proxy::start(&one_listener(
        &tls_listener(
            dir.path(),
            &server_ca,
            &format!("      client_ca: {}\n", client_ca.display()),
        ),
        "",
        origin.addr,
    ))
    .await;
    let addr = proxy.addr("in");
    let ca_arg = server_ca_file.to_str().unwrap();
    let write_client = |name: &str, expired: bool| {
        let (cert, key) = clients.leaf(&format!("{name}.internal"), expired);
        let c = write(dir.path(), &format!("{name}.crt"), &cert);
        let k = write(dir.path(), &format!("{name}.key"), &key);
        (
            c.to_str().unwrap().to_owned(),
            k.to_str().unwrap().to_owned(),
        )
    };
    let (c, k) = write_client("current", false);
    let (ok, out) = curl_as(addr, "/x", ca_arg, (&c, &k)).await;
    assert!(ok && out.ends_with("200"), "a valid certificate: {out}");
    let (c, k) = write_client("expired", true);
    let (ok, out) = curl_as(addr, "/x", ca_arg, (&c, &k)).await;
    assert!(!ok, "an expired certificate must be refused: {out}");
    let m = scrape(&proxy).await;
    assert_eq!(handshakes(&m, "ok"), 1.0);
    assert_eq!(handshakes(&m, "expired_cert"), 1.0);
    assert_eq!(handshakes(&m, "untrusted_cert"), 0.0);
    assert_eq!(origin.hits(), 1);
}

/// The header-read timeout also bounds the TLS handshake: a client that opens a connection and
/// sends nothing, or half a ClientHello, is closed and counted as `timeout`. No answer is owed,
/// so the connection just ends.
#[tokio::test]
async fn the_header_read_timeout_bounds_the_tls_handshake() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let origin = Origin::start("app").await;
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("root");
    let proxy = Proxy::start(&one_listener(
        &format!(
            "    header_read_timeout: 200ms\n{}",
            tls_listener(dir.path(), &ca, "")
        ),
        "",
        origin.addr,
    ))
    .await;
    let addr = proxy.addr("in");
    // A handshake record announcing a 512-byte ClientHello, and its first 6 bytes.
    let half_hello = [
        0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
    ];
    for (what, sent) in [
        ("nothing", &[][..]),
        ("half a ClientHello", &half_hello[..]),
    ] {
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        tcp.write_all(sent).await.unwrap();
        let mut answer = Vec::new();
        // The read ends with a close or, when the proxy drops bytes it never read, a reset;
        // either way without a byte.
        let _closed_or_reset = tokio::time::timeout(WAIT, tcp.read_to_end(&mut answer))
            .await
            .unwrap_or_else(|_| panic!("a client that sent {what} must be closed"));
        assert!(answer.is_empty(), "{what}: {answer:?}");
    }
    let m = scrape(&proxy).await;
    assert_eq!(handshakes(&m, "timeout"), 2.0);
    assert_eq!(handshakes(&m, "ok"), 0.0);
    assert_eq!(origin.hits(), 0);
}

/// A CA that signs client certificates valid now, or expired: `support::pki` makes only the
/// former.
struct ExpiringCa {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    pem: String,
}

impl ExpiringCa {
    fn new() -> ExpiringCa {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "client root");
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).unwrap();
        ExpiringCa {
            issuer: rcgen::Issuer::new(params, key),
            pem: cert.pem(),
        }
    }

    /// A leaf for the DNS name `name`, valid in 2020 only if `expired`: (certificate, key).
    fn leaf(&self, name: &str, expired: bool) -> (String, String) {
        use rcgen::{CertificateParams, DnType, KeyPair};
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec![name.to_owned()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2020, 12, 31);
        }
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relative_tls_paths_are_found_beside_the_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    std::fs::create_dir(&certs).unwrap();
    let ca = Ca::new("test ca");
    let leaf = ca.leaf(&["localhost"]);
    write_leaf(&certs, "server", &leaf);
    let origin = Origin::start("app").await;
    let config = dir.path().join("proxy.yaml");
    std::fs::write(
        &config,
        with_test_admin(&one_listener(
            "    tls: { cert: certs/server.crt, key: certs/server.key }\n",
            "",
            origin.addr,
        )),
    )
    .unwrap();
    // Started from another folder, where `certs/` does not exist: the paths are the config
    // file's, as in Prometheus, not the working directory's.
    let elsewhere = tempfile::tempdir().unwrap();
    let check = std::process::Command::new(env!("CARGO_BIN_EXE_outrigger"))
        .args(["check", "--config", config.to_str().unwrap()])
        .current_dir(elsewhere.path())
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    let proc = Process::start_with(
        std::process::Command::new(env!("CARGO_BIN_EXE_outrigger"))
            .args(["run", "--config", config.to_str().unwrap()])
            .args(["--log-format", "json"])
            .current_dir(elsewhere.path()),
    );
    let addr = proc.listener("in").await.unwrap();
    let shown = tls_get(addr, client_config(&ca.pem)).await.unwrap();
    assert_eq!(shown, der(&leaf.cert), "the certificate beside the config");
}

/// A TCP connection between two sidecars is mutual TLS, as their HTTP traffic is: the caller's
/// sidecar originates TLS with its certificate, the callee's terminates it and admits only the
/// identities it allows. Half-close still travels end to end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_between_sidecars_is_mutual_tls_with_identity_authorization() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (echo, _task) = tcp_echo().await;
    let dir = tempfile::tempdir().unwrap();
    let mesh_ca = Ca::new("mesh root");
    let ca_file = write(dir.path(), "mesh-ca.pem", &mesh_ca.pem);
    let (cert, key) = write_leaf(dir.path(), "db-server", &mesh_ca.leaf(&["localhost"]));
    // The database's sidecar: TLS in, plain to the database beside it.
    let inbound = Proxy::start(&format!(
        "access_log: true
listeners:
  - name: db-in
    address: 127.0.0.1:0
    protocol: tcp
    cluster: db
    tls:
      cert: {}
      key: {}
      client_ca: {}
      allowed_identities: [\"spiffe://mesh/ns/prod/sa/orders\"]
clusters:
  - name: db
    endpoints: [\"{echo}\"]
",
        cert.display(),
        key.display(),
        ca_file.display()
    ))
    .await;
    // A caller's sidecar: plain in from its app, TLS out with the caller's certificate.
    let caller = |id: &str, name: &str| {
        let (c, k) = write_leaf(dir.path(), name, &mesh_ca.leaf(&[id]));
        format!(
            "listeners:
  - name: db-out
    address: 127.0.0.1:0
    protocol: tcp
    cluster: db
clusters:
  - name: db
    endpoints: [\"{}\"]
    tls: {{ ca: {}, server_name: localhost, cert: {}, key: {} }}
",
            inbound.addr("db-in"),
            ca_file.display(),
            c.display(),
            k.display()
        )
    };
    let orders = Proxy::start(&caller("spiffe://mesh/ns/prod/sa/orders", "orders")).await;
    let batch = Proxy::start(&caller("spiffe://mesh/ns/prod/sa/batch", "batch")).await;

    let talk = |addr: SocketAddr| async move {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"SELECT 1;").await.unwrap();
        s.shutdown().await.unwrap();
        let mut got = Vec::new();
        let _ = s.read_to_end(&mut got).await;
        got
    };
    // The allowed identity reaches the database, with half-close kept across both hops.
    assert_eq!(talk(orders.addr("db-out")).await, b"SELECT 1;bye");
    // Another identity of the same CA is refused at the handshake; nothing reaches the database.
    assert_eq!(talk(batch.addr("db-out")).await, b"");
    // A client without TLS gets a TLS alert at most, nothing of the database.
    let plain = talk(inbound.addr("db-in")).await;
    assert!(
        plain.is_empty() || plain[0] == 21,
        "an alert record, if anything: {plain:?}"
    );
    let metrics = scrape(&inbound).await;
    let shakes = |result: &str| {
        metric(
            &metrics,
            &format!("outrigger_tls_handshakes_total{{listener=\"db-in\",result=\"{result}\"}}"),
        )
    };
    assert_eq!(shakes("ok"), 1.0, "{metrics}");
    assert_eq!(shakes("identity_denied"), 1.0);
    // The bytes are added when the proxy finishes the connection, which can be just after the
    // client has read its end of it.
    assert_eq!(
        metric_reaching(
            &inbound,
            "outrigger_tcp_bytes_total{direction=\"upstream\",listener=\"db-in\"}",
            9.0
        )
        .await,
        9.0
    );
}
