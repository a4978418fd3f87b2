//! Test support: origins that misbehave on command, a TCP echo server, the proxy started in-process
//! or as a real process, and small HTTP clients. Everything binds 127.0.0.1:0.
#![allow(dead_code)] // each test crate uses a different part

pub mod pki;

use std::convert::Infallible;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU16, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Channel, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use outrigger::app::App;
use outrigger::control::config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Notify;

pub type Body = BoxBody<Bytes, hyper::Error>;

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

/// How an origin misbehaves, settable while it runs. Zero means "behave".
#[derive(Default)]
pub struct Control {
    /// Answer every request with this status.
    pub status: AtomicU16,
    /// Answer this share (per mille) of requests with 503.
    pub fail_permille: AtomicU32,
    /// Wait this long before answering every request.
    pub delay_ms: AtomicU64,
    /// This share (per mille) of requests waits `slow_ms` instead.
    pub slow_permille: AtomicU32,
    pub slow_ms: AtomicU64,
    /// Send `retry-after: N` with forced statuses.
    pub retry_after: AtomicU64,
    /// Read the whole request body before a forced status. Otherwise the answer goes out
    /// first and the connection closes with the body unread, and whether the proxy sees the
    /// answer or the reset is a race (RFC 9112 §9.6).
    pub read_before_forced: std::sync::atomic::AtomicBool,
    /// gRPC unary calls end with this status in trailers (after their message).
    pub grpc_status: AtomicU32,
    /// Serve at most this many requests at once; others wait their turn (0: unlimited).
    pub capacity: std::sync::OnceLock<tokio::sync::Semaphore>,
    /// Headers of the latest request.
    pub last_headers: std::sync::Mutex<Option<HeaderMap>>,
    /// Draws for `fail_permille` and `slow_permille`; seeded, so a run can be repeated.
    pub rng: outrigger::rng::Rng,
}

impl Control {
    pub fn set_status(&self, s: u16) {
        self.status.store(s, Ordering::SeqCst);
    }
    pub fn set_delay(&self, ms: u64) {
        self.delay_ms.store(ms, Ordering::SeqCst);
    }
    pub fn last_header(&self, name: &str) -> Option<String> {
        let h = self.last_headers.lock().unwrap();
        h.as_ref()?.get(name)?.to_str().ok().map(str::to_owned)
    }
}

/// An HTTP/1.1 + HTTP/2 origin. Paths: `/status/N`, `/delay/MS`, `/headers`, `/echo` (streams the
/// request body back), `/stream` (one chunk, then waits for `release`), `/grpc...` (see below);
/// anything else answers `NAME METHOD PATH`. Every response carries `x-origin: NAME`.
pub struct Origin {
    pub addr: SocketAddr,
    pub name: String,
    pub hits: Arc<AtomicUsize>,
    pub release: Arc<Notify>,
    pub control: Arc<Control>,
    /// Connections accepted so far, and open now.
    pub conns: Arc<Conns>,
    task: tokio::task::JoinHandle<()>,
}

