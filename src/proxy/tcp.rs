//! The L4 proxy: splices a downstream TCP connection to one endpoint of a cluster.
//!
//! Half-close is kept: when one side finishes sending, the other side's write half is shut down
//! and bytes keep flowing the other way until it finishes too. A failed connect closes the
//! downstream connection and is counted. Either side may be TLS: terminated by the listener
//! (with client certificates and identity authorization), originated by the cluster.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::proxy::cluster::Cluster;
use crate::proxy::tunnel;
use crate::telemetry::metrics::ListenerMetrics;

/// Splices `downstream` to an endpoint of `cluster` until both directions are finished. The
/// downstream side may be TLS the listener terminated (`identity`: the client certificate's
/// first identity); the upstream side is TLS when the cluster has a `tls` block.
#[allow(clippy::too_many_arguments)] // one call site, each argument a different thing
pub async fn splice<D>(
    downstream: D,
    peer: SocketAddr,
    identity: Option<&str>,
    listener: &str,
    cluster: Arc<Cluster>,
    metrics: ListenerMetrics,
    access_log: bool,
    drain: CancellationToken,
) where
    D: AsyncRead + AsyncWrite + Unpin,
{
    let Some(endpoint) = cluster.pick() else {
        tracing::warn!(
            listener,
            cluster = cluster.name(),
            "tcp cluster has no endpoints"
        );
        return;
    };
    let limit = cluster.config.connect_timeout;
    let connect = async {
        let tcp = TcpStream::connect(endpoint.authority.as_str()).await?;
        let _ = tcp.set_nodelay(true);
        match &cluster.client.tls {
            Some(tls) => tls
                .connect(tcp, endpoint.authority.host())
                .await
                .map(|s| Upstream::Tls(Box::new(s))),
            None => Ok(Upstream::Plain(tcp)),
        }
    };
    let upstream = match tokio::time::timeout(limit, connect).await {
        Ok(Ok(s)) => {
            cluster.tcp_connected(&endpoint, true);
            s
        }
        Ok(Err(e)) => {
            cluster.tcp_connected(&endpoint, false);
            let refused = e.kind() == std::io::ErrorKind::ConnectionRefused;
            cluster.connect_failed(&endpoint, refused);
            tracing::debug!(listener, %peer, endpoint = %endpoint.authority, error = %e, "tcp connect failed");
            return;
        }
        Err(_) => {
            cluster.tcp_connected(&endpoint, false);
            cluster.connect_failed(&endpoint, false);
            tracing::debug!(listener, %peer, endpoint = %endpoint.authority, "tcp connect timed out");
            return;
        }
    };
    let _in_flight = endpoint.start();
    let (end, up, down) = match upstream {
        Upstream::Plain(s) => tunnel::splice(downstream, s, None, &drain).await,
        Upstream::Tls(s) => tunnel::splice(downstream, s, None, &drain).await,
    };
    metrics.bytes_upstream.inc_by(up);
    metrics.bytes_downstream.inc_by(down);
    if access_log {
        tracing::info!(target: "access", listener, %peer, cluster = cluster.name(),
            endpoint = %endpoint.authority, peer_identity = identity.unwrap_or("-"),
            bytes_up = up, bytes_down = down, end = end.name());
    }
}

/// The upstream side of a splice: TLS streams are boxed, being large and the rarer case.
enum Upstream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}
