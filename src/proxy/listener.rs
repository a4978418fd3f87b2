//! Accepting connections: one accept loop per bound listener, one task per connection.
//!
//! A listener's behaviour lives in a swappable [`ListenerState`], read afresh for every connection
//! and every HTTP request, so a reload changes routes without rebinding. Each loop has its own stop
//! token: cancelling it stops accepting and makes the listener's connections drain.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use prometheus::IntGauge;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::control::config::model::RequestIdMode;
use crate::control::config::resilience::LoadShedConfig;
use crate::control::config::Limits;
use crate::proxy::cluster::Cluster;
use crate::proxy::framing::Guarded;
use crate::proxy::http::{self, Peer, Proto};
use crate::proxy::resilience::load_shed::Limiter;
use crate::proxy::router::RouteTable;
use crate::proxy::tcp;
use crate::proxy::workers::Workers;
use crate::rng::Rng;
use crate::telemetry::metrics::{Handshake, ListenerMetrics, RouteMetrics};
use crate::tls::{self, ServerTls, ServerTlsConfig};

/// Pause after an accept error (such as running out of file descriptors) before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(20);

/// How long a stopping listener keeps accepting after it refused new handshakes: enough for a
/// handshake already under way (its SYN answered) to complete, so that its client is served
/// rather than reset. Bounded, so a listener whose filter could not be attached still closes.
const CLOSE_SETTLE: Duration = Duration::from_millis(100);

/// A socket filter that drops TCP segments with SYN set and ACK clear (new connection attempts)
/// and passes every other segment. Classic BPF over the TCP header: load the flags byte, keep
/// SYN|ACK, drop when only SYN is left.
const DROP_SYN: [(u16, u8, u8, u32); 5] = [
    (0x30, 0, 0, 13),          // ldb [13]        (TCP flags)
    (0x54, 0, 0, 0x12),        // and #0x12       (SYN | ACK)
    (0x15, 0, 1, 0x02),        // jeq #0x02, drop, pass
    (0x06, 0, 0, 0),           // drop:  ret #0
    (0x06, 0, 0, 0xffff_ffff), // pass: ret #-1 (whole segment)
];

/// Makes the kernel ignore new connection attempts on a listener about to close.
///
/// Closing a listening socket resets every connection still in its backlog or mid-handshake:
/// their clients have seen the connect succeed and get ECONNRESET on their first request. With
/// the SYNs dropped first, the only connections left are those already under way, which the
/// accept loop serves during `CLOSE_SETTLE`; a client whose SYN was dropped retries it after its
/// retransmission timeout, finds the port closed, and gets a clean "connection refused".
fn refuse_new_handshakes(socket: &TcpListener, name: &str) {
    let program = DROP_SYN.map(|(code, jt, jf, k)| socket2::SockFilter::new(code, jt, jf, k));
    if let Err(e) = socket2::SockRef::from(socket).attach_filter(&program) {
        // Without it the close still works; a connect racing it may be reset.
        tracing::debug!(listener = %name, error = %e, "could not filter new handshakes");
    }
}

/// What a listener does, as of the current config.
pub struct ListenerState {
    /// Listener name.
    pub name: Arc<str>,
    /// HTTP routes or a TCP cluster.
    pub kind: ListenerKind,
    /// Resolved metric handles.
    pub metrics: ListenerMetrics,
    /// Request metrics of answers given before any route matched (`route="-"`).
    pub unmatched: RouteMetrics,
    /// Whether requests and connections are logged.
    pub access_log: bool,
    /// Time an HTTP/1 client gets to send a request's headers.
    pub header_read_timeout: Option<Duration>,
    /// Connections with no request for this long are closed gracefully.
    pub idle_timeout: Option<Duration>,
    /// The adaptive limiter and its config, kept across reloads while the config holds.
    pub shed: Option<(LoadShedConfig, Arc<Limiter>)>,
    /// TLS termination and its config, kept (with its file watch) across reloads while the
    /// config holds.
    pub tls: Option<(ServerTlsConfig, Arc<ServerTls>)>,
    /// Connection, header and HTTP/2 limits.
    pub limits: Limits,
    /// Whether a caller's `x-request-id` is kept or replaced.
    pub request_id: RequestIdMode,
    /// Where each connection's generator of request ids is seeded from.
    pub rng: Rng,
}