/// An origin's connection counts.
#[derive(Default)]
pub struct Conns {
    pub accepted: AtomicUsize,
    pub open: AtomicUsize,
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Origin {
    pub async fn start(name: &str) -> Origin {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::serve(listener, name)
    }

    pub fn serve(listener: TcpListener, name: &str) -> Origin {
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let release = Arc::new(Notify::new());
        let control = Arc::new(Control::default());
        let conns = Arc::new(Conns::default());
        let (n, h, r, c, k) = (
            name.to_owned(),
            hits.clone(),
            release.clone(),
            control.clone(),
            conns.clone(),
        );
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                k.accepted.fetch_add(1, Ordering::SeqCst);
                k.open.fetch_add(1, Ordering::SeqCst);
                let (n, h, r, c, k) = (n.clone(), h.clone(), r.clone(), c.clone(), k.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let (n, h, r, c) = (n.clone(), h.clone(), r.clone(), c.clone());
                        async move { Ok::<_, Infallible>(misbehave(&n, &h, r, &c, req).await) }
                    });
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                    k.open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Origin {
            addr,
            name: name.to_owned(),
            hits,
            release,
            control,
            conns,
            task,
        }
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

async fn misbehave(
    name: &str,
    hits: &AtomicUsize,
    release: Arc<Notify>,
    c: &Control,
    req: Request<Incoming>,
) -> Response<Body> {
    *c.last_headers.lock().unwrap() = Some(req.headers().clone());
    let _turn = match c.capacity.get() {
        Some(s) => s.acquire().await.ok(),
        None => None,
    };
    let slow = c.slow_permille.load(Ordering::SeqCst);
    let delay = if slow > 0 && c.rng.below(1000) < u64::from(slow) {
        c.slow_ms.load(Ordering::SeqCst)
    } else {
        c.delay_ms.load(Ordering::SeqCst)
    };
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let forced = c.status.load(Ordering::SeqCst);
    let fail = c.fail_permille.load(Ordering::SeqCst);
    let status = if forced != 0 {
        Some(forced)
    } else if fail > 0 && c.rng.below(1000) < u64::from(fail) {
        Some(503)
    } else {
        None
    };
    if let Some(code) = status {
        if c.read_before_forced.load(Ordering::SeqCst) {
            let _ = req.into_body().collect().await;
        }
        hits.fetch_add(1, Ordering::SeqCst);
        let mut r = Response::new(full(format!("{name} forced {code}")));
        *r.status_mut() = StatusCode::from_u16(code).unwrap();
        let ra = c.retry_after.load(Ordering::SeqCst);
        if ra > 0 {
            r.headers_mut().insert("retry-after", HeaderValue::from(ra));
        }
        r.headers_mut()
            .insert("x-origin", HeaderValue::from_str(name).unwrap());
        return r;
    }
    let grpc_status = c.grpc_status.load(Ordering::SeqCst);
    origin(name, hits, release, grpc_status, req).await
}

async fn origin(
    name: &str,
    hits: &AtomicUsize,
    release: Arc<Notify>,
    grpc_status: u32,
    req: Request<Incoming>,
) -> Response<Body> {
    hits.fetch_add(1, Ordering::SeqCst);
    let path = req.uri().path().to_owned();
    let mut resp = if let Some(code) = path.strip_prefix("/status/") {
        let mut r = Response::new(full(format!("{name} status {code}")));
        *r.status_mut() =
            StatusCode::from_bytes(code.as_bytes()).unwrap_or(StatusCode::BAD_REQUEST);
        r
    } else if let Some(ms) = path.strip_prefix("/delay/") {
        tokio::time::sleep(Duration::from_millis(ms.parse().unwrap_or(0))).await;
        Response::new(full(format!("{name} delayed {ms}")))
    } else if path == "/headers" {
        let mut text = String::new();
        for (k, v) in req.headers() {
            text.push_str(&format!("{}: {}\n", k, v.to_str().unwrap_or("?")));
        }
        Response::new(full(text))
    } else if path == "/echo" {
        Response::new(req.into_body().boxed())
    } else if path == "/stream" {
        let (mut tx, body) = Channel::<Bytes, hyper::Error>::new(1);
        tokio::spawn(async move {
            let _ = tx.send_data(Bytes::from_static(b"first;")).await;
            release.notified().await;
            let _ = tx.send_data(Bytes::from_static(b"second")).await;
        });
        Response::new(body.boxed())
    } else if path.starts_with("/test.Echo/") {
        grpc(&path, req, grpc_status).await
    } else {
        Response::new(full(format!("{name} {} {path}", req.method())))
    };
    resp.headers_mut()
        .insert("x-origin", HeaderValue::from_str(name).unwrap());
    resp
}

/// A gRPC message frame: compression flag, big-endian length, payload.
pub fn grpc_frame(payload: &[u8]) -> Bytes {
    let mut v = Vec::with_capacity(5 + payload.len());
    v.push(0);
    v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    v.extend_from_slice(payload);
    Bytes::from(v)
}

/// Splits a buffer of gRPC frames into payloads.
pub fn grpc_messages(mut buf: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    while buf.len() >= 5 {
        let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
        out.push(String::from_utf8_lossy(&buf[5..5 + len]).into_owned());
        buf = &buf[5 + len..];
    }
    out
}

fn grpc_trailers(status: u32) -> HeaderMap {
    let mut t = HeaderMap::new();
    t.insert("grpc-status", HeaderValue::from(status));
    t.insert("grpc-message", HeaderValue::from_static("done"));
    t
}

/// `Unary` echoes the message; `ServerStream` answers three messages; `Bidi` echoes each message
/// as it arrives. Status travels in trailers, as gRPC does.
async fn grpc(path: &str, req: Request<Incoming>, status: u32) -> Response<Body> {
    let (mut tx, body) = Channel::<Bytes, hyper::Error>::new(4);
    let path = path.to_owned();
    tokio::spawn(async move {
        let mut incoming = req.into_body();
        match path.as_str() {
            "/test.Echo/Unary" => {
                let Ok(all) = incoming.collect().await else {
                    return;
                };
                let msgs = grpc_messages(&all.to_bytes());
                for m in msgs {
                    let _ = tx
                        .send_data(grpc_frame(format!("echo:{m}").as_bytes()))
                        .await;
                }
            }
            "/test.Echo/ServerStream" => {
                let _ = incoming.collect().await;
                for i in 0..3 {
                    let _ = tx
                        .send_data(grpc_frame(format!("msg-{i}").as_bytes()))
                        .await;
                }
            }
            "/test.Echo/Bidi" => {
                while let Some(Ok(frame)) = incoming.frame().await {
                    if let Ok(data) = frame.into_data() {
                        for m in grpc_messages(&data) {
                            let _ = tx
                                .send_data(grpc_frame(format!("echo:{m}").as_bytes()))
                                .await;
                        }
                    }
                }
            }
            _ => {
                let _ = tx.send_trailers(grpc_trailers(12)).await;
                return;
            }
        }
        let _ = tx.send_trailers(grpc_trailers(status)).await;
    });
    let mut r = Response::new(body.boxed());
    r.headers_mut()
        .insert("content-type", HeaderValue::from_static("application/grpc"));
    r
}

/// A TCP server that echoes what it reads and, once the client has finished sending, writes
/// `bye` and closes: it shows that half-close travels through the proxy.
pub async fn tcp_echo() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move { echo_then_bye(&mut s).await });
        }
    });
    (addr, task)
}

