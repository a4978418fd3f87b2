//! Listener metrics: connections, TCP bytes, TLS handshakes, requests refused before routing and
//! upgraded (WebSocket) connections.

use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec};

use super::{CertMetrics, LocalReplies, Register};

/// The result of a TLS handshake: the `result` label of `outrigger_tls_handshakes_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handshake {
    /// The handshake completed.
    Ok,
    /// Client certificates are required and none was sent.
    NoClientCert,
    /// The client's certificate does not chain to the configured CA.
    UntrustedCert,
    /// The client's certificate has expired.
    ExpiredCert,
    /// The client's identity is not in `allowed_identities`.
    IdentityDenied,
    /// The handshake did not finish within the header-read timeout.
    Timeout,
    /// Any other failure.
    Failed,
}

impl Handshake {
    /// Every result, in handle order.
    pub const ALL: [Handshake; 7] = [
        Handshake::Ok,
        Handshake::NoClientCert,
        Handshake::UntrustedCert,
        Handshake::ExpiredCert,
        Handshake::IdentityDenied,
        Handshake::Timeout,
        Handshake::Failed,
    ];

    /// The label value.
    pub const fn name(self) -> &'static str {
        match self {
            Handshake::Ok => "ok",
            Handshake::NoClientCert => "no_client_cert",
            Handshake::UntrustedCert => "untrusted_cert",
            Handshake::ExpiredCert => "expired_cert",
            Handshake::IdentityDenied => "identity_denied",
            Handshake::Timeout => "timeout",
            Handshake::Failed => "failed",
        }
    }
}

/// The listener families.
#[derive(Clone)]
pub struct Families {
    open_connections: IntGaugeVec,
    connections: IntCounterVec,
    worker_connections: IntCounterVec,
    tcp_bytes: IntCounterVec,
    handshakes: IntCounterVec,
    rejected: IntCounterVec,
    refused: IntCounterVec,
    upgrades: IntCounterVec,
    upgrades_active: IntGaugeVec,
    upgrade_bytes: IntCounterVec,
}

/// Handles for one listener.
#[derive(Clone)]
pub struct ListenerMetrics {
    /// Local replies by reason.
    pub local_replies: LocalReplies,
    /// Connections open right now.
    pub open_connections: IntGauge,
    /// Connections accepted.
    pub connections: IntCounter,
    /// Connections accepted, by worker (position 0 is worker 1).
    pub by_worker: Box<[IntCounter]>,
    /// TCP bytes from the client to the upstream.
    pub bytes_upstream: IntCounter,
    /// TCP bytes from the upstream to the client.
    pub bytes_downstream: IntCounter,
    handshakes: [IntCounter; Handshake::ALL.len()],
    /// Connections closed at once because the listener had `max_connections` open.
    pub rejected: IntCounter,
    /// The listener certificate's reloads and expiry.
    pub cert: CertMetrics,
    /// What the HTTP/1 framing check counts.
    pub guard: GuardMetrics,
    /// What upgraded connections (WebSockets) count.
    pub upgrades: UpgradeMetrics,
}

/// The handles of a listener's upgraded connections.
#[derive(Clone)]
pub struct UpgradeMetrics {
    /// Connections switched to another protocol (a `101` relayed).
    pub switched: IntCounter,
    /// Upgraded connections open now.
    pub active: IntGauge,
    /// Bytes from the client to the upstream after the switch.
    pub bytes_upstream: IntCounter,
    /// Bytes from the upstream to the client after the switch.
    pub bytes_downstream: IntCounter,
}

/// The counters a connection's framing check updates.
#[derive(Clone)]
pub struct GuardMetrics {
    /// Requests refused by the framing check.
    pub malformed: IntCounter,
    /// Request heads not finished within the header-read timeout.
    pub header_timeouts: IntCounter,
}

impl Families {
    pub(super) fn new(r: &mut Register<'_>) -> Result<Self, prometheus::Error> {
        Ok(Self {
            open_connections: r.gauge(
                "outrigger_open_connections",
                "Downstream connections open now.",
                &["listener"],
            )?,
            connections: r.counter(
                "outrigger_connections_total",
                "Downstream connections accepted.",
                &["listener"],
            )?,
            worker_connections: r.counter(
                "outrigger_worker_connections_total",
                "Downstream connections accepted, by listener and worker (from 1): how the kernel spreads them over the workers.",
                &["listener", "worker"],
            )?,
            tcp_bytes: r.counter(
                "outrigger_tcp_bytes_total",
                "Bytes spliced by TCP listeners, by direction.",
                &["listener", "direction"],
            )?,
            handshakes: r.counter(
                "outrigger_tls_handshakes_total",
                "TLS handshakes on a listener, by result (ok, no_client_cert, untrusted_cert, expired_cert, identity_denied, timeout, failed).",
                &["listener", "result"],
            )?,
            rejected: r.counter(
                "outrigger_connections_rejected_total",
                "Connections closed on accept, by listener and reason (max_connections).",
                &["listener", "reason"],
            )?,
            upgrades: r.counter(
                "outrigger_upgrades_total",
                "HTTP/1.1 connections switched to another protocol (WebSocket) by a relayed 101.",
                &["listener"],
            )?,
            upgrades_active: r.gauge(
                "outrigger_upgrades_active",
                "Upgraded connections open now.",
                &["listener"],
            )?,
            upgrade_bytes: r.counter(
                "outrigger_upgrade_bytes_total",
                "Bytes relayed over upgraded connections, by direction (upstream, downstream).",
                &["listener", "direction"],
            )?,
            refused: r.counter(
                "outrigger_requests_refused_total",
                "HTTP/1 requests refused before routing, by listener and reason (malformed: the framing check answered 400; header_timeout: 408).",
                &["listener", "reason"],
            )?,
        })
    }

    /// Resolves the handles of one listener served by `workers` workers; its certificate and
    /// reply handles come from the families that own them.
    pub fn resolve(
        &self,
        listener: &str,
        local_replies: LocalReplies,
        cert: CertMetrics,
        workers: usize,
    ) -> ListenerMetrics {
        ListenerMetrics {
            local_replies,
            open_connections: self.open_connections.with_label_values(&[listener]),
            connections: self.connections.with_label_values(&[listener]),
            by_worker: (1..=workers.max(1))
                .map(|w| {
                    self.worker_connections
                        .with_label_values(&[listener, &w.to_string()])
                })
                .collect(),
            bytes_upstream: self.tcp_bytes.with_label_values(&[listener, "upstream"]),
            bytes_downstream: self.tcp_bytes.with_label_values(&[listener, "downstream"]),
            handshakes: Handshake::ALL
                .map(|r| self.handshakes.with_label_values(&[listener, r.name()])),
            rejected: self
                .rejected
                .with_label_values(&[listener, "max_connections"]),
            cert,
            guard: GuardMetrics {
                malformed: self.refused.with_label_values(&[listener, "malformed"]),
                header_timeouts: self
                    .refused
                    .with_label_values(&[listener, "header_timeout"]),
            },
            upgrades: UpgradeMetrics {
                switched: self.upgrades.with_label_values(&[listener]),
                active: self.upgrades_active.with_label_values(&[listener]),
                bytes_upstream: self
                    .upgrade_bytes
                    .with_label_values(&[listener, "upstream"]),
                bytes_downstream: self
                    .upgrade_bytes
                    .with_label_values(&[listener, "downstream"]),
            },
        }
    }
}

impl ListenerMetrics {
    /// Counts a TLS handshake with `result`.
    pub fn handshake(&self, result: Handshake) {
        self.handshakes[result as usize].inc();
    }
}