/// The compiled behaviour of a listener.
pub enum ListenerKind {
    /// Route HTTP requests.
    Http(RouteTable),
    /// Splice TCP connections to this cluster.
    Tcp(Arc<Cluster>),
}

/// A bound listener with its accept loop running.
pub struct Running {
    /// The address in the config (may have port 0).
    pub configured: SocketAddr,
    /// The address actually bound.
    pub local: SocketAddr,
    /// Live state, swapped on reload.
    pub state: Arc<ArcSwap<ListenerState>>,
    /// Stops the accept loop and drains its connections.
    pub stop: CancellationToken,
}

/// The sockets of one listener: one per worker, all bound to the same address.
pub struct Sockets(Vec<std::net::TcpListener>);

/// Pending connections the kernel queues per socket (tokio's default).
const BACKLOG: i32 = 1024;

/// Binds `address` once per worker; binding happens before a config is committed so a failure
/// rejects it whole. With more than one worker the sockets share the port (`SO_REUSEPORT`) and
/// the kernel spreads new connections over them; the first socket fixes the port when the
/// config asks for port 0.
pub fn bind(address: SocketAddr, workers: usize) -> std::io::Result<Sockets> {
    let shared = workers > 1;
    let mut sockets = Vec::with_capacity(workers);
    let mut at = address;
    for _ in 0..workers.max(1) {
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(at),
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )?;
        // As tokio's own bind: a restarted proxy can bind while old connections linger.
        socket.set_reuse_address(true)?;
        if shared {
            socket.set_reuse_port(true)?;
        }
        socket.set_nonblocking(true)?;
        socket.bind(&at.into())?;
        socket.listen(BACKLOG)?;
        let socket: std::net::TcpListener = socket.into();
        at = socket.local_addr()?;
        sockets.push(socket);
    }
    Ok(Sockets(sockets))
}

impl Sockets {
    /// The address bound.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        match self.0.first() {
            Some(s) => s.local_addr(),
            None => Err(std::io::ErrorKind::NotConnected.into()),
        }
    }
}

/// Starts accepting on `sockets`, one accept loop on each worker; connections are tracked by
/// `tracker`. Every worker reads the same [`ListenerState`], so a reload reaches them all at once.
pub fn spawn(
    sockets: Sockets,
    configured: SocketAddr,
    state: ListenerState,
    stop: CancellationToken,
    tracker: &TaskTracker,
    workers: &Workers,
) -> std::io::Result<Running> {
    let local = sockets.local_addr()?;
    let state = Arc::new(ArcSwap::from_pointee(state));
    let running = Running {
        configured,
        local,
        state: state.clone(),
        stop: stop.clone(),
    };
    // Shared by every worker's loop and connection, and kept across reloads, so the cap counts
    // them all.
    let open = Arc::new(AtomicUsize::new(0));
    let mut sockets = sockets.0.into_iter();
    workers.each(|worker| {
        let socket = sockets.next();
        let (state, stop, tracker, open) =
            (state.clone(), stop.clone(), tracker.clone(), open.clone());
        tracker.clone().track_future(async move {
            let Some(socket) = socket else { return };
            // Registered with the worker's own reactor: this runs on the worker.
            match TcpListener::from_std(socket) {
                Ok(socket) => accept_loop(socket, state, stop, tracker, open, worker).await,
                Err(e) => {
                    tracing::error!(listener = %state.load().name, error = %e, "cannot accept");
                }
            }
        })
    });
    Ok(running)
}

