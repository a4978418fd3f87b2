//! Accepting connections: one accept loop per bound listener, one task per connection.
//!
//! A listener's behaviour lives in a swappable [`ListenerState`], read afresh for every connection
//! and every HTTP request, so a reload changes routes without rebinding. Each loop has its own stop
//! token: cancelling it stops accepting and makes the listener's connections drain.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use prometheus::IntGauge;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::control::config::resilience::LoadShedConfig;
use crate::proxy::connect::Cluster;
use crate::proxy::http;
use crate::proxy::resilience::load_shed::Limiter;
use crate::proxy::router::RouteTable;
use crate::proxy::tcp;
use crate::telemetry::metrics::ListenerMetrics;

/// Pause after an accept error (such as running out of file descriptors) before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(20);

/// What a listener does, as of the current config.
pub struct ListenerState {
    /// Listener name.
    pub name: Arc<str>,
    /// HTTP routes or a TCP cluster.
    pub kind: ListenerKind,
    /// Resolved metric handles.
    pub metrics: ListenerMetrics,
    /// Whether requests and connections are logged.
    pub access_log: bool,
    /// Time an HTTP/1 client gets to send a request's headers.
    pub header_read_timeout: Option<Duration>,
    /// Connections with no request for this long are closed gracefully.
    pub idle_timeout: Option<Duration>,
    /// The adaptive limiter and its config, kept across reloads while the config holds.
    pub shed: Option<(LoadShedConfig, Arc<Limiter>)>,
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

/// Binds `address`; binding happens before a config is committed so a failure rejects it whole.
pub async fn bind(address: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(address).await
}

/// Starts accepting on `socket`; connections are tracked by `tracker`.
pub fn spawn(
    socket: TcpListener,
    configured: SocketAddr,
    state: ListenerState,
    stop: CancellationToken,
    tracker: &TaskTracker,
) -> std::io::Result<Running> {
    let local = socket.local_addr()?;
    let state = Arc::new(ArcSwap::from_pointee(state));
    let running = Running {
        configured,
        local,
        state: state.clone(),
        stop: stop.clone(),
    };
    tracker.spawn(accept_loop(socket, state, stop, tracker.clone()));
    Ok(running)
}

async fn accept_loop(
    socket: TcpListener,
    state: Arc<ArcSwap<ListenerState>>,
    stop: CancellationToken,
    tracker: TaskTracker,
) {
    let mut header_read_timeout = state.load().header_read_timeout;
    let mut server = Arc::new(http::server(header_read_timeout));
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => break,
            accepted = socket.accept() => accepted,
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
        if current.header_read_timeout != header_read_timeout {
            header_read_timeout = current.header_read_timeout;
            server = Arc::new(http::server(header_read_timeout));
        }
        current.metrics.connections.inc();
        let open = OpenConnection::new(&current.metrics.open_connections);
        match &current.kind {
            ListenerKind::Http(_) => {
                let (state, stop, server) = (state.clone(), stop.clone(), server.clone());
                tracker.spawn(async move {
                    http::serve(stream, peer, state, stop, server).await;
                    drop(open);
                });
            }
            ListenerKind::Tcp(cluster) => {
                let (name, cluster) = (current.name.clone(), cluster.clone());
                let (metrics, log) = (current.metrics.clone(), current.access_log);
                tracker.spawn(async move {
                    tcp::splice(stream, peer, &name, cluster, metrics, log).await;
                    drop(open);
                });
            }
        }
    }
    tracing::info!(listener = %state.load().name, "stopped accepting");
}

/// Counts a connection in the open-connections gauge for as long as it lives.
struct OpenConnection(IntGauge);

impl OpenConnection {
    fn new(gauge: &IntGauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.dec();
    }
}
