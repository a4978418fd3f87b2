//! Upgraded connections (WebSockets and other `Upgrade:` protocols): once the proxy relayed an
//! upstream's `101`, the client's and the upstream's connections are spliced byte for byte.
//!
//! Half-close is kept, as for TCP listeners: when one side finishes sending, the other side's
//! write half is shut down and bytes keep flowing the other way. The route's `idle_timeout`
//! closes a tunnel in which neither side sent anything for that long; a draining listener closes
//! it once it is quiet for [`DRAIN_QUIET`] (TCP splices share this). Bytes are counted per
//! direction and the end is one access-log line.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::HeaderValue;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::proxy::h1::Upgraded;
use crate::telemetry::metrics::UpgradeMetrics;

/// A switch the proxy relayed, waiting for both connections to be handed over.
pub struct Pending {
    /// The client's side, once hyper has written the `101` to it (the proxy's own HTTP/1.1
    /// server hands its connection over directly, see [`run_over`]).
    pub client: OnUpgrade,
    /// The upstream's side, whose `101` was read.
    pub upstream: Upgraded,
    /// The protocol switched to, for the log.
    pub protocol: HeaderValue,
    /// Silence after which the tunnel is closed; `None` never.
    pub idle: Option<Duration>,
    /// The listener's upgrade counters.
    pub metrics: UpgradeMetrics,
    /// Who the client is, and which listener and route, when the access log is on.
    pub log: Option<(Arc<str>, Arc<str>, SocketAddr)>,
    /// Fires when the listener drains: the tunnel then closes once it is quiet.
    pub drain: CancellationToken,
}

/// How a splice ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Both sides finished sending.
    Closed,
    /// Neither side sent anything for the idle timeout.
    Idle,
    /// A side failed (reset, or the handover did not happen).
    Error,
    /// The listener drained and the tunnel went quiet.
    Drained,
}

impl End {
    /// The `end` field of the access line.
    pub fn name(self) -> &'static str {
        match self {
            End::Closed => "closed",
            End::Idle => "idle_timeout",
            End::Error => "error",
            End::Drained => "drained",
        }
    }
}

/// Buffer size of each direction: 64 KiB instead of tokio's 8 KiB default, so bulk transfers
/// need a quarter of the wake-ups and syscalls, for 112 KiB more per open connection.
const SPLICE_BUFFER: usize = 64 * 1024;

/// Copies both ways between `client` and `upstream` until both finish, neither sends for
/// `idle`, or `drain` fires and the connection goes quiet. Returns how it ended and the bytes
/// read from the client and from the upstream. TCP listeners and tunnels both splice here.
pub async fn splice<C, U>(
    client: C,
    upstream: U,
    idle_limit: Option<Duration>,
    drain: &CancellationToken,
) -> (End, u64, u64)
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let activity = Arc::new(Activity::new());
    let mut client = Watched::new(client, activity.clone());
    let mut upstream = Watched::new(upstream, activity.clone());
    let copy = tokio::io::copy_bidirectional_with_sizes(
        &mut client,
        &mut upstream,
        SPLICE_BUFFER,
        SPLICE_BUFFER,
    );
    let end = tokio::select! {
        result = copy => match result {
            Ok(_) => End::Closed,
            Err(e) => {
                tracing::debug!(error = %e, "a spliced connection ended with an error");
                End::Error
            }
        },
        () = idle(&activity, idle_limit) => End::Idle,
        // Most protocols are between two exchanges once quiet: the drain need not wait for
        // its timeout.
        () = drained(drain, &activity) => End::Drained,
    };
    (end, client.read, upstream.read)
}

/// Runs the tunnel, once hyper hands over the client's side, until both sides are done, the
/// idle timeout passes, or a side fails.
pub async fn run(mut p: Pending) {
    let client = match (&mut p.client).await {
        Ok(c) => c,
        Err(error) => {
            tracing::debug!(%error, "an upgraded connection was not handed over");
            return;
        }
    };
    run_over(p, TokioIo::new(client)).await;
}

/// Runs the tunnel over `client`, the client's side of the connection after its `101`.
pub async fn run_over<C: AsyncRead + AsyncWrite + Unpin>(p: Pending, client: C) {
    let started = Instant::now();
    p.metrics.active.inc();
    let (end, up, down) = splice(client, p.upstream, p.idle, &p.drain).await;
    p.metrics.active.dec();
    p.metrics.bytes_upstream.inc_by(up);
    p.metrics.bytes_downstream.inc_by(down);
    if let Some((listener, route, peer)) = &p.log {
        tracing::info!(target: "access", listener = %listener, route = %route, %peer,
            upgrade = p.protocol.to_str().unwrap_or("-"), bytes_up = up, bytes_down = down,
            end = end.name(), duration_ms = started.elapsed().as_secs_f64() * 1000.0);
    }
}

/// How long a draining tunnel or TCP splice may stay silent before it is closed: long enough
/// for an exchange in progress to finish, short enough that a quiet connection does not hold
/// the drain to its timeout.
pub const DRAIN_QUIET: Duration = Duration::from_secs(1);

/// Resolves once draining started and the connection then went `DRAIN_QUIET` without a byte.
pub async fn drained(drain: &CancellationToken, activity: &Activity) {
    drain.cancelled().await;
    idle(activity, Some(DRAIN_QUIET)).await;
}

/// When either side of a spliced connection last delivered bytes.
pub struct Activity {
    start: Instant,
    /// Milliseconds since `start`.
    last_ms: AtomicU64,
}

impl Default for Activity {
    fn default() -> Self {
        Self::new()
    }
}

impl Activity {
    /// Starts the clock now, as if a byte had just passed.
    pub fn new() -> Self {
        Self {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn silent_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.start.elapsed().saturating_sub(last)
    }
}

/// Resolves once neither side sent anything for `limit`; never if `limit` is `None`.
pub async fn idle(activity: &Activity, limit: Option<Duration>) {
    let Some(limit) = limit else {
        return std::future::pending().await;
    };
    let mut wait = limit;
    loop {
        tokio::time::sleep(wait).await;
        let silent = activity.silent_for();
        if silent >= limit {
            return;
        }
        wait = limit - silent;
    }
}

/// One side of a spliced connection: counts the bytes read from it and notes activity.
pub struct Watched<IO> {
    io: IO,
    /// Bytes read from this side.
    pub read: u64,
    activity: Arc<Activity>,
}

impl<IO> Watched<IO> {
    /// Watches `io`, noting its reads in `activity`.
    pub fn new(io: IO, activity: Arc<Activity>) -> Self {
        Self {
            io,
            read: 0,
            activity,
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Watched<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.io).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            this.read += n as u64;
            this.activity.touch();
        }
        polled
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Watched<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, data)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_silent_tunnel_ends_at_the_idle_timeout_and_activity_defers_it() {
        let activity = Activity::new();
        let limit = Duration::from_secs(10);
        let watch = idle(&activity, Some(limit));
        tokio::pin!(watch);
        tokio::time::advance(Duration::from_secs(6)).await;
        activity.touch();
        // Ten seconds from the start, but only four since the last bytes: still open.
        assert!(tokio::time::timeout(Duration::from_secs(4), watch.as_mut())
            .await
            .is_err());
        let started = Instant::now();
        watch.await;
        assert_eq!(
            started.elapsed(),
            Duration::from_secs(6),
            "16 s = 6 s + 10 s"
        );
    }
}