async fn accept_loop(
    socket: TcpListener,
    state: Arc<ArcSwap<ListenerState>>,
    stop: CancellationToken,
    tracker: TaskTracker,
    open: Arc<AtomicUsize>,
    worker: usize,
) {
    let mut limits = state.load().limits;
    let mut server = Arc::new(http::server(&limits));
    let mut closing = None;
    loop {
        if stop.is_cancelled() && closing.is_none() {
            closing = Some(tokio::time::Instant::now() + CLOSE_SETTLE);
            refuse_new_handshakes(&socket, &state.load().name);
        }
        let accepted = if let Some(deadline) = closing {
            // Stopping: new handshakes are refused (see `refuse_new_handshakes`); those already
            // under way complete and, like connections waiting in the backlog, are served (and
            // told to close) rather than reset when the socket is dropped. The loop ends
            // `CLOSE_SETTLE` after the stop.
            match tokio::time::timeout_at(deadline, socket.accept()).await {
                Ok(Ok(a)) => Ok(a),
                Ok(Err(_)) | Err(_) => break,
            }
        } else {
            tokio::select! {
                () = stop.cancelled() => continue,
                accepted = socket.accept() => accepted,
            }
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                let name = state.load().name.clone();
                tracing::warn!(listener = %name, error = %e, "accept failed");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let current = state.load_full();
        if open.load(Ordering::Acquire) >= current.limits.max_connections as usize {
            // Closing at once (rather than leaving it in the backlog) tells the client now, and
            // keeps the kernel's queue for connections that can be served.
            current.metrics.rejected.inc();
            drop(stream);
            continue;
        }
        if current.limits != limits {
            limits = current.limits;
            server = Arc::new(http::server(&limits));
        }
        let _ = stream.set_nodelay(true);
        current.metrics.connections.inc();
        if let Some(c) = current.metrics.by_worker.get(worker) {
            c.inc();
        }
        let open = OpenConnection::new(&current.metrics.open_connections, &open);
        match &current.kind {
            ListenerKind::Http(_) => {
                let (state, stop, server) = (state.clone(), stop.clone(), server.clone());
                let tls = current.tls.as_ref().map(|(_, t)| t.clone());
                let (metrics, timeout) = (current.metrics.clone(), current.header_read_timeout);
                let max_head = current.limits.max_header_bytes as usize;
                // Two tasks, not one with two arms: a task is as large as its largest state,
                // and a plain connection must not carry a TLS handshake's.
                match tls {
                    None => tracker.spawn(async move {
                        let io = Guarded::new(stream, false, timeout, max_head, metrics.guard);
                        let switch = io.switch();
                        let who = Peer::default();
                        http::serve(io, switch, peer, who, state, stop, server).await;
                        drop(open);
                    }),
                    Some(tls) => tracker.spawn(async move {
                        let Some((stream, who)) =
                            handshake(stream, peer, &tls, timeout, &metrics).await
                        else {
                            return;
                        };
                        let h2 = who.proto == Proto::H2;
                        let io = Guarded::new(stream, h2, timeout, max_head, metrics.guard.clone());
                        let switch = io.switch();
                        http::serve(io, switch, peer, who, state, stop, server).await;
                        drop(open);
                    }),
                };
            }
            ListenerKind::Tcp(cluster) => {
                let (name, cluster) = (current.name.clone(), cluster.clone());
                let (metrics, log) = (current.metrics.clone(), current.access_log);
                let tls = current.tls.as_ref().map(|(_, t)| t.clone());
                let timeout = current.header_read_timeout;
                let drain = stop.clone();
                tracker.spawn(async move {
                    match tls {
                        None => {
                            tcp::splice(stream, peer, None, &name, cluster, metrics, log, drain)
                                .await;
                        }
                        // The handshake checks the client's certificate and identity: a
                        // client not allowed never reaches the upstream.
                        Some(tls) => {
                            let Some((stream, who)) =
                                handshake(stream, peer, &tls, timeout, &metrics).await
                            else {
                                return;
                            };
                            let identity = who.identity.as_deref().and_then(|ids| ids.first());
                            let identity = identity.map(String::as_str);
                            tcp::splice(
                                stream, peer, identity, &name, cluster, metrics, log, drain,
                            )
                            .await;
                        }
                    }
                    drop(open);
                });
            }
        }
    }
    tracing::info!(listener = %state.load().name, "stopped accepting");
}

/// Runs the TLS handshake, bounded by the header-read timeout, and counts its result.
async fn handshake(
    stream: TcpStream,
    peer: SocketAddr,
    tls: &ServerTls,
    timeout: Option<Duration>,
    metrics: &ListenerMetrics,
) -> Option<(TlsStream<TcpStream>, Peer)> {
    let acceptor = TlsAcceptor::from(tls.current().config.clone());
    let accepting = acceptor.accept(stream);
    let result = match timeout {
        Some(t) => tokio::time::timeout(t, accepting).await,
        None => Ok(accepting.await),
    };
    let label = match result {
        Ok(Ok(stream)) => {
            metrics.handshake(Handshake::Ok);
            let (_, session) = stream.get_ref();
            let proto = match session.alpn_protocol() {
                Some(b"h2") => Proto::H2,
                Some(b"http/1.1") => Proto::H1,
                _ => Proto::Read,
            };
            let identity = session
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| Arc::from(tls::identities(c)));
            return Some((
                stream,
                Peer {
                    identity,
                    tls: true,
                    proto,
                },
            ));
        }
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "TLS handshake failed");
            tls::handshake_failure(&e)
        }
        Err(_) => Handshake::Timeout,
    };
    metrics.handshake(label);
    None
}

