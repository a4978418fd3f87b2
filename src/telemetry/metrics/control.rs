//! Control-side metrics: config reloads, discovery updates, DNS lookups, active health checks
//! and certificate files.

use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec};

use super::Register;

/// The result of one answer of a discovery source or DNS lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// Endpoints were found.
    Ok,
    /// The source failed; the last endpoints stay.
    Failed,
    /// The source answered no endpoints; the last ones stay.
    Empty,
}

impl Lookup {
    /// The label value.
    pub const fn name(self) -> &'static str {
        match self {
            Lookup::Ok => "ok",
            Lookup::Failed => "failed",
            Lookup::Empty => "empty",
        }
    }
}

/// The control families.
#[derive(Clone)]
pub struct Families {
    reloads: IntCounterVec,
    config_version: IntGauge,
    discovery: IntCounterVec,
    dns: IntCounterVec,
    checks: IntCounterVec,
    cert_reloads: IntCounterVec,
    cert_expiry: IntGaugeVec,
}

/// Counters of one cluster's discovery source, by result.
#[derive(Clone)]
pub struct DiscoveryMetrics {
    /// Answers with endpoints.
    pub ok: IntCounter,
    /// Failed answers.
    pub failed: IntCounter,
    /// Empty answers.
    pub empty: IntCounter,
}

/// Counters of one cluster's DNS lookups, by result.
#[derive(Clone)]
pub struct DnsMetrics(DiscoveryMetrics);

/// Counters of one cluster's active health checks.
#[derive(Clone)]
pub struct HealthMetrics {
    /// Checks that passed.
    pub passed: IntCounter,
    /// Checks that failed.
    pub failed: IntCounter,
}

/// Certificate-file reloads of one listener or cluster, and (for listeners) the expiry gauge.
#[derive(Clone)]
pub struct CertMetrics {
    /// New material applied after a file change.
    pub applied: IntCounter,
    /// Changed files rejected; the old material stays.
    pub failed: IntCounter,
    /// The serving certificate's expiry, as a Unix timestamp (listeners only).
    pub expiry: Option<IntGauge>,
}

/// The config reload counters and version gauge.
#[derive(Clone)]
pub struct ConfigMetrics {
    reloads: IntCounterVec,
    version: IntGauge,
}

impl Families {
    pub(super) fn new(r: &mut Register<'_>) -> Result<Self, prometheus::Error> {
        let reloads = r.counter(
            "outrigger_config_reloads_total",
            "Config reload attempts, by result.",
            &["result"],
        )?;
        for result in ["success", "failure"] {
            reloads.with_label_values(&[result]);
        }
        let config_version = IntGauge::new(
            "outrigger_config_version",
            "Version number of the active config; grows by one per applied reload.",
        )?;
        Ok(Self {
            reloads,
            config_version: r.add(config_version)?,
            discovery: r.counter(
                "outrigger_discovery_updates_total",
                "Answers of a cluster's discovery source, by source (static, dns, registry) and result (ok, failed, empty); failed and empty keep the last endpoints.",
                &["cluster", "source", "result"],
            )?,
            dns: r.counter(
                "outrigger_dns_lookups_total",
                "DNS lookups of a cluster, by result (ok, failed, empty); failed and empty keep the last endpoints.",
                &["cluster", "result"],
            )?,
            checks: r.counter(
                "outrigger_health_checks_total",
                "Active health checks, by result (passed or failed).",
                &["cluster", "result"],
            )?,
            cert_reloads: r.counter(
                "outrigger_tls_cert_reloads_total",
                "Certificate files re-read after a change, by listener or cluster and result (applied, failed; failed keeps the old material).",
                &["owner", "result"],
            )?,
            cert_expiry: r.gauge(
                "outrigger_tls_cert_expiry_timestamp_seconds",
                "When a listener's serving certificate expires, as a Unix timestamp.",
                &["listener"],
            )?,
        })
    }

    /// The config reload handles.
    pub fn config(&self) -> ConfigMetrics {
        ConfigMetrics {
            reloads: self.reloads.clone(),
            version: self.config_version.clone(),
        }
    }

    /// Resolves the counters of `cluster`'s discovery source `source`.
    pub fn discovery(&self, cluster: &str, source: &str) -> DiscoveryMetrics {
        let c = |r: Lookup| {
            self.discovery
                .with_label_values(&[cluster, source, r.name()])
        };
        DiscoveryMetrics {
            ok: c(Lookup::Ok),
            failed: c(Lookup::Failed),
            empty: c(Lookup::Empty),
        }
    }

    /// Resolves the DNS lookup counters of `cluster`.
    pub fn dns(&self, cluster: &str) -> DnsMetrics {
        let c = |r: Lookup| self.dns.with_label_values(&[cluster, r.name()]);
        DnsMetrics(DiscoveryMetrics {
            ok: c(Lookup::Ok),
            failed: c(Lookup::Failed),
            empty: c(Lookup::Empty),
        })
    }

    /// Resolves the health-check counters of `cluster`.
    pub fn health(&self, cluster: &str) -> HealthMetrics {
        HealthMetrics {
            passed: self.checks.with_label_values(&[cluster, "passed"]),
            failed: self.checks.with_label_values(&[cluster, "failed"]),
        }
    }

    /// Resolves the certificate handles of the cluster `owner` (no expiry gauge).
    pub fn cluster_cert(&self, owner: &str) -> CertMetrics {
        CertMetrics {
            applied: self.cert_reloads.with_label_values(&[owner, "applied"]),
            failed: self.cert_reloads.with_label_values(&[owner, "failed"]),
            expiry: None,
        }
    }

    /// Resolves the certificate handles of the listener `owner`.
    pub fn listener_cert(&self, owner: &str) -> CertMetrics {
        CertMetrics {
            expiry: Some(self.cert_expiry.with_label_values(&[owner])),
            ..self.cluster_cert(owner)
        }
    }
}

impl DiscoveryMetrics {
    /// Counts one answer.
    pub fn count(&self, result: Lookup) {
        match result {
            Lookup::Ok => &self.ok,
            Lookup::Failed => &self.failed,
            Lookup::Empty => &self.empty,
        }
        .inc();
    }
}

impl DnsMetrics {
    /// Counts one lookup.
    pub fn count(&self, result: Lookup) {
        self.0.count(result);
    }
}

impl HealthMetrics {
    /// Counts one check.
    pub fn count(&self, passed: bool) {
        if passed { &self.passed } else { &self.failed }.inc();
    }
}

impl ConfigMetrics {
    /// Counts a file change that left the config's text as it was.
    pub fn unchanged(&self) {
        self.reloads.with_label_values(&["unchanged"]).inc();
    }

    /// Counts a reload attempt; a successful one also publishes `version`.
    pub fn reload(&self, ok: bool, version: u64) {
        self.reloads
            .with_label_values(&[if ok { "success" } else { "failure" }])
            .inc();
        if ok {
            self.set_version(version);
        }
    }

    /// Publishes the version of the config in force.
    pub fn set_version(&self, version: u64) {
        self.version.set(i64::try_from(version).unwrap_or(i64::MAX));
    }
}