/// Echoes what `s` sends until it finishes sending, then writes `bye` and closes.
pub async fn echo_then_bye(s: &mut tokio::net::TcpStream) {
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if s.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
    let _ = s.write_all(b"bye").await;
    let _ = s.shutdown().await;
}

/// A loopback port held for a process the test starts, kills and starts again on the same port.
///
/// A port that is merely bound and released can be handed to another test's `bind(0)` or used
/// as a connection's source port while its process is down; the restarted process then fails to
/// bind, or traffic meant for it reaches another test's server. The reservation is a socket bound
/// with `SO_REUSEADDR` that never listens: the kernel skips the port for other sockets, while a
/// process that also sets `SO_REUSEADDR` (Python's `http.server`, tokio) may bind and listen on
/// it, and connections to it are refused whenever that process is down.
pub struct ReservedPort {
    _socket: tokio::net::TcpSocket,
    /// The reserved port.
    pub port: u16,
}

impl ReservedPort {
    /// Reserves a free port on a loopback address.
    pub fn on(ip: &str) -> ReservedPort {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_reuseaddr(true).unwrap();
        socket
            .bind(SocketAddr::new(ip.parse().unwrap(), 0))
            .unwrap();
        let port = socket.local_addr().unwrap().port();
        ReservedPort {
            _socket: socket,
            port,
        }
    }

    /// Reserves a free port on a loopback address until the test process exits.
    pub fn for_the_run(ip: &str) -> u16 {
        let reserved = ReservedPort::on(ip);
        let port = reserved.port;
        std::mem::forget(reserved);
        port
    }
}

/// The `members:` lines of a mesh config naming `members` (id, mesh address).
pub fn member_list(members: &[(u64, String)]) -> String {
    members
        .iter()
        .map(|(i, a)| format!("    {i}: {a}\n"))
        .collect()
}

/// Adds a loopback admin address on port 0 unless the YAML names one.
pub fn with_test_admin(yaml: &str) -> String {
    if yaml.contains("admin:") {
        yaml.to_owned()
    } else {
        format!("admin:\n  address: 127.0.0.1:0\n{yaml}")
    }
}

/// The proxy started in-process from a real config file in a temp directory.
pub struct Proxy {
    pub app: App,
    pub dir: tempfile::TempDir,
    pub path: PathBuf,
}

impl Proxy {
    pub async fn start(yaml: &str) -> Proxy {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outrigger.yaml");
        std::fs::write(&path, with_test_admin(yaml)).unwrap();
        let loaded =
            config::load_file(&path).unwrap_or_else(|e| panic!("test config invalid:\n{e}"));
        let app = App::start(loaded, Some(path.clone())).await.unwrap();
        Proxy { app, dir, path }
    }

    pub fn addr(&self, listener: &str) -> SocketAddr {
        self.app
            .listener_addr(listener)
            .unwrap_or_else(|| panic!("no listener {listener}"))
    }

    pub fn url(&self, listener: &str, path: &str) -> String {
        format!("http://{}{}", self.addr(listener), path)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.app.admin_addr(), path)
    }

    /// Replaces the config the way editors do: write a temp file, rename it over the old one.
    pub fn write_config(&self, yaml: &str) {
        write_atomically(&self.path, &with_test_admin(yaml));
    }
}

pub fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// The `outrigger` binary running as a real process, logging JSON.
pub struct Process {
    pub child: Child,
    pub admin: SocketAddr,
    pub logs: Arc<std::sync::Mutex<Vec<String>>>,
}