/// Counts a connection in the open-connections gauge and the listener's cap while it lives.
struct OpenConnection(IntGauge, Arc<AtomicUsize>);

impl OpenConnection {
    fn new(gauge: &IntGauge, open: &Arc<AtomicUsize>) -> Self {
        gauge.inc();
        open.fetch_add(1, Ordering::AcqRel);
        Self(gauge.clone(), open.clone())
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.dec();
        self.1.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tasks::Tasks;
    use crate::telemetry::metrics::Metrics;
    use crate::tls::ServerMaterial;
    use tokio::io::AsyncWriteExt;

    /// A self-signed certificate for `localhost`, written to `dir`.
    fn tls_config(dir: &std::path::Path) -> ServerTlsConfig {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let (cert_path, key_path) = (dir.join("server.crt"), dir.join("server.key"));
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        ServerTlsConfig {
            cert: cert_path,
            key: key_path,
            client_ca: None,
            allowed_identities: Vec::new(),
        }
    }

    /// A client that sends half a ClientHello and then nothing is cut off exactly when the
    /// header-read timeout ends, not before, and counted as `timeout`.
    #[tokio::test(start_paused = true)]
    async fn the_handshake_ends_at_the_header_read_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = tls_config(dir.path());
        let metrics = Metrics::new().unwrap();
        let listener = metrics.listener.resolve(
            "in",
            metrics.http.local_replies("in"),
            metrics.control.listener_cert("in"),
            1,
        );
        let tasks = Tasks::new();
        let material = ServerMaterial::load(&cfg).unwrap();
        let tls = tls::rotating_server(cfg, material, "in", listener.cert.clone(), &tasks);
        let socket = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(socket.local_addr().unwrap())
            .await
            .unwrap();
        // A handshake record announcing 512 bytes, and the first two of them.
        client
            .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00])
            .await
            .unwrap();
        let (stream, peer) = socket.accept().await.unwrap();
        let limit = Duration::from_secs(10);
        let started = tokio::time::Instant::now();
        let done = handshake(stream, peer, &tls, Some(limit), &listener).await;
        let took = started.elapsed();
        assert!(done.is_none());
        assert!(
            took >= limit && took < limit + Duration::from_millis(5),
            "{took:?}"
        );
        let text = String::from_utf8(metrics.encode()).unwrap();
        assert!(
            text.contains("outrigger_tls_handshakes_total{listener=\"in\",result=\"timeout\"} 1"),
            "{text}"
        );
        tasks.cancel();
    }
}
