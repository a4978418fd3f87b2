//! The embedded Raft group's metrics: its term and leader, log positions, proposals and their
//! commit latency, snapshots, and the registry's instances and expired leases.

use prometheus::{GaugeVec, HistogramVec, IntCounterVec, IntGaugeVec, Opts};

use super::Register;

/// The mesh families.
#[derive(Clone, Debug)]
pub struct Families {
    term: IntGaugeVec,
    leader: IntGaugeVec,
    leader_changes: IntCounterVec,
    last_log: IntGaugeVec,
    committed: IntGaugeVec,
    applied: IntGaugeVec,
    snapshots: IntCounterVec,
    proposals: IntCounterVec,
    commit: HistogramVec,
    instances: IntGaugeVec,
    leases: IntGaugeVec,
    expired: IntCounterVec,
    share: GaugeVec,
    fallback: IntGaugeVec,
    refreshes: IntCounterVec,
    allocations: IntCounterVec,
    hints: IntCounterVec,
}

/// Commit latency buckets, in seconds: an fsync'd, replicated entry takes milliseconds.
const COMMIT_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// How a proposed operation ended, the `result` label of `outrigger_mesh_proposals_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proposal {
    /// Committed and applied.
    Committed,
    /// This member does not lead.
    NotLeader,
    /// The queue was full.
    Busy,
    /// May or may not have committed (timeout, leader change).
    Unknown,
    /// The member stopped.
    Stopped,
}

impl Proposal {
    fn label(self) -> &'static str {
        match self {
            Proposal::Committed => "committed",
            Proposal::NotLeader => "not_leader",
            Proposal::Busy => "busy",
            Proposal::Unknown => "unknown",
            Proposal::Stopped => "stopped",
        }
    }
}

impl Families {
    pub(super) fn new(r: &mut Register<'_>) -> Result<Self, prometheus::Error> {
        Ok(Self {
            term: r.gauge("outrigger_mesh_term", "Current Raft term of this member.", &[])?,
            leader: r.gauge(
                "outrigger_mesh_leader",
                "Id of the leader this member knows of (0 when none).",
                &[],
            )?,
            leader_changes: r.counter(
                "outrigger_mesh_leader_changes_total",
                "Times the leader this member knows of changed.",
                &[],
            )?,
            last_log: r.gauge(
                "outrigger_mesh_last_log_index",
                "Index of the last entry in this member's log.",
                &[],
            )?,
            committed: r.gauge(
                "outrigger_mesh_commit_index",
                "Index of the last entry this member knows to be committed.",
                &[],
            )?,
            applied: r.gauge(
                "outrigger_mesh_applied_index",
                "Index of the last entry this member applied.",
                &[],
            )?,
            snapshots: r.counter(
                "outrigger_mesh_snapshots_total",
                "Snapshots this member built or installed.",
                &[],
            )?,
            proposals: r.counter(
                "outrigger_mesh_proposals_total",
                "Operations proposed through this member, by result (committed, not_leader, busy, unknown, stopped).",
                &["result"],
            )?,
            commit: r.histogram(
                "outrigger_mesh_commit_seconds",
                "Time from proposing a batch of operations to its commit and apply on the leader.",
                COMMIT_BUCKETS,
                &[],
            )?,
            instances: r.gauge(
                "outrigger_mesh_registered_instances",
                "Instances in the registry as this member holds it.",
                &[],
            )?,
            leases: r.gauge(
                "outrigger_mesh_leases",
                "Leases the leader tracks (0 on other members).",
                &[],
            )?,
            expired: r.counter(
                "outrigger_mesh_expired_leases_total",
                "Leases expired by a committed expiry this member proposed as leader.",
                &[],
            )?,
            share: r.add(GaugeVec::new(
                Opts::new(
                    "outrigger_mesh_rate_limit_share",
                    "Requests per second this sidecar admits under a mesh-wide rate limit: its leased share, or its on_partition fallback.",
                ),
                &["limit"],
            )?)?,
            fallback: r.gauge(
                "outrigger_mesh_rate_limit_fallback",
                "1 while a mesh-wide rate limit runs on its on_partition setting (no unexpired share), else 0.",
                &["limit"],
            )?,
            refreshes: r.counter(
                "outrigger_mesh_rate_limit_refreshes_total",
                "Share refreshes this sidecar sent to the group, by result (ok, failed).",
                &["result"],
            )?,
            hints: r.counter(
                "outrigger_failure_hints_total",
                "Failure hints: sent (this sidecar published one), received (from the group), acted_on (it named one of this sidecar's endpoints, now given a small share), overridden (lifted early by this sidecar's own successes).",
                &["event"],
            )?,
            allocations: r.counter(
                "outrigger_mesh_rate_limit_allocations_total",
                "Share allocations this member committed as leader (one log entry each, for every limit and sidecar).",
                &[],
            )?,
        })
    }

    /// Counts `n` operations that ended as `result`.
    pub fn proposed(&self, result: Proposal, n: usize) {
        self.proposals
            .with_label_values(&[result.label()])
            .inc_by(n as u64);
    }

    /// Records a batch commit latency.
    pub fn committed_in(&self, seconds: f64) {
        self.commit
            .with_label_values(&[] as &[&str])
            .observe(seconds);
    }

    /// Counts leases removed by an expiry.
    pub fn expired(&self, n: usize) {
        self.expired
            .with_label_values(&[] as &[&str])
            .inc_by(n as u64);
    }

    /// Sets the member's Raft state gauges; counts a leader change and a new snapshot.
    pub fn raft(&self, term: u64, leader: Option<u64>, last_log: u64, applied: u64) {
        self.term.with_label_values(&[] as &[&str]).set(term as i64);
        let leader = leader.unwrap_or(0) as i64;
        let g = self.leader.with_label_values(&[] as &[&str]);
        if g.get() != leader {
            g.set(leader);
            self.leader_changes.with_label_values(&[] as &[&str]).inc();
        }
        self.last_log
            .with_label_values(&[] as &[&str])
            .set(last_log as i64);
        self.applied
            .with_label_values(&[] as &[&str])
            .set(applied as i64);
    }

    /// Sets the commit index gauge.
    pub fn committed(&self, index: u64) {
        self.committed
            .with_label_values(&[] as &[&str])
            .set(index as i64);
    }

    /// Counts a snapshot.
    pub fn snapshot(&self) {
        self.snapshots.with_label_values(&[] as &[&str]).inc();
    }

    /// Sets the registry and lease gauges.
    pub fn registry(&self, instances: usize, leases: usize) {
        self.instances
            .with_label_values(&[] as &[&str])
            .set(instances as i64);
        self.leases
            .with_label_values(&[] as &[&str])
            .set(leases as i64);
    }

    /// The share gauge and fallback flag of one mesh-wide limit.
    pub fn rate_limit(&self, limit: &str) -> (prometheus::Gauge, prometheus::IntGauge) {
        (
            self.share.with_label_values(&[limit]),
            self.fallback.with_label_values(&[limit]),
        )
    }

    /// Counts a share refresh.
    pub fn refreshed(&self, ok: bool) {
        self.refreshes
            .with_label_values(&[if ok { "ok" } else { "failed" }])
            .inc();
    }

    /// Counts a committed allocation.
    pub fn allocated(&self) {
        self.allocations.with_label_values(&[] as &[&str]).inc();
    }

    /// The failure hint counter of `event` (sent, received, acted_on, overridden).
    pub fn hint(&self, event: &str) -> prometheus::IntCounter {
        self.hints.with_label_values(&[event])
    }
}
