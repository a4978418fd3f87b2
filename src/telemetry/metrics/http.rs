//! Request metrics: every answer a listener gives, relayed or local, by route, cluster and class.

use std::time::Duration;

use http::StatusCode;
use prometheus::{Histogram, HistogramVec, IntCounter, IntCounterVec};

use super::Register;
use crate::error::ErrorKind;

/// Request duration buckets in seconds, from 0.5 ms to 30 s.
const DURATION_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// The `route` or `cluster` label of an answer given before a route or cluster was chosen.
pub const NONE: &str = "-";

/// The request families.
#[derive(Clone)]
pub struct Families {
    requests: IntCounterVec,
    duration: HistogramVec,
    local_replies: IntCounterVec,
}

/// Handles for one (listener, route, cluster) triple.
#[derive(Clone)]
pub struct RouteMetrics {
    by_class: [IntCounter; 5],
    duration: Histogram,
}

/// A listener's local-reply counters, one per [`ErrorKind`].
#[derive(Clone)]
pub struct LocalReplies([IntCounter; ErrorKind::ALL.len()]);

impl Families {
    pub(super) fn new(r: &mut Register<'_>) -> Result<Self, prometheus::Error> {
        Ok(Self {
            requests: r.counter(
                "outrigger_requests_total",
                "HTTP requests answered, by listener, route, cluster and status class (`-` where no route or cluster was chosen).",
                &["listener", "route", "cluster", "class"],
            )?,
            duration: r.histogram(
                "outrigger_request_duration_seconds",
                "Time from receiving a request to sending its response headers.",
                DURATION_BUCKETS,
                &["listener", "route", "cluster"],
            )?,
            local_replies: r.counter(
                "outrigger_local_replies_total",
                "Responses the proxy made itself, by listener and reason.",
                &["listener", "reason"],
            )?,
        })
    }

    /// Resolves the handles of one route target; [`NONE`] stands for no route or no cluster.
    pub fn route(&self, listener: &str, route: &str, cluster: &str) -> RouteMetrics {
        let class = |c: &str| {
            self.requests
                .with_label_values(&[listener, route, cluster, c])
        };
        RouteMetrics {
            by_class: [
                class("1xx"),
                class("2xx"),
                class("3xx"),
                class("4xx"),
                class("5xx"),
            ],
            duration: self.duration.with_label_values(&[listener, route, cluster]),
        }
    }

    /// Resolves a listener's local-reply counters.
    pub fn local_replies(&self, listener: &str) -> LocalReplies {
        LocalReplies(ErrorKind::ALL.map(|k| {
            self.local_replies
                .with_label_values(&[listener, k.reason()])
        }))
    }
}

impl RouteMetrics {
    /// Counts one response with `status`, `elapsed` after the request arrived.
    pub fn observe(&self, status: StatusCode, elapsed: Duration) {
        let class = (status.as_u16() / 100).clamp(1, 5) as usize - 1;
        self.by_class[class].inc();
        self.duration.observe(elapsed.as_secs_f64());
    }
}

impl LocalReplies {
    /// Counts a local reply of `kind`.
    pub fn count(&self, kind: ErrorKind) {
        self.0[kind.index()].inc();
    }
}