impl Process {
    /// Starts `outrigger run --config PATH` and waits until it reports its admin address.
    pub fn start(config: &Path) -> Process {
        Self::start_with(Command::new(env!("CARGO_BIN_EXE_outrigger")).args([
            "run",
            "--config",
            config.to_str().unwrap(),
            "--log-format",
            "json",
        ]))
    }

    pub fn start_with(cmd: &mut Command) -> Process {
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let logs = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let keep = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                    if v["message"] == "outrigger started" {
                        let _ = tx.send(v["admin"].as_str().unwrap_or_default().to_owned());
                    }
                }
                keep.lock().unwrap().push(line);
            }
        });
        let admin = rx
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("outrigger did not start"));
        Process {
            child,
            admin: admin.parse().unwrap(),
            logs,
        }
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} failed");
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin, path)
    }

    /// The bound address of a listener, read from the admin `/config`.
    pub async fn listener(&self, name: &str) -> Option<SocketAddr> {
        let (_, _, body) = get(&h1_client(), &self.admin_url("/config")).await.ok()?;
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        v["listeners"]
            .as_array()?
            .iter()
            .find(|l| l["name"] == name)?["bound_address"]
            .as_str()?
            .parse()
            .ok()
    }

    pub fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let step = Duration::from_millis(20);
        for _ in 0..=within.as_millis() / step.as_millis() {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(step);
        }
        None
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub type HttpClient = Client<HttpConnector, Body>;

pub fn h1_client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

pub fn h2_client() -> HttpClient {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed()
}

pub fn body(b: impl Into<Bytes>) -> Body {
    full(b)
}

/// GETs `url`; returns status, headers and body text.
pub async fn get(
    client: &HttpClient,
    url: &str,
) -> Result<(StatusCode, HeaderMap, String), String> {
    send(client, Request::get(url).body(empty()).unwrap()).await
}

pub async fn send(
    client: &HttpClient,
    req: Request<Body>,
) -> Result<(StatusCode, HeaderMap, String), String> {
    let resp = client.request(req).await.map_err(|e| format!("{e:?}"))?;
    let (parts, body) = resp.into_parts();
    let bytes = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok((
        parts.status,
        parts.headers,
        String::from_utf8_lossy(&bytes).into_owned(),
    ))
}

/// Latency percentile (0–100) of sorted durations.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// A metric's value in a Prometheus text scrape (0 if absent).
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
}

/// Scrapes the proxy's metrics.
pub async fn scrape(proxy: &Proxy) -> String {
    get(&h1_client(), &proxy.admin_url("/metrics"))
        .await
        .unwrap()
        .2
}

/// Polls `check` every 10 ms until it holds or `within` passes.
pub async fn eventually<F, Fut>(within: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < deadline {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

/// Reads `series` from `proxy`'s metrics until it is `value` (for up to 5 s) and returns the last
/// reading: for counters the proxy updates just after the client has seen its answer.
pub async fn metric_reaching(proxy: &Proxy, series: &str, value: f64) -> f64 {
    let reached = || async { metric(&scrape(proxy).await, series) == value };
    eventually(Duration::from_secs(5), reached).await;
    metric(&scrape(proxy).await, series)
}

/// The `x-outrigger-error` reason of a response, or "" if absent.
pub fn reason(headers: &HeaderMap) -> &str {
    headers
        .get("x-outrigger-error")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

/// A config with one HTTP listener `in` whose last route, `all`, sends everything to cluster
/// `app` at `origin`. `listener` adds indented fields to the listener (each line starting with
/// four spaces); `routes` adds routes before `all` (each starting with `      - `).
pub fn one_listener(listener: &str, routes: &str, origin: SocketAddr) -> String {
    format!(
        "listeners:
  - name: in
    address: 127.0.0.1:0
{listener}    routes:
{routes}      - name: all
        cluster: app
clusters:
  - name: app
    endpoints: [\"{origin}\"]
"
    )
}

/// Python's `http.server` on a port: a real endpoint process to kill. Its listen backlog is
/// raised from socketserver's 5, which can drop a connection even under this light load.
pub fn python_origin(port: u16, dir: &std::path::Path) -> Child {
    let script = "import http.server as h, sys\n\
                  h.ThreadingHTTPServer.request_queue_size = 256\n\
                  h.test(HandlerClass=h.SimpleHTTPRequestHandler, port=int(sys.argv[1]), bind='127.0.0.1')";
    Command::new("python3")
        .args(["-c", script, &port.to_string()])
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("python3 is installed by .ci/run")
}

/// Endpoint processes, killed when dropped (also when a test fails half-way).
pub struct Children(pub Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub async fn wait_listening(port: u16) {
    assert!(
        eventually(Duration::from_secs(10), || async move {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
        })
        .await,
        "python origin on {port} did not start"
    );
}
